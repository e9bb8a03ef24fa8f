//! HTTP/1.1 exchanges on a pooled upstream connection, driven by the
//! request's own task.
//!
//! hyper's client runs every connection as a task of its own and passes
//! each request to it, and the answer back, through channels: per request two
//! tasks wake each other, and the answer head is parsed in one task and read
//! in the other. Profiled, that connection task was about a quarter of the
//! proxy's instructions per request. Here the task serving the client writes
//! the request, reads the answer head and then the body straight from the
//! socket; the connection goes back to its pool when the body has ended.
//! Parsing is httparse's, as in hyper; framing follows RFC 9112 section 6.
//! Only HTTP/1.1 is done here: an upstream that negotiates HTTP/2 goes
//! through hyper.

use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, StatusCode, Version};
use hyper::body::{Body as _, Frame, SizeHint};
use hyper_rustls::MaybeHttpsStream;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::io::poll_read_buf;

use super::Pool;
use crate::body::{BoxError, ProxyBody};
use crate::upstream::{self, Outgoing};

/// Most header fields accepted in an answer head (hyper's default).
const MAX_HEADERS: usize = 100;
/// Largest answer head accepted.
const MAX_HEAD: usize = 64 * 1024;
/// Longest chunk-size line, extensions included.
const MAX_CHUNK_LINE: usize = 4 * 1024;
/// Largest trailer section.
const MAX_TRAILERS: usize = 16 * 1024;
/// Read size at the start of each answer; doubled while reads fill it, so a
/// large download is read in large pieces and a small answer costs little.
const READ_MIN: usize = 8 * 1024;
const READ_MAX: usize = 256 * 1024;
/// Request body chunks up to this size are copied next to their framing, so
/// both go out in one write.
const COPY_MAX: usize = 4 * 1024;

type TlsIo = tokio_rustls::client::TlsStream<TokioIo<TokioIo<TcpStream>>>;

/// The byte stream of one upstream connection.
pub enum Io {
    Plain(TcpStream),
    Tls(Box<TlsIo>),
}

impl Io {
    /// The stream the (verifying) connector opened.
    pub fn from_connector(stream: MaybeHttpsStream<TokioIo<TcpStream>>) -> Io {
        match stream {
            MaybeHttpsStream::Http(s) => Io::Plain(s.into_inner()),
            MaybeHttpsStream::Https(s) => Io::Tls(Box::new(s.into_inner())),
        }
    }
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

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

/// One upstream HTTP/1.1 connection and what it has read but not yet used.
pub struct Conn {
    io: Io,
    buf: BytesMut,
}

impl Conn {
    pub fn new(io: Io) -> Conn {
        Conn {
            io,
            buf: BytesMut::new(),
        }
    }

    /// Whether an idle connection can no longer carry a request: the upstream
    /// closed it, reset it, or sent something unasked. Costs no system call
    /// unless the event loop has seen the socket become readable.
    pub fn is_dead(&mut self) -> bool {
        if !self.buf.is_empty() {
            return true;
        }
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut probe = [0u8; 1];
        let mut probe = ReadBuf::new(&mut probe);
        !Pin::new(&mut self.io)
            .poll_read(&mut cx, &mut probe)
            .is_pending()
    }
}

/// How a request body goes on the wire.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Framing {
    /// No body.
    Empty,
    /// `Content-Length` bytes, this many still to send.
    Length(u64),
    Chunked,
}

/// A request encoded for HTTP/1.1: its head, and its body still to send.
pub struct Outbound {
    head: Vec<u8>,
    body: Option<ProxyBody>,
    framing: Framing,
    head_request: bool,
    /// Sent again on another connection if a reused one turns out closed.
    replayable: bool,
}

impl Outbound {
    /// Encodes the request `out` describes, with `body`.
    pub fn new(out: &Outgoing<'_>, body: ProxyBody) -> Outbound {
        let (framing, extra): (Framing, &[u8]) = match out.content_length {
            Some(n) => (Framing::Length(n), b""),
            None if body.is_end_stream() => {
                let expects_body =
                    matches!(*out.method, Method::POST | Method::PUT | Method::PATCH);
                (
                    Framing::Empty,
                    if expects_body {
                        b"content-length: 0\r\n"
                    } else {
                        b""
                    },
                )
            }
            None => (Framing::Chunked, b"transfer-encoding: chunked\r\n"),
        };
        let mut head = Vec::with_capacity(512 + out.target.len());
        head.put_slice(out.method.as_str().as_bytes());
        head.put_u8(b' ');
        // Only URI bytes (`forward::request_target`): nothing that could
        // end the request line early.
        head.put_slice(out.target.as_bytes());
        head.put_slice(b" HTTP/1.1\r\n");
        upstream::each_upstream_header(out, |name, value| {
            // Header values cannot hold CR or LF (`HeaderValue` checks).
            head.put_slice(name.as_str().as_bytes());
            head.put_slice(b": ");
            head.put_slice(value.as_bytes());
            head.put_slice(b"\r\n");
        });
        head.put_slice(extra);
        head.put_slice(b"\r\n");
        let idempotent = matches!(
            *out.method,
            Method::GET
                | Method::HEAD
                | Method::OPTIONS
                | Method::PUT
                | Method::DELETE
                | Method::TRACE
        );
        Outbound {
            head,
            replayable: framing == Framing::Empty && idempotent,
            body: (framing != Framing::Empty).then_some(body),
            framing,
            head_request: *out.method == Method::HEAD,
        }
    }

    /// Whether this request may be sent again after a reused connection
    /// turned out to be closed: nothing of it can have been acted on twice.
    pub fn replayable(&self) -> bool {
        self.replayable
    }
}

/// Writes `out` on `conn` and reads the answer head; the answer body is
/// then read through [`Body`].
pub async fn exchange(conn: &mut Conn, out: &mut Outbound) -> Result<AnswerHead, Error> {
    let mut writer = Writer {
        head: &out.head,
        out: BytesMut::new(),
        big: Bytes::new(),
        tail: b"",
        body: out.body.take(),
        framing: out.framing,
        started: false,
        done: false,
        failed: None,
    };
    let head_request = out.head_request;
    std::future::poll_fn(|cx| poll_exchange(conn, &mut writer, head_request, cx)).await
}

fn poll_exchange(
    conn: &mut Conn,
    w: &mut Writer<'_>,
    head_request: bool,
    cx: &mut Context<'_>,
) -> Poll<Result<AnswerHead, Error>> {
    if !w.done && w.failed.is_none() {
        match w.poll_write(&mut conn.io, cx) {
            Poll::Ready(Ok(())) => w.done = true,
            // The upstream may have answered and stopped reading (a 413,
            // say): its answer is still read below.
            Poll::Ready(Err(WriteError::Io(e))) => w.failed = Some(e),
            Poll::Ready(Err(WriteError::Body(e))) => return Poll::Ready(Err(e)),
            Poll::Pending => {}
        }
    }
    loop {
        if !conn.buf.is_empty() {
            match parse_head(&mut conn.buf, head_request)? {
                Some(Parsed::Informational) => continue,
                Some(Parsed::Final(mut answer)) => {
                    // Answered before the request was all sent: what is
                    // left of it can never be sent on this connection.
                    if !w.done {
                        answer.reusable = false;
                    }
                    return Poll::Ready(Ok(answer));
                }
                None if conn.buf.len() >= MAX_HEAD => {
                    return Poll::Ready(Err(Error::Malformed("head too large")));
                }
                None => {}
            }
        }
        conn.buf.reserve(READ_MIN);
        match ready!(poll_read_buf(Pin::new(&mut conn.io), cx, &mut conn.buf)) {
            Ok(0) if conn.buf.is_empty() => {
                return Poll::Ready(Err(Error::Closed(w.failed.take())));
            }
            Ok(0) => return Poll::Ready(Err(Error::Malformed("head cut short"))),
            Ok(_) => {}
            Err(e) if conn.buf.is_empty() => return Poll::Ready(Err(Error::Closed(Some(e)))),
            Err(e) => return Poll::Ready(Err(Error::Io(e))),
        }
    }
}

enum WriteError {
    Io(io::Error),
    Body(Error),
}

/// The request bytes still to send: the head, then framing and small chunks
/// in `out`, a large chunk in `big` and the line end after it in `tail`.
struct Writer<'a> {
    /// Borrowed: a request sent again starts from the whole head.
    head: &'a [u8],
    out: BytesMut,
    big: Bytes,
    tail: &'static [u8],
    body: Option<ProxyBody>,
    framing: Framing,
    /// The body was polled before the head went out.
    started: bool,
    /// All sent and flushed.
    done: bool,
    failed: Option<io::Error>,
}

impl Writer<'_> {
    fn pending(&self) -> usize {
        self.head.len() + self.out.len() + self.big.len() + self.tail.len()
    }

    fn advance(&mut self, mut n: usize) {
        let k = n.min(self.head.len());
        self.head = &self.head[k..];
        n -= k;
        let k = n.min(self.out.len());
        self.out.advance(k);
        n -= k;
        let k = n.min(self.big.len());
        self.big.advance(k);
        n -= k;
        self.tail = &self.tail[n.min(self.tail.len())..];
    }

    fn stage(&mut self, data: Bytes, tail: &'static [u8]) {
        if data.len() <= COPY_MAX {
            self.out.put_slice(&data);
            self.out.put_slice(tail);
        } else {
            self.big = data;
            self.tail = tail;
        }
    }

    fn poll_write(&mut self, io: &mut Io, cx: &mut Context<'_>) -> Poll<Result<(), WriteError>> {
        // A body whose first piece is already here goes out with the head;
        // one that fails at once (broken framing from the client) stops the
        // request before any of it reaches the upstream.
        if !self.started {
            self.started = true;
            if let Poll::Ready(r) = self.pull(cx) {
                r?;
            }
        }
        loop {
            if self.pending() > 0 {
                let slices = [
                    IoSlice::new(self.head),
                    IoSlice::new(&self.out),
                    IoSlice::new(&self.big),
                    IoSlice::new(self.tail),
                ];
                let n = ready!(Pin::new(&mut *io).poll_write_vectored(cx, &slices))
                    .map_err(WriteError::Io)?;
                if n == 0 {
                    return Poll::Ready(Err(WriteError::Io(io::ErrorKind::WriteZero.into())));
                }
                self.advance(n);
                continue;
            }
            if self.body.is_none() {
                return Pin::new(&mut *io).poll_flush(cx).map_err(WriteError::Io);
            }
            match self.pull(cx) {
                Poll::Ready(r) => r?,
                Poll::Pending => {
                    // What is written so far must reach the upstream while
                    // the client's next piece is awaited.
                    ready!(Pin::new(&mut *io).poll_flush(cx)).map_err(WriteError::Io)?;
                    return Poll::Pending;
                }
            }
        }
    }

    /// Takes the body's next frame and stages it with its framing; ready
    /// once something was staged or the body ended.
    fn pull(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), WriteError>> {
        let body_error =
            |msg: &str| Poll::Ready(Err(WriteError::Body(Error::RequestBody(msg.into()))));
        loop {
            let Some(body) = self.body.as_mut() else {
                return Poll::Ready(Ok(()));
            };
            match ready!(Pin::new(body).poll_frame(cx)) {
                None => {
                    self.body = None;
                    return match self.framing {
                        Framing::Chunked => {
                            self.out.put_slice(b"0\r\n\r\n");
                            Poll::Ready(Ok(()))
                        }
                        Framing::Length(0) | Framing::Empty => Poll::Ready(Ok(())),
                        Framing::Length(_) => {
                            body_error("request body shorter than its Content-Length")
                        }
                    };
                }
                Some(Err(e)) => {
                    self.body = None;
                    return Poll::Ready(Err(WriteError::Body(Error::RequestBody(e))));
                }
                Some(Ok(frame)) => {
                    // Trailers of a client's body are not forwarded.
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    if data.is_empty() {
                        continue;
                    }
                    match &mut self.framing {
                        Framing::Length(left) => {
                            let Some(rest) = left.checked_sub(data.len() as u64) else {
                                return body_error("request body longer than its Content-Length");
                            };
                            *left = rest;
                            self.stage(data, b"");
                        }
                        Framing::Chunked => {
                            let mut size = [0u8; 18];
                            let line = chunk_size_line(data.len(), &mut size);
                            self.out.put_slice(line);
                            self.stage(data, b"\r\n");
                        }
                        Framing::Empty => {
                            return body_error("request body where none was announced");
                        }
                    }
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }
}

/// `len` in hex followed by CRLF, written into `buf`.
fn chunk_size_line(len: usize, buf: &mut [u8; 18]) -> &[u8] {
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
    decoder: BodyFraming,
    /// The connection can carry another request once the body has ended.
    reusable: bool,
}

impl AnswerHead {
    /// The answer, its body reading from `conn`; the connection goes back to
    /// `pool` (slot `slot`) when the body has ended cleanly.
    pub fn into_response(self, conn: Conn, pool: Arc<Pool>, slot: usize) -> Response<Body> {
        let mut body = Body {
            conn: Some(conn),
            decoder: self.decoder,
            reusable: self.reusable,
            pool: Some((pool, slot)),
            read_size: READ_MIN,
        };
        if body.decoder == BodyFraming::Done {
            body.finish();
        }
        Response::from_parts(self.parts, body)
    }
}

enum Parsed {
    /// A 1xx answer before the final one, skipped.
    Informational,
    Final(AnswerHead),
}

/// Parses an answer head at the start of `buf` and removes it; `None` while
/// the head is incomplete.
fn parse_head(buf: &mut BytesMut, head_request: bool) -> Result<Option<Parsed>, Error> {
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
    let decoder =
        if head_request || status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
            BodyFraming::Done
        } else if transfer_encoding {
            // Both framings at once is how responses get smuggled: the body is
            // read as chunked (RFC 9112 6.3) and the connection not reused.
            if length.is_some() {
                close = true;
            }
            if chunked {
                BodyFraming::Chunked(Chunk::Size)
            } else {
                close = true;
                BodyFraming::UntilClose
            }
        } else if let Some(n) = length {
            if n == 0 {
                BodyFraming::Done
            } else {
                BodyFraming::Length(n)
            }
        } else {
            close = true;
            BodyFraming::UntilClose
        };
    let mut parts = Response::new(()).into_parts().0;
    parts.status = status;
    parts.version = version;
    parts.headers = headers;
    Ok(Some(Parsed::Final(AnswerHead {
        parts,
        decoder,
        reusable: !close,
    })))
}

/// Where reading an answer body stands.
#[derive(Debug, PartialEq)]
enum BodyFraming {
    /// This many bytes still to come.
    Length(u64),
    Chunked(Chunk),
    /// Everything until the upstream closes.
    UntilClose,
    Done,
}

#[derive(Debug, PartialEq)]
enum Chunk {
    Size,
    Data(u64),
    DataEnd,
    Trailers {
        seen: usize,
        fields: Option<Box<HeaderMap>>,
    },
}

enum Step {
    Frame(Frame<Bytes>),
    NeedMore,
    End,
}

impl BodyFraming {
    /// The next piece of the body from `buf`.
    fn decode(&mut self, buf: &mut BytesMut) -> Result<Step, Error> {
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

/// An answer body read from its connection.
pub struct Body {
    conn: Option<Conn>,
    decoder: BodyFraming,
    reusable: bool,
    pool: Option<(Arc<Pool>, usize)>,
    read_size: usize,
}

impl Body {
    /// The body has ended: the connection goes back to its pool if it can
    /// carry another request (nothing unasked was read after the answer).
    fn finish(&mut self) {
        self.decoder = BodyFraming::Done;
        let conn = self.conn.take();
        if let (Some(conn), Some((pool, slot))) = (conn, self.pool.take())
            && self.reusable
            && conn.buf.is_empty()
        {
            pool.put_back(slot, conn);
        }
    }
}

impl hyper::body::Body for Body {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = &mut *self;
        loop {
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match this.decoder.decode(&mut conn.buf) {
                Ok(Step::Frame(frame)) => {
                    if this.decoder == BodyFraming::Done {
                        this.finish();
                    }
                    return Poll::Ready(Some(Ok(frame)));
                }
                Ok(Step::End) => {
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(Step::NeedMore) => {}
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(e)));
                }
            }
            conn.buf.reserve(this.read_size);
            let room = conn.buf.capacity() - conn.buf.len();
            match ready!(poll_read_buf(Pin::new(&mut conn.io), cx, &mut conn.buf)) {
                Ok(0) if this.decoder == BodyFraming::UntilClose => {
                    this.reusable = false;
                    this.finish();
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(Error::Incomplete)));
                }
                Ok(n) => {
                    if n == room {
                        this.read_size = (this.read_size * 2).min(READ_MAX);
                    }
                }
                Err(e) => {
                    this.conn = None;
                    return Poll::Ready(Some(Err(Error::Io(e))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.decoder == BodyFraming::Done
    }

    fn size_hint(&self) -> SizeHint {
        match self.decoder {
            BodyFraming::Length(n) => SizeHint::with_exact(n),
            BodyFraming::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
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
    let mut decoder = answer.decoder;
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

    /// The head as (method, target, sorted header pairs).
    fn parse_request_head(head: &[u8]) -> (String, String, Vec<(String, String)>) {
        let mut slots = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut slots);
        let len = req.parse(head).unwrap();
        assert_eq!(
            len,
            httparse::Status::Complete(head.len()),
            "one whole head"
        );
        let mut pairs: Vec<(String, String)> = req
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_string(),
                    String::from_utf8(h.value.to_vec()).unwrap(),
                )
            })
            .collect();
        pairs.sort();
        (req.method.unwrap().into(), req.path.unwrap().into(), pairs)
    }

    #[test]
    fn the_http1_head_carries_what_build_request_does() {
        let mut client = HeaderMap::new();
        for (k, v) in [
            ("host", "proxy.example"),
            ("cookie", "a=b"),
            ("authorization", "Bearer client"),
            ("x-forwarded-for", "10.0.0.1"),
            ("connection", "keep-alive, X-Custom"),
            ("x-custom", "1"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("content-length", "999"),
            ("accept-encoding", "gzip, zstd"),
            ("accept-encoding", "br"),
            ("referer", "https://app.example.com/"),
            ("origin", "https://app.example.com"),
            ("accept", "*/*"),
            ("x-multi", "1"),
            ("x-multi", "2"),
        ] {
            client.append(k, HeaderValue::from_static(v));
        }
        let host = HeaderValue::from_static("up.example:8443");
        let auth = HeaderValue::from_static("Bearer server-token");
        let referer = HeaderValue::from_static("https://registered.example/");
        for (auth, referer, decodable_only, length, method) in [
            (None, None, false, None, Method::GET),
            (Some(&auth), None, true, None, Method::GET),
            (Some(&auth), Some(&referer), true, Some(5), Method::POST),
            (None, Some(&referer), false, None, Method::POST),
        ] {
            let out = Outgoing {
                origin: "https://up.example:8443",
                target: "/a/b?c=d&e={x}",
                host: &host,
                headers: &client,
                method: &method,
                auth_header: auth,
                upstream_referer: referer,
                content_length: length,
                decodable_only,
            };
            let expected = upstream::build_request(&out, crate::body::empty()).unwrap();
            let mut want: Vec<(String, String)> = expected
                .headers()
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_string()))
                .collect();
            // HTTP/1.1 says "no body" for an empty POST explicitly.
            if length.is_none() && method == Method::POST {
                want.push(("content-length".into(), "0".into()));
            }
            want.sort();
            let body = match length {
                Some(_) => crate::body::full("hello"),
                None => crate::body::empty(),
            };
            let encoded = Outbound::new(&out, body);
            let (m, target, got) = parse_request_head(&encoded.head);
            assert_eq!((m.as_str(), target.as_str()), (method.as_str(), out.target));
            assert_eq!(got, want);
            assert!(
                !got.iter()
                    .any(|(n, _)| n == "transfer-encoding" || n == "x-custom")
            );
        }
    }

    #[test]
    fn answers_read_the_same_however_reads_cut_them() {
        // Status, body, trailer fields, reusable.
        type Outcome = Result<(u16, &'static [u8], usize, bool), &'static str>;
        let cases: [(&[u8], bool, Outcome); 6] = [
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
