//! The demo end to end: every fault class of the simulator diagnosed and, where the guide has
//! a fix, fixed by the expected rung through the real engine, prober and Azure SDK calls.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: failures should panic

mod common;

use std::{process::Command, time::Duration};

use rdphealth::{
    demo::{self, DemoConfig, fleet::Expect},
    ladder::{GuestRepair, Rung, RungOutcome, Step},
    sim::Fault,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fault_class_settles_as_expected() {
    let cfg = DemoConfig {
        vms: 12,
        speed: 2.0,
        timeout: Duration::from_secs(90),
        exit_when_settled: true,
        live_table: false,
        ..DemoConfig::default()
    };
    let summary = demo::run(&cfg).await.unwrap();
    let by_fault = |f: Option<Fault>| {
        summary
            .vms
            .iter()
            .find(|t| t.fault == f && t.answers_as.is_none())
            .unwrap_or_else(|| panic!("no VM with {f:?}"))
    };
    assert!(summary.settled, "{}", demo::view::render_summary(&summary));
    for (fault, step) in [
        (Fault::RdpDisabled, Step::rung(Rung::ResetRdpConfig)),
        (Fault::TlsDisabled, Step::repair(GuestRepair::EnableTls12)),
        (
            Fault::CertificateExpired,
            Step::repair(GuestRepair::RenewRdpCertificate),
        ),
        (
            Fault::Flapping,
            Step::repair(GuestRepair::ListenerKeepAlive),
        ),
        (Fault::GuestHung, Step::rung(Rung::ResetNic)),
        (Fault::NicBroken, Step::rung(Rung::ResetNic)),
        (Fault::HostFailure, Step::rung(Rung::Redeploy)),
    ] {
        let t = by_fault(Some(fault));
        assert_eq!(t.fixed_by, Some(step), "{fault:?}");
        assert!(
            t.detected_after.is_some() && t.recovered_after.is_some(),
            "{fault:?}"
        );
        assert!(t.diagnosis.is_some(), "{fault:?} has a diagnosis");
    }
    for fault in [Fault::NsgBlocking, Fault::VmStopped, Fault::PlatformOutage] {
        let t = by_fault(Some(fault));
        assert_eq!(
            t.fixed_by, None,
            "{fault:?} is reported or waits, never 'fixed'"
        );
        assert!(matches!(t.expect, Expect::Reported(_) | Expect::Waits(_)));
        assert!(t.settled(), "{fault:?}");
    }
    // The NIC reset that fixed the broken NIC put the original address back afterwards.
    let nic_vm = by_fault(Some(Fault::NicBroken));
    let status = nic_vm.obj.status.clone().unwrap();
    let reset = status
        .ladder
        .history
        .iter()
        .find(|r| r.step.rung == rdphealth::ladder::Rung::ResetNic)
        .and_then(|r| r.nic.clone())
        .unwrap_or_else(|| panic!("{:?}", status.ladder.history));
    assert_eq!(
        reset.restore,
        rdphealth::ladder::nic::RestoreState::Restored,
        "{reset:?}"
    );
    let nsg = by_fault(Some(Fault::NsgBlocking));
    assert!(
        nsg.diagnosis.as_deref().unwrap().contains("sim-deny-rdp"),
        "{:?}",
        nsg.diagnosis
    );
    assert!(by_fault(None).settled());
    // Snapshot before change: every in-guest write and disruptive rung that fixed a VM was
    // (the VMAccess reset of the RDP settings included) preceded by its own OS-disk snapshot,
    // recorded in status and named in the rung's record.
    for fault in [
        Fault::RdpDisabled,
        Fault::TlsDisabled,
        Fault::CertificateExpired,
        Fault::Flapping,
        Fault::GuestHung,
        Fault::NicBroken,
        Fault::HostFailure,
    ] {
        let status = by_fault(Some(fault)).obj.status.clone().unwrap();
        let fixed = status
            .ladder
            .history
            .iter()
            .rev()
            .find(|r| r.outcome == RungOutcome::Fixed)
            .unwrap_or_else(|| panic!("{fault:?}: {:?}", status.ladder.history));
        let id = fixed
            .snapshot
            .as_deref()
            .unwrap_or_else(|| panic!("{fault:?}: {fixed:?} has no snapshot"));
        assert!(
            status
                .ladder
                .snapshots
                .iter()
                .any(|s| s.id == id && s.used && s.step == fixed.step),
            "{fault:?}: {:?}",
            status.ladder.snapshots
        );
    }
    assert!(summary.arm_calls.get("snapshot.put").copied().unwrap_or(0) >= 7);
    assert_eq!(
        summary.arm_calls.get("snapshot.delete"),
        None,
        "nothing to prune"
    );
    // The VM whose address another computer answers on: reported as the wrong host with both
    // names, never remediated (no rung ran for it, no Run Command read its guest).
    let reused = summary
        .vms
        .iter()
        .find(|t| t.answers_as.is_some())
        .expect("the fleet has a VM whose address is reused");
    assert_eq!(reused.expect, Expect::Reported("WrongHost"));
    assert!(reused.settled());
    assert_eq!(reused.fixed_by, None);
    let status = reused.obj.status.clone().unwrap();
    let identity = status.identity.clone().expect("status.identity");
    let other = reused.answers_as.clone().unwrap();
    // NetBIOS names are upper case on the wire.
    assert!(
        identity
            .computer_name
            .as_deref()
            .is_some_and(|n| n.eq_ignore_ascii_case(&other)),
        "{identity:?}"
    );
    assert_eq!(
        identity.expected_name.as_deref(),
        reused.obj.metadata.name.as_deref()
    );
    assert_eq!(identity.matches, Some(false));
    assert!(status.ladder.history.is_empty(), "{:?}", status.ladder);
    // Disruptive rungs ran only where needed: the redeploy for the failing host, no others.
    assert_eq!(summary.arm_calls.get("vm.redeploy").copied(), Some(1));
    // Healthy VMs cost no ARM calls: only incidents read evidence (some 15–20 requests each,
    // the in-guest query, IP flow verify and their polls included) and run their rungs. A NIC
    // reset is the guide's whole procedure: the address moves and comes back (two checks of
    // free addresses, two PUTs, their polls, the NSG rules read twice to follow it).
    assert!(
        summary.arm_calls.values().sum::<u64>() < 300,
        "{:?}",
        summary.arm_calls
    );
}

#[test]
fn demo_command_exits_0_when_settled_and_its_metrics_pass_promtool() {
    let addr = format!("127.0.0.1:{}", common::free_port());
    let child = Command::new(env!("CARGO_BIN_EXE_rdphealth"))
        .args([
            "demo",
            "--vms",
            "4",
            "--speed",
            "2",
            "--exit-when-settled",
            "--timeout",
            "60s",
            "--metrics-addr",
            &addr,
        ])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Scrape while the demo runs (it serves /metrics until it exits).
    let mut scraped = None;
    for _ in 0..200 {
        if let Ok(text) = http_get(&addr, "/metrics")
            && text.contains("rdphealth_probe_duration_seconds_count")
            && text.contains("rdphealth_vm_reachable{")
        {
            scraped = Some(text);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("every VM settled as expected"), "{stdout}");
    assert!(stdout.contains("fixed by ResetRdpConfig"), "{stdout}");
    assert!(stdout.contains("ARM requests"), "{stdout}");
    let metrics = scraped.expect("the demo served /metrics");
    assert!(metrics.contains("rdphealth_vm_reachable{"));
    let required = std::env::var("RDPHEALTH_REQUIRE_PROMTOOL").is_ok_and(|v| v == "1");
    match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        Ok(mut p) => {
            use std::io::Write;
            p.stdin
                .take()
                .unwrap()
                .write_all(metrics.as_bytes())
                .unwrap();
            let o = p.wait_with_output().unwrap();
            assert!(
                o.status.success(),
                "promtool check metrics: {}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
        }
        Err(e) => assert!(!required, "promtool is required but could not run: {e}"),
    }
}

fn http_get(addr: &str, path: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    Ok(body
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default())
}

/// Runs the demo with one object file (`yaml`) replacing a generated spec.
async fn run_with_object(name: &str, yaml: &str, vms: usize, timeout: Duration) -> demo::Summary {
    let dir = std::env::temp_dir().join(format!("rdphealth-demo-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(format!("{name}.yaml"));
    std::fs::write(&file, yaml).unwrap();
    let cfg = DemoConfig {
        vms,
        speed: 2.0,
        objects: vec![file],
        timeout,
        exit_when_settled: false,
        live_table: false,
        ..DemoConfig::default()
    };
    let summary = demo::run(&cfg).await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    summary
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_from_files_replace_the_generated_specs_and_dry_run_never_acts() {
    // The built-in fleet's second VM has rdp_disabled; this object puts it in DryRun.
    let summary = run_with_object(
        "dry-run",
        "apiVersion: rdphealth.io/v1alpha1\nkind: RdpHealth\nmetadata: {name: dry, namespace: demo}\nspec:\n  vm: {resourceId: /subscriptions/00000000-0000-0000-0000-00000000de00/resourceGroups/rg-demo/providers/Microsoft.Compute/virtualMachines/vm-001-rdp-disabled}\n  probe: {interval: 500ms, unhealthyInterval: 250ms, timeout: 200ms, failureThreshold: 2, successThreshold: 1}\n  remediation: {mode: DryRun}\n",
        2,
        Duration::from_secs(6),
    )
    .await;
    let vm = summary
        .vms
        .iter()
        .find(|t| t.fault == Some(Fault::RdpDisabled))
        .unwrap();
    let status = vm.obj.status.clone().unwrap();
    assert_eq!(
        status.ladder.planned,
        Some(Step::rung(Rung::ResetRdpConfig)),
        "DryRun shows the plan in status"
    );
    assert!(status.ladder.current.is_none() && status.ladder.history.is_empty());
    assert_eq!(vm.fixed_by, None);
    assert!(!summary.settled, "the dry-run VM is never fixed");
    for mutating in ["extension.put", "nic.put", "vm.restart", "vm.redeploy"] {
        assert_eq!(
            summary.arm_calls.get(mutating),
            None,
            "{mutating} was called"
        );
    }
    // Its only Run Command is the read-only in-guest evidence query, whose answer is shown.
    assert_eq!(summary.arm_calls.get("vm.runcommand").copied(), Some(1));
    let guest = &status.diagnosis.as_ref().unwrap().guest;
    assert_eq!(
        guest.as_ref().unwrap().registry.get("fDenyTSConnections"),
        Some(&"1".to_string())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_vm_is_started_only_with_allow_start() {
    // The built-in fleet's eleventh VM (index 10) is deallocated; this object allows starting it.
    let summary = run_with_object(
        "allow-start",
        "apiVersion: rdphealth.io/v1alpha1\nkind: RdpHealth\nmetadata: {name: start, namespace: demo}\nspec:\n  vm: {resourceId: /subscriptions/00000000-0000-0000-0000-00000000de02/resourceGroups/rg-demo/providers/Microsoft.Compute/virtualMachines/vm-010-vm-stopped}\n  probe: {interval: 500ms, unhealthyInterval: 250ms, timeout: 200ms, failureThreshold: 2, successThreshold: 1}\n  remediation: {mode: Auto, allowStart: true, settleTime: 500ms}\n",
        11,
        Duration::from_secs(12),
    )
    .await;
    let vm = summary
        .vms
        .iter()
        .find(|t| t.fault == Some(Fault::VmStopped))
        .unwrap();
    assert_eq!(
        vm.fixed_by,
        Some(Step::rung(Rung::StartVm)),
        "{}",
        demo::view::render_summary(&summary)
    );
    assert_eq!(summary.arm_calls.get("vm.start").copied(), Some(1));
}

/// An object for a VM the demo does not simulate is an error naming the demo's VMs, not
/// silently ignored.
#[tokio::test]
async fn an_object_for_a_vm_the_demo_does_not_have_is_refused() {
    let cfg = DemoConfig {
        vms: 3,
        objects: vec!["examples/rdphealth-password-reset.yaml".into()],
        timeout: Duration::from_secs(10),
        exit_when_settled: true,
        live_table: false,
        ..DemoConfig::default()
    };
    let err = demo::run(&cfg).await.unwrap_err();
    assert!(
        matches!(&err, demo::DemoError::UnknownVm { vm, .. } if vm == "jumphost-1"),
        "{err}"
    );
    let text = err.to_string();
    assert!(
        text.contains("rdphealth-password-reset.yaml") && text.contains("vm-001-rdp-disabled"),
        "{text}"
    );
}

/// `demo --fleet`: one fleet discovers the simulated VMs through the emulator's Resource
/// Graph endpoint and probes them in memory; only the VMs in trouble get an object, each fixed
/// (or reported) through it as with one object per VM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_watches_the_vms_and_opens_objects_only_for_the_broken_ones() {
    let cfg = DemoConfig {
        vms: 12,
        speed: 2.0,
        timeout: Duration::from_secs(120),
        exit_when_settled: true,
        live_table: false,
        fleet: true,
        ..DemoConfig::default()
    };
    let summary = demo::run(&cfg).await.unwrap();
    assert!(summary.settled, "{}", demo::view::render_summary(&summary));
    // Healthy VMs, and VMs that stay reachable, cost no object (the VM another computer
    // answers for has no fault of its own, but is no healthy member either).
    let faults: Vec<Option<Fault>> = summary
        .vms
        .iter()
        .filter(|t| t.answers_as.is_none())
        .map(|t| t.fault)
        .collect();
    assert!(
        !faults.contains(&None),
        "an object for a healthy VM: {faults:?}"
    );
    assert!(
        !faults.contains(&Some(Fault::LegacyRdpSecurity)),
        "{faults:?}"
    );
    let fixed = |f: Fault| {
        summary
            .vms
            .iter()
            .find(|t| t.fault == Some(f))
            .unwrap()
            .fixed_by
    };
    assert_eq!(
        fixed(Fault::RdpDisabled),
        Some(Step::rung(Rung::ResetRdpConfig))
    );
    assert_eq!(fixed(Fault::HostFailure), Some(Step::rung(Rung::Redeploy)));
    assert_eq!(
        fixed(Fault::CertificateExpired),
        Some(Step::repair(GuestRepair::RenewRdpCertificate)),
        "an expired certificate opens an incident although the VM answers"
    );
    assert_eq!(
        fixed(Fault::Flapping),
        Some(Step::repair(GuestRepair::ListenerKeepAlive))
    );
    // The VM whose address another computer answers on: the members' identity step finds it,
    // and its incident reports the wrong host without acting.
    let reused = summary
        .vms
        .iter()
        .find(|t| t.answers_as.is_some())
        .expect("the fleet holds a VM whose address another computer answers on");
    assert_eq!(reused.expect, Expect::Reported("WrongHost"));
    assert!(reused.settled(), "{reused:?}");
    assert_eq!(reused.fixed_by, None);
    // Discovery is one Resource Graph request per interval for a fleet this size.
    let graph = summary
        .arm_calls
        .get("graph.resources")
        .copied()
        .unwrap_or(0);
    assert!((1..=3).contains(&graph), "{:?}", summary.arm_calls);
}

#[tokio::test]
async fn files_and_a_fleet_are_refused_together() {
    let cfg = DemoConfig {
        vms: 3,
        objects: vec!["examples/rdphealth-basic.yaml".into()],
        fleet: true,
        live_table: false,
        ..DemoConfig::default()
    };
    let err = demo::run(&cfg).await.unwrap_err();
    assert!(matches!(err, demo::DemoError::FilesWithFleet), "{err}");
}
