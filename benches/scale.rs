//! Scale benchmark: plan and apply N manifests against an embedded store
//! holding N allocations (N organizations). Prints wall time per phase and
//! peak memory, in-process (the library) and end to end (the `licensor`
//! binary), and each command's own CPU time and peak RSS, so that `plan`
//! can be set against `validate` on the same files in one run.
//!
//! Run with `make bench` (N=100,000) or `cargo bench --bench scale` (N=10,000
//! unless `N=...` is set).

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

/// What one run of the binary cost: wall time, its own CPU time (user and
/// system) and its peak resident size, from `wait4` on that child alone.
struct Run {
    wall: Duration,
    cpu: Duration,
    peak_mib: f64,
    code: i32,
}

fn run_child(mut command: Command) -> Run {
    use std::os::unix::process::ExitStatusExt;
    let start = Instant::now();
    // Waited for below with wait4, which std's Child cannot do.
    #[allow(clippy::zombie_processes)]
    let child = command
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to fill.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: the pid is our own child, not yet waited for; both pointers
    // point to live, writable values.
    let pid = unsafe { libc::wait4(child.id() as libc::pid_t, &mut status, 0, &mut usage) };
    assert_eq!(pid, child.id() as libc::pid_t, "wait4");
    let wall = start.elapsed();
    let time = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    Run {
        wall,
        cpu: time(usage.ru_utime) + time(usage.ru_stime),
        peak_mib: usage.ru_maxrss as f64 / 1024.0,
        code: std::process::ExitStatus::from_raw(status)
            .code()
            .unwrap_or(-1),
    }
}

/// How many times `validate` and `plan` run, in pairs, for their ratio.
const PAIRS: usize = 5;

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

fn cli(db: &Path, args: &[&str], dir: &Path) -> Run {
    let mut command = Command::new(env!("CARGO_BIN_EXE_licensor"));
    command
        .arg("--backend")
        .arg(format!("sqlite:{}", db.display()))
        .args(args)
        .arg("-f")
        .arg(dir)
        .args(["-o", "json"]);
    run_child(command)
}

fn validate(dir: &Path) -> Run {
    let mut command = Command::new(env!("CARGO_BIN_EXE_licensor"));
    command.arg("validate").arg("-f").arg(dir);
    run_child(command)
}

fn print_run(name: &str, run: &Run, note: &str) {
    println!(
        "cli      {name:<14} {:>8.1} ms wall {:>8.1} ms CPU {:>7.1} MiB peak  ({note})",
        ms(run.wall),
        ms(run.cpu),
        run.peak_mib
    );
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

    // End to end first, while this process is small: a child's peak RSS
    // starts from its parent's at the fork.
    let cli_db = tmp.path().join("bench-cli.db");
    seed(&cli_db, &fixture_path);
    // `plan` writes nothing, so the pair runs again on the same store: the
    // ratio is the median of PAIRS pairs run one after the other, each pair
    // as close in time as two runs can be (on a shared machine a command's
    // CPU time moves by 15% from one minute to the next).
    let mut pairs: Vec<(Run, Run)> = (0..PAIRS)
        .map(|_| {
            let checked = validate(&dir);
            assert_eq!(checked.code, 0, "the manifests are valid");
            let planned = cli(&cli_db, &["plan"], &dir);
            assert_eq!(planned.code, 2, "plan should report changes");
            (checked, planned)
        })
        .collect();
    let ratio = |(v, p): &(Run, Run)| p.cpu.as_secs_f64() / v.cpu.as_secs_f64();
    pairs.sort_by(|a, b| ratio(a).total_cmp(&ratio(b)));
    let (lowest, highest) = (ratio(&pairs[0]), ratio(&pairs[PAIRS - 1]));
    let (checked, planned) = pairs.swap_remove(PAIRS / 2);
    let applied = cli(&cli_db, &["apply"], &dir);
    assert_eq!(applied.code, 0, "apply should succeed");
    let replanned = cli(&cli_db, &["plan"], &dir);
    assert_eq!(replanned.code, 0, "nothing left to change");
    print_run("validate", &checked, "exit 0");
    print_run("plan", &planned, "exit 2");
    print_run("apply", &applied, &format!("exit 0, plan + {n} writes"));
    print_run("plan again", &replanned, "exit 0, in sync");
    // The targets are set for one size each: the library's at 10,000
    // manifests, the command's at 100,000 (`make bench`).
    let target = |at: usize, text: &str| {
        if n == at {
            format!("  (target {text})")
        } else {
            String::new()
        }
    };
    println!(
        "cli      plan / validate CPU {:.2}  (median of {PAIRS} pairs, {lowest:.2} to {highest:.2}){}",
        planned.cpu.as_secs_f64() / checked.cpu.as_secs_f64(),
        target(100_000, "<= 1.2")
    );
    println!(
        "cli      plan peak RSS  {:>8.1} MiB{}",
        planned.peak_mib,
        target(100_000, "< 150 MiB")
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
    let directory = loaded.directory();
    let desired: Vec<_> = loaded
        .manifests
        .into_iter()
        .map(|m| desired(m, "default", &directory))
        .collect();
    let t = Instant::now();
    let opts = Options {
        prune: false,
        instance: "default".into(),
        role: Role::AccountAdmin,
        keep_writes: true,
        now: chrono::Utc::now(),
    };
    let mut p = plan(desired, snapshot, &opts);
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
        "library  plan total     {:>8.1} ms{}",
        ms(load + observe + planning),
        target(10_000, "< 1000 ms")
    );
    println!(
        "library  apply          {:>8.1} ms   ({:.0} writes/s){}",
        ms(applying),
        n as f64 / applying.as_secs_f64(),
        target(10_000, "< 5000 ms")
    );
    println!(
        "library  peak RSS       {:>8.1} MiB{}",
        peak_rss_mib(),
        target(10_000, "< 200 MiB")
    );
}
