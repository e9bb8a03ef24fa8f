//! The only HTTP/1 wire code in the crate: head limits, framing checks,
//! chunked decoding, `Content-Length` and `Connection` tokens.
//!
//! - `guard`: the request framing guard in front of hyper's server (plus
//!   `framing`, the I/O-free head checker it applies, and `idle`, the
//!   connection idle timer it enforces and the one that parks an idle
//!   connection);
//! - `answer`: reading an upstream answer (head, body framing, chunked
//!   decoding) for the upstream client in `upstream::pool::h1`, and the
//!   chunk-size line its request encoder writes;
//! - here: the rules both sides share (`Content-Length` values, whether
//!   chunked is the last coding, `Connection` list tokens).
//!
//! Chunked bodies are walked twice on purpose. The guard follows a request
//! body byte by byte without buffering it and must accept at least what
//! hyper's server accepts: were it stricter, a client could switch it into
//! pass-through with framing only it refuses and smuggle the next request
//! past it. The answer reader is the strict one (CRLF line ends, bounded
//! size lines and trailers) and hands the data on without copying.

pub mod answer;
mod framing;
pub mod guard;
mod idle;

use std::io;

use crate::body::BoxError;

/// What went wrong in an upstream HTTP/1.1 exchange.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The upstream closed the connection (or reset it) before a byte of
    /// an answer arrived.
    #[error("upstream closed the connection before answering")]
    Closed(#[source] Option<io::Error>),
    #[error("upstream connection: {0}")]
    Io(#[from] io::Error),
    /// The answer is not well-formed HTTP/1.1.
    #[error("malformed upstream answer: {0}")]
    Malformed(&'static str),
    /// The answer ended before its announced length.
    #[error("upstream answer cut short")]
    Incomplete,
    /// The request body the client sent failed (or broke its own framing).
    #[error("request body: {0}")]
    RequestBody(#[source] BoxError),
}

impl Error {
    /// Whether the client's request body caused this error.
    pub fn is_request_body(&self) -> bool {
        matches!(self, Error::RequestBody(_))
    }
}

/// A `Content-Length` value: digits, or a comma-separated list of equal
/// ones (RFC 9110 8.6); `None` for anything else (signs, hex, overflow,
/// differing values).
pub fn content_length(value: &[u8]) -> Option<u64> {
    let mut found: Option<u64> = None;
    for item in value.split(|b| *b == b',') {
        let item = item.trim_ascii();
        // At most 19 digits, so the value cannot overflow a u64.
        if item.is_empty() || item.len() > 19 {
            return None;
        }
        let mut n: u64 = 0;
        for &b in item {
            if !b.is_ascii_digit() {
                return None;
            }
            n = n * 10 + u64::from(b - b'0');
        }
        if found.is_some_and(|f| f != n) {
            return None;
        }
        found = Some(n);
    }
    found
}

/// The comma-separated tokens of a `Connection` (or similar list) header
/// value, trimmed, empty ones skipped.
pub fn list_tokens(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value
        .split(|b| *b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

/// True when a `Transfer-Encoding` value ends in `chunked`: only then is
/// the message framed by chunks (RFC 9112 6.3).
pub fn chunked_is_last(value: &[u8]) -> bool {
    value
        .rsplit(|b| *b == b',')
        .next()
        .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_lengths_are_digits_or_equal_lists() {
        for (v, want) in [
            (&b"0"[..], Some(0)),
            (b" 42 ", Some(42)),
            (b"7, 7,7", Some(7)),
            (b"9999999999999999999", Some(9_999_999_999_999_999_999)),
            // Twenty digits are refused before parsing (more than any body).
            (b"18446744073709551615", None),
            (b"7, 8", None),
            (b"+7", None),
            (b"-1", None),
            (b"0x10", None),
            (b"1e3", None),
            (b"", None),
            (b"7,", None),
            (b",", None),
            (b"4 2", None),
            (b"-0", None),
            (b"99999999999999999999", None),
        ] {
            assert_eq!(content_length(v), want, "{:?}", String::from_utf8_lossy(v));
        }
    }

    #[test]
    fn chunked_counts_only_when_last() {
        assert!(chunked_is_last(b"chunked"));
        assert!(chunked_is_last(b"gzip, Chunked "));
        assert!(!chunked_is_last(b"chunked, gzip"));
        assert!(!chunked_is_last(b"xchunked"));
        let tokens: Vec<&[u8]> = list_tokens(b" close ,, X-A").collect();
        assert_eq!(tokens, [&b"close"[..], b"X-A"]);
    }
}
