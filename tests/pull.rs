//! End-to-end pulls through the `regcache` binary with skopeo, against real
//! upstream registries (`docker-registry`, distribution 2.8) seeded with
//! random images. Black-box: only the command line, the port, the child
//! processes and the storage directory are looked at.
//!
//! Run: `cargo test --test pull -- --test-threads=2`
//! Needs: skopeo, docker-registry (and htpasswd for auth tests) on PATH.

use regcache_testkit as support;

use std::collections::BTreeSet;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use support::*;

/// Pull `reference` with `--all` and check the index and every platform's
/// manifest and blobs arrived unchanged.
fn pull_and_check_index(reference: &str, expected: &SeededIndex, dest: &Path) {
    skopeo_copy(reference, dest, true).unwrap_or_else(|e| panic!("{e}"));
    let copy = read_dir_copy(dest);
    assert_eq!(
        copy.manifest_digest, expected.index_digest,
        "{reference}: index digest"
    );
    assert_eq!(
        copy.manifest, expected.index,
        "{reference}: index bytes changed"
    );
    for image in &expected.images {
        assert_eq!(
            copy.child_manifests.get(&image.manifest_digest),
            Some(&image.manifest),
            "{reference}: {} manifest missing or changed",
            image.architecture
        );
        for blob in image.blob_digests() {
            assert!(
                copy.has_blob(&blob),
                "{reference}: {} blob {blob} missing",
                image.architecture
            );
        }
    }
}

/// Top-level entries of `dir`, as names.
fn entries(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// Files under `storage` whose path has a component containing `..`.
fn dotdot_paths(storage: &Path) -> Vec<String> {
    walk(storage)
        .into_iter()
        .filter(|p| {
            p.components()
                .any(|c| c.as_os_str().to_string_lossy().contains(".."))
        })
        .map(|p| p.display().to_string())
        .collect()
}

/// Pulls through the path prefix, the `--all` index and the bare Docker Hub
/// form work and give the upstream's exact bytes; then, with every upstream
/// stopped, the same images come from the cache by tag and by digest, and
/// still do after regcache restarts on the same storage.
#[test]
fn pull_through_then_serve_from_cache_with_upstream_down() {
    let mut prefixed = Upstream::start();
    let mut hub = Upstream::start();
    let img = seed_multi_layer_image(&prefixed, "org/img", "1.0");
    let multi = seed_index(&prefixed, "org/multi", "2.0");
    let small = seed_image(&hub, "library/small", "1", &[300_000, 5_000]);

    let work = temp_dir("regcache-e2e-");
    let storage_parent = temp_dir("regcache-storage-");
    let storage = storage_parent.path().join("storage");
    // docker.io entry second: bare names must go to it, not to the first entry.
    let config = config_json(&[
        (&prefixed.url(), &["upstream.test"]),
        (&hub.url(), &["docker.io"]),
    ]);
    let mut rc = Regcache::start(&config, &storage);
    let cache = rc.addr().to_owned();

    // Cold pulls (through to the upstreams).
    let img_tag = format!("{cache}/upstream.test/org/img:1.0");
    let img_digest = format!(
        "{cache}/upstream.test/org/img@{}",
        img.image.manifest_digest
    );
    let multi_tag = format!("{cache}/upstream.test/org/multi:2.0");
    let multi_digest = format!("{cache}/upstream.test/org/multi@{}", multi.index_digest);
    let small_tag = format!("{cache}/small:1");
    let small_digest = format!("{cache}/small@{}", small.image.manifest_digest);

    pull_and_check_image(&img_tag, &img.image, &work.path().join("cold-img"));
    pull_and_check_index(&multi_tag, &multi, &work.path().join("cold-multi"));
    // Without --all skopeo picks linux/amd64 from the index.
    pull_and_check_image(
        &multi_tag,
        multi.platform("amd64"),
        &work.path().join("cold-multi-amd64"),
    );
    pull_and_check_image(&small_tag, &small.image, &work.path().join("cold-small"));
    // The long form of a Docker Hub name reaches the same image.
    pull_and_check_image(
        &format!("{cache}/library/small:1"),
        &small.image,
        &work.path().join("cold-small-long"),
    );

    // Upstreams gone: everything again, from the cache, by tag and by digest.
    prefixed.stop();
    hub.stop();
    let from_cache = |label: &str| {
        let dir = work.path().join(label);
        pull_and_check_image(&img_tag, &img.image, &dir.join("img-tag"));
        pull_and_check_image(&img_digest, &img.image, &dir.join("img-digest"));
        pull_and_check_index(&multi_tag, &multi, &dir.join("multi-tag"));
        pull_and_check_index(&multi_digest, &multi, &dir.join("multi-digest"));
        pull_and_check_image(
            &format!(
                "{cache}/upstream.test/org/multi@{}",
                multi.platform("arm64").manifest_digest
            ),
            multi.platform("arm64"),
            &dir.join("multi-arm64-digest"),
        );
        pull_and_check_image(&small_tag, &small.image, &dir.join("small-tag"));
        pull_and_check_image(&small_digest, &small.image, &dir.join("small-digest"));
    };
    from_cache("warm");

    // Restart on the same storage, upstreams still down.
    let workers_before = rc.worker_pids();
    let status = rc.stop();
    // Workers die with the supervisor (allow them a moment).
    let alive = || -> Vec<i32> {
        workers_before
            .iter()
            .copied()
            .filter(|p| is_alive(*p))
            .collect()
    };
    let _ = wait_for(Duration::from_secs(3), || alive().is_empty().then_some(()));
    let leftover = alive();
    // A clean stop leaves nothing in TMPDIR (the contract: nothing written
    // outside --storage; at least nothing left behind).
    let tmp_left = walk(rc.tmp_dir());
    assert!(
        !workers_before.is_empty(),
        "no worker processes seen before the stop"
    );
    rc.restart();
    let cache_after = rc.addr().to_owned();
    let rebased = |r: &str| r.replacen(&cache, &cache_after, 1);
    {
        let dir = work.path().join("restarted");
        pull_and_check_image(&rebased(&img_tag), &img.image, &dir.join("img-tag"));
        pull_and_check_image(&rebased(&img_digest), &img.image, &dir.join("img-digest"));
        pull_and_check_index(&rebased(&multi_tag), &multi, &dir.join("multi-tag"));
        pull_and_check_index(&rebased(&multi_digest), &multi, &dir.join("multi-digest"));
        pull_and_check_image(&rebased(&small_tag), &small.image, &dir.join("small-tag"));
        pull_and_check_image(
            &rebased(&small_digest),
            &small.image,
            &dir.join("small-digest"),
        );
    }

    // Checked last so a shutdown problem does not hide the cache results.
    assert!(
        status.success(),
        "regcache exited with {status} on SIGTERM (expected 0)"
    );
    assert!(
        tmp_left.is_empty(),
        "regcache left files in its TMPDIR after SIGTERM: {tmp_left:?}"
    );
    assert!(
        leftover.is_empty(),
        "workers {leftover:?} still alive after the supervisor stopped"
    );
    assert_eq!(
        entries(storage_parent.path()),
        BTreeSet::from(["storage".to_owned()]),
        "regcache wrote beside its storage directory"
    );
    assert!(
        dotdot_paths(&storage).is_empty(),
        "paths with '..': {:?}",
        dotdot_paths(&storage)
    );
}

/// The worker serving `up` (alias `alias`): found by its command line or,
/// failing that, its environment mentioning the upstream's address or alias.
fn worker_for(rc: &Regcache, up: &Upstream, alias: &str) -> Option<i32> {
    let mentions = |text: &str| text.contains(&up.addr()) || text.contains(alias);
    let workers = rc.workers();
    let by_cmdline: Vec<i32> = workers
        .iter()
        .filter(|(_, c)| mentions(c))
        .map(|(p, _)| *p)
        .collect();
    if by_cmdline.len() == 1 {
        return Some(by_cmdline[0]);
    }
    let by_env: Vec<i32> = workers
        .iter()
        .filter(|(p, _)| {
            std::fs::read(format!("/proc/{p}/environ"))
                .map(|e| mentions(&String::from_utf8_lossy(&e)))
                .unwrap_or(false)
        })
        .map(|(p, _)| *p)
        .collect();
    (by_env.len() == 1).then(|| by_env[0])
}

/// A worker killed with SIGKILL takes only its own upstream down: the other
/// upstream serves (even a cold pull) right away, the killed one answers 503
/// or works, and within ~10 s a new worker serves it again.
#[test]
fn killed_worker_is_restarted_and_other_upstream_keeps_serving() {
    let one = Upstream::start();
    let two = Upstream::start();
    let img_one = seed_image(&one, "org/one", "1", &[500_000, 2_000]);
    let img_two = seed_image(&two, "org/two", "1", &[400_000, 3_000]);

    let work = temp_dir("regcache-e2e-");
    let storage_parent = temp_dir("regcache-storage-");
    let config = config_json(&[(&one.url(), &["one.test"]), (&two.url(), &["two.test"])]);
    let rc = Regcache::start(&config, &storage_parent.path().join("storage"));
    let cache = rc.addr().to_owned();

    let workers = wait_for(Duration::from_secs(3), || {
        let w = rc.workers();
        (w.len() == 2).then_some(w)
    })
    .unwrap_or_else(|| {
        panic!(
            "expected 2 worker children of the supervisor, found {:?}",
            rc.workers()
        )
    });

    pull_and_check_image(
        &format!("{cache}/one.test/org/one:1"),
        &img_one.image,
        &work.path().join("one-before"),
    );

    let victim = worker_for(&rc, &one, "one.test").unwrap_or_else(|| {
        panic!("cannot tell which worker serves one.test from cmdline or environ: {workers:?}")
    });
    let survivor = worker_for(&rc, &two, "two.test")
        .unwrap_or_else(|| panic!("cannot tell which worker serves two.test: {workers:?}"));
    assert_ne!(victim, survivor);

    kill(Pid::from_raw(victim), Signal::SIGKILL).unwrap();
    let killed_at = Instant::now();

    // The other upstream, cold (never pulled before), right away.
    pull_and_check_image(
        &format!("{cache}/two.test/org/two:1"),
        &img_two.image,
        &work.path().join("two-during"),
    );

    // The killed one: by tag, 503 with a registry error body until its new
    // worker is up (the front cannot answer a tag itself); by digest, its
    // stored manifest from the front at once.
    let tag_path = "/v2/one.test/org/one/manifests/1";
    let during = http(&cache, "GET", tag_path, &[("Accept", MANIFEST_ACCEPT)])
        .unwrap_or_else(|e| panic!("GET {tag_path} right after the worker kill: {e}"));
    assert!(
        during.status == 200 || (during.status == 503 && !during.error_codes().is_empty()),
        "GET {tag_path} right after killing its worker: expected 503 with a registry error or 200, got {}",
        during.describe()
    );
    let digest_path = format!(
        "/v2/one.test/org/one/manifests/{}",
        img_one.image.manifest_digest
    );
    let stored = http(&cache, "GET", &digest_path, &[("Accept", MANIFEST_ACCEPT)]).unwrap();
    assert_eq!(
        stored.status,
        200,
        "stored manifest by digest while the worker restarts: {}",
        stored.describe()
    );

    // Back within ~10 s: a new worker, answering the tag.
    // "Within ~10 s": 12 s from the kill, leaving room for the pull above.
    let back = wait_for(
        Duration::from_secs(12).saturating_sub(killed_at.elapsed()),
        || {
            let new = worker_for(&rc, &one, "one.test").filter(|p| *p != victim)?;
            let r = http(&cache, "GET", tag_path, &[("Accept", MANIFEST_ACCEPT)]).ok()?;
            (r.status == 200).then_some(new)
        },
    );
    assert!(
        back.is_some(),
        "one.test not served by a new worker within 12 s of SIGKILL; workers now {:?}, last answer {:?}",
        rc.workers(),
        http(&cache, "GET", tag_path, &[("Accept", MANIFEST_ACCEPT)]).map(|r| r.describe())
    );
    pull_and_check_image(
        &format!("{cache}/one.test/org/one:1"),
        &img_one.image,
        &work.path().join("one-after"),
    );
    pull_and_check_image(
        &format!("{cache}/two.test/org/two:1"),
        &img_two.image,
        &work.path().join("two-after"),
    );
    assert_eq!(
        worker_for(&rc, &two, "two.test"),
        Some(survivor),
        "the worker of the other upstream was replaced too"
    );
}

/// Assert `resp` is a registry error with `status` and one of `codes`.
fn assert_error(what: &str, resp: &Response, status: u16, codes: &[&str]) {
    let got = resp.error_codes();
    assert!(
        resp.status == status && got.iter().any(|c| codes.contains(&c.as_str())),
        "{what}: expected {status} with code {codes:?}, got {}",
        resp.describe()
    );
}

/// Malformed names and digests, traversal attempts (plain and
/// percent-encoded), unknown upstreams and writes get the registry error the
/// spec asks for, and no request creates anything outside the storage
/// directory or any path with `..` in it.
#[test]
fn bad_requests_get_registry_errors_and_nothing_escapes_storage() {
    let up = Upstream::start();
    let img = seed_image(&up, "org/img", "1.0", &[10_000]);
    let storage_parent = temp_dir("regcache-storage-");
    let storage = storage_parent.path().join("storage");
    let rc = Regcache::start(&config_json(&[(&up.url(), &["upstream.test"])]), &storage);
    let cache = rc.addr().to_owned();
    let send = |method: &str, path: &str| {
        http(&cache, method, path, &[("Accept", MANIFEST_ACCEPT)])
            .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    };

    // The base endpoint.
    let base = send("GET", "/v2/");
    assert_eq!(base.status, 200, "GET /v2/: {}", base.describe());
    assert_eq!(
        base.header("Docker-Distribution-API-Version"),
        Some("registry/2.0"),
        "GET /v2/: {}",
        base.describe()
    );

    // Controls: the good forms work, so the errors below are about the input.
    let good = send("GET", "/v2/upstream.test/org/img/manifests/1.0");
    assert_eq!(good.status, 200, "control GET: {}", good.describe());
    assert_eq!(sha256_digest(&good.body), img.image.manifest_digest);
    let by_ns = send("GET", "/v2/org/img/manifests/1.0?ns=upstream.test");
    assert_eq!(
        by_ns.status,
        200,
        "GET ...?ns=upstream.test: {}",
        by_ns.describe()
    );
    assert_eq!(sha256_digest(&by_ns.body), img.image.manifest_digest);

    // A unique name as traversal target, searched for afterwards.
    let escape = format!("regcache-escape-{}", random_token());
    let e = &escape;

    let name_invalid = [
        "/v2/UPPER/x/manifests/1".to_owned(),
        "/v2/upstream.test/Org/img/manifests/1.0".to_owned(),
        "/v2/upstream.test/a//b/manifests/1".to_owned(),
        "/v2/upstream.test/org/img-/manifests/1".to_owned(),
        format!("/v2/upstream.test/../../{e}/manifests/1"),
        format!("/v2/upstream.test/org/../../../{e}/manifests/1"),
        format!("/v2/upstream.test/org/./{e}/manifests/1"),
        format!("/v2/upstream.test/%2e%2e/%2e%2e/{e}/manifests/1"),
        format!("/v2/upstream.test/org%2F..%2F..%2F{e}/manifests/1"),
        format!(
            "/v2/upstream.test/org%2f%2e%2e%2f%2e%2e%2f{e}/blobs/{}",
            img.image.config_digest
        ),
        format!("/v2/upstream.test/..%5C..%5C{e}/manifests/1"),
    ];
    for path in &name_invalid {
        assert_error(
            &format!("GET {path}"),
            &send("GET", path),
            400,
            &["NAME_INVALID"],
        );
    }
    // A first component that decodes to `..`: refused as a bad name, or as an
    // unknown host-like upstream (routing rule 3); never routed anywhere.
    for path in [
        format!("/v2/%2e%2e/%2e%2e/{e}/manifests/1"),
        format!("/v2/..%2F..%2F{e}/x/manifests/1"),
    ] {
        let r = send("GET", &path);
        assert!(
            (r.status == 400 && r.error_codes().iter().any(|c| c == "NAME_INVALID"))
                || (r.status == 404 && r.error_codes().iter().any(|c| c == "NAME_UNKNOWN")),
            "GET {path}: expected 400 NAME_INVALID or 404 NAME_UNKNOWN, got {}",
            r.describe()
        );
    }

    let digest_invalid = [
        "/v2/upstream.test/org/img/blobs/sha256:xyz".to_owned(),
        "/v2/upstream.test/org/img/blobs/sha256:".to_owned(),
        "/v2/upstream.test/org/img/manifests/sha256:short".to_owned(),
        format!("/v2/upstream.test/org/img/blobs/sha256:{}", "A".repeat(64)),
        format!("/v2/upstream.test/org/img/blobs/sha256:..%2F..%2F{e}"),
        format!(
            "/v2/upstream.test/org/img/blobs/{}%2F..%2F..%2F{e}",
            img.image.config_digest
        ),
    ];
    for path in &digest_invalid {
        assert_error(
            &format!("GET {path}"),
            &send("GET", path),
            400,
            &["DIGEST_INVALID"],
        );
    }

    // A tag that tries to climb out: refused as invalid input.
    for path in [
        format!("/v2/upstream.test/org/img/manifests/..%2F..%2F{e}"),
        "/v2/upstream.test/org/img/manifests/%2e%2e".to_string(),
        format!("/v2/upstream.test/org/img/manifests/.{e}"),
    ] {
        assert_error(
            &format!("GET {path}"),
            &send("GET", &path),
            400,
            &[
                "TAG_INVALID",
                "MANIFEST_INVALID",
                "NAME_INVALID",
                "DIGEST_INVALID",
            ],
        );
    }

    // Unknown upstream: 404 NAME_UNKNOWN that tells what is configured.
    for path in [
        "/v2/nope.example/x/manifests/1".to_owned(),
        "/v2/nope.example/x/blobs/sha256:0000000000000000000000000000000000000000000000000000000000000000"
            .to_owned(),
        "/v2/org/img/manifests/1.0?ns=nope.example".to_string(),
        format!("/v2/org/img/manifests/1.0?ns=..%2F..%2F{e}"),
    ] {
        let r = send("GET", &path);
        assert_error(&format!("GET {path}"), &r, 404, &["NAME_UNKNOWN"]);
        if path.starts_with("/v2/nope.example") {
            let text = r.text();
            assert!(
                text.contains("upstream.test") || text.contains(&up.addr()),
                "GET {path}: NAME_UNKNOWN should name the configured upstreams: {}",
                r.describe()
            );
        }
    }

    // Writes: 405 UNSUPPORTED with Allow, for every write method.
    for (method, path) in [
        (
            "POST",
            "/v2/upstream.test/org/img/blobs/uploads/".to_owned(),
        ),
        ("PUT", "/v2/upstream.test/org/img/manifests/1.0".to_owned()),
        (
            "PATCH",
            "/v2/upstream.test/org/img/blobs/uploads/some-uuid".to_owned(),
        ),
        (
            "DELETE",
            format!(
                "/v2/upstream.test/org/img/manifests/{}",
                img.image.manifest_digest
            ),
        ),
        (
            "DELETE",
            format!(
                "/v2/upstream.test/org/img/blobs/{}",
                img.image.config_digest
            ),
        ),
    ] {
        let r = http_with_body(
            &cache,
            method,
            &path,
            &[("Content-Type", OCI_MANIFEST)],
            b"{}",
        )
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        assert_error(&format!("{method} {path}"), &r, 405, &["UNSUPPORTED"]);
        let allow = r
            .header("Allow")
            .unwrap_or_else(|| panic!("{method} {path}: no Allow header: {}", r.describe()));
        assert!(
            allow.contains("GET") && allow.contains("HEAD") && !allow.contains(method),
            "{method} {path}: Allow {allow:?}"
        );
    }
    // The upstream was left untouched by those writes.
    let still = fetch_manifest_direct(&up, "org/img", "1.0");
    assert_eq!(
        still.status,
        200,
        "upstream manifest after the write attempts: {}",
        still.describe()
    );

    // Still healthy after all that.
    assert_eq!(send("GET", "/v2/").status, 200);
    drop(rc);

    // Nothing outside storage, no '..' inside it, the escape name nowhere.
    assert_eq!(
        entries(storage_parent.path()),
        BTreeSet::from(["storage".to_owned()]),
        "regcache created something beside its storage directory"
    );
    assert!(
        dotdot_paths(&storage).is_empty(),
        "paths with '..' under storage: {:?}",
        dotdot_paths(&storage)
    );
    let in_storage: Vec<_> = walk(&storage)
        .into_iter()
        .filter(|p| p.to_string_lossy().contains(e.as_str()))
        .collect();
    assert!(
        in_storage.is_empty(),
        "traversal name stored under storage: {in_storage:?}"
    );
    let mut places = vec![
        Path::new("/").to_owned(),
        std::env::temp_dir(),
        Path::new("/etc").to_owned(),
    ];
    let mut p = storage.clone();
    while let Some(parent) = p.parent() {
        places.push(parent.to_owned());
        p = parent.to_owned();
    }
    for place in places {
        assert!(
            !place.join(e).exists(),
            "traversal created {}",
            place.join(e).display()
        );
    }
}

/// HEAD on a manifest (cold and warm, by tag and digest, image and index)
/// gives the same Content-Length, Docker-Content-Digest and Content-Type as
/// GET, and the GET body matches those headers.
#[test]
fn head_manifest_matches_get() {
    let up = Upstream::start();
    let img = seed_image(&up, "org/img", "1.0", &[20_000, 1_000]);
    let multi = seed_index(&up, "org/multi", "2.0");
    let storage_parent = temp_dir("regcache-storage-");
    let rc = Regcache::start(
        &config_json(&[(&up.url(), &["upstream.test"])]),
        &storage_parent.path().join("storage"),
    );
    let cache = rc.addr().to_owned();

    let cases = [
        ("org/img", "1.0", &img.image.manifest_digest, OCI_MANIFEST),
        (
            "org/img",
            img.image.manifest_digest.as_str(),
            &img.image.manifest_digest,
            OCI_MANIFEST,
        ),
        ("org/multi", "2.0", &multi.index_digest, OCI_INDEX),
        (
            "org/multi",
            multi.index_digest.as_str(),
            &multi.index_digest,
            OCI_INDEX,
        ),
        (
            "org/multi",
            multi.platform("arm64").manifest_digest.as_str(),
            &multi.platform("arm64").manifest_digest,
            OCI_MANIFEST,
        ),
    ];
    for round in ["cold", "warm"] {
        for (repo, reference, digest, media_type) in &cases {
            let path = format!("/v2/upstream.test/{repo}/manifests/{reference}");
            let accept = [("Accept", MANIFEST_ACCEPT)];
            // HEAD first: on the cold round it is the cache miss.
            let head =
                http(&cache, "HEAD", &path, &accept).unwrap_or_else(|e| panic!("HEAD {path}: {e}"));
            let get =
                http(&cache, "GET", &path, &accept).unwrap_or_else(|e| panic!("GET {path}: {e}"));
            let what = format!("{round} {path}");
            assert_eq!(head.status, 200, "{what} HEAD: {}", head.describe());
            assert_eq!(get.status, 200, "{what} GET: {}", get.describe());
            assert_eq!(
                sha256_digest(&get.body),
                **digest,
                "{what}: GET body is not the upstream's"
            );
            assert_eq!(
                get.header("Docker-Content-Digest"),
                Some(digest.as_str()),
                "{what} GET: {}",
                get.describe()
            );
            assert_eq!(
                get.header("Content-Type"),
                Some(*media_type),
                "{what} GET: {}",
                get.describe()
            );
            assert_eq!(
                get.header("Content-Length"),
                Some(get.body.len().to_string().as_str()),
                "{what} GET: {}",
                get.describe()
            );
            for h in ["Content-Length", "Docker-Content-Digest", "Content-Type"] {
                assert_eq!(
                    head.header(h),
                    get.header(h),
                    "{what}: HEAD and GET differ in {h}\nHEAD: {}\nGET: {}",
                    head.describe(),
                    get.describe()
                );
            }
        }
    }
}

/// HEAD on a blob answers its size in Content-Length, both on a cache miss
/// (the worker has to ask upstream) and once the blob is cached; GET gives
/// the bytes.
#[test]
fn head_blob_gives_size_cold_and_warm() {
    let up = Upstream::start();
    let img = seed_image(&up, "org/img", "1.0", &[20_000, 1_000]);
    let storage_parent = temp_dir("regcache-storage-");
    let rc = Regcache::start(
        &config_json(&[(&up.url(), &["upstream.test"])]),
        &storage_parent.path().join("storage"),
    );
    let cache = rc.addr().to_owned();
    let blob = &img.image.layer_digests[0];
    let size = img.image.layer_sizes[0].to_string();
    let path = format!("/v2/upstream.test/org/img/blobs/{blob}");
    let head = |round: &str| {
        let head = http(&cache, "HEAD", &path, &[]).unwrap_or_else(|e| panic!("HEAD {path}: {e}"));
        assert_eq!(head.status, 200, "{round} HEAD {path}: {}", head.describe());
        assert_eq!(
            head.header("Content-Length"),
            Some(size.as_str()),
            "{round} HEAD {path}: {}",
            head.describe()
        );
        assert_eq!(
            head.header("Docker-Content-Digest"),
            Some(blob.as_str()),
            "{round} HEAD {path}: {}",
            head.describe()
        );
    };
    head("cold (not cached)");
    let get = http(&cache, "GET", &path, &[]).unwrap_or_else(|e| panic!("GET {path}: {e}"));
    assert_eq!(get.status, 200, "GET {path}: {}", get.describe());
    assert_eq!(sha256_digest(&get.body), *blob, "GET {path}: wrong bytes");
    head("warm (cached)");
}

/// Does `stderr` name item `n` of CONFIG ("item 1", "[1]", "index 1", "#1")?
fn names_item(stderr: &str, n: usize) -> bool {
    let s = stderr.to_ascii_lowercase();
    [
        format!("item {n}"),
        format!("[{n}]"),
        format!("index {n}"),
        format!("#{n}"),
        format!("item #{n}"),
    ]
    .iter()
    .any(|p| s.contains(p.as_str()))
}

/// Invalid CONFIG: `check-config` and the server both exit non-zero, stderr
/// names the offending item, and the server never listens on its port.
#[test]
fn invalid_config_is_refused_naming_the_item() {
    // Control: a valid CONFIG passes check-config and lists the upstreams.
    let valid = r#"[{"registry": "http://127.0.0.1:1", "aliases": ["upstream.test"]}, "ghcr.io"]"#;
    let ok = run_regcache(&["check-config"], Some(valid), Duration::from_secs(10));
    assert!(
        ok.success(),
        "check-config on a valid CONFIG: {:?} stderr {}",
        ok.status,
        ok.stderr
    );
    let listed = String::from_utf8_lossy(&ok.stdout).into_owned() + &ok.stderr;
    assert!(
        listed.contains("upstream.test") && listed.contains("ghcr.io"),
        "check-config should print the parsed upstreams, printed:\n{listed}"
    );
    // The same through --config FILE.
    let dir = temp_dir("regcache-config-");
    let file = dir.path().join("config.json");
    std::fs::write(&file, valid).unwrap();
    let ok = run_regcache(
        &["check-config", "--config", file.to_str().unwrap()],
        None,
        Duration::from_secs(10),
    );
    assert!(
        ok.success(),
        "check-config --config FILE: {:?} stderr {}",
        ok.status,
        ok.stderr
    );

    let cases: [(&str, &str, Option<usize>); 7] = [
        ("not JSON", "this is [not json", None),
        (
            "item 1 is a number",
            r#"["http://127.0.0.1:1", 5]"#,
            Some(1),
        ),
        (
            "object without registry",
            r#"["http://127.0.0.1:1", {"aliases": ["x.test"]}]"#,
            Some(1),
        ),
        (
            "registry URL with a path",
            r#"["http://127.0.0.1:1", {"registry": "http://127.0.0.1:2/some/path"}]"#,
            Some(1),
        ),
        (
            "bad scheme",
            r#"["http://127.0.0.1:1", {"registry": "ftp://127.0.0.1:2"}]"#,
            Some(1),
        ),
        (
            "duplicate alias",
            r#"[{"registry": "http://127.0.0.1:1", "aliases": ["dup.test"]}, {"registry": "http://127.0.0.1:2", "aliases": ["dup.test"]}]"#,
            Some(1),
        ),
        (
            "not an array",
            r#"{"registry": "http://127.0.0.1:1"}"#,
            None,
        ),
    ];
    for (label, config, item) in cases {
        let check = run_regcache(&["check-config"], Some(config), Duration::from_secs(10));
        assert!(
            check.status.is_some() && !check.success(),
            "check-config with {label}: expected non-zero exit, got {:?}; stderr {}",
            check.status,
            check.stderr
        );
        assert_config_message(label, "check-config", &check.stderr, item);

        // The server: must exit non-zero without ever listening.
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let storage = dir.path().join(format!("storage-{}", random_token()));
        let errfile = dir.path().join(format!("stderr-{}", random_token()));
        let mut child = Command::new(regcache_bin())
            .args(["--listen", &addr, "--storage", storage.to_str().unwrap()])
            .env("CONFIG", config)
            .env_remove("REGCACHE_LISTEN")
            .env_remove("REGCACHE_STORAGE")
            .env_remove("CONFIG_FILE")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&errfile).unwrap())
            .process_group(0)
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut listened = false;
        let status = loop {
            listened |= port_is_open(&addr);
            if let Some(st) = child.try_wait().unwrap() {
                break Some(st);
            }
            if Instant::now() >= deadline {
                let _ = nix::sys::signal::killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let stderr = std::fs::read_to_string(&errfile).unwrap_or_default();
        assert!(
            !listened,
            "regcache with {label} listened on {addr}; stderr {stderr}"
        );
        assert!(
            matches!(status, Some(st) if !st.success()),
            "regcache with {label}: expected a non-zero exit within 10 s, got {status:?}; stderr {stderr}"
        );
        assert_config_message(label, "serve", &stderr, item);
    }
}

fn assert_config_message(label: &str, mode: &str, stderr: &str, item: Option<usize>) {
    match item {
        Some(n) => assert!(
            names_item(stderr, n),
            "{mode} with {label}: stderr should name item {n}, got:\n{stderr}"
        ),
        None => {
            let s = stderr.to_ascii_lowercase();
            assert!(
                s.contains("config") || s.contains("json"),
                "{mode} with {label}: stderr should say CONFIG is invalid, got:\n{stderr}"
            );
        }
    }
}

/// tags/list is forwarded to the upstream; with the upstream down, the tags
/// pulled through the cache are listed instead. (distribution 2.8 does not
/// page tags; the `Link` rewrite is unit-tested in the supervisor.)
#[test]
fn tags_list_is_forwarded_and_falls_back_to_cached_tags() {
    let mut up = Upstream::start();
    let seeded = ["1", "2", "3"].map(|tag| seed_image(&up, "org/tagged", tag, &[1_000]));
    let storage_parent = temp_dir("regcache-tags-");
    let rc = Regcache::start(
        &config_json(&[(&up.url(), &["upstream.test"])]),
        &storage_parent.path().join("storage"),
    );
    let list = get(rc.addr(), "/v2/upstream.test/org/tagged/tags/list");
    assert_eq!(list.status, 200, "{}", list.describe());
    let mut tags: Vec<String> = serde_json::from_value(list.json()["tags"].clone()).unwrap();
    tags.sort();
    assert_eq!(tags, ["1", "2", "3"]);

    let r = get(rc.addr(), "/v2/upstream.test/org/tagged/manifests/2");
    assert_eq!(r.status, 200, "{}", r.describe());
    // The rest of the pull, so that no fetch ahead of it is left to fail.
    for d in seeded[1].image.blob_digests() {
        let b = get(
            rc.addr(),
            &format!("/v2/upstream.test/org/tagged/blobs/{d}"),
        );
        assert_eq!(b.status, 200, "{}", b.describe());
    }
    up.stop();
    let cached = get(rc.addr(), "/v2/upstream.test/org/tagged/tags/list");
    assert_eq!(cached.status, 200, "{}", cached.describe());
    assert_eq!(cached.json()["name"], "org/tagged");
    assert_eq!(cached.json()["tags"], serde_json::json!(["2"]));
    let unknown = get(rc.addr(), "/v2/upstream.test/org/never/tags/list");
    assert_eq!(unknown.status, 502, "{}", unknown.describe());
}

/// Workers die with their supervisor, even when it is SIGKILLed and can
/// clean nothing up itself (the kernel's parent-death signal).
#[test]
fn workers_die_with_a_killed_supervisor() {
    let one = Upstream::start();
    let two = Upstream::start();
    let storage_parent = temp_dir("regcache-orphans-");
    let mut rc = Regcache::start(
        &config_json(&[(&one.url(), &["one.test"]), (&two.url(), &["two.test"])]),
        &storage_parent.path().join("storage"),
    );
    let workers = rc.worker_pids();
    assert_eq!(workers.len(), 2);
    kill(Pid::from_raw(rc.pid().unwrap()), Signal::SIGKILL).unwrap();
    let gone = wait_for(Duration::from_secs(10), || {
        workers.iter().all(|&p| !is_alive(p)).then_some(())
    });
    assert!(
        gone.is_some(),
        "workers {workers:?} outlived their supervisor"
    );
    rc.kill();
}

/// The front speaks HTTP/2 (cleartext, prior knowledge) as well as HTTP/1.1:
/// a manifest and a blob come back whole over h2.
#[test]
fn http2_clients_are_served() {
    let up = Upstream::start();
    let img = seed_image(&up, "org/h2", "1", &[50_000]);
    let storage_parent = temp_dir("regcache-h2-");
    let rc = Regcache::start(
        &config_json(&[(&up.url(), &["upstream.test"])]),
        &storage_parent.path().join("storage"),
    );
    let layer = &img.image.layer_digests[0];
    for (path, digest) in [
        (
            "/v2/upstream.test/org/h2/manifests/1".to_string(),
            &img.image.manifest_digest,
        ),
        (format!("/v2/upstream.test/org/h2/blobs/{layer}"), layer),
    ] {
        let out = std::process::Command::new("curl")
            .args([
                "-sS",
                "--http2-prior-knowledge",
                "-o",
                "-",
                "-w",
                "\n%{http_version} %{http_code}",
            ])
            .arg(format!("http://{}{path}", rc.addr()))
            .output()
            .expect("run curl");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let split = out.stdout.iter().rposition(|&b| b == b'\n').unwrap();
        let (body, meta) = out.stdout.split_at(split);
        assert_eq!(String::from_utf8_lossy(&meta[1..]), "2 200", "{path}");
        assert_eq!(&sha256_digest(body), digest, "{path}: bytes over h2");
    }
}

/// Routing by host name: a client reaching the cache as `upstream.test:PORT`
/// (resolved to loopback in a private `/etc/hosts`) pulls that upstream's
/// images by their own names, no prefix; the same names at `127.0.0.1:PORT`
/// still go to the default upstream, as before.
#[test]
fn a_host_name_of_an_upstream_routes_without_a_prefix() {
    let named = Upstream::start();
    let default = Upstream::start();
    let img = seed_image(&named, "org/app", "1", &[300_000, 1_000]);
    let work = temp_dir("regcache-e2e-");
    let storage = temp_dir("regcache-storage-");
    let config = config_json(&[
        (&named.url(), &["upstream.test"]),
        (&default.url(), &["docker.io"]),
    ]);
    let rc = Regcache::start(&config, &storage.path().join("storage"));
    let port = rc.addr().rsplit_once(':').unwrap().1.to_owned();

    let by_name = format!("upstream.test:{port}/org/app:1");
    skopeo_copy_resolving(
        &by_name,
        &work.path().join("by-name"),
        false,
        &["upstream.test"],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let copy = read_dir_copy(&work.path().join("by-name"));
    assert_eq!(copy.manifest_digest, img.image.manifest_digest, "{by_name}");
    assert_eq!(copy.layer_digests(), img.image.layer_digests, "{by_name}");

    // The cache's own address: bare names are the default upstream's.
    let r = http(
        rc.addr(),
        "GET",
        "/v2/org/app/manifests/1",
        &[("Accept", MANIFEST_ACCEPT)],
    )
    .unwrap();
    assert_eq!(
        r.status,
        404,
        "bare name at 127.0.0.1 went to {}",
        r.describe()
    );
    let r = http(
        rc.addr(),
        "GET",
        "/v2/org/app/manifests/1",
        &[
            ("Accept", MANIFEST_ACCEPT),
            ("Host", &format!("UPSTREAM.test:{port}")),
        ],
    )
    .unwrap();
    assert_eq!(
        r.status,
        200,
        "Host names are case-insensitive: {}",
        r.describe()
    );
}
