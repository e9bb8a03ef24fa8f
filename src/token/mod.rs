//! Tokens: the secret types, and the per-credential source the forwarder asks.
//!
//! [`Secret`] and [`Token`] never print their value (`Debug`/`Display` show a
//! redaction); the bytes are reachable only through explicit `expose` calls at
//! the few places that must send them. [`TokenSource`] is the seam between
//! forwarding and the token lifecycle: `token()` yields a usable token or a
//! [`TokenError`], `invalidate()` drops one an upstream refused.

mod cache;
mod fetch;
mod generate;

use std::fmt;
use std::time::Duration;

use http::HeaderValue;
use tokio::time::Instant;

pub use cache::{TokenInfo, TokenSource, TokenState};

pub use crate::config::Secret;

/// An access token (or API key) ready to inject, with its lifetime.
pub struct Token {
    /// Process-unique id, for caches keyed by token without holding its value.
    id: u64,
    value: String,
    /// `Bearer <t>`, marked sensitive so hyper's own logging hides it.
    header: HeaderValue,
    /// The value percent-encoded for a query string.
    query_value: String,
    /// After this instant the token is not injected (expiry minus skew margin).
    usable_until: Option<Instant>,
    /// When a background refresh should replace it.
    refresh_at: Option<Instant>,
    /// When it was obtained.
    issued_at: Instant,
}

/// Characters escaped in a `token=` query value: all but RFC 3986 unreserved.
const QUERY_VALUE: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Tokens are not injected during the last `expiry_margin(lifetime)` of
/// their life, to allow for clock skew and request latency: at most this
/// long, and at most a tenth of the lifetime, so a 5 s token is injected for
/// 4.5 s of its life rather than never.
pub const EXPIRY_MARGIN: Duration = Duration::from_secs(30);

/// The longest lifetime believed: ArcGIS issues tokens for at most 14 days
/// (`expiration` 20160 minutes). A token endpoint claiming more (or an
/// absurd `expires_in` that would overflow the clock) gets this.
pub const MAX_LIFETIME: Duration = Duration::from_secs(14 * 24 * 3600);

impl Token {
    /// A token with a lifetime (`expires_in`) counted from `issued_at`.
    pub fn new(value: String, issued_at: Instant, lifetime: Option<Duration>) -> Option<Token> {
        let mut header = HeaderValue::from_str(&format!("Bearer {value}")).ok()?;
        header.set_sensitive(true);
        let query_value = percent_encoding::utf8_percent_encode(&value, QUERY_VALUE).to_string();
        let (usable_until, refresh_at) = match lifetime {
            None => (None, None),
            Some(life) => {
                let life = life.min(MAX_LIFETIME);
                (
                    Some(issued_at + (life - expiry_margin(life))),
                    Some(issued_at + refresh_offset(life)),
                )
            }
        };
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        Some(Token {
            id: NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            value,
            header,
            query_value,
            usable_until,
            refresh_at,
            issued_at,
        })
    }

    /// Process-unique id of this token.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The clear value, for injection and scrubbing only.
    pub fn expose(&self) -> &str {
        &self.value
    }

    /// `X-Esri-Authorization` value.
    pub fn header_value(&self) -> &HeaderValue {
        &self.header
    }

    /// The value percent-encoded for `token=` in a query.
    pub fn query_value(&self) -> &str {
        &self.query_value
    }

    /// True while the token may still be injected.
    pub fn usable_at(&self, now: Instant) -> bool {
        self.usable_until.is_none_or(|u| now < u)
    }

    /// When a background refresh is due, if the token expires at all.
    pub fn refresh_at(&self) -> Option<Instant> {
        self.refresh_at
    }

    /// When the token stops being injected, if ever.
    pub fn usable_until(&self) -> Option<Instant> {
        self.usable_until
    }

    /// When the token was obtained.
    pub fn issued_at(&self) -> Instant {
        self.issued_at
    }
}

impl Drop for Token {
    fn drop(&mut self) {
        // The header copy lives in a shared buffer that cannot be wiped;
        // the strings can.
        zeroize::Zeroize::zeroize(&mut self.value);
        zeroize::Zeroize::zeroize(&mut self.query_value);
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// `lifetime − min(5 min, lifetime/5)`: when to refresh after issue.
pub fn refresh_offset(lifetime: Duration) -> Duration {
    lifetime - (lifetime / 5).min(Duration::from_secs(300))
}

/// `min(30 s, lifetime/10)`: the end of a token's life during which it is no
/// longer injected. Always shorter than the refresh lead (`lifetime/5`, at
/// most 5 min), so a background refresh replaces a token before requests
/// would have to wait for one.
pub fn expiry_margin(lifetime: Duration) -> Duration {
    (lifetime / 10).min(EXPIRY_MARGIN)
}

/// Why no token could be had.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TokenError {
    /// The token endpoint answered with an error: the credential is refused.
    #[error("token endpoint rejected the credential (code {code}): {message}")]
    Rejected {
        /// ArcGIS error code.
        code: i64,
        /// ArcGIS error message (never contains the secret).
        message: String,
    },
    /// The endpoint could not be reached or answered nonsense; try later.
    #[error("token endpoint unavailable: {reason}")]
    Unavailable {
        /// What went wrong.
        reason: String,
        /// How long until the next attempt.
        retry_after: Duration,
    },
}

// Here rather than in `error`, so that `error` depends on no module
// that uses it.
impl From<TokenError> for crate::error::ProxyError {
    fn from(e: TokenError) -> Self {
        match e {
            TokenError::Rejected { .. } => crate::error::ProxyError::TokenRejected,
            TokenError::Unavailable { retry_after, .. } => {
                crate::error::ProxyError::TokenUnavailable { retry_after }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_schedule() {
        let m = Duration::from_secs(60);
        assert_eq!(
            refresh_offset(Duration::from_secs(7200)),
            Duration::from_secs(6900)
        );
        assert_eq!(refresh_offset(10 * m), 8 * m);
        assert_eq!(
            refresh_offset(Duration::from_secs(100)),
            Duration::from_secs(80)
        );
    }

    #[test]
    fn token_and_secret_never_print_their_value() {
        let t = Token::new("tok-SECRET-123".into(), Instant::now(), None).unwrap();
        assert!(!format!("{t:?}").contains("SECRET"));
        assert!(t.header_value().is_sensitive());
        let s = Secret::new("shh-SECRET".into()).unwrap();
        assert!(!format!("{s:?} {s}").contains("SECRET"));
        assert!(Secret::new("has space".into()).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn expiry_margin_applies() {
        let now = Instant::now();
        let t = Token::new("t".into(), now, Some(Duration::from_secs(120))).unwrap();
        assert!(t.usable_at(now));
        // 120 s: a tenth (12 s) is shorter than 30 s.
        assert!(t.usable_at(now + Duration::from_secs(107)));
        assert!(!t.usable_at(now + Duration::from_secs(108)));
        assert_eq!(t.refresh_at(), Some(now + Duration::from_secs(96)));
    }

    #[test]
    fn margin_and_refresh_scale_with_the_lifetime() {
        let s = Duration::from_secs;
        // (lifetime, margin, refresh after issue)
        for (life, margin, refresh) in [
            (s(5), Duration::from_millis(500), s(4)),
            (s(60), s(6), s(48)),
            (s(300), s(30), s(240)),
            (s(7200), s(30), s(6900)),
            (s(14 * 24 * 3600), s(30), s(14 * 24 * 3600 - 300)),
        ] {
            assert_eq!(expiry_margin(life), margin, "{life:?}");
            assert_eq!(refresh_offset(life), refresh, "{life:?}");
            // The refresh always comes before the token stops being usable.
            assert!(refresh < life - margin, "{life:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn absurd_lifetimes_are_capped_not_overflowed() {
        let now = Instant::now();
        let t = Token::new("t".into(), now, Some(Duration::from_secs(u64::MAX))).unwrap();
        assert_eq!(
            t.usable_until(),
            Some(now + MAX_LIFETIME - EXPIRY_MARGIN),
            "a lifetime beyond 14 days is not believed"
        );
        let t = Token::new("t".into(), now, Some(Duration::from_nanos(1))).unwrap();
        assert!(t.usable_at(now));
    }
}
