//! The one integration-test binary: the real TLS listener and pipeline,
//! driven by real clients, in front of in-process fake ArcGIS servers.

mod apps;
mod browser;
mod cli;
mod docs;
mod enterprise;
mod forwarding;
mod kubernetes;
mod leaks;
mod listeners;
mod maps;
mod ops;
mod outbound;
mod packaging;
mod printing;
mod restjs;
mod routing;
mod shared_rate;
mod smuggling;
mod support;
mod systemd;
mod tokens;
