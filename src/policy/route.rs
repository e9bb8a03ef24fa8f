//! The route table: which upstream a request may reach, and how.
//!
//! Built once at config load. A mounted path is looked up by its longest
//! mount on a segment boundary; a proxy-form target by its scheme, host and
//! port and the longest upstream path prefix on a segment boundary. Both
//! lookups take already-normalised input (see [`super::path`]).

use std::time::Duration;

use serde::Deserialize;
use url::Url;

use super::referer::path_under;

/// Where a route puts the token.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenIn {
    /// `X-Esri-Authorization: Bearer <t>`.
    #[default]
    Header,
    /// `token=<t>` query parameter.
    Query,
}

/// One `[[routes]]` entry, compiled.
#[derive(Debug, Clone)]
pub struct Route {
    /// Label for logs and metrics.
    pub name: String,
    /// The upstream base URL as configured (normalised).
    pub upstream: Url,
    /// Credential name, if the route injects a token.
    pub credential: Option<String>,
    /// Mount path (no trailing slash; `/` for the root).
    pub mount: Option<String>,
    /// Token placement.
    pub token_in: TokenIn,
    /// Rewrite absolute upstream URLs in bodies.
    pub rewrite_urls: bool,
    /// Per-client bucket: requests per period.
    pub rate_limit: Option<(u32, Duration)>,
    /// The apps (by index) allowed on this route; `None`: every app.
    pub apps: Option<Vec<usize>>,
    /// Position in the route table (config order).
    pub index: usize,
    /// `scheme://host[:port]`, default port omitted.
    origin: String,
    /// `host[:port]` for the upstream `Host` header, built once (hyper's
    /// client would otherwise format it for every request).
    host: http::HeaderValue,
    /// Upstream path without trailing slash; empty for the root.
    base_path: String,
}

impl Route {
    /// Compiles a route from validated parts.
    pub fn new(
        name: String,
        upstream: Url,
        credential: Option<String>,
        mount: Option<String>,
        token_in: TokenIn,
        rewrite_urls: bool,
        rate_limit: Option<(u32, Duration)>,
    ) -> Route {
        let origin = upstream.origin().ascii_serialization();
        let host = http::HeaderValue::from_str(
            &upstream[url::Position::BeforeHost..url::Position::AfterPort],
        )
        .expect("a parsed URL's host and port are a valid header value");
        let base_path = upstream.path().trim_end_matches('/').to_string();
        Route {
            name,
            upstream,
            credential,
            mount,
            token_in,
            rewrite_urls,
            rate_limit,
            apps: None,
            index: 0,
            origin,
            host,
            base_path,
        }
    }

    /// A route for tests: named after its upstream, header token, no rate
    /// limit or rewriting.
    #[cfg(test)]
    pub(crate) fn for_test(upstream: &str, mount: Option<&str>) -> Route {
        Route::new(
            upstream.into(),
            Url::parse(upstream).unwrap(),
            None,
            mount.map(String::from),
            TokenIn::Header,
            false,
            None,
        )
    }

    /// The upstream `Host` header value (`host[:port]`, default port omitted).
    pub fn host(&self) -> &http::HeaderValue {
        &self.host
    }

    /// `scheme://host[:port]` of the upstream.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The upstream URL for a path relative to the mount (`""` or `/…`).
    pub fn upstream_path(&self, rest: &str) -> String {
        let mut out = String::with_capacity(self.base_path.len() + rest.len() + 1);
        self.push_upstream_path(rest, &mut out);
        out
    }

    /// [`Route::upstream_path`] appended to `out`.
    pub fn push_upstream_path(&self, rest: &str, out: &mut String) {
        let start = out.len();
        out.push_str(&self.base_path);
        out.push_str(rest);
        if out.len() == start {
            out.push('/');
        }
    }

    /// True when a normalised URL, whose origin is `origin`, lies under this
    /// route's upstream.
    fn covers(&self, origin: &str, url: &Url) -> bool {
        origin == self.origin
            && (self.base_path.is_empty() || path_under(url.path(), &self.base_path))
    }

    /// For a URL under this route, the path after the upstream base.
    pub fn rest_of<'u>(&self, url: &'u Url) -> &'u str {
        &url.path()[self.base_path.len()..]
    }
}

/// All routes, with mounts sorted for longest-prefix lookup.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    routes: Vec<Route>,
    /// Indexes of mounted routes, longest mount first.
    by_mount: Vec<usize>,
}

impl RouteTable {
    /// Builds the table.
    pub fn new(mut routes: Vec<Route>) -> RouteTable {
        for (i, r) in routes.iter_mut().enumerate() {
            r.index = i;
        }
        let mut by_mount: Vec<usize> = (0..routes.len())
            .filter(|&i| routes[i].mount.is_some())
            .collect();
        by_mount
            .sort_by_key(|&i| std::cmp::Reverse(routes[i].mount.as_ref().map_or(0, String::len)));
        RouteTable { routes, by_mount }
    }

    /// Number of routes.
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    /// True when there are no routes.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// All routes in config order.
    pub fn iter(&self) -> impl Iterator<Item = &Route> {
        self.routes.iter()
    }

    /// The route mounted at the longest prefix of a normalised path, and the
    /// rest of the path after the mount (`""` or starting with `/`).
    pub fn by_mount<'p>(&self, path: &'p str) -> Option<(&Route, &'p str)> {
        self.by_mount.iter().find_map(|&i| {
            let route = &self.routes[i];
            let mount = route.mount.as_deref()?;
            if mount == "/" {
                return Some((route, path));
            }
            let rest = path.strip_prefix(mount)?;
            (rest.is_empty() || rest.starts_with('/')).then_some((route, rest))
        })
    }

    /// The route whose upstream covers a normalised URL: the longest
    /// upstream prefix wins, and among equals the first in config order.
    pub fn by_url(&self, url: &Url) -> Option<&Route> {
        let origin = url.origin().ascii_serialization();
        let mut best: Option<&Route> = None;
        for r in self.routes.iter().filter(|r| r.covers(&origin, url)) {
            if best.is_none_or(|b| r.base_path.len() > b.base_path.len()) {
                best = Some(r);
            }
        }
        best
    }

    /// Like [`RouteTable::by_url`], but `preferred` wins when it covers the
    /// URL (a redirect stays on the route the client came through).
    pub fn by_url_preferring<'a>(&'a self, url: &Url, preferred: &'a Route) -> Option<&'a Route> {
        let origin = url.origin().ascii_serialization();
        if preferred.covers(&origin, url) {
            return Some(preferred);
        }
        self.by_url(url)
    }
}

/// True when an upstream URL path is a Basemap Styles service request
/// (`…/rest/services/styles/…`), whatever route it took: such requests get
/// `echoToken=false`, so the service does not write the token into the
/// sprite, glyph and tile URLs of its styles. Matched without regard to
/// ASCII case and after percent-decoding, as ArcGIS servers match paths.
pub fn is_basemap_styles(path: &str) -> bool {
    const MARK: &[u8] = b"/rest/services/styles";
    let decoded;
    let bytes = if memchr::memchr(b'%', path.as_bytes()).is_some() {
        decoded = percent_encoding::percent_decode_str(path).collect::<Vec<u8>>();
        &decoded[..]
    } else {
        path.as_bytes()
    };
    // Every request asks this, so look only around each `y`, a letter rare
    // in service paths: one vectorised search instead of a compare per
    // segment.
    let y_at = MARK.len() - 4;
    memchr::memchr2_iter(b'y', b'Y', bytes).any(|j| {
        j >= y_at
            && bytes
                .get(j - y_at..j - y_at + MARK.len())
                .is_some_and(|w| w.eq_ignore_ascii_case(MARK))
            && matches!(bytes.get(j - y_at + MARK.len()), None | Some(b'/'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(upstream: &str, mount: Option<&str>) -> Route {
        Route::for_test(upstream, mount)
    }

    fn table() -> RouteTable {
        RouteTable::new(vec![
            route(
                "https://services.arcgis.com/org/arcgis/rest/services",
                Some("/features"),
            ),
            route(
                "https://services.arcgis.com/org/arcgis/rest/services/Special",
                None,
            ),
            route(
                "https://basemapstyles-api.arcgis.com/arcgis/rest/services/styles/v2",
                Some("/basemaps"),
            ),
            route("https://geocode-api.arcgis.com/", Some("/geocode/v1")),
            route("https://geocode-api.arcgis.com:8443/x", Some("/geocode")),
        ])
    }

    #[test]
    fn mounts_match_longest_prefix_on_segment_boundary() {
        let t = table();
        let cases: &[(&str, Option<(&str, &str)>)] = &[
            (
                "/features/Parks/FeatureServer/0",
                Some(("/features", "/Parks/FeatureServer/0")),
            ),
            ("/features", Some(("/features", ""))),
            ("/features/", Some(("/features", "/"))),
            ("/featuresx/a", None),
            ("/geocode/v1/find", Some(("/geocode/v1", "/find"))),
            ("/geocode/v2/find", Some(("/geocode", "/v2/find"))),
            ("/other", None),
        ];
        for (path, expected) in cases {
            let got = t
                .by_mount(path)
                .map(|(r, rest)| (r.mount.as_deref().unwrap(), rest));
            assert_eq!(got, *expected, "{path}");
        }
    }

    #[test]
    fn urls_match_origin_and_path_prefix() {
        let t = table();
        let cases: &[(&str, Option<&str>)] = &[
            (
                "https://services.arcgis.com/org/arcgis/rest/services/A/FeatureServer",
                Some("https://services.arcgis.com/org/arcgis/rest/services"),
            ),
            (
                "https://services.arcgis.com/org/arcgis/rest/services/Special/x",
                Some("https://services.arcgis.com/org/arcgis/rest/services/Special"),
            ),
            (
                "https://services.arcgis.com/org/arcgis/rest/services",
                Some("https://services.arcgis.com/org/arcgis/rest/services"),
            ),
            (
                "https://services.arcgis.com/org/arcgis/rest/servicesX/a",
                None,
            ),
            ("https://services.arcgis.com/org/arcgis/rest/", None),
            (
                "http://services.arcgis.com/org/arcgis/rest/services/A",
                None,
            ),
            (
                "https://services.arcgis.com:444/org/arcgis/rest/services/A",
                None,
            ),
            (
                "https://services.arcgis.com.evil.com/org/arcgis/rest/services/A",
                None,
            ),
            (
                "https://geocode-api.arcgis.com/anything",
                Some("https://geocode-api.arcgis.com/"),
            ),
            (
                "https://geocode-api.arcgis.com:8443/x/y",
                Some("https://geocode-api.arcgis.com:8443/x"),
            ),
            ("https://geocode-api.arcgis.com:8443/y", None),
        ];
        for (url, expected) in cases {
            let got = t.by_url(&Url::parse(url).unwrap()).map(|r| r.name.as_str());
            assert_eq!(got, *expected, "{url}");
        }
    }

    #[test]
    fn upstream_paths_join_without_escaping() {
        let t = table();
        let (r, rest) = t.by_mount("/basemaps/styles/arcgis/navigation").unwrap();
        assert_eq!(
            r.upstream_path(rest),
            "/arcgis/rest/services/styles/v2/styles/arcgis/navigation"
        );
        let (r, rest) = t.by_mount("/geocode/v1").unwrap();
        assert_eq!(r.upstream_path(rest), "/");
    }

    fn segment() -> impl proptest::strategy::Strategy<Value = &'static str> {
        proptest::sample::select(vec![
            "..",
            ".",
            "%2e%2e",
            "%2E.",
            ".%2e",
            "%2e",
            "a",
            "services",
            "Special",
            "",
            "%2f",
            "%2F",
            "\\",
            ";x=1",
            "%00",
            "%252e%252e",
            "x%20y",
            "..;",
            "%5c",
            "@",
        ])
    }

    proptest::proptest! {
        // Invariant: a proxy-form target either is rejected or, once
        // normalised, lies under the upstream of the route that serves it.
        #[test]
        fn targets_are_under_their_route_or_rejected(
            segs in proptest::collection::vec(segment(), 0..8),
            host in proptest::sample::select(vec![
                "services.arcgis.com", "SERVICES.ArcGIS.com", "services.arcgis.com.",
                "services.arcgis.com:443", "services.arcgis.com:444", "evil.com",
                "services.arcgis.com@evil.com", "evil.com#@services.arcgis.com",
            ]),
            scheme in proptest::sample::select(vec!["https", "http", "HTTPS", "ftp"]),
            prefix in proptest::sample::select(vec!["/org/arcgis/rest/services/", "/org/arcgis/rest/", "/"]),
        ) {
            let t = table();
            let raw = format!("{scheme}://{host}{prefix}{}", segs.join("/"));
            if let Ok(url) = crate::policy::path::parse_target(&raw)
                && let Some(route) = t.by_url(&url)
            {
                proptest::prop_assert_eq!(url.origin().ascii_serialization(), route.origin());
                let base = route.upstream.path().trim_end_matches('/');
                proptest::prop_assert!(
                    base.is_empty() || url.path() == base || url.path().starts_with(&format!("{base}/")),
                    "{} escaped {}", url, route.upstream
                );
                proptest::prop_assert!(!url.path().split('/').any(|s| s == ".." || s == "."));
            }
        }

        // Invariant: a mounted path either is rejected or reaches an upstream
        // path under its route's upstream, without dot segments.
        #[test]
        fn mounted_paths_are_under_their_route_or_rejected(
            segs in proptest::collection::vec(segment(), 0..8),
            mount in proptest::sample::select(vec!["/features", "/basemaps", "/geocode/v1", "/geocode", ""]),
        ) {
            let t = table();
            let raw = format!("{mount}/{}", segs.join("/"));
            if let Ok(path) = crate::policy::path::normalise_path(&raw)
                && let Some((route, rest)) = t.by_mount(&path)
            {
                let up = route.upstream_path(rest);
                let base = route.upstream.path().trim_end_matches('/');
                proptest::prop_assert!(
                    base.is_empty() || up == base || up.starts_with(&format!("{base}/")),
                    "{raw} → {up} escaped {}", route.upstream
                );
                proptest::prop_assert!(!up.split('/').any(|s| s == ".." || s == "."), "{raw} → {up}");
                proptest::prop_assert!(!up.to_ascii_lowercase().contains("%2f"));
            }
        }
    }

    #[test]
    fn basemap_styles_are_recognised_by_the_request_path() {
        for (path, styles) in [
            (
                "/arcgis/rest/services/styles/v2/styles/arcgis/navigation",
                true,
            ),
            ("/arcgis/rest/services/styles", true),
            ("/arcgis/rest/services/styles/", true),
            ("/ARCGIS/REST/Services/Styles/v2/x", true),
            ("/arcgis/rest/services/%73tyles/v2/x", true),
            ("/arcgis/rest/services%2Fstyles/v2/x", true),
            ("/arcgis/rest/services/stylesheet/x", false),
            ("/arcgis/rest/services/World/MapServer", false),
            ("/styles/v2", false),
            ("/", false),
        ] {
            assert_eq!(is_basemap_styles(path), styles, "{path}");
        }
    }
}
