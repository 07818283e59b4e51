//! Prometheus metrics. The names are a contract (dashboards and alerts use them); label values
//! are bounded (enums, object keys), never free text.

mod objects;

use std::{
    collections::HashSet,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts,
    Registry, TextEncoder, core::Collector,
};

use k8s_openapi::jiff::Timestamp;

use crate::{
    api::{LastProbe, Phase, RdpHealthStatus, conditions as types, reasons},
    azure::CountedAzure,
    engine::conditions::{self, Status},
    evidence::nsg::Access,
    ladder::{ExecutionPhase, LadderStatus, Rung},
    probe::{FailureReason, ProbeReport},
};

/// Errors of the metrics layer.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// A metric could not be created or registered.
    #[error("failed to register metric")]
    Register(#[source] prometheus::Error),
    /// The registry could not be encoded.
    #[error("failed to encode metrics")]
    Encode(#[source] prometheus::Error),
}

impl MetricsError {
    /// PascalCase reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Register(_) => "MetricRegisterFailed",
            Self::Encode(_) => "MetricEncodeFailed",
        }
    }
}

/// Identifies one object's series.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

/// What the metrics need to know about the objects that exist right now.
pub trait Inventory: Send + Sync {
    /// Every object with its current phase (if it has one).
    fn objects(&self) -> Vec<(ObjectKey, Option<Phase>)>;
}

/// The operator's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    probe_duration: HistogramVec,
    probe_failures: IntCounterVec,
    prober_errors: IntCounter,
    observer: IntGaugeVec,
    /// The last probe failed on the prober's side (readiness reports it).
    prober_blind: AtomicBool,
    reconcile_duration: Histogram,
    reconcile_wait: Histogram,
    reconcile_errors: IntCounterVec,
    objects: IntGaugeVec,
    remediations: IntCounterVec,
    remediation_suspended: IntGaugeVec,
    /// Every object's own series (deleted objects' are removed).
    objects_series: objects::ObjectSeries,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Result<Self, MetricsError> {
        let registry = Registry::new();
        let m = Self {
            probe_duration: HistogramVec::new(
                HistogramOpts::new(
                    "rdphealth_probe_duration_seconds",
                    "Duration of RDP probes, by result (reachable or unreachable).",
                )
                .buckets(vec![
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                ]),
                &["result"],
            )
            .map_err(MetricsError::Register)?,
            probe_failures: IntCounterVec::new(
                Opts::new(
                    "rdphealth_probe_failures_total",
                    "Failed RDP probes, by the prober's bounded failure reason.",
                ),
                &["reason"],
            )
            .map_err(MetricsError::Register)?,
            prober_errors: IntCounter::with_opts(Opts::new(
                "rdphealth_prober_errors_total",
                "Probes that failed on the prober's own side (out of file descriptors, buffers or local ports, no route from the prober): never counted against a VM.",
            ))
            .map_err(MetricsError::Register)?,
            observer: IntGaugeVec::new(
                Opts::new(
                    "rdphealth_observer_blind",
                    "1 while the operator holds every mutating rung because its own view may be wrong, by cause: fleet_breaker (too many VMs of all subscriptions failed together) or canary (the --canary endpoint fails).",
                ),
                &["cause"],
            )
            .map_err(MetricsError::Register)?,
            prober_blind: AtomicBool::new(false),
            reconcile_duration: Histogram::with_opts(
                HistogramOpts::new(
                    "rdphealth_reconcile_duration_seconds",
                    "Duration of reconciles (including probes).",
                )
                .buckets(vec![
                    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                ]),
            )
            .map_err(MetricsError::Register)?,
            reconcile_wait: Histogram::with_opts(
                HistogramOpts::new(
                    "rdphealth_reconcile_wait_seconds",
                    "How long after it fell due each reconcile started (the wait for one of the --concurrency reconcilers).",
                )
                .buckets(vec![
                    0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
                ]),
            )
            .map_err(MetricsError::Register)?,
            reconcile_errors: IntCounterVec::new(
                Opts::new(
                    "rdphealth_reconcile_errors_total",
                    "Failed reconciles, by error reason.",
                ),
                &["reason"],
            )
            .map_err(MetricsError::Register)?,
            objects: IntGaugeVec::new(
                Opts::new("rdphealth_objects", "RdpHealth objects, by phase."),
                &["phase"],
            )
            .map_err(MetricsError::Register)?,
            remediations: IntCounterVec::new(
                Opts::new(
                    "rdphealth_remediations_total",
                    "Remediation rungs, by rung and result (started, fixed, not_fixed, failed, unknown, applied).",
                ),
                &["rung", "result"],
            )
            .map_err(MetricsError::Register)?,
            remediation_suspended: IntGaugeVec::new(
                Opts::new(
                    "rdphealth_remediation_suspended",
                    "Objects whose remediation is suspended, by reason.",
                ),
                &["reason"],
            )
            .map_err(MetricsError::Register)?,
            objects_series: objects::ObjectSeries::new()?,
            registry,
        };
        let collectors: [Box<dyn Collector>; 11] = [
            Box::new(m.prober_errors.clone()),
            Box::new(m.observer.clone()),
            Box::new(m.remediations.clone()),
            Box::new(m.remediation_suspended.clone()),
            Box::new(m.objects_series.clone()),
            Box::new(m.probe_duration.clone()),
            Box::new(m.probe_failures.clone()),
            Box::new(m.reconcile_duration.clone()),
            Box::new(m.reconcile_wait.clone()),
            Box::new(m.reconcile_errors.clone()),
            Box::new(m.objects.clone()),
        ];
        for c in collectors {
            m.registry.register(c).map_err(MetricsError::Register)?;
        }
        // Bounded label sets are pre-registered so rates work from the first scrape.
        for reason in FailureReason::ALL {
            m.probe_failures.with_label_values(&[reason.as_str()]);
        }
        for result in ["reachable", "unreachable"] {
            m.probe_duration.with_label_values(&[result]);
        }
        for phase in Phase::ALL {
            m.objects.with_label_values(&[phase.as_str()]);
        }
        for reason in SUSPENSION_REASONS {
            m.remediation_suspended.with_label_values(&[reason]);
        }
        for cause in ["fleet_breaker", "canary"] {
            m.observer.with_label_values(&[cause]);
        }
        Ok(m)
    }

    /// Registers more collectors (fleet series).
    pub fn register(
        &self,
        collectors: Vec<Box<dyn prometheus::core::Collector>>,
    ) -> Result<(), MetricsError> {
        for c in collectors {
            self.registry.register(c).map_err(MetricsError::Register)?;
        }
        Ok(())
    }

    /// Registers the Azure call counters.
    pub fn register_azure(&self, azure: &CountedAzure) -> Result<(), MetricsError> {
        for c in azure.collectors() {
            self.registry.register(c).map_err(MetricsError::Register)?;
        }
        Ok(())
    }

    /// Counts one rung transition (`result`: started, fixed, not_fixed, failed, unknown, applied).
    pub fn remediation(&self, rung: Rung, result: &str) {
        self.remediations
            .with_label_values(&[rung.as_str(), result])
            .inc();
    }

    /// Counts the rungs started in this reconcile and the rungs that ended between `before`
    /// and `after` (`rdphealth_remediations_total`).
    pub fn count_remediations(&self, before: &LadderStatus, after: &LadderStatus, now: Timestamp) {
        let last_before = before.history.last().map(|r| r.finished_at.0);
        let ended: Vec<_> = after
            .history
            .iter()
            .filter(|r| last_before.is_none_or(|t| r.finished_at.0 > t))
            .collect();
        let started = ended
            .iter()
            .filter(|r| r.started_at.0 == now)
            .map(|r| r.step.rung)
            .chain(
                after
                    .current
                    .as_ref()
                    // A rung waiting for its OS-disk snapshot starts (again, with its own
                    // intent) once the snapshot is taken: counted then, once.
                    .filter(|c| c.started_at.0 == now && c.phase != ExecutionPhase::Snapshotting)
                    .map(|c| c.step.rung),
            );
        for rung in started {
            self.remediation(rung, "started");
        }
        for r in ended {
            self.remediation(r.step.rung, r.outcome.as_str());
        }
    }

    /// Sets the suspended-object counts, by reason.
    pub fn suspended(&self, counts: &[(&'static str, usize)]) {
        for reason in SUSPENSION_REASONS {
            let n = counts
                .iter()
                .filter(|(r, _)| *r == reason)
                .map(|(_, n)| *n)
                .sum::<usize>();
            self.remediation_suspended
                .with_label_values(&[reason])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    /// Records one probe.
    pub fn probe_finished(&self, report: &ProbeReport) {
        let result = if report.reachable {
            "reachable"
        } else {
            "unreachable"
        };
        self.probe_duration
            .with_label_values(&[result])
            .observe(report.total_ms / 1000.0);
        if let Some(failure) = &report.failure {
            self.probe_failures
                .with_label_values(&[failure.reason.as_str()])
                .inc();
        }
        let blind = report.prober_failed();
        if blind {
            self.prober_errors.inc();
        }
        self.prober_blind.store(blind, Ordering::Relaxed);
    }

    /// Records whether the observer is held blind by `cause` (`fleet_breaker`, `canary`).
    pub fn observer_blind(&self, cause: &'static str, blind: bool) {
        self.observer
            .with_label_values(&[cause])
            .set(i64::from(blind));
    }

    /// Whether the last probe failed on the prober's own side (`prober_error`).
    pub fn prober_blind(&self) -> bool {
        self.prober_blind.load(Ordering::Relaxed)
    }

    /// Updates an object's series from its new status.
    pub fn object_status(&self, key: &ObjectKey, status: &RdpHealthStatus) {
        if let Some(last) = &status.last_probe {
            self.objects_series.update(key, status, last);
        }
    }

    /// Drops an object's series: another replica probes it now (its shard moved).
    pub fn forget_object(&self, key: &ObjectKey) {
        self.objects_series.forget(key);
    }

    /// Counts a failed reconcile.
    pub fn reconcile_failed(&self, reason: &'static str) {
        self.reconcile_errors.with_label_values(&[reason]).inc();
    }

    /// A reconcile started `waited` after it fell due.
    pub fn reconcile_waited(&self, waited: Duration) {
        self.reconcile_wait.observe(waited.as_secs_f64());
    }

    /// Starts timing a reconcile; the time is recorded when the guard drops.
    pub fn reconcile_timer(self: &Arc<Self>) -> ReconcileTimer {
        ReconcileTimer {
            metrics: Arc::clone(self),
            started: Instant::now(),
        }
    }

    /// Brings per-object series and phase counts in line with the objects that exist.
    pub fn sync_inventory(&self, inventory: &dyn Inventory) {
        let objects = inventory.objects();
        let live: HashSet<&ObjectKey> = objects.iter().map(|(k, _)| k).collect();
        self.objects_series.retain(|key| live.contains(key));
        for phase in Phase::ALL {
            let count = objects.iter().filter(|(_, p)| *p == Some(phase)).count();
            self.objects
                .with_label_values(&[phase.as_str()])
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
    }

    /// The classic Prometheus text exposition of every metric.
    pub fn render(&self) -> Result<String, MetricsError> {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .map_err(MetricsError::Encode)?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    }
}

/// The `rdphealth_remediation_suspended{reason}` label values.
pub const SUSPENSION_REASONS: [&str; 6] = [
    "StormBreaker",
    "FleetBreaker",
    "CanaryDown",
    "Paused",
    "OutsideMaintenanceWindow",
    "NotLeader",
];

/// The `rdphealth_findings{kind}` label values.
pub const FINDING_KINDS: [&str; 11] = [
    "certificate_expiring",
    "certificate_expired",
    "no_tls",
    "rdp_open_to_internet",
    "nsg_denied",
    "vm_not_running",
    "wrong_host",
    "nla_disabled",
    "clock_skew",
    "legacy_tls_allowed",
    "legacy_rdp_security",
];

// The kinds shown for an object are kept as bits of a `u16`.
const _: () = assert!(FINDING_KINDS.len() <= 16);

/// The findings a status shows: certificate problems of the last probe (from the
/// `CertificateValid` condition), the identity step's (`HostIdentity`, `NlaRequired`, the
/// recorded clock skew) and the current incident's evidence.
pub fn findings(status: &RdpHealthStatus) -> Vec<&'static str> {
    let mut kinds = Vec::new();
    match conditions::find(&status.conditions, types::CERTIFICATE_VALID).map(|c| c.reason.as_str())
    {
        Some(reasons::CERTIFICATE_EXPIRING) => kinds.push("certificate_expiring"),
        Some(reasons::CERTIFICATE_EXPIRED) => kinds.push("certificate_expired"),
        Some(reasons::NO_TLS) => kinds.push("no_tls"),
        Some(reasons::LEGACY_RDP_SECURITY) => kinds.push("legacy_rdp_security"),
        _ => {}
    }
    if conditions::status_of(&status.conditions, types::HOST_IDENTITY) == Some(Status::False) {
        kinds.push("wrong_host");
    }
    if conditions::status_of(&status.conditions, types::NLA_REQUIRED) == Some(Status::False) {
        kinds.push("nla_disabled");
    }
    if conditions::status_of(&status.conditions, types::LEGACY_TLS_ALLOWED) == Some(Status::True) {
        kinds.push("legacy_tls_allowed");
    }
    let limit = i64::try_from(crate::probe::DEFAULT_MAX_CLOCK_SKEW.as_secs()).unwrap_or(300);
    if let Some(skew) = status.identity.as_ref().and_then(|i| i.clock_skew_seconds)
        && skew.abs() > limit
    {
        kinds.push("clock_skew");
    }
    if let Some(d) = &status.diagnosis {
        if let Some(nsg) = &d.nsg {
            if nsg.open_to_internet {
                kinds.push("rdp_open_to_internet");
            }
            // The verdict the ladder acts on: IP flow verify's when it answered.
            if nsg.trusted_access() == Access::Deny {
                kinds.push("nsg_denied");
            }
        }
        if d.power_state.is_some_and(|p| p.is_down()) {
            kinds.push("vm_not_running");
        }
    }
    kinds
}

/// Records a reconcile's duration when dropped.
#[derive(Debug)]
pub struct ReconcileTimer {
    metrics: Arc<Metrics>,
    started: Instant,
}

impl Drop for ReconcileTimer {
    fn drop(&mut self) {
        self.metrics
            .reconcile_duration
            .observe(self.started.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{
        Observation, evaluate,
        testing::{at, endpoint, failed_report, object, ok_report},
    };

    struct Fixed(Vec<(ObjectKey, Option<Phase>)>);
    impl Inventory for Fixed {
        fn objects(&self) -> Vec<(ObjectKey, Option<Phase>)> {
            self.0.clone()
        }
    }

    fn key(name: &str) -> ObjectKey {
        ObjectKey {
            namespace: "default".into(),
            name: name.into(),
        }
    }

    #[test]
    fn nsg_denied_follows_the_verdict_the_ladder_trusts() {
        use crate::evidence::{
            Evidence, FlowCheck, NsgEvidence,
            nsg::{Access, Verdict},
        };
        let nsg = |local, azure: Option<Access>| NsgEvidence {
            verdict: Verdict {
                access: local,
                deciding: vec![],
                unresolved_prefixes: vec![],
            },
            open_to_internet: false,
            closed_public_ip: false,
            ip_flow_verify: azure.map(|access| FlowCheck {
                access,
                rule: "securityRules/r".into(),
                agrees_with_local_verdict: access == local,
            }),
        };
        let mut status = RdpHealthStatus::default();
        for (local, azure, denied) in [
            (Access::Deny, None, true),
            (Access::Deny, Some(Access::Allow), false),
            (Access::Allow, Some(Access::Deny), true),
            (Access::Allow, None, false),
        ] {
            status.diagnosis = Some(Evidence {
                nsg: Some(nsg(local, azure)),
                ..Evidence::empty(at(0))
            });
            assert_eq!(
                findings(&status).contains(&"nsg_denied"),
                denied,
                "{local:?} / {azure:?}"
            );
        }
    }

    #[test]
    fn per_object_series_follow_status_and_vanish_with_the_object() {
        let m = Metrics::new().unwrap();
        let text = m.render().unwrap();
        assert!(
            !text.contains("rdphealth_vm_reachable{"),
            "absent before a probe"
        );
        assert!(text.contains(r#"rdphealth_probe_failures_total{reason="tcp_timeout"} 0"#));
        assert!(text.contains(r#"rdphealth_objects{phase="Healthy"} 0"#));

        let obj = object(|_| {});
        let report = ok_report();
        m.probe_finished(&report);
        let out = evaluate(
            &obj,
            Observation::Probed {
                endpoint: endpoint(),
                report: Box::new(report),
            },
            at(1000),
        );
        m.object_status(&key("vm-1"), &out.status);
        m.probe_finished(&failed_report(FailureReason::TcpRefused));
        m.sync_inventory(&Fixed(vec![(key("vm-1"), Some(Phase::Healthy))]));
        let text = m.render().unwrap();
        assert!(
            text.contains(r#"rdphealth_vm_reachable{name="vm-1",namespace="default"} 1"#),
            "{text}"
        );
        assert!(text.contains(
            r#"rdphealth_unreachable_since_timestamp_seconds{name="vm-1",namespace="default"} 0"#
        ));
        assert!(text.contains(r#"rdphealth_certificate_expiry_timestamp_seconds{name="vm-1",namespace="default"} 1798761600"#));
        assert!(text.contains(r#"rdphealth_ladder_rung{name="vm-1",namespace="default"} 0"#));
        assert!(text.contains("# HELP rdphealth_vm_reachable 1 when the VM's RDP endpoint is reachable (Reachable=True), 0 otherwise; absent until the first probe.\n# TYPE rdphealth_vm_reachable gauge\n"), "{text}");
        assert!(!text.contains("rdphealth_findings{"), "no finding: {text}");
        assert!(text.contains(r#"rdphealth_probe_failures_total{reason="tcp_refused"} 1"#));
        assert!(text.contains(r#"rdphealth_probe_duration_seconds_count{result="reachable"} 1"#));
        assert!(text.contains(r#"rdphealth_objects{phase="Healthy"} 1"#));

        // A shard that moved to another replica: the object still exists, its series go.
        m.forget_object(&key("vm-1"));
        let text = m.render().unwrap();
        assert!(!text.contains(r#"name="vm-1""#), "{text}");
        m.object_status(&key("vm-1"), &out.status);
        assert!(m.render().unwrap().contains(r#"name="vm-1""#));

        // A finding is a series of its own while it lasts.
        let mut expired = out.status.clone();
        expired
            .conditions
            .retain(|c| c.type_ != types::CERTIFICATE_VALID);
        expired
            .conditions
            .push(k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
                type_: types::CERTIFICATE_VALID.into(),
                status: "False".into(),
                reason: reasons::CERTIFICATE_EXPIRED.into(),
                message: String::new(),
                last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(at(
                    1000,
                )),
                observed_generation: None,
            });
        m.object_status(&key("vm-1"), &expired);
        let finding =
            r#"rdphealth_findings{kind="certificate_expired",name="vm-1",namespace="default"} 1"#;
        assert!(m.render().unwrap().contains(finding));
        m.object_status(&key("vm-1"), &out.status);
        assert!(!m.render().unwrap().contains(finding));

        m.sync_inventory(&Fixed(vec![]));
        let text = m.render().unwrap();
        assert!(!text.contains(r#"name="vm-1""#), "{text}");
        assert!(text.contains(r#"rdphealth_objects{phase="Healthy"} 0"#));
    }

    #[test]
    fn a_finding_series_exists_while_the_finding_does() {
        let m = Metrics::new().unwrap();
        let status = |legacy_tls: bool| {
            let obj = object(|o| o.spec.remediation.allow_legacy_tls = legacy_tls);
            let observation = Observation::Probed {
                endpoint: endpoint(),
                report: Box::new(ok_report()),
            };
            evaluate(&obj, observation, at(1000)).status
        };
        let series = |name: &str| {
            format!(
                r#"rdphealth_findings{{kind="legacy_tls_allowed",name="{name}",namespace="default"}} 1"#
            )
        };
        m.object_status(&key("vm-1"), &status(true));
        m.object_status(&key("vm-2"), &status(true));
        let text = m.render().unwrap();
        assert!(
            text.contains(&series("vm-1")) && text.contains(&series("vm-2")),
            "{text}"
        );
        // Unchanged: still there.
        m.object_status(&key("vm-1"), &status(true));
        assert!(m.render().unwrap().contains(&series("vm-1")));
        // Gone for the object whose finding cleared, kept for the other.
        m.object_status(&key("vm-1"), &status(false));
        let text = m.render().unwrap();
        assert!(!text.contains(&series("vm-1")), "{text}");
        assert!(text.contains(&series("vm-2")), "{text}");
        assert!(
            !text.contains(r#"rdphealth_findings{kind="no_tls""#),
            "{text}"
        );
        // Back again, and gone with the object.
        m.object_status(&key("vm-1"), &status(true));
        assert!(m.render().unwrap().contains(&series("vm-1")));
        m.forget_object(&key("vm-1"));
        assert!(!m.render().unwrap().contains(&series("vm-1")));
        m.object_status(&key("vm-1"), &status(true));
        assert!(m.render().unwrap().contains(&series("vm-1")));
    }

    #[test]
    fn reconcile_timer_and_errors() {
        let m = Arc::new(Metrics::new().unwrap());
        drop(m.reconcile_timer());
        m.reconcile_failed("PatchStatusFailed");
        let text = m.render().unwrap();
        assert!(text.contains("rdphealth_reconcile_duration_seconds_count 1"));
        assert!(text.contains(r#"rdphealth_reconcile_errors_total{reason="PatchStatusFailed"} 1"#));
    }

    #[test]
    fn reconcile_waits_by_bucket() {
        let m = Metrics::new().unwrap();
        m.reconcile_waited(Duration::from_millis(2));
        m.reconcile_waited(Duration::from_secs(45));
        let text = m.render().unwrap();
        assert!(text.contains(r#"rdphealth_reconcile_wait_seconds_bucket{le="0.01"} 1"#));
        assert!(text.contains(r#"rdphealth_reconcile_wait_seconds_bucket{le="30"} 1"#));
        assert!(text.contains(r#"rdphealth_reconcile_wait_seconds_bucket{le="60"} 2"#));
        assert!(text.contains("rdphealth_reconcile_wait_seconds_count 2"));
    }
}
