//! The Referer/Origin allowlist, compiled once from `[[apps]] referers` and
//! `[referers] allowed`: every entry belongs to one app, and a request
//! belongs to the app whose entries match all its Referer and Origin values.
//!
//! Entries and request values both go through the WHATWG URL parser, so case,
//! IDN (punycode), default ports and IPv4 spellings are compared in one
//! canonical form. Rules (docs/behaviour.md, "Request policy"): every present header must
//! match; `*.example.org` covers the apex and any depth of subdomain;
//! `:*` any port; a trailing-dot host is a different host; an entry with a path
//! matches by prefix on a segment boundary; `*` matches any present value.
//! When entries of several apps match, the most specific wins: an exact host
//! beats a wildcard, a longer wildcard suffix a shorter one, an explicit port
//! `:*`, a longer path a shorter one, anything `*`.

use http::HeaderValue;
use http::header::{self, HeaderMap};
use url::Url;

/// A compiled allowlist.
#[derive(Debug, Clone)]
pub struct RefererPolicy {
    entries: Vec<Entry>,
    /// The app each entry belongs to.
    apps: Vec<usize>,
    allow_missing: bool,
    /// The app of requests with neither header (`none`).
    none_app: usize,
    /// Canonical `scheme://host[:port]` of entries that are a plain origin:
    /// a value equal to one, or continuing it with `/`, matches without a
    /// URL parse (the common case of a browser's own Origin or Referer).
    /// Paired with the entry's index. Such an entry is the most specific
    /// one possible unless some entry has a path, so the shortcut is only
    /// taken when none has.
    exact_origins: Map<Box<[u8]>, usize>,
    /// The same as a list, when it is short: comparing a few prefixes is
    /// cheaper than hashing the value's origin.
    exact_list: Vec<(String, usize)>,
    has_paths: bool,
    /// Entries by scheme (0 http, 1 https) and exact host, and by scheme
    /// and wildcard domain; `*` entries apart. A value is compared only with
    /// the entries its own host can match (its host, and each of its
    /// parent domains), so the cost does not grow with the allowlist.
    by_host: [Map<String, Vec<usize>>; 2],
    by_domain: [Map<String, Vec<usize>>; 2],
    any: Vec<usize>,
}

/// The policy's lookup tables. They are filled from the config only, and a
/// request's value is only looked up, never inserted, so a hostile value
/// cannot lengthen a probe; foldhash (hashbrown's own default, seeded per
/// process) hashes a value in a fraction of SipHash's work, which showed on
/// every request against a large allowlist (BENCHMARKS.md run BR).
type Map<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// Up to this many exact origins are compared one by one.
const SHORT_LIST: usize = 16;

fn scheme_slot(scheme: &str) -> Option<usize> {
    match scheme {
        "http" => Some(0),
        "https" => Some(1),
        _ => None,
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Entry {
    Any,
    Pattern {
        scheme: String,
        host: HostPattern,
        port: Option<u16>,
        path: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum HostPattern {
    Exact(String),
    /// The apex and every subdomain of it.
    Domain(String),
}

/// How specific an entry is; the larger wins: host kind (exact, wildcard,
/// `*`), wildcard suffix length, explicit port, path length.
type Specificity = (u8, usize, bool, usize);

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RefererError {
    /// Neither header present and `allow_missing` is false.
    #[error("no Referer or Origin")]
    Missing,
    /// A present header matched no entry, or no one app's entries match
    /// them all.
    #[error("Referer or Origin not allowed")]
    NotAllowed,
}

/// Why an allowlist did not compile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CompileError {
    /// Entry `i` is not a valid entry.
    Bad(usize, String),
    /// Entry `i` is the same entry as entry `j` of another app.
    Duplicate(usize, usize),
}

impl RefererPolicy {
    /// Compiles `(entry, app)` pairs; `none_app` is the app of requests
    /// without either header. Returns every bad or duplicated entry.
    pub fn compile(
        entries: &[(String, usize)],
        allow_missing: bool,
        none_app: usize,
    ) -> Result<Self, Vec<CompileError>> {
        let mut out = Vec::with_capacity(entries.len());
        let mut errors = Vec::new();
        let mut seen: std::collections::HashMap<Entry, usize> = Default::default();
        for (i, (text, app)) in entries.iter().enumerate() {
            match Entry::compile(text) {
                Ok(entry) => {
                    match seen.get(&entry) {
                        Some(&j) if entries[j].1 != *app => {
                            errors.push(CompileError::Duplicate(i, j));
                        }
                        Some(_) => {}
                        None => {
                            seen.insert(entry.clone(), i);
                        }
                    }
                    out.push(entry);
                }
                Err(msg) => errors.push(CompileError::Bad(i, msg)),
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let exact_list: Vec<(String, usize)> = out
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
        let exact_origins = exact_list
            .iter()
            .map(|(o, i)| (o.as_bytes().into(), *i))
            .collect();
        let exact_list = if exact_list.len() <= SHORT_LIST {
            exact_list
        } else {
            Vec::new()
        };
        let has_paths = out
            .iter()
            .any(|e| matches!(e, Entry::Pattern { path: Some(_), .. }));
        let mut by_host: [Map<String, Vec<usize>>; 2] = Default::default();
        let mut by_domain: [Map<String, Vec<usize>>; 2] = Default::default();
        let mut any = Vec::new();
        for (i, e) in out.iter().enumerate() {
            match e {
                Entry::Any => any.push(i),
                Entry::Pattern { scheme, host, .. } => {
                    let Some(slot) = scheme_slot(scheme) else {
                        continue;
                    };
                    let (map, name) = match host {
                        HostPattern::Exact(h) => (&mut by_host[slot], h),
                        HostPattern::Domain(d) => (&mut by_domain[slot], d),
                    };
                    map.entry(name.clone()).or_default().push(i);
                }
            }
        }
        Ok(RefererPolicy {
            apps: entries.iter().map(|(_, a)| *a).collect(),
            entries: out,
            allow_missing,
            none_app,
            exact_origins,
            exact_list,
            has_paths,
            by_host,
            by_domain,
            any,
        })
    }

    /// A policy that refuses everything (used when compilation failed).
    pub fn deny_all() -> Self {
        RefererPolicy {
            entries: Vec::new(),
            apps: Vec::new(),
            allow_missing: false,
            none_app: 0,
            exact_origins: Default::default(),
            exact_list: Vec::new(),
            has_paths: false,
            by_host: Default::default(),
            by_domain: Default::default(),
            any: Vec::new(),
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

    /// The app a request belongs to, from every Referer and Origin value it
    /// carries (a repeated header must match in each copy): the app whose
    /// entries match them all, the most specific match for the Origin
    /// deciding between several; the `none` app when neither header is
    /// present and that is allowed.
    pub fn app_of(&self, headers: &HeaderMap) -> Result<usize, RefererError> {
        let values = || {
            headers
                .get_all(header::REFERER)
                .iter()
                .chain(headers.get_all(header::ORIGIN).iter())
        };
        let mut app = None;
        let mut mixed = false;
        for value in values() {
            let entry = self
                .matching_entry(value.as_bytes())
                .ok_or(RefererError::NotAllowed)?;
            let a = self.apps[entry];
            mixed |= app.is_some_and(|x| x != a);
            app = Some(a);
        }
        match app {
            None if self.allow_missing => Ok(self.none_app),
            None => Err(RefererError::Missing),
            Some(a) if !mixed => Ok(a),
            // The values' best matches lie in different apps: some app may
            // still match them all through less specific entries.
            Some(_) => self.common_app(values()),
        }
    }

    /// The app matching every value, the most specific for the last one
    /// (Origin when present) first.
    fn common_app<'a>(
        &self,
        values: impl Iterator<Item = &'a HeaderValue>,
    ) -> Result<usize, RefererError> {
        let mut common: Option<Vec<(usize, Specificity)>> = None;
        for value in values {
            let here = self.matching_apps(value.as_bytes());
            common = Some(match common {
                None => here,
                Some(before) => here
                    .into_iter()
                    .filter(|(a, _)| before.iter().any(|(b, _)| b == a))
                    .collect(),
            });
        }
        common
            .unwrap_or_default()
            .into_iter()
            .max_by_key(|(a, spec)| (*spec, std::cmp::Reverse(*a)))
            .map(|(a, _)| a)
            .ok_or(RefererError::NotAllowed)
    }

    /// True when some entry accepts this header value.
    pub fn allows(&self, value: &[u8]) -> bool {
        self.matching_entry(value).is_some()
    }

    /// The app of the entry that accepts this header value, if any.
    pub fn app_for_value(&self, value: &[u8]) -> Option<usize> {
        self.matching_entry(value).map(|e| self.apps[e])
    }

    /// The most specific entry that accepts this header value (the first
    /// in config order among equals).
    fn matching_entry(&self, value: &[u8]) -> Option<usize> {
        if value.is_empty() {
            return None;
        }
        // The fast path: the value's `scheme://authority` is an exact-origin
        // entry as written canonically, followed by nothing or a path, all
        // of it printable ASCII (anything else is parsed below).
        if !self.has_paths
            && value.iter().all(|b| (b'!'..=b'~').contains(b))
            && let Some(i) = self.exact_origin(value)
        {
            return Some(i);
        }
        self.matches(value)
            .max_by_key(|(i, spec)| (*spec, std::cmp::Reverse(*i)))
            .map(|(i, _)| i)
    }

    /// The exact-origin entry `value` starts with, followed by nothing or a
    /// path without backslashes.
    fn exact_origin(&self, value: &[u8]) -> Option<usize> {
        let tail_ok = |rest: &[u8]| {
            rest.is_empty() || (rest[0] == b'/' && memchr::memchr(b'\\', rest).is_none())
        };
        if self.exact_origins.is_empty() {
            return None;
        }
        if !self.exact_list.is_empty() {
            return self
                .exact_list
                .iter()
                .find(|(o, _)| value.strip_prefix(o.as_bytes()).is_some_and(tail_ok))
                .map(|(_, i)| *i);
        }
        // Every origin in the table starts `http://` or `https://`: its
        // first `:` ends the scheme. A value whose first `:` does not start
        // `://` matches none of them.
        let colon = memchr::memchr(b':', value)?;
        let after_scheme = colon + 3;
        if value.get(colon..after_scheme) != Some(b"://") {
            return None;
        }
        let end =
            memchr::memchr(b'/', &value[after_scheme..]).map_or(value.len(), |j| after_scheme + j);
        if !tail_ok(&value[end..]) {
            return None;
        }
        self.exact_origins.get(&value[..end]).copied()
    }

    /// Each app with an entry that accepts the value, with its most
    /// specific such entry's specificity.
    fn matching_apps(&self, value: &[u8]) -> Vec<(usize, Specificity)> {
        let mut out: Vec<(usize, Specificity)> = Vec::new();
        for (i, spec) in self.matches(value) {
            let app = self.apps[i];
            match out.iter_mut().find(|(a, _)| *a == app) {
                Some((_, best)) => *best = (*best).max(spec),
                None => out.push((app, spec)),
            }
        }
        out
    }

    /// Every entry that accepts the value, with its specificity.
    fn matches<'a>(&'a self, value: &[u8]) -> impl Iterator<Item = (usize, Specificity)> + 'a {
        let parsed = value_url(value);
        let present = !value.is_empty();
        // The entries this value's host can match: its exact host, each of
        // its parent domains (and itself) as a wildcard, and `*`.
        let mut candidates: Vec<usize> = Vec::new();
        if let Some(url) = &parsed
            && let (Some(slot), Some(host)) = (scheme_slot(url.scheme()), url.host_str())
        {
            if let Some(v) = self.by_host[slot].get(host) {
                candidates.extend(v);
            }
            let mut suffix = host;
            loop {
                if let Some(v) = self.by_domain[slot].get(suffix) {
                    candidates.extend(v);
                }
                match suffix.find('.') {
                    Some(dot) => suffix = &suffix[dot + 1..],
                    None => break,
                }
            }
        }
        if present {
            candidates.extend(&self.any);
        }
        candidates
            .into_iter()
            .map(move |i| (i, &self.entries[i]))
            .filter(move |(_, e)| e.accepts(parsed.as_ref(), present))
            .map(|(i, e)| (i, e.specificity()))
    }
}

/// A header value as the URL a browser sent: UTF-8, without blanks or
/// control characters (WHATWG parsing would silently drop tabs and newlines
/// and trim spaces), with a host.
fn value_url(value: &[u8]) -> Option<Url> {
    let text = std::str::from_utf8(value).ok()?;
    if text.is_empty() || has_blank_or_control(text) {
        return None;
    }
    Url::parse(text).ok().filter(|url| url.host_str().is_some())
}

fn has_blank_or_control(text: &str) -> bool {
    text.bytes().any(|b| b <= b' ' || b == 0x7f)
}

impl Entry {
    /// True when the entry accepts a header value: `*` any present one,
    /// even one that is not a URL; a pattern only a URL it matches.
    fn accepts(&self, url: Option<&Url>, present: bool) -> bool {
        match (self, url) {
            (Entry::Any, _) => present,
            (_, Some(url)) => self.matches(url, url.host_str().unwrap_or_default()),
            (_, None) => false,
        }
    }

    fn specificity(&self) -> Specificity {
        match self {
            Entry::Any => (0, 0, false, 0),
            Entry::Pattern {
                host, port, path, ..
            } => {
                let path = path.as_ref().map_or(0, String::len);
                match host {
                    HostPattern::Exact(_) => (2, 0, port.is_some(), path),
                    HostPattern::Domain(d) => (1, d.len(), port.is_some(), path),
                }
            }
        }
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

    /// Each entry an app of its own, numbered as the entry.
    fn policy(entries: &[&str]) -> RefererPolicy {
        let owned: Vec<(String, usize)> = entries
            .iter()
            .enumerate()
            .map(|(i, s)| (s.to_string(), i))
            .collect();
        RefererPolicy::compile(&owned, false, usize::MAX).unwrap()
    }

    fn headers(pairs: &[(&'static str, &'static [u8])]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_bytes(v).unwrap());
        }
        h
    }

    fn check(
        p: &RefererPolicy,
        referer: Option<&'static str>,
        origin: Option<&'static str>,
    ) -> Result<usize, RefererError> {
        let mut pairs = Vec::new();
        if let Some(r) = referer {
            pairs.push(("referer", r.as_bytes()));
        }
        if let Some(o) = origin {
            pairs.push(("origin", o.as_bytes()));
        }
        p.app_of(&headers(&pairs))
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
    fn matches_are_attributed_to_the_most_specific_entry() {
        let p = policy(&["https://*.example.com", "https://app.example.com", "*"]);
        // Exact origin wins over the earlier wildcard, fast path or not.
        assert_eq!(p.matching_entry(b"https://app.example.com/x"), Some(1));
        assert_eq!(p.matching_entry(b"https://app.example.com:443/x"), Some(1));
        assert_eq!(p.matching_entry(b"https://b.example.com/"), Some(0));
        assert_eq!(p.matching_entry(b"https://other.example/"), Some(2));
        assert_eq!(p.matching_entry(b"null"), Some(2));
        // Referer and Origin both match app 0's wildcard; the Origin's best
        // match is app 1, which does not match the Referer: app 0 it is.
        assert_eq!(
            check(
                &p,
                Some("https://b.example.com/"),
                Some("https://app.example.com")
            ),
            Ok(0)
        );
        assert_eq!(check(&p, Some("https://app.example.com/x"), None), Ok(1));
    }

    #[test]
    fn specificity_decides_between_apps() {
        let p = policy(&[
            "https://*.example.org",
            "https://*.maps.example.org",
            "https://city.maps.example.org:*",
            "https://city.maps.example.org",
            "http://localhost:*",
            "http://localhost:3000",
            "https://docs.example.net",
            "https://docs.example.net/viewer",
        ]);
        for (value, app) in [
            ("https://example.org/", 0),
            ("https://a.example.org/", 0),
            ("https://maps.example.org/", 1),
            ("https://x.maps.example.org/", 1),
            ("https://city.maps.example.org:8443/", 2),
            ("https://city.maps.example.org/", 3),
            ("https://city.maps.example.org:443/", 3),
            ("http://localhost:8080/", 4),
            ("http://localhost:3000/", 5),
            ("https://docs.example.net/", 6),
            ("https://docs.example.net/viewer/x", 7),
            ("https://docs.example.net/viewerx", 6),
        ] {
            assert_eq!(p.app_for_value(value.as_bytes()), Some(app), "{value}");
        }
        // Referer and Origin of different apps with nothing in common.
        assert_eq!(
            check(
                &p,
                Some("https://docs.example.net/"),
                Some("http://localhost:3000")
            ),
            Err(RefererError::NotAllowed)
        );
    }

    #[test]
    fn the_same_entry_in_two_apps_is_refused() {
        let entries: Vec<(String, usize)> = [
            ("https://a.example.com", 0),
            ("https://A.example.com:443/", 1),
            ("https://b.example.com", 1),
            ("https://b.example.com", 1),
            ("*", 0),
            ("*", 2),
        ]
        .iter()
        .map(|(e, a)| (e.to_string(), *a))
        .collect();
        let errs = RefererPolicy::compile(&entries, false, 9).unwrap_err();
        assert_eq!(
            errs,
            [CompileError::Duplicate(1, 0), CompileError::Duplicate(5, 4)]
        );
    }

    #[test]
    fn every_present_header_must_match() {
        let p = policy(&["https://app.example.com"]);
        let ok = "https://app.example.com/page";
        let bad = "https://evil.com";
        assert_eq!(check(&p, Some(ok), None), Ok(0));
        assert_eq!(check(&p, None, Some(ok)), Ok(0));
        assert_eq!(
            check(&p, Some(ok), Some(bad)),
            Err(RefererError::NotAllowed)
        );
        assert_eq!(
            check(&p, Some(bad), Some(ok)),
            Err(RefererError::NotAllowed)
        );
        assert_eq!(check(&p, None, None), Err(RefererError::Missing));
        let twice = headers(&[("referer", ok.as_bytes()), ("referer", bad.as_bytes())]);
        assert_eq!(p.app_of(&twice), Err(RefererError::NotAllowed));
        let non_utf8 = headers(&[("referer", b"https://app.example.com/\xff")]);
        assert_eq!(p.app_of(&non_utf8), Err(RefererError::NotAllowed));
    }

    #[test]
    fn allow_missing_and_star() {
        let p = RefererPolicy::compile(&[("https://a.example.com".into(), 0)], true, 7).unwrap();
        assert_eq!(check(&p, None, None), Ok(7));
        assert_eq!(
            check(&p, Some("https://evil.com"), None),
            Err(RefererError::NotAllowed)
        );

        let star = policy(&["*"]);
        assert!(star.allows(b"null"));
        assert!(star.allows(b"https://anything.example"));
        assert_eq!(check(&star, None, None), Err(RefererError::Missing));
    }

    #[test]
    fn bad_entries_are_reported_by_index() {
        let entries: Vec<(String, usize)> = [
            "https://ok.example.com",
            "ftp://x.example.com",
            "app.example.com",
            "https://a*b.example.com",
            "https://*.",
            "https://x.example.com/?q",
        ]
        .iter()
        .enumerate()
        .map(|(i, s)| (s.to_string(), i))
        .collect();
        let errs = RefererPolicy::compile(&entries, false, 0).unwrap_err();
        let idx: Vec<usize> = errs
            .iter()
            .map(|e| match e {
                CompileError::Bad(i, _) => *i,
                CompileError::Duplicate(i, _) => panic!("duplicate {i}"),
            })
            .collect();
        assert_eq!(idx, [1, 2, 3, 4, 5]);
    }

    impl RefererPolicy {
        /// The matcher before the index: every entry compared. The index
        /// must find exactly what this finds.
        fn matches_linear(&self, value: &[u8]) -> Vec<(usize, Specificity)> {
            let parsed = value_url(value);
            self.entries
                .iter()
                .enumerate()
                .filter(|(_, e)| e.accepts(parsed.as_ref(), !value.is_empty()))
                .map(|(i, e)| (i, e.specificity()))
                .collect()
        }
    }

    /// 10,000 entries over 1,000 apps: each value finds its own app, through
    /// the fast path and the index alike.
    #[test]
    fn a_large_allowlist_is_looked_up_not_scanned() {
        let mut entries = Vec::new();
        for app in 0..1000 {
            for k in 0..10 {
                let e = match k {
                    0 => format!("https://*.app{app}.example.org"),
                    1 => format!("http://localhost-{app}:*"),
                    2 => format!("https://app{app}.example.com:8443"),
                    _ => format!("https://s{k}.app{app}.example.net"),
                };
                entries.push((e, app));
            }
        }
        let p = RefererPolicy::compile(&entries, false, usize::MAX).unwrap();
        for app in [0usize, 1, 517, 999] {
            for value in [
                format!("https://x.y.app{app}.example.org/page"),
                format!("http://localhost-{app}:3000/"),
                format!("https://app{app}.example.com:8443/"),
                format!("https://s5.app{app}.example.net"),
            ] {
                assert_eq!(p.app_for_value(value.as_bytes()), Some(app), "{value}");
            }
        }
        assert_eq!(p.app_for_value(b"https://app1000.example.com:8443/"), None);
    }

    /// The shortcut for exact origins (compared one by one in a short list,
    /// looked up in a table in a long one) answers what parsing the value
    /// and comparing it with every entry answers, for hostile values too.
    #[test]
    fn the_exact_origin_shortcut_agrees_with_parsing() {
        let origins = [
            "https://app.example.com",
            "https://app.example.com:8443",
            "http://plain.example.com",
        ];
        let short: Vec<(String, usize)> = origins
            .iter()
            .enumerate()
            .map(|(i, o)| (o.to_string(), i))
            .collect();
        let mut long = short.clone();
        long.extend((3..40).map(|i| (format!("https://h{i}.example.net"), i)));
        for entries in [short, long] {
            let p = RefererPolicy::compile(&entries, false, usize::MAX).unwrap();
            assert_eq!(p.exact_list.is_empty(), entries.len() > SHORT_LIST);
            for value in [
                "https://app.example.com",
                "https://app.example.com/",
                "https://app.example.com/map.html?x=1&y=%2F",
                "https://app.example.com:8443/",
                "https://app.example.com:443/",
                "HTTPS://APP.example.com/",
                "https://app.example.com\\evil.example/",
                "https://app.example.com/a\\b",
                "https://app.example.com.evil.example/",
                "https://app.example.comx/",
                "https://app.example.com@evil.example/",
                "https://evil.example@app.example.com/",
                "https://app.example.com:8443@evil.example/",
                "a:b://app.example.com/",
                "https:app.example.com/",
                "https:/app.example.com/",
                "https//app.example.com",
                "https://app.example.com/caf\u{e9}",
                "https://app.example.com/a b",
                "https://app.example.com/\t",
                "https://app.example.com/\x7f",
                "https://app.example.com/%00",
                " https://app.example.com/",
                "http://plain.example.com:80/x",
                "https://plain.example.com/",
                "https://h7.example.net:443/x",
                "https://h7.example.net.",
                "https://",
                "://",
                ":",
                "/",
            ] {
                let parsed = p
                    .matches(value.as_bytes())
                    .max_by_key(|(i, spec)| (*spec, std::cmp::Reverse(*i)))
                    .map(|(i, _)| i);
                assert_eq!(p.matching_entry(value.as_bytes()), parsed, "{value:?}");
            }
            assert_eq!(
                p.app_for_value(b"https://app.example.com/map.html"),
                Some(0)
            );
            assert_eq!(p.app_for_value(b"https://app.example.com:8443/"), Some(1));
            assert_eq!(
                p.app_for_value(b"https://app.example.com@evil.example/"),
                None
            );
            assert_eq!(p.app_for_value(b"a:b://app.example.com/"), None);
            assert_eq!(
                p.app_for_value(b"https://app.example.com.evil.example/"),
                None
            );
        }
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

    proptest::proptest! {
        // The index finds exactly the entries a scan of all of them finds.
        #[test]
        fn the_index_agrees_with_a_scan(
            picks in proptest::collection::vec(0usize..12, 1..10),
            scheme in proptest::sample::select(vec!["https", "http", "HTTPS"]),
            sub in proptest::sample::select(vec!["", "a.", "a.b.", "x."]),
            base in proptest::sample::select(vec!["example.org", "example.com", "maps.example.org", "localhost", "127.0.0.1", "org"]),
            port in proptest::sample::select(vec!["", ":443", ":8443", ":80", ":3000"]),
            path in proptest::sample::select(vec!["", "/", "/viewer", "/viewer/x", "/other"]),
        ) {
            let vocabulary = [
                "https://example.org", "https://*.example.org", "https://*.maps.example.org",
                "http://localhost:*", "https://localhost:3000", "https://example.com:8443",
                "*", "https://example.com/viewer", "http://*.org", "https://127.0.0.1",
                "https://a.example.org", "http://example.com",
            ];
            let mut seen = Vec::new();
            let entries: Vec<(String, usize)> = picks
                .iter()
                .filter(|i| { let new = !seen.contains(*i); seen.push(**i); new })
                .enumerate()
                .map(|(app, i)| (vocabulary[*i].to_string(), app))
                .collect();
            let p = RefererPolicy::compile(&entries, false, 99).unwrap();
            let value = format!("{scheme}://{sub}{base}{port}{path}");
            let mut indexed: Vec<(usize, Specificity)> = p.matches(value.as_bytes()).collect();
            indexed.sort_unstable();
            let mut scanned = p.matches_linear(value.as_bytes());
            scanned.sort_unstable();
            proptest::prop_assert_eq!(&indexed, &scanned, "{}", value);
            // And the fast path picks what the full comparison picks.
            let best = scanned.iter().max_by_key(|(i, spec)| (*spec, std::cmp::Reverse(*i))).map(|(i, _)| *i);
            proptest::prop_assert_eq!(p.matching_entry(value.as_bytes()), best, "{}", value);
        }
    }
}
