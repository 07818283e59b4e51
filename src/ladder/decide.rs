//! `decide`: the ladder's rules as one pure function of (policy, ladder status, probe
//! verdict, evidence, fleet gates, now). No I/O, no clock, no client.

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

use super::{
    evidence_gate::evidence_gate,
    restart,
    rung::{GuestRepair, Rung, Step},
    spec::{Backoff, Window},
    status::{ExecutionPhase, LadderStatus},
    verdict::{Blocker, Decision, GiveUp, Suspension, WaitReason},
};
use crate::{
    evidence::{Evidence, guest::GuestScenario},
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
    /// Snapshot before change, and retention.
    pub snapshots: super::snapshot::SnapshotPolicy,
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
            snapshots: super::snapshot::SnapshotPolicy::default(),
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
            GuestScenario::CertificateKeyAccess | GuestScenario::CertificateUnusable => {
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
            if let Some(d) = restore_while_reachable(s) {
                return d;
            }
            return match &s.ladder.current {
                // Let a running operation finish before closing the incident.
                Some(c) if operation_runs(c) => poll_or_wait(s),
                _ if s.ladder.incident_started_at.is_some() => Decision::Recovered,
                _ => Decision::Idle,
            };
        }
        Reachability::Unknown => {
            return match &s.ladder.current {
                Some(c) if operation_runs(c) => poll_or_wait(s),
                _ => Decision::Undecided,
            };
        }
        Reachability::Unreachable => {}
    }
    if let Some(current) = &s.ladder.current {
        return match current.phase {
            ExecutionPhase::Snapshotting if current.operation.is_some() => poll_or_wait(s),
            ExecutionPhase::Requested | ExecutionPhase::Snapshotting => requested(s, current),
            ExecutionPhase::Running => poll_or_wait(s),
            ExecutionPhase::Settling => match super::settle::settling(s, current) {
                // The reset was judged: its original address comes back before the ladder
                // moves on.
                Decision::NotFixed if super::nic::restore_due(current) => {
                    super::nic::restore(s, current)
                }
                d => d,
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
    // A repair applied and still waiting for its restart (the restart's intent is dropped
    // once the snapshot before it is taken): the restart is still the next step.
    if let Some(decision) = restart::pending(s) {
        return decision;
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

/// An intent without an operation handle: the call is being made, or after `requestTimeout`
/// its fate is unknown and it is never made again.
fn requested(s: &Situation<'_>, current: &super::status::RungExecution) -> Decision {
    let requested = super::nic::requested_at(current);
    let age = s.now.duration_since(requested);
    if age.as_secs_f64() >= s.policy.request_timeout.as_secs_f64() {
        Decision::AbandonRequest
    } else {
        // The driver that recorded the intent is making the call right now.
        Decision::Wait {
            until: add(requested, s.policy.request_timeout),
            reason: WaitReason::Polling,
        }
    }
}

/// RDP answers while a NIC reset is in flight: the reset is judged (it worked), so its
/// original address comes back now; a restore whose intent is recorded is waited for, and
/// after the restore the rung settles before it is credited.
fn restore_while_reachable(s: &Situation<'_>) -> Option<Decision> {
    let c = s.ladder.current.as_ref()?;
    if super::nic::restore_due(c) {
        return Some(super::nic::restore(s, c));
    }
    if super::nic::restoring(c) && c.phase == ExecutionPhase::Requested {
        // The restore may be being sent (it restarts the VM): the incident stays open until
        // it is known, or abandoned as of unknown outcome.
        return Some(requested(s, c));
    }
    let until = super::nic::restore_settling(c, s.now)?;
    Some(Decision::Wait {
        until,
        reason: WaitReason::Settling,
    })
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

/// An Azure operation of the current rung runs: the rung's own, or the snapshot before it.
fn operation_runs(c: &super::status::RungExecution) -> bool {
    match c.phase {
        ExecutionPhase::Running => true,
        ExecutionPhase::Snapshotting => c.operation.is_some(),
        ExecutionPhase::Requested | ExecutionPhase::Settling | ExecutionPhase::AwaitingRestart => {
            false
        }
    }
}

pub(super) fn add(t: Timestamp, d: Duration) -> Timestamp {
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

/// Waiting out the backoff after a failed or ineffective rung.
fn backoff_wait(s: &Situation<'_>) -> Option<Decision> {
    let next = s.ladder.next_action_at.as_ref()?;
    (next.0 > s.now).then_some(Decision::Wait {
        until: next.0,
        reason: WaitReason::Backoff,
    })
}

/// StartVm and RepairNsg run outside the ladder but under the same gates and attempt limit.
pub(super) fn gated_special(s: &Situation<'_>, step: Step) -> Decision {
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

pub(super) fn agent_ok(e: &Evidence, rung: Rung) -> bool {
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
