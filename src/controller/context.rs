//! What every reconcile shares, and the hand-over of the fleet view to fleet safety.

use super::fleet::{self, Contribution, FleetCounts};
use super::tenancy::{Namespaces, TenancyState};
use super::*;
use crate::tenancy::TenancyPolicy;

/// What every reconcile shares.
pub struct Context {
    pub(super) client: Client,
    pub(super) recorder: Recorder,
    pub(super) seams: Seams,
    pub(super) metrics: Arc<Metrics>,
    pub(super) leadership: Leadership,
    /// This replica's name (Events' reporting instance, `status.observedBy` with shards).
    pub(super) instance: Option<String>,
    /// Failed reconciles in a row, per object (exponential backoff).
    pub(super) failures: Mutex<HashMap<ObjectKey, u32>>,
    /// The remediation stage, when Azure is configured.
    pub(super) remediator: Option<Remediator>,
    /// Every object (the controller's cache), for fleet safety.
    pub(super) store: Option<Store<DeserializeGuard<RdpHealth>>>,
    /// When each object was last probed, and the status that produced.
    pub(super) memory: Arc<ProbeMemory>,
    /// How often a status whose only changes are per-probe facts is written anyway.
    pub(super) heartbeat: Duration,
    /// Whether this replica led at the last fleet count (a new term rebuilds the counts and
    /// clears the claims).
    pub(super) was_leader: AtomicBool,
    /// The fleet view's counts, kept per object (shared with the watch, which follows the
    /// changes other replicas make).
    pub(super) fleet: Arc<Mutex<FleetCounts>>,
    /// Which Azure scopes each namespace may name, and as which identity.
    pub(super) tenancy: TenancyState,
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
            instance: instance.clone(),
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            leadership,
            instance,
            failures: Mutex::new(HashMap::new()),
            remediator: None,
            store: None,
            memory: Arc::new(ProbeMemory::default()),
            heartbeat: writes::HEARTBEAT,
            was_leader: AtomicBool::new(false),
            fleet: Arc::default(),
            tenancy: TenancyState {
                federation: seams.identities.clone(),
                ..TenancyState::default()
            },
            seams,
        }
    }

    /// Enforces `policy` (namespaces name only VMs inside their scopes, as their identity);
    /// `namespaces` holds their labels when the policy selects by label.
    pub(super) fn with_tenancy(
        mut self,
        policy: Option<TenancyPolicy>,
        namespaces: Option<Namespaces>,
    ) -> Self {
        self.tenancy.policy = policy.map(Arc::new);
        self.tenancy.namespaces = namespaces;
        self
    }

    /// Shares `memory` (the watch stream forgets deleted objects in it).
    pub(super) fn with_memory(mut self, memory: Arc<ProbeMemory>) -> Self {
        self.memory = memory;
        self
    }

    /// Shares the fleet counts (the watch follows other replicas' changes in them).
    pub(super) fn with_fleet_counts(mut self, fleet: Arc<Mutex<FleetCounts>>) -> Self {
        self.fleet = fleet;
        self
    }

    /// Writes a status whose only changes are per-probe facts at most this often.
    pub(super) fn with_status_heartbeat(mut self, heartbeat: Duration) -> Self {
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
            leadership: Arc::new(self.leadership.clone()),
        });
        self
    }

    /// Claims disruptive slots through `shared` too (with shards), so that the cap holds
    /// across replicas. Call right after [`Self::with_remediation`].
    pub fn with_shared_claims(
        mut self,
        shared: Option<Arc<dyn crate::engine::remediate::SharedClaims>>,
    ) -> Self {
        if let (Some(shared), Some(r)) = (shared, self.remediator.as_mut()) {
            r.fleet = Arc::new(Fleet::new(*r.fleet.policy()).with_shared_claims(shared));
        }
        self
    }

    /// Counts `obj` with `status` (its newest status, which the cache may lag behind) in the
    /// fleet view, and hands the view to fleet safety (storm breaker, disruptive rungs in
    /// flight) and to the suspended-remediation gauge when it changed. A change of leadership
    /// rebuilds the counts from the cache, and a new term drops the claims of an earlier one.
    pub(super) fn count_in_fleet(&self, leader: bool, obj: &RdpHealth, status: &RdpHealthStatus) {
        let Some(store) = &self.store else {
            return;
        };
        let mut counts = self.fleet_counts();
        let new_term = self.was_leader.swap(leader, Ordering::AcqRel) != leader;
        if new_term {
            counts.rebuild_from(store);
            if leader && let Some(r) = &self.remediator {
                // A new term starts from the statuses, not from claims of an earlier one.
                r.fleet.clear_claims();
            }
        }
        if let Some(key) = fleet::key_of(&obj.metadata) {
            counts.set(&key, Contribution::of(obj, Some(status)));
        }
        self.publish_fleet(&mut counts, leader, new_term);
    }

    /// Hands the counts to fleet safety and the gauges, unless they are what was handed last.
    fn publish_fleet(&self, counts: &mut FleetCounts, leader: bool, force: bool) {
        let now = Timestamp::now();
        let window = self
            .remediator
            .as_ref()
            .map(|r| r.fleet.policy().fleet_window);
        let current = (counts.version(), counts.failed_recently(window, now));
        if counts.published == Some(current) && !force {
            return;
        }
        counts.published = Some(current);
        // Deleted and suspended objects hold no slot.
        let removed = counts.take_removed();
        let storming = match &self.remediator {
            Some(r) => {
                if !removed.is_empty() {
                    r.fleet
                        .retain_claims(|key| !removed.iter().any(|k| k == key));
                }
                r.fleet.update(counts.view(window, now));
                self.metrics
                    .observer_blind("fleet_breaker", r.fleet.fleet_breaker());
                r.fleet.storming()
            }
            None => Vec::new(),
        };
        self.metrics.suspended(&[
            ("StormBreaker", counts.members_of(&storming)),
            ("FleetBreaker", counts.suspended("FleetBreaker")),
            ("CanaryDown", counts.suspended("CanaryDown")),
            ("Paused", counts.suspended("Paused")),
            (
                "OutsideMaintenanceWindow",
                counts.suspended("OutsideMaintenanceWindow"),
            ),
            (
                "NotLeader",
                if leader || self.remediator.is_none() {
                    0
                } else {
                    counts.acting_unreachable()
                },
            ),
        ]);
    }

    pub(super) fn fleet_counts(&self) -> std::sync::MutexGuard<'_, FleetCounts> {
        self.fleet.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The object cache the fleet counts are rebuilt from when leadership changes.
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

    /// Counts one more failed reconcile of `key` in a row; returns how many there are now.
    pub(super) fn failed_again(&self, key: ObjectKey) -> u32 {
        let mut failures = self.failures();
        let n = failures.entry(key).or_insert(0);
        *n = n.saturating_add(1);
        *n
    }

    pub(super) fn failures(&self) -> std::sync::MutexGuard<'_, HashMap<ObjectKey, u32>> {
        self.failures.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Resolves the endpoint with `resolver` and probes it once (with the identity step when
    /// it is due), judged against the identity recorded in `status`.
    pub(super) async fn observe(
        &self,
        resolver: &dyn EndpointResolver,
        spec: &ValidSpec,
        status: Option<&RdpHealthStatus>,
        now: Timestamp,
    ) -> Observation {
        let endpoint = match resolver.resolve(spec).await {
            Ok(endpoint) => endpoint,
            Err(e) => return Observation::Unresolved(e),
        };
        let target = Target {
            host: endpoint.host.clone(),
            port: endpoint.port,
        };
        let options = engine::identity::probe_options(spec, status, &endpoint, now);
        let report = self.seams.prober.probe(&target, &options).await;
        let report = engine::identity::judge(status, &endpoint, report);
        self.metrics.probe_finished(&report);
        if !report.reachable {
            resolver.probe_failed(spec);
        }
        Observation::Probed {
            endpoint,
            report: Box::new(report),
        }
    }
}
