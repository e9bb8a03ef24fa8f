//! Every failure the proxy answers itself, and the one place that turns it
//! into a response.
//!
//! Modules keep their own small error enums (path, referer, token, upstream);
//! each converts into [`ProxyError`], whose [`ProxyError::into_response`]
//! builds the ArcGIS-shaped JSON body (`{"error":{"code":…,"message":…}}`)
//! with the matching HTTP status. Messages are fixed strings chosen here, so
//! no upstream text, URL or token can reach a client through an error.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};

use crate::body::{self, ProxyBody};
use crate::policy::path::PathError;

/// A failure the proxy answers on its own, mapped to exactly one status.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The request or its target URL cannot be used.
    #[error("bad request: {0}")]
    BadRequest(#[from] PathError),
    /// The request body could not be read or is malformed.
    #[error("bad request body")]
    BadBody,
    /// Referer or Origin did not match the allowlist.
    #[error("referer not allowed")]
    RefererNotAllowed,
    /// A proxy-form target that lies under no route.
    #[error("target not under any route")]
    NotProxied,
    /// A path that no mount serves.
    #[error("no route for path")]
    NoRoute,
    /// A method the endpoint does not answer.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// The request body is larger than `max_request_body_bytes`.
    #[error("request body too large")]
    BodyTooLarge,
    /// The request's app may not use this route (`routes[].apps`).
    #[error("app not allowed on this route")]
    AppNotAllowed,
    /// The client's bucket for this route or app is empty.
    #[error("rate limited")]
    RateLimited { retry_after: Duration },
    /// The app's quota for the current window is used up.
    #[error("app quota exhausted")]
    QuotaExhausted { retry_after: Duration },
    /// The credential has no valid token and cannot get one right now.
    #[error("token unavailable")]
    TokenUnavailable { retry_after: Duration },
    /// The token endpoint refused the credential, or a retry with a fresh
    /// token was refused again.
    #[error("credential rejected")]
    TokenRejected,
    /// The upstream could not be reached or broke the exchange.
    #[error("upstream unreachable")]
    UpstreamUnreachable,
    /// The upstream sent no response head in time.
    #[error("upstream timed out")]
    UpstreamTimeout,
    /// The process is shutting down.
    #[error("shutting down")]
    ShuttingDown,
}

impl ProxyError {
    /// The HTTP status this failure is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadRequest(_) | ProxyError::BadBody => StatusCode::BAD_REQUEST,
            ProxyError::RefererNotAllowed | ProxyError::NotProxied | ProxyError::AppNotAllowed => {
                StatusCode::FORBIDDEN
            }
            ProxyError::NoRoute => StatusCode::NOT_FOUND,
            ProxyError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::RateLimited { .. } | ProxyError::QuotaExhausted { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ProxyError::TokenUnavailable { .. } | ProxyError::ShuttingDown => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::TokenRejected | ProxyError::UpstreamUnreachable => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The client-facing message; fixed text, never derived from input.
    pub fn message(&self) -> &'static str {
        match self {
            ProxyError::BadRequest(e) => e.message(),
            ProxyError::BadBody => "Malformed request body.",
            ProxyError::RefererNotAllowed => "Referer not allowed.",
            ProxyError::NotProxied => "Proxy has not been set up for this URL.",
            ProxyError::NoRoute => "No route for this path.",
            ProxyError::MethodNotAllowed => "Method not allowed.",
            ProxyError::BodyTooLarge => "Request body too large.",
            ProxyError::AppNotAllowed => "App not allowed on this route.",
            ProxyError::RateLimited { .. } => "Too many requests.",
            ProxyError::QuotaExhausted { .. } => "App quota exhausted.",
            ProxyError::TokenUnavailable { .. } => "Service token temporarily unavailable.",
            ProxyError::TokenRejected => "The ArcGIS credential was rejected.",
            ProxyError::UpstreamUnreachable => "Upstream service unavailable.",
            ProxyError::UpstreamTimeout => "Upstream service timed out.",
            ProxyError::ShuttingDown => "Proxy is shutting down.",
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            ProxyError::RateLimited { retry_after }
            | ProxyError::QuotaExhausted { retry_after }
            | ProxyError::TokenUnavailable { retry_after } => Some(*retry_after),
            ProxyError::ShuttingDown => Some(Duration::from_secs(1)),
            _ => None,
        }
    }

    /// The ArcGIS-shaped JSON response for this failure.
    pub fn into_response(self) -> Response<ProxyBody> {
        let status = self.status();
        let mut resp = json_error(status, self.message());
        if let Some(after) = self.retry_after() {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, retry_after_value(after));
        }
        resp
    }
}

/// A one-line description of an error and its sources, for logs.
pub fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        out.push_str(": ");
        out.push_str(&s.to_string());
        src = s.source();
    }
    out
}

/// `Retry-After` in whole seconds, rounded up, at least 1.
pub fn retry_after_value(after: Duration) -> HeaderValue {
    let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
    HeaderValue::from(secs.max(1))
}

/// A JSON error body in ArcGIS's shape with the given status.
pub fn json_error(status: StatusCode, message: &str) -> Response<ProxyBody> {
    let body = serde_json::json!({
        "error": { "code": status.as_u16(), "message": message, "details": [] }
    });
    let mut resp = json_answer(&body);
    *resp.status_mut() = status;
    resp
}

/// A 200 JSON answer of the proxy's own, never cached.
pub fn json_answer(body: &serde_json::Value) -> Response<ProxyBody> {
    let mut resp = Response::new(body::full(Bytes::from(body.to_string())));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_whole_seconds_at_least_one() {
        assert_eq!(retry_after_value(Duration::ZERO), "1");
        assert_eq!(retry_after_value(Duration::from_millis(10)), "1");
        assert_eq!(retry_after_value(Duration::from_millis(1500)), "2");
        assert_eq!(retry_after_value(Duration::from_secs(7)), "7");
    }

    #[test]
    fn each_error_has_its_status() {
        let cases = [
            (ProxyError::RefererNotAllowed, 403),
            (ProxyError::NotProxied, 403),
            (ProxyError::NoRoute, 404),
            (ProxyError::MethodNotAllowed, 405),
            (ProxyError::BodyTooLarge, 413),
            (
                ProxyError::RateLimited {
                    retry_after: Duration::from_secs(1),
                },
                429,
            ),
            (ProxyError::TokenRejected, 502),
            (ProxyError::UpstreamUnreachable, 502),
            (
                ProxyError::TokenUnavailable {
                    retry_after: Duration::from_secs(3),
                },
                503,
            ),
            (ProxyError::UpstreamTimeout, 504),
        ];
        for (err, code) in cases {
            let resp = err.into_response();
            assert_eq!(resp.status().as_u16(), code);
            assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/json");
            if code == 429 || code == 503 {
                assert!(resp.headers().contains_key(header::RETRY_AFTER));
            }
        }
    }
}
