//! End-to-end tests of the worker's upstream authentication (PROTOCOL.md
//! section 2) against in-process fakes ([`support::fake`]): a token server on
//! its own port (the realm, as `auth.docker.io` is for Docker Hub), a
//! registry that accepts only `Bearer` tokens that server issued for the
//! repository's scope and challenges otherwise, and CDN hosts that blob
//! redirects point to.
//!
//! Assertions are on what the fakes received (which request carried which
//! `Authorization`, how many token requests with which query), not only on
//! what the client got. Overlaps are made certain with gates, never sleeps;
//! the only sleeps let a tag's freshness window or a token's lifetime pass.
//!
//! Run: `cargo test --test upstream_auth -- --test-threads=2`
//! Needs: skopeo on PATH (one pull).

use regcache_testkit as support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::fake::{FakeBlob, FakeRegistry, Gate, Recorded, Reply, Serve, BLOB_MEDIA_TYPE};
use support::*;

/// The alias the fake registry is reached by through regcache.
const PREFIX: &str = "fake.test";
/// Credentials the token servers accept.
const USER: &str = "puller";
const PASS: &str = "upstream-Pa55-7f3c1e";
/// A password the token servers refuse.
const WRONG_PASS: &str = "wrong-Pa55-91d2aa";
/// The `service` the registry's token server expects by default.
const SERVICE: &str = "fake-registry";
/// Every issued token starts with this (and must never reach a log).
const TOKEN_PREFIX: &str = "tkn-";

// ---------------------------------------------------------------------------
// small helpers
// ---------------------------------------------------------------------------

/// `Basic base64(user:pass)`.
fn basic(user: &str, pass: &str) -> String {
    format!(
        "Basic {}",
        base64_encode(format!("{user}:{pass}").as_bytes())
    )
}

/// `application/x-www-form-urlencoded` decoding (`+` is a space).
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b'%' => {
                let byte = b
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match byte {
                    Some(v) => {
                        out.push(v);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A query string as decoded (key, value) pairs, repeats kept.
fn query_pairs(query: Option<&str>) -> Vec<(String, String)> {
    query
        .unwrap_or("")
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

/// Every value of `key` in `pairs`.
fn values(pairs: &[(String, String)], key: &str) -> Vec<String> {
    pairs
        .iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v.clone())
        .collect()
}

/// The repository a registry path names: `/v2/<name>/blobs/...` -> `<name>`.
fn repo_of(path: &str) -> Option<String> {
    let rest = path.strip_prefix("/v2/")?;
    ["/manifests/", "/blobs/", "/tags/", "/referrers/"]
        .iter()
        .filter_map(|m| rest.rfind(m))
        .max()
        .map(|i| rest[..i].to_owned())
}

/// Requests with their `Authorization`, one per line, for assertion messages.
fn describe_auth(what: &str, requests: &[Recorded]) -> String {
    if requests.is_empty() {
        return format!("{what} saw no requests");
    }
    let lines: Vec<String> = requests
        .iter()
        .map(|r| {
            format!(
                "  {r}  [Authorization: {}]",
                r.header("Authorization").unwrap_or("-")
            )
        })
        .collect();
    format!("{what} saw:\n{}", lines.join("\n"))
}

/// The `Authorization` a request carried.
fn auth(r: &Recorded) -> Option<&str> {
    r.header("Authorization")
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// Opens `gate` when dropped, so that a failing test never leaves a held
/// response (and regcache behind it) waiting.
struct OpenOnDrop(Gate);

impl Drop for OpenOnDrop {
    fn drop(&mut self) {
        self.0.open();
    }
}

// ---------------------------------------------------------------------------
// the token server
// ---------------------------------------------------------------------------

/// How a token server answers.
#[derive(Clone)]
struct TokenOpts {
    /// The `service` it expects (and the registry's challenge names);
    /// `None`: it expects no `service` parameter at all (Forgejo).
    service: Option<&'static str>,
    /// The JSON field the token goes in: `token` or `access_token`.
    field: &'static str,
    /// `expires_in`, when sent.
    expires_in: Option<u64>,
    /// Hold every token response's body at this gate.
    hold: Option<Gate>,
}

impl Default for TokenOpts {
    fn default() -> Self {
        TokenOpts {
            service: Some(SERVICE),
            field: "token",
            expires_in: Some(300),
            hold: None,
        }
    }
}

/// A token the server handed out.
#[derive(Debug, Clone)]
struct Issued {
    value: String,
    scopes: Vec<String>,
    /// Issued to valid credentials (else anonymously).
    authenticated: bool,
}

/// A token endpoint (`GET /token`) on its own fake, as distribution's token
/// spec has it: `service` must be what it expects, `scope`s are granted as
/// asked, no `Authorization` gets an anonymous token, `Basic` with
/// [`USER`]/[`PASS`] an authenticated one, any other `Authorization` a 401.
struct TokenServer {
    fake: FakeRegistry,
    issued: Arc<Mutex<Vec<Issued>>>,
    service: Option<&'static str>,
}

impl TokenServer {
    fn start(opts: TokenOpts) -> TokenServer {
        let fake = FakeRegistry::start();
        let issued = Arc::new(Mutex::new(Vec::new()));
        let service = opts.service;
        let ledger = issued.clone();
        fake.intercept(move |r| Some(token_reply(r, &opts, &ledger)));
        TokenServer {
            fake,
            issued,
            service,
        }
    }

    /// The realm a challenge names.
    fn realm(&self) -> String {
        format!("{}/token", self.fake.url())
    }

    fn requests(&self) -> Vec<Recorded> {
        self.fake.requests()
    }

    fn issued(&self) -> Vec<Issued> {
        self.issued.lock().unwrap().clone()
    }

    /// The `n`-th token issued (1-based); panics when there is none.
    fn token(&self, n: usize) -> String {
        let issued = self.issued();
        issued
            .get(n - 1)
            .unwrap_or_else(|| {
                panic!(
                    "token server issued {} tokens, no #{n}; {}",
                    issued.len(),
                    describe_auth("token server", &self.requests())
                )
            })
            .value
            .clone()
    }

    fn describe(&self) -> String {
        describe_auth("token server", &self.requests())
    }
}

fn token_reply(r: &Recorded, o: &TokenOpts, ledger: &Mutex<Vec<Issued>>) -> Reply {
    if r.path != "/token" {
        return Reply::error(404, &r.path);
    }
    if r.method != "GET" {
        return Reply::error(405, &r.path);
    }
    let q = query_pairs(r.query.as_deref());
    let services = values(&q, "service");
    let expected: Vec<String> = o.service.iter().map(|s| s.to_string()).collect();
    if services != expected {
        let details = format!("service must be {expected:?}, got {services:?}");
        return Reply::json(400, &serde_json::json!({ "details": details }));
    }
    let scopes: Vec<String> = values(&q, "scope")
        .iter()
        .flat_map(|s| s.split(' ').map(str::to_owned).collect::<Vec<_>>())
        .filter(|s| !s.is_empty())
        .collect();
    let authenticated = match r.header("Authorization") {
        None => false,
        Some(h) if h == basic(USER, PASS) => true,
        Some(_) => {
            return Reply::json(
                401,
                &serde_json::json!({"details": "incorrect username or password"}),
            )
        }
    };
    let mut ledger = ledger.lock().unwrap();
    let value = format!("{TOKEN_PREFIX}{}-{}", ledger.len() + 1, random_token());
    ledger.push(Issued {
        value: value.clone(),
        scopes,
        authenticated,
    });
    let mut body = serde_json::Map::new();
    body.insert(o.field.into(), value.into());
    if let Some(e) = o.expires_in {
        body.insert("expires_in".into(), e.into());
    }
    let reply = Reply::json(200, &serde_json::Value::Object(body));
    match &o.hold {
        Some(g) => reply.serve(Serve::ok().pause_at(0, g)),
        None => reply,
    }
}

// ---------------------------------------------------------------------------
// the registry's door
// ---------------------------------------------------------------------------

/// How a protected registry challenges.
#[derive(Clone, Default)]
struct GuardOpts {
    /// Leave `scope` out of the challenge (Forgejo, `/v2/`).
    no_scope: bool,
    /// Also send `WWW-Authenticate: Basic`, before the Bearer one (Forgejo).
    basic_too: bool,
    /// Repositories that need a token issued to valid credentials.
    private: Vec<&'static str>,
}

/// A handle on a protected registry: revoke tokens mid-pull.
struct Guard {
    revoked: Arc<Mutex<Vec<String>>>,
}

impl Guard {
    /// From now on the registry refuses `token` (401 with a challenge).
    fn revoke(&self, token: &str) {
        self.revoked.lock().unwrap().push(token.to_owned());
    }
}

/// Every `/v2/...` request to `reg` must carry `Bearer <t>` with `t` issued
/// by `tokens` for `repository:<name>:pull` (and to valid credentials for a
/// private repository), else it gets 401 `UNAUTHORIZED` with a challenge
/// naming `tokens`' realm (and service, and scope). Other paths (CDN routes
/// on the same host) are open.
fn protect(reg: &FakeRegistry, tokens: &TokenServer, opts: GuardOpts) -> Guard {
    let realm = tokens.realm();
    let service = tokens.service;
    let ledger = tokens.issued.clone();
    let revoked = Arc::new(Mutex::new(Vec::<String>::new()));
    let refused = revoked.clone();
    reg.intercept(move |r| {
        r.path.strip_prefix("/v2/")?;
        let repo = repo_of(&r.path);
        let scope = repo.as_ref().map(|n| format!("repository:{n}:pull"));
        let accepted = (|| {
            let token = auth(r)?.strip_prefix("Bearer ")?;
            if refused.lock().unwrap().iter().any(|t| t == token) {
                return None;
            }
            let ledger = ledger.lock().unwrap();
            let t = ledger.iter().find(|t| t.value == token)?;
            if let Some(s) = &scope {
                if !t.scopes.contains(s) {
                    return None;
                }
            }
            let private = repo.as_deref().is_some_and(|n| opts.private.contains(&n));
            if private && !t.authenticated {
                return None;
            }
            Some(())
        })();
        if accepted.is_some() {
            return None;
        }
        let mut challenge = format!("Bearer realm=\"{realm}\"");
        if let Some(s) = service {
            challenge.push_str(&format!(",service=\"{s}\""));
        }
        if let (Some(s), false) = (&scope, opts.no_scope) {
            challenge.push_str(&format!(",scope=\"{s}\""));
        }
        let mut reply = Reply::error(401, &r.path);
        if opts.basic_too {
            reply = reply.header("WWW-Authenticate", "Basic realm=\"fake registry\"");
        }
        Some(reply.header("WWW-Authenticate", &challenge))
    });
    Guard { revoked }
}

// ---------------------------------------------------------------------------
// regcache and requests through it
// ---------------------------------------------------------------------------

/// CONFIG for `reg` under [`PREFIX`], with `REGISTRY_PROXY_*` when given.
fn config_for(reg: &FakeRegistry, creds: Option<(&str, &str)>) -> String {
    let mut entry = serde_json::json!({"registry": reg.url(), "aliases": [PREFIX]});
    if let Some((u, p)) = creds {
        entry["variables"] = serde_json::json!({
            "REGISTRY_PROXY_USERNAME": u,
            "REGISTRY_PROXY_PASSWORD": p,
        });
    }
    serde_json::json!([entry]).to_string()
}

/// A regcache in front of `reg` with its own storage (kept alive by the
/// returned directory).
fn start_regcache(
    reg: &FakeRegistry,
    creds: Option<(&str, &str)>,
    env: &[(&str, &str)],
) -> (Regcache, tempfile::TempDir) {
    let storage = temp_dir("regcache-storage-");
    let config = config_for(reg, creds);
    // Read-ahead off: these tests follow upstream's requests one by one.
    let env = [&[("REGCACHE_READ_AHEAD", "0")], env].concat();
    let rc = Regcache::start_with_env(&config, &storage.path().join("storage"), &env);
    (rc, storage)
}

/// `GET` a manifest of `repo` through regcache, accepting every type.
fn get_manifest(cache: &str, repo: &str, reference: &str) -> Response {
    let path = format!("/v2/{PREFIX}/{repo}/manifests/{reference}");
    http(cache, "GET", &path, &[("Accept", MANIFEST_ACCEPT)])
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

/// `GET` a blob of `repo` through regcache.
fn get_blob(cache: &str, repo: &str, digest: &str) -> Response {
    get(cache, &format!("/v2/{PREFIX}/{repo}/blobs/{digest}"))
}

fn assert_manifest(what: &str, r: &Response, image: &ImageParts) {
    assert_eq!(r.status, 200, "{what}: {}", r.describe());
    assert_eq!(r.body, image.manifest, "{what}: manifest bytes");
    assert_eq!(
        r.header("Docker-Content-Digest"),
        Some(image.manifest_digest.as_str()),
        "{what}: {}",
        r.describe()
    );
}

fn assert_blob(what: &str, r: &Response, digest: &str, len: usize) {
    assert_eq!(r.status, 200, "{what}: {}", r.describe());
    assert_eq!(r.body.len(), len, "{what}: body length");
    assert_eq!(
        sha256_digest(&r.body),
        digest,
        "{what}: body does not hash to the blob's digest"
    );
}

/// Asserts one token request: GET /token with exactly this `service` (or
/// none), exactly this one `scope`, and this `Authorization` (or none).
fn assert_token_request(
    r: &Recorded,
    service: Option<&str>,
    scope: &str,
    authorization: Option<&str>,
) {
    assert_eq!(
        (r.method.as_str(), r.path.as_str()),
        ("GET", "/token"),
        "{r}"
    );
    let q = query_pairs(r.query.as_deref());
    let want: Vec<String> = service.iter().map(|s| s.to_string()).collect();
    assert_eq!(values(&q, "service"), want, "service parameter of {r}");
    assert_eq!(values(&q, "scope"), [scope], "scope parameter of {r}");
    assert_eq!(auth(r), authorization, "Authorization on {r}");
}

/// Passwords (plain and base64) and every issued token: none may appear in
/// regcache's log.
fn secrets(token_servers: &[&TokenServer]) -> Vec<String> {
    let mut s = vec![
        PASS.to_owned(),
        WRONG_PASS.to_owned(),
        base64_encode(format!("{USER}:{PASS}").as_bytes()),
        base64_encode(format!("{USER}:{WRONG_PASS}").as_bytes()),
    ];
    for t in token_servers {
        s.extend(t.issued().into_iter().map(|i| i.value));
    }
    s
}

fn assert_log_free_of(rc: &Regcache, secrets: &[String]) {
    let log = std::fs::read_to_string(rc.log_path()).unwrap_or_default();
    for s in secrets {
        let lines: Vec<&str> = log.lines().filter(|l| l.contains(s.as_str())).collect();
        assert!(
            lines.is_empty(),
            "secret {s:?} in regcache's log {}:\n{}",
            rc.log_path().display(),
            lines.join("\n")
        );
    }
}

fn scrape(cache: &str) -> String {
    let r = get(cache, "/metrics");
    assert_eq!(r.status, 200, "GET /metrics: {}", r.describe());
    r.text()
}

// ---------------------------------------------------------------------------
// tests
// ---------------------------------------------------------------------------

/// The helpers the expectations are built with are right.
#[test]
fn helpers_are_sound() {
    assert_eq!(base64_encode(b""), "");
    assert_eq!(base64_encode(b"f"), "Zg==");
    assert_eq!(base64_encode(b"fo"), "Zm8=");
    assert_eq!(base64_encode(b"user:pass"), "dXNlcjpwYXNz");
    assert_eq!(
        query_pairs(Some(
            "service=a+b&scope=repository%3Aorg%2Fimg%3Apull&scope=x&empty="
        )),
        [
            ("service".to_owned(), "a b".to_owned()),
            ("scope".to_owned(), "repository:org/img:pull".to_owned()),
            ("scope".to_owned(), "x".to_owned()),
            ("empty".to_owned(), String::new()),
        ]
    );
    assert_eq!(repo_of("/v2/a/b/blobs/sha256:00").as_deref(), Some("a/b"));
    assert_eq!(repo_of("/v2/").as_deref(), None);
    let text = "# HELP x y\nx{a=\"1\",upstream=\"h:1\"} 2\nx{a=\"2\",upstream=\"h:1\"} 3\nz 1\n";
    assert_eq!(metric(text, "x", &[("upstream", "h:1")]), Some(5.0));
    assert_eq!(metric(text, "x", &[("a", "2")]), Some(3.0));
    assert_eq!(metric(text, "z", &[]), Some(1.0));
    assert_eq!(metric(text, "x", &[("a", "3")]), None);
}

/// Issue test 1. A Bearer challenge whose realm is on another port, with
/// service and scope; the token server checks both and the Basic header
/// (the repository is private: only a token issued to the credentials
/// opens it). A pull (manifest by tag, blobs) works with ONE token request
/// for `repository:org/img:pull`; only the very first registry request goes
/// without a token; a later blob of the same repository goes with the
/// cached token up front (no token request, no 401). A second regcache
/// without credentials pulls a public repository with skopeo, and its token
/// request carries no `Authorization`.
#[test]
fn bearer_token_from_the_realm_host_is_fetched_once_and_reused() {
    let tokens = TokenServer::start(TokenOpts::default());
    let reg = FakeRegistry::start();
    protect(
        &reg,
        &tokens,
        GuardOpts {
            private: vec!["org/img"],
            ..GuardOpts::default()
        },
    );
    let img = reg.add_image("org/img", "1.0", &[30_000, 20_000]);
    let public = reg.add_image("org/public", "2", &[25_000]);
    let (rc, _storage) = start_regcache(&reg, Some((USER, PASS)), &[]);
    let cache = rc.addr().to_owned();

    assert_manifest(
        "manifest by tag",
        &get_manifest(&cache, "org/img", "1.0"),
        &img,
    );
    for (d, len) in [
        (&img.config_digest, img.config.len()),
        (&img.layer_digests[0], img.layer_sizes[0] as usize),
    ] {
        assert_blob(d, &get_blob(&cache, "org/img", d), d, len);
    }

    let treqs = tokens.requests();
    assert_eq!(treqs.len(), 1, "one token request: {}", tokens.describe());
    assert_token_request(
        &treqs[0],
        Some(SERVICE),
        "repository:org/img:pull",
        Some(&basic(USER, PASS)),
    );
    assert!(tokens.issued()[0].authenticated);
    let t1 = tokens.token(1);
    let rreqs = reg.requests();
    let seen = describe_auth("registry", &rreqs);
    assert!(rreqs.len() >= 4, "{seen}");
    assert_eq!(auth(&rreqs[0]), None, "first request: {seen}");
    for r in &rreqs[1..] {
        assert_eq!(
            auth(r),
            Some(bearer(&t1).as_str()),
            "every request after the first carries the token: {seen}"
        );
    }

    // Another blob of the same repository: the cached token goes up front.
    let (mark_r, mark_t) = (reg.request_count(), tokens.fake.request_count());
    let d = &img.layer_digests[1];
    assert_blob(
        "second layer",
        &get_blob(&cache, "org/img", d),
        d,
        img.layer_sizes[1] as usize,
    );
    let new = reg.requests_since(mark_r);
    let seen = describe_auth("registry", &new);
    assert_eq!(new.len(), 1, "one request, no 401 round trip: {seen}");
    assert_eq!(new[0].path, format!("/v2/org/img/blobs/{d}"), "{seen}");
    assert_eq!(auth(&new[0]), Some(bearer(&t1).as_str()), "{seen}");
    assert_eq!(
        tokens.fake.request_count(),
        mark_t,
        "no new token request: {}",
        tokens.describe()
    );

    // Anonymous: no credentials configured, no Authorization on the token
    // request; an anonymous token opens a public repository.
    let (anon, _anon_storage) = start_regcache(&reg, None, &[]);
    let mark_t = tokens.fake.request_count();
    let work = temp_dir("regcache-upstream-auth-");
    let dest = work.path().join("public");
    skopeo_copy(
        &format!("{}/{PREFIX}/org/public:2", anon.addr()),
        &dest,
        false,
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", describe_auth("registry", &reg.requests())));
    let copy = read_dir_copy(&dest);
    assert_eq!(copy.manifest_digest, public.manifest_digest);
    for d in public.blob_digests() {
        assert!(copy.has_blob(&d), "blob {d} missing from the skopeo copy");
    }
    let anon_treqs = tokens.fake.requests_since(mark_t);
    assert_eq!(
        anon_treqs.len(),
        1,
        "one token request for the anonymous pull: {}",
        tokens.describe()
    );
    assert_token_request(
        &anon_treqs[0],
        Some(SERVICE),
        "repository:org/public:pull",
        None,
    );
    assert!(!tokens.issued()[1].authenticated);

    let secrets = secrets(&[&tokens]);
    assert_log_free_of(&rc, &secrets);
    assert_log_free_of(&anon, &secrets);
}

/// Issue test 2 (Forgejo/Gitea style): the registry sends two challenges,
/// `Basic` first, then `Bearer realm=...` without `service` and without
/// `scope`; the token server answers `{"access_token": ...}` with no
/// `expires_in`. regcache prefers Bearer (the registry never sees Basic
/// credentials although some are configured), asks for the token without a
/// `service=` parameter and with `scope=repository:org/img:pull` (built,
/// since the challenge had none), and uses the `access_token`.
#[test]
fn access_token_without_service_or_scope_and_bearer_preferred_over_basic() {
    let tokens = TokenServer::start(TokenOpts {
        service: None,
        field: "access_token",
        expires_in: None,
        hold: None,
    });
    let reg = FakeRegistry::start();
    protect(
        &reg,
        &tokens,
        GuardOpts {
            no_scope: true,
            basic_too: true,
            ..GuardOpts::default()
        },
    );
    let img = reg.add_image("org/img", "v1", &[40_000]);
    let (rc, _storage) = start_regcache(&reg, Some((USER, PASS)), &[]);
    let cache = rc.addr().to_owned();

    assert_manifest(
        "manifest by tag",
        &get_manifest(&cache, "org/img", "v1"),
        &img,
    );
    for d in img.blob_digests() {
        let r = get_blob(&cache, "org/img", &d);
        assert_eq!(r.status, 200, "{d}: {}", r.describe());
        assert_eq!(sha256_digest(&r.body), d);
    }

    let treqs = tokens.requests();
    assert_eq!(treqs.len(), 1, "one token request: {}", tokens.describe());
    assert_token_request(
        &treqs[0],
        None,
        "repository:org/img:pull",
        Some(&basic(USER, PASS)),
    );
    let t1 = tokens.token(1);
    let rreqs = reg.requests();
    let seen = describe_auth("registry", &rreqs);
    assert!(
        rreqs
            .iter()
            .all(|r| !auth(r).is_some_and(|a| a.starts_with("Basic"))),
        "Basic credentials sent to a registry that offered Bearer: {seen}"
    );
    assert_eq!(auth(&rreqs[0]), None, "{seen}");
    assert!(
        rreqs[1..]
            .iter()
            .all(|r| auth(r) == Some(bearer(&t1).as_str())),
        "every request after the first carries the access_token: {seen}"
    );
    assert_log_free_of(&rc, &secrets(&[&tokens]));
}

/// Registers `data` as a blob of `repo` on `reg` that answers `status` with a
/// `Location` on `cdn` (`/cdn/<hex>?sig=...`), where the bytes are. Returns
/// the blob (its `path` is the registry's) and the signature.
fn redirected_blob(
    reg: &FakeRegistry,
    cdn: &FakeRegistry,
    repo: &str,
    data: &[u8],
    status: u16,
) -> (FakeBlob, String) {
    let blob = reg.add_blob(repo, data);
    let hex = digest_hex(&blob.digest).to_owned();
    let sig = format!("sig-{}", random_token());
    let location = format!("{}/cdn/{hex}?sig={sig}", cdn.url());
    reg.add_raw(&blob.path, status, &[("Location", &location)], Vec::new());
    cdn.add_raw(
        &format!("/cdn/{hex}"),
        200,
        &[("Content-Type", BLOB_MEDIA_TYPE)],
        data.to_vec(),
    );
    (blob, sig)
}

/// A CDN that, like a presigned S3 URL, refuses any `Authorization`.
fn start_cdn() -> FakeRegistry {
    let cdn = FakeRegistry::start();
    cdn.intercept(|r| {
        auth(r).map(|_| {
            Reply::json(
                400,
                &serde_json::json!({"Code": "InvalidArgument",
                    "Message": "Only one auth mechanism allowed"}),
            )
        })
    });
    cdn
}

/// Issue test 3. Blob GETs on the registry answer a redirect (each of 307,
/// 302, 301, 303, 308) to a CDN on another port; the CDN gets the signed URL
/// exactly as given and no `Authorization` (nor any header carrying the
/// token); the bytes verify. Each cold blob goes to the registry again (a
/// redirect is never cached) and the token is reused; a blob fetched once is
/// served from cache with no request to any host.
#[test]
fn blob_redirect_to_a_cdn_host_carries_no_authorization_and_is_never_cached() {
    let tokens = TokenServer::start(TokenOpts::default());
    let reg = FakeRegistry::start();
    protect(&reg, &tokens, GuardOpts::default());
    let cdn = start_cdn();
    let (rc, _storage) = start_regcache(&reg, Some((USER, PASS)), &[]);
    let cache = rc.addr().to_owned();

    let mut sigs = Vec::new();
    let mut fetched = Vec::new();
    for (i, status) in [307u16, 302, 301, 303, 308].into_iter().enumerate() {
        let data = random_bytes(100_000 + i * 7_777);
        let (blob, sig) = redirected_blob(&reg, &cdn, "org/img", &data, status);
        let (mark_r, mark_c) = (reg.request_count(), cdn.request_count());
        let what = format!("blob behind a {status}");
        assert_blob(
            &what,
            &get_blob(&cache, "org/img", &blob.digest),
            &blob.digest,
            data.len(),
        );

        let t1 = tokens.token(1);
        let at_reg: Vec<Recorded> = reg.requests_since(mark_r);
        let seen = describe_auth("registry", &at_reg);
        let gets: Vec<&Recorded> = at_reg
            .iter()
            .filter(|r| r.method == "GET" && r.path == blob.path)
            .collect();
        assert!(!gets.is_empty(), "{what}: registry not asked: {seen}");
        assert_eq!(
            auth(gets.last().unwrap()),
            Some(bearer(&t1).as_str()),
            "{what}: {seen}"
        );
        if i > 0 {
            assert_eq!(gets.len(), 1, "{what}: token reused, no 401: {seen}");
        }
        assert!(
            at_reg.iter().all(|r| r.path == blob.path),
            "{what}: the CDN path went to the registry: {seen}"
        );

        let at_cdn = cdn.requests_since(mark_c);
        let seen = describe_auth("CDN", &at_cdn);
        assert_eq!(at_cdn.len(), 1, "{what}: one CDN request: {seen}");
        let c = &at_cdn[0];
        let hex = digest_hex(&blob.digest);
        assert_eq!(
            (c.method.as_str(), c.path.as_str(), c.query.as_deref()),
            (
                "GET",
                format!("/cdn/{hex}").as_str(),
                Some(format!("sig={sig}").as_str())
            ),
            "{what}: {seen}"
        );
        assert_eq!(
            auth(c),
            None,
            "{what}: Authorization sent to the CDN: {seen}"
        );
        for (k, v) in &c.headers {
            assert!(
                !v.contains(&t1)
                    && !v.contains(&base64_encode(format!("{USER}:{PASS}").as_bytes())),
                "{what}: header {k}: {v} sent to the CDN"
            );
        }
        sigs.push(sig);
        fetched.push((blob, data.len()));
    }
    assert_eq!(
        tokens.requests().len(),
        1,
        "one token for all blobs: {}",
        tokens.describe()
    );

    // Fetched once: served from cache, no host asked.
    let marks = (
        reg.request_count(),
        cdn.request_count(),
        tokens.fake.request_count(),
    );
    for (blob, len) in &fetched {
        let r = get_blob(&cache, "org/img", &blob.digest);
        assert_blob("cached blob", &r, &blob.digest, *len);
        assert_eq!(r.header("X-Cache"), Some("HIT"), "{}", r.describe());
    }
    assert_eq!(
        (
            reg.request_count(),
            cdn.request_count(),
            tokens.fake.request_count()
        ),
        marks,
        "cached blobs went upstream: {}\n{}",
        describe_auth("registry", &reg.requests()),
        describe_auth("CDN", &cdn.requests())
    );

    let mut secrets = secrets(&[&tokens]);
    secrets.extend(sigs);
    assert_log_free_of(&rc, &secrets);
}

/// Issue test 4. A path-only `Location` (Artifact Registry's
/// `/artifacts-downloads/...`) is resolved against the URL that answered it:
/// on the registry (`/cdn/<hex>?sig=...` on the registry's host), and on a
/// second hop (registry -> CDN host -> `/store/<hex>` on the CDN host, never
/// on the registry).
#[test]
fn relative_redirect_resolves_against_the_answering_host() {
    let tokens = TokenServer::start(TokenOpts::default());
    let reg = FakeRegistry::start();
    protect(&reg, &tokens, GuardOpts::default());
    let cdn = start_cdn();
    let (rc, _storage) = start_regcache(&reg, Some((USER, PASS)), &[]);
    let cache = rc.addr().to_owned();

    // One hop, relative, on the registry itself.
    let data = random_bytes(90_000);
    let blob = reg.add_blob("org/img", &data);
    let hex = digest_hex(&blob.digest).to_owned();
    let sig = format!("rel-{}", random_token());
    reg.add_raw(
        &blob.path,
        302,
        &[("Location", &format!("/cdn/{hex}?sig={sig}"))],
        Vec::new(),
    );
    reg.add_raw(
        &format!("/cdn/{hex}"),
        200,
        &[("Content-Type", BLOB_MEDIA_TYPE)],
        data.clone(),
    );
    assert_blob(
        "relative redirect",
        &get_blob(&cache, "org/img", &blob.digest),
        &blob.digest,
        data.len(),
    );
    let rreqs = reg.requests();
    let seen = describe_auth("registry", &rreqs);
    let hops: Vec<&Recorded> = rreqs
        .iter()
        .filter(|r| r.path == format!("/cdn/{hex}"))
        .collect();
    assert_eq!(hops.len(), 1, "{seen}");
    assert_eq!(hops[0].method, "GET", "{seen}");
    assert_eq!(
        hops[0].query.as_deref(),
        Some(format!("sig={sig}").as_str()),
        "{seen}"
    );
    assert_eq!(
        cdn.request_count(),
        0,
        "{}",
        describe_auth("CDN", &cdn.requests())
    );

    // Two hops: absolute to the CDN, then relative there.
    let data2 = random_bytes(70_000);
    let blob2 = reg.add_blob("org/img", &data2);
    let hex2 = digest_hex(&blob2.digest).to_owned();
    let sig2 = format!("rel-{}", random_token());
    reg.add_raw(
        &blob2.path,
        307,
        &[("Location", &format!("{}/edge/{hex2}", cdn.url()))],
        Vec::new(),
    );
    cdn.add_raw(
        &format!("/edge/{hex2}"),
        302,
        &[("Location", &format!("/store/{hex2}?sig={sig2}"))],
        Vec::new(),
    );
    cdn.add_raw(
        &format!("/store/{hex2}"),
        200,
        &[("Content-Type", BLOB_MEDIA_TYPE)],
        data2.clone(),
    );
    let mark_r = reg.request_count();
    assert_blob(
        "relative redirect on the second hop",
        &get_blob(&cache, "org/img", &blob2.digest),
        &blob2.digest,
        data2.len(),
    );
    let at_cdn = cdn.requests();
    let seen = describe_auth("CDN", &at_cdn);
    let paths: Vec<(String, Option<String>)> = at_cdn
        .iter()
        .map(|r| (r.path.clone(), r.query.clone()))
        .collect();
    assert_eq!(
        paths,
        [
            (format!("/edge/{hex2}"), None),
            (format!("/store/{hex2}"), Some(format!("sig={sig2}"))),
        ],
        "{seen}"
    );
    assert!(at_cdn.iter().all(|r| auth(r).is_none()), "{seen}");
    let at_reg = reg.requests_since(mark_r);
    assert!(
        at_reg.iter().all(|r| r.path == blob2.path),
        "the CDN's relative Location went to the registry: {}",
        describe_auth("registry", &at_reg)
    );

    let mut secrets = secrets(&[&tokens]);
    secrets.extend([sig, sig2]);
    assert_log_free_of(&rc, &secrets);
}

/// Issue test 5. With auth in front (the 429 comes after a valid token): a
/// cached tag past its freshness window is served from cache (`X-Cache:
/// STALE`) after one upstream HEAD, with no manifest GET; then, within the
/// upstream's `Retry-After`, a tag never cached answers 429
/// `TOOMANYREQUESTS` with the time left, without asking upstream again.
#[test]
fn rate_limited_manifest_is_429_with_retry_after_or_stale_when_cached() {
    let tokens = TokenServer::start(TokenOpts::default());
    let reg = FakeRegistry::start();
    protect(&reg, &tokens, GuardOpts::default());
    let warm = reg.add_image("org/img", "warm", &[20_000]);
    let _cold = reg.add_image("org/img", "cold", &[21_000]);
    let (rc, _storage) = start_regcache(
        &reg,
        Some((USER, PASS)),
        &[("REGCACHE_TAG_FRESHNESS", "1s")],
    );
    let cache = rc.addr().to_owned();

    assert_manifest("warm tag", &get_manifest(&cache, "org/img", "warm"), &warm);
    let t1 = tokens.token(1);

    // Cached, past the freshness window: served STALE.
    std::thread::sleep(Duration::from_millis(1_300));
    let warm_path = "/v2/org/img/manifests/warm";
    reg.set(warm_path, Serve::status(429).header("Retry-After", "17"));
    let mark = reg.request_count();
    let r = get_manifest(&cache, "org/img", "warm");
    assert_manifest("stale warm tag", &r, &warm);
    assert_eq!(r.header("X-Cache"), Some("STALE"), "{}", r.describe());
    let new = reg.requests_since(mark);
    let seen = describe_auth("registry", &new);
    assert_eq!(new.len(), 1, "one revalidation: {seen}");
    assert_eq!(
        (new[0].method.as_str(), new[0].path.as_str()),
        ("HEAD", warm_path),
        "{seen}"
    );
    assert_eq!(auth(&new[0]), Some(bearer(&t1).as_str()), "{seen}");

    // Not cached, within Retry-After: 429 and the time left, upstream left alone.
    let cold_path = "/v2/org/img/manifests/cold";
    reg.set(cold_path, Serve::status(429).header("Retry-After", "17"));
    let mark = reg.request_count();
    let r = get_manifest(&cache, "org/img", "cold");
    assert_eq!(r.status, 429, "cold tag: {}", r.describe());
    assert_eq!(r.error_codes(), ["TOOMANYREQUESTS"], "{}", r.describe());
    let left: u64 = r
        .header("Retry-After")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(
        (1..=17).contains(&left),
        "Retry-After {left}: {}",
        r.describe()
    );
    let new = reg.requests_since(mark);
    assert!(new.is_empty(), "{}", describe_auth("registry", &new));
    assert_eq!(tokens.requests().len(), 1, "{}", tokens.describe());
    assert_log_free_of(&rc, &secrets(&[&tokens]));
}

/// Issue test 6, revocation: the registry stops accepting the token mid-pull
/// (401 with a fresh challenge). regcache drops it, fetches a new one once,
/// retries once with it, and the pull completes; later requests go with the
/// new token up front.
#[test]
fn token_refused_mid_pull_is_replaced_once() {
    let tokens = TokenServer::start(TokenOpts::default());
    let reg = FakeRegistry::start();
    let guard = protect(&reg, &tokens, GuardOpts::default());
    let img = reg.add_image("org/img", "1", &[30_000, 30_000]);
    let (rc, _storage) = start_regcache(&reg, Some((USER, PASS)), &[]);
    let cache = rc.addr().to_owned();

    assert_manifest("manifest", &get_manifest(&cache, "org/img", "1"), &img);
    let config = get_blob(&cache, "org/img", &img.config_digest);
    assert_blob("config", &config, &img.config_digest, img.config.len());
    let t1 = tokens.token(1);
    guard.revoke(&t1);

    let mark = reg.request_count();
    let [l0, l1] = [&img.layer_digests[0], &img.layer_digests[1]];
    assert_blob(
        "layer after revocation",
        &get_blob(&cache, "org/img", l0),
        l0,
        img.layer_sizes[0] as usize,
    );
    let treqs = tokens.requests();
    assert_eq!(treqs.len(), 2, "a second token: {}", tokens.describe());
    for t in &treqs {
        assert_token_request(
            t,
            Some(SERVICE),
            "repository:org/img:pull",
            Some(&basic(USER, PASS)),
        );
    }
    let t2 = tokens.token(2);
    let new = reg.requests_since(mark);
    let seen = describe_auth("registry", &new);
    let got: Vec<(&str, Option<&str>)> = new.iter().map(|r| (r.path.as_str(), auth(r))).collect();
    let l0_path = format!("/v2/org/img/blobs/{l0}");
    assert_eq!(
        got,
        [
            (l0_path.as_str(), Some(bearer(&t1).as_str())),
            (l0_path.as_str(), Some(bearer(&t2).as_str())),
        ],
        "refused with the old token, retried once with the new one: {seen}"
    );

    let mark = reg.request_count();
    assert_blob(
        "next layer",
        &get_blob(&cache, "org/img", l1),
        l1,
        img.layer_sizes[1] as usize,
    );
    let new = reg.requests_since(mark);
    let seen = describe_auth("registry", &new);
    assert_eq!(new.len(), 1, "{seen}");
    assert_eq!(auth(&new[0]), Some(bearer(&t2).as_str()), "{seen}");
    assert_eq!(tokens.requests().len(), 2, "{}", tokens.describe());
    assert_log_free_of(&rc, &secrets(&[&tokens]));
}

/// Issue test 6, expiry: `expires_in: 11` leaves one second after the 10 s
/// margin. Once it has passed, regcache never sends that token again (the
/// registry would still take it): the next request goes with a second token.
#[test]
fn expired_token_is_never_sent_again() {
    let tokens = TokenServer::start(TokenOpts {
        expires_in: Some(11),
        ..TokenOpts::default()
    });
    let reg = FakeRegistry::start();
    protect(&reg, &tokens, GuardOpts::default());
    let img = reg.add_image("org/img", "1", &[30_000]);
    let (rc, _storage) = start_regcache(&reg, Some((USER, PASS)), &[]);
    let cache = rc.addr().to_owned();

    assert_manifest("manifest", &get_manifest(&cache, "org/img", "1"), &img);
    let t1 = tokens.token(1);
    std::thread::sleep(Duration::from_millis(2_000));

    let mark = reg.request_count();
    let l0 = &img.layer_digests[0];
    assert_blob(
        "layer after expiry",
        &get_blob(&cache, "org/img", l0),
        l0,
        img.layer_sizes[0] as usize,
    );
    let treqs = tokens.requests();
    assert_eq!(treqs.len(), 2, "a second token: {}", tokens.describe());
    assert_token_request(
        &treqs[1],
        Some(SERVICE),
        "repository:org/img:pull",
        Some(&basic(USER, PASS)),
    );
    let t2 = tokens.token(2);
    let new = reg.requests_since(mark);
    let seen = describe_auth("registry", &new);
    assert!(
        new.iter().all(|r| auth(r) != Some(bearer(&t1).as_str())),
        "expired token sent: {seen}"
    );
    assert_eq!(
        new.last().map(auth),
        Some(Some(bearer(&t2).as_str())),
        "the blob GET went with the new token: {seen}"
    );
    assert_log_free_of(&rc, &secrets(&[&tokens]));
}

/// Issue test 7. Wrong credentials: the token server answers 401; the client
/// gets 403 `DENIED` naming the upstream (`127.0.0.1:PORT`) and the
/// variables to check, for manifests and blobs; the registry never sees a
/// credential; no secret in any response or in the log; the failed token
/// requests are counted. No credentials on a private repository: the
/// anonymous token is refused by the registry (one retry, no loop) and the
/// client gets 403 `DENIED` as well.
#[test]
fn denied_credentials_become_403_naming_the_upstream_without_secrets() {
    let tokens = TokenServer::start(TokenOpts::default());
    let reg = FakeRegistry::start();
    protect(
        &reg,
        &tokens,
        GuardOpts {
            private: vec!["org/private"],
            ..GuardOpts::default()
        },
    );
    let img = reg.add_image("org/private", "1", &[10_000]);
    let (rc, _storage) = start_regcache(&reg, Some((USER, WRONG_PASS)), &[]);
    let cache = rc.addr().to_owned();
    let wrong_b64 = base64_encode(format!("{USER}:{WRONG_PASS}").as_bytes());

    let responses = [
        ("manifest", get_manifest(&cache, "org/private", "1")),
        (
            "blob",
            get_blob(&cache, "org/private", &img.layer_digests[0]),
        ),
    ];
    for (what, r) in &responses {
        assert_eq!(r.status, 403, "{what}: {}", r.describe());
        assert_eq!(r.error_codes(), ["DENIED"], "{what}: {}", r.describe());
        let msg = r.json()["errors"][0]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(
            msg.contains(&reg.addr()),
            "{what}: upstream not named: {msg}"
        );
        assert!(
            msg.contains("REGISTRY_PROXY_USERNAME") && msg.contains("REGISTRY_PROXY_PASSWORD"),
            "{what}: {msg}"
        );
        let all = format!("{:?} {}", r.headers, r.text());
        assert!(
            !all.contains(WRONG_PASS) && !all.contains(&wrong_b64),
            "{what}: secret in the response: {all}"
        );
        assert!(
            r.header("WWW-Authenticate").is_none(),
            "{what}: {}",
            r.describe()
        );
    }
    let treqs = tokens.requests();
    assert!(
        (1..=responses.len()).contains(&treqs.len()),
        "at most one token request per client request: {}",
        tokens.describe()
    );
    for t in &treqs {
        assert_token_request(
            t,
            Some(SERVICE),
            "repository:org/private:pull",
            Some(&basic(USER, WRONG_PASS)),
        );
    }
    assert!(tokens.issued().is_empty());
    let rreqs = reg.requests();
    assert!(
        rreqs.iter().all(|r| auth(r).is_none()),
        "credentials went to the registry: {}",
        describe_auth("registry", &rreqs)
    );
    let m = scrape(&cache);
    let upstream = reg.addr();
    assert_eq!(
        metric(
            &m,
            "regcache_token_requests_total",
            &[("result", "error"), ("upstream", &upstream)]
        ),
        Some(treqs.len() as f64),
        "failed token requests counted:\n{m}"
    );
    assert_log_free_of(&rc, &secrets(&[&tokens]));

    // No credentials: an anonymous token, refused by the registry.
    let (anon, _anon_storage) = start_regcache(&reg, None, &[]);
    let (mark_r, mark_t) = (reg.request_count(), tokens.fake.request_count());
    let r = get_manifest(anon.addr(), "org/private", "1");
    assert_eq!(r.status, 403, "anonymous: {}", r.describe());
    assert_eq!(r.error_codes(), ["DENIED"], "anonymous: {}", r.describe());
    let new_t = tokens.fake.requests_since(mark_t);
    assert_eq!(new_t.len(), 1, "{}", tokens.describe());
    assert_token_request(
        &new_t[0],
        Some(SERVICE),
        "repository:org/private:pull",
        None,
    );
    let anon_token = tokens.token(1);
    let new = reg.requests_since(mark_r);
    let seen = describe_auth("registry", &new);
    let got: Vec<Option<&str>> = new.iter().map(auth).collect();
    assert_eq!(
        got,
        [None, Some(bearer(&anon_token).as_str())],
        "challenge, then one retry with the anonymous token: {seen}"
    );
    assert_log_free_of(&anon, &secrets(&[&tokens]));
}

/// Issue test 8. Docker Hub's `ratelimit-remaining: 76;w=21600` on manifest
/// responses shows on `/metrics` as
/// `regcache_upstream_ratelimit_remaining{upstream="127.0.0.1:PORT"} 76`
/// (the registry's host, not the token server's); the successful token
/// request moved `regcache_token_requests_total{result="ok"}` by one.
#[test]
fn docker_hub_ratelimit_remaining_and_token_requests_in_metrics() {
    let tokens = TokenServer::start(TokenOpts::default());
    let reg = FakeRegistry::start();
    protect(&reg, &tokens, GuardOpts::default());
    let img = reg.add_image("library/debian", "12", &[10_000]);
    for p in [
        "/v2/library/debian/manifests/12".to_owned(),
        format!("/v2/library/debian/manifests/{}", img.manifest_digest),
    ] {
        reg.set(
            &p,
            Serve::ok()
                .header("ratelimit-limit", "100;w=21600")
                .header("ratelimit-remaining", "76;w=21600")
                .header("docker-ratelimit-source", "192.0.2.1"),
        );
    }
    let (rc, _storage) = start_regcache(&reg, None, &[]);
    let cache = rc.addr().to_owned();
    let upstream = reg.addr();
    let ok = |m: &str| {
        metric(
            m,
            "regcache_token_requests_total",
            &[("result", "ok"), ("upstream", &upstream)],
        )
        .unwrap_or(0.0)
    };
    let remaining = |m: &str| {
        metric(
            m,
            "regcache_upstream_ratelimit_remaining",
            &[("upstream", &upstream)],
        )
    };

    let before = scrape(&cache);
    assert_eq!(ok(&before), 0.0, "{before}");
    assert_ne!(remaining(&before), Some(76.0), "{before}");

    assert_manifest(
        "manifest",
        &get_manifest(&cache, "library/debian", "12"),
        &img,
    );
    let after = scrape(&cache);
    assert_eq!(
        remaining(&after),
        Some(76.0),
        "regcache_upstream_ratelimit_remaining{{upstream=\"{upstream}\"}}:\n{after}"
    );
    assert_eq!(
        ok(&after),
        tokens.requests().len() as f64,
        "token requests counted: {}\n{after}",
        tokens.describe()
    );
    assert_eq!(ok(&after), 1.0, "{}", tokens.describe());
    assert_eq!(
        metric(
            &after,
            "regcache_token_requests_total",
            &[("result", "error"), ("upstream", &upstream)]
        )
        .unwrap_or(0.0),
        0.0,
        "{after}"
    );
    let token_host = tokens.fake.addr();
    assert!(
        !after.contains(&format!("upstream=\"{token_host}\"")),
        "the token server became an upstream label:\n{after}"
    );
}

/// Issue test 9. Eight concurrent cold requests for one repository (manifest
/// by tag, manifest by digest, six blobs) all get a 401 before any token
/// exists (the token response is held until the registry has seen all
/// eight); exactly one token request is made, every retry carries that
/// token, and all eight answers are right.
#[test]
fn concurrent_cold_requests_share_one_token_request() {
    let gate = Gate::new();
    let _open = OpenOnDrop(gate.clone());
    let tokens = TokenServer::start(TokenOpts {
        hold: Some(gate.clone()),
        ..TokenOpts::default()
    });
    let reg = FakeRegistry::start();
    protect(&reg, &tokens, GuardOpts::default());
    let img = reg.add_image("org/img", "1", &[11_000, 12_000, 13_000, 14_000, 15_000]);
    let (rc, _storage) = start_regcache(&reg, Some((USER, PASS)), &[]);
    let cache = rc.addr().to_owned();

    let mut paths = vec![
        format!("/v2/{PREFIX}/org/img/manifests/1"),
        format!("/v2/{PREFIX}/org/img/manifests/{}", img.manifest_digest),
    ];
    paths.extend(
        img.blob_digests()
            .iter()
            .map(|d| format!("/v2/{PREFIX}/org/img/blobs/{d}")),
    );
    assert_eq!(paths.len(), 8);
    let clients: Vec<_> = paths
        .iter()
        .map(|p| {
            let (cache, p) = (cache.clone(), p.clone());
            std::thread::spawn(move || {
                http(&cache, "GET", &p, &[("Accept", MANIFEST_ACCEPT)])
                    .map_err(|e| format!("GET {p}: {e}"))
            })
        })
        .collect();

    let unauthorised = || reg.requests().iter().filter(|r| auth(r).is_none()).count();
    let all_challenged = wait_for(Duration::from_secs(15), || {
        (unauthorised() >= 8).then_some(())
    });
    assert!(
        all_challenged.is_some(),
        "the registry did not see 8 requests without a token: {}\n{}",
        describe_auth("registry", &reg.requests()),
        tokens.describe()
    );
    assert!(
        gate.wait_reached(1, Duration::from_secs(10)),
        "no token request arrived: {}",
        tokens.describe()
    );
    gate.open();

    for (p, h) in paths.iter().zip(clients) {
        let r = h
            .join()
            .expect("client thread panicked")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.status, 200, "{p}: {}", r.describe());
        if p.contains("/manifests/") {
            assert_eq!(r.body, img.manifest, "{p}");
        } else {
            let d = p.rsplit('/').next().unwrap();
            assert_eq!(sha256_digest(&r.body), d, "{p}");
        }
    }
    let treqs = tokens.requests();
    assert_eq!(
        treqs.len(),
        1,
        "exactly one token request: {}",
        tokens.describe()
    );
    assert_token_request(
        &treqs[0],
        Some(SERVICE),
        "repository:org/img:pull",
        Some(&basic(USER, PASS)),
    );
    let t1 = tokens.token(1);
    let rreqs = reg.requests();
    let seen = describe_auth("registry", &rreqs);
    assert_eq!(unauthorised(), 8, "{seen}");
    assert!(
        rreqs.iter().filter_map(auth).all(|a| a == bearer(&t1)),
        "{seen}"
    );
    assert_log_free_of(&rc, &secrets(&[&tokens]));
}

/// A registry whose blob GETs redirect (307) to a second registry host
/// (the hop, registry.k8s.io -> Artifact Registry style) with its own token
/// server, service and repository name (`mirror/org/img`), and a regcache
/// without credentials in front.
struct HopSetup {
    tokens: TokenServer,
    reg: FakeRegistry,
    hop_tokens: TokenServer,
    hop: FakeRegistry,
    rc: Regcache,
    _storage: tempfile::TempDir,
    /// (at the registry, at the hop): the same bytes.
    blobs: Vec<(FakeBlob, FakeBlob)>,
}

impl HopSetup {
    fn start() -> HopSetup {
        let tokens = TokenServer::start(TokenOpts::default());
        let reg = FakeRegistry::start();
        protect(&reg, &tokens, GuardOpts::default());
        let hop_tokens = TokenServer::start(TokenOpts {
            service: Some("hop-registry"),
            ..TokenOpts::default()
        });
        let hop = FakeRegistry::start();
        protect(&hop, &hop_tokens, GuardOpts::default());
        // With credentials: they must reach the registry's realm only.
        let (rc, storage) = start_regcache(&reg, Some((USER, PASS)), &[]);
        let mut blobs = Vec::new();
        for size in [60_000, 61_000] {
            let data = random_bytes(size);
            let at_hop = hop.add_blob("mirror/org/img", &data);
            let at_reg = reg.add_blob("org/img", &data);
            let location = format!("{}{}", hop.url(), at_hop.path);
            reg.add_raw(&at_reg.path, 307, &[("Location", &location)], Vec::new());
            blobs.push((at_reg, at_hop));
        }
        HopSetup {
            tokens,
            reg,
            hop_tokens,
            hop,
            rc,
            _storage: storage,
            blobs,
        }
    }

    /// GETs blob `i` through regcache and checks its bytes.
    fn fetch(&self, i: usize) {
        let at_reg = &self.blobs[i].0;
        assert_blob(
            &format!("blob {i} via the hop"),
            &get_blob(self.rc.addr(), "org/img", &at_reg.digest),
            &at_reg.digest,
            at_reg.len(),
        );
    }
}

/// A redirect hop that challenges itself: the hop host gets no token of the
/// registry's, answers 401 with its own challenge, and regcache fetches a
/// token from the hop's realm for the hop's service and scope and retries
/// with it; the registry never sees the hop's token. A second blob through
/// the same hop needs no new token from either server. The upstream's
/// credentials go to the registry's realm, never to the hop's.
#[test]
fn redirect_hop_that_challenges_gets_its_own_token() {
    let s = HopSetup::start();
    for i in 0..s.blobs.len() {
        s.fetch(i);
        let at_hop = &s.blobs[i].1;
        let hreqs = s.hop.requests();
        let seen = describe_auth("hop", &hreqs);
        let h1 = s.hop_tokens.token(1);
        let mine: Vec<&Recorded> = hreqs.iter().filter(|r| r.path == at_hop.path).collect();
        assert!(!mine.is_empty(), "blob {i}: {seen}");
        assert_eq!(
            auth(mine.last().unwrap()),
            Some(bearer(&h1).as_str()),
            "blob {i}: {seen}"
        );
        if i == 0 {
            assert_eq!(auth(mine[0]), None, "first hop request: {seen}");
        }
    }
    let t1 = s.tokens.token(1);
    let h1 = s.hop_tokens.token(1);
    assert_eq!(s.tokens.requests().len(), 1, "{}", s.tokens.describe());
    assert_eq!(
        s.hop_tokens.requests().len(),
        1,
        "{}",
        s.hop_tokens.describe()
    );
    assert_token_request(
        &s.hop_tokens.requests()[0],
        Some("hop-registry"),
        "repository:mirror/org/img:pull",
        None,
    );
    let basic = format!(
        "Basic {}",
        base64_encode(format!("{USER}:{PASS}").as_bytes())
    );
    assert_eq!(
        auth(&s.tokens.requests()[0]),
        Some(basic.as_str()),
        "the registry's realm gets the credentials: {}",
        s.tokens.describe()
    );
    let hreqs = s.hop.requests();
    assert!(
        hreqs.iter().all(|r| auth(r) != Some(bearer(&t1).as_str())),
        "the registry's token went to the hop: {}",
        describe_auth("hop", &hreqs)
    );
    let rreqs = s.reg.requests();
    assert!(
        rreqs.iter().all(|r| auth(r) != Some(bearer(&h1).as_str())),
        "the hop's token went to the registry: {}",
        describe_auth("registry", &rreqs)
    );
    assert_log_free_of(&s.rc, &secrets(&[&s.tokens, &s.hop_tokens]));
}

/// Once the hop host has challenged and its token is cached, the next
/// request to the hop goes with that token up front, as requests to the
/// registry do: one request at the hop, no 401 round trip.
#[test]
fn hop_token_goes_up_front_on_later_requests() {
    let s = HopSetup::start();
    s.fetch(0);
    let h1 = s.hop_tokens.token(1);
    let mark = s.hop.request_count();
    s.fetch(1);
    let new = s.hop.requests_since(mark);
    let seen = describe_auth("hop", &new);
    let got: Vec<(&str, Option<&str>)> = new.iter().map(|r| (r.path.as_str(), auth(r))).collect();
    assert_eq!(
        got,
        [(s.blobs[1].1.path.as_str(), Some(bearer(&h1).as_str()))],
        "second blob via the hop: {seen}"
    );
}
