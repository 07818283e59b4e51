//! `decide`: the ladder's rules as one pure function of (policy, ladder status, probe
//! verdict, evidence, fleet gates, now). No I/O, no clock, no client.

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

use super::{
    restart::{self, RestartHold},
    rung::{GuestRepair, Rung, Step},
    spec::{Backoff, Window},
    status::{ExecutionPhase, LadderStatus},
};
use crate::{
    evidence::{Evidence, NsgEvidence, guest::GuestScenario, nsg::Access, serial::BootSignal},
    probe::{Failure, FailureReason},
};

/// How far the operator may go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Report only: evidence and diagnosis, no plan, no action.
    Observe,
    /// Plan and report the next step, never call a mutating operation.
    DryRun,
    /// Act.
    Auto,
}

/// The validated ladder settings.
#[derive(Debug, Clone, PartialEq)]
pub struct LadderPolicy {
    /// Mode.
    pub mode: Mode,
    /// Ordered rungs the ladder may use.
    pub ladder: Vec<Rung>,
    /// Disruptive rungs allowed without a one-time approval.
    pub allowed_disruptive: Vec<Rung>,
    /// Backoff between attempts.
    pub backoff: Backoff,
    /// Wait after an operation before judging the probe.
    pub settle_time: Duration,
    /// Attempts of one step per incident.
    pub max_attempts_per_rung: u32,
    /// Ladders that may start in 24 hours.
    pub max_ladders_per_day: u32,
    /// Quiet time after a ladder ends before a new one may start.
    pub cooldown: Duration,
    /// Windows inside which disruptive rungs may run (empty: any time).
    pub windows: Vec<Window>,
    /// May start a stopped VM.
    pub allow_start: bool,
    /// May add an NSG allow rule for the configured prefixes.
    pub nsg_repair: bool,
    /// The source prefixes an NSG repair may allow (validated: never "everyone").
    pub nsg_allowed_prefixes: Vec<String>,
    /// Where `ResetPassword` resets and stores (`None`: the rung is not configured).
    pub password_reset: Option<super::spec::PasswordResetSpec>,
    /// May apply the security-weakening listener settings.
    pub allow_insecure_listener_settings: bool,
    /// May enable TLS 1.0/1.1 server protocols for legacy clients (a security finding).
    pub allow_legacy_tls: bool,
    /// May set the listener's port back to the probed one (`PortChanged`).
    pub restore_rdp_port: bool,
    /// Evidence older than this is gathered again during an incident.
    pub evidence_refresh: Duration,
    /// A `Requested` rung older than this without an operation handle is treated as
    /// interrupted (the call's fate is unknown).
    pub request_timeout: Duration,
}

impl Default for LadderPolicy {
    fn default() -> Self {
        Self {
            mode: Mode::Observe,
            ladder: Rung::DEFAULT_LADDER.to_vec(),
            allowed_disruptive: Vec::new(),
            backoff: Backoff {
                initial: Duration::from_secs(60),
                max: Duration::from_secs(1800),
                multiplier: 2.0,
                jitter: 0.1,
            },
            settle_time: Duration::from_secs(120),
            max_attempts_per_rung: 1,
            max_ladders_per_day: 3,
            cooldown: Duration::from_secs(3600),
            windows: Vec::new(),
            allow_start: false,
            nsg_repair: false,
            nsg_allowed_prefixes: Vec::new(),
            password_reset: None,
            allow_insecure_listener_settings: false,
            allow_legacy_tls: false,
            restore_rdp_port: false,
            evidence_refresh: Duration::from_secs(900),
            request_timeout: Duration::from_secs(120),
        }
    }
}

/// Reachability after thresholds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reachability {
    /// Reachable.
    Reachable,
    /// Unreachable for at least `failureThreshold` probes.
    Unreachable,
    /// Not decided yet.
    Unknown,
}

/// What the ladder is fixing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Incident {
    /// RDP is unreachable (after thresholds): the whole ladder may be used.
    Outage,
    /// Reachability keeps flipping without crossing the thresholds (frequent disconnects):
    /// only the listener keep-alive repair is used, never a generic or disruptive rung.
    Flapping,
    /// Reachable, but the RDP certificate has expired: only the certificate renewal is used.
    CertificateExpired,
}

/// Fleet-wide and operator-wide gates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gates {
    /// This replica holds the lease.
    pub leader: bool,
    /// Remediation is paused for this object (annotation).
    pub paused: bool,
    /// The storm breaker suspended disruptive rungs for the subscription.
    pub storm: bool,
    /// The observer may be blind (fleet-wide breaker, failing canary): every mutating rung
    /// is held, disruptive or not.
    pub blind: Option<Suspension>,
    /// A fleet-wide disruptive slot is free.
    pub disruptive_slot_free: bool,
    /// Disruptive rungs wait this long after an incident opens, so that a fleet-wide outage
    /// shows in the storm breaker before the first VM acts on it.
    pub disruptive_grace: Duration,
}

impl Gates {
    /// A lone leader with nothing in the way.
    pub const OPEN: Gates = Gates {
        leader: true,
        paused: false,
        storm: false,
        blind: None,
        disruptive_slot_free: true,
        disruptive_grace: Duration::ZERO,
    };
}

/// Everything `decide` looks at.
#[derive(Debug, Clone, Copy)]
pub struct Situation<'a> {
    /// Settings.
    pub policy: &'a LadderPolicy,
    /// Ladder memory from status.
    pub ladder: &'a LadderStatus,
    /// Reachability after thresholds.
    pub reachability: Reachability,
    /// The last probe's failure.
    pub failure: Option<&'a Failure>,
    /// What kind of incident this is.
    pub incident: Incident,
    /// Evidence of the current incident.
    pub evidence: Option<&'a Evidence>,
    /// Gates.
    pub gates: Gates,
    /// A one-time approval for a disruptive rung, not yet consumed.
    pub approval: Option<Rung>,
    /// Stable seed for jitter (the object's UID).
    pub seed: &'a str,
    /// Now.
    pub now: Timestamp,
}

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
    /// An applied repair needs a restart of the VM that the operator may not do now: the
    /// ladder waits for a person (or a permission) and runs no other rung meanwhile.
    RestartRequired {
        /// The applied repair.
        repair: GuestRepair,
        /// Why the operator does not restart the VM itself.
        hold: RestartHold,
    },
    /// DryRun: this is the step that would run.
    Plan(Step),
    /// Auto: record the intent for this step, then call Azure.
    Act(Step),
    /// Stop until the endpoint recovers.
    GiveUp(GiveUp),
}

/// The steps to try for this failure, targeted fixes first, then the rest of the ladder in
/// its order. `RepairGuest` only appears with a repair that fits the evidence.
pub fn plan(
    policy: &LadderPolicy,
    failure: Option<&Failure>,
    incident: Incident,
    evidence: Option<&Evidence>,
) -> Vec<Step> {
    let only = |step: Step| {
        if policy.ladder.contains(&step.rung) {
            vec![step]
        } else {
            Vec::new()
        }
    };
    match incident {
        Incident::Flapping => return only(Step::repair(GuestRepair::ListenerKeepAlive)),
        Incident::CertificateExpired => {
            return only(Step::repair(GuestRepair::RenewRdpCertificate));
        }
        Incident::Outage => {}
    }
    let scenarios = evidence.map(Evidence::guest_scenarios).unwrap_or_default();
    let mut targeted = Vec::new();
    let reason = failure.map(|f| f.reason);
    // A binding to a certificate that is gone explains the certificate errors it causes:
    // removing it comes before renewing the self-signed certificate.
    if scenarios.contains(&GuestScenario::StaleCertificateBinding) {
        targeted.push(Step::repair(GuestRepair::RemoveStaleCertificateBinding));
    }
    for scenario in &scenarios {
        match scenario {
            GuestScenario::ListenerDisabled => targeted.push(Step::rung(Rung::ResetRdpConfig)),
            GuestScenario::TlsDisabled => targeted.push(Step::repair(GuestRepair::EnableTls12)),
            GuestScenario::CertificateKeyAccess => {
                targeted.push(Step::repair(GuestRepair::RenewRdpCertificate))
            }
            _ => {}
        }
    }
    match reason {
        // A TLS failure alone (a middlebox may time it out) is no evidence against the
        // certificate: its renewal resets MachineKeys ACLs and restarts TermService, so it
        // waits for the guest's events or the certificate itself to say so.
        Some(FailureReason::TlsHandshakeFailed | FailureReason::TlsTimeout) => {
            targeted.push(Step::repair(GuestRepair::EnableTls12));
        }
        Some(FailureReason::NegotiationFailure) if failure.and_then(|f| f.code) == Some(3) => {
            targeted.push(Step::repair(GuestRepair::RenewRdpCertificate));
        }
        Some(FailureReason::TcpRefused | FailureReason::ConnectionClosed) => {
            targeted.push(Step::rung(Rung::ResetRdpConfig));
        }
        _ => {}
    }
    let mut steps: Vec<Step> = Vec::new();
    for step in targeted {
        if policy.ladder.contains(&step.rung) && !steps.contains(&step) {
            steps.push(step);
        }
    }
    for &rung in &policy.ladder {
        if rung != Rung::RepairGuest && !steps.contains(&Step::rung(rung)) {
            steps.push(Step::rung(rung));
        }
    }
    steps
}

/// The ladder's rules.
pub fn decide(s: &Situation<'_>) -> Decision {
    match s.reachability {
        Reachability::Reachable => {
            return match &s.ladder.current {
                // Let a running operation finish before closing the incident.
                Some(c) if c.phase == ExecutionPhase::Running => poll_or_wait(s),
                _ if s.ladder.incident_started_at.is_some() => Decision::Recovered,
                _ => Decision::Idle,
            };
        }
        Reachability::Unknown => {
            return match &s.ladder.current {
                Some(c) if c.phase == ExecutionPhase::Running => poll_or_wait(s),
                _ => Decision::Undecided,
            };
        }
        Reachability::Unreachable => {}
    }
    if let Some(current) = &s.ladder.current {
        return match current.phase {
            ExecutionPhase::Requested => {
                let age = s.now.duration_since(current.started_at.0);
                if age.as_secs_f64() >= s.policy.request_timeout.as_secs_f64() {
                    Decision::AbandonRequest
                } else {
                    // The driver that recorded the intent is making the call right now.
                    Decision::Wait {
                        until: add(current.started_at.0, s.policy.request_timeout),
                        reason: WaitReason::Polling,
                    }
                }
            }
            ExecutionPhase::Running => poll_or_wait(s),
            ExecutionPhase::Settling => match current.settle_until.as_ref() {
                Some(until) if until.0 > s.now => Decision::Wait {
                    until: until.0,
                    reason: WaitReason::Settling,
                },
                _ => Decision::NotFixed,
            },
            ExecutionPhase::AwaitingRestart => restart::after_repair(s, current),
        };
    }
    // Whatever answers on the address is not this VM: nothing done to this VM is justified
    // by it, and nothing is gathered about a machine that is not the one in question.
    if let Some(f) = s.failure
        && f.reason == FailureReason::WrongHost
    {
        return Decision::Blocked(Blocker::WrongHost {
            detail: f.detail.clone(),
        });
    }
    let evidence = match s.evidence {
        Some(e) if !stale(e, s) => e,
        _ => return Decision::GatherEvidence,
    };
    if let Some(d) = pending_reads(s, evidence) {
        return d;
    }
    if let Some(d) = evidence_gate(s, evidence) {
        return d;
    }
    if s.policy.mode == Mode::Observe {
        return Decision::Observe;
    }
    // An exhausted ladder stays stopped, unless a one-time approval unlocks the rung it
    // needed (LadderExhausted names the rungs that need permission).
    let approved = s.approval.is_some()
        && next_step(s, evidence)
            .is_some_and(|step| Some(step.permission_rung(vm_reachable(s))) == s.approval);
    if s.ladder.exhausted && !approved {
        return Decision::GiveUp(exhausted(s, evidence));
    }
    if s.gates.paused {
        return Decision::Suspended(Suspension::Paused);
    }
    if let Some(blind) = s.gates.blind {
        return Decision::Suspended(blind);
    }
    if let Some(wait) = backoff_wait(s) {
        return wait;
    }
    if let Some(d) = new_ladder_gate(s) {
        return d;
    }
    let Some(step) = next_step(s, evidence) else {
        return Decision::GiveUp(exhausted(s, evidence));
    };
    gate_and_act(s, step)
}

/// The last gates before `step` runs: for a disruptive rung the maintenance window and the
/// storm breaker; DryRun plans; only the leader acts; a disruptive rung waits out the fleet's
/// grace period and needs a free fleet slot.
pub(super) fn gate_and_act(s: &Situation<'_>, step: Step) -> Decision {
    let disruptive = step.is_disruptive(vm_reachable(s));
    if disruptive {
        if !s.policy.windows.is_empty() && !s.policy.windows.iter().any(|w| w.contains(s.now)) {
            return Decision::Suspended(Suspension::OutsideMaintenanceWindow);
        }
        if s.gates.storm {
            return Decision::Suspended(Suspension::Storm);
        }
    }
    if s.policy.mode == Mode::DryRun {
        return Decision::Plan(step);
    }
    if !s.gates.leader {
        return Decision::Suspended(Suspension::NotLeader);
    }
    if disruptive && let Some(started) = &s.ladder.incident_started_at {
        let until = add(started.0, s.gates.disruptive_grace);
        if until > s.now {
            return Decision::Wait {
                until,
                reason: WaitReason::FleetGrace,
            };
        }
    }
    if disruptive && !s.gates.disruptive_slot_free {
        return Decision::Wait {
            until: add(s.now, Duration::from_secs(30)),
            reason: WaitReason::FleetSlot,
        };
    }
    Decision::Act(step)
}

fn add(t: Timestamp, d: Duration) -> Timestamp {
    t.checked_add(d).unwrap_or(t)
}

fn poll_or_wait(s: &Situation<'_>) -> Decision {
    match s
        .ladder
        .current
        .as_ref()
        .and_then(|c| c.next_poll_at.as_ref())
    {
        Some(at) if at.0 > s.now => Decision::Wait {
            until: at.0,
            reason: WaitReason::Polling,
        },
        _ => Decision::Poll,
    }
}

fn stale(e: &Evidence, s: &Situation<'_>) -> bool {
    let before_incident = s
        .ladder
        .incident_started_at
        .as_ref()
        .is_some_and(|t| e.gathered_at.0 < t.0);
    before_incident
        || s.now.duration_since(e.gathered_at.0).as_secs_f64()
            > s.policy.evidence_refresh.as_secs_f64()
}

/// Evidence reads still running in Azure hold the ladder until they answer or time out: no
/// rung starts meanwhile, so none can collide with the in-guest query's Run Command (Azure
/// runs one per VM), and none is chosen without what the reads may still say.
fn pending_reads(s: &Situation<'_>, e: &Evidence) -> Option<Decision> {
    let due = e.pending_due()?;
    Some(if due <= s.now {
        Decision::PollEvidence
    } else {
        Decision::Wait {
            until: due,
            reason: WaitReason::GatheringEvidence,
        }
    })
}

/// Evidence that blocks or redirects the ladder before any generic rung.
fn evidence_gate(s: &Situation<'_>, e: &Evidence) -> Option<Decision> {
    let refresh = add(e.gathered_at.0, s.policy.evidence_refresh);
    if e.power_state.is_some_and(|p| p.is_down()) {
        return Some(if s.policy.allow_start && s.policy.mode != Mode::Observe {
            gated_special(s, Step::rung(Rung::StartVm))
        } else {
            Decision::Blocked(Blocker::VmNotRunning)
        });
    }
    if e.resource_health
        .as_ref()
        .is_some_and(|r| r.is_platform_problem())
    {
        return Some(Decision::Wait {
            until: refresh,
            reason: WaitReason::PlatformIssue,
        });
    }
    if e.nsg.as_ref().is_some_and(|n| n.closed_public_ip) {
        // No NSG to add a rule to: creating one is a person's decision.
        return Some(Decision::Blocked(Blocker::PublicIpClosed));
    }
    if let Some(nsg) = &e.nsg
        && nsg.trusted_access() == Access::Deny
    {
        return Some(if s.policy.nsg_repair && s.policy.mode != Mode::Observe {
            gated_special(s, Step::rung(Rung::RepairNsg))
        } else {
            Decision::Blocked(nsg_blocker(nsg))
        });
    }
    for scenario in e.guest_scenarios() {
        let blocker = match scenario {
            GuestScenario::PortTakenByOtherProgram => Blocker::PortTakenByOtherProgram,
            GuestScenario::PortChanged => match port_changed(s, e) {
                Some(d) => return Some(d),
                None => continue,
            },
            GuestScenario::ConnectionBroker => Blocker::ConnectionBroker,
            _ => continue,
        };
        return Some(Decision::Blocked(blocker));
    }
    if e.serial
        .as_ref()
        .and_then(|sc| sc.latest)
        .is_some_and(BootSignal::guest_is_busy)
    {
        return Some(Decision::Wait {
            until: refresh,
            reason: WaitReason::GuestBusy,
        });
    }
    None
}

/// The listener is configured for another port than the probed one: reported with both
/// ports, or, with `restoreRdpPort`, repaired in the guest (which needs the VM agent).
fn port_changed(s: &Situation<'_>, e: &Evidence) -> Option<Decision> {
    let probed = e.rdp_port?;
    let configured = e
        .guest
        .as_ref()?
        .registry
        .get("PortNumber")?
        .parse::<u16>()
        .ok()?;
    let step = Step::repair(GuestRepair::RestoreRdpPort);
    let repairable = s.policy.restore_rdp_port
        && s.policy.mode != Mode::Observe
        && s.policy.ladder.contains(&Rung::RepairGuest)
        && agent_ok(e, Rung::RepairGuest);
    Some(if repairable {
        gated_special(s, step)
    } else {
        Decision::Blocked(Blocker::PortChanged { configured, probed })
    })
}

/// The rule that denies the prober: the local verdict's when it denies too (it names the NSG
/// and its level), else IP flow verify's.
fn nsg_blocker(nsg: &NsgEvidence) -> Blocker {
    match (nsg.verdict.denying_rule(), &nsg.ip_flow_verify) {
        (Some(d), _) => Blocker::NsgDenied {
            level: d.level.to_string(),
            nsg: d.nsg.clone(),
            rule: d.rule.clone(),
        },
        (None, Some(flow)) => Blocker::NsgDenied {
            level: "effective".into(),
            nsg: "(per IP flow verify)".into(),
            rule: flow.rule.clone(),
        },
        (None, None) => Blocker::NsgDenied {
            level: String::new(),
            nsg: String::new(),
            rule: String::new(),
        },
    }
}

/// Waiting out the backoff after a failed or ineffective rung.
fn backoff_wait(s: &Situation<'_>) -> Option<Decision> {
    let next = s.ladder.next_action_at.as_ref()?;
    (next.0 > s.now).then_some(Decision::Wait {
        until: next.0,
        reason: WaitReason::Backoff,
    })
}

/// StartVm and RepairNsg run outside the ladder but under the same gates and attempt limit.
fn gated_special(s: &Situation<'_>, step: Step) -> Decision {
    if s.ladder.attempts_of(step) >= s.policy.max_attempts_per_rung {
        return Decision::GiveUp(GiveUp::Exhausted {
            need_permission: Vec::new(),
            need_agent: Vec::new(),
        });
    }
    if s.gates.paused {
        return Decision::Suspended(Suspension::Paused);
    }
    if let Some(blind) = s.gates.blind {
        return Decision::Suspended(blind);
    }
    if let Some(wait) = backoff_wait(s) {
        return wait;
    }
    match (s.policy.mode, s.gates.leader) {
        (Mode::DryRun, _) => Decision::Plan(step),
        (_, false) => Decision::Suspended(Suspension::NotLeader),
        _ => Decision::Act(step),
    }
}

/// A new ladder may start only after the cooldown and within the daily budget.
fn new_ladder_gate(s: &Situation<'_>) -> Option<Decision> {
    if s.ladder.incident_history().next().is_some() {
        return None;
    }
    if let Some(ended) = s.ladder.last_ladder_ended_at.as_ref() {
        let until = add(ended.0, s.policy.cooldown);
        if until > s.now {
            return Some(Decision::Wait {
                until,
                reason: WaitReason::Cooldown,
            });
        }
    }
    if s.ladder.ladders_in_last_day(s.now) >= s.policy.max_ladders_per_day as usize {
        let oldest = s
            .ladder
            .ladder_starts
            .iter()
            .map(|t| t.0)
            .min()
            .unwrap_or(s.now);
        return Some(Decision::Wait {
            until: add(oldest, Duration::from_secs(86_400)),
            reason: WaitReason::DailyBudget,
        });
    }
    None
}

/// Keeps the first of each rung, in order.
fn dedup(rungs: &mut Vec<Rung>) {
    let mut seen = Vec::new();
    rungs.retain(|r| {
        let new = !seen.contains(r);
        seen.push(*r);
        new
    });
}

pub(super) fn permitted(s: &Situation<'_>, rung: Rung) -> bool {
    !rung.is_disruptive() || s.policy.allowed_disruptive.contains(&rung) || s.approval == Some(rung)
}

/// The VM still answers (flapping, expired certificate): users may be connected.
pub(super) fn vm_reachable(s: &Situation<'_>) -> bool {
    s.incident != Incident::Outage
}

/// Whether `step` may run: its rung's permission, or `Restart`'s for a repair that drops the
/// sessions of a reachable VM.
fn step_permitted(s: &Situation<'_>, step: Step) -> bool {
    permitted(s, step.permission_rung(vm_reachable(s)))
}

fn agent_ok(e: &Evidence, rung: Rung) -> bool {
    !rung.needs_agent() || e.agent_ready == Some(true)
}

fn next_step(s: &Situation<'_>, e: &Evidence) -> Option<Step> {
    plan(s.policy, s.failure, s.incident, Some(e))
        .into_iter()
        .find(|step| {
            restart::attempts(s.ladder, *step) < s.policy.max_attempts_per_rung
                && agent_ok(e, step.rung)
                && step_permitted(s, *step)
        })
}

fn exhausted(s: &Situation<'_>, e: &Evidence) -> GiveUp {
    let remaining: Vec<Step> = plan(s.policy, s.failure, s.incident, Some(e))
        .into_iter()
        .filter(|step| restart::attempts(s.ladder, *step) < s.policy.max_attempts_per_rung)
        .collect();
    let mut need_permission: Vec<Rung> = remaining
        .iter()
        .filter(|st| !step_permitted(s, **st))
        .map(|st| st.permission_rung(vm_reachable(s)))
        .collect();
    dedup(&mut need_permission);
    let mut need_agent: Vec<Rung> = remaining
        .iter()
        .filter(|st| !agent_ok(e, st.rung))
        .map(|st| st.rung)
        .collect();
    dedup(&mut need_agent);
    GiveUp::Exhausted {
        need_permission,
        need_agent,
    }
}
