//! The operator's view of Azure resources: small owned types, independent of the SDK models.

use std::{net::Ipv4Addr, time::Duration};

use serde::{Deserialize, Serialize};

/// One virtual machine.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmRef {
    /// Subscription id.
    pub subscription: String,
    /// Resource group.
    pub resource_group: String,
    /// VM name.
    pub name: String,
}

impl VmRef {
    /// A reference from its three parts.
    pub fn new(
        subscription: impl Into<String>,
        resource_group: impl Into<String>,
        name: impl Into<String>,
    ) -> Self {
        Self {
            subscription: subscription.into(),
            resource_group: resource_group.into(),
            name: name.into(),
        }
    }

    /// The ARM resource id.
    pub fn id(&self) -> String {
        format!(
            "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Compute/virtualMachines/{}",
            self.subscription, self.resource_group, self.name
        )
    }
}

impl std::fmt::Display for VmRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}/{}/{}",
            self.subscription, self.resource_group, self.name
        )
    }
}

/// `PowerState/*` of the instance view.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum PowerState {
    /// Starting.
    Starting,
    /// Running (also during a reboot).
    Running,
    /// Stopping.
    Stopping,
    /// Stopped, still allocated.
    Stopped,
    /// Deallocating.
    Deallocating,
    /// Deallocated.
    Deallocated,
    /// Absent or unrecognised.
    Unknown,
}

impl PowerState {
    /// From a status code such as `PowerState/running`.
    pub fn from_code(code: &str) -> Option<Self> {
        let state = code.strip_prefix("PowerState/")?;
        Some(match state {
            "starting" => Self::Starting,
            "running" => Self::Running,
            "stopping" => Self::Stopping,
            "stopped" => Self::Stopped,
            "deallocating" => Self::Deallocating,
            "deallocated" => Self::Deallocated,
            _ => Self::Unknown,
        })
    }

    /// Whether the VM is, or is about to be, not running.
    pub fn is_down(self) -> bool {
        matches!(
            self,
            Self::Stopped | Self::Stopping | Self::Deallocated | Self::Deallocating
        )
    }
}

/// One instance-view status of an extension.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExtensionStatus {
    /// Extension name.
    pub name: String,
    /// Handler type, e.g. `Microsoft.Compute.VMAccessAgent`.
    pub kind: Option<String>,
    /// First status code, e.g. `ProvisioningState/succeeded`.
    pub code: Option<String>,
    /// Its message.
    pub message: Option<String>,
}

/// VM model and runtime facts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmState {
    /// ARM resource id.
    pub id: String,
    /// Region.
    pub location: String,
    /// Power state from the instance view.
    pub power_state: PowerState,
    /// `properties.provisioningState` (e.g. `Succeeded`, `Updating`).
    pub provisioning_state: Option<String>,
    /// Whether the VM agent reports Ready.
    pub agent_ready: bool,
    /// The agent's display status and message, verbatim.
    pub agent_status: Option<String>,
    /// Extensions in the instance view.
    pub extensions: Vec<ExtensionStatus>,
    /// The name of the existing VMAccessAgent extension, reused by VMAccess rungs.
    pub vm_access_extension: Option<String>,
    /// Boot diagnostics enabled.
    pub boot_diagnostics: bool,
    /// NIC resource ids, primary first.
    pub nic_ids: Vec<String>,
    /// The guest's computer name (`osProfile.computerName`).
    pub computer_name: Option<String>,
    /// The OS disk's managed disk id (`storageProfile.osDisk.managedDisk.id`); absent for an
    /// unmanaged (VHD) disk, which cannot be snapshotted as a resource.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os_disk_id: Option<String>,
}

/// Where the VM's RDP endpoint is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    /// Primary NIC id.
    pub nic_id: String,
    /// Primary private IP.
    pub private_ip: Option<String>,
    /// Public IP resource id.
    pub public_ip_id: Option<String>,
    /// Public IP address.
    pub public_ip: Option<String>,
    /// The public IP's SKU (`Standard`, `Basic`); Standard is closed to inbound traffic
    /// unless an NSG allows it.
    #[serde(default)]
    pub public_ip_sku: Option<String>,
    /// Subnet id.
    pub subnet_id: Option<String>,
    /// NIC-level NSG id.
    pub nic_nsg_id: Option<String>,
    /// The guest's computer name (`osProfile.computerName`), read with the address: what
    /// the endpoint must answer as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub computer_name: Option<String>,
}

/// Protocol of a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RuleProtocol {
    /// Any (`*`).
    Any,
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// Something else (ICMP, ESP, AH).
    Other,
}

impl RuleProtocol {
    /// From ARM's spelling.
    pub fn parse(s: &str) -> Self {
        match s.to_ascii_lowercase().as_str() {
            "*" | "any" | "all" => Self::Any,
            "tcp" => Self::Tcp,
            "udp" => Self::Udp,
            _ => Self::Other,
        }
    }
}

/// A security rule (custom or default).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SecurityRule {
    /// Rule name.
    pub name: String,
    /// Priority (lower wins).
    pub priority: i32,
    /// Inbound or not.
    pub inbound: bool,
    /// Allow or deny.
    pub allow: bool,
    /// Protocol.
    pub protocol: RuleProtocol,
    /// Source prefixes (`*`, CIDR, IP or service tag).
    pub source_prefixes: Vec<String>,
    /// Destination prefixes.
    pub destination_prefixes: Vec<String>,
    /// Destination port ranges (`*`, `3389`, `3000-4000`).
    pub destination_ports: Vec<String>,
    /// Whether it is one of Azure's default rules.
    pub default_rule: bool,
}

/// An NSG and its rules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NsgRules {
    /// NSG id.
    pub id: String,
    /// Custom then default rules.
    pub rules: Vec<SecurityRule>,
}

/// The NSGs that apply to the VM's primary NIC.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkRules {
    /// The endpoint they were read for.
    pub endpoint: Endpoint,
    /// The subnet's NSG (evaluated first inbound).
    pub subnet_nsg: Option<NsgRules>,
    /// The NIC's NSG.
    pub nic_nsg: Option<NsgRules>,
}

/// Resource Health availability.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Health {
    /// `Available`, `Unavailable`, `Degraded` or `Unknown`.
    pub availability_state: String,
    /// E.g. `Unplanned`, `Planned`, `UserInitiated`.
    pub reason_type: Option<String>,
    /// Human summary.
    pub summary: Option<String>,
    /// `Planned`/`Unplanned` for platform events, else `Not Applicable`.
    pub category: Option<String>,
    /// Who started it: `Platform Initiated`, `Customer Initiated`, `VM Initiated`.
    #[serde(default)]
    pub context: Option<String>,
}

impl Health {
    /// Whether Azure reports the VM as available.
    pub fn is_available(&self) -> bool {
        self.availability_state == "Available"
    }
}

/// Boot diagnostics SAS URIs.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BootDiagnosticsUris {
    /// Screenshot blob.
    pub screenshot: Option<String>,
    /// Serial console log blob.
    pub serial_log: Option<String>,
}

impl std::fmt::Debug for BootDiagnosticsUris {
    // SAS URIs are bearer secrets: never print the query string.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let strip = |u: &Option<String>| {
            u.as_ref()
                .map(|s| s.split('?').next().unwrap_or("").to_owned())
        };
        f.debug_struct("BootDiagnosticsUris")
            .field("screenshot", &strip(&self.screenshot))
            .field("serial_log", &strip(&self.serial_log))
            .finish()
    }
}

/// The parameters of an IP flow verify query (inbound TCP to the VM's private IP).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FlowQuery {
    /// The client's address.
    pub remote_ip: Ipv4Addr,
    /// The client's port.
    pub remote_port: u16,
    /// The VM's private address.
    pub local_ip: Ipv4Addr,
    /// The RDP port.
    pub local_port: u16,
}

/// A Network Watcher.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WatcherRef {
    /// Resource group (usually `NetworkWatcherRG`).
    pub resource_group: String,
    /// Name (usually `NetworkWatcher_<region>`).
    pub name: String,
}

impl WatcherRef {
    /// Azure's default watcher for `location`.
    pub fn default_for(location: &str) -> Self {
        Self {
            resource_group: "NetworkWatcherRG".to_owned(),
            name: format!("NetworkWatcher_{location}"),
        }
    }
}

/// An inbound TCP allow rule to create (or update) in one NSG.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AllowRule {
    /// The NSG's resource id.
    pub nsg_id: String,
    /// Rule name (at most 80 characters).
    pub name: String,
    /// Priority, 100–4096.
    pub priority: i32,
    /// Source CIDRs or addresses; never `*` or a service tag.
    pub source_prefixes: Vec<String>,
    /// Destination address (the VM's private address).
    pub destination_prefix: String,
    /// Destination port.
    pub port: u16,
    /// Shown in the portal next to the rule.
    pub description: String,
}

/// What a long-running operation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum OperationKind {
    /// VMAccess reset of the RDP configuration.
    ResetRdpConfig,
    /// VMAccess reset of a password.
    ResetPassword,
    /// Run Command.
    RunCommand,
    /// NIC private-IP change.
    ResetNic,
    /// Restart.
    Restart,
    /// Redeploy.
    Redeploy,
    /// Start a stopped VM.
    Start,
    /// Network Watcher IP flow verify.
    IpFlowVerify,
    /// Creation or update of an NSG security rule.
    PutNsgRule,
    /// An incremental snapshot of a managed disk.
    Snapshot,
}

impl OperationKind {
    /// Stable name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ResetRdpConfig => "reset_rdp_config",
            Self::ResetPassword => "reset_password",
            Self::RunCommand => "run_command",
            Self::ResetNic => "reset_nic",
            Self::Restart => "restart",
            Self::Redeploy => "redeploy",
            Self::Start => "start",
            Self::IpFlowVerify => "ip_flow_verify",
            Self::PutNsgRule => "put_nsg_rule",
            Self::Snapshot => "snapshot",
        }
    }
}

/// A started Azure operation, stored (e.g. in the object's status) and polled later.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Operation {
    /// What it does.
    pub kind: OperationKind,
    /// The VM it acts on.
    pub vm: VmRef,
    /// `Azure-AsyncOperation` URL.
    pub async_operation: Option<String>,
    /// `Location` URL (results of actions come from here).
    pub location: Option<String>,
    /// When it was started (RFC 3339).
    pub started_at: String,
    /// Kind-specific note (e.g. the NIC's previous and new private IP).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Set when Azure finished it synchronously (200 with no URL to poll).
    #[serde(default)]
    pub completed: bool,
}

/// Run Command output.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RunCommandOutput {
    /// Standard output (last 4 KiB).
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

/// The verdict of IP flow verify.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FlowVerdict {
    /// Allowed.
    pub allow: bool,
    /// The deciding rule (e.g. `securityRules/allow-rdp`).
    pub rule_name: Option<String>,
}

/// The result of a finished operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum OperationResult {
    /// Nothing to read (restart, redeploy, VMAccess, NIC).
    Done,
    /// Run Command streams.
    RunCommand(RunCommandOutput),
    /// IP flow verify.
    Flow(FlowVerdict),
}

/// Where a polled operation stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PollOutcome {
    /// Still running: look again after `retry_after`.
    Pending {
        /// The server's suggested delay (30 s when it gave none).
        retry_after: Duration,
    },
    /// Finished.
    Succeeded {
        /// What it produced.
        result: OperationResult,
    },
    /// Failed or canceled.
    Failed {
        /// ARM error code.
        code: String,
        /// ARM message.
        message: String,
    },
}

/// A password on its way to VMAccess: never printed, never serialized.
#[derive(Clone)]
pub struct Password(String);

impl Password {
    /// Wraps a password.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The clear text, for the request body only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

/// An OS-disk snapshot to create: an incremental copy (`createOption: Copy`) of the VM's OS
/// disk, in the VM's resource group and region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotRequest {
    /// The snapshot's name (1-80 of `a-z A-Z 0-9 _ -`).
    pub name: String,
    /// Tags that mark it as the operator's (tag names may not contain `/`).
    pub tags: std::collections::BTreeMap<String, String>,
}

/// A snapshot as listed in a resource group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// ARM id.
    pub id: String,
    /// Name.
    pub name: String,
    /// `properties.timeCreated` (RFC 3339), when Azure reports it.
    pub time_created: Option<String>,
    /// `properties.provisioningState`.
    pub provisioning_state: Option<String>,
    /// `properties.creationData.sourceResourceId`.
    pub source_resource_id: Option<String>,
    /// Its tags.
    pub tags: std::collections::BTreeMap<String, String>,
}
