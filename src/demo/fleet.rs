//! The demo's built-in fleet: a scenario with one VM per fault class and one whose address
//! another computer answers on (cycled for larger fleets), spread over subscriptions of four so the storm breaker (which needs five VMs in a
//! subscription) stays out of the way, and what the demo expects for each fault.

use std::fmt::Write as _;

use crate::{
    ladder::{GuestRepair, Step},
    sim::Fault,
};

/// The fault classes in the order the built-in fleet uses them (`None` = a healthy VM).
pub const FAULT_CYCLE: [Option<Fault>; 11] = [
    None,
    Some(Fault::RdpDisabled),
    Some(Fault::NsgBlocking),
    Some(Fault::TlsDisabled),
    Some(Fault::CertificateExpired),
    Some(Fault::Flapping),
    Some(Fault::GuestHung),
    Some(Fault::HostFailure),
    Some(Fault::NicBroken),
    Some(Fault::PlatformOutage),
    Some(Fault::VmStopped),
];

/// The built-in fleet cycles through the fault classes and then one VM whose address another
/// machine answers on (an address reused inside the subnet): the identity step sees the other
/// computer's name, and the ladder must not act on this VM.
pub const CYCLE: usize = FAULT_CYCLE.len() + 1;

/// The computer that answers on the `i`-th VM's address, when it is not the VM itself.
pub fn answers_as(i: usize) -> Option<String> {
    (i % CYCLE == FAULT_CYCLE.len()).then(|| format!("vm-{i:03}-previous-owner"))
}

/// The fault of the `i`-th VM of the built-in fleet.
pub fn fault(i: usize) -> Option<Fault> {
    FAULT_CYCLE.get(i % CYCLE).copied().flatten()
}

/// VMs per subscription in the built-in fleet.
pub const VMS_PER_SUBSCRIPTION: usize = 4;

/// What the demo expects to happen to a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Stays healthy; no ladder.
    Healthy,
    /// Fixed by this step.
    FixedBy(Step),
    /// Reported, not fixed: the blocker's reason (`NsgDenied`, `VmNotRunning`).
    Reported(&'static str),
    /// Waits for Azure (Resource Health platform outage).
    Waits(&'static str),
}

impl Expect {
    /// What a VM with `fault`, whose address `answers_as` another computer or not, should
    /// end as: another computer on its address is reported, never acted on.
    pub fn for_vm(fault: Option<Fault>, answers_as: Option<&str>) -> Self {
        if answers_as.is_some() {
            return Self::Reported("WrongHost");
        }
        Self::for_fault(fault)
    }

    /// What a VM with `fault` should end as.
    pub fn for_fault(fault: Option<Fault>) -> Self {
        use crate::ladder::Rung;
        match fault {
            // Standard RDP security only is reachable: a security finding, not an outage.
            None | Some(Fault::HealthUnknown | Fault::SnapshotFails | Fault::LegacyRdpSecurity) => {
                Self::Healthy
            }
            Some(Fault::RdpDisabled) => Self::FixedBy(Step::rung(Rung::ResetRdpConfig)),
            Some(Fault::NsgBlocking) => Self::Reported("NsgDenied"),
            Some(Fault::TlsDisabled) => Self::FixedBy(Step::repair(GuestRepair::EnableTls12)),
            Some(Fault::CertificateExpired) => {
                Self::FixedBy(Step::repair(GuestRepair::RenewRdpCertificate))
            }
            Some(Fault::Flapping) => Self::FixedBy(Step::repair(GuestRepair::ListenerKeepAlive)),
            Some(Fault::GuestHung | Fault::NicBroken) => Self::FixedBy(Step::rung(Rung::ResetNic)),
            Some(Fault::HostFailure) => Self::FixedBy(Step::rung(Rung::Redeploy)),
            Some(Fault::PlatformOutage) => Self::Waits("PlatformIssue"),
            Some(Fault::VmStopped) => Self::Reported("VmNotRunning"),
        }
    }

    /// For people.
    pub fn describe(&self) -> String {
        match self {
            Self::Healthy => "stays healthy".into(),
            Self::FixedBy(step) => format!("fixed by {step}"),
            Self::Reported(r) => format!("reported ({r})"),
            Self::Waits(r) => format!("waits ({r})"),
        }
    }
}

/// The subscription id of the `index`-th group of VMs.
pub fn subscription(index: usize) -> String {
    format!("00000000-0000-0000-0000-{:012x}", 0xde00 + index)
}

/// The built-in scenario YAML for `vms` VMs; timings in milliseconds divided by `speed`.
pub fn scenario_yaml(vms: usize, speed: f64) -> String {
    let ms = |base: f64| ((base / speed).max(20.0)) as u64;
    let mut y = String::new();
    let _ = writeln!(
        y,
        "timing: {{operation: {}ms, restart: {}ms, redeploy: {}ms, retryAfter: {}ms}}",
        ms(800.0),
        ms(1500.0),
        ms(2500.0),
        ms(300.0)
    );
    y.push_str("subscriptions:\n");
    let groups = vms.div_ceil(VMS_PER_SUBSCRIPTION).max(1);
    for g in 0..groups {
        let _ = writeln!(y, "  - id: {}", subscription(g));
        // A Network Watcher, so the evidence cross-checks the NSG verdict with IP flow verify.
        y.push_str("    networkWatchers: [westeurope]\n");
        y.push_str("    resourceGroups:\n      - name: rg-demo\n        location: westeurope\n");
        y.push_str("        networkSecurityGroups:\n");
        y.push_str("          - {name: nsg-subnet, rules: [{name: allow-rdp, priority: 1000, access: Allow, protocol: Tcp, source: \"203.0.113.0/24\", destinationPort: \"3389\"}]}\n");
        let members: Vec<usize> =
            (g * VMS_PER_SUBSCRIPTION..((g + 1) * VMS_PER_SUBSCRIPTION).min(vms)).collect();
        for i in &members {
            let _ = writeln!(
                y,
                "          - {{name: nsg-vm-{i:03}, rules: [{{name: allow-rdp, priority: 1000, access: Allow, protocol: Tcp, source: \"203.0.113.0/24\", destinationPort: \"3389\"}}]}}"
            );
        }
        y.push_str("        virtualNetworks:\n          - {name: vnet, addressPrefix: 10.20.0.0/16, subnets: [{name: default, addressPrefix: 10.20.0.0/22, networkSecurityGroup: nsg-subnet}]}\n");
        y.push_str("        vms:\n");
        for i in members {
            let fault = fault(i);
            let faults = fault.map_or(String::new(), |f| f.as_str().to_string());
            let other = answers_as(i).map_or(String::new(), |n| format!(", answersAs: {n}"));
            let _ = writeln!(
                y,
                "          - {{name: {}, nic: {{subnet: vnet/default, networkSecurityGroup: nsg-vm-{i:03}}}, faults: [{faults}]{other}}}",
                vm_name(i)
            );
        }
    }
    y
}

/// The name of the `i`-th VM of the built-in fleet.
pub fn vm_name(i: usize) -> String {
    match (fault(i), answers_as(i)) {
        (Some(f), _) => format!("vm-{i:03}-{}", f.as_str().replace('_', "-")),
        (None, Some(_)) => format!("vm-{i:03}-address-reused"),
        (None, None) => format!("vm-{i:03}-healthy"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_scenario_parses_for_any_size() {
        for n in [1, 8, 11, 23] {
            let scenario = crate::sim::Scenario::from_yaml(&scenario_yaml(n, 1.0)).unwrap();
            let count: usize = scenario
                .subscriptions
                .iter()
                .flat_map(|s| s.resource_groups.iter())
                .map(|g| g.vms.len())
                .sum();
            assert_eq!(count, n);
            assert!(scenario.subscriptions.len() >= n / VMS_PER_SUBSCRIPTION);
        }
    }
}
