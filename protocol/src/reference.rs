//! Validated repository names, tags, digests and registry authorities, and
//! the manifest as it travels: exact bytes, media type, digest.
//!
//! Everything that reaches storage or the upstream passes through these types
//! first, so a path built from them can never escape the storage root: names
//! are lowercase alphanumerics joined by `.`, `_`, `__`, `-` and `/` (no empty
//! component, no `..`), tags and digests hold no `/` at all.

use std::fmt;
use std::str::FromStr;

use bytes::Bytes;

/// Longest repository name accepted (what `distribution/reference` allows).
const MAX_NAME_LEN: usize = 255;

/// Why a name, tag or digest was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("invalid repository name {0:?}")]
    Name(String),
    #[error("invalid tag {0:?}")]
    Tag(String),
    #[error("invalid digest {0:?}")]
    Digest(String),
    #[error("unsupported digest algorithm in {0:?} (sha256 and sha512 are supported)")]
    Algorithm(String),
}

/// A repository name as the OCI distribution spec defines it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Name(String);

impl Name {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The path components, for building storage paths.
    pub fn components(&self) -> impl Iterator<Item = &str> {
        self.0.split('/')
    }
}

impl FromStr for Name {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        if s.is_empty() || s.len() > MAX_NAME_LEN || !s.split('/').all(valid_component) {
            return Err(Error::Name(s.to_owned()));
        }
        Ok(Name(s.to_owned()))
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
pub fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = matches!(sep, "." | "_" | "__") || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// A tag: `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tag(String);

impl Tag {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Tag {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let b = s.as_bytes();
        let first_ok = b
            .first()
            .is_some_and(|&x| x.is_ascii_alphanumeric() || x == b'_');
        let rest_ok = b[1.min(b.len())..]
            .iter()
            .all(|&x| x.is_ascii_alphanumeric() || matches!(x, b'_' | b'.' | b'-'));
        if !first_ok || !rest_ok || b.len() > 128 {
            return Err(Error::Tag(s.to_owned()));
        }
        Ok(Tag(s.to_owned()))
    }
}

impl fmt::Display for Tag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The digest algorithms we can verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    Sha256,
    Sha512,
}

impl Algorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }
}

/// A content digest, `algorithm:hex`, with lowercase hex of the right length.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    algorithm: Algorithm,
    hex: String,
}

impl Digest {
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// The digest of `bytes` under `algorithm`.
    pub fn of(algorithm: Algorithm, bytes: &[u8]) -> Digest {
        let mut h = Hasher::new(algorithm);
        h.update(bytes);
        h.finish()
    }
}

impl FromStr for Digest {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let (algo, hex) = s
            .split_once(':')
            .ok_or_else(|| Error::Digest(s.to_owned()))?;
        let algorithm = match algo {
            "sha256" => Algorithm::Sha256,
            "sha512" => Algorithm::Sha512,
            a if !a.is_empty()
                && a.bytes().all(|x| {
                    x.is_ascii_lowercase() || x.is_ascii_digit() || b"+._-".contains(&x)
                }) =>
            {
                return Err(Error::Algorithm(s.to_owned()))
            }
            _ => return Err(Error::Digest(s.to_owned())),
        };
        let hex_ok = hex.len() == algorithm.hex_len()
            && hex
                .bytes()
                .all(|x| x.is_ascii_digit() || (b'a'..=b'f').contains(&x));
        if !hex_ok {
            return Err(Error::Digest(s.to_owned()));
        }
        Ok(Digest {
            algorithm,
            hex: hex.to_owned(),
        })
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm.as_str(), self.hex)
    }
}

/// A manifest as stored and served: its exact bytes (the digest is over
/// them, so they are never re-serialized), its media type and its digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub media_type: String,
    pub bytes: Bytes,
    pub digest: Digest,
}

impl Manifest {
    /// True when `bytes` hash to `digest`.
    pub fn verifies(&self) -> bool {
        Digest::of(self.digest.algorithm(), &self.bytes) == self.digest
    }
}

/// A registry's `host[:port]`: the one way regcache names an upstream in
/// logs, metric labels, error messages and storage paths.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Authority {
    host: String,
    port: Option<u16>,
}

impl Authority {
    pub fn new(host: impl Into<String>, port: Option<u16>) -> Authority {
        Authority {
            host: host.into(),
            port,
        }
    }

    /// The authority of `url` (a default port is not shown, as URLs do).
    pub fn of(url: &url::Url) -> Authority {
        Authority::new(url.host_str().unwrap_or_default(), url.port())
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub fn port(&self) -> Option<u16> {
        self.port
    }

    /// As a directory name, `host_port`: a `:` is awkward in paths and volumes.
    pub fn dir_name(&self) -> String {
        self.to_string().replace(':', "_")
    }
}

impl fmt::Display for Authority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            Some(p) => write!(f, "{}:{p}", self.host),
            None => f.write_str(&self.host),
        }
    }
}

/// A manifest reference: a tag or a digest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Reference {
    Tag(Tag),
    Digest(Digest),
}

impl FromStr for Reference {
    type Err = Error;

    /// A reference with a `:` is a digest (tags cannot hold one).
    fn from_str(s: &str) -> Result<Self, Error> {
        if s.contains(':') {
            s.parse().map(Reference::Digest)
        } else {
            s.parse().map(Reference::Tag)
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => t.fmt(f),
            Reference::Digest(d) => d.fmt(f),
        }
    }
}

/// Incremental digest computation.
pub enum Hasher {
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
}

impl Hasher {
    pub fn new(algorithm: Algorithm) -> Hasher {
        use sha2::Digest as _;
        match algorithm {
            Algorithm::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            Algorithm::Sha512 => Hasher::Sha512(sha2::Sha512::new()),
        }
    }

    pub fn update(&mut self, bytes: &[u8]) {
        use sha2::Digest as _;
        match self {
            Hasher::Sha256(h) => h.update(bytes),
            Hasher::Sha512(h) => h.update(bytes),
        }
    }

    pub fn finish(self) -> Digest {
        use sha2::Digest as _;
        let (algorithm, hex) = match self {
            Hasher::Sha256(h) => (Algorithm::Sha256, hex::encode(h.finalize())),
            Hasher::Sha512(h) => (Algorithm::Sha512, hex::encode(h.finalize())),
        };
        Digest { algorithm, hex }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in [
            "a",
            "library/debian",
            "org/img",
            "ghcr.io",
            "a-b/c__d/e.f/g_h",
            "a---b",
            "0/1/2",
            "foo/blobs/bar",
        ] {
            assert!(ok.parse::<Name>().is_ok(), "{ok} should be valid");
        }
        for bad in [
            "", "/a", "a/", "a//b", "..", "a/../b", "a/./b", "A/b", "a..b", "a._b", "a___b", "-a",
            "a-", "a%2e%2e", "a b", "a:5000/b", "a\\b",
        ] {
            assert!(bad.parse::<Name>().is_err(), "{bad:?} should be invalid");
        }
        assert!("a".repeat(256).parse::<Name>().is_err());
    }

    #[test]
    fn tags() {
        for ok in ["latest", "1.0", "_x", "A-b.C_d", &"a".repeat(128)] {
            assert!(ok.parse::<Tag>().is_ok(), "{ok}");
        }
        for bad in ["", ".x", "-x", "a/b", "a:b", "..", &"a".repeat(129), "a%2F"] {
            assert!(bad.parse::<Tag>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn digests() {
        let hex = "a".repeat(64);
        let d: Digest = format!("sha256:{hex}").parse().unwrap();
        assert_eq!(d.to_string(), format!("sha256:{hex}"));
        assert!(format!("sha512:{}", "0".repeat(128))
            .parse::<Digest>()
            .is_ok());
        for bad in [
            "sha256:short".to_string(),
            format!("sha256:{}", "A".repeat(64)),
            format!("sha256:{}", "g".repeat(64)),
            format!("sha256:{}", "a".repeat(65)),
            "sha256".to_string(),
            format!(":{hex}"),
            format!("sha256:../{}", "a".repeat(61)),
        ] {
            assert_eq!(bad.parse::<Digest>(), Err(Error::Digest(bad.clone())));
        }
        assert!(matches!(
            format!("md5:{hex}").parse::<Digest>(),
            Err(Error::Algorithm(_))
        ));
    }

    #[test]
    fn references() {
        assert!(matches!("v1".parse::<Reference>(), Ok(Reference::Tag(_))));
        let d = format!("sha256:{}", "0".repeat(64));
        assert!(matches!(d.parse::<Reference>(), Ok(Reference::Digest(_))));
        assert!("sha256:xyz".parse::<Reference>().is_err());
    }

    #[test]
    fn authorities() {
        let url: url::Url = "http://127.0.0.1:15000/v2/".parse().unwrap();
        let a = Authority::of(&url);
        assert_eq!(
            (a.to_string(), a.dir_name()),
            ("127.0.0.1:15000".into(), "127.0.0.1_15000".into())
        );
        let url: url::Url = "https://ghcr.io:443".parse().unwrap();
        assert_eq!(Authority::of(&url).to_string(), "ghcr.io");
    }

    #[test]
    fn hashing() {
        let d = Digest::of(Algorithm::Sha256, b"");
        assert_eq!(
            d.hex(),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
