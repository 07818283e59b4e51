//! Fleet safety: the per-subscription storm breaker and the cap on concurrent disruptive
//! rungs. Computed from every object's status (the controller's cache), so it survives
//! restarts and leader changes: a rung in flight is visible in its object's status.

use std::collections::BTreeMap;

/// Fleet-wide limits (operator flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FleetPolicy {
    /// Above this percentage of unreachable VMs in a subscription, disruptive rungs stop.
    pub max_unreachable_percent: u8,
    /// The breaker only applies to subscriptions with at least this many monitored VMs.
    pub min_fleet_size: usize,
    /// Disruptive rungs allowed in flight at once per subscription.
    pub max_concurrent_disruptive: usize,
    /// Disruptive rungs wait this long after an incident opens, so that the other VMs of a
    /// fleet-wide outage are seen unreachable (and trip the breaker) before any VM acts.
    pub disruptive_grace: std::time::Duration,
}

impl Default for FleetPolicy {
    fn default() -> Self {
        Self {
            max_unreachable_percent: 30,
            min_fleet_size: 5,
            max_concurrent_disruptive: 1,
            disruptive_grace: std::time::Duration::from_secs(60),
        }
    }
}

/// One monitored VM as the fleet check sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member<'a> {
    /// Object key (`namespace/name`).
    pub key: &'a str,
    /// Azure subscription.
    pub subscription: &'a str,
    /// Unreachable (after thresholds).
    pub unreachable: bool,
    /// A disruptive rung is in flight for it.
    pub disruptive_in_flight: bool,
}

/// Counts for one subscription.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SubscriptionCounts {
    /// Monitored VMs.
    pub total: usize,
    /// Unreachable VMs.
    pub unreachable: usize,
    /// Objects with a disruptive rung in flight.
    pub disruptive_in_flight: Vec<String>,
}

/// The fleet, by subscription.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FleetView {
    /// Counts per subscription.
    pub subscriptions: BTreeMap<String, SubscriptionCounts>,
}

impl FleetView {
    /// Builds the view from every monitored VM.
    pub fn from_members<'a>(members: impl IntoIterator<Item = Member<'a>>) -> Self {
        let mut view = Self::default();
        for m in members {
            // Subscription IDs are GUIDs that Azure spells in either case.
            let counts = view
                .subscriptions
                .entry(m.subscription.to_ascii_lowercase())
                .or_default();
            counts.total += 1;
            counts.unreachable += usize::from(m.unreachable);
            if m.disruptive_in_flight {
                counts.disruptive_in_flight.push(m.key.to_string());
            }
        }
        view
    }

    /// Whether the storm breaker holds disruptive rungs in `subscription`: so many VMs are
    /// unreachable at once that the cause is probably shared (network, platform, or the
    /// operator's own vantage point), and restarting VMs would not help.
    pub fn storm(&self, subscription: &str, policy: &FleetPolicy) -> bool {
        self.subscriptions
            .get(&subscription.to_ascii_lowercase())
            .is_some_and(|c| {
                c.total >= policy.min_fleet_size
                    && c.unreachable * 100 > usize::from(policy.max_unreachable_percent) * c.total
            })
    }

    /// Whether `key` may start a disruptive rung in `subscription` now.
    pub fn slot_free(&self, subscription: &str, key: &str, policy: &FleetPolicy) -> bool {
        self.subscriptions
            .get(&subscription.to_ascii_lowercase())
            .is_none_or(|c| {
                c.disruptive_in_flight.iter().filter(|k| *k != key).count()
                    < policy.max_concurrent_disruptive
            })
    }

    /// Subscriptions whose breaker is on.
    pub fn storming<'a>(&'a self, policy: &'a FleetPolicy) -> impl Iterator<Item = &'a str> + 'a {
        self.subscriptions
            .keys()
            .filter(move |s| self.storm(s, policy))
            .map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    fn fleet(total: usize, unreachable: usize, in_flight: &[&str]) -> FleetView {
        let keys: Vec<String> = (0..total).map(|i| format!("ns/vm{i}")).collect();
        FleetView::from_members(keys.iter().enumerate().map(|(i, k)| Member {
            key: k,
            subscription: "sub",
            unreachable: i < unreachable,
            disruptive_in_flight: in_flight.contains(&k.as_str()),
        }))
    }

    #[rstest]
    #[case::small_fleet_never_storms(4, 4, false)]
    #[case::at_threshold_is_not_a_storm(10, 3, false)]
    #[case::above_threshold(10, 4, true)]
    #[case::everything_down(5, 5, true)]
    #[case::healthy(100, 0, false)]
    fn storm_breaker(#[case] total: usize, #[case] unreachable: usize, #[case] storm: bool) {
        let view = fleet(total, unreachable, &[]);
        assert_eq!(view.storm("sub", &FleetPolicy::default()), storm);
        assert!(!view.storm("other-sub", &FleetPolicy::default()));
        assert_eq!(
            view.storming(&FleetPolicy::default()).count(),
            usize::from(storm)
        );
    }

    #[test]
    fn one_disruptive_rung_per_subscription() {
        let policy = FleetPolicy::default();
        let view = fleet(10, 2, &["ns/vm0"]);
        assert!(
            view.slot_free("sub", "ns/vm0", &policy),
            "its own rung does not count"
        );
        assert!(!view.slot_free("sub", "ns/vm1", &policy));
        assert!(view.slot_free("elsewhere", "ns/vm1", &policy));
        let two = FleetPolicy {
            max_concurrent_disruptive: 2,
            ..policy
        };
        assert!(view.slot_free("sub", "ns/vm1", &two));
    }
}
