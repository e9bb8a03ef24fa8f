//! Opening a TCP connection to an upstream or token endpoint: directly, or
//! through the outbound proxy of `[upstream] proxy` (or `HTTPS_PROXY`…).
//!
//! Every client stack (token fetches on hyper-util's client, the HTTP/1
//! pool, HTTP/2) connects through [`Connector`], under the verifying TLS
//! connector: for an `https://` upstream the proxy is asked for a `CONNECT`
//! tunnel and TLS runs end to end through it, so the proxy sees neither
//! tokens nor answers; for an `http://` upstream the connection goes to the
//! proxy and requests are written in absolute form (`GET http://host/path`)
//! with the proxy's credentials, which [`Tcp::forward`] carries to the
//! HTTP/1 writer. Which hosts bypass the proxy is hyper-util's `NO_PROXY`
//! matcher (curl's rules: domains with their subdomains, addresses,
//! networks, `*`).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderValue, Uri};
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::client::proxy::matcher::Matcher;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::body::BoxError;
use crate::config::OutboundProxy;
use crate::error::describe;

/// Connects to upstreams, through the outbound proxy where one applies.
#[derive(Clone)]
pub struct Connector {
    http: HttpConnector,
    proxy: Option<Arc<Matcher>>,
}

impl Connector {
    /// A connector with `connect_timeout` for each TCP connect (to the
    /// upstream or to the proxy), going through `outbound`'s proxy.
    pub fn new(outbound: &OutboundProxy, connect_timeout: Duration) -> Connector {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(connect_timeout));
        http.set_nodelay(true);
        http.set_keepalive(Some(Duration::from_secs(60)));
        let proxy = outbound.is_set().then(|| {
            let mut b = Matcher::builder().no(outbound.no_proxy.join(","));
            if let Some(u) = &outbound.https {
                b = b.https(u.expose());
            }
            if let Some(u) = &outbound.http {
                b = b.http(u.expose());
            }
            Arc::new(b.build())
        });
        Connector { http, proxy }
    }

    /// The `Proxy-Authorization` a plain-`http` request to `dst` carries:
    /// set when it goes to a forward proxy whose URL has credentials.
    pub fn forward_authorization(&self, dst: &Uri) -> Option<HeaderValue> {
        if dst.scheme_str() != Some("http") {
            return None;
        }
        let via = self.proxy.as_ref()?.intercept(dst)?;
        via.basic_auth().cloned()
    }
}

/// What an HTTP/1 request on a connection to a plain-`http` proxy needs:
/// the absolute-form target and the proxy's credentials.
#[derive(Clone, Debug)]
pub struct Forward {
    /// `Proxy-Authorization` for the proxy, if its URL has credentials
    /// (marked sensitive).
    pub authorization: Option<HeaderValue>,
}

/// A TCP connection from [`Connector`]: to the upstream (perhaps tunnelled
/// through the proxy), or to the proxy itself for a plain-`http` upstream.
pub struct Tcp {
    io: TokioIo<TcpStream>,
    forward: Option<Forward>,
}

impl Tcp {
    /// The socket.
    pub fn into_inner(self) -> TcpStream {
        self.io.into_inner()
    }

    /// Set when requests on this connection go to a forward proxy.
    pub fn forward(&self) -> Option<&Forward> {
        self.forward.as_ref()
    }
}

type Connecting = Pin<Box<dyn Future<Output = Result<Tcp, BoxError>> + Send>>;

impl tower_service::Service<Uri> for Connector {
    type Response = Tcp;
    type Error = BoxError;
    type Future = Connecting;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, dst: Uri) -> Connecting {
        let mut http = self.http.clone();
        let via = self.proxy.as_ref().and_then(|m| m.intercept(&dst));
        Box::pin(async move {
            let Some(via) = via else {
                let io = tower_service::Service::call(&mut http, dst).await?;
                return Ok(Tcp { io, forward: None });
            };
            let proxy = via.uri().clone();
            let authority = proxy.authority().map(|a| a.to_string()).unwrap_or_default();
            if dst.scheme_str() == Some("https") {
                let mut tunnel = Tunnel::new(proxy, http);
                if let Some(auth) = via.basic_auth() {
                    tunnel = tunnel.with_auth(auth.clone());
                }
                let io = tower_service::Service::call(&mut tunnel, dst.clone())
                    .await
                    .map_err(|e| tunnel_error(&e, &authority, &dst))?;
                Ok(Tcp { io, forward: None })
            } else {
                let io = tower_service::Service::call(&mut http, proxy)
                    .await
                    .map_err(|e| format!("outbound proxy {authority}: {}", describe(&e)))?;
                Ok(Tcp {
                    io,
                    forward: Some(Forward {
                        authorization: via.basic_auth().cloned(),
                    }),
                })
            }
        })
    }
}

/// Says which proxy refused or failed which tunnel, and why, in words an
/// operator can act on. (hyper-util does not export its error type; its
/// message and source chain are what there is.)
fn tunnel_error(e: &(dyn std::error::Error + 'static), proxy: &str, dst: &Uri) -> BoxError {
    let target = dst.authority().map(|a| a.as_str()).unwrap_or("?");
    let mut why = describe(e);
    if why.contains("proxy authorization required") {
        why.push_str(
            " (407; put the credentials in the proxy URL, http://user:password@host:port)",
        );
    }
    format!("outbound proxy {proxy}, tunnel to {target}: {why}").into()
}

impl Connection for Tcp {
    fn connected(&self) -> Connected {
        // hyper-util's client writes absolute-form targets on a proxied
        // connection; CONNECT tunnels are not proxied in that sense.
        self.io.inner().connected().proxy(self.forward.is_some())
    }
}

impl Read for Tcp {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl Write for Tcp {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
