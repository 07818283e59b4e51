//! What this replica remembers about each object between reconciles.

use super::*;

/// What this replica remembers about one object between reconciles: enough to continue from
/// the last status it computed, written or (when only per-probe facts changed, see [`writes`])
/// not, in a few bytes.
#[derive(Debug, Clone)]
pub(super) struct Remembered {
    /// When it last probed the object (`None` when it only looked at it).
    pub(super) probed_at: Option<Timestamp>,
    /// [`writes::fingerprint`] of that status.
    pub(super) story: u64,
    /// Its per-probe facts.
    pub(super) per_probe: writes::PerProbe,
}

impl Remembered {
    pub(super) fn of(probed_at: Option<Timestamp>, status: &RdpHealthStatus) -> Self {
        Self {
            probed_at,
            story: writes::fingerprint(status),
            per_probe: writes::PerProbe::of(status),
        }
    }
}

/// Per-object memory of this replica, keyed by object UID: when each object was last probed
/// and the status that produced, which the stored status may lag behind (healthy probes that
/// change nothing a user cares about are not written). Entries go when their object is
/// deleted. Lost on restart, by design: the schedule then works from `status.lastProbe`.
#[derive(Debug, Default)]
pub(super) struct ProbeMemory {
    pub(super) objects: Mutex<HashMap<String, Arc<Remembered>>>,
}

impl ProbeMemory {
    pub(super) fn objects(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Remembered>>> {
        self.objects.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn get(&self, id: &str) -> Option<Arc<Remembered>> {
        self.objects().get(id).cloned()
    }

    pub(super) fn remember(&self, id: String, remembered: Remembered) {
        self.objects().insert(id, Arc::new(remembered));
    }

    pub(super) fn forget(&self, id: &str) {
        self.objects().remove(id);
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.objects().len()
    }

    /// Follows the watch: a deleted object is forgotten; after a (re)list, every object the
    /// list no longer holds is (its deletion may have happened while the watch was down).
    pub(super) fn follow(
        &self,
        event: &watcher::Event<DeserializeGuard<RdpHealth>>,
        store: &Store<DeserializeGuard<RdpHealth>>,
    ) {
        match event {
            watcher::Event::Delete(guard) => {
                if let Some(id) = memory_id(meta_of(guard)) {
                    self.forget(&id);
                }
            }
            watcher::Event::InitDone => {
                let live: HashSet<String> = store
                    .state()
                    .iter()
                    .filter_map(|g| memory_id(meta_of(g)))
                    .collect();
                self.objects().retain(|id, _| live.contains(id));
            }
            watcher::Event::Apply(_) | watcher::Event::Init | watcher::Event::InitApply(_) => {}
        }
    }
}

/// The key of an object in [`ProbeMemory`]: its UID (a re-created object starts afresh), or
/// `namespace/name` when it has none.
pub(super) fn memory_id(meta: &kube::api::ObjectMeta) -> Option<String> {
    meta.uid
        .clone()
        .or_else(|| key_of(meta).map(|k| format!("{}/{}", k.namespace, k.name)))
}

/// `obj` with the remembered status, while the stored one tells the same story (it lags behind
/// only in per-probe facts); `None` when the stored status is the one to continue from (nothing
/// remembered, a write was lost, or another replica wrote since). Boxed: it lives across the
/// awaits of a reconcile, and an inline object would make every reconcile future that large.
pub(super) fn continued(
    obj: &RdpHealth,
    remembered: Option<&Remembered>,
) -> Option<Box<RdpHealth>> {
    match (&obj.status, remembered) {
        (Some(stored), Some(r)) if writes::fingerprint(stored) == r.story => {
            let mut newer = Box::new(obj.clone());
            if let Some(status) = newer.status.as_mut() {
                r.per_probe.apply(status);
            }
            Some(newer)
        }
        _ => None,
    }
}
