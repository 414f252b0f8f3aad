//! A one-node Kubernetes cluster for tests: the control plane of
//! `tests/controlplane` serving on the node's pod network, with
//! kube-controller-manager and kube-scheduler, and a node made of Debian's
//! containerd, runc and CNI plugins (bridge, host-local, loopback, portmap)
//! with the kubelet and kube-proxy built from the same pinned Kubernetes
//! modules. No registry: the pod sandbox image is built here from
//! `pause.c`, and images are imported into containerd from OCI archives.
//!
//! Needs root (containerd, runc, the bridge and the pod network namespaces).
//! Everything it makes is under one temporary directory, the bridge
//! `licensor0` and the pods' network namespaces, and is taken down on drop.
//! The pod network is 10.244.0.0/24 on the bridge, the host at 10.244.0.1;
//! services are 10.96.0.0/24. Nothing leaves the machine.
#![allow(dead_code)]

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::controlplane::{ControlPlane, Serving, free_port, wait_for};

/// The host's address on the pod network: the API server, the kubelet and
/// what pods reach on the host listen here.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 1);
const BRIDGE: &str = "licensor0";
const POD_SUBNET: &str = "10.244.0.0/24";
const NODE: &str = "node";
/// The sandbox image's name in containerd.
const PAUSE: &str = "licensor.test/pause:1";

pub struct Node {
    /// Torn down after the node (fields drop in order).
    children: Vec<(&'static str, Child)>,
    pub dir: tempfile::TempDir,
    pub cp: ControlPlane,
    netns_before: Vec<String>,
}

/// Runs a command to completion; its stderr on failure.
fn run(what: &str, command: &mut Command) -> Result<String, String> {
    let out = command
        .output()
        .map_err(|e| format!("{what}: cannot run: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{what}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Fails the test with what the machine refused, by name.
fn require(what: &str, result: Result<String, String>) -> String {
    result.unwrap_or_else(|e| panic!("the test node needs {what}, which this machine refused: {e}"))
}

fn netns() -> Vec<String> {
    std::fs::read_dir("/var/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn spawn(name: &'static str, bin: &Path, args: &[String], dir: &Path) -> (&'static str, Child) {
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).expect("log file");
    let child = Command::new(bin)
        .args(args)
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()));
    (name, child)
}

impl Node {
    /// Starts the cluster and waits for the node to be Ready.
    pub fn start() -> Node {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        assert!(
            root,
            "the test node needs root: containerd, runc and the pod network's bridge"
        );
        for (what, path) in [
            (
                "Debian's containerd (tests/setup.sh)",
                "/usr/bin/containerd",
            ),
            ("Debian's runc (tests/setup.sh)", "/usr/sbin/runc"),
            (
                "Debian's containernetworking-plugins (tests/setup.sh)",
                "/usr/lib/cni/bridge",
            ),
        ] {
            assert!(
                Path::new(path).exists(),
                "the test node needs {what}: no {path}"
            );
        }
        let dir = tempfile::Builder::new()
            .prefix("licensor-node")
            .tempdir()
            .expect("tempdir");
        let d = dir.path().to_path_buf();
        // The bridge first, with the host's address: the API server listens
        // on it, and the CNI bridge plugin takes it as it finds it.
        let _ = run(
            "ip link del",
            Command::new("ip").args(["link", "del", BRIDGE]),
        );
        require(
            "a bridge interface",
            run(
                "ip link add",
                Command::new("ip").args(["link", "add", BRIDGE, "type", "bridge"]),
            ),
        );
        require(
            "an address on the bridge",
            run(
                "ip addr add",
                Command::new("ip").args(["addr", "add", &format!("{GATEWAY}/24"), "dev", BRIDGE]),
            ),
        );
        require(
            "the bridge up",
            run(
                "ip link set",
                Command::new("ip").args(["link", "set", BRIDGE, "up"]),
            ),
        );
        let netns_before = netns();
        let cp = ControlPlane::start_serving(&Serving::Node { address: GATEWAY });
        let mut node = Node {
            children: Vec::new(),
            dir,
            cp,
            netns_before,
        };
        node.start_controllers();
        node.start_containerd(&d);
        node.import(&node.pause_image());
        node.start_kubelet(&d);
        wait_for("the node Ready", Duration::from_secs(120), || {
            let r = node.cp.kubectl(&[
                "get",
                "node",
                NODE,
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
            ]);
            (r.stdout == "True").then_some(())
        });
        node
    }

    fn start_controllers(&mut self) {
        let bin = self.cp.bin.clone();
        let cp = self.cp.dir.path();
        let kubeconfig = self.cp.kubeconfig.display().to_string();
        let d = self.dir.path().to_path_buf();
        self.children.push(spawn(
            "kube-controller-manager",
            &bin.join("kube-controller-manager"),
            &[
                format!("--kubeconfig={kubeconfig}"),
                format!(
                    "--root-ca-file={}",
                    cp.join("certs/apiserver.crt").display()
                ),
                format!(
                    "--service-account-private-key-file={}",
                    cp.join("sa.key").display()
                ),
                "--bind-address=127.0.0.1".into(),
                "--secure-port=0".into(),
                "--leader-elect=false".into(),
                "--controllers=*,-nodeipam,-service-lb-controller,-cloud-node-lifecycle".into(),
                format!("--cluster-cidr={POD_SUBNET}"),
            ],
            &d,
        ));
        self.children.push(spawn(
            "kube-scheduler",
            &bin.join("kube-scheduler"),
            &[
                format!("--kubeconfig={kubeconfig}"),
                "--bind-address=127.0.0.1".into(),
                "--secure-port=0".into(),
                "--leader-elect=false".into(),
            ],
            &d,
        ));
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("containerd/containerd.sock")
    }

    fn start_containerd(&mut self, d: &Path) {
        std::fs::create_dir_all(d.join("cni")).expect("cni dir");
        std::fs::write(
            d.join("cni/10-licensor.conflist"),
            format!(
                r#"{{"cniVersion": "1.0.0", "name": "licensor-test", "plugins": [
  {{"type": "bridge", "bridge": "{BRIDGE}", "isGateway": true, "ipMasq": false, "hairpinMode": true,
   "ipam": {{"type": "host-local", "dataDir": "{}", "routes": [{{"dst": "0.0.0.0/0"}}],
            "ranges": [[{{"subnet": "{POD_SUBNET}", "rangeStart": "10.244.0.10", "gateway": "{GATEWAY}"}}]]}}}},
  {{"type": "portmap", "capabilities": {{"portMappings": true}}}}]}}"#,
                d.join("ipam").display()
            ),
        )
        .expect("write the CNI configuration");
        // restrict_oom_score_adj: a sandbox asks for -998, which only a
        // process with CAP_SYS_RESOURCE may set; this keeps each container's
        // at least the runtime's own, as for a runtime that is not all-powerful.
        std::fs::write(
            d.join("containerd.toml"),
            format!(
                r#"version = 2
root = "{d}/containerd/root"
state = "{d}/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = "{d}/containerd/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE}"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{d}/runc"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{d}/cni"
"#,
                d = d.display()
            ),
        )
        .expect("write the containerd configuration");
        self.children.push(spawn(
            "containerd",
            Path::new("/usr/bin/containerd"),
            &[format!("--config={}", d.join("containerd.toml").display())],
            d,
        ));
        wait_for("containerd", Duration::from_secs(30), || {
            self.ctr(&["version"]).ok().map(|_| ())
        });
    }

    fn start_kubelet(&mut self, d: &Path) {
        let socket = format!("unix://{}", self.socket().display());
        std::fs::write(
            d.join("kubelet.yaml"),
            format!(
                "apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# This machine's cgroups are v1, which the kubelet refuses unless told.
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupsPerQOS: false
enforceNodeAllocatable: []
failSwapOn: false
address: {GATEWAY}
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 0
authentication: {{anonymous: {{enabled: true}}, webhook: {{enabled: false}}}}
authorization: {{mode: AlwaysAllow}}
containerRuntimeEndpoint: {socket}
imageServiceEndpoint: {socket}
podLogsDir: {}
resolvConf: \"\"
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {{}}
localStorageCapacityIsolation: false
",
                d.join("pods").display()
            ),
        )
        .expect("write the kubelet configuration");
        let kubeconfig = std::fs::read_to_string(&self.cp.kubeconfig)
            .expect("kubeconfig")
            .replace("licensor-admin-token", "licensor-node-token");
        std::fs::write(d.join("kubelet.kubeconfig"), kubeconfig).expect("kubelet kubeconfig");
        let bin = self.cp.bin.clone();
        self.children.push(spawn(
            "kubelet",
            &bin.join("kubelet"),
            &[
                format!("--config={}", d.join("kubelet.yaml").display()),
                format!("--kubeconfig={}", d.join("kubelet.kubeconfig").display()),
                format!("--root-dir={}", d.join("kubelet").display()),
                format!("--hostname-override={NODE}"),
                format!("--node-ip={GATEWAY}"),
            ],
            d,
        ));
        self.children.push(spawn(
            "kube-proxy",
            &bin.join("kube-proxy"),
            &[
                format!("--kubeconfig={}", self.cp.kubeconfig.display()),
                format!("--hostname-override={NODE}"),
                format!("--cluster-cidr={POD_SUBNET}"),
                "--proxy-mode=iptables".into(),
                format!("--metrics-bind-address=127.0.0.1:{}", free_port()),
                format!("--healthz-bind-address=127.0.0.1:{}", free_port()),
                "--conntrack-max-per-core=0".into(),
            ],
            d,
        ));
    }

    /// `ctr` in containerd's Kubernetes namespace.
    pub fn ctr(&self, args: &[&str]) -> Result<String, String> {
        run(
            "ctr",
            Command::new("ctr")
                .arg("--address")
                .arg(self.socket())
                .args(["--namespace", "k8s.io"])
                .args(args)
                .stdin(Stdio::null()),
        )
    }

    /// Imports an OCI archive (`make image`) into the node's image store.
    pub fn import(&self, archive: &Path) {
        let archive = archive.display().to_string();
        self.ctr(&["images", "import", "--all-platforms", &archive])
            .unwrap_or_else(|e| panic!("import {archive}: {e}"));
    }

    /// The sandbox image: pause.c, static, in an OCI archive.
    fn pause_image(&self) -> PathBuf {
        let here = Path::new(env!("CARGO_MANIFEST_DIR"));
        let d = self.dir.path().join("pause");
        std::fs::create_dir_all(&d).expect("pause dir");
        require(
            "musl-gcc (tests/setup.sh)",
            run(
                "musl-gcc",
                Command::new("musl-gcc")
                    .args(["-static", "-Os", "-s", "-o"])
                    .arg(d.join("pause"))
                    .arg(here.join("tests/node/pause.c")),
            ),
        );
        std::fs::copy(
            here.join("tests/node/pause.Dockerfile"),
            d.join("Dockerfile"),
        )
        .expect("copy the Dockerfile");
        let archive = d.join("pause.oci.tar");
        let (name, version) = PAUSE.split_once(':').expect("name:tag");
        run(
            "build/oci-image.py",
            Command::new(here.join("build/oci-image.py"))
                .arg("--dockerfile")
                .arg(d.join("Dockerfile"))
                .arg("--out")
                .arg(&archive)
                .args(["--name", name, "--version", version])
                .args(["--revision", "test", "--source", "tests/node", "--licenses"])
                .arg("Apache-2.0")
                .arg(format!("linux/amd64={}", d.join("pause").display())),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        archive
    }

    /// [`wait_for`], failing with the node's account of its pods.
    pub fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        mut probe: impl FnMut() -> Option<T>,
    ) -> T {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(answer) = probe() {
                return answer;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}\n{}",
                self.diagnose()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The pods as `kubectl describe` tells them and the kubelet's last
    /// lines: what a failure's message needs.
    pub fn diagnose(&self) -> String {
        let pods = self.cp.kubectl(&["describe", "pods", "-A"]);
        let mut logs = String::new();
        for pod in self
            .cp
            .kubectl(&[
                "get",
                "pods",
                "-A",
                "-o",
                "jsonpath={range .items[*]}{.metadata.namespace}/{.metadata.name} {end}",
            ])
            .stdout
            .split_whitespace()
        {
            let (ns, name) = pod.split_once('/').unwrap_or_default();
            for previous in ["--previous=false", "--previous=true"] {
                let r = self.cp.kubectl(&[
                    "logs",
                    "-n",
                    ns,
                    name,
                    "--all-containers",
                    "--tail=20",
                    previous,
                ]);
                logs.push_str(&format!("--- {pod} {previous}\n{}{}", r.stdout, r.stderr));
            }
        }
        for component in ["kubelet", "kube-proxy"] {
            let log = self.log(component);
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            logs.push_str(&format!(
                "--- {component}'s last lines:\n{}\n",
                tail.join("\n")
            ));
        }
        format!("{}\n{logs}", pods.stdout)
    }

    /// A component's log (for a failure's message).
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{name}.log"))).unwrap_or_default()
    }

    /// A hostPath PersistentVolume of this node, with no class, that a
    /// claim of `size` binds to; its directory. Writable by any user, as
    /// the local-path provisioners of kind and k3d make theirs (a hostPath
    /// volume takes no fsGroup).
    pub fn persistent_volume(&self, name: &str, size: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = self.dir.path().join("volumes").join(name);
        std::fs::create_dir_all(&path).expect("volume dir");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777))
            .expect("volume mode");
        self.cp.apply(&format!(
            "apiVersion: v1
kind: PersistentVolume
metadata: {{name: {name}}}
spec:
  capacity: {{storage: {size}}}
  accessModes: [ReadWriteOnce]
  persistentVolumeReclaimPolicy: Retain
  storageClassName: \"\"
  hostPath: {{path: {}, type: DirectoryOrCreate}}
",
            path.display()
        ));
        path
    }
}

/// The kubelet's own iptables chains (KUBE-FIREWALL, the canaries) and the
/// jumps to them, which kube-proxy's cleanup leaves.
fn remove_kubelet_rules() {
    for table in ["filter", "nat", "mangle"] {
        let Ok(rules) = run(
            "iptables -S",
            Command::new("iptables").args(["-t", table, "-S"]),
        ) else {
            continue;
        };
        for rule in rules.lines() {
            let words: Vec<&str> = rule.split_whitespace().collect();
            if words.first() == Some(&"-A") && rule.contains("-j KUBE-") {
                let _ = Command::new("iptables")
                    .args(["-t", table, "-D"])
                    .args(&words[1..])
                    .output();
            }
        }
        for rule in rules.lines() {
            if let Some(chain) = rule.strip_prefix("-N KUBE-") {
                let chain = format!("KUBE-{chain}");
                let _ = Command::new("iptables")
                    .args(["-t", table, "-F", &chain])
                    .output();
                let _ = Command::new("iptables")
                    .args(["-t", table, "-X", &chain])
                    .output();
            }
        }
    }
}

impl Node {
    /// Every container of the node, killed and removed.
    fn stop_containers(&self) {
        let Ok(ids) = self.ctr(&["tasks", "ls", "-q"]) else {
            return;
        };
        for id in ids.lines() {
            let _ = self.ctr(&["tasks", "kill", "-s", "SIGKILL", id]);
        }
        std::thread::sleep(Duration::from_millis(500));
        for id in ids.lines() {
            let _ = self.ctr(&["tasks", "rm", "-f", id]);
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // The kubelet and kube-proxy first, so nothing starts pods again;
        // then every container, then containerd.
        let mut children = std::mem::take(&mut self.children);
        for (name, child) in children.iter_mut().rev() {
            if *name == "containerd" {
                self.stop_containers();
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // kube-proxy's rules, the mounts under the node's directory
        // (deepest first), the pods' network namespaces and the bridge.
        let _ = Command::new(self.cp.bin.join("kube-proxy"))
            .arg("--cleanup")
            .output();
        remove_kubelet_rules();
        let root = self.dir.path().display().to_string();
        let mut mounts: Vec<String> = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
            .filter(|m| m.starts_with(&root))
            .collect();
        mounts.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in mounts {
            let _ = Command::new("umount").args(["-l", &m]).output();
        }
        for ns in netns() {
            if !self.netns_before.contains(&ns) && ns.starts_with("cni-") {
                let _ = Command::new("ip").args(["netns", "del", &ns]).output();
            }
        }
        let _ = Command::new("ip").args(["link", "del", BRIDGE]).output();
    }
}
