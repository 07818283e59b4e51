//! Certificate facts from the server's leaf certificate (DER), evaluated after the handshake.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha1::Digest as _;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// What the prober reports about the RDP certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CertificateFacts {
    /// Subject distinguished name, e.g. `CN=localhost`.
    pub subject: String,
    /// Issuer distinguished name.
    pub issuer: String,
    /// Start of validity (RFC 3339, UTC).
    pub not_before: String,
    /// End of validity (RFC 3339, UTC).
    pub not_after: String,
    /// Issuer equals subject and the signature verifies with the certificate's own key.
    pub self_signed: bool,
    /// `notAfter` is in the past.
    pub expired: bool,
    /// `notBefore` is in the future.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub not_yet_valid: bool,
    /// Whole days until `notAfter` (negative once expired).
    pub days_left: i64,
    /// SHA-1 thumbprint, upper-case hex: how Windows names the RDP certificate
    /// (`SSLCertificateSHA1Hash`).
    pub sha1_thumbprint: String,
    /// The names the certificate is issued to: subject common names, then DNS SANs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<String>,
    /// `notAfter` as Unix seconds (for the expiry metric).
    #[serde(skip)]
    pub not_after_unix: i64,
}

/// Why certificate bytes could not be read.
#[derive(Debug, thiserror::Error)]
#[error("failed to parse the server certificate: {0}")]
pub struct CertificateError(String);

impl CertificateFacts {
    /// Reads the facts from a DER certificate, judging validity at `now`.
    pub fn from_der(der: &[u8], now: SystemTime) -> Result<Self, CertificateError> {
        let (_, cert) =
            X509Certificate::from_der(der).map_err(|e| CertificateError(e.to_string()))?;
        let validity = cert.validity();
        let not_before = validity.not_before.timestamp();
        let not_after = validity.not_after.timestamp();
        let now = unix_seconds(now);
        let self_signed = cert.subject() == cert.issuer() && cert.verify_signature(None).is_ok();
        Ok(Self {
            subject: cert.subject().to_string(),
            issuer: cert.issuer().to_string(),
            not_before: rfc3339(not_before),
            not_after: rfc3339(not_after),
            self_signed,
            expired: now > not_after,
            not_yet_valid: now < not_before,
            days_left: (not_after - now).div_euclid(86_400),
            sha1_thumbprint: upper_hex(&sha1::Sha1::digest(der)),
            names: names(&cert),
            not_after_unix: not_after,
        })
    }

    /// Whether the certificate expires within `warning` (and has not yet expired).
    pub fn expires_within(&self, warning: Duration, now: SystemTime) -> bool {
        let left = self.not_after_unix - unix_seconds(now);
        !self.expired && left < i64::try_from(warning.as_secs()).unwrap_or(i64::MAX)
    }
}

/// Subject common names and DNS subject alternative names, in that order, without repeats.
fn names(cert: &X509Certificate<'_>) -> Vec<String> {
    let mut names: Vec<String> = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok().map(str::to_owned))
        .collect();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::DNSName(dns) = name
                && !names.iter().any(|n| n == dns)
            {
                names.push((*dns).to_owned());
            }
        }
    }
    names
}

fn unix_seconds(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

/// Formats Unix seconds as RFC 3339 UTC with a `Z` suffix (e.g. `2036-05-17T16:27:28Z`).
pub fn rfc3339(unix: i64) -> String {
    OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| unix.to_string())
}

fn upper_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02X}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DnType, KeyPair};

    fn cert_der(not_before: OffsetDateTime, not_after: OffsetDateTime) -> Vec<u8> {
        let mut params = CertificateParams::new(vec!["localhost".into()]).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        params.not_before = not_before;
        params.not_after = not_after;
        let key = KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn reads_validity_and_self_signature() {
        let now = SystemTime::now();
        let nb = OffsetDateTime::from(now) - time::Duration::days(1);
        let na = OffsetDateTime::from(now) + time::Duration::days(10) + time::Duration::hours(1);
        let facts = CertificateFacts::from_der(&cert_der(nb, na), now).unwrap();
        assert_eq!(facts.subject, "CN=localhost");
        assert_eq!(facts.issuer, "CN=localhost");
        assert_eq!(facts.names, ["localhost"]);
        assert!(facts.self_signed);
        assert!(!facts.expired);
        assert_eq!(facts.days_left, 10);
        assert!(facts.not_after.ends_with('Z'));
        assert_eq!(facts.sha1_thumbprint.len(), 40);
        assert!(facts.expires_within(Duration::from_secs(14 * 86_400), now));
        assert!(!facts.expires_within(Duration::from_secs(3 * 86_400), now));
    }

    #[test]
    fn expired_certificate_has_negative_days() {
        let now = SystemTime::now();
        let nb = OffsetDateTime::from(now) - time::Duration::days(400);
        let na = OffsetDateTime::from(now) - time::Duration::days(35);
        let facts = CertificateFacts::from_der(&cert_der(nb, na), now).unwrap();
        assert!(facts.expired);
        assert!(facts.days_left <= -35);
        assert!(!facts.expires_within(Duration::from_secs(14 * 86_400), now));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(CertificateFacts::from_der(b"not a certificate", SystemTime::now()).is_err());
    }

    #[test]
    fn rfc3339_formats_utc() {
        assert_eq!(rfc3339(2_094_654_448), "2036-05-17T16:27:28Z");
    }
}
