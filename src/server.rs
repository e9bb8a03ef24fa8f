//! Listeners: accept loop, TLS handshake, connection limit, HTTP/1.1 + HTTP/2
//! serving, and graceful shutdown.
//!
//! [`run`] takes already-bound listeners (tests bind port 0) and a shutdown
//! future. A connection permit is taken *before* `accept`, so beyond
//! `max_connections` new connections wait unaccepted in the kernel backlog.
//! The TLS handshake and the request head share the `header_read_timeout`
//! budget (slow-loris guard). On shutdown the loops stop accepting, every
//! connection is asked to finish (HTTP/2 GOAWAY, HTTP/1 close after the
//! current response), and stragglers are cut after `shutdown_grace`.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::admin;
use crate::app::App;
use crate::config::{Config, Limits};
use crate::proxy::ConnInfo;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

/// Bound sockets for the proxy's listeners.
#[derive(Debug, Default)]
pub struct Listeners {
    /// HTTPS listener.
    pub tls: Option<TcpListener>,
    /// Cleartext listener.
    pub plain: Option<TcpListener>,
    /// Admin listener.
    pub admin: Option<TcpListener>,
}

impl Listeners {
    /// Binds every listener the config names.
    pub async fn bind(config: &Config) -> io::Result<Listeners> {
        async fn bind_one(addr: Option<SocketAddr>, what: &str) -> io::Result<Option<TcpListener>> {
            match addr {
                None => Ok(None),
                Some(a) => TcpListener::bind(a).await.map(Some).map_err(|e| {
                    io::Error::new(e.kind(), format!("cannot bind {what} listener on {a}: {e}"))
                }),
            }
        }
        Ok(Listeners {
            tls: bind_one(config.server.listen, "HTTPS").await?,
            plain: bind_one(config.server.plain_listen, "cleartext").await?,
            admin: bind_one(config.server.admin_listen, "admin").await?,
        })
    }
}

/// HTTP/1.1 + HTTP/2 connection settings from `[limits]`.
pub(crate) fn http_builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
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

/// Serves `app` on `listeners` until `shutdown` completes, then drains.
pub async fn run(
    app: Arc<App>,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let first = app.current();
    if listeners.tls.is_some() && first.tls.is_none() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "HTTPS listener without TLS settings",
        ));
    }
    first.proxy.start_refreshers();
    let max_connections = first.proxy.config().limits.max_connections;
    drop(first);
    let (stop_tx, stop_rx) = watch::channel(false);
    if let Some(admin) = listeners.admin {
        tokio::spawn(admin::serve(admin, Arc::clone(&app), stop_rx.clone()));
    }

    let graceful = GracefulShutdown::new();
    let permits = Arc::new(Semaphore::new(max_connections));
    app.status.listening.store(true, Ordering::SeqCst);

    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = Arc::clone(&permits).acquire_owned() => p.expect("semaphore never closed"),
            () = &mut shutdown => break,
        };
        let (stream, peer, tls) = tokio::select! {
            r = accept(listeners.tls.as_ref()) => match r {
                Ok((s, p)) => (s, p, true),
                Err(e) => { accept_error(e).await; continue; }
            },
            r = accept(listeners.plain.as_ref()) => match r {
                Ok((s, p)) => (s, p, false),
                Err(e) => { accept_error(e).await; continue; }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let watcher = graceful.watcher();
        let app = Arc::clone(&app);
        tokio::spawn(async move {
            app.status.open_connections.fetch_add(1, Ordering::Relaxed);
            // The connection's settings and certificate come from the
            // generation current when it was accepted; each request then
            // runs on the generation current when it arrives.
            let generation = app.current();
            let handshake_timeout = generation.proxy.config().limits.header_read_timeout;
            let info = ConnInfo { peer, tls };
            let svc_app = Arc::clone(&app);
            let svc = service_fn(move |req| {
                let proxy = svc_app.proxy();
                async move { Ok::<_, Infallible>(proxy.handle(req, &info).await) }
            });
            let result = if tls {
                let Some(acceptor) = generation.tls.clone() else {
                    app.status.open_connections.fetch_sub(1, Ordering::Relaxed);
                    return;
                };
                match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                    Ok(Ok(tls_stream)) => {
                        let conn = generation
                            .http
                            .serve_connection(TokioIo::new(tls_stream), svc)
                            .into_owned();
                        watcher.watch(conn).await
                    }
                    Ok(Err(e)) => Err(format!("TLS handshake failed: {e}").into()),
                    Err(_) => Err("TLS handshake timed out".into()),
                }
            } else {
                let conn = generation
                    .http
                    .serve_connection(TokioIo::new(stream), svc)
                    .into_owned();
                watcher.watch(conn).await
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %crate::error::describe(&*e), "connection ended with an error");
            }
            app.status.open_connections.fetch_sub(1, Ordering::Relaxed);
            drop(permit);
        });
    }

    app.status.shutting_down.store(true, Ordering::SeqCst);
    drop(listeners.tls);
    drop(listeners.plain);
    let grace = app.proxy().config().server.shutdown_grace;
    tracing::info!(
        open_connections = graceful.count(),
        grace_secs = grace.as_secs(),
        "shutting down: no longer accepting, draining connections"
    );
    match tokio::time::timeout(grace, graceful.shutdown()).await {
        Ok(()) => tracing::info!("all connections closed"),
        Err(_) => tracing::warn!("grace period over; closing remaining connections"),
    }
    let _ = stop_tx.send(true);
    Ok(())
}

async fn accept(listener: Option<&TcpListener>) -> io::Result<(TcpStream, SocketAddr)> {
    match listener {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

async fn accept_error(e: io::Error) {
    // Out of file descriptors and similar: back off instead of spinning.
    tracing::warn!(error = %e, "accept failed");
    tokio::time::sleep(Duration::from_millis(50)).await;
}
