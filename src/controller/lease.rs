//! Leader election over a `coordination.k8s.io/v1` Lease, with the guarantees the ladder
//! needs: a replica acts only while its leadership is *provably* current, and it stops acting
//! before any other replica can take the Lease over.
//!
//! The rules are client-go's leader election:
//! - The holder renews every `retry` period. Each successful renewal makes this replica the
//!   leader until `renew deadline` after the moment the renewal was *sent* (a monotonic
//!   clock), and the renew deadline is shorter than the Lease duration. A replica that is
//!   stalled (stopped, starved, cut off from the API server) therefore stops being the leader
//!   by itself, before the Lease it holds can expire.
//! - Another replica takes the Lease only after it has seen the same Lease record, unchanged,
//!   for a whole Lease duration measured on its own clock from when it first saw that record.
//!   So the old holder's leadership always ends first.
//! - Every write is a replace guarded by the Lease's `resourceVersion`, so two candidates can
//!   never both win one round.
//!
//! [`Leadership::current`] gives the term (holder, `leaseTransitions`) at the moment of the
//! call; the ladder asks it right before every intent write and every Azure write.
//!
//! With shards ([`super::shards`]) the same rules hold for each shard's Lease, and a
//! [`Leadership`] scoped to one object answers for that object's shard only.

use std::time::Instant;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
};
use kube::api::{ObjectMeta, PostParams};

use super::*;
use crate::ladder::LeaseTerm as Term;

#[derive(Debug, Clone)]
pub(super) struct Held {
    pub(super) term: Term,
    /// Leadership ends here unless renewed (monotonic clock).
    pub(super) until: Instant,
}

impl Held {
    pub(super) fn valid(&self, now: Instant) -> bool {
        now < self.until
    }
}

/// What each Lease this replica campaigns for gives it: one entry per Lease (one without
/// shards, one per shard with them).
pub(super) type Terms = Vec<Option<Held>>;

/// Whether this replica holds the Lease, checked at the moment of the question. Every replica
/// probes; only the leader writes status and acts. With shards, a handle scoped to an object
/// ([`Leadership::for_object`]) answers for the Lease of that object's shard.
#[derive(Debug, Clone)]
pub struct Leadership {
    terms: Option<watch::Receiver<Terms>>,
    /// With shards: how many, and the shard this handle answers for (`None`: no object's).
    sharded: Option<(u32, Option<u32>)>,
}

impl crate::engine::remediate::LeaderCheck for Leadership {
    fn term(&self) -> Option<Term> {
        self.current()
    }
}

impl Leadership {
    /// Leadership without election (one replica): always the leader.
    pub fn always() -> Self {
        Self {
            terms: None,
            sharded: None,
        }
    }

    /// Leadership over one Lease (leader election).
    pub(super) fn elected(terms: watch::Receiver<Terms>) -> Self {
        Self {
            terms: Some(terms),
            sharded: None,
        }
    }

    /// Leadership over `shards` Leases, one per shard.
    pub(super) fn sharded(terms: watch::Receiver<Terms>, shards: u32) -> Self {
        Self {
            terms: Some(terms),
            sharded: Some((shards.max(1), None)),
        }
    }

    /// The number of shards, when objects are sharded.
    pub fn shards(&self) -> Option<u32> {
        self.sharded.map(|(n, _)| n)
    }

    /// The handle that answers for the object with this UID: its shard's Lease with shards,
    /// this replica's leadership without.
    pub fn for_object(&self, uid: &str) -> Self {
        let mut scoped = self.clone();
        if let Some((n, scope)) = &mut scoped.sharded {
            *scope = Some(super::shards::shard_of(uid, *n));
        }
        scoped
    }

    /// The handle for work done once for all replicas rather than per object (the fleets'
    /// discovery): with shards, the holder of shard 0 does it; without, the leader.
    pub fn for_singletons(&self) -> Self {
        let mut scoped = self.clone();
        if let Some((_, scope)) = &mut scoped.sharded {
            *scope = Some(0);
        }
        scoped
    }

    /// The current term, or `None` when this replica is not (or no longer provably) the
    /// leader; with shards, of the scoped object's shard (`None` for an unscoped handle).
    pub fn current(&self) -> Option<Term> {
        let Some(rx) = &self.terms else {
            return Some(Term {
                holder: None,
                transitions: 0,
            });
        };
        let index = match self.sharded {
            None => 0,
            Some((_, Some(shard))) => shard as usize,
            Some((_, None)) => return None,
        };
        let terms = rx.borrow();
        terms
            .get(index)
            .and_then(Option::as_ref)
            .filter(|h| h.valid(Instant::now()))
            .map(|h| h.term.clone())
    }

    /// True while this replica holds the Lease (with shards: the scoped object's shard).
    pub fn is_leader(&self) -> bool {
        self.current().is_some()
    }

    /// True while this replica holds any Lease (the Lease, or at least one shard).
    pub fn holds_any(&self) -> bool {
        let Some(rx) = &self.terms else {
            return true;
        };
        let now = Instant::now();
        rx.borrow().iter().flatten().any(|h| h.valid(now))
    }

    /// The shards this replica holds now (empty without shards).
    pub fn held_shards(&self) -> Vec<u32> {
        let (Some(rx), Some(_)) = (&self.terms, self.sharded) else {
            return Vec::new();
        };
        let now = Instant::now();
        rx.borrow()
            .iter()
            .enumerate()
            .filter(|(_, h)| h.as_ref().is_some_and(|h| h.valid(now)))
            .filter_map(|(i, _)| u32::try_from(i).ok())
            .collect()
    }
}

/// Lease settings for leader election.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseSettings {
    /// Lease name.
    pub name: String,
    /// Lease namespace.
    pub namespace: String,
    /// This replica's identity (pod name).
    pub identity: String,
    /// Seconds a Lease stays valid without renewal (what other replicas wait before taking
    /// it over).
    pub duration_seconds: u64,
    /// Seconds of margin: the holder stops acting `duration - grace` seconds after its last
    /// successful renewal (the renew deadline), so it is no longer the leader when the Lease
    /// can expire.
    pub grace_seconds: u64,
}

impl LeaseSettings {
    /// The same settings for the Lease `name`.
    pub(super) fn named(&self, name: String) -> Self {
        Self {
            name,
            ..self.clone()
        }
    }

    pub(super) fn duration(&self) -> Duration {
        Duration::from_secs(self.duration_seconds.max(2))
    }

    /// How long one successful renewal keeps this replica the leader.
    pub(super) fn renew_deadline(&self) -> Duration {
        let grace = Duration::from_secs(self.grace_seconds.max(1));
        self.duration()
            .saturating_sub(grace)
            .max(Duration::from_millis(500))
            .min(self.duration() - Duration::from_millis(500))
    }

    /// How often the holder renews and candidates try.
    pub(super) fn retry(&self) -> Duration {
        (self.renew_deadline() / 4).clamp(Duration::from_millis(100), Duration::from_secs(2))
    }
}

/// What a candidate remembers of the Lease record between rounds.
#[derive(Debug, Default)]
pub(super) struct Observed {
    /// The record as last seen (holder, renew time, transitions).
    record: Option<(Option<String>, Option<String>, i32)>,
    /// When that record was first seen unchanged (this replica's clock).
    since: Option<Instant>,
}

impl Observed {
    /// Notes `lease`'s record; returns how long it has been seen unchanged.
    pub(super) fn see(&mut self, spec: &LeaseSpec, now: Instant) -> Duration {
        let record = (
            spec.holder_identity.clone(),
            spec.renew_time.as_ref().map(|t| t.0.to_string()),
            spec.lease_transitions.unwrap_or(0),
        );
        if self.record.as_ref() != Some(&record) {
            self.record = Some(record);
            self.since = Some(now);
        }
        self.since.map_or(Duration::ZERO, |s| now.duration_since(s))
    }
}

/// The outcome of one acquire-or-renew round.
#[derive(Debug)]
pub(super) enum Round {
    /// This replica holds the Lease (its `leaseTransitions`).
    Holding(i32),
    /// Another replica holds it.
    Standby,
}

/// One election round: create the Lease, renew it, or take it over once expired.
pub(super) async fn round(
    api: &Api<Lease>,
    settings: &LeaseSettings,
    observed: &mut Observed,
) -> Result<Round, kube::Error> {
    let now = Timestamp::now();
    let me = settings.identity.as_str();
    let duration_secs = i32::try_from(settings.duration().as_secs()).unwrap_or(i32::MAX);
    let Some(mut lease) = api.get_opt(&settings.name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(settings.name.clone()),
                namespace: Some(settings.namespace.clone()),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(me.to_string()),
                lease_duration_seconds: Some(duration_secs),
                acquire_time: Some(MicroTime(now)),
                renew_time: Some(MicroTime(now)),
                lease_transitions: Some(0),
                ..LeaseSpec::default()
            }),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(Round::Holding(0)),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(Round::Standby),
            Err(e) => Err(e),
        };
    };
    let spec = lease.spec.clone().unwrap_or_default();
    let unchanged_for = observed.see(&spec, Instant::now());
    let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
    // The record's own duration counts, as a longer one set by another replica must be waited.
    let record_duration = spec
        .lease_duration_seconds
        .and_then(|s| u64::try_from(s).ok())
        .map_or(settings.duration(), Duration::from_secs)
        .max(settings.duration());
    if holder.as_deref().is_some_and(|h| h != me) && unchanged_for < record_duration {
        return Ok(Round::Standby);
    }
    let mut transitions = spec.lease_transitions.unwrap_or(0);
    let mut next = spec;
    if holder.as_deref() != Some(me) {
        transitions = transitions.saturating_add(1);
        next.acquire_time = Some(MicroTime(now));
    }
    next.holder_identity = Some(me.to_string());
    next.lease_duration_seconds = Some(duration_secs);
    next.renew_time = Some(MicroTime(now));
    next.lease_transitions = Some(transitions);
    lease.spec = Some(next);
    // Guarded by the resourceVersion just read: of two candidates, one wins.
    match api
        .replace(&settings.name, &PostParams::default(), &lease)
        .await
    {
        Ok(_) => Ok(Round::Holding(transitions)),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(Round::Standby),
        Err(e) => Err(e),
    }
}

/// Gives the Lease up (on shutdown) so another replica need not wait for it to expire.
pub(super) async fn give_up(api: &Api<Lease>, settings: &LeaseSettings) -> Result<(), kube::Error> {
    let Some(mut lease) = api.get_opt(&settings.name).await? else {
        return Ok(());
    };
    let Some(spec) = lease.spec.as_mut() else {
        return Ok(());
    };
    if spec.holder_identity.as_deref() != Some(settings.identity.as_str()) {
        return Ok(());
    }
    spec.holder_identity = None;
    spec.lease_duration_seconds = Some(1);
    spec.renew_time = Some(MicroTime(Timestamp::now()));
    api.replace(&settings.name, &PostParams::default(), &lease)
        .await
        .map(|_| ())
}

/// One acquire-or-renew round on `settings`' Lease, bounded by the renew deadline: the term
/// it gives (`Some(None)`: another replica holds it), or `None` when the round failed (a
/// term held before lapses by itself at its deadline; nothing to undo).
pub(super) async fn attempt(
    api: &Api<Lease>,
    settings: &LeaseSettings,
    observed: &mut Observed,
) -> Option<Option<Held>> {
    let sent = Instant::now();
    match tokio::time::timeout(settings.renew_deadline(), round(api, settings, observed)).await {
        Ok(Ok(Round::Holding(transitions))) => Some(Some(Held {
            term: Term {
                holder: Some(settings.identity.clone()),
                transitions,
            },
            until: sent + settings.renew_deadline(),
        })),
        Ok(Ok(Round::Standby)) => Some(None),
        Ok(Err(e)) => {
            warn!(error = %e, lease = %settings.name, "failed to renew or acquire the lease");
            None
        }
        Err(_) => {
            warn!(lease = %settings.name, "renewing the lease timed out");
            None
        }
    }
}

/// Gives up every Lease in `terms` that was held (on shutdown), after publishing that none is.
pub(super) async fn give_up_all(
    api: &Api<Lease>,
    settings: &[LeaseSettings],
    tx: &watch::Sender<Terms>,
) {
    let held = tx.send_replace(vec![None; settings.len()]);
    for (settings, held) in settings.iter().zip(held) {
        if held.is_none() {
            continue;
        }
        match tokio::time::timeout(Duration::from_secs(5), give_up(api, settings)).await {
            Ok(Ok(())) => info!(lease = %settings.name, "lease released"),
            Ok(Err(e)) => warn!(error = %e, lease = %settings.name, "failed to release the lease"),
            Err(_) => warn!(lease = %settings.name, "timed out releasing the lease"),
        }
    }
}

/// Campaigns for the Lease until `stop` fires, publishing each term.
async fn campaign(
    api: Api<Lease>,
    settings: LeaseSettings,
    tx: watch::Sender<Terms>,
    mut stop: watch::Receiver<bool>,
) {
    let mut observed = Observed::default();
    let mut was_leader = false;
    loop {
        if let Some(held) = attempt(&api, &settings, &mut observed).await {
            tx.send_replace(vec![held]);
        }
        let leader = tx
            .borrow()
            .iter()
            .flatten()
            .any(|h| h.valid(Instant::now()));
        if leader != was_leader {
            info!(identity = %settings.identity, leader, "leadership changed");
            was_leader = leader;
        }
        tokio::select! {
            () = tokio::time::sleep(settings.retry()) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    give_up_all(&api, std::slice::from_ref(&settings), &tx).await;
}

/// Starts campaigning for the Lease; leadership follows from the first round on.
pub(super) fn elect(client: &Client, lease: &LeaseSettings) -> (Leadership, LeaseTask) {
    let api: Api<Lease> = Api::namespaced(client.clone(), &lease.namespace);
    let (tx, rx) = watch::channel(vec![None]);
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(campaign(api, lease.clone(), tx, stopped));
    (Leadership::elected(rx), LeaseTask { task, stop })
}

/// The running campaign.
pub(super) struct LeaseTask {
    pub(super) task: tokio::task::JoinHandle<()>,
    pub(super) stop: watch::Sender<bool>,
}

impl LeaseTask {
    /// Stops campaigning and gives the Lease up if held.
    pub(super) async fn release(self) {
        let _ = self.stop.send(true);
        if tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .is_err()
        {
            warn!("timed out stopping the lease campaign");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(duration: u64, grace: u64) -> LeaseSettings {
        LeaseSettings {
            name: "l".into(),
            namespace: "ns".into(),
            identity: "me".into(),
            duration_seconds: duration,
            grace_seconds: grace,
        }
    }

    #[test]
    fn the_renew_deadline_is_always_shorter_than_the_lease() {
        for (d, g) in [(15, 5), (4, 1), (2, 1), (2, 5), (60, 0), (3, 3)] {
            let s = settings(d, g);
            assert!(s.renew_deadline() < s.duration(), "{d}/{g}");
            assert!(s.retry() < s.renew_deadline(), "{d}/{g}");
        }
        assert_eq!(settings(15, 5).renew_deadline(), Duration::from_secs(10));
    }

    #[test]
    fn leadership_lapses_at_its_deadline_without_a_renewal() {
        let (tx, rx) = watch::channel(vec![None]);
        let leadership = Leadership::elected(rx);
        assert!(!leadership.is_leader());
        let term = Term {
            holder: Some("me".into()),
            transitions: 3,
        };
        tx.send_replace(vec![Some(Held {
            term: term.clone(),
            until: Instant::now() + Duration::from_secs(60),
        })]);
        assert_eq!(leadership.current(), Some(term.clone()));
        // The same term, past its deadline (as for a replica stalled since its last renewal).
        tx.send_replace(vec![Some(Held {
            term,
            until: Instant::now(),
        })]);
        assert!(!leadership.is_leader());
        assert!(Leadership::always().is_leader());
    }

    #[test]
    fn a_sharded_handle_answers_only_for_its_objects_shard() {
        let (tx, rx) = watch::channel(vec![None; 4]);
        let leadership = Leadership::sharded(rx, 4);
        let uid = "6f1d2c1e-3b4a-4c5d-9e8f-0a1b2c3d4e5f";
        let shard = super::super::shards::shard_of(uid, 4) as usize;
        let scoped = leadership.for_object(uid);
        assert!(!scoped.is_leader() && !leadership.holds_any());
        let term = |n: i32| Held {
            term: Term {
                holder: Some("me".into()),
                transitions: n,
            },
            until: Instant::now() + Duration::from_secs(60),
        };
        // Another shard held: this object's is not.
        tx.send_modify(|t| t[(shard + 1) % 4] = Some(term(1)));
        assert!(!scoped.is_leader());
        assert!(leadership.holds_any());
        assert_eq!(leadership.current(), None, "an unscoped handle never acts");
        tx.send_modify(|t| t[shard] = Some(term(7)));
        assert_eq!(scoped.current().map(|t| t.transitions), Some(7));
        assert_eq!(leadership.held_shards().len(), 2);
        // Shed: acting stops at once.
        tx.send_modify(|t| t[shard] = None);
        assert!(!scoped.is_leader());
        // Work done once for all replicas goes with shard 0.
        tx.send_modify(|t| t[0] = Some(term(3)));
        assert_eq!(
            leadership.for_singletons().current().map(|t| t.transitions),
            Some(3)
        );
        tx.send_modify(|t| t[0] = None);
        assert!(!leadership.for_singletons().is_leader());
        // Without shards, every object answers with the one Lease.
        let (_tx, rx) = watch::channel(vec![Some(term(2))]);
        let elected = Leadership::elected(rx);
        assert_eq!(elected.for_object(uid).current(), elected.current());
        assert!(elected.is_leader());
    }

    #[test]
    fn a_record_counts_as_unchanged_from_when_it_was_first_seen() {
        let mut observed = Observed::default();
        let t0 = Instant::now();
        let spec = LeaseSpec {
            holder_identity: Some("other".into()),
            lease_transitions: Some(1),
            ..LeaseSpec::default()
        };
        assert_eq!(observed.see(&spec, t0), Duration::ZERO);
        let later = t0 + Duration::from_secs(7);
        assert_eq!(observed.see(&spec, later), Duration::from_secs(7));
        let renewed = LeaseSpec {
            renew_time: Some(MicroTime(Timestamp::now())),
            ..spec
        };
        assert_eq!(observed.see(&renewed, later), Duration::ZERO);
    }
}
