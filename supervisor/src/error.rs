//! The one place the front's errors get a status and a registry code.

use http::{header, HeaderValue, StatusCode};
use regcache_protocol::error::{ErrorCode, RegistryError};
use regcache_protocol::request;

use crate::routing;

/// Why the front answered a request itself with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Route(#[from] routing::Error),
    /// No or wrong client credentials (the reason is for the client).
    #[error("{reason}")]
    Unauthorized { realm: String, reason: &'static str },
    #[error("this listener serves /metrics, /healthz and /readyz only")]
    ProbesOnly,
    /// The access policy does not grant the caller this repository.
    #[error("{repository} of {upstream} is not granted to {caller}")]
    Denied {
        caller: String,
        upstream: String,
        repository: String,
    },
    /// The upstream's worker is not running (or not answering).
    #[error("the cache for {upstream} is restarting; retry shortly")]
    Unavailable { upstream: String },
    #[error("the admin endpoints are off: set REGCACHE_ADMIN_TOKEN to use them")]
    AdminOff,
    #[error("the admin endpoints need Authorization: Bearer <REGCACHE_ADMIN_TOKEN>")]
    AdminRefused,
    #[error("use POST")]
    AdminMethod,
    #[error("{0}")]
    AdminBadRequest(String),
}

impl From<request::Error> for Error {
    fn from(e: request::Error) -> Self {
        Error::Route(e.into())
    }
}

impl Error {
    /// True when the failure is ours (logged once at the edge).
    pub fn is_server_fault(&self) -> bool {
        matches!(self, Error::Unavailable { .. })
    }
}

impl From<&Error> for RegistryError {
    fn from(e: &Error) -> Self {
        let msg = e.to_string();
        match e {
            Error::Route(routing::Error::Request(r)) => r.clone().into(),
            Error::Route(
                routing::Error::NotApi { .. } | routing::Error::UnknownUpstream { .. },
            )
            | Error::ProbesOnly => {
                RegistryError::new(StatusCode::NOT_FOUND, ErrorCode::NameUnknown, msg)
            }
            Error::Route(routing::Error::Pagination) => RegistryError::new(
                StatusCode::BAD_REQUEST,
                ErrorCode::PaginationNumberInvalid,
                msg,
            ),
            Error::Unauthorized { realm, .. } => {
                let value = format!("Basic realm=\"{}\"", realm.replace('"', ""));
                RegistryError::new(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, msg)
                    .with_header(
                        header::WWW_AUTHENTICATE,
                        HeaderValue::from_str(&value).unwrap_or(HeaderValue::from_static("Basic")),
                    )
            }
            Error::Denied { .. } => {
                RegistryError::new(StatusCode::FORBIDDEN, ErrorCode::Denied, msg)
            }
            Error::Unavailable { .. } => {
                RegistryError::new(StatusCode::SERVICE_UNAVAILABLE, ErrorCode::Unavailable, msg)
                    .with_header(header::RETRY_AFTER, HeaderValue::from_static("1"))
            }
            Error::AdminOff => {
                RegistryError::new(StatusCode::NOT_FOUND, ErrorCode::Unsupported, msg)
            }
            Error::AdminRefused => {
                RegistryError::new(StatusCode::UNAUTHORIZED, ErrorCode::Unauthorized, msg)
                    .with_header(
                        header::WWW_AUTHENTICATE,
                        HeaderValue::from_static("Bearer realm=\"regcache admin\""),
                    )
            }
            Error::AdminMethod => {
                RegistryError::new(StatusCode::METHOD_NOT_ALLOWED, ErrorCode::Unsupported, msg)
            }
            Error::AdminBadRequest(_) => {
                RegistryError::new(StatusCode::BAD_REQUEST, ErrorCode::Unsupported, msg)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        let cases: Vec<(Error, u16, ErrorCode)> = vec![
            (
                routing::Error::UnknownUpstream {
                    name: "x.io".into(),
                    configured: "ghcr.io".into(),
                }
                .into(),
                404,
                ErrorCode::NameUnknown,
            ),
            (
                routing::Error::Pagination.into(),
                400,
                ErrorCode::PaginationNumberInvalid,
            ),
            (
                request::Error::ReadOnly(http::Method::POST).into(),
                405,
                ErrorCode::Unsupported,
            ),
            (
                Error::Unavailable {
                    upstream: "ghcr.io".into(),
                },
                503,
                ErrorCode::Unavailable,
            ),
            (
                Error::Unauthorized {
                    realm: "r\"x".into(),
                    reason: "login",
                },
                401,
                ErrorCode::Unauthorized,
            ),
        ];
        for (e, status, code) in cases {
            let wire = RegistryError::from(&e);
            assert_eq!((wire.status.as_u16(), wire.code), (status, code), "{e}");
        }
        let wire = RegistryError::from(&Error::Unauthorized {
            realm: "r\"x".into(),
            reason: "login",
        });
        assert_eq!(wire.headers[0].1, "Basic realm=\"rx\"");
    }
}
