//! Azure Resource Graph: the fleet's discovery of VMs (one paged query per fleet per discovery
//! interval, with each VM's primary NIC addresses joined in the query).
//!
//! The types here are what the fleet runner depends on; [`ResourceGraph`] is implemented by the
//! ARM client (through the same pipeline, credential scope and limiter as every ARM call; see
//! `graph_client`, with the query built in `graph_query`), by `CountedGraph` (from
//! `CountedAzure::graph`) and by test doubles.

use std::{collections::BTreeMap, net::IpAddr, time::Duration};

use super::{AzureResult, VmRef};

/// Which VMs a fleet watches. Every field narrows the selection.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VmSelector {
    /// Subscription GUIDs (at least one).
    pub subscriptions: Vec<String>,
    /// Resource group names (case-insensitive); empty: every group.
    pub resource_groups: Vec<String>,
    /// Tags the VM must carry, key → exact value (keys case-insensitive, values exact).
    pub tags: BTreeMap<String, String>,
    /// OS type of the OS disk (`Windows` by default); `None`: any.
    pub os_type: Option<String>,
    /// A glob over the VM name (`*` any run, `?` one character), case-insensitive.
    pub name_pattern: Option<String>,
}

/// One VM as discovery found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiscoveredVm {
    /// The VM (subscription, resource group, name as Azure spells them).
    pub vm: VmRef,
    /// Region.
    pub location: String,
    /// Tags.
    pub tags: BTreeMap<String, String>,
    /// Power state code (`PowerState/running`) when Resource Graph has it.
    pub power_state: Option<String>,
    /// The guest's computer name (`osProfile.computerName`): whom the endpoint must answer as.
    pub computer_name: Option<String>,
    /// The primary NIC's primary private address.
    pub private_ip: Option<IpAddr>,
    /// The public address attached to that IP configuration.
    pub public_ip: Option<IpAddr>,
}

/// The result of one complete discovery (every page).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Discovery {
    /// The VMs, ordered by resource id.
    pub vms: Vec<DiscoveredVm>,
    /// Resource Graph requests it took (pages, retries included).
    pub requests: u32,
    /// The quota left after the last page (`x-ms-user-quota-remaining`), when sent.
    pub quota_remaining: Option<u32>,
    /// When the quota window resets after the last page (`x-ms-user-quota-resets-after`).
    pub quota_resets_after: Option<Duration>,
}

/// Discovery of VMs through Azure Resource Graph.
#[async_trait::async_trait]
pub trait ResourceGraph: Send + Sync {
    /// Every VM `selector` matches, paging with `$skipToken` and honouring the quota headers.
    /// An error means the membership is unknown (callers keep the last one they had).
    async fn discover(&self, selector: &VmSelector) -> AzureResult<Discovery>;
}
