//! The one body type the proxy hands to hyper, and small constructors for it.
//!
//! Upstream answers stream through as boxed bodies; the proxy's own answers
//! (errors, ping, preflight) are small `Full` bodies boxed the same way, so the
//! service has a single response type.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full, combinators::BoxBody};

/// Boxed error carried by streaming bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Body of every request sent upstream and every response sent to a client.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// What `poll_frame` of a body of the proxy's returns.
pub type PollFrame = std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, BoxError>>>;

/// A complete body from bytes already in memory.
pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// An empty body.
pub fn empty() -> ProxyBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper::body::{Body, Frame, SizeHint};

/// A body that first replays chunks already read, then continues with the
/// rest of the original stream (used after peeking at an upstream answer).
pub struct Prefixed {
    prefix: VecDeque<Bytes>,
    rest: ProxyBody,
}

impl Prefixed {
    /// Replays `prefix`, then streams `rest`.
    pub fn new(prefix: Vec<Bytes>, rest: ProxyBody) -> Prefixed {
        Prefixed {
            prefix: prefix.into(),
            rest,
        }
    }
}

impl Body for Prefixed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> PollFrame {
        if let Some(b) = self.prefix.pop_front() {
            return Poll::Ready(Some(Ok(Frame::data(b))));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_empty() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let queued: u64 = self.prefix.iter().map(|b| b.len() as u64).sum();
        let rest = self.rest.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + queued);
        if let Some(u) = rest.upper() {
            hint.set_upper(u + queued);
        }
        hint
    }
}

/// A body that keeps `T` alive until hyper has finished with it (dropped it):
/// how a connection's "request in progress" mark lasts until the answer has
/// been written.
pub struct Holding<T> {
    inner: ProxyBody,
    _held: T,
}

impl<T: Send + Sync + Unpin + 'static> Holding<T> {
    /// Wraps `inner`, holding `held` as long as the body lives. Not boxed:
    /// it is the outermost body, handed to hyper as it is.
    pub fn wrap(inner: ProxyBody, held: T) -> Holding<T> {
        Holding { inner, _held: held }
    }
}

impl<T: Unpin> Body for Holding<T> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> PollFrame {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
