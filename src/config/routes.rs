//! `[[routes]]`: each route's upstream URL, mount, credential and rate
//! limit, checked against the others (unique names and mounts, no mount
//! under the `/proxy` path) and compiled into a [`RouteTable`].

use std::collections::HashSet;

use url::Url;

use super::Problems;
use super::apps::Apps;
use super::raw::RawRoute;
use crate::policy::route::{Route, RouteTable};

/// Validates `[[routes]]`; `declared` names the credentials that exist,
/// `apps` the apps a route may be limited to, and `proxy_path` is
/// `server.proxy_path`, which no mount may shadow.
pub(super) fn validate(
    raw: Vec<RawRoute>,
    declared: &HashSet<String>,
    apps: &Apps,
    proxy_path: &str,
    p: &mut Problems,
    warnings: &mut Vec<String>,
) -> RouteTable {
    let mut routes = Vec::new();
    let mut mounts: Vec<(String, usize)> = Vec::new();
    let mut names: Vec<(String, usize)> = Vec::new();
    for (i, r) in raw.into_iter().enumerate() {
        let key = format!("routes[{i}]");
        let upstream = match parse_upstream(&r.upstream) {
            Ok(u) => Some(u),
            Err(msg) => {
                p.add(format!("{key}.upstream"), msg);
                None
            }
        };
        if let Some(u) = &upstream
            && u.scheme() == "http"
        {
            warnings.push(format!(
                "{key}.upstream uses cleartext http: the token travels unencrypted"
            ));
        }
        // A declared but invalid credential has its own message already.
        if let Some(cred) = &r.credential
            && !declared.contains(cred)
        {
            p.add(
                format!("{key}.credential"),
                format!("no credential named {cred:?} in [credentials]"),
            );
        }
        let mount = r
            .mount
            .as_deref()
            .and_then(|m| mount(m, i, &key, proxy_path, &mut mounts, p));
        let rate_limit = super::rate_limit::per_client(r.rate_limit, &key, p);
        let allowed_apps = r
            .apps
            .as_deref()
            .map(|names| app_indexes(names, apps, &key, p));
        let Some(upstream) = upstream else { continue };
        let name = r
            .name
            .clone()
            .or_else(|| mount.clone())
            .unwrap_or_else(|| upstream.as_str().to_string());
        if let Some(n) = &r.name {
            if !is_label(n.trim_start_matches('/')) {
                p.add(
                    format!("{key}.name"),
                    "route names may use letters, digits, - _ / . only",
                );
            }
            if let Some((_, j)) = names.iter().find(|(other, _)| other == n) {
                p.add(
                    format!("{key}.name"),
                    format!("{n:?} is already used by routes[{j}]"),
                );
            }
            names.push((n.clone(), i));
        }
        let mut route = Route::new(
            name,
            upstream,
            r.credential,
            mount,
            r.token_in,
            r.rewrite_urls,
            rate_limit,
        );
        route.apps = allowed_apps;
        routes.push(route);
    }
    if routes.is_empty() && p.0.iter().all(|x| !x.key.starts_with("routes")) {
        p.add("routes", "no routes: add at least one [[routes]] table");
    }
    RouteTable::new(routes)
}

/// The `i`th route's `mount`, normalised; a problem when it is malformed,
/// taken by another route (`mounts` lists those seen so far) or under
/// `server.proxy_path`.
fn mount(
    given: &str,
    i: usize,
    key: &str,
    proxy_path: &str,
    mounts: &mut Vec<(String, usize)>,
    p: &mut Problems,
) -> Option<String> {
    let m = match normalise_mount(given) {
        Ok(m) => m,
        Err(msg) => {
            p.add(format!("{key}.mount"), msg);
            return None;
        }
    };
    if let Some((_, j)) = mounts.iter().find(|(other, _)| *other == m) {
        p.add(
            format!("{key}.mount"),
            format!("{m:?} is already mounted by routes[{j}]"),
        );
    } else if m == proxy_path || m.starts_with(&format!("{proxy_path}/")) {
        p.add(
            format!("{key}.mount"),
            format!("{m:?} collides with server.proxy_path"),
        );
    }
    mounts.push((m.clone(), i));
    Some(m)
}

/// A route's `apps`, as indexes into the app list; a problem for each name
/// that is not an app.
fn app_indexes(names: &[String], apps: &Apps, key: &str, p: &mut Problems) -> Vec<usize> {
    names
        .iter()
        .enumerate()
        .filter_map(|(j, n)| {
            let found = apps.index(n);
            if found.is_none() {
                p.add(
                    format!("{key}.apps[{j}]"),
                    format!("no app named {n:?} in [[apps]] or [referers] allowed"),
                );
            }
            found
        })
        .collect()
}

fn parse_upstream(v: &str) -> Result<Url, String> {
    let u = Url::parse(v).map_err(|e| format!("{v:?} is not a URL: {e}"))?;
    if !matches!(u.scheme(), "http" | "https") {
        return Err(format!("scheme {:?} is not http or https", u.scheme()));
    }
    if u.host_str().is_none_or(str::is_empty) {
        return Err("has no host".into());
    }
    if !u.username().is_empty() || u.password().is_some() {
        return Err("must not contain userinfo (user:password@)".into());
    }
    if u.query().is_some() {
        return Err("must not contain a query (?…)".into());
    }
    if u.fragment().is_some() {
        return Err("must not contain a fragment (#…)".into());
    }
    let path = u.path();
    if ["%2f", "%2F", "%5c", "%5C", "%00"]
        .iter()
        .any(|b| path.contains(b))
    {
        return Err("path contains an encoded slash, backslash or NUL".into());
    }
    Ok(u)
}

fn normalise_mount(m: &str) -> Result<String, String> {
    let trimmed = m.trim_end_matches('/');
    let m = if trimmed.is_empty() { "/" } else { trimmed };
    if !m.starts_with('/') {
        return Err(format!("{m:?} must start with /"));
    }
    if !is_plain_path(m) || m.split('/').any(|seg| seg == "." || seg == "..") {
        return Err(format!(
            "{m:?} must be a plain path (letters, digits, - _ . / and no dot segments)"
        ));
    }
    Ok(m.to_string())
}

pub(super) fn is_plain_path(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'-' | b'_' | b'.'))
}

pub(super) fn is_label(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'/' | b'.'))
}
