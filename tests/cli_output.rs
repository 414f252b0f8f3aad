//! What `plan`, `validate` and friends print and exit with, and how bad
//! input is refused: a clear error with file and line, exit 1, nothing written.

mod common;

use std::collections::BTreeSet;

use common::{Account, DOCUMENTED, Kind, license_yaml, only_change};

#[test]
fn plan_exit_codes_are_0_unchanged_2_changes_1_refused() {
    let acct = Account::seeded(DOCUMENTED);
    let m = acct.license("qa", "qa-team", "TestOps", 8, "");
    let run = acct.plan(&m);
    assert_eq!(run.code, 2, "{run:?}");
    assert_eq!(
        acct.allocation("qa-team", "TestOps"),
        Some((5, 4)),
        "plan writes nothing"
    );

    assert_eq!(acct.apply(&m).code, 0);
    let run = acct.plan(&m);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(only_change(&run.json())["outcome"], "unchanged");

    let m = acct.license("qa", "qa-team", "TestOps", 1, "");
    assert_eq!(acct.plan(&m).code, 1);
}

#[test]
fn plan_json_has_the_documented_shape() {
    let acct = Account::seeded(DOCUMENTED);
    let m = acct.license("qa", "qa-team", "TestOps", 10, "");
    let doc = acct.plan(&m).json();
    let keys = |v: &serde_json::Value| -> BTreeSet<String> {
        v.as_object().unwrap().keys().cloned().collect()
    };
    assert_eq!(keys(&doc), ["changes", "pools"].map(String::from).into());
    let c = only_change(&doc);
    assert_eq!(
        keys(c),
        [
            "resource",
            "organization",
            "product",
            "from",
            "to",
            "action",
            "outcome",
            "reason",
            "message",
            "rehomed",
            "displaced",
            "diff"
        ]
        .map(String::from)
        .into()
    );
    assert_eq!(c["resource"], "licenses/qa");
    assert_eq!(c["outcome"], "planned");
    assert!(c["reason"].is_null());
    assert!(
        c["diff"]
            .as_str()
            .unwrap()
            .contains("-dedicated: 5\n+dedicated: 10\n"),
        "{c}"
    );
    let pool = &doc["pools"][0];
    assert_eq!(
        keys(pool),
        ["product", "total", "dedicated", "sharedInUse", "free"]
            .map(String::from)
            .into()
    );
    assert_eq!(
        (pool["dedicated"].as_i64(), pool["free"].as_i64()),
        (Some(10), Some(190))
    );
}

#[test]
fn markdown_plan_is_a_pull_request_comment_with_a_table_and_diffs() {
    let acct = Account::seeded(DOCUMENTED);
    acct.license("qa", "qa-team", "TestOps", 10, "");
    acct.license("dev", "dev-team", "TestOps", 500, "");
    let run = acct.run(&[
        "plan",
        "-f",
        acct.path("manifests").to_str().unwrap(),
        "-o",
        "markdown",
    ]);
    assert_eq!(run.code, 1, "one change is refused: {run:?}");
    let md = run.stdout;
    assert!(
        md.starts_with("### licensor plan: 1 to change, 1 refused"),
        "{md}"
    );
    assert!(md.contains("| | Resource | Organization | Product | From | To | Action | Outcome | Reason | Message |"), "{md}");
    assert!(md.contains("| `licenses/dev` | dev-team | TestOps | 0 | 500 | create | refused | `InsufficientPool` |"), "{md}");
    assert!(
        md.contains("```diff\n--- backend/qa-team/TestOps\n+++ desired/licenses/qa\n"),
        "{md}"
    );
    assert!(
        md.contains("| TestOps | 200 | 5 → 10 | 0 | 195 → 190 |"),
        "{md}"
    );
}

#[test]
fn text_plan_shows_the_diff_and_pool_impact() {
    let acct = Account::seeded(DOCUMENTED);
    let m = acct.license("qa", "qa-team", "TestOps", 10, "");
    let run = acct.run(&["plan", "-f", m.to_str().unwrap()]);
    assert_eq!(run.code, 2);
    assert!(
        run.stdout
            .contains("increase 5 -> 10: takes 5 of 195 free TestOps seats"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout
            .contains("    -dedicated: 5\n    +dedicated: 10\n"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout.contains("free      195 -> 190"),
        "{}",
        run.stdout
    );
}

/// Bad manifests: each gives exit 1 from validate, plan and apply, an error
/// naming the file and line, and leaves the store as it was.
#[test]
fn bad_manifests_are_errors_with_file_and_line_and_write_nothing() {
    let acct = Account::seeded(DOCUMENTED);
    let good = license_yaml("qa", "qa-team", "TestOps", 10, "");
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "malformed",
            good.replace("  product: TestOps", "  product: [TestOps"),
            "bad.yaml:9: did not find expected ',' or ']'",
        ),
        (
            "unknown field",
            format!("{good}  colour: red\n"),
            "bad.yaml:10: spec: unknown field `colour`",
        ),
        (
            "negative count",
            good.replace("count: 10", "count: -1"),
            "bad.yaml:9: spec.count -1 is outside 0..=1000000",
        ),
        (
            "string count",
            good.replace("count: 10", "count: \"5\""),
            "bad.yaml:9: spec.count: invalid type: string \"5\"",
        ),
        (
            "huge count",
            good.replace("count: 10", "count: 10000000"),
            "bad.yaml:9: spec.count 10000000 is outside 0..=1000000",
        ),
        (
            "missing organization",
            good.replace("  organization: qa-team\n", ""),
            "bad.yaml:7: spec: missing field `organization`",
        ),
        (
            "duplicate",
            format!("{good}---\n{}", good.replace("name: qa", "name: qa2")),
            "bad.yaml:11: organization qa-team product TestOps is declared twice; the first is at",
        ),
        (
            "wrong apiVersion",
            good.replace("v1alpha1", "v9"),
            "bad.yaml:1: apiVersion licensor.dev/v9 is not served",
        ),
        (
            "a control character in the organization",
            good.replace("organization: qa-team", "organization: \"qa\\tteam\""),
            "holds a control character: ids and names are 1 to 253 characters",
        ),
        (
            "254 characters of product",
            good.replace("product: TestOps", &format!("product: {}", "é".repeat(254))),
            "is longer than 253 characters",
        ),
        // A DedicatedLicense of another group, or with no apiVersion, is
        // an error, never skipped: --prune would revoke its allocation.
        (
            "wrong group",
            good.replace("licensor.dev/v1alpha1", "licenser.dev/v1alpha1"),
            "bad.yaml:1: apiVersion licenser.dev/v1alpha1 is not served; use licensor.dev/v1alpha1",
        ),
        (
            "missing apiVersion",
            good.replace("apiVersion: licensor.dev/v1alpha1\n", ""),
            "bad.yaml:1: a DedicatedLicense needs apiVersion: licensor.dev/v1alpha1",
        ),
    ];
    let before = acct.rows();
    for (what, text, expected) in cases {
        let file = acct.write("bad.yaml", &text);
        let file = file.to_str().unwrap();
        for cmd in [
            vec!["validate", "-f", file],
            vec!["plan", "-f", file],
            vec!["apply", "-f", file],
        ] {
            let run = acct.run(&cmd);
            assert_eq!(run.code, 1, "{what} {cmd:?}: {run:?}");
            assert!(
                run.stderr.contains(expected),
                "{what} {cmd:?}: expected {expected:?} in\n{}",
                run.stderr
            );
            assert!(
                run.stderr.contains("nothing was changed"),
                "{what}: {}",
                run.stderr
            );
        }
    }
    assert_eq!(acct.rows(), before);
}

#[test]
fn an_empty_directory_is_an_error() {
    let acct = Account::seeded(DOCUMENTED);
    std::fs::create_dir_all(acct.path("empty")).unwrap();
    let before = acct.rows();
    let run = acct.run(&["apply", "-f", acct.path("empty").to_str().unwrap()]);
    assert_eq!(run.code, 1);
    assert!(
        run.stderr
            .contains("directory holds no .yaml or .yml files"),
        "{run:?}"
    );
    // Namespaces are read (their labels select tenants); a ConfigMap is
    // another kind.
    let only_other_kinds = acct.write(
        "other/cm.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n",
    );
    let run = acct.run(&["plan", "-f", only_other_kinds.to_str().unwrap()]);
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains("note: "), "{run:?}");
    assert!(
        run.stderr.contains("no DedicatedLicense manifests found"),
        "{run:?}"
    );
    assert_eq!(acct.rows(), before);
}

#[test]
fn validate_reads_directories_recursively_and_skips_other_kinds() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("team/qa")).unwrap();
    std::fs::write(
        dir.path().join("team/qa/l.yaml"),
        license_yaml("qa", "qa-team", "TestOps", 1, ""),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("team/more.yml"),
        format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: c}}\n---\n{}",
            license_yaml("b", "b", "TestOps", 1, "")
        ),
    )
    .unwrap();
    std::fs::write(dir.path().join("README.md"), "not yaml").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_licensor"))
        .args(["validate", "-f"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "2 DedicatedLicense manifests valid\n"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("more.yml:1: skipped ConfigMap"));
}

/// `make demo`'s steps, twice in a row on one store (the second run
/// re-seeds): both runs apply everything and end with `0 to change`.
#[test]
fn the_demo_twice_ends_in_sync_both_times() {
    let dir = tempfile::tempdir().unwrap();
    let root = env!("CARGO_MANIFEST_DIR");
    let step = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_licensor"))
            .args(args)
            .current_dir(dir.path())
            .env_remove("LICENSOR_BACKEND")
            .env_remove("LICENSOR_ACCOUNT")
            .env_remove("LICENSOR_TOKEN")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let account = format!("{root}/examples/account.yaml");
    let licenses = format!("{root}/examples/licenses");
    for run in ["first", "second"] {
        assert_eq!(
            step(&["backend", "seed", "-f", &account]).0,
            Some(0),
            "{run}"
        );
        assert_eq!(step(&["plan", "-f", &licenses]).0, Some(2), "{run}");
        let (code, out) = step(&["apply", "-f", &licenses]);
        assert_eq!(code, Some(0), "{run}: {out}");
        assert!(out.contains("4 applied, 0 refused"), "{run}: {out}");
        assert!(!out.contains("replayed"), "{run}: {out}");
        let (code, out) = step(&["plan", "-f", &licenses]);
        assert_eq!(code, Some(0), "{run}: {out}");
        assert!(
            out.starts_with("Plan against sqlite:licensor.db: 0 to change"),
            "{run}: {out}"
        );
    }
}

/// `make demo` runs the binary cargo built, where cargo built it.
#[test]
fn make_demo_runs_the_binary_in_cargo_target_dir() {
    for (target_dir, bin) in [
        (None, "target/release/licensor"),
        (
            Some("/elsewhere/build"),
            "/elsewhere/build/release/licensor",
        ),
    ] {
        let mut make = std::process::Command::new("make");
        make.args(["-n", "demo"])
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        match target_dir {
            Some(d) => make.env("CARGO_TARGET_DIR", d),
            None => make.env_remove("CARGO_TARGET_DIR"),
        };
        let out = make.output().unwrap();
        let printed = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{printed}");
        assert!(
            printed.contains(&format!("{bin} backend seed -f examples/account.yaml")),
            "{target_dir:?}: {printed}"
        );
    }
}

/// A manifest that is a symlink is read (else `--prune` would revoke its
/// allocation); a byte-order mark is fine; a broken or looping link is an
/// error naming it.
#[test]
fn links_are_followed_and_broken_links_named() {
    let acct = Account::seeded(DOCUMENTED);
    let real = acct.write(
        "real/qa.yaml",
        &license_yaml("qa", "qa-team", "TestOps", 5, ""),
    );
    acct.write(
        "repo/dev.yaml",
        &format!(
            "\u{feff}{}",
            license_yaml("dev", "dev-team", "TestOps", 2, "")
        ),
    );
    std::os::unix::fs::symlink(&real, acct.path("repo/qa.yaml")).unwrap();
    let repo = acct.path("repo");
    let run = acct.run(&["validate", "-f", repo.to_str().unwrap()]);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(run.stdout, "2 DedicatedLicense manifests valid\n");
    // qa-team's unmanaged 5 is adopted, not revoked, by a pruning apply.
    let run = acct.run(&[
        "apply",
        "--prune",
        "-f",
        repo.to_str().unwrap(),
        "-o",
        "json",
    ]);
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(acct.allocation("qa-team", "TestOps"), Some((5, 4)));
    assert_eq!(acct.allocation("dev-team", "TestOps"), Some((2, 0)));

    let before = acct.rows();
    std::os::unix::fs::symlink(acct.path("gone.yaml"), acct.path("repo/broken.yaml")).unwrap();
    let run = acct.run(&["apply", "--prune", "-f", repo.to_str().unwrap()]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stderr.contains("repo/broken.yaml: a broken link"),
        "{}",
        run.stderr
    );
    std::fs::remove_file(acct.path("repo/broken.yaml")).unwrap();
    std::os::unix::fs::symlink(&repo, acct.path("repo/again")).unwrap();
    let run = acct.run(&["plan", "--prune", "-f", repo.to_str().unwrap()]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stderr.contains("repo/again: a link loops back to"),
        "{}",
        run.stderr
    );
    assert_eq!(acct.rows(), before);
}

/// Commands that read never create or change a store; a file that is not a
/// licensor store, or one from a newer licensor, is refused untouched.
#[test]
fn reading_never_creates_and_foreign_or_newer_files_stay_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("qa.yaml");
    std::fs::write(&manifest, license_yaml("qa", "qa-team", "TestOps", 5, "")).unwrap();
    let m = manifest.to_str().unwrap();
    let run = |db: &std::path::Path, args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_licensor"))
            .arg("--backend")
            .arg(format!("sqlite:{}", db.display()))
            .args(args)
            .env_remove("LICENSOR_BACKEND")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let commands: [&[&str]; 6] = [
        &["status"],
        &["plan", "-f", m],
        &["apply", "-f", m],
        &["backend", "audit"],
        &[
            "backend",
            "claim",
            "--org",
            "qa-team",
            "--product",
            "TestOps",
            "--count",
            "1",
        ],
        &["backend", "total", "--product", "TestOps", "--total", "9"],
    ];
    let missing = dir.path().join("missing.db");
    for args in commands {
        let (code, stderr) = run(&missing, args);
        assert_eq!(code, Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains("no store here"), "{args:?}: {stderr}");
        assert!(!missing.exists(), "{args:?} created {}", missing.display());
    }

    let files = |db: &std::path::Path| {
        let mut all: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| {
                let p = e.ok()?.path();
                let name = p.file_name()?.to_string_lossy().into_owned();
                name.starts_with(db.file_name()?.to_str()?)
                    .then(|| (name, std::fs::read(&p).unwrap()))
            })
            .collect();
        all.sort();
        all
    };
    let foreign = dir.path().join("notes.db");
    {
        let c = rusqlite::Connection::open(&foreign).unwrap();
        c.execute_batch("CREATE TABLE notes (body TEXT); INSERT INTO notes VALUES ('mine');")
            .unwrap();
    }
    let newer = dir.path().join("newer.db");
    let fixture = dir.path().join("account.yaml");
    std::fs::write(&fixture, DOCUMENTED).unwrap();
    let (code, stderr) = run(
        &newer,
        &["backend", "seed", "-f", fixture.to_str().unwrap()],
    );
    assert_eq!(code, Some(0), "{stderr}");
    {
        let c = rusqlite::Connection::open(&newer).unwrap();
        c.execute_batch("PRAGMA journal_mode = DELETE; PRAGMA user_version = 99;")
            .unwrap();
    }
    let seed: &[&str] = &["backend", "seed", "-f", fixture.to_str().unwrap()];
    for (db, says) in [
        (
            &foreign,
            "is not a licensor store (it holds the tables notes)",
        ),
        (&newer, "schema version 99 is newer than this licensor"),
    ] {
        let before = files(db);
        for args in commands.iter().copied().chain([seed]) {
            let (code, stderr) = run(db, args);
            assert_eq!(code, Some(1), "{args:?}: {stderr}");
            assert!(stderr.contains(says), "{args:?}: {stderr}");
        }
        assert_eq!(files(db), before, "{} was touched", db.display());
    }
}

/// A backend URL with credentials is never printed with them, whether it
/// is malformed, of another kind, or well-formed and unreachable.
#[test]
fn credentials_in_a_backend_url_are_never_printed() {
    for backend in [
        "http://admin:hunter2@[::1",
        "postgres://admin:hunter2@db.example/licenses",
        "mysql://hunter2@db",
        "http://admin:hunter2@127.0.0.1:1",
        "http://127.0.0.1:1/?token=hunter2",
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_licensor"))
            .args([
                "--backend",
                backend,
                "--account",
                "acme",
                "--backend-timeout",
                "1s",
                "status",
            ])
            .env_remove("LICENSOR_TOKEN")
            .output()
            .unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert_eq!(out.status.code(), Some(1), "{backend}: {stderr}");
        assert!(!stderr.is_empty(), "{backend}: says nothing");
        assert!(
            !stderr.contains("hunter2") && !stdout.contains("hunter2"),
            "{backend}: {stderr}"
        );
    }
}

#[test]
fn a_bad_fixture_or_unreachable_store_is_an_error_and_writes_nothing() {
    let acct = Account::seeded(DOCUMENTED);
    let before = acct.rows();
    let bad = acct.write(
        "bad-account.yaml",
        "account: acme\nproducts: [{name: TestOps, total: 10}]\norganizations:\n  - {id: a, allocations: [{product: TestOps, dedicated: 2, inUse: 3}]}\n",
    );
    let run = acct.run(&["backend", "seed", "-f", bad.to_str().unwrap()]);
    assert_eq!(run.code, 1);
    assert!(
        run.stderr.contains("need 0 <= inUse <= dedicated"),
        "{run:?}"
    );
    assert_eq!(acct.rows(), before);

    let m = acct.license("qa", "qa-team", "TestOps", 10, "");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_licensor"))
        .args([
            "--backend",
            "sqlite:/nonexistent/dir/licensor.db",
            "apply",
            "-f",
        ])
        .arg(&m)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/dir/licensor.db"));
}

#[test]
fn a_failed_first_seed_leaves_no_store_and_a_new_store_in_git_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_licensor"))
            .args(args)
            .current_dir(dir.path())
            .env_remove("LICENSOR_BACKEND")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    std::fs::write(dir.path().join("broken.yaml"), "account: [\n").unwrap();
    std::fs::write(
        dir.path().join("refused.yaml"),
        "account: acme\nproducts: [{name: TestOps, total: 10}]\norganizations:\n  - {id: a, allocations: [{product: TestOps, dedicated: 2, inUse: 3}]}\n",
    )
    .unwrap();
    for (fixture, why) in [
        ("broken.yaml", "broken.yaml: "),
        ("refused.yaml", "need 0 <= inUse <= dedicated"),
    ] {
        let (code, stderr) = run(&["backend", "seed", "-f", fixture]);
        assert_eq!(code, Some(1), "{stderr}");
        assert!(stderr.contains(why), "{stderr}");
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with("licensor.db"))
            .collect();
        assert!(left.is_empty(), "{fixture} left {left:?} behind");
    }

    // In a Git work tree, the first store says how to keep it out of Git,
    // until Git ignores it.
    let git = std::process::Command::new("git")
        .args(["init", "-q"])
        .current_dir(dir.path())
        .status()
        .unwrap();
    assert!(git.success());
    let account = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/account.yaml");
    let (code, stderr) = run(&["backend", "seed", "-f", account]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stderr.contains("inside a Git work tree")
            && stderr.contains("echo 'licensor.db*' >> .gitignore"),
        "{stderr}"
    );
    let (code, stderr) = run(&["backend", "seed", "-f", account]);
    assert_eq!(
        (code, stderr.as_str()),
        (Some(0), ""),
        "only a new store says so"
    );
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(dir.path().join(format!("licensor.db{suffix}")));
    }
    std::fs::write(dir.path().join(".gitignore"), "licensor.db*\n").unwrap();
    let (code, stderr) = run(&["backend", "seed", "-f", account]);
    assert_eq!((code, stderr.as_str()), (Some(0), ""), "ignored by Git");
}

#[test]
fn the_committed_crds_are_current() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_licensor"))
        .arg("crd")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/crds/licensor.dev.yaml");
    let committed = std::fs::read_to_string(path).unwrap();
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(
        printed == committed,
        "crds/licensor.dev.yaml is stale: run `make crd` and commit the result"
    );
    // Both resources, each as `licensor crd <kind>` prints it alone.
    for kind in ["dedicated-license", "license-pool"] {
        let one = std::process::Command::new(env!("CARGO_BIN_EXE_licensor"))
            .args(["crd", kind])
            .output()
            .unwrap();
        assert!(
            printed.contains(&*String::from_utf8_lossy(&one.stdout)),
            "{kind}"
        );
    }
}

/// The pull-request check's script (`examples/gitops/plan-check.sh`) against
/// a store: a raise passes with exit 2, a deleted manifest shows as its
/// revoke (it plans with --prune), a refusal and invalid manifests fail with
/// exit 1 and say why in the markdown, and nothing to do is exit 0.
#[test]
fn the_pull_request_script_plans_with_prune_and_fails_only_on_refusals() {
    let acct = Account::seeded(DOCUMENTED);
    let dir = acct.path("licenses");
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, org: &str, count: i64| {
        std::fs::write(
            dir.join(format!("{name}.yaml")),
            license_yaml(name, org, "TestOps", count, ""),
        )
        .unwrap()
    };
    write("qa", "qa-team", 10);
    write("dev", "dev-team", 3);
    let run = acct.run(&["apply", "-f", dir.to_str().unwrap()]);
    assert_eq!(run.code, 0, "{run:?}");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/gitops/plan-check.sh");
    let out = acct.path("plan.md");
    let check = || {
        let status = std::process::Command::new("bash")
            .arg(script)
            .arg(&dir)
            .arg(&out)
            .env("LICENSOR", env!("CARGO_BIN_EXE_licensor"))
            .env("LICENSOR_BACKEND", acct.store())
            .env_remove("LICENSOR_INSTANCE")
            .stderr(std::process::Stdio::null())
            .status()
            .unwrap();
        (status.code(), std::fs::read_to_string(&out).unwrap())
    };

    let (code, md) = check();
    assert_eq!(code, Some(0), "{md}");
    assert!(
        md.starts_with("### licensor plan: 0 to change, 0 refused, 2 unchanged"),
        "{md}"
    );

    write("qa", "qa-team", 12);
    let (code, md) = check();
    assert_eq!(code, Some(2), "{md}");
    assert!(
        md.contains("| `licenses/qa` | qa-team | TestOps | 10 | 12 | increase | planned |"),
        "{md}"
    );

    std::fs::remove_file(dir.join("dev.yaml")).unwrap();
    let (code, md) = check();
    assert_eq!(code, Some(2), "{md}");
    assert!(
        md.contains("| `licenses/dev` | dev-team | TestOps | 3 | 0 | revoke | planned |"),
        "{md}"
    );

    write("qa", "qa-team", 1);
    let (code, md) = check();
    assert_eq!(code, Some(1), "{md}");
    assert!(md.contains("| refused | `BelowInUse` |"), "{md}");

    std::fs::write(
        dir.join("qa.yaml"),
        "apiVersion: licensor.dev/v1alpha1\nkind: [",
    )
    .unwrap();
    let (code, md) = check();
    assert_eq!(code, Some(1), "{md}");
    assert!(
        md.starts_with("### licensor: the license manifests are not valid"),
        "{md}"
    );
    assert!(
        md.contains("qa.yaml:3: did not find expected node content"),
        "{md}"
    );
    // Nothing was written by any of it.
    assert_eq!(acct.allocation("qa-team", "TestOps"), Some((10, 4)));
    assert_eq!(acct.allocation("dev-team", "TestOps"), Some((3, 0)));
}

/// Every command line the CLI has, walked from its own definition, so a
/// new command cannot miss the exit-code contract: `licensor plan`,
/// `licensor backend seed`, ...
fn every_command() -> Vec<Vec<String>> {
    use clap::CommandFactory;
    fn walk(c: &clap::Command, path: Vec<String>, out: &mut Vec<Vec<String>>) {
        let subs: Vec<_> = c
            .get_subcommands()
            .filter(|s| s.get_name() != "help")
            .collect();
        if subs.is_empty() {
            out.push(path.clone());
        }
        for s in subs {
            let mut p = path.clone();
            p.push(s.get_name().to_string());
            walk(s, p, out);
        }
    }
    let mut out = Vec::new();
    walk(&licensor::cli::Cli::command(), Vec::new(), &mut out);
    out
}

#[test]
fn usage_errors_exit_1_never_2_and_help_and_version_exit_0() {
    let acct = Account::seeded(DOCUMENTED);
    let commands = every_command();
    assert!(commands.len() >= 14, "{commands:?}");
    for command in &commands {
        let args: Vec<&str> = command.iter().map(String::as_str).collect();
        let typo = acct.run(&[&args[..], &["--prnue"]].concat());
        assert_eq!(typo.code, 1, "{command:?} --prnue: {typo:?}");
        assert!(
            typo.stderr.contains("unexpected argument '--prnue'"),
            "{command:?}: {typo:?}"
        );
        let help = acct.run(&[&args[..], &["--help"]].concat());
        assert_eq!(help.code, 0, "{command:?} --help: {help:?}");
        assert!(help.stdout.contains("Usage: licensor"), "{help:?}");
        assert!(
            help.stdout.contains("Global options:"),
            "{command:?}: the global options have a section of their own: {help:?}"
        );
    }
    // A group without its command, or no command at all: help on stderr, 1.
    for args in [&[][..], &["backend"], &["token"]] {
        let run = acct.run(args);
        assert_eq!(run.code, 1, "{args:?}: {run:?}");
    }
    let run = acct.run(&["plan"]);
    assert_eq!(run.code, 1, "plan without -f: {run:?}");
    assert!(run.stderr.contains("--filename"), "{run:?}");
    let run = acct.run(&["plan", "-f", "manifests", "-o", "yaml"]);
    assert_eq!(run.code, 1, "{run:?}");
    let run = acct.run(&["--version"]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(run.stdout.starts_with("licensor "), "{run:?}");
    // Every backend is named in the help.
    let help = acct.run(&["status", "--help"]).stdout;
    for scheme in ["sqlite:PATH", "postgres://", "http(s)://"] {
        assert!(
            help.contains(scheme),
            "--backend help lacks {scheme}: {help}"
        );
    }
}

#[test]
fn empty_identity_values_are_errors_naming_the_option() {
    let acct = Account::seeded(DOCUMENTED);
    let m = acct.license("qa", "qa-team", "TestOps", 6, "");
    let file = m.to_str().unwrap();
    let before = acct.rows();
    for (env, flag) in [
        ("LICENSOR_INSTANCE", "--instance"),
        ("LICENSOR_ACCOUNT", "--account"),
        ("LICENSOR_BACKEND", "--backend"),
    ] {
        for by_flag in [false, true] {
            let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_licensor"));
            command
                .current_dir(acct.dir.path())
                .env_remove("LICENSOR_TOKEN");
            if env != "LICENSOR_BACKEND" {
                command.args(["--backend", &acct.backend]);
            }
            if by_flag {
                command.args([flag, ""]);
            } else {
                command.env(env, "");
            }
            let out = command.args(["apply", "-f", file]).output().unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{flag} empty ({env}): {stderr}");
            assert!(
                stderr.contains(&format!("'{flag} <")),
                "the error names {flag}: {stderr}"
            );
        }
    }
    assert_eq!(acct.rows(), before, "nothing was written");
}

#[test]
fn every_output_format_offered_is_the_one_printed() {
    let acct = Account::seeded(DOCUMENTED);
    let m = acct.license("qa", "qa-team", "TestOps", 6, "");
    let file = m.to_str().unwrap();
    let tables = |args: &[&str], header: &str| {
        let run = acct.run(args);
        assert_eq!(run.code, 0, "{args:?}: {run:?}");
        assert!(
            run.stdout.lines().any(|l| l.starts_with(header)),
            "{args:?} -o markdown prints a table with {header:?}: {}",
            run.stdout
        );
        assert!(run.stdout.lines().any(|l| l.starts_with("|---")), "{run:?}");
    };
    tables(&["apply", "-f", file, "-o", "markdown"], "| | Resource |");
    assert_eq!(acct.allocation("qa-team", "TestOps"), Some((6, 4)));
    tables(&["status", "-o", "markdown"], "| Product | Total |");
    tables(&["status", "-o", "markdown"], "| Organization | Product |");
    tables(&["backend", "audit", "-o", "markdown"], "| Time | Actor |");
    for args in [
        &["status", "-o", "json"][..],
        &["backend", "audit", "-o", "json"],
    ] {
        let run = acct.run(args);
        assert_eq!(run.code, 0, "{run:?}");
        run.json();
    }
}

/// `licensor token create | list | revoke` on both databases: a name is
/// unique in its account (a second create is refused and writes nothing),
/// `--expires` is shown, `list` never prints a token or a hash, and a
/// revoke of a name that is gone says so; each exits 0 or 1.
#[test]
fn tokens_are_created_once_listed_and_revoked() {
    for kind in [Kind::Embedded, Kind::Postgres] {
        let acct = Account::seeded_on(kind, DOCUMENTED);
        let token = |args: &[&str]| acct.run_local(&[&["token"][..], args].concat());
        let none = token(&["list"]);
        assert_eq!(
            (none.code, none.stdout.as_str()),
            (
                0,
                "account acme has no tokens; `licensor token create --role Viewer --name NAME` makes one\n"
            ),
            "{kind:?}: {none:?}"
        );
        let ci = token(&["create", "--role", "Viewer", "--name", "ci"]);
        assert_eq!(ci.code, 0, "{ci:?}");
        let secret = ci.stdout.trim();
        assert!(secret.starts_with("lsr_") && secret.len() == 52, "{secret}");
        let alice = token(&[
            "create",
            "--role",
            "AccountAdmin",
            "--name",
            "alice",
            "--expires",
            "90d",
        ]);
        assert_eq!(alice.code, 0, "{alice:?}");

        let before = acct.rows();
        let again = token(&["create", "--role", "AccountAdmin", "--name", "ci"]);
        assert_eq!(again.code, 1, "{again:?}");
        assert_eq!(
            again.stderr,
            "error: a token named \"ci\" exists in account acme; revoke it first or choose another name\n"
        );
        let bad = token(&[
            "create",
            "--role",
            "Viewer",
            "--name",
            "x",
            "--expires",
            "soon",
        ]);
        assert_eq!(bad.code, 1, "{bad:?}");
        assert!(bad.stderr.contains("--expires"), "{bad:?}");
        let far = token(&[
            "create",
            "--role",
            "Viewer",
            "--name",
            "x",
            "--expires",
            "300000years",
        ]);
        assert_eq!(
            (far.code, far.stderr.as_str()),
            (
                1,
                "error: a token's expiry must be a time this licensor can hold, not 300000years away\n"
            ),
            "{far:?}"
        );
        assert_eq!(acct.rows(), before, "a refused create wrote");

        let list = token(&["list"]);
        assert_eq!(list.code, 0, "{list:?}");
        let lines: Vec<Vec<&str>> = list
            .stdout
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(
            lines[0],
            ["NAME", "ROLE", "CREATED", "EXPIRES", "LAST", "USED"]
        );
        assert_eq!((lines[1][0], lines[1][1]), ("alice", "AccountAdmin"));
        assert!(
            lines[1][3].starts_with('2') && lines[1][4] == "never",
            "{list:?}"
        );
        assert_eq!(
            (lines[2][0], lines[2][1], lines[2][3]),
            ("ci", "Viewer", "never")
        );
        assert_eq!(lines.len(), 3, "{list:?}");
        let md = token(&["list", "-o", "markdown"]);
        assert!(
            md.stdout
                .contains("| Name | Role | Created | Expires | Last used |\n|---|")
                && md.stdout.contains("| ci | Viewer | "),
            "{md:?}"
        );
        // The audit log names each token's record by the token, in every
        // format.
        let audit = acct.run_local(&["backend", "audit"]);
        assert!(
            audit
                .stdout
                .contains(" local token-create token ci (Viewer) 0 -> 0 "),
            "{audit:?}"
        );
        let audit = acct.run_local(&["backend", "audit", "-o", "markdown"]);
        assert!(audit.stdout.contains("| - | ci (Viewer) |\n"), "{audit:?}");
        let json = token(&["list", "-o", "json"]);
        assert_eq!(json.code, 0, "{json:?}");
        let listed: serde_json::Value = serde_json::from_str(&json.stdout).unwrap();
        assert_eq!(listed[1]["name"], "ci");
        assert_eq!(listed[1]["lastUsed"], serde_json::Value::Null);
        for out in [&list.stdout, &json.stdout] {
            assert!(!out.contains("lsr_") && !out.contains("hash"), "{out}");
        }

        let revoke = token(&["revoke", "--name", "ci"]);
        assert_eq!(revoke.code, 0, "{revoke:?}");
        let gone = token(&["revoke", "--name", "ci"]);
        assert_eq!(gone.code, 1, "{gone:?}");
        assert_eq!(
            gone.stderr,
            "error: no token named \"ci\" in account acme; `licensor token list` shows them\n"
        );
        let names: Vec<String> = token(&["list"])
            .stdout
            .lines()
            .skip(1)
            .map(|l| l.split_whitespace().next().unwrap().to_string())
            .collect();
        assert_eq!(names, ["alice"], "{kind:?}");
    }
}

/// DESIGN §11 from the CLI: a temporary allocation plans its count until
/// its until and its thenCount from then on; `plan --at` previews a later
/// moment; every format says when the count ends; a thenCount below the
/// seats in use is refused at that moment, saying it is the expiry's.
#[test]
fn plan_at_previews_a_temporary_allocation_and_every_format_says_when_it_ends() {
    let acct = Account::seeded(DOCUMENTED);
    let in_days = |days| {
        (chrono::Utc::now() + chrono::TimeDelta::days(days))
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    };
    // qa-team's TestOps: 8 until `until`, then `then`.
    let temporary = |until: &str, then: i64| {
        let spec = format!("  until: {until}\n  thenCount: {then}\n");
        acct.license("qa", "qa-team", "TestOps", 8, &spec)
    };
    let (until, after) = (in_days(2), in_days(3));
    let m = temporary(&until, 4);
    let file = m.to_str().unwrap();

    // Now: 5 -> 8, ending in two days.
    let run = acct.run(&["plan", "-f", file]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(
        run.stdout.contains("qa-team TestOps  5 -> 8  increase"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout
            .contains(&format!("    expires {until} (in 1d 23h), then 4\n"))
            || run
                .stdout
                .contains(&format!("    expires {until} (in 2d), then 4\n")),
        "{}",
        run.stdout
    );
    let c = only_change(&acct.plan(&m).json()).clone();
    assert_eq!((c["from"].as_i64(), c["to"].as_i64()), (Some(5), Some(8)));
    assert_eq!(
        c["expiry"],
        serde_json::json!({"until": until, "thenCount": 4, "passed": false})
    );
    let md = acct.run(&["plan", "-f", file, "-o", "markdown"]);
    assert!(
        md.stdout.contains(&format!("<br>⏳ expires {until} (in ")),
        "{}",
        md.stdout
    );

    // A day after the until: the thenCount, 5 -> 4.
    let run = acct.run(&["plan", "-f", file, "--at", &after]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(
        run.stdout.contains("qa-team TestOps  5 -> 4  decrease"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout
            .contains(&format!("    expired {until} (1d ago), then 4\n")),
        "{}",
        run.stdout
    );
    let json = acct
        .run(&["plan", "-f", file, "--at", &after, "-o", "json"])
        .json();
    let c = only_change(&json);
    assert_eq!(
        (c["to"].as_i64(), c["expiry"]["passed"].as_bool()),
        (Some(4), Some(true))
    );

    // Applied now, the preview of later lowers 8 to 4; the store is not
    // touched by a preview.
    assert_eq!(acct.apply(&m).code, 0);
    let json = acct
        .run(&["plan", "-f", file, "--at", &after, "-o", "json"])
        .json();
    assert_eq!(only_change(&json)["from"].as_i64(), Some(8));
    assert_eq!(acct.allocation("qa-team", "TestOps"), Some((8, 4)));
    // In sync now, it is still shown: when it ends is news.
    let run = acct.run(&["plan", "-f", file]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout.contains(&format!("expires {until}")),
        "{}",
        run.stdout
    );

    // The store keeps the expiry with the allocation: status shows it in
    // every format.
    let status = acct.run(&["status"]);
    assert_eq!(status.code, 0, "{status:?}");
    let row = status
        .stdout
        .lines()
        .find(|l| l.starts_with("qa-team "))
        .unwrap_or_default();
    assert!(
        status
            .stdout
            .contains("IN-USE  MANAGED-BY           EXPIRY\n")
            && row.contains("default/licenses/qa")
            && row.contains(&format!("  expires {until} (in "))
            && row.ends_with("), then 4"),
        "{}",
        status.stdout
    );
    let json = acct.run(&["status", "-o", "json"]).json();
    let qa = json["allocations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["organization"] == "qa-team")
        .unwrap();
    assert_eq!(
        qa["expiry"],
        serde_json::json!({"until": until, "thenCount": 4})
    );
    let md = acct.run(&["status", "-o", "markdown"]).stdout;
    assert!(
        md.contains("| Managed by | Expiry |\n|---|---|---:|---:|---| --- |\n")
            && md.contains(&format!("| `default/licenses/qa` | expires {until} (in ")),
        "{md}"
    );
    // A new until alone is a change to write, and says so.
    let later = in_days(5);
    let moved = temporary(&later, 4);
    let run = acct.run(&["plan", "-f", moved.to_str().unwrap()]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(
        run.stdout.contains(&format!(
            "no count change; expiry {until} -> {later}, kept with the allocation"
        )),
        "{}",
        run.stdout
    );
    assert_eq!(acct.apply(&moved).code, 0);
    let json = acct.run(&["status", "-o", "json"]).json();
    assert_eq!(json["allocations"][0]["expiry"]["until"], later.as_str());
    assert_eq!(acct.apply(&m).code, 0);

    // A thenCount below the 4 seats in use is refused at the expiry.
    let low = temporary(&until, 2);
    let run = acct.run(&[
        "plan",
        "-f",
        low.to_str().unwrap(),
        "--at",
        &after,
        "-o",
        "json",
    ]);
    assert_eq!(run.code, 1, "{run:?}");
    let c = only_change(&run.json()).clone();
    assert_eq!(c["reason"], "BelowInUse");
    let message = c["message"].as_str().unwrap();
    assert!(
        message.starts_with(&format!(
            "at its expiry ({until}, then 2): cannot lower qa-team/TestOps to 2: 4 seats are in use"
        )),
        "{message}"
    );
    assert_eq!(acct.allocation("qa-team", "TestOps"), Some((8, 4)));

    // A bad --at is a usage error; thenCount needs until and a range.
    let run = acct.run(&["plan", "-f", file, "--at", "tomorrow"]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains("--at"), "{}", run.stderr);
    for (extra, says) in [
        ("  thenCount: 2\n", "spec.thenCount needs spec.until"),
        (
            &*format!("  until: {until}\n  thenCount: 2000000\n"),
            "spec.thenCount 2000000 is outside 0..=1000000",
        ),
        ("  until: next week\n", "until"),
    ] {
        let bad = acct.license("qa", "qa-team", "TestOps", 8, extra);
        let run = acct.run(&["validate", "-f", bad.to_str().unwrap()]);
        assert_eq!(run.code, 1, "{extra}: {run:?}");
        assert!(run.stderr.contains(says), "{extra}: {}", run.stderr);
        assert!(
            run.stderr.contains("qa.yaml:1"),
            "file and line: {}",
            run.stderr
        );
    }
}
