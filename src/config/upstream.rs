//! `[upstream]`: extra trust roots and the outbound (corporate) proxy that
//! upstream and token connections go through.
//!
//! `proxy` and `no_proxy` each fall back to the environment when the key is
//! absent (`HTTPS_PROXY`/`HTTP_PROXY`/`ALL_PROXY`, `NO_PROXY`, upper or
//! lower case, as curl reads them); `proxy = ""` turns the proxy off and
//! ignores the environment. A proxy URL is checked like any other value: a
//! variable that names an unusable proxy is a config error naming the
//! variable, never silently ignored. Proxy credentials (`user:pass@`) are
//! never shown: [`OutboundProxy::describe`] and `Debug` leave them out.

use std::fmt;

use super::raw::RawUpstream;
use super::{Env, Problems};

/// Where upstream connections go: straight to the upstream, or through an
/// HTTP proxy (CONNECT for `https://` upstreams, absolute-form requests for
/// `http://` ones), except for hosts `no_proxy` lists.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct OutboundProxy {
    /// Proxy for `https://` upstreams and token endpoints.
    pub https: Option<ProxyUrl>,
    /// Proxy for `http://` upstreams.
    pub http: Option<ProxyUrl>,
    /// Hosts, domains (and their subdomains), IP addresses and networks
    /// reached directly; `*` means every host.
    pub no_proxy: Vec<String>,
    /// Where the settings came from, for the startup log.
    pub source: String,
}

/// An `http://[user:password@]host[:port]` proxy URL. Its text holds the
/// credentials, so it is only handed to the connector; `Display` and
/// `Debug` show it without them.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyUrl(String);

impl ProxyUrl {
    /// The URL as configured, credentials included (for the connector only).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether the URL carries credentials.
    pub fn has_credentials(&self) -> bool {
        self.0.contains('@')
    }
}

impl fmt::Display for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Checked at parse: "http://" then the authority, no path.
        let authority = self.0.trim_start_matches("http://").trim_end_matches('/');
        match authority.rsplit_once('@') {
            Some((_, host)) => write!(f, "http://***@{host}"),
            None => write!(f, "http://{authority}"),
        }
    }
}

impl fmt::Debug for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ProxyUrl({self})")
    }
}

impl fmt::Debug for OutboundProxy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OutboundProxy")
            .field("https", &self.https)
            .field("http", &self.http)
            .field("no_proxy", &self.no_proxy)
            .field("source", &self.source)
            .finish()
    }
}

impl OutboundProxy {
    /// Whether any upstream connection goes through a proxy.
    pub fn is_set(&self) -> bool {
        self.https.is_some() || self.http.is_some()
    }

    /// One line for the startup log: which proxy, for what, from where.
    pub fn describe(&self) -> String {
        if !self.is_set() {
            return format!("upstream connections go direct ({})", self.source);
        }
        let via = match (&self.https, &self.http) {
            (Some(s), Some(h)) if s == h => format!("{s} for https and http upstreams"),
            (Some(s), Some(h)) => format!("{s} for https upstreams, {h} for http upstreams"),
            (Some(s), None) => format!("{s} for https upstreams (http upstreams go direct)"),
            (None, Some(h)) => format!("{h} for http upstreams (https upstreams go direct)"),
            (None, None) => unreachable!("checked by is_set"),
        };
        let except = if self.no_proxy.is_empty() {
            String::new()
        } else {
            format!(", not for {}", self.no_proxy.join(", "))
        };
        format!(
            "upstream connections go through {via}{except} ({})",
            self.source
        )
    }
}

/// The first of `names` set to something other than blanks, with its name.
fn first_var(env: &dyn Env, names: &[&'static str]) -> Option<(&'static str, String)> {
    names.iter().find_map(|&n| {
        env.var(n)
            .filter(|v| !v.trim().is_empty())
            .map(|v| (n, v.trim().to_string()))
    })
}

/// Validates `proxy` and `no_proxy` of `[upstream]`, reading the
/// environment for what the file leaves out.
pub(super) fn validate_proxy(raw: &RawUpstream, env: &dyn Env, p: &mut Problems) -> OutboundProxy {
    let mut out = OutboundProxy::default();
    let mut sources = Vec::new();
    match raw.proxy.as_deref().map(str::trim) {
        Some("") => sources.push("[upstream] proxy = \"\"".to_string()),
        Some(url) => {
            if let Some(u) = parse_proxy_url(url, "upstream.proxy", p) {
                out.https = Some(u.clone());
                out.http = Some(u);
            }
            sources.push("[upstream] proxy".to_string());
        }
        None => {
            let all = first_var(env, &["ALL_PROXY", "all_proxy"]);
            let https = first_var(env, &["HTTPS_PROXY", "https_proxy"]).or(all.clone());
            let http = first_var(env, &["HTTP_PROXY", "http_proxy"]).or(all);
            let parse = |(name, value): &(&str, String), p: &mut Problems| {
                parse_proxy_url(value, &format!("environment variable {name}"), p)
            };
            out.https = https.as_ref().and_then(|v| parse(v, p));
            // Both from ALL_PROXY: checked (and reported) once.
            out.http = match (&http, &https) {
                (Some((a, _)), Some((b, _))) if a == b => out.https.clone(),
                (Some(v), _) => parse(v, p),
                (None, _) => None,
            };
            let mut names: Vec<&str> = [&https, &http]
                .into_iter()
                .flatten()
                .map(|(n, _)| *n)
                .collect();
            names.dedup();
            if names.is_empty() {
                sources.push(
                    "no [upstream] proxy, no HTTPS_PROXY, HTTP_PROXY or ALL_PROXY in the environment"
                        .to_string(),
                );
            } else {
                sources.push(format!("from the environment: {}", names.join(", ")));
            }
        }
    }
    match &raw.no_proxy {
        Some(list) => {
            for (i, entry) in list.iter().enumerate() {
                if let Some(e) = check_no_proxy_entry(entry, &format!("upstream.no_proxy[{i}]"), p)
                {
                    out.no_proxy.push(e);
                }
            }
            if out.is_set() && !list.is_empty() {
                sources.push("[upstream] no_proxy".to_string());
            }
        }
        None => {
            if let Some((name, value)) = first_var(env, &["NO_PROXY", "no_proxy"]) {
                for entry in value.split(',').map(str::trim).filter(|e| !e.is_empty()) {
                    if let Some(e) =
                        check_no_proxy_entry(entry, &format!("environment variable {name}"), p)
                    {
                        out.no_proxy.push(e);
                    }
                }
                if out.is_set() {
                    sources.push(format!("no_proxy from {name}"));
                }
            }
        }
    }
    out.source = sources.join("; ");
    out
}

/// Checks one `no_proxy` entry: a host name or domain (a leading dot is
/// allowed), an IP address or network, or `*`.
fn check_no_proxy_entry(entry: &str, key: &str, p: &mut Problems) -> Option<String> {
    let e = entry.trim();
    let ok = e == "*"
        || e.parse::<std::net::IpAddr>().is_ok()
        || is_network(e)
        || (!e.is_empty()
            && e.len() <= 253
            && e.trim_start_matches('.')
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
            && !e.trim_start_matches('.').is_empty());
    if ok {
        Some(e.to_ascii_lowercase())
    } else {
        p.add(
            key,
            format!(
                "{e:?} is not a host name, domain (\".corp.example\"), IP address, network (\"10.0.0.0/8\") or \"*\""
            ),
        );
        None
    }
}

/// `address/prefix`, e.g. `10.0.0.0/8` or `fd00::/8`.
fn is_network(e: &str) -> bool {
    let Some((addr, len)) = e.split_once('/') else {
        return false;
    };
    let Ok(len) = len.parse::<u8>() else {
        return false;
    };
    match addr.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(_)) => len <= 32,
        Ok(std::net::IpAddr::V6(_)) => len <= 128,
        Err(_) => false,
    }
}

/// Parses a proxy URL: `http://[user[:password]@]host[:port][/]`. The
/// message names `key` and never quotes the value (it may hold a password).
fn parse_proxy_url(value: &str, key: &str, p: &mut Problems) -> Option<ProxyUrl> {
    let problem = |p: &mut Problems, why: &str| {
        p.add(
            key,
            format!("{why}; expected e.g. \"http://proxy.corp.example:3128\""),
        );
        None
    };
    let Ok(url) = url::Url::parse(value) else {
        return problem(p, "is not a URL");
    };
    match url.scheme() {
        "http" => {}
        "https" => {
            return problem(
                p,
                "an https:// proxy (TLS to the proxy itself) is not supported; https upstreams are tunnelled through an http:// proxy with CONNECT, end to end encrypted",
            );
        }
        s if s.starts_with("socks") => return problem(p, "SOCKS proxies are not supported"),
        _ => return problem(p, "must be an http:// URL"),
    }
    let Some(host) = url.host_str().filter(|h| !h.is_empty()) else {
        return problem(p, "has no host");
    };
    if !matches!(url.path(), "" | "/") || url.query().is_some() || url.fragment().is_some() {
        return problem(p, "must not have a path, query or fragment");
    }
    let port = url.port_or_known_default().unwrap_or(80);
    let auth = if url.username().is_empty() && url.password().is_none() {
        String::new()
    } else {
        // Kept percent-encoded, as the URL carries them; the connector
        // decodes them for `Proxy-Authorization: Basic`.
        format!("{}:{}@", url.username(), url.password().unwrap_or_default())
    };
    Some(ProxyUrl(format!("http://{auth}{host}:{port}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct Vars(HashMap<&'static str, &'static str>);
    impl Env for Vars {
        fn var(&self, name: &str) -> Option<String> {
            self.0.get(name).map(|v| v.to_string())
        }
    }

    fn run(
        proxy: Option<&str>,
        no_proxy: Option<&[&str]>,
        vars: &[(&'static str, &'static str)],
    ) -> (OutboundProxy, Vec<String>) {
        let raw = RawUpstream {
            extra_ca: None,
            proxy: proxy.map(str::to_string),
            no_proxy: no_proxy.map(|l| l.iter().map(|s| s.to_string()).collect()),
        };
        let mut p = Problems(Vec::new());
        let out = validate_proxy(&raw, &Vars(vars.iter().copied().collect()), &mut p);
        (
            out,
            p.0.into_iter()
                .map(|c| format!("{}: {}", c.key, c.message))
                .collect(),
        )
    }

    #[test]
    fn the_key_wins_over_the_environment() {
        let (o, errs) = run(
            Some("http://proxy.corp.example:3128"),
            Some(&["gis.internal", ".corp.example", "10.0.0.0/8"]),
            &[("HTTPS_PROXY", "http://other:1"), ("NO_PROXY", "x")],
        );
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(
            o.https.as_ref().unwrap().expose(),
            "http://proxy.corp.example:3128"
        );
        assert_eq!(o.http, o.https);
        assert_eq!(o.no_proxy, ["gis.internal", ".corp.example", "10.0.0.0/8"]);
        assert_eq!(
            o.describe(),
            "upstream connections go through http://proxy.corp.example:3128 for https and http upstreams, not for gis.internal, .corp.example, 10.0.0.0/8 ([upstream] proxy; [upstream] no_proxy)"
        );
    }

    #[test]
    fn the_environment_when_the_key_is_absent() {
        let (o, errs) = run(
            None,
            None,
            &[
                ("https_proxy", "http://s.corp:8080"),
                ("HTTP_PROXY", "http://h.corp"),
                ("NO_PROXY", " localhost, 127.0.0.1 ,,.internal"),
            ],
        );
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(o.https.as_ref().unwrap().expose(), "http://s.corp:8080");
        assert_eq!(o.http.as_ref().unwrap().expose(), "http://h.corp:80");
        assert_eq!(o.no_proxy, ["localhost", "127.0.0.1", ".internal"]);
        assert!(
            o.describe()
                .contains("from the environment: https_proxy, HTTP_PROXY"),
            "{}",
            o.describe()
        );
        assert!(o.describe().contains("no_proxy from NO_PROXY"));
        // ALL_PROXY fills what the specific variables leave out.
        let (o, _) = run(
            None,
            None,
            &[("ALL_PROXY", "http://a:1"), ("HTTP_PROXY", "http://h:2")],
        );
        assert_eq!(o.https.unwrap().expose(), "http://a:1");
        assert_eq!(o.http.unwrap().expose(), "http://h:2");
    }

    #[test]
    fn an_empty_key_ignores_the_environment() {
        let (o, errs) = run(Some(""), None, &[("HTTPS_PROXY", "http://s:1")]);
        assert!(errs.is_empty());
        assert!(!o.is_set());
        assert!(o.describe().contains("go direct"), "{}", o.describe());
        let (o, _) = run(None, None, &[]);
        assert!(!o.is_set());
        assert!(o.describe().contains("no [upstream] proxy, no HTTPS_PROXY"));
    }

    #[test]
    fn credentials_are_kept_for_the_connector_and_never_shown() {
        let (o, errs) = run(
            Some("http://svc%40corp:s3cr%3At@proxy.corp:3128/"),
            None,
            &[],
        );
        assert!(errs.is_empty(), "{errs:?}");
        let u = o.https.clone().unwrap();
        assert!(u.has_credentials());
        assert_eq!(u.expose(), "http://svc%40corp:s3cr%3At@proxy.corp:3128");
        for shown in [
            u.to_string(),
            format!("{u:?}"),
            format!("{o:?}"),
            o.describe(),
        ] {
            assert!(!shown.contains("s3cr"), "{shown}");
            assert!(!shown.contains("svc"), "{shown}");
        }
        assert_eq!(u.to_string(), "http://***@proxy.corp:3128");
    }

    #[test]
    fn unusable_proxies_are_errors_naming_the_key_without_the_value() {
        for (bad, why) in [
            ("https://p:1", "not supported"),
            ("socks5://p:1", "SOCKS"),
            ("ftp://p", "http://"),
            ("http://user:hunter2@p:1/path", "path"),
            ("http://p:1/?q", "path"),
            ("not a url hunter2", "not a URL"),
            ("http://", "not a URL"),
        ] {
            let (_, errs) = run(Some(bad), None, &[]);
            assert_eq!(errs.len(), 1, "{bad}: {errs:?}");
            assert!(errs[0].starts_with("upstream.proxy: "), "{errs:?}");
            assert!(errs[0].contains(why), "{bad}: {errs:?}");
            assert!(!errs[0].contains("hunter2"), "{errs:?}");
        }
        let (_, errs) = run(None, None, &[("HTTPS_PROXY", "socks5h://user:hunter2@p:1")]);
        assert_eq!(errs.len(), 1);
        // ALL_PROXY serves both schemes and is reported once.
        let (_, all) = run(None, None, &[("ALL_PROXY", "socks5://p:1")]);
        assert_eq!(all.len(), 1, "{all:?}");
        assert!(
            errs[0].starts_with("environment variable HTTPS_PROXY: "),
            "{errs:?}"
        );
        assert!(!errs[0].contains("hunter2"));
    }

    #[test]
    fn no_proxy_entries_are_checked() {
        let (_, errs) = run(
            Some("http://p:1"),
            Some(&[
                "ok.example",
                "*",
                "::1",
                "fd00::/8",
                "bad host",
                "10.0.0.0/33",
                "a,b",
                "",
            ]),
            &[],
        );
        let keys: Vec<&str> = errs.iter().map(|e| e.split(':').next().unwrap()).collect();
        assert_eq!(
            keys,
            [
                "upstream.no_proxy[4]",
                "upstream.no_proxy[5]",
                "upstream.no_proxy[6]",
                "upstream.no_proxy[7]"
            ],
            "{errs:?}"
        );
    }
}
