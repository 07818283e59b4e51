//! One fleet's loop: discovery every interval, each member probed on its own schedule (a
//! queue keyed by due time, so no member waits behind others), incidents opened and closed,
//! and the fleet's status written when its counts change.
//!
//! Kubernetes is reached only through [`FleetSink`], Azure only through [`ResourceGraph`], the
//! network only through [`Prober`]: the loop runs the same against the API server and in tests.

use std::{
    cmp::Reverse,
    collections::{BTreeMap, BinaryHeap, HashMap},
    sync::Arc,
    time::Duration,
};

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::Time,
    jiff::{SignedDuration, Timestamp},
};
use tokio::{
    sync::watch,
    task::{JoinHandle, JoinSet},
    time::Instant,
};
use tracing::{debug, info, warn};

use super::{
    incident::{self, Close, Hold},
    member::{self, Changes, IncidentView, Member, Tally, Turn, Watcher},
    policy::MemberPolicy,
    status,
};
use crate::{
    api::{
        DiscoveryStatus, MAX_DISRUPTIVE_ANNOTATION, RdpHealth, RdpHealthFleet, RdpHealthFleetStatus,
    },
    azure::{AzureResult, Discovery, ResourceGraph},
    engine::{Severity, Status, identity, pascal},
    probe::{FailureReason, Finding, ProbeOptions, ProbeReport, Prober, Target},
};

/// How often incident objects, explicit objects and the status are looked at.
pub const HOUSEKEEPING: Duration = Duration::from_secs(5);
/// A failed discovery is retried after this long (or Azure's retry-after, if longer), not a
/// whole interval later.
const DISCOVERY_RETRY: Duration = Duration::from_secs(30);

/// The outcome of creating an incident object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    /// It was created.
    New,
    /// An object of that name exists already.
    Exists,
}

/// What the loop needs from Kubernetes.
#[async_trait::async_trait]
pub trait FleetSink: Send + Sync {
    /// Whether the object cache has been filled once (before that, explicit objects and
    /// existing incidents are unknown, so no incident may be created).
    fn ready(&self) -> bool;
    /// Whether this replica may write (it leads).
    fn may_write(&self) -> bool;
    /// Calls `f` with every valid `RdpHealth` in the cache.
    fn for_each_object(&self, f: &mut dyn FnMut(&RdpHealth));
    /// Creates an incident object.
    async fn create(&self, obj: &RdpHealth) -> Result<Created, String>;
    /// Deletes an incident object (absent is fine).
    async fn delete(&self, namespace: &str, name: &str) -> Result<(), String>;
    /// Sets (or, with `None`, removes) one annotation of an incident object.
    async fn annotate(
        &self,
        namespace: &str,
        name: &str,
        annotation: &str,
        value: Option<&str>,
    ) -> Result<(), String>;
    /// Writes the fleet's status.
    async fn write_status(
        &self,
        fleet: &RdpHealthFleet,
        status: &RdpHealthFleetStatus,
    ) -> Result<(), String>;
    /// Publishes an Event about the fleet.
    async fn event(&self, fleet: &RdpHealthFleet, severity: Severity, reason: &str, note: String);
    /// Metrics: the fleet's counts and each member's reachability.
    fn observe(&self, fleet: &RdpHealthFleet, tally: &Tally, members: &BTreeMap<String, Member>);
    /// Metrics: one discovery and the Resource Graph requests it took.
    fn discovered(&self, fleet: &RdpHealthFleet, requests: u32, ok: bool);
}

/// What every fleet loop shares.
#[derive(Clone)]
pub struct Deps {
    /// Discovery.
    pub graph: Arc<dyn ResourceGraph>,
    /// Probes members.
    pub prober: Arc<dyn Prober>,
    /// Kubernetes.
    pub sink: Arc<dyn FleetSink>,
    /// The operator's default for `safety.maxUnreachablePercent`.
    pub max_unreachable_percent: u8,
    /// Fleets smaller than this never put incidents on hold for their unreachable share.
    pub min_fleet_size: usize,
    /// Probes of one fleet in flight at once.
    pub probe_concurrency: usize,
    /// Why every fleet is refused (the operator's configuration forbids fleets), if it does.
    pub refusal: Option<String>,
}

/// The loop's state.
struct Worker {
    deps: Deps,
    fleet: Arc<RdpHealthFleet>,
    policy: Result<MemberPolicy, String>,
    members: BTreeMap<String, Member>,
    /// (due, epoch, key): entries whose epoch differs from the member's are stale.
    queue: BinaryHeap<Reverse<(Instant, u64, String)>>,
    /// Incident objects of this fleet, by object name.
    incidents: HashMap<String, IncidentView>,
    discovery: Option<DiscoveryStatus>,
    discovery_started: Option<Instant>,
    last_written: Option<RdpHealthFleetStatus>,
    /// The loop's start on the monotonic clock and on the wall clock: identity reads are
    /// dated and aged from the monotonic clock, so a wall-clock step cannot skip or repeat one.
    started: (Instant, Timestamp),
}

/// Runs the loop for `fleet` until `stop` turns true or either sender is dropped.
pub async fn run(
    deps: Deps,
    mut fleet: watch::Receiver<Arc<RdpHealthFleet>>,
    mut stop: watch::Receiver<bool>,
) {
    let first = fleet.borrow_and_update().clone();
    let mut w = Worker {
        policy: policy_of(&deps, &first),
        deps,
        fleet: first,
        members: BTreeMap::new(),
        queue: BinaryHeap::new(),
        incidents: HashMap::new(),
        discovery: None,
        discovery_started: None,
        last_written: None,
        started: (Instant::now(), Timestamp::now()),
    };
    let mut probes: JoinSet<(String, u64, ProbeReport)> = JoinSet::new();
    let mut discovering: Option<JoinHandle<AzureResult<Discovery>>> = None;
    let mut discovery_due = Instant::now();
    let mut housekeeping = tokio::time::interval(HOUSEKEEPING);
    housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // Only the replica that writes discovers and probes: the others would spend the
        // Resource Graph quota and probe for nothing. (Checked again every housekeeping tick.)
        let idle = w.policy.is_err() || w.fleet.spec.suspend || !w.deps.sink.may_write();
        let next_due = w.queue.peek().map(|Reverse((at, ..))| *at);
        let room = probes.len() < w.deps.probe_concurrency.max(1);
        tokio::select! {
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() { break; }
            }
            changed = fleet.changed() => {
                if changed.is_err() { break; }
                let next = fleet.borrow_and_update().clone();
                if next.spec.selector != w.fleet.spec.selector {
                    discovery_due = Instant::now();
                }
                w.policy = policy_of(&w.deps, &next);
                w.fleet = next;
                w.reschedule_all(Instant::now());
            }
            () = tokio::time::sleep_until(discovery_due), if discovering.is_none() && !idle => {
                if let Ok(policy) = &w.policy {
                    let graph = Arc::clone(&w.deps.graph);
                    let selector = policy.selector.clone();
                    w.discovery_started = Some(Instant::now());
                    discovering = Some(tokio::spawn(async move { graph.discover(&selector).await }));
                }
            }
            result = async {
                match discovering.as_mut() {
                    Some(task) => task.await.ok(),
                    None => std::future::pending().await,
                }
            }, if discovering.is_some() => {
                discovering = None;
                discovery_due = w.discovered(result, Instant::now());
            }
            () = async {
                match next_due {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            }, if room && !idle => {
                if let Some((key, epoch, target, opts)) = w.next_probe(Instant::now()) {
                    let prober = Arc::clone(&w.deps.prober);
                    probes.spawn(async move {
                        let report = prober.probe(&target, &opts).await;
                        (key, epoch, report)
                    });
                }
            }
            Some(done) = probes.join_next(), if !probes.is_empty() => {
                if let Ok((key, epoch, report)) = done {
                    w.probed(&key, epoch, &report, Instant::now()).await;
                }
            }
            _ = housekeeping.tick() => {
                w.housekeeping(Instant::now()).await;
            }
        }
    }
    probes.abort_all();
    if let Some(d) = discovering {
        d.abort();
    }
}

/// The fleet's policy, or why it is refused.
fn policy_of(deps: &Deps, fleet: &RdpHealthFleet) -> Result<MemberPolicy, String> {
    match &deps.refusal {
        Some(why) => Err(why.clone()),
        None => MemberPolicy::from_fleet(fleet),
    }
}

/// Spreads first probes over one interval, by key, so a large fleet does not probe every
/// member at once after a discovery or a restart.
fn offset(key: &str, interval: Duration) -> Duration {
    let hash = key.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let millis = u64::try_from(interval.as_millis())
        .unwrap_or(u64::MAX)
        .max(1);
    Duration::from_millis(hash % millis)
}

impl Worker {
    /// `now` on the wall clock, counted from the loop's start on the monotonic clock.
    fn wall(&self, now: Instant) -> Timestamp {
        let (instant, wall) = self.started;
        let elapsed = SignedDuration::try_from(now.saturating_duration_since(instant))
            .unwrap_or(SignedDuration::ZERO);
        wall.checked_add(elapsed).unwrap_or(wall)
    }

    fn name(&self) -> String {
        format!(
            "{}/{}",
            self.fleet.metadata.namespace.as_deref().unwrap_or_default(),
            self.fleet.metadata.name.as_deref().unwrap_or_default()
        )
    }

    fn uid(&self) -> &str {
        self.fleet.metadata.uid.as_deref().unwrap_or_default()
    }

    /// Applies a finished discovery (`None`: the task died); returns when the next is due.
    fn discovered(&mut self, result: Option<AzureResult<Discovery>>, now: Instant) -> Instant {
        let Ok(policy) = &self.policy else {
            return now + DISCOVERY_RETRY;
        };
        let interval = policy.discovery_interval;
        let time = Time(Timestamp::now());
        let took = self
            .discovery_started
            .take()
            .map_or(Duration::ZERO, |s| now.saturating_duration_since(s));
        let duration_ms = u64::try_from(took.as_millis()).unwrap_or(u64::MAX);
        let last_success = self.discovery.as_ref().and_then(|d| d.last_success.clone());
        let (next, status) = match result {
            Some(Ok(d)) => {
                let found = d.vms.len();
                let changes = member::apply_discovery(&mut self.members, d.vms);
                self.schedule_changes(&changes, now);
                self.deps.sink.discovered(&self.fleet, d.requests, true);
                info!(fleet = %self.name(), members = found, added = changes.added.len(),
                    removed = changes.removed.len(), requests = d.requests, "discovery done");
                let status = DiscoveryStatus {
                    time: time.clone(),
                    last_success: Some(time),
                    duration_ms,
                    requests: d.requests,
                    quota_remaining: d.quota_remaining,
                    error: None,
                };
                (now + interval, status)
            }
            Some(Err(e)) => {
                warn!(fleet = %self.name(), error = %e, "discovery failed; keeping the last membership");
                self.deps.sink.discovered(&self.fleet, 0, false);
                let retry = e
                    .retry_after()
                    .unwrap_or(DISCOVERY_RETRY)
                    .max(DISCOVERY_RETRY);
                let status = DiscoveryStatus {
                    time,
                    last_success,
                    duration_ms,
                    requests: 0,
                    quota_remaining: None,
                    error: Some(crate::cli::error_chain(&e)),
                };
                (now + retry.min(interval), status)
            }
            None => {
                let status = DiscoveryStatus {
                    time,
                    last_success,
                    duration_ms,
                    requests: 0,
                    quota_remaining: None,
                    error: Some("the discovery task stopped unexpectedly".into()),
                };
                (now + DISCOVERY_RETRY, status)
            }
        };
        self.discovery = Some(status);
        next
    }

    /// Queues the first probe of joined and readdressed members.
    fn schedule_changes(&mut self, changes: &Changes, now: Instant) {
        let Ok(policy) = &self.policy else { return };
        let interval = policy.spec.probe.interval;
        for key in changes.added.iter().chain(&changes.readdressed) {
            if let Some(m) = self.members.get(key) {
                self.queue
                    .push(Reverse((now + offset(key, interval), m.epoch, key.clone())));
            }
        }
    }

    /// After a spec change: every member's schedule starts over with the new policy.
    fn reschedule_all(&mut self, now: Instant) {
        self.queue.clear();
        let Ok(policy) = &self.policy else { return };
        let interval = policy.spec.probe.interval;
        for (key, m) in &mut self.members {
            m.epoch += 1;
            self.queue
                .push(Reverse((now + offset(key, interval), m.epoch, key.clone())));
        }
    }

    /// The next member to probe now, if its turn has come and the fleet probes it, with the
    /// prober's options (the identity step when it is due).
    fn next_probe(&mut self, now: Instant) -> Option<(String, u64, Target, ProbeOptions)> {
        let wall = self.wall(now);
        let policy = self.policy.as_ref().ok()?;
        while let Some(Reverse((at, epoch, key))) = self.queue.peek().cloned() {
            if at > now {
                return None;
            }
            self.queue.pop();
            let Some(m) = self.members.get(&key) else {
                continue;
            };
            if m.epoch != epoch || m.watcher != Watcher::Fleet {
                continue;
            }
            let Some(endpoint) = m.endpoint(policy.spec.address_type, policy.spec.port) else {
                // No address of that type: looked at again with the next discovery.
                continue;
            };
            let options = ProbeOptions {
                identity: identity::due(
                    m.identity.as_deref(),
                    &endpoint,
                    policy.spec.probe.identity_check_interval,
                    wall,
                    |_| false,
                ),
                expect_name: endpoint.computer_name.clone(),
                ..policy.options.clone()
            };
            let target = Target {
                host: endpoint.host,
                port: endpoint.port,
            };
            return Some((key, epoch, target, options));
        }
        None
    }

    /// Records a probe's result and queues the member's next probe.
    async fn probed(&mut self, key: &str, epoch: u64, report: &ProbeReport, now: Instant) {
        let wall = self.wall(now);
        let Ok(policy) = &self.policy else { return };
        let thresholds = policy.thresholds();
        let probe = policy.spec.probe;
        let Some(m) = self.members.get_mut(key) else {
            return;
        };
        if m.epoch != epoch || m.watcher != Watcher::Fleet {
            return;
        }
        let turn = if report.prober_failed() {
            // The prober's own failure says nothing about the VM: no verdict.
            Turn::None
        } else {
            // A wrong host stays one until the endpoint answers as the VM again (as for an
            // object): a plain handshake with the other computer is no success.
            let endpoint = m.endpoint(policy.spec.address_type, policy.spec.port);
            let wrong_host = endpoint
                .as_ref()
                .is_some_and(|e| identity::still_wrong_host(m.identity.as_deref(), e, report));
            if let Some(e) = &endpoint {
                m.identity =
                    identity::observed(m.identity.as_deref(), e, report, wall).map(Box::new);
            }
            let reason = if wrong_host {
                Some(pascal(FailureReason::WrongHost.as_str()))
            } else {
                report.failure.as_ref().map(|f| pascal(f.reason.as_str()))
            };
            m.certificate_expired = report
                .findings
                .iter()
                .any(|f| matches!(f, Finding::CertificateExpired));
            m.record(
                report.reachable && !wrong_host,
                reason,
                thresholds,
                Timestamp::now(),
            )
        };
        let next = probe.interval_after(m.streak.failures, m.reachable == Status::False);
        self.queue
            .push(Reverse((now + next, m.epoch, key.to_owned())));
        if turn == Turn::Unreachable || m.trouble().is_some() {
            debug!(fleet = %self.name(), member = key, "member needs an incident");
            self.open_incident(key).await;
        }
    }

    /// Creates the incident object of a member in trouble (idempotent: the name is fixed).
    async fn open_incident(&mut self, key: &str) {
        let sink = Arc::clone(&self.deps.sink);
        if !sink.ready() || !sink.may_write() {
            return;
        }
        let Some(m) = self.members.get(key) else {
            return;
        };
        let Some(trouble) = m.trouble().filter(|_| m.watcher == Watcher::Fleet) else {
            return;
        };
        let vm = m.vm.clone();
        // Looked up again right before the create (the last look may be seconds old): an
        // object that now watches the VM — hand-written, or another fleet's incident — wins,
        // so that one VM never has two ladders because of this fleet.
        if let Some(by) = self.watched_elsewhere(key) {
            if let Some(m) = self.members.get_mut(key) {
                m.watcher = Watcher::Other(by);
            }
            return;
        }
        let hold = self.hold();
        let obj = incident::incident_object(&self.fleet, &vm, hold.as_ref());
        let name = obj.metadata.name.clone().unwrap_or_default();
        match sink.create(&obj).await {
            Ok(created) => {
                if let Some(m) = self.members.get_mut(key) {
                    m.watcher = Watcher::Incident(name.clone());
                }
                if created == Created::New {
                    let what = trouble.describe();
                    let note = match &hold {
                        Some(h) => format!(
                            "{} is {what}: incident {name} opened on hold ({})",
                            vm.vm.name, h.why
                        ),
                        None => format!("{} is {what}: incident {name} opened", vm.vm.name),
                    };
                    let reason = if hold.is_some() {
                        "IncidentHeld"
                    } else {
                        "IncidentOpened"
                    };
                    sink.event(&self.fleet, Severity::Warning, reason, note)
                        .await;
                }
            }
            Err(e) => {
                warn!(fleet = %self.name(), incident = %name, error = %e, "failed to create the incident object; retried at the next look");
            }
        }
    }

    /// The object (`namespace/name`) other than this fleet's incidents that watches the VM
    /// `key`, if the cache holds one.
    fn watched_elsewhere(&self, key: &str) -> Option<String> {
        let uid = self.uid();
        let mut found = None;
        self.deps.sink.for_each_object(&mut |obj| {
            if found.is_none()
                && !incident::owned_by(obj, uid)
                && obj.spec.vm.resource_id.eq_ignore_ascii_case(key)
            {
                found = Some(format!(
                    "{}/{}",
                    obj.metadata.namespace.as_deref().unwrap_or_default(),
                    obj.metadata.name.as_deref().unwrap_or_default()
                ));
            }
        });
        found
    }

    /// Whether a new incident is created on hold: more of the fleet unreachable than its
    /// safety limit allows (the observer, or something fleet-wide, is the likelier cause).
    fn hold(&self) -> Option<Hold> {
        let t = member::tally(&self.members, &self.incidents);
        let limit = self
            .fleet
            .spec
            .safety
            .max_unreachable_percent
            .unwrap_or(self.deps.max_unreachable_percent);
        let members = usize::try_from(t.members).unwrap_or(usize::MAX);
        (members >= self.deps.min_fleet_size && t.unreachable_percent() > u32::from(limit)).then(
            || Hold {
                why: format!(
                    "{}% of the fleet's {} members are unreachable, above its limit of {limit}%",
                    t.unreachable_percent(),
                    t.members
                ),
            },
        )
    }

    /// Follows the object cache (explicit objects, this fleet's incidents), closes incidents,
    /// opens the ones that could not be created before, and writes the status when it changed.
    async fn housekeeping(&mut self, now: Instant) {
        let sink = Arc::clone(&self.deps.sink);
        if !sink.ready() {
            return;
        }
        let uid = self.uid().to_owned();
        let namespace = self.fleet.metadata.namespace.clone().unwrap_or_default();
        // VM key → who watches it; this fleet's incidents with what to do about them.
        let mut others: HashMap<String, String> = HashMap::new();
        let mut ours: HashMap<String, (String, IncidentView, Option<Close>)> = HashMap::new();
        // This fleet's incidents whose cap annotation lags the fleet's spec.
        let mut stale_caps: Vec<String> = Vec::new();
        let retention = self
            .policy
            .as_ref()
            .map_or(Duration::from_secs(86_400), |p| p.incident_retention);
        let wall = Timestamp::now();
        sink.for_each_object(&mut |obj| {
            if !incident::owned_by(obj, &uid) {
                let key = obj.spec.vm.resource_id.to_ascii_lowercase();
                let ns = obj.metadata.namespace.as_deref().unwrap_or_default();
                let name = obj.metadata.name.as_deref().unwrap_or_default();
                others.entry(key).or_insert_with(|| format!("{ns}/{name}"));
            }
        });
        sink.for_each_object(&mut |obj| {
            if incident::owned_by(obj, &uid) {
                let key = obj.spec.vm.resource_id.to_ascii_lowercase();
                let name = obj.metadata.name.clone().unwrap_or_default();
                let present = self.members.contains_key(&key);
                let close =
                    incident::close(obj, present, others.contains_key(&key), retention, wall);
                if incident::cap_stale(obj, &self.fleet) {
                    stale_caps.push(name.clone());
                }
                ours.insert(key, (name, incident::view_of(obj), close));
            }
        });
        self.incidents = ours
            .values()
            .map(|(name, view, _)| (name.clone(), view.clone()))
            .collect();
        let interval = self
            .policy
            .as_ref()
            .map_or(Duration::from_secs(30), |p| p.spec.probe.interval);
        for (key, m) in &mut self.members {
            let watcher = if let Some((name, ..)) = ours.get(key) {
                Watcher::Incident(name.clone())
            } else if let Some(by) = others.get(key) {
                Watcher::Other(by.clone())
            } else {
                Watcher::Fleet
            };
            if watcher != m.watcher {
                let back = watcher == Watcher::Fleet;
                m.watcher = watcher;
                if back {
                    // Watched by the fleet again: judged from scratch.
                    m.reset();
                    self.queue
                        .push(Reverse((now + offset(key, interval), m.epoch, key.clone())));
                }
            }
        }
        if sink.may_write() {
            self.close_incidents(&ours, &namespace).await;
            self.follow_cap(&stale_caps, &namespace).await;
            let pending: Vec<String> = self
                .members
                .iter()
                .filter(|(_, m)| m.watcher == Watcher::Fleet && m.trouble().is_some())
                .map(|(k, _)| k.clone())
                .collect();
            for key in pending {
                self.open_incident(&key).await;
            }
            self.write_status().await;
        }
    }

    /// Deletes this fleet's incident objects that are done (recovered for the retention, VM
    /// gone, or a hand-written object now watches the VM), never with a rung in flight.
    async fn close_incidents(
        &mut self,
        ours: &HashMap<String, (String, IncidentView, Option<Close>)>,
        namespace: &str,
    ) {
        let sink = Arc::clone(&self.deps.sink);
        for (key, (name, _, close)) in ours {
            let why = match close {
                Some(Close::Recovered) => "reachable again for the incident retention".to_owned(),
                Some(Close::LeftFleet) => "its VM left the fleet".to_owned(),
                Some(Close::Superseded) => "another object watches its VM".to_owned(),
                None => continue,
            };
            match sink.delete(namespace, name).await {
                Ok(()) => {
                    info!(fleet = %self.name(), incident = %name, why = %why, "incident closed");
                    sink.event(
                        &self.fleet,
                        Severity::Normal,
                        "IncidentClosed",
                        format!("incident {name} deleted: {why}"),
                    )
                    .await;
                    self.incidents.remove(name);
                    // The next look at the cache decides who watches the VM now.
                    if let Some(m) = self.members.get_mut(key) {
                        m.reset();
                    }
                }
                Err(e) => {
                    warn!(fleet = %self.name(), incident = %name, error = %e, "failed to delete the incident object")
                }
            }
        }
    }

    /// Brings the cap annotation of the incidents in `names` in step with the fleet's
    /// `safety.maxConcurrentDisruptive` (set, changed or removed since they were created).
    async fn follow_cap(&self, names: &[String], namespace: &str) {
        let cap = incident::max_disruptive(&self.fleet);
        for name in names {
            let result = self
                .deps
                .sink
                .annotate(namespace, name, MAX_DISRUPTIVE_ANNOTATION, cap.as_deref())
                .await;
            if let Err(e) = result {
                warn!(fleet = %self.name(), incident = %name, error = %e, "failed to update the incident's disruptive cap; retried at the next look");
            }
        }
    }

    /// Writes the status when it differs from the last one written (counts, lists,
    /// discovery): never per probe.
    async fn write_status(&mut self) {
        let tally = member::tally(&self.members, &self.incidents);
        self.deps.sink.observe(&self.fleet, &tally, &self.members);
        let next = status::fleet_status(
            &self.fleet,
            &self.policy,
            &tally,
            self.discovery.as_ref(),
            self.last_written.as_ref(),
        );
        if self.last_written.as_ref() == Some(&next) {
            return;
        }
        match self.deps.sink.write_status(&self.fleet, &next).await {
            Ok(()) => self.last_written = Some(next),
            Err(e) => warn!(fleet = %self.name(), error = %e, "failed to write the fleet status"),
        }
    }
}
