//! The fleet's status from its tally and its last discovery. Pure.

use k8s_openapi::jiff::Timestamp;

use super::{member::Tally, policy::MemberPolicy};
use crate::{
    api::{DiscoveryStatus, RdpHealthFleet, RdpHealthFleetStatus, fleet_conditions as fc},
    engine::{Desired, Status, conditions},
};

/// The status to write: counts and lists from `tally`, `Valid` from the policy, `Discovered`
/// from the last discovery. Conditions keep their `lastTransitionTime` from `previous` unless
/// their status flips.
pub fn fleet_status(
    fleet: &RdpHealthFleet,
    policy: &Result<MemberPolicy, String>,
    tally: &Tally,
    discovery: Option<&DiscoveryStatus>,
    previous: Option<&RdpHealthFleetStatus>,
) -> RdpHealthFleetStatus {
    let generation = fleet.metadata.generation;
    let mut conditions_now = previous.map(|p| p.conditions.clone()).unwrap_or_default();
    let now = Timestamp::now();
    let valid = match policy {
        Ok(_) => Desired::new(
            fc::VALID,
            Status::True,
            fc::SPEC_VALID,
            "the fleet's spec is valid",
        ),
        Err(e) => Desired::new(fc::VALID, Status::False, fc::INVALID_SPEC, e.clone()),
    };
    conditions::merge(&mut conditions_now, valid, generation, now);
    let discovered = match discovery {
        None => Desired::new(
            fc::DISCOVERED,
            Status::Unknown,
            fc::DISCOVERY_PENDING,
            "no discovery finished yet",
        ),
        Some(d) => match &d.error {
            None => Desired::new(
                fc::DISCOVERED,
                Status::True,
                fc::DISCOVERY_SUCCEEDED,
                format!(
                    "{} VMs found with {} Resource Graph requests",
                    tally.members, d.requests
                ),
            ),
            Some(e) => Desired::new(
                fc::DISCOVERED,
                Status::False,
                fc::DISCOVERY_FAILED,
                match &d.last_success {
                    Some(t) => format!("{e}; keeping the membership discovered at {}", t.0),
                    None => format!("{e}; no membership known yet"),
                },
            ),
        },
    };
    conditions::merge(&mut conditions_now, discovered, generation, now);
    conditions::stamp_generation(&mut conditions_now, generation);
    RdpHealthFleetStatus {
        observed_generation: generation,
        conditions: conditions_now,
        members: tally.members,
        reachable: tally.reachable,
        unreachable: tally.unreachable,
        pending: tally.pending,
        incidents: tally.incidents,
        skipped: tally.skipped,
        failures_by_reason: tally.failures_by_reason.clone(),
        discovery: discovery.cloned(),
        worst: tally.worst.clone(),
        skipped_members: tally.skipped_members.clone(),
    }
}
