//! TLS with rustls: listener (server) configs, backend (client) configs, and PEM loading.
//!
//! Only TLS 1.2 and 1.3 are offered (rustls implements nothing older), with the `ring` provider.
//! Listeners advertise ALPN `h2` and `http/1.1`; with `client_ca` they require a client
//! certificate signed by it (mTLS). Certificates are read when a config is loaded, so a reload,
//! including one triggered by a change to the certificate files, gives new connections the new
//! certificate while open connections keep theirs. Backends reached over `https://` are verified
//! against the system's roots or a configured CA file, with SNI set to the backend's host name.

use std::path::Path;
use std::sync::Arc;

use rustls::client::ClientConfig;
use rustls::server::{ServerConfig, WebPkiClientVerifier};
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// Reads every certificate of a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read certificates from {}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("bad certificate PEM in {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("no certificate found in {}", path.display()));
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| format!("cannot read a private key from {}: {e}", path.display()))
}

fn roots_from(path: &Path) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots
            .add(cert)
            .map_err(|e| format!("unusable CA certificate in {}: {e}", path.display()))?;
    }
    Ok(roots)
}

/// A listener's TLS config from PEM files.
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<ServerConfig>, String> {
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| format!("TLS setup failed: {e}"))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots_from(ca)?), provider())
                    .build()
                    .map_err(|e| format!("client_ca {}: {e}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(load_certs(cert)?, load_key(key)?)
        .map_err(|e| {
            format!(
                "certificate {} and key {} do not make a usable pair: {e}",
                cert.display(),
                key.display()
            )
        })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The TLS config for `https://` backends: roots from `ca`, or the system's.
pub fn client_config(ca: Option<&Path>) -> Result<Arc<ClientConfig>, String> {
    client_config_with(ca, None)
}

/// [`client_config`], presenting the certificate and key of `identity` when the server asks for
/// one (mutual TLS).
pub fn client_config_with(
    ca: Option<&Path>,
    identity: Option<(&Path, &Path)>,
) -> Result<Arc<ClientConfig>, String> {
    let roots = match ca {
        Some(path) => roots_from(path)?,
        None => {
            let found = rustls_native_certs::load_native_certs();
            let mut roots = RootCertStore::empty();
            roots.add_parsable_certificates(found.certs);
            roots
        }
    };
    let config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| format!("TLS setup failed: {e}"))?
        .with_root_certificates(roots);
    let mut config = match identity {
        None => config.with_no_client_auth(),
        Some((cert, key)) => config
            .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
            .map_err(|e| {
                format!(
                    "client certificate {} and key {} do not make a usable pair: {e}",
                    cert.display(),
                    key.display()
                )
            })?,
    };
    // Backends are spoken to in HTTP/1.1.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
