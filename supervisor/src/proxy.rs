//! Forwarding a routed request to its worker over the worker's Unix socket,
//! on pooled keep-alive connections, and streaming the answer back.

use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{header, HeaderMap, HeaderName, Request, Response, Uri};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use regcache_protocol::body::Body;
use regcache_protocol::follow;
use regcache_protocol::internal::{FROM_PEER, PRELOAD};
use regcache_protocol::request::RepoRequest;

/// Who a forwarded request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sender {
    Client,
    /// Another replica of the cluster (the worker answers as the owner).
    Peer,
    /// The front's own preload (the worker fetches nothing ahead of it).
    Preload,
}

/// Connects `http://w<index>/` to worker `index`'s socket.
#[derive(Clone)]
pub struct UnixConnector {
    sockets: Arc<Vec<PathBuf>>,
}

impl tower_service::Service<Uri> for UnixConnector {
    type Response = TokioIo<tokio::net::UnixStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let path = uri
            .host()
            .and_then(|h| h.strip_prefix('w'))
            .and_then(|i| i.parse::<usize>().ok())
            .and_then(|i| self.sockets.get(i).cloned());
        Box::pin(async move {
            let path = path.ok_or_else(|| io::Error::other("no such worker"))?;
            tokio::net::UnixStream::connect(path)
                .await
                .map(TokioIo::new)
        })
    }
}

/// Pooled HTTP/1.1 client to all workers.
#[derive(Clone)]
pub struct Proxy {
    client: Client<UnixConnector, Empty<Bytes>>,
}

/// Hop-by-hop headers (RFC 9110 §7.6.1): never forwarded.
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

fn strip_hop_by_hop(h: &mut HeaderMap) {
    for name in &HOP_BY_HOP {
        h.remove(name);
    }
    h.remove(header::TRAILER);
}

impl Proxy {
    pub fn new(sockets: Vec<PathBuf>) -> Proxy {
        let connector = UnixConnector {
            sockets: Arc::new(sockets),
        };
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(std::time::Duration::from_secs(30))
            .pool_max_idle_per_host(64)
            // Bounds what each relayed stream may buffer (hyper's default
            // grows to ~400 KiB per connection).
            .http1_max_buf_size(regcache_worker::MAX_CONNECTION_BUFFER)
            .build(connector);
        Proxy { client }
    }

    /// Sends `request` with the client's `headers` to worker `index`,
    /// marked with who it is `for` (the mark is never taken from the
    /// client), asking for a fill to follow (`crate::follow`) when
    /// `follow`. Requests carry no body: the cache is read-only and writes
    /// never get here.
    pub async fn forward(
        &self,
        index: usize,
        request: &RepoRequest,
        headers: &HeaderMap,
        sender: Sender,
        follow: bool,
    ) -> Result<Response<Body>, hyper_util::client::legacy::Error> {
        let uri: Uri = format!("http://w{index}{}", request.path_and_query())
            .parse()
            .expect("validated requests are valid URIs");
        let mut out = Request::builder()
            .method(request.method.as_http())
            .uri(uri)
            .body(Empty::new())
            .expect("valid request parts");
        *out.headers_mut() = headers.clone();
        strip_hop_by_hop(out.headers_mut());
        out.headers_mut().remove(header::HOST);
        // SECURITY: the client's credentials are for us, never for a worker
        // (which would otherwise be tempted to pass them upstream).
        out.headers_mut().remove(header::AUTHORIZATION);
        out.headers_mut().remove(header::CONTENT_LENGTH);
        out.headers_mut().remove(FROM_PEER);
        out.headers_mut().remove(PRELOAD);
        out.headers_mut().remove(follow::FOLLOW);
        let mark = match sender {
            Sender::Client => None,
            Sender::Peer => Some(FROM_PEER),
            Sender::Preload => Some(PRELOAD),
        };
        if let Some(mark) = mark {
            out.headers_mut()
                .insert(mark, http::HeaderValue::from_static("1"));
        }
        if follow {
            out.headers_mut()
                .insert(follow::FOLLOW, http::HeaderValue::from_static("1"));
        }
        let resp = self.client.request(out).await?;
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        Ok(Response::from_parts(
            parts,
            body.map_err(io::Error::other).boxed_unsync(),
        ))
    }

    /// GETs one of a worker's internal endpoints and returns the whole body.
    pub async fn fetch(&self, index: usize, path: &str) -> Option<Bytes> {
        let uri: Uri = format!("http://w{index}{path}").parse().ok()?;
        let req = Request::get(uri).body(Empty::new()).ok()?;
        let resp =
            tokio::time::timeout(std::time::Duration::from_secs(10), self.client.request(req))
                .await
                .ok()?
                .ok()?;
        if !resp.status().is_success() {
            return None;
        }
        Some(resp.into_body().collect().await.ok()?.to_bytes())
    }
}
