//! The running process: the current configuration generation, swapped
//! atomically on reload, plus what outlives generations (metrics, status).
//!
//! A [`Generation`] bundles everything derived from one config: the
//! [`Proxy`] pipeline and the TLS acceptor (certificate); the server builds
//! its HTTP connection settings from the generation's limits. No hyper
//! server types live here, so `app` depends on nothing that serves. Each request loads the current generation once
//! and keeps it to the end, so in-flight requests finish on the config they
//! started with; each new TLS connection uses the current certificate, so a
//! renewed certificate is picked up without dropping anything. A reload keeps
//! the token source — and so the token — of every credential whose settings
//! did not change.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize};

use tokio::sync::watch;

use arc_swap::ArcSwap;

use crate::config::{Config, Env};
use crate::metrics::{Metrics, OutcomeLabel};
use crate::proxy::Proxy;
use crate::upstream::Clients;

/// Process-wide state the admin endpoints report on.
#[derive(Debug, Default)]
pub struct Status {
    /// Set once shutdown begins; `/readyz` turns 503.
    pub shutting_down: AtomicBool,
    /// Set once the listeners accept.
    pub listening: AtomicBool,
    /// Connections currently open on the public listeners.
    pub open_connections: AtomicUsize,
}

/// Everything built from one config.
pub struct Generation {
    /// The request pipeline.
    pub proxy: Arc<Proxy>,
    /// TLS settings of the HTTPS listener.
    pub(crate) tls: Option<Arc<rustls::ServerConfig>>,
}

impl Generation {
    fn new(proxy: Arc<Proxy>) -> Generation {
        let config = proxy.config();
        Generation {
            tls: config.server.tls.clone(),
            proxy,
        }
    }
}

/// The running proxy.
pub struct App {
    current: ArcSwap<Generation>,
    metrics: Arc<Metrics>,
    /// The log format the process started with (the subscriber keeps it).
    log_format: crate::config::LogFormat,
    /// Listener and shutdown state.
    pub status: Status,
}

impl App {
    /// The app for a validated config, served from one thread's runtime.
    pub fn new(config: Arc<Config>) -> Arc<App> {
        App::with_shards(config, 1)
    }

    /// The app for `shards` serving threads (one upstream pool each).
    pub fn with_shards(config: Arc<Config>, shards: usize) -> Arc<App> {
        let config_log_format = config.log_format;
        let metrics = Arc::new(Metrics::new());
        let clients = Clients::new(&config, shards);
        let proxy = Proxy::assemble(config, clients, BTreeMap::new(), Arc::clone(&metrics));
        Arc::new(App {
            log_format: config_log_format,
            current: ArcSwap::from_pointee(Generation::new(Arc::new(proxy))),
            metrics,
            status: Status::default(),
        })
    }

    /// The current generation.
    pub fn current(&self) -> Arc<Generation> {
        self.current.load_full()
    }

    /// The current proxy pipeline.
    pub fn proxy(&self) -> Arc<Proxy> {
        Arc::clone(&self.current.load().proxy)
    }

    /// Process metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Replaces the running config with `config`, already validated.
    /// Returns notes about settings that only take effect on restart.
    pub fn reload(&self, config: Config) -> Vec<String> {
        let old = self.current();
        let old_cfg = old.proxy.config();
        let mut notes = Vec::new();
        if config.server.listen != old_cfg.server.listen
            || config.server.plain_listen != old_cfg.server.plain_listen
            || config.server.admin_listen != old_cfg.server.admin_listen
        {
            notes.push("listener addresses change only on restart; the old ones stay".to_string());
        }
        if config.limits.max_connections != old_cfg.limits.max_connections {
            notes.push("limits.max_connections changes only on restart".to_string());
        }
        if config.log_format != self.log_format {
            notes.push(
                "log.format changes only on restart; lines keep the format the process started with"
                    .to_string(),
            );
        }
        if config.outbound != old_cfg.outbound {
            tracing::info!("{}", config.outbound.describe());
        }
        let same_client = config.extra_ca == old_cfg.extra_ca
            && config.outbound == old_cfg.outbound
            && config.limits.upstream_connect_timeout == old_cfg.limits.upstream_connect_timeout
            && config.limits.upstream_timeout == old_cfg.limits.upstream_timeout;
        let clients = if same_client {
            old.proxy.clients().clone()
        } else {
            Clients::new(&config, old.proxy.clients().shards())
        };
        let mut reuse = BTreeMap::new();
        if same_client {
            for (name, cred) in &config.credentials {
                if old_cfg.credentials.get(name) == Some(cred)
                    && let Some(src) = old.proxy.tokens().get(name)
                {
                    reuse.insert(name.clone(), src.clone());
                }
            }
        }
        let kept: Vec<String> = reuse.keys().cloned().collect();
        let mut proxy =
            Proxy::assemble(Arc::new(config), clients, reuse, Arc::clone(&self.metrics));
        // Rate-limit buckets and quota counts of unchanged apps and routes
        // carry over, so a reload hands no client a fresh allowance.
        proxy.keep_counts_of(&old.proxy);
        let proxy = Arc::new(proxy);
        proxy.start_refreshers();
        self.current.store(Arc::new(Generation::new(proxy)));
        tracing::info!(tokens_kept = ?kept, "configuration reloaded");
        notes
    }

    /// Reads, validates and applies the config file; on any problem the
    /// running config stays and every problem is logged.
    pub fn reload_from(&self, path: &Path, env: &dyn Env) -> bool {
        match Config::load(path, env) {
            Ok(config) => {
                for w in &config.warnings {
                    tracing::warn!(config = %path.display(), "{w}");
                }
                for note in self.reload(config) {
                    tracing::warn!(config = %path.display(), "{note}");
                }
                self.count_reload("ok");
                true
            }
            Err(e) => {
                for p in &e.problems {
                    tracing::error!(
                        config = %path.display(),
                        key = %p.key,
                        problem = %p.message,
                        "configuration rejected; keeping the running one"
                    );
                }
                self.count_reload("error");
                false
            }
        }
    }

    fn count_reload(&self, outcome: &'static str) {
        self.metrics
            .reloads
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
    }
}

/// Resolves once `stop` turns true (or its sender is gone).
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    loop {
        if *stop.borrow_and_update() {
            return;
        }
        if stop.changed().await.is_err() {
            return;
        }
    }
}
