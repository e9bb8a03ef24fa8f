//! Phase 5, forward: the credential's token, the upstream exchange under
//! one deadline, and one retry with a fresh token when the upstream refuses
//! ours and the body was kept. The upstream is behind [`Upstream`], so the
//! retry loop is tested against a fake.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http::request::Parts;
use http::{HeaderValue, Response};
use http_body_util::BodyExt;
use tokio::time::Instant;

use super::Proxy;
use super::body::RequestBody;
use super::target::Target;
use crate::body::{BoxError, ProxyBody};
use crate::error::ProxyError;
use crate::metrics::CredentialLabel;
use crate::policy::route::TokenIn;
use crate::token::{Token, TokenSource};
use crate::upstream::{self, Answer, Outgoing, Pool, Verdict};

/// Where upstream requests go: the serving thread's pool in production, a
/// fake in tests.
pub trait Upstream: Sync {
    /// The answer body.
    type Body: hyper::body::Body<Data = bytes::Bytes, Error = BoxError>
        + Send
        + Sync
        + Unpin
        + 'static;

    /// Sends the request `out` describes with `body`; `now` is the caller's
    /// reading of the clock (the caller bounds the time).
    fn send(
        &self,
        out: &Outgoing<'_>,
        body: ProxyBody,
        now: Instant,
    ) -> impl Future<Output = Result<Response<Self::Body>, BoxError>> + Send;
}

impl Upstream for Arc<Pool> {
    type Body = upstream::UpstreamBody;

    fn send(
        &self,
        out: &Outgoing<'_>,
        body: ProxyBody,
        now: Instant,
    ) -> impl Future<Output = Result<Response<Self::Body>, BoxError>> + Send {
        Pool::send(self, out, body, now)
    }
}

/// What came back: the answer's head and body, the token the request that
/// got it carried, and the credential's token source (whose tokens the
/// answer must not show).
pub(super) struct Forwarded<'a> {
    pub parts: http::response::Parts,
    pub answer: Answer,
    pub token: Option<Arc<Token>>,
    pub source: Option<&'a TokenSource>,
    /// From sending the (last) attempt to its answer's head.
    pub upstream_time: Duration,
}

impl Proxy {
    /// Sends the request upstream with the token of the route's credential
    /// (or the one `app` uses in its place), retrying once with a fresh
    /// token when the upstream refuses it and the body was kept.
    pub(super) async fn forward<U: Upstream>(
        &self,
        upstream: &U,
        parts: &Parts,
        target: &Target<'_>,
        app: usize,
        request_id: &HeaderValue,
        mut request_body: RequestBody,
    ) -> Result<Forwarded<'_>, ProxyError> {
        let route = target.route;
        let base_query = target.upstream_query();
        let credential = route
            .credential
            .as_deref()
            .map(|c| self.config.apps.credential_for(app, c));
        let source = credential.and_then(|n| self.tokens.get(n));
        let mut token = match source {
            Some(s) => Some(s.token().await?),
            None => None,
        };
        let upstream_referer = credential
            .and_then(|n| self.config.credentials.get(n))
            .and_then(|c| c.upstream_referer.as_ref());
        let scrubbing = route.credential.is_some() || route.rewrite_urls;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let request_target = target.request_target(&base_query, token.as_deref());
            let (body, content_length) = request_body.take();
            let out = Outgoing {
                origin: target.origin(),
                target: &request_target,
                host: route.host(),
                headers: &parts.headers,
                method: &parts.method,
                auth_header: token
                    .as_deref()
                    .filter(|_| route.token_in == TokenIn::Header)
                    .map(Token::header_value),
                upstream_referer,
                request_id: Some(request_id),
                content_length,
                decodable_only: scrubbing,
            };
            let (verdict, upstream_time) = self
                .exchange(upstream, &out, body, route.index, token.is_some())
                .await?;
            if let Verdict::Pass(parts, answer) = verdict {
                return Ok(Forwarded {
                    parts,
                    answer,
                    token,
                    source,
                    upstream_time,
                });
            }
            let (Some(src), Some(sent)) = (source, token.as_ref()) else {
                unreachable!("only answers to token-bearing requests are classified")
            };
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
        }
    }

    /// One attempt. One deadline covers the response head and, for answers
    /// to a token-bearing request, the small body read to check for a token
    /// error. One clock reading serves the deadline, the latency metric and
    /// the pool's idle check.
    async fn exchange<U: Upstream>(
        &self,
        upstream: &U,
        out: &Outgoing<'_>,
        body: ProxyBody,
        route: usize,
        with_token: bool,
    ) -> Result<(Verdict, Duration), ProxyError> {
        let sent_at = Instant::now();
        let exchange = async {
            let resp = upstream
                .send(out, body, sent_at)
                .await
                .map_err(send_error)?;
            let took = sent_at.elapsed();
            self.route_metrics[route]
                .upstream
                .observe(took.as_secs_f64());
            let verdict = if with_token {
                upstream::inspect(resp).await.map_err(|e| {
                    tracing::warn!(error = %crate::error::describe(&*e), "upstream answer unreadable");
                    ProxyError::UpstreamUnreachable
                })?
            } else {
                let (parts, body) = resp.into_parts();
                Verdict::Pass(parts, Answer::Stream(body.boxed()))
            };
            Ok((verdict, took))
        };
        crate::deadline::within(sent_at + self.config.limits.upstream_timeout, exchange)
            .await
            .map_err(|_| ProxyError::UpstreamTimeout)?
    }
}

/// What a failed send means for the client.
fn send_error(e: BoxError) -> ProxyError {
    if chain_has::<http_body_util::LengthLimitError>(&*e) {
        return ProxyError::BodyTooLarge;
    }
    // The client's own body failed (bad chunked framing, cut short): that
    // is the client's error, not the upstream's.
    if client_body_failed(&*e) {
        return ProxyError::BadBody;
    }
    tracing::warn!(error = %crate::error::describe(&*e), "upstream request failed");
    ProxyError::UpstreamUnreachable
}

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
        if let Some(h) = err.downcast_ref::<upstream::Http1Error>()
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
