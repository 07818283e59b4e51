//! The responders, checked with the real prober for every fault state, and remediations
//! through the emulator that make them reachable again.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::{sync::Arc, time::Duration};

use azure_core::Url;
use rdphealth::{
    azure::{ArmClient, ArmConfig, Azure, Operation, PollOutcome, StaticToken, VmRef},
    probe::{FailureReason, Finding, ProbeOptions, ProbeReport, RdpProber, Target},
    sim::{Behaviour, Fault, Scenario, Simulator},
};

const SUB: &str = "00000000-0000-0000-0000-0000000de000";

async fn start() -> Simulator {
    let mut s = Scenario::from_file(std::path::Path::new("scenarios/demo.yaml")).unwrap();
    s.timing.operation = Duration::from_millis(50);
    // Long enough that a loaded machine still probes while the VM reboots.
    s.timing.restart = Duration::from_millis(1000);
    s.timing.redeploy = Duration::from_millis(150);
    s.timing.retry_after = Duration::from_millis(20);
    Simulator::start(s).await.unwrap()
}

fn opts() -> ProbeOptions {
    ProbeOptions {
        timeout: Duration::from_millis(1500),
        ..ProbeOptions::default()
    }
}

async fn probe(sim: &Simulator, vm: &str) -> ProbeReport {
    let addr = sim.responder(vm).unwrap();
    let target = Target::new(addr.ip().to_string(), addr.port()).unwrap();
    RdpProber::new().unwrap().probe_once(&target, &opts()).await
}

fn reason(r: &ProbeReport) -> Option<FailureReason> {
    r.failure.as_ref().map(|f| f.reason)
}

fn client(sim: &Simulator) -> ArmClient {
    ArmClient::new(
        ArmConfig::new(Url::parse(&sim.arm_url()).unwrap()),
        Arc::new(StaticToken::new("test-token")),
    )
}

async fn wait(az: &ArmClient, op: &Operation) -> PollOutcome {
    for _ in 0..200 {
        match az.poll(op).await.unwrap() {
            PollOutcome::Pending { retry_after } => tokio::time::sleep(retry_after).await,
            done => return done,
        }
    }
    panic!("operation never finished");
}

fn vm(name: &str) -> VmRef {
    VmRef::new(SUB, "rg-rdp", name)
}

#[tokio::test]
async fn each_fault_state_is_what_the_prober_sees() {
    let sim = start().await;
    let healthy = probe(&sim, "vm-healthy").await;
    assert!(healthy.reachable, "{healthy:?}");
    assert!(healthy.tls.is_some());

    let expired = probe(&sim, "vm-cert-expired").await;
    assert!(expired.reachable);
    assert!(expired.findings.contains(&Finding::CertificateExpired));

    // Silent endpoints cost a full timeout each: probe them all at once.
    let mut probes = tokio::task::JoinSet::new();
    for (vm, want) in [
        ("vm-rdp-disabled", FailureReason::TcpRefused),
        ("vm-stopped", FailureReason::TcpRefused),
        ("vm-tls-broken", FailureReason::TlsHandshakeFailed),
        ("vm-nsg-blocked", FailureReason::X224Timeout),
        ("vm-hung", FailureReason::X224Timeout),
        ("vm-nic-broken", FailureReason::X224Timeout),
        ("vm-host-failure", FailureReason::X224Timeout),
        ("vm-outage", FailureReason::X224Timeout),
    ] {
        let addr = sim.responder(vm).unwrap();
        probes.spawn(async move {
            let target = Target::new(addr.ip().to_string(), addr.port()).unwrap();
            (
                vm,
                want,
                RdpProber::new().unwrap().probe_once(&target, &opts()).await,
            )
        });
    }
    while let Some(done) = probes.join_next().await {
        let (vm, want, r) = done.unwrap();
        assert!(!r.reachable, "{vm}");
        assert_eq!(reason(&r), Some(want), "{vm}: {r:?}");
    }

    // Flapping: every other connection is dropped before the Connection Confirm.
    let a = probe(&sim, "vm-flapping").await;
    let b = probe(&sim, "vm-flapping").await;
    let mut outcomes = [reason(&a), reason(&b)];
    outcomes.sort();
    assert_eq!(outcomes, [None, Some(FailureReason::ConnectionClosed)]);
    sim.shutdown().await;
}

#[tokio::test]
async fn injected_faults_change_the_responder_at_run_time() {
    let sim = start().await;
    assert!(probe(&sim, "vm-healthy").await.reachable);
    assert!(sim.inject("vm-healthy", Fault::TlsDisabled).await);
    assert_eq!(sim.vm("vm-healthy").unwrap().behaviour, Behaviour::TlsAlert);
    assert_eq!(
        reason(&probe(&sim, "vm-healthy").await),
        Some(FailureReason::TlsHandshakeFailed)
    );
    assert!(sim.inject("vm-healthy", Fault::RdpDisabled).await);
    assert_eq!(
        reason(&probe(&sim, "vm-healthy").await),
        Some(FailureReason::TcpRefused)
    );
    sim.clear("vm-healthy", Fault::RdpDisabled).await;
    sim.clear("vm-healthy", Fault::TlsDisabled).await;
    // The listener comes back on the same port.
    assert!(probe(&sim, "vm-healthy").await.reachable);
    assert!(!sim.inject("no-such-vm", Fault::Flapping).await);
    // Standard RDP security only (`SecurityLayer`=0): the SSL|HYBRID offer is refused, the
    // prober's retry with standard RDP security is accepted: reachable, with the finding.
    assert!(sim.inject("vm-healthy", Fault::LegacyRdpSecurity).await);
    assert_eq!(
        sim.vm("vm-healthy").unwrap().behaviour,
        Behaviour::LegacyRdpOnly
    );
    let legacy = probe(&sim, "vm-healthy").await;
    assert!(legacy.reachable, "{legacy:?}");
    assert!(
        legacy.findings.contains(&Finding::LegacyRdpSecurity),
        "{legacy:?}"
    );
    sim.clear("vm-healthy", Fault::LegacyRdpSecurity).await;
    let modern = probe(&sim, "vm-healthy").await;
    assert!(modern.reachable && modern.findings.is_empty(), "{modern:?}");
    sim.shutdown().await;
}

#[tokio::test]
async fn reset_rdp_config_through_the_emulator_makes_the_vm_reachable() {
    let sim = start().await;
    let az = client(&sim);
    assert_eq!(
        reason(&probe(&sim, "vm-rdp-disabled").await),
        Some(FailureReason::TcpRefused)
    );
    let op = az.reset_rdp_config(&vm("vm-rdp-disabled")).await.unwrap();
    assert!(matches!(
        wait(&az, &op).await,
        PollOutcome::Succeeded { .. }
    ));
    let after = probe(&sim, "vm-rdp-disabled").await;
    assert!(after.reachable, "{after:?}");
    sim.shutdown().await;
}

#[tokio::test]
async fn a_run_command_renewing_the_certificate_clears_the_expired_finding() {
    let sim = start().await;
    let az = client(&sim);
    let script = vec![
        r"Remove-Item ('Cert:\LocalMachine\Remote Desktop\' + (Get-ChildItem 'Cert:\LocalMachine\Remote Desktop\').Thumbprint)".to_owned(),
        "Stop-Service SessionEnv -Force; Start-Service SessionEnv".to_owned(),
    ];
    let op = az
        .run_command(&vm("vm-cert-expired"), &script)
        .await
        .unwrap();
    assert!(matches!(
        wait(&az, &op).await,
        PollOutcome::Succeeded { .. }
    ));
    let after = probe(&sim, "vm-cert-expired").await;
    assert!(after.reachable);
    assert!(
        !after.findings.contains(&Finding::CertificateExpired),
        "{after:?}"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn restart_takes_time_drops_connections_and_fixes_a_hung_guest() {
    let sim = start().await;
    let az = client(&sim);
    // An open session on a healthy VM is dropped by a restart.
    let addr = sim.responder("vm-healthy").unwrap();
    let mut open = tokio::net::TcpStream::connect(addr).await.unwrap();
    let op = az.restart(&vm("vm-healthy")).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read(&mut open, &mut buf),
    )
    .await
    .expect("the connection is closed by the restart");
    assert!(matches!(n, Ok(0) | Err(_)));
    // While rebooting, nothing listens.
    assert_eq!(
        reason(&probe(&sim, "vm-healthy").await),
        Some(FailureReason::TcpRefused)
    );
    assert!(matches!(
        wait(&az, &op).await,
        PollOutcome::Succeeded { .. }
    ));
    assert!(probe(&sim, "vm-healthy").await.reachable);

    let op = az.restart(&vm("vm-hung")).await.unwrap();
    wait(&az, &op).await;
    assert!(probe(&sim, "vm-hung").await.reachable);
    sim.shutdown().await;
}

#[tokio::test]
async fn only_redeploy_fixes_a_host_failure() {
    let sim = start().await;
    let az = client(&sim);
    let op = az.restart(&vm("vm-host-failure")).await.unwrap();
    wait(&az, &op).await;
    assert_eq!(
        reason(&probe(&sim, "vm-host-failure").await),
        Some(FailureReason::X224Timeout)
    );
    let ip = sim.vm("vm-host-failure").unwrap().public_ip;
    let op = az.redeploy(&vm("vm-host-failure")).await.unwrap();
    wait(&az, &op).await;
    assert!(probe(&sim, "vm-host-failure").await.reachable);
    assert_eq!(
        sim.vm("vm-host-failure").unwrap().public_ip,
        ip,
        "a redeploy keeps a Standard public IP"
    );
    sim.shutdown().await;
}

/// The responders answer the identity step like a Windows server with NLA: the CHALLENGE names
/// the VM's computer name, TLS alone is refused; a VM whose address another machine took
/// answers with that machine's name, which `expect_name` turns into `wrong_host`.
#[tokio::test]
async fn responders_name_the_machine_that_answers() {
    let yaml = std::fs::read_to_string("scenarios/minimal.yaml")
        .unwrap()
        .replace(
            "privateIp: 10.20.0.10 } }",
            "privateIp: 10.20.0.10 } }\n          - { name: vm-reused, nic: { subnet: vnet-web/default, networkSecurityGroup: nsg-web }, answersAs: vm-retired }",
        );
    let scenario = Scenario::from_yaml(&yaml).unwrap();
    let sim = Simulator::start(scenario).await.unwrap();
    let identify = |expect: Option<&str>| ProbeOptions {
        identity: true,
        expect_name: expect.map(str::to_owned),
        ..opts()
    };
    let probe_with = async |vm: &str, o: ProbeOptions| {
        let addr = sim.responder(vm).unwrap();
        let target = Target::new(addr.ip().to_string(), addr.port()).unwrap();
        RdpProber::new().unwrap().probe_once(&target, &o).await
    };
    let own = probe_with("vm-web", identify(Some("vm-web"))).await;
    assert!(own.reachable, "{own:?}");
    let nla = own.nla.as_ref().unwrap();
    assert_eq!(nla.credssp, rdphealth::probe::Credssp::Required);
    let id = nla.identity.as_ref().unwrap();
    assert_eq!(id.computer_name.as_deref(), Some("VM-WEB"));
    assert_eq!(id.dns_computer_name.as_deref(), Some("vm-web"));
    assert_eq!(id.os_version.as_deref(), Some("10.0.20348"));
    assert!(id.clock_skew_seconds.unwrap().abs() <= 5);
    assert!(own.findings.is_empty(), "{:?}", own.findings);

    let reused = probe_with("vm-reused", identify(Some("vm-reused"))).await;
    assert_eq!(
        reason(&reused),
        Some(FailureReason::WrongHost),
        "{reused:?}"
    );
    let detail = &reused.failure.as_ref().unwrap().detail;
    assert!(
        detail.contains("VM-RETIRED") && detail.contains("vm-reused"),
        "{detail}"
    );
    // Without the identity step the reused address looks healthy: that is the risk.
    assert!(probe(&sim, "vm-reused").await.reachable);
}
