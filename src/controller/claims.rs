//! Claims on disruptive slots that every replica sees (with shards): one
//! `coordination.k8s.io/v1` Lease per subscription (`<prefix>-claims-<hash>`, the hash being
//! FNV-1a 64 of the lower-case subscription id) whose annotation lists the claimants (object
//! key, claim time, replica). A claim is added, and a claimant removed, only by a replace
//! guarded by the `resourceVersion` just read (compare-and-swap): of two replicas racing for a
//! subscription's last slot, one replace succeeds and the other reads again and finds the slot
//! taken. The rungs in flight that statuses show (the write-ahead intent) count as well.
//!
//! A claim whose object shows no disruptive rung in flight once it is older than the settle
//! age is stale (its rung ended, however it ended) and is dropped by the next claimant, as the
//! in-process claims are.

use std::collections::BTreeMap;

use k8s_openapi::{api::coordination::v1::Lease, jiff::SignedDuration};
use kube::api::{ObjectMeta, PostParams};
use serde::{Deserialize, Serialize};

use super::*;
use crate::engine::remediate::SharedClaims;

/// The annotation holding the claimants.
pub const CLAIMS_ANNOTATION: &str = "rdphealth.io/claims";

/// A claim older than this whose object shows no rung in flight is stale (the intent reaches
/// every replica's cache well before).
pub const STALE_AFTER: Duration = Duration::from_secs(60);

/// Attempts of one compare-and-swap before giving up (and refusing the slot).
const ATTEMPTS: usize = 8;

/// One claimant.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    /// When it was claimed.
    pub at: Timestamp,
    /// The replica that claimed it.
    pub by: String,
}

/// What the annotation holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ledger {
    /// The subscription (the Lease's name holds only its hash).
    pub subscription: String,
    /// Claimants by object key (`namespace/name`).
    pub claims: BTreeMap<String, Claim>,
}

impl Ledger {
    /// Takes a slot for `key` (claimed by `by` at `now`) when, after dropping stale claims,
    /// the other claimants and the rungs in flight of other objects leave one of `max`.
    /// Whether it was taken; the ledger changes only when it was.
    pub fn take(
        &mut self,
        key: &str,
        in_flight: &[String],
        max: usize,
        by: &str,
        now: Timestamp,
    ) -> bool {
        let mut next = self.clone();
        next.claims.retain(|k, c| {
            let stale = SignedDuration::try_from(STALE_AFTER).unwrap_or(SignedDuration::MAX);
            in_flight.contains(k) || now.duration_since(c.at) < stale
        });
        let claimed = next.claims.keys().filter(|k| *k != key).count();
        let unclaimed_in_flight = in_flight
            .iter()
            .filter(|k| *k != key && !next.claims.contains_key(*k))
            .count();
        if claimed + unclaimed_in_flight >= max {
            return false;
        }
        next.claims.insert(
            key.to_string(),
            Claim {
                at: now,
                by: by.to_string(),
            },
        );
        *self = next;
        true
    }
}

/// Shared claims kept in Leases of `namespace`.
#[derive(Clone)]
pub struct LeaseClaims {
    api: Api<Lease>,
    prefix: String,
    identity: String,
}

impl std::fmt::Debug for LeaseClaims {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeaseClaims")
            .field("prefix", &self.prefix)
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

/// The outcome of one compare-and-swap attempt.
enum Swap {
    Done(bool),
    Raced,
}

impl LeaseClaims {
    /// Claims in Leases named `<prefix>-claims-<hash>` in `namespace`, made by `identity`.
    pub fn new(client: Client, namespace: &str, prefix: &str, identity: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            prefix: prefix.to_string(),
            identity: identity.to_string(),
        }
    }

    /// The Lease holding `subscription`'s claims.
    pub fn lease_name(&self, subscription: &str) -> String {
        let hash = super::shards::fnv1a(subscription.to_ascii_lowercase().as_bytes());
        format!("{}-claims-{hash:016x}", self.prefix)
    }

    /// Reads the ledger, applies `change` and writes it back guarded by the resourceVersion
    /// read, retrying when another replica wrote in between. `change` says whether to write
    /// and what to answer.
    async fn swap(
        &self,
        subscription: &str,
        change: impl Fn(&mut Ledger) -> (bool, bool),
    ) -> Result<bool, kube::Error> {
        let name = self.lease_name(subscription);
        for _ in 0..ATTEMPTS {
            match self.swap_once(&name, subscription, &change).await? {
                Swap::Done(answer) => return Ok(answer),
                Swap::Raced => continue,
            }
        }
        warn!(lease = %name, "gave up on the claims after repeated conflicts");
        Ok(false)
    }

    async fn swap_once(
        &self,
        name: &str,
        subscription: &str,
        change: &impl Fn(&mut Ledger) -> (bool, bool),
    ) -> Result<Swap, kube::Error> {
        let existing = self.api.get_opt(name).await?;
        let mut ledger = existing
            .as_ref()
            .and_then(|l| l.metadata.annotations.as_ref()?.get(CLAIMS_ANNOTATION))
            .and_then(|json| serde_json::from_str::<Ledger>(json).ok())
            .unwrap_or_default();
        ledger.subscription = subscription.to_ascii_lowercase();
        let (write, answer) = change(&mut ledger);
        if !write {
            return Ok(Swap::Done(answer));
        }
        let json = serde_json::to_string(&ledger).unwrap_or_default();
        let result = match existing {
            Some(mut lease) => {
                lease
                    .metadata
                    .annotations
                    .get_or_insert_with(BTreeMap::new)
                    .insert(CLAIMS_ANNOTATION.into(), json);
                // Guarded by the resourceVersion just read.
                self.api.replace(name, &PostParams::default(), &lease).await
            }
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(name.to_string()),
                        annotations: Some([(CLAIMS_ANNOTATION.to_string(), json)].into()),
                        ..ObjectMeta::default()
                    },
                    spec: None,
                };
                self.api.create(&PostParams::default(), &lease).await
            }
        };
        match result {
            Ok(_) => Ok(Swap::Done(answer)),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(Swap::Raced),
            Err(e) => Err(e),
        }
    }
}

#[async_trait::async_trait]
impl SharedClaims for LeaseClaims {
    async fn claim(&self, subscription: &str, key: &str, in_flight: &[String], max: usize) -> bool {
        let result = self
            .swap(subscription, |ledger| {
                let taken = ledger.take(key, in_flight, max, &self.identity, Timestamp::now());
                (taken, taken)
            })
            .await;
        // When in doubt, wait: a claim that could not be recorded is no claim.
        result.unwrap_or_else(|e| {
            warn!(error = %e, subscription, key, "failed to record a disruptive claim");
            false
        })
    }

    async fn release(&self, subscription: &str, key: &str) {
        let result = self
            .swap(subscription, |ledger| {
                let had = ledger.claims.remove(key).is_some();
                (had, had)
            })
            .await;
        if let Err(e) = result {
            warn!(error = %e, subscription, key, "failed to release a disruptive claim; it goes once stale");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    fn keys(ledger: &Ledger) -> Vec<&str> {
        ledger.claims.keys().map(String::as_str).collect()
    }

    #[test]
    fn the_last_slot_goes_once() {
        let mut ledger = Ledger::default();
        assert!(ledger.take("ns/a", &[], 1, "op-a", at(0)));
        assert!(!ledger.take("ns/b", &[], 1, "op-b", at(1)));
        assert_eq!(keys(&ledger), ["ns/a"]);
        // The same object claiming again keeps its slot.
        assert!(ledger.take("ns/a", &["ns/a".into()], 1, "op-c", at(2)));
        assert_eq!(ledger.claims["ns/a"].by, "op-c");
    }

    #[test]
    fn rungs_in_flight_count_whether_claimed_or_not() {
        let mut ledger = Ledger::default();
        // Another object's intent is stored (a rung in flight) but never claimed here.
        assert!(!ledger.take("ns/b", &["ns/a".into()], 1, "op-b", at(0)));
        assert!(ledger.take("ns/b", &["ns/a".into()], 2, "op-b", at(0)));
        // Claimed and in flight counts once.
        assert!(!ledger.take("ns/c", &["ns/a".into(), "ns/b".into()], 2, "op-c", at(1)));
        assert!(ledger.take("ns/c", &["ns/b".into()], 2, "op-c", at(1)));
    }

    #[test]
    fn a_stale_claim_without_a_rung_in_flight_is_dropped() {
        let mut ledger = Ledger::default();
        assert!(ledger.take("ns/a", &[], 1, "op-a", at(0)));
        // Fresh: it covers the time before the intent reaches the caches.
        assert!(!ledger.take("ns/b", &[], 1, "op-b", at(59)));
        // Old, but its rung is still in flight: kept.
        assert!(!ledger.take("ns/b", &["ns/a".into()], 1, "op-b", at(600)));
        // Old and no rung in flight: gone.
        assert!(ledger.take("ns/b", &[], 1, "op-b", at(61)));
        assert_eq!(keys(&ledger), ["ns/b"]);
    }

    #[test]
    fn a_refused_claim_changes_nothing() {
        let mut ledger = Ledger::default();
        assert!(ledger.take("ns/a", &[], 1, "op-a", at(0)));
        let before = ledger.clone();
        assert!(!ledger.take("ns/b", &[], 1, "op-b", at(1)));
        assert_eq!(ledger, before);
    }
}
