//! The Kubernetes driver: a kube-runtime `Controller` over `RdpHealth` objects that asks the
//! engine what to do, probes, and persists the engine's verdict (status by server-side apply,
//! Events on transitions, metrics).

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
        Controller, WatchStreamExt,
        controller::{Action, Config},
        events::{Event as KubeEvent, EventType, Recorder, Reporter},
        reflector::{Store, reflector, store::Writer},
        watcher,
    },
};
use kube_lease_manager::{LeaseManagerBuilder, LeaseManagerError};
use serde_json::json;
use tokio::{net::TcpListener, sync::watch};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::{
    api::{FIELD_MANAGER, Phase, RdpHealth, RdpHealthStatus, RemediationMode, conditions as types},
    azure::{Azure, CountedAzure},
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
        fleet::{FleetPolicy, FleetView, Member},
    },
    metrics::{Inventory, Metrics, MetricsError, ObjectKey},
    probe::{Failure, FailureReason, Prober, Target},
};

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
    /// The lease for leader election could not be set up.
    #[error("failed to set up leader election")]
    Lease(#[source] LeaseManagerError),
    /// The HTTP server failed.
    #[error("failed to serve HTTP")]
    Http(#[source] HttpError),
}

impl RunError {
    /// PascalCase reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Metrics(_) => "MetricsSetupFailed",
            Self::Lease(_) => "LeaseSetupFailed",
            Self::Http(_) => "HttpFailed",
        }
    }
}

/// Whether this replica holds the lease. Every replica probes; only the leader will act
/// once remediation exists.
#[derive(Debug, Clone)]
pub struct Leadership(watch::Receiver<bool>);

impl Leadership {
    /// Leadership without election (one replica): always the leader.
    pub fn always() -> Self {
        let (_, rx) = watch::channel(true);
        Self(rx)
    }

    /// Leadership that follows `rx`.
    pub fn from_receiver(rx: watch::Receiver<bool>) -> Self {
        Self(rx)
    }

    /// True while this replica holds the lease.
    pub fn is_leader(&self) -> bool {
        *self.0.borrow()
    }
}

/// Lease settings for leader election.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseSettings {
    /// Lease name.
    pub name: String,
    /// Lease namespace.
    pub namespace: String,
    /// This replica's identity (pod name).
    pub identity: String,
    /// Seconds a lease stays valid without renewal.
    pub duration_seconds: u64,
    /// Seconds before expiry at which the holder renews.
    pub grace_seconds: u64,
}

/// How the operator runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Watch one namespace, or all when `None`.
    pub namespace: Option<String>,
    /// Reconciles running at once.
    pub concurrency: u16,
    /// Leader election, or `None` for a single replica.
    pub lease: Option<LeaseSettings>,
    /// This replica's name, shown as the reporting instance of Events.
    pub instance: Option<String>,
    /// Fleet-wide remediation limits.
    pub fleet: FleetPolicy,
    /// The prober's source address as Azure sees it (NSG evaluation), if known.
    pub probe_source: Option<IpAddr>,
    /// How often a status whose only changes are per-probe facts (probe time and latency) is
    /// written anyway ([`writes::HEARTBEAT`] by default).
    pub status_heartbeat: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            namespace: None,
            concurrency: 16,
            lease: None,
            instance: None,
            fleet: FleetPolicy::default(),
            probe_source: None,
            status_heartbeat: writes::HEARTBEAT,
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
}

/// What this replica remembers about one object between reconciles: enough to continue from
/// the last status it computed, written or (when only per-probe facts changed, see [`writes`])
/// not, in a few bytes.
#[derive(Debug, Clone)]
struct Remembered {
    /// When it last probed the object (`None` when it only looked at it).
    probed_at: Option<Timestamp>,
    /// [`writes::fingerprint`] of that status.
    story: u64,
    /// Its per-probe facts.
    per_probe: writes::PerProbe,
}

impl Remembered {
    fn of(probed_at: Option<Timestamp>, status: &RdpHealthStatus) -> Self {
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
struct ProbeMemory {
    objects: Mutex<HashMap<String, Arc<Remembered>>>,
}

impl ProbeMemory {
    fn objects(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Remembered>>> {
        self.objects.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn get(&self, id: &str) -> Option<Arc<Remembered>> {
        self.objects().get(id).cloned()
    }

    fn remember(&self, id: String, remembered: Remembered) {
        self.objects().insert(id, Arc::new(remembered));
    }

    fn forget(&self, id: &str) {
        self.objects().remove(id);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.objects().len()
    }

    /// Follows the watch: a deleted object is forgotten; after a (re)list, every object the
    /// list no longer holds is (its deletion may have happened while the watch was down).
    fn follow(
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
fn memory_id(meta: &kube::api::ObjectMeta) -> Option<String> {
    meta.uid
        .clone()
        .or_else(|| key_of(meta).map(|k| format!("{}/{}", k.namespace, k.name)))
}

/// `obj` with the remembered status, while the stored one tells the same story (it lags behind
/// only in per-probe facts); `None` when the stored status is the one to continue from (nothing
/// remembered, a write was lost, or another replica wrote since). Boxed: it lives across the
/// awaits of a reconcile, and an inline object would make every reconcile future that large.
fn continued(obj: &RdpHealth, remembered: Option<&Remembered>) -> Option<Box<RdpHealth>> {
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

/// What every reconcile shares.
pub struct Context {
    client: Client,
    recorder: Recorder,
    seams: Seams,
    metrics: Arc<Metrics>,
    leadership: Leadership,
    /// Failed reconciles in a row, per object (exponential backoff).
    failures: Mutex<HashMap<ObjectKey, u32>>,
    /// The remediation stage, when Azure is configured.
    remediator: Option<Remediator>,
    /// Every object (the controller's cache), for fleet safety.
    store: Option<Store<DeserializeGuard<RdpHealth>>>,
    /// When each object was last probed, and the status that produced.
    memory: Arc<ProbeMemory>,
    /// How often a status whose only changes are per-probe facts is written anyway.
    heartbeat: Duration,
}

impl Context {
    /// A context for `client`.
    pub fn new(
        client: Client,
        seams: Seams,
        metrics: Arc<Metrics>,
        leadership: Leadership,
        instance: Option<String>,
    ) -> Self {
        let reporter = Reporter {
            controller: FIELD_MANAGER.into(),
            instance,
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            seams,
            metrics,
            leadership,
            failures: Mutex::new(HashMap::new()),
            remediator: None,
            store: None,
            memory: Arc::new(ProbeMemory::default()),
            heartbeat: writes::HEARTBEAT,
        }
    }

    /// Shares `memory` (the watch stream forgets deleted objects in it).
    fn with_memory(mut self, memory: Arc<ProbeMemory>) -> Self {
        self.memory = memory;
        self
    }

    /// Writes a status whose only changes are per-probe facts at most this often.
    fn with_status_heartbeat(mut self, heartbeat: Duration) -> Self {
        self.heartbeat = heartbeat;
        self
    }

    /// Enables the remediation stage with `fleet` limits (needs `seams.azure`).
    pub fn with_remediation(mut self, fleet: FleetPolicy, probe_source: Option<IpAddr>) -> Self {
        self.remediator = self.seams.azure.clone().map(|azure| Remediator {
            azure: azure as Arc<dyn Azure>,
            fleet: Arc::new(Fleet::new(fleet)),
            probe_source,
            first_poll: Duration::from_secs(1),
            vm_rdp_port: None,
            secrets: Some(Arc::new(crate::secrets::KubeSecrets::new(
                self.client.clone(),
            ))),
        });
        self
    }

    /// Recomputes the fleet view (storm breaker, disruptive rungs in flight) and the
    /// suspended-remediation gauge from every cached object.
    /// `fresh` is the object being reconciled with its new status (the cache lags behind it).
    fn refresh_fleet(&self, leader: bool, fresh: Option<(&ObjectKey, &RdpHealthStatus)>) {
        let Some(store) = &self.store else {
            return;
        };
        let objects = store.state();
        let fresh_key = fresh.map(|(k, _)| format!("{}/{}", k.namespace, k.name));
        let members: Vec<FleetMember> = objects
            .iter()
            .filter_map(|guard| {
                let mut m = FleetMember::of(guard.0.as_ref().ok()?)?;
                if let (Some(key), Some((_, status))) = (&fresh_key, fresh)
                    && m.key == *key
                {
                    m.unreachable = conditions::status_of(&status.conditions, types::REACHABLE)
                        == Some(Status::False);
                }
                Some(m)
            })
            .collect();
        let view = FleetView::from_members(members.iter().map(|m| Member {
            key: &m.key,
            subscription: &m.subscription,
            unreachable: m.unreachable,
            disruptive_in_flight: m.disruptive_in_flight,
        }));
        let storming = match &self.remediator {
            Some(r) => {
                let live: std::collections::HashSet<String> = objects
                    .iter()
                    .filter_map(|g| key_of(meta_of(g)))
                    .map(|k| format!("{}/{}", k.namespace, k.name))
                    .collect();
                r.fleet.retain_claims(|key| live.contains(key));
                r.fleet.update(view);
                r.fleet.storming()
            }
            None => Vec::new(),
        };
        let count = |f: &dyn Fn(&FleetMember) -> bool| members.iter().filter(|m| f(m)).count();
        let suspended_by =
            |reason: &str| count(&|m: &FleetMember| m.suspended.as_deref() == Some(reason));
        self.metrics.suspended(&[
            (
                "StormBreaker",
                count(&|m: &FleetMember| storming.contains(&m.subscription)),
            ),
            ("Paused", suspended_by("Paused")),
            (
                "OutsideMaintenanceWindow",
                suspended_by("OutsideMaintenanceWindow"),
            ),
            (
                "NotLeader",
                if leader || self.remediator.is_none() {
                    0
                } else {
                    count(&|m: &FleetMember| m.acting && m.unreachable)
                },
            ),
        ]);
    }

    /// The object cache the fleet view is computed from.
    pub fn with_store(mut self, store: Store<DeserializeGuard<RdpHealth>>) -> Self {
        self.store = Some(store);
        self
    }

    /// This replica's leadership.
    pub fn leadership(&self) -> &Leadership {
        &self.leadership
    }

    /// The metrics.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    fn failures(&self) -> std::sync::MutexGuard<'_, HashMap<ObjectKey, u32>> {
        self.failures.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Resolves the endpoint and probes it once.
    async fn observe(&self, spec: &ValidSpec) -> Observation {
        let endpoint = match self.seams.resolver.resolve(spec).await {
            Ok(endpoint) => endpoint,
            Err(e) => return Observation::Unresolved(e),
        };
        let target = Target {
            host: endpoint.host.clone(),
            port: endpoint.port,
        };
        let report = self
            .seams
            .prober
            .probe(&target, &spec.probe.options())
            .await;
        self.metrics.probe_finished(&report);
        if !report.reachable {
            self.seams.resolver.probe_failed(spec);
        }
        Observation::Probed {
            endpoint,
            report: Box::new(report),
        }
    }
}

/// One monitored object as fleet safety sees it.
struct FleetMember {
    key: String,
    subscription: String,
    unreachable: bool,
    disruptive_in_flight: bool,
    /// The remediation mode may act (DryRun or Auto).
    acting: bool,
    /// The reason of a `RemediationSuspended=True` condition.
    suspended: Option<String>,
}

impl FleetMember {
    fn of(obj: &RdpHealth) -> Option<Self> {
        if obj.spec.suspend {
            return None;
        }
        let meta = &obj.metadata;
        let key = format!("{}/{}", meta.namespace.as_deref()?, meta.name.as_deref()?);
        let mut parts = obj.spec.vm.resource_id.split('/');
        let subscription = parts
            .by_ref()
            .skip_while(|p| !p.eq_ignore_ascii_case("subscriptions"))
            .nth(1)?
            .to_string();
        let status = obj.status.as_ref();
        let conditions = status.map(|s| s.conditions.as_slice()).unwrap_or_default();
        Some(Self {
            key,
            subscription,
            unreachable: conditions::status_of(conditions, types::REACHABLE) == Some(Status::False),
            disruptive_in_flight: status
                .and_then(|s| s.ladder.current.as_ref())
                .is_some_and(|c| c.step.rung.is_disruptive()),
            acting: obj.spec.remediation.mode != RemediationMode::Observe,
            suspended: conditions::find(conditions, types::REMEDIATION_SUSPENDED)
                .filter(|c| c.status == Status::True.as_str())
                .map(|c| c.reason.clone()),
        })
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

/// Reconciles one object: schedule → (resolve, probe) → evaluate → status, metrics, events.
pub async fn reconcile(
    guard: Arc<DeserializeGuard<RdpHealth>>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_timer();
    let obj = match &guard.0 {
        Ok(obj) => obj,
        Err(invalid) => {
            report_malformed(&ctx, invalid).await;
            return Err(Error::Malformed(Box::new(invalid.clone())));
        }
    };
    let key = key_of(&obj.metadata).ok_or(Error::MissingKey)?;
    let span = info_span!("reconcile", namespace = %key.namespace, name = %key.name, vm = %obj.spec.vm.resource_id);
    reconcile_object(obj, &key, &ctx).instrument(span).await
}

async fn reconcile_object(
    stored: &RdpHealth,
    key: &ObjectKey,
    ctx: &Context,
) -> Result<Action, Error> {
    let now = Timestamp::now();
    let leader = ctx.leadership.is_leader();
    let id = memory_id(&stored.metadata).ok_or(Error::MissingKey)?;
    let remembered = ctx.memory.get(&id);
    let last_probed = remembered.as_ref().and_then(|r| r.probed_at);
    // From here on `obj` may carry a newer status than the API server has: see `continued`.
    let newer = continued(stored, remembered.as_deref());
    let obj = newer.as_deref().unwrap_or(stored);
    let spec = ValidSpec::try_from(&obj.spec).ok().filter(|s| !s.suspend);
    let due = match (&ctx.remediator, &spec, &obj.status) {
        (Some(_), Some(spec), Some(status)) if leader => engine::ladder_due(status, spec)
            .map(|t| Duration::try_from(t.duration_since(now)).unwrap_or(Duration::ZERO)),
        _ => None,
    };
    let (observation, next_probe) = match engine::schedule(obj, last_probed, now) {
        Schedule::Wait(left) => match due {
            Some(d) if d.is_zero() => (Observation::NotProbed, Some(left)),
            other => {
                let wait = other.map_or(left, |d| d.min(left));
                debug!(wait_ms = wait.as_millis() as u64, "no probe due");
                ctx.failures().remove(key);
                return Ok(Action::requeue(wait));
            }
        },
        Schedule::AwaitChange => match due {
            Some(d) if d.is_zero() => (Observation::NotProbed, None),
            Some(d) => return Ok(Action::requeue(d)),
            None => return Ok(Action::await_change()),
        },
        Schedule::Report => (Observation::NotProbed, None),
        Schedule::Probe(spec) => (ctx.observe(&spec).await, None),
    };
    let probed = match &observation {
        Observation::Probed { report, .. } => Some((report.reachable, report.failure.clone())),
        _ => None,
    };
    let probed_at = if probed.is_some() {
        Some(now)
    } else {
        last_probed
    };
    // Without a probe in this reconcile, the ladder reasons from the last one.
    let failure = match &probed {
        Some((_, failure)) => failure.clone(),
        None => last_failure(obj.status.as_ref()),
    };
    let mut outcome = engine::evaluate(obj, observation, now);
    if let Some(left) = next_probe {
        // A look for the ladder only: the next probe stays where it was.
        outcome.next = Next::Requeue(left);
    }
    ctx.refresh_fleet(leader, Some((key, &outcome.status)));
    if !leader {
        // Only the Lease holder writes status and Events: a stale write from a standby
        // replica could erase the intent of a rung in flight. Standbys probe for their metrics.
        ctx.metrics.object_status(key, &outcome.status);
        ctx.memory
            .remember(id, Remembered::of(probed_at, &outcome.status));
        return Ok(action(outcome.next));
    }
    let probe_events = outcome.events.len();
    let before = obj
        .status
        .as_ref()
        .map(|s| s.ladder.clone())
        .unwrap_or_default();
    let stage = match (&ctx.remediator, &spec) {
        (Some(remediator), Some(spec)) => {
            let approval = approval(obj, &outcome.status);
            let subject = Subject {
                key: &format!("{}/{}", key.namespace, key.name),
                seed: obj.metadata.uid.as_deref().unwrap_or(&key.name),
                spec,
                failure: failure.as_ref(),
                probed: probed.as_ref().map(|(ok, _)| *ok),
                leader,
                paused: annotation(obj, PAUSE_ANNOTATION) == Some("true"),
                approval,
            };
            let sink = ApplyStatus {
                client: &ctx.client,
                key,
            };
            let result = remediator
                .remediate(&subject, &mut outcome, &sink, now)
                .await;
            if address_may_have_changed(&before, &outcome.status.ladder) {
                ctx.seams.resolver.forget(spec);
            }
            Some(result)
        }
        (None, Some(spec)) => {
            azure_missing(&mut outcome.status, spec, now);
            None
        }
        _ => None,
    };
    // Only news is written (and a heartbeat): a healthy, unchanged object costs no write and
    // so no watch event either. Compared with what the API server holds, not with `obj`.
    if writes::needs_write(stored.status.as_ref(), &outcome.status, ctx.heartbeat)
        && let Err(e) = patch_status(&ctx.client, key, &outcome.status).await
    {
        // Start again from the stored status: the retry probes and writes afresh.
        ctx.memory.forget(&id);
        return Err(e);
    }
    ctx.metrics.object_status(key, &outcome.status);
    ctx.metrics
        .count_remediations(&before, &outcome.status.ladder, now);
    publish(ctx, obj, &outcome.events, probe_events).await;
    ctx.memory
        .remember(id, Remembered::of(probed_at, &outcome.status));
    if let Some(Err(e)) = stage {
        return Err(Error::Remediate(e));
    }
    ctx.failures().remove(key);
    debug!(phase = ?outcome.status.phase, next = ?outcome.next, "reconciled");
    Ok(action(outcome.next))
}

/// The failure of the last probe, as recorded in status.
fn last_failure(status: Option<&RdpHealthStatus>) -> Option<Failure> {
    let last = status?.last_probe.as_ref()?;
    let name = last.failure_reason.as_deref()?;
    let reason = FailureReason::ALL
        .into_iter()
        .find(|r| r.as_str() == name)?;
    Some(Failure::new(
        reason,
        last.message.clone().unwrap_or_default(),
    ))
}

fn action(next: Next) -> Action {
    match next {
        Next::Requeue(after) => Action::requeue(after),
        Next::AwaitChange => Action::await_change(),
    }
}

fn annotation<'a>(obj: &'a RdpHealth, name: &str) -> Option<&'a str> {
    obj.metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(name))
        .map(|v| v.trim())
}

/// The approval annotation, unless its value was used already: `<Rung>[/<token>]`.
fn approval(obj: &RdpHealth, status: &RdpHealthStatus) -> Option<(String, Rung)> {
    let value = annotation(obj, APPROVE_ANNOTATION)?;
    if status.ladder.consumed_approval.as_deref() == Some(value) {
        return None;
    }
    let name = value.split('/').next().unwrap_or_default();
    let rung = Rung::ALL.into_iter().find(|r| r.as_str() == name)?;
    Some((value.to_string(), rung))
}

/// A NIC reset or redeploy finished (or was judged): the VM may have new addresses.
fn address_may_have_changed(before: &LadderStatus, after: &LadderStatus) -> bool {
    let settling = |l: &LadderStatus| {
        l.current
            .as_ref()
            .filter(|c| c.step.rung.may_change_address() && c.phase == ExecutionPhase::Settling)
            .map(|c| c.started_at.clone())
    };
    let last_before = before.history.last().map(|r| r.finished_at.0);
    let finished = after
        .history
        .iter()
        .filter(|r| last_before.is_none_or(|t| r.finished_at.0 > t))
        .any(|r| r.step.rung.may_change_address());
    finished || (settling(after).is_some() && settling(after) != settling(before))
}

/// Objects that need Azure (no host override, or a remediation mode) say that it is missing.
fn azure_missing(status: &mut RdpHealthStatus, spec: &ValidSpec, now: Timestamp) {
    let mode = spec.mode;
    if spec.host.is_some() && mode == RemediationMode::Observe {
        return;
    }
    conditions::merge(
        &mut status.conditions,
        Desired::new(
            types::REMEDIATING,
            Status::False,
            "AzureNotConfigured",
            "the operator runs without Azure credentials: it only probes; evidence and remediation are off",
        ),
        status.observed_generation,
        now,
    );
}

/// Writes the intent of a rung before its Azure call.
struct ApplyStatus<'a> {
    client: &'a Client,
    key: &'a ObjectKey,
}

#[async_trait::async_trait]
impl StatusSink for ApplyStatus<'_> {
    async fn persist(&self, status: &RdpHealthStatus) -> Result<(), String> {
        patch_status(self.client, self.key, status)
            .await
            .map_err(|e| match e {
                Error::PatchStatus(source) => format!("failed to patch the status: {source}"),
                other => other.to_string(),
            })
    }
}

/// Writes the whole status by server-side apply under [`FIELD_MANAGER`].
async fn patch_status(
    client: &Client,
    key: &ObjectKey,
    status: &RdpHealthStatus,
) -> Result<(), Error> {
    let api: Api<RdpHealth> = Api::namespaced(client.clone(), &key.namespace);
    let body = json!({
        "apiVersion": RdpHealth::api_version(&()),
        "kind": RdpHealth::kind(&()),
        "status": status,
    });
    api.patch_status(
        &key.name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await
    .map_err(Error::PatchStatus)?;
    Ok(())
}

/// Publishes the engine's events. A lost Event must not undo a status that was written, so
/// failures are logged and counted rather than failing the reconcile.
async fn publish(ctx: &Context, obj: &RdpHealth, events: &[engine::Event], probe_events: usize) {
    let reference = obj.object_ref(&());
    for (i, event) in events.iter().enumerate() {
        let ev = KubeEvent {
            type_: match event.severity {
                Severity::Normal => EventType::Normal,
                Severity::Warning => EventType::Warning,
            },
            reason: event.reason.to_string(),
            note: Some(event.note.clone()),
            action: if i < probe_events {
                "Probe"
            } else {
                "Remediate"
            }
            .into(),
            secondary: None,
        };
        info!(reason = event.reason, note = %event.note, "event");
        if let Err(e) = ctx.recorder.publish(&ev, &reference).await {
            warn!(error = %e, reason = event.reason, "failed to publish event");
            ctx.metrics.reconcile_failed("PublishEventFailed");
        }
    }
}

/// Tells the object's owner, through a Warning Event, why the operator cannot read it. (Its
/// status is left alone: without a readable status, no write could keep transition times.)
async fn report_malformed(ctx: &Context, invalid: &InvalidObject) {
    let meta = &invalid.metadata;
    let reference = ObjectReference {
        api_version: Some(RdpHealth::api_version(&()).into_owned()),
        kind: Some(RdpHealth::kind(&()).into_owned()),
        name: meta.name.clone(),
        namespace: meta.namespace.clone(),
        uid: meta.uid.clone(),
        resource_version: meta.resource_version.clone(),
        ..Default::default()
    };
    let note: String = format!("failed to decode the object: {}", invalid.error)
        .chars()
        .take(1000)
        .collect();
    let event = KubeEvent {
        type_: EventType::Warning,
        reason: "MalformedObject".into(),
        note: Some(note),
        action: "Decode".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &reference).await {
        warn!(error = %e, "failed to publish event");
        ctx.metrics.reconcile_failed("PublishEventFailed");
    }
}

/// Decides how to retry after an error: permanent errors wait for a change; others back off
/// exponentially per object.
pub fn error_policy(
    guard: Arc<DeserializeGuard<RdpHealth>>,
    error: &Error,
    ctx: Arc<Context>,
) -> Action {
    ctx.metrics.reconcile_failed(error.reason());
    let meta = meta_of(&guard);
    let name = meta.name.as_deref().unwrap_or_default();
    let namespace = meta.namespace.as_deref().unwrap_or_default();
    if error.is_permanent() {
        warn!(%namespace, %name, reason = error.reason(), error = %error, "waiting for the object to change");
        return Action::await_change();
    }
    if let Some(after) = error.retry_after() {
        warn!(%namespace, %name, reason = error.reason(), error = %error, retry_ms = after.as_millis() as u64, "Azure asked to wait");
        return Action::requeue(after.max(Duration::from_secs(1)));
    }
    let attempt = match key_of(meta) {
        Some(key) => {
            let mut failures = ctx.failures();
            let n = failures.entry(key).or_insert(0);
            *n = n.saturating_add(1);
            *n
        }
        None => 1,
    };
    let delay = backoff_delay(attempt);
    warn!(%namespace, %name, reason = error.reason(), error = %error, attempt, retry_ms = delay.as_millis() as u64, "reconcile failed");
    Action::requeue(delay)
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

async fn elect(
    client: &Client,
    lease: &LeaseSettings,
) -> Result<(Leadership, Option<LeaseTask>), RunError> {
    let manager = LeaseManagerBuilder::new(client.clone(), &lease.name)
        .with_namespace(&lease.namespace)
        .with_identity(&lease.identity)
        .with_duration(lease.duration_seconds)
        .with_grace(lease.grace_seconds)
        .build()
        .await
        .map_err(RunError::Lease)?;
    let (rx, task) = manager.watch().await;
    let mut changes = rx.clone();
    let identity = lease.identity.clone();
    let logger = tokio::spawn(async move {
        while changes.changed().await.is_ok() {
            let leader = *changes.borrow_and_update();
            info!(identity = %identity, leader, "leadership changed");
        }
    });
    Ok((
        Leadership::from_receiver(rx),
        Some(LeaseTask { task, logger }),
    ))
}

/// The running lease manager and the task logging leadership changes.
struct LeaseTask {
    task: tokio::task::JoinHandle<Result<kube_lease_manager::LeaseManager, LeaseManagerError>>,
    logger: tokio::task::JoinHandle<()>,
}

impl LeaseTask {
    /// Releases the lease: the manager does so once every leadership receiver is gone.
    async fn release(self) {
        self.logger.abort();
        let _ = self.logger.await;
        match tokio::time::timeout(Duration::from_secs(5), self.task).await {
            Ok(Ok(Err(e))) => warn!(error = %e, "failed to release the lease"),
            Err(_) => warn!("timed out releasing the lease"),
            _ => info!("lease released"),
        }
    }
}

/// A controller over `api` whose watch marks `ready` after its first complete list and keeps
/// `memory` free of deleted objects, and the object cache it fills.
fn controller_for(
    api: Api<DeserializeGuard<RdpHealth>>,
    ready: Arc<AtomicBool>,
    memory: Arc<ProbeMemory>,
) -> (
    Controller<DeserializeGuard<RdpHealth>>,
    Store<DeserializeGuard<RdpHealth>>,
) {
    let writer = Writer::default();
    let store = writer.as_reader();
    let events = watcher(api, watcher::Config::default()).inspect_ok(move |event| {
        if matches!(event, watcher::Event::InitDone) && !ready.swap(true, Ordering::AcqRel) {
            info!("first watch sync done: ready");
        }
    });
    let cache = store.clone();
    // After the reflector, so that the cache already reflects the event.
    let objects = reflector(writer, events)
        .inspect_ok(move |event| memory.follow(event, &cache))
        .applied_objects();
    (Controller::for_stream(objects, store.clone()), store)
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
    let (leadership, lease_task) = match &settings.lease {
        Some(lease) => elect(&client, lease).await?,
        None => (Leadership::always(), None),
    };
    let api: Api<DeserializeGuard<RdpHealth>> = match &settings.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let ready = Arc::new(AtomicBool::new(false));
    let memory = Arc::new(ProbeMemory::default());
    let (controller, store) = controller_for(api, Arc::clone(&ready), Arc::clone(&memory));
    let controller =
        controller.with_config(Config::default().concurrency(settings.concurrency.max(1)));
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
    let ctx = Arc::new(
        Context::new(
            client,
            seams,
            metrics,
            leadership,
            settings.instance.clone(),
        )
        .with_remediation(settings.fleet, settings.probe_source)
        .with_store(store)
        .with_memory(memory)
        .with_status_heartbeat(settings.status_heartbeat),
    );
    info!(namespace = ?settings.namespace, concurrency = settings.concurrency, remediation, "controller starting");
    controller
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                debug!(error = %e, "controller event");
            }
        })
        .await;
    info!("controller stopped; shutting down");
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

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use rstest::rstest;

    use super::*;
    use crate::ladder::{RungExecution, RungOutcome, Step};

    #[test]
    fn leadership_follows_the_lease() {
        assert!(Leadership::always().is_leader());
        let (tx, rx) = watch::channel(false);
        let leadership = Leadership::from_receiver(rx);
        assert!(!leadership.is_leader());
        tx.send_replace(true);
        assert!(leadership.is_leader());
    }

    fn with_annotation(
        value: Option<&str>,
        consumed: Option<&str>,
    ) -> (RdpHealth, RdpHealthStatus) {
        let mut obj: RdpHealth = serde_json::from_value(json!({
            "apiVersion": "rdphealth.io/v1alpha1", "kind": "RdpHealth",
            "metadata": {"name": "a", "namespace": "ns"},
            "spec": {"vm": {"resourceId": "/subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm"}},
        }))
        .unwrap();
        if let Some(v) = value {
            obj.metadata.annotations =
                Some([(APPROVE_ANNOTATION.to_string(), v.to_string())].into());
        }
        let mut status = RdpHealthStatus::default();
        status.ladder.consumed_approval = consumed.map(str::to_string);
        (obj, status)
    }

    #[rstest]
    #[case::none(None, None, None)]
    #[case::rung(Some("Redeploy"), None, Some(Rung::Redeploy))]
    #[case::rung_and_token(Some("Restart/ticket-42"), None, Some(Rung::Restart))]
    #[case::used_once(Some("Restart/ticket-42"), Some("Restart/ticket-42"), None)]
    #[case::new_token_approves_again(
        Some("Restart/ticket-43"),
        Some("Restart/ticket-42"),
        Some(Rung::Restart)
    )]
    #[case::unknown_rung(Some("Reboot"), None, None)]
    fn approvals_are_used_once(
        #[case] value: Option<&str>,
        #[case] consumed: Option<&str>,
        #[case] want: Option<Rung>,
    ) {
        let (obj, status) = with_annotation(value, consumed);
        assert_eq!(approval(&obj, &status).map(|(_, r)| r), want);
    }

    fn execution(rung: Rung, phase: ExecutionPhase, started: i64) -> RungExecution {
        RungExecution {
            step: Step::rung(rung),
            attempt: 1,
            phase,
            started_at: Time(ts(started)),
            operation: None,
            next_poll_at: None,
            settle_until: None,
            message: None,
            outcome_unknown: false,
        }
    }

    fn ts(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    #[test]
    fn redeploy_and_nic_reset_refresh_the_address_once() {
        let mut before = LadderStatus {
            current: Some(execution(Rung::Redeploy, ExecutionPhase::Running, 10)),
            ..LadderStatus::default()
        };
        let mut after = before.clone();
        assert!(!address_may_have_changed(&before, &after), "still running");
        after.current = Some(execution(Rung::Redeploy, ExecutionPhase::Settling, 10));
        assert!(
            address_may_have_changed(&before, &after),
            "finished in Azure"
        );
        before = after.clone();
        assert!(!address_may_have_changed(&before, &after), "only once");
        let restart = LadderStatus {
            current: Some(execution(Rung::Restart, ExecutionPhase::Settling, 10)),
            ..LadderStatus::default()
        };
        assert!(!address_may_have_changed(
            &LadderStatus::default(),
            &restart
        ));
        after.finish(RungOutcome::NotFixed, None, ts(20), None);
        assert!(address_may_have_changed(&before, &after), "judged");
    }

    #[test]
    fn remediation_results_are_counted_once() {
        let metrics = Metrics::new().unwrap();
        let mut before = LadderStatus::default();
        before.open_incident(ts(1));
        let mut after = before.clone();
        after.start(Step::rung(Rung::ResetRdpConfig), ts(5));
        metrics.count_remediations(&before, &after, ts(5));
        before = after.clone();
        after.finish(RungOutcome::NotFixed, None, ts(9), None);
        metrics.count_remediations(&before, &after, ts(9));
        before = after.clone();
        metrics.count_remediations(&before, &after, ts(10));
        after.start(Step::rung(Rung::Restart), ts(11));
        after.finish(RungOutcome::Failed, None, ts(11), None);
        metrics.count_remediations(&before, &after, ts(11));
        let text = metrics.render().unwrap();
        for line in [
            r#"rdphealth_remediations_total{result="started",rung="ResetRdpConfig"} 1"#,
            r#"rdphealth_remediations_total{result="not_fixed",rung="ResetRdpConfig"} 1"#,
            r#"rdphealth_remediations_total{result="started",rung="Restart"} 1"#,
            r#"rdphealth_remediations_total{result="failed",rung="Restart"} 1"#,
        ] {
            assert!(text.contains(line), "{line} in\n{text}");
        }
    }

    #[test]
    fn the_last_failure_comes_from_status() {
        let mut status = RdpHealthStatus::default();
        assert!(last_failure(Some(&status)).is_none());
        status.last_probe = Some(crate::api::LastProbe {
            time: k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(ts(1)),
            reachable: false,
            failure_reason: Some("tls_handshake_failed".into()),
            message: Some("alert".into()),
            latency_ms: 1,
            selected_protocol: None,
            tls_version: None,
            certificate_not_after: None,
        });
        let f = last_failure(Some(&status)).unwrap();
        assert_eq!(f.reason, FailureReason::TlsHandshakeFailed);
    }

    fn named(name: &str, uid: &str) -> DeserializeGuard<RdpHealth> {
        let (mut obj, _) = with_annotation(None, None);
        obj.metadata.name = Some(name.into());
        obj.metadata.uid = Some(uid.into());
        DeserializeGuard(Ok(obj))
    }

    fn remembered() -> Remembered {
        Remembered::of(Some(ts(1)), &RdpHealthStatus::default())
    }

    #[test]
    fn deleted_objects_are_forgotten() {
        let mut writer: Writer<DeserializeGuard<RdpHealth>> = Writer::default();
        let store = writer.as_reader();
        let memory = ProbeMemory::default();
        for (name, uid) in [("a", "uid-a"), ("b", "uid-b"), ("c", "uid-c")] {
            let event = watcher::Event::Apply(named(name, uid));
            writer.apply_watcher_event(&event);
            memory.follow(&event, &store);
            memory.remember(uid.into(), remembered());
        }
        assert_eq!(memory.len(), 3);
        // A deletion seen on the watch.
        let event = watcher::Event::Delete(named("a", "uid-a"));
        writer.apply_watcher_event(&event);
        memory.follow(&event, &store);
        assert!(memory.get("uid-a").is_none());
        assert_eq!(memory.len(), 2);
        // A deletion missed while the watch was down: the relist no longer holds "b".
        for event in [
            watcher::Event::Init,
            watcher::Event::InitApply(named("c", "uid-c")),
            watcher::Event::InitDone,
        ] {
            writer.apply_watcher_event(&event);
            memory.follow(&event, &store);
        }
        assert!(memory.get("uid-b").is_none());
        assert!(memory.get("uid-c").is_some());
        assert_eq!(memory.len(), 1);
    }

    #[test]
    fn a_recreated_object_is_remembered_afresh() {
        let first = named("a", "uid-1");
        let again = named("a", "uid-2");
        assert_ne!(memory_id(meta_of(&first)), memory_id(meta_of(&again)));
        let mut nameless = named("a", "x");
        if let Ok(obj) = &mut nameless.0 {
            obj.metadata.uid = None;
        }
        assert_eq!(memory_id(meta_of(&nameless)).as_deref(), Some("ns/a"));
    }

    #[test]
    fn the_remembered_status_is_continued_while_the_stored_one_tells_the_same_story() {
        let (mut obj, mut stored) = with_annotation(None, None);
        stored.last_probe = Some(crate::api::LastProbe {
            time: k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(ts(100)),
            reachable: true,
            failure_reason: None,
            message: None,
            latency_ms: 1,
            selected_protocol: Some("rdp".into()),
            tls_version: None,
            certificate_not_after: None,
        });
        stored.consecutive_successes = 3;
        obj.status = Some(stored.clone());
        let mut newer = stored.clone();
        if let Some(p) = newer.last_probe.as_mut() {
            p.time = k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(ts(130));
        }
        newer.consecutive_successes = 4;
        let remembered = Remembered::of(Some(ts(130)), &newer);
        let status = |o: Option<Box<RdpHealth>>| o.map(|o| o.status);
        assert_eq!(
            status(continued(&obj, Some(&remembered))),
            Some(Some(newer.clone()))
        );
        // Something else was written since (another replica, a lost write): the stored wins.
        let mut other = newer;
        other.consecutive_failures = 1;
        let remembered = Remembered::of(Some(ts(130)), &other);
        assert!(continued(&obj, Some(&remembered)).is_none());
        assert!(continued(&obj, None).is_none());
        obj.status = None;
        assert!(continued(&obj, Some(&remembered)).is_none());
    }

    #[rstest]
    #[case(0, 1)]
    #[case(1, 1)]
    #[case(2, 2)]
    #[case(3, 4)]
    #[case(6, 32)]
    #[case(9, 256)]
    #[case(10, 300)]
    #[case(u32::MAX, 300)]
    fn backoff_doubles_and_caps(#[case] attempt: u32, #[case] secs: u64) {
        assert_eq!(backoff_delay(attempt), Duration::from_secs(secs));
    }
}
