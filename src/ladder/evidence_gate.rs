//! Evidence that blocks or redirects the ladder before any generic rung: a stopped VM, a
//! platform problem, an NSG that denies the prober, what the in-guest query found (another
//! program on the RDP port, a changed port, Connection Broker errors), a busy guest.

use super::{
    decide::{Mode, Situation, add, agent_ok, gated_special},
    rung::{GuestRepair, Rung, Step},
    verdict::{Blocker, Decision, WaitReason},
};
use crate::evidence::{
    Evidence, NsgEvidence, guest::GuestScenario, nsg::Access, serial::BootSignal,
};

/// Evidence that blocks or redirects the ladder before any generic rung.
pub(super) fn evidence_gate(s: &Situation<'_>, e: &Evidence) -> Option<Decision> {
    let refresh = add(e.gathered_at.0, s.policy.evidence_refresh);
    if e.power_state.is_some_and(|p| p.is_down()) {
        return Some(if s.policy.allow_start && s.policy.mode != Mode::Observe {
            gated_special(s, Step::rung(Rung::StartVm))
        } else {
            Decision::Blocked(Blocker::VmNotRunning)
        });
    }
    if e.resource_health
        .as_ref()
        .is_some_and(|r| r.is_platform_problem())
    {
        return Some(Decision::Wait {
            until: refresh,
            reason: WaitReason::PlatformIssue,
        });
    }
    if e.nsg.as_ref().is_some_and(|n| n.closed_public_ip) {
        // No NSG to add a rule to: creating one is a person's decision.
        return Some(Decision::Blocked(Blocker::PublicIpClosed));
    }
    if let Some(nsg) = &e.nsg
        && nsg.trusted_access() == Access::Deny
    {
        return Some(if s.policy.nsg_repair && s.policy.mode != Mode::Observe {
            gated_special(s, Step::rung(Rung::RepairNsg))
        } else {
            Decision::Blocked(nsg_blocker(nsg))
        });
    }
    for scenario in e.guest_scenarios() {
        let blocker = match scenario {
            GuestScenario::PortTakenByOtherProgram => Blocker::PortTakenByOtherProgram,
            GuestScenario::PortChanged => match port_changed(s, e) {
                Some(d) => return Some(d),
                None => continue,
            },
            GuestScenario::ConnectionBroker => Blocker::ConnectionBroker,
            _ => continue,
        };
        return Some(Decision::Blocked(blocker));
    }
    if e.serial
        .as_ref()
        .and_then(|sc| sc.latest)
        .is_some_and(BootSignal::guest_is_busy)
    {
        return Some(Decision::Wait {
            until: refresh,
            reason: WaitReason::GuestBusy,
        });
    }
    None
}

/// The listener is configured for another port than the probed one: reported with both
/// ports, or, with `restoreRdpPort`, repaired in the guest (which needs the VM agent).
fn port_changed(s: &Situation<'_>, e: &Evidence) -> Option<Decision> {
    let probed = e.rdp_port?;
    let configured = e
        .guest
        .as_ref()?
        .registry
        .get("PortNumber")?
        .parse::<u16>()
        .ok()?;
    let step = Step::repair(GuestRepair::RestoreRdpPort);
    let repairable = s.policy.restore_rdp_port
        && s.policy.mode != Mode::Observe
        && s.policy.ladder.contains(&Rung::RepairGuest)
        && agent_ok(e, Rung::RepairGuest);
    Some(if repairable {
        gated_special(s, step)
    } else {
        Decision::Blocked(Blocker::PortChanged { configured, probed })
    })
}

/// The rule that denies the prober: the local verdict's when it denies too (it names the NSG
/// and its level), else IP flow verify's.
fn nsg_blocker(nsg: &NsgEvidence) -> Blocker {
    match (nsg.verdict.denying_rule(), &nsg.ip_flow_verify) {
        (Some(d), _) => Blocker::NsgDenied {
            level: d.level.to_string(),
            nsg: d.nsg.clone(),
            rule: d.rule.clone(),
        },
        (None, Some(flow)) => Blocker::NsgDenied {
            level: "effective".into(),
            nsg: "(per IP flow verify)".into(),
            rule: flow.rule.clone(),
        },
        (None, None) => Blocker::NsgDenied {
            level: String::new(),
            nsg: String::new(),
            rule: String::new(),
        },
    }
}
