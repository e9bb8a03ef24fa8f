//! Phase 6, respond: what of the upstream's answer reaches the client.
//! Hop-by-hop headers, cookies and upstream CORS are removed; every token
//! the credential holds is scrubbed from headers and (decoded, streaming)
//! text bodies; upstream URLs become proxy URLs where the route rewrites
//! them. A body in a coding the proxy cannot read is refused rather than
//! passed unread when it may hold a token.

use std::sync::Arc;

use http::Response;
use http::header::{self, HeaderMap};
use http::request::Parts;
use http_body_util::BodyExt;
use smallvec::SmallVec;

use super::forward::Forwarded;
use super::target::Target;
use super::{ConnInfo, Proxy};
use crate::body::ProxyBody;
use crate::codec::Coding;
use crate::error::ProxyError;
use crate::policy::route::Route;
use crate::scrub::{self, CheckedBody, ScrubBody, ScrubPatterns, Scrubber, UrlRewriter};
use crate::token::{Token, TokenSource};
use crate::upstream::{self, Answer};

/// Scrub-pattern cache key: the (sorted) ids of the tokens searched for, and
/// whether the route rewrites URLs.
pub(super) type ScrubKey = ([u64; SCRUB_KEY_TOKENS], bool);

/// Tokens a cached pattern set is keyed by: the request's and those held by
/// the route's credentials (two each). Answers with more live tokens than
/// this compile their patterns without the cache.
const SCRUB_KEY_TOKENS: usize = 8;

impl Proxy {
    /// The client's answer from the upstream's.
    #[inline]
    pub(super) fn respond(
        &self,
        req: &Parts,
        target: &Target<'_>,
        forwarded: Forwarded<'_>,
        conn: &ConnInfo,
        printed: &[Arc<Token>],
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let route = target.route;
        let Forwarded {
            parts: mut parts_out,
            answer,
            token,
            source,
            ..
        } = forwarded;
        upstream::clean_response_headers(&mut parts_out.headers);
        // Proxy URLs are written only for URL headers and rewrite_urls.
        let needs_base = route.rewrite_urls
            || parts_out.headers.contains_key(header::LOCATION)
            || parts_out.headers.contains_key(header::CONTENT_LOCATION);
        let public_base = if needs_base {
            self.public_base(&req.headers, &req.uri, conn)
        } else {
            String::new()
        };
        let rewriter = UrlRewriter {
            public_base: &public_base,
            proxy_path: &self.config.server.proxy_path,
            routes: &self.config.routes,
            upstream_base: &target.upstream_base,
            upstream_query: target.query.as_deref(),
            route: Some(route),
        };
        // Every live token that could have reached this upstream: the
        // current and previous token of the credential used, and of every
        // other credential an app uses in its place on this route.
        let held = source.map(|s| s.held()).unwrap_or_default();
        let others: Vec<Option<Arc<Token>>> = self.route_sources[route.index]
            .iter()
            .filter(|s| source.is_none_or(|used| used.name() != s.name()))
            .flat_map(TokenSource::held)
            .collect();
        // On the stack: every answer builds these two lists.
        let held: SmallVec<[&Arc<Token>; 8]> = held
            .iter()
            .chain(&others)
            .flatten()
            .chain(printed)
            .collect();
        let mut secrets: SmallVec<[&str; 8]> = SmallVec::new();
        for t in token.iter().chain(held.iter().copied()) {
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
                        Answer::Stream(b) if coding == Coding::Identity => {
                            (ScrubBody::new(b, coding, scrubber).boxed(), true)
                        }
                        // Checked first, passed on as it came when clean.
                        Answer::Stream(b) => (CheckedBody::new(b, coding, scrubber).boxed(), true),
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
        held: &[&Arc<Token>],
        secrets: &[&str],
        route: &Route,
        public_base: &str,
    ) -> Option<Scrubber> {
        if secrets.is_empty() && !route.rewrite_urls {
            return None;
        }
        // The request's token and the held ones, as ids.
        let pats = if token.iter().count() + held.len() > SCRUB_KEY_TOKENS {
            self.uncached_patterns(route.rewrite_urls, secrets)?
        } else {
            let mut ids = [0u64; SCRUB_KEY_TOKENS];
            for (slot, t) in ids.iter_mut().zip(token.iter().chain(held.iter().copied())) {
                *slot = t.id();
            }
            ids.sort_unstable();
            let key = (ids, route.rewrite_urls);
            let last = self.scrub_last[usize::from(key.1)].load();
            match last.as_deref() {
                Some((k, p)) if *k == key => Arc::clone(p),
                _ => self.scrub_patterns(key, secrets)?,
            }
        };
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
                let p = self.uncached_patterns(key.1, secrets)?;
                self.scrub_cache.insert(key, Arc::clone(&p));
                p
            }
        };
        self.scrub_last[usize::from(key.1)].store(Some(Arc::new((key, Arc::clone(&pats)))));
        Some(pats)
    }

    /// Patterns for `secrets`, and the upstream URL prefixes when `rewrite`.
    fn uncached_patterns(&self, rewrite: bool, secrets: &[&str]) -> Option<Arc<ScrubPatterns>> {
        let prefixes: Vec<&str> = if rewrite {
            self.rewrite_from.iter().map(String::as_str).collect()
        } else {
            Vec::new()
        };
        ScrubPatterns::new(secrets, &prefixes)
    }

    /// `scheme://host[:port]` for proxy URLs sent back to this client.
    pub(super) fn public_base(
        &self,
        headers: &HeaderMap,
        uri: &http::Uri,
        conn: &ConnInfo,
    ) -> String {
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
