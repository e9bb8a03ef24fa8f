//! Token injection through the real pipeline: the token request's shape,
//! single flight, endpoint failures, rejection and retry, API keys.

use std::sync::Arc;
use std::time::Duration;

use crate::support::*;

#[tokio::test]
async fn token_request_has_the_documented_form() {
    let pki = Pki::new();
    let fake = FakeArcGis::start().await;
    let proxy = TestProxy::start(&pki, &standard_config(&fake, "")).await;
    let client = TestClient::new(&pki, proxy.addr);
    assert_eq!(client.get("/svc/echo/x").await.status, 200);
    let forms = fake.token_forms.lock().unwrap().clone();
    assert_eq!(forms.len(), 1);
    let pairs: Vec<(String, String)> = url::form_urlencoded::parse(forms[0].as_bytes())
        .into_owned()
        .collect();
    let get = |k: &str| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    assert_eq!(get("client_id"), Some("the-client-id"));
    assert_eq!(get("client_secret"), Some(SECRET));
    assert_eq!(get("grant_type"), Some("client_credentials"));
    assert_eq!(get("expiration"), Some("120"));
    assert_eq!(get("f"), Some("json"));
    proxy.stop().await;
}

#[tokio::test]
async fn a_thousand_concurrent_cold_requests_cause_one_token_request() {
    let pki = Pki::new();
    let fake = FakeArcGis::start().await;
    fake.set_mode(TokenMode::Slow(Duration::from_millis(300)));
    let proxy = TestProxy::start(&pki, &standard_config(&fake, "")).await;
    let client = Arc::new(TestClient::h2(&pki, proxy.addr));
    let mut tasks = Vec::new();
    for i in 0..1000 {
        let c = Arc::clone(&client);
        tasks.push(tokio::spawn(async move {
            c.get(&format!("/svc/features?i={i}")).await.status
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(fake.token_count(), 1);
    proxy.stop().await;
}

#[tokio::test]
async fn rejected_credential_is_502_without_the_secret() {
    let pki = Pki::new();
    let fake = FakeArcGis::start().await;
    fake.set_mode(TokenMode::Reject);
    let proxy = TestProxy::start(&pki, &standard_config(&fake, "")).await;
    let client = TestClient::new(&pki, proxy.addr);
    let a = client.get("/svc/features").await;
    a.assert_error(502);
    assert!(!a.text().contains(SECRET));
    assert!(fake.requests().is_empty(), "no token, no upstream request");
    proxy.stop().await;
}

#[tokio::test]
async fn token_endpoint_down_is_503_with_retry_after_then_recovers() {
    let pki = Pki::new();
    let fake = FakeArcGis::start().await;
    fake.set_mode(TokenMode::Down);
    let proxy = TestProxy::start(&pki, &standard_config(&fake, "")).await;
    let client = TestClient::new(&pki, proxy.addr);
    let a = client.get("/svc/features").await;
    a.assert_error(503);
    let retry: u64 = a.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry >= 1);
    // Within the backoff window the endpoint is not hammered.
    let count = fake.token_count();
    for _ in 0..20 {
        client.get("/svc/features").await.assert_error(503);
    }
    assert!(
        fake.token_count() <= count + 1,
        "hot loop against the token endpoint"
    );
    fake.set_mode(TokenMode::Ok);
    let mut recovered = false;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        if client.get("/svc/features").await.status == 200 {
            recovered = true;
            break;
        }
    }
    assert!(recovered, "did not recover after the endpoint healed");
    proxy.stop().await;
}

#[tokio::test]
async fn revoked_token_is_replaced_transparently() {
    let pki = Pki::new();
    let fake = FakeArcGis::start().await;
    let proxy = TestProxy::start(&pki, &standard_config(&fake, "")).await;
    let client = TestClient::new(&pki, proxy.addr);
    assert_eq!(client.get("/svc/http498").await.status, 200);
    assert_eq!(fake.token_count(), 1);
    fake.revoke_all();
    // Upstream answers HTTP 498 for the revoked token; the client never sees
    // it: one new token, two upstream attempts, a normal answer.
    let before = fake.requests().len();
    let a = client.get("/svc/http498").await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.json()["ok"], true);
    assert_eq!(fake.token_count(), 2);
    assert_eq!(fake.requests().len(), before + 2);

    // POST with a small body is retried with the same body.
    fake.revoke_all();
    let a = client
        .send(
            client
                .req("POST", "/svc/http498")
                .header("referer", "https://app.example.com/")
                .header("content-type", "application/json")
                .body(full(r#"{"a":1}"#))
                .unwrap(),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.text());
    let recs = fake.requests();
    assert_eq!(recs[recs.len() - 1].body, recs[recs.len() - 2].body);
    assert_eq!(&recs[recs.len() - 1].body[..], br#"{"a":1}"#);
    proxy.stop().await;
}

#[tokio::test]
async fn retry_that_fails_again_is_502_not_498() {
    let pki = Pki::new();
    let fake = FakeArcGis::start().await;
    let proxy = TestProxy::start(&pki, &standard_config(&fake, "")).await;
    let client = TestClient::new(&pki, proxy.addr);
    assert_eq!(client.get("/svc/http498").await.status, 200);
    // Every token, old or new, is refused now.
    fake.reject_all_tokens
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let before = fake.requests().len();
    let a = client.get("/svc/http498").await;
    a.assert_error(502);
    assert_eq!(fake.token_count(), 2, "exactly one new token");
    assert_eq!(
        fake.requests().len(),
        before + 2,
        "exactly two upstream attempts"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn api_key_credential_is_injected_as_is() {
    let pki = Pki::new();
    let fake = FakeArcGis::start().await;
    let toml = standard_config(
        &fake,
        &format!(
            "[credentials.key]\napi_key_env = \"APIKEY\"\n[[routes]]\nname = \"keyed\"\nupstream = \"{}/open\"\ncredential = \"key\"\nmount = \"/keyed\"\ntoken_in = \"query\"\n",
            fake.url()
        ),
    );
    let proxy = TestProxy::start(&pki, &toml).await;
    let client = TestClient::new(&pki, proxy.addr);
    let a = client.get("/keyed/x?f=json").await;
    assert_eq!(a.status, 200);
    assert_eq!(
        fake.last().query_param("token").as_deref(),
        Some("API-KEY-123")
    );
    proxy.stop().await;
}

/// Short-lived tokens (an Enterprise portal set to 5 s) under concurrent
/// load: one token about every 4 s, no request queued behind a fetch, no
/// expired token sent. With a fixed 30 s "do not inject" margin every
/// request fetched a token of its own.
#[tokio::test]
async fn five_second_tokens_under_load_cost_one_fetch_per_refresh() {
    let pki = Pki::new();
    let fake = FakeArcGis::start().await;
    fake.lifetime_secs
        .store(5, std::sync::atomic::Ordering::SeqCst);
    let proxy = TestProxy::start(&pki, &standard_config(&fake, "")).await;
    let run = Duration::from_secs(9);
    let started = std::time::Instant::now();
    let mut tasks = Vec::new();
    for c in 0..32 {
        let client = if c % 2 == 0 {
            TestClient::new(&pki, proxy.addr)
        } else {
            TestClient::h2(&pki, proxy.addr)
        };
        tasks.push(tokio::spawn(async move {
            let (mut ok, mut other) = (0usize, Vec::new());
            while started.elapsed() < run {
                let path = if c % 4 < 2 {
                    "/svc/features"
                } else {
                    "/q/features"
                };
                let a = client.get(path).await;
                if a.status == 200 {
                    ok += 1;
                } else {
                    other.push(a.status.as_u16());
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (ok, other)
        }));
    }
    let mut total = 0;
    for t in tasks {
        let (ok, other) = t.await.unwrap();
        assert!(other.is_empty(), "non-200 answers: {other:?}");
        total += ok;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let tokens = fake.token_count();
    // One at the start, then one per refresh interval (4 s after each).
    let bound = 2 + (elapsed / 4.0) as usize;
    assert!(
        tokens <= bound,
        "{tokens} token requests for {total} requests in {elapsed:.1} s (bound {bound})"
    );
    assert!(tokens >= 2, "the token was never refreshed: {tokens}");
    assert!(total > 32 * 10, "only {total} requests were answered");
    assert_eq!(
        fake.expired_presented
            .load(std::sync::atomic::Ordering::SeqCst),
        0,
        "an expired token went upstream"
    );
    proxy.stop().await;
}
