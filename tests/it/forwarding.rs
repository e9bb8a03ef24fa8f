//! Forwarding: header hygiene both ways, redirects, streaming, body limits,
//! timeouts, upstream TLS verification, Basemap Styles `echoToken=false`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;

use crate::support::*;

async fn setup_with(extra: &str) -> (Pki, std::sync::Arc<FakeArcGis>, TestProxy, TestClient) {
    let pki = Pki::new();
    let fake = FakeArcGis::start().await;
    let proxy = TestProxy::start(&pki, &standard_config(&fake, extra)).await;
    let client = TestClient::new(&pki, proxy.addr);
    (pki, fake, proxy, client)
}

#[tokio::test]
async fn request_and_response_header_hygiene() {
    let (_pki, fake, proxy, client) = setup_with("").await;
    let a = client
        .get_with(
            "/svc/echo/x?f=json&token=CLIENT-TOKEN&Token=T2&%74oken=T3",
            &[
                ("referer", "https://app.example.com/page?secret=1"),
                ("cookie", "session=browser"),
                ("authorization", "Bearer client-supplied"),
                ("x-esri-authorization", "Bearer client-supplied"),
                ("proxy-authorization", "Basic Zm9vOmJhcg=="),
                ("proxy-connection", "keep-alive"),
                ("forwarded", "for=6.6.6.6"),
                ("x-forwarded-for", "6.6.6.6"),
                ("x-forwarded-host", "evil.example"),
                ("x-real-ip", "6.6.6.6"),
                ("connection", "x-secret-hop"),
                ("x-secret-hop", "1"),
                ("accept", "application/json"),
                ("accept-language", "de"),
            ],
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.text());
    let rec = fake.last();
    for gone in [
        "cookie",
        "authorization",
        "proxy-authorization",
        "proxy-connection",
        "forwarded",
        "x-forwarded-for",
        "x-forwarded-host",
        "x-real-ip",
        "x-secret-hop",
    ] {
        assert!(rec.headers.get(gone).is_none(), "{gone} reached upstream");
    }
    assert_eq!(
        rec.headers["x-esri-authorization"],
        format!("Bearer {}", fake.issued()[0]).as_str()
    );
    assert_eq!(
        rec.headers.get_all("x-esri-authorization").iter().count(),
        1
    );
    assert_eq!(rec.headers["accept-language"], "de");
    assert_eq!(
        rec.headers["referer"],
        "https://app.example.com/page?secret=1"
    );
    assert_eq!(rec.headers["host"], fake.addr.to_string().as_str());
    assert_eq!(a.json()["query"], "f=json");

    // Response side.
    assert!(a.headers.get("set-cookie").is_none());
    assert!(a.headers.get("x-hop-by-hop").is_none());
    assert!(a.headers.get("proxy-authenticate").is_none());
    assert!(a.headers.get("proxy-connection").is_none());
    assert!(a.headers.get("access-control-allow-origin").is_none());
    assert_eq!(a.headers["x-upstream"], "yes");
    proxy.stop().await;
}

#[tokio::test]
async fn upstream_referer_replaces_the_clients() {
    let pki = Pki::new();
    let fake = FakeArcGis::start().await;
    let toml = standard_config(&fake, "").replace(
        "client_secret_env = \"SECRET\"",
        "client_secret_env = \"SECRET\"\nupstream_referer = \"https://registered.example.com/\"",
    );
    let proxy = TestProxy::start(&pki, &toml).await;
    let client = TestClient::new(&pki, proxy.addr);
    let a = client
        .get_with("/svc/echo/x", &[("origin", "https://app.example.com")])
        .await;
    assert_eq!(a.status, 200);
    let rec = fake.last();
    assert_eq!(rec.headers["referer"], "https://registered.example.com/");
    assert!(rec.headers.get("origin").is_none());
    proxy.stop().await;
}

#[tokio::test]
async fn redirects_pass_through_rewritten_and_without_token() {
    let (_pki, fake, proxy, client) = setup_with("").await;
    // Under a mounted route → mounted proxy URL.
    let a = client.get("/svc/redirect").await;
    assert_eq!(a.status, 302);
    let loc = a.headers["location"].to_str().unwrap();
    assert_eq!(loc, format!("{}/svc/echo/next?f=json", client.base));
    let token = &fake.issued()[0];
    for v in a.headers.values() {
        assert!(!v.to_str().unwrap_or("").contains(token.as_str()), "{v:?}");
    }
    assert_eq!(a.headers["x-debug"].to_str().unwrap().trim(), "issued to");
    assert_eq!(fake.requests().len(), 1, "redirect must not be followed");

    // Off-route redirect: left absolute, minus the token.
    let a = client
        .get("/svc/redirect?to=https://elsewhere.example/x")
        .await;
    assert_eq!(a.status, 302);
    assert_eq!(a.headers["location"], "https://elsewhere.example/x?f=json");

    // Through the proxy form, an unmounted route's URL becomes proxy?<url>.
    let a = client
        .get(&format!(
            "/proxy?{}/svc/redirect?to={}/open/page",
            fake.url(),
            fake.url()
        ))
        .await;
    assert_eq!(a.status, 302);
    assert_eq!(
        a.headers["location"],
        format!("{}/open/page?f=json", client.base).as_str()
    );
    proxy.stop().await;
}

#[tokio::test]
async fn public_url_is_used_for_rewritten_urls() {
    let pki = Pki::new();
    let fake = FakeArcGis::start().await;
    let toml = standard_config(&fake, "").replace(
        "admin_listen = \"127.0.0.1:0\"",
        "admin_listen = \"127.0.0.1:0\"\npublic_url = \"https://maps.example.com/\"",
    );
    let proxy = TestProxy::start(&pki, &toml).await;
    let client = TestClient::new(&pki, proxy.addr);
    let a = client.get("/svc/redirect").await;
    assert_eq!(
        a.headers["location"],
        "https://maps.example.com/svc/echo/next?f=json"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn large_responses_stream() {
    let (_pki, _fake, proxy, client) = setup_with("").await;
    let a = client.get("/svc/big").await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body.len(), 16 * 1024 * 1024);
    assert!(a.body.iter().all(|b| *b == b'x'));
    proxy.stop().await;
}

/// A chunked (no Content-Length) body of `count` chunks of `size` bytes.
fn chunked(count: usize, size: usize, byte: u8) -> TestBody {
    let chunks: Vec<Result<Frame<Bytes>, Box<dyn std::error::Error + Send + Sync>>> = (0..count)
        .map(|_| Ok(Frame::data(Bytes::from(vec![byte; size]))))
        .collect();
    StreamBody::new(futures_util::stream::iter(chunks)).boxed()
}

/// POSTs `body` with an allowed Referer.
async fn post(client: &TestClient, path: &str, content_type: &str, body: TestBody) -> Answer {
    client
        .send(
            client
                .req("POST", path)
                .header("referer", "https://app.example.com/")
                .header("content-type", content_type)
                .body(body)
                .unwrap(),
        )
        .await
}

#[tokio::test]
async fn request_bodies_stream_and_limits_hold() {
    let (_pki, fake, proxy, client) = setup_with("").await;
    const OCTETS: &str = "application/octet-stream";
    // 900 KiB, chunked (no Content-Length): streams through, not kept.
    let a = post(
        &client,
        "/svc/upload-stream",
        OCTETS,
        chunked(90, 10 * 1024, b'a'),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.json()["received"], (90 * 10 * 1024).to_string());

    // Announced too large: refused before reading, upstream never sees it.
    let before = fake.requests().len();
    let a = post(
        &client,
        "/svc/upload-stream",
        OCTETS,
        full(vec![b'b'; 2 * 1024 * 1024]),
    )
    .await;
    a.assert_error(413);
    assert_eq!(fake.requests().len(), before);

    // Chunked and too large: discovered while streaming → 413.
    let a = post(
        &client,
        "/svc/upload-stream",
        OCTETS,
        chunked(40, 64 * 1024, b'c'),
    )
    .await;
    a.assert_error(413);

    // A form body over the limit is refused too.
    let form = "application/x-www-form-urlencoded";
    let a = post(
        &client,
        "/svc/echo/form",
        form,
        chunked(40, 64 * 1024, b'd'),
    )
    .await;
    a.assert_error(413);
    proxy.stop().await;
}

#[tokio::test]
async fn upstream_timeout_is_504_and_unreachable_is_502() {
    let (pki, _fake, proxy, client) = setup_with("").await;
    let started = Instant::now();
    let a = client.get("/svc/slow").await;
    a.assert_error(504);
    assert!(started.elapsed() < Duration::from_secs(5));
    proxy.stop().await;

    // An upstream nobody listens on.
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let fake = FakeArcGis::start().await;
    let toml = standard_config(
        &fake,
        &format!(
            "[[routes]]\nname = \"dead\"\nupstream = \"http://{dead_addr}/x\"\nmount = \"/dead\"\n"
        ),
    );
    let proxy = TestProxy::start(&pki, &toml).await;
    let client = TestClient::new(&pki, proxy.addr);
    let a = client.get("/dead/y").await;
    a.assert_error(502);
    proxy.stop().await;
}

#[tokio::test]
async fn upstream_tls_is_verified() {
    let pki = Pki::new();
    let trusted = FakeArcGis::start_tls(pki.server_config(&[b"h2", b"http/1.1"])).await;
    let other_pki = Pki::new();
    let untrusted = FakeArcGis::start_tls(other_pki.server_config(&[b"http/1.1"])).await;
    let toml = standard_config(&trusted, &format!(
        "[[routes]]\nname = \"untrusted\"\nupstream = \"https://localhost:{}/open\"\nmount = \"/untrusted\"\n",
        untrusted.addr.port()
    ))
    .replace(&trusted.url(), &format!("https://localhost:{}", trusted.addr.port()));
    let proxy = TestProxy::start(&pki, &toml).await;
    let client = TestClient::new(&pki, proxy.addr);
    // The trusted upstream (CA from extra_ca), token endpoint included.
    let a = client.get("/svc/echo/tls").await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.json()["token_ok"], true);
    // A certificate from an unknown CA is refused, never ignored.
    let a = client.get("/untrusted/echo").await;
    a.assert_error(502);
    assert!(untrusted.requests().is_empty());
    proxy.stop().await;
}

#[tokio::test]
async fn basemap_styles_get_echo_token_false() {
    let pki = Pki::new();
    let fake = FakeArcGis::start().await;
    let toml = standard_config(
        &fake,
        &format!(
            "[[routes]]\nupstream = \"{}/svc/echo/arcgis/rest/services/styles/v2\"\ncredential = \"online\"\nmount = \"/basemaps\"\n",
            fake.url()
        ),
    );
    let proxy = TestProxy::start(&pki, &toml).await;
    let client = TestClient::new(&pki, proxy.addr);
    let a = client
        .get("/basemaps/styles/arcgis/navigation?echoToken=true&language=de")
        .await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.json()["query"], "language=de&echoToken=false");
    let a = client.get("/basemaps/styles/arcgis/navigation").await;
    assert_eq!(a.json()["query"], "echoToken=false");
    // Other routes are left alone.
    let a = client.get("/svc/echo/x?echoToken=true").await;
    assert_eq!(a.json()["query"], "echoToken=true");
    proxy.stop().await;
}

/// The decision follows the request's upstream path, not the route's: a
/// broad route over a whole services tree and a host-only route reached
/// through `/proxy?<url>` send `echoToken=false` on styles requests, and
/// nothing extra on other paths.
#[tokio::test]
async fn basemap_styles_get_echo_token_false_through_any_route() {
    let pki = Pki::new();
    let fake = FakeArcGis::start().await;
    // A second upstream host, reached only through a host-only route.
    let other = FakeArcGis::start().await;
    let toml = standard_config(
        &fake,
        &format!(
            "[[routes]]\nname = \"host-only\"\nupstream = \"{}/\"\ncredential = \"online\"\n",
            other.url()
        ),
    );
    let proxy = TestProxy::start(&pki, &toml).await;
    let client = TestClient::new(&pki, proxy.addr);
    // Broad mounted route: `/svc` covers `{fake}/svc/...`.
    let a = client
        .get("/svc/echo/arcgis/rest/services/styles/v2/styles/arcgis/navigation?echoToken=true&f=json")
        .await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.json()["query"], "f=json&echoToken=false");
    let a = client
        .get("/svc/echo/arcgis/rest/services/World/FeatureServer/0?f=json")
        .await;
    assert_eq!(a.json()["query"], "f=json");
    // Host-only route through the `/proxy?` form.
    let styles = format!(
        "/proxy?{}/svc/echo/arcgis/rest/services/styles/v2/styles/arcgis/navigation?language=de",
        other.url()
    );
    let a = client.get(&styles).await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.json()["query"], "language=de&echoToken=false");
    let a = client
        .get(&format!(
            "/proxy?{}/svc/echo/arcgis/rest/services/x?echoToken=true",
            other.url()
        ))
        .await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.json()["query"], "echoToken=true");
    // The host-only route's token went along, by header.
    assert_eq!(a.json()["headers"]["x-esri-authorization"], "<present>");
    assert_eq!(other.requests().len(), 2);
    proxy.stop().await;
}

#[tokio::test]
async fn routes_without_credential_get_no_token() {
    let (_pki, fake, proxy, client) = setup_with("").await;
    let a = client.get("/open/thing?token=CLIENT&f=json").await;
    assert_eq!(a.status, 200);
    let rec = fake.last();
    assert!(rec.headers.get("x-esri-authorization").is_none());
    assert_eq!(rec.uri, "/open/thing?f=json");
    proxy.stop().await;
}

#[tokio::test]
async fn upstream_connections_are_reused() {
    let (_pki, fake, proxy, client) = setup_with("").await;
    for _ in 0..20 {
        let a = client.get("/svc/features/0/query?f=json").await;
        assert_eq!(a.status, 200, "{}", a.text());
    }
    // One pooled connection for the requests, plus the token fetch's.
    let conns = fake.connection_count();
    assert!(conns <= 2, "{conns} upstream connections for 20 requests");
    proxy.stop().await;
}

/// A bare HTTP/1.1 upstream answering each request with `{"conn":N}`, N
/// the number of the connection it came on (from 0). The first `hold`
/// requests are answered only once all of them have arrived, so the proxy
/// has to open that many connections.
async fn naming_upstream(hold: usize) -> std::net::SocketAddr {
    use tokio::io::AsyncWriteExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let barrier = Arc::new(tokio::sync::Barrier::new(hold));
    let seen = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    tokio::spawn(async move {
        for conn in 0.. {
            let (mut s, _) = listener.accept().await.unwrap();
            let (barrier, seen) = (Arc::clone(&barrier), Arc::clone(&seen));
            tokio::spawn(async move {
                let mut buf = Vec::new();
                while read_head(&mut s, &mut buf).await.is_some() {
                    if seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < hold {
                        barrier.wait().await;
                    }
                    let body = format!("{{\"conn\":{conn}}}");
                    let head = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
                        body.len()
                    );
                    if s.write_all((head + &body).as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn upstream_connections_are_taken_in_turn() {
    // docs/behaviour.md: idle upstream connections are reused in turn, so
    // requests spread over all of them (and the servers behind them).
    let upstream = naming_upstream(3).await;
    let route = format!(
        "[[routes]]\nname = \"spread\"\nupstream = \"http://{upstream}/svc\"\ncredential = \"online\"\nmount = \"/spread\"\n"
    );
    let (_pki, _fake, proxy, client) = setup_with(&route).await;
    let conn_of = |a: Answer| {
        assert_eq!(a.status, 200, "{}", a.text());
        a.json()["conn"].as_u64().unwrap()
    };
    // Three at once: three upstream connections.
    let (a, b, c) = tokio::join!(
        client.get("/spread/a?f=json"),
        client.get("/spread/b?f=json"),
        client.get("/spread/c?f=json"),
    );
    let mut first = [conn_of(a), conn_of(b), conn_of(c)];
    first.sort_unstable();
    assert_eq!(first, [0, 1, 2]);
    // Then one at a time: each connection in turn, the order repeating.
    let mut used = Vec::new();
    for i in 0..6 {
        used.push(conn_of(client.get(&format!("/spread/{i}?f=json")).await));
    }
    let mut round = used[..3].to_vec();
    round.sort_unstable();
    assert_eq!(round, [0, 1, 2], "used {used:?}");
    assert_eq!(used[..3], used[3..], "used {used:?}");
    proxy.stop().await;
}

#[tokio::test]
async fn upstream_closing_its_connections_is_not_an_error() {
    let (_pki, fake, proxy, client) = setup_with("").await;
    for _ in 0..20 {
        let a = client.get("/svc/close").await;
        assert_eq!(a.status, 200, "{}", a.text());
        assert_eq!(a.json()["closing"], true);
        assert!(a.headers.get("connection").is_none());
    }
    let conns = fake.connection_count();
    assert!(conns >= 20, "closed connections were reused: {conns}");
    proxy.stop().await;
}

/// A proxy in front of a fake ArcGIS over TLS offering `alpn` (the PKI is
/// returned to live as long as they do).
async fn tls_upstream(alpn: &[&[u8]]) -> (Pki, Arc<FakeArcGis>, TestProxy, TestClient) {
    let pki = Pki::new();
    let fake = FakeArcGis::start_tls(pki.server_config(alpn)).await;
    let toml = standard_config(&fake, "").replace(
        &fake.url(),
        &format!("https://localhost:{}", fake.addr.port()),
    );
    let proxy = TestProxy::start(&pki, &toml).await;
    let client = TestClient::new(&pki, proxy.addr);
    (pki, fake, proxy, client)
}

/// GETs with the token, a streamed (chunked) upload and a form body whose
/// client token is removed, all through `client` to `fake`.
async fn requests_and_bodies_pass(client: &TestClient, fake: &FakeArcGis) {
    for i in 0..10 {
        let a = client.get(&format!("/svc/echo/n{i}?f=json")).await;
        assert_eq!(a.status, 200, "{}", a.text());
        assert_eq!(a.json()["token_ok"], true);
    }
    let a = post(
        client,
        "/svc/upload-stream",
        "application/octet-stream",
        chunked(20, 8 * 1024, b'a'),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.json()["received"], (20 * 8 * 1024).to_string());
    let a = post(
        client,
        "/svc/echo/form",
        "application/x-www-form-urlencoded",
        full("f=json&token=CLIENT&where=1%3D1"),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text());
    let rec = fake.last();
    assert_eq!(rec.method, http::Method::POST);
    assert_eq!(String::from_utf8_lossy(&rec.body), "f=json&where=1%3D1");
}

#[tokio::test]
async fn an_http2_upstream_is_shared_by_requests_and_bodies() {
    // The upstream offers h2 first, so the pool talks HTTP/2 to it.
    let (_pki, fake, proxy, client) = tls_upstream(&[b"h2", b"http/1.1"]).await;
    requests_and_bodies_pass(&client, &fake).await;
    assert!(
        fake.last().headers.get("host").is_none(),
        "HTTP/2 carries :authority, not Host"
    );
    // The token fetch's connection and one shared HTTP/2 connection.
    let conns = fake.connection_count();
    assert!(conns <= 2, "{conns} upstream connections");
    proxy.stop().await;
}

#[tokio::test]
async fn an_https_http1_upstream_carries_requests_bodies_and_large_answers() {
    // Only HTTP/1.1 offered: the pool's own HTTP/1.1 exchange runs over TLS.
    let (_pki, fake, proxy, client) = tls_upstream(&[b"http/1.1"]).await;
    requests_and_bodies_pass(&client, &fake).await;
    assert_eq!(
        fake.last().headers["host"],
        format!("localhost:{}", fake.addr.port()).as_str()
    );
    // 16 MiB answer, chunked upstream, read through TLS in large pieces.
    let a = client.get("/svc/big").await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body.len(), 16 * 1024 * 1024);
    assert!(a.body.iter().all(|b| *b == b'x'));
    // The connection comes back after each answer: the token fetch's and a
    // pooled one (one per serving thread at most).
    for _ in 0..10 {
        assert_eq!(client.get("/svc/features/0/query?f=json").await.status, 200);
    }
    let conns = fake.connection_count();
    assert!(conns <= 3, "{conns} upstream connections");
    proxy.stop().await;
}
