//! The spool: local files that fills write while readers follow them.
//!
//! A spool is created in a [`SpoolDir`] with a random name and held under an
//! exclusive `flock` for as long as any handle to it is open. The lock is how
//! a process tells its own spools from abandoned ones: at open, a spool
//! directory removes only the files whose lock it can take (their writer is
//! gone, killed or crashed), never a live process's. A spool is removed when
//! dropped unless a store took it over; the only way to commit one is as a
//! [`Verified`] spool, whose bytes hashed to the digest it is committed as.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::{Digest, Error};

/// A directory of spools (on the same filesystem as the store that commits
/// them by rename).
#[derive(Debug, Clone)]
pub struct SpoolDir {
    dir: PathBuf,
}

impl SpoolDir {
    /// Opens (creating) `dir` and removes the spools nobody holds any more.
    pub fn open(dir: impl Into<PathBuf>) -> io::Result<SpoolDir> {
        let dir = dir.into();
        fs::create_dir_all(&dir)?;
        for entry in fs::read_dir(&dir)?.flatten() {
            let path = entry.path();
            let Ok(file) = OpenOptions::new().read(true).open(&path) else {
                continue;
            };
            // Free lock: its writer is gone. Held: a live process's fill.
            if file.try_lock().is_ok() {
                let _ = fs::remove_file(&path);
            }
        }
        Ok(SpoolDir { dir })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// A new, empty, locked spool.
    pub fn create(&self) -> io::Result<Spool> {
        let named = tempfile::Builder::new()
            .prefix("spool-")
            .rand_bytes(12)
            .tempfile_in(&self.dir)?;
        let (file, path) = named.keep().map_err(|e| e.error)?;
        file.try_lock().map_err(io::Error::from)?;
        Ok(Spool {
            path,
            file: Arc::new(file),
            taken: false,
        })
    }
}

/// One spool file; removed on drop unless a store took it.
#[derive(Debug)]
pub struct Spool {
    path: PathBuf,
    /// Shared so that readers can follow the bytes while they are written.
    file: Arc<File>,
    taken: bool,
}

impl Spool {
    pub fn file(&self) -> &Arc<File> {
        &self.file
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The only way to a committable spool: `actual` is the digest of what
    /// was written, hashed by the writer; it must be `expected`.
    pub fn verify(self, expected: &Digest, actual: Digest) -> Result<Verified, Error> {
        if *expected != actual {
            return Err(Error::Mismatch {
                expected: expected.clone(),
                actual,
            });
        }
        let size = self
            .file
            .metadata()
            .map_err(|source| Error::Io {
                op: "stat",
                path: self.path.clone(),
                source,
            })?
            .len();
        Ok(Verified {
            spool: self,
            digest: actual,
            size,
        })
    }

    /// For a store that moved the file away (a rename): do not remove it.
    pub(crate) fn taken(mut self) {
        self.taken = true;
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        if !self.taken {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// A spool whose bytes hashed to its digest: what [`crate::Store::blob_commit`] takes.
#[derive(Debug)]
pub struct Verified {
    spool: Spool,
    digest: Digest,
    size: u64,
}

impl Verified {
    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn spool(&self) -> &Spool {
        &self.spool
    }

    pub(crate) fn into_spool(self) -> Spool {
        self.spool
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use regcache_protocol::Algorithm;
    use std::io::Write;

    #[test]
    fn abandoned_spools_go_and_live_ones_stay() {
        let dir = tempfile::tempdir().unwrap();
        let spools = SpoolDir::open(dir.path()).unwrap();
        let live = spools.create().unwrap();
        // An abandoned spool: a file nobody holds a lock on.
        let dead = dir.path().join("spool-dead");
        fs::write(&dead, b"half").unwrap();
        SpoolDir::open(dir.path()).unwrap();
        assert!(!dead.exists(), "an abandoned spool survived");
        assert!(live.path().exists(), "a live spool was removed");
        let path = live.path().to_owned();
        drop(live);
        assert!(!path.exists(), "a dropped spool stayed");
    }

    #[test]
    fn only_matching_content_verifies() {
        let dir = tempfile::tempdir().unwrap();
        let spools = SpoolDir::open(dir.path()).unwrap();
        let s = spools.create().unwrap();
        (&**s.file()).write_all(b"abc").unwrap();
        let wrong = Digest::of(Algorithm::Sha256, b"abd");
        let got = Digest::of(Algorithm::Sha256, b"abc");
        assert!(matches!(
            s.verify(&wrong, got.clone()),
            Err(Error::Mismatch { .. })
        ));
        let s = spools.create().unwrap();
        (&**s.file()).write_all(b"abc").unwrap();
        let v = s.verify(&got, got.clone()).unwrap();
        assert_eq!((v.digest(), v.size()), (&got, 3));
    }
}
