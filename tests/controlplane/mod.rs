//! A real Kubernetes control plane for tests: etcd and kube-apiserver on free
//! loopback ports, RBAC authorization, a bearer-token admin, a kubeconfig, and
//! the CRDs of `crds/` installed. Binaries come from `KUBEBUILDER_ASSETS` or
//! from `tests/controlplane/build.sh`, which builds them from pinned Go
//! modules once. Everything is torn down on drop.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct ControlPlane {
    pub dir: tempfile::TempDir,
    pub kubeconfig: PathBuf,
    pub bin: PathBuf,
    children: Vec<Child>,
}

/// Where the API server listens, and what follows from it.
pub enum Serving {
    /// On 127.0.0.1, for processes on this machine: the operator run as a
    /// local process, no nodes, no service accounts' tokens.
    Loopback,
    /// On the host's address on a node's pod network (tests/node), so pods
    /// reach it through the `kubernetes` Service; pods get service account
    /// tokens, the kubelet is authorized as a node, and the API server
    /// calls webhooks at their Service's ClusterIP (kube-proxy's rules take
    /// it to the pod) and kubelets at the node's address.
    Node { address: std::net::Ipv4Addr },
}

impl Serving {
    fn address(&self) -> String {
        match self {
            Serving::Loopback => "127.0.0.1".into(),
            Serving::Node { address } => address.to_string(),
        }
    }

    /// The API server's token file: the tests' admin, and a node's
    /// kubelet (`licensor-node-token`, node `node`) where there is one.
    fn tokens(&self) -> &'static str {
        match self {
            Serving::Loopback => "licensor-admin-token,admin,admin,system:masters\n",
            Serving::Node { .. } => {
                "licensor-admin-token,admin,admin,system:masters\n\
                 licensor-node-token,system:node:node,node,system:nodes\n"
            }
        }
    }

    fn flags(&self) -> &'static [&'static str] {
        match self {
            Serving::Loopback => &[
                "--authorization-mode=RBAC",
                "--service-cluster-ip-range=10.0.0.0/24",
                "--disable-admission-plugins=ServiceAccount",
            ],
            Serving::Node { .. } => &[
                "--authorization-mode=Node,RBAC",
                "--service-cluster-ip-range=10.96.0.0/24",
                "--kubelet-preferred-address-types=InternalIP",
                "--allow-privileged=false",
            ],
        }
    }
}

/// What one kubectl run did.
#[derive(Debug)]
pub struct Kubectl {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

pub use crate::common::free_port;

/// The helm binary, built by `tests/controlplane/build-helm.sh` (once).
pub fn helm() -> PathBuf {
    static HELM: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    HELM.get_or_init(|| {
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/controlplane/build-helm.sh"
        );
        let out = Command::new("bash")
            .arg(script)
            .stderr(Stdio::inherit())
            .output()
            .expect("run tests/controlplane/build-helm.sh");
        assert!(
            out.status.success(),
            "tests/controlplane/build-helm.sh failed"
        );
        PathBuf::from(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .last()
                .expect("a path")
                .trim(),
        )
    })
    .clone()
}

fn assets() -> PathBuf {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/controlplane/build.sh");
    let out = Command::new("bash")
        .arg(script)
        .stderr(Stdio::inherit())
        .output()
        .expect("run tests/controlplane/build.sh");
    assert!(out.status.success(), "tests/controlplane/build.sh failed");
    let dir = String::from_utf8_lossy(&out.stdout);
    PathBuf::from(
        dir.lines()
            .last()
            .expect("build.sh prints the directory")
            .trim(),
    )
}

/// Starts `bin` in a process group of its own, under a watchdog that ends
/// it with this test process, even one killed with no chance to drop it
/// (a CI job's timeout): the control plane went on holding its ports and
/// memory. Drop ends the group, watchdog and program at once.
fn spawn(bin: &Path, args: &[String], log: &Path) -> Child {
    use std::os::unix::process::CommandExt;
    let log = std::fs::File::create(log).expect("log file");
    crate::common::ends_with_this_process("KILL", "")
        .arg(bin)
        .args(args)
        .process_group(0)
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()))
}

impl ControlPlane {
    pub fn start() -> ControlPlane {
        let cp = ControlPlane::start_without_crds();
        let crds = concat!(env!("CARGO_MANIFEST_DIR"), "/crds");
        cp.ok(&["apply", "-f", crds]);
        cp.ok(&[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/dedicatedlicenses.licensor.dev",
            "crd/licensepools.licensor.dev",
        ]);
        cp
    }

    /// A control plane with no CRD installed (for `helm install`). Its
    /// ports are free when chosen, but another test may bind one before
    /// etcd or the API server does: a process that exits while starting is
    /// started again on new ports (three tries).
    pub fn start_without_crds() -> ControlPlane {
        ControlPlane::start_serving(&Serving::Loopback)
    }

    /// A control plane for `serving`, started again on new ports when a
    /// process exits while starting (three tries).
    pub fn start_serving(serving: &Serving) -> ControlPlane {
        let mut tries = 0;
        loop {
            tries += 1;
            match ControlPlane::launch(serving) {
                Ok(cp) => return cp,
                Err(why) if tries < 3 => eprintln!("control plane: starting again: {why}"),
                Err(why) => panic!("the control plane did not start in {tries} tries: {why}"),
            }
        }
    }

    fn launch(serving: &Serving) -> Result<ControlPlane, String> {
        let bin = assets();
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let key = rcgen::KeyPair::generate().expect("service account key");
        std::fs::write(d.join("sa.key"), key.serialize_pem()).expect("write key");
        std::fs::write(d.join("sa.pub"), key.public_key_pem()).expect("write public key");
        std::fs::write(d.join("tokens.csv"), serving.tokens()).expect("write tokens");

        let (client, peer, secure) = (free_port(), free_port(), free_port());
        let etcd_url = format!("http://127.0.0.1:{client}");
        let etcd = spawn(
            &bin.join("etcd"),
            &[
                format!("--data-dir={}", d.join("etcd").display()),
                format!("--listen-client-urls={etcd_url}"),
                format!("--advertise-client-urls={etcd_url}"),
                format!("--listen-peer-urls=http://127.0.0.1:{peer}"),
                format!("--initial-advertise-peer-urls=http://127.0.0.1:{peer}"),
                format!("--initial-cluster=default=http://127.0.0.1:{peer}"),
                "--unsafe-no-fsync=true".into(),
            ],
            &d.join("etcd.log"),
        );
        let sa = d.join("sa.key").display().to_string();
        let address = serving.address();
        let mut flags = vec![
            format!("--etcd-servers={etcd_url}"),
            format!("--bind-address={address}"),
            format!("--advertise-address={address}"),
            format!("--secure-port={secure}"),
            format!("--cert-dir={}", d.join("certs").display()),
            "--service-account-issuer=https://kubernetes.default.svc".into(),
            format!("--service-account-key-file={}", d.join("sa.pub").display()),
            format!("--service-account-signing-key-file={sa}"),
            format!("--token-auth-file={}", d.join("tokens.csv").display()),
        ];
        flags.extend(serving.flags().iter().map(|f| f.to_string()));
        let apiserver = spawn(
            &bin.join("kube-apiserver"),
            &flags,
            &d.join("apiserver.log"),
        );
        let kubeconfig = d.join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1
kind: Config
clusters: [{{name: test, cluster: {{server: \"https://{address}:{secure}\", insecure-skip-tls-verify: true}}}}]
users: [{{name: admin, user: {{token: licensor-admin-token}}}}]
contexts: [{{name: test, context: {{cluster: test, user: admin, namespace: default}}}}]
current-context: test
"
            ),
        )
        .expect("write kubeconfig");
        let mut cp = ControlPlane {
            dir,
            kubeconfig,
            bin,
            children: vec![etcd, apiserver],
        };
        cp.wait_ready()?;
        Ok(cp)
    }

    /// Waits for the API server to be ready; an error when etcd or the API
    /// server exited (a port taken meanwhile), with its log.
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let r = self.kubectl(&["get", "--raw", "/readyz"]);
            if r.code == 0 {
                return Ok(());
            }
            for (child, log) in self.children.iter_mut().zip(["etcd.log", "apiserver.log"]) {
                if let Ok(Some(status)) = child.try_wait() {
                    let log =
                        std::fs::read_to_string(self.dir.path().join(log)).unwrap_or_default();
                    let tail: Vec<&str> = log.lines().rev().take(5).collect();
                    return Err(format!("{status}: {}", tail.join(" | ")));
                }
            }
            assert!(
                Instant::now() < deadline,
                "kube-apiserver not ready in 180 s: {r:?}\n{}",
                std::fs::read_to_string(self.dir.path().join("apiserver.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    pub fn kubectl(&self, args: &[&str]) -> Kubectl {
        self.kubectl_stdin(args, None)
    }

    /// Runs kubectl with `stdin` piped in (for `apply -f -`).
    pub fn kubectl_stdin(&self, args: &[&str], stdin: Option<&str>) -> Kubectl {
        use std::io::Write;
        let mut child = Command::new(self.bin.join("kubectl"))
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run kubectl");
        if let Some(input) = stdin {
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(input.as_bytes())
                .expect("write stdin");
        }
        drop(child.stdin.take());
        let out = child.wait_with_output().expect("kubectl output");
        Kubectl {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Runs helm (built beside kubectl) against this control plane.
    pub fn helm(&self, args: &[&str]) -> Kubectl {
        let out = self
            .helm_homes(&mut Command::new(helm()))
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .output()
            .expect("run helm");
        Kubectl {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Helm's own directories for this control plane, so no test reads or
    /// writes the machine's.
    fn helm_homes<'c>(&self, command: &'c mut Command) -> &'c mut Command {
        command
            .env("HELM_CACHE_HOME", self.dir.path().join("helm/cache"))
            .env("HELM_CONFIG_HOME", self.dir.path().join("helm/config"))
            .env("HELM_DATA_HOME", self.dir.path().join("helm/data"))
    }

    /// A bash, in `dir`, whose `licensor`, `kubectl` and `helm` are this
    /// build's and talk to this control plane, for running documented
    /// commands as a reader types them.
    pub fn shell(&self, dir: &Path) -> Command {
        let path = format!(
            "{}:{}:{}:{}",
            Path::new(env!("CARGO_BIN_EXE_licensor"))
                .parent()
                .unwrap()
                .display(),
            self.bin.display(),
            helm().parent().unwrap().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut shell = Command::new("bash");
        self.helm_homes(&mut shell)
            .current_dir(dir)
            .env("PATH", path)
            .env("KUBECONFIG", &self.kubeconfig)
            .stdin(Stdio::null());
        shell
    }

    /// Runs kubectl and asserts success.
    pub fn ok(&self, args: &[&str]) -> String {
        let r = self.kubectl(args);
        assert_eq!(r.code, 0, "kubectl {args:?}: {r:?}");
        r.stdout
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        for child in self.children.iter_mut().rev() {
            let group = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
            let _ = child.wait();
        }
    }
}

impl ControlPlane {
    /// The process groups etcd and the API server run in.
    pub fn process_groups(&self) -> Vec<u32> {
        self.children.iter().map(Child::id).collect()
    }
}

/// How many live processes (not zombies) run in process group `group`,
/// read from `/proc`.
pub fn processes_in_group(group: u32) -> usize {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter(|stat| {
            // pid (comm) state ppid pgrp ...: comm may hold spaces.
            let fields: Vec<&str> = stat
                .rsplit_once(')')
                .map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
            fields.first() != Some(&"Z")
                && fields.get(2).and_then(|g| g.parse::<u32>().ok()) == Some(group)
        })
        .count()
}

impl ControlPlane {
    /// `kubectl get ... -o json`, parsed.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        let out = self.ok(&all);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("kubectl {args:?}: {e}: {out}"))
    }

    /// `kubectl apply -f -` of `yaml`, asserting success.
    pub fn apply(&self, yaml: &str) {
        let r = self.kubectl_stdin(&["apply", "-f", "-"], Some(yaml));
        assert_eq!(r.code, 0, "kubectl apply: {r:?}\n{yaml}");
    }
}

/// Polls `probe` every 100 ms until it answers `Some`, or fails after
/// `timeout` with `what` and the last answer's context from `context`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A CA and a serving certificate for 127.0.0.1, written to `dir` as
/// `tls.crt` and `tls.key` (a kubernetes.io/tls Secret's layout). Returns the
/// CA certificate (PEM), the webhook configuration's caBundle.
pub fn webhook_certificate(dir: &Path) -> String {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().expect("CA key")).expect("CA");
    let key = KeyPair::generate().expect("serving key");
    let serving = CertificateParams::new(vec!["127.0.0.1".to_string()])
        .expect("serving params")
        .signed_by(&key, &ca)
        .expect("serving certificate");
    std::fs::create_dir_all(dir).expect("certificate directory");
    std::fs::write(dir.join("tls.crt"), serving.pem()).expect("write tls.crt");
    std::fs::write(dir.join("tls.key"), key.serialize_pem()).expect("write tls.key");
    ca.pem()
}

impl ControlPlane {
    /// Registers the operator's mutating webhook (`/mutate`, CREATE), served
    /// on 127.0.0.1:`port` with a certificate from `ca_pem`, as the chart
    /// registers it.
    pub fn register_webhook(&self, port: u16, ca_pem: &str) {
        self.register("Mutating", "finalizer", "/mutate", "[CREATE]", port, ca_pem);
    }

    /// Registers the operator's validating webhook (`/validate`, CREATE and
    /// UPDATE), as the chart registers it.
    pub fn register_validating_webhook(&self, port: u16, ca_pem: &str) {
        self.register(
            "Validating",
            "validate",
            "/validate",
            "[CREATE, UPDATE]",
            port,
            ca_pem,
        );
    }

    /// A webhook configuration of `kind` (Mutating or Validating), with
    /// failurePolicy Ignore, for DedicatedLicenses.
    fn register(
        &self,
        kind: &str,
        name: &str,
        path: &str,
        operations: &str,
        port: u16,
        ca_pem: &str,
    ) {
        use base64::Engine;
        let bundle = base64::engine::general_purpose::STANDARD.encode(ca_pem);
        self.apply(&format!(
            "apiVersion: admissionregistration.k8s.io/v1
kind: {kind}WebhookConfiguration
metadata:
  name: licensor
webhooks:
  - name: {name}.licensor.dev
    admissionReviewVersions: [v1]
    sideEffects: None
    failurePolicy: Ignore
    timeoutSeconds: 3
    matchPolicy: Equivalent
    clientConfig:
      url: https://127.0.0.1:{port}{path}
      caBundle: {bundle}
    rules:
      - apiGroups: [licensor.dev]
        apiVersions: ['*']
        resources: [dedicatedlicenses]
        operations: {operations}
        scope: Namespaced
"
        ));
    }
}

/// A `licensor operator` process against a control plane.
pub struct Operator {
    child: Child,
    pub log: PathBuf,
    pub port: u16,
}

impl Operator {
    /// Starts the operator with `backend` and extra flags; it logs to a file
    /// in the control plane's directory named after `name`.
    pub fn start(cp: &ControlPlane, name: &str, backend: &str, flags: &[&str]) -> Operator {
        Operator::start_as(cp, &cp.kubeconfig, name, backend, flags)
    }

    /// Starts the operator with the credentials of `kubeconfig`.
    pub fn start_as(
        cp: &ControlPlane,
        kubeconfig: &Path,
        name: &str,
        backend: &str,
        flags: &[&str],
    ) -> Operator {
        let binary = Path::new(env!("CARGO_BIN_EXE_licensor"));
        Operator::start_binary(cp, binary, kubeconfig, name, backend, flags)
    }

    /// Starts the operator from another build of licensor (the image's
    /// static one, say).
    pub fn start_binary(
        cp: &ControlPlane,
        binary: &Path,
        kubeconfig: &Path,
        name: &str,
        backend: &str,
        flags: &[&str],
    ) -> Operator {
        let port = free_port();
        let log = cp.dir.path().join(format!("operator-{name}.log"));
        let file = std::fs::File::create(&log).expect("operator log");
        let child = Command::new(binary)
            .args(["--backend", backend, "operator"])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(flags)
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info,licensor=debug")
            .env_remove("LICENSOR_TOKEN")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("start licensor operator");
        let mut op = Operator { child, log, port };
        let deadline = Instant::now() + Duration::from_secs(90);
        while op.get("/healthz").filter(|b| b.contains("ok")).is_none() {
            let exited = op.child.try_wait().ok().flatten();
            assert!(
                exited.is_none() && Instant::now() < deadline,
                "the operator's /healthz did not answer ({}):\n{}",
                exited.map_or("still running after 90 s".to_string(), |s| format!(
                    "it exited: {s}"
                )),
                op.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        op
    }

    /// The body of an HTTP GET on the operator's endpoint, if it answers.
    pub fn get(&self, path: &str) -> Option<String> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        let (head, body) = out.split_once("\r\n\r\n")?;
        head.starts_with("HTTP/1.0 200")
            .then_some(())
            .or_else(|| head.starts_with("HTTP/1.1 200").then_some(()))?;
        Some(body.to_string())
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, no goodbye.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        self.child.wait().ok().and_then(|s| s.code())
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
    }
}
