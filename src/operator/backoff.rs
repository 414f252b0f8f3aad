//! Per-object exponential backoff for passes the backend could not serve
//! or the Kubernetes API refused: the base delay doubled per consecutive
//! failure, capped, and reset by the next pass that succeeds.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// Consecutive failures per object (`namespace/name`).
pub struct Backoff {
    base: Duration,
    cap: Duration,
    failures: Mutex<HashMap<String, u32>>,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Backoff {
        Backoff {
            base,
            cap,
            failures: Mutex::default(),
        }
    }

    /// The delay before retrying `key` after this failure.
    pub fn failed(&self, key: &str) -> Duration {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let n = failures.entry(key.to_string()).or_insert(0);
        let delay = delay(self.base, self.cap, *n);
        *n = n.saturating_add(1);
        delay
    }

    /// `key` succeeded: its next failure waits the base delay again.
    pub fn succeeded(&self, key: &str) {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }
}

/// `base` doubled per earlier failure, capped at `cap`.
pub fn delay(base: Duration, cap: Duration, failures: u32) -> Duration {
    base.saturating_mul(2u32.saturating_pow(failures.min(31)))
        .min(cap)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_and_a_success_resets_it() {
        let (base, cap) = (Duration::from_secs(1), Duration::from_secs(60));
        let delays: Vec<u64> = (0..9).map(|n| delay(base, cap, n).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(delay(base, cap, u32::MAX), cap);
        let b = Backoff::new(base, cap);
        let seen: Vec<u64> = (0..3).map(|_| b.failed("ns/a").as_secs()).collect();
        assert_eq!(seen, [1, 2, 4]);
        assert_eq!(b.failed("ns/other").as_secs(), 1, "per object");
        b.succeeded("ns/a");
        assert_eq!(b.failed("ns/a").as_secs(), 1);
    }
}
