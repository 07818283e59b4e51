//! In-guest repairs through the whole loop (the harness is `operator_harness`): old → new
//! for every change, a failed change fails the rung, the restart a repair requires (with and
//! without `Restart`'s permission), the certificate repair of a reachable VM, and a changed
//! RDP port restored only with consent.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod operator_harness;

use operator_harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_in_guest_repair_reports_old_to_new_and_a_failed_change_fails_the_rung() {
    let remediation = json!({
        "mode": "Auto", "ladder": ["RepairGuest", "Restart"],
        "allowedDisruptiveActions": ["Restart"],
        "settleTime": "1s", "backoff": {"initial": "1s", "max": "2s"},
    });
    // Applied: SCHANNEL reads the change at boot, so the repair's restart follows at once and
    // the recovery is credited to the repair; its record says what changed, old → new.
    let (sim, api, op) = start_one(
        "{ name: vm-tls, nic: { subnet: vnet/s }, faults: [tls_disabled] }",
        "tls",
        "vm-tls",
        remediation.clone(),
    )
    .await;
    let s = wait_status(&api, "tls", "phase Recovered", |s| {
        s["phase"] == "Recovered"
    })
    .await;
    let applied = &s["ladder"]["history"][0];
    assert_eq!(applied["step"]["repair"], "EnableTls12", "{s:#}");
    assert_eq!(applied["outcome"], "Applied", "{s:#}");
    let message = applied["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("Enabled 0→1")
            && message.contains("DisabledByDefault 1→0")
            && message.contains("restart required"),
        "{s:#}"
    );
    let restart = &s["ladder"]["history"][1];
    assert_eq!(restart["step"]["rung"], "Restart", "{s:#}");
    assert_eq!(restart["step"]["repair"], "EnableTls12", "{s:#}");
    assert_eq!(restart["outcome"], "Fixed", "{s:#}");
    assert_eq!(s["ladder"]["recoveredBy"]["rung"], "RepairGuest", "{s:#}");
    assert_eq!(s["ladder"]["recoveredBy"]["repair"], "EnableTls12", "{s:#}");
    assert_eq!(sim.count("vm.restart"), 1);
    // Each step after its own OS-disk snapshot; the restart's intent is stored in the
    // reconcile that saw the repair finish: the repair never waits in `AwaitingRestart` when
    // the restart is allowed.
    assert_eq!(
        api.read(|inner| stored_phases(inner, "tls")),
        [
            "Snapshotting",
            "Requested",
            "Running",
            "Snapshotting",
            "Requested",
            "Running",
            "Settling"
        ]
    );
    assert_eq!(sim.count("snapshot.put"), 2);
    op.shutdown().await;
    sim.shutdown().await;

    // The SCHANNEL key refuses writes: the applier stops at its first change and the ladder
    // records the rung Failed, naming that change.
    let sim = Simulator::start(scenario(
        "          - { name: vm-tls, nic: { subnet: vnet/s }, faults: [tls_disabled] }",
    ))
    .await
    .unwrap();
    sim.shared()
        .lock()
        .vms
        .get_mut("vm-tls")
        .unwrap()
        .registry
        .deny_writes(rdphealth::guest::changes::TLS12_SERVER);
    let api = Arc::new(RealApiServer::start().await);
    let op = Operator::start(&api, &sim, "replica-a").await;
    api.create("rdphealths", NS, rdphealth("tls", "vm-tls", remediation));
    let s = wait_status(&api, "tls", "a failed rung", |s| {
        s["ladder"]["history"]
            .as_array()
            .is_some_and(|h| !h.is_empty())
    })
    .await;
    let failed = &s["ladder"]["history"][0];
    assert_eq!(failed["outcome"], "Failed", "{s:#}");
    let message = failed["message"].as_str().unwrap();
    assert!(
        message.contains("change 1 of 2")
            && message.contains(r"TLS 1.2\Server\Enabled")
            && message.contains("Requested registry access is not allowed."),
        "{message}"
    );
    api.wait_for("the failure event", WAIT, |inner| {
        (events(inner, "tls", "RemediationFailed") >= 1).then_some(())
    })
    .await;
    assert!(
        sim.vm("vm-tls")
            .unwrap()
            .faults
            .iter()
            .any(|f| f.as_str() == "tls_disabled")
    );
    op.shutdown().await;
    sim.shutdown().await;
}

/// A repair that needs a restart the operator may not do: the status says so, and the ladder
/// waits for a person instead of moving on to the NIC reset it is allowed to run; an approval
/// of Restart then restarts the VM once, credited to the repair.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repair_whose_restart_is_not_permitted_waits_for_a_person() {
    let (sim, api, op) = start_one(
        "{ name: vm-tls, nic: { subnet: vnet/s }, faults: [tls_disabled] }",
        "tls",
        "vm-tls",
        json!({
            "mode": "Auto", "ladder": ["RepairGuest", "ResetNic", "Restart"],
            "allowedDisruptiveActions": ["ResetNic"],
            "settleTime": "1s", "backoff": {"initial": "1s", "max": "2s"},
        }),
    )
    .await;
    let s = wait_status(&api, "tls", "restart required", |s| {
        condition(s, "Remediating")
            .is_some_and(|c| c["reason"] == "RestartRequired" && c["status"] == "False")
    })
    .await;
    let message = condition(&s, "Remediating").unwrap()["message"].clone();
    let message = message.as_str().unwrap();
    assert!(
        message.contains("RepairGuest(EnableTls12) applied, restart required")
            && message.contains("Restart is not in allowedDisruptiveActions"),
        "{message}"
    );
    assert_eq!(s["ladder"]["current"]["phase"], "AwaitingRestart", "{s:#}");
    assert_eq!(s["phase"], "Remediating", "{s:#}");
    api.wait_for("the RestartRequired event", WAIT, |inner| {
        (events(inner, "tls", "RestartRequired") == 1).then_some(())
    })
    .await;
    // Many probes later: still waiting; nothing else ran, the Event was not repeated.
    op.wait_more_probes_with("unreachable", 8).await;
    let s = api.read(|inner| status(inner, "tls")).unwrap();
    assert_eq!(s["ladder"]["current"]["phase"], "AwaitingRestart", "{s:#}");
    assert_eq!(sim.count("vm.restart"), 0);
    assert_eq!(sim.count("nic.put"), 0, "no unrelated rung meanwhile");
    assert_eq!(api.read(|inner| events(inner, "tls", "RestartRequired")), 1);

    api.patch(
        "rdphealths",
        NS,
        "tls",
        json!({"metadata": {"annotations": {"rdphealth.io/approve": "Restart/ticket-7"}}}),
    );
    let s = wait_status(&api, "tls", "phase Recovered", |s| {
        s["phase"] == "Recovered"
    })
    .await;
    assert_eq!(s["ladder"]["recoveredBy"]["repair"], "EnableTls12", "{s:#}");
    assert_eq!(s["ladder"]["consumedApproval"], "Restart/ticket-7");
    assert_eq!(sim.count("vm.restart"), 1);
    assert_eq!(sim.count("nic.put"), 0);
    op.shutdown().await;
    sim.shutdown().await;
}

/// An expired certificate on a VM that still answers: renewing it restarts TermService and
/// drops every session, so it waits for Restart's permission; an approval of Restart runs the
/// renewal and the restart it needs, and the MachineKeys ACL backup is recorded in status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewing_the_certificate_of_a_reachable_vm_needs_restarts_permission() {
    let (sim, api, op) = start_one(
        "{ name: vm-cert, nic: { subnet: vnet/s }, faults: [certificate_expired] }",
        "cert",
        "vm-cert",
        json!({
            "mode": "Auto", "ladder": ["RepairGuest", "Restart"], "cooldown": "1s",
            "settleTime": "1s", "backoff": {"initial": "1s", "max": "2s"},
        }),
    )
    .await;
    let s = wait_status(&api, "cert", "LadderExhausted", |s| {
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
    assert_eq!(
        sim.count("vm.runcommand"),
        sim.guest_queries(),
        "no repair ran inside the VM"
    );

    api.patch(
        "rdphealths",
        NS,
        "cert",
        json!({"metadata": {"annotations": {"rdphealth.io/approve": "Restart/ticket-9"}}}),
    );
    let s = wait_status(&api, "cert", "phase Recovered", |s| {
        s["phase"] == "Recovered"
    })
    .await;
    assert_eq!(
        s["ladder"]["recoveredBy"]["repair"], "RenewRdpCertificate",
        "{s:#}"
    );
    assert_eq!(s["ladder"]["consumedApproval"], "Restart/ticket-9");
    let renewal = &s["ladder"]["history"][0];
    assert_eq!(renewal["step"]["repair"], "RenewRdpCertificate", "{s:#}");
    assert!(
        renewal["aclBackup"]
            .as_str()
            .is_some_and(|b| b.starts_with(r"C:\Windows\Temp\rdphealth-acl-")),
        "{s:#}"
    );
    assert_eq!(sim.count("vm.runcommand"), sim.guest_queries() + 1);
    assert!(
        sim.count("vm.restart") <= 1,
        "at most the renewal's own restart"
    );
    op.shutdown().await;
    sim.shutdown().await;
}

/// RDP was moved to another port inside the guest (listener and firewall rule): reported with
/// both ports; with `restoreRdpPort` the listener and its firewall rule go back to the probed
/// port, and only that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_rdp_port_is_reported_and_restored_only_with_consent() {
    use rdphealth::guest::changes::{RDP_TCP, RegValue};
    let sim = Simulator::start(scenario(
        "          - { name: vm-port, nic: { subnet: vnet/s } }",
    ))
    .await
    .unwrap();
    {
        let shared = sim.shared();
        let mut world = shared.lock();
        let reg = &mut world.vms.get_mut("vm-port").unwrap().registry;
        reg.set(RDP_TCP, "PortNumber", RegValue::Dword(3390))
            .unwrap();
        reg.set_firewall_rdp_port(3390).unwrap();
    }
    let api = Arc::new(RealApiServer::start().await);
    let op = Operator::start(&api, &sim, "replica-a").await;
    let remediation = json!({
        "mode": "Auto", "ladder": ["RepairGuest"],
        "settleTime": "1s", "backoff": {"initial": "1s", "max": "2s"},
    });
    api.create("rdphealths", NS, rdphealth("port", "vm-port", remediation));
    let s = wait_status(&api, "port", "PortChanged", |s| {
        condition(s, "Remediating").is_some_and(|c| c["reason"] == "PortChanged")
    })
    .await;
    let message = condition(&s, "Remediating").unwrap()["message"].clone();
    assert!(
        message.as_str().unwrap().contains("port 3390")
            && message.as_str().unwrap().contains("port 3389"),
        "{message}"
    );
    assert_eq!(
        sim.count("vm.runcommand"),
        sim.guest_queries(),
        "nothing changed"
    );

    api.patch(
        "rdphealths",
        NS,
        "port",
        json!({"spec": {"remediation": {"restoreRdpPort": true}}}),
    );
    let s = wait_status(&api, "port", "phase Recovered", |s| {
        s["phase"] == "Recovered"
    })
    .await;
    assert_eq!(
        s["ladder"]["recoveredBy"]["repair"], "RestoreRdpPort",
        "{s:#}"
    );
    let message = s["ladder"]["history"][0]["message"]
        .as_str()
        .unwrap_or_default();
    assert!(
        message.contains("PortNumber 3390→3389")
            && message.contains("RemoteDesktop-UserMode-In-TCP 3390→3389"),
        "{s:#}"
    );
    {
        let shared = sim.shared();
        let world = shared.lock();
        let reg = &world.vms["vm-port"].registry;
        assert_eq!(reg.dword(RDP_TCP, "PortNumber"), Some(3389));
        assert_eq!(reg.firewall_rdp_port(), Some(3389));
        assert!(reg.listener(3389).is_ok());
    }
    op.shutdown().await;
    sim.shutdown().await;
}
