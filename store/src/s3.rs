//! The S3-compatible store (AWS S3, MinIO, Ceph RGW, R2, ...), through
//! `object_store`, under one prefix per upstream.
//!
//! ```text
//! <prefix>/blobs/sha256/<hex>                 blob bytes
//! <prefix>/manifests/sha256/<hex>             "<media type>\n" + the manifest bytes
//! <prefix>/repositories/<name>/_tags/<tag>    "<digest>\n<confirmed, ms since the epoch>\n"
//! <prefix>/repositories/<name>/_manifests/<digest>, _blobs/<digest>   empty: links
//! <prefix>/uses/<kind>/<hex or name/tag>      the time of the last use
//! ```
//! The layout mirrors the filesystem store's, so one reads like the other.
//! Blobs are uploaded from a verified spool, streaming (multipart above one
//! part), and only when absent: content is addressed by digest, so two
//! replicas uploading one blob upload the same bytes. Manifests are created
//! with `If-None-Match: *` where the server supports it. Signing uses
//! RustCrypto's SHA-256 and HMAC (no second TLS or crypto stack).

use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::client::{
    CryptoProvider, DigestAlgorithm, DigestContext, HmacContext, Signer, SigningAlgorithm,
};
use object_store::path::Path;
use object_store::{
    ClientOptions, GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutMode, PutOptions,
    PutPayload, RetryConfig, WriteMultipart,
};

use crate::{
    BlobReader, Digest, Error, Key, Manifest, Name, Repository, Result, Store, Tag, TagRecord,
    Usage, Verified,
};

/// Where the bucket is and how to reach it (registry:2's `REGISTRY_STORAGE_S3_*`).
#[derive(Clone)]
pub struct S3Config {
    pub bucket: String,
    pub region: String,
    /// A custom endpoint (MinIO, RGW, R2); `None`: AWS.
    pub endpoint: Option<String>,
    pub access_key: Option<String>,
    pub secret_key: Option<String>,
    /// Prefix of this upstream's objects (root directory + upstream).
    pub prefix: String,
    /// Bucket in the path (MinIO, most custom endpoints) or in the host name.
    pub path_style: bool,
    pub skip_verify: bool,
    /// Multipart part size.
    pub chunk_size: usize,
    /// Per-request timeout (connect and whole request).
    pub timeout: Duration,
}

impl fmt::Debug for S3Config {
    /// SECURITY: the keys never print.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

impl S3Config {
    /// What and where, without secrets.
    pub fn describe(&self) -> String {
        format!(
            "s3 bucket={} region={} endpoint={} prefix={}{}",
            self.bucket,
            self.region,
            self.endpoint.as_deref().unwrap_or("aws"),
            self.prefix,
            if self.path_style { " path-style" } else { "" }
        )
    }
}

/// The S3 store of one upstream.
#[derive(Clone)]
pub struct S3Store {
    s3: Arc<AmazonS3>,
    config: Arc<S3Config>,
}

fn s3_err(what: &str, e: object_store::Error) -> Error {
    Error::Remote {
        what: what.to_owned(),
        reason: e.to_string(),
    }
}

fn not_found(e: &object_store::Error) -> bool {
    matches!(e, object_store::Error::NotFound { .. })
}

impl S3Store {
    /// A client for the bucket (nothing is asked yet: a store that is away
    /// at start is found out by use, not by a failed start).
    pub fn new(config: S3Config) -> Result<S3Store> {
        crate::init_tls();
        let mut b = AmazonS3Builder::new()
            .with_bucket_name(&config.bucket)
            .with_region(&config.region)
            .with_virtual_hosted_style_request(!config.path_style)
            .with_crypto_provider(Arc::new(RustCrypto))
            .with_retry(RetryConfig {
                max_retries: 2,
                retry_timeout: config.timeout * 2,
                ..RetryConfig::default()
            })
            .with_client_options(
                ClientOptions::new()
                    .with_timeout(config.timeout)
                    .with_connect_timeout(config.timeout.min(Duration::from_secs(5)))
                    .with_allow_http(true)
                    .with_allow_invalid_certificates(config.skip_verify),
            );
        if let Some(e) = &config.endpoint {
            b = b.with_endpoint(e);
        }
        // Without keys: instance or task roles.
        if let (Some(a), Some(s)) = (&config.access_key, &config.secret_key) {
            b = b.with_access_key_id(a).with_secret_access_key(s);
        }
        let s3 = b.build().map_err(|e| s3_err(&config.describe(), e))?;
        Ok(S3Store {
            s3: Arc::new(s3),
            config: Arc::new(config),
        })
    }

    fn path(&self, rest: &str) -> Path {
        let prefix = self.config.prefix.trim_matches('/');
        if prefix.is_empty() {
            Path::from(rest)
        } else {
            Path::from(format!("{prefix}/{rest}"))
        }
    }

    fn key_path(&self, key: &Key) -> Path {
        match key {
            Key::Blob(d) => self.path(&format!("blobs/{}/{}", d.algorithm().as_str(), d.hex())),
            Key::Manifest(d) => {
                self.path(&format!("manifests/{}/{}", d.algorithm().as_str(), d.hex()))
            }
            Key::Tag(n, t) => self.path(&format!("repositories/{n}/_tags/{t}")),
        }
    }

    fn link_path(&self, name: &Name, key: &Key) -> Path {
        match key {
            Key::Blob(d) => self.path(&format!("repositories/{name}/_blobs/{d}")),
            Key::Manifest(d) => self.path(&format!("repositories/{name}/_manifests/{d}")),
            Key::Tag(n, t) => self.key_path(&Key::Tag(n.clone(), t.clone())),
        }
    }

    fn use_path(&self, key: &Key) -> Path {
        match key {
            Key::Blob(d) => self.path(&format!("uses/blobs/{}", d.hex())),
            Key::Manifest(d) => self.path(&format!("uses/manifests/{}", d.hex())),
            Key::Tag(n, t) => self.path(&format!("uses/tags/{n}/{t}")),
        }
    }

    /// Is the bucket there and are we let in? For a clear word at start.
    pub async fn probe(&self) -> Result<()> {
        let mut list = self.s3.list(Some(&self.path("blobs")));
        match list.next().await {
            None | Some(Ok(_)) => Ok(()),
            Some(Err(e)) => Err(s3_err(&self.config.describe(), e)),
        }
    }

    async fn get_optional(&self, path: &Path) -> Result<Option<Bytes>> {
        match self.s3.get(path).await {
            Ok(r) => Ok(Some(r.bytes().await.map_err(|e| s3_err(path.as_ref(), e))?)),
            Err(e) if not_found(&e) => Ok(None),
            Err(e) => Err(s3_err(path.as_ref(), e)),
        }
    }

    async fn exists(&self, path: &Path) -> Result<Option<object_store::ObjectMeta>> {
        match self.s3.head(path).await {
            Ok(m) => Ok(Some(m)),
            Err(e) if not_found(&e) => Ok(None),
            Err(e) => Err(s3_err(path.as_ref(), e)),
        }
    }

    async fn put(&self, path: &Path, bytes: Bytes, create: bool) -> Result<()> {
        let opts = PutOptions {
            mode: if create {
                PutMode::Create
            } else {
                PutMode::Overwrite
            },
            ..PutOptions::default()
        };
        match self
            .s3
            .put_opts(path, PutPayload::from(bytes.clone()), opts)
            .await
        {
            Ok(_) => Ok(()),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(()),
            // A server without conditional writes: content-addressed bytes
            // are the same whoever writes them.
            Err(object_store::Error::NotImplemented { .. }) if create => self
                .s3
                .put(path, PutPayload::from(bytes))
                .await
                .map(|_| ())
                .map_err(|e| s3_err(path.as_ref(), e)),
            Err(e) => Err(s3_err(path.as_ref(), e)),
        }
    }

    /// Uploads a local file as `path`: one PUT when small, multipart
    /// (streaming, part by part) when not.
    pub async fn upload_file(&self, path: &Path, file: std::fs::File, size: u64) -> Result<()> {
        let what = path.to_string();
        let chunk = self.config.chunk_size.max(5 << 20);
        if size as usize <= chunk {
            let bytes = tokio::task::spawn_blocking(move || {
                let mut buf = Vec::with_capacity(size as usize);
                (&file)
                    .take(size)
                    .read_to_end(&mut buf)
                    .map(|_| Bytes::from(buf))
            })
            .await
            .map_err(|e| Error::Remote {
                what: what.clone(),
                reason: e.to_string(),
            })?
            .map_err(|source| Error::Io {
                op: "read",
                path: what.clone().into(),
                source,
            })?;
            return self.put(path, bytes, true).await;
        }
        let upload = self
            .s3
            .put_multipart(path)
            .await
            .map_err(|e| s3_err(&what, e))?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, chunk);
        let mut file = file;
        loop {
            let (f, piece) = tokio::task::spawn_blocking(move || {
                let mut buf = vec![0u8; chunk];
                let n = file.read(&mut buf)?;
                buf.truncate(n);
                Ok::<_, std::io::Error>((file, buf))
            })
            .await
            .map_err(|e| Error::Remote {
                what: what.clone(),
                reason: e.to_string(),
            })?
            .map_err(|source| Error::Io {
                op: "read",
                path: what.clone().into(),
                source,
            })?;
            file = f;
            if piece.is_empty() {
                break;
            }
            writer
                .wait_for_capacity(2)
                .await
                .map_err(|e| s3_err(&what, e))?;
            writer.put(Bytes::from(piece));
        }
        writer.finish().await.map_err(|e| s3_err(&what, e))?;
        Ok(())
    }

    /// The blob's object path, for uploads from a local tier.
    pub fn blob_path(&self, digest: &Digest) -> Path {
        self.key_path(&Key::Blob(digest.clone()))
    }

    async fn list_names(&self, prefix: &Path) -> Result<Vec<Path>> {
        self.s3
            .list(Some(prefix))
            .map_ok(|m| m.location)
            .try_collect()
            .await
            .map_err(|e| s3_err(prefix.as_ref(), e))
    }
}

fn tag_text(record: &TagRecord) -> String {
    let ms = record
        .confirmed
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis();
    format!("{}\n{ms}\n", record.digest)
}

fn parse_tag(text: &str) -> Option<TagRecord> {
    let mut lines = text.lines();
    let digest = lines.next()?.trim().parse().ok()?;
    let ms: u64 = lines.next()?.trim().parse().ok()?;
    Some(TagRecord {
        digest,
        confirmed: UNIX_EPOCH + Duration::from_millis(ms),
    })
}

#[async_trait]
impl Store for S3Store {
    fn describe(&self) -> String {
        self.config.describe()
    }

    async fn blob_size(&self, digest: &Digest) -> Result<Option<u64>> {
        Ok(self
            .exists(&self.key_path(&Key::Blob(digest.clone())))
            .await?
            .map(|m| m.size))
    }

    async fn blob_open(&self, digest: &Digest) -> Result<Option<BlobReader>> {
        let path = self.key_path(&Key::Blob(digest.clone()));
        let Some(meta) = self.exists(&path).await? else {
            return Ok(None);
        };
        let s3 = self.s3.clone();
        Ok(Some(BlobReader::from_stream(
            meta.size,
            move |start, end| {
                let range = (start < end).then_some(GetRange::Bounded(start..end));
                let stream = async move {
                    if range.is_none() {
                        return Ok(futures_util::stream::empty().boxed());
                    }
                    let opts = GetOptions {
                        range,
                        ..GetOptions::default()
                    };
                    let got = s3.get_opts(&path, opts).await?;
                    Ok::<_, object_store::Error>(got.into_stream().boxed())
                };
                futures_util::stream::once(stream)
                    .try_flatten()
                    .map_err(std::io::Error::other)
                    .boxed()
            },
        )))
    }

    async fn blob_commit(&self, blob: Verified) -> Result<()> {
        let path = self.key_path(&Key::Blob(blob.digest().clone()));
        if self.exists(&path).await?.is_some() {
            return Ok(());
        }
        let file = blob
            .spool()
            .file()
            .try_clone()
            .map_err(|source| Error::Io {
                op: "open",
                path: blob.spool().path().to_owned(),
                source,
            })?;
        let file = reopen_at_start(file, blob.spool().path())?;
        self.upload_file(&path, file, blob.size()).await
    }

    async fn manifest_get(&self, digest: &Digest) -> Result<Option<Manifest>> {
        let path = self.key_path(&Key::Manifest(digest.clone()));
        match self.get_optional(&path).await? {
            Some(raw) => crate::fs::parse_manifest(digest, raw.to_vec()).map(Some),
            None => Ok(None),
        }
    }

    async fn manifest_put(&self, m: &Manifest) -> Result<()> {
        if !m.verifies() {
            return Err(Error::Mismatch {
                expected: m.digest.clone(),
                actual: Digest::of(m.digest.algorithm(), &m.bytes),
            });
        }
        let mut body = Vec::with_capacity(m.media_type.len() + 1 + m.bytes.len());
        body.extend_from_slice(m.media_type.as_bytes());
        body.push(b'\n');
        body.extend_from_slice(&m.bytes);
        self.put(
            &self.key_path(&Key::Manifest(m.digest.clone())),
            body.into(),
            true,
        )
        .await
    }

    async fn tag_get(&self, name: &Name, tag: &Tag) -> Result<Option<TagRecord>> {
        let path = self.key_path(&Key::Tag(name.clone(), tag.clone()));
        match self.get_optional(&path).await? {
            Some(raw) => parse_tag(&String::from_utf8_lossy(&raw))
                .map(Some)
                .ok_or_else(|| Error::Corrupt {
                    what: format!("tag {name}:{tag}"),
                    reason: "not a digest and a time".into(),
                }),
            None => Ok(None),
        }
    }

    async fn tag_put(&self, name: &Name, tag: &Tag, record: &TagRecord) -> Result<()> {
        let path = self.key_path(&Key::Tag(name.clone(), tag.clone()));
        self.put(&path, Bytes::from(tag_text(record)), false).await
    }

    async fn link(&self, name: &Name, key: &Key) -> Result<()> {
        self.put(&self.link_path(name, key), Bytes::new(), true)
            .await
    }

    async fn linked(&self, name: &Name, key: &Key) -> Result<bool> {
        Ok(self.exists(&self.link_path(name, key)).await?.is_some())
    }

    async fn repositories(&self) -> Result<BTreeMap<Name, Repository>> {
        let root = self.path("repositories");
        let mut out: BTreeMap<Name, Repository> = BTreeMap::new();
        for p in self.list_names(&root).await? {
            let Some(rest) = p
                .as_ref()
                .strip_prefix(root.as_ref())
                .map(|r| r.trim_start_matches('/'))
            else {
                continue;
            };
            let (name, what) = match ["/_tags/", "/_manifests/", "/_blobs/"]
                .iter()
                .find_map(|m| rest.rfind(m).map(|i| (&rest[..i], &rest[i..])))
            {
                Some(x) => x,
                None => continue,
            };
            let Ok(name) = name.parse::<Name>() else {
                continue;
            };
            if let Some(tag) = what.strip_prefix("/_tags/") {
                let Ok(tag) = tag.parse::<Tag>() else {
                    continue;
                };
                if let Ok(Some(rec)) = self.tag_get(&name, &tag).await {
                    out.entry(name).or_default().tags.insert(tag, rec);
                }
            } else if let Some(d) = what.strip_prefix("/_manifests/") {
                let repo = out.entry(name).or_default();
                if let Ok(d) = d.parse() {
                    repo.manifests.push(d);
                }
            }
        }
        for r in out.values_mut() {
            r.manifests.sort();
        }
        Ok(out)
    }

    async fn tags(&self, name: &Name) -> Result<Vec<Tag>> {
        let dir = self.path(&format!("repositories/{name}/_tags"));
        let mut tags: Vec<Tag> = self
            .list_names(&dir)
            .await?
            .iter()
            .filter_map(|p| p.filename()?.parse().ok())
            .collect();
        tags.sort();
        Ok(tags)
    }

    async fn delete(&self, key: &Key) -> Result<()> {
        for path in [self.key_path(key), self.use_path(key)] {
            match self.s3.delete(&path).await {
                Ok(()) => {}
                Err(e) if not_found(&e) => {}
                Err(e) => return Err(s3_err(path.as_ref(), e)),
            }
        }
        Ok(())
    }

    async fn touch(&self, key: &Key, at: SystemTime) -> Result<()> {
        if self.exists(&self.key_path(key)).await?.is_none() {
            return Ok(());
        }
        let ms = at
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        self.put(&self.use_path(key), Bytes::from(ms.to_string()), false)
            .await
    }

    async fn last_used(&self, key: &Key) -> Result<Option<SystemTime>> {
        let Some(meta) = self.exists(&self.key_path(key)).await? else {
            return Ok(None);
        };
        let used = self.get_optional(&self.use_path(key)).await?.and_then(|b| {
            let ms: u64 = String::from_utf8_lossy(&b).trim().parse().ok()?;
            Some(UNIX_EPOCH + Duration::from_millis(ms))
        });
        let stored = SystemTime::from(meta.last_modified);
        Ok(Some(used.unwrap_or(stored)))
    }

    async fn usage(&self) -> Result<Usage> {
        let mut u = Usage::default();
        for (dir, manifests) in [("blobs", false), ("manifests", true)] {
            let metas: Vec<object_store::ObjectMeta> = self
                .s3
                .list(Some(&self.path(dir)))
                .try_collect()
                .await
                .map_err(|e| s3_err(dir, e))?;
            for m in metas {
                u.bytes += m.size;
                if manifests {
                    u.manifests += 1;
                } else {
                    u.blobs += 1;
                }
            }
        }
        Ok(u)
    }
}

/// The spool's file, read from its start (the writer moved its position).
fn reopen_at_start(file: std::fs::File, path: &std::path::Path) -> Result<std::fs::File> {
    use std::io::{Seek, SeekFrom};
    let mut file = file;
    file.seek(SeekFrom::Start(0)).map_err(|source| Error::Io {
        op: "seek",
        path: path.to_owned(),
        source,
    })?;
    Ok(file)
}

/// SHA-256 and HMAC-SHA256 for request signing, from RustCrypto.
#[derive(Debug)]
struct RustCrypto;

struct Sha256Context(Option<sha2::Sha256>, Vec<u8>);
struct HmacSha256(Option<hmac::Hmac<sha2::Sha256>>, Vec<u8>);

impl DigestContext for Sha256Context {
    fn update(&mut self, data: &[u8]) {
        use sha2::Digest as _;
        if let Some(h) = &mut self.0 {
            h.update(data);
        }
    }

    fn finish(&mut self) -> object_store::Result<&[u8]> {
        use sha2::Digest as _;
        if let Some(h) = self.0.take() {
            self.1 = h.finalize().to_vec();
        }
        Ok(&self.1)
    }
}

impl HmacContext for HmacSha256 {
    fn update(&mut self, data: &[u8]) {
        use hmac::Mac as _;
        if let Some(h) = &mut self.0 {
            h.update(data);
        }
    }

    fn finish(&mut self) -> object_store::Result<&[u8]> {
        use hmac::Mac as _;
        if let Some(h) = self.0.take() {
            self.1 = h.finalize().into_bytes().to_vec();
        }
        Ok(&self.1)
    }
}

impl CryptoProvider for RustCrypto {
    fn digest(&self, _: DigestAlgorithm) -> object_store::Result<Box<dyn DigestContext>> {
        use sha2::Digest as _;
        Ok(Box::new(Sha256Context(
            Some(sha2::Sha256::new()),
            Vec::new(),
        )))
    }

    fn hmac(
        &self,
        _: DigestAlgorithm,
        secret: &[u8],
    ) -> object_store::Result<Box<dyn HmacContext>> {
        use hmac::Mac as _;
        let mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).map_err(|e| {
            object_store::Error::Generic {
                store: "S3",
                source: Box::new(e),
            }
        })?;
        Ok(Box::new(HmacSha256(Some(mac), Vec::new())))
    }

    fn sign(&self, _: SigningAlgorithm, _: &[u8]) -> object_store::Result<Box<dyn Signer>> {
        Err(object_store::Error::NotImplemented {
            operation: "RSA signing (GCP service accounts)".into(),
            implementer: "regcache".into(),
        })
    }
}
