//! Streaming content codings the proxy can look inside: gzip, deflate, br.
//!
//! Bodies are decoded chunk by chunk, inspected or scrubbed, and re-encoded
//! with the same coding, so the client still gets compression and the proxy
//! never holds a whole body. Each encoder flush emits a complete block, so a
//! scrubbed chunk reaches the client without waiting for the next one.

use std::cell::RefCell;
use std::io::{self, Read, Write};

use http::HeaderMap;
use http::header::CONTENT_ENCODING;

/// A content coding the proxy can decode and re-encode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coding {
    /// No coding.
    Identity,
    /// `gzip` / `x-gzip`.
    Gzip,
    /// `deflate` (zlib-wrapped, or raw as some servers send it).
    Deflate,
    /// `br`.
    Brotli,
}

/// Codings the proxy advertises upstream, in `Accept-Encoding` syntax.
pub const SUPPORTED: &[&str] = &["gzip", "x-gzip", "deflate", "br", "identity"];

impl Coding {
    /// The coding of a response; `None` for one the proxy cannot decode
    /// (several stacked codings, or an unknown one).
    pub fn of(headers: &HeaderMap) -> Option<Coding> {
        let mut values = headers.get_all(CONTENT_ENCODING).iter();
        let Some(first) = values.next() else {
            return Some(Coding::Identity);
        };
        if values.next().is_some() {
            return None;
        }
        let v = first.to_str().ok()?.trim();
        if v.contains(',') {
            return None;
        }
        match v.to_ascii_lowercase().as_str() {
            "" | "identity" => Some(Coding::Identity),
            "gzip" | "x-gzip" => Some(Coding::Gzip),
            "deflate" => Some(Coding::Deflate),
            "br" => Some(Coding::Brotli),
            _ => None,
        }
    }
}

/// Decodes a body pushed in pieces.
pub enum Decoder {
    /// Pass-through.
    Identity,
    /// gzip.
    Gzip(Box<flate2::write::GzDecoder<Vec<u8>>>),
    /// deflate, wrapper not yet known (needs the first two bytes).
    DeflatePending(Vec<u8>),
    /// zlib-wrapped deflate.
    Zlib(Box<flate2::write::ZlibDecoder<Vec<u8>>>),
    /// raw deflate.
    Raw(Box<flate2::write::DeflateDecoder<Vec<u8>>>),
    /// brotli.
    Brotli(Box<brotli::DecompressorWriter<Vec<u8>>>),
}

impl Decoder {
    /// A decoder for `coding`.
    pub fn new(coding: Coding) -> Decoder {
        match coding {
            Coding::Identity => Decoder::Identity,
            Coding::Gzip => Decoder::Gzip(Box::new(flate2::write::GzDecoder::new(Vec::new()))),
            Coding::Deflate => Decoder::DeflatePending(Vec::new()),
            Coding::Brotli => {
                Decoder::Brotli(Box::new(brotli::DecompressorWriter::new(Vec::new(), 8192)))
            }
        }
    }

    /// Feeds encoded bytes; returns what could be decoded so far.
    pub fn push(&mut self, data: &[u8]) -> io::Result<Vec<u8>> {
        match self {
            Decoder::Identity => Ok(data.to_vec()),
            Decoder::Gzip(d) => {
                d.write_all(data)?;
                Ok(std::mem::take(d.get_mut()))
            }
            Decoder::DeflatePending(head) => {
                head.extend_from_slice(data);
                if head.len() < 2 {
                    return Ok(Vec::new());
                }
                let head = std::mem::take(head);
                // RFC 1950: CM = 8 in the low nibble and the header checksum.
                let zlib =
                    head[0] & 0x0f == 8 && (u16::from(head[0]) << 8 | u16::from(head[1])) % 31 == 0;
                *self = if zlib {
                    Decoder::Zlib(Box::new(flate2::write::ZlibDecoder::new(Vec::new())))
                } else {
                    Decoder::Raw(Box::new(flate2::write::DeflateDecoder::new(Vec::new())))
                };
                self.push(&head)
            }
            Decoder::Zlib(d) => {
                d.write_all(data)?;
                Ok(std::mem::take(d.get_mut()))
            }
            Decoder::Raw(d) => {
                d.write_all(data)?;
                Ok(std::mem::take(d.get_mut()))
            }
            Decoder::Brotli(d) => {
                d.write_all(data)?;
                Ok(std::mem::take(d.get_mut()))
            }
        }
    }

    /// Ends the stream; returns the remaining decoded bytes.
    pub fn finish(self) -> io::Result<Vec<u8>> {
        match self {
            Decoder::Identity => Ok(Vec::new()),
            Decoder::Gzip(d) => d.finish(),
            Decoder::DeflatePending(head) if head.is_empty() => Ok(Vec::new()),
            Decoder::DeflatePending(head) => {
                let mut d = flate2::write::DeflateDecoder::new(Vec::new());
                d.write_all(&head)?;
                d.finish()
            }
            Decoder::Zlib(d) => d.finish(),
            Decoder::Raw(d) => d.finish(),
            Decoder::Brotli(d) => d
                .into_inner()
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "truncated brotli stream")),
        }
    }
}

/// Encodes a body pushed in pieces.
pub enum Encoder {
    /// Pass-through.
    Identity,
    /// gzip.
    Gzip(Box<flate2::write::GzEncoder<Vec<u8>>>),
    /// zlib-wrapped deflate.
    Zlib(Box<flate2::write::ZlibEncoder<Vec<u8>>>),
    /// brotli.
    Brotli(Box<brotli::CompressorWriter<Vec<u8>>>),
}

/// Compression effort: the proxy re-encodes on the hot path, so fast wins.
const LEVEL: u32 = 3;

impl Encoder {
    /// An encoder for `coding`.
    pub fn new(coding: Coding) -> Encoder {
        let level = flate2::Compression::new(LEVEL);
        match coding {
            Coding::Identity => Encoder::Identity,
            Coding::Gzip => {
                Encoder::Gzip(Box::new(flate2::write::GzEncoder::new(Vec::new(), level)))
            }
            Coding::Deflate => {
                Encoder::Zlib(Box::new(flate2::write::ZlibEncoder::new(Vec::new(), level)))
            }
            Coding::Brotli => Encoder::Brotli(Box::new(brotli::CompressorWriter::new(
                Vec::new(),
                8192,
                LEVEL,
                20,
            ))),
        }
    }

    /// Feeds plain bytes; returns a flushed block of encoded output.
    pub fn push(&mut self, data: &[u8]) -> io::Result<Vec<u8>> {
        if data.is_empty() {
            return Ok(Vec::new());
        }
        match self {
            Encoder::Identity => Ok(data.to_vec()),
            Encoder::Gzip(e) => {
                e.write_all(data)?;
                e.flush()?;
                Ok(std::mem::take(e.get_mut()))
            }
            Encoder::Zlib(e) => {
                e.write_all(data)?;
                e.flush()?;
                Ok(std::mem::take(e.get_mut()))
            }
            Encoder::Brotli(e) => {
                e.write_all(data)?;
                e.flush()?;
                Ok(std::mem::take(e.get_mut()))
            }
        }
    }

    /// Ends the stream; returns the trailing encoded bytes.
    pub fn finish(self) -> io::Result<Vec<u8>> {
        match self {
            Encoder::Identity => Ok(Vec::new()),
            Encoder::Gzip(e) => e.finish(),
            Encoder::Zlib(e) => e.finish(),
            Encoder::Brotli(e) => Ok(e.into_inner()),
        }
    }
}

/// Decodes a complete (small) body, refusing to produce more than `limit`
/// bytes.
pub fn decode_all(coding: Coding, data: &[u8], limit: usize) -> io::Result<Vec<u8>> {
    if coding == Coding::Gzip {
        return gunzip(data, limit);
    }
    let mut d = Decoder::new(coding);
    let mut out = Vec::new();
    for piece in data.chunks(4096) {
        out.extend(d.push(piece)?);
        if out.len() > limit {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "decoded body too large",
            ));
        }
    }
    out.extend(d.finish()?);
    if out.len() > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "decoded body too large",
        ));
    }
    Ok(out)
}

type Gunzip = flate2::bufread::GzDecoder<io::Cursor<Vec<u8>>>;

thread_local! {
    /// Each thread's decoder for whole gzip bodies, reset for the next one.
    /// Building a decoder allocates and zeroes about 15 KB of inflate state,
    /// which cost as much as inflating a small gzip answer (callgrind: 15.7 k
    /// of 52 k instructions per decode); a reset keeps that state.
    static GUNZIP: RefCell<Option<Gunzip>> = const { RefCell::new(None) };
}

/// Decodes one whole gzip member, refusing more than `limit` decoded bytes,
/// a truncated or corrupt member, and anything after it (a second member
/// would otherwise go unread).
fn gunzip(data: &[u8], limit: usize) -> io::Result<Vec<u8>> {
    let invalid = |msg: &'static str| io::Error::new(io::ErrorKind::InvalidData, msg);
    GUNZIP.with_borrow_mut(|slot| {
        let input = io::Cursor::new(data.to_vec());
        let d = match slot {
            Some(d) => {
                d.reset(input);
                d
            }
            None => slot.insert(flate2::bufread::GzDecoder::new(input)),
        };
        let mut out = Vec::with_capacity(limit.saturating_add(1).min((data.len() * 8).max(4096)));
        let read = Read::take(&mut *d, limit as u64 + 1).read_to_end(&mut out);
        let rest = d.get_ref().get_ref().len() as u64 - d.get_ref().position();
        // The body is not kept on the thread after its request.
        *d.get_mut() = io::Cursor::new(Vec::new());
        read?;
        if out.len() > limit {
            return Err(invalid("decoded body too large"));
        }
        if rest != 0 {
            return Err(invalid("data after the gzip member"));
        }
        Ok(out)
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Encodes `data` in one go (test helper).
    pub fn encode_all(coding: Coding, data: &[u8]) -> Vec<u8> {
        let mut e = Encoder::new(coding);
        let mut out = e.push(data).unwrap();
        out.extend(e.finish().unwrap());
        out
    }

    #[test]
    fn round_trips_in_small_pieces() {
        let text: Vec<u8> = (0..20_000u32)
            .flat_map(|i| format!("{{\"n\":{i}}},").into_bytes())
            .collect();
        for coding in [
            Coding::Identity,
            Coding::Gzip,
            Coding::Deflate,
            Coding::Brotli,
        ] {
            let encoded = encode_all(coding, &text);
            let mut d = Decoder::new(coding);
            let mut out = Vec::new();
            for piece in encoded.chunks(7) {
                out.extend(d.push(piece).unwrap());
            }
            out.extend(d.finish().unwrap());
            assert_eq!(out, text, "{coding:?}");
        }
    }

    #[test]
    fn raw_deflate_is_accepted() {
        let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(b"raw deflate body").unwrap();
        let raw = e.finish().unwrap();
        assert_eq!(
            decode_all(Coding::Deflate, &raw, 1000).unwrap(),
            b"raw deflate body"
        );
    }

    #[test]
    fn a_whole_gzip_body_is_exactly_one_intact_member() {
        let a = encode_all(Coding::Gzip, br#"{"a":1}"#);
        let b = encode_all(Coding::Gzip, br#"{"token":"SECRET"}"#);
        assert_eq!(decode_all(Coding::Gzip, &a, 1000).unwrap(), br#"{"a":1}"#);
        let two_members = [&a[..], &b[..]].concat();
        let trailing = [&a[..], b"garbage"].concat();
        let truncated = &a[..a.len() - 3];
        let mut bad_crc = a.clone();
        let n = bad_crc.len();
        bad_crc[n - 6] ^= 1;
        let not_gzip = br#"{"a":1}"#;
        for (what, body) in [
            ("two members", &two_members[..]),
            ("trailing bytes", &trailing[..]),
            ("truncated", truncated),
            ("bad checksum", &bad_crc[..]),
            ("not gzip", &not_gzip[..]),
            ("empty", &[][..]),
        ] {
            assert!(decode_all(Coding::Gzip, body, 1000).is_err(), "{what}");
        }
    }

    #[test]
    fn the_reused_gzip_decoder_starts_afresh_for_each_body() {
        let bodies: Vec<Vec<u8>> = (0..4)
            .map(|i| format!(r#"{{"n":{i},"pad":"{}"}}"#, "x".repeat(i * 3000)).into_bytes())
            .collect();
        let corrupt = {
            let mut c = encode_all(Coding::Gzip, &bodies[3]);
            c.truncate(c.len() / 2);
            c
        };
        for round in 0..2 {
            for body in &bodies {
                let enc = encode_all(Coding::Gzip, body);
                assert_eq!(&decode_all(Coding::Gzip, &enc, 1 << 20).unwrap(), body);
                // A failure halfway, and one over the limit, leave nothing behind.
                assert!(decode_all(Coding::Gzip, &corrupt, 1 << 20).is_err());
                assert!(decode_all(Coding::Gzip, &enc, 10).is_err(), "round {round}");
            }
        }
    }

    #[test]
    fn decode_all_enforces_its_limit() {
        let big = encode_all(Coding::Gzip, &vec![b'a'; 100_000]);
        assert!(decode_all(Coding::Gzip, &big, 10_000).is_err());
    }

    #[test]
    fn codings_from_headers() {
        let mut h = HeaderMap::new();
        assert_eq!(Coding::of(&h), Some(Coding::Identity));
        h.insert(CONTENT_ENCODING, "GZIP".parse().unwrap());
        assert_eq!(Coding::of(&h), Some(Coding::Gzip));
        h.insert(CONTENT_ENCODING, "gzip, br".parse().unwrap());
        assert_eq!(Coding::of(&h), None);
        h.insert(CONTENT_ENCODING, "zstd".parse().unwrap());
        assert_eq!(Coding::of(&h), None);
    }
}
