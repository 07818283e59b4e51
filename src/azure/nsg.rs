//! NSG evaluation for one inbound TCP flow, the way Azure does it: subnet NSG first, then the
//! NIC's; within each, rules by ascending priority, the first match decides; a missing NSG
//! allows. The simulator uses it to decide whether its responders are reachable.

use std::net::Ipv4Addr;

use super::model::{NsgRules, RuleProtocol, SecurityRule};

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

/// Evaluates `flow` against the subnet NSG, then the NIC NSG.
pub fn evaluate(subnet: Option<&NsgRules>, nic: Option<&NsgRules>, flow: &Flow) -> Verdict {
    let mut last = None;
    for nsg in [subnet, nic].into_iter().flatten() {
        match first_match(nsg, flow) {
            Some(rule) => {
                let name = rule_path(rule);
                if !rule.allow {
                    return Verdict {
                        allow: false,
                        rule: Some((name, nsg.id.clone())),
                    };
                }
                last = Some((name, nsg.id.clone()));
            }
            // No rule at all matched (not even defaults): Azure's DenyAllInBound would have.
            None if !nsg.rules.iter().any(|r| r.default_rule) => {}
            None => {
                return Verdict {
                    allow: false,
                    rule: Some((
                        "defaultSecurityRules/DenyAllInBound".to_owned(),
                        nsg.id.clone(),
                    )),
                };
            }
        }
    }
    Verdict {
        allow: true,
        rule: last,
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

fn first_match<'a>(nsg: &'a NsgRules, flow: &Flow) -> Option<&'a SecurityRule> {
    let mut rules: Vec<&SecurityRule> = nsg.rules.iter().filter(|r| r.inbound).collect();
    rules.sort_by_key(|r| r.priority);
    rules.into_iter().find(|r| matches(r, flow))
}

fn matches(rule: &SecurityRule, flow: &Flow) -> bool {
    matches!(rule.protocol, RuleProtocol::Any | RuleProtocol::Tcp)
        && rule.destination_ports.iter().any(|p| port_in(p, flow.port))
        && rule
            .source_prefixes
            .iter()
            .any(|p| address_in(p, flow.source))
        && rule
            .destination_prefixes
            .iter()
            .any(|p| address_in(p, flow.destination))
}

fn port_in(range: &str, port: u16) -> bool {
    let range = range.trim();
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

fn is_private(ip: Ipv4Addr) -> bool {
    ip.is_private()
}

fn address_in(prefix: &str, ip: Ipv4Addr) -> bool {
    let prefix = prefix.trim();
    match prefix.to_ascii_lowercase().as_str() {
        "*" | "any" => return true,
        "internet" => return !is_private(ip),
        "virtualnetwork" => return is_private(ip),
        "azureloadbalancer" => return ip == Ipv4Addr::new(168, 63, 129, 16),
        _ => {}
    }
    let (addr, len) = match prefix.split_once('/') {
        Some((a, l)) => (a, l.parse::<u32>().ok()),
        None => (prefix, Some(32)),
    };
    match (addr.parse::<Ipv4Addr>(), len) {
        (Ok(net), Some(len)) if len <= 32 => {
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            u32::from(net) & mask == u32::from(ip) & mask
        }
        _ => false,
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
