//! The per-object series (`rdphealth_vm_reachable`, `rdphealth_certificate_expiry_timestamp_seconds`,
//! `rdphealth_unreachable_since_timestamp_seconds`, `rdphealth_ladder_rung`,
//! `rdphealth_findings`): one small record per object, turned into series only when scraped.
//! A gauge vector would keep every series as its own allocation with a copy of its metric's
//! name, help text and label names (about 0.7 KiB each, 3 KiB per object); a record is a few
//! bytes besides the object's key.

use std::collections::HashMap;

use prometheus::{
    core::{Collector, Desc},
    proto::{Gauge, LabelPair, Metric, MetricFamily, MetricType},
};

use super::*;

/// What one object's series say.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Record {
    reachable: bool,
    /// Kept from the last probe that read a certificate.
    certificate_expiry: Option<i64>,
    unreachable_since: i64,
    rung: i64,
    /// Bit `i`: the finding [`FINDING_KINDS`]`[i]` is active.
    findings: u16,
}

const REACHABLE: usize = 0;
const CERTIFICATE_EXPIRY: usize = 1;
const UNREACHABLE_SINCE: usize = 2;
const RUNG: usize = 3;
const FINDINGS: usize = 4;

/// The per-object series of every object that has them (clones share them: one is
/// registered, one updated).
#[derive(Debug, Clone)]
pub(super) struct ObjectSeries {
    descs: Arc<[Desc; 5]>,
    records: Arc<Mutex<HashMap<ObjectKey, Record>>>,
}

impl ObjectSeries {
    pub(super) fn new() -> Result<Self, MetricsError> {
        let desc = |name: &str, help: &str, labels: &[&str]| {
            Desc::new(
                name.into(),
                help.into(),
                labels.iter().map(|l| (*l).to_string()).collect(),
                HashMap::new(),
            )
            .map_err(MetricsError::Register)
        };
        let object = ["namespace", "name"];
        Ok(Self {
            descs: Arc::new([
                desc(
                    "rdphealth_vm_reachable",
                    "1 when the VM's RDP endpoint is reachable (Reachable=True), 0 otherwise; absent until the first probe.",
                    &object,
                )?,
                desc(
                    "rdphealth_certificate_expiry_timestamp_seconds",
                    "Unix time at which the VM's RDP certificate expires.",
                    &object,
                )?,
                desc(
                    "rdphealth_unreachable_since_timestamp_seconds",
                    "Unix time at which the VM became unreachable; 0 while reachable.",
                    &object,
                )?,
                desc(
                    "rdphealth_ladder_rung",
                    "The rung in flight for the VM (Rung ordinal: 1 ResetRdpConfig ... 8 RepairNsg), 0 when none.",
                    &object,
                )?,
                desc(
                    "rdphealth_findings",
                    "1 while the operator has a finding of this kind for the VM.",
                    &["namespace", "name", "kind"],
                )?,
            ]),
            records: Arc::default(),
        })
    }

    fn records(&self) -> std::sync::MutexGuard<'_, HashMap<ObjectKey, Record>> {
        self.records.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Updates `key`'s series from its new status (one with a probe).
    pub(super) fn update(&self, key: &ObjectKey, status: &RdpHealthStatus, last: &LastProbe) {
        let reachable = conditions::status_of(&status.conditions, types::REACHABLE);
        let active = findings(status);
        let findings = FINDING_KINDS
            .iter()
            .enumerate()
            .filter(|(_, kind)| active.contains(kind))
            .fold(0u16, |bits, (i, _)| bits | (1 << i));
        let mut records = self.records();
        let record = match records.get_mut(key) {
            Some(record) => record,
            None => records.entry(key.clone()).or_default(),
        };
        record.reachable = reachable == Some(Status::True);
        record.unreachable_since = match (reachable, &status.last_transition_to_unreachable) {
            (Some(Status::False), Some(t)) => t.0.as_second(),
            _ => 0,
        };
        record.rung = status
            .ladder
            .current
            .as_ref()
            .map_or(0, |c| i64::from(c.step.rung.ordinal()));
        if let Some(not_after) = &last.certificate_not_after {
            record.certificate_expiry = Some(not_after.0.as_second());
        }
        record.findings = findings;
    }

    /// Drops `key`'s series; whether it had any.
    pub(super) fn forget(&self, key: &ObjectKey) -> bool {
        self.records().remove(key).is_some()
    }

    /// Keeps the series of the objects `live` names only.
    pub(super) fn retain(&self, live: impl Fn(&ObjectKey) -> bool) {
        self.records().retain(|key, _| live(key));
    }
}

fn pair(name: &str, value: String) -> LabelPair {
    let mut pair = LabelPair::default();
    pair.set_name(name.into());
    pair.set_value(value);
    pair
}

/// A gauge sample; `labels` sorted by name, as the text encoder writes them in this order.
fn gauge(labels: Vec<LabelPair>, value: i64) -> Metric {
    let mut g = Gauge::default();
    g.set_value(value as f64);
    let mut m = Metric::default();
    m.set_label(labels);
    m.set_gauge(g);
    m
}

impl Collector for ObjectSeries {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        // A copy, so that reconciles are not held up while the series are built.
        let records: Vec<(ObjectKey, Record)> = self
            .records()
            .iter()
            .map(|(k, r)| (k.clone(), *r))
            .collect();
        let mut families: [Vec<Metric>; 5] = Default::default();
        for (key, r) in records {
            let labels = || {
                vec![
                    pair("name", key.name.clone()),
                    pair("namespace", key.namespace.clone()),
                ]
            };
            families[REACHABLE].push(gauge(labels(), i64::from(r.reachable)));
            if let Some(t) = r.certificate_expiry {
                families[CERTIFICATE_EXPIRY].push(gauge(labels(), t));
            }
            families[UNREACHABLE_SINCE].push(gauge(labels(), r.unreachable_since));
            families[RUNG].push(gauge(labels(), r.rung));
            for (i, kind) in FINDING_KINDS.iter().enumerate() {
                if r.findings & (1 << i) != 0 {
                    let mut labels = labels();
                    labels.insert(0, pair("kind", (*kind).into()));
                    families[FINDINGS].push(gauge(labels, 1));
                }
            }
        }
        self.descs
            .iter()
            .zip(families)
            .map(|(desc, metrics)| {
                let mut family = MetricFamily::default();
                family.set_name(desc.fq_name.clone());
                family.set_help(desc.help.clone());
                family.set_field_type(MetricType::GAUGE);
                family.set_metric(metrics);
                family
            })
            .collect()
    }
}
