//! Fleet metrics: members by state per fleet, each member's reachability (bounded by the
//! fleet's size), and discoveries by result.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Mutex,
};

use prometheus::{IntCounterVec, IntGaugeVec, Opts, core::Collector};

use super::member::{Member, Tally, Watcher};
use crate::{engine::Status, metrics::MetricsError};

/// The fleet series.
#[derive(Debug)]
pub struct FleetMetrics {
    members: IntGaugeVec,
    member_reachable: IntGaugeVec,
    discoveries: IntCounterVec,
    discovery_requests: IntCounterVec,
    /// Member series per fleet, so members that left (and deleted fleets) lose theirs.
    tracked: Mutex<HashMap<FleetId, HashSet<MemberId>>>,
}

/// (namespace, fleet name).
type FleetId = (String, String);
/// (resource group, VM name).
type MemberId = (String, String);

const STATES: [&str; 5] = ["reachable", "unreachable", "pending", "incident", "skipped"];

impl FleetMetrics {
    /// Creates the series (register them with [`FleetMetrics::collectors`]).
    pub fn new() -> Result<Self, MetricsError> {
        Ok(Self {
            members: IntGaugeVec::new(
                Opts::new(
                    "rdphealth_fleet_members",
                    "Members of an RdpHealthFleet by state: reachable, unreachable (incidents included), pending, incident, skipped (watched by another object).",
                ),
                &["namespace", "fleet", "state"],
            )
            .map_err(MetricsError::Register)?,
            member_reachable: IntGaugeVec::new(
                Opts::new(
                    "rdphealth_fleet_member_reachable",
                    "1 when a fleet member probed in memory is reachable, 0 when unreachable; absent until judged and while an incident object or another object watches it (see rdphealth_vm_reachable).",
                ),
                &["namespace", "fleet", "resource_group", "vm"],
            )
            .map_err(MetricsError::Register)?,
            discoveries: IntCounterVec::new(
                Opts::new(
                    "rdphealth_fleet_discoveries_total",
                    "Fleet discoveries through Azure Resource Graph, by result (succeeded, failed).",
                ),
                &["namespace", "fleet", "result"],
            )
            .map_err(MetricsError::Register)?,
            discovery_requests: IntCounterVec::new(
                Opts::new(
                    "rdphealth_fleet_discovery_requests_total",
                    "Azure Resource Graph requests made by fleet discoveries (pages and retries).",
                ),
                &["namespace", "fleet"],
            )
            .map_err(MetricsError::Register)?,
            tracked: Mutex::new(HashMap::new()),
        })
    }

    /// The collectors to register.
    pub fn collectors(&self) -> Vec<Box<dyn Collector>> {
        vec![
            Box::new(self.members.clone()),
            Box::new(self.member_reachable.clone()),
            Box::new(self.discoveries.clone()),
            Box::new(self.discovery_requests.clone()),
        ]
    }

    /// Counts one discovery.
    pub fn discovered(&self, namespace: &str, fleet: &str, requests: u32, ok: bool) {
        let result = if ok { "succeeded" } else { "failed" };
        self.discoveries
            .with_label_values(&[namespace, fleet, result])
            .inc();
        self.discovery_requests
            .with_label_values(&[namespace, fleet])
            .inc_by(u64::from(requests));
    }

    /// Sets the fleet's series from its tally and members.
    pub fn observe(
        &self,
        namespace: &str,
        fleet: &str,
        tally: &Tally,
        members: &BTreeMap<String, Member>,
    ) {
        for (state, n) in STATES.iter().zip([
            tally.reachable,
            tally.unreachable,
            tally.pending,
            tally.incidents,
            tally.skipped,
        ]) {
            self.members
                .with_label_values(&[namespace, fleet, state])
                .set(i64::from(n));
        }
        let mut now: HashSet<(String, String)> = HashSet::with_capacity(members.len());
        for m in members.values() {
            let value = match (&m.watcher, m.reachable) {
                (Watcher::Fleet, Status::True) => 1,
                (Watcher::Fleet, Status::False) => 0,
                _ => continue,
            };
            let id = (m.vm.vm.resource_group.clone(), m.vm.vm.name.clone());
            self.member_reachable
                .with_label_values(&[namespace, fleet, &id.0, &id.1])
                .set(value);
            now.insert(id);
        }
        let key = (namespace.to_owned(), fleet.to_owned());
        let mut tracked = self
            .tracked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(before) = tracked.get(&key) {
            for (group, vm) in before.difference(&now) {
                let _ = self
                    .member_reachable
                    .remove_label_values(&[namespace, fleet, group, vm]);
            }
        }
        tracked.insert(key, now);
    }

    /// Removes every series of a deleted fleet.
    pub fn forget(&self, namespace: &str, fleet: &str) {
        let mut tracked = self
            .tracked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(before) = tracked.remove(&(namespace.to_owned(), fleet.to_owned())) {
            for (group, vm) in before {
                let _ = self
                    .member_reachable
                    .remove_label_values(&[namespace, fleet, &group, &vm]);
            }
        }
        for state in STATES {
            let _ = self.members.remove_label_values(&[namespace, fleet, state]);
        }
    }
}
