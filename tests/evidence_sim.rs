//! Evidence gathered through the real SDK adapter from the simulator, interpreted, and the
//! first decision of the ladder for each fault class; the long-running reads (the in-guest
//! query through Run Command, IP flow verify) started, carried over and polled.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: failures should panic

use std::{sync::Arc, time::Duration};

use azure_core::Url;
use k8s_openapi::jiff::Timestamp;
use rdphealth::{
    azure::{ArmClient, ArmConfig, StaticToken, VmRef},
    engine::{
        Event,
        gather::{Gathering, Vantage, gather, poll_pending},
    },
    evidence::{Evidence, ReadKind, guest::GuestScenario, nsg::Access},
    ladder::{
        Blocker, Decision, Gates, GuestRepair, Incident, LadderPolicy, LadderStatus, Mode,
        Reachability, Rung, Situation, Step, WaitReason, decide,
    },
    probe::{Failure, FailureReason},
    sim::HttpFault,
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

fn how(previous: Option<&Evidence>) -> Gathering<'_> {
    Gathering {
        vantage: Vantage {
            source: Some("203.0.113.10".parse().unwrap()),
            port: 3389,
            listener_port: Some(3389),
        },
        previous,
        first_poll: Duration::ZERO,
        guest_query: true,
        leadership: &rdphealth::engine::remediate::SoleReplica,
    }
}

/// Gathers, then polls the long-running reads until they answered (as later reconciles do).
async fn evidence(az: &ArmClient, vm: &str) -> Evidence {
    let vm = VmRef::new(SUB, "rg-rdp", vm);
    let (mut ev, _) = gather(az, &vm, &how(None), Timestamp::now()).await.unwrap();
    settle(az, &vm, &mut ev).await;
    ev
}

/// Polls `ev`'s pending reads until none is left; returns the Events they produced.
async fn settle(az: &ArmClient, vm: &VmRef, ev: &mut Evidence) -> Vec<Event> {
    let mut events = Vec::new();
    for _ in 0..200 {
        if ev.pending.is_empty() {
            return events;
        }
        events.extend(poll_pending(az, vm, ev, Timestamp::now()).await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("reads never finished: {:?}", ev.pending);
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
    assert_eq!(
        tls.guest.as_ref().unwrap().scenarios(3389),
        vec![GuestScenario::TlsDisabled],
        "the in-guest query found Schannel 36871 and TLS 1.2 off"
    );
    let flow = tls.nsg.as_ref().unwrap().ip_flow_verify.as_ref().unwrap();
    assert_eq!(flow.access, Access::Allow);
    assert!(flow.agrees_with_local_verdict);
    assert_eq!(
        blocked
            .nsg
            .as_ref()
            .unwrap()
            .ip_flow_verify
            .as_ref()
            .unwrap()
            .rule,
        "securityRules/sim-deny-rdp",
        "IP flow verify names the same rule"
    );
    assert!(
        host.guest.is_none() && host.pending.is_empty(),
        "no query without a Ready agent"
    );
    assert!(
        stopped.pending.is_empty() && stopped.nsg.as_ref().unwrap().ip_flow_verify.is_none(),
        "no long-running read on a stopped VM"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn reads_run_in_azure_are_polled_never_started_twice_and_hold_the_ladder() {
    let (sim, az) = start().await;
    let vm = VmRef::new(SUB, "rg-rdp", "vm-rdp-disabled");
    let t = Timestamp::now();
    let mut first = how(None);
    first.first_poll = Duration::from_secs(5);
    let (ev, events) = gather(&az, &vm, &first, t).await.unwrap();
    assert!(events.is_empty(), "{events:?}");
    let kinds: Vec<ReadKind> = ev.pending.iter().map(|p| p.kind).collect();
    assert_eq!(kinds, [ReadKind::IpFlowVerify, ReadKind::GuestQuery]);
    assert!(ev.guest.is_none());
    assert_eq!(sim.count("vm.runcommand"), 1);
    assert_eq!(sim.guest_queries(), 1);
    assert_eq!(sim.count("watcher.ipflowverify"), 1);
    // The ladder waits for them (no Run Command rung may collide with the query).
    assert_eq!(
        first_decision(&ev, FailureReason::TcpRefused),
        Decision::Wait {
            until: ev.pending_due().unwrap(),
            reason: WaitReason::GatheringEvidence
        }
    );

    // A refresh carries the running reads over instead of starting them again.
    let (mut refreshed, _) = gather(&az, &vm, &how(Some(&ev)), t).await.unwrap();
    assert_eq!(refreshed.pending, ev.pending);
    assert_eq!(sim.guest_queries(), 1, "a second query was started");
    assert_eq!(sim.count("watcher.ipflowverify"), 1);

    // A throttled poll keeps the handle and tries again after Retry-After.
    for read in &mut refreshed.pending {
        read.next_poll_at = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(t);
    }
    sim.inject_http_fault(HttpFault {
        operation: "operation.status".into(),
        status: 429,
        retry_after: Some(1),
        count: 2,
        code: None,
    });
    let now = Timestamp::now();
    let events = poll_pending(&az, &vm, &mut refreshed, now).await;
    assert!(events.is_empty(), "{events:?}");
    assert_eq!(refreshed.pending.len(), 2, "a throttled poll lost a handle");
    assert!(refreshed.pending.iter().all(|p| p.next_poll_at.0 > now));
    assert!(refreshed.errors.is_empty(), "{:?}", refreshed.errors);

    // Then the answers land in the evidence; the query's output is parsed, not kept.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let events = settle(&az, &vm, &mut refreshed).await;
    assert_eq!(
        refreshed.guest.as_ref().unwrap().scenarios(3389),
        vec![GuestScenario::ListenerDisabled]
    );
    assert_eq!(
        refreshed
            .nsg
            .as_ref()
            .unwrap()
            .ip_flow_verify
            .as_ref()
            .unwrap()
            .access,
        Access::Allow
    );
    let reasons: Vec<&str> = events.iter().map(|e| e.reason).collect();
    assert_eq!(reasons, ["GuestEvidenceGathered"], "{events:?}");
    assert!(!events[0].note.contains("RDPHEALTH"), "{}", events[0].note);
    assert!(sim.count("operation.status") >= 2);
    assert_eq!(sim.guest_queries(), 1);
    sim.shutdown().await;
}

#[tokio::test]
async fn reads_past_their_timeout_are_given_up_and_say_so() {
    let (sim, az) = start().await;
    let vm = VmRef::new(SUB, "rg-rdp", "vm-rdp-disabled");
    let t = Timestamp::now();
    let (mut ev, _) = gather(&az, &vm, &how(None), t).await.unwrap();
    let late = t
        .checked_add(ReadKind::GuestQuery.timeout() + Duration::from_secs(1))
        .unwrap();
    let events = poll_pending(&az, &vm, &mut ev, late).await;
    assert!(ev.pending.is_empty());
    assert!(ev.guest.is_none());
    assert_eq!(ev.errors.len(), 2, "{:?}", ev.errors);
    assert!(
        ev.errors
            .iter()
            .any(|e| e.starts_with("GuestQueryTimedOut: no answer within 300s")),
        "{:?}",
        ev.errors
    );
    assert!(events.iter().all(|e| e.reason == "EvidenceReadFailed"));
    // Nothing pending any more: the ladder goes on without them.
    let mut ladder = LadderStatus::default();
    ladder.open_incident(t);
    let policy = LadderPolicy {
        mode: Mode::Auto,
        ..LadderPolicy::default()
    };
    let failure = Failure::new(FailureReason::TcpRefused, "probe");
    assert_eq!(
        decide(&Situation {
            policy: &policy,
            ladder: &ladder,
            reachability: Reachability::Unreachable,
            failure: Some(&failure),
            incident: Incident::Outage,
            evidence: Some(&ev),
            gates: Gates::OPEN,
            approval: None,
            seed: "uid",
            now: late,
        }),
        Decision::Act(Step::rung(Rung::ResetRdpConfig))
    );
    sim.shutdown().await;
}

/// A scenario where Azure knows a service tag the operator cannot resolve: the NIC's NSG
/// allows RDP from `AzureCloud.westeurope`, which holds the prober's address; the VM refuses
/// RDP for another reason. `watchers` says whether the region has a Network Watcher.
fn service_tag_scenario(watchers: bool) -> Scenario {
    let yaml = format!(
        r#"
timing: {{ operation: 50ms, retryAfter: 50ms }}
serviceTags: {{ AzureCloud.westeurope: [203.0.113.0/24] }}
subscriptions:
  - id: {SUB}
    networkWatchers: {watchers}
    resourceGroups:
      - name: rg-rdp
        location: westeurope
        networkSecurityGroups:
          - name: nsg-nic
            rules:
              - {{ name: allow-rdp-azure, priority: 1000, access: Allow, protocol: Tcp, source: AzureCloud.westeurope, destinationPort: "3389" }}
        virtualNetworks:
          - {{ name: vnet, addressPrefix: 10.10.0.0/16, subnets: [ {{ name: default, addressPrefix: 10.10.1.0/24 }} ] }}
        vms:
          - {{ name: vm-tagged, nic: {{ subnet: vnet/default, networkSecurityGroup: nsg-nic }}, faults: [rdp_disabled], vmAccessExtension: enablevmAccess }}
"#,
        watchers = if watchers { "[westeurope]" } else { "[]" }
    );
    Scenario::from_yaml(&yaml).unwrap()
}

#[tokio::test]
async fn ip_flow_verify_overrules_a_local_verdict_that_cannot_resolve_a_service_tag() {
    let sim = Simulator::start(service_tag_scenario(true)).await.unwrap();
    let az = ArmClient::new(
        ArmConfig::new(Url::parse(&sim.arm_url()).unwrap()),
        Arc::new(StaticToken::new("test-token")),
    );
    let vm = VmRef::new(SUB, "rg-rdp", "vm-tagged");
    let (mut ev, _) = gather(&az, &vm, &how(None), Timestamp::now())
        .await
        .unwrap();
    let local = &ev.nsg.as_ref().unwrap().verdict;
    assert_eq!(local.access, Access::Deny, "the tag is unknown locally");
    assert_eq!(local.unresolved_prefixes, ["AzureCloud.westeurope"]);
    let events = settle(&az, &vm, &mut ev).await;
    let nsg = ev.nsg.as_ref().unwrap();
    let flow = nsg.ip_flow_verify.as_ref().unwrap();
    assert_eq!(flow.access, Access::Allow);
    assert_eq!(flow.rule, "securityRules/allow-rdp-azure");
    assert!(!flow.agrees_with_local_verdict);
    let mismatch = events
        .iter()
        .find(|e| e.reason == "NsgVerdictMismatch")
        .unwrap_or_else(|| panic!("no mismatch event: {events:?}"));
    assert!(
        mismatch.note.contains("AzureCloud.westeurope") && mismatch.note.contains("trusts"),
        "{}",
        mismatch.note
    );
    // The ladder trusts Azure: not blocked by the NSG, it resets the RDP configuration.
    assert_eq!(
        first_decision(&ev, FailureReason::TcpRefused),
        Decision::Act(Step::rung(Rung::ResetRdpConfig))
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn without_a_network_watcher_the_local_verdict_stands_alone() {
    let sim = Simulator::start(service_tag_scenario(false)).await.unwrap();
    let az = ArmClient::new(
        ArmConfig::new(Url::parse(&sim.arm_url()).unwrap()),
        Arc::new(StaticToken::new("test-token")),
    );
    let vm = VmRef::new(SUB, "rg-rdp", "vm-tagged");
    let (mut ev, _) = gather(&az, &vm, &how(None), Timestamp::now())
        .await
        .unwrap();
    assert_eq!(sim.count("watcher.ipflowverify"), 1, "asked once: 404");
    assert!(!ev.is_pending(ReadKind::IpFlowVerify));
    assert!(
        ev.errors.is_empty(),
        "no watcher is not an error: {:?}",
        ev.errors
    );
    settle(&az, &vm, &mut ev).await;
    assert!(ev.nsg.as_ref().unwrap().ip_flow_verify.is_none());
    assert!(matches!(
        first_decision(&ev, FailureReason::TcpRefused),
        Decision::Blocked(Blocker::NsgDenied { .. })
    ));
    sim.shutdown().await;
}

/// Azure words a user's action in `context` (`Customer Initiated`) and spells `reasonType`
/// its own way; a restart someone asked for is not a platform outage to wait out.
#[tokio::test]
async fn a_user_restart_is_not_taken_for_a_platform_outage() {
    let mut scenario = Scenario::from_file(std::path::Path::new("scenarios/demo.yaml")).unwrap();
    scenario.timing.operation = Duration::from_millis(50);
    scenario.timing.restart = Duration::from_secs(60);
    let sim = Simulator::start(scenario).await.unwrap();
    let az = ArmClient::new(
        ArmConfig::new(Url::parse(&sim.arm_url()).unwrap()),
        Arc::new(StaticToken::new("test-token")),
    );
    let vm = VmRef::new(SUB, "rg-rdp", "vm-hung");
    rdphealth::azure::Azure::restart(&az, &vm).await.unwrap();
    let (rebooting, _) = gather(&az, &vm, &how(None), Timestamp::now())
        .await
        .unwrap();
    let health = rebooting.resource_health.as_ref().unwrap();
    assert_eq!(
        health.availability,
        rdphealth::evidence::Availability::Unavailable
    );
    assert_eq!(health.context.as_deref(), Some("Customer Initiated"));
    assert!(!health.is_platform_problem(), "{health:?}");
    assert!(!matches!(
        first_decision(&rebooting, FailureReason::X224Timeout),
        Decision::Wait {
            reason: WaitReason::PlatformIssue,
            ..
        }
    ));
    sim.shutdown().await;
}

/// Resource Health `Unknown` (no signal) says nothing about Azure: the ladder acts on the rest
/// of the evidence instead of waiting for a signal that may never come.
#[tokio::test]
async fn unknown_health_does_not_hold_the_ladder() {
    let (sim, az) = start().await;
    assert!(
        sim.inject("vm-rdp-disabled", rdphealth::sim::Fault::HealthUnknown)
            .await
    );
    let ev = evidence(&az, "vm-rdp-disabled").await;
    assert_eq!(
        ev.resource_health.as_ref().unwrap().availability,
        rdphealth::evidence::Availability::Unknown
    );
    assert_eq!(
        first_decision(&ev, FailureReason::TcpRefused),
        Decision::Act(Step::rung(Rung::ResetRdpConfig))
    );
    sim.shutdown().await;
}

/// A VM behind a Standard public IP with no NSG on its NIC or subnet: `probeSource` picks the
/// path (a public prober comes through the public IP, a private one reaches the private
/// address inside the network).
fn no_nsg_scenario(probe_source: &str) -> Scenario {
    Scenario::from_yaml(&format!(
        r#"
timing: {{ operation: 50ms, retryAfter: 50ms }}
probeSource: {probe_source}
subscriptions:
  - id: {SUB}
    networkWatchers: [westeurope]
    resourceGroups:
      - name: rg-rdp
        location: westeurope
        virtualNetworks:
          - {{ name: vnet, addressPrefix: 10.10.0.0/16, subnets: [ {{ name: default, addressPrefix: 10.10.1.0/24 }} ] }}
        vms:
          - {{ name: vm-bare, nic: {{ subnet: vnet/default }} }}
"#
    ))
    .unwrap()
}

/// Through a Standard public IP, "no NSG" means closed: Azure drops the prober's traffic,
/// IP flow verify (which evaluates NSGs only) still says Allow and names no rule, and the
/// ladder reports instead of restarting a VM that is fine. From inside the network the same
/// VM is open.
#[tokio::test]
async fn no_nsg_on_a_standard_public_ip_is_closed_and_reported() {
    let sim = Simulator::start(no_nsg_scenario("203.0.113.10"))
        .await
        .unwrap();
    let az = ArmClient::new(
        ArmConfig::new(Url::parse(&sim.arm_url()).unwrap()),
        Arc::new(StaticToken::new("test-token")),
    );
    let vm = VmRef::new(SUB, "rg-rdp", "vm-bare");
    let endpoint = rdphealth::azure::Azure::endpoint(&az, &vm).await.unwrap();
    assert_eq!(endpoint.public_ip_sku.as_deref(), Some("Standard"));
    let (mut ev, _) = gather(&az, &vm, &how(None), Timestamp::now())
        .await
        .unwrap();
    settle(&az, &vm, &mut ev).await;
    let nsg = ev.nsg.as_ref().unwrap();
    assert!(nsg.closed_public_ip, "{nsg:?}");
    assert_eq!(nsg.verdict.access, Access::Allow, "no NSG rule denies");
    let flow = nsg.ip_flow_verify.as_ref().unwrap();
    assert_eq!(flow.access, Access::Allow);
    assert!(
        !flow.rule.is_empty(),
        "Azure named no rule; the evidence says so"
    );
    assert_eq!(nsg.trusted_access(), Access::Deny);
    assert_eq!(
        first_decision(&ev, FailureReason::X224Timeout),
        Decision::Blocked(Blocker::PublicIpClosed)
    );
    // The emulated VM is unreachable from the public prober.
    assert_eq!(
        sim.shared().lock().behaviour("vm-bare"),
        rdphealth::sim::Behaviour::Silent
    );
    sim.shutdown().await;

    // A prober inside the network takes the private path: no NSG there means allowed.
    let sim = Simulator::start(no_nsg_scenario("10.10.1.200"))
        .await
        .unwrap();
    let az = ArmClient::new(
        ArmConfig::new(Url::parse(&sim.arm_url()).unwrap()),
        Arc::new(StaticToken::new("test-token")),
    );
    let inside = Gathering {
        vantage: Vantage {
            source: Some("10.10.1.200".parse().unwrap()),
            port: 3389,
            listener_port: Some(3389),
        },
        previous: None,
        first_poll: Duration::ZERO,
        leadership: &rdphealth::engine::remediate::SoleReplica,
        guest_query: true,
    };
    let (ev, _) = gather(&az, &vm, &inside, Timestamp::now()).await.unwrap();
    let nsg = ev.nsg.as_ref().unwrap();
    assert!(!nsg.closed_public_ip);
    assert_eq!(nsg.trusted_access(), Access::Allow);
    assert!(matches!(
        sim.shared().lock().behaviour("vm-bare"),
        rdphealth::sim::Behaviour::Healthy { .. }
    ));
    sim.shutdown().await;
}

#[tokio::test]
async fn without_guest_query_nothing_runs_inside_the_vm() {
    let (sim, az) = start().await;
    let name = "vm-tls-broken".to_owned();
    let vm = VmRef::new(SUB, "rg-rdp", &name);
    let off = Gathering {
        guest_query: false,
        ..how(None)
    };
    let (mut ev, _) = gather(&az, &vm, &off, Timestamp::now()).await.unwrap();
    settle(&az, &vm, &mut ev).await;
    assert_eq!(
        sim.count("vm.runcommand"),
        0,
        "Observe runs nothing in the guest"
    );
    assert!(ev.guest.is_none());
    assert!(ev.power_state.is_some(), "the ARM reads still ran");
    evidence(&az, &name).await;
    assert_eq!(sim.count("vm.runcommand"), 1, "on, the query runs");
    sim.shutdown().await;
}
