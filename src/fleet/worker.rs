//! One fleet's loop: discovery every interval, each member probed on its own schedule (a
//! queue keyed by due time, so no member waits behind others), incidents opened and closed
//! (`housekeeping`), and the fleet's status written when its counts change.
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

mod housekeeping;

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
