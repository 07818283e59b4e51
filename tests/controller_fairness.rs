//! Fair turns: when more objects are due than the reconcilers can serve, they are served in the
//! order they fell due, so no object waits while others are probed again. The real
//! `Controller` against a real API server, one reconcile at a time, and a prober that takes
//! real time: the fleet needs more probing than one interval holds, so every object is always
//! overdue and the order of the probes shows the queue's order.

// Test helpers outside `#[test]` functions may panic on broken fixtures.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use common::real_api::RealApiServer;
use rdphealth::{
    controller::{self, Seams, Settings},
    engine::HostOverride,
    probe::{BoxFuture, Layers, ProbeOptions, ProbeReport, Prober, SecurityProtocol, Target},
};
use serde_json::{Value, json};
use tokio::{net::TcpListener, sync::oneshot};

const NS: &str = "default";
/// Objects; with [`PROBE_TIME`] they need 1.6 s of probing per 1 s interval.
const OBJECTS: usize = 8;
/// How long each probe takes.
const PROBE_TIME: Duration = Duration::from_millis(200);
/// Probes watched after the first pass.
const ROUNDS: usize = 6;
const WAIT: Duration = Duration::from_secs(90);

/// Reachable after [`PROBE_TIME`]; records which object each probe was for (each object has
/// its own loopback host, never connected to) and how many probes ran at once.
#[derive(Default)]
struct Slow {
    probes: Mutex<Vec<usize>>,
    running: Mutex<(usize, usize)>,
}

impl Slow {
    fn probes(&self) -> Vec<usize> {
        self.probes.lock().unwrap().clone()
    }

    /// The most probes that ran at the same time.
    fn most_at_once(&self) -> usize {
        self.running.lock().unwrap().1
    }
}

impl Prober for Slow {
    fn probe<'a>(&'a self, target: &'a Target, _: &'a ProbeOptions) -> BoxFuture<'a, ProbeReport> {
        Box::pin(async move {
            let object = target
                .host
                .rsplit('.')
                .next()
                .and_then(|n| n.parse::<usize>().ok())
                .expect("a host of this test");
            self.probes.lock().unwrap().push(object);
            {
                let mut running = self.running.lock().unwrap();
                running.0 += 1;
                running.1 = running.1.max(running.0);
            }
            tokio::time::sleep(PROBE_TIME).await;
            self.running.lock().unwrap().0 -= 1;
            ProbeReport {
                target: target.to_string(),
                reachable: true,
                failure: None,
                layers: Layers::default(),
                selected_protocol: Some(SecurityProtocol::Rdp),
                tls: None,
                nla: None,
                findings: vec![],
                likely_causes: vec![],
                total_ms: PROBE_TIME.as_secs_f64() * 1000.0,
            }
        })
    }
}

fn object(i: usize) -> Value {
    json!({
        "apiVersion": "rdphealth.io/v1alpha1",
        "kind": "RdpHealth",
        "metadata": {"name": format!("vm-{i}"), "namespace": NS},
        "spec": {
            "vm": {"resourceId": format!("/subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/rg-1/providers/Microsoft.Compute/virtualMachines/vm-{i}")},
            "endpoint": {"host": format!("127.0.3.{i}"), "port": 3389},
            "probe": {"interval": "1s", "timeout": "500ms", "successThreshold": 1},
        },
    })
}

/// The first place in `probes` where an object is probed again while another object, probed
/// before that object's previous probe (so due before it), has not been probed since: as
/// (position, object probed again, object passed over). Only probes after the first `skip`
/// are judged.
fn passed_over(probes: &[usize], skip: usize) -> Option<(usize, usize, usize)> {
    let mut last: HashMap<usize, usize> = HashMap::new();
    for (j, &x) in probes.iter().enumerate() {
        if let Some(&i) = last.get(&x)
            && i >= skip
            && let Some((&y, _)) = last.iter().find(|&(&y, &at)| y != x && at < i)
        {
            return Some((j, x, y));
        }
        last.insert(x, j);
    }
    None
}

#[test]
fn passed_over_finds_an_object_probed_twice_while_another_waits() {
    // Round robin: nobody passed over.
    assert_eq!(passed_over(&[0, 1, 2, 0, 1, 2, 0, 1, 2], 0), None);
    // 0 and 1 take turns while 2, due since its probe at position 2, waits.
    assert_eq!(passed_over(&[0, 1, 2, 0, 1, 0], 0), Some((5, 0, 2)));
    // The same, but only probes after the first five are judged: the second 0 at 3 is.
    assert_eq!(passed_over(&[0, 1, 2, 0, 1, 0], 4), None);
    assert_eq!(passed_over(&[0, 1, 2, 0, 1, 0], 3), Some((5, 0, 2)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overdue_objects_are_probed_in_the_order_they_fell_due() {
    let api = RealApiServer::start().await;
    for i in 0..OBJECTS {
        api.create("rdphealths", NS, object(i));
    }
    let prober = Arc::new(Slow::default());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(controller::run(
        api.client(),
        Settings {
            concurrency: 1,
            instance: Some("replica-a".into()),
            ..Settings::default()
        },
        Seams {
            prober: prober.clone(),
            resolver: Arc::new(HostOverride),
            azure: None,
            identities: None,
            graph: None,
        },
        listener,
        async move {
            let _ = stopped.await;
        },
    ));

    // The first pass, then ROUNDS more probes of every object had the queue been fair.
    let wanted = OBJECTS * (ROUNDS + 1);
    let deadline = tokio::time::Instant::now() + WAIT;
    while prober.probes().len() < wanted {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {wanted} probes: {:?}",
            prober.probes().len(),
            prober.probes()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let probes = prober.probes();
    let _ = stop.send(());
    tokio::time::timeout(WAIT, task)
        .await
        .expect("the operator did not stop")
        .unwrap()
        .unwrap();

    assert_eq!(
        prober.most_at_once(),
        1,
        "more probes at once than concurrency"
    );
    let first_pass = &probes[..OBJECTS];
    for i in 0..OBJECTS {
        assert!(
            first_pass.contains(&i),
            "the first pass missed object {i}: {probes:?}"
        );
    }
    // Every object is overdue all the time (1.6 s of probes per 1 s interval): a fair queue
    // serves them round robin, oldest due first.
    if let Some((at, again, waiting)) = passed_over(&probes, OBJECTS) {
        panic!(
            "object {again} probed again at probe {at} while object {waiting}, due before it, \
             waited: {probes:?}"
        );
    }
}
