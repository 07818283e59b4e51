//! `ResetNic` as the guide does it (see [`crate::ladder::nic`]): the original address is
//! read and recorded with the rung's intent before the PUT that moves the NIC; after the reset
//! is judged, the original address is checked and put back with an intent of its own, polled,
//! and settled by the probe; the operator's own NSG rules follow the address each time.

use super::messages::current;
use super::*;
use crate::{
    azure::AddressChange,
    ladder::nic::{self, NicReset, RestorePlan, RestoreState},
};

/// How long a restore waits when Azure still changes the NIC or throttled the read.
const BUSY_WAIT: Duration = Duration::from_secs(30);

fn record(status: &RdpHealthStatus) -> Option<NicReset> {
    status.ladder.current.as_ref().and_then(|c| c.nic.clone())
}

fn reachable(status: &RdpHealthStatus) -> bool {
    conditions::status_of(&status.conditions, types::REACHABLE) == Some(Status::True)
}

impl Remediator {
    /// Reads the NIC's address and picks the free one the reset moves it to; nothing is
    /// written. The rung's intent carries both before the PUT.
    pub(super) async fn plan_nic_reset(&self, vm: &VmRef) -> Result<NicReset, CallError> {
        let address = self.azure.nic_address(vm).await.map_err(CallError::Azure)?;
        let availability = self
            .azure
            .ip_availability(&address.subnet_id, &address.private_ip)
            .await
            .map_err(CallError::Azure)?;
        let new_ip = nic::new_address(&address.private_ip, &availability).ok_or_else(|| {
            CallError::Refused(format!(
                "the subnet {} has no free address to move the NIC to; nothing was sent",
                address.subnet_id
            ))
        })?;
        Ok(NicReset {
            nic_id: address.nic_id,
            subnet_id: address.subnet_id,
            original_ip: address.private_ip,
            original_allocation: address.allocation,
            new_ip,
            restore: RestoreState::Pending,
            restore_requested_at: None,
            reachable_after_reset: None,
            rules: Vec::new(),
            rules_follow: None,
            message: None,
        })
    }

    /// The reset's own call: the PUT to the recorded new address.
    pub(super) async fn reset_nic(
        &self,
        vm: &VmRef,
        record: Option<&NicReset>,
    ) -> Result<Operation, CallError> {
        let r = record.ok_or_else(|| {
            CallError::Refused("the NIC's original address was not recorded".into())
        })?;
        self.azure
            .set_nic_address(
                vm,
                &AddressChange {
                    nic_id: r.nic_id.clone(),
                    from_ip: r.original_ip.clone(),
                    to_ip: r.new_ip.clone(),
                },
            )
            .await
            .map_err(CallError::Azure)
    }

    /// The NIC could not be read before the reset: nothing was sent. Azure being busy defers
    /// the rung; anything else fails it.
    pub(super) fn nic_unread(
        &self,
        subject: &Subject<'_>,
        vm: &VmRef,
        outcome: &mut Outcome,
        error: CallError,
        now: Timestamp,
    ) -> Continue {
        let (status, events) = (&mut outcome.status, &mut outcome.events);
        match error {
            CallError::Azure(e) if refusal::not_now(&e) || e.is_retryable() => self.deferred(
                subject,
                vm,
                status,
                events,
                (&e.to_string(), e.retry_after()),
                now,
            ),
            other => {
                let message = format!(
                    "the NIC could not be prepared ({}); nothing was sent",
                    other.describe()
                );
                self.failed(subject, vm, status, events, message, now)
            }
        }
    }

    /// The address moved from `from` to `to` (the reset's or the restore's PUT succeeded):
    /// the operator's own allow rules for `from` are rewritten for `to`, nothing else. The
    /// rules are read first, so a rule already on `to` is not written again.
    pub(super) async fn rules_follow(
        &self,
        vm: &VmRef,
        (from, to): (&str, &str),
        status: &mut RdpHealthStatus,
        events: &mut Vec<Event>,
    ) {
        let rules = match self.azure.network_rules(vm).await {
            Ok(r) => r,
            Err(e) => {
                let note = format!(
                    "the NSG rules could not be read ({e}); the operator's rules for {from} were not moved to {to}"
                );
                events.push(Event {
                    severity: Severity::Warning,
                    reason: "NsgRuleNotMoved",
                    note: note.clone(),
                });
                status.ladder.nic_rules_moved(None, vec![note]);
                return;
            }
        };
        let mut notes = Vec::new();
        for own in nic::own_rules_for(&rules, &vm.name, from) {
            let (name, nsg) = (&own.rule.name, &own.nsg_id);
            let port = own
                .rule
                .destination_ports
                .first()
                .and_then(|p| p.parse::<u16>().ok());
            let written = match port {
                Some(port) => self
                    .azure
                    .put_allow_rule(
                        vm,
                        &AllowRule {
                            nsg_id: nsg.clone(),
                            name: name.clone(),
                            priority: own.rule.priority,
                            source_prefixes: own.rule.source_prefixes.clone(),
                            destination_prefix: to.to_owned(),
                            port,
                            description: crate::ladder::nsg_repair::description(),
                        },
                    )
                    .await
                    .map_err(|e| e.to_string()),
                None => Err("its destination port is not a single port".into()),
            };
            let (severity, reason, note) = match written {
                Ok(_) => (
                    Severity::Warning,
                    "NsgRuleMoved",
                    format!("rule {name} of NSG {nsg}: destination {from} → {to}"),
                ),
                Err(e) => (
                    Severity::Warning,
                    "NsgRuleNotMoved",
                    format!("rule {name} of NSG {nsg} still allows {from}, not moved to {to}: {e}"),
                ),
            };
            events.push(Event {
                severity,
                reason,
                note: note.clone(),
            });
            notes.push(note);
        }
        status.ladder.nic_rules_moved(Some(to), notes);
    }

    /// The reset's PUT succeeded: the NIC is on the new address, and so are the operator's
    /// rules.
    pub(super) async fn nic_reset_done(
        &self,
        vm: &VmRef,
        status: &mut RdpHealthStatus,
        events: &mut Vec<Event>,
    ) {
        if let Some(r) = record(status).filter(|r| r.restore == RestoreState::Pending) {
            self.rules_follow(vm, (&r.original_ip, &r.new_ip), status, events)
                .await;
        }
    }

    /// `Decision::RestoreNic`: where the NIC is now, whether its original address is free,
    /// then the intent, then the PUT back.
    pub(super) async fn restore_nic(
        &self,
        subject: &Subject<'_>,
        vm: &VmRef,
        outcome: &mut Outcome,
        sink: &dyn StatusSink,
        now: Timestamp,
    ) -> Result<Continue, RemediateError> {
        let Some(term) = self.leadership.term() else {
            return Err(RemediateError::NotLeader);
        };
        let (status, events) = (&mut outcome.status, &mut outcome.events);
        let Some(r) = record(status) else {
            return Ok(Continue::Again);
        };
        let was_reachable = reachable(status);
        let address = match self.azure.nic_address(vm).await {
            Ok(a) if !a.busy() => a,
            Ok(_) => return Ok(retry_later(status, BUSY_WAIT, now)),
            Err(e) if e.is_retryable() => {
                return Ok(retry_later(status, refusal::wait_for(e.retry_after()), now));
            }
            Err(e) => {
                let why = format!("the NIC could not be read ({e}); the address is not restored");
                return Ok(keep(
                    status,
                    events,
                    RestoreState::Failed,
                    was_reachable,
                    why,
                ));
            }
        };
        match nic::restore_plan(&r, &address) {
            RestorePlan::NotNeeded => {
                let why = format!(
                    "the NIC is on its original address {} (the reset did not move it)",
                    r.original_ip
                );
                status
                    .ladder
                    .restore_skipped(RestoreState::NotNeeded, was_reachable, why);
                return Ok(Continue::Again);
            }
            RestorePlan::Keep(why) => {
                return Ok(keep(status, events, RestoreState::Kept, was_reachable, why));
            }
            RestorePlan::CheckOriginal => {}
        }
        let free = match self
            .azure
            .ip_availability(&r.subnet_id, &r.original_ip)
            .await
        {
            Ok(a) => a.available,
            Err(e) if e.is_retryable() => {
                return Ok(retry_later(status, refusal::wait_for(e.retry_after()), now));
            }
            Err(e) => {
                let why = format!(
                    "whether {} is free could not be read ({e}); the address is not restored",
                    r.original_ip
                );
                return Ok(keep(
                    status,
                    events,
                    RestoreState::Failed,
                    was_reachable,
                    why,
                ));
            }
        };
        if !free {
            // Rules a reset of unknown outcome did not move follow the NIC where it stays.
            if r.rules_follow.as_deref() != Some(r.new_ip.as_str()) {
                self.rules_follow(vm, (&r.original_ip, &r.new_ip), status, events)
                    .await;
            }
            let why = nic::taken_message(&r);
            return Ok(keep(status, events, RestoreState::Kept, was_reachable, why));
        }
        // Intent first: the restore is in status before its PUT.
        let before = status.ladder.current.clone();
        status.ladder.restore_requested(was_reachable, now);
        if let Err(e) = sink.persist(status).await {
            status.ladder.current = before;
            return Err(RemediateError::Persist(e));
        }
        if self.leadership.term().as_ref() != Some(&term) {
            // The next leader finds the intent and settles it as of unknown outcome.
            return Err(RemediateError::NotLeader);
        }
        let change = AddressChange {
            nic_id: r.nic_id.clone(),
            from_ip: r.new_ip.clone(),
            to_ip: r.original_ip.clone(),
        };
        let (step, _) = current(&status.ladder);
        let settle = subject.spec.ladder.settle_time;
        match self.azure.set_nic_address(vm, &change).await {
            Ok(op) => {
                let first = now.checked_add(self.first_poll).unwrap_or(now);
                status.ladder.running(
                    OperationRef {
                        async_operation_url: op.async_operation.clone(),
                        location_url: op.location.clone(),
                    },
                    first,
                );
                if let Some(n) = status.ladder.current.as_mut().and_then(|c| c.nic.as_mut()) {
                    n.restore = RestoreState::Running;
                }
                events.push(Event {
                    severity: Severity::Normal,
                    reason: "NicAddressRestoring",
                    note: format!(
                        "{step}: moving the NIC back from {} to its original address {} (the VM restarts)",
                        r.new_ip, r.original_ip
                    ),
                });
                if op.completed {
                    return Ok(self.restored(vm, status, events, settle, now).await);
                }
                Ok(Continue::Until(first))
            }
            Err(e) if refusal::not_now(&e) => {
                // Refused before anything ran: decided again after Azure's wait.
                status.ladder.current = before;
                Ok(retry_later(status, refusal::wait_for(e.retry_after()), now))
            }
            Err(e @ AzureError::OutcomeUnknown { .. }) => Ok(self.restore_unknown(
                status,
                events,
                format!("{e}; Azure may be carrying it out, so it is not sent again"),
                settle,
                now,
            )),
            Err(e) => {
                let message = format!(
                    "restoring {} failed ({}: {e}); the NIC keeps {}",
                    r.original_ip,
                    e.reason(),
                    r.new_ip
                );
                Ok(restore_failed(status, events, message, now))
            }
        }
    }

    /// Polls the restore's PUT.
    pub(super) async fn poll_restore(
        &self,
        subject: &Subject<'_>,
        vm: &VmRef,
        status: &mut RdpHealthStatus,
        events: &mut Vec<Event>,
        now: Timestamp,
    ) -> Continue {
        let settle = subject.spec.ladder.settle_time;
        let Some(c) = status.ladder.current.clone() else {
            return Continue::Done;
        };
        let Some(op) = c
            .operation
            .as_ref()
            .map(|o| super::poll::operation(vm, c.step, o))
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
            Ok(PollOutcome::Succeeded { .. }) => {
                self.restored(vm, status, events, settle, now).await
            }
            Ok(PollOutcome::Failed { code, message }) => {
                let message = format!("restoring the original address failed ({code}: {message})");
                restore_failed(status, events, message, now)
            }
            Err(e) if e.is_retryable() && !matches!(e, AzureError::OutcomeUnknown { .. }) => {
                let next = now
                    .checked_add(e.retry_after().unwrap_or(BUSY_WAIT))
                    .unwrap_or(now);
                status.ladder.poll_again(next);
                Continue::Until(next)
            }
            Err(e) => self.restore_unknown(
                status,
                events,
                format!(
                    "the restore's status could not be read ({}: {e})",
                    e.reason()
                ),
                settle,
                now,
            ),
        }
    }

    /// The restore's intent was found without an operation after `requestTimeout`: the
    /// operator stopped while making the call. It is not sent again.
    pub(super) fn restore_abandoned(
        &self,
        subject: &Subject<'_>,
        status: &mut RdpHealthStatus,
        events: &mut Vec<Event>,
        now: Timestamp,
    ) -> Continue {
        self.restore_unknown(
            status,
            events,
            "the operator stopped while restoring the original address; the call's outcome is unknown and it is not repeated".into(),
            subject.spec.ladder.settle_time,
            now,
        )
    }

    /// `Decision::KeepNicAddress`: the restore is not made.
    pub(super) fn keep_nic_address(
        &self,
        status: &mut RdpHealthStatus,
        events: &mut Vec<Event>,
        why: String,
    ) -> Continue {
        let was_reachable = reachable(status);
        keep(status, events, RestoreState::Kept, was_reachable, why)
    }

    async fn restored(
        &self,
        vm: &VmRef,
        status: &mut RdpHealthStatus,
        events: &mut Vec<Event>,
        settle: Duration,
        now: Timestamp,
    ) -> Continue {
        let Some(r) = record(status) else {
            return Continue::Again;
        };
        self.rules_follow(vm, (&r.new_ip, &r.original_ip), status, events)
            .await;
        let until = now.checked_add(settle).unwrap_or(now);
        let message = format!(
            "the NIC is back on its original address {} (static); it was on {} after the reset",
            r.original_ip, r.new_ip
        );
        status
            .ladder
            .restore_ended(RestoreState::Restored, message.clone(), now, until);
        // Judge what follows on fresh probes only.
        status.recent_probes.clear();
        events.push(Event {
            severity: Severity::Normal,
            reason: "NicAddressRestored",
            note: format!("{message}; settling until {until} before judging"),
        });
        Continue::Until(until)
    }

    fn restore_unknown(
        &self,
        status: &mut RdpHealthStatus,
        events: &mut Vec<Event>,
        message: String,
        settle: Duration,
        now: Timestamp,
    ) -> Continue {
        let until = now.checked_add(settle).unwrap_or(now);
        events.push(Event {
            severity: Severity::Warning,
            reason: "RemediationOutcomeUnknown",
            note: format!("ResetNic (restore of the original address): {message}"),
        });
        status
            .ladder
            .restore_ended(RestoreState::Unknown, message, now, until);
        Continue::Until(until)
    }
}

/// The restore ends without a PUT: status and a Warning Event with both addresses.
fn keep(
    status: &mut RdpHealthStatus,
    events: &mut Vec<Event>,
    state: RestoreState,
    was_reachable: bool,
    why: String,
) -> Continue {
    events.push(Event {
        severity: Severity::Warning,
        reason: if state == RestoreState::Failed {
            "NicAddressRestoreFailed"
        } else {
            "NicAddressKept"
        },
        note: match record(status) {
            Some(r) => format!(
                "ResetNic: the NIC stays on {} instead of its original address {}: {why}",
                r.new_ip, r.original_ip
            ),
            None => why.clone(),
        },
    });
    status.ladder.restore_skipped(state, was_reachable, why);
    Continue::Again
}

/// Azure refused or failed the restore's PUT: recorded, never retried; the rung is judged.
fn restore_failed(
    status: &mut RdpHealthStatus,
    events: &mut Vec<Event>,
    message: String,
    now: Timestamp,
) -> Continue {
    events.push(Event {
        severity: Severity::Warning,
        reason: "NicAddressRestoreFailed",
        note: format!("ResetNic: {message}"),
    });
    status
        .ladder
        .restore_ended(RestoreState::Failed, message, now, now);
    Continue::Again
}

/// Azure was busy: nothing ran, the restore is decided again after `wait`.
fn retry_later(status: &mut RdpHealthStatus, wait: Duration, now: Timestamp) -> Continue {
    let next = now.checked_add(wait).unwrap_or(now);
    if let Some(c) = status.ladder.current.as_mut() {
        c.next_poll_at = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(next));
    }
    Continue::Until(next)
}
