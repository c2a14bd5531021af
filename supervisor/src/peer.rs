//! The peer listener (`REGCACHE_PEER_LISTEN`): where the other replicas of
//! a cluster ask this one for what it owns.
//!
//! - `GET /peer/v1/id`: this replica's node id (membership probes).
//! - `GET|HEAD /peer/v1/<upstream dir>/v2/<name>/{blobs,manifests}/<ref>`:
//!   answered as a client's pull would be, from the local hit path or the
//!   upstream's worker, marked so that the worker answers as the owner (its
//!   single-flight fill, never a further peer). Only blobs and manifests.
//!
//! Every request must carry `Authorization: Bearer <REGCACHE_PEER_SECRET>`;
//! anything else is a 401, and the listener never opens without a secret.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode};
use regcache_protocol::body::Body;
use regcache_protocol::error::{ErrorCode, RegistryError};
use regcache_protocol::request::{self, Endpoint, Method};
use regcache_protocol::response;

use crate::server::Front;

/// This replica's id among its peers: `REGCACHE_NODE_ID`, or random per
/// start (a restarted replica is a new member).
pub fn node_id() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| {
        std::env::var("REGCACHE_NODE_ID")
            .ok()
            .filter(|v| !v.is_empty())
            .unwrap_or_else(|| {
                let mut b = [0u8; 8];
                let _ = std::fs::File::open("/dev/urandom")
                    .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b));
                let pid = std::process::id() as u64;
                format!("{:016x}", u64::from_le_bytes(b) ^ pid)
            })
    })
}

/// The handler of the peer listener.
pub struct PeerFront {
    front: Arc<Front>,
    secret: regcache_worker::config::PeerSecret,
    /// Upstream dir name -> worker index.
    upstreams: HashMap<String, usize>,
}

impl PeerFront {
    pub fn new(front: Arc<Front>, secret: regcache_worker::config::PeerSecret) -> PeerFront {
        let upstreams = front
            .workers
            .iter()
            .enumerate()
            .map(|(i, w)| (w.upstream.authority.dir_name(), i))
            .collect();
        PeerFront {
            front,
            secret,
            upstreams,
        }
    }

    pub async fn handle<B>(&self, req: Request<B>) -> Response<Body> {
        let mut resp = match self.answer(&req).await {
            Ok(r) => r,
            Err(e) => e.into_response(),
        };
        let method = Method::parse(req.method()).unwrap_or(Method::Get);
        response::finish(&mut resp, method);
        resp
    }

    async fn answer<B>(&self, req: &Request<B>) -> Result<Response<Body>, RegistryError> {
        if !authorized(req.headers(), self.secret.expose()) {
            return Err(RegistryError::new(
                StatusCode::UNAUTHORIZED,
                ErrorCode::Unauthorized,
                "peer requests need the cluster's secret",
            ));
        }
        let not_found = || {
            RegistryError::new(
                StatusCode::NOT_FOUND,
                ErrorCode::Unsupported,
                "no such peer endpoint",
            )
        };
        let path = req.uri().path();
        if path == "/peer/v1/id" {
            let body = serde_json::json!({ "id": node_id() }).to_string();
            return Ok(response::json(Bytes::from(body)));
        }
        let rest = path.strip_prefix("/peer/v1/").ok_or_else(not_found)?;
        let (dir, v2) = rest.split_once('/').ok_or_else(not_found)?;
        let index = *self.upstreams.get(dir).ok_or_else(not_found)?;
        // Writes and malformed names end here, as on the public side.
        let parsed = request::parse(req.method(), &format!("/{v2}"), req.uri().query());
        let Ok(request::Request::Repo(r)) = parsed else {
            return Err(not_found());
        };
        if !matches!(r.endpoint, Endpoint::Blob(_) | Endpoint::Manifest(_)) {
            return Err(not_found());
        }
        // What travels on: the content negotiation and the range, nothing else.
        let mut headers = HeaderMap::new();
        for h in [header::ACCEPT, header::RANGE, header::IF_NONE_MATCH] {
            for v in req.headers().get_all(&h) {
                headers.append(h.clone(), v.clone());
            }
        }
        // Committed content by digest: straight from the disk, as for clients.
        let sendfile = req.extensions().get::<crate::sendfile::Spans>();
        if let Some(resp) = self.front.local[index].answer(&headers, &r, sendfile).await {
            return Ok(resp);
        }
        let worker = &self.front.workers[index];
        let unavailable = || {
            RegistryError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::Unavailable,
                format!("the worker for {} is not ready", worker.upstream.name()),
            )
        };
        if !worker.is_ready() {
            return Err(unavailable());
        }
        self.front
            .proxy
            .forward(index, &r, &headers, crate::proxy::Sender::Peer, false)
            .await
            .map_err(|_| unavailable())
    }
}

/// `Authorization: Bearer <secret>`, compared in constant time.
fn authorized(headers: &HeaderMap, secret: &str) -> bool {
    let Some(given) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v: &HeaderValue| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    same_secret(given, secret)
}

/// `given == secret`, in time that does not depend on where they differ.
pub fn same_secret(given: &str, secret: &str) -> bool {
    let (a, b) = (given.as_bytes(), secret.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_exact_secret_opens() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
            h
        };
        let secret = "0123456789abcdef";
        assert!(authorized(&with("Bearer 0123456789abcdef"), secret));
        assert!(!authorized(&with("Bearer 0123456789abcdeF"), secret));
        assert!(!authorized(&with("Bearer 0123456789abcde"), secret));
        assert!(!authorized(&with("Basic 0123456789abcdef"), secret));
        assert!(!authorized(&HeaderMap::new(), secret));
    }
}
