//! A blob its worker is still filling, served from the fill's spool file:
//! the worker sends progress (`regcache_protocol::follow`), the front sends
//! the bytes from the page cache itself (by `sendfile` where the connection
//! allows, else read here), so no blob byte is relayed over the worker's
//! socket, and TLS and HTTP/2 clients get the same body.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use regcache_protocol::body::Body;
use regcache_protocol::follow::{self, Step};
use regcache_protocol::response::Outcome;
use regcache_store::{FsStore, ReadBuf};
use regcache_worker::metrics::Metrics;

use crate::sendfile::{self, Spans};

/// `resp`, a worker's followed answer, with the blob's bytes read from the
/// spool in `store`, or from the blob it became when it was committed a
/// moment ago (the same verified bytes). `None`: not a followed answer, or
/// neither file is there (the fill failed): ask again without following.
pub fn serve(
    store: &FsStore,
    metrics: Arc<Metrics>,
    resp: Response<Body>,
    sendfile: Option<&Spans>,
) -> Option<Response<Body>> {
    let spool = resp.headers().get(follow::SPOOL)?.to_str().ok()?;
    let file = match store.spool_file(spool)? {
        Ok(file) => file,
        Err(_) => {
            let digest = resp.headers().get("docker-content-digest")?;
            let digest = digest.to_str().ok()?.parse().ok()?;
            store.blob_file(&digest).ok()??.0
        }
    };
    metrics.fills_followed.inc();
    let (mut parts, steps) = resp.into_parts();
    let length = parts.headers.remove(follow::LENGTH);
    parts.headers.remove(follow::SPOOL);
    let start = match parts.status {
        StatusCode::PARTIAL_CONTENT => range_start(parts.headers.get(header::CONTENT_RANGE)?)?,
        _ => 0,
    };
    let end = match &length {
        Some(l) => Some(start + l.to_str().ok()?.parse::<u64>().ok()?),
        None => None,
    };
    if let Some(l) = length {
        parts.headers.insert(header::CONTENT_LENGTH, l);
    }
    let outcome = parts
        .headers
        .get("x-cache")
        .and_then(|v| Outcome::from_header(v.to_str().ok()?))
        .unwrap_or(Outcome::Miss);
    let reading = Reading {
        file: Arc::new(file),
        sendfile: sendfile.cloned(),
        steps,
        buf: Vec::new(),
        pos: start,
        readable: start,
        end,
        last: false,
    };
    let bytes = futures_util::stream::unfold(Some(reading), move |reading| {
        let metrics = metrics.clone();
        async move {
            let mut r = reading?;
            match r.next().await {
                Ok(Some(chunk)) => {
                    metrics.served(outcome, chunk.len() as u64);
                    Some((Ok(Frame::data(chunk)), Some(r)))
                }
                Ok(None) => None,
                Err(e) => Some((Err(e), None)),
            }
        }
    });
    Some(Response::from_parts(
        parts,
        StreamBody::new(bytes).boxed_unsync(),
    ))
}

/// `S` of `bytes S-E/T`.
fn range_start(v: &HeaderValue) -> Option<u64> {
    v.to_str()
        .ok()?
        .strip_prefix("bytes ")?
        .split('-')
        .next()?
        .parse()
        .ok()
}

/// One client's read of a followed fill.
struct Reading {
    file: Arc<File>,
    /// Set where the bytes go out by `sendfile`, not read here.
    sendfile: Option<Spans>,
    /// The worker's progress lines.
    steps: Body,
    buf: Vec<u8>,
    pos: u64,
    readable: u64,
    /// Where the answer ends, when its length is known.
    end: Option<u64>,
    /// The worker said nothing more becomes readable.
    last: bool,
}

impl Reading {
    /// The next chunk of the answer; `None` at its end. An error aborts the
    /// client's body (the fill failed, or its worker went away).
    async fn next(&mut self) -> io::Result<Option<Bytes>> {
        loop {
            let limit = self.end.map_or(self.readable, |e| e.min(self.readable));
            if self.pos < limit {
                if let Some(spans) = &self.sendfile {
                    let len = (limit - self.pos).min(sendfile::CHUNK as u64) as usize;
                    let chunk = spans.chunk(&self.file, self.pos, len);
                    self.pos += len as u64;
                    return Ok(Some(chunk));
                }
                let room = ReadBuf::following(limit - self.pos);
                // Bytes just written: a copy from the page cache, cheaper on
                // this thread than a hop to the blocking pool.
                let mut chunk = vec![0; room.size()];
                self.file.read_exact_at(&mut chunk, self.pos)?;
                self.pos += chunk.len() as u64;
                return Ok(Some(room.into_bytes(chunk)));
            }
            if self.last || self.end.is_some_and(|e| self.pos >= e) {
                if self.end.is_some_and(|e| self.pos < e) {
                    return Err(io::Error::other("blob fill ended short"));
                }
                return Ok(None);
            }
            let frame = match self.steps.frame().await {
                Some(frame) => frame?,
                None => return Err(io::Error::other("blob fill abandoned by its worker")),
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            self.buf.extend_from_slice(&data);
            let steps = follow::parse(&mut self.buf)
                .ok_or_else(|| io::Error::other("garbled fill progress from the worker"))?;
            for Step { readable, end } in steps {
                self.readable = self.readable.max(readable);
                self.last |= end;
            }
            if self.last {
                // The body's end is right behind its last line: read it, so
                // that the worker connection goes back to the pool.
                let _ = self.steps.frame().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use http_body_util::Full;
    use regcache_protocol::{Algorithm, Digest};
    use regcache_store::Store;

    use super::*;

    /// A worker's followed answer for `data`, naming `spool`, its progress
    /// already complete.
    fn followed(spool: &str, digest: &Digest, len: usize) -> Response<Body> {
        let step = Step {
            readable: len as u64,
            end: true,
        };
        Response::builder()
            .header(follow::SPOOL, spool)
            .header(follow::LENGTH, len.to_string())
            .header("docker-content-digest", digest.to_string())
            .header("x-cache", "MISS")
            .body(
                Full::from(step.encode())
                    .map_err(|e| match e {})
                    .boxed_unsync(),
            )
            .unwrap()
    }

    async fn body(resp: Response<Body>) -> Vec<u8> {
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec()
    }

    #[tokio::test]
    async fn a_fill_committed_before_the_front_looked_is_read_from_its_blob() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::open(dir.path()).unwrap();
        let data = regcache_testkit::random_bytes(100_000);
        let digest = Digest::of(Algorithm::Sha256, &data);
        let spool = store.spools().unwrap().create().unwrap();
        let name = spool
            .path()
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned();
        (&**spool.file()).write_all(&data).unwrap();
        let metrics = Arc::new(Metrics::new("upstream.test"));

        // Still spooled: read from the spool.
        let resp = serve(
            &store,
            metrics.clone(),
            followed(&name, &digest, data.len()),
            None,
        )
        .unwrap();
        assert_eq!(
            resp.headers()[header::CONTENT_LENGTH],
            data.len().to_string().as_str()
        );
        assert!(body(resp).await == data, "bytes from the spool");

        // Committed (the spool renamed away): read from the blob, still this answer.
        store
            .blob_commit(spool.verify(&digest, digest.clone()).unwrap())
            .await
            .unwrap();
        let resp = serve(
            &store,
            metrics.clone(),
            followed(&name, &digest, data.len()),
            None,
        )
        .unwrap();
        assert!(body(resp).await == data, "bytes from the committed blob");

        // Neither (a failed fill): the worker is asked again.
        let other = Digest::of(Algorithm::Sha256, b"never stored");
        assert!(serve(&store, metrics, followed(&name, &other, 12), None).is_none());
    }
}
