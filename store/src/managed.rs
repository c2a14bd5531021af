//! The store as a cache uses it: any [`Store`], with an [`Index`] of its
//! local tier and the [`Policy`] applied while it serves.
//!
//! - A fill asks for room ([`Managed::reserve`]) before it writes: the least
//!   recently used images are evicted until the blob fits the budget and the
//!   free-space floor, so the stored size never exceeds the budget. No room
//!   (everything left is being pulled, or the blob is bigger than the
//!   budget): the fill is refused and the cache serves it uncached.
//! - Expiry and the floor are swept periodically; the disk filling up
//!   anyway (`ENOSPC`) asks for a sweep at once ([`Managed::relieve`]).
//! - Evictions delete an image's tags, then its manifests, then the blobs no
//!   remaining manifest refers to, each an atomic unlink: a kill at any
//!   point leaves no tag without its manifest and no manifest without the
//!   blobs it had. A blob being read while it is evicted reads to its end
//!   (an open file outlives its name).
//! - The index is built by one scan of the disk in the background, so start
//!   costs nothing however much is stored; until it is done the budget is
//!   not enforced, and a sweep follows it. Uses recorded by the front (file
//!   times) are read back for each image before it is evicted.
//! - With a shared tier (S3) the policy is the local tier's: evictions
//!   remove local copies only; the bucket keeps its own lifecycle rules.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;

use crate::fs::manifest_file_size;
use crate::index::{Index, ManifestEntry, Unit};
use crate::policy::{self, Collected, Moment, Policy, Reason, Verdict};
use crate::{
    BlobReader, Digest, FsStore, Health, Key, Manifest, Name, Repository, Result, Store, Tag,
    TagRecord, Usage, Verified,
};

/// A store with a cache policy.
pub struct Managed {
    inner: Arc<dyn Store>,
    local: FsStore,
    policy: Policy,
    state: Mutex<State>,
    stats: Stats,
}

#[derive(Default)]
struct State {
    index: Index,
    /// Has the first scan been merged?
    ready: bool,
    /// Removed while the first scan ran: not to be taken from its findings.
    gone: HashSet<Key>,
    /// Room promised to fills in flight.
    reserved: HashMap<Digest, u64>,
}

#[derive(Default)]
struct Stats {
    evicted: [AtomicU64; 3],
    freed: [AtomicU64; 3],
    refused: AtomicU64,
    disk_full: AtomicU64,
    scan_millis: AtomicU64,
}

/// What a policy has done, for metrics.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PolicyStats {
    /// (reason, images or loose blobs evicted, bytes freed).
    pub evicted: Vec<(Reason, u64, u64)>,
    /// Fills refused for want of room (served uncached).
    pub refused: u64,
    /// Writes that found the disk full.
    pub disk_full: u64,
    pub max_size: Option<u64>,
    /// The index is built.
    pub ready: bool,
    /// How long building it took.
    pub scan_seconds: f64,
}

/// Room held for one fill until it commits or fails (dropped).
pub struct Reservation {
    owner: Option<(Arc<Managed>, Digest)>,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some((m, d)) = self.owner.take() {
            m.lock().reserved.remove(&d);
        }
    }
}

/// Why a fill may not be stored.
#[derive(Debug, Clone, thiserror::Error)]
#[error("no room for {}: {reason}", policy::size(*bytes))]
pub struct NoRoom {
    pub bytes: u64,
    pub reason: String,
}

/// What a collection removed or would remove.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Report {
    /// Each image (by its root manifest) or loose blob, why, and its bytes.
    pub removed: Vec<Removed>,
    pub freed_bytes: u64,
    /// What is stored afterwards.
    pub stored_bytes: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Removed {
    pub what: String,
    pub reason: Reason,
    pub bytes: u64,
    pub tags: Vec<String>,
}

impl Managed {
    /// `inner` with `policy` applied to `local`, its local tier (`inner`
    /// itself for a filesystem store).
    pub fn new(inner: Arc<dyn Store>, local: FsStore, policy: Policy) -> Arc<Managed> {
        Arc::new(Managed {
            inner,
            local,
            policy,
            state: Mutex::default(),
            stats: Stats::default(),
        })
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Builds the index in the background, then sweeps every `every`.
    pub fn start(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let scan = me.clone();
            let _ = tokio::task::spawn_blocking(move || scan.build_index()).await;
            let every = me.sweep_every();
            loop {
                let sweep = me.clone();
                let _ = tokio::task::spawn_blocking(move || sweep.sweep()).await;
                tokio::time::sleep(every).await;
            }
        })
    }

    /// How often expiry and the floor are checked: often enough that
    /// nothing outlives its TTL by much more than a quarter of it.
    fn sweep_every(&self) -> Duration {
        self.policy.touch_every().max(Duration::from_secs(1))
    }

    /// Scans the local tier and merges what it found (blocking).
    pub fn build_index(&self) {
        let started = Instant::now();
        let scanned = self.local.scan();
        let mut st = self.lock();
        let gone = std::mem::take(&mut st.gone);
        st.index.merge(scanned, &gone);
        st.ready = true;
        let ms = started.elapsed().as_millis() as u64;
        self.stats.scan_millis.store(ms, Ordering::Relaxed);
        tracing::info!(
            blobs = st.index.blob_count(),
            manifests = st.index.manifest_count(),
            stored = %policy::size(st.index.bytes()),
            policy = %self.policy.describe(),
            "cache index built in {ms} ms"
        );
    }

    /// Applies expiry, the budget and the floor now (blocking).
    pub fn sweep(&self) -> Report {
        self.collect_now(0, &self.policy, false, None).1
    }

    /// Makes room for a `bytes`-byte blob about to be filled, holding it
    /// until the reservation is dropped.
    pub async fn reserve(
        self: &Arc<Self>,
        digest: &Digest,
        bytes: u64,
    ) -> std::result::Result<Reservation, NoRoom> {
        if let Some(r) = self.reserve_if_room(digest, bytes) {
            return Ok(r);
        }
        let (me, d) = (self.clone(), digest.clone());
        let result = tokio::task::spawn_blocking(move || {
            let (c, _) = me.collect_now(bytes, &me.policy, false, None);
            if c.fits {
                me.lock().reserved.insert(d.clone(), bytes);
                Ok(Reservation {
                    owner: Some((me.clone(), d)),
                })
            } else {
                me.stats.refused.fetch_add(1, Ordering::Relaxed);
                Err(NoRoom {
                    bytes,
                    reason: me.no_room_reason(bytes),
                })
            }
        })
        .await;
        result.unwrap_or_else(|e| {
            Err(NoRoom {
                bytes,
                reason: e.to_string(),
            })
        })
    }

    /// The common case, decided on the caller's thread: the blob fits
    /// without evicting anything (expired images are the sweep's). Else
    /// `None`, and eviction runs on a blocking thread.
    fn reserve_if_room(self: &Arc<Self>, digest: &Digest, bytes: u64) -> Option<Reservation> {
        let disk = self.local.disk();
        let mut st = self.lock();
        let at = Moment {
            now: SystemTime::now(),
            need: bytes + st.reserved.values().sum::<u64>(),
            disk,
            filling: &HashSet::new(),
        };
        if !st.ready || policy::pressure(&st.index, 0, &self.policy, &at) {
            return None;
        }
        st.reserved.insert(digest.clone(), bytes);
        Some(Reservation {
            owner: Some((self.clone(), digest.clone())),
        })
    }

    fn no_room_reason(&self, bytes: u64) -> String {
        match self.policy.max_size {
            Some(max) if bytes > max => {
                format!("larger than REGCACHE_MAX_SIZE ({})", policy::size(max))
            }
            _ => "the budget or the disk is taken by pulls in progress".into(),
        }
    }

    /// The disk was found full writing a fill: frees at least `bytes` by
    /// evicting the least recently used (blocking). True if anything went.
    pub fn relieve(&self, bytes: u64) -> bool {
        self.stats.disk_full.fetch_add(1, Ordering::Relaxed);
        let stored = self.lock().index.bytes();
        let emergency = Policy {
            max_size: Some(stored.saturating_sub(bytes)),
            ..Policy::default()
        };
        let (c, _) = self.collect_now(0, &emergency, false, Some(Reason::Disk));
        !c.evicted.is_empty()
    }

    /// What a sweep would remove now, removing nothing (blocking).
    pub fn dry_run(&self) -> Report {
        self.collect_now(0, &self.policy, true, None).1
    }

    /// One collection for `need` more bytes under `policy`; what it evicts
    /// is counted under `as_reason` when given.
    fn collect_now(
        &self,
        need: u64,
        policy: &Policy,
        dry_run: bool,
        as_reason: Option<Reason>,
    ) -> (Collected, Report) {
        // The disk must hold what is about to be written, floor or not.
        let disk = if policy.min_free.is_some() || need > 0 {
            self.local.disk()
        } else {
            None
        };
        let mut st = self.lock();
        if !st.ready && !dry_run {
            // Not knowing what is stored, nothing is evicted; the sweep
            // after the scan catches up.
            return (
                Collected {
                    evicted: Vec::new(),
                    fits: true,
                },
                Report::default(),
            );
        }
        let filling: HashSet<Digest> = st.reserved.keys().cloned().collect();
        let need = need + st.reserved.values().sum::<u64>();
        let at = Moment {
            now: SystemTime::now(),
            need,
            disk,
            filling: &filling,
        };
        let mut scratch;
        let index = if dry_run {
            scratch = st.index.clone();
            &mut scratch
        } else {
            &mut st.index
        };
        let mut report = Report::default();
        let local = &self.local;
        let collected = policy::collect(index, policy, &at, |index, unit| {
            let times = unit_times(local, unit);
            if index.refresh(&times) {
                return Verdict::Kept; // used since we last heard: not the LRU
            }
            let (keys, freed) = index.evict(unit);
            let tags = keys
                .iter()
                .filter_map(|k| match k {
                    Key::Tag(n, t) => Some(format!("{n}:{t}")),
                    _ => None,
                })
                .collect();
            if !dry_run {
                for key in &keys {
                    if let Err(e) = local.remove_now(key) {
                        tracing::warn!(?key, error = %e, "could not evict");
                    }
                }
            }
            report.removed.push(Removed {
                what: root_name(&unit.root),
                reason: Reason::Size, // set below from the collection
                bytes: freed,
                tags,
            });
            Verdict::Evicted(freed)
        });
        for (r, (why, _)) in report.removed.iter_mut().zip(&collected.evicted) {
            r.reason = as_reason.unwrap_or(*why);
        }
        report.freed_bytes = collected.evicted.iter().map(|(_, b)| b).sum();
        report.stored_bytes = index.bytes();
        drop(st);
        if !dry_run {
            for (why, bytes) in &collected.evicted {
                let why = as_reason.unwrap_or(*why);
                let i = Reason::ALL.iter().position(|r| *r == why).unwrap_or(0);
                self.stats.evicted[i].fetch_add(1, Ordering::Relaxed);
                self.stats.freed[i].fetch_add(*bytes, Ordering::Relaxed);
            }
            if !report.removed.is_empty() {
                tracing::info!(
                    removed = report.removed.len(),
                    freed = %policy::size(report.freed_bytes),
                    stored = %policy::size(report.stored_bytes),
                    "cache policy: evicted"
                );
            }
        }
        (collected, report)
    }

    pub fn stats(&self) -> PolicyStats {
        let s = &self.stats;
        PolicyStats {
            evicted: Reason::ALL
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    (
                        *r,
                        s.evicted[i].load(Ordering::Relaxed),
                        s.freed[i].load(Ordering::Relaxed),
                    )
                })
                .collect(),
            refused: s.refused.load(Ordering::Relaxed),
            disk_full: s.disk_full.load(Ordering::Relaxed),
            max_size: self.policy.max_size,
            ready: self.lock().ready,
            scan_seconds: s.scan_millis.load(Ordering::Relaxed) as f64 / 1000.0,
        }
    }

    /// Bytes each of `manifests` holds with everything it refers to that is
    /// stored (for sizes per repository; shared blobs count in each).
    pub fn sizes(&self, manifests: &[Digest]) -> u64 {
        let st = self.lock();
        let ix = &st.index;
        let mut seen = HashSet::new();
        let mut total = 0;
        let mut todo: Vec<Digest> = manifests.to_vec();
        while let Some(d) = todo.pop() {
            if !seen.insert(d.clone()) {
                continue;
            }
            if let Some(m) = ix.manifest(&d) {
                total += m.size;
                for b in &m.blobs {
                    if seen.insert(b.clone()) {
                        total += ix.blob(b).map_or(0, |e| e.size);
                    }
                }
                todo.extend(m.children.iter().cloned());
            }
        }
        total
    }

    /// Is blob `d` stored locally, as far as the index knows? (It learns a
    /// commit before the commit's caller hears of it.)
    pub fn has_blob(&self, d: &Digest) -> bool {
        self.lock().index.blob(d).is_some()
    }

    /// Bytes stored in the local tier, as the index knows them.
    pub fn stored_bytes(&self) -> u64 {
        self.lock().index.bytes()
    }

    /// The latest use of any of `manifests` (for "last pulled").
    pub fn last_used(&self, manifests: &[Digest]) -> Option<SystemTime> {
        let st = self.lock();
        manifests
            .iter()
            .filter_map(|d| st.index.manifest(d).map(|m| m.used))
            .max()
    }

    /// Is manifest `d` stored, as far as the index knows (before it is
    /// built: taken to be)?
    pub fn has_manifest(&self, d: &Digest) -> bool {
        let st = self.lock();
        !st.ready || st.index.manifest(d).is_some()
    }

    /// Records a use of `key` now, in memory (the disk hears of it through
    /// [`Store::touch`], at most once per interval).
    pub fn used(&self, key: &Key) {
        self.learn(|ix| ix.used(key, SystemTime::now()));
    }

    /// Records in the index what a read found that it did not know (written
    /// by another tier, or before the scan).
    fn learn(&self, f: impl FnOnce(&mut Index)) {
        let mut st = self.lock();
        f(&mut st.index);
    }
}

/// Current use times of what a unit's use is made of (its manifests; a
/// loose blob itself), as the disk has them.
fn unit_times(local: &FsStore, unit: &Unit) -> Vec<(Key, SystemTime)> {
    let keys: Vec<Key> = match &unit.root {
        Key::Blob(d) => vec![Key::Blob(d.clone())],
        _ => unit
            .manifests
            .iter()
            .map(|d| Key::Manifest(d.clone()))
            .collect(),
    };
    keys.into_iter()
        .filter_map(|k| local.mtime(&k).map(|t| (k, t)))
        .collect()
}

fn root_name(k: &Key) -> String {
    match k {
        Key::Manifest(d) => format!("manifest {d}"),
        Key::Blob(d) => format!("blob {d}"),
        Key::Tag(n, t) => format!("tag {n}:{t}"),
    }
}

#[async_trait]
impl Store for Managed {
    fn describe(&self) -> String {
        self.inner.describe()
    }

    fn health(&self) -> Health {
        self.inner.health()
    }

    async fn blob_size(&self, digest: &Digest) -> Result<Option<u64>> {
        self.inner.blob_size(digest).await
    }

    async fn blob_open(&self, digest: &Digest) -> Result<Option<BlobReader>> {
        let found = self.inner.blob_open(digest).await?;
        if let Some(r) = &found {
            let size = r.size;
            self.learn(|ix| {
                if ix.blob(digest).is_none() {
                    ix.add_blob(digest.clone(), size, SystemTime::now());
                }
            });
        }
        Ok(found)
    }

    async fn blob_source(&self, digest: &Digest) -> Result<Option<BlobReader>> {
        self.inner.blob_source(digest).await
    }

    async fn blob_commit(&self, blob: Verified) -> Result<()> {
        let (d, size) = (blob.digest().clone(), blob.size());
        self.inner.blob_commit(blob).await?;
        self.learn(|ix| ix.add_blob(d, size, SystemTime::now()));
        Ok(())
    }

    async fn manifest_get(&self, digest: &Digest) -> Result<Option<Manifest>> {
        let found = self.inner.manifest_get(digest).await?;
        if let Some(m) = &found {
            self.learn(|ix| {
                if ix.manifest(digest).is_none() {
                    let size = manifest_file_size(m);
                    ix.add_manifest(
                        digest.clone(),
                        ManifestEntry::of(m, size, SystemTime::now()),
                    );
                }
            });
        }
        Ok(found)
    }

    async fn manifest_put(&self, m: &Manifest) -> Result<()> {
        self.inner.manifest_put(m).await?;
        let entry = ManifestEntry::of(m, manifest_file_size(m), SystemTime::now());
        self.learn(|ix| ix.add_manifest(m.digest.clone(), entry));
        Ok(())
    }

    async fn tag_get(&self, name: &Name, tag: &Tag) -> Result<Option<TagRecord>> {
        let found = self.inner.tag_get(name, tag).await?;
        if let Some(rec) = &found {
            self.learn(|ix| {
                if !ix.has_tag(name, tag) {
                    ix.set_tag(name.clone(), tag.clone(), rec.digest.clone());
                }
            });
        }
        Ok(found)
    }

    async fn tag_put(&self, name: &Name, tag: &Tag, record: &TagRecord) -> Result<()> {
        self.inner.tag_put(name, tag, record).await?;
        self.learn(|ix| ix.set_tag(name.clone(), tag.clone(), record.digest.clone()));
        Ok(())
    }

    async fn link(&self, name: &Name, key: &Key) -> Result<()> {
        self.inner.link(name, key).await
    }

    async fn linked(&self, name: &Name, key: &Key) -> Result<bool> {
        self.inner.linked(name, key).await
    }

    async fn repositories(&self) -> Result<std::collections::BTreeMap<Name, Repository>> {
        self.inner.repositories().await
    }

    async fn tags(&self, name: &Name) -> Result<Vec<Tag>> {
        self.inner.tags(name).await
    }

    async fn delete(&self, key: &Key) -> Result<()> {
        self.inner.delete(key).await?;
        let mut st = self.lock();
        st.index.remove(key);
        if !st.ready {
            st.gone.insert(key.clone());
        }
        Ok(())
    }

    async fn touch(&self, key: &Key, at: SystemTime) -> Result<()> {
        self.learn(|ix| ix.used(key, at));
        self.inner.touch(key, at).await
    }

    async fn last_used(&self, key: &Key) -> Result<Option<SystemTime>> {
        self.inner.last_used(key).await
    }

    /// The local tier's usage, from the index (until it is built, only
    /// what was stored since start: counting is the index's scan, not a
    /// second one).
    async fn usage(&self) -> Result<Usage> {
        let st = self.lock();
        Ok(Usage {
            bytes: st.index.bytes(),
            blobs: st.index.blob_count(),
            manifests: st.index.manifest_count(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    async fn commit(m: &Managed, local: &FsStore, data: &[u8]) -> Digest {
        let spool = local.spools().unwrap().create().unwrap();
        (&**spool.file()).write_all(data).unwrap();
        let d = Digest::of(regcache_protocol::Algorithm::Sha256, data);
        let v = spool.verify(&d, d.clone()).unwrap();
        m.blob_commit(v).await.unwrap();
        d
    }

    fn managed(dir: &std::path::Path, policy: Policy) -> (Arc<Managed>, FsStore) {
        let local = FsStore::open(dir).unwrap();
        (
            Managed::new(Arc::new(local.clone()), local.clone(), policy),
            local,
        )
    }

    #[tokio::test]
    async fn contract() {
        crate::contract::run(|dir| {
            let (m, local) = managed(dir, Policy::default());
            m.build_index();
            crate::contract::Subject {
                spools: local.spools().unwrap().clone(),
                store: m,
            }
        })
        .await;
    }

    #[tokio::test]
    async fn room_is_made_by_evicting_the_least_recently_used_and_refused_beyond_the_budget() {
        let dir = tempfile::tempdir().unwrap();
        let policy = Policy {
            max_size: Some(100),
            ..Policy::default()
        };
        let (m, local) = managed(dir.path(), policy);
        m.build_index();
        let old = commit(&m, &local, &[1; 40]).await;
        let past = SystemTime::now() - Duration::from_secs(3600);
        m.touch(&Key::Blob(old.clone()), past).await.unwrap();
        let new = commit(&m, &local, &[2; 40]).await;
        let next: Digest = Digest::of(regcache_protocol::Algorithm::Sha256, b"next");
        let held = m
            .reserve(&next, 50)
            .await
            .expect("room after evicting the old blob");
        assert_eq!(
            local.blob_size(&old).await.unwrap(),
            None,
            "the LRU blob went"
        );
        assert!(local.blob_size(&new).await.unwrap().is_some());
        // 40 stored + 50 held: another 50 does not fit without evicting `new`,
        // which is then the least recently used.
        let other = Digest::of(regcache_protocol::Algorithm::Sha256, b"other");
        assert!(
            m.reserve(&other, 200).await.is_err(),
            "bigger than the budget"
        );
        drop(held);
        let stats = m.stats();
        assert_eq!(stats.evicted[0], (Reason::Size, 1, 40));
        assert_eq!(stats.refused, 1);
        assert_eq!(m.usage().await.unwrap().bytes, 40);
    }

    #[tokio::test]
    async fn a_dry_run_removes_nothing_and_the_scan_finds_what_was_stored_before() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (m, local) = managed(dir.path(), Policy::default());
            commit(&m, &local, &[1; 30]).await;
            commit(&m, &local, &[2; 30]).await;
        }
        let policy = Policy {
            max_size: Some(40),
            ..Policy::default()
        };
        let (m, _) = managed(dir.path(), policy);
        m.build_index();
        assert_eq!(m.usage().await.unwrap().bytes, 60, "found by the scan");
        let report = m.dry_run();
        assert_eq!(report.removed.len(), 1);
        assert_eq!(report.freed_bytes, 30);
        assert_eq!(
            m.usage().await.unwrap().bytes,
            60,
            "a dry run removes nothing"
        );
        let report = m.sweep();
        assert_eq!(report.stored_bytes, 30);
        assert_eq!(m.usage().await.unwrap().bytes, 30);
    }
}
