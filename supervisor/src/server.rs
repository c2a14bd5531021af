//! The front handler, as a pipeline: accept the method -> decide the route
//! ([`crate::routing`]) -> authenticate -> answer (the front's own endpoints,
//! a local hit, or the worker) -> finish (headers, metrics, access log).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode};
use regcache_protocol::body::{full, Body};
use regcache_protocol::error::RegistryError;
use regcache_protocol::internal::{Inventory, Status, INVENTORY_PATH, METRICS_PATH, STATUS_PATH};
use regcache_protocol::request::{Endpoint, Method, RepoRequest};
use regcache_protocol::response::{self, json, text, X_CACHE};

use crate::access::{Caller, Policy};
use crate::access_log::{Entry, Logged};
use crate::client_auth::{Check, Htpasswd};
use crate::error::Error;
use crate::hits::LocalHits;
use crate::inventory::{self, UpstreamCache};
use crate::metrics::{self, Metrics};
use crate::proxy::Proxy;
use crate::routing::{Route, Routes};
use crate::sendfile::Spans;
use crate::workers::Worker;

/// What every request handler shares.
#[derive(Clone)]
pub struct Front {
    pub routes: Routes,
    pub workers: Vec<Arc<Worker>>,
    pub proxy: Proxy,
    pub metrics: Arc<Metrics>,
    pub auth: Option<Arc<Htpasswd>>,
    pub access: Option<Arc<Policy>>,
    /// The metrics listener: `/metrics` and the probes, nothing else.
    pub probes_only: bool,
    /// Per worker: its locally committed content, answered here.
    pub local: Arc<Vec<LocalHits>>,
    /// Once-a-minute totals, for the last hour's figures.
    pub history: Arc<crate::status::History>,
    /// The last pulls by tag.
    pub recent: Arc<crate::status::Recent>,
    pub preloads: Arc<crate::preload::Preloads>,
    /// `REGCACHE_ADMIN_TOKEN`: what `POST /api/v1/preload` must show (none:
    /// the endpoint is off).
    pub admin_token: Option<regcache_worker::Secret>,
}

type Answer = Result<(Response<Body>, Option<String>), Error>;

/// `POST /api/v1/preload?image=...&image=...[&platform=...]`.
pub const PRELOAD_PATH: &str = "/api/v1/preload";

impl Front {
    /// Answers one request (its body, if any, is never read).
    pub async fn handle<B>(&self, req: Request<B>, peer: SocketAddr) -> Response<Body> {
        let started = Instant::now();
        let method = Method::parse(req.method());
        let answer = if req.uri().path() == PRELOAD_PATH && !self.probes_only {
            // The one write the front takes: an admin's, with the token.
            self.admin_preload(&req, peer).await
        } else {
            match &method {
                Ok(m) => self.answer(*m, &req, peer).await,
                Err(e) => Err(e.clone().into()),
            }
        };
        let method = method.unwrap_or(Method::Get);
        let (mut resp, upstream) = match answer {
            Ok(r) => r,
            Err(e) => {
                if e.is_server_fault() {
                    tracing::warn!(path = %req.uri().path(), error = %e, "request failed");
                }
                (RegistryError::from(&e).into_response(), None)
            }
        };
        response::finish(&mut resp, method);
        self.metrics.front(resp.status().as_u16());
        let header = |name| resp.headers().get(name);
        let entry = Entry {
            method: req.method().clone(),
            uri: req.uri().clone(),
            upstream,
            status: resp.status().as_u16(),
            cache: header(X_CACHE).cloned(),
            // A HEAD sends no body, whatever its Content-Length says.
            length: match method {
                Method::Head => Some(0),
                _ => header(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse().ok()),
            },
            started,
        };
        resp.map(|b| Logged::wrap(b, entry))
    }

    async fn answer<B>(&self, method: Method, req: &Request<B>, peer: SocketAddr) -> Answer {
        let host = req
            .uri()
            .host()
            .or_else(|| req.headers().get(header::HOST)?.to_str().ok());
        let route = self
            .routes
            .route(method, host, req.uri().path(), req.uri().query())?;
        if self.probes_only && !route.is_probe() {
            return Err(Error::ProbesOnly);
        }
        let caller = if route.is_probe() {
            Caller::Anonymous
        } else {
            self.authenticate(req, peer).await?
        };
        let own = |resp| Ok((resp, None));
        match route {
            Route::Health => own(text(StatusCode::OK, "ok\n")),
            Route::Ready => own(self.readiness().await),
            Route::Metrics => own(self.render_metrics().await),
            Route::Inventory => own(pretty(&self.inventory(&caller).await)),
            Route::Summary => own(pretty(&inventory::summary(&self.inventory(&caller).await))),
            Route::Catalog { n, last } => own(self.catalog(&caller, n, last.as_deref()).await),
            // The ping asks for credentials even when some pulls need none:
            // clients (containers/image, docker) decide on it whether to
            // send the credentials they have.
            Route::Base if caller == Caller::Anonymous && self.auth.is_some() => {
                Err(self.login("authentication required"))
            }
            Route::Base => own(json(Bytes::from_static(b"{}"))),
            Route::Ui => {
                let mut resp =
                    Response::new(full(Bytes::from_static(crate::status::PAGE.as_bytes())));
                let h = resp.headers_mut();
                h.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/html; charset=utf-8"),
                );
                // Nothing but this origin, ever: the page is self-contained.
                h.insert(
                    "content-security-policy",
                    HeaderValue::from_static(
                        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
                    ),
                );
                h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
                own(resp)
            }
            Route::Status => own(pretty(&self.status_page(&caller).await)),
            Route::Upstream {
                index,
                request,
                namespace,
            } => {
                self.check_access(&caller, index, &request)?;
                self.upstream(index, &request, namespace, req).await
            }
        }
    }

    /// With htpasswd on, every route but the probes needs valid credentials
    /// (unless the access policy grants anonymous pulls); the `/v2/` ping
    /// answers 401 too, which is how docker learns to log in.
    async fn authenticate<B>(&self, req: &Request<B>, peer: SocketAddr) -> Result<Caller, Error> {
        let Some(auth) = &self.auth else {
            return Ok(Caller::Anonymous);
        };
        let refuse = |reason| self.login(reason);
        let anonymous_allowed = self.access.as_ref().is_some_and(|p| p.has_anonymous());
        match auth.check(req.headers().get(header::AUTHORIZATION)).await {
            Check::Allowed(user) => Ok(Caller::User(user)),
            Check::Missing if anonymous_allowed => Ok(Caller::Anonymous),
            Check::Missing => Err(refuse("authentication required")),
            Check::Refused(user) => {
                // SECURITY: the user name and address only, never the password.
                tracing::warn!(%peer, user = %user, path = %req.uri().path(), "authentication failed");
                Err(refuse("invalid user name or password"))
            }
        }
    }

    /// 401 with the challenge that makes clients log in.
    fn login(&self, reason: &'static str) -> Error {
        Error::Unauthorized {
            realm: self
                .auth
                .as_ref()
                .map_or("regcache", |a| a.realm())
                .to_owned(),
            reason,
        }
    }

    /// The access policy's word on `caller` pulling `request`.
    fn check_access(
        &self,
        caller: &Caller,
        index: usize,
        request: &RepoRequest,
    ) -> Result<(), Error> {
        let Some(policy) = &self.access else {
            return Ok(());
        };
        let upstream = &self.workers[index].upstream;
        if policy.allows(caller, upstream, request.name.as_str()) {
            return Ok(());
        }
        Err(match (caller, &self.auth) {
            (Caller::Anonymous, Some(_)) => self.login("authentication required"),
            (caller, _) => Error::Denied {
                caller: match caller {
                    Caller::User(u) => format!("user {u}"),
                    Caller::Anonymous => "anonymous clients".into(),
                },
                upstream: upstream.name(),
                repository: request.name.to_string(),
            },
        })
    }

    /// A registry request: a local hit, else the worker.
    async fn upstream<B>(
        &self,
        index: usize,
        request: &RepoRequest,
        namespace: Option<String>,
        req: &Request<B>,
    ) -> Answer {
        let worker = &self.workers[index];
        let name = worker.upstream.name();
        // Set by the connection where blobs may go out by `sendfile`.
        let sendfile = req.extensions().get::<Spans>();
        if let Some(resp) = self.local[index]
            .answer(req.headers(), request, sendfile)
            .await
        {
            return Ok((resp, Some(name)));
        }
        let unavailable = || Error::Unavailable {
            upstream: name.clone(),
        };
        if !worker.is_ready() {
            return Err(unavailable());
        }
        let (upstream, unavailable) = (&name, &unavailable);
        let forward = |follow| async move {
            self.proxy
                .forward(
                    index,
                    request,
                    req.headers(),
                    crate::proxy::Sender::Client,
                    follow,
                )
                .await
                .map_err(|e| {
                    tracing::warn!(%upstream, error = %e, "worker unreachable");
                    unavailable()
                })
        };
        // A blob still being filled is read from its spool here, not relayed.
        let follow = request.method == Method::Get && matches!(request.endpoint, Endpoint::Blob(_));
        let mut resp = forward(follow).await?;
        if resp
            .headers()
            .contains_key(regcache_protocol::follow::SPOOL)
        {
            resp = match self.local[index].follow(resp, sendfile) {
                Some(followed) => followed,
                None => forward(false).await?,
            };
        }
        if let Some(ns) = namespace.and_then(|n| HeaderValue::from_str(&n).ok()) {
            resp.headers_mut().insert("oci-namespace", ns);
        }
        rewrite_link(resp.headers_mut(), request, req.uri().path());
        if let (
            Method::Get,
            regcache_protocol::request::Endpoint::Manifest(regcache_protocol::Reference::Tag(tag)),
        ) = (request.method, &request.endpoint)
        {
            if resp.status() == StatusCode::OK {
                let cache = resp
                    .headers()
                    .get("x-cache")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-");
                self.recent.push(crate::status::Pull {
                    at_ms: crate::status::millis(std::time::SystemTime::now()),
                    upstream: name.clone(),
                    image: format!("{}:{tag}", request.name),
                    cache: cache.to_owned(),
                });
            }
        }
        Ok((resp, Some(name)))
    }

    /// Every upstream's state and figures, the recent pulls the caller may
    /// see, and preloading.
    pub async fn status_page(&self, caller: &Caller) -> crate::status::StatusPage {
        use crate::status::{ratio, UpstreamStatus};
        let statuses = self.statuses().await;
        let upstreams = self
            .workers
            .iter()
            .enumerate()
            .zip(&statuses)
            .map(|((i, w), s)| {
                let name = w.upstream.name();
                let mut totals = s.as_ref().map(|s| s.totals).unwrap_or_default();
                totals.add(&self.local[i].metrics().totals());
                let last_hour = self.history.last_hour(i, totals);
                let (state, detail) = match s {
                    None => ("restarting", None),
                    Some(s) if s.offline => (
                        "offline",
                        Some("REGCACHE_OFFLINE: only cached content is served".into()),
                    ),
                    Some(s) if s.upstream_away => (
                        "upstream away",
                        Some("breaker open or rate limited: cached tags are served stale".into()),
                    ),
                    Some(s) if s.degraded.is_some() => ("store degraded", s.degraded.clone()),
                    Some(_) => ("ready", None),
                };
                UpstreamStatus {
                    url: w.upstream.url(),
                    state: state.into(),
                    detail,
                    restarts: self
                        .metrics
                        .worker_restarts
                        .with_label_values(&[&name])
                        .get(),
                    hit_ratio: ratio(&totals),
                    hit_ratio_last_hour: ratio(&last_hour),
                    since_start: totals,
                    last_hour,
                    stored_bytes: s.as_ref().map_or(0, |s| s.stored_bytes),
                    budget_bytes: s.as_ref().map_or(0, |s| s.budget_bytes),
                    store: s.as_ref().map(|s| s.store.clone()).unwrap_or_default(),
                    members: s.as_ref().map_or(0, |s| s.members),
                    fills: s.as_ref().map(|s| s.fills.clone()).unwrap_or_default(),
                    name,
                }
            })
            .collect();
        let recent = self
            .recent
            .list()
            .into_iter()
            .filter(|p| match &self.access {
                None => true,
                Some(policy) => self.workers.iter().any(|w| {
                    w.upstream.name() == p.upstream
                        && policy.allows(
                            caller,
                            &w.upstream,
                            p.image.rsplit_once(':').map_or("", |(n, _)| n),
                        )
                }),
            })
            .collect();
        crate::status::StatusPage {
            version: env!("CARGO_PKG_VERSION").into(),
            now_ms: crate::status::millis(std::time::SystemTime::now()),
            uptime_seconds: self.history.started.elapsed().as_secs(),
            upstreams,
            recent,
            preload: self.preloads.report(),
        }
    }

    /// Samples every upstream's totals for the last hour's figures.
    pub async fn sample(&self) {
        let statuses = self.statuses().await;
        for (i, s) in statuses.iter().enumerate() {
            let mut totals = s.as_ref().map(|s| s.totals).unwrap_or_default();
            totals.add(&self.local[i].metrics().totals());
            self.history.sample(i, totals);
        }
    }

    /// `POST /api/v1/preload`: the admin token, then the images of the query.
    async fn admin_preload<B>(&self, req: &Request<B>, peer: SocketAddr) -> Answer {
        let Some(token) = &self.admin_token else {
            return Err(Error::AdminOff);
        };
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|g| crate::peer::same_secret(g, token.expose())) {
            tracing::warn!(%peer, "preload refused: no valid admin token");
            return Err(Error::AdminRefused);
        }
        if req.method() != http::Method::POST {
            return Err(Error::AdminMethod);
        }
        let (mut images, mut platforms) = (Vec::new(), Vec::new());
        for (k, v) in url::form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes()) {
            match &*k {
                "image" => images.push(v.into_owned()),
                "platform" => platforms.push(v.into_owned()),
                _ => {}
            }
        }
        if images.is_empty() {
            return Err(Error::AdminBadRequest(
                "name at least one image: ?image=alpine:3.20".into(),
            ));
        }
        let items: Vec<crate::preload::Item> = images
            .into_iter()
            .map(|image| crate::preload::Item {
                image,
                platforms: platforms.clone(),
            })
            .collect();
        let states = self.preloads.run(self, &items).await;
        Ok((pretty(&states), None))
    }

    /// 200 when every worker is ready, else 503 listing those that are not.
    /// 200 when every worker is ready, else 503 listing those that are not;
    /// a store serving without its shared tier is said, and still ready
    /// (the local tier and upstream serve).
    async fn readiness(&self) -> Response<Body> {
        let down: Vec<String> = self
            .workers
            .iter()
            .filter(|w| !w.is_ready())
            .map(|w| w.upstream.name())
            .collect();
        let statuses = self.statuses().await;
        let degraded: String = self
            .workers
            .iter()
            .zip(&statuses)
            .filter_map(|(w, s)| {
                let reason = s.as_ref()?.degraded.as_ref()?;
                Some(format!("store degraded: {}: {reason}\n", w.upstream.name()))
            })
            .collect();
        // One line for the cluster: what the workers see of it.
        let members = statuses
            .iter()
            .flatten()
            .map(|s| s.members)
            .max()
            .unwrap_or(0);
        let degraded = if members > 0 {
            format!("{degraded}cluster: {members} members\n")
        } else {
            degraded
        };
        if down.is_empty() {
            text(StatusCode::OK, &format!("ready\n{degraded}"))
        } else {
            text(
                StatusCode::SERVICE_UNAVAILABLE,
                &format!("not ready: {}\n{degraded}", down.join(", ")),
            )
        }
    }

    /// Every ready worker's status (`None` for the others).
    async fn statuses(&self) -> Vec<Option<Status>> {
        futures_util::future::join_all(self.workers.iter().enumerate().map(|(i, w)| async move {
            if !w.is_ready() {
                return None;
            }
            let body = self.proxy.fetch(i, STATUS_PATH).await?;
            serde_json::from_slice::<Status>(&body).ok()
        }))
        .await
    }

    /// The supervisor's metrics and every ready worker's, merged.
    async fn render_metrics(&self) -> Response<Body> {
        for w in &self.workers {
            self.metrics
                .worker_up
                .with_label_values(&[&w.upstream.name()])
                .set(i64::from(w.is_ready()));
        }
        let own = self.metrics.render();
        let hits: Vec<String> = self.local.iter().map(|l| l.metrics().render()).collect();
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

    /// What is cached, as far as `caller` may see it (the access policy's
    /// grants: repository names are not for everyone either).
    async fn inventory(&self, caller: &Caller) -> Vec<UpstreamCache> {
        let answers = futures_util::future::join_all(self.workers.iter().enumerate().map(
            |(i, w)| async move {
                if !w.is_ready() {
                    return None;
                }
                let body = self.proxy.fetch(i, INVENTORY_PATH).await?;
                serde_json::from_slice::<Inventory>(&body).ok()
            },
        ))
        .await;
        self.workers
            .iter()
            .zip(answers)
            .map(|(w, inv)| {
                let mut cache = inventory::build(&w.upstream, inv);
                if let Some(policy) = &self.access {
                    cache
                        .repositories
                        .retain(|r| policy.allows(caller, &w.upstream, &r.name));
                }
                cache
            })
            .collect()
    }

    /// `/v2/_catalog?n=&last=`: cached repositories, paginated per the spec.
    async fn catalog(&self, caller: &Caller, n: usize, last: Option<&str>) -> Response<Body> {
        let caches = self.inventory(caller).await;
        let (page, more) = inventory::catalog_page(&caches, n, last);
        let body =
            serde_json::to_vec(&serde_json::json!({ "repositories": page })).expect("serialisable");
        let mut resp = json(Bytes::from(body));
        if let (true, Some(last)) = (more && n > 0, page.last()) {
            let link = format!("</v2/_catalog?last={last}&n={n}>; rel=\"next\"");
            if let Ok(v) = HeaderValue::from_str(&link) {
                resp.headers_mut().insert(header::LINK, v);
            }
        }
        resp
    }
}

/// Points an upstream's paging `Link` (tags/list) back at the client's own
/// name for the repository: the worker saw `/v2/org/img/...` where the client
/// asked for `/v2/upstream.test/org/img/...`. Absolute links lose their host.
fn rewrite_link(headers: &mut HeaderMap, request: &RepoRequest, client_path: &str) {
    let Some(link) = headers.get(header::LINK).and_then(|v| v.to_str().ok()) else {
        return;
    };
    let client = client_path
        .strip_prefix("/v2/")
        .and_then(regcache_protocol::request::split)
        .map(|(n, _)| format!("/v2/{n}/"));
    let Some(client) = client else { return };
    let worker = format!("/v2/{}/", request.name);
    let mut out = link.to_string();
    if let (Some(open), Some(at)) = (out.find('<'), out.find("/v2/")) {
        if open < at {
            out.replace_range(open + 1..at, "");
        }
    }
    let out = out.replacen(&format!("<{worker}"), &format!("<{client}"), 1);
    if let Ok(v) = HeaderValue::from_str(&out) {
        headers.insert(header::LINK, v);
    }
}

fn pretty(v: &impl serde::Serialize) -> Response<Body> {
    json(Bytes::from(
        serde_json::to_vec_pretty(v).expect("serialisable"),
    ))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::net::SocketAddr;
    use std::path::Path;
    use std::time::Duration;

    use regcache_protocol::request::Method;
    use regcache_protocol::{Algorithm, Digest, Manifest};
    use regcache_store::{FsStore, Store};
    use regcache_testkit::fake::FakeRegistry;
    use regcache_testkit::OCI_MANIFEST;

    use http::response::Parts;
    use regcache_testkit::inproc::{error_code, read, request};

    use super::*;
    use crate::settings::{Flags, Settings};

    const PEER: SocketAddr =
        SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 1);

    /// A front for one upstream at `fake`, whose worker is served in-process
    /// when `serving` (else it is down: not ready, socket absent).
    async fn front(fake: &FakeRegistry, storage: &Path, serving: bool) -> (Front, Arc<Worker>) {
        let config = format!(
            r#"[{{"registry": "{}", "aliases": ["upstream.test"]}}]"#,
            fake.url()
        );
        let env: HashMap<&str, String> = [("CONFIG", config)].into();
        let flags = Flags {
            storage: Some(storage.to_owned()),
            ..Flags::default()
        };
        let settings = Settings::from_env(flags, |k| env.get(k).cloned()).unwrap();
        let up = settings.upstreams[0].clone();
        let root = settings.storage_of(&up);
        let socket = storage.join("w0.sock");
        let worker = Arc::new(Worker::new(up.clone(), socket.clone(), root.clone()));
        if serving {
            let ws = regcache_worker::Settings::from_env(&up.url(), root, |_| None).unwrap();
            let listener =
                regcache_worker::Listener::Unix(regcache_worker::bind_unix(&socket).unwrap());
            tokio::spawn(regcache_worker::run(ws, listener, std::future::pending()));
            worker.set_ready(true);
        }
        let front = crate::front(&settings, vec![worker.clone()], Arc::new(Metrics::new()));
        (front, worker)
    }

    async fn send(
        front: &Front,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (Parts, Bytes) {
        read(front.handle(request(method, path, headers), PEER).await).await
    }

    #[tokio::test]
    async fn a_routed_request_answers_503_while_its_worker_is_down_and_stored_content_200() {
        let fake = FakeRegistry::start();
        let storage = tempfile::tempdir().unwrap();
        let (front, worker) = front(&fake, storage.path(), false).await;
        let (resp, body) = send(
            &front,
            "GET",
            "/v2/upstream.test/org/app/manifests/1.0",
            &[],
        )
        .await;
        assert_eq!(resp.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(error_code(&body), "UNAVAILABLE");
        assert_eq!(resp.headers[header::RETRY_AFTER], "1");
        // Committed content by digest of a repository that has it: answered
        // by the front itself; under another repository, the worker's (503).
        let bytes = Bytes::from_static(br#"{"schemaVersion":2}"#);
        let m = Manifest {
            media_type: OCI_MANIFEST.into(),
            digest: Digest::of(Algorithm::Sha256, &bytes),
            bytes,
        };
        let store = FsStore::open(&worker.storage).unwrap();
        store.manifest_put(&m).await.unwrap();
        let key = regcache_store::Key::Manifest(m.digest.clone());
        store.link(&"org/app".parse().unwrap(), &key).await.unwrap();
        let other = format!("/v2/upstream.test/org/other/manifests/{}", m.digest);
        let (resp, _) = send(&front, "GET", &other, &[]).await;
        assert_eq!(
            resp.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "served under a repository without it"
        );
        let path = format!("/v2/upstream.test/org/app/manifests/{}", m.digest);
        let (resp, body) = send(&front, "GET", &path, &[]).await;
        assert_eq!((resp.status, &body[..]), (StatusCode::OK, &m.bytes[..]));
        assert_eq!(resp.headers["x-cache"], "HIT");
        assert_eq!(fake.request_count(), 0);
    }

    #[tokio::test]
    async fn pulls_through_an_in_process_worker_and_answers_the_digest_itself() {
        let fake = FakeRegistry::start();
        let digest = fake.add_manifest(
            "org/app",
            Some("1.0"),
            OCI_MANIFEST,
            br#"{"schemaVersion":2}"#,
        );
        let storage = tempfile::tempdir().unwrap();
        let (front, worker) = front(&fake, storage.path(), true).await;
        let accept = [("accept", OCI_MANIFEST)];
        let (resp, _) = send(
            &front,
            "GET",
            "/v2/upstream.test/org/app/manifests/1.0",
            &accept,
        )
        .await;
        assert_eq!(resp.status, StatusCode::OK);
        assert_eq!(resp.headers["x-cache"], "MISS");
        assert_eq!(resp.headers["docker-content-digest"], digest.as_str());
        // The worker is gone now: the digest is still answered, by the front,
        // once the worker's write of it has landed (it follows the answer).
        worker.set_ready(false);
        let mark = fake.request_count();
        let path = format!("/v2/upstream.test/org/app/manifests/{digest}");
        let mut resp = send(&front, "HEAD", &path, &accept).await.0;
        for _ in 0..200 {
            if resp.status == StatusCode::OK {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            resp = send(&front, "HEAD", &path, &accept).await.0;
        }
        assert_eq!(resp.status, StatusCode::OK);
        assert_eq!(resp.headers["x-cache"], "HIT");
        assert_eq!(fake.request_count(), mark, "{}", fake.describe_requests());
    }

    #[tokio::test]
    async fn a_write_to_the_metrics_page_is_refused_before_any_worker_is_asked() {
        let fake = FakeRegistry::start();
        let storage = tempfile::tempdir().unwrap();
        let (front, worker) = front(&fake, storage.path(), false).await;
        // A worker that takes connections and never answers.
        let silent = tokio::net::UnixListener::bind(&worker.socket).unwrap();
        worker.set_ready(true);
        let (resp, body) = send(&front, "POST", "/metrics", &[]).await;
        assert_eq!(
            (resp.status, error_code(&body).as_str()),
            (StatusCode::METHOD_NOT_ALLOWED, "UNSUPPORTED")
        );
        let asked = tokio::time::timeout(Duration::from_millis(100), silent.accept()).await;
        assert!(asked.is_err(), "the refused request still asked the worker");
    }

    #[tokio::test]
    async fn the_probes_listener_serves_probes_only() {
        let fake = FakeRegistry::start();
        let storage = tempfile::tempdir().unwrap();
        let (front, _) = front(&fake, storage.path(), false).await;
        let probes = Front {
            probes_only: true,
            ..front
        };
        let (resp, _) = send(&probes, "GET", "/healthz", &[]).await;
        assert_eq!(resp.status, StatusCode::OK);
        let (resp, body) = send(&probes, "GET", "/v2/", &[]).await;
        assert_eq!(
            (resp.status, error_code(&body).as_str()),
            (StatusCode::NOT_FOUND, "NAME_UNKNOWN")
        );
        let (resp, _) = send(&probes, "GET", "/readyz", &[]).await;
        assert_eq!(
            resp.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "the worker is down"
        );
    }

    fn link_after(link: &str, name: &str, client_path: &str) -> String {
        let mut h = HeaderMap::new();
        h.insert(header::LINK, HeaderValue::from_str(link).unwrap());
        let request = RepoRequest::new(Method::Get, name, "/tags/list", None).unwrap();
        rewrite_link(&mut h, &request, client_path);
        h[header::LINK].to_str().unwrap().to_owned()
    }

    #[test]
    fn paging_links_keep_the_client_name() {
        let client = "/v2/upstream.test/org/img/tags/list";
        assert_eq!(
            link_after(
                "</v2/org/img/tags/list?last=b&n=2>; rel=\"next\"",
                "org/img",
                client
            ),
            "</v2/upstream.test/org/img/tags/list?last=b&n=2>; rel=\"next\""
        );
        assert_eq!(
            link_after(
                "<https://ghcr.io/v2/org/img/tags/list?last=b>; rel=\"next\"",
                "org/img",
                client
            ),
            "</v2/upstream.test/org/img/tags/list?last=b>; rel=\"next\""
        );
        // Docker Hub's added library/ is a name the client can use as is.
        let hub = link_after(
            "</v2/library/debian/tags/list?last=b>; rel=\"next\"",
            "library/debian",
            "/v2/library/debian/tags/list",
        );
        assert_eq!(hub, "</v2/library/debian/tags/list?last=b>; rel=\"next\"");
    }
}
