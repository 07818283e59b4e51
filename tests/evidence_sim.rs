//! Evidence gathered through the real SDK adapter from the simulator, interpreted, and the
//! first decision of the ladder for each fault class.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: failures should panic

use std::{sync::Arc, time::Duration};

use azure_core::Url;
use k8s_openapi::jiff::Timestamp;
use rdphealth::{
    azure::{ArmClient, ArmConfig, StaticToken, VmRef},
    engine::gather::{Vantage, gather},
    evidence::{Evidence, nsg::Access},
    ladder::{
        Blocker, Decision, Gates, GuestRepair, Incident, LadderPolicy, LadderStatus, Mode,
        Reachability, Rung, Situation, Step, WaitReason, decide,
    },
    probe::{Failure, FailureReason},
    sim::{Scenario, Simulator},
};

const SUB: &str = "00000000-0000-0000-0000-0000000de000";

async fn start() -> (Simulator, ArmClient) {
    let mut scenario = Scenario::from_file(std::path::Path::new("scenarios/demo.yaml")).unwrap();
    scenario.timing.operation = Duration::from_millis(50);
    let sim = Simulator::start(scenario).await.unwrap();
    let az = ArmClient::new(
        ArmConfig::new(Url::parse(&sim.arm_url()).unwrap()),
        Arc::new(StaticToken::new("test-token")),
    );
    (sim, az)
}

async fn evidence(az: &ArmClient, vm: &str) -> Evidence {
    let vantage = Vantage {
        source: Some("203.0.113.10".parse().unwrap()),
        port: 3389,
    };
    gather(
        az,
        &VmRef::new(SUB, "rg-rdp", vm),
        vantage,
        Timestamp::now(),
    )
    .await
    .unwrap()
}

fn first_decision(evidence: &Evidence, reason: FailureReason) -> Decision {
    let policy = LadderPolicy {
        mode: Mode::Auto,
        allowed_disruptive: vec![Rung::ResetNic, Rung::Restart, Rung::Redeploy],
        ..LadderPolicy::default()
    };
    let mut ladder = LadderStatus::default();
    ladder.open_incident(evidence.gathered_at.0);
    let failure = Failure::new(reason, "probe");
    decide(&Situation {
        policy: &policy,
        ladder: &ladder,
        reachability: Reachability::Unreachable,
        failure: Some(&failure),
        incident: Incident::Outage,
        evidence: Some(evidence),
        gates: Gates::OPEN,
        approval: None,
        seed: "uid",
        now: evidence.gathered_at.0,
    })
}

#[tokio::test]
async fn each_fault_class_gets_its_evidence_and_first_decision() {
    let (sim, az) = start().await;

    let healthy = evidence(&az, "vm-healthy").await;
    assert!(healthy.errors.is_empty(), "{:?}", healthy.errors);
    assert_eq!(healthy.agent_ready, Some(true));
    let nsg = healthy.nsg.as_ref().unwrap();
    assert_eq!(nsg.verdict.access, Access::Allow);
    assert!(
        nsg.open_to_internet,
        "the demo's allow-rdp rules use source *"
    );

    let blocked = evidence(&az, "vm-nsg-blocked").await;
    let verdict = &blocked.nsg.as_ref().unwrap().verdict;
    assert_eq!(verdict.access, Access::Deny);
    assert_eq!(
        verdict.denying_rule().unwrap().rule,
        "securityRules/sim-deny-rdp"
    );
    assert!(matches!(
        first_decision(&blocked, FailureReason::X224Timeout),
        Decision::Blocked(Blocker::NsgDenied { .. })
    ));

    let stopped = evidence(&az, "vm-stopped").await;
    assert!(stopped.power_state.unwrap().is_down());
    assert_eq!(
        first_decision(&stopped, FailureReason::TcpRefused),
        Decision::Blocked(Blocker::VmNotRunning)
    );

    let outage = evidence(&az, "vm-outage").await;
    assert!(matches!(
        first_decision(&outage, FailureReason::X224Timeout),
        Decision::Wait {
            reason: WaitReason::PlatformIssue,
            ..
        }
    ));

    let host = evidence(&az, "vm-host-failure").await;
    assert_eq!(host.agent_ready, Some(false));
    assert_eq!(
        first_decision(&host, FailureReason::X224Timeout),
        Decision::Act(Step::rung(Rung::ResetNic)),
        "agent rungs are skipped; a degraded host is not a platform wait"
    );

    let refused = evidence(&az, "vm-rdp-disabled").await;
    assert_eq!(
        first_decision(&refused, FailureReason::TcpRefused),
        Decision::Act(Step::rung(Rung::ResetRdpConfig))
    );

    let tls = evidence(&az, "vm-tls-broken").await;
    assert_eq!(
        first_decision(&tls, FailureReason::TlsHandshakeFailed),
        Decision::Act(Step::repair(GuestRepair::EnableTls12))
    );
    sim.shutdown().await;
}
