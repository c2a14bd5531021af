//! End-to-end tests of the cache policy (issue 13): the size budget with
//! whole-image LRU, expiry, tag rules, a disk that fills up, collections
//! killed at random points, and the `gc` and `fsck` commands, through the
//! built binary with skopeo as the client. The upstream is the in-process
//! fake, which counts every request regcache makes.
//!
//! Run: `cargo test --test policy -- --test-threads=2`
//! Needs: skopeo on PATH; root for the small-filesystem test (tmpfs).

use regcache_testkit as support;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::fake::{describe, FakeRegistry};
use support::*;

/// The alias the fake upstream is reached by through regcache.
const PREFIX: &str = "upstream.test";

struct Setup {
    fake: FakeRegistry,
    rc: Regcache,
    _storage: tempfile::TempDir,
    storage: PathBuf,
    pulls: tempfile::TempDir,
}

impl Setup {
    fn start(env: &[(&str, &str)]) -> Setup {
        let fake = FakeRegistry::start();
        let parent = temp_dir("regcache-storage-");
        let storage = parent.path().join("storage");
        Self::start_on(fake, parent, storage, env)
    }

    fn start_on(
        fake: FakeRegistry,
        parent: tempfile::TempDir,
        storage: PathBuf,
        env: &[(&str, &str)],
    ) -> Setup {
        let rc = Regcache::start_with_env(&config(&fake), &storage, env);
        Setup {
            fake,
            rc,
            _storage: parent,
            storage,
            pulls: temp_dir("regcache-pulls-"),
        }
    }

    fn root(&self) -> PathBuf {
        upstream_root(&self.storage, &self.fake.addr())
    }

    /// Pulls `repo:tag` with skopeo, checks it is exactly `image`, and
    /// returns the upstream requests it made.
    fn pull(&self, repo: &str, tag: &str, image: &ImageParts) -> Vec<String> {
        let mark = self.fake.request_count();
        let reference = format!("{}/{PREFIX}/{repo}:{tag}", self.rc.addr());
        let dest = self.pulls.path().join(random_token());
        skopeo_copy(&reference, &dest, false).unwrap_or_else(|e| {
            panic!(
                "{e}\n{}\n{}",
                self.fake.describe_requests(),
                self.rc.log_tail(40)
            )
        });
        check_image_copy(&reference, image, &dest);
        let _ = std::fs::remove_dir_all(&dest);
        self.fake
            .requests_since(mark)
            .iter()
            .map(|r| r.to_string())
            .collect()
    }

    fn metrics(&self) -> String {
        String::from_utf8_lossy(&get(self.rc.addr(), "/metrics").body).into_owned()
    }
}

fn config(fake: &FakeRegistry) -> String {
    config_json(&[(&fake.url(), &[PREFIX])])
}

/// Bytes of blobs and manifests under a store root, as the disk has them.
fn stored_bytes(root: &Path) -> u64 {
    ["blobs", "manifests"]
        .iter()
        .flat_map(|d| {
            let dir = root.join(d);
            walk(&dir).into_iter().map(move |p| dir.join(p))
        })
        .filter_map(|p| std::fs::metadata(p).ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

/// The value of the first series named `name` (with `labels` inside its
/// braces) on a metrics page.
fn metric(page: &str, name: &str, labels: &str) -> Option<f64> {
    page.lines()
        .filter(|l| l.starts_with(name) && l.contains(labels))
        .find(|l| l[name.len()..].starts_with(['{', ' ']))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Samples the stored size every few milliseconds until dropped; the
/// largest seen.
struct Sampler {
    stop: Arc<AtomicBool>,
    max: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    fn start(root: PathBuf) -> Sampler {
        let (stop, max) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
        );
        let (s, m) = (stop.clone(), max.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                m.fetch_max(stored_bytes(&root), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(5));
            }
        });
        Sampler {
            stop,
            max,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap();
        self.max.load(Ordering::Relaxed)
    }
}

/// Pulling more than the budget holds: the stored size never exceeds it,
/// the most recently used images still pull with no upstream request, the
/// evicted one pulls again correctly, and a layer shared by two images
/// survives the eviction of one of them.
#[test]
fn the_budget_holds_recent_images_and_evicts_the_least_recently_used_whole() {
    const BUDGET: u64 = 1_600_000;
    let s = Setup::start(&[("REGCACHE_MAX_SIZE", "1600000")]);
    let shared = random_layer("shared", 400_000);
    let a = s
        .fake
        .add_image_of("org/a", "1", &[shared.clone(), random_layer("a", 200_000)]);
    let b = s
        .fake
        .add_image_of("org/b", "1", &[shared.clone(), random_layer("b", 200_000)]);
    let others: Vec<ImageParts> = (0..4)
        .map(|i| s.fake.add_image(&format!("org/c{i}"), "1", &[300_000]))
        .collect();
    let sampler = Sampler::start(s.root());
    s.pull("org/a", "1", &a);
    s.pull("org/b", "1", &b);
    // a+b hold 807 kB, c0 and c1 302 kB each; c2 needs a's 203 kB (a is
    // the least recently used): b and the layer it shares with a stay.
    s.pull("org/c0", "1", &others[0]);
    s.pull("org/c1", "1", &others[1]);
    s.pull("org/c2", "1", &others[2]);
    let shared_digest = &a.layer_digests[0];
    assert!(
        blob_file(&s.root(), shared_digest).exists(),
        "the layer b shares with a was evicted with a\n{}",
        s.rc.log_tail(60)
    );
    assert!(
        !blob_file(&s.root(), &a.layer_digests[1]).exists(),
        "a, the least recently used, should have gone"
    );
    let warm = s.pull("org/b", "1", &b);
    assert!(warm.is_empty(), "b pulled warm went upstream:\n{warm:?}");
    s.pull("org/c3", "1", &others[3]);
    let max = sampler.finish();
    assert!(
        max <= BUDGET,
        "stored {max} bytes, over the budget of {BUDGET}"
    );

    for (name, image) in [("org/c3", &others[3]), ("org/c2", &others[2])] {
        let warm = s.pull(name, "1", image);
        assert!(
            warm.is_empty(),
            "{name} (recently used) went upstream:\n{warm:?}"
        );
    }
    let again = s.pull("org/a", "1", &a);
    assert!(
        again.iter().any(|r| r.contains("/blobs/")),
        "a was evicted, yet pulled without fetching blobs: {again:?}"
    );
    assert!(stored_bytes(&s.root()) <= BUDGET);

    let page = s.metrics();
    assert_eq!(
        metric(&page, "regcache_cache_budget_bytes", ""),
        Some(BUDGET as f64)
    );
    let evicted = metric(&page, "regcache_evictions_total", "reason=\"size\"").unwrap_or(0.0);
    assert!(evicted >= 2.0, "evictions: {evicted}\n{page}");
    let size = metric(&page, "regcache_cache_size_bytes", "").unwrap();
    assert_eq!(
        size as u64,
        stored_bytes(&s.root()),
        "the size metric is the true size"
    );
    let freed = metric(&page, "regcache_evicted_bytes_total", "reason=\"size\"").unwrap();
    assert!(freed > 0.0);

    // Sizes per upstream and per repository in the inventory; evicted
    // images are not listed.
    let inv: serde_json::Value =
        serde_json::from_slice(&get(s.rc.addr(), "/api/v1/cache").body).unwrap();
    let up = &inv[0];
    assert_eq!(up["bytes"].as_u64(), Some(stored_bytes(&s.root())), "{inv}");
    let repos = up["repositories"].as_array().unwrap();
    let b_repo = repos
        .iter()
        .find(|r| r["name"] == "org/b")
        .expect("org/b listed");
    let b_size: u64 = b.layer_sizes.iter().sum::<u64>() + b.config.len() as u64;
    assert!(b_repo["bytes"].as_u64().unwrap() >= b_size, "{b_repo}");
    assert!(repos.iter().all(|r| r["bytes"].as_u64() > Some(0)), "{inv}");
}

/// `REGISTRY_PROXY_TTL`: what is not used for that long goes, what is used
/// stays (a real clock, 3 s).
#[test]
fn expiry_removes_what_is_unused_and_keeps_what_is_used() {
    let s = Setup::start(&[("REGISTRY_PROXY_TTL", "3s")]);
    let used = s.fake.add_image("org/used", "1", &[50_000]);
    let unused = s.fake.add_image("org/unused", "1", &[50_000]);
    s.pull("org/used", "1", &used);
    s.pull("org/unused", "1", &unused);
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while blob_file(&s.root(), &unused.layer_digests[0]).exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "unused content never expired"
        );
        s.pull("org/used", "1", &used);
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        blob_file(&s.root(), &used.layer_digests[0]).exists(),
        "used content expired"
    );
    let page = s.metrics();
    assert!(metric(&page, "regcache_evictions_total", "reason=\"ttl\"").unwrap_or(0.0) >= 1.0);
}

/// `latest=0s` asks upstream on every pull (one HEAD), `never` stores
/// nothing of the tag's image.
#[test]
fn tag_rules_revalidate_latest_every_time_and_store_nothing_of_never() {
    let s = Setup::start(&[("REGCACHE_TAG_RULES", "latest=0s;nightly-*=never")]);
    let latest = s.fake.add_image("org/app", "latest", &[30_000]);
    s.pull("org/app", "latest", &latest);
    for _ in 0..2 {
        let reqs = s.pull("org/app", "latest", &latest);
        assert_eq!(
            reqs,
            ["HEAD /v2/org/app/manifests/latest"],
            "latest=0s: one HEAD per pull"
        );
    }
    let nightly = s.fake.add_image("org/app", "nightly-7", &[30_000]);
    let before = stored_bytes(&s.root());
    for _ in 0..2 {
        let reqs = s.pull("org/app", "nightly-7", &nightly);
        assert!(
            reqs.iter()
                .any(|r| r.starts_with("GET /v2/org/app/manifests/nightly-7")),
            "never: the tag goes upstream every time: {reqs:?}"
        );
    }
    assert_eq!(stored_bytes(&s.root()), before, "never: nothing stored");
    assert!(!s
        .root()
        .join("repositories/org/app/_tags/nightly-7")
        .exists());
    for d in nightly.blob_digests() {
        assert!(!blob_file(&s.root(), &d).exists(), "never: {d} stored");
    }
}

/// A collection killed with SIGKILL at random points, again and again:
/// `regcache fsck` finds nothing wrong, every remaining tag's image is
/// whole, and pulls still succeed. Each round starts from the same cache of
/// 40 images (a copy) and kills `regcache gc` (budget: 1 byte, so it
/// removes everything) after a random part of the time a whole run takes.
#[test]
fn collections_killed_at_random_points_leave_a_consistent_cache() {
    let fake = FakeRegistry::start();
    let parent = temp_dir("regcache-storage-");
    let template = parent.path().join("template");
    let storage = parent.path().join("storage");
    let cfg = config(&fake);
    let images: Vec<(String, ImageParts)> = (0..40)
        .map(|i| {
            let repo = format!("org/k{i}");
            (repo.clone(), fake.add_image(&repo, "1", &[2_000, 500]))
        })
        .collect();
    let s = Setup::start_on(fake, temp_dir("unused-"), template.clone(), &[]);
    for (repo, img) in &images {
        s.pull(repo, "1", img);
    }
    let Setup { fake, rc, .. } = s;
    drop(rc);
    let restore = || {
        let _ = std::fs::remove_dir_all(&storage);
        let st = std::process::Command::new("cp")
            .arg("-a")
            .arg(&template)
            .arg(&storage)
            .status()
            .unwrap();
        assert!(st.success());
    };
    let gc = || {
        std::process::Command::new(regcache_bin())
            .args(["gc", "--storage"])
            .arg(&storage)
            .env("CONFIG", &cfg)
            .env("REGCACHE_MAX_SIZE", "1")
            .env_remove("CONFIG_FILE")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    restore();
    let t = std::time::Instant::now();
    assert!(gc().wait().unwrap().success());
    let whole = t.elapsed();
    assert_eq!(
        stored_bytes(&upstream_root(&storage, &fake.addr())),
        0,
        "gc left something"
    );

    // Rounds until 20 collections were killed while running (a run can end
    // before its kill when the machine is quicker than at the measurement);
    // kill points spread over the first 90 % of a run.
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let (mut killed, mut round) = (0, 0);
    while killed < 20 && round < 80 {
        round += 1;
        restore();
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let delay = whole.mul_f64((seed % 900) as f64 / 1000.0);
        let mut child = gc();
        std::thread::sleep(delay);
        if child.try_wait().unwrap().is_none() {
            killed += 1;
        }
        let _ = child.kill();
        let _ = child.wait();
        let fsck = run_regcache(
            &[
                "fsck",
                "--dry-run",
                "--json",
                "--storage",
                &storage.display().to_string(),
            ],
            Some(&cfg),
            Duration::from_secs(60),
        );
        assert!(
            fsck.success(),
            "round {round} (killed after {delay:?}): fsck:\n{}",
            fsck.stdout_text()
        );
        let report: serde_json::Value = serde_json::from_str(&fsck.stdout_text()).unwrap();
        let incomplete = &report[0]["result"]["incomplete"];
        assert_eq!(
            incomplete.as_array().map(Vec::len),
            Some(0),
            "round {round} (killed after {delay:?}): a kept tag lost part of its image: {incomplete}"
        );
    }
    assert!(
        killed >= 20,
        "only {killed} of {round} collections were killed while running ({whole:?} each)"
    );
    // The last round's cache serves.
    let s = Setup::start_on(fake, parent, storage, &[]);
    for (repo, img) in images.iter().step_by(8) {
        s.pull(repo, "1", img);
    }
}

/// A small filesystem fills up during a pull: the pull succeeds, nothing
/// corrupt is stored, and the metrics say the disk was full or the blob was
/// passed through. Needs root (a tmpfs of 3 MiB).
#[test]
fn a_full_disk_costs_no_pull() {
    if std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").unwrap()) != 0 {
        eprintln!("skipped: needs root for a tmpfs");
        return;
    }
    let parent = temp_dir("regcache-storage-");
    let storage = parent.path().join("small");
    std::fs::create_dir_all(&storage).unwrap();
    let mount = Tmpfs::mount(&storage, "3m");
    let fake = FakeRegistry::start();
    let big = fake.add_image("org/big", "1", &[1_500_000, 1_500_000, 1_200_000]);
    let cfg = config(&fake);
    let s = Setup::start_on(fake, parent, storage.clone(), &[]);
    let reqs = s.pull("org/big", "1", &big);
    assert!(!reqs.is_empty());
    let page = s.metrics();
    let full = metric(&page, "regcache_disk_full_total", "").unwrap_or(0.0);
    let bypassed = metric(&page, "regcache_bypassed_total", "").unwrap_or(0.0);
    assert!(
        full + bypassed >= 1.0,
        "neither disk-full nor bypass counted:\n{page}"
    );
    // Again, from what could be stored; then whatever is stored is whole.
    s.pull("org/big", "1", &big);
    drop(s);
    let fsck = run_regcache(
        &[
            "fsck",
            "--dry-run",
            "--storage",
            &storage.display().to_string(),
        ],
        Some(&cfg),
        Duration::from_secs(60),
    );
    assert!(fsck.success(), "{}", fsck.stdout_text());
    drop(mount);
}

/// A tmpfs mounted for the test's life.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mount: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(at.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// `gc --dry-run` says what would go and frees nothing; `gc` frees it;
/// `fsck` finds a flipped byte, removes it, and the next pull fetches it.
#[test]
fn gc_and_fsck_from_the_command_line() {
    let fake = FakeRegistry::start();
    let parent = temp_dir("regcache-storage-");
    let storage = parent.path().join("storage");
    let img = fake.add_image("org/app", "1", &[100_000]);
    let cfg = config(&fake);
    let root = upstream_root(&storage, &fake.addr());
    let s = Setup::start_on(fake, parent, storage.clone(), &[]);
    s.pull("org/app", "1", &img);
    let st = storage.display().to_string();
    // While regcache runs: a dry run reports, a real one declines.
    let dry = run_regcache(
        &["gc", "--dry-run", "--storage", &st],
        Some(&cfg),
        Duration::from_secs(30),
    );
    assert!(dry.success(), "{}", dry.stderr);
    let busy = run_regcache(
        &["gc", "--storage", &st],
        Some(&cfg),
        Duration::from_secs(30),
    );
    assert!(
        busy.stdout_text().contains("in use by a running regcache"),
        "{}",
        busy.stdout_text()
    );
    let Setup { fake, rc, .. } = s;
    drop(rc);

    let before = stored_bytes(&root);
    let env_budget = [("REGCACHE_MAX_SIZE", "50000")];
    let dry = run_with_env(
        &["gc", "--dry-run", "--json", "--storage", &st],
        &cfg,
        &env_budget,
    );
    let report: serde_json::Value = serde_json::from_str(&dry.stdout_text()).unwrap();
    let would = report[0]["result"]["freed_bytes"].as_u64().unwrap();
    assert!(would >= 100_000, "{}", dry.stdout_text());
    assert_eq!(stored_bytes(&root), before, "a dry run removed something");
    let real = run_with_env(&["gc", "--json", "--storage", &st], &cfg, &env_budget);
    let report: serde_json::Value = serde_json::from_str(&real.stdout_text()).unwrap();
    assert_eq!(report[0]["result"]["freed_bytes"].as_u64(), Some(would));
    assert!(stored_bytes(&root) <= 50_000);

    // Cached again, then a byte flipped on disk.
    let s = Setup::start_on(fake, temp_dir("unused-"), storage.clone(), &[]);
    s.pull("org/app", "1", &img);
    let Setup { fake, rc, .. } = s;
    drop(rc);
    let layer = blob_file(&root, &img.layer_digests[0]);
    let mut bytes = std::fs::read(&layer).unwrap();
    bytes[1000] ^= 1;
    std::fs::write(&layer, bytes).unwrap();
    let fsck = run_regcache(
        &["fsck", "--storage", &st],
        Some(&cfg),
        Duration::from_secs(30),
    );
    assert!(!fsck.success(), "fsck should report the corrupt blob");
    assert!(
        fsck.stdout_text()
            .contains(&format!("corrupt (removed): blob {}", img.layer_digests[0])),
        "{}",
        fsck.stdout_text()
    );
    assert!(!layer.exists());
    let again = run_regcache(
        &["fsck", "--storage", &st],
        Some(&cfg),
        Duration::from_secs(30),
    );
    assert!(again.success(), "{}", again.stdout_text());
    let s = Setup::start_on(fake, temp_dir("unused-"), storage, &[]);
    let reqs = s.pull("org/app", "1", &img);
    assert!(
        reqs.iter().any(|r| r.contains(&img.layer_digests[0])),
        "the removed blob was not fetched again: {}",
        describe(&s.fake.requests_since(0))
    );
}

fn run_with_env(args: &[&str], cfg: &str, env: &[(&str, &str)]) -> CmdOutput {
    let mut cmd = std::process::Command::new(regcache_bin());
    cmd.args(args).env("CONFIG", cfg).env_remove("CONFIG_FILE");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = run_with_timeout(&mut cmd, Duration::from_secs(60));
    assert!(
        out.success(),
        "{args:?}: {}\n{}",
        out.stdout_text(),
        out.stderr
    );
    out
}
