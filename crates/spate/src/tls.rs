//! TLS for the listeners: a certificate chain and its private key, read from PEM files at start
//! and again on SIGHUP (see [`Certificate::reload`]), so that a renewed certificate is served
//! without a restart.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use anyhow::{Context, Result};
use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;

/// The TLS sides of the two listeners (they differ only in the protocols they name in ALPN), and
/// the certificate they share.
pub struct Acceptors {
    pub http: TlsAcceptor,
    pub kafka: TlsAcceptor,
    pub certificate: Arc<Certificate>,
}

/// The certificate and key the listeners present: the files' contents as last read.
#[derive(Debug)]
pub struct Certificate {
    cert_file: PathBuf,
    key_file: PathBuf,
    provider: Arc<CryptoProvider>,
    current: RwLock<Arc<CertifiedKey>>,
}

impl Certificate {
    fn read(cert_file: &Path, key_file: &Path, provider: &CryptoProvider) -> Result<CertifiedKey> {
        let certs = certificates(cert_file, "TLS certificate")?;
        let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| {
            anyhow::anyhow!(
                "cannot read a private key from the TLS key file {}: {e}",
                key_file.display()
            )
        })?;
        CertifiedKey::from_der(certs, key, provider).map_err(|e| {
            anyhow::anyhow!(
                "the TLS key in {} does not fit the certificate in {}: {e}",
                key_file.display(),
                cert_file.display()
            )
        })
    }

    /// Reads the files again; new handshakes get what they hold from then on. A file that cannot
    /// be read, or a key that does not fit, leaves the current certificate in place.
    pub fn reload(&self) -> Result<()> {
        let fresh = Certificate::read(&self.cert_file, &self.key_file, &self.provider)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(fresh);
        Ok(())
    }
}

impl ResolvesServerCert for Certificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

/// The PEM certificates of a file, at least one. `what` names the file in errors, which never
/// quote its contents.
pub(crate) fn certificates(file: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(file)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| anyhow::anyhow!("cannot read the {what} file {}: {e}", file.display()))?;
    anyhow::ensure!(
        !certs.is_empty(),
        "the {what} file {} holds no PEM certificate",
        file.display()
    );
    Ok(certs)
}

/// Reads the certificate chain (leaf first) and the key (PKCS#8, PKCS#1 or SEC1), and checks that
/// they belong together; with `client_ca_file`, clients must present a certificate issued by one
/// of the certificates in it. Errors name the file, never its contents.
pub fn load(cert_file: &Path, key_file: &Path, client_ca_file: Option<&Path>) -> Result<Acceptors> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certificate = Arc::new(Certificate {
        current: RwLock::new(Arc::new(Certificate::read(cert_file, key_file, &provider)?)),
        cert_file: cert_file.to_path_buf(),
        key_file: key_file.to_path_buf(),
        provider: provider.clone(),
    });
    let clients = match client_ca_file {
        None => None,
        Some(file) => {
            let mut roots = rustls::RootCertStore::empty();
            for ca in certificates(file, "TLS client CA")? {
                roots.add(ca).map_err(|e| {
                    anyhow::anyhow!(
                        "a certificate in the TLS client CA file {} cannot be a trust anchor: {e}",
                        file.display()
                    )
                })?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider.clone(),
            )
            .build()
            .with_context(|| format!("the TLS client CA file {}", file.display()))?;
            Some(verifier)
        }
    };
    let config = |alpn: &[&[u8]]| -> Result<TlsAcceptor> {
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?;
        let builder = match &clients {
            Some(verifier) => builder.with_client_cert_verifier(verifier.clone()),
            None => builder.with_no_client_auth(),
        };
        let mut config = builder.with_cert_resolver(certificate.clone());
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(TlsAcceptor::from(Arc::new(config)))
    };
    Ok(Acceptors {
        // The API speaks HTTP/1.1 only (WebSockets upgrade from it).
        http: config(&[b"http/1.1"])?,
        kafka: config(&[])?,
        certificate,
    })
}
