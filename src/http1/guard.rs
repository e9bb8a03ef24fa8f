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

use super::framing::Framing;
pub use super::idle::{Activity, Busy};
use super::idle::{Idle, IdleTimer};
use crate::pending::Pending;
use tokio::time::Sleep;

/// Whether an idle connection may hand its HTTP state back (see
/// [`FramingGuard::park_after`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Park {
    /// Never: parking is not enabled.
    Off,
    /// Once idle for the park time, while hyper waits for a head.
    Armed,
    /// Parked: hyper was told the connection ended; reads go to whoever
    /// waits for the next request, until [`FramingGuard::unpark`].
    Parked,
}

/// An I/O wrapper that applies [`Framing`] to what it reads.
///
/// Because hyper sees a head only once it is complete, hyper's own
/// header-read timer cannot see a slow head either; the guard enforces
/// `head_timeout` itself, from the first byte of a head to its end.
pub struct FramingGuard<IO> {
    io: IO,
    framing: Framing,
    /// Checked bytes hyper has not read yet.
    ready: Pending,
    head_timeout: Duration,
    deadline: Option<Pin<Box<Sleep>>>,
    idle: Option<IdleTimer>,
    park: Park,
    /// Written since the last completed flush.
    unflushed: bool,
}

impl<IO> FramingGuard<IO> {
    /// Wraps a connection; heads longer than `head_limit` are not checked
    /// (hyper refuses them with 431); a head must arrive within
    /// `head_timeout` of its first byte.
    pub fn new(io: IO, head_limit: usize, head_timeout: Duration) -> Self {
        FramingGuard {
            io,
            framing: Framing::new(head_limit),
            ready: Pending::default(),
            head_timeout,
            deadline: None,
            idle: None,
            park: Park::Off,
            unflushed: false,
        }
    }

    /// Also closes the connection once it has had no request in progress
    /// (per `activity`) and no complete head for `timeout`. Must be called
    /// within a tokio runtime.
    pub fn with_idle_timeout(mut self, activity: Arc<Activity>, timeout: Duration) -> Self {
        self.idle = Some(IdleTimer {
            activity,
            timeout,
            park_after: None,
            sleep: Box::pin(tokio::time::sleep(timeout)),
            held: Default::default(),
        });
        self
    }

    /// Lets a connection that has been idle for `after` (per the activity
    /// of [`with_idle_timeout`](Self::with_idle_timeout), which must come
    /// first) park: while hyper waits for the next head, with nothing of it
    /// read and everything written flushed, the guard tells hyper the
    /// client closed. hyper then ends the connection without shutting the
    /// I/O down, and its buffers (about 28 KiB) are freed; the caller
    /// waits for the next bytes ([`is_parked`](Self::is_parked)) and serves
    /// them on a new hyper connection after [`unpark`](Self::unpark).
    /// The guard starts parked: nothing is held before the first request.
    pub fn park_after(mut self, after: Duration) -> Self {
        if let Some(idle) = self.idle.as_mut() {
            idle.park_after = Some(after);
            self.park = Park::Parked;
        }
        self
    }

    /// The wrapped connection.
    pub fn get_mut(&mut self) -> &mut IO {
        &mut self.io
    }

    /// True once the guard has parked the connection (hyper saw an end of
    /// stream that was not the client's).
    pub fn is_parked(&self) -> bool {
        self.park == Park::Parked
    }

    /// Hands `bytes`, read from this guard, back to be read again first.
    pub fn unread(&mut self, bytes: &[u8]) {
        self.ready.unread(bytes);
    }

    /// Lets a parked connection be served again, and park again later.
    pub fn unpark(&mut self) {
        if self.park != Park::Parked {
            return;
        }
        self.park = Park::Armed;
        if let Some(idle) = self.idle.as_mut() {
            idle.unpark();
        }
    }

    /// Turns parking off (an HTTP/2 connection is never handed back).
    pub fn never_park(&mut self) {
        self.park = Park::Off;
    }

    /// Parks (see [`park_after`](Self::park_after)): lets go of the
    /// guard's own buffers, which are empty.
    fn park(&mut self) {
        self.park = Park::Parked;
        self.ready.release();
        self.framing.release();
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for FramingGuard<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.get_mut().poll_checked(cx, buf)
    }
}

impl<IO: AsyncRead + Unpin> FramingGuard<IO> {
    /// Hands hyper the bytes the framing checks have passed, reading more
    /// when none wait; parks or times out an idle connection.
    fn poll_checked(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if self.ready.read_into(buf) {
                return Poll::Ready(Ok(()));
            }
            if self.framing.poisoned() {
                // EOF after the poisoned head.
                return Poll::Ready(Ok(()));
            }
            if self.framing.passthrough() {
                return Pin::new(&mut self.io).poll_read(cx, buf);
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
            match Pin::new(&mut self.io).poll_read(cx, buf) {
                Poll::Pending => {
                    if let Some(d) = self.deadline.as_mut()
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
                    if self.framing.reading_head()
                        && let Some(idle) = self.idle.as_mut()
                    {
                        // Nothing of the next head read, nothing waiting
                        // to be sent: hyper holds nothing worth keeping.
                        let armed = self.park == Park::Armed;
                        let may_park = !self.framing.holding_head() && !self.unflushed;
                        match idle.poll(cx, armed, may_park) {
                            Idle::Open => {}
                            Idle::Park => {
                                self.park();
                                return Poll::Ready(Ok(()));
                            }
                            Idle::Expired => {
                                return Poll::Ready(Err(io::Error::new(
                                    io::ErrorKind::TimedOut,
                                    "connection idle",
                                )));
                            }
                        }
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    let n = buf.filled().len() - before;
                    if n == 0 {
                        // EOF: hand over whatever partial head there is.
                        self.framing.hand_over_head(self.ready.append_to());
                        if self.ready.is_empty() {
                            return Poll::Ready(Ok(()));
                        }
                        continue;
                    }
                    self.framing
                        .feed(&buf.filled()[before..], self.ready.append_to());
                    buf.set_filled(before);
                    // A head is pending: time it from its first byte.
                    if self.framing.holding_head() {
                        if self.deadline.is_none() {
                            self.deadline = Some(Box::pin(tokio::time::sleep(self.head_timeout)));
                        }
                    } else {
                        self.deadline = None;
                    }
                }
            }
        }
    }
}

impl<IO: Unpin> FramingGuard<IO> {
    /// The socket, for a write that the next flush has to push out.
    fn writing(self: Pin<&mut Self>) -> Pin<&mut IO> {
        let this = self.get_mut();
        this.unflushed = true;
        Pin::new(&mut this.io)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for FramingGuard<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.writing().poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.writing().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let flushed = Pin::new(&mut this.io).poll_flush(cx);
        if let Poll::Ready(Ok(())) = flushed {
            this.unflushed = false;
        }
        flushed
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.park == Park::Parked {
            // hyper ending a parked connection: the connection lives on.
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::super::framing::POISON;
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

    /// A guard with a 10 s idle timeout that parks after 1 s, armed (as
    /// after its first request), and the client's end.
    fn parking_guard() -> (
        tokio::io::DuplexStream,
        Arc<Activity>,
        FramingGuard<tokio::io::DuplexStream>,
    ) {
        let timeout = Duration::from_secs(10);
        let (peer, io) = tokio::io::duplex(1024);
        let activity = Activity::new();
        let mut guard = FramingGuard::new(io, 1024, timeout)
            .with_idle_timeout(Arc::clone(&activity), timeout)
            .park_after(Duration::from_secs(1));
        // It starts parked: nothing is held before the first request.
        assert!(guard.is_parked());
        guard.unpark();
        (peer, activity, guard)
    }

    /// Reads once, for at most `wait`: `Some(bytes)` if the read ended.
    async fn read_for(
        guard: &mut FramingGuard<tokio::io::DuplexStream>,
        wait: Duration,
    ) -> Option<io::Result<Vec<u8>>> {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 256];
        let r = tokio::time::timeout(wait, guard.read(&mut buf))
            .await
            .ok()?;
        Some(r.map(|n| buf[..n].to_vec()))
    }

    /// Nothing to read for most of the park time, then the end of the
    /// stream, which is what hyper is told when the connection parks.
    async fn parks_after_a_second(guard: &mut FramingGuard<tokio::io::DuplexStream>) {
        assert!(read_for(guard, Duration::from_millis(900)).await.is_none());
        let ended = read_for(guard, Duration::from_millis(200)).await;
        assert!(ended.unwrap().unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_parks_and_its_next_bytes_are_kept() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut peer, _activity, mut guard) = parking_guard();
        // Idle for the park time: hyper is told the stream ended.
        parks_after_a_second(&mut guard).await;
        assert!(guard.is_parked());
        // hyper's shutdown of a parked connection does not reach the socket.
        guard.shutdown().await.unwrap();
        let mut one = [0u8; 1];
        assert!(
            tokio::time::timeout(Duration::from_millis(100), peer.read(&mut one))
                .await
                .is_err(),
            "the client saw the connection end"
        );
        // Parked, it does not park again: the next read waits for the client.
        assert!(read_for(&mut guard, Duration::from_secs(3)).await.is_none());
        peer.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let first = read_for(&mut guard, Duration::from_secs(1))
            .await
            .unwrap()
            .unwrap();
        // What the waiter read goes back, ahead of anything else.
        guard.unread(&first[5..]);
        guard.unread(&first[..5]);
        guard.unread(b"");
        guard.unpark();
        let again = read_for(&mut guard, Duration::from_secs(1))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(again, first);
        // Unparked, it parks again a park time later (no request was ever
        // in progress, so it has been idle all along).
        parks_after_a_second(&mut guard).await;
        // The parked time counts towards the timeout: closed 10 s after
        // the connection went idle, not later.
        assert!(read_for(&mut guard, Duration::from_secs(4)).await.is_none());
        let closed = read_for(&mut guard, Duration::from_secs(2)).await.unwrap();
        assert_eq!(closed.unwrap_err().kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test(start_paused = true)]
    async fn no_park_while_busy_unflushed_or_inside_a_head() {
        use tokio::io::AsyncWriteExt;
        // A request in progress: no park however long it takes.
        let (_peer, activity, mut guard) = parking_guard();
        let busy = activity.begin();
        assert!(
            read_for(&mut guard, Duration::from_secs(30))
                .await
                .is_none()
        );
        drop(busy);
        // Idle from the end of the answer: parks a second later.
        assert!(
            read_for(&mut guard, Duration::from_millis(900))
                .await
                .is_none()
        );
        assert!(
            read_for(&mut guard, Duration::from_millis(200))
                .await
                .unwrap()
                .unwrap()
                .is_empty()
        );

        // Written but not flushed: hyper still holds part of an answer.
        let (_peer, _activity, mut guard) = parking_guard();
        guard.write_all(b"HTTP/1.1 200 OK\r\n").await.unwrap();
        assert!(
            read_for(&mut guard, Duration::from_millis(1500))
                .await
                .is_none()
        );
        assert!(!guard.is_parked());
        // Flushed: it parks at the next look, a park time later.
        guard.flush().await.unwrap();
        assert!(
            read_for(&mut guard, Duration::from_millis(1200))
                .await
                .unwrap()
                .unwrap()
                .is_empty()
        );
        assert!(guard.is_parked());

        // Part of a head read: it times out as a head, never parks.
        let (mut peer, _activity, mut guard) = parking_guard();
        peer.write_all(b"GET / HT").await.unwrap();
        assert!(read_for(&mut guard, Duration::from_secs(9)).await.is_none());
        assert!(!guard.is_parked());
        let closed = read_for(&mut guard, Duration::from_secs(3)).await.unwrap();
        assert_eq!(closed.unwrap_err().kind(), io::ErrorKind::TimedOut);
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
}
