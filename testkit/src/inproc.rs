//! For tests that call a server's handler in-process: build a request, read
//! a whole response, read a registry error's code.

use bytes::Bytes;
use http_body_util::BodyExt;

/// A request without a body.
pub fn request(method: &str, path: &str, headers: &[(&str, &str)]) -> http::Request<()> {
    let mut req = http::Request::builder().method(method).uri(path);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.body(()).expect("a valid request")
}

/// The response's head and its whole body.
pub async fn read<B>(resp: http::Response<B>) -> (http::response::Parts, Bytes)
where
    B: http_body::Body,
    B::Error: std::fmt::Debug,
{
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await.expect("a whole body").to_bytes();
    (parts, bytes)
}

/// The `code` of the first entry of a registry error body.
pub fn error_code(body: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(body).expect("a registry error body");
    v["errors"][0]["code"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}
