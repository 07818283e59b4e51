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
    claims: Mutex<BTreeSet<(String, String)>>,
}

impl Fleet {
    /// A fleet with `policy`.
    pub fn new(policy: FleetPolicy) -> Self {
        Self {
            policy,
            ..Self::default()
        }
    }

    /// Replaces the view (computed from every object's status).
    pub fn update(&self, view: FleetView) {
        if let Ok(mut v) = self.view.lock() {
            *v = view;
        }
    }

    /// Whether the storm breaker holds `subscription`.
    pub fn storm(&self, subscription: &str) -> bool {
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
        let (Ok(view), Ok(mut claims)) = (self.view.lock(), self.claims.lock()) else {
            return false;
        };
        let held = claims
            .iter()
            .filter(|(s, k)| s == subscription && k != key)
            .count();
        let in_status = view.subscriptions.get(subscription).map_or(0, |c| {
            c.disruptive_in_flight
                .iter()
                .filter(|k| {
                    *k != key && !claims.contains(&(subscription.to_string(), (*k).clone()))
                })
                .count()
        });
        if held + in_status >= self.policy.max_concurrent_disruptive {
            return false;
        }
        claims.insert((subscription.to_string(), key.to_string()));
        true
    }

    /// Releases `key`'s claim (its disruptive rung ended).
    pub(super) fn release(&self, subscription: &str, key: &str) {
        if let Ok(mut claims) = self.claims.lock() {
            claims.remove(&(subscription.to_string(), key.to_string()));
        }
    }

    /// Drops the claims of objects that no longer exist: an object deleted while its
    /// disruptive rung ran would otherwise hold its subscription's slot until a restart.
    pub fn retain_claims(&self, live: impl Fn(&str) -> bool) {
        if let Ok(mut claims) = self.claims.lock() {
            claims.retain(|(_, key)| live(key));
        }
    }

    /// Whether `key` could take a slot now (without claiming it).
    pub(super) fn slot_free(&self, subscription: &str, key: &str) -> bool {
        let (Ok(view), Ok(claims)) = (self.view.lock(), self.claims.lock()) else {
            return false;
        };
        let held = claims
            .iter()
            .filter(|(s, k)| s == subscription && k != key)
            .count();
        held < self.policy.max_concurrent_disruptive
            && view.slot_free(subscription, key, &self.policy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_of_deleted_objects_free_their_slot() {
        let fleet = Fleet::new(FleetPolicy::default());
        assert!(fleet.claim("sub", "ns/deleted"));
        assert!(!fleet.slot_free("sub", "ns/other"));
        fleet.retain_claims(|key| key != "ns/deleted");
        assert!(fleet.slot_free("sub", "ns/other"));
        assert!(fleet.claim("sub", "ns/other"));
    }
}
