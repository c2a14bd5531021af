//! The registry error envelope `{"errors":[{code,message,detail}]}`: the
//! only place it is built.
//!
//! Each layer has its own error type and turns it into a [`RegistryError`]
//! in its crate's `error.rs` (the worker's cache errors, the front's routing
//! and availability errors); request parsing errors, shared by both, map
//! here. Conversions only classify: logging is the caller's, once, at the
//! edge, and a message never carries a local path.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};

use crate::body::{full, Body};
use crate::request::{self, Kind};

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
            ErrorCode::PaginationNumberInvalid => "PAGINATION_NUMBER_INVALID",
            ErrorCode::Unauthorized => "UNAUTHORIZED",
            ErrorCode::Denied => "DENIED",
            ErrorCode::Unsupported => "UNSUPPORTED",
            ErrorCode::TooManyRequests => "TOOMANYREQUESTS",
            ErrorCode::Unavailable => "UNAVAILABLE",
            ErrorCode::Unknown => "UNKNOWN",
        }
    }

    /// The code of a 404 for what was asked.
    pub fn not_found(kind: Kind) -> ErrorCode {
        match kind {
            Kind::Blob => ErrorCode::BlobUnknown,
            Kind::Manifest => ErrorCode::ManifestUnknown,
            Kind::Tags | Kind::Other => ErrorCode::NameUnknown,
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

    /// True when the fault is ours or the upstream's, not the client's:
    /// such errors are logged (once, by whoever answers).
    pub fn is_server_fault(&self) -> bool {
        self.status.is_server_error()
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

impl From<request::Error> for RegistryError {
    fn from(e: request::Error) -> Self {
        use crate::reference::Error as R;
        let (status, code) = match &e {
            request::Error::Invalid(R::Name(_)) => {
                (StatusCode::BAD_REQUEST, ErrorCode::NameInvalid)
            }
            request::Error::Invalid(R::Tag(_)) => (StatusCode::BAD_REQUEST, ErrorCode::TagInvalid),
            request::Error::Invalid(R::Digest(_) | R::Algorithm(_)) => {
                (StatusCode::BAD_REQUEST, ErrorCode::DigestInvalid)
            }
            request::Error::NoEndpoint => (StatusCode::NOT_FOUND, ErrorCode::NameUnknown),
            request::Error::ReadOnly(_) => (StatusCode::METHOD_NOT_ALLOWED, ErrorCode::Unsupported),
        };
        let err = RegistryError::new(status, code, e.to_string());
        match e {
            request::Error::ReadOnly(_) => {
                err.with_header(header::ALLOW, HeaderValue::from_static("GET, HEAD"))
            }
            _ => err,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference;
    use http_body_util::BodyExt;

    #[test]
    fn envelope_and_read_only() {
        let resp = RegistryError::from(request::Error::ReadOnly(http::Method::PUT)).into_response();
        assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(resp.headers()[header::ALLOW], "GET, HEAD");
        let body = futures_util::FutureExt::now_or_never(resp.into_body().collect())
            .unwrap()
            .unwrap()
            .to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["errors"][0]["code"], "UNSUPPORTED");
    }

    #[test]
    fn input_errors_are_400_with_spec_codes() {
        let cases = [
            (
                reference::Error::Digest("x".into()),
                ErrorCode::DigestInvalid,
            ),
            (
                reference::Error::Algorithm("md5:x".into()),
                ErrorCode::DigestInvalid,
            ),
            (reference::Error::Name("X".into()), ErrorCode::NameInvalid),
            (reference::Error::Tag("..".into()), ErrorCode::TagInvalid),
        ];
        for (e, code) in cases {
            let e = RegistryError::from(request::Error::from(e));
            assert_eq!((e.status, e.code), (StatusCode::BAD_REQUEST, code));
        }
        let e = RegistryError::from(request::Error::NoEndpoint);
        assert_eq!(
            (e.status, e.code),
            (StatusCode::NOT_FOUND, ErrorCode::NameUnknown)
        );
    }
}
