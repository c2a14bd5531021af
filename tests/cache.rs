//! End-to-end tests of the cache engine (issue 4): single-flight streaming
//! blob fills, failure handling, Range, HEAD, and how few requests reach the
//! upstream. The upstream is the in-process fake ([`support::fake`]), which
//! can stream slowly, hold a body at a gate, cut it short or corrupt it, and
//! records every request regcache makes.
//!
//! Gates (not sleeps) make overlaps certain: "16 clients attached to one
//! fill" is arranged by holding the upstream body until all 16 have their
//! response headers. Nothing here asserts a duration.
//!
//! Run: `cargo test --test cache -- --test-threads=2`
//! Needs: skopeo on PATH (for the skopeo pulls).

use regcache_testkit as support;

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use support::fake::{describe, ms, FakeBlob, FakeRegistry, Gate, Serve};
use support::*;

/// The alias the fake upstream is reached by through regcache.
const PREFIX: &str = "upstream.test";

/// A fake upstream and a regcache in front of it, with its own storage.
struct Setup {
    fake: FakeRegistry,
    rc: Regcache,
    _storage: tempfile::TempDir,
    storage: PathBuf,
}

impl Setup {
    fn start() -> Setup {
        Self::start_with_env(&[])
    }

    fn start_with_env(env: &[(&str, &str)]) -> Setup {
        let fake = FakeRegistry::start();
        let storage_parent = temp_dir("regcache-storage-");
        let storage = storage_parent.path().join("storage");
        let rc = Regcache::start_with_env(&Self::config(&fake), &storage, env);
        Setup {
            fake,
            rc,
            _storage: storage_parent,
            storage,
        }
    }

    fn config(fake: &FakeRegistry) -> String {
        config_json(&[(&fake.url(), &[PREFIX])])
    }

    fn cache(&self) -> String {
        self.rc.addr().to_owned()
    }

    /// This upstream's cache root under the storage directory.
    fn root(&self) -> PathBuf {
        upstream_root(&self.storage, &self.fake.addr())
    }

    /// A blob of `len` random bytes whose upstream body, served as `serve`,
    /// stops after `at` bytes until the returned gate opens (the guard opens
    /// it if the test fails first).
    fn held_blob(&self, len: usize, serve: Serve, at: usize) -> (FakeBlob, Gate, OpenOnDrop) {
        let blob = self.fake.add_blob("org/img", &random_bytes(len));
        let gate = Gate::new();
        self.fake.set(&blob.path, serve.pause_at(at, &gate));
        let guard = OpenOnDrop(gate.clone());
        (blob, gate, guard)
    }

    /// Waits until an upstream body has reached `gate`.
    fn wait_held(&self, gate: &Gate) {
        assert!(
            gate.wait_reached(1, Duration::from_secs(20)),
            "the upstream body never reached its gate\n{}",
            self.fake.describe_requests()
        );
    }
}

/// Opens `gate` when dropped, so that a failing test never leaves a fill
/// (and the threads reading it) waiting.
struct OpenOnDrop(Gate);

impl Drop for OpenOnDrop {
    fn drop(&mut self) {
        self.0.open();
    }
}

/// What one client thread saw.
#[derive(Debug)]
struct ClientResult {
    status: u16,
    headers: Vec<(String, String)>,
    body: BodyRead,
}

impl ClientResult {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn describe(&self) -> String {
        format!(
            "status {} headers {:?}; body {} bytes, {}",
            self.status,
            self.headers,
            self.body.bytes.len(),
            match &self.body.error {
                None => "complete".to_owned(),
                Some(e) => format!("cut: {e}"),
            }
        )
    }
}

/// Starts a client thread: `method path` with `headers`; reports on
/// `ready` once its response headers are in, then reads the whole body.
fn client(
    cache: &str,
    method: &'static str,
    path: &str,
    headers: Vec<(&'static str, String)>,
    ready: mpsc::Sender<()>,
) -> JoinHandle<Result<ClientResult, String>> {
    let (cache, path) = (cache.to_owned(), path.to_owned());
    std::thread::spawn(move || {
        let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let mut r = http_open(&cache, method, &path, &h)
            .map_err(|e| format!("{method} {path} {h:?}: {e}"))?;
        let _ = ready.send(());
        let body = r.read_rest();
        Ok(ClientResult {
            status: r.status,
            headers: r.headers,
            body,
        })
    })
}

/// Waits until `n` clients reported their headers on `rx`; returns how many did.
fn wait_headers(rx: &mpsc::Receiver<()>, n: usize, timeout: Duration) -> usize {
    let deadline = Instant::now() + timeout;
    let mut got = 0;
    while got < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(()) => got += 1,
            Err(_) => break,
        }
    }
    got
}

fn join(h: JoinHandle<Result<ClientResult, String>>, what: &str) -> ClientResult {
    h.join()
        .unwrap_or_else(|_| panic!("{what}: client thread panicked"))
        .unwrap_or_else(|e| panic!("{what}: {e}"))
}

/// Asserts `r` is a complete 200 with exactly `blob`'s bytes.
fn assert_full_blob(what: &str, r: &ClientResult, blob: &FakeBlob) {
    assert_eq!(r.status, 200, "{what}: {}", r.describe());
    assert!(r.body.complete(), "{what}: {}", r.describe());
    assert_eq!(
        r.header("Content-Length"),
        Some(blob.len().to_string().as_str()),
        "{what}: {}",
        r.describe()
    );
    assert_eq!(
        sha256_digest(&r.body.bytes),
        blob.digest,
        "{what}: body ({} bytes) does not hash to the blob's digest",
        r.body.bytes.len()
    );
}

/// `GET path` through regcache, whole; panics on a transport error.
fn get_with(cache: &str, path: &str, headers: &[(&str, &str)]) -> Response {
    http(cache, "GET", path, headers).unwrap_or_else(|e| panic!("GET {path} {headers:?}: {e}"))
}

/// Asserts the committed blob file exists (within a few seconds: clients get
/// their last byte once the digest checks out, the rename follows) and holds
/// exactly `blob`.
fn assert_committed(root: &Path, blob: &FakeBlob, what: &str) {
    let file = blob_file(root, &blob.digest);
    wait_for(Duration::from_secs(5), || file.exists().then_some(()));
    let data = std::fs::read(&file)
        .unwrap_or_else(|e| panic!("{what}: blob file {}: {e}", file.display()));
    assert_eq!(
        sha256_digest(&data),
        blob.digest,
        "{what}: {} does not hash to its name",
        file.display()
    );
}

// ---------------------------------------------------------------------------
// single flight
// ---------------------------------------------------------------------------

/// 16 clients ask for one cold blob at once: regcache makes ONE upstream GET
/// and streams it to all of them. The upstream holds the body after 256 KiB
/// until every client has its response headers, so all 16 are certainly
/// attached to the same fill (and none could have been served from disk).
#[test]
fn sixteen_concurrent_gets_make_one_upstream_get() {
    let s = Setup::start();
    let blob = s.fake.add_blob("org/img", &random_bytes((3 << 20) + 777));
    let gate = Gate::new();
    let _open = OpenOnDrop(gate.clone());
    s.fake.set(
        &blob.path,
        Serve::ok()
            .slow(128 << 10, ms(5))
            .pause_at(256 << 10, &gate),
    );
    let path = blob.path_via(PREFIX);
    let (tx, rx) = mpsc::channel();
    let clients: Vec<_> = (0..16)
        .map(|_| client(&s.cache(), "GET", &path, vec![], tx.clone()))
        .collect();
    let with_headers = wait_headers(&rx, 16, Duration::from_secs(30));
    let gets_while_held = s.fake.count("GET", &blob.path);
    gate.open();
    let results: Vec<ClientResult> = clients
        .into_iter()
        .enumerate()
        .map(|(i, h)| join(h, &format!("client {i}")))
        .collect();

    assert_eq!(
        with_headers, 16,
        "only {with_headers} of 16 clients got response headers while upstream held the \
         body after 256 KiB: regcache does not stream a fill to concurrent clients"
    );
    for (i, r) in results.iter().enumerate() {
        assert_full_blob(&format!("client {i}"), r, &blob);
    }
    assert_eq!(
        gets_while_held,
        1,
        "upstream GETs of the blob while 16 clients waited\n{}",
        s.fake.describe_requests()
    );
    assert_eq!(
        s.fake.count("GET", &blob.path),
        1,
        "16 concurrent clients: exactly one upstream GET expected\n{}",
        s.fake.describe_requests()
    );
    assert_committed(&s.root(), &blob, "after the fill");
    assert_eq!(
        followed(&s.cache()),
        16.0,
        "all 16 answers should be read by the front from the fill's spool, none relayed"
    );
}

/// Answers of a blob in flight that the front read from the spool itself.
fn followed(cache: &str) -> f64 {
    let page = get(cache, "/metrics").text();
    metric(&page, "regcache_fill_answers_followed_total", &[]).unwrap_or(0.0)
}

/// One client of a fill stops reading: the fill completes and is committed,
/// and a client that keeps reading gets the whole blob, while the slow one
/// still waits; then the slow one gets every byte too.
#[test]
fn a_slow_client_holds_back_neither_the_fill_nor_the_others() {
    let s = Setup::start();
    let (blob, gate, _open) = s.held_blob((8 << 20) + 3, Serve::ok(), 1 << 20);
    let path = blob.path_via(PREFIX);
    let mut slow = http_open(&s.cache(), "GET", &path, &[]).expect("the slow client's GET");
    s.wait_held(&gate);
    let (tx, rx) = mpsc::channel();
    let fast = client(&s.cache(), "GET", &path, vec![], tx);
    assert_eq!(
        wait_headers(&rx, 1, Duration::from_secs(20)),
        1,
        "the second client got no headers"
    );
    let mut got = slow
        .read_some(64 << 10)
        .expect("the slow client's first bytes");
    gate.open();
    assert_full_blob(
        "the client that kept reading",
        &join(fast, "fast client"),
        &blob,
    );
    assert_committed(&s.root(), &blob, "while one client stalls");
    let rest = slow.read_rest();
    got.extend_from_slice(&rest.bytes);
    assert!(
        rest.complete(),
        "the slow client's body was cut: {:?}",
        rest.error
    );
    assert_eq!(sha256_digest(&got), blob.digest, "the slow client's bytes");
    assert_eq!(
        s.fake.count("GET", &blob.path),
        1,
        "{}",
        s.fake.describe_requests()
    );
    assert_eq!(
        followed(&s.cache()),
        2.0,
        "both answers read from the spool by the front"
    );
}

/// The client that started a fill goes away half-way: the fill goes on, the
/// blob is committed, then served as a HIT, with one upstream GET in all.
#[test]
fn client_disconnect_does_not_stop_the_fill() {
    let s = Setup::start();
    let (blob, gate, _open) =
        s.held_blob((2 << 20) + 5, Serve::ok().slow(64 << 10, ms(5)), 512 << 10);
    let path = blob.path_via(PREFIX);

    let mut r =
        http_open(&s.cache(), "GET", &path, &[]).unwrap_or_else(|e| panic!("GET {path}: {e}"));
    assert_eq!(r.status, 200, "GET {path}: {}", r.describe());
    s.wait_held(&gate);
    let first = r.read_some(100_000).expect("read the first bytes");
    assert_eq!(
        first[..],
        blob.data[..first.len()],
        "first bytes of the body differ from the blob"
    );
    drop(r); // the client disconnects mid-fill
    gate.open();

    let mut last = None;
    let hit = wait_for(Duration::from_secs(20), || {
        let h = http(&s.cache(), "HEAD", &path, &[]).ok()?;
        let is_hit = h.header("X-Cache") == Some("HIT");
        last = Some(h.describe());
        is_hit.then_some(())
    });
    assert!(
        hit.is_some(),
        "the blob never became a cache HIT after its first client disconnected \
         (the fill was cancelled?); last HEAD: {last:?}\n{}",
        s.fake.describe_requests()
    );
    let g = get_with(&s.cache(), &path, &[]);
    assert_eq!(g.status, 200, "GET after the fill: {}", g.describe());
    assert_eq!(g.header("X-Cache"), Some("HIT"), "{}", g.describe());
    assert_eq!(
        sha256_digest(&g.body),
        blob.digest,
        "GET after the fill: wrong bytes"
    );
    assert_eq!(
        s.fake.count("GET", &blob.path),
        1,
        "one upstream GET expected\n{}",
        s.fake.describe_requests()
    );
    assert_committed(&s.root(), &blob, "after the disconnected fill");
}

// ---------------------------------------------------------------------------
// failed fills
// ---------------------------------------------------------------------------

/// A fill that fails after the headers (`fault` builds the upstream's
/// misbehaviour for the first GET, holding at `gate` so three clients attach
/// first): every client sees an error rather than a complete body, nothing
/// is committed, `tmp/` is left empty, and the next request goes upstream
/// again and succeeds. `gets` is how many upstream GETs the failed fill
/// makes (a resume attempt included).
fn failed_fill_case(label: &str, size: usize, gets: usize, fault: impl FnOnce(&Gate) -> Serve) {
    failed_fill_case_with(label, size, gets, Serve::ok(), fault)
}

/// [`failed_fill_case`] on a route whose other answers are `default`.
fn failed_fill_case_with(
    label: &str,
    size: usize,
    gets: usize,
    default: Serve,
    fault: impl FnOnce(&Gate) -> Serve,
) {
    let s = Setup::start();
    let blob = s.fake.add_blob("org/img", &random_bytes(size));
    let gate = Gate::new();
    let _open = OpenOnDrop(gate.clone());
    s.fake.set(&blob.path, default);
    s.fake.once(&blob.path, fault(&gate).only("GET"));
    let path = blob.path_via(PREFIX);

    let (tx, rx) = mpsc::channel();
    let clients: Vec<_> = (0..3)
        .map(|_| client(&s.cache(), "GET", &path, vec![], tx.clone()))
        .collect();
    let with_headers = wait_headers(&rx, 3, Duration::from_secs(20));
    gate.open();
    let results: Vec<ClientResult> = clients
        .into_iter()
        .enumerate()
        .map(|(i, h)| join(h, &format!("{label}: client {i}")))
        .collect();
    assert_eq!(
        with_headers, 3,
        "{label}: only {with_headers} of 3 clients got headers while upstream held the body"
    );
    for (i, r) in results.iter().enumerate() {
        let what = format!("{label}: client {i}");
        if r.status == 200 {
            assert!(
                !r.body.complete(),
                "{what}: got a complete 200 body although the fill failed \
                 (sha256 {} vs blob {}): {}",
                sha256_digest(&r.body.bytes),
                blob.digest,
                r.describe()
            );
            let expected = blob.data.len().to_string();
            if let Some(cl) = r.header("Content-Length") {
                assert_eq!(cl, expected, "{what}: {}", r.describe());
            }
        } else {
            assert!(
                r.status >= 500 && !ClientResult::error_codes(&r.body.bytes).is_empty(),
                "{what}: expected an aborted 200 or a 5xx registry error, got {}",
                r.describe()
            );
        }
    }
    assert_eq!(
        s.fake.count("GET", &blob.path),
        gets,
        "{label}: upstream GETs for the failed fill\n{}",
        s.fake.describe_requests()
    );
    wait_tmp_empty(&s.root(), &format!("{label}: after the failed fill"));
    assert!(
        !blob_file(&s.root(), &blob.digest).exists(),
        "{label}: the failed fill was committed at {}",
        blob_file(&s.root(), &blob.digest).display()
    );

    // Afresh: the next request goes upstream again and gets the right bytes.
    let again = get_with(&s.cache(), &path, &[]);
    assert_eq!(
        again.status,
        200,
        "{label}: GET after the failure: {}",
        again.describe()
    );
    assert_eq!(
        sha256_digest(&again.body),
        blob.digest,
        "{label}: GET after the failure: wrong bytes ({} of {})",
        again.body.len(),
        blob.len()
    );
    assert_eq!(
        s.fake.count("GET", &blob.path),
        gets + 1,
        "{label}: the request after a failed fill must go upstream again\n{}",
        s.fake.describe_requests()
    );
    assert_committed(&s.root(), &blob, &format!("{label}: after the retry"));
    wait_tmp_empty(&s.root(), &format!("{label}: after the retry"));
}

impl ClientResult {
    fn error_codes(body: &[u8]) -> Vec<String> {
        Response {
            status: 0,
            headers: vec![],
            body: body.to_vec(),
        }
        .error_codes()
    }
}

/// Cut off by an upstream that cannot resume (it ignores Range): the one
/// attempt to resume fails too, and nothing is committed.
#[test]
fn truncated_fill_is_never_committed() {
    let size = (1 << 20) + 13;
    failed_fill_case_with("truncated", size, 2, Serve::ok().no_ranges(), |g| {
        Serve::ok()
            .slow(64 << 10, ms(2))
            .pause_at(256 << 10, g)
            .truncate_after(size / 2)
    });
}

/// Cut off by an upstream that can resume: the fill asks for the rest with
/// `Range: bytes=N-`, and every client gets the whole, verified blob.
#[test]
fn a_truncated_fill_resumes_from_where_it_stopped() {
    let s = Setup::start();
    let size = (1 << 20) + 13;
    let blob = s.fake.add_blob("org/img", &random_bytes(size));
    let gate = Gate::new();
    let _open = OpenOnDrop(gate.clone());
    s.fake.once(
        &blob.path,
        Serve::ok()
            .only("GET")
            .slow(64 << 10, ms(2))
            .pause_at(256 << 10, &gate)
            .truncate_after(size / 2),
    );
    let path = blob.path_via(PREFIX);
    let (tx, rx) = mpsc::channel();
    let clients: Vec<_> = (0..3)
        .map(|_| client(&s.cache(), "GET", &path, vec![], tx.clone()))
        .collect();
    wait_headers(&rx, 3, Duration::from_secs(20));
    gate.open();
    for (i, h) in clients.into_iter().enumerate() {
        let r = join(h, &format!("client {i}"));
        assert_full_blob(&format!("client {i}"), &r, &blob);
    }
    let gets: Vec<_> = s
        .fake
        .requests()
        .into_iter()
        .filter(|r| r.method == "GET" && r.path == blob.path)
        .collect();
    assert_eq!(gets.len(), 2, "{}", s.fake.describe_requests());
    assert_eq!(gets[0].header("Range"), None);
    assert_eq!(
        gets[1].header("Range"),
        Some(&*format!("bytes={}-", size / 2))
    );
    assert_committed(&s.root(), &blob, "after the resumed fill");
}

#[test]
fn corrupted_fill_is_never_committed() {
    let size = (1 << 20) + 13;
    failed_fill_case("corrupted", size, 1, |g| {
        Serve::ok()
            .slow(64 << 10, ms(2))
            .pause_at(256 << 10, g)
            .corrupt_at(size * 3 / 4)
    });
}

/// The same without a Content-Length from upstream (chunked): the client
/// cannot count bytes, so the failure must show as a body that never ends
/// properly (no final chunk), never as a clean end.
#[test]
fn chunked_truncated_and_corrupted_fills_are_never_committed() {
    let size = (1 << 20) + 13;
    failed_fill_case("chunked, truncated", size, 1, |g| {
        Serve::ok()
            .chunked()
            .slow(64 << 10, ms(2))
            .pause_at(256 << 10, g)
            .truncate_after(size / 2)
    });
    failed_fill_case("chunked, corrupted", size, 1, |g| {
        Serve::ok()
            .chunked()
            .slow(64 << 10, ms(2))
            .pause_at(256 << 10, g)
            .corrupt_at(size - 1)
    });
}

/// Upstream errors before any byte: 404 reaches clients as 404
/// BLOB_UNKNOWN, 500 as a 5xx registry error, 429 as 429 TOOMANYREQUESTS
/// with the upstream's Retry-After; concurrent clients of a failing fill all
/// get the error; nothing is committed and the next request goes upstream
/// again.
#[test]
fn upstream_error_status_reaches_clients_as_registry_errors() {
    let s = Setup::start();
    let cache = s.cache();

    // 404: a blob the upstream does not have.
    let missing = format!("sha256:{}", "ab".repeat(32));
    let path = format!("/v2/{PREFIX}/org/img/blobs/{missing}");
    for method in ["GET", "HEAD"] {
        let r = http(&cache, method, &path, &[]).unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        assert_eq!(r.status, 404, "{method} unknown blob: {}", r.describe());
        if method == "GET" {
            assert_eq!(
                r.error_codes(),
                ["BLOB_UNKNOWN"],
                "GET unknown blob: {}",
                r.describe()
            );
        }
    }

    // 500 once, then fine.
    let blob = s.fake.add_blob("org/img", &random_bytes(300_000));
    let path = blob.path_via(PREFIX);
    s.fake.once(&blob.path, Serve::status(500).only("GET"));
    let r = get_with(&cache, &path, &[]);
    assert!(
        r.status >= 500 && r.status < 600 && !r.error_codes().is_empty(),
        "upstream 500: expected a 5xx registry error JSON, got {}",
        r.describe()
    );
    assert!(
        !blob_file(&s.root(), &blob.digest).exists(),
        "committed after an upstream 500"
    );
    let r = get_with(&cache, &path, &[]);
    assert_eq!(r.status, 200, "GET after a 500: {}", r.describe());
    assert_eq!(sha256_digest(&r.body), blob.digest);
    assert_eq!(
        s.fake.count("GET", &blob.path),
        2,
        "after an upstream 500 the next request must go upstream again\n{}",
        s.fake.describe_requests()
    );

    // 429 with Retry-After once: passed on, respected (nothing asked
    // upstream before it is over), then fine.
    let blob = s.fake.add_blob("org/img", &random_bytes(200_000));
    let path = blob.path_via(PREFIX);
    s.fake.once(
        &blob.path,
        Serve::status(429).only("GET").header("Retry-After", "1"),
    );
    let r = get_with(&cache, &path, &[]);
    assert_eq!(r.status, 429, "upstream 429: {}", r.describe());
    assert_eq!(
        r.error_codes(),
        ["TOOMANYREQUESTS"],
        "upstream 429: {}",
        r.describe()
    );
    assert_eq!(
        r.header("Retry-After"),
        Some("1"),
        "upstream 429: Retry-After not passed on: {}",
        r.describe()
    );
    let asked = s.fake.count("GET", &blob.path);
    let r = get_with(&cache, &path, &[]);
    assert_eq!(r.status, 429, "GET within Retry-After: {}", r.describe());
    assert_eq!(
        s.fake.count("GET", &blob.path),
        asked,
        "asked upstream within Retry-After"
    );
    std::thread::sleep(Duration::from_millis(1100));
    let r = get_with(&cache, &path, &[]);
    assert_eq!(r.status, 200, "GET after Retry-After: {}", r.describe());
    assert_eq!(sha256_digest(&r.body), blob.digest);

    // A slow 500 with three clients waiting on it: all three get the error.
    let blob = s.fake.add_blob("org/img", &random_bytes(100_000));
    let path = blob.path_via(PREFIX);
    s.fake.set(&blob.path, Serve::status(500).delay(ms(400)));
    let (tx, _rx) = mpsc::channel();
    let clients: Vec<_> = (0..3)
        .map(|_| client(&cache, "GET", &path, vec![], tx.clone()))
        .collect();
    for (i, h) in clients.into_iter().enumerate() {
        let r = join(h, &format!("slow 500, client {i}"));
        assert!(
            r.status >= 500 && !ClientResult::error_codes(&r.body.bytes).is_empty(),
            "slow upstream 500, client {i}: expected a 5xx registry error, got {}",
            r.describe()
        );
    }
    s.fake.set(&blob.path, Serve::ok());
    let r = get_with(&cache, &path, &[]);
    assert_eq!(
        r.status,
        200,
        "GET once upstream recovered: {}",
        r.describe()
    );
    assert_eq!(sha256_digest(&r.body), blob.digest);
    wait_tmp_empty(&s.root(), "after the upstream errors");
}

// ---------------------------------------------------------------------------
// Range and HEAD
// ---------------------------------------------------------------------------

/// Checks a 206 answer for `range` against the expected `start..=last` of
/// `blob`.
fn assert_partial(what: &str, r: &ClientResult, blob: &FakeBlob, start: usize, last: usize) {
    let total = blob.len();
    assert_eq!(r.status, 206, "{what}: {}", r.describe());
    assert!(r.body.complete(), "{what}: {}", r.describe());
    assert_eq!(
        r.header("Content-Range"),
        Some(format!("bytes {start}-{last}/{total}").as_str()),
        "{what}: {}",
        r.describe()
    );
    assert_eq!(
        r.header("Content-Length"),
        Some((last + 1 - start).to_string().as_str()),
        "{what}: {}",
        r.describe()
    );
    assert!(
        r.body.bytes[..] == blob.data[start..=last],
        "{what}: body is not bytes {start}..={last} of the blob ({} bytes received)",
        r.body.bytes.len()
    );
}

fn range_get(cache: &str, path: &str, range: &str) -> ClientResult {
    let (tx, _rx) = mpsc::channel();
    join(
        client(cache, "GET", path, vec![("Range", range.to_owned())], tx),
        &format!("GET {path} Range {range}"),
    )
}

/// Every single-range form on a cached blob: `N-`, `N-M` (also past the
/// end), suffix `-N` (also longer than the blob), and 416 with
/// `Content-Range: bytes */size` when nothing can be served.
#[test]
fn range_requests_on_a_cached_blob() {
    let s = Setup::start();
    let blob = s.fake.add_blob("org/img", &random_bytes(100_007));
    let path = blob.path_via(PREFIX);
    let cache = s.cache();
    let warm = get_with(&cache, &path, &[]);
    assert_eq!(warm.status, 200, "warming GET: {}", warm.describe());
    assert_eq!(sha256_digest(&warm.body), blob.digest);
    assert_committed(&s.root(), &blob, "after the warming GET");
    let l = blob.len();

    let cases: [(String, usize, usize); 7] = [
        ("bytes=0-".into(), 0, l - 1),
        ("bytes=1000-".into(), 1000, l - 1),
        ("bytes=10-99".into(), 10, 99),
        ("bytes=0-0".into(), 0, 0),
        (format!("bytes={}-{}", l - 10, l + 5000), l - 10, l - 1),
        ("bytes=-500".into(), l - 500, l - 1),
        (format!("bytes=-{}", l + 10), 0, l - 1),
    ];
    for (range, start, last) in &cases {
        let r = range_get(&cache, &path, range);
        let what = format!("cached blob, Range {range}");
        assert_partial(&what, &r, &blob, *start, *last);
        assert_eq!(r.header("X-Cache"), Some("HIT"), "{what}: {}", r.describe());
        assert_eq!(
            r.header("Docker-Content-Digest"),
            Some(blob.digest.as_str()),
            "{what}: {}",
            r.describe()
        );
    }
    for range in [
        format!("bytes={l}-"),
        format!("bytes={}-{}", l + 100, l + 200),
    ] {
        let r = range_get(&cache, &path, &range);
        assert_eq!(
            r.status,
            416,
            "cached blob, Range {range}: {}",
            r.describe()
        );
        assert_eq!(
            r.header("Content-Range"),
            Some(format!("bytes */{l}").as_str()),
            "cached blob, Range {range}: {}",
            r.describe()
        );
    }
    let full = get_with(&cache, &path, &[]);
    assert_eq!(
        full.header("Accept-Ranges"),
        Some("bytes"),
        "full GET: {}",
        full.describe()
    );
    assert_eq!(
        s.fake.count("GET", &blob.path),
        1,
        "ranges on a cached blob must not go upstream\n{}",
        s.fake.describe_requests()
    );
}

/// Ranges that start beyond what a fill has received so far: the upstream
/// holds the body at 256 KiB while `N-`, `N-M` and a suffix range arrive;
/// each gets 206 with the right Content-Range and bytes once they exist,
/// from the same single upstream GET (X-Cache: MISS, not a later disk hit).
#[test]
fn range_requests_attach_to_an_in_flight_fill() {
    let s = Setup::start();
    let cache = s.cache();
    let l = (2 << 20) + 3;
    let (blob, gate, _open) = s.held_blob(l, Serve::ok().slow(64 << 10, ms(2)), 256 << 10);
    let path = blob.path_via(PREFIX);

    let (tx, rx) = mpsc::channel();
    let first = client(&cache, "GET", &path, vec![], tx.clone());
    s.wait_held(&gate);
    let n = 1 << 20;
    let ranges = [
        (format!("bytes={n}-"), n, l - 1),
        (
            format!("bytes={}-{}", n + 5, (3 << 19) - 1),
            n + 5,
            (3 << 19) - 1,
        ),
        ("bytes=-300000".to_owned(), l - 300_000, l - 1),
    ];
    let partials: Vec<_> = ranges
        .iter()
        .map(|(range, _, _)| {
            client(
                &cache,
                "GET",
                &path,
                vec![("Range", range.clone())],
                tx.clone(),
            )
        })
        .collect();
    // Headers may come at once or only once bytes exist; either way give the
    // range requests time to reach the fill before letting it go on.
    let attached = wait_headers(&rx, 4, Duration::from_secs(3));
    gate.open();

    let first = join(first, "first GET");
    assert_full_blob("first GET (starts the fill)", &first, &blob);
    for ((range, start, last), h) in ranges.iter().zip(partials) {
        let what = format!("in-flight fill, Range {range}");
        let r = join(h, &what);
        assert_partial(&what, &r, &blob, *start, *last);
        assert_eq!(
            r.header("X-Cache"),
            Some("MISS"),
            "{what}: expected to be served from the fill in flight: {}",
            r.describe()
        );
    }
    assert_eq!(
        s.fake.count("GET", &blob.path),
        1,
        "ranges during a fill must not start another upstream GET\n{}",
        s.fake.describe_requests()
    );
    // Those with headers while the fill was held were certainly followed.
    assert!(
        followed(&cache) >= attached as f64,
        "the whole and the ranges attached mid-fill, each read from the spool by the front"
    );
}

/// `bytes=N-` during a fill whose upstream sent no Content-Length: the size
/// is not known yet, so a correct answer is either the whole blob (200, the
/// Range ignored, as RFC 9110 allows) or a 206 that carries a Content-Range
/// (a 206 without one is invalid, RFC 9110 §15.3.7) with the right bytes.
#[test]
fn range_on_an_in_flight_fill_without_content_length() {
    let s = Setup::start();
    let cache = s.cache();
    let l = (1 << 20) + 3;
    let serve = Serve::ok().chunked().slow(64 << 10, ms(2));
    let (blob, gate, _open) = s.held_blob(l, serve, 256 << 10);
    let path = blob.path_via(PREFIX);
    let (tx, rx) = mpsc::channel();
    let first = client(&cache, "GET", &path, vec![], tx.clone());
    s.wait_held(&gate);
    let n = 600_000;
    let range = format!("bytes={n}-");
    let partial = client(&cache, "GET", &path, vec![("Range", range.clone())], tx);
    let _ = wait_headers(&rx, 2, Duration::from_secs(3));
    gate.open();

    let first = join(first, "first GET");
    assert_eq!(first.status, 200, "first GET: {}", first.describe());
    assert!(first.body.complete(), "first GET: {}", first.describe());
    assert_eq!(
        sha256_digest(&first.body.bytes),
        blob.digest,
        "first GET: wrong bytes"
    );
    let what = format!("chunked in-flight fill, Range {range}");
    let r = join(partial, &what);
    assert!(r.body.complete(), "{what}: {}", r.describe());
    match r.status {
        200 => assert_eq!(
            sha256_digest(&r.body.bytes),
            blob.digest,
            "{what}: 200 with wrong bytes"
        ),
        206 => {
            let body_ok = r.body.bytes.get(..) == blob.data.get(n..);
            let cr = r.header("Content-Range").unwrap_or_else(|| {
                panic!(
                    "{what}: 206 without Content-Range (RFC 9110 §15.3.7 requires it); \
                     body is bytes {n}.. of the blob: {body_ok}; {}\n{}",
                    r.describe(),
                    s.fake.describe_requests()
                )
            });
            assert!(
                cr == format!("bytes {n}-{}/{l}", l - 1) || cr == format!("bytes {n}-{}/*", l - 1),
                "{what}: Content-Range {cr:?}: {}",
                r.describe()
            );
            assert!(
                r.body.bytes[..] == blob.data[n..],
                "{what}: body is not bytes {n}.. of the blob"
            );
        }
        _ => panic!("{what}: expected 200 or 206, got {}", r.describe()),
    }
    assert_eq!(
        s.fake.count("GET", &blob.path),
        1,
        "{what}: one upstream GET expected\n{}",
        s.fake.describe_requests()
    );
}

/// HEAD on a cold blob answers its size from an upstream HEAD and never
/// downloads it; HEAD during a fill answers the size without a second GET.
#[test]
fn head_on_a_cold_blob_never_gets_it() {
    let s = Setup::start();
    let cache = s.cache();
    let blob = s.fake.add_blob("org/img", &random_bytes(1_234_567));
    let path = blob.path_via(PREFIX);
    for round in ["first", "second"] {
        let r = http(&cache, "HEAD", &path, &[]).unwrap_or_else(|e| panic!("HEAD {path}: {e}"));
        assert_eq!(
            r.status,
            200,
            "{round} HEAD on a cold blob: {}",
            r.describe()
        );
        assert_eq!(
            r.header("Content-Length"),
            Some(blob.len().to_string().as_str()),
            "{round} HEAD on a cold blob: {}",
            r.describe()
        );
        assert_eq!(
            r.header("Docker-Content-Digest"),
            Some(blob.digest.as_str()),
            "{round} HEAD on a cold blob: {}",
            r.describe()
        );
    }
    assert_eq!(
        s.fake.count("GET", &blob.path),
        0,
        "HEAD on a cold blob must not GET it upstream\n{}",
        s.fake.describe_requests()
    );
    assert!(
        s.fake.count("HEAD", &blob.path) >= 1,
        "HEAD on a cold blob: no upstream HEAD?\n{}",
        s.fake.describe_requests()
    );
    assert!(
        !blob_file(&s.root(), &blob.digest).exists(),
        "a HEAD stored the blob"
    );

    // During a fill.
    let (other, gate, _open) = s.held_blob(900_001, Serve::ok(), 100_000);
    let other_path = other.path_via(PREFIX);
    let (tx, _rx) = mpsc::channel();
    let filling = client(&cache, "GET", &other_path, vec![], tx);
    s.wait_held(&gate);
    let r = http(&cache, "HEAD", &other_path, &[])
        .unwrap_or_else(|e| panic!("HEAD {other_path} during its fill: {e}"));
    gate.open();
    assert_eq!(r.status, 200, "HEAD during a fill: {}", r.describe());
    assert_eq!(
        r.header("Content-Length"),
        Some(other.len().to_string().as_str()),
        "HEAD during a fill: {}",
        r.describe()
    );
    assert_full_blob("GET that started the fill", &join(filling, "fill"), &other);
    assert_eq!(
        s.fake.count("GET", &other.path),
        1,
        "HEAD during a fill must not GET again\n{}",
        s.fake.describe_requests()
    );
}

// ---------------------------------------------------------------------------
// clients
// ---------------------------------------------------------------------------

/// skopeo copies an image through regcache from the fake upstream, byte for
/// byte; and a download cut after N bytes resumes with `Range: bytes=N-`,
/// the two parts hashing to the digest.
#[test]
fn skopeo_copy_and_resumed_download() {
    let s = Setup::start();
    let cache = s.cache();
    let image = s.fake.add_image("org/img", "1.0", &[(1 << 20) + 5, 30_000]);
    let work = temp_dir("regcache-cache-");
    let dest = work.path().join("copy");
    skopeo_copy(&format!("{cache}/{PREFIX}/org/img:1.0"), &dest, false)
        .unwrap_or_else(|e| panic!("{e}\n{}", s.fake.describe_requests()));
    let copy = read_dir_copy(&dest);
    assert_eq!(
        copy.manifest_digest, image.manifest_digest,
        "manifest digest"
    );
    assert_eq!(copy.manifest, image.manifest, "manifest bytes");
    assert_eq!(copy.layer_digests(), image.layer_digests, "layers");
    for d in image.blob_digests() {
        assert!(copy.has_blob(&d), "blob {d} missing from the copy");
    }

    // Resume: cut a cold download after n bytes, then ask for the rest.
    let blob = s.fake.add_blob("org/img", &random_bytes((2 << 20) + 11));
    s.fake.set(&blob.path, Serve::ok().slow(64 << 10, ms(5)));
    let path = blob.path_via(PREFIX);
    let n = 700_001;
    let mut r = http_open(&cache, "GET", &path, &[]).unwrap_or_else(|e| panic!("GET {path}: {e}"));
    assert_eq!(r.status, 200, "GET {path}: {}", r.describe());
    let head = r.read_some(n).expect("read the first part");
    assert_eq!(head.len(), n, "short first part");
    drop(r);
    let rest = range_get(&cache, &path, &format!("bytes={n}-"));
    assert_partial("resumed download", &rest, &blob, n, blob.len() - 1);
    let mut whole = head;
    whole.extend_from_slice(&rest.body.bytes);
    assert_eq!(
        sha256_digest(&whole),
        blob.digest,
        "the cut download and its resumption do not hash to the digest"
    );
    assert_eq!(
        s.fake.count("GET", &blob.path),
        1,
        "the cut and the resumption share one upstream GET\n{}",
        s.fake.describe_requests()
    );
}

/// Upstream economy: within the tag freshness window a warm pull makes no
/// upstream request at all; once the window (1 s here) has passed, a pull
/// makes exactly one: a HEAD of the tag's manifest.
#[test]
fn warm_pulls_spare_the_upstream() {
    let fake = FakeRegistry::start();
    let image = fake.add_image("org/img", "1.0", &[200_000, 3_000]);
    let storage_parent = temp_dir("regcache-storage-");
    let storage = storage_parent.path().join("storage");
    let config = Setup::config(&fake);
    let work = temp_dir("regcache-cache-");
    let pull = |cache: &str, label: &str| {
        let dest = work.path().join(label);
        skopeo_copy(&format!("{cache}/{PREFIX}/org/img:1.0"), &dest, false)
            .unwrap_or_else(|e| panic!("{label}: {e}\n{}", fake.describe_requests()));
        let copy = read_dir_copy(&dest);
        assert_eq!(
            copy.manifest_digest, image.manifest_digest,
            "{label}: manifest"
        );
    };

    // Default freshness (60 s).
    let mut rc = Regcache::start(&config, &storage);
    pull(rc.addr(), "cold");
    let mark = fake.request_count();
    pull(rc.addr(), "warm");
    let warm = fake.requests_since(mark);
    assert!(
        warm.is_empty(),
        "a warm pull within the freshness window went upstream:\n{}",
        describe(&warm)
    );
    let st = rc.stop();
    assert!(st.success(), "regcache exited with {st} on SIGTERM");
    drop(rc);

    // Same storage, 1 s freshness, and the tag older than that.
    let rc = Regcache::start_with_env(&config, &storage, &[("REGCACHE_TAG_FRESHNESS", "1s")]);
    std::thread::sleep(Duration::from_millis(1200));
    let mark = fake.request_count();
    pull(rc.addr(), "stale-tag");
    let stale = fake.requests_since(mark);
    let summary: Vec<String> = stale.iter().map(|r| r.to_string()).collect();
    assert_eq!(
        summary,
        ["HEAD /v2/org/img/manifests/1.0"],
        "a pull after the freshness window: exactly one upstream HEAD of the tag expected\n{}",
        describe(&stale)
    );
}

/// No HTTP compression anywhere: a client asking `Accept-Encoding: gzip`
/// gets the stored bytes unchanged (no Content-Encoding), cold and warm,
/// for a blob and a manifest; and regcache does not ask the upstream for
/// compressed bodies either (digests cover the raw bytes).
#[test]
fn accept_encoding_gzip_leaves_bytes_unchanged() {
    let s = Setup::start();
    let cache = s.cache();
    // Very compressible: a compressing server would be tempted.
    let blob = s.fake.add_blob("org/img", &vec![b'a'; 400_000]);
    let image = s.fake.add_image("org/img", "1.0", &[10_000]);
    let accept = [("Accept-Encoding", "gzip"), ("Accept", MANIFEST_ACCEPT)];
    for round in ["cold", "warm"] {
        let r = get_with(&cache, &blob.path_via(PREFIX), &accept);
        assert_eq!(r.status, 200, "{round} blob: {}", r.describe());
        assert!(
            r.header("Content-Encoding").is_none_or(|e| e == "identity"),
            "{round} blob: compressed: {}",
            r.describe()
        );
        assert_eq!(r.body.len(), blob.len(), "{round} blob: length changed");
        assert_eq!(
            sha256_digest(&r.body),
            blob.digest,
            "{round} blob: bytes changed"
        );

        let path = format!("/v2/{PREFIX}/org/img/manifests/1.0");
        let r = get_with(&cache, &path, &accept);
        assert_eq!(r.status, 200, "{round} manifest: {}", r.describe());
        assert!(
            r.header("Content-Encoding").is_none_or(|e| e == "identity"),
            "{round} manifest: compressed: {}",
            r.describe()
        );
        assert_eq!(r.body, image.manifest, "{round} manifest: bytes changed");
    }
    let asked: Vec<String> = s
        .fake
        .requests()
        .iter()
        .filter(|r| {
            r.header("Accept-Encoding").is_some_and(|e| {
                let e = e.to_ascii_lowercase();
                e.contains("gzip")
                    || e.contains("br")
                    || e.contains("zstd")
                    || e.contains("deflate")
            })
        })
        .map(|r| {
            format!(
                "{r} (Accept-Encoding: {})",
                r.header("Accept-Encoding").unwrap()
            )
        })
        .collect();
    assert!(
        asked.is_empty(),
        "regcache asked the upstream for compressed bodies: {asked:?}"
    );
}

// ---------------------------------------------------------------------------
// the fake itself
// ---------------------------------------------------------------------------

/// The fake upstream's knobs do what they say, checked directly (no
/// regcache), so that a regcache test passing against them means something.
#[test]
fn fake_upstream_knobs_do_what_they_say() {
    let fake = FakeRegistry::start();
    let addr = fake.addr();
    let blob = fake.add_blob("org/img", &random_bytes(300_000));
    let open = |headers: &[(&str, &str)]| {
        let mut r = http_open(&addr, "GET", &blob.path, headers).expect("GET from the fake");
        let body = r.read_rest();
        (r, body)
    };

    let (r, body) = open(&[("X-Probe", "1")]);
    assert_eq!(r.status, 200);
    assert!(body.complete());
    assert_eq!(sha256_digest(&body.bytes), blob.digest);
    assert_eq!(
        r.header("Docker-Content-Digest"),
        Some(blob.digest.as_str())
    );
    let h = http(&addr, "HEAD", &blob.path, &[]).unwrap();
    assert_eq!(h.header("Content-Length"), Some("300000"));
    assert!(h.body.is_empty());
    assert_eq!(fake.count("GET", &blob.path), 1);
    assert_eq!(fake.count("HEAD", &blob.path), 1);
    let recorded = fake.requests();
    assert_eq!(recorded[0].header("x-probe"), Some("1"), "headers recorded");

    // once(...).only("GET"): a HEAD does not use it up.
    fake.once(&blob.path, Serve::ok().only("GET").truncate_after(1000));
    assert_eq!(http(&addr, "HEAD", &blob.path, &[]).unwrap().status, 200);
    let (r, body) = open(&[]);
    assert_eq!(r.content_length(), Some(300_000), "full length announced");
    assert!(!body.complete(), "truncated body reads as complete");
    assert_eq!(body.bytes[..], blob.data[..1000]);

    fake.once(&blob.path, Serve::ok().corrupt_at(10));
    let (_, body) = open(&[]);
    assert!(body.complete());
    assert_eq!(body.bytes.len(), blob.len());
    let differ: Vec<usize> = (0..blob.len())
        .filter(|&i| body.bytes[i] != blob.data[i])
        .collect();
    assert_eq!(differ, [10], "corrupt_at changes exactly that byte");

    fake.once(&blob.path, Serve::ok().chunked().slow(7_000, ms(1)));
    let (r, body) = open(&[]);
    assert_eq!(r.header("Transfer-Encoding"), Some("chunked"));
    assert_eq!(r.content_length(), None);
    assert!(body.complete());
    assert_eq!(sha256_digest(&body.bytes), blob.digest);

    fake.once(&blob.path, Serve::ok().chunked().truncate_after(5000));
    let (_, body) = open(&[]);
    assert!(!body.complete(), "truncated chunked body reads as complete");
    assert_eq!(body.bytes[..], blob.data[..5000]);

    fake.once(&blob.path, Serve::status(429).header("Retry-After", "3"));
    let r = get_with(&addr, &blob.path, &[]);
    assert_eq!(r.status, 429);
    assert_eq!(r.header("Retry-After"), Some("3"));
    assert_eq!(r.error_codes(), ["TOOMANYREQUESTS"]);
    assert_eq!(
        get_with(&addr, &blob.path, &[]).status,
        200,
        "once means once"
    );

    let r = get_with(
        &addr,
        &format!("/v2/org/img/blobs/sha256:{}", "0".repeat(64)),
        &[],
    );
    assert_eq!(
        (r.status, r.error_codes()),
        (404, vec!["BLOB_UNKNOWN".to_owned()])
    );

    // A gate holds the body at its offset until opened.
    let gate = Gate::new();
    fake.once(&blob.path, Serve::ok().pause_at(100_000, &gate));
    let mut r = http_open(&addr, "GET", &blob.path, &[]).unwrap();
    assert!(gate.wait_reached(1, Duration::from_secs(5)));
    let first = r.read_some(100_000).unwrap();
    assert_eq!(first[..], blob.data[..100_000]);
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let b = r.read_some(1).map(|b| b.len());
        let _ = tx.send(());
        (b, r.read_rest())
    });
    assert!(
        rx.recv_timeout(Duration::from_millis(300)).is_err(),
        "a byte past the gate arrived before it opened"
    );
    gate.open();
    let (one, rest) = reader.join().unwrap();
    assert_eq!(one.unwrap(), 1);
    assert!(rest.complete());
    assert_eq!(rest.bytes.len(), blob.len() - 100_001);

    // Keep-alive: two requests on one connection.
    use std::io::{BufRead, BufReader, Read, Write};
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut reader = BufReader::new(s.try_clone().unwrap());
    for _ in 0..2 {
        write!(s, "GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert!(line.starts_with("HTTP/1.1 200"), "{line:?}");
        let mut len = 0;
        loop {
            let mut h = String::new();
            reader.read_line(&mut h).unwrap();
            if h.trim().is_empty() {
                break;
            }
            if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
                len = v.trim().parse().unwrap();
            }
        }
        let mut body = vec![0; len];
        reader.read_exact(&mut body).unwrap();
        assert_eq!(body, b"{}");
    }
}

/// Clients asking for one manifest at once share one upstream exchange: 8
/// by tag and 4 by digest, all cold, make one GET of the tag (a tag never
/// seen is fetched at once, no HEAD first) and one GET of the digest.
#[test]
fn concurrent_manifest_requests_share_one_upstream_exchange() {
    let s = Setup::start();
    let image = s.fake.add_image("org/m", "1", &[1_000]);
    let by_tag = "/v2/org/m/manifests/1".to_string();
    let by_digest = format!("/v2/org/m/manifests/{}", image.manifest_digest);
    // Slow answers, so that every client arrives while the first exchange runs.
    s.fake.set(&by_tag, Serve::ok().delay(ms(400)));
    s.fake.set(&by_digest, Serve::ok().delay(ms(400)));
    let (tx, rx) = mpsc::channel();
    let accept = vec![(
        "Accept",
        "application/vnd.oci.image.manifest.v1+json".to_string(),
    )];
    let clients: Vec<_> = (0..12)
        .map(|i| {
            let reference = if i < 8 {
                "1".to_string()
            } else {
                image.manifest_digest.clone()
            };
            let path = format!("/v2/{PREFIX}/org/m/manifests/{reference}");
            client(&s.cache(), "GET", &path, accept.clone(), tx.clone())
        })
        .collect();
    for (i, h) in clients.into_iter().enumerate() {
        let r = join(h, &format!("client {i}"));
        assert_eq!(r.status, 200, "client {i}");
        assert!(r.body.complete(), "client {i}: {}", r.describe());
        assert_eq!(
            sha256_digest(&r.body.bytes),
            image.manifest_digest,
            "client {i}"
        );
    }
    drop(rx);
    let requests = s.fake.describe_requests();
    assert_eq!(
        s.fake.count("HEAD", &by_tag),
        0,
        "HEADs of the tag:\n{requests}"
    );
    assert_eq!(
        s.fake.count("GET", &by_tag),
        1,
        "GETs of the tag:\n{requests}"
    );
    assert_eq!(
        s.fake.count("GET", &by_digest),
        1,
        "GETs of the digest:\n{requests}"
    );
}

/// A blob cached for one repository is not served under another that the
/// upstream does not grant it, neither by the front nor by the worker: the
/// worker asks upstream (one HEAD) and passes on its 404.
#[test]
fn a_cached_blob_is_not_served_under_a_repository_upstream_refuses() {
    let s = Setup::start();
    let blob = s.fake.add_blob("org/private", &random_bytes(300_000));
    let r = get_with(&s.cache(), &blob.path_via(PREFIX), &[]);
    assert_eq!(r.status, 200, "{}", r.describe());
    let elsewhere = format!("/v2/{PREFIX}/org/other/blobs/{}", blob.digest);
    for method in ["GET", "HEAD"] {
        let r = http(&s.cache(), method, &elsewhere, &[]).unwrap();
        assert_eq!(r.status, 404, "{method} {elsewhere}: {}", r.describe());
        if method == "GET" {
            assert_eq!(r.error_codes(), ["BLOB_UNKNOWN"], "{}", r.describe());
        }
    }
    let asked = format!("/v2/org/other/blobs/{}", blob.digest);
    assert_eq!(
        s.fake.count("GET", &asked),
        0,
        "{}",
        s.fake.describe_requests()
    );
    assert!(
        s.fake.count("HEAD", &asked) >= 1,
        "{}",
        s.fake.describe_requests()
    );
    // The repository that has it: from cache, the front answering.
    let r = get_with(&s.cache(), &blob.path_via(PREFIX), &[]);
    assert_eq!(
        (r.status, r.header("X-Cache")),
        (200, Some("HIT")),
        "{}",
        r.describe()
    );
    assert_eq!(s.fake.count("GET", &blob.path), 1);
}
