//! The upstream side: the clients (a connection pool per serving thread,
//! and hyper-util's client for token fetches), the request that goes
//! upstream (`request`) and the verdict on the answer (`verdict`).
//!
//! Upstream TLS is always verified (webpki roots plus `[upstream] extra_ca`);
//! connections are pooled per upstream with keep-alive; redirects are never
//! followed.

use std::sync::Arc;
use std::time::Duration;

use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

mod connect;
mod pool;
mod request;
mod verdict;
/// For the `upstream_answer` fuzz target (built with `--features fuzzing`).
#[cfg(any(test, feature = "fuzzing"))]
pub use crate::http1::answer::{ReadAnswer, read_answer};
pub use connect::{Connector, Forward, Tcp};
pub use pool::{Http1Error, Pool, UpstreamBody};
pub use request::{
    Outgoing, X_ESRI_AUTHORIZATION, X_REQUEST_ID, build_request, clean_response_headers,
    each_upstream_header, request_target, supported_encodings, to_uri,
};
pub use verdict::{Answer, PEEK_LIMIT, Verdict, inspect, is_token_error};

use crate::body::ProxyBody;
use crate::config::Config;
use crate::tls;

/// The pooled client for token fetches (HTTP/1.1 and HTTP/2 over
/// verified TLS), through the outbound proxy where one applies.
#[derive(Clone)]
pub struct HttpClient {
    client: Client<HttpsConnector<Connector>, ProxyBody>,
    connector: Connector,
}

impl HttpClient {
    /// Sends `req`. A plain-`http` request that goes to a forward proxy
    /// carries the proxy's credentials (hyper-util writes the absolute
    /// form; a tunnel carries them in its `CONNECT`).
    pub async fn request(
        &self,
        mut req: http::Request<ProxyBody>,
    ) -> Result<http::Response<hyper::body::Incoming>, hyper_util::client::legacy::Error> {
        if let Some(auth) = self.connector.forward_authorization(req.uri()) {
            req.headers_mut()
                .insert(http::header::PROXY_AUTHORIZATION, auth);
        }
        self.client.request(req).await
    }
}

/// The upstream TLS settings with ALPN for HTTP/2 and HTTP/1.1, built once
/// and shared by every client (the root store is the bulk of its memory).
fn shared_tls(config: &Config) -> Arc<rustls::ClientConfig> {
    let mut tls = tls::client_config(&config.extra_ca);
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(tls)
}

/// How long an idle upstream connection is kept.
const POOL_IDLE: Duration = Duration::from_secs(90);
/// Idle upstream connections kept per origin and serving thread.
const POOL_MAX_IDLE: usize = 256;

/// The verifying TLS connector over `tcp` (direct or through the outbound
/// proxy).
fn verifying(tcp: &Connector, tls: &Arc<rustls::ClientConfig>) -> HttpsConnector<Connector> {
    HttpsConnector::from((tcp.clone(), Arc::clone(tls)))
}

fn client_sharing(tcp: &Connector, tls: &Arc<rustls::ClientConfig>) -> HttpClient {
    HttpClient {
        client: Client::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE)
            .pool_max_idle_per_host(POOL_MAX_IDLE)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(verifying(tcp, tls)),
        connector: tcp.clone(),
    }
}

/// Upstream connections: a pool per serving thread, so a request and the
/// upstream connection it uses live on the same thread and never wake each
/// other across cores, plus a client for token fetches and background work.
#[derive(Clone)]
pub struct Clients {
    control: HttpClient,
    shards: Arc<[Arc<Pool>]>,
}

impl Clients {
    /// Clients for `shards` serving threads (at least one).
    pub fn new(config: &Config, shards: usize) -> Clients {
        let tls = shared_tls(config);
        // One connector (and one NO_PROXY matcher) shared by every client.
        let tcp = Connector::new(&config.outbound, config.limits.upstream_connect_timeout);
        Clients {
            control: client_sharing(&tcp, &tls),
            shards: (0..shards.max(1))
                .map(|_| Arc::new(Pool::new(verifying(&tcp, &tls), POOL_IDLE, POOL_MAX_IDLE)))
                .collect(),
        }
    }

    /// The client for background work (token fetches).
    pub fn control(&self) -> &HttpClient {
        &self.control
    }

    /// The connection pool of serving thread `shard`.
    pub fn shard(&self, shard: usize) -> &Arc<Pool> {
        &self.shards[shard % self.shards.len()]
    }

    /// Number of serving-thread clients.
    pub fn shards(&self) -> usize {
        self.shards.len()
    }
}
