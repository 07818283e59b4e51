//! The in-memory driver: the same engine entry points as the Kubernetes controller
//! (`schedule` → probe → `evaluate` → `Remediator::remediate`), with the objects kept in a map
//! instead of the API server.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::watch;

use super::fleet::Expect;
use crate::{
    api::{RdpHealth, RdpHealthStatus, conditions as types},
    engine::{
        EndpointResolver, Next, Observation, Schedule, ValidSpec,
        conditions::{self, Status},
        evaluate, identity, ladder_due,
        remediate::{Remediator, StatusSink, Subject},
        schedule,
    },
    ladder::{
        Step,
        fleet::{FleetView, Member},
    },
    metrics::{Inventory, Metrics, ObjectKey},
    probe::{Prober, Target},
    sim::Fault,
};

/// One object the demo drives, with what the summary reports about it.
#[derive(Debug, Clone)]
pub struct Tracked {
    /// The object (spec and status).
    pub obj: RdpHealth,
    /// The VM's fault at start.
    pub fault: Option<Fault>,
    /// The computer that answers on the VM's address when it is another one.
    pub answers_as: Option<String>,
    /// What the demo expects.
    pub expect: Expect,
    /// When the incident was first seen, after the start.
    pub detected_after: Option<Duration>,
    /// When RDP answered again after the incident, after the start.
    pub recovered_after: Option<Duration>,
    /// The step credited with the recovery.
    pub fixed_by: Option<Step>,
    /// What the diagnosis said.
    pub diagnosis: Option<String>,
    /// The last event, for the live view.
    pub last_event: Option<String>,
}

impl Tracked {
    /// Whether the VM reached what the demo expects.
    pub fn settled(&self) -> bool {
        let status = self.obj.status.clone().unwrap_or_default();
        let remediating =
            conditions::find(&status.conditions, types::REMEDIATING).map(|c| c.reason.as_str());
        let reachable = conditions::status_of(&status.conditions, types::REACHABLE);
        match self.expect {
            Expect::Healthy => {
                reachable == Some(Status::True) && status.ladder.incident_started_at.is_none()
            }
            Expect::FixedBy(step) => {
                self.fixed_by == Some(step)
                    && reachable == Some(Status::True)
                    && status.ladder.incident_started_at.is_none()
            }
            Expect::Reported(reason) | Expect::Waits(reason) => remediating == Some(reason),
        }
    }
}

/// A line for the event log.
#[derive(Debug, Clone)]
pub struct LogLine {
    /// Since the start.
    pub at: Duration,
    /// Object name.
    pub name: String,
    /// Event reason.
    pub reason: &'static str,
    /// Event note.
    pub note: String,
}

/// The demo's shared state.
pub struct State {
    /// The demo's clock (compressed with the realistic timing profile).
    pub clock: super::clock::Clock,
    /// The objects, by name.
    pub objects: Mutex<BTreeMap<String, Tracked>>,
    /// Event lines not yet printed.
    pub log: Mutex<Vec<LogLine>>,
}

impl State {
    fn with<T>(&self, name: &str, f: impl FnOnce(&mut Tracked) -> T) -> Option<T> {
        self.objects.lock().ok()?.get_mut(name).map(f)
    }

    /// A snapshot of every object.
    pub fn snapshot(&self) -> Vec<Tracked> {
        self.objects
            .lock()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// The fleet view for the storm breaker and the disruptive cap.
    pub fn fleet_view(&self) -> FleetView {
        let Ok(objects) = self.objects.lock() else {
            return FleetView::default();
        };
        type Share = (String, String, bool, bool, Option<String>);
        let specs: Vec<Share> = objects
            .iter()
            .filter_map(|(name, t)| {
                let spec = ValidSpec::try_from(&t.obj.spec).ok()?;
                let status = t.obj.status.as_ref();
                let conditions = status.map(|s| s.conditions.as_slice()).unwrap_or_default();
                let unreachable =
                    conditions::status_of(conditions, types::REACHABLE) == Some(Status::False);
                let disruptive = status
                    .and_then(|s| s.ladder.current.as_ref())
                    .is_some_and(|c| c.is_disruptive());
                let group = crate::fleet::incident::claim_group(&t.obj).map(|g| g.id);
                Some((
                    name.clone(),
                    spec.vm.subscription,
                    unreachable,
                    disruptive,
                    group,
                ))
            })
            .collect();
        FleetView::from_members(specs.iter().map(|(k, s, u, d, g)| Member {
            key: k,
            subscription: s,
            unreachable: *u,
            disruptive_in_flight: *d,
            failed_recently: *u,
            group: g.as_deref(),
        }))
    }
}

impl Inventory for State {
    fn objects(&self) -> Vec<(ObjectKey, Option<crate::api::Phase>)> {
        self.snapshot()
            .into_iter()
            .map(|t| (key(&t.obj), t.obj.status.and_then(|s| s.phase)))
            .collect()
    }
}

fn key(obj: &RdpHealth) -> ObjectKey {
    ObjectKey {
        namespace: obj.metadata.namespace.clone().unwrap_or_default(),
        name: obj.metadata.name.clone().unwrap_or_default(),
    }
}

/// Persists into the map (the demo's "API server").
struct MemorySink<'a> {
    state: &'a State,
    name: &'a str,
}

#[async_trait::async_trait]
impl StatusSink for MemorySink<'_> {
    async fn persist(&self, status: &RdpHealthStatus) -> Result<(), String> {
        self.state
            .with(self.name, |t| t.obj.status = Some(status.clone()))
            .ok_or_else(|| format!("object {} is gone", self.name))
    }
}

/// What every object's loop shares.
pub struct Engine {
    /// Where to probe, and whom the endpoint must answer as.
    pub resolver: Arc<dyn EndpointResolver>,
    /// The prober.
    pub prober: Arc<dyn Prober>,
    /// The remediation stage.
    pub remediator: Arc<Remediator>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Shared state.
    pub state: Arc<State>,
}

/// Drives one object until `stop` turns true.
pub async fn drive(engine: Arc<Engine>, name: String, mut stop: watch::Receiver<bool>) {
    loop {
        // Boxed: a reconcile's future (probe, ladder, Azure calls) is kilobytes, and inline it
        // would sit in every object's task between reconciles too.
        let wait = Box::pin(reconcile(&engine, &name)).await;
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
    }
}

/// One reconcile; returns how long to sleep.
async fn reconcile(engine: &Engine, name: &str) -> Duration {
    let Some(obj) = engine.state.with(name, |t| t.obj.clone()) else {
        return Duration::from_secs(1);
    };
    let clock = engine.state.clock;
    let now = clock.now();
    let valid = ValidSpec::try_from(&obj.spec).ok();
    // As the controller does: a look without a probe only when the ladder needs one.
    let due = match (valid.as_ref().filter(|s| !s.suspend), &obj.status) {
        (Some(spec), Some(status)) => ladder_due(status, spec)
            .map(|t| Duration::try_from(t.duration_since(now)).unwrap_or(Duration::ZERO)),
        _ => None,
    };
    let mut failure = None;
    let mut probed = None;
    let (observation, wait) = match schedule(&obj, None, now) {
        Schedule::Wait(left) if !due.is_some_and(|d| d.is_zero()) => {
            let wait = due.map_or(left, |d| d.min(left));
            return clock.wall(wait).max(Duration::from_millis(20));
        }
        Schedule::Probe(spec) => match engine.resolver.resolve(&spec).await {
            Err(e) => (Observation::Unresolved(e), None),
            Ok(endpoint) => match Target::new(endpoint.host.clone(), endpoint.port) {
                Err(_) => (Observation::NotProbed, None),
                Ok(target) => {
                    let status = obj.status.as_ref();
                    let mut options = identity::probe_options(&spec, status, &endpoint, now);
                    // The prober's timeouts run on the wall clock (never under 250 ms, so
                    // a loopback handshake under load is not taken for a failure).
                    let floor = Duration::from_millis(250);
                    options.timeout = clock.wall(options.timeout).max(floor);
                    options.layer_timeout = options.layer_timeout.map(|t| clock.wall(t).max(floor));
                    let report = engine.prober.probe(&target, &options).await;
                    let report = identity::judge(status, &endpoint, report);
                    engine.metrics.probe_finished(&report);
                    failure = report.failure.clone();
                    probed = Some(report.reachable);
                    (
                        Observation::Probed {
                            endpoint,
                            report: Box::new(report),
                        },
                        None,
                    )
                }
            },
        },
        Schedule::Wait(d) => (Observation::NotProbed, Some(d)),
        Schedule::AwaitChange | Schedule::Report => (Observation::NotProbed, None),
    };
    let mut outcome = evaluate(&obj, observation, now);
    let ladder_before = outcome.status.ladder.clone();
    if let Some(spec) = &valid {
        let uid = obj.metadata.uid.clone().unwrap_or_default();
        let group = crate::fleet::incident::claim_group(&obj);
        let subject = Subject {
            key: name,
            seed: &uid,
            spec,
            failure: failure.as_ref(),
            probed,
            leader: true,
            paused: false,
            approval: None,
            group: group.as_ref(),
        };
        let sink = MemorySink {
            state: &engine.state,
            name,
        };
        if let Err(e) = engine
            .remediator
            .remediate(&subject, &mut outcome, &sink, now)
            .await
        {
            outcome.events.push(crate::engine::Event {
                severity: crate::engine::Severity::Warning,
                reason: e.reason(),
                note: e.to_string(),
            });
        }
    }
    let at = clock.elapsed();
    let status = std::mem::take(&mut outcome.status);
    engine.metrics.object_status(&key(&obj), &status);
    engine
        .metrics
        .count_remediations(&ladder_before, &status.ladder, now);
    engine.state.with(name, |t| {
        record(t, &status, &outcome.events, at);
        t.obj.status = Some(status);
    });
    if let Ok(mut log) = engine.state.log.lock() {
        for e in &outcome.events {
            log.push(LogLine {
                at,
                name: name.to_string(),
                reason: e.reason,
                note: e.note.clone(),
            });
        }
    }
    let next = match outcome.next {
        Next::Requeue(d) => d,
        Next::AwaitChange => Duration::from_secs(5),
    };
    clock
        .wall(next.min(wait.unwrap_or(next)))
        .clamp(Duration::from_millis(20), Duration::from_secs(5))
}

fn record(
    t: &mut Tracked,
    status: &RdpHealthStatus,
    events: &[crate::engine::Event],
    at: Duration,
) {
    let incident = status.ladder.incident_started_at.is_some()
        || conditions::status_of(&status.conditions, types::REACHABLE) == Some(Status::False);
    if incident && t.detected_after.is_none() {
        t.detected_after = Some(at);
    }
    // The evidence's verdict, once known (it may take a few reconciles while reads run in
    // Azure), replaces the probe's failure reason.
    if let Some(c) = conditions::find(&status.conditions, types::REMEDIATING).filter(|c| {
        matches!(
            c.reason.as_str(),
            "NsgDenied"
                | "VmNotRunning"
                | "PlatformIssue"
                | "PortTakenByOtherProgram"
                | "ConnectionBrokerError"
        )
    }) {
        t.diagnosis = Some(format!("{}: {}", c.reason, c.message));
    } else if t.diagnosis.is_none()
        && let (true, Some(probe)) = (incident, status.last_probe.as_ref())
    {
        t.diagnosis = probe
            .failure_reason
            .clone()
            .or_else(|| incident_kind(status).map(str::to_string));
    }
    for e in events {
        if e.reason == "RemediationSucceeded" {
            t.recovered_after = Some(at);
            t.fixed_by = status.ladder.recovered_by;
        }
        t.last_event = Some(format!("{}: {}", e.reason, e.note));
    }
}

fn incident_kind(status: &RdpHealthStatus) -> Option<&'static str> {
    let cert = conditions::find(&status.conditions, types::CERTIFICATE_VALID)
        .is_some_and(|c| c.status == "False");
    if cert {
        Some("certificate_expired")
    } else if status.ladder.incident_started_at.is_some() {
        Some("flapping")
    } else {
        None
    }
}
