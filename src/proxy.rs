//! The request pipeline, as a sequence of named phases:
//! ping → referer/origin → CORS preflight → route and path safety → method and
//! body → token → forward (with one retry on token rejection) → response
//! hygiene → access log.
//!
//! [`Proxy::handle`] never fails: every phase returns a [`ProxyError`] that
//! becomes an ArcGIS-shaped response in one place.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::{Body, Frame, SizeHint};
use tokio::time::Instant;
use url::Url;

use crate::body::{self, BoxError, ProxyBody};
use crate::codec::Coding;
use crate::config::{Config, StoreFallback};
use crate::error::ProxyError;
use crate::forward::{self, Answer, Clients, Outgoing, Verdict};
use crate::metrics::{AppLabels, CredentialLabel, Metrics, RequestLabels, RouteLabel};
use crate::policy::client;
use crate::policy::path::{self, PathError};
use crate::policy::rate::RateLimiter;
use crate::policy::route::{Route, TokenIn};
use crate::scrub::{self, ScrubBody, ScrubPatterns, Scrubber, UrlRewriter};
use crate::shared_rate::SharedStore;
use crate::token::{Token, TokenSource, TokenState};
use prometheus_client::metrics::counter::Counter;

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
    limiter: RateLimiter,
    /// Rate limits shared with other replicas, when configured.
    shared: Option<SharedStore>,
    /// Every route's upstream URL prefix, for `rewrite_urls`.
    rewrite_from: Vec<String>,
    /// Compiled body patterns by (token ids, rewriting?): built once per
    /// token, not per request.
    scrub_cache: moka::sync::Cache<ScrubKey, Arc<ScrubPatterns>>,
    /// The entry used last (without and with URL rewriting), checked before
    /// the cache: nearly every request wants the same one, and this read is
    /// cheaper than a cache lookup.
    scrub_last: [arc_swap::ArcSwapOption<(ScrubKey, Arc<ScrubPatterns>)>; 2],
    /// Per-route metric handles for the common case, looked up once.
    route_metrics: Vec<RouteMetrics>,
    /// Usage-attribution counters (requests, bytes) per (allowlist entry or
    /// none) × route, created on first use.
    app_metrics: Vec<std::sync::OnceLock<(Counter, Counter)>>,
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
        let tokens = config
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
        let app_metrics = (0..(config.referers.len() + 1) * config.routes.len().max(1))
            .map(|_| std::sync::OnceLock::new())
            .collect();
        let shared = config.rate_limit_store.as_ref().and_then(|s| {
            SharedStore::new(&s.url, s.budget, s.on_error)
                .map_err(|e| tracing::error!(error = %e, "cannot use the rate-limit store; limits stay local"))
                .ok()
        });
        Proxy {
            shared,
            route_metrics,
            app_metrics,
            limiter: RateLimiter::new(&config.routes),
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

    /// True when every credential in use holds a usable token.
    pub fn tokens_ready(&self) -> bool {
        self.config.credentials_in_use().all(|n| {
            self.tokens
                .get(n)
                .is_some_and(|t| t.state() == TokenState::Ok)
        })
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

    /// Serves one request; never fails.
    pub async fn handle<B>(&self, req: Request<B>, conn: &ConnInfo) -> Response<ProxyBody>
    where
        B: Body<Data = Bytes> + Send + Sync + 'static,
        B::Error: Into<BoxError>,
    {
        // The access log line costs a URL parse and a body wrapper; skip
        // both when the `access` target is filtered out (RUST_LOG=warn).
        let access = tracing::enabled!(target: "access", tracing::Level::INFO);
        // Read from the clock only when the access log will print it.
        let started = access.then(Instant::now);
        let mut log = AccessLog {
            method: req.method().clone(),
            path: if access {
                req.uri().path().chars().take(256).collect()
            } else {
                String::new()
            },
            route: None,
            route_index: None,
            app: None,
            referer: if access {
                referer_origin(req.headers())
            } else {
                None
            },
            client: self.client_ip(req.headers(), conn),
            status: 0,
            started,
            bytes: 0,
            error: None,
        };
        let mut cors_origin = None;
        let result = self.serve(req, conn, &mut log, &mut cors_origin).await;
        let mut resp = result.unwrap_or_else(|e| {
            log.error = Some(e.to_string());
            e.into_response()
        });
        if let Some(origin) = cors_origin {
            let h = resp.headers_mut();
            h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
            h.append(header::VARY, HeaderValue::from_static("Origin"));
        }
        log.status = resp.status().as_u16();
        if access {
            log.route = log
                .route_index
                .and_then(|i| self.config.routes.iter().nth(i))
                .map(|r| r.name.clone());
        }
        match log.route_index {
            Some(i) if log.status == 200 => {
                self.route_metrics[i].ok.inc();
            }
            _ => {
                self.metrics
                    .requests
                    .get_or_create(&RequestLabels {
                        route: log
                            .route_index
                            .and_then(|i| self.config.routes.iter().nth(i))
                            .map_or_else(|| "none".into(), |r| r.name.clone()),
                        status: log.status,
                    })
                    .inc();
            }
        }
        // Usage attribution, for requests that were admitted and routed.
        let bytes = match (log.app, log.route_index) {
            (Some(entry), Some(route)) => {
                let (requests, bytes) = self.app_counters(entry, route);
                requests.inc();
                Some(bytes)
            }
            _ => None,
        };
        resp.map(|b| ObservedBody::wrap(b, access.then_some(log), bytes))
    }

    /// One token from the client's bucket for `route`: from the shared store
    /// when there is one (falling back as configured when it does not
    /// answer), else from this process's limiter.
    async fn rate_check(&self, route: &Route, client: IpAddr) -> Result<(), Duration> {
        let Some((requests, per)) = route.rate_limit else {
            return Ok(());
        };
        let Some(store) = &self.shared else {
            return self.limiter.check(route.index, client);
        };
        match store.check(&route.name, client, requests, per).await {
            Ok(None) => Ok(()),
            Ok(Some(wait)) => Err(wait),
            Err(()) => {
                self.metrics.rate_limit_store_errors.inc();
                match store.fallback {
                    StoreFallback::Local => self.limiter.check(route.index, client),
                    StoreFallback::Open => Ok(()),
                    StoreFallback::Closed => Err(Duration::from_secs(1)),
                }
            }
        }
    }

    /// The (requests, bytes) counters for an allowlist entry and a route.
    fn app_counters(&self, entry: Option<usize>, route: usize) -> &(Counter, Counter) {
        let routes = self.config.routes.len().max(1);
        let slot = entry.map_or(0, |e| e + 1) * routes + route;
        self.app_metrics[slot].get_or_init(|| {
            let labels = AppLabels {
                app: entry.map_or_else(
                    || "none".to_string(),
                    |e| self.config.referers.label(e).to_string(),
                ),
                route: self
                    .config
                    .routes
                    .iter()
                    .nth(route)
                    .map_or_else(String::new, |r| r.name.clone()),
            };
            (
                self.metrics.app_requests.get_or_create(&labels).clone(),
                self.metrics.app_bytes.get_or_create(&labels).clone(),
            )
        })
    }

    async fn serve<B>(
        &self,
        req: Request<B>,
        conn: &ConnInfo,
        log: &mut AccessLog,
        cors_origin: &mut Option<HeaderValue>,
    ) -> Result<Response<ProxyBody>, ProxyError>
    where
        B: Body<Data = Bytes> + Send + Sync + 'static,
        B::Error: Into<BoxError>,
    {
        let cfg = &*self.config;
        let (parts, body) = req.into_parts();
        // HTTP/1 absolute-form (`GET https://host/ HTTP/1.1`) is how clients
        // talk to a forward proxy; this is not one. (HTTP/2 always carries
        // scheme and authority, so only HTTP/1 is checked.)
        if parts.version <= http::Version::HTTP_11 && parts.uri.scheme().is_some() {
            return Err(PathError::AbsoluteForm.into());
        }
        let is_proxy_form = parts.uri.path() == cfg.server.proxy_path;

        // Phase: ping, answered before any referer check.
        if is_proxy_form
            && parts.uri.query() == Some("ping")
            && matches!(parts.method, Method::GET | Method::HEAD)
        {
            return Ok(self.ping());
        }

        // Phase: Referer/Origin.
        let values = parts
            .headers
            .get_all(header::REFERER)
            .iter()
            .chain(parts.headers.get_all(header::ORIGIN).iter());
        match cfg.referers.check_all(values) {
            Ok(entry) => log.app = Some(entry),
            Err(e) => {
                tracing::debug!(reason = %e, "referer check failed");
                self.metrics.referer_rejections.inc();
                return Err(ProxyError::RefererNotAllowed);
            }
        }
        *cors_origin = parts.headers.get(header::ORIGIN).cloned();

        // Phase: CORS preflight, answered here and never forwarded.
        if parts.method == Method::OPTIONS {
            return Ok(preflight(&parts.headers));
        }

        // Phase: route resolution and path safety.
        // `upstream_base` is `scheme://host[:port]/path` of the target, already
        // normalised and under the route; `query` is the client's query.
        // `origin_len` bytes of it are `scheme://host[:port]`.
        let (route, upstream_base, origin_len, query) = if is_proxy_form {
            let raw = parts.uri.query().ok_or(PathError::MissingTarget)?;
            let url = path::parse_target(raw)?;
            let route = cfg.routes.by_url(&url).ok_or(ProxyError::NotProxied)?;
            let base = url[..url::Position::AfterPath].to_string();
            let origin_len = url[..url::Position::BeforePath].len();
            let query = url.query().map(|q| Cow::Owned(q.to_string()));
            (route, base, origin_len, query)
        } else {
            let normalised = path::normalise_path(parts.uri.path())?;
            let (route, rest) = cfg
                .routes
                .by_mount(&normalised)
                .ok_or(ProxyError::NoRoute)?;
            let mut base = String::with_capacity(route.origin().len() + normalised.len() + 32);
            base.push_str(route.origin());
            route.push_upstream_path(rest, &mut base);
            let origin_len = route.origin().len();
            (
                route,
                base,
                origin_len,
                parts.uri.query().map(Cow::Borrowed),
            )
        };
        let route: &Route = route;
        log.route_index = Some(route.index);

        // Phase: rate limit, per client IP per route.
        if let Err(wait) = self.rate_check(route, log.client).await {
            self.metrics
                .rate_limited
                .get_or_create(&RouteLabel {
                    route: route.name.clone(),
                })
                .inc();
            return Err(ProxyError::RateLimited { retry_after: wait });
        }

        // Phase: method and body.
        if !matches!(parts.method, Method::GET | Method::HEAD | Method::POST) {
            return Err(ProxyError::MethodNotAllowed);
        }
        let limits = &cfg.limits;
        let announced = content_length(&parts.headers)?;
        if announced.is_some_and(|n| n > limits.max_request_body_bytes) {
            return Err(ProxyError::BodyTooLarge);
        }
        let is_form = parts.method == Method::POST
            && parts
                .headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|ct| {
                    ct.trim_start()
                        .to_ascii_lowercase()
                        .starts_with("application/x-www-form-urlencoded")
                });
        let body_empty = announced == Some(0) || body.is_end_stream();
        let mut request_body = if body_empty {
            RequestBody::Kept(Bytes::new())
        } else if is_form {
            // Form bodies are parameters: read them (bounded) so a client's
            // `token` parameter can be removed, and keep them for a retry.
            let bytes =
                collect_limited(body, limits.max_request_body_bytes, limits.upstream_timeout)
                    .await?;
            RequestBody::Kept(strip_form_token(bytes))
        } else if announced.is_some_and(|n| n <= limits.retry_body_bytes) {
            RequestBody::Kept(
                collect_limited(body, limits.retry_body_bytes, limits.upstream_timeout).await?,
            )
        } else {
            RequestBody::Streaming(Some(
                Limited::new(
                    body.map_err(Into::into),
                    limits.max_request_body_bytes as usize,
                )
                .map_err(BoxError::from)
                .boxed(),
            ))
        };

        // The upstream query without any client token, with echoToken=false
        // for Basemap Styles.
        // Borrowed from the client's URI unless something changed.
        let mut base_query: Cow<'_, str> = query
            .as_deref()
            .map(|q| {
                let names: &[&str] = if route.basemap_styles {
                    &["token", "echotoken"]
                } else {
                    &["token"]
                };
                path::strip_params(q, names)
            })
            .unwrap_or_default();
        if route.basemap_styles {
            let q = base_query.to_mut();
            if !q.is_empty() {
                q.push('&');
            }
            q.push_str("echoToken=false");
        }

        // Phase: token.
        let source = route.credential.as_deref().and_then(|n| self.tokens.get(n));
        let mut token = match source {
            Some(s) => Some(s.token().await?),
            None => None,
        };
        let upstream_referer = route
            .credential
            .as_deref()
            .and_then(|n| cfg.credentials.get(n))
            .and_then(|c| c.upstream_referer.as_ref());

        // Phase: forward, retrying once with a fresh token if the upstream
        // refuses ours and the body was kept.
        let scrubbing = route.credential.is_some() || route.rewrite_urls;
        let mut attempt = 0;
        let resp = loop {
            attempt += 1;
            let (origin, path) = upstream_base.split_at(origin_len);
            let target = compose_target(path, &base_query, route, token.as_deref());
            let (body, content_length) = request_body.take(announced);
            let out = Outgoing {
                origin,
                target: &target,
                host: route.host(),
                headers: &parts.headers,
                method: &parts.method,
                auth_header: token
                    .as_deref()
                    .filter(|_| route.token_in == TokenIn::Header)
                    .map(Token::header_value),
                upstream_referer,
                content_length,
                decodable_only: scrubbing,
            };
            // One deadline covers the response head and, for answers that
            // may hold a token error, the small body read to check it. One
            // clock reading serves the deadline, the latency metric and the
            // pool's idle check.
            let sent_at = tokio::time::Instant::now();
            let exchange = async {
                let resp = self.send(conn.shard, &out, body, sent_at).await?;
                self.route_metrics[route.index]
                    .upstream
                    .observe(sent_at.elapsed().as_secs_f64());
                match (source, token.as_ref()) {
                    (Some(_), Some(_)) => forward::inspect(resp).await.map_err(|e| {
                        tracing::warn!(error = %crate::error::describe(&*e), "upstream answer unreadable");
                        ProxyError::UpstreamUnreachable
                    }),
                    _ => {
                        let (parts, body) = resp.into_parts();
                        Ok(Verdict::Pass(
                            parts,
                            Answer::Stream(body.boxed()),
                        ))
                    }
                }
            };
            let verdict = tokio::time::timeout_at(sent_at + limits.upstream_timeout, exchange)
                .await
                .map_err(|_| ProxyError::UpstreamTimeout)??;
            let (Some(src), Some(sent)) = (source, token.as_ref()) else {
                let Verdict::Pass(parts, answer) = verdict else {
                    unreachable!("only answers to token-bearing requests are classified")
                };
                break (parts, answer);
            };
            if let Verdict::Pass(parts, answer) = verdict {
                break (parts, answer);
            }
            src.invalidate(sent);
            if attempt >= 2 || !request_body.is_kept() {
                tracing::warn!(
                    credential = src.name(),
                    "upstream refused the token{}",
                    if attempt >= 2 {
                        " again after a refresh"
                    } else {
                        "; body too large to have been kept for a retry"
                    }
                );
                return Err(ProxyError::TokenRejected);
            }
            tracing::info!(
                credential = src.name(),
                "upstream refused the token; retrying once with a new one"
            );
            self.metrics
                .token_retries
                .get_or_create(&CredentialLabel {
                    credential: src.name().to_string(),
                })
                .inc();
            token = Some(src.token().await?);
        };

        // Phase: response hygiene.
        let (mut parts_out, answer) = resp;
        forward::clean_response_headers(&mut parts_out.headers);
        // Proxy URLs are written only for URL headers and rewrite_urls.
        let needs_base = route.rewrite_urls
            || parts_out.headers.contains_key(header::LOCATION)
            || parts_out.headers.contains_key(header::CONTENT_LOCATION);
        let public_base = if needs_base {
            self.public_base(&parts.headers, &parts.uri, conn)
        } else {
            String::new()
        };
        let rewriter = UrlRewriter {
            public_base: &public_base,
            proxy_path: &cfg.server.proxy_path,
            routes: &cfg.routes,
            upstream_base: &upstream_base,
            upstream_query: query.as_deref(),
            route: Some(route),
        };
        let held = source.map(TokenSource::held).unwrap_or_default();
        let mut secrets: Vec<&str> = Vec::with_capacity(6);
        for t in token.iter().chain(held.iter().flatten()) {
            for v in [t.expose(), t.query_value()] {
                if !secrets.contains(&v) {
                    secrets.push(v);
                }
            }
        }
        scrub::scrub_headers(&mut parts_out.headers, &rewriter, &secrets);
        let content_type = parts_out
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok());
        let scrubber = if scrub::is_binary_type(content_type) {
            None
        } else {
            self.scrubber(&token, &held, &secrets, route, &public_base)
        };
        let body = match scrubber {
            None => answer.into_body(),
            Some(scrubber) => match Coding::of(&parts_out.headers) {
                // Only URL rewriting was asked for: pass what cannot be read.
                None if secrets.is_empty() => answer.into_body(),
                None => {
                    // A coding the proxy cannot look inside may hide the token.
                    tracing::warn!(
                        route = %route.name,
                        "upstream answered in a content coding the proxy cannot scrub"
                    );
                    return Err(ProxyError::UpstreamUnreachable);
                }
                Some(coding) => {
                    let (body, changed) = match answer {
                        Answer::Whole(bytes) => scrub::scrub_whole(bytes, None, coding, scrubber),
                        Answer::Decoded(bytes, plain) => {
                            scrub::scrub_whole(bytes, Some(plain), coding, scrubber)
                        }
                        Answer::Stream(b) => (ScrubBody::new(b, coding, scrubber).boxed(), true),
                    };
                    if changed {
                        // hyper sets the length of a complete body itself.
                        parts_out.headers.remove(header::CONTENT_LENGTH);
                    }
                    body
                }
            },
        };
        Ok(Response::from_parts(parts_out, body))
    }

    /// The body scrubber for one answer: the tokens' patterns from the cache,
    /// and this request's proxy URL prefixes when the route rewrites URLs.
    fn scrubber(
        &self,
        token: &Option<Arc<Token>>,
        held: &[Option<Arc<Token>>],
        secrets: &[&str],
        route: &Route,
        public_base: &str,
    ) -> Option<Scrubber> {
        if secrets.is_empty() && !route.rewrite_urls {
            return None;
        }
        // The request's token and the (at most two) held ones, as ids.
        let mut ids = [0u64; 3];
        for (slot, t) in ids
            .iter_mut()
            .zip(token.iter().chain(held.iter().flatten()))
        {
            *slot = t.id();
        }
        ids.sort_unstable();
        let key = (ids, route.rewrite_urls);
        let last = self.scrub_last[usize::from(key.1)].load();
        let pats = match last.as_deref() {
            Some((k, p)) if *k == key => Arc::clone(p),
            _ => self.scrub_patterns(key, secrets)?,
        };
        drop(last);
        let replacements = if route.rewrite_urls {
            let cfg = &self.config;
            cfg.routes
                .iter()
                .zip(&self.rewrite_from)
                .map(|(r, from)| {
                    match r.mount.as_deref() {
                        Some("/") => public_base.to_string(),
                        Some(m) => format!("{public_base}{m}"),
                        None => format!("{public_base}{}?{from}", cfg.server.proxy_path),
                    }
                    .into_bytes()
                })
                .collect()
        } else {
            Vec::new()
        };
        Some(Scrubber::with_patterns(pats, replacements))
    }

    /// The compiled patterns for `key` from the cache (compiled on a miss),
    /// remembered as the last used.
    fn scrub_patterns(&self, key: ScrubKey, secrets: &[&str]) -> Option<Arc<ScrubPatterns>> {
        let pats = match self.scrub_cache.get(&key) {
            Some(p) => p,
            None => {
                let prefixes: Vec<&str> = if key.1 {
                    self.rewrite_from.iter().map(String::as_str).collect()
                } else {
                    Vec::new()
                };
                let p = ScrubPatterns::new(secrets, &prefixes)?;
                self.scrub_cache.insert(key, Arc::clone(&p));
                p
            }
        };
        self.scrub_last[usize::from(key.1)].store(Some(Arc::new((key, Arc::clone(&pats)))));
        Some(pats)
    }

    /// Sends one request on this serving thread's pool (the caller bounds
    /// the time).
    async fn send(
        &self,
        shard: usize,
        out: &Outgoing<'_>,
        body: ProxyBody,
        now: tokio::time::Instant,
    ) -> Result<Response<forward::UpstreamBody>, ProxyError> {
        match self.clients.shard(shard).send(out, body, now).await {
            Ok(resp) => Ok(resp),
            Err(e) => {
                if chain_has::<http_body_util::LengthLimitError>(&*e) {
                    return Err(ProxyError::BodyTooLarge);
                }
                // The client's own body failed (bad chunked framing, cut
                // short): that is the client's error, not the upstream's.
                if client_body_failed(&*e) {
                    return Err(ProxyError::BadBody);
                }
                tracing::warn!(error = %crate::error::describe(&*e), "upstream request failed");
                Err(ProxyError::UpstreamUnreachable)
            }
        }
    }

    fn ping(&self) -> Response<ProxyBody> {
        let creds: serde_json::Map<String, serde_json::Value> = self
            .tokens
            .iter()
            .map(|(n, t)| (n.clone(), t.state().as_str().into()))
            .collect();
        let body = serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "credentials": creds,
        });
        let mut resp = Response::new(body::full(body.to_string()));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        resp.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        resp
    }

    /// The client's address (see [`crate::policy::client`]).
    pub fn client_ip(&self, headers: &HeaderMap, conn: &ConnInfo) -> IpAddr {
        client::client_ip(conn.peer.ip(), headers, &self.config.server.trusted_proxies)
    }

    /// `scheme://host[:port]` for proxy URLs sent back to this client.
    fn public_base(&self, headers: &HeaderMap, uri: &http::Uri, conn: &ConnInfo) -> String {
        if let Some(p) = &self.config.server.public_url {
            return p.clone();
        }
        let trusted = self
            .config
            .server
            .trusted_proxies
            .iter()
            .any(|n| n.contains(&conn.peer.ip()));
        let forwarded_proto = trusted
            .then(|| headers.get("x-forwarded-proto"))
            .flatten()
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                v.split(',')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase()
            })
            .filter(|p| p == "http" || p == "https");
        let scheme =
            forwarded_proto.unwrap_or_else(|| if conn.tls { "https" } else { "http" }.into());
        let host = uri
            .authority()
            .map(|a| a.as_str().to_string())
            .or_else(|| {
                headers
                    .get(header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .and_then(|h| h.parse::<http::uri::Authority>().ok())
                    .filter(|a| !a.as_str().contains('@'))
                    .map(|a| a.as_str().to_string())
            })
            .unwrap_or_else(|| "localhost".into());
        format!("{scheme}://{host}")
    }
}

/// The request body, either kept in memory (retryable) or streaming once.
enum RequestBody {
    Kept(Bytes),
    Streaming(Option<ProxyBody>),
}

impl RequestBody {
    fn is_kept(&self) -> bool {
        matches!(self, RequestBody::Kept(_))
    }

    /// The body for one attempt and its exact length, if known.
    fn take(&mut self, announced: Option<u64>) -> (ProxyBody, Option<u64>) {
        match self {
            RequestBody::Kept(b) if b.is_empty() => (body::empty(), None),
            RequestBody::Kept(b) => (body::full(b.clone()), Some(b.len() as u64)),
            RequestBody::Streaming(s) => (s.take().unwrap_or_else(body::empty), announced),
        }
    }
}

/// Reads a body the proxy keeps (forms, small bodies for a retry), bounded
/// in size and in time: a client trickling its body cannot hold a request
/// open longer than an upstream may take to answer.
async fn collect_limited<B>(body: B, limit: u64, within: Duration) -> Result<Bytes, ProxyError>
where
    B: Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    match tokio::time::timeout(within, Limited::new(body, limit as usize).collect()).await {
        Err(_) => Err(ProxyError::BadBody),
        Ok(Ok(c)) => Ok(c.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(ProxyError::BodyTooLarge),
        Ok(Err(_)) => Err(ProxyError::BadBody),
    }
}

fn content_length(headers: &HeaderMap) -> Result<Option<u64>, ProxyError> {
    let mut values = headers.get_all(header::CONTENT_LENGTH).iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    let parsed = first
        .to_str()
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .ok_or(ProxyError::BadBody)?;
    Ok(Some(parsed))
}

fn strip_form_token(bytes: Bytes) -> Bytes {
    match std::str::from_utf8(&bytes) {
        Ok(text) => match path::strip_params(text, &["token"]) {
            std::borrow::Cow::Borrowed(_) => bytes,
            std::borrow::Cow::Owned(s) => Bytes::from(s),
        },
        // Not text: nothing that could be a form parameter to strip.
        Err(_) => bytes,
    }
}

/// The upstream request target: the route's path, the query without any
/// client token, and the proxy's token when it goes in the query.
fn compose_target(path: &str, base_query: &str, route: &Route, token: Option<&Token>) -> String {
    let mut s = String::with_capacity(path.len() + base_query.len() + 160);
    if !path.starts_with('/') {
        s.push('/');
    }
    s.push_str(path);
    let token_q = token.filter(|_| route.token_in == TokenIn::Query);
    if !base_query.is_empty() || token_q.is_some() {
        s.push('?');
        s.push_str(base_query);
        if let Some(t) = token_q {
            if !base_query.is_empty() {
                s.push('&');
            }
            s.push_str("token=");
            s.push_str(t.query_value());
        }
    }
    forward::request_target(s)
}

/// Scrub-pattern cache key: the (sorted) ids of the tokens searched for, and
/// whether the route rewrites URLs.
type ScrubKey = ([u64; 3], bool);

/// True when a send failed because the request body (the client's stream)
/// failed, which hyper reports as a user error of the body.
fn client_body_failed(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(h) = err.downcast_ref::<hyper::Error>()
            && h.is_user()
        {
            return true;
        }
        if let Some(h) = err.downcast_ref::<forward::Http1Error>()
            && h.is_request_body()
        {
            return true;
        }
        cur = err.source();
    }
    false
}

fn chain_has<E: std::error::Error + 'static>(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.is::<E>() {
            return true;
        }
        cur = err.source();
    }
    false
}

fn preflight(headers: &HeaderMap) -> Response<ProxyBody> {
    let mut resp = Response::new(body::empty());
    *resp.status_mut() = StatusCode::NO_CONTENT;
    let h = resp.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, HEAD, POST, OPTIONS"),
    );
    let requested = headers
        .get(header::ACCESS_CONTROL_REQUEST_HEADERS)
        .filter(|v| {
            v.as_bytes()
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b',' | b' '))
        })
        .cloned()
        .unwrap_or(HeaderValue::from_static("Content-Type, X-Requested-With"));
    h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, requested);
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("600"),
    );
    h.insert(
        header::VARY,
        HeaderValue::from_static("Access-Control-Request-Method, Access-Control-Request-Headers"),
    );
    h.insert(
        header::ALLOW,
        HeaderValue::from_static("GET, HEAD, POST, OPTIONS"),
    );
    resp
}

/// Only the origin of the Referer (or the Origin) goes into logs: paths and
/// queries of the embedding page are not the operator's business.
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
    route: Option<String>,
    route_index: Option<usize>,
    /// Allowlist entry that admitted the request (inner `None`: no header).
    app: Option<Option<usize>>,
    referer: Option<String>,
    client: IpAddr,
    status: u16,
    /// When the request arrived, if the access log is on.
    started: Option<Instant>,
    bytes: u64,
    error: Option<String>,
}

impl AccessLog {
    fn emit(&self, complete: bool) {
        let latency_ms = self
            .started
            .map_or(0.0, |s| s.elapsed().as_secs_f64() * 1000.0);
        tracing::info!(
            target: "access",
            method = %self.method,
            path = %self.path,
            route = self.route.as_deref().unwrap_or("-"),
            status = self.status,
            latency_ms = (latency_ms * 1000.0).round() / 1000.0,
            referer = self.referer.as_deref().unwrap_or("-"),
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

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
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
