//! Imports run one way: the pure core (`domain`, `plan`) knows no client,
//! server, clock or Kubernetes type; the wire types (`api`) know no server
//! framework and no backend; a backend knows no driver; the PostgreSQL
//! pool does not open connections itself. Read from `src/` as text, so a
//! new file is held to its folder's rule without being listed.

use std::path::{Path, PathBuf};

/// What the pure core (`domain`, `plan`) must not name: no driver, no
/// client, no clock or runtime, no Kubernetes type.
const IMPURE: &[&str] = &[
    "crate::resource",
    "crate::backend",
    "crate::api",
    "crate::server",
    "crate::operator",
    "crate::cli",
    "crate::manifest",
    "crate::licensepool",
    "kube::",
    "k8s_openapi",
    "tokio",
    "axum",
    "reqwest",
    "rusqlite",
    "tokio_postgres",
    "clap",
];

/// Files (a file, or every file under a folder) and what they must not name.
const RULES: &[(&str, &[&str])] = &[
    ("src/domain.rs", IMPURE),
    ("src/domain", IMPURE),
    ("src/domain.rs", &["crate::plan"]),
    ("src/domain", &["crate::plan"]),
    ("src/plan.rs", IMPURE),
    (
        "src/api",
        &[
            "axum",
            "crate::backend",
            "crate::server",
            "crate::operator",
            "crate::cli",
            "kube::",
        ],
    ),
    (
        "src/backend",
        &["crate::server", "crate::operator", "crate::cli", "axum"],
    ),
    ("src/server", &["crate::operator", "crate::cli"]),
    ("src/operator", &["crate::cli", "crate::server"]),
    ("src/backend/store/postgres/conn.rs", &["connect::"]),
];

fn rust_files(path: &Path) -> Vec<PathBuf> {
    if path.is_file() {
        return vec![path.to_path_buf()];
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            files.extend(rust_files(&p));
        } else if p.extension().is_some_and(|e| e == "rs") {
            files.push(p);
        }
    }
    files
}

/// Whether `line` names `what` as a path: at a word start, not inside a
/// longer identifier (`tokio` is not `tokio_rustls`'s prefix here unless
/// followed by `::`, `;` or `}`).
fn names(line: &str, what: &str) -> bool {
    line.match_indices(what).any(|(at, _)| {
        let before = line[..at].chars().next_back();
        let after = line[at + what.len()..].chars().next();
        !before.is_some_and(|c| c.is_alphanumeric() || c == '_')
            && (what.ends_with("::") || !after.is_some_and(|c| c.is_alphanumeric() || c == '_'))
    })
}

#[test]
fn imports_run_one_way() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut broken = Vec::new();
    for (place, forbidden) in RULES {
        let files = rust_files(&root.join(place));
        assert!(!files.is_empty(), "{place} holds no Rust file");
        for file in files {
            let text = std::fs::read_to_string(&file).unwrap();
            for (n, line) in text.lines().enumerate() {
                let code = line.split("//").next().unwrap_or_default();
                for what in *forbidden {
                    if names(code, what) {
                        broken.push(format!(
                            "{}:{}: names {what}: {}",
                            file.strip_prefix(root).unwrap().display(),
                            n + 1,
                            line.trim()
                        ));
                    }
                }
            }
        }
    }
    assert!(
        broken.is_empty(),
        "imports that run the wrong way:\n{}",
        broken.join("\n")
    );
}

#[test]
fn the_rule_finds_what_it_should() {
    assert!(names("use crate::backend::BackendError;", "crate::backend"));
    assert!(names("    tokio::spawn(x)", "tokio"));
    assert!(!names("use tokio_rustls::x;", "tokio"));
    assert!(!names("use crate::backends;", "crate::backend"));
    assert!(names("let c = super::connect::connect(&u);", "connect::"));
}
