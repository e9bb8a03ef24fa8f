//! Maps drawn in headless Chromium (WebGL on SwiftShader) by the clients
//! public apps use, through the demo proxy, as the README tells apps to
//! call it:
//!
//! - ArcGIS Maps SDK for JavaScript 5.x (`@arcgis/core`, pinned in
//!   tests/browser/package.json, bundled offline with esbuild, assets served
//!   locally): a FeatureLayer through a proxy rule (`urlUtils.addProxyRule`,
//!   workers included) over a Basemap Styles basemap (`VectorTileLayer`)
//!   from a mounted route;
//! - MapLibre GL JS: the same style, its sprite, glyphs and tiles following
//!   the URLs the proxy rewrote into it.
//!
//! Checked from Chromium's NetLog (every request of the page and its
//! workers, headers and bytes read): no request went to the upstream
//! directly, no URL, header or body held a token; from the proxy's access
//! log: every proxied request was answered 200. Each test also runs the
//! page without the proxy rule or from an origin outside the allowlist and
//! sees the map fail, so the checks are shown to bite.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::*;

/// Where the browser pages and their npm packages live.
fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

/// Whether Chromium, Node and the pinned packages are there; .ci/run
/// installs all three.
fn ready() -> bool {
    let node = Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let ok = node
        && Path::new("/usr/bin/chromium").exists()
        && browser_dir().join("node_modules/@arcgis/core").exists()
        && browser_dir().join("node_modules/maplibre-gl").exists();
    if !ok {
        eprintln!(
            "SKIPPED: needs chromium, node and `npm ci` in tests/browser (.ci/run does both)"
        );
    }
    ok
}

/// The demo (proxy plus fake ArcGIS) and the two addresses pages need.
struct Demo {
    proc: Proc,
    /// The proxy's cleartext listener, e.g. `http://127.0.0.1:1234`.
    proxy: String,
    /// The fake ArcGIS, e.g. `http://127.0.0.1:5678`.
    upstream: String,
}

fn demo() -> Demo {
    let mut proc = Proc::demo(&[]);
    let proxy = proc.demo_url("cleartext listener used by the page");
    let upstream = proc.demo_url("fake ArcGIS (token endpoint");
    Demo {
        proc,
        proxy,
        upstream,
    }
}

/// What one page load did.
struct Drawn {
    /// What the page reported (`window.__result`), or null.
    page: serde_json::Value,
    /// The driver's whole report (console, failed requests, error).
    report: serde_json::Value,
    /// URLs the browser requested (page and workers).
    urls: Vec<String>,
    /// Everything the browser sent and read: URLs, headers, and body bytes
    /// (decoded), as one text.
    seen: String,
    /// The same for the requests to the proxy only (the libraries' own
    /// source code, served by the page's site, mentions `token=`).
    seen_proxied: String,
}

/// Loads `page` (`sdk` or `maplibre`) from `http://<host>:<port>/` with
/// `query`, through the demo's proxy, in headless Chromium.
fn draw(demo: &Demo, page: &str, query: &str, host: &str) -> Drawn {
    let work = tempfile::tempdir().unwrap();
    let netlog = work.path().join("netlog.json");
    let out = Command::new("node")
        .arg(browser_dir().join("run.mjs"))
        .args(["--page", page, "--proxy", &demo.proxy, "--query", query])
        .args(["--host", host, "--timeout", "90000"])
        .arg("--netlog")
        .arg(&netlog)
        .output()
        .expect("run node");
    assert!(
        out.status.success(),
        "driver failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    let log = NetLog::read(&netlog);
    Drawn {
        page: report["page"].clone(),
        report,
        urls: log.urls(),
        seen: log.everything(None),
        seen_proxied: log.everything(Some(&demo.proxy)),
    }
}

/// The checks every successful load passes: requests went to the proxy,
/// none around it to the upstream, and no token was anywhere.
fn assert_through_the_proxy_only(demo: &Demo, d: &Drawn) {
    assert!(
        d.urls.iter().any(|u| u.starts_with(&demo.proxy)),
        "no request reached the proxy: {:?}",
        d.urls
    );
    let direct: Vec<&String> = d
        .urls
        .iter()
        .filter(|u| u.starts_with(&demo.upstream))
        .collect();
    assert!(
        direct.is_empty(),
        "requests went to the upstream directly: {direct:?}"
    );
    // The NetLog really holds what was read (else the token check is void).
    assert!(
        d.seen_proxied.contains("\"version\":8"),
        "NetLog holds no response bodies"
    );
    assert!(
        !d.seen.contains("demo-token-"),
        "a token reached the browser"
    );
    let lower = d.seen_proxied.to_ascii_lowercase();
    for needle in ["token=", "\"token\"", "x-esri-authorization"] {
        assert!(!lower.contains(needle), "{needle} reached the browser");
    }
}

/// Every access line of the demo's proxy for `kinds` of path says 200, and
/// there is at least one of each.
fn assert_all_answered_200(logs: &str, kinds: &[&str]) {
    for kind in kinds {
        let lines: Vec<&str> = logs
            .lines()
            .filter(|l| l.contains("access") && l.contains(&format!("path={kind}")))
            .collect();
        assert!(
            !lines.is_empty(),
            "no {kind} request through the proxy:\n{logs}"
        );
        for l in lines {
            assert!(l.contains(" status=200 "), "{l}");
        }
    }
}

fn close(pixel: &serde_json::Value, want: [i64; 4]) -> bool {
    let got: Vec<i64> = pixel
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_i64()).collect())
        .unwrap_or_default();
    got.len() == 4 && got.iter().zip(want).all(|(g, w)| (g - w).abs() <= 4)
}

#[test]
fn js_sdk_draws_a_feature_layer_through_a_proxy_rule_over_a_styles_basemap() {
    if !ready() {
        return;
    }
    let d = demo();
    let services = format!("services={}/arcgis/rest/services", d.upstream);
    let ok = draw(&d, "sdk", &format!("{services}&basemap=1"), "localhost");
    let page = &ok.page;
    assert_eq!(page["drawn"], 6, "{:#}", ok.report);
    assert_eq!(page["loadStatus"], "loaded");
    assert_eq!(page["basemap"]["loadStatus"], "loaded", "{:#}", ok.report);
    assert_eq!(page["basemap"]["sr"], 102100);
    // The style's `land` fill (#2a9d8f at 25 %) drawn by the SDK from the
    // vector tiles, away from the parks.
    assert!(
        close(&page["cornerPixel"], [42, 157, 143, 64]),
        "{:#}",
        ok.report
    );
    assert_through_the_proxy_only(&d, &ok);
    // The feature queries came through the `/proxy?` form: the proxy rule.
    assert!(
        ok.urls.iter().any(|u| u.starts_with(&format!(
            "{}/proxy?{}/arcgis/rest/services/Parks/FeatureServer/0/query?",
            d.proxy, d.upstream
        ))),
        "{:?}",
        ok.urls
    );
    let (code, logs) = d.proc.terminate();
    assert_eq!(code, 0);
    assert_all_answered_200(&logs, &["/proxy", "/basemaps/styles/", "/basemaps/tiles/"]);

    // Without the proxy rule the SDK goes straight to the service, which
    // wants a token the page does not have: nothing is drawn.
    let d = demo();
    let services = format!("services={}/arcgis/rest/services", d.upstream);
    let no_rule = draw(&d, "sdk", &format!("{services}&rule=0"), "localhost");
    assert!(no_rule.page["drawn"].is_null(), "{:#}", no_rule.report);
    assert!(no_rule.urls.iter().any(|u| u.starts_with(&d.upstream)));
    // From a site outside the allowlist the proxy refuses the page.
    let foreign = draw(&d, "sdk", &services, "maps.evil.example");
    assert!(foreign.page["drawn"].is_null(), "{:#}", foreign.report);
    let (_, logs) = d.proc.terminate();
    assert!(
        logs.lines()
            .any(|l| l.contains("access") && l.contains(" status=403 ")),
        "{logs}"
    );
}

#[test]
fn maplibre_draws_a_styles_basemap_from_a_mounted_route() {
    if !ready() {
        return;
    }
    let d = demo();
    let ok = draw(&d, "maplibre", "", "localhost");
    let page = &ok.page;
    assert_eq!(page["errors"], serde_json::json!([]), "{:#}", ok.report);
    assert_eq!(page["tilesLoaded"], true, "{:#}", ok.report);
    assert!(
        page["rendered"]["land"].as_u64().unwrap_or(0) >= 1,
        "{:#}",
        ok.report
    );
    assert!(
        page["rendered"]["places"].as_u64().unwrap_or(0) >= 1,
        "{:#}",
        ok.report
    );
    assert_eq!(page["sprite"], true);
    // The raster tile (#f2f5f8) under the land fill (#2a9d8f at 25 %).
    assert!(
        close(&page["pixel"], [192, 223, 222, 255]),
        "{:#}",
        ok.report
    );
    assert_through_the_proxy_only(&d, &ok);
    for kind in [
        "/basemaps/tiles/",
        "/basemaps/tiles-raster/",
        "/sprite.json",
        "/sprite.png",
        "/basemaps/fonts/",
    ] {
        assert!(
            ok.urls
                .iter()
                .any(|u| u.starts_with(&d.proxy) && u.contains(kind)),
            "no {kind} request through the proxy: {:?}",
            ok.urls
        );
    }
    let (code, logs) = d.proc.terminate();
    assert_eq!(code, 0);
    assert_all_answered_200(
        &logs,
        &[
            "/basemaps/styles/",
            "/basemaps/tiles/",
            "/basemaps/tiles-raster/",
            "/basemaps/fonts/",
        ],
    );

    // From a site outside the allowlist: the style is refused, nothing drawn.
    let d = demo();
    let foreign = draw(&d, "maplibre", "", "maps.evil.example");
    assert!(
        foreign.page["rendered"]
            .as_object()
            .is_none_or(|r| r.is_empty()),
        "{:#}",
        foreign.report
    );
    let (_, logs) = d.proc.terminate();
    assert!(
        logs.lines()
            .any(|l| l.contains("access") && l.contains(" status=403 ")),
        "{logs}"
    );
}
