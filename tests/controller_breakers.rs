//! Never without permission, never while blind, never a storm (the harness is
//! `operator_harness`): a standby replica changes nothing, the storm and fleet-wide breakers
//! and the canary hold the rungs, and an approval unlocks one disruptive rung once.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod operator_harness;

use operator_harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_replica_never_changes_anything() {
    let sim = Simulator::start(scenario(
        "          - { name: vm-rdp, nic: { subnet: vnet/s }, faults: [rdp_disabled], vmAccessExtension: enablevmAccess }",
    ))
    .await
    .unwrap();
    let api = Arc::new(RealApiServer::start().await);
    // Another replica holds the Lease (and keeps it).
    // MicroTime: microseconds, as the API server stores them.
    let now = k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%S%.6fZ")
        .to_string();
    api.create(
        "leases",
        NS,
        json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": "rdphealth-operator", "namespace": NS},
            "spec": {"holderIdentity": "replica-a", "leaseDurationSeconds": 3600,
                     "acquireTime": now, "renewTime": now, "leaseTransitions": 0},
        }),
    );
    let standby = Operator::start(&api, &sim, "replica-b").await;
    api.create(
        "rdphealths",
        NS,
        rdphealth("rdp", "vm-rdp", json!({"mode": "Auto", "settleTime": "1s"})),
    );
    // It probes (its metrics say unreachable) but writes nothing and calls nothing.
    standby
        .wait_metrics(&[
            r#"rdphealth_vm_reachable{name="rdp",namespace="default"} 0"#,
            r#"rdphealth_probe_failures_total{reason="tcp_refused"} 3"#,
        ])
        .await;
    assert!(standby.witness.mutating().is_empty());
    assert_eq!(sim.count("extension.put"), 0);
    assert!(api.read(|inner| status(inner, "rdp")).is_none());
    standby.shutdown().await;
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_storm_breaker_holds_disruptive_rungs() {
    let sim = Simulator::start(scenario(
        "          - { name: vm-0, nic: { subnet: vnet/s } }
          - { name: vm-1, nic: { subnet: vnet/s } }
          - { name: vm-2, nic: { subnet: vnet/s } }
          - { name: vm-3, nic: { subnet: vnet/s }, faults: [guest_hung] }
          - { name: vm-4, nic: { subnet: vnet/s }, faults: [guest_hung] }",
    ))
    .await
    .unwrap();
    let api = Arc::new(RealApiServer::start().await);
    let op = Operator::start(&api, &sim, "replica-a").await;
    for i in 0..5 {
        api.create(
            "rdphealths",
            NS,
            rdphealth(
                &format!("vm-{i}"),
                &format!("vm-{i}"),
                json!({"mode": "Observe"}),
            ),
        );
    }
    // Two of five (40% > 30%) are unreachable.
    for name in ["vm-3", "vm-4"] {
        wait_status(&api, name, "unreachable", |s| {
            s["phase"] == "Unreachable" || s["phase"] == "Diagnosing"
        })
        .await;
    }
    // Now allowed to restart: the breaker holds the disruptive rung.
    for name in ["vm-3", "vm-4"] {
        api.patch(
            "rdphealths",
            NS,
            name,
            json!({"spec": {"remediation": {
                "mode": "Auto", "ladder": ["Restart"], "allowedDisruptiveActions": ["Restart"],
                "settleTime": "1s",
            }}}),
        );
    }
    for name in ["vm-3", "vm-4"] {
        let s = wait_status(&api, name, "suspension", |s| {
            condition(s, "RemediationSuspended").is_some_and(|c| c["status"] == "True")
        })
        .await;
        let c = condition(&s, "RemediationSuspended").unwrap();
        assert_eq!(c["reason"], "StormBreaker", "{s:#}");
    }
    op.wait_metrics(&[
        r#"rdphealth_remediation_suspended{reason="StormBreaker"} 5"#,
        r#"rdphealth_findings{kind="rdp_open_to_internet",name="vm-3",namespace="default"} 1"#,
        r#"rdphealth_ladder_rung{name="vm-3",namespace="default"} 0"#,
    ])
    .await;
    api.wait_for("suspension events", WAIT, |inner| {
        (events(inner, "vm-3", "RemediationSuspended") == 1).then_some(())
    })
    .await;
    assert_eq!(sim.count("vm.restart"), 0);
    assert_eq!(sim.count("vm.redeploy"), 0);
    assert!(op.witness.mutating().is_empty());
    op.shutdown().await;
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_unlocks_one_disruptive_rung_once() {
    let (sim, api, op) = start_one(
        "{ name: vm-hung, nic: { subnet: vnet/s }, faults: [guest_hung] }",
        "hung",
        "vm-hung",
        json!({"mode": "Auto", "ladder": ["Restart"], "settleTime": "1s", "cooldown": "1s",
                   "backoff": {"initial": "1s", "max": "2s"}}),
    )
    .await;
    // Restart is disruptive and not allowed: the ladder stops and says what it needs.
    let s = wait_status(&api, "hung", "LadderExhausted", |s| {
        condition(s, "LadderExhausted").is_some_and(|c| c["status"] == "True")
    })
    .await;
    let message = condition(&s, "LadderExhausted").unwrap()["message"].clone();
    assert!(
        message
            .as_str()
            .unwrap()
            .contains("needs permission: Restart"),
        "{message}"
    );
    assert_eq!(sim.count("vm.restart"), 0);

    // One approval: one restart, remembered in status.
    api.patch(
        "rdphealths",
        NS,
        "hung",
        json!({"metadata": {"annotations": {"rdphealth.io/approve": "Restart/ticket-1"}}}),
    );
    let s = wait_status(&api, "hung", "phase Recovered", |s| {
        s["phase"] == "Recovered"
    })
    .await;
    assert_eq!(s["ladder"]["recoveredBy"]["rung"], "Restart", "{s:#}");
    assert_eq!(s["ladder"]["consumedApproval"], "Restart/ticket-1");
    assert_eq!(sim.count("vm.restart"), 1);

    // The same value approves nothing the next time.
    sim.inject("vm-hung", rdphealth::sim::Fault::GuestHung)
        .await;
    wait_status(&api, "hung", "exhausted again", |s| {
        s["ladder"]["exhausted"] == true
            && condition(s, "LadderExhausted").is_some_and(|c| c["status"] == "True")
    })
    .await;
    assert_eq!(sim.count("vm.restart"), 1, "an approval is used once");
    op.shutdown().await;
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_simultaneous_outage_trips_the_breaker_before_any_vm_acts() {
    let sim = Simulator::start(scenario(
        "          - { name: vm-0, nic: { subnet: vnet/s } }
          - { name: vm-1, nic: { subnet: vnet/s } }
          - { name: vm-2, nic: { subnet: vnet/s } }
          - { name: vm-3, nic: { subnet: vnet/s }, faults: [nic_broken] }
          - { name: vm-4, nic: { subnet: vnet/s }, faults: [nic_broken] }",
    ))
    .await
    .unwrap();
    let api = Arc::new(RealApiServer::start().await);
    let op = Operator::start_with(&api, &sim, "replica-a", grace(Duration::from_secs(3))).await;
    // Every object may restart from the start: only the grace period stands between the
    // first VM seen unreachable and a restart before the second one is seen. (The VM agent
    // is not Ready with a broken NIC, so no in-guest query delays the ladder.)
    for i in 0..5 {
        api.create(
            "rdphealths",
            NS,
            rdphealth(
                &format!("vm-{i}"),
                &format!("vm-{i}"),
                json!({
                    "mode": "Auto", "ladder": ["Restart"], "allowedDisruptiveActions": ["Restart"],
                    "settleTime": "1s",
                }),
            ),
        );
    }
    for name in ["vm-3", "vm-4"] {
        let s = wait_status(&api, name, "suspension", |s| {
            condition(s, "RemediationSuspended").is_some_and(|c| c["status"] == "True")
        })
        .await;
        let c = condition(&s, "RemediationSuspended").unwrap();
        assert_eq!(c["reason"], "StormBreaker", "{s:#}");
    }
    let waited = api.read(|inner| {
        inner.log.iter().any(|c| {
            c.resource == "rdphealths"
                && condition(&c.object["status"], "Remediating")
                    .is_some_and(|r| r["reason"] == "FleetGracePeriod")
        })
    });
    assert!(waited, "a disruptive rung waited out the grace period");
    assert_eq!(sim.count("vm.restart"), 0);
    assert!(op.witness.mutating().is_empty());
    op.shutdown().await;
    sim.shutdown().await;
}

/// Three of four VMs, spread over two subscriptions too small for the storm breaker, fail
/// together: the fleet-wide breaker holds every rung, the mild ones too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_wide_breaker_holds_every_rung_across_subscriptions() {
    const OTHER: &str = "00000000-0000-0000-0000-0000000000bb";
    let group = |vms: &str| {
        format!(
            r#"
    resourceGroups:
      - name: rg
        location: westeurope
        networkSecurityGroups:
          - name: nsg
            rules:
              - {{ name: allow-rdp, priority: 1000, access: Allow, protocol: Tcp, source: "*", destinationPort: "3389" }}
        virtualNetworks:
          - {{ name: vnet, addressPrefix: 10.0.0.0/16, subnets: [ {{ name: s, addressPrefix: 10.0.0.0/24, networkSecurityGroup: nsg }} ] }}
        vms:
{vms}"#
        )
    };
    let broken = "faults: [rdp_disabled], vmAccessExtension: enablevmAccess";
    let yaml = format!(
        "timing: {{ operation: 300ms, restart: 1s, redeploy: 2s, retryAfter: 200ms }}\nsubscriptions:\n  - id: {SUB}{}\n  - id: {OTHER}{}\n",
        group(&format!(
            "          - {{ name: vm-a0, nic: {{ subnet: vnet/s }} }}\n          - {{ name: vm-a1, nic: {{ subnet: vnet/s }}, {broken} }}"
        )),
        group(&format!(
            "          - {{ name: vm-b0, nic: {{ subnet: vnet/s }}, {broken} }}\n          - {{ name: vm-b1, nic: {{ subnet: vnet/s }}, {broken} }}"
        )),
    );
    let sim = Simulator::start(Scenario::from_yaml(&yaml).unwrap())
        .await
        .unwrap();
    let api = Arc::new(RealApiServer::start().await);
    let op = Operator::start(&api, &sim, "replica-a").await;
    let object = |vm: &str, sub: &str, remediation: Value| {
        let mut o = rdphealth(vm, vm, remediation);
        o["spec"]["vm"]["resourceId"] = json!(format!(
            "/subscriptions/{sub}/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/{vm}"
        ));
        o
    };
    let vms = [
        ("vm-a0", SUB),
        ("vm-a1", SUB),
        ("vm-b0", OTHER),
        ("vm-b1", OTHER),
    ];
    for (vm, sub) in vms {
        api.create(
            "rdphealths",
            NS,
            object(vm, sub, json!({"mode": "Observe"})),
        );
    }
    for name in ["vm-a1", "vm-b0", "vm-b1"] {
        wait_status(&api, name, "unreachable", |s| {
            condition(s, "Reachable").is_some_and(|c| c["status"] == "False")
        })
        .await;
    }
    // Now allowed to act, with the mild rung first: the breaker holds it.
    for name in ["vm-a1", "vm-b0", "vm-b1"] {
        api.patch(
            "rdphealths",
            NS,
            name,
            json!({"spec": {"remediation": {"mode": "Auto", "settleTime": "1s"}}}),
        );
    }
    for name in ["vm-a1", "vm-b0", "vm-b1"] {
        let s = wait_status(&api, name, "suspension", |s| {
            condition(s, "RemediationSuspended").is_some_and(|c| c["status"] == "True")
        })
        .await;
        let c = condition(&s, "RemediationSuspended").unwrap();
        assert_eq!(c["reason"], "FleetBreaker", "{s:#}");
    }
    op.wait_metrics(&[
        r#"rdphealth_observer_blind{cause="fleet_breaker"} 1"#,
        r#"rdphealth_remediation_suspended{reason="FleetBreaker"} 3"#,
        r#"rdphealth_remediation_suspended{reason="StormBreaker"} 0"#,
    ])
    .await;
    assert!(
        op.witness.mutating().is_empty(),
        "{:?}",
        op.witness.mutating()
    );
    assert_eq!(sim.count("extension.put"), 0);
    op.shutdown().await;
    sim.shutdown().await;
}

/// A canary the prober cannot reach: the prober may be blind, so no rung runs anywhere, not
/// even the mild ones the storm breaker lets through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_canary_holds_every_rung() {
    let sim = Simulator::start(scenario(
        "          - { name: vm-rdp, nic: { subnet: vnet/s }, faults: [rdp_disabled], vmAccessExtension: enablevmAccess }",
    ))
    .await
    .unwrap();
    let api = Arc::new(RealApiServer::start().await);
    let port = common::free_port();
    let settings = Settings {
        canary: Some(Target {
            host: "127.0.0.1".into(),
            port,
        }),
        ..grace(Duration::from_millis(200))
    };
    let op = Operator::start_with(&api, &sim, "replica-a", settings).await;
    api.create(
        "rdphealths",
        NS,
        rdphealth(
            "rdp",
            "vm-rdp",
            json!({"mode": "Auto", "settleTime": "1s", "backoff": {"initial": "1s", "max": "2s"}}),
        ),
    );
    let s = wait_status(&api, "rdp", "suspension", |s| {
        condition(s, "RemediationSuspended").is_some_and(|c| c["status"] == "True")
    })
    .await;
    let c = condition(&s, "RemediationSuspended").unwrap();
    assert_eq!(c["reason"], "CanaryDown", "{s:#}");
    op.wait_metrics(&[
        r#"rdphealth_observer_blind{cause="canary"} 1"#,
        r#"rdphealth_remediation_suspended{reason="CanaryDown"} 1"#,
    ])
    .await;
    api.wait_for("suspension event", WAIT, |inner| {
        (events(inner, "rdp", "RemediationSuspended") == 1).then_some(())
    })
    .await;
    // Still held a while later (several ladder looks at a 1 s backoff): nothing was sent.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        op.witness.mutating().is_empty(),
        "{:?}",
        op.witness.mutating()
    );
    assert_eq!(sim.count("extension.put"), 0);
    let s = api.read(|inner| status(inner, "rdp")).unwrap();
    assert_eq!(
        condition(&s, "RemediationSuspended").unwrap()["reason"],
        "CanaryDown"
    );
    op.shutdown().await;
    sim.shutdown().await;
}
