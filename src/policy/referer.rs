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
    /// Paired with the entry's index.
    exact_origins: Vec<(String, usize)>,
    /// The entries as configured, for usage attribution labels.
    labels: Vec<String>,
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
                .enumerate()
                .filter_map(|(i, e)| match e {
                    Entry::Pattern {
                        scheme,
                        host: HostPattern::Exact(h),
                        port: Some(port),
                        path: None,
                    } => {
                        let default = if scheme == "https" { 443 } else { 80 };
                        Some((
                            if *port == default {
                                format!("{scheme}://{h}")
                            } else {
                                format!("{scheme}://{h}:{port}")
                            },
                            i,
                        ))
                    }
                    _ => None,
                })
                .collect();
            Ok(RefererPolicy {
                entries: out,
                allow_missing,
                exact_origins,
                labels: entries.iter().map(|e| e.trim().to_string()).collect(),
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
            labels: Vec::new(),
        }
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when the allowlist is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The configured text of entry `i` (a bounded label for metrics).
    pub fn label(&self, i: usize) -> &str {
        self.labels.get(i).map_or("", String::as_str)
    }

    /// Checks a request's Referer and Origin headers.
    pub fn check(
        &self,
        referer: Option<&HeaderValue>,
        origin: Option<&HeaderValue>,
    ) -> Result<(), RefererError> {
        self.check_all([referer, origin].into_iter().flatten())
            .map(|_| ())
    }

    /// Checks every Referer and Origin value a request carries (a repeated
    /// header must match in each copy). On success, the index of the entry
    /// that matched the last value (Origin when present), or `None` when no
    /// header was present and that is allowed.
    pub fn check_all<'a>(
        &self,
        values: impl IntoIterator<Item = &'a HeaderValue>,
    ) -> Result<Option<usize>, RefererError> {
        let mut matched = None;
        for value in values {
            match self.matching_entry(value.as_bytes()) {
                Some(i) => matched = Some(i),
                None => return Err(RefererError::NotAllowed),
            }
        }
        if matched.is_some() || self.allow_missing {
            Ok(matched)
        } else {
            Err(RefererError::Missing)
        }
    }

    /// True when some entry accepts this header value.
    pub fn allows(&self, value: &[u8]) -> bool {
        self.matching_entry(value).is_some()
    }

    /// The index of the entry that accepts this header value: an exact
    /// origin before a wildcard, then config order, `*` last.
    pub fn matching_entry(&self, value: &[u8]) -> Option<usize> {
        if value.is_empty() {
            return None;
        }
        // `*` accepts any present value, even one that is not a URL.
        let any = self.entries.iter().position(|e| matches!(e, Entry::Any));
        let Ok(text) = std::str::from_utf8(value) else {
            return any;
        };
        // WHATWG parsing silently drops tabs/newlines and trims spaces; a
        // header carrying them is not a URL a browser sent.
        if text.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return any;
        }
        if let Some((_, i)) = self.exact_origins.iter().find(|(o, _)| {
            text.strip_prefix(o.as_str()).is_some_and(|rest| {
                rest.is_empty() || (rest.starts_with('/') && !rest.contains('\\'))
            })
        }) {
            return Some(*i);
        }
        let Ok(url) = Url::parse(text) else {
            return any;
        };
        let Some(host) = url.host_str() else {
            return any;
        };
        self.entries
            .iter()
            .enumerate()
            .filter(|(_, e)| !matches!(e, Entry::Any) && e.matches(&url, host))
            .min_by_key(|(i, e)| (!e.is_exact_origin(), *i))
            .map(|(i, _)| i)
            .or(any)
    }
}

impl Entry {
    fn is_exact_origin(&self) -> bool {
        matches!(
            self,
            Entry::Pattern {
                host: HostPattern::Exact(_),
                port: Some(_),
                path: None,
                ..
            }
        )
    }

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
    fn matches_are_attributed_to_one_entry() {
        let p = policy(&["https://*.example.com", "https://app.example.com", "*"]);
        // Exact origin wins over the earlier wildcard, fast path or not.
        assert_eq!(p.matching_entry(b"https://app.example.com/x"), Some(1));
        assert_eq!(p.matching_entry(b"https://app.example.com:443/x"), Some(1));
        assert_eq!(p.matching_entry(b"https://b.example.com/"), Some(0));
        assert_eq!(p.matching_entry(b"https://other.example/"), Some(2));
        assert_eq!(p.label(1), "https://app.example.com");
        let ok = HeaderValue::from_static("https://b.example.com/");
        let origin = HeaderValue::from_static("https://app.example.com");
        assert_eq!(p.check_all([&ok, &origin]), Ok(Some(1)));
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
