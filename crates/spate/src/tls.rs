//! TLS for the listeners: a certificate chain and its private key, read from PEM files at start.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

/// The TLS sides of the two listeners (they differ only in the protocols they name in ALPN).
pub struct Acceptors {
    pub http: TlsAcceptor,
    pub kafka: TlsAcceptor,
}

/// Reads the certificate chain (leaf first) and the key (PKCS#8, PKCS#1 or SEC1), and checks that
/// they belong together. Errors name the file, never its contents.
pub fn load(cert_file: &Path, key_file: &Path) -> Result<Acceptors> {
    let certs = CertificateDer::pem_file_iter(cert_file)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot read the TLS certificate file {}: {e}",
                cert_file.display()
            )
        })?;
    anyhow::ensure!(
        !certs.is_empty(),
        "the TLS certificate file {} holds no PEM certificate",
        cert_file.display()
    );
    let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| {
        anyhow::anyhow!(
            "cannot read a private key from the TLS key file {}: {e}",
            key_file.display()
        )
    })?;
    let config = |alpn: &[&[u8]]| -> Result<TlsAcceptor> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_no_client_auth()
            .with_single_cert(certs.clone(), key.clone_key())
            .with_context(|| {
                format!(
                    "the TLS key in {} does not fit the certificate in {}",
                    key_file.display(),
                    cert_file.display()
                )
            })?;
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(TlsAcceptor::from(Arc::new(config)))
    };
    Ok(Acceptors {
        // The API speaks HTTP/1.1 only (WebSockets upgrade from it).
        http: config(&[b"http/1.1"])?,
        kafka: config(&[])?,
    })
}
