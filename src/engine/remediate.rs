//! The remediation stage: after a probe has been evaluated, walk the ladder. This is the one
//! place that sequences the ladder's I/O — evidence reads, the intent write, the Azure call,
//! polling — around the pure [`decide`]. Drivers (the Kubernetes controller, the in-memory
//! demo) call [`Remediator::remediate`] with the outcome of [`super::evaluate`] and a sink that
//! persists the status; the intent of every mutating call is persisted *before* the call.

use std::{
    collections::BTreeSet,
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
        Decision, Gates, GiveUp, GuestRepair, Incident, LadderStatus, OperationRef, Reachability,
        Rung, RungOutcome, Situation, Step, Suspension, WaitReason, decide,
        fleet::{FleetPolicy, FleetView},
    },
    probe::Failure,
    secrets::{SecretRef, SecretStore, generate_password},
};

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
}

impl RemediateError {
    /// PascalCase reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Azure(e) => e.reason(),
            Self::Persist(_) => "PersistIntent",
        }
    }

    /// When to try again, if Azure said.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Azure(e) => e.retry_after(),
            Self::Persist(_) => None,
        }
    }
}

/// Shared fleet state: the view of every monitored VM (refreshed by the driver) and the
/// in-process claims on disruptive slots, so two concurrent reconciles cannot both take the
/// last slot.
#[derive(Debug, Default)]
pub struct Fleet {
    policy: FleetPolicy,
    view: Mutex<FleetView>,
    claims: Mutex<BTreeSet<(String, String)>>,
}

impl Fleet {
    /// A fleet with `policy`.
    pub fn new(policy: FleetPolicy) -> Self {
        Self {
            policy,
            ..Self::default()
        }
    }

    /// Replaces the view (computed from every object's status).
    pub fn update(&self, view: FleetView) {
        if let Ok(mut v) = self.view.lock() {
            *v = view;
        }
    }

    /// Whether the storm breaker holds `subscription`.
    pub fn storm(&self, subscription: &str) -> bool {
        self.view
            .lock()
            .map(|v| v.storm(subscription, &self.policy))
            .unwrap_or(true)
    }

    /// Subscriptions whose breaker is on.
    pub fn storming(&self) -> Vec<String> {
        self.view
            .lock()
            .map(|v| v.storming(&self.policy).map(str::to_string).collect())
            .unwrap_or_default()
    }

    /// Claims a disruptive slot for `key`; false when the subscription's slots are taken.
    fn claim(&self, subscription: &str, key: &str) -> bool {
        let (Ok(view), Ok(mut claims)) = (self.view.lock(), self.claims.lock()) else {
            return false;
        };
        let held = claims
            .iter()
            .filter(|(s, k)| s == subscription && k != key)
            .count();
        let in_status = view.subscriptions.get(subscription).map_or(0, |c| {
            c.disruptive_in_flight
                .iter()
                .filter(|k| {
                    *k != key && !claims.contains(&(subscription.to_string(), (*k).clone()))
                })
                .count()
        });
        if held + in_status >= self.policy.max_concurrent_disruptive {
            return false;
        }
        claims.insert((subscription.to_string(), key.to_string()));
        true
    }

    /// Releases `key`'s claim (its disruptive rung ended).
    fn release(&self, subscription: &str, key: &str) {
        if let Ok(mut claims) = self.claims.lock() {
            claims.remove(&(subscription.to_string(), key.to_string()));
        }
    }

    /// Drops the claims of objects that no longer exist: an object deleted while its
    /// disruptive rung ran would otherwise hold its subscription's slot until a restart.
    pub fn retain_claims(&self, live: impl Fn(&str) -> bool) {
        if let Ok(mut claims) = self.claims.lock() {
            claims.retain(|(_, key)| live(key));
        }
    }

    /// Whether `key` could take a slot now (without claiming it).
    fn slot_free(&self, subscription: &str, key: &str) -> bool {
        let (Ok(view), Ok(claims)) = (self.view.lock(), self.claims.lock()) else {
            return false;
        };
        let held = claims
            .iter()
            .filter(|(s, k)| s == subscription && k != key)
            .count();
        held < self.policy.max_concurrent_disruptive
            && view.slot_free(subscription, key, &self.policy)
    }
}

/// What the stage needs besides the object.
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
}

/// Why a rung's call did not start an operation.
enum CallError {
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
}

const RECENT_PROBES: usize = 20;

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
        let settled = current.phase == crate::ladder::ExecutionPhase::Settling
            && current.settle_until.as_ref().is_some_and(|t| t.0 <= now);
        let recent = &status.recent_probes;
        return if !settled || recent.contains('0') {
            (Incident::Flapping, Reachability::Unreachable)
        } else if recent.len() >= CLEAN_PROBES_AFTER_REPAIR {
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
    let window: Vec<char> = recent.chars().rev().take(12).collect();
    let flips = window.windows(2).filter(|w| w[0] != w[1]).count();
    let failures = window.iter().filter(|c| **c == '0').count();
    flips >= 4 && failures >= 3
}

impl Remediator {
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
        let mut wait: Option<Timestamp> = None;
        let mut recovered = None;
        for _ in 0..4 {
            let approval = subject.approval.as_ref().map(|(_, r)| *r);
            let gates = Gates {
                leader: subject.leader,
                paused: subject.paused,
                storm: self.fleet.storm(&vm.subscription),
                disruptive_slot_free: self.fleet.slot_free(&vm.subscription, subject.key),
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

    async fn execute(
        &self,
        subject: &Subject<'_>,
        vm: &VmRef,
        decision: Decision,
        outcome: &mut Outcome,
        sink: &dyn StatusSink,
        now: Timestamp,
    ) -> Result<Continue, RemediateError> {
        let status = &mut outcome.status;
        let events = &mut outcome.events;
        let policy = &subject.spec.ladder;
        Ok(match decision {
            Decision::Undecided => Continue::Done,
            Decision::Idle => {
                set(
                    status,
                    types::REMEDIATING,
                    Status::False,
                    "Idle",
                    "nothing to remediate",
                    now,
                );
                clear_suspension(status, now);
                Continue::Done
            }
            Decision::Observe => {
                set(
                    status,
                    types::REMEDIATING,
                    Status::False,
                    "ObserveOnly",
                    "remediation.mode is Observe: evidence is reported, nothing is changed",
                    now,
                );
                Continue::Done
            }
            Decision::GatherEvidence => {
                let how = Gathering {
                    vantage: self.vantage(subject),
                    previous: status.diagnosis.as_ref(),
                    first_poll: self.first_poll,
                };
                let (ev, read_events) = gather(self.azure.as_ref(), vm, &how, now)
                    .await
                    .map_err(RemediateError::Azure)?;
                events.push(Event {
                    severity: Severity::Normal,
                    reason: "EvidenceGathered",
                    note: summarize(&ev),
                });
                events.extend(read_events);
                if ev.nsg.as_ref().is_some_and(|n| n.open_to_internet) {
                    events.push(Event {
                        severity: Severity::Warning,
                        reason: "RdpOpenToInternet",
                        note: "an NSG rule allows RDP from the whole internet; restrict it to the users' addresses".into(),
                    });
                }
                status.diagnosis = Some(ev);
                Continue::Again
            }
            Decision::PollEvidence => {
                if let Some(ev) = status.diagnosis.as_mut() {
                    events.extend(poll_pending(self.azure.as_ref(), vm, ev, now).await);
                }
                Continue::Again
            }
            Decision::Blocked(blocker) => {
                let changed = set(
                    status,
                    types::REMEDIATING,
                    Status::False,
                    blocker.reason(),
                    blocker.message(),
                    now,
                );
                if changed {
                    events.push(Event {
                        severity: Severity::Warning,
                        reason: blocker.reason(),
                        note: blocker.message(),
                    });
                }
                Continue::Until(refresh_at(status, policy.evidence_refresh, now))
            }
            Decision::Wait { until, reason } => {
                let status_value = match reason {
                    WaitReason::Polling | WaitReason::Settling | WaitReason::Backoff => {
                        Status::True
                    }
                    _ => Status::False,
                };
                set(
                    status,
                    types::REMEDIATING,
                    status_value,
                    reason.reason(),
                    wait_message(reason, until),
                    now,
                );
                Continue::Until(until)
            }
            Decision::Suspended(s) => {
                let changed = set(
                    status,
                    types::REMEDIATION_SUSPENDED,
                    Status::True,
                    s.reason(),
                    suspension_message(s),
                    now,
                );
                if changed && s != Suspension::NotLeader {
                    events.push(Event {
                        severity: Severity::Warning,
                        reason: "RemediationSuspended",
                        note: suspension_message(s),
                    });
                }
                Continue::Until(now.checked_add(Duration::from_secs(60)).unwrap_or(now))
            }
            Decision::Poll => self.poll(subject, vm, status, events, now).await,
            Decision::AbandonRequest => {
                let until = now.checked_add(policy.settle_time).unwrap_or(now);
                status.ladder.settle_unknown(until, "the operator stopped while calling Azure; the call's outcome is unknown and it is not repeated".into());
                events.push(Event {
                    severity: Severity::Warning,
                    reason: "RemediationOutcomeUnknown",
                    note: format!("{} was interrupted while calling Azure; it is not repeated and the probe judges it after {until}", current(&status.ladder).0),
                });
                Continue::Until(until)
            }
            Decision::NotFixed => {
                let (step, attempt) = current(&status.ladder);
                let n = status.ladder.incident_attempts();
                let next = now
                    .checked_add(policy.backoff.delay(n, subject.seed))
                    .unwrap_or(now);
                let rung = status.ladder.current.as_ref().map(|c| c.step.rung);
                status.ladder.not_fixed(now, next);
                self.fleet.release(&vm.subscription, subject.key);
                if matches!(rung, Some(Rung::StartVm | Rung::RepairNsg)) {
                    // They change what the evidence says: read it again before the next step.
                    status.diagnosis = None;
                }
                events.push(Event {
                    severity: Severity::Warning,
                    reason: "RemediationNotFixed",
                    note: format!("{step} (attempt {attempt}) finished but RDP is still unreachable; next step not before {next}"),
                });
                Continue::Again
            }
            Decision::Plan(step) => {
                if status.ladder.planned != Some(step) {
                    events.push(Event {
                        severity: Severity::Normal,
                        reason: "RemediationPlanned",
                        note: format!("DryRun: would run {step} now"),
                    });
                }
                status.ladder.planned = Some(step);
                set(
                    status,
                    types::REMEDIATING,
                    Status::False,
                    "DryRun",
                    format!("DryRun: the next step would be {step}"),
                    now,
                );
                Continue::Until(refresh_at(status, policy.evidence_refresh, now))
            }
            Decision::Act(step) => self.act(subject, vm, step, outcome, sink, now).await?,
            Decision::GiveUp(GiveUp::Exhausted {
                need_permission,
                need_agent,
            }) => {
                let first = !status.ladder.exhausted;
                status.ladder.exhaust(now);
                let mut message =
                    "every usable rung was tried and RDP is still unreachable".to_string();
                if !need_permission.is_empty() {
                    message.push_str(&format!("; needs permission: {}", names(&need_permission)));
                }
                if !need_agent.is_empty() {
                    message.push_str(&format!("; needs a Ready VM agent: {}", names(&need_agent)));
                }
                set(
                    status,
                    types::LADDER_EXHAUSTED,
                    Status::True,
                    "LadderExhausted",
                    message.clone(),
                    now,
                );
                set(
                    status,
                    types::REMEDIATING,
                    Status::False,
                    "LadderExhausted",
                    message.clone(),
                    now,
                );
                if first {
                    events.push(Event {
                        severity: Severity::Warning,
                        reason: "LadderExhausted",
                        note: message,
                    });
                }
                Continue::Until(refresh_at(status, policy.evidence_refresh, now))
            }
            Decision::Recovered => {
                let by = status.ladder.recover(now);
                self.fleet.release(&vm.subscription, subject.key);
                status.diagnosis = None;
                set(
                    status,
                    types::LADDER_EXHAUSTED,
                    Status::False,
                    "Recovered",
                    "reachable again",
                    now,
                );
                set(
                    status,
                    types::REMEDIATING,
                    Status::False,
                    "Recovered",
                    "reachable again",
                    now,
                );
                clear_suspension(status, now);
                events.push(Event {
                    severity: Severity::Normal,
                    reason: "RemediationSucceeded",
                    note: match by {
                        Some(step) => format!("RDP is reachable again after {step}"),
                        None => "RDP is reachable again without a remediation rung".into(),
                    },
                });
                Continue::Recovered(by)
            }
        })
    }

    async fn poll(
        &self,
        subject: &Subject<'_>,
        vm: &VmRef,
        status: &mut RdpHealthStatus,
        events: &mut Vec<Event>,
        now: Timestamp,
    ) -> Continue {
        let policy = &subject.spec.ladder;
        let Some(current) = status.ladder.current.clone() else {
            return Continue::Done;
        };
        let Some(op) = current
            .operation
            .as_ref()
            .map(|o| operation(vm, current.step, o))
        else {
            return Continue::Done;
        };
        match self.azure.poll(&op).await {
            Ok(PollOutcome::Pending { retry_after }) => {
                let next = now
                    .checked_add(retry_after.max(Duration::from_secs(1)))
                    .unwrap_or(now);
                status.ladder.poll_again(next);
                Continue::Until(next)
            }
            Ok(PollOutcome::Succeeded { result }) => {
                if current.step.rung == Rung::ResetPassword {
                    self.password_outcome(subject, true, events, now).await;
                }
                let until = now.checked_add(policy.settle_time).unwrap_or(now);
                let message = match result {
                    crate::azure::OperationResult::RunCommand(out) => {
                        Some(script_result(&out.stdout))
                    }
                    _ => None,
                };
                status.ladder.settle(until, message);
                // Judge what follows on fresh probes only.
                status.recent_probes.clear();
                events.push(Event {
                    severity: Severity::Normal,
                    reason: "RemediationCompleted",
                    note: format!(
                        "{} finished in Azure; settling until {until} before judging",
                        current.step
                    ),
                });
                Continue::Until(until)
            }
            Ok(PollOutcome::Failed { code, message }) => {
                if current.step.rung == Rung::ResetPassword {
                    self.password_outcome(subject, false, events, now).await;
                }
                self.failed(
                    subject,
                    vm,
                    status,
                    events,
                    format!("{code}: {message}"),
                    now,
                )
            }
            Err(e) if e.is_retryable() => {
                let next = now
                    .checked_add(e.retry_after().unwrap_or(Duration::from_secs(30)))
                    .unwrap_or(now);
                status.ladder.poll_again(next);
                Continue::Until(next)
            }
            Err(e) => {
                // The operation's status cannot be read (it expired, or access changed):
                // whether it ran is unknown. It is not repeated; the probe judges it.
                let until = now.checked_add(policy.settle_time).unwrap_or(now);
                let message = format!(
                    "the operation's status could not be read ({}: {e}); the probe judges the rung",
                    e.reason()
                );
                status.ladder.settle_unknown(until, message.clone());
                events.push(Event {
                    severity: Severity::Warning,
                    reason: "RemediationOutcomeUnknown",
                    note: format!("{}: {message}", current.step),
                });
                Continue::Until(until)
            }
        }
    }

    fn failed(
        &self,
        subject: &Subject<'_>,
        vm: &VmRef,
        status: &mut RdpHealthStatus,
        events: &mut Vec<Event>,
        message: String,
        now: Timestamp,
    ) -> Continue {
        let (step, attempt) = current(&status.ladder);
        let n = status.ladder.incident_attempts();
        let next = now
            .checked_add(subject.spec.ladder.backoff.delay(n, subject.seed))
            .unwrap_or(now);
        status
            .ladder
            .finish(RungOutcome::Failed, Some(message.clone()), now, Some(next));
        self.fleet.release(&vm.subscription, subject.key);
        events.push(Event {
            severity: Severity::Warning,
            reason: "RemediationFailed",
            note: format!("{step} (attempt {attempt}) failed: {message}"),
        });
        Continue::Until(next)
    }

    async fn act(
        &self,
        subject: &Subject<'_>,
        vm: &VmRef,
        step: Step,
        outcome: &mut Outcome,
        sink: &dyn StatusSink,
        now: Timestamp,
    ) -> Result<Continue, RemediateError> {
        let disruptive = step.rung.is_disruptive();
        if disruptive && !self.fleet.claim(&vm.subscription, subject.key) {
            return Ok(Continue::Until(
                now.checked_add(Duration::from_secs(30)).unwrap_or(now),
            ));
        }
        let status = &mut outcome.status;
        if let Some((value, rung)) = &subject.approval
            && *rung == step.rung
        {
            status.ladder.consumed_approval = Some(value.clone());
        }
        if disruptive {
            // Evidence before disruption: it is in status; say so in an Event too.
            outcome.events.push(Event {
                severity: Severity::Normal,
                reason: "EvidenceCaptured",
                note: status
                    .diagnosis
                    .as_ref()
                    .map_or_else(|| "no evidence could be read".into(), summarize),
            });
        }
        status.ladder.start(step, now);
        set(
            status,
            types::REMEDIATING,
            Status::True,
            "RungStarted",
            format!("{step} started"),
            now,
        );
        if let Err(e) = sink.persist(status).await {
            // Nothing was called: forget the intent so the next reconcile decides again.
            status.ladder.current = None;
            self.fleet.release(&vm.subscription, subject.key);
            return Err(RemediateError::Persist(e));
        }
        outcome.events.push(Event {
            severity: Severity::Normal,
            reason: "RemediationStarted",
            note: format!(
                "{step} started (attempt {})",
                status.ladder.attempts_of(step)
            ),
        });
        match self.call(subject, vm, step, now).await {
            Ok((op, note)) => {
                if let Some(note) = note {
                    outcome.events.push(Event {
                        severity: Severity::Warning,
                        reason: "NsgRuleWritten",
                        note,
                    });
                }
                let first = now.checked_add(self.first_poll).unwrap_or(now);
                status.ladder.running(
                    OperationRef {
                        async_operation_url: op.async_operation.clone(),
                        location_url: op.location.clone(),
                    },
                    first,
                );
                if op.completed {
                    if step.rung == Rung::ResetPassword {
                        self.password_outcome(subject, true, &mut outcome.events, now)
                            .await;
                    }
                    let until = now
                        .checked_add(subject.spec.ladder.settle_time)
                        .unwrap_or(now);
                    status.ladder.settle(until, None);
                    Ok(Continue::Until(until))
                } else {
                    Ok(Continue::Until(first))
                }
            }
            Err(e) => Ok(self.failed(
                subject,
                vm,
                &mut outcome.status,
                &mut outcome.events,
                e.describe(),
                now,
            )),
        }
    }

    async fn call(
        &self,
        subject: &Subject<'_>,
        vm: &VmRef,
        step: Step,
        now: Timestamp,
    ) -> Result<(Operation, Option<String>), CallError> {
        let plain =
            |r: Result<Operation, AzureError>| r.map(|op| (op, None)).map_err(CallError::Azure);
        match (step.rung, step.repair) {
            (Rung::ResetRdpConfig, _) => plain(self.azure.reset_rdp_config(vm).await),
            (Rung::RepairGuest, Some(repair)) => {
                let script =
                    repair_script(repair, subject.spec.ladder.allow_insecure_listener_settings);
                plain(self.azure.run_command(vm, &script).await)
            }
            (Rung::ResetNic, _) => plain(self.azure.reset_nic(vm).await),
            (Rung::Restart, _) => plain(self.azure.restart(vm).await),
            (Rung::Redeploy, _) => plain(self.azure.redeploy(vm).await),
            (Rung::StartVm, _) => plain(self.azure.start(vm).await),
            (Rung::ResetPassword, _) => self.reset_password(subject, vm, now).await,
            (Rung::RepairNsg, _) => self.repair_nsg(subject, vm).await,
            (rung, None) => Err(CallError::Refused(format!(
                "{rung} needs a targeted repair and none was chosen"
            ))),
        }
    }

    fn vantage(&self, subject: &Subject<'_>) -> Vantage {
        Vantage {
            source: self.probe_source,
            port: self.vm_rdp_port.unwrap_or(subject.spec.port),
        }
    }

    fn secret_ref(subject: &Subject<'_>) -> Option<SecretRef> {
        let p = subject.spec.ladder.password_reset.as_ref()?;
        let namespace = subject.key.split_once('/').map_or("default", |(ns, _)| ns);
        Some(SecretRef {
            namespace: namespace.to_string(),
            name: p.secret_name.clone(),
        })
    }

    /// Generates a password, stores it in the Secret as pending, then asks VMAccess to set
    /// it. Nothing is sent to Azure unless the Secret holds the password first.
    async fn reset_password(
        &self,
        subject: &Subject<'_>,
        vm: &VmRef,
        now: Timestamp,
    ) -> Result<(Operation, Option<String>), CallError> {
        let (Some(spec), Some(at)) = (
            subject.spec.ladder.password_reset.as_ref(),
            Self::secret_ref(subject),
        ) else {
            return Err(CallError::Refused(
                "ResetPassword needs remediation.passwordReset".into(),
            ));
        };
        let Some(store) = &self.secrets else {
            return Err(CallError::Refused(
                "this operator has no access to Secrets, so it cannot store a new password; nothing was sent to Azure".into(),
            ));
        };
        let password = generate_password().map_err(|e| {
            CallError::Refused(format!(
                "no random source for the password ({e}); nothing was sent to Azure"
            ))
        })?;
        store
            .stage(&at, &spec.username, &password, now)
            .await
            .map_err(|e| {
                CallError::Refused(format!(
                    "could not store the new password ({e}); nothing was sent to Azure"
                ))
            })?;
        match self
            .azure
            .reset_password(vm, &spec.username, &password)
            .await
        {
            Ok(op) => Ok((op, None)),
            Err(e) => {
                // Azure refused outright: the pending password was never set.
                if let Err(d) = store.discard(&at).await {
                    tracing::warn!(secret = %at, error = %d, "could not drop the pending password");
                }
                Err(CallError::Azure(e))
            }
        }
    }

    /// Records the outcome of a password reset in its Secret (never the password itself in
    /// anything but the Secret).
    async fn password_outcome(
        &self,
        subject: &Subject<'_>,
        applied: bool,
        events: &mut Vec<Event>,
        now: Timestamp,
    ) {
        let (Some(store), Some(at)) = (&self.secrets, Self::secret_ref(subject)) else {
            return;
        };
        let result = if applied {
            store.commit(&at, now).await
        } else {
            store.discard(&at).await
        };
        match result {
            Ok(()) if applied => events.push(Event {
                severity: Severity::Normal,
                reason: "PasswordStored",
                note: format!(
                    "the new password of the reset account is in Secret {} under key password",
                    at.name
                ),
            }),
            Ok(()) => {}
            Err(e) => events.push(Event {
                severity: Severity::Warning,
                reason: "PasswordStateNotRecorded",
                note: format!(
                    "could not record the reset's outcome in Secret {} ({e}); the password sent to Azure is under key pendingPassword",
                    at.name
                ),
            }),
        }
    }

    /// Adds an allow rule for the allowed prefixes to every NSG level that denies the
    /// prober, after re-reading the rules (see [`crate::ladder::nsg_repair`]).
    async fn repair_nsg(
        &self,
        subject: &Subject<'_>,
        vm: &VmRef,
    ) -> Result<(Operation, Option<String>), CallError> {
        use crate::{evidence::nsg::NetworkContext, ladder::nsg_repair};
        let rules = self
            .azure
            .network_rules(vm)
            .await
            .map_err(CallError::Azure)?;
        let vantage = self.vantage(subject);
        let (flow, subnet, nic) = super::gather::probe_flow(&rules, vantage)
            .ok_or_else(|| CallError::Refused("the VM's NIC has no private address".into()))?;
        let private = flow.destination;
        let prefixes = &subject.spec.ladder.nsg_allowed_prefixes;
        let plan = nsg_repair::plan(
            &flow,
            subnet.as_ref(),
            nic.as_ref(),
            &NetworkContext::private_ranges(),
            prefixes,
            &vm.name,
        )
        .map_err(|e| CallError::Refused(format!("NSG not changed: {e}")))?;
        let mut last = None;
        let mut written = Vec::new();
        for rule in &plan {
            let op = self
                .azure
                .put_allow_rule(
                    vm,
                    &AllowRule {
                        nsg_id: rule.nsg.clone(),
                        name: rule.name.clone(),
                        priority: i32::try_from(rule.priority).unwrap_or(4096),
                        source_prefixes: prefixes.clone(),
                        destination_prefix: private.to_string(),
                        port: vantage.port,
                        description: nsg_repair::description(),
                    },
                )
                .await
                .map_err(CallError::Azure)?;
            written.push(format!(
                "{} at priority {} in NSG {} (outranks {})",
                rule.name, rule.priority, rule.nsg, rule.outranks
            ));
            last = Some(op);
        }
        let op = last.ok_or_else(|| CallError::Refused("no NSG rule to write".into()))?;
        Ok((
            op,
            Some(format!(
                "allowed RDP to {private}:{} from {} only: {}",
                vantage.port,
                prefixes.join(", "),
                written.join("; ")
            )),
        ))
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

/// The script lines of a repair, with the consent switch applied.
pub fn repair_script(repair: GuestRepair, allow_insecure: bool) -> Vec<String> {
    let text = repair.script();
    let text = if repair == GuestRepair::ListenerKeepAlive && allow_insecure {
        text.replace(
            "param([string]$AllowInsecureListenerSettings = 'false')",
            "param([string]$AllowInsecureListenerSettings = 'true')",
        )
    } else {
        text.to_string()
    };
    text.lines().map(str::to_string).collect()
}

fn script_result(stdout: &str) -> String {
    stdout
        .lines()
        .rev()
        .find(|l| l.starts_with("RDPHEALTH result"))
        .unwrap_or("script finished")
        .chars()
        .take(300)
        .collect()
}

fn operation(vm: &VmRef, step: Step, op: &OperationRef) -> Operation {
    let kind = match step.rung {
        Rung::ResetRdpConfig => OperationKind::ResetRdpConfig,
        Rung::RepairGuest => OperationKind::RunCommand,
        Rung::ResetNic => OperationKind::ResetNic,
        Rung::Restart => OperationKind::Restart,
        Rung::Redeploy => OperationKind::Redeploy,
        Rung::ResetPassword => OperationKind::ResetPassword,
        Rung::StartVm => OperationKind::Start,
        Rung::RepairNsg => OperationKind::PutNsgRule,
    };
    Operation {
        kind,
        vm: vm.clone(),
        async_operation: op.async_operation_url.clone(),
        location: op.location_url.clone(),
        started_at: String::new(),
        detail: None,
        completed: false,
    }
}

enum Continue {
    Again,
    Until(Timestamp),
    Recovered(Option<Step>),
    Done,
}

fn current(ladder: &LadderStatus) -> (String, u32) {
    ladder
        .current
        .as_ref()
        .map_or(("no rung".into(), 0), |c| (c.step.to_string(), c.attempt))
}

fn names(rungs: &[Rung]) -> String {
    rungs
        .iter()
        .map(|r| r.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn refresh_at(status: &RdpHealthStatus, refresh: Duration, now: Timestamp) -> Timestamp {
    status
        .diagnosis
        .as_ref()
        .and_then(|d| d.gathered_at.0.checked_add(refresh).ok())
        .filter(|t| *t > now)
        .unwrap_or_else(|| now.checked_add(refresh).unwrap_or(now))
}

fn set(
    status: &mut RdpHealthStatus,
    type_: &'static str,
    value: Status,
    reason: &str,
    message: impl Into<String>,
    now: Timestamp,
) -> bool {
    let before =
        conditions::find(&status.conditions, type_).map(|c| (c.status.clone(), c.reason.clone()));
    conditions::merge(
        &mut status.conditions,
        Desired::new(type_, value, reason.to_string(), message),
        None,
        now,
    );
    before != Some((value.as_str().to_string(), reason.to_string()))
}

fn clear_suspension(status: &mut RdpHealthStatus, now: Timestamp) {
    if conditions::status_of(&status.conditions, types::REMEDIATION_SUSPENDED) == Some(Status::True)
    {
        set(
            status,
            types::REMEDIATION_SUSPENDED,
            Status::False,
            "NotSuspended",
            "remediation may act",
            now,
        );
    }
}

fn wait_message(reason: WaitReason, until: Timestamp) -> String {
    match reason {
        WaitReason::Backoff => format!("backing off until {until}"),
        WaitReason::Polling => format!("Azure operation running; next poll at {until}"),
        WaitReason::Settling => format!("operation finished; settling until {until}"),
        WaitReason::PlatformIssue => {
            "Resource Health reports an Azure platform problem: waiting, not acting".into()
        }
        WaitReason::GuestBusy => {
            "the guest is installing updates or checking its disk: waiting, not rebooting".into()
        }
        WaitReason::Cooldown => format!("cooldown after the last ladder until {until}"),
        WaitReason::DailyBudget => {
            format!("maxLaddersPerDay reached; next ladder not before {until}")
        }
        WaitReason::FleetSlot => "another disruptive rung is in flight in this subscription".into(),
        WaitReason::FleetGrace => format!(
            "disruptive rungs wait until {until}, a grace period after the incident opened, so a fleet-wide outage reaches the storm breaker first"
        ),
        WaitReason::GatheringEvidence => format!(
            "waiting for evidence reads running in Azure (in-guest query, IP flow verify); next look at {until}"
        ),
    }
}

fn suspension_message(s: Suspension) -> String {
    match s {
        Suspension::Paused => "the rdphealth.io/pause annotation holds remediation".into(),
        Suspension::Storm => "too many VMs of this subscription are unreachable at once: disruptive rungs are suspended (storm breaker)".into(),
        Suspension::OutsideMaintenanceWindow => "disruptive rungs wait for a maintenance window".into(),
        Suspension::NotLeader => "another replica holds the lease and acts".into(),
    }
}

/// A one-line summary of the evidence (Events, logs): never a secret (SAS tokens are stripped).
pub fn summarize(ev: &crate::evidence::Evidence) -> String {
    let mut parts = Vec::new();
    if let Some(p) = ev.power_state {
        parts.push(format!("power {p:?}"));
    }
    if let Some(a) = ev.agent_ready {
        parts.push(format!("agent {}", if a { "Ready" } else { "Not Ready" }));
    }
    if let Some(rh) = &ev.resource_health {
        parts.push(format!("Resource Health {:?}", rh.availability));
    }
    if let Some(nsg) = &ev.nsg {
        match nsg.verdict.denying_rule() {
            Some(d) => parts.push(format!("NSG denies ({} {} {})", d.level, d.nsg, d.rule)),
            None => parts.push("NSG allows".into()),
        }
        if let Some(flow) = &nsg.ip_flow_verify {
            parts.push(format!(
                "IP flow verify {:?} ({}){}",
                flow.access,
                flow.rule,
                if flow.agrees_with_local_verdict {
                    ""
                } else {
                    ", which the ladder trusts over the local verdict"
                }
            ));
        }
    }
    if let Some(guest) = &ev.guest {
        let scenarios: Vec<&str> = guest.scenarios(0).iter().map(|s| s.as_str()).collect();
        parts.push(if scenarios.is_empty() {
            "guest: nothing found".into()
        } else {
            format!("guest: {}", scenarios.join(", "))
        });
    }
    for read in &ev.pending {
        parts.push(format!("{} running", read.kind.describe()));
    }
    if let Some(sig) = ev.serial.as_ref().and_then(|s| s.latest) {
        parts.push(format!("serial log: {}", sig.as_str()));
    }
    if let Some(uri) = ev
        .boot_diagnostics
        .as_ref()
        .and_then(|b| b.serial_log_uri.as_ref())
    {
        parts.push(format!("serial log at {uri}"));
    }
    if !ev.errors.is_empty() {
        parts.push(format!("{} reads failed", ev.errors.len()));
    }
    parts.join("; ")
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

    #[test]
    fn claims_of_deleted_objects_free_their_slot() {
        let fleet = Fleet::new(FleetPolicy::default());
        assert!(fleet.claim("sub", "ns/deleted"));
        assert!(!fleet.slot_free("sub", "ns/other"));
        fleet.retain_claims(|key| key != "ns/deleted");
        assert!(fleet.slot_free("sub", "ns/other"));
        assert!(fleet.claim("sub", "ns/other"));
    }

    #[test]
    fn consent_switch_is_applied_only_with_consent() {
        let safe = repair_script(GuestRepair::ListenerKeepAlive, false).join("\n");
        assert!(safe.contains("AllowInsecureListenerSettings = 'false'"));
        let consented = repair_script(GuestRepair::ListenerKeepAlive, true).join("\n");
        assert!(consented.contains("AllowInsecureListenerSettings = 'true'"));
    }
}
