//! The in-guest evidence query (`guest-scripts/query-rdp-evidence.ps1`, run through Run
//! Command when the VM agent is Ready): event-log counts of the RDP-relevant event IDs plus
//! the RDP service, listener, TLS and firewall settings. This module parses its output and
//! maps it to the troubleshooting guide's scenarios.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The read-only query script, shipped in the repository and reviewed like code.
pub const QUERY_SCRIPT: &str = include_str!("../../guest-scripts/query-rdp-evidence.ps1");

/// One event-log count from the last 24 hours.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EventCount {
    /// Event provider (e.g. `Schannel`).
    pub provider: String,
    /// Event ID.
    pub id: u32,
    /// Occurrences.
    pub count: u32,
}

/// The listener's custom certificate binding (`RDP-Tcp` `SSLCertificateSHA1Hash`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CertificateBinding {
    /// The bound thumbprint.
    pub thumbprint: String,
    /// Whether a certificate with that thumbprint is in `LocalMachine\My` or
    /// `LocalMachine\Remote Desktop`; when not, the binding is stale.
    pub in_store: bool,
}

/// A certificate in `LocalMachine\Remote Desktop` (the self-signed one RDP uses when no
/// custom certificate is bound).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RdpCertificate {
    /// Its thumbprint.
    pub thumbprint: String,
    /// Whether Windows has its private key.
    pub private_key: bool,
    /// Whether it has expired.
    pub expired: bool,
}

impl RdpCertificate {
    /// Present but unusable: no private key, or expired.
    pub fn unusable(&self) -> bool {
        !self.private_key || self.expired
    }
}

/// What the query found in the guest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GuestEvidence {
    /// Event counts (only IDs that occurred).
    pub events: Vec<EventCount>,
    /// Service name → status (`Running`, `Stopped`, …).
    pub services: BTreeMap<String, String>,
    /// RDP registry values (`fDenyTSConnections`, `fEnableWinStation`, `PortNumber`, …).
    pub registry: BTreeMap<String, String>,
    /// SCHANNEL server protocol switches: `TLS 1.2` → enabled (`Enabled` not 0 and
    /// `DisabledByDefault` not 1).
    pub tls: BTreeMap<String, bool>,
    /// The process owning the RDP port, if any.
    pub port_owner: Option<String>,
    /// Whether the `RemoteDesktop-UserMode-In-TCP` firewall rule is enabled.
    pub firewall_rule_enabled: Option<bool>,
    /// The firewall rule's local port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub firewall_rule_port: Option<u16>,
    /// The custom certificate `SSLCertificateSHA1Hash` binds the listener to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_binding: Option<CertificateBinding>,
    /// The self-signed RDP certificates (reported only when no custom certificate is bound).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rdp_certificates: Vec<RdpCertificate>,
    /// The script ran to its end (output is cut to its last 4 KiB by Run Command).
    pub complete: bool,
}

/// A scenario from the troubleshooting guide, in the order the ladder should address them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum GuestScenario {
    /// RDP disabled, listener disabled, TermService stopped or the firewall rule off:
    /// reset the RDP configuration.
    ListenerDisabled,
    /// Another program owns the RDP port: report (stopping it is an owner decision).
    PortTakenByOtherProgram,
    /// RDP listens on a port other than the probed one: report.
    PortChanged,
    /// TLS 1.2 disabled for the server (Schannel 36871): re-enable TLS 1.2.
    TlsDisabled,
    /// The RDP certificate or its private key cannot be used (1057, 1058, 36870, 36872):
    /// reset MachineKeys permissions and renew the self-signed certificate.
    CertificateKeyAccess,
    /// RD Connection Broker errors (2056, 1296): report, never automate.
    ConnectionBroker,
    /// The self-signed RDP certificate is present but unusable (no private key, or expired):
    /// renew it, as for [`Self::CertificateKeyAccess`].
    CertificateUnusable,
    /// `SSLCertificateSHA1Hash` names a certificate that is no longer in the store: remove
    /// the binding (RDP falls back to the self-signed certificate).
    StaleCertificateBinding,
}

impl GuestScenario {
    /// The stable camelCase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ListenerDisabled => "listenerDisabled",
            Self::PortTakenByOtherProgram => "portTakenByOtherProgram",
            Self::PortChanged => "portChanged",
            Self::TlsDisabled => "tlsDisabled",
            Self::CertificateKeyAccess => "certificateKeyAccess",
            Self::ConnectionBroker => "connectionBroker",
            Self::CertificateUnusable => "certificateUnusable",
            Self::StaleCertificateBinding => "staleCertificateBinding",
        }
    }
}

const LINE_PREFIX: &str = "RDPHEALTH ";

/// Parses the query's output; unknown or malformed lines are ignored, never fatal.
pub fn parse(output: &str) -> GuestEvidence {
    let mut ev = GuestEvidence::default();
    for line in output.lines() {
        let Some(rest) = line.trim().strip_prefix(LINE_PREFIX) else {
            continue;
        };
        let (kind, fields) = rest.split_once(' ').unwrap_or((rest, ""));
        let fields = parse_fields(fields);
        let get = |k: &str| fields.get(k).cloned();
        match kind {
            "event" => {
                if let (Some(provider), Some(Ok(id)), Some(Ok(count))) = (
                    get("provider"),
                    get("id").map(|v| v.parse()),
                    get("count").map(|v| v.parse::<u32>()),
                ) && count > 0
                {
                    ev.events.push(EventCount {
                        provider,
                        id,
                        count,
                    });
                }
            }
            "service" => {
                if let (Some(name), Some(status)) = (get("name"), get("status")) {
                    ev.services.insert(name, status);
                }
            }
            "registry" => {
                if let (Some(name), Some(value)) = (get("name"), get("value")) {
                    ev.registry.insert(name, value);
                }
            }
            "tls" => {
                // `DisabledByDefault`=1 keeps the protocol off for a server that does not ask
                // for it explicitly, as TermService does not: off as well.
                if let (Some(name), Some(enabled)) = (get("name"), get("enabled")) {
                    let by_default = get("disabledByDefault").is_some_and(|v| v == "1");
                    ev.tls.insert(name, enabled != "0" && !by_default);
                }
            }
            "port" => ev.port_owner = get("owner").filter(|o| !o.is_empty()),
            "firewall" => {
                ev.firewall_rule_enabled = get("enabled").map(|v| v.eq_ignore_ascii_case("true"));
                ev.firewall_rule_port = get("port").and_then(|p| p.parse().ok());
            }
            "certificate" => {
                ev.certificate_binding =
                    get("binding")
                        .filter(|t| !t.is_empty())
                        .map(|thumbprint| CertificateBinding {
                            thumbprint,
                            in_store: get("present").is_none_or(|p| p != "0"),
                        })
            }
            "rdpcert" => {
                if let Some(thumbprint) = get("thumbprint").filter(|t| !t.is_empty()) {
                    ev.rdp_certificates.push(RdpCertificate {
                        thumbprint,
                        private_key: get("privateKey").is_none_or(|v| v != "0"),
                        expired: get("expired").is_some_and(|v| v == "1"),
                    });
                }
            }
            "done" => ev.complete = true,
            _ => {}
        }
    }
    ev
}

/// Splits `a=1 b="two words" c=3` into a map.
pub(crate) fn parse_fields(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = s.trim();
    while let Some((key, after)) = rest.split_once('=') {
        let key = key.trim().to_string();
        let (value, next) = if let Some(quoted) = after.strip_prefix('"') {
            match quoted.split_once('"') {
                Some((v, n)) => (v.to_string(), n),
                None => (quoted.to_string(), ""),
            }
        } else {
            match after.split_once(' ') {
                Some((v, n)) => (v.to_string(), n),
                None => (after.to_string(), ""),
            }
        };
        out.insert(key, value);
        rest = next.trim_start();
    }
    out
}

impl GuestEvidence {
    fn has_event(&self, provider_contains: &str, ids: &[u32]) -> bool {
        self.events
            .iter()
            .any(|e| e.provider.contains(provider_contains) && ids.contains(&e.id))
    }

    fn registry_is(&self, name: &str, value: &str) -> bool {
        self.registry.get(name).is_some_and(|v| v == value)
    }

    /// The scenarios this evidence shows, in ladder order; `rdp_port` is the VM's RDP port
    /// (0 when unknown: `PortChanged` is then not evaluated).
    pub fn scenarios(&self, rdp_port: u16) -> Vec<GuestScenario> {
        let mut out = Vec::new();
        let term_service_down = self
            .services
            .get("TermService")
            .is_some_and(|s| !s.eq_ignore_ascii_case("running"));
        if self.registry_is("fDenyTSConnections", "1")
            || self.registry_is("fEnableWinStation", "0")
            || term_service_down
            || self.firewall_rule_enabled == Some(false)
        {
            out.push(GuestScenario::ListenerDisabled);
        }
        if let Some(owner) = &self.port_owner
            && !owner.eq_ignore_ascii_case("TermService")
        {
            out.push(GuestScenario::PortTakenByOtherProgram);
        }
        if rdp_port != 0
            && let Some(port) = self.registry.get("PortNumber")
            && port.parse::<u16>().is_ok_and(|p| p != rdp_port)
        {
            out.push(GuestScenario::PortChanged);
        }
        if self.has_event("Schannel", &[36871]) || self.tls.get("TLS 1.2") == Some(&false) {
            out.push(GuestScenario::TlsDisabled);
        }
        if self.has_event("RemoteConnectionManager", &[1057, 1058])
            || self.has_event("Schannel", &[36870, 36872])
        {
            out.push(GuestScenario::CertificateKeyAccess);
        }
        if self.has_event("SessionBroker", &[2056, 1296]) {
            out.push(GuestScenario::ConnectionBroker);
        }
        if self.certificate_binding.is_none()
            && self.rdp_certificates.iter().any(RdpCertificate::unusable)
        {
            out.push(GuestScenario::CertificateUnusable);
        }
        if self
            .certificate_binding
            .as_ref()
            .is_some_and(|b| !b.in_store)
        {
            out.push(GuestScenario::StaleCertificateBinding);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEALTHY: &str = "\
RDPHEALTH service name=TermService status=Running
RDPHEALTH service name=SessionEnv status=Running
RDPHEALTH registry name=fDenyTSConnections value=0
RDPHEALTH registry name=fEnableWinStation value=1
RDPHEALTH registry name=PortNumber value=3389
RDPHEALTH registry name=SecurityLayer value=2
RDPHEALTH tls name=\"TLS 1.2\" enabled=1
RDPHEALTH port port=3389 owner=TermService
RDPHEALTH firewall rule=RemoteDesktop-UserMode-In-TCP enabled=True
RDPHEALTH done
";

    #[test]
    fn healthy_guest_has_no_scenario() {
        let ev = parse(HEALTHY);
        assert!(ev.complete);
        assert_eq!(ev.tls.get("TLS 1.2"), Some(&true));
        assert_eq!(ev.port_owner.as_deref(), Some("TermService"));
        assert!(ev.scenarios(3389).is_empty());
        assert!(
            ev.scenarios(0).is_empty(),
            "an unknown port is not a changed one"
        );
    }

    #[test]
    fn event_ids_map_to_scenarios() {
        let out = format!(
            "{HEALTHY}RDPHEALTH event provider=Schannel id=36870 count=4\n\
             RDPHEALTH event provider=Microsoft-Windows-TerminalServices-RemoteConnectionManager id=1058 count=1\n\
             RDPHEALTH event provider=Schannel id=36871 count=2\n\
             RDPHEALTH event provider=Microsoft-Windows-TerminalServices-SessionBroker id=2056 count=1\n\
             RDPHEALTH event provider=Schannel id=36872 count=0\n"
        );
        let ev = parse(&out);
        assert_eq!(ev.events.len(), 4, "zero counts are dropped");
        assert_eq!(
            ev.scenarios(3389),
            vec![
                GuestScenario::TlsDisabled,
                GuestScenario::CertificateKeyAccess,
                GuestScenario::ConnectionBroker
            ]
        );
    }

    #[test]
    fn listener_settings_map_to_listener_disabled() {
        for line in [
            "RDPHEALTH registry name=fDenyTSConnections value=1",
            "RDPHEALTH registry name=fEnableWinStation value=0",
            "RDPHEALTH service name=TermService status=Stopped",
            "RDPHEALTH firewall rule=RemoteDesktop-UserMode-In-TCP enabled=False",
        ] {
            let ev = parse(&format!("{HEALTHY}{line}\n"));
            assert_eq!(
                ev.scenarios(3389),
                vec![GuestScenario::ListenerDisabled],
                "{line}"
            );
        }
    }

    #[test]
    fn port_owner_and_port_number() {
        let ev = parse(&format!(
            "{HEALTHY}RDPHEALTH port port=3389 owner=nginx\nRDPHEALTH registry name=PortNumber value=3390\n"
        ));
        assert_eq!(
            ev.scenarios(3389),
            vec![
                GuestScenario::PortTakenByOtherProgram,
                GuestScenario::PortChanged
            ]
        );
        let ev = parse(&format!(
            "{HEALTHY}RDPHEALTH tls name=\"TLS 1.2\" enabled=0\n"
        ));
        assert_eq!(ev.scenarios(3389), vec![GuestScenario::TlsDisabled]);
        let ev = parse(&format!(
            "{HEALTHY}RDPHEALTH tls name=\"TLS 1.2\" enabled=1 disabledByDefault=1\n"
        ));
        assert_eq!(
            ev.scenarios(3389),
            vec![GuestScenario::TlsDisabled],
            "DisabledByDefault=1 turns TLS 1.2 off for RDP"
        );
        let ev = parse(&format!(
            "{HEALTHY}RDPHEALTH tls name=\"TLS 1.2\" enabled=1 disabledByDefault=0\n"
        ));
        assert!(ev.scenarios(3389).is_empty());
    }

    #[test]
    fn truncated_or_garbage_output_is_tolerated() {
        let ev = parse(
            "ATHEALTH event provider=Sch\nRDPHEALTH event provider=Schannel id=x count=1\nRDPHEALTH\n\u{0}\u{ff}",
        );
        assert!(!ev.complete);
        assert!(ev.events.is_empty());
        assert!(ev.scenarios(3389).is_empty());
    }

    #[test]
    fn recorded_failures_and_truncation_are_incomplete_or_partial() {
        // The script stopped on an unexpected error: facts so far, an error line, no `done`.
        let failed = "RDPHEALTH event provider=Schannel id=36871 count=3\r\n\
RDPHEALTH service name=TermService status=Running\r\n\
RDPHEALTH error detail=\"Access is denied\"\r\n";
        let ev = parse(failed);
        assert!(!ev.complete);
        assert_eq!(ev.events.len(), 1);
        // Run Command kept the last 4 KiB: the head is gone, mid-line; the tail is complete.
        let long = format!(
            "{}{HEALTHY}",
            "RDPHEALTH event provider=Schannel id=36870 count=1\r\n".repeat(100)
        );
        let cut = &long[long.len() - 4096..];
        let ev = parse(cut);
        assert!(ev.complete);
        assert_eq!(ev.port_owner.as_deref(), Some("TermService"));
        assert!(ev.events.iter().all(|e| e.id == 36870));
    }

    #[test]
    fn broker_events_are_read_from_their_operational_logs() {
        let line = |id: u32| {
            QUERY_SCRIPT
                .lines()
                .find(|l| l.contains(&format!("Ids = @({id})")))
                .unwrap_or_default()
        };
        assert!(
            line(2056)
                .contains("Log = 'Microsoft-Windows-TerminalServices-SessionBroker/Operational'")
        );
        assert!(line(1296).contains(
            "Log = 'Microsoft-Windows-TerminalServices-SessionBroker-Client/Operational'"
        ));
        assert!(!line(2056).contains("'System'") && !line(1296).contains("'System'"));
    }

    #[test]
    fn certificate_binding_and_firewall_port() {
        let ev = parse(&format!(
            "{HEALTHY}RDPHEALTH certificate binding=5E1FCE27 present=0\nRDPHEALTH firewall rule=RemoteDesktop-UserMode-In-TCP enabled=True port=3390\n"
        ));
        assert_eq!(ev.firewall_rule_port, Some(3390));
        assert_eq!(
            ev.certificate_binding,
            Some(CertificateBinding {
                thumbprint: "5E1FCE27".into(),
                in_store: false
            })
        );
        assert_eq!(
            ev.scenarios(3389),
            vec![GuestScenario::StaleCertificateBinding]
        );
        let present = parse(&format!(
            "{HEALTHY}RDPHEALTH certificate binding=5E1FCE27 present=1\n"
        ));
        assert!(present.scenarios(3389).is_empty());
    }

    #[test]
    fn query_script_prints_what_the_parser_reads() {
        for kind in [
            "event",
            "service",
            "registry",
            "tls",
            "port",
            "firewall",
            "certificate",
            "done",
        ] {
            assert!(
                QUERY_SCRIPT.contains(&format!("RDPHEALTH {kind}")),
                "the script never prints {kind} lines"
            );
        }
    }
}
