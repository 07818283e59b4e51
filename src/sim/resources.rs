//! The simulated resources: subscriptions, VMs, NICs, NSGs, networks, public IPs, operations
//! in flight, scripted HTTP faults and the token log. Plain data; the world holds them.

use std::{collections::BTreeSet, net::Ipv4Addr};

use serde_json::Value;

use super::fault::Fault;
use crate::azure::{
    limiter::TokenBucket,
    model::{NsgRules, SecurityRule},
    nsg,
};

#[derive(Debug)]
pub struct Subscription {
    /// Id as declared.
    pub id: String,
    /// Regions with a Network Watcher (lower case).
    pub watchers: Vec<String>,
    /// Read bucket.
    pub reads: TokenBucket,
    /// Write bucket.
    pub writes: TokenBucket,
}

/// A VMAccess extension.
#[derive(Debug, Clone)]
pub struct Extension {
    /// Name.
    pub name: String,
    /// Last `forceUpdateTag`.
    pub force_update_tag: Option<String>,
    /// `Creating`, `Updating`, `Succeeded`, `Failed`.
    pub provisioning_state: String,
    /// Public settings as sent.
    pub settings: Value,
    /// The agent's last message.
    pub message: String,
    /// An update is running.
    pub busy: bool,
}

/// A VM.
#[derive(Debug, Clone)]
pub struct Vm {
    /// Subscription id.
    pub sub: String,
    /// Resource group.
    pub rg: String,
    /// Name.
    pub name: String,
    /// Region.
    pub location: String,
    /// VM id (GUID-like).
    pub vm_id: String,
    /// Its NIC's key.
    pub nic: String,
    /// Whether the agent is configured to report Ready.
    pub agent_configured: bool,
    /// Boot diagnostics enabled.
    pub boot_diagnostics: bool,
    /// Local administrator.
    pub admin_user: String,
    /// Current faults.
    pub faults: BTreeSet<Fault>,
    /// The guest's registry (the keys the RDP guides read and change).
    pub registry: crate::sim::registry::Registry,
    /// The VMAccessAgent extension, once one exists.
    pub extension: Option<Extension>,
    /// A compute operation (restart, redeploy, start, extension) is running.
    pub busy: bool,
    /// The running power operation (restart, redeploy, start), which a newer one preempts.
    pub power_op: Option<String>,
    /// A Run Command is running.
    pub run_command_busy: bool,
    /// Rebooting: connections are refused.
    pub rebooting: bool,
    /// Incremented on every reboot; open connections of an older boot are dropped.
    pub boot: u64,
    /// An applied repair declared `restart=required`: its registry changes take effect at the
    /// next boot (SCHANNEL and the listener read them then), so until then the faults stay
    /// and are not written back into the registry.
    pub restart_pending: bool,
    /// Thumbprints of the certificates in `LocalMachine\My` (custom RDP certificates).
    pub certificates: BTreeSet<String>,
    /// The responder's loopback port.
    pub port: u16,
    /// Connections accepted (drives flapping).
    pub connections: u64,
    /// Password resets applied (the passwords themselves are never kept).
    pub password_resets: u32,
    /// SHA-256 (hex) of the password set by the last successful reset.
    pub password_sha256: Option<String>,
    /// Secret part of the serial log blob URL.
    pub blob_sig: String,
    /// The computer name of another machine answering on this VM's address, if any.
    pub answers_as: Option<String>,
    /// Tags.
    pub tags: std::collections::BTreeMap<String, String>,
    /// OS type of the OS disk (`Windows`, `Linux`).
    pub os_type: String,
}

impl Vm {
    /// ARM id.
    pub fn id(&self) -> String {
        format!(
            "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Compute/virtualMachines/{}",
            self.sub, self.rg, self.name
        )
    }

    /// Running (not deallocated).
    pub fn running(&self) -> bool {
        !self.faults.contains(&Fault::VmStopped)
    }

    /// Whether the VM agent reports Ready now.
    pub fn agent_ready(&self) -> bool {
        self.agent_configured
            && self.running()
            && !self.rebooting
            && !self.faults.contains(&Fault::HostFailure)
            && !self.faults.contains(&Fault::NicBroken)
    }
}

/// A NIC.
#[derive(Debug, Clone)]
pub struct Nic {
    /// Subscription.
    pub sub: String,
    /// Resource group.
    pub rg: String,
    /// Name.
    pub name: String,
    /// Region.
    pub location: String,
    /// Owning VM name.
    pub vm: String,
    /// Private IP.
    pub private_ip: Ipv4Addr,
    /// Static allocation.
    pub static_ip: bool,
    /// Key of its virtual network.
    pub vnet: String,
    /// Subnet name.
    pub subnet: String,
    /// NIC-level NSG key.
    pub nsg: Option<String>,
    /// Public IP key.
    pub pip: Option<String>,
    /// An update is running.
    pub busy: bool,
    /// MAC address (changes on reset).
    pub mac: String,
}

impl Nic {
    /// ARM id.
    pub fn id(&self) -> String {
        format!(
            "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Network/networkInterfaces/{}",
            self.sub, self.rg, self.name
        )
    }
}

/// An NSG.
#[derive(Debug, Clone)]
pub struct Nsg {
    /// Subscription.
    pub sub: String,
    /// Resource group.
    pub rg: String,
    /// Name.
    pub name: String,
    /// Region.
    pub location: String,
    /// Custom rules.
    pub rules: Vec<SecurityRule>,
    /// A rule change is running.
    pub busy: bool,
}

impl Nsg {
    /// ARM id.
    pub fn id(&self) -> String {
        format!(
            "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Network/networkSecurityGroups/{}",
            self.sub, self.rg, self.name
        )
    }

    /// Custom rules then defaults, for evaluation.
    pub fn all_rules(&self) -> NsgRules {
        let mut rules = self.rules.clone();
        rules.extend(nsg::default_rules());
        NsgRules {
            id: self.id(),
            rules,
        }
    }
}

/// A subnet.
#[derive(Debug, Clone)]
pub struct Subnet {
    /// Name.
    pub name: String,
    /// Network address and prefix length.
    pub prefix: (Ipv4Addr, u32),
    /// NSG key.
    pub nsg: Option<String>,
}

/// A virtual network.
#[derive(Debug, Clone)]
pub struct Vnet {
    /// Subscription.
    pub sub: String,
    /// Resource group.
    pub rg: String,
    /// Name.
    pub name: String,
    /// Region.
    pub location: String,
    /// Address space.
    pub prefix: String,
    /// Subnets.
    pub subnets: Vec<Subnet>,
}

impl Vnet {
    /// ARM id.
    pub fn id(&self) -> String {
        format!(
            "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Network/virtualNetworks/{}",
            self.sub, self.rg, self.name
        )
    }
}

/// A public IP.
#[derive(Debug, Clone)]
pub struct PublicIp {
    /// Subscription.
    pub sub: String,
    /// Resource group.
    pub rg: String,
    /// Name.
    pub name: String,
    /// Region.
    pub location: String,
    /// Address (documentation ranges; redeploy changes it).
    pub address: Ipv4Addr,
}

/// Status of an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpStatus {
    /// Running.
    InProgress,
    /// Done.
    Succeeded,
    /// Failed.
    Failed,
    /// Preempted by a newer operation on the same resource (`OperationPreempted`).
    Canceled,
}

/// A long-running operation.
#[derive(Debug, Clone)]
pub struct Op {
    /// Its id.
    pub id: String,
    /// `Microsoft.Compute` or `Microsoft.Network`.
    pub provider: &'static str,
    /// Subscription.
    pub sub: String,
    /// Region.
    pub location: String,
    /// Status.
    pub status: OpStatus,
    /// Error code and message when failed.
    pub error: Option<(String, String)>,
    /// Result body served from the Location URL.
    pub result: Option<Value>,
    /// Start time (RFC 3339).
    pub started: String,
    /// The `Retry-After` its responses suggest.
    pub retry_after: std::time::Duration,
}

/// A scripted HTTP failure for the next matching requests.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpFault {
    /// Operation name as counted (e.g. `vm.restart`).
    pub operation: String,
    /// Status to answer (429, 500, 503, 409…).
    pub status: u16,
    /// `Retry-After` seconds to send.
    #[serde(default)]
    pub retry_after: Option<u64>,
    /// The ARM error code (`RetryableErrorDueToAnotherOperation`, `OperationNotAllowed`…);
    /// by default one that fits the status.
    #[serde(default)]
    pub code: Option<String>,
    /// How many requests it applies to.
    #[serde(default = "one")]
    pub count: u32,
}

fn one() -> u32 {
    1
}

/// What the token endpoint saw (fingerprints only; assertions are secrets).
#[derive(Debug, Clone, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenLog {
    /// Exchanges answered.
    pub count: u64,
    /// A short SHA-256 fingerprint of each client assertion or secret, in order.
    pub credential_fingerprints: Vec<String>,
    /// Each issued access token: when it expires and for which client ID.
    #[serde(skip)]
    pub issued: std::collections::HashMap<String, Issued>,
    /// Requests refused because their token had expired.
    pub expired_rejections: u64,
    /// ARM requests that carried a bearer token, by the client ID the token was issued to
    /// (`unissued` for a token this emulator did not issue, such as a fixed test token), then
    /// by subscription (lower case; empty for a path without one).
    pub arm_requests_by_client:
        std::collections::BTreeMap<String, std::collections::BTreeMap<String, u64>>,
}

/// An access token the emulator issued.
#[derive(Debug, Clone)]
pub struct Issued {
    /// Expiry (Unix seconds).
    pub exp: u64,
    /// The client ID it was issued to.
    pub client_id: String,
}

/// The key of [`TokenLog::arm_requests_by_client`] for tokens the emulator did not issue.
pub const UNISSUED: &str = "unissued";

impl TokenLog {
    /// Counts one ARM request made with `bearer` for `subscription`.
    pub fn count_request(&mut self, bearer: &str, subscription: &str) {
        let client = self
            .issued
            .get(bearer)
            .map_or(UNISSUED, |i| i.client_id.as_str())
            .to_string();
        *self
            .arm_requests_by_client
            .entry(client)
            .or_default()
            .entry(subscription.to_ascii_lowercase())
            .or_default() += 1;
    }

    /// ARM requests made as `client_id` (any subscription).
    pub fn requests_as(&self, client_id: &str) -> u64 {
        self.arm_requests_by_client
            .get(client_id)
            .map_or(0, |by_sub| by_sub.values().sum())
    }
}
