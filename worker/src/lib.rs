//! A regcache worker: a complete, read-only OCI distribution (registry v2)
//! endpoint for ONE upstream registry, caching in a store.
//!
//! The supervisor starts one worker process per upstream and talks to it over
//! a Unix socket, having already stripped the upstream's prefix from the path;
//! a worker can equally be started alone (`regcache worker --listen ...`).
//!
//! # Layout
//! - [`config`]: settings from the worker's own environment
//! - `upstream`, `auth`: the client to the upstream registry and its credentials
//! - `tls`: how the worker's clients check certificates (one set of roots)
//! - `cache`: hit/miss decisions, single-flight blob fills, tag revalidation
//! - `server`: HTTP handling; `error`: the status and code of every worker error
//! - [`metrics`]: the worker's Prometheus series
//! - [`priority`]: the CPU priority the worker runs at, below its clients
//!
//! Dependencies point one way: server -> cache -> upstream -> auth,
//! upstream and peers -> tls, and everything -> metrics; the store and the
//! protocol come from their crates.
#![forbid(unsafe_code)]

mod auth;
mod cache;
pub mod config;
mod error;
mod flights;
#[cfg(test)]
mod hostile;
pub mod metrics;
mod peers;
pub mod priority;
mod server;
mod tag_rules;
mod tls;
mod upstream;

use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use regcache_protocol::Authority;
use regcache_store::{FsStore, Store};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};

pub use auth::Secret;
pub use config::Settings;
pub use upstream::init_tls;

/// Why a worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cache storage: {0}")]
    Storage(#[from] regcache_store::Error),
    #[error("HTTP client: {0}")]
    Client(#[from] reqwest::Error),
    #[error("cache storage {0} is held by another process (another worker on the same storage?)")]
    RootHeld(String),
}

/// Per-connection HTTP/1 buffer limit, on the worker and the front.
pub const MAX_CONNECTION_BUFFER: usize = 128 << 10;

/// Where a worker takes connections from.
pub enum Listener {
    /// The supervisor's socket.
    Unix(UnixListener),
    /// Standalone use, and tests.
    Tcp(TcpListener),
}

/// Binds a Unix socket, replacing a stale socket of an earlier run (but
/// nothing that is not a socket).
pub fn bind_unix(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(path);
    }
    UnixListener::bind(path)
}

/// A started worker: its store open, its upstream client built.
pub struct Worker {
    cache: Arc<cache::Cache>,
    drain_timeout: Duration,
    /// This worker's exclusive hold on its storage root.
    _root: regcache_store::RootLock,
}

/// How long a worker waits for another process to let go of its root (a
/// predecessor still draining after its supervisor was killed).
const ROOT_WAIT: Duration = Duration::from_secs(25);

impl Worker {
    pub async fn start(settings: Settings) -> Result<Worker, StartError> {
        let name = Authority::of(&settings.upstream).to_string();
        let root = lock_root(&settings.storage).await?;
        let local = FsStore::open(&settings.storage)?;
        let spools = local.spools().expect("an opened store has spools").clone();
        let store: Arc<dyn regcache_store::Store> = match &settings.store {
            config::StoreSettings::Filesystem => Arc::new(local.clone()),
            config::StoreSettings::S3(s3) => Arc::new(regcache_store::TieredStore::new(
                local.clone(),
                regcache_store::s3::S3Store::new(s3.clone())?,
                &settings.storage,
            )?),
        };
        // The policy is the local tier's, whatever is behind it.
        let managed = regcache_store::Managed::new(store, local, settings.policy.clone());
        managed.start();
        let metrics = Arc::new(metrics::Metrics::new(&name));
        let options = settings.upstream_options.clone();
        if options.skip_verify {
            tracing::warn!(
                upstream = %name,
                "REGCACHE_UPSTREAM_TLS_SKIP_VERIFY: TLS certificates of this upstream are NOT verified; anyone in the path can serve anything"
            );
        }
        if options.offline {
            tracing::warn!(upstream = %name, "REGCACHE_OFFLINE: the upstream is never asked; only cached content is served");
        }
        let upstream = upstream::Upstream::new(
            settings.upstream.clone(),
            settings.credentials.clone(),
            options,
            metrics.clone(),
        )?;
        tracing::info!(upstream = %name, store = %managed.describe(), policy = %settings.policy.describe(), "cache storage");
        let options = cache::Options {
            tags: settings.tag_rules.clone(),
            cache_manifests: settings.cache_manifests,
            record_use: settings.record_use,
            read_ahead: settings.read_ahead,
        };
        let peers = match &settings.peers {
            Some(p) => {
                let peers = peers::Peers::new(p.clone())?;
                peers.start();
                tracing::info!(upstream = %name, node = %p.node_id, peers = %p.entries.join(","), "cluster member");
                Some(peers)
            }
            None => None,
        };
        let cache =
            cache::Cache::new(managed, spools, upstream, options, metrics).with_peers(peers);
        tracing::info!(upstream = %name, storage = %settings.storage.display(), "worker started");
        Ok(Worker {
            cache: Arc::new(cache),
            drain_timeout: settings.drain_timeout,
            _root: root,
        })
    }

    /// Serves until `shutdown` resolves, then drains in-flight requests and
    /// fills for at most the drain timeout.
    pub async fn serve(self, listener: Listener, shutdown: impl Future<Output = ()>) {
        let graceful = GracefulShutdown::new();
        tokio::pin!(shutdown);
        loop {
            let accepted = tokio::select! {
                _ = &mut shutdown => break,
                conn = accept(&listener) => conn,
            };
            match accepted {
                Ok(Conn::Unix(s)) => serve(self.cache.clone(), s, &graceful),
                Ok(Conn::Tcp(s)) => {
                    let _ = s.set_nodelay(true);
                    serve(self.cache.clone(), s, &graceful)
                }
                Err(e) => {
                    // Out of descriptors, say: wait instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        drop(listener);
        let drain = async {
            graceful.shutdown().await;
            self.cache.drain_fills().await;
        };
        if tokio::time::timeout(self.drain_timeout, drain)
            .await
            .is_err()
        {
            tracing::warn!("drain timeout reached; unfinished fills are discarded");
        }
    }
}

/// Starts a worker and serves `listener` until `shutdown`.
pub async fn run(
    settings: Settings,
    listener: Listener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    Worker::start(settings)
        .await?
        .serve(listener, shutdown)
        .await;
    Ok(())
}

/// Takes the root's lock, waiting for a predecessor that still holds it.
async fn lock_root(root: &Path) -> Result<regcache_store::RootLock, StartError> {
    let deadline = tokio::time::Instant::now() + ROOT_WAIT;
    let mut said = false;
    loop {
        if let Some(lock) = FsStore::lock(root)? {
            return Ok(lock);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(StartError::RootHeld(root.display().to_string()));
        }
        if !said {
            tracing::warn!(storage = %root.display(), "another process holds this cache's storage; waiting for it to exit");
            said = true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

enum Conn {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream),
}

async fn accept(listener: &Listener) -> std::io::Result<Conn> {
    match listener {
        Listener::Unix(l) => l.accept().await.map(|(s, _)| Conn::Unix(s)),
        Listener::Tcp(l) => l.accept().await.map(|(s, _)| Conn::Tcp(s)),
    }
}

fn serve<S>(cache: Arc<cache::Cache>, stream: S, graceful: &GracefulShutdown)
where
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

/// Raises this process's open-file limit to its hard limit: every client
/// connection, upstream connection and open blob is a descriptor, and the
/// usual soft limit (1024) is reached long before memory or CPU are.
pub fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        if soft < hard {
            let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        }
    }
}

/// Asks the kernel to SIGTERM this worker when its supervisor dies, and exits
/// at once if the supervisor `parent` is already gone (the race prctl leaves).
pub fn die_with_parent(parent: i32) {
    let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM);
    if nix::unistd::getppid().as_raw() != parent {
        std::process::exit(0);
    }
}
