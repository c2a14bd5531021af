//! The store contract on the S3 store, against a real S3 server (moto).

use std::sync::Arc;
use std::time::Duration;

use regcache_store::contract::{self, Subject};
use regcache_store::s3::{S3Config, S3Store};
use regcache_store::SpoolDir;
use regcache_testkit::s3::S3Server;

fn config(server: &S3Server, prefix: String) -> S3Config {
    S3Config {
        bucket: "contract".into(),
        region: "us-east-1".into(),
        endpoint: Some(server.endpoint()),
        access_key: Some("test".into()),
        secret_key: Some("test".into()),
        prefix,
        path_style: true,
        skip_verify: false,
        chunk_size: 5 << 20,
        timeout: Duration::from_secs(10),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contract() {
    let server = S3Server::start();
    server.create_bucket("contract");
    let s = &server;
    contract::run(move |dir| {
        // The location names the prefix; the spool stays local.
        let prefix = format!("c/{}", dir.file_name().unwrap().to_string_lossy());
        Subject {
            store: Arc::new(S3Store::new(config(s, prefix)).unwrap()),
            spools: SpoolDir::open(dir.join("spool")).unwrap(),
        }
    })
    .await;
}
