//! Scale benchmark: plan and apply 10,000 manifests against an embedded store
//! holding 10,000 allocations. Prints wall time per phase and peak memory,
//! in-process (the library) and end to end (the `licensor` binary).
//!
//! Run with `make bench` (or `cargo bench --bench scale`); `N=...` changes the size.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use licensor::apply::execute;
use licensor::backend::Backend;
use licensor::backend::local::StoreBackend;
use licensor::cli::desired;
use licensor::domain::Role;
use licensor::manifest;
use licensor::plan::{Options, plan};

fn fixture(n: usize) -> String {
    let mut s = format!(
        "account: acme\nproducts:\n  - {{name: TestOps, total: {}}}\norganizations:\n",
        n * 6
    );
    for i in 0..n {
        let _ = writeln!(
            s,
            "  - {{id: org-{i}, allocations: [{{product: TestOps, dedicated: 5, inUse: 1}}]}}"
        );
    }
    s
}

/// n manifests in files of 100 documents; even ones raise 5 -> 6, odd ones
/// lower 5 -> 4, so every manifest is a change.
fn manifests(dir: &Path, n: usize) {
    std::fs::create_dir_all(dir).unwrap();
    for file in 0..n.div_ceil(100) {
        let mut s = String::new();
        for i in file * 100..((file + 1) * 100).min(n) {
            let count = if i % 2 == 0 { 6 } else { 4 };
            let _ = write!(
                s,
                "---\napiVersion: licensor.dev/v1alpha1\nkind: DedicatedLicense\nmetadata:\n  name: org-{i}\n  namespace: licenses\nspec:\n  organization: org-{i}\n  product: TestOps\n  count: {count}\n"
            );
        }
        std::fs::write(dir.join(format!("licenses-{file:03}.yaml")), s).unwrap();
    }
}

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

fn children_peak_rss_mib() -> f64 {
    nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)
        .map_or(f64::NAN, |u| u.max_rss() as f64 / 1024.0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn seed(db: &Path, fixture_path: &Path) {
    let out = Command::new(env!("CARGO_BIN_EXE_licensor"))
        .arg("--backend")
        .arg(format!("sqlite:{}", db.display()))
        .args(["backend", "seed", "-f"])
        .arg(fixture_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn cli(db: &Path, args: &[&str], dir: &Path) -> (Duration, i32) {
    let start = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_licensor"))
        .arg("--backend")
        .arg(format!("sqlite:{}", db.display()))
        .args(args)
        .arg("-f")
        .arg(dir)
        .args(["-o", "json"])
        .output()
        .unwrap();
    (start.elapsed(), out.status.code().unwrap_or(-1))
}

fn main() {
    let n: usize = std::env::var("N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let tmp = tempfile::tempdir().unwrap();
    let db = tmp.path().join("bench.db");
    let fixture_path = tmp.path().join("account.yaml");
    let dir = tmp.path().join("manifests");
    std::fs::write(&fixture_path, fixture(n)).unwrap();
    manifests(&dir, n);
    println!(
        "scale benchmark: {n} manifests, {n} allocations, {} cores",
        std::thread::available_parallelism().map_or(1, |p| p.get())
    );

    // In process: the library phases.
    seed(&db, &fixture_path);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let backend = StoreBackend::new(
        licensor::backend::store::Store::open(&db).unwrap(),
        None,
        None,
    );
    let t = Instant::now();
    let loaded = manifest::load(std::slice::from_ref(&dir));
    let load = t.elapsed();
    assert!(loaded.errors.is_empty());
    let t = Instant::now();
    let snapshot = rt.block_on(backend.snapshot()).unwrap();
    let observe = t.elapsed();
    let desired: Vec<_> = loaded
        .manifests
        .iter()
        .map(|m| desired(m, "default"))
        .collect();
    let t = Instant::now();
    let opts = Options {
        prune: false,
        instance: "default".into(),
        role: Role::AccountAdmin,
    };
    let mut p = plan(&desired, &snapshot, &opts);
    let planning = t.elapsed();
    assert_eq!(p.changes.iter().filter(|c| c.write.is_some()).count(), n);
    let t = Instant::now();
    rt.block_on(execute(&mut p, &backend)).unwrap();
    let applying = t.elapsed();
    assert!(!p.has_errors());
    println!("library  load manifests {:>8.1} ms", ms(load));
    println!("library  read snapshot  {:>8.1} ms", ms(observe));
    println!("library  plan           {:>8.1} ms", ms(planning));
    println!(
        "library  plan total     {:>8.1} ms   (target < 1000 ms)",
        ms(load + observe + planning)
    );
    println!(
        "library  apply          {:>8.1} ms   (target < 5000 ms, {:.0} writes/s)",
        ms(applying),
        n as f64 / applying.as_secs_f64()
    );
    println!(
        "library  peak RSS       {:>8.1} MiB  (target < 200 MiB)",
        peak_rss_mib()
    );

    // End to end: the binary a user runs, on a fresh file.
    drop(backend);
    let db = tmp.path().join("bench-cli.db");
    seed(&db, &fixture_path);
    let (plan_t, plan_code) = cli(&db, &["plan"], &dir);
    assert_eq!(plan_code, 2, "plan should report changes");
    let (apply_t, apply_code) = cli(&db, &["apply"], &dir);
    assert_eq!(apply_code, 0, "apply should succeed");
    let (replan_t, replan_code) = cli(&db, &["plan"], &dir);
    assert_eq!(replan_code, 0, "nothing left to change");
    println!("cli      plan           {:>8.1} ms   (exit 2)", ms(plan_t));
    println!(
        "cli      apply          {:>8.1} ms   (exit 0, plan + {n} writes)",
        ms(apply_t)
    );
    println!(
        "cli      plan again     {:>8.1} ms   (exit 0, in sync)",
        ms(replan_t)
    );
    println!(
        "cli      peak RSS       {:>8.1} MiB  (largest child)",
        children_peak_rss_mib()
    );
}
