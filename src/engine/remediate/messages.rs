//! Conditions and the wording of status messages and Events.

use super::*;

pub(super) fn current(ladder: &LadderStatus) -> (String, u32) {
    ladder
        .current
        .as_ref()
        .map_or(("no rung".into(), 0), |c| (c.step.to_string(), c.attempt))
}

pub(super) fn names(rungs: &[Rung]) -> String {
    rungs
        .iter()
        .map(|r| r.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

pub(super) fn refresh_at(status: &RdpHealthStatus, refresh: Duration, now: Timestamp) -> Timestamp {
    status
        .diagnosis
        .as_ref()
        .and_then(|d| d.gathered_at.0.checked_add(refresh).ok())
        .filter(|t| *t > now)
        .unwrap_or_else(|| now.checked_add(refresh).unwrap_or(now))
}

pub(super) fn set(
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

pub(super) fn clear_suspension(status: &mut RdpHealthStatus, now: Timestamp) {
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

pub(super) fn wait_message(reason: WaitReason, until: Timestamp) -> String {
    match reason {
        WaitReason::Backoff => format!("backing off until {until}"),
        WaitReason::Polling => format!("Azure operation running; next poll at {until}"),
        WaitReason::Settling => format!("operation finished; settling until {until}"),
        WaitReason::GuestBooting => format!(
            "settleTime has passed but the guest has not come back (VM agent not Ready since the operation finished): the rung is judged once it is back, never escalated while it boots; next look at {until}"
        ),
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

pub(super) fn suspension_message(s: Suspension) -> String {
    match s {
        Suspension::Paused => "the rdphealth.io/pause annotation holds remediation".into(),
        Suspension::Storm => "too many VMs of this subscription are unreachable at once: disruptive rungs are suspended (storm breaker)".into(),
        Suspension::OutsideMaintenanceWindow => "disruptive rungs wait for a maintenance window".into(),
        Suspension::NotLeader => "another replica holds the lease and acts".into(),
        Suspension::FleetBreaker => "too many VMs of all subscriptions became unreachable within a short window: the operator's own view is suspect, so every rung is held (fleet-wide breaker)".into(),
        Suspension::CanaryDown => "the canary endpoint (--canary) fails: the operator's prober may be blind, so every rung is held".into(),
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
    if ev.guest.is_some() {
        let scenarios: Vec<&str> = ev.guest_scenarios().iter().map(|s| s.as_str()).collect();
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
