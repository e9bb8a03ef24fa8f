//! Phase 2, target: which route serves the request and the exact upstream
//! URL it goes to. Both addressing styles end here: a mounted path is
//! normalised and joined to its route's upstream path, a `/proxy?<url>`
//! target is parsed and must lie under some route. Either way the result is
//! a normalised URL under the route (no traversal, no encoded slashes), and
//! the upstream query never carries a client's own `token`.

use std::borrow::Cow;

use http::request::Parts;

use crate::config::Config;
use crate::error::ProxyError;
use crate::policy::path::{self, PathError};
use crate::policy::route::{Route, TokenIn};
use crate::token::Token;

/// Where a request goes upstream.
pub(super) struct Target<'a> {
    /// The route that serves it.
    pub route: &'a Route,
    /// `scheme://host[:port]/path` of the target, already normalised and
    /// under the route.
    pub upstream_base: String,
    /// Bytes of `upstream_base` that are `scheme://host[:port]`.
    origin_len: usize,
    /// The client's query, as it came.
    pub query: Option<Cow<'a, str>>,
}

/// Resolves the route and upstream URL of a request (either addressing
/// style).
#[inline]
pub(super) fn resolve<'a>(cfg: &'a Config, parts: &'a Parts) -> Result<Target<'a>, ProxyError> {
    if parts.uri.path() == cfg.server.proxy_path {
        let raw = parts.uri.query().ok_or(PathError::MissingTarget)?;
        let url = path::parse_target(raw)?;
        let route = cfg.routes.by_url(&url).ok_or(ProxyError::NotProxied)?;
        Ok(Target {
            route,
            upstream_base: url[..url::Position::AfterPath].to_string(),
            origin_len: url[..url::Position::BeforePath].len(),
            query: url.query().map(|q| Cow::Owned(q.to_string())),
        })
    } else {
        let normalised = path::normalise_path(parts.uri.path())?;
        let (route, rest) = cfg
            .routes
            .by_mount(&normalised)
            .ok_or(ProxyError::NoRoute)?;
        let mut base = String::with_capacity(route.origin().len() + normalised.len() + 32);
        base.push_str(route.origin());
        route.push_upstream_path(rest, &mut base);
        Ok(Target {
            route,
            upstream_base: base,
            origin_len: route.origin().len(),
            query: parts.uri.query().map(Cow::Borrowed),
        })
    }
}

impl Target<'_> {
    /// `scheme://host[:port]` of the upstream.
    pub fn origin(&self) -> &str {
        &self.upstream_base[..self.origin_len]
    }

    /// The upstream path.
    pub fn path(&self) -> &str {
        &self.upstream_base[self.origin_len..]
    }

    /// The query that goes upstream, before the token: the client's without
    /// any `token`, and for a Basemap Styles request (decided by this
    /// request's upstream path, not the route's) with `echoToken=false` in
    /// place of the client's own `echoToken`. Borrowed from the client's URI unless
    /// something changed.
    #[inline]
    pub fn upstream_query(&self) -> Cow<'_, str> {
        let styles = crate::policy::route::is_basemap_styles(self.path());
        let mut q: Cow<'_, str> = self
            .query
            .as_deref()
            .map(|q| {
                let names: &[&str] = if styles {
                    &["token", "echotoken"]
                } else {
                    &["token"]
                };
                path::strip_params(q, names)
            })
            .unwrap_or_default();
        if styles {
            let q = q.to_mut();
            if !q.is_empty() {
                q.push('&');
            }
            q.push_str("echoToken=false");
        }
        q
    }

    /// The request target of one attempt: the path, `base_query`, and the
    /// proxy's token when the route puts it in the query.
    #[inline]
    pub fn request_target(&self, base_query: &str, token: Option<&Token>) -> String {
        let path = self.path();
        let mut s = String::with_capacity(path.len() + base_query.len() + 160);
        if !path.starts_with('/') {
            s.push('/');
        }
        s.push_str(path);
        let token_q = token.filter(|_| self.route.token_in == TokenIn::Query);
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
        crate::upstream::request_target(s)
    }
}

#[cfg(test)]
mod tests {
    use http::Method;

    use super::resolve;
    use crate::error::ProxyError;
    use crate::policy::path::PathError;
    use crate::proxy::tests::{Harness, request};

    fn target(h: &Harness, uri: &str) -> Result<(String, String, String), ProxyError> {
        let (parts, _) = h.parts(request(Method::GET, uri, &[]));
        let t = resolve(&h.config, &parts)?;
        Ok((
            t.route.name.clone(),
            t.upstream_base.clone(),
            t.upstream_query().into_owned(),
        ))
    }

    #[test]
    fn both_addressing_styles_reach_the_same_upstream_url() {
        let h = Harness::new();
        let mounted = target(&h, "/basemaps/arcgis/navigation?f=json&token=client").unwrap();
        let proxied = target(
            &h,
            "/proxy?https://basemapstyles-api.arcgis.com/arcgis/rest/services/styles/v2/arcgis/navigation?f=json&token=client",
        )
        .unwrap();
        assert_eq!(mounted, proxied);
        assert_eq!(
            mounted.1,
            "https://basemapstyles-api.arcgis.com/arcgis/rest/services/styles/v2/arcgis/navigation"
        );
        // The client's token is gone; Basemap Styles never echoes ours.
        assert_eq!(mounted.2, "f=json&echoToken=false");
    }

    #[test]
    fn hostile_targets_are_refused() {
        let h = Harness::new();
        for (uri, expect) in [
            // Normalised first: a path that climbs out of its mount is
            // under no route.
            ("/basemaps/../../etc/passwd", "no route"),
            ("/basemaps/a%2f..%2f..%2fx", "bad"),
            ("/elsewhere/x", "no route"),
            ("/proxy", "bad"),
            (
                "/proxy?https://evil.example/arcgis/rest/services/styles/v2",
                "not proxied",
            ),
            (
                "/proxy?https://basemapstyles-api.arcgis.com.evil.example/arcgis/rest/services/styles/v2",
                "not proxied",
            ),
            (
                "/proxy?https://basemapstyles-api.arcgis.com/arcgis/rest/services/styles/v2/../../admin",
                "not proxied",
            ),
        ] {
            match (target(&h, uri), expect) {
                (Err(ProxyError::BadRequest(_)), "bad")
                | (Err(ProxyError::NoRoute), "no route")
                | (Err(ProxyError::NotProxied), "not proxied") => {}
                (other, _) => panic!("{uri}: expected {expect}, got {:?}", other.map(|t| t.1)),
            }
        }
        let (parts, _) = h.parts(request(Method::GET, "/proxy", &[]));
        assert!(matches!(
            resolve(&h.config, &parts),
            Err(ProxyError::BadRequest(PathError::MissingTarget))
        ));
    }

    #[test]
    fn the_token_goes_in_the_query_only_where_the_route_says() {
        let h = Harness::new();
        let (parts, _) = h.parts(request(Method::GET, "/basemaps/a%20b?x=1", &[]));
        let t = resolve(&h.config, &parts).unwrap();
        let token = crate::token::Token::new("tok".into(), tokio::time::Instant::now(), None);
        // The test route injects by header: no token in the target.
        let line = t.request_target("x=1", token.as_ref());
        assert!(!line.contains("tok"), "{line}");
        assert!(line.bytes().all(|b| b.is_ascii_graphic()), "{line}");
    }
}
