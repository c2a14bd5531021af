//! What a cold manifest fetches with it, before the client asks, so that a
//! cold pull pays the upstream round trips of its small parts together,
//! not one after another.
//!
//! - An image manifest: its blobs up to `REGCACHE_READ_AHEAD` (1 MiB by
//!   default, about what one round trip costs on a fast link). A client
//!   that GETs an image manifest GETs its config and layers next; a larger
//!   blob's round trip is small beside its bytes, and a client that only
//!   inspects the image costs that much at most. containerd 2.1 reads the
//!   manifest and config of every platform of an index and the layers of
//!   one, so once a second child of one index is asked for, its children
//!   get their config only.
//! - An index: its child for this machine's platform, since a cache mostly
//!   serves the machines it runs beside. Not where upstream counts manifest
//!   GETs as pulls (Docker Hub): a wrong guess there costs a pull of the
//!   client's rate limit.

use std::collections::VecDeque;
use std::sync::Mutex;

use regcache_protocol::manifest::{self, Image};
use regcache_protocol::{Digest, Manifest, Name};

/// Cold indexes remembered, at most (the oldest is forgotten first): a pull
/// asks for a child soon after its index.
const INDEXES_MAX: usize = 16;
/// Children of one index remembered, and blobs of one image fetched ahead,
/// at most.
const ENTRIES_MAX: usize = 128;

/// The default `REGCACHE_READ_AHEAD`.
pub const DEFAULT_MAX: u64 = 1 << 20;

/// What is fetched ahead, and the cold indexes whose children may be.
#[derive(Debug)]
pub(super) struct ReadAhead {
    /// The largest blob fetched ahead (0: none).
    max: u64,
    /// The (os, architecture) whose child of an index is fetched with it;
    /// `None`: no child is.
    platform: Option<(String, String)>,
    indexes: Mutex<VecDeque<Index>>,
}

/// What to fetch now.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Ahead {
    pub blobs: Vec<Digest>,
    pub manifest: Option<Digest>,
}

/// A cold index of `name`: its children, and whether one was asked for.
#[derive(Debug)]
struct Index {
    name: Name,
    children: Vec<Digest>,
    taken: bool,
}

impl ReadAhead {
    /// Blobs up to `max` (0: nothing at all) and, given a `platform`, an
    /// index's child for it.
    pub(super) fn new(max: u64, platform: Option<(String, String)>) -> ReadAhead {
        ReadAhead {
            max,
            platform: platform.filter(|_| max > 0),
            indexes: Mutex::default(),
        }
    }

    /// `m`, a manifest of `name` just fetched from upstream for a client:
    /// what to fetch now.
    pub(super) fn manifest(&self, name: &Name, m: &Manifest) -> Ahead {
        if self.max == 0 {
            return Ahead::default();
        }
        if let Some(image) = manifest::image_of(m) {
            let layers = self.first_child(name, &m.digest);
            return Ahead {
                blobs: self.blobs(&image, layers),
                manifest: None,
            };
        }
        if let Ok(refs) = manifest::references(m) {
            self.remember(name, refs.manifests);
        }
        Ahead {
            blobs: Vec::new(),
            manifest: self
                .platform
                .as_ref()
                .and_then(|(os, arch)| manifest::child_for(m, os, arch)),
        }
    }

    /// The small blobs of `image`: config first, then the layers if asked.
    fn blobs(&self, image: &Image, layers: bool) -> Vec<Digest> {
        let layers = image.layers.iter().filter(|_| layers);
        let mut small: Vec<Digest> = Vec::new();
        for b in std::iter::once(&image.config).chain(layers) {
            if b.size <= self.max && !small.contains(&b.digest) && small.len() < ENTRIES_MAX {
                small.push(b.digest.clone());
            }
        }
        small
    }

    /// Is `digest` the first child asked for of a cold index of `name`
    /// (or a child of none)?
    fn first_child(&self, name: &Name, digest: &Digest) -> bool {
        let mut indexes = self.indexes.lock().unwrap();
        let index = indexes
            .iter_mut()
            .rev()
            .find(|i| i.name == *name && i.children.contains(digest));
        index.is_none_or(|i| !std::mem::replace(&mut i.taken, true))
    }

    fn remember(&self, name: &Name, mut children: Vec<Digest>) {
        if children.is_empty() {
            return;
        }
        children.truncate(ENTRIES_MAX);
        let mut indexes = self.indexes.lock().unwrap();
        if indexes.len() == INDEXES_MAX {
            indexes.pop_front();
        }
        indexes.push_back(Index {
            name: name.clone(),
            children,
            taken: false,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use regcache_protocol::Algorithm;

    fn d(c: char) -> Digest {
        format!("sha256:{}", c.to_string().repeat(64))
            .parse()
            .unwrap()
    }

    fn manifest(json: serde_json::Value) -> Manifest {
        let bytes = Bytes::from(json.to_string());
        Manifest {
            media_type: json["mediaType"].as_str().unwrap().into(),
            digest: Digest::of(Algorithm::Sha256, &bytes),
            bytes,
        }
    }

    fn desc(digest: Digest, size: u64) -> serde_json::Value {
        serde_json::json!({"mediaType": "x/y", "size": size, "digest": digest.to_string()})
    }

    /// An image of config `c` (500 bytes) and `layers`, told apart by `tag`.
    fn image(tag: &str, layers: &[(char, u64)]) -> Manifest {
        manifest(serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": desc(d('c'), 500),
            "layers": layers.iter().map(|&(c, s)| desc(d(c), s)).collect::<Vec<_>>(),
            "annotations": {"tag": tag},
        }))
    }

    /// An index of `children`, the first for linux/amd64, the others for
    /// linux/arm64.
    fn index(children: &[&Manifest]) -> Manifest {
        let platforms = children.iter().enumerate().map(|(i, m)| {
            let mut d = desc(m.digest.clone(), 1);
            let arch = if i == 0 { "amd64" } else { "arm64" };
            d["platform"] = serde_json::json!({"os": "linux", "architecture": arch});
            d
        });
        manifest(serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": platforms.collect::<Vec<_>>(),
        }))
    }

    fn ahead(max: u64) -> ReadAhead {
        ReadAhead::new(max, None)
    }

    fn blobs(a: Ahead) -> Vec<Digest> {
        assert_eq!(a.manifest, None);
        a.blobs
    }

    fn name(s: &str) -> Name {
        s.parse().unwrap()
    }

    #[test]
    fn a_cold_image_fetches_its_small_blobs_config_first() {
        let m = image("1", &[('a', 1000), ('b', 2000), ('e', 10), ('a', 1000)]);
        let got = blobs(ahead(1000).manifest(&name("org/app"), &m));
        assert_eq!(got, [d('c'), d('a'), d('e')]);
        assert_eq!(blobs(ahead(100).manifest(&name("org/app"), &m)), [d('e')]);
    }

    #[test]
    fn nothing_when_off_or_for_an_index_without_the_platform() {
        let m = image("1", &[('a', 10)]);
        let amd64 = Some(("linux".to_string(), "amd64".to_string()));
        let off = ReadAhead::new(0, amd64);
        assert_eq!(off.manifest(&name("org/app"), &m), Ahead::default());
        assert_eq!(
            off.manifest(&name("org/app"), &index(&[&m])),
            Ahead::default()
        );
        let no_platform = ahead(1000).manifest(&name("org/app"), &index(&[&m]));
        assert_eq!(no_platform, Ahead::default());
        let s390x = Some(("linux".to_string(), "s390x".to_string()));
        let none_for_it = ReadAhead::new(1000, s390x).manifest(&name("org/app"), &index(&[&m]));
        assert_eq!(none_for_it, Ahead::default());
    }

    #[test]
    fn an_index_fetches_its_child_for_the_platform() {
        let (amd, arm) = (image("amd64", &[('a', 10)]), image("arm64", &[('b', 10)]));
        let arm64 = Some(("linux".to_string(), "arm64".to_string()));
        let got = ReadAhead::new(1000, arm64).manifest(&name("org/app"), &index(&[&amd, &arm]));
        let want = Ahead {
            blobs: Vec::new(),
            manifest: Some(arm.digest.clone()),
        };
        assert_eq!(got, want);
    }

    #[test]
    fn a_second_child_of_one_index_gets_its_config_only() {
        let ahead = ahead(1000);
        let (amd, arm) = (image("amd64", &[('a', 10)]), image("arm64", &[('b', 10)]));
        let n = name("org/app");
        ahead.manifest(&n, &index(&[&amd, &arm]));
        // Another repository's index is another pull.
        ahead.manifest(&name("org/other"), &index(&[&amd, &arm]));
        assert_eq!(blobs(ahead.manifest(&n, &arm)), [d('c'), d('b')]);
        assert_eq!(blobs(ahead.manifest(&n, &amd)), [d('c')]);
        assert_eq!(
            blobs(ahead.manifest(&name("org/other"), &amd)),
            [d('c'), d('a')]
        );
    }

    #[test]
    fn memory_is_bounded() {
        let ahead = ahead(1000);
        let child = image("1", &[('a', 10)]);
        let many: Vec<Manifest> = (0..ENTRIES_MAX + 5)
            .map(|i| image(&i.to_string(), &[]))
            .collect();
        let big = index(&many.iter().collect::<Vec<_>>());
        for _ in 0..INDEXES_MAX + 3 {
            ahead.manifest(&name("org/app"), &big);
        }
        ahead.manifest(&name("org/app"), &index(&[&child]));
        let indexes = ahead.indexes.lock().unwrap();
        assert_eq!(indexes.len(), INDEXES_MAX);
        assert!(indexes.iter().all(|i| i.children.len() <= ENTRIES_MAX));
    }
}
