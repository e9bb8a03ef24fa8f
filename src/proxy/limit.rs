//! Phase 3, limit: whether this request may go upstream at all. In order:
//! the route's app allowlist (`routes[].apps`), the client's token bucket
//! for the route, the client's bucket for its app, and the app's quota for
//! the current calendar window. Buckets and quotas come from the shared
//! store when one is configured (falling back as `on_store_error` says when
//! it does not answer), else from this process.

use std::net::IpAddr;
use std::time::Duration;

use super::Proxy;
use crate::config::StoreFallback;
use crate::error::ProxyError;
use crate::metrics::{AppLabel, RouteLabel};
use crate::policy::quota::QuotaVerdict;
use crate::policy::route::Route;

impl Proxy {
    /// Admits one request of `app` from `client` on `route`, or says why
    /// not: 403 for an app the route does not allow, 429 for an empty
    /// bucket or a used-up quota.
    pub(super) async fn limit(
        &self,
        route: &Route,
        app: usize,
        client: IpAddr,
    ) -> Result<(), ProxyError> {
        let name = || self.config.apps.get(app).name.clone();
        if let Some(allowed) = &route.apps
            && !allowed.contains(&app)
        {
            self.metrics
                .app_rejections
                .get_or_create(&self.app_labels(app, route.index))
                .inc();
            return Err(ProxyError::AppNotAllowed);
        }
        if let Some((requests, per)) = route.rate_limit
            && let Err(retry_after) = self
                .bucket(&route.name, route.index, "route", requests, per, client)
                .await
        {
            self.metrics
                .rate_limited
                .get_or_create(&RouteLabel {
                    route: route.name.clone(),
                })
                .inc();
            return Err(ProxyError::RateLimited { retry_after });
        }
        let settings = self.config.apps.get(app);
        if let Some((requests, per)) = settings.rate_limit
            && let Err(retry_after) = self
                .bucket(
                    &settings.name,
                    self.config.routes.len() + app,
                    "app",
                    requests,
                    per,
                    client,
                )
                .await
        {
            self.metrics
                .app_rate_limited
                .get_or_create(&AppLabel { app: name() })
                .inc();
            return Err(ProxyError::RateLimited { retry_after });
        }
        if settings.quota.is_some() {
            self.take_quota(app).await?;
        }
        Ok(())
    }

    /// One token from `client`'s bucket of the limit in `slot` (`kind` and
    /// `owner` name it in the shared store); `Err(wait)` when it is empty.
    async fn bucket(
        &self,
        owner: &str,
        slot: usize,
        kind: &str,
        requests: u32,
        per: Duration,
        client: IpAddr,
    ) -> Result<(), Duration> {
        let Some(store) = &self.shared else {
            return self.limiter.check(slot, client);
        };
        // Routes keep their historical key; apps get a prefix no route name
        // can have (`:` is not allowed in route names).
        let key = match kind {
            "app" => format!("app:{owner}"),
            _ => owner.to_string(),
        };
        match store.check(&key, client, requests, per).await {
            Ok(None) => Ok(()),
            Ok(Some(wait)) => Err(wait),
            Err(()) => {
                self.metrics.rate_limit_store_errors.inc();
                match store.fallback {
                    StoreFallback::Local => self.limiter.check(slot, client),
                    StoreFallback::Open => Ok(()),
                    StoreFallback::Closed => Err(Duration::from_secs(1)),
                }
            }
        }
    }

    /// Counts one request against `app`'s quota; 429 until the window ends
    /// once it is used up.
    async fn take_quota(&self, app: usize) -> Result<(), ProxyError> {
        let settings = self.config.apps.get(app);
        let (Some(spec), Some(Some(local))) = (settings.quota, self.quotas.get(app)) else {
            return Ok(());
        };
        let now = (self.wall_clock)();
        let verdict = match &self.shared {
            None => local.take(spec, now),
            Some(store) => match store.take_quota(&settings.name, spec, now).await {
                Ok(v) => {
                    local.observe(spec, now, v);
                    v
                }
                Err(()) => {
                    self.metrics.rate_limit_store_errors.inc();
                    match store.fallback {
                        StoreFallback::Local => local.take(spec, now),
                        StoreFallback::Open => QuotaVerdict::Admitted {
                            remaining: local.remaining(spec, now),
                        },
                        StoreFallback::Closed => QuotaVerdict::Exhausted {
                            retry_after: Duration::from_secs(1),
                        },
                    }
                }
            },
        };
        let label = AppLabel {
            app: settings.name.clone(),
        };
        match verdict {
            QuotaVerdict::Admitted { remaining } => {
                self.metrics
                    .app_quota_remaining
                    .get_or_create(&label)
                    .set(i64::try_from(remaining).unwrap_or(i64::MAX));
                Ok(())
            }
            QuotaVerdict::Exhausted { retry_after } => {
                self.metrics
                    .app_quota_remaining
                    .get_or_create(&label)
                    .set(0);
                self.metrics.app_quota_exhausted.get_or_create(&label).inc();
                Err(ProxyError::QuotaExhausted {
                    retry_after: retry_after.max(Duration::from_secs(1)),
                })
            }
        }
    }

    /// Requests left in `app`'s quota window as this process knows it, for
    /// `?ping`; `None` for an app without a quota.
    pub(super) fn quota_remaining(&self, app: usize) -> Option<u64> {
        let spec = self.config.apps.get(app).quota?;
        let local = self.quotas.get(app)?.as_ref()?;
        Some(local.remaining(spec, (self.wall_clock)()))
    }
}

#[cfg(test)]
mod tests {
    use crate::error::ProxyError;
    use crate::proxy::Proxy;
    use crate::proxy::tests::Harness;

    // Refilling is the limiter's (policy::rate, with a fake clock); this
    // phase adds the per-client key, the error and the metric.
    #[tokio::test]
    async fn a_route_limit_refuses_with_retry_after_per_client() {
        let h = Harness::with_route_extra("rate_limit = { requests = 2, per_secs = 10 }");
        let route = h.config.routes.iter().next().unwrap();
        let (a, b) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        let app = h.config.apps.len() - 1;
        h.proxy.limit(route, app, a).await.unwrap();
        h.proxy.limit(route, app, a).await.unwrap();
        let Err(ProxyError::RateLimited { retry_after }) = h.proxy.limit(route, app, a).await
        else {
            panic!("third request within the window was admitted");
        };
        assert!(retry_after > std::time::Duration::ZERO);
        // Buckets are per client.
        h.proxy.limit(route, app, b).await.unwrap();
        let limited = h
            .proxy
            .metrics
            .rate_limited
            .get_or_create(&crate::metrics::RouteLabel {
                route: route.name.clone(),
            })
            .get();
        assert_eq!(limited, 1);
    }

    static NOW: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

    fn fake_now() -> std::time::SystemTime {
        std::time::UNIX_EPOCH
            + std::time::Duration::from_secs(NOW.load(std::sync::atomic::Ordering::SeqCst))
    }

    /// On an injected wall clock: the quota runs out, the refusal's
    /// Retry-After ends exactly at the window boundary, and the next window
    /// starts afresh.
    #[tokio::test]
    async fn a_quota_refuses_until_the_window_boundary() {
        use std::sync::atomic::Ordering;
        use std::time::Duration;
        let h = Harness::with_route_extra(
            "[[apps]]\nname = \"parks\"\nreferers = [\"https://parks.example.org\"]\nquota = { requests = 2, per = \"day\" }",
        );
        let proxy = Proxy::new(std::sync::Arc::clone(&h.config)).with_wall_clock(fake_now);
        let route = h.config.routes.iter().next().unwrap();
        let app = h.config.apps.index("parks").unwrap();
        let client = "192.0.2.1".parse().unwrap();
        // 2026-12-06T23:59:00Z: a minute before the day ends.
        let midnight = 1_796_601_600u64;
        NOW.store(midnight - 60, Ordering::SeqCst);
        proxy.limit(route, app, client).await.unwrap();
        proxy.limit(route, app, client).await.unwrap();
        let Err(ProxyError::QuotaExhausted { retry_after }) = proxy.limit(route, app, client).await
        else {
            panic!("the third request of a quota of two was admitted");
        };
        assert_eq!(retry_after, Duration::from_secs(60));
        NOW.store(midnight - 1, Ordering::SeqCst);
        let Err(ProxyError::QuotaExhausted { retry_after }) = proxy.limit(route, app, client).await
        else {
            panic!("admitted before the window ended");
        };
        // Never below a second, as every Retry-After.
        assert_eq!(retry_after, Duration::from_secs(1));
        NOW.store(midnight, Ordering::SeqCst);
        proxy.limit(route, app, client).await.unwrap();
        assert_eq!(proxy.quota_remaining(app), Some(1));
        // Apps without a quota and the app `none` are not counted.
        let none = h.config.apps.len() - 1;
        for _ in 0..5 {
            proxy.limit(route, none, client).await.unwrap();
        }
        assert_eq!(proxy.quota_remaining(none), None);
    }
}
