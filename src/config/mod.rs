//! `proxy.toml`: what the file says (`raw`, strict serde) and what the
//! proxy runs on ([`Config`], validated once, typed and precompiled).
//!
//! One module per section validates it into the shared problem collector:
//! `server`, `limits`, `routes`, `credentials` (with `secrets`)
//! and `rate_limit`; the small `[referers]`, `[upstream]` and `[log]`
//! sections are checked here. Validation collects every problem before
//! giving up, each naming the file and the key (`routes[2].upstream`), so an
//! operator fixes a config in one pass. Messages never quote secret values;
//! values that are not secrets are quoted only where that helps (a bad URL,
//! an unknown credential name).

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls_pki_types::CertificateDer;
use serde::Deserialize;

mod apps;
mod credentials;
mod limits;
mod rate_limit;
pub mod raw;
mod routes;
mod secrets;
mod server;
mod upstream;

pub use apps::{AppConfig, Apps, NONE_APP};
pub use credentials::{CredentialConfig, CredentialKind};
pub use limits::Limits;
pub use rate_limit::{RateLimitStore, StoreFallback};
pub use raw::RawConfig;
pub use secrets::Secret;
pub use server::ServerConfig;
pub use upstream::{OutboundProxy, ProxyUrl};

use crate::policy::referer::RefererPolicy;
use crate::policy::route::RouteTable;
use crate::tls;
use routes::{is_label, is_plain_path};

/// Exit code for a configuration error (sysexits `EX_CONFIG`).
pub const EX_CONFIG: i32 = 78;

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
    /// Compiled Referer/Origin allowlist: which app a request belongs to.
    pub referers: RefererPolicy,
    /// Every app (`[[apps]]`, one per `[referers] allowed` entry, `none`).
    pub apps: Apps,
    /// Log format.
    pub log_format: LogFormat,
    /// Extra trust roots for upstream TLS.
    pub extra_ca: Vec<CertificateDer<'static>>,
    /// The outbound proxy upstream and token connections go through.
    pub outbound: OutboundProxy,
    /// Credentials by name.
    pub credentials: BTreeMap<String, CredentialConfig>,
    /// Compiled route table.
    pub routes: RouteTable,
    /// Shared rate-limit store, if any.
    pub rate_limit_store: Option<RateLimitStore>,
    /// Non-fatal findings (inline secrets, cleartext upstreams), logged at start.
    pub warnings: Vec<String>,
    /// Every file the config was built from: itself, the certificate, key,
    /// secret and CA files. A change to any of them is reloaded like SIGHUP.
    pub watched: Vec<PathBuf>,
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

/// The problem collector every section validates into.
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

    /// `server.admin_listen` of the file at `path`, read without validating
    /// anything else (no secrets or certificates needed): what
    /// `arcgis-app-proxy healthcheck` probes when it is given no URL.
    pub fn admin_listen_in(path: &Path) -> Result<Option<std::net::SocketAddr>, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        let raw = raw::parse(&text).map_err(|p| format!("{}: {}", path.display(), p.message))?;
        raw.server
            .admin_listen
            .map(|a| {
                a.parse().map_err(|_| {
                    format!(
                        "{}: server.admin_listen: {a:?} is not an address",
                        path.display()
                    )
                })
            })
            .transpose()
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
        let raw = raw::parse(text).map_err(|p| fail(vec![p]))?;
        let mut problems = Problems(Vec::new());
        let config = validate(raw, file, base_dir, env, tls, &mut problems);
        if problems.0.is_empty() {
            Ok(config)
        } else {
            Err(fail(problems.0))
        }
    }

    /// Names of credentials some route uses, directly or as an app's
    /// replacement for the route's credential.
    pub fn credentials_in_use(&self) -> impl Iterator<Item = &str> {
        let mut used: HashSet<&str> = self
            .routes
            .iter()
            .filter_map(|r| r.credential.as_deref())
            .collect();
        let replacements: Vec<&str> = self
            .apps
            .iter()
            .flat_map(|a| a.credentials.iter())
            .filter(|(from, _)| used.contains(from.as_str()))
            .map(|(_, to)| to.as_str())
            .collect();
        used.extend(replacements);
        self.credentials
            .keys()
            .map(String::as_str)
            .filter(move |n| used.contains(n))
    }
}

/// Where relative paths and `*_env` names in the config resolve: the
/// config file's directory and the environment.
#[derive(Clone, Copy)]
struct Files<'a> {
    base: &'a Path,
    env: &'a dyn Env,
}

fn resolve(base: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        base.join(path)
    }
}

/// Validates each section of `raw` into `p`; the config is only used when
/// `p` stays empty.
fn validate(
    raw: RawConfig,
    file: &Path,
    base: &Path,
    env: &dyn Env,
    tls_override: Option<Arc<rustls::ServerConfig>>,
    p: &mut Problems,
) -> Config {
    let mut warnings = Vec::new();
    let watched = watched_files(&raw, file, base);
    let server = server::validate(raw.server, base, tls_override, p, &mut warnings);
    let limits = limits::validate(raw.limits, p);
    let declared: HashSet<String> = raw.credentials.keys().cloned().collect();
    // [[apps]] and [referers]
    let (apps, referers) = apps::validate(raw.apps, &raw.referers, &declared, p);
    if raw.referers.allowed.is_empty() && apps.len() == 1 && !raw.referers.allow_missing {
        warnings.push(
            "referers.allowed is empty, there are no [[apps]] and allow_missing is false: every proxied request will be refused"
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
    let outbound = upstream::validate_proxy(&raw.upstream, env, p);

    let mut credentials =
        credentials::validate(raw.credentials, file, Files { base, env }, p, &mut warnings);
    let routes = routes::validate(
        raw.routes,
        &declared,
        &apps,
        &server.proxy_path,
        p,
        &mut warnings,
    );
    credentials::discover_from_routes(&mut credentials, &routes, p);
    let rate_limit_store =
        rate_limit::validate(raw.rate_limit, Files { base, env }, p, &mut warnings);
    Config {
        source: file.to_path_buf(),
        server,
        limits,
        referers,
        apps,
        log_format: raw.log.format,
        extra_ca,
        outbound,
        credentials,
        routes,
        rate_limit_store,
        warnings,
        watched,
    }
}

/// The files `raw` names (resolved against `base`), and `file` itself.
fn watched_files(raw: &RawConfig, file: &Path, base: &Path) -> Vec<PathBuf> {
    let mut out = vec![file.to_path_buf()];
    out.extend(raw.server.tls_cert.iter().map(|p| resolve(base, p)));
    out.extend(raw.server.tls_key.iter().map(|p| resolve(base, p)));
    out.extend(raw.upstream.extra_ca.iter().map(|p| resolve(base, p)));
    for c in raw.credentials.values() {
        for f in [&c.client_secret_file, &c.api_key_file]
            .into_iter()
            .flatten()
        {
            out.push(resolve(base, f));
        }
    }
    out.sort();
    out.dedup();
    out
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
    fn apps_load_with_their_settings_and_the_legacy_entries() {
        let text = format!(
            "{MINIMAL}{}",
            r#"
[credentials.parks]
api_key_env = "KEY"
[[apps]]
name = "parks-map"
referers = ["https://parks.example.org", "https://*.parks.example.org"]
credentials = { online = "parks" }
rate_limit = { requests = 120, per_secs = 60 }
quota = { requests = 50000, per = "day" }
"#
        )
        .replace(
            "mount = \"/basemaps\"",
            "mount = \"/basemaps\"\napps = [\"parks-map\", \"none\"]",
        );
        let c = load(&text).unwrap();
        let names: Vec<&str> = c.apps.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(names, ["parks-map", "https://app.example.com", "none"]);
        let parks = c.apps.get(0);
        assert!(parks.declared);
        assert_eq!(
            parks.rate_limit,
            Some((120, std::time::Duration::from_secs(60)))
        );
        assert_eq!(
            parks.quota,
            Some(crate::policy::quota::QuotaSpec {
                requests: 50000,
                per: crate::policy::quota::Window::Day
            })
        );
        assert_eq!(c.apps.credential_for(0, "online"), "parks");
        assert_eq!(c.apps.credential_for(1, "online"), "online");
        let route = c.routes.iter().next().unwrap();
        assert_eq!(route.apps.as_deref(), Some(&[0, 2][..]));
        // The replacement credential is in use: it gets a refresher and
        // counts for readiness.
        let mut used: Vec<&str> = c.credentials_in_use().collect();
        used.sort_unstable();
        assert_eq!(used, ["online", "parks"]);
    }

    #[test]
    fn app_mistakes_are_named_by_key() {
        let text = format!(
            "{MINIMAL}{}",
            r#"
[[apps]]
name = "Parks Map"
referers = ["https://app.example.com"]
credentials = { online = "nope", missing = "online" }
quota = { requests = 0, per = "week" }
rate_limit = { requests = 0, per_secs = 60 }
[[apps]]
name = "none"
referers = ["https://b.example.com"]
[[apps]]
name = "dup"
referers = []
[[apps]]
name = "dup"
referers = ["ftp://x"]
"#
        )
        .replace(
            "mount = \"/basemaps\"",
            "mount = \"/basemaps\"\napps = [\"ghost\"]",
        );
        let p = problems(&text);
        let k: Vec<&str> = p.iter().map(|p| p.key.as_str()).collect();
        for expected in [
            "apps[0].name",
            "apps[0].credentials.online",
            "apps[0].credentials.missing",
            "apps[0].quota.per",
            "apps[0].quota.requests",
            "apps[0].rate_limit",
            "apps[1].name",
            "apps[2].referers",
            "apps[3].name",
            "apps[3].referers[0]",
            "routes[0].apps[0]",
        ] {
            assert!(k.contains(&expected), "{expected} not in {k:?}");
        }
        // The same origin in an app and in [referers] allowed.
        let dup = p
            .iter()
            .find(|p| p.key == "referers.allowed[0]")
            .expect("duplicate entry not reported");
        assert!(dup.message.contains("apps[0].referers[0]"), "{dup:?}");
        assert!(dup.message.contains("Parks Map"), "{dup:?}");
    }

    #[test]
    fn rate_limit_store_combinations_that_cannot_work_are_refused() {
        for (store, expected) in [
            (
                "store = \"redis://:inline@127.0.0.1/\"\nstore_password_env = \"SECRET\"",
                "rate_limit.store",
            ),
            (
                "store = \"redis://127.0.0.1/\"\nstore_ca = \"ca.pem\"",
                "rate_limit.store_ca",
            ),
            (
                "store = \"rediss://127.0.0.1/\"\nstore_ca = \"/nonexistent/ca.pem\"",
                "rate_limit.store_ca",
            ),
            (
                "store = \"rediss://127.0.0.1/\"\nstore_password_env = \"UNSET_VAR\"",
                "rate_limit.store_password_env",
            ),
            ("store = \"http://127.0.0.1/\"", "rate_limit.store"),
        ] {
            let text = format!("{MINIMAL}[rate_limit]\n{store}\n");
            let k = keys(&text);
            assert!(k.iter().any(|x| x == expected), "{store}: {k:?}");
        }
        // A password from the environment, never in a message or Debug.
        let text = format!(
            "{MINIMAL}[rate_limit]\nstore = \"rediss://127.0.0.1/\"\nstore_password_env = \"SECRET\"\n"
        );
        let c = load(&text).unwrap();
        let store = c.rate_limit_store.as_ref().unwrap();
        assert_eq!(store.password.as_ref().unwrap().expose(), "s3cr3t-value");
        assert!(!format!("{store:?}").contains("s3cr3t"));
        // An inline password is a warning; over cleartext to another host too.
        let text = format!("{MINIMAL}[rate_limit]\nstore = \"redis://:pw@redis.example.net/\"\n");
        let w = load(&text).unwrap().warnings.join("\n");
        assert!(w.contains("inline"), "{w}");
        assert!(w.contains("unencrypted"), "{w}");
    }

    #[test]
    fn username_credentials_and_their_mistakes() {
        let with = |cred: &str, upstream: &str| {
            MINIMAL
                .replace(
                    "token_url = \"https://www.arcgis.com/sharing/rest/oauth2/token\"\nclient_id = \"abc\"\nclient_secret_env = \"SECRET\"",
                    cred,
                )
                .replace(
                    "https://basemapstyles-api.arcgis.com/arcgis/rest/services/styles/v2",
                    upstream,
                )
        };
        // Discovered from the route: …/rest/info?f=json of its upstream.
        let c = load(&with(
            "username = \"svc\"\npassword_env = \"SECRET\"",
            "https://gis.example.com/server/rest/services/Parks/MapServer",
        ))
        .unwrap();
        let CredentialKind::UserPassword {
            token_url,
            info_url,
            username,
            password,
            expiration_minutes,
        } = &c.credentials["online"].kind
        else {
            panic!("{:?}", c.credentials["online"].kind)
        };
        assert!(token_url.is_none());
        assert_eq!(
            info_url.as_ref().unwrap().as_str(),
            "https://gis.example.com/server/rest/info?f=json"
        );
        assert_eq!((username.as_str(), *expiration_minutes), ("svc", 120));
        assert_eq!(password.expose(), "s3cr3t-value");
        assert!(!format!("{:?}", c.credentials).contains("s3cr3t"));
        for (cred, upstream, key) in [
            (
                "username = \"svc\"",
                "https://gis.example.com/arcgis/rest/services",
                "credentials.online",
            ),
            (
                "username = \"svc\"\npassword_env = \"UNSET\"",
                "https://gis.example.com/arcgis/rest/services",
                "credentials.online.password_env",
            ),
            (
                "username = \"svc\"\npassword_env = \"SECRET\"\nclient_id = \"x\"",
                "https://gis.example.com/arcgis/rest/services",
                "credentials.online",
            ),
            (
                "username = \"\"\npassword_env = \"SECRET\"",
                "https://gis.example.com/arcgis/rest/services",
                "credentials.online.username",
            ),
            // Nothing to discover the token service from.
            (
                "username = \"svc\"\npassword_env = \"SECRET\"",
                "https://gis.example.com/maps",
                "credentials.online.token_url",
            ),
        ] {
            let k = keys(&with(cred, upstream));
            assert!(k.iter().any(|x| x == key), "{cred}: {k:?}");
        }
        // A bad token_url does not hide the other problems of the table.
        let k = keys(&with(
            "username = \"\"\npassword_env = \"UNSET\"\ntoken_url = \"ftp://x\"",
            "https://gis.example.com/arcgis/rest/services",
        ));
        for key in [
            "credentials.online.token_url",
            "credentials.online.username",
            "credentials.online.password_env",
        ] {
            assert!(k.iter().any(|x| x == key), "{key}: {k:?}");
        }
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
