//! The regcache supervisor: one front listener for every upstream registry.
//!
//! It reads CONFIG, starts one isolated worker process per upstream (the same
//! binary, `regcache worker`), waits until they are ready, then routes each
//! request to its worker over a Unix socket, answering what it can itself.
//!
//! # Layout
//! - [`settings`]: CONFIG, flags and environment -> [`Settings`], checked once
//! - [`config`]: CONFIG JSON -> validated upstream list (errors say where and why)
//! - [`routing`]: a request -> one typed [`routing::Route`]
//! - [`server`]: the front pipeline (auth, own endpoints, hits, forwarding, logs)
//! - [`hits`]: committed content by digest, answered without the worker
//! - [`proxy`]: pooled forwarding over the workers' Unix sockets
//! - [`workers`]: spawn, readiness, restart with back-off, environment isolation
//! - [`cores`]: the client connections, on a runtime of their own (a thread per core)
//! - [`error`]: the status and code of every front error
//! - [`client_auth`], [`tls`], [`access_log`], [`metrics`], [`inventory`]
#![forbid(unsafe_code)]

pub mod access;
mod access_log;
pub mod client_auth;
pub mod config;
mod cores;
mod error;
mod follow;
mod hits;
#[cfg(test)]
mod hostile;
mod inventory;
pub mod log_lines;
pub mod maintenance;
mod metrics;
pub mod peer;
pub mod preload;
mod proxy;
mod routing;
mod sendfile;
mod server;
pub mod settings;
pub mod status;
pub mod tls;
mod workers;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::net::TcpListener;
use tokio::sync::watch;

pub use config::Upstream;
pub use settings::{Limits, Settings};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot create {path}: {source}")]
    Storage {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Time a client gets to complete the TLS handshake.
const TLS_HANDSHAKE: Duration = Duration::from_secs(10);
/// How long routing waits for every worker before serving anyway (a slow
/// one answers 503 until it is ready).
const WORKERS_READY: Duration = Duration::from_secs(30);
/// The blob bodies this process sends on plain TCP, to clients and peers
/// (`sendfile::Sending::copies` asks how many).
static BODIES: sendfile::Bodies = sendfile::Bodies::new();

/// Runs the supervisor on `listener` (and the probes-only `metrics`
/// listener, and the cluster's `peer` listener) until `shutdown` resolves:
/// starts the workers, accepts once they are ready, drains, stops them.
pub async fn run(
    settings: Settings,
    listener: TcpListener,
    metrics: Option<TcpListener>,
    peer: Option<TcpListener>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let sockets = socket_dir()?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let counters = Arc::new(metrics::Metrics::new());
    let mut workers = Vec::new();
    let mut tasks = Vec::new();
    for up in &settings.upstreams {
        let storage = settings.storage_of(up);
        std::fs::create_dir_all(&storage).map_err(|source| Error::Storage {
            path: storage.display().to_string(),
            source,
        })?;
        let socket = sockets.path().join(format!("w{}.sock", up.index));
        let w = Arc::new(workers::Worker::new(up.clone(), socket, storage));
        tasks.push(tokio::spawn(workers::supervise(
            settings.worker_exe.clone(),
            w.clone(),
            counters.clone(),
            stop_rx.clone(),
            settings.drain_timeout,
        )));
        workers.push(w);
    }
    let all_ready = futures_util::future::join_all(workers.iter().map(|w| w.wait_ready()));
    if tokio::time::timeout(WORKERS_READY, all_ready)
        .await
        .is_err()
    {
        tracing::warn!("not every worker is ready after 30 s; serving anyway");
    }
    let local = listener.local_addr().ok();
    tracing::info!(listen = ?local, upstreams = settings.upstreams.len(), "regcache ready");
    let front = Arc::new(front(&settings, workers, counters));
    // The last hour's figures: a sample a minute.
    let sampler = front.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(60));
        loop {
            every.tick().await;
            sampler.sample().await;
        }
    });
    if let Some(p) = settings.preload.clone() {
        let front = front.clone();
        tokio::spawn(async move { preload::schedule(front, p).await });
    }
    if let (Some(l), Some(cluster)) = (peer, &settings.cluster) {
        let peers = Arc::new(peer::PeerFront::new(front.clone(), cluster.secret.clone()));
        tracing::info!(listen = ?l.local_addr().ok(), node = peer::node_id(), "peer listener");
        tokio::spawn(serve_peers(l, peers));
    }
    serve(front, listener, metrics, &settings, shutdown).await;
    stop_tx.send_replace(true);
    for t in tasks {
        let _ = t.await;
    }
    Ok(())
}

/// The front for `workers`, which need not have been started by [`run`]
/// (tests give it workers served in-process).
pub(crate) fn front(
    settings: &Settings,
    workers: Vec<Arc<workers::Worker>>,
    metrics: Arc<metrics::Metrics>,
) -> server::Front {
    let inherited: Vec<(String, String)> = std::env::vars().collect();
    let workers_len = workers.len();
    let local = workers
        .iter()
        .map(|w| {
            let touch = workers::touch_every(&inherited, &w.upstream);
            hits::LocalHits::new(&w.storage, &w.upstream.authority, touch)
        })
        .collect();
    server::Front {
        routes: routing::Routes::new(&settings.upstreams),
        proxy: proxy::Proxy::new(workers.iter().map(|w| w.socket.clone()).collect()),
        workers,
        metrics,
        auth: settings.auth.clone(),
        access: settings.access.clone(),
        probes_only: false,
        history: Arc::new(status::History::new(workers_len)),
        recent: Arc::default(),
        preloads: Arc::new(preload::Preloads::new(settings.preload.is_some())),
        admin_token: settings.admin_token.clone(),
        local: Arc::new(local),
    }
}

/// Accepts on `listener` (TLS when configured) and `metrics` until
/// `shutdown`, then drains for at most the drain timeout.
async fn serve(
    front: Arc<server::Front>,
    listener: TcpListener,
    metrics: Option<TcpListener>,
    settings: &Settings,
    shutdown: impl Future<Output = ()>,
) {
    let tls = settings.tls.clone().map(tokio_rustls::TlsAcceptor::from);
    let limits = settings.limits;
    let graceful = GracefulShutdown::new();
    if let Some(l) = metrics {
        let probes = Arc::new(server::Front {
            probes_only: true,
            ..(*front).clone()
        });
        tokio::spawn(serve_probes(l, probes, limits));
    }
    // A permit per connection: at the limit, new clients wait in the
    // kernel's listen queue instead of costing descriptors and memory.
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let cores = match cores::Cores::start() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the connection threads");
            return;
        }
    };
    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            _ = &mut shutdown => break,
            slot = slots.clone().acquire_owned() => slot.expect("never closed"),
        };
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            conn = listener.accept() => conn,
        };
        let (stream, peer) = match accepted {
            Ok(c) => c,
            Err(e) => {
                // Out of descriptors, say: wait instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        // Handed to a core as a plain socket: it registers there, with the
        // core's own poller.
        let stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "connection lost before it was served");
                continue;
            }
        };
        let conn = Conn {
            front: front.clone(),
            peer,
            limits,
            slot: Some(slot),
        };
        let (tls, watcher) = (tls.clone(), graceful.watcher());
        cores.spawn(async move {
            let Ok(stream) = tokio::net::TcpStream::from_std(stream) else {
                return;
            };
            match tls {
                None => {
                    // hyper's protocol detection waits for a first byte with
                    // no timeout of its own: a client that never sends one
                    // gets the header timeout here.
                    let mut byte = [0u8; 1];
                    let first = tokio::time::timeout(limits.header_timeout, stream.peek(&mut byte));
                    if matches!(first.await, Ok(Ok(n)) if n > 0) {
                        let wire = sendfile::Wire::new(stream, &BODIES);
                        let spans = wire.spans();
                        conn.serve(wire, Some(spans), Some(watcher));
                    }
                }
                Some(acceptor) => {
                    let handshake = tokio::time::timeout(TLS_HANDSHAKE, acceptor.accept(stream));
                    match handshake.await {
                        Ok(Ok(tls)) => conn.serve(tls, None, Some(watcher)),
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
        });
    }
    tracing::info!("shutting down");
    drop(listener);
    if tokio::time::timeout(settings.drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("drain timeout reached");
    }
}

/// The optional plain-HTTP listener for scrapes and probes only.
async fn serve_probes(listener: TcpListener, front: Arc<server::Front>, limits: Limits) {
    loop {
        match listener.accept().await {
            // Scrapes need no draining.
            Ok((stream, peer)) => Conn {
                front: front.clone(),
                peer,
                limits,
                slot: None,
            }
            .serve(stream, None, None),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// The cluster's peer listener: HTTP/1.1, each request authenticated by
/// [`peer::PeerFront`].
async fn serve_peers(listener: TcpListener, peers: Arc<peer::PeerFront>) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(c) => c,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let peers = peers.clone();
        // Blobs a peer fetches go out by `sendfile`, as to clients.
        let wire = sendfile::Wire::new(stream, &BODIES);
        let spans = wire.spans();
        let svc = service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(spans.for_request());
            let peers = peers.clone();
            async move { Ok::<_, std::convert::Infallible>(peers.handle(req).await) }
        });
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(15))
                .max_buf_size(regcache_worker::MAX_CONNECTION_BUFFER)
                .writev(true)
                .serve_connection(TokioIo::new(wire), svc);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "peer connection ended with an error");
            }
        });
    }
}

/// One client connection about to be served.
struct Conn {
    front: Arc<server::Front>,
    peer: SocketAddr,
    limits: Limits,
    /// Held for as long as the connection lives (`None`: not counted).
    slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Conn {
    /// Serves HTTP/1.1 or h2, tracked for graceful shutdown; `spans`: the
    /// stream sends blob files itself (plain TCP), for HTTP/1 requests.
    fn serve<S>(self, stream: S, spans: Option<sendfile::Spans>, watcher: Option<Watcher>)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let Conn {
            front,
            peer,
            limits,
            slot,
        } = self;
        let sendfile = spans.is_some();
        let svc = service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
            // h2 frames a body's bytes itself: no placeholders there.
            if let Some(s) = spans.as_ref() {
                if req.version() < http::Version::HTTP_2 {
                    req.extensions_mut().insert(s.for_request());
                }
            }
            let front = front.clone();
            async move { Ok::<_, std::convert::Infallible>(front.handle(req, peer).await) }
        });
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            // Slow or silent clients lose their connection, idle ones too.
            .header_read_timeout(limits.header_timeout)
            // A client may send its request and close its side while it
            // waits for the answer.
            .half_close(true)
            .max_buf_size(regcache_worker::MAX_CONNECTION_BUFFER);
        if sendfile {
            // Body chunks queued as they are, never copied into one buffer:
            // the stream must see its placeholders.
            builder.http1().writev(true);
        }
        builder
            .http2()
            .timer(TokioTimer::new())
            .keep_alive_interval(limits.header_timeout)
            .keep_alive_timeout(limits.header_timeout);
        let conn = builder
            .serve_connection(TokioIo::new(stream), svc)
            .into_owned();
        let log = move |r: Result<(), _>| {
            drop(slot);
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
}

/// A private directory for the worker sockets, removed on drop: under
/// `XDG_RUNTIME_DIR`, else `TMPDIR`, else /tmp, whichever is short enough
/// (Unix socket paths are limited to about 100 bytes).
fn socket_dir() -> Result<tempfile::TempDir, Error> {
    let base = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .into_iter()
        .chain([std::env::temp_dir()])
        .find(|p| p.as_os_str().len() < 60 && p.is_dir())
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    tempfile::Builder::new()
        .prefix("regcache-")
        .tempdir_in(&base)
        .map_err(|source| Error::Storage {
            path: base.display().to_string(),
            source,
        })
}
