//! The remediation rungs and the targeted in-guest repairs.

use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// One step of Microsoft's RDP remediation ladder.
#[derive(
    JsonSchema, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord,
)]
pub enum Rung {
    /// Reset the RDP configuration with the VMAccess extension (enables RDP, the listener and
    /// the firewall rule). Needs a Ready VM agent. Mild.
    ResetRdpConfig,
    /// A targeted in-guest repair through Run Command, chosen by the failure class (TLS 1.2,
    /// RDP certificate / MachineKeys, listener keep-alive). Needs a Ready VM agent. Mild.
    RepairGuest,
    /// Reset the network interface (two-step private-IP change; the VM restarts). Disruptive.
    ResetNic,
    /// Restart the VM. Disruptive.
    Restart,
    /// Redeploy the VM to another host (temporary disk and dynamic IPs are lost). Disruptive.
    Redeploy,
    /// Reset the local administrator password (VMAccess; the new password goes to a Secret).
    /// Disruptive; only when `passwordReset` is configured.
    ResetPassword,
    /// Start a stopped or deallocated VM; only with `allowStart: true`.
    StartVm,
    /// Add an NSG rule allowing RDP from `nsgRepair.allowedSourcePrefixes` (never `*`).
    RepairNsg,
}

impl Rung {
    /// The default ladder, in the guide's order.
    pub const DEFAULT_LADDER: [Rung; 5] = [
        Self::ResetRdpConfig,
        Self::RepairGuest,
        Self::ResetNic,
        Self::Restart,
        Self::Redeploy,
    ];

    /// Every rung, in a stable order (metric label pre-registration).
    pub const ALL: [Rung; 8] = [
        Self::ResetRdpConfig,
        Self::RepairGuest,
        Self::ResetNic,
        Self::Restart,
        Self::Redeploy,
        Self::ResetPassword,
        Self::StartVm,
        Self::RepairNsg,
    ];

    /// The stable PascalCase name (status, Events, metric label).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ResetRdpConfig => "ResetRdpConfig",
            Self::RepairGuest => "RepairGuest",
            Self::ResetNic => "ResetNic",
            Self::Restart => "Restart",
            Self::Redeploy => "Redeploy",
            Self::ResetPassword => "ResetPassword",
            Self::StartVm => "StartVm",
            Self::RepairNsg => "RepairNsg",
        }
    }

    /// The rung's position in the ladder metric (`rdphealth_ladder_rung`), 0 = none.
    pub fn ordinal(self) -> u8 {
        match self {
            Self::ResetRdpConfig => 1,
            Self::RepairGuest => 2,
            Self::ResetNic => 3,
            Self::Restart => 4,
            Self::Redeploy => 5,
            Self::ResetPassword => 6,
            Self::StartVm => 7,
            Self::RepairNsg => 8,
        }
    }

    /// Disruptive rungs interrupt users or lose data: they need explicit permission
    /// (`allowedDisruptiveActions` or a one-time approval), honour maintenance windows and
    /// the storm breaker, and count against the fleet-wide concurrency cap.
    pub fn is_disruptive(self) -> bool {
        matches!(
            self,
            Self::ResetNic | Self::Restart | Self::Redeploy | Self::ResetPassword
        )
    }

    /// Rungs that run inside the guest through the VM agent (VMAccess, Run Command).
    pub fn needs_agent(self) -> bool {
        matches!(
            self,
            Self::ResetRdpConfig | Self::RepairGuest | Self::ResetPassword
        )
    }

    /// Rungs that restart the guest: its RDP listener is down until Windows has booted again,
    /// so the rung is judged only once the guest is back (see `ladder::settle`). A private-IP
    /// change restarts the VM too. No in-guest repair restarts it today (a repair's
    /// `restart=required` is reported, not acted on).
    pub fn restarts_guest(self) -> bool {
        matches!(
            self,
            Self::ResetNic | Self::Restart | Self::Redeploy | Self::StartVm
        )
    }

    /// Rungs after which the VM's addresses may have changed.
    pub fn may_change_address(self) -> bool {
        matches!(self, Self::ResetNic | Self::Redeploy)
    }
}

impl fmt::Display for Rung {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A targeted in-guest repair (`RepairGuest`): a list of typed changes (`crate::guest::changes`).
#[derive(
    JsonSchema, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord,
)]
pub enum GuestRepair {
    /// Enable TLS 1.2 for the SCHANNEL server (never TLS 1.0/1.1).
    EnableTls12,
    /// Reset MachineKeys permissions and renew the self-signed RDP certificate.
    RenewRdpCertificate,
    /// Listener keep-alive / reconnect settings; the security-weakening settings only with
    /// `allowInsecureListenerSettings`.
    ListenerKeepAlive,
    /// Delete a `SSLCertificateSHA1Hash` that names a certificate no longer in the store.
    RemoveStaleCertificateBinding,
    /// Set the listener's `PortNumber` and its firewall rule back to the probed port; only with
    /// `restoreRdpPort`.
    RestoreRdpPort,
}

impl GuestRepair {
    /// Every repair.
    pub const ALL: [GuestRepair; 5] = [
        Self::EnableTls12,
        Self::RenewRdpCertificate,
        Self::ListenerKeepAlive,
        Self::RemoveStaleCertificateBinding,
        Self::RestoreRdpPort,
    ];

    /// The stable name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::EnableTls12 => "EnableTls12",
            Self::RenewRdpCertificate => "RenewRdpCertificate",
            Self::ListenerKeepAlive => "ListenerKeepAlive",
            Self::RemoveStaleCertificateBinding => "RemoveStaleCertificateBinding",
            Self::RestoreRdpPort => "RestoreRdpPort",
        }
    }
}

impl fmt::Display for GuestRepair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One step the ladder may take: a rung and, for `RepairGuest`, which repair.
#[derive(JsonSchema, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[serde(rename_all = "camelCase")]
pub struct Step {
    /// The rung.
    pub rung: Rung,
    /// The in-guest repair: for `RepairGuest` the repair to run; for `Restart` the repair
    /// whose changes need this restart (`restart=required`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repair: Option<GuestRepair>,
}

impl Step {
    /// A step without an in-guest repair.
    pub fn rung(rung: Rung) -> Self {
        Self { rung, repair: None }
    }

    /// A `RepairGuest` step.
    pub fn repair(repair: GuestRepair) -> Self {
        Self {
            rung: Rung::RepairGuest,
            repair: Some(repair),
        }
    }

    /// The restart an applied repair needs (a `Restart`, counted and gated as one).
    pub fn restart_after(repair: GuestRepair) -> Self {
        Self {
            rung: Rung::Restart,
            repair: Some(repair),
        }
    }

    /// Whether the step disrupts users: a disruptive rung, or, on a VM that is still
    /// reachable (`vm_reachable`), a repair that restarts TermService (every session drops).
    pub fn is_disruptive(self, vm_reachable: bool) -> bool {
        self.rung.is_disruptive() || (vm_reachable && self.drops_sessions())
    }

    /// A repair that restarts TermService.
    pub fn drops_sessions(self) -> bool {
        self.rung == Rung::RepairGuest
            && self
                .repair
                .is_some_and(crate::guest::changes::restarts_term_service)
    }

    /// The rung whose permission the step needs: a repair that drops the sessions of a
    /// reachable VM needs `Restart`'s (restarting TermService disrupts users as a restart
    /// does, and the repair's own restart follows it).
    pub fn permission_rung(self, vm_reachable: bool) -> Rung {
        if vm_reachable && self.drops_sessions() {
            Rung::Restart
        } else {
            self.rung
        }
    }

    /// The step a recovery is credited to: a restart that followed a repair credits the repair.
    pub fn credited(self) -> Self {
        match (self.rung, self.repair) {
            (Rung::Restart, Some(repair)) => Self::repair(repair),
            _ => self,
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.rung, self.repair) {
            (Rung::Restart, Some(r)) => write!(f, "{}(after {})", self.rung, r),
            (_, Some(r)) => write!(f, "{}({})", self.rung, r),
            (_, None) => write!(f, "{}", self.rung),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disruptive_rungs() {
        let disruptive: Vec<_> = Rung::ALL
            .into_iter()
            .filter(|r| r.is_disruptive())
            .collect();
        assert_eq!(
            disruptive,
            [
                Rung::ResetNic,
                Rung::Restart,
                Rung::Redeploy,
                Rung::ResetPassword
            ]
        );
    }
}
