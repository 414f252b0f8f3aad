//! A real PostgreSQL server for the tests: Debian's server binaries, run as
//! an unprivileged user (the server refuses root) on a temporary data
//! directory and a free loopback port, with TLS on (a CA and a server
//! certificate made here), password authentication, and one fresh database
//! per test. One server is shared by every test of a test binary, and it
//! stops when that process ends. If `LICENSOR_TEST_POSTGRES` names a server
//! (`postgres://user:password@host:port`), that one is used instead.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How to reach the shared server.
pub struct Server {
    /// `postgres://user@host:port`, without a database or password.
    base: String,
    password: String,
    /// Query parameters for TLS (verify-full against our CA).
    tls: String,
    /// The server this harness started: how to start it again.
    own: Option<Own>,
}

struct Own {
    dir: tempfile::TempDir,
    port: u16,
    /// An address it listens on beside 127.0.0.1.
    also: Option<std::net::Ipv4Addr>,
    command: Vec<String>,
}

impl Server {
    /// A connection URL for `database`, its password left to `PGPASSWORD`.
    pub fn url(&self, database: &str) -> String {
        format!("{}/{database}{}", self.base, self.tls)
    }

    /// The same, with the password in it (for a store opened in-process).
    pub fn url_with_password(&self, database: &str) -> String {
        let mut url = reqwest::Url::parse(&self.url(database)).expect("a postgres URL");
        let _ = url.set_password(Some(&self.password));
        url.to_string()
    }

    /// The CA file that signed the server's certificate (a server this
    /// harness started).
    pub fn ca(&self) -> PathBuf {
        let own = self.own.as_ref().expect("a server this harness started");
        own.dir.path().join("ca.crt")
    }

    pub fn password(&self) -> &str {
        &self.password
    }

    /// Host and port, for other clients (pgbench).
    pub fn address(&self) -> (String, u16) {
        let url = reqwest::Url::parse(&self.base).expect("a postgres URL");
        (
            url.host_str().unwrap_or("127.0.0.1").to_string(),
            url.port().unwrap_or(5432),
        )
    }

    /// The binary directory of the server's tools (pgbench).
    pub fn tools(&self) -> PathBuf {
        binaries()
    }

    /// A new, empty database.
    pub fn database(&self) -> String {
        static N: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "t_{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        );
        self.sql("postgres", &format!("CREATE DATABASE {name}"));
        name
    }

    /// Runs SQL as the server's superuser, connected the way licensor
    /// connects (a blocking client, on a thread of its own so that it works
    /// from async tests too).
    pub fn sql(&self, database: &str, sql: &str) -> Vec<String> {
        self.try_sql(database, sql)
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }

    /// The same, with the failure (cannot connect, or the statement's
    /// error) as its answer.
    fn try_sql(&self, database: &str, sql: &str) -> Result<Vec<String>, String> {
        let (url, sql) = (self.url_with_password(database), sql.to_string());
        std::thread::spawn(move || {
            let mut client = licensor::backend::store::postgres::connect(&url)
                .map_err(|e| format!("connect: {e}"))?;
            let rows = client.simple_query(&sql).map_err(|e| e.to_string())?;
            Ok(rows
                .iter()
                .filter_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(r) => Some(
                        (0..r.len())
                            .map(|i| r.get(i).unwrap_or("NULL").to_string())
                            .collect::<Vec<_>>()
                            .join(" | "),
                    ),
                    _ => None,
                })
                .collect())
        })
        .join()
        .expect("the SQL thread")
    }
}

static SERVER: OnceLock<Server> = OnceLock::new();

/// The server shared by this test process, started on first use.
pub fn server() -> &'static Server {
    SERVER.get_or_init(|| match std::env::var("LICENSOR_TEST_POSTGRES") {
        Ok(url) => external(&url),
        Err(_) => start(None),
    })
}

/// The shared server, started here listening also on `address` (an
/// address of the host on a test node's pod network, tests/node), with a
/// certificate for it and password logins from its /24, so that pods reach
/// it; the URL that names it there. Call it before anything else of this
/// process uses the server.
pub fn server_on(address: std::net::Ipv4Addr) -> (&'static Server, String) {
    let server = SERVER.get_or_init(|| start(Some(address)));
    let own = server
        .own
        .as_ref()
        .expect("a server this harness started (not LICENSOR_TEST_POSTGRES)");
    assert!(
        own.also == Some(address),
        "the shared server started before it was asked to listen on {address}"
    );
    (
        server,
        format!("postgres://licensor@{address}:{}", own.port),
    )
}

fn external(url: &str) -> Server {
    let parsed = reqwest::Url::parse(url).expect("LICENSOR_TEST_POSTGRES is a postgres:// URL");
    let password = parsed.password().unwrap_or_default().to_string();
    let mut base = parsed.clone();
    let _ = base.set_password(None);
    base.set_path("");
    base.set_query(None);
    Server {
        base: base.to_string().trim_end_matches('/').to_string(),
        password,
        tls: "?sslmode=prefer".into(),
        own: None,
    }
}

/// Debian's newest installed server binaries.
fn binaries() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL server binaries (Debian package postgresql; make test installs it)")
        .filter_map(|e| Some(e.ok()?.path().join("bin")))
        .filter(|b| b.join("postgres").exists())
        .collect();
    versions.sort();
    versions
        .pop()
        .expect("no PostgreSQL server under /usr/lib/postgresql (Debian package postgresql)")
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// A command run as the unprivileged user when the tests run as root
/// (`setpriv` execs the program itself, so signals reach it directly).
fn as_server_user(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("setpriv");
        c.args([
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "--reset-env",
        ])
        .arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn start(also: Option<std::net::Ipv4Addr>) -> Server {
    let bin = binaries();
    let dir = tempfile::Builder::new()
        .prefix("licensor-pg")
        .tempdir()
        .expect("tempdir");
    let d = dir.path();
    let data = d.join("data");
    let password = format!("pw{}", std::process::id());
    std::fs::write(d.join("pw"), &password).unwrap();

    // A CA, and a server certificate it signs for 127.0.0.1 and localhost
    // (and the other address).
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca, rcgen::KeyPair::generate().unwrap()).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let names = ["localhost".to_string(), "127.0.0.1".to_string()]
        .into_iter()
        .chain(also.map(|a| a.to_string()))
        .collect::<Vec<_>>();
    let leaf = rcgen::CertificateParams::new(names)
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let ca_path = d.join("ca.crt");
    std::fs::write(&ca_path, ca.pem()).unwrap();

    if is_root() {
        let ok = Command::new("chown")
            .args(["-R", "nobody:nogroup"])
            .arg(d)
            .status()
            .unwrap();
        assert!(ok.success(), "chown {}", d.display());
    }
    let out = as_server_user(&bin.join("initdb"))
        .arg("-D")
        .arg(&data)
        .args(["-U", "licensor", "--auth=scram-sha-256", "-E", "UTF8"])
        .args(["--no-sync", "--no-instructions"])
        .arg(format!("--pwfile={}", d.join("pw").display()))
        .output()
        .expect("run initdb");
    assert!(
        out.status.success(),
        "initdb: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(data.join("server.crt"), leaf.pem()).unwrap();
    if let Some(address) = also {
        let hba = data.join("pg_hba.conf");
        let mut rules = std::fs::read_to_string(&hba).unwrap();
        let octets = address.octets();
        rules.push_str(&format!(
            "hostssl all all {}.{}.{}.0/24 scram-sha-256\n",
            octets[0], octets[1], octets[2]
        ));
        std::fs::write(&hba, rules).unwrap();
    }
    std::fs::write(data.join("server.key"), key.serialize_pem()).unwrap();
    if is_root() {
        Command::new("chown")
            .args(["nobody:nogroup"])
            .arg(data.join("server.crt"))
            .arg(data.join("server.key"))
            .status()
            .unwrap();
    }
    Command::new("chmod")
        .arg("600")
        .arg(data.join("server.key"))
        .status()
        .unwrap();

    let port = super::free_port();
    let server_cmd: Vec<String> = {
        let c = as_server_user(&bin.join("postgres"));
        let mut words: Vec<String> = vec![c.get_program().to_string_lossy().into_owned()];
        words.extend(c.get_args().map(|a| a.to_string_lossy().into_owned()));
        words.extend([
            "-D".into(),
            data.display().to_string(),
            "-p".into(),
            port.to_string(),
            "-k".into(),
            d.display().to_string(),
            "-c".into(),
            format!(
                "listen_addresses=127.0.0.1{}",
                also.map(|a| format!(",{a}")).unwrap_or_default()
            ),
            "-c".into(),
            "ssl=on".into(),
            "-c".into(),
            "fsync=off".into(),
            "-c".into(),
            "synchronous_commit=off".into(),
            "-c".into(),
            "full_page_writes=off".into(),
            "-c".into(),
            "max_connections=300".into(),
        ]);
        words
    };
    let server = Server {
        base: format!("postgres://licensor@127.0.0.1:{port}"),
        password,
        tls: format!("?sslmode=verify-full&sslrootcert={}", ca_path.display()),
        own: Some(Own {
            dir,
            port,
            also,
            command: server_cmd,
        }),
    };
    server.launch();
    server
}

impl Server {
    /// Starts the harness's server and waits until it accepts logins.
    fn launch(&self) {
        let own = self.own.as_ref().expect("a server this harness started");
        let d = own.dir.path();
        // The server goes when this test process does (fast shutdown), and
        // its directory with it (a static's TempDir is never dropped). A
        // server stopped by a test while the process lives keeps its
        // directory.
        let then = format!(
            "kill -0 {me} 2>/dev/null || rm -rf '{dir}'",
            me = std::process::id(),
            dir = d.display()
        );
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(d.join("server.log"))
            .unwrap();
        // Not waited for: it outlives every test of this process, and ends
        // with it (above).
        #[allow(clippy::zombie_processes)]
        super::ends_with_this_process("INT", &then)
            .args(&own.command)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start postgres");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", own.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "postgres did not start: {}",
                std::fs::read_to_string(d.join("server.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        // Accepting connections is not yet accepting logins.
        while let Err(e) = self.try_sql("postgres", "SELECT 1") {
            assert!(
                Instant::now() < deadline,
                "postgres does not accept logins: {e}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stops the server (fast shutdown: every connection is dropped), waits
    /// `down`, and starts it again on the same port and data.
    pub fn restart(&self, down: Duration) {
        let own = self.own.as_ref().expect("a server this harness started");
        let pid_file = own.dir.path().join("data/postmaster.pid");
        let pid = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|t| t.lines().next().map(str::to_string))
            .expect("postmaster.pid");
        Command::new("kill").args(["-INT", &pid]).status().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while pid_file.exists() || std::net::TcpStream::connect(("127.0.0.1", own.port)).is_ok() {
            assert!(Instant::now() < deadline, "postgres did not stop");
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(down);
        self.launch();
    }
}

/// A `licensor serve` process on an account's store, killed on drop.
pub struct Replica(pub std::process::Child);

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `licensor serve` on the account's database; returns its base URL.
pub fn replica(acct: &super::Account, password: &str) -> (Replica, String) {
    let port = super::free_port();
    let log = std::fs::File::create(acct.path(&format!("serve-{port}.log"))).unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_licensor"))
        .args(["--backend", acct.store(), "serve"])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .env("PGPASSWORD", password)
        .env_remove("LICENSOR_TOKEN")
        .stderr(log)
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "a replica did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    (
        Replica(child),
        format!("http://127.0.0.1:{port}/v1/accounts/acme"),
    )
}
