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
