//! What a request is and who answers it, decided once: the front's own
//! endpoints, or an upstream's worker with the typed request it will get.
//!
//! Upstream selection, in this order:
//! 1. `?ns=<name>` (containerd mirrors): the upstream with that name or alias;
//! 2. the request's `Host` (port ignored) naming an upstream's host or alias,
//!    for a cache with one hostname per upstream (never an IP or `localhost`);
//! 3. a first path component naming an upstream or alias (stripped);
//! 4. an unknown host-like first component: 404 NAME_UNKNOWN;
//! 5. otherwise Docker Hub if configured, else the first CONFIG entry.
//!
//! With 1 or 2, a first component that names the same upstream is stripped
//! too (containerd's `override_path`). `library/` is added only for Docker
//! Hub and only to a one-component name.

use std::collections::HashMap;

use percent_encoding::percent_decode_str;
use regcache_protocol::request::{self, is_base, split, Method, RepoRequest};

use crate::config::Upstream;

/// Catalog page size without `n`, and the largest `n` accepted.
pub const CATALOG_DEFAULT: usize = 100;
pub const CATALOG_MAX: usize = 1000;

/// A request, decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Health,
    Ready,
    Metrics,
    /// `/api/v1/cache`
    Inventory,
    /// `/api/v1/cache/summary`
    Summary,
    /// `/v2/_catalog?n=&last=`
    Catalog {
        n: usize,
        last: Option<String>,
    },
    /// `/v2/`: the API version check.
    Base,
    /// `/`, `/ui/`: the status page.
    Ui,
    /// `/api/v1/status`: the status page's figures.
    Status,
    /// A registry request for the worker of upstream `index`.
    Upstream {
        index: usize,
        request: RepoRequest,
        /// The `ns` the request named, echoed as `OCI-Namespace`.
        namespace: Option<String>,
    },
}

impl Route {
    /// Probes and scrapes: open without client credentials, and the only
    /// routes of the metrics listener.
    pub fn is_probe(&self) -> bool {
        matches!(self, Route::Health | Route::Ready | Route::Metrics)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Request(#[from] request::Error),
    #[error("{path} is not a registry API path")]
    NotApi { path: String },
    #[error("upstream {name:?} is not configured here (configured: {configured})")]
    UnknownUpstream { name: String, configured: String },
    #[error("n must be a number from 0 to {CATALOG_MAX}")]
    Pagination,
}

/// The routing table built from CONFIG.
#[derive(Debug, Clone)]
pub struct Routes {
    by_name: HashMap<String, usize>,
    by_host: HashMap<String, usize>,
    /// Receives bare names: Docker Hub if configured, else the first entry.
    default: usize,
    hub: Option<usize>,
    /// For error messages: what is configured.
    listing: String,
}

impl Routes {
    pub fn new(upstreams: &[Upstream]) -> Routes {
        let mut by_name = HashMap::new();
        let mut by_host = HashMap::new();
        for up in upstreams {
            for name in up.names() {
                by_name.entry(name).or_insert(up.index);
            }
            for host in up.hostnames() {
                by_host.entry(host).or_insert(up.index);
            }
        }
        let hub = upstreams
            .iter()
            .find(|u| u.is_docker_hub())
            .map(|u| u.index);
        let listing = upstreams
            .iter()
            .map(|u| {
                let mut names = vec![u.name()];
                names.extend(u.aliases.iter().cloned());
                names.join(" = ")
            })
            .collect::<Vec<_>>()
            .join(", ");
        Routes {
            by_name,
            by_host,
            default: hub.unwrap_or(0),
            hub,
            listing,
        }
    }

    /// A human-readable description of the rules, for `check-config`.
    pub fn describe(&self, upstreams: &[Upstream]) -> String {
        let default = &upstreams[self.default];
        let mut s = String::from("routing:\n");
        s.push_str("  ?ns=<name>            -> the upstream with that name or alias\n");
        s.push_str("  Host: <name>          -> the upstream with that host name or alias\n");
        s.push_str("  /v2/<name>/<repo>/... -> the upstream with that name or alias\n");
        s.push_str("  /v2/<unknown.host>/.. -> 404 NAME_UNKNOWN\n");
        s.push_str(&format!(
            "  /v2/<repo>/...        -> {} (bare names{})\n",
            default.name(),
            if self.hub.is_some() {
                "; one-component names get library/"
            } else {
                ""
            }
        ));
        s
    }

    /// Decides a request: its (already accepted) method, `Host` header,
    /// raw path and query.
    pub fn route(
        &self,
        method: Method,
        host: Option<&str>,
        path: &str,
        query: Option<&str>,
    ) -> Result<Route, Error> {
        match path {
            "/healthz" => return Ok(Route::Health),
            "/readyz" => return Ok(Route::Ready),
            "/metrics" => return Ok(Route::Metrics),
            "/api/v1/cache" => return Ok(Route::Inventory),
            "/api/v1/cache/summary" => return Ok(Route::Summary),
            "/" | "/ui" | "/ui/" => return Ok(Route::Ui),
            "/api/v1/status" => return Ok(Route::Status),
            "/v2/_catalog" => return catalog(query),
            p if is_base(p) => return Ok(Route::Base),
            _ => {}
        }
        let rest = path.strip_prefix("/v2/").ok_or_else(|| Error::NotApi {
            path: path.to_owned(),
        })?;
        let (name, suffix) = split(rest).ok_or(request::Error::NoEndpoint)?;
        let (namespace, query) = take_ns(query);
        let unknown = |name: &str| Error::UnknownUpstream {
            name: name.to_owned(),
            configured: self.listing.clone(),
        };
        let chosen = match &namespace {
            Some(ns) => Some(
                *self
                    .by_name
                    .get(&ns.to_ascii_lowercase())
                    .ok_or_else(|| unknown(ns))?,
            ),
            None => host
                .map(strip_port)
                .and_then(|h| self.by_host.get(&h.to_ascii_lowercase()))
                .copied(),
        };
        let (first, rest) = match name.split_once('/') {
            Some((f, r)) => (f, Some(r)),
            None => (name, None),
        };
        let (index, name) = match (chosen, self.by_name.get(first), rest) {
            // containerd's override_path keeps our prefix in the path: drop it.
            (Some(index), Some(&named), Some(rest)) if named == index => (index, rest),
            (Some(index), _, _) => (index, name),
            (None, Some(&index), Some(rest)) => (index, rest),
            _ if looks_like_host(first) => return Err(unknown(first)),
            _ => (self.default, name),
        };
        let name = if Some(index) == self.hub && !name.contains('/') && !name.is_empty() {
            format!("library/{name}")
        } else {
            name.to_string()
        };
        Ok(Route::Upstream {
            index,
            request: RepoRequest::new(method, &name, suffix, query)?,
            namespace,
        })
    }
}

fn strip_port(host: &str) -> &str {
    match host.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

/// A first component that a client would have meant as a registry host.
fn looks_like_host(c: &str) -> bool {
    c.contains('.') || c.contains(':') || c == "localhost"
}

/// `n` and `last` of a catalog request.
fn catalog(query: Option<&str>) -> Result<Route, Error> {
    let mut n = CATALOG_DEFAULT;
    let mut last = None;
    for (k, v) in url::form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        match &*k {
            "n" => {
                n = v
                    .parse()
                    .ok()
                    .filter(|&n| n <= CATALOG_MAX)
                    .ok_or(Error::Pagination)?
            }
            "last" => last = Some(v.into_owned()),
            _ => {}
        }
    }
    Ok(Route::Catalog { n, last })
}

/// Removes `ns` from the query, returning its decoded value and the rest
/// as it was sent (the worker forwards it upstream byte for byte).
fn take_ns(query: Option<&str>) -> (Option<String>, Option<String>) {
    let Some(query) = query else {
        return (None, None);
    };
    let mut ns = None;
    let rest: Vec<&str> = query
        .split('&')
        .filter(|pair| match pair.strip_prefix("ns=") {
            Some(v) => {
                let v = v.replace('+', " ");
                ns = Some(percent_decode_str(&v).decode_utf8_lossy().into_owned());
                false
            }
            None => !pair.is_empty(),
        })
        .collect();
    (ns.filter(|n| !n.is_empty()), Some(rest.join("&")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config;

    fn routes(cfg: &str) -> Routes {
        Routes::new(&config::parse(cfg).unwrap())
    }

    /// (upstream index, path and query the worker sees), or the error.
    type Routed = Result<(usize, String), String>;

    fn to(r: &Routes, host: Option<&str>, path: &str, query: Option<&str>) -> Routed {
        match r.route(Method::Get, host, path, query) {
            Ok(Route::Upstream { index, request, .. }) => Ok((index, request.path_and_query())),
            Ok(other) => Err(format!("{other:?}")),
            Err(e) => Err(format!("{e:?}")),
        }
    }

    const CFG: &str = r#"["ghcr.io", "docker.io",
        {"registry": "http://127.0.0.1:15000", "aliases": ["upstream.test"]}]"#;

    #[test]
    fn table() {
        let r = routes(CFG);
        let d = format!("sha256:{}", "a".repeat(64));
        let ok = |i: usize, p: &str| Ok((i, p.to_string()));
        let cases: Vec<(String, Option<&str>, Routed)> = vec![
            (
                "/v2/ghcr.io/org/img/manifests/1".into(),
                None,
                ok(0, "/v2/org/img/manifests/1"),
            ),
            (
                "/v2/ghcr.io/img/manifests/1".into(),
                None,
                ok(0, "/v2/img/manifests/1"),
            ),
            (
                "/v2/debian/manifests/12".into(),
                None,
                ok(1, "/v2/library/debian/manifests/12"),
            ),
            (
                "/v2/library/debian/manifests/12".into(),
                None,
                ok(1, "/v2/library/debian/manifests/12"),
            ),
            (
                "/v2/org/img/manifests/1".into(),
                None,
                ok(1, "/v2/org/img/manifests/1"),
            ),
            (
                "/v2/docker.io/debian/manifests/12".into(),
                None,
                ok(1, "/v2/library/debian/manifests/12"),
            ),
            (
                "/v2/index.docker.io/org/x/tags/list".into(),
                Some("n=5"),
                ok(1, "/v2/org/x/tags/list?n=5"),
            ),
            (
                "/v2/upstream.test/org/app/manifests/1.0".into(),
                None,
                ok(2, "/v2/org/app/manifests/1.0"),
            ),
            (
                "/v2/127.0.0.1:15000/org/app/manifests/1.0".into(),
                None,
                ok(2, "/v2/org/app/manifests/1.0"),
            ),
            (
                format!("/v2/upstream.test/small/blobs/{d}"),
                None,
                ok(2, &format!("/v2/small/blobs/{d}")),
            ),
            (
                "/v2/foo/blobs/x/manifests/1".into(),
                None,
                ok(1, "/v2/foo/blobs/x/manifests/1"),
            ),
        ];
        for (path, query, want) in cases {
            assert_eq!(to(&r, None, &path, query), want, "{path}");
        }
        for (path, error) in [
            ("/v2/nope.example/x/manifests/1", "UnknownUpstream"),
            ("/v2/localhost/x/manifests/1", "UnknownUpstream"),
            // ctr's split of a host:port reference: a clean 404.
            (
                "/v2/127.0.0.1/manifests/5000/org/app:1.0",
                "UnknownUpstream",
            ),
            ("/v2/x", "NoEndpoint"),
            ("/v3/x/manifests/1", "NotApi"),
            ("/v2/a/manifests/..", "Invalid"),
        ] {
            let got = to(&r, None, path, None).unwrap_err();
            assert!(got.contains(error), "{path}: {got}");
        }
        let own = |p, q| r.route(Method::Get, None, p, q).unwrap();
        assert_eq!(own("/v2/", None), Route::Base);
        assert_eq!(own("/metrics", None), Route::Metrics);
        assert_eq!(
            own("/v2/_catalog", Some("n=2&last=a%2Fb")),
            Route::Catalog {
                n: 2,
                last: Some("a/b".into())
            }
        );
        assert!(r
            .route(Method::Get, None, "/v2/_catalog", Some("n=5000"))
            .is_err());
    }

    #[test]
    fn namespace_parameter() {
        let r = routes(CFG);
        let Route::Upstream {
            index,
            request,
            namespace,
        } = r
            .route(
                Method::Get,
                None,
                "/v2/library/alpine/manifests/3",
                Some("ns=docker.io"),
            )
            .unwrap()
        else {
            panic!()
        };
        assert_eq!(
            (index, request.path_and_query().as_str()),
            (1, "/v2/library/alpine/manifests/3")
        );
        assert_eq!(namespace.as_deref(), Some("docker.io"));
        // Percent-encoded host:port, other parameters kept as sent.
        assert_eq!(
            to(
                &r,
                None,
                "/v2/org/app/tags/list",
                Some("n=2&ns=127.0.0.1%3A15000&last=a%2Bb")
            ),
            Ok((2, "/v2/org/app/tags/list?n=2&last=a%2Bb".into()))
        );
        // override_path keeps our prefix: stripped.
        assert_eq!(
            to(
                &r,
                None,
                "/v2/upstream.test/org/app/manifests/1",
                Some("ns=upstream.test")
            ),
            Ok((2, "/v2/org/app/manifests/1".into()))
        );
        // ns names the upstream; the path's name is used as is.
        assert_eq!(
            to(&r, None, "/v2/org/app/manifests/1", Some("ns=ghcr.io")),
            Ok((0, "/v2/org/app/manifests/1".into()))
        );
        let e = r
            .route(Method::Get, None, "/v2/a/manifests/1", Some("ns=quay.io"))
            .unwrap_err();
        assert!(e.to_string().contains("ghcr.io"), "{e}");
    }

    #[test]
    fn host_names_route_without_a_prefix() {
        let r = routes(
            r#"["docker.io", {"registry": "ghcr.io", "aliases": ["ghcr.cache.example"]},
                {"registry": "http://127.0.0.1:15000", "aliases": ["upstream.test"]}]"#,
        );
        let path = "/v2/org/img/manifests/1";
        assert_eq!(
            to(&r, Some("ghcr.cache.example:5000"), path, None),
            Ok((1, path.into()))
        );
        assert_eq!(
            to(&r, Some("GHCR.cache.example"), path, None),
            Ok((1, path.into()))
        );
        assert_eq!(
            to(&r, Some("upstream.test"), path, None),
            Ok((2, path.into()))
        );
        // The same upstream's prefix as well: stripped once.
        assert_eq!(
            to(
                &r,
                Some("ghcr.cache.example"),
                "/v2/ghcr.io/org/img/manifests/1",
                None
            ),
            Ok((1, path.into()))
        );
        // Addresses of the cache itself change nothing.
        for host in [
            "127.0.0.1:5000",
            "localhost:5000",
            "[::1]:5000",
            "cache.internal:5000",
        ] {
            assert_eq!(
                to(&r, Some(host), path, None),
                Ok((0, path.into())),
                "{host}"
            );
            assert_eq!(
                to(
                    &r,
                    Some(host),
                    "/v2/upstream.test/org/img/manifests/1",
                    None
                ),
                Ok((2, path.into())),
                "{host}"
            );
        }
        // ns wins over Host.
        assert_eq!(
            to(&r, Some("upstream.test"), path, Some("ns=ghcr.io")),
            Ok((1, path.into()))
        );
    }

    #[test]
    fn without_docker_hub_bare_names_go_to_the_first_entry_unprefixed() {
        let r = routes(r#"["ghcr.io", "quay.io"]"#);
        assert_eq!(
            to(&r, None, "/v2/img/manifests/1", None),
            Ok((0, "/v2/img/manifests/1".into()))
        );
        assert_eq!(
            to(&r, None, "/v2/quay.io/a/b/manifests/1", None),
            Ok((1, "/v2/a/b/manifests/1".into()))
        );
        let e = r
            .route(Method::Get, None, "/v2/docker.io/a/manifests/1", None)
            .unwrap_err();
        assert!(e.to_string().contains("ghcr.io, quay.io"), "{e}");
    }
}
