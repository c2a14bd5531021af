//! The registry error vocabulary and the one place where errors become
//! responses.
//!
//! Every layer (routing, storage, upstream) has its own error type; this module
//! turns each into the spec's JSON envelope `{"errors":[{code,message,detail}]}`
//! with the status that says who was at fault. Both the worker and the
//! supervisor answer errors through [`RegistryError::into_response`].

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use crate::body::{full, Body};
use crate::{reference, routing, storage, upstream};

/// Error codes of the OCI distribution spec (plus distribution's `UNAVAILABLE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// Blob unknown to registry.
    BlobUnknown,
    /// Manifest unknown to registry.
    ManifestUnknown,
    /// Repository name (or upstream) not known to registry.
    NameUnknown,
    /// Invalid repository name.
    NameInvalid,
    /// Manifest tag did not match the grammar.
    TagInvalid,
    /// Provided digest did not match the grammar or the content.
    DigestInvalid,
    /// Requested range cannot be served.
    RangeInvalid,
    /// `n` of a paginated list out of range.
    PaginationNumberInvalid,
    /// Authentication required.
    Unauthorized,
    /// Requested access to the resource is denied.
    Denied,
    /// The operation is unsupported (writes on a read-only cache).
    Unsupported,
    /// Too many requests.
    TooManyRequests,
    /// The service (upstream or worker) is unavailable.
    Unavailable,
    /// Anything else: our fault.
    Unknown,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BlobUnknown => "BLOB_UNKNOWN",
            ErrorCode::ManifestUnknown => "MANIFEST_UNKNOWN",
            ErrorCode::NameUnknown => "NAME_UNKNOWN",
            ErrorCode::NameInvalid => "NAME_INVALID",
            ErrorCode::TagInvalid => "TAG_INVALID",
            ErrorCode::DigestInvalid => "DIGEST_INVALID",
            ErrorCode::RangeInvalid => "RANGE_INVALID",
            ErrorCode::PaginationNumberInvalid => "PAGINATION_NUMBER_INVALID",
            ErrorCode::Unauthorized => "UNAUTHORIZED",
            ErrorCode::Denied => "DENIED",
            ErrorCode::Unsupported => "UNSUPPORTED",
            ErrorCode::TooManyRequests => "TOOMANYREQUESTS",
            ErrorCode::Unavailable => "UNAVAILABLE",
            ErrorCode::Unknown => "UNKNOWN",
        }
    }
}

/// An error as the client will see it.
#[derive(Debug, Clone)]
pub struct RegistryError {
    pub status: StatusCode,
    pub code: ErrorCode,
    pub message: String,
    /// Extra response headers (`Allow`, `Retry-After`, `WWW-Authenticate`).
    pub headers: Vec<(header::HeaderName, HeaderValue)>,
}

impl RegistryError {
    pub fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Self {
        RegistryError {
            status,
            code,
            message: message.into(),
            headers: Vec::new(),
        }
    }

    pub fn with_header(mut self, name: header::HeaderName, value: HeaderValue) -> Self {
        self.headers.push((name, value));
        self
    }

    /// 405 for any write: this registry is a read-only cache.
    pub fn read_only(method: &http::Method) -> Self {
        RegistryError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            ErrorCode::Unsupported,
            format!("{method} is not supported: regcache is a read-only pull-through cache"),
        )
        .with_header(header::ALLOW, HeaderValue::from_static("GET, HEAD"))
    }

    pub fn into_response(self) -> Response<Body> {
        let body = serde_json::json!({
            "errors": [{"code": self.code.as_str(), "message": self.message, "detail": null}]
        });
        let bytes = Bytes::from(body.to_string());
        let mut resp = Response::new(full(bytes.clone()));
        *resp.status_mut() = self.status;
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
        for (name, value) in self.headers {
            h.append(name, value);
        }
        resp
    }
}

impl From<reference::Error> for RegistryError {
    fn from(e: reference::Error) -> Self {
        let code = match e {
            reference::Error::Name(_) => ErrorCode::NameInvalid,
            reference::Error::Tag(_) => ErrorCode::TagInvalid,
            reference::Error::Digest(_) | reference::Error::Algorithm(_) => {
                ErrorCode::DigestInvalid
            }
        };
        RegistryError::new(StatusCode::BAD_REQUEST, code, e.to_string())
    }
}

impl From<routing::Error> for RegistryError {
    fn from(e: routing::Error) -> Self {
        match e {
            routing::Error::Invalid(e) => e.into(),
            routing::Error::NoEndpoint => {
                RegistryError::new(StatusCode::NOT_FOUND, ErrorCode::NameUnknown, e.to_string())
            }
            routing::Error::Method(m) => RegistryError::read_only(&m),
        }
    }
}

impl From<storage::Error> for RegistryError {
    fn from(e: storage::Error) -> Self {
        tracing::error!(error = %e, "storage failure");
        RegistryError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorCode::Unknown,
            format!("cache storage failed: {e}"),
        )
    }
}

impl From<upstream::Error> for RegistryError {
    fn from(e: upstream::Error) -> Self {
        use upstream::Error as U;
        let status = match &e {
            U::NotFound { .. } => StatusCode::NOT_FOUND,
            U::Denied { .. } => StatusCode::FORBIDDEN,
            U::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            U::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            U::Unreachable { .. } | U::Status { .. } | U::Garbage { .. } => StatusCode::BAD_GATEWAY,
            U::Mismatch { .. } => StatusCode::BAD_GATEWAY,
        };
        let code = match &e {
            U::NotFound { kind, .. } => match kind {
                upstream::Kind::Blob => ErrorCode::BlobUnknown,
                upstream::Kind::Manifest => ErrorCode::ManifestUnknown,
                upstream::Kind::Other => ErrorCode::NameUnknown,
            },
            U::Denied { .. } => ErrorCode::Denied,
            U::RateLimited { .. } => ErrorCode::TooManyRequests,
            _ => ErrorCode::Unavailable,
        };
        let mut err = RegistryError::new(status, code, e.to_string());
        if let U::RateLimited {
            retry_after: Some(v),
            ..
        } = &e
        {
            if let Ok(v) = HeaderValue::from_str(v) {
                err = err.with_header(header::RETRY_AFTER, v);
            }
        }
        err
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn envelope() {
        let resp = RegistryError::read_only(&http::Method::PUT).into_response();
        assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(resp.headers()[header::ALLOW], "GET, HEAD");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["errors"][0]["code"], "UNSUPPORTED");
    }

    #[test]
    fn input_errors_are_400_with_spec_codes() {
        let e: RegistryError = reference::Error::Digest("x".into()).into();
        assert_eq!(
            (e.status, e.code),
            (StatusCode::BAD_REQUEST, ErrorCode::DigestInvalid)
        );
        let e: RegistryError = reference::Error::Name("X".into()).into();
        assert_eq!(e.code, ErrorCode::NameInvalid);
    }
}
