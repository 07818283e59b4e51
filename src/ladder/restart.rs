//! The restart an in-guest repair asks for (`restart=required`): SCHANNEL and listener
//! settings are read at boot, so a repair that needs a restart has not been tried until the
//! VM restarted. The restart follows the repair at once, under the `Restart` rung's rules
//! (it must be in `ladder` and allowed, by `allowedDisruptiveActions` or a one-time approval;
//! maintenance windows, the storm breaker, the fleet's grace period and slot); when the
//! operator may not restart the VM, the ladder waits for a person instead of moving on to
//! rungs that have nothing to do with the repair. A recovery after that restart is credited
//! to the repair.

use super::{
    decide::{Mode, Situation, gate_and_act, permitted},
    rung::{Rung, Step},
    status::{LadderStatus, RungExecution, RungOutcome},
    verdict::{Decision, Suspension},
};

/// Why the operator does not restart the VM after a repair that needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartHold {
    /// `remediation.mode` is `Observe`: nothing is changed.
    ObserveOnly,
    /// `Restart` is not in `remediation.ladder`.
    NotInLadder,
    /// `Restart` is neither in `allowedDisruptiveActions` nor approved.
    NotAllowed,
}

impl RestartHold {
    /// For people: why the VM is not restarted and what would let it be.
    pub fn message(self) -> &'static str {
        match self {
            Self::ObserveOnly => {
                "remediation.mode is Observe, so the operator does not restart the VM"
            }
            Self::NotInLadder => {
                "Restart is not in remediation.ladder, so the operator does not restart the VM"
            }
            Self::NotAllowed => {
                "Restart is not in allowedDisruptiveActions and not approved (rdphealth.io/approve: Restart), so the operator does not restart the VM"
            }
        }
    }
}

/// The decision for a repair in `AwaitingRestart`: its restart, gated like the `Restart` rung.
/// A repair that already ran under `Restart`'s permission (it dropped the sessions of a
/// reachable VM, allowed or approved as a restart) has it for its restart too.
pub(super) fn after_repair(s: &Situation<'_>, current: &RungExecution) -> Decision {
    let Some(repair) = current.step.repair else {
        // Only a repair awaits a restart; anything else is judged as settled.
        return Decision::NotFixed;
    };
    restart_for(s, repair, current.drops_sessions)
}

/// The restart of a repair recorded `Applied` as the incident's last step, with no restart
/// after it yet: its restart started (the repair's record was closed) and was dropped after
/// the OS-disk snapshot taken for it, so the ladder decides it again. `None` otherwise.
pub(super) fn pending(s: &Situation<'_>) -> Option<Decision> {
    if s.ladder.current.is_some() {
        return None;
    }
    let last = s.ladder.incident_history().last()?;
    if last.outcome != RungOutcome::Applied || last.step.rung != Rung::RepairGuest {
        return None;
    }
    let repair = last.step.repair?;
    // The restart was permitted when it was decided, which is when its snapshot was taken
    // (a one-time approval may have been used up by the repair's own call since); without
    // such a fresh snapshot it needs Restart's own permission now.
    let decided = s
        .ladder
        .fresh_snapshot(Step::restart_after(repair), s.now)
        .is_some();
    Some(restart_for(s, repair, decided))
}

/// The restart after `repair`; `already_permitted`: it needs no permission of its own (the
/// repair ran under Restart's permission, or the restart was decided before its snapshot).
fn restart_for(s: &Situation<'_>, repair: super::GuestRepair, already_permitted: bool) -> Decision {
    let hold = if s.policy.mode == Mode::Observe {
        Some(RestartHold::ObserveOnly)
    } else if !s.policy.ladder.contains(&Rung::Restart) {
        Some(RestartHold::NotInLadder)
    } else if !permitted(s, Rung::Restart) && !already_permitted {
        Some(RestartHold::NotAllowed)
    } else {
        None
    };
    if let Some(hold) = hold {
        return Decision::RestartRequired { repair, hold };
    }
    if s.gates.paused {
        return Decision::Suspended(Suspension::Paused);
    }
    if let Some(blind) = s.gates.blind {
        return Decision::Suspended(blind);
    }
    gate_and_act(s, Step::restart_after(repair))
}

/// Attempts of `step` in the current incident, where a restart that followed a repair counts
/// as an attempt of the `Restart` rung too: the VM was restarted, and restarting it again for
/// the generic rung would disrupt it twice for the same purpose.
pub fn attempts(ladder: &LadderStatus, step: Step) -> u32 {
    let own = ladder.attempts_of(step);
    if step != Step::rung(Rung::Restart) {
        return own;
    }
    let after_repairs = ladder
        .incident_history()
        .filter(|r| r.step.rung == Rung::Restart && r.step.repair.is_some())
        .filter(|r| r.outcome != RungOutcome::Failed)
        .count() as u32;
    let in_flight = ladder
        .current
        .as_ref()
        .is_some_and(|c| c.step.rung == Rung::Restart && c.step.repair.is_some());
    own + after_repairs + u32::from(in_flight)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use k8s_openapi::jiff::{SignedDuration, Timestamp};
    use rstest::rstest;

    use super::*;
    use crate::{
        evidence::{Evidence, PowerState},
        ladder::{
            Decision, Gates, GuestRepair, Incident, LadderPolicy, OperationRef, Reachability,
            Situation, WaitReason, decide, spec,
        },
        probe::{Failure, FailureReason},
    };

    fn at(secs: i64) -> Timestamp {
        let t0: Timestamp = "2026-11-21T10:00:00Z".parse().unwrap();
        t0.checked_add(SignedDuration::from_secs(secs)).unwrap()
    }

    /// Restart allowed, ResetNic and Redeploy allowed too: other rungs are available.
    fn policy() -> LadderPolicy {
        LadderPolicy {
            mode: Mode::Auto,
            allowed_disruptive: vec![Rung::ResetNic, Rung::Restart, Rung::Redeploy],
            ..LadderPolicy::default()
        }
    }

    /// An incident at 0 in which `EnableTls12` was applied at 30 and asked for a restart.
    fn applied() -> LadderStatus {
        let mut l = LadderStatus::default();
        l.open_incident(at(0));
        l.start(Step::repair(GuestRepair::EnableTls12), at(10));
        l.running(
            OperationRef {
                async_operation_url: Some("http://arm/op/1".into()),
                location_url: None,
            },
            at(20),
        );
        l.await_restart("EnableTls12 applied 2 change(s); restart required".into());
        l
    }

    struct Case {
        policy: LadderPolicy,
        ladder: LadderStatus,
        reachability: Reachability,
        gates: Gates,
        approval: Option<Rung>,
        evidence: Evidence,
        now: Timestamp,
    }

    impl Case {
        fn new() -> Self {
            Self {
                policy: policy(),
                ladder: applied(),
                reachability: Reachability::Unreachable,
                gates: Gates::OPEN,
                approval: None,
                evidence: Evidence {
                    power_state: Some(PowerState::Running),
                    agent_ready: Some(true),
                    ..Evidence::empty(at(5))
                },
                now: at(40),
            }
        }

        fn decide(&self) -> Decision {
            let failure = Failure::new(FailureReason::TlsHandshakeFailed, "alert");
            decide(&Situation {
                policy: &self.policy,
                ladder: &self.ladder,
                reachability: self.reachability,
                failure: Some(&failure),
                incident: Incident::Outage,
                evidence: Some(&self.evidence),
                gates: self.gates,
                approval: self.approval,
                seed: "uid",
                now: self.now,
            })
        }
    }

    const TLS: GuestRepair = GuestRepair::EnableTls12;

    fn restart() -> Decision {
        Decision::Act(Step::restart_after(TLS))
    }

    fn held(hold: RestartHold) -> Decision {
        Decision::RestartRequired { repair: TLS, hold }
    }

    #[rstest]
    #[case::permitted(|_: &mut Case| {}, restart())]
    #[case::not_allowed_waits_instead_of_moving_on(|c: &mut Case| c.policy.allowed_disruptive = vec![Rung::ResetNic, Rung::Redeploy], held(RestartHold::NotAllowed))]
    #[case::not_in_ladder(|c: &mut Case| c.policy.ladder.retain(|r| *r != Rung::Restart), held(RestartHold::NotInLadder))]
    #[case::approved(|c: &mut Case| { c.policy.allowed_disruptive.clear(); c.approval = Some(Rung::Restart); }, restart())]
    #[case::the_repair_ran_under_restarts_permission(|c: &mut Case| { c.policy.allowed_disruptive.clear(); c.ladder.current.as_mut().unwrap().drops_sessions = true; }, restart())]
    #[case::other_approval(|c: &mut Case| { c.policy.allowed_disruptive.clear(); c.approval = Some(Rung::Redeploy); }, held(RestartHold::NotAllowed))]
    #[case::observe(|c: &mut Case| c.policy.mode = Mode::Observe, held(RestartHold::ObserveOnly))]
    #[case::dry_run(|c: &mut Case| c.policy.mode = Mode::DryRun, Decision::Plan(Step::restart_after(TLS)))]
    #[case::paused(|c: &mut Case| c.gates.paused = true, Decision::Suspended(Suspension::Paused))]
    #[case::blind(|c: &mut Case| c.gates.blind = Some(Suspension::CanaryDown), Decision::Suspended(Suspension::CanaryDown))]
    #[case::storm(|c: &mut Case| c.gates.storm = true, Decision::Suspended(Suspension::Storm))]
    #[case::not_leader(|c: &mut Case| c.gates.leader = false, Decision::Suspended(Suspension::NotLeader))]
    #[case::fleet_slot(|c: &mut Case| c.gates.disruptive_slot_free = false, Decision::Wait { until: at(70), reason: WaitReason::FleetSlot })]
    #[case::fleet_grace(|c: &mut Case| c.gates.disruptive_grace = Duration::from_secs(60), Decision::Wait { until: at(60), reason: WaitReason::FleetGrace })]
    #[case::reachable_credits_the_repair(|c: &mut Case| c.reachability = Reachability::Reachable, Decision::Recovered)]
    #[case::unknown_waits(|c: &mut Case| c.reachability = Reachability::Unknown, Decision::Undecided)]
    #[case::stale_evidence_is_not_gathered_meanwhile(|c: &mut Case| c.now = at(4000), restart())]
    fn a_repair_that_needs_a_restart(#[case] setup: fn(&mut Case), #[case] expected: Decision) {
        let mut case = Case::new();
        setup(&mut case);
        assert_eq!(case.decide(), expected);
    }

    /// The restart's intent is dropped after the snapshot taken before it (the ladder decides
    /// again before the call): the restart is still next, never an unrelated rung.
    #[test]
    fn after_the_restarts_snapshot_the_restart_is_still_next() {
        let mut case = Case::new();
        assert_eq!(case.decide(), restart());
        case.ladder.start(Step::restart_after(TLS), at(40));
        assert_eq!(
            case.ladder.history.last().map(|r| r.outcome),
            Some(RungOutcome::Applied)
        );
        case.ladder.drop_unstarted();
        case.now = at(50);
        assert_eq!(case.decide(), restart());
        // Once the restart has its own record, the repair no longer waits for one.
        case.ladder.start(Step::restart_after(TLS), at(50));
        case.ladder.finish(RungOutcome::Failed, None, at(60), None);
        case.now = at(4000);
        assert_ne!(case.decide(), restart());
    }

    #[test]
    fn the_maintenance_window_holds_the_restart_until_it_opens() {
        let mut case = Case::new();
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
        case.now = "2026-11-22T02:30:00Z".parse().unwrap();
        assert_eq!(case.decide(), restart());
    }

    #[test]
    fn the_restart_is_credited_to_the_repair() {
        let mut ladder = applied();
        ladder.start(Step::restart_after(TLS), at(40));
        let repair = &ladder.history[0];
        assert_eq!(repair.step, Step::repair(TLS));
        assert_eq!(repair.outcome, RungOutcome::Applied);
        assert!(
            repair
                .message
                .as_deref()
                .unwrap()
                .contains("restart required")
        );
        assert_eq!(
            ladder.current.as_ref().unwrap().step.to_string(),
            "Restart(after EnableTls12)"
        );
        assert_eq!(ladder.ladder_starts.len(), 1, "still the same ladder");
        ladder.settle(at(100), at(100), None);
        assert_eq!(ladder.recover(at(130)), Some(Step::repair(TLS)));
        assert_eq!(ladder.recovered_by, Some(Step::repair(TLS)));
        assert_eq!(ladder.history[1].step, Step::restart_after(TLS));
        assert_eq!(ladder.history[1].outcome, RungOutcome::Fixed);
    }

    /// Reachable again while the restart's snapshot was being taken (the repair's changes
    /// worked without a reboot): the repair is credited and the restart never happens.
    #[test]
    fn a_recovery_before_the_restart_credits_the_repair() {
        let mut ladder = applied();
        ladder.start(Step::restart_after(TLS), at(40));
        ladder.current.as_mut().unwrap().phase = crate::ladder::ExecutionPhase::Snapshotting;
        assert_eq!(ladder.recover(at(90)), Some(Step::repair(TLS)));
        assert_eq!(ladder.recovered_by, Some(Step::repair(TLS)));
        assert!(ladder.current.is_none());
        assert_eq!(ladder.history.len(), 1, "no restart record");
        assert_eq!(ladder.history[0].outcome, RungOutcome::Fixed);
        // A repair of an earlier incident is never credited for this one.
        let mut ladder = applied();
        ladder.start(Step::restart_after(TLS), at(40));
        ladder.drop_unstarted();
        ladder.incident_started_at = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            at(500),
        ));
        assert_eq!(ladder.recover(at(600)), None);
        assert_eq!(ladder.history[0].outcome, RungOutcome::Applied);
    }

    #[test]
    fn after_the_restart_the_ladder_moves_on_without_restarting_again() {
        let mut case = Case::new();
        case.ladder.start(Step::restart_after(TLS), at(40));
        case.ladder.settle(at(100), at(100), None);
        // The guest came back after the restart (the agent was seen Ready again).
        if let Some(c) = case.ladder.current.as_mut() {
            c.guest = Some(crate::ladder::settle::GuestWatch {
                back_at: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(at(
                    100,
                ))),
                ..Default::default()
            });
        }
        case.now = at(230);
        assert_eq!(case.decide(), Decision::NotFixed);
        case.ladder.not_fixed(at(230), at(230));
        // The agent is not Ready: the in-guest rungs are skipped. The VM was restarted for the
        // repair, which uses Restart's one attempt: NIC reset, then redeploy, never a restart.
        case.evidence.agent_ready = Some(false);
        case.evidence.gathered_at = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(at(225));
        assert_eq!(case.decide(), Decision::Act(Step::rung(Rung::ResetNic)));
        assert_eq!(attempts(&case.ladder, Step::rung(Rung::Restart)), 1);
        assert_eq!(
            attempts(&case.ladder, Step::repair(TLS)),
            1,
            "the repair is not repeated"
        );
        case.ladder.start(Step::rung(Rung::ResetNic), at(230));
        case.ladder.not_fixed(at(240), at(240));
        case.now = at(250);
        assert_eq!(case.decide(), Decision::Act(Step::rung(Rung::Redeploy)));
    }

    #[test]
    fn a_failed_restart_leaves_the_restart_rung_available() {
        let mut ladder = applied();
        ladder.start(Step::restart_after(TLS), at(40));
        ladder.finish(RungOutcome::Failed, Some("Conflict".into()), at(50), None);
        assert_eq!(attempts(&ladder, Step::rung(Rung::Restart)), 0);
    }
}
