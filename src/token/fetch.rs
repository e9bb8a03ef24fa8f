//! One request to an ArcGIS OAuth 2.0 token endpoint (`client_credentials`).
//!
//! `POST token_url` with `client_id, client_secret, grant_type, expiration,
//! f=json`. ArcGIS reports failure mostly as HTTP 200 with `{"error":{…}}`, so
//! `error` is checked before `access_token`. Errors carry the endpoint's code
//! and message, never the secret.

use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use http::{HeaderValue, Method, Request, header};
use http_body_util::{BodyExt, Limited};
use serde_json::Value;
use url::Url;

use super::{Secret, TokenError};
use crate::body;
use crate::upstream::HttpClient;

/// Largest token endpoint answer read.
const MAX_TOKEN_RESPONSE: usize = 64 * 1024;

/// What a successful fetch yields: the token and its lifetime, if any.
pub type Fetched = (String, Option<Duration>);

/// Something that obtains a fresh token; the real endpoint in production, a
/// script in tests.
pub trait Fetcher: Send + Sync + 'static {
    /// Obtains one new token.
    fn fetch(&self) -> BoxFuture<'_, Result<Fetched, TokenError>>;
}

/// Client-credentials fetcher against a real token endpoint.
pub struct OAuthFetcher {
    pub(crate) client: HttpClient,
    pub(crate) token_url: Url,
    pub(crate) client_id: String,
    pub(crate) client_secret: Secret,
    pub(crate) expiration_minutes: u32,
    pub(crate) referer: Option<HeaderValue>,
    pub(crate) timeout: Duration,
}

impl Fetcher for OAuthFetcher {
    fn fetch(&self) -> BoxFuture<'_, Result<Fetched, TokenError>> {
        Box::pin(within(self.timeout, self.request()))
    }
}

/// `fetch` bounded by `timeout`.
pub(super) async fn within(
    timeout: Duration,
    fetch: impl std::future::Future<Output = Result<Fetched, TokenError>>,
) -> Result<Fetched, TokenError> {
    tokio::time::timeout(timeout, fetch)
        .await
        .unwrap_or_else(|_| Err(unavailable("token endpoint timed out")))
}

pub(super) fn unavailable(reason: impl Into<String>) -> TokenError {
    TokenError::Unavailable {
        reason: reason.into(),
        retry_after: Duration::from_secs(1),
    }
}

/// A form `POST` to a token endpoint, with the credential's referrer.
pub(super) fn form_post(
    url: &Url,
    form: String,
    referer: Option<&HeaderValue>,
) -> Result<Request<crate::body::ProxyBody>, TokenError> {
    let mut req = Request::builder()
        .method(Method::POST)
        .uri(url.as_str())
        .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
        .header(header::ACCEPT, "application/json")
        .body(body::full(Bytes::from(form)))
        .map_err(|_| unavailable("token_url is not a valid request URI"))?;
    if let Some(r) = referer {
        req.headers_mut().insert(header::REFERER, r.clone());
    }
    Ok(req)
}

/// Sends `req` and reads the answer, at most [`MAX_TOKEN_RESPONSE`] bytes.
pub(super) async fn send(
    client: &HttpClient,
    req: Request<crate::body::ProxyBody>,
) -> Result<(http::StatusCode, Bytes), TokenError> {
    let resp = client.request(req).await.map_err(|e| {
        unavailable(format!(
            "cannot reach token endpoint: {}",
            crate::error::describe(&e)
        ))
    })?;
    let status = resp.status();
    let bytes = Limited::new(resp.into_body(), MAX_TOKEN_RESPONSE)
        .collect()
        .await
        .map_err(|_| unavailable("token endpoint answer unreadable or too large"))?
        .to_bytes();
    Ok((status, bytes))
}

impl OAuthFetcher {
    async fn request(&self) -> Result<Fetched, TokenError> {
        let form = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("client_id", &self.client_id)
            .append_pair("client_secret", self.client_secret.expose())
            .append_pair("grant_type", "client_credentials")
            .append_pair("expiration", &self.expiration_minutes.to_string())
            .append_pair("f", "json")
            .finish();
        let req = form_post(&self.token_url, form, self.referer.as_ref())?;
        let (status, bytes) = send(&self.client, req).await?;
        parse_answer(status, &bytes, self.client_secret.expose())
    }
}

/// The JSON of a token endpoint answer that is neither an error nor
/// unreadable. ArcGIS reports most failures as HTTP 200 with `{"error":{…}}`:
/// a rejected credential, unless the endpoint itself failed (5xx). Messages
/// never carry `secret`.
pub(super) fn answer_json(
    status: http::StatusCode,
    bytes: &[u8],
    secret: &str,
) -> Result<Value, TokenError> {
    let json: Option<Value> = serde_json::from_slice(bytes).ok();
    let Some(json) = json else {
        return Err(unavailable(format!(
            "token endpoint answered HTTP {} without JSON",
            status.as_u16()
        )));
    };
    if let Some(err) = json.get("error") {
        let (code, message) = match err {
            Value::Object(o) => (
                o.get("code")
                    .and_then(Value::as_i64)
                    .unwrap_or(status.as_u16().into()),
                ["message", "error_description", "error"]
                    .iter()
                    .find_map(|k| o.get(*k).and_then(Value::as_str))
                    .unwrap_or("unknown error")
                    .to_string(),
            ),
            Value::String(s) => (
                i64::from(status.as_u16()),
                json.get("error_description")
                    .and_then(Value::as_str)
                    .unwrap_or(s)
                    .to_string(),
            ),
            _ => (i64::from(status.as_u16()), "unknown error".to_string()),
        };
        if status.is_server_error() {
            return Err(unavailable(format!("token endpoint error {code}")));
        }
        return Err(TokenError::Rejected {
            code,
            message: redact(&message, secret),
        });
    }
    if !status.is_success() {
        return Err(unavailable(format!(
            "token endpoint answered HTTP {}",
            status.as_u16()
        )));
    }
    Ok(json)
}

/// Interprets a token endpoint answer.
fn parse_answer(
    status: http::StatusCode,
    bytes: &[u8],
    secret: &str,
) -> Result<Fetched, TokenError> {
    let json = answer_json(status, bytes, secret)?;
    let token = json
        .get("access_token")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| unavailable("token endpoint answer has no access_token"))?;
    let lifetime = match json.get("expires_in") {
        Some(Value::Number(n)) => n.as_u64(),
        Some(Value::String(s)) => s.parse().ok(),
        _ => None,
    }
    .filter(|s| *s > 0)
    .map(Duration::from_secs)
    // A reply without a lifetime is treated as the shortest sensible one, so
    // the proxy re-checks soon rather than trusting it forever.
    .or(Some(Duration::from_secs(300)));
    Ok((token.to_string(), lifetime))
}

pub(super) fn redact(message: &str, secret: &str) -> String {
    if secret.is_empty() {
        message.to_string()
    } else {
        message.replace(secret, "<redacted>")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

    #[test]
    fn answers() {
        let ok = parse_answer(
            StatusCode::OK,
            br#"{"access_token":"abc","expires_in":7200}"#,
            "s",
        )
        .unwrap();
        assert_eq!(ok, ("abc".to_string(), Some(Duration::from_secs(7200))));

        let rejected = parse_answer(
            StatusCode::OK,
            br#"{"error":{"code":400,"error":"invalid_client_id","error_description":"Invalid client_id","message":"Invalid client_id for s3cret","details":[]}}"#,
            "s3cret",
        )
        .unwrap_err();
        match rejected {
            TokenError::Rejected { code, message } => {
                assert_eq!(code, 400);
                assert_eq!(message, "Invalid client_id for <redacted>");
            }
            other => panic!("{other:?}"),
        }

        let oauth_style = parse_answer(
            StatusCode::UNAUTHORIZED,
            br#"{"error":"invalid_client"}"#,
            "s",
        )
        .unwrap_err();
        assert!(matches!(
            oauth_style,
            TokenError::Rejected { code: 401, .. }
        ));

        for (status, body) in [
            (StatusCode::BAD_GATEWAY, &b"<html>bad gateway</html>"[..]),
            (StatusCode::OK, &b"not json"[..]),
            (StatusCode::OK, &br#"{"expires_in":5}"#[..]),
            (
                StatusCode::SERVICE_UNAVAILABLE,
                &br#"{"error":{"code":503}}"#[..],
            ),
        ] {
            assert!(
                matches!(
                    parse_answer(status, body, "s"),
                    Err(TokenError::Unavailable { .. })
                ),
                "{status} {body:?}"
            );
        }
    }
}
