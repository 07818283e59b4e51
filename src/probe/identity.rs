//! Whom the probe reached: the NLA facts and server identity read from an NTLM CHALLENGE, and
//! the pure checks on them (expected name, clock skew, certificate names). No I/O here.

use serde::{Deserialize, Serialize};

use super::{
    cert::{CertificateFacts, rfc3339},
    ntlm::{self, Challenge},
};

/// Whether the server offers and enforces CredSSP (Network Level Authentication).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Credssp {
    /// Selected for SSL|HYBRID, and an SSL-only offer is refused (HYBRID_REQUIRED_BY_SERVER).
    Required,
    /// Selected for SSL|HYBRID, but an SSL-only offer is accepted: NLA can be bypassed.
    NotRequired,
    /// Selected for SSL|HYBRID; whether it is enforced could not be told.
    Offered,
    /// The server selected TLS or Standard RDP Security although CredSSP was offered.
    NotOffered,
}

impl Credssp {
    /// The stable snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Required => "required",
            Self::NotRequired => "not_required",
            Self::Offered => "offered",
            Self::NotOffered => "not_offered",
        }
    }

    /// Whether a client can connect without Network Level Authentication.
    pub fn nla_disabled(self) -> bool {
        matches!(self, Self::NotRequired | Self::NotOffered)
    }
}

/// What the server's NTLM CHALLENGE says about it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServerIdentity {
    /// NetBIOS computer name (MsvAvNbComputerName).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub computer_name: Option<String>,
    /// DNS computer name (MsvAvDnsComputerName).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_computer_name: Option<String>,
    /// NetBIOS domain name (MsvAvNbDomainName); the computer name on a workgroup server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// DNS domain name (MsvAvDnsDomainName).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_domain_name: Option<String>,
    /// DNS forest name (MsvAvDnsTreeName).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_tree_name: Option<String>,
    /// OS version from the NTLM Version field, `major.minor.build`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os_version: Option<String>,
    /// The server's clock (MsvAvTimestamp), RFC 3339 UTC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_time: Option<String>,
    /// Server clock minus the prober's clock when the CHALLENGE arrived, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock_skew_seconds: Option<i64>,
}

impl ServerIdentity {
    /// Reads the identity out of a CHALLENGE received at `now_unix_ms`.
    pub fn from_challenge(challenge: &Challenge, now_unix_ms: i64) -> Self {
        let server_ms = challenge.timestamp.map(ntlm::filetime_to_unix_ms);
        Self {
            computer_name: challenge.nb_computer_name.clone(),
            dns_computer_name: challenge.dns_computer_name.clone(),
            domain: challenge.nb_domain_name.clone(),
            dns_domain_name: challenge.dns_domain_name.clone(),
            dns_tree_name: challenge.dns_tree_name.clone(),
            os_version: challenge.version.map(|v| v.to_string()),
            server_time: server_ms.map(|ms| rfc3339(ms.div_euclid(1000))),
            clock_skew_seconds: server_ms.map(|ms| (ms - now_unix_ms) / 1000),
        }
    }

    /// The best single name for the machine: NetBIOS name, else the DNS name's host label.
    pub fn name(&self) -> Option<&str> {
        self.computer_name
            .as_deref()
            .or_else(|| self.dns_computer_name.as_deref().map(host_label))
    }

    /// Whether the server answered as `expected` (a computer name or FQDN), ignoring case.
    /// `None` when the CHALLENGE named no computer, so nothing can be told.
    pub fn answers_as(&self, expected: &str) -> Option<bool> {
        let names = self.candidate_names();
        if names.is_empty() {
            return None;
        }
        let expected = expected.trim().trim_end_matches('.');
        let label = host_label(expected);
        Some(
            names
                .iter()
                .any(|n| n.eq_ignore_ascii_case(expected) || n.eq_ignore_ascii_case(label)),
        )
    }

    /// Whether the certificate names this computer (subject CN or a DNS SAN whose host label
    /// or full name matches). `None` without a certificate name or a computer name.
    pub fn certificate_names_it(&self, cert: &CertificateFacts) -> Option<bool> {
        if cert.names.is_empty() || self.candidate_names().is_empty() {
            return None;
        }
        Some(cert.names.iter().any(|n| self.answers_as(n) == Some(true)))
    }

    fn candidate_names(&self) -> Vec<&str> {
        let mut names = Vec::new();
        names.extend(self.computer_name.as_deref());
        if let Some(dns) = self.dns_computer_name.as_deref() {
            names.push(dns.trim_end_matches('.'));
            names.push(host_label(dns));
        }
        names.retain(|n| !n.is_empty());
        names
    }
}

/// The first label of a DNS name (`vm1.contoso.com` → `vm1`).
fn host_label(name: &str) -> &str {
    name.split('.').next().unwrap_or(name)
}

/// What the NLA step of a probe found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NlaFacts {
    /// Whether CredSSP is offered and enforced.
    pub credssp: Credssp,
    /// The CredSSP version the server announced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credssp_version: Option<u32>,
    /// Whom the server said it is, when the CHALLENGE was read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<ServerIdentity>,
    /// Why the identity could not be read (the endpoint is still reachable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::ntlm::NtlmVersion;

    fn identity(nb: Option<&str>, dns: Option<&str>) -> ServerIdentity {
        ServerIdentity {
            computer_name: nb.map(str::to_owned),
            dns_computer_name: dns.map(str::to_owned),
            ..ServerIdentity::default()
        }
    }

    #[test]
    fn names_match_ignoring_case_and_domain() {
        let id = identity(Some("VM-WEB-01"), Some("vm-web-01.contoso.com"));
        assert_eq!(id.answers_as("vm-web-01"), Some(true));
        assert_eq!(id.answers_as("VM-WEB-01.contoso.com."), Some(true));
        assert_eq!(id.answers_as("vm-web-02"), Some(false));
        assert_eq!(id.answers_as("vm-web"), Some(false));
        assert_eq!(identity(None, None).answers_as("x"), None);
        assert_eq!(
            identity(None, Some("db1.corp")).answers_as("DB1"),
            Some(true)
        );
        assert_eq!(identity(None, Some("db1.corp")).name(), Some("db1"));
    }

    #[test]
    fn identity_and_skew_come_from_the_challenge() {
        let now_ms = 1_796_000_000_000;
        let challenge = Challenge {
            nb_computer_name: Some("VM1".into()),
            nb_domain_name: Some("WORKGROUP".into()),
            timestamp: Some(ntlm::unix_ms_to_filetime(now_ms + 400_500)),
            version: Some(NtlmVersion {
                major: 10,
                minor: 0,
                build: 17763,
                ntlm_revision: 15,
            }),
            ..Challenge::default()
        };
        let id = ServerIdentity::from_challenge(&challenge, now_ms);
        assert_eq!(id.name(), Some("VM1"));
        assert_eq!(id.domain.as_deref(), Some("WORKGROUP"));
        assert_eq!(id.os_version.as_deref(), Some("10.0.17763"));
        assert_eq!(id.clock_skew_seconds, Some(400));
        assert_eq!(id.server_time.as_deref(), Some("2026-11-30T01:00:00Z"));
        let behind = Challenge {
            timestamp: Some(ntlm::unix_ms_to_filetime(now_ms - 90_000)),
            ..Challenge::default()
        };
        assert_eq!(
            ServerIdentity::from_challenge(&behind, now_ms).clock_skew_seconds,
            Some(-90)
        );
    }

    #[test]
    fn credssp_states_that_disable_nla() {
        assert!(!Credssp::Required.nla_disabled());
        assert!(!Credssp::Offered.nla_disabled());
        assert!(Credssp::NotRequired.nla_disabled());
        assert!(Credssp::NotOffered.nla_disabled());
    }
}
