//! Username and password at a `generateToken` endpoint: ArcGIS Enterprise
//! before OAuth app credentials (portal `…/sharing/rest/generateToken`,
//! stand-alone ArcGIS Server `…/arcgis/tokens/generateToken`).
//!
//! `POST token_url` with `username, password, expiration, f=json` and
//! `client=referer&referer=<upstream_referer>` when the credential has one,
//! else `client=requestip`. The answer is `{"token":…,"expires":<epoch ms>}`.
//! Without a configured `token_url`, the server's `/rest/info?f=json` names
//! it (`authInfo.tokenServicesUrl`); it is looked up once and logged. The
//! password never appears in a message.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::future::BoxFuture;
use http::{HeaderValue, Method, Request, header};
use serde_json::Value;
use tokio::sync::OnceCell;
use url::Url;

use super::fetch::{Fetched, Fetcher, answer_json, form_post, redact, send, unavailable, within};
use super::{Secret, TokenError};
use crate::body;
use crate::upstream::HttpClient;

/// `generateToken` fetcher.
pub struct GenerateTokenFetcher {
    pub(crate) client: HttpClient,
    /// Credential name, for the discovery log line.
    pub(crate) name: String,
    /// The configured endpoint, or the one `/rest/info` named.
    pub(crate) token_url: OnceCell<Url>,
    /// Where to look it up when it was not configured.
    pub(crate) info_url: Option<Url>,
    pub(crate) username: String,
    pub(crate) password: Secret,
    pub(crate) expiration_minutes: u32,
    pub(crate) referer: Option<HeaderValue>,
    pub(crate) timeout: Duration,
}

impl Fetcher for GenerateTokenFetcher {
    fn fetch(&self) -> BoxFuture<'_, Result<Fetched, TokenError>> {
        Box::pin(within(self.timeout, self.request()))
    }
}

impl GenerateTokenFetcher {
    async fn request(&self) -> Result<Fetched, TokenError> {
        let token_url = self
            .token_url
            .get_or_try_init(|| self.discover())
            .await?
            .clone();
        // Built in a block: the serializer is not `Send`, so it must be gone
        // before the request is awaited.
        let form = {
            let mut form = url::form_urlencoded::Serializer::new(String::new());
            form.append_pair("username", &self.username)
                .append_pair("password", self.password.expose())
                .append_pair("expiration", &self.expiration_minutes.to_string())
                .append_pair("f", "json");
            match self.referer.as_ref().and_then(|r| r.to_str().ok()) {
                Some(r) => form
                    .append_pair("client", "referer")
                    .append_pair("referer", r),
                None => form.append_pair("client", "requestip"),
            };
            form.finish()
        };
        let req = form_post(&token_url, form, self.referer.as_ref())?;
        let (status, bytes) = send(&self.client, req).await?;
        parse_answer(status, &bytes, self.password.expose(), SystemTime::now())
    }

    /// The token service URL from the server's `/rest/info`.
    async fn discover(&self) -> Result<Url, TokenError> {
        let Some(info) = &self.info_url else {
            return Err(unavailable("no token_url and nowhere to discover it"));
        };
        let req = Request::builder()
            .method(Method::GET)
            .uri(info.as_str())
            .header(header::ACCEPT, "application/json")
            .body(body::empty())
            .map_err(|_| unavailable("the /rest/info URL is not a valid request URI"))?;
        let (status, bytes) = send(&self.client, req).await?;
        let url = token_services_url(status, &bytes, info)?;
        tracing::info!(
            credential = %self.name,
            info = %info,
            token_url = %url,
            "found the token service URL in /rest/info"
        );
        Ok(url)
    }
}

/// `authInfo.tokenServicesUrl` of a `/rest/info` answer. A server that
/// refuses (401/403) or has no token service is a rejected credential: the
/// configuration must change (`token_url`), retrying will not help.
fn token_services_url(
    status: http::StatusCode,
    bytes: &[u8],
    info: &Url,
) -> Result<Url, TokenError> {
    let rejected = |message: String| TokenError::Rejected {
        code: i64::from(status.as_u16()),
        message,
    };
    if status == http::StatusCode::UNAUTHORIZED || status == http::StatusCode::FORBIDDEN {
        return Err(rejected(format!(
            "{info} answered HTTP {}: set token_url to the generateToken URL",
            status.as_u16()
        )));
    }
    if !status.is_success() {
        return Err(unavailable(format!(
            "{info} answered HTTP {}",
            status.as_u16()
        )));
    }
    let json: Value = serde_json::from_slice(bytes)
        .map_err(|_| unavailable(format!("{info} answered without JSON")))?;
    let url = json
        .get("authInfo")
        .and_then(|a| a.get("tokenServicesUrl"))
        .and_then(Value::as_str)
        .filter(|u| !u.is_empty())
        .ok_or_else(|| {
            rejected(format!(
                "{info} names no authInfo.tokenServicesUrl (token-based security off?): set token_url"
            ))
        })?;
    let url = Url::parse(url)
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https") && u.password().is_none())
        .ok_or_else(|| rejected(format!("{info} names an unusable token service URL")))?;
    if url.scheme() == "http" {
        tracing::warn!(token_url = %url, "the discovered token service uses cleartext http: the password travels unencrypted");
    }
    Ok(url)
}

/// Interprets a `generateToken` answer at wall-clock time `now`.
fn parse_answer(
    status: http::StatusCode,
    bytes: &[u8],
    password: &str,
    now: SystemTime,
) -> Result<Fetched, TokenError> {
    let json = answer_json(status, bytes, password)?;
    let token = json
        .get("token")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| unavailable("generateToken answer has no token"))?;
    if token.contains(password) && !password.is_empty() {
        return Err(unavailable(redact(
            "generateToken answered with a token holding the password",
            password,
        )));
    }
    let now_ms = now
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_millis();
    let expires_ms = match json.get("expires") {
        Some(Value::Number(n)) => n.as_u64().map(u128::from),
        Some(Value::String(s)) => s.parse().ok(),
        _ => None,
    };
    let lifetime = expires_ms
        .and_then(|e| e.checked_sub(now_ms))
        .filter(|ms| *ms > 0)
        .map(|ms| Duration::from_millis(u64::try_from(ms).unwrap_or(u64::MAX)))
        // Already expired by the server's clock, or no expiry: re-check soon
        // rather than trusting it.
        .or(Some(Duration::from_secs(60)));
    Ok((token.to_string(), lifetime))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

    #[test]
    fn answers() {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let expires = 1_800_000_000_000u64 + 3_600_000;
        let ok = parse_answer(
            StatusCode::OK,
            format!(r#"{{"token":"tok.A-1","expires":{expires},"ssl":true}}"#).as_bytes(),
            "pw",
            now,
        )
        .unwrap();
        assert_eq!(ok, ("tok.A-1".into(), Some(Duration::from_secs(3600))));
        // An error object, HTTP 200 or not: a rejected credential, without
        // the password in its message.
        for status in [StatusCode::OK, StatusCode::BAD_REQUEST] {
            let e = parse_answer(
                status,
                br#"{"error":{"code":400,"message":"Unable to generate token for hunter2.","details":["Invalid username or password."]}}"#,
                "hunter2",
                now,
            )
            .unwrap_err();
            let TokenError::Rejected { code, message } = e else {
                panic!("{e:?}")
            };
            assert_eq!(code, 400);
            assert!(!message.contains("hunter2"), "{message}");
        }
        assert!(matches!(
            parse_answer(StatusCode::OK, br#"{"expires":1}"#, "pw", now),
            Err(TokenError::Unavailable { .. })
        ));
        // A token already expired by the server's clock: re-checked soon.
        let (_, life) =
            parse_answer(StatusCode::OK, br#"{"token":"t","expires":5}"#, "pw", now).unwrap();
        assert_eq!(life, Some(Duration::from_secs(60)));
    }

    #[test]
    fn discovery() {
        let info = Url::parse("https://gis.example.com/arcgis/rest/info?f=json").unwrap();
        let url = token_services_url(
            StatusCode::OK,
            br#"{"currentVersion":10.91,"authInfo":{"isTokenBasedSecurity":true,"tokenServicesUrl":"https://gis.example.com/portal/sharing/rest/generateToken"}}"#,
            &info,
        )
        .unwrap();
        assert_eq!(
            url.as_str(),
            "https://gis.example.com/portal/sharing/rest/generateToken"
        );
        for (status, body) in [
            (StatusCode::UNAUTHORIZED, &b"{}"[..]),
            (StatusCode::FORBIDDEN, &b"{}"[..]),
            (StatusCode::OK, &br#"{"currentVersion":11.1}"#[..]),
            (
                StatusCode::OK,
                &br#"{"authInfo":{"tokenServicesUrl":"javascript:alert(1)"}}"#[..],
            ),
        ] {
            let e = token_services_url(status, body, &info).unwrap_err();
            assert!(matches!(e, TokenError::Rejected { .. }), "{status}: {e:?}");
        }
        assert!(matches!(
            token_services_url(StatusCode::BAD_GATEWAY, b"", &info),
            Err(TokenError::Unavailable { .. })
        ));
    }
}
