//! Hit or miss: what is answered from the store, what from upstream, and how
//! a miss is fetched exactly once.
//!
//! - Blobs: from the store; else from the [`fill`] in flight for the digest;
//!   else from a new fill, which every later request for the digest, GET or
//!   HEAD, with or without Range, attaches to.
//! - Manifests by digest are immutable: from the store, else one upstream
//!   GET shared by concurrent callers.
//! - Tags: a digest in the store with the time upstream last confirmed it;
//!   within the freshness window answered locally, after it revalidated with
//!   one upstream HEAD (shared by concurrent callers); when upstream cannot
//!   answer, the cached digest is served (stale).
//! - Fetched manifests and tag records are stored after the answer
//!   ([`write_behind`]), and answered from memory until they are.
//! - A client's cold manifest fetches its small parts before the client asks
//!   for them: an image's small blobs, an index's child for this platform
//!   ([`read_ahead`]).
//!
//! A store that fails to read is treated as a miss (logged), and a corrupt
//! stored manifest is removed and fetched again: a broken disk costs upstream
//! traffic, not answers.

mod direct;
mod fill;
mod read_ahead;
mod write_behind;

pub use read_ahead::DEFAULT_MAX as READ_AHEAD_DEFAULT;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::BytesMut;
use futures_util::StreamExt;
use http::Method;
use regcache_protocol::internal::{self, Inventory};
use regcache_protocol::request::Kind;
use regcache_protocol::response::{BlobStream, Outcome};
use regcache_protocol::{Algorithm, Digest, Manifest, Name, Reference, Tag};
use regcache_store::{BlobReader, Key, Managed, SpoolDir, Store, TagRecord, Toucher};

use fill::Fill;
pub use fill::Reader;
use read_ahead::ReadAhead;
use write_behind::WriteBehind;

use crate::flights::Flights;
use crate::metrics::Metrics;
use crate::peers::{self, Member, Peers};
use crate::tag_rules::{Freshness, TagRules};
use crate::upstream::{self, Upstream, MANIFEST_ACCEPT};

/// Largest manifest accepted from upstream (distribution's own limit).
const MAX_MANIFEST_BYTES: u64 = 4 << 20;

/// Why the cache could not answer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Upstream(#[from] upstream::Error),
    #[error("cache storage failed: {0}")]
    Storage(#[from] regcache_store::Error),
    #[error("the blob's upstream fetch ended without a result")]
    Abandoned,
    /// A fill's failure, shared by every reader of it.
    #[error(transparent)]
    Shared(Arc<Error>),
    /// The store has no room for the blob: it is served uncached.
    #[error(transparent)]
    NoRoom(#[from] regcache_store::NoRoom),
}

impl Error {
    /// Did upstream refuse this repository the content (404, 401, 403),
    /// as opposed to failing?
    pub(crate) fn is_refusal(&self) -> bool {
        match self {
            Error::Upstream(e) => matches!(
                e,
                upstream::Error::NotFound { .. } | upstream::Error::Denied { .. }
            ),
            Error::Shared(e) => e.is_refusal(),
            _ => false,
        }
    }

    /// The size of a blob there was no room for.
    fn no_room(&self) -> Option<u64> {
        match self {
            Error::NoRoom(e) => Some(e.bytes),
            Error::Shared(e) => e.no_room(),
            _ => None,
        }
    }
}

/// Fetches ahead of clients waiting for upstream at once, at most (of the
/// upstream's `REGCACHE_UPSTREAM_CONCURRENCY`).
const AHEAD_SLOTS: usize = 4;

/// How long a digest, once passed through, keeps bypassing the store.
const BYPASS_FOR: Duration = Duration::from_secs(600);
/// Digests remembered as bypassing, at most (oldest forgotten first).
const BYPASS_MAX: usize = 10_000;

/// A readable blob, committed in the store or being filled, with its size
/// once known (`None`: upstream sent no length).
pub struct Blob {
    pub size: Option<u64>,
    pub outcome: Outcome,
    source: Source,
}

enum Source {
    Stored(BlobReader),
    Filling(Reader),
}

impl Blob {
    pub fn stream(self, start: u64, end: Option<u64>) -> BlobStream {
        match self.source {
            Source::Stored(r) => r.stream(start, end),
            Source::Filling(r) => r.stream(start, end),
        }
    }

    /// The fill this blob is still coming from, for the front to follow;
    /// the blob itself when it is stored.
    pub fn following(self) -> Result<Reader, Blob> {
        match self.source {
            Source::Filling(r) => Ok(r),
            source => Err(Blob { source, ..self }),
        }
    }
}

/// A tags list: upstream's answer as it is, or the tags cached here when
/// upstream cannot answer.
pub enum TagsList {
    Upstream(reqwest::Response),
    Cached(Vec<Tag>),
}

/// What concurrent manifest work is shared by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum FlightKey {
    Tag(Name, Tag),
    Digest(Name, Digest),
}

/// Who is asking: a client, or another replica that takes this one to own
/// what it asks for (which then never asks a peer in turn), or the front's
/// preload (a client that asks for exactly what it wants: nothing is
/// fetched ahead of it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Client,
    Peer,
    Preload,
}

/// What a cache keeps of what it fetches, besides its store's policy.
#[derive(Debug, Clone)]
pub struct Options {
    pub tags: TagRules,
    /// False: manifests are passed through, never stored.
    pub cache_manifests: bool,
    /// False: last use is not recorded (LRU and expiry see store times).
    pub record_use: bool,
    /// The largest blob fetched ahead of a client (0: none).
    pub read_ahead: u64,
}

impl Options {
    /// Every tag fresh for `freshness`; everything stored and recorded.
    #[cfg(test)]
    pub fn uniform(freshness: Duration) -> Options {
        Options {
            tags: TagRules::uniform(freshness),
            cache_manifests: true,
            record_use: true,
            read_ahead: READ_AHEAD_DEFAULT,
        }
    }
}

/// The cache of one worker: its store, its upstream and the work in flight.
pub struct Cache {
    /// The store with its policy; `store` is the same, as a trait object.
    managed: Arc<Managed>,
    store: Arc<dyn Store>,
    spools: SpoolDir,
    upstream: Arc<Upstream>,
    fills: Arc<Mutex<HashMap<Digest, Arc<Fill>>>>,
    options: Options,
    metrics: Arc<Metrics>,
    /// The fill tasks, so that shutdown can wait for them.
    fill_tasks: tokio_util::task::TaskTracker,
    manifests: Flights<FlightKey, Result<(Manifest, Outcome), upstream::Error>>,
    /// Manifests and tag records answered, on their way to the store.
    behind: WriteBehind,
    touches: Toucher,
    /// Digests served from upstream without storing: blobs there was no
    /// room for (with their size) and what passed-through manifests refer
    /// to (`never` tags), until the instant given.
    bypass: Mutex<HashMap<Digest, (Option<u64>, std::time::Instant)>>,
    /// The other replicas of the cluster, if any.
    peers: Option<Arc<Peers>>,
    ahead: ReadAhead,
    ahead_slots: tokio::sync::Semaphore,
}

impl Cache {
    pub fn new(
        managed: Arc<Managed>,
        spools: SpoolDir,
        upstream: Upstream,
        options: Options,
        metrics: Arc<Metrics>,
    ) -> Self {
        // A wrong guess of a client's platform would cost a counted pull.
        let platform =
            (!upstream.counts_manifest_gets()).then(regcache_protocol::manifest::host_platform);
        Cache {
            store: managed.clone(),
            behind: WriteBehind::new(managed.clone()),
            touches: Toucher::new(managed.policy().touch_every()),
            managed,
            spools,
            upstream: Arc::new(upstream),
            fills: Arc::default(),
            metrics,
            fill_tasks: tokio_util::task::TaskTracker::new(),
            manifests: Flights::default(),
            bypass: Mutex::default(),
            peers: None,
            ahead: ReadAhead::new(options.read_ahead, platform),
            ahead_slots: tokio::sync::Semaphore::new(AHEAD_SLOTS),
            options,
        }
    }

    /// This cache as one replica of a cluster.
    pub fn with_peers(mut self, peers: Option<Arc<Peers>>) -> Self {
        self.peers = peers;
        self
    }

    /// The replica that owns `key`, when that is another one and `via` is
    /// not a peer (a peer's request is answered here, as the owner).
    fn owner(&self, key: &str, via: Via) -> Option<(Arc<Peers>, Member)> {
        let peers = self.peers.as_ref().filter(|_| via != Via::Peer)?;
        Some((peers.clone(), peers.owner(key)?))
    }

    /// Live members of the cluster (0: not in one).
    pub fn members(&self) -> usize {
        self.peers.as_ref().map_or(0, |p| p.count())
    }

    /// The store with its policy.
    pub fn managed(&self) -> &Arc<Managed> {
        &self.managed
    }

    /// Serves `digest` from upstream, uncached, until [`BYPASS_FOR`] from now.
    fn bypass(&self, digest: &Digest, size: Option<u64>) {
        let now = std::time::Instant::now();
        let mut b = self.bypass.lock().unwrap();
        if b.len() >= BYPASS_MAX {
            b.retain(|_, (_, until)| *until > now);
            if b.len() >= BYPASS_MAX {
                b.clear();
            }
        }
        b.insert(digest.clone(), (size, now + BYPASS_FOR));
    }

    /// Is `digest` bypassing the store? `Some(size if known)`.
    fn bypassing(&self, digest: &Digest) -> Option<Option<u64>> {
        let b = self.bypass.lock().unwrap();
        b.get(digest)
            .filter(|(_, until)| *until > std::time::Instant::now())
            .map(|(size, _)| *size)
    }

    /// `digest` straight from upstream: its size from `size` or a HEAD.
    async fn direct(&self, name: &Name, digest: &Digest, size: Option<u64>) -> Result<Blob, Error> {
        let size = match size {
            Some(s) => s,
            None => match self.upstream_blob_size(name, digest).await? {
                Some(s) => s,
                None => return Err(self.upstream.garbage("blob HEAD without a length").into()),
            },
        };
        self.metrics.bypassed.inc();
        let reader = direct::reader(self.upstream.clone(), name.clone(), digest.clone(), size);
        Ok(Blob {
            size: Some(size),
            outcome: Outcome::Bypass,
            source: Source::Stored(reader),
        })
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Is the upstream taken to be away right now?
    pub fn upstream_away(&self) -> bool {
        self.upstream.is_away()
    }

    /// Waits for the fills started so far, leaving new ones possible.
    #[cfg(test)]
    pub async fn drain_fills_for_tests(&self) {
        loop {
            if self.fills.lock().unwrap().is_empty() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Waits until every blob fill that has started is committed or has
    /// failed, and every answered manifest and tag is written, so that
    /// shutdown does not throw away a download.
    pub async fn drain_fills(&self) {
        self.fill_tasks.close();
        self.fill_tasks.wait().await;
        self.behind.drain().await;
    }

    /// Reads from the store; a failing store is a miss (logged), a corrupt
    /// entry is removed so that it is fetched again.
    async fn found<T>(&self, key: &Key, read: regcache_store::Result<Option<T>>) -> Option<T> {
        match read {
            Ok(found) => {
                if found.is_some() && !matches!(key, Key::Tag(..)) && self.options.record_use {
                    self.managed.used(key);
                    self.touches.used(&self.store, key.clone());
                }
                found
            }
            Err(e) => {
                tracing::warn!(?key, error = %e, "cache storage read failed; treating as a miss");
                if matches!(e, regcache_store::Error::Corrupt { .. }) {
                    if let Err(e) = self.store.delete(key).await {
                        tracing::warn!(?key, error = %e, "could not remove a corrupt entry");
                    }
                }
                None
            }
        }
    }

    async fn stored_blob(&self, digest: &Digest) -> Option<BlobReader> {
        let key = Key::Blob(digest.clone());
        self.found(&key, self.store.blob_open(digest).await).await
    }

    async fn stored_manifest(&self, digest: &Digest) -> Option<Manifest> {
        if let Some(m) = self.behind.manifest(digest) {
            return Some(m);
        }
        let key = Key::Manifest(digest.clone());
        self.found(&key, self.store.manifest_get(digest).await)
            .await
    }

    /// The fill in flight for `digest`, unless it has failed.
    fn fill_of(&self, digest: &Digest) -> Option<Arc<Fill>> {
        let fill = self.fills.lock().unwrap().get(digest).cloned();
        fill.filter(|f| !f.failed())
    }

    /// May `name` be served `key`? Yes when it was seen to have it upstream
    /// (a link); else upstream is asked with a HEAD for `name`, and a yes is
    /// linked. So content fetched for one repository is never served under
    /// another that upstream would refuse. `true` when upstream was asked.
    async fn confirm(&self, name: &Name, key: &Key) -> Result<bool, Error> {
        let linked = self.store.linked(name, key).await;
        if linked.as_ref().is_ok_and(|l| *l) {
            return Ok(false);
        }
        let (kind, path, accept) = match key {
            Key::Blob(d) => (Kind::Blob, format!("/v2/{name}/blobs/{d}"), None),
            Key::Manifest(d) => (
                Kind::Manifest,
                format!("/v2/{name}/manifests/{d}"),
                Some(MANIFEST_ACCEPT),
            ),
            Key::Tag(..) => return Ok(false),
        };
        let up = &self.upstream;
        let resp = up.send(Method::HEAD, Some(name), &path, accept).await?;
        up.check(resp, kind, &path)?;
        self.link(name, key).await;
        Ok(true)
    }

    async fn link(&self, name: &Name, key: &Key) {
        if let Err(e) = self.store.link(name, key).await {
            tracing::warn!(%name, ?key, error = %e, "could not record what a repository has");
        }
    }

    /// Links `name` to manifest `m` and to everything it refers to.
    async fn link_manifest(&self, name: &Name, m: &Manifest) {
        self.link(name, &Key::Manifest(m.digest.clone())).await;
        match regcache_protocol::manifest::references(m) {
            Ok(refs) => {
                let keys = refs.blobs.into_iter().map(Key::Blob);
                for key in keys.chain(refs.manifests.into_iter().map(Key::Manifest)) {
                    self.link(name, &key).await;
                }
            }
            Err(e) => tracing::debug!(%name, error = %e, "manifest references not linked"),
        }
    }

    /// A blob for GET: from a fill in flight, the store, or a new fill, once
    /// `name` may have it; its size known before a byte is sent.
    ///
    /// The fill map is asked before and after the store: a fill leaves the
    /// map only once committed, so a blob missing from both is truly missing.
    /// A fill started for another repository that upstream refused (404,
    /// 401, 403) says nothing about `name`: it gets a fill of its own.
    #[cfg(test)]
    pub async fn blob(&self, name: &Name, digest: &Digest) -> Result<Blob, Error> {
        self.blob_for(name, digest, Via::Client).await
    }

    /// [`Cache::blob`], for `via`: a miss a peer owns is filled from it.
    pub async fn blob_for(&self, name: &Name, digest: &Digest, via: Via) -> Result<Blob, Error> {
        let key = Key::Blob(digest.clone());
        let mut refused: Option<Arc<Fill>> = None;
        loop {
            let fill = self
                .fill_of(digest)
                .filter(|f| !refused.as_ref().is_some_and(|r| Arc::ptr_eq(f, r)));
            if let Some(fill) = fill {
                if fill.repo != *name {
                    self.confirm(name, &key).await?;
                }
                let mut reader = fill.attach();
                match reader.size().await {
                    Ok(size) => {
                        return Ok(Blob {
                            size,
                            outcome: reader.outcome,
                            source: Source::Filling(reader),
                        })
                    }
                    Err(e) if fill.repo != *name && refused.is_none() && e.is_refusal() => {
                        refused = Some(fill);
                        continue;
                    }
                    Err(e) => match e.no_room() {
                        Some(size) => return self.direct(name, digest, Some(size)).await,
                        None => return Err(e),
                    },
                }
            }
            if let Some(stored) = self.stored_blob(digest).await {
                let asked = self.confirm(name, &key).await?;
                return Ok(Blob {
                    size: Some(stored.size),
                    outcome: if asked {
                        Outcome::Revalidated
                    } else {
                        Outcome::Hit
                    },
                    source: Source::Stored(stored),
                });
            }
            if let Some(size) = self.bypassing(digest) {
                self.confirm(name, &key).await?;
                return self.direct(name, digest, size).await;
            }
            // A slower store tier's copy (the shared bucket) saves upstream.
            let origin = match self.store.blob_source(digest).await {
                Ok(Some(reader)) => {
                    self.confirm(name, &key).await?;
                    fill::Origin::Store(reader)
                }
                Ok(None) => match self.owner(&digest.to_string(), via) {
                    Some((peers, owner)) => fill::Origin::Peer(peers, owner),
                    None => fill::Origin::Upstream,
                },
                Err(e) => {
                    tracing::warn!(%digest, error = %e, "shared store read failed; asking upstream");
                    fill::Origin::Upstream
                }
            };
            let fill = {
                let mut fills = self.fills.lock().unwrap();
                match fills.get(digest) {
                    Some(f)
                        if !f.failed() && !refused.as_ref().is_some_and(|r| Arc::ptr_eq(f, r)) =>
                    {
                        None
                    }
                    // A fill that started after our look at the store, and
                    // committed and left the map since: the store has it now.
                    _ if self.managed.has_blob(digest) => None,
                    _ => {
                        let spool = self.spools.create().map_err(|source| {
                            Error::Storage(regcache_store::Error::Io {
                                op: "create spool in",
                                path: self.spools.path().to_owned(),
                                source,
                            })
                        })?;
                        let (fill, writer) = Fill::new(spool, name.clone());
                        fills.insert(digest.clone(), fill.clone());
                        Some((fill, writer))
                    }
                }
            };
            // Another request started a fill meanwhile (or finished one):
            // attach to it (or read the store).
            let Some((fill, writer)) = fill else { continue };
            // Attached first: the request that starts a fill is its miss,
            // however fast the fill then is.
            let mut reader = fill.attach();
            self.spawn_fill(fill.clone(), writer, origin, name, digest);
            let size = match reader.size().await {
                Ok(size) => size,
                Err(e) => match e.no_room() {
                    Some(size) => {
                        self.bypass(digest, Some(size));
                        return self.direct(name, digest, Some(size)).await;
                    }
                    None => return Err(e),
                },
            };
            return Ok(Blob {
                size,
                outcome: reader.outcome,
                source: Source::Filling(reader),
            });
        }
    }

    fn spawn_fill(
        &self,
        fill: Arc<Fill>,
        writer: fill::Writer,
        origin: fill::Origin,
        name: &Name,
        digest: &Digest,
    ) {
        let (fills, store, d, n) = (
            self.fills.clone(),
            self.store.clone(),
            digest.clone(),
            name.clone(),
        );
        let run = fill::run(
            writer,
            origin,
            self.managed.clone(),
            self.upstream.clone(),
            self.metrics.clone(),
            name.clone(),
            digest.clone(),
        );
        self.fill_tasks
            .spawn(tracing::Instrument::in_current_span(async move {
                if run.await.is_ok() {
                    if let Err(e) = store.link(&n, &Key::Blob(d.clone())).await {
                        tracing::warn!(name = %n, error = %e, "could not record what a repository has");
                    }
                }
                // Only now: a request that misses the map finds the blob stored.
                let mut fills = fills.lock().unwrap();
                if fills.get(&d).is_some_and(|f| Arc::ptr_eq(f, &fill)) {
                    fills.remove(&d);
                }
            }));
    }

    /// Fetches those of `digests` that are neither stored, nor being
    /// fetched, nor passed through, each as a fill that runs on without a
    /// reader; [`AHEAD_SLOTS`] at a time, so that clients keep the rest of
    /// the upstream's concurrency.
    fn fetch_ahead(self: &Arc<Self>, name: &Name, digests: Vec<Digest>) {
        for digest in digests {
            let (cache, name) = (self.clone(), name.clone());
            self.fill_tasks.spawn(async move {
                let Ok(_slot) = cache.ahead_slots.acquire().await else {
                    return;
                };
                let known = cache.managed.has_blob(&digest) || cache.fill_of(&digest).is_some();
                if known || cache.bypassing(&digest).is_some() {
                    return;
                }
                cache.metrics.read_ahead.inc();
                if let Err(e) = cache.blob_for(&name, &digest, Via::Client).await {
                    tracing::debug!(%name, %digest, error = %e, "read-ahead failed");
                }
            });
        }
    }

    /// Fetches manifest `digest` of `name` as a client would, in the
    /// background (and so, in turn, what it holds).
    fn fetch_manifest_ahead(self: &Arc<Self>, name: &Name, digest: Digest) {
        let (cache, name) = (self.clone(), name.clone());
        self.fill_tasks.spawn(async move {
            let Ok(_slot) = cache.ahead_slots.acquire().await else {
                return;
            };
            cache.metrics.read_ahead.inc();
            let reference = Reference::Digest(digest);
            if let Err(e) = cache.manifest_for(&name, &reference, Via::Client).await {
                tracing::debug!(%name, ?reference, error = %e, "read-ahead failed");
            }
        });
    }

    /// A blob's size for HEAD, without downloading it: from a fill in
    /// flight, the store, or an upstream HEAD (each once `name` may have it).
    pub async fn blob_size(
        &self,
        name: &Name,
        digest: &Digest,
    ) -> Result<(Option<u64>, Outcome), Error> {
        let key = Key::Blob(digest.clone());
        if let Some(fill) = self.fill_of(digest) {
            if fill.repo == *name || self.store.linked(name, &key).await.unwrap_or(false) {
                let mut reader = fill.attach();
                return Ok((reader.size().await?, reader.outcome));
            }
        }
        if let Some(size) = self.found(&key, self.store.blob_size(digest).await).await {
            let asked = self.confirm(name, &key).await?;
            return Ok((
                Some(size),
                if asked {
                    Outcome::Revalidated
                } else {
                    Outcome::Hit
                },
            ));
        }
        if let Ok(Some(shared)) = self.store.blob_source(digest).await {
            self.confirm(name, &key).await?;
            return Ok((Some(shared.size), Outcome::Hit));
        }
        let size = self.upstream_blob_size(name, digest).await?;
        Ok((size, Outcome::Miss))
    }

    /// An upstream HEAD of a blob for `name` (linking it on success).
    async fn upstream_blob_size(
        &self,
        name: &Name,
        digest: &Digest,
    ) -> Result<Option<u64>, upstream::Error> {
        let up = &self.upstream;
        let path = format!("/v2/{name}/blobs/{digest}");
        let resp = up.send(Method::HEAD, Some(name), &path, None).await?;
        let resp = up.check(resp, Kind::Blob, &digest.to_string())?;
        self.link(name, &Key::Blob(digest.clone())).await;
        // Not `content_length()`: that is the (empty) HEAD body's length.
        Ok(resp
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok()))
    }

    /// A manifest by tag or digest.
    #[cfg(test)]
    pub async fn manifest(
        self: &Arc<Self>,
        name: &Name,
        reference: &Reference,
    ) -> Result<(Manifest, Outcome), Error> {
        self.manifest_for(name, reference, Via::Client).await
    }

    /// [`Cache::manifest`], for `via`: a miss or a revalidation a peer owns
    /// is asked of it. A client's miss starts its read-ahead.
    pub async fn manifest_for(
        self: &Arc<Self>,
        name: &Name,
        reference: &Reference,
        via: Via,
    ) -> Result<(Manifest, Outcome), Error> {
        let found = self.find_manifest(name, reference, via).await?;
        if found.1 == Outcome::Miss && via == Via::Client {
            let ahead = self.ahead.manifest(name, &found.0);
            self.fetch_ahead(name, ahead.blobs);
            if let Some(child) = ahead.manifest {
                self.fetch_manifest_ahead(name, child);
            }
        }
        Ok(found)
    }

    async fn find_manifest(
        self: &Arc<Self>,
        name: &Name,
        reference: &Reference,
        via: Via,
    ) -> Result<(Manifest, Outcome), Error> {
        match reference {
            Reference::Digest(d)
                if !self.options.cache_manifests || self.bypassing(d).is_some() =>
            {
                let m = self
                    .fetch_manifest(name, &d.to_string(), Some(d), false)
                    .await?;
                self.metrics.bypassed.inc();
                Ok((m, Outcome::Bypass))
            }
            Reference::Digest(d) => {
                if let Some(m) = self.stored_manifest(d).await {
                    let asked = self.confirm(name, &Key::Manifest(d.clone())).await?;
                    let outcome = if asked {
                        Outcome::Revalidated
                    } else {
                        Outcome::Hit
                    };
                    return Ok((m, outcome));
                }
                Ok((self.fetch_by_digest(name, d, via).await?, Outcome::Miss))
            }
            Reference::Tag(tag) => self.manifest_by_tag(name, tag, via).await,
        }
    }

    async fn manifest_by_tag(
        self: &Arc<Self>,
        name: &Name,
        tag: &Tag,
        via: Via,
    ) -> Result<(Manifest, Outcome), Error> {
        let freshness = match self.options.tags.of(name, tag) {
            Freshness::For(_) if !self.options.cache_manifests => {
                let m = self.fetch_manifest(name, tag.as_str(), None, false).await?;
                self.metrics.bypassed.inc();
                return Ok((m, Outcome::Bypass));
            }
            Freshness::For(d) => d,
            // Passed through, and so is what it refers to.
            Freshness::Never => {
                let m = self.fetch_manifest(name, tag.as_str(), None, false).await?;
                if let Ok(refs) = regcache_protocol::manifest::references(&m) {
                    for d in refs.blobs.iter().chain(&refs.manifests) {
                        self.bypass(d, None);
                    }
                }
                self.metrics.bypassed.inc();
                return Ok((m, Outcome::Bypass));
            }
        };
        let key = Key::Tag(name.clone(), tag.clone());
        let cached = self.found(&key, self.tag_get(name, tag).await).await;
        let cached_manifest = match &cached {
            Some(rec) => self.stored_manifest(&rec.digest).await,
            None => None,
        };
        if let (Some(rec), Some(m)) = (&cached, &cached_manifest) {
            let age = SystemTime::now()
                .duration_since(rec.confirmed)
                .unwrap_or_default();
            if age < freshness {
                return Ok((m.clone(), Outcome::Hit));
            }
        }
        // Clients asking for one tag at once share one upstream revalidation.
        let (cache, n, t, m) = (
            self.clone(),
            name.clone(),
            tag.clone(),
            cached_manifest.clone(),
        );
        let revalidate = async move { cache.revalidate(&n, &t, m.as_ref(), via, freshness).await };
        let key = FlightKey::Tag(name.clone(), tag.clone());
        match self.manifests.run(key, revalidate).await {
            Ok(found) => Ok(found),
            Err(e) if e.allows_stale() && cached_manifest.is_some() => {
                self.metrics.stale_served.inc();
                tracing::warn!(%name, %tag, error = %e, "upstream unavailable; serving cached tag");
                Ok((cached_manifest.expect("checked above"), Outcome::Stale))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// GETs a manifest by digest; concurrent callers share one request.
    async fn fetch_by_digest(
        self: &Arc<Self>,
        name: &Name,
        d: &Digest,
        via: Via,
    ) -> Result<Manifest, upstream::Error> {
        let name_for_key = name.clone();
        let (cache, name, digest) = (self.clone(), name.clone(), d.clone());
        let fetch = async move {
            if let Some((peers, owner)) = cache.owner(&digest.to_string(), via) {
                let path = format!("/v2/{name}/manifests/{digest}");
                if let Some((m, _)) = cache
                    .ask_owner(&peers, &owner, &name, &path, Some(&digest))
                    .await
                {
                    return Ok((m, Outcome::Miss));
                }
            }
            let m = cache
                .fetch_manifest(&name, &digest.to_string(), Some(&digest), true)
                .await?;
            Ok((m, Outcome::Miss))
        };
        let key = FlightKey::Digest(name_for_key, d.clone());
        let (m, _) = self.manifests.run(key, fetch).await?;
        Ok(m)
    }

    /// Asks upstream what `tag` points to now (a HEAD, which Docker Hub does not
    /// count as a pull) and GETs the manifest only if we do not have it.
    async fn revalidate(
        self: &Arc<Self>,
        name: &Name,
        tag: &Tag,
        cached: Option<&Manifest>,
        via: Via,
        freshness: Duration,
    ) -> Result<(Manifest, Outcome), upstream::Error> {
        // A flight that finished between our look at the tag and this one
        // may have confirmed it just now: that answer stands.
        if let Ok(Some(rec)) = self.tag_get(name, tag).await {
            let age = SystemTime::now()
                .duration_since(rec.confirmed)
                .unwrap_or_default();
            if age < freshness {
                if let Some(m) = self.stored_manifest(&rec.digest).await {
                    return Ok((m, Outcome::Hit));
                }
            }
        }
        // In a cluster the tag's owner revalidates, once for every replica.
        if let Some((peers, owner)) = self.owner(&format!("{name}:{tag}"), via) {
            let path = format!("/v2/{name}/manifests/{tag}");
            if let Some((m, confirmed)) = self.ask_owner(&peers, &owner, name, &path, None).await {
                let record = TagRecord {
                    digest: m.digest.clone(),
                    confirmed: confirmed.unwrap_or_else(SystemTime::now),
                };
                self.behind.tag_put(name, tag, record).await;
                let outcome = if cached.is_some() {
                    Outcome::Revalidated
                } else {
                    Outcome::Miss
                };
                return Ok((m, outcome));
            }
        }
        let up = &self.upstream;
        // A tag never seen: one GET instead of a HEAD and a GET, a round
        // trip less on every cold pull (not on Docker Hub, which counts a
        // GET as a pull and a HEAD not: the manifest may be stored already).
        if cached.is_none() && !up.counts_manifest_gets() {
            let m = self.fetch_manifest(name, tag.as_str(), None, true).await?;
            self.record_tag(name, tag, &m.digest).await;
            return Ok((m, Outcome::Miss));
        }
        let path = format!("/v2/{name}/manifests/{tag}");
        let resp = up
            .send(Method::HEAD, Some(name), &path, Some(MANIFEST_ACCEPT))
            .await?;
        let resp = up.check(resp, Kind::Manifest, &format!("manifest {name}:{tag}"))?;
        let manifest = match header_digest(&resp) {
            Some(d) if cached.is_some_and(|m| m.digest == d) => {
                let m = cached.cloned().expect("checked above");
                self.record_tag(name, tag, &m.digest).await;
                return Ok((m, Outcome::Revalidated));
            }
            // Upstream says the tag has it: the repository may have it.
            Some(d) => match self.stored_manifest(&d).await {
                Some(m) => {
                    self.link_manifest(name, &m).await;
                    m
                }
                None => self.fetch_by_digest(name, &d, via).await?,
            },
            // No digest in the HEAD answer: fetch by tag and hash what we got.
            None => self.fetch_manifest(name, tag.as_str(), None, true).await?,
        };
        self.record_tag(name, tag, &manifest.digest).await;
        let outcome = if cached.is_some() {
            Outcome::Revalidated
        } else {
            Outcome::Miss
        };
        Ok((manifest, outcome))
    }

    /// A manifest from the replica that owns it, verified (against
    /// `expected`, or the digest the owner names) and stored; with when the
    /// owner's upstream last confirmed the tag, for a tag. `None`: the owner
    /// failed (counted, logged): the caller asks upstream itself.
    async fn ask_owner(
        &self,
        peers: &Peers,
        owner: &Member,
        name: &Name,
        path: &str,
        expected: Option<&Digest>,
    ) -> Option<(Manifest, Option<SystemTime>)> {
        let fetched = async {
            let resp = peers
                .send(owner, Method::GET, path, Some(MANIFEST_ACCEPT), None)
                .await?;
            let header = |h: &str| {
                resp.headers()
                    .get(h)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            };
            let media_type = header("content-type").ok_or("no Content-Type")?;
            let confirmed = header(peers::CONFIRMED)
                .and_then(|ms| ms.parse::<u64>().ok())
                .map(|ms| std::time::UNIX_EPOCH + Duration::from_millis(ms));
            let named = header("docker-content-digest").and_then(|d| d.parse::<Digest>().ok());
            let want = expected.cloned().or(named).ok_or("no digest named")?;
            if resp
                .content_length()
                .is_some_and(|l| l > MAX_MANIFEST_BYTES)
            {
                return Err("manifest larger than 4 MiB".to_string());
            }
            let bytes = resp
                .bytes()
                .await
                .map_err(|e| e.without_url().to_string())?;
            let m = Manifest {
                media_type,
                bytes,
                digest: want,
            };
            if !m.verifies() {
                return Err("the owner sent bytes that do not match the digest".to_string());
            }
            Ok::<_, String>((m, confirmed))
        };
        match fetched.await {
            Ok((m, confirmed)) => {
                self.metrics.peer_fetches.inc();
                self.behind.manifest_put(&m).await;
                self.link_manifest(name, &m).await;
                Some((m, confirmed))
            }
            Err(e) => {
                self.metrics.peer_fallbacks.inc();
                tracing::info!(%name, %path, owner = %owner.id, error = %e, "the owner replica failed; asking upstream");
                None
            }
        }
    }

    /// When upstream last confirmed `name:tag` (ms since the epoch), if cached.
    pub async fn tag_confirmed_ms(&self, name: &Name, tag: &Tag) -> Option<u64> {
        let rec = self.tag_get(name, tag).await.ok()??;
        let since = rec.confirmed.duration_since(std::time::UNIX_EPOCH).ok()?;
        Some(since.as_millis() as u64)
    }

    /// A tag's record: held on its way to the store, or stored.
    async fn tag_get(&self, name: &Name, tag: &Tag) -> regcache_store::Result<Option<TagRecord>> {
        match self.behind.tag(name, tag) {
            Some(rec) => Ok(Some(rec)),
            None => self.store.tag_get(name, tag).await,
        }
    }

    /// Records that upstream confirmed `name:tag -> digest` just now.
    async fn record_tag(&self, name: &Name, tag: &Tag, digest: &Digest) {
        let record = TagRecord {
            digest: digest.clone(),
            confirmed: SystemTime::now(),
        };
        self.behind.tag_put(name, tag, record).await;
    }

    /// GETs a manifest, verifies it against `expected` (or the upstream's
    /// `Docker-Content-Digest`) and, if `keep`, stores it byte for byte.
    async fn fetch_manifest(
        &self,
        name: &Name,
        reference: &str,
        expected: Option<&Digest>,
        keep: bool,
    ) -> Result<Manifest, upstream::Error> {
        let up = &self.upstream;
        let path = format!("/v2/{name}/manifests/{reference}");
        let resp = up
            .send(Method::GET, Some(name), &path, Some(MANIFEST_ACCEPT))
            .await?;
        let resp = up.check(
            resp,
            Kind::Manifest,
            &format!("manifest {name}:{reference}"),
        )?;
        if resp
            .content_length()
            .is_some_and(|l| l > MAX_MANIFEST_BYTES)
        {
            return Err(up.garbage("manifest larger than 4 MiB"));
        }
        let media_type = resp
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or("").trim().to_owned())
            .filter(|v| !v.is_empty() && !v.contains('\n'))
            .ok_or_else(|| up.garbage("manifest without Content-Type"))?;
        let announced = header_digest(&resp);
        let mut bytes = BytesMut::new();
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            bytes.extend_from_slice(&chunk.map_err(|e| up.transport(e))?);
            if bytes.len() as u64 > MAX_MANIFEST_BYTES {
                return Err(up.garbage("manifest larger than 4 MiB"));
            }
        }
        let bytes = bytes.freeze();
        let want = expected.or(announced.as_ref());
        let algorithm = want.map_or(Algorithm::Sha256, Digest::algorithm);
        let digest = Digest::of(algorithm, &bytes);
        if let Some(want) = want {
            if *want != digest {
                return Err(upstream::Error::Mismatch {
                    upstream: up.name().to_owned(),
                    expected: want.to_string(),
                    actual: digest.to_string(),
                });
            }
        }
        let m = Manifest {
            media_type,
            bytes,
            digest,
        };
        if keep {
            self.behind.manifest_put(&m).await;
            self.link_manifest(name, &m).await;
        }
        Ok(m)
    }

    /// tags/list from upstream; when upstream cannot answer, the tags pulled
    /// through this cache (as registry:2's proxy does).
    pub async fn tags_list(&self, name: &Name, path_and_query: &str) -> Result<TagsList, Error> {
        match self.forward(name, path_and_query).await {
            Ok(resp) => Ok(TagsList::Upstream(resp)),
            Err(e) if e.allows_stale() => {
                let mut tags = self.store.tags(name).await.unwrap_or_default();
                tags.extend(self.behind.tags_of(name));
                tags.sort();
                tags.dedup();
                if tags.is_empty() {
                    return Err(e.into());
                }
                tracing::warn!(%name, error = %e, "upstream unavailable; listing cached tags");
                Ok(TagsList::Cached(tags))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Forwards a request that is not cached (tags/list, referrers).
    pub async fn forward(
        &self,
        name: &Name,
        path_and_query: &str,
    ) -> Result<reqwest::Response, upstream::Error> {
        let up = &self.upstream;
        let resp = up
            .send(Method::GET, Some(name), path_and_query, None)
            .await?;
        // A 401 after our own auth is upstream refusing us, not the client;
        // a 5xx is upstream failing (the caller may answer from cache).
        match resp.status().as_u16() {
            401 | 403 | 429 | 500..=599 => {
                Err(up.check(resp, Kind::Other, name.as_str()).unwrap_err())
            }
            _ => Ok(resp),
        }
    }

    /// What this cache holds, for the front's inventory and `_catalog`.
    pub async fn inventory(&self) -> Result<Inventory, Error> {
        let repositories = self.store.repositories().await?;
        let usage = self.store.usage().await?;
        Ok(Inventory {
            repositories: repositories
                .into_iter()
                .filter_map(|(name, r)| {
                    // What was evicted is not listed.
                    let manifests: Vec<Digest> = r
                        .manifests
                        .into_iter()
                        .filter(|d| self.managed.has_manifest(d))
                        .collect();
                    if manifests.is_empty() && r.tags.is_empty() {
                        return None;
                    }
                    let repo = internal::Repository {
                        tags: r
                            .tags
                            .into_iter()
                            .map(|(t, rec)| (t.to_string(), rec.digest.to_string()))
                            .collect(),
                        bytes: self.managed.sizes(&manifests),
                        last_used_ms: self
                            .managed
                            .last_used(&manifests)
                            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                            .map_or(0, |d| d.as_millis() as u64),
                        manifests: manifests.iter().map(Digest::to_string).collect(),
                    };
                    Some((name.to_string(), repo))
                })
                .collect(),
            blobs: usage.blobs,
            bytes: usage.bytes,
        })
    }

    /// How the cache is doing, for the front's readiness and status.
    pub fn status(&self) -> internal::Status {
        let health = self.store.health();
        let fills: Vec<internal::FillProgress> = self
            .fills
            .lock()
            .unwrap()
            .iter()
            .map(|(d, f)| {
                let (written, total) = f.progress();
                internal::FillProgress {
                    repository: f.repo.to_string(),
                    digest: d.to_string(),
                    written,
                    total,
                }
            })
            .collect();
        let stats = self.managed.stats();
        internal::Status {
            store: self.store.describe(),
            degraded: health.degraded,
            remote_errors: health.remote_errors,
            backfill: health.backfill,
            upstream_away: self.upstream.is_away(),
            fills_in_flight: fills.len() as u64,
            members: self.members() as u64,
            offline: self.upstream.is_offline(),
            totals: self.metrics.totals(),
            stored_bytes: self.managed.stored_bytes(),
            budget_bytes: stats.max_size.unwrap_or(0),
            fills,
        }
    }

    /// The store's usage, for the metrics page.
    pub async fn usage(&self) -> Result<regcache_store::Usage, Error> {
        Ok(self.store.usage().await?)
    }
}

#[cfg(test)]
pub(crate) mod tests;

fn header_digest(resp: &reqwest::Response) -> Option<Digest> {
    resp.headers()
        .get("docker-content-digest")?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}
