//! What operators look at (issue 16): the status page in headless Chromium,
//! `regcache status`, the Grafana dashboard and alerting rules against a
//! real scrape and promtool, and preloading (from a list and on demand).
//!
//! Run: `cargo test --test status -- --test-threads=2`
//! Needs: skopeo, chromium, promtool (scripts/test installs them).
//! The screenshots land in target/test-artifacts/.

use regcache_testkit as support;

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::fake::{describe, FakeRegistry};
use support::*;

const PREFIX: &str = "upstream.test";

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn artifacts() -> PathBuf {
    let dir = repo_root().join("target/test-artifacts");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A regcache in front of a fake upstream serving `org/app:1`, pulled
/// once cold and once warm (so there are hits to show).
struct Pulled {
    fake: FakeRegistry,
    rc: Regcache,
    _storage: tempfile::TempDir,
}

fn pulled(env: &[(&str, &str)]) -> Pulled {
    let fake = FakeRegistry::start();
    let image = fake.add_image("org/app", "1", &[300_000, 2_000]);
    let storage = temp_dir("regcache-status-");
    let rc = Regcache::start_with_env(
        &config_json(&[(&fake.url(), &[PREFIX])]),
        storage.path(),
        env,
    );
    let work = temp_dir("regcache-status-pulls-");
    for label in ["cold", "warm"] {
        let reference = format!("{}/{PREFIX}/org/app:1", rc.addr());
        pull_and_check_image(&reference, &image, &work.path().join(label));
    }
    Pulled {
        fake,
        rc,
        _storage: storage,
    }
}

/// Chromium's proxy, recording the first line of each request: only
/// requests that would leave this machine reach it (loopback is never
/// proxied). Chromium's own service traffic (time, component updates,
/// accounts: Google hosts, asked whatever page is open) is told apart.
fn recording_proxy() -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    std::thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            let mut buf = [0u8; 512];
            let _ = conn.set_read_timeout(Some(Duration::from_millis(500)));
            let n = std::io::Read::read(&mut conn, &mut buf).unwrap_or(0);
            let line = String::from_utf8_lossy(&buf[..n])
                .lines()
                .next()
                .unwrap_or("")
                .to_owned();
            s.lock().unwrap().push(line);
        }
    });
    (addr, seen)
}

/// Requests Chromium makes for itself, not for a page.
fn browser_service(line: &str) -> bool {
    let host = line.split_whitespace().nth(1).unwrap_or("");
    let host = host
        .trim_start_matches("http://")
        .trim_start_matches("https://");
    let host = host.split(['/', ':']).next().unwrap_or("");
    ["google.com", "googleapis.com", "gvt1.com", "gstatic.com"]
        .iter()
        .any(|d| host == *d || host.ends_with(&format!(".{d}")))
}

fn chromium(url: &str, proxy: &str, extra: &[&str]) -> CmdOutput {
    let profile = temp_dir("regcache-chromium-");
    let mut cmd = std::process::Command::new("chromium");
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-extensions",
        "--disable-default-apps",
        "--hide-scrollbars",
        "--virtual-time-budget=8000",
    ])
    .arg(format!("--user-data-dir={}", profile.path().display()))
    .arg(format!("--proxy-server=http://{proxy}"))
    .args(extra)
    .arg(url);
    let out = run_with_timeout(&mut cmd, Duration::from_secs(90));
    assert!(out.success(), "chromium failed: {}", out.stderr);
    out
}

/// Headless Chromium renders the page after real pulls: the upstream, a
/// hit ratio above zero, the pulled repository; screenshots (light and
/// dark, desktop and phone) are saved; nothing is loaded from elsewhere.
#[test]
fn the_status_page_shows_the_cache_at_work_and_loads_nothing_from_outside() {
    let p = pulled(&[]);
    let (proxy, outside) = recording_proxy();
    let url = format!("http://{}/", p.rc.addr());
    let dom = chromium(&url, &proxy, &["--dump-dom"]).stdout_text();
    let upstream = p.fake.addr();
    assert!(
        dom.contains(&format!("data-upstream=\"{upstream}\"")),
        "no card for {upstream}:\n{dom}"
    );
    let ratio = dom
        .split("class=\"hit-ratio\">")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|s| s.parse::<f64>().ok());
    assert!(
        ratio.is_some_and(|r| r > 0.0),
        "hit ratio {ratio:?}:\n{dom}"
    );
    assert!(
        dom.contains(&format!("{PREFIX}/org/app")),
        "the pulled repository is not listed:\n{dom}"
    );
    assert!(dom.contains("org/app:1"), "no recent pull of org/app:1");
    assert!(
        !dom.contains("pulled -"),
        "no last-pulled time in the inventory:\n{dom}"
    );
    for (name, extra) in [
        ("status-desktop.png", vec!["--window-size=1280,1400"]),
        ("status-phone.png", vec!["--window-size=390,1600"]),
        (
            "status-dark.png",
            vec![
                "--window-size=1280,1400",
                "--force-dark-mode",
                "--blink-settings=preferredColorScheme=0",
            ],
        ),
    ] {
        let file = artifacts().join(name);
        let _ = std::fs::remove_file(&file);
        let shot = format!("--screenshot={}", file.display());
        let mut args: Vec<&str> = extra.clone();
        args.push(&shot);
        chromium(&url, &proxy, &args);
        let size = std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
        assert!(size > 10_000, "{name}: {size} bytes");
    }
    let left: Vec<String> = outside
        .lock()
        .unwrap()
        .iter()
        .filter(|l| !browser_service(l))
        .cloned()
        .collect();
    assert!(
        left.is_empty(),
        "the page made requests that would leave the machine: {left:?}"
    );
    // The page names nothing but its own origin.
    let page = get(p.rc.addr(), "/ui/");
    assert_eq!(page.status, 200);
    let html = page.text();
    for bad in ["http://", "https://", "//cdn", "src=\"//"] {
        assert!(!html.contains(bad), "the page refers to {bad}");
    }
    let csp = page.header("content-security-policy").unwrap_or("");
    assert!(
        csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"),
        "{csp}"
    );
}

/// With client authentication on, the page and its figures need it too;
/// registry clients are unaffected.
#[test]
fn the_status_page_honours_client_authentication() {
    let dir = temp_dir("regcache-status-auth-");
    let htpasswd = dir.path().join("htpasswd");
    let out = std::process::Command::new("htpasswd")
        .args(["-Bbn", "ops", "s3cret-pass"])
        .output()
        .unwrap();
    std::fs::write(&htpasswd, out.stdout).unwrap();
    let fake = FakeRegistry::start();
    let storage = temp_dir("regcache-status-auth-storage-");
    let h = htpasswd.display().to_string();
    let rc = Regcache::start_with_env(
        &config_json(&[(&fake.url(), &[PREFIX])]),
        storage.path(),
        &[
            ("REGISTRY_AUTH_HTPASSWD_PATH", &h),
            ("REGISTRY_AUTH_HTPASSWD_REALM", "regcache"),
        ],
    );
    for path in ["/", "/ui/", "/api/v1/status"] {
        let r = http(rc.addr(), "GET", path, &[]).unwrap();
        assert_eq!(r.status, 401, "{path} without credentials");
        let auth = format!("Basic {}", base64_encode(b"ops:s3cret-pass"));
        let r = http(rc.addr(), "GET", path, &[("Authorization", &auth)]).unwrap();
        assert_eq!(r.status, 200, "{path} with credentials");
    }
}

/// `regcache status` against a running cache: the upstreams and figures.
#[test]
fn regcache_status_prints_the_upstreams_and_figures() {
    let p = pulled(&[]);
    let out = run_regcache(
        &["status", "--listen", p.rc.addr()],
        None,
        Duration::from_secs(30),
    );
    assert!(out.success(), "{}", out.stderr);
    let text = out.stdout_text();
    assert!(text.contains(&p.fake.addr()), "{text}");
    assert!(text.contains("ready"), "{text}");
    assert!(text.contains("org/app:1"), "no recent pull:\n{text}");
    let json = run_regcache(
        &["status", "--json", "--listen", p.rc.addr()],
        None,
        Duration::from_secs(30),
    );
    let v: serde_json::Value = serde_json::from_str(&json.stdout_text()).unwrap();
    let u = &v["upstreams"][0];
    assert!(u["hit_ratio"].as_f64().unwrap() > 0.0, "{u}");
    assert!(u["since_start"]["cache_bytes"].as_u64().unwrap() > 0, "{u}");
    let down = run_regcache(
        &["status", "--listen", "127.0.0.1:1"],
        None,
        Duration::from_secs(30),
    );
    assert!(!down.success());
}

/// Metric names a PromQL expression uses.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let rest = &expr[i..];
        let starts = ["regcache_", "registry_proxy_", "process_"]
            .iter()
            .any(|p| rest.starts_with(p))
            && (i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_'));
        if starts {
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(rest.len());
            out.insert(rest[..end].to_owned());
            i += end;
        } else {
            i += 1;
        }
    }
    out
}

/// A dashboard's expressions as a rules file, Grafana's variables filled
/// in, so that promtool parses them.
fn dashboard_as_rules(exprs: &[String], path: &Path) {
    let mut yaml = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, e) in exprs.iter().enumerate() {
        let e = e
            .replace("$__rate_interval", "5m")
            .replace("$__range", "1h")
            .replace("$instance", ".*")
            .replace("$upstream", ".*");
        yaml.push_str(&format!(
            "      - record: dashboard:panel{i}\n        expr: {}\n",
            serde_json::to_string(&e).unwrap()
        ));
    }
    std::fs::write(path, yaml).unwrap();
}

/// The dashboard parses, its PromQL parses (promtool), and every metric it
/// or an alert queries exists in a real scrape after a pull; the alerting
/// rules pass `promtool check rules`.
#[test]
fn the_dashboard_and_alerts_query_metrics_regcache_exports() {
    let p = pulled(&[("REGCACHE_MAX_SIZE", "1GiB")]);
    let scrape = get(p.rc.addr(), "/metrics").text();
    let exported: BTreeSet<String> = scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(|n| {
            n.strip_suffix("_bucket")
                .or_else(|| n.strip_suffix("_sum"))
                .or_else(|| n.strip_suffix("_count"))
                .unwrap_or(n)
                .to_owned()
        })
        .collect();
    let dash: serde_json::Value = serde_json::from_slice(
        &std::fs::read(repo_root().join("examples/grafana/regcache-dashboard.json")).unwrap(),
    )
    .unwrap();
    let exprs: Vec<String> = dash["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|panel| panel["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_owned))
        .collect();
    assert!(exprs.len() >= 10, "{} expressions", exprs.len());
    let alerts =
        std::fs::read_to_string(repo_root().join("examples/prometheus/regcache-alerts.yml"))
            .unwrap();
    let mut used: BTreeSet<String> = exprs.iter().flat_map(|e| metric_names(e)).collect();
    used.extend(metric_names(&alerts));
    let strip = |n: &String| n.strip_suffix("_bucket").unwrap_or(n).to_owned();
    let missing: Vec<String> = used
        .iter()
        .map(strip)
        .filter(|n| !exported.contains(n))
        .collect();
    assert!(missing.is_empty(), "queried but not exported: {missing:?}");

    let rules = temp_dir("regcache-promtool-");
    let dash_rules = rules.path().join("dashboard.yml");
    dashboard_as_rules(&exprs, &dash_rules);
    for file in [
        repo_root().join("examples/prometheus/regcache-alerts.yml"),
        dash_rules,
    ] {
        let out = run_with_timeout(
            std::process::Command::new("promtool")
                .arg("check")
                .arg("rules")
                .arg(&file),
            Duration::from_secs(60),
        );
        assert!(
            out.success(),
            "promtool check rules {}: {}{}",
            file.display(),
            out.stdout_text(),
            out.stderr
        );
    }
}

/// Preloading from a list at start: the listed image then pulls with no
/// upstream request; an image that does not exist is reported, and not
/// retried in a loop.
#[test]
fn a_preload_list_warms_the_cache_and_reports_what_failed() {
    let fake = FakeRegistry::start();
    let image = fake.add_image("org/app", "1", &[200_000, 1_000]);
    let dir = temp_dir("regcache-preload-");
    let list = dir.path().join("preload.txt");
    std::fs::write(
        &list,
        format!("# before the rollout\n{PREFIX}/org/app:1\n{PREFIX}/org/missing:9\n"),
    )
    .unwrap();
    let l = list.display().to_string();
    let rc = Regcache::start_with_env(
        &config_json(&[(&fake.url(), &[PREFIX])]),
        &dir.path().join("storage"),
        &[("REGCACHE_PRELOAD_FILE", &l)],
    );
    let report = wait_for(Duration::from_secs(30), || {
        let v: serde_json::Value =
            serde_json::from_slice(&get(rc.addr(), "/api/v1/status").body).ok()?;
        (v["preload"]["runs"].as_u64()? >= 1).then_some(v["preload"].clone())
    })
    .expect("the preload never ran");
    let states: Vec<(String, String)> = report["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["image"].as_str().unwrap().to_owned(),
                i["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert!(
        states.contains(&(format!("{PREFIX}/org/app:1"), "done".into())),
        "{report}"
    );
    assert!(
        states.contains(&(format!("{PREFIX}/org/missing:9"), "failed".into())),
        "{report}"
    );
    let missing_asked = fake.count("GET", "/v2/org/missing/manifests/9")
        + fake.count("HEAD", "/v2/org/missing/manifests/9");
    std::thread::sleep(Duration::from_secs(2));
    let again = fake.count("GET", "/v2/org/missing/manifests/9")
        + fake.count("HEAD", "/v2/org/missing/manifests/9");
    assert_eq!(
        again, missing_asked,
        "the missing image is retried in a loop"
    );

    let mark = fake.request_count();
    let work = temp_dir("regcache-preload-pulls-");
    pull_and_check_image(
        &format!("{}/{PREFIX}/org/app:1", rc.addr()),
        &image,
        &work.path().join("a"),
    );
    let made = fake.requests_since(mark);
    assert!(
        made.is_empty(),
        "preloaded images went upstream:\n{}",
        describe(&made)
    );
    let m = get(rc.addr(), "/metrics").text();
    assert!(
        m.contains("regcache_preload_images_total{result=\"failed\"} 1"),
        "{m}"
    );
}

/// A multi-arch index from a real registry: preloaded whole, `skopeo copy
/// --all` then makes no upstream request; with a platform listed, only
/// that platform's blobs are fetched.
#[test]
fn preloading_an_index_takes_all_or_the_listed_platforms() {
    let up = Upstream::start();
    let seeded = seed_index(&up, "org/multi", "2");
    let config = config_json(&[(&up.url(), &[PREFIX])]);
    let token = "admin-token-0123456789";
    let bearer = format!("Bearer {token}");
    let storage = temp_dir("regcache-preload-index-");
    let rc = Regcache::start_with_env(&config, storage.path(), &[("REGCACHE_ADMIN_TOKEN", token)]);
    let root = upstream_root(storage.path(), &up.addr());
    let only_arm = format!("/api/v1/preload?image={PREFIX}/org/multi:2&platform=linux/arm64");
    let r = http(rc.addr(), "POST", &only_arm, &[("Authorization", &bearer)]).unwrap();
    assert_eq!(r.status, 200, "{}", r.describe());
    let arm = seeded.platform("arm64");
    let amd = seeded.platform("amd64");
    // The last byte reaches the preload a moment before the commit.
    let committed = wait_for(Duration::from_secs(10), || {
        blob_file(&root, &arm.layer_digests[0])
            .exists()
            .then_some(())
    });
    assert!(committed.is_some(), "arm64 not preloaded: {}", r.text());
    assert!(
        !blob_file(&root, &amd.layer_digests[0]).exists(),
        "amd64 preloaded though not listed"
    );

    let all = format!("/api/v1/preload?image={PREFIX}/org/multi:2");
    let r = http(rc.addr(), "POST", &all, &[("Authorization", &bearer)]).unwrap();
    assert_eq!(r.status, 200, "{}", r.describe());
    let before = up.access_log().len();
    let dest = temp_dir("regcache-preload-index-pull-");
    skopeo_copy(
        &format!("{}/{PREFIX}/org/multi:2", rc.addr()),
        &dest.path().join("all"),
        true,
    )
    .unwrap();
    let after = up.access_log();
    assert_eq!(
        after.len(),
        before,
        "upstream asked after a whole preload:\n{}",
        after[before..].join("\n")
    );
}

/// `POST /api/v1/preload`: off without an admin token; with one, refused
/// without it, and preloading what is named with it.
#[test]
fn the_admin_preload_endpoint_needs_its_token() {
    let fake = FakeRegistry::start();
    let image = fake.add_image("org/app", "1", &[50_000]);
    let config = config_json(&[(&fake.url(), &[PREFIX])]);
    let query = format!("/api/v1/preload?image={PREFIX}/org/app:1");
    let off = Regcache::start(&config, temp_dir("regcache-admin-off-").path());
    assert_eq!(http(off.addr(), "POST", &query, &[]).unwrap().status, 404);
    drop(off);

    let token = "admin-token-0123456789";
    let storage = temp_dir("regcache-admin-");
    let rc = Regcache::start_with_env(&config, storage.path(), &[("REGCACHE_ADMIN_TOKEN", token)]);
    let mark = fake.request_count();
    for headers in [
        vec![],
        vec![("Authorization", "Bearer wrong-token-0123456789")],
    ] {
        let r = http(rc.addr(), "POST", &query, &headers).unwrap();
        assert_eq!(r.status, 401, "{}", r.describe());
    }
    assert_eq!(
        fake.request_count(),
        mark,
        "a refused preload reached upstream"
    );
    let bearer = format!("Bearer {token}");
    let r = http(rc.addr(), "POST", &query, &[("Authorization", &bearer)]).unwrap();
    assert_eq!(r.status, 200, "{}", r.describe());
    assert!(r.text().contains("\"done\""), "{}", r.text());
    let mark = fake.request_count();
    let work = temp_dir("regcache-admin-pull-");
    pull_and_check_image(
        &format!("{}/{PREFIX}/org/app:1", rc.addr()),
        &image,
        &work.path().join("p"),
    );
    assert!(fake.requests_since(mark).is_empty());
}
