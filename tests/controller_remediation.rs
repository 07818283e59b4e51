//! The whole loop with remediation, rung by rung: the real `Controller` against a real API
//! server, with the simulator as Azure and the simulated VMs' live RDP responders (the harness
//! is `operator_harness`). The endpoint comes from Azure (no `spec.endpoint.host`); a prober
//! stand-in routes the addresses ARM reports to the VMs' loopback responders, the way a
//! network would.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod operator_harness;

use operator_harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rdp_disabled_is_diagnosed_reset_and_recovered() {
    let sim = Simulator::start(scenario(
        "          - { name: vm-rdp, nic: { subnet: vnet/s }, faults: [rdp_disabled], vmAccessExtension: enablevmAccess }",
    ))
    .await
    .unwrap();
    let api = Arc::new(RealApiServer::start().await);
    let op = Operator::start(&api, &sim, "replica-a").await;
    api.wait_for("the lease", WAIT, |inner| {
        let lease = inner.get("leases", NS, "rdphealth-operator")?;
        (lease["spec"]["holderIdentity"] == "replica-a").then_some(())
    })
    .await;
    api.create(
        "rdphealths",
        NS,
        rdphealth(
            "rdp",
            "vm-rdp",
            json!({"mode": "Auto", "settleTime": "1s", "backoff": {"initial": "1s", "max": "2s"}}),
        ),
    );

    // The endpoint comes from Azure; the VM refuses RDP; evidence lands in status.
    let public_ip = sim.vm("vm-rdp").unwrap().public_ip.unwrap();
    let s = wait_status(&api, "rdp", "evidence in status", |s| {
        s["diagnosis"].is_object()
    })
    .await;
    assert_eq!(
        s["endpoint"],
        json!({"host": public_ip, "port": 3389, "source": "Azure", "computerName": "vm-rdp"})
    );
    assert_eq!(s["diagnosis"]["agentReady"], true, "{s:#}");

    // The rung runs, is polled, settles, and the endpoint answers again.
    let s = wait_status(&api, "rdp", "phase Recovered", |s| {
        s["phase"] == "Recovered"
    })
    .await;
    assert_eq!(
        s["ladder"]["recoveredBy"]["rung"], "ResetRdpConfig",
        "{s:#}"
    );
    assert_eq!(condition(&s, "Reachable").unwrap()["status"], "True");
    let history = s["ladder"]["history"].as_array().unwrap();
    assert_eq!(history.len(), 1);
    assert_eq!(history[0]["outcome"], "Fixed");
    assert_eq!(sim.count("extension.put"), 1);

    // VMAccess rewrites the guest's RDP settings: an OS-disk snapshot first, its intent
    // stored before it; then the rung's intent before the call, the operation, settling.
    let calls = op.witness.mutating();
    assert_eq!(
        calls.iter().map(|c| c.operation).collect::<Vec<_>>(),
        ["create_os_disk_snapshot", "reset_rdp_config"],
        "{calls:?}"
    );
    assert_eq!(calls[0].current[0]["phase"], "Snapshotting", "{calls:?}");
    assert_eq!(calls[1].current[0]["phase"], "Requested", "{calls:?}");
    assert_eq!(calls[1].current[0]["step"]["rung"], "ResetRdpConfig");
    assert_eq!(
        calls[1].current[0]["snapshot"], history[0]["snapshot"],
        "{s:#}"
    );
    let phases = api.read(|inner| stored_phases(inner, "rdp"));
    assert_eq!(
        phases,
        ["Snapshotting", "Requested", "Running", "Settling"],
        "{phases:?}"
    );
    assert!(sim.count("operation.status") + sim.count("operation.result") >= 1);

    // The in-guest query ran through Run Command while no rung was in flight, was polled
    // across reconciles, and its answer was in status before the rung started.
    assert_eq!(op.witness.guest_queries(), 1);
    assert_eq!(sim.guest_queries(), 1);
    assert_eq!(
        sim.count("vm.runcommand"),
        1,
        "only the query: the fix is VMAccess"
    );
    let all = op.witness.calls.lock().unwrap().clone();
    assert_eq!(all[0].operation, "guest_query", "{all:?}");
    assert!(all[0].current[0].is_null(), "a rung was in flight: {all:?}");
    let diagnoses = api.read(|inner| stored_diagnoses(inner, "rdp"));
    assert!(
        diagnoses
            .iter()
            .any(|d| pending_kinds(d).contains(&"GuestQuery".to_string())),
        "{diagnoses:#?}"
    );
    let answered = diagnoses
        .iter()
        .find(|d| d["guest"].is_object())
        .unwrap_or_else(|| panic!("no guest evidence stored: {diagnoses:#?}"));
    assert_eq!(answered["guest"]["registry"]["fDenyTSConnections"], "1");
    assert_eq!(answered["guest"]["complete"], true);
    assert!(pending_kinds(answered).is_empty(), "{answered:#}");

    api.wait_for("events", WAIT, |inner| {
        (events(inner, "rdp", "RemediationStarted") == 1
            && events(inner, "rdp", "RemediationSucceeded") == 1)
            .then_some(())
    })
    .await;
    let text = op
        .wait_metrics(&[
            r#"rdphealth_remediations_total{result="started",rung="ResetRdpConfig"} 1"#,
            r#"rdphealth_remediations_total{result="fixed",rung="ResetRdpConfig"} 1"#,
            r#"rdphealth_ladder_rung{name="rdp",namespace="default"} 0"#,
            r#"rdphealth_azure_requests_total{code="OK",operation="reset_rdp_config"} 1"#,
            r#"rdphealth_azure_requests_total{code="OK",operation="run_command"} 1"#,
            r#"rdphealth_vm_reachable{name="rdp",namespace="default"} 1"#,
        ])
        .await;

    promtool_check(&text);

    // A healthy VM costs no ARM reads per probe: its address stays cached.
    let reads = sim.count("vm.get");
    op.wait_more_probes(3).await;
    assert_eq!(sim.count("vm.get"), reads, "probes must not read Azure");
    op.shutdown().await;
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_flow_verify_answers_and_a_mismatch_is_reported() {
    // The NIC's NSG allows RDP from a service tag that holds the prober's address: Azure
    // resolves it, the operator's local evaluation cannot (it reads as DenyAllInBound).
    let yaml = format!(
        r#"
timing: {{ operation: 300ms, restart: 1s, redeploy: 2s, retryAfter: 200ms }}
serviceTags: {{ AzureCloud.westeurope: [203.0.113.0/24] }}
subscriptions:
  - id: {SUB}
    networkWatchers: [westeurope]
    resourceGroups:
      - name: rg
        location: westeurope
        networkSecurityGroups:
          - name: nsg-nic
            rules:
              - {{ name: allow-rdp-azure, priority: 1000, access: Allow, protocol: Tcp, source: AzureCloud.westeurope, destinationPort: "3389" }}
        virtualNetworks:
          - {{ name: vnet, addressPrefix: 10.0.0.0/16, subnets: [ {{ name: s, addressPrefix: 10.0.0.0/24 }} ] }}
        vms:
          - {{ name: vm-tagged, nic: {{ subnet: vnet/s, networkSecurityGroup: nsg-nic }}, faults: [rdp_disabled], vmAccessExtension: enablevmAccess }}
"#
    );
    let sim = Simulator::start(Scenario::from_yaml(&yaml).unwrap())
        .await
        .unwrap();
    let api = Arc::new(RealApiServer::start().await);
    let op = Operator::start(&api, &sim, "replica-a").await;
    api.create(
        "rdphealths",
        NS,
        rdphealth(
            "tagged",
            "vm-tagged",
            json!({"mode": "Auto", "settleTime": "1s", "backoff": {"initial": "1s", "max": "2s"}}),
        ),
    );
    let s = wait_status(&api, "tagged", "phase Recovered", |s| {
        s["phase"] == "Recovered"
    })
    .await;
    // Trusting Azure, the ladder was not blocked by the local NsgDenied verdict.
    assert_eq!(
        s["ladder"]["recoveredBy"]["rung"], "ResetRdpConfig",
        "{s:#}"
    );
    assert!(sim.count("watcher.ipflowverify") >= 1);
    let diagnoses = api.read(|inner| stored_diagnoses(inner, "tagged"));
    let checked = diagnoses
        .iter()
        .find(|d| d["nsg"]["ipFlowVerify"].is_object())
        .unwrap_or_else(|| panic!("no IP flow verify answer stored: {diagnoses:#?}"));
    assert_eq!(checked["nsg"]["verdict"]["access"], "Deny");
    assert_eq!(
        checked["nsg"]["ipFlowVerify"],
        json!({"access": "Allow", "rule": "securityRules/allow-rdp-azure", "agreesWithLocalVerdict": false})
    );
    api.wait_for("the mismatch event", WAIT, |inner| {
        (events(inner, "tagged", "NsgVerdictMismatch") == 1).then_some(())
    })
    .await;
    assert_eq!(
        api.read(|inner| events(inner, "tagged", "NsgDenied")),
        0,
        "the local verdict was reported as a blocker"
    );
    op.shutdown().await;
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_nsg_block_is_repaired_for_the_allowed_prefixes_only() {
    let (sim, api, op) = start_one(
        "{ name: vm-nsg, nic: { subnet: vnet/s }, faults: [nsg_blocking] }",
        "nsg",
        "vm-nsg",
        json!({
            "mode": "Auto", "settleTime": "1s", "backoff": {"initial": "1s", "max": "2s"},
            "nsgRepair": {"enabled": true, "allowedSourcePrefixes": ["203.0.113.0/28"]},
        }),
    )
    .await;
    let s = wait_status(&api, "nsg", "phase Recovered", |s| {
        s["phase"] == "Recovered"
    })
    .await;
    assert_eq!(s["ladder"]["recoveredBy"]["rung"], "RepairNsg", "{s:#}");
    let calls = op.witness.mutating();
    assert_eq!(
        calls.iter().map(|c| c.operation).collect::<Vec<_>>(),
        ["put_allow_rule"],
        "no VM rung for an NSG block"
    );
    assert_eq!(calls[0].current[0]["phase"], "Requested", "intent first");
    assert_eq!(sim.count("nsgrule.put"), 1);
    assert_eq!(sim.count("vm.restart") + sim.count("extension.put"), 0);

    // The rule: allow TCP 3389 from the allowed prefix to the VM's address, just above the
    // deny rule; the deny rule itself is untouched.
    let vm = VmRef::new(SUB, "rg", "vm-nsg");
    let rules = op.witness.inner.network_rules(&vm).await.unwrap();
    let nic_nsg = rules.nic_nsg.unwrap();
    let added = nic_nsg
        .rules
        .iter()
        .find(|r| r.name == "rdphealth-allow-rdp-vm-nsg")
        .expect("the allow rule");
    assert!(added.allow && added.inbound);
    assert_eq!(added.priority, 199);
    assert_eq!(added.source_prefixes, ["203.0.113.0/28"]);
    assert_eq!(
        added.destination_prefixes,
        [rules.endpoint.private_ip.unwrap()]
    );
    assert_eq!(added.destination_ports, ["3389"]);
    assert!(
        nic_nsg
            .rules
            .iter()
            .any(|r| r.name == "sim-deny-rdp" && !r.allow)
    );
    api.wait_for("the NSG event", WAIT, |inner| {
        (events(inner, "nsg", "NsgRuleWritten") == 1).then_some(())
    })
    .await;
    op.shutdown().await;
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prober_outside_the_allowed_prefixes_is_not_let_in() {
    let (sim, api, op) = start_one(
        "{ name: vm-nsg, nic: { subnet: vnet/s }, faults: [nsg_blocking] }",
        "nsg",
        "vm-nsg",
        json!({
            "mode": "Auto", "settleTime": "1s",
            "nsgRepair": {"enabled": true, "allowedSourcePrefixes": ["192.0.2.0/24"]},
        }),
    )
    .await;
    let s = wait_status(&api, "nsg", "the refused repair", |s| {
        s["ladder"]["history"]
            .as_array()
            .is_some_and(|h| h.iter().any(|r| r["outcome"] == "Failed"))
    })
    .await;
    let text = s["ladder"]["history"].to_string();
    assert!(text.contains("not inside"), "{s:#}");
    assert_eq!(sim.count("nsgrule.put"), 0);
    assert!(op.witness.mutating().is_empty());
    op.shutdown().await;
    sim.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_reset_writes_the_password_to_its_secret_only() {
    let (sim, api, op) = start_one(
        "{ name: vm-hung, nic: { subnet: vnet/s }, faults: [guest_hung] }",
        "hung",
        "vm-hung",
        json!({
            "mode": "Auto", "ladder": ["ResetPassword", "Restart"],
            "allowedDisruptiveActions": ["ResetPassword", "Restart"],
            "passwordReset": {"username": "rdpadmin", "secretName": "vm-hung-admin"},
            "settleTime": "1s", "backoff": {"initial": "1s", "max": "2s"},
        }),
    )
    .await;
    let s = wait_status(&api, "hung", "phase Recovered", |s| {
        s["phase"] == "Recovered"
    })
    .await;
    assert_eq!(s["ladder"]["recoveredBy"]["rung"], "Restart", "{s:#}");
    let calls = op.witness.mutating();
    // Each disruptive rung after its own OS-disk snapshot, whose intent was stored first.
    assert_eq!(
        calls.iter().map(|c| c.operation).collect::<Vec<_>>(),
        [
            "create_os_disk_snapshot",
            "reset_password",
            "create_os_disk_snapshot",
            "restart"
        ]
    );
    assert_eq!(calls[0].current[0]["phase"], "Snapshotting", "{calls:?}");
    assert_eq!(calls[1].current[0]["phase"], "Requested", "{calls:?}");
    assert_eq!(
        calls[1].current[0]["snapshot"], s["ladder"]["history"][0]["snapshot"],
        "{s:#}"
    );
    assert_eq!(sim.vm("vm-hung").unwrap().password_resets, 1);

    // The Secret holds the password Azure received, as applied.
    let secret = api.read(|inner| inner.get("secrets", NS, "vm-hung-admin").cloned());
    let secret = secret.expect("the Secret was created");
    let decode = |v: &Value| -> String {
        let b: k8s_openapi::ByteString = serde_json::from_value(v.clone()).unwrap();
        String::from_utf8(b.0).unwrap()
    };
    assert_eq!(decode(&secret["data"]["username"]), "rdpadmin");
    let password = decode(&secret["data"]["password"]);
    assert!(secret["data"]["pendingPassword"].is_null(), "{secret:#}");
    assert_eq!(
        secret["metadata"]["annotations"]["rdphealth.io/password-state"],
        "applied"
    );
    use sha2::Digest;
    let digest: String = sha2::Sha256::digest(password.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(sim.vm("vm-hung").unwrap().password_sha256, Some(digest));

    // Nowhere else: no other object the API server ever stored (status, Events, leases)
    // contains it, in clear or base64.
    let encoded = secret["data"]["password"].as_str().unwrap().to_string();
    let leaked = api.read(|inner| {
        inner
            .log
            .iter()
            .filter(|c| c.resource != "secrets")
            .map(|c| c.object.to_string())
            .filter(|text| text.contains(&password) || text.contains(&encoded))
            .count()
    });
    assert_eq!(leaked, 0);
    api.wait_for("the stored event", WAIT, |inner| {
        (events(inner, "hung", "PasswordStored") == 1).then_some(())
    })
    .await;
    op.shutdown().await;
    sim.shutdown().await;
}

/// A Secret someone else created, named as the password Secret: the operator does not touch
/// it, sends no password to Azure, and says why in status and an Event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_secret_the_operator_did_not_create_is_left_alone() {
    let sim = Simulator::start(scenario(
        "          - { name: vm-hung, nic: { subnet: vnet/s }, faults: [guest_hung] }",
    ))
    .await
    .unwrap();
    let api = Arc::new(RealApiServer::start().await);
    let theirs = json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "app-db", "namespace": NS, "labels": {"app": "db"}},
        "type": "Opaque",
        "data": {"password": "ZGItcGFzcw=="},
    });
    api.create("secrets", NS, theirs);
    let op = Operator::start(&api, &sim, "replica-a").await;
    api.create(
        "rdphealths",
        NS,
        rdphealth(
            "hung",
            "vm-hung",
            json!({
                "mode": "Auto", "ladder": ["ResetPassword"],
                "allowedDisruptiveActions": ["ResetPassword"],
                "passwordReset": {"username": "rdpadmin", "secretName": "app-db"},
                "settleTime": "1s", "backoff": {"initial": "1s", "max": "2s"},
            }),
        ),
    );
    let s = wait_status(&api, "hung", "a refused rung", |s| {
        s["ladder"]["history"]
            .as_array()
            .is_some_and(|h| !h.is_empty())
    })
    .await;
    let record = &s["ladder"]["history"][0];
    assert_eq!(record["outcome"], "Failed", "{s:#}");
    assert!(
        record["message"]
            .as_str()
            .is_some_and(|m| m.contains("was not created by rdphealth-operator")),
        "{s:#}"
    );
    api.wait_for("the refusal event", WAIT, |inner| {
        (events(inner, "hung", "RemediationFailed") >= 1).then_some(())
    })
    .await;
    // Only the OS-disk snapshot that precedes every disruptive rung reached Azure: the refusal
    // comes when the Secret is written, right before the VMAccess call, which never happens.
    let calls = op.witness.mutating();
    assert_eq!(
        calls.iter().map(|c| c.operation).collect::<Vec<_>>(),
        ["create_os_disk_snapshot"],
        "{calls:?}"
    );
    assert_eq!(sim.vm("vm-hung").unwrap().password_resets, 0);
    let secret = api
        .read(|inner| inner.get("secrets", NS, "app-db").cloned())
        .unwrap();
    assert_eq!(
        secret["data"],
        json!({"password": "ZGItcGFzcw=="}),
        "{secret:#}"
    );
    assert!(secret["metadata"]["annotations"].is_null(), "{secret:#}");
    op.shutdown().await;
    sim.shutdown().await;
}

/// The operator's tenancy policy grants the namespace another subscription: the object naming
/// a VM outside it is `Valid=False` with a clear message, and no request reaches ARM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_naming_a_vm_outside_its_scopes_is_refused_without_an_arm_request() {
    let sim = Simulator::start(scenario(
        "          - { name: vm-rdp, nic: { subnet: vnet/s }, faults: [rdp_disabled], vmAccessExtension: enablevmAccess }",
    ))
    .await
    .unwrap();
    let api = Arc::new(RealApiServer::start().await);
    let policy = rdphealth::tenancy::TenancyPolicy::from_yaml(&format!(
        "namespaces:\n  - name: {NS}\n    scopes: [/subscriptions/00000000-0000-0000-0000-0000000000bb]\n  - name: other\n    scopes: [/subscriptions/{SUB}]\n"
    ))
    .unwrap();
    let settings = Settings {
        tenancy: Some(policy),
        ..grace(Duration::from_millis(200))
    };
    let op = Operator::start_with(&api, &sim, "replica-a", settings).await;
    let before = sim.counters().values().sum::<u64>();
    api.create(
        "rdphealths",
        NS,
        rdphealth("rdp", "vm-rdp", json!({"mode": "Auto", "settleTime": "1s"})),
    );
    let s = wait_status(&api, "rdp", "Valid=False", |s| {
        condition(s, "Valid").is_some_and(|c| c["status"] == "False")
    })
    .await;
    let message = condition(&s, "Valid").unwrap()["message"].clone();
    assert!(
        message
            .as_str()
            .is_some_and(|m| m.contains("outside the Azure scopes")
                && m.contains(SUB)
                && m.contains("\"default\"")),
        "{s:#}"
    );
    assert_eq!(s["phase"], "Invalid", "{s:#}");
    api.wait_for("the event", WAIT, |inner| {
        (events(inner, "rdp", "InvalidSpec") == 1).then_some(())
    })
    .await;
    // Given time to act, it asks nothing of Azure: no read, no write.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(op.witness.calls.lock().unwrap().is_empty());
    assert_eq!(
        sim.counters().values().sum::<u64>(),
        before,
        "{:?}",
        sim.counters()
    );
    op.shutdown().await;
    sim.shutdown().await;
}

/// An address another computer answers on (an IP reused in the subnet): the identity step reads
/// that computer's name, the object says so with both names (`status.identity`,
/// `HostIdentity=False`, a `WrongHost` Event, the `wrong_host` finding in the metrics), and the
/// ladder never acts on this VM: no rung, no in-guest query, whatever the spec allows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_answering_as_another_computer_is_reported_and_never_acted_on() {
    let (sim, api, op) = start_one(
        "{ name: vm-a, nic: { subnet: vnet/s }, answersAs: vm-retired }",
        "reused",
        "vm-a",
        json!({
            "mode": "Auto",
            "allowedDisruptiveActions": ["ResetNic", "Restart", "Redeploy"],
            "settleTime": "1s", "backoff": {"initial": "1s", "max": "2s"},
        }),
    )
    .await;
    let s = wait_status(&api, "reused", "HostIdentity=False", |s| {
        condition(s, "HostIdentity").is_some_and(|c| c["status"] == "False")
    })
    .await;
    // NetBIOS names are upper case on the wire.
    assert!(
        s["identity"]["computerName"]
            .as_str()
            .is_some_and(|n| n.eq_ignore_ascii_case("vm-retired")),
        "{s:#}"
    );
    assert_eq!(s["identity"]["expectedName"], "vm-a", "{s:#}");
    assert_eq!(s["identity"]["matches"], false, "{s:#}");
    let message = condition(&s, "HostIdentity").unwrap()["message"].to_string();
    assert!(
        message.to_ascii_lowercase().contains("vm-retired") && message.contains("vm-a"),
        "{message}"
    );
    let s = wait_status(&api, "reused", "Remediating=WrongHost", |s| {
        condition(s, "Remediating").is_some_and(|c| c["reason"] == "WrongHost")
    })
    .await;
    assert_eq!(s["lastProbe"]["failureReason"], "wrong_host", "{s:#}");
    api.wait_for("the WrongHost event", WAIT, |inner| {
        (events(inner, "reused", "WrongHost") >= 1).then_some(())
    })
    .await;
    let (_, text) = common::http_get(op.http, "/metrics").await.unwrap();
    assert!(
        text.lines().any(|l| l.starts_with("rdphealth_findings{")
            && l.contains("kind=\"wrong_host\"")
            && l.contains("name=\"reused\"")
            && l.ends_with(" 1")),
        "{text}"
    );
    // Given time to act, nothing is done to the VM: no rung, no Run Command.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        op.witness.mutating().is_empty(),
        "{:?}",
        op.witness.mutating()
    );
    assert_eq!(sim.count("vm.runcommand"), 0, "{:?}", sim.counters());
    let s = api.read(|inner| status(inner, "reused")).expect("status");
    assert!(
        s["ladder"]["history"].as_array().is_none_or(Vec::is_empty),
        "{s:#}"
    );
    op.shutdown().await;
    sim.shutdown().await;
}
