//! One access-log line per request, written when the response body is done
//! (or the client went away), so that bytes and duration are the real ones.

use std::borrow::Cow;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Body as _, Frame, SizeHint};
use regcache_protocol::body::Body;

use crate::log_lines;

/// What the line says besides bytes and duration; formatted only when the
/// line is written (the request's own values, no copies).
pub struct Entry {
    pub method: http::Method,
    pub uri: http::Uri,
    pub upstream: Option<String>,
    pub status: u16,
    /// The `X-Cache` header, when the answer has one.
    pub cache: Option<http::HeaderValue>,
    /// The body's announced length: all of it sent means complete, even
    /// when hyper stops polling before the stream says it ended.
    pub length: Option<u64>,
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

    /// Did the whole body go out?
    fn sent_all(&self) -> bool {
        let length = self.entry.as_ref().and_then(|e| e.length);
        length == Some(self.bytes) || self.inner.is_end_stream()
    }

    fn emit(&mut self, complete: bool) {
        let Some(e) = self.entry.take() else { return };
        if !tracing::enabled!(target: "access", tracing::Level::INFO) {
            return;
        }
        // A request line's URI is a path (the origin form); a proxy's
        // absolute form is rare enough to format.
        let uri = match e.uri.scheme() {
            None => Cow::Borrowed(e.uri.path_and_query().map_or("/", |p| p.as_str())),
            Some(_) => Cow::Owned(e.uri.to_string()),
        };
        use log_lines::Value::{Bool, Millis, Number, Text};
        log_lines::info(
            "access",
            &[
                ("method", Text(e.method.as_str())),
                ("path", Text(&uri)),
                ("upstream", Text(e.upstream.as_deref().unwrap_or("-"))),
                ("status", Number(e.status.into())),
                ("bytes", Number(self.bytes)),
                ("duration_ms", Millis(e.started.elapsed())),
                (
                    "cache",
                    Text(
                        e.cache
                            .as_ref()
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("-"),
                    ),
                ),
                ("complete", Bool(complete)),
            ],
        );
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
        // Bodies hyper does not poll to their end (HEAD, a known length
        // fully sent, the client gone) log here.
        let complete = self.sent_all();
        self.emit(complete);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logged(length: Option<u64>) -> Logged {
        let frames = futures_util::stream::iter([
            Ok(Frame::data(Bytes::from_static(b"ab"))),
            Ok(Frame::data(Bytes::from_static(b"cd"))),
        ]);
        Logged {
            inner: http_body_util::StreamBody::new(frames).boxed_unsync(),
            bytes: 0,
            entry: Some(Entry {
                method: http::Method::GET,
                uri: http::Uri::from_static("/"),
                upstream: None,
                status: 200,
                cache: None,
                length,
                started: Instant::now(),
            }),
        }
    }

    async fn poll(l: &mut Logged) {
        let frame = std::future::poll_fn(|cx| Pin::new(&mut *l).poll_frame(cx)).await;
        assert!(frame.is_some());
    }

    #[tokio::test]
    async fn complete_once_the_announced_length_went_out() {
        let mut l = logged(Some(4));
        poll(&mut l).await;
        assert!(!l.sent_all(), "half the body");
        poll(&mut l).await;
        assert!(l.sent_all(), "all 4 bytes, the end not yet polled");
        let mut unframed = logged(None);
        poll(&mut unframed).await;
        poll(&mut unframed).await;
        assert!(!unframed.sent_all(), "no length and no end seen");
    }
}
