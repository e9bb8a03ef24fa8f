//! Both addressing styles, ping, referer/origin policy, CORS, and hostile
//! paths and targets — each asserting what the upstream did or did not get.

use crate::support::*;

async fn setup() -> (Pki, std::sync::Arc<FakeArcGis>, TestProxy, TestClient) {
    let pki = Pki::new();
    let fake = FakeArcGis::start().await;
    let proxy = TestProxy::start(&pki, &standard_config(&fake, "")).await;
    let client = TestClient::new(&pki, proxy.addr);
    (pki, fake, proxy, client)
}

#[tokio::test]
async fn mounted_path_reaches_upstream_with_token_the_client_never_had() {
    let (_pki, fake, proxy, client) = setup().await;
    let a = client
        .get("/svc/echo/Parks/FeatureServer/0/query?where=1%3D1&f=json")
        .await;
    assert_eq!(a.status, 200, "{}", a.text());
    let j = a.json();
    assert_eq!(j["path"], "/svc/echo/Parks/FeatureServer/0/query");
    assert_eq!(j["query"], "where=1%3D1&f=json");
    assert_eq!(j["token_ok"], true);
    let rec = fake.last();
    let issued = fake.issued();
    assert_eq!(issued.len(), 1);
    assert_eq!(
        rec.headers["x-esri-authorization"],
        format!("Bearer {}", issued[0]).as_str()
    );
    assert!(
        rec.query_param("token").is_none(),
        "header route must not add token="
    );
    assert_eq!(j["headers"]["x-esri-authorization"], "<present>");
    assert!(!a.text().contains(&issued[0]));
    proxy.stop().await;
}

#[tokio::test]
async fn query_route_puts_token_in_query_only() {
    let (_pki, fake, proxy, client) = setup().await;
    let a = client.get("/q/features?f=json").await;
    assert_eq!(a.status, 200, "{}", a.text());
    let rec = fake.last();
    assert_eq!(
        rec.query_param("token").as_deref(),
        Some(fake.issued()[0].as_str())
    );
    assert!(rec.headers.get("x-esri-authorization").is_none());
    assert_eq!(rec.query_param("f").as_deref(), Some("json"));
    proxy.stop().await;
}

#[tokio::test]
async fn proxy_form_get_and_post() {
    let (_pki, fake, proxy, client) = setup().await;
    let base = fake.url();
    // GET: the target is everything after the first `?`, not encoded.
    let a = client
        .get(&format!(
            "/proxy?{base}/svc/echo/x?where=1=1&outFields=*&f=json"
        ))
        .await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.json()["path"], "/svc/echo/x");
    assert_eq!(a.json()["query"], "where=1=1&outFields=*&f=json");
    assert_eq!(a.json()["token_ok"], true);

    // POST with a form body (the JS SDK for long URLs); a client token in the
    // body or query is removed, ours is injected.
    let long_where = "1=1".repeat(800);
    let form = format!("where={long_where}&token=CLIENT-TOKEN&f=json");
    let a = client
        .send(
            client
                .req(
                    "POST",
                    &format!("/proxy?{base}/svc/echo/query?token=CLIENT-Q"),
                )
                .header("referer", "https://app.example.com/")
                .header("content-type", "application/x-www-form-urlencoded")
                .body(full(form))
                .unwrap(),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.text());
    let rec = fake.last();
    assert_eq!(rec.method, "POST");
    let body = String::from_utf8_lossy(&rec.body);
    assert_eq!(body, format!("where={long_where}&f=json"));
    assert!(!rec.uri.contains("CLIENT-Q"), "{}", rec.uri);
    assert_eq!(
        rec.headers["content-length"],
        body.len().to_string().as_str()
    );
    assert_eq!(a.json()["token_ok"], true);

    // POST with a JSON body passes byte for byte.
    let json_body = r#"{"features":[{"attributes":{"token":"stays-in-json"}}]}"#;
    let a = client
        .send(
            client
                .req("POST", &format!("/proxy?{base}/svc/echo/applyEdits"))
                .header("origin", "https://app.example.com")
                .header("content-type", "application/json")
                .body(full(json_body))
                .unwrap(),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(fake.last().body, json_body.as_bytes());
    proxy.stop().await;
}

#[tokio::test]
async fn ping_answers_without_referer() {
    let (_pki, _fake, proxy, client) = setup().await;
    let a = client.get_with("/proxy?ping", &[]).await;
    assert_eq!(a.status, 200);
    let j = a.json();
    assert_eq!(j["version"], env!("CARGO_PKG_VERSION"));
    let state = j["credentials"]["online"].as_str().unwrap();
    assert!(["ok", "fetching"].contains(&state), "{j}");
    proxy.stop().await;
}

#[tokio::test]
async fn referer_and_origin_policy() {
    let (_pki, fake, proxy, client) = setup().await;
    let path = "/svc/echo/x";
    let cases: &[(&[(&str, &str)], u16)] = &[
        (&[("referer", "https://app.example.com/page")], 200),
        (&[("origin", "https://app.example.com")], 200),
        (&[("referer", "https://deep.sub.example.org/")], 200),
        (&[("referer", "https://example.org/")], 200),
        (&[("referer", "http://localhost:5173/")], 200),
        (&[], 403),
        (&[("referer", "https://evil.com/")], 403),
        (&[("referer", "https://app.example.com.evil.com/")], 403),
        (&[("referer", "https://evilexample.org/")], 403),
        (&[("referer", "https://app.example.com@evil.com/")], 403),
        (&[("referer", "http://app.example.com/")], 403),
        (&[("referer", "https://app.example.com./")], 403),
        (&[("origin", "null")], 403),
        // Both present: both must match.
        (
            &[
                ("referer", "https://app.example.com/"),
                ("origin", "https://evil.com"),
            ],
            403,
        ),
        (
            &[
                ("referer", "https://evil.com/"),
                ("origin", "https://app.example.com"),
            ],
            403,
        ),
    ];
    for (headers, status) in cases {
        let before = fake.requests().len();
        let a = client.get_with(path, headers).await;
        if *status == 200 {
            assert_eq!(a.status, 200, "{headers:?}: {}", a.text());
            assert_eq!(fake.requests().len(), before + 1);
        } else {
            a.assert_error(*status);
            assert_eq!(a.json()["error"]["message"], "Referer not allowed.");
            assert_eq!(
                fake.requests().len(),
                before,
                "{headers:?} reached upstream"
            );
        }
    }
    proxy.stop().await;
}

#[tokio::test]
async fn cors_headers_and_preflight() {
    let (_pki, fake, proxy, client) = setup().await;
    let a = client
        .get_with("/svc/echo/x", &[("origin", "https://a.example.org")])
        .await;
    assert_eq!(a.status, 200);
    assert_eq!(
        a.headers["access-control-allow-origin"],
        "https://a.example.org"
    );
    assert!(a.headers.get_all("vary").iter().any(|v| v == "Origin"));
    // The upstream's own `*` never reaches the client.
    assert_eq!(
        a.headers
            .get_all("access-control-allow-origin")
            .iter()
            .count(),
        1
    );

    let before = fake.requests().len();
    let pre = client
        .send(
            client
                .req("OPTIONS", "/svc/echo/x")
                .header("origin", "https://a.example.org")
                .header("access-control-request-method", "POST")
                .header(
                    "access-control-request-headers",
                    "content-type, x-requested-with",
                )
                .body(full(""))
                .unwrap(),
        )
        .await;
    assert_eq!(pre.status, 204);
    assert_eq!(
        pre.headers["access-control-allow-origin"],
        "https://a.example.org"
    );
    assert!(
        pre.headers["access-control-allow-methods"]
            .to_str()
            .unwrap()
            .contains("POST")
    );
    assert_eq!(
        pre.headers["access-control-allow-headers"],
        "content-type, x-requested-with"
    );
    let bad = client
        .send(
            client
                .req("OPTIONS", "/svc/echo/x")
                .header("origin", "https://evil.com")
                .header("access-control-request-method", "GET")
                .body(full(""))
                .unwrap(),
        )
        .await;
    bad.assert_error(403);
    assert!(bad.headers.get("access-control-allow-origin").is_none());
    assert_eq!(
        fake.requests().len(),
        before,
        "preflight must not be forwarded"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn hostile_mounted_paths_never_escape() {
    let (pki, fake, proxy, client) = setup().await;
    // (path, expected status). Whatever is refused must not reach upstream;
    // whatever is served must stay under /svc upstream.
    let cases: &[(&str, u16)] = &[
        ("/svc/../open/echo", 200), // normalised first: /open/echo is a route of its own
        ("/svc/echo/../../sharing/rest/oauth2/token", 404),
        ("/svc/%2e%2e/%2e%2e/sharing/rest/oauth2/token", 404),
        ("/svc/echo/%2e%2e/echo/x", 200),
        ("/svc/echo%2f..%2f..%2fsharing", 400),
        ("/svc/echo%2F..", 400),
        ("/svc/echo%5c..%5csharing", 400),
        ("/svc/echo/%00", 400),
        ("/svc/echo/%252e%252e/x", 200),
        ("/nowhere", 404),
        ("/svcx/echo", 404),
    ];
    for (path, status) in cases {
        let before = fake.requests().len();
        let a = client.get(path).await;
        assert_eq!(a.status.as_u16(), *status, "{path}: {}", a.text());
        if *status == 200 {
            let rec = fake.last();
            assert!(
                rec.uri.starts_with("/svc/") || rec.uri.starts_with("/open/"),
                "{path} reached {}",
                rec.uri
            );
            assert!(!rec.uri.contains(".."), "{path} reached {}", rec.uri);
        } else {
            a.assert_error(*status);
            assert_eq!(fake.requests().len(), before, "{path} reached upstream");
        }
    }
    assert_eq!(fake.token_count(), 1, "only the warm-up token request");

    // Raw bytes hyper's client would normalise: a literal backslash and dot
    // segments the client leaves alone.
    for raw in [
        "GET /svc/echo\\..\\..\\sharing HTTP/1.1\r\nHost: localhost\r\nReferer: https://app.example.com/\r\nConnection: close\r\n\r\n",
        "GET /svc/echo/../../sharing/rest/oauth2/token HTTP/1.1\r\nHost: localhost\r\nReferer: https://app.example.com/\r\nConnection: close\r\n\r\n",
    ] {
        let before = fake.requests().len();
        let out = raw_tls(
            &pki,
            proxy.addr,
            raw.as_bytes(),
            std::time::Duration::from_secs(5),
        )
        .await;
        let status = raw_status(&out).unwrap_or(0);
        assert!(matches!(status, 400 | 404), "{raw:?} → {out}");
        assert_eq!(fake.requests().len(), before);
    }
    proxy.stop().await;
}

#[tokio::test]
async fn hostile_proxy_form_targets_never_escape() {
    let (_pki, fake, proxy, client) = setup().await;
    let base = fake.url();
    let port = fake.addr.port();
    let cases: Vec<(String, u16)> = vec![
        (format!("/proxy?{base}/svc/echo/a"), 200),
        (format!("/proxy?{base}/svc/echo/../echo/b"), 200),
        (
            format!("/proxy?{base}/svc/../sharing/rest/oauth2/token"),
            403,
        ),
        (
            format!("/proxy?{base}/svc/%2e%2e/sharing/rest/oauth2/token"),
            403,
        ),
        (format!("/proxy?{base}/svc/.%2E/.%2e/sharing"), 403),
        (format!("/proxy?{base}/svc%2f..%2fsharing"), 400),
        (format!("/proxy?{base}/svc/echo%5C..%5C..%5Csharing"), 400),
        (format!("/proxy?{base}/svcx/echo"), 403),
        (format!("/proxy?{base}/sharing/rest/oauth2/token"), 403),
        (
            format!("/proxy?http://user:pw@127.0.0.1:{port}/svc/echo"),
            400,
        ),
        (
            format!("/proxy?http://127.0.0.1:{port}@evil.example/svc/echo"),
            400,
        ),
        (format!("/proxy?https://127.0.0.1:{port}/svc/echo"), 403),
        (
            format!("/proxy?http://127.0.0.1:{}/svc/echo", port + 1),
            403,
        ),
        (format!("/proxy?http://localhost:{port}/svc/echo"), 403),
        ("/proxy?http://2130706433/svc/echo".to_string(), 403),
        ("/proxy?http://0x7f.1/svc/echo".to_string(), 403),
        ("/proxy?http://[::1]/svc/echo".to_string(), 403),
        (format!("/proxy?ftp://127.0.0.1:{port}/svc/echo"), 403),
        (format!("/proxy?//127.0.0.1:{port}/svc/echo"), 400),
        ("/proxy?not%20a%20url".to_string(), 400),
        ("/proxy?".to_string(), 400),
        ("/proxy".to_string(), 400),
        (format!("/proxy?{base}/svc/echo/%00"), 400),
    ];
    for (path, status) in &cases {
        let before = fake.requests().len();
        let a = client.get(path).await;
        assert_eq!(a.status.as_u16(), *status, "{path}: {}", a.text());
        if *status == 200 {
            let rec = fake.last();
            assert!(
                rec.uri.starts_with("/svc/echo/"),
                "{path} reached {}",
                rec.uri
            );
        } else {
            a.assert_error(*status);
            if *status == 403 {
                assert_eq!(
                    a.json()["error"]["message"],
                    "Proxy has not been set up for this URL."
                );
            }
            assert_eq!(fake.requests().len(), before, "{path} reached upstream");
        }
    }
    proxy.stop().await;
}

#[tokio::test]
async fn odd_methods_are_refused() {
    let (_pki, fake, proxy, client) = setup().await;
    for m in ["PUT", "DELETE", "PATCH", "TRACE", "PROPFIND"] {
        let before = fake.requests().len();
        let a = client
            .send(
                client
                    .req(m, "/svc/echo/x")
                    .header("referer", "https://app.example.com/")
                    .body(full(""))
                    .unwrap(),
            )
            .await;
        a.assert_error(405);
        assert_eq!(fake.requests().len(), before, "{m} reached upstream");
    }
    proxy.stop().await;
}
