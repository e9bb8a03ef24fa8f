//! `proxy.toml`: what the file says ([`RawConfig`], strict serde) and what the
//! proxy runs on ([`Config`], validated once, typed and precompiled).
//!
//! Validation collects every problem before giving up, each naming the file and
//! the key (`routes[2].upstream`), so an operator fixes a config in one pass.
//! Messages never quote secret values; values that are not secrets are quoted
//! only where that helps (a bad URL, an unknown credential name).

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use ipnet::IpNet;
use rustls_pki_types::CertificateDer;
use serde::Deserialize;
use url::Url;

use crate::policy::referer::RefererPolicy;
use crate::policy::route::{Route, RouteTable, TokenIn};
use crate::tls;
use crate::token::Secret;

/// Exit code for a configuration error (sysexits `EX_CONFIG`).
pub const EX_CONFIG: i32 = 78;

// ---------------------------------------------------------------- raw form

/// The file as written; unknown keys are errors.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    server: RawServer,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    referers: RawReferers,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    upstream: RawUpstream,
    #[serde(default)]
    credentials: BTreeMap<String, RawCredential>,
    #[serde(default)]
    routes: Vec<RawRoute>,
    rate_limit: Option<RawRateLimitStore>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRateLimitStore {
    store: String,
    #[serde(default = "default_budget_ms")]
    budget_ms: u64,
    #[serde(default)]
    on_store_error: StoreFallback,
}

fn default_budget_ms() -> u64 {
    25
}

/// What per-client rate limits do when the shared store does not answer.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreFallback {
    /// Use this process's own limiter.
    #[default]
    Local,
    /// Admit the request.
    Open,
    /// Refuse it (429).
    Closed,
}

/// `[rate_limit]`: a store shared by all replicas.
#[derive(Clone, PartialEq)]
pub struct RateLimitStore {
    /// `redis://host:port/db` (or `rediss://` for TLS).
    pub url: String,
    /// Time allowed for one store call.
    pub budget: Duration,
    /// What to do when the store does not answer in time.
    pub on_error: StoreFallback,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    listen: Option<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    plain_listen: Option<String>,
    admin_listen: Option<String>,
    #[serde(default = "default_proxy_path")]
    proxy_path: String,
    public_url: Option<String>,
    #[serde(default)]
    trusted_proxies: Vec<String>,
    #[serde(default = "default_grace")]
    shutdown_grace_secs: u64,
}

fn default_proxy_path() -> String {
    "/proxy".into()
}
fn default_grace() -> u64 {
    30
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLimits {
    max_request_body_bytes: u64,
    max_header_bytes: u64,
    h2_max_concurrent_streams: u32,
    retry_body_bytes: u64,
    max_connections: u64,
    header_read_timeout_secs: u64,
    upstream_connect_timeout_secs: u64,
    upstream_timeout_secs: u64,
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
struct RawReferers {
    #[serde(default)]
    allowed: Vec<String>,
    #[serde(default)]
    allow_missing: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    #[serde(default)]
    format: LogFormat,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    extra_ca: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCredential {
    token_url: Option<String>,
    client_id: Option<String>,
    client_secret: Option<String>,
    client_secret_env: Option<String>,
    client_secret_file: Option<PathBuf>,
    expiration_minutes: Option<u32>,
    upstream_referer: Option<String>,
    api_key: Option<String>,
    api_key_env: Option<String>,
    api_key_file: Option<PathBuf>,
}

// Hand-written so a parse of the raw file can never print an inline secret.
impl fmt::Debug for RawCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RawCredential")
            .field("token_url", &self.token_url)
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    name: Option<String>,
    upstream: String,
    credential: Option<String>,
    mount: Option<String>,
    #[serde(default)]
    token_in: TokenIn,
    #[serde(default)]
    rewrite_urls: bool,
    rate_limit: Option<RawRateLimit>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRateLimit {
    requests: u32,
    per_secs: u64,
}

// ---------------------------------------------------------- validated form

/// Log line format.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One JSON object per line.
    #[default]
    Json,
    /// Human-readable text.
    Text,
}

/// The validated configuration the proxy runs on.
#[derive(Debug)]
pub struct Config {
    /// Where the config came from, for messages.
    pub source: PathBuf,
    /// Listeners and URL settings.
    pub server: ServerConfig,
    /// Size, time and count limits.
    pub limits: Limits,
    /// Compiled Referer/Origin allowlist.
    pub referers: RefererPolicy,
    /// Log format.
    pub log_format: LogFormat,
    /// Extra trust roots for upstream TLS.
    pub extra_ca: Vec<CertificateDer<'static>>,
    /// Credentials by name.
    pub credentials: BTreeMap<String, CredentialConfig>,
    /// Compiled route table.
    pub routes: RouteTable,
    /// Shared rate-limit store, if any.
    pub rate_limit_store: Option<RateLimitStore>,
    /// Non-fatal findings (inline secrets, cleartext upstreams), logged at start.
    pub warnings: Vec<String>,
}

// Hand-written: a Redis URL may carry a password (`redis://:pw@host`).
impl fmt::Debug for RateLimitStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimitStore")
            .field("url", &"<redacted>")
            .field("budget", &self.budget)
            .field("on_error", &self.on_error)
            .finish()
    }
}

/// `[server]`, validated.
#[derive(Debug)]
pub struct ServerConfig {
    /// HTTPS listener address.
    pub listen: Option<SocketAddr>,
    /// TLS settings for the HTTPS listener.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Optional cleartext listener.
    pub plain_listen: Option<SocketAddr>,
    /// Admin listener address.
    pub admin_listen: Option<SocketAddr>,
    /// Path of the Esri resource-proxy style endpoint.
    pub proxy_path: String,
    /// How clients reach the proxy (scheme + authority, no trailing slash).
    pub public_url: Option<String>,
    /// Peers whose X-Forwarded-* headers are believed.
    pub trusted_proxies: Vec<IpNet>,
    /// How long in-flight requests may run on shutdown.
    pub shutdown_grace: Duration,
}

/// `[limits]`, validated.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request body accepted.
    pub max_request_body_bytes: u64,
    /// Largest request head accepted.
    pub max_header_bytes: usize,
    /// HTTP/2 streams per connection.
    pub h2_max_concurrent_streams: u32,
    /// Bodies up to this size are kept for a retry.
    pub retry_body_bytes: u64,
    /// Connections served at once.
    pub max_connections: usize,
    /// Time allowed for TLS handshake and request head.
    pub header_read_timeout: Duration,
    /// Upstream TCP+TLS connect timeout.
    pub upstream_connect_timeout: Duration,
    /// Time allowed for the upstream response head.
    pub upstream_timeout: Duration,
}

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

// ---------------------------------------------------------------- errors

/// One problem with the config, naming the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// Dotted key path, e.g. `routes[2].upstream`; empty for the whole file.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

/// All problems found in one config file.
#[derive(Debug)]
pub struct ConfigError {
    /// The file.
    pub file: PathBuf,
    /// Every problem, in file order.
    pub problems: Vec<ConfigProblem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            if p.key.is_empty() {
                write!(f, "{}: {}", self.file.display(), p.message)?;
            } else {
                write!(f, "{}: {}: {}", self.file.display(), p.key, p.message)?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

struct Problems(Vec<ConfigProblem>);

impl Problems {
    fn add(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.0.push(ConfigProblem {
            key: key.into(),
            message: message.into(),
        });
    }
}

// ---------------------------------------------------------------- loading

/// Where secrets and files come from; the process environment in production,
/// a map in tests.
pub trait Env {
    /// The value of an environment variable.
    fn var(&self, name: &str) -> Option<String>;
}

/// The real process environment.
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl Config {
    /// Reads and validates a config file; relative paths in it are resolved
    /// against the file's directory.
    pub fn load(path: &Path, env: &dyn Env) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            problems: vec![ConfigProblem {
                key: String::new(),
                message: format!("cannot read: {e}"),
            }],
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Config::from_toml(&text, path, base, env)
    }

    /// Parses and validates config text; `file` names it in messages.
    pub fn from_toml(
        text: &str,
        file: &Path,
        base_dir: &Path,
        env: &dyn Env,
    ) -> Result<Config, ConfigError> {
        Config::from_toml_with_tls(text, file, base_dir, env, None)
    }

    /// As [`Config::from_toml`], with the HTTPS listener's TLS settings given
    /// in memory instead of `tls_cert`/`tls_key` files (the demo's generated
    /// certificate).
    pub fn from_toml_with_tls(
        text: &str,
        file: &Path,
        base_dir: &Path,
        env: &dyn Env,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) -> Result<Config, ConfigError> {
        let fail = |problems| ConfigError {
            file: file.to_path_buf(),
            problems,
        };
        let raw = parse_raw(text).map_err(|p| fail(vec![p]))?;
        let mut problems = Problems(Vec::new());
        let config = validate(raw, file, base_dir, env, tls, &mut problems);
        if problems.0.is_empty() {
            Ok(config)
        } else {
            Err(fail(problems.0))
        }
    }

    /// Names of credentials some route uses.
    pub fn credentials_in_use(&self) -> impl Iterator<Item = &str> {
        let used: HashSet<&str> = self
            .routes
            .iter()
            .filter_map(|r| r.credential.as_deref())
            .collect();
        self.credentials
            .keys()
            .map(String::as_str)
            .filter(move |n| used.contains(n))
    }
}

fn parse_raw(text: &str) -> Result<RawConfig, ConfigProblem> {
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

fn parse_addr(p: &mut Problems, key: &str, value: &str) -> Option<SocketAddr> {
    match value.parse::<SocketAddr>() {
        Ok(a) => Some(a),
        Err(_) => {
            p.add(
                key,
                format!("{value:?} is not an address such as \"0.0.0.0:8443\" or \"[::1]:8443\""),
            );
            None
        }
    }
}

fn resolve(base: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        base.join(path)
    }
}

fn validate(
    raw: RawConfig,
    file: &Path,
    base: &Path,
    env: &dyn Env,
    tls_override: Option<Arc<rustls::ServerConfig>>,
    p: &mut Problems,
) -> Config {
    let mut warnings = Vec::new();

    // [server]
    let s = raw.server;
    let listen = s
        .listen
        .as_deref()
        .and_then(|v| parse_addr(p, "server.listen", v));
    let plain_listen = s
        .plain_listen
        .as_deref()
        .and_then(|v| parse_addr(p, "server.plain_listen", v));
    let admin_listen = s
        .admin_listen
        .as_deref()
        .and_then(|v| parse_addr(p, "server.admin_listen", v));
    if s.listen.is_none() && s.plain_listen.is_none() {
        p.add(
            "server.listen",
            "missing: set listen (HTTPS) and/or plain_listen (cleartext)",
        );
    }
    let mut tls = None;
    if s.listen.is_some() && tls_override.is_some() {
        tls = tls_override;
    } else if s.listen.is_some() {
        match (&s.tls_cert, &s.tls_key) {
            (Some(cert), Some(key)) => {
                warn_if_exposed(&resolve(base, key), "server.tls_key", &mut warnings);
                match tls::server_config_from_files(&resolve(base, cert), &resolve(base, key)) {
                    Ok(cfg) => tls = Some(cfg),
                    Err(e) => p.add(e.key(), e.to_string()),
                }
            }
            (cert, key) => {
                if cert.is_none() {
                    p.add("server.tls_cert", "missing: required with server.listen");
                }
                if key.is_none() {
                    p.add("server.tls_key", "missing: required with server.listen");
                }
            }
        }
    } else if s.tls_cert.is_some() || s.tls_key.is_some() {
        p.add(
            "server.listen",
            "missing: tls_cert/tls_key are set but there is no HTTPS listener",
        );
    }
    let addrs: Vec<(&str, SocketAddr)> = [
        ("server.listen", listen),
        ("server.plain_listen", plain_listen),
        ("server.admin_listen", admin_listen),
    ]
    .into_iter()
    .filter_map(|(k, a)| a.map(|a| (k, a)))
    .collect();
    for (i, (k, a)) in addrs.iter().enumerate() {
        if a.port() != 0 && addrs[..i].iter().any(|(_, b)| b == a) {
            p.add(*k, format!("{a} is already used by another listener"));
        }
    }

    let proxy_path = s.proxy_path.trim_end_matches('/').to_string();
    if !proxy_path.starts_with('/') || !is_plain_path(&proxy_path) {
        p.add(
            "server.proxy_path",
            "must be an absolute path such as \"/proxy\" (letters, digits, - _ . / only)",
        );
    }

    let public_url = s.public_url.as_deref().and_then(|v| {
        match Url::parse(v) {
            Ok(u)
                if matches!(u.scheme(), "http" | "https")
                    && u.host_str().is_some()
                    && u.username().is_empty()
                    && u.password().is_none()
                    && u.query().is_none()
                    && u.fragment().is_none()
                    && (u.path() == "/" || u.path().is_empty()) =>
            {
                Some(u.as_str().trim_end_matches('/').to_string())
            }
            _ => {
                p.add(
                    "server.public_url",
                    "must be an http(s) origin such as \"https://maps.example.com\" (no path, query or userinfo)",
                );
                None
            }
        }
    });

    let mut trusted_proxies = Vec::new();
    for (i, cidr) in s.trusted_proxies.iter().enumerate() {
        let parsed = cidr
            .parse::<IpNet>()
            .or_else(|_| cidr.parse::<std::net::IpAddr>().map(IpNet::from));
        match parsed {
            Ok(n) => trusted_proxies.push(n),
            Err(_) => p.add(
                format!("server.trusted_proxies[{i}]"),
                format!("{cidr:?} is not a CIDR such as \"10.0.0.0/8\" or an IP address"),
            ),
        }
    }

    // [limits]
    let l = raw.limits;
    let positive = |p: &mut Problems, key: &str, v: u64| {
        if v == 0 {
            p.add(format!("limits.{key}"), "must be greater than 0");
        }
    };
    positive(p, "max_request_body_bytes", l.max_request_body_bytes);
    positive(
        p,
        "h2_max_concurrent_streams",
        l.h2_max_concurrent_streams.into(),
    );
    positive(p, "max_connections", l.max_connections);
    positive(p, "header_read_timeout_secs", l.header_read_timeout_secs);
    positive(
        p,
        "upstream_connect_timeout_secs",
        l.upstream_connect_timeout_secs,
    );
    positive(p, "upstream_timeout_secs", l.upstream_timeout_secs);
    if !(8192..=16 * 1024 * 1024).contains(&l.max_header_bytes) {
        p.add(
            "limits.max_header_bytes",
            "must be between 8192 and 16777216",
        );
    }
    let limits = Limits {
        max_request_body_bytes: l.max_request_body_bytes,
        max_header_bytes: l.max_header_bytes as usize,
        h2_max_concurrent_streams: l.h2_max_concurrent_streams,
        retry_body_bytes: l.retry_body_bytes.min(l.max_request_body_bytes),
        max_connections: l.max_connections.min(1 << 30) as usize,
        header_read_timeout: Duration::from_secs(l.header_read_timeout_secs),
        upstream_connect_timeout: Duration::from_secs(l.upstream_connect_timeout_secs),
        upstream_timeout: Duration::from_secs(l.upstream_timeout_secs),
    };

    // [referers]
    let referers = match RefererPolicy::compile(&raw.referers.allowed, raw.referers.allow_missing) {
        Ok(r) => r,
        Err(errs) => {
            for (i, msg) in errs {
                p.add(format!("referers.allowed[{i}]"), msg);
            }
            RefererPolicy::deny_all()
        }
    };
    if raw.referers.allowed.is_empty() && !raw.referers.allow_missing {
        warnings.push(
            "referers.allowed is empty and allow_missing is false: every proxied request will be refused"
                .into(),
        );
    }

    // [upstream]
    let mut extra_ca = Vec::new();
    if let Some(path) = &raw.upstream.extra_ca {
        match tls::load_ca_file(&resolve(base, path)) {
            Ok(certs) => extra_ca = certs,
            Err(msg) => p.add("upstream.extra_ca", msg),
        }
    }

    // [credentials.*]
    let declared: HashSet<String> = raw.credentials.keys().cloned().collect();
    if raw
        .credentials
        .values()
        .any(|c| c.client_secret.is_some() || c.api_key.is_some())
    {
        warn_if_exposed(file, "config file", &mut warnings);
    }
    let mut credentials = BTreeMap::new();
    for (name, c) in raw.credentials {
        let key = format!("credentials.{name}");
        if !is_label(&name) {
            p.add(
                &key,
                "credential names may use letters, digits, - and _ only",
            );
        }
        if let Some(cred) = validate_credential(&name, c, &key, base, env, p, &mut warnings) {
            credentials.insert(name, cred);
        }
    }

    // [[routes]]
    let mut routes = Vec::new();
    let mut mounts: Vec<(String, usize)> = Vec::new();
    let mut names: Vec<(String, usize)> = Vec::new();
    for (i, r) in raw.routes.into_iter().enumerate() {
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
        let mount = match r.mount.as_deref().map(normalise_mount) {
            None => None,
            Some(Ok(m)) => {
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
            Some(Err(msg)) => {
                p.add(format!("{key}.mount"), msg);
                None
            }
        };
        let rate_limit = match r.rate_limit {
            Some(rl) if rl.requests == 0 || rl.per_secs == 0 => {
                p.add(
                    format!("{key}.rate_limit"),
                    "requests and per_secs must both be greater than 0",
                );
                None
            }
            Some(rl) => Some((rl.requests, Duration::from_secs(rl.per_secs))),
            None => None,
        };
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
        routes.push(Route::new(
            name,
            upstream,
            r.credential,
            mount,
            r.token_in,
            r.rewrite_urls,
            rate_limit,
        ));
    }
    if routes.is_empty() && p.0.iter().all(|x| !x.key.starts_with("routes")) {
        p.add("routes", "no routes: add at least one [[routes]] table");
    }

    let rate_limit_store = raw.rate_limit.and_then(|r| {
        let ok_scheme = r.store.starts_with("redis://") || r.store.starts_with("rediss://");
        if !ok_scheme || url::Url::parse(&r.store).is_err() {
            p.add("rate_limit.store", "must be a redis:// or rediss:// URL");
            return None;
        }
        if !(1..=5000).contains(&r.budget_ms) {
            p.add("rate_limit.budget_ms", "must be between 1 and 5000");
        }
        Some(RateLimitStore {
            url: r.store,
            budget: Duration::from_millis(r.budget_ms),
            on_error: r.on_store_error,
        })
    });

    Config {
        source: file.to_path_buf(),
        server: ServerConfig {
            listen,
            tls,
            plain_listen,
            admin_listen,
            proxy_path,
            public_url,
            trusted_proxies,
            shutdown_grace: Duration::from_secs(s.shutdown_grace_secs),
        },
        limits,
        referers,
        log_format: raw.log.format,
        extra_ca,
        credentials,
        routes: RouteTable::new(routes),
        rate_limit_store,
        warnings,
    }
}

fn validate_credential(
    name: &str,
    c: RawCredential,
    key: &str,
    base: &Path,
    env: &dyn Env,
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
            let secret = load_secret(
                p,
                warnings,
                key,
                "api_key",
                c.api_key,
                c.api_key_env,
                c.api_key_file,
                base,
                env,
            )?;
            CredentialKind::ApiKey(secret)
        }
        (true, false) => {
            let token_url = match c.token_url.as_deref() {
                None => {
                    p.add(
                        format!("{key}.token_url"),
                        "missing, e.g. \"https://www.arcgis.com/sharing/rest/oauth2/token\"",
                    );
                    None
                }
                Some(v) => match Url::parse(v) {
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
                },
            };
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
            let secret = load_secret(
                p,
                warnings,
                key,
                "client_secret",
                c.client_secret,
                c.client_secret_env,
                c.client_secret_file,
                base,
                env,
            );
            CredentialKind::ClientCredentials {
                token_url: token_url?,
                client_id: client_id?,
                client_secret: secret?,
                expiration_minutes,
            }
        }
    };
    Some(CredentialConfig {
        name: name.to_string(),
        kind,
        upstream_referer,
    })
}

#[allow(clippy::too_many_arguments)]
fn load_secret(
    p: &mut Problems,
    warnings: &mut Vec<String>,
    key: &str,
    field: &str,
    inline: Option<String>,
    env_name: Option<String>,
    file: Option<PathBuf>,
    base: &Path,
    env: &dyn Env,
) -> Option<Secret> {
    let count = inline.is_some() as u8 + env_name.is_some() as u8 + file.is_some() as u8;
    if count != 1 {
        p.add(
            key,
            format!("set exactly one of {field}_env, {field}_file or {field} (found {count})"),
        );
        return None;
    }
    let value = if let Some(v) = inline {
        warnings.push(format!(
            "{key}.{field} is written inline in the config file; prefer {field}_env or {field}_file"
        ));
        v
    } else if let Some(var) = env_name {
        match env.var(&var) {
            Some(v) => v,
            None => {
                p.add(
                    format!("{key}.{field}_env"),
                    format!("environment variable {var} is not set"),
                );
                return None;
            }
        }
    } else {
        let path = resolve(base, file.as_deref().unwrap_or(Path::new("")));
        warn_if_exposed(&path, &format!("{key}.{field}_file"), warnings);
        match std::fs::read_to_string(&path) {
            Ok(v) => v.trim_end().to_string(),
            Err(e) => {
                p.add(
                    format!("{key}.{field}_file"),
                    format!("cannot read {}: {}", path.display(), e.kind()),
                );
                return None;
            }
        }
    };
    if value.trim().is_empty() {
        p.add(key, format!("{field} is empty"));
        return None;
    }
    match Secret::new(value) {
        Some(s) => Some(s),
        None => {
            p.add(
                key,
                format!("{field} contains characters not allowed in a token"),
            );
            None
        }
    }
}

/// Secrets at rest: a file holding a secret should be readable by its owner
/// only. A wider mode is a warning, not an error, because common platforms
/// mount secrets 0644 by default (Kubernetes without `defaultMode`); the
/// message says how to fix it.
pub(crate) fn warn_if_exposed(path: &Path, key: &str, warnings: &mut Vec<String>) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path) {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                warnings.push(format!(
                    "{key}: {} holds a secret but is readable by group or others (mode {mode:04o}); chmod 600 it (Kubernetes: defaultMode: 0400)",
                    path.display()
                ));
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = (path, key, warnings);
    }
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

fn is_plain_path(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'-' | b'_' | b'.'))
}

fn is_label(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'/' | b'.'))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::HashMap;

    struct MapEnv(HashMap<&'static str, &'static str>);
    impl Env for MapEnv {
        fn var(&self, name: &str) -> Option<String> {
            self.0.get(name).map(|s| s.to_string())
        }
    }

    fn env() -> MapEnv {
        MapEnv(HashMap::from([
            ("SECRET", "s3cr3t-value"),
            ("KEY", "AAPK-key"),
        ]))
    }

    /// `text` loaded with a test environment (`SECRET`, `KEY` set).
    pub(crate) fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, Path::new("test.toml"), Path::new("."), &env())
    }

    /// The smallest valid config: one route, one credential.
    pub(crate) const MINIMAL: &str = r#"
[server]
plain_listen = "127.0.0.1:0"
[referers]
allowed = ["https://app.example.com"]
[credentials.online]
token_url = "https://www.arcgis.com/sharing/rest/oauth2/token"
client_id = "abc"
client_secret_env = "SECRET"
[[routes]]
upstream = "https://basemapstyles-api.arcgis.com/arcgis/rest/services/styles/v2"
credential = "online"
mount = "/basemaps"
"#;

    #[test]
    fn minimal_config_loads() {
        let c = load(MINIMAL).unwrap();
        assert_eq!(c.routes.len(), 1);
        assert_eq!(c.server.proxy_path, "/proxy");
        assert_eq!(c.limits.max_request_body_bytes, 10 * 1024 * 1024);
        assert!(matches!(
            c.credentials["online"].kind,
            CredentialKind::ClientCredentials {
                expiration_minutes: 120,
                ..
            }
        ));
        assert_eq!(c.credentials_in_use().collect::<Vec<_>>(), ["online"]);
    }

    fn problems(text: &str) -> Vec<ConfigProblem> {
        load(text).expect_err("config should be rejected").problems
    }

    fn keys(text: &str) -> Vec<String> {
        problems(text).into_iter().map(|p| p.key).collect()
    }

    #[test]
    fn unknown_key_is_named_with_its_path() {
        let text = MINIMAL.replace("mount = \"/basemaps\"", "mount = \"/b\"\nmuont = 1");
        let p = problems(&text);
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].key, "routes[0].muont");
        assert!(p[0].message.contains("unknown field `muont`"), "{:?}", p[0]);
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let text = r#"
[server]
plain_listen = "nonsense"
trusted_proxies = ["10.0.0.0/8", "bogus"]
[referers]
allowed = ["ftp://x", "https://ok.example.com"]
[credentials.online]
token_url = "https://www.arcgis.com/sharing/rest/oauth2/token"
client_id = "abc"
client_secret_env = "MISSING_VAR"
[[routes]]
upstream = "ftp://example.com/x"
credential = "online"
[[routes]]
upstream = "https://u:p@example.com/x"
credential = "nope"
mount = "/a"
[[routes]]
upstream = "https://example.com/x?q=1"
mount = "/a/"
[[routes]]
upstream = "https://example.com/y#frag"
mount = "/proxy/x"
"#;
        let k = keys(text);
        for expected in [
            "server.plain_listen",
            "server.trusted_proxies[1]",
            "referers.allowed[0]",
            "credentials.online.client_secret_env",
            "routes[0].upstream",
            "routes[1].upstream",
            "routes[1].credential",
            "routes[2].upstream",
            "routes[2].mount",
            "routes[3].upstream",
            "routes[3].mount",
        ] {
            assert!(k.iter().any(|x| x == expected), "{expected} not in {k:?}");
        }
    }

    #[test]
    fn missing_cert_file_is_an_error() {
        let text = MINIMAL.replace(
            "plain_listen = \"127.0.0.1:0\"",
            "listen = \"127.0.0.1:0\"\ntls_cert = \"/nonexistent/c.pem\"\ntls_key = \"/nonexistent/k.pem\"",
        );
        let k = keys(&text);
        assert!(k.contains(&"server.tls_cert".to_string()), "{k:?}");
    }

    #[test]
    fn secrets_never_appear_in_messages() {
        // Inline secret with a wrong type, and an inline secret in a broken
        // credential: neither value may be echoed.
        let text = MINIMAL.replace(
            "client_secret_env = \"SECRET\"",
            "client_secret = 987654321",
        );
        let err = load(&text).unwrap_err().to_string();
        assert!(!err.contains("987654321"), "{err}");

        let text = MINIMAL.replace(
            "client_secret_env = \"SECRET\"",
            "client_secret = \"inline-zzz-secret\"\napi_key_env = \"KEY\"",
        );
        let err = load(&text).unwrap_err().to_string();
        assert!(!err.contains("inline-zzz-secret"), "{err}");
        let text = MINIMAL.replace(
            "client_id = \"abc\"",
            "client_id = \"abc\"\nbad key = \"inline-zzz\"",
        );
        let err = load(&text).unwrap_err().to_string();
        assert!(!err.contains("inline-zzz"), "{err}");
    }

    #[test]
    fn inline_secret_warns_and_secret_file_is_trimmed() {
        let text = MINIMAL.replace("client_secret_env = \"SECRET\"", "client_secret = \"x1\"");
        let c = load(&text).unwrap();
        assert!(c.warnings.iter().any(|w| w.contains("inline")));

        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("secret"), "from-file\n\n").unwrap();
        let text = MINIMAL.replace(
            "client_secret_env = \"SECRET\"",
            "client_secret_file = \"secret\"",
        );
        let c = Config::from_toml(&text, Path::new("t.toml"), dir.path(), &env()).unwrap();
        match &c.credentials["online"].kind {
            CredentialKind::ClientCredentials { client_secret, .. } => {
                assert_eq!(client_secret.expose(), "from-file")
            }
            _ => panic!("wrong kind"),
        }
    }

    #[cfg(unix)]
    #[test]
    fn files_holding_secrets_readable_by_others_are_flagged() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "s").unwrap();
        let text = MINIMAL.replace(
            "client_secret_env = \"SECRET\"",
            "client_secret_file = \"secret\"",
        );
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
        let c = Config::from_toml(&text, Path::new("t.toml"), dir.path(), &env()).unwrap();
        assert!(
            c.warnings
                .iter()
                .any(|w| w.contains("readable by group or others") && w.contains("0644")),
            "{:?}",
            c.warnings
        );
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        let c = Config::from_toml(&text, Path::new("t.toml"), dir.path(), &env()).unwrap();
        assert!(
            !c.warnings.iter().any(|w| w.contains("readable")),
            "{:?}",
            c.warnings
        );

        // A config file with an inline secret is a secret file too.
        let cfg = dir.path().join("inline.toml");
        std::fs::write(
            &cfg,
            MINIMAL.replace("client_secret_env = \"SECRET\"", "client_secret = \"x\""),
        )
        .unwrap();
        std::fs::set_permissions(&cfg, std::fs::Permissions::from_mode(0o604)).unwrap();
        let c = Config::load(&cfg, &env()).unwrap();
        assert!(
            c.warnings.iter().any(|w| w.starts_with("config file:")),
            "{:?}",
            c.warnings
        );
    }

    #[test]
    fn api_key_credential() {
        let text = MINIMAL.replace(
            "token_url = \"https://www.arcgis.com/sharing/rest/oauth2/token\"\nclient_id = \"abc\"\nclient_secret_env = \"SECRET\"",
            "api_key_env = \"KEY\"\nupstream_referer = \"https://app.example.com\"",
        );
        let c = load(&text).unwrap();
        let cred = &c.credentials["online"];
        assert!(matches!(cred.kind, CredentialKind::ApiKey(_)));
        assert_eq!(
            cred.upstream_referer.as_ref().unwrap(),
            "https://app.example.com/"
        );
    }

    #[test]
    fn cleartext_upstream_warns() {
        let text = MINIMAL.replace("https://basemapstyles", "http://basemapstyles");
        let c = load(&text).unwrap();
        assert!(c.warnings.iter().any(|w| w.contains("cleartext")));
    }

    #[test]
    fn duplicate_listeners_and_missing_listen() {
        let text = MINIMAL.replace(
            "plain_listen = \"127.0.0.1:0\"",
            "plain_listen = \"127.0.0.1:9000\"\nadmin_listen = \"127.0.0.1:9000\"",
        );
        assert!(keys(&text).contains(&"server.admin_listen".to_string()));
        let text = MINIMAL.replace("plain_listen = \"127.0.0.1:0\"", "");
        assert!(keys(&text).contains(&"server.listen".to_string()));
    }

    #[test]
    fn syntax_error_has_a_line_number() {
        let p = problems("[server\nlisten = 1");
        assert!(p[0].message.starts_with("line 1"), "{:?}", p[0]);
    }
}
