//! Shards across replicas on the real API server (the local control plane), with the
//! simulator as Azure:
//!
//! - the claims on disruptive slots: replicas racing by compare-and-swap on the real API
//!   server for a subscription's last slot, and exactly one wins every race;
//! - three `rdphealth run --shards` processes share 30 objects: each holds some shards, every
//!   object's status is written only by its shard's holder, and after one is killed (SIGKILL)
//!   its objects are probed by another within the Lease duration plus a margin;
//! - remediation across shards: several VMs of one subscription need a Restart with a cap of
//!   one disruptive rung: the simulator receives exactly one restart per VM, and no two
//!   restarts ever overlap; the same with the VMs in four subscriptions as one fleet's
//!   incidents, held by the fleet's cap of one.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    time::{Duration, Instant},
};

use common::{
    k8s::ControlPlane,
    operator::{self, Operator, control_plane, namespace, rdph_api},
};
use k8s_openapi::api::coordination::v1::Lease;
use kube::{
    Api,
    api::{DynamicObject, ListParams, PostParams},
};
use rdphealth::{
    api::{FLEET_LABEL, MAX_DISRUPTIVE_ANNOTATION},
    controller::{LeaseClaims, shard_of},
    engine::remediate::SharedClaims,
    sim::{Scenario, Simulator},
};
use serde_json::{Value, json};

const SUB: &str = "00000000-0000-0000-0000-0000000000bb";
const WAIT: Duration = Duration::from_secs(60);
const SHARDS: u32 = 6;
const LEASE_SECONDS: u64 = 2;

const TIMING: &str = "operation: 300ms, restart: 2s, retryAfter: 200ms";

fn scenario(vms: &[String]) -> Scenario {
    operator::scenario(SUB, TIMING, &vms.join("\n          - "))
}

fn rdphealth(name: &str, rdp: SocketAddr, remediation: Value) -> DynamicObject {
    operator::rdphealth(SUB, name, name, rdp, remediation)
}

/// Three replicas sharding the objects of `ns` (6 shards, 2 s Leases), with `extra` flags.
fn replicas(
    cp: &ControlPlane,
    sim: &Simulator,
    ns: &str,
    names: &[&str],
    extra: &[&str],
) -> Vec<Operator> {
    let lease_seconds = LEASE_SECONDS.to_string();
    let shards = SHARDS.to_string();
    let args = [
        "--namespace",
        ns,
        "--shards",
        &shards,
        "--lease-namespace",
        ns,
        "--lease-name",
        "rdph",
        "--lease-duration-seconds",
        &lease_seconds,
        "--max-concurrent-disruptive",
        "1",
    ];
    let args: Vec<&str> = args.iter().chain(extra).copied().collect();
    names
        .iter()
        .map(|n| Operator::start(cp, &cp.kubeconfig, sim, n, &args, &[]))
        .collect()
}

/// Each shard's holder, by shard.
async fn holders(leases: &Api<Lease>) -> BTreeMap<u32, String> {
    let mut out = BTreeMap::new();
    for n in 0..SHARDS {
        if let Some(h) = leases
            .get_opt(&format!("rdph-shard-{n}"))
            .await
            .unwrap()
            .and_then(|l| l.spec)
            .and_then(|s| s.holder_identity)
            .filter(|h| !h.is_empty())
        {
            out.insert(n, h);
        }
    }
    out
}

/// Waits until every shard is held and each replica in `expected` holds its fair share.
async fn balanced(
    leases: &Api<Lease>,
    expected: &[&str],
    ops: &mut [Operator],
) -> BTreeMap<u32, String> {
    let share = (SHARDS as usize).div_ceil(expected.len());
    let deadline = Instant::now() + WAIT;
    loop {
        let h = holders(leases).await;
        let per: BTreeMap<&str, usize> = expected
            .iter()
            .map(|e| (*e, h.values().filter(|v| v == e).count()))
            .collect();
        if h.len() == SHARDS as usize && per.values().all(|&c| c >= 1 && c <= share) {
            return h;
        }
        if Instant::now() > deadline {
            let logs: Vec<String> = ops.iter().map(Operator::log_text).collect();
            panic!("shards never balanced: {h:?}\n{}", logs.join("\n---\n"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every object's (uid, status).
async fn statuses(api: &Api<DynamicObject>) -> BTreeMap<String, (String, Value)> {
    api.list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .map(|o| {
            (
                o.metadata.name.clone().unwrap(),
                (o.metadata.uid.clone().unwrap(), o.data["status"].clone()),
            )
        })
        .collect()
}

/// Replicas race by compare-and-swap on one subscription's claims for its only slot; in every
/// race exactly one wins, and a released slot goes to exactly one of the next racers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_claims_never_both_take_the_last_slot() {
    let cp = control_plane();
    let admin = cp.client().await;
    namespace(&admin, "shard-claims").await;
    let ledgers: Vec<LeaseClaims> = (0..4)
        .map(|i| LeaseClaims::new(admin.clone(), "shard-claims", "rdph", &format!("op-{i}")))
        .collect();
    for round in 0..10 {
        let sub = format!("sub-{round}");
        let races = ledgers.iter().enumerate().map(|(i, l)| {
            let sub = sub.clone();
            async move { l.claim(&sub, &format!("ns/vm-{i}"), &[], 1).await }
        });
        let won: Vec<bool> = futures::future::join_all(races).await;
        assert_eq!(
            won.iter().filter(|w| **w).count(),
            1,
            "round {round}: {won:?}"
        );
        let winner = won.iter().position(|w| *w).unwrap();
        // Taken: nobody else gets it, even with its rung not yet in any status.
        for (i, l) in ledgers.iter().enumerate().filter(|(i, _)| *i != winner) {
            assert!(!l.claim(&sub, &format!("ns/vm-{i}"), &[], 1).await);
        }
        // Released by whichever replica ends the rung: exactly one of the others wins next.
        ledgers[(winner + 1) % 4]
            .release(&sub, &format!("ns/vm-{winner}"))
            .await;
        let races = ledgers
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != winner)
            .map(|(i, l)| {
                let sub = sub.clone();
                async move { l.claim(&sub, &format!("ns/vm-{i}"), &[], 1).await }
            });
        let won: Vec<bool> = futures::future::join_all(races).await;
        assert_eq!(
            won.iter().filter(|w| **w).count(),
            1,
            "round {round} after release: {won:?}"
        );
    }
    // A rung in flight in a status counts although nobody claimed it.
    assert!(!ledgers[0].claim("sub-x", "ns/a", &["ns/b".into()], 1).await);
    assert!(ledgers[0].claim("sub-x", "ns/a", &["ns/b".into()], 2).await);
}

/// Three replicas share 30 objects by shard; a killed one's objects are taken over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_replicas_share_the_objects_and_take_over_a_killed_ones() {
    let cp = control_plane();
    let admin = cp.client().await;
    let ns = "shards";
    namespace(&admin, ns).await;
    let names: Vec<String> = (0..30).map(|i| format!("vm-{i:02}")).collect();
    let vms: Vec<String> = names
        .iter()
        .map(|n| format!("{{ name: {n}, nic: {{ subnet: vnet/s }} }}"))
        .collect();
    let sim = Simulator::start(scenario(&vms)).await.unwrap();
    let api = rdph_api(&admin, ns);
    let leases: Api<Lease> = Api::namespaced(admin.clone(), ns);
    let ids = ["op-a", "op-b", "op-c"];
    let mut ops = replicas(cp, &sim, ns, &ids, &[]);
    for op in &mut ops {
        op.wait_ready().await;
    }
    for n in &names {
        let rdp = sim.vm(n).unwrap().rdp;
        api.create(
            &PostParams::default(),
            &rdphealth(n, rdp, json!({"mode": "Observe"})),
        )
        .await
        .unwrap();
    }
    let holder_of = balanced(&leases, &ids, &mut ops).await;

    // Every object's status names its shard's holder, and stays so while the shards stay.
    let deadline = Instant::now() + WAIT;
    let settled = loop {
        let h = holders(&leases).await;
        let s = statuses(&api).await;
        let right = s.values().all(|(uid, st)| {
            st["observedBy"].as_str() == h.get(&shard_of(uid, SHARDS)).map(String::as_str)
                && st["phase"] == "Healthy"
        });
        if right && h == holder_of {
            break s;
        }
        if Instant::now() > deadline {
            let wrong: Vec<String> = s
                .iter()
                .map(|(n, (uid, st))| {
                    format!(
                        "{n} shard {} by {} phase {}",
                        shard_of(uid, SHARDS),
                        st["observedBy"],
                        st["phase"]
                    )
                })
                .collect();
            let logs: Vec<String> = ops.iter().map(Operator::log_text).collect();
            panic!(
                "statuses never followed the shards: {h:?} (at first {holder_of:?}) {wrong:#?}\n{}",
                logs.join("\n---\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let per_replica: BTreeMap<&str, usize> = ids
        .iter()
        .map(|id| {
            (
                *id,
                settled
                    .values()
                    .filter(|(_, s)| s["observedBy"] == *id)
                    .count(),
            )
        })
        .collect();
    println!("sharded run: 30 objects, {SHARDS} shards, objects per replica {per_replica:?}");
    assert!(per_replica.values().all(|&n| n > 0), "{per_replica:?}");
    // Watched for a while: each object's status is written by one replica only.
    let mut writers: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for _ in 0..15 {
        for (name, (_, st)) in statuses(&api).await {
            writers
                .entry(name)
                .or_default()
                .insert(st["observedBy"].as_str().unwrap().into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        holders(&leases).await,
        holder_of,
        "no shard moved meanwhile"
    );
    assert!(writers.values().all(|w| w.len() == 1), "{writers:?}");

    // SIGKILL op-c: its objects are probed by a survivor within the Lease duration + margin.
    let victim_objects: Vec<String> = settled
        .iter()
        .filter(|(_, (_, s))| s["observedBy"] == "op-c")
        .map(|(n, _)| n.clone())
        .collect();
    ops[2].process.signal("KILL");
    let killed = Instant::now();
    let killed_at = k8s_openapi::jiff::Timestamp::now();
    let deadline = killed + WAIT;
    let took = loop {
        let s = statuses(&api).await;
        let done = victim_objects.iter().all(|n| {
            let st = &s[n].1;
            let probed = st["lastProbe"]["time"]
                .as_str()
                .and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok());
            matches!(st["observedBy"].as_str(), Some("op-a" | "op-b"))
                && probed.is_some_and(|t| t > killed_at)
        });
        if done {
            break killed.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "op-c's objects were never taken over: {s:#?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!(
        "sharded run: op-c killed with {} objects; all probed by the others {:.1} s later (lease {LEASE_SECONDS} s)",
        victim_objects.len(),
        took.as_secs_f64()
    );
    // One Lease duration for the record to expire, a renewal period, a probe: well within.
    assert!(
        took < Duration::from_secs(LEASE_SECONDS * 4 + 4),
        "takeover took {took:?}"
    );
    let after = balanced(&leases, &ids[..2], &mut ops[..2]).await;
    assert!(after.values().all(|h| h != "op-c"), "{after:?}");
    drop(ops);
    sim.shutdown().await;
}

/// Several VMs of one subscription need a Restart, the cap is one disruptive rung: across
/// three replicas each VM is restarted exactly once and no two restarts overlap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_disruptive_cap_holds_across_replicas() {
    restarts_one_at_a_time("shards-cap", &[SUB], None).await;
}

/// Four VMs, each in a subscription of its own, are one fleet's incidents with the fleet's cap
/// of one disruptive rung: the operator's cap of one per subscription would let all four
/// restart at once; the fleet's cap, claimed across the three replicas, lets one at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleets_cap_holds_across_subscriptions_and_replicas() {
    let subs: Vec<String> = (0..4)
        .map(|i| format!("00000000-0000-0000-0000-0000000001c{i}"))
        .collect();
    let subs: Vec<&str> = subs.iter().map(String::as_str).collect();
    restarts_one_at_a_time("shards-fleet-cap", &subs, Some("1")).await;
}

/// A simulated world of `subs`, each with the resource group of [`operator::scenario`], the
/// VMs spread over them in turn: (scenario, each VM's subscription).
fn scenario_in(subs: &[&str], vms: &[String]) -> (Scenario, Vec<String>) {
    let per_sub: Vec<String> = (0..subs.len())
        .map(|i| {
            let mine: Vec<&str> = vms
                .iter()
                .skip(i)
                .step_by(subs.len())
                .map(String::as_str)
                .collect();
            mine.join("\n          - ")
        })
        .collect();
    let blocks: Vec<(&str, &str)> = subs
        .iter()
        .zip(&per_sub)
        .map(|(s, v)| (*s, v.as_str()))
        .collect();
    // VM i went to subscription i % n.
    let sub_of = (0..vms.len())
        .map(|i| subs[i % subs.len()].to_string())
        .collect();
    (operator::scenario_in(TIMING, &blocks), sub_of)
}

/// Four hung VMs (in `subs`, in turn) need a Restart, with `--max-concurrent-disruptive 1` and,
/// with `fleet_cap`, labelled as one fleet's incidents carrying that cap: across three replicas
/// each VM is restarted exactly once and no two restarts overlap.
async fn restarts_one_at_a_time(ns: &str, subs: &[&str], fleet_cap: Option<&str>) {
    let cp = control_plane();
    let admin = cp.client().await;
    namespace(&admin, ns).await;
    let names: Vec<String> = (0..4).map(|i| format!("hung-{i}")).collect();
    let vms: Vec<String> = names
        .iter()
        .map(|n| format!("{{ name: {n}, nic: {{ subnet: vnet/s }}, faults: [guest_hung] }}"))
        .collect();
    let (world, sub_of) = scenario_in(subs, &vms);
    let sim = Simulator::start(world).await.unwrap();
    let api = rdph_api(&admin, ns);
    let leases: Api<Lease> = Api::namespaced(admin.clone(), ns);
    let ids = ["cap-a", "cap-b", "cap-c"];
    // Every VM of the test fails at once: the breakers, which would rightly hold them all,
    // are set aside so that only the caps decide.
    let breakers_off = [
        "--max-unreachable-percent",
        "100",
        "--fleet-max-failing-percent",
        "100",
    ];
    let mut ops = replicas(cp, &sim, ns, &ids, &breakers_off);
    for op in &mut ops {
        op.wait_ready().await;
    }
    balanced(&leases, &ids, &mut ops).await;
    for (n, sub) in names.iter().zip(&sub_of) {
        let rdp = sim.vm(n).unwrap().rdp;
        let remediation = json!({
            "mode": "Auto", "ladder": ["Restart"], "allowedDisruptiveActions": ["Restart"],
            "settleTime": "1s", "backoff": {"initial": "1s", "max": "2s"},
        });
        let mut obj = operator::rdphealth(sub, n, n, rdp, remediation);
        if let Some(cap) = fleet_cap {
            // As a fleet creates its incidents: its label and its cap.
            obj.metadata.labels = Some([(FLEET_LABEL.to_string(), "prod".to_string())].into());
            obj.metadata.annotations =
                Some([(MAX_DISRUPTIVE_ANNOTATION.to_string(), cap.to_string())].into());
        }
        api.create(&PostParams::default(), &obj).await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut most_in_flight = 0;
    let s = loop {
        let s = statuses(&api).await;
        let in_flight = s
            .values()
            .filter(|(_, st)| st["ladder"]["current"]["step"]["rung"] == "Restart")
            .count();
        most_in_flight = most_in_flight.max(in_flight);
        if s.values().all(|(_, st)| {
            st["phase"] == "Healthy"
                && st["ladder"]["history"]
                    .as_array()
                    .is_some_and(|h| !h.is_empty())
        }) {
            break s;
        }
        if Instant::now() > deadline {
            let logs: Vec<String> = ops.iter().map(Operator::log_text).collect();
            panic!(
                "not every VM was restarted: {s:#?}\n{}",
                logs.join("\n---\n")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        sim.count("vm.restart"),
        names.len() as u64,
        "{:?}",
        sim.counters()
    );
    assert!(
        most_in_flight <= 1,
        "{most_in_flight} restarts in flight at once"
    );
    // Exact, from the records: the restarts' [started, finished] intervals never overlap.
    let mut spans: Vec<(String, String, String)> = Vec::new();
    for (name, (_, st)) in &s {
        let history = st["ladder"]["history"].as_array().unwrap();
        assert_eq!(history.len(), 1, "{name}: {st:#}");
        let r = &history[0];
        assert_eq!(r["step"]["rung"], "Restart", "{name}: {st:#}");
        spans.push((
            r["startedAt"].as_str().unwrap().into(),
            r["finishedAt"].as_str().unwrap().into(),
            name.clone(),
        ));
    }
    spans.sort();
    for w in spans.windows(2) {
        let parse = |t: &str| t.parse::<k8s_openapi::jiff::Timestamp>().unwrap();
        assert!(
            parse(&w[0].1) <= parse(&w[1].0),
            "overlapping restarts: {spans:?}"
        );
    }
    let writers: BTreeSet<String> = s
        .values()
        .filter_map(|(_, st)| st["observedBy"].as_str().map(String::from))
        .collect();
    println!(
        "cap across replicas ({} subscriptions): {} restarts, at most {most_in_flight} in flight, written by {writers:?}",
        subs.len(),
        sim.count("vm.restart")
    );
    drop(ops);
    sim.shutdown().await;
}
