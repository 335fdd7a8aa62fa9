//! The `canary-proxy` binary: parses the command line, sets up logging, and runs the proxy,
//! `check`, `demo` or `rollout`. Everything else lives in the library.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use canary_proxy::config::LogFormat;
use canary_proxy::{
    AdminClient, AdminClientError, ControlPlane, Outcome, RolloutCommand, Terminal,
};
use clap::{Args, Parser, Subcommand};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// mimalloc measured +5% req/s over glibc malloc under load (benches/load.py, one core).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A canary reverse proxy: splits traffic between versions of a service by rules, sticky user
/// buckets and weights.
#[derive(Parser)]
#[command(name = "canary-proxy", version)]
struct Cli {
    /// The config file.
    #[arg(long, global = true, default_value = "canary.toml")]
    config: PathBuf,
    /// Log lines for a person (`text`) or one JSON object per line (`json`); overrides the
    /// config file's `[log] format`.
    #[arg(long, global = true, value_name = "FORMAT", value_parser = ["text", "json"])]
    log_format: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the config file and print the effective routing table.
    Check,
    /// Start two demo upstreams (v1 on 127.0.0.1:8081, v2 on :8082) and the proxy on :8080
    /// with the bundled canary.toml.
    Demo(DemoArgs),
    /// Drive and show the progressive rollout of a running proxy through its admin API.
    Rollout(RolloutArgs),
    /// Show mirroring's report (copies sent to a backend, compared with the served answers)
    /// of a running proxy through its admin API.
    Mirror(MirrorArgs),
}

#[derive(Args)]
struct MirrorArgs {
    #[command(subcommand)]
    action: Option<MirrorAction>,
    /// The proxy's admin API.
    #[arg(long, global = true, value_name = "URL", default_value = canary_proxy::DEFAULT_ADMIN_URL)]
    admin: String,
    /// Bearer token for the admin API; by default the CANARY_ADMIN_TOKEN environment variable.
    #[arg(long, global = true, value_name = "TOKEN")]
    token: Option<String>,
}

#[derive(Subcommand, Clone, Copy)]
enum MirrorAction {
    /// The report (the default): counts, the paths where the copies' answers differ (and
    /// which of them are noise), the last differences.
    Status,
}

#[derive(Args)]
struct DemoArgs {
    /// Also roll v2 out under a built-in load (500 requests/s), with a fast plan, and draw the
    /// rollout until it is promoted or rolled back.
    #[arg(long)]
    rollout: bool,
    /// With --rollout: a fault drill answers 15% of v2's requests with a 500, so the rollout
    /// rolls it back.
    #[arg(long, requires = "rollout")]
    bad_canary: bool,
    /// With --rollout: a shadow stage first (10 s at least), in which v2 gets a copy of every
    /// GET and no user, and step 1 starts only if v2's answers are as good as v1's (errors)
    /// and the same (JSON compared field by field).
    #[arg(long, requires = "rollout")]
    shadow: bool,
}

#[derive(Args)]
struct RolloutArgs {
    #[command(subcommand)]
    action: Option<RolloutAction>,
    /// The proxy's admin API.
    #[arg(long, global = true, value_name = "URL", default_value = canary_proxy::DEFAULT_ADMIN_URL)]
    admin: String,
    /// Bearer token for the admin API; by default the CANARY_ADMIN_TOKEN environment variable
    /// (which, unlike an argument, other users cannot read in the process list).
    #[arg(long, global = true, value_name = "TOKEN")]
    token: Option<String>,
}

#[derive(Subcommand, Clone, Copy)]
enum RolloutAction {
    /// Show the rollout (the default): the steps, both versions side by side, the verdicts
    /// with their intervals, the history.
    Status {
        /// Redraw every second until the rollout is promoted or rolled back (or Ctrl-C).
        #[arg(long)]
        watch: bool,
    },
    /// Start at the first step (from idle, or after a rollback).
    Start,
    /// Hold the current step's traffic; a failing verdict still rolls back.
    Pause,
    /// Go on after a pause, or approve the step that waits for approval.
    Resume,
    /// Send all of the pair's traffic to the canary now.
    Promote,
    /// Roll back now: all of the pair's traffic to the baseline.
    Abort,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The rollout demo draws in the terminal; logs below warnings would scribble over it.
    let quiet = matches!(
        &cli.command,
        Some(Command::Demo(DemoArgs { rollout: true, .. }))
    );
    // The config of the proxy this process runs, read once: its `[log]` decides the logs
    // before the proxy starts on it.
    let served = cli
        .command
        .is_none()
        .then(|| canary_proxy::config::load(&cli.config));
    init_logging(log_format(&cli, served.as_ref()), quiet);
    let result = match cli.command {
        Some(Command::Check) => check(&cli.config).map(|()| ExitCode::SUCCESS),
        Some(Command::Demo(args)) => runtime()
            .and_then(|rt| rt.block_on(demo(args)))
            .map(|()| ExitCode::SUCCESS),
        Some(Command::Rollout(args)) => runtime().and_then(|rt| rt.block_on(rollout(args))),
        Some(Command::Mirror(args)) => runtime().and_then(|rt| rt.block_on(mirror(args))),
        None => runtime()
            .and_then(|rt| {
                let config = served.expect("read above when no command is given")?;
                rt.block_on(serve(config, &cli.config))
            })
            .map(|()| ExitCode::SUCCESS),
    };
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("canary-proxy: {error:#}");
            if is_missing_config(&error) {
                eprintln!(
                    "canary-proxy: pass `--config FILE` to use a config file elsewhere, or run \
                     `canary-proxy demo` to try the proxy with two built-in upstreams"
                );
            }
            if let Some(AdminClientError::Connect { .. }) = error.downcast_ref() {
                eprintln!(
                    "canary-proxy: is the proxy running? `--admin URL` names its admin API \
                     (default {})",
                    canary_proxy::DEFAULT_ADMIN_URL
                );
            }
            ExitCode::FAILURE
        }
    }
}

/// `canary-proxy rollout ...`: exit 0 when done, 1 when the proxy refused the command (409)
/// or could not be asked.
async fn rollout(args: RolloutArgs) -> anyhow::Result<ExitCode> {
    let client = admin_client(&args.admin, args.token)?;
    let (command, watch) = match args.action {
        None => (None, false),
        Some(RolloutAction::Status { watch }) => (None, watch),
        Some(RolloutAction::Start) => (Some(RolloutCommand::Start), false),
        Some(RolloutAction::Pause) => (Some(RolloutCommand::Pause), false),
        Some(RolloutAction::Resume) => (Some(RolloutCommand::Resume), false),
        Some(RolloutAction::Promote) => (Some(RolloutCommand::Promote), false),
        Some(RolloutAction::Abort) => (Some(RolloutCommand::Abort), false),
    };
    let interrupted = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let outcome =
        canary_proxy::rollout_command(&client, command, watch, Terminal::stdout(), interrupted)
            .await?;
    Ok(match outcome {
        Outcome::Done => ExitCode::SUCCESS,
        Outcome::Refused => ExitCode::FAILURE,
    })
}

/// A client of the admin API at `admin`, with `token`, or else the one in the
/// CANARY_ADMIN_TOKEN environment variable.
fn admin_client(admin: &str, token: Option<String>) -> anyhow::Result<AdminClient> {
    let token = token.or_else(|| {
        std::env::var(canary_proxy::TOKEN_ENV)
            .ok()
            .filter(|t| !t.is_empty())
    });
    Ok(AdminClient::new(admin, token.as_deref())?)
}

/// `canary-proxy mirror [status]`: exit 0 when the report was printed.
async fn mirror(args: MirrorArgs) -> anyhow::Result<ExitCode> {
    let client = admin_client(&args.admin, args.token)?;
    match args.action {
        None | Some(MirrorAction::Status) => {
            canary_proxy::mirror_status(&client, Terminal::stdout()).await?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// True when the config file does not exist: the usual first run, in a directory without
/// `canary.toml`.
fn is_missing_config(error: &anyhow::Error) -> bool {
    matches!(
        error.downcast_ref::<canary_proxy::ConfigError>(),
        Some(canary_proxy::ConfigError::Read { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound
    )
}

/// Raises the soft limit on open files to the hard limit: every client connection takes a
/// descriptor, and often one upstream as well, so the usual soft limit of 1024 is reached by
/// a few hundred clients; the hard limit is what the operator (systemd's LimitNOFILE, ulimit
/// -Hn, the container runtime) allows. Logged either way.
fn raise_open_file_limit() {
    let before = rlimit::Resource::NOFILE.get();
    match (before, rlimit::increase_nofile_limit(u64::MAX)) {
        (Ok((soft, hard)), Ok(now)) if now > soft => {
            tracing::info!(from = soft, to = now, hard, "open file limit raised");
        }
        (_, Ok(now)) => tracing::info!(limit = now, "open file limit"),
        (_, Err(error)) => tracing::warn!(%error, "cannot raise the open file limit"),
    }
}

/// The control runtime: admin API, health checks, signals (and the demo upstreams). Client
/// traffic is served on the worker threads, each with a runtime of its own.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")
}

fn check(path: &Path) -> anyhow::Result<()> {
    use std::fmt::Write as _;
    let config = canary_proxy::config::load(path)?;
    let table =
        canary_proxy::RoutingTable::from_config(&config, 1, None, &canary_proxy::Metrics::new());
    let mut out = format!(
        "{}: ok\nproxy listens on {}, admin on {}\n{table}",
        path.display(),
        config.proxy.listen,
        config.admin.listen
    );
    if let Some(tls) = &config.proxy.tls {
        let mut certificates = format!("{} (default)", tls.default.cert_file.display());
        for sni in &tls.sni {
            let _ = write!(
                certificates,
                ", {} for {}",
                sni.certificate.cert_file.display(),
                sni.server_name
            );
        }
        let _ = writeln!(
            out,
            "proxy TLS: TLS 1.2 and 1.3, ALPN h2 and http/1.1; certificates {certificates}"
        );
    }
    if let Some(rollout) = &config.rollout {
        let a = &rollout.analysis;
        let _ = writeln!(
            out,
            "rollout: {} -> {}, steps {:?} (approve {:?}), step_time {}; analysis every {}, \
             min_requests {}, max_step_time {} then {}, error_tolerance {}, latency_tolerance {}, \
             confidence {}",
            config.backends[rollout.baseline].name,
            config.backends[rollout.canary].name,
            rollout.steps,
            rollout.approve,
            canary_proxy::format_duration(rollout.step_time),
            canary_proxy::format_duration(a.interval),
            a.min_requests,
            canary_proxy::format_duration(a.max_step_time),
            a.on_inconclusive.as_str(),
            a.error_tolerance,
            a.latency_tolerance,
            a.confidence,
        );
        if let Some(shadow) = rollout.shadow {
            let _ = writeln!(
                out,
                "rollout shadow stage: at least {} before step 1, the canary getting copies only \
                 ({}); max_diff_rate {}",
                canary_proxy::format_duration(shadow),
                match &config.mirror {
                    Some(_) => "with [mirror]'s settings",
                    None => "with mirroring's defaults",
                },
                a.max_diff_rate,
            );
        }
    }
    if let Some(mirror) = &config.mirror {
        let methods: Vec<&str> = mirror.methods.iter().map(|m| m.as_str()).collect();
        let _ = writeln!(
            out,
            "mirror: {} of {}% of {} requests -> {}, max_body {}, \
             max_in_flight {}, timeout {}, comparison {}",
            methods.join(", "),
            mirror.percent,
            mirror
                .from
                .as_ref()
                .map_or("the other backends'".to_owned(), |from| format!("{from}'s")),
            mirror.backend,
            canary_proxy::config::format_size(mirror.max_body),
            mirror.max_in_flight,
            canary_proxy::format_duration(mirror.timeout),
            if mirror.compare { "on" } else { "off" },
        );
    }
    canary_proxy::emit(&out);
    Ok(())
}

async fn serve(config: canary_proxy::Config, path: &Path) -> anyhow::Result<()> {
    start(config, path.to_owned(), shutdown_signal()?).await
}

/// Binds both listeners, starts reloading on SIGHUP, and runs until `shutdown`.
async fn start(
    config: canary_proxy::Config,
    path: PathBuf,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    raise_open_file_limit();
    let (listen, admin_listen) = (config.proxy.listen, config.admin.listen);
    let workers = canary_proxy::worker_count(config.proxy.workers);
    let control = ControlPlane::new(config, Some(path.clone()))?;
    let listeners = canary_proxy::bind_listeners(listen, workers)
        .with_context(|| format!("cannot listen on {listen}"))?;
    let admin_listener = TcpListener::bind(admin_listen)
        .await
        .with_context(|| format!("admin: cannot listen on {admin_listen}"))?;
    #[cfg(unix)]
    let hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("cannot handle SIGHUP")?;
    tracing::info!(
        listen = %listeners[0].local_addr().context("listener has no address")?,
        admin = %admin_listener.local_addr().context("admin listener has no address")?,
        workers,
        config = %path.display(),
        "canary-proxy started"
    );
    #[cfg(unix)]
    tokio::spawn(reload_on_sighup(control.clone(), hangups));
    canary_proxy::run_workers(control, listeners, admin_listener, shutdown).await?;
    Ok(())
}

/// SIGHUP re-reads the config file; a bad file is logged and the old table keeps serving.
/// The handler is registered by the caller before the proxy announces it has started.
#[cfg(unix)]
async fn reload_on_sighup(
    control: std::sync::Arc<ControlPlane>,
    mut hangups: tokio::signal::unix::Signal,
) {
    loop {
        tokio::select! {
            received = hangups.recv() => {
                if received.is_none() {
                    return;
                }
                tracing::info!("SIGHUP: reloading the config file");
                // Off the runtime (file I/O); errors are logged by the control plane.
                let _ = control.run_blocking(|control| control.reload(None)).await;
            }
            () = control.shutdown_token().cancelled() => return,
        }
    }
}

async fn demo(args: DemoArgs) -> anyhow::Result<()> {
    // The demo runs from a copy of the bundled config, so reloads and weight changes made
    // through the admin API have a file to work on.
    let path = std::env::temp_dir().join(format!("canary-proxy-demo-{}.toml", std::process::id()));
    std::fs::write(
        &path,
        canary_proxy::demo_config(args.rollout, args.bad_canary, args.shadow),
    )
    .with_context(|| format!("cannot write {}", path.display()))?;
    let config = canary_proxy::config::load(&path)?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(());
    let latency = if args.rollout {
        canary_proxy::DEMO_ROLLOUT_UPSTREAM_LATENCY
    } else {
        std::time::Duration::ZERO
    };
    for (name, port) in [("v1", 8081), ("v2", 8082)] {
        let listener = TcpListener::bind(("127.0.0.1", port))
            .await
            .with_context(|| format!("demo upstream {name}: cannot listen on 127.0.0.1:{port}"))?;
        let mut stop = stop_rx.clone();
        let answer = if args.shadow {
            canary_proxy::DemoAnswer::Json
        } else {
            canary_proxy::DemoAnswer::Text
        };
        tokio::spawn(canary_proxy::demo_upstream(
            listener,
            name,
            latency,
            answer,
            async move {
                let _ = stop.changed().await;
            },
        ));
    }
    let (proxy, admin) = (config.proxy.listen, config.admin.listen);
    if !args.rollout {
        println!(
            "canary-proxy demo: v1 on 127.0.0.1:8081, v2 on 127.0.0.1:8082, proxy on {proxy}, admin on {admin}\n\
             config: {config_path}\n\
             Try:\n  \
             curl -i http://{proxy}/                                  # weighted: 90% v1, 10% v2\n  \
             for i in $(seq 20); do curl -s http://{proxy}/; done     # see the split\n  \
             curl -i -H 'x-canary: always' http://{proxy}/            # rule: always v2\n  \
             curl -i -H 'x-user-id: alice' http://{proxy}/            # sticky: alice keeps her version\n  \
             curl -i --cookie 'uid=bob' http://{proxy}/               # sticky by cookie\n  \
             curl -i -c jar -b jar http://{proxy}/                    # anonymous: canary_uid keeps your version\n  \
             curl -s -X POST 'http://{admin}/admin/weight?v2=50'      # shift traffic\n  \
             curl -s http://{admin}/admin/routes                      # the effective table\n  \
             curl -s -H 'x-user-id: alice' http://{admin}/admin/explain  # why alice gets her version\n  \
             curl -s http://{admin}/metrics | grep canary_            # Prometheus metrics\n  \
             curl -s -X PUT http://{admin}/admin/faults -d '[{{\"backend\":\"v2\",\"abort_percent\":50}}]'  # fault drill\n\
             Ctrl-C stops it.",
            config_path = path.display()
        );
    }
    let result = match shutdown_signal() {
        Ok(shutdown) if args.rollout => {
            let stop = CancellationToken::new();
            let rollout = tokio::spawn(demo_rollout(
                proxy,
                admin,
                args.bad_canary,
                args.shadow,
                path.clone(),
                stop.clone(),
            ));
            let stopped = stop.clone();
            let shutdown = async move {
                shutdown.await;
                stopped.cancel();
            };
            let result = start(config, path.clone(), shutdown).await;
            stop.cancel();
            let _ = rollout.await;
            result
        }
        Ok(shutdown) => start(config, path.clone(), shutdown).await,
        Err(error) => Err(error),
    };
    let _ = stop_tx.send(());
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(path.with_extension("rollout.json"));
    result
}

/// The rollout part of `demo --rollout`: once the admin API answers, starts the load and the
/// rollout, draws it until it is over, then stops the load and says what to try; the proxy
/// runs on until `stop`.
async fn demo_rollout(
    proxy: std::net::SocketAddr,
    admin: std::net::SocketAddr,
    bad_canary: bool,
    shadow: bool,
    config_path: PathBuf,
    stop: CancellationToken,
) {
    let client = match AdminClient::new(&format!("http://{admin}"), None) {
        Ok(client) => client,
        Err(error) => {
            eprintln!("canary-proxy: {error}");
            return;
        }
    };
    // The admin API answers once the proxy has started (a few milliseconds).
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    while client.get("/admin/rollout").await.is_err() {
        if tokio::time::Instant::now() > deadline || stop.is_cancelled() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let load = stop.child_token();
    let per_second = canary_proxy::DEMO_LOAD_PER_SECOND;
    tokio::spawn(canary_proxy::demo_load(proxy, per_second, load.clone()));
    let v2 = if bad_canary {
        format!(
            " (a fault drill fails {}% of its requests)",
            canary_proxy::DEMO_BAD_CANARY_FAIL_PERCENT
        )
    } else {
        String::new()
    };
    let shadowed = if shadow {
        format!(
            "\n  a shadow stage first ({}): v2 gets copies of requests only, compared with v1's answers",
            canary_proxy::DEMO_SHADOW
        )
    } else {
        String::new()
    };
    let header = format!(
        "canary-proxy demo --rollout{}{}\n  \
         v1 on 127.0.0.1:8081, v2 on 127.0.0.1:8082{v2}{shadowed}\n  \
         proxy on {proxy} under {per_second} requests/s of load, admin on {admin}\n  \
         config: {}\n\n",
        if bad_canary { " --bad-canary" } else { "" },
        if shadow { " --shadow" } else { "" },
        config_path.display()
    );
    let terminal = Terminal::stdout();
    if !terminal.interactive {
        print!("{header}");
    }
    if let Err(error) = client.post("/admin/rollout/start").await {
        eprintln!("canary-proxy: the demo could not start the rollout: {error}");
        load.cancel();
        return;
    }
    let frame_header = if terminal.interactive {
        header.as_str()
    } else {
        ""
    };
    let watched =
        canary_proxy::watch_rollout(&client, terminal, frame_header, stop.cancelled()).await;
    load.cancel();
    let status = match watched {
        Ok(status) if !stop.is_cancelled() => status,
        Ok(_) => return,
        Err(error) => {
            eprintln!("canary-proxy: the demo cannot read the rollout: {error}");
            return;
        }
    };
    let took =
        rollout_seconds(&status).map_or(String::new(), |s| format!(" {s:.1} s after the start"));
    let (outcome, served_by) = if status["state"] == "promoted" {
        (format!("v2 was promoted{took}."), "v2")
    } else {
        let why = status["history"]
            .as_array()
            .and_then(|h| h.last())
            .and_then(|e| e["reason"].as_str())
            .unwrap_or("");
        (
            format!("v2 was rolled back{took}.\nReason: {why}"),
            "v1 again",
        )
    };
    let mirror = if shadow {
        "\n  canary-proxy mirror status                      # what the copies' answers showed"
    } else {
        ""
    };
    println!(
        "\nThe rollout is over: {outcome}\n\
         The load has stopped; the proxy runs on. Try:\n  \
         curl -i http://{proxy}/                  # served by {served_by}\n  \
         canary-proxy rollout status                     # this view, from the admin API{mirror}\n  \
         curl -s http://{admin}/admin/rollout     # the JSON behind it\n  \
         curl -s http://{admin}/metrics | grep canary_rollout\n\
         Ctrl-C stops it."
    );
}

/// The log format: `--log-format`, else the `[log] format` of the config the process serves
/// (a file that cannot be read is reported once logging is up), else text.
fn log_format(
    cli: &Cli,
    served: Option<&Result<canary_proxy::Config, canary_proxy::ConfigError>>,
) -> LogFormat {
    if let Some(name) = &cli.log_format {
        return LogFormat::parse(name).unwrap_or_default();
    }
    served
        .and_then(|config| config.as_ref().ok())
        .map_or(LogFormat::Text, |config| config.log.format)
}

/// Logs to stderr through `tracing` (`RUST_LOG` filters; info by default, warnings only when
/// `quiet`): text, or one JSON object per line with the event's fields at the top level.
fn init_logging(format: LogFormat, quiet: bool) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(if quiet { "warn" } else { "info" }));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init(),
    }
}

/// Seconds from the latest start to the last transition, from the rollout's history.
fn rollout_seconds(status: &Value) -> Option<f64> {
    let history = status["history"].as_array()?;
    let started = history.iter().rev().find(|e| e["event"] == "started")?["at"].as_u64()?;
    let ended = history.last()?["at"].as_u64()?;
    Some(ended.saturating_sub(started) as f64 / 1000.0)
}

/// Registers SIGINT and SIGTERM handlers now (a signal arriving before registration would
/// kill the process) and returns a future that completes on either.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut interrupt = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
        let mut terminate = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
        Ok(async move {
            tokio::select! {
                _ = interrupt.recv() => {},
                _ = terminate.recv() => {},
            }
            tracing::info!("shutdown signal received");
        })
    }
    #[cfg(not(unix))]
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("shutdown signal received");
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn rollout_defaults_to_status_and_takes_admin_and_token_before_or_after_the_command() {
        let parse = |args: &[&str]| match Cli::try_parse_from(args).map(|cli| cli.command) {
            Ok(Some(Command::Rollout(args))) => args,
            _ => panic!("{args:?} is not a rollout command"),
        };
        let default = parse(&["canary-proxy", "rollout"]);
        assert!(default.action.is_none());
        assert_eq!(default.admin, canary_proxy::DEFAULT_ADMIN_URL);
        assert!(default.token.is_none());
        let before = parse(&["canary-proxy", "rollout", "--admin", "http://h:1", "pause"]);
        assert!(matches!(before.action, Some(RolloutAction::Pause)));
        assert_eq!(before.admin, "http://h:1");
        let after = parse(&[
            "canary-proxy",
            "rollout",
            "status",
            "--watch",
            "--token",
            "t",
        ]);
        assert!(matches!(
            after.action,
            Some(RolloutAction::Status { watch: true })
        ));
        assert_eq!(after.token.as_deref(), Some("t"));
        assert!(Cli::try_parse_from(["canary-proxy", "rollout", "restart"]).is_err());
    }
}
