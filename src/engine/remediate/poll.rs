//! Following a running operation until it settles or fails.

use super::*;
use super::{
    act::script_result,
    messages::{current, set},
};
use crate::{
    engine::gather::{UNTRUSTED_OPERATION_URL, untrusted_url},
    guest::changes::Restart,
};

impl Remediator {
    pub(super) async fn poll(
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
                if current.step.rung == Rung::ResetNic {
                    self.nic_reset_done(vm, status, events).await;
                }
                let until = now.checked_add(policy.settle_time).unwrap_or(now);
                let message = match result {
                    crate::azure::OperationResult::RunCommand(out) => {
                        let result = script_result(&out.stdout);
                        if let Some(c) = status.ladder.current.as_mut() {
                            c.acl_backup = result.acl_backup;
                        }
                        match (result.verdict, result.restart) {
                            // The changes take effect at boot: the restart comes next.
                            (Ok(message), Restart::Required) => {
                                return self.restart_required(status, events, message, now);
                            }
                            (Ok(message), Restart::None) => Some(message),
                            // A change failed or the applier did not finish: the rung failed,
                            // naming the change; nothing after it ran.
                            (Err(message), _) => {
                                return self.failed(subject, vm, status, events, message, now);
                            }
                        }
                    }
                    _ => None,
                };
                status.ladder.settle(now, until, message);
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
            Ok(PollOutcome::Failed { code, message }) if refusal::preempted(&code) => {
                self.preempted(subject, status, events, &format!("{code}: {message}"), now)
            }
            Ok(PollOutcome::Failed { code, message })
                if refusal::failed_for_another_operation(&code) =>
            {
                if current.step.rung == Rung::ResetPassword {
                    self.password_outcome(subject, false, events, now).await;
                }
                self.deferred(
                    subject,
                    vm,
                    status,
                    events,
                    (&format!("{code}: {message}"), None),
                    now,
                )
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
            Err(e @ AzureError::UntrustedUrl { .. }) => {
                // Never polled, never retried: the rung's fate is unknown, so it is settled
                // like any rung whose operation cannot be read, and the probe judges it.
                events.push(untrusted_url(&current.step.to_string(), &e));
                set(
                    status,
                    types::OPERATION_URLS_TRUSTED,
                    Status::False,
                    UNTRUSTED_OPERATION_URL,
                    e.to_string(),
                    now,
                );
                let until = now.checked_add(policy.settle_time).unwrap_or(now);
                status
                    .ladder
                    .settle_unknown(now, until, format!("{e}; the probe judges the rung"));
                Continue::Until(until)
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
                status.ladder.settle_unknown(now, until, message.clone());
                events.push(Event {
                    severity: Severity::Warning,
                    reason: "RemediationOutcomeUnknown",
                    note: format!("{}: {message}", current.step),
                });
                Continue::Until(until)
            }
        }
    }

    pub(super) fn failed(
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
        self.fleet
            .release(&vm.subscription, subject.group, subject.key);
        events.push(Event {
            severity: Severity::Warning,
            reason: "RemediationFailed",
            note: format!("{step} (attempt {attempt}) failed: {message}"),
        });
        Continue::Until(next)
    }
}

pub(super) fn operation(vm: &VmRef, step: Step, op: &OperationRef) -> Operation {
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
