//! Phase 4, body: the method and the request body. Forms are read (bounded
//! in size and time) so a client's `token` parameter can be removed, and
//! kept for a retry; other small bodies of announced length are kept too;
//! anything larger streams once, limited to `max_request_body_bytes`.

use std::time::Duration;

use bytes::Bytes;
use http::Method;
use http::header::{self, HeaderMap};
use http::request::Parts;
use http_body_util::{BodyExt, Limited};
use hyper::body::Body;

use crate::body::{self, BoxError, ProxyBody};
use crate::config::Limits;
use crate::error::ProxyError;
use crate::policy::path;

/// The request body, either kept in memory (retryable) or streaming once.
pub(super) struct RequestBody {
    kind: Kind,
    /// The length the client announced, if any.
    announced: Option<u64>,
}

enum Kind {
    Kept(Bytes),
    Streaming(Option<ProxyBody>),
}

impl RequestBody {
    /// True when the body can be sent again.
    pub fn is_kept(&self) -> bool {
        matches!(self.kind, Kind::Kept(_))
    }

    /// A kept form body as text.
    pub fn kept_text(&self) -> Option<&str> {
        match &self.kind {
            Kind::Kept(b) => std::str::from_utf8(b).ok(),
            Kind::Streaming(_) => None,
        }
    }

    /// Replaces a kept body (a rewritten form).
    pub fn replace_kept(&mut self, bytes: Bytes) {
        if let Kind::Kept(b) = &mut self.kind {
            *b = bytes;
            self.announced = None;
        }
    }

    /// The body for one attempt and its exact length, if known.
    pub fn take(&mut self) -> (ProxyBody, Option<u64>) {
        match &mut self.kind {
            Kind::Kept(b) if b.is_empty() => (body::empty(), None),
            Kind::Kept(b) => (body::full(b.clone()), Some(b.len() as u64)),
            Kind::Streaming(s) => (s.take().unwrap_or_else(body::empty), self.announced),
        }
    }
}

/// Checks the method and reads or wraps the body as the phase describes.
pub(super) async fn read<B>(
    parts: &Parts,
    body: B,
    limits: &Limits,
) -> Result<RequestBody, ProxyError>
where
    B: Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    if !matches!(parts.method, Method::GET | Method::HEAD | Method::POST) {
        return Err(ProxyError::MethodNotAllowed);
    }
    let announced = content_length(&parts.headers)?;
    if announced.is_some_and(|n| n > limits.max_request_body_bytes) {
        return Err(ProxyError::BodyTooLarge);
    }
    let kind = if announced == Some(0) || body.is_end_stream() {
        Kind::Kept(Bytes::new())
    } else if parts.method == Method::POST && is_form(&parts.headers) {
        let bytes =
            collect_limited(body, limits.max_request_body_bytes, limits.upstream_timeout).await?;
        Kind::Kept(strip_form_token(bytes))
    } else if announced.is_some_and(|n| n <= limits.retry_body_bytes) {
        Kind::Kept(collect_limited(body, limits.retry_body_bytes, limits.upstream_timeout).await?)
    } else {
        Kind::Streaming(Some(
            Limited::new(
                body.map_err(Into::into),
                limits.max_request_body_bytes as usize,
            )
            .map_err(BoxError::from)
            .boxed(),
        ))
    };
    Ok(RequestBody { kind, announced })
}

fn is_form(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            ct.trim_start()
                .to_ascii_lowercase()
                .starts_with("application/x-www-form-urlencoded")
        })
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

/// The announced length (hyper has already refused conflicting or
/// malformed framing on HTTP/1; HTTP/2 carries it as a plain header).
fn content_length(headers: &HeaderMap) -> Result<Option<u64>, ProxyError> {
    match headers.get(header::CONTENT_LENGTH) {
        None => Ok(None),
        Some(v) => crate::http1::content_length(v.as_bytes())
            .map(Some)
            .ok_or(ProxyError::BadBody),
    }
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

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use http::{Method, Request};
    use http_body_util::{BodyExt, Full};

    use super::read;
    use crate::error::ProxyError;
    use crate::proxy::tests::Harness;

    async fn body_of(h: &Harness, req: Request<Full<Bytes>>) -> Result<(bool, Bytes), ProxyError> {
        let (parts, body) = req.into_parts();
        let mut b = read(&parts, body, &h.config.limits).await?;
        let kept = b.is_kept();
        let (body, _) = b.take();
        Ok((kept, body.collect().await.unwrap().to_bytes()))
    }

    fn post(ct: &str, len: Option<&str>, body: &'static [u8]) -> Request<Full<Bytes>> {
        let mut b = Request::post("/basemaps/x").header("content-type", ct);
        if let Some(l) = len {
            b = b.header("content-length", l);
        }
        b.body(Full::new(Bytes::from_static(body))).unwrap()
    }

    #[tokio::test]
    async fn a_form_loses_the_clients_token_and_is_kept() {
        let h = Harness::new();
        let (kept, body) = body_of(
            &h,
            post(
                "application/x-www-form-urlencoded",
                None,
                b"f=json&token=stolen&where=1%3D1",
            ),
        )
        .await
        .unwrap();
        assert!(kept);
        assert_eq!(&body[..], b"f=json&where=1%3D1");
    }

    #[tokio::test]
    async fn bodies_over_the_limits_and_bad_lengths_are_refused() {
        let h = Harness::new();
        let too_big = (h.config.limits.max_request_body_bytes + 1).to_string();
        assert!(matches!(
            body_of(&h, post("application/json", Some(&too_big), b"{}")).await,
            Err(ProxyError::BodyTooLarge)
        ));
        for bad in ["-1", "1e3", "0x10", "99999999999999999999999"] {
            assert!(
                matches!(
                    body_of(&h, post("application/json", Some(bad), b"{}")).await,
                    Err(ProxyError::BadBody)
                ),
                "{bad}"
            );
        }
        let put = Request::put("/basemaps/x")
            .body(Full::new(Bytes::new()))
            .unwrap();
        assert!(matches!(
            body_of(&h, put).await,
            Err(ProxyError::MethodNotAllowed)
        ));
    }

    #[tokio::test]
    async fn a_large_body_streams_once_and_a_small_one_is_kept() {
        let h = Harness::new();
        let (kept, body) = body_of(&h, post("application/json", Some("2"), b"{}"))
            .await
            .unwrap();
        assert!(kept);
        assert_eq!(&body[..], b"{}");
        // No announced length: streamed, not kept for a retry.
        let req = Request::builder()
            .method(Method::POST)
            .uri("/basemaps/x")
            .header("content-type", "application/octet-stream")
            .body(Full::new(Bytes::from_static(b"abc")))
            .unwrap();
        let (kept, body) = body_of(&h, req).await.unwrap();
        assert!(!kept);
        assert_eq!(&body[..], b"abc");
    }
}
