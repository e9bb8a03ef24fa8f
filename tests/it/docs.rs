//! The reference in `docs/` against what the code accepts and produces:
//! every config key the parser knows, every metric `/metrics` exports and
//! every error message the proxy answers is documented, and the docs name
//! nothing that does not exist. Links in the docs and the README stay inside
//! the repository.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use arcgis_app_proxy::config::Config;
use arcgis_app_proxy::error::ProxyError;
use arcgis_app_proxy::policy::path::PathError;

use crate::support::*;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn doc(name: &str) -> String {
    std::fs::read_to_string(repo().join("docs").join(name))
        .unwrap_or_else(|e| panic!("docs/{name}: {e}"))
}

/// The keys serde expects where `probe` put an unknown one, read from its
/// "unknown field `zz_probe`, expected one of `a`, `b`" message.
fn expected_keys(pki: &Pki, toml: &str) -> Vec<String> {
    let text = fill_paths(pki, toml);
    let env = MapEnv(vec![("SECRET", SECRET.to_string())]);
    let err = Config::from_toml(&text, Path::new("probe.toml"), pki.dir.path(), &env)
        .expect_err("a config with an unknown key was accepted")
        .to_string();
    let line = err
        .lines()
        .find(|l| l.contains("unknown field `zz_probe`"))
        .unwrap_or_else(|| panic!("no unknown-field message in:\n{err}"));
    let list = line
        .split_once("expected one of ")
        .or_else(|| line.split_once("expected "))
        .unwrap_or_else(|| panic!("no expected keys in: {line}"))
        .1;
    let keys: Vec<String> = list
        .split('`')
        .skip(1)
        .step_by(2)
        .map(String::from)
        .collect();
    assert!(!keys.is_empty(), "{line}");
    keys
}

/// One config per section with an unknown key `zz_probe` in it, by the
/// prefix its keys carry in docs/configuration.md.
fn probes() -> Vec<(&'static str, String)> {
    let base = r#"
[server]
listen = "127.0.0.1:0"
tls_cert = "{CERT}"
tls_key = "{KEY}"
[[routes]]
upstream = "https://example.com/a"
"#;
    let with = |section: &str, line: &str| set_key(base, section, line);
    vec![
        ("", format!("zz_probe = 1\n{base}")),
        ("server.", with("server", "zz_probe = 1")),
        ("limits.", format!("{base}[limits]\nzz_probe = 1\n")),
        ("referers.", format!("{base}[referers]\nzz_probe = 1\n")),
        ("log.", format!("{base}[log]\nzz_probe = 1\n")),
        ("upstream.", format!("{base}[upstream]\nzz_probe = 1\n")),
        (
            "credentials.<name>.",
            format!("{base}[credentials.c]\nzz_probe = 1\n"),
        ),
        ("routes[].", format!("{base}zz_probe = 1\n")),
        (
            "apps[].",
            format!("{base}[[apps]]\nname = \"a\"\nzz_probe = 1\n"),
        ),
        (
            "apps[].quota.",
            format!(
                "{base}[[apps]]\nname = \"a\"\nquota = {{ requests = 1, per = \"day\", zz_probe = 1 }}\n"
            ),
        ),
        (
            "routes[].rate_limit.",
            format!("{base}rate_limit = {{ requests = 1, per_secs = 1, zz_probe = 1 }}\n"),
        ),
        (
            "rate_limit.",
            format!("{base}[rate_limit]\nstore = \"redis://127.0.0.1/\"\nzz_probe = 1\n"),
        ),
    ]
}

/// Every key of every section is in docs/configuration.md, spelled as the
/// table spells it (`server.listen`, `credentials.<name>.client_id`,
/// `routes[].mount`).
#[test]
fn every_config_key_is_documented() {
    let pki = Pki::new();
    let text = doc("configuration.md");
    let sections = probes();
    let mut missing = Vec::new();
    for (prefix, toml) in sections {
        for key in expected_keys(&pki, &toml) {
            let documented = match prefix {
                // Top-level keys are the section headings.
                "" => {
                    text.contains(&format!("`[{key}]`"))
                        || text.contains(&format!("`[{key}."))
                        || text.contains(&format!("`[[{key}]]`"))
                }
                // An inline table is one row; its fields are named in it.
                "routes[].rate_limit." | "apps[].quota." => text.contains(&format!("{key} = ")),
                _ => text.contains(&format!("`{prefix}{key}`")),
            };
            if !documented {
                missing.push(format!("{prefix}{key}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "keys missing from docs/configuration.md: {missing:?}"
    );
}

/// The documented keys exist: each `section.key` in a table's first column
/// is one the parser accepts (the probe above lists them).
#[test]
fn documented_config_keys_exist() {
    let text = doc("configuration.md");
    let pki = Pki::new();
    let mut known = BTreeSet::new();
    // Inline tables are documented as one row; the section headings too.
    for (prefix, toml) in probes()
        .into_iter()
        .filter(|(p, _)| !p.is_empty() && !p.ends_with(".quota.") && !p.ends_with(".rate_limit."))
    {
        for key in expected_keys(&pki, &toml) {
            known.insert(format!("{prefix}{key}"));
        }
    }
    let documented: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .collect();
    assert!(documented.len() > 30, "{documented:?}");
    let unknown: Vec<&&str> = documented.iter().filter(|k| !known.contains(**k)).collect();
    assert!(
        unknown.is_empty(),
        "docs/configuration.md documents keys the parser refuses: {unknown:?}"
    );
}

/// Every metric family the proxy registers is in docs/operations.md under
/// the name `/metrics` exports (`_total` for counters), and every
/// `arcgis_proxy_*` name the docs mention is registered. Families without
/// samples are not printed, so the names come from the registry calls in
/// `src/metrics.rs` and the kinds from a live `/metrics` after traffic.
#[tokio::test]
async fn every_metric_is_documented_and_exists() {
    let source = std::fs::read_to_string(repo().join("src/metrics.rs")).unwrap();
    let registered: BTreeSet<String> = source
        .split("registry.register(")
        .skip(1)
        .filter_map(|rest| rest.split('"').nth(1).map(String::from))
        .collect();
    assert!(registered.len() >= 15, "{registered:?}");

    let pki = Pki::new();
    let fake = FakeArcGis::start().await;
    let proxy = TestProxy::start(&pki, &standard_config(&fake, "")).await;
    let client = TestClient::new(&pki, proxy.addr);
    assert_eq!(client.get("/svc/features").await.status, 200);
    // Some CPU time to report: the kernel counts it in 10 ms ticks.
    let busy = std::time::Instant::now();
    let mut x = 0u64;
    while busy.elapsed() < Duration::from_millis(60) {
        x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
    }
    let admin = TestClient::plain(proxy.admin_addr.unwrap());
    let text = admin.get_with("/metrics", &[]).await.text();
    proxy.stop().await;
    // The build and the process describe themselves.
    let build = format!(
        "arcgis_proxy_build_info{{version=\"{}\",commit=\"",
        env!("CARGO_PKG_VERSION")
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with(&build) && l.ends_with("} 1")),
        "{text}"
    );
    // The test PKI's leaf keeps rcgen's default expiry, 4096-01-01T00:00:00Z.
    assert_eq!(
        sample(
            &text,
            "arcgis_proxy_tls_cert_not_after_seconds{listener=\"https\"}"
        ),
        Some(67_090_118_400.0),
        "{text}"
    );
    let rss = sample(&text, "process_resident_memory_bytes").unwrap();
    assert!(rss > 1e6, "{rss}");
    assert!(sample(&text, "process_open_fds").unwrap() >= 3.0);
    assert!(sample(&text, "process_cpu_seconds_total").unwrap() > 0.0);
    let started = sample(&text, "process_start_time_seconds").unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        started <= now + 1.0 && started > now - 3600.0,
        "{started} vs {now}"
    );
    let mut counters = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split(' ');
            let (name, kind) = (it.next().unwrap(), it.next().unwrap());
            assert!(
                registered.contains(name),
                "{name} is exported but not found in src/metrics.rs"
            );
            if kind == "counter" {
                counters.insert(name.to_string());
            }
        }
    }
    assert!(counters.contains("arcgis_proxy_requests"), "{text}");

    let ops = doc("operations.md");
    for name in &registered {
        let documented =
            ops.contains(&format!("`{name}`")) || ops.contains(&format!("`{name}_total`"));
        assert!(documented, "{name} is missing from docs/operations.md");
        if counters.contains(name) {
            assert!(
                ops.contains(&format!("`{name}_total`")),
                "docs/operations.md must name the counter {name} as {name}_total"
            );
        }
    }
    for file in [
        "operations.md",
        "errors.md",
        "behaviour.md",
        "configuration.md",
    ] {
        let text = doc(file);
        for (i, _) in text.match_indices("arcgis_proxy_") {
            let name: String = text[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let known = registered.iter().any(|r| {
                name == *r
                    || name
                        .strip_prefix(r.as_str())
                        .is_some_and(|s| ["_bucket", "_sum", "_count", "_total"].contains(&s))
            });
            assert!(known, "docs/{file} names {name}, which is not registered");
        }
    }
}

/// Every error the proxy answers is in docs/errors.md with its status and
/// exact message, and the table there lists no message the code lacks.
#[test]
fn every_error_message_is_documented() {
    let paths = [
        PathError::MissingTarget,
        PathError::MalformedTarget,
        PathError::Userinfo,
        PathError::ForbiddenCharacter,
        PathError::BadPath,
        PathError::AbsoluteForm,
    ];
    // A new variant fails to compile here until it is added above.
    for p in paths {
        match p {
            PathError::MissingTarget
            | PathError::MalformedTarget
            | PathError::Userinfo
            | PathError::ForbiddenCharacter
            | PathError::BadPath
            | PathError::AbsoluteForm => {}
        }
    }
    let mut errors: Vec<ProxyError> = paths.into_iter().map(ProxyError::BadRequest).collect();
    errors.extend([
        ProxyError::BadBody,
        ProxyError::RefererNotAllowed,
        ProxyError::NotProxied,
        ProxyError::NoRoute,
        ProxyError::MethodNotAllowed,
        ProxyError::BodyTooLarge,
        ProxyError::AppNotAllowed,
        ProxyError::RateLimited {
            retry_after: Duration::from_secs(1),
        },
        ProxyError::QuotaExhausted {
            retry_after: Duration::from_secs(1),
        },
        ProxyError::TokenUnavailable {
            retry_after: Duration::from_secs(1),
        },
        ProxyError::TokenRejected,
        ProxyError::UpstreamUnreachable,
        ProxyError::UpstreamTimeout,
        ProxyError::ShuttingDown,
    ]);
    for e in &errors {
        match e {
            ProxyError::BadRequest(_)
            | ProxyError::BadBody
            | ProxyError::RefererNotAllowed
            | ProxyError::NotProxied
            | ProxyError::NoRoute
            | ProxyError::MethodNotAllowed
            | ProxyError::BodyTooLarge
            | ProxyError::AppNotAllowed
            | ProxyError::RateLimited { .. }
            | ProxyError::QuotaExhausted { .. }
            | ProxyError::TokenUnavailable { .. }
            | ProxyError::TokenRejected
            | ProxyError::UpstreamUnreachable
            | ProxyError::UpstreamTimeout
            | ProxyError::ShuttingDown => {}
        }
    }
    let text = doc("errors.md");
    let rows: Vec<(&str, &str)> = text
        .lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let status = cells.get(1)?;
            let message = cells.get(2)?.strip_prefix('`')?.strip_suffix('`')?;
            status.parse::<u16>().ok().map(|_| (*status, message))
        })
        .collect();
    let code: Vec<(String, &str)> = errors
        .iter()
        .map(|e| (e.status().as_u16().to_string(), e.message()))
        .collect();
    for (status, message) in &code {
        assert!(
            rows.iter().any(|(s, m)| s == status && m == message),
            "docs/errors.md lacks the row {status} `{message}`"
        );
    }
    for (status, message) in &rows {
        assert!(
            code.iter().any(|(s, m)| s == status && m == message),
            "docs/errors.md documents {status} `{message}`, which the proxy never answers"
        );
    }
}

/// Relative links in the README and docs/ point at files that exist and
/// never leave the repository.
#[test]
fn links_stay_inside_the_repository() {
    let root = repo().canonicalize().unwrap();
    let mut files = vec![root.join("README.md"), root.join("CHANGELOG.md")];
    for e in std::fs::read_dir(root.join("docs")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "md") {
            files.push(p);
        }
    }
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for (i, _) in text.match_indices("](") {
            let target: String = text[i + 2..].chars().take_while(|c| *c != ')').collect();
            if target.starts_with("http://") || target.starts_with("https://") {
                continue;
            }
            let path = target.split('#').next().unwrap();
            if path.is_empty() {
                continue;
            }
            let resolved = file.parent().unwrap().join(path);
            let resolved = resolved
                .canonicalize()
                .unwrap_or_else(|e| panic!("{}: link {target}: {e}", file.display()));
            assert!(
                resolved.starts_with(&root),
                "{}: link {target} leaves the repository",
                file.display()
            );
        }
    }
}
