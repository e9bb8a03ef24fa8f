//! `[limits]`: sizes, counts and timeouts, each checked to be usable.

use std::time::Duration;

use super::Problems;
use super::raw::RawLimits;

/// `[limits]`, validated.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request body accepted.
    pub max_request_body_bytes: u64,
    /// Largest request head accepted.
    pub max_header_bytes: usize,
    /// HTTP/2 streams per connection.
    pub h2_max_concurrent_streams: u32,
    /// Bodies up to this size are kept for a retry.
    pub retry_body_bytes: u64,
    /// Connections served at once.
    pub max_connections: usize,
    /// Time allowed for TLS handshake and request head.
    pub header_read_timeout: Duration,
    /// Upstream TCP+TLS connect timeout.
    pub upstream_connect_timeout: Duration,
    /// Time allowed for the upstream response head.
    pub upstream_timeout: Duration,
}

/// Validates `[limits]`.
pub(super) fn validate(l: RawLimits, p: &mut Problems) -> Limits {
    let positive = |p: &mut Problems, key: &str, v: u64| {
        if v == 0 {
            p.add(format!("limits.{key}"), "must be greater than 0");
        }
    };
    positive(p, "max_request_body_bytes", l.max_request_body_bytes);
    positive(
        p,
        "h2_max_concurrent_streams",
        l.h2_max_concurrent_streams.into(),
    );
    positive(p, "max_connections", l.max_connections);
    positive(p, "header_read_timeout_secs", l.header_read_timeout_secs);
    positive(
        p,
        "upstream_connect_timeout_secs",
        l.upstream_connect_timeout_secs,
    );
    positive(p, "upstream_timeout_secs", l.upstream_timeout_secs);
    if !(8192..=16 * 1024 * 1024).contains(&l.max_header_bytes) {
        p.add(
            "limits.max_header_bytes",
            "must be between 8192 and 16777216",
        );
    }
    Limits {
        max_request_body_bytes: l.max_request_body_bytes,
        max_header_bytes: l.max_header_bytes as usize,
        h2_max_concurrent_streams: l.h2_max_concurrent_streams,
        retry_body_bytes: l.retry_body_bytes.min(l.max_request_body_bytes),
        max_connections: l.max_connections.min(1 << 30) as usize,
        header_read_timeout: Duration::from_secs(l.header_read_timeout_secs),
        upstream_connect_timeout: Duration::from_secs(l.upstream_connect_timeout_secs),
        upstream_timeout: Duration::from_secs(l.upstream_timeout_secs),
    }
}
