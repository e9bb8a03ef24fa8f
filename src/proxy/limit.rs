//! Phase 3, limit: the client's token bucket for the route, from the shared
//! store when one is configured (falling back as `on_store_error` says when
//! it does not answer), else from this process's limiter.

use std::net::IpAddr;
use std::time::Duration;

use super::Proxy;
use crate::config::StoreFallback;
use crate::error::ProxyError;
use crate::metrics::RouteLabel;
use crate::policy::route::Route;

impl Proxy {
    /// Takes one token from `client`'s bucket for `route`; 429 when empty.
    pub(super) async fn limit(&self, route: &Route, client: IpAddr) -> Result<(), ProxyError> {
        match self.rate_check(route, client).await {
            Ok(()) => Ok(()),
            Err(retry_after) => {
                self.metrics
                    .rate_limited
                    .get_or_create(&RouteLabel {
                        route: route.name.clone(),
                    })
                    .inc();
                Err(ProxyError::RateLimited { retry_after })
            }
        }
    }

    /// `Err(wait)` when the bucket is empty.
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
}

#[cfg(test)]
mod tests {
    use crate::error::ProxyError;
    use crate::proxy::tests::Harness;

    // Refilling is the limiter's (policy::rate, with a fake clock); this
    // phase adds the per-client key, the error and the metric.
    #[tokio::test]
    async fn a_route_limit_refuses_with_retry_after_per_client() {
        let h = Harness::with_route_extra("rate_limit = { requests = 2, per_secs = 10 }");
        let route = h.config.routes.iter().next().unwrap();
        let (a, b) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        h.proxy.limit(route, a).await.unwrap();
        h.proxy.limit(route, a).await.unwrap();
        let Err(ProxyError::RateLimited { retry_after }) = h.proxy.limit(route, a).await else {
            panic!("third request within the window was admitted");
        };
        assert!(retry_after > std::time::Duration::ZERO);
        // Buckets are per client.
        h.proxy.limit(route, b).await.unwrap();
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
}
