//! Every adapter operation through the real SDK crates against the emulator over loopback HTTP.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::{sync::Arc, time::Duration};

use azure_core::Url;
use rdphealth::{
    azure::{
        AllowRule, ArmClient, ArmConfig, Azure, AzureError, FlowQuery, Operation, OperationKind,
        OperationResult, Password, PollOutcome, PowerState, StaticToken, VmRef, WatcherRef,
    },
    sim::{Fault, Scenario, Simulator},
};

const SUB: &str = "00000000-0000-0000-0000-0000000de000";
const RG: &str = "rg-rdp";

async fn start() -> (Simulator, ArmClient) {
    start_with(Duration::from_millis(60)).await
}

/// Operations take `op` (restart and redeploy a little longer); tests that must catch an
/// operation in flight use a generous value so a loaded machine cannot outrun them.
async fn start_with(op: Duration) -> (Simulator, ArmClient) {
    let mut scenario = Scenario::from_file(std::path::Path::new("scenarios/demo.yaml")).unwrap();
    scenario.timing.operation = op;
    scenario.timing.restart = op * 2;
    scenario.timing.redeploy = op * 2;
    scenario.timing.retry_after = Duration::from_millis(20);
    let sim = Simulator::start(scenario).await.unwrap();
    let az = client(&sim);
    (sim, az)
}

fn client(sim: &Simulator) -> ArmClient {
    let cfg = ArmConfig::new(Url::parse(&sim.arm_url()).unwrap());
    ArmClient::new(cfg, Arc::new(StaticToken::new("test-token")))
}

fn vm(name: &str) -> VmRef {
    VmRef::new(SUB, RG, name)
}

/// Polls with the server's suggested delay until the operation ends.
async fn wait(az: &ArmClient, op: &Operation) -> PollOutcome {
    for _ in 0..200 {
        match az.poll(op).await.unwrap() {
            PollOutcome::Pending { retry_after } => {
                assert!(
                    retry_after <= Duration::from_secs(1),
                    "compressed timing: {retry_after:?}"
                );
                tokio::time::sleep(retry_after).await;
            }
            done => return done,
        }
    }
    panic!("operation never finished");
}

#[tokio::test]
async fn reads_vm_state_with_instance_view() {
    let (sim, az) = start().await;
    let s = az.vm_state(&vm("vm-rdp-disabled")).await.unwrap();
    assert_eq!(s.power_state, PowerState::Running);
    assert!(s.agent_ready);
    assert_eq!(s.provisioning_state.as_deref(), Some("Succeeded"));
    assert_eq!(s.vm_access_extension.as_deref(), Some("enablevmAccess"));
    assert!(s.boot_diagnostics);
    assert_eq!(s.nic_ids.len(), 1);
    assert_eq!(s.location, "westeurope");
    let stopped = az.vm_state(&vm("vm-stopped")).await.unwrap();
    assert_eq!(stopped.power_state, PowerState::Deallocated);
    assert!(!stopped.agent_ready);
    let host = az.vm_state(&vm("vm-host-failure")).await.unwrap();
    assert!(!host.agent_ready);
    let err = az.vm_state(&vm("nope")).await.unwrap_err();
    assert_eq!(err.reason(), "NotFound");
    assert!(sim.count("vm.get") >= 4);
    sim.shutdown().await;
}

#[tokio::test]
async fn resolves_endpoint_and_reads_nsg_rules_with_cache() {
    let (sim, az) = start().await;
    let e = az.endpoint(&vm("vm-healthy")).await.unwrap();
    assert!(e.private_ip.as_deref().unwrap().starts_with("10.10.1."));
    assert!(e.public_ip.as_deref().unwrap().starts_with("198.51.100."));
    assert!(
        e.subnet_id
            .as_deref()
            .unwrap()
            .ends_with("/subnets/default")
    );
    let rules = az.network_rules(&vm("vm-healthy")).await.unwrap();
    let nic = rules.nic_nsg.as_ref().unwrap();
    assert!(
        nic.rules
            .iter()
            .any(|r| r.name == "allow-rdp" && r.allow && !r.default_rule)
    );
    assert_eq!(nic.rules.iter().filter(|r| r.default_rule).count(), 6);
    assert!(rules.subnet_nsg.is_some());
    let flow = rdphealth::azure::nsg::Flow {
        source: "203.0.113.10".parse().unwrap(),
        destination: e.private_ip.unwrap().parse().unwrap(),
        port: 3389,
    };
    assert!(rules.verdict(&flow).allow);
    let blocked = az.network_rules(&vm("vm-nsg-blocked")).await.unwrap();
    let v = blocked.verdict(&flow);
    assert!(!v.allow);
    assert_eq!(v.rule.unwrap().0, "securityRules/sim-deny-rdp");
    // The subnet and its NSG were read once for both VMs (shared, cached).
    assert_eq!(sim.count("subnet.get"), 1);
    sim.shutdown().await;
}

#[tokio::test]
async fn ip_flow_verify_polls_to_its_result() {
    let (sim, az) = start().await;
    let watcher = WatcherRef::default_for("westeurope");
    let e = az.endpoint(&vm("vm-nsg-blocked")).await.unwrap();
    let query = FlowQuery {
        remote_ip: "203.0.113.10".parse().unwrap(),
        remote_port: 60000,
        local_ip: e.private_ip.unwrap().parse().unwrap(),
        local_port: 3389,
    };
    let op = az
        .start_ip_flow_verify(&vm("vm-nsg-blocked"), &watcher, &query)
        .await
        .unwrap()
        .unwrap();
    let PollOutcome::Succeeded {
        result: OperationResult::Flow(v),
    } = wait(&az, &op).await
    else {
        panic!("expected a verdict");
    };
    assert!(!v.allow);
    assert_eq!(v.rule_name.as_deref(), Some("securityRules/sim-deny-rdp"));
    // No watcher in that region: optional, not an error.
    let none = az
        .start_ip_flow_verify(
            &vm("vm-nsg-blocked"),
            &WatcherRef::default_for("eastus"),
            &query,
        )
        .await
        .unwrap();
    assert!(none.is_none());
    sim.shutdown().await;
}

#[tokio::test]
async fn resource_health_reports_platform_and_host_problems() {
    let (sim, az) = start().await;
    assert!(
        az.resource_health(&vm("vm-healthy"))
            .await
            .unwrap()
            .is_available()
    );
    let outage = az.resource_health(&vm("vm-outage")).await.unwrap();
    assert_eq!(outage.availability_state, "Unavailable");
    assert_eq!(outage.reason_type.as_deref(), Some("Unplanned"));
    // Azure's own example: `context` says who, `category` planned or not.
    assert_eq!(outage.context.as_deref(), Some("Platform Initiated"));
    assert_eq!(outage.category.as_deref(), Some("Unplanned"));
    let host = az.resource_health(&vm("vm-host-failure")).await.unwrap();
    assert_eq!(host.availability_state, "Degraded");
    let stopped = az.resource_health(&vm("vm-stopped")).await.unwrap();
    assert_eq!(stopped.context.as_deref(), Some("Customer Initiated"));
    assert_eq!(stopped.category.as_deref(), Some("Not Applicable"));
    assert_eq!(stopped.reason_type.as_deref(), Some("User Initiated"));
    sim.shutdown().await;
}

#[tokio::test]
async fn boot_diagnostics_serial_log_shows_guest_signatures() {
    let (sim, az) = start().await;
    let uris = az.boot_diagnostics(&vm("vm-hung")).await.unwrap();
    assert!(
        !format!("{uris:?}").contains("sig="),
        "SAS tokens must not be printed"
    );
    let log = az.serial_log(&uris).await.unwrap();
    assert!(log.contains("The TermService service hung on starting."));
    let nic = az
        .serial_log(&az.boot_diagnostics(&vm("vm-nic-broken")).await.unwrap())
        .await
        .unwrap();
    assert!(nic.contains("netvsc"));
    sim.shutdown().await;
}

#[tokio::test]
async fn reset_rdp_config_reuses_the_extension_and_fixes_the_listener() {
    let (sim, az) = start().await;
    let op = az.reset_rdp_config(&vm("vm-rdp-disabled")).await.unwrap();
    assert!(op.async_operation.is_some());
    assert_eq!(
        wait(&az, &op).await,
        PollOutcome::Succeeded {
            result: OperationResult::Done
        }
    );
    assert!(
        !sim.vm("vm-rdp-disabled")
            .unwrap()
            .faults
            .contains(&Fault::RdpDisabled)
    );
    let s = az.vm_state(&vm("vm-rdp-disabled")).await.unwrap();
    assert_eq!(s.vm_access_extension.as_deref(), Some("enablevmAccess"));
    let ext = s
        .extensions
        .iter()
        .find(|e| e.name == "enablevmAccess")
        .unwrap();
    assert_eq!(ext.code.as_deref(), Some("ProvisioningState/succeeded"));
    // A second run gets a new forceUpdateTag and runs again (not a no-op).
    let again = az.reset_rdp_config(&vm("vm-rdp-disabled")).await.unwrap();
    assert!(again.async_operation.is_some());
    wait(&az, &again).await;
    sim.shutdown().await;
}

#[tokio::test]
async fn reset_password_uses_the_windows_shape_and_fails_when_the_agent_is_down() {
    let (sim, az) = start().await;
    let op = az
        .reset_password(
            &vm("vm-healthy"),
            "azureadmin",
            &Password::new("N3w-P@ssw0rd!"),
        )
        .await
        .unwrap();
    assert_eq!(
        wait(&az, &op).await,
        PollOutcome::Succeeded {
            result: OperationResult::Done
        }
    );
    assert_eq!(sim.vm("vm-healthy").unwrap().password_resets, 1);
    // LRO polling to failure: the agent is not Ready on a failing host.
    let op = az
        .reset_password(
            &vm("vm-host-failure"),
            "azureadmin",
            &Password::new("x-Y-z-123!"),
        )
        .await
        .unwrap();
    let PollOutcome::Failed { code, message } = wait(&az, &op).await else {
        panic!("expected a failure");
    };
    assert_eq!(code, "VMAgentStatusCommunicationError");
    assert!(message.contains("VM agent"));
    // Extension change on a deallocated VM: 409 at once.
    let err = az.reset_rdp_config(&vm("vm-stopped")).await.unwrap_err();
    assert!(
        matches!(&err, AzureError::Conflict { code, .. } if code == "OperationNotAllowed"),
        "{err:?}"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn run_command_returns_output_and_applies_the_tls_fix() {
    let (sim, az) = start_with(Duration::from_millis(700)).await;
    let query = vec![
        "wevtutil qe system /c:5 /f:text /q:\"Event[System[Provider[@Name='Schannel']]]\""
            .to_owned(),
    ];
    let op = az.run_command(&vm("vm-tls-broken"), &query).await.unwrap();
    // One Run Command at a time per VM.
    let busy = az
        .run_command(&vm("vm-tls-broken"), &query)
        .await
        .unwrap_err();
    assert_eq!(busy.reason(), "Conflict");
    let PollOutcome::Succeeded {
        result: OperationResult::RunCommand(out),
    } = wait(&az, &op).await
    else {
        panic!("expected output");
    };
    assert!(out.stdout.contains("36871"), "{}", out.stdout);
    let fix = vec![
        r"foreach ($v in 'TLS 1.0','TLS 1.1','TLS 1.2') {".to_owned(),
        r"  $k = 'HKLM:\SYSTEM\CurrentControlSet\Control\SecurityProviders\SCHANNEL\Protocols\' + $v + '\Server'".to_owned(),
        "  New-Item -Path $k -Force | Out-Null; Set-ItemProperty -Path $k -Name Enabled -Value 1 -Type DWord }".to_owned(),
    ];
    let op = az.run_command(&vm("vm-tls-broken"), &fix).await.unwrap();
    let PollOutcome::Succeeded {
        result: OperationResult::RunCommand(out),
    } = wait(&az, &op).await
    else {
        panic!("expected output");
    };
    assert!(out.stdout.contains("TLS"));
    assert!(
        !sim.vm("vm-tls-broken")
            .unwrap()
            .faults
            .contains(&Fault::TlsDisabled)
    );
    sim.shutdown().await;
}

/// The guide's two calls: a free address of the subnet, then the NIC moved to it.
async fn reset_nic(az: &ArmClient, name: &str) -> rdphealth::azure::AzureResult<Operation> {
    let at = az.nic_address(&vm(name)).await?;
    let free = az.ip_availability(&at.subnet_id, &at.private_ip).await?;
    assert!(!free.available, "the NIC's own address is in use");
    let to = free
        .free
        .into_iter()
        .find(|ip| *ip != at.private_ip)
        .unwrap();
    az.set_nic_address(
        &vm(name),
        &rdphealth::azure::AddressChange {
            nic_id: at.nic_id,
            from_ip: at.private_ip,
            to_ip: to,
        },
    )
    .await
}

#[tokio::test]
async fn reset_nic_moves_to_a_free_address_and_clears_a_broken_nic() {
    let (sim, az) = start_with(Duration::from_millis(700)).await;
    let before = az
        .endpoint(&vm("vm-nic-broken"))
        .await
        .unwrap()
        .private_ip
        .unwrap();
    let boots = sim.vm("vm-nic-broken").unwrap().boot;
    let op = reset_nic(&az, "vm-nic-broken").await.unwrap();
    assert!(op.detail.as_deref().unwrap().contains(&before));
    // A second change while the first runs: AnotherOperationInProgress.
    let err = reset_nic(&az, "vm-nic-broken").await.unwrap_err();
    assert_eq!(err.reason(), "Conflict");
    assert_eq!(
        wait(&az, &op).await,
        PollOutcome::Succeeded {
            result: OperationResult::Done
        }
    );
    let after = az
        .endpoint(&vm("vm-nic-broken"))
        .await
        .unwrap()
        .private_ip
        .unwrap();
    assert_ne!(before, after);
    // The VM follows its NIC: the emulator reports the new address, and the guest restarted.
    let summary = sim.vm("vm-nic-broken").unwrap();
    assert_eq!(summary.private_ip.as_deref(), Some(after.as_str()));
    assert!(summary.boot > boots, "a private-IP change restarts the VM");
    // A change recorded for an address the NIC is no longer on is refused before any PUT.
    let puts = sim.count("nic.put");
    let nic_id = az.nic_address(&vm("vm-nic-broken")).await.unwrap().nic_id;
    let stale = az
        .set_nic_address(
            &vm("vm-nic-broken"),
            &rdphealth::azure::AddressChange {
                nic_id,
                from_ip: before.clone(),
                to_ip: before.clone(),
            },
        )
        .await
        .unwrap_err();
    assert_eq!(stale.reason(), "Invalid", "{stale:?}");
    assert_eq!(sim.count("nic.put"), puts, "nothing was sent");
    assert!(
        !sim.vm("vm-nic-broken")
            .unwrap()
            .faults
            .contains(&Fault::NicBroken)
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn restart_and_redeploy_are_polled_by_our_own_poller() {
    let (sim, az) = start_with(Duration::from_millis(700)).await;
    let op = az.restart(&vm("vm-hung")).await.unwrap();
    assert!(op.async_operation.is_some() && op.location.is_some());
    assert!(matches!(
        az.poll(&op).await.unwrap(),
        PollOutcome::Pending { .. }
    ));
    // A newer power operation preempts the running one: it ends `Canceled` with
    // `OperationPreempted`, and the newer one runs to its end.
    let newer = az.restart(&vm("vm-hung")).await.unwrap();
    match wait(&az, &op).await {
        PollOutcome::Failed { code, .. } => assert_eq!(code, "OperationPreempted"),
        other => panic!("expected the older restart preempted, got {other:?}"),
    }
    assert_eq!(
        wait(&az, &newer).await,
        PollOutcome::Succeeded {
            result: OperationResult::Done
        }
    );
    assert!(
        !sim.vm("vm-hung")
            .unwrap()
            .faults
            .contains(&Fault::GuestHung)
    );

    let ip_before = az.endpoint(&vm("vm-host-failure")).await.unwrap().public_ip;
    let op = az.redeploy(&vm("vm-host-failure")).await.unwrap();
    // The stored handle survives a round trip through JSON (it lives in the object's status).
    let stored: Operation = serde_json::from_str(&serde_json::to_string(&op).unwrap()).unwrap();
    assert_eq!(
        wait(&az, &stored).await,
        PollOutcome::Succeeded {
            result: OperationResult::Done
        }
    );
    let ip_after = az.endpoint(&vm("vm-host-failure")).await.unwrap().public_ip;
    assert_eq!(ip_before, ip_after, "redeploy keeps a Standard public IP");
    assert!(
        !sim.vm("vm-host-failure")
            .unwrap()
            .faults
            .contains(&Fault::HostFailure)
    );
    // Restarting a deallocated VM is refused.
    assert_eq!(
        az.restart(&vm("vm-stopped")).await.unwrap_err().reason(),
        "Conflict"
    );
    sim.shutdown().await;
}

/// A loopback listener that records every request it receives (headers included).
struct Eavesdropper {
    addr: std::net::SocketAddr,
    seen: Arc<std::sync::Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Eavesdropper {
    async fn start() -> Self {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        let task = tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let mut buf = vec![0u8; 8192];
                let n = sock.read(&mut buf).await.unwrap_or(0);
                log.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&buf[..n]).into_owned());
                let body = "serial log line\n";
                let _ = sock
                    .write_all(
                        format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        )
                        .as_bytes(),
                    )
                    .await;
            }
        });
        Self { addr, seen, task }
    }

    fn requests(&self) -> Vec<String> {
        self.seen.lock().unwrap().clone()
    }
}

#[tokio::test]
async fn the_arm_token_is_sent_only_to_the_arm_endpoint() {
    let (sim, az) = start().await;
    let spy = Eavesdropper::start().await;
    let arm = Url::parse(&sim.arm_url()).unwrap();
    let elsewhere = [
        // Another listener on loopback.
        format!("http://{}/subscriptions/{SUB}/operations/x", spy.addr),
        // The ARM host on another port.
        format!(
            "http://{}:{}/operations/x",
            arm.host_str().unwrap(),
            spy.addr.port()
        ),
        // The ARM host and port under another scheme.
        format!(
            "https://{}:{}/operations/x",
            arm.host_str().unwrap(),
            arm.port().unwrap()
        ),
    ];
    for url in &elsewhere {
        for (async_operation, location) in [(Some(url.clone()), None), (None, Some(url.clone()))] {
            let op = Operation {
                kind: OperationKind::Restart,
                vm: vm("vm-rdp-disabled"),
                async_operation,
                location,
                started_at: String::new(),
                detail: None,
                completed: false,
            };
            let err = az.poll(&op).await.unwrap_err();
            assert_eq!(err.reason(), "UntrustedOperationUrl", "{url}: {err}");
            assert!(!err.is_retryable(), "a refused URL is never retried");
            assert!(
                !err.to_string().contains("/operations/x"),
                "only the origin is named: {err}"
            );
        }
    }
    assert!(
        spy.requests().is_empty(),
        "no request reached the other listener: {:?}",
        spy.requests()
    );
    // A real operation URL of the ARM endpoint is still polled.
    let op = az.restart(&vm("vm-rdp-disabled")).await.unwrap();
    assert!(matches!(
        wait(&az, &op).await,
        PollOutcome::Succeeded { .. }
    ));
    // Boot-diagnostics blobs live elsewhere and are fetched without the token.
    let uris = rdphealth::azure::BootDiagnosticsUris {
        screenshot: None,
        serial_log: Some(format!("http://{}/bootdiagnostics/serial.log", spy.addr)),
    };
    let log = az.serial_log(&uris).await.unwrap();
    assert!(log.contains("serial log line"));
    let requests = spy.requests();
    assert_eq!(requests.len(), 1);
    assert!(
        !requests[0].to_ascii_lowercase().contains("authorization"),
        "a blob request carries no token: {}",
        requests[0]
    );
    spy.task.abort();
}

/// Network accepts a second rule change on an NSG while one runs and fails it later with
/// `AnotherOperationInProgress`; the first one is applied. A second NIC change while one runs
/// is refused at once with 429 `RetryableErrorDueToAnotherOperation`.
#[tokio::test]
async fn concurrent_network_changes_fail_the_way_azure_fails_them() {
    let (sim, az) = start_with(Duration::from_millis(700)).await;
    let rules = az.network_rules(&vm("vm-healthy")).await.unwrap();
    let nsg_id = rules.nic_nsg.unwrap().id;
    let rule = |name: &str, priority| AllowRule {
        nsg_id: nsg_id.clone(),
        name: name.to_owned(),
        priority,
        source_prefixes: vec!["198.51.100.0/24".into()],
        destination_prefix: "10.10.1.4".into(),
        port: 3389,
        description: "test".into(),
    };
    let first = az
        .put_allow_rule(&vm("vm-healthy"), &rule("first", 300))
        .await
        .unwrap();
    let second = az
        .put_allow_rule(&vm("vm-healthy"), &rule("second", 301))
        .await
        .unwrap();
    assert!(matches!(
        wait(&az, &first).await,
        PollOutcome::Succeeded { .. }
    ));
    match wait(&az, &second).await {
        PollOutcome::Failed { code, .. } => assert_eq!(code, "AnotherOperationInProgress"),
        other => panic!("expected AnotherOperationInProgress, got {other:?}"),
    }
    let op = reset_nic(&az, "vm-nic-broken").await.unwrap();
    let err = reset_nic(&az, "vm-nic-broken").await.unwrap_err();
    assert!(err.is_another_operation(), "{err:?}");
    assert!(err.retry_after().is_some());
    wait(&az, &op).await;
    sim.shutdown().await;
}
