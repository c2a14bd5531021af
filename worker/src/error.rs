//! The one place a worker's errors get a status and a registry code.
//!
//! Who was at fault decides the status: the client's input -> 4xx (see
//! `regcache_protocol::error`); upstream said no -> its 404/403/429; upstream
//! unreachable or sending garbage -> 502/504; our storage -> 500, with a
//! message that never names a local path.

use http::{header, HeaderValue, StatusCode};
use regcache_protocol::error::{ErrorCode, RegistryError};
use regcache_protocol::request;

use crate::cache;
use crate::upstream;

/// Why a worker request failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Request(#[from] request::Error),
    #[error(transparent)]
    Cache(#[from] cache::Error),
}

impl From<upstream::Error> for Error {
    fn from(e: upstream::Error) -> Self {
        Error::Cache(e.into())
    }
}

impl From<&Error> for RegistryError {
    fn from(e: &Error) -> Self {
        match e {
            Error::Request(e) => e.clone().into(),
            Error::Cache(e) => e.into(),
        }
    }
}

impl From<&cache::Error> for RegistryError {
    fn from(e: &cache::Error) -> Self {
        match e {
            cache::Error::Upstream(e) => e.into(),
            cache::Error::Storage(_) => RegistryError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                ErrorCode::Unknown,
                "the cache's storage failed; see the regcache log",
            ),
            cache::Error::Abandoned => RegistryError::new(
                StatusCode::BAD_GATEWAY,
                ErrorCode::Unavailable,
                e.to_string(),
            ),
            cache::Error::Shared(inner) => (&**inner).into(),
            // Answered uncached before it gets here; a stray one is a 503.
            cache::Error::NoRoom(_) => RegistryError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::Unavailable,
                e.to_string(),
            ),
        }
    }
}

impl From<&upstream::Error> for RegistryError {
    fn from(e: &upstream::Error) -> Self {
        use upstream::Error as U;
        let (status, code) = match e {
            U::NotFound { kind, .. } => (StatusCode::NOT_FOUND, ErrorCode::not_found(*kind)),
            U::Denied { .. } => (StatusCode::FORBIDDEN, ErrorCode::Denied),
            U::RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, ErrorCode::TooManyRequests),
            U::Timeout { .. } => (StatusCode::GATEWAY_TIMEOUT, ErrorCode::Unavailable),
            U::Away { .. } => (StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable),
            U::Unreachable { .. } | U::Status { .. } | U::Garbage { .. } | U::Mismatch { .. } => {
                (StatusCode::BAD_GATEWAY, ErrorCode::Unavailable)
            }
        };
        let err = RegistryError::new(status, code, e.to_string());
        let retry_after = match e {
            U::RateLimited {
                retry_after: Some(v),
                ..
            } => HeaderValue::from_str(v).ok(),
            U::Away { retry_after, .. } => Some(HeaderValue::from(*retry_after)),
            _ => None,
        };
        match retry_after {
            Some(v) => err.with_header(header::RETRY_AFTER, v),
            None => err,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use regcache_protocol::request::Kind;

    fn up(e: upstream::Error) -> RegistryError {
        (&Error::from(e)).into()
    }

    #[test]
    fn status_by_who_is_at_fault() {
        let u = || "ghcr.io".to_string();
        let cases = [
            (
                up(upstream::Error::NotFound {
                    upstream: u(),
                    kind: Kind::Blob,
                    what: "x".into(),
                }),
                404,
                ErrorCode::BlobUnknown,
            ),
            (
                up(upstream::Error::Denied {
                    upstream: u(),
                    status: 401,
                }),
                403,
                ErrorCode::Denied,
            ),
            (
                up(upstream::Error::Timeout { upstream: u() }),
                504,
                ErrorCode::Unavailable,
            ),
            (
                up(upstream::Error::Garbage {
                    upstream: u(),
                    reason: "x".into(),
                }),
                502,
                ErrorCode::Unavailable,
            ),
        ];
        for (e, status, code) in cases {
            assert_eq!((e.status.as_u16(), e.code), (status, code), "{}", e.message);
        }
        let limited = up(upstream::Error::RateLimited {
            upstream: u(),
            retry_after: Some("7".into()),
        });
        assert_eq!(limited.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(
            limited.headers[0],
            (header::RETRY_AFTER, HeaderValue::from_static("7"))
        );
    }

    #[test]
    fn storage_failures_never_show_a_path() {
        let e = Error::Cache(cache::Error::Storage(regcache_store::Error::Io {
            op: "read",
            path: "/var/lib/regcache/secret/place".into(),
            source: std::io::Error::other("disk on fire"),
        }));
        let wire = RegistryError::from(&e);
        assert_eq!(wire.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!wire.message.contains("/var/lib"), "{}", wire.message);
        let shared = Error::Cache(cache::Error::Shared(std::sync::Arc::new(match e {
            Error::Cache(c) => c,
            Error::Request(_) => unreachable!(),
        })));
        assert!(!RegistryError::from(&shared).message.contains("/var/lib"));
    }
}
