//! `decide` and the evidence reads that run in Azure (the in-guest query, IP flow verify):
//! the ladder waits for them, polls them when due, and trusts IP flow verify's NSG answer.

use std::time::Duration;

use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use proptest::prelude::*;
use rstest::rstest;

use super::*;
use crate::{
    evidence::{
        Availability, Evidence, FlowCheck, NsgEvidence, PendingRead, PowerState, ReadKind,
        ResourceHealth, guest,
        nsg::{Access, DecidingRule, NsgLevel, Verdict},
    },
    probe::{Failure, FailureReason},
};

fn t0() -> Timestamp {
    "2026-11-21T10:00:00Z".parse().unwrap()
}

fn at(secs: i64) -> Timestamp {
    t0().checked_add(k8s_openapi::jiff::SignedDuration::from_secs(secs))
        .unwrap()
}

fn read(kind: ReadKind, started: i64, next_poll: i64) -> PendingRead {
    PendingRead {
        kind,
        async_operation_url: Some("http://arm/operations/1".into()),
        location_url: Some("http://arm/operationResults/1".into()),
        started_at: Time(at(started)),
        next_poll_at: Time(at(next_poll)),
    }
}

fn verdict(access: Access) -> Verdict {
    Verdict {
        access,
        deciding: vec![DecidingRule {
            level: NsgLevel::Nic,
            nsg: "vm1-nsg".into(),
            rule: match access {
                Access::Allow => "securityRules/allow-rdp".into(),
                Access::Deny => "securityRules/deny-rdp".into(),
            },
            access,
            priority: 100,
        }],
        unresolved_prefixes: vec![],
    }
}

fn nsg(local: Access, azure: Option<Access>) -> NsgEvidence {
    NsgEvidence {
        verdict: verdict(local),
        open_to_internet: false,
        closed_public_ip: false,
        ip_flow_verify: azure.map(|access| FlowCheck {
            access,
            rule: "securityRules/azure-rule".into(),
            agrees_with_local_verdict: access == local,
        }),
    }
}

/// Evidence gathered at t0 with a guest query and IP flow verify started then, first poll at 20.
fn gathering() -> Evidence {
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
        nsg: Some(nsg(Access::Allow, None)),
        pending: vec![
            read(ReadKind::IpFlowVerify, 0, 20),
            read(ReadKind::GuestQuery, 0, 20),
        ],
        ..Evidence::empty(t0())
    }
}

struct Case {
    policy: LadderPolicy,
    ladder: LadderStatus,
    reachability: Reachability,
    failure: Failure,
    incident: Incident,
    evidence: Evidence,
    now: Timestamp,
}

impl Case {
    fn new() -> Self {
        let mut ladder = LadderStatus::default();
        ladder.open_incident(t0());
        Self {
            policy: LadderPolicy {
                mode: Mode::Auto,
                allowed_disruptive: vec![Rung::ResetNic, Rung::Restart, Rung::Redeploy],
                ..LadderPolicy::default()
            },
            ladder,
            reachability: Reachability::Unreachable,
            failure: Failure::new(FailureReason::TlsHandshakeFailed, "test"),
            incident: Incident::Outage,
            evidence: gathering(),
            now: at(10),
        }
    }

    fn decide(&self) -> Decision {
        decide(&Situation {
            policy: &self.policy,
            ladder: &self.ladder,
            reachability: self.reachability,
            failure: Some(&self.failure),
            incident: self.incident,
            evidence: Some(&self.evidence),
            gates: Gates::OPEN,
            approval: None,
            seed: "uid",
            now: self.now,
        })
    }
}

fn gathering_wait(until: i64) -> Decision {
    Decision::Wait {
        until: at(until),
        reason: WaitReason::GatheringEvidence,
    }
}

#[rstest]
#[case::waits_for_the_next_poll(|_: &mut Case| {}, gathering_wait(20))]
#[case::polls_when_due(|c: &mut Case| c.now = at(20), Decision::PollEvidence)]
#[case::earliest_read_decides(|c: &mut Case| c.evidence.pending[0].next_poll_at = Time(at(15)), gathering_wait(15))]
#[case::a_read_past_its_timeout_is_due(|c: &mut Case| { c.evidence.pending = vec![read(ReadKind::GuestQuery, 0, 400)]; c.now = at(300); }, Decision::PollEvidence)]
#[case::timeout_caps_the_wait(|c: &mut Case| c.evidence.pending = vec![read(ReadKind::IpFlowVerify, 0, 400)], gathering_wait(120))]
#[case::observe_waits_too(|c: &mut Case| c.policy.mode = Mode::Observe, gathering_wait(20))]
#[case::dry_run_plans_nothing_yet(|c: &mut Case| c.policy.mode = Mode::DryRun, gathering_wait(20))]
#[case::flapping_keepalive_waits(|c: &mut Case| c.incident = Incident::Flapping, gathering_wait(20))]
#[case::expired_certificate_waits(|c: &mut Case| c.incident = Incident::CertificateExpired, gathering_wait(20))]
#[case::local_deny_waits_for_ip_flow_verify(|c: &mut Case| c.evidence.nsg = Some(nsg(Access::Deny, None)), gathering_wait(20))]
#[case::stale_evidence_is_refreshed(|c: &mut Case| c.now = at(3600), Decision::GatherEvidence)]
#[case::recovery_does_not_wait(|c: &mut Case| c.reachability = Reachability::Reachable, Decision::Recovered)]
#[case::undecided_does_not_poll(|c: &mut Case| c.reachability = Reachability::Unknown, Decision::Undecided)]
#[case::answered_reads_free_the_ladder(|c: &mut Case| c.evidence.pending.clear(), Decision::Act(Step::repair(GuestRepair::EnableTls12)))]
#[case::only_ip_flow_verify_left_still_waits(|c: &mut Case| c.evidence.pending.retain(|p| p.kind == ReadKind::IpFlowVerify), gathering_wait(20))]
fn decide_with_pending_reads(#[case] setup: fn(&mut Case), #[case] expected: Decision) {
    let mut case = Case::new();
    setup(&mut case);
    assert_eq!(case.decide(), expected);
}

#[rstest]
#[case::both_allow(Access::Allow, Some(Access::Allow), None)]
#[case::azure_allows_what_the_local_verdict_denies(Access::Deny, Some(Access::Allow), None)]
#[case::azure_denies_what_the_local_verdict_allows(Access::Allow, Some(Access::Deny), Some(("effective", "(per IP flow verify)", "securityRules/azure-rule")))]
#[case::both_deny_names_the_local_rule(Access::Deny, Some(Access::Deny), Some(("nic", "vm1-nsg", "securityRules/deny-rdp")))]
#[case::no_watcher_local_deny(Access::Deny, None, Some(("nic", "vm1-nsg", "securityRules/deny-rdp")))]
fn ip_flow_verify_is_trusted_over_the_local_verdict(
    #[case] local: Access,
    #[case] azure: Option<Access>,
    #[case] blocked_by: Option<(&str, &str, &str)>,
) {
    let mut case = Case::new();
    case.evidence.pending.clear();
    case.evidence.nsg = Some(nsg(local, azure));
    let expected = match blocked_by {
        Some((level, nsg, rule)) => Decision::Blocked(Blocker::NsgDenied {
            level: level.into(),
            nsg: nsg.into(),
            rule: rule.into(),
        }),
        None => Decision::Act(Step::repair(GuestRepair::EnableTls12)),
    };
    assert_eq!(case.decide(), expected);
}

#[test]
fn the_query_answer_picks_the_first_rung_once_it_lands() {
    let mut case = Case::new();
    case.failure = Failure::new(FailureReason::X224Timeout, "test");
    assert_eq!(case.decide(), gathering_wait(20));
    case.evidence.pending.clear();
    case.evidence.guest = Some(guest::parse(
        "RDPHEALTH event provider=Schannel id=36870 count=2\nRDPHEALTH done\n",
    ));
    assert_eq!(
        case.decide(),
        Decision::Act(Step::repair(GuestRepair::RenewRdpCertificate))
    );
}

/// What may happen between two decisions.
#[derive(Debug, Clone)]
enum World {
    Probe(Reachability),
    Tick(u32),
    /// The next poll finds the read finished (with an answer or a failure) or still running.
    ReadAnswer(bool),
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
        (1u32..400).prop_map(World::Tick),
        any::<bool>().prop_map(World::ReadAnswer),
        Just(World::Restart),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Drives `decide` with evidence gathering that starts the in-guest query (agent Ready),
    /// polls that answer or not, time jumps and restarts: no rung starts — in particular no
    /// Run Command repair — while the query is pending and within its timeout.
    #[test]
    fn no_run_command_rung_while_the_guest_query_is_pending(
        mode in prop_oneof![Just(Mode::Observe), Just(Mode::DryRun), Just(Mode::Auto)],
        incident in prop_oneof![Just(Incident::Outage), Just(Incident::Flapping), Just(Incident::CertificateExpired)],
        failure_reason in proptest::sample::select(FailureReason::ALL.to_vec()),
        events in proptest::collection::vec(world(), 1..60),
    ) {
        let policy = LadderPolicy {
            mode,
            allowed_disruptive: vec![Rung::ResetNic, Rung::Restart, Rung::Redeploy],
            ..LadderPolicy::default()
        };
        let fail = Failure::new(failure_reason, "test");
        let mut ladder = LadderStatus::default();
        let mut evidence: Option<Evidence> = None;
        let mut reach = Reachability::Unknown;
        let mut now = t0();
        let mut answer = false;
        for event in events {
            match event {
                World::Probe(r) => reach = r,
                World::Tick(s) => now = now.checked_add(Duration::from_secs(u64::from(s))).unwrap(),
                World::ReadAnswer(a) => answer = a,
                World::Restart => {}
            }
            if reach == Reachability::Unreachable {
                ladder.open_incident(now);
            }
            let decision = decide(&Situation {
                policy: &policy,
                ladder: &ladder,
                reachability: reach,
                failure: Some(&fail),
                incident,
                evidence: evidence.as_ref(),
                gates: Gates::OPEN,
                approval: None,
                seed: "uid",
                now,
            });
            let query_running = evidence.as_ref().is_some_and(|e| {
                e.pending.iter().any(|p| p.kind == ReadKind::GuestQuery && !p.timed_out(now))
            });
            if let Decision::Act(step) = decision {
                prop_assert!(!query_running, "{step} started while the guest query runs");
            }
            match decision {
                Decision::GatherEvidence => {
                    // What `gather` does: carry a running query over, else start one.
                    let carried: Vec<PendingRead> = evidence
                        .as_ref()
                        .map(|e| e.pending.iter().filter(|p| !p.timed_out(now)).cloned().collect())
                        .unwrap_or_default();
                    let mut e = gathering();
                    e.gathered_at = Time(now);
                    e.pending = carried;
                    if !e.is_pending(ReadKind::GuestQuery) {
                        e.pending.push(PendingRead {
                            started_at: Time(now),
                            next_poll_at: Time(now.checked_add(Duration::from_secs(20)).unwrap()),
                            ..read(ReadKind::GuestQuery, 0, 0)
                        });
                    }
                    evidence = Some(e);
                }
                Decision::PollEvidence => {
                    let e = evidence.as_mut().unwrap();
                    for p in std::mem::take(&mut e.pending) {
                        if p.timed_out(now) || answer {
                            continue;
                        }
                        e.pending.push(PendingRead {
                            next_poll_at: Time(now.checked_add(Duration::from_secs(20)).unwrap()),
                            ..p
                        });
                    }
                }
                Decision::Act(step) => {
                    ladder.start(step, now);
                    ladder.running(OperationRef { async_operation_url: Some("op".into()), location_url: None }, now);
                    // The rung is judged at once in this model.
                    ladder.settle(now, now, None);
                }
                Decision::NotFixed => {
                    let n = ladder.incident_attempts();
                    let next = now.checked_add(policy.backoff.delay(n, "uid")).unwrap();
                    ladder.finish(RungOutcome::NotFixed, None, now, Some(next));
                }
                Decision::Recovered => {
                    ladder.recover(now);
                    evidence = None;
                }
                Decision::GiveUp(_) => ladder.exhaust(now),
                _ => {}
            }
        }
    }
}
