//! The front handler: answers `/v2/`, health, metrics and the cache
//! inventory itself, and routes registry requests to workers.
//!
//! Stages per request: local endpoints -> method check -> route -> worker
//! readiness -> forward -> access log.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use regcache_worker::body::{full, Body};
use regcache_worker::error::{ErrorCode, RegistryError};
use regcache_worker::metrics::Metrics as WorkerMetrics;
use regcache_worker::server::{
    answer_from_store, json_response as json, API_VERSION, INVENTORY_PATH, METRICS_PATH,
};
use regcache_worker::storage::Store;

use crate::access_log::{Entry, Logged};
use crate::client_auth::{Check, Htpasswd};
use crate::inventory::{self, UpstreamCache};
use crate::metrics::{self, Metrics};
use crate::proxy::Proxy;
use crate::routing::{Routes, Target};
use crate::workers::Worker;

/// Catalog page size without `n`, and the largest `n` accepted.
const CATALOG_DEFAULT: usize = 100;
const CATALOG_MAX: usize = 1000;

/// What every request handler shares.
#[derive(Clone)]
pub struct Front {
    pub routes: Routes,
    pub workers: Vec<Arc<Worker>>,
    pub proxy: Proxy,
    pub metrics: Arc<Metrics>,
    pub auth: Option<Arc<Htpasswd>>,
    /// The metrics listener: `/metrics` and the probes, nothing else.
    pub probes_only: bool,
    /// Per worker: its committed content, read here to answer hits by digest
    /// without the hop (see `answer_from_store`), and the series for them.
    pub local: Arc<Vec<LocalHits>>,
}

/// What the front needs to answer one upstream's hits itself.
pub struct LocalHits {
    pub store: Store,
    pub metrics: Arc<WorkerMetrics>,
}

/// Paths open without client credentials: probes and scrapes.
const OPEN_PATHS: [&str; 3] = ["/healthz", "/readyz", "/metrics"];

impl Front {
    pub async fn handle(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
        let started = Instant::now();
        let method = req.method().clone();
        let answer = match self.authenticate(&req, peer).await {
            Ok(()) => self.answer(&req).await,
            Err(e) => Err(e),
        };
        let (mut resp, upstream) = match answer {
            Ok(r) => r,
            Err(e) => (e.into_response(), None),
        };
        if method == Method::HEAD {
            *resp.body_mut() = regcache_worker::body::empty();
        }
        resp.headers_mut()
            .insert(API_VERSION.0, HeaderValue::from_static(API_VERSION.1));
        self.metrics.front(resp.status().as_u16());
        let entry = Entry {
            method: method.to_string(),
            path: req.uri().to_string(),
            upstream: upstream.unwrap_or_else(|| "-".into()),
            status: resp.status().as_u16(),
            cache: resp
                .headers()
                .get("x-cache")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-")
                .to_string(),
            started,
        };
        resp.map(|b| Logged::wrap(b, entry))
    }

    /// With htpasswd on, every route but the probes needs valid credentials;
    /// the `/v2/` ping answers 401 too, which is how docker learns to log in.
    async fn authenticate(
        &self,
        req: &Request<Incoming>,
        peer: SocketAddr,
    ) -> Result<(), RegistryError> {
        if self.probes_only && !OPEN_PATHS.contains(&req.uri().path()) {
            return Err(RegistryError::new(
                StatusCode::NOT_FOUND,
                ErrorCode::NameUnknown,
                "this listener serves /metrics, /healthz and /readyz only",
            ));
        }
        let Some(auth) = &self.auth else {
            return Ok(());
        };
        if OPEN_PATHS.contains(&req.uri().path()) {
            return Ok(());
        }
        match auth.check(req.headers().get(header::AUTHORIZATION)).await {
            Check::Allowed => Ok(()),
            Check::Missing => Err(auth.challenge("authentication required")),
            Check::Refused(user) => {
                // SECURITY: the user name and address only, never the password.
                tracing::warn!(%peer, user = %user, path = %req.uri().path(), "authentication failed");
                Err(auth.challenge("invalid user name or password"))
            }
        }
    }

    /// The response, and the upstream that answered it.
    async fn answer(
        &self,
        req: &Request<Incoming>,
    ) -> Result<(Response<Body>, Option<String>), RegistryError> {
        let path = req.uri().path();
        let local = match path {
            "/healthz" => Some(text(StatusCode::OK, "ok\n")),
            "/readyz" => Some(self.readiness()),
            "/metrics" => Some(self.render_metrics().await),
            "/api/v1/cache" => Some(pretty(&self.inventory().await)),
            "/api/v1/cache/summary" => Some(pretty(&inventory::summary(&self.inventory().await))),
            "/v2/_catalog" => Some(self.catalog(req.uri().query()).await?),
            _ => None,
        };
        if let Some(resp) = local {
            if req.method() != Method::GET && req.method() != Method::HEAD {
                return Err(RegistryError::read_only(req.method()));
            }
            return Ok((resp, None));
        }
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return Err(RegistryError::read_only(req.method()));
        }
        match self.routes.route(path, req.uri().query())? {
            Target::Base => Ok((json(Bytes::from_static(b"{}")), None)),
            Target::Worker {
                index,
                path_and_query,
                namespace,
            } => {
                let worker = &self.workers[index];
                let name = worker.upstream.authority();
                let local = &self.local[index];
                let worker_path = path_and_query.split('?').next().unwrap_or("");
                if let Some(resp) =
                    answer_from_store(&local.store, &local.metrics, req, worker_path).await
                {
                    return Ok((resp, Some(name)));
                }
                let unavailable = || {
                    RegistryError::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        ErrorCode::Unavailable,
                        format!("the cache for {name} is restarting; retry shortly"),
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
                        tracing::warn!(upstream = %name, error = %e, "worker unreachable");
                        unavailable()
                    })?;
                if let Some(ns) = namespace.and_then(|n| HeaderValue::from_str(&n).ok()) {
                    resp.headers_mut().insert("oci-namespace", ns);
                }
                if let Some(link) = resp
                    .headers()
                    .get(header::LINK)
                    .and_then(|v| v.to_str().ok())
                {
                    let rewritten = rewrite_link(link, &path_and_query, path);
                    if let Ok(v) = HeaderValue::from_str(&rewritten) {
                        resp.headers_mut().insert(header::LINK, v);
                    }
                }
                Ok((resp, Some(name)))
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

    /// The supervisor's metrics and every ready worker's, merged.
    async fn render_metrics(&self) -> Response<Body> {
        for w in &self.workers {
            let up = i64::from(w.is_ready());
            self.metrics
                .worker_up
                .with_label_values(&[&w.upstream.authority()])
                .set(up);
        }
        let own = self.metrics.render();
        let hits: Vec<String> = self.local.iter().map(|l| l.metrics.render()).collect();
        let pages = futures_util::future::join_all(
            (0..self.workers.len())
                .filter(|&i| self.workers[i].is_ready())
                .map(|i| self.proxy.fetch(i, METRICS_PATH)),
        )
        .await;
        let pages: Vec<String> = pages
            .into_iter()
            .flatten()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .collect();
        let merged = metrics::merge(
            std::iter::once(own.as_str())
                .chain(hits.iter().map(String::as_str))
                .chain(pages.iter().map(String::as_str)),
        );
        let mut r = Response::new(full(merged));
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        );
        r
    }

    async fn inventory(&self) -> Vec<UpstreamCache> {
        let answers = futures_util::future::join_all(self.workers.iter().enumerate().map(
            |(i, w)| async move {
                if !w.is_ready() {
                    return None;
                }
                let body = self.proxy.fetch(i, INVENTORY_PATH).await?;
                serde_json::from_slice(&body).ok()
            },
        ))
        .await;
        self.workers
            .iter()
            .zip(answers)
            .map(|(w, inv)| inventory::build(&w.upstream, inv))
            .collect()
    }

    /// `/v2/_catalog?n=&last=`: cached repositories, paginated per the spec.
    async fn catalog(&self, query: Option<&str>) -> Result<Response<Body>, RegistryError> {
        let mut n = CATALOG_DEFAULT;
        let mut last = None;
        for (k, v) in query
            .unwrap_or("")
            .split('&')
            .filter_map(|p| p.split_once('='))
        {
            match k {
                "n" => {
                    n = v
                        .parse()
                        .ok()
                        .filter(|&n| n <= CATALOG_MAX)
                        .ok_or_else(|| {
                            RegistryError::new(
                                StatusCode::BAD_REQUEST,
                                ErrorCode::PaginationNumberInvalid,
                                format!("n must be a number from 0 to {CATALOG_MAX}"),
                            )
                        })?
                }
                "last" => {
                    last = Some(
                        percent_encoding::percent_decode_str(v)
                            .decode_utf8_lossy()
                            .into_owned(),
                    )
                }
                _ => {}
            }
        }
        let caches = self.inventory().await;
        let (page, more) = inventory::catalog_page(&caches, n, last.as_deref());
        let body =
            serde_json::to_vec(&serde_json::json!({ "repositories": page })).expect("serialisable");
        let mut resp = json(Bytes::from(body));
        if let (true, Some(last)) = (more && n > 0, page.last()) {
            let link = format!("</v2/_catalog?last={last}&n={n}>; rel=\"next\"");
            if let Ok(v) = HeaderValue::from_str(&link) {
                resp.headers_mut().insert(header::LINK, v);
            }
        }
        Ok(resp)
    }
}

/// Points an upstream's paging `Link` (tags/list) back at the client's own
/// name for the repository: the worker saw `/v2/org/img/...` where the client
/// asked for `/v2/upstream.test/org/img/...`. Absolute links lose their host.
fn rewrite_link(link: &str, worker_path: &str, client_path: &str) -> String {
    let name = |p: &str| {
        p.split('?')
            .next()
            .and_then(|p| p.strip_prefix("/v2/"))
            .and_then(regcache_worker::routing::split)
            .map(|(n, _)| format!("/v2/{n}/"))
    };
    let (Some(worker), Some(client)) = (name(worker_path), name(client_path)) else {
        return link.to_string();
    };
    let mut out = link.to_string();
    if let (Some(open), Some(at)) = (out.find('<'), out.find("/v2/")) {
        if open < at {
            out.replace_range(open + 1..at, "");
        }
    }
    out.replacen(&format!("<{worker}"), &format!("<{client}"), 1)
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

fn pretty(v: &impl serde::Serialize) -> Response<Body> {
    json(Bytes::from(
        serde_json::to_vec_pretty(v).expect("serialisable"),
    ))
}

#[cfg(test)]
mod tests {
    use super::rewrite_link;

    #[test]
    fn paging_links_keep_the_client_name() {
        let worker = "/v2/org/img/tags/list?n=2";
        let client = "/v2/upstream.test/org/img/tags/list";
        assert_eq!(
            rewrite_link(
                "</v2/org/img/tags/list?last=b&n=2>; rel=\"next\"",
                worker,
                client
            ),
            "</v2/upstream.test/org/img/tags/list?last=b&n=2>; rel=\"next\""
        );
        assert_eq!(
            rewrite_link(
                "<https://ghcr.io/v2/org/img/tags/list?last=b>; rel=\"next\"",
                worker,
                client
            ),
            "</v2/upstream.test/org/img/tags/list?last=b>; rel=\"next\""
        );
        // Docker Hub's added library/ is a name the client can use as is.
        let hub = rewrite_link(
            "</v2/library/debian/tags/list?last=b>; rel=\"next\"",
            "/v2/library/debian/tags/list",
            "/v2/library/debian/tags/list",
        );
        assert_eq!(hub, "</v2/library/debian/tags/list?last=b>; rel=\"next\"");
    }
}
