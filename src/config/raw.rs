//! What `proxy.toml` says, as written: strict serde structs (unknown keys
//! are errors) and the parser's messages, which never quote a value that
//! could be a secret. The section modules turn these into the validated
//! [`Config`](super::Config).

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::Deserialize;

use super::ConfigProblem;
use super::LogFormat;
use super::rate_limit::StoreFallback;
use crate::policy::route::TokenIn;

/// The file as written; unknown keys are errors.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub(super) server: RawServer,
    #[serde(default)]
    pub(super) limits: RawLimits,
    #[serde(default)]
    pub(super) referers: RawReferers,
    #[serde(default)]
    pub(super) log: RawLog,
    #[serde(default)]
    pub(super) upstream: RawUpstream,
    #[serde(default)]
    pub(super) credentials: BTreeMap<String, RawCredential>,
    #[serde(default)]
    pub(super) routes: Vec<RawRoute>,
    #[serde(default)]
    pub(super) apps: Vec<RawApp>,
    pub(super) rate_limit: Option<RawRateLimitStore>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawApp {
    pub(super) name: String,
    #[serde(default)]
    pub(super) referers: Vec<String>,
    #[serde(default)]
    pub(super) credentials: BTreeMap<String, String>,
    pub(super) rate_limit: Option<RawRateLimit>,
    pub(super) quota: Option<RawQuota>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawQuota {
    pub(super) requests: u64,
    pub(super) per: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRateLimitStore {
    pub(super) store: String,
    #[serde(default = "default_budget_ms")]
    pub(super) budget_ms: u64,
    #[serde(default)]
    pub(super) on_store_error: StoreFallback,
    pub(super) store_password_env: Option<String>,
    pub(super) store_password_file: Option<PathBuf>,
    pub(super) store_ca: Option<PathBuf>,
}

fn default_budget_ms() -> u64 {
    25
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    pub(super) listen: Option<String>,
    pub(super) tls_cert: Option<PathBuf>,
    pub(super) tls_key: Option<PathBuf>,
    pub(super) plain_listen: Option<String>,
    pub(super) admin_listen: Option<String>,
    #[serde(default = "default_proxy_path")]
    pub(super) proxy_path: String,
    pub(super) public_url: Option<String>,
    #[serde(default)]
    pub(super) trusted_proxies: Vec<String>,
    #[serde(default = "default_grace")]
    pub(super) shutdown_grace_secs: u64,
    #[serde(default = "default_reload_poll")]
    pub(super) reload_poll_secs: u64,
}

fn default_reload_poll() -> u64 {
    2
}

fn default_proxy_path() -> String {
    "/proxy".into()
}
fn default_grace() -> u64 {
    30
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawLimits {
    pub(super) max_request_body_bytes: u64,
    pub(super) max_header_bytes: u64,
    pub(super) h2_max_concurrent_streams: u32,
    pub(super) retry_body_bytes: u64,
    pub(super) max_connections: u64,
    pub(super) header_read_timeout_secs: u64,
    pub(super) upstream_connect_timeout_secs: u64,
    pub(super) upstream_timeout_secs: u64,
}

impl Default for RawLimits {
    fn default() -> Self {
        RawLimits {
            max_request_body_bytes: 10 * 1024 * 1024,
            max_header_bytes: 64 * 1024,
            h2_max_concurrent_streams: 256,
            retry_body_bytes: 1024 * 1024,
            max_connections: 10_000,
            header_read_timeout_secs: 10,
            upstream_connect_timeout_secs: 5,
            upstream_timeout_secs: 60,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawReferers {
    #[serde(default)]
    pub(super) allowed: Vec<String>,
    #[serde(default)]
    pub(super) allow_missing: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLog {
    #[serde(default)]
    pub(super) format: LogFormat,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawUpstream {
    pub(super) extra_ca: Option<PathBuf>,
    pub(super) proxy: Option<String>,
    pub(super) no_proxy: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCredential {
    pub(super) token_url: Option<String>,
    pub(super) client_id: Option<String>,
    pub(super) client_secret: Option<String>,
    pub(super) client_secret_env: Option<String>,
    pub(super) client_secret_file: Option<PathBuf>,
    pub(super) expiration_minutes: Option<u32>,
    pub(super) upstream_referer: Option<String>,
    pub(super) api_key: Option<String>,
    pub(super) api_key_env: Option<String>,
    pub(super) api_key_file: Option<PathBuf>,
    pub(super) username: Option<String>,
    pub(super) password: Option<String>,
    pub(super) password_env: Option<String>,
    pub(super) password_file: Option<PathBuf>,
}

// Hand-written so a parse of the raw file can never print an inline secret.
impl fmt::Debug for RawCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawCredential")
            .field("token_url", &self.token_url)
            .field("client_id", &self.client_id)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRoute {
    pub(super) name: Option<String>,
    pub(super) upstream: String,
    pub(super) credential: Option<String>,
    pub(super) mount: Option<String>,
    #[serde(default)]
    pub(super) token_in: TokenIn,
    #[serde(default)]
    pub(super) rewrite_urls: bool,
    pub(super) rate_limit: Option<RawRateLimit>,
    pub(super) apps: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRateLimit {
    pub(super) requests: u32,
    pub(super) per_secs: u64,
}

pub(super) fn parse(text: &str) -> Result<RawConfig, ConfigProblem> {
    let de = toml::de::Deserializer::parse(text).map_err(|e| ConfigProblem {
        key: String::new(),
        message: describe_toml_error(text, &e),
    })?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        ConfigProblem {
            key: if path == "." { String::new() } else { path },
            message: describe_toml_error(text, &inner),
        }
    })
}

/// The parser's message with a line number, but without the source snippet
/// toml prints (it could hold an inline secret) and without quoted values in
/// type errors.
fn describe_toml_error(text: &str, e: &toml::de::Error) -> String {
    let msg = e.message().trim();
    let msg = if msg.starts_with("invalid type") || msg.starts_with("invalid value") {
        redact_quoted(msg)
    } else {
        msg.to_string()
    };
    match e.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!("line {line}: {msg}")
        }
        None => msg,
    }
}

fn redact_quoted(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    let mut in_quote: Option<char> = None;
    for c in msg.chars() {
        match in_quote {
            Some(q) if c == q => {
                out.push('…');
                out.push(c);
                in_quote = None;
            }
            Some(_) => {}
            None => {
                out.push(c);
                if c == '`' || c == '"' {
                    in_quote = Some(c);
                }
            }
        }
    }
    out
}
