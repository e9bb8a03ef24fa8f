//! Keeping the token out of what goes back to the client: response headers,
//! redirect targets and streaming bodies.
//!
//! URL-bearing headers (`Location`, `Content-Location`) are resolved against
//! the upstream URL, lose any `token` parameter, and — when they point under a
//! route — become proxy URLs (the route's mount, or `proxy_path?<url>`). Every
//! other header is searched for the token in clear and percent-encoded form;
//! a `token=` parameter is removed with its separator, any other occurrence is
//! removed too.
//!
//! Bodies go through [`Scrubber`], a streaming Aho-Corasick pass that keeps a
//! carry of at most one pattern's length between chunks, so a token split
//! across chunk boundaries is still found, in constant memory. The same pass
//! rewrites absolute upstream URL prefixes to proxy URLs for routes with
//! `rewrite_urls`. [`ScrubBody`] wraps it in decode → scrub → re-encode for
//! gzip, deflate and br bodies; [`CheckedBody`] first checks whether a
//! compressed answer holds anything to change, and passes it on as it came
//! when not.

use http::HeaderValue;
use http::header::{self, HeaderMap};
use url::Url;

use crate::policy::path::strip_params;
use crate::policy::route::{Route, RouteTable};

mod checked;

pub use checked::CheckedBody;

/// How to write proxy URLs for one request.
pub struct UrlRewriter<'a> {
    /// `scheme://host[:port]` the client used (or `public_url`).
    pub public_base: &'a str,
    /// The Esri proxy endpoint path.
    pub proxy_path: &'a str,
    /// Routes, to decide which upstream URLs the proxy serves.
    pub routes: &'a RouteTable,
    /// The upstream URL of this request (`scheme://host/path`), for
    /// resolving relative references.
    pub upstream_base: &'a str,
    /// Its query, if any.
    pub upstream_query: Option<&'a str>,
    /// The route this request came through, preferred when it covers a URL.
    pub route: Option<&'a Route>,
}

impl UrlRewriter<'_> {
    /// The proxy URL for an absolute upstream URL, or the URL itself (minus
    /// any token) when no route covers it.
    pub fn rewrite(&self, reference: &str) -> Option<String> {
        // Parsed only here: most answers carry no URL header at all.
        let mut base = Url::parse(self.upstream_base).ok()?;
        base.set_query(self.upstream_query);
        let mut url = base.join(reference).ok()?;
        if let Some(q) = url.query() {
            let stripped = strip_params(q, &["token"]).into_owned();
            url.set_query((!stripped.is_empty()).then_some(stripped.as_str()));
        }
        let found = match self.route {
            Some(r) => self.routes.by_url_preferring(&url, r),
            None => self.routes.by_url(&url),
        };
        let Some(route) = found else {
            return Some(url.to_string());
        };
        let mut out = String::with_capacity(self.public_base.len() + url.as_str().len() + 16);
        out.push_str(self.public_base);
        match &route.mount {
            Some(mount) => {
                if mount != "/" {
                    out.push_str(mount);
                }
                let rest = route.rest_of(&url);
                if rest.is_empty() && mount == "/" {
                    out.push('/');
                }
                out.push_str(rest);
                if let Some(q) = url.query() {
                    out.push('?');
                    out.push_str(q);
                }
                if let Some(f) = url.fragment() {
                    out.push('#');
                    out.push_str(f);
                }
            }
            None => {
                out.push_str(self.proxy_path);
                out.push('?');
                out.push_str(url.as_str());
            }
        }
        Some(out)
    }
}

/// Rewrites URL headers and removes the token from every response header.
pub fn scrub_headers(headers: &mut HeaderMap, rewriter: &UrlRewriter<'_>, secrets: &[&str]) {
    for name in [header::LOCATION, header::CONTENT_LOCATION] {
        if let Some(v) = headers.get(&name) {
            let new = v
                .to_str()
                .ok()
                .and_then(|s| rewriter.rewrite(s))
                .and_then(|s| HeaderValue::from_str(&s).ok());
            match new {
                Some(v) => {
                    headers.insert(name, v);
                }
                None => {
                    headers.remove(name);
                }
            }
        }
    }
    // A value shorter than every secret cannot hold one; most response
    // headers are, so the searchers are built only for a long value.
    let Some(shortest) = secrets.iter().map(|s| s.len()).filter(|&n| n > 0).min() else {
        return;
    };
    let mut finders: Vec<memchr::memmem::Finder<'_>> = Vec::new();
    let mut changes = Vec::new();
    for (name, value) in headers.iter() {
        let bytes = value.as_bytes();
        if bytes.len() < shortest {
            continue;
        }
        if finders.is_empty() {
            finders = secrets
                .iter()
                .filter(|s| !s.is_empty())
                .map(|s| memchr::memmem::Finder::new(s.as_bytes()))
                .collect();
        }
        if finders.iter().any(|f| f.find(bytes).is_some()) {
            let cleaned = remove_secrets(&String::from_utf8_lossy(bytes), secrets);
            changes.push((name.clone(), value.clone(), cleaned));
        }
    }
    for (name, old, cleaned) in changes {
        let values: Vec<HeaderValue> = headers
            .get_all(&name)
            .iter()
            .map(|v| {
                if v == old {
                    HeaderValue::from_str(&cleaned).unwrap_or(HeaderValue::from_static(""))
                } else {
                    v.clone()
                }
            })
            .collect();
        headers.remove(&name);
        for v in values {
            headers.append(name.clone(), v);
        }
    }
}

/// Removes `token=<secret>` parameters with their separator, then any other
/// occurrence of a secret.
pub fn remove_secrets(text: &str, secrets: &[&str]) -> String {
    let mut out = text.to_string();
    for secret in secrets.iter().filter(|s| !s.is_empty()) {
        for sep in ["&", "?", ""] {
            let param = format!("{sep}token={secret}");
            while let Some(i) = out.find(&param) {
                let end = i + param.len();
                // `?token=t&b=1` keeps the `?` and drops the following `&`.
                if sep == "?" && out[end..].starts_with('&') {
                    out.replace_range(i + 1..end + 1, "");
                } else {
                    out.replace_range(i..end, "");
                }
            }
        }
        out = out.replace(secret, "");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes() -> RouteTable {
        let r = Route::for_test;
        RouteTable::new(vec![
            r(
                "https://services.example.com/org/rest/services",
                Some("/features"),
            ),
            r("https://tiles.example.com/tiles", None),
        ])
    }

    #[test]
    fn location_rewriting() {
        let t = routes();
        let rw = UrlRewriter {
            public_base: "https://proxy.example",
            proxy_path: "/proxy",
            routes: &t,
            upstream_base: "https://services.example.com/org/rest/services/A/query",
            upstream_query: Some("token=T1"),
            route: None,
        };
        let cases = [
            (
                "https://services.example.com/org/rest/services/B?f=json&token=T1",
                "https://proxy.example/features/B?f=json",
            ),
            ("/org/rest/services/C", "https://proxy.example/features/C"),
            ("D?token=T1", "https://proxy.example/features/A/D"),
            (
                "https://tiles.example.com/tiles/1/2/3?token=T1&x=1",
                "https://proxy.example/proxy?https://tiles.example.com/tiles/1/2/3?x=1",
            ),
            (
                "https://elsewhere.example/x?token=T1&y=2",
                "https://elsewhere.example/x?y=2",
            ),
            (
                "https://elsewhere.example/x?token=T1",
                "https://elsewhere.example/x",
            ),
        ];
        for (loc, expected) in cases {
            assert_eq!(rw.rewrite(loc).unwrap(), expected, "{loc}");
        }
    }

    #[test]
    fn secrets_are_removed_from_headers() {
        let t = routes();
        let rw = UrlRewriter {
            public_base: "https://p",
            proxy_path: "/proxy",
            routes: &t,
            upstream_base: "https://services.example.com/org/rest/services/A",
            upstream_query: None,
            route: None,
        };
        let mut h = HeaderMap::new();
        h.insert(
            "link",
            HeaderValue::from_static("<https://x.example/a?token=SEKRET&b=1>; rel=next"),
        );
        h.append("x-debug", HeaderValue::from_static("token was SEKRET"));
        h.append("x-debug", HeaderValue::from_static("other"));
        h.insert(
            "location",
            HeaderValue::from_static("https://other.example/p?token=SEKRET"),
        );
        scrub_headers(&mut h, &rw, &["SEKRET"]);
        for v in h.values() {
            assert!(!v.to_str().unwrap().contains("SEKRET"), "{v:?}");
        }
        assert_eq!(h["link"], "<https://x.example/a?b=1>; rel=next");
        assert_eq!(h.get_all("x-debug").iter().count(), 2);
        assert_eq!(h["location"], "https://other.example/p");
    }

    #[test]
    fn remove_secrets_keeps_urls_valid() {
        let s = ["TT"];
        assert_eq!(remove_secrets("a?token=TT&b=1", &s), "a?b=1");
        assert_eq!(remove_secrets("a?b=1&token=TT", &s), "a?b=1");
        assert_eq!(remove_secrets("a?b=1&token=TT&c=2", &s), "a?b=1&c=2");
        assert_eq!(remove_secrets("a?token=TT", &s), "a");
        assert_eq!(remove_secrets("Bearer TT", &s), "Bearer ");
    }
}

// ------------------------------------------------------------------ bodies

use std::pin::Pin;
use std::task::{Context, Poll};

use std::sync::Arc;

use aho_corasick::{AhoCorasick, Input, MatchKind};
use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};

use crate::body::{BoxError, PollFrame, ProxyBody};
use crate::codec::{Coding, Decoder, Encoder};
use http_body_util::BodyExt;

/// What a body pattern does when found.
#[derive(Debug, Clone, Copy)]
enum Pattern {
    /// A token: removed, with its `token=` parameter and separator.
    Secret,
    /// An upstream URL prefix: replaced by the proxy URL prefix of the same
    /// index in the scrubber's replacements.
    Prefix(usize),
}

/// The compiled search for one set of secrets and URL prefixes; immutable and
/// shared, so it is built once per token rather than once per request.
pub struct ScrubPatterns {
    ac: AhoCorasick,
    patterns: Vec<(Vec<u8>, Pattern)>,
    prefixes: usize,
    /// Bytes that must stay in the carry so no match, with its context
    /// (`?token=` before, one byte after), is cut.
    keep: usize,
}

impl ScrubPatterns {
    /// Compiles `secrets` (each removed) and URL `prefixes` (each replaced by
    /// the replacement of the same index); `None` when both are empty.
    pub fn new(secrets: &[&str], prefixes: &[&str]) -> Option<Arc<ScrubPatterns>> {
        let mut patterns: Vec<(Vec<u8>, Pattern)> = Vec::new();
        for s in secrets.iter().filter(|s| !s.is_empty()) {
            if !patterns.iter().any(|(p, _)| p == s.as_bytes()) {
                patterns.push((s.as_bytes().to_vec(), Pattern::Secret));
            }
        }
        for (i, from) in prefixes.iter().enumerate().filter(|(_, f)| !f.is_empty()) {
            if !patterns.iter().any(|(p, _)| p == from.as_bytes()) {
                patterns.push((from.as_bytes().to_vec(), Pattern::Prefix(i)));
            }
        }
        if patterns.is_empty() {
            return None;
        }
        let ac = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(patterns.iter().map(|(p, _)| p))
            .ok()?;
        let longest = patterns.iter().map(|(p, _)| p.len()).max().unwrap_or(0);
        Some(Arc::new(ScrubPatterns {
            ac,
            patterns,
            prefixes: prefixes.len(),
            // pattern + "?token=" before it + one byte of lookahead after it
            keep: longest + 8,
        }))
    }
}

/// Streaming secret remover and URL-prefix rewriter for one body.
pub struct Scrubber {
    pats: Arc<ScrubPatterns>,
    replacements: Vec<Vec<u8>>,
    carry: Vec<u8>,
}

/// Bytes that end a URL path segment (or the URL) in JSON, HTML and text.
fn is_url_boundary(b: u8) -> bool {
    matches!(
        b,
        b'/' | b'?' | b'#' | b'"' | b'\'' | b'\\' | b')' | b'<' | b'>' | b'&' | b',' | b';' | b'|'
    ) || b.is_ascii_whitespace()
}

impl Scrubber {
    /// A scrubber for `secrets` (each removed) and `rewrites` (`from` URL
    /// prefix → `to`); `None` when there is nothing to look for.
    pub fn new(secrets: &[&str], rewrites: &[(String, String)]) -> Option<Scrubber> {
        let from: Vec<&str> = rewrites.iter().map(|(f, _)| f.as_str()).collect();
        let pats = ScrubPatterns::new(secrets, &from)?;
        Some(Scrubber::with_patterns(
            pats,
            rewrites
                .iter()
                .map(|(_, t)| t.as_bytes().to_vec())
                .collect(),
        ))
    }

    /// A scrubber over precompiled patterns; `replacements[i]` replaces
    /// prefix `i`.
    pub fn with_patterns(pats: Arc<ScrubPatterns>, mut replacements: Vec<Vec<u8>>) -> Scrubber {
        replacements.resize(pats.prefixes, Vec::new());
        Scrubber {
            pats,
            replacements,
            carry: Vec::new(),
        }
    }

    /// Feeds a chunk; returns the output that is final.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<u8> {
        self.carry.extend_from_slice(chunk);
        self.run(false)
    }

    /// Ends the stream; returns the rest.
    pub fn finish(&mut self) -> Vec<u8> {
        self.run(true)
    }

    /// Scrubs a complete buffer.
    pub fn scrub_all(&mut self, data: &[u8]) -> Vec<u8> {
        let mut out = self.push(data);
        out.extend(self.finish());
        out
    }

    fn run(&mut self, end: bool) -> Vec<u8> {
        let buf = std::mem::take(&mut self.carry);
        let len = buf.len();
        // Matches starting before `decide` are fully visible with context;
        // plain bytes before `emit` can no longer be part of any match.
        let (decide, emit) = if end {
            (len, len)
        } else {
            let decide = len.saturating_sub(self.pats.keep);
            (decide, decide.saturating_sub(7))
        };
        let mut out = Vec::with_capacity(len);
        let mut i = 0;
        while i < decide {
            let Some(m) = self.pats.ac.find(Input::new(&buf).range(i..)) else {
                break;
            };
            if m.start() >= decide {
                break;
            }
            let (start, stop, replacement): (usize, usize, &[u8]) =
                match self.pats.patterns[m.pattern().as_usize()].1 {
                    Pattern::Secret => {
                        let (s, e) = secret_extent(&buf, i, m.start(), m.end());
                        (s, e, b"")
                    }
                    Pattern::Prefix(_) => match self.best_prefix(&buf, m.start(), end) {
                        Some((plen, to)) => (m.start(), m.start() + plen, to),
                        None => {
                            // Not a URL under a route here: pass one byte on.
                            out.extend_from_slice(&buf[i..=m.start()]);
                            i = m.start() + 1;
                            continue;
                        }
                    },
                };
            out.extend_from_slice(&buf[i..start]);
            out.extend_from_slice(replacement);
            i = stop;
        }
        if i < emit {
            out.extend_from_slice(&buf[i..emit]);
            i = emit;
        }
        if end {
            out.extend_from_slice(&buf[i.min(len)..]);
        } else {
            self.carry = buf[i.min(len)..].to_vec();
        }
        out
    }

    /// The longest URL prefix at `at` that ends on a boundary.
    fn best_prefix(&self, buf: &[u8], at: usize, end: bool) -> Option<(usize, &[u8])> {
        self.pats
            .patterns
            .iter()
            .filter_map(|(p, kind)| match kind {
                Pattern::Prefix(idx) if buf[at..].starts_with(p) => {
                    let ok = match buf.get(at + p.len()) {
                        Some(b) => is_url_boundary(*b),
                        None => end,
                    };
                    ok.then_some((p.len(), self.replacements[*idx].as_slice()))
                }
                _ => None,
            })
            .max_by_key(|(l, _)| *l)
    }
}

/// The span to remove for a secret at `start..stop`: a `token=` parameter
/// goes with its separator so the URL stays valid (`?token=t&b` → `?b`,
/// `a&token=t` → `a`, `?token=t` → ``); a bare secret goes alone. Context
/// bytes before `floor` (already emitted or replaced) are not touched.
fn secret_extent(buf: &[u8], floor: usize, start: usize, stop: usize) -> (usize, usize) {
    const KEY: &[u8] = b"token=";
    if start < floor + KEY.len() || !buf[start - KEY.len()..start].eq_ignore_ascii_case(KEY) {
        return (start, stop);
    }
    let key_start = start - KEY.len();
    let sep = (key_start > floor).then(|| buf[key_start - 1]);
    let next_amp = buf.get(stop) == Some(&b'&');
    match sep {
        Some(b'?') if next_amp => (key_start, stop + 1),
        Some(b'?') | Some(b'&') => (key_start - 1, stop),
        _ if next_amp => (key_start, stop + 1),
        _ => (key_start, stop),
    }
}

/// Scrubs a body that is already complete in memory: returns it untouched
/// (same bytes, same coding) when nothing matches, else the scrubbed body,
/// re-encoded; `true` when the bytes changed. `decoded` is what a coded
/// body decodes to, when the caller has it already. A body that cannot be
/// decoded here falls back to the streaming path, which fails the response
/// instead of passing it unread.
pub fn scrub_whole(
    bytes: Bytes,
    decoded: Option<Vec<u8>>,
    coding: Coding,
    mut scrubber: Scrubber,
) -> (ProxyBody, bool) {
    use crate::body::full;
    if bytes.is_empty() {
        return (full(bytes), false);
    }
    if coding == Coding::Identity {
        if !scrubber.pats.ac.is_match(&bytes[..]) {
            return (full(bytes), false);
        }
        return (full(scrubber.scrub_all(&bytes)), true);
    }
    let plain = match decoded {
        Some(plain) => plain,
        None => match crate::codec::decode_all(coding, &bytes, 8 * 1024 * 1024) {
            Ok(plain) => plain,
            Err(_) => return (ScrubBody::new(full(bytes), coding, scrubber).boxed(), true),
        },
    };
    if !scrubber.pats.ac.is_match(&plain[..]) {
        return (full(bytes), false);
    }
    let clean = scrubber.scrub_all(&plain);
    let mut enc = Encoder::new(coding);
    match enc.push(&clean).and_then(|mut out| {
        out.extend(enc.finish()?);
        Ok(out)
    }) {
        Ok(out) => (full(out), true),
        Err(_) => (ScrubBody::new(full(bytes), coding, scrubber).boxed(), true),
    }
}

/// Response content types that cannot carry a URL or a token in text and are
/// passed through unscanned: images, audio, video, fonts, protobuf/vector
/// tiles. Everything else is scanned.
pub fn is_binary_type(content_type: Option<&str>) -> bool {
    let Some(ct) = content_type else {
        return false;
    };
    let ct = ct[..memchr::memchr(b';', ct.as_bytes()).unwrap_or(ct.len())]
        .trim()
        .as_bytes();
    let starts = |p: &str| {
        ct.get(..p.len())
            .is_some_and(|h| h.eq_ignore_ascii_case(p.as_bytes()))
    };
    starts("image/")
        || starts("audio/")
        || starts("video/")
        || starts("font/")
        || [
            "application/x-protobuf",
            "application/vnd.mapbox-vector-tile",
            "application/x-font-ttf",
            "application/font-woff",
        ]
        .iter()
        .any(|t| ct.eq_ignore_ascii_case(t.as_bytes()))
}

/// A response body decoded, scrubbed and re-encoded on the fly.
pub struct ScrubBody {
    inner: ProxyBody,
    /// Identity coding: bytes go straight to the scrubber.
    identity: bool,
    decoder: Option<Decoder>,
    scrubber: Scrubber,
    encoder: Option<Encoder>,
    trailers: Option<http::HeaderMap>,
    done: bool,
}

impl ScrubBody {
    /// Wraps `inner`, whose content coding is `coding`.
    pub fn new(inner: ProxyBody, coding: Coding, scrubber: Scrubber) -> ScrubBody {
        ScrubBody {
            inner,
            identity: coding == Coding::Identity,
            decoder: Some(Decoder::new(coding)),
            scrubber,
            encoder: Some(Encoder::new(coding)),
            trailers: None,
            done: false,
        }
    }

    fn process(&mut self, data: &[u8]) -> std::io::Result<Vec<u8>> {
        if self.identity {
            return Ok(self.scrubber.push(data));
        }
        let decoded = match &mut self.decoder {
            Some(d) => d.push(data)?,
            None => Vec::new(),
        };
        let clean = self.scrubber.push(&decoded);
        match &mut self.encoder {
            Some(e) => e.push(&clean),
            None => Ok(Vec::new()),
        }
    }

    fn finish(&mut self) -> std::io::Result<Vec<u8>> {
        if self.identity {
            self.decoder = None;
            self.encoder = None;
            return Ok(self.scrubber.finish());
        }
        let mut clean = Vec::new();
        if let Some(d) = self.decoder.take() {
            clean = self.scrubber.push(&d.finish()?);
        }
        clean.extend(self.scrubber.finish());
        let Some(mut e) = self.encoder.take() else {
            return Ok(Vec::new());
        };
        let mut out = e.push(&clean)?;
        out.extend(e.finish()?);
        Ok(out)
    }
}

impl Body for ScrubBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> PollFrame {
        let this = &mut *self;
        loop {
            if this.done {
                return Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))));
            }
            let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(f) => f,
            };
            let out = match frame {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => this.process(&data),
                    Err(frame) => {
                        this.trailers = frame.into_trailers().ok();
                        this.done = true;
                        this.finish()
                    }
                },
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => {
                    this.done = true;
                    this.finish()
                }
            };
            match out {
                Ok(bytes) if !bytes.is_empty() => {
                    return Poll::Ready(Some(Ok(Frame::data(Bytes::from(bytes)))));
                }
                Ok(_) => continue,
                Err(e) => return Poll::Ready(Some(Err(Box::new(e)))),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

#[cfg(test)]
mod body_tests {
    use super::*;
    use crate::codec::tests::encode_all;
    use proptest::prelude::*;

    const T: &str = "TOK3n.Abc-_xyz9";

    fn scrub(secrets: &[&str], data: &str, chunk: usize) -> String {
        let mut s = Scrubber::new(secrets, &[]).unwrap();
        let mut out = Vec::new();
        for piece in data.as_bytes().chunks(chunk.max(1)) {
            out.extend(s.push(piece));
        }
        out.extend(s.finish());
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn token_parameters_disappear_with_their_separator() {
        let cases = [
            (
                format!("https://h/x?token={T}&f=json"),
                "https://h/x?f=json".to_string(),
            ),
            (
                format!("https://h/x?f=json&token={T}"),
                "https://h/x?f=json".to_string(),
            ),
            (
                format!("https://h/x?a=1&token={T}&b=2"),
                "https://h/x?a=1&b=2".to_string(),
            ),
            (format!("https://h/x?token={T}"), "https://h/x".to_string()),
            (
                format!("\"https://h/x?token={T}\""),
                "\"https://h/x\"".to_string(),
            ),
            (format!("token={T}&f=json"), "f=json".to_string()),
            (
                format!("{{\"token\":\"{T}\"}}"),
                "{\"token\":\"\"}".to_string(),
            ),
            (format!("Bearer {T} and {T}"), "Bearer  and ".to_string()),
            (format!("x?TOKEN={T}&y=1"), "x?y=1".to_string()),
            ("nothing here".to_string(), "nothing here".to_string()),
        ];
        for (input, expected) in cases {
            for chunk in [1, 2, 3, 7, 16, 1000] {
                assert_eq!(
                    scrub(&[T], &input, chunk),
                    expected,
                    "{input} / chunk {chunk}"
                );
            }
        }
    }

    #[test]
    fn url_prefixes_are_rewritten_keeping_templates() {
        let rewrites = vec![
            (
                "https://basemapstyles-api.arcgis.com/arcgis/rest/services/styles/v2".to_string(),
                "https://proxy.example/basemaps".to_string(),
            ),
            (
                "https://tiles.example.com/t".to_string(),
                "https://proxy.example/proxy?https://tiles.example.com/t".to_string(),
            ),
        ];
        let style = format!(
            r#"{{"sprite":"https://basemapstyles-api.arcgis.com/arcgis/rest/services/styles/v2/styles/x/sprite?token={T}",
"glyphs":"https://basemapstyles-api.arcgis.com/arcgis/rest/services/styles/v2/fonts/{{fontstack}}/{{range}}.pbf?token={T}&x=1",
"tiles":["https://tiles.example.com/t/{{z}}/{{y}}/{{x}}.pbf"],
"other":"https://tiles.example.com/tx/1","end":"https://tiles.example.com/t"}}"#
        );
        let expected = r#"{"sprite":"https://proxy.example/basemaps/styles/x/sprite",
"glyphs":"https://proxy.example/basemaps/fonts/{fontstack}/{range}.pbf?x=1",
"tiles":["https://proxy.example/proxy?https://tiles.example.com/t/{z}/{y}/{x}.pbf"],
"other":"https://tiles.example.com/tx/1","end":"https://proxy.example/proxy?https://tiles.example.com/t"}"#;
        for chunk in [1, 5, 64, 10_000] {
            let mut s = Scrubber::new(&[T], &rewrites).unwrap();
            let mut out = Vec::new();
            for piece in style.as_bytes().chunks(chunk) {
                out.extend(s.push(piece));
            }
            out.extend(s.finish());
            assert_eq!(String::from_utf8(out).unwrap(), expected, "chunk {chunk}");
        }
    }

    #[test]
    fn binary_types() {
        for ct in [
            "image/png",
            "IMAGE/JPEG",
            "application/x-protobuf",
            "font/woff2",
            "video/mp4",
            "Application/Vnd.Mapbox-Vector-Tile ; q=1",
        ] {
            assert!(is_binary_type(Some(ct)), "{ct}");
        }
        for ct in [
            "application/json; charset=utf-8",
            "text/html",
            "application/octet-stream",
            "text/plain",
            "image",
            "application/x-protobuf-but-not",
        ] {
            assert!(!is_binary_type(Some(ct)), "{ct}");
        }
        assert!(!is_binary_type(None));
    }

    fn body_from(chunks: Vec<Vec<u8>>) -> ProxyBody {
        use http_body_util::{BodyExt, StreamBody};
        let stream = futures_util::stream::iter(
            chunks
                .into_iter()
                .map(|c| Ok::<_, BoxError>(Frame::data(Bytes::from(c)))),
        );
        StreamBody::new(stream).boxed()
    }

    async fn collect(b: ScrubBody) -> Vec<u8> {
        use http_body_util::BodyExt;
        b.collect().await.unwrap().to_bytes().to_vec()
    }

    #[tokio::test]
    async fn compressed_bodies_are_scrubbed_and_stay_compressed() {
        let pad = "p".repeat(50_000);
        let text = format!("{{\"url\":\"https://h/x?token={T}&f=json\",\"pad\":\"{pad}\"}}");
        let expected = format!("{{\"url\":\"https://h/x?f=json\",\"pad\":\"{pad}\"}}");
        for coding in [
            Coding::Identity,
            Coding::Gzip,
            Coding::Deflate,
            Coding::Brotli,
        ] {
            let encoded = encode_all(coding, text.as_bytes());
            // Deliver the compressed bytes in tiny pieces.
            let chunks: Vec<Vec<u8>> = encoded.chunks(13).map(|c| c.to_vec()).collect();
            let body = ScrubBody::new(body_from(chunks), coding, Scrubber::new(&[T], &[]).unwrap());
            let out = collect(body).await;
            let decoded = crate::codec::decode_all(coding, &out, 1 << 20).unwrap();
            assert_eq!(String::from_utf8(decoded).unwrap(), expected, "{coding:?}");
            if coding != Coding::Identity {
                assert!(
                    out.len() < text.len() / 4,
                    "{coding:?} output not compressed"
                );
                assert!(!out.windows(T.len()).any(|w| w == T.as_bytes()));
            }
        }
    }

    proptest! {
        // Bodies are built from pieces: filler in an alphabet the token does
        // not use, the token bare or as a parameter in every position.
        #[test]
        fn any_chunking_removes_every_token(
            token in "[A-Z0-9]{12,40}",
            pieces in prop::collection::vec(
                prop_oneof![
                    "[a-z{}\":,/ ]{0,30}".prop_map(Piece::Text),
                    Just(Piece::Bare),
                    Just(Piece::Query),
                    Just(Piece::QueryAmp),
                    Just(Piece::Amp),
                ],
                0..30,
            ),
            cuts in prop::collection::vec(1usize..64, 1..50),
        ) {
            let mut input = String::new();
            let mut expected = String::new();
            for p in &pieces {
                match p {
                    Piece::Text(t) => { input.push_str(t); expected.push_str(t); }
                    Piece::Bare => { input.push_str(&token); }
                    Piece::Query => { input.push_str(&format!("u?token={token}")); expected.push('u'); }
                    Piece::QueryAmp => { input.push_str(&format!("u?token={token}&k=v")); expected.push_str("u?k=v"); }
                    Piece::Amp => { input.push_str(&format!("u?k=v&token={token}")); expected.push_str("u?k=v"); }
                }
            }
            let mut s = Scrubber::new(&[token.as_str()], &[]).unwrap();
            let mut out = Vec::new();
            let bytes = input.as_bytes();
            let mut at = 0;
            for c in cuts.iter().cycle() {
                if at >= bytes.len() { break; }
                let end = (at + c).min(bytes.len());
                out.extend(s.push(&bytes[at..end]));
                at = end;
            }
            out.extend(s.finish());
            let out = String::from_utf8(out).unwrap();
            prop_assert!(!out.contains(&token));
            // Compare with the whole-buffer result: chunking must not matter.
            let whole = Scrubber::new(&[token.as_str()], &[]).unwrap().scrub_all(input.as_bytes());
            prop_assert_eq!(&out, &String::from_utf8(whole).unwrap());
            // And the whole-buffer result is the input minus the token parts
            // (pieces were chosen so parameters never touch each other).
            if !pieces.windows(2).any(|w| !matches!(w[0], Piece::Text(_)) && !matches!(w[1], Piece::Text(_))) {
                prop_assert_eq!(out, expected);
            }
        }
    }

    #[derive(Debug, Clone)]
    enum Piece {
        Text(String),
        Bare,
        Query,
        QueryAmp,
        Amp,
    }
}
