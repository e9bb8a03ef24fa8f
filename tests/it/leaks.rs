//! Token confidentiality end to end: upstreams that echo the token in every
//! way ArcGIS does (style JSON, error messages, HTML, headers, redirects;
//! plain, gzip, deflate, br; tiny chunks) — and a client that must never see
//! it. Also the JSON-body 498/499 retry, compressed or not.

use crate::support::*;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncWriteExt;

async fn setup(extra_route_opts: &str) -> (Pki, std::sync::Arc<FakeArcGis>, TestProxy, TestClient) {
    let pki = Pki::new();
    let fake = FakeArcGis::start().await;
    let mut toml = standard_config(&fake, "");
    if !extra_route_opts.is_empty() {
        toml = toml.replacen(
            "credential = \"online\"\nmount = \"/svc\"",
            &format!("credential = \"online\"\nmount = \"/svc\"\n{extra_route_opts}"),
            1,
        );
    }
    let proxy = TestProxy::start(&pki, &toml).await;
    let client = TestClient::new(&pki, proxy.addr);
    (pki, fake, proxy, client)
}

/// Asserts that no token the fake ever issued appears in the answer, raw or
/// decoded, in headers or body.
fn assert_no_token(fake: &FakeArcGis, a: &Answer) -> String {
    let decoded = decode(&a.headers, &a.body);
    let text = String::from_utf8_lossy(&decoded).into_owned();
    let issued = fake.issued();
    assert!(!issued.is_empty());
    for t in &issued {
        let encoded = encoded(t);
        assert_ne!(&encoded, t, "the test token should need encoding");
        for hay in [&text, &String::from_utf8_lossy(&a.body).into_owned()] {
            assert!(!hay.contains(t.as_str()), "token in body: {hay}");
            assert!(!hay.contains(&encoded), "encoded token in body: {hay}");
        }
        for (name, v) in &a.headers {
            let v = String::from_utf8_lossy(v.as_bytes());
            assert!(!v.contains(t.as_str()), "token in header {name}: {v}");
        }
    }
    text
}

async fn get_enc(client: &TestClient, path: &str, accept: &str) -> Answer {
    client
        .get_with(
            path,
            &[
                ("referer", "https://app.example.com/"),
                ("accept-encoding", accept),
            ],
        )
        .await
}

#[tokio::test]
async fn style_json_is_scrubbed_in_every_coding() {
    let (_pki, fake, proxy, client) = setup("").await;
    for enc in ["", "gzip", "deflate", "br"] {
        let path = if enc.is_empty() {
            "/svc/leak/style".to_string()
        } else {
            format!("/svc/leak/style?enc={enc}")
        };
        let a = get_enc(&client, &path, "gzip, deflate, br").await;
        assert_eq!(a.status, 200);
        if !enc.is_empty() {
            assert_eq!(
                a.headers["content-encoding"], enc,
                "client lost compression"
            );
        }
        let text = assert_no_token(&fake, &a);
        let j: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{enc}: {e}: {text}"));
        // Without rewrite_urls the URLs stay upstream URLs, minus the token.
        assert_eq!(j["sprite"], format!("{}/svc/styles/x/sprite", fake.url()));
        assert_eq!(
            j["sources"]["esri"]["tiles"][0],
            format!("{}/svc/tiles/{{z}}/{{y}}/{{x}}.pbf?x=1", fake.url())
        );
        assert_eq!(j["elsewhere"], "https://elsewhere.example/a");
    }
    proxy.stop().await;
}

#[tokio::test]
async fn rewrite_urls_points_style_urls_at_the_proxy() {
    let (_pki, fake, proxy, client) = setup("rewrite_urls = true").await;
    for enc in ["", "gzip", "br"] {
        let a = get_enc(&client, &format!("/svc/leak/style?enc={enc}"), "gzip, br").await;
        let text = assert_no_token(&fake, &a);
        let j: serde_json::Value = serde_json::from_str(&text).unwrap();
        let base = &client.base;
        assert_eq!(j["sprite"], format!("{base}/svc/styles/x/sprite"));
        assert_eq!(
            j["glyphs"],
            format!("{base}/svc/fonts/{{fontstack}}/{{range}}.pbf")
        );
        assert_eq!(
            j["sources"]["esri"]["tiles"][0],
            format!("{base}/svc/tiles/{{z}}/{{y}}/{{x}}.pbf?x=1")
        );
        // /open is its own mounted route.
        assert_eq!(j["next"], format!("{base}/open/page"));
        assert_eq!(j["elsewhere"], "https://elsewhere.example/a");
    }
    // The rewritten glyph URL works through the proxy (the template expanded).
    let a = client.get("/svc/echo/fonts/Arial/0-255.pbf").await;
    assert_eq!(a.status, 200);
    assert_eq!(fake.last().uri, "/svc/echo/fonts/Arial/0-255.pbf");
    proxy.stop().await;
}

#[tokio::test]
async fn error_messages_html_and_tiny_chunks_are_scrubbed() {
    let (_pki, fake, proxy, client) = setup("").await;
    let a = client.get("/svc/leak/error?f=json").await;
    let text = assert_no_token(&fake, &a);
    assert!(text.contains("Unable to complete operation"), "{text}");
    // The error arrives as ArcGIS sent it (a 400 in a 200), not as 502.
    assert_eq!(a.status, 200);

    let a = client.get("/q/leak/error?f=json").await;
    assert_no_token(&fake, &a);

    let a = client.get("/svc/leak/chunks").await;
    let text = assert_no_token(&fake, &a);
    assert!(text.starts_with("<html><a href=\""), "{text}");
    assert!(text.ends_with("</html>"));
    assert!(text.contains(&format!("{}/svc/a\"", fake.url())), "{text}");
    proxy.stop().await;
}

#[tokio::test]
async fn headers_and_redirects_are_scrubbed() {
    let (_pki, fake, proxy, client) = setup("").await;
    let a = client.get("/svc/leak/headers").await;
    assert_no_token(&fake, &a);
    assert_eq!(
        a.headers["link"],
        format!("<{}/svc/page2?f=json>; rel=\"next\"", fake.url()).as_str()
    );
    assert_eq!(
        a.headers["content-location"],
        format!("{}/svc/leak/headers", client.base).as_str()
    );
    let a = client.get("/q/redirect").await;
    assert_eq!(a.status, 302);
    assert_no_token(&fake, &a);
    proxy.stop().await;
}

#[tokio::test]
async fn binary_types_pass_unscanned_by_rule() {
    // Deliberate, tested rule: image/* is not scanned (it cannot carry a URL
    // in text). The fake puts the token into a "PNG" to prove the rule is
    // what lets it through.
    let (_pki, fake, proxy, client) = setup("").await;
    let a = client.get("/svc/leak/image").await;
    assert_eq!(a.status, 200);
    assert!(a.text().contains(&fake.issued()[0]));
    proxy.stop().await;
}

#[tokio::test]
async fn unknown_codings_are_not_requested_and_fail_closed() {
    let (_pki, fake, proxy, client) = setup("").await;
    let a = get_enc(&client, "/svc/echo/x", "zstd, gzip;q=0.5, compress").await;
    assert_eq!(a.status, 200);
    assert_eq!(fake.last().headers["accept-encoding"], "gzip;q=0.5");
    // An upstream that answers in a coding the proxy cannot read anyway.
    let a = get_enc(&client, "/svc/leak/style?enc=zstd", "gzip").await;
    a.assert_error(502);
    // A route without a token to protect passes it through.
    let a = get_enc(&client, "/open/x?enc=zstd", "zstd").await;
    assert_eq!(a.status, 200);
    assert_eq!(a.headers["content-encoding"], "zstd");
    proxy.stop().await;
}

#[tokio::test]
async fn json_498_in_http_200_is_retried_also_compressed() {
    let (_pki, fake, proxy, client) = setup("").await;
    assert_eq!(client.get("/svc/json498").await.status, 200);
    for (i, enc) in ["", "gzip", "deflate", "br"].iter().enumerate() {
        fake.revoke_all();
        let before = fake.requests().len();
        let a = get_enc(
            &client,
            &format!("/svc/json498?enc={enc}"),
            "gzip, deflate, br",
        )
        .await;
        assert_eq!(a.status, 200, "{enc}");
        let body = decode(&a.headers, &a.body);
        assert_eq!(body, br#"{"ok":true}"#, "{enc}");
        assert_eq!(
            fake.token_count(),
            i + 2,
            "{enc}: one new token per revocation"
        );
        assert_eq!(
            fake.requests().len(),
            before + 2,
            "{enc}: two upstream attempts"
        );
    }
    // ArcGIS's 499 "Token Required" in a 200 counts too.
    fake.revoke_all();
    let a = client.get("/svc/features").await;
    assert_eq!(a.status, 200);
    assert_eq!(a.json()["features"].as_array().unwrap().len(), 2);
    proxy.stop().await;
}

#[tokio::test]
async fn large_answers_are_not_held_back_by_the_json_check() {
    let (_pki, fake, proxy, client) = setup("").await;
    // 16 MiB chunked octet-stream: streamed (the check reads at most its
    // first 16 KiB), scanned, and complete.
    let a = client.get("/svc/big").await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body.len(), 16 * 1024 * 1024);
    assert_eq!(fake.token_count(), 1);
    proxy.stop().await;
}

#[tokio::test]
async fn large_compressed_answers_go_on_as_the_upstream_compressed_them() {
    let (pki, fake, proxy, h1) = setup("").await;
    let h2 = TestClient::h2(&pki, proxy.addr);
    for (client, enc) in [
        (&h1, "gzip"),
        (&h1, "deflate"),
        (&h1, "br"),
        (&h2, "gzip"),
        (&h2, "br"),
    ] {
        // Clean: the upstream's own bytes, not the proxy's re-encoding.
        let a = get_enc(
            client,
            &format!("/svc/large?enc={enc}"),
            "gzip, deflate, br",
        )
        .await;
        assert_eq!(a.status, 200);
        assert_eq!(a.headers["content-encoding"], enc);
        assert!(a.body.len() > 16 * 1024, "{enc}: {} bytes", a.body.len());
        let plain = decode(&a.headers, &a.body);
        assert!(plain.len() > 390_000);
        let upstream = encode_body(enc, &plain);
        assert!(a.body == upstream, "{enc}: the answer was re-encoded");
        // With the token inside: scrubbed, still compressed.
        let a = get_enc(
            client,
            &format!("/svc/leak/large?enc={enc}"),
            "gzip, deflate, br",
        )
        .await;
        assert_eq!(a.status, 200);
        assert_eq!(a.headers["content-encoding"], enc);
        let text = assert_no_token(&fake, &a);
        assert!(text.contains(&format!(r#"{{"url":"{}/svc/a?f=json"}}"#, fake.url())));
        let j: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert!(j["features"].as_array().unwrap().len() > 2000);
    }
    proxy.stop().await;
}

/// An HTTP/1.1 upstream that answers every request chunked, with a trailer
/// field echoing the `X-Esri-Authorization` it received. Returns its address
/// and what it received.
async fn trailer_echo_upstream() -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let seen = Arc::clone(&seen2);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while let Some(head) = read_head(&mut s, &mut buf).await {
                    let auth = head
                        .lines()
                        .find_map(|l| {
                            let (n, v) = l.split_once(':')?;
                            n.eq_ignore_ascii_case("x-esri-authorization")
                                .then(|| v.trim().to_string())
                        })
                        .unwrap_or_default();
                    seen.lock().unwrap().push(auth.clone());
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\
                         Transfer-Encoding: chunked\r\nTrailer: X-Echo\r\n\r\n\
                         5\r\nhello\r\n0\r\nX-Echo: {auth}\r\n\r\n"
                    );
                    if s.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen)
}

/// Trailers are header fields sent after the body, out of reach of the
/// header scrubber: an upstream that echoes the token in one must not get
/// it to the client, over HTTP/1.1 (asking with `TE: trailers`) or HTTP/2
/// (where trailers always pass).
#[tokio::test]
async fn upstream_trailers_never_reach_the_client() {
    let pki = Pki::new();
    let fake = FakeArcGis::start().await;
    let (up, seen) = trailer_echo_upstream().await;
    let toml = standard_config(
        &fake,
        &format!(
            "[[routes]]\nname = \"trailers\"\nupstream = \"http://{up}/x\"\ncredential = \"online\"\nmount = \"/trailers\"\n"
        ),
    );
    let proxy = TestProxy::start(&pki, &toml).await;

    let out = raw_tls(
        &pki,
        proxy.addr,
        b"GET /trailers/y HTTP/1.1\r\nHost: localhost\r\nReferer: https://app.example.com/\r\n\
          TE: trailers\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(raw_status(&out), Some(200), "{out}");
    assert!(out.contains("hello"), "{out}");

    let a = TestClient::h2(&pki, proxy.addr).get("/trailers/y").await;
    assert_eq!((a.status.as_u16(), a.version), (200, http::Version::HTTP_2));
    assert_eq!(&a.body[..], b"hello");

    // The upstream did get the token, so its trailers carried it.
    let issued = fake.issued();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "{seen:?}");
    for s in &seen {
        assert!(issued.iter().any(|t| s == &format!("Bearer {t}")), "{s}");
    }
    for t in &issued {
        assert!(
            !out.contains(t.as_str()),
            "token reached an HTTP/1.1 client: {out}"
        );
    }
    assert!(!out.to_ascii_lowercase().contains("x-echo:"), "{out}");
    assert!(
        a.trailers.is_none(),
        "trailers reached an HTTP/2 client: {:?}",
        a.trailers
    );
    proxy.stop().await;
}

/// A refused token inside a JSONP answer (`callback=cb` →
/// `cb({"error":{"code":498}})`) is retried like a JSON one, and the token
/// the service echoes inside the callback is scrubbed.
#[tokio::test]
async fn jsonp_498_is_retried_and_jsonp_bodies_are_scrubbed() {
    let pki = Pki::new();
    let fake = FakeArcGis::start().await;
    let proxy = TestProxy::start(&pki, &standard_config(&fake, "")).await;
    let client = TestClient::new(&pki, proxy.addr);
    assert_eq!(client.get("/svc/features").await.status, 200);
    fake.revoke_all();
    let before = fake.token_count();
    let a = client.get("/svc/jsonp?f=json&callback=dojo_cb").await;
    assert_eq!(a.status, 200);
    let text = a.text();
    assert!(text.starts_with("dojo_cb("), "{text}");
    assert!(text.contains("\"ok\":true"), "not retried: {text}");
    assert_eq!(fake.token_count(), before + 1, "one new token");
    for t in fake.issued() {
        assert!(!text.contains(&t), "token in a JSONP body: {text}");
    }
    proxy.stop().await;
}
