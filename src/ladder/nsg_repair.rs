//! The `RepairNsg` plan: which allow rule to add to which NSG so that the prober's flow gets
//! through, limited to the spec's `allowedSourcePrefixes` and the VM's private address. Pure:
//! the driver reads the NSGs right before acting and writes what this returns.
//!
//! Rules of the plan:
//! - it acts only when the prober's own source lies inside an allowed prefix, so the repair can
//!   be verified by the next probe (otherwise the rule would open RDP to others and the ladder
//!   could not tell whether it worked);
//! - at each level (subnet, then NIC) whose NSG denies the flow on its own, one rule named
//!   [`rule_name`] is written with the highest free priority that still outranks the denying
//!   rule; a deny at priority 100 cannot be outranked and is reported instead;
//! - the plan is checked by evaluating the flow again with the new rules: it must be allowed.

use std::net::IpAddr;

use super::Rung;
use crate::evidence::nsg::{
    Access, Direction, Flow, NetworkContext, NetworkSecurityGroup, NsgLevel, RuleProtocol,
    SecurityRule, evaluate, prefix_contains,
};

/// Highest priority a custom rule may have.
pub const MAX_CUSTOM_PRIORITY: u32 = 4096;
/// Lowest priority a custom rule may have (evaluated first).
pub const MIN_CUSTOM_PRIORITY: u32 = 100;

/// One rule to write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedRule {
    /// Where.
    pub level: NsgLevel,
    /// The NSG (resource id).
    pub nsg: String,
    /// The rule name.
    pub name: String,
    /// Its priority.
    pub priority: u32,
    /// The rule it outranks (`securityRules/X` or `defaultSecurityRules/X`).
    pub outranks: String,
}

/// Why no plan exists.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// The NSGs already allow the flow (the evidence was older than the rules).
    #[error("the NSGs already allow RDP from the prober; nothing to repair")]
    NothingDenies,
    /// The prober's source is outside every allowed prefix.
    #[error(
        "the prober's source {0} is not inside remediation.nsgRepair.allowedSourcePrefixes, so a repair could not be verified; add it (or set the operator's --probe-source-address to its address as Azure sees it)"
    )]
    SourceNotAllowed(IpAddr),
    /// The denying rule has the lowest possible priority.
    #[error("{rule} in NSG {nsg} denies RDP at priority {priority}; no allow rule can outrank it")]
    Outranked {
        /// NSG.
        nsg: String,
        /// Rule.
        rule: String,
        /// Its priority.
        priority: u32,
    },
    /// Every priority above the denying rule is taken.
    #[error("NSG {nsg} has no free priority above {rule}")]
    NoFreePriority {
        /// NSG.
        nsg: String,
        /// Rule.
        rule: String,
    },
    /// The planned rules would still not admit the flow (for example an application
    /// security group or a service tag the evaluator cannot resolve).
    #[error("the planned rules would still not admit RDP ({0} decides); not writing them")]
    StillDenied(String),
}

/// The rule name for `vm` (Azure allows 80 characters).
pub fn rule_name(vm: &str) -> String {
    let mut name = format!("rdphealth-allow-rdp-{vm}");
    name.truncate(80);
    name
}

/// Plans the rules that let `flow` through, allowing only `prefixes`.
pub fn plan(
    flow: &Flow,
    subnet: Option<&NetworkSecurityGroup>,
    nic: Option<&NetworkSecurityGroup>,
    ctx: &NetworkContext,
    prefixes: &[String],
    vm: &str,
) -> Result<Vec<PlannedRule>, PlanError> {
    if evaluate(flow, subnet, nic, ctx).access == Access::Allow {
        return Err(PlanError::NothingDenies);
    }
    if !prefixes
        .iter()
        .any(|p| prefix_contains(p, flow.source, ctx) == Some(true))
    {
        return Err(PlanError::SourceNotAllowed(flow.source));
    }
    let name = rule_name(vm);
    let mut planned = Vec::new();
    let mut repaired = Vec::new();
    for (level, nsg) in [(NsgLevel::Subnet, subnet), (NsgLevel::Nic, nic)] {
        let Some(nsg) = nsg else {
            repaired.push(None);
            continue;
        };
        let alone = match level {
            NsgLevel::Subnet => evaluate(flow, Some(nsg), None, ctx),
            NsgLevel::Nic => evaluate(flow, None, Some(nsg), ctx),
        };
        let Some(deny) = alone.denying_rule() else {
            repaired.push(Some(nsg.clone()));
            continue;
        };
        if deny.priority <= MIN_CUSTOM_PRIORITY {
            return Err(PlanError::Outranked {
                nsg: nsg.id.clone(),
                rule: deny.rule.clone(),
                priority: deny.priority,
            });
        }
        let taken = |p: u32| {
            nsg.rules
                .iter()
                .any(|r| r.direction == Direction::Inbound && r.priority == p && r.name != name)
        };
        let top = (deny.priority - 1).min(MAX_CUSTOM_PRIORITY);
        let priority = (MIN_CUSTOM_PRIORITY..=top)
            .rev()
            .find(|p| !taken(*p))
            .ok_or_else(|| PlanError::NoFreePriority {
                nsg: nsg.id.clone(),
                rule: deny.rule.clone(),
            })?;
        let mut with = nsg.clone();
        with.rules.retain(|r| r.name != name);
        with.rules.push(allow_rule(&name, priority, flow, prefixes));
        repaired.push(Some(with));
        planned.push(PlannedRule {
            level,
            nsg: nsg.id.clone(),
            name: name.clone(),
            priority,
            outranks: deny.rule.clone(),
        });
    }
    let after = evaluate(flow, repaired[0].as_ref(), repaired[1].as_ref(), ctx);
    if let Some(d) = after.denying_rule() {
        return Err(PlanError::StillDenied(d.rule.clone()));
    }
    Ok(planned)
}

/// The rule as the evaluator sees it (the driver writes the same fields to Azure).
fn allow_rule(name: &str, priority: u32, flow: &Flow, prefixes: &[String]) -> SecurityRule {
    SecurityRule {
        name: name.to_string(),
        priority,
        direction: Direction::Inbound,
        access: Access::Allow,
        protocol: RuleProtocol::Tcp,
        source_prefixes: prefixes.to_vec(),
        source_ports: vec!["*".into()],
        destination_prefixes: vec![flow.destination.to_string()],
        destination_ports: vec![flow.destination_port.to_string()],
        default_rule: false,
    }
}

/// The description written next to the rule.
pub fn description() -> String {
    format!(
        "Added by rdphealth-operator ({}): RDP from remediation.nsgRepair.allowedSourcePrefixes only",
        Rung::RepairNsg
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::evidence::nsg::fixtures::nsg;

    fn rule(name: &str, priority: u32, access: Access, source: &str) -> SecurityRule {
        crate::evidence::nsg::fixtures::rule(name, priority, access, source, "3389")
    }

    fn flow() -> Flow {
        Flow::inbound_tcp(
            "198.51.100.7".parse().unwrap(),
            "10.0.0.4".parse().unwrap(),
            3389,
        )
    }

    fn prefixes() -> Vec<String> {
        vec!["198.51.100.0/24".into()]
    }

    #[test]
    fn outranks_a_custom_deny_with_the_nearest_free_priority() {
        let nic = nsg(
            "nic-nsg",
            vec![
                rule("deny-rdp", 200, Access::Deny, "*"),
                rule("other", 199, Access::Allow, "192.0.2.0/24"),
            ],
        );
        let ctx = NetworkContext::private_ranges();
        let plan = plan(&flow(), None, Some(&nic), &ctx, &prefixes(), "vm1").unwrap();
        assert_eq!(
            plan,
            vec![PlannedRule {
                level: NsgLevel::Nic,
                nsg: "nic-nsg".into(),
                name: "rdphealth-allow-rdp-vm1".into(),
                priority: 198,
                outranks: "securityRules/deny-rdp".into(),
            }]
        );
    }

    #[test]
    fn default_deny_gets_the_highest_custom_priority_and_both_levels_are_repaired() {
        let ctx = NetworkContext::private_ranges();
        let subnet = nsg("subnet-nsg", Vec::new());
        let nic = nsg("nic-nsg", vec![rule("x", 4096, Access::Allow, "192.0.2.1")]);
        let plan = plan(&flow(), Some(&subnet), Some(&nic), &ctx, &prefixes(), "vm1").unwrap();
        assert_eq!(plan.len(), 2);
        assert_eq!(plan[0].level, NsgLevel::Subnet);
        assert_eq!(plan[0].priority, 4096);
        assert_eq!(plan[0].outranks, "defaultSecurityRules/DenyAllInBound");
        assert_eq!(plan[1].level, NsgLevel::Nic);
        assert_eq!(plan[1].priority, 4095);
    }

    #[test]
    fn only_the_denying_level_is_touched() {
        let ctx = NetworkContext::private_ranges();
        let subnet = nsg("subnet-nsg", vec![rule("allow", 1000, Access::Allow, "*")]);
        let nic = nsg("nic-nsg", vec![rule("deny", 500, Access::Deny, "*")]);
        let plan = plan(&flow(), Some(&subnet), Some(&nic), &ctx, &prefixes(), "vm1").unwrap();
        assert_eq!(plan.len(), 1);
        assert_eq!((plan[0].nsg.as_str(), plan[0].priority), ("nic-nsg", 499));
    }

    #[test]
    fn an_existing_rule_of_ours_is_rewritten_not_avoided() {
        let ctx = NetworkContext::private_ranges();
        let nic = nsg(
            "nic-nsg",
            vec![
                rule("deny", 300, Access::Deny, "*"),
                rule(
                    "rdphealth-allow-rdp-vm1",
                    299,
                    Access::Allow,
                    "192.0.2.0/24",
                ),
            ],
        );
        let plan = plan(&flow(), None, Some(&nic), &ctx, &prefixes(), "vm1").unwrap();
        assert_eq!(plan[0].priority, 299);
    }

    #[test]
    fn refusals() {
        let ctx = NetworkContext::private_ranges();
        let open = nsg("nic-nsg", vec![rule("allow", 1000, Access::Allow, "*")]);
        assert_eq!(
            plan(&flow(), None, Some(&open), &ctx, &prefixes(), "vm"),
            Err(PlanError::NothingDenies)
        );
        let deny100 = nsg("nic-nsg", vec![rule("deny", 100, Access::Deny, "*")]);
        assert!(matches!(
            plan(&flow(), None, Some(&deny100), &ctx, &prefixes(), "vm"),
            Err(PlanError::Outranked { priority: 100, .. })
        ));
        let closed = nsg("nic-nsg", Vec::new());
        assert_eq!(
            plan(
                &flow(),
                None,
                Some(&closed),
                &ctx,
                &["192.0.2.0/24".into()],
                "vm"
            ),
            Err(PlanError::SourceNotAllowed("198.51.100.7".parse().unwrap()))
        );
        let full = nsg(
            "nic-nsg",
            (100..=300)
                .map(|p| rule(&format!("r{p}"), p, Access::Allow, "192.0.2.1"))
                .chain([rule("deny", 301, Access::Deny, "*")])
                .collect(),
        );
        assert!(matches!(
            plan(&flow(), None, Some(&full), &ctx, &prefixes(), "vm"),
            Err(PlanError::NoFreePriority { .. })
        ));
    }

    #[test]
    fn names_fit_azure_limits() {
        assert_eq!(rule_name(&"v".repeat(100)).len(), 80);
    }
}
