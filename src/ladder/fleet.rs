//! Fleet safety: the per-subscription storm breaker, the fleet-wide breaker (every
//! subscription together) and the cap on concurrent disruptive rungs. Computed from every object's status (the controller's cache), so it survives
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
    /// Above this percentage of all monitored VMs (every subscription together) having become
    /// unreachable within `fleet_window`, every mutating rung stops: the observer is probably
    /// the problem (its network, its DNS, its node), not the VMs.
    pub fleet_max_failing_percent: u8,
    /// The fleet-wide breaker only applies with at least this many monitored VMs.
    pub fleet_min_size: usize,
    /// How recent a VM's turn to unreachable must be to count for the fleet-wide breaker.
    pub fleet_window: std::time::Duration,
}

impl Default for FleetPolicy {
    fn default() -> Self {
        Self {
            max_unreachable_percent: 30,
            min_fleet_size: 5,
            max_concurrent_disruptive: 1,
            disruptive_grace: std::time::Duration::from_secs(60),
            fleet_max_failing_percent: 50,
            fleet_min_size: 4,
            fleet_window: std::time::Duration::from_secs(600),
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
    /// It became unreachable within the fleet-wide breaker's window.
    pub failed_recently: bool,
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
    /// Monitored VMs in every subscription.
    pub total: usize,
    /// VMs (every subscription) that became unreachable within the fleet-wide window.
    pub failed_recently: usize,
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
            view.total += 1;
            view.failed_recently += usize::from(m.unreachable && m.failed_recently);
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

    /// Whether the fleet-wide breaker holds every mutating rung: so large a share of all
    /// monitored VMs, across every subscription, failed within a short window that the
    /// observer itself is the likelier cause.
    pub fn fleet_breaker(&self, policy: &FleetPolicy) -> bool {
        self.total >= policy.fleet_min_size
            && self.failed_recently * 100
                > usize::from(policy.fleet_max_failing_percent) * self.total
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
            failed_recently: true,
        }))
    }

    #[test]
    fn the_fleet_wide_breaker_counts_every_subscription_and_only_recent_failures() {
        let policy = FleetPolicy::default();
        let keys: Vec<String> = (0..8).map(|i| format!("ns/vm{i}")).collect();
        // Eight VMs in four subscriptions of two: no subscription reaches the storm
        // breaker's minimum size, but five of eight (62% > 50%) failed together.
        let members = |recent: bool| {
            keys.iter()
                .enumerate()
                .map(|(i, k)| Member {
                    key: k,
                    subscription: ["a", "b", "c", "d"][i / 2],
                    unreachable: i < 5,
                    disruptive_in_flight: false,
                    failed_recently: recent,
                })
                .collect::<Vec<_>>()
        };
        let view = FleetView::from_members(members(true));
        assert!(view.fleet_breaker(&policy));
        assert_eq!(view.storming(&policy).count(), 0);
        let old = FleetView::from_members(members(false));
        assert!(
            !old.fleet_breaker(&policy),
            "long-known failures do not count"
        );
        let at = FleetView::from_members(
            members(true)
                .into_iter()
                .take(4)
                .chain(members(true).into_iter().skip(5)),
        );
        assert_eq!((at.total, at.failed_recently), (7, 4));
        assert!(at.fleet_breaker(&policy), "4 of 7 is above half");
        let small = FleetView::from_members(members(true).into_iter().take(3));
        assert!(!small.fleet_breaker(&policy), "below the minimum size");
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
