//! Phase 1, admit: what is decided before any route is looked at. HTTP/1
//! absolute-form requests are refused (this is not a forward proxy),
//! `?ping` is answered before any referer check, every Referer and Origin
//! must match the allowlist, and CORS preflights are answered here, never
//! forwarded.

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode};

use super::{Proxy, RequestCtx};
use crate::body::{self, ProxyBody};
use crate::error::ProxyError;
use crate::policy::path::PathError;

impl Proxy {
    /// Admits the request into `ctx` (its allowlist entry, its CORS origin),
    /// or answers it here: `Ok(Some(_))` for ping and preflight.
    #[inline]
    pub(super) fn admit(
        &self,
        parts: &http::request::Parts,
        ctx: &mut RequestCtx,
    ) -> Result<Option<Response<ProxyBody>>, ProxyError> {
        // HTTP/1 absolute-form (`GET https://host/ HTTP/1.1`) is how clients
        // talk to a forward proxy; this is not one. (HTTP/2 always carries
        // scheme and authority, so only HTTP/1 is checked.)
        if parts.version <= http::Version::HTTP_11 && parts.uri.scheme().is_some() {
            return Err(PathError::AbsoluteForm.into());
        }
        if parts.uri.path() == self.config.server.proxy_path
            && parts.uri.query() == Some("ping")
            && matches!(parts.method, Method::GET | Method::HEAD)
        {
            return Ok(Some(self.ping()));
        }
        match self.config.referers.app_of(&parts.headers) {
            Ok(app) => ctx.app = Some(app),
            Err(e) => {
                tracing::debug!(reason = %e, "referer check failed");
                self.metrics.referer_rejections.inc();
                return Err(ProxyError::RefererNotAllowed);
            }
        }
        ctx.cors_origin = parts.headers.get(header::ORIGIN).cloned();
        if parts.method == Method::OPTIONS {
            return Ok(Some(preflight(&parts.headers)));
        }
        Ok(None)
    }

    /// `?ping`: version, each credential's state and each `[[apps]]` app
    /// with its quota state; never a secret, never a Referer entry.
    fn ping(&self) -> Response<ProxyBody> {
        let creds: serde_json::Map<String, serde_json::Value> = self
            .tokens
            .iter()
            .map(|(n, t)| (n.clone(), t.state().as_str().into()))
            .collect();
        let apps: serde_json::Map<String, serde_json::Value> = self
            .config
            .apps
            .iter()
            .enumerate()
            .filter(|(_, a)| a.declared)
            .map(|(i, a)| {
                let mut state = serde_json::Map::new();
                if let Some(left) = self.quota_remaining(i) {
                    state.insert("quota_remaining".into(), left.into());
                }
                (a.name.clone(), state.into())
            })
            .collect();
        let body = serde_json::json!({
            "version": env!("CARGO_PKG_VERSION"),
            "credentials": creds,
            "apps": apps,
        });
        crate::error::json_answer(&body)
    }
}

/// The answer to a CORS preflight: the methods the proxy forwards and the
/// requested headers when they are plain header names.
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

#[cfg(test)]
mod tests {
    use http::{Method, StatusCode};

    use crate::error::ProxyError;
    use crate::proxy::tests::{Harness, request};

    #[test]
    fn ping_is_answered_before_the_referer_check() {
        let h = Harness::new();
        let req = request(
            Method::GET,
            "/proxy?ping",
            &[("referer", "https://evil.example/")],
        );
        let (parts, mut ctx) = h.parts(req);
        let resp = h.proxy.admit(&parts, &mut ctx).unwrap().expect("answered");
        assert_eq!(resp.status(), StatusCode::OK);
        assert!(ctx.app.is_none());
    }

    #[test]
    fn every_referer_and_origin_must_match() {
        let h = Harness::new();
        for headers in [
            &[("referer", "https://evil.example/")][..],
            &[
                ("referer", "https://app.example.com/"),
                ("origin", "https://evil.example"),
            ],
            &[
                ("referer", "https://app.example.com/"),
                ("referer", "https://evil.example/"),
            ],
            // Missing headers are refused unless allow_missing is set.
            &[],
        ] {
            let (parts, mut ctx) = h.parts(request(Method::GET, "/basemaps/x", headers));
            let err = h.proxy.admit(&parts, &mut ctx).unwrap_err();
            assert!(matches!(err, ProxyError::RefererNotAllowed), "{headers:?}");
        }
        assert_eq!(h.proxy.metrics.referer_rejections.get(), 4);
        let (parts, mut ctx) = h.parts(request(
            Method::GET,
            "/basemaps/x",
            &[("origin", "https://app.example.com")],
        ));
        assert!(h.proxy.admit(&parts, &mut ctx).unwrap().is_none());
        assert_eq!(ctx.app, Some(0));
        assert_eq!(ctx.cors_origin.as_ref().unwrap(), "https://app.example.com");
    }

    #[test]
    fn preflights_are_answered_and_hostile_header_lists_replaced() {
        let h = Harness::new();
        let (parts, mut ctx) = h.parts(request(
            Method::OPTIONS,
            "/basemaps/x",
            &[
                ("origin", "https://app.example.com"),
                ("access-control-request-headers", "x-a, <script>"),
            ],
        ));
        let resp = h.proxy.admit(&parts, &mut ctx).unwrap().expect("answered");
        assert_eq!(resp.status(), StatusCode::NO_CONTENT);
        assert_eq!(
            resp.headers()["access-control-allow-headers"],
            "Content-Type, X-Requested-With"
        );
    }

    #[test]
    fn absolute_form_is_refused() {
        let h = Harness::new();
        let (parts, mut ctx) = h.parts(request(
            Method::GET,
            "https://evil.example/x",
            &[("referer", "https://app.example.com/")],
        ));
        assert!(matches!(
            h.proxy.admit(&parts, &mut ctx),
            Err(ProxyError::BadRequest(_))
        ));
    }
}
