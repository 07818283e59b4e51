//! Shards across replicas: every object belongs to one of a fixed number of shards, by a
//! stable hash of its UID, and each shard has a `coordination.k8s.io/v1` Lease
//! (`<prefix>-shard-<n>`) acquired and renewed with the rules of leader election
//! ([`super::lease`]). A replica probes, writes status and remediates only the objects of the
//! shards it holds.
//!
//! Each replica also renews a membership Lease of its own (`<prefix>-member-<identity>`), so
//! that a replica holding no shard yet is counted: every replica aims at a fair share,
//! `ceil(shards / live replicas)`, takes free or expired shards up to it, and stops renewing
//! the shards above it (they expire for the others after one Lease duration, exactly as a
//! stopped replica's do). A shard is taken over only under the leader-election rules: its
//! record unchanged for a whole Lease duration on the taker's clock, and a replace guarded by
//! its `resourceVersion`.

use std::{collections::HashMap, time::Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::ListParams;

use super::lease::{Held, LeaseTask, Observed, Terms, attempt, give_up, give_up_all};
use super::*;

/// The number of shards `--shards auto` uses: enough for a fair share between up to 16
/// replicas, few enough that each replica renews a handful of Leases.
pub const AUTO_SHARDS: u32 = 16;

/// The largest number of shards accepted.
pub const MAX_SHARDS: u32 = 256;

/// 64-bit FNV-1a (offset basis 0xcbf29ce484222325, prime 0x100000001b3) of `bytes`: a fixed
/// function, the same in every process and every version (unlike std's randomized hasher).
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// MurmurHash3's 64-bit finalizer (`fmix64`): spreads FNV-1a's weak low bits over the word.
pub fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// The shard of the object with UID `uid`: FNV-1a (64 bit) of the UID's bytes, finalized
/// with MurmurHash3's `fmix64`, modulo the number of shards.
pub fn shard_of(uid: &str, shards: u32) -> u32 {
    u32::try_from(fmix64(fnv1a(uid.as_bytes())) % u64::from(shards.max(1))).unwrap_or(0)
}

/// The name of shard `n`'s Lease.
pub fn shard_lease(prefix: &str, n: u32) -> String {
    format!("{prefix}-shard-{n}")
}

/// The name of `identity`'s membership Lease (the identity made a valid object name).
pub fn member_lease(prefix: &str, identity: &str) -> String {
    let clean: String = identity
        .to_ascii_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let name = format!("{prefix}-member-{clean}");
    name.chars().take(253).collect()
}

/// What one replica knows of a shard at the start of a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ShardView {
    /// This replica holds it now.
    pub mine: bool,
    /// Nobody else holds it: no holder, this replica's name, or a record unchanged for a
    /// whole Lease duration.
    pub free: bool,
}

/// What to do with a shard this round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Move {
    /// Held and kept: renew.
    Renew,
    /// Free and wanted: try to take it.
    Acquire,
    /// Held above the fair share: stop acting and stop renewing (it expires for the others).
    Shed,
    /// Someone else's, or not wanted.
    Leave,
}

/// The fair share: `ceil(shards / live)`.
pub(super) fn fair_share(shards: usize, live: usize) -> usize {
    shards.div_ceil(live.max(1))
}

/// How much `identity` prefers shard `n` (rendezvous hashing): replicas prefer different
/// shards, so that they rarely race for the same one.
fn preference(identity: &str, n: usize) -> u64 {
    fmix64(fnv1a(format!("{identity}/{n}").as_bytes()))
}

/// The moves of one round for `identity`, given every shard's view and the number of live
/// replicas (this one included): keep the preferred held shards up to the fair share, shed
/// the rest, and take free shards up to the fair share.
pub(super) fn plan(identity: &str, shards: &[ShardView], live: usize) -> Vec<Move> {
    let share = fair_share(shards.len(), live);
    let mut moves = vec![Move::Leave; shards.len()];
    let by_preference = |want: &dyn Fn(&ShardView) -> bool| {
        let mut picked: Vec<usize> = (0..shards.len()).filter(|&i| want(&shards[i])).collect();
        picked.sort_by_key(|&i| std::cmp::Reverse(preference(identity, i)));
        picked
    };
    let mine = by_preference(&|s| s.mine);
    for (rank, &i) in mine.iter().enumerate() {
        moves[i] = if rank < share {
            Move::Renew
        } else {
            Move::Shed
        };
    }
    let wanted = share.saturating_sub(mine.len());
    for &i in by_preference(&|s| !s.mine && s.free).iter().take(wanted) {
        moves[i] = Move::Acquire;
    }
    moves
}

/// The Lease settings of sharding.
#[derive(Debug, Clone)]
struct Campaign {
    /// Shard `n`'s Lease settings at index `n`.
    shards: Vec<LeaseSettings>,
    /// This replica's membership Lease.
    member: LeaseSettings,
    /// The prefix of every member Lease's name.
    member_prefix: String,
}

impl Campaign {
    fn new(lease: &LeaseSettings, shards: u32) -> Self {
        Self {
            shards: (0..shards)
                .map(|n| lease.named(shard_lease(&lease.name, n)))
                .collect(),
            member: lease.named(member_lease(&lease.name, &lease.identity)),
            member_prefix: format!("{}-member-", lease.name),
        }
    }

    fn me(&self) -> &str {
        &self.member.identity
    }
}

/// What the campaign remembers between rounds.
#[derive(Default)]
struct Memory {
    shards: Vec<Observed>,
    members: HashMap<String, Observed>,
}

/// The record's own Lease duration, at least ours (a longer one must be waited).
fn record_duration(
    spec: &k8s_openapi::api::coordination::v1::LeaseSpec,
    ours: Duration,
) -> Duration {
    spec.lease_duration_seconds
        .and_then(|s| u64::try_from(s).ok())
        .map_or(ours, Duration::from_secs)
        .max(ours)
}

/// Reads every Lease of the campaign at once: each shard's view and the live replicas.
async fn survey(
    api: &Api<Lease>,
    campaign: &Campaign,
    memory: &mut Memory,
    terms: &Terms,
) -> Result<(Vec<ShardView>, usize), kube::Error> {
    let leases = api.list(&ListParams::default()).await?;
    let now = Instant::now();
    let ours = campaign.member.duration();
    let by_name: HashMap<&str, &Lease> = leases
        .items
        .iter()
        .filter_map(|l| Some((l.metadata.name.as_deref()?, l)))
        .collect();
    let mut live: std::collections::BTreeSet<String> = [campaign.me().to_string()].into();
    let mut views = Vec::with_capacity(campaign.shards.len());
    for (n, settings) in campaign.shards.iter().enumerate() {
        let mine = terms
            .get(n)
            .and_then(Option::as_ref)
            .is_some_and(|h| h.valid(now));
        let spec = by_name
            .get(settings.name.as_str())
            .and_then(|l| l.spec.clone());
        let free = match &spec {
            None => true,
            Some(spec) => {
                let unchanged = memory.shards[n].see(spec, now);
                match spec.holder_identity.as_deref().filter(|h| !h.is_empty()) {
                    None => true,
                    Some(h) if h == campaign.me() => true,
                    Some(h) => {
                        let expired = unchanged >= record_duration(spec, ours);
                        if !expired {
                            live.insert(h.to_string());
                        }
                        expired
                    }
                }
            }
        };
        views.push(ShardView { mine, free });
    }
    for lease in &leases.items {
        let (Some(name), Some(spec)) = (lease.metadata.name.as_deref(), lease.spec.as_ref()) else {
            continue;
        };
        if !name.starts_with(&campaign.member_prefix) {
            continue;
        }
        let unchanged = memory
            .members
            .entry(name.to_string())
            .or_default()
            .see(spec, now);
        if let Some(holder) = spec.holder_identity.as_deref().filter(|h| !h.is_empty())
            && unchanged < record_duration(spec, ours)
        {
            live.insert(holder.to_string());
        }
    }
    Ok((views, live.len()))
}

/// Campaigns for a fair share of the shards until `stop` fires, publishing each shard's term
/// and bumping `acquired` whenever a shard is newly held.
async fn campaign(
    api: Api<Lease>,
    campaign: Campaign,
    tx: watch::Sender<Terms>,
    acquired: watch::Sender<u64>,
    mut stop: watch::Receiver<bool>,
) {
    let mut memory = Memory {
        shards: campaign
            .shards
            .iter()
            .map(|_| Observed::default())
            .collect(),
        ..Memory::default()
    };
    let mut member = Observed::default();
    let mut held_before: Vec<usize> = Vec::new();
    loop {
        // Membership first: a replica that holds no shard yet still counts.
        let _ = attempt(&api, &campaign.member, &mut member).await;
        let terms = tx.borrow().clone();
        let deadline = campaign.member.renew_deadline();
        let surveyed = tokio::time::timeout(deadline, survey(&api, &campaign, &mut memory, &terms))
            .await
            .unwrap_or_else(|_| {
                Err(kube::Error::Service(
                    "listing the shard leases timed out".into(),
                ))
            });
        match surveyed {
            Ok((views, live)) => {
                let moves = plan(campaign.me(), &views, live);
                // Acting stops at once for a shed shard; its Lease expires for the others by
                // itself.
                tx.send_modify(|terms| {
                    for (n, _) in moves.iter().enumerate().filter(|(_, m)| **m == Move::Shed) {
                        terms[n] = None;
                    }
                });
                // The rounds run side by side: a slow one does not delay the others' renewals.
                let rounds = memory
                    .shards
                    .iter_mut()
                    .zip(&campaign.shards)
                    .zip(&moves)
                    .enumerate()
                    .filter(|(_, (_, m))| matches!(m, Move::Renew | Move::Acquire))
                    .map(|(n, ((observed, settings), _))| {
                        let api = &api;
                        async move { (n, attempt(api, settings, observed).await) }
                    });
                let results = futures::future::join_all(rounds).await;
                tx.send_modify(|terms| {
                    for (n, held) in results {
                        if let Some(held) = held {
                            terms[n] = held;
                        }
                    }
                });
            }
            Err(e) => warn!(error = %e, "failed to list the shard leases"),
        }
        let now = Instant::now();
        let held: Vec<usize> = tx
            .borrow()
            .iter()
            .enumerate()
            .filter(|(_, h)| h.as_ref().is_some_and(|h: &Held| h.valid(now)))
            .map(|(n, _)| n)
            .collect();
        if held != held_before {
            info!(identity = %campaign.me(), shards = ?held, "shards held");
            if held.iter().any(|n| !held_before.contains(n)) {
                acquired.send_modify(|g| *g += 1);
            }
            held_before = held;
        }
        tokio::select! {
            () = tokio::time::sleep(campaign.member.retry()) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    give_up_all(&api, &campaign.shards, &tx).await;
    // The others count one replica fewer at once.
    let _ = tokio::time::timeout(Duration::from_secs(5), give_up(&api, &campaign.member)).await;
}

/// How this replica leads: one Lease (leader election), a fair share of the shards' Leases,
/// or always (a single replica). With shards, also the counter of newly held shards.
pub(super) fn leadership_for(
    client: &Client,
    settings: &Settings,
) -> (Leadership, Option<LeaseTask>, Option<watch::Receiver<u64>>) {
    match (&settings.lease, settings.shards) {
        (Some(lease), Some(shards)) => {
            let (leadership, task, acquired) = elect_shards(client, lease, shards);
            (leadership, Some(task), Some(acquired))
        }
        (Some(lease), None) => {
            let (leadership, task) = super::lease::elect(client, lease);
            (leadership, Some(task), None)
        }
        (None, _) => (Leadership::always(), None, None),
    }
}

/// With shards, the claims on disruptive slots every replica sees (in Leases beside the
/// shards').
pub(super) fn shared_claims(
    client: &Client,
    settings: &Settings,
) -> Option<Arc<dyn crate::engine::remediate::SharedClaims>> {
    let lease = settings
        .lease
        .as_ref()
        .filter(|_| settings.shards.is_some())?;
    Some(Arc::new(super::claims::LeaseClaims::new(
        client.clone(),
        &lease.namespace,
        &lease.name,
        &lease.identity,
    )))
}

/// Reconciles every object whenever a shard is newly held, so that a taken-over shard's
/// objects are probed at once rather than at their next requeue.
pub(super) fn reconcile_when_acquired(
    acquired: Option<watch::Receiver<u64>>,
) -> Option<super::runner::Triggers> {
    let acquired = acquired?;
    let trigger = futures::stream::unfold(acquired, |mut rx| async move {
        rx.changed().await.ok()?;
        Some((super::runner::Trigger::All, rx))
    });
    Some(trigger.boxed())
}

/// Starts campaigning for shards: the leadership (scoped per object with
/// [`Leadership::for_object`]), the task, and a counter bumped whenever a shard is newly
/// held (its objects are then reconciled at once).
pub(super) fn elect_shards(
    client: &Client,
    lease: &LeaseSettings,
    shards: u32,
) -> (Leadership, LeaseTask, watch::Receiver<u64>) {
    let shards = shards.clamp(1, MAX_SHARDS);
    let api: Api<Lease> = Api::namespaced(client.clone(), &lease.namespace);
    let (tx, rx) = watch::channel(vec![None; shards as usize]);
    let (acquired, on_acquired) = watch::channel(0);
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(campaign(
        api,
        Campaign::new(lease, shards),
        tx,
        acquired,
        stopped,
    ));
    (
        Leadership::sharded(rx, shards),
        LeaseTask { task, stop },
        on_acquired,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_is_fnv1a_then_fmix64_and_never_changes() {
        // The published FNV-1a 64 test vectors.
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
        // Pinned: a change here moves objects between shards on upgrade.
        let uid = "6f1d2c1e-3b4a-4c5d-9e8f-0a1b2c3d4e5f";
        assert_eq!(fmix64(0), 0);
        assert_eq!(fmix64(1), 0xb456_bcfc_34c2_cb2c);
        assert_eq!(fmix64(fnv1a(uid.as_bytes())), 0xbcae_af9a_404c_9aa1);
        assert_eq!(shard_of(uid, 16), 1);
        assert_eq!(shard_of(uid, 7), 1);
        assert_eq!(shard_of(uid, 1), 0);
        assert_eq!(shard_of(uid, 0), 0, "no shards counts as one");
    }

    #[test]
    fn uids_spread_over_the_shards() {
        let mut counts = [0u32; 16];
        for i in 0..1600 {
            let uid = format!("{i:08x}-0000-4000-8000-{i:012x}");
            counts[shard_of(&uid, 16) as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (50..=150).contains(&c)),
            "{counts:?}"
        );
    }

    #[test]
    fn lease_names() {
        assert_eq!(shard_lease("rdph", 3), "rdph-shard-3");
        assert_eq!(member_lease("rdph", "Pod_A:1"), "rdph-member-pod-a-1");
    }

    const FREE: ShardView = ShardView {
        mine: false,
        free: true,
    };
    const MINE: ShardView = ShardView {
        mine: true,
        free: true,
    };
    const TAKEN: ShardView = ShardView {
        mine: false,
        free: false,
    };

    fn count(moves: &[Move], m: Move) -> usize {
        moves.iter().filter(|x| **x == m).count()
    }

    #[rstest::rstest]
    // (shards, live) -> fair share
    #[case(16, 1, 16)]
    #[case(16, 3, 6)]
    #[case(16, 0, 16)]
    #[case(4, 8, 1)]
    fn the_fair_share_rounds_up(#[case] shards: usize, #[case] live: usize, #[case] share: usize) {
        assert_eq!(fair_share(shards, live), share);
    }

    #[rstest::rstest]
    // A replica alone takes every free shard.
    #[case::alone(vec![FREE; 4], 1, 0, 4, 0)]
    // Three replicas: up to ceil(4/3) = 2, only free ones.
    #[case::share_of_three(vec![FREE, FREE, FREE, TAKEN], 3, 0, 2, 0)]
    // Holding all four when a second replica appears: keep two, shed two.
    #[case::newcomer(vec![MINE; 4], 2, 2, 0, 2)]
    // Below the share with nothing free: wait.
    #[case::nothing_free(vec![MINE, TAKEN, TAKEN, TAKEN], 2, 1, 0, 0)]
    // A dead replica's expired shards are free again: taken up to the share.
    #[case::takeover(vec![MINE, MINE, FREE, FREE], 2, 2, 0, 0)]
    #[case::takeover_alone(vec![MINE, MINE, FREE, FREE], 1, 2, 2, 0)]
    fn plan_keeps_a_fair_share(
        #[case] views: Vec<ShardView>,
        #[case] live: usize,
        #[case] renew: usize,
        #[case] acquire: usize,
        #[case] shed: usize,
    ) {
        let moves = plan("me", &views, live);
        assert_eq!(count(&moves, Move::Renew), renew, "{moves:?}");
        assert_eq!(count(&moves, Move::Acquire), acquire, "{moves:?}");
        assert_eq!(count(&moves, Move::Shed), shed, "{moves:?}");
        for (view, m) in views.iter().zip(&moves) {
            if !view.free && !view.mine {
                assert_eq!(*m, Move::Leave, "a shard held by another is never taken");
            }
        }
    }

    #[test]
    fn replicas_with_the_same_view_prefer_different_shards() {
        let views = vec![FREE; 16];
        let a = plan("op-a", &views, 3);
        let b = plan("op-b", &views, 3);
        let both = a
            .iter()
            .zip(&b)
            .filter(|(x, y)| **x == Move::Acquire && **y == Move::Acquire)
            .count();
        assert!(both < 6, "{a:?} {b:?}");
    }
}
