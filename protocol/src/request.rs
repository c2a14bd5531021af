//! Registry API requests: a method and a `/v2/...` path, decided once into a
//! typed [`Request`] and serialized again only to forward it.
//!
//! Repository names may contain the words `manifests`, `blobs`, `tags` and
//! `referrers`, while tags and digests cannot contain `/`; so the path is
//! split at the LAST endpoint marker ([`split`]). The front splits, routes
//! the raw name to an upstream ([`RepoRequest::new`] validates what it made of
//! it); a worker parses the forwarded path with [`parse`].

use std::fmt;

use crate::reference::{self, Digest, Name, Reference};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Invalid(#[from] reference::Error),
    #[error("no registry API endpoint at this path")]
    NoEndpoint,
    #[error("{0} is not supported: regcache is a read-only pull-through cache")]
    ReadOnly(http::Method),
}

/// The methods a read-only registry answers; anything else is refused
/// when the request is parsed, never later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
}

impl Method {
    pub fn parse(m: &http::Method) -> Result<Method, Error> {
        match *m {
            http::Method::GET => Ok(Method::Get),
            http::Method::HEAD => Ok(Method::Head),
            _ => Err(Error::ReadOnly(m.clone())),
        }
    }

    pub fn as_http(self) -> http::Method {
        match self {
            Method::Get => http::Method::GET,
            Method::Head => http::Method::HEAD,
        }
    }
}

/// What a request asks for after the repository name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Endpoint {
    Manifest(Reference),
    Blob(Digest),
    TagsList,
    Referrers(Digest),
}

/// What kind of thing a request or an upstream exchange is about: the
/// `type` metric label, and the registry code of a 404.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Manifest,
    Blob,
    Tags,
    Other,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Manifest => "manifest",
            Kind::Blob => "blob",
            Kind::Tags => "tags",
            Kind::Other => "other",
        }
    }
}

impl Endpoint {
    pub fn kind(&self) -> Kind {
        match self {
            Endpoint::Manifest(_) => Kind::Manifest,
            Endpoint::Blob(_) => Kind::Blob,
            Endpoint::TagsList => Kind::Tags,
            Endpoint::Referrers(_) => Kind::Other,
        }
    }

    /// Parses the part of a path after the repository name (`/manifests/x`).
    fn parse(suffix: &str) -> Result<Endpoint, Error> {
        if suffix == TAGS_LIST {
            Ok(Endpoint::TagsList)
        } else if let Some(r) = suffix.strip_prefix("/manifests/") {
            Ok(Endpoint::Manifest(r.parse()?))
        } else if let Some(d) = suffix.strip_prefix("/blobs/") {
            Ok(Endpoint::Blob(d.parse()?))
        } else if let Some(d) = suffix.strip_prefix("/referrers/") {
            Ok(Endpoint::Referrers(d.parse()?))
        } else {
            Err(Error::NoEndpoint)
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Manifest(r) => write!(f, "/manifests/{r}"),
            Endpoint::Blob(d) => write!(f, "/blobs/{d}"),
            Endpoint::TagsList => f.write_str(TAGS_LIST),
            Endpoint::Referrers(d) => write!(f, "/referrers/{d}"),
        }
    }
}

/// A request about one repository.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoRequest {
    pub method: Method,
    pub name: Name,
    pub endpoint: Endpoint,
    /// The query as sent (paging of tags/list, referrers filters), minus
    /// what routing consumed (`ns`).
    pub query: Option<String>,
}

impl RepoRequest {
    /// Validates a routed name and an endpoint suffix (from [`split`]).
    pub fn new(
        method: Method,
        name: &str,
        suffix: &str,
        query: Option<String>,
    ) -> Result<RepoRequest, Error> {
        Ok(RepoRequest {
            method,
            name: name.parse()?,
            endpoint: Endpoint::parse(suffix)?,
            query: query.filter(|q| !q.is_empty()),
        })
    }

    /// The path and query a registry sees: `/v2/<name>/<endpoint>[?query]`.
    pub fn path_and_query(&self) -> String {
        let mut s = format!("/v2/{}{}", self.name, self.endpoint);
        if let Some(q) = &self.query {
            s.push('?');
            s.push_str(q);
        }
        s
    }
}

/// A parsed registry API request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `/v2/`: the API version check.
    Base(Method),
    Repo(RepoRequest),
}

const MARKERS: [&str; 3] = ["/manifests/", "/blobs/", "/referrers/"];
const TAGS_LIST: &str = "/tags/list";

/// Is this the API version check (`/v2/` or `/v2`)?
pub fn is_base(path: &str) -> bool {
    path == "/v2/" || path == "/v2"
}

/// Splits the part of a path after `/v2/` into the raw name and the endpoint
/// suffix (starting with `/`). `None` when there is no endpoint marker.
pub fn split(rest: &str) -> Option<(&str, &str)> {
    // The last marker: a scan back over the `/`s, where three `rfind`s
    // each set up a substring searcher (1.4 % of a manifest hit's time).
    let b = rest.as_bytes();
    let mut at = (0..b.len())
        .rev()
        .filter(|&i| b[i] == b'/')
        .find(|&i| MARKERS.iter().any(|m| b[i..].starts_with(m.as_bytes())));
    if rest.ends_with(TAGS_LIST) {
        let t = rest.len() - TAGS_LIST.len();
        at = Some(at.map_or(t, |a| a.max(t)));
    }
    let at = at?;
    Some((&rest[..at], &rest[at..]))
}

/// Parses a request as a registry sees it: method, path, query.
pub fn parse(method: &http::Method, path: &str, query: Option<&str>) -> Result<Request, Error> {
    let method = Method::parse(method)?;
    if is_base(path) {
        return Ok(Request::Base(method));
    }
    let rest = path.strip_prefix("/v2/").ok_or(Error::NoEndpoint)?;
    let (name, suffix) = split(rest).ok_or(Error::NoEndpoint)?;
    RepoRequest::new(method, name, suffix, query.map(str::to_owned)).map(Request::Repo)
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

    proptest::proptest! {
        /// The scan finds what the plain definition does: the marker that
        /// starts last (or the `/tags/list` ending after it).
        #[test]
        fn split_is_the_last_marker(rest in "([a-z]{0,3}|/|/manifests/|/blobs/|/referrers/|/tags/list){0,8}") {
            let last = MARKERS.iter().filter_map(|m| rest.rfind(m)).max();
            let tags = rest.ends_with(TAGS_LIST).then(|| rest.len() - TAGS_LIST.len());
            let want = last.max(tags).map(|at| (&rest[..at], &rest[at..]));
            proptest::prop_assert_eq!(split(&rest), want);
        }
    }

    #[test]
    fn parse_requests_and_serialize_them_back() {
        let get = http::Method::GET;
        assert_eq!(
            parse(&get, "/v2/", None).unwrap(),
            Request::Base(Method::Get)
        );
        assert_eq!(
            parse(&http::Method::HEAD, "/v2", None).unwrap(),
            Request::Base(Method::Head)
        );
        for (path, query) in [
            (format!("/v2/library/debian/blobs/{}", d()), None),
            ("/v2/foo/blobs/bar/manifests/latest".to_string(), None),
            ("/v2/a/tags/list".to_string(), Some("n=2&last=b")),
            (format!("/v2/a/b/referrers/{}", d()), Some("artifactType=x")),
        ] {
            let Request::Repo(r) = parse(&get, &path, query).unwrap() else {
                panic!("{path}: not a repository request")
            };
            let want = match query {
                Some(q) => format!("{path}?{q}"),
                None => path.clone(),
            };
            assert_eq!(r.path_and_query(), want);
        }
        let Request::Repo(r) = parse(&get, "/v2/foo/blobs/bar/manifests/latest", None).unwrap()
        else {
            panic!()
        };
        assert_eq!(r.name.as_str(), "foo/blobs/bar");
        assert!(matches!(r.endpoint, Endpoint::Manifest(Reference::Tag(_))));
        assert_eq!(r.endpoint.kind(), Kind::Manifest);
    }

    #[test]
    fn parse_rejects() {
        let get = http::Method::GET;
        type Check = fn(&Error) -> bool;
        let name: Check = |e| matches!(e, Error::Invalid(reference::Error::Name(_)));
        let tag: Check = |e| matches!(e, Error::Invalid(reference::Error::Tag(_)));
        let digest: Check = |e| matches!(e, Error::Invalid(reference::Error::Digest(_)));
        let none: Check = |e| matches!(e, Error::NoEndpoint);
        let bad: &[(&str, Check)] = &[
            ("/v2/A/manifests/x", name),
            ("/v2/a//b/manifests/x", name),
            ("/v2/../etc/manifests/x", name),
            ("/v2/%2e%2e/manifests/x", name),
            ("/v2/a/manifests/..", tag),
            ("/v2/a/manifests/sha256:short", digest),
            ("/v2/a/blobs/latest", digest),
            ("/v2/a/blobs/sha256:xyz", digest),
            ("/v2/a", none),
            ("/v3/a/manifests/x", none),
            ("/v2/a/tags/lists", none),
        ];
        for (path, check) in bad {
            let e = parse(&get, path, None).unwrap_err();
            assert!(check(&e), "{path}: {e:?}");
        }
        assert!(matches!(
            parse(&http::Method::PUT, "/v2/a/manifests/x", None),
            Err(Error::ReadOnly(_))
        ));
    }
}
