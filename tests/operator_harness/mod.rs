//! The harness of the controller's remediation tests: the real `Controller` against a real
//! API server, with the simulator as Azure (the real SDK adapter talking to the ARM emulator)
//! and the simulated VMs' live RDP responders; a witness of every Azure call records what the
//! API server held when it was made. Shared by the `controller_*` remediation test files.

#![allow(dead_code, unused_imports, clippy::unwrap_used, clippy::expect_used)]

pub use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

pub use azure_core::Url;
pub use rdphealth::{
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
pub use serde_json::{Value, json};
pub use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
    sync::oneshot,
    task::JoinHandle,
};

pub(crate) use crate::common::{
    self,
    real_api::{Inner, RealApiServer, condition},
};

pub const NS: &str = "default";
pub const WAIT: Duration = Duration::from_secs(60);
pub const SUB: &str = "00000000-0000-0000-0000-0000000000aa";

pub fn scenario(vms: &str) -> Scenario {
    scenario_timed("300ms", vms)
}

/// [`scenario`] with Azure operations (Run Command, VMAccess…) taking `operation`.
pub fn scenario_timed(operation: &str, vms: &str) -> Scenario {
    let timing =
        format!("{{ operation: {operation}, restart: 1s, redeploy: 2s, retryAfter: 200ms }}");
    Scenario::from_yaml(&scenario_yaml(&timing, vms)).unwrap()
}

/// A scenario with one subscription, network and NSG, `timing` and `vms`.
pub fn scenario_yaml(timing: &str, vms: &str) -> String {
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

pub fn resource_id(vm: &str) -> String {
    format!(
        "/subscriptions/{SUB}/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/{vm}"
    )
}

/// What the API server held when an Azure call was made (every mutating call, and the
/// read-only in-guest evidence query, which is a Run Command too).
#[derive(Debug, Clone)]
pub struct Call {
    pub operation: &'static str,
    /// `status.ladder.current` of every object at the time of the call.
    pub current: Vec<Value>,
}

/// Passes calls to the adapter and, for every mutating call, records what the API server
/// held at that moment (the intent must be stored before the call).
pub struct Witness {
    pub inner: ArmClient,
    pub api: Arc<RealApiServer>,
    pub calls: Mutex<Vec<Call>>,
}

impl Witness {
    pub fn record(&self, operation: &'static str) {
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
    pub fn mutating(&self) -> Vec<Call> {
        let calls = self.calls.lock().unwrap();
        calls
            .iter()
            .filter(|c| c.operation != "guest_query")
            .cloned()
            .collect()
    }

    /// The in-guest evidence queries started.
    pub fn guest_queries(&self) -> usize {
        let calls = self.calls.lock().unwrap();
        calls
            .iter()
            .filter(|c| c.operation == "guest_query")
            .count()
    }
}

/// Whether a Run Command script is the operator's read-only evidence query.
pub fn is_evidence_query(script: &[String]) -> bool {
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
pub fn seams(api: &Arc<RealApiServer>, sim: &Simulator, arm: ArmConfig) -> (Seams, Arc<Witness>) {
    let witness = Arc::new(Witness {
        inner: ArmClient::new(arm, Arc::new(StaticToken::new("test-token"))),
        api: Arc::clone(api),
        calls: Mutex::new(Vec::new()),
    });
    let azure = Arc::new(CountedAzure::new(witness.clone() as Arc<dyn Azure>).unwrap());
    let seams = Seams {
        prober: Arc::new(sim.address_prober(Arc::new(RdpProber::new().unwrap()))),
        resolver: Arc::new(AzureResolver::new(
            azure.clone() as Arc<dyn Azure>,
            ResolverPolicy::default(),
        )),
        azure: Some(azure),
        identities: None,
        graph: None,
    };
    (seams, witness)
}

/// An operator process (`controller::run`) on a loopback HTTP port, stopped on request.
pub struct Running {
    pub http: SocketAddr,
    pub stop: Option<oneshot::Sender<()>>,
    pub task: JoinHandle<Result<(), controller::RunError>>,
}

impl Running {
    /// Starts `controller::run` with `settings` and `seams` against `api`; returns once it
    /// answers `/readyz`.
    pub async fn start(api: &RealApiServer, settings: Settings, seams: Seams) -> Self {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http = listener.local_addr().unwrap();
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
        let running = Self {
            http,
            stop: Some(stop),
            task,
        };
        running.wait_ready().await;
        running
    }

    pub async fn wait_ready(&self) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !matches!(common::http_get(self.http, "/readyz").await, Ok((200, _))) {
            assert!(tokio::time::Instant::now() < deadline, "never became ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn shutdown(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(WAIT, &mut self.task)
            .await
            .expect("operator did not stop")
            .unwrap()
            .unwrap();
    }
}

/// The operator running against the API server and the simulator, with the witness of its
/// Azure calls.
pub struct Operator {
    pub http: SocketAddr,
    pub witness: Arc<Witness>,
    running: Running,
}

impl Operator {
    pub async fn start(api: &Arc<RealApiServer>, sim: &Simulator, identity: &str) -> Self {
        Self::start_with(api, sim, identity, grace(Duration::from_millis(200))).await
    }

    pub async fn start_with(
        api: &Arc<RealApiServer>,
        sim: &Simulator,
        identity: &str,
        base: Settings,
    ) -> Self {
        let arm = ArmConfig::new(Url::parse(&sim.arm_url()).unwrap());
        Self::start_with_arm(api, sim, identity, base, arm).await
    }

    pub async fn start_with_arm(
        api: &Arc<RealApiServer>,
        sim: &Simulator,
        identity: &str,
        base: Settings,
        arm: ArmConfig,
    ) -> Self {
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
        let running = Running::start(api, settings, seams).await;
        Self {
            http: running.http,
            witness,
            running,
        }
    }

    pub async fn wait_ready(&self) {
        self.running.wait_ready().await;
    }

    /// Probes so far with `result` (`reachable`, `unreachable`; every probe counts, written
    /// or not).
    pub async fn probes(&self, result: &str) -> u64 {
        let (_, text) = common::http_get(self.http, "/metrics").await.unwrap();
        let prefix = format!(r#"rdphealth_probe_duration_seconds_count{{result="{result}"}} "#);
        text.lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Waits until `n` more reachable probes have been made.
    pub async fn wait_more_probes(&self, n: u64) {
        self.wait_more_probes_with("reachable", n).await;
    }

    /// Waits until `n` more probes with `result` have been made.
    pub async fn wait_more_probes_with(&self, result: &str, n: u64) {
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

    pub async fn wait_metrics(&self, present: &[&str]) -> String {
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

    pub async fn shutdown(self) {
        self.running.shutdown().await;
    }
}

/// Settings whose disruptive rungs wait `d` after an incident opens.
pub fn grace(d: Duration) -> Settings {
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
pub async fn start_one(
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

pub fn rdphealth(name: &str, vm: &str, remediation: Value) -> Value {
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

pub fn status(inner: &Inner, name: &str) -> Option<Value> {
    inner.status(NS, name)
}

pub fn events(inner: &Inner, name: &str, reason: &str) -> usize {
    inner
        .list("events", NS)
        .iter()
        .filter(|e| e["reason"] == reason && e["regarding"]["name"] == name)
        .count()
}

pub async fn wait_status(
    api: &RealApiServer,
    name: &str,
    what: &str,
    f: impl Fn(&Value) -> bool,
) -> Value {
    api.wait_for(what, WAIT, |inner| status(inner, name).filter(|s| f(s)))
        .await
}

/// Every `status.diagnosis` the API server stored for `name`, in order.
pub fn stored_diagnoses(inner: &Inner, name: &str) -> Vec<Value> {
    inner
        .log
        .iter()
        .filter(|c| c.resource == "rdphealths" && c.object["metadata"]["name"] == name)
        .map(|c| c.object["status"]["diagnosis"].clone())
        .filter(Value::is_object)
        .collect()
}

pub fn pending_kinds(diagnosis: &Value) -> Vec<String> {
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
pub fn stored_phases(inner: &Inner, name: &str) -> Vec<String> {
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

/// `promtool check metrics` on `text`, when promtool is available (see `common::promtool`).
pub fn promtool_check(text: &str) {
    if let Some(promtool) = common::promtool() {
        common::promtool_check(&promtool, text);
    }
}
