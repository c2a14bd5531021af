//! The cache against an in-process fake upstream that counts requests and
//! misbehaves on demand, over a real filesystem store.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::TryStreamExt;
use regcache_protocol::response::Outcome;
use regcache_protocol::{Digest, Name, Reference};
use regcache_store::policy::Policy;
use regcache_store::{FsStore, Managed};
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
    harness_with(super::Options::uniform(tag_freshness), Policy::default())
}

/// A cache with these options and this store policy (its index built).
pub(crate) fn harness_with(options: super::Options, policy: Policy) -> Harness {
    let fake = FakeRegistry::start();
    let dir = tempfile::tempdir().unwrap();
    let store = FsStore::open(dir.path()).unwrap();
    let spools = store.spools().unwrap().clone();
    let metrics = Arc::new(Metrics::new(&fake.addr()));
    let up_options = crate::config::UpstreamOptions::default();
    let upstream = Upstream::new(
        fake.url().parse().unwrap(),
        None,
        up_options,
        metrics.clone(),
    )
    .unwrap();
    let managed = Managed::new(Arc::new(store.clone()), store, policy);
    managed.build_index();
    let cache = Arc::new(Cache::new(managed, spools, upstream, options, metrics));
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
    assert_eq!(again.outcome, Outcome::Hit);
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
    // Written as is, and in `block_in_place`.
    for size in [300_000, super::fill::INLINE_FILL as usize + 300_000] {
        let h = harness(Duration::from_secs(60));
        let data = random_bytes(size);
        let blob = h.fake.add_blob("org/img", &data);
        h.fake.once(&blob.path, Serve::ok().corrupt_at(1000));
        let digest: Digest = blob.digest.parse().unwrap();
        // The reader attaches mid-fill and fails, or (on a busy machine)
        // the fill has failed before it asks and the request fails.
        let presented = match h.cache.blob(&name("org/img"), &digest).await {
            Ok(first) => read_all(first).await.is_ok(),
            Err(_) => false,
        };
        assert!(!presented, "{size}: wrong bytes were presented as complete");
        h.cache.drain_fills().await;
        let committed = h
            .dir
            .path()
            .join("blobs/sha256")
            .join(&digest.hex()[..2])
            .join(digest.hex());
        assert!(!committed.exists(), "{size}: a corrupt blob was committed");
        // The next request fetches it again, whole.
        let again = h.cache.blob(&name("org/img"), &digest).await.unwrap();
        assert!(read_all(again).await.unwrap() == data, "{size}: refetch");
    }
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
async fn a_cold_tag_is_found_by_digest_at_once_and_stored_by_shutdown() {
    let h = harness(Duration::from_secs(60));
    let digest = h.fake.add_manifest(
        "org/app",
        Some("1.0"),
        OCI_MANIFEST,
        br#"{"schemaVersion":2}"#,
    );
    let tag = Reference::Tag("1.0".parse().unwrap());
    let (_, outcome) = h.cache.manifest(&name("org/app"), &tag).await.unwrap();
    assert_eq!(outcome, Outcome::Miss);
    let before = h.fake.request_count();
    let by_digest = Reference::Digest(digest.parse().unwrap());
    let (m, outcome) = h
        .cache
        .manifest(&name("org/app"), &by_digest)
        .await
        .unwrap();
    assert_eq!(
        (m.digest.to_string(), outcome),
        (digest.clone(), Outcome::Hit)
    );
    assert_eq!(
        h.fake.request_count(),
        before,
        "{}",
        h.fake.describe_requests()
    );

    h.cache.drain_fills().await;
    let stored = h.cache.store.manifest_get(&m.digest).await.unwrap();
    assert_eq!(stored, Some(m));
    let rec = h
        .cache
        .store
        .tag_get(&name("org/app"), &"1.0".parse().unwrap())
        .await
        .unwrap();
    assert_eq!(rec.map(|r| r.digest.to_string()), Some(digest));
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
    h.cache.drain_fills().await;
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

/// Content fetched for one repository is never served under another that
/// upstream refuses it, in flight or committed; under one upstream grants it,
/// one HEAD confirms it and the stored bytes are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_is_served_only_under_repositories_upstream_grants_it() {
    let h = harness(Duration::from_secs(60));
    let data = random_bytes(400_000);
    let a = h.fake.add_blob("org/a", &data);
    let granted = h.fake.add_blob("org/c", &data);
    let gate = regcache_testkit::fake::Gate::new();
    h.fake
        .once(&a.path, Serve::ok().only("GET").pause_at(100_000, &gate));
    let digest: Digest = a.digest.parse().unwrap();
    let filling = h.cache.blob(&name("org/a"), &digest).await.unwrap();
    assert!(gate.wait_reached(1, Duration::from_secs(10)));
    // org/b does not have it upstream: refused while A's fill runs...
    let during = h.cache.blob(&name("org/b"), &digest).await;
    assert!(
        matches!(&during, Err(e) if e.is_refusal()),
        "served under org/b during the fill"
    );
    gate.open();
    assert_eq!(read_all(filling).await.unwrap(), data);
    h.cache.drain_fills().await;
    // ...and once committed, by GET and by HEAD.
    assert!(h.cache.blob(&name("org/b"), &digest).await.is_err());
    assert!(h.cache.blob_size(&name("org/b"), &digest).await.is_err());
    // org/c has it upstream: one HEAD, then the stored bytes; then no asking.
    let c = h.cache.blob(&name("org/c"), &digest).await.unwrap();
    assert_eq!(c.outcome, Outcome::Revalidated);
    assert_eq!(read_all(c).await.unwrap(), data);
    assert_eq!(
        (
            h.fake.count("HEAD", &granted.path),
            h.fake.count("GET", &granted.path)
        ),
        (1, 0)
    );
    let again = h.cache.blob(&name("org/c"), &digest).await.unwrap();
    assert_eq!(again.outcome, Outcome::Hit);
    assert_eq!(
        h.fake.count("HEAD", &granted.path),
        1,
        "{}",
        h.fake.describe_requests()
    );
}

/// A fill for a repository upstream refuses does not fail another
/// repository's request for the same digest: that one gets its own fill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_fill_does_not_fail_another_repository() {
    let h = harness(Duration::from_secs(60));
    let data = random_bytes(200_000);
    let a = h.fake.add_blob("org/a", &data);
    let digest: Digest = a.digest.parse().unwrap();
    // org/b's GET is refused slowly; org/a asks meanwhile.
    let b_path = format!("/v2/org/b/blobs/{digest}");
    h.fake.add_raw(&b_path, 404, &[], b"{}".to_vec());
    h.fake
        .set(&b_path, Serve::status(404).only("GET").delay(ms(300)));
    let cache = h.cache.clone();
    let d = digest.clone();
    let b = tokio::spawn(async move { cache.blob(&name("org/b"), &d).await.map(|_| ()) });
    assert!(h
        .fake
        .wait_count("GET", &b_path, 1, Duration::from_secs(10)));
    let got = h.cache.blob(&name("org/a"), &digest).await.unwrap();
    assert_eq!(read_all(got).await.unwrap(), data);
    assert!(b.await.unwrap().is_err(), "org/b was served");
}

/// Blobs of a pulled image need no word with upstream: its manifest linked them.
#[tokio::test]
async fn a_manifest_fetched_for_a_repository_links_its_blobs() {
    let h = harness(Duration::from_secs(60));
    let image = h.fake.add_image("org/app", "1", &[10_000, 20_000]);
    h.cache
        .manifest(&name("org/app"), &Reference::Tag("1".parse().unwrap()))
        .await
        .unwrap();
    for d in image.blob_digests() {
        let digest: Digest = d.parse().unwrap();
        read_all(h.cache.blob(&name("org/app"), &digest).await.unwrap())
            .await
            .unwrap();
    }
    let mark = h.fake.request_count();
    // Another repository with the same image upstream: its manifest, and
    // then every blob from the store without a HEAD each.
    h.fake
        .add_manifest("org/copy", Some("1"), OCI_MANIFEST, &image.manifest);
    h.cache
        .manifest(&name("org/copy"), &Reference::Tag("1".parse().unwrap()))
        .await
        .unwrap();
    for d in image.blob_digests() {
        let digest: Digest = d.parse().unwrap();
        let b = h.cache.blob(&name("org/copy"), &digest).await.unwrap();
        assert_eq!(b.outcome, Outcome::Hit);
    }
    let since = h.fake.requests_since(mark);
    assert!(
        since.iter().all(|r| r.path.contains("/manifests/")),
        "{}",
        regcache_testkit::fake::describe(&since)
    );
}

fn budget(bytes: u64) -> Policy {
    Policy {
        max_size: Some(bytes),
        ..Policy::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_larger_than_the_budget_is_served_whole_and_stored_nowhere() {
    let h = harness_with(
        super::Options::uniform(Duration::from_secs(60)),
        budget(1000),
    );
    let data = random_bytes(5000);
    let blob = h.fake.add_blob("org/img", &data);
    let digest: Digest = blob.digest.parse().unwrap();
    for _ in 0..2 {
        let got = h.cache.blob(&name("org/img"), &digest).await.unwrap();
        assert_eq!(got.outcome, Outcome::Bypass);
        assert_eq!(got.size, Some(5000));
        assert!(read_all(got).await.unwrap() == data);
    }
    assert_eq!(h.cache.usage().await.unwrap().bytes, 0);
    // The first request's fill learnt there was no room; the second went
    // straight to upstream: one GET each, no more.
    assert_eq!(
        h.fake.count("GET", &blob.path),
        3,
        "{}",
        h.fake.describe_requests()
    );
    let ranged = h.cache.blob(&name("org/img"), &digest).await.unwrap();
    let chunks: Vec<Bytes> = ranged.stream(100, Some(200)).try_collect().await.unwrap();
    assert!(chunks.concat() == data[100..200]);
    assert_eq!(h.cache.managed().stats().refused, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fills_beyond_the_budget_evict_the_least_recently_used_image() {
    // Each image is a 2000-byte layer (a 3072-byte tar), a config and a
    // manifest: about 4.4 kB; two fit.
    let h = harness_with(
        super::Options::uniform(Duration::from_secs(60)),
        budget(10_000),
    );
    let mut images = Vec::new();
    for i in 0..3 {
        let img = h.fake.add_image(&format!("org/app{i}"), "1", &[2000]);
        let n = name(&format!("org/app{i}"));
        let tag = Reference::Tag("1".parse().unwrap());
        h.cache.manifest(&n, &tag).await.unwrap();
        for d in [&img.config_digest, &img.layer_digests[0]] {
            let blob = h.cache.blob(&n, &d.parse().unwrap()).await.unwrap();
            assert_ne!(blob.outcome, Outcome::Bypass);
            read_all(blob).await.unwrap();
            // Committed before the next one starts (the fill runs on).
            h.cache.drain_fills_for_tests().await;
        }
        assert!(h.cache.usage().await.unwrap().bytes <= 10_000);
        images.push((n, img));
    }
    let stats = h.cache.managed().stats();
    assert_eq!(stats.evicted[0].1, 1, "one image went: {stats:?}");
    let (first, img0) = &images[0];
    let stored = h
        .cache
        .store
        .blob_size(&img0.layer_digests[0].parse().unwrap())
        .await
        .unwrap();
    assert_eq!(stored, None, "the least recently used image went");
    assert!(h
        .cache
        .store
        .tag_get(first, &"1".parse().unwrap())
        .await
        .unwrap()
        .is_none());
    let (_, img2) = &images[2];
    let kept = h
        .cache
        .store
        .blob_size(&img2.layer_digests[0].parse().unwrap())
        .await
        .unwrap();
    assert!(kept.is_some());
}

#[tokio::test]
async fn tag_rules_revalidate_every_time_or_pass_through_storing_nothing() {
    let rules =
        crate::tag_rules::TagRules::parse("latest=0s;nightly-*=never", Duration::from_secs(60))
            .unwrap();
    let options = super::Options {
        tags: rules,
        cache_manifests: true,
        record_use: true,
        read_ahead: 0,
    };
    let h = harness_with(options, Policy::default());
    let img = h.fake.add_image("org/app", "latest", &[100]);
    h.fake
        .add_manifest("org/app", Some("nightly-1"), OCI_MANIFEST, &img.manifest);
    let n = name("org/app");
    let latest = Reference::Tag("latest".parse().unwrap());
    h.cache.manifest(&n, &latest).await.unwrap();
    for _ in 0..3 {
        let mark = h.fake.request_count();
        let (_, outcome) = h.cache.manifest(&n, &latest).await.unwrap();
        assert_eq!(outcome, Outcome::Revalidated);
        let since = h.fake.requests_since(mark);
        assert_eq!(
            since.len(),
            1,
            "{}",
            regcache_testkit::fake::describe(&since)
        );
        assert_eq!(since[0].method, "HEAD");
    }

    let h = harness_with(
        super::Options {
            tags: crate::tag_rules::TagRules::parse("nightly-*=never", Duration::from_secs(60))
                .unwrap(),
            cache_manifests: true,
            record_use: true,
            read_ahead: 0,
        },
        Policy::default(),
    );
    let img = h.fake.add_image("org/app", "nightly-1", &[100]);
    let nightly = Reference::Tag("nightly-1".parse().unwrap());
    for _ in 0..2 {
        let (m, outcome) = h.cache.manifest(&n, &nightly).await.unwrap();
        assert_eq!(
            (m.digest.to_string(), outcome),
            (img.manifest_digest.clone(), Outcome::Bypass)
        );
        let layer: Digest = img.layer_digests[0].parse().unwrap();
        let blob = h.cache.blob(&n, &layer).await.unwrap();
        assert_eq!(blob.outcome, Outcome::Bypass);
        read_all(blob).await.unwrap();
    }
    assert_eq!(h.fake.count("GET", "/v2/org/app/manifests/nightly-1"), 2);
    assert_eq!(
        h.cache.usage().await.unwrap(),
        Default::default(),
        "nothing stored"
    );
    assert!(h
        .cache
        .store
        .tag_get(&n, &"nightly-1".parse().unwrap())
        .await
        .unwrap()
        .is_none());
}

#[tokio::test]
async fn without_manifest_caching_manifests_pass_through_and_blobs_are_still_cached() {
    let options = super::Options {
        cache_manifests: false,
        ..super::Options::uniform(Duration::from_secs(60))
    };
    let h = harness_with(options, Policy::default());
    let img = h.fake.add_image("org/app", "1", &[100]);
    let n = name("org/app");
    let by_digest = Reference::Digest(img.manifest_digest.parse().unwrap());
    for r in [
        Reference::Tag("1".parse().unwrap()),
        by_digest.clone(),
        by_digest,
    ] {
        let (_, outcome) = h.cache.manifest(&n, &r).await.unwrap();
        assert_eq!(outcome, Outcome::Bypass);
    }
    assert_eq!(h.cache.usage().await.unwrap().manifests, 0);
    let config: Digest = img.config_digest.parse().unwrap();
    read_all(h.cache.blob(&n, &config).await.unwrap())
        .await
        .unwrap();
    h.cache.drain_fills_for_tests().await;
    assert_eq!(h.cache.usage().await.unwrap().blobs, 1);
}

/// A cache that fetches blobs up to `read_ahead` bytes ahead, and an image of
/// two small layers (below 10,000 bytes) and a big one.
fn read_ahead_harness(read_ahead: u64) -> (Harness, regcache_testkit::ImageParts) {
    let options = super::Options {
        read_ahead,
        ..super::Options::uniform(Duration::from_secs(60))
    };
    let h = harness_with(options, Policy::default());
    let img = h.fake.add_image("org/app", "1", &[3000, 50_000, 2000]);
    (h, img)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_manifest_fetches_its_small_blobs_before_they_are_asked_for() {
    let (h, img) = read_ahead_harness(10_000);
    let n = name("org/app");
    let path = |d: &str| format!("/v2/org/app/blobs/{d}");
    let layers = &img.layer_digests;
    let tag = Reference::Tag("1".parse().unwrap());
    assert_eq!(h.cache.manifest(&n, &tag).await.unwrap().1, Outcome::Miss);
    let small = [&img.config_digest, &layers[0], &layers[2]];
    for d in small {
        assert!(
            h.fake
                .wait_count("GET", &path(d), 1, Duration::from_secs(5)),
            "{d} was not fetched ahead: {}",
            h.fake.describe_requests()
        );
    }
    h.cache.drain_fills_for_tests().await;
    // The big layer waits for its own request.
    assert_eq!(h.fake.count("GET", &path(&layers[1])), 0);
    for d in small {
        let blob = h.cache.blob(&n, &d.parse().unwrap()).await.unwrap();
        assert_eq!(blob.outcome, Outcome::Hit, "{d}");
        let got = read_all(blob).await.unwrap();
        assert_eq!(regcache_testkit::sha256_digest(&got), *d);
        assert_eq!(h.fake.count("GET", &path(d)), 1, "{d} fetched twice");
    }
    assert_eq!(h.cache.metrics.read_ahead.get(), 3);
    // A warm manifest fetches nothing more.
    let mark = h.fake.request_count();
    assert_eq!(h.cache.manifest(&n, &tag).await.unwrap().1, Outcome::Hit);
    assert_eq!(h.fake.request_count(), mark);
}

#[tokio::test]
async fn read_ahead_off_fetches_only_what_is_asked() {
    let (h, img) = read_ahead_harness(0);
    let n = name("org/app");
    let tag = Reference::Tag("1".parse().unwrap());
    h.cache.manifest(&n, &tag).await.unwrap();
    let first: Digest = img.layer_digests[0].parse().unwrap();
    read_all(h.cache.blob(&n, &first).await.unwrap())
        .await
        .unwrap();
    h.cache.drain_fills().await;
    let blob_gets = h
        .fake
        .requests()
        .iter()
        .filter(|r| r.method == "GET" && r.path.contains("/blobs/"))
        .count();
    assert_eq!(blob_gets, 1, "{}", h.fake.describe_requests());
    assert_eq!(h.cache.metrics.read_ahead.get(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_index_fetches_the_child_for_this_machine_and_its_small_blobs() {
    let h = harness(Duration::from_secs(60));
    let (mine, other) = (
        h.fake.add_image("org/app", "mine", &[3000]),
        h.fake.add_image("org/app", "other", &[2500]),
    );
    let (os, arch) = regcache_protocol::manifest::host_platform();
    let other_arch = if arch == "amd64" { "arm64" } else { "amd64" };
    let entry = |img: &regcache_testkit::ImageParts, arch: &str| {
        serde_json::json!({
            "mediaType": OCI_MANIFEST,
            "digest": img.manifest_digest,
            "size": img.manifest.len(),
            "platform": {"os": os, "architecture": arch},
        })
    };
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": regcache_testkit::OCI_INDEX,
        "manifests": [entry(&other, other_arch), entry(&mine, &arch)],
    });
    h.fake.add_manifest(
        "org/app",
        Some("multi"),
        regcache_testkit::OCI_INDEX,
        index.to_string().as_bytes(),
    );
    let n = name("org/app");
    let tag = Reference::Tag("multi".parse().unwrap());
    assert_eq!(h.cache.manifest(&n, &tag).await.unwrap().1, Outcome::Miss);
    let manifest_path = |img: &regcache_testkit::ImageParts| {
        format!("/v2/org/app/manifests/{}", img.manifest_digest)
    };
    for path in std::iter::once(manifest_path(&mine)).chain(
        mine.blob_digests()
            .iter()
            .map(|d| format!("/v2/org/app/blobs/{d}")),
    ) {
        assert!(
            h.fake.wait_count("GET", &path, 1, Duration::from_secs(5)),
            "{path} was not fetched ahead: {}",
            h.fake.describe_requests()
        );
    }
    h.cache.drain_fills_for_tests().await;
    assert_eq!(h.fake.count("GET", &manifest_path(&other)), 0);
    // The client's own request for the child: a hit, nothing more upstream.
    let mark = h.fake.request_count();
    let child = Reference::Digest(mine.manifest_digest.parse().unwrap());
    let (m, outcome) = h.cache.manifest(&n, &child).await.unwrap();
    assert_eq!(
        (m.digest.to_string(), outcome),
        (mine.manifest_digest.clone(), Outcome::Hit)
    );
    assert_eq!(
        h.fake.request_count(),
        mark,
        "{}",
        h.fake.describe_requests()
    );
    assert_eq!(h.cache.metrics.read_ahead.get(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetches_ahead_leave_clients_most_of_the_upstream() {
    let h = harness(Duration::from_secs(60));
    let img = h.fake.add_image("org/app", "1", &[1000; 8]);
    let paths: Vec<String> = img
        .blob_digests()
        .iter()
        .map(|d| format!("/v2/org/app/blobs/{d}"))
        .collect();
    for p in &paths {
        h.fake.set(p, Serve::ok().delay(ms(800)));
    }
    let tag = Reference::Tag("1".parse().unwrap());
    h.cache.manifest(&name("org/app"), &tag).await.unwrap();
    tokio::time::sleep(ms(300)).await;
    let asked = |p: &String| h.fake.count("GET", p);
    assert_eq!(
        paths.iter().map(asked).sum::<usize>(),
        super::AHEAD_SLOTS,
        "{}",
        h.fake.describe_requests()
    );
    for p in &paths {
        assert!(
            h.fake.wait_count("GET", p, 1, Duration::from_secs(10)),
            "{p}"
        );
    }
    h.cache.drain_fills_for_tests().await;
    assert!(paths.iter().all(|p| asked(p) == 1));
}
