//! HTTPS on the front listener, with optional client certificates (mTLS),
//! configured with registry:2's variables: `REGISTRY_HTTP_TLS_CERTIFICATE`,
//! `REGISTRY_HTTP_TLS_KEY`, `REGISTRY_HTTP_TLS_CLIENTCAS_0`, `_1`, ...

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{var} {path}: {reason}")]
    File {
        var: String,
        path: String,
        reason: String,
    },
    #[error("REGISTRY_HTTP_TLS_CERTIFICATE and REGISTRY_HTTP_TLS_KEY must be set together")]
    Half,
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// The server TLS configuration from `env`, or `None` when TLS is off.
pub fn from_env(
    env: impl Fn(&str) -> Option<String>,
) -> Result<Option<Arc<rustls::ServerConfig>>, Error> {
    let cert = env("REGISTRY_HTTP_TLS_CERTIFICATE").filter(|s| !s.is_empty());
    let key = env("REGISTRY_HTTP_TLS_KEY").filter(|s| !s.is_empty());
    let (cert_path, key_path) = match (cert, key) {
        (None, None) => return Ok(None),
        (Some(c), Some(k)) => (c, k),
        _ => return Err(Error::Half),
    };
    let file_err = |var: &str, path: &str, reason: String| Error::File {
        var: var.to_string(),
        path: path.to_string(),
        reason,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert_path)
        .and_then(|it| it.collect())
        .map_err(|e| file_err("REGISTRY_HTTP_TLS_CERTIFICATE", &cert_path, e.to_string()))?;
    if certs.is_empty() {
        return Err(file_err(
            "REGISTRY_HTTP_TLS_CERTIFICATE",
            &cert_path,
            "no certificate in the file".into(),
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&key_path)
        .map_err(|e| file_err("REGISTRY_HTTP_TLS_KEY", &key_path, e.to_string()))?;

    let mut roots = rustls::RootCertStore::empty();
    for i in 0.. {
        let var = format!("REGISTRY_HTTP_TLS_CLIENTCAS_{i}");
        let Some(path) = env(&var).filter(|s| !s.is_empty()) else {
            break;
        };
        let cas = CertificateDer::pem_file_iter(&path)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| file_err(&var, &path, e.to_string()))?;
        for ca in cas {
            roots
                .add(ca)
                .map_err(|e| file_err(&var, &path, e.to_string()))?;
        }
    }
    let builder = rustls::ServerConfig::builder();
    let builder = if roots.is_empty() {
        builder.with_no_client_auth()
    } else {
        let verifier = WebPkiClientVerifier::builder(Arc::new(roots))
            .build()
            .map_err(|e| Error::Config(e.to_string()))?;
        builder.with_client_cert_verifier(verifier)
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| Error::Config(e.to_string()))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Some(Arc::new(config)))
}
