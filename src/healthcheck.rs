//! `arcgis-app-proxy healthcheck`: one `GET` against the admin listener, for
//! container `HEALTHCHECK`s and Kubernetes exec probes in an image that has
//! no shell and no curl. Plain HTTP only, as the admin listener speaks.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// `http://<admin_listen>/healthz`, with an unspecified address (`0.0.0.0`,
/// `::`) replaced by loopback.
pub fn default_url(addr: SocketAddr) -> String {
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    format!("http://{}/healthz", SocketAddr::new(ip, addr.port()))
}

/// Sends `GET url` and returns the answer's status code; everything (DNS,
/// connect, write, read) within `timeout`.
pub async fn probe(url: &str, timeout: Duration) -> Result<u16, String> {
    let url = url::Url::parse(url).map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    if url.scheme() != "http" {
        return Err(format!(
            "{url} is not an http:// URL (the admin listener is plain HTTP)"
        ));
    }
    let host = url
        .host_str()
        .ok_or_else(|| format!("{url} has no host"))?
        .to_string();
    let port = url.port_or_known_default().unwrap_or(80);
    let target = &url[url::Position::BeforePath..url::Position::AfterQuery];
    let call = async {
        let mut stream = TcpStream::connect((host.trim_matches(|c| c == '[' || c == ']'), port))
            .await
            .map_err(|e| format!("cannot connect to {host}:{port}: {e}"))?;
        let request = format!(
            "GET {target} HTTP/1.1\r\nHost: {}\r\nUser-Agent: arcgis-app-proxy-healthcheck\r\nConnection: close\r\n\r\n",
            &url[url::Position::BeforeHost..url::Position::AfterPort]
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("cannot send the request: {e}"))?;
        // The status line is all that is read, at most 1 KiB of it.
        let mut head = Vec::with_capacity(128);
        let mut buf = [0u8; 256];
        while !head.windows(2).any(|w| w == b"\r\n") && head.len() < 1024 {
            let n = stream
                .read(&mut buf)
                .await
                .map_err(|e| format!("cannot read the answer: {e}"))?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        status_of(&head).ok_or_else(|| "the answer is not HTTP".to_string())
    };
    tokio::time::timeout(timeout, call)
        .await
        .map_err(|_| format!("no answer within {} s", timeout.as_secs()))?
}

/// The status code of an HTTP/1 status line.
fn status_of(head: &[u8]) -> Option<u16> {
    let line = head.split(|b| *b == b'\n').next()?;
    let mut parts = line.split(|b| *b == b' ');
    let version = parts.next()?;
    if !version.starts_with(b"HTTP/1.") {
        return None;
    }
    let code = parts.next()?;
    if code.len() != 3 || !code.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(code).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_url_reaches_an_unspecified_address_on_loopback() {
        assert_eq!(
            default_url("0.0.0.0:9090".parse().unwrap()),
            "http://127.0.0.1:9090/healthz"
        );
        assert_eq!(
            default_url("[::]:9090".parse().unwrap()),
            "http://[::1]:9090/healthz"
        );
        assert_eq!(
            default_url("10.1.2.3:9090".parse().unwrap()),
            "http://10.1.2.3:9090/healthz"
        );
    }

    #[test]
    fn status_lines() {
        assert_eq!(status_of(b"HTTP/1.1 200 OK\r\n"), Some(200));
        assert_eq!(
            status_of(b"HTTP/1.0 503 Service Unavailable\r\n"),
            Some(503)
        );
        for bad in [
            &b"SSH-2.0-OpenSSH\r\n"[..],
            b"HTTP/1.1 2000 x",
            b"HTTP/1.1 ok",
            b"",
        ] {
            assert_eq!(status_of(bad), None);
        }
    }

    #[tokio::test]
    async fn refuses_what_it_cannot_probe() {
        for url in [
            "https://127.0.0.1:9090/healthz",
            "not a url",
            "file:///etc/passwd",
        ] {
            assert!(probe(url, Duration::from_secs(1)).await.is_err(), "{url}");
        }
    }
}
