//! Pure request-policy decisions over data compiled at config load: which
//! Referer/Origin is allowed, which path or target URL is safe, which route
//! serves it. No I/O here; everything is tested with tables of cases.

pub mod client;
pub mod path;
pub mod quota;
pub mod rate;
pub mod referer;
pub mod route;
