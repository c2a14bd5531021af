//! The HTTP client to this worker's one upstream registry.
//!
//! It authenticates (see [`crate::auth`]), follows redirects itself (so each
//! hop can be authorised on its own, and `Authorization` never travels to a
//! host that did not ask for it), and turns upstream statuses into typed
//! errors. Proxies come from `http_proxy`/`https_proxy`/`no_proxy`.

use std::sync::Arc;
use std::time::Duration;

use http::Method;
use regcache_protocol::request::Kind;
use regcache_protocol::{Authority, Name};
use reqwest::header::{HeaderValue, ACCEPT, AUTHORIZATION, LOCATION, WWW_AUTHENTICATE};
use reqwest::{Response, StatusCode, Url};

use crate::auth::{self, Auth};
use crate::config::UpstreamOptions;
use crate::metrics::Metrics;
use crate::tls::Trust;
use regcache_store::breaker::{Admit, Breaker};
pub use regcache_store::init_tls;

/// Every manifest type we can store; upstreams refuse OCI types they were
/// not asked for, and the client's own preference is applied when serving.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.docker.distribution.manifest.v2+json, \
application/vnd.docker.distribution.manifest.v1+prettyjws, \
application/vnd.docker.distribution.manifest.v1+json";

const MAX_REDIRECTS: usize = 5;

#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("{what} not found on {upstream}")]
    NotFound {
        upstream: String,
        kind: Kind,
        what: String,
    },
    #[error("{upstream} denied access (HTTP {status}); check REGISTRY_PROXY_USERNAME / REGISTRY_PROXY_PASSWORD for this upstream")]
    Denied { upstream: String, status: u16 },
    #[error("{upstream} rate-limited the request")]
    RateLimited {
        upstream: String,
        retry_after: Option<String>,
    },
    #[error("{upstream} did not answer in time")]
    Timeout { upstream: String },
    /// Not asked at all: offline mode, the breaker open, or a rate limit's
    /// `Retry-After` not reached yet.
    #[error("{upstream} is not asked for {retry_after} s: {reason}")]
    Away {
        upstream: String,
        reason: String,
        retry_after: u64,
    },
    #[error("{upstream} is unreachable: {reason}")]
    Unreachable { upstream: String, reason: String },
    #[error("{upstream} answered HTTP {status}")]
    Status { upstream: String, status: u16 },
    #[error("{upstream} sent an invalid response: {reason}")]
    Garbage { upstream: String, reason: String },
    #[error("{upstream} sent content for {expected} whose digest is {actual}")]
    Mismatch {
        upstream: String,
        expected: String,
        actual: String,
    },
}

impl Error {
    /// True when a cached copy should be served instead of this error.
    pub fn allows_stale(&self) -> bool {
        matches!(
            self,
            Error::RateLimited { .. }
                | Error::Timeout { .. }
                | Error::Away { .. }
                | Error::Unreachable { .. }
                | Error::Status { .. }
                | Error::Garbage { .. }
        )
    }
}

/// The client for one upstream registry.
pub struct Upstream {
    /// `https://host[:port]`, the registry API base.
    base: Url,
    /// `host[:port]`, the name used in errors and logs.
    name: String,
    /// API requests and tokens: one multiplexed HTTP/2 connection where the
    /// upstream offers it.
    http: reqwest::Client,
    /// Blob bodies: HTTP/1.1 only. The kernel sizes each connection's window
    /// to the path (TCP autotuning) and holds what the disk has not taken yet
    /// in socket buffers; over HTTP/2 hyper's fixed 2 MiB stream window
    /// capped a 50 ms-away upstream at 34 MB/s (256 MiB: 7.8 s, 0.6 s over
    /// HTTP/1.1) and what arrived ahead of the disk waited in our heap.
    bulk: reqwest::Client,
    auth: Auth,
    metrics: Arc<Metrics>,
    options: UpstreamOptions,
    breaker: Breaker,
    /// Requests waiting for an upstream answer at once (a Docker Hub quota
    /// is shared by every client of the cache).
    in_flight: tokio::sync::Semaphore,
}

impl Upstream {
    pub fn new(
        base: Url,
        credentials: Option<auth::Credentials>,
        options: UpstreamOptions,
        metrics: Arc<Metrics>,
    ) -> Result<Self, reqwest::Error> {
        let name = Authority::of(&base).to_string();
        let trust = Trust::new(options.extra_roots.clone());
        let builder = |alpn: &[&[u8]]| {
            let http = reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .user_agent(concat!("regcache/", env!("CARGO_PKG_VERSION")))
                .connect_timeout(options.connect_timeout)
                // Between two reads of a body: a stalled transfer ends here.
                .read_timeout(options.idle_timeout)
                .pool_idle_timeout(Duration::from_secs(60));
            if options.skip_verify {
                http.tls_danger_accept_invalid_certs(true)
            } else {
                http.tls_backend_preconfigured(trust.config(alpn))
            }
        };
        let breaker = Breaker::new(
            options.breaker_failures,
            options.breaker_cooldown,
            options.response_timeout * 2,
        );
        Ok(Upstream {
            base,
            name,
            http: builder(&[b"h2", b"http/1.1"]).build()?,
            bulk: builder(&[b"http/1.1"]).http1_only().build()?,
            auth: Auth::new(credentials, metrics.clone()),
            metrics,
            breaker,
            in_flight: tokio::sync::Semaphore::new(options.concurrency.max(1)),
            options,
        })
    }

    /// Is the upstream taken to be away (breaker open, offline, rate-limited)?
    pub fn is_away(&self) -> bool {
        self.options.offline || self.breaker.is_open()
    }

    /// Does this upstream count manifest GETs against a pull rate limit
    /// (Docker Hub), HEADs not?
    pub fn counts_manifest_gets(&self) -> bool {
        self.name.ends_with("docker.io")
    }

    /// Never asked (`REGCACHE_OFFLINE`)?
    pub fn is_offline(&self) -> bool {
        self.options.offline
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sends `method path` for repository `repo`, authorised and with
    /// redirects followed. Returns the final response whatever its status.
    pub async fn send(
        &self,
        method: Method,
        repo: Option<&Name>,
        path_and_query: &str,
        accept: Option<&str>,
    ) -> Result<Response, Error> {
        self.exchange(method, repo, path_and_query, accept, None)
            .await
    }

    /// GETs `path` from byte `from` on (`Range: bytes=from-`): the rest of a
    /// transfer that broke off.
    pub async fn get_from(&self, repo: &Name, path: &str, from: u64) -> Result<Response, Error> {
        self.exchange(Method::GET, Some(repo), path, None, Some(from))
            .await
    }

    async fn exchange(
        &self,
        method: Method,
        repo: Option<&Name>,
        path_and_query: &str,
        accept: Option<&str>,
        from: Option<u64>,
    ) -> Result<Response, Error> {
        if self.options.offline {
            return Err(self.away("offline mode (REGCACHE_OFFLINE)".into(), Duration::ZERO));
        }
        if let Admit::Refuse {
            retry_after,
            reason,
            rate_limited,
        } = self.breaker.admit()
        {
            self.metrics.upstream_refused.inc();
            if rate_limited {
                return Err(Error::RateLimited {
                    upstream: self.name.clone(),
                    retry_after: Some(retry_after.as_secs().max(1).to_string()),
                });
            }
            return Err(self.away(reason, retry_after));
        }
        let _permit = self.in_flight.acquire().await.expect("never closed");
        let mut url = self.base.join(path_and_query).map_err(|e| Error::Garbage {
            upstream: self.name.clone(),
            reason: format!("bad request path: {e}"),
        })?;
        let scope = repo.map_or(String::new(), |r| format!("repository:{r}:pull"));
        let blob = method == Method::GET && path_and_query.rsplit('/').nth(1) == Some("blobs");
        let client = if blob { &self.bulk } else { &self.http };
        for _ in 0..=MAX_REDIRECTS {
            let resp = self
                .send_hop(client, &method, &url, &scope, accept, from)
                .await?;
            if !resp.status().is_redirection() || resp.status() == StatusCode::NOT_MODIFIED {
                return Ok(resp);
            }
            let location = resp
                .headers()
                .get(LOCATION)
                .and_then(|v| v.to_str().ok())
                .ok_or_else(|| self.garbage("redirect without Location"))?;
            url = url
                .join(location)
                .map_err(|_| self.garbage("redirect to an invalid Location"))?;
        }
        Err(self.garbage("too many redirects"))
    }

    /// One request to one URL: authorised for its host up front when we can,
    /// and answered once more if the host challenges.
    async fn send_hop(
        &self,
        client: &reqwest::Client,
        method: &Method,
        url: &Url,
        scope: &str,
        accept: Option<&str>,
        from: Option<u64>,
    ) -> Result<Response, Error> {
        let host = Authority::of(url).to_string();
        let own_host = host == self.name;
        let mut authorization = self.auth.header_for(&host, scope, own_host);
        for attempt in 0..2 {
            let mut req = client.request(method.clone(), url.clone());
            if let Some(a) = accept {
                req = req.header(ACCEPT, a);
            }
            if let Some(from) = from {
                req = req.header(reqwest::header::RANGE, format!("bytes={from}-"));
            }
            if let Some(a) = &authorization {
                let mut v = HeaderValue::from_str(a).map_err(|_| self.garbage("bad token"))?;
                v.set_sensitive(true);
                req = req.header(AUTHORIZATION, v);
            }
            let resp = self.answer_of(req).await?;
            if let Some(left) = ratelimit_remaining(&resp) {
                self.metrics.ratelimit_remaining.set(left);
            }
            if resp.status() != StatusCode::UNAUTHORIZED || attempt == 1 {
                return Ok(resp);
            }
            let challenges = auth::parse_challenges(
                resp.headers()
                    .get_all(WWW_AUTHENTICATE)
                    .iter()
                    .filter_map(|v| v.to_str().ok()),
            );
            let answer = self
                .auth
                .answer(
                    &self.http,
                    &host,
                    own_host,
                    &challenges,
                    scope,
                    authorization.as_deref(),
                )
                .await
                .map_err(|e| match e {
                    auth::TokenError::Status { status, .. }
                        if status == StatusCode::UNAUTHORIZED
                            || status == StatusCode::FORBIDDEN =>
                    {
                        Error::Denied {
                            upstream: self.name.clone(),
                            status: status.as_u16(),
                        }
                    }
                    other => Error::Unreachable {
                        upstream: self.name.clone(),
                        reason: other.to_string(),
                    },
                })?;
            match answer {
                Some(a) => authorization = Some(a),
                None => return Ok(resp),
            }
        }
        unreachable!("the loop returns on its second attempt")
    }

    /// Sends one request within the response timeout, and tells the breaker
    /// and the metrics how it went.
    async fn answer_of(&self, req: reqwest::RequestBuilder) -> Result<Response, Error> {
        let sent = tokio::time::timeout(self.options.response_timeout, req.send()).await;
        let resp = match sent {
            Ok(Ok(resp)) => resp,
            Ok(Err(e)) => {
                self.metrics.upstream(None);
                let e = self.transport(e);
                self.breaker.failure(&e.to_string());
                return Err(e);
            }
            Err(_) => {
                self.metrics.upstream(None);
                let e = Error::Timeout {
                    upstream: self.name.clone(),
                };
                self.breaker.failure(&e.to_string());
                return Err(e);
            }
        };
        let status = resp.status();
        self.metrics.upstream(Some(status.as_u16()));
        match status.as_u16() {
            502..=504 => self.breaker.failure(&format!("HTTP {status}")),
            429 => match retry_after(&resp) {
                Some(wait) => self.breaker.hold(
                    std::time::Instant::now() + wait,
                    &format!("rate-limited (HTTP 429, Retry-After {} s)", wait.as_secs()),
                ),
                None => self.breaker.success(),
            },
            _ => self.breaker.success(),
        }
        Ok(resp)
    }

    fn away(&self, reason: String, retry_after: Duration) -> Error {
        Error::Away {
            upstream: self.name.clone(),
            reason,
            retry_after: retry_after.as_secs().max(1),
        }
    }

    /// Maps a final non-success status to an error; passes success through.
    pub fn check(&self, resp: Response, kind: Kind, what: &str) -> Result<Response, Error> {
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        Err(match status {
            StatusCode::NOT_FOUND => Error::NotFound {
                upstream: self.name.clone(),
                kind,
                what: what.to_owned(),
            },
            StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => Error::Denied {
                upstream: self.name.clone(),
                status: status.as_u16(),
            },
            StatusCode::TOO_MANY_REQUESTS => Error::RateLimited {
                upstream: self.name.clone(),
                retry_after: resp
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned),
            },
            s => Error::Status {
                upstream: self.name.clone(),
                status: s.as_u16(),
            },
        })
    }

    pub fn garbage(&self, reason: &str) -> Error {
        Error::Garbage {
            upstream: self.name.clone(),
            reason: reason.to_owned(),
        }
    }

    /// A transport error, without the URL (redirect URLs carry signatures).
    pub fn transport(&self, e: reqwest::Error) -> Error {
        if e.is_timeout() {
            return Error::Timeout {
                upstream: self.name.clone(),
            };
        }
        let mut causes = String::new();
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            causes.push_str(": ");
            causes.push_str(&s.to_string());
            src = s.source();
        }
        let reason = format!("{}{causes}", e.without_url());
        Error::Unreachable {
            upstream: self.name.clone(),
            reason,
        }
    }
}

/// `Retry-After` as seconds (HTTP dates are taken as "a minute": upstreams
/// that rate-limit registries send seconds).
fn retry_after(resp: &Response) -> Option<Duration> {
    let v = resp
        .headers()
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?;
    Some(match v.trim().parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => Duration::from_secs(60),
    })
    .filter(|d| !d.is_zero())
}

/// Docker Hub's `ratelimit-remaining: 76;w=21600` -> 76.
fn ratelimit_remaining(resp: &Response) -> Option<i64> {
    resp.headers()
        .get("ratelimit-remaining")?
        .to_str()
        .ok()?
        .split(';')
        .next()?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use regcache_testkit::fake::FakeRegistry;

    fn client(fake: &FakeRegistry) -> Upstream {
        let metrics = Arc::new(Metrics::new(&fake.addr()));
        let options = UpstreamOptions::default();
        Upstream::new(fake.url().parse().unwrap(), None, options, metrics).unwrap()
    }

    #[tokio::test]
    async fn statuses_become_typed_errors() {
        let fake = FakeRegistry::start();
        let up = client(&fake);
        for (status, headers) in [
            (404, vec![]),
            (401, vec![]),
            (403, vec![]),
            (503, vec![]),
            (429, vec![("Retry-After", "9")]),
        ] {
            let path = format!("/v2/a/blobs/s{status}");
            fake.add_raw(&path, status, &headers, b"{}".to_vec());
            let resp = up.send(Method::GET, None, &path, None).await.unwrap();
            let e = up.check(resp, Kind::Blob, "x").unwrap_err();
            let ok = match status {
                404 => matches!(
                    e,
                    Error::NotFound {
                        kind: Kind::Blob,
                        ..
                    }
                ),
                401 | 403 => matches!(e, Error::Denied { .. }),
                429 => matches!(&e, Error::RateLimited { retry_after: Some(r), .. } if r == "9"),
                _ => matches!(e, Error::Status { status: 503, .. }),
            };
            assert!(ok, "{status}: {e:?}");
            assert_eq!(e.allows_stale(), matches!(status, 429 | 503), "{status}");
        }
        // Retry-After is respected: nothing is asked before it is over.
        let before = fake.request_count();
        let e = up
            .send(Method::GET, None, "/v2/a/blobs/s404", None)
            .await
            .unwrap_err();
        let waited = match &e {
            Error::RateLimited { retry_after, .. } => retry_after.clone(),
            _ => None,
        };
        assert!(matches!(waited.as_deref(), Some("8" | "9")), "{e:?}");
        assert!(e.allows_stale());
        assert_eq!(fake.request_count(), before);
    }

    #[tokio::test]
    async fn a_dead_upstream_is_left_alone_after_failures_in_a_row_and_offline_asks_nothing() {
        let fake = FakeRegistry::start();
        fake.add_raw("/v2/", 503, &[], vec![]);
        let options = UpstreamOptions {
            breaker_failures: 2,
            ..UpstreamOptions::default()
        };
        let up = Upstream::new(
            fake.url().parse().unwrap(),
            None,
            options,
            Arc::new(Metrics::new("x")),
        )
        .unwrap();
        for _ in 0..2 {
            let resp = up.send(Method::GET, None, "/v2/", None).await.unwrap();
            assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
        }
        assert!(up.is_away());
        let e = up.send(Method::GET, None, "/v2/", None).await.unwrap_err();
        assert!(matches!(e, Error::Away { .. }), "{e:?}");
        assert_eq!(fake.count("GET", "/v2/"), 2, "the third request went out");

        let offline = UpstreamOptions {
            offline: true,
            ..UpstreamOptions::default()
        };
        let up = Upstream::new(
            fake.url().parse().unwrap(),
            None,
            offline,
            Arc::new(Metrics::new("x")),
        )
        .unwrap();
        assert!(matches!(
            up.send(Method::GET, None, "/v2/", None).await,
            Err(Error::Away { .. })
        ));
        assert_eq!(fake.count("GET", "/v2/"), 2);
    }

    #[tokio::test]
    async fn redirects_are_followed_and_bounded() {
        let fake = FakeRegistry::start();
        let up = client(&fake);
        fake.add_raw("/v2/a/blobs/x", 307, &[("Location", "/cdn/x")], vec![]);
        fake.add_raw("/cdn/x", 200, &[], b"bytes".to_vec());
        let resp = up
            .send(Method::GET, None, "/v2/a/blobs/x", None)
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.bytes().await.unwrap(), "bytes");
        fake.add_raw("/loop", 302, &[("Location", "/loop")], vec![]);
        let e = up.send(Method::GET, None, "/loop", None).await.unwrap_err();
        assert!(
            matches!(&e, Error::Garbage { reason, .. } if reason.contains("too many")),
            "{e:?}"
        );
        fake.add_raw("/nowhere", 302, &[], vec![]);
        let e = up
            .send(Method::GET, None, "/nowhere", None)
            .await
            .unwrap_err();
        assert!(
            matches!(&e, Error::Garbage { reason, .. } if reason.contains("Location")),
            "{e:?}"
        );
    }

    #[tokio::test]
    async fn an_unreachable_upstream_is_a_typed_error_without_its_url() {
        let fake = FakeRegistry::start();
        let url: Url = fake.url().parse().unwrap();
        drop(fake);
        let up = Upstream::new(
            url,
            None,
            UpstreamOptions::default(),
            Arc::new(Metrics::new("gone")),
        )
        .unwrap();
        let e = up
            .send(Method::GET, None, "/v2/?secret=1", None)
            .await
            .unwrap_err();
        assert!(matches!(e, Error::Unreachable { .. }), "{e:?}");
        assert!(!e.to_string().contains("secret"), "{e}");
        assert!(e.allows_stale());
    }
}
