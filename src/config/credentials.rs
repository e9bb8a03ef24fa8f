//! `[credentials.*]`: how each credential yields tokens (client
//! credentials or an API key), with its secret loaded through
//! [`secrets`](super::secrets).

use std::collections::BTreeMap;
use std::path::Path;

use http::HeaderValue;
use url::Url;

use super::Secret;
use super::raw::RawCredential;
use super::secrets::{SecretFields, load_secret, warn_if_exposed};
use super::{Files, Problems, is_label};

/// A credential, with its secret already loaded.
#[derive(Debug, PartialEq)]
pub struct CredentialConfig {
    /// Name used in routes, logs and metrics.
    pub name: String,
    /// How tokens are obtained.
    pub kind: CredentialKind,
    /// Referer sent upstream on service and token requests.
    pub upstream_referer: Option<HeaderValue>,
}

/// How a credential yields tokens.
#[derive(Debug, PartialEq)]
pub enum CredentialKind {
    /// OAuth 2.0 client credentials (app authentication).
    ClientCredentials {
        /// Token endpoint.
        token_url: Url,
        /// Public client id.
        client_id: String,
        /// Client secret.
        client_secret: Secret,
        /// Requested lifetime in minutes.
        expiration_minutes: u32,
    },
    /// A named user's username and password, exchanged at a
    /// `generateToken` endpoint (ArcGIS Enterprise before OAuth app
    /// credentials).
    UserPassword {
        /// The `generateToken` URL; `None`: discovered from the `/rest/info`
        /// of `info_url`.
        token_url: Option<Url>,
        /// `<upstream up to /rest/>info?f=json` of a route that uses the
        /// credential, when `token_url` is not given.
        info_url: Option<Url>,
        /// The user.
        username: String,
        /// Their password.
        password: Secret,
        /// Requested lifetime in minutes.
        expiration_minutes: u32,
    },
    /// A long-lived API key.
    ApiKey(Secret),
}

/// Validates every `[credentials.*]` table; invalid ones are left out (their
/// problems are recorded).
pub(super) fn validate(
    raw: BTreeMap<String, RawCredential>,
    file: &Path,
    files: Files<'_>,
    p: &mut Problems,
    warnings: &mut Vec<String>,
) -> BTreeMap<String, CredentialConfig> {
    if raw
        .values()
        .any(|c| c.client_secret.is_some() || c.api_key.is_some())
    {
        warn_if_exposed(file, "config file", warnings);
    }
    let mut credentials = BTreeMap::new();
    for (name, c) in raw {
        let key = format!("credentials.{name}");
        if !is_label(&name) {
            p.add(
                &key,
                "credential names may use letters, digits, - and _ only",
            );
        }
        if let Some(cred) = validate_one(&name, c, &key, files, p, warnings) {
            credentials.insert(name, cred);
        }
    }
    credentials
}

fn validate_one(
    name: &str,
    c: RawCredential,
    key: &str,
    files: Files<'_>,
    p: &mut Problems,
    warnings: &mut Vec<String>,
) -> Option<CredentialConfig> {
    let upstream_referer = c.upstream_referer.as_deref().and_then(|v| {
        match Url::parse(v) {
            Ok(u) if matches!(u.scheme(), "http" | "https") => {
                HeaderValue::from_str(u.as_str()).ok()
            }
            _ => None,
        }
        .or_else(|| {
            p.add(
                format!("{key}.upstream_referer"),
                "must be an http(s) URL such as \"https://app.example.com\"",
            );
            None
        })
    });
    let has_user = c.username.is_some()
        || c.password.is_some()
        || c.password_env.is_some()
        || c.password_file.is_some();
    let has_oauth = c.client_id.is_some()
        || c.client_secret.is_some()
        || c.client_secret_env.is_some()
        || c.client_secret_file.is_some()
        || (c.token_url.is_some() && !has_user);
    let has_key = c.api_key.is_some() || c.api_key_env.is_some() || c.api_key_file.is_some();
    if u8::from(has_user) + u8::from(has_oauth) + u8::from(has_key) > 1 {
        p.add(
            key,
            "set one kind: client credentials (client_id, client_secret_*), a username and password_*, or an API key (api_key_*)",
        );
        return None;
    }
    let kind = match (has_user, has_oauth, has_key) {
        (true, _, _) => token_login(c, Login::UserPassword, key, files, p, warnings)?,
        (false, true, false) => token_login(c, Login::ClientCredentials, key, files, p, warnings)?,
        (false, true, true) => unreachable!("refused above"),
        (false, false, false) => {
            p.add(
                key,
                "empty: set client_id + client_secret_env/_file, username + password_env/_file, or api_key_env/_file",
            );
            return None;
        }
        (false, false, true) => {
            if c.expiration_minutes.is_some() {
                p.add(
                    format!("{key}.expiration_minutes"),
                    "only applies to client credentials",
                );
            }
            let given = SecretFields {
                inline: c.api_key,
                env: c.api_key_env,
                file: c.api_key_file,
            };
            let secret = load_secret(p, warnings, key, "api_key", given, files)?;
            CredentialKind::ApiKey(secret)
        }
    };
    Some(CredentialConfig {
        name: name.to_string(),
        kind,
        upstream_referer,
    })
}

/// The two kinds that exchange a login for tokens.
#[derive(Clone, Copy)]
enum Login {
    /// `client_id` + `client_secret_*` at an OAuth 2.0 token endpoint.
    ClientCredentials,
    /// `username` + `password_*` at a `generateToken` endpoint.
    UserPassword,
}

/// A kind that exchanges a login for tokens: token endpoint, who, their
/// secret and the requested lifetime. Without `token_url` a username and
/// password credential finds its endpoint later, from a route's
/// `/rest/info` ([`discover_from_routes`]); client credentials need it.
fn token_login(
    c: RawCredential,
    login: Login,
    key: &str,
    files: Files<'_>,
    p: &mut Problems,
    warnings: &mut Vec<String>,
) -> Option<CredentialKind> {
    let (who, who_field, given, secret_field) = match login {
        Login::ClientCredentials => (
            c.client_id,
            "client_id",
            SecretFields {
                inline: c.client_secret,
                env: c.client_secret_env,
                file: c.client_secret_file,
            },
            "client_secret",
        ),
        Login::UserPassword => (
            c.username,
            "username",
            SecretFields {
                inline: c.password,
                env: c.password_env,
                file: c.password_file,
            },
            "password",
        ),
    };
    // Every field is checked before any `?`, so all problems are reported
    // at once.
    let token_url = match (c.token_url.as_deref(), login) {
        (None, Login::UserPassword) => Some(None),
        (given_url, _) => token_url(given_url, key, p, warnings).map(Some),
    };
    let who = non_empty(who, key, who_field, p);
    let expiration_minutes = expiration(c.expiration_minutes, key, p);
    let secret = load_secret(p, warnings, key, secret_field, given, files);
    let (token_url, who, secret) = (token_url?, who?, secret?);
    Some(match (login, token_url) {
        (Login::ClientCredentials, Some(token_url)) => CredentialKind::ClientCredentials {
            token_url,
            client_id: who,
            client_secret: secret,
            expiration_minutes,
        },
        (Login::ClientCredentials, None) => unreachable!("client credentials need token_url"),
        (Login::UserPassword, token_url) => CredentialKind::UserPassword {
            token_url,
            info_url: None,
            username: who,
            password: secret,
            expiration_minutes,
        },
    })
}

/// For username/password credentials without `token_url`: the
/// `…/rest/info?f=json` URL of the first route that uses the credential
/// (its upstream up to and including `/rest/`), or a problem when no route
/// can tell.
pub(super) fn discover_from_routes(
    credentials: &mut BTreeMap<String, CredentialConfig>,
    routes: &crate::policy::route::RouteTable,
    p: &mut Problems,
) {
    for (name, cred) in credentials.iter_mut() {
        let CredentialKind::UserPassword {
            token_url: None,
            info_url,
            ..
        } = &mut cred.kind
        else {
            continue;
        };
        let found = routes
            .iter()
            .filter(|r| r.credential.as_deref() == Some(name.as_str()))
            .find_map(|r| {
                let path = r.upstream.path();
                let at = path.to_ascii_lowercase().find("/rest/")?;
                let mut u = r.upstream.clone();
                u.set_path(&format!("{}info", &path[..at + "/rest/".len()]));
                u.set_query(Some("f=json"));
                Some(u)
            });
        match found {
            Some(u) => *info_url = Some(u),
            None => p.add(
                format!("credentials.{name}.token_url"),
                "missing, and no route using this credential has \"/rest/\" in its upstream to find it from (…/rest/info): set token_url, e.g. \"https://gis.example.com/portal/sharing/rest/generateToken\"",
            ),
        }
    }
}

/// A required, non-blank value of `key.field`.
fn non_empty(v: Option<String>, key: &str, field: &str, p: &mut Problems) -> Option<String> {
    let v = v.filter(|v| !v.trim().is_empty());
    if v.is_none() {
        p.add(format!("{key}.{field}"), "missing or empty");
    }
    v
}

/// `expiration_minutes`: 120 by default, 1 to 20160 (ArcGIS's 14 days).
fn expiration(v: Option<u32>, key: &str, p: &mut Problems) -> u32 {
    let minutes = v.unwrap_or(120);
    if !(1..=20160).contains(&minutes) {
        p.add(
            format!("{key}.expiration_minutes"),
            "must be between 1 and 20160 (14 days)",
        );
    }
    minutes
}

/// `token_url`: required, an http(s) URL without userinfo; cleartext http
/// is a warning (the secret would travel unencrypted).
fn token_url(
    value: Option<&str>,
    key: &str,
    p: &mut Problems,
    warnings: &mut Vec<String>,
) -> Option<Url> {
    let Some(v) = value else {
        p.add(
            format!("{key}.token_url"),
            "missing, e.g. \"https://www.arcgis.com/sharing/rest/oauth2/token\"",
        );
        return None;
    };
    match Url::parse(v) {
        Ok(u)
            if matches!(u.scheme(), "http" | "https")
                && u.host_str().is_some()
                && u.username().is_empty()
                && u.password().is_none() =>
        {
            if u.scheme() == "http" {
                warnings.push(format!(
                    "{key}.token_url uses cleartext http: the client secret travels unencrypted"
                ));
            }
            Some(u)
        }
        _ => {
            p.add(
                format!("{key}.token_url"),
                format!("{v:?} is not an http(s) URL without userinfo"),
            );
            None
        }
    }
}
