//! What a release is made of, checked as someone who downloads it would
//! check it: `make image`'s image and `make dist`'s files (static binaries
//! for x86_64 and aarch64 Linux, the image for both as one index, a
//! CycloneDX SBOM per binary, SHA256SUMS); the release workflow and the
//! pull-request example as actionlint (with shellcheck) reads them; and the
//! pull-request example's install step, run against the release served on
//! loopback, with the right checksum and a wrong one.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use sha2::{Digest, Sha256};

const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The release's targets and the OCI platform each is for.
const TARGETS: [(&str, &str); 2] = [
    ("x86_64-unknown-linux-musl", "amd64"),
    ("aarch64-unknown-linux-musl", "arm64"),
];

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A build output the Makefile writes: the path `variable` names, or where
/// `make <target>` puts it.
fn built(variable: &str, default: &str, target: &str) -> PathBuf {
    let path = std::env::var_os(variable)
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(default));
    assert!(
        path.exists(),
        "{}: missing; `make {target}` builds it",
        path.display()
    );
    path
}

/// `make image`'s archive (the machine's own platform).
fn image() -> PathBuf {
    built(
        "LICENSOR_TEST_IMAGE",
        "target/image/licensor.oci.tar",
        "image",
    )
}

/// `make dist`'s directory.
fn dist() -> PathBuf {
    built("LICENSOR_TEST_DIST", "target/dist", "dist")
}

fn tarball(target: &str) -> String {
    format!("licensor-{VERSION}-{target}.tar.gz")
}

fn run(command: &mut Command) -> Output {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    assert!(
        out.status.success(),
        "{command:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn sha256(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// One member of an archive, read with tar.
fn member_bytes(archive: &Path, name: &str) -> Vec<u8> {
    run(Command::new("tar").arg("-xOf").arg(archive).arg(name)).stdout
}

fn member(archive: &Path, name: &str) -> Value {
    serde_json::from_slice(&member_bytes(archive, name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn blob_bytes(archive: &Path, digest: &Value) -> Vec<u8> {
    let digest = digest.as_str().unwrap().strip_prefix("sha256:").unwrap();
    member_bytes(archive, &format!("blobs/sha256/{digest}"))
}

fn blob(archive: &Path, digest: &Value) -> Value {
    serde_json::from_slice(&blob_bytes(archive, digest)).unwrap()
}

/// The image's platforms, each with its config and the one file of its one
/// layer (the binary at /licensor).
fn platforms(archive: &Path) -> Vec<(String, Value, Vec<u8>)> {
    let index = member(archive, "index.json");
    let nested = blob(archive, &index["manifests"][0]["digest"]);
    nested["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let manifest = blob(archive, &m["digest"]);
            let config = blob(archive, &manifest["config"]["digest"]);
            assert_eq!(m["platform"]["architecture"], config["architecture"]);
            let layers = manifest["layers"].as_array().unwrap();
            assert_eq!(layers.len(), 1, "one layer: the binary");
            let dir = tempfile::tempdir().unwrap();
            let layer = dir.path().join("layer.tar.gz");
            std::fs::write(&layer, blob_bytes(archive, &layers[0]["digest"])).unwrap();
            let binary = member_bytes(&layer, "licensor");
            let arch = m["platform"]["architecture"].as_str().unwrap().to_string();
            (arch, config, binary)
        })
        .collect()
}

#[test]
fn the_image_is_the_one_the_dockerfile_describes() {
    // The Dockerfile's last stage, read here on its own.
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    let stage = dockerfile.rsplit("\nFROM ").next().unwrap();
    let say = |keyword: &str| -> Vec<String> {
        stage
            .lines()
            .filter_map(|l| l.strip_prefix(&format!("{keyword} ")))
            .map(str::to_string)
            .collect()
    };
    assert!(stage.starts_with("scratch"), "{stage}");

    // Named as the chart's defaults name the image they run.
    let read = |path: &str| -> Value {
        serde_yaml::from_str(&std::fs::read_to_string(repo().join(path)).unwrap()).unwrap()
    };
    let (values, chart) = (
        read("charts/licensor/values.yaml"),
        read("charts/licensor/Chart.yaml"),
    );
    let pulled = format!(
        "{}:{}",
        values["image"]["repository"].as_str().unwrap(),
        chart["appVersion"].as_str().unwrap()
    );
    for archive in [image(), dist().join("licensor.oci.tar")] {
        let index = member(&archive, "index.json");
        assert_eq!(
            index["manifests"][0]["annotations"]["io.containerd.image.name"],
            pulled.as_str()
        );
        let platforms = platforms(&archive);
        assert!(!platforms.is_empty());
        for (_, config, _) in platforms {
            let c = &config["config"];
            assert_eq!(c["User"], say("USER")[0], "{config}");
            let ports: Vec<String> = say("EXPOSE").iter().map(|p| format!("{p}/tcp")).collect();
            let exposed: Vec<String> = c["ExposedPorts"]
                .as_object()
                .unwrap()
                .keys()
                .cloned()
                .collect();
            assert_eq!(exposed, ports);
            let exec = |k: &str| serde_json::from_str::<Value>(&say(k)[0]).unwrap();
            assert_eq!(c["Entrypoint"], exec("ENTRYPOINT"));
            assert_eq!(c["Cmd"], exec("CMD"));
            for label in ["source", "version", "revision", "licenses"] {
                let value = &c["Labels"][format!("org.opencontainers.image.{label}")];
                assert!(
                    value.as_str().is_some_and(|v| !v.is_empty()),
                    "{label}: {config}"
                );
            }
            assert_eq!(c["Labels"]["org.opencontainers.image.version"], VERSION);
            assert_eq!(
                c["Labels"]["org.opencontainers.image.licenses"],
                env!("CARGO_PKG_LICENSE")
            );
            assert_eq!(config["os"], "linux");
        }
    }
}

/// An ELF file's machine (62 x86_64, 183 aarch64), and whether it asks for
/// a dynamic loader (a PT_INTERP program header).
fn elf(bytes: &[u8]) -> (u16, bool) {
    assert_eq!(&bytes[..4], b"\x7fELF", "not an ELF file");
    assert_eq!((bytes[4], bytes[5]), (2, 1), "64-bit little-endian");
    let u16_at = |o: usize| u16::from_le_bytes(bytes[o..o + 2].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap());
    let (offset, size, count) = (u64_at(32) as usize, u16_at(54) as usize, u16_at(56));
    let interp = (0..count as usize).any(|i| {
        let at = offset + i * size;
        u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()) == 3
    });
    (u16_at(18), interp)
}

#[test]
fn a_release_has_both_platforms_and_its_checksums_verify() {
    let dist = dist();
    let mut expected: BTreeSet<String> = ["licensor.oci.tar", "SHA256SUMS"]
        .into_iter()
        .map(str::to_string)
        .collect();
    for (target, _) in TARGETS {
        expected.insert(tarball(target));
        expected.insert(format!("licensor-{VERSION}-{target}.cdx.json"));
    }
    let files: BTreeSet<String> = std::fs::read_dir(&dist)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(files, expected, "{}", dist.display());

    // The checksums verify as a user checks them, and cover every file.
    let check = run(Command::new("sha256sum")
        .args(["--check", "--strict", "SHA256SUMS"])
        .current_dir(&dist));
    let verified: BTreeSet<String> = String::from_utf8(check.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            l.strip_suffix(": OK")
                .unwrap_or_else(|| panic!("{l}"))
                .into()
        })
        .collect();
    expected.remove("SHA256SUMS");
    assert_eq!(verified, expected);

    let images = platforms(&dist.join("licensor.oci.tar"));
    let architectures: BTreeSet<&str> = images.iter().map(|(a, _, _)| a.as_str()).collect();
    assert_eq!(architectures, BTreeSet::from(["amd64", "arm64"]));

    for (target, arch) in TARGETS {
        let dir = tempfile::tempdir().unwrap();
        run(Command::new("tar")
            .arg("-xzf")
            .arg(dist.join(tarball(target)))
            .arg("-C")
            .arg(dir.path()));
        let top = dir.path().join(format!("licensor-{VERSION}-{target}"));
        let mut inside: Vec<String> = std::fs::read_dir(&top)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        inside.sort();
        assert_eq!(inside, ["LICENSE", "README.md", "licensor"], "{target}");

        let binary = std::fs::read(top.join("licensor")).unwrap();
        let machine = if arch == "amd64" { 62 } else { 183 };
        assert_eq!(elf(&binary), (machine, false), "{target}: a static ELF");
        let (_, _, in_image) = images.iter().find(|(a, _, _)| a == arch).unwrap();
        assert_eq!(
            sha256(in_image),
            sha256(&binary),
            "{target}: the image's binary is the tarball's"
        );

        // It runs, and does a real job on the embedded store (SQLite is C,
        // built by each target's own C compiler): aarch64 under qemu.
        let out = run(Command::new(repo().join("tests/static-binary.sh"))
            .arg(top.join("licensor"))
            .env(
                "LICENSOR_RUN_WITH",
                if arch == "amd64" { "" } else { "qemu-aarch64" },
            ));
        println!("{target}: {}", String::from_utf8_lossy(&out.stdout).trim());
    }
}

/// The crates linked into the binary for `target`, as `cargo tree` lists
/// them (no dev-only, build-only or procedural-macro ones): (name, version).
fn linked_into(target: &str) -> BTreeSet<(String, String)> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = run(Command::new(cargo)
        .args([
            "tree",
            "--locked",
            "--offline",
            "--edges",
            "normal,no-proc-macro",
        ])
        .args(["--target", target, "--prefix", "none", "--format", "{p}"])
        .current_dir(repo()));
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            let name = words.next()?;
            let version = words.next()?.strip_prefix('v')?;
            (name != "licensor").then(|| (name.to_string(), version.to_string()))
        })
        .collect()
}

#[test]
fn each_sbom_lists_every_crate_its_binary_is_built_from() {
    let lock: toml::Value =
        toml::from_str(&std::fs::read_to_string(repo().join("Cargo.lock")).unwrap()).unwrap();
    let checksums: std::collections::BTreeMap<(String, String), String> = lock["package"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| {
            let key = (
                p["name"].as_str()?.to_string(),
                p["version"].as_str()?.to_string(),
            );
            Some((key, p.get("checksum")?.as_str()?.to_string()))
        })
        .collect();
    for (target, _) in TARGETS {
        let path = dist().join(format!("licensor-{VERSION}-{target}.cdx.json"));
        let sbom: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(sbom["bomFormat"], "CycloneDX");
        assert_eq!(sbom["metadata"]["component"]["name"], "licensor");
        assert_eq!(sbom["metadata"]["component"]["version"], VERSION);
        let mut listed = BTreeSet::new();
        for c in sbom["components"].as_array().unwrap() {
            let key = (
                c["name"].as_str().unwrap().to_string(),
                c["version"].as_str().unwrap().to_string(),
            );
            assert_eq!(
                c["purl"].as_str().unwrap(),
                format!("pkg:cargo/{}@{}", key.0, key.1)
            );
            // Each crate's hash is the one Cargo.lock pins.
            let hash = &c["hashes"][0];
            assert_eq!(hash["alg"], "SHA-256", "{c}");
            assert_eq!(
                hash["content"].as_str(),
                checksums.get(&key).map(String::as_str),
                "{key:?}"
            );
            listed.insert(key);
        }
        // Every crate in the binary is listed. (cargo-cyclonedx reads
        // Cargo's resolve, which also holds build tools and some optional
        // crates that are not compiled: listed, but not in the binary.)
        let linked = linked_into(target);
        assert!(linked.len() > 100, "{target}: {} crates", linked.len());
        let unlisted: Vec<_> = linked.difference(&listed).collect();
        assert!(
            unlisted.is_empty(),
            "{target}: not in the SBOM: {unlisted:?}"
        );
        println!(
            "{target}: {} crates listed, all {} linked into the binary among them",
            listed.len(),
            linked.len()
        );
    }
}

/// actionlint, built from its pinned Go module.
fn actionlint(files: &[&Path]) -> Output {
    let tool = run(Command::new(repo().join("tests/go-tool.sh"))
        .arg(repo().join("tests/actionlint"))
        .arg("github.com/rhysd/actionlint/cmd/actionlint"));
    let tool = String::from_utf8(tool.stdout).unwrap();
    Command::new(tool.trim())
        .args(files)
        .current_dir(repo())
        .output()
        .unwrap()
}

#[test]
fn the_workflows_pass_actionlint_and_shellcheck() {
    // actionlint checks the shell of every `run:` with shellcheck when it
    // finds it, and says nothing when it does not.
    run(Command::new("shellcheck").arg("--version"));
    let workflows = [
        repo().join(".github/workflows/release.yml"),
        repo().join("examples/gitops/pull-request-check.yaml"),
    ];
    let out = actionlint(&workflows.iter().map(PathBuf::as_path).collect::<Vec<_>>());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // And it would say so: the release workflow with a misspelt key, and
    // with a shell mistake.
    let release = std::fs::read_to_string(&workflows[0]).unwrap();
    for (broken, said) in [
        (release.replace("runs-on:", "runs_on:"), "runs_on"),
        (
            release.replace("sha256sum -c SHA256SUMS", "cd $MISSING_DIR"),
            "SC2086",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("release.yml");
        std::fs::write(&path, broken).unwrap();
        let out = actionlint(&[&path]);
        let report = String::from_utf8_lossy(&out.stdout);
        assert!(
            !out.status.success() && report.contains(said),
            "{said}: {report}"
        );
    }
}

/// Serves `root` over HTTP on loopback (GET only), counting requests.
fn serve(root: PathBuf) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = count.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut request = String::new();
            let mut reader = BufReader::new(&stream);
            if reader.read_line(&mut request).is_err() {
                continue;
            }
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                line.clear();
            }
            let path = request.split_whitespace().nth(1).unwrap_or("/");
            let file = root.join(path.trim_start_matches('/'));
            let _ = match std::fs::read(&file) {
                Ok(body) if !path.contains("..") => stream
                    .write_all(
                        format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                            body.len()
                        )
                        .as_bytes(),
                    )
                    .and_then(|_| stream.write_all(&body)),
                _ => stream.write_all(
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                ),
            };
        }
    });
    (address, count)
}

#[test]
fn the_pull_request_example_installs_a_release_it_has_checked() {
    let example: Value = serde_yaml::from_str(
        &std::fs::read_to_string(repo().join("examples/gitops/pull-request-check.yaml")).unwrap(),
    )
    .unwrap();
    let step = example["jobs"]["plan"]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "Install licensor")
        .expect("an install step")
        .clone();
    assert_eq!(
        step["env"]["VERSION"], VERSION,
        "the example pins this release"
    );
    assert!(
        step["env"]["RELEASES"]
            .as_str()
            .unwrap()
            .starts_with("https://"),
        "{step}"
    );

    // The release, where the example downloads it from (served here).
    let releases = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(dist(), releases.path().join(format!("v{VERSION}"))).unwrap();
    let (url, requests) = serve(releases.path().to_path_buf());
    let sums = std::fs::read_to_string(dist().join("SHA256SUMS")).unwrap();
    let x86 = tarball(TARGETS[0].0);
    let right = sums
        .lines()
        .find_map(|l| l.strip_suffix(&format!("  {x86}")))
        .expect("the tarball in SHA256SUMS");

    // As GitHub runs a step's `run:` (bash -e -o pipefail), with its env.
    let install = |sha256: &str| {
        let runner = tempfile::tempdir().unwrap();
        let github_path = runner.path().join("github_path");
        std::fs::write(&github_path, "").unwrap();
        let temp = runner.path().join("temp");
        std::fs::create_dir(&temp).unwrap();
        let out = Command::new("bash")
            .args(["--noprofile", "--norc", "-eo", "pipefail", "-c"])
            .arg(step["run"].as_str().unwrap())
            .env("VERSION", VERSION)
            .env("SHA256", sha256)
            .env("RELEASES", &url)
            .env("RUNNER_TEMP", &temp)
            .env("GITHUB_PATH", &github_path)
            .output()
            .unwrap();
        let added = std::fs::read_to_string(&github_path).unwrap();
        (out, added, runner)
    };

    let (out, added, _runner) = install(right);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().last(),
        Some(format!("licensor {VERSION}").as_str()),
        "{out:?}"
    );
    let on_path = Path::new(added.trim()).join("licensor");
    let version = run(Command::new(&on_path).arg("--version"));
    assert_eq!(
        String::from_utf8_lossy(&version.stdout).trim(),
        format!("licensor {VERSION}")
    );
    assert_eq!(requests.load(std::sync::atomic::Ordering::SeqCst), 1);

    // A download that is not the release is refused before it is unpacked
    // or put on PATH.
    let wrong = sha256(b"something else");
    let (out, added, runner) = install(&wrong);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("FAILED"),
        "{out:?}"
    );
    assert_eq!(added, "");
    let unpacked: Vec<_> = std::fs::read_dir(runner.path().join("temp"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(unpacked, [std::ffi::OsString::from(x86)]);
}
