//! Several apps on one proxy: each app's requests carry its own credential's
//! token, the most specific Referer entry decides the app, routes can be
//! limited to apps, and apps have their own rate limits and quotas, kept
//! across a reload.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::support::*;

/// The standard config plus a second credential (`parks`, another client
/// ID) and two apps: `parks-map` uses `parks` in place of `online`; `city`
/// uses the route credentials. `extra` is appended.
fn config(fake: &FakeArcGis, extra: &str) -> String {
    let base = fake.url();
    standard_config(
        fake,
        &format!(
            r#"
[credentials.parks]
token_url = "{base}/sharing/rest/oauth2/token"
client_id = "parks-client"
client_secret_env = "SECRET"
[[apps]]
name = "parks-map"
referers = ["https://parks.example.org", "https://*.parks.example.org"]
credentials = {{ online = "parks" }}
[[apps]]
name = "city"
referers = ["https://city.example.net"]
{extra}
"#
        ),
    )
}

/// Adds `line` to the `[[apps]]` table named `app`.
fn app_setting(toml: &str, app: &str, line: &str) -> String {
    toml.replacen(
        &format!("name = \"{app}\"\n"),
        &format!("name = \"{app}\"\n{line}\n"),
        1,
    )
}

async fn get_from(client: &TestClient, path: &str, origin: &str) -> Answer {
    client.get_with(path, &[("origin", origin)]).await
}

#[tokio::test]
async fn each_app_sends_its_own_credential_and_no_token_reaches_a_client() {
    let pki = Pki::new();
    let fake = FakeArcGis::start().await;
    let proxy = TestProxy::start(&pki, &config(&fake, "")).await;
    let client = TestClient::new(&pki, proxy.addr);
    for (origin, client_id) in [
        ("https://parks.example.org", "parks-client"),
        // A subdomain: `*.parks.example.org` is more specific than the
        // allowlist's `*.example.org`.
        ("https://tiles.parks.example.org", "parks-client"),
        ("https://city.example.net", "the-client-id"),
        ("https://app.example.com", "the-client-id"),
        ("https://other.example.org", "the-client-id"),
    ] {
        let a = get_from(&client, "/svc/echo/x", origin).await;
        assert_eq!(a.status, 200, "{origin}: {}", a.text());
        assert_eq!(a.json()["token_ok"], true);
        assert_eq!(
            fake.client_of(&fake.last()).as_deref(),
            Some(client_id),
            "{origin}"
        );
    }
    // Answers that echo the token: neither credential's token gets out.
    for origin in ["https://parks.example.org", "https://city.example.net"] {
        let a = get_from(&client, "/svc/leak/style", origin).await;
        assert_eq!(a.status, 200);
        let text = a.text();
        let issued = fake.issued();
        assert!(issued.len() >= 2, "{issued:?}");
        for t in issued {
            assert!(!text.contains(&t), "{origin}: a token reached the client");
            assert!(!text.contains(&encoded(&t)), "{origin}: an encoded token");
        }
    }
    // Usage is attributed by app name, and ?ping lists the declared apps
    // (not the allowlist entries).
    let admin = TestClient::plain(proxy.admin_addr.unwrap());
    let metrics = admin.get_with("/metrics", &[]).await.text();
    assert_eq!(
        sample(
            &metrics,
            "arcgis_proxy_app_requests_total{app=\"parks-map\",route=\"/svc\"}"
        ),
        Some(3.0),
        "{metrics}"
    );
    let ping = client.get("/proxy?ping").await.json();
    let apps = ping["apps"].as_object().unwrap();
    let mut names: Vec<&String> = apps.keys().collect();
    names.sort();
    assert_eq!(names, ["city", "parks-map"]);
    assert_eq!(ping["credentials"]["parks"], "ok");
    proxy.stop().await;
}

#[tokio::test]
async fn a_route_limited_to_apps_refuses_the_others() {
    let pki = Pki::new();
    let fake = FakeArcGis::start().await;
    let toml = config(&fake, "").replacen(
        "name = \"query-route\"",
        "name = \"query-route\"\napps = [\"city\"]",
        1,
    );
    let proxy = TestProxy::start(&pki, &toml).await;
    let client = TestClient::new(&pki, proxy.addr);
    let a = get_from(&client, "/q/features", "https://city.example.net").await;
    assert_eq!(a.status, 200, "{}", a.text());
    let a = get_from(&client, "/q/features", "https://parks.example.org").await;
    a.assert_error(403);
    assert_eq!(
        a.json()["error"]["message"],
        "App not allowed on this route."
    );
    // Referer and Origin of different apps: refused before any route.
    let a = client
        .get_with(
            "/svc/features",
            &[
                ("referer", "https://city.example.net/page"),
                ("origin", "https://parks.example.org"),
            ],
        )
        .await;
    a.assert_error(403);
    assert_eq!(a.json()["error"]["message"], "Referer not allowed.");
    let admin = TestClient::plain(proxy.admin_addr.unwrap());
    let metrics = admin.get_with("/metrics", &[]).await.text();
    assert_eq!(
        sample(
            &metrics,
            "arcgis_proxy_app_rejections_total{app=\"parks-map\",route=\"query-route\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn an_app_rate_limit_is_per_client_and_per_app() {
    let pki = Pki::new();
    let fake = FakeArcGis::start().await;
    let toml = app_setting(
        &config(&fake, ""),
        "city",
        "rate_limit = { requests = 2, per_secs = 60 }",
    );
    let proxy = TestProxy::start(&pki, &toml).await;
    let client = TestClient::new(&pki, proxy.addr);
    for _ in 0..2 {
        let a = get_from(&client, "/svc/features", "https://city.example.net").await;
        assert_eq!(a.status, 200);
    }
    // Across routes: the app's bucket is the app's, not the route's.
    let a = get_from(&client, "/q/features", "https://city.example.net").await;
    a.assert_error(429);
    let retry: u64 = a.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=30).contains(&retry), "Retry-After {retry}");
    // Another app is not limited by it.
    let a = get_from(&client, "/svc/features", "https://parks.example.org").await;
    assert_eq!(a.status, 200);
    let admin = TestClient::plain(proxy.admin_addr.unwrap());
    let metrics = admin.get_with("/metrics", &[]).await.text();
    assert_eq!(
        sample(
            &metrics,
            "arcgis_proxy_app_rate_limited_total{app=\"city\"}"
        ),
        Some(1.0)
    );
    proxy.stop().await;
}

/// Seconds to the next UTC hour, waiting out the last few seconds of an hour
/// so a test's requests all fall in one window.
async fn seconds_to_next_hour() -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let left = 3600 - now % 3600;
    if left < 20 {
        tokio::time::sleep(Duration::from_secs(left + 1)).await;
        return 3600;
    }
    left
}

#[tokio::test]
async fn a_quota_runs_out_until_the_window_ends_and_a_reload_keeps_the_count() {
    let pki = Pki::new();
    let fake = FakeArcGis::start().await;
    let quota = |n: u32| {
        app_setting(
            &config(&fake, ""),
            "parks-map",
            &format!("quota = {{ requests = {n}, per = \"hour\" }}"),
        )
    };
    let proxy = TestProxy::start(&pki, &quota(3)).await;
    let client = TestClient::new(&pki, proxy.addr);
    let left = seconds_to_next_hour().await;
    for _ in 0..3 {
        let a = get_from(&client, "/svc/features", "https://parks.example.org").await;
        assert_eq!(a.status, 200);
    }
    let upstream_before = fake.requests().len();
    let a = get_from(&client, "/svc/features", "https://parks.example.org").await;
    a.assert_error(429);
    assert_eq!(a.json()["error"]["message"], "App quota exhausted.");
    let retry: u64 = a.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(
        retry.abs_diff(left) <= 3,
        "Retry-After {retry}, the hour ends in {left} s"
    );
    assert_eq!(fake.requests().len(), upstream_before, "forwarded anyway");
    // Other apps have no quota.
    let a = get_from(&client, "/svc/features", "https://city.example.net").await;
    assert_eq!(a.status, 200);
    let ping = client.get("/proxy?ping").await.json();
    assert_eq!(ping["apps"]["parks-map"]["quota_remaining"], 0);

    // A reload that leaves the app's quota as it was keeps the count.
    let unrelated = quota(3).replace("upstream_timeout_secs = 2", "upstream_timeout_secs = 3");
    proxy.app.reload(test_config(&pki, &unrelated));
    get_from(&client, "/svc/features", "https://parks.example.org")
        .await
        .assert_error(429);
    // A new quota is counted afresh.
    proxy.app.reload(test_config(&pki, &quota(5)));
    let a = get_from(&client, "/svc/features", "https://parks.example.org").await;
    assert_eq!(a.status, 200, "{}", a.text());
    let admin = TestClient::plain(proxy.admin_addr.unwrap());
    let metrics = admin.get_with("/metrics", &[]).await.text();
    assert_eq!(
        sample(
            &metrics,
            "arcgis_proxy_app_quota_exhausted_total{app=\"parks-map\"}"
        ),
        Some(2.0),
        "{metrics}"
    );
    assert_eq!(
        sample(
            &metrics,
            "arcgis_proxy_app_quota_remaining{app=\"parks-map\"}"
        ),
        Some(4.0)
    );
    proxy.stop().await;
}

#[tokio::test]
async fn a_reload_keeps_rate_limit_buckets_of_unchanged_routes() {
    let pki = Pki::new();
    let fake = FakeArcGis::start().await;
    let limited = config(&fake, "").replacen(
        "credential = \"online\"\nmount = \"/svc\"",
        "credential = \"online\"\nmount = \"/svc\"\nrate_limit = { requests = 2, per_secs = 60 }",
        1,
    );
    let proxy = TestProxy::start(&pki, &limited).await;
    let client = TestClient::new(&pki, proxy.addr);
    for _ in 0..2 {
        assert_eq!(client.get("/svc/features").await.status, 200);
    }
    client.get("/svc/features").await.assert_error(429);
    let unrelated = limited.replace("upstream_timeout_secs = 2", "upstream_timeout_secs = 3");
    proxy.app.reload(test_config(&pki, &unrelated));
    client.get("/svc/features").await.assert_error(429);
    proxy.stop().await;
}
