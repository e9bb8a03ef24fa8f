//! A corporate outbound proxy between this proxy and ArcGIS: `CONNECT`
//! tunnels for https upstreams and token endpoints, absolute-form requests
//! for http ones, credentials from the proxy URL, `no_proxy`, and the
//! `HTTPS_PROXY`/`HTTP_PROXY`/`NO_PROXY` environment when the keys are
//! absent.

use std::sync::atomic::Ordering;

use base64::Engine;

use crate::support::*;

/// The standard config over a TLS fake (named `localhost`, trusted through
/// `extra_ca`), with `upstream` lines added to `[upstream]`.
fn tls_config(fake: &FakeArcGis, upstream: &str) -> String {
    let toml = standard_config(fake, "").replace(
        &fake.url(),
        &format!("https://localhost:{}", fake.addr.port()),
    );
    toml.replace("[upstream]\n", &format!("[upstream]\n{upstream}\n"))
}

fn basic(user_pass: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(user_pass)
    )
}

#[tokio::test]
async fn https_upstreams_and_token_fetches_go_through_connect_tunnels() {
    let pki = Pki::new();
    let fake = FakeArcGis::start_tls(pki.server_config(&[b"h2", b"http/1.1"])).await;
    let corp = ForwardProxy::start().await;
    *corp.require.lock().unwrap() = Some(basic("svc@corp:p@ss:w0rd"));
    // Credentials percent-encoded in the URL, as a URL must carry them.
    let toml = tls_config(
        &fake,
        &format!("proxy = \"http://svc%40corp:p%40ss%3Aw0rd@{}\"", corp.addr),
    );
    let proxy = TestProxy::start(&pki, &toml).await;
    for client in [
        TestClient::new(&pki, proxy.addr),
        TestClient::h2(&pki, proxy.addr),
    ] {
        for path in ["/svc/echo/a", "/q/echo/b?f=json"] {
            let a = client.get(path).await;
            assert_eq!(a.status, 200, "{path}: {}", a.text());
            assert_eq!(a.json()["token_ok"], true, "{path}");
        }
        let a = client
            .send(
                client
                    .req("POST", "/svc/echo/c")
                    .header("referer", "https://app.example.com/")
                    .header("content-type", "application/x-www-form-urlencoded")
                    .body(full("where=1%3D1&f=json"))
                    .unwrap(),
            )
            .await;
        assert_eq!(a.status, 200, "{}", a.text());
    }
    assert!(fake.token_count() >= 1);
    // Every connection the fake accepted (token endpoint and services)
    // came through a tunnel, each CONNECT naming the upstream and carrying
    // the credentials.
    let tunnels = corp.tunnels.load(Ordering::SeqCst);
    assert!(tunnels >= 1);
    assert_eq!(tunnels, fake.connection_count());
    let want = format!("CONNECT localhost:{} HTTP/1.1", fake.addr.port());
    for c in corp.seen() {
        assert_eq!(c.request_line, want);
        assert_eq!(
            c.authorization.as_deref(),
            Some(basic("svc@corp:p@ss:w0rd").as_str())
        );
    }
    proxy.stop().await;
}

#[tokio::test]
async fn no_proxy_hosts_are_reached_directly() {
    let pki = Pki::new();
    let fake = FakeArcGis::start_tls(pki.server_config(&[b"http/1.1"])).await;
    let corp = ForwardProxy::start().await;
    let toml = tls_config(
        &fake,
        &format!(
            "proxy = \"{}\"\nno_proxy = [\"gis.internal.example\", \"localhost\"]",
            corp.url()
        ),
    );
    let proxy = TestProxy::start(&pki, &toml).await;
    let a = TestClient::new(&pki, proxy.addr).get("/svc/echo/a").await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert!(corp.seen().is_empty(), "{:?}", corp.seen());
    assert!(fake.connection_count() >= 1);
    proxy.stop().await;
}

/// Without the keys the environment decides: `HTTP_PROXY` for an http
/// upstream (absolute-form requests with the credentials, token fetch
/// included), `NO_PROXY` for the hosts it names.
#[tokio::test]
async fn http_upstreams_use_absolute_form_through_http_proxy_from_the_environment() {
    let pki = Pki::new();
    let fake = FakeArcGis::start().await;
    let corp = ForwardProxy::start().await;
    let with_auth = corp.url().replace("http://", "http://ops:hunter2@");
    let toml = standard_config(&fake, "");
    let proxy = TestProxy::start_env(
        &pki,
        &toml,
        &[
            ("HTTP_PROXY", &with_auth),
            ("NO_PROXY", "gis.internal.example"),
        ],
    )
    .await;
    let client = TestClient::new(&pki, proxy.addr);
    let a = client.get("/svc/echo/a?x=1").await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.json()["token_ok"], true);
    let base = fake.url();
    let seen = corp.seen();
    let lines: Vec<&str> = seen.iter().map(|c| c.request_line.as_str()).collect();
    assert!(
        lines.contains(&format!("POST {base}/sharing/rest/oauth2/token HTTP/1.1").as_str()),
        "{lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with(&format!("GET {base}/svc/echo/a?"))),
        "{lines:?}"
    );
    for c in &seen {
        assert_eq!(
            c.authorization.as_deref(),
            Some(basic("ops:hunter2").as_str())
        );
    }
    // The upstream never sees the proxy's credentials (the fake proxy
    // strips them as a real one does; the proxy sent them only once, to
    // the proxy, not as an upstream header).
    let rec = fake.last();
    assert!(rec.headers.get("proxy-authorization").is_none());
    // HTTP_PROXY is for http upstreams only: with NO_PROXY naming the host,
    // nothing goes through the proxy.
    proxy.stop().await;
    let before = corp.seen().len();
    let proxy = TestProxy::start_env(
        &pki,
        &toml,
        &[("HTTP_PROXY", &with_auth), ("NO_PROXY", "127.0.0.1")],
    )
    .await;
    let a = TestClient::new(&pki, proxy.addr).get("/svc/echo/b").await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(corp.seen().len(), before);
    proxy.stop().await;
}

/// A proxy that wants credentials it did not get, refuses the tunnel, or is
/// not there: a clean 502 for the client, and a log an operator can act on.
#[tokio::test]
async fn a_refusing_or_missing_proxy_is_a_clean_502() {
    let pki = Pki::new();
    let fake = FakeArcGis::start_tls(pki.server_config(&[b"http/1.1"])).await;
    let corp = ForwardProxy::start().await;
    *corp.require.lock().unwrap() = Some(basic("a:b"));
    let toml = tls_config(&fake, &format!("proxy = \"{}\"", corp.url()));
    let proxy = TestProxy::start(&pki, &toml).await;
    let client = TestClient::new(&pki, proxy.addr);
    // The open route needs no token, so the tunnel itself is what fails.
    client.get("/open/x").await.assert_error(502);
    // A route with a credential: the token endpoint cannot be reached, so
    // the token is temporarily unavailable, as for any unreachable endpoint.
    client.get("/svc/echo/x").await.assert_error(503);
    *corp.require.lock().unwrap() = None;
    corp.refuse.store(true, Ordering::SeqCst);
    client.get("/open/y").await.assert_error(502);
    assert_eq!(corp.tunnels.load(Ordering::SeqCst), 0);
    assert_eq!(fake.connection_count(), 0);
    proxy.stop().await;

    // Nothing listening where the proxy should be.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let toml = tls_config(&fake, &format!("proxy = \"http://127.0.0.1:{port}\""));
    let proxy = TestProxy::start(&pki, &toml).await;
    TestClient::new(&pki, proxy.addr)
        .get("/open/z")
        .await
        .assert_error(502);
    assert_eq!(fake.connection_count(), 0);
    proxy.stop().await;
}

/// The binary as an operator runs it: the startup log says which proxy and
/// where the setting came from, without its password; an unusable proxy
/// variable stops the start with a message naming the variable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_startup_log_names_the_proxy_and_its_source() {
    let pki = Pki::new();
    let fake = FakeArcGis::start_tls(pki.server_config(&[b"http/1.1"])).await;
    let corp = ForwardProxy::start().await;
    let toml = fill_paths(&pki, &tls_config(&fake, ""));
    let cfg = write_config(&pki, "outbound.toml", &toml);
    let url = corp.url().replace("http://", "http://ops:hunter2@");
    let mut p = Proc::spawn(
        &["--config", &cfg],
        &[
            ("SECRET", SECRET),
            ("HTTPS_PROXY", &url),
            ("NO_PROXY", ".corp.example"),
        ],
    );
    let addr = p.listener("https");
    let line = p.wait_for("upstream connections go through");
    assert!(
        line.contains(&format!(
            "http://***@127.0.0.1:{} for https upstreams (http upstreams go direct), not for .corp.example (from the environment: HTTPS_PROXY; no_proxy from NO_PROXY)",
            corp.addr.port()
        )),
        "{line}"
    );
    let a = TestClient::new(&pki, addr).get("/svc/echo/a").await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert!(corp.tunnels.load(Ordering::SeqCst) >= 1);
    let (_, out) = p.terminate();
    assert!(!out.contains("hunter2"), "{out}");

    // A SOCKS proxy in the environment: refused by name, password unshown.
    // `check` exits by itself; waiting (not signalling) keeps its status.
    let p = Proc::spawn(
        &["check", "--config", &cfg],
        &[
            ("SECRET", SECRET),
            ("HTTPS_PROXY", "socks5://ops:hunter2@127.0.0.1:1080"),
        ],
    );
    let (code, out) = p.wait();
    let line = out
        .lines()
        .find(|l| l.contains("HTTPS_PROXY"))
        .unwrap_or_default()
        .to_string();
    assert!(
        line.contains("environment variable HTTPS_PROXY: SOCKS proxies are not supported"),
        "{line}"
    );
    assert_eq!(code, 78, "{out}");
    assert!(!out.contains("hunter2"), "{out}");
}
