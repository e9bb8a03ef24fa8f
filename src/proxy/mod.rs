//! The request path, as a sequence of named phases over one `RequestCtx`:
//!
//! 1. `admit`: absolute-form refusal, `?ping`, Referer/Origin, CORS
//!    preflight;
//! 2. `target`: route resolution and path safety, the upstream query;
//! 3. `limit`: per-client rate limits;
//! 4. `body`: method and request body (kept for a retry, or streamed);
//! 5. `forward`: token, upstream exchange, one retry on a refused token;
//! 6. `respond`: response headers, token scrubbing, URL rewriting;
//! 7. `observe`: CORS header, metrics, usage attribution, access log.
//!
//! [`Proxy::handle`] never fails: every phase returns a [`ProxyError`] that
//! becomes an ArcGIS-shaped response in one place.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use http::header::HeaderMap;
use http::{Request, Response};
use hyper::body::Body;
use prometheus_client::metrics::counter::Counter;

use crate::body::{BoxError, ProxyBody};
use crate::config::Config;
use crate::error::ProxyError;
use crate::metrics::{Metrics, RequestLabels, RouteLabel};
use crate::policy::client;
use crate::policy::quota::LocalQuota;
use crate::policy::rate::{Limit, RateLimiter};
use crate::scrub::ScrubPatterns;
use crate::shared_rate::SharedStore;
use crate::token::TokenSource;
use crate::upstream::Clients;

mod admit;
mod body;
mod forward;
mod limit;
mod observe;
mod print;
mod respond;
mod target;
#[cfg(test)]
mod tests;

pub use forward::Upstream;
use observe::RequestCtx;

/// What the service knows about the connection a request came on.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    /// TCP peer.
    pub peer: SocketAddr,
    /// True on the TLS listener.
    pub tls: bool,
    /// Serving thread the connection lives on (selects its upstream pool).
    pub shard: usize,
}

/// The proxy: config, upstream client and one token source per credential.
pub struct Proxy {
    config: Arc<Config>,
    clients: Clients,
    tokens: BTreeMap<String, TokenSource>,
    metrics: Arc<Metrics>,
    /// Per-client buckets: one slot per route, then one per app.
    limiter: RateLimiter,
    /// Each app's quota count in this process (`None`: no quota).
    quotas: Vec<Option<Arc<LocalQuota>>>,
    /// The wall clock quota windows are counted on (tests set their own).
    wall_clock: fn() -> std::time::SystemTime,
    /// Rate limits shared with other replicas, when configured.
    shared: Option<SharedStore>,
    /// Every route's upstream URL prefix, for `rewrite_urls`.
    rewrite_from: Vec<String>,
    /// Compiled body patterns by (token ids, rewriting?): built once per
    /// token, not per request.
    scrub_cache: moka::sync::Cache<respond::ScrubKey, Arc<ScrubPatterns>>,
    /// The entry used last (without and with URL rewriting), checked before
    /// the cache: nearly every request wants the same one, and this read is
    /// cheaper than a cache lookup.
    scrub_last: [arc_swap::ArcSwapOption<(respond::ScrubKey, Arc<ScrubPatterns>)>; 2],
    /// Per route, the token sources of every credential an app may use in
    /// place of the route's own (empty for most routes): their tokens are
    /// scrubbed from the route's answers too.
    route_sources: Vec<Vec<TokenSource>>,
    /// Per-route metric handles for the common case, looked up once.
    route_metrics: Vec<RouteMetrics>,
    /// Usage-attribution counters per app, for the routes it was served on.
    app_metrics: Vec<observe::AppUsage>,
}

/// Metric handles of one route (shared with the families in [`Metrics`]).
struct RouteMetrics {
    ok: Counter,
    upstream: prometheus_client::metrics::histogram::Histogram,
}

impl Proxy {
    /// Builds the proxy for a validated config, with its own metrics.
    pub fn new(config: Arc<Config>) -> Proxy {
        let clients = Clients::new(&config, 1);
        Proxy::assemble(config, clients, BTreeMap::new(), Arc::new(Metrics::new()))
    }

    /// Builds the proxy from parts: `reuse` holds token sources to keep (a
    /// reload keeps the sources of unchanged credentials, tokens and all);
    /// every other credential gets a new source.
    pub fn assemble(
        config: Arc<Config>,
        clients: Clients,
        mut reuse: BTreeMap<String, TokenSource>,
        metrics: Arc<Metrics>,
    ) -> Proxy {
        let timeout = config.limits.upstream_timeout;
        let tokens: BTreeMap<String, TokenSource> = config
            .credentials
            .values()
            .map(|c| {
                let src = reuse.remove(&c.name).unwrap_or_else(|| {
                    TokenSource::from_config(
                        c,
                        clients.control().clone(),
                        timeout,
                        Some(Arc::clone(&metrics)),
                    )
                });
                (c.name.clone(), src)
            })
            .collect();
        let rewrite_from = config
            .routes
            .iter()
            .map(|r| r.upstream.as_str().trim_end_matches('/').to_string())
            .collect();
        let route_metrics = config
            .routes
            .iter()
            .map(|r| RouteMetrics {
                ok: metrics
                    .requests
                    .get_or_create(&RequestLabels {
                        route: r.name.clone(),
                        status: 200,
                    })
                    .clone(),
                upstream: metrics
                    .upstream_duration
                    .get_or_create(&RouteLabel {
                        route: r.name.clone(),
                    })
                    .clone(),
            })
            .collect();
        let app_metrics = config.apps.iter().map(|_| Default::default()).collect();
        let shared = config.rate_limit_store.as_ref().and_then(|s| {
            SharedStore::new(s)
                .map_err(|e| tracing::error!(error = %e, "cannot use the rate-limit store; limits stay local"))
                .ok()
        });
        let limits: Vec<Limit> = config
            .routes
            .iter()
            .map(|r| (format!("route:{}", r.name), r.rate_limit))
            .chain(
                config
                    .apps
                    .iter()
                    .map(|a| (format!("app:{}", a.name), a.rate_limit)),
            )
            .collect();
        let route_sources = config
            .routes
            .iter()
            .map(|r| {
                let Some(own) = r.credential.as_deref() else {
                    return Vec::new();
                };
                let mut names: Vec<&str> = config
                    .apps
                    .iter()
                    .filter_map(|a| a.credentials.get(own).map(String::as_str))
                    .filter(|n| *n != own)
                    .collect();
                names.sort_unstable();
                names.dedup();
                if !names.is_empty() {
                    names.push(own);
                }
                names
                    .into_iter()
                    .filter_map(|n| tokens.get(n).cloned())
                    .collect()
            })
            .collect();
        let quotas = config
            .apps
            .iter()
            .map(|a| a.quota.map(|_| Arc::new(LocalQuota::default())))
            .collect();
        Proxy {
            shared,
            route_metrics,
            route_sources,
            app_metrics,
            limiter: RateLimiter::new(&limits),
            quotas,
            wall_clock: std::time::SystemTime::now,
            config,
            clients,
            tokens,
            metrics,
            rewrite_from,
            scrub_cache: moka::sync::Cache::builder()
                .max_capacity(256)
                .time_to_idle(std::time::Duration::from_secs(3600))
                .build(),
            scrub_last: Default::default(),
        }
    }

    /// Takes over what `old` counted for the apps and routes whose limits
    /// did not change: their clients' rate-limit buckets and their quota
    /// counts. A reload then does not hand every client a fresh bucket.
    pub fn keep_counts_of(&mut self, old: &Proxy) {
        self.limiter.keep_buckets_of(&old.limiter);
        for (i, app) in self.config.apps.iter().enumerate() {
            let Some(spec) = app.quota else { continue };
            let before = old.config.apps.index(&app.name).and_then(|j| {
                (old.config.apps.get(j).quota == Some(spec))
                    .then(|| old.quotas[j].clone())
                    .flatten()
            });
            if let Some(counter) = before {
                self.quotas[i] = Some(counter);
            }
        }
    }

    /// Counts quota windows on `clock` instead of the system's wall clock.
    pub fn with_wall_clock(mut self, clock: fn() -> std::time::SystemTime) -> Proxy {
        self.wall_clock = clock;
        self
    }

    /// The upstream clients.
    pub fn clients(&self) -> &Clients {
        &self.clients
    }

    /// The metrics this proxy records into.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The config in use.
    pub fn config(&self) -> &Arc<Config> {
        &self.config
    }

    /// Token sources by credential name.
    pub fn tokens(&self) -> &BTreeMap<String, TokenSource> {
        &self.tokens
    }

    /// True when the first token fetch of every credential in use has
    /// finished, successfully or not. A failing credential shows in
    /// `/readyz`'s body, in metrics and in its routes' 503/502 answers, not
    /// in readiness: during a token outage every replica would turn unready
    /// at once and clients would get connection errors instead of those
    /// answers.
    pub fn tokens_settled(&self) -> bool {
        self.config
            .credentials_in_use()
            .all(|n| self.tokens.get(n).is_some_and(|t| t.settled()))
    }

    /// Starts the background refresh of every credential in use: the first
    /// token is fetched at once, so the proxy becomes ready without waiting
    /// for a first request, and each is replaced before it expires.
    pub fn start_refreshers(&self) {
        for name in self.config.credentials_in_use() {
            if let Some(src) = self.tokens.get(name) {
                src.spawn_refresher();
            }
        }
    }

    /// Serves one request on this connection's upstream pool; never fails.
    pub async fn handle<B>(&self, req: Request<B>, conn: &ConnInfo) -> Response<ProxyBody>
    where
        B: Body<Data = Bytes> + Send + Sync + 'static,
        B::Error: Into<BoxError>,
    {
        self.handle_with(self.clients.shard(conn.shard), req, conn)
            .await
    }

    /// Serves one request through `upstream`; never fails.
    pub async fn handle_with<U, B>(
        &self,
        upstream: &U,
        req: Request<B>,
        conn: &ConnInfo,
    ) -> Response<ProxyBody>
    where
        U: Upstream,
        B: Body<Data = Bytes> + Send + Sync + 'static,
        B::Error: Into<BoxError>,
    {
        let mut ctx = RequestCtx::new(self, &req, conn);
        let result = self.serve(upstream, req, &mut ctx).await;
        self.observe(ctx, result)
    }

    /// The phases in order; each returns early with its answer or error.
    async fn serve<U, B>(
        &self,
        upstream: &U,
        req: Request<B>,
        ctx: &mut RequestCtx,
    ) -> Result<Response<ProxyBody>, ProxyError>
    where
        U: Upstream,
        B: Body<Data = Bytes> + Send + Sync + 'static,
        B::Error: Into<BoxError>,
    {
        let (parts, body) = req.into_parts();
        if let Some(answered) = self.admit(&parts, ctx)? {
            return Ok(answered);
        }
        let mut target = target::resolve(&self.config, &parts)?;
        ctx.route = Some(target.route.index);
        ctx.note_target(target.origin(), target.path());
        let app = ctx.app.unwrap_or(self.config.apps.len() - 1);
        self.limit(target.route, app, ctx.client).await?;
        let mut body = body::read(&parts, body, &self.config.limits).await?;
        let printed = self
            .print_layers(&parts, &mut target, &mut body, app, &ctx.conn)
            .await?;
        let forwarded = self
            .forward(upstream, &parts, &target, app, &ctx.request_id, body)
            .await?;
        ctx.note_upstream(forwarded.parts.status, forwarded.upstream_time);
        self.respond(&parts, &target, forwarded, &ctx.conn, &printed)
    }

    /// The client's address (see [`crate::policy::client`]).
    pub fn client_ip(&self, headers: &HeaderMap, conn: &ConnInfo) -> IpAddr {
        client::client_ip(conn.peer.ip(), headers, &self.config.server.trusted_proxies)
    }
}
