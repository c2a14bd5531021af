//! One upstream fetch of a blob, which every reader of the digest follows.
//!
//! A fill streams the upstream body into a local spool, hashing beside the
//! write, and commits to the store only a verified blob. Readers read the
//! growing spool as bytes land; the last byte is held back until size and
//! digest check out, so a failed fill ends every reader with an error (an
//! aborted body), never with wrong bytes presented as complete. The fill
//! does not depend on any reader staying.

use std::fs::File;
use std::io;
use std::io::IoSlice;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{FutureExt, StreamExt, TryStreamExt};
use http::Method;
use nix::errno::Errno;
use nix::sys::uio::pwritev;
use regcache_protocol::follow::Step;
use regcache_protocol::request::Kind;
use regcache_protocol::response::{BlobStream, Outcome};
use regcache_protocol::{Digest, Hasher, Name};
use regcache_store::{Managed, ReadBuf, Spool, Store};
use tokio::sync::watch;

use super::Error;
use crate::metrics::Metrics;
use crate::peers::{Member, Peers};
use crate::upstream::{self, Upstream};

/// Least a reader of a growing blob reads at once, unless at its end.
const MIN_GROWING_READ: u64 = 64 << 10;
/// Blobs up to this size are written without `block_in_place`: for a small
/// blob handing the thread's other tasks off costs more than the work.
pub(super) const INLINE_FILL: u64 = 1 << 20;
/// Times a broken-off upstream transfer is resumed before the fill fails.
const MAX_RESUMES: u32 = 3;
/// Bytes already received that a fill writes, hashes and reports in one go.
/// A TLS upstream's body comes 16 KiB (one record) at a time; a write, a
/// hand-off to a blocking thread and a wake-up of every reader per record
/// cost more than the bytes.
const BATCH: usize = 256 << 10;
/// Chunks a fill writes in one go at most (one `pwritev`, well under IOV_MAX
/// however small an upstream's chunks are).
const BATCH_CHUNKS: usize = 64;

/// The state of a fill's bytes, as readers see it.
#[derive(Debug, Clone)]
enum Progress {
    /// Waiting for upstream's response headers.
    Starting,
    /// `written` bytes are in the spool; `total` if upstream said.
    Writing { written: u64, total: Option<u64> },
    /// Complete and verified.
    Done { size: u64 },
    /// Nothing will be committed; readers must fail.
    Failed(Arc<Error>),
}

/// One in-flight upstream fetch of a blob.
pub(super) struct Fill {
    file: Arc<File>,
    /// The spool's file name, for the front to follow (`protocol::follow`).
    spool: Arc<str>,
    progress: watch::Receiver<Progress>,
    /// The repository it is fetched for (upstream's answer is for it alone).
    pub(super) repo: Name,
}

/// The fill's end of the bargain: what [`run`] reports through.
pub(super) struct Writer {
    spool: Spool,
    progress: watch::Sender<Progress>,
}

impl Fill {
    /// A new fill writing to `spool`, and the writer that runs it.
    pub(super) fn new(spool: Spool, repo: Name) -> (Arc<Fill>, Writer) {
        let (tx, rx) = watch::channel(Progress::Starting);
        let name = spool.path().file_name().unwrap_or_default();
        let fill = Arc::new(Fill {
            file: spool.file().clone(),
            spool: name.to_string_lossy().into(),
            progress: rx,
            repo,
        });
        (
            fill,
            Writer {
                spool,
                progress: tx,
            },
        )
    }

    /// (bytes written, total if known), for the status page.
    pub(super) fn progress(&self) -> (u64, Option<u64>) {
        match &*self.progress.borrow() {
            Progress::Starting | Progress::Failed(_) => (0, None),
            Progress::Writing { written, total } => (*written, *total),
            Progress::Done { size } => (*size, Some(*size)),
        }
    }

    /// Failed: it leaves the map in a moment; a new request must not take
    /// its error but start a fill of its own.
    pub(super) fn failed(&self) -> bool {
        matches!(*self.progress.borrow(), Progress::Failed(_))
    }

    /// A reader of this fill's bytes. A fill that is verified and only
    /// waiting for its commit counts as a hit: its bytes are local and checked.
    pub(super) fn attach(&self) -> Reader {
        let verified = matches!(*self.progress.borrow(), Progress::Done { .. });
        Reader {
            file: self.file.clone(),
            spool: self.spool.clone(),
            progress: self.progress.clone(),
            outcome: if verified {
                Outcome::Hit
            } else {
                Outcome::Miss
            },
        }
    }
}

/// A reader following a fill.
pub struct Reader {
    file: Arc<File>,
    spool: Arc<str>,
    progress: watch::Receiver<Progress>,
    pub outcome: Outcome,
}

impl Reader {
    /// Waits until the size is known or the fill failed; `Ok(None)` means
    /// upstream sent no length.
    pub async fn size(&mut self) -> Result<Option<u64>, Error> {
        loop {
            match &*self.progress.borrow_and_update() {
                Progress::Starting => {}
                Progress::Writing { total, .. } => return Ok(*total),
                Progress::Done { size } => return Ok(Some(*size)),
                Progress::Failed(e) => return Err(Error::Shared(e.clone())),
            }
            if self.progress.changed().await.is_err() {
                return Err(Error::Abandoned);
            }
        }
    }

    /// The bytes `start..end` (to the end when `end` is `None`), each as soon
    /// as it is in the spool, read at explicit offsets (the writer owns the
    /// file position).
    pub fn stream(self, start: u64, end: Option<u64>) -> BlobStream {
        let state = (self.file, self.progress, start);
        let stream = futures_util::stream::unfold(Some(state), move |state| async move {
            let (file, mut progress, pos) = state?;
            loop {
                let (limit, last) = match window(&progress.borrow_and_update(), end) {
                    Ok(w) => w,
                    Err(e) => return Some((Err(e), None)),
                };
                // Chasing the writer chunk by chunk costs a wake-up per few
                // KiB: wait for a useful amount unless nothing more will come.
                if pos < limit && (last || limit - pos >= MIN_GROWING_READ) {
                    let room = ReadBuf::following(limit - pos);
                    let len = room.size();
                    // These bytes were just written: the read is a copy from
                    // the page cache, cheaper here than a hop to the blocking
                    // pool (whose many threads each keep their own malloc arena).
                    let mut buf = vec![0; len];
                    let read = file
                        .read_exact_at(&mut buf, pos)
                        .map(|()| room.into_bytes(buf));
                    return match read {
                        Ok(bytes) => Some((Ok(bytes), Some((file, progress, pos + len as u64)))),
                        Err(e) => Some((Err(e), None)),
                    };
                }
                if last {
                    return None;
                }
                if progress.changed().await.is_err() {
                    return Some((Err(io::Error::other("blob fill abandoned")), None));
                }
            }
        });
        Box::pin(stream)
    }

    /// The spool's file name (in the store's spool directory).
    pub fn spool(&self) -> &str {
        &self.spool
    }

    /// The progress of `start..end` as `protocol::follow` steps, for the
    /// front that reads the bytes from the spool itself: a step per useful
    /// amount, the last when the range is readable; an error if the fill fails.
    pub fn follow(self, start: u64, end: Option<u64>) -> BlobStream {
        let state = (self.progress, start);
        let steps = futures_util::stream::unfold(Some(state), move |state| async move {
            let (mut progress, told) = state?;
            loop {
                let (limit, last) = match window(&progress.borrow_and_update(), end) {
                    Ok(w) => w,
                    Err(e) => return Some((Err(e), None)),
                };
                if last || limit >= told + MIN_GROWING_READ {
                    let step = Step {
                        readable: limit,
                        end: last,
                    };
                    let next = (!last).then_some((progress, limit));
                    return Some((Ok(Bytes::from(step.encode())), next));
                }
                if progress.changed().await.is_err() {
                    return Some((Err(io::Error::other("blob fill abandoned")), None));
                }
            }
        });
        Box::pin(steps)
    }
}

/// How far a reader of `..end` (`None`: to the end) may read now, and
/// whether that is all it will get.
fn window(progress: &Progress, end: Option<u64>) -> io::Result<(u64, bool)> {
    let (available, finished) = match progress {
        Progress::Starting => (0, false),
        // The last byte waits for verification, so that a failed fill can
        // never look complete to a client.
        Progress::Writing { written, total } => (
            total.map_or(*written, |t| (*written).min(t.saturating_sub(1))),
            false,
        ),
        Progress::Done { size } => (*size, true),
        Progress::Failed(e) => return Err(io::Error::other(e.to_string())),
    };
    let limit = end.map_or(available, |e| e.min(available));
    Ok((limit, finished || end.is_some_and(|e| limit >= e)))
}

/// Fetches `digest` of `name` into the writer's spool and commits it to
/// `store` if it verifies; readers learn the outcome through the progress.
pub(super) async fn run(
    writer: Writer,
    origin: Origin,
    store: Arc<Managed>,
    upstream: Arc<Upstream>,
    metrics: Arc<Metrics>,
    name: Name,
    digest: Digest,
) -> Result<u64, Error> {
    metrics.fills_in_flight.inc();
    let started = std::time::Instant::now();
    let Writer { spool, progress } = writer;
    let result = fetch(
        origin, &store, &upstream, &metrics, &name, &digest, spool, &progress,
    )
    .await;
    metrics.fills_in_flight.dec();
    match &result {
        Ok(_) => metrics.fill_seconds(started.elapsed().as_secs_f64()),
        Err(Error::NoRoom(e)) => {
            tracing::info!(%name, %digest, "blob served uncached: {e}");
        }
        Err(e) => {
            metrics.fill_failures.inc();
            tracing::warn!(%name, %digest, error = %e, "blob fill failed");
        }
    }
    result.map_err(|e| {
        let shared = Arc::new(e);
        // Readers that had every verified byte keep them (a failed commit
        // only means the next request fetches again).
        progress.send_if_modified(|p| {
            let verified = matches!(p, Progress::Done { .. });
            if !verified {
                *p = Progress::Failed(shared.clone());
            }
            !verified
        });
        Error::Shared(shared)
    })
}

/// Where a fill's bytes come from.
pub(super) enum Origin {
    Upstream,
    /// A slower store tier that has the blob (the shared bucket).
    Store(regcache_store::BlobReader),
    /// The replica of the cluster that owns the digest (upstream if it fails).
    Peer(Arc<Peers>, Member),
}

type Body = futures_util::stream::BoxStream<'static, Result<Bytes, upstream::Error>>;

fn body_of(up: &Upstream, resp: reqwest::Response) -> Body {
    let name = up.name().to_owned();
    resp.bytes_stream()
        .map_err(move |e| upstream::Error::Unreachable {
            upstream: name.clone(),
            reason: e.without_url().to_string(),
        })
        .boxed()
}

/// `GET path` from byte `from` on: a 206 starting exactly there, or an error.
async fn resume(
    up: &Upstream,
    name: &Name,
    path: &str,
    from: u64,
) -> Result<reqwest::Response, upstream::Error> {
    let resp = up.get_from(name, path, from).await?;
    let resp = up.check(resp, Kind::Blob, path)?;
    let starts_at = resp
        .headers()
        .get(reqwest::header::CONTENT_RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes "))
        .and_then(|v| v.split('-').next())
        .and_then(|v| v.parse::<u64>().ok());
    if resp.status() != reqwest::StatusCode::PARTIAL_CONTENT || starts_at != Some(from) {
        return Err(up.garbage("no usable answer to a Range request for the rest of a blob"));
    }
    Ok(resp)
}

/// The fetch itself: what has arrived written and hashed before waiting for more.
/// The last byte is released (Done) as soon as size and digest check out,
/// before the commit that makes the blob visible to later requests.
#[allow(clippy::too_many_arguments)]
async fn fetch(
    origin: Origin,
    store: &Arc<Managed>,
    up: &Upstream,
    metrics: &Metrics,
    name: &Name,
    digest: &Digest,
    spool: Spool,
    progress: &watch::Sender<Progress>,
) -> Result<u64, Error> {
    let path = format!("/v2/{name}/blobs/{digest}");
    // The owner replica first, when another one owns the digest.
    let from_peer = match &origin {
        Origin::Peer(peers, owner) => match peers.send(owner, Method::GET, &path, None, None).await
        {
            Ok(resp) => {
                metrics.peer_fetches.inc();
                Some(resp)
            }
            Err(e) => {
                metrics.peer_fallbacks.inc();
                tracing::info!(%name, %digest, owner = %owner.id, error = %e, "the owner replica failed; asking upstream");
                None
            }
        },
        _ => None,
    };
    let (total, mut stream) = match (from_peer, origin) {
        // A break in the owner's stream is resumed from upstream, like any.
        (Some(resp), _) => (resp.content_length(), body_of(up, resp)),
        (None, Origin::Store(reader)) => {
            metrics.fills_from_store.inc();
            let size = reader.size;
            let stream = reader
                .stream(0, None)
                .map_err(|e| upstream::Error::Unreachable {
                    upstream: "the shared store".into(),
                    reason: e.to_string(),
                })
                .boxed();
            (Some(size), stream)
        }
        (None, _) => {
            let resp = up.send(Method::GET, Some(name), &path, None).await?;
            let resp = up.check(resp, Kind::Blob, &digest.to_string())?;
            (resp.content_length(), body_of(up, resp))
        }
    };
    // Room first, before a byte is written: none means served uncached.
    let _room = match total {
        Some(size) => Some(store.reserve(digest, size).await?),
        None => None,
    };
    progress.send_replace(Progress::Writing { written: 0, total });
    let disk = Disk {
        file: spool.file().clone(),
        total,
        store: store.clone(),
        name: name.clone(),
        digest: digest.clone(),
    };
    let mut sink = Sink::new(disk);
    let mut received = 0u64;
    let mut resumes = 0;
    let mut failure = None;
    loop {
        let broke = loop {
            let next = match stream.next().now_or_never() {
                Some(next) => next,
                None => {
                    // Nothing more has arrived: what has goes to disk and
                    // to the readers before waiting for more.
                    if !sink.flush(progress) {
                        break None; // the writer failed; its error is reported below
                    }
                    stream.next().await
                }
            };
            match next {
                None => break None,
                Some(Ok(chunk)) => {
                    received += chunk.len() as u64;
                    if total.is_some_and(|t| received > t) {
                        failure = Some(up.garbage("blob longer than its Content-Length"));
                        break None;
                    }
                    if !sink.push(chunk, progress) {
                        break None; // the writer failed; its error is reported below
                    }
                }
                Some(Err(e)) => break Some(e),
            }
        };
        let Some(broken) = broke else { break };
        if !sink.flush(progress) {
            break;
        }
        // The transfer broke off (from upstream or from the shared store):
        // ask upstream for the rest (the whole blob is still hashed and
        // checked), when it is known how much there is.
        let resumable = total.is_some_and(|t| received < t) && resumes < MAX_RESUMES;
        if !resumable {
            failure = Some(broken);
            break;
        }
        resumes += 1;
        metrics.fill_resumes.inc();
        tracing::info!(%name, %digest, received, error = %broken, "resuming an interrupted blob fetch");
        match resume(up, name, &path, received).await {
            Ok(rest) => stream = body_of(up, rest),
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    let (written, actual) = sink.finish(progress).map_err(|source| {
        Error::Storage(regcache_store::Error::Io {
            op: "write",
            path: spool.path().to_owned(),
            source,
        })
    })?;
    if let Some(f) = failure {
        return Err(f.into());
    }
    if total.is_some_and(|t| written != t) {
        return Err(up.garbage("blob shorter than its Content-Length").into());
    }
    let verified = spool.verify(digest, actual).map_err(|e| match e {
        regcache_store::Error::Mismatch { expected, actual } => {
            Error::Upstream(upstream::Error::Mismatch {
                upstream: up.name().to_owned(),
                expected: expected.to_string(),
                actual: actual.to_string(),
            })
        }
        other => Error::Storage(other),
    })?;
    // Verified: attached readers may have their last byte now.
    progress.send_replace(Progress::Done { size: written });
    store.blob_commit(verified).await?;
    Ok(written)
}

/// Where a fill's bytes go, and what a full disk does.
struct Disk {
    file: Arc<File>,
    total: Option<u64>,
    store: Arc<Managed>,
    name: Name,
    digest: Digest,
}

impl Disk {
    /// Writes `chunks` from `at` on: at explicit offsets, so that a write
    /// retried after a full disk rewrites exactly what did not land.
    fn write(&self, chunks: &[Bytes], mut at: u64) -> io::Result<()> {
        let (name, digest) = (&self.name, &self.digest);
        let mut slices: Vec<IoSlice> = chunks.iter().map(|c| IoSlice::new(c)).collect();
        let mut left = &mut slices[..];
        while !left.is_empty() {
            match pwritev(&*self.file, left, at as nix::libc::off_t) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    at += n as u64;
                    IoSlice::advance_slices(&mut left, n);
                }
                Err(Errno::EINTR) => {}
                Err(Errno::ENOSPC) => {
                    let rest: usize = left.iter().map(|s| s.len()).sum();
                    let needed = self.total.map_or(rest as u64, |t| t.saturating_sub(at));
                    if !self.store.relieve(needed) {
                        tracing::warn!(%name, %digest, "cache disk full and nothing left to evict: this blob is not cached");
                        return Err(Errno::ENOSPC.into());
                    }
                    tracing::warn!(%name, %digest, "cache disk full: evicted to make room");
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

/// A fill's writing and hashing, on the task that receives its bytes: the
/// chunks received since the last flush (at most [`BATCH`] bytes in
/// [`BATCH_CHUNKS`] chunks) are written and hashed before more is read, so
/// a fill pins a bounded part of its upstream connection's buffers, not a
/// queue of them (a queue between tasks
/// held 0.8 MiB more for a fast upstream), and a slow disk slows the
/// upstream read, never a client. A large blob's writes may block and its
/// hashing takes a while, so they run in `block_in_place`: the runtime
/// moves this thread's other tasks elsewhere meanwhile.
struct Sink {
    disk: Disk,
    hasher: Box<Hasher>,
    written: u64,
    /// Received, not yet written.
    pending: Vec<Bytes>,
    pending_len: usize,
    blocking: bool,
    failed: Option<io::Error>,
}

impl Sink {
    fn new(disk: Disk) -> Sink {
        // A small blob's writes cost less than handing this thread's tasks
        // off; a current-thread runtime (tests) has nowhere to hand them.
        let multi_thread = tokio::runtime::Handle::current().runtime_flavor()
            == tokio::runtime::RuntimeFlavor::MultiThread;
        Sink {
            hasher: Box::new(Hasher::new(disk.digest.algorithm())),
            written: 0,
            pending: Vec::new(),
            pending_len: 0,
            blocking: multi_thread && disk.total.is_none_or(|t| t > INLINE_FILL),
            failed: None,
            disk,
        }
    }

    /// Takes `chunk`, writing once a batch is full; `false` once writing
    /// has failed (see [`Sink::finish`]). An empty chunk is dropped: an
    /// HTTP/2 upstream may end a body with an empty DATA frame, and a
    /// `pwritev` of nothing returns 0, which reads as a failed write.
    fn push(&mut self, chunk: Bytes, progress: &watch::Sender<Progress>) -> bool {
        if chunk.is_empty() {
            return self.failed.is_none();
        }
        self.pending_len += chunk.len();
        self.pending.push(chunk);
        let full = self.pending_len >= BATCH || self.pending.len() >= BATCH_CHUNKS;
        !full || self.flush(progress)
    }

    /// Writes and hashes what is pending and tells the readers; `false`
    /// once writing has failed.
    fn flush(&mut self, progress: &watch::Sender<Progress>) -> bool {
        if self.failed.is_some() {
            return false;
        }
        if self.pending.is_empty() {
            return true;
        }
        let (disk, hasher, chunks) = (&self.disk, &mut self.hasher, &self.pending);
        let mut work = || {
            disk.write(chunks, self.written)?;
            chunks.iter().for_each(|c| hasher.update(c));
            Ok::<_, io::Error>(())
        };
        let done = match self.blocking {
            true => tokio::task::block_in_place(work),
            false => work(),
        };
        if let Err(e) = done {
            self.failed = Some(e);
            return false;
        }
        self.written += self.pending_len as u64;
        self.pending.clear();
        self.pending_len = 0;
        progress.send_replace(Progress::Writing {
            written: self.written,
            total: self.disk.total,
        });
        true
    }

    /// Bytes written and their digest, or why writing failed.
    fn finish(mut self, progress: &watch::Sender<Progress>) -> io::Result<(u64, Digest)> {
        self.flush(progress);
        match self.failed {
            Some(e) => Err(e),
            None => Ok((self.written, self.hasher.finish())),
        }
    }
}

#[cfg(test)]
mod tests {
    use regcache_protocol::Algorithm;
    use regcache_store::policy::Policy;
    use regcache_store::FsStore;

    use super::*;

    /// A sink writing to a spool of a fresh store, and its readers' view.
    fn sink(dir: &tempfile::TempDir) -> (Sink, Spool, watch::Sender<Progress>) {
        let store = FsStore::open(dir.path()).unwrap();
        let spool = store.spools().unwrap().create().unwrap();
        let managed = Managed::new(Arc::new(store.clone()), store, Policy::default());
        let disk = Disk {
            file: spool.file().clone(),
            total: None,
            store: managed,
            name: "org/img".parse().unwrap(),
            digest: Digest::of(Algorithm::Sha256, b""),
        };
        let (tx, _) = watch::channel(Progress::Starting);
        (Sink::new(disk), spool, tx)
    }

    fn written(progress: &watch::Sender<Progress>) -> Option<u64> {
        match *progress.borrow() {
            Progress::Writing { written, .. } => Some(written),
            _ => None,
        }
    }

    #[tokio::test]
    async fn small_chunks_are_written_and_reported_a_batch_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let (mut sink, spool, progress) = sink(&dir);
        let data = regcache_testkit::random_bytes(2 * BATCH + 1000);
        // Records of 16 KiB, as a TLS upstream's body comes.
        let chunks: Vec<Bytes> = data.chunks(16 << 10).map(Bytes::copy_from_slice).collect();
        let per_batch = BATCH / (16 << 10);
        for (i, chunk) in chunks.iter().enumerate() {
            assert!(sink.push(chunk.clone(), &progress));
            let batches = (i + 1) / per_batch;
            let told = (batches > 0).then_some((batches * BATCH) as u64);
            assert_eq!(written(&progress), told, "after chunk {i}");
        }
        // Less than a batch is written when the upstream makes the fill wait.
        assert!(sink.flush(&progress));
        assert_eq!(written(&progress), Some(data.len() as u64));
        let (size, digest) = sink.finish(&progress).unwrap();
        assert_eq!(size, data.len() as u64);
        assert_eq!(digest, Digest::of(Algorithm::Sha256, &data));
        assert!(std::fs::read(spool.path()).unwrap() == data);
    }

    #[tokio::test]
    async fn what_is_pending_at_the_end_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let (mut sink, spool, progress) = sink(&dir);
        for part in [&b"abc"[..], b"def"] {
            assert!(sink.push(Bytes::from_static(part), &progress));
        }
        assert_eq!(written(&progress), None, "a small chunk is held");
        let (size, digest) = sink.finish(&progress).unwrap();
        assert_eq!(
            (size, digest),
            (6, Digest::of(Algorithm::Sha256, b"abcdef"))
        );
        assert_eq!(std::fs::read(spool.path()).unwrap(), b"abcdef");
    }

    #[tokio::test]
    async fn empty_chunks_are_no_write() {
        let dir = tempfile::tempdir().unwrap();
        let (mut sink, spool, progress) = sink(&dir);
        for part in [&b"abc"[..], b"", b"def", b""] {
            assert!(sink.push(Bytes::from_static(part), &progress));
            assert!(sink.flush(&progress), "after {part:?}");
        }
        // A body's last frame, empty, alone in its batch.
        assert!(sink.push(Bytes::new(), &progress));
        let (size, digest) = sink.finish(&progress).unwrap();
        assert_eq!(
            (size, digest),
            (6, Digest::of(Algorithm::Sha256, b"abcdef"))
        );
        assert_eq!(std::fs::read(spool.path()).unwrap(), b"abcdef");
    }

    #[tokio::test]
    async fn tiny_chunks_are_written_a_bounded_number_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let (mut sink, spool, progress) = sink(&dir);
        for i in 0..BATCH_CHUNKS * 3 {
            assert!(sink.push(Bytes::from(vec![i as u8]), &progress));
        }
        assert_eq!(written(&progress), Some(3 * BATCH_CHUNKS as u64));
        assert_eq!(sink.finish(&progress).unwrap().0, 3 * BATCH_CHUNKS as u64);
        let len = std::fs::metadata(spool.path()).unwrap().len();
        assert_eq!(len, 3 * BATCH_CHUNKS as u64);
    }
}
