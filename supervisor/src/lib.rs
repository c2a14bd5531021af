//! The regcache supervisor: one front listener for every upstream registry.
//!
//! It reads CONFIG, starts one isolated worker process per upstream (the same
//! binary, `regcache worker`), waits until they are ready, then listens and
//! routes each request to its worker over a Unix socket.
//!
//! # Layout
//! - [`config`]: CONFIG JSON -> validated upstream list (errors say where and why)
//! - [`routing`]: request path -> worker + rewritten path (`?ns=`, prefixes, `library/`)
//! - [`workers`]: spawn, readiness, restart with back-off, environment isolation
//! - [`proxy`]: pooled forwarding over Unix sockets
//! - [`server`]: the front handler (`/v2/`, health, routing, 503 while a worker is down)
#![forbid(unsafe_code)]

pub mod access_log;
pub mod client_auth;
pub mod config;
pub mod inventory;
pub mod metrics;
pub mod proxy;
pub mod routing;
pub mod server;
pub mod tls;
pub mod workers;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::sync::watch;

pub use config::Upstream;

/// How the supervisor runs.
#[derive(Clone)]
pub struct Settings {
    pub upstreams: Vec<Upstream>,
    pub listen: SocketAddr,
    /// Root of all caches; each upstream gets `<storage>/<host[_port]>`.
    pub storage: PathBuf,
    /// Grace period for in-flight work at shutdown.
    pub drain_timeout: Duration,
    /// A second listener for `/metrics` and the probes only.
    pub metrics_listen: Option<SocketAddr>,
    /// Client authentication (htpasswd), if configured.
    pub auth: Option<Arc<client_auth::Htpasswd>>,
    /// HTTPS on the front, if configured.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot create {path}: {source}")]
    Storage {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// The storage root of one upstream: `REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY`
/// in its own variables wins (as in lhns, variables override everything).
pub fn storage_of(root: &Path, up: &Upstream) -> PathBuf {
    match up
        .variables
        .get("REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY")
    {
        Some(dir) => PathBuf::from(dir),
        None => root.join(up.storage_dir()),
    }
}

/// What `regcache check-config` prints: upstreams, names, storage, routing.
pub fn describe(settings: &Settings) -> String {
    let mut s = format!(
        "listen: {}\nstorage: {}\nupstreams:\n",
        settings.listen,
        settings.storage.display()
    );
    for up in &settings.upstreams {
        s.push_str(&format!(
            "  [{}] {}{}\n      names: {}\n      storage: {}\n",
            up.index,
            up.url(),
            if up.is_docker_hub() {
                " (Docker Hub)"
            } else {
                ""
            },
            up.names().join(", "),
            storage_of(&settings.storage, up).display(),
        ));
        if !up.variables.is_empty() {
            // Names only: values may be secrets.
            let names: Vec<&str> = up.variables.keys().map(String::as_str).collect();
            s.push_str(&format!("      variables: {}\n", names.join(", ")));
        }
    }
    s.push_str(&routing::Routes::new(&settings.upstreams).describe(&settings.upstreams));
    s.push_str(&format!(
        "client auth: {}
tls: {}
",
        if settings.auth.is_some() {
            "htpasswd"
        } else {
            "off"
        },
        if settings.tls.is_some() { "on" } else { "off" },
    ));
    s
}

/// Runs the supervisor until `shutdown` resolves.
pub async fn run(settings: Settings, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    let sockets = socket_dir()?;
    let exe = std::env::current_exe().map_err(|source| Error::Storage {
        path: "the regcache executable".into(),
        source,
    })?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let metrics = Arc::new(metrics::Metrics::new());
    let mut workers = Vec::new();
    let mut tasks = Vec::new();
    for up in &settings.upstreams {
        let storage = storage_of(&settings.storage, up);
        std::fs::create_dir_all(&storage).map_err(|source| Error::Storage {
            path: storage.display().to_string(),
            source,
        })?;
        let socket = sockets.path().join(format!("w{}.sock", up.index));
        let w = Arc::new(workers::Worker::new(up.clone(), socket, storage));
        tasks.push(tokio::spawn(workers::supervise(
            exe.clone(),
            w.clone(),
            metrics.clone(),
            stop_rx.clone(),
            settings.drain_timeout,
        )));
        workers.push(w);
    }
    // Route only once every worker is up (a worker never needs its upstream
    // to start); a slow one answers 503 until it is.
    let all_ready = futures_util::future::join_all(workers.iter().map(|w| w.wait_ready()));
    if tokio::time::timeout(Duration::from_secs(30), all_ready)
        .await
        .is_err()
    {
        tracing::warn!("not every worker is ready after 30 s; serving anyway");
    }

    let bind = |addr: SocketAddr| async move {
        tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Listen { addr, source })
    };
    let listeners = async {
        let front = bind(settings.listen).await?;
        let metrics = match settings.metrics_listen {
            Some(addr) => Some(bind(addr).await?),
            None => None,
        };
        Ok::<_, Error>((front, metrics))
    };
    let (listener, metrics_listener) = match listeners.await {
        Ok(l) => l,
        Err(e) => {
            stop_tx.send_replace(true);
            for t in tasks {
                let _ = t.await;
            }
            return Err(e);
        }
    };
    let local = listener.local_addr().unwrap_or(settings.listen);
    tracing::info!(listen = %local, upstreams = settings.upstreams.len(), "regcache ready");

    let local = workers
        .iter()
        .map(|w| server::LocalHits {
            store: regcache_worker::storage::Store::view(&w.storage),
            metrics: Arc::new(regcache_worker::metrics::Metrics::for_front(
                &w.upstream.authority(),
            )),
        })
        .collect();
    let front = Arc::new(server::Front {
        routes: routing::Routes::new(&settings.upstreams),
        proxy: proxy::Proxy::new(workers.iter().map(|w| w.socket.clone()).collect()),
        workers,
        metrics,
        auth: settings.auth.clone(),
        probes_only: false,
        local: Arc::new(local),
    });
    let tls = settings.tls.clone().map(tokio_rustls::TlsAcceptor::from);
    let graceful = GracefulShutdown::new();
    if let Some(l) = metrics_listener {
        tokio::spawn(serve_metrics(l, front.clone()));
    }
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            conn = listener.accept() => {
                let Ok((stream, peer)) = conn else { continue };
                let _ = stream.set_nodelay(true);
                match &tls {
                    None => serve(front.clone(), stream, peer, &graceful),
                    Some(acceptor) => {
                        let (acceptor, front) = (acceptor.clone(), front.clone());
                        let watcher = graceful.watcher();
                        tokio::spawn(async move {
                            let handshake = tokio::time::timeout(TLS_HANDSHAKE, acceptor.accept(stream));
                            match handshake.await {
                                Ok(Ok(tls)) => serve_watched(front, tls, peer, Some(watcher)),
                                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                            }
                        });
                    }
                }
            }
        }
    }
    tracing::info!("shutting down");
    drop(listener);
    if tokio::time::timeout(settings.drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("drain timeout reached");
    }
    stop_tx.send_replace(true);
    for t in tasks {
        let _ = t.await;
    }
    Ok(())
}

/// The optional plain-HTTP listener for scrapes and probes only.
async fn serve_metrics(listener: tokio::net::TcpListener, front: Arc<server::Front>) {
    let front = Arc::new(server::Front {
        probes_only: true,
        ..(*front).clone()
    });
    loop {
        if let Ok((stream, peer)) = listener.accept().await {
            // Scrapes need no draining.
            serve_watched(front.clone(), stream, peer, None);
        }
    }
}

/// Time a client gets to complete the TLS handshake.
const TLS_HANDSHAKE: Duration = Duration::from_secs(10);

fn serve<S>(front: Arc<server::Front>, stream: S, peer: SocketAddr, graceful: &GracefulShutdown)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    serve_watched(front, stream, peer, Some(graceful.watcher()))
}

/// Serves one client connection (HTTP/1.1 or h2), tracked for graceful shutdown.
fn serve_watched<S>(
    front: Arc<server::Front>,
    stream: S,
    peer: SocketAddr,
    watcher: Option<Watcher>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req| {
        let front = front.clone();
        async move { Ok::<_, std::convert::Infallible>(front.handle(req, peer).await) }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .max_buf_size(regcache_worker::MAX_CONNECTION_BUFFER);
    let conn = builder
        .serve_connection(TokioIo::new(stream), svc)
        .into_owned();
    let log = |r: Result<(), _>| {
        if let Err(e) = r {
            tracing::debug!(error = %e, "client connection ended with an error");
        }
    };
    match watcher {
        Some(w) => {
            let conn = w.watch(conn);
            tokio::spawn(async move { log(conn.await) })
        }
        None => tokio::spawn(async move { log(conn.await) }),
    };
}

/// A private directory for the worker sockets, removed on drop. Kept short:
/// Unix socket paths are limited to about 100 bytes.
fn socket_dir() -> Result<tempfile::TempDir, Error> {
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|p| p.as_os_str().len() < 60 && p.is_dir())
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    tempfile::Builder::new()
        .prefix("regcache-")
        .tempdir_in(&base)
        .map_err(|source| Error::Storage {
            path: base.display().to_string(),
            source,
        })
}
