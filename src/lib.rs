//! arcgis-app-proxy: a TLS-terminating reverse proxy that lets anonymous
//! browser apps use ArcGIS services without ever seeing a token.
//!
//! Map of the crate, in the order a request meets it:
//!
//! - [`config`]: `proxy.toml` → validated, precompiled [`config::Config`]
//!   (one module per section).
//! - [`app`]: the current config generation (swapped on SIGHUP) and the
//!   process status; no hyper server types.
//! - [`server`]: listeners, accept loop and connection limit, the TLS
//!   server stream (settings in [`tls`]), HTTP/1.1 and HTTP/2 serving with write coalescing ([`coalesce`]),
//!   graceful shutdown; hands each request to [`proxy::Proxy::handle`].
//! - [`http1`]: the only HTTP/1 wire code: the request framing guard and
//!   the length, chunked and `Connection` rules the upstream client reads
//!   answers with.
//! - [`proxy`]: the request path as phases over one `RequestCtx` — admit
//!   (ping, referer/origin, CORS), target (route and path safety,
//!   [`policy`]), limit ([`shared_rate`] across replicas), body, forward
//!   (token from [`token`], retry), respond ([`scrub`]), observe (access
//!   log, [`metrics`]).
//! - [`upstream`]: the request that goes upstream, the verdict on its
//!   answer (token refusal, codings), and the per-thread connection pool;
//!   `deadline`: the exchange's deadline on a reused timer.
//! - [`error`]: every failure → one ArcGIS-shaped JSON response.
//! - [`redact`]: every log line is scrubbed of token-like values on write.
//! - [`admin`]: `/healthz`, `/readyz`, `/metrics` on a separate listener;
//!   [`healthcheck`]: the client side of it, for `arcgis-app-proxy
//!   healthcheck` in images without curl.
//! - [`demo`]: an embedded fake ArcGIS for `arcgis-app-proxy demo`.
//! - [`import`]: `import-esri`, a resource-proxy `proxy.config` → `proxy.toml`.
//! - [`notify`]: systemd's readiness, reload and stop notifications.
//! - [`codec`]: streaming gzip/deflate/br, so bodies can be scrubbed.
//! - [`body`]: the boxed body type shared by all of the above; `pending`:
//!   bytes a stream holds for its reader (TLS and the framing guard);
//!   `wake`: skipping a timer or signal that already holds the task's
//!   waker.
//!
//! Dependencies point one way: `server` → {`admin`, `app`} → `proxy` →
//! {`policy`, `token`, `upstream`, `scrub`, `error`} → `http1`.

#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod body;
pub mod coalesce;
pub mod codec;
pub mod config;
mod deadline;
pub mod demo;
pub mod error;
pub mod healthcheck;
pub mod http1;
pub mod import;
pub mod metrics;
#[cfg(unix)]
pub mod notify;
mod pending;
pub mod policy;
pub mod proxy;
pub mod redact;
pub mod scrub;
pub mod server;
pub mod shared_rate;
pub mod tls;
pub mod token;
pub mod upstream;
mod wake;

use std::future::Future;
use std::io;
use std::sync::Arc;

pub use app::{App, Status};

/// `<version> (commit <commit>, <plain|profile-guided> build)`, as
/// `--version` prints it; see `build.rs`.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("AAP_GIT_COMMIT"),
    ", ",
    env!("AAP_BUILD_PROFILE"),
    " build)"
);
pub use config::Config;
pub use proxy::Proxy;
pub use server::Listeners;

/// Runs the proxy for `config` on bound `listeners` until `shutdown`
/// completes, then drains connections for up to `shutdown_grace_secs`.
pub async fn run(
    config: Arc<Config>,
    listeners: Listeners,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    server::run(App::new(config), listeners, shutdown).await
}

/// Reloads `path` into `app` on every SIGHUP; a config that fails
/// validation is logged and the running one stays.
pub fn reload_on_sighup(
    app: Arc<App>,
    path: std::path::PathBuf,
) -> impl std::future::Future<Output = ()> + Send {
    // Registered now, not when the task first runs: a SIGHUP that arrives
    // between readiness and the task's first poll would otherwise take the
    // default action and end the process.
    #[cfg(unix)]
    let hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup());
    async move {
        #[cfg(unix)]
        {
            let Ok(mut hup) = hup else {
                tracing::warn!("cannot install the SIGHUP handler; reload disabled");
                return;
            };
            while hup.recv().await.is_some() {
                tracing::info!(config = %path.display(), "SIGHUP received: reloading");
                notify::reloading();
                if app.reload_from(&path, &config::ProcessEnv) {
                    notify::ready("serving; configuration reloaded");
                } else {
                    notify::ready("serving; the new configuration was rejected, the old one runs");
                }
            }
        }
        #[cfg(not(unix))]
        {
            let _ = (app, path);
            std::future::pending::<()>().await;
        }
    }
}

/// Reloads when a file the running config was built from changes — the
/// config itself, its certificate, key, secret and CA files — exactly as
/// SIGHUP does (rejections logged and counted, the old config kept). The
/// files are polled every `server.reload_poll_secs`, following symlinks, so
/// the kubelet's update of a mounted Secret (a new `..data` directory and
/// one symlink swapped) is seen too; a change is acted on once the files
/// have held still for a second.
pub async fn reload_on_change(app: Arc<App>, path: std::path::PathBuf) {
    let watched = || app.proxy().config().watched.clone();
    let mut last = fingerprint(&watched());
    loop {
        let Some(poll) = app.proxy().config().server.reload_poll else {
            // Off; a SIGHUP reload may turn it on.
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            last = fingerprint(&watched());
            continue;
        };
        tokio::time::sleep(poll).await;
        let now = fingerprint(&watched());
        if now == last {
            continue;
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        if fingerprint(&watched()) != now {
            continue;
        }
        tracing::info!(config = %path.display(), "configuration files changed: reloading");
        #[cfg(unix)]
        notify::reloading();
        let ok = app.reload_from(&path, &config::ProcessEnv);
        #[cfg(unix)]
        notify::ready(if ok {
            "serving; configuration reloaded"
        } else {
            "serving; the new configuration was rejected, the old one runs"
        });
        // Of the files the running config names now; a rejected change is
        // not retried until the files change again.
        last = fingerprint(&watched());
    }
}

/// Size, modification time (seconds, nanoseconds), inode and device.
type FileStamp = (u64, i64, i64, u64, u64);

/// What identifies each file's content without reading it: size, change
/// time and inode, after following symlinks; `None` for a missing file.
fn fingerprint(files: &[std::path::PathBuf]) -> Vec<Option<FileStamp>> {
    files
        .iter()
        .map(|f| {
            let m = std::fs::metadata(f).ok()?;
            #[cfg(unix)]
            {
                use std::os::unix::fs::MetadataExt;
                Some((m.len(), m.mtime(), m.mtime_nsec(), m.ino(), m.dev()))
            }
            #[cfg(not(unix))]
            {
                let t = m
                    .modified()
                    .ok()?
                    .duration_since(std::time::UNIX_EPOCH)
                    .ok()?;
                Some((
                    m.len(),
                    t.as_secs() as i64,
                    i64::from(t.subsec_nanos()),
                    0,
                    0,
                ))
            }
        })
        .collect()
}

/// Installs the global tracing subscriber: JSON or text lines on stderr,
/// level from `RUST_LOG` (default `info`).
pub fn init_logging(format: config::LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(redact::Redacting(io::stderr))
        .with_ansi(io::IsTerminal::is_terminal(&io::stderr()));
    let _ = match format {
        // No `target` key of tracing's own: the access log line's `target`
        // field is the upstream URL, and a JSON object has one value per
        // key. Access lines say `"log":"access"` instead.
        config::LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_target(false)
            .try_init(),
        config::LogFormat::Text => builder.try_init(),
    };
}

/// Resolves when the process receives SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
        notify::stopping();
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
