//! The cache against an in-process fake upstream that counts requests and
//! misbehaves on demand, over a real filesystem store.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::TryStreamExt;
use regcache_protocol::response::Outcome;
use regcache_protocol::{Digest, Name, Reference};
use regcache_store::FsStore;
use regcache_testkit::fake::{ms, FakeRegistry, Serve};
use regcache_testkit::{random_bytes, OCI_MANIFEST};

use super::{Blob, Cache};
use crate::metrics::Metrics;
use crate::upstream::Upstream;

/// A cache over a fresh store and a fake upstream (also for the server's tests).
pub(crate) struct Harness {
    pub fake: FakeRegistry,
    pub dir: tempfile::TempDir,
    pub cache: Arc<Cache>,
}

pub(crate) fn harness(tag_freshness: Duration) -> Harness {
    let fake = FakeRegistry::start();
    let dir = tempfile::tempdir().unwrap();
    let store = FsStore::open(dir.path()).unwrap();
    let spools = store.spools().unwrap().clone();
    let metrics = Arc::new(Metrics::new(&fake.addr()));
    let options = crate::config::UpstreamOptions::default();
    let upstream =
        Upstream::new(fake.url().parse().unwrap(), None, options, metrics.clone()).unwrap();
    let cache = Arc::new(Cache::new(
        Arc::new(store),
        spools,
        upstream,
        tag_freshness,
        metrics,
    ));
    Harness { fake, dir, cache }
}

fn name(s: &str) -> Name {
    s.parse().unwrap()
}

async fn read_all(blob: Blob) -> std::io::Result<Vec<u8>> {
    let chunks: Vec<Bytes> = blob.stream(0, None).try_collect().await?;
    Ok(chunks.concat())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_readers_share_one_fill_and_later_ones_hit() {
    let h = harness(Duration::from_secs(60));
    let data = random_bytes(1 << 20);
    let blob = h.fake.add_blob("org/img", &data);
    h.fake.set(&blob.path, Serve::ok().slow(64 << 10, ms(5)));
    let digest: Digest = blob.digest.parse().unwrap();
    let readers: Vec<_> = (0..8)
        .map(|_| {
            let (cache, d) = (h.cache.clone(), digest.clone());
            tokio::spawn(async move {
                let blob = cache.blob(&name("org/img"), &d).await.unwrap();
                read_all(blob).await.unwrap()
            })
        })
        .collect();
    for r in readers {
        assert!(r.await.unwrap() == data, "a reader got other bytes");
    }
    assert_eq!(
        h.fake.count("GET", &blob.path),
        1,
        "{}",
        h.fake.describe_requests()
    );
    // Verified bytes are a hit, whether the commit has finished or not.
    let again = h.cache.blob(&name("org/img"), &digest).await.unwrap();
    assert_eq!(again.outcome(), Outcome::Hit);
    assert_eq!(h.fake.count("GET", &blob.path), 1);
}

#[tokio::test]
async fn a_head_of_a_missing_blob_asks_upstream_without_fetching_it() {
    let h = harness(Duration::from_secs(60));
    let blob = h.fake.add_blob("org/img", &random_bytes(5000));
    let digest: Digest = blob.digest.parse().unwrap();
    let (size, outcome) = h.cache.blob_size(&name("org/img"), &digest).await.unwrap();
    assert_eq!((size, outcome), (Some(5000), Outcome::Miss));
    assert_eq!(h.fake.count("GET", &blob.path), 0);
    assert_eq!(h.fake.count("HEAD", &blob.path), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_fill_ends_its_reader_with_an_error_and_commits_nothing() {
    let h = harness(Duration::from_secs(60));
    let data = random_bytes(300_000);
    let blob = h.fake.add_blob("org/img", &data);
    h.fake.once(&blob.path, Serve::ok().corrupt_at(1000));
    let digest: Digest = blob.digest.parse().unwrap();
    let first = h.cache.blob(&name("org/img"), &digest).await.unwrap();
    let got = read_all(first).await;
    assert!(got.is_err(), "wrong bytes were presented as complete");
    h.cache.drain_fills().await;
    let committed = h
        .dir
        .path()
        .join("blobs/sha256")
        .join(&digest.hex()[..2])
        .join(digest.hex());
    assert!(!committed.exists(), "a corrupt blob was committed");
}

#[tokio::test]
async fn tags_are_answered_locally_while_fresh_and_revalidated_with_one_head_after() {
    let fresh = harness(Duration::from_secs(60));
    let digest = fresh.fake.add_manifest(
        "org/app",
        Some("1.0"),
        OCI_MANIFEST,
        br#"{"schemaVersion":2}"#,
    );
    let tag = Reference::Tag("1.0".parse().unwrap());
    let (m, outcome) = fresh.cache.manifest(&name("org/app"), &tag).await.unwrap();
    assert_eq!(
        (m.digest.to_string(), outcome),
        (digest.clone(), Outcome::Miss)
    );
    let before = fresh.fake.request_count();
    let (_, outcome) = fresh.cache.manifest(&name("org/app"), &tag).await.unwrap();
    assert_eq!(outcome, Outcome::Hit);
    assert_eq!(
        fresh.fake.request_count(),
        before,
        "{}",
        fresh.fake.describe_requests()
    );

    let stale = harness(Duration::ZERO);
    stale.fake.add_manifest(
        "org/app",
        Some("1.0"),
        OCI_MANIFEST,
        br#"{"schemaVersion":2}"#,
    );
    stale.cache.manifest(&name("org/app"), &tag).await.unwrap();
    let mark = stale.fake.request_count();
    let (_, outcome) = stale.cache.manifest(&name("org/app"), &tag).await.unwrap();
    assert_eq!(outcome, Outcome::Revalidated);
    let since = stale.fake.requests_since(mark);
    assert_eq!(
        since.len(),
        1,
        "{}",
        regcache_testkit::fake::describe(&since)
    );
    assert_eq!(since[0].method, "HEAD");
}

#[tokio::test]
async fn a_cached_tag_is_served_stale_when_upstream_fails() {
    let h = harness(Duration::ZERO);
    h.fake.add_manifest(
        "org/app",
        Some("1.0"),
        OCI_MANIFEST,
        br#"{"schemaVersion":2}"#,
    );
    let tag = Reference::Tag("1.0".parse().unwrap());
    h.cache.manifest(&name("org/app"), &tag).await.unwrap();
    h.fake.set("/v2/org/app/manifests/1.0", Serve::status(503));
    let (_, outcome) = h.cache.manifest(&name("org/app"), &tag).await.unwrap();
    assert_eq!(outcome, Outcome::Stale);
    // A tag never cached has nothing to fall back on.
    h.fake
        .add_manifest("org/app", Some("2.0"), OCI_MANIFEST, b"{}");
    h.fake.set("/v2/org/app/manifests/2.0", Serve::status(503));
    let two = Reference::Tag("2.0".parse().unwrap());
    assert!(h.cache.manifest(&name("org/app"), &two).await.is_err());
}

#[tokio::test]
async fn a_corrupt_stored_manifest_is_removed_and_fetched_again() {
    let h = harness(Duration::from_secs(60));
    let body = br#"{"schemaVersion":2,"x":1}"#;
    let digest: Digest = h
        .fake
        .add_manifest("org/app", None, OCI_MANIFEST, body)
        .parse()
        .unwrap();
    let by_digest = Reference::Digest(digest.clone());
    h.cache
        .manifest(&name("org/app"), &by_digest)
        .await
        .unwrap();
    let file = h
        .dir
        .path()
        .join("manifests/sha256")
        .join(&digest.hex()[..2])
        .join(digest.hex());
    std::fs::write(&file, format!("{OCI_MANIFEST}\n{{\"tampered\":1}}")).unwrap();
    let (m, outcome) = h
        .cache
        .manifest(&name("org/app"), &by_digest)
        .await
        .unwrap();
    assert_eq!((&m.bytes[..], outcome), (&body[..], Outcome::Miss));
    let path = format!("/v2/org/app/manifests/{digest}");
    assert_eq!(
        h.fake.count("GET", &path),
        2,
        "{}",
        h.fake.describe_requests()
    );
}
