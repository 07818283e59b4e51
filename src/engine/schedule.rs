//! When to probe. Every status write comes back as a watch event; `schedule` makes those
//! reconciles cheap (no probe) unless a probe is actually due or the spec changed.
//!
//! The last probe's time comes from the driver's memory when it has one: a probe that changed
//! nothing a user cares about is not written (see [`super::writes`]), so `status.lastProbe`
//! may lag behind. After a restart, with nothing remembered, the status is the memory.

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;

use super::{
    conditions::{self, Status},
    spec::ValidSpec,
};
use crate::{
    api::{Phase, RdpHealth, RdpHealthStatus, conditions as types, reasons},
    ladder::ExecutionPhase,
};

/// What the driver should do with an object now.
#[derive(Debug, Clone, PartialEq)]
pub enum Schedule {
    /// Nothing is due: look again after this long.
    Wait(Duration),
    /// Nothing can change until the object does (invalid spec or suspension already reported,
    /// endpoint that cannot be resolved).
    AwaitChange,
    /// The status must be rewritten without probing (the spec became invalid or suspended).
    Report,
    /// A probe is due.
    Probe(Box<ValidSpec>),
}

/// Decides whether `obj` needs a probe at `now`. `probed_at` is when this driver last probed
/// the object, if it remembers; the later of it and `status.lastProbe.time` counts.
pub fn schedule(obj: &RdpHealth, probed_at: Option<Timestamp>, now: Timestamp) -> Schedule {
    let none;
    let status = match &obj.status {
        Some(status) => status,
        None => {
            none = RdpHealthStatus::default();
            &none
        }
    };
    let current = status.observed_generation.is_some()
        && status.observed_generation == obj.metadata.generation;
    let spec = match ValidSpec::try_from(&obj.spec) {
        Ok(spec) => spec,
        Err(_) if current && status.phase == Some(Phase::Invalid) => return Schedule::AwaitChange,
        Err(_) => return Schedule::Report,
    };
    if spec.suspend {
        return if current && status.phase == Some(Phase::Suspended) {
            Schedule::AwaitChange
        } else {
            Schedule::Report
        };
    }
    if !current {
        return Schedule::Probe(Box::new(spec));
    }
    let unresolved = conditions::find(&status.conditions, types::REACHABLE)
        .is_some_and(|c| c.reason == reasons::ENDPOINT_UNRESOLVED);
    if unresolved {
        return Schedule::AwaitChange;
    }
    let Some((last, interval)) = on_timer(status, &spec, probed_at) else {
        return Schedule::Probe(Box::new(spec));
    };
    let elapsed = now.duration_since(last);
    // A last probe "in the future" (clock skew between replicas) counts as just done.
    let elapsed = Duration::try_from(elapsed).unwrap_or(Duration::ZERO);
    match interval.checked_sub(elapsed) {
        Some(left) if !left.is_zero() => Schedule::Wait(left),
        _ => Schedule::Probe(Box::new(spec)),
    }
}

/// The last probe (the later of `probed_at` and `status.lastProbe.time`) and the interval
/// that applies after it; `None` when the object was never probed.
fn on_timer(
    status: &RdpHealthStatus,
    spec: &ValidSpec,
    probed_at: Option<Timestamp>,
) -> Option<(Timestamp, Duration)> {
    let stored = status.last_probe.as_ref().map(|p| p.time.0);
    let last = stored.max(probed_at)?;
    let unreachable =
        conditions::status_of(&status.conditions, types::REACHABLE) == Some(Status::False);
    let interval = spec
        .probe
        .interval_after(status.consecutive_failures, unreachable);
    Some((last, interval))
}

/// When `obj`'s next probe on its timer falls due: its last probe plus the interval that
/// applies. `None` when its probes are not on a timer now: a spec that is invalid or
/// suspended, a generation not probed yet, an object never probed. For ordering objects that
/// wait for the same reconcilers; [`schedule`] decides whether to probe.
pub fn probe_due_at(obj: &RdpHealth, probed_at: Option<Timestamp>) -> Option<Timestamp> {
    let status = obj.status.as_ref()?;
    if status.observed_generation.is_none() || status.observed_generation != obj.metadata.generation
    {
        return None;
    }
    let spec = ValidSpec::try_from(&obj.spec).ok().filter(|s| !s.suspend)?;
    let (last, interval) = on_timer(status, &spec, probed_at)?;
    last.checked_add(interval).ok()
}

/// When the remediation ladder needs a look of its own (no probe): the next poll of a running
/// operation or of an evidence read, the end of settling, the deadline of an unanswered
/// request, or the end of a backoff. Drivers reconcile at that time without probing, so
/// polling and settling never make probes more frequent than the probe intervals.
pub fn ladder_due(status: &RdpHealthStatus, spec: &ValidSpec) -> Option<Timestamp> {
    let ladder = &status.ladder;
    let current = ladder.current.as_ref().and_then(|c| match c.phase {
        ExecutionPhase::Requested => crate::ladder::nic::requested_at(c)
            .checked_add(spec.ladder.request_timeout)
            .ok(),
        ExecutionPhase::Running => c.next_poll_at.as_ref().map(|t| t.0),
        ExecutionPhase::Settling => {
            let due = crate::ladder::settle::due(c, spec.ladder.settle_time);
            // A NIC restore Azure was too busy for is tried again at `nextPollAt`.
            match c.next_poll_at.as_ref() {
                Some(retry) if crate::ladder::nic::restore_due(c) => due.map(|d| d.max(retry.0)),
                _ => due,
            }
        }
        ExecutionPhase::Snapshotting => match &c.operation {
            Some(_) => c.next_poll_at.as_ref().map(|t| t.0),
            None => c.started_at.0.checked_add(spec.ladder.request_timeout).ok(),
        },
        // The restart is decided on the probes' own reconciles.
        ExecutionPhase::AwaitingRestart => None,
    });
    let backoff = ladder
        .next_action_at
        .as_ref()
        .map(|t| t.0)
        .filter(|_| ladder.current.is_none() && ladder.incident_started_at.is_some());
    let reads = status
        .diagnosis
        .as_ref()
        .and_then(crate::evidence::Evidence::pending_due)
        .filter(|_| ladder.incident_started_at.is_some());
    [current, backoff, reads].into_iter().flatten().min()
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime, Time};
    use rstest::rstest;

    use super::*;
    use crate::{
        api::{LastProbe, RdpHealthStatus},
        engine::testing::{at, object},
    };

    fn probed(at_s: i64, failures: u32, reachable: &str, generation: i64) -> RdpHealthStatus {
        RdpHealthStatus {
            observed_generation: Some(generation),
            phase: Some(Phase::Healthy),
            conditions: vec![Condition {
                type_: "Reachable".into(),
                status: reachable.into(),
                reason: "Reachable".into(),
                message: String::new(),
                observed_generation: Some(generation),
                last_transition_time: Time(at(0)),
            }],
            last_probe: Some(LastProbe {
                time: MicroTime(at(at_s)),
                reachable: failures == 0,
                failure_reason: None,
                message: None,
                latency_ms: 1,
                selected_protocol: None,
                tls_version: None,
                certificate_not_after: None,
            }),
            consecutive_failures: failures,
            ..Default::default()
        }
    }

    fn secs(s: u64) -> Schedule {
        Schedule::Wait(Duration::from_secs(s))
    }

    /// Object with interval 30s, unhealthyInterval 10s, confirmInterval 3s, generation 1.
    #[rstest]
    #[case::never_probed(None, 100, "probe")]
    #[case::fresh_healthy(Some(probed(90, 0, "True", 1)), 100, "wait 20")]
    #[case::due_healthy(Some(probed(70, 0, "True", 1)), 100, "probe")]
    #[case::overdue_healthy(Some(probed(10, 0, "True", 1)), 100, "probe")]
    #[case::a_first_failure_is_confirmed_quickly(Some(probed(98, 1, "True", 1)), 100, "wait 1")]
    #[case::confirmation_due(Some(probed(97, 1, "True", 1)), 100, "probe")]
    #[case::confirming_a_new_object(Some(probed(98, 2, "Unknown", 1)), 100, "wait 1")]
    #[case::failing_due(Some(probed(90, 1, "True", 1)), 100, "probe")]
    #[case::unreachable_uses_unhealthy_interval(Some(probed(95, 3, "False", 1)), 100, "wait 5")]
    #[case::recovering_uses_unhealthy_interval(Some(probed(95, 0, "False", 1)), 100, "wait 5")]
    #[case::spec_changed(Some(probed(99, 0, "True", 0)), 100, "probe")]
    #[case::clock_skew(Some(probed(130, 0, "True", 1)), 100, "wait 30")]
    fn probe_timing(#[case] status: Option<RdpHealthStatus>, #[case] now: i64, #[case] want: &str) {
        let mut obj = object(|_| {});
        obj.status = status;
        let got = schedule(&obj, None, at(now));
        match want {
            "probe" => assert!(matches!(got, Schedule::Probe(_)), "{got:?}"),
            "wait 20" => assert_eq!(got, secs(20)),
            "wait 5" => assert_eq!(got, secs(5)),
            "wait 1" => assert_eq!(got, secs(1)),
            "wait 30" => assert_eq!(got, secs(30)),
            other => panic!("bad case {other}"),
        }
    }

    /// Object with interval 30s, unhealthyInterval 10s, confirmInterval 3s, generation 1.
    #[rstest]
    #[case::never_probed(None, None, None)]
    #[case::healthy(Some(probed(90, 0, "True", 1)), None, Some(120))]
    #[case::remembered_probe_is_later(Some(probed(90, 0, "True", 1)), Some(95), Some(125))]
    #[case::confirming(Some(probed(98, 1, "True", 1)), None, Some(101))]
    #[case::unreachable(Some(probed(95, 3, "False", 1)), None, Some(105))]
    #[case::spec_changed(Some(probed(99, 0, "True", 0)), None, None)]
    fn probe_due_times(
        #[case] status: Option<RdpHealthStatus>,
        #[case] remembered: Option<i64>,
        #[case] want: Option<i64>,
    ) {
        let mut obj = object(|_| {});
        obj.status = status;
        assert_eq!(probe_due_at(&obj, remembered.map(at)), want.map(at));
    }

    /// With the default policy, a VM that breaks right after a probe is unreachable one
    /// interval and two quick confirmations later (36 s), not one interval and two unhealthy
    /// intervals (50 s); from then on it is probed every unhealthy interval.
    #[test]
    fn an_outage_right_after_a_probe_is_confirmed_within_an_interval_and_two_quick_probes() {
        use crate::{
            engine::{
                Observation, evaluate,
                testing::{endpoint, failed_report, ok_report},
            },
            probe::FailureReason,
        };
        let mut obj = object(|_| {});
        let mut probes = Vec::new();
        let mut t = 0;
        let unreachable = |obj: &RdpHealth| {
            let status = obj.status.as_ref().map(|s| s.conditions.as_slice());
            conditions::status_of(status.unwrap_or_default(), types::REACHABLE)
                == Some(Status::False)
        };
        while !unreachable(&obj) {
            assert!(t <= 100, "not confirmed after {t} s");
            match schedule(&obj, None, at(t)) {
                Schedule::Wait(left) => t += i64::try_from(left.as_secs()).unwrap(),
                Schedule::Probe(_) => {
                    // The first probe finds it healthy; it breaks right after.
                    let report = if probes.is_empty() {
                        ok_report()
                    } else {
                        failed_report(FailureReason::TcpRefused)
                    };
                    let observation = Observation::Probed {
                        endpoint: endpoint(),
                        report: Box::new(report),
                    };
                    obj.status = Some(evaluate(&obj, observation, at(t)).status);
                    probes.push(t);
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(probes, [0, 30, 33, 36]);
        assert_eq!(schedule(&obj, None, at(36)), secs(10));
    }

    #[rstest]
    #[case::invalid_new(|o: &mut RdpHealth| o.spec.probe.interval = "x".into(), None, Schedule::Report)]
    #[case::invalid_reported(|o: &mut RdpHealth| o.spec.probe.interval = "x".into(), Some(Phase::Invalid), Schedule::AwaitChange)]
    #[case::suspended_new(|o: &mut RdpHealth| o.spec.suspend = true, Some(Phase::Healthy), Schedule::Report)]
    #[case::suspended_reported(|o: &mut RdpHealth| o.spec.suspend = true, Some(Phase::Suspended), Schedule::AwaitChange)]
    fn no_probe_needed(
        #[case] edit: fn(&mut RdpHealth),
        #[case] phase: Option<Phase>,
        #[case] want: Schedule,
    ) {
        let mut obj = object(edit);
        obj.status = Some(RdpHealthStatus {
            observed_generation: Some(1),
            phase,
            ..Default::default()
        });
        assert_eq!(schedule(&obj, None, at(100)), want);
    }

    fn ladder(phase: Option<ExecutionPhase>, next_action: Option<i64>) -> RdpHealthStatus {
        use crate::ladder::{Rung, RungExecution, Step};
        let mut status = RdpHealthStatus::default();
        status.ladder.incident_started_at = Some(Time(at(0)));
        status.ladder.next_action_at = next_action.map(|s| Time(at(s)));
        status.ladder.current = phase.map(|phase| RungExecution {
            step: Step::rung(Rung::Restart),
            attempt: 1,
            phase,
            started_at: Time(at(100)),
            operation: None,
            next_poll_at: Some(Time(at(110))),
            settle_until: Some(Time(at(130))),
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
        status
    }

    #[rstest]
    #[case::idle(None, None, None)]
    #[case::backoff(None, Some(500), Some(500))]
    #[case::requested_waits_for_the_request_timeout(
        Some(ExecutionPhase::Requested),
        None,
        Some(220)
    )]
    #[case::running_polls(Some(ExecutionPhase::Running), None, Some(110))]
    #[case::settling_judges(Some(ExecutionPhase::Settling), None, Some(130))]
    #[case::rung_in_flight_ignores_old_backoff(Some(ExecutionPhase::Running), Some(500), Some(110))]
    fn ladder_looks_without_probing(
        #[case] phase: Option<ExecutionPhase>,
        #[case] next_action: Option<i64>,
        #[case] want: Option<i64>,
    ) {
        let obj = object(|_| {});
        let spec = ValidSpec::try_from(&obj.spec).unwrap();
        assert_eq!(ladder_due(&ladder(phase, next_action), &spec), want.map(at));
    }

    #[test]
    fn a_closed_incident_has_no_backoff_to_wait_for() {
        let obj = object(|_| {});
        let spec = ValidSpec::try_from(&obj.spec).unwrap();
        let mut status = ladder(None, Some(500));
        status.ladder.incident_started_at = None;
        assert_eq!(ladder_due(&status, &spec), None);
    }

    #[test]
    fn pending_evidence_reads_are_polled_without_probing() {
        use crate::evidence::{Evidence, PendingRead, ReadKind};
        let obj = object(|_| {});
        let spec = ValidSpec::try_from(&obj.spec).unwrap();
        let mut status = ladder(None, Some(500));
        let mut ev = Evidence::empty(at(50));
        ev.pending.push(PendingRead {
            kind: ReadKind::GuestQuery,
            async_operation_url: Some("http://arm/op/1".into()),
            location_url: None,
            started_at: Time(at(50)),
            next_poll_at: Time(at(60)),
        });
        status.diagnosis = Some(ev);
        assert_eq!(ladder_due(&status, &spec), Some(at(60)));
        status.ladder.incident_started_at = None;
        status.ladder.next_action_at = None;
        assert_eq!(
            ladder_due(&status, &spec),
            None,
            "reads of a closed incident are not polled"
        );
    }

    #[test]
    fn unresolved_endpoint_waits_for_a_change() {
        let mut obj = object(|o| o.spec.endpoint.host = None);
        let mut status = probed(90, 0, "Unknown", 1);
        status.conditions[0].reason = reasons::ENDPOINT_UNRESOLVED.into();
        status.last_probe = None;
        obj.status = Some(status);
        assert_eq!(schedule(&obj, None, at(100)), Schedule::AwaitChange);
    }

    /// Object with interval 30s; the status was last written at second 10.
    #[rstest]
    #[case::nothing_remembered(None, 100, "probe")]
    #[case::remembered_recent_probe(Some(90), 100, "wait 20")]
    #[case::remembered_probe_due(Some(70), 100, "probe")]
    #[case::stored_probe_is_newer(Some(5), 12, "wait 28")]
    fn a_remembered_probe_counts_over_the_stored_one(
        #[case] probed_at: Option<i64>,
        #[case] now: i64,
        #[case] want: &str,
    ) {
        let mut obj = object(|_| {});
        obj.status = Some(probed(10, 0, "True", 1));
        let got = schedule(&obj, probed_at.map(at), at(now));
        match want {
            "probe" => assert!(matches!(got, Schedule::Probe(_)), "{got:?}"),
            "wait 20" => assert_eq!(got, secs(20)),
            "wait 28" => assert_eq!(got, secs(28)),
            other => panic!("bad case {other}"),
        }
    }

    #[test]
    fn a_remembered_probe_does_not_hide_a_spec_change() {
        let mut obj = object(|o| o.metadata.generation = Some(2));
        obj.status = Some(probed(99, 0, "True", 1));
        assert!(matches!(
            schedule(&obj, Some(at(99)), at(100)),
            Schedule::Probe(_)
        ));
    }
}
