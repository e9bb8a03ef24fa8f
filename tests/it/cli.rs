//! The real binary: `--version`, `--help`, `check`, config errors (exit 78,
//! no port bound, no secret shown), the shipped `proxy.toml`, logs of a full
//! run, and `demo`.

use std::process::Command;

use crate::support::*;

fn run(args: &[&str], envs: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .args(args)
        .env_remove("ARCGIS_CLIENT_SECRET")
        .envs(envs.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn version_and_help() {
    let (code, out, _) = run(&["--version"], &[]);
    assert_eq!(code, 0);
    // `arcgis-app-proxy 0.1.0 (commit 0123abcd4567, plain build)`
    let rest = out
        .trim()
        .strip_prefix(&format!(
            "arcgis-app-proxy {} (commit ",
            env!("CARGO_PKG_VERSION")
        ))
        .unwrap_or_else(|| panic!("{out}"));
    let (commit, profile) = rest.split_once(", ").unwrap();
    assert!(
        commit == "unknown" || (commit.len() >= 7 && commit.chars().all(|c| c.is_ascii_hexdigit())),
        "{out}"
    );
    assert!(
        ["plain build)", "profile-guided build)"].contains(&profile),
        "{out}"
    );
    let (code, out, _) = run(&["--help"], &[]);
    assert_eq!(code, 0);
    for word in ["check", "demo", "healthcheck", "--config", "-c"] {
        assert!(out.contains(word), "help lacks {word}: {out}");
    }
}

#[test]
fn check_reports_every_problem_with_exit_78() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(
        dir.path(),
        "bad.toml",
        r#"
[server]
listen = "127.0.0.1:0"
tls_cert = "missing.crt"
tls_key = "missing.key"
[referers]
allowed = ["https://ok.example.com", "nonsense"]
[credentials.online]
token_url = "https://www.arcgis.com/sharing/rest/oauth2/token"
client_id = "x"
client_secret = "INLINE-SECRET-VALUE"
[[routes]]
upstream = "https://a.example.com/x"
credential = "online"
mount = "/a"
[[routes]]
upstream = "https://b.example.com/y?q=1"
credential = "other"
mount = "/a"
"#,
    );
    let (code, out, err) = run(&["check", "--config", &cfg], &[]);
    assert_eq!(code, 78, "stdout {out} stderr {err}");
    for key in [
        "server.tls_cert",
        "referers.allowed[1]",
        "routes[1].upstream",
        "routes[1].credential",
        "routes[1].mount",
    ] {
        assert!(
            err.lines()
                .any(|l| l.starts_with(&format!("{cfg}: {key}: "))),
            "{key} missing from:\n{err}"
        );
    }
    assert!(!err.contains("INLINE-SECRET-VALUE"));
    assert!(!out.contains("INLINE-SECRET-VALUE"));

    // Unknown keys are errors too.
    let cfg2 = write(
        dir.path(),
        "unknown.toml",
        "[server]\nplain_listen = \"127.0.0.1:0\"\nlisen = 1\n",
    );
    let (code, _, err) = run(&["check", "--config", &cfg2], &[]);
    assert_eq!(code, 78);
    assert!(
        err.contains("server.lisen") && err.contains("unknown field"),
        "{err}"
    );
}

#[test]
fn run_with_bad_config_exits_78_before_binding() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = write(
        dir.path(),
        "bad.toml",
        &format!(
            "[server]\nplain_listen = \"127.0.0.1:{port}\"\n[credentials.c]\ntoken_url = \"https://x.example/t\"\nclient_id = \"id\"\nclient_secret_env = \"NOT_SET_ANYWHERE\"\n[[routes]]\nupstream = \"https://x.example/a\"\ncredential = \"c\"\nmount = \"/a\"\n"
        ),
    );
    let (code, _, err) = run(&["--config", &cfg], &[]);
    assert_eq!(code, 78, "{err}");
    assert!(err.contains("credentials.c.client_secret_env"), "{err}");
    assert!(err.contains("NOT_SET_ANYWHERE is not set"), "{err}");
    // The port is still free: nothing was bound.
    std::net::TcpListener::bind(("127.0.0.1", port)).expect("port was bound by a failed start");
}

#[test]
fn shipped_proxy_toml_is_valid() {
    let shipped =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/proxy.toml")).unwrap();
    // Its certificate paths are relative to the file; give it a certs/ dir.
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("certs")).unwrap();
    std::fs::copy(pki.path("proxy.crt"), dir.path().join("certs/proxy.crt")).unwrap();
    std::fs::copy(pki.path("proxy.key"), dir.path().join("certs/proxy.key")).unwrap();
    let cfg = write(dir.path(), "proxy.toml", &shipped);
    let (code, out, err) = run(
        &["check", "--config", &cfg],
        &[("ARCGIS_CLIENT_SECRET", "from-env")],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("OK"));
    // Without the secret it is a clear error.
    let (code, _, err) = run(&["check", "--config", &cfg], &[]);
    assert_eq!(code, 78);
    assert!(err.contains("ARCGIS_CLIENT_SECRET is not set"), "{err}");
}

// Multi-threaded: the fake runs on this runtime while the test thread blocks
// reading the child's output.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_of_a_full_run_hold_neither_token_nor_secret() {
    let pki = Pki::new();
    let fake = FakeArcGis::start().await;
    let cfg = write_config(&pki, "run.toml", &standard_config(&fake, ""));
    let mut p = Proc::spawn(
        &["--config", &cfg],
        &[("SECRET", SECRET), ("RUST_LOG", "trace")],
    );
    let addr = p.listener("https");
    p.wait_for("obtained token");
    let client = TestClient::new(&pki, addr);
    assert_eq!(
        client
            .get("/svc/echo/a?token=CLIENT-SIDE-TOKEN&f=json")
            .await
            .status,
        200
    );
    assert_eq!(client.get("/q/features?f=json").await.status, 200);
    assert_eq!(client.get("/svc/redirect").await.status, 302);
    client
        .get_with("/svc/x", &[("referer", "https://evil.example/")])
        .await
        .assert_error(403);
    fake.revoke_all();
    assert_eq!(client.get("/svc/http498").await.status, 200);
    let line = p.wait_for(r#""path":"/svc/http498""#);
    let access: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(access["method"], "GET");
    assert_eq!(access["route"], "/svc");
    assert_eq!(access["status"], 200);
    assert_eq!(access["referer"], "https://app.example.com");
    assert!(access["latency_ms"].is_number());
    assert!(access["bytes"].as_u64().unwrap() > 0);
    // Retried after the refusal: the last attempt's status.
    assert_eq!(access["upstream_status"], 200);
    assert!(access["upstream_ms"].as_f64().unwrap() >= 0.0);
    assert_eq!(access["protocol"], "HTTP/1.1");
    assert_eq!(access["log"], "access");
    assert_eq!(access["app"], "https://app.example.com");

    // The /proxy? form: the log names the service asked for, without its
    // query; a valid X-Request-Id goes upstream, comes back and is logged.
    let target = format!("{}/open/layer/0/query", fake.url());
    let a = client
        .get_with(
            &format!("/proxy?{target}?where=1%3D1&secret=abc"),
            &[
                ("referer", "https://app.example.com/map"),
                ("x-request-id", "lb-7f3a.42:x"),
                ("user-agent", "ArcGIS JS/5.1"),
            ],
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.headers["x-request-id"], "lb-7f3a.42:x");
    assert_eq!(a.json()["headers"]["x-request-id"], "lb-7f3a.42:x");
    let line = p.wait_for(r#""request_id":"lb-7f3a.42:x""#);
    let access: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(access["path"], "/proxy");
    assert_eq!(access["target"], target.as_str());
    assert_eq!(access["route"], "open");
    assert_eq!(access["user_agent"], "ArcGIS JS/5.1");
    assert_eq!(access["upstream_status"], 200);
    assert!(!line.contains("secret=abc"), "{line}");
    // A hostile id (too long, spaces, quotes) is replaced, the same
    // replacement going upstream and back.
    let hostile = format!("x\" y{}", "z".repeat(200));
    let a = client
        .get_with(
            "/open/x",
            &[
                ("referer", "https://app.example.com/map"),
                ("x-request-id", hostile.as_str()),
            ],
        )
        .await;
    let id = a.headers["x-request-id"].to_str().unwrap().to_string();
    assert_eq!(id.len(), 16, "{id}");
    assert!(id.chars().all(|c| c.is_ascii_hexdigit()), "{id}");
    assert_eq!(a.json()["headers"]["x-request-id"], id.as_str());
    // Errors the proxy answers itself carry one too.
    let a = client
        .get_with("/svc/x", &[("referer", "https://evil.example/")])
        .await;
    assert!(a.headers.contains_key("x-request-id"));
    let (code, logs) = p.terminate();
    assert_eq!(code, 0, "{logs}");
    assert_eq!(fake.issued().len(), 2);
    for t in fake.issued() {
        assert!(!logs.contains(&t), "token in logs:\n{logs}");
    }
    assert!(!logs.contains(SECRET), "secret in logs");
    assert!(
        !logs.contains("CLIENT-SIDE-TOKEN"),
        "client token value in logs"
    );
    for line in logs.lines().filter(|l| l.starts_with('{')) {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_credential_logs_the_arcgis_error_not_the_secret() {
    let pki = Pki::new();
    let fake = FakeArcGis::start().await;
    fake.set_mode(TokenMode::Reject);
    let cfg = write_config(&pki, "reject.toml", &standard_config(&fake, ""));
    let mut p = Proc::spawn(
        &["--config", &cfg],
        &[("SECRET", SECRET), ("RUST_LOG", "debug")],
    );
    let https = p.listener("https");
    let line = p.wait_for("token endpoint rejected the credential");
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["level"], "ERROR");
    assert_eq!(v["credential"], "online");
    assert_eq!(v["arcgis_code"], 400);
    assert_eq!(v["arcgis_message"], "Invalid client_id");
    assert_eq!(v["message"], "token endpoint rejected the credential");
    let client = TestClient::new(&pki, https);
    client.get("/svc/features").await.assert_error(502);
    let (code, logs) = p.terminate();
    assert_eq!(code, 0);
    assert!(!logs.contains(SECRET), "secret in logs:\n{logs}");
    assert!(fake.token_count() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_serves_features_without_a_client_token() {
    let mut p = Proc::demo(&[]);
    let base = p.demo_url("proxy (self-signed certificate");
    let fake = p.demo_url("fake ArcGIS");
    let curl_line = p.wait_for("/features/Parks/FeatureServer/0/query");
    assert!(curl_line.contains("curl -k -H 'Referer: http://localhost:8080/'"));

    let (status, body) = demo_get(format!(
        "{base}/features/Parks/FeatureServer/0/query?where=1%3D1&outFields=*&f=json"
    ))
    .await;
    assert_eq!(status, 200, "{body}");
    let j: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(j["features"].as_array().unwrap().len(), 6);
    let (status, body) = demo_get(format!(
        "{base}/proxy?{fake}/arcgis/rest/services/Parks/FeatureServer/0/query?where=1=1&f=json"
    ))
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = demo_get(format!("{base}/basemaps/styles/arcgis/navigation")).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"sprite\""), "{body}");
    assert!(!body.contains("token"), "style leaked a token: {body}");
    // Directly, without the proxy, the fake insists on a token.
    let (_, body) = demo_get(format!(
        "{fake}/arcgis/rest/services/Parks/FeatureServer/0/query?f=json"
    ))
    .await;
    assert!(body.contains("499"), "{body}");
    let (code, out) = p.terminate();
    assert_eq!(code, 0, "{out}");
}

/// GET `url` with the demo's Referer, any certificate accepted.
async fn demo_get(url: String) -> (http::StatusCode, String) {
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(std::sync::Arc::new(AcceptAny))
    .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build();
    let client: hyper_util::client::legacy::Client<_, TestBody> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(connector);
    let req = http::Request::get(url)
        .header("referer", "http://localhost:8080/")
        .body(full(""))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    let status = resp.status();
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await
        .unwrap()
        .to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// `demo --fake ADDR` (how `bench/pgo-build` trains the proxy with its
/// upstream in another process): the proxy uses that fake and starts none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_can_use_the_fake_of_another_demo() {
    let mut upstream = Proc::demo(&[]);
    let fake = upstream.demo_url("fake ArcGIS");
    let mut p = Proc::demo(&["--fake", fake.strip_prefix("http://").unwrap()]);
    assert_eq!(p.demo_url("fake ArcGIS"), fake);
    let base = p.demo_url("proxy (self-signed certificate");
    let query =
        format!("{base}/features/Parks/FeatureServer/0/query?where=1%3D1&outFields=*&f=json");
    let (status, body) = demo_get(query.clone()).await;
    assert_eq!(status, 200, "{body}");
    let j: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(j["features"].as_array().unwrap().len(), 6);
    assert!(!body.contains("token"), "{body}");
    // The other demo gone, nothing answers upstream: this one started no
    // fake of its own.
    let (code, out) = upstream.terminate();
    assert_eq!(code, 0, "{out}");
    let (status, body) = demo_get(query).await;
    assert_eq!(status, 502, "{body}");
    let (code, out) = p.terminate();
    assert_eq!(code, 0, "{out}");
}

#[test]
fn demo_refuses_a_fake_address_that_is_not_one() {
    for bad in [
        "nonsense",
        "127.0.0.1",
        "http://127.0.0.1:80",
        "127.0.0.1:99999",
        "",
    ] {
        let (code, _, err) = run(&["demo", "--fake", bad], &[]);
        assert_eq!(code, 2, "--fake {bad:?}: {err}");
        assert!(err.contains("--fake <ADDR>"), "--fake {bad:?}: {err}");
    }
}

#[derive(Debug)]
pub(crate) struct AcceptAny;

impl rustls::client::danger::ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &[rustls_pki_types::CertificateDer<'_>],
        _: &rustls_pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls_pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[test]
fn check_speaks_json_for_tools_and_takes_dash_c() {
    let dir = tempfile::tempdir().unwrap();
    let bad = write(
        dir.path(),
        "bad.toml",
        "[server]\nplain_listen = \"nonsense\"\n[[routes]]\nupstream = \"https://a.example.com/x\"\n",
    );
    let (code, out, err) = run(&["-c", &bad, "check", "--format", "json"], &[]);
    assert_eq!(code, 78, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["ok"], false);
    let problems = v["problems"].as_array().unwrap();
    assert!(
        problems.iter().any(|p| p["key"] == "server.plain_listen"),
        "{out}"
    );
    let good = write(
        dir.path(),
        "good.toml",
        "[server]\nplain_listen = \"127.0.0.1:0\"\n[referers]\nallowed = [\"https://a.example.com\"]\n[[routes]]\nupstream = \"https://a.example.com/x\"\nmount = \"/a\"\n",
    );
    let (code, out, _) = run(&["check", "-c", &good, "--format", "json"], &[]);
    assert_eq!(code, 0, "{out}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["ok"], true);
    assert_eq!(v["problems"].as_array().unwrap().len(), 0);
}

/// `healthcheck` against the real binary's admin listener: 0 while it runs
/// (from the config's admin_listen, or an explicit URL), 1 when nothing or
/// something else answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthcheck_probes_the_admin_listener() {
    let pki = Pki::new();
    let fake = FakeArcGis::start().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = write_config(
        &pki,
        "hc.toml",
        &standard_config(&fake, "").replace(
            "admin_listen = \"127.0.0.1:0\"",
            &format!("admin_listen = \"0.0.0.0:{port}\""),
        ),
    );
    let mut p = Proc::spawn(&["--config", &cfg], &[("SECRET", SECRET)]);
    let admin: std::net::SocketAddr = format!("127.0.0.1:{}", p.listener("admin").port())
        .parse()
        .unwrap();
    p.wait_for("obtained token");
    let url = format!("http://{admin}/healthz");
    let hc = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run(&args, &[])
        })
    };
    let (code, out, err) = hc(vec!["healthcheck".into(), "--url".into(), url.clone()])
        .await
        .unwrap();
    assert_eq!(code, 0, "{out}{err}");
    // From the config's admin_listen (0.0.0.0 probed on loopback), without
    // the secrets the config names.
    let (code, out, err) = hc(vec!["healthcheck".into(), "-c".into(), cfg.clone()])
        .await
        .unwrap();
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!("http://127.0.0.1:{port}/healthz: 200")),
        "{out}"
    );
    let readyz = format!("http://{admin}/readyz");
    let (code, _, _) = hc(vec!["healthcheck".into(), "--url".into(), readyz])
        .await
        .unwrap();
    assert_eq!(code, 0);
    // A 404 is not healthy.
    let (code, _, err) = hc(vec![
        "healthcheck".into(),
        "--url".into(),
        format!("http://{admin}/nothing"),
    ])
    .await
    .unwrap();
    assert_eq!(code, 1, "{err}");
    // Not a plain-HTTP URL, not HTTP at all.
    let (code, _, err) = hc(vec![
        "healthcheck".into(),
        "--url".into(),
        format!("https://{admin}/healthz"),
    ])
    .await
    .unwrap();
    assert_eq!(code, 1);
    assert!(err.contains("not an http:// URL"), "{err}");
    let garbage = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let garbage_addr = garbage.local_addr().unwrap();
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = garbage.accept() {
            use std::io::Write;
            let _ = s.write_all(b"SSH-2.0-OpenSSH_9.2\r\n");
        }
    });
    let (code, _, err) = hc(vec![
        "healthcheck".into(),
        "--url".into(),
        format!("http://{garbage_addr}/"),
    ])
    .await
    .unwrap();
    assert_eq!(code, 1);
    assert!(err.contains("not HTTP"), "{err}");
    let (code, _) = p.terminate();
    assert_eq!(code, 0);
    let (code, _, err) = hc(vec!["healthcheck".into(), "--url".into(), url])
        .await
        .unwrap();
    assert_eq!(code, 1, "{err}");
    // Without --url and without admin_listen in the config: says so.
    let plain = write_config(
        &pki,
        "noadmin.toml",
        &standard_config(&fake, "").replace("admin_listen = \"127.0.0.1:0\"\n", ""),
    );
    let (code, _, err) = hc(vec!["healthcheck".into(), "-c".into(), plain])
        .await
        .unwrap();
    assert_eq!(code, 1);
    assert!(err.contains("no server.admin_listen"), "{err}");
}

/// `import-esri` as a resource-proxy user runs it: their proxy.config in,
/// a proxy.toml out that `check` accepts once the listed variables are set,
/// and no secret of the old file in either output.
#[test]
fn import_esri_round_trip_through_check() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("certs")).unwrap();
    std::fs::copy(pki.path("proxy.crt"), dir.path().join("certs/proxy.crt")).unwrap();
    std::fs::copy(pki.path("proxy.key"), dir.path().join("certs/proxy.key")).unwrap();
    let old = write(
        dir.path(),
        "proxy.config",
        r#"<?xml version="1.0" encoding="utf-8" ?>
<!-- resource-proxy settings for the parks viewer -->
<ProxyConfig allowedReferers="https://parks.example.org/viewer/,https://*.example.net/*"
             mustMatch="true" logFile="C:\logs\proxy.txt" logLevel="Warning">
  <serverUrls>
    <!-- routing, paid -->
    <serverUrl url="https://route.arcgis.com/arcgis/rest/services/World/Route/NAServer"
               oauth2Endpoint="https://www.arcgis.com/sharing/oauth2"
               clientId="parksClientId" clientSecret="OLD-CLIENT-SECRET"
               rateLimit="120" rateLimitPeriod="1" matchAll="true"/>
    <serverUrl MATCHALL="true" Username="svc_parks" Password="OLD-PASSWORD"
               url="https://gis.example.com/server/rest/services"/>
    <serverUrl url="https://services.arcgis.com/abc/arcgis/rest/services" matchAll="true"/>
  </serverUrls>
</ProxyConfig>
"#,
    );
    let (code, toml, review) = run(&["import-esri", &old], &[]);
    assert_eq!(code, 0, "{review}");
    for secret in ["OLD-CLIENT-SECRET", "OLD-PASSWORD"] {
        assert!(
            !toml.contains(secret) && !review.contains(secret),
            "{secret} leaked"
        );
    }
    assert!(
        review.contains("ROUTE_ARCGIS_COM_CLIENT_SECRET"),
        "{review}"
    );
    assert!(review.contains("GIS_EXAMPLE_COM_PASSWORD"), "{review}");
    let new = write(dir.path(), "proxy.toml", &toml);
    let (code, out, err) = run(
        &["check", "--config", &new],
        &[
            ("ROUTE_ARCGIS_COM_CLIENT_SECRET", "new-secret"),
            ("GIS_EXAMPLE_COM_PASSWORD", "new-password"),
        ],
    );
    assert_eq!(code, 0, "{toml}\n{out}{err}");
    // Without the variables, check says which ones are missing.
    let (code, _, err) = run(&["check", "--config", &new], &[]);
    assert_eq!(code, 78);
    assert!(
        err.contains("ROUTE_ARCGIS_COM_CLIENT_SECRET is not set"),
        "{err}"
    );

    // An open proxy is refused: nothing on stdout, the reason on stderr.
    let open = write(
        dir.path(),
        "open.config",
        r#"<ProxyConfig mustMatch="false"><serverUrls/></ProxyConfig>"#,
    );
    let (code, toml, review) = run(&["import-esri", &open], &[]);
    assert_eq!(code, 78);
    assert!(toml.is_empty(), "{toml}");
    assert!(review.contains("open proxy"), "{review}");

    // The Node version's proxy.json.
    let json = write(
        dir.path(),
        "proxy.json",
        r#"{"proxyConfig": [{"mustMatch": true, "allowedReferers": ["https://parks.example.org"]}],
            "serverUrls": [{"url": "https://basemaps-api.arcgis.com/arcgis/rest/services",
                            "matchAll": true, "accessToken": "OLD-API-KEY"}]}"#,
    );
    let (code, toml, review) = run(&["import-esri", &json], &[]);
    assert_eq!(code, 0, "{review}");
    assert!(!toml.contains("OLD-API-KEY") && !review.contains("OLD-API-KEY"));
    let new = write(dir.path(), "from-json.toml", &toml);
    let (code, out, err) = run(
        &["check", "--config", &new],
        &[("BASEMAPS_API_ARCGIS_COM_API_KEY", "AAPK-new")],
    );
    assert_eq!(code, 0, "{toml}\n{out}{err}");
}
