//! Certificate facts from the server's leaf certificate (DER), evaluated after the handshake.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

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
        Ok(ParsedCertificate::from_der(der)?.facts_at(now))
    }

    /// Whether the certificate expires within `warning` (and has not yet expired).
    pub fn expires_within(&self, warning: Duration, now: SystemTime) -> bool {
        let left = self.not_after_unix - unix_seconds(now);
        !self.expired && left < i64::try_from(warning.as_secs()).unwrap_or(i64::MAX)
    }
}

/// What a certificate says independently of the time it is looked at: parsed once per
/// distinct certificate, then judged at the time of each probe.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ParsedCertificate {
    subject: String,
    issuer: String,
    not_before: String,
    not_after: String,
    not_before_unix: i64,
    not_after_unix: i64,
    self_signed: bool,
    sha1_thumbprint: String,
    names: Vec<String>,
}

impl ParsedCertificate {
    fn from_der(der: &[u8]) -> Result<Self, CertificateError> {
        let (_, cert) =
            X509Certificate::from_der(der).map_err(|e| CertificateError(e.to_string()))?;
        let validity = cert.validity();
        let not_before = validity.not_before.timestamp();
        let not_after = validity.not_after.timestamp();
        let self_signed = cert.subject() == cert.issuer() && cert.verify_signature(None).is_ok();
        Ok(Self {
            subject: cert.subject().to_string(),
            issuer: cert.issuer().to_string(),
            not_before: rfc3339(not_before),
            not_after: rfc3339(not_after),
            not_before_unix: not_before,
            not_after_unix: not_after,
            self_signed,
            sha1_thumbprint: upper_hex(&sha1::Sha1::digest(der)),
            names: names(&cert),
        })
    }

    fn facts_at(&self, now: SystemTime) -> CertificateFacts {
        let now = unix_seconds(now);
        CertificateFacts {
            subject: self.subject.clone(),
            issuer: self.issuer.clone(),
            not_before: self.not_before.clone(),
            not_after: self.not_after.clone(),
            self_signed: self.self_signed,
            expired: now > self.not_after_unix,
            not_yet_valid: now < self.not_before_unix,
            days_left: (self.not_after_unix - now).div_euclid(86_400),
            sha1_thumbprint: self.sha1_thumbprint.clone(),
            names: self.names.clone(),
            not_after_unix: self.not_after_unix,
        }
    }
}

/// Parsed certificates by the SHA-256 of their DER bytes, so a certificate seen again is not
/// parsed and its self-signature not verified again; any change of the bytes is a new key and
/// is parsed afresh. Time-dependent facts (expired, days left) are computed on every lookup.
///
/// Bounded: two generations of at most `capacity` entries each; when the current one is full
/// it becomes the previous one and the older entries are dropped. An entry found in the
/// previous generation moves to the current one, so certificates still being probed stay.
#[derive(Debug)]
pub struct CertificateCache {
    capacity: usize,
    generations: Mutex<Generations>,
    parses: AtomicU64,
}

#[derive(Debug, Default)]
struct Generations {
    current: HashMap<[u8; 32], Arc<ParsedCertificate>>,
    previous: HashMap<[u8; 32], Arc<ParsedCertificate>>,
}

impl Generations {
    /// The entry for `key`; one found in the previous generation moves to the current one.
    fn get(&mut self, capacity: usize, key: &[u8; 32]) -> Option<Arc<ParsedCertificate>> {
        if let Some(hit) = self.current.get(key) {
            return Some(hit.clone());
        }
        let hit = self.previous.remove(key)?;
        self.insert(capacity, *key, hit.clone());
        Some(hit)
    }

    fn insert(&mut self, capacity: usize, key: [u8; 32], parsed: Arc<ParsedCertificate>) {
        if self.current.len() >= capacity {
            self.previous = std::mem::take(&mut self.current);
        }
        self.current.insert(key, parsed);
    }
}

impl CertificateCache {
    /// Enough for one replica's fleet (one certificate per VM) at the scale target.
    pub const DEFAULT_CAPACITY: usize = 131_072;

    /// A cache keeping up to `capacity` recent certificates (at most twice that in all).
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            generations: Mutex::new(Generations::default()),
            parses: AtomicU64::new(0),
        }
    }

    /// The facts of the certificate `der` at `now`, parsing it only when these exact bytes
    /// have not been seen recently.
    pub fn facts(&self, der: &[u8], now: SystemTime) -> Result<CertificateFacts, CertificateError> {
        let key: [u8; 32] = sha2::Sha256::digest(der).into();
        let cached = self.lock().get(self.capacity, &key);
        if let Some(parsed) = cached {
            return Ok(parsed.facts_at(now));
        }
        self.parses.fetch_add(1, Ordering::Relaxed);
        let parsed = Arc::new(ParsedCertificate::from_der(der)?);
        let facts = parsed.facts_at(now);
        self.lock().insert(self.capacity, key, parsed);
        Ok(facts)
    }

    /// How many times a certificate was parsed (cache misses).
    pub fn parses(&self) -> u64 {
        self.parses.load(Ordering::Relaxed)
    }

    /// Certificates held.
    pub fn len(&self) -> usize {
        let g = self.lock();
        g.current.len() + g.previous.len()
    }

    /// Whether no certificate is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Generations> {
        // The map holds no invariant a panicking holder could break half-way.
        self.generations
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Default for CertificateCache {
    fn default() -> Self {
        Self::new(Self::DEFAULT_CAPACITY)
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

    fn valid_cert() -> Vec<u8> {
        let now = OffsetDateTime::now_utc();
        cert_der(
            now - time::Duration::days(1),
            now + time::Duration::days(30),
        )
    }

    #[test]
    fn cached_facts_equal_fresh_ones_and_the_same_bytes_are_parsed_once() {
        let cache = CertificateCache::new(16);
        let der = valid_cert();
        let now = SystemTime::now();
        let first = cache.facts(&der, now).unwrap();
        let second = cache.facts(&der, now).unwrap();
        assert_eq!(first, CertificateFacts::from_der(&der, now).unwrap());
        assert_eq!(second, first);
        assert_eq!(cache.parses(), 1);
        assert_eq!(cache.len(), 1);
    }

    #[test]
    fn a_different_certificate_is_parsed_not_served_from_the_cache() {
        let cache = CertificateCache::new(16);
        let now = SystemTime::now();
        let (a, b) = (valid_cert(), valid_cert());
        assert_ne!(a, b, "two fresh keys give two certificates");
        let fa = cache.facts(&a, now).unwrap();
        let fb = cache.facts(&b, now).unwrap();
        assert_eq!(cache.parses(), 2);
        assert_ne!(fa.sha1_thumbprint, fb.sha1_thumbprint);
        assert_eq!(fb, CertificateFacts::from_der(&b, now).unwrap());
    }

    #[test]
    fn changed_bytes_are_reparsed_so_a_broken_self_signature_is_seen() {
        let cache = CertificateCache::new(16);
        let now = SystemTime::now();
        let good = valid_cert();
        assert!(cache.facts(&good, now).unwrap().self_signed);
        // Same subject, issuer and validity; one bit of the signature (the last bytes) differs.
        let mut forged = good.clone();
        let last = forged.len() - 1;
        forged[last] ^= 0x01;
        let facts = cache.facts(&forged, now).unwrap();
        assert_eq!(cache.parses(), 2);
        assert!(!facts.self_signed, "the forged signature must not verify");
        assert_ne!(
            facts.sha1_thumbprint,
            cache.facts(&good, now).unwrap().sha1_thumbprint
        );
    }

    #[test]
    fn cached_certificate_is_judged_at_the_time_of_each_lookup() {
        let cache = CertificateCache::new(16);
        let now = SystemTime::now();
        let nb = OffsetDateTime::from(now) - time::Duration::days(1);
        let na = OffsetDateTime::from(now) + time::Duration::days(2);
        let der = cert_der(nb, na);
        let today = cache.facts(&der, now).unwrap();
        assert!(!today.expired);
        assert_eq!(today.days_left, 2);
        let later = cache
            .facts(&der, now + Duration::from_secs(3 * 86_400))
            .unwrap();
        assert!(later.expired, "expiry is judged now, not when first parsed");
        assert!(later.days_left < 0);
        let earlier = cache
            .facts(&der, now - Duration::from_secs(2 * 86_400))
            .unwrap();
        assert!(earlier.not_yet_valid);
        assert_eq!(cache.parses(), 1);
    }

    #[test]
    fn garbage_is_an_error_through_the_cache_too() {
        let cache = CertificateCache::new(16);
        assert!(
            cache
                .facts(b"not a certificate", SystemTime::now())
                .is_err()
        );
        assert!(cache.is_empty());
    }

    #[test]
    fn the_cache_is_bounded_and_keeps_what_is_still_used() {
        let cache = CertificateCache::new(2);
        let now = SystemTime::now();
        let certs: Vec<_> = (0..5).map(|_| valid_cert()).collect();
        let kept = &certs[0];
        for der in &certs[1..] {
            cache.facts(kept, now).unwrap();
            cache.facts(der, now).unwrap();
            assert!(cache.len() <= 4, "two generations of two");
        }
        let parses = cache.parses();
        cache.facts(kept, now).unwrap();
        assert_eq!(cache.parses(), parses, "a certificate used all along stays");
        cache.facts(&certs[1], now).unwrap();
        assert_eq!(cache.parses(), parses + 1, "an old one was dropped");
    }

    #[test]
    fn rfc3339_formats_utc() {
        assert_eq!(rfc3339(2_094_654_448), "2036-05-17T16:27:28Z");
    }
}
