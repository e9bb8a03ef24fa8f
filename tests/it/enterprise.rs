//! ArcGIS Enterprise without OAuth app credentials: a named user's username
//! and password exchanged at `generateToken`, on a portal (found through
//! the server's `/rest/info`) or a stand-alone server; the password never
//! shows.

use std::sync::atomic::Ordering;

use crate::support::*;

/// The standard config plus credential `gis` (username/password, `extra`
/// lines added to it) and a route `/ent` over the fake's
/// `/arcgis/rest/services` using it.
fn config(fake: &FakeArcGis, extra: &str) -> String {
    let base = fake.url();
    standard_config(
        fake,
        &format!(
            r#"
[credentials.gis]
username = "svc_publicmaps"
expiration_minutes = 60
{extra}
[[routes]]
name = "enterprise"
upstream = "{base}/arcgis/rest/services"
credential = "gis"
mount = "/ent"
"#
        ),
    )
}

/// The first generateToken form the fake received, as pairs.
fn username_form(fake: &FakeArcGis) -> Vec<(String, String)> {
    let forms = fake.token_forms.lock().unwrap().clone();
    let form = forms
        .iter()
        .find(|f| f.contains("username="))
        .expect("no generateToken request");
    url::form_urlencoded::parse(form.as_bytes())
        .into_owned()
        .collect()
}

fn get<'a>(pairs: &'a [(String, String)], k: &str) -> Option<&'a str> {
    pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_portal_found_through_rest_info_gives_tokens_and_the_password_never_shows() {
    let pki = Pki::new();
    let fake = FakeArcGis::start().await;
    let toml = config(
        &fake,
        "password_env = \"SECRET\"\nupstream_referer = \"https://maps.example.com\"",
    );
    let cfg = write_config(&pki, "enterprise.toml", &toml);
    let mut p = Proc::spawn(&["--config", &cfg], &[("SECRET", SECRET)]);
    let addr = p.listener("https");
    let found = p.wait_for("found the token service URL");
    assert!(
        found.contains(&format!("{}/portal/sharing/rest/generateToken", fake.url())),
        "{found}"
    );
    assert!(found.contains("gis"), "{found}");
    let client = TestClient::new(&pki, addr);
    for _ in 0..3 {
        let a = client.get("/ent/echo/layer?f=json").await;
        assert_eq!(a.status, 200, "{}", a.text());
        assert_eq!(a.json()["token_ok"], true);
        assert!(!a.text().contains(SECRET));
        // The credential's referrer goes upstream with its token.
        assert_eq!(a.json()["headers"]["referer"], "https://maps.example.com/");
    }
    assert_eq!(
        fake.client_of(&fake.last()).as_deref(),
        Some("svc_publicmaps")
    );
    assert_eq!(
        fake.info_requests.load(Ordering::SeqCst),
        1,
        "looked up once"
    );
    // The documented form: client=referer with the credential's referrer.
    let pairs = username_form(&fake);
    assert_eq!(get(&pairs, "username"), Some("svc_publicmaps"));
    assert_eq!(get(&pairs, "password"), Some(SECRET));
    assert_eq!(get(&pairs, "expiration"), Some("60"));
    assert_eq!(get(&pairs, "f"), Some("json"));
    assert_eq!(get(&pairs, "client"), Some("referer"));
    assert_eq!(get(&pairs, "referer"), Some("https://maps.example.com/"));
    let (code, logs) = p.terminate();
    assert_eq!(code, 0, "{logs}");
    assert!(!logs.contains(SECRET), "the password is in the logs");
}

#[tokio::test]
async fn a_stand_alone_server_with_its_token_url_uses_requestip() {
    let pki = Pki::new();
    let fake = FakeArcGis::start().await;
    let toml = config(
        &fake,
        &format!(
            "password_env = \"SECRET\"\ntoken_url = \"{}/arcgis/tokens/generateToken\"",
            fake.url()
        ),
    );
    let proxy = TestProxy::start(&pki, &toml).await;
    let client = TestClient::new(&pki, proxy.addr);
    let a = client.get("/ent/echo/x").await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.json()["token_ok"], true);
    assert_eq!(fake.info_requests.load(Ordering::SeqCst), 0);
    let pairs = username_form(&fake);
    assert_eq!(get(&pairs, "client"), Some("requestip"));
    assert_eq!(get(&pairs, "referer"), None);
    // A revoked token (the service answers 499 "Token Required") is
    // replaced through generateToken, and the request retried once.
    fake.revoke_all();
    let a = client.get("/ent/features").await;
    // The fake has no such layer (404); what matters is the retry.
    assert!(!a.text().contains("Token Required"), "{}", a.text());
    assert_eq!(
        fake.client_of(&fake.last()).as_deref(),
        Some("svc_publicmaps")
    );
    let generated = fake
        .token_forms
        .lock()
        .unwrap()
        .iter()
        .filter(|f| f.contains("username=svc_publicmaps"))
        .count();
    assert_eq!(generated, 2, "one token, then exactly one replacement");
    proxy.stop().await;
}

#[tokio::test]
async fn a_wrong_password_is_a_rejected_credential() {
    let pki = Pki::new();
    let fake = FakeArcGis::start().await;
    // APIKEY's value is not the user's password.
    let proxy = TestProxy::start(&pki, &config(&fake, "password_env = \"APIKEY\"")).await;
    let client = TestClient::new(&pki, proxy.addr);
    let a = client.get("/ent/echo/x").await;
    a.assert_error(502);
    assert_eq!(
        a.json()["error"]["message"],
        "The ArcGIS credential was rejected."
    );
    assert!(!a.text().contains("API-KEY-123"));
    let ping = client.get("/proxy?ping").await.json();
    assert_eq!(ping["credentials"]["gis"], "failing");
    proxy.stop().await;
}

/// A server that will not say where its token service is: a clear error at
/// startup, naming the credential and what to set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_info_that_refuses_or_has_no_auth_info_names_the_credential() {
    for status in [401, 0] {
        let pki = Pki::new();
        let fake = FakeArcGis::start().await;
        fake.info_status.store(status, Ordering::SeqCst);
        let cfg = write_config(
            &pki,
            "noinfo.toml",
            &config(&fake, "password_env = \"SECRET\""),
        );
        let mut p = Proc::spawn(&["--config", &cfg], &[("SECRET", SECRET)]);
        let line = p.wait_for("token endpoint rejected the credential");
        assert!(line.contains("\"credential\":\"gis\""), "{line}");
        assert!(line.contains("/arcgis/rest/info"), "{line}");
        assert!(line.contains("set token_url"), "{line}");
        let (code, logs) = p.terminate();
        assert_eq!(code, 0, "{logs}");
        assert!(!logs.contains(SECRET));
    }
}

/// An internal CA installed in the operating system's store (here given as
/// `SSL_CERT_FILE`, which the store honours) is trusted for upstream and
/// token requests without `extra_ca`; without it the same upstream is
/// refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_internal_ca_is_trusted_through_the_operating_systems_store() {
    let pki = Pki::new();
    let internal = Pki::new();
    let fake = FakeArcGis::start_tls(internal.server_config(&[b"http/1.1"])).await;
    let toml = standard_config(&fake, "").replace("extra_ca = \"{CA}\"\n", "");
    assert!(!toml.contains("extra_ca"), "{toml}");
    let cfg = write_config(&pki, "os-trust.toml", &toml);
    let ca = internal.path("ca.pem");
    let mut p = Proc::spawn(
        &["--config", &cfg],
        &[("SECRET", SECRET), ("SSL_CERT_FILE", ca.to_str().unwrap())],
    );
    let addr = p.listener("https");
    p.wait_for("obtained token");
    let a = TestClient::new(&pki, addr).get("/svc/echo/x").await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.json()["token_ok"], true);
    let (code, logs) = p.terminate();
    assert_eq!(code, 0, "{logs}");
    assert!(logs.contains("operating system"), "{logs}");

    // The same without SSL_CERT_FILE: the internal CA is unknown.
    let empty = tempfile::tempdir().unwrap();
    let mut p = Proc::spawn(
        &["--config", &cfg],
        &[
            ("SECRET", SECRET),
            // An empty store, so the machine's own roots cannot matter.
            ("SSL_CERT_DIR", empty.path().to_str().unwrap()),
        ],
    );
    let addr = p.listener("https");
    p.wait_for("could not obtain a token");
    let a = TestClient::new(&pki, addr).get("/svc/echo/x").await;
    assert_eq!(a.status, 503, "{}", a.text());
    let _ = p.terminate();
}
