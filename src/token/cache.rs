//! One current token per credential, shared by every route that uses it.
//!
//! The read path is a lock-free `ArcSwapOption` load. Only when no usable token
//! is held does a request take the async `flight` mutex: the first one in
//! fetches, the rest wait on the mutex and then find the new token (or the
//! remembered failure) — so N concurrent cold requests cause one fetch. A
//! failure is remembered until its backoff ends (exponential, jittered,
//! capped), so an outage never turns into a hot loop against the endpoint.
//!
//! A background task ([`TokenSource::spawn_refresher`]) replaces the token at
//! `lifetime − min(5 min, lifetime/5)` after issue, so requests never wait for
//! a refresh while the token is valid; on failure it retries on the same
//! backoff schedule, and the old token stays in use until it expires.
//!
//! `arc-swap` rather than moka: there is exactly one entry per credential, and
//! what matters is a wait-free read and an atomic replace, not eviction.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use tokio::sync::Mutex;
use tokio::time::Instant;

use super::fetch::{Fetcher, OAuthFetcher};
use super::generate::GenerateTokenFetcher;
use super::{Token, TokenError};
use crate::config::{CredentialConfig, CredentialKind};
use crate::metrics::Metrics;
use crate::upstream::HttpClient;

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

/// A snapshot of a credential's token, without the token.
#[derive(Debug, Clone, Copy)]
pub struct TokenInfo {
    /// Ok, fetching or failing.
    pub state: TokenState,
    /// Time since the current token was obtained.
    pub age: Option<Duration>,
    /// Time the current token may still be injected (`None`: never expires).
    pub usable_for: Option<Duration>,
    /// Time until the background refresh (`None`: never).
    pub refresh_in: Option<Duration>,
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
    metrics: Option<Arc<Metrics>>,
    refresher_started: AtomicBool,
    current: ArcSwapOption<Token>,
    /// The token `current` replaced; responses to requests that carried it
    /// may still be in flight, so it is scrubbed too.
    previous: ArcSwapOption<Token>,
    flight: Mutex<Flight>,
    state: AtomicU8,
    /// Set once the first fetch has finished, whatever its outcome.
    settled: AtomicBool,
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
    pub fn from_config(
        cfg: &CredentialConfig,
        client: HttpClient,
        timeout: Duration,
        metrics: Option<Arc<Metrics>>,
    ) -> Self {
        let mut src = match &cfg.kind {
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
            CredentialKind::UserPassword {
                token_url,
                info_url,
                username,
                password,
                expiration_minutes,
            } => TokenSource::with_fetcher(
                &cfg.name,
                Box::new(GenerateTokenFetcher {
                    client,
                    name: cfg.name.clone(),
                    token_url: tokio::sync::OnceCell::new_with(token_url.clone()),
                    info_url: info_url.clone(),
                    username: username.clone(),
                    password: password.clone(),
                    expiration_minutes: *expiration_minutes,
                    referer: cfg.upstream_referer.clone(),
                    timeout,
                }),
                timeout * 2,
            ),
        };
        if let Some(inner) = Arc::get_mut(&mut src.inner) {
            inner.metrics = metrics;
        }
        src
    }

    /// A source that always yields the same never-expiring token (API keys).
    pub fn fixed(name: &str, token: Token) -> Self {
        TokenSource {
            inner: Arc::new(Inner {
                name: name.to_string(),
                fetcher: None,
                metrics: None,
                refresher_started: AtomicBool::new(true),
                current: ArcSwapOption::from_pointee(token),
                previous: ArcSwapOption::empty(),
                flight: Mutex::new(Flight::default()),
                state: AtomicU8::new(OK),
                settled: AtomicBool::new(true),
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
                metrics: None,
                refresher_started: AtomicBool::new(false),
                current: ArcSwapOption::empty(),
                previous: ArcSwapOption::empty(),
                flight: Mutex::new(Flight::default()),
                state: AtomicU8::new(FETCHING),
                settled: AtomicBool::new(false),
                wait_timeout,
            }),
        }
    }

    /// Credential name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// True once the first token fetch has finished, succeeded or not (always
    /// for a fixed token): readiness waits for this, not for success, so a
    /// token outage does not take every replica out of its load balancer.
    pub fn settled(&self) -> bool {
        self.inner.settled.load(Ordering::Relaxed)
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
        if let Some(err) = Self::backing_off(&flight) {
            return Err(err);
        }
        self.fetch_locked(&mut flight).await
    }

    /// The remembered failure, while its backoff lasts.
    fn backing_off(flight: &Flight) -> Option<TokenError> {
        let now = Instant::now();
        match &flight.failed {
            Some((until, err)) if now < *until => Some(with_retry_after(err.clone(), *until - now)),
            _ => None,
        }
    }

    async fn fetch_locked(&self, flight: &mut Flight) -> Result<Arc<Token>, TokenError> {
        let Some(fetcher) = &self.inner.fetcher else {
            // A fixed token never becomes unusable; unreachable in practice.
            return Err(TokenError::Unavailable {
                reason: "no token".into(),
                retry_after: Duration::from_secs(1),
            });
        };
        self.inner.state.store(FETCHING, Ordering::Relaxed);
        let started = Instant::now();
        let fetched = fetcher.fetch().await;
        self.inner.settled.store(true, Ordering::Relaxed);
        match fetched {
            Ok((value, lifetime)) => match Token::new(value, started, lifetime) {
                Some(token) => {
                    let token = Arc::new(token);
                    let old = self.inner.current.swap(Some(Arc::clone(&token)));
                    if old.is_some() {
                        self.inner.previous.store(old);
                    }
                    flight.failures = 0;
                    flight.failed = None;
                    self.inner.state.store(OK, Ordering::Relaxed);
                    self.count("ok");
                    tracing::info!(
                        credential = %self.inner.name,
                        expires_in_secs = lifetime.map(|l| l.as_secs()),
                        "obtained token"
                    );
                    Ok(token)
                }
                None => self.fail(
                    flight,
                    TokenError::Unavailable {
                        reason: "token endpoint returned a token with invalid characters".into(),
                        retry_after: Duration::ZERO,
                    },
                ),
            },
            Err(e) => self.fail(flight, e),
        }
    }

    /// Starts the background refresh task (client-credentials sources only,
    /// once per source). It ends when the last clone of this source is
    /// dropped.
    pub fn spawn_refresher(&self) -> Option<tokio::task::JoinHandle<()>> {
        self.inner.fetcher.as_ref()?;
        if self.inner.refresher_started.swap(true, Ordering::SeqCst) {
            return None;
        }
        let weak = Arc::downgrade(&self.inner);
        Some(tokio::spawn(async move {
            loop {
                let wake = match weak.upgrade() {
                    Some(inner) => TokenSource { inner }.next_wake().await,
                    None => return,
                };
                tokio::time::sleep_until(wake).await;
                match weak.upgrade() {
                    Some(inner) => TokenSource { inner }.refresh().await,
                    None => return,
                }
            }
        }))
    }

    /// When the refresher should act next: at the end of a backoff, at the
    /// current token's refresh time, or now when there is no token.
    async fn next_wake(&self) -> Instant {
        let flight = self.inner.flight.lock().await;
        let now = Instant::now();
        if let Some((until, _)) = &flight.failed
            && *until > now
        {
            return *until;
        }
        match self.inner.current.load().as_ref() {
            // Never sooner than a second after issue, whatever the lifetime.
            Some(t) => t
                .refresh_at()
                .map_or(now + Duration::from_secs(3600), |at| {
                    at.max(t.issued_at() + Duration::from_secs(1))
                }),
            None => now,
        }
    }

    /// Fetches a replacement if the current token is due (or missing) and no
    /// backoff is running.
    async fn refresh(&self) {
        let mut flight = self.inner.flight.lock().await;
        if Self::backing_off(&flight).is_some() {
            return;
        }
        let now = Instant::now();
        let due = match self.inner.current.load().as_ref() {
            Some(t) => t.refresh_at().is_some_and(|at| at <= now) || !t.usable_at(now),
            None => true,
        };
        if due {
            let _ = self.fetch_locked(&mut flight).await;
        }
    }

    /// Tokens that may appear in answers: the current one and the one it
    /// replaced.
    pub fn held(&self) -> [Option<Arc<Token>>; 2] {
        [
            self.inner.current.load_full(),
            self.inner.previous.load_full(),
        ]
    }

    /// Age, remaining life and next refresh of the current token, for
    /// readiness and metrics.
    pub fn info(&self) -> TokenInfo {
        let now = Instant::now();
        let current = self.inner.current.load_full();
        TokenInfo {
            state: self.state(),
            age: current
                .as_ref()
                .map(|t| now.saturating_duration_since(t.issued_at())),
            usable_for: current
                .as_ref()
                .and_then(|t| t.usable_until())
                .map(|u| u.saturating_duration_since(now)),
            refresh_in: current
                .as_ref()
                .and_then(|t| t.refresh_at())
                .map(|r| r.saturating_duration_since(now)),
        }
    }

    fn count(&self, outcome: &'static str) {
        if let Some(m) = &self.inner.metrics {
            m.token_fetch(&self.inner.name, outcome);
        }
    }

    fn fail(&self, flight: &mut Flight, err: TokenError) -> Result<Arc<Token>, TokenError> {
        flight.failures = flight.failures.saturating_add(1);
        self.count(match err {
            TokenError::Rejected { .. } => "rejected",
            TokenError::Unavailable { .. } => "error",
        });
        let delay = backoff(flight.failures);
        self.inner.state.store(FAILING, Ordering::Relaxed);
        match &err {
            TokenError::Rejected { code, message } => tracing::error!(
                credential = %self.inner.name,
                arcgis_code = code,
                arcgis_message = %message,
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
        tokio::time::advance(Duration::from_secs(89)).await;
        assert_eq!(src.token().await.unwrap().expose(), "tok0");
        // 100 s lifetime − 10 s margin: from 90 s on, a new token is fetched.
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

    #[tokio::test(start_paused = true)]
    async fn refresher_replaces_the_token_before_expiry_without_blocking() {
        let (s, src) = scripted(Duration::from_secs(2), |n| {
            Ok((format!("tok{n}"), Some(Duration::from_secs(7200))))
        });
        let task = src.spawn_refresher().unwrap();
        // The first fetch starts at once (2 s of simulated latency).
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(s.calls.load(Ordering::SeqCst), 1);
        assert_eq!(src.state(), TokenState::Ok);
        let info = src.info();
        assert_eq!(info.refresh_in, Some(Duration::from_secs(6900 - 3)));
        // Just before the refresh point: still the first token.
        tokio::time::sleep(Duration::from_secs(6900 - 3 - 1)).await;
        assert_eq!(s.calls.load(Ordering::SeqCst), 1);
        // At 6900 s the refresh starts; while it runs, requests are answered
        // at once with the old, still valid token.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(s.calls.load(Ordering::SeqCst), 2);
        let before = Instant::now();
        assert_eq!(src.token().await.unwrap().expose(), "tok0");
        assert_eq!(Instant::now(), before, "a request waited for the refresh");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(src.token().await.unwrap().expose(), "tok1");
        // The replaced token is still scrubbed from answers.
        let held: Vec<String> = src
            .held()
            .iter()
            .flatten()
            .map(|t| t.expose().to_string())
            .collect();
        assert_eq!(held, ["tok1", "tok0"]);
        task.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn refresher_backs_off_and_keeps_the_old_token_meanwhile() {
        // Call 0 succeeds with a 1000 s token; calls 1-3 fail; call 4 works.
        let (s, src) = scripted(Duration::ZERO, |n| match n {
            0 => Ok(("first".into(), Some(Duration::from_secs(1000)))),
            1..=3 => Err(TokenError::Unavailable {
                reason: "down".into(),
                retry_after: Duration::ZERO,
            }),
            _ => Ok(("second".into(), Some(Duration::from_secs(1000)))),
        });
        let task = src.spawn_refresher().unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(s.calls.load(Ordering::SeqCst), 1);
        // Refresh is due at 800 s; failures back off 1 s, 2 s, 4 s (−20 %).
        tokio::time::sleep(Duration::from_secs(800)).await;
        assert_eq!(s.calls.load(Ordering::SeqCst), 2);
        assert_eq!(src.token().await.unwrap().expose(), "first");
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(s.calls.load(Ordering::SeqCst), 3);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(s.calls.load(Ordering::SeqCst), 4);
        assert_eq!(src.token().await.unwrap().expose(), "first");
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert_eq!(s.calls.load(Ordering::SeqCst), 5);
        assert_eq!(src.token().await.unwrap().expose(), "second");
        // No hot loop afterwards: nothing happens until the next refresh.
        tokio::time::sleep(Duration::from_secs(700)).await;
        assert_eq!(s.calls.load(Ordering::SeqCst), 5);
        task.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn refresher_stops_when_the_source_is_dropped() {
        let (s, src) = scripted(Duration::ZERO, |n| {
            Ok((format!("tok{n}"), Some(Duration::from_secs(100))))
        });
        let task = src.spawn_refresher().unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        drop(src);
        tokio::time::sleep(Duration::from_secs(1000)).await;
        assert!(task.is_finished());
        assert_eq!(s.calls.load(Ordering::SeqCst), 1);
    }

    /// Requests arrive every `lifetime / 40` for 25 lifetimes while the
    /// refresher runs; the token endpoint takes 1 % of the lifetime (at most
    /// 2 s) to answer. Returns the number of fetches and whether any request
    /// after the first had to wait.
    async fn fetches_over_many_lifetimes(lifetime: Duration) -> (usize, bool) {
        let latency = (lifetime / 100).min(Duration::from_secs(2));
        let (s, src) = scripted(latency, move |n| Ok((format!("tok{n}"), Some(lifetime))));
        let task = src.spawn_refresher().unwrap();
        src.token().await.unwrap();
        let mut waited = false;
        for _ in 0..25 * 40 {
            tokio::time::sleep(lifetime / 40).await;
            let before = Instant::now();
            let t = src.token().await.unwrap();
            waited |= Instant::now() != before;
            assert!(t.usable_at(Instant::now()));
        }
        task.abort();
        (s.calls.load(Ordering::SeqCst), waited)
    }

    /// One fetch per refresh interval (plus the first), whatever the
    /// lifetime, and requests never queue behind a fetch. With the old fixed
    /// 30 s margin a 5 s token was never usable and every request fetched.
    #[tokio::test(start_paused = true)]
    async fn token_timing_holds_from_5_seconds_to_14_days() {
        let s = Duration::from_secs;
        for life in [s(5), s(60), s(7200), s(14 * 24 * 3600)] {
            let (fetches, waited) = fetches_over_many_lifetimes(life).await;
            let span = life * 25;
            // The refresh fires `refresh_offset` after the previous token
            // arrived, which is one fetch latency after the refresh began.
            let latency = (life / 100).min(s(2));
            let interval = crate::token::refresh_offset(life) + latency;
            let expected = 1 + (span.as_secs_f64() / interval.as_secs_f64()) as usize;
            assert!(
                fetches.abs_diff(expected) <= 1,
                "{life:?}: {fetches} fetches, expected about {expected}"
            );
            assert!(!waited, "{life:?}: a request waited for a token");
        }
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
