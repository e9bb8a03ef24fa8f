//! Upstream connections for one serving thread: idle HTTP/1.1 connections
//! kept per origin and reused oldest first, one shared HTTP/2 connection per
//! origin.
//!
//! This replaces hyper-util's legacy `Client` on the request path. That
//! client does more per request than a proxy with a handful of fixed
//! upstreams needs — it clones itself, races a pool checkout against a lazy
//! connect, and spawns a task to put each HTTP/1 connection back — which
//! showed as about a tenth of the proxy's user CPU in a profile. Here a
//! request takes an idle connection from a short list and its response body
//! puts the connection back when it ends. What the legacy client guaranteed
//! is kept: the same verifying TLS connector, a request that a reused
//! connection refused before writing it is sent again on another
//! connection, and idle connections expire.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, Uri, header};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::{http1, http2};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::{Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::body::{BoxError, ProxyBody};

/// Idle connections per origin for one serving thread.
pub struct Pool {
    connector: HttpsConnector<HttpConnector>,
    origins: Mutex<Vec<Origin>>,
    idle_timeout: Duration,
    max_idle: usize,
}

/// The connections to one `scheme://authority`.
struct Origin {
    scheme: String,
    authority: String,
    idle: VecDeque<(http1::SendRequest<ProxyBody>, Instant)>,
    h2: Option<http2::SendRequest<ProxyBody>>,
}

enum Conn {
    H1(http1::SendRequest<ProxyBody>),
    H2(http2::SendRequest<ProxyBody>),
}

impl Pool {
    /// A pool connecting through `connector`; idle connections are closed
    /// after `idle_timeout`, and at most `max_idle` are kept per origin.
    pub fn new(
        connector: HttpsConnector<HttpConnector>,
        idle_timeout: Duration,
        max_idle: usize,
    ) -> Pool {
        Pool {
            connector,
            origins: Mutex::new(Vec::new()),
            idle_timeout,
            max_idle,
        }
    }

    /// Sends `req` (absolute URI, `Host` header set) on a pooled connection,
    /// or a new one.
    pub async fn send(
        self: &Arc<Self>,
        mut req: Request<ProxyBody>,
    ) -> Result<Response<UpstreamBody>, BoxError> {
        let target = req.uri().clone();
        let slot = self.slot(&target)?;
        loop {
            let (conn, reused) = match self.checkout(slot).await {
                Some(conn) => (conn, true),
                None => (self.connect(slot, &target).await?, false),
            };
            match conn {
                Conn::H2(mut sender) => {
                    // `:authority` carries the host on HTTP/2.
                    req.headers_mut().remove(header::HOST);
                    let resp = sender.send_request(req).await?;
                    return Ok(resp.map(|b| UpstreamBody::new(b, None)));
                }
                Conn::H1(mut sender) => {
                    *req.uri_mut() = origin_form(&target);
                    match sender.try_send_request(req).await {
                        Ok(resp) => {
                            let keep = Keep {
                                sender,
                                pool: Arc::clone(self),
                                slot,
                            };
                            return Ok(resp.map(|b| UpstreamBody::new(b, Some(keep))));
                        }
                        Err(mut e) => match e.take_message() {
                            // Refused before a byte was written: a reused
                            // connection the upstream had just closed.
                            Some(back) if reused => {
                                req = back;
                                *req.uri_mut() = target.clone();
                            }
                            _ => return Err(e.into_error().into()),
                        },
                    }
                }
            }
        }
    }

    /// The index of `uri`'s origin, added on first use.
    fn slot(&self, uri: &Uri) -> Result<usize, BoxError> {
        let (Some(scheme), Some(authority)) = (uri.scheme_str(), uri.authority()) else {
            return Err("upstream URI without scheme or authority".into());
        };
        let mut origins = self.origins.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = origins
            .iter()
            .position(|o| o.scheme == scheme && o.authority == authority.as_str())
        {
            return Ok(i);
        }
        origins.push(Origin {
            scheme: scheme.to_string(),
            authority: authority.as_str().to_string(),
            idle: VecDeque::new(),
            h2: None,
        });
        Ok(origins.len() - 1)
    }

    /// A live connection to the origin in `slot`, if one is idle.
    async fn checkout(&self, slot: usize) -> Option<Conn> {
        loop {
            let candidate = {
                let mut origins = self.origins.lock().unwrap_or_else(|p| p.into_inner());
                let origin = &mut origins[slot];
                if let Some(h2) = origin.h2.as_ref() {
                    if !h2.is_closed() {
                        return Some(Conn::H2(h2.clone()));
                    }
                    origin.h2 = None;
                }
                origin.idle.pop_front()?
            };
            let (mut sender, since) = candidate;
            if sender.is_closed() || since.elapsed() >= self.idle_timeout {
                continue;
            }
            // Put back as soon as its answer ended, the connection may not
            // have noticed yet; it is ready once it has.
            if sender.ready().await.is_ok() {
                return Some(Conn::H1(sender));
            }
        }
    }

    async fn connect(&self, slot: usize, uri: &Uri) -> Result<Conn, BoxError> {
        let mut connector = self.connector.clone();
        let stream = tower_service::Service::call(&mut connector, uri.clone()).await?;
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
            let mut origins = self.origins.lock().unwrap_or_else(|p| p.into_inner());
            origins[slot].h2 = Some(sender.clone());
            Ok(Conn::H2(sender))
        } else {
            let (sender, conn) = http1::handshake(stream).await?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "upstream connection ended");
                }
            });
            Ok(Conn::H1(sender))
        }
    }

    /// Keeps an HTTP/1 connection whose answer has ended for a later request.
    /// Oldest first: the one just put back may not have noticed its answer
    /// ended yet, the oldest has, and expired ones are found first.
    fn put_back(&self, slot: usize, sender: http1::SendRequest<ProxyBody>) {
        if sender.is_closed() {
            return;
        }
        let now = Instant::now();
        let mut origins = self.origins.lock().unwrap_or_else(|p| p.into_inner());
        let idle = &mut origins[slot].idle;
        if idle.len() < self.max_idle {
            idle.push_back((sender, now));
        }
    }

    /// Idle HTTP/1 connections held, all origins (for tests).
    #[cfg(test)]
    fn idle_count(&self) -> usize {
        let origins = self.origins.lock().unwrap_or_else(|p| p.into_inner());
        origins.iter().map(|o| o.idle.len()).sum()
    }
}

/// `/path?query` of an absolute URI: what goes on an HTTP/1 request line.
fn origin_form(uri: &Uri) -> Uri {
    let pq = uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    Uri::from(pq)
}

/// An HTTP/1 connection on loan to one response.
struct Keep {
    sender: http1::SendRequest<ProxyBody>,
    pool: Arc<Pool>,
    slot: usize,
}

/// An upstream response body; an HTTP/1 connection goes back to its pool
/// when the body has been read to the end (dropped earlier, hyper closes
/// it).
pub struct UpstreamBody {
    inner: Incoming,
    keep: Option<Keep>,
}

impl UpstreamBody {
    fn new(inner: Incoming, keep: Option<Keep>) -> UpstreamBody {
        let mut body = UpstreamBody { inner, keep };
        body.release_if_ended();
        body
    }

    fn release_if_ended(&mut self) {
        if self.inner.is_end_stream()
            && let Some(k) = self.keep.take()
        {
            k.pool.put_back(k.slot, k.sender);
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let frame = std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &frame {
            None => {
                if let Some(k) = this.keep.take() {
                    k.pool.put_back(k.slot, k.sender);
                }
            }
            Some(Ok(_)) => this.release_if_ended(),
            // The connection is not reusable after a body error.
            Some(Err(_)) => this.keep = None,
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn pool() -> Arc<Pool> {
        let tls = Arc::new(crate::tls::client_config(&[]));
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        let https = HttpsConnector::from((http, tls));
        Arc::new(Pool::new(https, Duration::from_secs(90), 4))
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

    /// A raw HTTP/1.1 upstream: answers each request on a connection with
    /// `body`, closing the connection after `per_conn` answers (without
    /// saying so, as an upstream's idle timeout would). Counts connections.
    async fn upstream(body: &'static str, per_conn: usize) -> (u16, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let conns = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&conns);
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    for _ in 0..per_conn {
                        // Read one head (GET, no body).
                        while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                            let mut chunk = [0u8; 1024];
                            match s.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        let end = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                        let head = String::from_utf8_lossy(&buf[..end]).to_string();
                        buf.drain(..end);
                        assert!(head.starts_with("GET /"), "origin-form expected: {head}");
                        let answer = format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                            body.len()
                        );
                        if s.write_all(answer.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (port, conns)
    }

    async fn text(resp: Response<UpstreamBody>) -> String {
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[tokio::test]
    async fn a_read_answer_returns_its_connection_for_reuse() {
        let (port, conns) = upstream("hello", 100).await;
        let pool = pool();
        for _ in 0..5 {
            let resp = pool.send(get(port, "/a?b=1")).await.unwrap();
            assert_eq!(text(resp).await, "hello");
        }
        assert_eq!(conns.load(Ordering::SeqCst), 1);
        assert_eq!(pool.idle_count(), 1);
    }

    #[tokio::test]
    async fn an_unread_answer_keeps_its_connection_out_of_the_pool() {
        let (port, conns) = upstream("hello", 100).await;
        let pool = pool();
        let first = pool.send(get(port, "/")).await.unwrap();
        // Still being read: the next request needs its own connection.
        let second = pool.send(get(port, "/")).await.unwrap();
        assert_eq!(conns.load(Ordering::SeqCst), 2);
        drop(first);
        assert_eq!(text(second).await, "hello");
        assert_eq!(pool.idle_count(), 1);
    }

    #[tokio::test]
    async fn a_connection_the_upstream_closed_is_replaced() {
        // One answer per connection, then a silent close.
        let (port, conns) = upstream("hello", 1).await;
        let pool = pool();
        for _ in 0..4 {
            let resp = pool.send(get(port, "/")).await.unwrap();
            assert_eq!(text(resp).await, "hello");
            // Let the connection task see the close.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(conns.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn idle_connections_are_bounded() {
        let (port, conns) = upstream("x", 100).await;
        let pool = pool();
        let mut open = Vec::new();
        for _ in 0..6 {
            open.push(pool.send(get(port, "/")).await.unwrap());
        }
        for resp in open {
            text(resp).await;
        }
        assert_eq!(conns.load(Ordering::SeqCst), 6);
        assert_eq!(pool.idle_count(), 4);
    }

    #[tokio::test]
    async fn an_unreachable_upstream_is_an_error() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        assert!(pool().send(get(port, "/")).await.is_err());
        let mut bad = get(port, "/");
        *bad.uri_mut() = Uri::from_static("/relative");
        assert!(pool().send(bad).await.is_err());
    }
}
