//! The ladder's memory, kept in the object's status (never only in memory): the intent of
//! every mutating action is written here before the Azure call, so a restarted operator or a
//! new leader resumes polling instead of acting twice.

use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{
    nic::NicReset,
    rung::{Rung, Step},
    settle::GuestWatch,
    snapshot::SnapshotRecord,
};

/// How many rung records the status keeps.
pub const HISTORY_LIMIT: usize = 32;

/// A handle on an Azure long-running operation, polled across reconciles.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct OperationRef {
    /// The `Azure-AsyncOperation` URL, when ARM returned one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub async_operation_url: Option<String>,
    /// The `Location` URL, when ARM returned one (results of actions such as Run Command).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location_url: Option<String>,
}

/// Where the current rung is.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExecutionPhase {
    /// Intent recorded; the Azure call is being made. Found after a restart, it means the
    /// call's fate is unknown: the rung is never re-issued blindly.
    Requested,
    /// The Azure operation runs; it is polled at `nextPollAt`.
    Running,
    /// The operation finished; waiting `settleTime` before judging the probe.
    Settling,
    /// Intent recorded; the OS-disk snapshot that precedes the rung is being taken (its
    /// operation, once started, is in `operation`). The rung's own call is not made yet: when
    /// the snapshot is done the ladder decides again, and a snapshot that failed (or whose
    /// outcome is unknown) ends the rung as `Failed` without calling it.
    Snapshotting,
    /// An in-guest repair's changes were applied and take effect only after the VM
    /// restarts (`restart=required`): the restart follows under the `Restart` rung's rules,
    /// and until then no other rung runs.
    AwaitingRestart,
}

/// The rung in progress.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RungExecution {
    /// The step.
    pub step: Step,
    /// 1-based attempt number of this step in the current incident.
    pub attempt: u32,
    /// Where it is.
    pub phase: ExecutionPhase,
    /// When the intent was recorded.
    pub started_at: Time,
    /// The Azure operation, once the call returned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<OperationRef>,
    /// When to poll the operation next.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_poll_at: Option<Time>,
    /// When settling ends and the probe decides.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settle_until: Option<Time>,
    /// When the operation was seen finished (settling began).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Time>,
    /// For a rung that restarts the guest: what was seen of the guest while settling (it is
    /// judged only once the guest is back).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest: Option<GuestWatch>,
    /// The operation's own result message, when it reported one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Whether the call ran cannot be known (the operator stopped during the call, or the
    /// operation's status could not be read): the probe still judges it, but a rung that
    /// did not fix it is recorded `Unknown`, not `NotFixed`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub outcome_unknown: bool,
    /// The leadership term under which the intent was recorded: a replica that finds another
    /// term here knows it inherited the rung from an earlier leader.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<LeaseTerm>,
    /// The OS-disk snapshot taken before this rung (being taken, in `Snapshotting`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// The step restarts TermService on a VM that was reachable when it started (every
    /// session drops): it is disruptive although its rung is not, and holds a fleet slot.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub drops_sessions: bool,
    /// Where the guest saved the previous MachineKeys ACL before resetting it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acl_backup: Option<String>,
    /// `ResetNic`: the NIC's original address (recorded before the change), the address it
    /// moves to, and the restore of the original one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nic: Option<NicReset>,
}

impl RungExecution {
    /// Disruptive: a disruptive rung, or a step that drops the sessions of a reachable VM.
    pub fn is_disruptive(&self) -> bool {
        self.step.rung.is_disruptive() || self.drops_sessions
    }
}

/// One term of leadership over the operator's Lease.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct LeaseTerm {
    /// The Lease holder (the replica's identity); absent without leader election.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<String>,
    /// The Lease's `leaseTransitions` when the term began.
    pub transitions: i32,
}

/// How a rung ended.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum RungOutcome {
    /// The endpoint was reachable after the rung: it fixed the problem.
    Fixed,
    /// The operation succeeded but the endpoint stayed unreachable.
    NotFixed,
    /// The Azure operation failed.
    Failed,
    /// An in-guest repair was applied and needs a restart of the VM to take effect; the
    /// restart that follows is recorded as its own rung (`Restart` with the repair's name).
    Applied,
    /// The operator restarted or lost leadership while the call was being made; whether it
    /// ran is unknown, so it was not repeated.
    Unknown,
}

impl RungOutcome {
    /// The metric label (`rdphealth_remediations_total{result}`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fixed => "fixed",
            Self::NotFixed => "not_fixed",
            Self::Failed => "failed",
            Self::Applied => "applied",
            Self::Unknown => "unknown",
        }
    }
}

/// One finished rung.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RungRecord {
    /// The step.
    pub step: Step,
    /// Attempt number.
    pub attempt: u32,
    /// When it started.
    pub started_at: Time,
    /// When it ended.
    pub finished_at: Time,
    /// How it ended.
    pub outcome: RungOutcome,
    /// Detail (Azure error code and message, script result).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The OS-disk snapshot taken before the rung.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// Where the guest saved the previous MachineKeys ACL before resetting it (the backup a
    /// person restores with `icacls … /restore`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acl_backup: Option<String>,
    /// `ResetNic`: the original and the new address, and what became of the restore.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nic: Option<NicReset>,
}

/// The remediation ladder's state.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LadderStatus {
    /// When the current incident (unreachable period) began.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incident_started_at: Option<Time>,
    /// The rung in progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<RungExecution>,
    /// Earliest time of the next rung (backoff).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_action_at: Option<Time>,
    /// What DryRun would do next.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub planned: Option<Step>,
    /// Finished rungs, newest last (bounded).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<RungRecord>,
    /// Start times of ladders in the last 24 hours (`maxLaddersPerDay`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ladder_starts: Vec<Time>,
    /// When the last ladder ended (`cooldown`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_ladder_ended_at: Option<Time>,
    /// Every rung the ladder may use was tried in this incident.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub exhausted: bool,
    /// The step that fixed the last incident.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovered_by: Option<Step>,
    /// The last approval annotation value used (each value approves one rung once).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumed_approval: Option<String>,
    /// OS-disk snapshots the operator took of this VM before changing it, oldest first; those
    /// retention deleted are removed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<SnapshotRecord>,
    /// When retention last looked at this VM's snapshots (at most hourly, unless a new
    /// snapshot was just taken).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshots_pruned_at: Option<Time>,
}

fn ts(t: &Time) -> Timestamp {
    t.0
}

impl LadderStatus {
    /// Nothing recorded yet (kept out of the serialized status).
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Rung records of the current incident.
    pub fn incident_history(&self) -> impl Iterator<Item = &RungRecord> {
        let since = self.incident_started_at.as_ref().map(ts);
        self.history
            .iter()
            .filter(move |r| since.is_some_and(|s| ts(&r.started_at) >= s))
    }

    /// Attempts of `step` in the current incident (finished and in progress).
    pub fn attempts_of(&self, step: Step) -> u32 {
        let done = self.incident_history().filter(|r| r.step == step).count() as u32;
        done + u32::from(self.current.as_ref().is_some_and(|c| c.step == step))
    }

    /// Rung attempts in the current incident: the backoff index.
    pub fn incident_attempts(&self) -> u32 {
        self.incident_history().count() as u32 + u32::from(self.current.is_some())
    }

    /// Opens an incident at `now` if none is open.
    pub fn open_incident(&mut self, now: Timestamp) {
        if self.incident_started_at.is_none() {
            self.incident_started_at = Some(Time(now));
            self.exhausted = false;
            self.next_action_at = None;
            self.planned = None;
        }
    }

    /// Records the intent to run `step`, before any Azure call. A repair awaiting its restart
    /// is recorded `Applied` first: the restart that starts now is its own rung.
    pub fn start(&mut self, step: Step, now: Timestamp) {
        if self
            .current
            .as_ref()
            .is_some_and(|c| c.phase == ExecutionPhase::AwaitingRestart)
        {
            self.finish(RungOutcome::Applied, None, now, None);
        }
        if self.incident_history().next().is_none() && self.current.is_none() {
            self.ladder_starts.push(Time(now));
        }
        self.prune_ladder_starts(now);
        let attempt = self.attempts_of(step) + 1;
        self.planned = None;
        self.exhausted = false;
        self.current = Some(RungExecution {
            step,
            attempt,
            phase: ExecutionPhase::Requested,
            started_at: Time(now),
            operation: None,
            next_poll_at: None,
            settle_until: None,
            finished_at: None,
            guest: None,
            message: None,
            outcome_unknown: false,
            lease: None,
            snapshot: None,
            drops_sessions: false,
            acl_backup: None,
            nic: None,
        });
    }

    /// The Azure call returned a long-running operation to poll from `first_poll`.
    pub fn running(&mut self, operation: OperationRef, first_poll: Timestamp) {
        if let Some(c) = &mut self.current {
            c.phase = ExecutionPhase::Running;
            c.operation = Some(operation);
            c.next_poll_at = Some(Time(first_poll));
        }
    }

    /// The snapshot before the rung runs as `operation`: poll it from `first_poll` (the rung
    /// stays in `Snapshotting`).
    pub fn snapshot_running(&mut self, operation: OperationRef, first_poll: Timestamp) {
        if let Some(c) = &mut self.current {
            c.operation = Some(operation);
            c.next_poll_at = Some(Time(first_poll));
        }
    }

    /// The operation is still running; poll again at `next_poll`.
    pub fn poll_again(&mut self, next_poll: Timestamp) {
        if let Some(c) = &mut self.current {
            c.next_poll_at = Some(Time(next_poll));
        }
    }

    /// The operation finished at `now` (or the call completed synchronously): settle until
    /// `until`.
    pub fn settle(&mut self, now: Timestamp, until: Timestamp, message: Option<String>) {
        if let Some(c) = &mut self.current {
            c.phase = ExecutionPhase::Settling;
            c.next_poll_at = None;
            c.settle_until = Some(Time(until));
            c.finished_at.get_or_insert(Time(now));
            c.message = message;
        }
    }

    /// The repair's changes were applied and need a restart of the VM: no settling (nothing
    /// changes until the restart), the ladder decides the restart next.
    pub fn await_restart(&mut self, message: String) {
        if let Some(c) = &mut self.current {
            c.phase = ExecutionPhase::AwaitingRestart;
            c.next_poll_at = None;
            c.settle_until = None;
            c.message = Some(message);
        }
    }

    /// Settles a rung whose call's fate cannot be known; the probe judges it after `until`.
    pub fn settle_unknown(&mut self, now: Timestamp, until: Timestamp, message: String) {
        self.settle(now, until, Some(message));
        if let Some(c) = &mut self.current {
            c.outcome_unknown = true;
        }
    }

    /// The VM's instance view was read while the current rung settles: `agent_ready` is what
    /// it said of the VM agent (`None`: the read failed).
    pub fn guest_checked(&mut self, now: Timestamp, agent_ready: Option<bool>) {
        if let Some(watch) = self.settling_guest() {
            watch.checked_at = Some(Time(now));
            match agent_ready {
                Some(false) => watch.seen_booting = true,
                Some(true) if watch.seen_booting => {
                    watch.back_at.get_or_insert(Time(now));
                }
                _ => {}
            }
        }
    }

    /// A probe succeeded while the current rung settles: whatever the agent says, the guest
    /// is back.
    pub fn guest_answered(&mut self, now: Timestamp) {
        if let Some(watch) = self.settling_guest() {
            watch.back_at.get_or_insert(Time(now));
        }
    }

    fn settling_guest(&mut self) -> Option<&mut GuestWatch> {
        self.current
            .as_mut()
            .filter(|c| c.phase == ExecutionPhase::Settling && c.step.rung.restarts_guest())
            .map(|c| c.guest.get_or_insert_with(GuestWatch::default))
    }

    /// Ends the current rung after the probe still fails after settling: `NotFixed`, or
    /// `Unknown` when whether the call ran was never known.
    pub fn not_fixed(&mut self, now: Timestamp, next_action: Timestamp) {
        let outcome = if self.current.as_ref().is_some_and(|c| c.outcome_unknown) {
            RungOutcome::Unknown
        } else {
            RungOutcome::NotFixed
        };
        self.finish(outcome, None, now, Some(next_action));
    }

    /// Azure refused the current rung's call without running it (throttled, or another
    /// operation held the resource): the intent is dropped without counting an attempt, and
    /// the ladder decides again — on what it then sees — at `next_action`.
    pub fn defer(&mut self, next_action: Timestamp) {
        if let Some(c) = self.current.take()
            && self.incident_history().next().is_none()
        {
            // The ladder has not really started.
            self.ladder_starts.retain(|t| *t != c.started_at);
        }
        self.next_action_at = Some(Time(next_action));
    }

    /// Forgets the current rung, which never made its Azure call (its snapshot finished, or
    /// the VM recovered meanwhile), without counting an attempt: the ladder decides again.
    pub fn drop_unstarted(&mut self) {
        if let Some(c) = self.current.take()
            && self.incident_history().next().is_none()
        {
            self.ladder_starts.retain(|t| *t != c.started_at);
        }
    }

    /// The snapshot taken for `step` that its next attempt may rely on: taken in this
    /// incident for the same step, within [`REUSE_WITHIN`](super::snapshot::REUSE_WITHIN),
    /// and not yet used by a call.
    pub fn fresh_snapshot(&self, step: Step, now: Timestamp) -> Option<&SnapshotRecord> {
        let since = self.incident_started_at.as_ref().map(ts)?;
        self.snapshots.last().filter(|r| {
            r.step == step
                && !r.used
                && ts(&r.taken_at) >= since
                && now.duration_since(ts(&r.taken_at)).as_secs_f64()
                    <= super::snapshot::REUSE_WITHIN.as_secs_f64()
        })
    }

    /// Records a finished snapshot (bounded, oldest dropped first).
    pub fn snapshot_taken(&mut self, record: SnapshotRecord) {
        self.snapshots.push(record);
        if self.snapshots.len() > super::snapshot::RECORD_LIMIT {
            let extra = self.snapshots.len() - super::snapshot::RECORD_LIMIT;
            self.snapshots.drain(..extra);
        }
    }

    /// Ends the current rung with `outcome`; the next rung waits until `next_action`.
    pub fn finish(
        &mut self,
        outcome: RungOutcome,
        message: Option<String>,
        now: Timestamp,
        next_action: Option<Timestamp>,
    ) {
        if let Some(mut c) = self.current.take() {
            if outcome == RungOutcome::Failed {
                super::nic::reset_failed(c.nic.as_mut());
            }
            self.history.push(RungRecord {
                step: c.step,
                attempt: c.attempt,
                started_at: c.started_at,
                finished_at: Time(now),
                outcome,
                message: message.or(c.message),
                snapshot: c.snapshot,
                acl_backup: c.acl_backup,
                nic: c.nic,
            });
            if self.history.len() > HISTORY_LIMIT {
                let extra = self.history.len() - HISTORY_LIMIT;
                self.history.drain(..extra);
            }
        }
        self.next_action_at = next_action.map(Time);
    }

    /// The endpoint is reachable again: close the incident, crediting the rung in progress
    /// (a restart that followed a repair credits the repair).
    pub fn recover(&mut self, now: Timestamp) -> Option<Step> {
        if self
            .current
            .as_ref()
            .is_some_and(|c| c.phase == ExecutionPhase::Snapshotting)
        {
            // Only the snapshot ran: the rung never started and gets no credit.
            self.drop_unstarted();
        }
        let mut by = self.current.as_ref().map(|c| c.step.credited());
        if by.is_some() {
            self.finish(RungOutcome::Fixed, None, now, None);
        } else {
            by = self.credit_applied_repair();
        }
        if self.incident_started_at.is_some() {
            if self.incident_history().next().is_some() {
                self.last_ladder_ended_at = Some(Time(now));
            }
            self.recovered_by = by;
        }
        self.incident_started_at = None;
        self.next_action_at = None;
        self.exhausted = false;
        self.planned = None;
        by
    }

    /// A repair recorded `Applied` as the incident's last step, whose restart never started
    /// (the endpoint recovered before it, e.g. while its snapshot was taken): the repair did
    /// the work, so it becomes `Fixed` and gets the credit; no restart follows.
    fn credit_applied_repair(&mut self) -> Option<Step> {
        let since = self.incident_started_at.as_ref().map(ts)?;
        let last = self.history.last_mut()?;
        if ts(&last.started_at) < since
            || last.outcome != RungOutcome::Applied
            || last.step.rung != Rung::RepairGuest
        {
            return None;
        }
        last.outcome = RungOutcome::Fixed;
        Some(last.step)
    }

    /// Every usable rung was tried: stop until the endpoint recovers.
    pub fn exhaust(&mut self, now: Timestamp) {
        if !self.exhausted {
            self.exhausted = true;
            self.last_ladder_ended_at = Some(Time(now));
        }
    }

    /// Ladders started in the 24 hours before `now`.
    pub fn ladders_in_last_day(&self, now: Timestamp) -> usize {
        self.ladder_starts
            .iter()
            .filter(|t| now.duration_since(ts(t)).as_secs() < 86_400)
            .count()
    }

    fn prune_ladder_starts(&mut self, now: Timestamp) {
        self.ladder_starts
            .retain(|t| now.duration_since(ts(t)).as_secs() < 86_400);
    }
}
