//! The fleet view, kept up to date object by object: every object's share of the counts the
//! storm breaker, the fleet-wide breaker and the disruptive-rung cap read is replaced when the
//! object changes (the reconcile that changed it, a watch event from another replica's write,
//! a deletion), so no reconcile scans the object cache. A full rebuild from the cache happens
//! only when the watch relists and when this replica's leadership changes.

use std::collections::{BTreeMap, BTreeSet};

use super::*;
use crate::ladder::fleet::SubscriptionCounts;

/// One object's share of the fleet counts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Contribution {
    /// Azure subscription, lower case (Azure spells GUIDs in either case).
    subscription: String,
    unreachable: bool,
    disruptive_in_flight: bool,
    /// The remediation mode may act (DryRun or Auto).
    acting: bool,
    /// The reason of a `RemediationSuspended=True` condition.
    suspended: Option<String>,
    /// When it last became unreachable.
    unreachable_since: Option<Timestamp>,
    /// Its claim group (a fleet's incidents), lower case.
    group: Option<String>,
}

/// An object's key in the counts and in the claims: `namespace/name`.
pub(super) fn key_of(meta: &kube::api::ObjectMeta) -> Option<String> {
    Some(format!(
        "{}/{}",
        meta.namespace.as_deref()?,
        meta.name.as_deref()?
    ))
}

impl Contribution {
    /// `obj`'s share with `status` (which may be newer than `obj`'s own); `None` for objects
    /// fleet safety leaves out: suspended ones, and those without a subscription in their
    /// VM's resource ID.
    pub(super) fn of(obj: &RdpHealth, status: Option<&RdpHealthStatus>) -> Option<Self> {
        if obj.spec.suspend {
            return None;
        }
        let subscription = obj
            .spec
            .vm
            .resource_id
            .split('/')
            .skip_while(|p| !p.eq_ignore_ascii_case("subscriptions"))
            .nth(1)?
            .to_ascii_lowercase();
        let conditions = status.map(|s| s.conditions.as_slice()).unwrap_or_default();
        Some(Self {
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
            group: crate::fleet::incident::claim_group(obj).map(|g| g.id.to_ascii_lowercase()),
        })
    }

    /// The share of a cached object (its stored status; none for a malformed object).
    pub(super) fn of_cached(guard: &DeserializeGuard<RdpHealth>) -> Option<Self> {
        let obj = guard.0.as_ref().ok()?;
        Self::of(obj, obj.status.as_ref())
    }

    /// It counts for the fleet-wide breaker when it turned unreachable at this time.
    fn failure_time(&self) -> Option<Timestamp> {
        self.unreachable_since.filter(|_| self.unreachable)
    }
}

/// Counts for one subscription.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Subscription {
    total: usize,
    unreachable: usize,
    disruptive_in_flight: BTreeSet<String>,
}

/// The fleet counts, kept per object.
#[derive(Debug, Default)]
pub(super) struct FleetCounts {
    members: HashMap<String, Contribution>,
    subscriptions: BTreeMap<String, Subscription>,
    /// Objects with a disruptive rung in flight, by claim group.
    groups: BTreeMap<String, BTreeSet<String>>,
    total: usize,
    /// When each unreachable member turned unreachable.
    failures: TimeWindow,
    /// Members per `RemediationSuspended` reason.
    suspended: HashMap<String, usize>,
    /// Members that may act and are unreachable.
    acting_unreachable: usize,
    /// Bumped on every change of the counts.
    version: u64,
    /// Keys whose share went (deleted or suspended objects): their claims must go too.
    removed: Vec<String>,
    /// What was last handed to the remediation stage: (version, failed recently).
    pub(super) published: Option<(u64, usize)>,
}

impl FleetCounts {
    /// Replaces `key`'s share with `share` (`None`: it no longer counts); whether anything changed.
    pub(super) fn set(&mut self, key: &str, share: Option<Contribution>) -> bool {
        if self.members.get(key) == share.as_ref() {
            return false;
        }
        if let Some(old) = self.members.remove(key) {
            self.count(key, &old, false);
        }
        match share {
            Some(share) => {
                self.count(key, &share, true);
                self.members.insert(key.to_string(), share);
            }
            None => self.removed.push(key.to_string()),
        }
        self.version += 1;
        true
    }

    /// Starts again from `objects` (every object's stored share).
    pub(super) fn rebuild(&mut self, objects: impl IntoIterator<Item = (String, Contribution)>) {
        let before = std::mem::take(&mut self.members);
        let removed = std::mem::take(&mut self.removed);
        let published = self.published;
        let version = self.version;
        *self = Self::default();
        for (key, share) in objects {
            self.set(&key, Some(share));
        }
        self.removed = removed;
        self.removed.extend(
            before
                .into_keys()
                .filter(|key| !self.members.contains_key(key)),
        );
        self.version = version + 1;
        self.published = published;
    }

    /// Starts again from every cached object.
    pub(super) fn rebuild_from(&mut self, store: &Store<DeserializeGuard<RdpHealth>>) {
        self.rebuild(
            store
                .state()
                .iter()
                .filter_map(|g| Some((key_of(meta_of(g))?, Contribution::of_cached(g)?))),
        );
    }

    fn count(&mut self, key: &str, share: &Contribution, add: bool) {
        let step = |n: &mut usize, on: bool| {
            if on {
                *n = if add { *n + 1 } else { *n - 1 };
            }
        };
        step(&mut self.total, true);
        step(
            &mut self.acting_unreachable,
            share.acting && share.unreachable,
        );
        let sub = self
            .subscriptions
            .entry(share.subscription.clone())
            .or_default();
        step(&mut sub.total, true);
        step(&mut sub.unreachable, share.unreachable);
        if share.disruptive_in_flight {
            if add {
                sub.disruptive_in_flight.insert(key.to_string());
            } else {
                sub.disruptive_in_flight.remove(key);
            }
            if let Some(group) = &share.group {
                let keys = self.groups.entry(group.clone()).or_default();
                if add {
                    keys.insert(key.to_string());
                } else {
                    keys.remove(key);
                }
                if keys.is_empty() {
                    self.groups.remove(group);
                }
            }
        }
        if sub.total == 0 {
            self.subscriptions.remove(&share.subscription);
        }
        if let Some(reason) = &share.suspended {
            let n = self.suspended.entry(reason.clone()).or_default();
            step(n, true);
            if *n == 0 {
                self.suspended.remove(reason);
            }
        }
        if let Some(at) = share.failure_time() {
            if add {
                self.failures.insert(at);
            } else {
                self.failures.remove(at);
            }
        }
    }

    /// Follows the watch (after the cache took the event in): an object another replica
    /// changed counts with its stored status, a deleted one no longer counts, and a relist
    /// starts again from the cache (deletions may have happened while the watch was down).
    pub(super) fn follow(
        &mut self,
        event: &watcher::Event<DeserializeGuard<RdpHealth>>,
        store: &Store<DeserializeGuard<RdpHealth>>,
    ) {
        match event {
            watcher::Event::Apply(guard) | watcher::Event::InitApply(guard) => {
                if let Some(key) = key_of(meta_of(guard)) {
                    self.set(&key, Contribution::of_cached(guard));
                }
            }
            watcher::Event::Delete(guard) => {
                if let Some(key) = key_of(meta_of(guard)) {
                    self.set(&key, None);
                }
            }
            watcher::Event::InitDone => self.rebuild_from(store),
            watcher::Event::Init => {}
        }
    }

    /// Takes the keys whose share went since the last call.
    pub(super) fn take_removed(&mut self) -> Vec<String> {
        std::mem::take(&mut self.removed)
    }

    /// A change counter: equal values, equal counts.
    pub(super) fn version(&self) -> u64 {
        self.version
    }

    /// Members that turned unreachable within `window` before `now` (none without a window).
    pub(super) fn failed_recently(&mut self, window: Option<Duration>, now: Timestamp) -> usize {
        window.map_or(0, |w| self.failures.within(w, now))
    }

    /// The view fleet safety decides on, at `now`.
    pub(super) fn view(&mut self, window: Option<Duration>, now: Timestamp) -> FleetView {
        FleetView {
            subscriptions: self
                .subscriptions
                .iter()
                .map(|(name, c)| {
                    let counts = SubscriptionCounts {
                        total: c.total,
                        unreachable: c.unreachable,
                        disruptive_in_flight: c.disruptive_in_flight.iter().cloned().collect(),
                    };
                    (name.clone(), counts)
                })
                .collect(),
            total: self.total,
            failed_recently: self.failed_recently(window, now),
            groups: self
                .groups
                .iter()
                .map(|(group, keys)| (group.clone(), keys.iter().cloned().collect()))
                .collect(),
        }
    }

    /// Members whose remediation is suspended for `reason`.
    pub(super) fn suspended(&self, reason: &str) -> usize {
        self.suspended.get(reason).copied().unwrap_or(0)
    }

    /// Members that may act and are unreachable.
    pub(super) fn acting_unreachable(&self) -> usize {
        self.acting_unreachable
    }

    /// Members of the subscriptions in `storming`.
    pub(super) fn members_of(&self, storming: &[String]) -> usize {
        storming
            .iter()
            .filter_map(|s| self.subscriptions.get(s))
            .map(|c| c.total)
            .sum()
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.members.len()
    }
}

/// A multiset of times that counts how many fall in a window ending now, in amortized
/// logarithmic time while the clock moves forward: two cursors remember how many times lie
/// below the window's two ends and move with them.
#[derive(Debug, Default)]
struct TimeWindow {
    times: BTreeMap<Timestamp, usize>,
    /// Times before the window's start.
    before_start: Cursor,
    /// Times at or before its end (`now`).
    until_end: Cursor,
}

/// How many times lie below a point.
#[derive(Debug, Default)]
struct Cursor {
    /// The point, and whether a time equal to it counts.
    at: Option<(Timestamp, bool)>,
    below: usize,
}

impl Cursor {
    fn counts(&self, time: Timestamp) -> bool {
        self.at
            .is_some_and(|(at, inclusive)| time < at || (inclusive && time == at))
    }

    fn move_to(&mut self, times: &BTreeMap<Timestamp, usize>, at: Timestamp, inclusive: bool) {
        use std::ops::Bound::{Excluded, Included, Unbounded};
        let bound = |t, incl| if incl { Included(t) } else { Excluded(t) };
        let sum = |range: (std::ops::Bound<Timestamp>, std::ops::Bound<Timestamp>)| {
            times.range(range).map(|(_, n)| n).sum::<usize>()
        };
        match self.at {
            None => self.below = sum((Unbounded, bound(at, inclusive))),
            Some((old, old_incl)) if (old, old_incl) < (at, inclusive) => {
                self.below += sum((bound(old, !old_incl), bound(at, inclusive)));
            }
            Some((old, old_incl)) if (old, old_incl) > (at, inclusive) => {
                self.below -= sum((bound(at, !inclusive), bound(old, old_incl)));
            }
            Some(_) => {}
        }
        self.at = Some((at, inclusive));
    }
}

impl TimeWindow {
    fn insert(&mut self, time: Timestamp) {
        *self.times.entry(time).or_default() += 1;
        for cursor in [&mut self.before_start, &mut self.until_end] {
            if cursor.counts(time) {
                cursor.below += 1;
            }
        }
    }

    fn remove(&mut self, time: Timestamp) {
        if let Some(n) = self.times.get_mut(&time) {
            *n -= 1;
            if *n == 0 {
                self.times.remove(&time);
            }
            for cursor in [&mut self.before_start, &mut self.until_end] {
                if cursor.counts(time) {
                    cursor.below -= 1;
                }
            }
        }
    }

    /// Times `t` with `now - window <= t <= now`.
    fn within(&mut self, window: Duration, now: Timestamp) -> usize {
        let start = now.checked_sub(window).unwrap_or(Timestamp::MIN);
        self.before_start.move_to(&self.times, start, false);
        self.until_end.move_to(&self.times, now, true);
        self.until_end.below.saturating_sub(self.before_start.below)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ladder::fleet::Member;

    fn share(sub: &str, unreachable: bool, in_flight: bool, since: Option<i64>) -> Contribution {
        Contribution {
            subscription: sub.to_string(),
            unreachable,
            disruptive_in_flight: in_flight,
            acting: true,
            suspended: None,
            unreachable_since: since.map(|s| Timestamp::from_second(s).unwrap()),
            group: None,
        }
    }

    /// The counts as a full scan of every share computes them (the reference).
    fn scanned(
        members: &BTreeMap<String, Contribution>,
        window: Duration,
        now: Timestamp,
    ) -> FleetView {
        FleetView::from_members(members.iter().map(|(key, m)| Member {
            key,
            subscription: &m.subscription,
            unreachable: m.unreachable,
            disruptive_in_flight: m.disruptive_in_flight,
            failed_recently: m.unreachable_since.is_some_and(|since| {
                Duration::try_from(now.duration_since(since)).is_ok_and(|d| d <= window)
            }),
            group: m.group.as_deref(),
        }))
    }

    #[test]
    fn a_share_is_added_replaced_and_removed() {
        let mut counts = FleetCounts::default();
        let window = Some(Duration::from_secs(600));
        let now = Timestamp::from_second(1000).unwrap();
        assert!(counts.set("ns/a", Some(share("s1", false, false, None))));
        assert!(counts.set("ns/b", Some(share("s1", true, true, Some(900)))));
        assert!(!counts.set("ns/b", Some(share("s1", true, true, Some(900)))));
        let view = counts.view(window, now);
        assert_eq!((view.total, view.failed_recently), (2, 1));
        let s1 = &view.subscriptions["s1"];
        assert_eq!((s1.total, s1.unreachable), (2, 1));
        assert_eq!(s1.disruptive_in_flight, vec!["ns/b".to_string()]);
        assert_eq!(counts.acting_unreachable(), 1);

        // Replaced: b recovered and moved to another subscription.
        assert!(counts.set("ns/b", Some(share("s2", false, false, Some(900)))));
        let view = counts.view(window, now);
        assert_eq!((view.total, view.failed_recently), (2, 0));
        assert_eq!(view.subscriptions["s1"].unreachable, 0);
        assert!(view.subscriptions["s1"].disruptive_in_flight.is_empty());
        assert_eq!(view.subscriptions["s2"].total, 1);
        assert_eq!(counts.acting_unreachable(), 0);

        // Removed: its subscription goes with it, and its claims must be dropped.
        assert!(counts.set("ns/b", None));
        assert!(!counts.set("ns/b", None));
        let view = counts.view(window, now);
        assert_eq!(view.total, 1);
        assert!(!view.subscriptions.contains_key("s2"));
        assert_eq!(counts.take_removed(), vec!["ns/b".to_string()]);
        assert!(counts.take_removed().is_empty());
    }

    #[test]
    fn recent_failures_leave_the_window_as_time_passes() {
        let mut counts = FleetCounts::default();
        let window = Some(Duration::from_secs(600));
        let at = |s| Timestamp::from_second(s).unwrap();
        counts.set("ns/a", Some(share("s", true, false, Some(100))));
        counts.set("ns/b", Some(share("s", true, false, Some(500))));
        assert_eq!(counts.failed_recently(window, at(600)), 2);
        assert_eq!(
            counts.failed_recently(window, at(700)),
            2,
            "the start is inclusive"
        );
        assert_eq!(counts.failed_recently(window, at(701)), 1);
        assert_eq!(counts.failed_recently(window, at(1101)), 0);
        // A turn in the future (another replica's clock) does not count yet.
        counts.set("ns/c", Some(share("s", true, false, Some(2000))));
        assert_eq!(counts.failed_recently(window, at(1101)), 0);
        assert_eq!(
            counts.failed_recently(window, at(2000)),
            1,
            "the end is inclusive"
        );
        // The clock going back is followed too.
        assert_eq!(counts.failed_recently(window, at(600)), 2);
        assert_eq!(
            counts.failed_recently(None, at(600)),
            0,
            "no window, no breaker"
        );
    }

    #[test]
    fn suspensions_are_counted_by_reason() {
        let mut counts = FleetCounts::default();
        let mut paused = share("s", true, false, None);
        paused.suspended = Some("Paused".into());
        counts.set("ns/a", Some(paused.clone()));
        counts.set("ns/b", Some(paused));
        assert_eq!(counts.suspended("Paused"), 2);
        counts.set("ns/a", Some(share("s", true, false, None)));
        assert_eq!(counts.suspended("Paused"), 1);
        counts.set("ns/b", None);
        assert_eq!(counts.suspended("Paused"), 0);
        assert_eq!(counts.members_of(&["s".to_string()]), 1);
    }

    /// A cached object in subscription `SUB` (spelt in upper case), reachable or not.
    fn cached(name: &str, unreachable: bool, suspend: bool) -> DeserializeGuard<RdpHealth> {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
        let mut obj: RdpHealth = serde_json::from_value(json!({
            "apiVersion": "rdphealth.io/v1alpha1", "kind": "RdpHealth",
            "metadata": {"name": name, "namespace": "ns", "uid": format!("uid-{name}")},
            "spec": {
                "vm": {"resourceId": format!("/subscriptions/{SUB}/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/{name}")},
                "suspend": suspend,
            },
        }))
        .unwrap();
        let mut status = RdpHealthStatus::default();
        status.conditions.push(Condition {
            type_: types::REACHABLE.into(),
            status: if unreachable { "False" } else { "True" }.into(),
            reason: "Probed".into(),
            message: String::new(),
            observed_generation: None,
            last_transition_time: Time(Timestamp::UNIX_EPOCH),
        });
        obj.status = Some(status);
        DeserializeGuard(Ok(obj))
    }

    const SUB: &str = "ABCDEF00-0000-0000-0000-000000000001";

    /// (members, unreachable) of `SUB` as the view shows it.
    fn sub_counts(counts: &mut FleetCounts) -> (usize, usize) {
        let view = counts.view(None, Timestamp::UNIX_EPOCH);
        view.subscriptions
            .get(&SUB.to_ascii_lowercase())
            .map_or((0, 0), |c| (c.total, c.unreachable))
    }

    #[test]
    fn the_watch_updates_counts_with_what_other_replicas_wrote() {
        let mut writer: Writer<DeserializeGuard<RdpHealth>> = Writer::default();
        let store = writer.as_reader();
        let mut counts = FleetCounts::default();
        let mut see = |counts: &mut FleetCounts, event: watcher::Event<_>| {
            writer.apply_watcher_event(&event);
            counts.follow(&event, &store);
        };
        see(
            &mut counts,
            watcher::Event::Apply(cached("a", false, false)),
        );
        see(&mut counts, watcher::Event::Apply(cached("b", true, false)));
        assert_eq!(sub_counts(&mut counts), (2, 1));
        // Another replica wrote that b is reachable again.
        see(
            &mut counts,
            watcher::Event::Apply(cached("b", false, false)),
        );
        assert_eq!(sub_counts(&mut counts), (2, 0));
        // Suspended, a no longer counts; deleted, neither does b.
        see(&mut counts, watcher::Event::Apply(cached("a", true, true)));
        see(
            &mut counts,
            watcher::Event::Delete(cached("b", false, false)),
        );
        assert_eq!(sub_counts(&mut counts), (0, 0));
        assert_eq!(counts.take_removed(), ["ns/a", "ns/b"]);
        // A reconcile counted c, which was deleted while the watch was down: the relist,
        // which holds only d, starts again from the cache.
        counts.set(
            "ns/c",
            Some(share(&SUB.to_ascii_lowercase(), true, true, None)),
        );
        assert_eq!(sub_counts(&mut counts), (1, 1));
        for event in [
            watcher::Event::Init,
            watcher::Event::InitApply(cached("d", true, false)),
            watcher::Event::InitDone,
        ] {
            see(&mut counts, event);
        }
        assert_eq!(sub_counts(&mut counts), (1, 1));
        assert_eq!(counts.len(), 1);
        assert_eq!(counts.take_removed(), ["ns/c"]);
    }

    /// SplitMix64: a small seeded generator, so a failing sequence can be replayed.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    #[test]
    fn incremental_counts_equal_a_full_rescan_after_random_changes() {
        let reasons = ["Paused", "StormBreaker", "FleetBreaker"];
        for seed in 0..40 {
            let mut rng = Rng(seed);
            let mut counts = FleetCounts::default();
            let mut reference: BTreeMap<String, Contribution> = BTreeMap::new();
            let window = Duration::from_secs(rng.below(300) + 1);
            let mut now = 10_000;
            for step in 0..400 {
                let key = format!("ns/vm{}", rng.below(25));
                match rng.below(10) {
                    // Deletion or suspension.
                    0 => {
                        counts.set(&key, None);
                        reference.remove(&key);
                    }
                    // The watch relists: a full rebuild from what is stored.
                    1 if rng.below(4) == 0 => {
                        counts.rebuild(reference.clone());
                        counts.take_removed();
                    }
                    _ => {
                        let unreachable = rng.below(2) == 0;
                        let mut m = share(
                            &format!("sub{}", rng.below(3)),
                            unreachable,
                            rng.below(4) == 0,
                            (rng.below(3) > 0).then(|| now - rng.below(400) as i64 + 50),
                        );
                        m.acting = rng.below(2) == 0;
                        m.group = (rng.below(2) == 0).then(|| format!("ns/fleet{}", rng.below(2)));
                        m.suspended =
                            (rng.below(3) == 0).then(|| reasons[rng.below(3) as usize].to_string());
                        counts.set(&key, Some(m.clone()));
                        reference.insert(key, m);
                    }
                }
                // Time mostly moves forward, sometimes back a little (clock adjustments).
                now += rng.below(40) as i64 - 5;
                let at = Timestamp::from_second(now).unwrap();
                assert_eq!(
                    counts.view(Some(window), at),
                    scanned(&reference, window, at),
                    "seed {seed}, step {step}"
                );
                assert_eq!(counts.len(), reference.len());
                for reason in reasons {
                    let n = reference
                        .values()
                        .filter(|m| m.suspended.as_deref() == Some(reason))
                        .count();
                    assert_eq!(counts.suspended(reason), n, "seed {seed}, step {step}");
                }
                let acting = reference
                    .values()
                    .filter(|m| m.acting && m.unreachable)
                    .count();
                assert_eq!(counts.acting_unreachable(), acting);
            }
        }
    }
}
