//! The chaos soak: the real binary under sustained mixed load while
//! everything around it misbehaves on a schedule, then checks that nothing
//! was lost, leaked, hung or kept.
//!
//! A test binary of its own, so that its load does not share the machine
//! with the other tests (cargo runs test binaries one after another). Runs
//! for `AAP_SOAK_SECS` seconds (60 by default, as `.ci/run` runs it;
//! `AAP_SOAK_SECS=600 cargo test --release --test soak -- --nocapture`
//! is the long run recorded in BENCHMARKS.md). Clients: HTTP/1.1 and HTTP/2
//! keep-alive over TLS, mounted and `/proxy?` form, GET and POST, gzip.
//! Faults, in 5-second phases: normal; upstream resets mid-body; truncated
//! chunked answers; slow heads; a 5xx burst; the token endpoint failing
//! half its calls while every issued token is revoked. Throughout: 5-second
//! tokens, a SIGHUP every 4 s, a certificate swap every 15 s, redis-server
//! (the shared rate-limit store) killed and restarted every 20 s.
//!
//! Asserted at the end, and printed as one `soak:` line: no token byte in
//! any answer or log line; no panic; every request got a complete answer or
//! an error answer (an upstream that breaks off mid-body becomes a clean
//! 502 while the proxy still holds the answer; one it had begun to stream
//! would be a visibly aborted answer, counted apart): never a silently
//! short 200, never a request without an answer, never a hang; token
//! requests within a bound computed from the lifetime and the faults; open
//! descriptors back to the start once clients leave; resident memory
//! levelling off over the second half.

use std::collections::HashSet;
use std::convert::Infallible;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arcgis_app_proxy::error::describe;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

#[path = "it/support/mod.rs"]
mod support;
use support::*;

/// Token lifetime the fake grants.
const LIFETIME_SECS: u64 = 5;
/// Length of one fault phase.
const PHASE_SECS: u64 = 5;
const PHASES: u64 = 6;

/// The misbehaving ArcGIS: a token endpoint and a service.
struct Chaos {
    start: Instant,
    served: AtomicU64,
    token_calls: AtomicUsize,
    token_failures: AtomicUsize,
    /// Valid tokens and when each expires.
    valid: Mutex<Vec<(String, Instant)>>,
    /// Phase-5 windows in which all tokens were revoked (by window number).
    revoked_in: Mutex<HashSet<u64>>,
}

impl Chaos {
    fn phase(&self) -> (u64, u64) {
        let t = self.start.elapsed().as_secs() / PHASE_SECS;
        (t % PHASES, t)
    }

    async fn handle(&self, req: Request<Incoming>) -> Response<TestBody> {
        let (phase, window) = self.phase();
        let path = req.uri().path().to_string();
        if path == "/sharing/rest/oauth2/token" {
            let call = self.token_calls.fetch_add(1, Ordering::SeqCst);
            if phase == 5 && call.is_multiple_of(2) {
                self.token_failures.fetch_add(1, Ordering::SeqCst);
                return text(StatusCode::SERVICE_UNAVAILABLE, "token service overloaded");
            }
            let token = format!("soak-token-{call}-{:08x}", fastrand::u32(..));
            self.valid.lock().unwrap().push((
                token.clone(),
                Instant::now() + Duration::from_secs(LIFETIME_SECS),
            ));
            return json(
                StatusCode::OK,
                serde_json::json!({"access_token": token, "expires_in": LIFETIME_SECS}),
            );
        }
        if phase == 5 && self.revoked_in.lock().unwrap().insert(window) {
            // Revoked by an administrator: every token issued so far.
            self.valid.lock().unwrap().clear();
        }
        let presented = req
            .headers()
            .get("x-esri-authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_string);
        let now = Instant::now();
        let token_ok = presented.as_ref().is_some_and(|t| {
            let mut valid = self.valid.lock().unwrap();
            valid.retain(|(_, exp)| *exp > now);
            valid.iter().any(|(v, _)| v == t)
        });
        let gzip = req
            .headers()
            .get("accept-encoding")
            .is_some_and(|v| v.to_str().unwrap_or("").contains("gzip"));
        let posted = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes().len())
            .unwrap_or(0);
        if !token_ok {
            return json(
                StatusCode::OK,
                serde_json::json!({"error": {"code": 498, "message": "Invalid token.", "details": []}}),
            );
        }
        let n = self.served.fetch_add(1, Ordering::SeqCst);
        match phase {
            1 if n.is_multiple_of(4) => return broken(true),
            2 if n.is_multiple_of(4) => return broken(false),
            3 if n.is_multiple_of(5) => tokio::time::sleep(Duration::from_millis(1500)).await,
            4 => return text(StatusCode::BAD_GATEWAY, "<html>upstream overloaded</html>"),
            _ => {}
        }
        // A complete answer the client can check, sometimes echoing the token
        // as ArcGIS does in some answers (the proxy must scrub it).
        let len = 100 + (n as usize * 7919) % 20_000;
        let mut body =
            serde_json::json!({"n": n, "len": len, "posted": posted, "pad": "x".repeat(len)});
        if n.is_multiple_of(10) {
            body["echo"] = serde_json::Value::String(presented.unwrap_or_default());
        }
        let bytes = serde_json::to_vec(&body).unwrap();
        if gzip && n.is_multiple_of(3) {
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            enc.write_all(&bytes).unwrap();
            let mut resp = Response::new(full(enc.finish().unwrap()));
            resp.headers_mut()
                .insert("content-type", "application/json".parse().unwrap());
            resp.headers_mut()
                .insert("content-encoding", "gzip".parse().unwrap());
            return resp;
        }
        let mut resp = Response::new(full(bytes));
        resp.headers_mut()
            .insert("content-type", "application/json".parse().unwrap());
        resp
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<TestBody> {
    let mut resp = Response::new(full(body));
    *resp.status_mut() = status;
    resp
}

/// An answer that breaks off: `Content-Length` 20,000 with 4,000 bytes
/// sent (a reset mid-body), or chunked with the last chunk never sent.
fn broken(with_length: bool) -> Response<TestBody> {
    let frames: Vec<Result<Frame<Bytes>, Box<dyn std::error::Error + Send + Sync>>> = vec![
        Ok(Frame::data(Bytes::from(vec![b'{'; 2000]))),
        Ok(Frame::data(Bytes::from(vec![b' '; 2000]))),
        Err("upstream broke off".into()),
    ];
    let body = StreamBody::new(futures_util::stream::iter(frames));
    let mut resp = Response::new(BodyExt::boxed(body));
    resp.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    if with_length {
        resp.headers_mut()
            .insert("content-length", "20000".parse().unwrap());
    }
    resp
}

async fn start_chaos() -> (Arc<Chaos>, String, tokio::sync::oneshot::Sender<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let chaos = Arc::new(Chaos {
        start: Instant::now(),
        served: AtomicU64::new(0),
        token_calls: AtomicUsize::new(0),
        token_failures: AtomicUsize::new(0),
        valid: Mutex::new(Vec::new()),
        revoked_in: Mutex::new(HashSet::new()),
    });
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let c = Arc::clone(&chaos);
    tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                _ = &mut stopped => break,
                accepted = listener.accept() => {
                    let Ok((stream, _)) = accepted else { continue };
                    let c = Arc::clone(&c);
                    while conns.try_join_next().is_some() {}
                    conns.spawn(async move {
                        let svc = service_fn(move |req| {
                            let c = Arc::clone(&c);
                            async move { Ok::<_, Infallible>(c.handle(req).await) }
                        });
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(TokioIo::new(stream), svc)
                            .await;
                    });
                }
            }
        }
        // Dropping the listener and aborting connections closes every
        // socket the proxy holds to this upstream.
        conns.abort_all();
    });
    (chaos, base, stop)
}

/// What became of the requests.
#[derive(Default, Debug)]
struct Tally {
    complete: usize,
    error_answers: usize,
    aborted: usize,
    transport_errors: usize,
    short_200: usize,
    hung: usize,
    leaks: usize,
    samples: Vec<String>,
    /// Error answers by status and ArcGIS error code.
    errors: std::collections::BTreeMap<String, usize>,
}

/// Open descriptors of process `pid`.
fn process_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|n| n.parse().unwrap_or(0)))
        })
        .unwrap_or(0)
}

/// Least-squares slope (per second) of `(t, v)`.
fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    let (mx, my) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x / n, b + y / n));
    let (num, den) = points.iter().fold((0.0, 0.0), |(a, b), (x, y)| {
        (a + (x - mx) * (y - my), b + (x - mx) * (x - mx))
    });
    if den == 0.0 { 0.0 } else { num / den }
}

fn start_redis(port: u16) -> Option<std::process::Child> {
    std::process::Command::new("redis-server")
        .args(["--port", &port.to_string()])
        .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_soak() {
    let secs: u64 = std::env::var("AAP_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let pki = Pki::new();
    let other = Pki::new();
    let (chaos, base, stop_upstream) = start_chaos().await;
    let redis_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut redis = start_redis(redis_port);
    if redis.is_none() {
        eprintln!("soak: redis-server not installed; running without the store faults");
    }
    let toml = fill_paths(
        &pki,
        &format!(
            r#"
[server]
listen = "127.0.0.1:0"
tls_cert = "{{CERT}}"
tls_key = "{{KEY}}"
admin_listen = "127.0.0.1:0"
reload_poll_secs = 1
[limits]
upstream_timeout_secs = 3
header_read_timeout_secs = 5
[referers]
allowed = ["https://app.example.com"]
[credentials.online]
token_url = "{base}/sharing/rest/oauth2/token"
client_id = "soak"
client_secret_env = "SECRET"
[[routes]]
name = "svc"
upstream = "{base}/svc"
credential = "online"
mount = "/svc"
rate_limit = {{ requests = 1000000, per_secs = 1 }}
[rate_limit]
store = "redis://127.0.0.1:{redis_port}/"
on_store_error = "open"
"#
        ),
    );
    let cfg = write_config(&pki, "soak.toml", &toml);
    let mut proxy = Proc::spawn(&["--config", &cfg], &[("SECRET", SECRET)]);
    let addr = proxy.listener("https");
    proxy.wait_for("obtained token");
    let pid = proxy.pid();
    let fds_start = process_fds(pid);

    // Clients trust both CAs: the certificate is swapped between them.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca_der.clone()).unwrap();
    roots.add(other.ca_der.clone()).unwrap();
    let tls = || {
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots.clone())
        .with_no_client_auth()
    };
    let deadline = Instant::now() + Duration::from_secs(secs);
    let tally = Arc::new(Mutex::new(Tally::default()));
    let mut clients = Vec::new();
    for i in 0..16 {
        let h2 = i % 2 == 1;
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls())
            .https_only();
        let connector = if h2 {
            connector.enable_http2().build()
        } else {
            connector.enable_http1().build()
        };
        let mut builder = Client::builder(TokioExecutor::new());
        builder.http2_only(h2);
        let client: Client<_, TestBody> = builder.build(connector);
        let tally = Arc::clone(&tally);
        let base = base.clone();
        clients.push(tokio::spawn(async move {
            let mut k = 0usize;
            while Instant::now() < deadline {
                k += 1;
                let proxy_base = format!("https://localhost:{}", addr.port());
                let (method, uri, body) = match k % 4 {
                    0 => ("GET", format!("{proxy_base}/svc/data?k={k}&f=json"), ""),
                    1 => (
                        "GET",
                        format!("{proxy_base}/proxy?{base}/svc/data?k={k}&f=json"),
                        "",
                    ),
                    2 => (
                        "POST",
                        format!("{proxy_base}/svc/data"),
                        "where=1%3D1&outFields=*&f=json",
                    ),
                    _ => ("GET", format!("{proxy_base}/svc/data?gz={k}"), ""),
                };
                let mut req = Request::builder()
                    .method(method)
                    .uri(uri)
                    .header("referer", "https://app.example.com/map.html");
                if k % 4 == 3 {
                    req = req.header("accept-encoding", "gzip");
                }
                if method == "POST" {
                    req = req.header("content-type", "application/x-www-form-urlencoded");
                }
                let req = req.body(full(body)).unwrap();
                let outcome = tokio::time::timeout(Duration::from_secs(15), async {
                    let resp = client.request(req).await?;
                    let (parts, body) = resp.into_parts();
                    let body = body.collect().await.map(|b| b.to_bytes());
                    Ok::<_, Box<dyn std::error::Error + Send + Sync>>((parts, body))
                })
                .await;
                let mut t = tally.lock().unwrap();
                match outcome {
                    Err(_) => t.hung += 1,
                    Ok(Err(e)) => {
                        t.transport_errors += 1;
                        if t.samples.len() < 10 {
                            t.samples.push(format!("transport: {}", describe(&*e)));
                        }
                    }
                    Ok(Ok((_, Err(_)))) => t.aborted += 1,
                    Ok(Ok((parts, Ok(bytes)))) => {
                        let headers = format!("{:?}", parts.headers);
                        let decoded = if parts
                            .headers
                            .get("content-encoding")
                            .is_some_and(|v| v == "gzip")
                        {
                            let mut out = Vec::new();
                            flate2::read::GzDecoder::new(&bytes[..])
                                .read_to_end(&mut out)
                                .map(|_| out)
                                .unwrap_or_default()
                        } else {
                            bytes.to_vec()
                        };
                        let text = String::from_utf8_lossy(&decoded);
                        if text.contains("soak-token-") || headers.contains("soak-token-") {
                            t.leaks += 1;
                        }
                        let parsed = serde_json::from_slice::<serde_json::Value>(&decoded);
                        if parts.status != StatusCode::OK {
                            t.error_answers += 1;
                            let code = parsed
                                .as_ref()
                                .map(|v| v["error"]["code"].to_string())
                                .unwrap_or_default();
                            *t.errors
                                .entry(format!("{} {code}", parts.status.as_u16()))
                                .or_default() += 1;
                            if parts.status == StatusCode::TOO_MANY_REQUESTS && t.samples.len() < 10
                            {
                                t.samples.push(format!(
                                    "429 at {:?} left: {}",
                                    deadline.saturating_duration_since(Instant::now()),
                                    String::from_utf8_lossy(&decoded)
                                ));
                            }
                            continue;
                        }
                        match parsed {
                            Ok(v) if v["error"].is_object() => {
                                t.error_answers += 1;
                                *t.errors
                                    .entry(format!("200 {}", v["error"]["code"]))
                                    .or_default() += 1;
                            }
                            Ok(v)
                                if v["pad"].as_str().map(str::len)
                                    == v["len"].as_u64().map(|n| n as usize) =>
                            {
                                t.complete += 1
                            }
                            _ => {
                                t.short_200 += 1;
                                if t.samples.len() < 10 {
                                    t.samples
                                        .push(format!("short 200: {} bytes", decoded.len()));
                                }
                            }
                        }
                    }
                }
            }
        }));
    }

    // The operator's and the world's faults, and the samples.
    let started = Instant::now();
    let mut rss = Vec::new();
    let mut redis_down_at: Option<Instant> = None;
    let mut last_hup = Instant::now();
    let mut last_swap = Instant::now();
    let mut last_redis = Instant::now();
    let mut swapped = false;
    let (mut hups, mut swaps, mut redis_kills) = (0, 0, 0);
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let t = started.elapsed().as_secs_f64();
        if rss.last().is_none_or(|(last, _)| t - last >= 1.0) {
            rss.push((t, rss_kib(pid) as f64));
        }
        if last_hup.elapsed() >= Duration::from_secs(4) {
            proxy.signal("HUP");
            hups += 1;
            last_hup = Instant::now();
        }
        if last_swap.elapsed() >= Duration::from_secs(15) {
            let from = if swapped { &pki } else { &other };
            for f in ["proxy.crt", "proxy.key"] {
                let tmp = pki.path(&format!("{f}.new"));
                std::fs::copy(from.path(f), &tmp).unwrap();
                std::fs::rename(&tmp, pki.path(f)).unwrap();
            }
            swapped = !swapped;
            swaps += 1;
            last_swap = Instant::now();
        }
        if let Some(child) = redis.as_mut()
            && redis_down_at.is_none()
            && last_redis.elapsed() >= Duration::from_secs(20)
        {
            let _ = child.kill();
            let _ = child.wait();
            redis_down_at = Some(Instant::now());
            redis_kills += 1;
        }
        if redis_down_at.is_some_and(|d| d.elapsed() >= Duration::from_secs(2)) {
            redis = start_redis(redis_port);
            redis_down_at = None;
            last_redis = Instant::now();
        }
    }
    for c in clients {
        c.await.unwrap();
    }
    let requests = {
        let t = tally.lock().unwrap();
        t.complete + t.error_answers + t.aborted + t.transport_errors + t.short_200 + t.hung
    };

    // Clients gone (their connections dropped with them) and the upstream
    // closed: descriptors go back to where they started.
    stop_upstream.send(()).unwrap();
    let mut fds_end = process_fds(pid);
    let settle = Instant::now();
    while fds_end > fds_start && settle.elapsed() < Duration::from_secs(40) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        fds_end = process_fds(pid);
    }
    let half: Vec<(f64, f64)> = rss[rss.len() / 2..].to_vec();
    let slope_kib_s = slope(&half);
    let rss_end = rss.last().map(|r| r.1).unwrap_or(0.0);
    let rss_start = rss.first().map(|r| r.1).unwrap_or(0.0);
    let half_secs =
        half.last().map(|l| l.0).unwrap_or(0.0) - half.first().map(|f| f.0).unwrap_or(0.0);
    let growth_over_half_kib = slope_kib_s * half_secs;

    let token_calls = chaos.token_calls.load(Ordering::SeqCst);
    let failures = chaos.token_failures.load(Ordering::SeqCst);
    let revocations = chaos.revoked_in.lock().unwrap().len();
    // One token per lifetime minus the refresh lead (a fifth), one per
    // revocation, each failed call retried: with slack for reloads.
    let expected = (secs as f64 / (LIFETIME_SECS as f64 * 0.8)).ceil() as usize + revocations;
    let bound = 2 * expected + 2 * failures + hups / 2 + 4;

    if let Some(mut child) = redis.take() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let (code, logs) = proxy.terminate();
    let t = tally.lock().unwrap();
    println!(
        "soak: {secs}s {requests} requests ({:.0}/s): {} complete, {} error answers, {} aborted after an upstream broke off, {} transport errors, {} short 200s, {} hung; token leaks {} in answers, {} in logs; token requests {token_calls} (failed {failures}, revocations {revocations}, bound {bound}); SIGHUP {hups}, certificate swaps {swaps}, redis kills {redis_kills}; fds {fds_start} -> {fds_end}; RSS {:.1} -> {:.1} MiB, second-half slope {:.1} KiB/s ({:+.0} KiB over it)",
        requests as f64 / secs as f64,
        t.complete,
        t.error_answers,
        t.aborted,
        t.transport_errors,
        t.short_200,
        t.hung,
        t.leaks,
        logs.matches("soak-token-").count(),
        rss_start / 1024.0,
        rss_end / 1024.0,
        slope_kib_s,
        growth_over_half_kib,
    );
    println!("soak: error answers by status and code: {:?}", t.errors);
    for s in &t.samples {
        println!("soak: sample {s}");
    }
    assert_eq!(code, 0, "the proxy did not stop cleanly");
    assert!(!logs.contains("panicked"), "a panic:\n{logs}");
    assert_eq!(t.leaks, 0, "a token reached a client");
    assert!(!logs.contains("soak-token-"), "a token reached the log");
    assert_eq!(t.hung, 0, "requests hung");
    assert_eq!(
        t.short_200, 0,
        "silently truncated answers: {:?}",
        t.samples
    );
    assert_eq!(
        t.transport_errors, 0,
        "requests without an answer: {:?}",
        t.samples
    );
    assert!(
        t.complete > requests / 2,
        "most requests should complete: {t:?}"
    );
    assert!(
        token_calls <= bound,
        "{token_calls} token requests, bound {bound}"
    );
    assert!(fds_end <= fds_start, "descriptors {fds_start} -> {fds_end}");
    assert!(
        growth_over_half_kib < (rss_end * 0.10).max(2048.0),
        "resident memory still growing: {slope_kib_s:.1} KiB/s over the second half"
    );
}
