//! The front listener: accepts clients (HTTP/1.1 and h2c), answers `/v2/` and
//! the health endpoints itself, and routes everything else to a worker.
//!
//! Stages per request: method check -> route -> worker readiness -> forward.

use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use regcache_worker::body::{full, Body};
use regcache_worker::error::{ErrorCode, RegistryError};
use regcache_worker::server::{json_response as json, API_VERSION};

use crate::proxy::Proxy;
use crate::routing::{Routes, Target};
use crate::workers::Worker;

/// What every request handler shares.
pub struct Front {
    pub routes: Routes,
    pub workers: Vec<Arc<Worker>>,
    pub proxy: Proxy,
}

impl Front {
    pub async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let method = req.method().clone();
        let mut resp = match self.answer(&req).await {
            Ok(r) => r,
            Err(e) => e.into_response(),
        };
        if method == Method::HEAD {
            *resp.body_mut() = regcache_worker::body::empty();
        }
        resp.headers_mut()
            .insert(API_VERSION.0, HeaderValue::from_static(API_VERSION.1));
        resp
    }

    async fn answer(&self, req: &Request<Incoming>) -> Result<Response<Body>, RegistryError> {
        let path = req.uri().path();
        match path {
            "/healthz" => return Ok(text(StatusCode::OK, "ok\n")),
            "/readyz" => return Ok(self.readiness()),
            _ => {}
        }
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return Err(RegistryError::read_only(req.method()));
        }
        match self.routes.route(path, req.uri().query())? {
            Target::Base => Ok(json(Bytes::from_static(b"{}"))),
            Target::Worker {
                index,
                path_and_query,
                namespace,
            } => {
                let worker = &self.workers[index];
                let unavailable = || {
                    RegistryError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        ErrorCode::Unavailable,
                        format!(
                            "the cache for {} is restarting; retry shortly",
                            worker.upstream.authority()
                        ),
                    )
                    .with_header(header::RETRY_AFTER, HeaderValue::from_static("1"))
                };
                if !worker.is_ready() {
                    return Err(unavailable());
                }
                let mut resp = self
                    .proxy
                    .forward(index, &path_and_query, req)
                    .await
                    .map_err(|e| {
                        tracing::warn!(upstream = %worker.upstream.authority(), error = %e, "worker unreachable");
                        unavailable()
                    })?;
                if let Some(ns) = namespace.and_then(|n| HeaderValue::from_str(&n).ok()) {
                    resp.headers_mut().insert("oci-namespace", ns);
                }
                Ok(resp)
            }
        }
    }

    /// 200 when every worker is ready, else 503 listing those that are not.
    fn readiness(&self) -> Response<Body> {
        let down: Vec<String> = self
            .workers
            .iter()
            .filter(|w| !w.is_ready())
            .map(|w| w.upstream.authority())
            .collect();
        if down.is_empty() {
            text(StatusCode::OK, "ready\n")
        } else {
            text(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("not ready: {}\n", down.join(", ")),
            )
        }
    }
}

fn text(status: StatusCode, body: &str) -> Response<Body> {
    let mut r = Response::new(full(Bytes::copy_from_slice(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    r.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
    r
}
