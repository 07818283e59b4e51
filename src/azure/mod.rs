//! Azure Resource Manager: the [`Azure`] trait the engine depends on, its SDK implementation
//! ([`ArmClient`]), the credentials, the limiter and the pipeline policies.
//!
//! Nothing here blocks on a long-running operation: mutating calls return an [`Operation`]
//! handle that the caller stores and hands back to [`Azure::poll`] on a later reconcile.

mod arm_map;
pub mod cache;
pub mod client;
pub mod counted;
pub mod credential;
pub mod error;
pub mod graph;
pub mod graph_client;
pub mod graph_query;
pub mod identities;
pub mod limiter;
pub mod model;
mod nic;
pub mod nsg;
pub mod policy;
mod snapshots;

pub use self::{
    client::{ArmClient, ArmConfig},
    counted::{CountedAzure, CountedGraph},
    credential::{ARM_SCOPE, StaticToken, WorkloadIdentity},
    error::{AzureError, RateLimitRemaining},
    graph::{DiscoveredVm, Discovery, ResourceGraph, VmSelector},
    graph_client::GraphOptions,
    identities::{AzureIdentity, Federation},
    limiter::{Limiter, LimiterConfig},
    model::*,
    nic::{AddressChange, IpAvailability, NicAddress},
};

/// The result of an Azure call.
pub type AzureResult<T> = Result<T, AzureError>;

/// Everything the operator asks of Azure. Object-safe, so tests and the demo can swap it.
#[async_trait::async_trait]
pub trait Azure: Send + Sync {
    /// The VM with its instance view (power state, provisioning state, agent, extensions).
    async fn vm_state(&self, vm: &VmRef) -> AzureResult<VmState>;

    /// VM → primary NIC → private IP, public IP and subnet.
    async fn endpoint(&self, vm: &VmRef) -> AzureResult<Endpoint>;

    /// The NSGs of the primary NIC and of its subnet, with custom and default rules.
    async fn network_rules(&self, vm: &VmRef) -> AzureResult<NetworkRules>;

    /// Starts IP flow verify; `None` when the region has no such Network Watcher.
    async fn start_ip_flow_verify(
        &self,
        vm: &VmRef,
        watcher: &WatcherRef,
        query: &FlowQuery,
    ) -> AzureResult<Option<Operation>>;

    /// Resource Health's current availability status.
    async fn resource_health(&self, vm: &VmRef) -> AzureResult<Health>;

    /// SAS URIs of the boot diagnostics blobs.
    async fn boot_diagnostics(&self, vm: &VmRef) -> AzureResult<BootDiagnosticsUris>;

    /// Downloads the serial log text (its tail, when large).
    async fn serial_log(&self, uris: &BootDiagnosticsUris) -> AzureResult<String>;

    /// VMAccess "reset configuration only" (re-enables RDP and its firewall rule).
    async fn reset_rdp_config(&self, vm: &VmRef) -> AzureResult<Operation>;

    /// VMAccess password reset of `user` (Windows shape).
    async fn reset_password(
        &self,
        vm: &VmRef,
        user: &str,
        password: &Password,
    ) -> AzureResult<Operation>;

    /// Run Command with a PowerShell script (one line per element).
    async fn run_command(&self, vm: &VmRef, script: &[String]) -> AzureResult<Operation>;

    /// The primary NIC's primary IP configuration: address, allocation, subnet.
    async fn nic_address(&self, vm: &VmRef) -> AzureResult<NicAddress>;

    /// `checkIPAddressAvailability` of `ip` in the subnet's virtual network.
    async fn ip_availability(&self, subnet_id: &str, ip: &str) -> AzureResult<IpAvailability>;

    /// Moves the primary NIC's address from `change.from_ip` to `change.to_ip` (static; Azure
    /// re-initialises the NIC and the VM restarts). Refused, without a PUT, when the NIC is
    /// not on `from_ip`.
    async fn set_nic_address(&self, vm: &VmRef, change: &AddressChange) -> AzureResult<Operation>;

    /// Restarts the VM.
    async fn restart(&self, vm: &VmRef) -> AzureResult<Operation>;

    /// Redeploys the VM to another host.
    async fn redeploy(&self, vm: &VmRef) -> AzureResult<Operation>;

    /// Creates or updates an inbound allow rule in an NSG.
    async fn put_allow_rule(&self, vm: &VmRef, rule: &AllowRule) -> AzureResult<Operation>;

    /// Starts a stopped or deallocated VM.
    async fn start(&self, vm: &VmRef) -> AzureResult<Operation>;

    /// Starts an incremental snapshot of the VM's OS disk (`createOption: Copy` of
    /// `storageProfile.osDisk.managedDisk.id`) in the VM's resource group and region.
    async fn create_os_disk_snapshot(
        &self,
        vm: &VmRef,
        request: &SnapshotRequest,
    ) -> AzureResult<Operation>;

    /// The snapshots of the VM's resource group (every one, whoever made it).
    async fn list_snapshots(&self, vm: &VmRef) -> AzureResult<Vec<SnapshotInfo>>;

    /// Deletes a snapshot of the VM's resource group; Azure carries it out on its own (the
    /// operation is not followed: a delete is idempotent, and a later listing shows it).
    async fn delete_snapshot(&self, vm: &VmRef, name: &str) -> AzureResult<()>;

    /// Polls an operation once.
    async fn poll(&self, op: &Operation) -> AzureResult<PollOutcome>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_trait_is_object_safe() {
        fn takes(_: Option<&dyn Azure>) {}
        takes(None);
    }

    #[test]
    fn secrets_are_redacted_in_debug() {
        assert!(!format!("{:?}", Password::new("hunter2")).contains("hunter2"));
        assert!(!format!("{:?}", StaticToken::new("tok-123")).contains("tok-123"));
    }
}
