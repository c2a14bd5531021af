//! A blob its worker is still filling, served from the fill's spool file:
//! the worker sends progress (`regcache_protocol::follow`), the front sends
//! the bytes from the page cache itself (by `sendfile` where the connection
//! allows and it is the cheaper way, see `sendfile::Sending::copies`, else
//! read here), so no blob byte is relayed over the worker's socket, and TLS
//! and HTTP/2 clients get the same body.
//!
//! One fill, one progress stream: the first whole-blob answer naming a
//! spool is followed by a task of its own ([`drive`]), and every later
//! answer naming that spool joins it, dropping the worker's stream for it.
//! So 16 clients of one cold blob cost the worker one stream of progress
//! lines, not 16, and the front one socket to read.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::sync::{Arc, Mutex, Weak};

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use regcache_protocol::body::Body;
use regcache_protocol::follow::{self, Step};
use regcache_protocol::response::Outcome;
use regcache_store::{FsStore, ReadBuf};
use regcache_worker::metrics::Metrics;
use tokio::sync::watch;

use crate::sendfile::{self, Sending, Spans};

/// The fills one worker's answers are following now, by spool name.
#[derive(Default)]
pub struct Follows {
    /// Weak: a fill is followed while a client reads it, no longer.
    shared: Mutex<HashMap<Box<str>, Weak<Followed>>>,
}

/// One fill as the front follows it.
struct Followed {
    file: Arc<File>,
    progress: watch::Receiver<Progress>,
}

/// How far a followed answer may be read, as its worker said.
#[derive(Debug, Clone, Default)]
struct Progress {
    /// Bytes of the blob before this offset may be read.
    readable: u64,
    /// Nothing more becomes readable (for a whole blob: it is verified).
    end: bool,
    /// Why nothing more comes although it did not end: readers fail.
    failed: Option<&'static str>,
}

impl Follows {
    /// `resp`, a worker's followed answer, with the blob's bytes read from
    /// the spool in `store`, or from the blob it became when it was
    /// committed a moment ago (the same verified bytes). `None`: not a
    /// followed answer, or neither file is there (the fill failed): ask
    /// again without following.
    pub fn serve(
        &self,
        store: &FsStore,
        metrics: Arc<Metrics>,
        resp: Response<Body>,
        sendfile: Option<&Spans>,
    ) -> Option<Response<Body>> {
        let spool = resp.headers().get(follow::SPOOL)?.to_str().ok()?.to_owned();
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
        let fill = match self.joinable(&spool) {
            // The worker's progress for this answer is what the fill's
            // follower has already: dropping it ends the worker's stream.
            Some(fill) => fill,
            None => {
                let file = match store.spool_file(&spool)? {
                    Ok(file) => file,
                    Err(_) => {
                        let digest = parts.headers.get("docker-content-digest")?;
                        let digest = digest.to_str().ok()?.parse().ok()?;
                        store.blob_file(&digest).ok()??.0
                    }
                };
                let fill = Followed::start(file, steps);
                // A range answer's progress ends with its range, so only a
                // whole blob's can stand for the fill.
                if parts.status == StatusCode::OK {
                    self.share(spool, &fill);
                }
                fill
            }
        };
        metrics.fills_followed.inc();
        if let Some(l) = length {
            parts.headers.insert(header::CONTENT_LENGTH, l);
        }
        let outcome = parts
            .headers
            .get("x-cache")
            .and_then(|v| Outcome::from_header(v.to_str().ok()?))
            .unwrap_or(Outcome::Miss);
        let reading = Reading {
            progress: fill.progress.clone(),
            fill,
            sendfile: sendfile.map(Spans::sending),
            pos: start,
            end,
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

    /// The fill `spool` as a client reads it now, unless it failed.
    fn joinable(&self, spool: &str) -> Option<Arc<Followed>> {
        let fill = self.shared.lock().unwrap().get(spool)?.upgrade()?;
        let failed = fill.progress.borrow().failed.is_some();
        (!failed).then_some(fill)
    }

    fn share(&self, spool: String, fill: &Arc<Followed>) {
        let mut shared = self.shared.lock().unwrap();
        shared.retain(|_, f| f.strong_count() > 0);
        shared.insert(spool.into(), Arc::downgrade(fill));
    }

    /// Fills followed now (for tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        let shared = self.shared.lock().unwrap();
        shared.values().filter(|f| f.strong_count() > 0).count()
    }
}

impl Followed {
    /// Follows `steps`, the progress of an answer about `file`, on a task
    /// of its own, so that it goes on whichever of its clients leaves.
    fn start(file: File, steps: Body) -> Arc<Followed> {
        let (tx, progress) = watch::channel(Progress::default());
        tokio::spawn(drive(steps, tx));
        Arc::new(Followed {
            file: Arc::new(file),
            progress,
        })
    }
}

/// Reads a worker's progress lines into `tx` until they end, fail, or no
/// reader is left (which drops the worker's stream).
async fn drive(mut steps: Body, tx: watch::Sender<Progress>) {
    let mut buf = Vec::new();
    let failed = loop {
        let frame = tokio::select! {
            () = tx.closed() => return,
            frame = steps.frame() => frame,
        };
        let data = match frame {
            None => break "blob fill abandoned by its worker",
            Some(Err(_)) => break "blob fill failed",
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => data,
                Err(_) => continue,
            },
        };
        buf.extend_from_slice(&data);
        let Some(told) = follow::parse(&mut buf) else {
            break "garbled fill progress from the worker";
        };
        let mut end = false;
        tx.send_if_modified(|p| {
            let before = (p.readable, p.end);
            for Step { readable, end } in &told {
                p.readable = p.readable.max(*readable);
                p.end |= end;
            }
            end = p.end;
            before != (p.readable, p.end)
        });
        if end {
            // The body's end is right behind its last line: read it, so
            // that the worker connection goes back to the pool.
            let _ = steps.frame().await;
            return;
        }
    };
    tx.send_modify(|p| p.failed = Some(failed));
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
    fill: Arc<Followed>,
    progress: watch::Receiver<Progress>,
    /// Set where the bytes may go out by `sendfile` rather than read here.
    sendfile: Option<Sending>,
    pos: u64,
    /// Where the answer ends, when its length is known.
    end: Option<u64>,
}

impl Reading {
    /// The next chunk of the answer; `None` at its end. An error aborts the
    /// client's body (the fill failed, or its worker went away).
    async fn next(&mut self) -> io::Result<Option<Bytes>> {
        loop {
            let Progress {
                readable,
                end: ended,
                failed,
            } = self.progress.borrow_and_update().clone();
            let limit = self.end.map_or(readable, |e| e.min(readable));
            if self.pos < limit {
                let (file, at) = (&self.fill.file, self.pos);
                let chunk = match &self.sendfile {
                    Some(sending) => sending.next(file, at, limit, ReadBuf::following)?,
                    None => sendfile::read(file, at, ReadBuf::following(limit - at))?,
                };
                self.pos += chunk.len() as u64;
                return Ok(Some(chunk));
            }
            if self.end.is_some_and(|e| self.pos >= e) {
                return Ok(None);
            }
            if ended {
                return match self.end {
                    Some(_) => Err(io::Error::other("blob fill ended short")),
                    None => Ok(None),
                };
            }
            if let Some(why) = failed {
                return Err(io::Error::other(why));
            }
            if self.progress.changed().await.is_err() {
                return Err(io::Error::other("blob fill abandoned"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::time::Duration;

    use http_body_util::Full;
    use regcache_protocol::{Algorithm, Digest};
    use regcache_store::{Spool, Store};
    use tokio::sync::mpsc;

    use super::*;

    /// One fill's spool holding `data` (its progress still to come), and
    /// the front's follows of that store.
    struct Fill {
        _dir: tempfile::TempDir,
        store: FsStore,
        spool: Option<Spool>,
        name: String,
        digest: Digest,
        data: Vec<u8>,
        follows: Follows,
    }

    impl Fill {
        fn new(len: usize) -> Fill {
            let data = regcache_testkit::random_bytes(len);
            let dir = tempfile::tempdir().unwrap();
            let store = FsStore::open(dir.path()).unwrap();
            let spool = store.spools().unwrap().create().unwrap();
            let name = spool.path().file_name().unwrap().to_str();
            let name = name.unwrap().to_owned();
            (&**spool.file()).write_all(&data).unwrap();
            Fill {
                _dir: dir,
                store,
                spool: Some(spool),
                name,
                digest: Digest::of(Algorithm::Sha256, &data),
                data,
                follows: Follows::default(),
            }
        }

        /// The front's answer to the worker's followed answer for `len`
        /// bytes from `start` (a 206 when `start > 0`), `body` its progress.
        fn serve(&self, start: u64, len: usize, body: Body) -> Option<Response<Body>> {
            self.serve_on(start, len, body, None)
        }

        /// The same, on a plain-TCP connection with `spans`, if given.
        fn serve_on(
            &self,
            start: u64,
            len: usize,
            body: Body,
            spans: Option<&Spans>,
        ) -> Option<Response<Body>> {
            let mut b = Response::builder()
                .header(follow::SPOOL, self.name.as_str())
                .header(follow::LENGTH, len.to_string())
                .header("docker-content-digest", self.digest.to_string())
                .header("x-cache", "MISS");
            if start > 0 {
                let range = format!("bytes {start}-{}/*", start + len as u64 - 1);
                b = b
                    .status(StatusCode::PARTIAL_CONTENT)
                    .header(header::CONTENT_RANGE, range);
            }
            let metrics = Arc::new(Metrics::new("upstream.test"));
            self.follows
                .serve(&self.store, metrics, b.body(body).unwrap(), spans)
        }

        /// The whole blob, its progress sent through the returned sender.
        fn client(&self) -> (Progress, Response<Body>) {
            let (tx, body) = progress();
            (tx, self.serve(0, self.data.len(), body).unwrap())
        }

        /// The whole blob, its progress complete.
        fn done(&self) -> Option<Response<Body>> {
            let step = Step {
                readable: self.data.len() as u64,
                end: true,
            };
            let body = Full::from(step.encode()).map_err(|e| match e {});
            self.serve(0, self.data.len(), body.boxed_unsync())
        }
    }

    type Progress = mpsc::Sender<io::Result<Bytes>>;

    /// Progress sent line by line through the returned sender.
    fn progress() -> (Progress, Body) {
        let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(8);
        let lines = futures_util::stream::unfold(rx, |mut rx| async move {
            let line = rx.recv().await?;
            Some((line.map(Frame::data), rx))
        });
        (tx, StreamBody::new(lines).boxed_unsync())
    }

    async fn send(tx: &Progress, line: &'static str) {
        tx.send(Ok(Bytes::from(line))).await.unwrap();
    }

    /// The whole body, or an error (also when it is not complete in 10 s).
    async fn body(resp: Response<Body>) -> io::Result<Vec<u8>> {
        let all = tokio::time::timeout(Duration::from_secs(10), resp.into_body().collect());
        Ok(all.await??.to_bytes().to_vec())
    }

    /// The worker's stream was dropped (within a few seconds).
    async fn dropped(tx: &Progress) -> bool {
        tokio::time::timeout(Duration::from_secs(5), tx.closed())
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn a_fill_committed_before_the_front_looked_is_read_from_its_blob() {
        let mut fill = Fill::new(100_000);

        // Still spooled: read from the spool.
        let resp = fill.done().unwrap();
        let length = &resp.headers()[header::CONTENT_LENGTH];
        assert_eq!(length, fill.data.len().to_string().as_str());
        assert!(body(resp).await.unwrap() == fill.data, "from the spool");

        // Committed (the spool renamed away): read from the blob, still this answer.
        let spool = fill.spool.take().unwrap();
        let verified = spool.verify(&fill.digest, fill.digest.clone()).unwrap();
        fill.store.blob_commit(verified).await.unwrap();
        let resp = fill.done().unwrap();
        assert!(body(resp).await.unwrap() == fill.data, "from the blob");
    }

    #[tokio::test]
    async fn a_fill_neither_spooled_nor_committed_is_asked_for_again() {
        let mut fill = Fill::new(100);
        fill.digest = Digest::of(Algorithm::Sha256, b"never stored");
        fill.name = "spool-gone".into();
        assert!(fill.done().is_none());
    }

    #[tokio::test]
    async fn the_clients_of_one_fill_share_one_progress_stream() {
        let fill = Fill::new(300_000);
        let (first, a) = fill.client();
        // A second whole answer and a range, both for the same spool, join
        // the first: their own progress streams are dropped at once.
        let (second, b) = fill.client();
        let (ranged, steps) = progress();
        let c = fill.serve(100_000, 100_000, steps).unwrap();
        assert!(dropped(&second).await && dropped(&ranged).await);
        assert_eq!(fill.follows.len(), 1);
        assert_eq!(c.status(), StatusCode::PARTIAL_CONTENT);

        let reads = tokio::spawn(async move {
            let (a, b, c) = tokio::join!(body(a), body(b), body(c));
            (a.unwrap(), b.unwrap(), c.unwrap())
        });
        for line in ["150000\n", "299999\n", "300000 end\n"] {
            send(&first, line).await;
        }
        drop(first);
        let (a, b, c) = reads.await.unwrap();
        assert!(
            a == fill.data && b == fill.data,
            "whole answers get every byte"
        );
        assert!(c == fill.data[100_000..200_000], "the range gets its bytes");
        assert_eq!(
            fill.follows.len(),
            0,
            "a fill nobody reads is still followed"
        );
    }

    /// The next chunk of `body`.
    async fn chunk(body: &mut Body) -> Bytes {
        let frame = tokio::time::timeout(Duration::from_secs(10), body.frame());
        frame.await.unwrap().unwrap().unwrap().into_data().unwrap()
    }

    #[tokio::test]
    async fn a_lone_client_on_this_host_gets_copies_until_another_joins() {
        let fill = Fill::new(300_000);
        let len = fill.data.len();
        let (tx, steps) = progress();
        let bodies = Box::leak(Box::default());
        let here = Spans::new(true, bodies);
        let mut a = fill.serve_on(0, len, steps, Some(&here)).unwrap();
        send(&tx, "100000\n").await;
        let copied = chunk(a.body_mut()).await;
        assert!(!sendfile::is_placeholder(&copied));
        assert!(copied == fill.data[..copied.len()], "copied bytes");

        // A second client of the fill: from now on both get `sendfile`.
        let (_joined, steps) = progress();
        let mut b = fill.serve_on(0, len, steps, Some(&here)).unwrap();
        send(&tx, "200000\n").await;
        assert!(sendfile::is_placeholder(&chunk(a.body_mut()).await));
        assert!(sendfile::is_placeholder(&chunk(b.body_mut()).await));

        // A lone client elsewhere gets `sendfile` all along.
        drop((a, b));
        let (tx, steps) = progress();
        let away = Spans::new(false, bodies);
        let mut c = fill.serve_on(0, len, steps, Some(&away)).unwrap();
        send(&tx, "300000 end\n").await;
        assert!(sendfile::is_placeholder(&chunk(c.body_mut()).await));
    }

    #[tokio::test]
    async fn a_fill_followed_for_others_outlives_the_client_that_started_it() {
        let fill = Fill::new(200_000);
        let (first, a) = fill.client();
        let (_second, b) = fill.client();
        drop(a); // the first client leaves
        let reading = tokio::spawn(body(b));
        send(&first, "200000 end\n").await;
        drop(first);
        assert!(reading.await.unwrap().unwrap() == fill.data);

        // And when every client has left, the worker's stream is dropped.
        let (first, a) = fill.client();
        drop(a);
        assert!(
            dropped(&first).await,
            "nobody reads, yet the stream is kept"
        );
    }

    #[tokio::test]
    async fn a_failed_fill_fails_every_client_and_is_not_joined() {
        let fill = Fill::new(200_000);
        let (first, a) = fill.client();
        let (second, b) = fill.client();
        assert!(dropped(&second).await, "the second client did not join");
        let reads = tokio::spawn(async move { tokio::join!(body(a), body(b)) });
        send(&first, "100000\n").await;
        let failure = io::Error::other("digest mismatch");
        first.send(Err(failure)).await.unwrap();
        let (a, b) = reads.await.unwrap();
        assert!(a.is_err() && b.is_err(), "a failed fill looked complete");

        // A later answer naming that spool follows its own progress.
        let (third, c) = fill.client();
        send(&third, "200000 end\n").await;
        drop(third);
        assert!(body(c).await.unwrap() == fill.data);
    }
}
