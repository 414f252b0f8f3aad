//! The command line: argument parsing, backend selection and exit codes.
//! One file per command; [`render`] prints plans for people and machines.

mod backend_cmd;
mod crd;
mod operator;
mod plan_cmd;
pub mod render;
mod serve;
mod status;
mod token;
mod validate;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::builder::NonEmptyStringValueParser;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::backend::http::{Ca, HttpBackend, Retry};
use crate::backend::local::StoreBackend;
use crate::backend::{Backend, redact};
use crate::domain::Snapshot;
use crate::licenseaccount::Directory;
use crate::manifest::{self, Manifest};
use crate::plan::Desired;

/// Exit code for success, and for `plan` with nothing to change; also for
/// `--help` and `--version`.
pub const OK: u8 = 0;
/// Exit code for every error: invalid input, a usage error (an unknown
/// flag, a missing argument), a backend that fails, a refused change.
pub const FAILED: u8 = 1;
/// Exit code of `plan` when there are changes to apply, and for nothing else.
pub const CHANGES: u8 = 2;

/// The exit code of a command line clap could not turn into a command:
/// `--help` and `--version` are answers (0); anything else is an error (1),
/// never clap's own 2, which a pipeline would read as "there are changes".
pub fn usage_exit_code(e: &clap::Error) -> u8 {
    if e.use_stderr() { FAILED } else { OK }
}

#[derive(Parser, Debug)]
#[command(
    name = "licensor",
    version,
    about = "Dedicated licenses, declared in Git and reconciled into the license backend"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// The heading of the options every command understands, so that each
/// command's own options stand apart from them in its help.
const GLOBAL: &str = "Global options";

/// Options every command understands.
#[derive(Args, Debug, Clone)]
pub struct Global {
    /// License backend: sqlite:PATH (the embedded store, a file), a
    /// PostgreSQL database (postgres://USER@HOST/DB, the password from
    /// PGPASSWORD), or the license platform's API (an http(s):// URL).
    #[arg(
        long,
        global = true,
        env = "LICENSOR_BACKEND",
        default_value = "sqlite:licensor.db",
        value_parser = NonEmptyStringValueParser::new(),
        help_heading = GLOBAL
    )]
    pub backend: String,
    /// Account id; defaults to the only account in the store.
    #[arg(
        long,
        global = true,
        env = "LICENSOR_ACCOUNT",
        value_parser = NonEmptyStringValueParser::new(),
        help_heading = GLOBAL
    )]
    pub account: Option<String>,
    /// File holding the bearer token (else LICENSOR_TOKEN).
    #[arg(long, global = true, help_heading = GLOBAL)]
    pub token_file: Option<PathBuf>,
    /// Longest wait for one answer of an http(s) backend; calls are retried.
    #[arg(
        long,
        global = true,
        env = "LICENSOR_BACKEND_TIMEOUT",
        default_value = "10s",
        value_parser = humantime::parse_duration,
        help_heading = GLOBAL
    )]
    pub backend_timeout: std::time::Duration,
    /// CA certificates (PEM) to trust for an https:// backend, besides the
    /// public roots.
    #[arg(long, global = true, env = "LICENSOR_BACKEND_CA", help_heading = GLOBAL)]
    pub backend_ca: Option<std::path::PathBuf>,
    /// Most requests a second to an http(s) backend, over all calls of this
    /// process (the operator's passes share it); unlimited when not given.
    #[arg(long, global = true, env = "LICENSOR_BACKEND_RATE", help_heading = GLOBAL)]
    pub backend_rate: Option<std::num::NonZeroU32>,
    /// Instance name in managedBy (<instance>/<namespace>/<name>).
    #[arg(
        long,
        global = true,
        env = "LICENSOR_INSTANCE",
        default_value = "default",
        value_parser = NonEmptyStringValueParser::new(),
        help_heading = GLOBAL
    )]
    pub instance: String,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Check manifests offline: schema and the rules that need no backend.
    Validate(validate::ValidateArgs),
    /// Show what apply would change (exit 0 no change, 2 changes, 1 error or refusal).
    Plan(plan_cmd::PreviewArgs),
    /// Apply manifests; each resource independently, frees before claims.
    Apply(plan_cmd::PlanArgs),
    /// Show pools and allocations.
    Status(status::StatusArgs),
    /// Work on the backend directly: seed, seats, totals, audit.
    #[command(subcommand)]
    Backend(backend_cmd::BackendCommand),
    /// Manage API tokens of a store (the embedded file or PostgreSQL).
    #[command(subcommand)]
    Token(token::TokenCommand),
    /// Serve the license platform HTTP API and the License Management page
    /// over a store (the embedded file or PostgreSQL).
    Serve(serve::ServeArgs),
    /// Run the Kubernetes operator that reconciles DedicatedLicense objects.
    Operator(Box<operator::OperatorArgs>),
    /// Print the CustomResourceDefinitions generated from their Rust types.
    Crd(crd::CrdArgs),
}

/// Output formats. Every command with `-o` prints each of them: text for
/// a terminal, markdown (tables) for a pull-request comment, JSON for
/// machines.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Text,
    Markdown,
    Json,
}

/// Where the manifests are.
#[derive(Args, Debug)]
pub struct Files {
    /// Manifest files or directories (recursive, multi-document YAML).
    #[arg(short = 'f', long = "filename", required = true, num_args = 1..)]
    pub paths: Vec<PathBuf>,
}

/// Runs the CLI and returns its exit code.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(usage_exit_code(&e));
        }
    };
    // One TLS provider for every client and server in the process (kube,
    // reqwest, PostgreSQL, the webhook), whatever features a dependency
    // turns on.
    let _ = rustls::crypto::ring::default_provider().install_default();
    // The embedded store serializes on one connection, so more blocking
    // threads only wait, and each would keep a malloc arena of its own.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(4)
        .build();
    let code = match runtime {
        Ok(rt) => rt.block_on(run(cli)),
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            FAILED
        }
    };
    ExitCode::from(code)
}

async fn run(cli: Cli) -> u8 {
    let g = &cli.global;
    match cli.command {
        Command::Validate(a) => validate::run(&a),
        Command::Plan(a) => plan_cmd::plan(g, &a).await,
        Command::Apply(a) => plan_cmd::apply(g, &a).await,
        Command::Status(a) => status::run(g, &a).await,
        Command::Backend(c) => backend_cmd::run(g, c).await,
        Command::Token(c) => token::run(g, c),
        Command::Serve(a) => serve::run(g, &a).await,
        Command::Operator(a) => operator::run(g, &a).await,
        Command::Crd(args) => crd::run(&args),
    }
}

/// The token from `--token-file` or `LICENSOR_TOKEN`, if any.
pub fn token(g: &Global) -> Result<Option<String>, String> {
    if let Some(path) = &g.token_file {
        return std::fs::read_to_string(path)
            .map(|t| Some(t.trim().to_string()))
            .map_err(|e| format!("cannot read token file {}: {e}", path.display()));
    }
    Ok(std::env::var("LICENSOR_TOKEN")
        .ok()
        .filter(|t| !t.trim().is_empty()))
}

/// Whether a command may create the store it opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Open {
    /// It owns the store (`backend seed`, `operator`): create it if missing.
    Create,
    /// It reads, or writes into an account that must exist: never create.
    Existing,
    /// A server (`serve`, `operator`): create it if missing, and when its
    /// database cannot be reached yet, start anyway and connect when it is
    /// up (calls fail as unavailable until then), instead of exiting into
    /// a crash loop at every database restart.
    Serve,
}

/// What `--backend` names, read once: the kinds of backend and how each
/// is spelled.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Location<'a> {
    /// `sqlite:PATH`: the embedded store.
    Sqlite(PathBuf),
    /// `postgres://...`, `postgresql://...`, or `postgres:` and libpq
    /// `key=value` parameters: the connection string to use.
    Postgres(&'a str),
    /// `http://...` or `https://...`: the license platform's API.
    Http(&'a str),
}

impl<'a> Location<'a> {
    fn parse(backend: &'a str) -> Option<Location<'a>> {
        if let Some(path) = backend.strip_prefix("sqlite:") {
            return Some(Location::Sqlite(PathBuf::from(path)));
        }
        if backend.starts_with("postgres://") || backend.starts_with("postgresql://") {
            return Some(Location::Postgres(backend));
        }
        if let Some(parameters) = backend.strip_prefix("postgres:") {
            return Some(Location::Postgres(parameters));
        }
        if backend.starts_with("http://") || backend.starts_with("https://") {
            return Some(Location::Http(backend));
        }
        None
    }
}

/// Opens the store the global options name, for the commands that work on
/// a store itself (`token create`, `serve`): the embedded file or a
/// PostgreSQL database (`postgres://...`, or `postgres:` and libpq
/// `key=value` parameters).
pub fn open_store(g: &Global, open: Open) -> Result<crate::backend::store::Store, String> {
    open_store_at(&g.backend, open)
}

/// Opens the store `backend` names (`sqlite:PATH`, `postgres://...`).
/// Call it off the async threads: a PostgreSQL client blocks.
pub fn open_store_at(backend: &str, open: Open) -> Result<crate::backend::store::Store, String> {
    use crate::backend::store::Store as S;
    let create = open != Open::Existing;
    if let Some(Location::Postgres(url)) = Location::parse(backend) {
        let connect = || match open {
            Open::Serve => S::connect_when_up(url, create),
            _ => S::connect(url, create),
        };
        // The PostgreSQL client blocks on a runtime of its own, so it
        // connects off this one (its later calls run on blocking threads).
        return std::thread::scope(|s| s.spawn(connect).join())
            .map_err(|_| "connecting to PostgreSQL failed".to_string())?
            .map_err(|e| e.to_string());
    }
    let path = match Location::parse(backend) {
        Some(Location::Sqlite(path)) if !path.as_os_str().is_empty() => path,
        _ => {
            return Err(format!(
                "this command needs a store (sqlite:PATH or postgres://...), not {}",
                redact(backend)
            ));
        }
    };
    let created = create && !path.exists();
    let store = if create {
        S::open(&path)
    } else {
        S::open_existing(&path)
    }
    .map_err(|e| e.to_string())?;
    if created {
        note_if_in_git(&path);
    }
    Ok(store)
}

/// The file of an embedded store `backend` names, when it does not exist
/// yet (a command that creates it may have to remove it again).
pub fn new_store_file(backend: &str) -> Option<PathBuf> {
    match Location::parse(backend)? {
        Location::Sqlite(path) => (!path.as_os_str().is_empty() && !path.exists()).then_some(path),
        Location::Postgres(_) | Location::Http(_) => None,
    }
}

/// Removes an embedded store file and its write-ahead log.
pub fn remove_store_file(path: &std::path::Path) {
    for suffix in ["", "-wal", "-shm"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        let _ = std::fs::remove_file(p);
    }
}

/// A new store file inside a Git work tree would be committed by the next
/// `git add -A`, with token hashes and the audit log in it: say how to keep
/// it out, unless Git already ignores it.
fn note_if_in_git(path: &std::path::Path) {
    let Ok(path) = std::path::absolute(path) else {
        return;
    };
    let Some(dir) = path.parent() else {
        return;
    };
    if !dir.ancestors().any(|d| d.join(".git").exists()) {
        return;
    }
    let ignored = std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["check-ignore", "-q", "--"])
        .arg(&path)
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ignored {
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        let name = name.as_deref().unwrap_or("licensor.db");
        eprintln!(
            "note: created the store {} inside a Git work tree; it holds token hashes and the audit log, so keep it out of Git: echo '{name}*' >> .gitignore (or put the store elsewhere with --backend sqlite:PATH)",
            path.display()
        );
    }
}

/// Opens the backend named by the global options.
pub fn open_backend(g: &Global, open: Open) -> Result<Box<dyn Backend>, String> {
    let token = token(g)?;
    match Location::parse(&g.backend) {
        Some(Location::Sqlite(_) | Location::Postgres(_)) => {
            let store = open_store(g, open)?;
            Ok(Box::new(StoreBackend::new(
                store,
                g.account.as_deref(),
                token.as_deref(),
            )))
        }
        Some(Location::Http(url)) => {
            let account = g.account.as_deref().ok_or_else(|| {
                format!(
                    "backend {}: name the account with --account (or LICENSOR_ACCOUNT)",
                    redact(url)
                )
            })?;
            let ca = g.backend_ca.as_deref().map(Ca::read).transpose();
            let backend = ca
                .and_then(|ca| {
                    HttpBackend::new(
                        url,
                        account,
                        token.as_deref(),
                        g.backend_timeout,
                        Retry::default(),
                        ca,
                    )
                })
                .map_err(|e| e.to_string())?
                .with_rate(g.backend_rate);
            Ok(Box::new(backend))
        }
        None => Err(format!(
            "backend {:?} is none of sqlite:PATH, postgres://... (or postgres:key=value ...) and an http(s):// URL",
            redact(&g.backend)
        )),
    }
}

/// Opens the backend and reads its snapshot.
pub async fn observe(g: &Global) -> Result<(Box<dyn Backend>, Snapshot), String> {
    let backend = open_backend(g, Open::Existing)?;
    let snapshot = backend.snapshot().await.map_err(|e| e.to_string())?;
    Ok((backend, snapshot))
}

/// Loads manifests, printing notes and errors; `None` when invalid.
pub fn load_manifests(files: &Files) -> Option<(Vec<Manifest>, Directory)> {
    let loaded = manifest::load(&files.paths);
    for note in &loaded.notes {
        eprintln!("note: {note}");
    }
    for e in &loaded.errors {
        eprintln!("error: {e}");
    }
    if loaded.errors.is_empty() {
        let directory = loaded.directory();
        Some((loaded.manifests, directory))
    } else {
        eprintln!(
            "{} error{} in the manifests; nothing was changed",
            loaded.errors.len(),
            if loaded.errors.len() == 1 { "" } else { "s" }
        );
        None
    }
}

/// What a manifest asks for, as the planner sees it, and whether its
/// namespace may ask for it, by the accounts and Namespaces of `directory`.
pub fn desired(m: Manifest, instance: &str, directory: &Directory) -> Desired {
    m.spec.desired(
        instance,
        &m.namespace,
        &m.name,
        &m.annotations,
        String::new(),
        directory,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_backend_spelling_is_read_once() {
        assert_eq!(
            Location::parse("sqlite:licensor.db"),
            Some(Location::Sqlite("licensor.db".into()))
        );
        for url in ["postgres://u@h/db", "postgresql://u@h/db"] {
            assert_eq!(Location::parse(url), Some(Location::Postgres(url)));
        }
        assert_eq!(
            Location::parse("postgres:host=h dbname=d"),
            Some(Location::Postgres("host=h dbname=d"))
        );
        for url in ["http://127.0.0.1:8080", "https://licenses.example"] {
            assert_eq!(Location::parse(url), Some(Location::Http(url)));
        }
        for other in ["licensor.db", "mysql://h/db", "ftp://x", ""] {
            assert_eq!(Location::parse(other), None, "{other}");
        }
    }
}
