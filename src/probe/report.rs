//! The probe's result: a JSON contract (field names are read by alerting and tests) and a
//! human rendering.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::{
    cert::CertificateFacts,
    codec::SecurityProtocol,
    failure::{Failure, Layer},
    identity::{NlaFacts, ServerIdentity},
};

/// Timing and outcome of one layer.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LayerResult {
    /// Whether the layer succeeded.
    pub ok: bool,
    /// Time spent in the layer, milliseconds.
    pub ms: f64,
}

/// Per-layer results; layers that were not reached are absent.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Layers {
    /// Name resolution (only when the target is a host name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<LayerResult>,
    /// TCP connect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<LayerResult>,
    /// X.224 request / confirm.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x224: Option<LayerResult>,
    /// TLS handshake.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<LayerResult>,
    /// CredSSP identity step (NTLM NEGOTIATE / CHALLENGE) and the NLA enforcement check.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nla: Option<LayerResult>,
}

impl Layers {
    /// The result of `layer`, if it ran.
    pub fn get(&self, layer: Layer) -> Option<LayerResult> {
        match layer {
            Layer::Dns => self.dns,
            Layer::Tcp => self.tcp,
            Layer::X224 => self.x224,
            Layer::Tls => self.tls,
            Layer::Nla => self.nla,
        }
    }

    /// Records the result of `layer`.
    pub fn set(&mut self, layer: Layer, result: LayerResult) {
        let slot = match layer {
            Layer::Dns => &mut self.dns,
            Layer::Tcp => &mut self.tcp,
            Layer::X224 => &mut self.x224,
            Layer::Tls => &mut self.tls,
            Layer::Nla => &mut self.nla,
        };
        *slot = Some(result);
    }
}

/// What the TLS handshake showed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TlsFacts {
    /// Negotiated version, e.g. `TLSv1.3`.
    pub version: String,
    /// Negotiated cipher suite.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cipher_suite: Option<String>,
    /// The leaf certificate, when one was presented and could be parsed.
    pub certificate: Option<CertificateFacts>,
}

/// Something worth reporting about a reachable endpoint (not a failure).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Finding {
    /// The certificate expires within the warning period.
    CertificateExpiring {
        /// Whole days left.
        #[serde(rename = "daysLeft")]
        days_left: i64,
    },
    /// The certificate has expired.
    CertificateExpired,
    /// The certificate is not valid yet.
    CertificateNotYetValid,
    /// The certificate could not be parsed.
    CertificateUnreadable,
    /// The server selected Standard RDP Security: no TLS, no server authentication.
    NoTls,
    /// The server refused TLS and CredSSP (`SSL_NOT_ALLOWED_BY_SERVER`) and accepted only
    /// standard RDP security: reachable, but without TLS or NLA.
    LegacyRdpSecurity,
    /// Clients can connect without Network Level Authentication.
    NlaDisabled,
    /// The server's clock differs from the prober's by more than the threshold.
    ClockSkew {
        /// Server clock minus prober clock, seconds.
        seconds: i64,
    },
    /// The certificate is not issued to the computer that answered.
    CertificateNameMismatch {
        /// The computer name from the NTLM CHALLENGE.
        #[serde(rename = "computerName")]
        computer_name: String,
    },
}

impl Finding {
    /// The stable snake_case kind (metric label).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::CertificateExpiring { .. } => "certificate_expiring",
            Self::CertificateExpired => "certificate_expired",
            Self::CertificateNotYetValid => "certificate_not_yet_valid",
            Self::CertificateUnreadable => "certificate_unreadable",
            Self::NoTls => "no_tls",
            Self::LegacyRdpSecurity => "legacy_rdp_security",
            Self::NlaDisabled => "nla_disabled",
            Self::ClockSkew { .. } => "clock_skew",
            Self::CertificateNameMismatch { .. } => "certificate_name_mismatch",
        }
    }

    /// What usually causes it.
    pub fn likely_causes(&self) -> &'static [&'static str] {
        match self {
            Self::CertificateExpiring { .. } | Self::CertificateExpired => &[
                "the self-signed RDP certificate was not renewed (event 1058: MachineKeys permissions)",
                "an expired CA-issued certificate is still bound through SSLCertificateSHA1Hash",
            ],
            Self::CertificateNotYetValid => {
                &["the VM's clock is wrong, or a certificate was issued with a future start date"]
            }
            Self::CertificateUnreadable => &["the server presented a malformed certificate"],
            Self::NoTls => &[
                "SecurityLayer=0 (native RDP encryption), possibly a leftover troubleshooting workaround",
                "the server has no usable certificate and fell back to Standard RDP Security",
            ],
            Self::LegacyRdpSecurity => &[
                "SecurityLayer=0 in RDP-Tcp: the server refuses TLS and NLA and speaks only standard RDP security (a troubleshooting workaround, or the listener keep-alive repair's consented setting, left in place)",
                "the server has no usable certificate for TLS",
            ],
            Self::NlaDisabled => &[
                "Network Level Authentication is off (UserAuthentication=0, or SecurityLayer below 2): Microsoft recommends keeping it on",
                "a troubleshooting workaround that disabled NLA was left in place",
            ],
            Self::ClockSkew { .. } => &[
                "the VM's clock drifted (Windows Time service stopped, or no time source): NLA/Kerberos logons fail beyond 5 minutes",
            ],
            Self::CertificateNameMismatch { .. } => &[
                "a certificate issued to another machine is bound to the listener (SSLCertificateSHA1Hash)",
                "the VM was renamed or cloned and kept the old self-signed certificate",
            ],
        }
    }
}

/// The result of one probe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProbeReport {
    /// `host:port` as probed.
    pub target: String,
    /// Whether a Remote Desktop client could get through the layers the prober checks.
    pub reachable: bool,
    /// Why not, when not reachable.
    pub failure: Option<Failure>,
    /// Per-layer results.
    pub layers: Layers,
    /// The protocol the server selected.
    pub selected_protocol: Option<SecurityProtocol>,
    /// TLS facts, when a handshake completed.
    pub tls: Option<TlsFacts>,
    /// The CredSSP step, when the probe ran it: NLA enforcement and the server's identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nla: Option<NlaFacts>,
    /// Findings on a reachable endpoint.
    pub findings: Vec<Finding>,
    /// Likely causes of the failure and of the findings.
    pub likely_causes: Vec<String>,
    /// Total wall time of the probe, milliseconds.
    pub total_ms: f64,
}

impl ProbeReport {
    /// Whether the probe failed on the prober's side (`prober_error`): no verdict on the VM.
    pub fn prober_failed(&self) -> bool {
        self.failure.as_ref().is_some_and(Failure::is_prober_error)
    }

    /// The certificate, if one was read.
    pub fn certificate(&self) -> Option<&CertificateFacts> {
        self.tls.as_ref().and_then(|t| t.certificate.as_ref())
    }

    /// Renders the report for a terminal: one line per layer, then the verdict and causes.
    pub fn render_human(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "probe {}", self.target);
        for layer in Layer::ALL {
            if layer == Layer::Nla {
                self.render_nla(&mut out);
                continue;
            }
            let Some(result) = self.layers.get(layer) else {
                continue;
            };
            let status = if result.ok { "ok" } else { "FAIL" };
            let _ = write!(
                out,
                "  {:<5} {:<5} {:>9.1} ms",
                layer.as_str(),
                status,
                result.ms
            );
            match (&self.failure, layer, result.ok) {
                (Some(f), _, false) => {
                    let _ = write!(out, "  {}: {}", f.reason, f.detail);
                }
                (_, Layer::X224, true) => {
                    let selected = self.selected_protocol.map_or("unknown", |p| p.as_str());
                    let _ = write!(out, "  selected {selected}");
                }
                (_, Layer::Tls, true) => {
                    if let Some(tls) = &self.tls {
                        let _ = write!(out, "  {}", tls.version);
                        if let Some(suite) = &tls.cipher_suite {
                            let _ = write!(out, " {suite}");
                        }
                    }
                }
                _ => {}
            }
            out.push('\n');
        }
        if let Some(cert) = self.certificate() {
            let _ = writeln!(
                out,
                "  cert  subject {}, issuer {}{}",
                cert.subject,
                cert.issuer,
                if cert.self_signed {
                    " (self-signed)"
                } else {
                    ""
                }
            );
            let _ = writeln!(
                out,
                "        valid {} .. {} ({} days left){}",
                cert.not_before,
                cert.not_after,
                cert.days_left,
                if cert.expired { ", EXPIRED" } else { "" }
            );
            let _ = writeln!(out, "        sha1 {}", cert.sha1_thumbprint);
        }
        for finding in &self.findings {
            let _ = match finding {
                Finding::CertificateExpiring { days_left } => {
                    writeln!(
                        out,
                        "  finding: certificate_expiring ({days_left} days left)"
                    )
                }
                Finding::ClockSkew { seconds } => {
                    writeln!(out, "  finding: clock_skew (server {seconds:+} s)")
                }
                Finding::CertificateNameMismatch { computer_name } => writeln!(
                    out,
                    "  finding: certificate_name_mismatch (certificate does not name {computer_name})"
                ),
                other => writeln!(out, "  finding: {}", other.kind()),
            };
        }
        let verdict = match &self.failure {
            None => "reachable".to_string(),
            Some(f) => format!("NOT reachable ({})", f.reason),
        };
        let _ = writeln!(out, "result: {verdict} in {:.1} ms", self.total_ms);
        if !self.likely_causes.is_empty() {
            let _ = writeln!(out, "likely causes:");
            for cause in &self.likely_causes {
                let _ = writeln!(out, "  - {cause}");
            }
        }
        out
    }

    /// The `nla` line and the identity lines under it.
    fn render_nla(&self, out: &mut String) {
        let Some(nla) = &self.nla else {
            return;
        };
        let (status, ms) = match self.layers.nla {
            Some(r) => (
                if r.ok { "ok" } else { "FAIL" },
                format!("{:>9.1} ms", r.ms),
            ),
            None => ("-", format!("{:>12}", "")),
        };
        let _ = write!(
            out,
            "  {:<5} {:<5} {ms}  CredSSP {}",
            "nla",
            status,
            nla.credssp.as_str()
        );
        if nla.credssp == super::identity::Credssp::NotOffered {
            let selected = self.selected_protocol.map_or("unknown", |p| p.as_str());
            let _ = write!(out, " (server selected {selected})");
        }
        match (&self.failure, &nla.error) {
            (Some(f), _) if f.reason.layer() == Layer::Nla => {
                let _ = write!(out, "  {}: {}", f.reason, f.detail);
            }
            (_, Some(e)) => {
                let _ = write!(out, "  identity not read: {e}");
            }
            _ => {}
        }
        out.push('\n');
        if let Some(id) = &nla.identity {
            render_identity(out, id);
        }
    }
}

fn render_identity(out: &mut String, id: &ServerIdentity) {
    let or_dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let _ = writeln!(
        out,
        "  host  {} (dns {}), domain {} (dns {}), os {}",
        or_dash(&id.computer_name),
        or_dash(&id.dns_computer_name),
        or_dash(&id.domain),
        or_dash(&id.dns_domain_name),
        or_dash(&id.os_version),
    );
    if let (Some(time), Some(skew)) = (&id.server_time, id.clock_skew_seconds) {
        let _ = writeln!(out, "        server time {time} (skew {skew:+} s)");
    }
}
