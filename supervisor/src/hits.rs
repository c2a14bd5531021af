//! The front's hit path: blobs and manifests by digest that are committed in
//! an upstream's local filesystem store, answered here without the hop to
//! its worker, and so also while the worker restarts.
//!
//! Filesystem-only by design: it reads through the [`Store`] interface, but
//! always of the local filesystem tier (a read-only [`FsStore::view`] of the
//! worker's root), which every store configuration has. Anything not there
//! (a miss, a tag, content only another store tier holds) is the worker's.
//! Immutable content by digest is the only thing answered here, and only
//! under a repository linked to it (seen to have it upstream); tags need
//! their freshness rules, and unlinked content a word with upstream, which
//! are the worker's alone.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::TryStreamExt;
use http::{HeaderMap, Response, StatusCode};
use regcache_protocol::body::Body;
use regcache_protocol::request::{Endpoint, Method, RepoRequest};
use regcache_protocol::response::{self, Outcome};
use regcache_protocol::{Authority, Reference};
use regcache_store::{FsStore, Key, Store, Toucher};
use regcache_worker::metrics::Metrics;

/// What the front needs to answer one upstream's hits itself.
pub struct LocalHits {
    store: Arc<dyn Store>,
    /// The same store, for what only a filesystem has (its spools).
    view: FsStore,
    /// The worker's request series for these answers, summed with the
    /// worker's own on the metrics page.
    metrics: Arc<Metrics>,
    /// `None`: uses are not recorded (`REGCACHE_RECORD_USE=false`).
    touches: Option<Toucher>,
}

impl LocalHits {
    /// Hits of the store at `root`, recording uses at most once per
    /// `touch_every` per item, as its worker does.
    pub fn new(root: &Path, upstream: &Authority, touch_every: Option<Duration>) -> LocalHits {
        LocalHits {
            store: Arc::new(FsStore::view(root)),
            view: FsStore::view(root),
            metrics: Arc::new(Metrics::for_front(&upstream.to_string())),
            touches: touch_every.map(Toucher::new),
        }
    }

    fn used(&self, key: Key) {
        if let Some(t) = &self.touches {
            t.used(&self.store, key);
        }
    }

    /// A worker's answer that names a fill to follow, read from its spool
    /// here (see `crate::follow`); `None`: ask the worker again unfollowed.
    pub fn follow(&self, resp: Response<Body>) -> Option<Response<Body>> {
        crate::follow::serve(&self.view, self.metrics.clone(), resp)
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The answer, when `request` is content by digest that is stored
    /// locally; `None` means the worker must answer.
    pub async fn answer(
        &self,
        headers: &HeaderMap,
        request: &RepoRequest,
    ) -> Option<Response<Body>> {
        let started = Instant::now();
        // Content is answered here only under a repository that was seen to
        // have it upstream; the worker decides the rest (and asks upstream).
        let key = match &request.endpoint {
            Endpoint::Blob(d) => Key::Blob(d.clone()),
            Endpoint::Manifest(Reference::Digest(d)) => Key::Manifest(d.clone()),
            _ => return None,
        };
        if !self.store.linked(&request.name, &key).await.ok()? {
            return None;
        }
        let resp = match &request.endpoint {
            Endpoint::Blob(d) => {
                let reader = self.store.blob_open(d).await.ok()??;
                self.used(Key::Blob(d.clone()));
                let metrics = self.metrics.clone();
                let size = reader.size;
                response::blob(
                    headers,
                    request.method,
                    d,
                    Some(size),
                    Outcome::Hit,
                    move |start, end| {
                        let sent = move |b: &Bytes| metrics.served(Outcome::Hit, b.len() as u64);
                        Box::pin(reader.stream(start, end).inspect_ok(sent))
                    },
                )
            }
            Endpoint::Manifest(Reference::Digest(d)) => {
                let m = self.store.manifest_get(d).await.ok()??;
                self.used(Key::Manifest(d.clone()));
                let resp = response::manifest(headers, &m, Outcome::Hit);
                if request.method == Method::Get && resp.status() == StatusCode::OK {
                    self.metrics.served(Outcome::Hit, m.bytes.len() as u64);
                }
                resp
            }
            _ => return None,
        };
        let kind = request.endpoint.kind();
        self.metrics.request(
            kind,
            Some(Outcome::Hit),
            false,
            started.elapsed().as_secs_f64(),
        );
        Some(resp)
    }
}
