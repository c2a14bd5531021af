//! Which small blobs to fetch before a client asks for them, so that a cold
//! pull pays its small blobs' round trips to upstream at once, not one
//! after another.
//!
//! A client that GETs an image manifest GETs its config next (docker,
//! containerd, skopeo, podman; containerd 2.1 does so for every child of an
//! index), so a cold manifest's config is fetched at once. Its layers only
//! once the client asks for one of them: then it is pulling this image, not
//! inspecting it or choosing among the platforms of an index. Only blobs up
//! to a size (`REGCACHE_READ_AHEAD`, 1 MiB by default, about what one round
//! trip costs on a fast link): for a larger blob the round trip is small
//! beside its bytes, and a wrong guess would cost more.

use std::collections::VecDeque;
use std::sync::Mutex;

use regcache_protocol::manifest::Image;
use regcache_protocol::{Digest, Name};

/// Cold manifests whose layers wait for the client's first layer request,
/// at most (the oldest is forgotten first): a pull asks for a layer soon
/// after its manifest.
const PENDING_MAX: usize = 16;
/// Layers of one image looked at, at most (Docker builds at most 127).
const LAYERS_MAX: usize = 128;

/// The default `REGCACHE_READ_AHEAD`.
pub const DEFAULT_MAX: u64 = 1 << 20;

/// What is fetched ahead, and the cold images whose layers may be.
#[derive(Debug)]
pub(super) struct ReadAhead {
    /// The largest blob fetched ahead (0: none).
    max: u64,
    pending: Mutex<VecDeque<Pending>>,
}

/// A cold image manifest of `name`: its layers, and which are small.
#[derive(Debug)]
struct Pending {
    name: Name,
    layers: Vec<Digest>,
    small: Vec<Digest>,
}

impl ReadAhead {
    pub(super) fn new(max: u64) -> ReadAhead {
        ReadAhead {
            max,
            pending: Mutex::default(),
        }
    }

    /// `image`, a manifest of `name` fetched from upstream for a client:
    /// the blob to fetch now (its config, when small). Its small layers
    /// wait for [`ReadAhead::blob`].
    pub(super) fn manifest(&self, name: &Name, image: &Image) -> Option<Digest> {
        if self.max == 0 {
            return None;
        }
        let layers = &image.layers[..image.layers.len().min(LAYERS_MAX)];
        let small: Vec<Digest> = layers
            .iter()
            .filter(|l| l.size <= self.max && l.digest != image.config.digest)
            .map(|l| l.digest.clone())
            .collect();
        // A lone layer's own request is its fetch.
        if !small.is_empty() && layers.len() > 1 {
            let mut pending = self.pending.lock().unwrap();
            if pending.len() == PENDING_MAX {
                pending.pop_front();
            }
            pending.push_back(Pending {
                name: name.clone(),
                layers: layers.iter().map(|l| l.digest.clone()).collect(),
                small,
            });
        }
        (image.config.size <= self.max).then(|| image.config.digest.clone())
    }

    /// A client asked for blob `digest` of `name`: if it is a layer of a
    /// cold image (the latest, when several share it), that image's other
    /// small layers, once.
    pub(super) fn blob(&self, name: &Name, digest: &Digest) -> Vec<Digest> {
        let mut pending = self.pending.lock().unwrap();
        let Some(at) = pending
            .iter()
            .rposition(|p| p.name == *name && p.layers.contains(digest))
        else {
            return Vec::new();
        };
        let mut small = pending.remove(at).expect("found above").small;
        small.retain(|l| l != digest);
        small
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use regcache_protocol::manifest::Blob;

    fn d(c: char) -> Digest {
        format!("sha256:{}", c.to_string().repeat(64))
            .parse()
            .unwrap()
    }

    fn image(config: u64, layers: &[(char, u64)]) -> Image {
        Image {
            config: Blob {
                digest: d('c'),
                size: config,
            },
            layers: layers
                .iter()
                .map(|&(c, size)| Blob { digest: d(c), size })
                .collect(),
        }
    }

    fn name(s: &str) -> Name {
        s.parse().unwrap()
    }

    #[test]
    fn the_config_at_once_the_small_layers_on_the_first_layer_request() {
        let ahead = ReadAhead::new(1000);
        let img = image(500, &[('a', 1000), ('b', 2000), ('e', 10)]);
        assert_eq!(ahead.manifest(&name("org/app"), &img), Some(d('c')));
        // The config request is no sign of a pull; another repository's
        // request is not this pull.
        assert!(ahead.blob(&name("org/app"), &d('c')).is_empty());
        assert!(ahead.blob(&name("org/other"), &d('a')).is_empty());
        assert_eq!(ahead.blob(&name("org/app"), &d('a')), [d('e')]);
        // Once only.
        assert!(ahead.blob(&name("org/app"), &d('e')).is_empty());

        // A big layer's request starts the small ones too.
        ahead.manifest(&name("org/app"), &image(5, &[('b', 2000), ('e', 10)]));
        assert_eq!(ahead.blob(&name("org/app"), &d('b')), [d('e')]);
    }

    #[test]
    fn nothing_when_off_or_too_big_or_alone() {
        let off = ReadAhead::new(0);
        let img = image(5, &[('a', 10), ('e', 10)]);
        assert_eq!(off.manifest(&name("org/app"), &img), None);
        assert!(off.blob(&name("org/app"), &d('a')).is_empty());

        let ahead = ReadAhead::new(100);
        assert_eq!(ahead.manifest(&name("org/app"), &image(101, &[])), None);
        // A lone layer's request is its fetch; big layers wait for theirs.
        ahead.manifest(&name("org/app"), &image(5, &[('a', 10)]));
        ahead.manifest(&name("org/app"), &image(5, &[('b', 500), ('e', 500)]));
        assert!(ahead.pending.lock().unwrap().is_empty());
    }

    #[test]
    fn a_shared_layer_starts_the_latest_image_and_memory_is_bounded() {
        let ahead = ReadAhead::new(100);
        ahead.manifest(&name("org/app"), &image(5, &[('a', 10), ('1', 10)]));
        ahead.manifest(&name("org/app"), &image(5, &[('a', 10), ('2', 10)]));
        assert_eq!(ahead.blob(&name("org/app"), &d('a')), [d('2')]);
        assert_eq!(ahead.blob(&name("org/app"), &d('a')), [d('1')]);
        for _ in 0..PENDING_MAX + 10 {
            ahead.manifest(&name("org/app"), &image(5, &[('a', 10), ('1', 10)]));
        }
        assert_eq!(ahead.pending.lock().unwrap().len(), PENDING_MAX);
    }
}
