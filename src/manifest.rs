//! Loading `DedicatedLicense` manifests from files and directories.
//!
//! Contract: every path is read (directories recursively, `.yaml`/`.yml`,
//! in sorted order, symlinks followed: a manifest that is a link is read,
//! and a broken or looping link is an error naming it), every document of
//! every file is looked at, and every problem is reported with its file and
//! line, not just the first. A UTF-8 byte-order mark is allowed. Documents
//! of other kinds are skipped with a note; a `DedicatedLicense` with a
//! missing or wrong `apiVersion` is an error, never a skip (with `--prune`
//! a skipped manifest would revoke its allocation). Unknown fields, wrong
//! types, counts outside 0..=1000000 and two manifests for one
//! organization+product of one account are errors. `LicenseAccount` and
//! `Namespace` documents are read too: their tenants and labels decide
//! which namespace may ask for what ([`Loaded::directory`]), as they do in
//! the cluster; malformed tenants and two accounts of one name are errors.
//! Loading is pure apart from reading the files.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::domain::{check_count_of, check_identifier};
use crate::licenseaccount::{Directory, LicenseAccount};
use crate::resource::{API_VERSION, DedicatedLicenseSpec, GROUP, KIND};

/// The kind of the account documents read beside the manifests.
const ACCOUNT_KIND: &str = "LicenseAccount";

/// Where a document starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub file: PathBuf,
    pub line: usize,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

/// One `DedicatedLicense` document.
#[derive(Debug, Clone, PartialEq)]
pub struct Manifest {
    pub source: Source,
    pub name: String,
    pub namespace: String,
    pub annotations: BTreeMap<String, String>,
    pub spec: DedicatedLicenseSpec,
}

impl Manifest {
    /// `namespace/name`, the resource id used in plans.
    pub fn resource(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A problem with the manifests, pointing at the file and line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("{path}: {message}")]
    Read { path: String, message: String },
    #[error("{at}: {message}")]
    Invalid { at: Source, message: String },
    #[error("{at}: {key} is declared twice; the first is at {first}")]
    Duplicate {
        at: Source,
        first: Source,
        key: String,
    },
    #[error("no DedicatedLicense manifests found in {paths}")]
    Empty { paths: String },
}

/// What loading found.
#[derive(Debug, Default)]
pub struct Loaded {
    pub manifests: Vec<Manifest>,
    /// `LicenseAccount` documents, where each starts.
    pub accounts: Vec<(Source, LicenseAccount)>,
    /// The labels of each `Namespace` document, by name.
    pub namespaces: BTreeMap<String, BTreeMap<String, String>>,
    /// Documents skipped on purpose, for the user to see.
    pub notes: Vec<String>,
    pub errors: Vec<ManifestError>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Document {
    #[allow(dead_code)]
    api_version: String,
    #[allow(dead_code)]
    kind: String,
    metadata: Metadata,
    spec: DedicatedLicenseSpec,
    #[serde(default)]
    #[allow(dead_code)]
    status: Option<serde::de::IgnoredAny>,
}

// Lenient on purpose: `kubectl get -o yaml` output carries uid, generation
// and the like, which are not the user's declaration.
#[derive(Deserialize)]
struct Metadata {
    name: Option<String>,
    namespace: Option<String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

impl Loaded {
    /// The accounts and Namespaces the documents declare: what the tenant
    /// rule reads for each manifest's namespace.
    pub fn directory(&self) -> Directory {
        Directory {
            accounts: self
                .accounts
                .iter()
                .map(|(_, a)| (a.metadata.name.clone().unwrap_or_default(), a.clone()))
                .collect(),
            namespaces: self.namespaces.clone(),
        }
    }
}

/// Loads every path; see the module contract.
pub fn load(paths: &[PathBuf]) -> Loaded {
    let mut loaded = Loaded::default();
    for path in paths {
        let files = match files_under(path) {
            Ok(files) => files,
            Err(e) => {
                loaded.errors.push(e);
                continue;
            }
        };
        for file in files {
            match std::fs::read_to_string(&file) {
                Ok(text) => parse_file(&file, text.trim_start_matches('\u{feff}'), &mut loaded),
                Err(e) => loaded.errors.push(ManifestError::Read {
                    path: file.display().to_string(),
                    message: e.to_string(),
                }),
            }
        }
    }
    check_duplicates(&mut loaded);
    if loaded.manifests.is_empty() && loaded.errors.is_empty() {
        loaded.errors.push(ManifestError::Empty {
            paths: paths
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    loaded
}

fn files_under(path: &Path) -> Result<Vec<PathBuf>, ManifestError> {
    let read_err = |message: String| ManifestError::Read {
        path: path.display().to_string(),
        message,
    };
    let meta = std::fs::metadata(path).map_err(|e| read_err(e.to_string()))?;
    if meta.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    for entry in walkdir::WalkDir::new(path)
        .follow_links(true)
        .sort_by_file_name()
    {
        let entry = entry.map_err(|e| {
            let at = e.path().unwrap_or(path).display().to_string();
            let message = match (e.loop_ancestor(), e.io_error()) {
                (Some(ancestor), _) => format!("a link loops back to {}", ancestor.display()),
                (None, Some(io)) if io.kind() == std::io::ErrorKind::NotFound => {
                    "a broken link: its target does not exist".to_string()
                }
                _ => e.to_string(),
            };
            ManifestError::Read { path: at, message }
        })?;
        let is_yaml = entry
            .path()
            .extension()
            .is_some_and(|x| x == "yaml" || x == "yml");
        if entry.file_type().is_file() && is_yaml {
            files.push(entry.into_path());
        }
    }
    if files.is_empty() {
        return Err(read_err("directory holds no .yaml or .yml files".into()));
    }
    Ok(files)
}

/// A document's text and the file line it starts on. Markers are blanked
/// rather than cut, so columns stay true.
fn split_documents(text: &str) -> Vec<(usize, String)> {
    let mut docs = Vec::new();
    let mut current = String::new();
    let mut start = 1;
    for (i, line) in text.lines().enumerate() {
        let marker = ["---", "..."].iter().find(|m| {
            line.strip_prefix(**m)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t']))
        });
        match marker {
            Some(m) => {
                docs.push((start, std::mem::take(&mut current)));
                start = i + 1;
                let rest = &line[m.len()..];
                if *m == "---" && !rest.trim().is_empty() {
                    current.push_str(&" ".repeat(m.len()));
                    current.push_str(rest);
                }
                current.push('\n');
            }
            None => {
                current.push_str(line);
                current.push('\n');
            }
        }
    }
    docs.push((start, current));
    docs.retain(|(_, d)| {
        d.lines()
            .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
    });
    docs
}

fn parse_file(file: &Path, text: &str, loaded: &mut Loaded) {
    for (start, doc) in split_documents(text) {
        let at = |line: usize| Source {
            file: file.to_path_buf(),
            line: start + line.saturating_sub(1),
        };
        let first_line = doc
            .lines()
            .position(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
            .map_or(1, |p| p + 1);
        let yaml_error = |e: serde_yaml::Error| {
            let (line, message) = yaml_fault(&e);
            ManifestError::Invalid {
                at: at(line.unwrap_or(first_line)),
                message,
            }
        };
        let value: serde_yaml::Value = match serde_yaml::from_str(&doc) {
            Ok(v) => v,
            Err(e) => {
                loaded.errors.push(yaml_error(e));
                continue;
            }
        };
        let field = |name: &str| value.get(name).and_then(|v| v.as_str()).unwrap_or("");
        let (api_version, kind) = (field("apiVersion"), field("kind"));
        if !value.is_mapping() {
            loaded.errors.push(ManifestError::Invalid {
                at: at(first_line),
                message: "expected a Kubernetes object (a mapping with apiVersion and kind)".into(),
            });
            continue;
        }
        let group = api_version.split('/').next().unwrap_or("");
        if (api_version, kind) == ("v1", "Namespace") {
            match read_namespace(&value) {
                Ok((name, labels)) => {
                    loaded.namespaces.insert(name, labels);
                }
                Err(message) => loaded.errors.push(ManifestError::Invalid {
                    at: at(line_of(&doc, "metadata").unwrap_or(first_line)),
                    message,
                }),
            }
            continue;
        }
        if (group, kind) == (GROUP, ACCOUNT_KIND) {
            match read_account(&doc, api_version) {
                Ok(account) => loaded.accounts.push((at(first_line), account)),
                Err((line, message)) => loaded.errors.push(ManifestError::Invalid {
                    at: at(line.unwrap_or(first_line)),
                    message,
                }),
            }
            continue;
        }
        if kind != KIND && group != GROUP {
            let shown = if kind.is_empty() { "no kind" } else { kind };
            loaded.notes.push(format!(
                "{}: skipped {shown} ({}), not a {API_VERSION} {KIND}",
                at(first_line),
                if api_version.is_empty() {
                    "no apiVersion"
                } else {
                    api_version
                }
            ));
            continue;
        }
        if kind != KIND {
            loaded.notes.push(format!(
                "{}: skipped {} ({api_version}), not a {API_VERSION} {KIND}",
                at(first_line),
                if kind.is_empty() { "no kind" } else { kind }
            ));
            continue;
        }
        if api_version != API_VERSION {
            let message = if api_version.is_empty() {
                format!("a {KIND} needs apiVersion: {API_VERSION}")
            } else {
                format!("apiVersion {api_version} is not served; use {API_VERSION}")
            };
            loaded.errors.push(ManifestError::Invalid {
                at: at(line_of(&doc, "apiVersion").unwrap_or(first_line)),
                message,
            });
            continue;
        }
        let document: Document = match serde_yaml::from_str(&doc) {
            Ok(d) => d,
            Err(e) => {
                loaded.errors.push(yaml_error(e));
                continue;
            }
        };
        let mut problems = Vec::new();
        let name = document.metadata.name.unwrap_or_default();
        if !is_dns_label(&name, 253) {
            problems.push((
                line_of(&doc, "metadata").unwrap_or(first_line),
                format!("metadata.name {name:?} must be a lowercase DNS name (a-z, 0-9, '-', '.'), at most 253 characters"),
            ));
        }
        let namespace = document
            .metadata
            .namespace
            .unwrap_or_else(|| "default".into());
        if !is_dns_label(&namespace, 63) || namespace.contains('.') {
            problems.push((
                line_of(&doc, "namespace").unwrap_or(first_line),
                format!("metadata.namespace {namespace:?} must be a DNS label"),
            ));
        }
        let spec = document.spec;
        for (field, count) in [("count", Some(spec.count)), ("thenCount", spec.then_count)] {
            if let Some(Err(r)) = count.map(|n| check_count_of(field, n)) {
                // The domain's words, with the field as the manifest spells it.
                problems.push((
                    line_of(&doc, field).unwrap_or(first_line),
                    format!("spec.{}", r.message),
                ));
            }
        }
        if spec.then_count.is_some() && spec.until.is_none() {
            problems.push((
                line_of(&doc, "thenCount").unwrap_or(first_line),
                "spec.thenCount needs spec.until: the moment the count becomes thenCount".into(),
            ));
        }
        for (field, value) in [
            ("organization", &spec.organization),
            ("product", &spec.product),
        ] {
            if let Err(r) = check_identifier(&format!("spec.{field}"), value) {
                problems.push((line_of(&doc, field).unwrap_or(first_line), r.message));
            }
        }
        if problems.is_empty() {
            loaded.manifests.push(Manifest {
                source: at(first_line),
                name,
                namespace,
                annotations: document.metadata.annotations,
                spec,
            });
        }
        for (line, message) in problems {
            loaded.errors.push(ManifestError::Invalid {
                at: at(line),
                message,
            });
        }
    }
}

/// A YAML error's document line, when known, and its message without the
/// "at line N column M" serde_yaml appends (the line is given separately).
fn yaml_fault(e: &serde_yaml::Error) -> (Option<usize>, String) {
    let message = e.to_string();
    let message = message
        .split(" at line ")
        .next()
        .unwrap_or(&message)
        .to_string();
    (e.location().map(|l| l.line()), message)
}

/// A Namespace document's name and labels.
fn read_namespace(value: &serde_yaml::Value) -> Result<(String, BTreeMap<String, String>), String> {
    let metadata = value.get("metadata");
    let name = metadata
        .and_then(|m| m.get("name"))
        .and_then(|n| n.as_str())
        .filter(|n| is_dns_label(n, 63) && !n.contains('.'))
        .ok_or("a Namespace needs metadata.name, a DNS label")?;
    let labels = match metadata.and_then(|m| m.get("labels")) {
        None => BTreeMap::new(),
        Some(labels) => serde_yaml::from_value(labels.clone())
            .map_err(|e| format!("Namespace {name}: metadata.labels: {e}"))?,
    };
    Ok((name.to_string(), labels))
}

/// A `LicenseAccount` document, checked as the API server and the operator
/// check it; a fault with its document line, when known.
fn read_account(doc: &str, api_version: &str) -> Result<LicenseAccount, (Option<usize>, String)> {
    if api_version != API_VERSION {
        return Err((
            line_of(doc, "apiVersion"),
            format!("apiVersion {api_version} is not served for {ACCOUNT_KIND}; use {API_VERSION}"),
        ));
    }
    let account: LicenseAccount = serde_yaml::from_str(doc).map_err(|e| yaml_fault(&e))?;
    let name = account.metadata.name.clone().unwrap_or_default();
    if !is_dns_label(&name, 253) {
        return Err((
            line_of(doc, "metadata"),
            format!(
                "metadata.name {name:?} must be a lowercase DNS name (a-z, 0-9, '-', '.'), at most 253 characters"
            ),
        ));
    }
    account
        .tenants()
        .check()
        .map_err(|fault| (line_of(doc, "tenants"), format!("spec.{fault}")))?;
    Ok(account)
}

/// The document line (1-based) of the first `key:`.
fn line_of(doc: &str, key: &str) -> Option<usize> {
    doc.lines()
        .position(|l| {
            l.trim_start()
                .strip_prefix(key)
                .is_some_and(|rest| rest.trim_start().starts_with(':'))
        })
        .map(|p| p + 1)
}

fn is_dns_label(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

fn check_duplicates(loaded: &mut Loaded) {
    let mut accounts: HashMap<String, Source> = HashMap::new();
    for (at, account) in &loaded.accounts {
        let name = account.metadata.name.clone().unwrap_or_default();
        if let Some(first) = accounts.get(&name) {
            loaded.errors.push(ManifestError::Duplicate {
                at: at.clone(),
                first: first.clone(),
                key: format!("{ACCOUNT_KIND} {name}"),
            });
        } else {
            accounts.insert(name, at.clone());
        }
    }
    // Found by names borrowed from the manifests, the first of each kept by
    // its place: for 100,000 manifests, no key or source is copied (the
    // copies were a tenth of loading, and the heap their freeing left the
    // next large allocation to tidy up).
    let manifests = &loaded.manifests;
    let mut by_target: hashbrown::HashMap<(&str, &str, &str), usize> =
        hashbrown::HashMap::with_capacity(manifests.len());
    let mut by_name: hashbrown::HashMap<(&str, &str), usize> =
        hashbrown::HashMap::with_capacity(manifests.len());
    let mut twice = Vec::new();
    for (i, m) in manifests.iter().enumerate() {
        let target = (
            m.spec.account(),
            m.spec.organization.as_str(),
            m.spec.product.as_str(),
        );
        // Names and namespaces are DNS names, without '/': the pair is
        // the resource.
        let name = (m.namespace.as_str(), m.name.as_str());
        let first = match (by_target.get(&target), by_name.get(&name)) {
            (Some(&first), _) => Some((
                first,
                format!("organization {} product {}", target.1, target.2),
            )),
            (None, Some(&first)) => Some((first, format!("DedicatedLicense {}", m.resource()))),
            (None, None) => None,
        };
        match first {
            Some((first, key)) => twice.push((i, first, key)),
            None => {
                by_target.insert(target, i);
                by_name.insert(name, i);
            }
        }
    }
    drop((by_target, by_name));
    if twice.is_empty() {
        return;
    }
    // In the order found, so in ascending places.
    let dropped: Vec<usize> = twice.iter().map(|&(i, ..)| i).collect();
    for (i, first, key) in twice {
        loaded.errors.push(ManifestError::Duplicate {
            at: loaded.manifests[i].source.clone(),
            first: loaded.manifests[first].source.clone(),
            key,
        });
    }
    let mut place = 0..;
    loaded.manifests.retain(|_| {
        place
            .next()
            .is_some_and(|here| dropped.binary_search(&here).is_err())
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Loaded {
        let mut loaded = Loaded::default();
        parse_file(Path::new("m.yaml"), text, &mut loaded);
        check_duplicates(&mut loaded);
        loaded
    }

    fn errors(l: &Loaded) -> Vec<String> {
        l.errors.iter().map(ToString::to_string).collect()
    }

    const GOOD: &str = "apiVersion: licensor.dev/v1alpha1
kind: DedicatedLicense
metadata: {name: qa, namespace: licenses}
spec:
  organization: qa-team
  product: TestOps
  count: 5
";

    #[test]
    fn multi_document_files_keep_their_line_numbers() {
        let text = format!(
            "# leading comment\n---\n{GOOD}---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: x}}\n---\n{}",
            GOOD.replace("qa-team", "dev-team")
                .replace("name: qa", "name: dev")
        );
        let l = parse(&text);
        assert!(l.errors.is_empty(), "{:?}", errors(&l));
        assert_eq!(l.manifests.len(), 2);
        assert_eq!(l.manifests[0].source.line, 3);
        assert_eq!(l.manifests[1].source.line, 15);
        assert_eq!(
            l.notes,
            vec!["m.yaml:11: skipped ConfigMap (v1), not a licensor.dev/v1alpha1 DedicatedLicense"]
        );
    }

    #[test]
    fn unknown_field_names_file_and_line() {
        let l = parse(&GOOD.replace("  count: 5\n", "  count: 5\n  colour: red\n"));
        let e = errors(&l);
        assert_eq!(e.len(), 1);
        assert!(e[0].starts_with("m.yaml:8: "), "{e:?}");
        assert!(e[0].contains("unknown field `colour`"), "{e:?}");
    }

    #[test]
    fn negative_string_and_huge_counts_are_errors_on_the_count_line() {
        for (count, expect) in [
            ("-1", "outside 0..=1000000"),
            ("\"5\"", "invalid type: string \"5\""),
            ("10000000", "outside 0..=1000000"),
        ] {
            let l = parse(&GOOD.replace("count: 5", &format!("count: {count}")));
            let e = errors(&l);
            assert_eq!(e.len(), 1, "{count}: {e:?}");
            assert!(e[0].starts_with("m.yaml:7: "), "{count}: {e:?}");
            assert!(e[0].contains(expect), "{count}: {e:?}");
        }
    }

    #[test]
    fn malformed_yaml_points_at_the_line() {
        let l = parse(&GOOD.replace("  product: TestOps", "  product: [TestOps"));
        let e = errors(&l);
        assert_eq!(e.len(), 1);
        assert!(e[0].starts_with("m.yaml:"), "{e:?}");
    }

    #[test]
    fn each_duplicate_is_reported_where_it_is_and_only_the_first_is_kept() {
        let docs = [
            GOOD.to_string(),
            GOOD.replace("name: qa", "name: qa2"),
            GOOD.replace("qa-team", "other-team"),
            GOOD.replace("name: qa", "name: qa3")
                .replace("qa-team", "third-team"),
            GOOD.to_string(),
        ];
        let l = parse(&docs.join("---\n"));
        assert_eq!(
            errors(&l),
            vec![
                "m.yaml:9: organization qa-team product TestOps is declared twice; the first is at m.yaml:1",
                "m.yaml:17: DedicatedLicense licenses/qa is declared twice; the first is at m.yaml:1",
                "m.yaml:33: organization qa-team product TestOps is declared twice; the first is at m.yaml:1",
            ]
        );
        let kept: Vec<(String, usize)> = l
            .manifests
            .iter()
            .map(|m| (m.resource(), m.source.line))
            .collect();
        assert_eq!(
            kept,
            [
                ("licenses/qa".to_string(), 1),
                ("licenses/qa3".to_string(), 25)
            ]
        );
    }

    #[test]
    fn duplicate_organization_and_product_is_an_error() {
        let l = parse(&format!(
            "{GOOD}---\n{}",
            GOOD.replace("name: qa", "name: qa2")
        ));
        let e = errors(&l);
        assert_eq!(
            e,
            vec![
                "m.yaml:9: organization qa-team product TestOps is declared twice; the first is at m.yaml:1"
            ]
        );
    }
}
