//! The `regcache` command line: parses arguments and dispatches to the
//! supervisor (default) or a worker. All logic lives in the crates.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use regcache_supervisor::config;
use regcache_supervisor::settings::{Flags, Settings};

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
    /// Show what the regcache listening on --listen is doing: upstreams,
    /// hit ratios, sizes, downloads in progress, recent pulls.
    Status(StatusArgs),
    /// Apply the cache policy (REGCACHE_MAX_SIZE, REGCACHE_MIN_FREE,
    /// REGISTRY_PROXY_TTL) to each upstream's storage now, or show what it
    /// would remove (--dry-run).
    Gc(MaintenanceArgs),
    /// Re-hash every stored blob and manifest and follow every tag; remove
    /// what is corrupt or dangling (not with --dry-run). Exit 1 if anything was.
    Fsck(MaintenanceArgs),
}

#[derive(Args)]
struct StatusArgs {
    /// The address regcache listens on; 0.0.0.0 and [::] are asked on loopback.
    #[arg(long, env = "REGCACHE_LISTEN", default_value = "0.0.0.0:5000")]
    listen: SocketAddr,
    /// user:password, when the front wants client credentials (htpasswd).
    #[arg(long, env = "REGCACHE_STATUS_CREDENTIALS", hide_env_values = true)]
    credentials: Option<String>,
    /// Print the figures as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct MaintenanceArgs {
    /// Report only; change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print the outcome as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    front: FrontArgs,
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

/// glibc malloc, told to give memory back. By default it makes one arena
/// per thread that allocates (up to eight per core), each keeping what was
/// freed in it, and after a burst (16 clients of one blob) it keeps the
/// freed chunk buffers for good: its trim threshold grows to twice the
/// largest buffer freed. So: one arena (what we allocate is small and
/// short-lived; peak PSS of supervisor and worker 27.5 -> 20.8 MiB), fixed
/// thresholds, and a trim every few seconds of what a burst left free
/// inside the heap (a worker after 16 cold clients: 6.3 -> 1.8 MiB). The
/// project's one `unsafe`, kept out of the libraries.
fn tame_malloc() {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: mallopt only sets allocator parameters; called first in
        // main, before other threads exist.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
            libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 20);
        }
        let trim = || loop {
            std::thread::sleep(Duration::from_secs(5));
            // SAFETY: malloc_trim takes the allocator's own locks.
            unsafe { libc::malloc_trim(0) };
        };
        let _ = std::thread::Builder::new()
            .name("malloc-trim".into())
            .stack_size(64 << 10)
            .spawn(trim);
    }
}

fn main() -> ExitCode {
    tame_malloc();
    regcache_supervisor::log_lines::init();
    regcache_worker::raise_fd_limit();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    match cli.command {
        None => runtime.block_on(serve(cli.front)),
        Some(Command::Serve(args)) => runtime.block_on(serve(args)),
        Some(Command::CheckConfig(args)) => check_config(args),
        Some(Command::Worker(args)) => runtime.block_on(worker(args)),
        Some(Command::Healthcheck(args)) => runtime.block_on(healthcheck(args)),
        Some(Command::Status(args)) => runtime.block_on(status(args)),
        Some(Command::Gc(args)) => maintenance(args, false),
        Some(Command::Fsck(args)) => maintenance(args, true),
    }
}

/// `regcache gc` and `regcache fsck`.
fn maintenance(args: MaintenanceArgs, fsck: bool) -> ExitCode {
    use regcache_supervisor::maintenance;
    let settings = match settings(&args.front).and_then(|s| check_workers(&s).map(|()| s)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("regcache: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let print = |json: String, text: String| {
        if args.json {
            println!("{json}");
        } else {
            print!("{text}");
        }
    };
    if fsck {
        let out = maintenance::fsck(&settings, args.dry_run);
        let bad = out
            .iter()
            .any(|o| o.result.as_ref().is_some_and(|r| !r.clean()));
        print(maintenance::json(&out), maintenance::fsck_text(&out));
        if bad {
            return ExitCode::FAILURE;
        }
    } else {
        let out = maintenance::gc(&settings, args.dry_run);
        print(
            maintenance::json(&out),
            maintenance::gc_text(&out, args.dry_run),
        );
    }
    ExitCode::SUCCESS
}

/// `regcache status`: `/api/v1/status` of the local front, as a table.
async fn status(args: StatusArgs) -> ExitCode {
    let tls = std::env::var_os("REGISTRY_HTTP_TLS_CERTIFICATE").is_some_and(|v| !v.is_empty());
    let scheme = if tls { "https" } else { "http" };
    let url = format!("{scheme}://{}/api/v1/status", loopback(args.listen));
    regcache_worker::init_tls();
    let client = match reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .timeout(Duration::from_secs(10))
        .no_proxy()
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("regcache status: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut req = client.get(&url);
    if let Some((user, pass)) = args.credentials.as_deref().and_then(|c| c.split_once(':')) {
        req = req.basic_auth(user, Some(pass));
    }
    let resp = match req.send().await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("regcache status: {url}: {}", e.without_url());
            return ExitCode::FAILURE;
        }
    };
    let st = resp.status();
    let body = resp.bytes().await.unwrap_or_default();
    if !st.is_success() {
        eprintln!(
            "regcache status: {url}: {st}: {}",
            String::from_utf8_lossy(&body).trim()
        );
        return ExitCode::FAILURE;
    }
    if args.json {
        println!("{}", String::from_utf8_lossy(&body));
        return ExitCode::SUCCESS;
    }
    match regcache_supervisor::status::parse(&body) {
        Ok(page) => {
            print!("{}", regcache_supervisor::status::text(&page));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("regcache status: {url}: not a status page: {e}");
            ExitCode::FAILURE
        }
    }
}

/// 0.0.0.0 and [::] as loopback: where a local command finds the front.
fn loopback(mut addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    addr
}

/// `GET /readyz` on the local listener: the metrics listener when there is
/// one (plain HTTP, never behind client auth), else the front, over HTTPS
/// when it serves TLS (loopback: the certificate's name is not checked).
async fn healthcheck(args: HealthArgs) -> ExitCode {
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

fn env(k: &str) -> Option<String> {
    std::env::var(k).ok()
}

fn settings(args: &FrontArgs) -> Result<Settings, String> {
    let flags = Flags {
        config_file: args.config.clone(),
        storage: args.storage.clone(),
    };
    Settings::from_env(flags, env).map_err(|e| e.to_string())
}

/// What each worker would refuse at start, found before anything starts.
fn check_workers(settings: &Settings) -> Result<(), String> {
    let inherited: Vec<(String, String)> = std::env::vars().collect();
    settings
        .check_workers(&inherited)
        .map_err(|e| e.to_string())
}

/// Logs, once each, `REGISTRY_*` variables regcache does not act on, and
/// what the settings do that their author may not expect.
fn warn_unused_variables(settings: &Settings) {
    let inherited: Vec<(String, String)> = std::env::vars().collect();
    for w in settings.warnings(&inherited) {
        tracing::warn!("{w}");
    }
    let global: Vec<String> = std::env::vars().map(|(k, _)| k).collect();
    for name in config::unused_registry_vars(global.iter().map(String::as_str)) {
        tracing::warn!(variable = name, "not used by regcache; ignored");
    }
    for up in &settings.upstreams {
        for name in config::unused_registry_vars(up.variables.keys().map(String::as_str)) {
            tracing::warn!(variable = name, upstream = %up.name(), "not used by regcache; ignored");
        }
    }
}

/// Checks CONFIG; what depends on the machine it runs on (credential files,
/// storage driver) is reported as a warning, since CONFIGs are often checked
/// away from where they run.
fn check_config(args: FrontArgs) -> ExitCode {
    match settings(&args) {
        Ok(s) => {
            if let Err(e) = check_workers(&s) {
                eprintln!("regcache: warning (on this machine): {e}");
            }
            let inherited: Vec<(String, String)> = std::env::vars().collect();
            for w in s.warnings(&inherited) {
                eprintln!("regcache: warning: {w}");
            }
            print!("{}", s.describe(&args.listen.to_string(), &inherited));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("regcache: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
    }
}

async fn serve(args: FrontArgs) -> ExitCode {
    let settings = match settings(&args).and_then(|s| check_workers(&s).map(|()| s)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("regcache: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    warn_unused_variables(&settings);
    let bind = |addr: SocketAddr| async move {
        tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("cannot listen on {addr}: {e}"))
    };
    let listeners = async {
        let front = bind(args.listen).await?;
        let metrics = match args.metrics_listen {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        };
        let peer = match &settings.cluster {
            Some(c) => Some(bind(c.listen).await?),
            None => None,
        };
        Ok::<_, String>((front, metrics, peer))
    };
    let (front, metrics, peer) = match listeners.await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("regcache: {e}");
            return ExitCode::from(EXIT_START);
        }
    };
    match regcache_supervisor::run(settings, front, metrics, peer, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("regcache: {e}");
            ExitCode::from(EXIT_START)
        }
    }
}

async fn worker(args: WorkerArgs) -> ExitCode {
    if let Some(pid) = env("REGCACHE_SUPERVISOR_PID").and_then(|p| p.parse().ok()) {
        regcache_worker::die_with_parent(pid);
    }
    let settings =
        match regcache_worker::Settings::from_env(&args.upstream, args.storage.clone(), env) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("regcache worker: {e}");
                return ExitCode::from(EXIT_CONFIG);
            }
        };
    // Every line a worker logs names its upstream.
    let name = regcache_protocol::Authority::of(&settings.upstream).to_string();
    let span = tracing::info_span!("worker", upstream = %name);
    tracing::Instrument::instrument(run_worker(args, settings), span).await
}

async fn run_worker(args: WorkerArgs, settings: regcache_worker::Settings) -> ExitCode {
    let nice = settings.nice.get();
    match regcache_worker::priority::lower(settings.nice) {
        Ok(done) => tracing::debug!(
            nice,
            threads = done.threads,
            session = done.session,
            "CPU priority (REGCACHE_NICE)"
        ),
        Err(e) => tracing::warn!(nice, "cannot lower the CPU priority: {e}"),
    }
    let started = regcache_worker::Worker::start(settings)
        .await
        .map_err(|e| e.to_string());
    let listener = match (&args.socket, args.listen) {
        (Some(path), _) => regcache_worker::bind_unix(path)
            .map(regcache_worker::Listener::Unix)
            .map_err(|e| format!("cannot listen on {}: {e}", path.display())),
        (None, Some(addr)) => tokio::net::TcpListener::bind(addr)
            .await
            .map(regcache_worker::Listener::Tcp)
            .map_err(|e| format!("cannot listen on {addr}: {e}")),
        (None, None) => Err("give --socket PATH or --listen ADDR".to_string()),
    };
    let (worker, listener) = match (started, listener) {
        (Ok(w), Ok(l)) => (w, l),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("regcache worker: {e}");
            return ExitCode::from(EXIT_START);
        }
    };
    // The supervisor waits for this line before routing to us.
    println!("READY");
    worker.serve(listener, shutdown_signal()).await;
    ExitCode::SUCCESS
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
