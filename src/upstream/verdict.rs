//! The verdict on an upstream answer to a request that carried the proxy's
//! token: refused (HTTP 401/498/499, or an ArcGIS JSON error 498/499 in an
//! HTTP 200, also when compressed), or passed on with its body intact —
//! read whole when small enough to be that error, else still streaming.

use bytes::Bytes;
use http::header::{self, HeaderMap};
use http::{Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Body;

use crate::body::{BoxError, Prefixed, ProxyBody};
use crate::codec::{self, Coding};

/// Largest `200` answer whose body is read to look for ArcGIS's
/// `{"error":{"code":498|499}}`; larger ones cannot be that error and stream
/// untouched.
pub const PEEK_LIMIT: usize = 16 * 1024;

/// What an upstream answer means for the token that was sent.
pub enum Verdict {
    /// The upstream refused the token (HTTP 401/498/499, or HTTP 200 with a
    /// JSON error 498/499, also when compressed).
    Rejected,
    /// Anything else, with its body intact.
    Pass(http::response::Parts, Answer),
}

/// An upstream answer's body: already complete in memory (small answers
/// read by [`inspect`]), or still streaming.
pub enum Answer {
    /// The whole body as it came.
    Whole(Bytes),
    /// The whole of a content-coded body, with what it decodes to: the
    /// token-error check had to decode it, and scrubbing reads the same
    /// bytes, so they are decoded once (inflating a small gzip answer costs
    /// more than the rest of its request).
    Decoded(Bytes, Vec<u8>),
    /// The body as it arrives.
    Stream(ProxyBody),
}

impl Answer {
    /// The body to send as it is.
    pub fn into_body(self) -> ProxyBody {
        match self {
            Answer::Whole(b) | Answer::Decoded(b, _) => crate::body::full(b),
            Answer::Stream(b) => b,
        }
    }
}

/// Classifies an upstream answer to a request that carried the proxy's token,
/// reading at most [`PEEK_LIMIT`] bytes of candidate bodies.
pub async fn inspect<B>(resp: Response<B>) -> Result<Verdict, BoxError>
where
    B: Body<Data = Bytes, Error = BoxError> + Send + Sync + Unpin + 'static,
{
    if matches!(resp.status().as_u16(), 401 | 498 | 499) {
        return Ok(Verdict::Rejected);
    }
    let (parts, mut body) = resp.into_parts();
    if body.is_end_stream() {
        return Ok(Verdict::Pass(parts, Answer::Whole(Bytes::new())));
    }
    if parts.status != StatusCode::OK || !may_be_json_error(&parts.headers) {
        return Ok(Verdict::Pass(parts, Answer::Stream(body.boxed())));
    }
    // Usually the whole answer comes as one piece: no list, no box.
    let mut first: Option<Bytes> = None;
    let mut more: Vec<Bytes> = Vec::new();
    let mut size = 0;
    let mut ended = false;
    while size <= PEEK_LIMIT {
        match body.frame().await {
            None => {
                ended = true;
                break;
            }
            Some(Err(e)) => return Err(e),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(d) => {
                    size += d.len();
                    if first.is_none() {
                        first = Some(d);
                    } else {
                        more.push(d);
                    }
                }
                // Trailers after a small body: the body is complete.
                Err(_) => {
                    ended = true;
                    break;
                }
            },
        }
    }
    if !ended {
        let read: Vec<Bytes> = first.into_iter().chain(more).collect();
        return Ok(Verdict::Pass(
            parts,
            Answer::Stream(Prefixed::new(read, body.boxed()).boxed()),
        ));
    }
    let whole: Bytes = if more.is_empty() {
        first.unwrap_or_default()
    } else {
        first
            .into_iter()
            .chain(more)
            .collect::<Vec<_>>()
            .concat()
            .into()
    };
    let answer = match Coding::of(&parts.headers) {
        Some(Coding::Identity) if is_token_error(&whole) => return Ok(Verdict::Rejected),
        Some(Coding::Identity) | None => Answer::Whole(whole),
        Some(c) => match codec::decode_all(c, &whole, 4 * PEEK_LIMIT) {
            Ok(plain) if is_token_error(&plain) => return Ok(Verdict::Rejected),
            Ok(plain) => Answer::Decoded(whole, plain),
            Err(_) => Answer::Whole(whole),
        },
    };
    Ok(Verdict::Pass(parts, answer))
}

fn may_be_json_error(headers: &HeaderMap) -> bool {
    let small = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
        .is_none_or(|n| n <= PEEK_LIMIT);
    let texty = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_none_or(|ct| {
            let ct = ct.as_bytes();
            let starts = |p: &[u8]| ct.get(..p.len()).is_some_and(|h| h.eq_ignore_ascii_case(p));
            let has = |word: &[u8]| ct.windows(word.len()).any(|w| w.eq_ignore_ascii_case(word));
            starts(b"application/json") || starts(b"text/") || has(b"json") || has(b"javascript")
        });
    small && texty
}

/// True for `{"error":{"code":498|499,…}}`, also wrapped as JSONP
/// (`callback({…});`, as ArcGIS answers `callback=` requests).
pub fn is_token_error(body: &[u8]) -> bool {
    let body = body.trim_ascii_start();
    // Only a body that does not start as JSON can be JSONP; an ordinary
    // answer must not be scanned for a parenthesis.
    let body = match body.first() {
        Some(b'{') | None => body,
        Some(_) => jsonp_inner(body.trim_ascii_end()).unwrap_or(body),
    };
    // Cheap pre-check so ordinary answers are never parsed: ArcGIS writes the
    // `error` member first, right after the opening brace.
    let rest = body;
    let Some(after_brace) = rest.strip_prefix(b"{") else {
        return false;
    };
    let first_member = after_brace
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .map_or(&b""[..], |i| &after_brace[i..]);
    if !first_member.starts_with(b"\"error\"") {
        return false;
    }
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return false;
    };
    let code = &v["error"]["code"];
    let code = code
        .as_i64()
        .or_else(|| code.as_str().and_then(|s| s.parse().ok()));
    matches!(code, Some(498 | 499))
}

/// The JSON inside a JSONP answer: `name(…)` with an optional `;`, the
/// name a JavaScript identifier path (`cb`, `dojo.io.script.jsonp_dojoIoScript1._jsonpCallback`),
/// optionally after the `/**/` some servers put first.
fn jsonp_inner(body: &[u8]) -> Option<&[u8]> {
    let body = body
        .strip_prefix(b"/**/")
        .unwrap_or(body)
        .trim_ascii_start();
    let open = body.iter().position(|&c| c == b'(')?;
    let name = body[..open].trim_ascii_end();
    let ident = |c: &u8| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'$' | b'.');
    if name.is_empty() || name[0].is_ascii_digit() || !name.iter().all(ident) {
        return None;
    }
    let rest = body[open + 1..].trim_ascii_end();
    let rest = rest.strip_suffix(b";").map_or(rest, <[u8]>::trim_ascii_end);
    rest.strip_suffix(b")").map(<[u8]>::trim_ascii)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn answers_that_may_be_a_json_error() {
        let with = |pairs: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.insert(*k, HeaderValue::from_static(v));
            }
            may_be_json_error(&h)
        };
        assert!(with(&[]));
        assert!(with(&[("content-type", "Application/JSON; charset=utf-8")]));
        assert!(with(&[("content-type", "text/plain")]));
        assert!(with(&[("content-type", "TEXT/html")]));
        assert!(with(&[("content-type", "application/x-JavaScript")]));
        assert!(!with(&[("content-type", "image/png")]));
        assert!(!with(&[("content-type", "application/octet-stream")]));
        assert!(!with(&[("content-type", "text")]));
        assert!(!with(&[("content-length", "16385")]));
        assert!(with(&[("content-length", "16384")]));
    }

    #[test]
    fn token_errors_are_recognised() {
        assert!(is_token_error(
            br#"{"error":{"code":498,"message":"Invalid token.","details":[]}}"#
        ));
        assert!(is_token_error(
            br#" {"error":{"code":499,"message":"Token Required"}}"#
        ));
        assert!(is_token_error(br#"{"error":{"code":"498"}}"#));
        assert!(!is_token_error(
            br#"{"error":{"code":400,"message":"Invalid URL"}}"#
        ));
        assert!(!is_token_error(
            br#"{"features":[{"attributes":{"code":498}}]}"#
        ));
        assert!(!is_token_error(b"not json"));
        // Only the top-level `error` member counts.
        assert!(!is_token_error(br#"{"features":[{"error":{"code":498}}]}"#));
        assert!(!is_token_error(b"{\"err"));
        assert!(!is_token_error(b""));
        // JSONP, as ArcGIS answers `callback=` requests.
        for wrapped in [
            &br#"cb({"error":{"code":498,"message":"Invalid token."}});"#[..],
            br#"/**/ dojo.io.script.jsonp_dojoIoScript3._jsonpCallback ( {"error":{"code":499}} ) ;"#,
            b"cb({\"error\":{\"code\":498}})\n",
        ] {
            assert!(is_token_error(wrapped), "{}", String::from_utf8_lossy(wrapped));
        }
        for not in [
            &br#"cb({"features":[]});"#[..],
            br#"1cb({"error":{"code":498}})"#,
            br#"alert(1);cb({"error":{"code":498}})"#,
            br#"cb({"error":{"code":498}}"#,
            b"(",
        ] {
            assert!(!is_token_error(not), "{}", String::from_utf8_lossy(not));
        }
    }
}
