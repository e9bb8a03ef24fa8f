//! Cluster-wide rate limits: three proxy processes sharing a real
//! `redis-server` admit, together, what one process would; with the store
//! gone they fail closed (as configured) and count it.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::*;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts a throwaway `redis-server` on a free port, or `None` when it is
/// not installed.
fn start_redis() -> Option<(std::process::Child, u16)> {
    start_redis_with(|port| vec!["--port".into(), port.to_string().into()])
}

/// As [`start_redis`], with `listen(port)` giving the listening arguments
/// (`--port`, or `--tls-port` and its files).
fn start_redis_with(
    listen: impl FnOnce(u16) -> Vec<std::ffi::OsString>,
) -> Option<(std::process::Child, u16)> {
    let Ok(redis_bin) = which("redis-server") else {
        eprintln!("SKIPPED: redis-server not installed (apt-get install redis-server)");
        return None;
    };
    let port = free_port();
    let redis = Command::new(redis_bin)
        .args(listen(port))
        .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until it accepts.
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Some((redis, port))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_one_budget_and_fail_closed_without_redis() {
    let Some((mut redis, port)) = start_redis() else {
        return;
    };

    let pki = Pki::new();
    let fake = FakeArcGis::start().await;
    let toml = standard_config(&fake, &format!(
        "[rate_limit]\nstore = \"redis://127.0.0.1:{port}/\"\nbudget_ms = 200\non_store_error = \"closed\"\n"
    ))
    .replacen(
        "credential = \"online\"\nmount = \"/svc\"",
        "credential = \"online\"\nmount = \"/svc\"\nrate_limit = { requests = 10, per_secs = 60 }",
        1,
    );
    let cfg = write_config(&pki, "shared.toml", &toml);
    let mut procs = Vec::new();
    let mut clients = Vec::new();
    let mut admins = Vec::new();
    for _ in 0..3 {
        let mut p = Proc::spawn(&["--config", &cfg], &[("SECRET", SECRET)]);
        let https: std::net::SocketAddr = p.listener("https");
        let admin: std::net::SocketAddr = p.listener("admin");
        p.wait_for("obtained token");
        clients.push(TestClient::new(&pki, https));
        admins.push(TestClient::plain(admin));
        procs.push(p);
    }
    // 30 requests from one client address, spread over the three replicas.
    let mut admitted = 0;
    let mut limited = 0;
    for i in 0..30 {
        let a = clients[i % 3].get("/svc/features").await;
        match a.status.as_u16() {
            200 => admitted += 1,
            429 => {
                limited += 1;
                assert!(a.headers.contains_key("retry-after"));
            }
            s => panic!("unexpected {s}: {}", a.text()),
        }
    }
    assert_eq!(
        admitted, 10,
        "replicas together must admit one bucket's worth"
    );
    assert_eq!(limited, 20);

    // Redis gone: configured to fail closed, and counted.
    let _ = redis.kill();
    let _ = redis.wait();
    let started = std::time::Instant::now();
    let a = clients[0].get("/svc/features").await;
    a.assert_error(429);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the store call was not bounded"
    );
    let metrics = admins[0].get_with("/metrics", &[]).await.text();
    let errors = sample(&metrics, "arcgis_proxy_rate_limit_store_errors_total").unwrap();
    assert!(errors >= 1.0, "{metrics}");
    // Routes without a rate limit are unaffected.
    assert_eq!(clients[0].get("/q/features").await.status, 200);
    for p in procs {
        let (code, _) = p.terminate();
        assert_eq!(code, 0);
    }
}

/// An app's quota and its rate limit, counted by three processes through one
/// `redis-server`: together they admit one quota's worth, and the refusals
/// say how long until the window ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_an_app_quota_and_rate_limit() {
    let Some((mut redis, port)) = start_redis() else {
        return;
    };
    let pki = Pki::new();
    let fake = FakeArcGis::start().await;
    let toml = standard_config(
        &fake,
        &format!(
            r#"
[rate_limit]
store = "redis://127.0.0.1:{port}/"
budget_ms = 200
on_store_error = "closed"
[[apps]]
name = "parks-map"
referers = ["https://parks.example.org"]
quota = {{ requests = 7, per = "day" }}
[[apps]]
name = "city"
referers = ["https://city.example.net"]
rate_limit = {{ requests = 4, per_secs = 3600 }}
"#
        ),
    );
    let cfg = write_config(&pki, "apps-shared.toml", &toml);
    let mut procs = Vec::new();
    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut p = Proc::spawn(&["--config", &cfg], &[("SECRET", SECRET)]);
        let https: std::net::SocketAddr = p.listener("https");
        p.wait_for("obtained token");
        clients.push(TestClient::new(&pki, https));
        procs.push(p);
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let to_midnight = 86_400 - now % 86_400;
    for (origin, allowed, message) in [
        ("https://parks.example.org", 7, "App quota exhausted."),
        ("https://city.example.net", 4, "Too many requests."),
    ] {
        let mut admitted = 0;
        for i in 0..15 {
            let a = clients[i % 3]
                .get_with("/svc/features", &[("origin", origin)])
                .await;
            match a.status.as_u16() {
                200 => admitted += 1,
                429 => {
                    assert_eq!(a.json()["error"]["message"], message);
                    let retry: u64 = a.headers["retry-after"].to_str().unwrap().parse().unwrap();
                    if origin.contains("parks") {
                        assert!(
                            retry.abs_diff(to_midnight) <= 5,
                            "Retry-After {retry}, the UTC day ends in {to_midnight} s"
                        );
                    }
                }
                s => panic!("unexpected {s}: {}", a.text()),
            }
        }
        assert_eq!(admitted, allowed, "{origin}: replicas together");
    }
    for p in procs {
        let (code, logs) = p.terminate();
        assert_eq!(code, 0, "{logs}");
    }
    let _ = redis.kill();
    let _ = redis.wait();
}

fn which(name: &str) -> Result<String, ()> {
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(|d| format!("{d}/{name}"))
        .find(|p| std::path::Path::new(p).exists())
        .ok_or(())
}

/// `rediss://` against `redis-server --tls-port` with a test CA and a
/// password from the environment: the limits are shared through it (with
/// `on_store_error = "closed"`, a store that could not be reached would
/// refuse everything), and a wrong password is a store error, not a pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_store_with_a_password_from_the_environment() {
    let pki = Pki::new();
    let Some((mut redis, port)) = start_redis_with(|port| {
        let f = |name: &str| pki.path(name).into_os_string();
        vec![
            "--port".into(),
            "0".into(),
            "--tls-port".into(),
            port.to_string().into(),
            "--tls-cert-file".into(),
            f("proxy.crt"),
            "--tls-key-file".into(),
            f("proxy.key"),
            "--tls-ca-cert-file".into(),
            f("ca.pem"),
            "--tls-auth-clients".into(),
            "no".into(),
            "--requirepass".into(),
            SECRET.into(),
        ]
    }) else {
        return;
    };
    let fake = FakeArcGis::start().await;
    let config = |password_env: &str| {
        standard_config(
            &fake,
            &format!(
                "[rate_limit]\nstore = \"rediss://127.0.0.1:{port}/\"\nstore_password_env = \"{password_env}\"\nstore_ca = \"{{CA}}\"\nbudget_ms = 1000\non_store_error = \"closed\"\n"
            ),
        )
        .replacen(
            "credential = \"online\"\nmount = \"/svc\"",
            "credential = \"online\"\nmount = \"/svc\"\nrate_limit = { requests = 2, per_secs = 60 }",
            1,
        )
    };
    let proxy = TestProxy::start(&pki, &config("SECRET")).await;
    let client = TestClient::new(&pki, proxy.addr);
    for _ in 0..2 {
        let a = client.get("/svc/features").await;
        assert_eq!(a.status, 200, "{}", a.text());
    }
    client.get("/svc/features").await.assert_error(429);
    let admin = TestClient::plain(proxy.admin_addr.unwrap());
    let metrics = admin.get_with("/metrics", &[]).await.text();
    assert_eq!(
        sample(&metrics, "arcgis_proxy_rate_limit_store_errors_total"),
        Some(0.0),
        "{metrics}"
    );
    proxy.stop().await;

    // The wrong password (APIKEY's value): the store refuses, closed means
    // 429, and it is counted as a store error.
    let proxy = TestProxy::start(&pki, &config("APIKEY")).await;
    let client = TestClient::new(&pki, proxy.addr);
    client.get("/svc/features").await.assert_error(429);
    let admin = TestClient::plain(proxy.admin_addr.unwrap());
    let metrics = admin.get_with("/metrics", &[]).await.text();
    assert!(
        sample(&metrics, "arcgis_proxy_rate_limit_store_errors_total").unwrap() >= 1.0,
        "{metrics}"
    );
    proxy.stop().await;
    let _ = redis.kill();
    let _ = redis.wait();
}

/// A limit above 1,000 requests a second per client holds in the store as
/// it does locally: 3,000 calls at once against 100,000 a second are all
/// admitted (with millisecond arithmetic every limit was capped at 1,000 a
/// second and these were refused from the 1,001st), and 50 a second still
/// refuses the 51st.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_above_a_thousand_a_second_hold_in_the_store() {
    let Some((mut redis, port)) = start_redis() else {
        return;
    };
    let cfg = arcgis_app_proxy::config::RateLimitStore {
        url: format!("redis://127.0.0.1:{port}/"),
        budget: Duration::from_secs(2),
        on_error: arcgis_app_proxy::config::StoreFallback::Closed,
        password: None,
        ca_pem: None,
    };
    let store = std::sync::Arc::new(arcgis_app_proxy::shared_rate::SharedStore::new(&cfg).unwrap());
    let client: std::net::IpAddr = "203.0.113.7".parse().unwrap();
    let calls = (0..3000).map(|_| {
        let store = std::sync::Arc::clone(&store);
        tokio::spawn(async move {
            store
                .check("fast", client, 100_000, Duration::from_secs(1))
                .await
        })
    });
    let mut refused = 0;
    for c in calls {
        match c.await.unwrap() {
            Ok(None) => {}
            Ok(Some(_)) => refused += 1,
            Err(()) => panic!("store did not answer"),
        }
    }
    assert_eq!(refused, 0);
    let mut admitted = 0;
    for _ in 0..60 {
        if store
            .check("slow", client, 50, Duration::from_secs(1))
            .await
            == Ok(None)
        {
            admitted += 1;
        }
    }
    assert!(
        (50..=52).contains(&admitted),
        "{admitted} of 60 admitted at 50/s"
    );
    let _ = redis.kill();
    let _ = redis.wait();
}
