//! Whom the endpoint answers as, in the engine (pure): when the probe runs its identity step,
//! the name it must answer as, and what an answer means for the object.
//!
//! A wrong host is sticky: once the endpoint answered as another computer, every later probe
//! of that endpoint counts as `wrong_host` (and runs the identity step again) until it answers
//! as the VM's own name. So a plain handshake with the other machine never looks healthy, and
//! the ladder, which reads the same failure, never acts on this VM meanwhile.

use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};

use super::spec::ValidSpec;
use crate::{
    api::{IdentityStatus, RdpHealthStatus, ResolvedEndpoint},
    probe::{Failure, FailureReason, NlaFacts, ProbeOptions, ProbeReport},
};

/// The prober options for the next probe of `endpoint`: the identity step when it is due,
/// and the computer name from Azure it must answer as.
pub fn probe_options(
    spec: &ValidSpec,
    status: Option<&RdpHealthStatus>,
    endpoint: &ResolvedEndpoint,
    now: Timestamp,
) -> ProbeOptions {
    ProbeOptions {
        identity: identity_due(spec, status, endpoint, now),
        expect_name: endpoint.computer_name.clone(),
        ..spec.probe.options()
    }
}

/// The identity step runs on the first probe of an endpoint, after a rung that can change
/// addresses (NIC reset, redeploy), on every probe while the endpoint answers as another
/// computer, and otherwise every `identityCheckInterval`.
pub fn identity_due(
    spec: &ValidSpec,
    status: Option<&RdpHealthStatus>,
    endpoint: &ResolvedEndpoint,
    now: Timestamp,
) -> bool {
    let Some(status) = status else {
        return true;
    };
    due(
        status.identity.as_ref(),
        endpoint,
        spec.probe.identity_check_interval,
        now,
        |observed| {
            status
                .ladder
                .history
                .iter()
                .any(|r| r.step.rung.may_change_address() && r.finished_at.0 > observed)
        },
    )
}

/// Whether the identity step is due for `endpoint` given the last identity read (`id`): none
/// yet, another endpoint, a wrong host, the address possibly moved since (`moved_after` the
/// read's time), or older than `interval`.
pub fn due(
    id: Option<&IdentityStatus>,
    endpoint: &ResolvedEndpoint,
    interval: std::time::Duration,
    now: Timestamp,
    moved_after: impl FnOnce(Timestamp) -> bool,
) -> bool {
    let Some(id) = id else {
        return true;
    };
    if id.endpoint != key(endpoint) || id.matches == Some(false) {
        return true;
    }
    let observed = id.observed_at.0;
    let age = now.duration_since(observed).as_secs_f64();
    moved_after(observed) || age >= interval.as_secs_f64()
}

/// Applies what the identity step says (or said before) to a fresh report: when the endpoint
/// answers, or last answered, as another computer, the report becomes a `wrong_host` failure.
pub fn judge(
    status: Option<&RdpHealthStatus>,
    endpoint: &ResolvedEndpoint,
    mut report: ProbeReport,
) -> ProbeReport {
    let id = status.and_then(|s| s.identity.as_ref());
    if let Some(id) = id.filter(|id| still_wrong_host(Some(id), endpoint, &report)) {
        report.reachable = false;
        report.failure = Some(Failure::new(
            FailureReason::WrongHost,
            wrong_host_message(id),
        ));
    }
    report
}

/// Whether a reachable `report` that read no identity of its own still counts as a wrong host:
/// the last identity read (`id`) of the same endpoint found another computer.
pub fn still_wrong_host(
    id: Option<&IdentityStatus>,
    endpoint: &ResolvedEndpoint,
    report: &ProbeReport,
) -> bool {
    if report.nla.as_ref().is_some_and(|n| n.identity.is_some()) || !report.reachable {
        return false;
    }
    id.is_some_and(|id| id.endpoint == key(endpoint) && id.matches == Some(false))
}

/// The new `status.identity` after a probe of `endpoint`; `previous` when the probe did not
/// read an identity (a wrong host stays recorded until the endpoint answers correctly).
pub fn observed(
    previous: Option<&IdentityStatus>,
    endpoint: &ResolvedEndpoint,
    report: &ProbeReport,
    now: Timestamp,
) -> Option<IdentityStatus> {
    let Some(nla) = &report.nla else {
        return previous.cloned();
    };
    let keep_wrong_host = previous
        .is_some_and(|p| p.matches == Some(false) && p.endpoint == key(endpoint))
        && nla.identity.is_none();
    if keep_wrong_host {
        return previous.cloned();
    }
    Some(status_of(nla, endpoint, now))
}

fn status_of(nla: &NlaFacts, endpoint: &ResolvedEndpoint, now: Timestamp) -> IdentityStatus {
    let id = nla.identity.as_ref();
    let expected = endpoint.computer_name.clone();
    IdentityStatus {
        observed_at: Time(now),
        endpoint: key(endpoint),
        computer_name: id.and_then(|i| i.computer_name.clone()),
        dns_name: id.and_then(|i| i.dns_computer_name.clone()),
        domain: id.and_then(|i| i.domain.clone()),
        dns_domain: id.and_then(|i| i.dns_domain_name.clone()),
        os_version: id.and_then(|i| i.os_version.clone()),
        clock_skew_seconds: id.and_then(|i| i.clock_skew_seconds),
        credssp: nla.credssp.as_str().to_owned(),
        matches: match (id, &expected) {
            (Some(id), Some(name)) => id.answers_as(name),
            _ => None,
        },
        expected_name: expected,
    }
}

/// "answered as X, expected Y" for conditions, Events and the `wrong_host` failure.
pub fn wrong_host_message(id: &IdentityStatus) -> String {
    let answered = id
        .computer_name
        .as_deref()
        .or(id.dns_name.as_deref())
        .unwrap_or("another computer");
    format!(
        "{} answered as {answered}, not as the VM's computer name {} (identity read at {})",
        id.endpoint,
        id.expected_name.as_deref().unwrap_or("?"),
        id.observed_at.0
    )
}

fn key(endpoint: &ResolvedEndpoint) -> String {
    format!("{}:{}", endpoint.host, endpoint.port)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{
        api::{RdpHealth, conditions as types, reasons},
        engine::{Event, Observation, Outcome, conditions, evaluate, testing::*},
        probe::{Credssp, ServerIdentity},
    };

    fn azure_endpoint() -> ResolvedEndpoint {
        ResolvedEndpoint {
            computer_name: Some("vm-1".into()),
            ..endpoint()
        }
    }

    /// What the prober returns with the identity step, expecting `vm-1`.
    fn identified(name: &str, credssp: Credssp) -> ProbeReport {
        let mut report = ok_report();
        let id = ServerIdentity {
            computer_name: Some(name.into()),
            clock_skew_seconds: Some(2),
            ..ServerIdentity::default()
        };
        if id.answers_as("vm-1") == Some(false) {
            report.reachable = false;
            report.failure = Some(Failure::new(
                FailureReason::WrongHost,
                "answered as another",
            ));
        }
        report.nla = Some(NlaFacts {
            credssp,
            credssp_version: Some(6),
            identity: Some(id),
            error: None,
        });
        report
    }

    fn step(obj: &mut RdpHealth, report: ProbeReport, t: i64) -> Outcome {
        let report = judge(obj.status.as_ref(), &azure_endpoint(), report);
        let out = evaluate(
            obj,
            Observation::Probed {
                endpoint: azure_endpoint(),
                report: Box::new(report),
            },
            at(t),
        );
        obj.status = Some(out.status.clone());
        out
    }

    fn reasons_of(events: &[Event]) -> Vec<&str> {
        events.iter().map(|e| e.reason).collect()
    }

    fn condition(out: &Outcome, type_: &str) -> (String, String) {
        let c = conditions::find(&out.status.conditions, type_).unwrap();
        (c.status.clone(), c.reason.clone())
    }

    #[test]
    fn the_step_runs_first_then_by_interval_after_address_changes_and_while_wrong() {
        let spec = ValidSpec::try_from(&object(|_| {}).spec).unwrap();
        let ep = azure_endpoint();
        assert!(identity_due(&spec, None, &ep, at(0)));
        let mut obj = object(|_| {});
        step(&mut obj, identified("VM-1", Credssp::Required), 1000);
        let status = obj.status.clone().unwrap();
        assert_eq!(status.identity.as_ref().unwrap().matches, Some(true));
        assert!(!identity_due(&spec, Some(&status), &ep, at(1030)));
        assert!(!identity_due(&spec, Some(&status), &ep, at(1599)));
        assert!(
            identity_due(&spec, Some(&status), &ep, at(1600)),
            "every 10 minutes"
        );
        let moved = ResolvedEndpoint {
            host: "10.0.0.9".into(),
            ..ep.clone()
        };
        assert!(
            identity_due(&spec, Some(&status), &moved, at(1030)),
            "a new address"
        );
        let mut redeployed = status.clone();
        redeployed.ladder.history.push(crate::ladder::RungRecord {
            step: crate::ladder::Step::rung(crate::ladder::Rung::Redeploy),
            attempt: 1,
            started_at: Time(at(1005)),
            finished_at: Time(at(1020)),
            outcome: crate::ladder::RungOutcome::Fixed,
            message: None,
            snapshot: None,
            acl_backup: None,
            nic: None,
        });
        assert!(
            identity_due(&spec, Some(&redeployed), &ep, at(1030)),
            "after a redeploy"
        );
        let opts = probe_options(&spec, Some(&status), &ep, at(1030));
        assert!(!opts.identity);
        assert_eq!(opts.expect_name.as_deref(), Some("vm-1"));
        assert_eq!(opts.timeout, spec.probe.timeout);
        let _ = Duration::ZERO;
    }

    #[test]
    fn a_wrong_host_is_reported_with_both_names_and_stays_until_the_vm_answers() {
        let mut obj = object(|_| {});
        step(&mut obj, identified("VM-1", Credssp::Required), 1000);
        let out = step(&mut obj, identified("VM-7", Credssp::Required), 1010);
        assert_eq!(
            condition(&out, types::HOST_IDENTITY),
            ("False".into(), reasons::WRONG_HOST.into())
        );
        let message = &conditions::find(&out.status.conditions, types::HOST_IDENTITY)
            .unwrap()
            .message;
        assert!(
            message.contains("VM-7") && message.contains("vm-1"),
            "{message}"
        );
        assert_eq!(reasons_of(&out.events), [reasons::WRONG_HOST]);
        let spec = ValidSpec::try_from(&obj.spec).unwrap();
        assert!(identity_due(
            &spec,
            obj.status.as_ref(),
            &azure_endpoint(),
            at(1011)
        ));
        // Plain handshakes with the other machine do not look healthy: still wrong_host.
        for t in [1020, 1030, 1040] {
            let out = step(&mut obj, ok_report(), t);
            let last = out.status.last_probe.as_ref().unwrap();
            assert_eq!(last.failure_reason.as_deref(), Some("wrong_host"));
            assert!(!last.reachable);
            assert!(out.events.iter().all(|e| e.reason != reasons::RECOVERED));
        }
        assert_eq!(
            condition(&step(&mut obj, ok_report(), 1050), types::REACHABLE).0,
            "False"
        );
        // An identity step that fails to read a name keeps the verdict.
        let mut unread = ok_report();
        unread.nla = Some(NlaFacts {
            credssp: Credssp::Required,
            credssp_version: None,
            identity: None,
            error: Some("no answer".into()),
        });
        let out = step(&mut obj, unread, 1060);
        assert_eq!(out.status.identity.as_ref().unwrap().matches, Some(false));
        // The VM answers as itself again: verified, and the wrong host is over.
        let out = step(&mut obj, identified("VM-1", Credssp::Required), 1070);
        assert_eq!(
            condition(&out, types::HOST_IDENTITY),
            ("True".into(), reasons::HOST_VERIFIED.into())
        );
        assert!(out.status.last_probe.as_ref().unwrap().reachable);
        assert!(
            step(&mut obj, ok_report(), 1080)
                .status
                .last_probe
                .unwrap()
                .reachable
        );
    }

    #[test]
    fn nla_off_is_a_condition_and_one_event() {
        let mut obj = object(|_| {});
        let out = step(&mut obj, identified("VM-1", Credssp::NotRequired), 1000);
        assert_eq!(
            condition(&out, types::NLA_REQUIRED),
            ("False".into(), reasons::NLA_DISABLED.into())
        );
        assert_eq!(reasons_of(&out.events), [reasons::NLA_DISABLED]);
        let out = step(&mut obj, identified("VM-1", Credssp::NotRequired), 1700);
        assert!(out.events.is_empty(), "{:?}", out.events);
        let out = step(&mut obj, identified("VM-1", Credssp::Required), 2400);
        assert_eq!(condition(&out, types::NLA_REQUIRED).0, "True");
        assert_eq!(out.status.identity.unwrap().credssp, "required");
    }

    #[test]
    fn clock_skew_beyond_five_minutes_is_an_event() {
        let mut obj = object(|_| {});
        let mut report = identified("VM-1", Credssp::Required);
        if let Some(id) = report.nla.as_mut().and_then(|n| n.identity.as_mut()) {
            id.clock_skew_seconds = Some(-420);
        }
        let out = step(&mut obj, report, 1000);
        assert_eq!(reasons_of(&out.events), [reasons::CLOCK_SKEW]);
        assert_eq!(out.status.identity.unwrap().clock_skew_seconds, Some(-420));
    }
}
