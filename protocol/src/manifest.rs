//! What a manifest refers to: the blobs (config and layers) of an image
//! manifest, the child manifests of an index. Parsed with `oci-spec`'s types
//! (Docker's schema 2 manifests and lists share their shape); Docker's
//! schema 1 lists its layers as `fsLayers[].blobSum`.
//!
//! Used to link a repository to the content it was seen to have upstream,
//! to keep an image's blobs together, and to fetch small blobs ahead.

use oci_spec::image::{Arch, ImageIndex, ImageManifest, Os};

use crate::reference::{Digest, Manifest};

/// An OCI index or a Docker manifest list.
const INDEX_TYPES: [&str; 2] = [
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];
const SCHEMA1_TYPES: [&str; 3] = [
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
    "application/json",
];

/// The digests a manifest refers to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct References {
    /// Config and layers (of an image manifest).
    pub blobs: Vec<Digest>,
    /// Child manifests (of an index).
    pub manifests: Vec<Digest>,
}

/// A blob an image manifest refers to, with the size it declares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blob {
    pub digest: Digest,
    pub size: u64,
}

/// The blobs of an image manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub config: Blob,
    /// In manifest order.
    pub layers: Vec<Blob>,
}

/// `m` as an image manifest (OCI, Docker schema 2, or an artifact of that
/// shape); `None` for an index, a schema 1 manifest or what does not parse.
pub fn image_of(m: &Manifest) -> Option<Image> {
    let mt = m.media_type.as_str();
    if INDEX_TYPES.contains(&mt) || SCHEMA1_TYPES.contains(&mt) {
        return None;
    }
    parse_image(m).ok()
}

/// The first child of index `m` for `os` and `architecture` (of any
/// variant); `None` when `m` is no index or has none.
pub fn child_for(m: &Manifest, os: &str, architecture: &str) -> Option<Digest> {
    if !INDEX_TYPES.contains(&m.media_type.as_str()) {
        return None;
    }
    let index: ImageIndex = serde_json::from_slice(&m.bytes).ok()?;
    let child = index.manifests().iter().find(|d| {
        d.platform().as_ref().is_some_and(|p| {
            p.os().to_string() == os && p.architecture().to_string() == architecture
        })
    })?;
    child.digest().to_string().parse().ok()
}

/// The platform (os, architecture) of this machine, as an index names it.
pub fn host_platform() -> (String, String) {
    (Os::default().to_string(), Arch::default().to_string())
}

fn parse_image(m: &Manifest) -> Result<Image, Error> {
    let image: ImageManifest = serde_json::from_slice(&m.bytes).map_err(|e| m.unreadable(e))?;
    let blob = |d: &oci_spec::image::Descriptor| -> Result<Blob, Error> {
        Ok(Blob {
            digest: d
                .digest()
                .to_string()
                .parse()
                .map_err(|e| m.unreadable(e))?,
            size: d.size(),
        })
    };
    Ok(Image {
        config: blob(image.config())?,
        layers: image.layers().iter().map(blob).collect::<Result<_, _>>()?,
    })
}

impl Manifest {
    fn unreadable(&self, reason: impl std::fmt::Display) -> Error {
        Error {
            digest: self.digest.to_string(),
            media_type: self.media_type.clone(),
            reason: reason.to_string(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("manifest {digest} ({media_type}) cannot be read: {reason}")]
pub struct Error {
    digest: String,
    media_type: String,
    reason: String,
}

/// The references of `m`, by its media type (an unknown type is tried as an
/// image manifest, then as an index: artifacts use both shapes).
pub fn references(m: &Manifest) -> Result<References, Error> {
    let digests = |ds: Vec<String>| -> Result<Vec<Digest>, Error> {
        ds.iter()
            .map(|d| d.parse().map_err(|e| m.unreadable(e)))
            .collect()
    };
    let mt = m.media_type.as_str();
    if SCHEMA1_TYPES.contains(&mt) {
        #[derive(serde::Deserialize)]
        struct Schema1 {
            #[serde(rename = "fsLayers", default)]
            fs_layers: Vec<Layer>,
        }
        #[derive(serde::Deserialize)]
        struct Layer {
            #[serde(rename = "blobSum")]
            blob_sum: String,
        }
        let s: Schema1 = serde_json::from_slice(&m.bytes).map_err(|e| m.unreadable(e))?;
        let mut blobs = digests(s.fs_layers.into_iter().map(|l| l.blob_sum).collect())?;
        blobs.sort();
        blobs.dedup();
        return Ok(References {
            blobs,
            manifests: Vec::new(),
        });
    }
    let as_index = || -> Result<References, Error> {
        let index: ImageIndex = serde_json::from_slice(&m.bytes).map_err(|e| m.unreadable(e))?;
        Ok(References {
            blobs: Vec::new(),
            manifests: digests(
                index
                    .manifests()
                    .iter()
                    .map(|d| d.digest().to_string())
                    .collect(),
            )?,
        })
    };
    let as_image = || -> Result<References, Error> {
        let image = parse_image(m)?;
        let all = std::iter::once(image.config).chain(image.layers);
        Ok(References {
            blobs: all.map(|b| b.digest).collect(),
            manifests: Vec::new(),
        })
    };
    if INDEX_TYPES.contains(&mt) {
        as_index()
    } else {
        as_image().or_else(|e| as_index().map_err(|_| e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::Algorithm;
    use bytes::Bytes;

    fn manifest(media_type: &str, json: serde_json::Value) -> Manifest {
        let bytes = Bytes::from(json.to_string());
        Manifest {
            media_type: media_type.into(),
            digest: Digest::of(Algorithm::Sha256, &bytes),
            bytes,
        }
    }

    fn d(c: char) -> String {
        format!("sha256:{}", c.to_string().repeat(64))
    }

    fn desc(mt: &str, digest: &str) -> serde_json::Value {
        serde_json::json!({"mediaType": mt, "size": 1, "digest": digest})
    }

    #[test]
    fn every_shape() {
        let image = manifest(
            "application/vnd.docker.distribution.manifest.v2+json",
            serde_json::json!({
                "schemaVersion": 2,
                "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
                "config": desc("application/vnd.docker.container.image.v1+json", &d('c')),
                "layers": [desc("application/vnd.docker.image.rootfs.diff.tar.gzip", &d('a')),
                           desc("application/vnd.docker.image.rootfs.diff.tar.gzip", &d('b'))]
            }),
        );
        let r = references(&image).unwrap();
        let got: Vec<String> = r.blobs.iter().map(Digest::to_string).collect();
        assert_eq!(got, [d('c'), d('a'), d('b')]);
        assert!(r.manifests.is_empty());
        let blobs = image_of(&image).unwrap();
        assert_eq!(blobs.config.digest.to_string(), d('c'));
        assert_eq!(blobs.layers.len(), 2);
        assert_eq!(blobs.layers[1].size, 1);

        let index = manifest(
            "application/vnd.oci.image.index.v1+json",
            serde_json::json!({
                "schemaVersion": 2,
                "manifests": [desc("application/vnd.oci.image.manifest.v1+json", &d('1')),
                              desc("application/vnd.oci.image.manifest.v1+json", &d('2'))]
            }),
        );
        let r = references(&index).unwrap();
        assert_eq!(r.manifests.len(), 2);
        assert!(r.blobs.is_empty());
        assert_eq!(image_of(&index), None);
        assert_eq!(child_for(&index, "linux", "amd64"), None, "no platforms");

        let mut amd = desc("application/vnd.oci.image.manifest.v1+json", &d('3'));
        amd["platform"] = serde_json::json!({"os": "linux", "architecture": "amd64"});
        let mut arm = desc("application/vnd.oci.image.manifest.v1+json", &d('4'));
        arm["platform"] =
            serde_json::json!({"os": "linux", "architecture": "arm64", "variant": "v8"});
        let mut attestation = desc("application/vnd.oci.image.manifest.v1+json", &d('5'));
        attestation["platform"] = serde_json::json!({"os": "unknown", "architecture": "unknown"});
        let platforms = manifest(
            "application/vnd.docker.distribution.manifest.list.v2+json",
            serde_json::json!({"schemaVersion": 2, "manifests": [attestation, arm, amd]}),
        );
        let child = |os, arch| child_for(&platforms, os, arch).map(|d| d.to_string());
        assert_eq!(child("linux", "amd64"), Some(d('3')));
        assert_eq!(child("linux", "arm64"), Some(d('4')));
        assert_eq!(child("linux", "s390x"), None);
        assert_eq!(child_for(&image, "linux", "amd64"), None);
        assert_eq!(host_platform().0, "linux");

        let schema1 = manifest(
            "application/vnd.docker.distribution.manifest.v1+prettyjws",
            serde_json::json!({"schemaVersion": 1, "fsLayers": [{"blobSum": d('e')}, {"blobSum": d('e')}]}),
        );
        assert_eq!(references(&schema1).unwrap().blobs.len(), 1);
        assert_eq!(image_of(&schema1), None, "schema 1 declares no sizes");

        let artifact = manifest(
            "application/vnd.example.thing+json",
            serde_json::json!({"schemaVersion": 2, "manifests": [desc("x/y", &d('9'))]}),
        );
        assert_eq!(references(&artifact).unwrap().manifests.len(), 1);

        let garbage = manifest(
            "application/vnd.oci.image.manifest.v1+json",
            serde_json::json!({"x": 1}),
        );
        assert!(references(&garbage).is_err());
        assert_eq!(image_of(&garbage), None);
    }
}
