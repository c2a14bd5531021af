//! The `regcache` command line: parses arguments and dispatches to the
//! supervisor (default) or a worker. All logic lives in the crates.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use regcache_supervisor::client_auth::Htpasswd;
use regcache_supervisor::config;
use regcache_worker::config as wconfig;

/// EX_USAGE: the configuration is wrong.
const EXIT_CONFIG: u8 = 64;
/// EX_UNAVAILABLE: could not start (port taken, storage unwritable).
const EXIT_START: u8 = 69;

#[derive(Parser)]
#[command(
    name = "regcache",
    version,
    about = "Pull-through cache for container images: every upstream registry behind one address"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    front: FrontArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Run the cache (the default): the front listener and one worker per upstream.
    Serve(FrontArgs),
    /// Parse CONFIG and print upstreams, names, storage roots and routing rules.
    CheckConfig(FrontArgs),
    /// Internal: serve one upstream's cache (started by the supervisor).
    Worker(WorkerArgs),
    /// Exit 0 when the regcache listening on --listen is ready, else 1
    /// (for container HEALTHCHECKs: the runtime image has no curl).
    Healthcheck(HealthArgs),
}

#[derive(Args)]
struct HealthArgs {
    /// The address regcache listens on; 0.0.0.0 and [::] are probed on loopback.
    #[arg(long, env = "REGCACHE_LISTEN", default_value = "0.0.0.0:5000")]
    listen: SocketAddr,
    /// regcache's metrics listener, probed instead of the front when set.
    #[arg(long, env = "REGCACHE_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
}

#[derive(Args, Clone)]
struct FrontArgs {
    /// CONFIG as a file (JSON list of registries); else the CONFIG variable,
    /// else the embedded list of common public registries.
    #[arg(long, env = "CONFIG_FILE", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address of the front listener.
    #[arg(long, env = "REGCACHE_LISTEN", default_value = "0.0.0.0:5000")]
    listen: SocketAddr,
    /// Optional second listener for /metrics, /healthz and /readyz only.
    #[arg(long, env = "REGCACHE_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Root of all caches (each upstream gets a subdirectory).
    /// Default: REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY, else ./regcache-data.
    #[arg(long, env = "REGCACHE_STORAGE", value_name = "DIR")]
    storage: Option<PathBuf>,
}

#[derive(Args)]
struct WorkerArgs {
    /// Upstream registry base URL, e.g. https://ghcr.io.
    #[arg(long)]
    upstream: String,
    /// This upstream's cache directory.
    #[arg(long, value_name = "DIR")]
    storage: PathBuf,
    /// Unix socket to serve on.
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// TCP address to serve on (to run a worker on its own).
    #[arg(long)]
    listen: Option<SocketAddr>,
}

fn main() -> ExitCode {
    init_logging();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    match cli.command {
        None => runtime.block_on(serve(cli.front)),
        Some(Command::Serve(args)) => runtime.block_on(serve(args)),
        Some(Command::CheckConfig(args)) => check_config(args),
        Some(Command::Worker(args)) => runtime.block_on(worker(args)),
        Some(Command::Healthcheck(args)) => runtime.block_on(healthcheck(args)),
    }
}

/// `GET /readyz` on the local listener: the metrics listener when there is
/// one (plain HTTP, never behind client auth), else the front, over HTTPS
/// when it serves TLS (loopback: the certificate's name is not checked).
async fn healthcheck(args: HealthArgs) -> ExitCode {
    let loopback = |mut addr: SocketAddr| {
        if addr.ip().is_unspecified() {
            addr.set_ip(match addr {
                SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        addr
    };
    let tls = std::env::var_os("REGISTRY_HTTP_TLS_CERTIFICATE").is_some_and(|v| !v.is_empty());
    let url = match (args.metrics_listen, tls) {
        (Some(m), _) => format!("http://{}/readyz", loopback(m)),
        (None, true) => format!("https://{}/readyz", loopback(args.listen)),
        (None, false) => format!("http://{}/readyz", loopback(args.listen)),
    };
    regcache_worker::init_tls();
    let client = reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .timeout(Duration::from_secs(5))
        .no_proxy()
        .build();
    let answer = match client {
        Ok(c) => c.get(&url).send().await,
        Err(e) => Err(e),
    };
    match answer {
        Ok(r) if r.status().is_success() => ExitCode::SUCCESS,
        Ok(r) => {
            let status = r.status();
            let body = r.text().await.unwrap_or_default();
            eprintln!("regcache healthcheck: {url}: {status}: {}", body.trim());
            ExitCode::FAILURE
        }
        Err(e) => {
            let hint = if tls && std::env::var_os("REGISTRY_HTTP_TLS_CLIENTCAS_0").is_some() {
                " (the front wants client certificates: set REGCACHE_METRICS_LISTEN for probes)"
            } else {
                ""
            };
            eprintln!("regcache healthcheck: {url}: {}{hint}", e.without_url());
            ExitCode::FAILURE
        }
    }
}

/// `RUST_LOG` (or registry:2's `REGISTRY_LOG_LEVEL`) filters; JSON lines
/// with `REGISTRY_LOG_FORMATTER=json`.
fn init_logging() {
    let filter = std::env::var("RUST_LOG")
        .ok()
        .or_else(|| std::env::var("REGISTRY_LOG_LEVEL").ok())
        .unwrap_or_else(|| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr);
    if std::env::var("REGISTRY_LOG_FORMATTER").is_ok_and(|f| f.eq_ignore_ascii_case("json")) {
        builder.json().init();
    } else {
        builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
}

fn drain_timeout() -> Result<Duration, wconfig::Error> {
    wconfig::duration_from(
        |k| std::env::var(k).ok(),
        "REGISTRY_HTTP_DRAINTIMEOUT",
        regcache_worker::DEFAULT_DRAIN,
    )
}

/// Builds the supervisor's settings, or says what is wrong with the input.
fn settings(args: FrontArgs) -> Result<regcache_supervisor::Settings, String> {
    let (text, source) = match (&args.config, std::env::var("CONFIG")) {
        (Some(path), _) => (
            std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read --config {}: {e}", path.display()))?,
            format!("--config {}", path.display()),
        ),
        (None, Ok(text)) => (text, "the CONFIG variable".to_string()),
        (None, Err(_)) => (
            config::DEFAULT_CONFIG.to_string(),
            "the embedded default".to_string(),
        ),
    };
    let upstreams = config::parse(&text).map_err(|e| format!("{e} (from {source})"))?;
    let storage = args
        .storage
        .or_else(|| {
            std::env::var_os("REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY").map(PathBuf::from)
        })
        .unwrap_or_else(|| PathBuf::from("regcache-data"));
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let auth = match env("REGISTRY_AUTH_HTPASSWD_PATH") {
        Some(path) => Some(std::sync::Arc::new(
            Htpasswd::load(&path, env("REGISTRY_AUTH_HTPASSWD_REALM"))
                .map_err(|e| e.to_string())?,
        )),
        None => None,
    };
    regcache_worker::init_tls();
    let tls = regcache_supervisor::tls::from_env(env).map_err(|e| e.to_string())?;
    Ok(regcache_supervisor::Settings {
        upstreams,
        listen: args.listen,
        storage,
        drain_timeout: drain_timeout().map_err(|e| e.to_string())?,
        metrics_listen: args.metrics_listen,
        auth,
        tls,
    })
}

/// Logs, once each, `REGISTRY_*` variables regcache does not act on.
fn warn_unused_variables(settings: &regcache_supervisor::Settings) {
    let global: Vec<String> = std::env::vars().map(|(k, _)| k).collect();
    for name in config::unused_registry_vars(global.iter().map(String::as_str)) {
        tracing::warn!(variable = name, "not used by regcache; ignored");
    }
    for up in &settings.upstreams {
        for name in config::unused_registry_vars(up.variables.keys().map(String::as_str)) {
            tracing::warn!(variable = name, upstream = %up.authority(), "not used by regcache; ignored");
        }
    }
}

/// What each worker would refuse at start, found before anything starts.
fn check_worker_env(settings: &regcache_supervisor::Settings) -> Result<(), String> {
    let inherited: Vec<(String, String)> = std::env::vars().collect();
    regcache_supervisor::workers::check_worker_env(&inherited, &settings.upstreams)
        .map_err(|e| e.to_string())
}

/// Checks CONFIG; what depends on the machine it runs on (credential files,
/// storage driver) is reported as a warning, since CONFIGs are often checked
/// away from where they run.
fn check_config(args: FrontArgs) -> ExitCode {
    match settings(args) {
        Ok(s) => {
            if let Err(e) = check_worker_env(&s) {
                eprintln!("regcache: warning (on this machine): {e}");
            }
            print!("{}", regcache_supervisor::describe(&s));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("regcache: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

async fn serve(args: FrontArgs) -> ExitCode {
    let settings = match settings(args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("regcache: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if let Err(e) = check_worker_env(&settings) {
        eprintln!("regcache: {e}");
        return ExitCode::from(EXIT_CONFIG);
    }
    warn_unused_variables(&settings);
    match regcache_supervisor::run(settings, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("regcache: {e}");
            ExitCode::from(EXIT_START)
        }
    }
}

async fn worker(args: WorkerArgs) -> ExitCode {
    if let Some(pid) = std::env::var("REGCACHE_SUPERVISOR_PID")
        .ok()
        .and_then(|p| p.parse().ok())
    {
        regcache_worker::die_with_parent(pid);
    }
    let env = |k: &str| std::env::var(k).ok();
    let built = (|| -> Result<regcache_worker::Settings, String> {
        let upstream = args
            .upstream
            .parse()
            .map_err(|_| wconfig::Error::Upstream(args.upstream.clone()).to_string())?;
        Ok(regcache_worker::Settings {
            upstream,
            storage: args.storage,
            socket: args.socket,
            listen: args.listen,
            tag_freshness: wconfig::duration_from(
                env,
                "REGCACHE_TAG_FRESHNESS",
                Duration::from_secs(60),
            )
            .map_err(|e| e.to_string())?,
            credentials: wconfig::credentials_from(env).map_err(|e| e.to_string())?,
            drain_timeout: drain_timeout().map_err(|e| e.to_string())?,
        })
    })();
    let settings = match built {
        Ok(s) => s,
        Err(e) => {
            eprintln!("regcache worker: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    // Every line a worker logs names its upstream.
    let span = tracing::info_span!(
        "worker",
        upstream = %regcache_worker::upstream_name(&settings.upstream)
    );
    let run = regcache_worker::run(settings, shutdown_signal());
    match tracing::Instrument::instrument(run, span).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("regcache worker: {e}");
            ExitCode::from(EXIT_START)
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}
