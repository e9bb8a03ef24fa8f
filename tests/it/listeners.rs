//! Listeners: TLS versions and ALPN, the cleartext listener, head size and
//! read-time limits, the connection limit, admin endpoints, graceful shutdown.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::*;

async fn setup_with(extra_server: &str, limits: &str) -> (Pki, Arc<FakeArcGis>, TestProxy) {
    let pki = Pki::new();
    let fake = FakeArcGis::start().await;
    let mut toml = standard_config(&fake, "");
    if !extra_server.is_empty() {
        toml = set_key(&toml, "server", extra_server);
    }
    if !limits.is_empty() {
        toml = set_key(&toml, "limits", limits);
    }
    let proxy = TestProxy::start(&pki, &toml).await;
    (pki, fake, proxy)
}

async fn handshake(
    pki: &Pki,
    addr: std::net::SocketAddr,
    version: &'static rustls::SupportedProtocolVersion,
    alpn: &[&[u8]],
) -> (rustls::ProtocolVersion, Option<Vec<u8>>) {
    let tls = tls_connect(pki, addr, version, alpn)
        .await
        .expect("handshake");
    let (_, conn) = tls.get_ref();
    (
        conn.protocol_version().unwrap(),
        conn.alpn_protocol().map(|a| a.to_vec()),
    )
}

/// HTTP/2 answers that are ready in the same turn leave the proxy in one
/// write (`coalesce`); every stream still gets its own answer, whole, small
/// ones and 16 MiB ones alike, and a lone request after them is not held.
#[tokio::test]
async fn http2_answers_ready_together_each_arrive_whole() {
    let (pki, _fake, proxy) = setup_with("", "").await;
    let client = Arc::new(TestClient::h2(&pki, proxy.addr));
    let mut streams = tokio::task::JoinSet::new();
    for i in 0..200 {
        let client = Arc::clone(&client);
        streams.spawn(async move { (i, client.get(&format!("/svc/echo/s{i}")).await) });
    }
    for i in 0..3 {
        let client = Arc::clone(&client);
        streams.spawn(async move { (1000 + i, client.get("/svc/big").await) });
    }
    while let Some(done) = streams.join_next().await {
        let (i, a) = done.unwrap();
        assert_eq!(a.status, 200, "stream {i}");
        assert_eq!(a.version, http::Version::HTTP_2);
        if i >= 1000 {
            assert_eq!(a.body.len(), 16 * 1024 * 1024, "stream {i}");
            assert!(a.body.iter().all(|b| *b == b'x'), "stream {i}");
        } else {
            assert_eq!(a.json()["path"], format!("/svc/echo/s{i}"));
        }
    }
    let lone = tokio::time::timeout(Duration::from_secs(5), client.get("/svc/echo/lone"))
        .await
        .expect("a lone HTTP/2 answer was held back");
    assert_eq!(lone.json()["path"], "/svc/echo/lone");
    proxy.stop().await;
}

#[tokio::test]
async fn tls_versions_and_alpn() {
    let (pki, _fake, proxy) = setup_with("", "").await;
    let (v, alpn) = handshake(
        &pki,
        proxy.addr,
        &rustls::version::TLS13,
        &[b"h2", b"http/1.1"],
    )
    .await;
    assert_eq!(v, rustls::ProtocolVersion::TLSv1_3);
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
    let (v, alpn) = handshake(&pki, proxy.addr, &rustls::version::TLS12, &[b"http/1.1"]).await;
    assert_eq!(v, rustls::ProtocolVersion::TLSv1_2);
    assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));
    // No ALPN at all still works (HTTP/1.1).
    let (_, alpn) = handshake(&pki, proxy.addr, &rustls::version::TLS13, &[]).await;
    assert_eq!(alpn, None);

    let h2 = TestClient::h2(&pki, proxy.addr);
    let a = h2.get("/svc/echo/h2").await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.version, http::Version::HTTP_2);
    let h1 = TestClient::new(&pki, proxy.addr);
    let a = h1.get("/svc/echo/h1").await;
    assert_eq!(a.version, http::Version::HTTP_11);
    assert_eq!(a.status, 200);

    // Plain TCP bytes on the TLS port are not served.
    let mut tcp = TcpStream::connect(proxy.addr).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut buf)).await;
    assert!(!String::from_utf8_lossy(&buf).contains("HTTP/1.1 200"));
    proxy.stop().await;
}

/// One visit: handshake, a request, the answer read to the end (which is
/// also when the client takes in the session tickets sent after the
/// handshake). Returns whether the handshake was full or resumed.
async fn visit(
    cfg: &Arc<rustls::ClientConfig>,
    addr: std::net::SocketAddr,
) -> rustls::HandshakeKind {
    let mut tls = tls_connect_with(cfg, addr).await.expect("handshake");
    let kind = tls.get_ref().1.handshake_kind().unwrap();
    tls.write_all(b"GET /svc/echo/x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let (_, text) = read_until_closed(&mut tls, Duration::from_secs(10)).await;
    assert!(text.starts_with("HTTP/1.1 "), "no answer");
    kind
}

#[tokio::test]
async fn tls_sessions_resume_after_many_other_clients() {
    use rustls::HandshakeKind::{Full, Resumed};
    let pki = Pki::new();
    let fake = FakeArcGis::start().await;
    let toml = standard_config(&fake, "");
    let proxy = TestProxy::start(&pki, &toml).await;
    let other = TestProxy::start(&pki, &toml).await;

    for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
        let returning = Arc::new(pki.client_config(&[version], &[b"http/1.1"]));
        assert_eq!(visit(&returning, proxy.addr).await, Full);
        assert_eq!(visit(&returning, proxy.addr).await, Resumed, "{version:?}");

        // A crowd of first-time visitors in between: more sessions than a
        // small server-side session cache holds (rustls keeps 256 by default,
        // two per TLS 1.3 handshake).
        let mut crowd = pki.client_config(&[version], &[b"http/1.1"]);
        crowd.resumption = rustls::client::Resumption::disabled();
        let crowd = Arc::new(crowd);
        for wave in 0..20 {
            let visits = (0..16).map(|_| visit(&crowd, proxy.addr));
            for kind in futures_util::future::join_all(visits).await {
                assert_eq!(kind, Full, "wave {wave}");
            }
        }
        assert_eq!(
            visit(&returning, proxy.addr).await,
            Resumed,
            "{version:?}: session lost after 320 other clients"
        );

        // A ticket this instance cannot read (another instance's) means a
        // full handshake, not a failure.
        assert_eq!(visit(&returning, other.addr).await, Full, "{version:?}");
        assert_eq!(visit(&returning, other.addr).await, Resumed, "{version:?}");
    }

    // A reload makes new ticket keys: one full handshake, then resumption.
    let returning = Arc::new(pki.client_config(&[&rustls::version::TLS13], &[b"http/1.1"]));
    assert_eq!(visit(&returning, proxy.addr).await, Full);
    assert_eq!(visit(&returning, proxy.addr).await, Resumed);
    let notes = proxy.app.reload(test_config(&pki, &toml));
    assert!(notes.is_empty(), "{notes:?}");
    assert_eq!(visit(&returning, proxy.addr).await, Full, "after reload");
    assert_eq!(visit(&returning, proxy.addr).await, Resumed, "after reload");
    proxy.stop().await;
    other.stop().await;
}

#[tokio::test]
async fn cleartext_listener_serves_too() {
    let (_pki, _fake, proxy) = setup_with("plain_listen = \"127.0.0.1:0\"", "").await;
    let client = TestClient::plain(proxy.plain_addr.unwrap());
    let a = client.get("/svc/echo/plain").await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.json()["token_ok"], true);
    proxy.stop().await;
}

#[tokio::test]
async fn oversized_heads_get_431() {
    let (pki, fake, proxy) = setup_with("", "max_header_bytes = 8192").await;
    let big = "a".repeat(20_000);
    let raw = format!(
        "GET /svc/echo/x HTTP/1.1\r\nHost: localhost\r\nReferer: https://app.example.com/\r\nX-Big: {big}\r\n\r\n"
    );
    let out = raw_tls(&pki, proxy.addr, raw.as_bytes(), Duration::from_secs(5)).await;
    assert_eq!(raw_status(&out), Some(431), "{out}");
    let long_url = format!("GET /svc/echo/{big} HTTP/1.1\r\nHost: localhost\r\n\r\n");
    let out = raw_tls(
        &pki,
        proxy.addr,
        long_url.as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(raw_status(&out), Some(431), "{out}");
    assert!(fake.requests().is_empty());

    // HTTP/2: a header list over the limit is refused, the server survives.
    let h2 = TestClient::h2(&pki, proxy.addr);
    let req = h2
        .req("GET", "/svc/echo/x")
        .header("referer", "https://app.example.com/")
        .header("x-big", big.as_str())
        .body(full(""))
        .unwrap();
    let refused = h2.try_send(req).await;
    assert!(
        refused.as_ref().is_none_or(|a| a.status == 431),
        "oversized h2 headers were served"
    );
    let a = h2.get("/svc/echo/after").await;
    assert_eq!(a.status, 200);
    proxy.stop().await;
}

#[tokio::test]
async fn slow_headers_are_cut_off() {
    // header_read_timeout_secs = 2 in the standard config.
    let (pki, fake, proxy) = setup_with("", "").await;
    let mut tls = tls_connect(&pki, proxy.addr, &rustls::version::TLS13, &[b"http/1.1"])
        .await
        .unwrap();
    tls.write_all(b"GET /svc/echo/x HTTP/1.1\r\nHost: localhost\r\n")
        .await
        .unwrap();
    // Never finish the head: the server must give up and close.
    let mut buf = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(8), tls.read_to_end(&mut buf)).await;
    assert!(
        r.is_ok(),
        "connection still open after the header read timeout"
    );
    assert!(fake.requests().is_empty());

    // A client that never even starts TLS is dropped too.
    let mut tcp = TcpStream::connect(proxy.addr).await.unwrap();
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(Duration::from_secs(8), tcp.read(&mut buf)).await;
    assert!(
        matches!(r, Ok(Ok(0)) | Ok(Err(_))),
        "idle TLS connection kept open: {r:?}"
    );
    proxy.stop().await;
}

/// Reads until the server closes; the time it took and what was read.
async fn read_until_closed<S: tokio::io::AsyncRead + Unpin>(
    s: &mut S,
    limit: Duration,
) -> (Option<Duration>, String) {
    let started = std::time::Instant::now();
    let mut buf = Vec::new();
    let r = tokio::time::timeout(limit, s.read_to_end(&mut buf)).await;
    (
        r.is_ok().then(|| started.elapsed()),
        String::from_utf8_lossy(&buf).into_owned(),
    )
}

#[tokio::test]
async fn idle_connections_are_closed_after_the_head_timeout() {
    // header_read_timeout_secs = 2 in the standard config.
    let (pki, _fake, proxy) = setup_with("", "").await;
    let connect = || tls_connect(&pki, proxy.addr, &rustls::version::TLS13, &[b"http/1.1"]);

    // Nothing sent after the handshake.
    let mut tls = connect().await.unwrap();
    let (closed, _) = read_until_closed(&mut tls, Duration::from_secs(8)).await;
    let took = closed.expect("silent connection kept open");
    assert!(
        took >= Duration::from_millis(1500),
        "closed too early: {took:?}"
    );

    // Idle after a complete request and answer on a keep-alive connection.
    let mut tls = connect().await.unwrap();
    tls.write_all(
        b"GET /svc/echo/x HTTP/1.1\r\nHost: localhost\r\nReferer: https://app.example.com/\r\n\r\n",
    )
    .await
    .unwrap();
    let (closed, text) = read_until_closed(&mut tls, Duration::from_secs(8)).await;
    let took = closed.expect("idle keep-alive connection kept open");
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        took >= Duration::from_millis(1500),
        "closed too early: {took:?}"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn a_slow_answer_is_not_cut_by_the_idle_timer() {
    // The upstream takes 5 s; the head timeout is 2 s and must not apply
    // while a request is in progress, on HTTP/1 (guarded) or HTTP/2.
    let (pki, _fake, proxy) = setup_with("", "upstream_timeout_secs = 8").await;
    let a = TestClient::new(&pki, proxy.addr).get("/svc/slow").await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.json()["slow"], true);
    let a = TestClient::h2(&pki, proxy.addr).get("/svc/slow").await;
    assert_eq!(a.status, 200, "{}", a.text());
    proxy.stop().await;
}

#[tokio::test]
async fn connection_limit_holds_new_connections() {
    let (pki, _fake, proxy) = setup_with("", "max_connections = 2").await;
    let cfg = Arc::new(pki.client_config(&[&rustls::version::TLS13], &[b"http/1.1"]));
    let connect = || {
        let cfg = Arc::clone(&cfg);
        let addr = proxy.addr;
        async move { tls_connect_with(&cfg, addr).await }
    };
    let c1 = connect().await.unwrap();
    let c2 = connect().await.unwrap();
    // The third TCP connect succeeds (kernel backlog) but nobody accepts it,
    // so its TLS handshake cannot complete while two are open.
    let third = tokio::spawn(connect());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !third.is_finished(),
        "third connection was served beyond the limit"
    );
    drop(c1);
    let c3 = tokio::time::timeout(Duration::from_secs(5), third)
        .await
        .expect("third connection never accepted after one closed")
        .unwrap();
    assert!(c3.is_ok());
    drop(c2);
    proxy.stop().await;
}

#[tokio::test]
async fn admin_endpoints() {
    let (pki, _fake, proxy) = setup_with("", "").await;
    // The public listener does not serve admin paths.
    let public = TestClient::new(&pki, proxy.addr);
    public.get("/healthz").await.assert_error(404);
    let admin = TestClient::plain(proxy.admin_addr.unwrap());
    let a = admin.get_with("/healthz", &[]).await;
    assert_eq!(a.status, 200);
    // Ready once the warm-up token arrives.
    let mut ready = false;
    for _ in 0..50 {
        let a = admin.get_with("/readyz", &[]).await;
        if a.status == 200 {
            assert_eq!(a.json()["credentials"]["online"], "ok");
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ready, "never became ready");
    let a = admin
        .send(admin.req("POST", "/healthz").body(full("")).unwrap())
        .await;
    a.assert_error(405);
    let a = admin.get_with("/nothing", &[]).await;
    assert_eq!(a.status, 404);
    proxy.stop().await;
}

/// Readiness waits for each credential's first token fetch, not for its
/// success: while the token endpoint refuses, the replica stays in its
/// Service and clients get the proxy's 502 JSON, not connection errors.
#[tokio::test]
async fn ready_but_reporting_a_failing_credential() {
    let pki = Pki::new();
    let fake = FakeArcGis::start().await;
    fake.set_mode(TokenMode::Reject);
    let proxy = TestProxy::start(&pki, &standard_config(&fake, "")).await;
    let admin = TestClient::plain(proxy.admin_addr.unwrap());
    let mut answer = None;
    for _ in 0..50 {
        let a = admin.get_with("/readyz", &[]).await;
        if a.status == 200 {
            answer = Some(a);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let a = answer.expect("never became ready while the credential failed");
    assert_eq!(a.json()["credentials"]["online"], "failing");
    assert_eq!(a.json()["ready"], true);
    TestClient::new(&pki, proxy.addr)
        .get("/svc/features")
        .await
        .assert_error(502);
    proxy.stop().await;
}

/// Before the first token fetch has finished, `/readyz` is 503 and says so.
#[tokio::test]
async fn not_ready_until_the_first_fetch_finishes() {
    let pki = Pki::new();
    let fake = FakeArcGis::start().await;
    fake.set_mode(TokenMode::Slow(Duration::from_millis(1500)));
    let proxy = TestProxy::start(&pki, &standard_config(&fake, "")).await;
    let admin = TestClient::plain(proxy.admin_addr.unwrap());
    let a = admin.get_with("/readyz", &[]).await;
    assert_eq!(a.status, 503);
    assert_eq!(a.json()["credentials"]["online"], "fetching");
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let a = admin.get_with("/readyz", &[]).await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.json()["credentials"]["online"], "ok");
    proxy.stop().await;
}

/// The same over HTTP/2: the in-flight answer and the GOAWAY reach the
/// client, and the connection then ends cleanly (both pass through
/// `coalesce`, which holds bytes until its next flush or shutdown).
#[tokio::test]
async fn graceful_shutdown_finishes_in_flight_http2_streams() {
    let (pki, _fake, proxy) = setup_with("", "upstream_timeout_secs = 10").await;
    let tls = tls_connect(&pki, proxy.addr, &rustls::version::TLS13, &[b"h2"])
        .await
        .unwrap();
    let (h2, conn) = h2::client::handshake(tls).await.unwrap();
    let conn = tokio::spawn(conn);
    let get = |path: &str| {
        http::Request::get(format!("https://localhost{path}"))
            .header("referer", "https://app.example.com/")
            .body(())
            .unwrap()
    };
    let mut h2 = h2.ready().await.unwrap();
    // Warm the token so the slow request is only slow upstream.
    let (warm, _) = h2.send_request(get("/svc/echo/warm"), true).unwrap();
    assert_eq!(warm.await.unwrap().status(), 200);
    let mut h2 = h2.ready().await.unwrap();
    let (slow, _) = h2.send_request(get("/svc/slow"), true).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stopping = tokio::spawn(proxy.stop());
    let answer = tokio::time::timeout(Duration::from_secs(10), slow)
        .await
        .expect("in-flight HTTP/2 answer never came")
        .unwrap();
    assert_eq!(answer.status(), 200);
    let mut body = answer.into_body();
    let mut bytes = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        body.flow_control().release_capacity(chunk.len()).unwrap();
        bytes.extend_from_slice(&chunk);
    }
    let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(json["slow"], true);
    let ended = tokio::time::timeout(Duration::from_secs(10), conn)
        .await
        .expect("HTTP/2 connection not closed after the drain")
        .unwrap();
    assert!(ended.is_ok(), "connection ended with {ended:?}");
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .expect("shutdown did not complete")
        .unwrap();
}

#[tokio::test]
async fn graceful_shutdown_finishes_in_flight_requests() {
    let (pki, _fake, proxy) = setup_with("", "upstream_timeout_secs = 10").await;
    let client = TestClient::new(&pki, proxy.addr);
    let admin = TestClient::plain(proxy.admin_addr.unwrap());
    // Warm the token so the slow request is only slow upstream.
    assert_eq!(client.get("/svc/echo/warm").await.status, 200);
    let addr = proxy.addr;
    let in_flight = tokio::spawn(async move { client.get("/svc/slow").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let app = Arc::clone(&proxy.app);
    let stopping = tokio::spawn(proxy.stop());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        app.status
            .shutting_down
            .load(std::sync::atomic::Ordering::SeqCst)
    );
    let a = admin.get_with("/readyz", &[]).await;
    assert_eq!(a.status, 503, "readyz must fail while draining");
    // New connections are refused while the old request finishes.
    assert!(TcpStream::connect(addr).await.is_err());
    let a = in_flight.await.unwrap();
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.json()["slow"], true);
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .expect("shutdown did not complete")
        .unwrap();
}

/// Reads from `s` until `n` complete HTTP/1.1 answers (with
/// `Content-Length` bodies) have arrived; returns their status codes.
async fn read_answers<S: tokio::io::AsyncRead + Unpin>(s: &mut S, n: usize) -> Vec<u16> {
    let mut buf = Vec::new();
    let mut piece = [0u8; 4096];
    loop {
        let mut statuses = Vec::new();
        let mut at = 0;
        while let Some(end) = find(&buf[at..], b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[at..at + end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            if buf.len() < at + end + 4 + len {
                break;
            }
            statuses.push(head[9..12].parse().unwrap());
            at += end + 4 + len;
        }
        if statuses.len() >= n {
            return statuses;
        }
        let got = tokio::time::timeout(Duration::from_secs(5), s.read(&mut piece))
            .await
            .expect("answer not complete in time")
            .unwrap();
        assert!(got > 0, "closed after {statuses:?}");
        buf.extend_from_slice(&piece[..got]);
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[tokio::test]
async fn a_parked_keep_alive_connection_serves_its_next_requests() {
    // An HTTP/1 connection idle for a second parks: hyper's connection ends
    // without closing the socket and the next bytes start a new one. The
    // head timeout is 2 s here, so each pause below parks the connection
    // and then continues it.
    let (pki, fake, proxy) = setup_with("", "").await;
    let mut tls = tls_connect(&pki, proxy.addr, &rustls::version::TLS13, &[b"http/1.1"])
        .await
        .unwrap();
    let req = |p: &str| {
        format!(
            "GET /svc/echo/{p} HTTP/1.1\r\nHost: localhost\r\nReferer: https://app.example.com/\r\n\r\n"
        )
    };
    tls.write_all(req("a").as_bytes()).await.unwrap();
    assert_eq!(read_answers(&mut tls, 1).await, [200]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // Two pipelined requests in one write after the park.
    tls.write_all(format!("{}{}", req("b"), req("c")).as_bytes())
        .await
        .unwrap();
    assert_eq!(read_answers(&mut tls, 2).await, [200, 200]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    // A head that arrives in pieces after the park.
    let d = req("d");
    let (first, rest) = d.split_at(7);
    tls.write_all(first.as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    tls.write_all(rest.as_bytes()).await.unwrap();
    assert_eq!(read_answers(&mut tls, 1).await, [200]);
    assert_eq!(
        fake.paths(),
        ["/svc/echo/a", "/svc/echo/b", "/svc/echo/c", "/svc/echo/d"]
    );
    // Parked or not, the idle timeout still closes it, counted from the end
    // of the last answer.
    let (closed, rest) = read_until_closed(&mut tls, Duration::from_secs(8)).await;
    let took = closed.expect("parked connection kept open past the idle timeout");
    assert!(rest.is_empty(), "{rest}");
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_millis(3500),
        "closed after {took:?}"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn cleartext_http2_prior_knowledge_is_told_by_a_preface_in_pieces() {
    // Without ALPN the first bytes decide: the preface arriving in two
    // writes must still be taken for HTTP/2, not answered as HTTP/1.
    let (_pki, _fake, proxy) = setup_with("plain_listen = \"127.0.0.1:0\"", "").await;
    let mut tcp = TcpStream::connect(proxy.plain_addr.unwrap()).await.unwrap();
    tcp.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The rest of the preface and an empty SETTINGS frame.
    tcp.write_all(b"\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let mut head = [0u8; 9];
    tokio::time::timeout(Duration::from_secs(5), tcp.read_exact(&mut head))
        .await
        .expect("no answer to the preface")
        .unwrap();
    assert_eq!(head[3], 0x04, "not a SETTINGS frame: {head:?}");
    proxy.stop().await;
}

#[tokio::test]
async fn a_parked_connection_is_closed_at_once_by_a_shutdown() {
    let (pki, _fake, proxy) = setup_with("", "").await;
    let mut tls = tls_connect(&pki, proxy.addr, &rustls::version::TLS13, &[b"http/1.1"])
        .await
        .unwrap();
    tls.write_all(
        b"GET /svc/echo/a HTTP/1.1\r\nHost: localhost\r\nReferer: https://app.example.com/\r\n\r\n",
    )
    .await
    .unwrap();
    assert_eq!(read_answers(&mut tls, 1).await, [200]);
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let stopping = tokio::spawn(proxy.stop());
    let (closed, rest) = read_until_closed(&mut tls, Duration::from_secs(5)).await;
    let took = closed.expect("parked connection kept open through the drain");
    assert!(rest.is_empty(), "{rest}");
    assert!(took < Duration::from_millis(500), "closed after {took:?}");
    tokio::time::timeout(Duration::from_secs(2), stopping)
        .await
        .expect("shutdown waited for a parked connection")
        .unwrap();
}
