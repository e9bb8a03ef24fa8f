//! `[rate_limit]`: the store that replicas share per-client rate limits
//! through, and what to do when it does not answer.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

use super::Problems;
use super::raw::RawRateLimitStore;

/// What per-client rate limits do when the shared store does not answer.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreFallback {
    /// Use this process's own limiter.
    #[default]
    Local,
    /// Admit the request.
    Open,
    /// Refuse it (429).
    Closed,
}

/// `[rate_limit]`: a store shared by all replicas.
#[derive(Clone, PartialEq)]
pub struct RateLimitStore {
    /// `redis://host:port/db` (or `rediss://` for TLS).
    pub url: String,
    /// Time allowed for one store call.
    pub budget: Duration,
    /// What to do when the store does not answer in time.
    pub on_error: StoreFallback,
}

// Hand-written: a Redis URL may carry a password (`redis://:pw@host`).
impl fmt::Debug for RateLimitStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitStore")
            .field("url", &"<redacted>")
            .field("budget", &self.budget)
            .field("on_error", &self.on_error)
            .finish()
    }
}

/// Validates `[rate_limit]`, if present.
pub(super) fn validate(raw: Option<RawRateLimitStore>, p: &mut Problems) -> Option<RateLimitStore> {
    raw.and_then(|r| {
        let ok_scheme = r.store.starts_with("redis://") || r.store.starts_with("rediss://");
        if !ok_scheme || url::Url::parse(&r.store).is_err() {
            p.add("rate_limit.store", "must be a redis:// or rediss:// URL");
            return None;
        }
        if !(1..=5000).contains(&r.budget_ms) {
            p.add("rate_limit.budget_ms", "must be between 1 and 5000");
        }
        Some(RateLimitStore {
            url: r.store,
            budget: Duration::from_millis(r.budget_ms),
            on_error: r.on_store_error,
        })
    })
}
