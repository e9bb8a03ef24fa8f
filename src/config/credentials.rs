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
    if has_user {
        return Some(CredentialConfig {
            name: name.to_string(),
            kind: user_password(c, key, files, p, warnings)?,
            upstream_referer,
        });
    }
    let kind = match (has_oauth, has_key) {
        (true, true) => unreachable!("refused above"),
        (false, false) => {
            p.add(
                key,
                "empty: set client_id + client_secret_env/_file, username + password_env/_file, or api_key_env/_file",
            );
            return None;
        }
        (false, true) => {
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
        (true, false) => client_credentials(c, key, files, p, warnings)?,
    };
    Some(CredentialConfig {
        name: name.to_string(),
        kind,
        upstream_referer,
    })
}

/// The client-credentials kind: token endpoint, client id, secret and the
/// requested lifetime.
fn client_credentials(
    c: RawCredential,
    key: &str,
    files: Files<'_>,
    p: &mut Problems,
    warnings: &mut Vec<String>,
) -> Option<CredentialKind> {
    let token_url = token_url(c.token_url.as_deref(), key, p, warnings);
    let client_id = non_empty(c.client_id, key, "client_id", p);
    let expiration_minutes = expiration(c.expiration_minutes, key, p);
    let given = SecretFields {
        inline: c.client_secret,
        env: c.client_secret_env,
        file: c.client_secret_file,
    };
    let secret = load_secret(p, warnings, key, "client_secret", given, files);
    Some(CredentialKind::ClientCredentials {
        token_url: token_url?,
        client_id: client_id?,
        client_secret: secret?,
        expiration_minutes,
    })
}

/// The username/password kind (`generateToken`). Without `token_url` the
/// endpoint is discovered later from a route's `/rest/info`
/// ([`discover_from_routes`]).
fn user_password(
    c: RawCredential,
    key: &str,
    files: Files<'_>,
    p: &mut Problems,
    warnings: &mut Vec<String>,
) -> Option<CredentialKind> {
    // Checked now, used at the end, so every problem is reported at once.
    let given_url = c
        .token_url
        .as_deref()
        .map(|v| token_url(Some(v), key, p, warnings));
    let username = non_empty(c.username, key, "username", p);
    let expiration_minutes = expiration(c.expiration_minutes, key, p);
    let given = SecretFields {
        inline: c.password,
        env: c.password_env,
        file: c.password_file,
    };
    let password = load_secret(p, warnings, key, "password", given, files);
    let token_url = match given_url {
        Some(checked) => Some(checked?),
        None => None,
    };
    Some(CredentialKind::UserPassword {
        token_url,
        info_url: None,
        username: username?,
        password: password?,
        expiration_minutes,
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
