//! The CRD, the examples and the operator against a real Kubernetes API server: the local
//! control plane (etcd + kube-apiserver built from `tools/k8s`, shared by the tests of this
//! binary), or any cluster whose kubeconfig is in `RDPHEALTH_E2E_KUBECONFIG` (a disposable one:
//! the suite installs the CRD and creates namespaces).
//!
//! Everything asserted here is the server's doing: schema defaults and validation (CEL rules,
//! enums, bounds, patterns, immutability), printer columns, `kubectl explain`, `kubectl wait`,
//! Events. The operator runs in this process so that it can probe loopback RDP responders; waits
//! go through watches or `kubectl wait`, never through sleeps.

// Test helpers outside `#[test]` functions may panic on broken fixtures.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::{Arc, OnceLock},
    time::Duration,
};

use common::k8s::{self, ControlPlane};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::{core::v1::Namespace, events::v1::Event};
use kube::{
    Api, Client,
    api::{ApiResource, DeleteParams, DynamicObject, ObjectMeta, Patch, PatchParams, PostParams},
    runtime::{WatchStreamExt, wait::await_condition, watcher},
};
use rdphealth::{
    api::{CRD_FILE, FIELD_MANAGER, FLEET_CRD_FILE, RdpHealth},
    controller::{self, Seams, Settings},
    engine::HostOverride,
    probe::{RdpProber, codec},
};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::oneshot,
    task::JoinHandle,
};

const ENV: &str = "RDPHEALTH_E2E_KUBECONFIG";
const WAIT: Duration = Duration::from_secs(90);
const VM: &str = "/subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/rg-e2e/providers/Microsoft.Compute/virtualMachines/vm-e2e";
const CRD_NAME: &str = "rdphealths.rdphealth.io";
const FLEET_CRD_NAME: &str = "rdphealthfleets.rdphealth.io";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The cluster under test, with the CRD installed (once per test binary).
struct Cluster {
    kubeconfig: PathBuf,
    kubectl: PathBuf,
}

fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        let cluster = match std::env::var_os(ENV) {
            Some(path) => Cluster {
                kubeconfig: PathBuf::from(path),
                kubectl: k8s::tools().join("kubectl"),
            },
            None => {
                let cp = ControlPlane::shared();
                Cluster {
                    kubeconfig: cp.kubeconfig.clone(),
                    kubectl: cp.tool("kubectl"),
                }
            }
        };
        // Server-side apply of crds/, then wait until the server serves the kinds.
        for file in [CRD_FILE, FLEET_CRD_FILE] {
            let crd = root().join("crds").join(file);
            cluster.kubectl_ok(&[
                "apply",
                "--server-side",
                "--field-manager=rdphealth-e2e",
                "--force-conflicts",
                "-f",
                crd.to_str().unwrap(),
            ]);
        }
        k8s::wait_established(&cluster.kubectl, &cluster.kubeconfig, CRD_NAME);
        k8s::wait_established(&cluster.kubectl, &cluster.kubeconfig, FLEET_CRD_NAME);
        cluster
    })
}

impl Cluster {
    fn kubectl_with(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut cmd = Command::new(&self.kubectl);
        cmd.env("KUBECONFIG", &self.kubeconfig)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if stdin.is_some() {
            cmd.stdin(Stdio::piped());
        }
        let mut child = cmd.spawn().unwrap();
        if let Some(input) = stdin {
            use std::io::Write as _;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(input.as_bytes())
                .unwrap();
        }
        child.wait_with_output().unwrap()
    }

    fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl_with(args, None);
        assert!(
            out.status.success(),
            "kubectl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// A client-side `kubectl apply` (as GitOps tools do) of `manifest` into `ns`.
    fn kubectl_apply(&self, ns: &str, manifest: &Value) {
        let out = self.kubectl_with(&["apply", "-n", ns, "-f", "-"], Some(&manifest.to_string()));
        assert!(
            out.status.success(),
            "kubectl apply failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    async fn client(&self) -> Client {
        k8s::client_from(&self.kubeconfig).await
    }

    /// A fresh namespace for one test.
    async fn namespace(&self, client: &Client, prefix: &str) -> String {
        let ns = format!(
            "{prefix}-{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis()
                % 1_000_000_000
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
        ns
    }
}

fn rdph_resource() -> ApiResource {
    ApiResource::erase::<RdpHealth>(&())
}

fn manifest(name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": "rdphealth.io/v1alpha1",
        "kind": "RdpHealth",
        "metadata": {"name": name},
        "spec": spec,
    })
}

#[test]
fn crd_is_established_and_every_example_is_accepted() {
    let cluster = cluster();
    let crd: Value = serde_json::from_str(&cluster.kubectl_ok(&[
        "get",
        &format!("crd/{CRD_NAME}"),
        "-o",
        "json",
        "--show-managed-fields",
    ]))
    .unwrap();
    let established = crd["status"]["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["type"] == "Established" && c["status"] == "True");
    assert!(established, "{}", crd["status"]);
    let managers: Vec<&str> = crd["metadata"]["managedFields"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["operation"] == "Apply")
        .map(|m| m["manager"].as_str().unwrap())
        .collect();
    assert!(managers.contains(&"rdphealth-e2e"), "{managers:?}");

    let mut seen = 0;
    let mut paths: Vec<PathBuf> = std::fs::read_dir(root().join("examples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    paths.sort();
    for path in paths {
        let file = path.to_str().unwrap();
        let example: Value = serde_saphyr::from_str(&std::fs::read_to_string(&path).unwrap())
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        if let Some(ns) = example["metadata"]["namespace"].as_str() {
            // Exists already (default) or is made here; the create itself is not under test.
            let _ = cluster.kubectl_with(&["create", "namespace", ns], None);
        }
        // A real create (not a dry run): the stored object is read back below.
        let out = cluster.kubectl_with(&["create", "-f", file, "-o", "json"], None);
        assert!(
            out.status.success(),
            "the API server rejected {file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stored: Value = serde_json::from_slice(&out.stdout).unwrap();
        // The server applied the schema's defaults.
        let probe = if stored["kind"] == "RdpHealthFleet" {
            assert!(
                stored["spec"]["discoveryInterval"].is_string(),
                "{file}: {stored}"
            );
            &stored["spec"]["template"]["probe"]
        } else {
            &stored["spec"]["probe"]
        };
        assert!(
            probe["interval"].is_string(),
            "{file}: no defaulted probe interval in {stored}"
        );
        cluster.kubectl_ok(&["delete", "-f", file, "--wait=false"]);
        seen += 1;
    }
    assert!(seen >= 10, "only {seen} examples");
}

/// Each schema rule — required fields, patterns, enums, bounds, CEL rules and the immutability
/// of `vm.resourceId` — is enforced by the API server, with its message.
#[tokio::test]
async fn server_rejects_bad_specs_with_their_messages() {
    let cluster = cluster();
    let client = cluster.client().await;
    let ns = cluster.namespace(&client, "rdphealth-bad").await;
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &rdph_resource());
    let vm = json!({"resourceId": VM});
    let cases: Vec<(&str, Value, &[&str])> = vec![
        ("missing vm", json!({}), &["spec.vm: Required value"]),
        (
            "resource id of another service",
            json!({"vm": {"resourceId": VM.replace("virtualMachines", "disks")}}),
            &["spec.vm.resourceId in body should match"],
        ),
        (
            "host with a slash",
            json!({"vm": vm, "endpoint": {"host": "a/b"}}),
            &["spec.endpoint.host in body should match"],
        ),
        (
            "port 0",
            json!({"vm": vm, "endpoint": {"port": 0}}),
            &["spec.endpoint.port in body should be greater than or equal to 1"],
        ),
        (
            "port 70000",
            json!({"vm": vm, "endpoint": {"port": 70000}}),
            &["spec.endpoint.port in body should be less than or equal to 65535"],
        ),
        (
            "address type enum",
            json!({"vm": vm, "endpoint": {"addressType": "Both"}}),
            &[
                "spec.endpoint.addressType: Unsupported value: \"Both\"",
                "\"Public\"",
                "\"Private\"",
            ],
        ),
        (
            "interval pattern",
            json!({"vm": vm, "probe": {"interval": "30 seconds"}}),
            &["spec.probe.interval in body should match"],
        ),
        (
            "failure threshold 0",
            json!({"vm": vm, "probe": {"failureThreshold": 0}}),
            &["spec.probe.failureThreshold in body should be greater than or equal to 1"],
        ),
        (
            "failure threshold 101",
            json!({"vm": vm, "probe": {"failureThreshold": 101}}),
            &["spec.probe.failureThreshold in body should be less than or equal to 100"],
        ),
        (
            "remediation mode enum",
            json!({"vm": vm, "remediation": {"mode": "Yolo"}}),
            &["spec.remediation.mode: Unsupported value: \"Yolo\""],
        ),
        (
            "ladders per day 0",
            json!({"vm": vm, "remediation": {"maxLaddersPerDay": 0}}),
            &["spec.remediation.maxLaddersPerDay in body should be greater than or equal to 1"],
        ),
        (
            "CEL: timeout not below interval",
            json!({"vm": vm, "probe": {"interval": "5s", "timeout": "5s"}}),
            &["timeout must be shorter than interval"],
        ),
        (
            "CEL: timeout not below unhealthyInterval",
            json!({"vm": vm, "probe": {"unhealthyInterval": "2s", "timeout": "2500ms"}}),
            &["timeout must be shorter than unhealthyInterval"],
        ),
    ];
    let failures = rejections(&api, &cases, |i, spec| manifest(&format!("bad-{i}"), spec)).await;
    assert!(failures.is_empty(), "{failures:#?}");

    // Immutability of vm.resourceId: the update is rejected, an unrelated change is not.
    let obj: DynamicObject = serde_json::from_value(manifest("moving", json!({"vm": vm}))).unwrap();
    api.create(&PostParams::default(), &obj).await.unwrap();
    let err = api
        .patch(
            "moving",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"spec": {"vm": {"resourceId": VM.replace("vm-e2e", "vm-other")}}}),
            ),
        )
        .await
        .unwrap_err();
    match err {
        kube::Error::Api(status) => {
            assert_eq!(status.code, 422, "{status:?}");
            assert!(
                status.message.contains("vm.resourceId is immutable"),
                "{}",
                status.message
            );
        }
        other => panic!("{other}"),
    }
    api.patch(
        "moving",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"probe": {"interval": "1m"}}})),
    )
    .await
    .unwrap();
    let _ = Api::<Namespace>::all(client)
        .delete(&ns, &DeleteParams::default())
        .await;
}

/// Creates each case's object (`object(index, spec)`); returns how each case was not
/// rejected with 422 and all of its expected messages.
async fn rejections(
    api: &Api<DynamicObject>,
    cases: &[(&str, Value, &[&str])],
    object: impl Fn(usize, Value) -> Value,
) -> Vec<String> {
    let mut failures = Vec::new();
    for (i, (name, spec, expected)) in cases.iter().enumerate() {
        let obj: DynamicObject = serde_json::from_value(object(i, spec.clone())).unwrap();
        match api.create(&PostParams::default(), &obj).await {
            Ok(_) => failures.push(format!("{name}: accepted")),
            Err(kube::Error::Api(status)) => {
                if status.code != 422 || !expected.iter().all(|e| status.message.contains(e)) {
                    failures.push(format!(
                        "{name}: {} {:?}, expected {expected:?}",
                        status.code, status.message
                    ));
                }
            }
            Err(e) => failures.push(format!("{name}: {e}")),
        }
    }
    failures
}

/// A fleet's schema and CEL rules are enforced by the API server, with their messages; an
/// unknown field (a host override in the template) is refused by kubectl's strict validation.
#[tokio::test]
async fn server_rejects_bad_fleets_with_their_messages() {
    let cluster = cluster();
    let client = cluster.client().await;
    let ns = cluster.namespace(&client, "rdphealth-bad-fleet").await;
    let resource = ApiResource {
        group: "rdphealth.io".into(),
        version: "v1alpha1".into(),
        api_version: "rdphealth.io/v1alpha1".into(),
        kind: "RdpHealthFleet".into(),
        plural: "rdphealthfleets".into(),
    };
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &ns, &resource);
    let sub = "00000000-0000-0000-0000-000000000000";
    let selector = json!({"subscriptions": [sub]});
    let cases: Vec<(&str, Value, &[&str])> = vec![
        ("no selector", json!({}), &["spec.selector: Required value"]),
        (
            "no subscription",
            json!({"selector": {"subscriptions": []}}),
            &["spec.selector.subscriptions in body should have at least 1 items"],
        ),
        (
            "not a GUID",
            json!({"selector": {"subscriptions": ["prod"]}}),
            &["spec.selector.subscriptions[0] in body should match"],
        ),
        (
            "CEL: a subscription twice",
            json!({"selector": {"subscriptions": [sub, sub.to_uppercase()]}}),
            &["subscriptions must not repeat"],
        ),
        (
            "name pattern with a quote",
            json!({"selector": {"subscriptions": [sub], "namePattern": "a'b"}}),
            &["spec.selector.namePattern in body should match"],
        ),
        (
            "CEL: discovery every 30s",
            json!({"selector": selector, "discoveryInterval": "30s"}),
            &["discoveryInterval must be at least 1m"],
        ),
        (
            "CEL: template timeout not below interval",
            json!({"selector": selector, "template": {"probe": {"interval": "5s", "timeout": "5s"}}}),
            &["timeout must be shorter than interval"],
        ),
        (
            "hold limit 0",
            json!({"selector": selector, "safety": {"maxUnreachablePercent": 0}}),
            &["spec.safety.maxUnreachablePercent in body should be greater than or equal to 1"],
        ),
        (
            "fleet cap 0",
            json!({"selector": selector, "safety": {"maxConcurrentDisruptive": 0}}),
            &["spec.safety.maxConcurrentDisruptive in body should be greater than or equal to 1"],
        ),
    ];
    let failures = rejections(&api, &cases, |i, spec| {
        json!({
            "apiVersion": "rdphealth.io/v1alpha1",
            "kind": "RdpHealthFleet",
            "metadata": {"name": format!("bad-{i}")},
            "spec": spec,
        })
    })
    .await;
    assert!(failures.is_empty(), "{failures:#?}");
    let manifest = format!(
        "apiVersion: rdphealth.io/v1alpha1\nkind: RdpHealthFleet\nmetadata: {{name: hosted, namespace: {ns}}}\nspec:\n  selector: {{subscriptions: [{sub}]}}\n  template: {{endpoint: {{host: 10.0.0.4}}}}\n"
    );
    let out = cluster.kubectl_with(&["create", "-f", "-"], Some(&manifest));
    assert!(!out.status.success(), "a host override was accepted");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("unknown field \"spec.template.endpoint.host\""),
        "{stderr}"
    );
    let _ = Api::<Namespace>::all(client)
        .delete(&ns, &DeleteParams::default())
        .await;
}

#[test]
fn kubectl_explain_prints_the_field_docs() {
    let cluster = cluster();
    // The server publishes a new CRD's OpenAPI schema shortly after it is Established.
    let deadline = std::time::Instant::now() + WAIT;
    let out = loop {
        let out = cluster.kubectl_with(&["explain", "rdphealth.spec.remediation"], None);
        if out.status.success() {
            break String::from_utf8(out.stdout).unwrap();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "kubectl explain failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(
        out.contains("KIND:     RdpHealth") || out.contains("KIND:"),
        "{out}"
    );
    assert!(out.contains("FIELD: remediation"), "{out}");
    for field in ["mode", "ladder", "maintenanceWindows", "maxLaddersPerDay"] {
        assert!(out.contains(field), "{field} missing in:\n{out}");
    }
    let crd: Value = serde_saphyr::from_str(
        &std::fs::read_to_string(root().join("crds").join(CRD_FILE)).unwrap(),
    )
    .unwrap();
    let doc =
        crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
            ["remediation"]["description"]
            .as_str()
            .unwrap();
    let first_words: String = doc.split_whitespace().take(6).collect::<Vec<_>>().join(" ");
    let flat: String = out.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(
        flat.contains(&first_words),
        "{first_words:?} not in:\n{out}"
    );
}

/// A loopback RDP listener answering every Connection Request with "standard RDP security";
/// aborting its task closes the port.
async fn responder() -> (u16, JoinHandle<()>) {
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

/// Waits, through a watch, for an Event with `reason` about `name`.
async fn wait_event(client: &Client, ns: &str, name: &str, reason: &str) -> Event {
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
        .expect("watch ended")
}

/// The operator in this process, watching one namespace, against a real API server:
/// `kubectl wait --for=condition=Healthy` returns once the VM answers RDP, `kubectl get` shows
/// the printer columns with real values, and the Events are readable with `kubectl events`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_status_through_kubectl() {
    let cluster = cluster();
    let client = cluster.client().await;
    let ns = cluster.namespace(&client, "rdphealth-e2e").await;

    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let operator = tokio::spawn(controller::run(
        client.clone(),
        Settings {
            namespace: Some(ns.clone()),
            concurrency: 2,
            instance: Some("e2e".into()),
            ..Settings::default()
        },
        Seams {
            prober: Arc::new(RdpProber::new().unwrap()),
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

    let (port, rdp) = responder().await;
    let api: Api<RdpHealth> = Api::namespaced(client.clone(), &ns);
    // Created the GitOps way: a client-side `kubectl apply` of the manifest.
    let mut desired = manifest(
        "vm-e2e",
        json!({
            "vm": {"resourceId": VM},
            "endpoint": {"host": "127.0.0.1", "port": port},
            "probe": {"interval": "2s", "unhealthyInterval": "1s", "timeout": "500ms", "failureThreshold": 2, "successThreshold": 1},
        }),
    );
    cluster.kubectl_apply(&ns, &desired);

    // kubectl wait, in a blocking thread so the in-process operator keeps running.
    let kubeconfig = cluster.kubeconfig.clone();
    let kubectl = cluster.kubectl.clone();
    let ns2 = ns.clone();
    let waited = tokio::task::spawn_blocking(move || {
        Command::new(kubectl)
            .env("KUBECONFIG", kubeconfig)
            .args([
                "wait",
                "--for=condition=Healthy",
                "rdph/vm-e2e",
                "-n",
                &ns2,
                "--timeout=90s",
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        waited.status.success(),
        "kubectl wait: {}",
        String::from_utf8_lossy(&waited.stderr)
    );
    assert!(
        String::from_utf8_lossy(&waited.stdout).contains("condition met"),
        "{}",
        String::from_utf8_lossy(&waited.stdout)
    );

    // Printer columns with the values the operator wrote.
    let table = cluster.kubectl_ok(&["get", "rdph", "-n", &ns]);
    let wide = cluster.kubectl_ok(&["get", "rdph", "-n", &ns, "-o", "wide"]);
    for (out, wide) in [(&table, false), (&wide, true)] {
        let lines: Vec<Vec<&str>> = out
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        let mut header = vec!["NAME", "REACHABLE", "PHASE", "REASON"];
        if wide {
            // The computer name the endpoint answered as (empty here: xrdp-less responder).
            header.push("COMPUTER");
        }
        header.extend(["LAST", "PROBE", "AGE"]);
        assert_eq!(lines[0], header, "{out}");
        assert_eq!(lines.len(), 2, "{out}");
        let row = &lines[1];
        assert_eq!(row[0], "vm-e2e", "{out}");
        assert_eq!(row[1], "True", "{out}");
        let stored = api.get_status("vm-e2e").await.unwrap();
        let status = stored.status.unwrap();
        let phase = serde_json::to_value(status.phase).unwrap();
        assert_eq!(row[2], phase.as_str().unwrap(), "{out}");
        let reason = &status
            .conditions
            .iter()
            .find(|c| c.type_ == "Reachable")
            .unwrap()
            .reason;
        assert_eq!(row[3], reason, "{out}");
        // Last Probe and Age render as durations ("3s", "1m2s").
        assert!(
            row[4].ends_with('s') || row[4].ends_with('m'),
            "Last Probe {:?} in {out}",
            row[4]
        );
    }

    // Server-side apply ownership: while the operator runs, the GitOps tool applies a changed
    // spec; nothing conflicts, the status stays, and the operator's field manager owns only
    // the status.
    desired["spec"]["probe"]["interval"] = json!("3s");
    cluster.kubectl_apply(&ns, &desired);
    let stored = api.get("vm-e2e").await.unwrap();
    assert_eq!(stored.spec.probe.interval, "3s");
    let status = stored.status.as_ref().expect("status kept");
    assert!(
        status
            .conditions
            .iter()
            .any(|c| c.type_ == "Reachable" && c.status == "True"),
        "{status:?}"
    );
    let managed = serde_json::to_value(stored.metadata.managed_fields.unwrap()).unwrap();
    let mut operator_entries = 0;
    for entry in managed.as_array().unwrap() {
        let fields: Vec<&String> = entry["fieldsV1"].as_object().unwrap().keys().collect();
        if entry["manager"] == FIELD_MANAGER {
            operator_entries += 1;
            assert_eq!(entry["subresource"], "status", "{entry}");
            assert_eq!(entry["operation"], "Apply", "{entry}");
            assert_eq!(fields, ["f:status"], "{entry}");
        } else {
            assert!(!fields.contains(&&"f:status".to_string()), "{entry}");
        }
    }
    assert_eq!(operator_entries, 1, "{managed:#}");
    assert!(
        managed
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["manager"] == "kubectl-client-side-apply"),
        "{managed:#}"
    );

    // The VM stops answering: Reachable=False and a BecameUnreachable Event.
    rdp.abort();
    let _ = rdp.await;
    tokio::time::timeout(
        WAIT,
        await_condition(api.clone(), "vm-e2e", |o: Option<&RdpHealth>| {
            o.and_then(|o| o.status.as_ref()).is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "Reachable" && c.status == "False")
            })
        }),
    )
    .await
    .expect("Reachable=False in time")
    .unwrap();
    let event = wait_event(&client, &ns, "vm-e2e", "BecameUnreachable").await;
    assert_eq!(event.type_.as_deref(), Some("Warning"), "{event:?}");

    // The same Events through kubectl (events.k8s.io).
    let events = cluster.kubectl_ok(&["events", "-n", &ns, "--for", "rdphealth/vm-e2e"]);
    assert!(events.contains("BecameUnreachable"), "{events}");
    let listed: Value = serde_json::from_str(&cluster.kubectl_ok(&[
        "get",
        "events.events.k8s.io",
        "-n",
        &ns,
        "-o",
        "json",
    ]))
    .unwrap();
    let reasons: Vec<&str> = listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["reason"].as_str())
        .collect();
    assert!(reasons.contains(&"BecameUnreachable"), "{reasons:?}");
    for e in listed["items"].as_array().unwrap() {
        assert_eq!(e["reportingController"], FIELD_MANAGER, "{e}");
    }

    let _ = stop.send(());
    tokio::time::timeout(WAIT, operator)
        .await
        .expect("operator stopped in time")
        .unwrap()
        .unwrap();
    let _ = Api::<Namespace>::all(client)
        .delete(&ns, &DeleteParams::default())
        .await;
}
