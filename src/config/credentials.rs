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
    let has_oauth = c.token_url.is_some()
        || c.client_id.is_some()
        || c.client_secret.is_some()
        || c.client_secret_env.is_some()
        || c.client_secret_file.is_some();
    let has_key = c.api_key.is_some() || c.api_key_env.is_some() || c.api_key_file.is_some();
    let kind = match (has_oauth, has_key) {
        (true, true) => {
            p.add(
                key,
                "set either client credentials (client_id, client_secret_*) or an API key (api_key_*), not both",
            );
            return None;
        }
        (false, false) => {
            p.add(
                key,
                "empty: set client_id + client_secret_env/_file, or api_key_env/_file",
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
    let client_id = match c.client_id {
        Some(id) if !id.trim().is_empty() => Some(id),
        _ => {
            p.add(format!("{key}.client_id"), "missing or empty");
            None
        }
    };
    let expiration_minutes = c.expiration_minutes.unwrap_or(120);
    if !(1..=20160).contains(&expiration_minutes) {
        p.add(
            format!("{key}.expiration_minutes"),
            "must be between 1 and 20160 (14 days)",
        );
    }
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
