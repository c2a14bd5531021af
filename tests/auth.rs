//! Credentials and access, end to end: a real Basic-auth upstream reached
//! with per-upstream CONFIG credentials, worker environment isolation, and
//! regcache's own front door (htpasswd, HTTPS, client certificates) driven by
//! skopeo and curl.
//!
//! Run: `cargo test --test auth -- --test-threads=2`
//! Needs: skopeo, docker-registry, htpasswd (apache2-utils), openssl, curl.

use regcache_testkit as support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use support::*;

/// Reads `/proc/<pid>/environ` as `NAME=value` strings.
fn environ(pid: i32) -> Vec<String> {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    raw.split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

/// The `--upstream` argument a worker was started with.
fn worker_upstream(pid: i32) -> String {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    let args: Vec<String> = raw
        .split(|&b| b == 0)
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect();
    let at = args.iter().position(|a| a == "--upstream").unwrap();
    args[at + 1].clone()
}

/// One Basic-auth upstream behind two CONFIG entries, the right password
/// from a file and a wrong password, and behind a second regcache with no
/// credentials. Only the first can pull; the others get 403 DENIED naming the
/// upstream. Each worker's environment holds
/// its own entry's variables only, and never CONFIG.
#[test]
fn basic_auth_upstream_and_worker_isolation() {
    let up = Upstream::start_with_htpasswd("puller", "right-pass-1");
    let img = seed_image(&up, "org/private", "1", &[40_000]);
    let work = temp_dir("regcache-auth-");
    let secret = work.path().join("password");
    std::fs::write(&secret, "right-pass-1\n").unwrap();
    let port = up.port();
    let config = serde_json::json!([
        {"registry": format!("http://127.0.0.1:{port}"), "aliases": ["good.test"],
         "variables": {"REGISTRY_PROXY_USERNAME": "puller",
                       "REGISTRY_PROXY_PASSWORD_FILE": secret.display().to_string()}},
        {"registry": format!("http://localhost:{port}"), "aliases": ["bad.test"],
         "variables": {"REGISTRY_PROXY_USERNAME": "puller",
                       "REGISTRY_PROXY_PASSWORD": "wrong-pass-2"}},
    ])
    .to_string();
    let storage = work.path().join("storage");
    let rc = Regcache::start(&config, &storage);
    let anon_config = config_json(&[(&up.url(), &["anon.test"])]);
    let anon = Regcache::start(&anon_config, &work.path().join("anon-storage"));

    // The right credentials, read from the _FILE variable, pull the image.
    pull_and_check_image(
        &format!("{}/good.test/org/private:1", rc.addr()),
        &img.image,
        &work.path().join("good"),
    );

    // Wrong and missing credentials: 403 DENIED naming the upstream and the
    // variables to check, never a 401 that would make clients log in to us.
    for (rc, alias) in [(&rc, "bad.test"), (&anon, "anon.test")] {
        let r = get(rc.addr(), &format!("/v2/{alias}/org/private/manifests/1"));
        assert_eq!(r.status, 403, "{alias}: {}", r.describe());
        assert_eq!(r.error_codes(), ["DENIED"], "{alias}");
        let msg = r.json()["errors"][0]["message"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(msg.contains(&format!(":{port}")), "{alias}: {msg}");
        assert!(msg.contains("REGISTRY_PROXY_PASSWORD"), "{alias}: {msg}");
        assert!(!msg.contains("wrong-pass-2"), "{alias}: secret in {msg}");
        let blob = get(
            rc.addr(),
            &format!(
                "/v2/{alias}/org/private/blobs/{}",
                img.image.layer_digests[0]
            ),
        );
        assert_eq!(blob.status, 403, "{alias} blob: {}", blob.describe());
    }

    // Isolation: each worker sees its own variables and nothing of the others.
    let workers = rc.worker_pids();
    assert_eq!(workers.len(), 2);
    for pid in workers {
        let env = environ(pid);
        let upstream = worker_upstream(pid);
        assert!(
            !env.iter().any(|e| e.starts_with("CONFIG=")),
            "worker {upstream} sees CONFIG"
        );
        let has = |s: &str| env.iter().any(|e| e == s);
        let mentions = |s: &str| env.iter().any(|e| e.contains(s));
        if upstream.contains("127.0.0.1") {
            assert!(has(&format!(
                "REGISTRY_PROXY_PASSWORD_FILE={}",
                secret.display()
            )));
            assert!(!mentions("wrong-pass-2"), "good worker sees bad's password");
        } else {
            assert!(upstream.contains("localhost"), "{upstream}");
            assert!(has("REGISTRY_PROXY_PASSWORD=wrong-pass-2"));
            assert!(
                !mentions(&secret.display().to_string()),
                "bad worker sees good's file"
            );
        }
    }
    for pid in anon.worker_pids() {
        let env = environ(pid);
        assert!(
            !env.iter().any(|e| e.contains("REGISTRY_PROXY_")),
            "anonymous worker sees credentials"
        );
    }

    // No secret in the log.
    let log = std::fs::read_to_string(rc.log_path()).unwrap();
    assert!(!log.contains("wrong-pass-2") && !log.contains("right-pass-1"));
}

/// Test PKI made with openssl: a CA, a server certificate for 127.0.0.1 and
/// a client certificate, all signed by the CA.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = temp_dir("regcache-pki-");
        let d = dir.path();
        let sh = |args: &str| {
            let out = Command::new("sh")
                .arg("-c")
                .arg(args)
                .current_dir(d)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{args}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        sh("openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 2 -subj /CN=regcache-test-ca");
        for (name, ext) in [
            ("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
            ("client", "extendedKeyUsage=clientAuth"),
        ] {
            sh(&format!("openssl req -newkey rsa:2048 -nodes -keyout {name}.key -out {name}.csr -subj /CN={name}"));
            std::fs::write(d.join(format!("{name}.ext")), ext).unwrap();
            sh(&format!("openssl x509 -req -in {name}.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out {name}.crt -days 2 -extfile {name}.ext"));
        }
        // skopeo's --src-cert-dir wants *.crt CAs (and client.cert/.key).
        std::fs::create_dir(d.join("certs.d")).unwrap();
        std::fs::copy(d.join("ca.crt"), d.join("certs.d/ca.crt")).unwrap();
        Pki { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }
}

fn htpasswd_file(dir: &Path, user: &str, pass: &str) -> String {
    let out = Command::new("htpasswd")
        .args(["-Bbn", user, pass])
        .output()
        .unwrap();
    assert!(out.status.success());
    let path = dir.join("htpasswd");
    std::fs::write(&path, &out.stdout).unwrap();
    path.display().to_string()
}

fn curl(args: &[&str]) -> (bool, String) {
    let out = run_with_timeout(
        Command::new("curl").args(["-sS", "-i"]).args(args),
        Duration::from_secs(20),
    );
    (
        out.success(),
        format!("{}{}", String::from_utf8_lossy(&out.stdout), out.stderr),
    )
}

/// skopeo copy over HTTPS with the test CA; `creds` as `user:pass`.
fn skopeo_tls(src: &str, dest: &Path, cert_dir: &str, creds: Option<&str>) -> Result<(), String> {
    let mut cmd = skopeo_command();
    cmd.args(["copy", "-q", "--src-cert-dir", cert_dir]);
    match creds {
        Some(c) => cmd.args(["--src-creds", c]),
        None => cmd.arg("--src-no-creds"),
    };
    cmd.arg(format!("docker://{src}"))
        .arg(format!("dir:{}", dest.display()));
    let out = run_with_timeout(&mut cmd, Duration::from_secs(60));
    if out.success() {
        Ok(())
    } else {
        Err(out.stderr)
    }
}

/// With htpasswd and TLS on: skopeo pulls over HTTPS with the right
/// credentials; without credentials it is refused; every route but the probes
/// answers 401 with a Basic challenge (the `/v2/` ping too); a wrong password
/// is logged without the password.
#[test]
fn htpasswd_and_https_front() {
    let up = Upstream::start();
    let img = seed_image(&up, "org/img", "1", &[30_000]);
    let pki = Pki::new();
    let work = temp_dir("regcache-front-");
    let htpasswd = htpasswd_file(work.path(), "alice", "s3cret-front");
    let config = config_json(&[(&up.url(), &["upstream.test"])]);
    let rc = Regcache::start_with_env(
        &config,
        &work.path().join("storage"),
        &[
            ("REGISTRY_AUTH_HTPASSWD_PATH", &htpasswd),
            ("REGISTRY_AUTH_HTPASSWD_REALM", "regcache-test"),
            ("REGISTRY_HTTP_TLS_CERTIFICATE", &pki.path("server.crt")),
            ("REGISTRY_HTTP_TLS_KEY", &pki.path("server.key")),
        ],
    );
    let base = format!("https://{}", rc.addr());
    let ca = pki.path("ca.crt");

    let (ok, out) = curl(&["--cacert", &ca, &format!("{base}/v2/")]);
    assert!(ok, "{out}");
    assert!(out.contains(" 401"), "{out}");
    assert!(
        out.to_lowercase()
            .contains("www-authenticate: basic realm=\"regcache-test\""),
        "{out}"
    );
    let (_, out) = curl(&[
        "--cacert",
        &ca,
        &format!("{base}/v2/upstream.test/org/img/manifests/1"),
    ]);
    assert!(
        out.contains(" 401") && out.contains("UNAUTHORIZED"),
        "{out}"
    );
    let (_, out) = curl(&["--cacert", &ca, &format!("{base}/api/v1/cache")]);
    assert!(out.contains(" 401"), "inventory must be closed too: {out}");
    let (_, out) = curl(&["--cacert", &ca, &format!("{base}/healthz")]);
    assert!(out.contains(" 200"), "probes stay open: {out}");
    let (_, out) = curl(&[
        "--cacert",
        &ca,
        "-u",
        "alice:s3cret-front",
        &format!("{base}/v2/"),
    ]);
    assert!(out.contains(" 200"), "{out}");

    let src = format!("{}/upstream.test/org/img:1", rc.addr());
    let certs = pki.path("certs.d");
    let err = skopeo_tls(&src, &work.path().join("anon"), &certs, None).unwrap_err();
    assert!(
        err.to_lowercase().contains("unauthorized") || err.contains("401"),
        "{err}"
    );
    let err = skopeo_tls(
        &src,
        &work.path().join("wrong"),
        &certs,
        Some("alice:not-the-pass"),
    )
    .unwrap_err();
    assert!(
        err.to_lowercase().contains("unauthorized") || err.contains("401"),
        "{err}"
    );
    let dest = work.path().join("ok");
    skopeo_tls(&src, &dest, &certs, Some("alice:s3cret-front")).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        read_dir_copy(&dest).manifest_digest,
        img.image.manifest_digest
    );

    // The container HEALTHCHECK speaks TLS to a TLS front (and /readyz
    // needs no login); plain HTTP to it fails.
    let health = |tls: bool| {
        let mut cmd = Command::new(regcache_bin());
        cmd.args(["healthcheck", "--listen", rc.addr()])
            .env_remove("REGCACHE_METRICS_LISTEN")
            .env_remove("REGISTRY_HTTP_TLS_CERTIFICATE");
        if tls {
            cmd.env("REGISTRY_HTTP_TLS_CERTIFICATE", pki.path("server.crt"));
        }
        run_with_timeout(&mut cmd, Duration::from_secs(20))
    };
    let ok = health(true);
    assert!(ok.success(), "healthcheck over TLS: {}", ok.stderr);
    assert!(
        !health(false).success(),
        "plain HTTP to a TLS front cannot be healthy"
    );

    let log = std::fs::read_to_string(rc.log_path()).unwrap();
    assert!(
        log.contains("authentication failed"),
        "failed login not logged"
    );
    assert!(
        !log.contains("not-the-pass") && !log.contains("s3cret-front"),
        "password in the log"
    );

    // The upstream never saw the client's credentials.
    assert!(
        !up.access_log().iter().any(|l| l.contains("alice")),
        "client credentials reached the upstream"
    );
}

/// With REGISTRY_HTTP_TLS_CLIENTCAS_0 the front wants a client certificate
/// signed by that CA: without one the handshake fails, with one it answers.
#[test]
fn client_certificates_required_when_configured() {
    let up = Upstream::start();
    let pki = Pki::new();
    let work = temp_dir("regcache-mtls-");
    let config = config_json(&[(&up.url(), &["upstream.test"])]);
    let rc = Regcache::start_with_env(
        &config,
        &work.path().join("storage"),
        &[
            ("REGISTRY_HTTP_TLS_CERTIFICATE", &pki.path("server.crt")),
            ("REGISTRY_HTTP_TLS_KEY", &pki.path("server.key")),
            ("REGISTRY_HTTP_TLS_CLIENTCAS_0", &pki.path("ca.crt")),
        ],
    );
    let url = format!("https://{}/v2/", rc.addr());
    let ca = pki.path("ca.crt");
    let (ok, out) = curl(&["--cacert", &ca, &url]);
    assert!(
        !ok || !out.contains(" 200"),
        "no client certificate, yet: {out}"
    );
    let (ok, out) = curl(&[
        "--cacert",
        &ca,
        "--cert",
        &pki.path("client.crt"),
        "--key",
        &pki.path("client.key"),
        &url,
    ]);
    assert!(ok && out.contains(" 200"), "{out}");
}

/// What a worker would refuse stops regcache before anything starts (exit
/// 64 naming the item, nothing listening): a credentials file it cannot
/// read, a storage driver it does not have. `check-config` only warns about
/// these, since CONFIGs are often checked away from where they run.
#[test]
fn worker_settings_are_checked_before_start() {
    let config = serde_json::json!([
        "ghcr.io",
        {"registry": "quay.io", "variables": {
            "REGISTRY_PROXY_USERNAME": "u",
            "REGISTRY_PROXY_PASSWORD_FILE": "/nonexistent/regcache-password"}},
    ])
    .to_string();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let work = temp_dir("regcache-workerenv-");
    let serve = |config: &str, env: &[(&str, &str)]| {
        let mut cmd = Command::new(regcache_bin());
        cmd.args(["--listen", &listen, "--storage"])
            .arg(work.path().join("storage"))
            .env("CONFIG", config)
            .envs(env.iter().copied());
        run_with_timeout(&mut cmd, Duration::from_secs(20))
    };
    let out = serve(&config, &[]);
    assert_eq!(
        out.status.and_then(|s| s.code()),
        Some(64),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("item 1") && out.stderr.contains("/nonexistent/regcache-password"),
        "{}",
        out.stderr
    );
    let out = serve(r#"["ghcr.io"]"#, &[("REGISTRY_STORAGE", "s3")]);
    assert_eq!(
        out.status.and_then(|s| s.code()),
        Some(64),
        "{}",
        out.stderr
    );
    assert!(out.stderr.contains("REGISTRY_STORAGE=s3"), "{}", out.stderr);
    assert!(!port_is_open(&listen));
    assert!(
        !work.path().join("storage").exists(),
        "nothing may be created"
    );

    let out = run_with_timeout(
        Command::new(regcache_bin())
            .arg("check-config")
            .env("CONFIG", &config),
        Duration::from_secs(20),
    );
    assert!(out.success(), "check-config: {}", out.stderr);
    assert!(
        out.stderr.contains("/nonexistent/regcache-password"),
        "{}",
        out.stderr
    );
}

/// An invalid front configuration stops regcache before it binds: a missing
/// htpasswd file, half a TLS pair.
#[test]
fn bad_front_settings_are_refused_at_start() {
    let up = Upstream::start();
    let work = temp_dir("regcache-badfront-");
    let config = config_json(&[(&up.url(), &["upstream.test"])]);
    for env in [
        vec![("REGISTRY_AUTH_HTPASSWD_PATH", "/nonexistent/htpasswd")],
        vec![("REGISTRY_HTTP_TLS_CERTIFICATE", "/nonexistent/cert.pem")],
    ] {
        let err = Regcache::try_start_with_env(&config, &work.path().join("s"), &env)
            .err()
            .unwrap_or_else(|| panic!("{env:?} was accepted"));
        assert!(
            err.contains("REGISTRY_AUTH_HTPASSWD_PATH") || err.contains("REGISTRY_HTTP_TLS"),
            "{env:?}: {err}"
        );
    }
}

/// A forward proxy on loopback that records the first request line of
/// every connection and relays the bytes both ways: plain-HTTP requests as
/// they come (Go's server, the upstream, accepts absolute-form request
/// lines as they are), and `CONNECT` tunnels, counting what each tunnel
/// carried toward the client.
struct ForwardProxy {
    addr: String,
    seen: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    tunneled: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

/// A writer that counts what passes through it.
struct Counting<W> {
    inner: W,
    count: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl<W: std::io::Write> std::io::Write for Counting<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.count
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl ForwardProxy {
    fn start() -> ForwardProxy {
        use std::io::{BufRead, BufReader, Write};
        use std::net::{TcpListener, TcpStream};
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let tunneled = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (log, count) = (seen.clone(), tunneled.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let (log, count) = (log.clone(), count.clone());
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(client.try_clone().unwrap());
                    let mut head = Vec::new();
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let end = line == "\r\n";
                        head.push(line);
                        if end {
                            break;
                        }
                    }
                    let first = head[0].trim().to_string();
                    log.lock().unwrap().push(first.clone());
                    let tunnel = first.starts_with("CONNECT ");
                    let target = first.split_whitespace().nth(1).unwrap_or("");
                    let authority = target
                        .trim_start_matches("http://")
                        .split('/')
                        .next()
                        .unwrap_or("");
                    let Ok(mut upstream) = TcpStream::connect(authority) else {
                        return;
                    };
                    let mut client_w = Counting {
                        inner: client,
                        count: match tunnel {
                            true => count,
                            false => Default::default(),
                        },
                    };
                    if tunnel {
                        client_w
                            .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                            .unwrap();
                    } else {
                        upstream.write_all(head.concat().as_bytes()).unwrap();
                    }
                    let buffered = reader.buffer().to_vec();
                    upstream.write_all(&buffered).unwrap();
                    let mut up_r = upstream.try_clone().unwrap();
                    let mut cl_r = reader.into_inner();
                    let t = std::thread::spawn(move || {
                        let _ = std::io::copy(&mut cl_r, &mut upstream);
                        let _ = upstream.shutdown(std::net::Shutdown::Write);
                    });
                    let _ = std::io::copy(&mut up_r, &mut client_w);
                    let _ = client_w.inner.shutdown(std::net::Shutdown::Both);
                    let _ = t.join();
                });
            }
        });
        ForwardProxy {
            addr,
            seen,
            tunneled,
        }
    }

    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }

    /// Bytes the `CONNECT` tunnels carried toward the client so far.
    fn tunneled(&self) -> u64 {
        self.tunneled.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// `http_proxy` carries the worker's upstream traffic through the proxy;
/// `no_proxy` naming the upstream host takes it off again.
#[test]
fn upstream_traffic_goes_through_the_configured_proxy() {
    let up = Upstream::start();
    let img = seed_image(&up, "org/proxied", "1", &[20_000]);
    let proxy = ForwardProxy::start();
    let work = temp_dir("regcache-proxy-");
    let config = config_json(&[(&up.url(), &["upstream.test"])]);
    let proxy_url = format!("http://{}", proxy.addr);
    let rc = Regcache::start_with_env(
        &config,
        &work.path().join("storage"),
        &[
            ("http_proxy", &proxy_url),
            ("HTTP_PROXY", &proxy_url),
            ("no_proxy", ""),
            ("NO_PROXY", ""),
        ],
    );
    pull_and_check_image(
        &format!("{}/upstream.test/org/proxied:1", rc.addr()),
        &img.image,
        &work.path().join("pulled"),
    );
    let seen = proxy.seen();
    let via_proxy = format!("http://{}/v2/org/proxied/", up.addr());
    assert!(
        seen.iter().any(|l| l.contains(&via_proxy)),
        "the proxy saw no upstream request: {seen:?}"
    );
    // Blob bodies have a client, and so connections, of their own.
    let blob_via_proxy = format!("GET {via_proxy}blobs/sha256:");
    assert!(
        seen.iter().any(|l| l.starts_with(&blob_via_proxy)),
        "blob bodies bypassed the proxy: {seen:?}"
    );
    drop(rc);

    let before = proxy.seen().len();
    let direct = Regcache::start_with_env(
        &config,
        &work.path().join("storage2"),
        &[("http_proxy", &proxy_url), ("no_proxy", "127.0.0.1")],
    );
    pull_and_check_image(
        &format!("{}/upstream.test/org/proxied:1", direct.addr()),
        &img.image,
        &work.path().join("direct"),
    );
    assert_eq!(
        proxy.seen().len(),
        before,
        "no_proxy was ignored: {:?}",
        proxy.seen()
    );
}

/// An access policy over htpasswd users: alice may pull the private
/// repository, bob may not (403 DENIED), and clients without credentials may
/// pull only the public one (else 401, which makes clients log in); the
/// catalog shows each caller what it may pull. skopeo pulls with and
/// without credentials.
#[test]
fn access_policy_grants_repositories_per_user() {
    let up = Upstream::start();
    let private = seed_image(&up, "org/private/app", "1", &[50_000]);
    let public = seed_image(&up, "org/public/app", "1", &[40_000]);
    let work = temp_dir("regcache-e2e-");
    let mut users = String::new();
    for (user, pass) in [("alice", "pw-alice"), ("bob", "pw-bob")] {
        let out = Command::new("htpasswd")
            .args(["-Bbn", user, pass])
            .output()
            .unwrap();
        users.push_str(String::from_utf8_lossy(&out.stdout).trim());
        users.push('\n');
    }
    let htpasswd = work.path().join("htpasswd");
    std::fs::write(&htpasswd, users).unwrap();
    let policy = work.path().join("access");
    std::fs::write(
        &policy,
        "alice      upstream.test/org/private/*\nanonymous  upstream.test/org/public/*\n",
    )
    .unwrap();
    let storage = temp_dir("regcache-storage-");
    let rc = Regcache::start_with_env(
        &config_json(&[(&up.url(), &["upstream.test"])]),
        &storage.path().join("storage"),
        &[
            (
                "REGISTRY_AUTH_HTPASSWD_PATH",
                &htpasswd.display().to_string(),
            ),
            ("REGCACHE_ACCESS_FILE", &policy.display().to_string()),
        ],
    );
    let cache = rc.addr().to_owned();
    let pull = |image: &str, creds: Option<&str>, dest: &str| {
        let mut cmd = skopeo_command();
        cmd.args(["copy", "-q", "--src-tls-verify=false"]);
        match creds {
            Some(c) => cmd.args(["--src-creds", c]),
            None => cmd.arg("--src-no-creds"),
        };
        cmd.arg(format!("docker://{cache}/upstream.test/{image}"))
            .arg(format!("dir:{}", work.path().join(dest).display()));
        run_with_timeout(&mut cmd, Duration::from_secs(60))
    };
    let out = pull("org/private/app:1", Some("alice:pw-alice"), "alice");
    assert!(out.success(), "alice: {}", out.stderr);
    check_image_copy("alice", &private.image, &work.path().join("alice"));
    let out = pull("org/private/app:1", Some("bob:pw-bob"), "bob");
    assert!(!out.success(), "bob pulled the private image");
    assert!(
        out.stderr.to_lowercase().contains("denied"),
        "bob: {}",
        out.stderr
    );
    let out = pull("org/public/app:1", None, "anonymous");
    assert!(out.success(), "anonymous: {}", out.stderr);
    check_image_copy("anonymous", &public.image, &work.path().join("anonymous"));

    let path = "/v2/upstream.test/org/private/app/manifests/1";
    let accept = ("Accept", MANIFEST_ACCEPT);
    let r = http(&cache, "GET", path, &[accept]).unwrap();
    assert_eq!(r.status, 401, "anonymous: {}", r.describe());
    assert!(r
        .header("WWW-Authenticate")
        .is_some_and(|v| v.starts_with("Basic")));
    let bob = format!("Basic {}", base64_encode(b"bob:pw-bob"));
    let r = http(&cache, "GET", path, &[accept, ("Authorization", &bob)]).unwrap();
    assert_eq!(
        (r.status, r.error_codes()),
        (403, vec!["DENIED".to_string()]),
        "bob: {}",
        r.describe()
    );
    let r = http(&cache, "GET", "/v2/_catalog", &[("Authorization", &bob)]).unwrap();
    assert_eq!(
        r.json()["repositories"],
        serde_json::json!(["upstream.test/org/public/app"]),
        "{}",
        r.describe()
    );
    let alice = format!("Basic {}", base64_encode(b"alice:pw-alice"));
    let r = http(&cache, "GET", "/v2/_catalog", &[("Authorization", &alice)]).unwrap();
    assert_eq!(
        r.json()["repositories"],
        serde_json::json!([
            "upstream.test/org/private/app",
            "upstream.test/org/public/app"
        ]),
        "{}",
        r.describe()
    );
}

/// An upstream with a certificate from a private CA (here a regcache front
/// with the test PKI in front of the real registry): refused by default,
/// trusted with REGCACHE_UPSTREAM_CA_FILE, and with
/// REGCACHE_UPSTREAM_TLS_SKIP_VERIFY taken on trust with a warning; and
/// what a system without a CA bundle still does.
#[test]
fn upstream_ca_bundle_and_skip_verify() {
    let up = Upstream::start();
    let img = seed_image(&up, "org/app", "1", &[30_000]);
    let pki = Pki::new();
    let tls_storage = temp_dir("regcache-storage-");
    let tls_front = Regcache::start_with_env(
        &config_json(&[(&up.url(), &["docker.io"])]),
        &tls_storage.path().join("storage"),
        &[
            ("REGISTRY_HTTP_TLS_CERTIFICATE", &pki.path("server.crt")),
            ("REGISTRY_HTTP_TLS_KEY", &pki.path("server.key")),
        ],
    );
    let in_house = format!("https://{}", tls_front.addr());
    let config = config_json(&[(&in_house, &["in.house"])]);
    let work = temp_dir("regcache-e2e-");
    let pull = |env: &[(&str, &str)], dest: &str| {
        let storage = temp_dir("regcache-storage-");
        let rc = Regcache::start_with_env(&config, &storage.path().join("storage"), env);
        let r = skopeo_copy(
            &format!("{}/in.house/org/app:1", rc.addr()),
            &work.path().join(dest),
            false,
        );
        (r, rc.log_tail(200))
    };
    let (refused, _) = pull(&[("REGCACHE_BREAKER_FAILURES", "0")], "untrusted");
    assert!(refused.is_err(), "an unknown CA was trusted");
    let ca = pki.path("ca.crt");
    let (trusted, _) = pull(&[("REGCACHE_UPSTREAM_CA_FILE", &ca)], "trusted");
    trusted.unwrap_or_else(|e| panic!("with the CA bundle: {e}"));
    check_image_copy("trusted", &img.image, &work.path().join("trusted"));
    let (skipped, log) = pull(&[("REGCACHE_UPSTREAM_TLS_SKIP_VERIFY", "true")], "skipped");
    skipped.unwrap_or_else(|e| panic!("with verification off: {e}"));
    assert!(
        log.contains("NOT verified"),
        "no warning about skipped verification:\n{log}"
    );

    // With no system CA bundle (SSL_CERT_FILE and SSL_CERT_DIR empty, as in
    // a bare container) the CA file alone suffices; without it the pull
    // fails and says why, and the worker stays up. The bundle is read at the
    // first handshake that needs it, so a plain-HTTP upstream never misses it.
    let (file, dir) = (
        work.path().join("no-roots.pem"),
        work.path().join("no-roots"),
    );
    std::fs::write(&file, "").unwrap();
    std::fs::create_dir(&dir).unwrap();
    let no_roots = [
        ("SSL_CERT_FILE", file.to_str().unwrap()),
        ("SSL_CERT_DIR", dir.to_str().unwrap()),
    ];
    let (trusted, _) = pull(
        &[&no_roots[..], &[("REGCACHE_UPSTREAM_CA_FILE", &ca)]].concat(),
        "ca-only",
    );
    trusted.unwrap_or_else(|e| panic!("with the CA bundle and no system roots: {e}"));
    check_image_copy("ca-only", &img.image, &work.path().join("ca-only"));
    let storage = temp_dir("regcache-storage-");
    let rc = Regcache::start_with_env(
        &config,
        &storage.path().join("storage"),
        &[&no_roots[..], &[("REGCACHE_BREAKER_FAILURES", "0")]].concat(),
    );
    let workers = rc.worker_pids();
    let refused = skopeo_copy(
        &format!("{}/in.house/org/app:1", rc.addr()),
        &work.path().join("refused"),
        false,
    );
    assert!(
        refused.is_err(),
        "a certificate passed with no roots at all"
    );
    let log = rc.log_tail(200);
    assert!(
        log.contains("No CA certificates were loaded from the system"),
        "the failure does not say why:\n{log}"
    );
    assert_eq!(rc.worker_pids(), workers, "the worker did not stay up");
    let storage = temp_dir("regcache-storage-");
    let plain = Regcache::start_with_env(
        &config_json(&[(&up.url(), &["docker.io"])]),
        &storage.path().join("storage"),
        &no_roots,
    );
    skopeo_copy(
        &format!("{}/docker.io/org/app:1", plain.addr()),
        &work.path().join("plain"),
        false,
    )
    .unwrap_or_else(|e| panic!("a plain-HTTP upstream with no system roots: {e}"));
    check_image_copy("plain", &img.image, &work.path().join("plain"));
}

/// `https_proxy` takes an upstream over TLS through `CONNECT` tunnels: the
/// API requests and the blob bodies (the tunnels carry more than the
/// layer), verified end to end against the upstream's own certificate.
#[test]
fn tls_upstream_traffic_goes_through_a_connect_proxy() {
    let up = Upstream::start();
    let layer = 300_000;
    let img = seed_image(&up, "org/tunneled", "1", &[layer]);
    let pki = Pki::new();
    let tls = up.tls_twin(&pki.path("server.crt"), &pki.path("server.key"));
    let proxy = ForwardProxy::start();
    let proxy_url = format!("http://{}", proxy.addr);
    let storage = temp_dir("regcache-storage-");
    let rc = Regcache::start_with_env(
        &config_json(&[(&tls.url(), &["tls.up"])]),
        &storage.path().join("storage"),
        &[
            ("REGCACHE_UPSTREAM_CA_FILE", &pki.path("ca.crt")),
            ("https_proxy", &proxy_url),
            ("HTTPS_PROXY", &proxy_url),
            ("no_proxy", ""),
            ("NO_PROXY", ""),
        ],
    );
    let work = temp_dir("regcache-e2e-");
    let dest = work.path().join("img");
    skopeo_copy(
        &format!("{}/tls.up/org/tunneled:1", rc.addr()),
        &dest,
        false,
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", rc.log_tail(50)));
    check_image_copy("through the tunnel", &img.image, &dest);
    let seen = proxy.seen();
    let connect = format!("CONNECT {} ", tls.addr());
    assert!(
        seen.iter().any(|l| l.starts_with(&connect)),
        "no tunnel to the upstream: {seen:?}"
    );
    assert!(
        proxy.tunneled() > layer as u64,
        "the layer did not come through the tunnels ({} bytes did): {seen:?}",
        proxy.tunneled()
    );
}

/// From an upstream that offers HTTP/2 (TLS, ALPN), the API requests come
/// over HTTP/2 and blob bodies over HTTP/1.1 (kernel-sized windows: see
/// `worker/src/upstream.rs`), and the image arrives whole.
#[test]
fn blob_bodies_come_over_http1_and_the_api_over_http2() {
    let up = Upstream::start();
    let img = seed_image(&up, "org/app", "1", &[300_000, 20_000]);
    let pki = Pki::new();
    let tls = up.tls_twin(&pki.path("server.crt"), &pki.path("server.key"));
    let storage = temp_dir("regcache-storage-");
    let ca = pki.path("ca.crt");
    let rc = Regcache::start_with_env(
        &config_json(&[(&tls.url(), &["tls.up"])]),
        &storage.path().join("storage"),
        &[("REGCACHE_UPSTREAM_CA_FILE", &ca)],
    );
    let work = temp_dir("regcache-e2e-");
    let dest = work.path().join("img");
    skopeo_copy(&format!("{}/tls.up/org/app:1", rc.addr()), &dest, false)
        .unwrap_or_else(|e| panic!("{e}\n{}", rc.log_tail(50)));
    check_image_copy("over TLS", &img.image, &dest);
    let log = tls.access_log();
    let of = |what: &str| -> Vec<&String> { log.iter().filter(|l| l.contains(what)).collect() };
    let (blobs, manifests) = (of("\"GET /v2/org/app/blobs/"), of("/v2/org/app/manifests/"));
    assert_eq!(blobs.len(), 3, "config and two layers, once each: {log:#?}");
    assert!(!manifests.is_empty(), "{log:#?}");
    assert!(
        blobs.iter().all(|l| l.contains(" HTTP/1.1\"")),
        "{blobs:#?}"
    );
    assert!(
        manifests.iter().all(|l| l.contains(" HTTP/2.0\"")),
        "{manifests:#?}"
    );
}

/// Over TLS, an HTTP/2 and an HTTP/1.1 client of one blob still being
/// filled (the upstream holds it after 256 KiB until both are attached)
/// each get the whole blob, read by the front from the fill's spool, with
/// one upstream GET.
#[test]
fn tls_and_http2_clients_of_a_fill_in_flight_get_whole_blobs() {
    use support::fake::{FakeRegistry, Gate, Serve};
    let fake = FakeRegistry::start();
    let blob = fake.add_blob("org/img", &random_bytes((2 << 20) + 11));
    let gate = Gate::new();
    fake.set(&blob.path, Serve::ok().pause_at(256 << 10, &gate));
    let pki = Pki::new();
    let work = temp_dir("regcache-tls-fill-");
    let rc = Regcache::start_with_env(
        &config_json(&[(&fake.url(), &["upstream.test"])]),
        &work.path().join("storage"),
        &[
            ("REGISTRY_HTTP_TLS_CERTIFICATE", &pki.path("server.crt")),
            ("REGISTRY_HTTP_TLS_KEY", &pki.path("server.key")),
        ],
    );
    let ca = pki.path("ca.crt");
    let base = format!("https://{}", rc.addr());
    let url = format!("{base}{}", blob.path_via("upstream.test"));
    let clients: Vec<_> = ["--http2", "--http1.1"]
        .into_iter()
        .map(|version| {
            let out = work.path().join(version.trim_start_matches('-'));
            let child = Command::new("curl")
                .args([
                    "-sS",
                    "--cacert",
                    &ca,
                    version,
                    "-w",
                    "%{http_version} %{http_code}",
                ])
                .arg("-o")
                .arg(&out)
                .arg(&url)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("run curl");
            (version, out, child)
        })
        .collect();
    let followed = || {
        let (_, page) = curl(&["--cacert", &ca, &format!("{base}/metrics")]);
        metric(&page, "regcache_fill_answers_followed_total", &[]).unwrap_or(0.0)
    };
    let attached = wait_for(Duration::from_secs(20), || {
        (followed() >= 2.0).then_some(())
    });
    gate.open();
    assert!(
        attached.is_some(),
        "both clients should be attached to the fill, read from its spool"
    );
    for (version, out, child) in clients {
        let done = child.wait_with_output().expect("curl ends");
        let meta = String::from_utf8_lossy(&done.stdout);
        let want = if version == "--http2" {
            "2 200"
        } else {
            "1.1 200"
        };
        assert_eq!(
            meta,
            want,
            "{version}: {}",
            String::from_utf8_lossy(&done.stderr)
        );
        let body = std::fs::read(&out).expect("curl's output");
        assert_eq!(sha256_digest(&body), blob.digest, "{version}: bytes");
    }
    assert_eq!(
        fake.count("GET", &blob.path),
        1,
        "{}",
        fake.describe_requests()
    );
}
