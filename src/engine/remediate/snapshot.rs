//! Snapshot before change: the OS-disk snapshot that precedes every in-guest write and every
//! disruptive rung, with the same discipline as the rung's own call — intent (phase
//! `Snapshotting`, the snapshot's id) stored before the PUT, leadership asked right before
//! it, a PUT of unknown outcome never sent again — and the retention that deletes the
//! operator's old snapshots (only those it tagged as its own).
//!
//! When the snapshot is done the rung's intent is dropped without counting an attempt and the
//! ladder decides again, so every gate (pause, breakers, windows, the fleet slot) is asked
//! again before the rung's own call; that call then relies on the fresh snapshot. When the
//! snapshot fails, the rung ends `Failed` without its call.

use super::messages::{current, set};
use super::*;
use crate::{
    azure::SnapshotRequest,
    ladder::{ExecutionPhase, snapshot},
    ladder::{Mode, snapshot::SnapshotRecord},
};

impl Remediator {
    /// Stores the intent (phase `Snapshotting`, the snapshot's id), then asks Azure for the
    /// snapshot. The rung's own call waits until it is done.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn take_snapshot(
        &self,
        subject: &Subject<'_>,
        vm: &VmRef,
        step: Step,
        term: &LeaseTerm,
        outcome: &mut Outcome,
        sink: &dyn StatusSink,
        now: Timestamp,
    ) -> Result<Continue, RemediateError> {
        let status = &mut outcome.status;
        let name = snapshot::name(&vm.name, now);
        let id = snapshot::id(&vm.subscription, &vm.resource_group, &name);
        if let Some(c) = status.ladder.current.as_mut() {
            c.phase = ExecutionPhase::Snapshotting;
            c.snapshot = Some(id.clone());
        }
        set(
            status,
            types::REMEDIATING,
            Status::True,
            "TakingSnapshot",
            format!("taking snapshot {name} of the OS disk before {step}"),
            now,
        );
        self.store_intent(subject, vm, term, status, sink).await?;
        let request = SnapshotRequest {
            name,
            tags: snapshot::tags(&vm.name, step),
        };
        match self.azure.create_os_disk_snapshot(vm, &request).await {
            Ok(op) => {
                let first = now.checked_add(self.first_poll).unwrap_or(now);
                outcome.status.ladder.snapshot_running(
                    OperationRef {
                        async_operation_url: op.async_operation.clone(),
                        location_url: op.location.clone(),
                    },
                    first,
                );
                if op.completed {
                    return Ok(self.snapshot_done(subject, vm, outcome, now).await);
                }
                Ok(Continue::Until(first))
            }
            Err(e) if refusal::not_now(&e) => Ok(self.deferred(
                subject,
                vm,
                &mut outcome.status,
                &mut outcome.events,
                (&e.to_string(), e.retry_after()),
                now,
            )),
            Err(e @ AzureError::OutcomeUnknown { .. }) => Ok(self.snapshot_failed(
                subject,
                vm,
                outcome,
                format!("{e}; whether Azure took it is unknown, so it is not requested again"),
                now,
            )),
            Err(e) => {
                Ok(self.snapshot_failed(subject, vm, outcome, format!("{}: {e}", e.reason()), now))
            }
        }
    }

    /// Polls the snapshot's operation.
    pub(super) async fn poll_snapshot(
        &self,
        subject: &Subject<'_>,
        vm: &VmRef,
        outcome: &mut Outcome,
        now: Timestamp,
    ) -> Continue {
        let Some(op) = outcome.status.ladder.current.as_ref().and_then(|c| {
            let handle = c.operation.as_ref()?;
            Some(Operation {
                kind: OperationKind::Snapshot,
                ..super::poll::operation(vm, c.step, handle)
            })
        }) else {
            return Continue::Done;
        };
        match self.azure.poll(&op).await {
            Ok(PollOutcome::Pending { retry_after }) => {
                let next = now
                    .checked_add(retry_after.max(Duration::from_secs(1)))
                    .unwrap_or(now);
                outcome.status.ladder.poll_again(next);
                Continue::Until(next)
            }
            Ok(PollOutcome::Succeeded { .. }) => {
                self.snapshot_done(subject, vm, outcome, now).await
            }
            Ok(PollOutcome::Failed { code, message }) => {
                self.snapshot_failed(subject, vm, outcome, format!("{code}: {message}"), now)
            }
            Err(e @ AzureError::UntrustedUrl { .. }) => {
                let step = current(&outcome.status.ladder).0;
                outcome
                    .events
                    .push(crate::engine::gather::untrusted_url(&step, &e));
                set(
                    &mut outcome.status,
                    types::OPERATION_URLS_TRUSTED,
                    Status::False,
                    crate::engine::gather::UNTRUSTED_OPERATION_URL,
                    e.to_string(),
                    now,
                );
                self.snapshot_failed(subject, vm, outcome, e.to_string(), now)
            }
            Err(e) if e.is_retryable() => {
                let next = now
                    .checked_add(e.retry_after().unwrap_or(Duration::from_secs(30)))
                    .unwrap_or(now);
                outcome.status.ladder.poll_again(next);
                Continue::Until(next)
            }
            Err(e) => self.snapshot_failed(
                subject,
                vm,
                outcome,
                format!(
                    "the snapshot's operation could not be read ({}: {e})",
                    e.reason()
                ),
                now,
            ),
        }
    }

    /// The snapshot exists: record it, drop the rung's intent without counting an attempt
    /// (its call was not made) and let the ladder decide again; prune old snapshots.
    async fn snapshot_done(
        &self,
        subject: &Subject<'_>,
        vm: &VmRef,
        outcome: &mut Outcome,
        now: Timestamp,
    ) -> Continue {
        let status = &mut outcome.status;
        let Some(c) = status.ladder.current.clone() else {
            return Continue::Done;
        };
        let id = c.snapshot.clone().unwrap_or_default();
        status.ladder.snapshot_taken(SnapshotRecord {
            id: id.clone(),
            taken_at: c.started_at.clone(),
            step: c.step,
            used: false,
        });
        status.ladder.drop_unstarted();
        let message = format!(
            "snapshot {id} of the OS disk taken at {} before {}",
            c.started_at.0, c.step
        );
        set(
            status,
            types::OS_DISK_SNAPSHOT,
            Status::True,
            "SnapshotTaken",
            message.clone(),
            now,
        );
        outcome.events.push(Event {
            severity: Severity::Normal,
            reason: "SnapshotTaken",
            note: message,
        });
        self.prune_snapshots(subject, vm, outcome, now).await;
        Continue::Again
    }

    /// The snapshot failed, or its outcome cannot be known: the rung does not start.
    pub(super) fn snapshot_failed(
        &self,
        subject: &Subject<'_>,
        vm: &VmRef,
        outcome: &mut Outcome,
        why: String,
        now: Timestamp,
    ) -> Continue {
        let (step, _) = current(&outcome.status.ladder);
        let message = format!("not started: the OS-disk snapshot before it failed ({why})");
        for type_ in [types::OS_DISK_SNAPSHOT, types::REMEDIATING] {
            set(
                &mut outcome.status,
                type_,
                Status::False,
                "SnapshotFailed",
                format!("{step} {message}"),
                now,
            );
        }
        outcome.events.push(Event {
            severity: Severity::Warning,
            reason: "SnapshotFailed",
            note: format!("{step} {message}"),
        });
        self.failed(
            subject,
            vm,
            &mut outcome.status,
            &mut outcome.events,
            message,
            now,
        )
    }

    /// Retention when status shows a snapshot past the policy and it was not looked at in
    /// the last hour (right after a new snapshot it always runs).
    pub(super) async fn prune_if_due(
        &self,
        subject: &Subject<'_>,
        vm: &VmRef,
        outcome: &mut Outcome,
        now: Timestamp,
    ) {
        let policy = &subject.spec.ladder;
        let ladder = &outcome.status.ladder;
        let looked_recently = ladder.snapshots_pruned_at.as_ref().is_some_and(|t| {
            now.duration_since(t.0).as_secs_f64() < snapshot::PRUNE_RETRY.as_secs_f64()
        });
        if policy.mode == Mode::Auto
            && subject.leader
            && !looked_recently
            && snapshot::prune_due(&ladder.snapshots, &policy.snapshots, now)
        {
            self.prune_snapshots(subject, vm, outcome, now).await;
        }
    }

    /// Lists the resource group's snapshots and deletes the operator's own ones of this VM
    /// that the policy no longer keeps (never one it did not tag, never the one a rung in
    /// flight relies on). Deletes are idempotent; leadership is asked before each.
    async fn prune_snapshots(
        &self,
        subject: &Subject<'_>,
        vm: &VmRef,
        outcome: &mut Outcome,
        now: Timestamp,
    ) {
        let policy = subject.spec.ladder.snapshots;
        let status = &mut outcome.status;
        status.ladder.snapshots_pruned_at =
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now));
        let listed = match self.azure.list_snapshots(vm).await {
            Ok(l) => l,
            Err(e) => {
                outcome.events.push(Event {
                    severity: Severity::Warning,
                    reason: "SnapshotRetentionFailed",
                    note: format!(
                        "could not list the snapshots of group {}: {e}",
                        vm.resource_group
                    ),
                });
                return;
            }
        };
        let protect = status
            .ladder
            .current
            .as_ref()
            .and_then(|c| c.snapshot.as_deref())
            .map(|id| id.rsplit('/').next().unwrap_or(id).to_owned());
        let doomed = snapshot::expired(&listed, &vm.name, &policy, protect.as_deref(), now);
        let mut deleted = Vec::new();
        for name in doomed {
            if self.leadership.term().is_none() {
                break;
            }
            match self.azure.delete_snapshot(vm, &name).await {
                Ok(()) => deleted.push(name),
                Err(e) => {
                    outcome.events.push(Event {
                        severity: Severity::Warning,
                        reason: "SnapshotRetentionFailed",
                        note: format!("could not delete snapshot {name}: {e}"),
                    });
                    break;
                }
            }
        }
        let present = |name: &str| {
            listed.iter().any(|s| s.name.eq_ignore_ascii_case(name))
                && !deleted.iter().any(|d| d.eq_ignore_ascii_case(name))
        };
        status.ladder.snapshots.retain(|r| present(r.name()));
        if !deleted.is_empty() {
            outcome.events.push(Event {
                severity: Severity::Normal,
                reason: "SnapshotsDeleted",
                note: format!(
                    "retention (keep {}, at most {} days) deleted the operator's snapshots {}",
                    policy.keep,
                    policy.max_age.as_secs() / 86_400,
                    deleted.join(", ")
                ),
            });
        }
    }
}
