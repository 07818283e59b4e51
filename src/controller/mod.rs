//! The Kubernetes driver: a controller over `RdpHealth` objects (kube-runtime's watch and
//! cache, a queue of its own) that asks the
//! engine what to do, probes, and persists the engine's verdict (status by server-side apply,
//! Events on transitions, metrics).
//!
//! Split along its seams: [`reconcile`] runs one object through the engine, [`status`] writes
//! what it decided (status, Events), [`context`] holds what every reconcile shares (including
//! the hand-over of the fleet view), [`fleet`] the fleet view's counts kept object by object,
//! [`memory`] what this replica remembers between reconciles, [`lease`] leader
//! election, [`queue`] which waiting object is reconciled next and [`runner`] the loop that
//! runs them; this file wires them into a running controller.

mod canary;
mod claims;
mod context;
mod fleet;
mod lease;
mod memory;
mod queue;
mod reconcile;
mod runner;
mod shards;
mod status;
mod tenancy;
#[cfg(test)]
mod tests;

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    net::IpAddr,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::{api::core::v1::ObjectReference, jiff::Timestamp};
use kube::{
    Client, Resource,
    api::{Api, Patch, PatchParams},
    core::{DeserializeGuard, error_boundary::InvalidObject},
    runtime::{
        WatchStreamExt,
        events::{Event as KubeEvent, EventType, Recorder, Reporter},
        reflector::{Store, reflector, store::Writer},
        watcher,
    },
};
use serde_json::json;
use tokio::{net::TcpListener, sync::watch};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::{
    api::{FIELD_MANAGER, Phase, RdpHealth, RdpHealthStatus, RemediationMode, conditions as types},
    azure::{Azure, CountedAzure, Federation, ResourceGraph},
    engine::{
        self, EndpointResolver, Next, Observation, Schedule, Severity, ValidSpec,
        conditions::{self, Desired, Status},
        remediate::{Fleet, RemediateError, Remediator, StatusSink, Subject},
        writes,
    },
    http::{self, HttpError, HttpState},
    ladder::{ExecutionPhase, LadderStatus},
    ladder::{
        Rung,
        fleet::{FleetPolicy, FleetView},
    },
    metrics::{Inventory, Metrics, MetricsError, ObjectKey},
    probe::{Failure, FailureReason, Prober, Target},
};

pub use claims::{CLAIMS_ANNOTATION, Claim, LeaseClaims, Ledger};
pub use context::Context;
use fleet::FleetCounts;
pub use lease::{Leadership, LeaseSettings};
use memory::ProbeMemory;
pub use reconcile::{error_policy, reconcile};
pub use shards::{AUTO_SHARDS, MAX_SHARDS, shard_of};

/// The annotation that holds every rung (`"true"`).
pub const PAUSE_ANNOTATION: &str = "rdphealth.io/pause";
/// The annotation that approves one disruptive rung once: `<Rung>[/<token>]`.
pub const APPROVE_ANNOTATION: &str = "rdphealth.io/approve";

/// Errors of one reconcile.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The object does not match the schema this operator understands.
    #[error("failed to decode the object: {0}")]
    Malformed(#[source] Box<InvalidObject>),
    /// The object has no namespace (RdpHealth is namespaced; this is a broken object).
    #[error("failed to identify the object: it has no namespace or name")]
    MissingKey,
    /// The status patch was rejected.
    #[error("failed to patch the status")]
    PatchStatus(#[source] kube::Error),
    /// The remediation stage could not run (Azure throttled a read, the intent could not be
    /// stored); the probe's result was stored.
    #[error("failed to remediate")]
    Remediate(#[source] RemediateError),
}

impl Error {
    /// PascalCase reason (metric label, event reason).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "MalformedObject",
            Self::MissingKey => "MissingKey",
            Self::PatchStatus(_) => "PatchStatusFailed",
            Self::Remediate(e) => e.reason(),
        }
    }

    /// When to try again, when Azure said (throttling): not exponential.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Remediate(e) => e.retry_after(),
            _ => None,
        }
    }

    /// Errors that retrying cannot fix: wait for the object to change instead.
    pub fn is_permanent(&self) -> bool {
        matches!(self, Self::Malformed(_) | Self::MissingKey)
    }
}

/// Errors that stop the operator.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Metrics could not be set up.
    #[error("failed to set up metrics")]
    Metrics(#[source] MetricsError),
    /// The HTTP server failed.
    #[error("failed to serve HTTP")]
    Http(#[source] HttpError),
}

impl RunError {
    /// PascalCase reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Metrics(_) => "MetricsSetupFailed",
            Self::Http(_) => "HttpFailed",
        }
    }
}

/// How the operator runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Watch one namespace, or all when `None`.
    pub namespace: Option<String>,
    /// Reconciles working (probing, writing, remediating) at once; the others wait their
    /// turn, the object that fell due first going first.
    pub concurrency: u16,
    /// Leader election, or `None` for a single replica.
    pub lease: Option<LeaseSettings>,
    /// Shards across replicas (`--shards`): this many shards, one Lease each named from
    /// `lease`'s name; `None`: one Lease, one leader.
    pub shards: Option<u32>,
    /// This replica's name, shown as the reporting instance of Events.
    pub instance: Option<String>,
    /// Fleet-wide remediation limits.
    pub fleet: FleetPolicy,
    /// The prober's source address as Azure sees it (NSG evaluation), if known.
    pub probe_source: Option<IpAddr>,
    /// How often a status whose only changes are per-probe facts (probe time and latency) is
    /// written anyway ([`writes::HEARTBEAT`] by default).
    pub status_heartbeat: Duration,
    /// An endpoint that should always accept connections; while it does not, every mutating
    /// rung is held (`--canary`).
    pub canary: Option<Target>,
    /// Which Azure scopes each namespace may name (`--tenancy-policy`); `None`: no limit.
    pub tenancy: Option<crate::tenancy::TenancyPolicy>,
    /// Probes of one fleet's members in flight at once.
    pub fleet_probe_concurrency: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            namespace: None,
            concurrency: 16,
            lease: None,
            shards: None,
            instance: None,
            fleet: FleetPolicy::default(),
            probe_source: None,
            status_heartbeat: writes::HEARTBEAT,
            canary: None,
            tenancy: None,
            fleet_probe_concurrency: 256,
        }
    }
}

/// The I/O the engine is fed through: swapped in tests.
#[derive(Clone)]
pub struct Seams {
    /// Probes endpoints.
    pub prober: Arc<dyn Prober>,
    /// Finds endpoints.
    pub resolver: Arc<dyn EndpointResolver>,
    /// Azure (evidence and remediation); `None` runs observe-only, probing objects that name
    /// `spec.endpoint.host`.
    pub azure: Option<Arc<CountedAzure>>,
    /// Acts as the Azure identities the tenancy policy names for namespaces (workload identity
    /// federation); `None`: a namespace that names one is refused.
    pub identities: Option<Arc<Federation>>,
    /// Azure Resource Graph, for fleets' discovery; `None`: fleets are not watched.
    pub graph: Option<Arc<dyn ResourceGraph>>,
}

/// What a reconcile asks for next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Action {
    requeue_after: Option<Duration>,
}

impl Action {
    /// Reconcile again after `after`, or at the next change if that comes first.
    #[must_use]
    pub const fn requeue(after: Duration) -> Self {
        Self {
            requeue_after: Some(after),
        }
    }

    /// Reconcile again at the next change only.
    #[must_use]
    pub const fn await_change() -> Self {
        Self {
            requeue_after: None,
        }
    }

    /// When to reconcile again without a change.
    pub const fn requeue_after(&self) -> Option<Duration> {
        self.requeue_after
    }
}

/// Delay before retrying after `attempt` failed reconciles in a row: 1 s doubling to 5 min.
pub fn backoff_delay(attempt: u32) -> Duration {
    const MAX: Duration = Duration::from_secs(300);
    let exp = attempt.saturating_sub(1).min(16);
    Duration::from_secs(1u64 << exp).min(MAX)
}

fn key_of(meta: &kube::api::ObjectMeta) -> Option<ObjectKey> {
    Some(ObjectKey {
        namespace: meta.namespace.clone()?,
        name: meta.name.clone()?,
    })
}

fn meta_of(guard: &DeserializeGuard<RdpHealth>) -> &kube::api::ObjectMeta {
    match &guard.0 {
        Ok(obj) => &obj.metadata,
        Err(invalid) => &invalid.metadata,
    }
}

/// The controller's object cache, as the metrics see it.
struct StoreInventory(Store<DeserializeGuard<RdpHealth>>);

impl Inventory for StoreInventory {
    fn objects(&self) -> Vec<(ObjectKey, Option<Phase>)> {
        self.0
            .state()
            .iter()
            .filter_map(|guard| {
                let key = key_of(meta_of(guard))?;
                let phase = guard
                    .0
                    .as_ref()
                    .ok()
                    .and_then(|o| o.status.as_ref())
                    .and_then(|s| s.phase);
                Some((key, phase))
            })
            .collect()
    }
}

/// kubectl's copy of the whole object in an annotation; nothing here reads it.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Drops from a watched object what the operator never reads, before it enters the cache:
/// `managedFields` (a field map per writer, often larger than the spec) and kubectl's
/// last-applied annotation (a second copy of the spec). Status writes name the object's
/// `resourceVersion`, which is kept.
pub fn trim(guard: &mut DeserializeGuard<RdpHealth>) {
    let meta = match &mut guard.0 {
        Ok(obj) => &mut obj.metadata,
        Err(invalid) => &mut invalid.metadata,
    };
    meta.managed_fields = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.remove(LAST_APPLIED);
    }
}

/// The watch of `api`: it marks `ready` after its first complete list, keeps `memory` free of
/// deleted objects and `fleet` counting what other replicas wrote; the object cache it fills,
/// and its changes as triggers of reconciles.
fn watch_objects(
    api: Api<DeserializeGuard<RdpHealth>>,
    ready: Arc<AtomicBool>,
    memory: Arc<ProbeMemory>,
    fleet: Arc<Mutex<FleetCounts>>,
) -> (runner::Triggers, Store<DeserializeGuard<RdpHealth>>) {
    let writer = Writer::default();
    let store = writer.as_reader();
    let events = watcher(api, watcher::Config::default())
        .default_backoff()
        .modify(trim)
        .inspect_ok(move |event| {
            if matches!(event, watcher::Event::InitDone) && !ready.swap(true, Ordering::AcqRel) {
                info!("first watch sync done: ready");
            }
        });
    let cache = store.clone();
    // After the reflector, so that the cache already reflects the event.
    let objects = reflector(writer, events)
        .inspect_ok(move |event| {
            memory.follow(event, &cache);
            fleet
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .follow(event, &cache);
        })
        .applied_objects();
    (runner::changes(objects), store)
}

/// Runs the operator until `shutdown` resolves: the controller, the HTTP endpoints on
/// `listener`, and leader election when configured.
pub async fn run(
    client: Client,
    settings: Settings,
    seams: Seams,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) -> Result<(), RunError> {
    let metrics = Arc::new(Metrics::new().map_err(RunError::Metrics)?);
    if let Some(azure) = &seams.azure {
        metrics.register_azure(azure).map_err(RunError::Metrics)?;
    }
    let (leadership, lease_task, acquired) = shards::leadership_for(&client, &settings);
    let api: Api<DeserializeGuard<RdpHealth>> = match &settings.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let ready = Arc::new(AtomicBool::new(false));
    let memory = Arc::new(ProbeMemory::default());
    let fleet = Arc::new(Mutex::new(FleetCounts::default()));
    let (changes, store) = watch_objects(
        api,
        Arc::clone(&ready),
        Arc::clone(&memory),
        Arc::clone(&fleet),
    );
    let (namespace_changes, namespaces) =
        tenancy::follow_namespaces(&client, &store, settings.tenancy.as_ref());
    let mut triggers = vec![changes];
    triggers.extend(namespace_changes);
    triggers.extend(shards::reconcile_when_acquired(acquired));
    let triggers = futures::stream::select_all(triggers).boxed();
    let ready_flag = Arc::clone(&ready);
    let store_for_runner = store.clone();
    let state = HttpState {
        metrics: Arc::clone(&metrics),
        inventory: Arc::new(StoreInventory(store.clone())),
        ready,
    };
    let (stop_http, http_stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(http::serve(listener, state, async move {
        let _ = http_stopped.await;
    }));

    let remediation = seams.azure.is_some();
    let client_for_claims = client.clone();
    let ctx = Arc::new(
        Context::new(
            client,
            seams,
            metrics,
            leadership,
            settings.instance.clone(),
        )
        .with_remediation(settings.fleet, settings.probe_source)
        .with_shared_claims(shards::shared_claims(&client_for_claims, &settings))
        .with_store(store.clone())
        .with_memory(memory)
        .with_fleet_counts(fleet)
        .with_status_heartbeat(settings.status_heartbeat)
        .with_tenancy(settings.tenancy.clone(), namespaces),
    );
    let (stop_fleets, fleets_stopped) = watch::channel(false);
    let fleets = fleets(&ctx, &settings, &ready_flag, fleets_stopped);
    let canary = match (&settings.canary, &ctx.remediator) {
        (Some(target), Some(r)) => Some(tokio::spawn(canary::watch(
            Arc::clone(&ctx.seams.prober),
            target.clone(),
            Arc::clone(&r.fleet),
            Arc::clone(&ctx.metrics),
            canary::CANARY_INTERVAL,
        ))),
        _ => None,
    };
    info!(namespace = ?settings.namespace, concurrency = settings.concurrency, remediation, "controller starting");
    // Stopping lets the reconciles at work finish; those still waiting do not start.
    runner::run(
        store_for_runner,
        triggers,
        Arc::new(runner::Reconciles(Arc::clone(&ctx))),
        settings.concurrency.into(),
        shutdown,
    )
    .await;
    info!("controller stopped; shutting down");
    let _ = stop_fleets.send(true);
    if let Some(fleets) = fleets {
        let _ = fleets.await;
    }
    if let Some(canary) = canary {
        canary.abort();
    }
    let _ = stop_http.send(());
    let served = server.await;
    if let Some(lease) = lease_task {
        lease.release().await;
    }
    match served {
        Ok(result) => result.map_err(RunError::Http),
        Err(_) => Ok(()),
    }
}

/// Starts the fleets' watch when Azure Resource Graph is configured: one worker per
/// `RdpHealthFleet`, writing through this replica's client while it leads.
fn fleets(
    ctx: &Context,
    settings: &Settings,
    ready: &Arc<AtomicBool>,
    stop: watch::Receiver<bool>,
) -> Option<tokio::task::JoinHandle<()>> {
    let Some(graph) = ctx.seams.graph.clone() else {
        info!("no Azure Resource Graph: RdpHealthFleets are not watched");
        return None;
    };
    let store = ctx.store.clone()?;
    let metrics = match crate::fleet::metrics::FleetMetrics::new() {
        Ok(m) => Arc::new(m),
        Err(e) => {
            warn!(error = %e, "failed to set up fleet metrics: RdpHealthFleets are not watched");
            return None;
        }
    };
    if let Err(e) = ctx.metrics.register(metrics.collectors()) {
        warn!(error = %e, "failed to register fleet metrics: RdpHealthFleets are not watched");
        return None;
    }
    let sink = crate::fleet::kube::KubeSink::new(
        ctx.client.clone(),
        store,
        Arc::clone(ready),
        // With shards, fleets are discovered by the holder of shard 0 only.
        ctx.leadership.for_singletons(),
        settings.instance.clone(),
        Arc::clone(&metrics),
    );
    let deps = crate::fleet::Deps {
        graph,
        prober: Arc::clone(&ctx.seams.prober),
        sink: Arc::new(sink),
        max_unreachable_percent: settings.fleet.max_unreachable_percent,
        min_fleet_size: settings.fleet.min_fleet_size,
        probe_concurrency: settings.fleet_probe_concurrency,
        refusal: settings.tenancy.is_some().then(|| {
            "the operator runs with a tenancy policy: fleets are refused, because a fleet's discovery would read whole subscriptions with the operator's own identity; write RdpHealth objects instead".to_owned()
        }),
    };
    let api: Api<DeserializeGuard<crate::api::RdpHealthFleet>> = match &settings.namespace {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    info!("watching RdpHealthFleets");
    Some(tokio::spawn(crate::fleet::kube::run(
        api, deps, metrics, stop,
    )))
}
