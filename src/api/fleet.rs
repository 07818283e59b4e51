//! The `RdpHealthFleet` API: every Windows VM an Azure Resource Graph selection finds, watched
//! with one policy. Healthy members live in the operator's memory; a member whose failures
//! cross the threshold becomes an `RdpHealth` object (an incident) owned by the fleet.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{
    AddressType, CrdError, DURATION_PATTERN, EvidenceSpec, LONG_DURATION_PATTERN, ProbeSpec,
    RemediationSpec, conditions_schema,
};

/// File name of the generated fleet CRD under `crds/`.
pub const FLEET_CRD_FILE: &str = "rdphealthfleets.rdphealth.io.yaml";
/// Label on an incident object: the name of the fleet that created it.
pub const FLEET_LABEL: &str = "rdphealth.io/fleet";
/// Label on an incident object: the VM's name (hashed when longer than a label value allows).
pub const VM_LABEL: &str = "rdphealth.io/vm";
/// Annotation on an incident object: its fleet's `safety.maxConcurrentDisruptive`, kept in step
/// with the fleet by the fleet's worker. With the fleet label, the fleet's incidents share
/// this cap on disruptive rungs in flight; a value that is not a number holds them all.
pub const MAX_DISRUPTIVE_ANNOTATION: &str = "rdphealth.io/fleet-max-concurrent-disruptive";
/// Annotation on an incident object: the VM's full resource id.
pub const RESOURCE_ID_ANNOTATION: &str = "rdphealth.io/resource-id";
/// Pattern of a subscription GUID.
const GUID_PATTERN: &str =
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$";

/// Fleet condition types and reasons.
pub mod fleet_conditions {
    /// The last discovery succeeded (False: it failed, and the last known membership is kept).
    pub const DISCOVERED: &str = "Discovered";
    /// Discovered=True.
    pub const DISCOVERY_SUCCEEDED: &str = "DiscoverySucceeded";
    /// Discovered=False.
    pub const DISCOVERY_FAILED: &str = "DiscoveryFailed";
    /// Discovered=Unknown: no discovery finished yet.
    pub const DISCOVERY_PENDING: &str = "DiscoveryPending";
    /// The spec passed validation.
    pub const VALID: &str = "Valid";
    /// Valid=True.
    pub const SPEC_VALID: &str = "SpecValid";
    /// Valid=False.
    pub const INVALID_SPEC: &str = "InvalidSpec";
}

/// Watches every Azure VM a Resource Graph selection finds, with one probe and remediation
/// policy. Members cost no Kubernetes object until one becomes unreachable.
// Each `printcolumn(..)` repeats the same keys, which the lint mistakes for duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "rdphealth.io",
    version = "v1alpha1",
    kind = "RdpHealthFleet",
    plural = "rdphealthfleets",
    shortname = "rdphf",
    namespaced,
    status = "RdpHealthFleetStatus",
    derive = "PartialEq",
    doc = "Watches every Azure Windows VM a Resource Graph selection finds, with one policy.",
    printcolumn(name = "Members", type_ = "integer", json_path = ".status.members"),
    printcolumn(name = "Reachable", type_ = "integer", json_path = ".status.reachable"),
    printcolumn(
        name = "Unreachable",
        type_ = "integer",
        json_path = ".status.unreachable"
    ),
    printcolumn(name = "Incidents", type_ = "integer", json_path = ".status.incidents"),
    printcolumn(
        name = "Discovered",
        type_ = "string",
        json_path = r#".status.conditions[?(@.type=="Discovered")].status"#
    ),
    printcolumn(
        name = "Last Discovery",
        type_ = "date",
        json_path = ".status.discovery.time"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct RdpHealthFleetSpec {
    /// Which VMs the fleet watches (an Azure Resource Graph query).
    pub selector: FleetSelector,
    /// The policy every member is watched with; an incident object's spec is this template
    /// with the member's `vm.resourceId`.
    #[serde(default)]
    pub template: MemberTemplate,
    /// Limits for this fleet's members, on top of the operator's fleet-wide limits.
    #[serde(default)]
    pub safety: FleetSafety,
    /// Time between discoveries, e.g. `10m` (at least `1m`): VMs created, retagged or deleted
    /// in Azure join or leave the fleet within one interval.
    #[serde(default = "default_discovery_interval")]
    #[schemars(length(max = 32), regex(pattern = DURATION_PATTERN))]
    #[x_kube(validation = Rule::new("duration(self) >= duration('1m')").message("discoveryInterval must be at least 1m"))]
    pub discovery_interval: String,
    /// How long an incident object stays after its VM is reachable again, e.g. `24h`; then it
    /// is deleted (its Events stay) and the VM is watched in memory again.
    #[serde(default = "default_incident_retention")]
    #[schemars(length(max = 32), regex(pattern = LONG_DURATION_PATTERN))]
    pub incident_retention: String,
    /// Stops discovery and probing while true; existing incident objects keep running.
    #[serde(default)]
    pub suspend: bool,
}

/// The Azure Resource Graph selection. Every field narrows it.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct FleetSelector {
    /// Subscription GUIDs to search (1–100).
    #[schemars(length(min = 1, max = 100), inner(length(max = 36), regex(pattern = GUID_PATTERN)))]
    #[x_kube(validation = Rule::new("self.all(s, self.exists_one(t, t.lowerAscii() == s.lowerAscii()))").message("subscriptions must not repeat"))]
    pub subscriptions: Vec<String>,
    /// Resource groups (case-insensitive). Empty: every group of the subscriptions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 100),
        inner(length(min = 1, max = 90), regex(pattern = r"^[-\w\._\(\)]+$"))
    )]
    pub resource_groups: Vec<String>,
    /// Tags every member carries: key → exact value.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 16))]
    #[x_kube(validation = Rule::new("self.all(k, size(k) >= 1 && size(k) <= 512 && size(self[k]) <= 256)").message("tag keys must be 1-512 characters and values at most 256"))]
    pub tags: BTreeMap<String, String>,
    /// OS type of the VM's OS disk: `Windows` (default), `Linux` or `Any`.
    #[serde(default)]
    pub os_type: OsTypeSelector,
    /// A glob over VM names (`*` any characters, `?` one), case-insensitive, e.g. `jump-*`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 80), regex(pattern = r"^[-\w\.\*\?]+$"))]
    pub name_pattern: Option<String>,
}

impl FleetSelector {
    /// Every Windows VM of `subscriptions`.
    pub fn of_subscriptions(subscriptions: Vec<String>) -> Self {
        Self {
            subscriptions,
            resource_groups: Vec::new(),
            tags: BTreeMap::new(),
            os_type: OsTypeSelector::default(),
            name_pattern: None,
        }
    }
}

/// Which OS type the selection keeps.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OsTypeSelector {
    /// Windows VMs only.
    #[default]
    Windows,
    /// Linux VMs only (xrdp).
    Linux,
    /// Every VM.
    Any,
}

impl OsTypeSelector {
    /// The OS type Resource Graph reports, or `None` for any.
    pub fn as_azure(self) -> Option<&'static str> {
        match self {
            Self::Windows => Some("Windows"),
            Self::Linux => Some("Linux"),
            Self::Any => None,
        }
    }
}

/// The member policy: `RdpHealth`'s settings without the VM and without a host override.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MemberTemplate {
    /// Port and address of the members to probe (addresses come from discovery).
    #[serde(default)]
    pub endpoint: MemberEndpoint,
    /// How and how often to probe each member.
    #[serde(default)]
    pub probe: ProbeSpec,
    /// What the operator may do for an unreachable member (through its incident object).
    #[serde(default)]
    pub remediation: RemediationSpec,
    /// Which evidence the operator may read for an unreachable member.
    #[serde(default)]
    pub evidence: EvidenceSpec,
}

/// Where to probe each member.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct MemberEndpoint {
    /// TCP port of the RDP listener.
    #[serde(default = "super::default_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,
    /// Which of the member's addresses to probe.
    #[serde(default)]
    pub address_type: AddressType,
}

impl Default for MemberEndpoint {
    fn default() -> Self {
        Self {
            port: super::default_port(),
            address_type: AddressType::default(),
        }
    }
}

/// Limits for one fleet, on top of the operator's fleet-wide limits.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct FleetSafety {
    /// Above this percentage of the fleet's members unreachable, new incident objects are
    /// created on hold (`rdphealth.io/pause`): they probe and gather evidence, but no rung
    /// runs until a person removes the hold. Default: the operator's `--max-unreachable-percent`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub max_unreachable_percent: Option<u8>,
    /// Disruptive rungs (restart, redeploy, reset NIC, …) the fleet's incident objects may
    /// have in flight at once, across all its subscriptions, on top of the operator's
    /// `--max-concurrent-disruptive` per subscription (each rung needs a slot in both).
    /// Default: only the operator's limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub max_concurrent_disruptive: Option<u16>,
}

fn default_discovery_interval() -> String {
    "10m".into()
}
fn default_incident_retention() -> String {
    "24h".into()
}

/// What the fleet found, written by server-side apply under `rdphealth-operator`.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RdpHealthFleetStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Valid` and `Discovered`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    /// VMs the last successful discovery found (skipped ones included).
    #[serde(default)]
    pub members: u32,
    /// Members judged reachable.
    #[serde(default)]
    pub reachable: u32,
    /// Members judged unreachable (incidents included).
    #[serde(default)]
    pub unreachable: u32,
    /// Members not judged yet (too few probes, or no address).
    #[serde(default)]
    pub pending: u32,
    /// Members with an incident object open.
    #[serde(default)]
    pub incidents: u32,
    /// Members skipped because a hand-written `RdpHealth` (or another fleet) watches them.
    #[serde(default)]
    pub skipped: u32,
    /// Members whose last probe failed, by failure reason (e.g. `TcpTimeout`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub failures_by_reason: BTreeMap<String, u32>,
    /// The last discovery.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discovery: Option<DiscoveryStatus>,
    /// The members in the worst state (unreachable longest first, then failing), at most 10.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub worst: Vec<MemberSummary>,
    /// Some of the skipped members, with why (at most 10).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub skipped_members: Vec<SkippedMember>,
}

/// One discovery's outcome.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DiscoveryStatus {
    /// When the last discovery finished (successful or not).
    pub time: Time,
    /// When the last successful discovery finished: the membership is from then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_success: Option<Time>,
    /// How long it took, in milliseconds.
    pub duration_ms: u64,
    /// Resource Graph requests it took (pages and retries).
    pub requests: u32,
    /// Resource Graph quota left after it (`x-ms-user-quota-remaining`), when Azure said.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota_remaining: Option<u32>,
    /// Why it failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One member in the `worst` list.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct MemberSummary {
    /// VM name.
    pub vm: String,
    /// Resource group.
    pub resource_group: String,
    /// `Unreachable`, `Incident` or `Failing`.
    pub state: String,
    /// The last failure reason (e.g. `TcpTimeout`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Failed probes in a row.
    pub consecutive_failures: u32,
    /// Since when it is in this state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Time>,
    /// The incident object, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incident: Option<String>,
}

/// A member the fleet does not watch, and who does.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SkippedMember {
    /// VM name.
    pub vm: String,
    /// The object that watches it (`namespace/name`).
    pub watched_by: String,
}

/// The fleet CRD as YAML: exactly what `crds/rdphealthfleets.rdphealth.io.yaml` holds.
pub fn fleet_crd_yaml() -> Result<String, CrdError> {
    serde_saphyr::to_string(&RdpHealthFleet::crd()).map_err(CrdError::Render)
}
