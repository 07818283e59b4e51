//! The remediation stage: after a probe has been evaluated, walk the ladder. This is the one
//! place that sequences the ladder's I/O — evidence reads, the intent write, the Azure call,
//! polling — around the pure [`decide`]. Drivers (the Kubernetes controller, the in-memory
//! demo) call [`Remediator::remediate`] with the outcome of [`super::evaluate`] and a sink that
//! persists the status; the intent of every mutating call is persisted *before* the call.
//!
//! The stage is split along its seams: [`dispatch`] turns a decision into status and events,
//! [`act`] stores an intent and makes the Azure call, [`poll`] follows the operation until it
//! settles, [`refusal`] handles Azure's "not now" (throttling, locks, preemption), [`fleet`]
//! holds the fleet-wide claims, [`messages`] the wording.

mod act;
mod dispatch;
mod fleet;
mod messages;
mod nic;
#[cfg(test)]
mod nic_tests;
mod poll;
mod refusal;
mod restart;
mod snapshot;
#[cfg(test)]
mod snapshot_tests;

use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use k8s_openapi::jiff::Timestamp;

use super::{
    Event, Next, Outcome, Severity, ValidSpec,
    conditions::{self, Desired, Status},
    gather::{Gathering, Vantage, gather, poll_pending},
};
use crate::{
    api::{Phase, RdpHealthStatus, conditions as types},
    azure::{AllowRule, Azure, AzureError, Operation, OperationKind, PollOutcome, VmRef},
    ladder::{
        Decision, ExecutionPhase, Gates, GiveUp, GuestRepair, Incident, LadderStatus, LeaseTerm,
        OperationRef, Reachability, Rung, RungOutcome, Situation, Step, Suspension, WaitReason,
        decide,
        fleet::{ClaimGroup, FleetPolicy, FleetView, Scope},
    },
    probe::Failure,
    secrets::{SecretRef, SecretStore, generate_password},
};

pub use act::repair_script;
pub use fleet::{Fleet, SharedClaims};
pub use messages::summarize;

/// Persists a status (the intent of a rung must be stored before its Azure call).
#[async_trait::async_trait]
pub trait StatusSink: Send + Sync {
    /// Writes `status`; an error means nothing may be called.
    async fn persist(&self, status: &RdpHealthStatus) -> Result<(), String>;
}

/// Why the stage could not run.
#[derive(Debug, thiserror::Error)]
pub enum RemediateError {
    /// Azure throttled or failed a read that the stage needs.
    #[error("failed to read evidence from Azure")]
    Azure(#[source] AzureError),
    /// The intent could not be persisted, so nothing was called.
    #[error("failed to record the rung's intent before acting: {0}")]
    Persist(String),
    /// This replica's leadership ended (or could not be confirmed) before it could act, so
    /// nothing was called.
    #[error("failed to act: this replica no longer holds the lease")]
    NotLeader,
}

impl RemediateError {
    /// PascalCase reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Azure(e) => e.reason(),
            Self::Persist(_) => "PersistIntent",
            Self::NotLeader => "NotLeader",
        }
    }

    /// When to try again, if Azure said.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Azure(e) => e.retry_after(),
            Self::Persist(_) | Self::NotLeader => None,
        }
    }
}

/// Who may act, asked at the moment of acting: right before a rung's intent is stored and
/// again right before its Azure call.
pub trait LeaderCheck: Send + Sync + std::fmt::Debug {
    /// The current leadership term, or `None` when this replica must not act.
    fn term(&self) -> Option<LeaseTerm>;
}

/// A single replica without election: always the leader.
#[derive(Debug, Default, Clone, Copy)]
pub struct SoleReplica;

impl LeaderCheck for SoleReplica {
    fn term(&self) -> Option<LeaseTerm> {
        Some(LeaseTerm {
            holder: None,
            transitions: 0,
        })
    }
}

/// What the stage needs besides the object.
#[derive(Clone)]
pub struct Remediator {
    /// Azure.
    pub azure: Arc<dyn Azure>,
    /// Fleet safety.
    pub fleet: Arc<Fleet>,
    /// The prober's source address as Azure sees it (for NSG evaluation), if known.
    pub probe_source: Option<IpAddr>,
    /// First poll of a new operation after this long.
    pub first_poll: Duration,
    /// The VM's own RDP port when the probed port is a translated one (a load balancer NAT
    /// rule, or the demo's loopback responders): NSGs see the VM's port.
    pub vm_rdp_port: Option<u16>,
    /// Where `ResetPassword` stores the passwords it generates; without it the rung fails
    /// before calling Azure.
    pub secrets: Option<Arc<dyn SecretStore>>,
    /// Whether this replica may act, asked right before every intent write and Azure write.
    pub leadership: Arc<dyn LeaderCheck>,
}

/// Why a rung's call did not start an operation.
pub(super) enum CallError {
    /// Azure refused or failed.
    Azure(AzureError),
    /// The operator refused before calling Azure.
    Refused(String),
}

impl CallError {
    fn describe(&self) -> String {
        match self {
            Self::Azure(e) => format!("{}: {e}", e.reason()),
            Self::Refused(m) => m.clone(),
        }
    }
}

/// Per-object inputs of one stage run.
pub struct Subject<'a> {
    /// `namespace/name`.
    pub key: &'a str,
    /// Stable jitter seed (the object's UID).
    pub seed: &'a str,
    /// The validated spec.
    pub spec: &'a ValidSpec,
    /// The failure of this reconcile's probe, if one ran and failed.
    pub failure: Option<&'a Failure>,
    /// This reconcile's probe result, if one ran.
    pub probed: Option<bool>,
    /// This replica holds the lease.
    pub leader: bool,
    /// The pause annotation is set.
    pub paused: bool,
    /// A not yet consumed approval annotation: (value, rung).
    pub approval: Option<(String, Rung)>,
    /// The claim group whose cap its disruptive rungs count against besides its
    /// subscription's (a fleet's incident objects).
    pub group: Option<&'a ClaimGroup>,
}

const RECENT_PROBES: usize = 20;

/// How old a claim must be before a status without a rung in flight releases it (longer than
/// the object cache takes to show a stored intent).
const CLAIM_SETTLE_AGE: Duration = Duration::from_secs(60);

/// The probes the flapping verdict looks at.
const FLAPPING_WINDOW: usize = 12;

/// Clean probes needed after a keep-alive repair before flapping counts as fixed.
const CLEAN_PROBES_AFTER_REPAIR: usize = 2;

/// The incident kind and the reachability `decide` should judge.
fn classify(
    status: &RdpHealthStatus,
    reachability: Reachability,
    now: Timestamp,
) -> (Incident, Reachability) {
    if reachability == Reachability::Unreachable {
        return (Incident::Outage, reachability);
    }
    let keepalive = status
        .ladder
        .current
        .as_ref()
        .filter(|c| c.step.repair == Some(GuestRepair::ListenerKeepAlive));
    if let Some(current) = keepalive {
        // Judged only on the probes since the repair finished (the history is cleared then).
        let recent = &status.recent_probes;
        let settled = match current.phase {
            ExecutionPhase::Settling => current.settle_until.as_ref().is_some_and(|t| t.0 <= now),
            // The changes are not in effect before a restart: the restart is decided at once,
            // and only a whole flapping window of clean probes (someone restarted the VM)
            // counts as recovered.
            ExecutionPhase::AwaitingRestart => {
                let clean = recent.len() >= FLAPPING_WINDOW && !recent.contains('0');
                let r = if clean {
                    Reachability::Reachable
                } else {
                    Reachability::Unreachable
                };
                return (Incident::Flapping, r);
            }
            ExecutionPhase::Requested | ExecutionPhase::Running | ExecutionPhase::Snapshotting => {
                false
            }
        };
        // After the restart that made the repair take effect, the probes that failed while
        // the guest booted are the reboot, not flapping: judge from its first answer on.
        let judged = if current.step.rung == Rung::Restart {
            recent.trim_start_matches('0')
        } else {
            recent.as_str()
        };
        let not_back = judged.is_empty() && !recent.is_empty();
        return if !settled || not_back || judged.contains('0') {
            (Incident::Flapping, Reachability::Unreachable)
        } else if judged.len() >= CLEAN_PROBES_AFTER_REPAIR {
            (Incident::Flapping, Reachability::Reachable)
        } else {
            (Incident::Flapping, Reachability::Unknown)
        };
    }
    if flapping(&status.recent_probes) {
        (Incident::Flapping, Reachability::Unreachable)
    } else if certificate_expired(status) {
        (Incident::CertificateExpired, Reachability::Unreachable)
    } else {
        (Incident::Outage, reachability)
    }
}

/// The last probe saw an expired certificate (the `CertificateValid` condition says so).
fn certificate_expired(status: &RdpHealthStatus) -> bool {
    conditions::find(&status.conditions, types::CERTIFICATE_VALID).is_some_and(|c| {
        c.status == "False" && c.reason == crate::api::reasons::CERTIFICATE_EXPIRED
    })
}

/// Flapping: the last probes keep flipping although the thresholds never declared the
/// endpoint unreachable (frequent disconnects).
pub fn flapping(recent: &str) -> bool {
    let window: Vec<char> = recent.chars().rev().take(FLAPPING_WINDOW).collect();
    let flips = window.windows(2).filter(|w| w[0] != w[1]).count();
    let failures = window.iter().filter(|c| **c == '0').count();
    flips >= 4 && failures >= 3
}

impl Remediator {
    /// A claim is held exactly while the object's status shows a disruptive rung in flight:
    /// whatever ended it (recovered, not fixed, failed, idle, another replica finishing it),
    /// the slot is free again.
    fn release_unless_in_flight(&self, key: &str, status: &RdpHealthStatus) {
        let in_flight = status
            .ladder
            .current
            .as_ref()
            .is_some_and(|c| c.is_disruptive());
        if !in_flight {
            self.fleet.release_settled(key, CLAIM_SETTLE_AGE);
        }
    }

    /// Runs the ladder for one object after its probe was evaluated, updating `outcome`.
    pub async fn remediate(
        &self,
        subject: &Subject<'_>,
        outcome: &mut Outcome,
        sink: &dyn StatusSink,
        now: Timestamp,
    ) -> Result<(), RemediateError> {
        if let Some(ok) = subject.probed {
            let recent = &mut outcome.status.recent_probes;
            recent.push(if ok { '1' } else { '0' });
            if recent.len() > RECENT_PROBES {
                recent.drain(..recent.len() - RECENT_PROBES);
            }
            if ok {
                // RDP answered: the guest of a rung that restarted it is back.
                outcome.status.ladder.guest_answered(now);
            }
        }
        let reachability = match conditions::status_of(&outcome.status.conditions, types::REACHABLE)
        {
            Some(Status::True) => Reachability::Reachable,
            Some(Status::False) => Reachability::Unreachable,
            _ => Reachability::Unknown,
        };
        // Flapping and an expired certificate are incidents of their own although the
        // thresholds say reachable; only their targeted repair may run for them.
        let (incident, effective) = classify(&outcome.status, reachability, now);
        if effective == Reachability::Unreachable {
            outcome.status.ladder.open_incident(now);
        }
        let vm = VmRef::new(
            &subject.spec.vm.subscription,
            &subject.spec.vm.resource_group,
            &subject.spec.vm.name,
        );
        self.release_unless_in_flight(subject.key, &outcome.status);
        let mut wait: Option<Timestamp> = None;
        let mut recovered = None;
        for _ in 0..4 {
            let approval = subject.approval.as_ref().map(|(_, r)| *r);
            let gates = Gates {
                leader: subject.leader,
                paused: subject.paused,
                storm: self.fleet.storm(&vm.subscription),
                blind: self.fleet.blind(),
                disruptive_slot_free: self.fleet.slot_free(
                    &vm.subscription,
                    subject.group,
                    subject.key,
                ),
                disruptive_grace: self.fleet.policy.disruptive_grace,
            };
            let decision = {
                let status = &outcome.status;
                decide(&Situation {
                    policy: &subject.spec.ladder,
                    ladder: &status.ladder,
                    reachability: effective,
                    failure: subject.failure,
                    incident,
                    evidence: status.diagnosis.as_ref(),
                    gates,
                    approval,
                    seed: subject.seed,
                    now,
                })
            };
            let step = self
                .execute(subject, &vm, decision, outcome, sink, now)
                .await?;
            match step {
                Continue::Again => continue,
                Continue::Until(t) => {
                    wait = Some(t);
                    break;
                }
                Continue::Recovered(by) => {
                    recovered = Some(by);
                    break;
                }
                Continue::Done => break,
            }
        }
        self.prune_if_due(subject, &vm, outcome, now).await;
        self.release_unless_in_flight(subject.key, &outcome.status);
        self.phase(outcome, reachability, recovered.is_some());
        if let Some(until) = wait {
            let secs = until.duration_since(now).as_secs_f64().max(1.0);
            let d = Duration::from_secs_f64(secs);
            outcome.next = match outcome.next {
                Next::Requeue(r) => Next::Requeue(r.min(d)),
                Next::AwaitChange => Next::Requeue(d),
            };
        }
        Ok(())
    }

    fn phase(&self, outcome: &mut Outcome, reachability: Reachability, recovered: bool) {
        let ladder = &outcome.status.ladder;
        let phase = if recovered && ladder.recovered_by.is_some() {
            Some(Phase::Recovered)
        } else if ladder.exhausted {
            Some(Phase::Exhausted)
        } else if ladder.current.is_some() || ladder.next_action_at.is_some() {
            Some(Phase::Remediating)
        } else if ladder.incident_started_at.is_some()
            && reachability == Reachability::Unreachable
            && outcome
                .status
                .diagnosis
                .as_ref()
                .is_none_or(|d| !d.pending.is_empty())
        {
            Some(Phase::Diagnosing)
        } else {
            None
        };
        if let Some(p) = phase {
            outcome.status.phase = Some(p);
        }
    }
}

pub(super) enum Continue {
    Again,
    Until(Timestamp),
    Recovered(Option<Step>),
    Done,
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    #[rstest]
    #[case("", false)]
    #[case("1111111111", false)]
    #[case("0000000000", false)]
    #[case("101010101010", true)]
    #[case("110011001100", true)]
    #[case("111111110111", false)]
    fn flapping_cases(#[case] recent: &str, #[case] expected: bool) {
        assert_eq!(flapping(recent), expected);
    }

    /// The keep-alive repair and the restart it required, settled: the probes failed while
    /// the rebooted guest booted are not flapping, failures after its first answer are.
    #[rstest]
    #[case::booted_then_clean(Rung::Restart, "000000111", Reachability::Reachable)]
    #[case::still_flapping_after_boot(Rung::Restart, "0001011", Reachability::Unreachable)]
    #[case::never_came_back(Rung::Restart, "0000", Reachability::Unreachable)]
    #[case::one_answer_so_far(Rung::Restart, "0001", Reachability::Unknown)]
    #[case::repair_without_reboot_counts_every_failure(
        Rung::RepairGuest,
        "000000111",
        Reachability::Unreachable
    )]
    #[case::repair_clean(Rung::RepairGuest, "111", Reachability::Reachable)]
    fn keepalive_judged_after_its_restart(
        #[case] rung: Rung,
        #[case] recent: &str,
        #[case] expected: Reachability,
    ) {
        let now = Timestamp::now();
        let step = if rung == Rung::Restart {
            Step::restart_after(GuestRepair::ListenerKeepAlive)
        } else {
            Step::repair(GuestRepair::ListenerKeepAlive)
        };
        let mut status = RdpHealthStatus {
            recent_probes: recent.to_owned(),
            ..RdpHealthStatus::default()
        };
        status.ladder.start(step, now);
        status
            .ladder
            .settle(now, now - Duration::from_secs(1), None);
        let (incident, r) = classify(&status, Reachability::Reachable, now);
        assert_eq!(incident, Incident::Flapping);
        assert_eq!(r, expected, "{recent}");
    }
}
