//! The documentation's console blocks run as written: every ```` ```console ````
//! block of a page is a session (`$ command`, then what it prints), run in
//! order in a fresh directory beside the repository's `examples/`, with the
//! built `licensor` on `PATH`, no `LICENSOR_*` settings and the default
//! embedded store. What a command prints (stdout and stderr) must be what
//! the page shows, so a changed message breaks the build instead of the docs.

use std::path::Path;
use std::process::Command;

/// One `$ command` and the lines shown after it.
struct Step {
    command: String,
    shown: String,
    line: usize,
}

/// The console blocks of `markdown`, in order.
fn steps(markdown: &str) -> Vec<Step> {
    let mut steps: Vec<Step> = Vec::new();
    // The fence of the console block we are in (```` when what it shows
    // has ``` fences of its own, as markdown output does).
    let mut fence: Option<&str> = None;
    for (n, line) in markdown.lines().enumerate() {
        let Some(open) = fence else {
            fence = line
                .trim_end()
                .strip_suffix("console")
                .filter(|f| !f.is_empty() && f.chars().all(|c| c == '`'));
            continue;
        };
        if line.trim_end() == open {
            fence = None;
        } else if let Some(command) = line.strip_prefix("$ ") {
            steps.push(Step {
                command: command.to_string(),
                shown: String::new(),
                line: n + 1,
            });
        } else if let Some(step) = steps.last_mut() {
            step.shown.push_str(line);
            step.shown.push('\n');
        }
    }
    steps
}

/// Runs the console blocks of `page` and compares each command's output.
fn runs_as_shown(page: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(page);
    let markdown = std::fs::read_to_string(&path).unwrap();
    let steps = steps(&markdown);
    assert!(!steps.is_empty(), "{page} has no console block");
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("examples"),
        dir.path().join("examples"),
    )
    .unwrap();
    // One shell for the page, so `echo $?` sees the command before it;
    // each command's output ends with a marker line.
    const MARK: &str = "@@licensor-readme-step@@";
    let mut script = String::new();
    for s in &steps {
        script.push_str(&format!(
            "{{ {}\n}} 2>&1; __rc=$?; printf '\\n{MARK}\\n'; (exit $__rc)\n",
            s.command
        ));
    }
    let bin = Path::new(env!("CARGO_BIN_EXE_licensor")).parent().unwrap();
    let path_var = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut command = Command::new("bash");
    command
        .arg("-c")
        .arg(&script)
        .current_dir(dir.path())
        .env("PATH", path_var);
    for (k, _) in std::env::vars() {
        if k.starts_with("LICENSOR_") || k == "KUBECONFIG" {
            command.env_remove(k);
        }
    }
    let out = command.output().unwrap();
    let printed = String::from_utf8_lossy(&out.stdout);
    let outputs: Vec<&str> = printed.split(&format!("\n{MARK}\n")).collect();
    if std::env::var_os("LICENSOR_UPDATE_DOCS").is_some() {
        std::fs::write(&path, blessed(&markdown, &steps, &outputs)).unwrap();
        return;
    }
    for (step, got) in steps.iter().zip(&outputs) {
        let (want, got) = (step.shown.trim_end(), got.trim_end());
        if want != got {
            let diff = similar::TextDiff::from_lines(want, got)
                .unified_diff()
                .header("shown", "printed")
                .to_string();
            panic!(
                "{page}:{}: `{}` printed something else than the page shows:\n{diff}",
                step.line, step.command
            );
        }
    }
    assert_eq!(
        outputs.len(),
        steps.len() + 1,
        "{page}: not every command ran: {printed}"
    );
}

/// `markdown` with each console step showing what it printed
/// (`LICENSOR_UPDATE_DOCS=1 cargo test --test readme` after a change).
fn blessed(markdown: &str, steps: &[Step], outputs: &[&str]) -> String {
    let mut printed = steps
        .iter()
        .zip(outputs)
        .map(|(s, o)| (s.line, o.trim_end()));
    let mut next = printed.next();
    let mut out = String::new();
    let mut skipping = false;
    let mut fence: Option<&str> = None;
    for (n, line) in markdown.lines().enumerate() {
        match fence {
            None => {
                fence = line
                    .trim_end()
                    .strip_suffix("console")
                    .filter(|f| !f.is_empty() && f.chars().all(|c| c == '`'));
            }
            Some(open) if line.trim_end() == open => {
                fence = None;
                skipping = false;
            }
            Some(_) if next.is_some_and(|(at, _)| at == n + 1) => {
                out.push_str(line);
                out.push('\n');
                let (_, output) = next.take().unwrap();
                if !output.is_empty() {
                    out.push_str(output);
                    out.push('\n');
                }
                next = printed.next();
                skipping = true;
                continue;
            }
            Some(_) if skipping => continue,
            Some(_) => {}
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[test]
fn the_readme_runs_as_shown() {
    runs_as_shown("README.md");
}

#[test]
fn the_cli_reference_runs_as_shown() {
    runs_as_shown("docs/cli.md");
}

#[test]
fn the_api_walkthrough_runs_as_shown() {
    runs_as_shown("docs/api.md");
}
