//! Manifests and tag records stored after the client has its answer.
//!
//! Each is a durable write (a write, an fsync, a rename, an fsync of the
//! directory): two of them cost a cold tag about as long as the upstream
//! GET itself. They are held here, answered from memory, and written in
//! order by one task, so a tag record is never durable before the manifest
//! it names. A crash loses what was held (it is fetched again), never more.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use regcache_protocol::{Digest, Manifest, Name, Tag};
use regcache_store::{Store, TagRecord};
use tokio::sync::mpsc;
use tokio_util::task::task_tracker::TaskTrackerToken;
use tokio_util::task::TaskTracker;

/// Writes queued before a caller waits for room (each holds one manifest).
const QUEUE: usize = 64;

enum Job {
    Manifest(Manifest),
    Tag(Name, Tag, TagRecord),
}

#[derive(Default)]
struct Held {
    manifests: HashMap<Digest, Manifest>,
    tags: HashMap<(Name, Tag), TagRecord>,
}

pub(super) struct WriteBehind {
    store: Arc<dyn Store>,
    held: Arc<Mutex<Held>>,
    /// Started on first use, inside the runtime.
    queue: OnceLock<mpsc::Sender<(Job, TaskTrackerToken)>>,
    /// Every queued write holds a token, so that shutdown can wait for them.
    tracker: TaskTracker,
}

impl WriteBehind {
    pub(super) fn new(store: Arc<dyn Store>) -> Self {
        WriteBehind {
            store,
            held: Arc::default(),
            queue: OnceLock::new(),
            tracker: TaskTracker::new(),
        }
    }

    /// A manifest answered but not yet written.
    pub(super) fn manifest(&self, digest: &Digest) -> Option<Manifest> {
        self.held.lock().unwrap().manifests.get(digest).cloned()
    }

    /// A tag record not yet written.
    pub(super) fn tag(&self, name: &Name, tag: &Tag) -> Option<TagRecord> {
        let key = (name.clone(), tag.clone());
        self.held.lock().unwrap().tags.get(&key).cloned()
    }

    /// The tags of `name` not yet written.
    pub(super) fn tags_of(&self, name: &Name) -> Vec<Tag> {
        let held = self.held.lock().unwrap();
        held.tags
            .keys()
            .filter(|(n, _)| n == name)
            .map(|(_, t)| t.clone())
            .collect()
    }

    /// Holds `m` until it is stored.
    pub(super) async fn manifest_put(&self, m: &Manifest) {
        let held = self
            .held
            .lock()
            .unwrap()
            .manifests
            .insert(m.digest.clone(), m.clone());
        if held.is_none() {
            self.enqueue(Job::Manifest(m.clone())).await;
        }
    }

    /// Holds `record` until it is stored (after every manifest put before).
    pub(super) async fn tag_put(&self, name: &Name, tag: &Tag, record: TagRecord) {
        let key = (name.clone(), tag.clone());
        self.held.lock().unwrap().tags.insert(key, record.clone());
        self.enqueue(Job::Tag(name.clone(), tag.clone(), record))
            .await;
    }

    /// Waits until everything held so far is written (or has failed).
    pub(super) async fn drain(&self) {
        self.tracker.close();
        self.tracker.wait().await;
    }

    async fn enqueue(&self, job: Job) {
        let token = self.tracker.token();
        let queue = self.queue.get_or_init(|| {
            let (tx, rx) = mpsc::channel(QUEUE);
            tokio::spawn(write(self.store.clone(), self.held.clone(), rx));
            tx
        });
        // The writer lives as long as the queue's sender, which is ours.
        let _ = queue.send((job, token)).await;
    }
}

/// The one writer: jobs in the order they were queued.
async fn write(
    store: Arc<dyn Store>,
    held: Arc<Mutex<Held>>,
    mut rx: mpsc::Receiver<(Job, TaskTrackerToken)>,
) {
    while let Some((job, _token)) = rx.recv().await {
        match job {
            Job::Manifest(m) => {
                if let Err(e) = store.manifest_put(&m).await {
                    tracing::error!(digest = %m.digest, error = %e, "could not store manifest");
                }
                held.lock().unwrap().manifests.remove(&m.digest);
            }
            Job::Tag(name, tag, record) => {
                if let Err(e) = store.tag_put(&name, &tag, &record).await {
                    tracing::error!(%name, %tag, error = %e, "could not record tag");
                }
                let key = (name, tag);
                let mut held = held.lock().unwrap();
                // A newer record, queued behind this one, stays held.
                if held.tags.get(&key) == Some(&record) {
                    held.tags.remove(&key);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use regcache_store::FsStore;

    use super::*;

    fn manifest(text: &str) -> Manifest {
        let bytes = bytes::Bytes::from(text.to_owned());
        Manifest {
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            digest: Digest::of(regcache_protocol::Algorithm::Sha256, &bytes),
            bytes,
        }
    }

    fn record(m: &Manifest, secs: u64) -> TagRecord {
        TagRecord {
            digest: m.digest.clone(),
            confirmed: UNIX_EPOCH + Duration::from_secs(secs),
        }
    }

    // A current-thread runtime: the writer runs only when the test waits,
    // so what is held before that is seen deterministically.
    #[tokio::test]
    async fn held_until_written_then_stored_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::open(dir.path()).unwrap();
        let behind = WriteBehind::new(Arc::new(store.clone()));
        let (name, tag): (Name, Tag) = ("org/img".parse().unwrap(), "1".parse().unwrap());
        let (old, new) = (manifest("{\"a\":1}"), manifest("{\"b\":2}"));
        behind.manifest_put(&old).await;
        behind.tag_put(&name, &tag, record(&old, 10)).await;
        behind.manifest_put(&new).await;
        behind.tag_put(&name, &tag, record(&new, 20)).await;

        assert_eq!(behind.manifest(&old.digest), Some(old.clone()));
        assert_eq!(behind.tag(&name, &tag), Some(record(&new, 20)));
        assert!(store.manifest_get(&old.digest).await.unwrap().is_none());
        assert!(store.tag_get(&name, &tag).await.unwrap().is_none());

        behind.drain().await;
        assert_eq!(behind.manifest(&old.digest), None);
        assert_eq!(behind.tag(&name, &tag), None);
        assert_eq!(store.manifest_get(&old.digest).await.unwrap(), Some(old));
        assert_eq!(
            store.manifest_get(&new.digest).await.unwrap(),
            Some(new.clone())
        );
        // The later record is the one that stays.
        assert_eq!(
            store.tag_get(&name, &tag).await.unwrap(),
            Some(record(&new, 20))
        );
    }

    #[tokio::test]
    async fn a_failed_write_is_not_held_forever() {
        let dir = tempfile::tempdir().unwrap();
        FsStore::open(dir.path()).unwrap();
        let behind = WriteBehind::new(Arc::new(FsStore::view(dir.path())));
        let m = manifest("{}");
        behind.manifest_put(&m).await;
        assert!(behind.manifest(&m.digest).is_some());
        behind.drain().await;
        assert!(behind.manifest(&m.digest).is_none());
    }
}
