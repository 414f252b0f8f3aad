//! The chart README's `sh` blocks, run as written: the embedded install on
//! a real node (tests/chart_on_node.rs), the PostgreSQL and remote installs
//! on a control plane (tests/chart.rs). Each install's commands run in the
//! README's order in one shell, from a directory holding what the README
//! assumes its reader has; every command exits 0, except `licensor plan`,
//! which exits 2 (changes to make).

use std::path::Path;
use std::process::Command;

use tempfile::TempDir;

pub const PAGE: &str = "charts/licensor/README.md";

/// The install the chart README's blocks are for.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Install {
    Embedded,
    Postgres,
    Remote,
}

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The commands of the `sh` blocks of `markdown` (continuation lines
/// joined), each with its line and the install its block is for: a block
/// that names `backend.kind=postgres` or `backend.kind=remote` is that
/// install's, any other the default's.
pub fn commands_in(markdown: &str) -> Vec<(usize, Install, String)> {
    let mut commands = Vec::new();
    let mut block: Option<Vec<(usize, String)>> = None;
    for (n, line) in markdown.lines().enumerate() {
        match &mut block {
            None if line.trim_end() == "```sh" => block = Some(Vec::new()),
            None => {}
            Some(lines) if line.trim_end() == "```" => {
                let text: String = lines.iter().map(|(_, l)| format!("{l}\n")).collect();
                let install = if text.contains("backend.kind=postgres") {
                    Install::Postgres
                } else if text.contains("backend.kind=remote") {
                    Install::Remote
                } else {
                    Install::Embedded
                };
                let mut joined: Option<(usize, String)> = None;
                for (at, l) in lines.drain(..) {
                    let (start, mut command) = joined.take().unwrap_or((at, String::new()));
                    command.push_str(&l);
                    match command.strip_suffix('\\') {
                        Some(open) => joined = Some((start, format!("{open} "))),
                        None => commands.push((start, install, command)),
                    }
                }
                block = None;
            }
            Some(lines) => lines.push((n + 1, line.to_string())),
        }
    }
    commands
}

/// `install`'s commands in the README, with their lines.
pub fn commands(install: Install) -> Vec<(usize, String)> {
    let page = std::fs::read_to_string(repo().join(PAGE)).unwrap();
    let mine: Vec<(usize, String)> = commands_in(&page)
        .into_iter()
        .filter(|(_, i, _)| *i == install)
        .map(|(line, _, command)| (line, command))
        .collect();
    assert!(
        mine.iter().any(|(_, c)| c.starts_with("helm install")),
        "{PAGE}: no helm install for {install:?}"
    );
    mine
}

/// A directory holding what the README assumes the reader has:
/// `charts/`, `account.yaml`, `licenses/`, the database's `ca.crt`, and
/// for a remote install the platform's `ci.token`.
pub fn reader_dir(install: Install) -> TempDir {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (name, target) in [
        ("charts", "charts"),
        ("account.yaml", "examples/account.yaml"),
        ("licenses", "examples/licenses"),
    ] {
        std::os::unix::fs::symlink(repo().join(target), d.join(name)).unwrap();
    }
    let ca = rcgen::generate_simple_self_signed(vec!["db.example".into()]).unwrap();
    std::fs::write(d.join("ca.crt"), ca.cert.pem()).unwrap();
    if install == Install::Remote {
        std::fs::write(d.join("ci.token"), "lsr_a_token_from_the_platform\n").unwrap();
    }
    dir
}

/// Runs `install`'s commands in one bash started by `shell` (which sets
/// its PATH, KUBECONFIG and directory), checks each one's exit code, and
/// returns what they printed. `diagnose` says more when one fails.
pub fn run(install: Install, mut shell: Command, diagnose: impl Fn() -> String) -> String {
    let mine = commands(install);
    let mut script = String::new();
    for (line, command) in &mine {
        script.push_str(&format!("{command}\necho \"@@ {line} $?\"\n"));
    }
    script.push_str("kill $(jobs -p) 2>/dev/null; wait\n");
    let out = shell
        .arg("-c")
        .arg(&script)
        .env_remove("LICENSOR_BACKEND")
        .env_remove("LICENSOR_TOKEN")
        .output()
        .unwrap();
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let codes: Vec<(usize, i32)> = printed
        .lines()
        .filter_map(|l| {
            let (line, code) = l.strip_prefix("@@ ")?.split_once(' ')?;
            Some((line.parse().ok()?, code.parse().ok()?))
        })
        .collect();
    assert_eq!(
        codes.len(),
        mine.len(),
        "{install:?}: not every command ran:\n{printed}\n{}",
        diagnose()
    );
    for ((line, code), (_, command)) in codes.iter().zip(&mine) {
        let expected = if command.contains("licensor plan") {
            2
        } else {
            0
        };
        assert_eq!(
            *code,
            expected,
            "{PAGE}:{line}: `{command}` exited {code}:\n{printed}\n{}",
            diagnose()
        );
    }
    printed
}
