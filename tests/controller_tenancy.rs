//! Tenancy on the whole loop: the real `Controller` against a real API server, the simulator
//! as Azure. Namespaces are granted by their labels, each with its own workload identity; the
//! simulator's token endpoint records which client ID every ARM request was made as.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
mod operator_harness;

use std::{sync::Arc, time::Duration};

use azure_core::Url;
use common::real_api::{RealApiServer, condition};
use operator_harness::Running;
use rdphealth::{
    azure::{ArmClient, ArmConfig, Azure, CountedAzure, Federation, StaticToken},
    controller::{Seams, Settings},
    engine::{AzureResolver, ResolverPolicy},
    ladder::fleet::FleetPolicy,
    probe::RdpProber,
    sim::{Fault, Scenario, Simulator, world::UNISSUED},
    tenancy::TenancyPolicy,
};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);
const SUB_A: &str = "00000000-0000-0000-0000-0000000000a1";
const SUB_B: &str = "00000000-0000-0000-0000-0000000000b2";
const CLIENT_A: &str = "aaaaaaaa-0000-0000-0000-000000000001";
const CLIENT_B: &str = "bbbbbbbb-0000-0000-0000-000000000002";
const TENANT: &str = "11111111-2222-3333-4444-555555555555";

/// One subscription per tenant, each with one VM whose RDP can be reset through VMAccess.
fn scenario() -> Scenario {
    let subscription = |id: &str, vm: &str| {
        format!(
            r#"
  - id: {id}
    resourceGroups:
      - name: rg
        location: westeurope
        networkSecurityGroups:
          - name: nsg
            rules:
              - {{ name: allow-rdp, priority: 1000, access: Allow, protocol: Tcp, source: "*", destinationPort: "3389" }}
        virtualNetworks:
          - {{ name: vnet, addressPrefix: 10.0.0.0/16, subnets: [ {{ name: s, addressPrefix: 10.0.0.0/24, networkSecurityGroup: nsg }} ] }}
        vms:
          - {{ name: {vm}, nic: {{ subnet: vnet/s }}, vmAccessExtension: enablevmAccess }}"#
        )
    };
    Scenario::from_yaml(&format!(
        "timing: {{ operation: 300ms, restart: 1s, redeploy: 2s, retryAfter: 200ms }}\nsubscriptions:{}{}\n",
        subscription(SUB_A, "vm-a"),
        subscription(SUB_B, "vm-b"),
    ))
    .unwrap()
}

/// Each tenant label grants its own subscription, as its own identity.
fn policy() -> TenancyPolicy {
    TenancyPolicy::from_yaml(&format!(
        "namespaces:
  - namespaceSelector: {{matchLabels: {{tenant: a}}}}
    scopes: [/subscriptions/{SUB_A}]
    azureClientId: {CLIENT_A}
  - namespaceSelector: {{matchExpressions: [{{key: tenant, operator: In, values: [b]}}]}}
    scopes: [/subscriptions/{SUB_B}]
    azureClientId: {CLIENT_B}
"
    ))
    .unwrap()
}

/// The operator with the tenancy policy: its own identity is a fixed token the emulator did
/// not issue; the namespaces' identities exchange `token_file` at the emulator's token
/// endpoint.
async fn start_operator(
    api: &RealApiServer,
    sim: &Simulator,
    token_file: &std::path::Path,
) -> Running {
    let url = Url::parse(&sim.arm_url()).unwrap();
    let own: Arc<dyn Azure> = Arc::new(ArmClient::new(
        ArmConfig::new(url.clone()),
        Arc::new(StaticToken::new("operator-token")),
    ));
    let azure = Arc::new(CountedAzure::new(own).unwrap());
    let seams = Seams {
        prober: Arc::new(sim.address_prober(Arc::new(RdpProber::new().unwrap()))),
        resolver: Arc::new(AzureResolver::new(
            azure.clone() as Arc<dyn Azure>,
            ResolverPolicy::default(),
        )),
        azure: Some(azure),
        identities: Some(Arc::new(Federation::new(
            ArmConfig::new(url.clone()),
            url,
            Some(TENANT.into()),
            Some(token_file.to_path_buf()),
        ))),
        graph: None,
    };
    let settings = Settings {
        concurrency: 4,
        fleet: FleetPolicy {
            disruptive_grace: Duration::from_millis(200),
            ..FleetPolicy::default()
        },
        tenancy: Some(policy()),
        ..Settings::default()
    };
    Running::start(api, settings, seams).await
}

fn rdphealth(namespace: &str, name: &str, sub: &str, vm: &str) -> Value {
    json!({
        "apiVersion": "rdphealth.io/v1alpha1",
        "kind": "RdpHealth",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "vm": {"resourceId": format!("/subscriptions/{sub}/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/{vm}")},
            "probe": {
                "interval": "1s", "unhealthyInterval": "300ms", "timeout": "250ms",
                "failureThreshold": 2, "successThreshold": 1,
            },
            "remediation": {"mode": "Auto", "settleTime": "1s", "backoff": {"initial": "1s", "max": "2s"}},
        },
    })
}

async fn wait_status(
    api: &RealApiServer,
    namespace: &str,
    name: &str,
    what: &str,
    f: impl Fn(&Value) -> bool,
) -> Value {
    api.wait_for(what, WAIT, |inner| {
        inner.status(namespace, name).filter(|s| f(s))
    })
    .await
}

/// An object's resourceVersion, as a number (the test's one API server orders them).
fn version(object: &Value) -> u64 {
    object["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// ARM requests per client ID and subscription, as the emulator counted them.
fn requests(sim: &Simulator) -> std::collections::BTreeMap<String, Vec<String>> {
    sim.token_log()
        .arm_requests_by_client
        .into_iter()
        .map(|(client, by_sub)| (client, by_sub.into_keys().collect()))
        .collect()
}

/// Two namespaces granted by label, each with its own identity: every ARM request for an
/// object is made as its namespace's identity (reads and the VMAccess write alike), never as
/// the operator's. A namespace whose label is removed loses its grant: its object becomes
/// `Valid=False` and no ARM request is made for it afterwards, even when its VM breaks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaces_granted_by_label_act_only_as_their_own_identity() {
    let sim = Simulator::start(scenario()).await.unwrap();
    let token_file =
        std::env::temp_dir().join(format!("rdphealth-tenancy-token-{}", std::process::id()));
    std::fs::write(&token_file, "projected-service-account-token\n").unwrap();
    let api = RealApiServer::start().await;
    let cp = api.control_plane();
    for (ns, tenant) in [("team-a", "a"), ("team-b", "b")] {
        api.create_namespace(ns);
        cp.kubectl(&["label", "namespace", ns, &format!("tenant={tenant}")]);
    }
    // A broken VM in team-a: the ladder resets RDP as team-a's identity.
    assert!(sim.inject("vm-a", Fault::RdpDisabled).await);
    let op = start_operator(&api, &sim, &token_file).await;
    api.create(
        "rdphealths",
        "team-a",
        rdphealth("team-a", "a", SUB_A, "vm-a"),
    );
    api.create(
        "rdphealths",
        "team-b",
        rdphealth("team-b", "b", SUB_B, "vm-b"),
    );

    let s = wait_status(&api, "team-a", "a", "team-a recovered", |s| {
        s["phase"] == "Recovered"
    })
    .await;
    assert_eq!(
        s["ladder"]["recoveredBy"]["rung"], "ResetRdpConfig",
        "{s:#}"
    );
    assert_eq!(sim.count("extension.put"), 1);
    wait_status(&api, "team-b", "b", "team-b reachable", |s| {
        condition(s, "Reachable").is_some_and(|c| c["status"] == "True")
    })
    .await;

    // Each identity touched only its own subscription; the operator's own, nothing.
    let seen = requests(&sim);
    assert_eq!(
        seen.get(CLIENT_A),
        Some(&vec![SUB_A.to_string()]),
        "{seen:?}"
    );
    assert_eq!(
        seen.get(CLIENT_B),
        Some(&vec![SUB_B.to_string()]),
        "{seen:?}"
    );
    assert_eq!(seen.get(UNISSUED), None, "{seen:?}");
    assert_eq!(seen.len(), 2, "{seen:?}");

    // team-a loses its label, and with it its grant.
    cp.kubectl(&["label", "namespace", "team-a", "tenant-"]);
    let (s, refused_at) = api
        .wait_for("Valid=False", WAIT, |inner| {
            let object = inner.get("rdphealths", "team-a", "a")?;
            let valid = condition(&object["status"], "Valid")?;
            (valid["status"] == "False").then(|| (object["status"].clone(), version(object)))
        })
        .await;
    let message = condition(&s, "Valid").unwrap()["message"].clone();
    assert!(
        message
            .as_str()
            .is_some_and(|m| m.contains("grants namespace \"team-a\" no Azure scope")),
        "{s:#}"
    );
    assert_eq!(s["phase"], "Invalid", "{s:#}");
    let log = sim.token_log();
    let as_a = log.requests_as(CLIENT_A);
    let for_a: u64 = log
        .arm_requests_by_client
        .values()
        .filter_map(|by_sub| by_sub.get(SUB_A))
        .sum();
    // Its VM breaks again: an object still acting would resolve it again and gather evidence.
    assert!(sim.inject("vm-a", Fault::RdpDisabled).await);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let log = sim.token_log();
    assert_eq!(log.requests_as(CLIENT_A), as_a, "{log:?}");
    let for_a_after: u64 = log
        .arm_requests_by_client
        .values()
        .filter_map(|by_sub| by_sub.get(SUB_A))
        .sum();
    assert_eq!(for_a_after, for_a, "{log:?}");
    assert_eq!(sim.count("extension.put"), 1);
    // team-b is untouched by team-a's change.
    let b = api.read(|inner| inner.status("team-b", "b")).unwrap();
    assert_eq!(condition(&b, "Valid").unwrap()["status"], "True", "{b:#}");

    // The label comes back: the grant, and the object's validity, with it.
    cp.kubectl(&["label", "namespace", "team-a", "tenant=a"]);
    api.wait_for("Valid=True again", WAIT, |inner| {
        let object = inner.get("rdphealths", "team-a", "a")?;
        let valid = condition(&object["status"], "Valid")?;
        (valid["status"] == "True" && version(object) > refused_at).then_some(())
    })
    .await;
    op.shutdown().await;
    sim.shutdown().await;
    let _ = std::fs::remove_file(&token_file);
}

/// The namespace's identity cannot get a token (the federated token file is missing): the
/// object says why, and nothing is asked of ARM — neither as that identity nor, in its place,
/// as the operator's own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_without_a_token_acts_never_and_says_why() {
    let sim = Simulator::start(scenario()).await.unwrap();
    let missing =
        std::env::temp_dir().join(format!("rdphealth-tenancy-no-token-{}", std::process::id()));
    let api = RealApiServer::start().await;
    api.create_namespace("team-a");
    api.control_plane()
        .kubectl(&["label", "namespace", "team-a", "tenant=a"]);
    let op = start_operator(&api, &sim, &missing).await;
    api.create(
        "rdphealths",
        "team-a",
        rdphealth("team-a", "a", SUB_A, "vm-a"),
    );
    let s = wait_status(&api, "team-a", "a", "Reachable=Unknown", |s| {
        condition(s, "Reachable").is_some_and(|c| c["status"] == "Unknown")
    })
    .await;
    let reachable = condition(&s, "Reachable").unwrap();
    assert_eq!(reachable["reason"], "AzureLookupFailed", "{s:#}");
    assert!(
        reachable["message"]
            .as_str()
            .is_some_and(|m| m.contains("federated token file")),
        "{s:#}"
    );
    let log = sim.token_log();
    assert_eq!(log.count, 0, "{log:?}");
    assert!(log.arm_requests_by_client.is_empty(), "{log:?}");
    op.shutdown().await;
    sim.shutdown().await;
}
