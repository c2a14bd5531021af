//! The store contract as tests: written once, run against every [`Store`]
//! implementation (each calls [`run`] from its own tests).
//!
//! A subject is opened at a location; opening the same location again must
//! show the same contents (a restart). Everything the crate docs promise is
//! checked: commit visibility, idempotent double commits, nothing visible
//! after a crash between write and commit, ranges, explicit tag times,
//! listing, links, delete, usage and last use.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use futures_util::TryStreamExt;
use regcache_protocol::Algorithm;

use crate::{Digest, Key, Manifest, Name, SpoolDir, Store, Tag, TagRecord};

/// A store under test and the spools its fills would commit from.
pub struct Subject {
    pub store: Arc<dyn Store>,
    pub spools: SpoolDir,
}

/// Runs every check; `open` opens the store at a location (a directory the
/// suite owns; a remote store derives its prefix from it).
pub async fn run(open: impl Fn(&Path) -> Subject) {
    commit_visibility_and_ranges(&open).await;
    double_commits_are_idempotent(&open).await;
    mismatches_are_never_committed(&open).await;
    a_crash_before_commit_leaves_nothing(&open).await;
    manifests_round_trip_exactly(&open).await;
    tags_keep_their_confirmation_time(&open).await;
    listing(&open).await;
    delete_and_usage(&open).await;
    last_use(&open).await;
}

fn dir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

fn sha256(b: &[u8]) -> Digest {
    Digest::of(Algorithm::Sha256, b)
}

/// Spools `data` and commits it as its digest.
pub async fn commit(s: &Subject, data: &[u8]) -> Digest {
    let spool = s.spools.create().expect("spool");
    (&**spool.file()).write_all(data).expect("write spool");
    let d = sha256(data);
    let verified = spool.verify(&d, d.clone()).expect("verifies");
    s.store.blob_commit(verified).await.expect("commit");
    d
}

async fn read(s: &Subject, d: &Digest, start: u64, end: Option<u64>) -> Vec<u8> {
    let reader = s.store.blob_open(d).await.expect("open").expect("present");
    let chunks: Vec<Bytes> = reader.stream(start, end).try_collect().await.expect("read");
    chunks.concat()
}

fn manifest(body: &'static [u8]) -> Manifest {
    Manifest {
        media_type: "application/vnd.oci.image.manifest.v1+json".into(),
        bytes: Bytes::from_static(body),
        digest: sha256(body),
    }
}

fn name(s: &str) -> Name {
    s.parse().unwrap()
}

fn tag(s: &str) -> Tag {
    s.parse().unwrap()
}

async fn commit_visibility_and_ranges(open: &impl Fn(&Path) -> Subject) {
    let at = dir();
    let s = open(at.path());
    let data: Vec<u8> = (0..=255u8).cycle().take(300_000).collect();
    let d = sha256(&data);
    assert_eq!(
        s.store.blob_size(&d).await.unwrap(),
        None,
        "visible before commit"
    );
    assert!(s.store.blob_open(&d).await.unwrap().is_none());
    commit(&s, &data).await;
    assert_eq!(
        s.store.blob_size(&d).await.unwrap(),
        Some(data.len() as u64)
    );
    assert_eq!(read(&s, &d, 0, None).await, data, "whole blob");
    assert_eq!(
        read(&s, &d, 1000, Some(2000)).await,
        &data[1000..2000],
        "closed range"
    );
    assert_eq!(
        read(&s, &d, 299_990, None).await,
        &data[299_990..],
        "open range"
    );
    assert_eq!(
        read(&s, &d, 5, Some(10_000_000)).await,
        &data[5..],
        "range past the end"
    );
    let again = open(at.path());
    assert_eq!(read(&again, &d, 0, None).await, data, "after reopening");
}

async fn double_commits_are_idempotent(open: &impl Fn(&Path) -> Subject) {
    let at = dir();
    let s = open(at.path());
    let d = commit(&s, b"twice").await;
    assert_eq!(commit(&s, b"twice").await, d);
    let other = open(at.path());
    assert_eq!(commit(&other, b"twice").await, d, "a second writer");
    assert_eq!(read(&s, &d, 0, None).await, b"twice");
    assert_eq!(
        s.store.usage().await.unwrap().blobs,
        1,
        "one blob, counted once"
    );
}

async fn mismatches_are_never_committed(open: &impl Fn(&Path) -> Subject) {
    let at = dir();
    let s = open(at.path());
    let spool = s.spools.create().unwrap();
    (&**spool.file()).write_all(b"actual").unwrap();
    let claimed = sha256(b"claimed");
    assert!(spool.verify(&claimed, sha256(b"actual")).is_err());
    assert_eq!(s.store.blob_size(&claimed).await.unwrap(), None);
    let m = Manifest {
        bytes: Bytes::from_static(b"tampered"),
        ..manifest(b"{\"a\":1}")
    };
    assert!(
        s.store.manifest_put(&m).await.is_err(),
        "a manifest that does not hash to its digest"
    );
    assert_eq!(s.store.manifest_get(&m.digest).await.unwrap(), None);
}

async fn a_crash_before_commit_leaves_nothing(open: &impl Fn(&Path) -> Subject) {
    let at = dir();
    let s = open(at.path());
    // What a killed writer leaves: a spool file nobody holds.
    let left = s.spools.path().join("spool-of-a-dead-process");
    std::fs::write(&left, b"half a blob").unwrap();
    drop(s);
    let s = open(at.path());
    assert!(!left.exists(), "an abandoned spool survived reopening");
    assert_eq!(
        s.store.blob_size(&sha256(b"half a blob")).await.unwrap(),
        None
    );
    assert_eq!(s.store.usage().await.unwrap().blobs, 0);
    // A live spool of another opener is left alone.
    let live = s.spools.create().unwrap();
    let _other = open(at.path());
    assert!(live.path().exists(), "reopening removed a live spool");
}

async fn manifests_round_trip_exactly(open: &impl Fn(&Path) -> Subject) {
    let at = dir();
    let s = open(at.path());
    let m = manifest(b"{ \"schemaVersion\": 2 ,\n \"odd\":  \"spacing\" }");
    assert_eq!(s.store.manifest_get(&m.digest).await.unwrap(), None);
    s.store.manifest_put(&m).await.unwrap();
    s.store.manifest_put(&m).await.unwrap();
    assert_eq!(
        s.store.manifest_get(&m.digest).await.unwrap(),
        Some(m.clone())
    );
    assert_eq!(
        open(at.path()).store.manifest_get(&m.digest).await.unwrap(),
        Some(m)
    );
}

async fn tags_keep_their_confirmation_time(open: &impl Fn(&Path) -> Subject) {
    let at = dir();
    let s = open(at.path());
    let (n, t) = (name("org/app"), tag("1.0"));
    assert_eq!(s.store.tag_get(&n, &t).await.unwrap(), None);
    let long_ago = UNIX_EPOCH + Duration::from_millis(1_600_000_000_123);
    let rec = TagRecord {
        digest: sha256(b"one"),
        confirmed: long_ago,
    };
    s.store.tag_put(&n, &t, &rec).await.unwrap();
    assert_eq!(
        s.store.tag_get(&n, &t).await.unwrap(),
        Some(rec),
        "time as given, not the write time"
    );
    let newer = TagRecord {
        digest: sha256(b"two"),
        confirmed: long_ago + Duration::from_secs(60),
    };
    s.store.tag_put(&n, &t, &newer).await.unwrap();
    assert_eq!(
        open(at.path()).store.tag_get(&n, &t).await.unwrap(),
        Some(newer)
    );
}

async fn listing(open: &impl Fn(&Path) -> Subject) {
    let at = dir();
    let s = open(at.path());
    let m = manifest(b"{}");
    let rec = TagRecord {
        digest: m.digest.clone(),
        confirmed: UNIX_EPOCH + Duration::from_secs(1_700_000_000),
    };
    for (repo, tags) in [
        ("library/debian", &["12", "bookworm"][..]),
        ("org/a/b", &["v1"][..]),
    ] {
        let key = Key::Manifest(m.digest.clone());
        s.store.link(&name(repo), &key).await.unwrap();
        s.store.link(&name(repo), &key).await.unwrap();
        for t in tags {
            s.store.tag_put(&name(repo), &tag(t), &rec).await.unwrap();
        }
    }
    let repos = s.store.repositories().await.unwrap();
    assert_eq!(
        repos.keys().map(Name::as_str).collect::<Vec<_>>(),
        ["library/debian", "org/a/b"]
    );
    let debian = &repos[&name("library/debian")];
    assert_eq!(
        debian.tags.keys().map(Tag::as_str).collect::<Vec<_>>(),
        ["12", "bookworm"]
    );
    assert_eq!(debian.tags[&tag("12")], rec);
    assert_eq!(debian.manifests, std::slice::from_ref(&m.digest));
    // Links: what each repository was seen to have, and nothing else.
    let blob = Key::Blob(sha256(b"layer"));
    s.store.link(&name("org/a/b"), &blob).await.unwrap();
    assert!(s.store.linked(&name("org/a/b"), &blob).await.unwrap());
    assert!(!s
        .store
        .linked(&name("library/debian"), &blob)
        .await
        .unwrap());
    assert!(s
        .store
        .linked(&name("library/debian"), &Key::Manifest(m.digest.clone()))
        .await
        .unwrap());
    assert!(!s
        .store
        .linked(&name("nope"), &Key::Manifest(m.digest.clone()))
        .await
        .unwrap());
    let tags = s.store.tags(&name("library/debian")).await.unwrap();
    assert_eq!(tags, [tag("12"), tag("bookworm")]);
    assert!(s.store.tags(&name("nope")).await.unwrap().is_empty());
}

async fn delete_and_usage(open: &impl Fn(&Path) -> Subject) {
    let at = dir();
    let s = open(at.path());
    let before = s.store.usage().await.unwrap();
    assert_eq!((before.bytes, before.blobs, before.manifests), (0, 0, 0));
    let d = commit(&s, &[7u8; 1000]).await;
    let m = manifest(b"{\"layers\":[]}");
    s.store.manifest_put(&m).await.unwrap();
    let (n, t) = (name("a"), tag("x"));
    let rec = TagRecord {
        digest: m.digest.clone(),
        confirmed: SystemTime::now(),
    };
    s.store.tag_put(&n, &t, &rec).await.unwrap();
    let u = s.store.usage().await.unwrap();
    assert_eq!((u.blobs, u.manifests), (1, 1));
    assert!(u.bytes >= 1000 + m.bytes.len() as u64, "{u:?}");
    let reopened = open(at.path()).store.usage().await.unwrap();
    assert_eq!(
        (reopened.blobs, reopened.manifests),
        (1, 1),
        "counted again after reopening"
    );

    s.store.delete(&Key::Blob(d.clone())).await.unwrap();
    s.store.delete(&Key::Blob(d.clone())).await.unwrap();
    s.store
        .delete(&Key::Manifest(m.digest.clone()))
        .await
        .unwrap();
    s.store
        .delete(&Key::Tag(n.clone(), t.clone()))
        .await
        .unwrap();
    assert_eq!(s.store.blob_size(&d).await.unwrap(), None);
    assert_eq!(s.store.manifest_get(&m.digest).await.unwrap(), None);
    assert_eq!(s.store.tag_get(&n, &t).await.unwrap(), None);
    let after = s.store.usage().await.unwrap();
    assert_eq!(
        (after.bytes, after.blobs, after.manifests),
        (0, 0, 0),
        "usage goes down on delete"
    );
}

async fn last_use(open: &impl Fn(&Path) -> Subject) {
    let at = dir();
    let s = open(at.path());
    let d = commit(&s, b"used").await;
    let key = Key::Blob(d);
    let stored = s
        .store
        .last_used(&key)
        .await
        .unwrap()
        .expect("stored counts as used");
    assert!(stored <= SystemTime::now() + Duration::from_secs(1));
    let when = UNIX_EPOCH + Duration::from_secs(1_650_000_000);
    s.store.touch(&key, when).await.unwrap();
    let got = s.store.last_used(&key).await.unwrap().unwrap();
    let diff = got.duration_since(when).unwrap_or_else(|e| e.duration());
    assert!(
        diff < Duration::from_secs(1),
        "touch({when:?}) then last_used = {got:?}"
    );
    let missing = Key::Blob(sha256(b"never stored"));
    s.store.touch(&missing, when).await.unwrap();
    assert_eq!(s.store.last_used(&missing).await.unwrap(), None);
}
