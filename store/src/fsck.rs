//! `regcache fsck`: every stored blob and manifest re-hashed, every tag read
//! and followed; what is corrupt or dangling is reported and, when asked,
//! removed (the cache fetches it again on the next pull).

use std::fs;
use std::io::Read;

use regcache_protocol::{Hasher, Name, Tag};

use crate::fs::{parse_manifest, parse_tag, walk_digests, FsStore};
use crate::{Digest, Key};

/// What a check found.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct FsckReport {
    pub blobs: u64,
    pub manifests: u64,
    pub tags: u64,
    pub bytes_checked: u64,
    /// Blobs and manifests whose bytes do not hash to their name, tags that
    /// cannot be read.
    pub corrupt: Vec<String>,
    /// Tags pointing at a manifest that is not stored.
    pub dangling: Vec<String>,
    /// Tagged images with blobs missing (normal for pulls that stopped
    /// half-way; not an error).
    pub incomplete: Vec<String>,
    /// Were the bad entries removed?
    pub repaired: bool,
}

impl FsckReport {
    /// Nothing corrupt and nothing dangling.
    pub fn clean(&self) -> bool {
        self.corrupt.is_empty() && self.dangling.is_empty()
    }
}

impl FsStore {
    /// Checks everything stored (blocking; reads every byte). With `repair`,
    /// removes what is corrupt or dangling.
    pub fn fsck(&self, repair: bool) -> FsckReport {
        let mut report = FsckReport {
            repaired: repair,
            ..FsckReport::default()
        };
        let root = self.root().to_owned();
        let mut bad: Vec<Key> = Vec::new();
        for (d, path, meta) in walk_digests(&root.join("blobs")) {
            report.blobs += 1;
            report.bytes_checked += meta.len();
            if hash_file(&path, &d).as_ref() != Some(&d) {
                report.corrupt.push(format!("blob {d}"));
                bad.push(Key::Blob(d));
            }
        }
        let mut manifests = std::collections::HashMap::new();
        for (d, path, meta) in walk_digests(&root.join("manifests")) {
            report.manifests += 1;
            report.bytes_checked += meta.len();
            match fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|raw| parse_manifest(&d, raw).map_err(|e| e.to_string()))
            {
                Ok(m) => {
                    manifests.insert(d, m);
                }
                Err(e) => {
                    report.corrupt.push(format!("manifest {d}: {e}"));
                    bad.push(Key::Manifest(d));
                }
            }
        }
        for (name, tag, path) in tag_files(&root.join("repositories")) {
            report.tags += 1;
            let modified = fs::metadata(&path).and_then(|m| m.modified()).ok();
            let rec = fs::read_to_string(&path)
                .ok()
                .and_then(|t| parse_tag(&t, modified));
            let key = Key::Tag(name.clone(), tag.clone());
            let Some(rec) = rec else {
                report.corrupt.push(format!("tag {name}:{tag}"));
                bad.push(key);
                continue;
            };
            let Some(m) = manifests.get(&rec.digest) else {
                report
                    .dangling
                    .push(format!("tag {name}:{tag} -> {} (not stored)", rec.digest));
                bad.push(key);
                continue;
            };
            let refs = regcache_protocol::manifest::references(m).unwrap_or_default();
            let missing = refs
                .blobs
                .iter()
                .filter(|b| self.mtime(&Key::Blob((*b).clone())).is_none())
                .count();
            if missing > 0 {
                report
                    .incomplete
                    .push(format!("{name}:{tag}: {missing} blob(s) not stored"));
            }
        }
        if repair {
            for key in &bad {
                if let Err(e) = self.remove_now(key) {
                    tracing::warn!(?key, error = %e, "fsck could not remove");
                }
            }
        }
        report
    }
}

/// The digest of a file's bytes, in `expected`'s algorithm.
fn hash_file(path: &std::path::Path, expected: &Digest) -> Option<Digest> {
    let mut f = fs::File::open(path).ok()?;
    let mut hasher = Hasher::new(expected.algorithm());
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).ok()?;
        if n == 0 {
            return Some(hasher.finish());
        }
        hasher.update(&buf[..n]);
    }
}

/// Every `repositories/<name>/_tags/<tag>` file.
fn tag_files(root: &std::path::Path) -> Vec<(Name, Tag, std::path::PathBuf)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).into_iter().flatten().flatten() {
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            match e.file_name().to_str() {
                Some("_tags") => {
                    let Some(name) = dir
                        .strip_prefix(root)
                        .ok()
                        .and_then(|p| p.to_str())
                        .and_then(|p| p.parse::<Name>().ok())
                    else {
                        continue;
                    };
                    for t in fs::read_dir(e.path()).into_iter().flatten().flatten() {
                        if let Some(tag) = t.file_name().to_str().and_then(|t| t.parse().ok()) {
                            out.push((name.clone(), tag, t.path()));
                        }
                    }
                }
                Some("_manifests" | "_blobs") => {}
                _ => stack.push(e.path()),
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Manifest, Store, TagRecord};
    use bytes::Bytes;
    use std::io::Write;

    #[tokio::test]
    async fn corrupt_and_dangling_entries_are_found_and_removed_and_a_clean_store_is_clean() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::open(dir.path()).unwrap();
        let data = b"layer bytes";
        let d = Digest::of(regcache_protocol::Algorithm::Sha256, data);
        let spool = store.spools().unwrap().create().unwrap();
        (&**spool.file()).write_all(data).unwrap();
        store
            .blob_commit(spool.verify(&d, d.clone()).unwrap())
            .await
            .unwrap();
        let body = Bytes::from(format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"x","digest":"{d}","size":11}},"layers":[]}}"#
        ));
        let m = Manifest {
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            digest: Digest::of(regcache_protocol::Algorithm::Sha256, &body),
            bytes: body,
        };
        store.manifest_put(&m).await.unwrap();
        let (name, tag): (Name, Tag) = ("lib/app".parse().unwrap(), "1".parse().unwrap());
        let rec = TagRecord {
            digest: m.digest.clone(),
            confirmed: std::time::SystemTime::now(),
        };
        store.tag_put(&name, &tag, &rec).await.unwrap();
        let report = store.fsck(false);
        assert!(report.clean(), "{report:?}");
        assert_eq!((report.blobs, report.manifests, report.tags), (1, 1, 1));
        assert!(report.incomplete.is_empty());

        // A flipped byte in the blob, a tag to a manifest never stored.
        let path = walk_digests(&dir.path().join("blobs"))[0].1.clone();
        fs::write(&path, b"layer bytez").unwrap();
        let other = Digest::of(regcache_protocol::Algorithm::Sha256, b"gone");
        let rec = TagRecord {
            digest: other,
            confirmed: std::time::SystemTime::now(),
        };
        store
            .tag_put(&name, &"2".parse().unwrap(), &rec)
            .await
            .unwrap();
        let report = store.fsck(true);
        assert_eq!(report.corrupt, vec![format!("blob {d}")]);
        assert_eq!(report.dangling.len(), 1);
        assert_eq!(report.incomplete.len(), 0, "checked before the repair");
        assert!(store.blob_size(&d).await.unwrap().is_none(), "removed");
        let after = store.fsck(false);
        assert!(after.clean(), "{after:?}");
        assert_eq!(after.incomplete.len(), 1, "the image now misses its config");
    }
}
