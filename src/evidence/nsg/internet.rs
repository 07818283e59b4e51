//! Whether RDP is open to the internet: the sources both NSG levels let through, measured by
//! the public address space they cover.

use super::*;

/// A representative public source address (TEST-NET-3, used only in computation) standing
/// for "anyone on the internet".
pub const ANY_INTERNET_SOURCE: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(203, 0, 113, 77));

/// Whether RDP on `port` is open to more of the internet than `limit` allows: the sources
/// that both NSG levels let through to the VM, measured by the public address space they
/// cover (the computation that also bounds `nsgRepair.allowedSourcePrefixes`), so that
/// `0.0.0.0/1` + `128.0.0.0/1` counts as open as `*`. A VM without any NSG is not reported.
pub fn open_to_internet(
    vm_private_ip: IpAddr,
    port: u16,
    subnet: Option<&NetworkSecurityGroup>,
    nic: Option<&NetworkSecurityGroup>,
    ctx: &NetworkContext,
    limit: ExposureLimit,
) -> bool {
    if subnet.is_none() && nic.is_none() {
        return false;
    }
    [subnet, nic]
        .into_iter()
        .flatten()
        .fold(AddressSet::everything(), |reach, nsg| {
            reach.intersection(&allowed_sources(nsg, vm_private_ip, port, ctx))
        })
        .exceeds(limit)
}

/// The sources one NSG lets through to `vm:port` over TCP: each rule, in priority order,
/// decides for the sources no earlier rule decided for. A rule whose prefixes cannot be
/// evaluated locally decides for nobody (so an unknown deny never hides an open allow).
fn allowed_sources(
    nsg: &NetworkSecurityGroup,
    vm: IpAddr,
    port: u16,
    ctx: &NetworkContext,
) -> AddressSet {
    let probe = Flow::inbound_tcp(ANY_INTERNET_SOURCE, vm, port);
    in_priority_order(nsg, Direction::Inbound, |rules| {
        let mut undecided = AddressSet::everything();
        let mut allowed = AddressSet::default();
        for rule in rules {
            let applies = (rule.protocol == RuleProtocol::Any || rule.protocol == probe.protocol)
                && ports_match(&rule.source_ports, probe.source_port)
                && ports_match(&rule.destination_ports, port)
                && rule
                    .destination_prefixes
                    .iter()
                    .any(|p| prefix_contains(p.trim(), vm, ctx) == Some(true));
            if !applies {
                continue;
            }
            let sources = rule
                .source_prefixes
                .iter()
                .fold(AddressSet::default(), |acc, p| {
                    acc.union(&prefix_set(p, ctx))
                });
            if rule.access == Access::Allow {
                allowed = allowed.union(&undecided.intersection(&sources));
            }
            undecided = undecided.difference(&sources);
        }
        allowed
    })
}

/// The addresses a rule prefix names; empty when it cannot be evaluated locally.
fn prefix_set(prefix: &str, ctx: &NetworkContext) -> AddressSet {
    let vnet = || {
        ctx.virtual_network
            .iter()
            .fold(AddressSet::default(), |acc, n| {
                acc.union(&AddressSet::of_net(*n))
            })
    };
    match prefix.trim().to_ascii_lowercase().as_str() {
        "*" | "any" => AddressSet::everything(),
        "virtualnetwork" => vnet(),
        "azureloadbalancer" => AddressSet::of_addr(AZURE_LOAD_BALANCER),
        "internet" => exposure::public_internet()
            .difference(&vnet())
            .difference(&AddressSet::of_addr(AZURE_LOAD_BALANCER)),
        tag => match ctx.service_tags.get(tag) {
            Some(ranges) => ranges.iter().fold(AddressSet::default(), |acc, n| {
                acc.union(&AddressSet::of_net(*n))
            }),
            None => AddressSet::parse(prefix).unwrap_or_default(),
        },
    }
}
