//! The Referer/Origin allowlist, compiled once from `[referers]`.
//!
//! Entries and request values both go through the WHATWG URL parser, so case,
//! IDN (punycode), default ports and IPv4 spellings are compared in one
//! canonical form. Rules (SPEC "Request policy" 2): every present header must
//! match; `*.example.org` covers the apex and any depth of subdomain;
//! `:*` any port; a trailing-dot host is a different host; an entry with a path
//! matches by prefix on a segment boundary; `*` matches any present value.

use http::HeaderValue;
use url::Url;

/// A compiled allowlist.
#[derive(Debug, Clone)]
pub struct RefererPolicy {
    entries: Vec<Entry>,
    allow_missing: bool,
    /// Canonical `scheme://host[:port]` of entries that are a plain origin:
    /// a value equal to one, or continuing it with `/`, matches without a
    /// URL parse (the common case of a browser's own Origin or Referer).
    exact_origins: Vec<String>,
}

#[derive(Debug, Clone)]
enum Entry {
    Any,
    Pattern {
        scheme: String,
        host: HostPattern,
        port: Option<u16>,
        path: Option<String>,
    },
}

#[derive(Debug, Clone)]
enum HostPattern {
    Exact(String),
    /// The apex and every subdomain of it.
    Domain(String),
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RefererError {
    /// Neither header present and `allow_missing` is false.
    #[error("no Referer or Origin")]
    Missing,
    /// A present header matched no entry.
    #[error("Referer or Origin not allowed")]
    NotAllowed,
}

impl RefererPolicy {
    /// Compiles entries; returns every bad entry's index and reason.
    pub fn compile(entries: &[String], allow_missing: bool) -> Result<Self, Vec<(usize, String)>> {
        let mut out = Vec::with_capacity(entries.len());
        let mut errors = Vec::new();
        for (i, e) in entries.iter().enumerate() {
            match Entry::compile(e) {
                Ok(entry) => out.push(entry),
                Err(msg) => errors.push((i, msg)),
            }
        }
        if errors.is_empty() {
            let exact_origins = out
                .iter()
                .filter_map(|e| match e {
                    Entry::Pattern {
                        scheme,
                        host: HostPattern::Exact(h),
                        port: Some(port),
                        path: None,
                    } => {
                        let default = if scheme == "https" { 443 } else { 80 };
                        Some(if *port == default {
                            format!("{scheme}://{h}")
                        } else {
                            format!("{scheme}://{h}:{port}")
                        })
                    }
                    _ => None,
                })
                .collect();
            Ok(RefererPolicy {
                entries: out,
                allow_missing,
                exact_origins,
            })
        } else {
            Err(errors)
        }
    }

    /// A policy that refuses everything (used when compilation failed).
    pub fn deny_all() -> Self {
        RefererPolicy {
            entries: Vec::new(),
            allow_missing: false,
            exact_origins: Vec::new(),
        }
    }

    /// Checks a request's Referer and Origin headers.
    pub fn check(
        &self,
        referer: Option<&HeaderValue>,
        origin: Option<&HeaderValue>,
    ) -> Result<(), RefererError> {
        self.check_all([referer, origin].into_iter().flatten())
    }

    /// Checks every Referer and Origin value a request carries (a repeated
    /// header must match in each copy).
    pub fn check_all<'a>(
        &self,
        values: impl IntoIterator<Item = &'a HeaderValue>,
    ) -> Result<(), RefererError> {
        let mut any = false;
        for value in values {
            any = true;
            if !self.allows(value.as_bytes()) {
                return Err(RefererError::NotAllowed);
            }
        }
        if any || self.allow_missing {
            Ok(())
        } else {
            Err(RefererError::Missing)
        }
    }

    /// True when some entry accepts this header value.
    pub fn allows(&self, value: &[u8]) -> bool {
        let Ok(text) = std::str::from_utf8(value) else {
            return false;
        };
        if text.is_empty() {
            return false;
        }
        if self.entries.iter().any(|e| matches!(e, Entry::Any)) {
            return true;
        }
        // WHATWG parsing silently drops tabs/newlines and trims spaces; a
        // header carrying them is not a URL a browser sent.
        if text.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return false;
        }
        if self.exact_origins.iter().any(|o| {
            text.strip_prefix(o.as_str()).is_some_and(|rest| {
                rest.is_empty() || (rest.starts_with('/') && !rest.contains('\\'))
            })
        }) {
            return true;
        }
        let Ok(url) = Url::parse(text) else {
            return false;
        };
        let Some(host) = url.host_str() else {
            return false;
        };
        self.entries.iter().any(|e| e.matches(&url, host))
    }
}

impl Entry {
    fn compile(raw: &str) -> Result<Entry, String> {
        let raw = raw.trim();
        if raw == "*" {
            return Ok(Entry::Any);
        }
        let (scheme, rest) = raw
            .split_once("://")
            .ok_or_else(|| format!("{raw:?} must look like \"https://app.example.com\""))?;
        let scheme = scheme.to_ascii_lowercase();
        if scheme != "http" && scheme != "https" {
            return Err(format!("{raw:?}: scheme must be http or https"));
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let (authority, any_port) = match authority.strip_suffix(":*") {
            Some(a) => (a, true),
            None => (authority, false),
        };
        let (authority, wildcard) = match authority.strip_prefix("*.") {
            Some(a) => (a, true),
            None => (authority, false),
        };
        if authority.contains('*') || authority.contains('@') {
            return Err(format!(
                "{raw:?}: a wildcard is allowed only as a leading \"*.\" or a \":*\" port"
            ));
        }
        let url = Url::parse(&format!("{scheme}://{authority}{path}"))
            .map_err(|e| format!("{raw:?} is not a valid origin: {e}"))?;
        if url.query().is_some() || url.fragment().is_some() {
            return Err(format!("{raw:?}: must not contain a query or fragment"));
        }
        let host = url
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| format!("{raw:?} has no host"))?
            .to_string();
        let path = match url.path() {
            "/" | "" => None,
            p => Some(p.trim_end_matches('/').to_string()),
        };
        Ok(Entry::Pattern {
            scheme,
            host: if wildcard {
                HostPattern::Domain(host)
            } else {
                HostPattern::Exact(host)
            },
            port: if any_port {
                None
            } else {
                url.port_or_known_default()
            },
            path,
        })
    }

    fn matches(&self, url: &Url, host: &str) -> bool {
        match self {
            Entry::Any => true,
            Entry::Pattern {
                scheme,
                host: pattern,
                port,
                path,
            } => {
                url.scheme() == scheme
                    && pattern.matches(host)
                    && port.is_none_or(|p| url.port_or_known_default() == Some(p))
                    && path.as_deref().is_none_or(|p| path_under(url.path(), p))
            }
        }
    }
}

impl HostPattern {
    fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Exact(h) => host == h,
            HostPattern::Domain(d) => {
                host == d
                    || (host.len() > d.len()
                        && host.ends_with(d.as_str())
                        && host.as_bytes()[host.len() - d.len() - 1] == b'.')
            }
        }
    }
}

/// `path` equals `prefix` or continues it after a `/`.
pub(crate) fn path_under(path: &str, prefix: &str) -> bool {
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/') || prefix.ends_with('/'),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(entries: &[&str]) -> RefererPolicy {
        let owned: Vec<String> = entries.iter().map(|s| s.to_string()).collect();
        RefererPolicy::compile(&owned, false).unwrap()
    }

    #[test]
    fn table() {
        let p = policy(&[
            "https://app.example.com",
            "https://*.example.org",
            "http://localhost:*",
            "https://maps.example.net:8443",
            "https://docs.example.com/viewer",
            "https://bücher.example",
        ]);
        let cases: &[(&str, bool)] = &[
            // exact origin, default port implied, any path
            ("https://app.example.com", true),
            ("https://app.example.com/", true),
            ("https://app.example.com:443/map?x=1", true),
            ("https://APP.Example.COM/x", true),
            ("HTTPS://app.example.com/x", true),
            ("http://app.example.com/", false),
            ("https://app.example.com:444/", false),
            ("https://app.example.com./", false),
            ("https://app.example.com.evil.com/", false),
            ("https://evilapp.example.com/", false),
            ("https://x.app.example.com/", false),
            ("https://app.example.com@evil.com/", false),
            ("https://evil.com/?https://app.example.com", false),
            ("https://evil.com/https://app.example.com", false),
            // wildcard subdomains: apex and any depth
            ("https://example.org/", true),
            ("https://a.example.org/", true),
            ("https://a.b.c.example.org/", true),
            ("https://evilexample.org/", false),
            ("https://example.org.evil.com/", false),
            ("https://a.example.org.evil.com/", false),
            ("https://example.org./", false),
            ("http://a.example.org/", false),
            // port wildcard, default port included
            ("http://localhost/", true),
            ("http://localhost:3000/", true),
            ("http://localhost:65535/x", true),
            ("https://localhost:3000/", false),
            ("http://localhost.evil.com:3000/", false),
            // explicit non-default port
            ("https://maps.example.net:8443/", true),
            ("https://maps.example.net/", false),
            // path prefix on a segment boundary
            ("https://docs.example.com/viewer", true),
            ("https://docs.example.com/viewer/", true),
            ("https://docs.example.com/viewer/a/b", true),
            ("https://docs.example.com/viewerx", false),
            ("https://docs.example.com/", false),
            ("https://docs.example.com/other/../viewer/x", true),
            // IDN: entry and value meet in punycode
            ("https://xn--bcher-kva.example/", true),
            ("https://BÜCHER.example/", true),
            ("https://bucher.example/", false),
            // garbage
            ("null", false),
            ("", false),
            ("app.example.com", false),
            ("https:///", false),
            ("https://app.example.com\t/", false),
            ("javascript://app.example.com/", false),
        ];
        for (value, expected) in cases {
            assert_eq!(
                p.allows(value.as_bytes()),
                *expected,
                "value {value:?} expected {expected}"
            );
        }
    }

    #[test]
    fn every_present_header_must_match() {
        let p = policy(&["https://app.example.com"]);
        let ok = HeaderValue::from_static("https://app.example.com/page");
        let bad = HeaderValue::from_static("https://evil.com");
        assert_eq!(p.check(Some(&ok), None), Ok(()));
        assert_eq!(p.check(None, Some(&ok)), Ok(()));
        assert_eq!(
            p.check(Some(&ok), Some(&bad)),
            Err(RefererError::NotAllowed)
        );
        assert_eq!(
            p.check(Some(&bad), Some(&ok)),
            Err(RefererError::NotAllowed)
        );
        assert_eq!(p.check(None, None), Err(RefererError::Missing));
        let non_utf8 = HeaderValue::from_bytes(b"https://app.example.com/\xff").unwrap();
        assert_eq!(
            p.check(Some(&non_utf8), None),
            Err(RefererError::NotAllowed)
        );
    }

    #[test]
    fn allow_missing_and_star() {
        let p = RefererPolicy::compile(&["https://a.example.com".into()], true).unwrap();
        assert_eq!(p.check(None, None), Ok(()));
        let bad = HeaderValue::from_static("https://evil.com");
        assert_eq!(p.check(Some(&bad), None), Err(RefererError::NotAllowed));

        let star = policy(&["*"]);
        assert!(star.allows(b"null"));
        assert!(star.allows(b"https://anything.example"));
        assert_eq!(star.check(None, None), Err(RefererError::Missing));
    }

    #[test]
    fn bad_entries_are_reported_by_index() {
        let entries: Vec<String> = [
            "https://ok.example.com",
            "ftp://x.example.com",
            "app.example.com",
            "https://a*b.example.com",
            "https://*.",
            "https://x.example.com/?q",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let errs = RefererPolicy::compile(&entries, false).unwrap_err();
        let idx: Vec<usize> = errs.iter().map(|(i, _)| *i).collect();
        assert_eq!(idx, [1, 2, 3, 4, 5]);
    }

    proptest::proptest! {
        // Invariant: whatever the allowlist accepts parses to a host under the
        // entry that allowed it (and with its scheme and port).
        #[test]
        fn accepted_values_are_under_their_entry(
            scheme in proptest::sample::select(vec!["https", "http", "HTTPS"]),
            left in "[a-z]{0,4}(\\.[a-z]{1,4}){0,2}",
            dot in proptest::sample::select(vec!["", "."]),
            middle in proptest::sample::select(vec![
                "example.org", "example.org.", "example.org.evil.com", "evilexample.org",
                "app.example.com", "app.example.com.evil.com", "xn--exmple-cua.org", "EXAMPLE.ORG",
            ]),
            userinfo in proptest::sample::select(vec!["", "app.example.com@", "u:p@"]),
            port in proptest::sample::select(vec!["", ":443", ":8443", ":80"]),
            path in "(/[a-z.@%]{0,4}){0,3}",
        ) {
            let p = policy(&["https://*.example.org", "https://app.example.com"]);
            let value = format!("{scheme}://{userinfo}{left}{dot}{middle}{port}{path}");
            if p.allows(value.as_bytes()) {
                let u = Url::parse(&value).unwrap();
                let h = u.host_str().unwrap();
                proptest::prop_assert!(
                    h == "example.org" || h.ends_with(".example.org") || h == "app.example.com",
                    "{value} accepted with host {h}"
                );
                proptest::prop_assert_eq!(u.scheme(), "https");
                proptest::prop_assert_eq!(u.port_or_known_default(), Some(443));
            }
        }
    }
}
