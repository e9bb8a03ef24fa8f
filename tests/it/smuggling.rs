//! Request framing abuse over real TLS: conflicting or malformed framing is
//! refused with 400 and a closed connection, never forwarded; well-formed
//! pipelined keep-alive traffic still works.

use std::time::Duration;

use crate::support::*;

const REF: &str = "Referer: https://app.example.com/\r\n";

#[tokio::test]
async fn conflicting_or_malformed_framing_is_400_and_closed() {
    let pki = Pki::new();
    let fake = FakeArcGis::start().await;
    let proxy = TestProxy::start(&pki, &standard_config(&fake, "")).await;
    let cases = [
        format!(
            "POST /svc/echo/a HTTP/1.1\r\nHost: localhost\r\n{REF}Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /svc/echo/smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
        ),
        format!(
            "POST /svc/echo/a HTTP/1.1\r\nHost: localhost\r\n{REF}Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n"
        ),
        format!(
            "POST /svc/echo/a HTTP/1.1\r\nHost: localhost\r\n{REF}Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"
        ),
        format!(
            "POST /svc/echo/a HTTP/1.1\r\nHost: localhost\r\n{REF}Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"
        ),
        format!("GET /svc/echo/a HTTP/1.1\r\nHost: localhost\r\n{REF}X-Folded: a\r\n b\r\n\r\n"),
        format!(
            "POST /svc/echo/a HTTP/1.0\r\nHost: localhost\r\n{REF}Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        ),
    ];
    for raw in &cases {
        let before = fake.requests().len();
        let out = raw_tls(&pki, proxy.addr, raw.as_bytes(), Duration::from_secs(5)).await;
        assert_eq!(raw_status(&out), Some(400), "{raw:?} → {out:?}");
        // Exactly one answer, then the connection is closed (raw_tls read to
        // EOF within the wait).
        assert_eq!(out.matches("HTTP/1.1 ").count(), 1, "{out}");
        assert_eq!(fake.requests().len(), before, "{raw:?} reached upstream");
    }
    // The proxy still serves normal requests.
    let client = TestClient::new(&pki, proxy.addr);
    assert_eq!(client.get("/svc/echo/after").await.status, 200);
    proxy.stop().await;
}

#[tokio::test]
async fn pipelined_keep_alive_requests_still_work() {
    let pki = Pki::new();
    let fake = FakeArcGis::start().await;
    let proxy = TestProxy::start(&pki, &standard_config(&fake, "")).await;
    let raw = format!(
        "GET /svc/echo/one HTTP/1.1\r\nHost: localhost\r\n{REF}\r\n\
POST /svc/echo/two HTTP/1.1\r\nHost: localhost\r\n{REF}Content-Type: application/json\r\nContent-Length: 7\r\n\r\n{{\"a\":1}}\
POST /svc/echo/three HTTP/1.1\r\nHost: localhost\r\n{REF}Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n\
GET /svc/echo/four HTTP/1.1\r\nHost: localhost\r\n{REF}Connection: close\r\n\r\n"
    );
    let out = raw_tls(&pki, proxy.addr, raw.as_bytes(), Duration::from_secs(5)).await;
    assert_eq!(out.matches("HTTP/1.1 200").count(), 4, "{out}");
    let paths: Vec<String> = fake
        .requests()
        .iter()
        .map(|r| r.uri.split('?').next().unwrap().to_string())
        .collect();
    assert_eq!(
        paths,
        [
            "/svc/echo/one",
            "/svc/echo/two",
            "/svc/echo/three",
            "/svc/echo/four"
        ]
    );
    let recs = fake.requests();
    assert_eq!(&recs[1].body[..], br#"{"a":1}"#);
    assert_eq!(&recs[2].body[..], b"abc");
    proxy.stop().await;
}
