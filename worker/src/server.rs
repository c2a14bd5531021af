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
use regcache_protocol::follow;
use regcache_protocol::internal::{
    CONFIRMED, FROM_PEER, INVENTORY_PATH, METRICS_PATH, PRELOAD, STATUS_PATH,
};
use regcache_protocol::request::{self, Endpoint, Kind, Method, RepoRequest, Request};
use regcache_protocol::response::{self, Outcome};
use regcache_protocol::{Digest, Reference};

use crate::cache::{Cache, Reader, TagsList, Via};
use crate::error::Error;

type Answer = Result<(Response<Body>, Option<Outcome>), Error>;

/// Answers one request (its body, if any, is never read).
pub async fn handle<B>(cache: Arc<Cache>, req: HttpRequest<B>) -> Response<Body> {
    let started = Instant::now();
    match (req.method(), req.uri().path()) {
        (&http::Method::GET, METRICS_PATH) => return metrics(&cache).await,
        (&http::Method::GET, INVENTORY_PATH) => return inventory(&cache).await,
        (&http::Method::GET, STATUS_PATH) => {
            let status = serde_json::to_vec(&cache.status()).expect("serialisable");
            return response::json(Bytes::from(status));
        }
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
        Ok(Request::Repo(r)) => {
            let via = if req.headers().contains_key(FROM_PEER) {
                cache.metrics().peer_served.inc();
                Via::Peer
            } else if req.headers().contains_key(PRELOAD) {
                Via::Preload
            } else {
                Via::Client
            };
            route(&cache, req.headers(), &r, via).await
        }
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

async fn route(cache: &Arc<Cache>, headers: &HeaderMap, r: &RepoRequest, via: Via) -> Answer {
    match &r.endpoint {
        Endpoint::Manifest(reference) => manifest(cache, headers, r, reference, via).await,
        Endpoint::Blob(digest) if r.method == Method::Head => {
            blob_head(cache, headers, r, digest).await
        }
        Endpoint::Blob(digest) => blob_get(cache, headers, r, digest, via).await,
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
    via: Via,
) -> Answer {
    let (m, outcome) = cache.manifest_for(&r.name, reference, via).await?;
    let mut resp = response::manifest(headers, &m, outcome);
    if let (Via::Peer, Reference::Tag(tag)) = (via, reference) {
        // The asking replica keeps the tag as long as this one does.
        if let Some(ms) = cache.tag_confirmed_ms(&r.name, tag).await {
            resp.headers_mut().insert(CONFIRMED, HeaderValue::from(ms));
        }
    }
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

async fn blob_get(
    cache: &Cache,
    headers: &HeaderMap,
    r: &RepoRequest,
    digest: &Digest,
    via: Via,
) -> Answer {
    let mut blob = cache.blob_for(&r.name, digest, via).await?;
    let (size, outcome) = (blob.size, blob.outcome);
    if r.method == Method::Get && headers.contains_key(follow::FOLLOW) {
        match blob.following() {
            Ok(fill) => {
                return Ok((
                    followed(headers, digest, size, outcome, fill),
                    Some(outcome),
                ))
            }
            Err(stored) => blob = stored,
        }
    }
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

/// A fill answered to the front as its spool's name and progress (the
/// front reads the bytes, and counts them as served).
fn followed(
    headers: &HeaderMap,
    digest: &Digest,
    size: Option<u64>,
    outcome: Outcome,
    fill: Reader,
) -> http::Response<Body> {
    let spool = HeaderValue::from_str(fill.spool()).ok();
    let mut resp = response::blob(headers, Method::Get, digest, size, outcome, |start, end| {
        fill.follow(start, end)
    });
    if resp.status().is_success() {
        let h = resp.headers_mut();
        if let Some(length) = h.remove(header::CONTENT_LENGTH) {
            h.insert(follow::LENGTH, length);
        }
        if let Some(spool) = spool {
            h.insert(follow::SPOOL, spool);
        }
    }
    resp
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
    m.upstream_away.set(i64::from(cache.upstream_away()));
    m.cluster_members.set(cache.members() as i64);
    let status = cache.status();
    m.store_degraded.set(i64::from(status.degraded.is_some()));
    m.store_backfill.set(status.backfill as i64);
    m.store_remote_errors.set(status.remote_errors as i64);
    m.policy(&cache.managed().stats());
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http::StatusCode;
    use regcache_testkit::fake::Serve;
    use regcache_testkit::{random_bytes, OCI_MANIFEST};

    use http::response::Parts;
    use regcache_testkit::inproc::{error_code, read, request};

    use super::*;
    use crate::cache::tests::harness;

    async fn send(
        cache: &Arc<Cache>,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (Parts, Bytes) {
        read(handle(cache.clone(), request(method, path, headers)).await).await
    }

    #[tokio::test]
    async fn base_writes_and_bad_input() {
        let h = harness(Duration::from_secs(60));
        let (resp, body) = send(&h.cache, "GET", "/v2/", &[]).await;
        assert_eq!((resp.status, &body[..]), (StatusCode::OK, &b"{}"[..]));
        assert_eq!(
            resp.headers["docker-distribution-api-version"],
            "registry/2.0"
        );
        let (resp, body) = send(&h.cache, "PUT", "/v2/a/manifests/1", &[]).await;
        assert_eq!(resp.status, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(resp.headers[header::ALLOW], "GET, HEAD");
        assert_eq!(error_code(&body), "UNSUPPORTED");
        let (resp, body) = send(&h.cache, "GET", "/v2/a/blobs/sha256:nothex", &[]).await;
        assert_eq!(
            (resp.status, error_code(&body).as_str()),
            (StatusCode::BAD_REQUEST, "DIGEST_INVALID")
        );
        assert_eq!(h.fake.request_count(), 0, "{}", h.fake.describe_requests());
    }

    #[tokio::test]
    async fn head_has_the_headers_of_get_and_no_body() {
        let h = harness(Duration::from_secs(60));
        let digest = h.fake.add_manifest(
            "org/app",
            Some("1"),
            OCI_MANIFEST,
            br#"{"schemaVersion":2}"#,
        );
        let accept = [("accept", OCI_MANIFEST)];
        let (get, body) = send(&h.cache, "GET", "/v2/org/app/manifests/1", &accept).await;
        let (head, empty) = send(&h.cache, "HEAD", "/v2/org/app/manifests/1", &accept).await;
        assert_eq!(get.status, StatusCode::OK);
        assert_eq!(body.len().to_string(), get.headers[header::CONTENT_LENGTH]);
        assert!(empty.is_empty());
        for h in [
            "content-type",
            "content-length",
            "docker-content-digest",
            "etag",
        ] {
            assert_eq!(get.headers.get(h), head.headers.get(h), "{h}");
        }
        assert_eq!(get.headers["docker-content-digest"], digest.as_str());
        assert_eq!(get.headers["x-cache"], "MISS");
        assert_eq!(head.headers["x-cache"], "HIT");
    }

    #[tokio::test]
    async fn ranges_of_a_blob() {
        let h = harness(Duration::from_secs(60));
        let data = random_bytes(10_000);
        let blob = h.fake.add_blob("org/img", &data);
        let (resp, body) = send(&h.cache, "GET", &blob.path, &[("range", "bytes=100-199")]).await;
        assert_eq!(resp.status, StatusCode::PARTIAL_CONTENT);
        assert_eq!(resp.headers[header::CONTENT_RANGE], "bytes 100-199/10000");
        assert_eq!(&body[..], &data[100..200]);
        let (resp, _) = send(&h.cache, "GET", &blob.path, &[("range", "bytes=10000-")]).await;
        assert_eq!(resp.status, StatusCode::RANGE_NOT_SATISFIABLE);
        let (resp, body) = send(&h.cache, "GET", &blob.path, &[]).await;
        assert_eq!((resp.status, body.len()), (StatusCode::OK, data.len()));
        assert_eq!(
            h.fake.count("GET", &blob.path),
            1,
            "{}",
            h.fake.describe_requests()
        );
    }

    #[tokio::test]
    async fn tags_list_falls_back_to_cached_tags_when_upstream_fails() {
        let h = harness(Duration::from_secs(60));
        h.fake.add_manifest(
            "org/app",
            Some("1"),
            OCI_MANIFEST,
            br#"{"schemaVersion":2}"#,
        );
        h.fake.add_raw(
            "/v2/org/app/tags/list",
            200,
            &[("content-type", "application/json")],
            br#"{"name":"org/app","tags":["1","2"]}"#.to_vec(),
        );
        let (resp, body) = send(&h.cache, "GET", "/v2/org/app/tags/list", &[]).await;
        assert_eq!(resp.status, StatusCode::OK);
        assert!(
            body.windows(3).any(|w| w == b"\"2\""),
            "upstream's list: {body:?}"
        );
        send(&h.cache, "GET", "/v2/org/app/manifests/1", &[]).await;
        h.fake.set("/v2/org/app/tags/list", Serve::status(502));
        let (resp, body) = send(&h.cache, "GET", "/v2/org/app/tags/list", &[]).await;
        assert_eq!(resp.status, StatusCode::OK);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v, serde_json::json!({"name": "org/app", "tags": ["1"]}));
    }
}
