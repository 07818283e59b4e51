//! Exact, local evaluation of Azure network security groups for one flow.
//!
//! Inbound traffic passes the subnet's NSG first, then the NIC's NSG; both must allow it, and
//! a level without an NSG allows everything. Within one NSG the custom rules and the default
//! rules are sorted by priority and the first match decides. The destination is the VM's
//! private address (NAT happens before the NSG). Outbound is the mirror: NIC first, then subnet.

use std::{collections::BTreeMap, fmt, net::IpAddr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use super::exposure::{self, AddressSet, ExposureLimit};

mod internet;

pub use internet::{ANY_INTERNET_SOURCE, open_to_internet};

/// Whether a rule allows or denies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub enum Access {
    /// Traffic is allowed.
    Allow,
    /// Traffic is denied.
    Deny,
}

/// The direction a rule applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub enum Direction {
    /// Towards the VM.
    Inbound,
    /// From the VM.
    Outbound,
}

/// A rule's protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub enum RuleProtocol {
    /// `*`: any protocol.
    Any,
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
    /// ICMP.
    Icmp,
    /// ESP.
    Esp,
    /// AH.
    Ah,
}

impl RuleProtocol {
    /// Parses ARM's spelling (`Tcp`, `*`, `All`, case-insensitive).
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "*" | "any" | "all" => Some(Self::Any),
            "tcp" => Some(Self::Tcp),
            "udp" => Some(Self::Udp),
            "icmp" => Some(Self::Icmp),
            "esp" => Some(Self::Esp),
            "ah" => Some(Self::Ah),
            _ => None,
        }
    }
}

/// One security rule, with singular and plural ARM fields already merged into lists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SecurityRule {
    /// Rule name.
    pub name: String,
    /// 100–4096 for custom rules, 65000+ for default rules.
    pub priority: u32,
    /// Inbound or outbound.
    pub direction: Direction,
    /// Allow or deny.
    pub access: Access,
    /// Protocol.
    pub protocol: RuleProtocol,
    /// Source address prefixes (IPs, CIDRs, `*`, service tags).
    pub source_prefixes: Vec<String>,
    /// Source port ranges (`*`, `80`, `1024-65535`).
    pub source_ports: Vec<String>,
    /// Destination address prefixes.
    pub destination_prefixes: Vec<String>,
    /// Destination port ranges.
    pub destination_ports: Vec<String>,
    /// Whether this is one of Azure's default rules.
    #[serde(default)]
    pub default_rule: bool,
}

/// A network security group: its custom rules and default rules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkSecurityGroup {
    /// The NSG's resource ID or name.
    pub id: String,
    /// Custom rules.
    pub rules: Vec<SecurityRule>,
    /// Default rules as ARM reports them; empty means Azure's standard defaults.
    #[serde(default)]
    pub default_rules: Vec<SecurityRule>,
}

/// Where an NSG is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub enum NsgLevel {
    /// Attached to the subnet.
    Subnet,
    /// Attached to the network interface.
    Nic,
}

impl fmt::Display for NsgLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Subnet => "subnet",
            Self::Nic => "nic",
        })
    }
}

/// A TCP/UDP flow to evaluate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow {
    /// Direction of the flow relative to the VM.
    pub direction: Direction,
    /// Protocol of the flow (never `Any`).
    pub protocol: RuleProtocol,
    /// Source address.
    pub source: IpAddr,
    /// Source port.
    pub source_port: u16,
    /// Destination address (for inbound: the VM's private IP).
    pub destination: IpAddr,
    /// Destination port.
    pub destination_port: u16,
}

impl Flow {
    /// An inbound RDP (TCP) flow from `source` to the VM's private address.
    pub fn inbound_tcp(source: IpAddr, destination: IpAddr, port: u16) -> Self {
        Self {
            direction: Direction::Inbound,
            protocol: RuleProtocol::Tcp,
            source,
            // Clients use ephemeral ports; IP flow verify's convention is 60000.
            source_port: 60000,
            destination,
            destination_port: port,
        }
    }
}

/// What the address tags mean for this VM's network.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetworkContext {
    /// Address space of the VM's virtual network (and peered / gateway-connected ranges):
    /// what the `VirtualNetwork` tag covers.
    pub virtual_network: Vec<IpNet>,
    /// Further service tags (lower-case name → ranges), when known. The operator does not know
    /// them (Azure publishes and changes them weekly): a rule using one is unresolved locally,
    /// which is where IP flow verify's cross-check matters.
    pub service_tags: BTreeMap<String, Vec<IpNet>>,
}

impl NetworkContext {
    /// The RFC 1918 ranges standing in for the virtual network when its address space is not
    /// known (the adapter reads NICs and NSGs, not VNets): the `VirtualNetwork` tag then covers
    /// private addresses, which is what it covers for a VNet with default address space use.
    pub fn private_ranges() -> Self {
        Self {
            virtual_network: ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"]
                .iter()
                .filter_map(|n| n.parse().ok())
                .collect(),
            service_tags: BTreeMap::new(),
        }
    }
}

/// The rule that decided at one NSG level.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DecidingRule {
    /// Which NSG level.
    pub level: NsgLevel,
    /// The NSG.
    pub nsg: String,
    /// The rule name, prefixed like ARM (`securityRules/X`, `defaultSecurityRules/X`).
    pub rule: String,
    /// The rule's access.
    pub access: Access,
    /// The rule's priority.
    pub priority: u32,
}

/// The outcome of evaluating a flow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Verdict {
    /// The final decision.
    pub access: Access,
    /// The deciding rule at each level that has an NSG, in evaluation order.
    pub deciding: Vec<DecidingRule>,
    /// Prefixes that could not be evaluated locally (service tags other than the basic
    /// ones, application security groups): the verdict treats them as non-matching, and a
    /// cross-check through IP flow verify is advisable.
    pub unresolved_prefixes: Vec<String>,
}

impl Verdict {
    /// The rule that denied the flow, if it was denied.
    pub fn denying_rule(&self) -> Option<&DecidingRule> {
        self.deciding.iter().find(|d| d.access == Access::Deny)
    }
}

/// Azure's platform address behind the `AzureLoadBalancer` tag (health probes).
pub const AZURE_LOAD_BALANCER: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(168, 63, 129, 16));

/// Evaluates `flow` through the subnet NSG and the NIC NSG.
pub fn evaluate(
    flow: &Flow,
    subnet: Option<&NetworkSecurityGroup>,
    nic: Option<&NetworkSecurityGroup>,
    ctx: &NetworkContext,
) -> Verdict {
    let order = match flow.direction {
        Direction::Inbound => [(NsgLevel::Subnet, subnet), (NsgLevel::Nic, nic)],
        Direction::Outbound => [(NsgLevel::Nic, nic), (NsgLevel::Subnet, subnet)],
    };
    let mut verdict = Verdict {
        access: Access::Allow,
        deciding: Vec::new(),
        unresolved_prefixes: Vec::new(),
    };
    for (level, nsg) in order {
        let Some(nsg) = nsg else { continue };
        let decided = evaluate_one(flow, nsg, level, ctx, &mut verdict.unresolved_prefixes);
        let denied = decided.access == Access::Deny;
        verdict.deciding.push(decided);
        if denied {
            verdict.access = Access::Deny;
            break;
        }
    }
    verdict.unresolved_prefixes.sort();
    verdict.unresolved_prefixes.dedup();
    verdict
}

fn evaluate_one(
    flow: &Flow,
    nsg: &NetworkSecurityGroup,
    level: NsgLevel,
    ctx: &NetworkContext,
    unresolved: &mut Vec<String>,
) -> DecidingRule {
    let decided = in_priority_order(nsg, flow.direction, |rules| {
        rules
            .into_iter()
            .find(|rule| rule_matches(rule, flow, ctx, unresolved))
            .map(|rule| DecidingRule {
                level,
                nsg: nsg.id.clone(),
                rule: qualified_name(rule),
                access: rule.access,
                priority: rule.priority,
            })
    });
    // Unreachable with complete default rules (DenyAll* matches everything), kept total.
    decided.unwrap_or_else(|| DecidingRule {
        level,
        nsg: nsg.id.clone(),
        rule: "defaultSecurityRules/DenyAllInBound".into(),
        access: Access::Deny,
        priority: 65500,
    })
}

/// Calls `f` with the NSG's rules for `direction` (custom and default) in evaluation order.
fn in_priority_order<R>(
    nsg: &NetworkSecurityGroup,
    direction: Direction,
    f: impl FnOnce(Vec<&SecurityRule>) -> R,
) -> R {
    let defaults;
    let default_rules = if nsg.default_rules.is_empty() {
        defaults = default_rules();
        &defaults
    } else {
        &nsg.default_rules
    };
    let mut rules: Vec<&SecurityRule> = nsg
        .rules
        .iter()
        .chain(default_rules.iter())
        .filter(|r| r.direction == direction)
        .collect();
    // Custom rules win ties over default rules (they cannot share priorities in practice).
    rules.sort_by_key(|r| (r.priority, r.default_rule));
    f(rules)
}

fn qualified_name(rule: &SecurityRule) -> String {
    if rule.default_rule {
        format!("defaultSecurityRules/{}", rule.name)
    } else {
        format!("securityRules/{}", rule.name)
    }
}

fn rule_matches(
    rule: &SecurityRule,
    flow: &Flow,
    ctx: &NetworkContext,
    unresolved: &mut Vec<String>,
) -> bool {
    (rule.protocol == RuleProtocol::Any || rule.protocol == flow.protocol)
        && ports_match(&rule.source_ports, flow.source_port)
        && ports_match(&rule.destination_ports, flow.destination_port)
        && prefixes_match(&rule.source_prefixes, flow.source, ctx, unresolved)
        && prefixes_match(
            &rule.destination_prefixes,
            flow.destination,
            ctx,
            unresolved,
        )
}

/// Whether `port` is in any of the ranges (`*`, `N`, `N-M`); malformed entries never match.
pub fn ports_match(ranges: &[String], port: u16) -> bool {
    ranges.iter().any(|r| port_in(r.trim(), port))
}

fn port_in(range: &str, port: u16) -> bool {
    if range == "*" {
        return true;
    }
    match range.split_once('-') {
        Some((lo, hi)) => match (lo.trim().parse::<u16>(), hi.trim().parse::<u16>()) {
            (Ok(lo), Ok(hi)) => (lo..=hi).contains(&port),
            _ => false,
        },
        None => range.parse::<u16>() == Ok(port),
    }
}

fn prefixes_match(
    prefixes: &[String],
    addr: IpAddr,
    ctx: &NetworkContext,
    unresolved: &mut Vec<String>,
) -> bool {
    prefixes
        .iter()
        .any(|p| match prefix_contains(p.trim(), addr, ctx) {
            Some(hit) => hit,
            None => {
                unresolved.push(p.clone());
                false
            }
        })
}

/// Whether `prefix` covers `addr`; `None` when the prefix cannot be evaluated locally.
pub fn prefix_contains(prefix: &str, addr: IpAddr, ctx: &NetworkContext) -> Option<bool> {
    let in_vnet = || ctx.virtual_network.iter().any(|n| n.contains(&addr));
    match prefix.to_ascii_lowercase().as_str() {
        "*" | "any" | "0.0.0.0/0" | "::/0" => return Some(true),
        "virtualnetwork" => return Some(in_vnet()),
        "azureloadbalancer" => return Some(addr == AZURE_LOAD_BALANCER),
        "internet" => return Some(!in_vnet() && addr != AZURE_LOAD_BALANCER && is_public(addr)),
        tag => {
            if let Some(ranges) = ctx.service_tags.get(tag) {
                return Some(ranges.iter().any(|n| n.contains(&addr)));
            }
        }
    }
    if let Ok(net) = prefix.parse::<IpNet>() {
        return Some(net.contains(&addr));
    }
    if let Ok(ip) = prefix.parse::<IpAddr>() {
        return Some(ip == addr);
    }
    None
}

fn is_public(addr: IpAddr) -> bool {
    match addr {
        IpAddr::V4(v4) => {
            !(v4.is_private() || v4.is_loopback() || v4.is_link_local() || v4.is_unspecified())
        }
        IpAddr::V6(v6) => !(v6.is_loopback() || v6.is_unspecified()),
    }
}

/// Azure's default rules, as every NSG carries them.
pub fn default_rules() -> Vec<SecurityRule> {
    let rule = |name: &str, priority, direction, access, src: &str, dst: &str| SecurityRule {
        name: name.into(),
        priority,
        direction,
        access,
        protocol: RuleProtocol::Any,
        source_prefixes: vec![src.into()],
        source_ports: vec!["*".into()],
        destination_prefixes: vec![dst.into()],
        destination_ports: vec!["*".into()],
        default_rule: true,
    };
    use {Access::*, Direction::*};
    vec![
        rule(
            "AllowVnetInBound",
            65000,
            Inbound,
            Allow,
            "VirtualNetwork",
            "VirtualNetwork",
        ),
        rule(
            "AllowAzureLoadBalancerInBound",
            65001,
            Inbound,
            Allow,
            "AzureLoadBalancer",
            "*",
        ),
        rule("DenyAllInBound", 65500, Inbound, Deny, "*", "*"),
        rule(
            "AllowVnetOutBound",
            65000,
            Outbound,
            Allow,
            "VirtualNetwork",
            "VirtualNetwork",
        ),
        rule(
            "AllowInternetOutBound",
            65001,
            Outbound,
            Allow,
            "*",
            "Internet",
        ),
        rule("DenyAllOutBound", 65500, Outbound, Deny, "*", "*"),
    ]
}

/// Rules and NSGs for tests.
#[cfg(test)]
pub(crate) mod fixtures {
    use super::*;

    /// An inbound TCP rule from `src` (comma-separated) to any address on `ports`.
    pub(crate) fn rule(
        name: &str,
        priority: u32,
        access: Access,
        src: &str,
        ports: &str,
    ) -> SecurityRule {
        SecurityRule {
            name: name.into(),
            priority,
            direction: Direction::Inbound,
            access,
            protocol: RuleProtocol::Tcp,
            source_prefixes: src.split(',').map(str::to_string).collect(),
            source_ports: vec!["*".into()],
            destination_prefixes: vec!["*".into()],
            destination_ports: ports.split(',').map(str::to_string).collect(),
            default_rule: false,
        }
    }

    /// An NSG with `rules` and Azure's default rules.
    pub(crate) fn nsg(id: &str, rules: Vec<SecurityRule>) -> NetworkSecurityGroup {
        NetworkSecurityGroup {
            id: id.into(),
            rules,
            default_rules: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    use fixtures::{nsg, rule};

    fn ctx() -> NetworkContext {
        NetworkContext {
            virtual_network: vec!["10.0.0.0/16".parse().unwrap()],
            service_tags: BTreeMap::new(),
        }
    }

    const VM: &str = "10.0.1.4";

    fn rdp_from(src: &str) -> Flow {
        Flow::inbound_tcp(src.parse().unwrap(), VM.parse().unwrap(), 3389)
    }

    fn allow_rdp(src: &str) -> SecurityRule {
        rule("allow-rdp", 1000, Access::Allow, src, "3389")
    }

    #[rstest]
    #[case::no_nsg_anywhere(None, None, "198.51.100.7", Access::Allow, vec![])]
    #[case::default_denies_internet(Some(vec![]), None, "198.51.100.7", Access::Deny, vec!["defaultSecurityRules/DenyAllInBound"])]
    #[case::default_allows_vnet(Some(vec![]), None, "10.0.2.9", Access::Allow, vec!["defaultSecurityRules/AllowVnetInBound"])]
    #[case::default_allows_load_balancer(Some(vec![]), None, "168.63.129.16", Access::Allow, vec!["defaultSecurityRules/AllowAzureLoadBalancerInBound"])]
    #[case::custom_allow(Some(vec![allow_rdp("*")]), None, "198.51.100.7", Access::Allow, vec!["securityRules/allow-rdp"])]
    #[case::source_cidr_match(Some(vec![allow_rdp("198.51.100.0/24")]), None, "198.51.100.7", Access::Allow, vec!["securityRules/allow-rdp"])]
    #[case::source_cidr_miss(Some(vec![allow_rdp("198.51.100.0/24")]), None, "192.0.2.1", Access::Deny, vec!["defaultSecurityRules/DenyAllInBound"])]
    #[case::internet_tag(Some(vec![allow_rdp("Internet")]), None, "198.51.100.7", Access::Allow, vec!["securityRules/allow-rdp"])]
    #[case::internet_tag_excludes_vnet(Some(vec![rule("deny-inet", 100, Access::Deny, "Internet", "*")]), None, "10.0.2.9", Access::Allow, vec!["defaultSecurityRules/AllowVnetInBound"])]
    #[case::lower_priority_number_wins(Some(vec![allow_rdp("*"), rule("deny-rdp", 900, Access::Deny, "*", "3389")]), None, "198.51.100.7", Access::Deny, vec!["securityRules/deny-rdp"])]
    #[case::allow_before_deny(Some(vec![rule("allow", 100, Access::Allow, "*", "3389"), rule("deny", 200, Access::Deny, "*", "*")]), None, "198.51.100.7", Access::Allow, vec!["securityRules/allow"])]
    #[case::port_range(Some(vec![rule("range", 100, Access::Allow, "*", "3000-4000")]), None, "198.51.100.7", Access::Allow, vec!["securityRules/range"])]
    #[case::port_list_miss(Some(vec![rule("web", 100, Access::Allow, "*", "80,443")]), None, "198.51.100.7", Access::Deny, vec!["defaultSecurityRules/DenyAllInBound"])]
    #[case::port_list_hit(Some(vec![rule("list", 100, Access::Allow, "*", "22,3389")]), None, "198.51.100.7", Access::Allow, vec!["securityRules/list"])]
    #[case::nic_only_allow(None, Some(vec![allow_rdp("*")]), "198.51.100.7", Access::Allow, vec!["securityRules/allow-rdp"])]
    fn single_or_no_nsg(
        #[case] subnet_rules: Option<Vec<SecurityRule>>,
        #[case] nic_rules: Option<Vec<SecurityRule>>,
        #[case] src: &str,
        #[case] access: Access,
        #[case] deciding: Vec<&str>,
    ) {
        let subnet = subnet_rules.map(|r| nsg("subnet-nsg", r));
        let nic = nic_rules.map(|r| nsg("nic-nsg", r));
        let v = evaluate(&rdp_from(src), subnet.as_ref(), nic.as_ref(), &ctx());
        assert_eq!(v.access, access, "{v:?}");
        let names: Vec<_> = v.deciding.iter().map(|d| d.rule.as_str()).collect();
        assert_eq!(names, deciding);
    }

    #[rstest]
    #[case::both_allow(vec![allow_rdp("*")], vec![allow_rdp("*")], Access::Allow, NsgLevel::Nic)]
    #[case::subnet_denies_first(vec![], vec![allow_rdp("*")], Access::Deny, NsgLevel::Subnet)]
    #[case::nic_denies_after_subnet_allows(vec![allow_rdp("*")], vec![], Access::Deny, NsgLevel::Nic)]
    #[case::nic_explicit_deny(vec![allow_rdp("*")], vec![rule("block", 100, Access::Deny, "*", "3389")], Access::Deny, NsgLevel::Nic)]
    fn subnet_then_nic(
        #[case] subnet_rules: Vec<SecurityRule>,
        #[case] nic_rules: Vec<SecurityRule>,
        #[case] access: Access,
        #[case] last_level: NsgLevel,
    ) {
        let subnet = nsg("subnet-nsg", subnet_rules);
        let nic = nsg("nic-nsg", nic_rules);
        let v = evaluate(&rdp_from("198.51.100.7"), Some(&subnet), Some(&nic), &ctx());
        assert_eq!(v.access, access);
        assert_eq!(v.deciding.last().unwrap().level, last_level);
        if access == Access::Deny {
            assert_eq!(v.denying_rule().unwrap().level, last_level);
        }
    }

    #[test]
    fn outbound_checks_nic_first() {
        let mut deny_out = rule("no-out", 100, Access::Deny, "*", "*");
        deny_out.direction = Direction::Outbound;
        let nic = nsg("nic-nsg", vec![deny_out]);
        let subnet = nsg("subnet-nsg", vec![]);
        let flow = Flow {
            direction: Direction::Outbound,
            ..rdp_from("198.51.100.7")
        };
        let v = evaluate(&flow, Some(&subnet), Some(&nic), &ctx());
        assert_eq!(v.access, Access::Deny);
        assert_eq!(v.deciding.len(), 1);
        assert_eq!(v.deciding[0].level, NsgLevel::Nic);
    }

    #[test]
    fn protocol_must_match() {
        let mut udp = allow_rdp("*");
        udp.protocol = RuleProtocol::Udp;
        let v = evaluate(
            &rdp_from("198.51.100.7"),
            Some(&nsg("n", vec![udp])),
            None,
            &ctx(),
        );
        assert_eq!(v.access, Access::Deny);
        let mut any = allow_rdp("*");
        any.protocol = RuleProtocol::Any;
        let v = evaluate(
            &rdp_from("198.51.100.7"),
            Some(&nsg("n", vec![any])),
            None,
            &ctx(),
        );
        assert_eq!(v.access, Access::Allow);
    }

    #[test]
    fn unknown_service_tags_are_reported_not_guessed() {
        let v = evaluate(
            &rdp_from("198.51.100.7"),
            Some(&nsg("n", vec![allow_rdp("AzureCloud.westeurope")])),
            None,
            &ctx(),
        );
        assert_eq!(v.access, Access::Deny);
        assert_eq!(
            v.unresolved_prefixes,
            vec!["AzureCloud.westeurope".to_string()]
        );
    }

    #[test]
    fn known_service_tags_are_resolved() {
        let mut known = ctx();
        known.service_tags.insert(
            "azurecloud.westeurope".into(),
            vec!["198.51.100.0/24".parse().unwrap()],
        );
        let group = nsg("n", vec![allow_rdp("AzureCloud.westeurope")]);
        let v = evaluate(&rdp_from("198.51.100.7"), Some(&group), None, &known);
        assert_eq!(v.access, Access::Allow);
        assert!(v.unresolved_prefixes.is_empty());
        let v = evaluate(&rdp_from("192.0.2.7"), Some(&group), None, &known);
        assert_eq!(v.access, Access::Deny, "outside the tag's ranges");
    }

    #[test]
    fn reported_default_rules_replace_the_built_in_ones() {
        let mut custom_default = default_rules();
        for r in &mut custom_default {
            r.access = Access::Allow;
        }
        let group = NetworkSecurityGroup {
            id: "n".into(),
            rules: vec![],
            default_rules: custom_default,
        };
        let v = evaluate(&rdp_from("198.51.100.7"), Some(&group), None, &ctx());
        assert_eq!(v.access, Access::Allow);
    }

    #[rstest]
    #[case("*", true)]
    #[case("3389", true)]
    #[case("3389-3389", true)]
    #[case("1-3388", false)]
    #[case("3390-65535", false)]
    #[case("garbage", false)]
    #[case("5-x", false)]
    fn port_ranges(#[case] range: &str, #[case] hit: bool) {
        assert_eq!(ports_match(&[range.to_string()], 3389), hit);
    }

    #[rstest]
    #[case::star("*", true)]
    #[case::open_cidr("0.0.0.0/0", true)]
    #[case::internet("Internet", true)]
    #[case::restricted("198.51.100.0/24", false)]
    #[case::two_halves("0.0.0.0/1,128.0.0.0/1", true)]
    #[case::v6_everything("::0/0", true)]
    #[case::quarter("1.0.0.0/2", true)]
    #[case::private("10.20.30.0/24", false)]
    fn open_to_internet_finding(#[case] src: &str, #[case] open: bool) {
        let group = nsg("n", vec![allow_rdp(src)]);
        let found = open_to_internet(
            VM.parse().unwrap(),
            3389,
            Some(&group),
            None,
            &ctx(),
            ExposureLimit::default(),
        );
        assert_eq!(found, open);
    }

    #[test]
    fn earlier_denies_narrow_what_a_wide_allow_opens() {
        let half_denied = nsg(
            "n",
            vec![
                rule("deny-low", 100, Access::Deny, "0.0.0.0/1", "3389"),
                allow_rdp("*"),
            ],
        );
        let all_denied = nsg(
            "n",
            vec![
                rule("deny-all", 100, Access::Deny, "*", "3389"),
                allow_rdp("*"),
            ],
        );
        let vm = VM.parse().unwrap();
        let limit = ExposureLimit::default();
        assert!(open_to_internet(
            vm,
            3389,
            Some(&half_denied),
            None,
            &ctx(),
            limit
        ));
        assert!(!open_to_internet(
            vm,
            3389,
            Some(&all_denied),
            None,
            &ctx(),
            limit
        ));
        let other_port = nsg("n", vec![rule("web", 100, Access::Allow, "*", "443")]);
        assert!(!open_to_internet(
            vm,
            3389,
            Some(&other_port),
            None,
            &ctx(),
            limit
        ));
    }

    #[test]
    fn open_at_nic_but_restricted_at_subnet_is_not_open() {
        let subnet = nsg("s", vec![allow_rdp("198.51.100.0/24")]);
        let nic = nsg("n", vec![allow_rdp("*")]);
        assert!(!open_to_internet(
            VM.parse().unwrap(),
            3389,
            Some(&subnet),
            Some(&nic),
            &ctx(),
            ExposureLimit::default()
        ));
    }
}
