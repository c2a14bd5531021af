//! Under faults, load and hostile input: nothing corrupt, nothing leaked,
//! nothing stuck. Each test prints its figures (`scripts/reliability` runs
//! them with `--nocapture`); `REGCACHE_RELIABILITY=full` runs the full form
//! (more tries, 100 kills, 1,000 connections), the default a short one for CI.
//!
//! Needs: nothing beyond the fake upstream (faults on demand) and the binary.

use regcache_testkit as support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use support::fake::{ms, FakeBlob, FakeRegistry, Gate, Serve};
use support::netfault::{Mode, NetFault};
use support::*;

const PREFIX: &str = "upstream.test";

/// `short` in CI, `full` with `REGCACHE_RELIABILITY=full`.
fn scale(short: usize, full: usize) -> usize {
    match std::env::var("REGCACHE_RELIABILITY").as_deref() {
        Ok("full") => full,
        _ => short,
    }
}

/// A small random number below `n` (for choices in storms).
fn below(n: usize) -> usize {
    let b = random_bytes(4);
    u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize % n.max(1)
}

/// Every blob file under an upstream root: (files, corrupt ones).
fn rehash_store(root: &Path) -> (usize, Vec<String>) {
    let mut files = 0;
    let mut corrupt = Vec::new();
    for p in walk(&root.join("blobs")) {
        let full = root.join("blobs").join(&p);
        if !full.is_file() {
            continue;
        }
        files += 1;
        let data = std::fs::read(&full).unwrap_or_default();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if digest_hex(&sha256_digest(&data)) != name {
            corrupt.push(full.display().to_string());
        }
    }
    (files, corrupt)
}

/// How one client's GET of a blob ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pull {
    /// The whole body, and it hashes to the digest.
    Correct,
    /// An error status, or a body that did not end as its framing said.
    Failed,
    /// A body presented as complete whose bytes are not the blob's.
    Wrong,
}

fn pull_blob(addr: &str, blob: &FakeBlob) -> Pull {
    let Ok(mut r) = http_open(addr, "GET", &blob.path_via(PREFIX), &[]) else {
        return Pull::Failed;
    };
    if r.status != 200 {
        return Pull::Failed;
    }
    let body = r.read_rest();
    match (body.complete(), sha256_digest(&body.bytes) == blob.digest) {
        (true, true) => Pull::Correct,
        (true, false) => Pull::Wrong,
        (false, _) => Pull::Failed,
    }
}

struct Faulty {
    fake: FakeRegistry,
    rc: Regcache,
    _storage: tempfile::TempDir,
    root: std::path::PathBuf,
}

fn start(env: &[(&str, &str)]) -> Faulty {
    let fake = FakeRegistry::start();
    let storage = temp_dir("regcache-storage-");
    let rc = Regcache::start_with_env(
        &config_json(&[(&fake.url(), &[PREFIX])]),
        &storage.path().join("storage"),
        env,
    );
    let root = upstream_root(&storage.path().join("storage"), &fake.addr());
    Faulty {
        fake,
        rc,
        _storage: storage,
        root,
    }
}

/// Every upstream fault kind, several times, with two clients each: clients
/// get the right bytes or an error, never wrong bytes as complete, and the
/// store holds nothing unverified. Resumable faults are repaired.
#[test]
fn upstream_faults_never_reach_clients_as_wrong_bytes() {
    let f = start(&[
        // Faults one after another must not open the breaker: that is
        // another test.
        ("REGCACHE_BREAKER_FAILURES", "0"),
        ("REGCACHE_UPSTREAM_IDLE_TIMEOUT", "1s"),
        ("REGCACHE_UPSTREAM_RESPONSE_TIMEOUT", "3s"),
    ]);
    let tries = scale(2, 20);
    let size = 256 << 10;
    let never = Gate::new();
    type Fault = Box<dyn Fn(&FakeRegistry, &FakeBlob)>;
    let once = |serve: Serve| -> Fault {
        Box::new(move |fake: &FakeRegistry, b: &FakeBlob| {
            fake.once(&b.path, serve.clone().only("GET"))
        })
    };
    // (kind, fault, every pull must complete)
    let kinds: Vec<(&str, Fault, bool)> = vec![
        (
            "truncated body (upstream resumes)",
            once(Serve::ok().truncate_after(size / 2)),
            true,
        ),
        (
            "truncated body (no resume)",
            Box::new(move |fake: &FakeRegistry, b: &FakeBlob| {
                fake.set(&b.path, Serve::ok().no_ranges());
                fake.once(&b.path, Serve::ok().only("GET").truncate_after(size / 2));
            }),
            false,
        ),
        ("wrong bytes", once(Serve::ok().corrupt_at(size / 3)), false),
        (
            "connection reset mid-body",
            once(Serve::ok().reset_after(size / 3)),
            true,
        ),
        ("503 before the body", once(Serve::status(503)), false),
        (
            "stall mid-body",
            once(Serve::ok().pause_at(size / 2, &never)),
            true,
        ),
        ("slow drip", once(Serve::ok().slow(16 << 10, ms(5))), true),
        (
            "Content-Length too long",
            once(Serve::ok().length(size + 1000)),
            false,
        ),
        (
            "Content-Length too short",
            once(Serve::ok().length(size - 1000)),
            false,
        ),
        (
            "429 with Retry-After",
            once(Serve::status(429).header("Retry-After", "1")),
            false,
        ),
    ];
    let mut table = vec![
        "| upstream fault | tries | client pulls | correct | errors | wrong bytes served |"
            .to_string(),
        "|---|---|---|---|---|---|".to_string(),
    ];
    let mut wrong_total = 0;
    for (kind, fault, must_complete) in &kinds {
        let (mut pulls, mut correct, mut failed, mut wrong) = (0, 0, 0, 0);
        for _ in 0..tries {
            let blob = f.fake.add_blob("org/img", &random_bytes(size));
            fault(&f.fake, &blob);
            let clients: Vec<_> = (0..2)
                .map(|_| {
                    let (addr, b) = (f.rc.addr().to_owned(), blob.clone());
                    std::thread::spawn(move || pull_blob(&addr, &b))
                })
                .collect();
            for c in clients {
                pulls += 1;
                match c.join().unwrap() {
                    Pull::Correct => correct += 1,
                    Pull::Failed => failed += 1,
                    Pull::Wrong => wrong += 1,
                }
            }
            if kind.starts_with("429") {
                std::thread::sleep(Duration::from_millis(1100));
            }
        }
        wrong_total += wrong;
        table.push(format!(
            "| {kind} | {tries} | {pulls} | {correct} | {failed} | {wrong} |"
        ));
        if *must_complete {
            assert_eq!(
                correct,
                pulls,
                "{kind}: every pull must complete\n{}",
                f.rc.log_tail(30)
            );
        }
    }
    wait_tmp_empty(&f.root, "after the faults");
    let (files, corrupt) = rehash_store(&f.root);
    println!("{}", table.join("\n"));
    println!(
        "stored blobs re-hashed: {files}, corrupt or partial: {}",
        corrupt.len()
    );
    assert_eq!(wrong_total, 0, "wrong bytes were served as complete");
    assert!(corrupt.is_empty(), "corrupt blobs stored: {corrupt:?}");
}

/// SIGKILLs at random moments of fills, of workers and of the whole
/// process group; afterwards every stored blob hashes to its name, nothing
/// is left in `tmp/`, and every blob pulls correctly.
#[test]
fn kill_storms_leave_nothing_corrupt_or_partial() {
    let mut f = start(&[]);
    let blobs: Vec<FakeBlob> = (0..16)
        .map(|_| f.fake.add_blob("org/img", &random_bytes(512 << 10)))
        .collect();
    for b in &blobs {
        f.fake.set(&b.path, Serve::ok().slow(32 << 10, ms(4)));
    }
    let kills = scale(12, 100);
    let (mut worker_kills, mut group_kills) = (0, 0);
    for _ in 0..kills {
        let clients: Vec<_> = (0..4)
            .map(|_| {
                let (addr, b) = (f.rc.addr().to_owned(), blobs[below(blobs.len())].clone());
                std::thread::spawn(move || pull_blob(&addr, &b))
            })
            .collect();
        std::thread::sleep(Duration::from_millis(20 + below(120) as u64));
        let workers = f.rc.worker_pids();
        if below(10) < 7 && !workers.is_empty() {
            let _ = kill(
                Pid::from_raw(workers[below(workers.len())]),
                Signal::SIGKILL,
            );
            worker_kills += 1;
        } else {
            f.rc.kill();
            group_kills += 1;
        }
        for c in clients {
            assert_ne!(
                c.join().unwrap(),
                Pull::Wrong,
                "wrong bytes served as complete"
            );
        }
        if f.rc.pid().is_none() {
            f.rc.restart();
        }
        // Back before the next round: the worker restarted. A worker that
        // keeps dying restarts after a doubling back-off (0.1 s on), and from
        // the eighth kill in a row after the supervisor's cap of 10 s.
        let ready = wait_for(Duration::from_secs(20), || {
            http(f.rc.addr(), "GET", "/readyz", &[])
                .ok()
                .filter(|r| r.status == 200)
        });
        assert!(
            ready.is_some(),
            "not ready again after a kill\n{}",
            f.rc.log_tail(30)
        );
    }
    // Quiet: fills finished or abandoned, then a restart cleans abandoned spools.
    f.rc.stop();
    f.rc.restart();
    wait_tmp_empty(&f.root, "after the storm and a restart");
    let (files, corrupt) = rehash_store(&f.root);
    let mut ok = 0;
    for b in &blobs {
        if pull_blob(f.rc.addr(), b) == Pull::Correct {
            ok += 1;
        }
    }
    println!(
        "kill -9 storm: {kills} kills ({worker_kills} of a worker, {group_kills} of the whole group) during fills; \
         stored blobs re-hashed: {files}, corrupt or partial: {}; tmp/ after restart: empty; pulls afterwards: {ok}/{}",
        corrupt.len(),
        blobs.len()
    );
    assert!(corrupt.is_empty(), "corrupt blobs stored: {corrupt:?}");
    assert_eq!(
        ok,
        blobs.len(),
        "pulls after the storm\n{}",
        f.rc.log_tail(30)
    );
}

/// Many connections at once (hits, misses, HEADs, slow readers): every one
/// answered correctly, memory bounded (peak PSS printed).
#[test]
fn many_connections_at_once_are_all_answered() {
    let f = start(&[]);
    let n = scale(200, 1000);
    let warm: Vec<FakeBlob> = (0..20)
        .map(|_| f.fake.add_blob("org/img", &random_bytes(64 << 10)))
        .collect();
    for b in &warm {
        assert_eq!(pull_blob(f.rc.addr(), b), Pull::Correct);
    }
    let cold: Vec<FakeBlob> = (0..20)
        .map(|_| f.fake.add_blob("org/img", &random_bytes(128 << 10)))
        .collect();
    let big = f.fake.add_blob("org/img", &random_bytes(256 << 10));
    assert_eq!(pull_blob(f.rc.addr(), &big), Pull::Correct);
    let base_pss = f.rc.pss_kib();
    let peak = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, done, pids) = (peak.clone(), done.clone(), {
            let mut p = f.rc.worker_pids();
            p.push(f.rc.pid().unwrap());
            p
        });
        std::thread::spawn(move || {
            while !done.load(Ordering::SeqCst) {
                let now: u64 = pids.iter().map(|p| pss_kib(*p)).sum();
                peak.fetch_max(now as usize, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let barrier = Arc::new(Barrier::new(n));
    let errors = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let threads: Vec<_> = (0..n)
        .map(|i| {
            let (addr, barrier, errors) = (f.rc.addr().to_owned(), barrier.clone(), errors.clone());
            let (w, c, big) = (
                warm[i % warm.len()].clone(),
                cold[i % cold.len()].clone(),
                big.clone(),
            );
            std::thread::Builder::new()
                .stack_size(256 << 10)
                .spawn(move || {
                    barrier.wait();
                    let ok = match i % 10 {
                        0..=4 => pull_blob(&addr, &w) == Pull::Correct,
                        5 | 6 => pull_blob(&addr, &c) == Pull::Correct,
                        7 | 8 => http(&addr, "HEAD", &w.path_via(PREFIX), &[]).is_ok_and(|r| {
                            r.status == 200
                                && r.header("content-length") == Some(&*w.len().to_string())
                        }),
                        _ => slow_read(&addr, &big),
                    };
                    if !ok {
                        errors.fetch_add(1, Ordering::SeqCst);
                    }
                })
                .unwrap()
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let took = started.elapsed();
    done.store(true, Ordering::SeqCst);
    sampler.join().unwrap();
    let errors = errors.load(Ordering::SeqCst);
    println!(
        "{n} concurrent connections (50% hits, 20% misses, 20% HEAD, 10% slow readers): {errors} errors, \
         {:.1} s; PSS of all regcache processes: {} KiB before, {} KiB at peak",
        took.as_secs_f64(),
        base_pss,
        peak.load(Ordering::SeqCst)
    );
    assert_eq!(errors, 0, "failed requests\n{}", f.rc.log_tail(30));
}

/// Reads a blob 4 KiB at a time with pauses: a slow client.
fn slow_read(addr: &str, blob: &FakeBlob) -> bool {
    let Ok(mut r) = http_open(addr, "GET", &blob.path_via(PREFIX), &[]) else {
        return false;
    };
    let mut got = Vec::new();
    loop {
        match r.read_some(4 << 10) {
            Ok(b) if b.is_empty() => break,
            Ok(b) => got.extend_from_slice(&b),
            Err(_) => return false,
        }
        if got.len() % (64 << 10) < (4 << 10) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    sha256_digest(&got) == blob.digest
}

/// Connections that send nothing and connections that send a header byte at
/// a time are closed within the header timeout, while normal requests keep
/// being served.
#[test]
fn slow_and_silent_clients_are_cut_off_while_others_are_served() {
    let f = start(&[("REGCACHE_HEADER_TIMEOUT", "2s")]);
    let blob = f.fake.add_blob("org/img", &random_bytes(10_000));
    assert_eq!(pull_blob(f.rc.addr(), &blob), Pull::Correct);
    let each = scale(50, 100);
    let addr: std::net::SocketAddr = f.rc.addr().parse().unwrap();
    let opened = Instant::now();
    let silent: Vec<TcpStream> = (0..each)
        .map(|_| TcpStream::connect(addr).unwrap())
        .collect();
    let slow: Vec<_> = (0..each)
        .map(|_| {
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(addr).unwrap();
                for b in b"GET /v2/ HTTP/1.1\r\nHost: x\r\nX-Slow: yes\r\n"
                    .iter()
                    .cycle()
                {
                    if s.write_all(&[*b]).is_err() {
                        return Some(opened.elapsed());
                    }
                    std::thread::sleep(Duration::from_millis(250));
                    if opened.elapsed() > Duration::from_secs(15) {
                        return None;
                    }
                }
                None
            })
        })
        .collect();
    // Normal clients meanwhile.
    let mut served = 0;
    while opened.elapsed() < Duration::from_secs(3) {
        assert_eq!(
            pull_blob(f.rc.addr(), &blob),
            Pull::Correct,
            "a normal client failed"
        );
        served += 1;
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut silent_closed = 0;
    for mut s in silent {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 64];
        let closed = match s.read(&mut buf) {
            Ok(0) => true,
            Ok(_) => false,
            // Timing out here means the server kept it open.
            Err(e) => !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
        };
        if closed {
            silent_closed += 1;
        }
    }
    let slow_closed: Vec<Duration> = slow.into_iter().filter_map(|t| t.join().unwrap()).collect();
    let latest = slow_closed.iter().max().copied().unwrap_or_default();
    println!(
        "header timeout 2 s: {silent_closed}/{each} silent and {}/{each} byte-at-a-time connections closed \
         (the last slow one after {:.1} s); {served} normal requests served meanwhile",
        slow_closed.len(),
        latest.as_secs_f64()
    );
    assert_eq!(silent_closed, each, "silent connections left open");
    assert_eq!(slow_closed.len(), each, "slowloris connections left open");
}

/// A blackholed upstream (accepts, never answers): once the breaker opens,
/// a cached tag answers at once (stale) and an uncached one fails fast with a
/// registry error; when the upstream is back, the breaker closes again.
#[test]
fn a_blackholed_upstream_fails_fast_once_the_breaker_opens() {
    let fake = FakeRegistry::start();
    let image = fake.add_image("org/app", "1", &[20_000]);
    fake.add_image("org/app", "2", &[20_000]);
    let net = NetFault::start(fake.addr().parse().unwrap());
    let storage = temp_dir("regcache-storage-");
    let rc = Regcache::start_with_env(
        &config_json(&[(&net.url(), &[PREFIX])]),
        &storage.path().join("storage"),
        &[
            ("REGCACHE_TAG_FRESHNESS", "0s"),
            ("REGCACHE_UPSTREAM_RESPONSE_TIMEOUT", "1s"),
            ("REGCACHE_UPSTREAM_CONNECT_TIMEOUT", "1s"),
            ("REGCACHE_BREAKER_FAILURES", "2"),
            ("REGCACHE_BREAKER_COOLDOWN", "3s"),
        ],
    );
    let tag = |t: &str| {
        let started = Instant::now();
        let r = http(
            rc.addr(),
            "GET",
            &format!("/v2/{PREFIX}/org/app/manifests/{t}"),
            &[("Accept", MANIFEST_ACCEPT)],
        )
        .unwrap();
        (r, started.elapsed())
    };
    let (r, _) = tag("1");
    assert_eq!(r.status, 200, "{}", r.describe());
    assert_eq!(
        r.header("docker-content-digest"),
        Some(&*image.manifest_digest)
    );
    net.set(Mode::Blackhole);
    let mut before = Vec::new();
    for _ in 0..2 {
        let (r, took) = tag("1");
        assert_eq!(
            (r.status, r.header("X-Cache")),
            (200, Some("STALE")),
            "{}",
            r.describe()
        );
        before.push(took);
    }
    let (r, open_cached) = tag("1");
    assert_eq!(
        (r.status, r.header("X-Cache")),
        (200, Some("STALE")),
        "{}",
        r.describe()
    );
    let (r, open_uncached) = tag("2");
    assert_eq!(r.status, 503, "{}", r.describe());
    assert_eq!(r.error_codes(), ["UNAVAILABLE"]);
    println!(
        "blackholed upstream: cached tag {:.0} ms and {:.0} ms while timing out, then {:.1} ms with the breaker open; \
         uncached tag {:.1} ms (503)",
        before[0].as_secs_f64() * 1e3,
        before[1].as_secs_f64() * 1e3,
        open_cached.as_secs_f64() * 1e3,
        open_uncached.as_secs_f64() * 1e3
    );
    // Failing fast means: not waiting for the upstream's response timeout.
    assert!(
        open_cached < Duration::from_millis(500),
        "cached tag with the breaker open: {open_cached:?}"
    );
    assert!(
        open_uncached < Duration::from_millis(500),
        "uncached tag with the breaker open: {open_uncached:?}"
    );
    net.set(Mode::Forward);
    let back = wait_for(Duration::from_secs(10), || {
        let (r, _) = tag("2");
        (r.status == 200).then_some(())
    });
    assert!(
        back.is_some(),
        "the breaker did not close with the upstream back\n{}",
        rc.log_tail(20)
    );
    let (r, _) = tag("1");
    assert_eq!(r.header("X-Cache"), Some("REVALIDATED"), "{}", r.describe());
}

/// A worker killed in the middle of fills restarts quickly; clients of the
/// other upstream see no failure and cached content of the killed one is
/// served all along; the restart is counted.
#[test]
fn a_killed_worker_costs_other_upstreams_nothing() {
    let a = FakeRegistry::start();
    let b = FakeRegistry::start();
    let storage = temp_dir("regcache-storage-");
    let rc = Regcache::start(
        &config_json(&[(&a.url(), &["a.test"]), (&b.url(), &["b.test"])]),
        &storage.path().join("storage"),
    );
    let cached_a = a.add_blob("org/img", &random_bytes(100_000));
    let slow_a = a.add_blob("org/img", &random_bytes(2 << 20));
    a.set(&slow_a.path, Serve::ok().slow(64 << 10, ms(20)));
    let b_blobs: Vec<FakeBlob> = (0..10)
        .map(|_| b.add_blob("org/img", &random_bytes(50_000)))
        .collect();
    let get = |prefix: &str, blob: &FakeBlob| -> bool {
        let r = http(rc.addr(), "GET", &blob.path_via(prefix), &[]);
        r.is_ok_and(|r| r.status == 200 && sha256_digest(&r.body) == blob.digest)
    };
    assert!(get("a.test", &cached_a));
    let worker_a = rc
        .workers()
        .into_iter()
        .find(|(p, _)| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&a.addr()))
        })
        .map(|(p, _)| p)
        .expect("a.test's worker");
    // A fill in flight, then the kill.
    let filling = {
        let (addr, blob) = (rc.addr().to_owned(), slow_a.clone());
        std::thread::spawn(move || {
            http_open(&addr, "GET", &blob.path_via("a.test"), &[]).map(|mut r| r.read_rest())
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (addr, blobs, stop) = (rc.addr().to_owned(), b_blobs.clone(), stop.clone());
        std::thread::spawn(move || {
            let (mut ok, mut failed) = (0, 0);
            while !stop.load(Ordering::SeqCst) {
                for blob in &blobs {
                    let r = http(&addr, "GET", &blob.path_via("b.test"), &[]);
                    match r {
                        Ok(r) if r.status == 200 && sha256_digest(&r.body) == blob.digest => {
                            ok += 1
                        }
                        _ => failed += 1,
                    }
                }
            }
            (ok, failed)
        })
    };
    let killed = Instant::now();
    kill(Pid::from_raw(worker_a), Signal::SIGKILL).unwrap();
    let mut cached_during = (0, 0);
    let tag_back = wait_for(Duration::from_secs(10), || {
        cached_during.0 += 1;
        if get("a.test", &cached_a) {
            cached_during.1 += 1;
        }
        let r = http(rc.addr(), "GET", "/readyz", &[]).ok()?;
        (r.status == 200 && rc.worker_pids().len() == 2 && !rc.worker_pids().contains(&worker_a))
            .then(|| killed.elapsed())
    });
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    let (ok, failed) = load.join().unwrap();
    let _ = filling.join();
    let restarted = tag_back.expect("the killed worker was not restarted");
    let m = http(rc.addr(), "GET", "/metrics", &[]).unwrap().text();
    let restarts = m
        .lines()
        .find(|l| l.starts_with("regcache_worker_restarts_total") && l.contains(&a.addr()))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    println!(
        "worker SIGKILLed mid-fill: ready again after {:.2} s; the other upstream: {ok} requests, {failed} failed; \
         cached content of the killed one: {}/{} served during the restart; restarts counted: {restarts}",
        restarted.as_secs_f64(),
        cached_during.1,
        cached_during.0
    );
    assert_eq!(failed, 0, "the other upstream's clients saw failures");
    assert_eq!(
        cached_during.1, cached_during.0,
        "cached content not served during the restart"
    );
    assert_eq!(restarts, 1.0, "{m}");
}

/// Oversized requests are refused without harm: headers beyond the buffer
/// limit, a write with a huge declared body; the process keeps serving.
#[test]
fn oversized_requests_are_refused() {
    let f = start(&[]);
    let blob = f.fake.add_blob("org/img", &random_bytes(1000));
    let huge = "x".repeat(300 << 10);
    let r = http(f.rc.addr(), "GET", "/v2/", &[("X-Huge", &huge)]);
    assert!(
        r.as_ref()
            .map_or(true, |r| r.status == 431 || r.status == 400),
        "{:?}",
        r.map(|r| r.describe())
    );
    let mut s = TcpStream::connect(f.rc.addr()).unwrap();
    s.write_all(
        b"PUT /v2/a/blobs/uploads/ HTTP/1.1\r\nHost: x\r\nContent-Length: 1099511627776\r\n\r\n",
    )
    .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut head = [0u8; 12];
    s.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 405", "a write with a huge body");
    assert_eq!(
        pull_blob(f.rc.addr(), &blob),
        Pull::Correct,
        "still serving"
    );
}

/// A client that sends its request and closes its side (half-close) still
/// gets the whole answer, also for what the front routes to a worker.
#[test]
fn a_half_closed_client_gets_its_answer() {
    let f = start(&[]);
    f.fake.add_manifest(
        "org/app",
        Some("1"),
        OCI_MANIFEST,
        br#"{"schemaVersion":2}"#,
    );
    for path in [
        format!("/v2/{PREFIX}/org/app/manifests/1"),
        "/v2/".to_string(),
    ] {
        let mut s = TcpStream::connect(f.rc.addr()).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nAccept: {OCI_MANIFEST}\r\n\r\n"
        )
        .unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut answer = Vec::new();
        let _ = s.read_to_end(&mut answer);
        let text = String::from_utf8_lossy(&answer);
        assert!(
            text.starts_with("HTTP/1.1 200"),
            "{path} after a half-close: {text:?}"
        );
        assert!(text.ends_with('}'), "{path}: the body is missing: {text:?}");
    }
}
