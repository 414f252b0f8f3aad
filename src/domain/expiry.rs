//! Temporary allocations (DESIGN §11): a resource may say until when its
//! count stands and what it becomes then. Time is an input here, never
//! read: the planner is given the moment it plans for.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// When a temporary allocation ends: from `until` on, the count asked for
/// is `then_count` (0 by default: a revoke), with R4-R6 as for any change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Expiry {
    /// RFC 3339; from this moment on the count is `thenCount`.
    #[schema(value_type = String, format = DateTime)]
    pub until: DateTime<Utc>,
    #[schema(minimum = 0, maximum = 1_000_000)]
    #[serde(deserialize_with = "super::whole_number")]
    pub then_count: i64,
}

impl Expiry {
    /// Whether it has ended at `now`: `until` itself is the first moment of
    /// `then_count`.
    pub fn passed(&self, now: DateTime<Utc>) -> bool {
        now >= self.until
    }

    /// The count a resource asking for `count` with `expiry` asks for at
    /// `now`: the one rule, for the CLI, the operator and admission.
    pub fn count_at(expiry: Option<&Expiry>, count: i64, now: DateTime<Utc>) -> i64 {
        match expiry {
            Some(e) if e.passed(now) => e.then_count,
            _ => count,
        }
    }

    /// The ending as planned for `now`.
    pub fn at(&self, now: DateTime<Utc>) -> Ending {
        Ending {
            until: self.until,
            then_count: self.then_count,
            passed: self.passed(now),
        }
    }

    /// `until` as the stores keep it: RFC 3339 with as many fractional
    /// digits as it has, so that it reads back equal.
    pub fn until_stored(&self) -> String {
        self.until
            .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
    }

    /// An expiry as the stores keep it (both columns or neither; the
    /// columns' CHECK says so).
    pub fn from_stored(until: Option<&str>, then_count: Option<i64>) -> Option<Expiry> {
        Some(Expiry {
            until: DateTime::parse_from_rfc3339(until?).ok()?.to_utc(),
            then_count: then_count?,
        })
    }

    /// `until` as plans, status and the page print it (RFC 3339, seconds).
    pub fn until_text(&self) -> String {
        self.until
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    }

    /// In words, at `now`: `expires <time> (in <duration>), then <n>`, or
    /// `expired <time> (<duration> ago), then <n>`.
    pub fn describe(&self, now: DateTime<Utc>) -> String {
        let (verb, when) = if self.passed(now) {
            ("expired", format!("{} ago", span(now - self.until)))
        } else {
            ("expires", format!("in {}", span(self.until - now)))
        };
        format!(
            "{verb} {} ({when}), then {}",
            self.until_text(),
            self.then_count
        )
    }
}

/// A temporary allocation's end as a plan shows it: when, to what, and
/// whether it had come at the moment planned for (then the count planned is
/// `then_count`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Ending {
    pub until: DateTime<Utc>,
    pub then_count: i64,
    pub passed: bool,
}

impl Ending {
    pub fn expiry(&self) -> Expiry {
        Expiry {
            until: self.until,
            then_count: self.then_count,
        }
    }
}

/// A duration in its two largest units: `2d 3h`, `3h 20m`, `45s`.
pub fn span(d: chrono::TimeDelta) -> String {
    let s = d.num_seconds().max(0);
    let units = [(86_400, "d"), (3_600, "h"), (60, "m"), (1, "s")];
    let parts: Vec<String> = units
        .iter()
        .scan(s, |left, &(size, name)| {
            let n = *left / size;
            *left %= size;
            Some((n, name))
        })
        .skip_while(|(n, _)| *n == 0)
        .take(2)
        .filter(|(n, _)| *n > 0)
        .map(|(n, name)| format!("{n}{name}"))
        .collect();
    if parts.is_empty() {
        "0s".to_string()
    } else {
        parts.join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn the_count_changes_at_until_itself() {
        let e = Expiry {
            until: at("2026-12-08T00:00:00Z"),
            then_count: 2,
        };
        assert_eq!(Expiry::count_at(Some(&e), 9, at("2026-12-07T23:59:59Z")), 9);
        assert_eq!(Expiry::count_at(Some(&e), 9, at("2026-12-08T00:00:00Z")), 2);
        assert_eq!(Expiry::count_at(None, 9, at("2030-01-01T00:00:00Z")), 9);
        assert_eq!(
            e.describe(at("2026-12-07T20:40:00Z")),
            "expires 2026-12-08T00:00:00Z (in 3h 20m), then 2"
        );
        assert_eq!(
            e.describe(at("2026-12-10T01:00:30Z")),
            "expired 2026-12-08T00:00:00Z (2d 1h ago), then 2"
        );
    }

    #[test]
    fn spans_keep_their_two_largest_units() {
        let s = |secs| span(chrono::TimeDelta::seconds(secs));
        assert_eq!(s(0), "0s");
        assert_eq!(s(45), "45s");
        assert_eq!(s(3_600), "1h");
        assert_eq!(s(3_661), "1h 1m");
        assert_eq!(s(90_061), "1d 1h");
        assert_eq!(s(86_460), "1d");
        assert_eq!(s(-5), "0s");
    }
}
