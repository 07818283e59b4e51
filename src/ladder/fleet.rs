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

/// What a cap on disruptive rungs in flight counts over.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// One Azure subscription (lower case): the operator's `--max-concurrent-disruptive`.
    Subscription(String),
    /// One claim group (lower case): a fleet's incident objects, with the fleet's own cap.
    Group(String),
}

impl Scope {
    /// `subscription`'s scope (Azure spells subscription GUIDs in either case).
    pub fn subscription(subscription: &str) -> Self {
        Self::Subscription(subscription.to_ascii_lowercase())
    }

    /// The scope of the claim group `group`.
    pub fn group(group: &str) -> Self {
        Self::Group(group.to_ascii_lowercase())
    }

    /// Its name where every replica keeps claims: the subscription itself, or `group:` and
    /// the group (never a subscription GUID).
    pub fn name(&self) -> String {
        match self {
            Self::Subscription(s) => s.clone(),
            Self::Group(g) => format!("group:{g}"),
        }
    }
}

/// A group of objects that share a cap on disruptive rungs in flight besides their
/// subscriptions' (a fleet's incident objects, with the fleet's `maxConcurrentDisruptive`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimGroup {
    /// The group (`namespace/fleet`).
    pub id: String,
    /// Disruptive rungs its objects may have in flight at once.
    pub max: usize,
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
    /// The claim group it belongs to besides its subscription (a fleet's incidents).
    pub group: Option<&'a str>,
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
    /// Objects with a disruptive rung in flight, by claim group (a fleet's incidents share
    /// one, with the fleet's own cap).
    pub groups: BTreeMap<String, Vec<String>>,
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
                if let Some(group) = m.group {
                    view.groups
                        .entry(group.to_ascii_lowercase())
                        .or_default()
                        .push(m.key.to_string());
                }
            }
        }
        view
    }

    /// The objects other than `key` with a disruptive rung in flight in `scope`.
    pub fn in_flight<'a>(
        &'a self,
        scope: &Scope,
        key: &'a str,
    ) -> impl Iterator<Item = &'a String> + 'a {
        let keys = match scope {
            Scope::Subscription(s) => self
                .subscriptions
                .get(s.as_str())
                .map(|c| c.disruptive_in_flight.as_slice()),
            Scope::Group(g) => self.groups.get(g.as_str()).map(Vec::as_slice),
        };
        keys.unwrap_or_default().iter().filter(move |k| *k != key)
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

    /// Whether `key` may start a disruptive rung in `scope`, whose cap is `max`, now.
    pub fn slot_free(&self, scope: &Scope, key: &str, max: usize) -> bool {
        self.in_flight(scope, key).count() < max
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
            group: None,
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
                    group: None,
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
        let view = fleet(10, 2, &["ns/vm0"]);
        let sub = Scope::subscription("SUB");
        assert!(
            view.slot_free(&sub, "ns/vm0", 1),
            "its own rung does not count"
        );
        assert!(!view.slot_free(&sub, "ns/vm1", 1));
        assert!(view.slot_free(&Scope::subscription("elsewhere"), "ns/vm1", 1));
        assert!(view.slot_free(&sub, "ns/vm1", 2));
    }

    #[test]
    fn a_group_counts_its_rungs_across_subscriptions() {
        let keys = ["ns/a", "ns/b", "ns/c"];
        let view = FleetView::from_members(keys.iter().enumerate().map(|(i, k)| Member {
            key: k,
            subscription: ["s1", "s2", "s3"][i],
            unreachable: true,
            disruptive_in_flight: i < 2,
            failed_recently: true,
            group: (i != 1).then_some("NS/Fleet"),
        }));
        let group = Scope::group("ns/fleet");
        assert_eq!(view.in_flight(&group, "ns/c").collect::<Vec<_>>(), ["ns/a"]);
        assert!(!view.slot_free(&group, "ns/c", 1));
        assert!(view.slot_free(&group, "ns/c", 2));
        assert!(
            view.slot_free(&group, "ns/a", 1),
            "its own rung does not count"
        );
        // Each subscription holds one rung at most: only the group is full.
        assert!(view.slot_free(&Scope::subscription("s3"), "ns/c", 1));
        assert_ne!(group.name(), Scope::subscription("ns/fleet").name());
    }
}
