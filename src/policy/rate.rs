//! Per-client, per-route rate limits: a token bucket of `requests` tokens
//! refilled evenly over `per_secs` (GCRA, from `governor`), one bucket per
//! (route, client IP).
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

use super::route::RouteTable;

/// Most buckets held at once.
const MAX_BUCKETS: u64 = 100_000;

type Bucket<C> = Gcra<NotKeyed, InMemoryState, C, NoOpMiddleware<<C as Clock>::Instant>>;

/// Rate limiter for every route that has a `rate_limit`.
pub struct RateLimiter<C: Clock = MonotonicClock> {
    quotas: Vec<Option<Quota>>,
    buckets: moka::sync::Cache<(usize, IpAddr), Arc<Bucket<C>>>,
    clock: C,
}

/// A quota of `requests` per `period`, refilled evenly.
pub fn quota(requests: u32, period: Duration) -> Option<Quota> {
    let burst = NonZeroU32::new(requests)?;
    Quota::with_period(period / requests).map(|q| q.allow_burst(burst))
}

impl RateLimiter<MonotonicClock> {
    /// A limiter for the routes' `rate_limit` settings.
    pub fn new(routes: &RouteTable) -> Self {
        RateLimiter::with_clock(routes, MonotonicClock)
    }
}

impl<C> RateLimiter<C>
where
    C: Clock + Clone + Send + Sync + 'static,
    C::Instant: Send + Sync,
{
    /// A limiter with a given clock (tests use a fake one).
    pub fn with_clock(routes: &RouteTable, clock: C) -> Self {
        let quotas: Vec<Option<Quota>> = routes
            .iter()
            .map(|r| r.rate_limit.and_then(|(n, per)| quota(n, per)))
            .collect();
        let longest = routes
            .iter()
            .filter_map(|r| r.rate_limit.map(|(_, per)| per))
            .max()
            .unwrap_or(Duration::from_secs(60))
            .max(Duration::from_secs(1));
        RateLimiter {
            quotas,
            buckets: moka::sync::Cache::builder()
                .max_capacity(MAX_BUCKETS)
                .time_to_idle(longest)
                .build(),
            clock,
        }
    }

    /// Takes one token for `client` on route `route`; `Err(wait)` when the
    /// bucket is empty, with the time until the next token.
    pub fn check(&self, route: usize, client: IpAddr) -> Result<(), Duration> {
        let Some(Some(quota)) = self.quotas.get(route) else {
            return Ok(());
        };
        let bucket = self.buckets.get_with((route, client), || {
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
    use crate::policy::route::{Route, TokenIn};
    use governor::clock::FakeRelativeClock;

    fn routes() -> RouteTable {
        let r = |u: &str, rl: Option<(u32, Duration)>| {
            Route::new(
                u.into(),
                url::Url::parse(u).unwrap(),
                None,
                None,
                TokenIn::Header,
                false,
                rl,
            )
        };
        RouteTable::new(vec![
            r("https://a.example/x", Some((3, Duration::from_secs(60)))),
            r("https://b.example/y", None),
        ])
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
