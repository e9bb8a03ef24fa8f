//! The server side of TLS, on rustls' unbuffered API, with the
//! connection's buffers owned here.
//!
//! tokio-rustls drives rustls' buffered `ServerConnection`, which keeps a
//! 4 KiB receive buffer from a connection's first read to its end: 4,096 of
//! the 9,313 heap bytes an idle keep-alive connection held (massif, 300
//! parked HTTP/1 connections; BENCHMARKS.md). Here a connection owns only
//! what it cannot hand on yet:
//!
//! - reads land on the stack and rustls decrypts them there; only the start
//!   of a record whose rest has not arrived is kept (`incoming`), and the
//!   decrypted bytes the reader has not taken (`plain`);
//! - writes are encrypted into a buffer of the serving thread and written
//!   from there; only what the socket does not take is kept (`outgoing`).
//!
//! Those buffers are released when an HTTP/1 connection parks
//! ([`TlsStream::release`], called by `conn::serve_http`) and, for HTTP/2,
//! whenever a read waits ([`TlsStream::release_when_idle`]).
//!
//! The protocol is rustls' throughout: this module only moves bytes between
//! the socket and [`UnbufferedServerConnection::process_tls_records`], whose
//! states it follows (rustls' `unbuffered-server` example shows the same
//! loop, blocking).

use std::cell::RefCell;
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use rustls::ServerConfig;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, UnbufferedStatus};
use smallvec::SmallVec;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::pending::Pending;

/// Bytes read from the socket at most per read (rustls' own buffer reads
/// 4 KiB at a time); the room is on the stack.
const READ_SIZE: usize = 8 * 1024;

/// Received bytes kept at most while rustls waits for the rest of a
/// message: a handshake message may be up to 64 KiB (rustls' limit), spread
/// over records of up to 16 KiB plus overhead.
const MAX_INCOMING: usize = 0xffff + 2 * (16 * 1024 + 256 + 5);

/// Encrypted bytes queued at most before a write waits for the socket.
const MAX_QUEUED: usize = 64 * 1024;

/// Plaintext taken per write at most (rustls splits it into records).
const MAX_WRITE: usize = 64 * 1024;

thread_local! {
    /// Where writes are encrypted before they go to the socket: one per
    /// serving thread, grown once to the largest write, never zeroed again.
    static SCRATCH: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// A TLS server connection over `IO` after its handshake ([`accept`]).
///
/// Reads end with `UnexpectedEof` when the peer closes its end without a
/// TLS close_notify, as tokio-rustls' do.
pub struct TlsStream<IO> {
    io: IO,
    conn: UnbufferedServerConnection,
    /// Received bytes rustls has not taken yet: the start of a record (or
    /// of a handshake message spread over records).
    incoming: Vec<u8>,
    /// Decrypted bytes not yet read.
    plain: Pending,
    /// Encrypted bytes the socket has not taken: `outgoing[sent..queued]`.
    /// Its length is what has been initialised; reuse costs no zeroing.
    outgoing: Vec<u8>,
    sent: usize,
    queued: usize,
    /// The socket's read side reached its end.
    eof: bool,
    /// The peer sent close_notify (or both sides closed): reads return end
    /// of stream once `plain` is empty.
    read_closed: bool,
    /// close_notify has been queued; no more writes.
    write_closed: bool,
    /// rustls failed (its alert is queued): it is not asked again.
    failed: bool,
    /// Let go of empty buffers whenever a read waits.
    release_idle: bool,
}

/// What rustls asks for when it stops.
#[derive(Debug, PartialEq, Eq)]
enum Stop {
    /// More bytes from the peer (a handshake message, or nothing to decrypt
    /// yet); application data may flow once the handshake is over.
    Traffic,
    /// Both sides have closed: nothing can be sent.
    Closed,
}

/// What to hand rustls once application data may flow.
#[derive(Clone, Copy)]
enum Payload<'a> {
    Nothing,
    Data(&'a [u8]),
    CloseNotify,
}

/// Where one round of processing puts what rustls produces.
struct Sinks<'a> {
    plain: &'a mut Pending,
    read_closed: &'a mut bool,
    /// Encrypted bytes for the socket, appended at `out[*queued..]`.
    out: &'a mut Vec<u8>,
    queued: &'a mut usize,
}

/// A buffer for encrypted bytes and how much of it is filled.
type Out<'a> = (&'a mut Vec<u8>, &'a mut usize);

/// Runs the TLS handshake on `io` with `config`; the stream returned may
/// already hold decrypted bytes (a client's first request often comes in
/// the same flight as its Finished message).
pub async fn accept<IO>(config: Arc<ServerConfig>, io: IO) -> io::Result<TlsStream<IO>>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    let conn = UnbufferedServerConnection::new(config).map_err(io::Error::other)?;
    let mut stream = TlsStream {
        io,
        conn,
        incoming: Vec::new(),
        plain: Pending::default(),
        outgoing: Vec::new(),
        sent: 0,
        queued: 0,
        eof: false,
        read_closed: false,
        write_closed: false,
        failed: false,
        release_idle: false,
    };
    std::future::poll_fn(|cx| stream.poll_handshake(cx)).await?;
    Ok(stream)
}

impl<IO> TlsStream<IO> {
    /// The protocol chosen by ALPN, if any.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        self.conn.alpn_protocol()
    }

    /// Releases the empty buffers each time a read has to wait for the
    /// peer, for connections that are never parked (HTTP/2): an idle one
    /// then holds none. (HTTP/1 connections release when they park.)
    pub fn release_when_idle(&mut self) {
        self.release_idle = true;
    }

    /// Lets go of the buffers that hold nothing (all of them on an idle
    /// connection); they are allocated again when needed.
    pub fn release(&mut self) {
        if self.incoming.is_empty() {
            self.incoming = Vec::new();
        }
        self.plain.release();
        if self.sent == self.queued {
            self.outgoing = Vec::new();
            self.sent = 0;
            self.queued = 0;
        }
    }

    /// Lets rustls work through `incoming`, queueing what it wants sent in
    /// `out` (by default `outgoing`) and encrypting `send` there once
    /// application data may flow. `Stop::Traffic` means `send` was taken
    /// unless the handshake is still going on.
    fn process(&mut self, out: Option<Out<'_>>, send: Payload<'_>) -> io::Result<Stop> {
        let mut incoming = std::mem::take(&mut self.incoming);
        let mut len = incoming.len();
        let result = self.process_input(&mut incoming, &mut len, out, send);
        incoming.truncate(len);
        self.incoming = incoming;
        result
    }

    /// [`process_records`] over `input[..*len]` with this stream's state.
    fn process_input(
        &mut self,
        input: &mut [u8],
        len: &mut usize,
        out: Option<Out<'_>>,
        send: Payload<'_>,
    ) -> io::Result<Stop> {
        let TlsStream {
            conn,
            plain,
            outgoing,
            queued,
            read_closed,
            failed,
            ..
        } = self;
        let (out, queued) = out.unwrap_or((outgoing, queued));
        let sinks = Sinks {
            plain,
            read_closed,
            out,
            queued,
        };
        process_records(conn, failed, input, len, sinks, send)
    }
}

/// One round of rustls over `input[..*len]` (the bytes it has not taken
/// move to the front; `*len` ends as their count). After an error the
/// connection is marked `failed` and rustls' alert is queued.
fn process_records(
    conn: &mut UnbufferedServerConnection,
    failed: &mut bool,
    input: &mut [u8],
    len: &mut usize,
    sinks: Sinks<'_>,
    mut send: Payload<'_>,
) -> io::Result<Stop> {
    if *failed {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the TLS connection failed earlier",
        ));
    }
    let Sinks {
        plain,
        read_closed,
        out,
        queued,
    } = sinks;
    let room_encode = |e: &EncodeError| match e {
        EncodeError::InsufficientSize(s) => Some(s.required_size),
        _ => None,
    };
    let room_encrypt = |e: &EncryptError| match e {
        EncryptError::InsufficientSize(s) => Some(s.required_size),
        _ => None,
    };
    // Discarded bytes are skipped, not moved: rustls only needs the next
    // call's input to start after them. What is left moves once, at the end.
    let mut start = 0;
    let result = loop {
        let UnbufferedStatus { mut discard, state } =
            conn.process_tls_records(&mut input[start..*len]);
        // Errors too return after the discard: rustls' record of what it
        // has taken from the input must stay true for the alert.
        let stop = match state {
            Err(e) => Err(tls_error(e)),
            Ok(ConnectionState::ReadTraffic(mut records)) => {
                let mut result = Ok(None);
                while let Some(record) = records.next_record() {
                    match record {
                        Ok(record) => {
                            discard += record.discard;
                            plain.extend(record.payload);
                        }
                        Err(e) => {
                            result = Err(tls_error(e));
                            break;
                        }
                    }
                }
                result
            }
            Ok(ConnectionState::EncodeTlsData(mut message)) => {
                queue(out, queued, |o| message.encode(o), room_encode).map(|()| None)
            }
            // Encoded into `out`, which is written in order.
            Ok(ConnectionState::TransmitTlsData(message)) => {
                message.done();
                Ok(None)
            }
            Ok(ConnectionState::BlockedHandshake) => Ok(Some(Stop::Traffic)),
            Ok(ConnectionState::WriteTraffic(mut traffic)) => {
                match std::mem::replace(&mut send, Payload::Nothing) {
                    Payload::Nothing => Ok(()),
                    Payload::Data(data) => {
                        queue(out, queued, |o| traffic.encrypt(data, o), room_encrypt)
                    }
                    Payload::CloseNotify => {
                        queue(out, queued, |o| traffic.queue_close_notify(o), room_encrypt)
                    }
                }
                .map(|()| Some(Stop::Traffic))
            }
            Ok(ConnectionState::PeerClosed) => {
                *read_closed = true;
                Ok(None)
            }
            Ok(ConnectionState::Closed) => {
                *read_closed = true;
                Ok(Some(Stop::Closed))
            }
            // Early data is not enabled in the server config.
            Ok(other) => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unexpected TLS state {other:?}"),
            )),
        };
        start += discard;
        match stop {
            Ok(Some(stop)) => break Ok(stop),
            Ok(None) => {}
            Err(e) => break Err(e),
        }
    };
    if result.is_err() {
        *failed = true;
        // The alert rustls queued. Asked once: rustls hands out what it
        // queued before it looks at the input again, and looking again
        // would fail a second time.
        let UnbufferedStatus { state, .. } = conn.process_tls_records(&mut input[start..*len]);
        if let Ok(ConnectionState::EncodeTlsData(mut message)) = state {
            let _ = queue(out, queued, |o| message.encode(o), room_encode);
        }
    }
    if start > 0 {
        input.copy_within(start..*len, 0);
        *len -= start;
    }
    result
}

impl<IO: AsyncRead + AsyncWrite + Unpin> TlsStream<IO> {
    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            if !self.conn.is_handshaking() {
                // The last flight (and session tickets) out first.
                ready!(self.poll_send(cx))?;
                return Poll::Ready(Ok(()));
            }
            // Our flight goes out before we wait for the peer's.
            ready!(self.poll_send(cx))?;
            if self.eof || self.read_closed {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peer closed during the TLS handshake",
                )));
            }
            if let Err(e) = ready!(self.poll_receive(cx)) {
                // rustls' alert goes out if the socket takes it now.
                let _ = self.poll_send(cx);
                return Poll::Ready(Err(e));
            }
        }
    }

    /// Reads from the socket and lets rustls process what came. Whole
    /// records are processed where they landed, on the stack; the start of
    /// one whose rest has not come is kept in `incoming`.
    fn poll_receive(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut room = [MaybeUninit::<u8>::uninit(); READ_SIZE];
        let mut buf = ReadBuf::uninit(&mut room);
        if Pin::new(&mut self.io).poll_read(cx, &mut buf)?.is_pending() {
            if self.release_idle {
                self.release();
            }
            return Poll::Pending;
        }
        let got = buf.filled_mut();
        if got.is_empty() {
            self.eof = true;
            return Poll::Ready(Ok(()));
        }
        if !self.incoming.is_empty() {
            if self.incoming.len() + got.len() > MAX_INCOMING {
                self.failed = true;
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "TLS message too large",
                )));
            }
            self.incoming.extend_from_slice(got);
            return Poll::Ready(self.process(None, Payload::Nothing).map(drop));
        }
        let mut len = got.len();
        let result = self.process_input(got, &mut len, None, Payload::Nothing);
        self.incoming.extend_from_slice(&got[..len]);
        Poll::Ready(result.map(drop))
    }

    /// Writes what is queued in `outgoing`.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let queued = &self.outgoing[..self.queued];
        ready!(poll_write_from(&mut self.io, cx, queued, &mut self.sent))?;
        self.sent = 0;
        self.queued = 0;
        Poll::Ready(Ok(()))
    }

    /// Starts writing what is queued without waiting for the socket: what it
    /// does not take now goes with the next write or flush.
    fn send_now(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        match self.poll_send(cx) {
            Poll::Ready(Err(e)) => Err(e),
            _ => Ok(()),
        }
    }

    /// Encrypts `parts` into the thread's scratch buffer and writes them at
    /// once; what the socket does not take is kept in (empty) `outgoing`.
    fn write_through(&mut self, cx: &mut Context<'_>, parts: &[IoSlice<'_>]) -> io::Result<()> {
        SCRATCH.with_borrow_mut(|scratch| {
            let mut used = 0;
            let result = self.encrypt_all(Some((scratch, &mut used)), parts);
            // What was encrypted goes out even after an error (an alert).
            let mut sent = 0;
            if let Poll::Ready(Err(e)) =
                poll_write_from(&mut self.io, cx, &scratch[..used], &mut sent)
            {
                return Err(e);
            }
            if sent < used {
                self.outgoing.clear();
                self.outgoing.extend_from_slice(&scratch[sent..used]);
                self.sent = 0;
                self.queued = used - sent;
            }
            result
        })
    }

    /// Encrypts all of `parts` and starts sending them. Pending (having
    /// taken nothing) only while earlier bytes fill the socket.
    fn poll_encrypt(&mut self, cx: &mut Context<'_>, parts: &[IoSlice]) -> Poll<io::Result<()>> {
        if self.write_closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        if self.sent == self.queued {
            return Poll::Ready(self.write_through(cx, parts));
        }
        // Earlier bytes still wait for the socket: these go behind them.
        if self.queued - self.sent >= MAX_QUEUED {
            ready!(self.poll_send(cx))?;
        }
        self.encrypt_all(None, parts)?;
        Poll::Ready(self.send_now(cx))
    }

    /// Encrypts `parts` in order into `out` (by default `outgoing`);
    /// BrokenPipe when rustls takes no data: closed, or handshaking.
    fn encrypt_all(&mut self, mut out: Option<Out<'_>>, parts: &[IoSlice]) -> io::Result<()> {
        for part in parts {
            let here = out.as_mut().map(|(buf, used)| (&mut **buf, &mut **used));
            if self.process(here, Payload::Data(part))? == Stop::Closed
                || self.conn.is_handshaking()
            {
                return Err(io::ErrorKind::BrokenPipe.into());
            }
        }
        Ok(())
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for TlsStream<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.plain.read_into(buf) {
                return Poll::Ready(Ok(()));
            }
            if this.read_closed {
                return Poll::Ready(Ok(()));
            }
            if this.failed {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "the TLS connection failed earlier",
                )));
            }
            if this.eof {
                this.read_closed = true;
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peer closed the connection without sending TLS close_notify",
                )));
            }
            let received = ready!(this.poll_receive(cx));
            // What rustls wants sent (a key update, an alert) need not wait
            // for the application's next write.
            if this.queued > this.sent {
                this.send_now(cx)?;
            }
            received?;
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for TlsStream<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let data = &data[..data.len().min(MAX_WRITE)];
        ready!(self.get_mut().poll_encrypt(cx, &[IoSlice::new(data)]))?;
        Poll::Ready(Ok(data.len()))
    }

    /// The slices, up to [`MAX_WRITE`] bytes in all, in one write: h2's
    /// DATA frame header and payload (via `Coalesce`) are two slices.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let mut parts: SmallVec<[IoSlice<'_>; 4]> = SmallVec::new();
        let mut room = MAX_WRITE;
        for b in bufs.iter().filter(|b| !b.is_empty()) {
            let n = b.len().min(room);
            parts.push(IoSlice::new(&b[..n]));
            room -= n;
            if room == 0 {
                break;
            }
        }
        ready!(self.get_mut().poll_encrypt(cx, &parts))?;
        Poll::Ready(Ok(MAX_WRITE - room))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.write_closed {
            this.write_closed = true;
            // Best effort: a connection rustls has failed cannot send one.
            let _ = this.process(None, Payload::CloseNotify);
        }
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

/// Appends what `write` produces to `out[..*queued]`, growing the buffer by
/// what `room` says it needs when it is too small. `out`'s length is what
/// has been initialised: growth zeroes only the new part.
fn queue<E>(
    out: &mut Vec<u8>,
    queued: &mut usize,
    mut write: impl FnMut(&mut [u8]) -> Result<usize, E>,
    room: impl Fn(&E) -> Option<usize>,
) -> io::Result<()>
where
    E: std::error::Error + Send + Sync + 'static,
{
    let n = match write(&mut out[*queued..]) {
        Ok(n) => n,
        Err(e) => {
            let Some(required) = room(&e) else {
                return Err(io::Error::other(e));
            };
            out.resize(*queued + required, 0);
            write(&mut out[*queued..]).map_err(io::Error::other)?
        }
    };
    *queued += n;
    Ok(())
}

/// Writes `bytes[*sent..]` to `io` until all of it is written (Ready) or
/// the socket is full (Pending, `*sent` saying how far it got).
fn poll_write_from<IO: AsyncWrite + Unpin>(
    io: &mut IO,
    cx: &mut Context<'_>,
    bytes: &[u8],
    sent: &mut usize,
) -> Poll<io::Result<()>> {
    while *sent < bytes.len() {
        let n = ready!(Pin::new(&mut *io).poll_write(cx, &bytes[*sent..]))?;
        if n == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        *sent += n;
    }
    Poll::Ready(Ok(()))
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

#[cfg(test)]
mod tests {
    use super::*;

    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};
    use tokio_rustls::client::TlsStream as ClientStream;

    struct Pki {
        server: Arc<ServerConfig>,
        cert: CertificateDer<'static>,
    }

    fn pki() -> Pki {
        let c = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let cert = c.cert.der().clone();
        let key = PrivateKeyDer::Pkcs8(c.signing_key.serialize_der().into());
        let server = crate::tls::server_config(vec![cert.clone()], key).unwrap();
        Pki { server, cert }
    }

    fn client_config(
        pki: &Pki,
        version: &'static rustls::SupportedProtocolVersion,
        alpn: &[&[u8]],
    ) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(pki.cert.clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(cfg)
    }

    /// A handshake over an in-memory pipe: (client, server).
    async fn connect(
        pki: &Pki,
        version: &'static rustls::SupportedProtocolVersion,
        alpn: &[&[u8]],
    ) -> (ClientStream<DuplexStream>, TlsStream<DuplexStream>) {
        let (c, s) = duplex(64 * 1024);
        let connector = tokio_rustls::TlsConnector::from(client_config(pki, version, alpn));
        let name = ServerName::try_from("localhost").unwrap();
        let (client, server) =
            tokio::join!(connector.connect(name, c), accept(pki.server.clone(), s));
        (client.unwrap(), server.unwrap())
    }

    /// What the server reads until `n` bytes, with reads of at most `chunk`.
    async fn read_n(server: &mut TlsStream<DuplexStream>, n: usize, chunk: usize) -> Vec<u8> {
        let mut got = Vec::new();
        let mut buf = vec![0u8; chunk];
        while got.len() < n {
            let k = server.read(&mut buf).await.unwrap();
            assert!(k > 0, "end of stream after {} of {n} bytes", got.len());
            got.extend_from_slice(&buf[..k]);
        }
        got
    }

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 31 % 251) as u8).collect()
    }

    #[tokio::test]
    async fn both_versions_carry_a_megabyte_each_way_and_negotiate_alpn() {
        let pki = pki();
        for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
            let (mut client, mut server) = connect(&pki, version, &[b"h2", b"http/1.1"]).await;
            assert_eq!(server.alpn_protocol(), Some(&b"h2"[..]));
            let up = pattern(1 << 20);
            let down: Vec<u8> = up.iter().rev().copied().collect();
            let sent = up.clone();
            let send = tokio::spawn(async move {
                client.write_all(&sent).await.unwrap();
                client.flush().await.unwrap();
                let mut back = vec![0u8; 1 << 20];
                client.read_exact(&mut back).await.unwrap();
                back
            });
            assert_eq!(read_n(&mut server, up.len(), 16 * 1024).await, up);
            server.write_all(&down).await.unwrap();
            server.flush().await.unwrap();
            assert_eq!(send.await.unwrap(), down);
        }
    }

    #[tokio::test]
    async fn small_reads_get_every_byte_of_a_record() {
        let pki = pki();
        let (mut client, mut server) = connect(&pki, &rustls::version::TLS13, &[]).await;
        assert_eq!(server.alpn_protocol(), None);
        let msg = pattern(10_000);
        client.write_all(&msg).await.unwrap();
        client.flush().await.unwrap();
        assert_eq!(read_n(&mut server, msg.len(), 7).await, msg);
    }

    #[tokio::test]
    async fn released_buffers_are_gone_and_the_connection_goes_on() {
        let pki = pki();
        let (mut client, mut server) = connect(&pki, &rustls::version::TLS13, &[]).await;
        for round in 0..3 {
            client.write_all(b"ping").await.unwrap();
            client.flush().await.unwrap();
            assert_eq!(read_n(&mut server, 4, 64).await, b"ping");
            server.write_all(&pattern(20_000)).await.unwrap();
            server.flush().await.unwrap();
            let mut back = vec![0u8; 20_000];
            client.read_exact(&mut back).await.unwrap();
            assert_eq!(back, pattern(20_000), "round {round}");
            server.release();
            assert_eq!(server.incoming.capacity(), 0);
            assert_eq!(server.plain.capacity(), 0);
            assert_eq!(server.outgoing.capacity(), 0);
        }
    }

    #[tokio::test]
    async fn a_client_key_update_is_followed() {
        let pki = pki();
        let (mut client, mut server) = connect(&pki, &rustls::version::TLS13, &[]).await;
        client.get_mut().1.refresh_traffic_keys().unwrap();
        client.write_all(b"after the update").await.unwrap();
        client.flush().await.unwrap();
        assert_eq!(read_n(&mut server, 16, 64).await, b"after the update");
        server.write_all(b"answer").await.unwrap();
        server.flush().await.unwrap();
        let mut back = [0u8; 6];
        client.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"answer");
    }

    #[tokio::test]
    async fn close_notify_ends_the_stream_cleanly_both_ways() {
        let pki = pki();
        let (mut client, mut server) = connect(&pki, &rustls::version::TLS13, &[]).await;
        client.write_all(b"last").await.unwrap();
        client.shutdown().await.unwrap();
        assert_eq!(read_n(&mut server, 4, 64).await, b"last");
        let mut buf = [0u8; 8];
        assert_eq!(server.read(&mut buf).await.unwrap(), 0);
        assert_eq!(server.read(&mut buf).await.unwrap(), 0);
        // The server's own close_notify: the client sees a clean end.
        server.shutdown().await.unwrap();
        assert_eq!(client.read(&mut buf).await.unwrap(), 0);
        assert_eq!(
            server.write(b"more").await.unwrap_err().kind(),
            io::ErrorKind::BrokenPipe
        );
    }

    #[tokio::test]
    async fn a_cut_connection_reads_as_unexpected_eof() {
        let pki = pki();
        let (client, mut server) = connect(&pki, &rustls::version::TLS13, &[]).await;
        // The socket closes without close_notify.
        drop(client.into_inner().0);
        let mut buf = [0u8; 8];
        let e = server.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(server.read(&mut buf).await.unwrap(), 0);
    }

    /// Hostile or broken clients: the handshake ends with an error, never
    /// a hang, and rustls' alert goes back when there is one.
    #[tokio::test]
    async fn handshakes_with_bad_input_fail() {
        let pki = pki();
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("plain HTTP", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
            // A handshake record announcing a 16 MiB ClientHello, then
            // nothing more: refused before buffering any of it.
            (
                "huge message",
                vec![0x16, 0x03, 0x01, 0x00, 0x04, 0x01, 0xff, 0xff, 0xff],
            ),
            // A record longer than any TLS allows.
            ("huge record", vec![0x16, 0x03, 0x01, 0xff, 0xff]),
            ("cut short", vec![0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00]),
            ("nothing", Vec::new()),
        ];
        for (what, bytes) in cases {
            let (mut c, s) = duplex(64 * 1024);
            c.write_all(&bytes).await.unwrap();
            c.shutdown().await.unwrap();
            let res = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                accept(pki.server.clone(), s),
            )
            .await
            .unwrap_or_else(|_| panic!("{what}: the handshake hung"));
            assert!(res.is_err(), "{what}: accepted");
            let mut back = Vec::new();
            c.read_to_end(&mut back).await.unwrap();
            if what == "plain HTTP" || what == "huge record" {
                // An alert record.
                assert_eq!(back.first(), Some(&0x15), "{what}: {back:?}");
            }
        }
    }

    /// Many records in one read, larger than one read's room: all arrive.
    #[tokio::test]
    async fn a_burst_of_records_arrives_whole() {
        let pki = pki();
        let (mut client, mut server) = connect(&pki, &rustls::version::TLS12, &[]).await;
        let mut sent = Vec::new();
        for i in 0..200u32 {
            let msg = format!("message {i};");
            client.write_all(msg.as_bytes()).await.unwrap();
            sent.extend_from_slice(msg.as_bytes());
        }
        client.flush().await.unwrap();
        assert_eq!(read_n(&mut server, sent.len(), 100).await, sent);
    }
    /// A client that keeps sending one endless handshake message is cut
    /// off without the server buffering it all.
    #[tokio::test]
    async fn an_endless_handshake_message_is_cut_off() {
        let pki = pki();
        let (mut c, s) = duplex(1 << 20);
        let server = tokio::spawn(accept(pki.server.clone(), s));
        // ClientHello header announcing 16 MiB, then 16 KiB records of it.
        let mut first = vec![0x16, 0x03, 0x01, 0x40, 0x00, 0x01, 0xff, 0xff, 0xff];
        first.resize(5 + 0x4000, 0);
        let _ = c.write_all(&first).await;
        for _ in 0..20 {
            let mut record = vec![0x16, 0x03, 0x01, 0x40, 0x00];
            record.resize(5 + 0x4000, 0);
            if c.write_all(&record).await.is_err() {
                break;
            }
        }
        let res = tokio::time::timeout(std::time::Duration::from_secs(5), server)
            .await
            .expect("the handshake hung")
            .unwrap();
        assert!(res.is_err());
    }

    /// Bytes that are not TLS after the handshake: the read fails, later
    /// reads and writes fail too (rustls is not asked again), and a
    /// shutdown still sends rustls' alert to the client.
    #[tokio::test]
    async fn garbage_after_the_handshake_fails_the_connection() {
        let pki = pki();
        let (mut client, mut server) = connect(&pki, &rustls::version::TLS13, &[]).await;
        let raw = client.get_mut().0;
        raw.write_all(b"\x17\x03\x03\x00\x20not a valid encrypted record....")
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        let e = server.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(server.read(&mut buf).await.is_err());
        assert!(server.write(b"x").await.is_err());
        server.shutdown().await.unwrap();
        // TLS 1.3 encrypts the alert: the client's rustls reads it.
        let e = client.read_to_end(&mut Vec::new()).await.unwrap_err();
        assert!(e.to_string().contains("BadRecordMac"), "{e}");
    }
    #[tokio::test]
    async fn with_release_when_idle_a_waiting_read_holds_no_buffer() {
        use futures_util::FutureExt;
        let pki = pki();
        let (mut client, mut server) = connect(&pki, &rustls::version::TLS13, &[b"h2"]).await;
        server.release_when_idle();
        for round in 0..3 {
            client.write_all(&pattern(30_000)).await.unwrap();
            client.flush().await.unwrap();
            assert_eq!(read_n(&mut server, 30_000, 4096).await, pattern(30_000));
            server.write_all(b"done").await.unwrap();
            server.flush().await.unwrap();
            let mut back = [0u8; 4];
            client.read_exact(&mut back).await.unwrap();
            // Nothing more from the client: the read waits.
            let mut buf = [0u8; 16];
            assert!(
                server.read(&mut buf).now_or_never().is_none(),
                "round {round}"
            );
            assert_eq!(server.incoming.capacity(), 0);
            assert_eq!(server.plain.capacity(), 0);
            assert_eq!(server.outgoing.capacity(), 0);
        }
    }

    /// A socket that counts the writes it takes.
    struct Counting {
        io: DuplexStream,
        writes: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl AsyncRead for Counting {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Counting {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, buf))?;
            self.writes
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            Poll::Ready(Ok(n))
        }

        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_flush(cx)
        }

        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.io).poll_shutdown(cx)
        }
    }

    /// A server stream over a pipe that takes 700 bytes at a time, and a
    /// client task that returns everything it read to the end.
    async fn over_a_slow_socket() -> (TlsStream<DuplexStream>, tokio::task::JoinHandle<Vec<u8>>) {
        let pki = pki();
        let (c, s) = duplex(700);
        let connector =
            tokio_rustls::TlsConnector::from(client_config(&pki, &rustls::version::TLS13, &[]));
        let name = ServerName::try_from("localhost").unwrap();
        let (client, server) =
            tokio::join!(connector.connect(name, c), accept(pki.server.clone(), s));
        let mut client = client.unwrap();
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            client.read_to_end(&mut got).await.unwrap();
            got
        });
        (server.unwrap(), reader)
    }

    /// Writes all of `parts` with vectored writes, however much each takes.
    async fn write_all_vectored<W: AsyncWrite + Unpin>(w: &mut W, parts: &[Vec<u8>]) {
        let mut slices: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
        let mut rest = &mut slices[..];
        while rest.iter().any(|s| !s.is_empty()) {
            let n = w.write_vectored(rest).await.unwrap();
            assert!(n > 0, "a vectored write took nothing");
            IoSlice::advance_slices(&mut rest, n);
        }
    }

    #[tokio::test]
    async fn a_frame_header_and_its_payload_leave_in_one_socket_write() {
        let pki = pki();
        let (c, s) = duplex(256 * 1024);
        let writes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counting = Counting {
            io: s,
            writes: Arc::clone(&writes),
        };
        let connector =
            tokio_rustls::TlsConnector::from(client_config(&pki, &rustls::version::TLS13, &[]));
        let name = ServerName::try_from("localhost").unwrap();
        let (client, server) = tokio::join!(
            connector.connect(name, c),
            accept(pki.server.clone(), counting)
        );
        let (mut client, mut server) = (client.unwrap(), server.unwrap());
        // As h2 writes a DATA frame it does not copy: the 9-byte header (and
        // frames queued before it), then the payload by reference.
        let head = pattern(9);
        let payload = pattern(16 * 1024);
        writes.store(0, std::sync::atomic::Ordering::Relaxed);
        let n = server
            .write_vectored(&[
                IoSlice::new(&[]),
                IoSlice::new(&head),
                IoSlice::new(&payload),
            ])
            .await
            .unwrap();
        assert_eq!(n, head.len() + payload.len());
        assert_eq!(writes.load(std::sync::atomic::Ordering::Relaxed), 1);
        let mut got = vec![0u8; n];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(got, [&head[..], &payload].concat());
        // A payload larger than one write takes: the header and as much of
        // it as fits, still in one socket write.
        let large = pattern(MAX_WRITE);
        writes.store(0, std::sync::atomic::Ordering::Relaxed);
        let n = server
            .write_vectored(&[IoSlice::new(&head), IoSlice::new(&large)])
            .await
            .unwrap();
        assert_eq!(n, MAX_WRITE);
        assert_eq!(writes.load(std::sync::atomic::Ordering::Relaxed), 1);
        let mut got = vec![0u8; n];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(got, [&head[..], &large[..MAX_WRITE - head.len()]].concat());
    }

    #[tokio::test]
    async fn vectored_writes_to_a_slow_socket_arrive_whole_and_in_order() {
        let (mut server, reader) = over_a_slow_socket().await;
        // Empty slices, slices that together pass what one write takes, one
        // slice larger than that on its own.
        let batches: Vec<Vec<Vec<u8>>> = vec![
            vec![vec![], pattern(9), pattern(3000)],
            vec![pattern(30_000), pattern(30_000), pattern(30_000)],
            vec![pattern(MAX_WRITE + 5000), vec![], pattern(17)],
            vec![pattern(1)],
        ];
        let mut sent = Vec::new();
        for parts in &batches {
            write_all_vectored(&mut server, parts).await;
            sent.extend(parts.concat());
        }
        server.shutdown().await.unwrap();
        assert_eq!(reader.await.unwrap(), sent);
    }

    /// A socket that takes little at a time: what it refuses is kept and
    /// sent in order, behind nothing and ahead of later writes.
    #[tokio::test]
    async fn writes_to_a_slow_socket_arrive_whole_and_in_order() {
        let (mut server, reader) = over_a_slow_socket().await;
        let mut sent = Vec::new();
        for i in 0..300usize {
            let piece = pattern(1 + i * 37 % 5000);
            server.write_all(&piece).await.unwrap();
            sent.extend_from_slice(&piece);
            if i % 7 == 0 {
                server.flush().await.unwrap();
            }
        }
        server.shutdown().await.unwrap();
        assert_eq!(reader.await.unwrap(), sent);
    }
}
