//! Tables for the NIC reset's restore: when it is due, which gates hold it, where the NIC
//! is, and which NSG rules follow the address.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use rstest::rstest;

use super::*;
use crate::{
    azure::{Endpoint, NsgRules, RuleProtocol},
    ladder::{
        OperationRef, Reachability, RungOutcome, Step,
        tests::{Case, at},
    },
};

const NIC: &str =
    "/subscriptions/s/resourceGroups/g/providers/Microsoft.Network/networkInterfaces/vm-1-nic";

fn record() -> NicReset {
    NicReset {
        nic_id: NIC.into(),
        subnet_id: "/subscriptions/s/resourceGroups/g/providers/Microsoft.Network/virtualNetworks/v/subnets/s".into(),
        original_ip: "10.0.0.10".into(),
        original_allocation: "Dynamic".into(),
        new_ip: "10.0.0.5".into(),
        restore: RestoreState::Pending,
        restore_requested_at: None,
        reachable_after_reset: None,
        rules: vec![],
        rules_follow: None,
        message: None,
    }
}

/// An incident in which ResetNic ran (intent at 20, operation done at 30) and settled until 40.
fn reset_settled() -> Case {
    let mut case = Case::new();
    case.policy.settle_time = std::time::Duration::from_secs(10);
    case.ladder.start(Step::rung(Rung::ResetNic), at(20));
    case.ladder.current.as_mut().unwrap().nic = Some(record());
    case.ladder.running(
        OperationRef {
            async_operation_url: Some("http://arm/op/1".into()),
            location_url: None,
        },
        at(25),
    );
    case.ladder.settle(at(30), at(40), None);
    // The guest was seen back after the restart.
    case.ladder.guest_checked(at(31), Some(false));
    case.ladder.guest_checked(at(33), Some(true));
    case.now = at(100);
    case
}

fn restore_state(case: &Case) -> RestoreState {
    case.ladder
        .current
        .as_ref()
        .unwrap()
        .nic
        .as_ref()
        .unwrap()
        .restore
}

#[rstest]
#[case::not_fixed_restores_before_the_ladder_moves_on(|_: &mut Case| {}, Decision::RestoreNic)]
#[case::fixed_restores_too(|c: &mut Case| c.reachability = Reachability::Reachable, Decision::RestoreNic)]
#[case::still_settling(|c: &mut Case| c.now = at(35), Decision::Wait { until: at(43), reason: WaitReason::Settling })]
#[case::undecided_reachability_waits(|c: &mut Case| c.reachability = Reachability::Unknown, Decision::Undecided)]
#[case::paused(|c: &mut Case| c.gates.paused = true, Decision::Suspended(Suspension::Paused))]
#[case::blind(|c: &mut Case| c.gates.blind = Some(Suspension::CanaryDown), Decision::Suspended(Suspension::CanaryDown))]
#[case::storm(|c: &mut Case| c.gates.storm = true, Decision::Suspended(Suspension::Storm))]
#[case::not_leader(|c: &mut Case| c.gates.leader = false, Decision::Suspended(Suspension::NotLeader))]
#[case::its_own_fleet_slot(|c: &mut Case| c.gates.disruptive_slot_free = false, Decision::RestoreNic)]
#[case::the_resets_permission(|c: &mut Case| c.policy.allowed_disruptive.clear(), Decision::RestoreNic)]
#[case::observe_writes_nothing(|c: &mut Case| c.policy.mode = Mode::Observe, Decision::KeepNicAddress("remediation.mode is no longer Auto, so the original address is not restored".into()))]
#[case::azure_busy_waits(|c: &mut Case| c.ladder.current.as_mut().unwrap().next_poll_at = Some(Time(at(130))), Decision::Wait { until: at(130), reason: WaitReason::Polling })]
#[case::no_record_no_restore(|c: &mut Case| c.ladder.current.as_mut().unwrap().nic = None, Decision::NotFixed)]
#[case::restore_done_the_probe_judges(|c: &mut Case| c.ladder.current.as_mut().unwrap().nic.as_mut().unwrap().restore = RestoreState::Kept, Decision::NotFixed)]
#[case::restore_done_and_reachable_recovers(|c: &mut Case| { c.reachability = Reachability::Reachable; c.ladder.current.as_mut().unwrap().nic.as_mut().unwrap().restore = RestoreState::NotNeeded; }, Decision::Recovered)]
fn a_judged_reset_restores_its_address(#[case] setup: fn(&mut Case), #[case] expected: Decision) {
    let mut case = reset_settled();
    setup(&mut case);
    assert_eq!(case.decide(), expected);
}

#[test]
fn outside_the_maintenance_window_the_restore_waits() {
    let mut case = reset_settled();
    case.policy.windows = vec![
        crate::ladder::spec::parse_window(
            0,
            &crate::ladder::spec::MaintenanceWindow {
                days: vec![],
                start: "02:00".into(),
                duration: "2h".into(),
            },
        )
        .unwrap(),
    ];
    assert_eq!(
        case.decide(),
        Decision::Suspended(Suspension::OutsideMaintenanceWindow)
    );
}

/// The restore's own intent, operation and settling reuse the rung's machinery: an intent
/// without an operation after `requestTimeout` is abandoned (never re-sent), an operation is
/// polled, and after it ends the rung settles before it is judged — also while RDP answers.
#[test]
fn the_restore_is_recorded_polled_and_settled() {
    let mut case = reset_settled();
    case.ladder.restore_requested(false, at(100));
    assert_eq!(restore_state(&case), RestoreState::Requested);
    let c = case.ladder.current.as_ref().unwrap();
    assert_eq!(c.phase, ExecutionPhase::Requested);
    assert!(c.guest.is_none() && c.operation.is_none());
    assert_eq!(requested_at(c), at(100));
    case.now = at(150);
    assert_eq!(
        case.decide(),
        Decision::Wait {
            until: at(220),
            reason: WaitReason::Polling
        },
        "the request timeout counts from the restore's intent, not the rung's"
    );
    case.now = at(221);
    assert_eq!(case.decide(), Decision::AbandonRequest);
    case.ladder.running(
        OperationRef {
            async_operation_url: Some("http://arm/op/2".into()),
            location_url: None,
        },
        at(105),
    );
    assert!(restoring(case.ladder.current.as_ref().unwrap()));
    assert_eq!(case.decide(), Decision::Poll);
    case.ladder
        .restore_ended(RestoreState::Restored, "back".into(), at(230), at(240));
    case.reachability = Reachability::Reachable;
    case.now = at(235);
    assert_eq!(
        case.decide(),
        Decision::Wait {
            until: at(240),
            reason: WaitReason::Settling
        }
    );
    case.now = at(241);
    assert_eq!(case.decide(), Decision::Recovered);
    // The history keeps both addresses and the restore.
    case.ladder.recover(at(241));
    let kept = case.ladder.history.last().unwrap();
    assert_eq!(kept.outcome, RungOutcome::Fixed);
    let nic = kept.nic.as_ref().unwrap();
    assert_eq!(
        (nic.original_ip.as_str(), nic.new_ip.as_str(), nic.restore),
        ("10.0.0.10", "10.0.0.5", RestoreState::Restored)
    );
    assert_eq!(nic.reachable_after_reset, Some(false));
}

/// A restore whose intent is recorded may be being sent (the VM restarts with it): RDP that
/// answers meanwhile does not close the incident; after `requestTimeout` it is abandoned.
#[test]
fn a_requested_restore_holds_the_incident_open_while_rdp_answers() {
    let mut case = reset_settled();
    case.ladder.restore_requested(true, at(100));
    case.reachability = Reachability::Reachable;
    case.now = at(150);
    assert_eq!(
        case.decide(),
        Decision::Wait {
            until: at(220),
            reason: WaitReason::Polling
        }
    );
    case.now = at(221);
    assert_eq!(case.decide(), Decision::AbandonRequest);
}

#[test]
fn a_failed_restore_is_judged_at_once_and_never_due_again() {
    let mut case = reset_settled();
    case.ladder.restore_requested(true, at(100));
    case.ladder
        .restore_ended(RestoreState::Failed, "refused".into(), at(101), at(101));
    case.now = at(102);
    assert!(!restore_due(case.ladder.current.as_ref().unwrap()));
    assert_ne!(case.decide(), Decision::RestoreNic);
}

#[test]
fn a_failed_reset_has_nothing_to_restore() {
    let mut case = reset_settled();
    case.ladder
        .finish(RungOutcome::Failed, Some("refused".into()), at(100), None);
    let nic = case.ladder.history.last().unwrap().nic.clone().unwrap();
    assert_eq!(nic.restore, RestoreState::NotNeeded);
}

fn address(ip: &str) -> NicAddress {
    NicAddress {
        nic_id: NIC.into(),
        subnet_id: String::new(),
        private_ip: ip.into(),
        allocation: "Static".into(),
        provisioning_state: Some("Succeeded".into()),
    }
}

#[rstest]
#[case::on_the_new_address("10.0.0.5", NIC, RestorePlan::CheckOriginal)]
#[case::never_moved("10.0.0.10", NIC, RestorePlan::NotNeeded)]
#[case::moved_by_someone_else("10.0.0.77", NIC, RestorePlan::Keep("the NIC is on 10.0.0.77, neither its original address 10.0.0.10 nor the reset's 10.0.0.5: someone else moved it, so it is left there".into()))]
#[case::another_nic("10.0.0.5", "/x/other-nic", RestorePlan::Keep(format!("the VM's primary NIC is now /x/other-nic, not {NIC}; nothing is changed")))]
fn where_the_nic_is_decides_the_restore(
    #[case] ip: &str,
    #[case] nic_id: &str,
    #[case] expected: RestorePlan,
) {
    let now = NicAddress {
        nic_id: nic_id.into(),
        ..address(ip)
    };
    assert_eq!(restore_plan(&record(), &now), expected);
}

#[test]
fn a_busy_nic_is_not_restored_yet() {
    let mut a = address("10.0.0.5");
    assert!(!a.busy());
    a.provisioning_state = Some("Updating".into());
    assert!(a.busy());
}

#[rstest]
#[case::first_suggestion(&["10.0.0.5", "10.0.0.6"], Some("10.0.0.5"))]
#[case::never_the_current_one(&["10.0.0.10", "10.0.0.6"], Some("10.0.0.6"))]
#[case::none_free(&[], None)]
fn the_reset_moves_to_a_free_address(#[case] free: &[&str], #[case] expected: Option<&str>) {
    let availability = IpAvailability {
        available: false,
        free: free.iter().map(|s| s.to_string()).collect(),
    };
    assert_eq!(new_address("10.0.0.10", &availability).as_deref(), expected);
}

fn rule(name: &str, destination: &str, allow: bool) -> SecurityRule {
    SecurityRule {
        name: name.into(),
        priority: 300,
        inbound: true,
        allow,
        protocol: RuleProtocol::Tcp,
        source_prefixes: vec!["203.0.113.0/24".into()],
        destination_prefixes: vec![destination.into()],
        destination_ports: vec!["3389".into()],
        default_rule: false,
    }
}

#[test]
fn only_the_operators_rules_for_the_address_follow_it() {
    let own = rule("rdphealth-allow-rdp-vm-1", "10.0.0.10", true);
    let own_cidr = rule("rdphealth-allow-rdp-vm-1", "10.0.0.10/32", true);
    let rules = NetworkRules {
        endpoint: Endpoint {
            nic_id: NIC.into(),
            private_ip: Some("10.0.0.10".into()),
            public_ip_id: None,
            public_ip: None,
            public_ip_sku: None,
            subnet_id: None,
            nic_nsg_id: None,
            computer_name: None,
        },
        subnet_nsg: Some(NsgRules {
            id: "subnet-nsg".into(),
            rules: vec![
                own.clone(),
                // Someone else's rule for the same address, and another VM's rule.
                rule("allow-rdp-from-office", "10.0.0.10", true),
                rule("rdphealth-allow-rdp-vm-2", "10.0.0.10", true),
            ],
        }),
        nic_nsg: Some(NsgRules {
            id: "nic-nsg".into(),
            rules: vec![
                own_cidr.clone(),
                // The operator's name, but another destination, a wider one, or a deny.
                rule("rdphealth-allow-rdp-vm-1", "10.0.0.0/24", true),
                rule("rdphealth-allow-rdp-vm-1", "10.0.0.10", false),
            ],
        }),
    };
    let found = own_rules_for(&rules, "vm-1", "10.0.0.10");
    assert_eq!(
        found,
        vec![
            OwnRule {
                nsg_id: "subnet-nsg".into(),
                rule: own
            },
            OwnRule {
                nsg_id: "nic-nsg".into(),
                rule: own_cidr
            },
        ]
    );
    assert!(own_rules_for(&rules, "vm-1", "10.0.0.5").is_empty());
}

#[test]
fn the_records_survive_a_round_trip_through_status() {
    let mut case = reset_settled();
    case.ladder.nic_rules_moved(
        Some("10.0.0.5"),
        vec!["rule x: 10.0.0.10 → 10.0.0.5".into()],
    );
    let json = serde_json::to_value(&case.ladder).unwrap();
    let nic = &json["current"]["nic"];
    assert_eq!(nic["originalIp"], "10.0.0.10");
    assert_eq!(nic["originalAllocation"], "Dynamic");
    assert_eq!(nic["nicId"], NIC);
    assert_eq!(nic["restore"], "Pending");
    assert_eq!(nic["rulesFollow"], "10.0.0.5");
    let back: LadderStatus = serde_json::from_value(json).unwrap();
    assert_eq!(back, case.ladder);
}
