//! One connection: TLS handshake, then HTTP/1.1 (read through the framing
//! guard) or HTTP/2, with the connection settings of the generation current
//! when it was accepted.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Poll, ready};
use std::time::Duration;

use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulConnection;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use super::drain::Shutdown;
use super::tls::{self, TlsStream};

use crate::app::{App, Generation};
use crate::body::{BoxError, Holding};
use crate::coalesce::Coalesce;
use crate::config::Limits;
use crate::http1::guard::{Activity, FramingGuard};
use crate::proxy::ConnInfo;
use crate::wake::Held;

/// Spawns HTTP/2 streams boxed. hyper hands each stream's future (the
/// request handler, several KiB) to the executor by value, and `tokio::spawn`
/// moves it several times more before it runs; boxing it first turns those
/// copies into pointer moves. A callgrind profile of an HTTP/2 request had
/// 60 % of its instructions in those copies before this.
#[derive(Clone, Copy, Debug, Default)]
pub struct BoxingExecutor;

impl<F> hyper::rt::Executor<F> for BoxingExecutor
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(Box::pin(fut));
    }
}

/// The HTTP/1.1 and HTTP/2 connection settings from `[limits]`.
pub(super) struct Http {
    h1: http1::Builder,
    h2: http2::Builder<BoxingExecutor>,
}

impl Http {
    fn new(limits: &Limits) -> Http {
        let mut h1 = http1::Builder::new();
        h1.timer(TokioTimer::new())
            // Heads and idle connections are timed by the framing guard
            // instead (see `http1::guard::Activity`): hyper's timer costs an
            // allocation and a timer-wheel insert and removal per request.
            .header_read_timeout(None)
            .max_buf_size(limits.max_header_bytes.max(8192))
            .keep_alive(true);
        let mut h2 = http2::Builder::new(BoxingExecutor);
        h2.timer(TokioTimer::new())
            .max_concurrent_streams(limits.h2_max_concurrent_streams)
            .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
            .max_pending_accept_reset_streams(Some(50))
            .max_local_error_reset_streams(Some(256))
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .keep_alive_timeout(Duration::from_secs(20));
        Http { h1, h2 }
    }
}

/// How long an HTTP/1 connection waits for its next request before it
/// lets go of hyper's connection state and buffers (about 28 KiB of the
/// 43 KiB an idle connection held; see `FramingGuard::park_after`). Long
/// enough that a busy connection never parks between two requests, so the
/// cost (one timer check per second while busy, a new hyper connection
/// after each park) stays out of the request path.
const PARK_AFTER: Duration = Duration::from_secs(1);

/// The HTTP/2 connection preface, which a client without ALPN (cleartext
/// prior knowledge) starts with.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A generation and the HTTP settings built from its limits, kept by each
/// serving thread and rebuilt only when the generation changes (a reload).
pub(super) struct Settings {
    generation: Arc<Generation>,
    http: Arc<Http>,
}

impl Settings {
    /// The settings for the current generation of `app`, reusing `last`'s
    /// builders when the generation is the same.
    pub(super) fn current(app: &App, last: &mut Option<(Weak<Generation>, Arc<Http>)>) -> Settings {
        let generation = app.current();
        let http = match last {
            Some((g, b)) if std::ptr::eq(g.as_ptr(), Arc::as_ptr(&generation)) => Arc::clone(b),
            _ => {
                let b = Arc::new(Http::new(&generation.proxy.config().limits));
                *last = Some((Arc::downgrade(&generation), Arc::clone(&b)));
                b
            }
        };
        Settings { generation, http }
    }
}

/// One connection: TLS handshake (on the TLS listener), then HTTP/1.1 or
/// HTTP/2 until either side closes or shutdown asks it to finish.
pub(super) async fn serve_connection(
    app: &Arc<App>,
    settings: &Settings,
    stream: TcpStream,
    info: ConnInfo,
    shutdown: Shutdown,
) -> Result<(), BoxError> {
    // The connection's settings and certificate come from the generation
    // current when it was accepted; each request then runs on the
    // generation current when it arrives.
    let generation = &settings.generation;
    if !info.tls {
        // HTTP/1 (or h2c prior knowledge, told by its preface).
        return serve_http(app, settings, stream, info, false, shutdown).await;
    }
    let Some(tls) = generation.tls.clone() else {
        return Err("no TLS settings".into());
    };
    let handshake_timeout = generation.proxy.config().limits.header_read_timeout;
    let mut tls_stream = handshake(tls, stream, handshake_timeout).await?;
    // HTTP/2 answers finishing in the same turn share one write (see
    // `coalesce`); HTTP/1.1 has one answer in flight per connection and
    // passes straight through.
    let h2 = tls_stream.alpn_protocol() == Some(b"h2");
    if h2 {
        tls_stream.release_when_idle();
    }
    serve_http(
        app,
        settings,
        Coalesce::new(tls_stream, h2),
        info,
        h2,
        shutdown,
    )
    .await
}

/// The TLS handshake, its result boxed.
///
/// A separate function so that the TLS stream (1.2 KiB) never sits in the
/// connection task itself: a local of an `async fn` keeps its room in the
/// future for as long as it is in scope, even once moved out, and the
/// handshake's result held that way took 2.4 KiB of each connection's
/// task for the connection's whole life.
async fn handshake(
    config: Arc<rustls::ServerConfig>,
    stream: TcpStream,
    timeout: Duration,
) -> Result<Box<TlsStream<TcpStream>>, BoxError> {
    match tokio::time::timeout(timeout, Box::pin(tls::accept(config, stream))).await {
        Ok(Ok(tls_stream)) => Ok(Box::new(tls_stream)),
        Ok(Err(e)) => Err(format!("TLS handshake failed: {e}").into()),
        Err(_) => Err("TLS handshake timed out".into()),
    }
}

/// HTTP/1.1 or HTTP/2 (`h2`: chosen by ALPN) on `io`, read through the
/// framing guard (HTTP/2 passes it untouched after its preface).
///
/// An HTTP/1 connection is served by one hyper connection per busy
/// stretch: once idle for [`PARK_AFTER`] the guard parks it, hyper's
/// connection ends without closing the socket, and the loop waits for the
/// next bytes holding only the TLS stream and the guard.
async fn serve_http<IO>(
    app: &Arc<App>,
    settings: &Settings,
    io: IO,
    info: ConnInfo,
    h2: bool,
    mut shutdown: Shutdown,
) -> Result<(), BoxError>
where
    IO: AsyncRead + AsyncWrite + Release + Unpin + Send + 'static,
{
    let limits = &settings.generation.proxy.config().limits;
    let svc_app = Arc::clone(app);
    let activity = Activity::new();
    let svc_activity = Arc::clone(&activity);
    let svc = service_fn(move |req| {
        let proxy = svc_app.proxy();
        // In progress from here until the answer has been written.
        let busy = svc_activity.begin();
        async move {
            let resp = proxy.handle(req, &info).await;
            Ok::<_, Infallible>(resp.map(|b| Holding::wrap(b, busy)))
        }
    });
    let mut guard = FramingGuard::new(io, limits.max_header_bytes, limits.header_read_timeout)
        .with_idle_timeout(activity, limits.header_read_timeout)
        .park_after(PARK_AFTER);
    let mut first = true;
    loop {
        let bytes = if first && h2 {
            Vec::new()
        } else {
            // Parked (a new connection starts so): no hyper state until
            // the client sends something.
            match next_bytes(&mut guard, &mut shutdown, first).await? {
                Some(bytes) => bytes,
                None => return close(&mut guard).await,
            }
        };
        guard.unread(&bytes);
        if h2 || (first && bytes.starts_with(H2_PREFACE)) {
            guard.never_park();
            // Boxed in the same statement: a local holding the connection
            // keeps its room (1.6 KiB) in the task even once moved out.
            let conn = Box::pin(settings.http.h2.serve_connection(TokioIo::new(guard), svc));
            return until_done(conn, &mut shutdown).await;
        }
        first = false;
        guard.unpark();
        // Boxed: while parked, the task holds none of it.
        let mut conn = Box::pin(
            settings
                .http
                .h1
                .serve_connection(TokioIo::new(guard), svc.clone()),
        );
        until_done(conn.as_mut(), &mut shutdown).await?;
        let parts = Pin::into_inner(conn).into_parts();
        guard = parts.io.into_inner();
        if !guard.is_parked() {
            // hyper closed the connection itself.
            return Ok(());
        }
        if shutdown.is_shutdown() {
            // Parked as the drain began.
            return close(&mut guard).await;
        }
        // Bytes hyper read but did not use (none when it parked).
        guard.unread(&parts.read_buf);
        guard.get_mut().release();
    }
}

/// A connection's I/O, which may let go of its buffers while the connection
/// is parked (only those holding nothing; the next read or write allocates
/// again).
trait Release {
    fn release(&mut self) {}
}

impl Release for TcpStream {}

impl<IO: Release> Release for Coalesce<IO> {
    fn release(&mut self) {
        self.get_mut().release();
    }
}

impl<IO> Release for Box<TlsStream<IO>> {
    fn release(&mut self) {
        TlsStream::release(self);
    }
}

/// Drives a hyper connection until it ends, asking it to finish when
/// shutdown is signalled (HTTP/2 GOAWAY, HTTP/1 close after the current
/// answer).
async fn until_done<C>(mut conn: Pin<C>, shutdown: &mut Shutdown) -> Result<(), BoxError>
where
    C: std::ops::DerefMut,
    C::Target: GracefulConnection<Error = hyper::Error>,
{
    let mut asked = shutdown.is_shutdown();
    if asked {
        conn.as_mut().graceful_shutdown();
    }
    let peek = shutdown.peek();
    let stop = shutdown.recv();
    let mut stop = std::pin::pin!(stop);
    // Polled on every wake of the connection; the signal's future only
    // when it has not taken this task's waker yet or the signal was sent.
    let mut held = Held::default();
    std::future::poll_fn(|cx| {
        if !asked
            && (!held.by(cx) || peek.sent())
            && held.poll(cx, |cx| stop.as_mut().poll(cx)).is_ready()
        {
            asked = true;
            conn.as_mut().graceful_shutdown();
        }
        conn.as_mut().poll(cx)
    })
    .await
    .map_err(Into::into)
}

/// Waits for the next bytes from a parked connection: `None` when the
/// client closed or shutdown began. When `sniff`, reads on while what
/// arrived could still be the start of the HTTP/2 preface.
async fn next_bytes<IO>(
    guard: &mut FramingGuard<IO>,
    shutdown: &mut Shutdown,
    sniff: bool,
) -> io::Result<Option<Vec<u8>>>
where
    IO: AsyncRead + Unpin,
{
    let stop = shutdown.recv();
    let mut stop = std::pin::pin!(stop);
    let mut got = Vec::new();
    std::future::poll_fn(|cx| {
        loop {
            if stop.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ok(None));
            }
            // On the stack only while polled: a parked task holds no buffer.
            let mut room = [0u8; 1024];
            let mut buf = ReadBuf::new(&mut room);
            ready!(Pin::new(&mut *guard).poll_read(cx, &mut buf))?;
            if buf.filled().is_empty() {
                return Poll::Ready(Ok(None));
            }
            got.extend_from_slice(buf.filled());
            if sniff && got.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(&got) {
                continue;
            }
            return Poll::Ready(Ok(Some(std::mem::take(&mut got))));
        }
    })
    .await
}

/// Closes a parked connection: TLS close_notify, then the socket. The
/// client may be gone already; that is not an error.
async fn close<IO: AsyncWrite + Unpin>(guard: &mut FramingGuard<IO>) -> Result<(), BoxError> {
    let _ = guard.shutdown().await;
    Ok(())
}
