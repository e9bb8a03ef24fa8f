//! Operations: metrics after known traffic, rate limits and client IPs,
//! in-process reload (allowlist change during a streaming answer, token
//! kept), and the real binary under SIGHUP (bad config, certificate renewal)
//! and SIGTERM (in-flight request finishes).

use std::sync::Arc;
use std::time::Duration;

use crate::support::*;

#[tokio::test]
async fn metrics_count_known_traffic() {
    let pki = Pki::new();
    let fake = FakeArcGis::start().await;
    let proxy = TestProxy::start(&pki, &standard_config(&fake, "")).await;
    let client = TestClient::new(&pki, proxy.addr);
    let admin = TestClient::plain(proxy.admin_addr.unwrap());
    assert_eq!(client.get("/svc/features").await.status, 200);
    assert_eq!(client.get("/svc/features").await.status, 200);
    client.get("/nowhere").await.assert_error(404);
    client
        .get_with("/svc/features", &[("referer", "https://evil.example/")])
        .await
        .assert_error(403);
    fake.revoke_all();
    assert_eq!(client.get("/svc/features").await.status, 200);

    let m = admin.get_with("/metrics", &[]).await;
    assert_eq!(m.status, 200);
    assert!(
        m.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text")
    );
    let t = m.text();
    assert_eq!(
        sample(
            &t,
            r#"arcgis_proxy_requests_total{route="/svc",status="200"}"#
        ),
        Some(3.0),
        "{t}"
    );
    assert_eq!(
        sample(
            &t,
            r#"arcgis_proxy_requests_total{route="none",status="404"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &t,
            r#"arcgis_proxy_requests_total{route="none",status="403"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(&t, "arcgis_proxy_referer_rejections_total"),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &t,
            r#"arcgis_proxy_token_fetches_total{credential="online",outcome="ok"}"#
        ),
        Some(2.0)
    );
    assert_eq!(
        sample(
            &t,
            r#"arcgis_proxy_token_retries_total{credential="online"}"#
        ),
        Some(1.0)
    );
    // Four upstream attempts: two, then a refused one and its retry.
    assert_eq!(
        sample(
            &t,
            r#"arcgis_proxy_upstream_duration_seconds_count{route="/svc"}"#
        ),
        Some(4.0)
    );
    let left = sample(
        &t,
        r#"arcgis_proxy_token_expires_in_seconds{credential="online"}"#,
    )
    .unwrap();
    assert!((7100.0..=7170.0).contains(&left), "{left}");
    let age = sample(&t, r#"arcgis_proxy_token_age_seconds{credential="online"}"#).unwrap();
    assert!((0.0..60.0).contains(&age), "{age}");
    // Usage attribution: by the allowlist entry that admitted the request
    // (as configured, not the raw Referer) and route; refused and unrouted
    // requests are not attributed.
    assert_eq!(
        sample(
            &t,
            r#"arcgis_proxy_app_requests_total{app="https://app.example.com",route="/svc"}"#
        ),
        Some(3.0),
        "{t}"
    );
    let bytes = sample(
        &t,
        r#"arcgis_proxy_app_response_bytes_total{app="https://app.example.com",route="/svc"}"#,
    )
    .unwrap();
    assert_eq!(
        bytes,
        3.0 * client.get("/svc/features").await.body.len() as f64
    );
    assert!(!t.contains("evil.example"), "a raw Referer became a label");
    // The client's keep-alive connection is open.
    assert!(sample(&t, "arcgis_proxy_open_connections").unwrap() >= 1.0);
    let a = admin
        .send(admin.req("POST", "/metrics").body(full("")).unwrap())
        .await;
    a.assert_error(405);
    proxy.stop().await;
}

fn limited_config(fake: &FakeArcGis, trusted: &str) -> String {
    standard_config(fake, "")
        .replacen(
            "credential = \"online\"\nmount = \"/svc\"",
            "credential = \"online\"\nmount = \"/svc\"\nrate_limit = { requests = 3, per_secs = 1 }",
            1,
        )
        .replace(
            "admin_listen = \"127.0.0.1:0\"",
            &format!("admin_listen = \"127.0.0.1:0\"\ntrusted_proxies = [{trusted}]"),
        )
}

#[tokio::test]
async fn rate_limit_answers_429_then_recovers() {
    let pki = Pki::new();
    let fake = FakeArcGis::start().await;
    let proxy = TestProxy::start(&pki, &limited_config(&fake, "")).await;
    let client = TestClient::new(&pki, proxy.addr);
    for _ in 0..3 {
        assert_eq!(client.get("/svc/features").await.status, 200);
    }
    let before = fake.requests().len();
    let a = client.get("/svc/features").await;
    a.assert_error(429);
    assert_eq!(a.headers["retry-after"], "1");
    assert_eq!(
        fake.requests().len(),
        before,
        "a limited request reached upstream"
    );
    // Other routes are not limited.
    assert_eq!(client.get("/q/features").await.status, 200);
    // Without trusted proxies, X-Forwarded-For is not believed: same bucket.
    let a = client
        .get_with(
            "/svc/features",
            &[
                ("referer", "https://app.example.com/"),
                ("x-forwarded-for", "198.51.100.1"),
            ],
        )
        .await;
    a.assert_error(429);
    // The bucket refills evenly: one request per 1/3 s, the whole bucket in 1 s.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for _ in 0..3 {
        assert_eq!(client.get("/svc/features").await.status, 200);
    }
    client.get("/svc/features").await.assert_error(429);
    let admin = TestClient::plain(proxy.admin_addr.unwrap());
    let t = admin.get_with("/metrics", &[]).await.text();
    assert_eq!(
        sample(&t, r#"arcgis_proxy_rate_limited_total{route="/svc"}"#),
        Some(3.0)
    );
    proxy.stop().await;
}

#[tokio::test]
async fn forwarded_client_addresses_are_believed_only_from_trusted_peers() {
    let pki = Pki::new();
    let fake = FakeArcGis::start().await;
    let proxy = TestProxy::start(&pki, &limited_config(&fake, "\"127.0.0.1/32\"")).await;
    let client = TestClient::new(&pki, proxy.addr);
    let get = |xff: &'static str| {
        let client = &client;
        async move {
            client
                .get_with(
                    "/svc/features",
                    &[
                        ("referer", "https://app.example.com/"),
                        ("x-forwarded-for", xff),
                    ],
                )
                .await
                .status
                .as_u16()
        }
    };
    // Client A (198.51.100.1) spends its bucket; forged left-most entries do
    // not give it a new one: the right-most untrusted hop counts.
    assert_eq!(get("198.51.100.1").await, 200);
    assert_eq!(get("1.1.1.1, 198.51.100.1").await, 200);
    assert_eq!(get("2.2.2.2, 198.51.100.1").await, 200);
    assert_eq!(get("3.3.3.3, 198.51.100.1").await, 429);
    // Client B has its own bucket.
    assert_eq!(get("198.51.100.2").await, 200);
    // Forwarded works as well.
    let a = client
        .get_with(
            "/svc/features",
            &[
                ("referer", "https://app.example.com/"),
                ("forwarded", "for=198.51.100.1"),
            ],
        )
        .await;
    a.assert_error(429);
    proxy.stop().await;
}

#[tokio::test]
async fn reload_changes_allowlist_keeps_token_and_in_flight_stream() {
    let pki = Pki::new();
    let fake = FakeArcGis::start().await;
    let toml = standard_config(&fake, "");
    let proxy = TestProxy::start(&pki, &toml).await;
    let client = Arc::new(TestClient::new(&pki, proxy.addr));
    assert_eq!(client.get("/svc/features").await.status, 200);
    assert_eq!(fake.token_count(), 1);

    // A 16 MiB stream in flight across the reload.
    let c = Arc::clone(&client);
    let stream = tokio::spawn(async move { c.get("/svc/big").await });
    tokio::time::sleep(Duration::from_millis(20)).await;

    let new = toml.replace(
        "allowed = [\"https://app.example.com\",",
        "allowed = [\"https://new.example.net\",",
    );
    let notes = proxy.app.reload(test_config(&pki, &new));
    assert!(notes.is_empty(), "{notes:?}");
    // A log format cannot change under a running subscriber: said so.
    let text_logs = format!("{new}\n[log]\nformat = \"text\"\n");
    let notes = proxy.app.reload(test_config(&pki, &text_logs));
    assert!(
        notes
            .iter()
            .any(|n| n.contains("log.format changes only on restart")),
        "{notes:?}"
    );
    let notes = proxy.app.reload(test_config(&pki, &new));
    assert!(notes.is_empty(), "{notes:?}");

    let a = stream.await.unwrap();
    assert_eq!(a.status, 200);
    assert_eq!(a.body.len(), 16 * 1024 * 1024, "stream cut by the reload");
    // New requests see the new allowlist…
    client.get("/svc/features").await.assert_error(403);
    let a = client
        .get_with("/svc/features", &[("referer", "https://new.example.net/x")])
        .await;
    assert_eq!(a.status, 200);
    // …and the unchanged credential kept its token.
    assert_eq!(fake.token_count(), 1);

    // Changing the credential brings a new token source.
    let changed = new.replace("client_id = \"the-client-id\"", "client_id = \"other-id\"");
    proxy.app.reload(test_config(&pki, &changed));
    let a = client
        .get_with("/svc/features", &[("referer", "https://new.example.net/x")])
        .await;
    assert_eq!(a.status, 200);
    assert_eq!(fake.token_count(), 2);
    assert!(fake.token_forms.lock().unwrap()[1].contains("client_id=other-id"));
    proxy.stop().await;
}

#[tokio::test]
async fn reload_notes_settings_that_need_a_restart() {
    let pki = Pki::new();
    let fake = FakeArcGis::start().await;
    let toml = standard_config(&fake, "");
    let proxy = TestProxy::start(&pki, &toml).await;
    let moved = toml.replacen("listen = \"127.0.0.1:0\"", "listen = \"127.0.0.1:1\"", 1);
    let notes = proxy.app.reload(test_config(&pki, &moved));
    assert!(notes.iter().any(|n| n.contains("restart")), "{notes:?}");
    // Still served on the old address.
    let client = TestClient::new(&pki, proxy.addr);
    assert_eq!(client.get("/svc/features").await.status, 200);
    proxy.stop().await;
}

// ---------------------------------------------------------- real binary

/// The leaf certificate a fresh TLS connection is shown.
async fn peer_cert(pki: &Pki, addr: std::net::SocketAddr) -> Vec<u8> {
    let tls = tls_connect(pki, addr, &rustls::version::TLS13, &[b"http/1.1"])
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_config_and_certificates_and_rejects_bad_ones() {
    let pki = Pki::new();
    let fake = FakeArcGis::start().await;
    let toml = standard_config(&fake, "");
    let cfg = write_config(&pki, "hup.toml", &toml);
    let mut p = Proc::spawn(&["--config", &cfg], &[("SECRET", SECRET)]);
    let addr: std::net::SocketAddr = p.listener("https");
    p.wait_for("obtained token");
    let client = TestClient::new(&pki, addr);
    assert_eq!(client.get("/svc/features").await.status, 200);
    let cert_before = peer_cert(&pki, addr).await;

    // A broken config: rejected with the key named, the old one keeps serving.
    write_config(
        &pki,
        "hup.toml",
        &toml.replace("mount = \"/svc\"", "mount = \"svc-no-slash\""),
    );
    p.signal("HUP");
    let line = p.wait_for("configuration rejected");
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["level"], "ERROR");
    assert_eq!(v["key"], "routes[0].mount");
    assert_eq!(client.get("/svc/features").await.status, 200);

    // A renewed certificate and a new allowlist, picked up together.
    let renewed = Pki::new();
    std::fs::copy(renewed.path("proxy.crt"), pki.path("proxy.crt")).unwrap();
    std::fs::copy(renewed.path("proxy.key"), pki.path("proxy.key")).unwrap();
    write_config(
        &pki,
        "hup.toml",
        &toml.replace(
            "\"https://app.example.com\",",
            "\"https://renewed.example.com\",",
        ),
    );
    // The old keep-alive connection survives the reload.
    let old_conn = TestClient::new(&pki, addr);
    assert_eq!(
        old_conn
            .get_with("/svc/features", &[("referer", "https://app.example.com/")])
            .await
            .status,
        200
    );
    p.signal("HUP");
    p.wait_for("configuration reloaded");
    let cert_after = peer_cert(&renewed, addr).await;
    assert_ne!(
        cert_before, cert_after,
        "new connections still get the old certificate"
    );
    let fresh = TestClient::new(&renewed, addr);
    fresh.get("/svc/features").await.assert_error(403);
    let a = fresh
        .get_with(
            "/svc/features",
            &[("referer", "https://renewed.example.com/")],
        )
        .await;
    assert_eq!(a.status, 200);
    // The credential did not change: still one token.
    assert_eq!(fake.token_count(), 1);
    let (code, logs) = p.terminate();
    assert_eq!(code, 0, "{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_the_in_flight_request_finish() {
    let pki = Pki::new();
    let fake = FakeArcGis::start().await;
    let toml = set_key(
        &standard_config(&fake, ""),
        "limits",
        "upstream_timeout_secs = 10",
    );
    let cfg = write_config(&pki, "term.toml", &toml);
    let mut p = Proc::spawn(&["--config", &cfg], &[("SECRET", SECRET)]);
    let addr: std::net::SocketAddr = p.listener("https");
    let admin: std::net::SocketAddr = p.listener("admin");
    p.wait_for("obtained token");
    let client = Arc::new(TestClient::new(&pki, addr));
    let c = Arc::clone(&client);
    let slow = tokio::spawn(async move { c.get("/svc/slow").await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    p.signal("TERM");
    p.wait_for("shutting down");
    let readyz = TestClient::plain(admin).get_with("/readyz", &[]).await;
    assert_eq!(readyz.status, 503);
    let a = slow.await.unwrap();
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.json()["slow"], true);
    let (code, logs) = p.terminate();
    assert_eq!(code, 0, "{logs}");
    assert!(logs.contains("all connections closed"), "{logs}");
}

/// Kubernetes updates a mounted Secret by writing a new `..<timestamp>`
/// directory and re-pointing the `..data` symlink the visible files link
/// through. The proxy notices without a signal: new connections get the new
/// certificate within seconds, and a broken config written the same way is
/// rejected, logged and counted while the running one keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kubelet_style_secret_swap_is_reloaded_without_a_signal() {
    use std::os::unix::fs::symlink;
    let old_pki = Pki::new();
    let new_pki = Pki::new();
    let fake = FakeArcGis::start().await;
    let mount = tempfile::tempdir().unwrap();
    let m = mount.path();
    let publish = |name: &str, pki: &Pki| {
        let dir = m.join(name);
        std::fs::create_dir(&dir).unwrap();
        std::fs::copy(pki.path("proxy.crt"), dir.join("tls.crt")).unwrap();
        std::fs::copy(pki.path("proxy.key"), dir.join("tls.key")).unwrap();
        std::fs::set_permissions(
            dir.join("tls.key"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        // The atomic swap: a new link renamed over `..data`.
        symlink(name, m.join("..data_tmp")).unwrap();
        std::fs::rename(m.join("..data_tmp"), m.join("..data")).unwrap();
    };
    publish("..2026_12_05_01", &old_pki);
    symlink("..data/tls.crt", m.join("tls.crt")).unwrap();
    symlink("..data/tls.key", m.join("tls.key")).unwrap();

    let toml = standard_config(&fake, "")
        .replace("{CERT}", m.join("tls.crt").to_str().unwrap())
        .replace("{KEY}", m.join("tls.key").to_str().unwrap())
        .replace(
            "admin_listen = \"127.0.0.1:0\"",
            "admin_listen = \"127.0.0.1:0\"\nreload_poll_secs = 1",
        );
    let cfg = write_config(&old_pki, "watched.toml", &toml);
    let mut p = Proc::spawn(&["--config", &cfg], &[("SECRET", SECRET)]);
    let addr = p.listener("https");
    let admin = p.listener("admin");
    p.wait_for("obtained token");
    let tls13 = &rustls::version::TLS13;
    assert!(
        tls_connect(&old_pki, addr, tls13, &[b"http/1.1"])
            .await
            .is_ok()
    );
    assert!(
        tls_connect(&new_pki, addr, tls13, &[b"http/1.1"])
            .await
            .is_err()
    );

    publish("..2026_12_05_02", &new_pki);
    let started = std::time::Instant::now();
    while tls_connect(&new_pki, addr, tls13, &[b"http/1.1"])
        .await
        .is_err()
    {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the new certificate was not served within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    p.wait_for("configuration files changed: reloading");
    p.wait_for("configuration reloaded");

    // A broken config: rejected once, not retried, the old one serves on.
    std::fs::write(&cfg, "[server]\nlisten = \"nonsense\"\n").unwrap();
    p.wait_for("configuration rejected; keeping the running one");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        tls_connect(&new_pki, addr, tls13, &[b"http/1.1"])
            .await
            .is_ok()
    );
    let metrics = TestClient::plain(admin)
        .get_with("/metrics", &[])
        .await
        .text();
    assert_eq!(
        sample(
            &metrics,
            "arcgis_proxy_config_reloads_total{outcome=\"error\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            "arcgis_proxy_config_reloads_total{outcome=\"ok\"}"
        ),
        Some(1.0)
    );
    let (code, logs) = p.terminate();
    assert_eq!(code, 0, "{logs}");
}
