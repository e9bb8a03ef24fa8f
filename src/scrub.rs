//! Keeping the token out of what goes back to the client: response headers
//! and redirect targets.
//!
//! URL-bearing headers (`Location`, `Content-Location`) are resolved against
//! the upstream URL, lose any `token` parameter, and — when they point under a
//! route — become proxy URLs (the route's mount, or `proxy_path?<url>`). Every
//! other header is searched for the token in clear and percent-encoded form;
//! a `token=` parameter is removed with its separator, any other occurrence is
//! replaced.

use http::HeaderValue;
use http::header::{self, HeaderMap};
use url::Url;

use crate::policy::path::strip_params;
use crate::policy::route::{Route, RouteTable};

/// How to write proxy URLs for one request.
pub struct UrlRewriter<'a> {
    /// `scheme://host[:port]` the client used (or `public_url`).
    pub public_base: &'a str,
    /// The Esri proxy endpoint path.
    pub proxy_path: &'a str,
    /// Routes, to decide which upstream URLs the proxy serves.
    pub routes: &'a RouteTable,
    /// The upstream URL of this request, for resolving relative references.
    pub upstream_url: &'a Url,
    /// The route this request came through, preferred when it covers a URL.
    pub route: Option<&'a Route>,
}

impl UrlRewriter<'_> {
    /// The proxy URL for an absolute upstream URL, or the URL itself (minus
    /// any token) when no route covers it.
    pub fn rewrite(&self, reference: &str) -> Option<String> {
        let mut url = self.upstream_url.join(reference).ok()?;
        if let Some(q) = url.query() {
            let stripped = strip_params(q, &["token"]).into_owned();
            url.set_query((!stripped.is_empty()).then_some(stripped.as_str()));
        }
        let found = match self.route {
            Some(r) => self.routes.by_url_preferring(&url, r),
            None => self.routes.by_url(&url),
        };
        let Some(route) = found else {
            return Some(url.to_string());
        };
        let mut out = String::with_capacity(self.public_base.len() + url.as_str().len() + 16);
        out.push_str(self.public_base);
        match &route.mount {
            Some(mount) => {
                if mount != "/" {
                    out.push_str(mount);
                }
                let rest = route.rest_of(&url);
                if rest.is_empty() && mount == "/" {
                    out.push('/');
                }
                out.push_str(rest);
                if let Some(q) = url.query() {
                    out.push('?');
                    out.push_str(q);
                }
                if let Some(f) = url.fragment() {
                    out.push('#');
                    out.push_str(f);
                }
            }
            None => {
                out.push_str(self.proxy_path);
                out.push('?');
                out.push_str(url.as_str());
            }
        }
        Some(out)
    }
}

/// Rewrites URL headers and removes the token from every response header.
pub fn scrub_headers(headers: &mut HeaderMap, rewriter: &UrlRewriter<'_>, secrets: &[&str]) {
    for name in [header::LOCATION, header::CONTENT_LOCATION] {
        if let Some(v) = headers.get(&name) {
            let new = v
                .to_str()
                .ok()
                .and_then(|s| rewriter.rewrite(s))
                .and_then(|s| HeaderValue::from_str(&s).ok());
            match new {
                Some(v) => {
                    headers.insert(name, v);
                }
                None => {
                    headers.remove(name);
                }
            }
        }
    }
    if secrets.is_empty() {
        return;
    }
    let mut changes = Vec::new();
    for (name, value) in headers.iter() {
        let bytes = value.as_bytes();
        if secrets.iter().any(|s| contains(bytes, s.as_bytes())) {
            let cleaned = remove_secrets(&String::from_utf8_lossy(bytes), secrets);
            changes.push((name.clone(), value.clone(), cleaned));
        }
    }
    for (name, old, cleaned) in changes {
        let values: Vec<HeaderValue> = headers
            .get_all(&name)
            .iter()
            .map(|v| {
                if v == old {
                    HeaderValue::from_str(&cleaned).unwrap_or(HeaderValue::from_static(""))
                } else {
                    v.clone()
                }
            })
            .collect();
        headers.remove(&name);
        for v in values {
            headers.append(name.clone(), v);
        }
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// Removes `token=<secret>` parameters with their separator, then any other
/// occurrence of a secret.
pub fn remove_secrets(text: &str, secrets: &[&str]) -> String {
    let mut out = text.to_string();
    for secret in secrets.iter().filter(|s| !s.is_empty()) {
        for sep in ["&", "?", ""] {
            let param = format!("{sep}token={secret}");
            while let Some(i) = out.find(&param) {
                let end = i + param.len();
                // `?token=t&b=1` keeps the `?` and drops the following `&`.
                if sep == "?" && out[end..].starts_with('&') {
                    out.replace_range(i + 1..end + 1, "");
                } else {
                    out.replace_range(i..end, "");
                }
            }
        }
        out = out.replace(secret, "");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::route::TokenIn;

    fn routes() -> RouteTable {
        let r = |u: &str, m: Option<&str>| {
            Route::new(
                u.into(),
                Url::parse(u).unwrap(),
                None,
                m.map(String::from),
                TokenIn::Header,
                false,
                None,
            )
        };
        RouteTable::new(vec![
            r(
                "https://services.example.com/org/rest/services",
                Some("/features"),
            ),
            r("https://tiles.example.com/tiles", None),
        ])
    }

    #[test]
    fn location_rewriting() {
        let t = routes();
        let up =
            Url::parse("https://services.example.com/org/rest/services/A/query?token=T1").unwrap();
        let rw = UrlRewriter {
            public_base: "https://proxy.example",
            proxy_path: "/proxy",
            routes: &t,
            upstream_url: &up,
            route: None,
        };
        let cases = [
            (
                "https://services.example.com/org/rest/services/B?f=json&token=T1",
                "https://proxy.example/features/B?f=json",
            ),
            ("/org/rest/services/C", "https://proxy.example/features/C"),
            ("D?token=T1", "https://proxy.example/features/A/D"),
            (
                "https://tiles.example.com/tiles/1/2/3?token=T1&x=1",
                "https://proxy.example/proxy?https://tiles.example.com/tiles/1/2/3?x=1",
            ),
            (
                "https://elsewhere.example/x?token=T1&y=2",
                "https://elsewhere.example/x?y=2",
            ),
            (
                "https://elsewhere.example/x?token=T1",
                "https://elsewhere.example/x",
            ),
        ];
        for (loc, expected) in cases {
            assert_eq!(rw.rewrite(loc).unwrap(), expected, "{loc}");
        }
    }

    #[test]
    fn secrets_are_removed_from_headers() {
        let t = routes();
        let up = Url::parse("https://services.example.com/org/rest/services/A").unwrap();
        let rw = UrlRewriter {
            public_base: "https://p",
            proxy_path: "/proxy",
            routes: &t,
            upstream_url: &up,
            route: None,
        };
        let mut h = HeaderMap::new();
        h.insert(
            "link",
            HeaderValue::from_static("<https://x.example/a?token=SEKRET&b=1>; rel=next"),
        );
        h.append("x-debug", HeaderValue::from_static("token was SEKRET"));
        h.append("x-debug", HeaderValue::from_static("other"));
        h.insert(
            "location",
            HeaderValue::from_static("https://other.example/p?token=SEKRET"),
        );
        scrub_headers(&mut h, &rw, &["SEKRET"]);
        for v in h.values() {
            assert!(!v.to_str().unwrap().contains("SEKRET"), "{v:?}");
        }
        assert_eq!(h["link"], "<https://x.example/a?b=1>; rel=next");
        assert_eq!(h.get_all("x-debug").iter().count(), 2);
        assert_eq!(h["location"], "https://other.example/p");
    }

    #[test]
    fn remove_secrets_keeps_urls_valid() {
        let s = ["TT"];
        assert_eq!(remove_secrets("a?token=TT&b=1", &s), "a?b=1");
        assert_eq!(remove_secrets("a?b=1&token=TT", &s), "a?b=1");
        assert_eq!(remove_secrets("a?b=1&token=TT&c=2", &s), "a?b=1&c=2");
        assert_eq!(remove_secrets("a?token=TT", &s), "a");
        assert_eq!(remove_secrets("Bearer TT", &s), "Bearer ");
    }
}
