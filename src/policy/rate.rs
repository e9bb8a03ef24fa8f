//! Per-client rate limits of routes and apps: a token bucket of `requests`
//! tokens refilled evenly over `per_secs` (GCRA, from `governor`), one
//! bucket per (limit, client IP).
//!
//! A limit is named by its slot (routes first, then apps) and identified by
//! its name and settings: a reload that keeps a route's or app's limit as it
//! was finds its buckets again ([`RateLimiter::keep_buckets_of`]).
//!
//! Buckets live in a bounded moka cache. An entry idle for longer than its
//! period would be a full bucket again, so expiring it loses nothing; the
//! capacity bound keeps memory flat however many addresses an attacker uses.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, MonotonicClock};
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter as Gcra};

/// Most buckets held at once.
const MAX_BUCKETS: u64 = 100_000;

type Bucket<C> = Gcra<NotKeyed, InMemoryState, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// One limit: who it belongs to (`route:<name>`, `app:<name>`) and its
/// setting.
pub type Limit = (String, Option<(u32, Duration)>);

/// Rate limiter for every route and app that has a `rate_limit`.
pub struct RateLimiter<C: Clock = MonotonicClock> {
    /// Per slot: the quota and the identity its buckets are keyed by.
    quotas: Vec<Option<(Quota, u64)>>,
    buckets: moka::sync::Cache<(u64, IpAddr), Arc<Bucket<C>>>,
    /// The idle time after which a bucket is full again and is dropped.
    longest: Duration,
    clock: C,
}

/// The identity of a limit: its owner and setting, hashed.
fn identity(owner: &str, requests: u32, per: Duration) -> u64 {
    use std::hash::{Hash, Hasher};
    // Fixed keys: identities must agree between the old and new limiter.
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (owner, requests, per).hash(&mut h);
    h.finish()
}

/// A quota of `requests` per `period`, refilled evenly.
pub fn quota(requests: u32, period: Duration) -> Option<Quota> {
    let burst = NonZeroU32::new(requests)?;
    Quota::with_period(period / requests).map(|q| q.allow_burst(burst))
}

impl RateLimiter<MonotonicClock> {
    /// A limiter for the given limits, by slot.
    pub fn new(limits: &[Limit]) -> Self {
        RateLimiter::with_clock(limits, MonotonicClock)
    }
}

impl<C> RateLimiter<C>
where
    C: Clock + Clone + Send + Sync + 'static,
    C::Instant: Send + Sync,
{
    /// A limiter with a given clock (tests use a fake one).
    pub fn with_clock(limits: &[Limit], clock: C) -> Self {
        let quotas: Vec<Option<(Quota, u64)>> = limits
            .iter()
            .map(|(owner, rl)| {
                rl.and_then(|(n, per)| quota(n, per).map(|q| (q, identity(owner, n, per))))
            })
            .collect();
        let longest = limits
            .iter()
            .filter_map(|(_, rl)| rl.map(|(_, per)| per))
            .max()
            .unwrap_or(Duration::from_secs(60))
            .max(Duration::from_secs(1));
        RateLimiter {
            quotas,
            buckets: moka::sync::Cache::builder()
                .max_capacity(MAX_BUCKETS)
                .time_to_idle(longest)
                .build(),
            longest,
            clock,
        }
    }

    /// Takes over `old`'s buckets: limits whose owner and setting did not
    /// change keep their clients' buckets across a reload. (When the
    /// longest period grew, the old store would drop buckets too early, and
    /// a fresh one is kept instead.)
    pub fn keep_buckets_of(&mut self, old: &RateLimiter<C>) {
        if old.longest >= self.longest {
            self.buckets = old.buckets.clone();
            self.longest = old.longest;
        }
    }

    /// Takes one token for `client` from the limit in `slot`; `Err(wait)`
    /// when the bucket is empty, with the time until the next token.
    pub fn check(&self, slot: usize, client: IpAddr) -> Result<(), Duration> {
        let Some(Some((quota, id))) = self.quotas.get(slot) else {
            return Ok(());
        };
        let bucket = self.buckets.get_with((*id, client), || {
            Arc::new(Gcra::direct_with_clock(*quota, self.clock.clone()))
        });
        bucket
            .check()
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    /// Buckets currently held (for tests and metrics).
    pub fn buckets(&self) -> u64 {
        self.buckets.run_pending_tasks();
        self.buckets.entry_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    fn routes() -> Vec<Limit> {
        vec![
            ("route:a".into(), Some((3, Duration::from_secs(60)))),
            ("route:b".into(), None),
        ]
    }

    #[test]
    fn a_reload_keeps_the_buckets_of_unchanged_limits() {
        let clock = FakeRelativeClock::default();
        let ip: IpAddr = "203.0.113.7".parse().unwrap();
        let old = RateLimiter::with_clock(&routes(), clock.clone());
        for _ in 0..3 {
            old.check(0, ip).unwrap();
        }
        // Same route, now in another slot, same setting: still empty.
        let mut kept = RateLimiter::with_clock(
            &[
                ("route:new".into(), Some((9, Duration::from_secs(60)))),
                routes()[0].clone(),
            ],
            clock.clone(),
        );
        kept.keep_buckets_of(&old);
        assert!(kept.check(1, ip).is_err());
        // A new setting is a new bucket.
        assert!(kept.check(0, ip).is_ok());
        let mut changed = RateLimiter::with_clock(
            &[("route:a".into(), Some((4, Duration::from_secs(60))))],
            clock,
        );
        changed.keep_buckets_of(&old);
        assert!(changed.check(0, ip).is_ok());
    }

    #[test]
    fn bucket_empties_and_refills_evenly() {
        let clock = FakeRelativeClock::default();
        let rl = RateLimiter::with_clock(&routes(), clock.clone());
        let ip: IpAddr = "203.0.113.7".parse().unwrap();
        for _ in 0..3 {
            assert!(rl.check(0, ip).is_ok());
        }
        let wait = rl.check(0, ip).unwrap_err();
        assert_eq!(wait, Duration::from_secs(20), "one token per 60 s / 3");
        clock.advance(Duration::from_secs(19));
        assert!(rl.check(0, ip).is_err());
        clock.advance(Duration::from_secs(1));
        assert!(rl.check(0, ip).is_ok());
        assert!(rl.check(0, ip).is_err());
        // After a full period the whole bucket is back.
        clock.advance(Duration::from_secs(60));
        for _ in 0..3 {
            assert!(rl.check(0, ip).is_ok());
        }
        assert!(rl.check(0, ip).is_err());
    }

    #[test]
    fn buckets_are_per_client_and_per_route() {
        let clock = FakeRelativeClock::default();
        let rl = RateLimiter::with_clock(&routes(), clock);
        let a: IpAddr = "203.0.113.7".parse().unwrap();
        let b: IpAddr = "2001:db8::1".parse().unwrap();
        for _ in 0..3 {
            rl.check(0, a).unwrap();
        }
        assert!(rl.check(0, a).is_err());
        assert!(rl.check(0, b).is_ok(), "another client has its own bucket");
        for _ in 0..100 {
            assert!(rl.check(1, a).is_ok(), "route without rate_limit");
        }
        assert!(rl.check(7, a).is_ok(), "unknown route index");
    }

    #[test]
    fn memory_stays_bounded_for_many_clients() {
        let rl = RateLimiter::with_clock(&routes(), FakeRelativeClock::default());
        for i in 0..(MAX_BUCKETS as u32 + 20_000) {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            let _ = rl.check(0, ip);
        }
        assert!(rl.buckets() <= MAX_BUCKETS, "{} buckets", rl.buckets());
    }
}
