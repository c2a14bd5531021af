//! How the worker's HTTP clients check a server's certificate: the system's
//! roots through rustls-platform-verifier (what reqwest would use) plus
//! `REGCACHE_UPSTREAM_CA_FILE`'s, read at the first handshake that needs
//! them rather than when a client is built.
//!
//! reqwest reads and parses the system's CA bundle for every client it
//! builds, and a worker builds two (three in a cluster); what that left in
//! the heap cost each worker 450 KiB even if it never talked TLS, as most of
//! the embedded default CONFIG's workers never do. One [`Trust`] per worker,
//! shared by its clients, reads the bundle once, when a handshake needs it.

use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use rustls_platform_verifier::Verifier;

/// The roots a worker trusts; [`Trust::config`] gives each client its TLS
/// configuration.
#[derive(Debug)]
pub struct Trust {
    extra_roots: Vec<CertificateDer<'static>>,
    provider: Arc<CryptoProvider>,
    /// Built at the first certificate to check. A failure (no CA bundle on
    /// the system) is kept and fails every handshake that needs the system's
    /// roots, with its reason; plain-HTTP upstreams work without one.
    verifier: OnceLock<Result<Verifier, rustls::Error>>,
}

impl Trust {
    pub fn new(extra_roots: Vec<CertificateDer<'static>>) -> Arc<Trust> {
        regcache_store::init_tls();
        let provider = CryptoProvider::get_default()
            .expect("init_tls installs the process's provider")
            .clone();
        Arc::new(Trust {
            extra_roots,
            provider,
            verifier: OnceLock::new(),
        })
    }

    /// A client configuration that checks certificates against these roots
    /// and offers `alpn` (e.g. `h2`, `http/1.1`), for reqwest's
    /// `tls_backend_preconfigured`.
    pub fn config(self: &Arc<Self>, alpn: &[&[u8]]) -> ClientConfig {
        let mut config = ClientConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .expect("ring offers TLS 1.2 and 1.3")
            .dangerous()
            .with_custom_certificate_verifier(self.clone())
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        config
    }

    fn verifier(&self) -> Result<&Verifier, rustls::Error> {
        self.verifier
            .get_or_init(|| {
                let verifier = Verifier::new_with_extra_roots(
                    self.extra_roots.iter().cloned(),
                    self.provider.clone(),
                );
                if let Err(e) = &verifier {
                    tracing::error!("no roots to check upstream certificates against: {e}");
                }
                verifier
            })
            .as_ref()
            .map_err(Clone::clone)
    }
}

impl ServerCertVerifier for Trust {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.verifier()?.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )
    }

    // The handshake's signatures are checked as the platform verifier
    // checks them (with the provider's algorithms), no roots needed.
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        verify_tls12_signature(message, cert, dss, algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algorithms = &self.provider.signature_verification_algorithms;
        verify_tls13_signature(message, cert, dss, algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
