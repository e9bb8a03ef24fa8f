//! Shared fixtures for the phase tests, and tests of the phases together
//! against a fake upstream.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use tokio::time::Instant;

use super::{ConnInfo, Proxy, RequestCtx, Upstream};
use crate::body::{self, BoxError, ProxyBody};
use crate::config::Config;
use crate::metrics::{CredentialLabel, RequestLabels};
use crate::upstream::Outgoing;

/// The API key every test route's credential holds (`KEY` in the test env).
pub const KEY: &str = "AAPK-key";

/// A proxy for a one-route config: `/basemaps` → Basemap Styles, API key
/// credential, `https://app.example.com` allowed.
pub struct Harness {
    pub config: Arc<Config>,
    pub proxy: Proxy,
}

impl Harness {
    pub fn new() -> Harness {
        Harness::with_route_extra("")
    }

    /// As [`Harness::new`], with `extra` lines added to the route's table.
    pub fn with_route_extra(extra: &str) -> Harness {
        let text = format!(
            r#"
[server]
plain_listen = "127.0.0.1:0"
[referers]
allowed = ["https://app.example.com"]
[credentials.online]
api_key_env = "KEY"
[[routes]]
name = "basemaps"
upstream = "https://basemapstyles-api.arcgis.com/arcgis/rest/services/styles/v2"
credential = "online"
mount = "/basemaps"
{extra}
"#
        );
        let config = Arc::new(crate::config::tests::load(&text).expect("test config loads"));
        Harness {
            proxy: Proxy::new(Arc::clone(&config)),
            config,
        }
    }

    /// The request's parts and a fresh context for it.
    pub fn parts<B>(&self, req: Request<B>) -> (http::request::Parts, RequestCtx) {
        let ctx = RequestCtx::new(&self.proxy, &req, &conn());
        (req.into_parts().0, ctx)
    }
}

pub fn conn() -> ConnInfo {
    ConnInfo {
        peer: "192.0.2.10:40000".parse().unwrap(),
        tls: true,
        shard: 0,
    }
}

/// A bodiless request with `headers`.
pub fn request(method: Method, uri: &str, headers: &[(&str, &str)]) -> Request<Empty<Bytes>> {
    let mut b = Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    b.body(Empty::new()).unwrap()
}

/// What the fake upstream was sent.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    pub origin: String,
    pub target: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// A scripted answer: status, headers, body.
pub type Scripted = (u16, Vec<(&'static str, String)>, Bytes);

/// An upstream that answers from a script, in order, and records each
/// request; `None` in the script never answers.
#[derive(Default)]
pub struct FakeUpstream {
    script: Mutex<VecDeque<Option<Scripted>>>,
    pub seen: Mutex<Vec<Seen>>,
}

impl FakeUpstream {
    pub fn answering(script: Vec<Option<Scripted>>) -> Self {
        FakeUpstream {
            script: Mutex::new(script.into()),
            seen: Mutex::default(),
        }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Upstream for FakeUpstream {
    type Body = ProxyBody;

    async fn send(
        &self,
        out: &Outgoing<'_>,
        body: ProxyBody,
        _now: Instant,
    ) -> Result<Response<ProxyBody>, BoxError> {
        let req = crate::upstream::build_request(out, body)?;
        let (parts, body) = req.into_parts();
        let body = body.collect().await?.to_bytes();
        self.seen.lock().unwrap().push(Seen {
            method: parts.method,
            origin: out.origin.to_string(),
            target: out.target.to_string(),
            headers: parts.headers,
            body,
        });
        let next = self.script.lock().unwrap().pop_front();
        let Some((status, headers, body)) = next.expect("no more scripted answers") else {
            return std::future::pending().await;
        };
        let mut resp = Response::new(body::full(body));
        *resp.status_mut() = StatusCode::from_u16(status).unwrap();
        for (k, v) in headers {
            resp.headers_mut().append(k, v.parse().unwrap());
        }
        Ok(resp)
    }
}

fn json(status: u16, body: &str) -> Option<Scripted> {
    Some((
        status,
        vec![("content-type", "application/json".into())],
        Bytes::from(body.to_string()),
    ))
}

const REJECTED: &str = r#"{"error":{"code":498,"message":"Invalid token."}}"#;

async fn serve<B>(
    h: &Harness,
    up: &FakeUpstream,
    req: Request<B>,
) -> (StatusCode, HeaderMap, String)
where
    B: hyper::body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
    let resp = h.proxy.handle_with(up, req, &conn()).await;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

fn app_get(uri: &str) -> Request<Empty<Bytes>> {
    request(
        Method::GET,
        uri,
        &[
            ("referer", "https://app.example.com/map"),
            ("cookie", "session=1"),
            ("authorization", "Bearer client"),
        ],
    )
}

/// A POST from the allowed app, without a Content-Length.
fn app_post(content_type: &str, body: &'static [u8]) -> Request<Full<Bytes>> {
    Request::post("/basemaps/x")
        .header("referer", "https://app.example.com/")
        .header("content-type", content_type)
        .body(Full::new(Bytes::from_static(body)))
        .unwrap()
}

#[tokio::test]
async fn the_token_goes_upstream_and_never_comes_back() {
    let h = Harness::new();
    let up = FakeUpstream::answering(vec![Some((
        200,
        vec![
            ("content-type", "application/json".into()),
            ("set-cookie", "s=1".into()),
            ("x-echo", format!("token={KEY}")),
        ],
        Bytes::from(format!(
            r#"{{"sprite":"https://x/sprite?token={KEY}","k":"{KEY}"}}"#
        )),
    ))]);
    let (status, headers, body) = serve(
        &h,
        &up,
        app_get("/basemaps/arcgis/navigation?f=json&token=mine"),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert!(!body.contains(KEY), "{body}");
    assert!(headers.get("set-cookie").is_none());
    assert!(!headers["x-echo"].to_str().unwrap().contains(KEY));
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].origin, "https://basemapstyles-api.arcgis.com");
    assert_eq!(
        seen[0].target,
        "/arcgis/rest/services/styles/v2/arcgis/navigation?f=json&echoToken=false"
    );
    assert_eq!(
        seen[0].headers["x-esri-authorization"],
        format!("Bearer {KEY}").as_str()
    );
    assert!(seen[0].headers.get("cookie").is_none());
    assert!(seen[0].headers.get("authorization").is_none());
}

#[tokio::test]
async fn a_refused_token_is_retried_once_with_the_kept_body() {
    let h = Harness::new();
    let up = FakeUpstream::answering(vec![json(200, REJECTED), json(200, r#"{"ok":true}"#)]);
    let req = app_post("application/x-www-form-urlencoded", b"f=json&token=mine");
    let (status, _, body) = serve(&h, &up, req).await;
    assert_eq!((status, body.as_str()), (StatusCode::OK, r#"{"ok":true}"#));
    let seen = up.seen();
    assert_eq!(seen.len(), 2);
    for s in &seen {
        assert_eq!(s.method, Method::POST);
        assert_eq!(&s.body[..], b"f=json");
    }
    let online = CredentialLabel {
        credential: "online".into(),
    };
    assert_eq!(
        h.proxy.metrics.token_retries.get_or_create(&online).get(),
        1
    );
}

#[tokio::test]
async fn a_token_refused_twice_or_with_a_streamed_body_is_a_502() {
    let h = Harness::new();
    let up = FakeUpstream::answering(vec![json(498, REJECTED), json(200, REJECTED)]);
    let (status, _, body) = serve(&h, &up, app_get("/basemaps/x")).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY, "{body}");
    assert_eq!(up.seen().len(), 2);

    // No announced length: the body streamed once and cannot be resent.
    let up = FakeUpstream::answering(vec![json(401, REJECTED)]);
    let (status, _, _) = serve(&h, &up, app_post("application/octet-stream", b"blob")).await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);
    assert_eq!(up.seen().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn an_upstream_that_never_answers_times_out() {
    let h = Harness::new();
    let up = FakeUpstream::answering(vec![None]);
    let started = Instant::now();
    let (status, _, body) = serve(&h, &up, app_get("/basemaps/x")).await;
    assert_eq!(status, StatusCode::GATEWAY_TIMEOUT, "{body}");
    assert_eq!(started.elapsed(), h.config.limits.upstream_timeout);
}

#[tokio::test]
async fn refusals_get_the_arcgis_shape_cors_and_are_counted() {
    let h = Harness::new();
    let up = FakeUpstream::answering(vec![]);
    let req = request(
        Method::GET,
        "/elsewhere",
        &[("origin", "https://app.example.com")],
    );
    let (status, headers, body) = serve(&h, &up, req).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["error"]["code"], 404);
    assert_eq!(
        headers["access-control-allow-origin"],
        "https://app.example.com"
    );
    assert!(up.seen().is_empty());
    let unrouted = RequestLabels {
        route: "none".into(),
        status: 404,
    };
    assert_eq!(h.proxy.metrics.requests.get_or_create(&unrouted).get(), 1);
}

#[test]
fn the_request_future_stays_small() {
    // Each request's future is boxed and moved when a stream is spawned
    // (see `server::BoxingExecutor`); the connect state is boxed inside
    // the pool so it does not sit in every request's future.
    let h = Harness::new();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _in_runtime = rt.enter();
    // hyper's `Incoming` cannot be made outside hyper; `Full` is of like
    // size (a few words).
    let req = Request::new(Full::new(Bytes::new()));
    let upstream = Arc::clone(h.proxy.clients().shard(0));
    let size = std::mem::size_of_val(&h.proxy.handle_with(&upstream, req, &conn()));
    println!("request future: {size} bytes");
    assert!(size < 4096, "request future grew to {size} bytes");
}

#[tokio::test]
async fn errors_from_any_phase_become_one_response() {
    // `Err` never escapes `handle`: each error maps to its own status.
    let h = Harness::new();
    for (req, want) in [
        (
            request(
                Method::DELETE,
                "/basemaps/x",
                &[("referer", "https://app.example.com/")],
            ),
            StatusCode::METHOD_NOT_ALLOWED,
        ),
        (
            request(
                Method::GET,
                "/basemaps/x",
                &[("referer", "https://evil.example/")],
            ),
            StatusCode::FORBIDDEN,
        ),
    ] {
        let up = FakeUpstream::answering(vec![]);
        let (status, _, _) = serve(&h, &up, req).await;
        assert_eq!(status, want);
        assert!(up.seen().is_empty());
    }
}
