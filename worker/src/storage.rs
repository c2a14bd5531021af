//! Content-addressed, digest-verified storage on the local filesystem.
//!
//! Layout under the worker's root:
//! ```text
//! blobs/sha256/ab/<hex>            blob bytes, exactly as upstream sent them
//! manifests/sha256/ab/<hex>        "<media type>\n" + the manifest bytes
//! repositories/<name>/_tags/<tag>  "sha256:<hex>"; mtime = last confirmed upstream
//! repositories/<name>/_manifests/<digest>  empty: this repository had that manifest
//! tmp/                             in-progress writes (same filesystem: rename is atomic)
//! ```
//! Nothing but verified content is ever visible: every write goes to a unique
//! file in `tmp/`, is checked, fsynced and then renamed into place. `tmp/` is
//! emptied at start, so a crash leaves no debris. `_tags` and `_manifests` cannot collide
//! with a repository component (those never start with `_`).
//!
//! Callers pass validated [`Digest`]/[`Name`]/[`Tag`] values, never strings, so
//! no path built here can leave the root.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;

use crate::reference::{Digest, Name, Tag};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("content does not match its digest: expected {expected}, got {actual}")]
    Mismatch { expected: Digest, actual: Digest },
}

type Result<T> = std::result::Result<T, Error>;

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> Error + 'a {
    move |source| Error::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// A manifest as stored: its media type and its exact bytes.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub media_type: String,
    pub bytes: Bytes,
    pub digest: Digest,
}

/// The filesystem store of one worker.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    tmp_seq: AtomicU64,
    /// Bytes and number of committed blobs and manifests (kept as we commit).
    bytes: AtomicU64,
    blobs: AtomicU64,
}

/// What the cache holds, for the inventory API.
#[derive(Debug, Default, serde::Serialize)]
pub struct Inventory {
    /// Repository name -> tag -> digest.
    pub repositories: std::collections::BTreeMap<String, Repository>,
    pub blobs: u64,
    pub bytes: u64,
}

#[derive(Debug, Default, serde::Serialize)]
pub struct Repository {
    pub tags: std::collections::BTreeMap<String, String>,
    /// Manifests fetched for this repository (by tag or by digest).
    pub manifests: Vec<String>,
}

/// A file being written in `tmp/`; removed on drop unless committed.
pub struct TempFile {
    path: PathBuf,
    /// Shared so that readers can stream the bytes while they are written.
    file: Arc<File>,
    committed: bool,
}

impl TempFile {
    pub fn file(&self) -> &Arc<File> {
        &self.file
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_file(&self.path);
        }
    }
}

impl Store {
    /// Opens (creating) the store at `root` and removes leftover temp files.
    pub fn open(root: impl Into<PathBuf>) -> Result<Store> {
        let root = root.into();
        for dir in ["blobs", "manifests", "repositories"] {
            let p = root.join(dir);
            fs::create_dir_all(&p).map_err(io_err("create", &p))?;
        }
        let tmp = root.join("tmp");
        match fs::remove_dir_all(&tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("clean", &tmp)(e)),
        }
        fs::create_dir_all(&tmp).map_err(io_err("create", &tmp))?;
        let (blob_bytes, blobs) = dir_usage(&root.join("blobs"));
        let (manifest_bytes, _) = dir_usage(&root.join("manifests"));
        Ok(Store {
            root,
            tmp_seq: AtomicU64::new(0),
            bytes: AtomicU64::new(blob_bytes + manifest_bytes),
            blobs: AtomicU64::new(blobs),
        })
    }

    /// A read-only view of the store at `root`, for reading committed content
    /// from another process (the supervisor's hit path): nothing is created,
    /// cleaned or counted, and nothing is ever written through it.
    pub fn view(root: impl Into<PathBuf>) -> Store {
        Store {
            root: root.into(),
            tmp_seq: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            blobs: AtomicU64::new(0),
        }
    }

    /// (bytes, blob count) committed so far.
    pub fn usage(&self) -> (u64, u64) {
        (
            self.bytes.load(Ordering::Relaxed),
            self.blobs.load(Ordering::Relaxed),
        )
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn sharded(&self, kind: &str, d: &Digest) -> PathBuf {
        self.root
            .join(kind)
            .join(d.algorithm().as_str())
            .join(&d.hex()[..2])
            .join(d.hex())
    }

    pub fn blob_path(&self, d: &Digest) -> PathBuf {
        self.sharded("blobs", d)
    }

    fn manifest_path(&self, d: &Digest) -> PathBuf {
        self.sharded("manifests", d)
    }

    fn repo_dir(&self, name: &Name) -> PathBuf {
        let mut p = self.root.join("repositories");
        p.extend(name.components());
        p
    }

    fn tag_path(&self, name: &Name, tag: &Tag) -> PathBuf {
        let mut p = self.repo_dir(name);
        p.push("_tags");
        p.push(tag.as_str());
        p
    }

    /// Size of a committed blob, if present.
    pub fn blob_size(&self, d: &Digest) -> Option<u64> {
        fs::metadata(self.blob_path(d)).ok().map(|m| m.len())
    }

    /// A fresh, uniquely named file in `tmp/`.
    pub fn temp_file(&self) -> Result<TempFile> {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let seq = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        let path = self
            .root
            .join("tmp")
            .join(format!("{}-{seq}-{nanos}", std::process::id()));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_err("create", &path))?;
        Ok(TempFile {
            path,
            file: Arc::new(file),
            committed: false,
        })
    }

    /// Makes a fully written and verified temp file visible at `dest`.
    fn commit(&self, mut tmp: TempFile, dest: &Path) -> Result<()> {
        tmp.file.sync_all().map_err(io_err("fsync", &tmp.path))?;
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent).map_err(io_err("create", parent))?;
        }
        fs::rename(&tmp.path, dest).map_err(io_err("rename", dest))?;
        tmp.committed = true;
        if let Some(parent) = dest.parent() {
            // Make the rename itself durable.
            if let Ok(dir) = File::open(parent) {
                let _ = dir.sync_all();
            }
        }
        Ok(())
    }

    /// Commits a blob whose bytes were written to `tmp` and hashed by the
    /// caller as `actual`. A mismatch removes the temp file and commits nothing.
    pub fn commit_blob(&self, tmp: TempFile, expected: &Digest, actual: Digest) -> Result<()> {
        if *expected != actual {
            return Err(Error::Mismatch {
                expected: expected.clone(),
                actual,
            });
        }
        let size = tmp.file.metadata().map(|m| m.len()).unwrap_or(0);
        self.commit(tmp, &self.blob_path(expected))?;
        self.bytes.fetch_add(size, Ordering::Relaxed);
        self.blobs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Reads a stored manifest.
    pub fn read_manifest(&self, d: &Digest) -> Result<Option<Manifest>> {
        let path = self.manifest_path(d);
        let raw = match fs::read(&path) {
            Ok(raw) => Bytes::from(raw),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err("read", &path)(e)),
        };
        let nl = raw.iter().position(|&b| b == b'\n').unwrap_or(0);
        let media_type = String::from_utf8_lossy(&raw[..nl]).into_owned();
        Ok(Some(Manifest {
            media_type,
            bytes: raw.slice(nl + 1..),
            digest: d.clone(),
        }))
    }

    /// Stores manifest bytes under their digest after verifying them.
    pub fn write_manifest(&self, m: &Manifest) -> Result<()> {
        let actual = Digest::of(m.digest.algorithm(), &m.bytes);
        if actual != m.digest {
            return Err(Error::Mismatch {
                expected: m.digest.clone(),
                actual,
            });
        }
        let dest = self.manifest_path(&m.digest);
        if dest.exists() {
            return Ok(());
        }
        let tmp = self.temp_file()?;
        // A media type never holds a newline (it came from a header value).
        let write = |f: &mut &File| -> io::Result<()> {
            f.write_all(m.media_type.as_bytes())?;
            f.write_all(b"\n")?;
            f.write_all(&m.bytes)
        };
        write(&mut &*tmp.file).map_err(io_err("write", &tmp.path.clone()))?;
        self.commit(tmp, &dest)?;
        let size = m.media_type.len() as u64 + 1 + m.bytes.len() as u64;
        self.bytes.fetch_add(size, Ordering::Relaxed);
        Ok(())
    }

    /// Notes that `name` had manifest `d`, for the inventory and `_catalog`.
    pub fn link_manifest(&self, name: &Name, d: &Digest) -> Result<()> {
        let mut p = self.repo_dir(name);
        p.push("_manifests");
        fs::create_dir_all(&p).map_err(io_err("create", &p))?;
        p.push(d.to_string());
        match OpenOptions::new().write(true).create_new(true).open(&p) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(io_err("create", &p)(e)),
        }
    }

    /// The tags recorded for `name`, sorted.
    pub fn tags(&self, name: &Name) -> Vec<String> {
        let mut tags: Vec<String> = fs::read_dir(self.repo_dir(name).join("_tags"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        tags.sort();
        tags
    }

    /// Every repository with its tags and manifests, and the blob totals.
    pub fn inventory(&self) -> Inventory {
        let mut inv = Inventory::default();
        let root = self.root.join("repositories");
        let mut stack = vec![root.clone()];
        while let Some(dir) = stack.pop() {
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                let path = e.path();
                let fname = e.file_name().to_string_lossy().into_owned();
                if !e.file_type().is_ok_and(|t| t.is_dir()) {
                    continue;
                }
                let name = || {
                    dir.strip_prefix(&root)
                        .map(|p| p.to_string_lossy().into_owned())
                        .unwrap_or_default()
                };
                match fname.as_str() {
                    "_tags" => {
                        let repo = inv.repositories.entry(name()).or_default();
                        for t in fs::read_dir(&path).into_iter().flatten().flatten() {
                            if let Ok(d) = fs::read_to_string(t.path()) {
                                let tag = t.file_name().to_string_lossy().into_owned();
                                repo.tags.insert(tag, d.trim().to_owned());
                            }
                        }
                    }
                    "_manifests" => {
                        let repo = inv.repositories.entry(name()).or_default();
                        for m in fs::read_dir(&path).into_iter().flatten().flatten() {
                            repo.manifests
                                .push(m.file_name().to_string_lossy().into_owned());
                        }
                        repo.manifests.sort();
                    }
                    _ => stack.push(path),
                }
            }
        }
        let (bytes, blobs) = self.usage();
        inv.bytes = bytes;
        inv.blobs = blobs;
        inv
    }

    /// The digest a tag pointed to and when upstream last confirmed it.
    pub fn read_tag(&self, name: &Name, tag: &Tag) -> Option<(Digest, SystemTime)> {
        let path = self.tag_path(name, tag);
        let text = fs::read_to_string(&path).ok()?;
        let digest = text.trim().parse().ok()?;
        let modified = fs::metadata(&path).and_then(|m| m.modified()).ok()?;
        Some((digest, modified))
    }

    /// Records `tag -> digest`, confirmed now.
    pub fn write_tag(&self, name: &Name, tag: &Tag, digest: &Digest) -> Result<()> {
        let tmp = self.temp_file()?;
        (&*tmp.file)
            .write_all(digest.to_string().as_bytes())
            .map_err(io_err("write", &tmp.path.clone()))?;
        self.commit(tmp, &self.tag_path(name, tag))
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::Algorithm;

    #[test]
    fn manifest_round_trip_and_verification() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let bytes = Bytes::from_static(b"{\"schemaVersion\":2}");
        let digest = Digest::of(Algorithm::Sha256, &bytes);
        let m = Manifest {
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            bytes: bytes.clone(),
            digest: digest.clone(),
        };
        store.write_manifest(&m).unwrap();
        let back = store.read_manifest(&digest).unwrap().unwrap();
        assert_eq!(back.bytes, bytes);
        assert_eq!(back.media_type, m.media_type);

        let wrong = Manifest {
            bytes: Bytes::from_static(b"tampered"),
            ..m
        };
        assert!(matches!(
            store.write_manifest(&wrong),
            Err(Error::Mismatch { .. })
        ));
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
    }

    #[test]
    fn blob_mismatch_is_never_committed() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let tmp = store.temp_file().unwrap();
        (&**tmp.file()).write_all(b"abc").unwrap();
        let expected = Digest::of(Algorithm::Sha256, b"abd");
        let actual = Digest::of(Algorithm::Sha256, b"abc");
        assert!(store.commit_blob(tmp, &expected, actual).is_err());
        assert!(store.blob_size(&expected).is_none());
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);

        let tmp = store.temp_file().unwrap();
        (&**tmp.file()).write_all(b"abc").unwrap();
        let d = Digest::of(Algorithm::Sha256, b"abc");
        store.commit_blob(tmp, &d, d.clone()).unwrap();
        assert_eq!(store.blob_size(&d), Some(3));
    }

    #[test]
    fn leftovers_removed_at_open_and_tags_persist() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            std::mem::forget(store.temp_file().unwrap()); // as if we crashed
            let name: Name = "library/debian".parse().unwrap();
            let tag: Tag = "12".parse().unwrap();
            let d = Digest::of(Algorithm::Sha256, b"x");
            store.write_tag(&name, &tag, &d).unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(fs::read_dir(dir.path().join("tmp")).unwrap().count(), 0);
        let (d, _) = store
            .read_tag(&"library/debian".parse().unwrap(), &"12".parse().unwrap())
            .unwrap();
        assert_eq!(d, Digest::of(Algorithm::Sha256, b"x"));
    }
}
