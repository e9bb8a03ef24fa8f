//! One current token per credential, shared by every route that uses it.
//!
//! The read path is a lock-free `ArcSwapOption` load. Only when no usable token
//! is held does a request take the async `flight` mutex: the first one in
//! fetches, the rest wait on the mutex and then find the new token (or the
//! remembered failure) — so N concurrent cold requests cause one fetch. A
//! failure is remembered until its backoff ends (exponential, jittered,
//! capped), so an outage never turns into a hot loop against the endpoint.
//!
//! `arc-swap` rather than moka: there is exactly one entry per credential, and
//! what matters is a wait-free read and an atomic replace, not eviction.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::fetch::{Fetcher, OAuthFetcher};
use super::{Token, TokenError};
use crate::config::{CredentialConfig, CredentialKind};
use crate::forward::HttpClient;

/// First backoff step after a failed fetch.
const BACKOFF_BASE: Duration = Duration::from_secs(1);
/// Longest backoff between fetch attempts.
const BACKOFF_CAP: Duration = Duration::from_secs(60);

/// What `/proxy?ping` and readiness report for a credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenState {
    /// A usable token is held.
    Ok,
    /// No token yet, or a fetch is under way.
    Fetching,
    /// The last fetch failed.
    Failing,
}

impl TokenState {
    /// Lower-case label.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenState::Ok => "ok",
            TokenState::Fetching => "fetching",
            TokenState::Failing => "failing",
        }
    }
}

const FETCHING: u8 = 0;
const FAILING: u8 = 1;
const OK: u8 = 2;

/// The token source for one credential; cheap to clone.
#[derive(Clone)]
pub struct TokenSource {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    fetcher: Option<Box<dyn Fetcher>>,
    current: ArcSwapOption<Token>,
    flight: Mutex<Flight>,
    state: AtomicU8,
    wait_timeout: Duration,
}

#[derive(Default)]
struct Flight {
    failures: u32,
    /// The last failure and when the next attempt is allowed.
    failed: Option<(Instant, TokenError)>,
}

impl TokenSource {
    /// Builds the source for a configured credential.
    pub fn from_config(cfg: &CredentialConfig, client: HttpClient, timeout: Duration) -> Self {
        match &cfg.kind {
            CredentialKind::ApiKey(key) => {
                let token = Token::new(key.expose().to_string(), Instant::now(), None)
                    .expect("API key characters are checked at config load");
                TokenSource::fixed(&cfg.name, token)
            }
            CredentialKind::ClientCredentials {
                token_url,
                client_id,
                client_secret,
                expiration_minutes,
            } => TokenSource::with_fetcher(
                &cfg.name,
                Box::new(OAuthFetcher {
                    client,
                    token_url: token_url.clone(),
                    client_id: client_id.clone(),
                    client_secret: client_secret.clone(),
                    expiration_minutes: *expiration_minutes,
                    referer: cfg.upstream_referer.clone(),
                    timeout,
                }),
                timeout * 2,
            ),
        }
    }

    /// A source that always yields the same never-expiring token (API keys).
    pub fn fixed(name: &str, token: Token) -> Self {
        TokenSource {
            inner: Arc::new(Inner {
                name: name.to_string(),
                fetcher: None,
                current: ArcSwapOption::from_pointee(token),
                flight: Mutex::new(Flight::default()),
                state: AtomicU8::new(OK),
                wait_timeout: Duration::ZERO,
            }),
        }
    }

    /// A source that fetches tokens on demand; waiters give up after
    /// `wait_timeout`.
    pub fn with_fetcher(name: &str, fetcher: Box<dyn Fetcher>, wait_timeout: Duration) -> Self {
        TokenSource {
            inner: Arc::new(Inner {
                name: name.to_string(),
                fetcher: Some(fetcher),
                current: ArcSwapOption::empty(),
                flight: Mutex::new(Flight::default()),
                state: AtomicU8::new(FETCHING),
                wait_timeout,
            }),
        }
    }

    /// Credential name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The current state, for ping and readiness.
    pub fn state(&self) -> TokenState {
        if self.usable().is_some() {
            return TokenState::Ok;
        }
        match self.inner.state.load(Ordering::Relaxed) {
            FAILING => TokenState::Failing,
            _ => TokenState::Fetching,
        }
    }

    fn usable(&self) -> Option<Arc<Token>> {
        let guard = self.inner.current.load();
        match &*guard {
            Some(t) if t.usable_at(Instant::now()) => Some(Arc::clone(t)),
            _ => None,
        }
    }

    /// A usable token, fetching one if none is held.
    pub async fn token(&self) -> Result<Arc<Token>, TokenError> {
        if let Some(t) = self.usable() {
            return Ok(t);
        }
        let timeout = self.inner.wait_timeout;
        match tokio::time::timeout(timeout, self.fetch_once()).await {
            Ok(r) => r,
            Err(_) => Err(TokenError::Unavailable {
                reason: "timed out waiting for a token".into(),
                retry_after: Duration::from_secs(1),
            }),
        }
    }

    async fn fetch_once(&self) -> Result<Arc<Token>, TokenError> {
        let mut flight = self.inner.flight.lock().await;
        // Someone else may have fetched while we waited for the lock.
        if let Some(t) = self.usable() {
            return Ok(t);
        }
        let now = Instant::now();
        if let Some((until, err)) = &flight.failed
            && now < *until
        {
            return Err(with_retry_after(err.clone(), *until - now));
        }
        let Some(fetcher) = &self.inner.fetcher else {
            // A fixed token never becomes unusable; unreachable in practice.
            return Err(TokenError::Unavailable {
                reason: "no token".into(),
                retry_after: Duration::from_secs(1),
            });
        };
        self.inner.state.store(FETCHING, Ordering::Relaxed);
        let started = Instant::now();
        match fetcher.fetch().await {
            Ok((value, lifetime)) => match Token::new(value, started, lifetime) {
                Some(token) => {
                    let token = Arc::new(token);
                    self.inner.current.store(Some(Arc::clone(&token)));
                    flight.failures = 0;
                    flight.failed = None;
                    self.inner.state.store(OK, Ordering::Relaxed);
                    tracing::info!(
                        credential = %self.inner.name,
                        expires_in_secs = lifetime.map(|l| l.as_secs()),
                        "obtained token"
                    );
                    Ok(token)
                }
                None => self.fail(
                    &mut flight,
                    TokenError::Unavailable {
                        reason: "token endpoint returned a token with invalid characters".into(),
                        retry_after: Duration::ZERO,
                    },
                ),
            },
            Err(e) => self.fail(&mut flight, e),
        }
    }

    fn fail(&self, flight: &mut Flight, err: TokenError) -> Result<Arc<Token>, TokenError> {
        flight.failures = flight.failures.saturating_add(1);
        let delay = backoff(flight.failures);
        self.inner.state.store(FAILING, Ordering::Relaxed);
        match &err {
            TokenError::Rejected { code, message } => tracing::error!(
                credential = %self.inner.name,
                code,
                message = %message,
                retry_in_secs = delay.as_secs_f32(),
                "token endpoint rejected the credential"
            ),
            TokenError::Unavailable { reason, .. } => tracing::warn!(
                credential = %self.inner.name,
                reason = %reason,
                retry_in_secs = delay.as_secs_f32(),
                "could not obtain a token"
            ),
        }
        let err = with_retry_after(err, delay);
        flight.failed = Some((Instant::now() + delay, err.clone()));
        Err(err)
    }

    /// Drops `token` if it is still the current one, so the next request
    /// fetches a fresh one; a burst of rejections of the same token causes a
    /// single refresh.
    pub fn invalidate(&self, token: &Arc<Token>) {
        let current = self.inner.current.load();
        if current.as_ref().is_some_and(|c| Arc::ptr_eq(c, token)) && self.inner.fetcher.is_some() {
            self.inner
                .current
                .compare_and_swap(&*current, None::<Arc<Token>>);
        }
    }

    /// The token currently held, usable or not (for scrubbing and metrics).
    pub fn current(&self) -> Option<Arc<Token>> {
        self.inner.current.load_full()
    }
}

fn with_retry_after(err: TokenError, after: Duration) -> TokenError {
    match err {
        TokenError::Unavailable { reason, .. } => TokenError::Unavailable {
            reason,
            retry_after: after,
        },
        rejected => rejected,
    }
}

/// Delay before attempt `failures + 1`: 1 s, 2 s, 4 s … capped at 60 s, with
/// up to 20 % jitter so many proxies do not retry in step.
pub fn backoff(failures: u32) -> Duration {
    let exp = BACKOFF_BASE.saturating_mul(1u32 << failures.saturating_sub(1).min(16));
    let capped = exp.min(BACKOFF_CAP);
    let jitter = capped.mul_f64(fastrand::f64() * 0.2);
    capped - jitter
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::future::BoxFuture;
    use std::sync::atomic::AtomicUsize;

    use super::super::fetch::Fetched;

    /// Counts calls and answers from a script.
    struct Scripted {
        calls: AtomicUsize,
        delay: Duration,
        answer: Box<dyn Fn(usize) -> Result<Fetched, TokenError> + Send + Sync>,
    }

    impl Fetcher for Arc<Scripted> {
        fn fetch(&self) -> BoxFuture<'_, Result<Fetched, TokenError>> {
            Box::pin(async move {
                let n = self.calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(self.delay).await;
                (self.answer)(n)
            })
        }
    }

    fn scripted(
        delay: Duration,
        answer: impl Fn(usize) -> Result<Fetched, TokenError> + Send + Sync + 'static,
    ) -> (Arc<Scripted>, TokenSource) {
        let s = Arc::new(Scripted {
            calls: AtomicUsize::new(0),
            delay,
            answer: Box::new(answer),
        });
        let src = TokenSource::with_fetcher("t", Box::new(Arc::clone(&s)), Duration::from_secs(30));
        (s, src)
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_cold_requests_cause_one_fetch() {
        let (s, src) = scripted(Duration::from_millis(200), |n| {
            Ok((format!("tok{n}"), Some(Duration::from_secs(7200))))
        });
        let mut handles = Vec::new();
        for _ in 0..1000 {
            let src = src.clone();
            handles.push(tokio::spawn(async move { src.token().await }));
        }
        for h in handles {
            assert_eq!(h.await.unwrap().unwrap().expose(), "tok0");
        }
        assert_eq!(s.calls.load(Ordering::SeqCst), 1);
        assert_eq!(src.state(), TokenState::Ok);
    }

    #[tokio::test(start_paused = true)]
    async fn expired_token_is_never_returned() {
        let (s, src) = scripted(Duration::ZERO, |n| {
            Ok((format!("tok{n}"), Some(Duration::from_secs(100))))
        });
        assert_eq!(src.token().await.unwrap().expose(), "tok0");
        tokio::time::advance(Duration::from_secs(69)).await;
        assert_eq!(src.token().await.unwrap().expose(), "tok0");
        // 100 s lifetime − 30 s margin: from 70 s on, a new token is fetched.
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(src.token().await.unwrap().expose(), "tok1");
        assert_eq!(s.calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_back_off_and_share_the_error() {
        let (s, src) = scripted(Duration::ZERO, |n| {
            if n < 2 {
                Err(TokenError::Unavailable {
                    reason: "down".into(),
                    retry_after: Duration::ZERO,
                })
            } else {
                Ok(("good".into(), Some(Duration::from_secs(3600))))
            }
        });
        let e = src.token().await.unwrap_err();
        let TokenError::Unavailable { retry_after, .. } = e else {
            panic!("{e:?}")
        };
        assert!(retry_after > Duration::from_millis(700) && retry_after <= Duration::from_secs(1));
        assert_eq!(src.state(), TokenState::Failing);
        // Within the backoff window nobody calls the endpoint again.
        for _ in 0..50 {
            assert!(src.token().await.is_err());
        }
        assert_eq!(s.calls.load(Ordering::SeqCst), 1);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(src.token().await.is_err());
        assert_eq!(s.calls.load(Ordering::SeqCst), 2);
        // Second failure: about 2 s.
        tokio::time::advance(Duration::from_millis(1000)).await;
        let _ = src.token().await;
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(src.token().await.unwrap().expose(), "good");
        assert_eq!(s.calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn invalidate_drops_only_the_current_token() {
        let (s, src) = scripted(Duration::ZERO, |n| {
            Ok((format!("tok{n}"), Some(Duration::from_secs(3600))))
        });
        let t0 = src.token().await.unwrap();
        src.invalidate(&t0);
        let t1 = src.token().await.unwrap();
        assert_eq!(t1.expose(), "tok1");
        // A late rejection of the old token must not throw away the new one.
        src.invalidate(&t0);
        assert_eq!(src.token().await.unwrap().expose(), "tok1");
        assert_eq!(s.calls.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        for (n, max) in [(1u32, 1.0f64), (2, 2.0), (3, 4.0), (7, 60.0), (40, 60.0)] {
            let d = backoff(n).as_secs_f64();
            assert!(d <= max && d >= max * 0.8, "{n}: {d}");
        }
    }

    #[tokio::test]
    async fn fixed_tokens_are_always_ok() {
        let src = TokenSource::fixed("k", Token::new("key".into(), Instant::now(), None).unwrap());
        assert_eq!(src.state(), TokenState::Ok);
        let t = src.token().await.unwrap();
        src.invalidate(&t);
        assert_eq!(src.token().await.unwrap().expose(), "key");
    }
}
