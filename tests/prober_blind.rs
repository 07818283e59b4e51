//! A blind prober does nothing: when the prober's own process runs out of file descriptors
//! (EMFILE), its probes fail with `prober_error`, which the engine never takes for a VM
//! failure. The probing runs in a child process whose open-files limit is lowered with
//! `prlimit`, then exhausted, so the parent test runner is never starved.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: failures should panic

mod common;

use std::{fs::File, process::Command};

use k8s_openapi::jiff::Timestamp;
use rdphealth::{
    api::{EndpointSource, Phase, RdpHealth, ResolvedEndpoint, conditions as types},
    engine::{self, Observation},
    metrics::Metrics,
    probe::{Prober, RdpProber, Target},
};
use serde_json::json;

const CHILD_ENV: &str = "RDPHEALTH_BLIND_PROBER_CHILD";
const PROBES: usize = 4;

#[test]
fn emfile_in_the_prober_makes_no_vm_unreachable_and_counts_prober_errors() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return child();
    }
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("prlimit")
        .args(["--nofile=256:256", "--"])
        .arg(exe)
        .args([
            "--exact",
            "emfile_in_the_prober_makes_no_vm_unreachable_and_counts_prober_errors",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .output()
        .expect("prlimit (util-linux) runs the child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "child failed:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("blind-prober-child: ok"),
        "the child did not run its checks:\n{stdout}\n{stderr}"
    );
}

fn child() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let tls = common::tls_server(time::Duration::days(-1), time::Duration::days(90));
        let addr = common::spawn(common::Peer::Tls { protocol: 1, tls }).await;
        let prober = RdpProber::new().unwrap();
        let metrics = Metrics::new().unwrap();
        let target = Target {
            host: addr.ip().to_string(),
            port: addr.port(),
        };
        let mut obj: RdpHealth = serde_json::from_value(json!({
            "apiVersion": "rdphealth.io/v1alpha1",
            "kind": "RdpHealth",
            "metadata": {"name": "vm-1", "namespace": "default", "generation": 1},
            "spec": {
                "vm": {"resourceId": "/subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/rg-1/providers/Microsoft.Compute/virtualMachines/vm-1"},
                "endpoint": {"host": addr.ip().to_string(), "port": addr.port()},
                "probe": {"failureThreshold": 2}
            }
        }))
        .unwrap();
        let spec = engine::ValidSpec::try_from(&obj.spec).unwrap();
        let endpoint = || ResolvedEndpoint {
            host: addr.ip().to_string(),
            port: addr.port(),
            source: EndpointSource::Spec,
            computer_name: None,
        };

        // Exhaust the descriptors the lowered limit leaves, holding them open.
        let mut hoard = Vec::new();
        loop {
            match File::open("/dev/null") {
                Ok(f) => hoard.push(f),
                Err(e) => {
                    assert_eq!(e.raw_os_error(), Some(24), "expected EMFILE: {e}");
                    break;
                }
            }
        }
        let mut events = Vec::new();
        for _ in 0..PROBES {
            let report = prober.probe(&target, &spec.probe.options()).await;
            assert_eq!(
                report.failure.as_ref().map(|f| f.reason.as_str()),
                Some("prober_error"),
                "{report:?}"
            );
            metrics.probe_finished(&report);
            let outcome = engine::evaluate(
                &obj,
                Observation::Probed {
                    endpoint: endpoint(),
                    report: Box::new(report),
                },
                Timestamp::now(),
            );
            events.extend(outcome.events.iter().map(|e| e.reason));
            obj.status = Some(outcome.status);
        }
        let status = obj.status.clone().unwrap();
        let condition = |t: &str| status.conditions.iter().find(|c| c.type_ == t).cloned();
        assert!(
            condition(types::REACHABLE).is_none_or(|c| c.status != "False"),
            "a blind prober made the VM unreachable: {status:?}"
        );
        assert_ne!(status.phase, Some(Phase::Unreachable));
        assert_eq!(status.consecutive_failures, 0);
        assert!(!events.contains(&"BecameUnreachable"), "{events:?}");
        assert_eq!(
            events.iter().filter(|e| **e == "ProberError").count(),
            1,
            "one Event on the transition: {events:?}"
        );
        let ready = condition(types::PROBER_READY).unwrap();
        assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("False", "ProberError"));
        assert!(metrics.prober_blind(), "readiness must report the blind prober");
        let text = metrics.render().unwrap();
        assert!(
            text.contains(&format!("rdphealth_prober_errors_total {PROBES}")),
            "{text}"
        );

        // Descriptors back: the next probe reaches the endpoint and the prober is ready again.
        drop(hoard);
        let report = prober.probe(&target, &spec.probe.options()).await;
        assert!(report.reachable, "{report:?}");
        metrics.probe_finished(&report);
        let outcome = engine::evaluate(
            &obj,
            Observation::Probed {
                endpoint: endpoint(),
                report: Box::new(report),
            },
            Timestamp::now(),
        );
        let ready = outcome
            .status
            .conditions
            .iter()
            .find(|c| c.type_ == types::PROBER_READY)
            .unwrap();
        assert_eq!(ready.status, "True");
        assert!(!metrics.prober_blind());
        println!("blind-prober-child: ok");
    });
}
