//! The simulated world: its construction from a scenario, the counters, tokens and draws of
//! realistic durations. Plain data behind one mutex; nothing here awaits. The resources are
//! in `resources`, what the estate looks like from outside in `estate`.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::Ipv4Addr,
};

use serde_json::Value;
use tokio::time::Instant;

pub use super::resources::*;
use super::{
    fault::Fault,
    scenario::{Access, Direction, OpKind, Scenario, Timing, parse_cidr},
};
use crate::{
    azure::{
        limiter::{BucketShape, OpClass, TokenBucket},
        model::{RuleProtocol, SecurityRule},
    },
    evidence::nsg as nsg_eval,
};

/// How many write requests the emulator remembers in order.
pub const WRITE_LOG_LIMIT: usize = 10_000;

/// The name of the rule the `nsg_blocking` fault adds.
pub const BLOCKING_RULE: &str = "sim-deny-rdp";

/// Lower-cased `sub/rg/name`, the key of every resource map.
pub fn key(sub: &str, rg: &str, name: &str) -> String {
    format!("{sub}/{rg}/{name}").to_ascii_lowercase()
}

/// A subscription's buckets.
/// The whole simulated state.
#[derive(Debug)]
pub struct World {
    /// Durations.
    pub timing: Timing,
    /// Client address NSGs are evaluated for.
    pub probe_source: Ipv4Addr,
    /// What address tags mean to Azure, including the scenario's service tags.
    pub network: nsg_eval::NetworkContext,
    /// Subscriptions by lower-case id.
    pub subs: BTreeMap<String, Subscription>,
    /// VMs by lower-case name.
    pub vms: BTreeMap<String, Vm>,
    /// NICs by key.
    pub nics: BTreeMap<String, Nic>,
    /// NSGs by key.
    pub nsgs: BTreeMap<String, Nsg>,
    /// Virtual networks by key.
    pub vnets: BTreeMap<String, Vnet>,
    /// Public IPs by key.
    pub pips: BTreeMap<String, PublicIp>,
    /// Operations by id.
    pub ops: HashMap<String, Op>,
    /// Requests by operation name.
    pub counters: BTreeMap<String, u64>,
    /// Accepted Run Commands that were the operator's read-only evidence query (counted in
    /// `vm.runcommand` too).
    pub guest_queries: u64,
    /// Scripted HTTP failures.
    pub http_faults: Vec<HttpFault>,
    /// Requests that are carried out but whose response is held back this long, so the
    /// caller times out without learning the outcome (by operation name, each used once).
    pub dropped_responses: Vec<(String, std::time::Duration)>,
    /// Token endpoint log.
    pub tokens: TokenLog,
    /// Snapshots by key.
    pub snapshots: BTreeMap<String, super::disk::Snapshot>,
    /// Names of the last write requests (PUT, POST, DELETE, PATCH), oldest first, bounded.
    pub writes: std::collections::VecDeque<String>,
    /// Resource Graph's per-caller request quota.
    pub graph_quota: super::membership::GraphQuota,
    /// Each caller's current Resource Graph window, by fingerprint of its token.
    pub graph_windows: HashMap<u64, super::membership::GraphWindow>,
    /// Draws of realistic durations so far, by kind and resource (the `n` of each draw).
    draws: HashMap<String, u64>,
    next_id: u64,
    next_public: u32,
}

/// The private ranges plus the scenario's service tags (validated CIDRs).
fn network_context(s: &Scenario) -> nsg_eval::NetworkContext {
    let mut ctx = nsg_eval::NetworkContext::private_ranges();
    for (tag, ranges) in &s.service_tags {
        ctx.service_tags.insert(
            tag.to_ascii_lowercase(),
            ranges.iter().filter_map(|r| r.parse().ok()).collect(),
        );
    }
    ctx
}

/// Builds a rule of the scenario.
fn rule_of(r: &super::scenario::RuleSpec) -> SecurityRule {
    SecurityRule {
        name: r.name.clone(),
        priority: r.priority,
        inbound: r.direction == Direction::Inbound,
        allow: r.access == Access::Allow,
        protocol: RuleProtocol::parse(&r.protocol),
        source_prefixes: vec![r.source.clone()],
        destination_prefixes: vec![r.destination.clone()],
        destination_ports: vec![r.destination_port.clone()],
        default_rule: false,
    }
}

impl World {
    /// Builds the world of a validated scenario; ports are filled in by the responders.
    pub fn new(s: &Scenario) -> Result<Self, super::SimError> {
        let mut w = World {
            timing: s.timing.clone(),
            probe_source: s.probe_source,
            network: network_context(s),
            subs: BTreeMap::new(),
            vms: BTreeMap::new(),
            nics: BTreeMap::new(),
            nsgs: BTreeMap::new(),
            vnets: BTreeMap::new(),
            pips: BTreeMap::new(),
            ops: HashMap::new(),
            counters: BTreeMap::new(),
            guest_queries: 0,
            http_faults: Vec::new(),
            dropped_responses: Vec::new(),
            tokens: TokenLog::default(),
            snapshots: BTreeMap::new(),
            writes: std::collections::VecDeque::new(),
            graph_quota: Default::default(),
            graph_windows: HashMap::new(),
            draws: HashMap::new(),
            next_id: 0,
            next_public: 0,
        };
        let shape = |b: super::scenario::Bucket| BucketShape {
            burst: f64::from(b.burst),
            per_second: b.per_second,
        };
        for sub in &s.subscriptions {
            w.subs.insert(
                sub.id.to_ascii_lowercase(),
                Subscription {
                    id: sub.id.clone(),
                    watchers: sub
                        .network_watchers
                        .iter()
                        .map(|r| r.to_ascii_lowercase())
                        .collect(),
                    reads: TokenBucket::new(shape(s.throttle.reads)),
                    writes: TokenBucket::new(shape(s.throttle.writes)),
                },
            );
            for rg in &sub.resource_groups {
                let loc = rg.location.clone();
                for n in &rg.network_security_groups {
                    w.nsgs.insert(
                        key(&sub.id, &rg.name, &n.name),
                        Nsg {
                            sub: sub.id.clone(),
                            rg: rg.name.clone(),
                            name: n.name.clone(),
                            location: loc.clone(),
                            rules: n.rules.iter().map(rule_of).collect(),
                            busy: false,
                        },
                    );
                }
                for v in &rg.virtual_networks {
                    let subnets = v
                        .subnets
                        .iter()
                        .map(|sn| {
                            Ok(Subnet {
                                name: sn.name.clone(),
                                prefix: parse_cidr(&sn.address_prefix).ok_or_else(|| {
                                    super::SimError::Scenario(format!(
                                        "bad prefix {}",
                                        sn.address_prefix
                                    ))
                                })?,
                                nsg: sn
                                    .network_security_group
                                    .as_ref()
                                    .map(|n| key(&sub.id, &rg.name, n)),
                            })
                        })
                        .collect::<Result<Vec<_>, super::SimError>>()?;
                    w.vnets.insert(
                        key(&sub.id, &rg.name, &v.name),
                        Vnet {
                            sub: sub.id.clone(),
                            rg: rg.name.clone(),
                            name: v.name.clone(),
                            location: loc.clone(),
                            prefix: v.address_prefix.clone(),
                            subnets,
                        },
                    );
                }
                for vm in &rg.vms {
                    w.add_vm(&sub.id, &rg.name, &loc, vm)?;
                }
            }
        }
        Ok(w)
    }

    pub(super) fn add_vm(
        &mut self,
        sub: &str,
        rg: &str,
        loc: &str,
        spec: &super::scenario::VmSpec,
    ) -> Result<(), super::SimError> {
        let nic_name = spec
            .nic
            .name
            .clone()
            .unwrap_or_else(|| format!("{}-nic", spec.name));
        let (vnet_name, subnet_name) =
            spec.nic.subnet.split_once('/').ok_or_else(|| {
                super::SimError::Scenario(format!("VM {}: bad subnet", spec.name))
            })?;
        let vnet_key = key(sub, rg, vnet_name);
        let subnet = self
            .vnets
            .get(&vnet_key)
            .and_then(|v| {
                v.subnets
                    .iter()
                    .find(|s| s.name.eq_ignore_ascii_case(subnet_name))
            })
            .cloned()
            .ok_or_else(|| {
                super::SimError::Scenario(format!("VM {}: unknown subnet", spec.name))
            })?;
        let private_ip = match spec.nic.private_ip {
            Some(ip) => ip,
            None => self
                .free_addresses(&vnet_key, &subnet.name, 1)
                .into_iter()
                .next()
                .ok_or_else(|| {
                    super::SimError::Scenario(format!("VM {}: subnet is full", spec.name))
                })?,
        };
        let pip = if spec.nic.public_ip {
            let name = format!("{}-ip", spec.name);
            let address = self.next_public_address();
            self.pips.insert(
                key(sub, rg, &name),
                PublicIp {
                    sub: sub.to_owned(),
                    rg: rg.to_owned(),
                    name: name.clone(),
                    location: loc.to_owned(),
                    address,
                },
            );
            Some(key(sub, rg, &name))
        } else {
            None
        };
        self.next_id += 1;
        let nic_key = key(sub, rg, &nic_name);
        self.nics.insert(
            nic_key.clone(),
            Nic {
                sub: sub.to_owned(),
                rg: rg.to_owned(),
                name: nic_name,
                location: loc.to_owned(),
                vm: spec.name.clone(),
                private_ip,
                static_ip: spec.nic.private_ip.is_some(),
                vnet: vnet_key,
                subnet: subnet.name.clone(),
                nsg: spec
                    .nic
                    .network_security_group
                    .as_ref()
                    .map(|n| key(sub, rg, n)),
                pip,
                busy: false,
                mac: mac(self.next_id),
            },
        );
        let extension = spec.vm_access_extension.as_ref().map(|name| Extension {
            name: name.clone(),
            force_update_tag: None,
            provisioning_state: "Succeeded".to_owned(),
            settings: Value::Object(Default::default()),
            message: "Enable succeeded".to_owned(),
            busy: false,
        });
        let n = self.next_id;
        let mut vm = Vm {
            sub: sub.to_owned(),
            rg: rg.to_owned(),
            name: spec.name.clone(),
            location: loc.to_owned(),
            vm_id: format!("5e1f0000-0000-4000-8000-{n:012x}"),
            nic: nic_key,
            agent_configured: spec.agent_ready,
            boot_diagnostics: spec.boot_diagnostics,
            admin_user: spec.admin_user.clone(),
            faults: BTreeSet::new(),
            registry: crate::sim::registry::Registry::windows_default(3389),
            extension,
            busy: false,
            power_op: None,
            run_command_busy: false,
            rebooting: false,
            boot: 0,
            restart_pending: false,
            certificates: BTreeSet::new(),
            port: 0,
            connections: 0,
            password_resets: 0,
            password_sha256: None,
            blob_sig: format!(
                "{:016x}",
                fingerprint_u64(&format!("{sub}/{rg}/{}/{n}", spec.name))
            ),
            answers_as: spec.answers_as.clone(),
            tags: spec.tags.clone(),
            os_type: spec.os_type.clone(),
        };
        let name = vm.name.to_ascii_lowercase();
        for f in &spec.faults {
            vm.faults.insert(*f);
        }
        crate::sim::guest::show_faults(&mut vm);
        let blocking = vm.faults.contains(&Fault::NsgBlocking);
        self.vms.insert(name.clone(), vm);
        if blocking {
            self.set_nsg_block(&name, true);
        }
        Ok(())
    }

    /// How long the next operation of `kind` on `resource` takes on the wall clock.
    pub fn next_duration(&mut self, kind: OpKind, resource: &str) -> std::time::Duration {
        let n = self.count_draw(&format!("{kind:?}/{resource}"));
        self.timing.duration(kind, resource, n)
    }

    /// The `Retry-After` of the next operation on `resource`.
    pub fn next_retry_after(&mut self, resource: &str) -> std::time::Duration {
        let n = self.count_draw(&format!("retryAfter/{resource}"));
        self.timing.retry_after(resource, n)
    }

    fn count_draw(&mut self, key: &str) -> u64 {
        let n = self.draws.entry(key.to_ascii_lowercase()).or_insert(0);
        *n += 1;
        *n - 1
    }

    /// A fresh id for an operation.
    pub fn new_id(&mut self) -> String {
        self.next_id += 1;
        format!("{:08x}-5151-4a11-8000-{:012x}", self.next_id, self.next_id)
    }

    fn next_public_address(&mut self) -> Ipv4Addr {
        self.next_public += 1;
        let n = self.next_public;
        // 198.51.100.0/24 then 203.0.113.0/24: documentation ranges, never routed.
        if n < 250 {
            Ipv4Addr::new(198, 51, 100, n as u8 + 1)
        } else {
            Ipv4Addr::new(192, 0, 2, ((n - 250) % 250) as u8 + 1)
        }
    }

    /// Remembers a write request of `op`, in order (the last [`WRITE_LOG_LIMIT`]).
    pub fn log_write(&mut self, op: &str) {
        if self.writes.len() >= WRITE_LOG_LIMIT {
            self.writes.pop_front();
        }
        self.writes.push_back(op.to_owned());
    }

    /// Counts one request of `op`.
    pub fn count(&mut self, op: &str) {
        *self.counters.entry(op.to_owned()).or_insert(0) += 1;
    }

    /// Takes a token of `class` from the subscription's bucket; `Err(wait)` when empty.
    pub fn take_token(
        &mut self,
        sub: &str,
        class: OpClass,
    ) -> Result<(u32, u32), std::time::Duration> {
        let now = Instant::now();
        let Some(s) = self.subs.get_mut(&sub.to_ascii_lowercase()) else {
            return Ok((0, 0));
        };
        match class {
            OpClass::Read => s.reads.try_take(now)?,
            OpClass::Write => s.writes.try_take(now)?,
        }
        Ok((s.reads.remaining(now), s.writes.remaining(now)))
    }

    /// A held-back response for `op`, consumed.
    pub fn take_dropped_response(&mut self, op: &str) -> Option<std::time::Duration> {
        let i = self.dropped_responses.iter().position(|(o, _)| o == op)?;
        Some(self.dropped_responses.remove(i).1)
    }

    /// A scripted failure for `op`, consumed.
    pub fn take_http_fault(&mut self, op: &str) -> Option<HttpFault> {
        let i = self
            .http_faults
            .iter()
            .position(|f| f.operation == op && f.count > 0)?;
        let f = self.http_faults[i].clone();
        self.http_faults[i].count -= 1;
        if self.http_faults[i].count == 0 {
            self.http_faults.remove(i);
        }
        Some(f)
    }

    /// The VM by name (case-insensitive) within `sub`/`rg`.
    pub fn vm(&self, sub: &str, rg: &str, name: &str) -> Option<&Vm> {
        self.vms
            .get(&name.to_ascii_lowercase())
            .filter(|v| v.sub.eq_ignore_ascii_case(sub) && v.rg.eq_ignore_ascii_case(rg))
    }

    /// Mutable VM by name within `sub`/`rg`.
    pub fn vm_mut(&mut self, sub: &str, rg: &str, name: &str) -> Option<&mut Vm> {
        self.vms
            .get_mut(&name.to_ascii_lowercase())
            .filter(|v| v.sub.eq_ignore_ascii_case(sub) && v.rg.eq_ignore_ascii_case(rg))
    }
}

/// The canonical good RDP rule.
pub fn allow_rdp() -> SecurityRule {
    SecurityRule {
        name: "allow-rdp".to_owned(),
        priority: 1000,
        inbound: true,
        allow: true,
        protocol: RuleProtocol::Tcp,
        source_prefixes: vec!["*".to_owned()],
        destination_prefixes: vec!["*".to_owned()],
        destination_ports: vec!["3389".to_owned()],
        default_rule: false,
    }
}

fn mac(n: u64) -> String {
    let b = n.to_be_bytes();
    format!("00-0D-3A-{:02X}-{:02X}-{:02X}", b[5], b[6], b[7])
}

/// A short non-cryptographic fingerprint for ids.
pub fn fingerprint_u64(s: &str) -> u64 {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(s.as_bytes());
    u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
}
