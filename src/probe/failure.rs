//! The bounded failure taxonomy. The snake_case names are a contract: metric labels,
//! status fields and alert rules use them.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::codec::NegotiationFailureCode;

/// Why an RDP endpoint could not be reached, by layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureReason {
    /// The host name did not resolve (or resolution timed out).
    DnsFailure,
    /// The TCP connection was refused (RST): nothing listens on the port.
    TcpRefused,
    /// The TCP connection was not answered before the deadline (SYN dropped).
    TcpTimeout,
    /// The network reported the host or network unreachable (ICMP), or another connect error.
    TcpUnreachable,
    /// The connection was reset or closed before a complete reply.
    ConnectionClosed,
    /// Connected, but no X.224 Connection Confirm arrived before the deadline.
    X224Timeout,
    /// Something other than RDP answered on the port.
    NotRdp,
    /// The server refused our offer with RDP_NEG_FAILURE (the code says why).
    NegotiationFailure,
    /// An RDP PDU that is not a usable Connection Confirm (e.g. MCS disconnect).
    UnexpectedPdu,
    /// The TLS handshake failed (no common version, an alert, or the peer closed).
    TlsHandshakeFailed,
    /// The TLS handshake did not finish before the deadline.
    TlsTimeout,
    /// The endpoint answered (NTLM CHALLENGE) as another computer than the one expected.
    WrongHost,
    /// The prober itself could not probe (out of file descriptors, buffers or local
    /// addresses, no route from the prober): says nothing about the VM, so it is never an
    /// incident and never a reason for a rung.
    ProberError,
}

impl FailureReason {
    /// Every reason, in a stable order (metric label pre-registration, docs, tests).
    pub const ALL: [FailureReason; 13] = [
        Self::DnsFailure,
        Self::TcpRefused,
        Self::TcpTimeout,
        Self::TcpUnreachable,
        Self::ConnectionClosed,
        Self::X224Timeout,
        Self::NotRdp,
        Self::NegotiationFailure,
        Self::UnexpectedPdu,
        Self::TlsHandshakeFailed,
        Self::TlsTimeout,
        Self::WrongHost,
        Self::ProberError,
    ];

    /// The stable snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::DnsFailure => "dns_failure",
            Self::TcpRefused => "tcp_refused",
            Self::TcpTimeout => "tcp_timeout",
            Self::TcpUnreachable => "tcp_unreachable",
            Self::ConnectionClosed => "connection_closed",
            Self::X224Timeout => "x224_timeout",
            Self::NotRdp => "not_rdp",
            Self::NegotiationFailure => "negotiation_failure",
            Self::UnexpectedPdu => "unexpected_pdu",
            Self::TlsHandshakeFailed => "tls_handshake_failed",
            Self::TlsTimeout => "tls_timeout",
            Self::WrongHost => "wrong_host",
            Self::ProberError => "prober_error",
        }
    }

    /// Parses a stable name back into a reason.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == name)
    }

    /// The layer at which this reason is observed.
    pub fn layer(self) -> Layer {
        match self {
            Self::DnsFailure => Layer::Dns,
            Self::TcpRefused | Self::TcpTimeout | Self::TcpUnreachable | Self::ProberError => {
                Layer::Tcp
            }
            Self::ConnectionClosed
            | Self::X224Timeout
            | Self::NotRdp
            | Self::NegotiationFailure
            | Self::UnexpectedPdu => Layer::X224,
            Self::TlsHandshakeFailed | Self::TlsTimeout => Layer::Tls,
            Self::WrongHost => Layer::Nla,
        }
    }

    /// What usually causes this failure, from Microsoft's troubleshooting guides.
    pub fn likely_causes(self, code: Option<u32>) -> &'static [&'static str] {
        match self {
            Self::DnsFailure => &[
                "the host name is wrong or its DNS record is missing",
                "the cluster's DNS cannot resolve the name (in-cluster resolver, private DNS zone)",
            ],
            Self::TcpRefused => &[
                "the Remote Desktop service (TermService) is stopped or disabled",
                "RDP is disabled (fDenyTSConnections=1, possibly by Group Policy) or the RDP-Tcp listener is disabled (fEnableWinStation=0)",
                "RDP listens on another port (RDP-Tcp PortNumber changed) or the server is in drain mode",
                "a firewall rejects the port with a TCP reset",
            ],
            Self::TcpTimeout => &[
                "a network security group or firewall drops TCP 3389 (check NSG rules / IP flow verify)",
                "the VM is stopped, deallocated or still booting",
                "wrong IP address or no route to the VM (check the public IP and Next hop)",
                "Windows Firewall blocks the Remote Desktop rule",
                "the prober's own egress is blocked (network policy of the probing pod)",
            ],
            Self::TcpUnreachable => &[
                "no route to the host or network (routing, ARP, VM down on the local segment)",
                "a firewall rejects the connection with an ICMP unreachable",
            ],
            Self::ConnectionClosed => &[
                "the listener accepts and immediately drops connections (TermService hung or restarting)",
                "another program owns the port and closes non-matching clients (e.g. a TLS-only service)",
                "a middlebox resets the connection",
            ],
            Self::X224Timeout => &[
                "the RDP listener or TermService is hung",
                "a middlebox accepts the connection and black-holes it",
                "a non-RDP service on the port is waiting for more input",
            ],
            Self::NotRdp => &[
                "another application owns the port (netstat -anob: not TermService)",
                "a port mapping or load balancer points at the wrong backend",
            ],
            Self::NegotiationFailure => negotiation_failure_causes(code),
            Self::UnexpectedPdu => &[
                "the server rejected the connection request itself (MCS disconnect): unsupported protocol flags or a server policy",
            ],
            Self::TlsHandshakeFailed => &[
                "TLS versions disabled in SCHANNEL (HKLM\\SYSTEM\\CurrentControlSet\\Control\\SecurityProviders\\SCHANNEL\\Protocols\\TLS 1.x\\Server Enabled=0); Schannel event 36871",
                "the server cannot use its certificate's private key: MachineKeys permissions or a corrupt RSA key (Schannel event 36870)",
                "the RDP certificate is corrupt, expired or missing (TerminalServices-RemoteConnectionManager events 1057/1058)",
                "SSLCertificateSHA1Hash points to a certificate that is not installed",
            ],
            Self::TlsTimeout => &[
                "a middlebox interferes with the TLS handshake",
                "the server is stuck creating its TLS credentials",
            ],
            Self::WrongHost => &[
                "the address now belongs to another VM (IP reuse after a deallocation, a redeploy or a NIC change)",
                "a DNS record or load-balancer rule points at the wrong machine",
                "the VM was renamed inside Windows and no longer matches its Azure computer name",
            ],
            Self::ProberError => &[
                "the operator ran out of file descriptors (EMFILE/ENFILE): raise its open-files limit or lower its probe concurrency",
                "the operator's host ran out of socket buffers or local ports (ENOBUFS, EADDRNOTAVAIL)",
                "the operator's pod has no route to the VM's network (ENETUNREACH from its own routing table)",
            ],
        }
    }
}

fn negotiation_failure_causes(code: Option<u32>) -> &'static [&'static str] {
    match code {
        Some(1) => &[
            "the server requires TLS (SecurityLayer=2) and the offer lacked it: a client/prober mismatch",
        ],
        Some(2) => &[
            "the server allows only Standard RDP Security (SecurityLayer=0): no server authentication",
        ],
        Some(3) => &[
            "the server has no usable certificate: self-signed certificate creation failed (events 1057/1058)",
            "MachineKeys permissions prevent access to the certificate's private key",
            "SSLCertificateSHA1Hash points to a certificate that is not installed",
        ],
        Some(4) => &["inconsistent negotiation flags (a prober or server defect)"],
        Some(5) => &[
            "the server requires Network Level Authentication (UserAuthentication=1) and the offer lacked CredSSP",
        ],
        Some(6) => &["the server requires TLS with client-certificate authentication"],
        _ => &["the server refused the negotiation with an unknown failure code"],
    }
}

impl fmt::Display for FailureReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The protocol layers a probe walks through, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Layer {
    /// Host name resolution.
    Dns,
    /// TCP connect.
    Tcp,
    /// X.224 Connection Request / Confirm.
    X224,
    /// TLS handshake.
    Tls,
    /// CredSSP / NTLM identity step after TLS.
    Nla,
}

impl Layer {
    /// Every layer, in the order a probe walks them.
    pub const ALL: [Layer; 5] = [Self::Dns, Self::Tcp, Self::X224, Self::Tls, Self::Nla];

    /// The layer's name as printed.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Dns => "dns",
            Self::Tcp => "tcp",
            Self::X224 => "x224",
            Self::Tls => "tls",
            Self::Nla => "nla",
        }
    }
}

/// A classified probe failure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failure {
    /// The bounded reason.
    pub reason: FailureReason,
    /// Human-readable detail (free text: never a metric label).
    pub detail: String,
    /// The RDP_NEG_FAILURE code, for `negotiation_failure`.
    pub code: Option<u32>,
}

impl Failure {
    /// A failure without a negotiation code.
    pub fn new(reason: FailureReason, detail: impl Into<String>) -> Self {
        Self {
            reason,
            detail: detail.into(),
            code: None,
        }
    }

    /// A negotiation failure carrying the server's code.
    pub fn negotiation(code: NegotiationFailureCode) -> Self {
        Self {
            reason: FailureReason::NegotiationFailure,
            detail: format!(
                "server answered RDP_NEG_FAILURE {} ({})",
                code.0,
                code.name()
            ),
            code: Some(code.0),
        }
    }

    /// Whether the failure is the prober's own, not the VM's.
    pub fn is_prober_error(&self) -> bool {
        self.reason == FailureReason::ProberError
    }

    /// Likely causes of this failure.
    pub fn likely_causes(&self) -> &'static [&'static str] {
        self.reason.likely_causes(self.code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_stable_and_unique() {
        let names: Vec<_> = FailureReason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(
            names,
            [
                "dns_failure",
                "tcp_refused",
                "tcp_timeout",
                "tcp_unreachable",
                "connection_closed",
                "x224_timeout",
                "not_rdp",
                "negotiation_failure",
                "unexpected_pdu",
                "tls_handshake_failed",
                "tls_timeout",
                "wrong_host",
                "prober_error"
            ]
        );
        for r in FailureReason::ALL {
            assert_eq!(serde_json::to_value(r).unwrap(), r.as_str());
            assert_eq!(FailureReason::from_name(r.as_str()), Some(r));
            assert!(!r.likely_causes(None).is_empty());
        }
    }

    #[test]
    fn negotiation_codes_have_specific_causes() {
        for code in 1..=6 {
            let causes = FailureReason::NegotiationFailure.likely_causes(Some(code));
            assert_ne!(
                causes,
                FailureReason::NegotiationFailure.likely_causes(Some(99))
            );
        }
        assert!(
            Failure::negotiation(NegotiationFailureCode(3))
                .detail
                .contains("SSL_CERT_NOT_ON_SERVER")
        );
    }
}
