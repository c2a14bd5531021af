//! Hit or miss: what is answered from disk, what from upstream, and how a
//! miss is filled exactly once.
//!
//! A blob miss starts one [`Fill`]: a task that streams the upstream body into
//! a temp file, hashing beside the write, and commits only a verified blob.
//! Every request for that digest, first or later, GET or HEAD, with or
//! without Range, attaches to the fill and reads the growing file as bytes
//! land; the fill does not depend on any client staying. The last byte is
//! held back until size and digest check out: if the fill fails, attached
//! readers get an error (an aborted body), never wrong bytes as complete.
//!
//! Manifests by digest are immutable and served from disk. Tags map to a
//! digest on disk, revalidated with one upstream HEAD once older than the
//! freshness window; when upstream cannot answer, the cached digest is served.
//! Concurrent requests for one tag or one missing digest share one exchange.

use std::collections::HashMap;
use std::fs::File;
use std::future::Future;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use futures_util::future::{BoxFuture, FutureExt, Shared};
use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use http::Method;
use tokio::sync::{mpsc, watch};

use crate::error::RegistryError;
use crate::metrics::Metrics;
use crate::reference::{Digest, Hasher, Name, Reference, Tag};
use crate::storage::{self, Manifest, Store};
use crate::upstream::{self, Kind, Upstream, MANIFEST_ACCEPT};

/// Largest manifest accepted from upstream (distribution's own limit).
const MAX_MANIFEST_BYTES: u64 = 4 << 20;
/// Read size when streaming a blob that is being filled.
const READ_CHUNK: usize = 128 << 10;
/// Least a reader of a growing blob reads at once, unless at its end.
const MIN_GROWING_READ: u64 = 64 << 10;
/// Read size when streaming a committed blob: large reads, few wake-ups.
const SEQUENTIAL_CHUNK: usize = 512 << 10;
/// Chunks queued between the upstream reader and the disk writer.
const WRITE_QUEUE: usize = 16;

/// How a response was produced, for `X-Cache` and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Hit,
    Miss,
    Revalidated,
    Stale,
}

impl Outcome {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Miss => "miss",
            Outcome::Revalidated => "revalidated",
            Outcome::Stale => "stale",
        }
    }

    /// The `X-Cache` header value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Hit => "HIT",
            Outcome::Miss => "MISS",
            Outcome::Revalidated => "REVALIDATED",
            Outcome::Stale => "STALE",
        }
    }
}

/// The state of a blob's bytes, as readers see it.
#[derive(Debug, Clone)]
enum Progress {
    /// Waiting for upstream's response headers.
    Starting,
    /// `written` bytes are in the file; `total` if upstream said.
    Writing { written: u64, total: Option<u64> },
    /// Complete and verified.
    Done { size: u64 },
    /// Nothing will be committed; readers must fail.
    Failed(RegistryError),
}

/// One in-flight upstream fetch of a blob.
struct Fill {
    file: Arc<File>,
    progress: watch::Receiver<Progress>,
}

impl Fill {
    /// A reader of this fill's bytes. A fill that is verified and only
    /// waiting for its rename counts as a hit: its bytes are local and checked.
    fn attach(&self) -> Blob {
        let verified = matches!(*self.progress.borrow(), Progress::Done { .. });
        Blob {
            file: self.file.clone(),
            progress: self.progress.clone(),
            outcome: if verified {
                Outcome::Hit
            } else {
                Outcome::Miss
            },
        }
    }
}

/// A readable blob: committed on disk or being filled.
pub struct Blob {
    file: Arc<File>,
    progress: watch::Receiver<Progress>,
    pub outcome: Outcome,
}

impl Blob {
    /// A committed blob from `store`, or `None` when it is not there.
    pub fn stored(store: &Store, digest: &Digest) -> Result<Option<Blob>, storage::Error> {
        let path = store.blob_path(digest);
        match File::open(&path) {
            Ok(f) => {
                let size = f
                    .metadata()
                    .map_err(|source| storage::Error::Io {
                        op: "stat",
                        path: path.clone(),
                        source,
                    })?
                    .len();
                let (_, rx) = watch::channel(Progress::Done { size });
                Ok(Some(Blob {
                    file: Arc::new(f),
                    progress: rx,
                    outcome: Outcome::Hit,
                }))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(storage::Error::Io {
                op: "open",
                path,
                source,
            }),
        }
    }

    /// Waits until the size is known or the fill failed before sending a
    /// byte; `Ok(None)` means upstream sent no length.
    pub async fn size(&mut self) -> Result<Option<u64>, RegistryError> {
        loop {
            match &*self.progress.borrow_and_update() {
                Progress::Starting => {}
                Progress::Writing { total, .. } => return Ok(*total),
                Progress::Done { size } => return Ok(Some(*size)),
                Progress::Failed(e) => return Err(e.clone()),
            }
            if self.progress.changed().await.is_err() {
                return Err(abandoned());
            }
        }
    }

    /// The bytes `start..end` (to the end of the blob when `end` is `None`),
    /// streamed as soon as they are on disk.
    pub fn read(self, start: u64, end: Option<u64>) -> BoxStream<'static, io::Result<Bytes>> {
        // A committed blob that only this reader holds: plain sequential reads,
        // which (unlike positioned ones) need no zeroed buffer.
        let done = match *self.progress.borrow() {
            Progress::Done { size } => Some(size),
            _ => None,
        };
        let Blob { file, progress, .. } = self;
        match (done, Arc::try_unwrap(file)) {
            (Some(size), Ok(file)) => {
                read_sequential(file, start, end.map_or(size, |e| e.min(size))).boxed()
            }
            (_, Ok(file)) => read_growing(Arc::new(file), progress, start, end).boxed(),
            (_, Err(file)) => read_growing(file, progress, start, end).boxed(),
        }
    }
}

/// Reads a file that a fill may still be writing, at explicit offsets (the
/// writer owns the file position), as far as the fill's progress allows.
fn read_growing(
    file: Arc<File>,
    progress: watch::Receiver<Progress>,
    start: u64,
    end: Option<u64>,
) -> impl futures_util::Stream<Item = io::Result<Bytes>> + Send + 'static {
    let state = (file, progress, start);
    futures_util::stream::unfold(Some(state), move |state| async move {
        let (file, mut progress, pos) = state?;
        loop {
            let mut finished = false;
            let available = match &*progress.borrow_and_update() {
                Progress::Starting => 0,
                // The last byte waits for verification, so that a
                // failed fill can never look complete to a client.
                Progress::Writing { written, total } => {
                    total.map_or(*written, |t| (*written).min(t.saturating_sub(1)))
                }
                Progress::Done { size } => {
                    finished = true;
                    *size
                }
                Progress::Failed(e) => {
                    let err = io::Error::other(e.message.clone());
                    return Some((Err(err), None));
                }
            };
            let limit = end.map_or(available, |e| e.min(available));
            // Chasing the writer chunk by chunk costs a thread hop per few
            // KiB: wait for a useful amount unless nothing more will come.
            let last = finished || end.is_some_and(|e| limit >= e);
            if pos < limit && (last || limit - pos >= MIN_GROWING_READ) {
                let len = (limit - pos).min(READ_CHUNK as u64) as usize;
                // These bytes were just written: the read is a copy from the
                // page cache, cheaper here than a hop to the blocking pool
                // (whose many threads each keep their own malloc arena).
                let mut buf = BytesMut::zeroed(len);
                let read = file.read_exact_at(&mut buf, pos).map(|()| buf.freeze());
                return match read {
                    Ok(bytes) => Some((Ok(bytes), Some((file, progress, pos + len as u64)))),
                    Err(e) => Some((Err(e), None)),
                };
            }
            if finished || end.is_some_and(|e| pos >= e) {
                return None;
            }
            if progress.changed().await.is_err() {
                return Some((Err(io::Error::other("blob fill abandoned")), None));
            }
        }
    })
}

/// Streams `start..end` of a committed blob in large sequential reads.
fn read_sequential(
    file: File,
    start: u64,
    end: u64,
) -> impl futures_util::Stream<Item = io::Result<Bytes>> + Send + 'static {
    use std::io::{Read, Seek, SeekFrom};
    let state = Some((file, start, true));
    futures_util::stream::unfold(state, move |state| async move {
        let (file, pos, first) = state?;
        if pos >= end {
            return None;
        }
        let len = (end - pos).min(SEQUENTIAL_CHUNK as u64);
        let read = tokio::task::spawn_blocking(move || {
            let mut file = file;
            if first {
                file.seek(SeekFrom::Start(pos))?;
            }
            let mut buf = Vec::with_capacity(len as usize);
            (&mut file).take(len).read_to_end(&mut buf)?;
            if (buf.len() as u64) < len {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "blob file shorter than its size",
                ));
            }
            Ok((file, Bytes::from(buf)))
        })
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e)));
        match read {
            Ok((file, bytes)) => Some((Ok(bytes), Some((file, pos + len, false)))),
            Err(e) => Some((Err(e), None)),
        }
    })
}

fn abandoned() -> RegistryError {
    RegistryError::new(
        http::StatusCode::BAD_GATEWAY,
        crate::error::ErrorCode::Unavailable,
        "the blob's upstream fetch ended without a result",
    )
}

/// The cache of one worker: its store, its upstream and the fills in flight.
pub struct Cache {
    store: Arc<Store>,
    upstream: Arc<Upstream>,
    fills: Arc<Mutex<HashMap<Digest, Arc<Fill>>>>,
    tag_freshness: Duration,
    metrics: Arc<Metrics>,
    /// The fill tasks, so that shutdown can wait for them.
    fill_tasks: tokio_util::task::TaskTracker,
    /// Manifest fetches and tag revalidations in flight, by digest or name:tag.
    manifest_flights: Flights<Result<(Manifest, Outcome), upstream::Error>>,
}

/// Concurrent callers with the same key share one run of the work (the
/// first caller's); later callers start afresh once it has finished.
struct Flights<T> {
    running: Mutex<HashMap<String, Shared<BoxFuture<'static, T>>>>,
}

impl<T> Default for Flights<T> {
    fn default() -> Self {
        Flights {
            running: Mutex::new(HashMap::new()),
        }
    }
}

impl<T: Clone + Send + Sync + 'static> Flights<T> {
    async fn run(&self, key: String, work: impl Future<Output = T> + Send + 'static) -> T {
        let flight = self
            .running
            .lock()
            .unwrap()
            .entry(key.clone())
            .or_insert_with(|| work.boxed().shared())
            .clone();
        let out = flight.clone().await;
        let mut running = self.running.lock().unwrap();
        if running.get(&key).is_some_and(|f| f.ptr_eq(&flight)) {
            running.remove(&key);
        }
        out
    }
}

impl Cache {
    pub fn new(
        store: Store,
        upstream: Upstream,
        tag_freshness: Duration,
        metrics: Arc<Metrics>,
    ) -> Self {
        Cache {
            store: Arc::new(store),
            upstream: Arc::new(upstream),
            fills: Arc::default(),
            tag_freshness,
            metrics,
            fill_tasks: tokio_util::task::TaskTracker::new(),
            manifest_flights: Flights::default(),
        }
    }

    pub fn upstream(&self) -> &Upstream {
        &self.upstream
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Waits until every blob fill that has started is committed or has
    /// failed, so that shutdown does not throw away a download.
    pub async fn drain_fills(&self) {
        self.fill_tasks.close();
        self.fill_tasks.wait().await;
    }

    /// A blob for GET: from disk, from a fill in flight, or from a new fill.
    pub fn blob(&self, name: &Name, digest: &Digest) -> Result<Blob, RegistryError> {
        if let Some(blob) = self.stored_blob(digest)? {
            return Ok(blob);
        }
        let mut fills = self.fills.lock().unwrap();
        if let Some(fill) = fills.get(digest) {
            return Ok(fill.attach());
        }
        // A fill commits before it leaves the map: check disk again under the lock.
        if let Some(blob) = self.stored_blob(digest)? {
            return Ok(blob);
        }
        let tmp = self.store.temp_file()?;
        let (tx, rx) = watch::channel(Progress::Starting);
        let fill = Arc::new(Fill {
            file: tmp.file().clone(),
            progress: rx,
        });
        fills.insert(digest.clone(), fill.clone());
        drop(fills);
        self.fill_tasks
            .spawn(tracing::Instrument::in_current_span(run_fill(
                self.store.clone(),
                self.upstream.clone(),
                self.fills.clone(),
                self.metrics.clone(),
                name.clone(),
                digest.clone(),
                tmp,
                tx,
            )));
        Ok(fill.attach())
    }

    fn stored_blob(&self, digest: &Digest) -> Result<Option<Blob>, storage::Error> {
        Blob::stored(&self.store, digest)
    }
    /// A blob's size for HEAD, without downloading it: from disk, a fill in
    /// flight, or an upstream HEAD.
    pub async fn blob_size(
        &self,
        name: &Name,
        digest: &Digest,
    ) -> Result<(Option<u64>, Outcome), RegistryError> {
        if let Some(size) = self.store.blob_size(digest) {
            return Ok((Some(size), Outcome::Hit));
        }
        let fill = self.fills.lock().unwrap().get(digest).cloned();
        if let Some(fill) = fill {
            let mut blob = fill.attach();
            return Ok((blob.size().await?, blob.outcome));
        }
        let up = &self.upstream;
        let path = format!("/v2/{name}/blobs/{digest}");
        let resp = up.send(Method::HEAD, Some(name), &path, None).await?;
        let resp = up.check(resp, Kind::Blob, &digest.to_string())?;
        // Not `content_length()`: that is the (empty) HEAD body's length.
        let size = resp
            .headers()
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        Ok((size, Outcome::Miss))
    }

    /// A manifest by tag or digest.
    pub async fn manifest(
        self: &Arc<Self>,
        name: &Name,
        reference: &Reference,
    ) -> Result<(Manifest, Outcome), RegistryError> {
        match reference {
            Reference::Digest(d) => {
                // Manifests are small and usually in the page cache.
                if let Some(m) = self.store.read_manifest(d)? {
                    return Ok((m, Outcome::Hit));
                }
                Ok((self.fetch_by_digest(name, d).await?, Outcome::Miss))
            }
            Reference::Tag(tag) => self.manifest_by_tag(name, tag).await,
        }
    }

    async fn manifest_by_tag(
        self: &Arc<Self>,
        name: &Name,
        tag: &Tag,
    ) -> Result<(Manifest, Outcome), RegistryError> {
        let cached = self.store.read_tag(name, tag);
        let cached_manifest = match &cached {
            Some((d, _)) => self.store.read_manifest(d)?,
            None => None,
        };
        if let (Some((_, confirmed)), Some(m)) = (&cached, &cached_manifest) {
            let age = SystemTime::now()
                .duration_since(*confirmed)
                .unwrap_or_default();
            if age < self.tag_freshness {
                return Ok((m.clone(), Outcome::Hit));
            }
        }
        // Clients asking for one tag at once share one upstream revalidation.
        let (cache, n, t, m) = (
            self.clone(),
            name.clone(),
            tag.clone(),
            cached_manifest.clone(),
        );
        let revalidate = async move { cache.revalidate(&n, &t, m.as_ref()).await };
        let key = format!("{name}:{tag}");
        match self.manifest_flights.run(key, revalidate).await {
            Ok(found) => Ok(found),
            Err(e) if e.allows_stale() && cached_manifest.is_some() => {
                self.metrics.stale_served.inc();
                tracing::warn!(%name, %tag, error = %e, "upstream unavailable; serving cached tag");
                Ok((cached_manifest.unwrap(), Outcome::Stale))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// GETs a manifest by digest; concurrent callers share one request.
    async fn fetch_by_digest(
        self: &Arc<Self>,
        name: &Name,
        d: &Digest,
    ) -> Result<Manifest, upstream::Error> {
        let (cache, name, digest) = (self.clone(), name.clone(), d.clone());
        let fetch = async move {
            let m = cache
                .fetch_manifest(&name, &digest.to_string(), Some(&digest))
                .await?;
            Ok((m, Outcome::Miss))
        };
        let (m, _) = self.manifest_flights.run(d.to_string(), fetch).await?;
        Ok(m)
    }

    /// Asks upstream what `tag` points to now (a HEAD, which Docker Hub does not
    /// count as a pull) and GETs the manifest only if we do not have it.
    async fn revalidate(
        self: &Arc<Self>,
        name: &Name,
        tag: &Tag,
        cached: Option<&Manifest>,
    ) -> Result<(Manifest, Outcome), upstream::Error> {
        let up = &self.upstream;
        let path = format!("/v2/{name}/manifests/{tag}");
        let resp = up
            .send(Method::HEAD, Some(name), &path, Some(MANIFEST_ACCEPT))
            .await?;
        let what = format!("manifest {name}:{tag}");
        let resp = up.check(resp, Kind::Manifest, &what)?;
        let digest: Option<Digest> = header_digest(&resp);
        let manifest = match digest {
            Some(d) if cached.is_some_and(|m| m.digest == d) => {
                let m = cached.cloned().expect("checked above");
                self.store_tag(name, tag, &m.digest);
                return Ok((m, Outcome::Revalidated));
            }
            Some(d) => match self.store.read_manifest(&d).ok().flatten() {
                Some(m) => m,
                None => self.fetch_by_digest(name, &d).await?,
            },
            // No digest in the HEAD answer: fetch by tag and hash what we got.
            None => self.fetch_manifest(name, tag.as_str(), None).await?,
        };
        self.store_tag(name, tag, &manifest.digest);
        let outcome = if cached.is_some() {
            Outcome::Revalidated
        } else {
            Outcome::Miss
        };
        Ok((manifest, outcome))
    }

    fn store_tag(&self, name: &Name, tag: &Tag, digest: &Digest) {
        if let Err(e) = self.store.write_tag(name, tag, digest) {
            tracing::error!(%name, %tag, error = %e, "could not record tag");
        }
    }

    /// GETs a manifest, verifies it against `expected` (or the upstream's
    /// `Docker-Content-Digest`) and stores it byte for byte.
    async fn fetch_manifest(
        &self,
        name: &Name,
        reference: &str,
        expected: Option<&Digest>,
    ) -> Result<Manifest, upstream::Error> {
        let up = &self.upstream;
        let path = format!("/v2/{name}/manifests/{reference}");
        let resp = up
            .send(Method::GET, Some(name), &path, Some(MANIFEST_ACCEPT))
            .await?;
        let resp = up.check(
            resp,
            Kind::Manifest,
            &format!("manifest {name}:{reference}"),
        )?;
        if resp
            .content_length()
            .is_some_and(|l| l > MAX_MANIFEST_BYTES)
        {
            return Err(up.garbage("manifest larger than 4 MiB"));
        }
        let media_type = resp
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or("").trim().to_owned())
            .filter(|v| !v.is_empty() && !v.contains('\n'))
            .ok_or_else(|| up.garbage("manifest without Content-Type"))?;
        let announced = header_digest(&resp);
        let mut bytes = BytesMut::new();
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            bytes.extend_from_slice(&chunk.map_err(|e| up.transport(e))?);
            if bytes.len() as u64 > MAX_MANIFEST_BYTES {
                return Err(up.garbage("manifest larger than 4 MiB"));
            }
        }
        let bytes = bytes.freeze();
        let want = expected.or(announced.as_ref());
        let algorithm = want.map_or(crate::reference::Algorithm::Sha256, Digest::algorithm);
        let digest = Digest::of(algorithm, &bytes);
        if let Some(want) = want {
            if *want != digest {
                return Err(upstream::Error::Mismatch {
                    upstream: up.name().to_owned(),
                    expected: want.to_string(),
                    actual: digest.to_string(),
                });
            }
        }
        let m = Manifest {
            media_type,
            bytes,
            digest,
        };
        let stored = self
            .store
            .write_manifest(&m)
            .and_then(|()| self.store.link_manifest(name, &m.digest));
        if let Err(e) = stored {
            tracing::error!(error = %e, "could not store manifest");
        }
        Ok(m)
    }

    /// Forwards a request that is not cached (tags/list, referrers).
    pub async fn forward(
        &self,
        name: &Name,
        path_and_query: &str,
    ) -> Result<reqwest::Response, upstream::Error> {
        let up = &self.upstream;
        let resp = up
            .send(Method::GET, Some(name), path_and_query, None)
            .await?;
        // A 401 after our own auth is upstream refusing us, not the client;
        // a 5xx is upstream failing (the caller may answer from cache).
        match resp.status().as_u16() {
            401 | 403 | 429 | 500..=599 => {
                Err(up.check(resp, Kind::Other, name.as_str()).unwrap_err())
            }
            _ => Ok(resp),
        }
    }
}

fn header_digest(resp: &reqwest::Response) -> Option<Digest> {
    resp.headers()
        .get("docker-content-digest")?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Streams one blob from upstream into `tmp` and commits it if it verifies.
#[allow(clippy::too_many_arguments)]
async fn run_fill(
    store: Arc<Store>,
    upstream: Arc<Upstream>,
    fills: Arc<Mutex<HashMap<Digest, Arc<Fill>>>>,
    metrics: Arc<Metrics>,
    name: Name,
    digest: Digest,
    tmp: storage::TempFile,
    progress: watch::Sender<Progress>,
) {
    metrics.fills_in_flight.inc();
    let started = std::time::Instant::now();
    let result = fill(&store, &upstream, &name, &digest, tmp, &progress).await;
    metrics.fills_in_flight.dec();
    match result {
        Ok(_) => metrics.fill_seconds(started.elapsed().as_secs_f64()),
        Err(e) => {
            metrics.fill_failures.inc();
            tracing::warn!(%name, %digest, error = %e.message, "blob fill failed");
            progress.send_replace(Progress::Failed(e));
        }
    }
    // Only now: a request that misses the map finds the blob on disk.
    fills.lock().unwrap().remove(&digest);
}

/// Fetches the blob into `tmp`: written and hashed in parallel, off the
/// async threads. Readers follow what is written; the last byte is released
/// (Done) as soon as size and digest check out, before the fsync and rename
/// that make the blob visible to later requests.
async fn fill(
    store: &Arc<Store>,
    up: &Upstream,
    name: &Name,
    digest: &Digest,
    tmp: storage::TempFile,
    progress: &watch::Sender<Progress>,
) -> Result<u64, RegistryError> {
    let path = format!("/v2/{name}/blobs/{digest}");
    let resp = up.send(Method::GET, Some(name), &path, None).await?;
    let resp = up.check(resp, Kind::Blob, &digest.to_string())?;
    let total = resp.content_length();
    progress.send_replace(Progress::Writing { written: 0, total });

    // Bounded queues: a slow disk slows the upstream read, never a client.
    let (to_disk, mut disk_rx) = mpsc::channel::<Bytes>(WRITE_QUEUE);
    let (to_hash, mut hash_rx) = mpsc::channel::<Bytes>(WRITE_QUEUE);
    let file = tmp.file().clone();
    let watcher = progress.clone();
    let writer = tokio::task::spawn_blocking(move || -> io::Result<u64> {
        use std::io::Write;
        let mut written = 0u64;
        while let Some(chunk) = disk_rx.blocking_recv() {
            (&*file).write_all(&chunk)?;
            written += chunk.len() as u64;
            // Wake readers once per batch, not once per network chunk.
            while let Ok(more) = disk_rx.try_recv() {
                (&*file).write_all(&more)?;
                written += more.len() as u64;
            }
            watcher.send_replace(Progress::Writing { written, total });
        }
        Ok(written)
    });
    let algorithm = digest.algorithm();
    let hasher = tokio::task::spawn_blocking(move || {
        let mut hasher = Hasher::new(algorithm);
        while let Some(chunk) = hash_rx.blocking_recv() {
            hasher.update(&chunk);
        }
        hasher.finish()
    });
    let mut stream = resp.bytes_stream();
    let mut received = 0u64;
    let mut failure = None;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(chunk) => {
                received += chunk.len() as u64;
                if total.is_some_and(|t| received > t) {
                    failure = Some(up.garbage("blob longer than its Content-Length"));
                    break;
                }
                let queued = to_hash.send(chunk.clone()).await.is_ok();
                if !queued || to_disk.send(chunk).await.is_err() {
                    break; // the writer failed; its error is reported below
                }
            }
            Err(e) => {
                failure = Some(up.transport(e));
                break;
            }
        }
    }
    drop((to_disk, to_hash));
    let written = writer
        .await
        .map_err(io::Error::other)
        .and_then(|r| r)
        .map_err(|source| storage::Error::Io {
            op: "write",
            path: tmp.path().to_owned(),
            source,
        })?;
    let actual = hasher.await.map_err(|e| storage::Error::Io {
        op: "hash",
        path: tmp.path().to_owned(),
        source: io::Error::other(e),
    })?;
    if let Some(f) = failure {
        return Err(f.into());
    }
    if total.is_some_and(|t| written != t) {
        return Err(up.garbage("blob shorter than its Content-Length").into());
    }
    if actual != *digest {
        return Err(upstream::Error::Mismatch {
            upstream: up.name().to_owned(),
            expected: digest.to_string(),
            actual: actual.to_string(),
        }
        .into());
    }
    // Verified: attached clients may have their last byte now.
    progress.send_replace(Progress::Done { size: written });
    let store = store.clone();
    let expected = digest.clone();
    tokio::task::spawn_blocking(move || store.commit_blob(tmp, &expected, actual))
        .await
        .map_err(|e| storage::Error::Io {
            op: "commit",
            path: Default::default(),
            source: io::Error::other(e),
        })??;
    Ok(written)
}
