//! Builders shared by the engine's unit tests.

use k8s_openapi::jiff::Timestamp;
use kube::api::ObjectMeta;

use crate::{
    api::{
        EndpointSource, EndpointSpec, ProbeSpec, RdpHealth, RdpHealthSpec, ResolvedEndpoint, VmRef,
    },
    probe::{
        CertificateFacts, Failure, FailureReason, Finding, Layers, ProbeReport, SecurityProtocol,
        TlsFacts,
    },
};

pub(crate) const VM: &str = "/subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/rg-1/providers/Microsoft.Compute/virtualMachines/vm-1";

/// Unix second `s` as a timestamp.
pub(crate) fn at(s: i64) -> Timestamp {
    Timestamp::from_second(s).unwrap()
}

/// A valid object (generation 1, host 10.0.0.4, default probe policy), edited by `edit`.
pub(crate) fn object(edit: impl FnOnce(&mut RdpHealth)) -> RdpHealth {
    let mut obj = RdpHealth {
        metadata: ObjectMeta {
            name: Some("vm-1".into()),
            namespace: Some("default".into()),
            generation: Some(1),
            uid: Some("uid-1".into()),
            ..Default::default()
        },
        spec: RdpHealthSpec {
            vm: VmRef {
                resource_id: VM.into(),
            },
            endpoint: EndpointSpec {
                host: Some("10.0.0.4".into()),
                ..EndpointSpec::default()
            },
            probe: ProbeSpec::default(),
            remediation: Default::default(),
            evidence: Default::default(),
            suspend: false,
        },
        status: None,
    };
    edit(&mut obj);
    obj
}

pub(crate) fn endpoint() -> ResolvedEndpoint {
    ResolvedEndpoint {
        host: "10.0.0.4".into(),
        port: 3389,
        source: EndpointSource::Spec,
        computer_name: None,
    }
}

/// A reachable report over TLS with a certificate expiring in `days_left` days.
pub(crate) fn tls_report(days_left: i64, findings: Vec<Finding>) -> ProbeReport {
    ProbeReport {
        target: "10.0.0.4:3389".into(),
        reachable: true,
        failure: None,
        layers: Layers::default(),
        selected_protocol: Some(SecurityProtocol::Hybrid),
        tls: Some(TlsFacts {
            version: "TLSv1.3".into(),
            cipher_suite: None,
            certificate: Some(CertificateFacts {
                subject: "CN=vm-1".into(),
                issuer: "CN=vm-1".into(),
                not_before: "2026-01-01T00:00:00Z".into(),
                not_after: "2027-01-01T00:00:00Z".into(),
                self_signed: true,
                expired: days_left < 0,
                not_yet_valid: false,
                days_left,
                sha1_thumbprint: "AB".into(),
                names: vec!["vm-1".into()],
                not_after_unix: 1_798_761_600,
            }),
        }),
        nla: None,
        findings,
        likely_causes: vec![],
        total_ms: 12.4,
    }
}

/// A reachable report over TLS with a healthy certificate.
pub(crate) fn ok_report() -> ProbeReport {
    tls_report(200, vec![])
}

/// A failed report.
pub(crate) fn failed_report(reason: FailureReason) -> ProbeReport {
    ProbeReport {
        target: "10.0.0.4:3389".into(),
        reachable: false,
        failure: Some(Failure::new(reason, "no answer")),
        layers: Layers::default(),
        selected_protocol: None,
        tls: None,
        nla: None,
        findings: vec![],
        likely_causes: vec![],
        total_ms: 5000.0,
    }
}
