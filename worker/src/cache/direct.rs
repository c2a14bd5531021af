//! A blob served straight from upstream, stored nowhere: for blobs there is
//! no room for, and for the content of tags passed through (`never`).
//!
//! Each reader makes its own upstream request (from its start offset). A
//! whole-blob read is hashed on the way and its last chunk is held back
//! until the digest checks out, so wrong bytes never look complete.

use std::io;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::stream::{self, BoxStream};
use futures_util::{StreamExt, TryStreamExt};
use http::Method;
use regcache_protocol::request::Kind;
use regcache_protocol::{Digest, Hasher, Name};
use regcache_store::BlobReader;

use crate::upstream::Upstream;

/// A reader of `digest` (`size` bytes) from upstream.
pub(super) fn reader(up: Arc<Upstream>, name: Name, digest: Digest, size: u64) -> BlobReader {
    BlobReader::from_stream(size, move |start, end| {
        let open = async move {
            let path = format!("/v2/{name}/blobs/{digest}");
            let resp = if start == 0 {
                up.send(Method::GET, Some(&name), &path, None).await
            } else {
                up.get_from(&name, &path, start).await
            };
            let resp = resp
                .and_then(|r| up.check(r, Kind::Blob, &path))
                .map_err(io::Error::other)?;
            if start > 0 && resp.status() != reqwest::StatusCode::PARTIAL_CONTENT {
                return Err(io::Error::other("upstream ignored a Range request"));
            }
            let body = resp.bytes_stream().map_err(io::Error::other).boxed();
            let whole = start == 0 && end == size;
            Ok(limited(body, end - start, whole.then_some(digest)))
        };
        stream::once(open)
            .map(|opened| match opened {
                Ok(body) => body,
                Err(e) => stream::once(async move { Err(e) }).boxed(),
            })
            .flatten()
            .boxed()
    })
}

/// The first `len` bytes of `body`; verified against `digest` if given.
fn limited(
    body: BoxStream<'static, io::Result<Bytes>>,
    len: u64,
    digest: Option<Digest>,
) -> BoxStream<'static, io::Result<Bytes>> {
    let hasher = digest.as_ref().map(|d| Hasher::new(d.algorithm()));
    let state = (body, len, hasher, digest, None::<Bytes>);
    stream::unfold(Some(state), |state| async move {
        let (mut body, mut left, mut hasher, digest, mut held) = state?;
        loop {
            if left == 0 {
                // Done: the held chunk goes out only if the digest matches.
                let last = held?;
                if let (Some(h), Some(want)) = (hasher.take(), &digest) {
                    let got = h.finish();
                    if got != *want {
                        let e = io::Error::other(format!("upstream sent {got} for {want}"));
                        return Some((Err(e), None));
                    }
                }
                return Some((Ok(last), None));
            }
            match body.next().await {
                Some(Ok(mut chunk)) => {
                    if chunk.len() as u64 > left {
                        chunk.truncate(left as usize);
                    }
                    left -= chunk.len() as u64;
                    if let Some(h) = hasher.as_mut() {
                        h.update(&chunk);
                    }
                    if chunk.is_empty() {
                        continue;
                    }
                    // Hold back the newest chunk; send the one before.
                    if let Some(prev) = held.replace(chunk) {
                        return Some((Ok(prev), Some((body, left, hasher, digest, held))));
                    }
                }
                Some(Err(e)) => return Some((Err(e), None)),
                None => {
                    let e =
                        io::Error::new(io::ErrorKind::UnexpectedEof, "upstream body ended early");
                    return Some((Err(e), None));
                }
            }
        }
    })
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn collect(
        chunks: &[&'static [u8]],
        len: u64,
        digest: Option<Digest>,
    ) -> io::Result<Vec<u8>> {
        let chunks: Vec<io::Result<Bytes>> =
            chunks.iter().map(|c| Ok(Bytes::from_static(c))).collect();
        let body = stream::iter(chunks).boxed();
        let out: Vec<Bytes> = limited(body, len, digest).try_collect().await?;
        Ok(out.concat())
    }

    #[tokio::test]
    async fn whole_reads_are_verified_and_partial_reads_limited() {
        let d = Digest::of(regcache_protocol::Algorithm::Sha256, b"abcdef");
        assert_eq!(
            collect(&[b"abc", b"def"], 6, Some(d.clone()))
                .await
                .unwrap(),
            b"abcdef"
        );
        assert!(
            collect(&[b"abc", b"dXf"], 6, Some(d)).await.is_err(),
            "a wrong byte fails the end"
        );
        assert_eq!(collect(&[b"abc", b"def"], 4, None).await.unwrap(), b"abcd");
        assert!(
            collect(&[b"ab"], 4, None).await.is_err(),
            "short bodies fail"
        );
    }
}
