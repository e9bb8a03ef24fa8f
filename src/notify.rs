//! systemd's service notification protocol (`sd_notify(3)`) without
//! libsystemd: one datagram to `$NOTIFY_SOCKET` per state change, so a
//! `Type=notify` unit is started only once the listeners are bound, a
//! reload shows as reloading until the new config is in place, and a stop
//! as stopping. Without the variable (not under systemd) nothing is sent.

use std::ffi::OsString;
use std::os::unix::net::UnixDatagram;

/// The listeners are bound and serving (also ends a reload).
pub fn ready(status: &str) {
    send(&format!("READY=1\nSTATUS={}", one_line(status)));
}

/// A reload has begun.
pub fn reloading() {
    send("RELOADING=1\nSTATUS=reloading the configuration");
}

/// Shutdown has begun.
pub fn stopping() {
    send("STOPPING=1\nSTATUS=draining connections");
}

/// A status line must not start a new `KEY=value` pair.
fn one_line(s: &str) -> String {
    s.chars().map(|c| if c == '\n' { ' ' } else { c }).collect()
}

/// Sends `state` to `$NOTIFY_SOCKET`; false when there is none or the send
/// failed (a notification is never worth failing the proxy for).
pub fn send(state: &str) -> bool {
    match std::env::var_os("NOTIFY_SOCKET") {
        Some(path) => send_to(&path, state),
        None => false,
    }
}

/// Sends `state` to the socket at `path`: a file system path, or an
/// abstract socket name written with a leading `@`.
pub fn send_to(path: &OsString, state: &str) -> bool {
    let Ok(sock) = UnixDatagram::unbound() else {
        return false;
    };
    let bytes = path.as_encoded_bytes();
    let sent = match bytes.strip_prefix(b"@") {
        #[cfg(target_os = "linux")]
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(name)
                .and_then(|addr| sock.send_to_addr(state.as_bytes(), &addr))
        }
        #[cfg(not(target_os = "linux"))]
        Some(_) => return false,
        None => sock.send_to(state.as_bytes(), std::path::Path::new(path)),
    };
    sent.is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datagrams_reach_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let listener = UnixDatagram::bind(&path).unwrap();
        assert!(send_to(&path.clone().into_os_string(), "READY=1\nSTATUS=x"));
        let mut buf = [0u8; 256];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1\nSTATUS=x");
        assert_eq!(one_line("a\nWATCHDOG=1"), "a WATCHDOG=1");
        // Nowhere to send to: false, no panic.
        assert!(!send_to(&"/nonexistent/notify.sock".into(), "READY=1"));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn datagrams_reach_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("arcgis-app-proxy-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let listener = UnixDatagram::bind_addr(&addr).unwrap();
        assert!(send_to(&format!("@{name}").into(), "STOPPING=1"));
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STOPPING=1");
    }
}
