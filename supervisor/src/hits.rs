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

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::TryStreamExt;
use http::{HeaderMap, Response, StatusCode};
use regcache_protocol::body::Body;
use regcache_protocol::request::{Endpoint, Method, RepoRequest};
use regcache_protocol::response::{self, Outcome};
use regcache_protocol::{Authority, Digest, Manifest, Name, Reference};
use regcache_store::{FsStore, Key, Store, Toucher};
use regcache_worker::metrics::Metrics;

use crate::follow::Follows;
use crate::sendfile::Spans;

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
    /// Manifests read (and verified) lately: a hit is then answered from
    /// memory, not an open, two reads and a hash.
    recent: Recent,
    /// Fills in flight that clients are reading from their spools.
    follows: Follows,
}

/// Verified manifests by digest, the oldest dropped first beyond a budget,
/// with when each was last confirmed stored and linked, per repository.
#[derive(Default)]
struct Recent {
    inner: Mutex<(HashMap<Digest, Kept>, VecDeque<Digest>, usize)>,
}

struct Kept {
    manifest: Arc<Manifest>,
    confirmed: Vec<(Name, Instant)>,
}

impl Recent {
    /// Memory for manifests kept (the largest manifests of real images are
    /// well under 100 kB).
    const BUDGET: usize = 2 << 20;
    /// How long a confirmation holds: a manifest asked again sooner is
    /// answered without the two `stat`s (link, still stored), a tenth of a
    /// hit's cost. Content by digest cannot change, so the most this costs
    /// is serving a manifest evicted this long ago.
    const CONFIRMED_FOR: Duration = Duration::from_secs(1);

    fn get(&self, d: &Digest) -> Option<Arc<Manifest>> {
        let (map, ..) = &*self.inner.lock().unwrap();
        map.get(d).map(|k| k.manifest.clone())
    }

    /// The manifest, when stored and linked under `name` lately.
    fn confirmed(&self, name: &Name, d: &Digest) -> Option<Arc<Manifest>> {
        let (map, ..) = &*self.inner.lock().unwrap();
        let kept = map.get(d)?;
        kept.confirmed
            .iter()
            .any(|(n, at)| n == name && at.elapsed() < Self::CONFIRMED_FOR)
            .then(|| kept.manifest.clone())
    }

    /// `d` was just seen stored and linked under `name`.
    fn confirm(&self, name: &Name, d: &Digest) {
        let (map, ..) = &mut *self.inner.lock().unwrap();
        if let Some(kept) = map.get_mut(d) {
            let now = Instant::now();
            match kept.confirmed.iter_mut().find(|(n, _)| n == name) {
                Some((_, at)) => *at = now,
                None => kept.confirmed.push((name.clone(), now)),
            }
        }
    }

    fn put(&self, m: &Arc<Manifest>) {
        let size = m.bytes.len();
        if size > Self::BUDGET / 16 {
            return;
        }
        let (map, order, bytes) = &mut *self.inner.lock().unwrap();
        if map.contains_key(&m.digest) {
            return;
        }
        let kept = Kept {
            manifest: m.clone(),
            confirmed: Vec::new(),
        };
        map.insert(m.digest.clone(), kept);
        order.push_back(m.digest.clone());
        *bytes += size;
        while *bytes > Self::BUDGET {
            let Some(old) = order.pop_front() else { break };
            if let Some(gone) = map.remove(&old) {
                *bytes -= gone.manifest.bytes.len();
            }
        }
    }
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
            recent: Recent::default(),
            follows: Follows::default(),
        }
    }

    fn used(&self, key: Key) {
        if let Some(t) = &self.touches {
            t.used(&self.store, key);
        }
    }

    /// A worker's answer that names a fill to follow, read from its spool
    /// here (see `crate::follow`); `None`: ask the worker again unfollowed.
    pub fn follow(&self, resp: Response<Body>, sendfile: Option<&Spans>) -> Option<Response<Body>> {
        self.follows
            .serve(&self.view, self.metrics.clone(), resp, sendfile)
    }

    /// A stored manifest, from memory while it is still stored.
    async fn manifest(&self, d: &Digest) -> Option<Arc<Manifest>> {
        match self.recent.get(d) {
            Some(m) if self.view.has_manifest(d) => Some(m),
            _ => {
                let m = Arc::new(self.store.manifest_get(d).await.ok()??);
                self.recent.put(&m);
                Some(m)
            }
        }
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The answer, when `request` is content by digest that is stored
    /// locally; `None` means the worker must answer. A blob goes out by
    /// `sendfile` where the connection allows it and copying costs more
    /// (`sendfile::Sending::copies`).
    pub async fn answer(
        &self,
        headers: &HeaderMap,
        request: &RepoRequest,
        sendfile: Option<&Spans>,
    ) -> Option<Response<Body>> {
        let started = Instant::now();
        if let Endpoint::Manifest(Reference::Digest(d)) = &request.endpoint {
            if let Some(m) = self.recent.confirmed(&request.name, d) {
                return Some(self.manifest_hit(headers, request, &m, started));
            }
        }
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
                let sendfile = sendfile.cloned();
                response::blob(
                    headers,
                    request.method,
                    d,
                    Some(size),
                    Outcome::Hit,
                    move |start, end| {
                        let sent = move |b: &Bytes| metrics.served(Outcome::Hit, b.len() as u64);
                        let Some(spans) = sendfile else {
                            return Box::pin(reader.stream(start, end).inspect_ok(sent));
                        };
                        match reader.into_file() {
                            Ok(file) => {
                                let end = end.map_or(size, |e| e.min(size));
                                Box::pin(spans.file(file, start, end).inspect_ok(sent))
                            }
                            Err(reader) => Box::pin(reader.stream(start, end).inspect_ok(sent)),
                        }
                    },
                )
            }
            Endpoint::Manifest(Reference::Digest(d)) => {
                let m = self.manifest(d).await?;
                self.recent.confirm(&request.name, d);
                return Some(self.manifest_hit(headers, request, &m, started));
            }
            _ => return None,
        };
        self.answered(request, started);
        Some(resp)
    }

    fn manifest_hit(
        &self,
        headers: &HeaderMap,
        request: &RepoRequest,
        m: &Manifest,
        started: Instant,
    ) -> Response<Body> {
        self.used(Key::Manifest(m.digest.clone()));
        let resp = response::manifest(headers, m, Outcome::Hit);
        if request.method == Method::Get && resp.status() == StatusCode::OK {
            self.metrics.served(Outcome::Hit, m.bytes.len() as u64);
        }
        self.answered(request, started);
        resp
    }

    fn answered(&self, request: &RepoRequest, started: Instant) {
        let kind = request.endpoint.kind();
        self.metrics.request(
            kind,
            Some(Outcome::Hit),
            false,
            started.elapsed().as_secs_f64(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use regcache_protocol::Algorithm;

    fn manifest(fill: u8, size: usize) -> Manifest {
        let bytes = Bytes::from(vec![fill; size]);
        Manifest {
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            digest: Digest::of(Algorithm::Sha256, &bytes),
            bytes,
        }
    }

    #[test]
    fn recent_manifests_stay_within_their_budget_oldest_out_first() {
        let recent = Recent::default();
        let size = Recent::BUDGET / 16;
        let ms: Vec<Arc<Manifest>> = (0..20).map(|i| Arc::new(manifest(i, size))).collect();
        for m in &ms {
            recent.put(m);
        }
        let kept: Vec<bool> = ms.iter().map(|m| recent.get(&m.digest).is_some()).collect();
        assert_eq!(kept.iter().filter(|k| **k).count(), 16);
        assert!(!kept[..4].iter().any(|k| *k), "the oldest four go first");
        assert_eq!(recent.get(&ms[19].digest).unwrap().bytes, ms[19].bytes);
        // Too big to keep: not kept, nothing else dropped for it.
        let big = Arc::new(manifest(99, size + 1));
        recent.put(&big);
        assert!(recent.get(&big.digest).is_none());
        assert!(recent.get(&ms[4].digest).is_some());
    }

    /// A manifest the front keeps in memory is answered only while the
    /// store still has it: evicted there, the worker answers once the last
    /// confirmation has run out.
    #[tokio::test]
    async fn a_manifest_gone_from_the_store_is_not_answered_from_memory() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::open(dir.path()).unwrap();
        let m = manifest(7, 500);
        let name: regcache_protocol::Name = "org/img".parse().unwrap();
        store.manifest_put(&m).await.unwrap();
        store
            .link(&name, &Key::Manifest(m.digest.clone()))
            .await
            .unwrap();
        let hits = LocalHits::new(dir.path(), &Authority::new("up.test", None), None);
        let request = RepoRequest::new(
            Method::Get,
            "org/img",
            &format!("/manifests/{}", m.digest),
            None,
        )
        .unwrap();
        let headers = HeaderMap::new();
        for _ in 0..2 {
            let resp = hits.answer(&headers, &request, None).await.expect("a hit");
            assert_eq!(resp.status(), StatusCode::OK);
        }
        assert!(hits.recent.get(&m.digest).is_some(), "kept in memory");
        store
            .delete(&Key::Manifest(m.digest.clone()))
            .await
            .unwrap();
        assert!(
            hits.answer(&headers, &request, None).await.is_some(),
            "confirmed a moment ago"
        );
        let other: regcache_protocol::Name = "org/other".parse().unwrap();
        assert!(
            hits.recent.confirmed(&other, &m.digest).is_none(),
            "per repository"
        );
        for kept in hits.recent.inner.lock().unwrap().0.values_mut() {
            for (_, at) in &mut kept.confirmed {
                *at -= Recent::CONFIRMED_FOR;
            }
        }
        assert!(hits.answer(&headers, &request, None).await.is_none());
    }
}
