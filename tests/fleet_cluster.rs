//! A fleet on a real API server, with the simulator as Azure: discovery through the ARM
//! emulator's Resource Graph endpoint, members probed in memory at the addresses discovery
//! returned, one incident object for the broken VM, the ladder through it, recovery, and the
//! object deleted after the retention; a hand-written object wins over the fleet.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod operator_harness;

use operator_harness::*;
use rdphealth::api::FLEET_LABEL;

/// The fleet: every VM of the subscription, compressed timers, `Auto` with the first rung
/// only, incidents kept 3 s after recovery.
fn fleet_manifest() -> Value {
    json!({
        "apiVersion": "rdphealth.io/v1alpha1",
        "kind": "RdpHealthFleet",
        "metadata": {"name": "all", "namespace": NS},
        "spec": {
            "selector": {"subscriptions": [SUB]},
            "incidentRetention": "3s",
            "template": {
                "probe": {"interval": "1s", "unhealthyInterval": "500ms", "confirmInterval": "300ms",
                          "timeout": "400ms", "failureThreshold": 2, "successThreshold": 1},
                "remediation": {"mode": "Auto", "ladder": ["ResetRdpConfig"], "settleTime": "1s",
                                "backoff": {"initial": "1s", "max": "2s"},
                                "snapshots": {"enabled": false}}
            }
        }
    })
}

fn fleet_status(inner: &Inner) -> Option<Value> {
    inner
        .get("rdphealthfleets", NS, "all")
        .map(|f| f["status"].clone())
}

fn incidents(inner: &Inner) -> Vec<Value> {
    inner
        .list("rdphealths", NS)
        .into_iter()
        .filter(|o| o["metadata"]["labels"][FLEET_LABEL] == "all")
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_discovers_probes_opens_an_incident_and_closes_it() {
    let sim = Simulator::start(scenario(
        "          - { name: vm-a, nic: { subnet: vnet/s } }
          - { name: vm-b, nic: { subnet: vnet/s } }
          - { name: vm-broken, nic: { subnet: vnet/s }, faults: [rdp_disabled], vmAccessExtension: enablevmAccess }
          - { name: vm-mine, nic: { subnet: vnet/s } }",
    ))
    .await
    .unwrap();
    let api = Arc::new(RealApiServer::start().await);
    // vm-mine has a hand-written object: the fleet leaves it alone.
    api.create(
        "rdphealths",
        NS,
        json!({
            "apiVersion": "rdphealth.io/v1alpha1",
            "kind": "RdpHealth",
            "metadata": {"name": "mine"},
            "spec": {"vm": {"resourceId": resource_id("vm-mine")}}
        }),
    );
    let arm = ArmConfig::new(Url::parse(&sim.arm_url()).unwrap());
    let (mut seams, _witness) = seams(&api, &sim, arm.clone());
    seams.graph = Some(Arc::new(ArmClient::new(
        arm,
        Arc::new(StaticToken::new("operator-token")),
    )));
    let op = Running::start(&api, grace(Duration::from_millis(200)), seams).await;
    api.create("rdphealthfleets", NS, fleet_manifest());

    // One discovery finds the four VMs; vm-mine is skipped, naming its object.
    let s = api
        .wait_for("the fleet's members", WAIT, |inner| {
            let s = fleet_status(inner)?;
            (s["members"] == 4 && s["skipped"] == 1).then_some(s)
        })
        .await;
    assert_eq!(
        s["skippedMembers"][0]["watchedBy"],
        format!("{NS}/mine"),
        "{s:#}"
    );
    assert_eq!(
        condition(&s, "Discovered").unwrap()["status"],
        "True",
        "{s:#}"
    );
    assert!(s["discovery"]["requests"].as_u64().unwrap() >= 1, "{s:#}");

    // The broken VM becomes one incident object, owned by the fleet, with the template.
    let objects = api
        .wait_for("an incident", WAIT, |inner| {
            let found = incidents(inner);
            (!found.is_empty()).then_some(found)
        })
        .await;
    assert_eq!(objects.len(), 1, "{objects:#?}");
    let incident = &objects[0];
    let name = incident["metadata"]["name"].as_str().unwrap().to_owned();
    assert!(name.starts_with("all-vm-broken-"), "{name}");
    assert_eq!(
        incident["spec"]["vm"]["resourceId"],
        resource_id("vm-broken")
    );
    assert_eq!(
        incident["metadata"]["ownerReferences"][0]["kind"],
        "RdpHealthFleet"
    );
    assert_eq!(
        incident["spec"]["remediation"]["ladder"],
        json!(["ResetRdpConfig"])
    );

    // The ladder runs through the object and fixes the VM.
    let s = api
        .wait_for("the incident recovered", WAIT, |inner| {
            let s = inner.get("rdphealths", NS, &name)?["status"].clone();
            (s["ladder"]["recoveredBy"]["rung"] == "ResetRdpConfig").then_some(s)
        })
        .await;
    assert_eq!(
        condition(&s, "Reachable").unwrap()["status"],
        "True",
        "{s:#}"
    );
    assert_eq!(sim.count("extension.put"), 1);

    // 3 s after recovery the fleet deletes it; its Events stay.
    api.wait_for("the incident deleted", WAIT, |inner| {
        inner.get("rdphealths", NS, &name).is_none().then_some(())
    })
    .await;
    let s = api
        .wait_for("the fleet healthy again", WAIT, |inner| {
            let s = fleet_status(inner)?;
            (s["incidents"] == 0 && s["reachable"] == 3).then_some(s)
        })
        .await;
    assert_eq!(s["unreachable"], 0, "{s:#}");
    let reasons: Vec<String> = api.read(|inner| {
        inner
            .list("events", NS)
            .iter()
            .filter(|e| e["regarding"]["kind"] == "RdpHealthFleet")
            .map(|e| e["reason"].as_str().unwrap_or_default().to_owned())
            .collect()
    });
    assert!(
        reasons.contains(&"IncidentOpened".to_owned()),
        "{reasons:?}"
    );
    assert!(
        reasons.contains(&"IncidentClosed".to_owned()),
        "{reasons:?}"
    );

    // Healthy members cost no ARM request: with every VM healthy, Azure sees nothing for five
    // seconds (five probe intervals of every member) but, at most, a discovery.
    let before = sim.counters();
    assert!(
        before.get("graph.resources").copied().unwrap_or(0) >= 1,
        "{before:?}"
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut after = sim.counters();
    after.remove("graph.resources");
    let mut before = before;
    before.remove("graph.resources");
    assert_eq!(before, after, "ARM requests while every member was healthy");
    assert_eq!(reachable_in_metrics(&op).await, 3);
    // Only the fleet and the hand-written object remain.
    let remaining = api.read(|inner| inner.list("rdphealths", NS).len());
    assert_eq!(remaining, 1);
    op.shutdown().await;
}

/// `rdphealth_fleet_members{state="reachable"}` as the operator serves it.
async fn reachable_in_metrics(op: &Running) -> u64 {
    let (_, text) = common::http_get(op.http, "/metrics").await.unwrap();
    text.lines()
        .filter(|l| l.starts_with("rdphealth_fleet_members{") && l.contains("state=\"reachable\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}
