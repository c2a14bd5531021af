//! Where a cache keeps what it fetched: the [`Store`] interface, its
//! filesystem implementation ([`FsStore`]), and the local [`spool`] that
//! every fill writes to first, whatever store sits behind.
//!
//! # The contract
//! - Blobs and manifests are content-addressed: a blob is committed only
//!   from a [`spool::Verified`] spool (its bytes hashed to its digest), a
//!   manifest only when its bytes hash to its digest. Nothing unverified is
//!   ever visible, and a crash between writing and committing leaves nothing
//!   visible either.
//! - Commits are idempotent: two writers committing one digest (two
//!   replicas on one bucket, a retry) store the same bytes, and both succeed.
//! - A tag is a digest plus the time upstream last confirmed it, stored
//!   explicitly (never a file time), so freshness survives copies and moves.
//! - Nothing a store does at open destroys work another process may own.
//! - Reads of missing things are `Ok(None)`, never errors; errors are the
//!   store failing, and their messages are for logs (they may name paths).
//!
//! [`contract`] (feature `contract`) is the one test suite every
//! implementation must pass.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::stream::BoxStream;

pub use regcache_protocol::{Digest, Manifest, Name, Tag};

pub mod breaker;
#[cfg(any(test, feature = "contract"))]
pub mod contract;
mod fs;
mod fsck;
pub mod index;
mod managed;
pub mod policy;
mod read_buf;
pub mod s3;
pub mod spool;
mod tiered;
mod touch;

pub use fs::{FsStore, RootLock};
pub use fsck::FsckReport;

/// Installs the process-wide TLS provider (ring) once: every TLS client and
/// server of the process needs it (the S3 client, the upstream client, the
/// front).
pub fn init_tls() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
pub use managed::{Managed, NoRoom, PolicyStats, Removed, Report, Reservation};
pub use read_buf::ReadBuf;
pub use spool::{Spool, SpoolDir, Verified};
pub use tiered::TieredStore;
pub use touch::Toucher;

/// A store failing (not: a thing missing).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("stored {what} is corrupt: {reason}")]
    Corrupt { what: String, reason: String },
    #[error("the spool for {expected} holds {actual}: not committed")]
    Mismatch { expected: Digest, actual: Digest },
    /// A remote store (S3) failed or could not be reached.
    #[error("{what}: {reason}")]
    Remote { what: String, reason: String },
}

pub type Result<T> = std::result::Result<T, Error>;

/// A tag as a store keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagRecord {
    pub digest: Digest,
    /// When upstream last said the tag points at `digest`.
    pub confirmed: SystemTime,
}

/// One thing a store holds.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Key {
    Blob(Digest),
    Manifest(Digest),
    Tag(Name, Tag),
}

/// How much a store holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Usage {
    /// Bytes of blobs and manifests.
    pub bytes: u64,
    pub blobs: u64,
    pub manifests: u64,
}

/// What a store knows of one repository (inventory, `_catalog`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Repository {
    pub tags: BTreeMap<Tag, TagRecord>,
    /// Manifests this repository was seen to have.
    pub manifests: Vec<Digest>,
}

/// How a store is doing, for readiness and metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Health {
    /// Why it serves with less than it should (a shared tier away).
    pub degraded: Option<String>,
    /// Failures of a remote tier since start.
    pub remote_errors: u64,
    /// Writes waiting for a remote tier.
    pub backfill: u64,
    /// Is there a remote tier at all?
    pub remote: bool,
}

/// A committed blob, opened: its size, and its bytes on demand.
pub struct BlobReader {
    pub size: u64,
    source: Source,
}

enum Source {
    /// A local file: readers may use it directly (sequential reads, sendfile).
    File(std::fs::File),
    /// Anything else: a function that streams a range.
    Stream(Box<dyn FnOnce(u64, u64) -> BoxStream<'static, io::Result<Bytes>> + Send>),
}

impl BlobReader {
    pub fn from_file(file: std::fs::File, size: u64) -> BlobReader {
        BlobReader {
            size,
            source: Source::File(file),
        }
    }

    pub fn from_stream(
        size: u64,
        read: impl FnOnce(u64, u64) -> BoxStream<'static, io::Result<Bytes>> + Send + 'static,
    ) -> BlobReader {
        BlobReader {
            size,
            source: Source::Stream(Box::new(read)),
        }
    }

    /// The local file, for a reader that sends it itself.
    pub fn into_file(self) -> std::result::Result<std::fs::File, BlobReader> {
        match self.source {
            Source::File(f) => Ok(f),
            source => Err(BlobReader { source, ..self }),
        }
    }

    /// The bytes `start..end` (`end` clamped to the size).
    pub fn stream(self, start: u64, end: Option<u64>) -> BoxStream<'static, io::Result<Bytes>> {
        let end = end.map_or(self.size, |e| e.min(self.size));
        match self.source {
            Source::File(f) => Box::pin(read_file(f, start, end)),
            Source::Stream(read) => read(start, end),
        }
    }
}

/// Where a file stream is: the file to read next, or the read under way.
enum Next {
    Start(std::fs::File),
    Reading(tokio::task::JoinHandle<io::Result<(std::fs::File, Bytes)>>),
}

/// Streams `start..end` of a file in sequential reads on the blocking pool
/// (plain reads, unlike positioned ones, need no zeroed buffer), one read
/// ahead: the next chunk is read while the client is sent this one, so the
/// hand-over to the blocking pool costs no throughput.
fn read_file(
    file: std::fs::File,
    start: u64,
    end: u64,
) -> impl futures_util::Stream<Item = io::Result<Bytes>> + Send + 'static {
    use std::io::{Read, Seek, SeekFrom};
    let read = move |file: std::fs::File, pos: u64, first: bool| {
        tokio::task::spawn_blocking(move || {
            let mut file = file;
            if first {
                file.seek(SeekFrom::Start(pos))?;
            }
            // Large reads for a few clients at once (each a hand-over to
            // the blocking pool less), small ones for the rest.
            let room = ReadBuf::sized(end - pos);
            let mut buf = Vec::with_capacity(room.size());
            (&mut file).take(room.size() as u64).read_to_end(&mut buf)?;
            if buf.len() < room.size() {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "blob file shorter than its size",
                ));
            }
            Ok((file, room.into_bytes(buf)))
        })
    };
    let state = (start < end).then_some((Next::Start(file), start));
    futures_util::stream::unfold(state, move |state| async move {
        let (next, pos) = state?;
        let reading = match next {
            Next::Start(file) => read(file, pos, true),
            Next::Reading(r) => r,
        };
        match reading.await.unwrap_or_else(|e| Err(io::Error::other(e))) {
            Ok((file, bytes)) => {
                let pos = pos + bytes.len() as u64;
                let ahead = (pos < end).then(|| (Next::Reading(read(file, pos, false)), pos));
                Some((Ok(bytes), ahead))
            }
            Err(e) => Some((Err(e), None)),
        }
    })
}

/// The operations a registry cache needs of its storage, and no more.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// What and where this store is, for logs and `check-config` (no secrets).
    fn describe(&self) -> String;

    /// How it is doing.
    fn health(&self) -> Health {
        Health::default()
    }

    /// The size of a committed blob.
    async fn blob_size(&self, digest: &Digest) -> Result<Option<u64>>;
    /// A committed blob, opened for reading.
    async fn blob_open(&self, digest: &Digest) -> Result<Option<BlobReader>>;
    /// A blob a slower tier holds that [`Store::blob_open`] does not: the
    /// cache fills from it as it would from upstream (`None`: no such tier,
    /// or it does not have it).
    async fn blob_source(&self, _digest: &Digest) -> Result<Option<BlobReader>> {
        Ok(None)
    }
    /// Makes a verified spool visible as its digest's blob.
    async fn blob_commit(&self, blob: Verified) -> Result<()>;

    /// A manifest by digest, its bytes checked against it.
    async fn manifest_get(&self, digest: &Digest) -> Result<Option<Manifest>>;
    /// Stores a manifest whose bytes hash to its digest (else [`Error::Mismatch`]).
    async fn manifest_put(&self, manifest: &Manifest) -> Result<()>;

    async fn tag_get(&self, name: &Name, tag: &Tag) -> Result<Option<TagRecord>>;
    async fn tag_put(&self, name: &Name, tag: &Tag, record: &TagRecord) -> Result<()>;
    /// Records that repository `name` was seen to have `key` (a blob or a
    /// manifest) upstream, so that it may be served under that name.
    async fn link(&self, name: &Name, key: &Key) -> Result<()>;
    /// Was `name` seen to have `key`?
    async fn linked(&self, name: &Name, key: &Key) -> Result<bool>;

    /// Every repository with its tags and manifests.
    async fn repositories(&self) -> Result<BTreeMap<Name, Repository>>;
    /// The tags of one repository.
    async fn tags(&self, name: &Name) -> Result<Vec<Tag>>;

    /// Removes one thing; removing what is not there succeeds.
    async fn delete(&self, key: &Key) -> Result<()>;
    /// Records that `key` was used at `at`.
    async fn touch(&self, key: &Key, at: SystemTime) -> Result<()>;
    /// When `key` was last used or stored.
    async fn last_used(&self, key: &Key) -> Result<Option<SystemTime>>;
    /// What the store holds now.
    async fn usage(&self) -> Result<Usage>;
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use std::io::Write;

    async fn read_all(file: &std::path::Path, start: u64, end: u64) -> Vec<io::Result<Bytes>> {
        let f = std::fs::File::open(file).unwrap();
        read_file(f, start, end).collect().await
    }

    #[tokio::test]
    async fn file_reads_are_exact_bounded_chunks_and_a_short_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("blob");
        const LARGE_CHUNK: u64 = read_buf::LARGE;
        const FILE_CHUNK: u64 = 128 << 10;
        let data: Vec<u8> = (0..(LARGE_CHUNK * 2 + FILE_CHUNK * 3 + 1000))
            .map(|i| (i % 251) as u8)
            .collect();
        std::fs::File::create(&path)
            .unwrap()
            .write_all(&data)
            .unwrap();
        let size = data.len() as u64;
        for (start, end) in [
            (0, size),
            (7, size - 5),
            (FILE_CHUNK, FILE_CHUNK + 1),
            (9, 9),
        ] {
            let chunks = read_all(&path, start, end).await;
            let mut got = Vec::new();
            for c in chunks {
                let c = c.unwrap();
                assert!(!c.is_empty() && c.len() as u64 <= LARGE_CHUNK);
                got.extend_from_slice(&c);
            }
            assert_eq!(got, data[start as usize..end as usize], "{start}..{end}");
        }
        // The file lost its tail: the bytes it has, then an error, never a
        // silently short body.
        let chunks = read_all(&path, 0, size + FILE_CHUNK).await;
        let (last, whole) = chunks.split_last().unwrap();
        assert!(whole.iter().all(|c| c.is_ok()));
        assert_eq!(
            last.as_ref().unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }
}
