//! Test support: a throwaway PKI, a fake ArcGIS that records what it
//! receives, the proxy started in-process on port 0, and clients that speak to
//! it over real TLS (hyper for normal requests, raw bytes for hostile ones).

#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arcgis_app_proxy::config::{Config, Env};
use arcgis_app_proxy::{App, Listeners};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

pub type TestBody = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

pub fn full(b: impl Into<Bytes>) -> TestBody {
    Full::new(b.into()).map_err(|e| match e {}).boxed()
}

// ------------------------------------------------------------------ PKI

/// A CA and a leaf for localhost/127.0.0.1, written to a temp dir.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca_der: CertificateDer<'static>,
    pub leaf_chain: Vec<CertificateDer<'static>>,
    pub leaf_key_der: Vec<u8>,
}

impl Pki {
    pub fn new() -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "arcgis-app-proxy test CA");
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);

        let leaf_key = KeyPair::generate().unwrap();
        let leaf_params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();

        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca_cert.pem()).unwrap();
        std::fs::write(
            dir.path().join("proxy.crt"),
            format!("{}{}", leaf.pem(), ca_cert.pem()),
        )
        .unwrap();
        std::fs::write(dir.path().join("proxy.key"), leaf_key.serialize_pem()).unwrap();
        Pki {
            ca_der: ca_cert.der().clone(),
            leaf_chain: vec![leaf.der().clone(), ca_cert.der().clone()],
            leaf_key_der: leaf_key.serialize_der(),
            dir,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn server_config(&self, alpn: &[&[u8]]) -> Arc<rustls::ServerConfig> {
        let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            self.leaf_chain.clone(),
            PrivateKeyDer::Pkcs8(self.leaf_key_der.clone().into()),
        )
        .unwrap();
        cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        Arc::new(cfg)
    }

    pub fn client_config(
        &self,
        versions: &[&'static rustls::SupportedProtocolVersion],
        alpn: &[&[u8]],
    ) -> rustls::ClientConfig {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der.clone()).unwrap();
        let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
        cfg
    }
}

// ------------------------------------------------------------ fake ArcGIS

/// What the fake received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: Method,
    pub uri: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Recorded {
    pub fn query_param(&self, name: &str) -> Option<String> {
        let q = self.uri.split_once('?').map(|(_, q)| q)?;
        url::form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    }
}

/// How the token endpoint behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenMode {
    Ok,
    Reject,
    Down,
    Slow(Duration),
}

/// A fake ArcGIS: token endpoint plus services, recording every request.
pub struct FakeArcGis {
    pub addr: SocketAddr,
    pub scheme: &'static str,
    pub token_requests: AtomicUsize,
    pub token_forms: Mutex<Vec<String>>,
    pub mode: Mutex<TokenMode>,
    pub issued: Mutex<Vec<String>>,
    pub revoked: Mutex<HashSet<String>>,
    pub requests: Mutex<Vec<Recorded>>,
    pub lifetime_secs: AtomicUsize,
    /// When each issued token stops being accepted (issue + `expires_in`).
    pub expires: Mutex<HashMap<String, std::time::Instant>>,
    /// Service requests refused because their token had expired.
    pub expired_presented: AtomicUsize,
    /// The `client_id` each token was issued to.
    pub issued_to: Mutex<HashMap<String, String>>,
    /// Tokens issued with `client=referer`, and that referer: used with
    /// another Referer they are refused, as a portal refuses them.
    pub bound_referer: Mutex<HashMap<String, String>>,
    /// What `/arcgis/rest/info` answers: 200 (with authInfo), 401, or 0
    /// (200 without authInfo).
    pub info_status: AtomicUsize,
    /// `/arcgis/rest/info` requests seen.
    pub info_requests: AtomicUsize,
    /// When set, every token is treated as revoked.
    pub reject_all_tokens: std::sync::atomic::AtomicBool,
    /// TCP connections accepted.
    pub connections: AtomicUsize,
}

impl FakeArcGis {
    pub async fn start() -> Arc<FakeArcGis> {
        Self::start_with(None).await
    }

    pub async fn start_tls(tls: Arc<rustls::ServerConfig>) -> Arc<FakeArcGis> {
        Self::start_with(Some(tls)).await
    }

    async fn start_with(tls: Option<Arc<rustls::ServerConfig>>) -> Arc<FakeArcGis> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let fake = Arc::new(FakeArcGis {
            addr: listener.local_addr().unwrap(),
            scheme: if tls.is_some() { "https" } else { "http" },
            token_requests: AtomicUsize::new(0),
            token_forms: Mutex::new(Vec::new()),
            mode: Mutex::new(TokenMode::Ok),
            issued: Mutex::new(Vec::new()),
            revoked: Mutex::new(HashSet::new()),
            requests: Mutex::new(Vec::new()),
            lifetime_secs: AtomicUsize::new(7200),
            expires: Mutex::new(HashMap::new()),
            expired_presented: AtomicUsize::new(0),
            issued_to: Mutex::new(HashMap::new()),
            bound_referer: Mutex::new(HashMap::new()),
            info_status: AtomicUsize::new(200),
            info_requests: AtomicUsize::new(0),
            reject_all_tokens: std::sync::atomic::AtomicBool::new(false),
            connections: AtomicUsize::new(0),
        });
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        let f = Arc::clone(&fake);
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                f.connections.fetch_add(1, Ordering::SeqCst);
                let f = Arc::clone(&f);
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let f = Arc::clone(&f);
                        async move { Ok::<_, Infallible>(f.handle(req).await) }
                    });
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    match acceptor {
                        Some(a) => {
                            if let Ok(s) = a.accept(stream).await {
                                let _ = builder.serve_connection(TokioIo::new(s), svc).await;
                            }
                        }
                        None => {
                            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                        }
                    }
                });
            }
        });
        fake
    }

    /// Base URL, e.g. `http://127.0.0.1:1234`.
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }

    pub fn set_mode(&self, m: TokenMode) {
        *self.mode.lock().unwrap() = m;
    }

    pub fn token_count(&self) -> usize {
        self.token_requests.load(Ordering::SeqCst)
    }

    pub fn connection_count(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    pub fn issued(&self) -> Vec<String> {
        self.issued.lock().unwrap().clone()
    }

    /// The `client_id` whose token the recorded request carried.
    pub fn client_of(&self, r: &Recorded) -> Option<String> {
        let token = self.presented_token(r)?;
        self.issued_to.lock().unwrap().get(&token).cloned()
    }

    pub fn revoke_all(&self) {
        let issued = self.issued();
        self.revoked.lock().unwrap().extend(issued);
    }

    /// Requests to services (not the token endpoint).
    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }

    /// The paths (without query) of the requests received, in order.
    pub fn paths(&self) -> Vec<String> {
        self.requests()
            .iter()
            .map(|r| r.uri.split('?').next().unwrap().to_string())
            .collect()
    }

    pub fn last(&self) -> Recorded {
        self.requests()
            .last()
            .cloned()
            .expect("fake received no request")
    }

    fn presented_token(&self, r: &Recorded) -> Option<String> {
        r.headers
            .get("x-esri-authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(String::from)
            .or_else(|| r.query_param("token"))
    }

    fn token_ok(&self, r: &Recorded) -> bool {
        if self.reject_all_tokens.load(Ordering::SeqCst) {
            return false;
        }
        match self.presented_token(r) {
            Some(t) => {
                let expired = self
                    .expires
                    .lock()
                    .unwrap()
                    .get(&t)
                    .is_some_and(|at| *at <= std::time::Instant::now());
                if expired {
                    self.expired_presented.fetch_add(1, Ordering::SeqCst);
                }
                let wrong_referer =
                    self.bound_referer
                        .lock()
                        .unwrap()
                        .get(&t)
                        .is_some_and(|bound| {
                            bound.as_str()
                                != r.headers
                                    .get("referer")
                                    .and_then(|v| v.to_str().ok())
                                    .unwrap_or("")
                        });
                !expired
                    && !wrong_referer
                    && self.issued.lock().unwrap().contains(&t)
                    && !self.revoked.lock().unwrap().contains(&t)
            }
            None => false,
        }
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<TestBody> {
        let enc = req
            .uri()
            .query()
            .and_then(|q| q.split('&').find_map(|p| p.strip_prefix("enc=")))
            .filter(|e| !e.is_empty())
            .map(String::from);
        let resp = self.handle_plain(req).await;
        match enc {
            Some(enc) => encode_response(resp, &enc).await,
            None => resp,
        }
    }

    async fn handle_plain(self: Arc<Self>, req: Request<Incoming>) -> Response<TestBody> {
        let (parts, body) = req.into_parts();
        let path = parts.uri.path().to_string();
        if path == "/sharing/rest/oauth2/token" {
            let body = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            return self.token(body).await;
        }
        if path == "/portal/sharing/rest/generateToken" || path == "/arcgis/tokens/generateToken" {
            let body = body
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            return self.generate_token(body).await;
        }
        if path == "/arcgis/rest/info" {
            self.info_requests.fetch_add(1, Ordering::SeqCst);
            return match self.info_status.load(Ordering::SeqCst) {
                401 => json(
                    StatusCode::UNAUTHORIZED,
                    serde_json::json!({"error":{"code":401,"message":"Unauthorized"}}),
                ),
                0 => json(StatusCode::OK, serde_json::json!({"currentVersion": 11.1})),
                _ => json(
                    StatusCode::OK,
                    serde_json::json!({"currentVersion": 11.1, "authInfo": {
                        "isTokenBasedSecurity": true,
                        "tokenServicesUrl": format!("{}/portal/sharing/rest/generateToken", self.url())}}),
                ),
            };
        }
        // The streaming endpoint answers before the request body ends.
        let body = if path.starts_with("/svc/upload-stream") {
            let mut total = 0usize;
            let mut body = body;
            while let Some(Ok(frame)) = body.frame().await {
                if let Some(d) = frame.data_ref() {
                    total += d.len();
                }
            }
            Bytes::from(total.to_string())
        } else {
            body.collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default()
        };
        let rec = Recorded {
            method: parts.method.clone(),
            uri: parts.uri.to_string(),
            headers: parts.headers.clone(),
            body,
        };
        self.requests.lock().unwrap().push(rec.clone());
        let token = self.presented_token(&rec);
        let token_ok = self.token_ok(&rec);
        let query = parts.uri.query().unwrap_or("").to_string();

        if path.starts_with("/svc/echo")
            || path.starts_with("/open/")
            || path.starts_with("/arcgis/rest/services/echo")
        {
            let headers: serde_json::Map<String, serde_json::Value> = rec
                .headers
                .iter()
                .map(|(k, v)| {
                    let v = if k == "x-esri-authorization" {
                        "<present>".into()
                    } else {
                        String::from_utf8_lossy(v.as_bytes()).into_owned()
                    };
                    (k.to_string(), v.into())
                })
                .collect();
            let mut resp = json(
                StatusCode::OK,
                serde_json::json!({
                    "method": rec.method.as_str(),
                    "path": path,
                    "query": query,
                    "headers": headers,
                    "body": String::from_utf8_lossy(&rec.body),
                    "token_ok": token_ok,
                }),
            );
            let h = resp.headers_mut();
            h.insert("set-cookie", HeaderValue::from_static("session=abc"));
            h.insert("x-upstream", HeaderValue::from_static("yes"));
            h.insert("access-control-allow-origin", HeaderValue::from_static("*"));
            h.insert("connection", HeaderValue::from_static("x-hop-by-hop"));
            h.insert("x-hop-by-hop", HeaderValue::from_static("1"));
            h.insert(
                "proxy-authenticate",
                HeaderValue::from_static("Basic realm=\"corporate proxy\""),
            );
            h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
            return resp;
        }
        if path.starts_with("/svc/jsonp") {
            // JSONP, as ArcGIS answers `callback=`: errors wrapped too.
            let cb = url::form_urlencoded::parse(query.as_bytes())
                .find(|(k, _)| k == "callback")
                .map(|(_, v)| v.into_owned())
                .unwrap_or_else(|| "cb".into());
            let inner = if token_ok {
                serde_json::json!({"ok": true, "echo": token.clone().unwrap_or_default()})
            } else {
                serde_json::json!({"error":{"code":498,"message":"Invalid token.","details":[]}})
            };
            let mut resp = Response::new(full(format!("{cb}({inner});")));
            resp.headers_mut().insert(
                "content-type",
                HeaderValue::from_static("text/javascript; charset=utf-8"),
            );
            return resp;
        }
        if !token_ok {
            if path.starts_with("/svc/json498") {
                return json(
                    StatusCode::OK,
                    serde_json::json!({"error":{"code":498,"message":"Invalid token.","details":[]}}),
                );
            }
            if path.starts_with("/svc/http498") {
                return json(
                    StatusCode::from_u16(498).unwrap(),
                    serde_json::json!({"error":{"code":498,"message":"Invalid token.","details":[]}}),
                );
            }
            return json(
                StatusCode::OK,
                serde_json::json!({"error":{"code":499,"message":"Token Required","messageCode":"GWM_0003","details":[]}}),
            );
        }
        let token = token.unwrap_or_default();
        if path.starts_with("/svc/print/") {
            // A print service: answers with the output's URL; the test reads
            // the Web_Map_as_JSON it was sent from `requests()`.
            return json(
                StatusCode::OK,
                serde_json::json!({"results":[{"paramName":"Output_File",
                    "value":{"url": format!("{}/svc/print/output/map.pdf", self.url())}}]}),
            );
        }
        let me = self.url();
        if path.starts_with("/svc/leak/style") {
            return json(
                StatusCode::OK,
                serde_json::json!({
                    "version": 8,
                    "sprite": format!("{me}/svc/styles/x/sprite?token={token}"),
                    "glyphs": format!("{me}/svc/fonts/{{fontstack}}/{{range}}.pbf?token={token}"),
                    "sources": {"esri": {"type": "vector",
                        "tiles": [format!("{me}/svc/tiles/{{z}}/{{y}}/{{x}}.pbf?token={token}&x=1")],
                        "attribution": format!("token {token} and an encoded copy {}", encoded(&token))}},
                    "next": format!("{me}/open/page?token={token}"),
                    "elsewhere": format!("https://elsewhere.example/a?token={token}"),
                }),
            );
        }
        if path.starts_with("/svc/leak/error") {
            return json(
                StatusCode::OK,
                serde_json::json!({"error":{"code":400,
                    "message": format!("Unable to complete operation for {me}{path}?{query}"),
                    "details":[format!("token={token}")]}}),
            );
        }
        if path.starts_with("/svc/leak/chunks") {
            let text = format!(
                "<html><a href=\"{me}/svc/a?token={token}\">next</a> {token} <script>var t='{token}';</script>{}</html>",
                "x".repeat(5000)
            );
            let pieces: Vec<Result<Frame<Bytes>, Box<dyn std::error::Error + Send + Sync>>> = text
                .into_bytes()
                .chunks(3)
                .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
                .collect();
            let mut resp =
                Response::new(StreamBody::new(futures_util::stream::iter(pieces)).boxed());
            resp.headers_mut()
                .insert("content-type", HeaderValue::from_static("text/html"));
            return resp;
        }
        if path.starts_with("/svc/leak/headers") {
            let mut resp = json(StatusCode::OK, serde_json::json!({"ok": true}));
            let h = resp.headers_mut();
            let v = |s: String| HeaderValue::from_str(&s).unwrap();
            h.insert(
                "link",
                v(format!(
                    "<{me}/svc/page2?token={token}&f=json>; rel=\"next\""
                )),
            );
            h.insert("refresh", v(format!("0; url={me}/svc/x?token={token}")));
            h.insert(
                "content-location",
                v(format!("{me}/svc/leak/headers?token={token}")),
            );
            h.insert("x-echo-token", v(token.clone()));
            return resp;
        }
        if path.starts_with("/svc/leak/image") {
            let mut resp = Response::new(full(format!("PNG...{token}...")));
            resp.headers_mut()
                .insert("content-type", HeaderValue::from_static("image/png"));
            return resp;
        }
        if path.starts_with("/svc/redirect") {
            let mut resp = Response::new(full(""));
            *resp.status_mut() = StatusCode::FOUND;
            let target = query
                .split('&')
                .find_map(|p| p.strip_prefix("to="))
                .unwrap_or("/svc/echo/next");
            let loc = format!("{target}?f=json&token={token}");
            resp.headers_mut()
                .insert("location", HeaderValue::from_str(&loc).unwrap());
            resp.headers_mut().insert(
                "x-debug",
                HeaderValue::from_str(&format!("issued to {token}")).unwrap(),
            );
            return resp;
        }
        if path.starts_with("/svc/slow") {
            tokio::time::sleep(Duration::from_secs(5)).await;
            return json(StatusCode::OK, serde_json::json!({"slow": true}));
        }
        if path.starts_with("/svc/large") || path.starts_with("/svc/leak/large") {
            // A feature answer of about 400 KB, varied enough that it stays
            // well above 16 KiB compressed; with the token in its middle
            // under /svc/leak/.
            let mut x: u64 = 11;
            let mut half = String::new();
            while half.len() < 200_000 {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let (a, b) = ((x >> 20) % 1_000_000, (x >> 40) % 1_000_000);
                half.push_str(&format!(
                    r#"{{"attributes":{{"OBJECTID":{a},"NAME":"Park {b}"}},"geometry":{{"x":-122.{a},"y":37.{b}}}}},"#
                ));
            }
            let middle = if path.starts_with("/svc/leak/") {
                format!(r#"{{"url":"{me}/svc/a?token={token}&f=json"}},"#)
            } else {
                String::new()
            };
            let mut r = Response::new(full(format!(
                r#"{{"features":[{half}{middle}{half}{{}}]}}"#
            )));
            r.headers_mut()
                .insert("content-type", HeaderValue::from_static("application/json"));
            return r;
        }
        if path.starts_with("/svc/big") {
            // 16 MiB in 64 KiB chunks, produced lazily.
            let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
            let stream = futures_util::stream::iter((0..256).map(move |_| {
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Frame::data(chunk.clone()))
            }));
            let mut resp = Response::new(StreamBody::new(stream).boxed());
            resp.headers_mut().insert(
                "content-type",
                HeaderValue::from_static("application/octet-stream"),
            );
            return resp;
        }
        if path.starts_with("/svc/upload-stream") {
            return json(
                StatusCode::OK,
                serde_json::json!({"received": String::from_utf8_lossy(&rec.body)}),
            );
        }
        if path.starts_with("/svc/close") {
            // hyper closes the connection after this answer.
            let mut resp = json(StatusCode::OK, serde_json::json!({"closing": true}));
            resp.headers_mut()
                .insert("connection", HeaderValue::from_static("close"));
            return resp;
        }
        if path.starts_with("/svc/features") {
            return json(
                StatusCode::OK,
                serde_json::json!({"features":[{"attributes":{"OBJECTID":1}},{"attributes":{"OBJECTID":2}}]}),
            );
        }
        if path.starts_with("/svc/http498") || path.starts_with("/svc/json498") {
            return json(StatusCode::OK, serde_json::json!({"ok": true}));
        }
        json(
            StatusCode::NOT_FOUND,
            serde_json::json!({"error":{"code":404}}),
        )
    }

    async fn token(&self, body: Bytes) -> Response<TestBody> {
        self.token_requests.fetch_add(1, Ordering::SeqCst);
        let form = String::from_utf8_lossy(&body).to_string();
        self.token_forms.lock().unwrap().push(form);
        let mode = *self.mode.lock().unwrap();
        match mode {
            TokenMode::Down => {
                let mut r = Response::new(full("<html>503 Service Unavailable</html>"));
                *r.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                return r;
            }
            TokenMode::Reject => {
                return json(
                    StatusCode::OK,
                    serde_json::json!({"error":{"code":400,"error":"invalid_client_id",
                        "error_description":"Invalid client_id","message":"Invalid client_id","details":[]}}),
                );
            }
            TokenMode::Slow(d) => tokio::time::sleep(d).await,
            TokenMode::Ok => {}
        }
        let client_id = url::form_urlencoded::parse(&body)
            .find(|(k, _)| k == "client_id")
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default();
        let (token, lifetime) = self.issue(client_id);
        json(
            StatusCode::OK,
            serde_json::json!({"access_token": token, "expires_in": lifetime}),
        )
    }

    /// A new token for `owner` (a client ID or username), valid for
    /// `lifetime_secs`; returns it and its lifetime.
    fn issue(&self, owner: String) -> (String, usize) {
        let n = self.issued.lock().unwrap().len();
        // Realistic token alphabet, including a `=` that must be
        // percent-encoded in a query.
        let token = format!(
            "TOKEN{n}x{:012x}.a-b_c=",
            fastrand::u64(..) & 0xffff_ffff_ffff
        );
        self.issued.lock().unwrap().push(token.clone());
        self.issued_to.lock().unwrap().insert(token.clone(), owner);
        let lifetime = self.lifetime_secs.load(Ordering::SeqCst);
        self.expires.lock().unwrap().insert(
            token.clone(),
            std::time::Instant::now() + Duration::from_secs(lifetime as u64),
        );
        (token, lifetime)
    }

    /// `generateToken` (portal or stand-alone server): username
    /// `svc_publicmaps` with password `SECRET`.
    async fn generate_token(&self, body: Bytes) -> Response<TestBody> {
        self.token_requests.fetch_add(1, Ordering::SeqCst);
        let form = String::from_utf8_lossy(&body).to_string();
        self.token_forms.lock().unwrap().push(form);
        let get = |k: &str| {
            url::form_urlencoded::parse(&body)
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.into_owned())
        };
        if get("username").as_deref() != Some("svc_publicmaps")
            || get("password").as_deref() != Some(SECRET)
        {
            return json(
                StatusCode::OK,
                serde_json::json!({"error":{"code":400,"message":"Unable to generate token.",
                    "details":["Invalid username or password."]}}),
            );
        }
        let (token, lifetime) = self.issue(get("username").unwrap_or_default());
        // client=referer binds the token to that Referer, as a portal does.
        if get("client").as_deref() == Some("referer") {
            self.bound_referer
                .lock()
                .unwrap()
                .insert(token.clone(), get("referer").unwrap_or_default());
        }
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        json(
            StatusCode::OK,
            serde_json::json!({"token": token, "expires": now_ms + lifetime as u64 * 1000, "ssl": false}),
        )
    }
}

/// Re-encodes a response body with `enc` (gzip, deflate, br, or a coding
/// the proxy cannot read, like zstd, which is sent unchanged but labelled).
async fn encode_response(resp: Response<TestBody>, enc: &str) -> Response<TestBody> {
    let (mut parts, body) = resp.into_parts();
    let plain = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let encoded = encode_body(enc, &plain);
    parts
        .headers
        .insert("content-encoding", HeaderValue::from_str(enc).unwrap());
    parts.headers.remove("content-length");
    Response::from_parts(parts, full(encoded))
}

/// `plain` in content coding `enc` as the fake encodes its answers (`gzip`,
/// `deflate`, `br`; anything else as it is).
pub fn encode_body(enc: &str, plain: &[u8]) -> Vec<u8> {
    use std::io::Write;
    match enc {
        "gzip" => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(plain).unwrap();
            e.finish().unwrap()
        }
        "deflate" => {
            let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(plain).unwrap();
            e.finish().unwrap()
        }
        "br" => {
            let mut out = Vec::new();
            {
                let mut w = brotli::CompressorWriter::new(&mut out, 4096, 5, 22);
                w.write_all(plain).unwrap();
            }
            out
        }
        _ => plain.to_vec(),
    }
}

/// Decodes a body by its `content-encoding` (test side).
pub fn decode(headers: &HeaderMap, body: &[u8]) -> Vec<u8> {
    use std::io::Read;
    let mut out = Vec::new();
    match headers.get("content-encoding").map(|v| v.to_str().unwrap()) {
        None => out.extend_from_slice(body),
        Some("gzip") => {
            flate2::read::GzDecoder::new(body)
                .read_to_end(&mut out)
                .unwrap();
        }
        Some("deflate") => {
            flate2::read::ZlibDecoder::new(body)
                .read_to_end(&mut out)
                .unwrap();
        }
        Some("br") => {
            brotli::Decompressor::new(body, 4096)
                .read_to_end(&mut out)
                .unwrap();
        }
        Some(other) => panic!("unexpected coding {other}"),
    }
    out
}

/// A token as a URL encoder would write it in a query.
pub fn encoded(token: &str) -> String {
    url::form_urlencoded::byte_serialize(token.as_bytes()).collect()
}

pub fn json(status: StatusCode, v: serde_json::Value) -> Response<TestBody> {
    let mut r = Response::new(full(v.to_string()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert("content-type", HeaderValue::from_static("application/json"));
    r
}

// ---------------------------------------------------------------- proxy

pub struct MapEnv(pub Vec<(&'static str, String)>);

impl Env for MapEnv {
    fn var(&self, name: &str) -> Option<String> {
        self.0
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.clone())
    }
}

pub const SECRET: &str = "client-secret-Zq9";

/// A proxy running in-process on 127.0.0.1:0.
pub struct TestProxy {
    pub addr: SocketAddr,
    pub plain_addr: Option<SocketAddr>,
    pub admin_addr: Option<SocketAddr>,
    pub app: Arc<App>,
    shutdown: Option<oneshot::Sender<()>>,
    pub done: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl TestProxy {
    /// Starts a proxy from TOML; `{CERT}`, `{KEY}`, `{CA}` are replaced with
    /// the PKI's files.
    pub async fn start(pki: &Pki, toml: &str) -> TestProxy {
        Self::start_env(pki, toml, &[]).await
    }

    /// Like `start`, with these environment variables besides `SECRET` and
    /// `APIKEY` (the config reads only this map, never the process's).
    pub async fn start_env(pki: &Pki, toml: &str, vars: &[(&'static str, &str)]) -> TestProxy {
        let text = toml
            .replace("{CERT}", pki.path("proxy.crt").to_str().unwrap())
            .replace("{KEY}", pki.path("proxy.key").to_str().unwrap())
            .replace("{CA}", pki.path("ca.pem").to_str().unwrap());
        let mut env = MapEnv(vec![
            ("SECRET", SECRET.to_string()),
            ("APIKEY", "API-KEY-123".into()),
        ]);
        env.0.extend(vars.iter().map(|(k, v)| (*k, v.to_string())));
        let config = Config::from_toml(&text, Path::new("test.toml"), pki.dir.path(), &env)
            .unwrap_or_else(|e| panic!("test config invalid:\n{e}"));
        let config = Arc::new(config);
        let listeners = Listeners::bind(&config).await.unwrap();
        let addr = listeners
            .tls
            .as_ref()
            .or(listeners.plain.as_ref())
            .unwrap()
            .local_addr()
            .unwrap();
        let plain_addr = listeners.plain.as_ref().map(|l| l.local_addr().unwrap());
        let admin_addr = listeners.admin.as_ref().map(|l| l.local_addr().unwrap());
        let app = App::new(config);
        let (tx, rx) = oneshot::channel::<()>();
        let done = tokio::spawn(arcgis_app_proxy::server::run(
            Arc::clone(&app),
            listeners,
            async move {
                let _ = rx.await;
            },
        ));
        TestProxy {
            addr,
            plain_addr,
            admin_addr,
            app,
            shutdown: Some(tx),
            done,
        }
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.done).await;
    }
}

/// Sets `key = value` in a config text, replacing an existing line for the
/// key or adding it under `[section]`.
pub fn set_key(toml: &str, section: &str, line: &str) -> String {
    let key = line.split('=').next().unwrap().trim();
    if let Some(existing) = toml
        .lines()
        .find(|l| l.split('=').next().unwrap().trim() == key)
    {
        return toml.replacen(existing, line, 1);
    }
    toml.replacen(
        &format!("[{section}]\n"),
        &format!("[{section}]\n{line}\n"),
        1,
    )
}

/// Replaces `{CERT}`, `{KEY}`, `{CA}` with the PKI's files.
pub fn fill_paths(pki: &Pki, toml: &str) -> String {
    toml.replace("{CERT}", pki.path("proxy.crt").to_str().unwrap())
        .replace("{KEY}", pki.path("proxy.key").to_str().unwrap())
        .replace("{CA}", pki.path("ca.pem").to_str().unwrap())
}

/// Validates a test config (see [`TestProxy::start`] for the placeholders).
pub fn test_config(pki: &Pki, toml: &str) -> Config {
    let text = fill_paths(pki, toml);
    let env = MapEnv(vec![
        ("SECRET", SECRET.to_string()),
        ("APIKEY", "API-KEY-123".into()),
    ]);
    Config::from_toml(&text, Path::new("test.toml"), pki.dir.path(), &env)
        .unwrap_or_else(|e| panic!("test config invalid:\n{e}"))
}

/// A standard config: HTTPS listener, a client-credentials credential against
/// `fake`, routes `/svc` (header) and `/q` (query) and an unmounted one.
pub fn standard_config(fake: &FakeArcGis, extra: &str) -> String {
    format!(
        r#"
[server]
listen = "127.0.0.1:0"
tls_cert = "{{CERT}}"
tls_key = "{{KEY}}"
admin_listen = "127.0.0.1:0"
[limits]
max_request_body_bytes = 1048576
retry_body_bytes = 65536
upstream_timeout_secs = 2
header_read_timeout_secs = 2
[referers]
allowed = ["https://app.example.com", "https://*.example.org", "http://localhost:*"]
[upstream]
extra_ca = "{{CA}}"
[credentials.online]
token_url = "{base}/sharing/rest/oauth2/token"
client_id = "the-client-id"
client_secret_env = "SECRET"
[[routes]]
upstream = "{base}/svc"
credential = "online"
mount = "/svc"
[[routes]]
name = "query-route"
upstream = "{base}/svc"
credential = "online"
mount = "/q"
token_in = "query"
[[routes]]
name = "open"
upstream = "{base}/open"
mount = "/open"
{extra}
"#,
        base = fake.url()
    )
}

// ---------------------------------------------------------------- client

pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// Trailer fields, when the answer carried any.
    pub trailers: Option<HeaderMap>,
    pub version: http::Version,
}

impl Answer {
    fn new(parts: http::response::Parts, collected: http_body_util::Collected<Bytes>) -> Answer {
        Answer {
            status: parts.status,
            headers: parts.headers,
            trailers: collected.trailers().cloned(),
            body: collected.to_bytes(),
            version: parts.version,
        }
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    /// Asserts an ArcGIS-shaped error with this status.
    pub fn assert_error(&self, status: u16) {
        assert_eq!(self.status.as_u16(), status, "body: {}", self.text());
        assert_eq!(self.headers["content-type"], "application/json");
        let j = self.json();
        assert_eq!(j["error"]["code"], status, "{j}");
        assert!(j["error"]["message"].is_string(), "{j}");
        assert!(j["error"]["details"].is_array(), "{j}");
    }
}

/// An HTTPS client trusting the test CA.
pub struct TestClient {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector>, TestBody>,
    pub base: String,
}

impl TestClient {
    pub fn new(pki: &Pki, addr: SocketAddr) -> TestClient {
        Self::with(pki, addr, false)
    }

    pub fn h2(pki: &Pki, addr: SocketAddr) -> TestClient {
        Self::with(pki, addr, true)
    }

    fn with(pki: &Pki, addr: SocketAddr, h2: bool) -> TestClient {
        let tls = pki.client_config(&[&rustls::version::TLS13, &rustls::version::TLS12], &[]);
        let b = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http();
        let connector = if h2 {
            b.enable_http2().build()
        } else {
            b.enable_http1().build()
        };
        let mut builder = Client::builder(TokioExecutor::new());
        if h2 {
            builder.http2_only(true);
        }
        TestClient {
            client: builder.build(connector),
            base: format!("https://localhost:{}", addr.port()),
        }
    }

    pub fn plain(addr: SocketAddr) -> TestClient {
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .build();
        TestClient {
            client: Client::builder(TokioExecutor::new()).build(connector),
            base: format!("http://127.0.0.1:{}", addr.port()),
        }
    }

    pub async fn send(&self, req: Request<TestBody>) -> Answer {
        let resp = tokio::time::timeout(Duration::from_secs(20), self.client.request(req))
            .await
            .expect("request timed out")
            .expect("request failed");
        let (parts, body) = resp.into_parts();
        Answer::new(parts, body.collect().await.expect("body failed"))
    }

    /// Like `send`, but `None` when the exchange fails.
    pub async fn try_send(&self, req: Request<TestBody>) -> Option<Answer> {
        let resp = tokio::time::timeout(Duration::from_secs(20), self.client.request(req))
            .await
            .ok()?
            .ok()?;
        let (parts, body) = resp.into_parts();
        Some(Answer::new(parts, body.collect().await.ok()?))
    }

    pub fn req(&self, method: &str, path: &str) -> http::request::Builder {
        Request::builder()
            .method(method)
            .uri(format!("{}{}", self.base, path))
    }

    /// GET with an allowed Referer.
    pub async fn get(&self, path: &str) -> Answer {
        self.send(
            self.req("GET", path)
                .header("referer", "https://app.example.com/map.html")
                .body(full(""))
                .unwrap(),
        )
        .await
    }

    pub async fn get_with(&self, path: &str, headers: &[(&str, &str)]) -> Answer {
        let mut b = self.req("GET", path);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        self.send(b.body(full("")).unwrap()).await
    }
}

/// A TLS connection to the proxy as `localhost`, trusting the test CA.
pub async fn tls_connect(
    pki: &Pki,
    addr: SocketAddr,
    version: &'static rustls::SupportedProtocolVersion,
    alpn: &[&[u8]],
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    tls_connect_with(&Arc::new(pki.client_config(&[version], alpn)), addr).await
}

/// A TLS connection to the proxy as `localhost` with a given client config
/// (one config shared by several connections also shares its stored
/// sessions).
pub async fn tls_connect_with(
    cfg: &Arc<rustls::ClientConfig>,
    addr: SocketAddr,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(Arc::clone(cfg))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
}

/// The value of one sample in a Prometheus text exposition.
pub fn sample(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(name_and_labels) && l[name_and_labels.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Sends raw bytes over TLS and returns everything read until the server
/// closes or `wait` passes.
pub async fn raw_tls(pki: &Pki, addr: SocketAddr, bytes: &[u8], wait: Duration) -> String {
    let mut tls = tls_connect(pki, addr, &rustls::version::TLS13, &[b"http/1.1"])
        .await
        .unwrap();
    tls.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait, tls.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// The status code of the first response in raw HTTP/1 output.
pub fn raw_status(out: &str) -> Option<u16> {
    out.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

// ------------------------------------------------------------ real binary

pub const BIN: &str = env!("CARGO_BIN_EXE_arcgis-app-proxy");

/// Writes a file and returns its path as a string.
pub fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_string()
}

/// A config file for the real binary, placeholders filled in.
pub fn write_config(pki: &Pki, name: &str, toml: &str) -> String {
    write(pki.dir.path(), name, &fill_paths(pki, toml))
}

/// A child process whose stderr lines are collected on a thread.
/// The environment variables that name an outbound proxy.
pub const PROXY_VARS: [&str; 8] = [
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "ALL_PROXY",
    "all_proxy",
    "NO_PROXY",
    "no_proxy",
];

pub struct Proc {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Proc {
    pub fn spawn(args: &[&str], envs: &[(&str, &str)]) -> Proc {
        let mut cmd = Command::new(BIN);
        // A proxy set on the machine running the tests must not route the
        // binary's connections to the local fakes.
        for var in PROXY_VARS {
            cmd.env_remove(var);
        }
        let mut child = cmd
            .args(args)
            .envs(envs.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, rx) = mpsc::channel();
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            });
        }
        Proc {
            child,
            lines: rx,
            seen: Vec::new(),
        }
    }

    /// Waits for a line containing `needle` and returns it.
    pub fn wait_for(&mut self, needle: &str) -> String {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        if let Some(l) = self.seen.iter().find(|l| l.contains(needle)) {
            return l.clone();
        }
        while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(_) => break,
            }
        }
        panic!("no line with {needle:?}; got:\n{}", self.seen.join("\n"));
    }

    /// `arcgis-app-proxy demo` on ports the system picks, with `extra`
    /// arguments (`--fake ADDR`).
    pub fn demo(extra: &[&str]) -> Proc {
        let mut args = vec!["demo", "--listen", "127.0.0.1:0", "--page", "127.0.0.1:0"];
        args.extend_from_slice(extra);
        Proc::spawn(&args, &[])
    }

    /// The URL at the end of the demo's banner line containing `label`
    /// (`map page`, `fake ArcGIS`, `proxy (self-signed certificate`, …).
    pub fn demo_url(&mut self, label: &str) -> String {
        let line = self.wait_for(label);
        line.split_whitespace().last().unwrap().to_string()
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The address of the listener named `name` (`https`, `admin`, …),
    /// from its start-up log line.
    pub fn listener(&mut self, name: &str) -> SocketAddr {
        addr_in(&self.wait_for(&format!(r#""listener":"{name}""#)))
            .parse()
            .unwrap()
    }

    /// Sends a signal by name (`HUP`, `TERM`).
    pub fn signal(&self, sig: &str) {
        let _ = std::process::Command::new("kill")
            .args([&format!("-{sig}"), &self.child.id().to_string()])
            .status();
    }

    /// Waits for the process to exit on its own (no signal), and returns
    /// the exit code and all output.
    pub fn wait(mut self) -> (i32, String) {
        let status = self.child.wait().unwrap();
        while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(500)) {
            self.seen.push(line);
        }
        (status.code().unwrap_or(-1), self.seen.join("\n"))
    }

    /// SIGTERM, wait for exit, and return the exit code and all output.
    pub fn terminate(mut self) -> (i32, String) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let status = self.child.wait().unwrap();
        while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(500)) {
            self.seen.push(line);
        }
        (status.code().unwrap_or(-1), self.seen.join("\n"))
    }
}

/// The `addr` field of a JSON log line.
pub fn addr_in(line: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    v["addr"].as_str().unwrap().to_string()
}

// ---------------------------------------------------------------- forward proxy

/// Reads one HTTP/1 request head from `s` for a bare test upstream and
/// returns it, taken out of `buf` (which keeps any bytes read past it for
/// the next call); `None` once the peer closes or the read fails.
pub async fn read_head(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<String> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..i + 4]).into_owned();
            buf.drain(..i + 4);
            return Some(head);
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// What a [`ForwardProxy`] saw on one client connection.
#[derive(Debug, Clone)]
pub struct ProxiedConn {
    /// The request line: `CONNECT host:port HTTP/1.1`, or an absolute-form
    /// request such as `GET http://host:port/path HTTP/1.1`.
    pub request_line: String,
    /// Its `Proxy-Authorization`, if any.
    pub authorization: Option<String>,
}

/// A small corporate outbound proxy: `CONNECT` tunnels (counted) and
/// absolute-form plain-HTTP requests, each relayed to the target named. It
/// can demand credentials (407 without them) and refuse tunnels (403).
pub struct ForwardProxy {
    pub addr: SocketAddr,
    pub tunnels: AtomicUsize,
    pub seen: Mutex<Vec<ProxiedConn>>,
    /// `Proxy-Authorization` value required, if any.
    pub require: Mutex<Option<String>>,
    /// Refuse every CONNECT with 403.
    pub refuse: std::sync::atomic::AtomicBool,
}

impl ForwardProxy {
    pub async fn start() -> Arc<ForwardProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = Arc::new(ForwardProxy {
            addr: listener.local_addr().unwrap(),
            tunnels: AtomicUsize::new(0),
            seen: Mutex::new(Vec::new()),
            require: Mutex::new(None),
            refuse: std::sync::atomic::AtomicBool::new(false),
        });
        let p = Arc::clone(&proxy);
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let p = Arc::clone(&p);
                tokio::spawn(async move {
                    let _ = p.serve(stream).await;
                });
            }
        });
        proxy
    }

    /// `http://127.0.0.1:port`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn seen(&self) -> Vec<ProxiedConn> {
        self.seen.lock().unwrap().clone()
    }

    async fn serve(&self, mut client: TcpStream) -> std::io::Result<()> {
        let mut buf = Vec::new();
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            let n = client.read(&mut chunk).await?;
            if n == 0 || buf.len() > 64 * 1024 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        let mut lines = head.split("\r\n");
        let request_line = lines.next().unwrap_or_default().to_string();
        let authorization = lines.clone().find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case("proxy-authorization")
                .then(|| v.trim().to_string())
        });
        self.seen.lock().unwrap().push(ProxiedConn {
            request_line: request_line.clone(),
            authorization: authorization.clone(),
        });
        let required = self.require.lock().unwrap().clone();
        if required.is_some() && authorization != required {
            client
                .write_all(b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"corp\"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                .await?;
            return Ok(());
        }
        let mut parts = request_line.split(' ');
        let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        if method == "CONNECT" {
            if self.refuse.load(Ordering::SeqCst) {
                client
                    .write_all(
                        b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    )
                    .await?;
                return Ok(());
            }
            let mut upstream = TcpStream::connect(target).await?;
            self.tunnels.fetch_add(1, Ordering::SeqCst);
            client
                .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                .await?;
            upstream.write_all(&buf[head_end..]).await?;
            tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
            return Ok(());
        }
        // Absolute form: connect to the named origin and relay, the first
        // request rewritten to origin form without the proxy's header (later
        // ones on the connection go as they are; HTTP/1.1 servers accept
        // absolute-form targets).
        let Some(rest) = target.strip_prefix("http://") else {
            client
                .write_all(
                    b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                )
                .await?;
            return Ok(());
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let mut upstream = TcpStream::connect(authority).await?;
        let mut out = format!("{method} {path} {}\r\n", parts.next().unwrap_or("HTTP/1.1"));
        for l in lines.filter(|l| !l.is_empty()) {
            if !l.to_ascii_lowercase().starts_with("proxy-authorization:") {
                out.push_str(l);
                out.push_str("\r\n");
            }
        }
        out.push_str("\r\n");
        upstream.write_all(out.as_bytes()).await?;
        upstream.write_all(&buf[head_end..]).await?;
        tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
        Ok(())
    }
}

// ---------------------------------------------------------------- NetLog

/// Chromium's NetLog (`--log-net-log`, `--net-log-capture-mode=Everything`),
/// read back: every request of a page and its workers, with the headers
/// and the bytes sent and read.
pub struct NetLog {
    events: Vec<serde_json::Value>,
}

impl NetLog {
    pub fn read(path: &Path) -> NetLog {
        let log = std::fs::read_to_string(path).expect("netlog written");
        let log: serde_json::Value = serde_json::from_str(&log)
            .or_else(|_| {
                // Chromium may leave the closing brackets off when it exits fast.
                serde_json::from_str(&format!("{}]}}", log.trim_end().trim_end_matches(',')))
            })
            .expect("netlog is JSON");
        NetLog {
            events: log["events"].as_array().cloned().unwrap_or_default(),
        }
    }

    /// Every URL requested, in order.
    pub fn urls(&self) -> Vec<String> {
        self.events
            .iter()
            .filter_map(|e| e["params"]["url"].as_str().map(str::to_string))
            .collect()
    }

    /// The bytes (decoded) of the requests whose URL starts with `prefix`,
    /// a line per NetLog event.
    pub fn bytes_to(&self, prefix: &str) -> String {
        self.text(Some(prefix), false)
    }

    /// Bytes (decoded) and everything logged with them, URLs and headers
    /// included: of the requests to `prefix`, or of all with `None`.
    pub fn everything(&self, prefix: Option<&str>) -> String {
        self.text(prefix, true)
    }

    fn text(&self, prefix: Option<&str>, with_params: bool) -> String {
        use base64::Engine;
        // Requests by NetLog source id: a request's bytes come in events
        // that carry its id but not its URL.
        let sources: HashSet<u64> = self
            .events
            .iter()
            .filter(|e| {
                e["params"]["url"]
                    .as_str()
                    .is_some_and(|u| prefix.is_none_or(|p| u.starts_with(p)))
            })
            .filter_map(|e| e["source"]["id"].as_u64())
            .collect();
        let mut out = String::new();
        for e in &self.events {
            let ours = e["source"]["id"]
                .as_u64()
                .is_some_and(|id| sources.contains(&id));
            if prefix.is_some() && !ours {
                continue;
            }
            if let Some(b) = e["params"]["bytes"].as_str()
                && let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(b)
            {
                out.push_str(&String::from_utf8_lossy(&bytes));
                out.push('\n');
            }
            if with_params {
                out.push_str(&e["params"].to_string());
                out.push('\n');
            }
        }
        out
    }
}
