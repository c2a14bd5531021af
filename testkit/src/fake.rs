//! An in-process fake upstream registry, for what a real registry cannot do
//! on demand: answer late, stream slowly, stop halfway, send wrong bytes,
//! fail once with a chosen status, and say afterwards exactly what it was
//! asked.
//!
//! The real `docker-registry` ([`super::Upstream`]) proves that regcache
//! works against a genuine registry; this fake proves how regcache behaves
//! when an upstream misbehaves, and lets a test count upstream requests
//! precisely ("exactly one GET of this blob", "no GET for a HEAD", "one HEAD
//! after the freshness window").
//!
//! std only: a thread per connection on `127.0.0.1:0`, HTTP/1.1 with
//! keep-alive (or `Connection: close`), a registry v2 read API for the blobs
//! and manifests a test registers, every request recorded. Dropping the fake
//! closes the listener and every open connection, so a test that fails
//! half-way never leaves regcache waiting on it.
//!
//! ```ignore
//! let fake = FakeRegistry::start();
//! let blob = fake.add_blob("org/img", &random_bytes(1 << 20));
//! let gate = Gate::new();
//! // Every GET: 64 KiB every 10 ms, and hold after 256 KiB until gate.open().
//! fake.set(&blob.path, Serve::ok().slow(64 << 10, ms(10)).pause_at(256 << 10, &gate));
//! // The next GET only: close the connection after 100 bytes.
//! fake.once(&blob.path, Serve::ok().only("GET").truncate_after(100));
//! let rc = Regcache::start(&config_json(&[(&fake.url(), &["upstream.test"])]), &storage);
//! // ... requests through regcache at blob.path_via("upstream.test") ...
//! assert_eq!(fake.count("GET", &blob.path), 1, "{}", fake.describe_requests());
//! ```
//!
//! For auth tests: a fixed token endpoint is a route added with
//! [`FakeRegistry::add_raw`] answering JSON, a Bearer challenge is
//! [`Serve::status`]`(401)` with a `WWW-Authenticate` [`Serve::header`], a
//! redirect is a raw route answering 307 with `Location`; recorded
//! [`Recorded::header`]s show what regcache sent. Answers that depend on the
//! request (a token server checking `scope` and Basic credentials, a registry
//! accepting only the tokens it issued) come from an
//! [`FakeRegistry::intercept`] hook, which sees every request first and may
//! answer it with a [`Reply`] instead of the route.
//!
//! `Range: bytes=N-` on a route with content is answered 206 with the rest
//! (the knobs then apply to that rest), as registries do for resumes; other
//! ranges get the whole body. Not modelled: uploads, `tags/list`.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{digest_hex, sha256_digest, temp_dir, ImageParts, OciLayout, OCI_MANIFEST};

/// Content-Type of blobs as registries serve them.
pub const BLOB_MEDIA_TYPE: &str = "application/octet-stream";

/// Default piece size when a body is not streamed slowly.
const DEFAULT_CHUNK: usize = 64 << 10;

/// Shorthand for durations in knobs: `ms(10)`.
pub fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

// ---------------------------------------------------------------------------
// what a test sees
// ---------------------------------------------------------------------------

/// One request as the fake received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    /// The path without the query, as sent.
    pub path: String,
    pub query: Option<String>,
    /// In order, repeated ones kept.
    pub headers: Vec<(String, String)>,
    /// When the request line arrived.
    pub at: Instant,
}

impl Recorded {
    /// First value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

impl fmt::Display for Recorded {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.method, self.path)?;
        if let Some(q) = &self.query {
            write!(f, "?{q}")?;
        }
        Ok(())
    }
}

/// A blob registered with [`FakeRegistry::add_blob`].
#[derive(Debug, Clone)]
pub struct FakeBlob {
    pub repo: String,
    pub digest: String,
    pub data: Arc<[u8]>,
    /// The path at the fake: `/v2/<repo>/blobs/<digest>`.
    pub path: String,
}

impl FakeBlob {
    /// The same blob's path through regcache with `prefix` as the upstream's
    /// alias: `/v2/<prefix>/<repo>/blobs/<digest>`.
    pub fn path_via(&self, prefix: &str) -> String {
        format!("/v2/{prefix}/{}/blobs/{}", self.repo, self.digest)
    }

    pub fn len(&self) -> usize {
        self.data.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

// ---------------------------------------------------------------------------
// knobs
// ---------------------------------------------------------------------------

/// A point in a response body where the fake stops sending until the test
/// says go. Lets a test make "several clients attach to one fill" or "a
/// Range beyond what has arrived" happen for certain, instead of hoping a
/// sleep was long enough. Clones share the gate.
#[derive(Clone, Default)]
pub struct Gate {
    inner: Arc<(Mutex<GateState>, Condvar)>,
}

#[derive(Default)]
struct GateState {
    open: bool,
    /// Responses that reached the gate so far (waiting or passed).
    reached: usize,
}

impl Gate {
    pub fn new() -> Gate {
        Gate::default()
    }

    /// Let every held response (and every later one) through.
    pub fn open(&self) {
        let (m, cv) = &*self.inner;
        m.lock().unwrap().open = true;
        cv.notify_all();
    }

    pub fn is_open(&self) -> bool {
        self.inner.0.lock().unwrap().open
    }

    /// How many responses have got to the gate.
    pub fn reached(&self) -> usize {
        self.inner.0.lock().unwrap().reached
    }

    /// Waits until `n` responses have got to the gate (all bytes before it
    /// written to the socket); false on timeout.
    pub fn wait_reached(&self, n: usize, timeout: Duration) -> bool {
        let (m, cv) = &*self.inner;
        let deadline = Instant::now() + timeout;
        let mut st = m.lock().unwrap();
        while st.reached < n {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = cv.wait_timeout(st, deadline - now).unwrap().0;
        }
        true
    }

    /// Called by a response at the gate: counts itself, then waits for
    /// `open` (or for the fake to shut down).
    fn pass(&self, stopping: &AtomicBool) -> io::Result<()> {
        let (m, cv) = &*self.inner;
        let mut st = m.lock().unwrap();
        st.reached += 1;
        cv.notify_all();
        while !st.open {
            if stopping.load(Ordering::Relaxed) {
                return Err(io::Error::other("fake registry shutting down"));
            }
            st = cv.wait_timeout(st, ms(50)).unwrap().0;
        }
        Ok(())
    }
}

impl fmt::Debug for Gate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = self.inner.0.lock().unwrap();
        write!(f, "Gate {{ open: {}, reached: {} }}", st.open, st.reached)
    }
}

/// How one response goes out. The default ([`Serve::ok`]) sends the route's
/// content at once, whole, with Content-Length. Knobs combine:
/// `Serve::ok().slow(..).pause_at(..).truncate_after(..)`.
#[derive(Debug, Clone, Default)]
pub struct Serve {
    /// For [`FakeRegistry::once`]: only a request with this method uses it.
    method: Option<String>,
    delay: Duration,
    status: Option<u16>,
    headers: Vec<(String, String)>,
    /// Piece size and pause between pieces.
    chunk: Option<usize>,
    pause: Duration,
    truncate_after: Option<usize>,
    corrupt_at: Option<usize>,
    chunked: bool,
    pause_at: Option<(usize, Gate)>,
    /// After this many body bytes: reset the connection (RST, not FIN).
    reset_after: Option<usize>,
    /// Announce this Content-Length, whatever the body's length.
    length: Option<usize>,
    /// Answer Range requests with the whole body (200), as some servers do.
    no_ranges: bool,
}

impl Serve {
    /// The route's content, at once, whole.
    pub fn ok() -> Serve {
        Serve::default()
    }

    /// Answer `code` with a registry error body instead of the content
    /// (404 `BLOB_UNKNOWN`/`MANIFEST_UNKNOWN`, 429 `TOOMANYREQUESTS`, ...).
    pub fn status(code: u16) -> Serve {
        Serve {
            status: Some(code),
            ..Serve::default()
        }
    }

    /// Applies only to requests with this method (matters for
    /// [`FakeRegistry::once`]: a HEAD does not use up a fault meant for a GET).
    pub fn only(mut self, method: &str) -> Serve {
        self.method = Some(method.to_ascii_uppercase());
        self
    }

    /// An extra response header (`Retry-After`, `WWW-Authenticate`, ...).
    pub fn header(mut self, name: &str, value: &str) -> Serve {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Wait this long before the status line (a slow upstream).
    pub fn delay(mut self, d: Duration) -> Serve {
        self.delay = d;
        self
    }

    /// Send the body `chunk` bytes at a time with `pause` between pieces, so
    /// that a fill lasts long enough for other clients to overlap it.
    pub fn slow(mut self, chunk: usize, pause: Duration) -> Serve {
        self.chunk = Some(chunk.max(1));
        self.pause = pause;
        self
    }

    /// Close the connection after `n` body bytes, having announced the full
    /// Content-Length (or, chunked, without the final chunk).
    pub fn truncate_after(mut self, n: usize) -> Serve {
        self.truncate_after = Some(n);
        self
    }

    /// Send a different byte at `offset` (same length): the digest no longer
    /// matches.
    pub fn corrupt_at(mut self, offset: usize) -> Serve {
        self.corrupt_at = Some(offset);
        self
    }

    /// Send the body with `Transfer-Encoding: chunked`, no Content-Length.
    pub fn chunked(mut self) -> Serve {
        self.chunked = true;
        self
    }

    /// Reset the connection (RST) after `n` body bytes.
    pub fn reset_after(mut self, n: usize) -> Serve {
        self.reset_after = Some(n);
        self
    }

    /// Announce `Content-Length: n` whatever the body holds (and send the
    /// body as it is): a lying upstream.
    pub fn length(mut self, n: usize) -> Serve {
        self.length = Some(n);
        self
    }

    /// Ignore `Range` and always send the whole body with 200.
    pub fn no_ranges(mut self) -> Serve {
        self.no_ranges = true;
        self
    }

    /// Stop after `offset` body bytes until `gate` is opened.
    pub fn pause_at(mut self, offset: usize, gate: &Gate) -> Serve {
        self.pause_at = Some((offset, gate.clone()));
        self
    }

    fn applies_to(&self, method: &str) -> bool {
        self.method.as_deref().is_none_or(|m| m == method)
    }
}

/// A whole response chosen by an [`FakeRegistry::intercept`] hook: status,
/// headers (repeats kept, in order), body (Content-Length is added), and the
/// [`Serve`] knobs to send it with (e.g. [`Serve::pause_at`] to hold a token
/// response at a [`Gate`]).
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub serve: Serve,
}

impl Reply {
    /// `status` with no headers and an empty body.
    pub fn new(status: u16) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: Vec::new(),
            serve: Serve::ok(),
        }
    }

    /// `status` with a JSON body (`Content-Type: application/json`).
    pub fn json(status: u16, value: &serde_json::Value) -> Reply {
        Reply::new(status)
            .header("Content-Type", "application/json")
            .body(value.to_string())
    }

    /// `status` with a registry error body for `path`, as [`Serve::status`]
    /// sends it (401 `UNAUTHORIZED`, 403 `DENIED`, ...).
    pub fn error(status: u16, path: &str) -> Reply {
        Reply::new(status)
            .header("Content-Type", "application/json")
            .body(error_body(status, path))
    }

    /// An extra header; call again for a repeated one.
    pub fn header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Reply {
        self.body = body.into();
        self
    }

    /// Send with these knobs (its `status`, if set, wins over the reply's).
    pub fn serve(mut self, serve: Serve) -> Reply {
        self.serve = serve;
        self
    }
}

/// See [`FakeRegistry::intercept`].
type Hook = Arc<dyn Fn(&Recorded) -> Option<Reply> + Send + Sync>;

// ---------------------------------------------------------------------------
// the server
// ---------------------------------------------------------------------------

/// What a route answers when no [`Serve::status`] says otherwise.
#[derive(Clone)]
struct Content {
    status: u16,
    headers: Vec<(String, String)>,
    body: Arc<[u8]>,
}

struct Route {
    content: Content,
    default: Serve,
    once: VecDeque<Serve>,
}

#[derive(Default)]
struct State {
    routes: HashMap<String, Route>,
    requests: Vec<Recorded>,
    conns: HashMap<u64, TcpStream>,
    hook: Option<Hook>,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    /// Notified on every recorded request.
    changed: Condvar,
    stopping: AtomicBool,
    next_conn: AtomicU64,
}

/// The fake registry. See the module docs.
pub struct FakeRegistry {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl FakeRegistry {
    /// Listen on a fresh loopback port; `GET /v2/` answers 200 `{}`.
    pub fn start() -> FakeRegistry {
        let listener = TcpListener::bind("127.0.0.1:0").expect("fake registry: bind");
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared::default());
        let accept = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("fake-registry-{}", addr.port()))
                .spawn(move || accept_loop(listener, shared))
                .unwrap()
        };
        let fake = FakeRegistry {
            addr,
            shared,
            accept: Some(accept),
        };
        fake.add_raw(
            "/v2/",
            200,
            &[("Content-Type", "application/json")],
            b"{}".to_vec(),
        );
        fake
    }

    /// `127.0.0.1:PORT`
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `http://127.0.0.1:PORT`, as a CONFIG `registry` value.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Any route: `path` (no query) answers `status` with `headers` and
    /// `body` (Content-Length is added). For token endpoints, redirects and
    /// other odd answers.
    pub fn add_raw(&self, path: &str, status: u16, headers: &[(&str, &str)], body: Vec<u8>) {
        let content = Content {
            status,
            headers: headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            body: body.into(),
        };
        self.shared.state.lock().unwrap().routes.insert(
            path.to_owned(),
            Route {
                content,
                default: Serve::ok(),
                once: VecDeque::new(),
            },
        );
    }

    /// Serve `data` as a blob of `repo` (GET and HEAD), with
    /// `Docker-Content-Digest`.
    pub fn add_blob(&self, repo: &str, data: &[u8]) -> FakeBlob {
        let digest = sha256_digest(data);
        let path = format!("/v2/{repo}/blobs/{digest}");
        self.add_raw(
            &path,
            200,
            &[
                ("Content-Type", BLOB_MEDIA_TYPE),
                ("Docker-Content-Digest", &digest),
            ],
            data.to_vec(),
        );
        FakeBlob {
            repo: repo.to_owned(),
            digest,
            data: data.into(),
            path,
        }
    }

    /// Serve a manifest of `repo` by digest and, when given, by `tag`, with
    /// its media type and `Docker-Content-Digest`. Returns the digest.
    pub fn add_manifest(
        &self,
        repo: &str,
        tag: Option<&str>,
        media_type: &str,
        bytes: &[u8],
    ) -> String {
        let digest = sha256_digest(bytes);
        let headers = [
            ("Content-Type", media_type),
            ("Docker-Content-Digest", digest.as_str()),
        ];
        let mut paths = vec![format!("/v2/{repo}/manifests/{digest}")];
        if let Some(t) = tag {
            paths.push(format!("/v2/{repo}/manifests/{t}"));
        }
        for p in paths {
            self.add_raw(&p, 200, &headers, bytes.to_vec());
        }
        digest
    }

    /// Build a linux/amd64 OCI image (uncompressed tar layers of random
    /// bytes of `layer_sizes`, config, manifest; the same builder the real
    /// upstream is seeded with) and serve it as `repo:tag`.
    pub fn add_image(&self, repo: &str, tag: &str, layer_sizes: &[usize]) -> ImageParts {
        let tars: Vec<Vec<u8>> = layer_sizes
            .iter()
            .map(|s| crate::random_layer("layer", *s))
            .collect();
        self.add_image_of(repo, tag, &tars)
    }

    /// Like [`FakeRegistry::add_image`], of the given layers (images made
    /// of one layer share it).
    pub fn add_image_of(&self, repo: &str, tag: &str, tars: &[Vec<u8>]) -> ImageParts {
        let work = temp_dir("regcache-fake-image-");
        let layout = OciLayout::create(&work.path().join("layout"));
        let image = layout.build_image_from("amd64", "linux", tars);
        for d in image.blob_digests() {
            let data = std::fs::read(layout.dir.join("blobs/sha256").join(digest_hex(&d)))
                .expect("read built blob");
            self.add_blob(repo, &data);
        }
        self.add_manifest(repo, Some(tag), OCI_MANIFEST, &image.manifest);
        image
    }

    /// Every later request (already recorded) is first shown to `hook`: a
    /// `Some(reply)` is sent instead of whatever the route would answer (the
    /// route's [`FakeRegistry::once`] queue is left alone), `None` lets the
    /// route answer as usual. Replaces an earlier hook. The hook runs on the
    /// connection's thread without the fake's lock held, so it may keep its
    /// own state and call the fake's methods; it must not block for long
    /// (hold a reply with [`Reply::serve`] and a [`Gate`] instead).
    ///
    /// For answers that depend on the request: a token endpoint that checks
    /// the query and Basic credentials, a registry that accepts only the
    /// tokens it issued and challenges otherwise, a CDN that refuses
    /// `Authorization`.
    pub fn intercept(&self, hook: impl Fn(&Recorded) -> Option<Reply> + Send + Sync + 'static) {
        self.shared.state.lock().unwrap().hook = Some(Arc::new(hook));
    }

    /// Every later request to `path` is answered this way (until changed).
    pub fn set(&self, path: &str, serve: Serve) {
        let mut st = self.shared.state.lock().unwrap();
        let route = st
            .routes
            .get_mut(path)
            .unwrap_or_else(|| panic!("fake registry: no route {path}; add it first"));
        route.default = serve;
    }

    /// The next request to `path` (with the [`Serve::only`] method, if set)
    /// is answered this way, then the route goes back to its default.
    /// Several calls queue up in order.
    pub fn once(&self, path: &str, serve: Serve) {
        let mut st = self.shared.state.lock().unwrap();
        let route = st
            .routes
            .get_mut(path)
            .unwrap_or_else(|| panic!("fake registry: no route {path}; add it first"));
        route.once.push_back(serve);
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.state.lock().unwrap().requests.clone()
    }

    /// How many requests so far: a mark for [`FakeRegistry::requests_since`].
    pub fn request_count(&self) -> usize {
        self.shared.state.lock().unwrap().requests.len()
    }

    /// Requests after `mark` (a [`FakeRegistry::request_count`]).
    pub fn requests_since(&self, mark: usize) -> Vec<Recorded> {
        self.shared.state.lock().unwrap().requests[mark..].to_vec()
    }

    /// Requests with `method` to `path` (query ignored).
    pub fn count(&self, method: &str, path: &str) -> usize {
        self.shared
            .state
            .lock()
            .unwrap()
            .requests
            .iter()
            .filter(|r| r.method == method && r.path == path)
            .count()
    }

    /// Waits until at least `n` requests `method path` arrived; false on timeout.
    pub fn wait_count(&self, method: &str, path: &str, n: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.shared.state.lock().unwrap();
        loop {
            let c = st
                .requests
                .iter()
                .filter(|r| r.method == method && r.path == path)
                .count();
            if c >= n {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = self
                .shared
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap()
                .0;
        }
    }

    /// Every request so far, one per line, for assertion messages.
    pub fn describe_requests(&self) -> String {
        describe(&self.requests())
    }
}

/// `requests`, one per line, for assertion messages.
pub fn describe(requests: &[Recorded]) -> String {
    if requests.is_empty() {
        return "fake registry saw no requests".to_owned();
    }
    let lines: Vec<String> = requests.iter().map(|r| format!("  {r}")).collect();
    format!("fake registry saw:\n{}", lines.join("\n"))
}

impl Drop for FakeRegistry {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // Wake the accept loop, then cut every connection: threads blocked in
        // a read or a write return at once, those at a gate within 50 ms.
        let _ = TcpStream::connect_timeout(&self.addr, ms(500));
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        for (_, c) in self.shared.state.lock().unwrap().conns.drain() {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    for stream in listener.incoming() {
        if shared.stopping.load(Ordering::SeqCst) {
            break;
        }
        let Ok(stream) = stream else { continue };
        let _ = stream.set_nodelay(true);
        let id = shared.next_conn.fetch_add(1, Ordering::Relaxed);
        if let Ok(c) = stream.try_clone() {
            shared.state.lock().unwrap().conns.insert(id, c);
        }
        let shared = shared.clone();
        let _ = std::thread::Builder::new()
            .name("fake-registry-conn".into())
            .spawn(move || {
                let _ = serve_connection(&shared, stream);
                shared.state.lock().unwrap().conns.remove(&id);
            });
    }
}

/// A parsed request head.
struct Head {
    method: String,
    path: String,
    query: Option<String>,
    headers: Vec<(String, String)>,
    close: bool,
}

fn serve_connection(shared: &Shared, stream: TcpStream) -> io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    loop {
        let Some(head) = read_head(&mut reader)? else {
            return Ok(());
        };
        let (content, serve) = shared.pick(&head);
        let keep = respond(shared, &mut writer, &head, content, serve)?;
        writer.flush()?;
        if !keep || head.close || shared.stopping.load(Ordering::SeqCst) {
            let _ = writer.shutdown(Shutdown::Both);
            return Ok(());
        }
    }
}

fn read_head(reader: &mut BufReader<TcpStream>) -> io::Result<Option<Head>> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let line = line.trim_end();
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(io::Error::other(format!("bad request line {line:?}")));
    };
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p.to_owned(), Some(q.to_owned())),
        None => (target.to_owned(), None),
    };
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 {
            return Err(io::Error::other("connection closed inside request headers"));
        }
        let h = h.trim_end_matches(['\r', '\n']);
        if h.is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_owned(), v.trim().to_owned()));
        }
    }
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.to_ascii_lowercase())
    };
    // Bodies are not expected (read-only API) but must not derail keep-alive.
    if let Some(len) = header("content-length").and_then(|l| l.parse::<u64>().ok()) {
        io::copy(&mut reader.by_ref().take(len), &mut io::sink())?;
    }
    let close = header("connection").is_some_and(|c| c.contains("close"))
        || version.eq_ignore_ascii_case("HTTP/1.0");
    Ok(Some(Head {
        method: method.to_ascii_uppercase(),
        path,
        query,
        headers,
        close,
    }))
}

impl Shared {
    /// Records the request and chooses what to answer: the hook's reply if
    /// it has one, else the route's.
    fn pick(&self, head: &Head) -> (Content, Serve) {
        let recorded = Recorded {
            method: head.method.clone(),
            path: head.path.clone(),
            query: head.query.clone(),
            headers: head.headers.clone(),
            at: Instant::now(),
        };
        let hook = {
            let mut st = self.state.lock().unwrap();
            st.requests.push(recorded.clone());
            self.changed.notify_all();
            st.hook.clone()
        };
        if let Some(reply) = hook.and_then(|h| h(&recorded)) {
            let content = Content {
                status: reply.status,
                headers: reply.headers,
                body: reply.body.into(),
            };
            return (content, reply.serve);
        }
        let mut st = self.state.lock().unwrap();
        match st.routes.get_mut(&head.path) {
            Some(route) => {
                let serve = match route.once.iter().position(|s| s.applies_to(&head.method)) {
                    Some(i) => route.once.remove(i).expect("index from position"),
                    None => route.default.clone(),
                };
                (route.content.clone(), serve)
            }
            None => (not_found(&head.path), Serve::ok()),
        }
    }
}

/// The registry error code a status stands for at `path`.
fn error_code(status: u16, path: &str) -> &'static str {
    match status {
        401 => "UNAUTHORIZED",
        403 => "DENIED",
        404 if path.contains("/blobs/") => "BLOB_UNKNOWN",
        404 if path.contains("/manifests/") => "MANIFEST_UNKNOWN",
        404 => "NAME_UNKNOWN",
        405 => "UNSUPPORTED",
        429 => "TOOMANYREQUESTS",
        503 => "UNAVAILABLE",
        _ => "UNKNOWN",
    }
}

fn error_body(status: u16, path: &str) -> Vec<u8> {
    serde_json::json!({"errors": [{
        "code": error_code(status, path),
        "message": format!("fake registry: HTTP {status} for {path}"),
        "detail": null
    }]})
    .to_string()
    .into_bytes()
}

fn not_found(path: &str) -> Content {
    Content {
        status: 404,
        headers: vec![("Content-Type".into(), "application/json".into())],
        body: error_body(404, path).into(),
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        206 => "Partial Content",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

/// Sleeps `d` in small steps; false when the fake is shutting down.
fn nap(shared: &Shared, d: Duration) -> bool {
    let deadline = Instant::now() + d;
    loop {
        if shared.stopping.load(Ordering::Relaxed) {
            return false;
        }
        let now = Instant::now();
        if now >= deadline {
            return true;
        }
        std::thread::sleep((deadline - now).min(ms(20)));
    }
}

/// Writes one response; Ok(false) when the connection must close after it.
fn respond(
    shared: &Shared,
    w: &mut TcpStream,
    head: &Head,
    content: Content,
    serve: Serve,
) -> io::Result<bool> {
    let stopped = || io::Error::other("fake registry shutting down");
    if !serve.delay.is_zero() && !nap(shared, serve.delay) {
        return Err(stopped());
    }
    let (mut status, mut headers, mut body) = match serve.status {
        Some(code) => (
            code,
            vec![("Content-Type".to_owned(), "application/json".to_owned())],
            Arc::<[u8]>::from(error_body(code, &head.path)),
        ),
        None => (content.status, content.headers, content.body),
    };
    let from = head
        .headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("range"))
        .and_then(|(_, v)| v.strip_prefix("bytes="))
        .and_then(|v| v.strip_suffix('-'))
        .and_then(|v| v.parse::<usize>().ok());
    if let (200, Some(from), false) = (status, from, serve.no_ranges) {
        if from < body.len() {
            headers.push((
                "Content-Range".to_owned(),
                format!("bytes {from}-{}/{}", body.len() - 1, body.len()),
            ));
            status = 206;
            body = body[from..].into();
        }
    }
    headers.extend(serve.headers.iter().cloned());
    let mut out = format!("HTTP/1.1 {status} {}\r\n", reason(status));
    for (k, v) in &headers {
        out.push_str(&format!("{k}: {v}\r\n"));
    }
    if serve.chunked {
        out.push_str("Transfer-Encoding: chunked\r\n");
    } else {
        let announced = serve.length.unwrap_or(body.len());
        out.push_str(&format!("Content-Length: {announced}\r\n"));
    }
    out.push_str("\r\n");
    w.write_all(out.as_bytes())?;
    if head.method == "HEAD" || status == 204 || status == 304 {
        return Ok(true);
    }

    let body: Arc<[u8]> = match serve.corrupt_at {
        Some(at) if !body.is_empty() => {
            let mut v = body.to_vec();
            let i = at.min(v.len() - 1);
            v[i] ^= 0xff;
            v.into()
        }
        _ => body,
    };
    let limit = serve
        .truncate_after
        .or(serve.reset_after)
        .map_or(body.len(), |n| n.min(body.len()));
    let chunk = serve.chunk.unwrap_or(DEFAULT_CHUNK);
    let mut gate = serve.pause_at.clone();
    let mut pos = 0;
    loop {
        if let Some((at, g)) = &gate {
            if pos >= *at {
                w.flush()?;
                g.pass(&shared.stopping)?;
                gate = None;
            }
        }
        if pos >= limit {
            break;
        }
        let mut end = (pos + chunk).min(limit);
        if let Some((at, _)) = &gate {
            end = end.min(*at);
        }
        let piece = &body[pos..end];
        if serve.chunked {
            w.write_all(format!("{:x}\r\n", piece.len()).as_bytes())?;
            w.write_all(piece)?;
            w.write_all(b"\r\n")?;
        } else {
            w.write_all(piece)?;
        }
        pos = end;
        if pos < limit && !serve.pause.is_zero() {
            w.flush()?;
            if !nap(shared, serve.pause) {
                return Err(stopped());
            }
        }
    }
    if limit < body.len() {
        w.flush()?;
        if serve.reset_after.is_some() {
            // SO_LINGER 0: the last close sends RST instead of FIN; the
            // error ends the connection's thread without a shutdown.
            let _ = nix::sys::socket::setsockopt(
                &*w,
                nix::sys::socket::sockopt::Linger,
                &nix::libc::linger {
                    l_onoff: 1,
                    l_linger: 0,
                },
            );
            return Err(io::Error::other("connection reset on purpose"));
        }
        // Cut short: the client was promised more than it gets.
        let _ = w.shutdown(Shutdown::Both);
        return Ok(false);
    }
    if serve.length.is_some_and(|n| n != body.len()) {
        // A lying Content-Length: end the connection after what was sent.
        w.flush()?;
        let _ = w.shutdown(Shutdown::Both);
        return Ok(false);
    }
    if serve.chunked {
        w.write_all(b"0\r\n\r\n")?;
    }
    Ok(true)
}
