//! NSG evaluation for one inbound TCP flow, the way Azure does it: subnet NSG first, then the
//! NIC's; within each, rules by ascending priority, the first match decides; a missing NSG
//! allows. The simulator uses it to decide whether its responders are reachable.

use std::net::Ipv4Addr;

use super::model::{NsgRules, RuleProtocol, SecurityRule};
use crate::evidence::nsg as eval;

/// An inbound TCP flow to check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow {
    /// Client address.
    pub source: Ipv4Addr,
    /// VM private address (NSGs run after public→private NAT).
    pub destination: Ipv4Addr,
    /// Destination port.
    pub port: u16,
}

/// The outcome for one flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Whether the flow gets through both levels.
    pub allow: bool,
    /// The deciding rule, ARM-style (`securityRules/X` or `defaultSecurityRules/X`), and the NSG id.
    pub rule: Option<(String, String)>,
}

/// Evaluates `flow` against the subnet NSG, then the NIC NSG, with the one evaluator the
/// operator also uses for its evidence ([`crate::evidence::nsg`]).
pub fn evaluate(subnet: Option<&NsgRules>, nic: Option<&NsgRules>, flow: &Flow) -> Verdict {
    evaluate_in(subnet, nic, flow, &eval::NetworkContext::private_ranges())
}

/// [`evaluate`] with what the address tags mean given explicitly (e.g. service tags Azure
/// knows and the operator does not).
pub fn evaluate_in(
    subnet: Option<&NsgRules>,
    nic: Option<&NsgRules>,
    flow: &Flow,
    ctx: &eval::NetworkContext,
) -> Verdict {
    let subnet = subnet.map(to_evaluator);
    let nic = nic.map(to_evaluator);
    let flow = eval::Flow::inbound_tcp(flow.source.into(), flow.destination.into(), flow.port);
    let verdict = eval::evaluate(&flow, subnet.as_ref(), nic.as_ref(), ctx);
    Verdict {
        allow: verdict.access == eval::Access::Allow,
        rule: verdict
            .deciding
            .last()
            .map(|d| (d.rule.clone(), d.nsg.clone())),
    }
}

/// Converts the adapter's NSG model into the evaluator's.
pub fn to_evaluator(rules: &NsgRules) -> eval::NetworkSecurityGroup {
    let (custom, defaults): (Vec<_>, Vec<_>) = rules
        .rules
        .iter()
        .map(|r| eval::SecurityRule {
            name: r.name.clone(),
            priority: u32::try_from(r.priority).unwrap_or(u32::MAX),
            direction: if r.inbound {
                eval::Direction::Inbound
            } else {
                eval::Direction::Outbound
            },
            access: if r.allow {
                eval::Access::Allow
            } else {
                eval::Access::Deny
            },
            protocol: match r.protocol {
                RuleProtocol::Any => eval::RuleProtocol::Any,
                RuleProtocol::Tcp => eval::RuleProtocol::Tcp,
                RuleProtocol::Udp => eval::RuleProtocol::Udp,
                RuleProtocol::Other => eval::RuleProtocol::Icmp,
            },
            source_prefixes: r.source_prefixes.clone(),
            source_ports: vec!["*".into()],
            destination_prefixes: r.destination_prefixes.clone(),
            destination_ports: r.destination_ports.clone(),
            default_rule: r.default_rule,
        })
        .partition(|r| !r.default_rule);
    eval::NetworkSecurityGroup {
        id: rules.id.clone(),
        rules: custom,
        default_rules: defaults,
    }
}

/// The ARM name of a rule as effective-rules and IP flow verify report it.
pub fn rule_path(rule: &SecurityRule) -> String {
    if rule.default_rule {
        format!("defaultSecurityRules/{}", rule.name)
    } else {
        format!("securityRules/{}", rule.name)
    }
}

/// Azure's three default inbound and three default outbound rules.
pub fn default_rules() -> Vec<SecurityRule> {
    let rule = |name: &str, priority, inbound, allow, src: &str, dst: &str| SecurityRule {
        name: name.to_owned(),
        priority,
        inbound,
        allow,
        protocol: RuleProtocol::Any,
        source_prefixes: vec![src.to_owned()],
        destination_prefixes: vec![dst.to_owned()],
        destination_ports: vec!["*".to_owned()],
        default_rule: true,
    };
    vec![
        rule(
            "AllowVnetInBound",
            65000,
            true,
            true,
            "VirtualNetwork",
            "VirtualNetwork",
        ),
        rule(
            "AllowAzureLoadBalancerInBound",
            65001,
            true,
            true,
            "AzureLoadBalancer",
            "*",
        ),
        rule("DenyAllInBound", 65500, true, false, "*", "*"),
        rule(
            "AllowVnetOutBound",
            65000,
            false,
            true,
            "VirtualNetwork",
            "VirtualNetwork",
        ),
        rule("AllowInternetOutBound", 65001, false, true, "*", "Internet"),
        rule("DenyAllOutBound", 65500, false, false, "*", "*"),
    ]
}

impl super::model::NetworkRules {
    /// Evaluates `flow` against the rules read for this endpoint.
    pub fn verdict(&self, flow: &Flow) -> Verdict {
        evaluate(self.subnet_nsg.as_ref(), self.nic_nsg.as_ref(), flow)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nsg(custom: Vec<SecurityRule>) -> NsgRules {
        let mut rules = custom;
        rules.extend(default_rules());
        NsgRules {
            id: "nsg".into(),
            rules,
        }
    }

    fn rdp(name: &str, priority: i32, allow: bool, src: &str) -> SecurityRule {
        SecurityRule {
            name: name.into(),
            priority,
            inbound: true,
            allow,
            protocol: RuleProtocol::Tcp,
            source_prefixes: vec![src.into()],
            destination_prefixes: vec!["*".into()],
            destination_ports: vec!["3389".into()],
            default_rule: false,
        }
    }

    const FLOW: Flow = Flow {
        source: Ipv4Addr::new(203, 0, 113, 10),
        destination: Ipv4Addr::new(10, 0, 0, 4),
        port: 3389,
    };

    #[test]
    fn internet_rdp_is_denied_by_default() {
        let v = evaluate(None, Some(&nsg(vec![])), &FLOW);
        assert!(!v.allow);
        assert_eq!(v.rule.unwrap().0, "defaultSecurityRules/DenyAllInBound");
    }

    #[test]
    fn allow_rule_wins_unless_a_deny_outranks_it() {
        let allow = nsg(vec![rdp("allow-rdp", 1000, true, "*")]);
        assert!(evaluate(None, Some(&allow), &FLOW).allow);
        let deny = nsg(vec![
            rdp("allow-rdp", 1000, true, "*"),
            rdp("deny-rdp", 100, false, "Internet"),
        ]);
        let v = evaluate(Some(&allow), Some(&deny), &FLOW);
        assert!(!v.allow);
        assert_eq!(v.rule.unwrap().0, "securityRules/deny-rdp");
    }

    #[test]
    fn subnet_level_is_checked_first_and_missing_nsg_allows() {
        let allow = nsg(vec![rdp("allow-rdp", 1000, true, "203.0.113.0/24")]);
        assert!(evaluate(None, Some(&allow), &FLOW).allow);
        assert!(!evaluate(Some(&nsg(vec![])), Some(&allow), &FLOW).allow);
        assert!(evaluate(None, None, &FLOW).allow);
    }
}
