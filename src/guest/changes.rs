//! In-guest repairs as data: each repair is a list of typed changes, rendered into the one
//! reviewed applier script (`guest-scripts/apply-changes.ps1`). The values are exactly those
//! of Microsoft's RDP troubleshooting guides.

use std::fmt;

use crate::ladder::GuestRepair;

/// The reviewed applier script, shipped in the repository.
pub const APPLIER: &str = include_str!("../../guest-scripts/apply-changes.ps1");

/// The marker line of the applier.
pub const APPLIER_MARKER: &str = "# rdphealth-script: apply-changes v2";

/// The applier's placeholder line, replaced by the repair's plan.
const PLAN_LINE: &str = "$Plan = @{ Repair = 'none'; Restart = 'none'; Changes = @() }";

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

/// A PowerShell single-quoted string literal.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// The plan as the PowerShell `$Plan = @{ … }` statement the applier reads.
pub fn render_plan(plan: &Plan) -> String {
    let mut out = format!(
        "$Plan = @{{ Repair = {}; Restart = {}; Changes = @(\n",
        quote(&plan.repair),
        quote(plan.restart.as_str())
    );
    for c in &plan.changes {
        let fields = match c {
            Change::Set { key, name, value } => {
                let v = match value {
                    RegValue::Dword(d) => d.to_string(),
                    RegValue::String(_) | RegValue::Binary(_) => quote(&value.to_string()),
                };
                format!(
                    "Key = {}; Name = {}; Type = {}; Value = {v}",
                    quote(key),
                    quote(name),
                    quote(value.kind())
                )
            }
            Change::Remove { key, name } => format!("Key = {}; Name = {}", quote(key), quote(name)),
            Change::RestartService { service } => format!("Service = {}", quote(service)),
            Change::ResetAcl { path, grants } => {
                format!("Path = {}; Grants = {}", quote(path), quote(grants))
            }
            Change::RemoveRdpCertificate { store, key } => {
                format!("Store = {}; Key = {}", quote(store), quote(key))
            }
            Change::RemoveStaleCertificateBinding { key } => format!("Key = {}", quote(key)),
            Change::FirewallRulePort { rule, port } => {
                format!("Rule = {}; Port = {port}", quote(rule))
            }
        };
        out.push_str(&format!("    @{{ Op = {}; {fields} }}\n", quote(c.op())));
    }
    out.push_str(") }");
    out
}

/// The script Run Command receives for `repair`: the applier with the plan filled in.
pub fn script(repair: GuestRepair, options: &Options) -> Vec<String> {
    script_for(&plan(repair, options))
}

/// The applier with `plan` filled in.
pub fn script_for(plan: &Plan) -> Vec<String> {
    let rendered = render_plan(plan);
    let mut out = Vec::new();
    for line in APPLIER.lines() {
        if line == PLAN_LINE {
            out.extend(rendered.lines().map(str::to_owned));
        } else {
            out.push(line.to_owned());
        }
    }
    out
}

/// Reads the plan back from an applier script (what the simulated guest executes); `None`
/// when `script` is not the applier or its plan does not parse.
pub fn parse_script(script: &[String]) -> Option<Plan> {
    if script.first().map(|l| l.trim()) != Some(APPLIER_MARKER) {
        return None;
    }
    let start = script.iter().position(|l| l.starts_with("$Plan = @{"))?;
    let head = fields(
        script[start]
            .strip_prefix("$Plan = @{")?
            .trim_end()
            .strip_suffix("Changes = @(")?
            .trim_end()
            .strip_suffix(';')?,
    )?;
    let text = |f: &[(String, Field)], k: &str| {
        f.iter().find_map(|(name, v)| match v {
            Field::Text(s) if name.eq_ignore_ascii_case(k) => Some(s.clone()),
            _ => None,
        })
    };
    let restart = match text(&head, "Restart")?.as_str() {
        "required" => Restart::Required,
        "none" => Restart::None,
        _ => return None,
    };
    let mut changes = Vec::new();
    for line in &script[start + 1..] {
        let line = line.trim();
        if line == ") }" {
            return Some(Plan {
                repair: text(&head, "Repair")?,
                restart,
                changes,
            });
        }
        let f = fields(line.strip_prefix("@{")?.strip_suffix('}')?)?;
        let t = |k: &str| text(&f, k);
        let change = match t("Op")?.as_str() {
            "set" => {
                let value = match (t("Type")?.as_str(), f.iter().find(|(k, _)| k == "Value")?) {
                    ("DWord", (_, Field::Number(n))) => RegValue::Dword(u32::try_from(*n).ok()?),
                    ("String", (_, Field::Text(s))) => RegValue::String(s.clone()),
                    ("Binary", (_, Field::Text(s))) => RegValue::Binary(hex(s)?),
                    _ => return None,
                };
                Change::Set {
                    key: t("Key")?,
                    name: t("Name")?,
                    value,
                }
            }
            "remove" => Change::Remove {
                key: t("Key")?,
                name: t("Name")?,
            },
            "restart" => Change::RestartService {
                service: t("Service")?,
            },
            "acl" => Change::ResetAcl {
                path: t("Path")?,
                grants: t("Grants")?,
            },
            "removecert" => Change::RemoveRdpCertificate {
                store: t("Store")?,
                key: t("Key")?,
            },
            "unbindcert" => Change::RemoveStaleCertificateBinding { key: t("Key")? },
            "firewallport" => Change::FirewallRulePort {
                rule: t("Rule")?,
                port: match f.iter().find(|(k, _)| k == "Port")? {
                    (_, Field::Number(n)) => u16::try_from(*n).ok()?,
                    _ => return None,
                },
            },
            _ => return None,
        };
        changes.push(change);
    }
    None
}

/// Upper- or lower-case hex digits as bytes.
fn hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.is_ascii() {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Field {
    Text(String),
    Number(u64),
}

/// Parses `A = 'x'; B = 2` (PowerShell hashtable entries, single-quoted strings).
fn fields(s: &str) -> Option<Vec<(String, Field)>> {
    let mut out = Vec::new();
    let mut rest = s.trim();
    while !rest.is_empty() {
        let (name, after) = rest.split_once('=')?;
        let after = after.trim_start();
        let (value, next) = if let Some(q) = after.strip_prefix('\'') {
            let mut v = String::new();
            let mut chars = q.char_indices().peekable();
            let mut end = None;
            while let Some((i, ch)) = chars.next() {
                if ch == '\'' {
                    if chars.peek().map(|(_, c)| *c) == Some('\'') {
                        chars.next();
                        v.push('\'');
                    } else {
                        end = Some(i + 1);
                        break;
                    }
                } else {
                    v.push(ch);
                }
            }
            (Field::Text(v), &q[end?..])
        } else {
            let cut = after.find(';').unwrap_or(after.len());
            (
                Field::Number(after[..cut].trim().parse().ok()?),
                &after[cut..],
            )
        };
        out.push((name.trim().to_owned(), value));
        let next = next.trim_start();
        rest = match next.strip_prefix(';') {
            Some(n) => n.trim_start(),
            None if next.is_empty() => "",
            None => return None,
        };
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn consent(insecure_listener: bool) -> Options {
        Options {
            insecure_listener,
            ..Options::SAFE
        }
    }

    const REPAIRS: [GuestRepair; 5] = [
        GuestRepair::EnableTls12,
        GuestRepair::RenewRdpCertificate,
        GuestRepair::ListenerKeepAlive,
        GuestRepair::RemoveStaleCertificateBinding,
        GuestRepair::RestoreRdpPort,
    ];

    #[test]
    fn the_applier_has_exactly_one_plan_line() {
        assert_eq!(APPLIER.lines().filter(|l| *l == PLAN_LINE).count(), 1);
        assert!(APPLIER.starts_with(APPLIER_MARKER));
    }

    #[test]
    fn every_plan_round_trips_through_the_script() {
        for repair in REPAIRS {
            for c in [false, true] {
                let plan = plan(repair, &consent(c));
                let script = script_for(&plan);
                assert_eq!(parse_script(&script).as_ref(), Some(&plan), "{repair}");
                assert!(!script.iter().any(|l| l == PLAN_LINE));
            }
        }
    }

    #[test]
    fn quotes_survive_rendering() {
        let plan = Plan {
            repair: "it's".into(),
            restart: Restart::None,
            changes: vec![Change::Set {
                key: r"HKLM:\SOFTWARE\O'Brien; x = 1".into(),
                name: "a'b".into(),
                value: RegValue::String("say 'hi'; bye".into()),
            }],
        };
        assert_eq!(parse_script(&script_for(&plan)), Some(plan));
    }

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
        let consented = plan(GuestRepair::ListenerKeepAlive, &consent(true));
        assert_eq!(dword(&consented, RDP_TCP, "SecurityLayer"), Some(0));
        assert_eq!(dword(&consented, RDP_TCP, "MinEncryptionLevel"), Some(1));
        let tls = plan(GuestRepair::EnableTls12, &consent(true));
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

    #[test]
    fn binary_values_round_trip_as_hex() {
        let plan = Plan {
            repair: "x".into(),
            restart: Restart::None,
            changes: vec![Change::Set {
                key: RDP_TCP.into(),
                name: "SSLCertificateSHA1Hash".into(),
                value: RegValue::Binary(vec![0x5e, 0x00, 0xff]),
            }],
        };
        assert!(
            script_for(&plan)
                .iter()
                .any(|l| l.contains("Value = '5E00FF'"))
        );
        assert_eq!(parse_script(&script_for(&plan)), Some(plan));
        assert_eq!(hex("5e0"), None);
        assert_eq!(hex("zz"), None);
    }

    #[test]
    fn other_scripts_are_not_plans() {
        assert_eq!(parse_script(&["Get-Service".to_owned()]), None);
        let mut broken = script(GuestRepair::EnableTls12, &Options::SAFE);
        let i = broken
            .iter()
            .position(|l| l.contains("Op = 'set'"))
            .unwrap();
        broken[i] = "    @{ Op = 'set'; Key = 'x'; Name = 'y'; Type = 'DWord'; Value = -1 }".into();
        assert_eq!(parse_script(&broken), None);
    }
}
