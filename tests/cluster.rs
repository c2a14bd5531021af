//! A cluster of replicas on one bucket (issue 12): three regcache processes
//! on loopback, each with its own disk, one S3 server (moto), and a fake
//! upstream that serves slowly and counts GETs per digest.
//!
//! Run: `cargo test --test cluster -- --test-threads=1`
//! Needs: skopeo; moto in target/test-venv (scripts/test).

use regcache_testkit as support;

use std::time::Duration;

use sha2::Digest as _;
use support::fake::{describe, ms, FakeRegistry, Gate, Serve};
use support::s3::S3Server;
use support::*;

const PREFIX: &str = "upstream.test";
const SECRET: &str = "cluster-secret-for-tests-0123";

/// Three replicas of one cluster on `s3`, in front of `fake`.
struct Cluster {
    replicas: Vec<Regcache>,
    peer_addrs: Vec<String>,
    _storage: tempfile::TempDir,
}

impl Cluster {
    fn start(fake: &FakeRegistry, s3: &S3Server) -> Cluster {
        Self::start_with(fake, s3, "10m")
    }

    fn start_with(fake: &FakeRegistry, s3: &S3Server, freshness: &str) -> Cluster {
        let storage = temp_dir("regcache-cluster-");
        let peer_addrs: Vec<String> = (0..3)
            .map(|_| format!("127.0.0.1:{}", free_port()))
            .collect();
        let config = config_json(&[(&fake.url(), &[PREFIX])]);
        let endpoint = s3.endpoint();
        let peers = peer_addrs.join(",");
        let replicas = peer_addrs
            .iter()
            .enumerate()
            .map(|(i, addr)| {
                let env = [
                    ("REGISTRY_STORAGE", "s3"),
                    ("REGISTRY_STORAGE_S3_BUCKET", "regcache"),
                    ("REGISTRY_STORAGE_S3_REGION", "us-east-1"),
                    ("REGISTRY_STORAGE_S3_REGIONENDPOINT", endpoint.as_str()),
                    ("REGISTRY_STORAGE_S3_ACCESSKEY", "minio"),
                    ("REGISTRY_STORAGE_S3_SECRETKEY", "minio123"),
                    ("REGCACHE_TAG_FRESHNESS", freshness),
                    ("REGCACHE_PEER_LISTEN", addr.as_str()),
                    ("REGCACHE_PEERS", peers.as_str()),
                    ("REGCACHE_PEER_SECRET", SECRET),
                ];
                Regcache::start_with_env(&config, &storage.path().join(format!("r{i}")), &env)
            })
            .collect();
        let c = Cluster {
            replicas,
            peer_addrs,
            _storage: storage,
        };
        c.wait_members(3);
        c
    }

    /// Until every replica's /readyz sees `n` members.
    fn wait_members(&self, n: usize) {
        for rc in &self.replicas {
            let seen = wait_for(Duration::from_secs(20), || {
                let r = get(rc.addr(), "/readyz");
                r.text()
                    .contains(&format!("cluster: {n} members"))
                    .then_some(())
            });
            assert!(
                seen.is_some(),
                "{} never saw {n} members: {}",
                rc.addr(),
                get(rc.addr(), "/readyz").text()
            );
        }
    }

    /// The node id of replica `i`, from its peer endpoint.
    fn node_id(&self, i: usize) -> String {
        let auth = format!("Bearer {SECRET}");
        let r = http(
            &self.peer_addrs[i],
            "GET",
            "/peer/v1/id",
            &[("Authorization", &auth)],
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap();
        v["id"].as_str().unwrap().to_owned()
    }

    /// The replica that owns `key`: rendezvous over the node ids, as the
    /// replicas compute it (SHA-256 of id, 0, key; highest first 8 bytes).
    fn owner_of(&self, key: &str) -> usize {
        let weight = |id: &str| {
            let mut h = sha2::Sha256::new();
            h.update(id.as_bytes());
            h.update([0]);
            h.update(key.as_bytes());
            u64::from_be_bytes(h.finalize()[..8].try_into().unwrap())
        };
        (0..3).max_by_key(|i| weight(&self.node_id(*i))).unwrap()
    }
}

/// skopeo pulls of `repo:tag` through every replica at once; the results.
fn pull_all_at_once(c: &Cluster, repo: &str, image: &ImageParts) -> Vec<Result<(), String>> {
    let work = temp_dir("regcache-cluster-pulls-");
    let threads: Vec<_> = c
        .replicas
        .iter()
        .enumerate()
        .map(|(i, rc)| {
            let reference = format!("{}/{PREFIX}/{repo}", rc.addr());
            let dest = work.path().join(format!("r{i}"));
            let image = image.clone();
            std::thread::spawn(move || {
                skopeo_copy(&reference, &dest, false)?;
                check_image_copy(&reference, &image, &dest);
                Ok(())
            })
        })
        .collect();
    threads
        .into_iter()
        .map(|t| t.join().unwrap_or_else(|_| Err("check failed".into())))
        .collect()
}

/// The same image pulled at the same moment through all three replicas:
/// one upstream GET per blob, every client gets verified bytes, and
/// afterwards every replica serves it with no upstream request at all.
#[test]
fn one_upstream_get_per_blob_for_the_whole_cluster() {
    let s3 = S3Server::start();
    s3.create_bucket("regcache");
    let fake = FakeRegistry::start();
    let image = fake.add_image("org/app", "1", &[3_000_000, 200_000]);
    for d in image.blob_digests() {
        fake.set(
            &format!("/v2/org/app/blobs/{d}"),
            Serve::ok().slow(64 << 10, ms(10)),
        );
    }
    let c = Cluster::start(&fake, &s3);
    let mark = fake.request_count();
    for (i, r) in pull_all_at_once(&c, "org/app:1", &image)
        .into_iter()
        .enumerate()
    {
        r.unwrap_or_else(|e| panic!("replica {i}: {e}\n{}", c.replicas[i].log_tail(40)));
    }
    let made = fake.requests_since(mark);
    for d in image.blob_digests() {
        let gets = made
            .iter()
            .filter(|r| r.method == "GET" && r.path.ends_with(&d))
            .count();
        assert_eq!(
            gets,
            1,
            "blob {d}: {gets} upstream GETs\n{}",
            describe(&made)
        );
    }
    let manifest_gets = made
        .iter()
        .filter(|r| r.method == "GET" && r.path.contains("/manifests/"))
        .count();
    assert_eq!(manifest_gets, 1, "manifest: {}", describe(&made));

    let mark = fake.request_count();
    let work = temp_dir("regcache-cluster-again-");
    for (i, rc) in c.replicas.iter().enumerate() {
        let reference = format!("{}/{PREFIX}/org/app:1", rc.addr());
        pull_and_check_image(&reference, &image, &work.path().join(format!("r{i}")));
    }
    let again = fake.requests_since(mark);
    assert!(
        again.is_empty(),
        "warm pulls went upstream:\n{}",
        describe(&again)
    );
    let counter = |rc: &Regcache, name: &str| -> f64 {
        let m = get(rc.addr(), "/metrics").text();
        m.lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let from_peers: f64 = c
        .replicas
        .iter()
        .map(|rc| counter(rc, "regcache_peer_fetches_total"))
        .sum();
    let served: f64 = c
        .replicas
        .iter()
        .map(|rc| counter(rc, "regcache_peer_served_total"))
        .sum();
    assert!(
        from_peers >= 2.0 && served >= 2.0,
        "peer fetches {from_peers}, served {served}"
    );
    assert_eq!(counter(&c.replicas[0], "regcache_cluster_members"), 3.0);
}

/// The owner of the big layer is killed in the middle of its fill: the
/// other replicas' clients still get the whole, verified image (resumed
/// from upstream), and nothing partial is stored anywhere.
#[test]
fn the_owner_killed_mid_fill_costs_the_others_nothing() {
    let s3 = S3Server::start();
    s3.create_bucket("regcache");
    let fake = FakeRegistry::start();
    let image = fake.add_image("org/big", "1", &[4_000_000]);
    let layer = image.layer_digests[0].clone();
    let gate = Gate::new();
    let _open = OpenOnDrop(gate.clone());
    fake.set(
        &format!("/v2/org/big/blobs/{layer}"),
        Serve::ok().pause_at(1_000_000, &gate),
    );
    let mut c = Cluster::start(&fake, &s3);
    let owner = c.owner_of(&layer);
    let others: Vec<usize> = (0..3).filter(|i| *i != owner).collect();

    let work = temp_dir("regcache-cluster-kill-");
    let pulls: Vec<_> = others
        .iter()
        .map(|&i| {
            let reference = format!("{}/{PREFIX}/org/big:1", c.replicas[i].addr());
            let dest = work.path().join(format!("r{i}"));
            let image = image.clone();
            std::thread::spawn(move || -> Result<(), String> {
                skopeo_copy(&reference, &dest, false)?;
                check_image_copy(&reference, &image, &dest);
                Ok(())
            })
        })
        .collect();
    assert!(
        gate.wait_reached(1, Duration::from_secs(30)),
        "the owner's fill never started"
    );
    c.replicas[owner].kill();
    gate.open();
    for (t, i) in pulls.into_iter().zip(&others) {
        t.join().unwrap().unwrap_or_else(|e| {
            panic!(
                "replica {i} after the owner died: {e}\n{}",
                c.replicas[*i].log_tail(40)
            )
        });
    }
    for &i in &others {
        let m = get(c.replicas[i].addr(), "/metrics").text();
        let fetched = m.lines().any(|l| {
            (l.starts_with("regcache_peer_fallbacks_total")
                || l.starts_with("regcache_fill_resumes_total"))
                && !l.ends_with(" 0")
        });
        assert!(
            fetched,
            "replica {i}: neither a fallback nor a resume counted\n{m}"
        );
        let fsck = run_regcache(
            &[
                "fsck",
                "--dry-run",
                "--storage",
                &c.replicas[i].storage().display().to_string(),
            ],
            Some(&config_json(&[(&fake.url(), &[PREFIX])])),
            Duration::from_secs(60),
        );
        assert!(fsck.success(), "replica {i}: {}", fsck.stdout_text());
    }
    for (key, bytes) in s3.objects("regcache", "") {
        if let Some(hex) = key.split("/blobs/sha256/").nth(1) {
            assert_eq!(
                digest_hex(&sha256_digest(&bytes)),
                hex.rsplit('/').next().unwrap(),
                "{key}"
            );
        }
    }
}

/// Once a tag is older than the freshness window, pulls through all three
/// replicas revalidate it upstream once: its owner asks, the others ask
/// the owner.
#[test]
fn a_tag_is_revalidated_once_for_the_whole_cluster() {
    let s3 = S3Server::start();
    s3.create_bucket("regcache");
    let fake = FakeRegistry::start();
    let image = fake.add_image("org/app", "1", &[20_000]);
    let c = Cluster::start_with(&fake, &s3, "3s");
    let work = temp_dir("regcache-cluster-tags-");
    let pull_each = |label: &str| {
        for (i, rc) in c.replicas.iter().enumerate() {
            let reference = format!("{}/{PREFIX}/org/app:1", rc.addr());
            pull_and_check_image(
                &reference,
                &image,
                &work.path().join(format!("{label}-{i}")),
            );
        }
    };
    pull_each("cold");
    std::thread::sleep(Duration::from_millis(3500));
    let mark = fake.request_count();
    pull_each("stale");
    let made: Vec<String> = fake
        .requests_since(mark)
        .iter()
        .map(|r| r.to_string())
        .collect();
    assert_eq!(
        made,
        ["HEAD /v2/org/app/manifests/1"],
        "one revalidation for the cluster"
    );
}

/// The peer endpoint opens only to the cluster's secret.
#[test]
fn the_peer_endpoint_refuses_requests_without_the_secret() {
    let s3 = S3Server::start();
    s3.create_bucket("regcache");
    let fake = FakeRegistry::start();
    let image = fake.add_image("org/app", "1", &[10_000]);
    let c = Cluster::start(&fake, &s3);
    let work = temp_dir("regcache-cluster-auth-");
    pull_and_check_image(
        &format!("{}/{PREFIX}/org/app:1", c.replicas[0].addr()),
        &image,
        &work.path().join("p"),
    );
    let peer = &c.peer_addrs[0];
    let dir = fake.addr().replace(':', "_");
    let blob = format!("/peer/v1/{dir}/v2/org/app/blobs/{}", image.layer_digests[0]);
    for (what, headers) in [
        ("no credentials", vec![]),
        (
            "a wrong secret",
            vec![("Authorization", "Bearer not-the-cluster-secret")],
        ),
        (
            "Basic",
            vec![("Authorization", "Basic Y2x1c3RlcjpzZWNyZXQ=")],
        ),
    ] {
        for path in ["/peer/v1/id", blob.as_str()] {
            let r = http(peer, "GET", path, &headers).unwrap();
            assert_eq!(r.status, 401, "{what} on {path}: {}", r.describe());
            assert!(
                !r.body.windows(8).any(|w| w == b"ustar\0\x30\x30"),
                "{what}: content leaked"
            );
        }
    }
    let auth = format!("Bearer {SECRET}");
    let ok = http(peer, "GET", &blob, &[("Authorization", &auth)]).unwrap();
    assert_eq!(ok.status, 200, "{}", ok.describe());
    let mark = fake.request_count();
    let write = http(peer, "PUT", &blob, &[("Authorization", &auth)]).unwrap();
    assert!(
        write.status >= 400,
        "a write through the peer endpoint: {}",
        write.describe()
    );
    assert_eq!(fake.request_count(), mark);
}

/// Opens a gate when dropped, so a failing test never leaves a body held.
struct OpenOnDrop(Gate);

impl Drop for OpenOnDrop {
    fn drop(&mut self) {
        self.0.open();
    }
}
