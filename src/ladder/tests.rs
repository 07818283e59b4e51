//! Tables for `decide` and property tests of the ladder's invariants.

use std::time::Duration;

use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use proptest::prelude::*;
use rstest::rstest;

use super::*;
use crate::{
    evidence::{
        Availability, Evidence, NsgEvidence, PowerState, ResourceHealth, guest,
        nsg::{Access, DecidingRule, NsgLevel, Verdict},
        serial::{BootSignal, SerialScan},
    },
    probe::{Failure, FailureReason},
};

fn t0() -> Timestamp {
    "2026-11-21T10:00:00Z".parse().unwrap()
}

pub(super) fn at(secs: i64) -> Timestamp {
    t0().checked_add(k8s_openapi::jiff::SignedDuration::from_secs(secs))
        .unwrap()
}

fn healthy_evidence() -> Evidence {
    Evidence {
        power_state: Some(PowerState::Running),
        agent_ready: Some(true),
        resource_health: Some(ResourceHealth {
            availability: Availability::Available,
            reason_type: None,
            context: None,
            category: None,
            summary: None,
        }),
        ..Evidence::empty(t0())
    }
}

fn auto() -> LadderPolicy {
    LadderPolicy {
        mode: Mode::Auto,
        allowed_disruptive: vec![Rung::ResetNic, Rung::Restart, Rung::Redeploy],
        ..LadderPolicy::default()
    }
}

fn failure(reason: FailureReason) -> Failure {
    Failure::new(reason, "test")
}

fn incident() -> LadderStatus {
    let mut l = LadderStatus::default();
    l.open_incident(t0());
    l
}

pub(super) struct Case {
    pub(super) policy: LadderPolicy,
    pub(super) ladder: LadderStatus,
    pub(super) reachability: Reachability,
    pub(super) failure: Option<Failure>,
    pub(super) evidence: Option<Evidence>,
    pub(super) gates: Gates,
    pub(super) approval: Option<Rung>,
    pub(super) now: Timestamp,
}

impl Case {
    pub(super) fn new() -> Self {
        Self {
            policy: auto(),
            ladder: incident(),
            reachability: Reachability::Unreachable,
            failure: Some(failure(FailureReason::TcpTimeout)),
            evidence: Some(healthy_evidence()),
            gates: Gates::OPEN,
            approval: None,
            now: at(10),
        }
    }
    pub(super) fn decide(&self) -> Decision {
        decide(&Situation {
            policy: &self.policy,
            ladder: &self.ladder,
            reachability: self.reachability,
            failure: self.failure.as_ref(),
            incident: Incident::Outage,
            evidence: self.evidence.as_ref(),
            gates: self.gates,
            approval: self.approval,
            seed: "uid",
            now: self.now,
        })
    }
}

fn nsg_deny() -> NsgEvidence {
    NsgEvidence {
        verdict: Verdict {
            access: Access::Deny,
            deciding: vec![DecidingRule {
                level: NsgLevel::Nic,
                nsg: "vm1-nsg".into(),
                rule: "securityRules/deny-rdp".into(),
                access: Access::Deny,
                priority: 100,
            }],
            unresolved_prefixes: vec![],
        },
        open_to_internet: false,
        closed_public_ip: false,
        ip_flow_verify: None,
    }
}

#[rstest]
#[case::healthy_no_incident(|c: &mut Case| { c.reachability = Reachability::Reachable; c.ladder = LadderStatus::default(); }, Decision::Idle)]
#[case::recovered(|c: &mut Case| c.reachability = Reachability::Reachable, Decision::Recovered)]
#[case::undecided(|c: &mut Case| c.reachability = Reachability::Unknown, Decision::Undecided)]
#[case::no_evidence(|c: &mut Case| c.evidence = None, Decision::GatherEvidence)]
#[case::stale_evidence(|c: &mut Case| c.now = at(3600), Decision::GatherEvidence)]
#[case::evidence_before_incident(|c: &mut Case| { c.ladder = LadderStatus::default(); c.ladder.open_incident(at(5)); }, Decision::GatherEvidence)]
#[case::vm_stopped(|c: &mut Case| c.evidence.as_mut().unwrap().power_state = Some(PowerState::Deallocated), Decision::Blocked(Blocker::VmNotRunning))]
#[case::vm_stopped_allow_start(|c: &mut Case| { c.evidence.as_mut().unwrap().power_state = Some(PowerState::Stopped); c.policy.allow_start = true; }, Decision::Act(Step::rung(Rung::StartVm)))]
#[case::nsg_deny(|c: &mut Case| c.evidence.as_mut().unwrap().nsg = Some(nsg_deny()), Decision::Blocked(Blocker::NsgDenied { level: "nic".into(), nsg: "vm1-nsg".into(), rule: "securityRules/deny-rdp".into() }))]
#[case::nsg_deny_with_repair(|c: &mut Case| { c.evidence.as_mut().unwrap().nsg = Some(nsg_deny()); c.policy.nsg_repair = true; }, Decision::Act(Step::rung(Rung::RepairNsg)))]
#[case::platform_outage(|c: &mut Case| c.evidence.as_mut().unwrap().resource_health = Some(ResourceHealth { availability: Availability::Unavailable, reason_type: Some("Unplanned".into()), context: Some("Platform Initiated".into()), category: Some("Unplanned".into()), summary: None }), Decision::Wait { until: at(900), reason: WaitReason::PlatformIssue })]
#[case::guest_updating(|c: &mut Case| c.evidence.as_mut().unwrap().serial = Some(SerialScan { latest: Some(BootSignal::InstallingUpdates), matches: vec![] }), Decision::Wait { until: at(900), reason: WaitReason::GuestBusy })]
#[case::observe(|c: &mut Case| c.policy.mode = Mode::Observe, Decision::Observe)]
#[case::wrong_host(|c: &mut Case| c.failure = Some(Failure::new(FailureReason::WrongHost, "10.0.0.4:3389 answered as VM-B")), Decision::Blocked(Blocker::WrongHost { detail: "10.0.0.4:3389 answered as VM-B".into() }))]
#[case::wrong_host_even_approved_without_evidence(|c: &mut Case| { c.failure = Some(Failure::new(FailureReason::WrongHost, "x")); c.evidence = None; c.approval = Some(Rung::Redeploy); }, Decision::Blocked(Blocker::WrongHost { detail: "x".into() }))]
#[case::dry_run(|c: &mut Case| c.policy.mode = Mode::DryRun, Decision::Plan(Step::rung(Rung::ResetRdpConfig)))]
#[case::first_rung(|_: &mut Case| {}, Decision::Act(Step::rung(Rung::ResetRdpConfig)))]
#[case::not_leader(|c: &mut Case| c.gates.leader = false, Decision::Suspended(Suspension::NotLeader))]
#[case::paused(|c: &mut Case| c.gates.paused = true, Decision::Suspended(Suspension::Paused))]
#[case::agent_not_ready_skips_to_nic(|c: &mut Case| c.evidence.as_mut().unwrap().agent_ready = Some(false), Decision::Act(Step::rung(Rung::ResetNic)))]
#[case::storm_holds_disruptive(|c: &mut Case| { c.evidence.as_mut().unwrap().agent_ready = Some(false); c.gates.storm = true; }, Decision::Suspended(Suspension::Storm))]
#[case::storm_allows_mild(|c: &mut Case| c.gates.storm = true, Decision::Act(Step::rung(Rung::ResetRdpConfig)))]
#[case::fleet_breaker_holds_mild_rungs_too(|c: &mut Case| c.gates.blind = Some(Suspension::FleetBreaker), Decision::Suspended(Suspension::FleetBreaker))]
#[case::canary_holds_everything(|c: &mut Case| { c.evidence.as_mut().unwrap().agent_ready = Some(false); c.gates.blind = Some(Suspension::CanaryDown); }, Decision::Suspended(Suspension::CanaryDown))]
#[case::no_slot(|c: &mut Case| { c.evidence.as_mut().unwrap().agent_ready = Some(false); c.gates.disruptive_slot_free = false; }, Decision::Wait { until: at(40), reason: WaitReason::FleetSlot })]
#[case::grace_holds_disruptive(|c: &mut Case| { c.evidence.as_mut().unwrap().agent_ready = Some(false); c.gates.disruptive_grace = Duration::from_secs(60); }, Decision::Wait { until: at(60), reason: WaitReason::FleetGrace })]
#[case::grace_over(|c: &mut Case| { c.evidence.as_mut().unwrap().agent_ready = Some(false); c.gates.disruptive_grace = Duration::from_secs(5); }, Decision::Act(Step::rung(Rung::ResetNic)))]
#[case::grace_spares_mild_rungs(|c: &mut Case| c.gates.disruptive_grace = Duration::from_secs(60), Decision::Act(Step::rung(Rung::ResetRdpConfig)))]
#[case::no_permission_gives_up(|c: &mut Case| { c.evidence.as_mut().unwrap().agent_ready = Some(false); c.policy.allowed_disruptive.clear(); }, Decision::GiveUp(GiveUp::Exhausted { need_permission: vec![Rung::ResetNic, Rung::Restart, Rung::Redeploy], need_agent: vec![Rung::ResetRdpConfig] }))]
#[case::approval_allows_once(|c: &mut Case| { c.evidence.as_mut().unwrap().agent_ready = Some(false); c.policy.allowed_disruptive.clear(); c.approval = Some(Rung::Restart); }, Decision::Act(Step::rung(Rung::Restart)))]
#[case::tls_failure_targets_guest_first(|c: &mut Case| c.failure = Some(failure(FailureReason::TlsHandshakeFailed)), Decision::Act(Step::repair(GuestRepair::EnableTls12)))]
#[case::cert_code_targets_certificate(|c: &mut Case| c.failure = Some(Failure { code: Some(3), ..failure(FailureReason::NegotiationFailure) }), Decision::Act(Step::repair(GuestRepair::RenewRdpCertificate)))]
#[case::backoff(|c: &mut Case| c.ladder.next_action_at = Some(Time(at(100))), Decision::Wait { until: at(100), reason: WaitReason::Backoff })]
#[case::exhausted_flag(|c: &mut Case| c.ladder.exhausted = true, Decision::GiveUp(GiveUp::Exhausted { need_permission: vec![], need_agent: vec![] }))]
#[case::approval_after_exhaustion(|c: &mut Case| { c.ladder.exhausted = true; c.evidence.as_mut().unwrap().agent_ready = Some(false); c.policy.allowed_disruptive.clear(); c.approval = Some(Rung::Restart); }, Decision::Act(Step::rung(Rung::Restart)))]
#[case::other_approval_keeps_it_exhausted(|c: &mut Case| { c.ladder.exhausted = true; c.evidence.as_mut().unwrap().agent_ready = Some(false); c.policy.allowed_disruptive.clear(); c.policy.ladder = vec![Rung::Restart]; c.approval = Some(Rung::Redeploy); }, Decision::GiveUp(GiveUp::Exhausted { need_permission: vec![Rung::Restart], need_agent: vec![] }))]
fn decide_table(#[case] setup: fn(&mut Case), #[case] expected: Decision) {
    let mut case = Case::new();
    setup(&mut case);
    assert_eq!(case.decide(), expected);
}

#[test]
fn maintenance_windows_hold_disruptive_rungs_outside() {
    let mut case = Case::new();
    case.evidence.as_mut().unwrap().agent_ready = Some(false);
    case.policy.windows = vec![
        spec::parse_window(
            0,
            &spec::MaintenanceWindow {
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
    case.now = "2026-11-21T02:30:00Z".parse().unwrap();
    case.ladder = LadderStatus::default();
    case.ladder.open_incident(case.now);
    case.evidence.as_mut().unwrap().gathered_at = Time(case.now);
    assert_eq!(case.decide(), Decision::Act(Step::rung(Rung::ResetNic)));
}

#[test]
fn a_rung_of_unknown_fate_is_judged_but_recorded_unknown() {
    let mut case = Case::new();
    case.ladder.start(Step::rung(Rung::ResetRdpConfig), at(10));
    // The operator stopped during the call: after the request timeout it settles, unrepeated.
    case.now = at(10 + 120);
    assert_eq!(case.decide(), Decision::AbandonRequest);
    case.ladder
        .settle_unknown(at(200), at(250), "interrupted".into());
    case.now = at(260);
    case.evidence.as_mut().unwrap().gathered_at = Time(at(200));
    assert_eq!(case.decide(), Decision::NotFixed);
    case.ladder.not_fixed(at(260), at(320));
    let last = case.ladder.history.last().unwrap();
    assert_eq!(last.outcome, RungOutcome::Unknown);
    assert_eq!(last.outcome.as_str(), "unknown");
    // A rung whose operation was seen to finish is `NotFixed`.
    case.ladder.start(Step::rung(Rung::ResetNic), at(330));
    case.ladder.settle(at(300), at(340), None);
    case.ladder.not_fixed(at(350), at(400));
    assert_eq!(
        case.ladder.history.last().unwrap().outcome,
        RungOutcome::NotFixed
    );
    // Reachable after an unknown rung: the rung gets the credit.
    case.ladder.start(Step::rung(Rung::Restart), at(410));
    case.ladder
        .settle_unknown(at(400), at(420), "status unreadable".into());
    assert_eq!(
        case.ladder.recover(at(430)),
        Some(Step::rung(Rung::Restart))
    );
    assert_eq!(
        case.ladder.history.last().unwrap().outcome,
        RungOutcome::Fixed
    );
}

#[test]
fn guest_scenarios_steer_and_block() {
    let mut case = Case::new();
    let listener = "RDPHEALTH registry name=fDenyTSConnections value=1\nRDPHEALTH done\n";
    case.evidence.as_mut().unwrap().guest = Some(guest::parse(listener));
    case.failure = Some(failure(FailureReason::TlsHandshakeFailed));
    assert_eq!(
        case.decide(),
        Decision::Act(Step::rung(Rung::ResetRdpConfig))
    );
    case.evidence.as_mut().unwrap().guest =
        Some(guest::parse("RDPHEALTH port port=3389 owner=nginx\n"));
    assert_eq!(
        case.decide(),
        Decision::Blocked(Blocker::PortTakenByOtherProgram)
    );
}

#[test]
fn plan_puts_targeted_fixes_first_and_keeps_ladder_order() {
    let policy = auto();
    let steps = plan(
        &policy,
        Some(&failure(FailureReason::TlsHandshakeFailed)),
        Incident::Outage,
        None,
    );
    assert_eq!(
        steps,
        vec![
            Step::repair(GuestRepair::EnableTls12),
            Step::rung(Rung::ResetRdpConfig),
            Step::rung(Rung::ResetNic),
            Step::rung(Rung::Restart),
            Step::rung(Rung::Redeploy),
        ]
    );
    let steps = plan(
        &policy,
        Some(&failure(FailureReason::TcpTimeout)),
        Incident::Flapping,
        None,
    );
    assert_eq!(
        steps,
        vec![Step::repair(GuestRepair::ListenerKeepAlive)],
        "flapping never restarts"
    );
    let steps = plan(&policy, None, Incident::CertificateExpired, None);
    assert_eq!(steps, vec![Step::repair(GuestRepair::RenewRdpCertificate)]);
    let narrow = LadderPolicy {
        ladder: vec![Rung::Restart],
        ..auto()
    };
    let steps = plan(
        &narrow,
        Some(&failure(FailureReason::TlsHandshakeFailed)),
        Incident::Outage,
        None,
    );
    assert_eq!(
        steps,
        vec![Step::rung(Rung::Restart)],
        "never a rung outside the ladder"
    );
}

#[test]
fn in_flight_rungs_poll_settle_and_judge() {
    let mut case = Case::new();
    case.ladder.start(Step::rung(Rung::Restart), at(10));
    case.now = at(20);
    assert_eq!(
        case.decide(),
        Decision::Wait {
            until: at(130),
            reason: WaitReason::Polling
        }
    );
    case.now = at(200);
    assert_eq!(case.decide(), Decision::AbandonRequest);
    case.ladder.running(
        OperationRef {
            async_operation_url: Some("http://arm/op/1".into()),
            location_url: None,
        },
        at(215),
    );
    case.now = at(210);
    assert_eq!(
        case.decide(),
        Decision::Wait {
            until: at(215),
            reason: WaitReason::Polling
        }
    );
    case.now = at(215);
    assert_eq!(case.decide(), Decision::Poll);
    case.reachability = Reachability::Reachable;
    assert_eq!(
        case.decide(),
        Decision::Poll,
        "a running operation finishes before recovery"
    );
    case.reachability = Reachability::Unreachable;
    case.ladder.settle(at(215), at(300), None);
    assert_eq!(
        case.decide(),
        Decision::Wait {
            until: at(300),
            reason: WaitReason::Settling
        }
    );
    case.now = at(300);
    // A restart is judged only after a look at the guest: its agent reads Ready, so the
    // guest is up and RDP is not.
    assert_eq!(case.decide(), Decision::WatchGuest);
    case.ladder.guest_checked(at(300), Some(true));
    assert_eq!(case.decide(), Decision::NotFixed);
    case.reachability = Reachability::Reachable;
    assert_eq!(case.decide(), Decision::Recovered);
    assert_eq!(
        case.ladder.clone().recover(at(300)),
        Some(Step::rung(Rung::Restart))
    );
}

#[test]
fn cooldown_and_daily_budget_gate_new_ladders() {
    let mut case = Case::new();
    case.ladder = LadderStatus::default();
    case.ladder.last_ladder_ended_at = Some(Time(at(-60)));
    case.ladder.open_incident(at(0));
    assert_eq!(
        case.decide(),
        Decision::Wait {
            until: at(3540),
            reason: WaitReason::Cooldown
        }
    );
    case.ladder.last_ladder_ended_at = None;
    case.ladder.ladder_starts = vec![Time(at(-3000)), Time(at(-2000)), Time(at(-1000))];
    assert_eq!(
        case.decide(),
        Decision::Wait {
            until: at(86_400 - 3000),
            reason: WaitReason::DailyBudget
        }
    );
}

/// One event the world may produce between decisions.
#[derive(Debug, Clone)]
enum World {
    Probe(Reachability),
    OpResult(bool),
    Tick(u32),
    Restart,
}

fn world() -> impl Strategy<Value = World> {
    prop_oneof![
        prop_oneof![
            Just(Reachability::Reachable),
            Just(Reachability::Unreachable),
            Just(Reachability::Unknown)
        ]
        .prop_map(World::Probe),
        any::<bool>().prop_map(World::OpResult),
        (1u32..4000).prop_map(World::Tick),
        Just(World::Restart),
    ]
}

fn policies() -> impl Strategy<Value = LadderPolicy> {
    (
        prop_oneof![Just(Mode::Observe), Just(Mode::DryRun), Just(Mode::Auto)],
        proptest::sample::subsequence(Rung::DEFAULT_LADDER.to_vec(), 0..=5),
        proptest::sample::subsequence(vec![Rung::ResetNic, Rung::Restart, Rung::Redeploy], 0..=3),
        1u32..3,
        any::<bool>(),
    )
        .prop_map(
            |(mode, ladder, allowed, attempts, allow_start)| LadderPolicy {
                mode,
                ladder,
                allowed_disruptive: allowed,
                max_attempts_per_rung: attempts,
                allow_start,
                settle_time: Duration::from_secs(60),
                ..LadderPolicy::default()
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Drives `decide` and the status transitions the way a driver does, through random
    /// probe results, operation outcomes, time jumps and operator restarts.
    #[test]
    fn ladder_invariants(
        policy in policies(),
        agent_ready in any::<bool>(),
        stopped in any::<bool>(),
        failure_reason in proptest::sample::select(FailureReason::ALL.to_vec()),
        events in proptest::collection::vec(world(), 1..80),
    ) {
        let mut ladder = LadderStatus::default();
        let mut now = t0();
        let mut reach = Reachability::Unknown;
        let mut evidence: Option<Evidence> = None;
        let mut in_flight_calls = 0u32;
        let fail = failure(failure_reason);
        for event in events {
            match event {
                World::Probe(r) => reach = r,
                World::Tick(s) => now = now.checked_add(Duration::from_secs(u64::from(s))).unwrap(),
                World::Restart => {} // status is all there is: nothing in memory to lose
                World::OpResult(ok) => {
                    if ladder.current.as_ref().is_some_and(|c| c.phase == ExecutionPhase::Running) {
                        in_flight_calls = in_flight_calls.saturating_sub(1);
                        if ok {
                            ladder.settle(now, now.checked_add(policy.settle_time).unwrap(), None);
                        } else {
                            let n = ladder.incident_attempts();
                            let next = now.checked_add(policy.backoff.delay(n, "uid")).unwrap();
                            ladder.finish(RungOutcome::Failed, None, now, Some(next));
                        }
                    }
                }
            }
            if reach == Reachability::Unreachable {
                ladder.open_incident(now);
            }
            let situation = Situation {
                policy: &policy,
                ladder: &ladder,
                reachability: reach,
                failure: Some(&fail),
                incident: Incident::Outage,
                evidence: evidence.as_ref(),
                gates: Gates::OPEN,
                approval: None,
                seed: "uid",
                now,
            };
            let decision = decide(&situation);
            match decision {
                Decision::Act(step) => {
                    prop_assert_ne!(failure_reason, FailureReason::WrongHost, "never acts on a VM whose endpoint answered as another machine");
                    prop_assert_eq!(policy.mode, Mode::Auto, "only Auto acts");
                    prop_assert!(ladder.current.is_none(), "never two actions in flight");
                    prop_assert_eq!(in_flight_calls, 0);
                    match step.rung {
                        Rung::StartVm => prop_assert!(policy.allow_start),
                        Rung::RepairNsg => prop_assert!(policy.nsg_repair),
                        rung => prop_assert!(policy.ladder.contains(&rung), "rung outside the ladder"),
                    }
                    if step.rung.is_disruptive() {
                        prop_assert!(policy.allowed_disruptive.contains(&step.rung));
                    }
                    if step.rung.needs_agent() {
                        prop_assert!(agent_ready);
                    }
                    prop_assert!(ladder.attempts_of(step) < policy.max_attempts_per_rung);
                    ladder.start(step, now);
                    in_flight_calls += 1;
                    ladder.running(OperationRef { async_operation_url: Some("op".into()), location_url: None }, now);
                }
                Decision::Plan(step) => {
                    prop_assert_eq!(policy.mode, Mode::DryRun);
                    ladder.planned = Some(step);
                }
                Decision::GatherEvidence => {
                    let mut e = healthy_evidence();
                    e.gathered_at = Time(now);
                    e.agent_ready = Some(agent_ready);
                    if stopped {
                        e.power_state = Some(PowerState::Deallocated);
                    }
                    evidence = Some(e);
                }
                Decision::NotFixed => {
                    let n = ladder.incident_attempts();
                    let next = now.checked_add(policy.backoff.delay(n, "uid")).unwrap();
                    ladder.finish(RungOutcome::NotFixed, None, now, Some(next));
                }
                Decision::AbandonRequest => {
                    ladder.settle(now, now.checked_add(policy.settle_time).unwrap(), None);
                }
                Decision::Recovered => {
                    if ladder.current.is_some() {
                        in_flight_calls = in_flight_calls.saturating_sub(1);
                    }
                    ladder.recover(now);
                    evidence = None;
                }
                Decision::GiveUp(_) => ladder.exhaust(now),
                Decision::Poll => {}
                _ => {}
            }
            if policy.mode != Mode::Auto {
                prop_assert!(ladder.current.is_none(), "Observe and DryRun never start a rung");
            }
            prop_assert!(ladder.history.len() <= status::HISTORY_LIMIT);
        }
    }
}
