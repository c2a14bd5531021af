//! The one test-support place, for the end-to-end tests under `tests/` and
//! the crates' own tests: a real upstream registry
//! (Debian's `docker-registry`, distribution 2.8), an in-process fake upstream
//! for misbehaviour on demand and exact request counts ([`fake`]), OCI images
//! built from random bytes and pushed with skopeo, the `regcache` binary under
//! test, a raw HTTP client (whole responses with [`http`], bodies read bit by
//! bit with [`http_open`]), skopeo helpers and storage-layout checks.
//!
//! The end-to-end tests are black-box: they see regcache only through its
//! command line, its port, its child processes and its storage directory.
//!
//! Use it from a test file with `use regcache_testkit as support;`.
//! Set `REGCACHE_TEST_KEEP=1` to keep the temporary directories (logs, upstream
//! storage) of a run for inspection; their paths are printed.

pub mod fake;
pub mod inproc;
pub mod netfault;
pub mod s3;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use sha2::{Digest, Sha256};
use tempfile::TempDir;

// ---------------------------------------------------------------------------
// small helpers
// ---------------------------------------------------------------------------

/// `sha256:<hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(data)))
}

/// The hex part of a `sha256:<hex>` digest.
pub fn digest_hex(digest: &str) -> &str {
    digest
        .strip_prefix("sha256:")
        .unwrap_or_else(|| panic!("not a sha256 digest: {digest}"))
}

/// A temporary directory, kept on disk when `REGCACHE_TEST_KEEP` is set so a
/// failed run can be inspected afterwards.
pub fn temp_dir(prefix: &str) -> TempDir {
    let mut dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("create temp dir");
    if std::env::var_os("REGCACHE_TEST_KEEP").is_some() {
        eprintln!("[support] keeping {}", dir.path().display());
        dir.disable_cleanup(true);
    }
    dir
}

/// A loopback TCP port that was free a moment ago. Ports handed out by this
/// process are never handed out twice, so parallel tests in one binary do not
/// collide with each other.
pub fn free_port() -> u16 {
    static GIVEN: OnceLock<Mutex<Vec<u16>>> = OnceLock::new();
    let given = GIVEN.get_or_init(|| Mutex::new(Vec::new()));
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .expect("bind 127.0.0.1:0")
            .local_addr()
            .unwrap()
            .port();
        let mut given = given.lock().unwrap();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// True when something accepts TCP connections on `addr`.
pub fn port_is_open(addr: &str) -> bool {
    let sock = addr.parse().expect("socket address");
    TcpStream::connect_timeout(&sock, Duration::from_millis(300)).is_ok()
}

/// Random bytes from the kernel: test images must not share layers with each
/// other, so every layer is filled with fresh random data.
pub fn random_bytes(len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .expect("read /dev/urandom");
    buf
}

/// A short random lowercase hex token (for file names, repo names).
pub fn random_token() -> String {
    hex::encode(random_bytes(4))
}

/// The last `max_lines` lines of a text file (lossy), for failure output.
pub fn file_tail(path: &Path, max_lines: usize) -> String {
    let text = match fs::read(path) {
        Ok(b) => String::from_utf8_lossy(&b).into_owned(),
        Err(e) => return format!("<cannot read {}: {e}>", path.display()),
    };
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(max_lines);
    lines[start..].join("\n")
}

/// Poll `f` every 100 ms until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Output of a command run by [`run_with_timeout`].
#[derive(Debug)]
pub struct CmdOutput {
    /// `None` when the command was killed for running too long.
    pub status: Option<ExitStatus>,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

impl CmdOutput {
    pub fn success(&self) -> bool {
        self.status.map(|s| s.success()).unwrap_or(false)
    }

    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
}

/// Run `cmd` with stdout/stderr captured in files (no pipe deadlock), killing
/// it after `timeout`. A hung client must fail the test, not hang it.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> CmdOutput {
    let dir = tempfile::tempdir().expect("temp dir for command output");
    let out_path = dir.path().join("stdout");
    let err_path = dir.path().join("stderr");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(File::create(&out_path).unwrap())
        .stderr(File::create(&err_path).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait().expect("wait for command") {
            break Some(st);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::from_utf8_lossy(&fs::read(&err_path).unwrap_or_default()).into_owned();
    if status.is_none() {
        stderr.push_str(&format!("\n<killed after {timeout:?}>"));
    }
    CmdOutput {
        status,
        stdout: fs::read(&out_path).unwrap_or_default(),
        stderr,
    }
}

// ---------------------------------------------------------------------------
// raw HTTP client
// ---------------------------------------------------------------------------

/// An HTTP response as received, headers in order and repeated ones kept.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// First value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Every value of header `name` (case-insensitive), in order.
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON; panics with the body text when it is not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "response body is not JSON ({e}): status {} body {:?}",
                self.status,
                self.text()
            )
        })
    }

    /// The `code` of every entry in a registry error body
    /// (`{"errors":[{"code":...}]}`); empty when the body is not one.
    pub fn error_codes(&self) -> Vec<String> {
        serde_json::from_slice::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v.get("errors").and_then(|e| e.as_array()).cloned())
            .unwrap_or_default()
            .iter()
            .filter_map(|e| e.get("code").and_then(|c| c.as_str()).map(str::to_owned))
            .collect()
    }

    /// A one-line summary for assertion messages.
    pub fn describe(&self) -> String {
        let mut body = self.text();
        if body.len() > 600 {
            let mut at = 600;
            while !body.is_char_boundary(at) {
                at -= 1;
            }
            body.truncate(at);
            body.push_str("...");
        }
        format!("{} {:?} body={:?}", self.status, self.headers, body)
    }
}

/// Sum of the samples of `name` whose labels include `want` in a Prometheus
/// text page; `None` when there is no such sample.
pub fn metric(text: &str, name: &str, want: &[(&str, &str)]) -> Option<f64> {
    let mut sum = None;
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (n, labels) = match series.split_once('{') {
            Some((n, l)) => (n, l.strip_suffix('}').unwrap_or(l)),
            None => (series, ""),
        };
        if n != name {
            continue;
        }
        let labels = parse_labels(labels);
        if want
            .iter()
            .all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
        {
            let v: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("bad sample value in {line:?}"));
            *sum.get_or_insert(0.0) += v;
        }
    }
    sum
}

/// `k="v",k2="v2"` (with `\"`, `\\`, `\n` escapes) as a map.
fn parse_labels(s: &str) -> std::collections::HashMap<String, String> {
    let mut out = std::collections::HashMap::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = chars.by_ref().take_while(|c| *c != '=').collect();
        if key.is_empty() {
            return out;
        }
        if chars.next() != Some('"') {
            return out;
        }
        let mut value = String::new();
        while let Some(c) = chars.next() {
            match c {
                '"' => break,
                '\\' => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(o) => value.push(o),
                    None => break,
                },
                o => value.push(o),
            }
        }
        out.insert(key.trim().to_owned(), value);
    }
}

/// One HTTP/1.1 request over a fresh TCP connection with `Connection: close`.
/// `path_and_query` goes out byte for byte (no normalisation, no encoding),
/// so traversal attempts like `/v2/%2e%2e/x` reach the server as written.
/// Handles Content-Length, chunked and read-to-EOF bodies, and HEAD.
pub fn http(
    addr: &str,
    method: &str,
    path_and_query: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<Response> {
    http_with_body(addr, method, path_and_query, headers, &[])
}

/// Like [`http`], with a request body (Content-Length is added when the body is
/// non-empty or the method is one that normally carries a body).
pub fn http_with_body(
    addr: &str,
    method: &str,
    path_and_query: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<Response> {
    let mut open = http_open_with_body(addr, method, path_and_query, headers, body)?;
    let rest = open.read_rest();
    match rest.error {
        None => Ok(Response {
            status: open.status,
            headers: open.headers,
            body: rest.bytes,
        }),
        Some(e) => Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, e)),
    }
}

/// How the rest of a response body is delimited.
#[derive(Debug)]
enum Framing {
    /// No body (HEAD, 204, 304) or already read to its end.
    Done,
    /// Content-Length: this many bytes still to come.
    Length(u64),
    /// Chunked: bytes left in the current chunk (0: a size line is next).
    Chunked(u64),
    /// Neither: the body ends when the server closes.
    Eof,
}

/// A response whose headers have arrived and whose body the caller reads
/// bit by bit: to cut a download after N bytes, to read while a fill is
/// still running, or to tell a complete body from one the server aborted.
pub struct OpenResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    reader: BufReader<TcpStream>,
    framing: Framing,
}

/// The end of a body read with [`OpenResponse::read_rest`].
#[derive(Debug)]
pub struct BodyRead {
    pub bytes: Vec<u8>,
    /// `None`: the body ended as its framing said (Content-Length reached,
    /// final chunk, or close for an unframed body). `Some`: why it did not
    /// (connection closed early, reset, bad chunk).
    pub error: Option<String>,
}

impl BodyRead {
    pub fn complete(&self) -> bool {
        self.error.is_none()
    }
}

impl OpenResponse {
    /// First value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The announced Content-Length, if any.
    pub fn content_length(&self) -> Option<u64> {
        self.header("content-length").and_then(|v| v.parse().ok())
    }

    /// Status and headers, for assertion messages.
    pub fn describe(&self) -> String {
        format!("{} {:?}", self.status, self.headers)
    }

    /// Up to `max` body bytes: fewer only when the body ends (empty at its
    /// end) or breaks (the bytes before the break; the error comes with the
    /// next call).
    pub fn read_some(&mut self, max: usize) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::new();
        match self.read_into(&mut out, max) {
            Err(e) if out.is_empty() => Err(e),
            _ => Ok(out),
        }
    }

    fn read_into(&mut self, out: &mut Vec<u8>, max: usize) -> std::io::Result<()> {
        while out.len() < max {
            let want = max - out.len();
            let n = match self.framing {
                Framing::Done => break,
                Framing::Length(0) => {
                    self.framing = Framing::Done;
                    break;
                }
                Framing::Length(left) => (left as usize).min(want),
                Framing::Chunked(0) => {
                    let mut line = String::new();
                    if self.reader.read_line(&mut line)? == 0 {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            "connection closed before the final chunk",
                        ));
                    }
                    let size = line.trim().split(';').next().unwrap_or("");
                    let size = u64::from_str_radix(size, 16).map_err(|_| {
                        std::io::Error::new(
                            std::io::ErrorKind::InvalidData,
                            format!("bad chunk size line {line:?}"),
                        )
                    })?;
                    if size == 0 {
                        // trailers until the empty line
                        loop {
                            let mut t = String::new();
                            if self.reader.read_line(&mut t)? == 0 || t.trim().is_empty() {
                                break;
                            }
                        }
                        self.framing = Framing::Done;
                        break;
                    }
                    self.framing = Framing::Chunked(size);
                    continue;
                }
                Framing::Chunked(left) => (left as usize).min(want),
                Framing::Eof => want.min(64 << 10),
            };
            let start = out.len();
            out.resize(start + n, 0);
            let got = self.reader.read(&mut out[start..])?;
            out.truncate(start + got);
            match &mut self.framing {
                Framing::Eof if got == 0 => {
                    self.framing = Framing::Done;
                    break;
                }
                _ if got == 0 => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!(
                            "connection closed inside the body ({:?} left)",
                            self.framing
                        ),
                    ));
                }
                Framing::Length(left) => *left -= got as u64,
                Framing::Chunked(left) => {
                    *left -= got as u64;
                    if *left == 0 {
                        let mut crlf = [0u8; 2];
                        self.reader.read_exact(&mut crlf)?;
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Reads the rest of the body, keeping whatever arrived before an error.
    pub fn read_rest(&mut self) -> BodyRead {
        let mut bytes = Vec::new();
        loop {
            match self.read_some(256 << 10) {
                Ok(b) if b.is_empty() => return BodyRead { bytes, error: None },
                Ok(b) => bytes.extend_from_slice(&b),
                Err(e) => {
                    return BodyRead {
                        error: Some(format!("{e} after {} body bytes", bytes.len())),
                        bytes,
                    }
                }
            }
        }
    }
}

/// Sends one request (fresh connection, `Connection: close` unless given)
/// and returns once the status line and headers are in; the body is left to
/// the caller. Interim 1xx responses are skipped.
pub fn http_open(
    addr: &str,
    method: &str,
    path_and_query: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<OpenResponse> {
    http_open_with_body(addr, method, path_and_query, headers, &[])
}

fn http_open_with_body(
    addr: &str,
    method: &str,
    path_and_query: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<OpenResponse> {
    let sock = addr.parse().map_err(|e| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{addr}: {e}"))
    })?;
    let mut stream = TcpStream::connect_timeout(&sock, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.set_write_timeout(Some(Duration::from_secs(30)))?;

    let mut req = format!("{method} {path_and_query} HTTP/1.1\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req.push_str(&format!("Host: {addr}\r\n"));
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("connection"))
    {
        req.push_str("Connection: close\r\n");
    }
    let sends_body = !body.is_empty() || matches!(method, "POST" | "PUT" | "PATCH");
    if sends_body
        && !headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("content-length"))
    {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes())?;
    stream.write_all(body)?;
    stream.flush()?;

    let mut reader = BufReader::new(stream);
    let bad = |msg: String| std::io::Error::new(std::io::ErrorKind::InvalidData, msg);

    // Status line and headers; skip interim 1xx responses.
    let (status, headers) = loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Err(bad("connection closed before a status line".into()));
        }
        let line = line.trim_end();
        let mut parts = line.splitn(3, ' ');
        let version = parts.next().unwrap_or("");
        if !version.starts_with("HTTP/") {
            return Err(bad(format!("bad status line {line:?}")));
        }
        let status: u16 = parts
            .next()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad(format!("bad status line {line:?}")))?;
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h)? == 0 {
                return Err(bad("connection closed inside the headers".into()));
            }
            let h = h.trim_end_matches(['\r', '\n']);
            if h.is_empty() {
                break;
            }
            let (k, v) = h
                .split_once(':')
                .ok_or_else(|| bad(format!("bad header line {h:?}")))?;
            headers.push((k.trim().to_owned(), v.trim().to_owned()));
        }
        if (100..200).contains(&status) && status != 101 {
            continue;
        }
        break (status, headers);
    };

    let mut open = OpenResponse {
        status,
        headers,
        reader,
        framing: Framing::Done,
    };
    if method.eq_ignore_ascii_case("HEAD") || status == 204 || status == 304 {
        return Ok(open);
    }
    let chunked = open
        .headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("transfer-encoding"))
        .any(|(_, v)| v.to_ascii_lowercase().contains("chunked"));
    open.framing = if chunked {
        Framing::Chunked(0)
    } else if let Some(len) = open.header("content-length") {
        let len: u64 = len
            .parse()
            .map_err(|_| bad(format!("bad Content-Length {len:?}")))?;
        Framing::Length(len)
    } else {
        Framing::Eof
    };
    Ok(open)
}

/// `GET` with no extra headers; panics on a transport error.
pub fn get(addr: &str, path_and_query: &str) -> Response {
    http(addr, "GET", path_and_query, &[])
        .unwrap_or_else(|e| panic!("GET http://{addr}{path_and_query}: {e}"))
}

/// The Accept values a registry client sends for manifests: every type, so a
/// registry never refuses an OCI manifest or an index.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, \
application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.v2+json, \
application/vnd.docker.distribution.manifest.list.v2+json";

// ---------------------------------------------------------------------------
// the upstream registry (docker-registry serve)
// ---------------------------------------------------------------------------

/// A real registry (Debian's `docker-registry`, distribution 2.8) on a loopback
/// port with filesystem storage in its own temp dir. Its log goes to
/// `<dir>/registry.log`, never to the test output. Killed on drop.
pub struct Upstream {
    dir: TempDir,
    port: u16,
    child: Option<Child>,
    creds: Option<(String, String)>,
    /// Serves HTTPS (and so HTTP/2, by ALPN).
    tls: bool,
}

impl Upstream {
    /// Start an anonymous, read-write registry and wait for `/v2/`.
    pub fn start() -> Upstream {
        Self::start_inner(None)
    }

    /// Start a registry that requires HTTP Basic auth (htpasswd with bcrypt
    /// made by `htpasswd -Bbn`, package `apache2-utils`).
    pub fn start_with_htpasswd(user: &str, pass: &str) -> Upstream {
        Self::start_inner(Some((user.to_owned(), pass.to_owned())))
    }

    fn start_inner(creds: Option<(String, String)>) -> Upstream {
        let dir = temp_dir("regcache-upstream-");
        let port = free_port();
        let data = dir.path().join("data");
        fs::create_dir_all(&data).unwrap();
        let mut config = format!(
            "version: 0.1\n\
             log:\n  level: info\n  accesslog:\n    disabled: false\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
             http:\n  addr: 127.0.0.1:{port}\n  secret: regcache-test-secret\n",
            data.display()
        );
        if let Some((user, pass)) = &creds {
            let out = Command::new("htpasswd")
                .args(["-Bbn", user, pass])
                .output()
                .expect("run htpasswd (apt-get install apache2-utils)");
            assert!(
                out.status.success(),
                "htpasswd failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let htpasswd = dir.path().join("htpasswd");
            fs::write(&htpasswd, &out.stdout).unwrap();
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: regcache-test\n    path: {}\n",
                htpasswd.display()
            ));
        }
        fs::write(dir.path().join("config.yml"), config).unwrap();
        let mut up = Upstream {
            dir,
            port,
            child: None,
            creds,
            tls: false,
        };
        up.start_again();
        up
    }

    /// A second registry on this one's storage, over TLS with `cert` and
    /// `key` (PEM files), with its own access log: an upstream that offers
    /// HTTP/2, as public registries do.
    pub fn tls_twin(&self, cert: &str, key: &str) -> Upstream {
        let dir = temp_dir("regcache-upstream-tls-");
        let port = free_port();
        let config = format!(
            "version: 0.1\n\
             log:\n  level: info\n  accesslog:\n    disabled: false\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n\
             http:\n  addr: 127.0.0.1:{port}\n  secret: regcache-test-secret\n\
             \x20 tls:\n    certificate: {cert}\n    key: {key}\n",
            self.dir.path().join("data").display()
        );
        fs::write(dir.path().join("config.yml"), config).unwrap();
        let mut up = Upstream {
            dir,
            port,
            child: None,
            creds: None,
            tls: true,
        };
        up.start_again();
        up
    }

    /// (Re)start the registry process on the same port and storage, and wait
    /// until `/v2/` answers (200, or 401 with auth).
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "upstream already running");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(self.dir.path().join("config.yml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0)
            .spawn()
            .expect("spawn docker-registry (apt-get install docker-registry)");
        self.child = Some(child);
        let addr = self.addr();
        let ready = wait_for(Duration::from_secs(15), || {
            if self.tls {
                // Go listens once it serves; the plain client cannot ask.
                return port_is_open(&addr).then_some(());
            }
            match http(&addr, "GET", "/v2/", &[]) {
                Ok(r) if r.status == 200 || r.status == 401 => Some(()),
                _ => None,
            }
        });
        if ready.is_none() {
            panic!(
                "upstream registry on {addr} did not become ready; log tail:\n{}",
                file_tail(&self.log_path(), 30)
            );
        }
    }

    /// Stop the registry (SIGTERM, then SIGKILL after 5 s) and wait until its
    /// port is closed. Its storage stays for [`Upstream::start_again`].
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = Pid::from_raw(child.id() as i32);
            let _ = kill(pid, Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                if child.try_wait().unwrap().is_some() {
                    break;
                }
                if Instant::now() >= deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let addr = self.addr();
        assert!(
            wait_for(Duration::from_secs(5), || (!port_is_open(&addr))
                .then_some(()))
            .is_some(),
            "upstream port {addr} still open after stop"
        );
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT`
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:PORT` (`https://` over TLS), as a CONFIG
    /// `registry` value.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr())
    }

    /// `(user, password)` when started with htpasswd.
    pub fn creds(&self) -> Option<(&str, &str)> {
        self.creds.as_ref().map(|(u, p)| (u.as_str(), p.as_str()))
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("registry.log")
    }

    pub fn log_tail(&self, lines: usize) -> String {
        file_tail(&self.log_path(), lines)
    }

    /// Request log lines (`"GET /v2/... HTTP/1.1" STATUS`) the upstream saw:
    /// lets a test prove a pull came from the cache and not from here.
    pub fn access_log(&self) -> Vec<String> {
        let text =
            String::from_utf8_lossy(&fs::read(self.log_path()).unwrap_or_default()).into_owned();
        text.lines()
            .filter(|l| {
                l.contains("\"GET ")
                    || l.contains("\"HEAD ")
                    || l.contains("\"PUT ")
                    || l.contains("\"POST ")
                    || l.contains("\"PATCH ")
            })
            .filter(|l| !l.starts_with("time="))
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

// ---------------------------------------------------------------------------
// OCI images from random data
// ---------------------------------------------------------------------------

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";

/// One built image: the exact bytes and digests of its manifest, config and
/// layers.
#[derive(Debug, Clone)]
pub struct ImageParts {
    pub manifest: Vec<u8>,
    pub manifest_digest: String,
    pub config: Vec<u8>,
    pub config_digest: String,
    /// In manifest order; uncompressed, so these are also the diff_ids.
    pub layer_digests: Vec<String>,
    pub layer_sizes: Vec<u64>,
    pub architecture: String,
    pub os: String,
}

impl ImageParts {
    /// Config and layer digests: every blob a pull of this image fetches.
    pub fn blob_digests(&self) -> Vec<String> {
        let mut v = self.layer_digests.clone();
        v.push(self.config_digest.clone());
        v
    }
}

/// A single-platform image pushed to an upstream.
#[derive(Debug, Clone)]
pub struct SeededImage {
    pub repo: String,
    pub tag: String,
    pub image: ImageParts,
}

/// A multi-arch OCI index pushed to an upstream.
#[derive(Debug, Clone)]
pub struct SeededIndex {
    pub repo: String,
    pub tag: String,
    pub index: Vec<u8>,
    pub index_digest: String,
    /// One per platform, in index order (linux/amd64, linux/arm64).
    pub images: Vec<ImageParts>,
}

impl SeededIndex {
    pub fn platform(&self, arch: &str) -> &ImageParts {
        self.images
            .iter()
            .find(|i| i.architecture == arch)
            .unwrap_or_else(|| panic!("no {arch} image in the index"))
    }
}

/// An OCI image layout directory being filled with blobs.
pub struct OciLayout {
    pub dir: PathBuf,
}

impl OciLayout {
    pub fn create(dir: &Path) -> OciLayout {
        fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        OciLayout {
            dir: dir.to_owned(),
        }
    }

    /// Store `data` as a blob; returns its digest.
    pub fn put_blob(&self, data: &[u8]) -> String {
        let digest = sha256_digest(data);
        fs::write(
            self.dir.join("blobs/sha256").join(digest_hex(&digest)),
            data,
        )
        .unwrap();
        digest
    }

    /// Write `index.json` naming one top-level manifest or index as `tag`.
    pub fn set_ref(&self, media_type: &str, digest: &str, size: usize, tag: &str) {
        let index = serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": media_type,
                "digest": digest,
                "size": size,
                "annotations": {"org.opencontainers.image.ref.name": tag}
            }]
        });
        fs::write(
            self.dir.join("index.json"),
            serde_json::to_vec(&index).unwrap(),
        )
        .unwrap();
    }

    /// Build one image of uncompressed tar layers, each holding one file of
    /// random bytes of the given size, plus its config and manifest.
    pub fn build_image(&self, arch: &str, os: &str, layer_sizes: &[usize]) -> ImageParts {
        let tars: Vec<Vec<u8>> = layer_sizes
            .iter()
            .enumerate()
            .map(|(i, size)| random_layer(&format!("layer{i}"), *size))
            .collect();
        self.build_image_from(arch, os, &tars)
    }

    /// Build one image of the given (uncompressed tar) layers: images built
    /// from one layer share it.
    pub fn build_image_from(&self, arch: &str, os: &str, tars: &[Vec<u8>]) -> ImageParts {
        let mut layers = Vec::new();
        for tar in tars {
            let len = tar.len() as u64;
            layers.push((self.put_blob(tar), len));
        }
        let layer_digests: Vec<String> = layers.iter().map(|(d, _)| d.clone()).collect();
        let config = serde_json::json!({
            "created": "2024-01-01T00:00:00Z",
            "architecture": arch,
            "os": os,
            "config": {"Env": ["PATH=/usr/bin:/bin"], "Labels": {"regcache.test": random_token()}},
            "rootfs": {"type": "layers", "diff_ids": layer_digests},
            "history": layer_digests.iter().map(|_| serde_json::json!({
                "created": "2024-01-01T00:00:00Z", "created_by": "regcache test support"
            })).collect::<Vec<_>>()
        });
        let config = serde_json::to_vec(&config).unwrap();
        let config_digest = self.put_blob(&config);
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config.len()},
            "layers": layers.iter().map(|(d, s)| serde_json::json!({
                "mediaType": OCI_LAYER_TAR, "digest": d, "size": s
            })).collect::<Vec<_>>()
        });
        let manifest = serde_json::to_vec(&manifest).unwrap();
        let manifest_digest = self.put_blob(&manifest);
        ImageParts {
            manifest,
            manifest_digest,
            config,
            config_digest,
            layer_digests,
            layer_sizes: layers.iter().map(|(_, s)| *s).collect(),
            architecture: arch.to_owned(),
            os: os.to_owned(),
        }
    }
}

/// A layer: a tar of one file of `size` random bytes.
pub fn random_layer(prefix: &str, size: usize) -> Vec<u8> {
    tar_with_one_file(
        &format!("{prefix}-{}.bin", random_token()),
        &random_bytes(size),
    )
}

/// A valid uncompressed (ustar) tar archive holding one regular file.
pub fn tar_with_one_file(name: &str, data: &[u8]) -> Vec<u8> {
    assert!(name.len() < 100, "tar name too long");
    let mut header = [0u8; 512];
    header[..name.len()].copy_from_slice(name.as_bytes());
    let octal = |field: &mut [u8], value: u64| {
        let width = field.len() - 1;
        let s = format!("{value:0width$o}");
        assert!(s.len() == width, "tar field overflow");
        field[..width].copy_from_slice(s.as_bytes());
        field[width] = 0;
    };
    octal(&mut header[100..108], 0o644); // mode
    octal(&mut header[108..116], 0); // uid
    octal(&mut header[116..124], 0); // gid
    octal(&mut header[124..136], data.len() as u64); // size
    octal(&mut header[136..148], 1_704_067_200); // mtime 2024-01-01
    header[156] = b'0'; // regular file
    header[257..263].copy_from_slice(b"ustar\0");
    header[263..265].copy_from_slice(b"00");
    header[265..269].copy_from_slice(b"root");
    header[297..301].copy_from_slice(b"root");
    header[148..156].copy_from_slice(b"        ");
    let sum: u64 = header.iter().map(|b| *b as u64).sum();
    let chk = format!("{sum:06o}\0 ");
    header[148..156].copy_from_slice(chk.as_bytes());

    let mut out = Vec::with_capacity(512 + data.len() + 1536);
    out.extend_from_slice(&header);
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
    out.resize(out.len() + 1024, 0); // two zero blocks end the archive
    out
}

/// skopeo `--dest-*` flags for pushing to `up`.
fn push_flags(up: &Upstream) -> Vec<String> {
    let mut v = vec!["--dest-tls-verify=false".to_owned()];
    match up.creds() {
        Some((u, p)) => v.push(format!("--dest-creds={u}:{p}")),
        None => v.push("--dest-no-creds".to_owned()),
    }
    v
}

fn push_layout(up: &Upstream, layout: &Path, tag: &str, repo: &str, all: bool) {
    let mut cmd = skopeo_command();
    cmd.arg("copy").arg("-q").arg("--preserve-digests");
    if all {
        cmd.arg("--all");
    }
    cmd.args(push_flags(up))
        .arg(format!("oci:{}:{tag}", layout.display()))
        .arg(format!("docker://{}/{repo}:{tag}", up.addr()));
    let out = run_with_timeout(&mut cmd, Duration::from_secs(120));
    assert!(
        out.success(),
        "pushing {repo}:{tag} to {} failed: {}\nupstream log tail:\n{}",
        up.addr(),
        out.stderr,
        up.log_tail(20)
    );
}

/// Manifest bytes as the upstream serves them, fetched directly.
pub fn fetch_manifest_direct(up: &Upstream, repo: &str, reference: &str) -> Response {
    let auth;
    let mut headers = vec![("Accept", MANIFEST_ACCEPT)];
    if let Some((u, p)) = up.creds() {
        auth = format!("Basic {}", base64_encode(format!("{u}:{p}").as_bytes()));
        headers.push(("Authorization", auth.as_str()));
    }
    http(
        &up.addr(),
        "GET",
        &format!("/v2/{repo}/manifests/{reference}"),
        &headers,
    )
    .unwrap_or_else(|e| panic!("GET manifest {repo}:{reference} from upstream: {e}"))
}

/// Build a single-platform linux/amd64 image with layers of `layer_sizes`
/// bytes of random data, and push it as `repo:tag`. Verifies the upstream
/// now serves exactly the manifest that was built (same digest), so tests can
/// compare against the returned digests.
pub fn seed_image(up: &Upstream, repo: &str, tag: &str, layer_sizes: &[usize]) -> SeededImage {
    let work = temp_dir("regcache-seed-");
    let layout = OciLayout::create(&work.path().join("layout"));
    let image = layout.build_image("amd64", "linux", layer_sizes);
    layout.set_ref(
        OCI_MANIFEST,
        &image.manifest_digest,
        image.manifest.len(),
        tag,
    );
    push_layout(up, &layout.dir, tag, repo, false);
    let served = fetch_manifest_direct(up, repo, tag);
    assert_eq!(
        served.status,
        200,
        "upstream manifest {repo}:{tag}: {}",
        served.describe()
    );
    assert_eq!(
        sha256_digest(&served.body),
        image.manifest_digest,
        "upstream serves a different manifest than the one pushed (skopeo converted it?)"
    );
    SeededImage {
        repo: repo.to_owned(),
        tag: tag.to_owned(),
        image,
    }
}

/// The usual several-layer test image: three layers, one of ~3 MiB.
pub fn seed_multi_layer_image(up: &Upstream, repo: &str, tag: &str) -> SeededImage {
    seed_image(up, repo, tag, &[3 * 1024 * 1024 + 12_345, 40_000, 1_000])
}

/// Build a linux/amd64 + linux/arm64 OCI index (each platform its own
/// manifest, config and layer) and push it with `--all` as `repo:tag`.
pub fn seed_index(up: &Upstream, repo: &str, tag: &str) -> SeededIndex {
    let work = temp_dir("regcache-seed-");
    let layout = OciLayout::create(&work.path().join("layout"));
    let images = vec![
        layout.build_image("amd64", "linux", &[200_000]),
        layout.build_image("arm64", "linux", &[150_000]),
    ];
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": images.iter().map(|i| serde_json::json!({
            "mediaType": OCI_MANIFEST,
            "digest": i.manifest_digest,
            "size": i.manifest.len(),
            "platform": {"architecture": i.architecture, "os": i.os}
        })).collect::<Vec<_>>()
    });
    let index = serde_json::to_vec(&index).unwrap();
    let index_digest = layout.put_blob(&index);
    layout.set_ref(OCI_INDEX, &index_digest, index.len(), tag);
    push_layout(up, &layout.dir, tag, repo, true);
    let served = fetch_manifest_direct(up, repo, tag);
    assert_eq!(
        served.status,
        200,
        "upstream index {repo}:{tag}: {}",
        served.describe()
    );
    assert_eq!(
        sha256_digest(&served.body),
        index_digest,
        "upstream serves a different index than the one pushed"
    );
    SeededIndex {
        repo: repo.to_owned(),
        tag: tag.to_owned(),
        index,
        index_digest,
        images,
    }
}

/// Standard base64 (for Basic auth headers).
pub fn base64_encode(data: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(data)
}

// ---------------------------------------------------------------------------
// skopeo
// ---------------------------------------------------------------------------

/// A private registries.conf (no search registries, short names disabled) and
/// an accept-anything policy, so the machine's /etc/containers plays no part.
fn skopeo_config_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        // One fixed directory shared by all test processes: the files are
        // always the same and are replaced atomically, so concurrent test
        // binaries never see a half-written one.
        let dir = std::env::temp_dir().join("regcache-test-skopeo-conf");
        fs::create_dir_all(dir.join("tmp")).unwrap();
        let write_atomic = |name: &str, content: &str| {
            let tmp = dir.join(format!(".{name}.{}", std::process::id()));
            fs::write(&tmp, content).unwrap();
            fs::rename(&tmp, dir.join(name)).unwrap();
        };
        write_atomic(
            "registries.conf",
            "unqualified-search-registries = []\nshort-name-mode = \"disabled\"\n",
        );
        write_atomic(
            "policy.json",
            r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
        );
        dir
    })
}

/// `skopeo` with the private registries.conf and policy; the global flags
/// `--registries-conf`, `--policy` precede the subcommand.
pub fn skopeo_command() -> Command {
    let conf = skopeo_config_dir();
    let mut cmd = Command::new("skopeo");
    cmd.arg("--registries-conf")
        .arg(conf.join("registries.conf"))
        .arg("--policy")
        .arg(conf.join("policy.json"))
        .arg("--tmpdir")
        .arg(conf.join("tmp"))
        // no user auth file, no system auth
        .env("REGISTRY_AUTH_FILE", conf.join("auth.json"))
        .env_remove("http_proxy")
        .env_remove("https_proxy")
        .env_remove("HTTP_PROXY")
        .env_remove("HTTPS_PROXY");
    cmd
}

/// `skopeo copy [--all] docker://SRC dir:DEST`, anonymous, TLS verification
/// off (so plain HTTP is used after the TLS probe). `src_ref` is without the
/// `docker://` prefix, e.g. `127.0.0.1:PORT/upstream.test/org/img:1.0`.
/// `dest_dir` must not exist yet or be empty (its parents are created).
/// Err holds skopeo's stderr.
pub fn skopeo_copy(src_ref: &str, dest_dir: &Path, all: bool) -> Result<(), String> {
    skopeo_copy_resolving(src_ref, dest_dir, all, &[])
}

/// [`skopeo_copy`] in a private mount namespace whose `/etc/hosts` also
/// resolves `loopback_names` to 127.0.0.1: a real client reaching the cache
/// by a host name, without touching the machine's own `/etc/hosts` (needs
/// root, as the suite runs in CI).
pub fn skopeo_copy_resolving(
    src_ref: &str,
    dest_dir: &Path,
    all: bool,
    loopback_names: &[&str],
) -> Result<(), String> {
    // skopeo creates the last component only.
    if let Some(parent) = dest_dir.parent() {
        fs::create_dir_all(parent).map_err(|e| format!("create {}: {e}", parent.display()))?;
    }
    let hosts_dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut cmd = if loopback_names.is_empty() {
        skopeo_command()
    } else {
        let hosts = hosts_dir.path().join("hosts");
        let mut text = fs::read_to_string("/etc/hosts").unwrap_or_default();
        text.push_str(&format!("\n127.0.0.1 {}\n", loopback_names.join(" ")));
        fs::write(&hosts, text).map_err(|e| e.to_string())?;
        let inner = skopeo_command();
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(r#"mount --bind "$1" /etc/hosts && shift && exec "$@""#)
            .arg("sh")
            .arg(&hosts)
            .arg(inner.get_program())
            .args(inner.get_args())
            .envs(inner.get_envs().filter_map(|(k, v)| Some((k, v?))));
        for (k, v) in inner.get_envs() {
            if v.is_none() {
                cmd.env_remove(k);
            }
        }
        cmd
    };
    cmd.args(["copy", "-q", "--src-tls-verify=false", "--src-no-creds"]);
    if all {
        cmd.arg("--all");
    }
    cmd.arg(format!("docker://{src_ref}"))
        .arg(format!("dir:{}", dest_dir.display()));
    let out = run_with_timeout(&mut cmd, Duration::from_secs(60));
    if out.success() {
        Ok(())
    } else {
        Err(format!(
            "skopeo copy docker://{src_ref} failed ({:?}): {}",
            out.status,
            out.stderr.trim()
        ))
    }
}

/// Pull `reference` (without `docker://`) with skopeo into `dest` and check
/// that the result is exactly `expected`: same manifest digest, layers in
/// order, config, and every blob file hashing to its name.
pub fn pull_and_check_image(reference: &str, expected: &ImageParts, dest: &Path) {
    skopeo_copy(reference, dest, false).unwrap_or_else(|e| panic!("{e}"));
    check_image_copy(reference, expected, dest);
}

/// Checks that the `dir:` copy at `dest` of `reference` is exactly `expected`.
pub fn check_image_copy(reference: &str, expected: &ImageParts, dest: &Path) {
    let copy = read_dir_copy(dest);
    assert_eq!(
        copy.manifest_digest, expected.manifest_digest,
        "{reference}: manifest digest differs from the upstream's"
    );
    assert_eq!(
        copy.manifest, expected.manifest,
        "{reference}: manifest bytes changed"
    );
    assert_eq!(
        copy.layer_digests(),
        expected.layer_digests,
        "{reference}: layer digests"
    );
    assert_eq!(
        copy.config_digest(),
        expected.config_digest,
        "{reference}: config digest"
    );
    for (digest, size) in expected.layer_digests.iter().zip(&expected.layer_sizes) {
        assert_eq!(
            copy.blobs.get(digest),
            Some(size),
            "{reference}: layer {digest} size"
        );
    }
}

/// `skopeo inspect --raw docker://REF`: the manifest or index bytes as served.
pub fn skopeo_inspect_raw(reference: &str) -> Result<Vec<u8>, String> {
    let mut cmd = skopeo_command();
    cmd.args(["inspect", "--raw", "--tls-verify=false", "--no-creds"])
        .arg(format!("docker://{reference}"));
    let out = run_with_timeout(&mut cmd, Duration::from_secs(60));
    if out.success() {
        Ok(out.stdout)
    } else {
        Err(format!(
            "skopeo inspect --raw docker://{reference} failed ({:?}): {}",
            out.status,
            out.stderr.trim()
        ))
    }
}

// ---------------------------------------------------------------------------
// reading a `dir:` copy
// ---------------------------------------------------------------------------

/// What `skopeo copy ... dir:D` wrote, every blob checked against its name.
#[derive(Debug)]
pub struct DirCopy {
    /// `manifest.json`: the top-level manifest (or index with `--all`).
    pub manifest: Vec<u8>,
    pub manifest_digest: String,
    /// Child manifests by digest (`<hex>.manifest.json`, written with `--all`).
    pub child_manifests: BTreeMap<String, Vec<u8>>,
    /// Blob digest -> file size.
    pub blobs: BTreeMap<String, u64>,
}

impl DirCopy {
    /// Layer digests of `manifest` (the top one when it is an image manifest).
    pub fn layer_digests(&self) -> Vec<String> {
        manifest_layers(&self.manifest)
    }

    pub fn config_digest(&self) -> String {
        manifest_config(&self.manifest)
    }

    pub fn has_blob(&self, digest: &str) -> bool {
        self.blobs.contains_key(digest)
    }
}

fn manifest_layers(manifest: &[u8]) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_slice(manifest).expect("manifest JSON");
    v["layers"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|l| l["digest"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn manifest_config(manifest: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(manifest).expect("manifest JSON");
    v["config"]["digest"]
        .as_str()
        .expect("manifest config digest")
        .to_owned()
}

/// Read and verify a `dir:` copy: every blob file's sha256 equals its name,
/// and every blob referenced by the manifest (and, for an index, by the child
/// manifests present) is there. Panics with details otherwise.
pub fn read_dir_copy(dir: &Path) -> DirCopy {
    let manifest = fs::read(dir.join("manifest.json"))
        .unwrap_or_else(|e| panic!("{}/manifest.json: {e}", dir.display()));
    let mut child_manifests = BTreeMap::new();
    let mut blobs = BTreeMap::new();
    for entry in fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        let is_hex = |s: &str| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
        if let Some(hexname) = name.strip_suffix(".manifest.json") {
            if is_hex(hexname) {
                let data = fs::read(entry.path()).unwrap();
                let digest = sha256_digest(&data);
                assert_eq!(
                    digest_hex(&digest),
                    hexname,
                    "child manifest {name} in {} does not hash to its name",
                    dir.display()
                );
                child_manifests.insert(digest, data);
            }
        } else if is_hex(&name) {
            let data = fs::read(entry.path()).unwrap();
            let digest = sha256_digest(&data);
            assert_eq!(
                digest_hex(&digest),
                name,
                "blob file {name} in {} does not hash to its name (size {})",
                dir.display(),
                data.len()
            );
            blobs.insert(digest, data.len() as u64);
        }
    }
    let copy = DirCopy {
        manifest_digest: sha256_digest(&manifest),
        manifest,
        child_manifests,
        blobs,
    };
    let mut manifests: Vec<&[u8]> = copy
        .child_manifests
        .values()
        .map(|m| m.as_slice())
        .collect();
    manifests.push(&copy.manifest);
    for m in manifests {
        let v: serde_json::Value = serde_json::from_slice(m).expect("manifest JSON");
        if v.get("config").is_some() {
            for d in manifest_layers(m).into_iter().chain([manifest_config(m)]) {
                assert!(
                    copy.blobs.contains_key(&d),
                    "blob {d} referenced by a manifest is missing from {}",
                    dir.display()
                );
            }
        }
    }
    copy
}

// ---------------------------------------------------------------------------
// the regcache binary
// ---------------------------------------------------------------------------

/// Path of the binary under test: `$REGCACHE_BIN` when set (to test another
/// build, e.g. a release binary), else the workspace's `regcache` beside the
/// running test (`target/<profile>/deps/<test>` -> `target/<profile>/regcache`),
/// which cargo builds for the root package's integration tests.
pub fn regcache_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("REGCACHE_BIN") {
        return PathBuf::from(p);
    }
    let test = std::env::current_exe().expect("the test binary's path");
    let profile_dir = test
        .parent()
        .and_then(|deps| deps.parent())
        .expect("tests run from target/<profile>/deps");
    profile_dir.join("regcache")
}

/// CONFIG JSON for upstreams given as `(registry_url, aliases)`.
pub fn config_json(entries: &[(&str, &[&str])]) -> String {
    serde_json::to_string(
        &entries
            .iter()
            .map(|(url, aliases)| serde_json::json!({"registry": url, "aliases": aliases}))
            .collect::<Vec<_>>(),
    )
    .unwrap()
}

/// A running `regcache` supervisor (and its workers) on a loopback port, with
/// storage in a directory the test owns (so a restart can reuse it). Output
/// goes to a log file whose tail is printed when the test panics. Drop kills
/// the process group and any worker left.
pub struct Regcache {
    child: Option<Child>,
    addr: String,
    config: String,
    storage: PathBuf,
    /// Holds the log and TMPDIR: dropping it removes them.
    _log_dir: TempDir,
    log_path: PathBuf,
    /// TMPDIR given to regcache: its own empty directory, so whatever it puts
    /// in the temp dir is visible to the test and removed with the log dir.
    tmp_dir: PathBuf,
    /// Worker pids seen while running, killed on drop in case a worker left
    /// the process group.
    seen_workers: Vec<i32>,
    /// Extra environment (client auth, TLS, tuning knobs).
    env: Vec<(String, String)>,
}

impl Regcache {
    /// Start with `config` (JSON text in the CONFIG env var) on a free port;
    /// panics (with the log tail) unless `GET /v2/` answers 200 within 20 s.
    pub fn start(config: &str, storage: &Path) -> Regcache {
        Self::try_start(config, storage).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`Regcache::start`], with extra environment variables. Readiness
    /// is the port accepting connections (regcache binds only once its
    /// workers are ready), since with TLS or client auth `/v2/` is no 200.
    pub fn start_with_env(config: &str, storage: &Path, env: &[(&str, &str)]) -> Regcache {
        Self::try_start_with_env(config, storage, env).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`Regcache::start`], returning the failure (with log tail) instead.
    pub fn try_start(config: &str, storage: &Path) -> Result<Regcache, String> {
        Self::try_start_with_env(config, storage, &[])
    }

    pub fn try_start_with_env(
        config: &str,
        storage: &Path,
        env: &[(&str, &str)],
    ) -> Result<Regcache, String> {
        let log_dir = temp_dir("regcache-log-");
        let log_path = log_dir.path().join("regcache.log");
        let tmp_dir = log_dir.path().join("tmp");
        fs::create_dir(&tmp_dir).unwrap();
        let mut rc = Regcache {
            child: None,
            addr: String::new(),
            config: config.to_owned(),
            storage: storage.to_owned(),
            _log_dir: log_dir,
            log_path,
            tmp_dir,
            seen_workers: Vec::new(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        rc.spawn_and_wait()?;
        Ok(rc)
    }

    fn spawn_and_wait(&mut self) -> Result<(), String> {
        self.addr = format!("127.0.0.1:{}", free_port());
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)
            .unwrap();
        writeln!(
            &log,
            "=== regcache start: listen {} storage {}",
            self.addr,
            self.storage.display()
        )
        .unwrap();
        let child = Command::new(regcache_bin())
            .arg("--listen")
            .arg(&self.addr)
            .arg("--storage")
            .arg(&self.storage)
            .env("CONFIG", &self.config)
            .env("RUST_BACKTRACE", "1")
            .env("TMPDIR", &self.tmp_dir)
            .env_remove("REGCACHE_LISTEN")
            .env_remove("REGCACHE_STORAGE")
            .env_remove("CONFIG_FILE")
            .env_remove("http_proxy")
            .env_remove("https_proxy")
            .env_remove("HTTP_PROXY")
            .env_remove("HTTPS_PROXY")
            .env_remove("all_proxy")
            .env_remove("ALL_PROXY")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .process_group(0)
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", regcache_bin().display()))?;
        self.child = Some(child);
        let addr = self.addr.clone();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ready = if self.env.is_empty() {
                http(&addr, "GET", "/v2/", &[]).is_ok_and(|r| r.status == 200)
            } else {
                port_is_open(&addr)
            };
            if ready {
                self.remember_workers();
                return Ok(());
            }
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return Err(format!(
                    "regcache exited early ({st}) before answering GET /v2/ on {addr}; log tail:\n{}",
                    self.log_tail(40)
                ));
            }
            if Instant::now() >= deadline {
                let tail = self.log_tail(40);
                self.kill();
                return Err(format!(
                    "regcache did not answer GET /v2/ with 200 on {addr} within 20 s; log tail:\n{tail}"
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Start again with the same CONFIG and storage (on a new port) after
    /// [`Regcache::stop`] or [`Regcache::kill`].
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "regcache still running");
        self.spawn_and_wait().unwrap_or_else(|e| panic!("{e}"));
    }

    /// `127.0.0.1:PORT`
    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn storage(&self) -> &Path {
        &self.storage
    }

    /// Supervisor pid (None once stopped).
    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    /// The TMPDIR regcache runs with (empty at start).
    pub fn tmp_dir(&self) -> &Path {
        &self.tmp_dir
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    pub fn log_tail(&self, lines: usize) -> String {
        file_tail(&self.log_path, lines)
    }

    /// Worker processes: direct children of the supervisor whose command line
    /// contains `worker`. Returns (pid, command line with spaces).
    pub fn workers(&self) -> Vec<(i32, String)> {
        match self.pid() {
            Some(pid) => children_of(pid)
                .into_iter()
                .filter(|(_, cmdline)| cmdline.split(' ').any(|a| a == "worker"))
                .collect(),
            None => Vec::new(),
        }
    }

    pub fn worker_pids(&self) -> Vec<i32> {
        self.workers().into_iter().map(|(p, _)| p).collect()
    }

    /// PSS of the supervisor and its workers, in KiB.
    pub fn pss_kib(&self) -> u64 {
        let own = self.pid().map_or(0, pss_kib);
        own + self.worker_pids().into_iter().map(pss_kib).sum::<u64>()
    }

    fn remember_workers(&mut self) {
        for p in self.worker_pids() {
            if !self.seen_workers.contains(&p) {
                self.seen_workers.push(p);
            }
        }
    }

    /// SIGTERM and wait up to 15 s for the exit status; SIGKILL after that
    /// (and then panics, since a clean shutdown was expected).
    pub fn stop(&mut self) -> ExitStatus {
        self.sigterm();
        match self.wait_exit(Duration::from_secs(15)) {
            Some(st) => st,
            None => {
                let tail = self.log_tail(40);
                self.kill();
                panic!("regcache did not exit within 15 s of SIGTERM; log tail:\n{tail}");
            }
        }
    }

    /// SIGTERM to the supervisor only (as a container runtime sends it),
    /// without waiting: for tests that act while regcache drains.
    pub fn sigterm(&mut self) {
        self.remember_workers();
        let pid = self.pid().expect("regcache not running");
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    }

    /// Waits up to `timeout` for the supervisor to exit: its status, or
    /// `None` when it is still running (it is left running).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self.child.as_mut().expect("regcache not running");
            if let Some(st) = child.try_wait().unwrap() {
                self.child = None;
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL the supervisor's process group and any worker seen, and
    /// wait (up to 10 s) until those workers are gone: a worker's storage
    /// lock is free only once it has exited, which SIGKILL does not wait for.
    pub fn kill(&mut self) {
        self.remember_workers();
        if let Some(mut child) = self.child.take() {
            let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            let _ = child.kill();
            let _ = child.wait();
        }
        let workers = std::mem::take(&mut self.seen_workers);
        for &p in &workers {
            // A pid seen earlier may have been reused by now: only kill it if
            // it is still a `regcache worker` process.
            if is_regcache_worker(p) {
                let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
            }
        }
        wait_for(Duration::from_secs(10), || {
            (!workers.iter().any(|&p| is_regcache_worker(p))).then_some(())
        });
    }
}

impl Drop for Regcache {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- regcache log ({}) tail ----\n{}\n---- end of regcache log ----",
                self.log_path.display(),
                self.log_tail(60)
            );
        }
        self.kill();
    }
}

/// Is `pid` a live (non-zombie) process of the regcache binary with a
/// `worker` argument?
fn is_regcache_worker(pid: i32) -> bool {
    let exe = fs::read_link(format!("/proc/{pid}/exe")).ok();
    let ours = fs::canonicalize(regcache_bin()).ok();
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    exe.is_some() && exe == ours && cmdline.split(|c| *c == 0).any(|a| a == b"worker")
}

/// Proportional set size of `pid` in KiB (`/proc/PID/smaps_rollup`): its
/// share of the memory it maps, pages shared with others counted once in all.
pub fn pss_kib(pid: i32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Pss:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// The fields of a `/proc/.../stat` line after the command name (which
/// may hold spaces): `[0]` is the line's 3rd field, the state.
fn stat_fields(path: &str) -> Option<Vec<String>> {
    let stat = fs::read_to_string(path).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(String::from).collect())
}

/// The nice value of every thread of `pid` (`self`: the test's own process).
pub fn thread_nices(pid: &str) -> Vec<i32> {
    let tasks = fs::read_dir(format!("/proc/{pid}/task")).unwrap();
    tasks
        .flatten()
        .filter_map(|t| stat_fields(&format!("{}/stat", t.path().display())))
        .map(|f| f[16].parse().unwrap())
        .collect()
}

/// The session `pid` belongs to (`self`: the test's own).
pub fn session_of(pid: &str) -> i32 {
    stat_fields(&format!("/proc/{pid}/stat")).unwrap()[3]
        .parse()
        .unwrap()
}

/// `/proc/PID/autogroup` ("/autogroup-42 nice 0"): the session's group when
/// the kernel shares the CPU by session; None on a kernel without them.
pub fn autogroup(pid: &str) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/autogroup")).ok()
}

/// KiB of the regcache binary's own mappings that `pid` holds as copies of
/// its own (`Anonymous` in `/proc/PID/smaps`): pages written after they were
/// mapped, such as data the loader relocated, which no other process can
/// share.
pub fn copied_pages_of_binary_kib(pid: i32) -> u64 {
    let binary = fs::canonicalize(regcache_bin()).expect("regcache binary");
    let binary = binary.to_string_lossy();
    let smaps = fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let (mut ours, mut kib) = (false, 0);
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        match fields.next() {
            // A mapping's first line: "start-end perms offset dev inode path".
            Some(range) if range.contains('-') && !range.ends_with(':') => {
                ours = fields.nth(4) == Some(binary.as_ref());
            }
            Some("Anonymous:") if ours => {
                kib += fields
                    .next()
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or(0);
            }
            _ => {}
        }
    }
    kib
}

/// Is `pid` a running process (not gone, not a zombie)?
pub fn is_alive(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            let state = s.rsplit(')').next().unwrap_or("").trim_start();
            !state.starts_with('Z')
        })
        .unwrap_or(false)
}

/// Direct children of `ppid` from /proc: (pid, cmdline joined with spaces).
pub fn children_of(ppid: i32) -> Vec<(i32, String)> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces and parens.
        let Some(after) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        let mut fields = after.split_whitespace();
        let state = fields.next().unwrap_or("");
        let parent: i32 = fields.next().and_then(|s| s.parse().ok()).unwrap_or(-1);
        if parent != ppid || state == "Z" {
            continue;
        }
        let cmdline = fs::read(format!("/proc/{pid}/cmdline"))
            .map(|b| {
                b.split(|c| *c == 0)
                    .filter(|s| !s.is_empty())
                    .map(|s| String::from_utf8_lossy(s).into_owned())
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default();
        out.push((pid, cmdline));
    }
    out
}

/// Run `regcache ARGS` to completion with `CONFIG` set (when `config` is
/// Some), e.g. `check-config`; killed after `timeout`.
pub fn run_regcache(args: &[&str], config: Option<&str>, timeout: Duration) -> CmdOutput {
    let mut cmd = Command::new(regcache_bin());
    cmd.args(args)
        .env_remove("CONFIG")
        .env_remove("REGCACHE_LISTEN")
        .env_remove("REGCACHE_STORAGE")
        .env_remove("CONFIG_FILE")
        .process_group(0);
    if let Some(c) = config {
        cmd.env("CONFIG", c);
    }
    run_with_timeout(&mut cmd, timeout)
}

// ---------------------------------------------------------------------------
// filesystem checks
// ---------------------------------------------------------------------------

/// Every path under `root` (files, dirs, symlinks), relative to `root`.
pub fn walk(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            out.push(path.strip_prefix(root).unwrap().to_owned());
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                stack.push(path);
            }
        }
    }
    out.sort();
    out
}

/// The cache root regcache gives the upstream at `addr` (`host:port`) under
/// its storage: `<storage>/<host>_<port>` (README, storage layout).
pub fn upstream_root(storage: &Path, addr: &str) -> PathBuf {
    storage.join(addr.replace(':', "_"))
}

/// Where a committed blob lives in an upstream's cache root:
/// `blobs/sha256/<first two hex>/<hex>`.
pub fn blob_file(root: &Path, digest: &str) -> PathBuf {
    let hex = digest_hex(digest);
    root.join("blobs/sha256").join(&hex[..2]).join(hex)
}

/// Entries in an upstream cache root's `tmp/` (in-progress writes).
pub fn tmp_entries(root: &Path) -> Vec<PathBuf> {
    walk(&root.join("tmp"))
}

/// Waits (up to 10 s) until `root/tmp` is empty; panics naming what is left.
pub fn wait_tmp_empty(root: &Path, what: &str) {
    let left = wait_for(Duration::from_secs(10), || {
        tmp_entries(root).is_empty().then_some(())
    });
    assert!(
        left.is_some(),
        "{what}: {}/tmp still holds {:?} after 10 s",
        root.display(),
        tmp_entries(root)
    );
}
