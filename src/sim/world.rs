//! The simulated estate: resources, faults, operations in flight, counters.
//! Plain data behind one mutex; nothing here awaits.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::Ipv4Addr,
};

use serde_json::Value;
use tokio::time::Instant;

use super::{
    fault::{Behaviour, Fault},
    scenario::{Access, Direction, OpKind, Scenario, Timing, parse_cidr},
};
use crate::{
    azure::{
        limiter::{BucketShape, OpClass, TokenBucket},
        model::{NsgRules, RuleProtocol, SecurityRule},
        nsg::{self, Flow},
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
#[derive(Debug)]
pub struct Subscription {
    /// Id as declared.
    pub id: String,
    /// Regions with a Network Watcher (lower case).
    pub watchers: Vec<String>,
    /// Read bucket.
    pub reads: TokenBucket,
    /// Write bucket.
    pub writes: TokenBucket,
}

/// A VMAccess extension.
#[derive(Debug, Clone)]
pub struct Extension {
    /// Name.
    pub name: String,
    /// Last `forceUpdateTag`.
    pub force_update_tag: Option<String>,
    /// `Creating`, `Updating`, `Succeeded`, `Failed`.
    pub provisioning_state: String,
    /// Public settings as sent.
    pub settings: Value,
    /// The agent's last message.
    pub message: String,
    /// An update is running.
    pub busy: bool,
}

/// A VM.
#[derive(Debug, Clone)]
pub struct Vm {
    /// Subscription id.
    pub sub: String,
    /// Resource group.
    pub rg: String,
    /// Name.
    pub name: String,
    /// Region.
    pub location: String,
    /// VM id (GUID-like).
    pub vm_id: String,
    /// Its NIC's key.
    pub nic: String,
    /// Whether the agent is configured to report Ready.
    pub agent_configured: bool,
    /// Boot diagnostics enabled.
    pub boot_diagnostics: bool,
    /// Local administrator.
    pub admin_user: String,
    /// Current faults.
    pub faults: BTreeSet<Fault>,
    /// The guest's registry (the keys the RDP guides read and change).
    pub registry: crate::sim::registry::Registry,
    /// The VMAccessAgent extension, once one exists.
    pub extension: Option<Extension>,
    /// A compute operation (restart, redeploy, start, extension) is running.
    pub busy: bool,
    /// The running power operation (restart, redeploy, start), which a newer one preempts.
    pub power_op: Option<String>,
    /// A Run Command is running.
    pub run_command_busy: bool,
    /// Rebooting: connections are refused.
    pub rebooting: bool,
    /// Incremented on every reboot; open connections of an older boot are dropped.
    pub boot: u64,
    /// An applied repair declared `restart=required`: its registry changes take effect at the
    /// next boot (SCHANNEL and the listener read them then), so until then the faults stay
    /// and are not written back into the registry.
    pub restart_pending: bool,
    /// Thumbprints of the certificates in `LocalMachine\My` (custom RDP certificates).
    pub certificates: BTreeSet<String>,
    /// The responder's loopback port.
    pub port: u16,
    /// Connections accepted (drives flapping).
    pub connections: u64,
    /// Password resets applied (the passwords themselves are never kept).
    pub password_resets: u32,
    /// SHA-256 (hex) of the password set by the last successful reset.
    pub password_sha256: Option<String>,
    /// Secret part of the serial log blob URL.
    pub blob_sig: String,
    /// The computer name of another machine answering on this VM's address, if any.
    pub answers_as: Option<String>,
}

impl Vm {
    /// ARM id.
    pub fn id(&self) -> String {
        format!(
            "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Compute/virtualMachines/{}",
            self.sub, self.rg, self.name
        )
    }

    /// Running (not deallocated).
    pub fn running(&self) -> bool {
        !self.faults.contains(&Fault::VmStopped)
    }

    /// Whether the VM agent reports Ready now.
    pub fn agent_ready(&self) -> bool {
        self.agent_configured
            && self.running()
            && !self.rebooting
            && !self.faults.contains(&Fault::HostFailure)
            && !self.faults.contains(&Fault::NicBroken)
    }
}

/// A NIC.
#[derive(Debug, Clone)]
pub struct Nic {
    /// Subscription.
    pub sub: String,
    /// Resource group.
    pub rg: String,
    /// Name.
    pub name: String,
    /// Region.
    pub location: String,
    /// Owning VM name.
    pub vm: String,
    /// Private IP.
    pub private_ip: Ipv4Addr,
    /// Static allocation.
    pub static_ip: bool,
    /// Key of its virtual network.
    pub vnet: String,
    /// Subnet name.
    pub subnet: String,
    /// NIC-level NSG key.
    pub nsg: Option<String>,
    /// Public IP key.
    pub pip: Option<String>,
    /// An update is running.
    pub busy: bool,
    /// MAC address (changes on reset).
    pub mac: String,
}

impl Nic {
    /// ARM id.
    pub fn id(&self) -> String {
        format!(
            "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Network/networkInterfaces/{}",
            self.sub, self.rg, self.name
        )
    }
}

/// An NSG.
#[derive(Debug, Clone)]
pub struct Nsg {
    /// Subscription.
    pub sub: String,
    /// Resource group.
    pub rg: String,
    /// Name.
    pub name: String,
    /// Region.
    pub location: String,
    /// Custom rules.
    pub rules: Vec<SecurityRule>,
    /// A rule change is running.
    pub busy: bool,
}

impl Nsg {
    /// ARM id.
    pub fn id(&self) -> String {
        format!(
            "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Network/networkSecurityGroups/{}",
            self.sub, self.rg, self.name
        )
    }

    /// Custom rules then defaults, for evaluation.
    pub fn all_rules(&self) -> NsgRules {
        let mut rules = self.rules.clone();
        rules.extend(nsg::default_rules());
        NsgRules {
            id: self.id(),
            rules,
        }
    }
}

/// A subnet.
#[derive(Debug, Clone)]
pub struct Subnet {
    /// Name.
    pub name: String,
    /// Network address and prefix length.
    pub prefix: (Ipv4Addr, u32),
    /// NSG key.
    pub nsg: Option<String>,
}

/// A virtual network.
#[derive(Debug, Clone)]
pub struct Vnet {
    /// Subscription.
    pub sub: String,
    /// Resource group.
    pub rg: String,
    /// Name.
    pub name: String,
    /// Region.
    pub location: String,
    /// Address space.
    pub prefix: String,
    /// Subnets.
    pub subnets: Vec<Subnet>,
}

impl Vnet {
    /// ARM id.
    pub fn id(&self) -> String {
        format!(
            "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Network/virtualNetworks/{}",
            self.sub, self.rg, self.name
        )
    }
}

/// A public IP.
#[derive(Debug, Clone)]
pub struct PublicIp {
    /// Subscription.
    pub sub: String,
    /// Resource group.
    pub rg: String,
    /// Name.
    pub name: String,
    /// Region.
    pub location: String,
    /// Address (documentation ranges; redeploy changes it).
    pub address: Ipv4Addr,
}

/// Status of an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpStatus {
    /// Running.
    InProgress,
    /// Done.
    Succeeded,
    /// Failed.
    Failed,
    /// Preempted by a newer operation on the same resource (`OperationPreempted`).
    Canceled,
}

/// A long-running operation.
#[derive(Debug, Clone)]
pub struct Op {
    /// Its id.
    pub id: String,
    /// `Microsoft.Compute` or `Microsoft.Network`.
    pub provider: &'static str,
    /// Subscription.
    pub sub: String,
    /// Region.
    pub location: String,
    /// Status.
    pub status: OpStatus,
    /// Error code and message when failed.
    pub error: Option<(String, String)>,
    /// Result body served from the Location URL.
    pub result: Option<Value>,
    /// Start time (RFC 3339).
    pub started: String,
    /// The `Retry-After` its responses suggest.
    pub retry_after: std::time::Duration,
}

/// A scripted HTTP failure for the next matching requests.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpFault {
    /// Operation name as counted (e.g. `vm.restart`).
    pub operation: String,
    /// Status to answer (429, 500, 503, 409…).
    pub status: u16,
    /// `Retry-After` seconds to send.
    #[serde(default)]
    pub retry_after: Option<u64>,
    /// The ARM error code (`RetryableErrorDueToAnotherOperation`, `OperationNotAllowed`…);
    /// by default one that fits the status.
    #[serde(default)]
    pub code: Option<String>,
    /// How many requests it applies to.
    #[serde(default = "one")]
    pub count: u32,
}

fn one() -> u32 {
    1
}

/// What the token endpoint saw (fingerprints only; assertions are secrets).
#[derive(Debug, Clone, Default, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenLog {
    /// Exchanges answered.
    pub count: u64,
    /// A short SHA-256 fingerprint of each client assertion or secret, in order.
    pub credential_fingerprints: Vec<String>,
    /// Each issued access token: when it expires and for which client ID.
    #[serde(skip)]
    pub issued: std::collections::HashMap<String, Issued>,
    /// Requests refused because their token had expired.
    pub expired_rejections: u64,
    /// ARM requests that carried a bearer token, by the client ID the token was issued to
    /// (`unissued` for a token this emulator did not issue, such as a fixed test token), then
    /// by subscription (lower case; empty for a path without one).
    pub arm_requests_by_client:
        std::collections::BTreeMap<String, std::collections::BTreeMap<String, u64>>,
}

/// An access token the emulator issued.
#[derive(Debug, Clone)]
pub struct Issued {
    /// Expiry (Unix seconds).
    pub exp: u64,
    /// The client ID it was issued to.
    pub client_id: String,
}

/// The key of [`TokenLog::arm_requests_by_client`] for tokens the emulator did not issue.
pub const UNISSUED: &str = "unissued";

impl TokenLog {
    /// Counts one ARM request made with `bearer` for `subscription`.
    pub fn count_request(&mut self, bearer: &str, subscription: &str) {
        let client = self
            .issued
            .get(bearer)
            .map_or(UNISSUED, |i| i.client_id.as_str())
            .to_string();
        *self
            .arm_requests_by_client
            .entry(client)
            .or_default()
            .entry(subscription.to_ascii_lowercase())
            .or_default() += 1;
    }

    /// ARM requests made as `client_id` (any subscription).
    pub fn requests_as(&self, client_id: &str) -> u64 {
        self.arm_requests_by_client
            .get(client_id)
            .map_or(0, |by_sub| by_sub.values().sum())
    }
}

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

    fn add_vm(
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
                if let Some(n) = self.nics.get_mut(&vm_key_nic(vm)) {
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
        (4..size.saturating_sub(1))
            .map(|i| Ipv4Addr::from(base.wrapping_add(i as u32)))
            .filter(|ip| self.address_free(vnet_key, subnet, *ip))
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

fn vm_key_nic(vm: &Vm) -> String {
    vm.nic.clone()
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

#[cfg(test)]
mod tests {
    use super::*;

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
