//! `[server]`: listeners, TLS, the `/proxy` path, the public URL, trusted
//! proxies and the shutdown grace period.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use url::Url;

use super::raw::RawServer;
use super::secrets::warn_if_exposed;
use super::{Problems, is_plain_path, resolve};
use crate::tls;

/// `[server]`, validated.
#[derive(Debug)]
pub struct ServerConfig {
    /// HTTPS listener address.
    pub listen: Option<SocketAddr>,
    /// TLS settings for the HTTPS listener.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// When the HTTPS listener's certificate expires (Unix seconds), for
    /// `arcgis_proxy_tls_cert_not_after_seconds`.
    pub tls_not_after: Option<i64>,
    /// Optional cleartext listener.
    pub plain_listen: Option<SocketAddr>,
    /// Admin listener address.
    pub admin_listen: Option<SocketAddr>,
    /// Path of the Esri resource-proxy style endpoint.
    pub proxy_path: String,
    /// How clients reach the proxy (scheme + authority, no trailing slash).
    pub public_url: Option<String>,
    /// Peers whose X-Forwarded-* headers are believed.
    pub trusted_proxies: Vec<IpNet>,
    /// How long in-flight requests may run on shutdown.
    pub shutdown_grace: Duration,
    /// How often the config's files are checked for changes (`None`: never;
    /// reload only on SIGHUP).
    pub reload_poll: Option<Duration>,
}

/// Validates `[server]`; `tls_override` replaces the certificate files (the
/// demo's generated certificate).
pub(super) fn validate(
    s: RawServer,
    base: &Path,
    tls_override: Option<Arc<rustls::ServerConfig>>,
    p: &mut Problems,
    warnings: &mut Vec<String>,
) -> ServerConfig {
    let listen = s
        .listen
        .as_deref()
        .and_then(|v| parse_addr(p, "server.listen", v));
    let plain_listen = s
        .plain_listen
        .as_deref()
        .and_then(|v| parse_addr(p, "server.plain_listen", v));
    let admin_listen = s
        .admin_listen
        .as_deref()
        .and_then(|v| parse_addr(p, "server.admin_listen", v));
    if s.listen.is_none() && s.plain_listen.is_none() {
        p.add(
            "server.listen",
            "missing: set listen (HTTPS) and/or plain_listen (cleartext)",
        );
    }
    let (tls, tls_not_after) = listener_tls(&s, base, tls_override, p, warnings);
    let addrs: Vec<(&str, SocketAddr)> = [
        ("server.listen", listen),
        ("server.plain_listen", plain_listen),
        ("server.admin_listen", admin_listen),
    ]
    .into_iter()
    .filter_map(|(k, a)| a.map(|a| (k, a)))
    .collect();
    for (i, (k, a)) in addrs.iter().enumerate() {
        if a.port() != 0 && addrs[..i].iter().any(|(_, b)| b == a) {
            p.add(*k, format!("{a} is already used by another listener"));
        }
    }

    let proxy_path = s.proxy_path.trim_end_matches('/').to_string();
    if !proxy_path.starts_with('/') || !is_plain_path(&proxy_path) {
        p.add(
            "server.proxy_path",
            "must be an absolute path such as \"/proxy\" (letters, digits, - _ . / only)",
        );
    }

    let public_url = s.public_url.as_deref().and_then(|v| {
        match Url::parse(v) {
            Ok(u)
                if matches!(u.scheme(), "http" | "https")
                    && u.host_str().is_some()
                    && u.username().is_empty()
                    && u.password().is_none()
                    && u.query().is_none()
                    && u.fragment().is_none()
                    && (u.path() == "/" || u.path().is_empty()) =>
            {
                Some(u.as_str().trim_end_matches('/').to_string())
            }
            _ => {
                p.add(
                    "server.public_url",
                    "must be an http(s) origin such as \"https://maps.example.com\" (no path, query or userinfo)",
                );
                None
            }
        }
    });

    let mut trusted_proxies = Vec::new();
    for (i, cidr) in s.trusted_proxies.iter().enumerate() {
        let parsed = cidr
            .parse::<IpNet>()
            .or_else(|_| cidr.parse::<std::net::IpAddr>().map(IpNet::from));
        match parsed {
            Ok(n) => trusted_proxies.push(n),
            Err(_) => p.add(
                format!("server.trusted_proxies[{i}]"),
                format!("{cidr:?} is not a CIDR such as \"10.0.0.0/8\" or an IP address"),
            ),
        }
    }
    ServerConfig {
        listen,
        tls,
        tls_not_after,
        plain_listen,
        admin_listen,
        proxy_path,
        public_url,
        trusted_proxies,
        shutdown_grace: Duration::from_secs(s.shutdown_grace_secs),
        reload_poll: (s.reload_poll_secs > 0).then(|| Duration::from_secs(s.reload_poll_secs)),
    }
}

fn parse_addr(p: &mut Problems, key: &str, value: &str) -> Option<SocketAddr> {
    match value.parse::<SocketAddr>() {
        Ok(a) => Some(a),
        Err(_) => {
            p.add(
                key,
                format!("{value:?} is not an address such as \"0.0.0.0:8443\" or \"[::1]:8443\""),
            );
            None
        }
    }
}

/// The HTTPS listener's TLS settings: the override, or the certificate and
/// key files, which `server.listen` requires and nothing else may use.
fn listener_tls(
    s: &RawServer,
    base: &Path,
    tls_override: Option<Arc<rustls::ServerConfig>>,
    p: &mut Problems,
    warnings: &mut Vec<String>,
) -> (Option<Arc<rustls::ServerConfig>>, Option<i64>) {
    let mut tls = None;
    let mut not_after = None;
    if s.listen.is_some() && tls_override.is_some() {
        tls = tls_override;
    } else if s.listen.is_some() {
        match (&s.tls_cert, &s.tls_key) {
            (Some(cert), Some(key)) => {
                warn_if_exposed(&resolve(base, key), "server.tls_key", warnings);
                match tls::server_config_from_files(&resolve(base, cert), &resolve(base, key)) {
                    Ok((cfg, expires)) => {
                        tls = Some(cfg);
                        not_after = expires;
                    }
                    Err(e) => p.add(e.key(), e.to_string()),
                }
            }
            (cert, key) => {
                if cert.is_none() {
                    p.add("server.tls_cert", "missing: required with server.listen");
                }
                if key.is_none() {
                    p.add("server.tls_key", "missing: required with server.listen");
                }
            }
        }
    } else if s.tls_cert.is_some() || s.tls_key.is_some() {
        p.add(
            "server.listen",
            "missing: tls_cert/tls_key are set but there is no HTTPS listener",
        );
    }
    (tls, not_after)
}
