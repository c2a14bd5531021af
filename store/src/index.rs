//! What a local store holds, in memory: every blob and manifest with its
//! size and last use, what each manifest refers to, and the tags. The cache
//! policy ([`crate::policy`]) decides on it; [`crate::Managed`] keeps it up
//! to date as the store changes, and builds it once by a scan of the disk,
//! off the start path.
//!
//! Reference counts make deletion exact: a blob or child manifest goes only
//! when no stored manifest refers to it any more, whatever plan asked.

use std::collections::{HashMap, HashSet};
use std::time::SystemTime;

use regcache_protocol::manifest;

use crate::{Digest, Key, Manifest, Name, Tag};

/// A blob: its size and last use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub size: u64,
    pub used: SystemTime,
}

/// A manifest: its stored size, last use, and what it refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestEntry {
    pub size: u64,
    pub used: SystemTime,
    pub blobs: Vec<Digest>,
    pub children: Vec<Digest>,
}

impl ManifestEntry {
    /// The entry of a manifest stored as `size` bytes.
    pub fn of(m: &Manifest, size: u64, used: SystemTime) -> ManifestEntry {
        // A manifest that cannot be read refers to nothing we can keep together.
        let refs = manifest::references(m).unwrap_or_default();
        ManifestEntry {
            size,
            used,
            blobs: refs.blobs,
            children: refs.manifests,
        }
    }
}

/// One local store's contents.
#[derive(Debug, Default, Clone)]
pub struct Index {
    blobs: HashMap<Digest, Entry>,
    manifests: HashMap<Digest, ManifestEntry>,
    tags: HashMap<(Name, Tag), Digest>,
    /// How many stored manifests refer to each digest (blob or manifest).
    refs: HashMap<Digest, u32>,
    bytes: u64,
}

/// A top-level manifest with everything it holds together, or a blob no
/// manifest refers to: what the policy keeps or evicts as one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unit {
    pub root: Key,
    /// The latest use of its manifests (every pull reads them; a layer read
    /// for another image that shares it is no use of this one); for a
    /// loose blob, its own.
    pub used: SystemTime,
    /// Stored manifests of the unit, the root first.
    pub manifests: Vec<Digest>,
    /// Stored blobs of the unit.
    pub blobs: Vec<Digest>,
    /// Bytes of all of the above.
    pub bytes: u64,
    /// Is every blob its image manifests refer to stored? (An index's
    /// missing platforms do not count.) An incomplete unit recently used
    /// is a pull in progress.
    pub complete: bool,
    /// Every digest its manifests refer to, stored or not.
    pub referenced: Vec<Digest>,
}

impl Index {
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn blob_count(&self) -> u64 {
        self.blobs.len() as u64
    }

    pub fn manifest_count(&self) -> u64 {
        self.manifests.len() as u64
    }

    pub fn blob(&self, d: &Digest) -> Option<&Entry> {
        self.blobs.get(d)
    }

    pub fn manifest(&self, d: &Digest) -> Option<&ManifestEntry> {
        self.manifests.get(d)
    }

    pub fn has_tag(&self, name: &Name, tag: &Tag) -> bool {
        self.tags.contains_key(&(name.clone(), tag.clone()))
    }

    pub fn add_blob(&mut self, d: Digest, size: u64, used: SystemTime) {
        match self.blobs.insert(d, Entry { size, used }) {
            Some(old) => self.bytes = self.bytes - old.size + size,
            None => self.bytes += size,
        }
    }

    pub fn add_manifest(&mut self, d: Digest, entry: ManifestEntry) {
        if let Some(old) = self.manifests.get_mut(&d) {
            old.used = old.used.max(entry.used);
            return;
        }
        for r in entry.blobs.iter().chain(&entry.children) {
            *self.refs.entry(r.clone()).or_default() += 1;
        }
        self.bytes += entry.size;
        self.manifests.insert(d, entry);
    }

    pub fn set_tag(&mut self, name: Name, tag: Tag, digest: Digest) {
        self.tags.insert((name, tag), digest);
    }

    /// Records a use of `key` at `at` (a later one wins).
    pub fn used(&mut self, key: &Key, at: SystemTime) {
        match key {
            Key::Blob(d) => {
                if let Some(e) = self.blobs.get_mut(d) {
                    e.used = e.used.max(at);
                }
            }
            Key::Manifest(d) => {
                if let Some(e) = self.manifests.get_mut(d) {
                    e.used = e.used.max(at);
                }
            }
            Key::Tag(..) => {}
        }
    }

    /// Forgets `key`; returns the bytes it held.
    pub fn remove(&mut self, key: &Key) -> u64 {
        match key {
            Key::Blob(d) => match self.blobs.remove(d) {
                Some(e) => {
                    self.bytes -= e.size;
                    e.size
                }
                None => 0,
            },
            Key::Manifest(d) => match self.manifests.remove(d) {
                Some(e) => {
                    for r in e.blobs.iter().chain(&e.children) {
                        if let Some(n) = self.refs.get_mut(r) {
                            *n -= 1;
                            if *n == 0 {
                                self.refs.remove(r);
                            }
                        }
                    }
                    self.bytes -= e.size;
                    e.size
                }
                None => 0,
            },
            Key::Tag(name, tag) => {
                self.tags.remove(&(name.clone(), tag.clone()));
                0
            }
        }
    }

    /// Is `d` referred to by a stored manifest?
    pub fn referenced(&self, d: &Digest) -> bool {
        self.refs.contains_key(d)
    }

    /// The tags pointing at `d`.
    pub fn tags_of(&self, d: &Digest) -> Vec<(Name, Tag)> {
        self.tags
            .iter()
            .filter(|(_, v)| *v == d)
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Every unit, in no particular order.
    pub fn units(&self) -> Vec<Unit> {
        let mut units = Vec::new();
        for (d, m) in &self.manifests {
            if self.referenced(d) {
                continue; // a child: its parent's unit holds it
            }
            let mut unit = Unit {
                root: Key::Manifest(d.clone()),
                used: m.used,
                manifests: Vec::new(),
                blobs: Vec::new(),
                bytes: 0,
                complete: true,
                referenced: Vec::new(),
            };
            let mut seen = HashSet::new();
            let mut todo = vec![d.clone()];
            while let Some(md) = todo.pop() {
                let Some(me) = self.manifests.get(&md) else {
                    continue; // a platform never pulled
                };
                if !seen.insert(md.clone()) {
                    continue;
                }
                unit.used = unit.used.max(me.used);
                unit.bytes += me.size;
                unit.manifests.push(md.clone());
                for b in &me.blobs {
                    unit.referenced.push(b.clone());
                    match self.blobs.get(b) {
                        Some(e) if seen.insert(b.clone()) => {
                            unit.bytes += e.size;
                            unit.blobs.push(b.clone());
                        }
                        Some(_) => {}
                        None => unit.complete = false,
                    }
                }
                for c in &me.children {
                    unit.referenced.push(c.clone());
                    todo.push(c.clone());
                }
            }
            units.push(unit);
        }
        for (d, e) in &self.blobs {
            if !self.referenced(d) {
                units.push(Unit {
                    root: Key::Blob(d.clone()),
                    used: e.used,
                    manifests: Vec::new(),
                    blobs: vec![d.clone()],
                    bytes: e.size,
                    complete: true,
                    referenced: Vec::new(),
                });
            }
        }
        units
    }

    /// What removing `unit` deletes, in a crash-safe order: its tags, then
    /// its manifests (root first: no stored manifest is left referring to a
    /// deleted one), then the blobs no remaining manifest refers to. Applies
    /// it to the index as it goes; the caller deletes the keys in order.
    pub fn evict(&mut self, unit: &Unit) -> (Vec<Key>, u64) {
        let (mut keys, mut manifests, mut blobs) = (Vec::new(), Vec::new(), Vec::new());
        let mut freed = 0;
        for d in &unit.manifests {
            // Shared with another unit (a child in two indexes): it stays.
            if self.referenced(d) || !self.manifests.contains_key(d) {
                continue;
            }
            for (name, tag) in self.tags_of(d) {
                let key = Key::Tag(name, tag);
                self.remove(&key);
                keys.push(key);
            }
            let key = Key::Manifest(d.clone());
            freed += self.remove(&key);
            manifests.push(key);
        }
        for b in &unit.blobs {
            if !self.referenced(b) && self.blobs.contains_key(b) {
                let key = Key::Blob(b.clone());
                freed += self.remove(&key);
                blobs.push(key);
            }
        }
        keys.extend(manifests);
        keys.extend(blobs);
        (keys, freed)
    }

    /// Sets the use times of a unit's entries from fresh readings (the front
    /// records uses on disk, not here). True if any is newer than known.
    pub fn refresh(&mut self, times: &[(Key, SystemTime)]) -> bool {
        let mut newer = false;
        for (key, at) in times {
            let known = match key {
                Key::Blob(d) => self.blobs.get(d).map(|e| e.used),
                Key::Manifest(d) => self.manifests.get(d).map(|e| e.used),
                Key::Tag(..) => None,
            };
            if known.is_some_and(|k| *at > k) {
                newer = true;
                self.used(key, *at);
            }
        }
        newer
    }

    /// Adds what `other` has and this does not (a scan's findings merged
    /// into what was recorded while it ran), except `gone` (deleted meanwhile).
    pub fn merge(&mut self, other: Index, gone: &HashSet<Key>) {
        for (d, e) in other.blobs {
            if !gone.contains(&Key::Blob(d.clone())) && !self.blobs.contains_key(&d) {
                self.add_blob(d, e.size, e.used);
            }
        }
        for (d, e) in other.manifests {
            if !gone.contains(&Key::Manifest(d.clone())) {
                self.add_manifest(d, e);
            }
        }
        for ((name, tag), d) in other.tags {
            if !gone.contains(&Key::Tag(name.clone(), tag.clone())) {
                self.tags.entry((name, tag)).or_insert(d);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use regcache_protocol::Algorithm;
    use std::time::{Duration, UNIX_EPOCH};

    fn d(s: &str) -> Digest {
        Digest::of(Algorithm::Sha256, s.as_bytes())
    }

    fn t(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn image(ix: &mut Index, name: &str, blobs: &[(&str, u64)], used: u64) -> Digest {
        for (b, size) in blobs {
            ix.add_blob(d(b), *size, t(used));
        }
        let m = d(name);
        ix.add_manifest(
            m.clone(),
            ManifestEntry {
                size: 10,
                used: t(used),
                blobs: blobs.iter().map(|(b, _)| d(b)).collect(),
                children: vec![],
            },
        );
        ix.set_tag(
            format!("r/{name}").parse().unwrap(),
            "1".parse().unwrap(),
            m.clone(),
        );
        m
    }

    #[test]
    fn a_blob_shared_by_two_images_survives_the_eviction_of_one() {
        let mut ix = Index::default();
        let a = image(&mut ix, "a", &[("shared", 100), ("a1", 50)], 1);
        image(&mut ix, "b", &[("shared", 100), ("b1", 70)], 2);
        assert_eq!(ix.bytes(), 100 + 50 + 70 + 20);
        let unit = ix
            .units()
            .into_iter()
            .find(|u| u.root == Key::Manifest(a.clone()))
            .unwrap();
        assert!(unit.complete);
        let (keys, freed) = ix.evict(&unit);
        assert_eq!(freed, 50 + 10);
        assert!(
            matches!(keys[0], Key::Tag(..)),
            "the tag goes first: {keys:?}"
        );
        assert_eq!(keys[1], Key::Manifest(a));
        assert_eq!(keys[2..], [Key::Blob(d("a1"))]);
        assert!(ix.blob(&d("shared")).is_some());
        assert_eq!(ix.bytes(), 100 + 70 + 10);
    }

    #[test]
    fn an_index_holds_its_platform_manifests_and_their_blobs_in_one_unit() {
        let mut ix = Index::default();
        let child = image(&mut ix, "amd64", &[("layer", 100)], 1);
        ix.add_manifest(
            d("index"),
            ManifestEntry {
                size: 5,
                used: t(3),
                blobs: vec![],
                children: vec![child.clone(), d("arm64-never-pulled")],
            },
        );
        let units = ix.units();
        assert_eq!(units.len(), 1, "{units:?}");
        let u = &units[0];
        assert_eq!(u.root, Key::Manifest(d("index")));
        assert_eq!(u.manifests, vec![d("index"), child.clone()]);
        assert_eq!(u.bytes, 5 + 10 + 100);
        assert_eq!(u.used, t(3));
        assert!(u.complete, "a missing platform is not an incomplete image");
        let (keys, freed) = ix.evict(u);
        assert_eq!(freed, 115);
        assert_eq!(keys.last(), Some(&Key::Blob(d("layer"))));
        assert_eq!(ix.bytes(), 0);
    }

    #[test]
    fn a_missing_layer_makes_a_unit_incomplete_and_orphan_blobs_are_units_of_their_own() {
        let mut ix = Index::default();
        ix.add_manifest(
            d("m"),
            ManifestEntry {
                size: 1,
                used: t(1),
                blobs: vec![d("here"), d("coming")],
                children: vec![],
            },
        );
        ix.add_blob(d("here"), 5, t(1));
        ix.add_blob(d("loose"), 7, t(4));
        let mut units = ix.units();
        units.sort_by_key(|u| u.used);
        assert!(!units[0].complete);
        assert_eq!(units[1].root, Key::Blob(d("loose")));
        assert!(units[0].referenced.contains(&d("coming")));
    }

    #[test]
    fn merging_a_scan_keeps_what_was_recorded_meanwhile_and_drops_what_was_deleted() {
        let mut scanned = Index::default();
        scanned.add_blob(d("old"), 1, t(1));
        scanned.add_blob(d("deleted"), 2, t(1));
        scanned.add_blob(d("both"), 3, t(1));
        let mut live = Index::default();
        live.add_blob(d("both"), 3, t(9));
        live.add_blob(d("new"), 4, t(9));
        let gone = HashSet::from([Key::Blob(d("deleted"))]);
        live.merge(scanned, &gone);
        assert_eq!(live.bytes(), 1 + 3 + 4);
        assert_eq!(live.blob(&d("both")).unwrap().used, t(9));
        assert!(live.blob(&d("deleted")).is_none());
    }

    #[test]
    fn fresher_use_times_from_disk_are_taken() {
        let mut ix = Index::default();
        ix.add_blob(d("b"), 1, t(5));
        assert!(!ix.refresh(&[(Key::Blob(d("b")), t(4))]));
        assert!(ix.refresh(&[(Key::Blob(d("b")), t(8))]));
        assert_eq!(ix.blob(&d("b")).unwrap().used, t(8));
    }
}
