//! Opt-in suite against a real cluster. Set `RDPHEALTH_E2E_KUBECONFIG` to a kubeconfig for a
//! disposable cluster (kind, k3d, ...) where you may install CRDs; without it the suite prints
//! a note and passes without doing anything.
//!
//! It applies `crds/`, waits for the CRD to be established, runs the operator in this process
//! (so it can probe a loopback RDP responder) against a fresh namespace, and waits on status
//! conditions and Events through watches — never on sleeps. It also checks that the API server
//! enforces the schema's CEL rules.

// Test helpers outside `#[test]` functions may panic on broken fixtures.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{sync::Arc, time::Duration};

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::{
    api::{core::v1::Namespace, events::v1::Event},
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, Client, Config, ResourceExt,
    api::{DeleteParams, ObjectMeta, Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        WatchStreamExt,
        wait::{await_condition, conditions},
        watcher,
    },
};
use rdphealth::{
    api::{CRD_FILE, RdpHealth},
    controller::{self, LeaseSettings, Seams, Settings},
    engine::HostOverride,
    probe::{RdpProber, codec},
};
use serde_json::json;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::oneshot,
};

const ENV: &str = "RDPHEALTH_E2E_KUBECONFIG";
const WAIT: Duration = Duration::from_secs(120);
const VM: &str = "/subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/rg-e2e/providers/Microsoft.Compute/virtualMachines/vm-e2e";

async fn client(path: &str) -> Client {
    let kubeconfig = Kubeconfig::read_from(path).expect("readable kubeconfig");
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("usable kubeconfig");
    Client::try_from(config).unwrap()
}

/// Server-side applies `crds/` and waits until the API server serves it.
async fn install_crd(client: &Client) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("crds")
        .join(CRD_FILE);
    let crd: CustomResourceDefinition =
        serde_saphyr::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let name = crd.name_any();
    api.patch(
        &name,
        &PatchParams::apply("rdphealth-e2e").force(),
        &Patch::Apply(&crd),
    )
    .await
    .expect("CRD applied");
    tokio::time::timeout(
        WAIT,
        await_condition(api, &name, conditions::is_crd_established()),
    )
    .await
    .expect("CRD established in time")
    .unwrap();
}

async fn responder() -> (u16, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(answer(stream));
        }
    });
    (port, task)
}

async fn answer(mut stream: TcpStream) {
    let mut header = [0u8; 4];
    if stream.read_exact(&mut header).await.is_err() {
        return;
    }
    let len = usize::from(u16::from_be_bytes([header[2], header[3]]));
    let mut rest = vec![0u8; len.saturating_sub(4)];
    if stream.read_exact(&mut rest).await.is_ok() {
        let _ = stream
            .write_all(&codec::encode_negotiation_response(0, 0))
            .await;
    }
}

fn object(name: &str, port: u16, probe: serde_json::Value) -> RdpHealth {
    serde_json::from_value(json!({
        "apiVersion": "rdphealth.io/v1alpha1",
        "kind": "RdpHealth",
        "metadata": {"name": name},
        "spec": {
            "vm": {"resourceId": VM},
            "endpoint": {"host": "127.0.0.1", "port": port},
            "probe": probe,
        },
    }))
    .unwrap()
}

fn has_condition(type_: &'static str, status: &'static str) -> impl Fn(Option<&RdpHealth>) -> bool {
    move |obj| {
        obj.and_then(|o| o.status.as_ref()).is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == type_ && c.status == status)
        })
    }
}

async fn wait_condition(
    api: &Api<RdpHealth>,
    name: &str,
    type_: &'static str,
    status: &'static str,
) {
    tokio::time::timeout(
        WAIT,
        await_condition(api.clone(), name, has_condition(type_, status)),
    )
    .await
    .unwrap_or_else(|_| panic!("{name}: {type_}={status} not reached in time"))
    .unwrap();
}

/// Waits, through a watch, for an Event with `reason` about `name`.
async fn wait_event(client: &Client, ns: &str, name: &str, reason: &str) {
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    let mut stream = watcher(events, watcher::Config::default())
        .applied_objects()
        .try_filter(|e| {
            let hit = e.reason.as_deref() == Some(reason)
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name);
            std::future::ready(hit)
        })
        .boxed();
    tokio::time::timeout(WAIT, stream.try_next())
        .await
        .unwrap_or_else(|_| panic!("no {reason} event for {name} in time"))
        .unwrap()
        .expect("watch ended");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn e2e_real_cluster() {
    let Ok(path) = std::env::var(ENV) else {
        eprintln!(
            "note: {ENV} is not set: skipping the real-cluster suite (set it to a kubeconfig of a disposable cluster to run it)"
        );
        return;
    };
    let client = client(&path).await;
    install_crd(&client).await;

    let ns = format!(
        "rdphealth-e2e-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
            % 1_000_000
    );
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &Namespace {
                metadata: ObjectMeta {
                    name: Some(ns.clone()),
                    labels: Some(
                        [("app.kubernetes.io/part-of".into(), "rdphealth-e2e".into())].into(),
                    ),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await
        .unwrap();

    // The operator, in this process, watching only the test namespace.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let operator = tokio::spawn(controller::run(
        client.clone(),
        Settings {
            namespace: Some(ns.clone()),
            concurrency: 2,
            lease: Some(LeaseSettings {
                name: "rdphealth-operator".into(),
                namespace: ns.clone(),
                identity: "e2e".into(),
                duration_seconds: 15,
                grace_seconds: 5,
            }),
            instance: Some("e2e".into()),
            ..Settings::default()
        },
        Seams {
            prober: Arc::new(RdpProber::new().unwrap()),
            resolver: Arc::new(HostOverride),
            azure: None,
        },
        listener,
        async move {
            let _ = stopped.await;
        },
    ));

    let api: Api<RdpHealth> = Api::namespaced(client.clone(), &ns);
    let fast = json!({"interval": "2s", "unhealthyInterval": "1s", "timeout": "500ms", "failureThreshold": 2, "successThreshold": 1});

    // The schema's CEL rules are enforced by the API server.
    let bad = object(
        "bad-timeout",
        3389,
        json!({"interval": "5s", "timeout": "5s"}),
    );
    let err = api.create(&PostParams::default(), &bad).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("timeout must be shorter than interval"),
        "{err}"
    );

    // Healthy, then unreachable with an Event once the responder goes away.
    let (port, rdp) = responder().await;
    api.create(
        &PostParams::default(),
        &object("vm-e2e", port, fast.clone()),
    )
    .await
    .unwrap();
    wait_condition(&api, "vm-e2e", "Healthy", "True").await;

    // vm.resourceId is immutable.
    let other = VM.replace("vm-e2e", "vm-other");
    let err = api
        .patch(
            "vm-e2e",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"vm": {"resourceId": other}}})),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("immutable"), "{err}");

    rdp.abort();
    let _ = rdp.await;
    wait_condition(&api, "vm-e2e", "Reachable", "False").await;
    wait_event(&client, &ns, "vm-e2e", "BecameUnreachable").await;

    let _ = stop.send(());
    tokio::time::timeout(WAIT, operator)
        .await
        .expect("operator stopped in time")
        .unwrap()
        .unwrap();
    let _ = namespaces.delete(&ns, &DeleteParams::default()).await;
}
