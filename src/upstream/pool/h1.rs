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
//! Parsing is httparse's, as in hyper, through `crate::http1::answer`;
//! framing follows RFC 9112 section 6. Only HTTP/1.1 is done here: an
//! upstream that negotiates HTTP/2 goes through hyper.
//!
//! Why this is kept (measured, BENCHMARKS.md "Run AI"): with
//! `hyper::client::conn::http1` behind the same pool instead (one
//! `SendRequest` per idle connection, its connection task spawned, the
//! sender put back when the answer body ends), the plain release build
//! needed 53.7 k user-space instructions per HTTP/1 request against 39.9 k
//! (+35 %), 62.6 k against 49.0 k behind HTTP/2 clients and 100.0 k against
//! 84.0 k for gzip answers (callgrind, `bench/bench.py --only icount`, same
//! machine and session). That is far outside the benchmark targets' margin,
//! so the hand-written client stays and token fetches keep hyper-util's
//! client (they are rare and off the request path).

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use http::{Method, Response};
use hyper::body::{Body as _, Frame, SizeHint};
use hyper_rustls::MaybeHttpsStream;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::either::Either;
use tokio_util::io::poll_read_buf;

use super::Pool;
use crate::body::ProxyBody;
use crate::http1::Error;
use crate::http1::answer::{
    AnswerHead, BodyFraming, MAX_HEAD, Parsed, Step, chunk_size_line, parse_head,
};
use crate::upstream::{self, Forward, Outgoing, Tcp};

/// Read size at the start of each answer; doubled while reads fill it, so a
/// large download is read in large pieces and a small answer costs little.
const READ_MIN: usize = 8 * 1024;
const READ_MAX: usize = 256 * 1024;
/// Request body chunks up to this size are copied next to their framing, so
/// both go out in one write.
const COPY_MAX: usize = 4 * 1024;

type TlsIo = tokio_rustls::client::TlsStream<TokioIo<Tcp>>;

/// The byte stream of one upstream connection: cleartext (possibly
/// through a forward proxy) or TLS. tokio-util's `Either` forwards reads
/// and writes, vectored ones included, to whichever it is.
pub type Io = Either<TcpStream, Box<TlsIo>>;

/// The stream the (verifying) connector opened, and what requests on it
/// need if it goes to a forward proxy.
pub fn from_connector(stream: MaybeHttpsStream<Tcp>) -> (Io, Option<Forward>) {
    match stream {
        MaybeHttpsStream::Http(s) => {
            let forward = s.forward().cloned();
            (Either::Left(s.into_inner()), forward)
        }
        MaybeHttpsStream::Https(s) => (Either::Right(Box::new(s.into_inner())), None),
    }
}

/// One upstream HTTP/1.1 connection and what it has read but not yet used.
pub struct Conn {
    io: Io,
    buf: BytesMut,
    /// Set on a connection to a forward proxy (plain-`http` upstream).
    forward: Option<Box<Forward>>,
}

impl Conn {
    pub fn new((io, forward): (Io, Option<Forward>)) -> Conn {
        Conn {
            io,
            buf: BytesMut::new(),
            forward: forward.map(Box::new),
        }
    }

    /// What requests on this connection need for the forward proxy.
    pub fn forward(&self) -> Option<&Forward> {
        self.forward.as_deref()
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
    /// Encodes the request `out` describes, with `body`; for a forward
    /// proxy (`forward`) in absolute form and with its credentials.
    pub fn new(out: &Outgoing<'_>, body: ProxyBody, forward: Option<&Forward>) -> Outbound {
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
        if forward.is_some() {
            // Absolute form: the proxy learns the upstream from the target.
            head.put_slice(out.origin.as_bytes());
        }
        // Only URI bytes (`forward::request_target`): nothing that could
        // end the request line early.
        head.put_slice(out.target.as_bytes());
        head.put_slice(b" HTTP/1.1\r\n");
        if let Some(auth) = forward.and_then(|f| f.authorization.as_ref()) {
            head.put_slice(b"proxy-authorization: ");
            head.put_slice(auth.as_bytes());
            head.put_slice(b"\r\n");
        }
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

/// The answer to `head`, its body reading from `conn`; the connection goes
/// back to `pool` (slot `slot`) when the body has ended cleanly.
pub fn into_response(head: AnswerHead, conn: Conn, pool: Arc<Pool>, slot: usize) -> Response<Body> {
    let mut body = Body {
        conn: Some(conn),
        decoder: head.framing,
        reusable: head.reusable,
        pool: Some((pool, slot)),
        read_size: READ_MIN,
    };
    if body.decoder == BodyFraming::Done {
        body.finish();
    }
    Response::from_parts(head.parts, body)
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

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderMap, HeaderValue};

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
                request_id: None,
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
            let encoded = Outbound::new(&out, body, None);
            let (m, target, got) = parse_request_head(&encoded.head);
            assert_eq!((m.as_str(), target.as_str()), (method.as_str(), out.target));
            assert_eq!(got, want);
            assert!(
                !got.iter()
                    .any(|(n, _)| n == "transfer-encoding" || n == "x-custom")
            );
        }
    }
}
