//! Counts every call through the [`Azure`] trait by operation and outcome
//! (`rdphealth_azure_requests_total`, `rdphealth_azure_throttled_total`). One call of the trait
//! may be more than one HTTP request (a VM's address is a VM, a NIC and a public IP read); the
//! counters follow the trait, the operator's unit of work.

use std::sync::Arc;

use prometheus::{IntCounterVec, Opts, core::Collector};

use super::{
    AddressChange, AllowRule, Azure, AzureError, AzureResult, BootDiagnosticsUris, Discovery,
    Endpoint, FlowQuery, Health, IpAvailability, NetworkRules, NicAddress, Operation, Password,
    PollOutcome, ResourceGraph, SnapshotInfo, SnapshotRequest, VmRef, VmSelector, VmState,
    WatcherRef,
};

/// An [`Azure`] that counts the calls of another.
pub struct CountedAzure {
    inner: Arc<dyn Azure>,
    requests: IntCounterVec,
    throttled: IntCounterVec,
}

impl std::fmt::Debug for CountedAzure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CountedAzure").finish_non_exhaustive()
    }
}

/// The `operation` label values, one per trait method.
pub const OPERATIONS: [&str; 21] = [
    "vm_state",
    "endpoint",
    "network_rules",
    "start_ip_flow_verify",
    "resource_health",
    "boot_diagnostics",
    "serial_log",
    "reset_rdp_config",
    "reset_password",
    "run_command",
    "nic_address",
    "ip_availability",
    "set_nic_address",
    "restart",
    "redeploy",
    "start",
    "put_allow_rule",
    "create_os_disk_snapshot",
    "list_snapshots",
    "delete_snapshot",
    "poll",
];

impl CountedAzure {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn Azure>) -> Result<Self, prometheus::Error> {
        let requests = IntCounterVec::new(
            Opts::new(
                "rdphealth_azure_requests_total",
                "Calls the operator made to Azure Resource Manager, by operation and result code (OK or the error's reason).",
            ),
            &["operation", "code"],
        )?;
        let throttled = IntCounterVec::new(
            Opts::new(
                "rdphealth_azure_throttled_total",
                "Azure Resource Manager calls answered with throttling (429/503), by operation.",
            ),
            &["operation"],
        )?;
        for op in OPERATIONS {
            throttled.with_label_values(&[op]);
        }
        Ok(Self {
            inner,
            requests,
            throttled,
        })
    }

    /// Wraps `inner`, counting into the same counters as `self` (another identity's client
    /// adds to the same series).
    pub fn sharing(&self, inner: Arc<dyn Azure>) -> Self {
        Self {
            inner,
            requests: self.requests.clone(),
            throttled: self.throttled.clone(),
        }
    }

    /// The counters, for registration.
    pub fn collectors(&self) -> Vec<Box<dyn Collector>> {
        vec![
            Box::new(self.requests.clone()),
            Box::new(self.throttled.clone()),
        ]
    }

    fn count<T>(&self, operation: &'static str, result: AzureResult<T>) -> AzureResult<T> {
        count_into(&self.requests, &self.throttled, operation, result)
    }

    /// Wraps a Resource Graph discovery, counting each discovery into the same counters under
    /// the operation [`GRAPH_OPERATION`].
    pub fn graph(&self, inner: Arc<dyn ResourceGraph>) -> CountedGraph {
        self.throttled.with_label_values(&[GRAPH_OPERATION]);
        CountedGraph {
            inner,
            requests: self.requests.clone(),
            throttled: self.throttled.clone(),
        }
    }
}

/// The `operation` label of a Resource Graph discovery (all its pages: one call).
pub const GRAPH_OPERATION: &str = "resource_graph";

fn count_into<T>(
    requests: &IntCounterVec,
    throttled: &IntCounterVec,
    operation: &'static str,
    result: AzureResult<T>,
) -> AzureResult<T> {
    let code = match &result {
        Ok(_) => "OK",
        Err(e) => e.reason(),
    };
    requests.with_label_values(&[operation, code]).inc();
    if matches!(result, Err(AzureError::Throttled { .. })) {
        throttled.with_label_values(&[operation]).inc();
    }
    result
}

/// A [`ResourceGraph`] that counts the discoveries of another (built by [`CountedAzure::graph`]).
pub struct CountedGraph {
    inner: Arc<dyn ResourceGraph>,
    requests: IntCounterVec,
    throttled: IntCounterVec,
}

impl std::fmt::Debug for CountedGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CountedGraph").finish_non_exhaustive()
    }
}

#[async_trait::async_trait]
impl ResourceGraph for CountedGraph {
    async fn discover(&self, selector: &VmSelector) -> AzureResult<Discovery> {
        let result = self.inner.discover(selector).await;
        count_into(&self.requests, &self.throttled, GRAPH_OPERATION, result)
    }
}

#[async_trait::async_trait]
impl Azure for CountedAzure {
    async fn vm_state(&self, vm: &VmRef) -> AzureResult<VmState> {
        self.count("vm_state", self.inner.vm_state(vm).await)
    }

    async fn endpoint(&self, vm: &VmRef) -> AzureResult<Endpoint> {
        self.count("endpoint", self.inner.endpoint(vm).await)
    }

    async fn network_rules(&self, vm: &VmRef) -> AzureResult<NetworkRules> {
        self.count("network_rules", self.inner.network_rules(vm).await)
    }

    async fn start_ip_flow_verify(
        &self,
        vm: &VmRef,
        watcher: &WatcherRef,
        query: &FlowQuery,
    ) -> AzureResult<Option<Operation>> {
        self.count(
            "start_ip_flow_verify",
            self.inner.start_ip_flow_verify(vm, watcher, query).await,
        )
    }

    async fn resource_health(&self, vm: &VmRef) -> AzureResult<Health> {
        self.count("resource_health", self.inner.resource_health(vm).await)
    }

    async fn boot_diagnostics(&self, vm: &VmRef) -> AzureResult<BootDiagnosticsUris> {
        self.count("boot_diagnostics", self.inner.boot_diagnostics(vm).await)
    }

    async fn serial_log(&self, uris: &BootDiagnosticsUris) -> AzureResult<String> {
        self.count("serial_log", self.inner.serial_log(uris).await)
    }

    async fn reset_rdp_config(&self, vm: &VmRef) -> AzureResult<Operation> {
        self.count("reset_rdp_config", self.inner.reset_rdp_config(vm).await)
    }

    async fn reset_password(
        &self,
        vm: &VmRef,
        user: &str,
        password: &Password,
    ) -> AzureResult<Operation> {
        self.count(
            "reset_password",
            self.inner.reset_password(vm, user, password).await,
        )
    }

    async fn run_command(&self, vm: &VmRef, script: &[String]) -> AzureResult<Operation> {
        self.count("run_command", self.inner.run_command(vm, script).await)
    }

    async fn nic_address(&self, vm: &VmRef) -> AzureResult<NicAddress> {
        self.count("nic_address", self.inner.nic_address(vm).await)
    }

    async fn ip_availability(&self, subnet_id: &str, ip: &str) -> AzureResult<IpAvailability> {
        self.count(
            "ip_availability",
            self.inner.ip_availability(subnet_id, ip).await,
        )
    }

    async fn set_nic_address(&self, vm: &VmRef, change: &AddressChange) -> AzureResult<Operation> {
        self.count(
            "set_nic_address",
            self.inner.set_nic_address(vm, change).await,
        )
    }

    async fn restart(&self, vm: &VmRef) -> AzureResult<Operation> {
        self.count("restart", self.inner.restart(vm).await)
    }

    async fn redeploy(&self, vm: &VmRef) -> AzureResult<Operation> {
        self.count("redeploy", self.inner.redeploy(vm).await)
    }

    async fn start(&self, vm: &VmRef) -> AzureResult<Operation> {
        self.count("start", self.inner.start(vm).await)
    }

    async fn put_allow_rule(&self, vm: &VmRef, rule: &AllowRule) -> AzureResult<Operation> {
        self.count("put_allow_rule", self.inner.put_allow_rule(vm, rule).await)
    }

    async fn create_os_disk_snapshot(
        &self,
        vm: &VmRef,
        request: &SnapshotRequest,
    ) -> AzureResult<Operation> {
        self.count(
            "create_os_disk_snapshot",
            self.inner.create_os_disk_snapshot(vm, request).await,
        )
    }

    async fn list_snapshots(&self, vm: &VmRef) -> AzureResult<Vec<SnapshotInfo>> {
        self.count("list_snapshots", self.inner.list_snapshots(vm).await)
    }

    async fn delete_snapshot(&self, vm: &VmRef, name: &str) -> AzureResult<()> {
        self.count(
            "delete_snapshot",
            self.inner.delete_snapshot(vm, name).await,
        )
    }

    async fn poll(&self, op: &Operation) -> AzureResult<PollOutcome> {
        self.count("poll", self.inner.poll(op).await)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;
    use crate::azure::{ArmClient, ArmConfig, StaticToken};

    /// Fails with `Throttled` on every other call.
    struct Alternating(AtomicU32);

    #[async_trait::async_trait]
    impl ResourceGraph for Alternating {
        async fn discover(&self, _: &VmSelector) -> AzureResult<Discovery> {
            if self.0.fetch_add(1, Ordering::SeqCst).is_multiple_of(2) {
                Ok(Discovery::default())
            } else {
                Err(AzureError::Throttled {
                    status: 429,
                    retry_after: None,
                    remaining: Default::default(),
                })
            }
        }
    }

    #[tokio::test]
    async fn discoveries_are_counted_as_their_own_operation() {
        let url = azure_core::Url::parse("http://127.0.0.1:9").unwrap();
        let arm = ArmClient::new(ArmConfig::new(url), Arc::new(StaticToken::new("t")));
        let counted = CountedAzure::new(Arc::new(arm)).unwrap();
        let graph = counted.graph(Arc::new(Alternating(AtomicU32::new(0))));
        for _ in 0..3 {
            let _ = graph.discover(&VmSelector::default()).await;
        }
        let get = |code: &str| {
            counted
                .requests
                .with_label_values(&[GRAPH_OPERATION, code])
                .get()
        };
        assert_eq!((get("OK"), get("Throttled")), (2, 1));
        assert_eq!(
            counted
                .throttled
                .with_label_values(&[GRAPH_OPERATION])
                .get(),
            1
        );
    }
}
