//! A generated all-healthy scenario of `n` VMs for the fleet and blackbox benchmarks.

use std::fmt::Write as _;

/// VMs per subscription in the generated scenario.
pub const VMS_PER_SUBSCRIPTION: usize = 1000;

/// The scenario YAML: `n` healthy VMs behind a subnet NSG that allows RDP from the prober.
pub fn healthy_yaml(n: usize) -> String {
    let mut y = String::from("probeSource: 203.0.113.10\nsubscriptions:\n");
    for g in 0..n.div_ceil(VMS_PER_SUBSCRIPTION).max(1) {
        let _ = writeln!(y, "  - id: 00000000-0000-0000-0000-{:012x}", 0xbe00 + g);
        y.push_str("    resourceGroups:\n      - name: rg-bench\n        location: westeurope\n");
        y.push_str("        networkSecurityGroups:\n          - {name: nsg-subnet, rules: [{name: allow-rdp, priority: 1000, access: Allow, protocol: Tcp, source: \"203.0.113.0/24\", destinationPort: \"3389\"}]}\n");
        y.push_str("        virtualNetworks:\n          - {name: vnet, addressPrefix: 10.0.0.0/8, subnets: [{name: default, addressPrefix: 10.0.0.0/16, networkSecurityGroup: nsg-subnet}]}\n");
        y.push_str("        vms:\n");
        for i in g * VMS_PER_SUBSCRIPTION..((g + 1) * VMS_PER_SUBSCRIPTION).min(n) {
            // Static private addresses: the simulator's allocation of free addresses scans
            // every NIC per candidate address, which is slow for thousands of VMs.
            let host = i + 4;
            let _ = writeln!(
                y,
                "          - {{name: vm-{i:05}, nic: {{subnet: vnet/default, privateIp: 10.0.{}.{}}}}}",
                host / 256,
                host % 256
            );
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::Scenario;

    #[test]
    fn the_generated_scenario_parses() {
        for n in [1, 3, 1001] {
            let s = Scenario::from_yaml(&healthy_yaml(n));
            assert!(s.is_ok(), "{n}: {:?}", s.err());
        }
    }
}
