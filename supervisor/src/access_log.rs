//! One access-log line per request, written when the response body is done
//! (or the client went away), so that bytes and duration are the real ones.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body as _, Frame, SizeHint};
use regcache_worker::body::Body;

/// What the line says besides bytes and duration.
pub struct Entry {
    pub method: String,
    pub path: String,
    pub upstream: String,
    pub status: u16,
    pub cache: String,
    pub started: Instant,
}

/// A response body that logs its [`Entry`] when finished or dropped.
pub struct Logged {
    inner: Body,
    bytes: u64,
    entry: Option<Entry>,
}

impl Logged {
    pub fn wrap(inner: Body, entry: Entry) -> Body {
        Logged {
            inner,
            bytes: 0,
            entry: Some(entry),
        }
        .boxed_unsync()
    }

    fn emit(&mut self, complete: bool) {
        if let Some(e) = self.entry.take() {
            tracing::info!(
                target: "access",
                method = %e.method,
                path = %e.path,
                upstream = %e.upstream,
                status = e.status,
                bytes = self.bytes,
                duration_ms = e.started.elapsed().as_secs_f64() * 1000.0,
                cache = %e.cache,
                complete,
            );
        }
    }
}

impl hyper::body::Body for Logged {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    self.bytes += d.len() as u64;
                }
            }
            Poll::Ready(Some(Err(_))) => self.emit(false),
            Poll::Ready(None) => self.emit(true),
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        // Bodies hyper never polls to the end (HEAD, client gone) log here.
        let complete = self.inner.is_end_stream();
        self.emit(complete);
    }
}
