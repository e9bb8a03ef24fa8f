//! The admin listener: `/healthz`, `/readyz`, `/metrics` (plain HTTP, never
//! on the public listeners).
//!
//! `/healthz` answers 200 while the process runs. `/readyz` answers 200 once
//! the listeners accept and the first token fetch of every credential in use
//! has finished (succeeded or not: a failing credential is reported in the
//! body, not by turning the whole fleet unready), and 503 from the moment
//! shutdown begins so load balancers drain first.
//! `/metrics` is the Prometheus (OpenMetrics) text exposition.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::app::App;
use crate::body::{self, ProxyBody};
use crate::error::{ProxyError, json_error};
use crate::metrics::CredentialLabel;
use crate::proxy::Proxy;

/// Serves admin requests until `stop` turns true.
pub async fn serve(listener: TcpListener, app: Arc<App>, mut stop: watch::Receiver<bool>) {
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = crate::app::stopped(&mut stop) => return,
        };
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let app = Arc::clone(&app);
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let resp = handle(&req, &app);
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// Answers one admin request.
pub fn handle(req: &Request<Incoming>, app: &App) -> Response<ProxyBody> {
    let path = req.uri().path();
    if !matches!(path, "/healthz" | "/readyz" | "/metrics") {
        return json_error(StatusCode::NOT_FOUND, "Not found.");
    }
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        let mut resp = ProxyError::MethodNotAllowed.into_response();
        resp.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return resp;
    }
    let status = &app.status;
    let proxy = app.proxy();
    match path {
        "/healthz" => text(StatusCode::OK, "ok\n"),
        "/metrics" => metrics(app, &proxy),
        _ => {
            let shutting_down = status.shutting_down.load(Ordering::SeqCst);
            let listening = status.listening.load(Ordering::SeqCst);
            let ready = listening && !shutting_down && proxy.tokens_settled();
            let creds: serde_json::Map<String, serde_json::Value> = proxy
                .config()
                .credentials_in_use()
                .filter_map(|n| proxy.tokens().get(n))
                .map(|t| (t.name().to_string(), t.state().as_str().into()))
                .collect();
            let body = serde_json::json!({
                "ready": ready,
                "listening": listening,
                "shutting_down": shutting_down,
                "credentials": creds,
            });
            let mut resp = Response::new(body::full(body.to_string()));
            *resp.status_mut() = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            resp
        }
    }
}

fn metrics(app: &App, proxy: &Proxy) -> Response<ProxyBody> {
    let m = app.metrics();
    m.refresh_process();
    if let Some(t) = proxy.config().server.tls_not_after {
        m.tls_cert_not_after
            .get_or_create(&crate::metrics::ListenerLabel { listener: "https" })
            .set(t);
    }
    m.open_connections
        .set(app.status.open_connections.load(Ordering::Relaxed) as i64);
    for name in proxy.config().credentials_in_use() {
        let Some(src) = proxy.tokens().get(name) else {
            continue;
        };
        let info = src.info();
        let label = CredentialLabel {
            credential: name.to_string(),
        };
        // A never-expiring API key reports no expiry.
        if let Some(left) = info.usable_for {
            m.token_expires_in
                .get_or_create(&label)
                .set(left.as_secs_f64());
        }
        if let Some(age) = info.age {
            m.token_age.get_or_create(&label).set(age.as_secs_f64());
        }
    }
    let mut resp = Response::new(body::full(m.encode()));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
    );
    resp
}

fn text(status: StatusCode, body: &'static str) -> Response<ProxyBody> {
    let mut resp = Response::new(body::full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}
