//! One connection: TLS handshake, then HTTP/1.1 (read through the framing
//! guard) or HTTP/2, with the connection settings of the generation current
//! when it was accepted.

use std::convert::Infallible;
use std::sync::{Arc, Weak};
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::Watcher;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::app::{App, Generation};
use crate::body::{BoxError, Holding};
use crate::coalesce::Coalesce;
use crate::config::Limits;
use crate::http1::guard::{Activity, FramingGuard};
use crate::proxy::ConnInfo;

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

/// HTTP/1.1 + HTTP/2 connection settings from `[limits]`.
fn http_builder(limits: &Limits) -> auto::Builder<BoxingExecutor> {
    let mut b = auto::Builder::new(BoxingExecutor);
    b.http1()
        .timer(TokioTimer::new())
        // Heads and idle connections are timed by the framing guard instead
        // (see `http1::guard::Activity`): hyper's timer costs an allocation and a
        // timer-wheel insert and removal per request.
        .header_read_timeout(None)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.h2_max_concurrent_streams)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_pending_accept_reset_streams(Some(50))
        .max_local_error_reset_streams(Some(256))
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    b
}

/// A generation and the HTTP settings built from its limits, kept by each
/// serving thread and rebuilt only when the generation changes (a reload).
pub(super) struct Settings {
    generation: Arc<Generation>,
    http: Arc<auto::Builder<BoxingExecutor>>,
}

impl Settings {
    /// The settings for the current generation of `app`, reusing `last`'s
    /// builder when the generation is the same.
    pub(super) fn current(
        app: &App,
        last: &mut Option<(Weak<Generation>, Arc<auto::Builder<BoxingExecutor>>)>,
    ) -> Settings {
        let generation = app.current();
        let http = match last {
            Some((g, b)) if std::ptr::eq(g.as_ptr(), Arc::as_ptr(&generation)) => Arc::clone(b),
            _ => {
                let b = Arc::new(http_builder(&generation.proxy.config().limits));
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
    watcher: Watcher,
) -> Result<(), BoxError> {
    // The connection's settings and certificate come from the generation
    // current when it was accepted; each request then runs on the
    // generation current when it arrives.
    let generation = &settings.generation;
    if !info.tls {
        // HTTP/1 (or h2c prior knowledge, which the guard lets through).
        return serve_http(app, settings, stream, info, watcher).await;
    }
    let Some(acceptor) = generation.tls.clone() else {
        return Err("no TLS settings".into());
    };
    let handshake_timeout = generation.proxy.config().limits.header_read_timeout;
    match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
        Ok(Ok(tls_stream)) => {
            // HTTP/2 answers finishing in the same turn share one write
            // (see `coalesce`); HTTP/1.1 has one answer in flight per
            // connection and passes straight through.
            let h2 = tls_stream.get_ref().1.alpn_protocol() == Some(b"h2");
            serve_http(app, settings, Coalesce::new(tls_stream, h2), info, watcher).await
        }
        Ok(Err(e)) => Err(format!("TLS handshake failed: {e}").into()),
        Err(_) => Err("TLS handshake timed out".into()),
    }
}

/// HTTP/1.1 or HTTP/2 on `io`, read through the framing guard (HTTP/2
/// passes it untouched after its preface).
async fn serve_http<IO>(
    app: &Arc<App>,
    settings: &Settings,
    io: IO,
    info: ConnInfo,
    watcher: Watcher,
) -> Result<(), BoxError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
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
    let guarded = FramingGuard::new(io, limits.max_header_bytes, limits.header_read_timeout)
        .with_idle_timeout(activity, limits.header_read_timeout);
    let conn = settings
        .http
        .serve_connection(TokioIo::new(guarded), svc)
        .into_owned();
    watcher.watch(conn).await
}
