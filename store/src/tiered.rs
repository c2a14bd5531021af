//! A local disk tier in front of a shared one (S3): what one replica cached,
//! every replica on the bucket can serve, and the bucket being away is not
//! an outage.
//!
//! - Reads are local first. A blob only the shared tier has is not opened
//!   here: it is offered as a [`Store::blob_source`], so that the cache fills
//!   the local tier from it (one fetch, streamed to every waiting client) as
//!   it would from upstream. Manifests, tags and links missing locally are
//!   read from the shared tier and kept locally.
//! - Writes commit locally, then go to the shared tier off the caller's path.
//!   A write the shared tier refuses or cannot take is recorded in
//!   `<local root>/backfill/` (it survives restarts) and retried until it
//!   lands.
//! - Last use and usage are the local tier's (the size budget is the local
//!   disk's, enforced on [`TieredStore::local`]; the bucket's own lifecycle
//!   rules keep it in bounds). A delete removes a thing from both tiers (a
//!   corrupt entry must not come back from the other).
//! - While the shared tier fails, a breaker keeps it out of the request path:
//!   the local tier and upstream serve, and [`Store::health`] says degraded.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::breaker::{Admit, Breaker};
use crate::s3::S3Store;
use crate::{
    BlobReader, Digest, Error, FsStore, Health, Key, Manifest, Name, Repository, Result, Store,
    Tag, TagRecord, Usage, Verified,
};

/// How often pending writes are retried.
const BACKFILL_EVERY: Duration = Duration::from_secs(10);
/// How long a failing shared tier is left alone before it is tried again.
const SHARED_COOLDOWN: Duration = Duration::from_secs(5);

/// The local and the shared tier of one upstream's cache.
#[derive(Clone)]
pub struct TieredStore {
    inner: Arc<Inner>,
}

struct Inner {
    local: FsStore,
    shared: S3Store,
    backfill: PathBuf,
    breaker: Breaker,
    /// The last error of the shared tier, for health.
    last_error: Mutex<Option<String>>,
    errors: AtomicU64,
}

/// A write the shared tier has not taken yet.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
enum Pending {
    Blob {
        digest: String,
    },
    Manifest {
        digest: String,
    },
    Tag {
        name: String,
        tag: String,
    },
    Link {
        name: String,
        blob: Option<String>,
        manifest: Option<String>,
    },
}

impl TieredStore {
    /// `local` in front of `shared`; starts the backfill of what an earlier
    /// run could not write (needs a tokio runtime).
    pub fn new(local: FsStore, shared: S3Store, local_root: &Path) -> Result<TieredStore> {
        let backfill = local_root.join("backfill");
        std::fs::create_dir_all(&backfill).map_err(|source| Error::Io {
            op: "create",
            path: backfill.clone(),
            source,
        })?;
        let store = TieredStore {
            inner: Arc::new(Inner {
                local,
                shared,
                backfill,
                breaker: Breaker::new(3, SHARED_COOLDOWN, Duration::from_secs(30)),
                last_error: Mutex::new(None),
                errors: AtomicU64::new(0),
            }),
        };
        let s = store.clone();
        tokio::spawn(async move {
            match s.inner.shared.probe().await {
                Ok(()) => {
                    tracing::info!(store = %s.inner.shared.describe(), "shared store reachable")
                }
                // One clear line, then the local tier serves: no crash loop.
                Err(e) => {
                    tracing::error!(error = %e, "shared store unusable; serving from the local tier and upstream, retrying");
                    s.failed(&e);
                }
            }
            loop {
                s.backfill_once().await;
                tokio::time::sleep(BACKFILL_EVERY).await;
            }
        });
        Ok(store)
    }

    pub fn local(&self) -> &FsStore {
        &self.inner.local
    }

    fn shared(&self) -> Option<&S3Store> {
        match self.inner.breaker.admit() {
            Admit::Go => Some(&self.inner.shared),
            Admit::Refuse { .. } => None,
        }
    }

    fn failed(&self, e: &Error) {
        self.inner.errors.fetch_add(1, Ordering::Relaxed);
        *self.inner.last_error.lock().unwrap() = Some(e.to_string());
        self.inner.breaker.failure(&e.to_string());
    }

    fn worked(&self) {
        self.inner.breaker.success();
    }

    /// A shared-tier read: its answer, or `None` (logged) when it failed or
    /// is being left alone.
    async fn read<T>(&self, f: impl std::future::Future<Output = Result<Option<T>>>) -> Option<T> {
        match f.await {
            Ok(v) => {
                self.worked();
                v
            }
            Err(e) => {
                tracing::warn!(error = %e, "shared store read failed");
                self.failed(&e);
                None
            }
        }
    }

    /// Writes to the shared tier in the background; recorded for backfill
    /// when it cannot.
    fn write(&self, pending: Pending) {
        let s = self.clone();
        tokio::spawn(async move {
            if s.shared().is_none() || s.push(&pending).await.is_err() {
                s.record(&pending);
            }
        });
    }

    /// Sends one pending write from the local tier to the shared one.
    async fn push(&self, p: &Pending) -> Result<()> {
        let shared = &self.inner.shared;
        let local = &self.inner.local;
        let result = async {
            match p {
                Pending::Blob { digest } => {
                    let d: Digest = parse(digest)?;
                    let Some((file, size)) = local.blob_file(&d)? else {
                        return Ok(());
                    };
                    if shared.blob_size(&d).await?.is_some() {
                        return Ok(());
                    }
                    shared.upload_file(&shared.blob_path(&d), file, size).await
                }
                Pending::Manifest { digest } => match local.manifest_get(&parse(digest)?).await? {
                    Some(m) => shared.manifest_put(&m).await,
                    None => Ok(()),
                },
                Pending::Tag { name, tag } => {
                    let (n, t): (Name, Tag) = (parse(name)?, parse(tag)?);
                    let Some(rec) = local.tag_get(&n, &t).await? else {
                        return Ok(());
                    };
                    // Never overwrite a confirmation another replica made later.
                    match shared.tag_get(&n, &t).await? {
                        Some(theirs) if theirs.confirmed >= rec.confirmed => Ok(()),
                        _ => shared.tag_put(&n, &t, &rec).await,
                    }
                }
                Pending::Link {
                    name,
                    blob,
                    manifest,
                } => {
                    let n: Name = parse(name)?;
                    let key = match (blob, manifest) {
                        (Some(d), _) => Key::Blob(parse(d)?),
                        (_, Some(d)) => Key::Manifest(parse(d)?),
                        _ => return Ok(()),
                    };
                    shared.link(&n, &key).await
                }
            }
        }
        .await;
        match &result {
            Ok(()) => self.worked(),
            Err(e) => {
                tracing::debug!(error = %e, "shared store write failed; kept for backfill");
                self.failed(e);
            }
        }
        result
    }

    fn marker(&self, p: &Pending) -> PathBuf {
        let text = serde_json::to_string(p).expect("serialisable");
        let name = hex::encode(sha2_256(text.as_bytes()));
        self.inner.backfill.join(name)
    }

    fn record(&self, p: &Pending) {
        let path = self.marker(p);
        let text = serde_json::to_vec(p).expect("serialisable");
        if let Err(e) = std::fs::write(&path, text) {
            tracing::error!(path = %path.display(), error = %e, "could not record a pending shared-store write");
        }
    }

    /// Retries every pending write (none while the shared tier is away).
    pub async fn backfill_once(&self) {
        let Ok(entries) = std::fs::read_dir(&self.inner.backfill) else {
            return;
        };
        for e in entries.flatten() {
            if self.shared().is_none() {
                return;
            }
            let Some(p) = std::fs::read(e.path())
                .ok()
                .and_then(|b| serde_json::from_slice::<Pending>(&b).ok())
            else {
                let _ = std::fs::remove_file(e.path());
                continue;
            };
            if self.push(&p).await.is_ok() {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    /// Writes waiting for the shared tier.
    pub fn backfill_pending(&self) -> usize {
        std::fs::read_dir(&self.inner.backfill).map_or(0, |d| d.count())
    }
}

fn parse<T: std::str::FromStr>(s: &str) -> Result<T> {
    s.parse().map_err(|_| Error::Corrupt {
        what: "backfill entry".into(),
        reason: format!("{s:?} does not parse"),
    })
}

fn sha2_256(b: &[u8]) -> [u8; 32] {
    use sha2::Digest as _;
    sha2::Sha256::digest(b).into()
}

#[async_trait]
impl Store for TieredStore {
    fn describe(&self) -> String {
        format!(
            "{} (local tier {})",
            self.inner.shared.describe(),
            self.inner.local.describe()
        )
    }

    fn health(&self) -> Health {
        let away = self.inner.breaker.is_open();
        Health {
            degraded: away.then(|| {
                let last = self.inner.last_error.lock().unwrap().clone();
                format!("shared store away: {}", last.unwrap_or_default())
            }),
            remote_errors: self.inner.errors.load(Ordering::Relaxed),
            backfill: self.backfill_pending() as u64,
            remote: true,
        }
    }

    async fn blob_size(&self, digest: &Digest) -> Result<Option<u64>> {
        self.inner.local.blob_size(digest).await
    }

    async fn blob_open(&self, digest: &Digest) -> Result<Option<BlobReader>> {
        self.inner.local.blob_open(digest).await
    }

    async fn blob_source(&self, digest: &Digest) -> Result<Option<BlobReader>> {
        let Some(shared) = self.shared() else {
            return Ok(None);
        };
        Ok(self.read(shared.blob_open(digest)).await)
    }

    async fn blob_commit(&self, blob: Verified) -> Result<()> {
        let digest = blob.digest().to_string();
        self.inner.local.blob_commit(blob).await?;
        self.write(Pending::Blob { digest });
        Ok(())
    }

    async fn manifest_get(&self, digest: &Digest) -> Result<Option<Manifest>> {
        if let Some(m) = self.inner.local.manifest_get(digest).await? {
            return Ok(Some(m));
        }
        let Some(shared) = self.shared() else {
            return Ok(None);
        };
        let found = self.read(shared.manifest_get(digest)).await;
        if let Some(m) = &found {
            self.inner.local.manifest_put(m).await?;
        }
        Ok(found)
    }

    async fn manifest_put(&self, m: &Manifest) -> Result<()> {
        self.inner.local.manifest_put(m).await?;
        self.write(Pending::Manifest {
            digest: m.digest.to_string(),
        });
        Ok(())
    }

    async fn tag_get(&self, name: &Name, tag: &Tag) -> Result<Option<TagRecord>> {
        if let Some(rec) = self.inner.local.tag_get(name, tag).await? {
            return Ok(Some(rec));
        }
        let Some(shared) = self.shared() else {
            return Ok(None);
        };
        let found = self.read(shared.tag_get(name, tag)).await;
        if let Some(rec) = &found {
            self.inner.local.tag_put(name, tag, rec).await?;
        }
        Ok(found)
    }

    async fn tag_put(&self, name: &Name, tag: &Tag, record: &TagRecord) -> Result<()> {
        self.inner.local.tag_put(name, tag, record).await?;
        self.write(Pending::Tag {
            name: name.to_string(),
            tag: tag.to_string(),
        });
        Ok(())
    }

    async fn link(&self, name: &Name, key: &Key) -> Result<()> {
        if self.inner.local.linked(name, key).await? {
            return Ok(());
        }
        self.inner.local.link(name, key).await?;
        let (blob, manifest) = match key {
            Key::Blob(d) => (Some(d.to_string()), None),
            Key::Manifest(d) => (None, Some(d.to_string())),
            Key::Tag(..) => return Ok(()),
        };
        self.write(Pending::Link {
            name: name.to_string(),
            blob,
            manifest,
        });
        Ok(())
    }

    async fn linked(&self, name: &Name, key: &Key) -> Result<bool> {
        if self.inner.local.linked(name, key).await? {
            return Ok(true);
        }
        let Some(shared) = self.shared() else {
            return Ok(false);
        };
        let found = self
            .read(async { shared.linked(name, key).await.map(|l| l.then_some(())) })
            .await;
        if found.is_some() {
            self.inner.local.link(name, key).await?;
        }
        Ok(found.is_some())
    }

    async fn repositories(&self) -> Result<BTreeMap<Name, Repository>> {
        self.inner.local.repositories().await
    }

    async fn tags(&self, name: &Name) -> Result<Vec<Tag>> {
        let mut tags = self.inner.local.tags(name).await?;
        if let Some(shared) = self.shared() {
            if let Some(more) = self.read(async { shared.tags(name).await.map(Some) }).await {
                tags.extend(more);
                tags.sort();
                tags.dedup();
            }
        }
        Ok(tags)
    }

    async fn delete(&self, key: &Key) -> Result<()> {
        self.inner.local.delete(key).await?;
        match self.shared() {
            Some(shared) => shared.delete(key).await,
            None => Ok(()),
        }
    }

    async fn touch(&self, key: &Key, at: SystemTime) -> Result<()> {
        self.inner.local.touch(key, at).await
    }

    async fn last_used(&self, key: &Key) -> Result<Option<SystemTime>> {
        self.inner.local.last_used(key).await
    }

    async fn usage(&self) -> Result<Usage> {
        self.inner.local.usage().await
    }
}
