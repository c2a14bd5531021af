//! A real S3 server for tests: moto's server mode (PyPI `moto[server]`,
//! installed by `scripts/test` into `target/test-venv`), on a loopback port,
//! data in memory. Killed on drop.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::{free_port, http, temp_dir, wait_for};

pub struct S3Server {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

/// `moto_server`: `$REGCACHE_MOTO_SERVER`, else the test venv's.
pub fn moto_server() -> PathBuf {
    std::env::var_os("REGCACHE_MOTO_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/test-venv/bin/moto_server")
        })
}

impl S3Server {
    /// Starts moto and waits until it answers.
    pub fn start() -> S3Server {
        let bin = moto_server();
        assert!(
            bin.exists(),
            "{} is missing: run scripts/test (it installs moto[server] into target/test-venv)",
            bin.display()
        );
        let dir = temp_dir("regcache-s3-");
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("moto.log")).unwrap();
        let child = Command::new(bin)
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn moto_server");
        let s = S3Server {
            child,
            port,
            _dir: dir,
        };
        let addr = s.addr();
        let up = wait_for(Duration::from_secs(30), || {
            http(&addr, "GET", "/", &[]).ok()
        });
        assert!(up.is_some(), "moto_server did not answer on {addr}");
        s
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr())
    }

    /// Creates a bucket (moto takes unsigned requests).
    pub fn create_bucket(&self, name: &str) {
        let r = http(&self.addr(), "PUT", &format!("/{name}"), &[]).expect("create bucket");
        assert_eq!(r.status, 200, "create bucket {name}: {}", r.describe());
    }

    /// Every object in `bucket` under `prefix`: (key, bytes), read with
    /// boto3 from the same venv (moto wants signed reads).
    pub fn objects(&self, bucket: &str, prefix: &str) -> Vec<(String, Vec<u8>)> {
        let python = moto_server().with_file_name("python");
        let script = r#"
import base64, json, sys, boto3
s3 = boto3.client("s3", endpoint_url=sys.argv[1], aws_access_key_id="test",
                  aws_secret_access_key="test", region_name="us-east-1")
out = []
for page in s3.get_paginator("list_objects_v2").paginate(Bucket=sys.argv[2], Prefix=sys.argv[3]):
    for o in page.get("Contents", []):
        body = s3.get_object(Bucket=sys.argv[2], Key=o["Key"])["Body"].read()
        out.append([o["Key"], base64.b64encode(body).decode()])
print(json.dumps(out))
"#;
        let out = Command::new(python)
            .args(["-c", script, &self.endpoint(), bucket, prefix])
            .output()
            .expect("run the venv's python");
        assert!(
            out.status.success(),
            "listing {bucket}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let listed: Vec<(String, String)> = serde_json::from_slice(&out.stdout).expect("JSON");
        listed
            .into_iter()
            .map(|(k, b64)| {
                use base64::Engine as _;
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .unwrap();
                (k, bytes)
            })
            .collect()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
