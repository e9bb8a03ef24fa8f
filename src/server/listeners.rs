//! Binding the listeners the config names, before serving starts (tests
//! and embedders bind their own, on port 0).

use std::io;
use std::net::SocketAddr;

use tokio::net::TcpListener;

use crate::config::Config;

/// Bound sockets for the proxy's listeners.
#[derive(Debug, Default)]
pub struct Listeners {
    /// HTTPS listener.
    pub tls: Option<TcpListener>,
    /// Cleartext listener.
    pub plain: Option<TcpListener>,
    /// Admin listener.
    pub admin: Option<TcpListener>,
}

impl Listeners {
    /// Binds every listener the config names.
    pub async fn bind(config: &Config) -> io::Result<Listeners> {
        async fn bind_one(addr: Option<SocketAddr>, what: &str) -> io::Result<Option<TcpListener>> {
            let Some(a) = addr else {
                return Ok(None);
            };
            // SO_REUSEADDR, so a restart is not refused while old
            // connections to the port sit in TIME_WAIT.
            let bind = || -> io::Result<TcpListener> {
                let socket = if a.is_ipv4() {
                    tokio::net::TcpSocket::new_v4()?
                } else {
                    tokio::net::TcpSocket::new_v6()?
                };
                socket.set_reuseaddr(true)?;
                socket.bind(a)?;
                socket.listen(4096)
            };
            bind().map(Some).map_err(|e| {
                io::Error::new(e.kind(), format!("cannot bind {what} listener on {a}: {e}"))
            })
        }
        Ok(Listeners {
            tls: bind_one(config.server.listen, "HTTPS").await?,
            plain: bind_one(config.server.plain_listen, "cleartext").await?,
            admin: bind_one(config.server.admin_listen, "admin").await?,
        })
    }
}
