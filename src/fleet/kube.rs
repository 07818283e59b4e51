//! Fleets on the API server: a watch over `RdpHealthFleet` objects that starts, updates and
//! stops one worker per fleet, and the [`FleetSink`] the workers write through (incident
//! objects, the fleet's status by server-side apply, Events, metrics).

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use futures::StreamExt;
use kube::{
    Client, Resource,
    api::{Api, DeleteParams, Patch, PatchParams, PostParams},
    core::DeserializeGuard,
    runtime::{
        WatchStreamExt,
        events::{Event as KubeEvent, EventType, Recorder, Reporter},
        reflector::Store,
        watcher,
    },
};
use serde_json::json;
use tokio::sync::watch;
use tracing::{info, warn};

use super::{
    member::{Member, Tally},
    metrics::FleetMetrics,
    worker::{self, Created, Deps, FleetSink},
};
use crate::{
    api::{FIELD_MANAGER, RdpHealth, RdpHealthFleet, RdpHealthFleetStatus},
    controller::Leadership,
    engine::Severity,
};

/// The sink over the API server and the controller's object cache.
pub struct KubeSink {
    client: Client,
    store: Store<DeserializeGuard<RdpHealth>>,
    ready: Arc<AtomicBool>,
    leadership: Leadership,
    recorder: Recorder,
    metrics: Arc<FleetMetrics>,
}

impl KubeSink {
    /// A sink over `client`; `store` and `ready` are the RdpHealth controller's cache and its
    /// first-sync flag.
    pub fn new(
        client: Client,
        store: Store<DeserializeGuard<RdpHealth>>,
        ready: Arc<AtomicBool>,
        leadership: Leadership,
        instance: Option<String>,
        metrics: Arc<FleetMetrics>,
    ) -> Self {
        let reporter = Reporter {
            controller: FIELD_MANAGER.into(),
            instance,
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            store,
            ready,
            leadership,
            metrics,
        }
    }
}

#[async_trait::async_trait]
impl FleetSink for KubeSink {
    fn ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    fn may_write(&self) -> bool {
        self.leadership.is_leader()
    }

    fn for_each_object(&self, f: &mut dyn FnMut(&RdpHealth)) {
        for guard in self.store.state() {
            if let Ok(obj) = &guard.0 {
                f(obj);
            }
        }
    }

    async fn create(&self, obj: &RdpHealth) -> Result<Created, String> {
        let ns = obj.metadata.namespace.as_deref().unwrap_or_default();
        let api: Api<RdpHealth> = Api::namespaced(self.client.clone(), ns);
        match api.create(&PostParams::default(), obj).await {
            Ok(_) => Ok(Created::New),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(Created::Exists),
            Err(e) => Err(format!(
                "failed to create RdpHealth {ns}/{}: {e}",
                obj.metadata.name.as_deref().unwrap_or_default()
            )),
        }
    }

    async fn delete(&self, namespace: &str, name: &str) -> Result<(), String> {
        let api: Api<RdpHealth> = Api::namespaced(self.client.clone(), namespace);
        match api.delete(name, &DeleteParams::default()).await {
            Ok(_) => Ok(()),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
            Err(e) => Err(format!(
                "failed to delete RdpHealth {namespace}/{name}: {e}"
            )),
        }
    }

    async fn annotate(
        &self,
        namespace: &str,
        name: &str,
        annotation: &str,
        value: Option<&str>,
    ) -> Result<(), String> {
        let api: Api<RdpHealth> = Api::namespaced(self.client.clone(), namespace);
        // A merge patch of one annotation (null removes it): nothing else of the object.
        let patch = json!({ "metadata": { "annotations": { annotation: value } } });
        api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map(drop)
            .map_err(|e| format!("failed to annotate RdpHealth {namespace}/{name}: {e}"))
    }

    async fn write_status(
        &self,
        fleet: &RdpHealthFleet,
        status: &RdpHealthFleetStatus,
    ) -> Result<(), String> {
        let ns = fleet.metadata.namespace.as_deref().unwrap_or_default();
        let name = fleet.metadata.name.as_deref().unwrap_or_default();
        let api: Api<RdpHealthFleet> = Api::namespaced(self.client.clone(), ns);
        let body = json!({
            "apiVersion": RdpHealthFleet::api_version(&()),
            "kind": RdpHealthFleet::kind(&()),
            "status": status,
        });
        api.patch_status(
            name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await
        .map(|_| ())
        .map_err(|e| format!("failed to patch the status of RdpHealthFleet {ns}/{name}: {e}"))
    }

    async fn event(&self, fleet: &RdpHealthFleet, severity: Severity, reason: &str, note: String) {
        let event = KubeEvent {
            type_: match severity {
                Severity::Normal => EventType::Normal,
                Severity::Warning => EventType::Warning,
            },
            reason: reason.to_owned(),
            note: Some(note),
            action: "Watch".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &fleet.object_ref(&())).await {
            warn!(error = %e, reason, "failed to publish fleet event");
        }
    }

    fn observe(&self, fleet: &RdpHealthFleet, tally: &Tally, members: &BTreeMap<String, Member>) {
        let ns = fleet.metadata.namespace.as_deref().unwrap_or_default();
        let name = fleet.metadata.name.as_deref().unwrap_or_default();
        self.metrics.observe(ns, name, tally, members);
    }

    fn discovered(&self, fleet: &RdpHealthFleet, requests: u32, ok: bool) {
        let ns = fleet.metadata.namespace.as_deref().unwrap_or_default();
        let name = fleet.metadata.name.as_deref().unwrap_or_default();
        self.metrics.discovered(ns, name, requests, ok);
    }
}

/// A running fleet worker.
struct Running {
    spec: watch::Sender<Arc<RdpHealthFleet>>,
    stop: watch::Sender<bool>,
    uid: Option<String>,
}

/// Watches `api`'s fleets until `shutdown` turns true: one worker per fleet, given each new
/// version of its object; stopped when the fleet is deleted (its incident objects are
/// deleted by Kubernetes' garbage collector, through their owner reference).
pub async fn run(
    api: Api<DeserializeGuard<RdpHealthFleet>>,
    deps: Deps,
    metrics: Arc<FleetMetrics>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut workers: HashMap<(String, String), Running> = HashMap::new();
    let mut seen_in_init: Vec<(String, String)> = Vec::new();
    let mut events = watcher(api, watcher::Config::default())
        .default_backoff()
        .boxed();
    loop {
        let event = tokio::select! {
            _ = shutdown.changed() => break,
            event = events.next() => event,
        };
        let Some(event) = event else { break };
        match event {
            Ok(watcher::Event::Init) => seen_in_init.clear(),
            Ok(watcher::Event::InitApply(guard)) => {
                if let Some(key) = apply(&mut workers, &deps, guard) {
                    seen_in_init.push(key);
                }
            }
            Ok(watcher::Event::InitDone) => {
                workers.retain(|key, running| {
                    let keep = seen_in_init.contains(key);
                    if !keep {
                        let _ = running.stop.send(true);
                        metrics.forget(&key.0, &key.1);
                    }
                    keep
                });
            }
            Ok(watcher::Event::Apply(guard)) => {
                apply(&mut workers, &deps, guard);
            }
            Ok(watcher::Event::Delete(guard)) => {
                let meta = match &guard.0 {
                    Ok(f) => &f.metadata,
                    Err(invalid) => &invalid.metadata,
                };
                let key = (
                    meta.namespace.clone().unwrap_or_default(),
                    meta.name.clone().unwrap_or_default(),
                );
                if let Some(running) = workers.remove(&key) {
                    info!(fleet = %format!("{}/{}", key.0, key.1), "fleet deleted; its worker stops");
                    let _ = running.stop.send(true);
                    metrics.forget(&key.0, &key.1);
                }
            }
            Err(e) => warn!(error = %e, "fleet watch error; retrying"),
        }
    }
    for running in workers.values() {
        let _ = running.stop.send(true);
    }
}

/// Starts or updates the worker of one fleet; returns its key.
fn apply(
    workers: &mut HashMap<(String, String), Running>,
    deps: &Deps,
    guard: DeserializeGuard<RdpHealthFleet>,
) -> Option<(String, String)> {
    let fleet = match guard.0 {
        Ok(f) => f,
        Err(invalid) => {
            warn!(name = ?invalid.metadata.name, error = %invalid.error, "cannot decode an RdpHealthFleet; it is not watched");
            return None;
        }
    };
    let key = (
        fleet.metadata.namespace.clone()?,
        fleet.metadata.name.clone()?,
    );
    let fleet = Arc::new(fleet);
    if let Some(running) = workers.get(&key) {
        if running.uid == fleet.metadata.uid {
            running.spec.send_if_modified(|current| {
                let changed = current.spec != fleet.spec
                    || current.metadata.generation != fleet.metadata.generation;
                if changed {
                    *current = Arc::clone(&fleet);
                }
                changed
            });
            return Some(key);
        }
        // Deleted and created again under the same name: a new fleet.
        let _ = running.stop.send(true);
    }
    let (spec_tx, spec_rx) = watch::channel(Arc::clone(&fleet));
    let (stop_tx, stop_rx) = watch::channel(false);
    info!(fleet = %format!("{}/{}", key.0, key.1), "fleet worker starting");
    tokio::spawn(worker::run(deps.clone(), spec_rx, stop_rx));
    workers.insert(
        key.clone(),
        Running {
            spec: spec_tx,
            stop: stop_tx,
            uid: fleet.metadata.uid.clone(),
        },
    );
    Some(key)
}
