//! The simulator's fault model.

use serde::{Deserialize, Serialize};

/// A fault a simulated VM can have. Each is observable through ARM evidence and cleared by
/// the rung Azure's guide would use:
///
/// | fault | the RDP responder | ARM evidence | fixed by |
/// |---|---|---|---|
/// | `rdp_disabled` | connection refused (listener closed) | NSG allows, Resource Health `Available`, agent Ready; Run Command reading `RDP-Tcp` shows `fDenyTSConnections : 1` | rung 1, VMAccess reset of the RDP configuration (or a Run Command setting `fDenyTSConnections` to 0) |
/// | `nsg_blocking` | accepts, never answers (X.224 timeout) | a `Deny` rule `sim-deny-rdp` (priority 200) on TCP 3389 in the NIC's NSG; IP flow verify says `Deny` | no VM rung: reported; with `nsgRepair` an allow rule for the allowed prefixes at priority 199 fixes it; cleared when the fault (rule) is removed |
/// | `tls_disabled` | negotiates TLS, then a fatal `protocol_version` alert | Run Command event-log query shows Schannel 36871 | rung 2, Run Command enabling `SCHANNEL\Protocols\TLS 1.2\Server` `Enabled`=1 |
/// | `certificate_expired` | reachable, the certificate is expired | Run Command event-log query shows TerminalServices-RemoteConnectionManager 1058 and Schannel 36870 | rung 2, Run Command renewing the certificate (remove `Cert:\LocalMachine\Remote Desktop\…`, restart `SessionEnv`) |
/// | `flapping` | every other connection closes before the Connection Confirm | Run Command reading `RDP-Tcp` shows `KeepAliveTimeout : 0` | rung 2, Run Command setting `KeepAliveTimeout`=1 (keep-alive fixes) |
/// | `guest_hung` | accepts, never answers | agent Ready, Resource Health `Available`; serial log: `The TermService service hung on starting.` | rung 4/7, any reboot: NIC reset, restart, redeploy (or Run Command `Restart-Service TermService`) |
/// | `nic_broken` | accepts, never answers | agent Not Ready; serial log: `netvsc: the network adapter failed to initialize` | rung 4, NIC reset (a redeploy also clears it) |
/// | `host_failure` | accepts, never answers | agent Not Ready; Resource Health `Degraded` (`Unplanned`, host hardware) | rung 8, redeploy only (restart keeps the host) |
/// | `platform_outage` | accepts, never answers | Resource Health `Unavailable`, context `Platform Initiated`, category `Unplanned` | nothing: wait; cleared at run time through the admin API |
/// | `vm_stopped` | connection refused | instance view `PowerState/deallocated`; Resource Health `Unavailable` (context `Customer Initiated`, reason `User Initiated`) | not a ladder rung: starting the VM (`POST …/start`) clears it |
/// | `health_unknown` | as its other faults make it | Resource Health `Unknown` (no signal) | a modifier: it never clears by itself; the ladder acts on the other evidence |
/// | `legacy_rdp_security` | answers an SSL/CredSSP offer with `SSL_NOT_ALLOWED_BY_SERVER`, accepts standard RDP security | Run Command reading `RDP-Tcp` shows `SecurityLayer : 0` | not an outage: the probe reports it reachable with the `legacy_rdp_security` finding; the keep-alive repair's opt-in insecure listener settings produce it |
/// | `snapshot_fails` | as its other faults make it | a snapshot of its OS disk ends `Failed` (`InternalDiskManagementError`) | a modifier: the rungs that need a snapshot first do not start |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    /// The RDP listener is disabled (`fDenyTSConnections`=1).
    RdpDisabled,
    /// A deny rule in the NIC's NSG drops RDP.
    NsgBlocking,
    /// TLS server protocols are disabled in SCHANNEL.
    TlsDisabled,
    /// The RDP certificate has expired and cannot be renewed (MachineKeys).
    CertificateExpired,
    /// The listener drops connections (keep-alive/reconnect settings).
    Flapping,
    /// TermService hangs; a reboot clears it.
    GuestHung,
    /// The NIC failed to initialise; a NIC reset clears it.
    NicBroken,
    /// The host is failing; only a redeploy clears it.
    HostFailure,
    /// An Azure platform outage; nothing on our side clears it.
    PlatformOutage,
    /// The VM is deallocated.
    VmStopped,
    /// Resource Health has no signal from the VM (`Unknown`).
    HealthUnknown,
    /// Snapshots of the VM's OS disk fail (the operation ends `Failed`).
    SnapshotFails,
    /// The listener allows standard RDP security only (`SecurityLayer`=0).
    LegacyRdpSecurity,
}

impl Fault {
    /// Every fault, in a stable order.
    pub const ALL: [Fault; 13] = [
        Self::RdpDisabled,
        Self::NsgBlocking,
        Self::TlsDisabled,
        Self::CertificateExpired,
        Self::Flapping,
        Self::GuestHung,
        Self::NicBroken,
        Self::HostFailure,
        Self::PlatformOutage,
        Self::VmStopped,
        Self::HealthUnknown,
        Self::SnapshotFails,
        Self::LegacyRdpSecurity,
    ];

    /// The snake_case name used in scenarios and the admin API.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RdpDisabled => "rdp_disabled",
            Self::NsgBlocking => "nsg_blocking",
            Self::TlsDisabled => "tls_disabled",
            Self::CertificateExpired => "certificate_expired",
            Self::Flapping => "flapping",
            Self::GuestHung => "guest_hung",
            Self::NicBroken => "nic_broken",
            Self::HostFailure => "host_failure",
            Self::PlatformOutage => "platform_outage",
            Self::VmStopped => "vm_stopped",
            Self::HealthUnknown => "health_unknown",
            Self::SnapshotFails => "snapshot_fails",
            Self::LegacyRdpSecurity => "legacy_rdp_security",
        }
    }

    /// Parses a name.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|f| f.as_str() == name)
    }
}

/// How a responder treats a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Behaviour {
    /// Nothing listens: connections are refused.
    Refuse,
    /// Accept, read, never answer.
    Silent,
    /// Negotiate TLS, then send a fatal alert.
    TlsAlert,
    /// Every other connection is closed before any reply.
    Flapping,
    /// A working RDP endpoint that allows standard RDP security only: an offer of TLS or
    /// CredSSP is refused with `SSL_NOT_ALLOWED_BY_SERVER`.
    LegacyRdpOnly,
    /// A working RDP endpoint (optionally with an expired certificate).
    Healthy {
        /// The certificate served is expired.
        expired_certificate: bool,
    },
}
