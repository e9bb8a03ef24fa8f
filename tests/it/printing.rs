//! Printing a map whose layers come through the proxy: the print service
//! gets upstream URLs and the tokens it needs, for layers under routes
//! only; the client never sees those tokens.

use crate::support::*;

const PUBLIC: &str = "https://maps.example.com";

fn web_map(fake: &FakeArcGis) -> serde_json::Value {
    serde_json::json!({
        "mapOptions": {"extent": {}},
        "operationalLayers": [
            {"id": "parks", "url": format!("{PUBLIC}/svc/Parks/FeatureServer/0")},
            {"id": "open", "url": format!("{PUBLIC}/proxy?{}/open/Layer/MapServer", fake.url())},
            {"id": "elsewhere", "url": "https://elsewhere.example.com/arcgis/rest/services/X/MapServer"},
            {"id": "group", "layers": [
                {"id": "nested", "url": format!("{PUBLIC}/q/Trails/FeatureServer/2?f=json")}
            ]},
            {"id": "direct", "url": format!("{}/svc/Direct/MapServer", fake.url())}
        ],
        "baseMap": {"baseMapLayers": [
            {"id": "vt", "styleUrl": format!("{PUBLIC}/svc/styles/v2/styles/arcgis/navigation")}
        ]}
    })
}

fn config(fake: &FakeArcGis) -> String {
    standard_config(fake, "").replace(
        "admin_listen = \"127.0.0.1:0\"",
        &format!("admin_listen = \"127.0.0.1:0\"\npublic_url = \"{PUBLIC}\""),
    )
}

/// POSTs a form from the allowed page.
async fn post_form(client: &TestClient, path: &str, form: String) -> Answer {
    client
        .send(
            client
                .req("POST", path)
                .header("content-type", "application/x-www-form-urlencoded")
                .header("referer", "https://app.example.com/")
                .body(full(form))
                .unwrap(),
        )
        .await
}

/// The Web_Map_as_JSON the fake print service received.
fn received(fake: &FakeArcGis, from_query: bool) -> serde_json::Value {
    let rec = fake
        .requests()
        .into_iter()
        .rev()
        .find(|r| r.uri.contains("/svc/print/"))
        .expect("the print service was not called");
    let form = if from_query {
        rec.uri.split_once('?').unwrap().1.to_string()
    } else {
        String::from_utf8_lossy(&rec.body).into_owned()
    };
    let map = url::form_urlencoded::parse(form.as_bytes())
        .find(|(k, _)| k == "Web_Map_as_JSON")
        .map(|(_, v)| v.into_owned())
        .expect("no Web_Map_as_JSON");
    serde_json::from_str(&map).unwrap()
}

fn check(fake: &FakeArcGis, map: &serde_json::Value) {
    let base = fake.url();
    let ops = &map["operationalLayers"];
    let token = fake.issued()[0].clone();
    assert_eq!(
        ops[0]["url"],
        format!("{base}/svc/Parks/FeatureServer/0").as_str()
    );
    assert_eq!(ops[0]["token"], token.as_str());
    // Under a route without a credential: upstream URL, no token.
    assert_eq!(
        ops[1]["url"],
        format!("{base}/open/Layer/MapServer").as_str()
    );
    assert!(ops[1].get("token").is_none());
    // Outside every route: untouched.
    assert_eq!(
        ops[2]["url"],
        "https://elsewhere.example.com/arcgis/rest/services/X/MapServer"
    );
    assert!(ops[2].get("token").is_none());
    // Nested, and with its own query.
    assert_eq!(
        ops[3]["layers"][0]["url"],
        format!("{base}/svc/Trails/FeatureServer/2?f=json").as_str()
    );
    assert_eq!(ops[3]["layers"][0]["token"], token.as_str());
    // Already an upstream URL under a route: gets its token.
    assert_eq!(
        ops[4]["url"],
        format!("{base}/svc/Direct/MapServer").as_str()
    );
    assert_eq!(ops[4]["token"], token.as_str());
    let vt = &map["baseMap"]["baseMapLayers"][0];
    assert_eq!(
        vt["styleUrl"],
        format!("{base}/svc/styles/v2/styles/arcgis/navigation").as_str()
    );
    // Other parameters survive.
    assert!(map["mapOptions"].is_object());
}

#[tokio::test]
async fn a_print_request_gets_upstream_urls_and_tokens_in_its_web_map() {
    let pki = Pki::new();
    let fake = FakeArcGis::start().await;
    let proxy = TestProxy::start(&pki, &config(&fake)).await;
    let client = TestClient::new(&pki, proxy.addr);
    let form = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("Web_Map_as_JSON", &web_map(&fake).to_string())
        .append_pair("Format", "PDF")
        .append_pair("f", "json")
        .finish();
    let a = post_form(
        &client,
        "/svc/print/Export%20Web%20Map%20Task/execute",
        form,
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text());
    check(&fake, &received(&fake, false));
    for t in fake.issued() {
        assert!(!a.text().contains(&t), "a token reached the client");
    }

    // The same map in the query of a GET.
    let query = url::form_urlencoded::Serializer::new(String::new())
        .append_pair("Web_Map_as_JSON", &web_map(&fake).to_string())
        .append_pair("f", "json")
        .finish();
    let a = client
        .get(&format!(
            "/svc/print/Export%20Web%20Map%20Task/execute?{query}"
        ))
        .await;
    assert_eq!(a.status, 200, "{}", a.text());
    check(&fake, &received(&fake, true));
    proxy.stop().await;
}

/// A hostile map (not JSON, deeply nested, huge) is passed on or refused,
/// never a crash.
#[tokio::test]
async fn hostile_web_maps_do_not_break_the_proxy() {
    let pki = Pki::new();
    let fake = FakeArcGis::start().await;
    let proxy = TestProxy::start(&pki, &config(&fake)).await;
    let client = TestClient::new(&pki, proxy.addr);
    let mut deep = serde_json::json!({"url": format!("{PUBLIC}/svc/deep")});
    for _ in 0..40 {
        deep = serde_json::json!({"layers": [deep]});
    }
    for map in [
        "not json".to_string(),
        serde_json::json!({"operationalLayers": [deep]}).to_string(),
        serde_json::json!({"operationalLayers": "x", "baseMap": 5}).to_string(),
    ] {
        let form = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("web_map_as_json", &map)
            .finish();
        let a = post_form(&client, "/svc/print/x/execute", form).await;
        assert_eq!(a.status, 200, "{}", a.text());
    }
    proxy.stop().await;
}
