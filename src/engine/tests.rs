//! Tests of the engine entry point: sequences of observations and what they produce.

use std::time::Duration;

use rstest::rstest;

use super::{testing::*, *};
use crate::{api::conditions as types, probe::FailureReason};

/// Feeds `reports` one by one (10 s apart), carrying the status forward; returns the last
/// outcome and every event published on the way.
fn feed(obj: &mut RdpHealth, reports: Vec<ProbeReport>) -> (Outcome, Vec<Event>) {
    let mut all = Vec::new();
    let mut last = None;
    for (i, report) in reports.into_iter().enumerate() {
        let observation = Observation::Probed {
            endpoint: endpoint(),
            report: Box::new(report),
        };
        let out = evaluate(obj, observation, at(1000 + 10 * i as i64));
        obj.status = Some(out.status.clone());
        all.extend(out.events.clone());
        last = Some(out);
    }
    (last.unwrap(), all)
}

fn condition<'a>(
    out: &'a Outcome,
    type_: &str,
) -> &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    conditions::find(&out.status.conditions, type_).unwrap()
}

fn ok() -> ProbeReport {
    ok_report()
}
fn down() -> ProbeReport {
    failed_report(FailureReason::TcpTimeout)
}

#[rstest]
#[case::first_success(vec![ok()], Phase::Healthy, "True", vec![])]
#[case::first_failure_pending(vec![down()], Phase::Pending, "Unknown", vec![])]
#[case::three_failures_from_start(vec![down(), down(), down()], Phase::Unreachable, "False", vec!["BecameUnreachable"])]
#[case::one_failure_degrades(vec![ok(), down()], Phase::Degraded, "True", vec![])]
#[case::two_failures_still_reachable(vec![ok(), down(), down()], Phase::Degraded, "True", vec![])]
#[case::third_failure_unreachable(vec![ok(), down(), down(), down()], Phase::Unreachable, "False", vec!["BecameUnreachable"])]
#[case::event_only_once(vec![ok(), down(), down(), down(), down(), down()], Phase::Unreachable, "False", vec!["BecameUnreachable"])]
#[case::one_success_not_recovered(vec![down(), down(), down(), ok()], Phase::Unreachable, "False", vec!["BecameUnreachable"])]
#[case::two_successes_recover(vec![down(), down(), down(), ok(), ok()], Phase::Healthy, "True", vec!["BecameUnreachable", "Recovered"])]
#[case::flap_resets_recovery(vec![down(), down(), down(), ok(), down(), ok()], Phase::Unreachable, "False", vec!["BecameUnreachable"])]
#[case::success_clears_degraded(vec![ok(), down(), ok()], Phase::Healthy, "True", vec![])]
fn thresholds_and_events(
    #[case] reports: Vec<ProbeReport>,
    #[case] phase: Phase,
    #[case] reachable: &str,
    #[case] events: Vec<&str>,
) {
    let mut obj = object(|_| {});
    let (out, all) = feed(&mut obj, reports);
    assert_eq!(out.status.phase, Some(phase));
    assert_eq!(condition(&out, types::REACHABLE).status, reachable);
    let reasons: Vec<&str> = all.iter().map(|e| e.reason).collect();
    assert_eq!(reasons, events);
}

#[test]
fn unreachable_records_reason_time_and_faster_requeue() {
    let mut obj = object(|_| {});
    let (out, events) = feed(&mut obj, vec![ok(), down(), down(), down()]);
    let reach = condition(&out, types::REACHABLE);
    assert_eq!(reach.reason, "TcpTimeout");
    assert_eq!(reach.message, "tcp_timeout: no answer");
    // The flip happened on the 4th probe (t = 1030); the condition carries that time.
    assert_eq!(reach.last_transition_time.0, at(1030));
    assert_eq!(
        out.status
            .last_transition_to_unreachable
            .as_ref()
            .unwrap()
            .0,
        at(1030)
    );
    assert_eq!(out.status.consecutive_failures, 3);
    assert_eq!(out.status.consecutive_successes, 0);
    assert_eq!(out.next, Next::Requeue(Duration::from_secs(10)));
    let last = out.status.last_probe.as_ref().unwrap();
    assert!(!last.reachable);
    assert_eq!(last.failure_reason.as_deref(), Some("tcp_timeout"));
    assert_eq!(events[0].severity, Severity::Warning);
    assert_eq!(
        events[0].note,
        "10.0.0.4:3389 is unreachable after 3 failed probes: tcp_timeout: no answer"
    );
    assert_eq!(condition(&out, types::HEALTHY).status, "False");
}

#[test]
fn a_first_failure_is_looked_at_again_soon_and_an_outage_at_the_unhealthy_interval() {
    let mut obj = object(|_| {});
    let (out, _) = feed(&mut obj, vec![ok(), down()]);
    assert_eq!(out.next, Next::Requeue(Duration::from_secs(3)));
    let (out, _) = feed(&mut obj, vec![down()]);
    assert_eq!(out.next, Next::Requeue(Duration::from_secs(3)));
    let (out, _) = feed(&mut obj, vec![down()]);
    assert_eq!(out.status.phase, Some(Phase::Unreachable));
    assert_eq!(out.next, Next::Requeue(Duration::from_secs(10)));
    let (out, _) = feed(&mut obj, vec![ok()]);
    assert_eq!(
        out.next,
        Next::Requeue(Duration::from_secs(10)),
        "recovering"
    );
}

#[test]
fn healthy_status_is_complete() {
    let mut obj = object(|o| o.metadata.generation = Some(4));
    let (out, _) = feed(&mut obj, vec![ok()]);
    let s = &out.status;
    assert_eq!(s.observed_generation, Some(4));
    assert!(
        s.conditions
            .iter()
            .all(|c| c.observed_generation == Some(4))
    );
    let types: Vec<&str> = s.conditions.iter().map(|c| c.type_.as_str()).collect();
    assert_eq!(types, ["Valid", "Reachable", "CertificateValid", "Healthy"]);
    let last = s.last_probe.as_ref().unwrap();
    assert_eq!(last.latency_ms, 12);
    assert_eq!(last.selected_protocol.as_deref(), Some("hybrid"));
    assert_eq!(last.tls_version.as_deref(), Some("TLSv1.3"));
    assert_eq!(
        last.certificate_not_after.as_ref().unwrap().0,
        at(1_798_761_600)
    );
    assert_eq!(s.endpoint, Some(endpoint()));
    assert_eq!(out.next, Next::Requeue(Duration::from_secs(30)));
    assert_eq!(condition(&out, types::HEALTHY).reason, "Healthy");
}

#[test]
fn steady_state_keeps_transition_times() {
    let mut obj = object(|_| {});
    let (first, _) = feed(&mut obj, vec![ok()]);
    let (second, events) = feed(&mut obj, vec![ok(), ok()]);
    assert!(events.is_empty());
    for (a, b) in first
        .status
        .conditions
        .iter()
        .zip(&second.status.conditions)
    {
        assert_eq!(
            a.last_transition_time, b.last_transition_time,
            "{}",
            a.type_
        );
    }
}

#[rstest]
#[case::expiring(vec![Finding::CertificateExpiring { days_left: 3 }], "CertificateExpiring", Phase::Degraded)]
#[case::expired(vec![Finding::CertificateExpired], "CertificateExpired", Phase::Degraded)]
#[case::fine(vec![], "CertificateValid", Phase::Healthy)]
fn certificate_policy(#[case] findings: Vec<Finding>, #[case] reason: &str, #[case] phase: Phase) {
    let mut obj = object(|_| {});
    let report = tls_report(3, findings);
    let (out, events) = feed(&mut obj, vec![report.clone(), report]);
    assert_eq!(condition(&out, types::CERTIFICATE_VALID).reason, reason);
    assert_eq!(out.status.phase, Some(phase));
    let expected: Vec<&str> = if phase == Phase::Degraded {
        vec![reason]
    } else {
        vec![]
    };
    assert_eq!(
        events.iter().map(|e| e.reason).collect::<Vec<_>>(),
        expected
    );
    if phase == Phase::Degraded {
        assert_eq!(condition(&out, types::HEALTHY).reason, reason);
    }
}

#[test]
fn plain_rdp_has_no_certificate_verdict() {
    let mut obj = object(|_| {});
    let mut report = ok();
    report.tls = None;
    report.selected_protocol = Some(crate::probe::SecurityProtocol::Rdp);
    report.findings = vec![Finding::NoTls];
    let (out, _) = feed(&mut obj, vec![report]);
    let cert = condition(&out, types::CERTIFICATE_VALID);
    assert_eq!(
        (cert.status.as_str(), cert.reason.as_str()),
        ("Unknown", "NoTls")
    );
    assert_eq!(out.status.phase, Some(Phase::Healthy));
}

#[test]
fn standard_rdp_security_only_is_a_security_warning_once() {
    let mut obj = object(|_| {});
    let legacy = || {
        let mut report = ok();
        report.tls = None;
        report.selected_protocol = Some(crate::probe::SecurityProtocol::Rdp);
        report.findings = vec![Finding::NoTls, Finding::LegacyRdpSecurity];
        report
    };
    let (out, events) = feed(&mut obj, vec![legacy(), legacy(), legacy()]);
    let cert = condition(&out, types::CERTIFICATE_VALID);
    assert_eq!(
        (cert.status.as_str(), cert.reason.as_str()),
        ("False", "LegacyRdpSecurity")
    );
    assert!(cert.message.contains("SecurityLayer"), "{}", cert.message);
    // Reachable, but not healthy: degraded by the finding, reported once.
    assert_eq!(condition(&out, types::REACHABLE).status, "True");
    assert_eq!(out.status.phase, Some(Phase::Degraded));
    assert_eq!(
        events
            .iter()
            .filter(|e| e.reason == "LegacyRdpSecurity")
            .count(),
        1
    );
    assert!(crate::metrics::findings(&out.status).contains(&"legacy_rdp_security"));
    assert!(!crate::metrics::findings(&out.status).contains(&"no_tls"));
}

#[test]
fn failures_keep_the_certificate_verdict() {
    let mut obj = object(|_| {});
    let (out, _) = feed(&mut obj, vec![ok(), down()]);
    assert_eq!(condition(&out, types::CERTIFICATE_VALID).status, "True");
}

#[test]
fn invalid_spec_is_reported_once_and_waits() {
    let mut obj = object(|o| o.spec.probe.timeout = "1m".into());
    let out = evaluate(&obj, Observation::NotProbed, at(1000));
    assert_eq!(out.status.phase, Some(Phase::Invalid));
    assert_eq!(out.next, Next::AwaitChange);
    let valid = condition(&out, types::VALID);
    assert_eq!(
        (valid.status.as_str(), valid.reason.as_str()),
        ("False", "InvalidSpec")
    );
    assert!(valid.message.contains("timeout"), "{}", valid.message);
    assert_eq!(out.events.len(), 1);
    obj.status = Some(out.status);
    let again = evaluate(&obj, Observation::NotProbed, at(1010));
    assert!(again.events.is_empty());
}

#[test]
fn suspension_keeps_observations() {
    let mut obj = object(|_| {});
    feed(&mut obj, vec![ok()]);
    obj.spec.suspend = true;
    obj.metadata.generation = Some(2);
    let out = evaluate(&obj, Observation::NotProbed, at(2000));
    assert_eq!(out.status.phase, Some(Phase::Suspended));
    assert_eq!(out.next, Next::AwaitChange);
    assert!(out.status.last_probe.is_some());
    assert_eq!(out.status.observed_generation, Some(2));
    assert_eq!(condition(&out, types::HEALTHY).reason, "Suspended");
}

#[test]
fn missing_host_is_a_condition_not_a_crash() {
    let obj = object(|o| o.spec.endpoint.host = None);
    let out = evaluate(
        &obj,
        Observation::Unresolved(ResolveError::HostRequired),
        at(1000),
    );
    let reach = condition(&out, types::REACHABLE);
    assert_eq!(reach.status, "Unknown");
    assert_eq!(reach.reason, "EndpointUnresolved");
    assert_eq!(
        reach.message,
        "spec.endpoint.host is required: the operator runs without Azure credentials, so it cannot look up the VM's address (observe-only)"
    );
    assert_eq!(out.status.phase, Some(Phase::Pending));
    assert_eq!(out.next, Next::AwaitChange);
}

#[rstest]
#[case("tcp_timeout", "TcpTimeout")]
#[case("x224_timeout", "X224Timeout")]
#[case("not_rdp", "NotRdp")]
fn pascal_case(#[case] snake: &str, #[case] want: &str) {
    assert_eq!(pascal(snake), want);
}

#[test]
fn every_failure_reason_is_a_valid_condition_reason() {
    for reason in FailureReason::ALL {
        let r = pascal(reason.as_str());
        assert!(r.chars().next().unwrap().is_ascii_uppercase());
        assert!(r.chars().all(|c| c.is_ascii_alphanumeric()), "{r}");
    }
}

mod invariants {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// For any sequence of probe outcomes: Reachable becomes False only after
        /// `failureThreshold` failures in a row, becomes True again only after
        /// `successThreshold` successes in a row, every flip to/from False is exactly one
        /// event, and `lastTransitionTime` moves only on a flip.
        #[test]
        fn hysteresis_and_events(
            outcomes in proptest::collection::vec(any::<bool>(), 1..40),
            failure in 1u32..5,
            success in 1u32..5,
        ) {
            let mut obj = object(|o| {
                o.spec.probe.failure_threshold = failure;
                o.spec.probe.success_threshold = success;
            });
            let mut previous: Option<(String, Timestamp)> = None;
            let mut run_failures = 0u32;
            let mut run_successes = 0u32;
            for (i, ok) in outcomes.into_iter().enumerate() {
                if ok { run_successes += 1; run_failures = 0 } else { run_failures += 1; run_successes = 0 }
                let report = if ok { ok_report() } else { failed_report(FailureReason::TcpTimeout) };
                let now = at(1000 + i as i64);
                let out = evaluate(&obj, Observation::Probed { endpoint: endpoint(), report: Box::new(report) }, now);
                let reach = conditions::find(&out.status.conditions, types::REACHABLE).unwrap();
                let (status, since) = (reach.status.clone(), reach.last_transition_time.0);
                let became_false = out.events.iter().filter(|e| e.reason == "BecameUnreachable").count();
                let recovered = out.events.iter().filter(|e| e.reason == "Recovered").count();
                match &previous {
                    Some((before, t)) if *before == status => prop_assert_eq!(*t, since),
                    _ => prop_assert_eq!(since, now),
                }
                let was_false = previous.as_ref().is_some_and(|(s, _)| s == "False");
                if status == "False" && !was_false {
                    prop_assert!(run_failures >= failure);
                    prop_assert_eq!(became_false, 1);
                } else {
                    prop_assert_eq!(became_false, 0);
                }
                if status == "True" && was_false {
                    prop_assert!(run_successes >= success);
                    prop_assert_eq!(recovered, 1);
                } else {
                    prop_assert_eq!(recovered, 0);
                }
                prop_assert_eq!(out.status.consecutive_failures, run_failures);
                prop_assert_eq!(out.status.consecutive_successes, run_successes);
                previous = Some((status, since));
                obj.status = Some(out.status);
            }
        }
    }
}

#[test]
fn the_legacy_tls_opt_in_is_a_security_finding_while_on() {
    let mut obj = object(|o| o.spec.remediation.allow_legacy_tls = true);
    let (out, events) = feed(&mut obj, vec![ok(), ok()]);
    let c = condition(&out, types::LEGACY_TLS_ALLOWED);
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("True", "LegacyTlsAllowed")
    );
    let warnings: Vec<_> = events
        .iter()
        .filter(|e| e.reason == "LegacyTlsAllowed")
        .collect();
    assert_eq!(warnings.len(), 1, "one Event when it turns on");
    assert!(matches!(warnings[0].severity, Severity::Warning));
    assert!(crate::metrics::findings(&out.status).contains(&"legacy_tls_allowed"));

    obj.spec.remediation.allow_legacy_tls = false;
    let (out, _) = feed(&mut obj, vec![ok()]);
    assert_eq!(condition(&out, types::LEGACY_TLS_ALLOWED).status, "False");
    assert!(!crate::metrics::findings(&out.status).contains(&"legacy_tls_allowed"));
    // Never on: no condition at all.
    let mut plain = object(|_| {});
    let (out, _) = feed(&mut plain, vec![ok()]);
    assert!(conditions::find(&out.status.conditions, types::LEGACY_TLS_ALLOWED).is_none());
}
