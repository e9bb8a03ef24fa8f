//! Phase 7, observe: what every answer gets on its way out, whatever phase
//! produced it. The request's CORS origin is echoed, the request is counted
//! per route and status and attributed to its allowlist entry, and the
//! access log line is written when the body has been sent (or dropped).
//! [`RequestCtx`] carries what the phases learned to this point.

use std::net::IpAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response};
use http_body_util::BodyExt;
use hyper::body::{Body, SizeHint};
use prometheus_client::metrics::counter::Counter;
use tokio::time::Instant;
use url::Url;

use super::{ConnInfo, Proxy};
use crate::body::{BoxError, PollFrame, ProxyBody};
use crate::error::ProxyError;
use crate::metrics::{AppLabels, RequestLabels};

/// What the phases learned about one request.
pub(super) struct RequestCtx {
    /// The connection it came on.
    pub conn: ConnInfo,
    /// The client's address (behind trusted proxies, the forwarded one).
    pub client: IpAddr,
    /// The app it belongs to (index into `Config::apps`), once admitted.
    pub app: Option<usize>,
    /// Index of the route that serves it.
    pub route: Option<usize>,
    /// The Origin to echo in `Access-Control-Allow-Origin`.
    pub cors_origin: Option<HeaderValue>,
    /// The client's valid `X-Request-Id`, else one made here; sent upstream
    /// and back.
    pub request_id: HeaderValue,
    /// The access log record, when the `access` target is enabled.
    log: Option<AccessLog>,
}

impl RequestCtx {
    /// The context of a request that has just arrived.
    pub fn new<B>(proxy: &Proxy, req: &Request<B>, conn: &ConnInfo) -> RequestCtx {
        // The access log line costs a URL parse and a body wrapper; skip
        // both when the `access` target is filtered out (RUST_LOG=warn).
        let client = proxy.client_ip(req.headers(), conn);
        let request_id = request_id(req.headers());
        let log = tracing::enabled!(target: "access", tracing::Level::INFO).then(|| AccessLog {
            method: req.method().clone(),
            path: clip(req.uri().path(), 256).to_string(),
            target: None,
            request_id: request_id.clone(),
            user_agent: req
                .headers()
                .get(header::USER_AGENT)
                .map(|v| clip(&String::from_utf8_lossy(v.as_bytes()), 256).to_string()),
            protocol: req.version(),
            upstream: None,
            route: None,
            app: None,
            referer: referer_origin(req.headers()),
            client,
            status: 0,
            started: Instant::now(),
            bytes: 0,
            error: None,
        });
        RequestCtx {
            conn: *conn,
            client,
            app: None,
            route: None,
            cors_origin: None,
            request_id,
            log,
        }
    }

    /// Records the upstream URL (no query) for the access log.
    pub fn note_target(&mut self, origin: &str, path: &str) {
        if let Some(log) = self.log.as_mut() {
            let mut target = String::with_capacity(origin.len() + path.len());
            target.push_str(origin);
            target.push_str(clip(path, 512));
            log.target = Some(target);
        }
    }

    /// Records the upstream's status and how long its answer's head took.
    pub fn note_upstream(&mut self, status: http::StatusCode, took: std::time::Duration) {
        if let Some(log) = self.log.as_mut() {
            log.upstream = Some((status.as_u16(), took));
        }
    }
}

/// At most `max` bytes of `s`, cut at a character boundary (log fields
/// stay bounded whatever a client sends).
fn clip(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A request id: the client's `X-Request-Id` when it is 1–128 characters
/// of `A-Z a-z 0-9 - _ . :` (a load balancer's or the app's own), else 16
/// random hex digits (64 bits: enough to tell requests apart in logs, and
/// short, since HTTP/2 encodes every one afresh).
fn request_id(headers: &HeaderMap) -> HeaderValue {
    if let Some(v) = headers.get(&crate::upstream::X_REQUEST_ID)
        && (1..=128).contains(&v.len())
        && v.as_bytes()
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
    {
        return v.clone();
    }
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 16];
    let word = fastrand::u64(..);
    for (i, slot) in out.iter_mut().enumerate() {
        *slot = HEX[((word >> (i * 4)) & 0xf) as usize];
    }
    HeaderValue::from_bytes(&out).expect("hex digits are a valid header value")
}

impl Proxy {
    /// The answer as it leaves: the phases' response, or the error's.
    #[inline]
    pub(super) fn observe(
        &self,
        ctx: RequestCtx,
        result: Result<Response<ProxyBody>, ProxyError>,
    ) -> Response<ProxyBody> {
        let RequestCtx {
            app,
            route,
            cors_origin,
            request_id,
            mut log,
            ..
        } = ctx;
        let mut resp = result.unwrap_or_else(|e| {
            if let Some(log) = log.as_mut() {
                log.error = Some(e.to_string());
            }
            e.into_response()
        });
        // Marked sensitive: each id is new, so HTTP/2's HPACK would insert
        // every one into the connection's header table, evicting the
        // entries that make the other headers cheap; a never-indexed
        // literal costs less than half of that (callgrind, BENCHMARKS.md
        // run AI).
        let mut request_id = request_id;
        request_id.set_sensitive(true);
        resp.headers_mut()
            .insert(&crate::upstream::X_REQUEST_ID, request_id);
        if let Some(origin) = cors_origin {
            let h = resp.headers_mut();
            h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
            h.append(header::VARY, HeaderValue::from_static("Origin"));
        }
        let status = resp.status().as_u16();
        let route_name = || {
            route
                .and_then(|i| self.config.routes.iter().nth(i))
                .map_or_else(|| "none".into(), |r| r.name.clone())
        };
        if let Some(log) = log.as_mut() {
            log.status = status;
            log.route = route.is_some().then(route_name);
            log.app = app.map(|a| self.config.apps.get(a).name.clone());
        }
        match route {
            Some(i) if status == 200 => {
                self.route_metrics[i].ok.inc();
            }
            _ => {
                self.metrics
                    .requests
                    .get_or_create(&RequestLabels {
                        route: route_name(),
                        status,
                    })
                    .inc();
            }
        }
        // Usage attribution, for requests that were admitted and routed.
        let usage = match (app, route) {
            (Some(app), Some(route)) => {
                let usage = self.app_metrics[app].get(route, || {
                    let labels = self.app_labels(app, route);
                    let m = &self.metrics;
                    (
                        m.app_requests.get_or_create(&labels).clone(),
                        m.app_bytes.get_or_create(&labels).clone(),
                    )
                });
                usage.requests().inc();
                Some(usage)
            }
            _ => None,
        };
        resp.map(|b| ObservedBody::wrap(b, log, usage.as_ref().map(Usage::bytes)))
    }

    /// The labels of an app on a route, for the per-app metric families.
    pub(super) fn app_labels(&self, app: usize, route: usize) -> AppLabels {
        AppLabels {
            app: self.config.apps.get(app).name.clone(),
            route: self
                .config
                .routes
                .iter()
                .nth(route)
                .map_or_else(String::new, |r| r.name.clone()),
        }
    }
}

/// One app's usage-attribution counters (requests, bytes), for each route
/// it has been served on. Entries are made on first use, so memory follows
/// the app × route pairs actually seen: a slot for every app times every
/// route was 1,002,000 slots, about 23 MiB, for bigconfig's 1,000 apps and
/// 1,002 routes (BENCHMARKS.md, runs AO).
#[derive(Default)]
pub(super) struct AppUsage {
    /// Sorted by route index; replaced whole when a route is added, so a
    /// request reads it without a lock.
    seen: arc_swap::ArcSwap<Vec<UsageEntry>>,
    /// Serialises additions: two first requests on a route add one entry.
    add: std::sync::Mutex<()>,
}

#[derive(Clone)]
struct UsageEntry {
    route: usize,
    requests: Counter,
    bytes: Counter,
}

/// An app's counters on one route, as found by [`AppUsage::get`].
struct Usage {
    seen: arc_swap::Guard<std::sync::Arc<Vec<UsageEntry>>>,
    at: usize,
}

impl Usage {
    fn requests(&self) -> &Counter {
        &self.seen[self.at].requests
    }

    fn bytes(&self) -> &Counter {
        &self.seen[self.at].bytes
    }
}

impl AppUsage {
    /// The counters for `route`; `make` registers them on first use.
    fn get(&self, route: usize, make: impl FnOnce() -> (Counter, Counter)) -> Usage {
        let seen = self.seen.load();
        if let Ok(at) = seen.binary_search_by_key(&route, |e| e.route) {
            return Usage { seen, at };
        }
        drop(seen);
        let _adding = self.add.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.seen.load_full();
        if let Err(at) = current.binary_search_by_key(&route, |e| e.route) {
            let (requests, bytes) = make();
            let mut next = Vec::with_capacity(current.len() + 1);
            next.extend(current.iter().cloned());
            next.insert(
                at,
                UsageEntry {
                    route,
                    requests,
                    bytes,
                },
            );
            self.seen.store(std::sync::Arc::new(next));
        }
        let seen = self.seen.load();
        let at = seen
            .binary_search_by_key(&route, |e| e.route)
            .expect("added above under the lock");
        Usage { seen, at }
    }
}

/// Only the origin of the Referer (or the Origin) goes into logs: paths and
/// queries of the embedding page are not the operator's business.
#[inline]
fn referer_origin(headers: &HeaderMap) -> Option<String> {
    let v = headers
        .get(header::ORIGIN)
        .or_else(|| headers.get(header::REFERER))?;
    let url = Url::parse(v.to_str().ok()?).ok()?;
    match url.origin() {
        o @ url::Origin::Tuple(..) => Some(o.ascii_serialization()),
        url::Origin::Opaque(_) => None,
    }
}

/// The access log record, written once the response body is finished.
struct AccessLog {
    method: Method,
    path: String,
    /// `scheme://host[:port]/path` upstream, no query.
    target: Option<String>,
    request_id: HeaderValue,
    user_agent: Option<String>,
    protocol: http::Version,
    /// The upstream's status and the time to its answer's head.
    upstream: Option<(u16, std::time::Duration)>,
    route: Option<String>,
    app: Option<String>,
    referer: Option<String>,
    client: IpAddr,
    status: u16,
    started: Instant,
    bytes: u64,
    error: Option<String>,
}

impl AccessLog {
    fn emit(&self, complete: bool) {
        let latency_ms = self.started.elapsed().as_secs_f64() * 1000.0;
        let protocol = match self.protocol {
            http::Version::HTTP_2 => "HTTP/2",
            http::Version::HTTP_10 => "HTTP/1.0",
            _ => "HTTP/1.1",
        };
        tracing::info!(
            target: "access",
            log = "access",
            request_id = self.request_id.to_str().unwrap_or("-"),
            method = %self.method,
            path = %self.path,
            protocol,
            route = self.route.as_deref().unwrap_or("-"),
            app = self.app.as_deref().unwrap_or("-"),
            target = self.target.as_deref().unwrap_or("-"),
            status = self.status,
            upstream_status = self.upstream.map(|(s, _)| s),
            upstream_ms = self
                .upstream
                .map(|(_, t)| (t.as_secs_f64() * 1_000_000.0).round() / 1000.0),
            latency_ms = (latency_ms * 1000.0).round() / 1000.0,
            referer = self.referer.as_deref().unwrap_or("-"),
            user_agent = self.user_agent.as_deref().unwrap_or("-"),
            client = %self.client,
            bytes = self.bytes,
            complete,
            error = self.error.as_deref(),
            "request"
        );
    }
}

/// Watches a response body on its way out: counts its bytes for usage
/// attribution and the access log, and writes the access log line when the
/// body ends or is dropped (client gone). One wrapper for both, and none when
/// neither is wanted.
struct ObservedBody {
    inner: ProxyBody,
    log: Option<AccessLog>,
    bytes: Option<Counter>,
}

impl ObservedBody {
    fn wrap(inner: ProxyBody, mut log: Option<AccessLog>, bytes: Option<&Counter>) -> ProxyBody {
        // A body of known size is counted at once.
        let mut bytes = bytes;
        if let (Some(c), Some(n)) = (bytes, inner.size_hint().exact()) {
            c.inc_by(n);
            bytes = None;
        }
        if inner.is_end_stream()
            && let Some(l) = log.take()
        {
            l.emit(true);
        }
        if log.is_none() && bytes.is_none() {
            return inner;
        }
        ObservedBody {
            inner,
            log,
            bytes: bytes.cloned(),
        }
        .boxed()
    }
}

impl Body for ObservedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> PollFrame {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    let n = d.len() as u64;
                    if let Some(c) = &this.bytes {
                        c.inc_by(n);
                    }
                    if let Some(log) = this.log.as_mut() {
                        log.bytes += n;
                    }
                }
                // hyper stops polling once the body says it has ended.
                if this.inner.is_end_stream()
                    && let Some(log) = this.log.take()
                {
                    log.emit(true);
                }
            }
            Poll::Ready(None) => {
                if let Some(log) = this.log.take() {
                    log.emit(true);
                }
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(mut log) = this.log.take() {
                    log.error = Some("upstream body error".into());
                    log.emit(false);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ObservedBody {
    fn drop(&mut self) {
        if let Some(log) = self.log.take() {
            log.emit(false);
        }
    }
}

#[cfg(test)]
mod clip_tests {
    #[test]
    fn clip_cuts_at_a_character_boundary() {
        assert_eq!(super::clip("abc", 5), "abc");
        assert_eq!(super::clip("abcdef", 3), "abc");
        // "é" is two bytes: never cut in half.
        assert_eq!(super::clip("aé", 2), "a");
        assert_eq!(super::clip("ééé", 5), "éé");
    }
}

#[cfg(test)]
mod usage_tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Barrier};

    use super::*;

    fn counting(made: &AtomicUsize) -> impl FnOnce() -> (Counter, Counter) + '_ {
        || {
            made.fetch_add(1, Ordering::SeqCst);
            (Counter::default(), Counter::default())
        }
    }

    #[test]
    fn app_usage_makes_one_entry_per_route_it_sees() {
        let usage = AppUsage::default();
        let made = AtomicUsize::new(0);
        for route in [5, 1, 900, 5, 1, 5] {
            let u = usage.get(route, counting(&made));
            u.requests().inc();
            u.bytes().inc_by(10);
        }
        assert_eq!(made.load(Ordering::SeqCst), 3);
        let seen = usage.seen.load();
        let found: Vec<(usize, u64, u64)> = seen
            .iter()
            .map(|e| (e.route, e.requests.get(), e.bytes.get()))
            .collect();
        assert_eq!(found, [(1, 2, 20), (5, 3, 30), (900, 1, 10)]);
    }

    #[test]
    fn concurrent_first_requests_on_a_route_share_one_entry() {
        let usage = Arc::new(AppUsage::default());
        let made = Arc::new(AtomicUsize::new(0));
        let start = Arc::new(Barrier::new(8));
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let (usage, made, start) = (usage.clone(), made.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    // Half the threads also add a second route meanwhile.
                    for route in [7, 7 + i % 2] {
                        usage.get(route, counting(&made)).requests().inc();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(made.load(Ordering::SeqCst), 2);
        let seen = usage.seen.load();
        let found: Vec<(usize, u64)> = seen.iter().map(|e| (e.route, e.requests.get())).collect();
        assert_eq!(found, [(7, 12), (8, 4)]);
    }
}
