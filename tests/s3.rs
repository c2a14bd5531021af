//! regcache on S3 (a local disk tier in front of a bucket), end to end: a
//! real S3 server (moto), a real upstream (Debian's `docker-registry`),
//! skopeo pulling through regcache.
//!
//! Needs: skopeo, docker-registry, and moto in target/test-venv (scripts/test).

use regcache_testkit as support;

use std::time::Duration;

use support::netfault::{Mode, NetFault};
use support::s3::S3Server;
use support::*;

const BUCKET: &str = "regcache";

/// lhns's MinIO stack variables, for an S3 server at `endpoint`.
fn s3_env(endpoint: &str) -> Vec<(&'static str, String)> {
    vec![
        ("REGISTRY_STORAGE", "s3".into()),
        ("REGISTRY_STORAGE_REDIRECT_DISABLE", "true".into()),
        ("REGISTRY_STORAGE_S3_BUCKET", BUCKET.into()),
        ("REGISTRY_STORAGE_S3_REGION", "minio".into()),
        ("REGISTRY_STORAGE_S3_REGIONENDPOINT", endpoint.into()),
        ("REGISTRY_STORAGE_S3_ACCESSKEY", "minio".into()),
        ("REGISTRY_STORAGE_S3_SECRETKEY", "minio123".into()),
        ("REGCACHE_TAG_FRESHNESS", "10m".into()),
        ("REGCACHE_S3_TIMEOUT", "2s".into()),
    ]
}

fn start(config: &str, storage: &std::path::Path, env: &[(&'static str, String)]) -> Regcache {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Regcache::start_with_env(config, storage, &env)
}

/// Every object of the bucket is what its key says: blobs hash to their
/// name, manifests (after their media type line) too. (bad, total)
fn verify_bucket(s3: &S3Server) -> (Vec<String>, usize) {
    let mut bad = Vec::new();
    let objects = s3.objects(BUCKET, "");
    for (key, bytes) in &objects {
        let hex = key.rsplit('/').next().unwrap_or("");
        let content: &[u8] = if key.contains("/manifests/sha256/") {
            match bytes.iter().position(|b| *b == b'\n') {
                Some(nl) => &bytes[nl + 1..],
                None => {
                    bad.push(key.clone());
                    continue;
                }
            }
        } else if key.contains("/blobs/sha256/") {
            bytes
        } else {
            continue;
        };
        if digest_hex(&sha256_digest(content)) != hex {
            bad.push(key.clone());
        }
    }
    (bad, objects.len())
}

/// Waits up to `within` until the bucket holds every blob of `image` under
/// `prefix`.
fn wait_uploaded(s3: &S3Server, prefix: &str, image: &ImageParts, within: Duration) {
    let uploaded = wait_for(within, || {
        let keys: Vec<String> = s3
            .objects(BUCKET, prefix)
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        image
            .blob_digests()
            .iter()
            .all(|d| keys.iter().any(|k| k.ends_with(digest_hex(d))))
            .then_some(())
    });
    assert!(
        uploaded.is_some(),
        "the image's blobs never reached the bucket within {within:?}"
    );
}

/// Pulled once through regcache on S3; then, with the upstream stopped, the
/// same pulls served from the bucket alone: after the local tier is wiped,
/// and by a second regcache with an empty disk on the same bucket.
#[test]
fn pulls_are_served_from_the_bucket_once_cached() {
    let s3 = S3Server::start();
    s3.create_bucket(BUCKET);
    let mut up = Upstream::start();
    let img = seed_image(&up, "org/app", "1", &[700_000, 30_000]);
    let config = config_json(&[(&up.url(), &["upstream.test"])]);
    let env = s3_env(&s3.endpoint());
    let work = temp_dir("regcache-e2e-");
    let storage = temp_dir("regcache-storage-");
    let local = storage.path().join("one");
    let mut rc = start(&config, &local, &env);
    let reference = |rc: &Regcache| format!("{}/upstream.test/org/app:1", rc.addr());
    pull_and_check_image(&reference(&rc), &img.image, &work.path().join("cold"));
    let prefix = up.addr().replace(':', "_");
    wait_uploaded(&s3, &prefix, &img.image, Duration::from_secs(20));
    rc.stop();

    up.stop();
    std::fs::remove_dir_all(&local).unwrap();
    rc.restart();
    pull_and_check_image(&reference(&rc), &img.image, &work.path().join("wiped"));
    let m = http(rc.addr(), "GET", "/metrics", &[]).unwrap().text();
    assert!(
        m.lines()
            .any(|l| l.starts_with("regcache_fills_from_store_total") && !l.ends_with(" 0")),
        "no fill came from the bucket:\n{m}"
    );

    let other = start(&config, &storage.path().join("two"), &env);
    pull_and_check_image(&reference(&other), &img.image, &work.path().join("second"));
    let (bad, total) = verify_bucket(&s3);
    assert!(
        bad.is_empty(),
        "objects that are not what their key says: {bad:?}"
    );
    assert!(total > 0);
}

/// The bucket goes away in the middle of a run: pulls keep succeeding
/// (upstream and the local tier), /readyz stays ready and says the store is
/// degraded; once the bucket is back, the backfill uploads what it missed,
/// and every object in the bucket is intact.
#[test]
fn a_bucket_that_goes_away_costs_no_pull() {
    let s3 = S3Server::start();
    s3.create_bucket(BUCKET);
    let net = NetFault::start(s3.addr().parse().unwrap());
    let up = Upstream::start();
    let one = seed_image(&up, "org/one", "1", &[200_000]);
    let two = seed_image(&up, "org/two", "1", &[300_000]);
    let config = config_json(&[(&up.url(), &["upstream.test"])]);
    let storage = temp_dir("regcache-storage-");
    let rc = start(&config, &storage.path().join("s"), &s3_env(&net.url()));
    let work = temp_dir("regcache-e2e-");
    let cache = rc.addr().to_owned();
    pull_and_check_image(
        &format!("{cache}/upstream.test/org/one:1"),
        &one.image,
        &work.path().join("one"),
    );

    net.set(Mode::Refuse);
    pull_and_check_image(
        &format!("{cache}/upstream.test/org/two:1"),
        &two.image,
        &work.path().join("two"),
    );
    pull_and_check_image(
        &format!("{cache}/upstream.test/org/one:1"),
        &one.image,
        &work.path().join("one-again"),
    );
    let degraded = wait_for(Duration::from_secs(20), || {
        let r = http(&cache, "GET", "/readyz", &[]).ok()?;
        assert_eq!(
            r.status,
            200,
            "not ready with the bucket away: {}",
            r.describe()
        );
        r.text().contains("store degraded").then_some(())
    });
    assert!(
        degraded.is_some(),
        "/readyz never said the store is degraded"
    );
    let metrics = http(&cache, "GET", "/metrics", &[]).unwrap().text();
    assert!(
        metrics.contains("regcache_store_degraded{upstream="),
        "{metrics}"
    );

    net.set(Mode::Forward);
    let prefix = up.addr().replace(':', "_");
    wait_uploaded(&s3, &prefix, &two.image, Duration::from_secs(60));
    let (bad, total) = verify_bucket(&s3);
    println!(
        "bucket after the outage: {total} objects, {} not what their key says",
        bad.len()
    );
    assert!(bad.is_empty(), "corrupt objects: {bad:?}");
}

/// A bucket that does not exist: regcache starts and serves (local tier and
/// upstream), says once which bucket and why, and its worker does not
/// restart in a loop.
#[test]
fn a_missing_bucket_is_one_clear_line_not_a_crash_loop() {
    let s3 = S3Server::start();
    let up = Upstream::start();
    let img = seed_image(&up, "org/app", "1", &[50_000]);
    let storage = temp_dir("regcache-storage-");
    let mut env = s3_env(&s3.endpoint());
    env.retain(|(k, _)| *k != "REGISTRY_STORAGE_S3_BUCKET");
    env.push(("REGISTRY_STORAGE_S3_BUCKET", "no-such-bucket".into()));
    let rc = start(
        &config_json(&[(&up.url(), &["upstream.test"])]),
        &storage.path().join("s"),
        &env,
    );
    let work = temp_dir("regcache-e2e-");
    pull_and_check_image(
        &format!("{}/upstream.test/org/app:1", rc.addr()),
        &img.image,
        &work.path().join("a"),
    );
    let said = wait_for(Duration::from_secs(10), || {
        let log = rc.log_tail(400);
        (log.contains("shared store unusable") && log.contains("no-such-bucket")).then_some(log)
    });
    let log = said.unwrap_or_else(|| panic!("no word about the bucket:\n{}", rc.log_tail(40)));
    assert_eq!(
        log.matches("shared store unusable").count(),
        1,
        "said more than once:\n{log}"
    );
    let m = http(rc.addr(), "GET", "/metrics", &[]).unwrap().text();
    assert!(
        !m.lines()
            .any(|l| l.starts_with("regcache_worker_restarts_total") && !l.ends_with(" 0")),
        "{m}"
    );
}

/// With a size budget on S3, the budget is the local disk's: the local tier
/// stays within it while the bucket keeps everything, and an image evicted
/// locally pulls again from the bucket with the upstream stopped.
#[test]
fn the_budget_is_the_local_tiers_and_the_bucket_keeps_what_it_evicts() {
    let s3 = S3Server::start();
    s3.create_bucket(BUCKET);
    let mut up = Upstream::start();
    let first = seed_image(&up, "org/first", "1", &[600_000]);
    let second = seed_image(&up, "org/second", "1", &[600_000]);
    let config = config_json(&[(&up.url(), &["upstream.test"])]);
    let mut env = s3_env(&s3.endpoint());
    env.push(("REGCACHE_MAX_SIZE", "1000000".into()));
    let work = temp_dir("regcache-e2e-");
    let storage = temp_dir("regcache-storage-");
    let rc = start(&config, storage.path(), &env);
    let reference = |repo: &str| format!("{}/upstream.test/{repo}:1", rc.addr());
    let prefix = up.addr().replace(':', "_");
    pull_and_check_image(
        &reference("org/first"),
        &first.image,
        &work.path().join("1"),
    );
    wait_uploaded(&s3, &prefix, &first.image, Duration::from_secs(20));
    pull_and_check_image(
        &reference("org/second"),
        &second.image,
        &work.path().join("2"),
    );
    wait_uploaded(&s3, &prefix, &second.image, Duration::from_secs(20));
    let root = upstream_root(storage.path(), &up.addr());
    let local_layer = |img: &SeededImage| blob_file(&root, &img.image.layer_digests[0]).exists();
    assert!(
        !local_layer(&first),
        "the first image should have left the local tier"
    );
    assert!(local_layer(&second));

    up.stop();
    pull_and_check_image(
        &reference("org/first"),
        &first.image,
        &work.path().join("again"),
    );
    let (bad, _) = verify_bucket(&s3);
    assert!(bad.is_empty(), "{bad:?}");
}
