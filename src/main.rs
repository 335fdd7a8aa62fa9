//! The `canary-proxy` binary: parses the command line, sets up logging, and runs the proxy,
//! `check` or `demo`. Everything else lives in the library.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

/// A canary reverse proxy: splits traffic between versions of a service by rules, sticky user
/// buckets and weights.
#[derive(Parser)]
#[command(name = "canary-proxy", version)]
struct Cli {
    /// The config file.
    #[arg(long, global = true, default_value = "canary.toml")]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the config file and print the effective routing table.
    Check,
    /// Start two demo upstreams (v1 on 127.0.0.1:8081, v2 on :8082) and the proxy on :8080
    /// with the bundled canary.toml.
    Demo,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let result = match cli.command {
        Some(Command::Check) => check(&cli.config),
        Some(Command::Demo) => runtime().and_then(|rt| rt.block_on(demo())),
        None => runtime().and_then(|rt| rt.block_on(serve(&cli.config))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("canary-proxy: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")
}

fn check(path: &Path) -> anyhow::Result<()> {
    let config = canary_proxy::config::load(path)?;
    let table = canary_proxy::RoutingTable::from_config(&config, 1, None);
    println!("{}: ok", path.display());
    println!(
        "proxy listens on {}, admin on {}",
        config.proxy.listen, config.admin.listen
    );
    print!("{table}");
    Ok(())
}

async fn serve(path: &Path) -> anyhow::Result<()> {
    let config = canary_proxy::config::load(path)?;
    let listener = TcpListener::bind(config.proxy.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.proxy.listen))?;
    let bound = listener.local_addr().context("listener has no address")?;
    tracing::info!(listen = %bound, config = %path.display(), "canary-proxy started");
    canary_proxy::run(&config, listener, shutdown_signal()).await;
    Ok(())
}

async fn demo() -> anyhow::Result<()> {
    let config = canary_proxy::config::parse(canary_proxy::DEMO_CONFIG, "canary.toml (bundled)")?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(());
    for (name, port) in [("v1", 8081), ("v2", 8082)] {
        let listener = TcpListener::bind(("127.0.0.1", port))
            .await
            .with_context(|| format!("demo upstream {name}: cannot listen on 127.0.0.1:{port}"))?;
        let mut stop = stop_rx.clone();
        tokio::spawn(canary_proxy::demo_upstream(listener, name, async move {
            let _ = stop.changed().await;
        }));
    }
    let listener = TcpListener::bind(config.proxy.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.proxy.listen))?;
    let proxy = config.proxy.listen;
    println!(
        "canary-proxy demo: v1 on 127.0.0.1:8081, v2 on 127.0.0.1:8082, proxy on {proxy}\n\
         Try:\n  \
         curl -i http://{proxy}/                                   # weighted: 90% v1, 10% v2\n  \
         for i in $(seq 20); do curl -s http://{proxy}/; done      # see the split\n  \
         curl -i -H 'x-canary: always' http://{proxy}/             # rule: always v2\n  \
         curl -i -H 'x-user-id: alice' http://{proxy}/             # sticky: alice always gets the same version\n  \
         curl -i --cookie 'uid=bob' http://{proxy}/                # sticky by cookie\n\
         Ctrl-C stops it."
    );
    canary_proxy::run(&config, listener, shutdown_signal()).await;
    let _ = stop_tx.send(());
    Ok(())
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutdown signal received");
}
