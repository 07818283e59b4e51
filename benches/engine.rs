//! Benchmarks of the per-reconcile pure code: `schedule` (runs on every watch event),
//! `evaluate` (runs after every probe) and the ladder's `decide`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::ObjectMeta;
use rdphealth::{
    api::{
        EndpointSource, EndpointSpec, ProbeSpec, RdpHealth, RdpHealthSpec, ResolvedEndpoint, VmRef,
    },
    engine::{Observation, evaluate, schedule},
    evidence::{Availability, Evidence, PowerState, ResourceHealth},
    ladder::{
        Gates, Incident, LadderPolicy, LadderStatus, Mode, Reachability, Rung, Situation, decide,
    },
    probe::{
        CertificateFacts, Failure, FailureReason, Layers, ProbeReport, SecurityProtocol, TlsFacts,
    },
};

const VM: &str = "/subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/rg-1/providers/Microsoft.Compute/virtualMachines/vm-1";

fn t0() -> Timestamp {
    "2026-11-21T10:00:00Z".parse().unwrap()
}

fn at(secs: i64) -> Timestamp {
    t0().checked_add(SignedDuration::from_secs(secs)).unwrap()
}

fn object() -> RdpHealth {
    RdpHealth {
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
    }
}

fn ok_report() -> ProbeReport {
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
                expired: false,
                not_yet_valid: false,
                days_left: 200,
                sha1_thumbprint: "AB".into(),
                names: vec!["vm-1".into()],
                not_after_unix: 1_798_761_600,
            }),
        }),
        nla: None,
        findings: vec![],
        likely_causes: vec![],
        total_ms: 12.4,
    }
}

fn probed() -> Observation {
    Observation::Probed {
        endpoint: ResolvedEndpoint {
            host: "10.0.0.4".into(),
            port: 3389,
            source: EndpointSource::Spec,
            computer_name: None,
        },
        report: Box::new(ok_report()),
    }
}

/// A healthy object after two probes: what nearly every reconcile of a healthy fleet sees.
fn healthy() -> RdpHealth {
    let mut obj = object();
    for s in [0, 30] {
        obj.status = Some(evaluate(&obj, probed(), at(s)).status);
    }
    obj
}

fn engine_bench(c: &mut Criterion) {
    let fresh = object();
    let healthy = healthy();
    c.bench_function("schedule_new_object", |b| {
        b.iter(|| schedule(black_box(&fresh), None, at(0)))
    });
    c.bench_function("schedule_healthy_not_due", |b| {
        b.iter(|| schedule(black_box(&healthy), None, at(40)))
    });
    c.bench_function("schedule_healthy_due", |b| {
        b.iter(|| schedule(black_box(&healthy), None, at(61)))
    });
    c.bench_function("evaluate_healthy_probe", |b| {
        b.iter(|| evaluate(black_box(&healthy), probed(), at(61)))
    });
}

fn evidence() -> Evidence {
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

fn decide_bench(c: &mut Criterion) {
    let policy = LadderPolicy {
        mode: Mode::Auto,
        allowed_disruptive: vec![Rung::ResetNic, Rung::Restart, Rung::Redeploy],
        ..LadderPolicy::default()
    };
    let quiet = LadderStatus::default();
    let mut open = LadderStatus::default();
    open.open_incident(t0());
    let failure = Failure::new(FailureReason::TcpTimeout, "no answer");
    let evidence = evidence();
    let healthy = Situation {
        policy: &policy,
        ladder: &quiet,
        reachability: Reachability::Reachable,
        failure: None,
        incident: Incident::Outage,
        evidence: None,
        gates: Gates::OPEN,
        approval: None,
        seed: "uid-1",
        now: at(10),
    };
    let outage = Situation {
        ladder: &open,
        reachability: Reachability::Unreachable,
        failure: Some(&failure),
        evidence: Some(&evidence),
        ..healthy
    };
    c.bench_function("decide_healthy", |b| b.iter(|| decide(black_box(&healthy))));
    c.bench_function("decide_outage_first_rung", |b| {
        b.iter(|| decide(black_box(&outage)))
    });
}

criterion_group!(benches, engine_bench, decide_bench);
criterion_main!(benches);
