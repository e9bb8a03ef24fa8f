//! Target-URL parsing, normalisation and route matching: a target that is
//! accepted must lie under the upstream of the route that serves it.
#![no_main]
use arcgis_app_proxy::policy::path::{normalise_path, parse_target};
use arcgis_app_proxy::policy::route::{Route, RouteTable, TokenIn};
use libfuzzer_sys::fuzz_target;

fn table() -> RouteTable {
    let r = |u: &str, m: Option<&str>| {
        Route::new(u.into(), url::Url::parse(u).unwrap(), None, m.map(String::from), TokenIn::Header, false, None)
    };
    RouteTable::new(vec![
        r("https://services.arcgis.com/org/arcgis/rest/services", Some("/features")),
        r("https://basemapstyles-api.arcgis.com/arcgis/rest/services/styles/v2", Some("/basemaps")),
        r("http://127.0.0.1:8080/x", None),
    ])
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let t = table();
    if let Ok(url) = parse_target(s) {
        if let Some(route) = t.by_url(&url) {
            assert_eq!(url.origin().ascii_serialization(), route.origin());
            let base = route.upstream.path().trim_end_matches('/');
            assert!(url.path() == base || url.path().starts_with(&format!("{base}/")), "{s:?} → {url}");
            assert!(!url.path().split('/').any(|seg| seg == ".." || seg == "."));
        }
    }
    if let Ok(path) = normalise_path(s) {
        if let Some((route, rest)) = t.by_mount(&path) {
            let up = route.upstream_path(rest);
            let base = route.upstream.path().trim_end_matches('/');
            assert!(up == base || up.starts_with(&format!("{base}/")), "{s:?} → {up}");
            assert!(!up.split('/').any(|seg| seg == ".." || seg == "."));
        }
    }
});
