//! `rdphealth demo --fleet`: one `RdpHealthFleet` over the simulated subscription instead of
//! one object per VM. The fleet discovers the VMs through the ARM emulator's Resource Graph
//! endpoint and probes them in memory; each VM that becomes unreachable gets an incident
//! object, which the demo's engine drives through the ladder exactly like any object.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex, PoisonError},
};

use tokio::{sync::watch, task::JoinHandle};

use super::{
    driver::{self, Engine, LogLine, Tracked},
    fleet::Expect,
};
use crate::{
    api::{
        FleetSafety, FleetSelector, MemberTemplate, RdpHealth, RdpHealthFleet, RdpHealthFleetSpec,
        RdpHealthFleetStatus, RemediationSpec,
    },
    engine::Severity,
    fleet::{
        Created, FleetSink,
        member::{Member, Tally},
    },
    sim::Fault,
};

/// What the demo knows of a simulated VM, by lower-case name.
#[derive(Debug, Clone)]
pub(super) struct SimulatedVm {
    /// Its fault at start.
    pub fault: Option<Fault>,
    /// The computer that answers on its address when another one does.
    pub answers_as: Option<String>,
}

/// The demo's fleet: every VM of the simulated subscriptions, the demo's compressed timers,
/// and holds off (the demo's fleet is broken on purpose, most of it at once).
pub(super) fn demo_fleet(
    subscriptions: Vec<String>,
    probe: crate::api::ProbeSpec,
    remediation: RemediationSpec,
) -> RdpHealthFleet {
    let mut fleet = RdpHealthFleet::new(
        "demo",
        RdpHealthFleetSpec {
            selector: FleetSelector::of_subscriptions(subscriptions),
            template: MemberTemplate {
                endpoint: Default::default(),
                probe,
                remediation,
                evidence: Default::default(),
            },
            safety: FleetSafety {
                max_unreachable_percent: Some(100),
                ..FleetSafety::default()
            },
            discovery_interval: "1m".into(),
            incident_retention: "1h".into(),
            suspend: false,
        },
    );
    fleet.metadata.namespace = Some("demo".into());
    fleet.metadata.uid = Some("demo-fleet".into());
    fleet.metadata.generation = Some(1);
    fleet
}

/// The demo's Kubernetes for the fleet: an incident object becomes a tracked object that the
/// engine drives; the fleet's status is kept for the view.
pub(super) struct DemoSink {
    engine: Arc<Engine>,
    vms: BTreeMap<String, SimulatedVm>,
    expect: BTreeMap<String, Expect>,
    stops: Mutex<HashMap<String, watch::Sender<bool>>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    status: Mutex<Option<RdpHealthFleetStatus>>,
}

impl DemoSink {
    pub(super) fn new(
        engine: Arc<Engine>,
        vms: BTreeMap<String, SimulatedVm>,
        expect: BTreeMap<String, Expect>,
    ) -> Self {
        Self {
            engine,
            vms,
            expect,
            stops: Mutex::new(HashMap::new()),
            tasks: Mutex::new(Vec::new()),
            status: Mutex::new(None),
        }
    }

    /// The fleet's last status.
    pub(super) fn status(&self) -> Option<RdpHealthFleetStatus> {
        self.status
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Stops every incident's loop.
    pub(super) async fn stop(&self) {
        for stop in self
            .stops
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
        {
            let _ = stop.send(true);
        }
        let tasks: Vec<JoinHandle<()>> =
            std::mem::take(&mut *self.tasks.lock().unwrap_or_else(PoisonError::into_inner));
        for t in tasks {
            let _ = t.await;
        }
    }

    fn log(&self, name: &str, reason: &'static str, note: String) {
        let at = self.engine.state.clock.elapsed();
        if let Ok(mut log) = self.engine.state.log.lock() {
            log.push(LogLine {
                at,
                name: name.to_owned(),
                reason,
                note,
            });
        }
    }

    /// Whether every simulated VM ended as the demo expects: VMs that stay reachable never got
    /// an incident; every other VM's incident settled as its fault implies (a VM another
    /// computer answers for, which the members' identity step finds, is reported).
    pub(super) fn settled(&self) -> bool {
        let Some(status) = self.status() else {
            return false;
        };
        if usize::try_from(status.members).ok() != Some(self.vms.len()) {
            return false;
        }
        let tracked = self.engine.state.snapshot();
        self.vms.iter().all(|(vm, sim)| {
            let incident = tracked.iter().find(|t| vm_of(&t.obj) == *vm);
            let expect = self
                .expect
                .get(vm)
                .copied()
                .unwrap_or_else(|| Expect::for_vm(sim.fault, sim.answers_as.as_deref()));
            match expect {
                Expect::Healthy => incident.is_none(),
                _ => incident.is_some_and(Tracked::settled),
            }
        })
    }
}

/// The lower-case VM name an object watches.
fn vm_of(obj: &RdpHealth) -> String {
    obj.spec.vm_key()
}

#[async_trait::async_trait]
impl FleetSink for DemoSink {
    fn ready(&self) -> bool {
        true
    }

    fn may_write(&self) -> bool {
        true
    }

    fn for_each_object(&self, f: &mut dyn FnMut(&RdpHealth)) {
        if let Ok(objects) = self.engine.state.objects.lock() {
            for t in objects.values() {
                f(&t.obj);
            }
        }
    }

    async fn create(&self, obj: &RdpHealth) -> Result<Created, String> {
        let name = obj.metadata.name.clone().unwrap_or_default();
        let vm = vm_of(obj);
        let sim = self.vms.get(&vm).cloned().unwrap_or(SimulatedVm {
            fault: None,
            answers_as: None,
        });
        let mut obj = obj.clone();
        obj.metadata.generation = Some(1);
        obj.metadata.uid = Some(format!("demo-{name}"));
        {
            let mut objects = self
                .engine
                .state
                .objects
                .lock()
                .map_err(|_| "the demo's state is poisoned".to_owned())?;
            if objects.contains_key(&name) {
                return Ok(Created::Exists);
            }
            objects.insert(
                name.clone(),
                Tracked {
                    obj,
                    fault: sim.fault,
                    answers_as: sim.answers_as.clone(),
                    expect: self
                        .expect
                        .get(&vm)
                        .copied()
                        .unwrap_or_else(|| Expect::for_vm(sim.fault, sim.answers_as.as_deref())),
                    detected_after: None,
                    recovered_after: None,
                    fixed_by: None,
                    diagnosis: None,
                    last_event: None,
                },
            );
        }
        let (stop, stopped) = watch::channel(false);
        self.stops
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.clone(), stop);
        let task = tokio::spawn(driver::drive(Arc::clone(&self.engine), name, stopped));
        self.tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(task);
        Ok(Created::New)
    }

    async fn annotate(
        &self,
        _namespace: &str,
        name: &str,
        annotation: &str,
        value: Option<&str>,
    ) -> Result<(), String> {
        let mut objects = self
            .engine
            .state
            .objects
            .lock()
            .map_err(|_| "the demo's state is poisoned".to_owned())?;
        let tracked = objects
            .get_mut(name)
            .ok_or_else(|| format!("no object {name}"))?;
        crate::fleet::incident::set_annotation(&mut tracked.obj, annotation, value);
        Ok(())
    }

    async fn delete(&self, _namespace: &str, name: &str) -> Result<(), String> {
        if let Some(stop) = self
            .stops
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(name)
        {
            let _ = stop.send(true);
        }
        if let Ok(mut objects) = self.engine.state.objects.lock() {
            objects.remove(name);
        }
        Ok(())
    }

    async fn write_status(
        &self,
        _fleet: &RdpHealthFleet,
        status: &RdpHealthFleetStatus,
    ) -> Result<(), String> {
        *self.status.lock().unwrap_or_else(PoisonError::into_inner) = Some(status.clone());
        Ok(())
    }

    async fn event(&self, _fleet: &RdpHealthFleet, _: Severity, reason: &str, note: String) {
        let reason = match reason {
            "IncidentOpened" => "IncidentOpened",
            "IncidentClosed" => "IncidentClosed",
            "IncidentHeld" => "IncidentHeld",
            _ => "FleetEvent",
        };
        self.log("fleet/demo", reason, note);
    }

    fn observe(&self, _: &RdpHealthFleet, _: &Tally, _: &BTreeMap<String, Member>) {}

    fn discovered(&self, _: &RdpHealthFleet, requests: u32, ok: bool) {
        let note = if ok {
            format!("discovery through Resource Graph: {requests} request(s)")
        } else {
            "discovery failed; keeping the last membership".to_owned()
        };
        self.log("fleet/demo", "Discovered", note);
    }
}
