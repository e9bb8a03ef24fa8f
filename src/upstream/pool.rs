//! Upstream connections for one serving thread: idle HTTP/1.1 connections
//! kept per origin and reused in turn (least recently used first), one
//! shared HTTP/2 connection per origin.
//!
//! This replaces hyper-util's legacy `Client` on the request path. That
//! client does more per request than a proxy with a handful of fixed
//! upstreams needs — it clones itself, races a pool checkout against a lazy
//! connect, and spawns a task to put each HTTP/1 connection back — which
//! showed as about a tenth of the proxy's user CPU in a profile. Here a
//! request takes an idle connection from a short list, the exchange runs in
//! the request's task ([`h1`]) and the response body puts the connection
//! back when it ends. What the legacy client guaranteed is kept: the same
//! verifying TLS connector, a request without a body that a reused
//! connection turned out closed for is sent again on another connection,
//! and idle connections expire (a sweeper also closes those the upstream
//! closed while nobody asked).
//!
//! Reuse in turn spreads requests over every pooled connection, and so over
//! the upstream processes or servers behind them. Most recent first, as
//! before, sent each request to the connection that had answered last;
//! against the bench's two-worker upstream the same source had a higher
//! closed-loop p99 that way in every paired round, and its upstream workers
//! an uneven share of the work (BENCHMARKS.md, run CS). Only connections
//! used within the last second take turns (a quiet pool still takes the
//! most recent, see [`take_idle`]), and connections the load does not need
//! are still closed: the pool remembers the fewest that sat idle after any
//! request took one, and a sweep closes that many once they have gone
//! unneeded for a whole idle timeout.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use http::{Response, Uri, header};
use hyper::body::{Body, Incoming, SizeHint};
use hyper::client::conn::http2;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::Connection;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::{Connector, Outgoing};
use crate::body::{BoxError, PollFrame, ProxyBody};
use crate::upstream;

mod h1;
pub use crate::http1::Error as Http1Error;

/// Idle connections per origin for one serving thread.
pub struct Pool {
    connector: HttpsConnector<Connector>,
    origins: Mutex<Vec<Origin>>,
    idle_timeout: Duration,
    max_idle: usize,
    sweeping: AtomicBool,
}

/// The connections to one `scheme://authority`.
struct Origin {
    origin: String,
    /// Least recently used first: requests take from the front, finished
    /// answers put their connection at the back.
    idle: VecDeque<(h1::Conn, Instant)>,
    /// The fewest connections left in `idle` after a request took one (or
    /// found none) since `spare_since`: that many were not needed all the
    /// while.
    spare: usize,
    spare_since: Instant,
    h2: Option<http2::SendRequest<ProxyBody>>,
    /// Set once a connection negotiated HTTP/1.1: then each request may
    /// open its own connection. Until then the origin may speak HTTP/2,
    /// where one connection serves every request, so connects are single
    /// flight behind `connecting`.
    h1: bool,
    connecting: Arc<tokio::sync::Mutex<()>>,
}

enum Conn {
    H1(h1::Conn),
    H2(http2::SendRequest<ProxyBody>),
}

/// An idle connection, or none and the connect lock to take (if any).
type Checkout = Result<Conn, Option<Arc<tokio::sync::Mutex<()>>>>;

impl Pool {
    /// A pool connecting through `connector`; idle connections are closed
    /// after `idle_timeout`, and at most `max_idle` are kept per origin.
    pub fn new(
        connector: HttpsConnector<Connector>,
        idle_timeout: Duration,
        max_idle: usize,
    ) -> Pool {
        Pool {
            connector,
            origins: Mutex::new(Vec::new()),
            idle_timeout,
            max_idle,
            sweeping: AtomicBool::new(false),
        }
    }

    /// Sends the request `out` describes, with `body`, on a pooled
    /// connection to its origin, or a new one; `now` is the caller's
    /// reading of the clock (idle connections older than the idle timeout
    /// are not used).
    pub async fn send(
        self: &Arc<Self>,
        out: &Outgoing<'_>,
        body: ProxyBody,
        now: Instant,
    ) -> Result<Response<UpstreamBody>, BoxError> {
        let mut body = Some(body);
        let mut encoded: Option<h1::Outbound> = None;
        loop {
            let (slot, idle) = self.checkout(out.origin, now);
            let (conn, reused) = match idle {
                Ok(conn) => (conn, true),
                // Boxed: the connect and HTTP/2 handshake state is several
                // KiB, and every request's future would carry (and move)
                // that much for what happens once per connection.
                Err(None) => (Box::pin(self.connect(slot, out.origin)).await?, false),
                Err(Some(lock)) => Box::pin(self.connect_once(slot, out.origin, lock)).await?,
            };
            match conn {
                Conn::H2(mut sender) => {
                    let body = body
                        .take()
                        .ok_or("upstream changed from HTTP/1.1 to HTTP/2 mid-request")?;
                    let mut req = upstream::build_request(out, body)?;
                    // `:authority` carries the host on HTTP/2.
                    req.headers_mut().remove(header::HOST);
                    let resp = sender.send_request(req).await?;
                    return Ok(resp.map(|b| UpstreamBody(Inner::H2(b))));
                }
                Conn::H1(mut conn) => {
                    let encoded = match &mut encoded {
                        Some(e) => e,
                        None => {
                            let body = body.take().ok_or("request already sent")?;
                            encoded.insert(h1::Outbound::new(out, body, conn.forward()))
                        }
                    };
                    match h1::exchange(&mut conn, encoded).await {
                        Ok(answer) => {
                            let resp = h1::into_response(answer, conn, Arc::clone(self), slot);
                            return Ok(resp.map(|b| UpstreamBody(Inner::H1(b))));
                        }
                        // A reused connection the upstream had closed
                        // while it was idle; nothing of the request was
                        // acted on, so it goes out again.
                        Err(Http1Error::Closed(_)) if reused && encoded.replayable() => {}
                        Err(e) => return Err(e.into()),
                    }
                }
            }
        }
    }

    fn origins(&self) -> MutexGuard<'_, Vec<Origin>> {
        self.origins.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a connection idle since `since` is too old to use at `now`.
    fn expired(&self, since: Instant, now: Instant) -> bool {
        now.saturating_duration_since(since) >= self.idle_timeout
    }

    /// The slot of `origin` (added on first use) and, under the same lock, a
    /// live connection to it if one is idle (see [`take_idle`]). With none,
    /// `Err` holds the origin's connect lock while it may speak HTTP/2.
    fn checkout(&self, origin: &str, now: Instant) -> (usize, Checkout) {
        let mut origins = self.origins();
        let slot = match origins.iter().position(|o| o.origin == origin) {
            Some(i) => i,
            None => {
                origins.push(Origin {
                    origin: origin.to_string(),
                    idle: VecDeque::new(),
                    spare: 0,
                    spare_since: now,
                    h2: None,
                    h1: false,
                    connecting: Arc::default(),
                });
                origins.len() - 1
            }
        };
        let entry = &mut origins[slot];
        if let Some(h2) = entry.h2.as_ref() {
            if !h2.is_closed() {
                return (slot, Ok(Conn::H2(h2.clone())));
            }
            entry.h2 = None;
        }
        while let Some((mut conn, since)) = take_idle(&mut entry.idle, now) {
            if !self.expired(since, now) && !conn.is_dead() {
                entry.spare = entry.spare.min(entry.idle.len());
                return (slot, Ok(Conn::H1(conn)));
            }
        }
        entry.spare = 0;
        (
            slot,
            Err((!entry.h1).then(|| Arc::clone(&entry.connecting))),
        )
    }

    /// Connects to an origin that may speak HTTP/2, one request at a time:
    /// the others wait, then find the HTTP/2 connection the first one made
    /// (or, once the origin is known to speak HTTP/1.1, connect on their
    /// own). Without this, N concurrent first requests opened N
    /// connections and only the last one stored was kept.
    async fn connect_once(
        self: &Arc<Self>,
        slot: usize,
        origin: &str,
        lock: Arc<tokio::sync::Mutex<()>>,
    ) -> Result<(Conn, bool), BoxError> {
        let guard = lock.lock_owned().await;
        match self.checkout(origin, Instant::now()).1 {
            Ok(conn) => Ok((conn, true)),
            Err(Some(_)) => Ok((self.connect(slot, origin).await?, false)),
            Err(None) => {
                drop(guard);
                Ok((self.connect(slot, origin).await?, false))
            }
        }
    }

    async fn connect(self: &Arc<Self>, slot: usize, origin: &str) -> Result<Conn, BoxError> {
        let uri: Uri = origin.parse()?;
        if uri.scheme().is_none() || uri.authority().is_none() {
            return Err(format!("upstream origin {origin:?} without scheme or authority").into());
        }
        self.start_sweeping();
        let mut connector = self.connector.clone();
        let stream = tower_service::Service::call(&mut connector, uri).await?;
        if stream.connected().is_negotiated_h2() {
            let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(stream)
                .await?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "upstream HTTP/2 connection ended");
                }
            });
            self.origins()[slot].h2 = Some(sender.clone());
            Ok(Conn::H2(sender))
        } else {
            self.origins()[slot].h1 = true;
            Ok(Conn::H1(h1::Conn::new(h1::from_connector(stream))))
        }
    }

    /// Keeps an HTTP/1 connection whose answer has ended for a later request.
    fn put_back(&self, slot: usize, conn: h1::Conn) {
        let now = Instant::now();
        let mut origins = self.origins();
        let idle = &mut origins[slot].idle;
        while idle
            .front()
            .is_some_and(|(_, since)| self.expired(*since, now))
        {
            idle.pop_front();
        }
        if idle.len() < self.max_idle {
            idle.push_back((conn, now));
        }
    }

    /// Closes idle connections that expired or that the upstream closed,
    /// also while no request comes to find them, and, once per idle
    /// timeout, as many as the load left spare all that time.
    fn sweep(&self) {
        let now = Instant::now();
        for origin in self.origins().iter_mut() {
            origin
                .idle
                .retain_mut(|(conn, since)| !self.expired(*since, now) && !conn.is_dead());
            if self.expired(origin.spare_since, now) {
                let spare = origin.spare.min(origin.idle.len());
                // The least recently used: the next ones a request would take.
                origin.idle.drain(..spare);
                origin.spare = origin.idle.len();
                origin.spare_since = now;
            }
        }
    }

    /// Starts the sweeping task on first use; it ends with the pool.
    fn start_sweeping(self: &Arc<Self>) {
        if self.sweeping.swap(true, Ordering::Relaxed) {
            return;
        }
        let pool: Weak<Pool> = Arc::downgrade(self);
        let every = (self.idle_timeout / 3).max(Duration::from_millis(100));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(pool) = pool.upgrade() else { return };
                pool.sweep();
            }
        });
    }

    /// Idle HTTP/1 connections held, all origins (for tests).
    #[cfg(test)]
    fn idle_count(&self) -> usize {
        let origins = self.origins();
        origins.iter().map(|o| o.idle.len()).sum()
    }
}

/// How recently a connection must have been used to be taken in turn.
/// Shorter than any upstream's keep-alive timeout worth the name (Apache
/// and Node.js close after 5 s), so reuse in turn never picks a connection
/// the upstream may be closing.
const FRESH: Duration = Duration::from_secs(1);

/// Takes an idle connection from `idle` (least recently used first): the
/// least recently used of those used within [`FRESH`], so that a busy
/// pool's requests take every connection in turn; when none is that fresh,
/// the most recently used, so that the others go on idling until they
/// expire, as the upstream may be closing them.
fn take_idle<C>(idle: &mut VecDeque<(C, Instant)>, now: Instant) -> Option<(C, Instant)> {
    let fresh = |since: &Instant| now.saturating_duration_since(*since) < FRESH;
    // A busy pool: the least recently used is fresh, so all are.
    if idle.front().is_some_and(|(_, since)| fresh(since)) {
        return idle.pop_front();
    }
    let stale = idle.partition_point(|(_, since)| !fresh(since));
    if stale < idle.len() {
        idle.remove(stale)
    } else {
        idle.pop_back()
    }
}

/// An upstream response body. An HTTP/1 connection goes back to its pool
/// when the body has been read to the end; dropped earlier, it is closed.
pub struct UpstreamBody(Inner);

enum Inner {
    H1(h1::Body),
    H2(Incoming),
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.0 {
            Inner::H1(_) => "UpstreamBody(HTTP/1.1)",
            Inner::H2(_) => "UpstreamBody(HTTP/2)",
        })
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> PollFrame {
        loop {
            let frame = match &mut self.0 {
                Inner::H1(b) => {
                    ready!(Pin::new(b).poll_frame(cx)).map(|f| f.map_err(BoxError::from))
                }
                Inner::H2(b) => {
                    ready!(Pin::new(b).poll_frame(cx)).map(|f| f.map_err(BoxError::from))
                }
            };
            // Upstream trailers never reach the client: they are header
            // fields the response-header scrubbing never sees, so one could
            // carry the token back. ArcGIS sends none.
            match frame {
                Some(Ok(f)) if f.is_trailers() => continue,
                other => return Poll::Ready(other),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Inner::H1(b) => b.is_end_stream(),
            Inner::H2(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.0 {
            Inner::H1(b) => b.size_hint(),
            Inner::H2(b) => b.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;
    use http_body_util::BodyExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn pool() -> Arc<Pool> {
        let tls = Arc::new(crate::tls::client_config(&[]));
        let https = HttpsConnector::from((direct(), tls));
        Arc::new(Pool::new(https, Duration::from_secs(90), 4))
    }

    /// A connector without an outbound proxy.
    fn direct() -> Connector {
        Connector::new(&Default::default(), Duration::from_secs(5))
    }

    /// Sends `req` as the proxy would: its URI's origin and target, its
    /// headers as the client's, `Content-Length` as the known length.
    async fn send_req(
        pool: &Arc<Pool>,
        req: Request<ProxyBody>,
    ) -> Result<Response<UpstreamBody>, BoxError> {
        let (parts, body) = req.into_parts();
        let origin = match (parts.uri.scheme_str(), parts.uri.authority()) {
            (Some(s), Some(a)) => format!("{s}://{a}"),
            _ => String::new(),
        };
        let host = parts.headers[header::HOST].clone();
        let out = Outgoing {
            origin: &origin,
            target: parts.uri.path_and_query().map_or("/", |pq| pq.as_str()),
            host: &host,
            headers: &parts.headers,
            method: &parts.method,
            auth_header: None,
            upstream_referer: None,
            request_id: None,
            content_length: parts
                .headers
                .get(header::CONTENT_LENGTH)
                .map(|v| v.to_str().unwrap().parse().unwrap()),
            decodable_only: false,
        };
        pool.send(&out, body, Instant::now()).await
    }

    fn get(port: u16, path: &str) -> Request<ProxyBody> {
        let mut req = Request::new(crate::body::empty());
        *req.uri_mut() = format!("http://127.0.0.1:{port}{path}").parse().unwrap();
        req.headers_mut().insert(
            header::HOST,
            http::HeaderValue::from_str(&format!("127.0.0.1:{port}")).unwrap(),
        );
        req
    }

    /// A pool, and an upstream answering `body` up to `per_conn` times per
    /// connection that counts its connections.
    async fn pool_and_upstream(
        body: &'static str,
        per_conn: usize,
    ) -> (Arc<Pool>, u16, Arc<AtomicUsize>) {
        let (port, conns) = upstream(body, per_conn).await;
        (pool(), port, conns)
    }

    /// Listens on a free port and hands each connection to `serve` in a
    /// task of its own: the port, and how many connections were accepted.
    async fn serve_counting<F, Fut>(serve: F) -> (u16, Arc<AtomicUsize>)
    where
        F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let conns = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&conns);
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(tcp));
            }
        });
        (port, conns)
    }

    /// A raw HTTP/1.1 upstream: answers each request on a connection with
    /// `body`, closing the connection after `per_conn` answers (without
    /// saying so, as an upstream's idle timeout would). Counts connections.
    async fn upstream(body: &'static str, per_conn: usize) -> (u16, Arc<AtomicUsize>) {
        serve_counting(move |mut s| async move {
            let mut buf = Vec::new();
            for _ in 0..per_conn {
                let Some(req) = read_request(&mut s, &mut buf).await else {
                    return;
                };
                let head = String::from_utf8_lossy(&req);
                assert!(head.starts_with("GET /"), "origin-form expected: {head}");
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                if s.write_all(answer.as_bytes()).await.is_err() {
                    return;
                }
            }
        })
        .await
    }

    /// `n` GETs of `path`, one after another, each read to the end and
    /// followed by `pause`, against an upstream that closes a connection
    /// after `per_conn` answers: the pool, and the connections the
    /// upstream saw.
    async fn gets_in_turn(
        per_conn: usize,
        n: usize,
        path: &str,
        pause: Duration,
    ) -> (Arc<Pool>, usize) {
        let (pool, port, conns) = pool_and_upstream("hello", per_conn).await;
        for _ in 0..n {
            assert_eq!(get_text(&pool, port, path).await, "hello");
            tokio::time::sleep(pause).await;
        }
        (pool, conns.load(Ordering::SeqCst))
    }

    /// GET `path`, read to the end.
    async fn get_text(pool: &Arc<Pool>, port: u16, path: &str) -> String {
        text(send_req(pool, get(port, path)).await.unwrap()).await
    }

    async fn text(resp: Response<UpstreamBody>) -> String {
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    /// What a scripted upstream does with one request.
    enum Act {
        /// Writes these bytes.
        Send(Vec<u8>),
        /// Writes these bytes, then keeps the connection open without
        /// reading for a while.
        SendHold(Vec<u8>),
        /// Writes these bytes and closes.
        SendClose(Vec<u8>),
        /// Closes the connection without answering.
        Close,
    }

    /// Reads one request (head, and a body framed by Content-Length or
    /// chunked) from `buf`/`s`; `None` at EOF.
    async fn read_request(s: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
        let find = |buf: &[u8], pat: &[u8]| buf.windows(pat.len()).position(|w| w == pat);
        async fn more(s: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> bool {
            let mut chunk = [0u8; 16 * 1024];
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => false,
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    true
                }
            }
        }
        let head_end = loop {
            if let Some(i) = find(buf, b"\r\n\r\n") {
                break i + 4;
            }
            if !more(s, buf).await {
                return None;
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let end = if let Some(cl) = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
        {
            head_end + cl.trim().parse::<usize>().unwrap()
        } else if head.contains("transfer-encoding: chunked") {
            loop {
                if let Some(i) = find(&buf[head_end..], b"0\r\n\r\n") {
                    break head_end + i + 5;
                }
                if !more(s, buf).await {
                    return None;
                }
            }
        } else {
            head_end
        };
        while buf.len() < end {
            if !more(s, buf).await {
                return None;
            }
        }
        Some(buf.drain(..end).collect())
    }

    /// A raw upstream acting out `script(connection, request, raw request)`
    /// (both counted from 0); counts connections.
    async fn scripted<F>(script: F) -> (u16, Arc<AtomicUsize>)
    where
        F: Fn(usize, usize, &[u8]) -> Act + Send + Sync + 'static,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let conns = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&conns);
        let script = Arc::new(script);
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let c = counted.fetch_add(1, Ordering::SeqCst);
                let script = Arc::clone(&script);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    for i in 0.. {
                        let Some(req) = read_request(&mut s, &mut buf).await else {
                            return;
                        };
                        match script(c, i, &req) {
                            Act::Send(b) => {
                                if s.write_all(&b).await.is_err() {
                                    return;
                                }
                            }
                            Act::SendHold(b) => {
                                let _ = s.write_all(&b).await;
                                tokio::time::sleep(Duration::from_secs(2)).await;
                                return;
                            }
                            Act::SendClose(b) => {
                                let _ = s.write_all(&b).await;
                                return;
                            }
                            Act::Close => return,
                        }
                    }
                });
            }
        });
        (port, conns)
    }

    /// An upstream giving every request the same raw answer.
    async fn answering(raw: &'static [u8]) -> (u16, Arc<AtomicUsize>) {
        scripted(move |_, _, _| Act::Send(raw.to_vec())).await
    }

    /// Sends `req` and reads the whole answer: status, body, trailers.
    async fn fetch(
        pool: &Arc<Pool>,
        req: Request<ProxyBody>,
    ) -> Result<(u16, Bytes, Option<http::HeaderMap>), BoxError> {
        let resp = send_req(pool, req).await?;
        let status = resp.status().as_u16();
        let collected = resp.into_body().collect().await?;
        let trailers = collected.trailers().cloned();
        Ok((status, collected.to_bytes(), trailers))
    }

    fn with_method(
        mut req: Request<ProxyBody>,
        method: http::Method,
        body: ProxyBody,
    ) -> Request<ProxyBody> {
        *req.method_mut() = method;
        *req.body_mut() = body;
        req
    }

    #[tokio::test]
    async fn answer_bodies_are_framed_by_length_chunks_or_close() {
        // Chunked with an extension and trailers; reused afterwards.
        let (port, conns) = answering(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nx-t: 1\r\n\r\n",
        )
        .await;
        let pool = pool();
        for _ in 0..3 {
            let (status, body, trailers) = fetch(&pool, get(port, "/")).await.unwrap();
            assert_eq!((status, &body[..]), (200, &b"hello world"[..]));
            // Read (the decoder parses them) but never passed on.
            assert_eq!(trailers, None, "upstream trailers reached the client side");
        }
        assert_eq!(conns.load(Ordering::SeqCst), 1);
        assert_eq!(pool.idle_count(), 1);

        // Chunked without trailers (and a size with leading zeros).
        let (port, conns) =
            answering(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n000000000000000002\r\nok\r\n0\r\n\r\n").await;
        let pool = self::pool();
        for _ in 0..3 {
            let (status, body, trailers) = fetch(&pool, get(port, "/")).await.unwrap();
            assert_eq!((status, &body[..], trailers), (200, &b"ok"[..], None));
        }
        assert_eq!(conns.load(Ordering::SeqCst), 1);

        // Until the upstream closes: never reused.
        let (port, conns) = scripted(|_, _, _| {
            Act::SendClose(b"HTTP/1.1 200 OK\r\nx: y\r\n\r\nuntil the end".to_vec())
        })
        .await;
        let pool = self::pool();
        for _ in 0..2 {
            let (status, body, _) = fetch(&pool, get(port, "/")).await.unwrap();
            assert_eq!((status, &body[..]), (200, &b"until the end"[..]));
        }
        assert_eq!(conns.load(Ordering::SeqCst), 2);
        assert_eq!(pool.idle_count(), 0);

        // No body for HEAD, 204 and 304 whatever their headers say; a 1xx
        // before the answer is skipped. All on one connection.
        let (port, conns) = scripted(|_, i, _| {
            Act::Send(match i {
                0 => b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n".to_vec(),
                1 => b"HTTP/1.1 204 No Content\r\ncontent-length: 10\r\n\r\n".to_vec(),
                2 => b"HTTP/1.1 304 Not Modified\r\ntransfer-encoding: chunked\r\n\r\n".to_vec(),
                3 => b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec(),
                _ => b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n".to_vec(),
            })
        })
        .await;
        let pool = self::pool();
        let head = with_method(get(port, "/"), http::Method::HEAD, crate::body::empty());
        assert_eq!(fetch(&pool, head).await.unwrap().0, 200);
        let (status, body, _) = fetch(&pool, get(port, "/")).await.unwrap();
        assert_eq!((status, body.len()), (204, 0));
        let (status, body, _) = fetch(&pool, get(port, "/")).await.unwrap();
        assert_eq!((status, body.len()), (304, 0));
        let (status, body, _) = fetch(&pool, get(port, "/")).await.unwrap();
        assert_eq!((status, &body[..]), (200, &b"ok"[..]));
        let resp = send_req(&pool, get(port, "/")).await.unwrap();
        assert!(
            resp.body().is_end_stream(),
            "Content-Length: 0 is an ended body"
        );
        drop(resp);
        assert_eq!(conns.load(Ordering::SeqCst), 1);
        assert_eq!(pool.idle_count(), 1);
    }

    #[tokio::test]
    async fn connection_level_answer_headers_are_consumed_or_left_for_cleaning() {
        let (port, _) = scripted(|_, i, _| {
            Act::Send(match i {
                0 => b"HTTP/1.1 200 OK\r\nconnection: keep-alive\r\nkeep-alive: timeout=5\r\ntransfer-encoding: chunked\r\nx-a: 1\r\n\r\n0\r\n\r\n".to_vec(),
                _ => b"HTTP/1.1 200 OK\r\nconnection: keep-alive, X-Hop\r\nx-hop: secret\r\ncontent-length: 0\r\n\r\n".to_vec(),
            })
        })
        .await;
        let pool = pool();
        let resp = send_req(&pool, get(port, "/")).await.unwrap();
        let names: Vec<&str> = resp.headers().keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-a"]);
        resp.into_body().collect().await.unwrap();
        // Naming another header: kept, so that header is removed with it.
        let mut resp = send_req(&pool, get(port, "/")).await.unwrap();
        assert!(resp.headers().contains_key("connection"));
        upstream::clean_response_headers(resp.headers_mut());
        let names: Vec<&str> = resp.headers().keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["content-length"]);
    }

    #[tokio::test]
    async fn hostile_answers_are_errors_and_their_connections_are_dropped() {
        let huge_head = format!(
            "HTTP/1.1 200 OK\r\nx-big: {}\r\ncontent-length: 0\r\n\r\n",
            "a".repeat(70 * 1024)
        );
        let many_headers = format!(
            "HTTP/1.1 200 OK\r\n{}content-length: 0\r\n\r\n",
            "x-h: 1\r\n".repeat(101)
        );
        let long_chunk_line = format!(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;{}\r\nhello\r\n0\r\n\r\n",
            "x".repeat(5000)
        );
        let huge_trailers = format!(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\n{}\r\n",
            "x-t: 1\r\n".repeat(3000)
        );
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("conflicting lengths", b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ncontent-length: 4\r\n\r\nabcd".to_vec()),
            ("conflicting length list", b"HTTP/1.1 200 OK\r\ncontent-length: 3, 4\r\n\r\nabcd".to_vec()),
            ("negative length", b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n".to_vec()),
            ("overflowing length", b"HTTP/1.1 200 OK\r\ncontent-length: 99999999999999999999\r\n\r\n".to_vec()),
            ("signed length", b"HTTP/1.1 200 OK\r\ncontent-length: +4\r\n\r\nabcd".to_vec()),
            ("chunk size not hex", b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n".to_vec()),
            ("chunk size overflow", b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n10000000000000000\r\nhello\r\n".to_vec()),
            ("chunk size with garbage", b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5 x\r\nhello\r\n0\r\n\r\n".to_vec()),
            ("chunk without CRLF", b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n".to_vec()),
            ("bare LF chunk line", b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n".to_vec()),
            ("chunk line too long", long_chunk_line.into_bytes()),
            ("trailers too large", huge_trailers.into_bytes()),
            ("head too large", huge_head.into_bytes()),
            ("too many headers", many_headers.into_bytes()),
            ("folded header", b"HTTP/1.1 200 OK\r\nx-a: a\r\n b\r\ncontent-length: 0\r\n\r\n".to_vec()),
            ("protocol switch", b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n".to_vec()),
            ("status out of range", b"HTTP/1.1 2000 OK\r\ncontent-length: 0\r\n\r\n".to_vec()),
            ("not HTTP", b"SSH-2.0-OpenSSH_9.2\r\n\r\n".to_vec()),
        ];
        for (what, raw) in cases {
            let raw = Arc::new(raw);
            let (port, _) = scripted(move |_, _, _| Act::SendHold(raw.to_vec())).await;
            let pool = pool();
            let result = fetch(&pool, get(port, "/")).await;
            assert!(result.is_err(), "{what}: accepted as {result:?}");
            assert_eq!(pool.idle_count(), 0, "{what}: connection kept");
        }

        // Cut short: the announced length never arrives.
        for raw in [
            &b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort"[..],
            &b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhel"[..],
            &b"HTTP/1.1 200 OK\r\ncontent-le"[..],
        ] {
            let (port, _) = scripted(move |_, _, _| Act::SendClose(raw.to_vec())).await;
            let pool = pool();
            assert!(fetch(&pool, get(port, "/")).await.is_err(), "{raw:?}");
            assert_eq!(pool.idle_count(), 0);
        }
    }

    #[tokio::test]
    async fn answers_that_may_not_share_a_connection_are_not_reused() {
        for raw in [
            // Both framings: read as chunked, then the connection is done.
            &b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"[..],
            &b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok"[..],
            &b"HTTP/1.1 200 OK\r\nconnection: keep-alive, Close\r\ncontent-length: 2\r\n\r\nok"[..],
            &b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok"[..],
            // More than the answer: something the upstream was not asked.
            &b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"[..],
        ] {
            let (port, conns) = answering(raw).await;
            let pool = pool();
            for _ in 0..2 {
                let (status, body, _) = fetch(&pool, get(port, "/")).await.unwrap();
                assert_eq!((status, &body[..]), (200, &b"ok"[..]), "{raw:?}");
            }
            assert_eq!(conns.load(Ordering::SeqCst), 2, "{raw:?}");
        }
        // HTTP/1.0 asking to be kept is kept.
        let (port, conns) =
            answering(b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 2\r\n\r\nok")
                .await;
        let pool = pool();
        for _ in 0..2 {
            fetch(&pool, get(port, "/")).await.unwrap();
        }
        assert_eq!(conns.load(Ordering::SeqCst), 1);
    }

    /// The raw bytes of each request, answered with them as the body.
    async fn mirror() -> u16 {
        scripted(|_, _, req| {
            let mut a =
                format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n", req.len()).into_bytes();
            a.extend_from_slice(req);
            Act::Send(a)
        })
        .await
        .0
    }

    fn streamed(pieces: Vec<Result<Bytes, BoxError>>) -> ProxyBody {
        let frames =
            futures_util::stream::iter(pieces.into_iter().map(|p| p.map(hyper::body::Frame::data)));
        http_body_util::StreamBody::new(frames).boxed()
    }

    #[tokio::test]
    async fn request_bodies_are_framed_as_announced() {
        let port = mirror().await;
        let pool = pool();
        let text = |b: Bytes| String::from_utf8(b.to_vec()).unwrap();

        // Unknown length: chunked, small pieces copied, a large one not.
        let big = Bytes::from(vec![b'y'; 5000]);
        let body = streamed(vec![
            Ok(Bytes::from_static(b"abc")),
            Ok(Bytes::new()),
            Ok(big.clone()),
        ]);
        let (_, raw, _) = fetch(
            &pool,
            with_method(get(port, "/up"), http::Method::POST, body),
        )
        .await
        .unwrap();
        let raw = text(raw);
        assert!(raw.starts_with("POST /up HTTP/1.1\r\n"), "{raw}");
        assert!(raw.contains("\r\ntransfer-encoding: chunked\r\n"), "{raw}");
        let expected = format!(
            "\r\n\r\n3\r\nabc\r\n1388\r\n{}\r\n0\r\n\r\n",
            "y".repeat(5000)
        );
        assert!(raw.ends_with(&expected), "{raw}");

        // Announced length: the bytes as they are.
        let mut req = with_method(
            get(port, "/len"),
            http::Method::PUT,
            crate::body::full("hello"),
        );
        req.headers_mut().insert(header::CONTENT_LENGTH, 5.into());
        let raw = text(fetch(&pool, req).await.unwrap().1);
        assert!(
            raw.contains("\r\ncontent-length: 5\r\n") && raw.ends_with("\r\n\r\nhello"),
            "{raw}"
        );
        assert!(!raw.contains("transfer-encoding"), "{raw}");

        // Empty POST: an explicit zero length; empty GET: no framing at all.
        let post = with_method(get(port, "/p"), http::Method::POST, crate::body::empty());
        let raw = text(fetch(&pool, post).await.unwrap().1);
        assert!(raw.ends_with("content-length: 0\r\n\r\n"), "{raw}");
        let raw = text(fetch(&pool, get(port, "/g?x=1")).await.unwrap().1);
        assert!(
            raw.starts_with("GET /g?x=1 HTTP/1.1\r\nhost: 127.0.0.1:"),
            "{raw}"
        );
        assert!(
            !raw.contains("content-length") && !raw.contains("transfer-encoding"),
            "{raw}"
        );

        // A body that disagrees with its announced length is refused.
        for (announced, body) in [(3u64, "toolong"), (9, "short")] {
            let mut req = with_method(
                get(port, "/bad"),
                http::Method::PUT,
                crate::body::full(body),
            );
            req.headers_mut()
                .insert(header::CONTENT_LENGTH, announced.into());
            let err = send_req(&pool, req).await.expect_err(body);
            let err = err.downcast_ref::<Http1Error>().expect("an HTTP/1 error");
            assert!(err.is_request_body(), "{err}");
        }
    }

    #[tokio::test]
    async fn a_failing_request_body_never_reaches_the_upstream_whole() {
        let received = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&received);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let seen = Arc::clone(&seen);
                tokio::spawn(async move {
                    let mut all = Vec::new();
                    let _ = s.read_to_end(&mut all).await;
                    seen.lock().unwrap().push(all);
                });
            }
        });
        let pool = pool();
        // Fails before its first piece: nothing is written at all.
        let body = streamed(vec![Err("client framing broken".into())]);
        let err = send_req(
            &pool,
            with_method(get(port, "/x"), http::Method::POST, body),
        )
        .await
        .expect_err("a failed body");
        assert!(err.downcast_ref::<Http1Error>().unwrap().is_request_body());
        // Fails after a piece: the upstream sees an unfinished chunked body.
        let body = streamed(vec![Ok(Bytes::from_static(b"abc")), Err("cut".into())]);
        assert!(
            send_req(
                &pool,
                with_method(get(port, "/y"), http::Method::POST, body)
            )
            .await
            .is_err()
        );
        assert_eq!(pool.idle_count(), 0);
        for _ in 0..100 {
            if received.lock().unwrap().len() == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut got = received.lock().unwrap().clone();
        got.sort_by_key(Vec::len);
        assert_eq!(got.len(), 2);
        assert!(got[0].is_empty(), "{:?}", String::from_utf8_lossy(&got[0]));
        let partial = String::from_utf8_lossy(&got[1]).to_string();
        assert!(partial.ends_with("\r\n\r\n3\r\nabc\r\n"), "{partial}");
    }

    #[tokio::test]
    async fn an_answer_before_the_upload_ended_is_delivered() {
        // Answers as soon as the head arrives and stops reading, as an
        // upstream refusing a large upload does.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            let _ = s
                .write_all(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 8\r\n\r\ntoo much")
                .await;
            tokio::time::sleep(Duration::from_secs(5)).await;
        });
        // 64 MiB, far more than socket buffers hold.
        let piece = Bytes::from(vec![b'z'; 1 << 20]);
        let body = streamed((0..64).map(|_| Ok(piece.clone())).collect());
        let pool = pool();
        let (status, body, _) = fetch(
            &pool,
            with_method(get(port, "/up"), http::Method::POST, body),
        )
        .await
        .unwrap();
        assert_eq!((status, &body[..]), (413, &b"too much"[..]));
        assert_eq!(
            pool.idle_count(),
            0,
            "half-sent request: connection not reusable"
        );
    }

    #[tokio::test]
    async fn a_reused_connection_found_closed_is_retried_only_when_safe() {
        // Each connection answers once, then closes on the next request
        // without a word: the race with an upstream's idle timeout.
        let script = |_, i, _: &[u8]| match i {
            0 => Act::Send(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec()),
            _ => Act::Close,
        };
        let (port, conns) = scripted(script).await;
        let pool = pool();
        for _ in 0..3 {
            let (status, _, _) = fetch(&pool, get(port, "/")).await.unwrap();
            assert_eq!(status, 200);
        }
        assert_eq!(
            conns.load(Ordering::SeqCst),
            3,
            "each GET after the first retried once"
        );

        // A POST may have been acted on: its failure is reported, not
        // repeated.
        let (port, conns) = scripted(script).await;
        let pool = self::pool();
        fetch(&pool, get(port, "/")).await.unwrap();
        let post = with_method(get(port, "/"), http::Method::POST, crate::body::full("x"));
        let mut post = post;
        post.headers_mut().insert(header::CONTENT_LENGTH, 1.into());
        let err = send_req(&pool, post)
            .await
            .expect_err("closed without an answer");
        assert!(
            matches!(
                err.downcast_ref::<Http1Error>(),
                Some(Http1Error::Closed(_))
            ),
            "{err}"
        );
        assert_eq!(conns.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_connections_expire_and_closed_ones_are_swept() {
        // Kept open by the upstream: expires after the idle timeout.
        let (port, _) = answering(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
        let pool = pool();
        fetch(&pool, get(port, "/")).await.unwrap();
        pool.sweep();
        assert_eq!(pool.idle_count(), 1);
        tokio::time::advance(Duration::from_secs(91)).await;
        pool.sweep();
        assert_eq!(pool.idle_count(), 0);

        // Closed by the upstream while idle: swept without waiting.
        let (port, _) = scripted(|_, _, _| {
            Act::SendClose(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok".to_vec())
        })
        .await;
        fetch(&pool, get(port, "/")).await.unwrap();
        assert_eq!(pool.idle_count(), 1);
        for _ in 0..100 {
            tokio::task::yield_now().await;
            pool.sweep();
            if pool.idle_count() == 0 {
                break;
            }
            // Lets the event loop see the close (a real wait: sockets).
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(pool.idle_count(), 0);
    }

    #[tokio::test]
    async fn a_read_answer_returns_its_connection_for_reuse() {
        let (pool, conns) = gets_in_turn(100, 5, "/a?b=1", Duration::ZERO).await;
        assert_eq!(conns, 1);
        assert_eq!(pool.idle_count(), 1);
    }

    #[tokio::test]
    async fn an_unread_answer_keeps_its_connection_out_of_the_pool() {
        let (pool, port, conns) = pool_and_upstream("hello", 100).await;
        let first = send_req(&pool, get(port, "/")).await.unwrap();
        // Still being read: the next request needs its own connection.
        let second = send_req(&pool, get(port, "/")).await.unwrap();
        assert_eq!(conns.load(Ordering::SeqCst), 2);
        drop(first);
        assert_eq!(text(second).await, "hello");
        assert_eq!(pool.idle_count(), 1);
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_is_replaced() {
        // One answer per connection, then a silent close; the pause lets
        // the connection task see the close.
        let (_, conns) = gets_in_turn(1, 4, "/", Duration::from_millis(20)).await;
        assert_eq!(conns, 4);
    }

    #[tokio::test]
    async fn idle_connections_are_bounded() {
        let (pool, port, conns) = pool_and_upstream("x", 100).await;
        let mut open = Vec::new();
        for _ in 0..6 {
            open.push(send_req(&pool, get(port, "/")).await.unwrap());
        }
        for resp in open {
            text(resp).await;
        }
        assert_eq!(conns.load(Ordering::SeqCst), 6);
        assert_eq!(pool.idle_count(), 4);
    }

    /// An upstream answering each request with the number of the
    /// connection it came on (counted from 0).
    async fn naming_connections() -> (u16, Arc<AtomicUsize>) {
        scripted(|c, _, _| {
            let name = c.to_string();
            Act::Send(
                format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{name}",
                    name.len()
                )
                .into_bytes(),
            )
        })
        .await
    }

    /// Sends `n` requests at once (so on `n` connections unless that many
    /// are idle), then reads the answers in the order sent, which puts
    /// their connections back in that order: the connections' names.
    async fn at_once(pool: &Arc<Pool>, port: u16, n: usize) -> Vec<String> {
        let mut open = Vec::new();
        for _ in 0..n {
            open.push(send_req(pool, get(port, "/")).await.unwrap());
        }
        let mut names = Vec::new();
        for resp in open {
            names.push(text(resp).await);
        }
        names
    }

    #[tokio::test]
    async fn idle_connections_are_taken_in_turn() {
        let (port, conns) = naming_connections().await;
        let pool = pool();
        let opened = at_once(&pool, port, 3).await;
        assert_eq!(opened, ["0", "1", "2"]);
        let mut used = Vec::new();
        for _ in 0..6 {
            used.push(get_text(&pool, port, "/").await);
        }
        // Least recently used first: each connection in turn, not the
        // last one returned over and over.
        assert_eq!(used, ["0", "1", "2", "0", "1", "2"]);
        assert_eq!(conns.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn connections_the_load_leaves_spare_are_closed() {
        let (port, conns) = naming_connections().await;
        let pool = pool();
        at_once(&pool, port, 4).await;
        assert_eq!(pool.idle_count(), 4);
        // Ten requests a second, one at a time: taken in turn, each
        // connection is used every 0.4 s and none expires, but three of
        // the four are never needed.
        let mut used = std::collections::BTreeSet::new();
        for tenth in 1..=2000 {
            used.insert(get_text(&pool, port, "/").await);
            tokio::time::advance(Duration::from_millis(100)).await;
            pool.sweep();
            if tenth < 900 {
                // The first idle timeout began with a request finding none
                // idle: nothing was spare in it.
                assert_eq!(pool.idle_count(), 4, "after {tenth} tenths");
            }
        }
        assert_eq!(used.len(), 4, "taken in turn: {used:?}");
        // Spare for a whole idle timeout (90 to 180 s): closed.
        assert_eq!(pool.idle_count(), 1);
        assert_eq!(conns.load(Ordering::SeqCst), 4);
        // What is left still serves, and a second request at once opens
        // a connection again.
        assert_eq!(at_once(&pool, port, 2).await.len(), 2);
        assert_eq!(conns.load(Ordering::SeqCst), 5);
    }

    #[tokio::test(start_paused = true)]
    async fn a_quiet_pool_takes_its_most_recent_connection() {
        let (port, conns) = naming_connections().await;
        let pool = pool();
        assert_eq!(at_once(&pool, port, 3).await, ["0", "1", "2"]);
        // All three idle for longer than a turn lasts: the most recently
        // used serves, again and again; the others are left to expire, as
        // the upstream may be closing them.
        for _ in 0..5 {
            tokio::time::advance(Duration::from_secs(2)).await;
            assert_eq!(get_text(&pool, port, "/").await, "2");
        }
        tokio::time::advance(Duration::from_secs(80)).await;
        pool.sweep();
        assert_eq!(pool.idle_count(), 1);
        assert_eq!(conns.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn connections_the_load_needs_stay_open() {
        let (port, conns) = naming_connections().await;
        let pool = pool();
        for _ in 0..200 {
            // Four at once each second: every connection is needed.
            let mut names = at_once(&pool, port, 4).await;
            names.sort();
            assert_eq!(names, ["0", "1", "2", "3"]);
            tokio::time::advance(Duration::from_secs(1)).await;
            pool.sweep();
        }
        assert_eq!(pool.idle_count(), 4);
        assert_eq!(conns.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn an_unreachable_upstream_is_an_error() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        assert!(send_req(&pool(), get(port, "/")).await.is_err());
        let mut bad = get(port, "/");
        *bad.uri_mut() = Uri::from_static("/relative");
        assert!(send_req(&pool(), bad).await.is_err());
    }

    /// A TLS upstream speaking HTTP/2 only (ALPN h2), answering every
    /// request with 200 after `delay`; counts TCP connections. Returns the
    /// port and a pool that trusts its CA.
    async fn h2_upstream(delay: Duration) -> (u16, Arc<AtomicUsize>, Arc<Pool>) {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf_key = KeyPair::generate().unwrap();
        let leaf = CertificateParams::new(vec!["127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&leaf_key, &issuer)
            .unwrap();
        let mut server = crate::tls::server_config(
            vec![leaf.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
        )
        .unwrap();
        Arc::get_mut(&mut server).unwrap().alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(server);
        let (port, conns) = serve_counting(move |tcp| {
            let acceptor = acceptor.clone();
            async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(move |_req| async move {
                    tokio::time::sleep(delay).await;
                    Ok::<_, std::convert::Infallible>(Response::new(crate::body::full("ok")))
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
            }
        })
        .await;
        let mut tls = crate::tls::client_config(&[ca.der().clone()]);
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let https = HttpsConnector::from((direct(), Arc::new(tls)));
        (
            port,
            conns,
            Arc::new(Pool::new(https, Duration::from_secs(90), 4)),
        )
    }

    fn get_tls(port: u16) -> Request<ProxyBody> {
        let mut req = get(port, "/x");
        *req.uri_mut() = format!("https://127.0.0.1:{port}/x").parse().unwrap();
        req
    }

    #[tokio::test]
    async fn concurrent_first_requests_share_one_http2_connection() {
        let (port, conns, pool) = h2_upstream(Duration::from_millis(20)).await;
        let sends = (0..50).map(|_| {
            let pool = Arc::clone(&pool);
            tokio::spawn(async move { text(send_req(&pool, get_tls(port)).await.unwrap()).await })
        });
        for answer in futures_util::future::join_all(sends).await {
            assert_eq!(answer.unwrap(), "ok");
        }
        assert_eq!(conns.load(Ordering::SeqCst), 1, "upstream connections");
        // Later requests keep using it.
        assert_eq!(
            text(send_req(&pool, get_tls(port)).await.unwrap()).await,
            "ok"
        );
        assert_eq!(conns.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn concurrent_first_requests_to_http1_each_get_a_connection() {
        // Once an origin is known to speak HTTP/1.1, connects are no longer
        // single flight: held answers need connections of their own.
        let (pool, port, conns) = pool_and_upstream("hi", 100).await;
        assert_eq!(
            text(send_req(&pool, get(port, "/a")).await.unwrap()).await,
            "hi"
        );
        let held: Vec<_> =
            futures_util::future::join_all((0..3).map(|_| send_req(&pool, get(port, "/b"))))
                .await
                .into_iter()
                .map(Result::unwrap)
                .collect();
        assert_eq!(conns.load(Ordering::SeqCst), 3);
        for resp in held {
            assert_eq!(text(resp).await, "hi");
        }
    }
}
