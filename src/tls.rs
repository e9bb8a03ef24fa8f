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

/// The operating system's trust roots, read once per process:
/// `SSL_CERT_FILE` / `SSL_CERT_DIR` when set, else the platform's store.
/// Unreadable entries are skipped (and logged once).
fn os_roots() -> &'static [CertificateDer<'static>] {
    static ROOTS: std::sync::OnceLock<Vec<CertificateDer<'static>>> = std::sync::OnceLock::new();
    ROOTS.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        for e in found.errors.iter().take(3) {
            tracing::warn!(error = %e, "cannot read some of the operating system's trust roots");
        }
        tracing::info!(
            roots = found.certs.len(),
            ssl_cert_file = std::env::var_os("SSL_CERT_FILE").is_some(),
            "upstream TLS trusts the bundled roots, the operating system's and extra_ca"
        );
        found.certs
    })
}

/// Reads a PEM certificate chain and key and builds the listener's config,
/// with the leaf certificate's expiry (Unix seconds) when it can be read.
pub fn server_config_from_files(
    cert: &Path,
    key: &Path,
) -> Result<(Arc<rustls::ServerConfig>, Option<i64>), TlsError> {
    let chain = read_certs(cert).map_err(TlsError::Cert)?;
    let not_after = chain.first().and_then(|c| not_after(c));
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        TlsError::Key(format!(
            "{}: no usable private key (PKCS#8, PKCS#1 or SEC1 PEM): {}",
            key.display(),
            pem_error(&e)
        ))
    })?;
    Ok((server_config(chain, key)?, not_after))
}

/// The `notAfter` of a DER certificate, in seconds since the Unix epoch:
/// `Certificate → tbsCertificate → [version], serialNumber, signature,
/// issuer, validity → notAfter` (RFC 5280 4.1). `None` for anything that
/// does not parse; rustls has accepted the certificate already, so this
/// only reads it for the expiry metric.
pub fn not_after(der: &[u8]) -> Option<i64> {
    let (tag, cert, _) = der_item(der)?;
    if tag != 0x30 {
        return None;
    }
    let (tag, tbs, _) = der_item(cert)?;
    if tag != 0x30 {
        return None;
    }
    let mut rest = tbs;
    // Optional [0] version, then serial, signature algorithm, issuer.
    let (tag, _, after) = der_item(rest)?;
    if tag == 0xa0 {
        rest = after;
    }
    for _ in 0..3 {
        rest = der_item(rest)?.2;
    }
    let (tag, validity, _) = der_item(rest)?;
    if tag != 0x30 {
        return None;
    }
    let (_, _, after_not_before) = der_item(validity)?;
    let (tag, time, _) = der_item(after_not_before)?;
    der_time(tag, time)
}

/// One DER item: (tag, contents, what follows). Short and long definite
/// lengths only, bounded by the input.
fn der_item(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

/// UTCTime (`YYMMDDHHMMSSZ`, tag 0x17) or GeneralizedTime
/// (`YYYYMMDDHHMMSSZ`, tag 0x18) as Unix seconds.
fn der_time(tag: u8, t: &[u8]) -> Option<i64> {
    let digits = |s: &[u8]| -> Option<i64> {
        if s.is_empty() || !s.iter().all(u8::is_ascii_digit) {
            return None;
        }
        Some(s.iter().fold(0i64, |a, d| a * 10 + i64::from(d - b'0')))
    };
    let (year, rest) = match (tag, t.len()) {
        (0x17, 13) => {
            let yy = digits(&t[..2])?;
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &t[2..])
        }
        (0x18, 15) => (digits(&t[..4])?, &t[4..]),
        _ => return None,
    };
    if rest[10] != b'Z' {
        return None;
    }
    let (month, day) = (digits(&rest[0..2])?, digits(&rest[2..4])?);
    let (h, m, sec) = (
        digits(&rest[4..6])?,
        digits(&rest[6..8])?,
        digits(&rest[8..10])?,
    );
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || h > 23 || m > 59 || sec > 60 {
        return None;
    }
    // Days from the civil date (H. Hinnant), then seconds.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + m * 60 + sec)
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
    // The operating system's store too (or `SSL_CERT_FILE`/`SSL_CERT_DIR`),
    // so an internal CA installed there is trusted without `extra_ca`.
    let (added, _ignored) = roots.add_parsable_certificates(os_roots().iter().cloned());
    tracing::debug!(
        os_roots = added,
        extra_ca = extra.len(),
        "upstream trust roots"
    );
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

#[cfg(test)]
mod not_after_tests {
    use super::*;

    #[test]
    fn reads_the_expiry_of_a_certificate() {
        let mut params = rcgen::CertificateParams::new(vec!["proxy.example".into()]).unwrap();
        params.not_after = rcgen::date_time_ymd(2031, 7, 14);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        // 2031-07-14T00:00:00Z
        assert_eq!(not_after(cert.der()), Some(1_941_753_600));
        // Beyond 2049 the certificate switches to GeneralizedTime.
        params.not_after = rcgen::date_time_ymd(2100, 1, 1);
        let cert = params.self_signed(&key).unwrap();
        assert_eq!(not_after(cert.der()), Some(4_102_444_800));
    }

    #[test]
    fn hostile_bytes_are_refused_without_a_panic() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["x".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let der = cert.der().to_vec();
        // Every truncation, and every single-byte corruption of the head.
        for n in 0..der.len() {
            let _ = not_after(&der[..n]);
        }
        for i in 0..der.len().min(200) {
            let mut bad = der.clone();
            bad[i] ^= 0xff;
            let _ = not_after(&bad);
        }
        for garbage in [
            &b""[..],
            b"\x30",
            b"\x30\x84\xff\xff\xff\xff",
            b"\x30\x80\x00\x00",
        ] {
            assert_eq!(not_after(garbage), None);
        }
        assert_eq!(der_time(0x17, b"991301000000Z"), None, "month 13");
        assert_eq!(der_time(0x17, b"2501010000000"), None, "no Z");
        assert_eq!(der_time(0x17, b"500101000000Z"), Some(-631_152_000), "1950");
    }
}
