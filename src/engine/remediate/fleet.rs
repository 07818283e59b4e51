//! Fleet-wide state shared by every reconcile: the storm breaker's view and the claims on
//! disruptive slots.

use super::*;

/// Shared fleet state: the view of every monitored VM (refreshed by the driver) and the
/// in-process claims on disruptive slots, so two concurrent reconciles cannot both take the
/// last slot.
#[derive(Debug, Default)]
pub struct Fleet {
    pub(super) policy: FleetPolicy,
    view: Mutex<FleetView>,
    /// Claims by (scope, object key), with when they were taken.
    claims: Mutex<BTreeMap<(Scope, String), std::time::Instant>>,
    canary: Mutex<Canary>,
    /// Claims every replica sees (with shards): a slot is taken only when both this
    /// process's claim and the shared one succeed.
    shared: Option<Arc<dyn SharedClaims>>,
}

/// Claims on disruptive slots published where every replica reads them, taken by a
/// compare-and-swap: of two replicas racing for a subscription's last slot, one wins.
#[async_trait::async_trait]
pub trait SharedClaims: Send + Sync + std::fmt::Debug {
    /// Claims a slot of `subscription` for `key` when, after stale claims are dropped, the
    /// claims of other objects plus the rungs in flight in `in_flight` (object keys whose
    /// status shows a disruptive rung) leave one of `max`; false when they do not, or when
    /// the claim could not be recorded.
    async fn claim(&self, subscription: &str, key: &str, in_flight: &[String], max: usize) -> bool;

    /// Releases `key`'s claim on `subscription` (idempotent).
    async fn release(&self, subscription: &str, key: &str);
}

/// What the canary endpoint last showed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Canary {
    /// No canary configured.
    #[default]
    None,
    /// Configured, not probed yet: held, as when it fails (when in doubt, wait).
    Pending,
    /// Its last probe reached it.
    Up,
    /// Its last probe failed.
    Down,
}

impl Fleet {
    /// A fleet with `policy`.
    pub fn new(policy: FleetPolicy) -> Self {
        Self {
            policy,
            ..Self::default()
        }
    }

    /// Also claims through `shared`, so that replicas sharing the work stay within the cap
    /// together.
    pub fn with_shared_claims(mut self, shared: Arc<dyn SharedClaims>) -> Self {
        self.shared = Some(shared);
        self
    }

    /// The caps a disruptive rung of an object in `subscription` (and `group`) must fit in:
    /// its subscription's, and its group's when it has one.
    fn scopes(&self, subscription: &str, group: Option<&ClaimGroup>) -> Vec<(Scope, usize)> {
        let mut scopes = vec![(
            Scope::subscription(subscription),
            self.policy.max_concurrent_disruptive,
        )];
        scopes.extend(group.map(|g| (Scope::group(&g.id), g.max)));
        scopes
    }

    /// Claims a disruptive slot for `key` in every scope it counts in (its subscription, its
    /// group), in this process and, with shared claims, for every replica; false when any is
    /// refused (and then nothing stays claimed).
    pub(super) async fn claim_everywhere(
        &self,
        subscription: &str,
        group: Option<&ClaimGroup>,
        key: &str,
    ) -> bool {
        let scopes = self.scopes(subscription, group);
        for (i, (scope, max)) in scopes.iter().enumerate() {
            if !self.claim(scope, key, *max) {
                for (taken, _) in &scopes[..i] {
                    self.release_here(taken, key);
                }
                return false;
            }
        }
        let Some(shared) = &self.shared else {
            return true;
        };
        for (i, (scope, max)) in scopes.iter().enumerate() {
            let in_flight = self.in_flight(scope, key);
            if !shared.claim(&scope.name(), key, &in_flight, *max).await {
                for (taken, _) in &scopes[..i] {
                    shared.release(&taken.name(), key).await;
                }
                for (scope, _) in &scopes {
                    self.release_here(scope, key);
                }
                return false;
            }
        }
        true
    }

    /// The objects other than `key` whose status shows a disruptive rung in flight in `scope`.
    fn in_flight(&self, scope: &Scope, key: &str) -> Vec<String> {
        self.view
            .lock()
            .map(|v| v.in_flight(scope, key).cloned().collect())
            .unwrap_or_default()
    }

    /// Replaces the view (computed from every object's status).
    pub fn update(&self, view: FleetView) {
        if let Ok(mut v) = self.view.lock() {
            *v = view;
        }
    }

    /// The limits.
    pub fn policy(&self) -> &FleetPolicy {
        &self.policy
    }

    /// Declares that a canary endpoint is watched: every rung waits for its first success.
    pub fn expect_canary(&self) {
        if let Ok(mut c) = self.canary.lock() {
            *c = Canary::Pending;
        }
    }

    /// Records the canary's latest probe.
    pub fn canary_probed(&self, reachable: bool) {
        if let Ok(mut c) = self.canary.lock() {
            *c = if reachable { Canary::Up } else { Canary::Down };
        }
    }

    /// Whether the canary holds every rung (pending or failing).
    pub fn canary_down(&self) -> bool {
        self.canary
            .lock()
            .map(|c| matches!(*c, Canary::Pending | Canary::Down))
            .unwrap_or(true)
    }

    /// Whether the fleet-wide breaker (every subscription together) is on.
    pub fn fleet_breaker(&self) -> bool {
        self.view
            .lock()
            .map(|v| v.fleet_breaker(&self.policy))
            .unwrap_or(true)
    }

    /// Why every mutating rung is held, if it is: the observer may be blind.
    pub fn blind(&self) -> Option<Suspension> {
        if self.canary_down() {
            Some(Suspension::CanaryDown)
        } else if self.fleet_breaker() {
            Some(Suspension::FleetBreaker)
        } else {
            None
        }
    }

    /// Whether the storm breaker holds `subscription`.
    pub fn storm(&self, subscription: &str) -> bool {
        let subscription = &subscription.to_ascii_lowercase();
        self.view
            .lock()
            .map(|v| v.storm(subscription, &self.policy))
            .unwrap_or(true)
    }

    /// Subscriptions whose breaker is on.
    pub fn storming(&self) -> Vec<String> {
        self.view
            .lock()
            .map(|v| v.storming(&self.policy).map(str::to_string).collect())
            .unwrap_or_default()
    }

    /// Claims a slot of `scope` (whose cap is `max`) for `key` in this process; false when
    /// its slots are taken.
    pub(super) fn claim(&self, scope: &Scope, key: &str, max: usize) -> bool {
        let (Ok(view), Ok(mut claims)) = (self.view.lock(), self.claims.lock()) else {
            return false;
        };
        let held = claims
            .keys()
            .filter(|(s, k)| s == scope && k != key)
            .count();
        let in_status = view
            .in_flight(scope, key)
            .filter(|k| !claims.contains_key(&(scope.clone(), (*k).clone())))
            .count();
        if held + in_status >= max {
            return false;
        }
        claims.insert((scope.clone(), key.to_string()), std::time::Instant::now());
        true
    }

    /// Releases `key`'s claims (its disruptive rung ended), here and, with shared claims, for
    /// every replica (in the background: until it lands, the slot stays taken, never the
    /// other way round).
    pub(super) fn release(&self, subscription: &str, group: Option<&ClaimGroup>, key: &str) {
        for (scope, _) in self.scopes(subscription, group) {
            self.release_here(&scope, key);
            if let (Some(shared), Ok(runtime)) =
                (&self.shared, tokio::runtime::Handle::try_current())
            {
                let (shared, scope, key) = (Arc::clone(shared), scope.name(), key.to_string());
                runtime.spawn(async move { shared.release(&scope, &key).await });
            }
        }
    }

    fn release_here(&self, scope: &Scope, key: &str) {
        if let Ok(mut claims) = self.claims.lock() {
            claims.remove(&(scope.clone(), key.to_string()));
        }
    }

    /// Releases `key`'s claims older than `age`: by then a stored intent is in the cache
    /// (and so in the view), so a claim whose object shows no rung in flight is one whose
    /// rung ended, however it ended (idle, finished by another replica, suspended).
    pub(super) fn release_settled(&self, key: &str, age: Duration) {
        if let Ok(mut claims) = self.claims.lock() {
            claims.retain(|(_, k), t| k != key || t.elapsed() < age);
        }
    }

    /// Drops every claim: a replica that becomes the leader starts from the statuses (which
    /// show every rung in flight), not from claims it held in an earlier term.
    pub fn clear_claims(&self) {
        if let Ok(mut claims) = self.claims.lock() {
            claims.clear();
        }
    }

    /// Drops the claims of objects that no longer exist: an object deleted while its
    /// disruptive rung ran would otherwise hold its subscription's slot until a restart.
    pub fn retain_claims(&self, live: impl Fn(&str) -> bool) {
        if let Ok(mut claims) = self.claims.lock() {
            claims.retain(|(_, key), _| live(key));
        }
    }

    /// Whether `key` could take a slot now in every scope it counts in (without claiming).
    pub(super) fn slot_free(
        &self,
        subscription: &str,
        group: Option<&ClaimGroup>,
        key: &str,
    ) -> bool {
        let (Ok(view), Ok(claims)) = (self.view.lock(), self.claims.lock()) else {
            return false;
        };
        self.scopes(subscription, group).iter().all(|(scope, max)| {
            let held = claims
                .keys()
                .filter(|(s, k)| s == scope && k != key)
                .count();
            held < *max && view.slot_free(scope, key, *max)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One question to the shared claims: subscription, key, rungs in flight, cap.
    type Asked = (String, String, Vec<String>, usize);

    /// Shared claims that grant a fixed answer and record what they were asked.
    #[derive(Debug, Default)]
    struct Ledger {
        grant: bool,
        asked: Mutex<Vec<Asked>>,
        released: Mutex<Vec<String>>,
    }

    #[async_trait::async_trait]
    impl SharedClaims for Ledger {
        async fn claim(&self, sub: &str, key: &str, in_flight: &[String], max: usize) -> bool {
            self.asked
                .lock()
                .unwrap()
                .push((sub.into(), key.into(), in_flight.to_vec(), max));
            self.grant
        }
        async fn release(&self, _: &str, key: &str) {
            self.released.lock().unwrap().push(key.into());
        }
    }

    #[tokio::test]
    async fn a_slot_is_taken_only_when_the_shared_claim_succeeds_too() {
        let refusing = Arc::new(Ledger::default());
        let fleet = Fleet::new(FleetPolicy::default()).with_shared_claims(refusing.clone());
        assert!(!fleet.claim_everywhere("SUB", None, "ns/a").await);
        // Refused elsewhere: nothing stays claimed here.
        assert!(fleet.slot_free("sub", None, "ns/b"));
        let asked = refusing.asked.lock().unwrap().clone();
        assert_eq!(asked, [("sub".into(), "ns/a".into(), vec![], 1)]);

        let granting = Arc::new(Ledger {
            grant: true,
            ..Ledger::default()
        });
        let fleet = Fleet::new(FleetPolicy::default()).with_shared_claims(granting.clone());
        assert!(fleet.claim_everywhere("sub", None, "ns/a").await);
        assert!(!fleet.slot_free("sub", None, "ns/b"));
        // Refused here first: the shared claims are not even asked.
        assert!(!fleet.claim_everywhere("sub", None, "ns/b").await);
        assert_eq!(granting.asked.lock().unwrap().len(), 1);
        fleet.release("sub", None, "ns/a");
        tokio::task::yield_now().await;
        for _ in 0..10 {
            if !granting.released.lock().unwrap().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(*granting.released.lock().unwrap(), ["ns/a"]);
        assert!(fleet.slot_free("sub", None, "ns/b"));
    }

    fn sub(s: &str) -> Scope {
        Scope::subscription(s)
    }

    #[tokio::test]
    async fn a_fleet_cap_holds_across_subscriptions() {
        let fleet = Fleet::new(FleetPolicy::default());
        let group = ClaimGroup {
            id: "ops/prod".into(),
            max: 1,
        };
        // Each VM in its own subscription: the operator's cap of one per subscription
        // leaves both free; the fleet's cap of one does not.
        assert!(fleet.claim_everywhere("s1", Some(&group), "ops/a").await);
        assert!(!fleet.slot_free("s2", Some(&group), "ops/b"));
        assert!(!fleet.claim_everywhere("s2", Some(&group), "ops/b").await);
        // Refused by the group: its subscription's slot was not kept either.
        assert!(fleet.slot_free("s2", None, "ops/other"));
        assert!(fleet.slot_free("s2", None, "ops/b"));
        // Another fleet, or none, is not held by this one's cap.
        let other = ClaimGroup {
            id: "ops/dev".into(),
            max: 1,
        };
        assert!(fleet.slot_free("s3", Some(&other), "ops/c"));
        // A rung in flight that only the statuses show counts against the group as well.
        fleet.release("s1", Some(&group), "ops/a");
        fleet.update(FleetView::from_members([crate::ladder::fleet::Member {
            key: "ops/a",
            subscription: "s1",
            unreachable: true,
            disruptive_in_flight: true,
            failed_recently: true,
            group: Some("ops/prod"),
        }]));
        assert!(!fleet.claim_everywhere("s2", Some(&group), "ops/b").await);
        let two = ClaimGroup { max: 2, ..group };
        assert!(fleet.claim_everywhere("s2", Some(&two), "ops/b").await);
        // A cap of zero (a garbled annotation) allows nothing.
        let none = ClaimGroup {
            id: "ops/garbled".into(),
            max: 0,
        };
        assert!(!fleet.claim_everywhere("s4", Some(&none), "ops/d").await);
    }

    #[tokio::test]
    async fn the_group_is_claimed_on_every_replica_too() {
        let granting = Arc::new(Ledger {
            grant: true,
            ..Ledger::default()
        });
        let fleet = Fleet::new(FleetPolicy::default()).with_shared_claims(granting.clone());
        let group = ClaimGroup {
            id: "ops/Prod".into(),
            max: 3,
        };
        assert!(fleet.claim_everywhere("SUB", Some(&group), "ops/a").await);
        let asked = granting.asked.lock().unwrap().clone();
        assert_eq!(
            asked,
            [
                ("sub".into(), "ops/a".into(), vec![], 1),
                ("group:ops/prod".into(), "ops/a".into(), vec![], 3),
            ]
        );
        fleet.release("SUB", Some(&group), "ops/a");
        for _ in 0..20 {
            if granting.released.lock().unwrap().len() == 2 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(granting.released.lock().unwrap().len(), 2);
    }

    #[test]
    fn a_canary_holds_everything_until_it_answers() {
        let fleet = Fleet::new(FleetPolicy::default());
        assert_eq!(fleet.blind(), None, "no canary configured");
        fleet.expect_canary();
        assert_eq!(
            fleet.blind(),
            Some(Suspension::CanaryDown),
            "not probed yet"
        );
        fleet.canary_probed(true);
        assert_eq!(fleet.blind(), None);
        fleet.canary_probed(false);
        assert_eq!(fleet.blind(), Some(Suspension::CanaryDown));
    }

    #[test]
    fn claims_of_deleted_objects_free_their_slot() {
        let fleet = Fleet::new(FleetPolicy::default());
        assert!(fleet.claim(&sub("sub"), "ns/deleted", 1));
        assert!(!fleet.slot_free("sub", None, "ns/other"));
        fleet.retain_claims(|key| key != "ns/deleted");
        assert!(fleet.slot_free("sub", None, "ns/other"));
        assert!(fleet.claim(&sub("sub"), "ns/other", 1));
    }

    #[test]
    fn subscriptions_are_compared_whatever_their_case() {
        let fleet = Fleet::new(FleetPolicy::default());
        assert!(fleet.claim(&sub("ABCDEF00-0000-0000-0000-000000000001"), "ns/a", 1));
        assert!(!fleet.slot_free("abcdef00-0000-0000-0000-000000000001", None, "ns/b"));
        assert!(!fleet.claim(&sub("abcdef00-0000-0000-0000-000000000001"), "ns/b", 1));
        fleet.release("AbCdEf00-0000-0000-0000-000000000001", None, "ns/a");
        assert!(fleet.claim(&sub("abcdef00-0000-0000-0000-000000000001"), "ns/b", 1));
    }

    #[test]
    fn a_claim_whose_rung_ended_elsewhere_is_released_once_settled() {
        let fleet = Fleet::new(FleetPolicy::default());
        assert!(fleet.claim(&sub("sub"), "ns/a", 1));
        // A fresh claim covers the time before the intent reaches the cache: kept.
        fleet.release_settled("ns/a", Duration::from_secs(60));
        assert!(!fleet.slot_free("sub", None, "ns/b"));
        fleet.release_settled("ns/a", Duration::ZERO);
        assert!(fleet.slot_free("sub", None, "ns/b"));
        assert!(fleet.claim(&sub("sub"), "ns/b", 1));
        fleet.clear_claims();
        assert!(fleet.slot_free("sub", None, "ns/c"));
    }
}
