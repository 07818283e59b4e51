//! Exactly once (the harness is `operator_harness`): an operator restarted mid-operation
//! resumes polling instead of sending again; throttling, preemption, a lost answer and a
//! decision on a stale copy never lead to a second write; an operation URL that is not ARM's
//! is never polled.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod operator_harness;

use operator_harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_during_redeploy_resumes_polling_without_a_second_redeploy() {
    let sim = Simulator::start(scenario(
        "          - { name: vm-host, nic: { subnet: vnet/s }, faults: [host_failure] }",
    ))
    .await
    .unwrap();
    let api = Arc::new(RealApiServer::start().await);
    let first = Operator::start(&api, &sim, "replica-a").await;
    api.create(
        "rdphealths",
        NS,
        rdphealth(
            "host",
            "vm-host",
            json!({
                "mode": "Auto", "ladder": ["Redeploy"], "allowedDisruptiveActions": ["Redeploy"],
                "settleTime": "1s", "backoff": {"initial": "1s", "max": "2s"},
            }),
        ),
    );
    let before = sim.vm("vm-host").unwrap().public_ip.unwrap();
    wait_status(&api, "host", "a running redeploy", |s| {
        s["ladder"]["current"]["phase"] == "Running"
    })
    .await;
    first.shutdown().await;
    assert_eq!(sim.count("vm.redeploy"), 1);

    let second = Operator::start(&api, &sim, "replica-b").await;
    let s = wait_status(&api, "host", "phase Recovered", |s| {
        s["phase"] == "Recovered"
    })
    .await;
    assert_eq!(s["ladder"]["recoveredBy"]["rung"], "Redeploy", "{s:#}");
    assert_eq!(sim.count("vm.redeploy"), 1, "redeployed twice");
    assert!(
        second.witness.mutating().is_empty(),
        "the new operator only polled"
    );
    // A redeploy moves the VM to another host but keeps its Standard public IP; the endpoint
    // was looked up again and is the same.
    let after = sim.vm("vm-host").unwrap().public_ip.unwrap();
    assert_eq!(before, after);
    assert_eq!(s["endpoint"]["host"], after);
    second
        .wait_metrics(&[r#"rdphealth_remediations_total{result="fixed",rung="Redeploy"} 1"#])
        .await;
    second.shutdown().await;
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_while_the_guest_query_runs_resumes_polling_it() {
    // Run Command takes 3 s here, so the operator stops while the query runs.
    let sim = Simulator::start(scenario_timed(
        "3s",
        "          - { name: vm-rdp, nic: { subnet: vnet/s }, faults: [rdp_disabled], vmAccessExtension: enablevmAccess }",
    ))
    .await
    .unwrap();
    let api = Arc::new(RealApiServer::start().await);
    let first = Operator::start(&api, &sim, "replica-a").await;
    api.create(
        "rdphealths",
        NS,
        rdphealth(
            "rdp",
            "vm-rdp",
            json!({"mode": "Auto", "settleTime": "1s", "backoff": {"initial": "1s", "max": "2s"}}),
        ),
    );
    let s = wait_status(&api, "rdp", "a pending guest query", |s| {
        pending_kinds(&s["diagnosis"]).contains(&"GuestQuery".to_string())
    })
    .await;
    let c = condition(&s, "Remediating").unwrap();
    assert_eq!(c["reason"], "GatheringEvidence", "{s:#}");
    assert_eq!(s["phase"], "Diagnosing", "{s:#}");
    let witness = Arc::clone(&first.witness);
    first.shutdown().await;
    assert_eq!(witness.guest_queries(), 1);
    assert_eq!(sim.guest_queries(), 1);
    let s = api.read(|inner| status(inner, "rdp")).unwrap();
    assert!(
        s["diagnosis"]["guest"].is_null() && !pending_kinds(&s["diagnosis"]).is_empty(),
        "the first operator saw the answer: {s:#}"
    );

    let second = Operator::start(&api, &sim, "replica-b").await;
    let s = wait_status(&api, "rdp", "phase Recovered", |s| {
        s["phase"] == "Recovered"
    })
    .await;
    assert_eq!(
        s["ladder"]["recoveredBy"]["rung"], "ResetRdpConfig",
        "{s:#}"
    );
    assert_eq!(
        second.witness.guest_queries(),
        0,
        "the new operator started a second query"
    );
    assert_eq!(sim.guest_queries(), 1);
    assert_eq!(sim.count("vm.runcommand"), 1);
    let calls = second.witness.mutating();
    assert_eq!(
        calls.iter().map(|c| c.operation).collect::<Vec<_>>(),
        ["create_os_disk_snapshot", "reset_rdp_config"],
        "{calls:?}"
    );
    let diagnoses = api.read(|inner| stored_diagnoses(inner, "rdp"));
    assert!(
        diagnoses
            .iter()
            .any(|d| d["guest"]["registry"]["fDenyTSConnections"] == "1"),
        "the resumed poll stored the answer: {diagnoses:#?}"
    );
    second.shutdown().await;
    sim.shutdown().await;
}

/// Compute throttles the rung's write (429 `OperationNotAllowed`, `TooManyRequests`): nothing
/// ran, so the ladder waits what Azure asked and decides again; the rung is carried out once
/// after the wait and no failed attempt is recorded (one attempt per rung would otherwise end
/// the ladder).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_write_is_waited_out_and_decided_again_never_failed() {
    let (sim, api, op) = start_one(
        "{ name: vm-rdp, nic: { subnet: vnet/s }, faults: [rdp_disabled], vmAccessExtension: enablevmAccess }",
        "busy",
        "vm-rdp",
        json!({"mode": "Auto", "ladder": ["ResetRdpConfig"], "settleTime": "1s", "backoff": {"initial": "1s", "max": "2s"}}),
    )
    .await;
    sim.inject_http_fault(HttpFault {
        operation: "extension.put".into(),
        status: 429,
        retry_after: Some(2),
        count: 1,
        code: Some("OperationNotAllowed".into()),
    });
    let s = wait_status(&api, "busy", "phase Recovered", |s| {
        s["phase"] == "Recovered"
    })
    .await;
    assert_eq!(
        s["ladder"]["recoveredBy"]["rung"], "ResetRdpConfig",
        "{s:#}"
    );
    let history = s["ladder"]["history"].as_array().unwrap();
    assert_eq!(history.len(), 1, "{s:#}");
    assert_eq!(history[0]["outcome"], "Fixed");
    assert_eq!(history[0]["attempt"], 1);
    assert_eq!(
        sim.count("extension.put"),
        2,
        "the refused PUT and one more"
    );
    api.wait_for("the deferral event", WAIT, |inner| {
        (events(inner, "busy", "RemediationDeferred") == 1
            && events(inner, "busy", "RemediationFailed") == 0)
            .then_some(())
    })
    .await;
    op.shutdown().await;
    sim.shutdown().await;
}

/// Someone else restarts the VM while the operator's restart runs: Compute preempts the
/// operator's operation (`Canceled`, `OperationPreempted`). It is not repeated; the probe
/// judges it, and it is recorded with what happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_preempted_restart_is_never_repeated_and_the_probe_judges_it() {
    let (sim, api, op) = start_one(
        "{ name: vm-hung, nic: { subnet: vnet/s }, faults: [guest_hung] }",
        "preempt",
        "vm-hung",
        json!({
            "mode": "Auto", "ladder": ["Restart"], "allowedDisruptiveActions": ["Restart"],
            "settleTime": "2s", "backoff": {"initial": "1s", "max": "2s"},
        }),
    )
    .await;
    wait_status(&api, "preempt", "a running restart", |s| {
        s["ladder"]["current"]["phase"] == "Running"
    })
    .await;
    let az = ArmClient::new(
        ArmConfig::new(Url::parse(&sim.arm_url()).unwrap()),
        Arc::new(StaticToken::new("someone-else")),
    );
    az.restart(&VmRef::new(SUB, "rg", "vm-hung")).await.unwrap();
    let s = wait_status(&api, "preempt", "phase Recovered", |s| {
        s["phase"] == "Recovered"
    })
    .await;
    let history = s["ladder"]["history"].as_array().unwrap();
    assert_eq!(history.len(), 1, "{s:#}");
    assert_eq!(history[0]["outcome"], "Fixed", "{s:#}");
    assert!(
        history[0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("OperationPreempted")),
        "{s:#}"
    );
    assert_eq!(
        sim.count("vm.restart"),
        2,
        "ours and the other one, never a third"
    );
    api.wait_for("the preemption event", WAIT, |inner| {
        (events(inner, "preempt", "RemediationPreempted") == 1).then_some(())
    })
    .await;
    op.shutdown().await;
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operation_url_that_is_not_arms_is_never_polled() {
    // Restart takes long enough here that the operator stops while it runs.
    let sim = Simulator::start(scenario_timed(
        "300ms",
        "          - { name: vm-host, nic: { subnet: vnet/s }, faults: [host_failure] }",
    ))
    .await
    .unwrap();
    let api = Arc::new(RealApiServer::start().await);
    let first = Operator::start(&api, &sim, "replica-a").await;
    api.create(
        "rdphealths",
        NS,
        rdphealth(
            "host",
            "vm-host",
            json!({
                "mode": "Auto", "ladder": ["Redeploy"], "allowedDisruptiveActions": ["Redeploy"],
                "settleTime": "1s", "backoff": {"initial": "1s", "max": "2s"},
            }),
        ),
    );
    wait_status(&api, "host", "a running redeploy", |s| {
        s["ladder"]["current"]["phase"] == "Running"
    })
    .await;
    first.shutdown().await;
    // Whoever can write the status points the operation at their own listener.
    let spy = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let spy_url = format!("http://{}/operations/steal", spy.local_addr().unwrap());
    let received = Arc::new(Mutex::new(Vec::<String>::new()));
    let log = Arc::clone(&received);
    let spy_task = tokio::spawn(async move {
        while let Ok((mut sock, _)) = spy.accept().await {
            let mut buf = vec![0u8; 8192];
            let n = sock.read(&mut buf).await.unwrap_or(0);
            log.lock()
                .unwrap()
                .push(String::from_utf8_lossy(&buf[..n]).into_owned());
            let _ = sock
                .write_all(b"HTTP/1.1 202 Accepted\r\ncontent-length: 0\r\n\r\n")
                .await;
        }
    });
    api.patch_status(
        "rdphealths",
        NS,
        "host",
        json!({"status": {"ladder": {"current": {"operation": {
            "asyncOperationUrl": spy_url, "locationUrl": spy_url,
        }}}}}),
    );
    let second = Operator::start(&api, &sim, "replica-b").await;
    let s = wait_status(&api, "host", "the refused URL said in status", |s| {
        condition(s, "OperationUrlsTrusted").is_some_and(|c| c["status"] == "False")
    })
    .await;
    let c = condition(&s, "OperationUrlsTrusted").unwrap();
    assert_eq!(c["reason"], "UntrustedOperationUrl", "{c:#}");
    assert!(
        !c["message"].as_str().unwrap().contains("steal"),
        "only the origin is named: {c:#}"
    );
    api.wait_for("an UntrustedOperationUrl Event", WAIT, |inner| {
        (events(inner, "host", "UntrustedOperationUrl") > 0).then_some(())
    })
    .await;
    assert!(
        received.lock().unwrap().is_empty(),
        "the listener received a request: {:?}",
        received.lock().unwrap()
    );
    // The rung is not sent again: its fate is unknown and the probe judges it.
    assert_eq!(sim.count("vm.redeploy"), 1);
    assert!(second.witness.mutating().is_empty(), "nothing re-sent");
    spy_task.abort();
    second.shutdown().await;
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_whose_answer_is_lost_is_never_sent_again() {
    let sim = Simulator::start(scenario(
        "          - { name: vm-a, nic: { subnet: vnet/s }, faults: [guest_hung] }
          - { name: vm-b, nic: { subnet: vnet/s }, faults: [guest_hung] }",
    ))
    .await
    .unwrap();
    // Azure carries out the first restart but its answer never arrives within the client's
    // timeout, as after a lost connection.
    sim.drop_next_response("vm.restart", Duration::from_secs(4));
    let api = Arc::new(RealApiServer::start().await);
    let mut arm = ArmConfig::new(Url::parse(&sim.arm_url()).unwrap());
    arm.request_timeout = Duration::from_millis(1500);
    let op = Operator::start_with_arm(
        &api,
        &sim,
        "replica-a",
        grace(Duration::from_millis(200)),
        arm,
    )
    .await;
    let remediation = json!({
        "mode": "Auto", "ladder": ["Restart"], "allowedDisruptiveActions": ["Restart"],
        "settleTime": "1s", "backoff": {"initial": "1s", "max": "2s"},
    });
    api.create(
        "rdphealths",
        NS,
        rdphealth("a", "vm-a", remediation.clone()),
    );
    api.create("rdphealths", NS, rdphealth("b", "vm-b", remediation));
    for name in ["a", "b"] {
        wait_status(&api, name, "recovered by the restart", |s| {
            s["ladder"]["recoveredBy"]["rung"] == "Restart"
        })
        .await;
    }
    assert_eq!(sim.count("dropped_response"), 1);
    assert_eq!(
        sim.count("vm.restart"),
        2,
        "one restart per VM, none re-sent"
    );
    // The rung whose answer was lost was recorded as of unknown outcome while it settled.
    let unknown = api.read(|inner| {
        inner
            .log
            .iter()
            .filter(|c| c.resource == "rdphealths")
            .filter(|c| c.object["status"]["ladder"]["current"]["outcomeUnknown"] == true)
            .map(|c| c.object["metadata"]["name"].as_str().unwrap().to_string())
            .collect::<std::collections::BTreeSet<_>>()
    });
    assert_eq!(
        unknown.len(),
        1,
        "exactly one rung of unknown outcome: {unknown:?}"
    );
    // Its fleet slot stayed claimed: the other VM's restart started only once no other
    // rung was in flight.
    let restarts: Vec<Call> = op
        .witness
        .mutating()
        .into_iter()
        .filter(|c| c.operation == "restart")
        .collect();
    assert_eq!(restarts.len(), 2);
    let in_flight = restarts[1]
        .current
        .iter()
        .filter(|current| !current.is_null())
        .count();
    assert_eq!(
        in_flight, 1,
        "the second restart was sent while the first rung still held its slot: {:?}",
        restarts[1].current
    );
    let events_unknown = api.read(|inner| {
        events(inner, "a", "RemediationOutcomeUnknown")
            + events(inner, "b", "RemediationOutcomeUnknown")
    });
    assert_eq!(events_unknown, 1);
    op.shutdown().await;
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decision_taken_on_a_stale_copy_sends_nothing() {
    // The restart takes long enough that the VM is still down when the stale copy is seen.
    let sim = Simulator::start(
        Scenario::from_yaml(&scenario_yaml(
            "{ operation: 300ms, restart: 20s, redeploy: 2s, retryAfter: 200ms }",
            "          - { name: vm-a, nic: { subnet: vnet/s }, faults: [guest_hung] }",
        ))
        .unwrap(),
    )
    .await
    .unwrap();
    let api = Arc::new(RealApiServer::start().await);
    let op = Operator::start_with(&api, &sim, "replica-a", grace(Duration::ZERO)).await;
    api.create(
        "rdphealths",
        NS,
        rdphealth(
            "a",
            "vm-a",
            json!({
                "mode": "Auto", "ladder": ["Restart"], "allowedDisruptiveActions": ["Restart"],
                "settleTime": "30s",
            }),
        ),
    );
    wait_status(&api, "a", "a running restart", |s| {
        s["ladder"]["current"]["phase"] == "Running"
    })
    .await;
    op.shutdown().await;
    assert_eq!(sim.count("vm.restart"), 1);
    // The copy the restart was decided on: the last stored version without an intent.
    let stale: Value = api.read(|inner| {
        inner
            .log
            .iter()
            .rfind(|c| {
                c.resource == "rdphealths"
                    && c.object["metadata"]["name"] == "a"
                    && c.object["status"]["ladder"]["current"].is_null()
                    && condition(&c.object["status"], "Reachable")
                        .is_some_and(|r| r["status"] == "False")
            })
            .map(|c| c.object.clone())
            .expect("a stored version before the intent")
    });
    // A replica whose cache still holds that copy reconciles it.
    let (seams, witness) = seams(
        &api,
        &sim,
        ArmConfig::new(Url::parse(&sim.arm_url()).unwrap()),
    );
    let ctx = controller::Context::new(
        api.client(),
        seams,
        Arc::new(rdphealth::metrics::Metrics::new().unwrap()),
        controller::Leadership::always(),
        Some("replica-a".into()),
    )
    .with_remediation(
        FleetPolicy {
            disruptive_grace: Duration::ZERO,
            ..FleetPolicy::default()
        },
        Some("203.0.113.10".parse().unwrap()),
    );
    let obj: rdphealth::api::RdpHealth = serde_json::from_value(stale).unwrap();
    let guard = Arc::new(kube::core::DeserializeGuard(Ok(obj)));
    let result = controller::reconcile(guard, Arc::new(ctx)).await;
    assert_eq!(sim.count("vm.restart"), 1, "restarted twice");
    assert!(witness.mutating().is_empty(), "nothing was sent");
    assert!(result.is_err(), "the stale decision must fail: {result:?}");
    let s = api.read(|inner| status(inner, "a")).unwrap();
    assert_eq!(
        s["ladder"]["current"]["phase"], "Running",
        "the first intent is kept: {s:#}"
    );
    assert_eq!(
        s["ladder"]["current"]["lease"]["holder"], "replica-a",
        "{s:#}"
    );
    sim.shutdown().await;
}
