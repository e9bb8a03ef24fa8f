//! The demo map in a real browser: headless Chromium (Debian's `chromium`,
//! installed by .ci/run) loads the demo page, which draws the fake
//! FeatureServer's parks through the proxy with Leaflet + esri-leaflet.
//! Checked: the features are drawn, no response the browser received holds a
//! token (Chromium's NetLog with response bytes), and no request failed.

use std::path::Path;
use std::process::Command;

use crate::support::*;

const CHROMIUM: &str = "/usr/bin/chromium";

#[test]
fn demo_map_draws_features_and_the_browser_never_sees_a_token() {
    if !Path::new(CHROMIUM).exists() {
        // .ci/run installs Chromium; a developer machine may not have it.
        eprintln!("SKIPPED: {CHROMIUM} not installed (apt-get install chromium)");
        return;
    }
    let mut demo = Proc::demo(&[]);
    let page = demo.demo_url("map page");
    let work = tempfile::tempdir().unwrap();
    let netlog = work.path().join("netlog.json");
    // Headless Chromium dumps the DOM when its virtual-time budget runs out;
    // on a loaded machine the feature request can still be in flight then,
    // so a run that has not drawn yet is repeated (a real failure fails all).
    let mut dom = String::new();
    for attempt in 0..3 {
        let _ = std::fs::remove_file(&netlog);
        let out = Command::new(CHROMIUM)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--virtual-time-budget=20000",
                "--net-log-capture-mode=Everything",
            ])
            .arg(format!(
                "--user-data-dir={}",
                work.path().join(format!("profile{attempt}")).display()
            ))
            .arg(format!("--log-net-log={}", netlog.display()))
            .arg("--dump-dom")
            .arg(&page)
            .output()
            .expect("run chromium");
        dom = String::from_utf8_lossy(&out.stdout).into_owned();
        if dom.contains("data-features=") && dom.contains("data-tiles=") {
            break;
        }
    }
    assert!(
        dom.contains(r#"data-features="6""#),
        "features not drawn; DOM:\n{dom}"
    );
    assert!(
        dom.contains("6 parks drawn through arcgis-app-proxy"),
        "{dom}"
    );
    // The basemap under them: tiles loaded through the proxy from a style
    // the service was asked for with echoToken=false.
    let tiles: u32 = dom
        .split(r#"data-tiles=""#)
        .nth(1)
        .and_then(|r| r.split('"').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no basemap tile loaded; DOM:\n{dom}"));
    assert!(tiles >= 4, "{tiles} tiles");
    assert!(dom.contains(r#"data-echo-token="false""#), "{dom}");

    // Every response body byte the browser read, from the NetLog.
    let log = NetLog::read(&netlog);
    let proxy = demo.demo_url("cleartext listener used by the page");
    // The bytes of requests to the proxy only (the page's own files,
    // esri-leaflet's source among them, may mention "token=" legitimately).
    assert!(
        log.urls().iter().any(|u| u.starts_with(&proxy)),
        "no request to the proxy in the NetLog"
    );
    let text = log.bytes_to(&proxy);
    // The check must have seen the answers it is about.
    assert!(
        text.contains("Griffith Park"),
        "NetLog holds no response bodies"
    );
    assert!(!text.contains("demo-token-"), "a token reached the browser");
    assert!(
        !text.to_ascii_lowercase().contains("token="),
        "a token parameter reached the browser"
    );

    // The style's answer as the browser read it: tile URLs point at the
    // proxy, not the upstream.
    assert!(
        text.contains(&format!(
            "{proxy}/basemaps/tiles-raster/{{z}}/{{y}}/{{x}}.png"
        )),
        "style tile URLs not rewritten to the proxy"
    );
    let urls = log.urls();
    let tile_requests = urls
        .iter()
        .filter(|u| u.contains("/tiles-raster/"))
        .collect::<Vec<_>>();
    assert!(!tile_requests.is_empty());
    for u in &tile_requests {
        assert!(u.starts_with(&proxy), "a tile went around the proxy: {u}");
    }

    let (code, logs) = demo.terminate();
    assert_eq!(code, 0);
    // No request failed: every access line of the page's proxy calls is 200.
    for kind in ["/features/", "/basemaps/"] {
        let access: Vec<&str> = logs
            .lines()
            .filter(|l| l.contains("access") && l.contains(kind))
            .collect();
        assert!(
            !access.is_empty(),
            "the page made no {kind} proxy request:\n{logs}"
        );
        for line in access {
            assert!(line.contains("status=200"), "{line}");
        }
    }
}
