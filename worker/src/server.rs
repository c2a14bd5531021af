//! The worker's HTTP face: a registry v2 pull endpoint for one upstream.
//!
//! Stages: parse the path into a typed request ([`crate::routing`]), ask the
//! [`Cache`], write the response headers the spec and clients need. Every
//! error leaves through [`RegistryError::into_response`].

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures_util::TryStreamExt;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};

use crate::body::{empty, full, Body};
use crate::cache::{Blob, Cache, Outcome};
use crate::error::RegistryError;
use crate::metrics::{Kind, Metrics, Source};
use crate::range::{self, Plan};
use crate::reference::{Digest, Name, Reference};
use crate::routing::{self, Endpoint};
use crate::storage::{Manifest, Store};

pub const API_VERSION: (&str, &str) = ("docker-distribution-api-version", "registry/2.0");

/// Internal endpoints the supervisor uses; never routed from clients
/// (their paths are outside `/v2/`).
pub const METRICS_PATH: &str = "/metrics";
pub const INVENTORY_PATH: &str = "/_regcache/inventory";

/// Answers one request.
pub async fn handle(cache: Arc<Cache>, req: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    match req.uri().path() {
        METRICS_PATH => return metrics(&cache),
        INVENTORY_PATH => return inventory(&cache).await,
        _ => {}
    }
    let parsed = routing::parse(req.method(), req.uri().path());
    let kind = kind_of(&parsed);
    let answer = match parsed {
        Ok(r) => route(&cache, &req, r).await,
        Err(e) => Err(e.into()),
    };
    finish(cache.metrics(), kind, answer, started, req.method())
}

/// Answers from committed content alone when it can: blobs and manifests by
/// digest are immutable and never need the upstream. The supervisor serves
/// such hits this way, without the hop to the worker and even while the
/// worker restarts; `None` means the worker must answer. `path` is the
/// request's path as the worker would see it.
pub async fn answer_from_store(
    store: &Store,
    metrics: &Arc<Metrics>,
    req: &Request<Incoming>,
    path: &str,
) -> Option<Response<Body>> {
    let started = Instant::now();
    let parsed = routing::parse(req.method(), path);
    let answer = match &parsed {
        Ok(routing::Request::Repo { endpoint, .. }) => match endpoint {
            Endpoint::Blob(d) => {
                let blob = Blob::stored(store, d).ok()??;
                send_blob(req, d, blob, metrics).await
            }
            Endpoint::Manifest(Reference::Digest(d)) => {
                let m = store.read_manifest(d).ok()??;
                Ok((
                    send_manifest(req, &m, Outcome::Hit, metrics),
                    Some(Outcome::Hit),
                ))
            }
            _ => return None,
        },
        _ => return None,
    };
    Some(finish(
        metrics,
        kind_of(&parsed),
        answer,
        started,
        req.method(),
    ))
}

type Answer = Result<(Response<Body>, Option<Outcome>), RegistryError>;

fn kind_of(parsed: &Result<routing::Request, routing::Error>) -> Kind {
    match parsed {
        Ok(routing::Request::Repo { endpoint, .. }) => match endpoint {
            Endpoint::Manifest(_) => Kind::Manifest,
            Endpoint::Blob(_) => Kind::Blob,
            Endpoint::TagsList => Kind::Tags,
            Endpoint::Referrers(_) => Kind::Other,
        },
        _ => Kind::Other,
    }
}

/// Records the request and gives the response its last touches.
fn finish(
    metrics: &Metrics,
    kind: Kind,
    answer: Answer,
    started: Instant,
    method: &Method,
) -> Response<Body> {
    let (mut resp, outcome, error) = match answer {
        Ok((resp, outcome)) => (resp, outcome, false),
        Err(e) => (e.into_response(), None, true),
    };
    metrics.request(kind, outcome, error, started.elapsed().as_secs_f64());
    if method == Method::HEAD {
        *resp.body_mut() = empty();
    }
    resp.headers_mut()
        .insert(API_VERSION.0, HeaderValue::from_static(API_VERSION.1));
    resp
}

async fn route(cache: &Arc<Cache>, req: &Request<Incoming>, parsed: routing::Request) -> Answer {
    let head = req.method() == Method::HEAD;
    match parsed {
        routing::Request::Base => Ok((json_response(Bytes::from_static(b"{}")), None)),
        routing::Request::Repo { name, endpoint } => match endpoint {
            Endpoint::Manifest(reference) => manifest(cache, req, &name, &reference).await,
            Endpoint::Blob(digest) if head => blob_head(cache, &name, &digest).await,
            Endpoint::Blob(digest) => blob_get(cache, req, &name, &digest).await,
            Endpoint::TagsList => tags_list(cache, req, &name).await,
            Endpoint::Referrers(_) => Ok((forward(cache, req, &name).await?, None)),
        },
    }
}

fn metrics(cache: &Cache) -> Response<Body> {
    let (bytes, blobs) = cache.store().usage();
    let m = cache.metrics();
    m.stored_bytes.set(bytes as i64);
    m.stored_blobs.set(blobs as i64);
    let text = m.render();
    let mut resp = Response::new(full(text));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    resp
}

async fn inventory(cache: &Arc<Cache>) -> Response<Body> {
    let c = cache.clone();
    let inv = tokio::task::spawn_blocking(move || c.store().inventory())
        .await
        .unwrap_or_default();
    json_response(Bytes::from(serde_json::to_vec(&inv).expect("serialisable")))
}

/// A small JSON answer with its length.
pub fn json_response(body: Bytes) -> Response<Body> {
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

fn content_headers(resp: &mut Response<Body>, digest: &Digest, outcome: Outcome) {
    let h = resp.headers_mut();
    let d = HeaderValue::from_str(&digest.to_string()).expect("digests are header-safe");
    let etag = HeaderValue::from_str(&format!("\"{digest}\"")).expect("digests are header-safe");
    h.insert("docker-content-digest", d);
    h.insert(header::ETAG, etag);
    h.insert("x-cache", HeaderValue::from_static(outcome.as_str()));
}

fn not_modified(req: &Request<Incoming>, digest: &Digest) -> bool {
    let want = format!("\"{digest}\"");
    req.headers()
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| {
            let t = t.trim();
            t == want || t == "*" || t == digest.to_string()
        })
}

async fn manifest(
    cache: &Arc<Cache>,
    req: &Request<Incoming>,
    name: &Name,
    reference: &Reference,
) -> Answer {
    let (m, outcome) = cache.manifest(name, reference).await?;
    Ok((
        send_manifest(req, &m, outcome, cache.metrics()),
        Some(outcome),
    ))
}

fn send_manifest(
    req: &Request<Incoming>,
    m: &Manifest,
    outcome: Outcome,
    metrics: &Metrics,
) -> Response<Body> {
    let mut resp = if not_modified(req, &m.digest) {
        let mut r = Response::new(empty());
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        r
    } else {
        let mut r = Response::new(full(m.bytes.clone()));
        r.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(m.bytes.len()));
        if req.method() == Method::GET {
            metrics.served(source_of(outcome), m.bytes.len() as u64);
        }
        r
    };
    if let Ok(ct) = HeaderValue::from_str(&m.media_type) {
        resp.headers_mut().insert(header::CONTENT_TYPE, ct);
    }
    content_headers(&mut resp, &m.digest, outcome);
    resp
}

fn source_of(outcome: Outcome) -> Source {
    match outcome {
        Outcome::Hit | Outcome::Stale | Outcome::Revalidated => Source::Cache,
        Outcome::Miss => Source::Upstream,
    }
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

async fn blob_head(cache: &Cache, name: &Name, digest: &Digest) -> Answer {
    let (size, outcome) = cache.blob_size(name, digest).await?;
    let mut resp = Response::new(empty());
    if let Some(size) = size {
        resp.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    }
    blob_headers(&mut resp, digest, outcome);
    Ok((resp, Some(outcome)))
}

async fn blob_get(cache: &Cache, req: &Request<Incoming>, name: &Name, digest: &Digest) -> Answer {
    let blob = cache.blob(name, digest)?;
    send_blob(req, digest, blob, cache.metrics()).await
}

/// A blob response: HEAD, the whole blob, or a range of it.
async fn send_blob(
    req: &Request<Incoming>,
    digest: &Digest,
    mut blob: Blob,
    metrics: &Arc<Metrics>,
) -> Answer {
    let size = blob.size().await?;
    let outcome = blob.outcome;
    let range_header = req
        .headers()
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok());
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
            return Ok((resp, Some(outcome)));
        }
    };
    if req.method() == Method::HEAD {
        let mut resp = Response::new(empty());
        if let Some(size) = size {
            resp.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(size));
        }
        blob_headers(&mut resp, digest, outcome);
        return Ok((resp, Some(outcome)));
    }
    let metrics = metrics.clone();
    let source = source_of(outcome);
    let stream = blob
        .read(start, end)
        .inspect_ok(move |b| metrics.served(source, b.len() as u64))
        .map_ok(Frame::data);
    let mut resp = Response::new(StreamBody::new(stream).boxed_unsync());
    *resp.status_mut() = status;
    let h = resp.headers_mut();
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
    blob_headers(&mut resp, digest, outcome);
    Ok((resp, Some(outcome)))
}

/// tags/list goes upstream; when upstream cannot answer, the tags pulled
/// through this cache are listed instead (as registry:2's proxy does).
async fn tags_list(cache: &Cache, req: &Request<Incoming>, name: &Name) -> Answer {
    let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
    match cache.forward(name, pq).await {
        Ok(upstream) => Ok((pass_through(upstream), None)),
        Err(e) if e.allows_stale() => {
            let tags = cache.store().tags(name);
            if tags.is_empty() {
                return Err(e.into());
            }
            tracing::warn!(%name, error = %e, "upstream unavailable; listing cached tags");
            let body = serde_json::json!({ "name": name.as_str(), "tags": tags });
            Ok((
                json_response(Bytes::from(body.to_string())),
                Some(Outcome::Stale),
            ))
        }
        Err(e) => Err(e.into()),
    }
}

/// referrers go to upstream as they are, query included.
async fn forward(
    cache: &Cache,
    req: &Request<Incoming>,
    name: &Name,
) -> Result<Response<Body>, RegistryError> {
    let pq = req.uri().path_and_query().map_or("/", |p| p.as_str());
    Ok(pass_through(cache.forward(name, pq).await?))
}

/// An upstream answer relayed as it is: status, type, paging and body.
fn pass_through(upstream: reqwest::Response) -> Response<Body> {
    let mut resp = Response::new(empty());
    *resp.status_mut() = upstream.status();
    for h in [header::CONTENT_TYPE, header::LINK, header::CONTENT_LENGTH] {
        for v in upstream.headers().get_all(&h) {
            resp.headers_mut().append(h.clone(), v.clone());
        }
    }
    if let Some(v) = upstream.headers().get("oci-filters-applied") {
        resp.headers_mut().insert("oci-filters-applied", v.clone());
    }
    let stream = upstream
        .bytes_stream()
        .map_err(std::io::Error::other)
        .map_ok(Frame::data);
    *resp.body_mut() = StreamBody::new(stream).boxed_unsync();
    resp
}
