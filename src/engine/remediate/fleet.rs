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
    /// Claims by (subscription, object key), with when they were taken.
    claims: Mutex<BTreeMap<(String, String), std::time::Instant>>,
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

    /// Claims a disruptive slot for `key` in this process and, with shared claims, for every
    /// replica; false when either is refused (and then nothing stays claimed).
    pub(super) async fn claim_everywhere(&self, subscription: &str, key: &str) -> bool {
        if !self.claim(subscription, key) {
            return false;
        }
        let Some(shared) = &self.shared else {
            return true;
        };
        let subscription = subscription.to_ascii_lowercase();
        let in_flight = self.in_flight(&subscription);
        if shared
            .claim(
                &subscription,
                key,
                &in_flight,
                self.policy.max_concurrent_disruptive,
            )
            .await
        {
            return true;
        }
        self.release_here(&subscription, key);
        false
    }

    /// The objects whose status shows a disruptive rung in flight in `subscription`.
    fn in_flight(&self, subscription: &str) -> Vec<String> {
        self.view
            .lock()
            .ok()
            .and_then(|v| {
                v.subscriptions
                    .get(subscription)
                    .map(|c| c.disruptive_in_flight.to_vec())
            })
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

    /// Claims a disruptive slot for `key`; false when the subscription's slots are taken.
    pub(super) fn claim(&self, subscription: &str, key: &str) -> bool {
        let subscription = &subscription.to_ascii_lowercase();
        let (Ok(view), Ok(mut claims)) = (self.view.lock(), self.claims.lock()) else {
            return false;
        };
        let held = claims
            .keys()
            .filter(|(s, k)| s == subscription && k != key)
            .count();
        let in_status = view.subscriptions.get(subscription).map_or(0, |c| {
            c.disruptive_in_flight
                .iter()
                .filter(|k| {
                    *k != key && !claims.contains_key(&(subscription.to_string(), (*k).clone()))
                })
                .count()
        });
        if held + in_status >= self.policy.max_concurrent_disruptive {
            return false;
        }
        claims.insert(
            (subscription.to_string(), key.to_string()),
            std::time::Instant::now(),
        );
        true
    }

    /// Releases `key`'s claim (its disruptive rung ended), here and, with shared claims, for
    /// every replica (in the background: until it lands, the slot stays taken, never the
    /// other way round).
    pub(super) fn release(&self, subscription: &str, key: &str) {
        self.release_here(subscription, key);
        if let (Some(shared), Ok(runtime)) = (&self.shared, tokio::runtime::Handle::try_current()) {
            let (shared, subscription, key) = (
                Arc::clone(shared),
                subscription.to_ascii_lowercase(),
                key.to_string(),
            );
            runtime.spawn(async move { shared.release(&subscription, &key).await });
        }
    }

    fn release_here(&self, subscription: &str, key: &str) {
        let subscription = &subscription.to_ascii_lowercase();
        if let Ok(mut claims) = self.claims.lock() {
            claims.remove(&(subscription.to_string(), key.to_string()));
        }
    }

    /// Releases `key`'s claim if it is older than `age`: by then a stored intent is in the
    /// cache (and so in the view), so a claim whose object shows no rung in flight is one
    /// whose rung ended, however it ended (idle, finished by another replica, suspended).
    pub(super) fn release_settled(&self, subscription: &str, key: &str, age: Duration) {
        if let Ok(mut claims) = self.claims.lock() {
            // Called on every reconcile; almost always with no claim at all.
            if claims.is_empty() {
                return;
            }
            let subscription = &subscription.to_ascii_lowercase();
            let id = (subscription.to_string(), key.to_string());
            if claims.get(&id).is_some_and(|t| t.elapsed() >= age) {
                claims.remove(&id);
            }
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

    /// Whether `key` could take a slot now (without claiming it).
    pub(super) fn slot_free(&self, subscription: &str, key: &str) -> bool {
        let subscription = &subscription.to_ascii_lowercase();
        let (Ok(view), Ok(claims)) = (self.view.lock(), self.claims.lock()) else {
            return false;
        };
        let held = claims
            .keys()
            .filter(|(s, k)| s == subscription && k != key)
            .count();
        held < self.policy.max_concurrent_disruptive
            && view.slot_free(subscription, key, &self.policy)
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
        assert!(!fleet.claim_everywhere("SUB", "ns/a").await);
        // Refused elsewhere: nothing stays claimed here.
        assert!(fleet.slot_free("sub", "ns/b"));
        let asked = refusing.asked.lock().unwrap().clone();
        assert_eq!(asked, [("sub".into(), "ns/a".into(), vec![], 1)]);

        let granting = Arc::new(Ledger {
            grant: true,
            ..Ledger::default()
        });
        let fleet = Fleet::new(FleetPolicy::default()).with_shared_claims(granting.clone());
        assert!(fleet.claim_everywhere("sub", "ns/a").await);
        assert!(!fleet.slot_free("sub", "ns/b"));
        // Refused here first: the shared claims are not even asked.
        assert!(!fleet.claim_everywhere("sub", "ns/b").await);
        assert_eq!(granting.asked.lock().unwrap().len(), 1);
        fleet.release("sub", "ns/a");
        tokio::task::yield_now().await;
        for _ in 0..10 {
            if !granting.released.lock().unwrap().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(*granting.released.lock().unwrap(), ["ns/a"]);
        assert!(fleet.slot_free("sub", "ns/b"));
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
        assert!(fleet.claim("sub", "ns/deleted"));
        assert!(!fleet.slot_free("sub", "ns/other"));
        fleet.retain_claims(|key| key != "ns/deleted");
        assert!(fleet.slot_free("sub", "ns/other"));
        assert!(fleet.claim("sub", "ns/other"));
    }

    #[test]
    fn subscriptions_are_compared_whatever_their_case() {
        let fleet = Fleet::new(FleetPolicy::default());
        assert!(fleet.claim("ABCDEF00-0000-0000-0000-000000000001", "ns/a"));
        assert!(!fleet.slot_free("abcdef00-0000-0000-0000-000000000001", "ns/b"));
        assert!(!fleet.claim("abcdef00-0000-0000-0000-000000000001", "ns/b"));
        fleet.release("AbCdEf00-0000-0000-0000-000000000001", "ns/a");
        assert!(fleet.claim("abcdef00-0000-0000-0000-000000000001", "ns/b"));
    }

    #[test]
    fn a_claim_whose_rung_ended_elsewhere_is_released_once_settled() {
        let fleet = Fleet::new(FleetPolicy::default());
        assert!(fleet.claim("sub", "ns/a"));
        // A fresh claim covers the time before the intent reaches the cache: kept.
        fleet.release_settled("sub", "ns/a", Duration::from_secs(60));
        assert!(!fleet.slot_free("sub", "ns/b"));
        fleet.release_settled("sub", "ns/a", Duration::ZERO);
        assert!(fleet.slot_free("sub", "ns/b"));
        assert!(fleet.claim("sub", "ns/b"));
        fleet.clear_claims();
        assert!(fleet.slot_free("sub", "ns/c"));
    }
}
