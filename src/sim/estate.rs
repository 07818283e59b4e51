//! The simulated estate as the outside sees it: which NSGs guard a NIC and what they decide
//! for the prober's flow, how a VM's RDP responder behaves given its faults and registry,
//! faults injected at run time, free addresses in a subnet, and the serial log.

use std::net::Ipv4Addr;

use super::{
    fault::{Behaviour, Fault},
    resources::{Nic, Nsg, Vm},
    world::{BLOCKING_RULE, World, allow_rdp, key},
};
use crate::azure::{
    model::{RuleProtocol, SecurityRule},
    nsg::{self, Flow},
};

impl World {
    /// The NSGs protecting a NIC: (subnet NSG, NIC NSG).
    pub fn nsgs_of(&self, nic: &Nic) -> (Option<&Nsg>, Option<&Nsg>) {
        let subnet = self
            .vnets
            .get(&nic.vnet)
            .and_then(|v| {
                v.subnets
                    .iter()
                    .find(|s| s.name.eq_ignore_ascii_case(&nic.subnet))
            })
            .and_then(|s| s.nsg.as_ref())
            .and_then(|k| self.nsgs.get(k));
        let nic_nsg = nic.nsg.as_ref().and_then(|k| self.nsgs.get(k));
        (subnet, nic_nsg)
    }

    /// Evaluates inbound TCP `port` from `source` to the NIC.
    pub fn flow_verdict(&self, nic: &Nic, source: Ipv4Addr, port: u16) -> nsg::Verdict {
        let (subnet, nic_nsg) = self.nsgs_of(nic);
        let subnet = subnet.map(Nsg::all_rules);
        let nic_nsg = nic_nsg.map(Nsg::all_rules);
        nsg::evaluate_in(
            subnet.as_ref(),
            nic_nsg.as_ref(),
            &Flow {
                source,
                destination: nic.private_ip,
                port,
            },
            &self.network,
        )
    }

    /// Whether the prober's traffic meets a Standard public IP with no NSG on its path: Azure
    /// drops it ("public-ip-addresses" doc: Standard IPs are secure by default and closed to
    /// inbound traffic). A prober inside the network (a private source) reaches the private
    /// address instead, where no NSG means allowed.
    pub fn closed_public_ip(&self, nic: &Nic) -> bool {
        let (subnet, nic_nsg) = self.nsgs_of(nic);
        nic.pip.is_some()
            && !self.probe_source.is_private()
            && !self.probe_source.is_loopback()
            && subnet.is_none()
            && nic_nsg.is_none()
    }

    /// The computer name the machine answering on `vm_name`'s address gives (its
    /// `osProfile.computerName`, the VM name, unless another machine took the address).
    pub fn computer_name(&self, vm_name: &str) -> Option<String> {
        let vm = self.vms.get(&vm_name.to_ascii_lowercase())?;
        Some(vm.answers_as.clone().unwrap_or_else(|| vm.name.clone()))
    }

    /// How the VM's responder treats a new connection now.
    pub fn behaviour(&self, vm_name: &str) -> Behaviour {
        let Some(vm) = self.vms.get(&vm_name.to_ascii_lowercase()) else {
            return Behaviour::Refuse;
        };
        let f = |x| vm.faults.contains(&x);
        if !vm.running() || vm.rebooting {
            return Behaviour::Refuse;
        }
        if f(Fault::PlatformOutage) || f(Fault::HostFailure) || f(Fault::NicBroken) {
            return Behaviour::Silent;
        }
        let blocked = self.nics.get(&vm.nic).is_some_and(|nic| {
            !self.flow_verdict(nic, self.probe_source, 3389).allow || self.closed_public_ip(nic)
        });
        // The Windows Firewall admits RDP only on its rule's local port.
        let firewalled = vm.registry.firewall_rdp_port() != Some(3389);
        if blocked || firewalled || f(Fault::GuestHung) {
            return Behaviour::Silent;
        }
        if f(Fault::RdpDisabled) || vm.registry.listener(3389).is_err() {
            return Behaviour::Refuse;
        }
        // A `SSLCertificateSHA1Hash` naming no certificate in the store: no server credential.
        let stale_binding = vm
            .registry
            .certificate_binding()
            .is_some_and(|t| !vm.certificates.contains(&t));
        if f(Fault::TlsDisabled) || stale_binding {
            return Behaviour::TlsAlert;
        }
        if f(Fault::Flapping) {
            return Behaviour::Flapping;
        }
        if f(Fault::LegacyRdpSecurity) {
            return Behaviour::LegacyRdpOnly;
        }
        Behaviour::Healthy {
            expired_certificate: f(Fault::CertificateExpired),
        }
    }

    /// Adds or removes the blocking rule in the VM's NIC NSG (creating one if needed).
    pub fn set_nsg_block(&mut self, vm_name: &str, on: bool) {
        let Some(vm) = self.vms.get(vm_name) else {
            return;
        };
        let Some(nic) = self.nics.get(&vm.nic).cloned() else {
            return;
        };
        let nsg_key = match nic.nsg.clone() {
            Some(k) => k,
            None if !on => return,
            None => {
                let name = format!("{}-nsg", nic.name);
                let k = key(&nic.sub, &nic.rg, &name);
                self.nsgs.insert(
                    k.clone(),
                    Nsg {
                        sub: nic.sub.clone(),
                        rg: nic.rg.clone(),
                        name,
                        location: nic.location.clone(),
                        rules: vec![allow_rdp()],
                        busy: false,
                    },
                );
                if let Some(n) = self.nics.get_mut(&vm.nic.clone()) {
                    n.nsg = Some(k.clone());
                }
                k
            }
        };
        if let Some(nsg) = self.nsgs.get_mut(&nsg_key) {
            nsg.rules.retain(|r| r.name != BLOCKING_RULE);
            if on {
                nsg.rules.push(SecurityRule {
                    name: BLOCKING_RULE.to_owned(),
                    priority: 200,
                    inbound: true,
                    allow: false,
                    protocol: RuleProtocol::Tcp,
                    source_prefixes: vec!["*".to_owned()],
                    destination_prefixes: vec!["*".to_owned()],
                    destination_ports: vec!["3389".to_owned()],
                    default_rule: false,
                });
            }
        }
    }

    /// Adds a fault at run time.
    pub fn inject(&mut self, vm_name: &str, fault: Fault) -> bool {
        let name = vm_name.to_ascii_lowercase();
        let Some(vm) = self.vms.get_mut(&name) else {
            return false;
        };
        vm.faults.insert(fault);
        if fault == Fault::NsgBlocking {
            self.set_nsg_block(&name, true);
        }
        true
    }

    /// Clears a fault at run time.
    pub fn clear(&mut self, vm_name: &str, fault: Fault) -> bool {
        let name = vm_name.to_ascii_lowercase();
        let Some(vm) = self.vms.get_mut(&name) else {
            return false;
        };
        vm.faults.remove(&fault);
        if fault == Fault::NsgBlocking {
            self.set_nsg_block(&name, false);
        }
        true
    }

    /// Up to `n` free addresses of a subnet (Azure reserves the first four and the last).
    pub fn free_addresses(&self, vnet_key: &str, subnet: &str, n: usize) -> Vec<Ipv4Addr> {
        let Some((base, size)) = self.subnet_range(vnet_key, subnet) else {
            return Vec::new();
        };
        // One pass over the NICs, not one per candidate: large estates allocate thousands.
        let used: std::collections::HashSet<Ipv4Addr> = self
            .nics
            .values()
            .filter(|nic| nic.vnet == vnet_key)
            .map(|nic| nic.private_ip)
            .collect();
        (4..size.saturating_sub(1))
            .map(|i| Ipv4Addr::from(base.wrapping_add(i as u32)))
            .filter(|ip| !used.contains(ip))
            .take(n)
            .collect()
    }

    /// Whether `ip` is a usable, unallocated address of the subnet.
    pub fn address_free(&self, vnet_key: &str, subnet: &str, ip: Ipv4Addr) -> bool {
        let Some((base, size)) = self.subnet_range(vnet_key, subnet) else {
            return false;
        };
        let offset = u64::from(u32::from(ip).wrapping_sub(base));
        offset >= 4
            && offset < size.saturating_sub(1)
            && !self
                .nics
                .values()
                .any(|nic| nic.vnet == vnet_key && nic.private_ip == ip)
    }

    /// First address and size of a subnet; `None` for unknown or tiny (/30 and longer) ones.
    fn subnet_range(&self, vnet_key: &str, subnet: &str) -> Option<(u32, u64)> {
        let s = self
            .vnets
            .get(vnet_key)?
            .subnets
            .iter()
            .find(|s| s.name.eq_ignore_ascii_case(subnet))?;
        let (net, len) = s.prefix;
        if len > 29 {
            return None;
        }
        let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
        Some((u32::from(net) & mask, 1u64 << (32 - len)))
    }

    /// The subnet containing `ip` in a virtual network.
    pub fn subnet_of(&self, vnet_key: &str, ip: Ipv4Addr) -> Option<String> {
        let v = self.vnets.get(vnet_key)?;
        v.subnets
            .iter()
            .find(|s| {
                let (net, len) = s.prefix;
                let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
                u32::from(net) & mask == u32::from(ip) & mask
            })
            .map(|s| s.name.clone())
    }

    /// The serial console log the VM would show.
    pub fn serial_log(&self, vm: &Vm) -> String {
        let mut log = String::from(
            "Windows Boot Manager\r\nBooting Windows Server 2022 Datacenter\r\n\
             SAC> Computer is booting, SAC started and initialized.\r\n\
             EVENT: The CMD command is now available.\r\n",
        );
        if vm.faults.contains(&Fault::NicBroken) {
            log.push_str(
                "EVENT: netvsc: the network adapter failed to initialize (0xC000009A)\r\n",
            );
        }
        if vm.faults.contains(&Fault::GuestHung) {
            log.push_str("EVENT: The TermService service hung on starting.\r\n");
        }
        if vm.running() && !vm.rebooting {
            log.push_str("SAC> Computer is ready.\r\n");
        } else {
            log.push_str("EVENT: The computer is shutting down.\r\n");
        }
        log
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::Scenario;

    fn world(faults: &str) -> World {
        let yaml = format!(
            r#"
subscriptions:
  - id: s
    resourceGroups:
      - name: rg
        location: westeurope
        networkSecurityGroups:
          - name: open
            rules: [ {{ name: allow-rdp, priority: 1000, access: Allow, protocol: Tcp, destinationPort: "3389" }} ]
        virtualNetworks:
          - {{ name: v, addressPrefix: 10.0.0.0/16, subnets: [ {{ name: s, addressPrefix: 10.0.0.0/29 }} ] }}
        vms:
          - {{ name: vm, nic: {{ subnet: v/s, networkSecurityGroup: open }}, faults: [{faults}] }}
"#
        );
        World::new(&Scenario::from_yaml(&yaml).unwrap()).unwrap()
    }

    #[test]
    fn behaviour_follows_fault_precedence() {
        assert_eq!(
            world("").behaviour("vm"),
            Behaviour::Healthy {
                expired_certificate: false
            }
        );
        assert_eq!(
            world("tls_disabled, rdp_disabled").behaviour("vm"),
            Behaviour::Refuse
        );
        assert_eq!(world("tls_disabled").behaviour("vm"), Behaviour::TlsAlert);
        assert_eq!(
            world("nsg_blocking, tls_disabled").behaviour("vm"),
            Behaviour::Silent
        );
        assert_eq!(world("host_failure").behaviour("vm"), Behaviour::Silent);
        assert_eq!(
            world("vm_stopped, host_failure").behaviour("vm"),
            Behaviour::Refuse
        );
        let mut w = world("nsg_blocking");
        assert!(w.clear("vm", Fault::NsgBlocking));
        assert!(matches!(w.behaviour("vm"), Behaviour::Healthy { .. }));
    }

    #[test]
    fn addresses_skip_reserved_and_used_ones() {
        let w = world("");
        let vnet = key("s", "rg", "v");
        // A /29 has 8 addresses: .0-.3 and .7 are reserved, the VM took .4.
        assert_eq!(
            w.free_addresses(&vnet, "s", 10),
            vec![Ipv4Addr::new(10, 0, 0, 5), Ipv4Addr::new(10, 0, 0, 6)]
        );
        assert!(!w.address_free(&vnet, "s", Ipv4Addr::new(10, 0, 0, 4)));
        assert!(!w.address_free(&vnet, "s", Ipv4Addr::new(10, 0, 0, 7)));
        assert!(!w.address_free(&vnet, "s", Ipv4Addr::new(10, 0, 1, 5)));
    }
}
