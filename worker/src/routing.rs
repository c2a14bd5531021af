//! Registry API paths: split once, at the right place, into a typed request.
//!
//! Repository names may contain the words `manifests`, `blobs`, `tags` and
//! `referrers`, while tags and digests cannot contain `/`; so the path is
//! split at the LAST endpoint marker. The supervisor uses [`split`] to find
//! the name it rewrites; the worker uses [`parse`] to validate everything.

use http::Method;

use crate::reference::{self, Digest, Name, Reference};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Invalid(#[from] reference::Error),
    #[error("no registry API endpoint at this path")]
    NoEndpoint,
    #[error("{0} is not supported")]
    Method(Method),
}

/// What a request asks for, after the repository name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Manifest(Reference),
    Blob(Digest),
    TagsList,
    Referrers(Digest),
}

/// A parsed `/v2/...` request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `GET /v2/`: the API version check.
    Base,
    Repo {
        name: Name,
        endpoint: Endpoint,
    },
}

/// The endpoint markers, each with the index of its own first byte.
const MARKERS: [&str; 3] = ["/manifests/", "/blobs/", "/referrers/"];
const TAGS_LIST: &str = "/tags/list";

/// Splits the part of a path after `/v2/` into the raw name and the endpoint
/// suffix (starting with `/`). `None` when there is no endpoint marker.
pub fn split(rest: &str) -> Option<(&str, &str)> {
    let mut at = MARKERS.iter().filter_map(|m| rest.rfind(m)).max();
    if rest.ends_with(TAGS_LIST) {
        let t = rest.len() - TAGS_LIST.len();
        at = Some(at.map_or(t, |a| a.max(t)));
    }
    let at = at?;
    Some((&rest[..at], &rest[at..]))
}

/// Parses a request's method and path (no query) into a [`Request`].
pub fn parse(method: &Method, path: &str) -> Result<Request, Error> {
    if method != Method::GET && method != Method::HEAD {
        return Err(Error::Method(method.clone()));
    }
    if path == "/v2/" || path == "/v2" {
        return Ok(Request::Base);
    }
    let rest = path.strip_prefix("/v2/").ok_or(Error::NoEndpoint)?;
    let (name, suffix) = split(rest).ok_or(Error::NoEndpoint)?;
    let name: Name = name.parse()?;
    let endpoint = if suffix == TAGS_LIST {
        Endpoint::TagsList
    } else if let Some(r) = suffix.strip_prefix("/manifests/") {
        Endpoint::Manifest(r.parse()?)
    } else if let Some(d) = suffix.strip_prefix("/blobs/") {
        Endpoint::Blob(d.parse()?)
    } else if let Some(d) = suffix.strip_prefix("/referrers/") {
        Endpoint::Referrers(d.parse()?)
    } else {
        return Err(Error::NoEndpoint);
    };
    Ok(Request::Repo { name, endpoint })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d() -> String {
        format!("sha256:{}", "ab".repeat(32))
    }

    #[test]
    fn split_at_last_marker() {
        let dd = d();
        let cases: &[(&str, Option<(&str, &str)>)] = &[
            ("a/manifests/v1", Some(("a", "/manifests/v1"))),
            ("foo/blobs/bar/blobs/x", Some(("foo/blobs/bar", "/blobs/x"))),
            ("manifests/manifests/v", Some(("manifests", "/manifests/v"))),
            ("a/tags/list", Some(("a", "/tags/list"))),
            ("tags/list/manifests/x", Some(("tags/list", "/manifests/x"))),
            ("a/b/referrers/x", Some(("a/b", "/referrers/x"))),
            ("a/b", None),
            ("", None),
        ];
        for (input, want) in cases {
            assert_eq!(split(input), *want, "{input}");
        }
        let p = format!("a/blobs/{dd}");
        assert_eq!(split(&p), Some(("a", &p[1..])));
    }

    #[test]
    fn parse_requests() {
        let get = Method::GET;
        assert_eq!(parse(&get, "/v2/").unwrap(), Request::Base);
        assert_eq!(parse(&Method::HEAD, "/v2").unwrap(), Request::Base);
        let r = parse(&get, &format!("/v2/library/debian/blobs/{}", d())).unwrap();
        assert!(matches!(
            r,
            Request::Repo {
                endpoint: Endpoint::Blob(_),
                ..
            }
        ));
        let r = parse(&get, "/v2/foo/blobs/bar/manifests/latest").unwrap();
        match r {
            Request::Repo { name, endpoint } => {
                assert_eq!(name.as_str(), "foo/blobs/bar");
                assert!(matches!(endpoint, Endpoint::Manifest(Reference::Tag(_))));
            }
            _ => panic!(),
        }
        assert!(matches!(
            parse(&get, "/v2/a/tags/list").unwrap(),
            Request::Repo {
                endpoint: Endpoint::TagsList,
                ..
            }
        ));
    }

    #[test]
    fn parse_rejects() {
        let get = Method::GET;
        type Check = fn(&Error) -> bool;
        let bad: &[(&str, Check)] = &[
            ("/v2/A/manifests/x", |e| {
                matches!(e, Error::Invalid(reference::Error::Name(_)))
            }),
            ("/v2/a//b/manifests/x", |e| {
                matches!(e, Error::Invalid(reference::Error::Name(_)))
            }),
            ("/v2/../etc/manifests/x", |e| {
                matches!(e, Error::Invalid(reference::Error::Name(_)))
            }),
            ("/v2/%2e%2e/manifests/x", |e| {
                matches!(e, Error::Invalid(reference::Error::Name(_)))
            }),
            ("/v2/a/manifests/..", |e| {
                matches!(e, Error::Invalid(reference::Error::Tag(_)))
            }),
            ("/v2/a/manifests/sha256:short", |e| {
                matches!(e, Error::Invalid(reference::Error::Digest(_)))
            }),
            ("/v2/a/blobs/latest", |e| {
                matches!(e, Error::Invalid(reference::Error::Digest(_)))
            }),
            ("/v2/a/blobs/sha256:xyz", |e| {
                matches!(e, Error::Invalid(reference::Error::Digest(_)))
            }),
            ("/v2/a", |e| matches!(e, Error::NoEndpoint)),
            ("/v3/a/manifests/x", |e| matches!(e, Error::NoEndpoint)),
            ("/v2/a/tags/lists", |e| matches!(e, Error::NoEndpoint)),
        ];
        for (path, check) in bad {
            let e = parse(&get, path).unwrap_err();
            assert!(check(&e), "{path}: {e:?}");
        }
        assert!(matches!(
            parse(&Method::PUT, "/v2/a/manifests/x"),
            Err(Error::Method(_))
        ));
    }
}
