//! What every reconcile shares, and the fleet view computed from the object cache.

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
    /// Whether this replica led at the last fleet refresh (a new term clears the claims).
    pub(super) was_leader: AtomicBool,
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
            instance,
        };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            leadership,
            failures: Mutex::new(HashMap::new()),
            remediator: None,
            store: None,
            memory: Arc::new(ProbeMemory::default()),
            heartbeat: writes::HEARTBEAT,
            was_leader: AtomicBool::new(false),
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

    /// Recomputes the fleet view (storm breaker, disruptive rungs in flight) and the
    /// suspended-remediation gauge from every cached object.
    /// `fresh` is the object being reconciled with its new status (the cache lags behind it).
    pub(super) fn refresh_fleet(
        &self,
        leader: bool,
        fresh: Option<(&ObjectKey, &RdpHealthStatus)>,
    ) {
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
                    m.unreachable_since =
                        status.last_transition_to_unreachable.as_ref().map(|t| t.0);
                }
                Some(m)
            })
            .collect();
        let window = self
            .remediator
            .as_ref()
            .map(|r| r.fleet.policy().fleet_window);
        let now = Timestamp::now();
        let view = FleetView::from_members(members.iter().map(|m| Member {
            key: &m.key,
            subscription: &m.subscription,
            unreachable: m.unreachable,
            disruptive_in_flight: m.disruptive_in_flight,
            failed_recently: m.failed_within(window, now),
        }));
        let storming = match &self.remediator {
            Some(r) => {
                // A new term starts from the statuses, not from claims of an earlier one.
                if leader && !self.was_leader.swap(true, Ordering::AcqRel) {
                    r.fleet.clear_claims();
                } else if !leader {
                    self.was_leader.store(false, Ordering::Release);
                }
                // Deleted and suspended objects hold no slot.
                let live: std::collections::HashSet<&str> =
                    members.iter().map(|m| m.key.as_str()).collect();
                r.fleet.retain_claims(|key| live.contains(key));
                r.fleet.update(view);
                self.metrics
                    .observer_blind("fleet_breaker", r.fleet.fleet_breaker());
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
            ("FleetBreaker", suspended_by("FleetBreaker")),
            ("CanaryDown", suspended_by("CanaryDown")),
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

/// One monitored object as fleet safety sees it.
pub(super) struct FleetMember {
    key: String,
    subscription: String,
    unreachable: bool,
    disruptive_in_flight: bool,
    /// The remediation mode may act (DryRun or Auto).
    acting: bool,
    /// The reason of a `RemediationSuspended=True` condition.
    suspended: Option<String>,
    /// When it last became unreachable.
    unreachable_since: Option<Timestamp>,
}

impl FleetMember {
    pub(super) fn of(obj: &RdpHealth) -> Option<Self> {
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
                .is_some_and(|c| c.is_disruptive()),
            acting: obj.spec.remediation.mode != RemediationMode::Observe,
            suspended: conditions::find(conditions, types::REMEDIATION_SUSPENDED)
                .filter(|c| c.status == Status::True.as_str())
                .map(|c| c.reason.clone()),
            unreachable_since: status
                .and_then(|s| s.last_transition_to_unreachable.as_ref())
                .map(|t| t.0),
        })
    }

    /// Whether it became unreachable within `window` before `now` (fleet-wide breaker).
    fn failed_within(&self, window: Option<Duration>, now: Timestamp) -> bool {
        match (self.unreachable_since, window) {
            (Some(since), Some(window)) => {
                Duration::try_from(now.duration_since(since)).is_ok_and(|d| d <= window)
            }
            _ => false,
        }
    }
}
