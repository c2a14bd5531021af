//! The tiered store (local disk in front of S3) against a real S3 server:
//! the contract, a second replica seeing what the first cached, and writes
//! made while the bucket was away arriving once it is back.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use regcache_protocol::{Algorithm, Digest, Manifest};
use regcache_store::contract::{self, Subject};
use regcache_store::s3::{S3Config, S3Store};
use regcache_store::{FsStore, Key, Store, TagRecord, TieredStore};
use regcache_testkit::netfault::{Mode, NetFault};
use regcache_testkit::s3::S3Server;

fn config(endpoint: String, prefix: &str) -> S3Config {
    S3Config {
        bucket: "tiered".into(),
        region: "us-east-1".into(),
        endpoint: Some(endpoint),
        access_key: Some("test".into()),
        secret_key: Some("test".into()),
        prefix: prefix.into(),
        path_style: true,
        skip_verify: false,
        chunk_size: 5 << 20,
        timeout: Duration::from_secs(3),
    }
}

fn tiered(local: &std::path::Path, endpoint: String, prefix: &str) -> TieredStore {
    let fs = FsStore::open(local).unwrap();
    TieredStore::new(fs, S3Store::new(config(endpoint, prefix)).unwrap(), local).unwrap()
}

/// Waits until `f` holds (the shared tier is written in the background).
async fn eventually(what: &str, mut f: impl AsyncFnMut() -> bool) {
    for _ in 0..200 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what}: not within 20 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contract() {
    let server = S3Server::start();
    server.create_bucket("tiered");
    let endpoint = server.endpoint();
    contract::run(move |dir| {
        let prefix = format!("c/{}", dir.file_name().unwrap().to_string_lossy());
        let store = tiered(&dir.join("local"), endpoint.clone(), &prefix);
        Subject {
            spools: store.local().spools().unwrap().clone(),
            store: Arc::new(store),
        }
    })
    .await;
}

fn manifest() -> Manifest {
    let bytes = Bytes::from_static(br#"{"schemaVersion":2,"layers":[]}"#);
    Manifest {
        media_type: "application/vnd.oci.image.manifest.v1+json".into(),
        digest: Digest::of(Algorithm::Sha256, &bytes),
        bytes,
    }
}

async fn commit(store: &TieredStore, data: &[u8]) -> Digest {
    let spool = store.local().spools().unwrap().create().unwrap();
    (&**spool.file()).write_all(data).unwrap();
    let d = Digest::of(Algorithm::Sha256, data);
    store
        .blob_commit(spool.verify(&d, d.clone()).unwrap())
        .await
        .unwrap();
    d
}

/// What one replica caches, another with an empty disk finds in the bucket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_replica_sees_what_the_first_cached() {
    let server = S3Server::start();
    server.create_bucket("tiered");
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = tiered(a_dir.path(), server.endpoint(), "hub");
    let data = vec![42u8; 6 << 20];
    let d = commit(&a, &data).await;
    let m = manifest();
    let (name, tag) = ("org/app".parse().unwrap(), "1".parse().unwrap());
    a.manifest_put(&m).await.unwrap();
    // Confirmation times are kept to the millisecond.
    let now = SystemTime::UNIX_EPOCH
        + Duration::from_millis(
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_millis() as u64,
        );
    let rec = TagRecord {
        digest: m.digest.clone(),
        confirmed: now,
    };
    a.tag_put(&name, &tag, &rec).await.unwrap();
    a.link(&name, &Key::Blob(d.clone())).await.unwrap();
    let shared = S3Store::new(config(server.endpoint(), "hub")).unwrap();
    eventually("the blob in the bucket", async || {
        shared.blob_size(&d).await.unwrap() == Some(data.len() as u64)
    })
    .await;
    eventually("the link in the bucket", async || {
        shared.linked(&name, &Key::Blob(d.clone())).await.unwrap()
    })
    .await;
    eventually("the tag in the bucket", async || {
        shared.tag_get(&name, &tag).await.unwrap().is_some()
    })
    .await;

    let b = tiered(b_dir.path(), server.endpoint(), "hub");
    assert!(
        b.blob_open(&d).await.unwrap().is_none(),
        "the local tier is empty"
    );
    let source = b
        .blob_source(&d)
        .await
        .unwrap()
        .expect("offered from the bucket");
    assert_eq!(source.size, data.len() as u64);
    assert_eq!(b.manifest_get(&m.digest).await.unwrap(), Some(m.clone()));
    assert_eq!(b.tag_get(&name, &tag).await.unwrap(), Some(rec));
    assert!(b.linked(&name, &Key::Blob(d)).await.unwrap());
    // Kept locally once read.
    assert_eq!(b.local().manifest_get(&m.digest).await.unwrap(), Some(m));
}

/// With the bucket away, writes land locally and wait; once it is back, the
/// backfill delivers them, and reads never failed meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_made_while_the_bucket_is_away_arrive_later() {
    let server = S3Server::start();
    server.create_bucket("tiered");
    let net = NetFault::start(server.addr().parse().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let store = tiered(dir.path(), net.url(), "away");
    net.set(Mode::Refuse);
    let d = commit(&store, b"made while away").await;
    let m = manifest();
    store.manifest_put(&m).await.unwrap();
    eventually("pending writes", async || store.backfill_pending() >= 2).await;
    assert!(store.health().degraded.is_some() || store.health().remote_errors > 0);
    // Reads are local, and never fail for the bucket.
    assert!(store.blob_open(&d).await.unwrap().is_some());
    assert_eq!(
        store.manifest_get(&m.digest).await.unwrap(),
        Some(m.clone())
    );
    assert!(store
        .blob_source(&Digest::of(Algorithm::Sha256, b"x"))
        .await
        .unwrap()
        .is_none());

    net.set(Mode::Forward);
    let shared = S3Store::new(config(server.endpoint(), "away")).unwrap();
    eventually("backfilled", async || {
        store.backfill_once().await;
        store.backfill_pending() == 0
    })
    .await;
    assert_eq!(shared.blob_size(&d).await.unwrap(), Some(15));
    assert_eq!(shared.manifest_get(&m.digest).await.unwrap(), Some(m));
}
