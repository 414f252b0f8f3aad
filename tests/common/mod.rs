//! A license account in a temporary directory, driven through the real
//! `licensor` binary, as a user would.
#![allow(dead_code)]

pub mod browser;
pub mod chart_readme;
pub mod postgres;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

/// A port on the loopback address that nothing listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// A command that ends when this test process does: a server shared by
/// every test of the process (a static is never dropped, so nothing else
/// would stop it), or one a test owns, should the process be killed before
/// the test drops it. A watchdog shell runs the program and arguments
/// added to it, sends it `signal` once this process is gone (or stops
/// watching once the program exits), waits for it, then runs `then`.
pub fn ends_with_this_process(signal: &str, then: &str) -> Command {
    let watchdog = format!(
        "\"$@\" & child=$!; while kill -0 {me} 2>/dev/null && kill -0 $child 2>/dev/null; do sleep 0.5; done; kill -{signal} $child 2>/dev/null; wait $child; {then}",
        me = std::process::id(),
    );
    let mut command = Command::new("sh");
    command.arg("-c").arg(watchdog).arg("sh");
    command
}

/// The documented example: 200 TestOps, qa-team holds 5 with 4 in use.
pub const DOCUMENTED: &str = "
account: acme
products:
  - {name: TestOps, total: 200}
organizations:
  - id: qa-team
    allocations:
      - {product: TestOps, dedicated: 5, inUse: 4}
  - id: dev-team
";

/// What one run of the binary did.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
            panic!("stdout is not JSON ({e}): {}\n{}", self.stdout, self.stderr)
        })
    }
}

/// Which backend the CLI talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The embedded store, `sqlite:PATH`.
    Embedded,
    /// `licensor serve` over that same file, on a loopback port.
    Http,
    /// A database of its own on the shared PostgreSQL server, over TLS
    /// verified against the test CA (`postgres://...?sslmode=verify-full`).
    Postgres,
}

/// The [`Kind`]s by the names of the modules [`on_every_store!`] makes.
#[allow(non_upper_case_globals)]
pub mod kind {
    use super::Kind;
    pub const embedded: Kind = Kind::Embedded;
    pub const http: Kind = Kind::Http;
    pub const postgres: Kind = Kind::Postgres;
}

/// `name` (`promtool` or `prometheus`) of Debian's prometheus package,
/// unpacked once by `tests/prometheus.sh`; or the program the environment
/// variable `given` names (`make test` sets it).
pub fn prometheus_program(given: &str, name: &str) -> String {
    std::env::var(given).unwrap_or_else(|_| format!("{}/{name}", printed("prometheus.sh", &[])))
}

/// The one line the script `tests/<script>` prints when run with `args`
/// (a cached tool's path); a script that fails fails the test with what it
/// said.
fn printed(script: &str, args: &[&str]) -> String {
    let path = format!("{}/tests/{script}", env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(&path)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {path}: {e}"));
    assert!(
        out.status.success(),
        "tests/{script} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A Go program built from a module pinned under `tests/` (`module`, for
/// example `kstatus`) by `tests/go-tool.sh`, cached; or
/// the binary the environment variable `given` names (`make test` builds
/// them all first). `package` is `.` for a program of ours, or a tool the
/// module's go.mod names.
pub fn go_tool(given: &str, module: &str, package: &str) -> String {
    std::env::var(given).unwrap_or_else(|_| {
        let module = format!("{}/tests/{module}", env!("CARGO_MANIFEST_DIR"));
        printed("go-tool.sh", &[&module, package])
    })
}

/// Runs each case `fn case(kind: Kind)` once on each store, as the test
/// `<store>::<case>`: `on_every_store!(a, b)` on the two databases
/// (`embedded`, `postgres`); `on_every_store!([embedded, http, postgres]
/// a, b)` on the stores named; `async` before the cases for `async fn`s.
#[macro_export]
macro_rules! on_every_store {
    ([$($on:ident),+] async $($case:ident),+ $(,)?) => {
        $crate::on_every_store!(@async [$($on),+] $($case),+);
    };
    ([$($on:ident),+] $($case:ident),+ $(,)?) => {
        $crate::on_every_store!(@sync [$($on),+] $($case),+);
    };
    (async $($case:ident),+ $(,)?) => {
        $crate::on_every_store!(@async [embedded, postgres] $($case),+);
    };
    ($($case:ident),+ $(,)?) => {
        $crate::on_every_store!(@sync [embedded, postgres] $($case),+);
    };
    (@sync [$on:ident $(, $more:ident)*] $($case:ident),+) => {
        mod $on {
            $(#[test] fn $case() { super::$case($crate::common::kind::$on) })+
        }
        $crate::on_every_store!(@sync [$($more),*] $($case),+);
    };
    (@async [$on:ident $(, $more:ident)*] $($case:ident),+) => {
        mod $on {
            $(#[tokio::test] async fn $case() { super::$case($crate::common::kind::$on).await })+
        }
        $crate::on_every_store!(@async [$($more),*] $($case),+);
    };
    (@$_how:ident [] $($case:ident),+) => {};
}

/// A new, empty store opened through the library on `kind`: a file in a
/// temporary directory, or a database of its own on the shared PostgreSQL
/// server (TLS verified, the password in the URL).
pub struct Place {
    pub dir: tempfile::TempDir,
    /// What `--backend` would say (with the password, for PostgreSQL).
    pub backend: String,
}

impl Place {
    pub fn new(kind: Kind) -> Place {
        let dir = tempfile::tempdir().expect("tempdir");
        let backend = match kind {
            Kind::Embedded => format!("sqlite:{}", dir.path().join("l.db").display()),
            Kind::Postgres => {
                let pg = postgres::server();
                pg.url_with_password(&pg.database())
            }
            Kind::Http => panic!("a store is opened on a database, not over HTTP"),
        };
        Place { dir, backend }
    }

    /// Opens the store, creating it.
    pub fn open(&self) -> licensor::backend::store::Store {
        self.open_with(true)
    }

    /// Opens the store as a second process would: it must be there.
    pub fn open_existing(&self) -> licensor::backend::store::Store {
        self.open_with(false)
    }

    fn open_with(&self, create: bool) -> licensor::backend::store::Store {
        use licensor::backend::store::Store;
        match self.backend.strip_prefix("sqlite:") {
            Some(path) if create => Store::open(Path::new(path)),
            Some(path) => Store::open_existing(Path::new(path)),
            None => Store::connect(&self.backend, create),
        }
        .unwrap_or_else(|e| panic!("open {}: {e}", self.backend))
    }
}

pub struct Account {
    pub dir: tempfile::TempDir,
    /// What `--backend` says.
    pub backend: String,
    /// Environment of every run (the account and token, over HTTP; the
    /// password for PostgreSQL).
    pub env: Vec<(String, String)>,
    db: PathBuf,
    /// The store itself, as `--backend` names it (the file, or the database).
    store: String,
    server: Option<std::process::Child>,
}

impl Drop for Account {
    fn drop(&mut self) {
        if let Some(mut s) = self.server.take() {
            let _ = s.kill();
            let _ = s.wait();
        }
    }
}

impl Account {
    /// A new embedded store seeded with `fixture`.
    pub fn seeded(fixture: &str) -> Account {
        Account::seeded_on(Kind::Embedded, fixture)
    }

    /// A store seeded with `fixture`, reached through `kind`. Over HTTP the
    /// CLI acts with an Account Admin token named `ci`.
    pub fn seeded_on(kind: Kind, fixture: &str) -> Account {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("licensor.db");
        let (store, env) = match kind {
            Kind::Postgres => {
                let pg = postgres::server();
                (
                    pg.url(&pg.database()),
                    vec![("PGPASSWORD".to_string(), pg.password().to_string())],
                )
            }
            Kind::Embedded | Kind::Http => (format!("sqlite:{}", db.display()), Vec::new()),
        };
        let mut account = Account {
            backend: store.clone(),
            store,
            dir,
            env,
            db,
            server: None,
        };
        let path = account.write("account.yaml", fixture);
        let run = account.run(&["backend", "seed", "-f", path.to_str().unwrap()]);
        assert_eq!(run.code, 0, "seed failed: {run:?}");
        if kind == Kind::Http {
            let name: serde_yaml::Value = serde_yaml::from_str(fixture).unwrap();
            let token = account.token("AccountAdmin", "ci");
            account.serve(&[]);
            account.env = vec![
                (
                    "LICENSOR_ACCOUNT".into(),
                    name["account"].as_str().unwrap().into(),
                ),
                ("LICENSOR_TOKEN".into(), token),
            ];
        }
        account
    }

    /// Starts `licensor serve` on the store with extra flags; the CLI then
    /// talks to it.
    pub fn serve(&mut self, flags: &[&str]) -> u16 {
        let port = free_port();
        self.serve_on(port, flags);
        port
    }

    /// Starts (or restarts) `licensor serve` on `port`.
    pub fn serve_on(&mut self, port: u16, flags: &[&str]) {
        let log = std::fs::File::create(self.path("serve.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_licensor"))
            .args(["--backend", &self.store, "serve"])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(flags)
            .env_remove("LICENSOR_TOKEN")
            .env_remove("LICENSOR_ACCOUNT")
            .envs(
                self.env
                    .iter()
                    .filter(|(k, _)| k == "PGPASSWORD")
                    .map(|(k, v)| (k.as_str(), v.as_str())),
            )
            .stderr(log)
            .spawn()
            .expect("start licensor serve");
        if let Some(mut old) = self.server.replace(child) {
            let _ = old.kill();
            let _ = old.wait();
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "licensor serve did not start"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        self.backend = format!("http://127.0.0.1:{port}");
    }

    /// The server process, when there is one.
    pub fn server(&mut self) -> Option<&mut std::process::Child> {
        self.server.as_mut()
    }

    /// Creates a token on the store itself and returns it.
    pub fn token(&self, role: &str, name: &str) -> String {
        let run = self.run_local(&["token", "create", "--role", role, "--name", name]);
        assert_eq!(run.code, 0, "{run:?}");
        run.stdout.trim().to_string()
    }

    /// The value of `name` in the environment of every run.
    pub fn var(&self, name: &str) -> &str {
        self.env
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("no {name} in the account's environment"))
    }

    /// Acts with `token` from now on.
    pub fn set_token(&mut self, token: &str) {
        self.env.retain(|(k, _)| k != "LICENSOR_TOKEN");
        self.env.push(("LICENSOR_TOKEN".into(), token.into()));
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn db(&self) -> PathBuf {
        self.db.clone()
    }

    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Writes one DedicatedLicense manifest to `<name>.yaml`.
    pub fn license(
        &self,
        name: &str,
        org: &str,
        product: &str,
        count: i64,
        extra: &str,
    ) -> PathBuf {
        self.write(
            &format!("manifests/{name}.yaml"),
            &license_yaml(name, org, product, count, extra),
        )
    }

    pub fn run(&self, args: &[&str]) -> Run {
        self.run_on(&self.backend, args)
    }

    /// Runs the CLI on the store itself, whatever the backend.
    pub fn run_local(&self, args: &[&str]) -> Run {
        self.run_on(&self.store, args)
    }

    /// The store as `--backend` names it.
    pub fn store(&self) -> &str {
        &self.store
    }

    /// What a process of its own (an operator) is given as `--backend`:
    /// the store, with its password when it is PostgreSQL.
    pub fn backend_with_credentials(&self) -> String {
        if self.store.starts_with("postgres") {
            let url = reqwest::Url::parse(&self.store).expect("a postgres URL");
            let database = url.path().trim_start_matches('/');
            postgres::server().url_with_password(database)
        } else {
            self.backend.clone()
        }
    }

    fn run_on(&self, backend: &str, args: &[&str]) -> Run {
        let out = Command::new(env!("CARGO_BIN_EXE_licensor"))
            .args(["--backend", backend])
            .args(args)
            .env_remove("LICENSOR_TOKEN")
            .env_remove("LICENSOR_ACCOUNT")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .current_dir(self.dir.path())
            .output()
            .expect("run licensor");
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    pub fn apply(&self, file: &Path) -> Run {
        self.run(&["apply", "-f", file.to_str().unwrap(), "-o", "json"])
    }

    /// Applies `file` and asserts that its one change is refused for
    /// `reason` with `fragment` in the message, and that no row changed.
    pub fn assert_refused(&self, file: &Path, reason: &str, fragment: &str) {
        let before = self.rows();
        let run = self.apply(file);
        assert_eq!(run.code, 1, "{run:?}");
        let doc = run.json();
        let c = only_change(&doc);
        assert_eq!(c["outcome"], "refused", "{c}");
        assert_eq!(c["reason"], reason, "{c}");
        let message = c["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(fragment),
            "expected {fragment:?} in {message:?}"
        );
        assert_eq!(self.rows(), before, "a refused change wrote something");
    }

    pub fn plan(&self, file: &Path) -> Run {
        self.run(&["plan", "-f", file.to_str().unwrap(), "-o", "json"])
    }

    pub fn status(&self) -> Value {
        let run = self.run(&["status", "-o", "json"]);
        assert_eq!(run.code, 0, "status failed: {run:?}");
        run.json()
    }

    /// `(dedicated, inUse)` of one allocation, if it exists.
    pub fn allocation(&self, org: &str, product: &str) -> Option<(i64, i64)> {
        let status = self.status();
        status["allocations"]
            .as_array()
            .unwrap()
            .iter()
            .find_map(|a| {
                (a["organization"] == org && a["product"] == product).then(|| {
                    (
                        a["dedicated"].as_i64().unwrap(),
                        a["inUse"].as_i64().unwrap(),
                    )
                })
            })
    }

    /// `(total, dedicated, sharedInUse, free)` of one pool.
    pub fn pool(&self, product: &str) -> (i64, i64, i64, i64) {
        let status = self.status();
        let p = status["pools"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["product"] == product)
            .unwrap_or_else(|| panic!("no pool {product}"))
            .clone();
        let n = |k: &str| p[k].as_i64().unwrap();
        (n("total"), n("dedicated"), n("sharedInUse"), n("free"))
    }

    pub fn audit(&self) -> Vec<Value> {
        let run = self.run(&["backend", "audit", "-o", "json"]);
        assert_eq!(run.code, 0, "audit failed: {run:?}");
        run.json().as_array().unwrap().clone()
    }

    /// Every row of every table, for "nothing changed" assertions; but when
    /// a token was last used, which a refused request notes too (it used
    /// the token).
    pub fn rows(&self) -> String {
        if self.store.starts_with("postgres") {
            return self.postgres_rows();
        }
        let conn = rusqlite::Connection::open(self.db()).unwrap();
        let mut tables: Vec<String> = conn
            .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        tables.sort();
        let mut out = String::new();
        for t in tables {
            let mut stmt = conn
                .prepare(&format!("SELECT * FROM {t} ORDER BY rowid"))
                .unwrap();
            let skipped = stmt.column_index("last_used").ok();
            let n = stmt.column_count();
            let rows = stmt
                .query_map([], |r| {
                    (0..n)
                        .filter(|i| Some(*i) != skipped)
                        .map(|i| {
                            r.get::<_, rusqlite::types::Value>(i)
                                .map(|v| format!("{v:?}"))
                        })
                        .collect::<Result<Vec<_>, _>>()
                })
                .unwrap();
            for row in rows {
                out.push_str(&format!("{t}: {}\n", row.unwrap().join(" | ")));
            }
        }
        out
    }

    fn postgres_rows(&self) -> String {
        let pg = postgres::server();
        let url = reqwest::Url::parse(&self.store).expect("a postgres URL");
        let database = url.path().trim_start_matches('/').to_string();
        let tables = pg.sql(
            &database,
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' ORDER BY table_name",
        );
        let mut out = String::new();
        for t in tables {
            let row = match t.as_str() {
                "tokens" => "(to_jsonb(t) - 'last_used')::text",
                _ => "t::text",
            };
            for row in pg.sql(&database, &format!("SELECT {row} FROM {t} t ORDER BY 1")) {
                out.push_str(&format!("{t}: {row}\n"));
            }
        }
        out
    }
}

pub fn license_yaml(name: &str, org: &str, product: &str, count: i64, extra: &str) -> String {
    format!(
        "apiVersion: licensor.dev/v1alpha1
kind: DedicatedLicense
metadata:
  name: {name}
  namespace: licenses
spec:
  organization: {org}
  product: {product}
  count: {count}
{extra}"
    )
}

/// The only change of a plan/apply JSON document.
pub fn only_change(doc: &Value) -> &Value {
    let changes = doc["changes"].as_array().expect("changes");
    assert_eq!(changes.len(), 1, "{doc:#}");
    &changes[0]
}

/// The change for one resource (`namespace/name`) of a plan/apply JSON document.
pub fn change<'a>(doc: &'a Value, resource: &str) -> &'a Value {
    doc["changes"]
        .as_array()
        .expect("changes")
        .iter()
        .find(|c| c["resource"] == resource)
        .unwrap_or_else(|| panic!("no change for {resource}: {doc:#}"))
}
