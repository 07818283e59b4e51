//! From a decision to status, events and what to do next.

use super::messages::{
    clear_suspension, current, names, refresh_at, set, summarize, suspension_message, wait_message,
};
use super::*;

/// The current rung waits for the OS-disk snapshot before it.
fn snapshotting(status: &RdpHealthStatus) -> bool {
    status
        .ladder
        .current
        .as_ref()
        .is_some_and(|c| c.phase == crate::ladder::ExecutionPhase::Snapshotting)
}

/// The current rung's operation is the restore of a reset NIC's original address.
fn restoring_nic(status: &RdpHealthStatus) -> bool {
    status
        .ladder
        .current
        .as_ref()
        .is_some_and(crate::ladder::nic::restoring)
}

/// The judgement's note when the guest of a rung that restarted it never came back.
fn never_came_back(status: &RdpHealthStatus, settle: Duration) -> Option<String> {
    let c = status.ladder.current.as_ref()?;
    if !crate::ladder::settle::still_booting(c) {
        return None;
    }
    let deadline = crate::ladder::settle::boot_deadline(c, settle)?;
    Some(format!(
        "the guest had not come back by {deadline}, {}× settleTime after the operation finished (VM agent still not Ready); RDP is still unreachable",
        crate::ladder::settle::BOOT_LIMIT_FACTOR
    ))
}

/// How long a rung of unknown outcome may wait for Azure to show that it is done.
const UNKNOWN_OUTCOME_LIMIT: Duration = Duration::from_secs(30 * 60);

impl Remediator {
    /// For a rung whose call's outcome is unknown: while Azure shows the VM still being
    /// changed (provisioning state not terminal, or unreadable), the rung keeps settling
    /// (and its fleet slot) instead of being judged, up to [`UNKNOWN_OUTCOME_LIMIT`].
    /// Returns when to look again.
    async fn still_busy(
        &self,
        vm: &VmRef,
        status: &mut RdpHealthStatus,
        settle: Duration,
        now: Timestamp,
    ) -> Option<Timestamp> {
        let current = status.ladder.current.as_ref()?;
        if !current.outcome_unknown {
            return None;
        }
        let started = current.started_at.0;
        if now.duration_since(started).as_secs_f64() >= UNKNOWN_OUTCOME_LIMIT.as_secs_f64() {
            return None;
        }
        let busy = match self.azure.vm_state(vm).await {
            Ok(state) => state
                .provisioning_state
                .as_deref()
                .is_some_and(|p| !matches!(p, "Succeeded" | "Failed" | "Canceled")),
            Err(_) => true,
        };
        if !busy {
            return None;
        }
        let until = now
            .checked_add(settle.max(Duration::from_secs(10)))
            .unwrap_or(now);
        let message = current.message.clone().unwrap_or_default();
        status.ladder.settle_unknown(now, until, message);
        Some(until)
    }

    pub(super) async fn execute(
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
                    guest_query: subject.spec.guest_query,
                    leadership: self.leadership.as_ref(),
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
                    let polled = poll_pending(self.azure.as_ref(), vm, ev, now).await;
                    if let Some(refused) = polled
                        .iter()
                        .find(|e| e.reason == crate::engine::gather::UNTRUSTED_OPERATION_URL)
                    {
                        set(
                            status,
                            types::OPERATION_URLS_TRUSTED,
                            Status::False,
                            refused.reason,
                            refused.note.clone(),
                            now,
                        );
                    }
                    events.extend(polled);
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
                    WaitReason::Polling
                    | WaitReason::Settling
                    | WaitReason::GuestBooting
                    | WaitReason::Backoff => Status::True,
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
            Decision::Poll if restoring_nic(status) => {
                self.poll_restore(subject, vm, status, events, now).await
            }
            Decision::AbandonRequest if restoring_nic(status) => {
                self.restore_abandoned(subject, status, events, now)
            }
            Decision::RestoreNic => self.restore_nic(subject, vm, outcome, sink, now).await?,
            Decision::KeepNicAddress(why) => self.keep_nic_address(status, events, why),
            Decision::Poll if snapshotting(status) => {
                self.poll_snapshot(subject, vm, outcome, now).await
            }
            Decision::Poll => self.poll(subject, vm, status, events, now).await,
            Decision::AbandonRequest if snapshotting(status) => self.snapshot_failed(
                subject,
                vm,
                outcome,
                "the operator stopped while requesting it; its outcome is unknown and it is not requested again".into(),
                now,
            ),
            Decision::AbandonRequest => {
                let until = now.checked_add(policy.settle_time).unwrap_or(now);
                status.ladder.settle_unknown(now, until, "the operator stopped while calling Azure; the call's outcome is unknown and it is not repeated".into());
                events.push(Event {
                    severity: Severity::Warning,
                    reason: "RemediationOutcomeUnknown",
                    note: format!("{} was interrupted while calling Azure; it is not repeated and the probe judges it after {until}", current(&status.ladder).0),
                });
                Continue::Until(until)
            }
            Decision::NotFixed => {
                if let Some(until) = self.still_busy(vm, status, policy.settle_time, now).await {
                    return Ok(Continue::Until(until));
                }
                let (step, attempt) = current(&status.ladder);
                let n = status.ladder.incident_attempts();
                let next = now
                    .checked_add(policy.backoff.delay(n, subject.seed))
                    .unwrap_or(now);
                let rung = status.ladder.current.as_ref().map(|c| c.step.rung);
                let booting = never_came_back(status, policy.settle_time);
                if let (Some(note), Some(c)) = (&booting, status.ladder.current.as_mut()) {
                    c.message = Some(note.clone());
                }
                status.ladder.not_fixed(now, next);
                self.fleet.release(&vm.subscription, subject.group, subject.key);
                if matches!(rung, Some(Rung::StartVm | Rung::RepairNsg)) {
                    // They change what the evidence says: read it again before the next step.
                    status.diagnosis = None;
                }
                events.push(Event {
                    severity: Severity::Warning,
                    reason: "RemediationNotFixed",
                    note: match booting {
                        Some(note) => format!("{step} (attempt {attempt}): {note}; next step not before {next}"),
                        None => format!("{step} (attempt {attempt}) finished but RDP is still unreachable; next step not before {next}"),
                    },
                });
                Continue::Again
            }
            Decision::WatchGuest => {
                // Whether the guest is back after a rung that restarted it: the VM agent's
                // status in the instance view. A failed read says nothing (the rung is then
                // judged by the probe alone, as without an agent).
                let ready = match self.azure.vm_state(vm).await {
                    Ok(state) => Some(state.agent_ready),
                    Err(e) => {
                        tracing::debug!(vm = %vm, error = %e, "instance view unreadable while settling");
                        None
                    }
                };
                status.ladder.guest_checked(now, ready);
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
            Decision::RestartRequired { repair, hold } => {
                self.restart_held(subject, status, events, (repair, hold), now)
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
                self.fleet.release(&vm.subscription, subject.group, subject.key);
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
                if conditions::status_of(&status.conditions, types::OPERATION_URLS_TRUSTED)
                    == Some(Status::False)
                {
                    set(
                        status,
                        types::OPERATION_URLS_TRUSTED,
                        Status::True,
                        "ArmEndpointOnly",
                        "the incident ended; operation URLs are polled only at the ARM endpoint",
                        now,
                    );
                }
                events.push(Event {
                    severity: Severity::Normal,
                    reason: "RemediationSucceeded",
                    note: match by {
                        Some(step)
                            if status.ladder.history.last().map(|r| r.step)
                                == step.repair.map(Step::restart_after) =>
                        {
                            format!(
                                "RDP is reachable again after {step} and the restart it required"
                            )
                        }
                        Some(step) => format!("RDP is reachable again after {step}"),
                        None => "RDP is reachable again without a remediation rung".into(),
                    },
                });
                Continue::Recovered(by)
            }
        })
    }
}
