//! Strict HTTP/1.1 request framing, checked before hyper sees a request.
//!
//! hyper follows RFC 9112 leniently: a request with both `Content-Length`
//! and `Transfer-Encoding` is accepted with the length dropped. The proxy answers
//! 400 and a closed connection instead — such a request is a smuggling
//! attempt against whatever sits in front of or behind the proxy. So HTTP/1
//! connections read through [`FramingGuard`]: it holds back each request head
//! until it is complete, checks the framing headers, and then either passes
//! the head on unchanged or replaces it with a line hyper refuses (hyper
//! answers 400 and closes). It follows bodies (fixed length or chunked) to
//! find the next head on a keep-alive connection; anything it does not
//! understand is passed through untouched for hyper to judge.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::idle::IdleTimer;
pub use super::idle::{Activity, Busy};
use tokio::time::Sleep;

/// What hyper is given instead of a head with conflicting framing: not a
/// request line, so hyper answers 400 Bad Request and closes.
const POISON: &[u8] = b"\x00BAD-FRAMING\r\n\r\n";

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
    fn holding_head(&self) -> bool {
        self.state == State::Head && !self.head.is_empty()
    }

    /// True while the next bytes are (part of) a request head.
    fn reading_head(&self) -> bool {
        self.state == State::Head
    }

    /// True when bytes may go straight to hyper without inspection.
    fn passthrough(&self) -> bool {
        self.state == State::Passthrough && self.head.is_empty()
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

/// An I/O wrapper that applies [`Framing`] to what it reads.
///
/// Because hyper sees a head only once it is complete, hyper's own
/// header-read timer cannot see a slow head either; the guard enforces
/// `head_timeout` itself, from the first byte of a head to its end.
pub struct FramingGuard<IO> {
    io: IO,
    framing: Framing,
    ready: Vec<u8>,
    pos: usize,
    head_timeout: Duration,
    deadline: Option<Pin<Box<Sleep>>>,
    idle: Option<IdleTimer>,
}

impl<IO> FramingGuard<IO> {
    /// Wraps a connection; heads longer than `head_limit` are not checked
    /// (hyper refuses them with 431); a head must arrive within
    /// `head_timeout` of its first byte.
    pub fn new(io: IO, head_limit: usize, head_timeout: Duration) -> Self {
        FramingGuard {
            io,
            framing: Framing::new(head_limit),
            ready: Vec::new(),
            pos: 0,
            head_timeout,
            deadline: None,
            idle: None,
        }
    }

    /// Also closes the connection once it has had no request in progress
    /// (per `activity`) and no complete head for `timeout`. Must be called
    /// within a tokio runtime.
    pub fn with_idle_timeout(mut self, activity: Arc<Activity>, timeout: Duration) -> Self {
        self.idle = Some(IdleTimer {
            activity,
            timeout,
            sleep: Box::pin(tokio::time::sleep(timeout)),
        });
        self
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for FramingGuard<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.pos < this.ready.len() {
                let n = (this.ready.len() - this.pos).min(buf.remaining());
                buf.put_slice(&this.ready[this.pos..this.pos + n]);
                this.pos += n;
                if this.pos == this.ready.len() {
                    this.ready.clear();
                    this.pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.framing.poisoned() {
                // EOF after the poisoned head.
                return Poll::Ready(Ok(()));
            }
            if this.framing.passthrough() {
                return Pin::new(&mut this.io).poll_read(cx, buf);
            }
            // Read into the caller's buffer, judge what arrived, and put
            // back what hyper may see. No read buffer of the guard's own:
            // 8 KiB held by every idle connection was a fifth of its memory.
            if buf.remaining() == 0 {
                // No room: a read of nothing, not an end of stream (which
                // would hand over a partial head unjudged).
                return Poll::Ready(Ok(()));
            }
            let before = buf.filled().len();
            match Pin::new(&mut this.io).poll_read(cx, buf) {
                Poll::Pending => {
                    if let Some(d) = this.deadline.as_mut()
                        && d.as_mut().poll(cx).is_ready()
                    {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "request head not complete in time",
                        )));
                    }
                    // Idle time counts until a head is complete, as
                    // hyper's own timer did: a head begun late in the idle
                    // period does not get the full time again.
                    if this.framing.reading_head()
                        && let Some(idle) = this.idle.as_mut()
                        && idle.expired(cx)
                    {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "connection idle",
                        )));
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    let n = buf.filled().len() - before;
                    if n == 0 {
                        // EOF: hand over whatever partial head there is.
                        this.ready.append(&mut this.framing.head);
                        if this.ready.is_empty() {
                            return Poll::Ready(Ok(()));
                        }
                        continue;
                    }
                    this.framing.feed(&buf.filled()[before..], &mut this.ready);
                    buf.set_filled(before);
                    // A head is pending: time it from its first byte.
                    if this.framing.holding_head() {
                        if this.deadline.is_none() {
                            this.deadline = Some(Box::pin(tokio::time::sleep(this.head_timeout)));
                        }
                    } else {
                        this.deadline = None;
                    }
                }
            }
        }
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for FramingGuard<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads from a guard over a silent peer until it fails or `wait`
    /// passes (paused clock): the error kind, if any.
    async fn silent_read(
        guard: &mut FramingGuard<tokio::io::DuplexStream>,
        wait: Duration,
    ) -> Option<io::ErrorKind> {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 16];
        match tokio::time::timeout(wait, guard.read(&mut buf)).await {
            Err(_) => None,
            Ok(Ok(n)) => panic!("read {n} bytes from a silent peer"),
            Ok(Err(e)) => Some(e.kind()),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_times_out_and_a_busy_one_does_not() {
        let timeout = Duration::from_secs(10);
        let (_peer, io) = tokio::io::duplex(1024);
        let activity = Activity::new();
        let mut guard =
            FramingGuard::new(io, 1024, timeout).with_idle_timeout(Arc::clone(&activity), timeout);
        // Idle from the start: open until the timeout, closed at it.
        assert_eq!(silent_read(&mut guard, Duration::from_secs(9)).await, None);
        assert_eq!(
            silent_read(&mut guard, Duration::from_secs(2)).await,
            Some(io::ErrorKind::TimedOut)
        );

        let (_peer, io) = tokio::io::duplex(1024);
        let activity = Activity::new();
        let mut guard =
            FramingGuard::new(io, 1024, timeout).with_idle_timeout(Arc::clone(&activity), timeout);
        // A request in progress for 35 s: never idle meanwhile.
        let busy = activity.begin();
        assert_eq!(silent_read(&mut guard, Duration::from_secs(35)).await, None);
        // Idle from its end: the full timeout again, not what is left of it.
        drop(busy);
        assert_eq!(silent_read(&mut guard, Duration::from_secs(9)).await, None);
        assert_eq!(
            silent_read(&mut guard, Duration::from_secs(2)).await,
            Some(io::ErrorKind::TimedOut)
        );

        // A head begun late in the idle period must still be complete by its
        // end (not get a full head timeout of its own from its first byte).
        use tokio::io::AsyncWriteExt;
        let (mut peer, io) = tokio::io::duplex(1024);
        let activity = Activity::new();
        let mut guard =
            FramingGuard::new(io, 1024, timeout).with_idle_timeout(Arc::clone(&activity), timeout);
        assert_eq!(silent_read(&mut guard, Duration::from_secs(6)).await, None);
        peer.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        assert_eq!(silent_read(&mut guard, Duration::from_secs(3)).await, None);
        assert_eq!(
            silent_read(&mut guard, Duration::from_secs(2)).await,
            Some(io::ErrorKind::TimedOut)
        );
    }

    /// The guard reads into the caller's buffer: whatever room the caller
    /// gives (one byte, none, plenty), what comes out is exactly what the
    /// framing lets through, and a zero-room read hands nothing over
    /// unjudged.
    #[tokio::test]
    async fn reads_into_the_callers_buffer_of_any_size() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let pipelined: &[u8] = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nPOST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello";
        let smuggle: &[u8] = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        for (input, want) in [(pipelined, pipelined), (smuggle, POISON)] {
            for room in [1usize, 3, 16, 65536] {
                let (mut peer, io) = tokio::io::duplex(64);
                let mut guard = FramingGuard::new(io, 65536, Duration::from_secs(5));
                let writer = tokio::spawn(async move {
                    peer.write_all(input).await.unwrap();
                    peer.shutdown().await.unwrap();
                });
                // A read with no room returns nothing and keeps the head.
                let mut empty = [0u8; 0];
                assert_eq!(guard.read(&mut empty).await.unwrap(), 0);
                let mut got = Vec::new();
                let mut piece = vec![0u8; room];
                loop {
                    let n = guard.read(&mut piece).await.unwrap();
                    if n == 0 {
                        break;
                    }
                    got.extend_from_slice(&piece[..n]);
                }
                writer.await.unwrap();
                assert_eq!(got, want, "room {room}");
            }
        }
    }

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
