//! `[[apps]]` and `[referers]`: the apps a request can belong to, each with
//! its Referer/Origin entries, credential overrides, rate limit and quota,
//! compiled with the entries into one [`RefererPolicy`].
//!
//! Every `[referers] allowed` entry is an app of its own, named by the entry
//! as written, so configs without `[[apps]]` keep their usage labels.
//! Requests with neither header (admitted by `allow_missing`) belong to the
//! app `none`.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use super::Problems;
use super::raw::{RawApp, RawQuota, RawReferers};
use crate::policy::quota::{QuotaSpec, Window};
use crate::policy::referer::{CompileError, RefererPolicy};

/// The name of the app of requests with neither Referer nor Origin.
pub const NONE_APP: &str = "none";

/// One app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppConfig {
    /// `[[apps]] name`, or the `[referers] allowed` entry as written.
    pub name: String,
    /// True for an `[[apps]]` table (listed by `?ping`).
    pub declared: bool,
    /// Route credential → the credential this app's requests use instead.
    pub credentials: BTreeMap<String, String>,
    /// Per client IP: `requests` per period.
    pub rate_limit: Option<(u32, Duration)>,
    /// Requests forwarded upstream per calendar window.
    pub quota: Option<QuotaSpec>,
}

/// Every app; `none` is the last.
#[derive(Debug, Clone)]
pub struct Apps {
    list: Vec<AppConfig>,
}

impl Apps {
    /// The app with index `i` (as [`RefererPolicy::app_of`] returns it).
    pub fn get(&self, i: usize) -> &AppConfig {
        &self.list[i.min(self.list.len() - 1)]
    }

    /// Every app, `none` last.
    pub fn iter(&self) -> impl Iterator<Item = &AppConfig> {
        self.list.iter()
    }

    /// Number of apps, `none` included.
    pub fn len(&self) -> usize {
        self.list.len()
    }

    /// Never true: `none` always exists.
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The index of the app called `name`.
    pub fn index(&self, name: &str) -> Option<usize> {
        self.list.iter().position(|a| a.name == name)
    }

    /// The credential app `app`'s requests use on a route whose credential
    /// is `route_credential`.
    pub fn credential_for<'a>(&'a self, app: usize, route_credential: &'a str) -> &'a str {
        self.get(app)
            .credentials
            .get(route_credential)
            .map_or(route_credential, String::as_str)
    }
}

/// `[a-z0-9][a-z0-9_-]{0,62}`.
fn is_app_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'_' | b'-'))
}

/// Validates `[[apps]]` and `[referers]`; `declared` names the credentials
/// that exist.
pub(super) fn validate(
    raw: Vec<RawApp>,
    referers: &RawReferers,
    declared: &HashSet<String>,
    p: &mut Problems,
) -> (Apps, RefererPolicy) {
    let mut list = Vec::new();
    // (entry, app index) and the key each entry came from.
    let mut entries: Vec<(String, usize)> = Vec::new();
    let mut keys: Vec<String> = Vec::new();
    let mut names: BTreeMap<String, usize> = BTreeMap::new();
    for (i, app) in raw.into_iter().enumerate() {
        let key = format!("apps[{i}]");
        check_name(&app.name, &key, &names, p);
        names.insert(app.name.clone(), i);
        if app.referers.is_empty() {
            p.add(
                format!("{key}.referers"),
                "missing or empty: list the origins of this app's pages",
            );
        }
        for (from, to) in &app.credentials {
            for (side, name) in [("", from), (" (replacement)", to)] {
                if !declared.contains(name) {
                    p.add(
                        format!("{key}.credentials.{from}"),
                        format!("no credential named {name:?} in [credentials]{side}"),
                    );
                }
            }
        }
        let rate_limit = super::rate_limit::per_client(app.rate_limit, &key, p);
        let quota = app.quota.and_then(|q| quota(q, &key, p));
        let index = list.len();
        for (j, e) in app.referers.into_iter().enumerate() {
            entries.push((e, index));
            keys.push(format!("{key}.referers[{j}]"));
        }
        list.push(AppConfig {
            name: app.name,
            declared: true,
            credentials: app.credentials,
            rate_limit,
            quota,
        });
    }
    for (i, e) in referers.allowed.iter().enumerate() {
        entries.push((e.clone(), list.len()));
        keys.push(format!("referers.allowed[{i}]"));
        list.push(AppConfig::undeclared(e.trim().to_string()));
    }
    list.push(AppConfig::undeclared(NONE_APP.into()));
    let none = list.len() - 1;
    let policy = match RefererPolicy::compile(&entries, referers.allow_missing, none) {
        Ok(policy) => policy,
        Err(errors) => {
            for e in errors {
                match e {
                    CompileError::Bad(i, msg) => p.add(keys[i].clone(), msg),
                    CompileError::Duplicate(i, j) => p.add(
                        keys[i].clone(),
                        format!(
                            "the same entry as {} (app {:?}): an origin belongs to one app",
                            keys[j], list[entries[j].1].name
                        ),
                    ),
                }
            }
            RefererPolicy::deny_all()
        }
    };
    (Apps { list }, policy)
}

/// An app's name: well-formed, not the reserved one, not taken.
fn check_name(name: &str, key: &str, names: &BTreeMap<String, usize>, p: &mut Problems) {
    if !is_app_name(name) {
        p.add(
            format!("{key}.name"),
            format!(
                "{:?} is not an app name: lower-case letters, digits, - and _, starting with a letter or digit, at most 63",
                name
            ),
        );
    } else if name == NONE_APP {
        p.add(
            format!("{key}.name"),
            "\"none\" is the app of requests without Referer and Origin; choose another name",
        );
    } else if let Some(j) = names.get(name) {
        p.add(
            format!("{key}.name"),
            format!("{:?} is already the name of apps[{j}]", name),
        );
    }
}

/// `quota = { requests, per }`.
fn quota(q: RawQuota, key: &str, p: &mut Problems) -> Option<QuotaSpec> {
    let per = Window::parse(&q.per);
    if per.is_none() {
        p.add(
            format!("{key}.quota.per"),
            format!(
                "{:?} is not a window: use \"hour\", \"day\" or \"month\"",
                q.per
            ),
        );
    }
    if q.requests == 0 {
        p.add(format!("{key}.quota.requests"), "must be greater than 0");
    }
    Some(QuotaSpec {
        requests: q.requests,
        per: per?,
    })
}

impl AppConfig {
    /// An app made from a `[referers] allowed` entry, or the one of requests
    /// with neither Referer nor Origin: no credentials, limits or quota.
    fn undeclared(name: String) -> AppConfig {
        AppConfig {
            name,
            declared: false,
            credentials: BTreeMap::new(),
            rate_limit: None,
            quota: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::is_app_name;

    #[test]
    fn app_names() {
        for ok in ["parks-map", "a", "0", "a_b-c9", &"x".repeat(63)] {
            assert!(is_app_name(ok), "{ok}");
        }
        for bad in [
            "",
            "-a",
            "_a",
            "Parks",
            "a.b",
            "a b",
            "ä",
            &"x".repeat(64),
            "a/b",
        ] {
            assert!(!is_app_name(bad), "{bad}");
        }
    }
}
