//! rustls settings for both sides: the listener's server config (PEM chain and
//! key of any common kind, TLS 1.2 + 1.3, ALPN h2 + http/1.1, stateless
//! session tickets) and the upstream client config (webpki roots plus
//! `[upstream] extra_ca`, always verified).
//!
//! The ring provider is named explicitly everywhere so nothing depends on a
//! process-wide default.

use std::path::Path;
use std::sync::Arc;

use rustls::crypto::ring;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Why the listener's certificate or key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The certificate file is unreadable or holds no certificate.
    #[error("{0}")]
    Cert(String),
    /// The key file is unreadable or holds no usable key.
    #[error("{0}")]
    Key(String),
    /// Certificate and key do not form a usable pair.
    #[error("{0}")]
    Pair(String),
    /// No randomness for session ticket keys.
    #[error("{0}")]
    Tickets(String),
}

impl TlsError {
    /// The config key the problem belongs to.
    pub fn key(&self) -> &'static str {
        match self {
            TlsError::Cert(_) | TlsError::Pair(_) => "server.tls_cert",
            TlsError::Key(_) => "server.tls_key",
            TlsError::Tickets(_) => "server.listen",
        }
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(ring::default_provider())
}

/// Reads a PEM certificate chain and key and builds the listener's config.
pub fn server_config_from_files(
    cert: &Path,
    key: &Path,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let chain = read_certs(cert).map_err(TlsError::Cert)?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        TlsError::Key(format!(
            "{}: no usable private key (PKCS#8, PKCS#1 or SEC1 PEM): {}",
            key.display(),
            pem_error(&e)
        ))
    })?;
    server_config(chain, key)
}

/// Builds the listener's config from an in-memory chain and key.
pub fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Pair(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| {
            TlsError::Pair(format!(
                "certificate and key do not match or are unsupported: {e}"
            ))
        })?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // Stateless session tickets instead of rustls' default 256-entry session
    // cache, which a TLS 1.3 handshake fills two entries at a time: past
    // about 128 recent visitors a returning browser would pay a full
    // handshake again. Tickets need no memory per client; keys are random per
    // built config (so per process and per reload, like nginx's default) and
    // rotate every 6 hours.
    cfg.ticketer = ring::Ticketer::new()
        .map_err(|e| TlsError::Tickets(format!("cannot create session ticket keys: {e}")))?;
    Ok(Arc::new(cfg))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let iter = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {}", path.display(), pem_error(&e)))?;
    let certs = iter
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {}", path.display(), pem_error(&e)))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate found", path.display()));
    }
    Ok(certs)
}

fn pem_error(e: &rustls_pki_types::pem::Error) -> String {
    match e {
        // Key files are secret: describe the failure without quoting content.
        rustls_pki_types::pem::Error::Io(io) => io.kind().to_string(),
        rustls_pki_types::pem::Error::NoItemsFound => "no matching PEM section".into(),
        _ => "malformed PEM".into(),
    }
}

/// Reads extra trust roots for upstream TLS.
pub fn load_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = read_certs(path)?;
    let mut roots = rustls::RootCertStore::empty();
    for c in &certs {
        roots
            .add(c.clone())
            .map_err(|e| format!("{}: not a usable CA certificate: {e}", path.display()))?;
    }
    Ok(certs)
}

/// The upstream client's TLS config: public roots plus `extra`, verified.
pub fn client_config(extra: &[CertificateDer<'static>]) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for c in extra {
        // Validated at config load; a failure here cannot happen.
        let _ = roots.add(c.clone());
    }
    rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth()
}
