//! `[rate_limit]`: the store that replicas share per-client rate limits
//! through, and what to do when it does not answer.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

use super::raw::{RawRateLimit, RawRateLimitStore};
use super::secrets::{Secret, SecretFields, load_secret};
use super::{Files, Problems, resolve};

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
    /// The password, from `store_password_env`/`_file` (a password in the
    /// URL stays in the URL).
    pub password: Option<Secret>,
    /// Trust roots (PEM) for a `rediss://` store, instead of the system's.
    pub ca_pem: Option<Vec<u8>>,
}

// Hand-written: a Redis URL may carry a password (`redis://:pw@host`).
impl fmt::Debug for RateLimitStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitStore")
            .field("url", &"<redacted>")
            .field("budget", &self.budget)
            .field("on_error", &self.on_error)
            .field("password", &self.password)
            .field("ca_pem", &self.ca_pem.as_ref().map(Vec::len))
            .finish()
    }
}

/// A route's or an app's `rate_limit` (the table at `key`): `requests` per
/// `per_secs`, both above 0.
pub(super) fn per_client(
    raw: Option<RawRateLimit>,
    key: &str,
    p: &mut Problems,
) -> Option<(u32, Duration)> {
    let rl = raw?;
    if rl.requests == 0 || rl.per_secs == 0 {
        p.add(
            format!("{key}.rate_limit"),
            "requests and per_secs must both be greater than 0",
        );
        return None;
    }
    Some((rl.requests, Duration::from_secs(rl.per_secs)))
}

/// Validates `[rate_limit]`, if present.
pub(super) fn validate(
    raw: Option<RawRateLimitStore>,
    files: Files<'_>,
    p: &mut Problems,
    warnings: &mut Vec<String>,
) -> Option<RateLimitStore> {
    let r = raw?;
    let tls = r.store.starts_with("rediss://");
    let url = match url::Url::parse(&r.store) {
        Ok(u) if tls || r.store.starts_with("redis://") => u,
        _ => {
            p.add("rate_limit.store", "must be a redis:// or rediss:// URL");
            return None;
        }
    };
    if !(1..=5000).contains(&r.budget_ms) {
        p.add("rate_limit.budget_ms", "must be between 1 and 5000");
    }
    let in_url = url.password().is_some();
    let password = match (&r.store_password_env, &r.store_password_file) {
        (None, None) => None,
        _ if in_url => {
            p.add(
                "rate_limit.store",
                "has a password and store_password_env/_file is set too: give it in one place",
            );
            None
        }
        (env, file) => load_secret(
            p,
            warnings,
            "rate_limit",
            "store_password",
            SecretFields {
                inline: None,
                env: env.clone(),
                file: file.clone(),
            },
            files,
        ),
    };
    if in_url {
        warnings.push(
            "rate_limit.store carries its password inline; prefer store_password_env or store_password_file"
                .into(),
        );
    }
    if (in_url || password.is_some()) && !tls && !is_loopback(&url) {
        warnings.push(
            "rate_limit.store uses redis:// to another host: its password travels unencrypted; use rediss://"
                .into(),
        );
    }
    let ca_pem = match &r.store_ca {
        None => None,
        Some(_) if !tls => {
            p.add(
                "rate_limit.store_ca",
                "only applies to a rediss:// (TLS) store",
            );
            None
        }
        Some(path) => {
            let path = resolve(files.base, path);
            match crate::tls::load_ca_file(&path) {
                Ok(_) => std::fs::read(&path).ok(),
                Err(msg) => {
                    p.add("rate_limit.store_ca", msg);
                    None
                }
            }
        }
    };
    Some(RateLimitStore {
        url: r.store,
        budget: Duration::from_millis(r.budget_ms),
        on_error: r.on_store_error,
        password,
        ca_pem,
    })
}

fn is_loopback(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d == "localhost",
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}
