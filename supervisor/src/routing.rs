//! Which worker answers a request, and the path it sees.
//!
//! In this order (DESIGN.md): `?ns=<host>`; a first path component naming a
//! configured upstream or alias (stripped); an unknown host-like first
//! component (404 NAME_UNKNOWN); otherwise Docker Hub if configured, else the
//! first CONFIG entry. `library/` is added only for Docker Hub and only to a
//! one-component name. Names and references are validated by the worker.

use std::collections::HashMap;

use http::StatusCode;
use percent_encoding::percent_decode_str;
use regcache_worker::error::{ErrorCode, RegistryError};
use regcache_worker::routing::split;

use crate::config::Upstream;

/// Where a request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `/v2/`: answered by the supervisor itself.
    Base,
    /// A worker, with the path and query it will see.
    Worker {
        index: usize,
        path_and_query: String,
        /// The `ns` the request named, echoed as `OCI-Namespace`.
        namespace: Option<String>,
    },
}

/// The routing table built from CONFIG.
#[derive(Debug, Clone)]
pub struct Routes {
    by_name: HashMap<String, usize>,
    /// Receives bare names: Docker Hub if configured, else the first entry.
    default: usize,
    hub: Option<usize>,
    /// For error messages: what is configured.
    listing: String,
}

impl Routes {
    pub fn new(upstreams: &[Upstream]) -> Routes {
        let mut by_name = HashMap::new();
        for up in upstreams {
            for name in up.names() {
                by_name.entry(name).or_insert(up.index);
            }
        }
        let hub = upstreams
            .iter()
            .find(|u| u.is_docker_hub())
            .map(|u| u.index);
        let listing = upstreams
            .iter()
            .map(|u| {
                let mut names = vec![u.authority()];
                names.extend(u.aliases.iter().cloned());
                names.join(" = ")
            })
            .collect::<Vec<_>>()
            .join(", ");
        Routes {
            by_name,
            default: hub.unwrap_or(0),
            hub,
            listing,
        }
    }

    /// A human-readable description of the rules, for `check-config`.
    pub fn describe(&self, upstreams: &[Upstream]) -> String {
        let default = &upstreams[self.default];
        let mut s = String::new();
        s.push_str("routing:\n");
        s.push_str("  ?ns=<name>            -> the upstream with that name or alias\n");
        s.push_str("  /v2/<name>/<repo>/... -> the upstream with that name or alias\n");
        s.push_str("  /v2/<unknown.host>/.. -> 404 NAME_UNKNOWN\n");
        s.push_str(&format!(
            "  /v2/<repo>/...        -> {} (bare names{})\n",
            default.authority(),
            if self.hub.is_some() {
                "; one-component names get library/"
            } else {
                ""
            }
        ));
        s
    }

    /// Routes a request path (raw, not decoded) and query.
    pub fn route(&self, path: &str, query: Option<&str>) -> Result<Target, RegistryError> {
        if path == "/v2/" || path == "/v2" {
            return Ok(Target::Base);
        }
        let not_found =
            |msg: String| RegistryError::new(StatusCode::NOT_FOUND, ErrorCode::NameUnknown, msg);
        let rest = path
            .strip_prefix("/v2/")
            .ok_or_else(|| not_found(format!("{path} is not a registry API path")))?;
        let (name, suffix) =
            split(rest).ok_or_else(|| not_found("no registry API endpoint at this path".into()))?;
        let (namespace, query) = take_ns(query);

        let (index, name) = if let Some(ns) = &namespace {
            let index = *self.by_name.get(&ns.to_ascii_lowercase()).ok_or_else(|| {
                not_found(format!(
                    "upstream {ns:?} is not configured here (configured: {})",
                    self.listing
                ))
            })?;
            // containerd's override_path keeps our prefix in the path: drop it.
            let name = match name.split_once('/') {
                Some((first, rest)) if self.by_name.get(first) == Some(&index) => rest,
                _ => name,
            };
            (index, name)
        } else {
            let (first, rest) = match name.split_once('/') {
                Some((f, r)) => (f, Some(r)),
                None => (name, None),
            };
            match (self.by_name.get(first), rest) {
                (Some(&index), Some(rest)) => (index, rest),
                _ if looks_like_host(first) => {
                    return Err(not_found(format!(
                        "upstream {first:?} is not configured here (configured: {})",
                        self.listing
                    )))
                }
                _ => (self.default, name),
            }
        };
        let name = if Some(index) == self.hub && !name.contains('/') && !name.is_empty() {
            format!("library/{name}")
        } else {
            name.to_string()
        };
        let mut path_and_query = format!("/v2/{name}{suffix}");
        if let Some(q) = query.filter(|q| !q.is_empty()) {
            path_and_query.push('?');
            path_and_query.push_str(&q);
        }
        Ok(Target::Worker {
            index,
            path_and_query,
            namespace,
        })
    }
}

/// A first component that a client would have meant as a registry host.
fn looks_like_host(c: &str) -> bool {
    c.contains('.') || c.contains(':') || c == "localhost"
}

/// Removes `ns` from the query, returning its decoded value and the rest.
fn take_ns(query: Option<&str>) -> (Option<String>, Option<String>) {
    let Some(query) = query else {
        return (None, None);
    };
    let mut ns = None;
    let rest: Vec<&str> = query
        .split('&')
        .filter(|pair| match pair.strip_prefix("ns=") {
            Some(v) => {
                ns = Some(
                    percent_decode_str(&v.replace('+', " "))
                        .decode_utf8_lossy()
                        .into_owned(),
                );
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

    fn worker(index: usize, pq: &str) -> Target {
        Target::Worker {
            index,
            path_and_query: pq.into(),
            namespace: None,
        }
    }

    const CFG: &str = r#"["ghcr.io", "docker.io",
        {"registry": "http://127.0.0.1:15000", "aliases": ["upstream.test"]}]"#;

    #[test]
    fn table() {
        let r = routes(CFG);
        let d = format!("sha256:{}", "a".repeat(64));
        let cases: Vec<(String, Option<&str>, Result<Target, ErrorCode>)> = vec![
            ("/v2/".into(), None, Ok(Target::Base)),
            ("/v2".into(), None, Ok(Target::Base)),
            (
                "/v2/ghcr.io/org/img/manifests/1".into(),
                None,
                Ok(worker(0, "/v2/org/img/manifests/1")),
            ),
            (
                "/v2/ghcr.io/img/manifests/1".into(),
                None,
                Ok(worker(0, "/v2/img/manifests/1")),
            ),
            (
                "/v2/debian/manifests/12".into(),
                None,
                Ok(worker(1, "/v2/library/debian/manifests/12")),
            ),
            (
                "/v2/library/debian/manifests/12".into(),
                None,
                Ok(worker(1, "/v2/library/debian/manifests/12")),
            ),
            (
                "/v2/org/img/manifests/1".into(),
                None,
                Ok(worker(1, "/v2/org/img/manifests/1")),
            ),
            (
                "/v2/docker.io/debian/manifests/12".into(),
                None,
                Ok(worker(1, "/v2/library/debian/manifests/12")),
            ),
            (
                "/v2/index.docker.io/org/x/tags/list".into(),
                Some("n=5"),
                Ok(worker(1, "/v2/org/x/tags/list?n=5")),
            ),
            (
                "/v2/upstream.test/org/app/manifests/1.0".into(),
                None,
                Ok(worker(2, "/v2/org/app/manifests/1.0")),
            ),
            (
                "/v2/127.0.0.1:15000/org/app/manifests/1.0".into(),
                None,
                Ok(worker(2, "/v2/org/app/manifests/1.0")),
            ),
            (
                format!("/v2/upstream.test/small/blobs/{d}"),
                None,
                Ok(worker(2, &format!("/v2/small/blobs/{d}"))),
            ),
            (
                "/v2/foo/blobs/x/manifests/1".into(),
                None,
                Ok(worker(1, "/v2/foo/blobs/x/manifests/1")),
            ),
            (
                "/v2/nope.example/x/manifests/1".into(),
                None,
                Err(ErrorCode::NameUnknown),
            ),
            (
                "/v2/localhost/x/manifests/1".into(),
                None,
                Err(ErrorCode::NameUnknown),
            ),
            // ctr's split of a host:port reference: a clean 404.
            (
                "/v2/127.0.0.1/manifests/5000/org/app:1.0".into(),
                None,
                Err(ErrorCode::NameUnknown),
            ),
            ("/v2/x".into(), None, Err(ErrorCode::NameUnknown)),
            ("/metrics".into(), None, Err(ErrorCode::NameUnknown)),
        ];
        for (path, query, want) in cases {
            let got = r.route(&path, query).map_err(|e| e.code);
            assert_eq!(got, want, "{path}");
        }
    }

    #[test]
    fn namespace_parameter() {
        let r = routes(CFG);
        let t = r
            .route("/v2/library/alpine/manifests/3", Some("ns=docker.io"))
            .unwrap();
        assert_eq!(
            t,
            Target::Worker {
                index: 1,
                path_and_query: "/v2/library/alpine/manifests/3".into(),
                namespace: Some("docker.io".into())
            }
        );
        // Percent-encoded host:port, other parameters kept.
        let t = r
            .route("/v2/org/app/tags/list", Some("n=2&ns=127.0.0.1%3A15000"))
            .unwrap();
        assert!(
            matches!(t, Target::Worker { index: 2, ref path_and_query, .. } if path_and_query == "/v2/org/app/tags/list?n=2")
        );
        // override_path keeps our prefix: stripped.
        let t = r
            .route(
                "/v2/upstream.test/org/app/manifests/1",
                Some("ns=upstream.test"),
            )
            .unwrap();
        assert!(
            matches!(t, Target::Worker { index: 2, ref path_and_query, .. } if path_and_query == "/v2/org/app/manifests/1")
        );
        // ns names the upstream; the path's name is used as is.
        let t = r
            .route("/v2/org/app/manifests/1", Some("ns=ghcr.io"))
            .unwrap();
        assert!(
            matches!(t, Target::Worker { index: 0, ref path_and_query, .. } if path_and_query == "/v2/org/app/manifests/1")
        );
        let e = r
            .route("/v2/a/manifests/1", Some("ns=quay.io"))
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::NameUnknown);
        assert!(e.message.contains("ghcr.io"), "{}", e.message);
    }

    #[test]
    fn without_docker_hub_bare_names_go_to_the_first_entry_unprefixed() {
        let r = routes(r#"["ghcr.io", "quay.io"]"#);
        assert_eq!(
            r.route("/v2/img/manifests/1", None).unwrap(),
            worker(0, "/v2/img/manifests/1")
        );
        assert_eq!(
            r.route("/v2/quay.io/a/b/manifests/1", None).unwrap(),
            worker(1, "/v2/a/b/manifests/1")
        );
        let e = r.route("/v2/docker.io/a/manifests/1", None).unwrap_err();
        assert!(e.message.contains("ghcr.io, quay.io"), "{}", e.message);
    }
}
