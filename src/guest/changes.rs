//! In-guest repairs as data: each repair is a list of typed changes, rendered into the one
//! reviewed applier script by [`super::script`]. The values are exactly those of Microsoft's
//! RDP troubleshooting guides.

use std::fmt;

use crate::ladder::GuestRepair;

/// `HKLM\…\Terminal Server\WinStations\RDP-Tcp`: the RDP listener.
pub const RDP_TCP: &str =
    r"HKLM:\SYSTEM\CurrentControlSet\Control\Terminal Server\WinStations\RDP-Tcp";
/// `HKLM\…\Terminal Server`: `fDenyTSConnections`.
pub const TERMINAL_SERVER: &str = r"HKLM:\SYSTEM\CurrentControlSet\Control\Terminal Server";
/// The Remote Desktop policy key.
pub const TS_POLICY: &str = r"HKLM:\SOFTWARE\Policies\Microsoft\Windows NT\Terminal Services";
/// The SCHANNEL server switches of TLS 1.2.
pub const TLS12_SERVER: &str =
    r"HKLM:\SYSTEM\CurrentControlSet\Control\SecurityProviders\SCHANNEL\Protocols\TLS 1.2\Server";
/// The SCHANNEL server switches of TLS 1.0 and 1.1 (only with `allowLegacyTls`).
pub const LEGACY_TLS_SERVERS: [&str; 2] = [
    r"HKLM:\SYSTEM\CurrentControlSet\Control\SecurityProviders\SCHANNEL\Protocols\TLS 1.0\Server",
    r"HKLM:\SYSTEM\CurrentControlSet\Control\SecurityProviders\SCHANNEL\Protocols\TLS 1.1\Server",
];
/// The Windows Firewall rule that admits RDP over TCP.
pub const RDP_FIREWALL_RULE: &str = "RemoteDesktop-UserMode-In-TCP";
/// The RSA machine keys folder.
pub const MACHINE_KEYS: &str = r"C:\ProgramData\Microsoft\Crypto\RSA\MachineKeys";
/// The guide's MachineKeys permissions.
pub const MACHINE_KEYS_GRANTS: &str =
    r"NT AUTHORITY\System:(F),NT AUTHORITY\NETWORK SERVICE:(R),BUILTIN\Administrators:(F)";
/// The store of the self-signed RDP certificate.
pub const RDP_CERT_STORE: &str = r"Cert:\LocalMachine\Remote Desktop\";

/// A typed registry value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegValue {
    /// `REG_DWORD`.
    Dword(u32),
    /// `REG_SZ`.
    String(String),
    /// `REG_BINARY` (e.g. `SSLCertificateSHA1Hash`).
    Binary(Vec<u8>),
}

impl RegValue {
    /// The registry type name PowerShell uses (`-Type`).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Dword(_) => "DWord",
            Self::String(_) => "String",
            Self::Binary(_) => "Binary",
        }
    }
}

impl fmt::Display for RegValue {
    /// As the applier reports it: DWORDs unsigned in decimal, strings verbatim, binary values
    /// in upper-case hex (a thumbprint as `certutil` shows it).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Dword(v) => write!(f, "{v}"),
            Self::String(s) => f.write_str(s),
            Self::Binary(b) => b.iter().try_for_each(|x| write!(f, "{x:02X}")),
        }
    }
}

/// One change inside the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Writes a registry value, creating missing keys (never recreating an existing one).
    Set {
        /// The key, as a PowerShell path (`HKLM:\…`).
        key: String,
        /// The value name.
        name: String,
        /// The typed value.
        value: RegValue,
    },
    /// Deletes a registry value (the key stays).
    Remove {
        /// The key.
        key: String,
        /// The value name.
        name: String,
    },
    /// Restarts a service and waits until it runs.
    RestartService {
        /// The service name.
        service: String,
    },
    /// Resets a folder's ACL to the guide's grants, saving the old ACL first.
    ResetAcl {
        /// The folder.
        path: String,
        /// Comma-separated `icacls /grant` entries.
        grants: String,
    },
    /// Removes the self-signed RDP certificate(s) from `store`, unless `key` binds a custom
    /// certificate (`SSLCertificateSHA1Hash`).
    RemoveRdpCertificate {
        /// The certificate store.
        store: String,
        /// The listener key holding `SSLCertificateSHA1Hash`.
        key: String,
    },
    /// Deletes `SSLCertificateSHA1Hash` from `key` only while the thumbprint it names is in
    /// neither `LocalMachine\My` nor `LocalMachine\Remote Desktop` (a stale binding: RDP then
    /// falls back to the self-signed certificate, as the event-ID guide says).
    RemoveStaleCertificateBinding {
        /// The listener key.
        key: String,
    },
    /// Sets the local port of a Windows Firewall rule (`Set-NetFirewallRule -LocalPort`).
    FirewallRulePort {
        /// The rule's name.
        rule: String,
        /// The port.
        port: u16,
    },
}

impl Change {
    fn set(key: &str, name: &str, value: u32) -> Self {
        Self::Set {
            key: key.to_owned(),
            name: name.to_owned(),
            value: RegValue::Dword(value),
        }
    }

    fn restart(service: &str) -> Self {
        Self::RestartService {
            service: service.to_owned(),
        }
    }

    /// The applier's name of the change kind.
    pub fn op(&self) -> &'static str {
        match self {
            Self::Set { .. } => "set",
            Self::Remove { .. } => "remove",
            Self::RestartService { .. } => "restart",
            Self::ResetAcl { .. } => "acl",
            Self::RemoveRdpCertificate { .. } => "removecert",
            Self::RemoveStaleCertificateBinding { .. } => "unbindcert",
            Self::FirewallRulePort { .. } => "firewallport",
        }
    }
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Set { key, name, value } => write!(f, r"set {key}\{name} = {value}"),
            Self::Remove { key, name } => write!(f, r"remove {key}\{name}"),
            Self::RestartService { service } => write!(f, "restart service {service}"),
            Self::ResetAcl { path, .. } => write!(f, "reset the ACL of {path}"),
            Self::RemoveRdpCertificate { store, .. } => {
                write!(f, "remove the self-signed certificate from {store}")
            }
            Self::RemoveStaleCertificateBinding { key } => {
                write!(f, r"remove a stale {key}\SSLCertificateSHA1Hash")
            }
            Self::FirewallRulePort { rule, port } => {
                write!(f, "set the local port of firewall rule {rule} to {port}")
            }
        }
    }
}

/// Whether the VM must restart for a plan to take effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Restart {
    /// The changes take effect at once.
    None,
    /// The changes are read at boot (SCHANNEL, listener settings).
    Required,
}

impl Restart {
    /// As the applier prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Required => "required",
        }
    }
}

/// A repair's declared changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The repair's name.
    pub repair: String,
    /// Whether a restart is needed afterwards.
    pub restart: Restart,
    /// The changes, applied in order.
    pub changes: Vec<Change>,
}

/// What the spec lets a plan include.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// Consent to `SecurityLayer`=0 / `MinEncryptionLevel`=1 (`allowInsecureListenerSettings`).
    pub insecure_listener: bool,
    /// Opt-in to enabling the TLS 1.0 and 1.1 server protocols for legacy clients
    /// (`allowLegacyTls`): a security finding while it is on.
    pub legacy_tls: bool,
    /// The port the listener must use (`RestoreRdpPort`): the one the VM is probed on.
    pub rdp_port: u16,
}

impl Options {
    /// Nothing that weakens security; the default RDP port.
    pub const SAFE: Options = Options {
        insecure_listener: false,
        legacy_tls: false,
        rdp_port: 3389,
    };

    /// [`Options::SAFE`] with or without consent to the weakening listener settings.
    #[cfg(test)]
    pub(crate) fn consent(insecure_listener: bool) -> Self {
        Self {
            insecure_listener,
            ..Self::SAFE
        }
    }
}

/// The changes of `repair`; settings that weaken security only as `options` allow.
pub fn plan(repair: GuestRepair, options: &Options) -> Plan {
    let (restart, changes) = match repair {
        // "An internal error occurred", §5: TLS 1.2 for the server; TLS 1.0/1.1 only on the
        // spec's explicit opt-in for legacy clients.
        GuestRepair::EnableTls12 => {
            let mut changes = vec![
                Change::set(TLS12_SERVER, "Enabled", 1),
                Change::set(TLS12_SERVER, "DisabledByDefault", 0),
            ];
            if options.legacy_tls {
                for key in LEGACY_TLS_SERVERS {
                    changes.push(Change::set(key, "Enabled", 1));
                    changes.push(Change::set(key, "DisabledByDefault", 0));
                }
            }
            (Restart::Required, changes)
        }
        // "By event ID": a `SSLCertificateSHA1Hash` naming a certificate that is no longer in
        // the store; deleting it makes RDP fall back to the self-signed certificate.
        GuestRepair::RemoveStaleCertificateBinding => (
            Restart::None,
            vec![
                Change::RemoveStaleCertificateBinding {
                    key: RDP_TCP.to_owned(),
                },
                Change::restart("TermService"),
            ],
        ),
        // "An internal error occurred", §2: the listener's port back to the one the VM is
        // reached on, with its firewall rule; TermService listens on it after a restart.
        GuestRepair::RestoreRdpPort => (
            Restart::None,
            vec![
                Change::set(RDP_TCP, "PortNumber", u32::from(options.rdp_port)),
                Change::FirewallRulePort {
                    rule: RDP_FIREWALL_RULE.to_owned(),
                    port: options.rdp_port,
                },
                Change::restart("TermService"),
            ],
        ),
        // "An internal error occurred", §3 and §4: MachineKeys permissions, then a new
        // self-signed certificate (SessionEnv creates it), then TermService and the VM.
        GuestRepair::RenewRdpCertificate => (
            Restart::Required,
            vec![
                Change::ResetAcl {
                    path: MACHINE_KEYS.to_owned(),
                    grants: MACHINE_KEYS_GRANTS.to_owned(),
                },
                Change::RemoveRdpCertificate {
                    store: RDP_CERT_STORE.to_owned(),
                    key: RDP_TCP.to_owned(),
                },
                Change::restart("SessionEnv"),
                Change::restart("TermService"),
            ],
        ),
        // "Frequent disconnects": the listener's keep-alive, reconnect and session limits.
        GuestRepair::ListenerKeepAlive => {
            let mut changes = vec![
                Change::set(RDP_TCP, "KeepAliveTimeout", 1),
                Change::set(TS_POLICY, "KeepAliveEnable", 1),
                Change::set(TS_POLICY, "KeepAliveInterval", 1),
                Change::set(TS_POLICY, "fDisableAutoReconnect", 0),
                Change::set(RDP_TCP, "fQueryUserConfigFromLocalMachine", 1),
                Change::set(RDP_TCP, "fInheritReconnectSame", 0),
                Change::set(RDP_TCP, "fReconnectSame", 1),
                Change::set(RDP_TCP, "fInheritMaxSessionTime", 1),
                Change::set(RDP_TCP, "fInheritMaxDisconnectionTime", 1),
                Change::set(RDP_TCP, "MaxDisconnectionTime", 0),
                Change::set(RDP_TCP, "MaxConnectionTime", 0),
                Change::set(RDP_TCP, "fInheritMaxIdleTime", 1),
                Change::set(RDP_TCP, "MaxIdleTime", 0),
                Change::set(RDP_TCP, "MaxInstanceCount", 0xffff_ffff),
            ];
            if options.insecure_listener {
                changes.push(Change::set(RDP_TCP, "SecurityLayer", 0));
                changes.push(Change::set(RDP_TCP, "MinEncryptionLevel", 1));
            }
            (Restart::Required, changes)
        }
    };
    Plan {
        repair: repair.as_str().to_owned(),
        restart,
        changes,
    }
}

/// Whether `repair` restarts TermService, which drops every RDP session: on a VM that is
/// still reachable that is disruptive.
pub fn restarts_term_service(repair: GuestRepair) -> bool {
    plan(repair, &Options::SAFE).changes.iter().any(|c| {
        matches!(c, Change::RestartService { service } if service.eq_ignore_ascii_case("TermService"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::script::{parse_script, script_for};

    #[test]
    fn keepalive_values_are_the_guides() {
        let dword = |plan: &Plan, key: &str, name: &str| {
            plan.changes.iter().find_map(|c| match c {
                Change::Set {
                    key: k,
                    name: n,
                    value: RegValue::Dword(v),
                } if k == key && n == name => Some(*v),
                _ => None,
            })
        };
        let safe = plan(GuestRepair::ListenerKeepAlive, &Options::SAFE);
        for (key, name, value) in [
            (RDP_TCP, "KeepAliveTimeout", 1),
            (TS_POLICY, "KeepAliveEnable", 1),
            (TS_POLICY, "KeepAliveInterval", 1),
            (TS_POLICY, "fDisableAutoReconnect", 0),
            (RDP_TCP, "fQueryUserConfigFromLocalMachine", 1),
            (RDP_TCP, "fInheritReconnectSame", 0),
            (RDP_TCP, "fReconnectSame", 1),
            (RDP_TCP, "fInheritMaxSessionTime", 1),
            (RDP_TCP, "fInheritMaxDisconnectionTime", 1),
            (RDP_TCP, "MaxDisconnectionTime", 0),
            (RDP_TCP, "MaxConnectionTime", 0),
            (RDP_TCP, "fInheritMaxIdleTime", 1),
            (RDP_TCP, "MaxIdleTime", 0),
            (RDP_TCP, "MaxInstanceCount", 4_294_967_295),
        ] {
            assert_eq!(dword(&safe, key, name), Some(value), "{name}");
        }
        assert_eq!(safe.changes.len(), 14);
        assert_eq!(dword(&safe, RDP_TCP, "SecurityLayer"), None);
        let consented = plan(GuestRepair::ListenerKeepAlive, &Options::consent(true));
        assert_eq!(dword(&consented, RDP_TCP, "SecurityLayer"), Some(0));
        assert_eq!(dword(&consented, RDP_TCP, "MinEncryptionLevel"), Some(1));
        let tls = plan(GuestRepair::EnableTls12, &Options::consent(true));
        assert_eq!(dword(&tls, TLS12_SERVER, "Enabled"), Some(1));
        assert_eq!(dword(&tls, TLS12_SERVER, "DisabledByDefault"), Some(0));
        assert!(
            tls.changes
                .iter()
                .all(|c| !c.to_string().contains("TLS 1.0") && !c.to_string().contains("TLS 1.1")),
            "TLS 1.0/1.1 are never enabled by a repair"
        );
    }

    #[test]
    fn legacy_tls_only_on_opt_in_and_the_port_is_the_probed_one() {
        let tls = |legacy_tls| {
            plan(
                GuestRepair::EnableTls12,
                &Options {
                    legacy_tls,
                    ..Options::SAFE
                },
            )
        };
        let enables = |p: &Plan, version: &str| {
            p.changes.iter().any(|c| {
                matches!(c, Change::Set { key, name, value: RegValue::Dword(1) }
                    if key.contains(version) && name == "Enabled")
            })
        };
        for version in [r"TLS 1.0\Server", r"TLS 1.1\Server"] {
            assert!(!enables(&tls(false), version), "{version} without opt-in");
            assert!(enables(&tls(true), version), "{version} with opt-in");
        }
        assert!(enables(&tls(false), r"TLS 1.2\Server"));
        let legacy = tls(true);
        assert_eq!(parse_script(&script_for(&legacy)).as_ref(), Some(&legacy));

        let port = plan(
            GuestRepair::RestoreRdpPort,
            &Options {
                rdp_port: 3391,
                ..Options::SAFE
            },
        );
        assert_eq!(
            port.changes,
            vec![
                Change::set(RDP_TCP, "PortNumber", 3391),
                Change::FirewallRulePort {
                    rule: RDP_FIREWALL_RULE.into(),
                    port: 3391
                },
                Change::restart("TermService"),
            ]
        );
        assert_eq!(parse_script(&script_for(&port)).as_ref(), Some(&port));
        let stale = plan(GuestRepair::RemoveStaleCertificateBinding, &Options::SAFE);
        assert_eq!(
            stale.changes[0],
            Change::RemoveStaleCertificateBinding {
                key: RDP_TCP.into()
            }
        );
        assert!(restarts_term_service(
            GuestRepair::RemoveStaleCertificateBinding
        ));
        assert!(!restarts_term_service(GuestRepair::EnableTls12));
    }
}
