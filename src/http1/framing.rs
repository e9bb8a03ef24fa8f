//! The request-head checker behind [`FramingGuard`](super::guard::FramingGuard),
//! independent of I/O: it holds back each request head until it is
//! complete, judges its framing headers, and follows bodies (fixed length
//! or chunked) to find the next head on a keep-alive connection.

/// What hyper is given instead of a head with conflicting framing: not a
/// request line, so hyper answers 400 Bad Request and closes.
pub(super) const POISON: &[u8] = b"\x00BAD-FRAMING\r\n\r\n";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Collecting a request head.
    Head,
    /// Inside a fixed-length body: bytes left.
    Body(u64),
    /// Inside a chunked body.
    Chunked(Chunk),
    /// Not inspecting any more (HTTP/2, an oversized head, framing hyper will
    /// refuse itself).
    Passthrough,
    /// A poisoned head was handed over; nothing more is read.
    Poisoned,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Reading a chunk-size line (hex digits, then an optional extension).
    Size {
        value: u64,
        digits: u8,
        in_ext: bool,
    },
    /// Chunk data bytes left, then CRLF.
    Data(u64),
    /// The CRLF after chunk data (bytes of it left).
    DataEnd(u8),
    /// Trailer section: `line_len` bytes into the current line.
    Trailer { line_len: usize },
}

/// The request-head checker, independent of I/O (unit-tested directly).
#[derive(Debug)]
pub struct Framing {
    state: State,
    head: Vec<u8>,
    head_limit: usize,
}

impl Framing {
    /// A checker that stops inspecting heads longer than `head_limit`.
    pub fn new(head_limit: usize) -> Framing {
        Framing {
            state: State::Head,
            head: Vec::new(),
            head_limit,
        }
    }

    /// True once a conflicting head was found.
    pub fn poisoned(&self) -> bool {
        self.state == State::Poisoned
    }

    /// True while part of a head is held back.
    pub(super) fn holding_head(&self) -> bool {
        self.state == State::Head && !self.head.is_empty()
    }

    /// True while the next bytes are (part of) a request head.
    pub(super) fn reading_head(&self) -> bool {
        self.state == State::Head
    }

    /// True when bytes may go straight to hyper without inspection.
    pub(super) fn passthrough(&self) -> bool {
        self.state == State::Passthrough && self.head.is_empty()
    }

    /// Moves a held-back partial head to `out` (the client ended the
    /// connection inside it: hyper judges what there is).
    pub(super) fn hand_over_head(&mut self, out: &mut Vec<u8>) {
        out.append(&mut self.head);
    }

    /// Lets go of the head buffer's memory (it must be empty).
    pub(super) fn release(&mut self) {
        debug_assert!(self.head.is_empty());
        self.head = Vec::new();
    }

    /// Feeds bytes read from the client; appends to `out` what hyper may see.
    pub fn feed(&mut self, mut data: &[u8], out: &mut Vec<u8>) {
        while !data.is_empty() {
            // The usual case, a whole head in one read: judged where it lies,
            // without holding it back in `head`.
            if self.state == State::Head
                && self.head.is_empty()
                && let Some(end) = head_end(data, 0)
            {
                self.state = self.judge(&data[..end]);
                if self.state == State::Poisoned {
                    out.extend_from_slice(POISON);
                    return;
                }
                out.extend_from_slice(&data[..end]);
                data = &data[end..];
                continue;
            }
            match self.state {
                State::Passthrough => {
                    out.append(&mut self.head);
                    out.extend_from_slice(data);
                    return;
                }
                State::Poisoned => return,
                State::Head => {
                    let before = self.head.len();
                    self.head.extend_from_slice(data);
                    match head_end(&self.head, before.saturating_sub(3)) {
                        None => {
                            if self.head.len() > self.head_limit {
                                // hyper will answer 431; nothing to check.
                                self.state = State::Passthrough;
                                out.append(&mut self.head);
                            }
                            return;
                        }
                        Some(end) => {
                            let rest = self.head.split_off(end);
                            let head = std::mem::take(&mut self.head);
                            self.state = self.judge(&head);
                            if self.state == State::Poisoned {
                                out.extend_from_slice(POISON);
                                return;
                            }
                            out.extend_from_slice(&head);
                            // Continue with what followed the head.
                            return self.feed_owned(rest, out);
                        }
                    }
                }
                State::Body(left) => {
                    let n = (left.min(data.len() as u64)) as usize;
                    out.extend_from_slice(&data[..n]);
                    data = &data[n..];
                    self.state = if left - n as u64 == 0 {
                        State::Head
                    } else {
                        State::Body(left - n as u64)
                    };
                }
                State::Chunked(chunk) => {
                    let (used, next) = step_chunked(chunk, data);
                    out.extend_from_slice(&data[..used]);
                    data = &data[used..];
                    self.state = next;
                }
            }
        }
    }

    fn feed_owned(&mut self, rest: Vec<u8>, out: &mut Vec<u8>) {
        if !rest.is_empty() {
            self.feed(&rest, out);
        }
    }

    /// Decides what follows a complete head.
    fn judge(&self, head: &[u8]) -> State {
        if head.starts_with(b"PRI * HTTP/2.0") {
            return State::Passthrough;
        }
        let mut lengths: Vec<&[u8]> = Vec::new();
        let mut encodings: Vec<&[u8]> = Vec::new();
        for line in lines(head).skip(1) {
            // Only two names matter; most lines are ruled out by their first
            // byte (whitespace kept: a folded line is judged like the rest).
            if !matches!(line.first(), Some(b'c' | b'C' | b't' | b'T' | b' ' | b'\t')) {
                continue;
            }
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let Some(colon) = line.iter().position(|b| *b == b':') else {
                continue;
            };
            // hyper refuses space before the colon anyway; treat it as the
            // header it pretends to be.
            let name = trim(&line[..colon]);
            let value = trim(&line[colon + 1..]);
            if name.eq_ignore_ascii_case(b"content-length") {
                lengths.push(value);
            } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                encodings.push(value);
            }
        }
        if !lengths.is_empty() && !encodings.is_empty() {
            return State::Poisoned;
        }
        if let Some(last) = encodings.last() {
            return if super::chunked_is_last(last) {
                State::Chunked(Chunk::Size {
                    value: 0,
                    digits: 0,
                    in_ext: false,
                })
            } else {
                // hyper refuses a request body that is not chunked last.
                State::Passthrough
            };
        }
        let Some(first) = lengths.first() else {
            return State::Head;
        };
        match super::content_length(first) {
            // Differing or malformed lengths: hyper answers 400 itself.
            Some(n) if lengths.iter().all(|l| super::content_length(l) == Some(n)) => {
                if n == 0 {
                    State::Head
                } else {
                    State::Body(n)
                }
            }
            _ => State::Passthrough,
        }
    }
}

/// The `\n`-separated lines of a head (memchr, not a byte-by-byte split).
fn lines(head: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = head;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let (line, tail) = match memchr::memchr(b'\n', rest) {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, &rest[rest.len()..]),
        };
        rest = tail;
        Some(line)
    })
}

fn trim(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &v[start..end.max(start)]
}

/// The end of a head (just past its empty line), searching from `from`;
/// accepts CRLF and bare LF line ends, as the HTTP parser does.
fn head_end(buf: &[u8], from: usize) -> Option<usize> {
    // Leading empty lines before a request line are skipped by hyper.
    for i in memchr::memchr_iter(b'\n', buf.get(from..)?).map(|i| i + from) {
        // Empty line: "\n\n" or "\n\r\n" — but not at the very start.
        if i > 0 {
            if buf.get(i + 1) == Some(&b'\n') {
                return Some(i + 2);
            }
            if buf.get(i + 1) == Some(&b'\r') && buf.get(i + 2) == Some(&b'\n') {
                return Some(i + 3);
            }
        }
    }
    None
}

/// Advances the chunked-body machine over `data`; returns bytes consumed and
/// the next state.
fn step_chunked(mut chunk: Chunk, data: &[u8]) -> (usize, State) {
    let mut i = 0;
    while i < data.len() {
        let b = data[i];
        match chunk {
            Chunk::Size {
                value,
                digits,
                in_ext,
            } => {
                i += 1;
                match b {
                    b'\n' => {
                        if digits == 0 {
                            return (i, State::Passthrough);
                        }
                        chunk = if value == 0 {
                            Chunk::Trailer { line_len: 0 }
                        } else {
                            Chunk::Data(value)
                        };
                    }
                    b'\r' => {}
                    b';' => {
                        chunk = Chunk::Size {
                            value,
                            digits,
                            in_ext: true,
                        }
                    }
                    _ if in_ext => {}
                    _ => {
                        let Some(d) = (b as char).to_digit(16) else {
                            // Whitespace or garbage: hyper decides.
                            return (i, State::Passthrough);
                        };
                        let Some(v) = value.checked_mul(16).and_then(|v| v.checked_add(d.into()))
                        else {
                            return (i, State::Passthrough);
                        };
                        chunk = Chunk::Size {
                            value: v,
                            digits: digits.saturating_add(1),
                            in_ext: false,
                        };
                    }
                }
            }
            Chunk::Data(left) => {
                let n = left.min((data.len() - i) as u64);
                i += n as usize;
                chunk = if left == n {
                    Chunk::DataEnd(2)
                } else {
                    Chunk::Data(left - n)
                };
            }
            Chunk::DataEnd(left) => {
                i += 1;
                chunk = match (b, left) {
                    (b'\r', 2) => Chunk::DataEnd(1),
                    (b'\n', _) => Chunk::Size {
                        value: 0,
                        digits: 0,
                        in_ext: false,
                    },
                    _ => return (i, State::Passthrough),
                };
            }
            Chunk::Trailer { line_len } => {
                i += 1;
                match b {
                    b'\n' if line_len == 0 => return (i, State::Head),
                    b'\n' => chunk = Chunk::Trailer { line_len: 0 },
                    b'\r' => {}
                    _ => {
                        chunk = Chunk::Trailer {
                            line_len: line_len + 1,
                        }
                    }
                }
            }
        }
    }
    (i, State::Chunked(chunk))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(input: &[u8], chunk: usize) -> (Vec<u8>, bool) {
        let mut f = Framing::new(65536);
        let mut out = Vec::new();
        for piece in input.chunks(chunk.max(1)) {
            f.feed(piece, &mut out);
        }
        out.append(&mut f.head);
        (out, f.poisoned())
    }

    #[test]
    fn ordinary_traffic_passes_unchanged_in_any_chunking() {
        let pipelined: &[u8] = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n\
POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n0\r\nX-Trailer: 1\r\n\r\n\
GET /d HTTP/1.1\r\nHost: x\r\n\r\n";
        for chunk in [1, 2, 3, 7, 64, 4096] {
            let (out, poisoned) = run(pipelined, chunk);
            assert!(!poisoned, "chunk {chunk}");
            assert_eq!(out, pipelined, "chunk {chunk}");
        }
    }

    #[test]
    fn conflicting_framing_is_poisoned() {
        let cases: &[&[u8]] = &[
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: x\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\nHost: x\nContent-Length: 4\nTransfer-Encoding: chunked\n\n",
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length : 4\r\nTransfer-Encoding:chunked\r\n\r\n",
        ];
        for case in cases {
            for chunk in [1, 5, 4096] {
                let (out, poisoned) = run(case, chunk);
                assert!(poisoned, "{}", String::from_utf8_lossy(case));
                assert_eq!(out, POISON);
            }
        }
        // Smuggled in the second request of a keep-alive connection.
        let second: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\n\r\nPOST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n";
        let (out, poisoned) = run(second, 3);
        assert!(poisoned);
        assert!(out.starts_with(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"));
        assert!(out.ends_with(POISON));
    }

    #[test]
    fn a_body_is_not_mistaken_for_a_head() {
        // The body looks like a smuggled request; it is data, not a head.
        let req: &[u8] = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 60\r\n\r\nGET / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: x\r\n\r\n";
        let (out, poisoned) = run(req, 4);
        assert!(!poisoned);
        assert_eq!(out, req);
    }

    #[test]
    fn http2_and_oversized_heads_pass_through() {
        let preface: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00";
        let (out, poisoned) = run(preface, 3);
        assert!(!poisoned);
        assert_eq!(out, preface);
        let mut f = Framing::new(100);
        let mut out = Vec::new();
        let big = vec![b'a'; 500];
        f.feed(b"GET / HTTP/1.1\r\nX: ", &mut out);
        f.feed(&big, &mut out);
        assert!(f.passthrough());
        assert_eq!(out.len(), 19 + 500);
    }
}
