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

use std::time::Instant;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
};
use kube::api::{ObjectMeta, PostParams};

use super::*;
use crate::ladder::LeaseTerm as Term;

#[derive(Debug, Clone)]
struct Held {
    term: Term,
    /// Leadership ends here unless renewed (monotonic clock).
    until: Instant,
}

/// Whether this replica holds the Lease, checked at the moment of the question. Every replica
/// probes; only the leader writes status and acts.
#[derive(Debug, Clone)]
pub struct Leadership(Option<watch::Receiver<Option<Held>>>);

impl crate::engine::remediate::LeaderCheck for Leadership {
    fn term(&self) -> Option<Term> {
        self.current()
    }
}

impl Leadership {
    /// Leadership without election (one replica): always the leader.
    pub fn always() -> Self {
        Self(None)
    }

    /// The current term, or `None` when this replica is not (or no longer provably) the
    /// leader.
    pub fn current(&self) -> Option<Term> {
        let Some(rx) = &self.0 else {
            return Some(Term {
                holder: None,
                transitions: 0,
            });
        };
        let held = rx.borrow();
        held.as_ref()
            .filter(|h| Instant::now() < h.until)
            .map(|h| h.term.clone())
    }

    /// True while this replica holds the Lease.
    pub fn is_leader(&self) -> bool {
        self.current().is_some()
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
    fn duration(&self) -> Duration {
        Duration::from_secs(self.duration_seconds.max(2))
    }

    /// How long one successful renewal keeps this replica the leader.
    fn renew_deadline(&self) -> Duration {
        let grace = Duration::from_secs(self.grace_seconds.max(1));
        self.duration()
            .saturating_sub(grace)
            .max(Duration::from_millis(500))
            .min(self.duration() - Duration::from_millis(500))
    }

    /// How often the holder renews and candidates try.
    fn retry(&self) -> Duration {
        (self.renew_deadline() / 4).clamp(Duration::from_millis(100), Duration::from_secs(2))
    }
}

/// What a candidate remembers of the Lease record between rounds.
#[derive(Debug, Default)]
struct Observed {
    /// The record as last seen (holder, renew time, transitions).
    record: Option<(Option<String>, Option<String>, i32)>,
    /// When that record was first seen unchanged (this replica's clock).
    since: Option<Instant>,
}

impl Observed {
    /// Notes `lease`'s record; returns how long it has been seen unchanged.
    fn see(&mut self, spec: &LeaseSpec, now: Instant) -> Duration {
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
enum Round {
    /// This replica holds the Lease (its `leaseTransitions`).
    Holding(i32),
    /// Another replica holds it.
    Standby,
}

/// One election round: create the Lease, renew it, or take it over once expired.
async fn round(
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
async fn give_up(api: &Api<Lease>, settings: &LeaseSettings) -> Result<(), kube::Error> {
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

/// Campaigns for the Lease until `stop` fires, publishing each term.
async fn campaign(
    api: Api<Lease>,
    settings: LeaseSettings,
    tx: watch::Sender<Option<Held>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut observed = Observed::default();
    let mut was_leader = false;
    loop {
        let sent = Instant::now();
        let result = tokio::time::timeout(
            settings.renew_deadline(),
            round(&api, &settings, &mut observed),
        )
        .await;
        match result {
            Ok(Ok(Round::Holding(transitions))) => {
                tx.send_replace(Some(Held {
                    term: Term {
                        holder: Some(settings.identity.clone()),
                        transitions,
                    },
                    until: sent + settings.renew_deadline(),
                }));
            }
            Ok(Ok(Round::Standby)) => {
                tx.send_replace(None);
            }
            // Leadership lapses by itself at its deadline; nothing to undo here.
            Ok(Err(e)) => {
                warn!(error = %e, lease = %settings.name, "failed to renew or acquire the lease")
            }
            Err(_) => warn!(lease = %settings.name, "renewing the lease timed out"),
        }
        let leader = tx
            .borrow()
            .as_ref()
            .is_some_and(|h| Instant::now() < h.until);
        if leader != was_leader {
            info!(identity = %settings.identity, leader, "leadership changed");
            was_leader = leader;
        }
        tokio::select! {
            () = tokio::time::sleep(settings.retry()) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    let held = tx.send_replace(None).is_some();
    if held {
        match tokio::time::timeout(Duration::from_secs(5), give_up(&api, &settings)).await {
            Ok(Ok(())) => info!("lease released"),
            Ok(Err(e)) => warn!(error = %e, "failed to release the lease"),
            Err(_) => warn!("timed out releasing the lease"),
        }
    }
}

/// Starts campaigning for the Lease; leadership follows from the first round on.
pub(super) fn elect(client: &Client, lease: &LeaseSettings) -> (Leadership, LeaseTask) {
    let api: Api<Lease> = Api::namespaced(client.clone(), &lease.namespace);
    let (tx, rx) = watch::channel(None);
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(campaign(api, lease.clone(), tx, stopped));
    (Leadership(Some(rx)), LeaseTask { task, stop })
}

/// The running campaign.
pub(super) struct LeaseTask {
    task: tokio::task::JoinHandle<()>,
    stop: watch::Sender<bool>,
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
        let (tx, rx) = watch::channel(None);
        let leadership = Leadership(Some(rx));
        assert!(!leadership.is_leader());
        let term = Term {
            holder: Some("me".into()),
            transitions: 3,
        };
        tx.send_replace(Some(Held {
            term: term.clone(),
            until: Instant::now() + Duration::from_secs(60),
        }));
        assert_eq!(leadership.current(), Some(term.clone()));
        // The same term, past its deadline (as for a replica stalled since its last renewal).
        tx.send_replace(Some(Held {
            term,
            until: Instant::now(),
        }));
        assert!(!leadership.is_leader());
        assert!(Leadership::always().is_leader());
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
