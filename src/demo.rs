//! `arcgis-app-proxy demo`: the proxy in front of an embedded fake ArcGIS, with
//! an in-memory self-signed certificate, so a newcomer sees it work without an
//! ArcGIS account.
//!
//! The fake serves a token endpoint (client credentials `demo-client` /
//! `demo-secret`), a hosted-feature-layer style `FeatureServer/0` with a query
//! endpoint that insists on a token (ArcGIS's HTTP-200 code 499 otherwise),
//! and a Basemap Styles v2 style whose URLs echo the token unless
//! `echoToken=false` is sent — the leak the proxy exists to prevent.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

use crate::body::{self, ProxyBody};
use crate::config::{Config, ProcessEnv};
use crate::server::Listeners;

mod basemap;
use basemap::{glyph_range, sprite_json, sprite_png, tile_png, vector_tile};

/// Client id the fake token endpoint accepts.
pub const DEMO_CLIENT_ID: &str = "demo-client";
/// Client secret the fake token endpoint accepts (a demo value, not a secret).
pub const DEMO_CLIENT_SECRET: &str = "demo-secret";

/// The fake ArcGIS: which tokens it issued.
#[derive(Default)]
struct Fake {
    issued: Mutex<Vec<String>>,
}

/// Starts the fake ArcGIS on a loopback port and returns its address.
pub async fn start_fake_arcgis() -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let fake = Arc::new(Fake::default());
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let fake = Arc::clone(&fake);
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let fake = Arc::clone(&fake);
                    async move { Ok::<_, Infallible>(fake.handle(req, addr).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

fn json(status: StatusCode, value: serde_json::Value) -> Response<ProxyBody> {
    let mut resp = Response::new(body::full(Bytes::from(value.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    resp
}

fn query_param(query: &str, name: &str) -> Option<String> {
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.into_owned())
}

impl Fake {
    fn token_valid(&self, req: &Request<Incoming>) -> Option<String> {
        let from_header = req
            .headers()
            .get("x-esri-authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_string);
        let from_query = req.uri().query().and_then(|q| query_param(q, "token"));
        let issued = self.issued.lock().expect("lock poisoned");
        from_header
            .or(from_query)
            .filter(|t| issued.iter().any(|i| i == t))
    }

    /// The client-credentials token endpoint: a token for the demo's own
    /// id and secret, an ArcGIS error otherwise.
    async fn issue_token(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        let body = req.into_body().collect().await.map(|b| b.to_bytes());
        let form = body.unwrap_or_default();
        let form = String::from_utf8_lossy(&form);
        let ok = query_param(&form, "client_id").as_deref() == Some(DEMO_CLIENT_ID)
            && query_param(&form, "client_secret").as_deref() == Some(DEMO_CLIENT_SECRET)
            && query_param(&form, "grant_type").as_deref() == Some("client_credentials");
        if !ok {
            return json(
                StatusCode::OK,
                serde_json::json!({"error":{"code":400,"error":"invalid_client_id",
                    "error_description":"Invalid client_id","message":"Invalid client_id","details":[]}}),
            );
        }
        let token = format!("demo-token-{:016x}", fastrand::u64(..));
        self.issued
            .lock()
            .expect("lock poisoned")
            .push(token.clone());
        json(
            StatusCode::OK,
            serde_json::json!({"access_token": token, "expires_in": 7200}),
        )
    }

    async fn handle(&self, req: Request<Incoming>, me: SocketAddr) -> Response<ProxyBody> {
        let path = req.uri().path().to_string();
        if path == "/sharing/rest/oauth2/token" && req.method() == Method::POST {
            return self.issue_token(req).await;
        }
        let token = self.token_valid(&req);
        let base = "/arcgis/rest/services";
        let Some(token) = token else {
            return json(
                StatusCode::OK,
                serde_json::json!({"error":{"code":499,"message":"Token Required",
                    "messageCode":"GWM_0003","details":["Token Required"]}}),
            );
        };
        let query = req.uri().query().unwrap_or("");
        match path.as_str() {
            p if p == format!("{base}/Parks/FeatureServer/0") => json(StatusCode::OK, layer_info()),
            p if p == format!("{base}/Parks/FeatureServer/0/query") => json(
                StatusCode::OK,
                parks(query_param(query, "f").as_deref() == Some("geojson")),
            ),
            p if p.starts_with(&format!("{base}/styles/v2/styles/"))
                && (p.ends_with("/sprite.json") || p.ends_with("/sprite@2x.json")) =>
            {
                json(StatusCode::OK, sprite_json())
            }
            p if p.starts_with(&format!("{base}/styles/v2/styles/"))
                && (p.ends_with("/sprite.png") || p.ends_with("/sprite@2x.png")) =>
            {
                binary(sprite_png(), "image/png")
            }
            p if p.starts_with(&format!("{base}/styles/v2/fonts/")) && p.ends_with(".pbf") => {
                let rest = &p[format!("{base}/styles/v2/fonts/").len()..];
                let (stack, range) = rest.rsplit_once('/').unwrap_or((rest, "0-255.pbf"));
                let stack = percent_encoding::percent_decode_str(stack).decode_utf8_lossy();
                binary(
                    glyph_range(&stack, range.trim_end_matches(".pbf")),
                    "application/x-protobuf",
                )
            }
            p if p.starts_with(&format!("{base}/styles/v2/tiles/")) && p.ends_with(".pbf") => {
                binary(vector_tile(), "application/x-protobuf")
            }
            p if p.starts_with(&format!("{base}/styles/v2/styles/")) => {
                let echo = query_param(query, "echoToken").as_deref() != Some("false");
                let suffix = if echo {
                    format!("?token={token}")
                } else {
                    String::new()
                };
                json(
                    StatusCode::OK,
                    style(&format!("http://{me}{base}/styles/v2"), echo, &suffix),
                )
            }
            p if p.starts_with(&format!("{base}/styles/v2/tiles-raster/")) => {
                let zyx: Vec<u32> = p[format!("{base}/styles/v2/tiles-raster/").len()..]
                    .trim_end_matches(".png")
                    .split('/')
                    .filter_map(|n| n.parse().ok())
                    .collect();
                match zyx[..] {
                    [z, y, x] if z <= 22 => binary(tile_png(z, x, y), "image/png"),
                    _ => json(
                        StatusCode::OK,
                        serde_json::json!({"error":{"code":400,"message":"Invalid tile","details":[]}}),
                    ),
                }
            }
            _ => json(
                StatusCode::OK,
                serde_json::json!({"error":{"code":400,"message":"Invalid URL","details":[]}}),
            ),
        }
    }
}

/// The demo's basemap style document, its URLs under `root` with `suffix`
/// (`?token=…` when the caller did not ask for `echoToken=false`).
fn style(root: &str, echo: bool, suffix: &str) -> serde_json::Value {
    serde_json::json!({
        "version": 8,
        "name": "Demo navigation",
        // What the service was asked: the proxy sends
        // echoToken=false on every Basemap Styles request.
        "metadata": {"echoToken": if echo { "true" } else { "false" }},
        "sprite": format!("{root}/styles/arcgis/navigation/sprite{suffix}"),
        "glyphs": format!("{root}/fonts/{{fontstack}}/{{range}}.pbf{suffix}"),
        "sources": {
            "esri": {"type": "vector",
                "tiles": [format!("{root}/tiles/{{z}}/{{y}}/{{x}}.pbf{suffix}")]},
            "basemap": {"type": "raster", "tileSize": 256,
                "tiles": [format!("{root}/tiles-raster/{{z}}/{{y}}/{{x}}.png{suffix}")]}
        },
        "layers": [
            {"id": "basemap", "type": "raster", "source": "basemap"},
            {"id": "land", "type": "fill", "source": "esri", "source-layer": "land",
                "paint": {"fill-color": "#2a9d8f", "fill-opacity": 0.25}},
            {"id": "places", "type": "symbol", "source": "esri", "source-layer": "places",
                "layout": {"icon-image": "park", "text-field": ["get", "name"],
                    "text-font": ["Arial Regular"], "text-offset": [0, 1.2]}}
        ]
    })
}

/// A 200 answer of `content_type`.
fn binary(bytes: Vec<u8>, content_type: &'static str) -> Response<ProxyBody> {
    let mut resp = Response::new(body::full(bytes));
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

fn layer_info() -> serde_json::Value {
    serde_json::json!({
        "id": 0, "name": "Parks", "type": "Feature Layer", "geometryType": "esriGeometryPoint",
        "objectIdField": "OBJECTID", "maxRecordCount": 1000,
        "spatialReference": {"wkid": 4326},
        "fields": [
            {"name": "OBJECTID", "type": "esriFieldTypeOID", "alias": "OBJECTID"},
            {"name": "NAME", "type": "esriFieldTypeString", "alias": "Name", "length": 64}
        ],
        "capabilities": "Query"
    })
}

const PARKS: &[(&str, f64, f64)] = &[
    ("Griffith Park", -118.2944, 34.1366),
    ("Elysian Park", -118.2417, 34.0781),
    ("Echo Park", -118.2606, 34.0728),
    ("MacArthur Park", -118.2776, 34.0577),
    ("Exposition Park", -118.2879, 34.0157),
    ("Kenneth Hahn Park", -118.3686, 34.0094),
];

fn parks(geojson: bool) -> serde_json::Value {
    if geojson {
        let features: Vec<_> = PARKS
            .iter()
            .enumerate()
            .map(|(i, (name, x, y))| {
                serde_json::json!({"type":"Feature","id": i + 1,
                    "geometry":{"type":"Point","coordinates":[x, y]},
                    "properties":{"OBJECTID": i + 1, "NAME": name}})
            })
            .collect();
        return serde_json::json!({"type":"FeatureCollection","features": features});
    }
    let features: Vec<_> = PARKS
        .iter()
        .enumerate()
        .map(|(i, (name, x, y))| {
            serde_json::json!({"attributes":{"OBJECTID": i + 1, "NAME": name},
                "geometry":{"x": x, "y": y}})
        })
        .collect();
    serde_json::json!({
        "objectIdFieldName": "OBJECTID", "geometryType": "esriGeometryPoint",
        "spatialReference": {"wkid": 4326},
        "fields": [{"name":"OBJECTID","type":"esriFieldTypeOID"},{"name":"NAME","type":"esriFieldTypeString"}],
        "features": features
    })
}

/// The demo map page and the libraries it uses, vendored from npm (Leaflet
/// 1.9.4, esri-leaflet 3.0.14, with their licences under `demo/vendor/`), so
/// the page works offline.
const PAGE: &str = include_str!("../demo/index.html");
const ASSETS: &[(&str, &str, &[u8])] = &[
    (
        "/vendor/leaflet/leaflet.js",
        "text/javascript",
        include_bytes!("../demo/vendor/leaflet/leaflet.js"),
    ),
    (
        "/vendor/leaflet/leaflet.css",
        "text/css",
        include_bytes!("../demo/vendor/leaflet/leaflet.css"),
    ),
    (
        "/vendor/leaflet/images/layers.png",
        "image/png",
        include_bytes!("../demo/vendor/leaflet/images/layers.png"),
    ),
    (
        "/vendor/leaflet/images/layers-2x.png",
        "image/png",
        include_bytes!("../demo/vendor/leaflet/images/layers-2x.png"),
    ),
    (
        "/vendor/leaflet/images/marker-icon.png",
        "image/png",
        include_bytes!("../demo/vendor/leaflet/images/marker-icon.png"),
    ),
    (
        "/vendor/leaflet/images/marker-icon-2x.png",
        "image/png",
        include_bytes!("../demo/vendor/leaflet/images/marker-icon-2x.png"),
    ),
    (
        "/vendor/leaflet/images/marker-shadow.png",
        "image/png",
        include_bytes!("../demo/vendor/leaflet/images/marker-shadow.png"),
    ),
    (
        "/vendor/esri-leaflet/esri-leaflet.js",
        "text/javascript",
        include_bytes!("../demo/vendor/esri-leaflet/esri-leaflet.js"),
    ),
];

/// Serves the demo page on its own origin; the page calls the proxy at
/// `proxy_base`.
pub async fn start_page(listener: TcpListener, proxy_base: String) {
    let page = Bytes::from(PAGE.replace("__PROXY__", &proxy_base));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let page = page.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let page = page.clone();
                async move {
                    let path = req.uri().path();
                    let (ct, body) = if path == "/" || path == "/index.html" {
                        ("text/html; charset=utf-8", page)
                    } else if let Some((_, ct, bytes)) = ASSETS.iter().find(|(p, _, _)| *p == path)
                    {
                        (*ct, Bytes::from_static(bytes))
                    } else {
                        return Ok::<_, Infallible>(crate::error::json_error(
                            StatusCode::NOT_FOUND,
                            "Not found.",
                        ));
                    };
                    let mut resp = Response::new(body::full(body));
                    resp.headers_mut()
                        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
                    Ok(resp)
                }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// The demo's config: the proxy on `listen` with an in-memory certificate,
/// in front of the fake at `fake`.
pub fn demo_config(listen: SocketAddr, fake: SocketAddr) -> Result<Config, String> {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
        .map_err(|e| format!("cannot generate demo certificate: {e}"))?;
    let key = rustls_pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
    let tls =
        crate::tls::server_config(vec![cert.cert.der().clone()], key).map_err(|e| e.to_string())?;
    let text = format!(
        r#"
[server]
listen = "{listen}"
plain_listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
[referers]
allowed = ["https://127.0.0.1:*", "https://localhost:*", "http://localhost:*", "http://127.0.0.1:*"]
[log]
format = "text"
[upstream]
# The fake runs on this machine (in this process, or another demo's with
# `--fake`): a corporate HTTP(S)_PROXY must not carry it.
proxy = ""
[credentials.online]
token_url = "http://{fake}/sharing/rest/oauth2/token"
client_id = "{DEMO_CLIENT_ID}"
client_secret = "{DEMO_CLIENT_SECRET}"
[[routes]]
name = "features"
upstream = "http://{fake}/arcgis/rest/services"
credential = "online"
mount = "/features"
[[routes]]
name = "basemaps"
upstream = "http://{fake}/arcgis/rest/services/styles/v2"
credential = "online"
mount = "/basemaps"
token_in = "query"
rewrite_urls = true
"#
    );
    Config::from_toml_with_tls(
        &text,
        Path::new("<demo>"),
        Path::new("."),
        &ProcessEnv,
        Some(tls),
    )
    .map_err(|e| e.to_string())
}

/// `arcgis-app-proxy demo`: the proxy on `listen`, the map page on `page`,
/// in front of the fake ArcGIS at `fake` (another demo's) or, without one,
/// a fake started in this process.
pub async fn run_cli(listen: SocketAddr, page: SocketAddr, fake: Option<SocketAddr>) -> ExitCode {
    crate::init_logging(crate::config::LogFormat::Text);
    let fake = match fake {
        Some(a) => a,
        None => match start_fake_arcgis().await {
            Ok(a) => a,
            Err(e) => {
                eprintln!("demo: cannot start the fake ArcGIS: {e}");
                return ExitCode::FAILURE;
            }
        },
    };
    let config = match demo_config(listen, fake) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            eprintln!("demo: {e}");
            return ExitCode::FAILURE;
        }
    };
    let listeners = match Listeners::bind(&config).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("demo: {e} (is another demo running? try --listen 127.0.0.1:0)");
            return ExitCode::FAILURE;
        }
    };
    let proxy_addr = listeners
        .tls
        .as_ref()
        .and_then(|l| l.local_addr().ok())
        .unwrap_or(listen);
    let admin_addr = listeners.admin.as_ref().and_then(|l| l.local_addr().ok());
    let plain_addr = listeners.plain.as_ref().and_then(|l| l.local_addr().ok());
    let page_listener = match TcpListener::bind(page).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("demo: cannot bind the map page on {page}: {e} (try --page 127.0.0.1:0)");
            return ExitCode::FAILURE;
        }
    };
    let page_addr = page_listener.local_addr().unwrap_or(page);
    // The page calls the proxy's cleartext listener, so a browser does not
    // trip over the demo's self-signed certificate.
    let proxy_for_page = format!("http://{}", plain_addr.unwrap_or(proxy_addr));
    tokio::spawn(start_page(page_listener, proxy_for_page.clone()));
    let p = format!("https://{proxy_addr}");
    let r = "-H 'Referer: http://localhost:8080/'";
    println!(
        "arcgis-app-proxy demo\n\n\
         map page (Leaflet + esri-leaflet, through the proxy):      http://{page_addr}/\n\
         proxy, cleartext listener used by the page:                {proxy_for_page}\n\
         fake ArcGIS (token endpoint, FeatureServer, Basemap Styles): http://{fake}\n\
         proxy (self-signed certificate, hence curl -k):            {p}\n\
         admin:                                                     http://{}\n\n\
         A feature query through a mounted path; the client sends no token:\n  \
         curl -k {r} '{p}/features/Parks/FeatureServer/0/query?where=1%3D1&outFields=*&f=json'\n\n\
         The same through the Esri proxy form (ArcGIS Maps SDK for JavaScript proxyUrl, esri-leaflet proxy):\n  \
         curl -k {r} '{p}/proxy?http://{fake}/arcgis/rest/services/Parks/FeatureServer/0/query?where=1=1&f=json'\n\n\
         A basemap style; the upstream would echo the token into it, the proxy asks it not to:\n  \
         curl -k {r} '{p}/basemaps/styles/arcgis/navigation'\n\n\
         Refused: a page on another site (403), and the upstream asked directly without a token (499):\n  \
         curl -k -H 'Referer: https://evil.example/' '{p}/features/Parks/FeatureServer/0/query?f=json'\n  \
         curl 'http://{fake}/arcgis/rest/services/Parks/FeatureServer/0/query?f=json'\n\n\
         Status: curl -k '{p}/proxy?ping'   readiness: curl http://{}/readyz\n\
         Press Ctrl-C to stop.\n",
        admin_addr.map_or("-".into(), |a| a.to_string()),
        admin_addr.map_or("-".into(), |a| a.to_string()),
    );
    match crate::run(config, listeners, crate::shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo: {e}");
            ExitCode::FAILURE
        }
    }
}
