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

    /// Every object in `bucket` under `prefix`: (key, bytes).
    pub fn objects(&self, bucket: &str, prefix: &str) -> Vec<(String, Vec<u8>)> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut q = format!("/{bucket}?list-type=2&prefix={prefix}");
            if let Some(t) = &token {
                q.push_str(&format!("&continuation-token={}", urlencode(t)));
            }
            let r = http(&self.addr(), "GET", &q, &[]).expect("list objects");
            let xml = r.text();
            for key in between_all(&xml, "<Key>", "</Key>") {
                let key = key.replace("&amp;", "&");
                let obj = http(&self.addr(), "GET", &format!("/{bucket}/{key}"), &[])
                    .expect("get object");
                out.push((key, obj.body));
            }
            token = between_all(&xml, "<NextContinuationToken>", "</NextContinuationToken>")
                .into_iter()
                .next();
            if token.is_none() {
                return out;
            }
        }
    }
}

fn between_all(text: &str, open: &str, close: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find(open) {
        let after = &rest[i + open.len()..];
        let Some(j) = after.find(close) else { break };
        out.push(after[..j].to_owned());
        rest = &after[j + close.len()..];
    }
    out
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
