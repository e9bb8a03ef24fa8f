//! Reading an HTTP/1.1 answer: the head (httparse, with hyper's limits),
//! how its body is framed (RFC 9112 section 6: length, chunks or until
//! close) and the body decoder, plus the chunk-size line the request
//! encoder writes. The upstream client (`upstream::pool::h1`) drives these
//! over its connection; the fuzz target drives them over a byte string.

use std::mem::MaybeUninit;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode, Version};
use hyper::body::Frame;

use super::Error;

/// Most header fields accepted in an answer head (hyper's default).
pub(crate) const MAX_HEADERS: usize = 100;
/// Largest answer head accepted.
pub(crate) const MAX_HEAD: usize = 64 * 1024;
/// Longest chunk-size line, extensions included.
const MAX_CHUNK_LINE: usize = 4 * 1024;
/// Largest trailer section.
const MAX_TRAILERS: usize = 16 * 1024;

/// `len` in hex followed by CRLF (a chunk-size line), written into `buf`.
pub fn chunk_size_line(len: usize, buf: &mut [u8; 18]) -> &[u8] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut i = 16;
    let mut n = len;
    loop {
        i -= 1;
        buf[i] = HEX[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    buf[16] = b'\r';
    buf[17] = b'\n';
    &buf[i..]
}

/// An answer head, and how to read its body from the connection.
pub struct AnswerHead {
    pub parts: http::response::Parts,
    pub framing: BodyFraming,
    /// The connection can carry another request once the body has ended.
    pub reusable: bool,
}

pub enum Parsed {
    /// A 1xx answer before the final one, skipped.
    Informational,
    Final(AnswerHead),
}

/// Parses an answer head at the start of `buf` and removes it; `None` while
/// the head is incomplete.
pub fn parse_head(buf: &mut BytesMut, head_request: bool) -> Result<Option<Parsed>, Error> {
    let mut slots = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut res = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut res, buf, &mut slots)
    {
        // However it arrived, in one read or many, the same limit.
        Ok(httparse::Status::Complete(len)) if len > MAX_HEAD => {
            return Err(Error::Malformed("head too large"));
        }
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Error::Malformed("too many headers")),
        Err(_) => return Err(Error::Malformed("invalid head")),
    };
    let code = res.code.unwrap_or(0);
    let status = StatusCode::from_u16(code).map_err(|_| Error::Malformed("status code"))?;
    if status == StatusCode::SWITCHING_PROTOCOLS {
        // Never asked for: the proxy strips Upgrade.
        return Err(Error::Malformed("unrequested protocol switch"));
    }
    if status.is_informational() {
        buf.advance(len);
        return Ok(Some(Parsed::Informational));
    }
    let version = if res.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let mut headers = HeaderMap::with_capacity(res.headers.len());
    let base = buf.as_ptr() as usize;
    let values = Bytes::copy_from_slice(&buf[..len]);
    let mut length: Option<u64> = None;
    let mut transfer_encoding = false;
    let mut chunked = false;
    let mut close = version == Version::HTTP_10;
    for h in res.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| Error::Malformed("header name"))?;
        if name == header::CONTENT_LENGTH {
            let n =
                crate::http1::content_length(h.value).ok_or(Error::Malformed("Content-Length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(Error::Malformed("conflicting Content-Length"));
            }
            length = Some(n);
        } else if name == header::TRANSFER_ENCODING {
            transfer_encoding = true;
            // Chunked only if it is the last coding applied.
            chunked = crate::http1::chunked_is_last(h.value);
            // Framing of this connection only: consumed here, never
            // forwarded (the client gets the proxy's own framing).
            continue;
        } else if name == header::CONNECTION {
            let mut only_ours = true;
            for token in crate::http1::list_tokens(h.value) {
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    if version == Version::HTTP_10 {
                        close = false;
                    }
                } else {
                    only_ours = false;
                }
            }
            // `close` and `keep-alive` are consumed here; a `Connection`
            // naming other headers stays for `clean_response_headers` to
            // remove them.
            if only_ours {
                continue;
            }
        } else if name.as_str() == "keep-alive" {
            continue;
        }
        // A slice of one copy of the head: one allocation for all values
        // instead of one each (httparse has already refused what
        // `HeaderValue` would).
        let start = h.value.as_ptr() as usize - base;
        let value = HeaderValue::from_maybe_shared(values.slice(start..start + h.value.len()))
            .map_err(|_| Error::Malformed("header value"))?;
        headers.append(name, value);
    }
    buf.advance(len);
    let framing = body_framing(head_request, status, length, transfer_encoding, chunked);
    // Read until the close, or both framings at once (how responses get
    // smuggled): the connection is not reused.
    close |= matches!(framing, BodyFraming::UntilClose) || (transfer_encoding && length.is_some());
    let mut parts = Response::new(()).into_parts().0;
    parts.status = status;
    parts.version = version;
    parts.headers = headers;
    Ok(Some(Parsed::Final(AnswerHead {
        parts,
        framing,
        reusable: !close,
    })))
}

/// How the body of an answer is delimited (RFC 9112 6.3): none after HEAD,
/// 204 and 304; chunked when chunked is the last transfer coding, which
/// wins over a Content-Length; else the length; else until the close.
#[inline]
fn body_framing(
    head_request: bool,
    status: StatusCode,
    length: Option<u64>,
    transfer_encoding: bool,
    chunked: bool,
) -> BodyFraming {
    if head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        BodyFraming::Done
    } else if transfer_encoding {
        if chunked {
            BodyFraming::Chunked(Chunk::Size)
        } else {
            BodyFraming::UntilClose
        }
    } else {
        match length {
            Some(0) => BodyFraming::Done,
            Some(n) => BodyFraming::Length(n),
            None => BodyFraming::UntilClose,
        }
    }
}

/// Where reading an answer body stands.
#[derive(Debug, PartialEq)]
pub enum BodyFraming {
    /// This many bytes still to come.
    Length(u64),
    Chunked(Chunk),
    /// Everything until the upstream closes.
    UntilClose,
    Done,
}

#[derive(Debug, PartialEq)]
pub enum Chunk {
    Size,
    Data(u64),
    DataEnd,
    Trailers {
        seen: usize,
        fields: Option<Box<HeaderMap>>,
    },
}

pub enum Step {
    Frame(Frame<Bytes>),
    NeedMore,
    End,
}

impl BodyFraming {
    /// The next piece of the body from `buf`.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Step, Error> {
        loop {
            match self {
                BodyFraming::Done => return Ok(Step::End),
                BodyFraming::Length(0) => {
                    *self = BodyFraming::Done;
                    return Ok(Step::End);
                }
                BodyFraming::Length(left) => {
                    if buf.is_empty() {
                        return Ok(Step::NeedMore);
                    }
                    let data = take_counted(left, buf);
                    if *left == 0 {
                        *self = BodyFraming::Done;
                    }
                    return Ok(Step::Frame(Frame::data(data)));
                }
                BodyFraming::UntilClose => {
                    if buf.is_empty() {
                        return Ok(Step::NeedMore);
                    }
                    return Ok(Step::Frame(Frame::data(buf.split().freeze())));
                }
                BodyFraming::Chunked(Chunk::Size) => {
                    let window = &buf[..buf.len().min(MAX_CHUNK_LINE)];
                    let Some(nl) = memchr::memchr(b'\n', window) else {
                        if buf.len() >= MAX_CHUNK_LINE {
                            return Err(Error::Malformed("chunk size line too long"));
                        }
                        return Ok(Step::NeedMore);
                    };
                    let size = parse_chunk_size(&buf[..nl])?;
                    buf.advance(nl + 1);
                    *self = BodyFraming::Chunked(if size == 0 {
                        Chunk::Trailers {
                            seen: 0,
                            fields: None,
                        }
                    } else {
                        Chunk::Data(size)
                    });
                }
                BodyFraming::Chunked(Chunk::Data(left)) => {
                    if buf.is_empty() {
                        return Ok(Step::NeedMore);
                    }
                    let data = take_counted(left, buf);
                    if *left == 0 {
                        *self = BodyFraming::Chunked(Chunk::DataEnd);
                    }
                    return Ok(Step::Frame(Frame::data(data)));
                }
                BodyFraming::Chunked(Chunk::DataEnd) => {
                    if buf.len() < 2 {
                        return Ok(Step::NeedMore);
                    }
                    if &buf[..2] != b"\r\n" {
                        return Err(Error::Malformed("chunk not followed by CRLF"));
                    }
                    buf.advance(2);
                    *self = BodyFraming::Chunked(Chunk::Size);
                }
                BodyFraming::Chunked(Chunk::Trailers { seen, fields }) => {
                    let Some(nl) = memchr::memchr(b'\n', buf) else {
                        if *seen + buf.len() > MAX_TRAILERS {
                            return Err(Error::Malformed("trailers too large"));
                        }
                        return Ok(Step::NeedMore);
                    };
                    *seen += nl + 1;
                    if *seen > MAX_TRAILERS {
                        return Err(Error::Malformed("trailers too large"));
                    }
                    let line = buf.split_to(nl + 1);
                    let line = line
                        .strip_suffix(b"\r\n")
                        .ok_or(Error::Malformed("trailer line without CRLF"))?;
                    if line.is_empty() {
                        let fields = fields.take();
                        *self = BodyFraming::Done;
                        return Ok(match fields {
                            Some(map) => Step::Frame(Frame::trailers(*map)),
                            None => Step::End,
                        });
                    }
                    let (name, value) = parse_trailer(line)?;
                    fields.get_or_insert_default().append(name, value);
                }
            }
        }
    }
}

/// What `buf` holds of the `left` bytes still due, counted off `left`.
fn take_counted(left: &mut u64, buf: &mut BytesMut) -> Bytes {
    let take = (*left).min(buf.len() as u64);
    *left -= take;
    buf.split_to(take as usize).freeze()
}

/// The size on a chunk-size line (without its `\n`): hex digits, then
/// optionally whitespace and `;` extensions, then `\r`.
fn parse_chunk_size(line: &[u8]) -> Result<u64, Error> {
    let line = line
        .strip_suffix(b"\r")
        .ok_or(Error::Malformed("chunk size line without CRLF"))?;
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 {
        return Err(Error::Malformed("chunk size"));
    }
    let rest = line[digits..].trim_ascii_start();
    if !(rest.is_empty() || rest[0] == b';') {
        return Err(Error::Malformed("chunk size"));
    }
    let hex = std::str::from_utf8(&line[..digits]).map_err(|_| Error::Malformed("chunk size"))?;
    u64::from_str_radix(hex, 16).map_err(|_| Error::Malformed("chunk size"))
}

fn parse_trailer(line: &[u8]) -> Result<(HeaderName, HeaderValue), Error> {
    let colon = memchr::memchr(b':', line).ok_or(Error::Malformed("trailer field"))?;
    let name =
        HeaderName::from_bytes(&line[..colon]).map_err(|_| Error::Malformed("trailer field"))?;
    let value = HeaderValue::from_bytes(line[colon + 1..].trim_ascii())
        .map_err(|_| Error::Malformed("trailer field"))?;
    Ok((name, value))
}

/// What [`read_answer`] made of an answer.
#[cfg(any(test, feature = "fuzzing"))]
#[derive(Debug, PartialEq)]
pub struct ReadAnswer {
    pub status: u16,
    pub body: Vec<u8>,
    pub trailers: usize,
    pub reusable: bool,
}

/// Reads one answer from `wire` delivered in pieces of `piece` bytes, as the
/// connection would (the end of `wire` is the upstream closing): for the
/// fuzz target and tests, which check that nothing depends on how reads cut
/// the bytes.
#[cfg(any(test, feature = "fuzzing"))]
pub fn read_answer(wire: &[u8], piece: usize, head_request: bool) -> Result<ReadAnswer, String> {
    let mut pieces = wire.chunks(piece.max(1));
    let mut buf = BytesMut::new();
    let answer = loop {
        match parse_head(&mut buf, head_request).map_err(|e| e.to_string())? {
            Some(Parsed::Final(a)) => break a,
            Some(Parsed::Informational) => continue,
            None if buf.len() >= MAX_HEAD => {
                return Err(Error::Malformed("head too large").to_string());
            }
            None => match pieces.next() {
                Some(p) => buf.extend_from_slice(p),
                None => return Err("closed before the head ended".into()),
            },
        }
    };
    let mut decoder = answer.framing;
    let (mut body, mut trailers) = (Vec::new(), 0);
    loop {
        match decoder.decode(&mut buf).map_err(|e| e.to_string())? {
            Step::Frame(f) => match f.into_data() {
                Ok(d) => body.extend_from_slice(&d),
                Err(f) => trailers += f.into_trailers().map_or(0, |t| t.len()),
            },
            Step::End => break,
            Step::NeedMore => match pieces.next() {
                Some(p) => buf.extend_from_slice(p),
                None if decoder == BodyFraming::UntilClose => break,
                None => return Err(Error::Incomplete.to_string()),
            },
        }
    }
    Ok(ReadAnswer {
        status: answer.parts.status.as_u16(),
        body,
        trailers,
        reusable: answer.reusable
            && decoder == BodyFraming::Done
            && buf.is_empty()
            && pieces.next().is_none(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Body data, trailers, and the bytes left after the body.
    type Decoded = (Vec<u8>, Option<HeaderMap>, Vec<u8>);

    /// Feeds `wire` to a decoder in pieces cut at `cuts`, as reads would
    /// deliver it; returns the data, the trailers and what was left unread.
    fn decode_in_pieces(
        mut decoder: BodyFraming,
        wire: &[u8],
        cuts: &[usize],
    ) -> Result<Decoded, Error> {
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c % (wire.len() + 1)).collect();
        cuts.push(wire.len());
        cuts.sort_unstable();
        let (mut data, mut trailers) = (Vec::new(), None);
        let mut buf = BytesMut::new();
        let mut fed = 0;
        let mut cuts = cuts.into_iter();
        loop {
            match decoder.decode(&mut buf)? {
                Step::Frame(f) => match f.into_data() {
                    Ok(d) => data.extend_from_slice(&d),
                    Err(f) => trailers = f.into_trailers().ok(),
                },
                Step::End => return Ok((data, trailers, buf.to_vec())),
                Step::NeedMore => {
                    let Some(to) = cuts.next() else {
                        return Err(Error::Incomplete);
                    };
                    buf.extend_from_slice(&wire[fed..to]);
                    fed = to;
                }
            }
        }
    }

    proptest! {
        #[test]
        fn chunked_bodies_decode_whatever_the_reads(
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..300), 0..8),
            ext in proptest::option::of("[a-z]{1,8}=[a-z0-9]{0,8}"),
            trailer in proptest::option::of("[a-z]{1,10}"),
            cuts in proptest::collection::vec(any::<usize>(), 0..12),
        ) {
            let mut wire = Vec::new();
            for c in &chunks {
                wire.extend_from_slice(format!("{:X}", c.len()).as_bytes());
                if let Some(e) = &ext {
                    wire.extend_from_slice(format!(" ;{e}").as_bytes());
                }
                wire.extend_from_slice(b"\r\n");
                wire.extend_from_slice(c);
                wire.extend_from_slice(b"\r\n");
            }
            wire.extend_from_slice(b"0\r\n");
            if let Some(t) = &trailer {
                wire.extend_from_slice(format!("x-{t}: v\r\n").as_bytes());
            }
            wire.extend_from_slice(b"\r\nNEXT");
            let (data, trailers, rest) =
                decode_in_pieces(BodyFraming::Chunked(Chunk::Size), &wire, &cuts).unwrap();
            prop_assert_eq!(data, chunks.concat());
            prop_assert_eq!(trailers.map(|t| t.len()), trailer.map(|_| 1));
            // The decoder never reads past the body's end.
            prop_assert!(b"NEXT".starts_with(&rest), "{:?}", rest);
        }

        #[test]
        fn length_bodies_stop_at_their_length(
            body in proptest::collection::vec(any::<u8>(), 1..2000),
            cuts in proptest::collection::vec(any::<usize>(), 0..12),
        ) {
            let mut wire = body.clone();
            wire.extend_from_slice(b"NEXT");
            let (data, _, rest) =
                decode_in_pieces(BodyFraming::Length(body.len() as u64), &wire, &cuts).unwrap();
            prop_assert_eq!(data, body);
            prop_assert!(b"NEXT".starts_with(&rest), "{:?}", rest);
        }
    }

    #[test]
    fn answers_read_the_same_however_reads_cut_them() {
        // Status, body, trailer fields, reusable.
        type Outcome = Result<(u16, &'static [u8], usize, bool), &'static str>;
        let cases: [(&[u8], bool, Outcome); 11] = [
            (b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello", false, Ok((200, b"hello", 0, true))),
            (
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;a=b\r\nhello\r\n0\r\nx-t: 1\r\n\r\n",
                false,
                Ok((200, b"hello", 1, true)),
            ),
            (b"HTTP/1.0 200 OK\r\n\r\nuntil close", false, Ok((200, b"until close", 0, false))),
            (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\n", true, Ok((200, b"", 0, true))),
            (b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhel", false, Err("upstream answer cut short")),
            (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokEXTRA", false, Ok((200, b"ok", 0, false))),
            // Both framings: read as chunked, the connection not reused.
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 99\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
                false,
                Ok((200, b"ok", 0, false)),
            ),
            // A transfer coding other than chunked last: until the close.
            (b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\nzz", false, Ok((200, b"zz", 0, false))),
            // No body after HEAD, 204 or a zero length, whatever the head says.
            (b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n", true, Ok((200, b"", 0, true))),
            (b"HTTP/1.1 204 No Content\r\n\r\n", false, Ok((204, b"", 0, true))),
            (b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n", false, Ok((200, b"", 0, true))),
        ];
        for (wire, head, expected) in cases {
            for piece in [1, 2, 3, 7, 64, usize::MAX] {
                let got = read_answer(wire, piece, head)
                    .map(|a| (a.status, a.body, a.trailers, a.reusable));
                let want = expected
                    .map(|(s, b, t, r)| (s, b.to_vec(), t, r))
                    .map_err(str::to_string);
                assert_eq!(
                    got,
                    want,
                    "{:?} in pieces of {piece}",
                    String::from_utf8_lossy(wire)
                );
            }
        }
        // A head over the limit is refused whether it came at once or not.
        let big = format!(
            "HTTP/1.1 200 OK\r\nx: {}\r\ncontent-length: 0\r\n\r\n",
            "a".repeat(MAX_HEAD)
        );
        for piece in [1000, usize::MAX] {
            assert!(
                read_answer(big.as_bytes(), piece, false).is_err(),
                "{piece}"
            );
        }
    }

    #[test]
    fn chunk_size_lines_are_hex_and_strict() {
        let mut b = [0u8; 18];
        assert_eq!(chunk_size_line(0, &mut b), b"0\r\n");
        assert_eq!(chunk_size_line(5000, &mut b), b"1388\r\n");
        assert_eq!(chunk_size_line(usize::MAX, &mut b), b"ffffffffffffffff\r\n");
        assert_eq!(parse_chunk_size(b"1388\r").unwrap(), 5000);
        assert_eq!(parse_chunk_size(b"A ; name=\"v\"\r").unwrap(), 10);
        for bad in [
            &b"\r"[..],
            b"1388",
            b"-1\r",
            b"0x10\r",
            b"1 2\r",
            b"10000000000000000\r",
        ] {
            assert!(parse_chunk_size(bad).is_err(), "{bad:?}");
        }
    }
}
