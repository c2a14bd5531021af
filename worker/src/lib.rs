//! A regcache worker: a complete, read-only OCI distribution (registry v2)
//! endpoint for ONE upstream registry, caching on disk.
//!
//! The supervisor starts one worker process per upstream and talks to it over
//! a Unix socket, having already stripped the upstream's prefix from the path;
//! a worker can equally be started alone (`regcache worker --listen ...`).
//!
//! # Layout
//! - [`reference`]: validated names, tags, digests (nothing unvalidated reaches disk)
//! - [`routing`]: `/v2/...` path -> typed request (split at the last endpoint marker)
//! - [`storage`]: content-addressed, verify-then-rename filesystem store
//! - [`upstream`], [`auth`]: the client to the upstream registry and its credentials
//! - [`cache`]: hit/miss decisions, single-flight streaming blob fills, tag revalidation
//! - [`server`]: HTTP handling; [`error`]: the one mapping to registry error JSON
#![forbid(unsafe_code)]

pub mod auth;
pub mod body;
pub mod cache;
pub mod config;
pub mod error;
pub mod metrics;
pub mod range;
pub mod reference;
pub mod routing;
pub mod server;
pub mod storage;
pub mod upstream;

use std::future::Future;
use std::io::Write;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};

pub use config::Settings;

/// Why a worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cache storage at {path}: {source}")]
    Storage {
        path: String,
        #[source]
        source: storage::Error,
    },
    #[error("HTTP client: {0}")]
    Client(#[from] reqwest::Error),
    #[error("cannot listen on {what}: {source}")]
    Listen {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// Installs the process-wide TLS provider (ring) once.
pub fn init_tls() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Runs the worker until `shutdown` resolves, then drains in-flight requests
/// for at most `settings.drain_timeout`.
pub async fn run(settings: Settings, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
    init_tls();
    let store = storage::Store::open(&settings.storage).map_err(|source| StartError::Storage {
        path: settings.storage.display().to_string(),
        source,
    })?;
    let metrics = Arc::new(metrics::Metrics::new(&upstream_name(&settings.upstream)));
    let upstream = upstream::Upstream::new(
        settings.upstream.clone(),
        settings.credentials.clone(),
        metrics.clone(),
    )?;
    let cache = Arc::new(cache::Cache::new(
        store,
        upstream,
        settings.tag_freshness,
        metrics,
    ));

    let unix = match &settings.socket {
        Some(path) => {
            // A stale socket from a previous run would make bind fail.
            if std::fs::symlink_metadata(path).is_ok_and(|m| {
                use std::os::unix::fs::FileTypeExt;
                m.file_type().is_socket()
            }) {
                let _ = std::fs::remove_file(path);
            }
            Some(
                tokio::net::UnixListener::bind(path).map_err(|source| StartError::Listen {
                    what: path.display().to_string(),
                    source,
                })?,
            )
        }
        None => None,
    };
    let tcp = match settings.listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Listen {
                    what: addr.to_string(),
                    source,
                })?,
        ),
        None => None,
    };
    tracing::info!(upstream = %cache.upstream().name(), storage = %settings.storage.display(), "worker ready");
    // The supervisor waits for this line before routing to us.
    let mut out = std::io::stdout();
    let _ = writeln!(out, "READY").and_then(|()| out.flush());

    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            conn = async { unix.as_ref().unwrap().accept().await.map(|(s, _)| s) }, if unix.is_some() => {
                if let Ok(stream) = conn {
                    serve(cache.clone(), stream, &graceful);
                }
            }
            conn = async { tcp.as_ref().unwrap().accept().await.map(|(s, _)| s) }, if tcp.is_some() => {
                if let Ok(stream) = conn {
                    let _ = stream.set_nodelay(true);
                    serve(cache.clone(), stream, &graceful);
                }
            }
        }
    }
    drop(unix);
    if let Some(path) = &settings.socket {
        let _ = std::fs::remove_file(path);
    }
    // In-flight requests and every fill that has started get the grace period.
    let drain = async {
        graceful.shutdown().await;
        cache.drain_fills().await;
    };
    if tokio::time::timeout(settings.drain_timeout, drain)
        .await
        .is_err()
    {
        tracing::warn!("drain timeout reached; unfinished fills are discarded");
    }
    Ok(())
}

/// `host[:port]` of the upstream, the `upstream` label and log field.
pub fn upstream_name(url: &reqwest::Url) -> String {
    match url.port() {
        Some(p) => format!("{}:{p}", url.host_str().unwrap_or_default()),
        None => url.host_str().unwrap_or_default().to_owned(),
    }
}

fn serve<S>(
    cache: Arc<cache::Cache>,
    stream: S,
    graceful: &hyper_util::server::graceful::GracefulShutdown,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req| {
        let cache = cache.clone();
        async move { Ok::<_, std::convert::Infallible>(server::handle(cache, req).await) }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // Bounds what each connection queues for writing (hyper's default is
    // ~400 KiB): memory stays flat with many slow clients.
    builder.http1().max_buf_size(MAX_CONNECTION_BUFFER);
    let conn = builder
        .serve_connection(TokioIo::new(stream), svc)
        .into_owned();
    let conn = graceful.watch(conn);
    tokio::spawn(tracing::Instrument::in_current_span(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "connection ended with an error");
        }
    }));
}

/// Per-connection HTTP/1 buffer limit, on the worker and the front.
pub const MAX_CONNECTION_BUFFER: usize = 128 << 10;

/// Default wait for in-flight work at shutdown.
pub const DEFAULT_DRAIN: Duration = Duration::from_secs(30);

/// Asks the kernel to SIGTERM this worker when its supervisor dies, and exits
/// at once if the supervisor `parent` is already gone (the race prctl leaves).
pub fn die_with_parent(parent: i32) {
    let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM);
    if nix::unistd::getppid().as_raw() != parent {
        std::process::exit(0);
    }
}
