//! The request that goes upstream and the headers of the answer that comes
//! back. Headers are rebuilt from an allowlist-by-exclusion: hop-by-hop
//! headers (and those named in `Connection`), cookies, client credentials,
//! `Forwarded`/`X-Forwarded-*` and `Proxy-*` never cross in either
//! direction where the contract forbids it. Request targets carry only
//! bytes valid on a request line.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Uri};
use percent_encoding::{AsciiSet, CONTROLS, NON_ALPHANUMERIC, percent_encode};

use crate::body::{BoxError, ProxyBody};

/// The request id header, sent upstream and back to the client.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Header name for ArcGIS token injection.
pub static X_ESRI_AUTHORIZATION: HeaderName = HeaderName::from_static("x-esri-authorization");

/// Headers that describe one connection, never forwarded (RFC 9110 7.6.1),
/// as `HeaderName`s: removing by `&str` parses the name each time.
static HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name)
}

/// Names listed in `Connection` headers, other than `close` and the
/// hop-by-hop ones (removed anyway); usually none, with no allocation.
fn connection_listed(headers: &HeaderMap) -> Vec<HeaderName> {
    let mut out = Vec::new();
    for value in headers.get_all(header::CONNECTION) {
        for token in crate::http1::list_tokens(value.as_bytes()) {
            if token.eq_ignore_ascii_case(b"close")
                || HOP_BY_HOP
                    .iter()
                    .any(|h| token.eq_ignore_ascii_case(h.as_str().as_bytes()))
            {
                continue;
            }
            if let Ok(name) = HeaderName::from_bytes(token) {
                out.push(name);
            }
        }
    }
    out
}

/// Request headers that never go upstream, besides hop-by-hop ones.
fn strip_from_request(name: &HeaderName) -> bool {
    let n = name.as_str();
    matches!(
        n,
        "host"
            | "cookie"
            | "authorization"
            | "x-esri-authorization"
            | "forwarded"
            | "x-real-ip"
            | "x-request-id"
            | "content-length"
    ) || n.starts_with("proxy-")
        || n.starts_with("x-forwarded-")
}

/// Keeps only the codings the proxy can decode in an `Accept-Encoding`
/// value (with their q-values); `None` when nothing usable is left.
pub fn supported_encodings(value: &HeaderValue) -> Option<HeaderValue> {
    let text = value.to_str().ok()?;
    let kept: Vec<&str> = text
        .split(',')
        .map(str::trim)
        .filter(|item| {
            let coding = item
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            crate::codec::SUPPORTED.contains(&coding.as_str())
        })
        .collect();
    if kept.is_empty() {
        None
    } else {
        HeaderValue::from_str(&kept.join(", ")).ok()
    }
}

/// What the forwarder needs to build one upstream request.
pub struct Outgoing<'a> {
    /// `scheme://authority` of the upstream.
    pub origin: &'a str,
    /// Request target, `/path?query` (token included when it goes in the
    /// query), made only of bytes valid in a URI (see [`request_target`]).
    pub target: &'a str,
    /// `Host` header for the origin's authority.
    pub host: &'a HeaderValue,
    /// Client headers.
    pub headers: &'a HeaderMap,
    /// Method.
    pub method: &'a http::Method,
    /// `X-Esri-Authorization` value, for header injection.
    pub auth_header: Option<&'a HeaderValue>,
    /// Referer to send instead of the client's.
    pub upstream_referer: Option<&'a HeaderValue>,
    /// `X-Request-Id` to send (the client's own is never forwarded as is).
    pub request_id: Option<&'a HeaderValue>,
    /// Exact body length when known (kept or rewritten bodies, or the client's
    /// announced length).
    pub content_length: Option<u64>,
    /// Ask only for content codings the proxy can decode (the answer will be
    /// scrubbed).
    pub decodable_only: bool,
}

/// Calls `emit` with each header of the upstream request, in order: the
/// client's headers that may cross, then the proxy's own (`Host`, the
/// credential's referrer, the token header, the body length). The one place
/// the forwarding rules live, for the HTTP/1.1 encoder and for
/// [`build_request`] alike.
pub fn each_upstream_header(out: &Outgoing<'_>, mut emit: impl FnMut(&HeaderName, &HeaderValue)) {
    // Names a `Connection` header lists are hop-by-hop too; looked up only
    // when there is one. They never remove the proxy's own headers.
    let listed = if out.headers.contains_key(header::CONNECTION) {
        connection_listed(out.headers)
    } else {
        Vec::new()
    };
    let mut accept_encoding_seen = false;
    for (name, value) in out.headers {
        if is_hop_by_hop(name) || strip_from_request(name) || listed.contains(name) {
            continue;
        }
        // A browser Origin would contradict the referrer the credential is
        // restricted to.
        if out.upstream_referer.is_some() && (name == header::REFERER || name == header::ORIGIN) {
            continue;
        }
        if out.decodable_only && name == header::ACCEPT_ENCODING {
            // The first value, reduced to codings the proxy can decode.
            if !accept_encoding_seen {
                accept_encoding_seen = true;
                if let Some(kept) = supported_encodings(value) {
                    emit(name, &kept);
                }
            }
            continue;
        }
        emit(name, value);
    }
    emit(&header::HOST, out.host);
    if let Some(id) = out.request_id {
        emit(&X_REQUEST_ID, id);
    }
    if let Some(r) = out.upstream_referer {
        emit(&header::REFERER, r);
    }
    if let Some(auth) = out.auth_header {
        emit(&X_ESRI_AUTHORIZATION, auth);
    }
    if let Some(len) = out.content_length {
        emit(&header::CONTENT_LENGTH, &HeaderValue::from(len));
    }
}

/// Builds the upstream request as an `http::Request` (absolute URI, `Host`
/// set), for hyper's HTTP/2 client.
pub fn build_request(out: &Outgoing<'_>, body: ProxyBody) -> Result<Request<ProxyBody>, BoxError> {
    let mut headers = HeaderMap::with_capacity(out.headers.len() + 3);
    each_upstream_header(out, |name, value| {
        headers.append(name.clone(), value.clone());
    });
    let mut absolute = String::with_capacity(out.origin.len() + out.target.len());
    absolute.push_str(out.origin);
    absolute.push_str(out.target);
    let uri = to_uri(absolute).ok_or("upstream request target is not a URI")?;
    let mut req = Request::new(body);
    *req.method_mut() = out.method.clone();
    *req.uri_mut() = uri;
    *req.headers_mut() = headers;
    Ok(req)
}

/// Removes headers from an upstream answer that must not reach the client:
/// hop-by-hop (with `Proxy-*`: an upstream's `Proxy-Authenticate` would
/// challenge the browser for credentials of a proxy it never chose),
/// cookies, upstream CORS (the proxy sets its own).
pub fn clean_response_headers(headers: &mut HeaderMap) {
    // One pass over the names present; usually nothing is removed and
    // nothing is allocated.
    let mut has_connection = false;
    let mut drop: Vec<HeaderName> = headers
        .keys()
        .filter(|name| {
            has_connection |= *name == header::CONNECTION;
            let n = name.as_str();
            is_hop_by_hop(name)
                || n == "set-cookie"
                || n == "set-cookie2"
                || n.starts_with("access-control-")
                || n.starts_with("proxy-")
        })
        .cloned()
        .collect();
    if has_connection {
        drop.extend(connection_listed(headers));
    }
    for n in drop {
        headers.remove(n);
    }
}

/// Bytes encoded when a URI string does not parse as it is: everything but
/// unreserved and reserved characters and `%` (escapes stay as they are).
/// Non-ASCII bytes are always encoded.
const URI_ESCAPE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b':')
    .remove(b'/')
    .remove(b'?')
    .remove(b'#')
    .remove(b'[')
    .remove(b']')
    .remove(b'@')
    .remove(b'!')
    .remove(b'$')
    .remove(b'&')
    .remove(b'\'')
    .remove(b'(')
    .remove(b')')
    .remove(b'*')
    .remove(b'+')
    .remove(b',')
    .remove(b';')
    .remove(b'=')
    .remove(b'%');

/// Percent-encodes anything `http::Uri` would refuse, leaving valid URI
/// characters (including `%` escapes) as they are.
pub fn to_uri(s: String) -> Option<Uri> {
    // The usual case parses as it is, from the string's own buffer.
    let bytes = Bytes::from(s);
    if let Ok(u) = Uri::from_maybe_shared(bytes.clone()) {
        return Some(u);
    }
    percent_encode(&bytes, URI_ESCAPE).to_string().parse().ok()
}

/// Bytes a request target does not carry as they are: controls, space,
/// `#` (a fragment never goes upstream), `"`, `<`, `>` and non-ASCII;
/// everything else `http::Uri` takes in a path or query as it is (so `{z}`
/// or `|` pass unchanged).
const TARGET_ESCAPE: &AsciiSet = &CONTROLS.add(b' ').add(b'#').add(b'"').add(b'<').add(b'>');

/// Whether a request target carries byte `b` as it is (see [`TARGET_ESCAPE`]).
const fn target_safe(b: u8) -> bool {
    b >= 0x21 && b < 0x7f && !matches!(b, b'#' | b'"' | b'<' | b'>')
}

/// A request target (`/path?query`) that is safe to put on a request line:
/// `target` itself in the usual case, else with every other byte (space,
/// control, `#`, non-ASCII) percent-encoded.
pub fn request_target(target: String) -> String {
    // No early exit, so the compiler checks many bytes per instruction.
    if target.bytes().fold(true, |ok, b| ok & target_safe(b)) {
        return target;
    }
    percent_encode(target.as_bytes(), TARGET_ESCAPE).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The headers `build_request` sends upstream for client headers `h`
    /// (upstream `up.example:8443`).
    fn sent(
        h: &HeaderMap,
        auth_header: Option<&HeaderValue>,
        upstream_referer: Option<&HeaderValue>,
        content_length: Option<u64>,
    ) -> HeaderMap {
        let host = HeaderValue::from_static("up.example:8443");
        let out = Outgoing {
            origin: "https://up.example:8443",
            target: "/x",
            host: &host,
            headers: h,
            method: &http::Method::GET,
            auth_header,
            upstream_referer,
            request_id: None,
            content_length,
            decodable_only: false,
        };
        build_request(&out, crate::body::empty())
            .unwrap()
            .headers()
            .clone()
    }

    #[test]
    fn connection_listed_names_are_dropped_but_host_is_the_proxys() {
        let mut h = HeaderMap::new();
        h.append("connection", HeaderValue::from_static("keep-alive, X-Drop"));
        h.append("connection", HeaderValue::from_static("host"));
        h.append("x-drop", HeaderValue::from_static("1"));
        h.append("x-keep", HeaderValue::from_static("2"));
        h.append("host", HeaderValue::from_static("proxy.example"));
        let sent = sent(&h, None, None, None);
        let mut names: Vec<&str> = sent.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["host", "x-keep"]);
        assert_eq!(sent["host"], "up.example:8443");
    }

    #[test]
    fn request_headers_are_cleaned() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("host", "proxy.example"),
            ("cookie", "a=b"),
            ("authorization", "Bearer client"),
            ("x-esri-authorization", "Bearer client"),
            ("proxy-authorization", "Basic x"),
            ("forwarded", "for=1.2.3.4"),
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-proto", "https"),
            ("connection", "keep-alive, x-custom"),
            ("x-custom", "1"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("accept", "application/json"),
            ("referer", "https://app.example.com/"),
            ("origin", "https://app.example.com"),
        ] {
            h.append(k, HeaderValue::from_static(v));
        }
        let auth = HeaderValue::from_static("Bearer server");
        let req = sent(&h, Some(&auth), None, None);
        let names: Vec<&str> = req.keys().map(|k| k.as_str()).collect();
        assert_eq!(names.len(), 5, "{names:?}");
        assert_eq!(req["host"], "up.example:8443");
        assert_eq!(req["accept"], "application/json");
        assert_eq!(req["referer"], "https://app.example.com/");
        assert_eq!(req["origin"], "https://app.example.com");
        assert_eq!(req["x-esri-authorization"], "Bearer server");

        let referer = HeaderValue::from_static("https://registered.example/");
        let req = sent(&h, None, Some(&referer), Some(0));
        assert_eq!(req["referer"], "https://registered.example/");
        assert!(req.get("origin").is_none());
        assert!(req.get("x-esri-authorization").is_none());
        assert_eq!(req["content-length"], "0");
    }

    #[test]
    fn response_headers_are_cleaned() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("set-cookie", "s=1"),
            ("connection", "x-hop"),
            ("x-hop", "1"),
            ("transfer-encoding", "chunked"),
            ("keep-alive", "timeout=5"),
            ("proxy-authenticate", "Basic realm=\"corp\""),
            ("proxy-authentication-info", "nextnonce=\"x\""),
            ("proxy-connection", "keep-alive"),
            ("access-control-allow-origin", "*"),
            ("content-type", "application/json"),
            ("cache-control", "max-age=60"),
        ] {
            h.append(k, HeaderValue::from_static(v));
        }
        clean_response_headers(&mut h);
        let mut names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        names.sort();
        assert_eq!(names, ["cache-control", "content-type"]);
    }

    #[test]
    fn accept_encoding_keeps_only_decodable_codings() {
        let v = |s: &'static str| HeaderValue::from_static(s);
        assert_eq!(
            supported_encodings(&v("zstd, br;q=0.9, gzip, compress")).unwrap(),
            "br;q=0.9, gzip"
        );
        assert!(supported_encodings(&v("zstd")).is_none());
    }

    #[test]
    fn request_targets_carry_only_request_line_safe_bytes() {
        for (raw, expected) in [
            ("/a/b?where=1%3D1&f=json", "/a/b?where=1%3D1&f=json"),
            ("/tiles/{z}/{y}/{x}?a=[1]|b", "/tiles/{z}/{y}/{x}?a=[1]|b"),
            ("/x?q=\"a b\"", "/x?q=%22a%20b%22"),
            (
                "/x HTTP/1.1\r\nHost: evil\r\n\r\n",
                "/x%20HTTP/1.1%0D%0AHost:%20evil%0D%0A%0D%0A",
            ),
            ("/x#frag", "/x%23frag"),
            ("/x?<script>", "/x?%3Cscript%3E"),
            ("/caf\u{e9}\t\0\x7f", "/caf%C3%A9%09%00%7F"),
        ] {
            assert_eq!(request_target(raw.to_string()), expected, "{raw:?}");
        }
    }

    proptest::proptest! {
        #[test]
        fn any_target_becomes_one_request_line_token(raw in "\\PC*|[\\x00-\\x7f]*") {
            let t = request_target(raw.clone());
            proptest::prop_assert!(
                t.bytes().all(|b| (0x21..0x7f).contains(&b) && !b"#\"<>".contains(&b)),
                "{t:?}"
            );
            // Encoding is the only change (`%` passes as it is, so inputs
            // holding one are left out of this check).
            if !raw.contains('%') {
                let decoded: Vec<u8> = percent_encoding::percent_decode_str(&t).collect();
                proptest::prop_assert_eq!(decoded, raw.into_bytes());
            }
        }
    }

    #[test]
    fn uri_fallback_encodes() {
        assert_eq!(
            to_uri("https://h/x?q=\"a b\"".into()).unwrap().to_string(),
            "https://h/x?q=%22a%20b%22"
        );
        assert_eq!(
            to_uri("https://h/x?q={a}".into()).unwrap().to_string(),
            "https://h/x?q={a}"
        );
        assert_eq!(
            to_uri("https://h/a%20b".into()).unwrap().to_string(),
            "https://h/a%20b"
        );
    }
}
