//! The scenario file: subscriptions, resource groups, NSGs, virtual networks, VMs with their
//! NICs, and initial faults. Parsed strictly (unknown fields are errors) and validated
//! before the simulator starts.

use std::{
    collections::{BTreeMap, HashSet},
    net::Ipv4Addr,
    path::Path,
};

use serde::Deserialize;

pub use super::timing::{OpKind, Timing, TimingProfile};
use super::{SimError, fault::Fault};

/// A whole simulated estate.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Scenario {
    /// How long simulated operations take.
    #[serde(default)]
    pub timing: Timing,
    /// The client address NSG rules are evaluated for (the prober's public address).
    #[serde(default = "default_probe_source")]
    pub probe_source: Ipv4Addr,
    /// ARM's token buckets (per subscription).
    #[serde(default)]
    pub throttle: Throttle,
    /// Service tags Azure resolves in NSG rules (name → CIDRs, e.g. `AzureCloud.westeurope`).
    /// The operator's local NSG evaluation does not know them, as with real Azure: a rule
    /// using one is where IP flow verify and the local verdict can disagree.
    #[serde(default)]
    pub service_tags: BTreeMap<String, Vec<String>>,
    /// Subscriptions.
    pub subscriptions: Vec<SubscriptionSpec>,
}

fn default_probe_source() -> Ipv4Addr {
    Ipv4Addr::new(203, 0, 113, 10)
}

/// Token-bucket limits enforced by the emulator.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Throttle {
    /// Reads.
    #[serde(default = "reads")]
    pub reads: Bucket,
    /// Writes.
    #[serde(default = "writes")]
    pub writes: Bucket,
}

impl Default for Throttle {
    fn default() -> Self {
        Self {
            reads: reads(),
            writes: writes(),
        }
    }
}

fn reads() -> Bucket {
    Bucket {
        burst: 250,
        per_second: 25.0,
    }
}
fn writes() -> Bucket {
    Bucket {
        burst: 200,
        per_second: 10.0,
    }
}

/// One bucket.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Bucket {
    /// Tokens at once.
    pub burst: u32,
    /// Refill per second.
    pub per_second: f64,
}

/// A subscription.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SubscriptionSpec {
    /// Subscription id.
    pub id: String,
    /// Regions with a Network Watcher (`NetworkWatcherRG/NetworkWatcher_<region>`).
    #[serde(default)]
    pub network_watchers: Vec<String>,
    /// Resource groups.
    pub resource_groups: Vec<ResourceGroupSpec>,
}

/// A resource group.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResourceGroupSpec {
    /// Name.
    pub name: String,
    /// Region of every resource in it.
    pub location: String,
    /// NSGs.
    #[serde(default)]
    pub network_security_groups: Vec<NsgSpec>,
    /// Virtual networks.
    #[serde(default)]
    pub virtual_networks: Vec<VnetSpec>,
    /// VMs.
    #[serde(default)]
    pub vms: Vec<VmSpec>,
}

/// An NSG.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NsgSpec {
    /// Name.
    pub name: String,
    /// Custom rules (Azure's defaults are added).
    #[serde(default)]
    pub rules: Vec<RuleSpec>,
}

/// A custom security rule.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuleSpec {
    /// Name.
    pub name: String,
    /// 100–4096.
    pub priority: i32,
    /// `Allow` or `Deny`.
    pub access: Access,
    /// `Inbound` (default) or `Outbound`.
    #[serde(default)]
    pub direction: Direction,
    /// `Tcp`, `Udp`, `*`…
    #[serde(default = "any")]
    pub protocol: String,
    /// Source prefix (`*`, CIDR, IP or service tag).
    #[serde(default = "any")]
    pub source: String,
    /// Destination prefix.
    #[serde(default = "any")]
    pub destination: String,
    /// Destination port range.
    #[serde(default = "any")]
    pub destination_port: String,
}

fn any() -> String {
    "*".to_owned()
}

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Access {
    /// Allow.
    Allow,
    /// Deny.
    Deny,
}

/// Direction of a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum Direction {
    /// Inbound.
    #[default]
    Inbound,
    /// Outbound.
    Outbound,
}

/// A virtual network.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VnetSpec {
    /// Name.
    pub name: String,
    /// Address space.
    pub address_prefix: String,
    /// Subnets.
    pub subnets: Vec<SubnetSpec>,
}

/// A subnet.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SubnetSpec {
    /// Name.
    pub name: String,
    /// CIDR (IPv4).
    pub address_prefix: String,
    /// NSG name in the same resource group.
    #[serde(default)]
    pub network_security_group: Option<String>,
}

/// A Windows VM with one NIC.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VmSpec {
    /// Name.
    pub name: String,
    /// Its NIC.
    pub nic: NicSpec,
    /// Whether the VM agent reports Ready when the VM runs.
    #[serde(default = "yes")]
    pub agent_ready: bool,
    /// Whether boot diagnostics are enabled.
    #[serde(default = "yes")]
    pub boot_diagnostics: bool,
    /// The local administrator.
    #[serde(default = "admin")]
    pub admin_user: String,
    /// Name of an existing VMAccessAgent extension (reused by VMAccess).
    #[serde(default)]
    pub vm_access_extension: Option<String>,
    /// Faults present at start.
    #[serde(default)]
    pub faults: Vec<Fault>,
    /// Another machine answers on this VM's address (IP reuse): the computer name its
    /// responder gives in the NTLM CHALLENGE instead of the VM's own.
    #[serde(default)]
    pub answers_as: Option<String>,
    /// Tags (what Resource Graph queries select on).
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// OS type of the OS disk (`Windows` or `Linux`).
    #[serde(default = "windows")]
    pub os_type: String,
}

fn windows() -> String {
    "Windows".to_owned()
}

fn yes() -> bool {
    true
}
fn admin() -> String {
    "azureadmin".to_owned()
}

/// A NIC.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NicSpec {
    /// Name (default `<vm>-nic`).
    #[serde(default)]
    pub name: Option<String>,
    /// `vnet/subnet` in the same resource group.
    pub subnet: String,
    /// Private IP (default: the first free address of the subnet).
    #[serde(default)]
    pub private_ip: Option<Ipv4Addr>,
    /// NIC-level NSG name.
    #[serde(default)]
    pub network_security_group: Option<String>,
    /// Whether the NIC has a public IP (`<vm>-ip`).
    #[serde(default = "yes")]
    pub public_ip: bool,
}

impl Scenario {
    /// Parses YAML text.
    pub fn from_yaml(text: &str) -> Result<Self, SimError> {
        let scenario: Self =
            serde_saphyr::from_str(text).map_err(|e| SimError::Scenario(e.to_string()))?;
        scenario.validate()?;
        Ok(scenario)
    }

    /// Reads and parses a file.
    pub fn from_file(path: &Path) -> Result<Self, SimError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| SimError::Scenario(format!("failed to read {}: {e}", path.display())))?;
        Self::from_yaml(&text)
    }

    /// Checks references and ranges; everything the simulator relies on.
    pub fn validate(&self) -> Result<(), SimError> {
        let bad = |m: String| Err(SimError::Scenario(m));
        if self.subscriptions.is_empty() {
            return bad("the scenario declares no subscription".into());
        }
        self.timing.validate().map_err(SimError::Scenario)?;
        for (name, b) in [
            ("reads", self.throttle.reads),
            ("writes", self.throttle.writes),
        ] {
            if b.burst == 0 || !(b.per_second > 0.0 && b.per_second.is_finite()) {
                return bad(format!("throttle.{name} needs a positive burst and rate"));
            }
        }
        for (tag, ranges) in &self.service_tags {
            if let Some(r) = ranges.iter().find(|r| parse_cidr(r).is_none()) {
                return bad(format!("service tag {tag} has an invalid prefix {r:?}"));
            }
        }
        let mut vm_names = HashSet::new();
        for sub in &self.subscriptions {
            if sub.id.is_empty() || sub.id.contains('/') {
                return bad(format!("invalid subscription id {:?}", sub.id));
            }
            for rg in &sub.resource_groups {
                let nsgs: HashSet<&str> = rg
                    .network_security_groups
                    .iter()
                    .map(|n| n.name.as_str())
                    .collect();
                for nsg in &rg.network_security_groups {
                    for r in &nsg.rules {
                        if !(100..=4096).contains(&r.priority) {
                            return bad(format!(
                                "rule {} of NSG {} has priority {} outside 100–4096",
                                r.name, nsg.name, r.priority
                            ));
                        }
                    }
                }
                for vnet in &rg.virtual_networks {
                    for s in &vnet.subnets {
                        parse_cidr(&s.address_prefix).ok_or_else(|| {
                            SimError::Scenario(format!(
                                "subnet {}/{} has an invalid prefix {:?}",
                                vnet.name, s.name, s.address_prefix
                            ))
                        })?;
                        if let Some(n) = &s.network_security_group
                            && !nsgs.contains(n.as_str())
                        {
                            return bad(format!(
                                "subnet {}/{} names unknown NSG {n}",
                                vnet.name, s.name
                            ));
                        }
                    }
                }
                for vm in &rg.vms {
                    if vm.name.is_empty() || vm.name.contains('/') {
                        return bad(format!("invalid VM name {:?}", vm.name));
                    }
                    if !vm_names.insert(vm.name.to_ascii_lowercase()) {
                        return bad(format!("VM name {} is declared twice", vm.name));
                    }
                    let Some((vnet, subnet)) = vm.nic.subnet.split_once('/') else {
                        return bad(format!("VM {}: nic.subnet must be vnet/subnet", vm.name));
                    };
                    let found = rg.virtual_networks.iter().any(|v| {
                        v.name.eq_ignore_ascii_case(vnet)
                            && v.subnets
                                .iter()
                                .any(|s| s.name.eq_ignore_ascii_case(subnet))
                    });
                    if !found {
                        return bad(format!("VM {}: unknown subnet {}", vm.name, vm.nic.subnet));
                    }
                    if let Some(n) = &vm.nic.network_security_group
                        && !nsgs.contains(n.as_str())
                    {
                        return bad(format!("VM {}: unknown NSG {n}", vm.name));
                    }
                }
            }
        }
        Ok(())
    }
}

/// Parses `a.b.c.d/len`.
pub fn parse_cidr(s: &str) -> Option<(Ipv4Addr, u32)> {
    let (a, l) = s.split_once('/')?;
    let len: u32 = l.parse().ok()?;
    (len <= 32).then_some(())?;
    Some((a.parse().ok()?, len))
}
