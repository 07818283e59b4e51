//! A fleet member's state in memory, membership changes from a discovery, and the tally the
//! fleet's status reports. Pure: no clock reads, no I/O.

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::jiff::Timestamp;

use crate::{
    api::{
        AddressType, EndpointSource, IdentityStatus, MemberSummary, ResolvedEndpoint, SkippedMember,
    },
    azure::DiscoveredVm,
    engine::{Status, Streak, Thresholds, thresholds::reachable_after},
};

/// At most this many members in the status's `worst` and `skippedMembers` lists.
pub const LIST_LIMIT: usize = 10;

/// Who watches a VM besides this fleet's in-memory probing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Watcher {
    /// Nobody: the fleet probes it in memory.
    Fleet,
    /// This fleet's incident object `name` (same namespace as the fleet).
    Incident(String),
    /// Another object (hand-written, or another fleet's incident): `namespace/name`. The
    /// explicit object wins; the fleet leaves the VM alone.
    Other(String),
}

/// One member: the VM as discovered, and what the fleet's probes found.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    /// The VM, as the last discovery found it.
    pub vm: DiscoveredVm,
    /// Consecutive outcomes of the fleet's probes.
    pub streak: Streak,
    /// Reachable, judged with the template's thresholds (Unknown until judged).
    pub reachable: Status,
    /// The last failure reason (PascalCase), while the last probe failed.
    pub reason: Option<String>,
    /// When the current state began (first failure of the streak, or the turn to
    /// unreachable); `None` while healthy.
    pub since: Option<Timestamp>,
    /// Who else watches it.
    pub watcher: Watcher,
    /// Bumped whenever the member's schedule must restart (address changed, incident closed):
    /// queue entries with another epoch are stale.
    pub epoch: u64,
    /// The last probes' results, newest in the lowest bit (1 reachable), and how many.
    recent: u32,
    recent_len: u8,
    /// The last probe saw an expired certificate.
    pub certificate_expired: bool,
    /// Whom the endpoint answered as at the last identity step (as an object's
    /// `status.identity`): the step runs on the first probe, when the address changes, every
    /// `identityCheckInterval`, and on every probe while it answered as another computer.
    pub identity: Option<Box<IdentityStatus>>,
}

/// Why a member needs an incident object: what the ladder acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trouble {
    /// Unreachable (failures reached the threshold).
    Unreachable,
    /// Reachable, but the probes keep flipping (frequent disconnects).
    Flapping,
    /// Reachable with an expired certificate.
    CertificateExpired,
}

impl Trouble {
    /// For the fleet's Event.
    pub fn describe(self) -> &'static str {
        match self {
            Self::Unreachable => "unreachable",
            Self::Flapping => "flapping (frequent disconnects)",
            Self::CertificateExpired => "serving an expired certificate",
        }
    }
}

/// What one probe changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turn {
    /// Nothing that needs an action.
    None,
    /// Failures reached the threshold: the member is unreachable (an incident opens).
    Unreachable,
    /// An unreachable member answered `successThreshold` times in a row.
    Recovered,
}

impl Member {
    /// A newly discovered member, not judged yet.
    pub fn new(vm: DiscoveredVm) -> Self {
        Self {
            vm,
            streak: Streak::default(),
            reachable: Status::Unknown,
            reason: None,
            since: None,
            watcher: Watcher::Fleet,
            epoch: 0,
            recent: 0,
            recent_len: 0,
            certificate_expired: false,
            identity: None,
        }
    }

    /// The last probes as the status's `recentProbes` writes them (oldest first).
    pub fn recent_probes(&self) -> String {
        (0..self.recent_len)
            .rev()
            .map(|i| if self.recent >> i & 1 == 1 { '1' } else { '0' })
            .collect()
    }

    /// What the ladder would act on, if anything: an incident object is due.
    pub fn trouble(&self) -> Option<Trouble> {
        if self.reachable == Status::False {
            Some(Trouble::Unreachable)
        } else if crate::engine::remediate::flapping(&self.recent_probes()) {
            Some(Trouble::Flapping)
        } else if self.certificate_expired {
            Some(Trouble::CertificateExpired)
        } else {
            None
        }
    }

    /// The address to probe, when discovery found one of that type.
    pub fn address(&self, address_type: AddressType) -> Option<std::net::IpAddr> {
        match address_type {
            AddressType::Public => self.vm.public_ip,
            AddressType::Private => self.vm.private_ip,
        }
    }

    /// The endpoint probed at `port` over the address of `address_type`, with the computer
    /// name it must answer as.
    pub fn endpoint(&self, address_type: AddressType, port: u16) -> Option<ResolvedEndpoint> {
        Some(ResolvedEndpoint {
            host: self.address(address_type)?.to_string(),
            port,
            source: EndpointSource::Azure,
            computer_name: self.vm.computer_name.clone(),
        })
    }

    /// Records one probe's verdict (`reason` is the failure reason when it failed). A probe
    /// that failed on the prober's side is not a verdict: callers do not pass it here.
    pub fn record(
        &mut self,
        reachable: bool,
        reason: Option<String>,
        thresholds: Thresholds,
        now: Timestamp,
    ) -> Turn {
        let before = self.reachable;
        self.recent = (self.recent << 1) | u32::from(reachable);
        self.recent_len = (self.recent_len + 1).min(20);
        self.streak = self.streak.after(reachable);
        self.reachable = reachable_after(before, self.streak, thresholds);
        if reachable {
            self.reason = None;
        } else {
            self.reason = reason;
        }
        match (before, self.reachable) {
            (Status::False, Status::False) => {}
            (_, Status::False) => {
                self.since = Some(now);
                return Turn::Unreachable;
            }
            (Status::False, _) => {
                self.since = None;
                return Turn::Recovered;
            }
            _ => {}
        }
        if reachable {
            self.since = None;
        } else if self.streak.failures == 1 {
            self.since = Some(now);
        }
        Turn::None
    }

    /// Forgets the probes' verdict (after an incident object closed, the fleet starts over).
    pub fn reset(&mut self) {
        self.recent = 0;
        self.recent_len = 0;
        self.certificate_expired = false;
        self.identity = None;
        self.streak = Streak::default();
        self.reachable = Status::Unknown;
        self.reason = None;
        self.since = None;
        self.epoch += 1;
    }
}

/// The membership key of a VM: its resource id, lowercased (ARM ids are case-insensitive).
pub fn member_key(vm: &DiscoveredVm) -> String {
    vm.vm.id().to_ascii_lowercase()
}

/// What a discovery changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// Keys of VMs that joined.
    pub added: Vec<String>,
    /// Keys of VMs that left (deleted in Azure, or no longer selected).
    pub removed: Vec<String>,
    /// Keys of VMs whose addresses changed: their probes start over.
    pub readdressed: Vec<String>,
}

/// Applies a complete discovery to `members`: new VMs join, missing ones leave, a changed
/// address restarts a member's judgement (the old verdict was about another address).
pub fn apply_discovery(
    members: &mut BTreeMap<String, Member>,
    discovered: Vec<DiscoveredVm>,
) -> Changes {
    let mut changes = Changes::default();
    let mut seen: HashMap<String, DiscoveredVm> = HashMap::with_capacity(discovered.len());
    for vm in discovered {
        seen.insert(member_key(&vm), vm);
    }
    members.retain(|key, _| {
        let keep = seen.contains_key(key);
        if !keep {
            changes.removed.push(key.clone());
        }
        keep
    });
    for (key, vm) in seen {
        match members.get_mut(&key) {
            Some(member) => {
                let moved =
                    member.vm.public_ip != vm.public_ip || member.vm.private_ip != vm.private_ip;
                let renamed = member.vm.computer_name != vm.computer_name;
                member.vm = vm;
                if moved {
                    member.reset();
                    changes.readdressed.push(key);
                } else if renamed {
                    // Whom the endpoint must answer as changed: asked again at the next probe.
                    member.identity = None;
                }
            }
            None => {
                members.insert(key.clone(), Member::new(vm));
                changes.added.push(key);
            }
        }
    }
    changes.added.sort();
    changes.readdressed.sort();
    changes
}

/// Counts for the fleet's status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tally {
    /// Every member.
    pub members: u32,
    /// Judged reachable (by the fleet, or by its incident object).
    pub reachable: u32,
    /// Judged unreachable (by the fleet, or by its incident object).
    pub unreachable: u32,
    /// Not judged yet.
    pub pending: u32,
    /// With an incident object.
    pub incidents: u32,
    /// Watched by another object.
    pub skipped: u32,
    /// Members whose last probe failed, by reason.
    pub failures_by_reason: BTreeMap<String, u32>,
    /// The worst members, at most [`LIST_LIMIT`].
    pub worst: Vec<MemberSummary>,
    /// Some skipped members, at most [`LIST_LIMIT`].
    pub skipped_members: Vec<SkippedMember>,
}

impl Tally {
    /// The percentage of members judged unreachable (0 for an empty fleet).
    pub fn unreachable_percent(&self) -> u32 {
        (self.unreachable.saturating_mul(100))
            .checked_div(self.members)
            .unwrap_or(0)
    }
}

/// What an incident object says about its member (read from its status).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncidentView {
    /// Its `Reachable` condition.
    pub reachable: Status,
    /// Its `Reachable` reason, when False.
    pub reason: Option<String>,
    /// When `Reachable` last changed.
    pub since: Option<Timestamp>,
}

/// The fleet's counts, worst list and skipped list. `incidents` gives each incident object's
/// view, by object name.
pub fn tally(
    members: &BTreeMap<String, Member>,
    incidents: &HashMap<String, IncidentView>,
) -> Tally {
    let mut t = Tally {
        members: u32::try_from(members.len()).unwrap_or(u32::MAX),
        ..Tally::default()
    };
    let mut worst: Vec<(u8, Timestamp, u32, MemberSummary)> = Vec::new();
    for member in members.values() {
        let (reachable, reason, since, incident) = match &member.watcher {
            Watcher::Other(by) => {
                t.skipped += 1;
                if t.skipped_members.len() < LIST_LIMIT {
                    t.skipped_members.push(SkippedMember {
                        vm: member.vm.vm.name.clone(),
                        watched_by: by.clone(),
                    });
                }
                continue;
            }
            Watcher::Incident(name) => {
                t.incidents += 1;
                // Opened because the fleet found it unreachable: so it counts until its
                // object judges otherwise.
                match incidents.get(name) {
                    Some(view) if view.reachable != Status::Unknown => {
                        (view.reachable, view.reason.clone(), view.since, Some(name))
                    }
                    _ => (
                        Status::False,
                        member.reason.clone(),
                        member.since,
                        Some(name),
                    ),
                }
            }
            Watcher::Fleet => (member.reachable, member.reason.clone(), member.since, None),
        };
        match reachable {
            Status::True => t.reachable += 1,
            Status::False => t.unreachable += 1,
            Status::Unknown => t.pending += 1,
        }
        if let Some(r) = &reason {
            *t.failures_by_reason.entry(r.clone()).or_default() += 1;
        }
        let failing = reason.is_some() || reachable == Status::False;
        if failing {
            let (rank, state) = match (reachable, incident) {
                (Status::False, Some(_)) => (0, "Incident"),
                (Status::False, None) => (0, "Unreachable"),
                _ => (1, "Failing"),
            };
            let since = since.unwrap_or(Timestamp::MAX);
            worst.push((
                rank,
                since,
                member.streak.failures,
                MemberSummary {
                    vm: member.vm.vm.name.clone(),
                    resource_group: member.vm.vm.resource_group.clone(),
                    state: state.to_owned(),
                    reason,
                    consecutive_failures: member.streak.failures,
                    since: (since != Timestamp::MAX)
                        .then_some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(since)),
                    incident: incident.cloned(),
                },
            ));
        }
    }
    // Unreachable before failing; the longest-standing first; ties by name (stable output).
    worst.sort_by(|a, b| {
        (a.0, a.1, std::cmp::Reverse(a.2), &a.3.vm).cmp(&(
            b.0,
            b.1,
            std::cmp::Reverse(b.2),
            &b.3.vm,
        ))
    });
    t.worst = worst
        .into_iter()
        .take(LIST_LIMIT)
        .map(|(.., summary)| summary)
        .collect();
    t
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;
    use crate::azure::VmRef;

    const SUB: &str = "00000000-0000-0000-0000-000000000001";
    const TH: Thresholds = Thresholds {
        failure: 3,
        success: 2,
    };

    fn vm(name: &str, last: u8) -> DiscoveredVm {
        DiscoveredVm {
            vm: VmRef::new(SUB, "rg", name),
            location: "westeurope".into(),
            tags: BTreeMap::new(),
            power_state: None,
            computer_name: Some(name.into()),
            private_ip: Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, last))),
            public_ip: Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))),
        }
    }

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    #[test]
    fn failures_turn_unreachable_at_the_threshold_and_successes_recover_with_hysteresis() {
        let mut m = Member::new(vm("a", 1));
        assert_eq!(m.record(true, None, TH, at(0)), Turn::None);
        assert_eq!(m.reachable, Status::True);
        assert_eq!(
            m.record(false, Some("TcpTimeout".into()), TH, at(1)),
            Turn::None
        );
        assert_eq!(
            m.since,
            Some(at(1)),
            "a failing streak starts at its first failure"
        );
        assert_eq!(
            m.record(false, Some("TcpTimeout".into()), TH, at(2)),
            Turn::None
        );
        assert_eq!(m.reachable, Status::True);
        assert_eq!(
            m.record(false, Some("TcpTimeout".into()), TH, at(3)),
            Turn::Unreachable
        );
        assert_eq!(m.since, Some(at(3)));
        assert_eq!(
            m.record(false, Some("TcpTimeout".into()), TH, at(4)),
            Turn::None
        );
        assert_eq!(
            m.record(true, None, TH, at(5)),
            Turn::None,
            "one success is not enough"
        );
        assert_eq!(m.reachable, Status::False);
        assert_eq!(m.record(true, None, TH, at(6)), Turn::Recovered);
        assert_eq!(
            (m.reachable, m.since, m.reason.clone()),
            (Status::True, None, None)
        );
    }

    #[test]
    fn flapping_and_an_expired_certificate_are_trouble_too() {
        let mut m = Member::new(vm("a", 1));
        assert_eq!(m.trouble(), None);
        for (i, ok) in [true, false, true, false, true, false, true, true]
            .iter()
            .enumerate()
        {
            let reason = (!ok).then(|| "ConnectionClosed".to_owned());
            m.record(*ok, reason, TH, at(i as i64));
        }
        assert_eq!(m.recent_probes(), "10101011");
        assert_eq!(m.reachable, Status::True, "never three failures in a row");
        assert_eq!(m.trouble(), Some(Trouble::Flapping));
        let mut c = Member::new(vm("c", 3));
        c.record(true, None, TH, at(0));
        c.certificate_expired = true;
        assert_eq!(c.trouble(), Some(Trouble::CertificateExpired));
        for s in 1..=3 {
            c.record(false, Some("TcpTimeout".into()), TH, at(s));
        }
        assert_eq!(
            c.trouble(),
            Some(Trouble::Unreachable),
            "an outage comes first"
        );
        c.reset();
        assert_eq!((c.trouble(), c.recent_probes()), (None, String::new()));
    }

    #[test]
    fn a_failure_streak_interrupted_by_a_success_starts_over() {
        let mut m = Member::new(vm("a", 1));
        m.record(false, Some("TcpRefused".into()), TH, at(0));
        m.record(false, Some("TcpRefused".into()), TH, at(1));
        m.record(true, None, TH, at(2));
        m.record(false, Some("TcpRefused".into()), TH, at(3));
        assert_eq!(
            m.record(false, Some("TcpRefused".into()), TH, at(4)),
            Turn::None
        );
        assert_eq!(m.reachable, Status::True);
    }

    #[test]
    fn discovery_adds_removes_and_restarts_readdressed_members() {
        let mut members = BTreeMap::new();
        let c = apply_discovery(&mut members, vec![vm("a", 1), vm("b", 2)]);
        assert_eq!(c.added.len(), 2);
        let a = member_key(&vm("a", 1));
        for _ in 0..3 {
            members
                .get_mut(&a)
                .unwrap()
                .record(false, Some("TcpTimeout".into()), TH, at(0));
        }
        assert_eq!(members[&a].reachable, Status::False);
        // b leaves, c joins, a keeps its address: its verdict stays.
        let c = apply_discovery(&mut members, vec![vm("a", 1), vm("c", 3)]);
        assert_eq!(c.removed, vec![member_key(&vm("b", 2))]);
        assert_eq!(c.added, vec![member_key(&vm("c", 3))]);
        assert!(c.readdressed.is_empty());
        assert_eq!(members[&a].reachable, Status::False);
        // a's address changes: the old verdict was about another machine.
        let c = apply_discovery(&mut members, vec![vm("a", 9), vm("c", 3)]);
        assert_eq!(c.readdressed, vec![a.clone()]);
        assert_eq!(members[&a].reachable, Status::Unknown);
        assert_eq!(members[&a].epoch, 1);
    }

    #[test]
    fn keys_ignore_the_case_azure_spells_ids_in() {
        let mut upper = vm("Jump-01", 1);
        upper.vm.resource_group = "RG".into();
        let mut lower = vm("jump-01", 1);
        lower.vm.resource_group = "rg".into();
        assert_eq!(member_key(&upper), member_key(&lower));
    }

    #[test]
    fn the_tally_counts_each_member_once_and_lists_the_worst_first() {
        let mut members = BTreeMap::new();
        apply_discovery(
            &mut members,
            (1..=6).map(|i| vm(&format!("vm{i}"), i)).collect(),
        );
        let key = |i: u8| member_key(&vm(&format!("vm{i}"), i));
        members
            .get_mut(&key(1))
            .unwrap()
            .record(true, None, TH, at(0));
        for s in 0..3 {
            members.get_mut(&key(2)).unwrap().record(
                false,
                Some("TcpTimeout".into()),
                TH,
                at(10 + s),
            );
        }
        for s in 0..3 {
            members.get_mut(&key(3)).unwrap().record(
                false,
                Some("TcpRefused".into()),
                TH,
                at(5 + s),
            );
        }
        members
            .get_mut(&key(4))
            .unwrap()
            .record(false, Some("TcpTimeout".into()), TH, at(1));
        members.get_mut(&key(5)).unwrap().watcher = Watcher::Incident("fleet-vm5".into());
        members.get_mut(&key(6)).unwrap().watcher = Watcher::Other("ns/hand-written".into());
        let incidents = HashMap::from([(
            "fleet-vm5".to_owned(),
            IncidentView {
                reachable: Status::False,
                reason: Some("TcpRefused".into()),
                since: Some(at(2)),
            },
        )]);
        let t = tally(&members, &incidents);
        assert_eq!(
            (
                t.members,
                t.reachable,
                t.unreachable,
                t.pending,
                t.incidents,
                t.skipped
            ),
            (6, 1, 3, 1, 1, 1),
            "vm4 failed once: it is still judged by its earlier state (Unknown)"
        );
        assert_eq!(t.unreachable_percent(), 50);
        assert_eq!(t.failures_by_reason["TcpTimeout"], 2);
        assert_eq!(t.failures_by_reason["TcpRefused"], 2);
        let order: Vec<(&str, &str)> = t
            .worst
            .iter()
            .map(|w| (w.vm.as_str(), w.state.as_str()))
            .collect();
        assert_eq!(
            order,
            [
                ("vm5", "Incident"),
                ("vm3", "Unreachable"),
                ("vm2", "Unreachable"),
                ("vm4", "Failing")
            ]
        );
        assert_eq!(t.worst[0].incident.as_deref(), Some("fleet-vm5"));
        assert_eq!(t.skipped_members[0].watched_by, "ns/hand-written");
    }

    #[test]
    fn the_lists_are_bounded() {
        let mut members = BTreeMap::new();
        apply_discovery(
            &mut members,
            (1..=40).map(|i| vm(&format!("vm{i}"), i)).collect(),
        );
        for (i, m) in members.values_mut().enumerate() {
            if i % 2 == 0 {
                m.watcher = Watcher::Other(format!("ns/o{i}"));
            } else {
                m.record(false, Some("TcpTimeout".into()), TH, at(0));
            }
        }
        let t = tally(&members, &HashMap::new());
        assert_eq!((t.skipped, t.skipped_members.len()), (20, LIST_LIMIT));
        assert_eq!(t.worst.len(), LIST_LIMIT);
    }
}
