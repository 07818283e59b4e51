//! A [`FleetSink`] kept in memory: the objects a fleet created, its last status and its Events.
//! The fleet bench runs fleets on it (the Kubernetes objects a fleet would cost are what it
//! holds), and so do the worker's tests.

use std::{
    collections::BTreeMap,
    sync::{Mutex, MutexGuard, PoisonError},
    time::Instant,
};

use super::{
    member::{Member, Tally},
    worker::{Created, FleetSink},
};
use crate::{
    api::{RdpHealth, RdpHealthFleet, RdpHealthFleetStatus},
    engine::Severity,
};

/// What the sink recorded.
#[derive(Debug, Default)]
pub struct Recorded {
    /// Objects by name (the fleet's incidents, and any object a test puts there).
    pub objects: BTreeMap<String, RdpHealth>,
    /// Every create, in order, with when it was asked (an existing name included).
    pub creates: Vec<(String, Instant)>,
    /// Every delete, in order.
    pub deletes: Vec<String>,
    /// Every status written, in order.
    pub statuses: Vec<RdpHealthFleetStatus>,
    /// Every Event's reason, in order.
    pub events: Vec<String>,
    /// Discoveries and the Resource Graph requests they took.
    pub discoveries: Vec<(u32, bool)>,
}

/// The in-memory sink.
#[derive(Debug, Default)]
pub struct MemorySink {
    recorded: Mutex<Recorded>,
    /// While true, this replica does not lead: it may not write.
    pub standby: std::sync::atomic::AtomicBool,
}

impl MemorySink {
    /// What was recorded so far (locked: keep the guard short).
    pub fn recorded(&self) -> MutexGuard<'_, Recorded> {
        self.recorded.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The last status written (default when none yet).
    pub fn status(&self) -> RdpHealthFleetStatus {
        self.recorded().statuses.last().cloned().unwrap_or_default()
    }
}

#[async_trait::async_trait]
impl FleetSink for MemorySink {
    fn ready(&self) -> bool {
        true
    }

    fn may_write(&self) -> bool {
        !self.standby.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn for_each_object(&self, f: &mut dyn FnMut(&RdpHealth)) {
        for obj in self.recorded().objects.values() {
            f(obj);
        }
    }

    async fn create(&self, obj: &RdpHealth) -> Result<Created, String> {
        let name = obj.metadata.name.clone().unwrap_or_default();
        let mut r = self.recorded();
        r.creates.push((name.clone(), Instant::now()));
        if r.objects.contains_key(&name) {
            return Ok(Created::Exists);
        }
        r.objects.insert(name, obj.clone());
        Ok(Created::New)
    }

    async fn delete(&self, _namespace: &str, name: &str) -> Result<(), String> {
        let mut r = self.recorded();
        r.deletes.push(name.to_owned());
        r.objects.remove(name);
        Ok(())
    }

    async fn annotate(
        &self,
        _namespace: &str,
        name: &str,
        annotation: &str,
        value: Option<&str>,
    ) -> Result<(), String> {
        let mut r = self.recorded();
        let obj = r
            .objects
            .get_mut(name)
            .ok_or_else(|| format!("no object {name}"))?;
        super::incident::set_annotation(obj, annotation, value);
        Ok(())
    }

    async fn write_status(
        &self,
        _fleet: &RdpHealthFleet,
        status: &RdpHealthFleetStatus,
    ) -> Result<(), String> {
        self.recorded().statuses.push(status.clone());
        Ok(())
    }

    async fn event(&self, _fleet: &RdpHealthFleet, _: Severity, reason: &str, _note: String) {
        self.recorded().events.push(reason.to_owned());
    }

    fn observe(&self, _: &RdpHealthFleet, _: &Tally, _: &BTreeMap<String, Member>) {}

    fn discovered(&self, _: &RdpHealthFleet, requests: u32, ok: bool) {
        self.recorded().discoveries.push((requests, ok));
    }
}
