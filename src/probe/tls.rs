//! The TLS layer: a rustls client that completes the handshake with any certificate so the
//! certificate can be inspected afterwards. Trust is judged separately, never during the
//! handshake, or expired and self-signed certificates could not be examined.

use std::{io, sync::Arc};

use rustls::{
    AlertDescription, ClientConfig, DigitallySignedStruct, SignatureScheme, SupportedCipherSuite,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, hash::HashAlgorithm},
    pki_types::{CertificateDer, ServerName, UnixTime},
};

/// Accepts every server certificate; the handshake signature is still checked with the
/// provider's algorithms so the connection is a real TLS session.
#[derive(Debug)]
struct InspectOnly(Arc<CryptoProvider>);

impl ServerCertVerifier for InspectOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Builds the prober's TLS client configuration: TLS 1.2 and 1.3, no SNI (RDP servers are
/// usually addressed by IP), no session resumption, any certificate accepted for inspection.
/// The cipher suites are ring's defaults, SHA-256 suites offered before SHA-384 ones.
pub fn inspect_only_client_config() -> Result<Arc<ClientConfig>, rustls::Error> {
    let provider = Arc::new(provider());
    let mut config = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(InspectOnly(provider)))
        .with_no_client_auth();
    config.enable_sni = false;
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// ring's default provider (its cipher suites and key exchange groups, X25519 first), with
/// the suites reordered: TLS 1.3 before TLS 1.2 as before, and within each version the
/// SHA-256 suites (AES-128-GCM, ChaCha20-Poly1305) before the SHA-384 ones. The set is
/// unchanged; a server that prefers its own order still gets its choice.
fn provider() -> CryptoProvider {
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites.sort_by_key(|suite| {
        let hash = match suite {
            SupportedCipherSuite::Tls13(s) => s.common.hash_provider.algorithm(),
            SupportedCipherSuite::Tls12(s) => s.common.hash_provider.algorithm(),
        };
        (
            suite.version() != &rustls::version::TLS13,
            hash != HashAlgorithm::SHA256,
        )
    });
    provider
}

/// Describes a failed handshake in words an operator understands.
pub fn describe_handshake_error(err: &io::Error) -> String {
    if let Some(tls) = err
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    {
        return match tls {
            rustls::Error::AlertReceived(AlertDescription::ProtocolVersion) => {
                "alert received: protocol_version (no common TLS version: the server allows only versions the prober does not speak, e.g. TLS 1.0/1.1)".to_string()
            }
            rustls::Error::AlertReceived(alert) => {
                format!("alert received: {}", alert_name(*alert))
            }
            rustls::Error::PeerIncompatible(why) => {
                format!("no common TLS parameters: {why:?}")
            }
            rustls::Error::InvalidMessage(why) => {
                format!("peer sent an invalid TLS message: {why:?}")
            }
            other => format!("handshake error: {other}"),
        };
    }
    match err.kind() {
        io::ErrorKind::UnexpectedEof => "connection closed during the handshake".to_string(),
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => {
            "connection reset during the handshake".to_string()
        }
        _ => format!("handshake I/O error: {err}"),
    }
}

fn alert_name(alert: AlertDescription) -> String {
    // AlertDescription's Debug is CamelCase; print the RFC's snake_case name.
    let camel = format!("{alert:?}");
    let mut out = String::with_capacity(camel.len() + 4);
    for (i, ch) in camel.chars().enumerate() {
        if ch.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(ch.to_ascii_lowercase());
        } else {
            out.push(ch);
        }
    }
    out
}

/// The TLS version as operators write it (`TLSv1.3`).
pub fn version_name(version: rustls::ProtocolVersion) -> String {
    match version {
        rustls::ProtocolVersion::TLSv1_3 => "TLSv1.3".to_string(),
        rustls::ProtocolVersion::TLSv1_2 => "TLSv1.2".to_string(),
        rustls::ProtocolVersion::TLSv1_1 => "TLSv1.1".to_string(),
        rustls::ProtocolVersion::TLSv1_0 => "TLSv1".to_string(),
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alerts_are_named_like_the_rfc() {
        assert_eq!(
            alert_name(AlertDescription::ProtocolVersion),
            "protocol_version"
        );
        assert_eq!(
            alert_name(AlertDescription::InternalError),
            "internal_error"
        );
        assert_eq!(
            alert_name(AlertDescription::HandshakeFailure),
            "handshake_failure"
        );
    }

    #[test]
    fn handshake_errors_are_described() {
        let alert = io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::AlertReceived(AlertDescription::ProtocolVersion),
        );
        assert!(describe_handshake_error(&alert).contains("no common TLS version"));
        let eof = io::Error::from(io::ErrorKind::UnexpectedEof);
        assert!(describe_handshake_error(&eof).contains("closed"));
    }

    #[test]
    fn sha256_suites_come_first_and_the_set_is_ring_default() {
        let ours: Vec<_> = provider().cipher_suites.iter().map(|s| s.suite()).collect();
        let mut default: Vec<_> = rustls::crypto::ring::default_provider()
            .cipher_suites
            .iter()
            .map(|s| s.suite())
            .collect();
        assert_eq!(
            ours[0],
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256,
            "{ours:?}"
        );
        let first_tls12 = ours
            .iter()
            .position(|s| !format!("{s:?}").starts_with("TLS13"))
            .unwrap();
        assert!(
            ours[..first_tls12]
                .iter()
                .all(|s| format!("{s:?}").starts_with("TLS13"))
        );
        let mut sorted = ours.clone();
        sorted.sort_by_key(|s| format!("{s:?}"));
        default.sort_by_key(|s| format!("{s:?}"));
        assert_eq!(sorted, default);
    }

    #[test]
    fn config_builds() {
        let config = inspect_only_client_config().unwrap();
        assert!(!config.enable_sni);
    }
}
