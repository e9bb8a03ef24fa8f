//! Command line: parse arguments, load config, hand over to the library.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use arcgis_app_proxy::config::{Config, EX_CONFIG, ProcessEnv};
use arcgis_app_proxy::{Listeners, demo, healthcheck};
use clap::{Parser, Subcommand};

// Many small, short-lived allocations cross worker threads (request and
// response heads, body chunks); glibc malloc contends on its arena locks
// there, mimalloc's per-thread heaps do not.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Authenticating reverse proxy for ArcGIS: anonymous web apps get ArcGIS
/// answers, never a token.
#[derive(Parser)]
#[command(name = "arcgis-app-proxy", version = arcgis_app_proxy::VERSION, about)]
struct Cli {
    /// Path of the configuration file.
    #[arg(short = 'c', long, global = true, default_value = "proxy.toml")]
    config: PathBuf,
    /// Serving threads, each with its own runtime and upstream pool
    /// (default: one per CPU).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Format {
    Text,
    Json,
}

fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[derive(Subcommand)]
enum Command {
    /// Validate the configuration, certificates and secrets; exit 0 or 78.
    Check {
        /// `text` (one line per problem) or `json` (one object, for tools).
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Convert an Esri resource-proxy proxy.config (XML) or proxy.json into a
    /// proxy.toml on stdout, with a review list on stderr; exit 0, or 78 when
    /// something cannot be carried over safely.
    ImportEsri {
        /// The resource-proxy configuration file.
        file: PathBuf,
    },
    /// Ask a running proxy's admin listener whether it is healthy; exit 0
    /// (2xx) or 1. For container HEALTHCHECKs and exec probes.
    Healthcheck {
        /// URL to GET; default `http://<admin_listen>/healthz` from the config.
        #[arg(long)]
        url: Option<String>,
        /// Seconds to wait for the answer.
        #[arg(long, default_value_t = 5)]
        timeout: u64,
    },
    /// Run a self-contained demo: embedded fake ArcGIS and a self-signed cert.
    Demo {
        /// Address of the demo's HTTPS listener.
        #[arg(long, default_value = "127.0.0.1:8443")]
        listen: std::net::SocketAddr,
        /// Address of the demo map page.
        #[arg(long, default_value = "127.0.0.1:8080")]
        page: std::net::SocketAddr,
        /// Use the fake ArcGIS of another running demo (its `host:port`)
        /// instead of starting one in this process; `bench/pgo-build`
        /// trains the proxy this way, with its upstream in another process.
        #[arg(long, value_name = "ADDR")]
        fake: Option<std::net::SocketAddr>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The main thread's runtime runs signals, the admin listener and token
    // refreshes; requests are served on their own per-thread runtimes.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("arcgis-app-proxy: cannot start runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Some(Command::Demo { listen, page, fake }) => {
            runtime.block_on(demo::run_cli(listen, page, fake))
        }
        Some(Command::Check { format }) => check(&cli.config, format),
        Some(Command::ImportEsri { file }) => import_esri(&file),
        Some(Command::Healthcheck { url, timeout }) => {
            runtime.block_on(healthcheck(&cli.config, url, timeout))
        }
        None => runtime.block_on(serve(
            cli.config,
            cli.threads.unwrap_or_else(default_threads),
        )),
    }
}

/// `check`: every problem, one line each (or one JSON object); exit 0 or 78.
fn check(path: &std::path::Path, format: Format) -> ExitCode {
    let result = Config::load(path, &ProcessEnv);
    if format == Format::Json {
        let (ok, problems, warnings) = match &result {
            Ok(config) => (true, Vec::new(), config.warnings.clone()),
            Err(e) => (
                false,
                e.problems
                    .iter()
                    .map(|p| serde_json::json!({"key": p.key, "message": p.message}))
                    .collect(),
                Vec::new(),
            ),
        };
        let out = serde_json::json!({
            "file": path.display().to_string(),
            "ok": ok,
            "problems": problems,
            "warnings": warnings,
        });
        println!("{out}");
        return if ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(EX_CONFIG as u8)
        };
    }
    match result {
        Ok(config) => {
            for w in &config.warnings {
                eprintln!("{}: warning: {w}", path.display());
            }
            println!("{}: OK", path.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(EX_CONFIG as u8)
        }
    }
}

/// `import-esri`: the new config on stdout, what to review and which
/// variables to set on stderr (never a secret value).
fn import_esri(file: &std::path::Path) -> ExitCode {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("import-esri: {}: {e}", file.display());
            return ExitCode::FAILURE;
        }
    };
    let out = match arcgis_app_proxy::import::import(&text) {
        Ok(out) => out,
        Err(e) => {
            eprintln!("import-esri: {}: {e}", file.display());
            return ExitCode::from(EX_CONFIG as u8);
        }
    };
    print!("{}", out.toml);
    for note in &out.notes {
        eprintln!("review: {note}");
    }
    if !out.variables.is_empty() {
        eprintln!(
            "set these environment variables to the secrets of the old file (values are not copied):"
        );
        for v in &out.variables {
            eprintln!("  {v}");
        }
    }
    if out.refused {
        eprintln!(
            "import-esri: not everything could be carried over safely (see above); do not use this output as it is"
        );
        ExitCode::from(EX_CONFIG as u8)
    } else {
        ExitCode::SUCCESS
    }
}

/// `healthcheck`: exit 0 when the admin listener answers 2xx, else 1.
async fn healthcheck(path: &std::path::Path, url: Option<String>, timeout: u64) -> ExitCode {
    let url = match url {
        Some(u) => u,
        None => match Config::admin_listen_in(path) {
            Ok(Some(addr)) => healthcheck::default_url(addr),
            Ok(None) => {
                eprintln!(
                    "healthcheck: {} has no server.admin_listen; pass --url",
                    path.display()
                );
                return ExitCode::FAILURE;
            }
            Err(e) => {
                eprintln!("healthcheck: {e}");
                return ExitCode::FAILURE;
            }
        },
    };
    match healthcheck::probe(&url, std::time::Duration::from_secs(timeout.max(1))).await {
        Ok(status) if (200..300).contains(&status) => {
            println!("healthcheck: {url}: {status}");
            ExitCode::SUCCESS
        }
        Ok(status) => {
            eprintln!("healthcheck: {url}: {status}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("healthcheck: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(path: PathBuf, threads: usize) -> ExitCode {
    let config = match Config::load(&path, &ProcessEnv) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EX_CONFIG as u8);
        }
    };
    arcgis_app_proxy::init_logging(config.log_format);
    for w in &config.warnings {
        tracing::warn!(config = %path.display(), "{w}");
    }
    tracing::info!("{}", config.outbound.describe());
    let listeners = match Listeners::bind(&config).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    for (what, l) in [
        ("https", &listeners.tls),
        ("http", &listeners.plain),
        ("admin", &listeners.admin),
    ] {
        if let Some(addr) = l.as_ref().and_then(|l| l.local_addr().ok()) {
            tracing::info!(listener = what, %addr, "listening");
        }
    }
    let app = arcgis_app_proxy::App::with_shards(config, threads);
    tokio::spawn(arcgis_app_proxy::reload_on_sighup(
        app.clone(),
        path.clone(),
    ));
    tokio::spawn(arcgis_app_proxy::reload_on_change(app.clone(), path));
    // Ready once the listeners are bound and SIGHUP is handled.
    #[cfg(unix)]
    arcgis_app_proxy::notify::ready("serving");
    match arcgis_app_proxy::server::run(app, listeners, arcgis_app_proxy::shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}
