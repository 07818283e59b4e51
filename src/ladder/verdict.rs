//! What `decide` can answer: the decision, and the reasons it reports (a blocker only a person
//! can remove, a wait, a suspension, giving up).

use k8s_openapi::jiff::Timestamp;

use super::{
    restart::RestartHold,
    rung::{GuestRepair, Rung, Step},
};

/// Something only a person (or a setting) can fix; reported, not acted on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Blocker {
    /// The VM is stopped or deallocated and starting it is not allowed.
    VmNotRunning,
    /// An NSG rule denies the prober's flow.
    NsgDenied {
        /// `nic`/`subnet`.
        level: String,
        /// The NSG.
        nsg: String,
        /// The deciding rule.
        rule: String,
    },
    /// The prober comes through a Standard public IP and no NSG is on the path: Azure drops
    /// inbound traffic there unless an NSG allows it.
    PublicIpClosed,
    /// Another program owns the RDP port in the guest.
    PortTakenByOtherProgram,
    /// RDP listens on a different port in the guest (`PortNumber`) than the one probed.
    PortChanged {
        /// The listener's configured port.
        configured: u16,
        /// The port the prober uses (as the VM sees it).
        probed: u16,
    },
    /// RD Connection Broker errors: not automated.
    ConnectionBroker,
    /// The endpoint answered as another computer: acting on this VM could harm the wrong
    /// machine or nothing at all. Reported with both names, never remediated.
    WrongHost {
        /// Who answered and who was expected.
        detail: String,
    },
}

impl Blocker {
    /// PascalCase reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::VmNotRunning => "VmNotRunning",
            Self::NsgDenied { .. } => "NsgDenied",
            Self::PublicIpClosed => "PublicIpClosed",
            Self::PortTakenByOtherProgram => "PortTakenByOtherProgram",
            Self::PortChanged { .. } => "PortChanged",
            Self::ConnectionBroker => "ConnectionBrokerError",
            Self::WrongHost { .. } => "WrongHost",
        }
    }

    /// For people.
    pub fn message(&self) -> String {
        match self {
            Self::VmNotRunning => {
                "the VM is stopped or deallocated; start it (or set remediation.allowStart)".into()
            }
            Self::NsgDenied { level, nsg, rule } => format!(
                "{level} NSG {nsg} denies RDP from the prober with rule {rule}; restarting cannot fix that"
            ),
            Self::PublicIpClosed => "the VM's Standard public IP admits no inbound traffic without an NSG that allows it, and neither its NIC nor its subnet has one; add an NSG allowing RDP from the users' addresses".into(),
            Self::PortTakenByOtherProgram => {
                "another program listens on the RDP port inside the guest".into()
            }
            Self::PortChanged { configured, probed } => format!(
                "the RDP listener is configured for port {configured} (RDP-Tcp PortNumber) but the VM is probed on port {probed}; restore the port (remediation.restoreRdpPort) or probe the new one"
            ),
            Self::ConnectionBroker => {
                "RD Connection Broker errors (events 2056/1296): reinstall the broker role; not automated"
                    .into()
            }
            Self::WrongHost { detail } => format!(
                "{detail}: the address belongs to another machine; no rung acts on this VM until it answers as itself"
            ),
        }
    }
}

/// Why the ladder waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitReason {
    /// Backoff after a failed rung.
    Backoff,
    /// The operation runs; next poll.
    Polling,
    /// Settling after an operation.
    Settling,
    /// `settleTime` has passed but the guest of a rung that restarted it is still booting:
    /// it is judged once the guest is back (at most `settle::BOOT_LIMIT`).
    GuestBooting,
    /// Resource Health reports a platform or planned problem.
    PlatformIssue,
    /// The guest installs updates or checks its disk.
    GuestBusy,
    /// Cooldown after the last ladder.
    Cooldown,
    /// `maxLaddersPerDay` reached.
    DailyBudget,
    /// All fleet-wide disruptive slots are taken.
    FleetSlot,
    /// The incident is younger than the fleet's grace period for disruptive rungs.
    FleetGrace,
    /// Evidence reads run in Azure (the in-guest query, IP flow verify): they can block the
    /// ladder or pick its first rung, and the in-guest query holds the VM's one Run Command.
    GatheringEvidence,
}

impl WaitReason {
    /// PascalCase reason.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Backoff => "Backoff",
            Self::Polling => "OperationRunning",
            Self::Settling => "Settling",
            Self::GuestBooting => "GuestBooting",
            Self::PlatformIssue => "PlatformIssue",
            Self::GuestBusy => "GuestBusy",
            Self::Cooldown => "Cooldown",
            Self::DailyBudget => "DailyLadderBudget",
            Self::FleetSlot => "FleetConcurrencyLimit",
            Self::FleetGrace => "FleetGracePeriod",
            Self::GatheringEvidence => "GatheringEvidence",
        }
    }
}

/// Why remediation is suspended (condition `RemediationSuspended`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Suspension {
    /// The pause annotation is set.
    Paused,
    /// The storm breaker holds disruptive rungs.
    Storm,
    /// Disruptive rungs only inside maintenance windows.
    OutsideMaintenanceWindow,
    /// This replica is not the leader.
    NotLeader,
    /// Too many VMs of all subscriptions failed within a short window: every mutating rung
    /// is held (fleet-wide breaker).
    FleetBreaker,
    /// The canary endpoint fails: the observer is blind and every mutating rung is held.
    CanaryDown,
}

impl Suspension {
    /// PascalCase reason; also the `rdphealth_remediation_suspended{reason}` label.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Paused => "Paused",
            Self::Storm => "StormBreaker",
            Self::OutsideMaintenanceWindow => "OutsideMaintenanceWindow",
            Self::NotLeader => "NotLeader",
            Self::FleetBreaker => "FleetBreaker",
            Self::CanaryDown => "CanaryDown",
        }
    }
}

/// Why the ladder gave up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GiveUp {
    /// Every usable rung was tried.
    Exhausted {
        /// Rungs left that need permission (`allowedDisruptiveActions` or an approval).
        need_permission: Vec<Rung>,
        /// Rungs skipped because the VM agent is not Ready.
        need_agent: Vec<Rung>,
    },
}

/// What to do now.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Reachable and no incident: nothing to do.
    Idle,
    /// Reachable again: close the incident (crediting the rung in progress, if any).
    Recovered,
    /// Not decided yet (thresholds), nothing to do.
    Undecided,
    /// Gather (or refresh) the read-only evidence.
    GatherEvidence,
    /// Poll the evidence reads running in Azure (or give up those past their timeout).
    PollEvidence,
    /// Report the diagnosis only (Observe mode).
    Observe,
    /// Nothing the ladder may do helps: report.
    Blocked(Blocker),
    /// Wait until a time.
    Wait {
        /// Until when.
        until: Timestamp,
        /// Why.
        reason: WaitReason,
    },
    /// Remediation is held.
    Suspended(Suspension),
    /// Poll the running operation.
    Poll,
    /// The `Requested` rung has no operation handle after `requestTimeout`: its fate is
    /// unknown; settle and judge instead of repeating it.
    AbandonRequest,
    /// Settling is over and the endpoint is still unreachable: the rung did not fix it.
    NotFixed,
    /// Read the VM's instance view to see whether the guest of a settling rung is back.
    WatchGuest,
    /// An applied repair needs a restart of the VM that the operator may not do now: the
    /// ladder waits for a person (or a permission) and runs no other rung meanwhile.
    RestartRequired {
        /// The applied repair.
        repair: GuestRepair,
        /// Why the operator does not restart the VM itself.
        hold: RestartHold,
    },
    /// A NIC reset was judged: put the NIC back on its original address (when it is free).
    RestoreNic,
    /// A NIC reset was judged, and its original address is not restored (the message says
    /// why): the NIC keeps the new one.
    KeepNicAddress(String),
    /// DryRun: this is the step that would run.
    Plan(Step),
    /// Auto: record the intent for this step, then call Azure.
    Act(Step),
    /// Stop until the endpoint recovers.
    GiveUp(GiveUp),
}
