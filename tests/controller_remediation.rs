//! The whole loop with remediation: the real `Controller` against a real API server,
//! with the simulator as Azure (the real SDK adapter talking to the ARM emulator) and the
//! simulated VMs' live RDP responders. The endpoint comes from Azure (no `spec.endpoint.host`);
//! a prober stand-in routes the addresses ARM reports to the VMs' loopback responders, the way
//! a network would.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use azure_core::Url;
use common::{
    real_api::{Inner, RealApiServer, condition},
    sim_net::SimNetwork,
};
use rdphealth::{
    azure::{
        AddressChange, AllowRule, ArmClient, ArmConfig, Azure, AzureResult, BootDiagnosticsUris,
        CountedAzure, Endpoint, FlowQuery, Health, IpAvailability, NetworkRules, NicAddress,
        Operation, Password, PollOutcome, SnapshotInfo, SnapshotRequest, StaticToken, VmRef,
        VmState, WatcherRef,
    },
    controller::{self, LeaseSettings, Seams, Settings},
    engine::{AzureResolver, ResolverPolicy},
    ladder::fleet::FleetPolicy,
    probe::{RdpProber, Target},
    sim::{HttpFault, Scenario, Simulator},
};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    sync::oneshot,
    task::JoinHandle,
};

const NS: &str = "default";
const WAIT: Duration = Duration::from_secs(60);
const SUB: &str = "00000000-0000-0000-0000-0000000000aa";

fn scenario(vms: &str) -> Scenario {
    scenario_timed("300ms", vms)
}

/// [`scenario`] with Azure operations (Run Command, VMAccess…) taking `operation`.
fn scenario_timed(operation: &str, vms: &str) -> Scenario {
    let timing =
        format!("{{ operation: {operation}, restart: 1s, redeploy: 2s, retryAfter: 200ms }}");
    Scenario::from_yaml(&scenario_yaml(&timing, vms)).unwrap()
}

/// A scenario with one subscription, network and NSG, `timing` and `vms`.
fn scenario_yaml(timing: &str, vms: &str) -> String {
    format!(
        r#"
timing: {timing}
subscriptions:
  - id: {SUB}
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
{vms}
"#
    )
}

fn resource_id(vm: &str) -> String {
    format!(
        "/subscriptions/{SUB}/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/{vm}"
    )
}

/// What the API server held when an Azure call was made (every mutating call, and the
/// read-only in-guest evidence query, which is a Run Command too).
#[derive(Debug, Clone)]
struct Call {
    operation: &'static str,
    /// `status.ladder.current` of every object at the time of the call.
    current: Vec<Value>,
}

/// Passes calls to the adapter and, for every mutating call, records what the API server
/// held at that moment (the intent must be stored before the call).
struct Witness {
    inner: ArmClient,
    api: Arc<RealApiServer>,
    calls: Mutex<Vec<Call>>,
}

impl Witness {
    fn record(&self, operation: &'static str) {
        let current = self.api.read(|inner| {
            inner
                .list("rdphealths", NS)
                .iter()
                .map(|o| o["status"]["ladder"]["current"].clone())
                .collect()
        });
        self.calls.lock().unwrap().push(Call { operation, current });
    }

    /// Mutating calls (not the evidence query).
    fn mutating(&self) -> Vec<Call> {
        let calls = self.calls.lock().unwrap();
        calls
            .iter()
            .filter(|c| c.operation != "guest_query")
            .cloned()
            .collect()
    }

    /// The in-guest evidence queries started.
    fn guest_queries(&self) -> usize {
        let calls = self.calls.lock().unwrap();
        calls
            .iter()
            .filter(|c| c.operation == "guest_query")
            .count()
    }
}

/// Whether a Run Command script is the operator's read-only evidence query.
fn is_evidence_query(script: &[String]) -> bool {
    script
        .first()
        .is_some_and(|l| l.contains("rdphealth-script: query-rdp-evidence"))
}

#[async_trait::async_trait]
impl Azure for Witness {
    async fn vm_state(&self, vm: &VmRef) -> AzureResult<VmState> {
        self.inner.vm_state(vm).await
    }
    async fn endpoint(&self, vm: &VmRef) -> AzureResult<Endpoint> {
        self.inner.endpoint(vm).await
    }
    async fn network_rules(&self, vm: &VmRef) -> AzureResult<NetworkRules> {
        self.inner.network_rules(vm).await
    }
    async fn start_ip_flow_verify(
        &self,
        vm: &VmRef,
        watcher: &WatcherRef,
        query: &FlowQuery,
    ) -> AzureResult<Option<Operation>> {
        self.inner.start_ip_flow_verify(vm, watcher, query).await
    }
    async fn resource_health(&self, vm: &VmRef) -> AzureResult<Health> {
        self.inner.resource_health(vm).await
    }
    async fn boot_diagnostics(&self, vm: &VmRef) -> AzureResult<BootDiagnosticsUris> {
        self.inner.boot_diagnostics(vm).await
    }
    async fn serial_log(&self, uris: &BootDiagnosticsUris) -> AzureResult<String> {
        self.inner.serial_log(uris).await
    }
    async fn reset_rdp_config(&self, vm: &VmRef) -> AzureResult<Operation> {
        self.record("reset_rdp_config");
        self.inner.reset_rdp_config(vm).await
    }
    async fn reset_password(
        &self,
        vm: &VmRef,
        user: &str,
        password: &Password,
    ) -> AzureResult<Operation> {
        self.record("reset_password");
        self.inner.reset_password(vm, user, password).await
    }
    async fn run_command(&self, vm: &VmRef, script: &[String]) -> AzureResult<Operation> {
        self.record(if is_evidence_query(script) {
            "guest_query"
        } else {
            "run_command"
        });
        self.inner.run_command(vm, script).await
    }
    async fn nic_address(&self, vm: &VmRef) -> AzureResult<NicAddress> {
        self.inner.nic_address(vm).await
    }
    async fn ip_availability(&self, subnet_id: &str, ip: &str) -> AzureResult<IpAvailability> {
        self.inner.ip_availability(subnet_id, ip).await
    }
    async fn set_nic_address(&self, vm: &VmRef, change: &AddressChange) -> AzureResult<Operation> {
        self.record("set_nic_address");
        self.inner.set_nic_address(vm, change).await
    }
    async fn restart(&self, vm: &VmRef) -> AzureResult<Operation> {
        self.record("restart");
        self.inner.restart(vm).await
    }
    async fn redeploy(&self, vm: &VmRef) -> AzureResult<Operation> {
        self.record("redeploy");
        self.inner.redeploy(vm).await
    }
    async fn start(&self, vm: &VmRef) -> AzureResult<Operation> {
        self.record("start");
        self.inner.start(vm).await
    }
    async fn put_allow_rule(&self, vm: &VmRef, rule: &AllowRule) -> AzureResult<Operation> {
        self.record("put_allow_rule");
        self.inner.put_allow_rule(vm, rule).await
    }
    async fn create_os_disk_snapshot(
        &self,
        vm: &VmRef,
        request: &SnapshotRequest,
    ) -> AzureResult<Operation> {
        self.record("create_os_disk_snapshot");
        self.inner.create_os_disk_snapshot(vm, request).await
    }
    async fn list_snapshots(&self, vm: &VmRef) -> AzureResult<Vec<SnapshotInfo>> {
        self.inner.list_snapshots(vm).await
    }
    async fn delete_snapshot(&self, vm: &VmRef, name: &str) -> AzureResult<()> {
        self.record("delete_snapshot");
        self.inner.delete_snapshot(vm, name).await
    }
    async fn poll(&self, op: &Operation) -> AzureResult<PollOutcome> {
        self.inner.poll(op).await
    }
}

/// The I/O of an operator against `sim`, with the witness of its Azure calls.
fn seams(api: &Arc<RealApiServer>, sim: &Simulator, arm: ArmConfig) -> (Seams, Arc<Witness>) {
    let witness = Arc::new(Witness {
        inner: ArmClient::new(arm, Arc::new(StaticToken::new("test-token"))),
        api: Arc::clone(api),
        calls: Mutex::new(Vec::new()),
    });
    let azure = Arc::new(CountedAzure::new(witness.clone() as Arc<dyn Azure>).unwrap());
    let seams = Seams {
        prober: Arc::new(SimNetwork {
            sim: Arc::clone(sim.shared()),
            prober: RdpProber::new().unwrap(),
        }),
        resolver: Arc::new(AzureResolver::new(
            azure.clone() as Arc<dyn Azure>,
            ResolverPolicy::default(),
        )),
        azure: Some(azure),
        identities: None,
    };
    (seams, witness)
}

/// The operator running against the fake API server and the simulator.
struct Operator {
    http: SocketAddr,
    witness: Arc<Witness>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), controller::RunError>>,
}

impl Operator {
    async fn start(api: &Arc<RealApiServer>, sim: &Simulator, identity: &str) -> Self {
        Self::start_with(api, sim, identity, grace(Duration::from_millis(200))).await
    }

    async fn start_with(
        api: &Arc<RealApiServer>,
        sim: &Simulator,
        identity: &str,
        base: Settings,
    ) -> Self {
        let arm = ArmConfig::new(Url::parse(&sim.arm_url()).unwrap());
        Self::start_with_arm(api, sim, identity, base, arm).await
    }

    async fn start_with_arm(
        api: &Arc<RealApiServer>,
        sim: &Simulator,
        identity: &str,
        base: Settings,
        arm: ArmConfig,
    ) -> Self {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http = listener.local_addr().unwrap();
        let settings = Settings {
            concurrency: 4,
            lease: Some(LeaseSettings {
                name: "rdphealth-operator".into(),
                namespace: NS.into(),
                identity: identity.into(),
                duration_seconds: 4,
                grace_seconds: 1,
            }),
            instance: Some(identity.into()),
            probe_source: Some("203.0.113.10".parse().unwrap()),
            ..base
        };
        let (seams, witness) = seams(api, sim, arm);
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(controller::run(
            api.client(),
            settings,
            seams,
            listener,
            async move {
                let _ = stopped.await;
            },
        ));
        let op = Self {
            http,
            witness,
            stop: Some(stop),
            task,
        };
        op.wait_ready().await;
        op
    }

    async fn wait_ready(&self) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !matches!(common::http_get(self.http, "/readyz").await, Ok((200, _))) {
            assert!(tokio::time::Instant::now() < deadline, "never became ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Probes so far with `result` (`reachable`, `unreachable`; every probe counts, written
    /// or not).
    async fn probes(&self, result: &str) -> u64 {
        let (_, text) = common::http_get(self.http, "/metrics").await.unwrap();
        let prefix = format!(r#"rdphealth_probe_duration_seconds_count{{result="{result}"}} "#);
        text.lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Waits until `n` more reachable probes have been made.
    async fn wait_more_probes(&self, n: u64) {
        self.wait_more_probes_with("reachable", n).await;
    }

    /// Waits until `n` more probes with `result` have been made.
    async fn wait_more_probes_with(&self, result: &str, n: u64) {
        let target = self.probes(result).await + n;
        let deadline = tokio::time::Instant::now() + WAIT;
        while self.probes(result).await < target {
            assert!(
                tokio::time::Instant::now() < deadline,
                "fewer than {n} more probes"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn wait_metrics(&self, present: &[&str]) -> String {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let (_, text) = common::http_get(self.http, "/metrics").await.unwrap();
            if present.iter().all(|p| text.contains(p)) {
                return text;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "metrics never matched {present:?}:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn shutdown(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(WAIT, &mut self.task)
            .await
            .expect("operator did not stop")
            .unwrap()
            .unwrap();
    }
}

/// Settings whose disruptive rungs wait `d` after an incident opens.
fn grace(d: Duration) -> Settings {
    Settings {
        fleet: FleetPolicy {
            disruptive_grace: d,
            ..FleetPolicy::default()
        },
        ..Settings::default()
    }
}

/// The simulator with one VM (`vm_line`, a scenario `vms:` entry), the API server, an operator
/// holding the lease, and one object `name` for `vm` with `remediation`.
async fn start_one(
    vm_line: &str,
    name: &str,
    vm: &str,
    remediation: Value,
) -> (Simulator, Arc<RealApiServer>, Operator) {
    let sim = Simulator::start(scenario(&format!("          - {vm_line}")))
        .await
        .unwrap();
    let api = Arc::new(RealApiServer::start().await);
    let op = Operator::start(&api, &sim, "replica-a").await;
    api.create("rdphealths", NS, rdphealth(name, vm, remediation));
    (sim, api, op)
}

fn rdphealth(name: &str, vm: &str, remediation: Value) -> Value {
    json!({
        "apiVersion": "rdphealth.io/v1alpha1",
        "kind": "RdpHealth",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "vm": {"resourceId": resource_id(vm)},
            "probe": {
                "interval": "1s", "unhealthyInterval": "300ms", "timeout": "250ms",
                "failureThreshold": 2, "successThreshold": 1,
            },
            "remediation": remediation,
        },
    })
}

fn status(inner: &Inner, name: &str) -> Option<Value> {
    inner.status(NS, name)
}

fn events(inner: &Inner, name: &str, reason: &str) -> usize {
    inner
        .list("events", NS)
        .iter()
        .filter(|e| e["reason"] == reason && e["regarding"]["name"] == name)
        .count()
}

async fn wait_status(
    api: &RealApiServer,
    name: &str,
    what: &str,
    f: impl Fn(&Value) -> bool,
) -> Value {
    api.wait_for(what, WAIT, |inner| status(inner, name).filter(|s| f(s)))
        .await
}

/// Every `status.diagnosis` the API server stored for `name`, in order.
fn stored_diagnoses(inner: &Inner, name: &str) -> Vec<Value> {
    inner
        .log
        .iter()
        .filter(|c| c.resource == "rdphealths" && c.object["metadata"]["name"] == name)
        .map(|c| c.object["status"]["diagnosis"].clone())
        .filter(Value::is_object)
        .collect()
}

fn pending_kinds(diagnosis: &Value) -> Vec<String> {
    diagnosis["pending"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p["kind"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Phases of `status.ladder.current` in the order the API server stored them.
fn stored_phases(inner: &Inner, name: &str) -> Vec<String> {
    let mut phases: Vec<String> = Vec::new();
    for change in &inner.log {
        if change.resource != "rdphealths" || change.object["metadata"]["name"] != name {
            continue;
        }
        if let Some(p) = change.object["status"]["ladder"]["current"]["phase"].as_str()
            && phases.last().map(String::as_str) != Some(p)
        {
            phases.push(p.to_string());
        }
    }
    phases
}

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

/// `promtool check metrics` on the remediation metrics too (skipped without promtool unless
/// `RDPHEALTH_REQUIRE_PROMTOOL=1`).
fn promtool_check(text: &str) {
    use std::{io::Write, process::Command};
    let promtool = std::env::var("PROMTOOL").unwrap_or_else(|_| "promtool".into());
    let available = Command::new(&promtool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !available {
        assert!(
            std::env::var("RDPHEALTH_REQUIRE_PROMTOOL").as_deref() != Ok("1"),
            "promtool is required but `{promtool}` is not installed"
        );
        return;
    }
    let mut child = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
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
    let canary = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = canary.local_addr().unwrap().port();
    drop(canary);
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
