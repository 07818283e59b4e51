//! `ResetNic` as the "reset network interface" guide does it: the NIC's original private
//! address is recorded in status before the change, the NIC is moved to another free static
//! address (Azure re-initialises it and the VM restarts), and once the reset has been judged
//! the original address is put back — when it is still free — so that DNS records,
//! allow-lists and the operator's own NSG rules that point at it keep working. The operator's
//! NSG rules (`rdphealth-allow-rdp-<vm>`) follow the address both ways; no other rule is
//! touched. Pure: the engine reads the NIC, asks Azure and records what it saw here.

use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{
    decide::{Mode, Situation},
    nsg_repair::rule_name,
    rung::Rung,
    status::{ExecutionPhase, LadderStatus, RungExecution},
    verdict::{Decision, Suspension, WaitReason},
};
use crate::azure::{IpAvailability, NetworkRules, NicAddress, SecurityRule};

/// Where the restore of the original address is.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RestoreState {
    /// The reset has not been judged yet; the restore follows its judgement.
    #[default]
    Pending,
    /// Intent recorded; the PUT back to the original address is being made. Found after a
    /// restart, its fate is unknown and it is never sent again.
    Requested,
    /// The PUT back runs in Azure (it is the rung's `operation`).
    Running,
    /// The NIC is back on its original address.
    Restored,
    /// The NIC keeps the new address (the original one was taken, the NIC was moved by
    /// someone else, or remediation stopped acting); the message says why.
    Kept,
    /// Nothing to restore: the NIC is on its original address (the reset did not move it).
    NotNeeded,
    /// Azure refused or failed the restore; it is not retried.
    Failed,
    /// Whether the restore ran cannot be known; it is not sent again.
    Unknown,
}

impl RestoreState {
    /// The restore's intent is recorded and its call made or running.
    pub fn in_flight(self) -> bool {
        matches!(self, Self::Requested | Self::Running)
    }
}

/// What the operator recorded of the NIC before moving it, and what became of the restore
/// (`status.ladder.current.nic`, then the rung's history record).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct NicReset {
    /// The NIC.
    pub nic_id: String,
    /// Its subnet (where address availability is asked).
    pub subnet_id: String,
    /// The private address before the reset.
    pub original_ip: String,
    /// Its allocation method before the reset (`Static` or `Dynamic`).
    pub original_allocation: String,
    /// The free address the reset moves the NIC to.
    pub new_ip: String,
    /// Where the restore is.
    #[serde(default)]
    pub restore: RestoreState,
    /// When the restore's intent was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_requested_at: Option<Time>,
    /// Whether RDP answered after the reset, before the restore (its judgement).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reachable_after_reset: Option<bool>,
    /// The operator's NSG rules moved with the address (and failures to move them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<String>,
    /// The address the operator's NSG rules were last made to follow (their rules for the
    /// other address were looked for and rewritten).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rules_follow: Option<String>,
    /// What happened to the restore, for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// The free address the reset moves the NIC to: the first one Azure suggests that is not the
/// current one.
pub fn new_address(current: &str, availability: &IpAvailability) -> Option<String> {
    availability.free.iter().find(|ip| *ip != current).cloned()
}

/// What to do about the original address, given where the NIC is now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RestorePlan {
    /// The NIC is on its original address already.
    NotNeeded,
    /// Leave the NIC where it is, for this reason.
    Keep(String),
    /// The NIC is on the reset's address: ask whether the original one is still free.
    CheckOriginal,
}

/// Compares the NIC as it is now with what was recorded before the reset.
pub fn restore_plan(record: &NicReset, now: &NicAddress) -> RestorePlan {
    if !now.nic_id.eq_ignore_ascii_case(&record.nic_id) {
        return RestorePlan::Keep(format!(
            "the VM's primary NIC is now {}, not {}; nothing is changed",
            now.nic_id, record.nic_id
        ));
    }
    if now.private_ip == record.original_ip {
        return RestorePlan::NotNeeded;
    }
    if now.private_ip != record.new_ip {
        return RestorePlan::Keep(format!(
            "the NIC is on {}, neither its original address {} nor the reset's {}: someone else moved it, so it is left there",
            now.private_ip, record.original_ip, record.new_ip
        ));
    }
    RestorePlan::CheckOriginal
}

/// The message when the original address is no longer free.
pub fn taken_message(record: &NicReset) -> String {
    format!(
        "the original address {} is no longer free in the subnet: the NIC keeps {}; update anything that points at {} (DNS, allow-lists)",
        record.original_ip, record.new_ip, record.original_ip
    )
}

/// The reset itself failed (Azure refused or failed its PUT): the NIC was not moved, so
/// there is nothing to restore.
pub fn reset_failed(record: Option<&mut NicReset>) {
    if let Some(n) = record.filter(|n| n.restore == RestoreState::Pending) {
        n.restore = RestoreState::NotNeeded;
        n.message = Some("the reset failed in Azure: the NIC was not moved".into());
    }
}

/// The current rung is a NIC reset whose restore is due: it was judged (settled, or RDP
/// answered) and the restore has not started.
pub fn restore_due(c: &RungExecution) -> bool {
    c.step.rung == Rung::ResetNic
        && c.phase == ExecutionPhase::Settling
        && c.nic
            .as_ref()
            .is_some_and(|n| n.restore == RestoreState::Pending)
}

/// The current rung's operation is the restore's (its intent, its PUT, its poll).
pub fn restoring(c: &RungExecution) -> bool {
    c.step.rung == Rung::ResetNic && c.nic.as_ref().is_some_and(|n| n.restore.in_flight())
}

/// The restore ran and its guest still settles: it is judged after `settleTime` like the
/// reset, even while RDP answers (the VM restarts with the re-initialised NIC).
pub fn restore_settling(c: &RungExecution, now: Timestamp) -> Option<Timestamp> {
    let restored = c
        .nic
        .as_ref()
        .is_some_and(|n| n.restore == RestoreState::Restored);
    let until = c.settle_until.as_ref()?.0;
    (restored && c.phase == ExecutionPhase::Settling && until > now).then_some(until)
}

/// When the current call's intent was recorded: the restore's, while it is in flight.
pub fn requested_at(c: &RungExecution) -> Timestamp {
    match c.nic.as_ref().and_then(|n| n.restore_requested_at.as_ref()) {
        Some(t) if restoring(c) => t.0,
        _ => c.started_at.0,
    }
}

/// The decision for a due restore. It changes the VM as the reset did (the VM restarts), under
/// the permission the reset had in this incident, and under every hold a disruptive rung
/// obeys now: the pause annotation, a blind observer, the maintenance window, the storm
/// breaker, leadership. The rung keeps its fleet slot meanwhile. Outside `Auto` nothing is
/// written: the NIC keeps the new address and the status says so.
pub(super) fn restore(s: &Situation<'_>, c: &RungExecution) -> Decision {
    if s.policy.mode != Mode::Auto {
        return Decision::KeepNicAddress(
            "remediation.mode is no longer Auto, so the original address is not restored".into(),
        );
    }
    if let Some(retry) = c.next_poll_at.as_ref().filter(|t| t.0 > s.now) {
        // Azure was busy when the restore was tried: nothing ran, try again then.
        return Decision::Wait {
            until: retry.0,
            reason: WaitReason::Polling,
        };
    }
    if s.gates.paused {
        return Decision::Suspended(Suspension::Paused);
    }
    if let Some(blind) = s.gates.blind {
        return Decision::Suspended(blind);
    }
    if !s.policy.windows.is_empty() && !s.policy.windows.iter().any(|w| w.contains(s.now)) {
        return Decision::Suspended(Suspension::OutsideMaintenanceWindow);
    }
    if s.gates.storm {
        return Decision::Suspended(Suspension::Storm);
    }
    if !s.gates.leader {
        return Decision::Suspended(Suspension::NotLeader);
    }
    Decision::RestoreNic
}

/// One of the operator's NSG rules that points at an address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnRule {
    /// The NSG.
    pub nsg_id: String,
    /// The rule as Azure shows it.
    pub rule: SecurityRule,
}

/// The operator's own allow rules for `vm` (named by [`rule_name`], inbound, allowing) in the
/// subnet's and the NIC's NSGs whose destination is exactly `address` (`a.b.c.d` or
/// `a.b.c.d/32`). Rules the operator did not write, and its rules for other destinations, are
/// never returned.
pub fn own_rules_for(rules: &NetworkRules, vm: &str, address: &str) -> Vec<OwnRule> {
    let name = rule_name(vm);
    let host = format!("{address}/32");
    [rules.subnet_nsg.as_ref(), rules.nic_nsg.as_ref()]
        .into_iter()
        .flatten()
        .flat_map(|nsg| {
            nsg.rules
                .iter()
                .filter(|r| {
                    !r.default_rule
                        && r.name.eq_ignore_ascii_case(&name)
                        && r.inbound
                        && r.allow
                        && matches!(r.destination_prefixes.as_slice(), [d] if *d == address || *d == host)
                })
                .map(|r| OwnRule {
                    nsg_id: nsg.id.clone(),
                    rule: r.clone(),
                })
        })
        .collect()
}

impl LadderStatus {
    fn nic_mut(&mut self) -> Option<&mut NicReset> {
        self.current.as_mut().and_then(|c| c.nic.as_mut())
    }

    /// The restore's intent, recorded before its PUT: the rung's execution starts over for
    /// it (phase `Requested`; its operation, settling and guest watch are the restore's
    /// from now on). `reachable` is the reset's judgement.
    pub fn restore_requested(&mut self, reachable: bool, now: Timestamp) {
        if let Some(c) = self.current.as_mut() {
            c.phase = ExecutionPhase::Requested;
            c.operation = None;
            c.next_poll_at = None;
            c.settle_until = None;
            c.finished_at = None;
            c.guest = None;
        }
        if let Some(n) = self.nic_mut() {
            n.restore = RestoreState::Requested;
            n.restore_requested_at = Some(Time(now));
            n.reachable_after_reset = Some(reachable);
        }
    }

    /// The restore ended without a PUT (`NotNeeded`, `Kept`): the rung is judged as it
    /// was, on what the probe says.
    pub fn restore_skipped(&mut self, state: RestoreState, reachable: bool, message: String) {
        if let Some(n) = self.nic_mut() {
            n.restore = state;
            n.reachable_after_reset = Some(reachable);
            n.message = Some(message);
        }
    }

    /// The restore's PUT ended as `state` (`Restored`, `Failed`, `Unknown`): the rung settles
    /// until `until`, then the probe judges it.
    pub fn restore_ended(
        &mut self,
        state: RestoreState,
        message: String,
        now: Timestamp,
        until: Timestamp,
    ) {
        if let Some(n) = self.nic_mut() {
            n.restore = state;
            n.message = Some(message);
        }
        if let Some(c) = self.current.as_mut() {
            c.phase = ExecutionPhase::Settling;
            c.next_poll_at = None;
            c.settle_until = Some(Time(until));
            c.finished_at.get_or_insert(Time(now));
        }
    }

    /// Records what happened to the operator's NSG rules when the address moved to `to`
    /// (`None`: they could not be read).
    pub fn nic_rules_moved(&mut self, to: Option<&str>, notes: Vec<String>) {
        if let Some(n) = self.nic_mut() {
            n.rules.extend(notes);
            if let Some(to) = to {
                n.rules_follow = Some(to.to_owned());
            }
        }
    }
}

#[cfg(test)]
#[path = "nic_tests.rs"]
mod tests;
