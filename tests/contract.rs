//! The platform API's published contract, judged by tools no one here
//! wrote: `openapi-spec-validator` accepts `/openapi.json` as OpenAPI 3.1,
//! and schemathesis, with every check and all four phases (examples,
//! coverage, fuzzing, stateful sequences along the document's links), finds
//! nothing against `licensor serve` on loopback, as the Account Admin, as a
//! Viewer and with no token. Both tools are pinned in
//! `tests/contract/requirements.txt` and installed by
//! `tests/contract/venv.sh`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Account, Kind};

/// The virtualenv with the contract tools (built once by venv.sh).
fn venv() -> PathBuf {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/contract/venv.sh");
    let out = Command::new("bash")
        .arg(script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("run tests/contract/venv.sh");
    assert!(out.status.success(), "tests/contract/venv.sh failed");
    PathBuf::from(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .expect("a path")
            .trim(),
    )
}

fn run(program: &Path, args: &[&str], dir: &Path) -> (bool, String) {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .env("NO_COLOR", "1")
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", program.display()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn outside_tools_find_nothing_wrong_with_the_api() {
    let venv = venv();
    let fixture = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/account.yaml"
    ))
    .unwrap();
    let acct = Account::seeded_on(Kind::Http, &fixture);
    let admin = acct
        .env
        .iter()
        .find(|(k, _)| k == "LICENSOR_TOKEN")
        .map(|(_, v)| v.clone())
        .unwrap();
    let viewer = acct.token("Viewer", "contract-viewer");
    let schema = format!("{}/openapi.json", acct.backend);
    let dir = acct.dir.path();

    let document = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(async { reqwest::get(&schema).await?.text().await })
        .unwrap();
    let file = acct.write("openapi.json", &document);
    let (ok, out) = run(
        &venv.join("bin/openapi-spec-validator"),
        &[file.to_str().unwrap()],
        dir,
    );
    assert!(ok, "openapi-spec-validator:\n{out}");
    assert!(out.contains("OK"), "{out}");

    let config = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/contract/schemathesis.toml"
    );
    for (who, header) in [
        (
            "the Account Admin",
            Some(format!("Authorization: Bearer {admin}")),
        ),
        ("a Viewer", Some(format!("Authorization: Bearer {viewer}"))),
        ("no token", None),
    ] {
        let mut args = vec![
            "--config-file",
            config,
            "run",
            &schema,
            "--checks",
            "all",
            "--phases",
            "examples,coverage,fuzzing,stateful",
            "--max-examples",
            "25",
            "--workers",
            "1",
            "--no-color",
        ];
        if let Some(h) = &header {
            args.extend(["-H", h]);
        }
        let (ok, out) = run(&venv.join("bin/schemathesis"), &args, dir);
        let summary: String = out
            .lines()
            .skip_while(|l| !l.contains("SUMMARY"))
            .collect::<Vec<_>>()
            .join("\n");
        assert!(ok, "schemathesis as {who} found problems:\n{out}");
        assert!(
            summary.contains("Stateful") && summary.contains("generated"),
            "schemathesis as {who} ran no stateful phase or no case:\n{out}"
        );
        eprintln!("schemathesis as {who}:\n{summary}");
    }
    let log = std::fs::read_to_string(acct.path("serve.log")).unwrap();
    assert!(!log.contains("panicked"), "the server panicked:\n{log}");
}
