//! Defence in depth for logs: every line is passed through [`redact`] before it
//! is written, so a `token=…`, `client_secret=…`, `access_token` or `Bearer …`
//! value can never reach a log file, whatever code logged it.
//!
//! The proxy already never logs tokens on purpose (tokens and secrets print as
//! `<redacted>`); this catches what an upstream error text or a future log
//! statement might carry.

use std::io::{self, Write};

use tracing_subscriber::fmt::MakeWriter;

/// Markers after which a value is secret, matched case-insensitively.
const MARKERS: &[&str] = &[
    "token=",
    "token%3d",
    "client_secret=",
    "access_token\":\"",
    "access_token\\\":\\\"",
    "bearer ",
];

/// Bytes that end a secret value.
fn ends_value(b: u8) -> bool {
    matches!(
        b,
        b'&' | b'"' | b'\'' | b'\\' | b'<' | b'>' | b',' | b';' | b')' | b'}'
    ) || b.is_ascii_whitespace()
}

/// Replaces every secret value in `line` with `<redacted>`.
pub fn redact(line: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    let lower = line.to_ascii_lowercase();
    let mut hits: Vec<(usize, usize)> = Vec::new();
    for m in MARKERS {
        let m = m.as_bytes();
        let mut from = 0;
        while let Some(pos) = memchr::memmem::find(&lower[from..], m) {
            let start = from + pos + m.len();
            let len = line[start..]
                .iter()
                .position(|b| ends_value(*b))
                .unwrap_or(line.len() - start);
            if len > 0 && !line[start..start + len].starts_with(b"<redacted>") {
                hits.push((start, start + len));
            }
            from = start;
        }
    }
    if hits.is_empty() {
        return std::borrow::Cow::Borrowed(line);
    }
    hits.sort_unstable();
    let mut out = Vec::with_capacity(line.len());
    let mut at = 0;
    for (s, e) in hits {
        if s < at {
            continue;
        }
        out.extend_from_slice(&line[at..s]);
        out.extend_from_slice(b"<redacted>");
        at = e;
    }
    out.extend_from_slice(&line[at..]);
    std::borrow::Cow::Owned(out)
}

/// A `MakeWriter` whose writers redact each write before passing it on.
pub struct Redacting<M>(pub M);

/// The writer [`Redacting`] hands out.
pub struct RedactingWriter<W>(W);

impl<W: Write> Write for RedactingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // tracing's fmt layer writes one whole formatted event per call.
        self.0.write_all(&redact(buf))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

impl<'a, M: MakeWriter<'a>> MakeWriter<'a> for Redacting<M> {
    type Writer = RedactingWriter<M::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        RedactingWriter(self.0.make_writer())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> String {
        String::from_utf8(redact(s.as_bytes()).into_owned()).unwrap()
    }

    #[test]
    fn secret_values_are_redacted() {
        assert_eq!(
            r("GET /x?f=json&token=abc.def-1&y=2"),
            "GET /x?f=json&token=<redacted>&y=2"
        );
        assert_eq!(
            r("url=https%3A%2F%2Fh%2Fx%3Ftoken%3Dabc"),
            "url=https%3A%2F%2Fh%2Fx%3Ftoken%3D<redacted>"
        );
        assert_eq!(
            r(r#"{"message":"X-Esri-Authorization: Bearer abc123","x":1}"#),
            r#"{"message":"X-Esri-Authorization: Bearer <redacted>","x":1}"#
        );
        assert_eq!(
            r(r#"{"access_token":"abc","expires_in":1}"#),
            r#"{"access_token":"<redacted>","expires_in":1}"#
        );
        assert_eq!(
            r("client_secret=s3cr3t&f=json"),
            "client_secret=<redacted>&f=json"
        );
        assert_eq!(
            r("TOKEN=abc and token=def"),
            "TOKEN=<redacted> and token=<redacted>"
        );
        assert_eq!(r("nothing secret here"), "nothing secret here");
        assert_eq!(r("token= empty"), "token= empty");
    }

    #[test]
    fn writer_redacts_what_passes_through() {
        let mut out = Vec::new();
        {
            let mut w = RedactingWriter(&mut out);
            w.write_all(b"a token=xyz b\n").unwrap();
        }
        assert_eq!(out, b"a token=<redacted> b\n");
    }
}
