//! The responses a registry cache sends for manifests and blobs, and the last
//! touches every response gets ([`finish`]). The front (hits by digest) and
//! the workers (everything else) answer through these, so a client sees the
//! same headers whoever answered.

use std::io;

use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::TryStreamExt;
use http::{header, HeaderMap, HeaderName, HeaderValue, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};

use crate::body::{empty, full, Body};
use crate::range::{self, Plan};
use crate::reference::{Digest, Manifest};
use crate::request::Method;

/// The header naming the API version, on every response.
pub const API_VERSION: (&str, &str) = ("docker-distribution-api-version", "registry/2.0");
/// Header names, parsed at compile time (a manifest hit sends all three).
pub const X_CACHE: HeaderName = HeaderName::from_static("x-cache");
const DIGEST: HeaderName = HeaderName::from_static("docker-content-digest");
const API_VERSION_NAME: HeaderName = HeaderName::from_static(API_VERSION.0);

/// How a response was produced: the `X-Cache` header and the `result` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Hit,
    Miss,
    Revalidated,
    Stale,
    /// Passed through from upstream, stored nowhere (no room, or a tag rule).
    Bypass,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Hit => "hit",
            Outcome::Miss => "miss",
            Outcome::Revalidated => "revalidated",
            Outcome::Stale => "stale",
            Outcome::Bypass => "bypass",
        }
    }

    pub fn header(self) -> &'static str {
        match self {
            Outcome::Hit => "HIT",
            Outcome::Miss => "MISS",
            Outcome::Revalidated => "REVALIDATED",
            Outcome::Stale => "STALE",
            Outcome::Bypass => "BYPASS",
        }
    }

    /// The outcome an `X-Cache` header names.
    pub fn from_header(value: &str) -> Option<Outcome> {
        [
            Outcome::Hit,
            Outcome::Miss,
            Outcome::Revalidated,
            Outcome::Stale,
            Outcome::Bypass,
        ]
        .into_iter()
        .find(|o| o.header() == value)
    }

    /// Were the bytes of this answer local (not fetched for it)?
    pub fn from_cache(self) -> bool {
        !matches!(self, Outcome::Miss | Outcome::Bypass)
    }
}

/// The last touches of every response: the API version header, and no body
/// on a HEAD (its headers stay those of the GET).
pub fn finish(resp: &mut Response<Body>, method: Method) {
    resp.headers_mut()
        .insert(API_VERSION_NAME, HeaderValue::from_static(API_VERSION.1));
    if method == Method::Head {
        *resp.body_mut() = empty();
    }
}

/// A small JSON answer with its length.
pub fn json(body: Bytes) -> Response<Body> {
    let len = body.len();
    let mut resp = Response::new(full(body));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    resp
}

/// A plain-text answer (probes).
pub fn text(status: StatusCode, body: &str) -> Response<Body> {
    let mut r = Response::new(full(Bytes::copy_from_slice(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    r
}

fn content_headers(resp: &mut Response<Body>, digest: &Digest, outcome: Outcome) {
    let h = resp.headers_mut();
    let value = |s: String| {
        HeaderValue::from_maybe_shared(Bytes::from(s)).expect("digests are header-safe")
    };
    h.insert(DIGEST, value(digest.to_string()));
    h.insert(header::ETAG, value(format!("\"{digest}\"")));
    h.insert(X_CACHE, HeaderValue::from_static(outcome.header()));
}

/// Does the client already hold `digest` (`If-None-Match`)?
fn not_modified(headers: &HeaderMap, digest: &Digest) -> bool {
    let names = |t: &str| {
        let t = t.trim();
        let bare = t
            .strip_prefix('"')
            .and_then(|t| t.strip_suffix('"'))
            .unwrap_or(t);
        t == "*"
            || bare.split_once(':').is_some_and(|(algorithm, hex)| {
                algorithm == digest.algorithm().as_str() && hex == digest.hex()
            })
    };
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(names)
}

/// A manifest: its exact bytes and stored media type, or 304 when the
/// client's `If-None-Match` names it. Bytes are sent when the status is 200
/// and the method GET.
pub fn manifest(headers: &HeaderMap, m: &Manifest, outcome: Outcome) -> Response<Body> {
    let mut resp = if not_modified(headers, &m.digest) {
        let mut r = Response::new(empty());
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        r
    } else {
        let mut r = Response::new(full(m.bytes.clone()));
        r.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(m.bytes.len()));
        r
    };
    if let Ok(ct) = HeaderValue::from_str(&m.media_type) {
        resp.headers_mut().insert(header::CONTENT_TYPE, ct);
    }
    content_headers(&mut resp, &m.digest, outcome);
    resp
}

fn blob_headers(resp: &mut Response<Body>, digest: &Digest, outcome: Outcome) {
    content_headers(resp, digest, outcome);
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("max-age=31536000, immutable"),
    );
}

/// The bytes `start..end` of a blob (`end` `None`: to its end), as a stream.
pub type BlobStream = BoxStream<'static, io::Result<Bytes>>;

/// A blob response: HEAD, the whole blob, a range of it, or 416. `size` is
/// `None` when it is not known yet (an upstream fill without a length); the
/// bytes come from `read`, called only when a body is sent.
pub fn blob(
    headers: &HeaderMap,
    method: Method,
    digest: &Digest,
    size: Option<u64>,
    outcome: Outcome,
    read: impl FnOnce(u64, Option<u64>) -> BlobStream,
) -> Response<Body> {
    let range_header = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let (status, start, end) = match range::plan(range_header, size) {
        Plan::Full => (StatusCode::OK, 0, None),
        Plan::Partial(r) => (StatusCode::PARTIAL_CONTENT, r.start, Some(r.end)),
        Plan::Unsatisfiable => {
            let mut resp = Response::new(empty());
            *resp.status_mut() = StatusCode::RANGE_NOT_SATISFIABLE;
            let cr = format!("bytes */{}", size.unwrap_or(0));
            resp.headers_mut().insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&cr).expect("ascii"),
            );
            blob_headers(&mut resp, digest, outcome);
            return resp;
        }
    };
    let mut resp = if method == Method::Head {
        let mut r = Response::new(empty());
        if let Some(size) = size {
            r.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(size));
        }
        r
    } else {
        let stream = read(start, end).map_ok(Frame::data);
        let mut r = Response::new(StreamBody::new(stream).boxed_unsync());
        *r.status_mut() = status;
        let h = r.headers_mut();
        match (end, size) {
            // A partial range is only planned when the size is known.
            (Some(end), Some(total)) => {
                h.insert(header::CONTENT_LENGTH, HeaderValue::from(end - start));
                let cr = format!("bytes {start}-{}/{total}", end - 1);
                h.insert(
                    header::CONTENT_RANGE,
                    HeaderValue::from_str(&cr).expect("ascii"),
                );
            }
            (None, Some(size)) => {
                h.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
            }
            _ => {}
        }
        r
    };
    blob_headers(&mut resp, digest, outcome);
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::Algorithm;

    fn collect(resp: Response<Body>) -> Vec<u8> {
        futures_util::FutureExt::now_or_never(resp.into_body().collect())
            .unwrap()
            .unwrap()
            .to_bytes()
            .to_vec()
    }

    fn data_stream(data: &'static [u8]) -> impl FnOnce(u64, Option<u64>) -> BlobStream {
        move |start, end| {
            let end = end.unwrap_or(data.len() as u64);
            let bytes = Bytes::from_static(&data[start as usize..end as usize]);
            Box::pin(futures_util::stream::iter([Ok(bytes)]))
        }
    }

    #[test]
    fn blob_ranges_heads_and_416() {
        let data: &'static [u8] = b"0123456789";
        let d = Digest::of(Algorithm::Sha256, data);
        let mut h = HeaderMap::new();
        let r = blob(
            &h,
            Method::Get,
            &d,
            Some(10),
            Outcome::Hit,
            data_stream(data),
        );
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()[header::CONTENT_LENGTH], "10");
        assert_eq!(r.headers()["x-cache"], "HIT");
        assert_eq!(collect(r), data);

        h.insert(header::RANGE, HeaderValue::from_static("bytes=4-"));
        let r = blob(
            &h,
            Method::Get,
            &d,
            Some(10),
            Outcome::Miss,
            data_stream(data),
        );
        assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT);
        assert_eq!(r.headers()[header::CONTENT_RANGE], "bytes 4-9/10");
        assert_eq!(collect(r), b"456789");

        let r = blob(&h, Method::Head, &d, Some(10), Outcome::Hit, |_, _| {
            panic!("HEAD reads nothing")
        });
        assert_eq!(r.headers()[header::CONTENT_LENGTH], "10");

        h.insert(header::RANGE, HeaderValue::from_static("bytes=10-"));
        let r = blob(&h, Method::Get, &d, Some(10), Outcome::Hit, |_, _| {
            panic!("416 reads nothing")
        });
        assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE);
        assert_eq!(r.headers()[header::CONTENT_RANGE], "bytes */10");
    }

    #[test]
    fn manifests_and_if_none_match() {
        let bytes = Bytes::from_static(b"{}");
        let m = Manifest {
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            digest: Digest::of(Algorithm::Sha256, &bytes),
            bytes,
        };
        let mut h = HeaderMap::new();
        let r = manifest(&h, &m, Outcome::Stale);
        assert_eq!(r.headers()[header::CONTENT_TYPE], m.media_type.as_str());
        assert_eq!(
            r.headers()["docker-content-digest"],
            m.digest.to_string().as_str()
        );
        assert_eq!(r.headers()["x-cache"], "STALE");
        assert_eq!(collect(r), b"{}");
        h.insert(
            header::IF_NONE_MATCH,
            HeaderValue::from_str(&format!("\"{}\"", m.digest)).unwrap(),
        );
        assert_eq!(
            manifest(&h, &m, Outcome::Hit).status(),
            StatusCode::NOT_MODIFIED
        );
        assert_eq!(r_etag(&m), format!("\"{}\"", m.digest));
        let other = Digest::of(Algorithm::Sha256, b"other");
        for (value, held) in [
            (format!("{}", m.digest), true),
            (format!("W/x, \"{other}\" ,  {} ", m.digest), true),
            ("*".to_string(), true),
            (format!("\"{other}\""), false),
            (format!("\"{}", m.digest), false),
            (format!("sha512:{}", m.digest.hex()), false),
        ] {
            h.insert(
                header::IF_NONE_MATCH,
                HeaderValue::from_str(&value).unwrap(),
            );
            assert_eq!(not_modified(&h, &m.digest), held, "{value}");
        }
    }

    fn r_etag(m: &Manifest) -> String {
        let r = manifest(&HeaderMap::new(), m, Outcome::Hit);
        r.headers()[header::ETAG].to_str().unwrap().to_string()
    }

    #[test]
    fn finish_strips_head_bodies() {
        let mut r = json(Bytes::from_static(b"{}"));
        finish(&mut r, Method::Head);
        assert_eq!(r.headers()[API_VERSION.0], API_VERSION.1);
        assert_eq!(r.headers()[header::CONTENT_LENGTH], "2");
        assert!(collect(r).is_empty());
    }
}
