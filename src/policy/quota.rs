//! App quotas (spending caps): requests an app may send upstream per UTC
//! calendar window (hour, day or month). This module holds the window
//! arithmetic and this process's counters; `proxy::limit` asks the shared
//! store first when one is configured.

use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A calendar window, in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Window {
    /// From :00 to the next :00.
    Hour,
    /// From 00:00 UTC to the next midnight.
    Day,
    /// From the first of the month, 00:00 UTC, to the first of the next.
    Month,
}

impl Window {
    /// Parses `"hour"`, `"day"` or `"month"`.
    pub fn parse(s: &str) -> Option<Window> {
        match s {
            "hour" => Some(Window::Hour),
            "day" => Some(Window::Day),
            "month" => Some(Window::Month),
            _ => None,
        }
    }

    /// The name as written in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            Window::Hour => "hour",
            Window::Day => "day",
            Window::Month => "month",
        }
    }

    /// The window holding `now`, as (start, end) in seconds since the Unix
    /// epoch.
    pub fn bounds(self, now: SystemTime) -> (u64, u64) {
        let secs = now
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_secs();
        match self {
            Window::Hour => {
                let start = secs - secs % 3600;
                (start, start + 3600)
            }
            Window::Day => {
                let start = secs - secs % 86_400;
                (start, start + 86_400)
            }
            Window::Month => {
                let (y, m, _) = civil_from_days((secs / 86_400) as i64);
                let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
                let start = days_from_civil(y, m, 1) as u64 * 86_400;
                let end = days_from_civil(ny, nm, 1) as u64 * 86_400;
                (start, end)
            }
        }
    }
}

/// A quota: `requests` per `per` window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct QuotaSpec {
    /// Requests allowed in one window.
    pub requests: u64,
    /// The window.
    pub per: Window,
}

/// What a quota check decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaVerdict {
    /// Counted; this many requests are left in the window.
    Admitted {
        /// Requests left after this one.
        remaining: u64,
    },
    /// Exhausted until the window ends.
    Exhausted {
        /// Time until the window ends.
        retry_after: Duration,
    },
}

/// One app's count in this process.
#[derive(Debug, Default)]
pub struct LocalQuota {
    /// (window start, requests counted in it).
    state: Mutex<(u64, u64)>,
}

impl LocalQuota {
    /// Counts one request at `now` against `spec`, unless the window's
    /// requests are used up.
    pub fn take(&self, spec: QuotaSpec, now: SystemTime) -> QuotaVerdict {
        let (start, end) = spec.per.bounds(now);
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.0 != start {
            *state = (start, 0);
        }
        if state.1 >= spec.requests {
            return QuotaVerdict::Exhausted {
                retry_after: until(end, now),
            };
        }
        state.1 += 1;
        QuotaVerdict::Admitted {
            remaining: spec.requests - state.1,
        }
    }

    /// Records what the shared store decided, so this process's view (for
    /// `?ping` and the fallback) follows the cluster's count.
    pub fn observe(&self, spec: QuotaSpec, now: SystemTime, verdict: QuotaVerdict) {
        let (start, _) = spec.per.bounds(now);
        let used = match verdict {
            QuotaVerdict::Admitted { remaining } => spec.requests.saturating_sub(remaining),
            QuotaVerdict::Exhausted { .. } => spec.requests,
        };
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = (start, used);
    }

    /// Requests left in the window holding `now` (this process's count).
    pub fn remaining(&self, spec: QuotaSpec, now: SystemTime) -> u64 {
        let (start, _) = spec.per.bounds(now);
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let used = if state.0 == start { state.1 } else { 0 };
        spec.requests.saturating_sub(used)
    }
}

/// Time from `now` to the window end `end` (seconds since the epoch).
pub fn until(end: u64, now: SystemTime) -> Duration {
    (UNIX_EPOCH + Duration::from_secs(end))
        .duration_since(now)
        .unwrap_or(Duration::ZERO)
}

/// (year, month, day) of a day count since 1970-01-01 (H. Hinnant's
/// algorithm, proleptic Gregorian calendar).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = (z - era * 146_097) as u64;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe as i64 + era * 400;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Days since 1970-01-01 of a (year, month, day).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = (y - era * 400) as u64;
    let mp = u64::from(if m > 2 { m - 3 } else { m + 9 });
    let doy = (153 * mp + 2) / 5 + u64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe as i64 - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn calendar_round_trips() {
        for days in [0i64, 59, 60, 365, 10_956, 11_016, 19_782, 20_454, 47_482] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days, "{y}-{m}-{d}");
        }
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        // 2024 is a leap year: 2024-02-29 exists, and 2024-03-01 follows it.
        let feb29 = days_from_civil(2024, 2, 29);
        assert_eq!(civil_from_days(feb29 + 1), (2024, 3, 1));
        assert_eq!(civil_from_days(days_from_civil(2026, 12, 5)), (2026, 12, 5));
    }

    #[test]
    fn windows_start_and_end_on_utc_boundaries() {
        // 2026-12-05T06:30:15Z
        let now = at(days_from_civil(2026, 12, 5) as u64 * 86_400 + 6 * 3600 + 30 * 60 + 15);
        let day = days_from_civil(2026, 12, 5) as u64 * 86_400;
        assert_eq!(Window::Hour.bounds(now), (day + 6 * 3600, day + 7 * 3600));
        assert_eq!(Window::Day.bounds(now), (day, day + 86_400));
        let dec = days_from_civil(2026, 12, 1) as u64 * 86_400;
        let jan = days_from_civil(2027, 1, 1) as u64 * 86_400;
        assert_eq!(Window::Month.bounds(now), (dec, jan));
        // February of a leap year has 29 days.
        let feb = days_from_civil(2028, 2, 10) as u64 * 86_400;
        let (s, e) = Window::Month.bounds(at(feb));
        assert_eq!((e - s) / 86_400, 29);
    }

    #[test]
    fn a_quota_runs_out_and_comes_back_with_the_next_window() {
        let spec = QuotaSpec {
            requests: 3,
            per: Window::Hour,
        };
        let q = LocalQuota::default();
        // An hour boundary (1.8e9 s is one: 500,000 hours).
        let base = 1_800_000_000;
        assert_eq!(base % 3600, 0);
        for left in [2, 1, 0] {
            assert_eq!(
                q.take(spec, at(base + 10)),
                QuotaVerdict::Admitted { remaining: left }
            );
        }
        assert_eq!(q.remaining(spec, at(base + 10)), 0);
        assert_eq!(
            q.take(spec, at(base + 3599)),
            QuotaVerdict::Exhausted {
                retry_after: Duration::from_secs(1)
            }
        );
        assert_eq!(
            q.take(spec, at(base + 600)),
            QuotaVerdict::Exhausted {
                retry_after: Duration::from_secs(3000)
            }
        );
        assert_eq!(q.remaining(spec, at(base + 3600)), 3);
        assert_eq!(
            q.take(spec, at(base + 3600)),
            QuotaVerdict::Admitted { remaining: 2 }
        );
    }
}
