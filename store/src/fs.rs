//! The filesystem store: one directory per upstream.
//!
//! ```text
//! blobs/sha256/ab/<hex>            blob bytes, exactly as upstream sent them
//! manifests/sha256/ab/<hex>        "<media type>\n" + the manifest bytes
//! repositories/<name>/_tags/<tag>  "<digest>\n<confirmed, ms since the epoch>\n"
//! repositories/<name>/_manifests/<digest>  empty: this repository has that manifest
//! repositories/<name>/_blobs/<digest>      empty: this repository has that blob
//! tmp/                             spools (same filesystem: commits are renames)
//! ```
//! Every write goes to a spool, is fsynced and renamed into place, so a
//! reader sees a whole file or none. A file's modification time is when it
//! was last used (or stored). `_tags` and `_manifests` cannot collide with a
//! repository component (those never start with `_`); paths are built only
//! from validated names, tags and digests, so none leaves the root.
//!
//! Small reads (manifests, tags) run on the calling thread: they are a page
//! cache copy, cheaper than a hop to the blocking pool. Fsyncs, renames and
//! directory walks go to the blocking pool.

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;

use crate::index::{Index, ManifestEntry};
use crate::policy::Disk;
use crate::spool::SpoolDir;
use crate::{
    BlobReader, Digest, Error, Key, Manifest, Name, Repository, Result, Store, Tag, TagRecord,
    Usage, Verified,
};

/// The exclusive hold on a store root taken by [`FsStore::lock`].
#[derive(Debug)]
pub struct RootLock {
    _file: File,
}

/// The filesystem store of one upstream.
#[derive(Clone)]
pub struct FsStore {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    /// `None` for a read-only view.
    spools: Option<SpoolDir>,
    /// Counted once on first use (off the start path), then kept up to date.
    usage: Mutex<Option<Usage>>,
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> Error + 'a {
    move |source| Error::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// Runs blocking filesystem work off the async threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(Error::Io {
            op: "run",
            path: PathBuf::new(),
            source: io::Error::other(e),
        })
    })
}

/// The spool directory under a root.
const SPOOLS: &str = "tmp";

impl FsStore {
    /// Opens (creating) the store at `root`; abandoned spools in `tmp/` are
    /// removed, live ones (another process's) left alone.
    pub fn open(root: impl Into<PathBuf>) -> Result<FsStore> {
        let root = root.into();
        for dir in ["blobs", "manifests", "repositories"] {
            let p = root.join(dir);
            fs::create_dir_all(&p).map_err(io_err("create", &p))?;
        }
        let tmp = root.join(SPOOLS);
        let spools = SpoolDir::open(&tmp).map_err(io_err("open", &tmp))?;
        Ok(FsStore::new(root, Some(spools)))
    }

    /// Takes the exclusive lock of the store at `root` (`<root>/.lock`, held
    /// until the [`RootLock`] is dropped or the process dies): one writer per
    /// local root. `Ok(None)`: another process holds it.
    pub fn lock(root: &Path) -> Result<Option<RootLock>> {
        fs::create_dir_all(root).map_err(io_err("create", root))?;
        let path = root.join(".lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err("open", &path))?;
        match file.try_lock() {
            Ok(()) => Ok(Some(RootLock { _file: file })),
            Err(fs::TryLockError::WouldBlock) => Ok(None),
            Err(fs::TryLockError::Error(e)) => Err(io_err("lock", &path)(e)),
        }
    }

    /// A read-only view of a store another process owns (the front's hit
    /// path): nothing is created or cleaned, writes fail, reads and `touch`
    /// work.
    pub fn view(root: impl Into<PathBuf>) -> FsStore {
        FsStore::new(root.into(), None)
    }

    fn new(root: PathBuf, spools: Option<SpoolDir>) -> FsStore {
        FsStore {
            inner: Arc::new(Inner {
                root,
                spools,
                usage: Mutex::new(None),
            }),
        }
    }

    /// Where fills spool before committing here (`None` for a view).
    pub fn spools(&self) -> Option<&SpoolDir> {
        self.inner.spools.as_ref()
    }

    /// Is the manifest stored? One `stat`: for a reader that keeps verified
    /// manifests in memory and must not serve one evicted from here.
    pub fn has_manifest(&self, digest: &Digest) -> bool {
        fs::symlink_metadata(self.path_of(&Key::Manifest(digest.clone()))).is_ok()
    }

    /// A spool of this store's fills, opened to read (the front following a
    /// fill its worker names; see `regcache_protocol::follow`). `None`: not
    /// a spool name.
    pub fn spool_file(&self, name: &str) -> Option<io::Result<File>> {
        regcache_protocol::follow::valid_spool_name(name)
            .then(|| File::open(self.inner.root.join(SPOOLS).join(name)))
    }

    /// A committed blob's file and size (for uploads to another tier).
    pub fn blob_file(&self, digest: &Digest) -> Result<Option<(File, u64)>> {
        let path = self.path_of(&Key::Blob(digest.clone()));
        match File::open(&path) {
            Ok(f) => {
                let size = f.metadata().map_err(io_err("stat", &path))?.len();
                Ok(Some((f, size)))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("open", &path)(e)),
        }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// Everything stored, read from disk (blocking: a walk of the root).
    /// Sizes are file sizes; last use is the file time.
    pub fn scan(&self) -> Index {
        let mut index = Index::default();
        let root = &self.inner.root;
        for (d, _, meta) in walk_digests(&root.join("blobs")) {
            index.add_blob(d, meta.len(), meta.modified().unwrap_or(UNIX_EPOCH));
        }
        for (d, path, meta) in walk_digests(&root.join("manifests")) {
            // A corrupt manifest is fsck's to find; here it holds nothing.
            let Ok(m) = fs::read(&path)
                .map_err(|_| ())
                .and_then(|raw| parse_manifest(&d, raw).map_err(|_| ()))
            else {
                continue;
            };
            let used = meta.modified().unwrap_or(UNIX_EPOCH);
            index.add_manifest(d, ManifestEntry::of(&m, meta.len(), used));
        }
        for (name, repo) in walk_repositories(&root.join("repositories")) {
            for (tag, rec) in repo.tags {
                index.set_tag(name.clone(), tag, rec.digest);
            }
        }
        index
    }

    /// When `key` was last used, now, on disk (blocking).
    pub fn mtime(&self, key: &Key) -> Option<SystemTime> {
        fs::metadata(self.path_of(key))
            .and_then(|m| m.modified())
            .ok()
    }

    /// Removes `key` now (blocking); the bytes it held.
    pub fn remove_now(&self, key: &Key) -> Result<u64> {
        self.writable()?;
        let path = self.path_of(key);
        let size = match fs::metadata(&path) {
            Ok(m) => m.len(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(io_err("stat", &path)(e)),
        };
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(io_err("remove", &path)(e)),
        }
        match key {
            Key::Blob(_) => self.count(-(size as i64), -1, 0),
            Key::Manifest(_) => self.count(-(size as i64), 0, -1),
            Key::Tag(..) => return Ok(0),
        }
        Ok(size)
    }

    /// The filesystem the store is on (`statvfs`).
    pub fn disk(&self) -> Option<Disk> {
        let st = nix::sys::statvfs::statvfs(&self.inner.root).ok()?;
        let frag = st.fragment_size() as u64;
        Some(Disk {
            total: st.blocks() as u64 * frag,
            available: st.blocks_available() as u64 * frag,
        })
    }

    fn writable(&self) -> Result<&SpoolDir> {
        self.inner.spools.as_ref().ok_or_else(|| Error::Io {
            op: "write",
            path: self.inner.root.clone(),
            source: io::Error::new(io::ErrorKind::PermissionDenied, "read-only view"),
        })
    }

    fn sharded(&self, kind: &str, d: &Digest) -> PathBuf {
        self.inner
            .root
            .join(kind)
            .join(d.algorithm().as_str())
            .join(&d.hex()[..2])
            .join(d.hex())
    }

    fn repo_dir(&self, name: &Name) -> PathBuf {
        let mut p = self.inner.root.join("repositories");
        p.extend(name.components());
        p
    }

    /// `_blobs/<digest>` or `_manifests/<digest>` of a repository (a tag
    /// links nothing: it is the repository's own).
    fn link_path(&self, name: &Name, key: &Key) -> PathBuf {
        let (dir, digest) = match key {
            Key::Blob(d) => ("_blobs", d.to_string()),
            Key::Manifest(d) => ("_manifests", d.to_string()),
            Key::Tag(_, tag) => ("_tags", tag.to_string()),
        };
        self.repo_dir(name).join(dir).join(digest)
    }

    fn path_of(&self, key: &Key) -> PathBuf {
        match key {
            Key::Blob(d) => self.sharded("blobs", d),
            Key::Manifest(d) => self.sharded("manifests", d),
            Key::Tag(name, tag) => self.repo_dir(name).join("_tags").join(tag.as_str()),
        }
    }

    /// Adds to the usage, if it has been counted.
    fn count(&self, bytes: i64, blobs: i64, manifests: i64) {
        if let Some(u) = self.inner.usage.lock().unwrap().as_mut() {
            u.bytes = u.bytes.saturating_add_signed(bytes);
            u.blobs = u.blobs.saturating_add_signed(blobs);
            u.manifests = u.manifests.saturating_add_signed(manifests);
        }
    }

    /// Writes `bytes` to a spool and renames it to `dest`.
    fn write_file(&self, dest: &Path, bytes: &[&[u8]]) -> Result<()> {
        let spool = self.writable()?.create().map_err(io_err("create", dest))?;
        let mut f = &**spool.file();
        for b in bytes {
            f.write_all(b).map_err(io_err("write", spool.path()))?;
        }
        place(spool.file(), spool.path(), dest)?;
        spool.taken();
        Ok(())
    }
}

/// fsync, rename into place, fsync the directory: the file is whole and
/// durable under its final name, or absent. A fill's writeback is not
/// started early so that this fsync finds less to do: `sync_file_range`
/// every 8 MiB of a 256 MiB fill made a cold pull no faster (1.14x direct
/// against 1.08x, one interleaved run of 10 pulls each), and a build that
/// left the fsync out was no faster either (bench/README.md).
fn place(file: &File, from: &Path, dest: &Path) -> Result<()> {
    file.sync_all().map_err(io_err("fsync", from))?;
    let parent = dest.parent().expect("store paths have parents");
    fs::create_dir_all(parent).map_err(io_err("create", parent))?;
    fs::rename(from, dest).map_err(io_err("rename", dest))?;
    if let Ok(dir) = File::open(parent) {
        let _ = dir.sync_all();
    }
    Ok(())
}

fn millis(t: SystemTime) -> u128 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis()
}

/// The size of a manifest's file: its media type line and its bytes.
pub(crate) fn manifest_file_size(m: &Manifest) -> u64 {
    (m.media_type.len() + 1 + m.bytes.len()) as u64
}

/// A stored manifest file's contents (the same in every store).
pub(crate) fn parse_manifest(d: &Digest, raw: Vec<u8>) -> Result<Manifest> {
    let corrupt = |reason: &str| Error::Corrupt {
        what: format!("manifest {d}"),
        reason: reason.to_owned(),
    };
    let raw = Bytes::from(raw);
    let nl = raw
        .iter()
        .position(|&b| b == b'\n')
        .ok_or_else(|| corrupt("no media type line"))?;
    let media_type = std::str::from_utf8(&raw[..nl])
        .map_err(|_| corrupt("media type is not UTF-8"))?
        .to_owned();
    let m = Manifest {
        media_type,
        bytes: raw.slice(nl + 1..),
        digest: d.clone(),
    };
    if !m.verifies() {
        return Err(corrupt("bytes do not hash to the digest"));
    }
    Ok(m)
}

pub(crate) fn parse_tag(text: &str, modified: Option<SystemTime>) -> Option<TagRecord> {
    let mut lines = text.lines();
    let digest = lines.next()?.trim().parse().ok()?;
    let confirmed = match lines.next() {
        Some(ms) => UNIX_EPOCH + Duration::from_millis(ms.trim().parse().ok()?),
        // Written before tags carried their time: the file's time said it.
        None => modified?,
    };
    Some(TagRecord { digest, confirmed })
}

fn read_optional(path: &Path) -> Result<Option<Vec<u8>>> {
    match fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("read", path)(e)),
    }
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// (bytes, files) under `dir`, recursively.
fn dir_usage(dir: &Path) -> (u64, u64) {
    let mut total = (0, 0);
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => total = (total.0 + m.len(), total.1 + 1),
                Err(_) => {}
            }
        }
    }
    total
}

/// Every repository under `root` (`<store>/repositories`) with its tags and
/// manifest links.
fn walk_repositories(root: &Path) -> BTreeMap<Name, Repository> {
    let mut out: BTreeMap<Name, Repository> = BTreeMap::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).into_iter().flatten().flatten() {
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let fname = e.file_name().to_string_lossy().into_owned();
            let name = || -> Option<Name> { dir.strip_prefix(root).ok()?.to_str()?.parse().ok() };
            match fname.as_str() {
                "_tags" => {
                    let Some(name) = name() else { continue };
                    let repo = out.entry(name).or_default();
                    for t in names_in(&e.path()) {
                        let p = e.path().join(&t);
                        let (Ok(tag), Ok(text)) = (t.parse(), fs::read_to_string(&p)) else {
                            continue;
                        };
                        let modified = fs::metadata(&p).and_then(|m| m.modified()).ok();
                        if let Some(rec) = parse_tag(&text, modified) {
                            repo.tags.insert(tag, rec);
                        }
                    }
                }
                "_manifests" => {
                    let Some(name) = name() else { continue };
                    let repo = out.entry(name).or_default();
                    repo.manifests = names_in(&e.path())
                        .iter()
                        .filter_map(|d| d.parse().ok())
                        .collect();
                }
                "_blobs" => {}
                _ => stack.push(e.path()),
            }
        }
    }
    out
}

/// The digests stored under `dir` (`blobs` or `manifests`), with each
/// file's metadata; files whose names are not digests are skipped.
pub(crate) fn walk_digests(dir: &Path) -> Vec<(Digest, PathBuf, fs::Metadata)> {
    let mut out = Vec::new();
    for alg in fs::read_dir(dir).into_iter().flatten().flatten() {
        let alg_name = alg.file_name().to_string_lossy().into_owned();
        for shard in fs::read_dir(alg.path()).into_iter().flatten().flatten() {
            for e in fs::read_dir(shard.path()).into_iter().flatten().flatten() {
                let hex = e.file_name().to_string_lossy().into_owned();
                let (Ok(d), Ok(meta)) =
                    (format!("{alg_name}:{hex}").parse::<Digest>(), e.metadata())
                else {
                    continue;
                };
                if meta.is_file() {
                    out.push((d, e.path(), meta));
                }
            }
        }
    }
    out
}

#[async_trait]
impl Store for FsStore {
    fn describe(&self) -> String {
        format!("filesystem {}", self.inner.root.display())
    }

    async fn blob_size(&self, digest: &Digest) -> Result<Option<u64>> {
        let path = self.path_of(&Key::Blob(digest.clone()));
        match fs::metadata(&path) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("stat", &path)(e)),
        }
    }

    async fn blob_open(&self, digest: &Digest) -> Result<Option<BlobReader>> {
        let path = self.path_of(&Key::Blob(digest.clone()));
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("open", &path)(e)),
        };
        let size = file.metadata().map_err(io_err("stat", &path))?.len();
        Ok(Some(BlobReader::from_file(file, size)))
    }

    async fn blob_commit(&self, blob: Verified) -> Result<()> {
        self.writable()?;
        let dest = self.path_of(&Key::Blob(blob.digest().clone()));
        let store = self.clone();
        blocking(move || {
            // Another writer may have committed the same digest: the same bytes.
            let existed = dest.exists();
            let size = blob.size();
            let spool = blob.into_spool();
            place(spool.file(), spool.path(), &dest)?;
            spool.taken();
            if !existed {
                store.count(size as i64, 1, 0);
            }
            Ok(())
        })
        .await
    }

    async fn manifest_get(&self, digest: &Digest) -> Result<Option<Manifest>> {
        let path = self.path_of(&Key::Manifest(digest.clone()));
        match read_optional(&path)? {
            Some(raw) => parse_manifest(digest, raw).map(Some),
            None => Ok(None),
        }
    }

    async fn manifest_put(&self, m: &Manifest) -> Result<()> {
        if !m.verifies() {
            let actual = Digest::of(m.digest.algorithm(), &m.bytes);
            return Err(Error::Mismatch {
                expected: m.digest.clone(),
                actual,
            });
        }
        let dest = self.path_of(&Key::Manifest(m.digest.clone()));
        if dest.exists() {
            return Ok(());
        }
        let (store, m) = (self.clone(), m.clone());
        blocking(move || {
            // A media type never holds a newline (it came from a header value).
            store.write_file(&dest, &[m.media_type.as_bytes(), b"\n", &m.bytes])?;
            store.count(manifest_file_size(&m) as i64, 0, 1);
            Ok(())
        })
        .await
    }

    async fn tag_get(&self, name: &Name, tag: &Tag) -> Result<Option<TagRecord>> {
        let path = self.path_of(&Key::Tag(name.clone(), tag.clone()));
        let Some(raw) = read_optional(&path)? else {
            return Ok(None);
        };
        let modified = fs::metadata(&path).and_then(|m| m.modified()).ok();
        let text = String::from_utf8_lossy(&raw);
        parse_tag(&text, modified)
            .map(Some)
            .ok_or_else(|| Error::Corrupt {
                what: format!("tag {name}:{tag}"),
                reason: "not a digest and a time".into(),
            })
    }

    async fn tag_put(&self, name: &Name, tag: &Tag, record: &TagRecord) -> Result<()> {
        let dest = self.path_of(&Key::Tag(name.clone(), tag.clone()));
        let text = format!("{}\n{}\n", record.digest, millis(record.confirmed));
        let store = self.clone();
        blocking(move || store.write_file(&dest, &[text.as_bytes()])).await
    }

    async fn link(&self, name: &Name, key: &Key) -> Result<()> {
        self.writable()?;
        let path = self.link_path(name, key);
        if path.exists() {
            return Ok(());
        }
        let dir = path.parent().expect("link paths have parents");
        fs::create_dir_all(dir).map_err(io_err("create", dir))?;
        match OpenOptions::new().write(true).create_new(true).open(&path) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(io_err("create", &path)(e)),
        }
    }

    async fn linked(&self, name: &Name, key: &Key) -> Result<bool> {
        let path = self.link_path(name, key);
        match fs::symlink_metadata(&path) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io_err("stat", &path)(e)),
        }
    }

    async fn repositories(&self) -> Result<BTreeMap<Name, Repository>> {
        let root = self.inner.root.join("repositories");
        blocking(move || Ok(walk_repositories(&root))).await
    }

    async fn tags(&self, name: &Name) -> Result<Vec<Tag>> {
        let dir = self.repo_dir(name).join("_tags");
        Ok(names_in(&dir)
            .iter()
            .filter_map(|t| t.parse().ok())
            .collect())
    }

    async fn delete(&self, key: &Key) -> Result<()> {
        self.remove_now(key).map(|_| ())
    }

    async fn touch(&self, key: &Key, at: SystemTime) -> Result<()> {
        let path = self.path_of(key);
        match File::open(&path) {
            Ok(f) => f.set_modified(at).map_err(io_err("touch", &path)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("open", &path)(e)),
        }
    }

    async fn last_used(&self, key: &Key) -> Result<Option<SystemTime>> {
        let path = self.path_of(key);
        match fs::metadata(&path).and_then(|m| m.modified()) {
            Ok(t) => Ok(Some(t)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("stat", &path)(e)),
        }
    }

    async fn usage(&self) -> Result<Usage> {
        if let Some(u) = *self.inner.usage.lock().unwrap() {
            return Ok(u);
        }
        let root = self.inner.root.clone();
        let counted = blocking(move || {
            let (blob_bytes, blobs) = dir_usage(&root.join("blobs"));
            let (manifest_bytes, manifests) = dir_usage(&root.join("manifests"));
            Ok(Usage {
                bytes: blob_bytes + manifest_bytes,
                blobs,
                manifests,
            })
        })
        .await?;
        Ok(*self.inner.usage.lock().unwrap().get_or_insert(counted))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn contract() {
        crate::contract::run(|dir| {
            let store = FsStore::open(dir).unwrap();
            crate::contract::Subject {
                spools: store.spools().unwrap().clone(),
                store: Arc::new(store),
            }
        })
        .await;
    }

    #[tokio::test]
    async fn tags_written_before_times_were_stored_read_with_the_file_time() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::open(dir.path()).unwrap();
        let (name, tag): (Name, Tag) = ("a/b".parse().unwrap(), "1".parse().unwrap());
        let d = Digest::of(regcache_protocol::Algorithm::Sha256, b"x");
        let path = store.path_of(&Key::Tag(name.clone(), tag.clone()));
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, d.to_string()).unwrap();
        let rec = store.tag_get(&name, &tag).await.unwrap().unwrap();
        assert_eq!(rec.digest, d);
        assert_eq!(
            rec.confirmed,
            fs::metadata(&path).unwrap().modified().unwrap()
        );
    }

    #[tokio::test]
    async fn a_manifest_file_without_its_media_type_line_is_corrupt_not_misread() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::open(dir.path()).unwrap();
        let d = Digest::of(regcache_protocol::Algorithm::Sha256, b"{}");
        let path = store.path_of(&Key::Manifest(d.clone()));
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(&path, b"{}").unwrap();
        assert!(matches!(
            store.manifest_get(&d).await,
            Err(Error::Corrupt { .. })
        ));
    }

    proptest::proptest! {
        /// Whatever names, tags and digests validate, their paths stay
        /// inside the root and never climb.
        #[test]
        fn no_path_leaves_the_root(name in r"[a-z0-9._/-]{1,60}", tag in r"[a-zA-Z0-9._-]{1,40}", hex in "[0-9a-f]{64}") {
            let (Ok(name), Ok(tag)) = (name.parse::<Name>(), tag.parse::<Tag>()) else { return Ok(()) };
            let digest: Digest = format!("sha256:{hex}").parse().unwrap();
            let store = FsStore::view("/cache/root");
            let keys = [Key::Blob(digest.clone()), Key::Manifest(digest.clone()), Key::Tag(name.clone(), tag)];
            for key in &keys {
                for p in [store.path_of(key), store.link_path(&name, key)] {
                    proptest::prop_assert!(p.starts_with("/cache/root/"), "{}", p.display());
                    proptest::prop_assert!(p.components().all(|c| !matches!(c, std::path::Component::ParentDir | std::path::Component::CurDir)), "{}", p.display());
                }
            }
        }
    }

    #[test]
    fn one_root_lock_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let first = FsStore::lock(dir.path()).unwrap();
        assert!(first.is_some());
        assert!(
            FsStore::lock(dir.path()).unwrap().is_none(),
            "a second holder"
        );
        drop(first);
        assert!(
            FsStore::lock(dir.path()).unwrap().is_some(),
            "released on drop"
        );
    }

    #[tokio::test]
    async fn a_view_reads_but_never_writes() {
        let dir = tempfile::tempdir().unwrap();
        let owner = FsStore::open(dir.path()).unwrap();
        let bytes = Bytes::from_static(b"{}");
        let m = Manifest {
            media_type: "application/json".into(),
            digest: Digest::of(regcache_protocol::Algorithm::Sha256, &bytes),
            bytes,
        };
        owner.manifest_put(&m).await.unwrap();
        let view = FsStore::view(dir.path());
        assert_eq!(view.manifest_get(&m.digest).await.unwrap(), Some(m.clone()));
        assert!(view.delete(&Key::Manifest(m.digest.clone())).await.is_err());
        assert!(view.spools().is_none());
    }
}
