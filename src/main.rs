//! Command line: parse arguments, load config, hand over to the library.

#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use arcgis_app_proxy::config::{Config, EX_CONFIG, ProcessEnv};
use arcgis_app_proxy::{Listeners, demo};
use clap::{Parser, Subcommand};

// Many small, short-lived allocations cross worker threads (request and
// response heads, body chunks); glibc malloc contends on its arena locks
// there, mimalloc's per-thread heaps do not.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Authenticating reverse proxy for ArcGIS: anonymous web apps get ArcGIS
/// answers, never a token.
#[derive(Parser)]
#[command(name = "arcgis-app-proxy", version, about)]
struct Cli {
    /// Path of the configuration file.
    #[arg(long, global = true, default_value = "proxy.toml")]
    config: PathBuf,
    /// Serving threads, each with its own runtime and upstream pool
    /// (default: one per CPU).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Option<Command>,
}

fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[derive(Subcommand)]
enum Command {
    /// Validate the configuration, certificates and secrets; exit 0 or 78.
    Check,
    /// Run a self-contained demo: embedded fake ArcGIS and a self-signed cert.
    Demo {
        /// Address of the demo's HTTPS listener.
        #[arg(long, default_value = "127.0.0.1:8443")]
        listen: std::net::SocketAddr,
        /// Address of the demo map page.
        #[arg(long, default_value = "127.0.0.1:8080")]
        page: std::net::SocketAddr,
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
        Some(Command::Demo { listen, page }) => runtime.block_on(demo::run_cli(listen, page)),
        Some(Command::Check) => match Config::load(&cli.config, &ProcessEnv) {
            Ok(config) => {
                for w in &config.warnings {
                    eprintln!("{}: warning: {w}", cli.config.display());
                }
                println!("{}: OK", cli.config.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(EX_CONFIG as u8)
            }
        },
        None => runtime.block_on(serve(
            cli.config,
            cli.threads.unwrap_or_else(default_threads),
        )),
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
    tokio::spawn(arcgis_app_proxy::reload_on_sighup(app.clone(), path));
    match arcgis_app_proxy::server::run(app, listeners, arcgis_app_proxy::shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}
