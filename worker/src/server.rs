//! The worker's HTTP face: a registry v2 pull endpoint for one upstream.
//!
//! Stages: the internal endpoints the front asks; else parse the request
//! once into a typed [`Request`]; ask the [`Cache`]; [`finish`] the answer
//! (metrics, one log line for our own or upstream's faults, the headers every
//! response gets). Every error leaves through `crate::error`.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures_util::TryStreamExt;
use http::{header, HeaderMap, HeaderValue, Request as HttpRequest, Response};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use regcache_protocol::body::{full, Body};
use regcache_protocol::error::RegistryError;
use regcache_protocol::internal::{INVENTORY_PATH, METRICS_PATH};
use regcache_protocol::request::{self, Endpoint, Kind, Method, RepoRequest, Request};
use regcache_protocol::response::{self, Outcome};
use regcache_protocol::{Digest, Reference};

use crate::cache::{Cache, TagsList};
use crate::error::Error;

type Answer = Result<(Response<Body>, Option<Outcome>), Error>;

/// Answers one request (its body, if any, is never read).
pub async fn handle<B>(cache: Arc<Cache>, req: HttpRequest<B>) -> Response<Body> {
    let started = Instant::now();
    match (req.method(), req.uri().path()) {
        (&http::Method::GET, METRICS_PATH) => return metrics(&cache).await,
        (&http::Method::GET, INVENTORY_PATH) => return inventory(&cache).await,
        _ => {}
    }
    let parsed = request::parse(req.method(), req.uri().path(), req.uri().query());
    let (kind, method) = match &parsed {
        Ok(Request::Repo(r)) => (r.endpoint.kind(), r.method),
        Ok(Request::Base(m)) => (Kind::Other, *m),
        Err(_) => (Kind::Other, Method::Get),
    };
    let answer = match parsed {
        Ok(Request::Base(_)) => Ok((response::json(Bytes::from_static(b"{}")), None)),
        Ok(Request::Repo(r)) => route(&cache, req.headers(), &r).await,
        Err(e) => Err(e.into()),
    };
    finish(&cache, kind, method, answer, started)
}

/// Records the request, logs a fault once, and gives the response its last
/// touches.
fn finish(
    cache: &Cache,
    kind: Kind,
    method: Method,
    answer: Answer,
    started: Instant,
) -> Response<Body> {
    let (mut resp, outcome, error) = match answer {
        Ok((resp, outcome)) => (resp, outcome, false),
        Err(e) => {
            let wire = RegistryError::from(&e);
            if wire.is_server_fault() {
                tracing::warn!(error = %e, status = wire.status.as_u16(), "request failed");
            } else {
                tracing::debug!(error = %e, status = wire.status.as_u16(), "request refused");
            }
            (wire.into_response(), None, true)
        }
    };
    let seconds = started.elapsed().as_secs_f64();
    cache.metrics().request(kind, outcome, error, seconds);
    response::finish(&mut resp, method);
    resp
}

async fn route(cache: &Arc<Cache>, headers: &HeaderMap, r: &RepoRequest) -> Answer {
    match &r.endpoint {
        Endpoint::Manifest(reference) => manifest(cache, headers, r, reference).await,
        Endpoint::Blob(digest) if r.method == Method::Head => {
            blob_head(cache, headers, r, digest).await
        }
        Endpoint::Blob(digest) => blob_get(cache, headers, r, digest).await,
        Endpoint::TagsList => tags_list(cache, r).await,
        Endpoint::Referrers(_) => {
            let upstream = cache.forward(&r.name, &r.path_and_query()).await?;
            Ok((pass_through(upstream), None))
        }
    }
}

async fn manifest(
    cache: &Arc<Cache>,
    headers: &HeaderMap,
    r: &RepoRequest,
    reference: &Reference,
) -> Answer {
    let (m, outcome) = cache.manifest(&r.name, reference).await?;
    let resp = response::manifest(headers, &m, outcome);
    if r.method == Method::Get && resp.status() == http::StatusCode::OK {
        cache.metrics().served(outcome, m.bytes.len() as u64);
    }
    Ok((resp, Some(outcome)))
}

async fn blob_head(cache: &Cache, headers: &HeaderMap, r: &RepoRequest, digest: &Digest) -> Answer {
    let (size, outcome) = cache.blob_size(&r.name, digest).await?;
    let resp = response::blob(headers, Method::Head, digest, size, outcome, |_, _| {
        Box::pin(futures_util::stream::empty())
    });
    Ok((resp, Some(outcome)))
}

async fn blob_get(cache: &Cache, headers: &HeaderMap, r: &RepoRequest, digest: &Digest) -> Answer {
    let mut blob = cache.blob(&r.name, digest).await?;
    let size = blob.size().await?;
    let outcome = blob.outcome();
    let metrics = cache.metrics().clone();
    let resp = response::blob(
        headers,
        r.method,
        digest,
        size,
        outcome,
        move |start, end| {
            let sent = move |b: &Bytes| metrics.served(outcome, b.len() as u64);
            Box::pin(blob.stream(start, end).inspect_ok(sent))
        },
    );
    Ok((resp, Some(outcome)))
}

async fn tags_list(cache: &Cache, r: &RepoRequest) -> Answer {
    match cache.tags_list(&r.name, &r.path_and_query()).await? {
        TagsList::Upstream(resp) => Ok((pass_through(resp), None)),
        TagsList::Cached(tags) => {
            let tags: Vec<&str> = tags.iter().map(|t| t.as_str()).collect();
            let body = serde_json::json!({ "name": r.name.as_str(), "tags": tags });
            Ok((
                response::json(Bytes::from(body.to_string())),
                Some(Outcome::Stale),
            ))
        }
    }
}

/// An upstream answer relayed as it is: status, type, paging and body.
fn pass_through(upstream: reqwest::Response) -> Response<Body> {
    let mut resp = Response::new(regcache_protocol::body::empty());
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

async fn metrics(cache: &Cache) -> Response<Body> {
    let m = cache.metrics();
    match cache.usage().await {
        Ok(u) => {
            m.stored_bytes.set(u.bytes as i64);
            m.stored_blobs.set(u.blobs as i64);
        }
        Err(e) => tracing::warn!(error = %e, "could not count the cache's usage"),
    }
    let mut resp = Response::new(full(m.render()));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    resp
}

async fn inventory(cache: &Cache) -> Response<Body> {
    match cache.inventory().await {
        Ok(inv) => response::json(Bytes::from(serde_json::to_vec(&inv).expect("serialisable"))),
        Err(e) => {
            tracing::warn!(error = %e, "could not list the cache");
            RegistryError::from(&Error::Cache(e)).into_response()
        }
    }
}
