//! The operator as a process (`rdphealth run`) against the local control plane, with the
//! simulator (in this process) as Azure and its VMs' live RDP responders on loopback:
//!
//! - RBAC as shipped: the chart's ServiceAccount, roles and bindings rendered by the real
//!   `helm template` and applied; the operator authenticates with a TokenRequest token of that
//!   ServiceAccount, runs a whole incident (probe, evidence, a rung, Events, Lease) and the API
//!   server's audit log shows no 403 for it, while a request outside its role is denied;
//! - `helm install` of the chart with its default values, and with the ServiceMonitor and
//!   PrometheusRule on after their CRDs are installed;
//! - leader election through a real Lease: the leader is killed (SIGKILL) while its rung's Azure
//!   operation runs, the other process takes the Lease and only polls that operation;
//! - a restart of the API server while a rung runs: watches resume, nothing is repeated.
//!
//! Objects point at the VMs' responders (`spec.endpoint.host: 127.0.0.1`); evidence and rungs
//! still go through the ARM emulator.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{net::SocketAddr, process::Command, time::Duration};

use common::{
    k8s::{self, ControlPlane},
    operator::{self, Operator, control_plane, install_crd, namespace, rdph_api, root},
};
use k8s_openapi::api::{coordination::v1::Lease, events::v1::Event};
use kube::{
    Api, Client,
    api::{DynamicObject, ListParams, PostParams},
};
use rdphealth::sim::{Scenario, Simulator};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(90);
const SUB: &str = "00000000-0000-0000-0000-0000000000aa";
const RELEASE_NS: &str = "rdphealth-system";
const CHART: &str = "charts/rdphealth-operator";

fn scenario(timing: &str, vms: &str) -> Scenario {
    operator::scenario(SUB, timing, vms)
}

/// An `RdpHealth` for simulated VM `vm`, probed at its loopback responder.
fn rdphealth(name: &str, vm: &str, rdp: SocketAddr, remediation: Value) -> DynamicObject {
    operator::rdphealth(SUB, name, vm, rdp, remediation)
}

/// Polls the object's status until `f` holds (a watch would do as well; polling keeps the
/// helper independent of the API server's restarts).
async fn wait_status(
    api: &Api<DynamicObject>,
    name: &str,
    what: &str,
    f: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut last = Value::Null;
    loop {
        if let Ok(obj) = api.get_status(name).await {
            last = obj.data["status"].clone();
            if f(&last) {
                return last;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{name}: {what} not reached; last status {last:#}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn events(client: &Client, ns: &str, name: &str, reason: &str) -> usize {
    let api: Api<Event> = Api::namespaced(client.clone(), ns);
    api.list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .filter(|e| {
            e.reason.as_deref() == Some(reason)
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
        })
        .count()
}

/// What the chart ships for a release with leader election on, rendered by `helm template`.
struct Shipped {
    /// The ServiceAccount (also the Lease's name).
    service_account: String,
    /// The operator container's `RDPHEALTH_*` environment.
    env: Vec<(String, String)>,
}

/// Renders the chart, applies its ServiceAccount, (Cluster)Roles and bindings.
fn apply_chart_rbac(cp: &ControlPlane) -> Shipped {
    let chart = root().join(CHART);
    let render = |template: &str| {
        // A release name of its own: the ClusterRole of `helm install` below is cluster-wide.
        cp.helm(&[
            "template",
            "rbac-test",
            chart.to_str().unwrap(),
            "--namespace",
            RELEASE_NS,
            "--set",
            "leaderElection.enabled=true",
            // The ResetPassword rung's Secret access is opt-in; the scenario runs that rung.
            "--set",
            "remediation.passwordReset.enabled=true",
            "--show-only",
            template,
        ])
    };
    let rendered = format!(
        "{}\n---\n{}",
        render("templates/serviceaccount.yaml"),
        render("templates/rbac.yaml")
    );
    let path = cp.dir().join("chart-rbac.yaml");
    std::fs::write(&path, &rendered).unwrap();
    let applied = cp.kubectl(&[
        "apply",
        "--server-side",
        "-n",
        RELEASE_NS,
        "-f",
        path.to_str().unwrap(),
    ]);
    for kind in [
        "serviceaccount/",
        "clusterrole.rbac.authorization.k8s.io/",
        "clusterrolebinding.rbac.authorization.k8s.io/",
        "role.rbac.authorization.k8s.io/",
        "rolebinding.rbac.authorization.k8s.io/",
    ] {
        assert!(applied.contains(kind), "no {kind} applied:\n{applied}");
    }
    let deployment: Value = serde_saphyr::from_str(&render("templates/deployment.yaml")).unwrap();
    let pod = &deployment["spec"]["template"]["spec"];
    let env = pod["containers"][0]["env"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| {
            Some((
                e["name"].as_str()?.to_string(),
                e["value"].as_str()?.to_string(),
            ))
        })
        .filter(|(k, _)| k.starts_with("RDPHEALTH_"))
        .collect();
    Shipped {
        service_account: pod["serviceAccountName"].as_str().unwrap().to_string(),
        env,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbac_as_shipped_runs_a_whole_incident_without_a_403() {
    let cp = control_plane();
    let admin = cp.client().await;
    namespace(&admin, RELEASE_NS).await;
    namespace(&admin, "fleet-rbac").await;
    let shipped = apply_chart_rbac(cp);
    let sa = shipped.service_account.clone();
    let user = format!("system:serviceaccount:{RELEASE_NS}:{sa}");
    let token = cp.service_account_token(RELEASE_NS, &sa);
    let kubeconfig = cp.kubeconfig_for("operator-sa", &token);

    let sim = Simulator::start(scenario(
        "operation: 300ms, restart: 1s, redeploy: 2s, retryAfter: 200ms",
        "{ name: vm-rdp, nic: { subnet: vnet/s }, faults: [rdp_disabled], vmAccessExtension: enablevmAccess }
          - { name: vm-hung, nic: { subnet: vnet/s }, faults: [guest_hung] }",
    ))
    .await
    .unwrap();
    let rdp = sim.vm("vm-rdp").unwrap().rdp;
    let api = rdph_api(&admin, "fleet-rbac");
    api.create(
        &PostParams::default(),
        &rdphealth(
            "rdp",
            "vm-rdp",
            rdp,
            json!({"mode": "Auto", "settleTime": "1s", "backoff": {"initial": "1s", "max": "2s"}}),
        ),
    )
    .await
    .unwrap();
    // A second incident whose ladder resets the password: the Secret under the chart's role.
    api.create(
        &PostParams::default(),
        &rdphealth(
            "hung",
            "vm-hung",
            sim.vm("vm-hung").unwrap().rdp,
            json!({
                "mode": "Auto", "ladder": ["ResetPassword", "Restart"],
                "allowedDisruptiveActions": ["ResetPassword", "Restart"],
                "passwordReset": {"username": "rdpadmin", "secretName": "vm-hung-admin"},
                "settleTime": "1s", "backoff": {"initial": "1s", "max": "2s"},
            }),
        ),
    )
    .await
    .unwrap();

    // The Deployment's environment, except where the process runs: loopback metrics, the
    // simulator as Azure, this test's identity.
    // Its own namespace only: the tests share one control plane, and an operator watching
    // every namespace would probe the other tests' VMs (their outages trip its fleet-wide
    // breaker, which then holds this test's rungs) and write their statuses. The chart's
    // ClusterRole still authorizes every request it makes.
    let mut op = Operator::start(
        cp,
        &kubeconfig,
        &sim,
        "op-rbac",
        &["--namespace", "fleet-rbac"],
        &shipped.env,
    );
    op.wait_ready().await;

    // Probe, evidence, the rung, recovery.
    let s = wait_status(&api, "rdp", "evidence", |s| s["diagnosis"].is_object()).await;
    assert_eq!(s["diagnosis"]["agentReady"], true, "{s:#}");
    let s = wait_status(&api, "rdp", "phase Recovered", |s| {
        s["phase"] == "Recovered"
    })
    .await;
    assert_eq!(
        s["ladder"]["recoveredBy"]["rung"], "ResetRdpConfig",
        "{s:#}"
    );
    for reason in [
        "BecameUnreachable",
        "RemediationStarted",
        "RemediationSucceeded",
    ] {
        let deadline = tokio::time::Instant::now() + WAIT;
        while events(&admin, "fleet-rbac", "rdp", reason).await == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no {reason} Event:\n{}",
                op.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // The password reset: its Secret was created by the operator and holds what Azure applied.
    let s = wait_status(&api, "hung", "phase Recovered", |s| {
        s["phase"] == "Recovered"
    })
    .await;
    assert_eq!(s["ladder"]["recoveredBy"]["rung"], "Restart", "{s:#}");
    assert_eq!(sim.vm("vm-hung").unwrap().password_resets, 1);
    // VMAccess twice: the RDP configuration reset and the password reset, once each.
    assert_eq!(sim.count("extension.put"), 2);
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(admin.clone(), "fleet-rbac");
    let secret = secrets.get("vm-hung-admin").await.unwrap();
    let labels = secret.metadata.labels.clone().unwrap_or_default();
    assert_eq!(
        labels
            .get("app.kubernetes.io/managed-by")
            .map(String::as_str),
        Some("rdphealth-operator"),
        "{:?}",
        secret.metadata
    );
    let annotations = secret.metadata.annotations.clone().unwrap_or_default();
    assert_eq!(
        annotations
            .get("rdphealth.io/password-state")
            .map(String::as_str),
        Some("applied")
    );
    let data = secret.data.clone().unwrap_or_default();
    let password = String::from_utf8(data["password"].0.clone()).unwrap();
    use sha2::Digest;
    let digest: String = sha2::Sha256::digest(password.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(sim.vm("vm-hung").unwrap().password_sha256, Some(digest));

    let lease: Api<Lease> = Api::namespaced(admin.clone(), RELEASE_NS);
    let lease = lease.get(&sa).await.unwrap();
    assert_eq!(
        lease.spec.unwrap().holder_identity.as_deref(),
        Some("op-rbac")
    );

    // Everything it did was allowed, and it did authenticate as the ServiceAccount.
    let audit = cp.audit(&user);
    let verbs: std::collections::BTreeSet<String> = audit
        .iter()
        .map(|e| {
            format!(
                "{} {}",
                e["verb"].as_str().unwrap_or(""),
                e["objectRef"]["resource"].as_str().unwrap_or("")
            )
        })
        .collect();
    for needed in [
        "watch rdphealths",
        "patch rdphealths",
        "create events",
        "get leases",
        "create secrets",
        "get secrets",
        "patch secrets",
    ] {
        assert!(verbs.contains(needed), "no {needed:?} in {verbs:?}");
    }
    let denied: Vec<&Value> = audit
        .iter()
        .filter(|e| e["responseStatus"]["code"] == 403)
        .collect();
    assert!(denied.is_empty(), "403s for the operator: {denied:#?}");

    // A request outside its role is denied by the server (and would show in the audit log).
    let out = Command::new(cp.tool("kubectl"))
        .env("KUBECONFIG", &kubeconfig)
        .args(["get", "secrets", "-n", "kube-system"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Forbidden"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let forbidden = cp
        .audit(&user)
        .iter()
        .filter(|e| e["responseStatus"]["code"] == 403)
        .count();
    assert_eq!(forbidden, 1, "the denied request is in the audit log");

    drop(op);
    sim.shutdown().await;
}

#[test]
fn helm_install_with_default_values() {
    let cp = control_plane();
    let chart = root().join(CHART);
    let out = cp.helm(&[
        "install",
        "rdphealth-operator",
        chart.to_str().unwrap(),
        "--namespace",
        "rdphealth-helm",
        "--create-namespace",
    ]);
    assert!(out.contains("STATUS: deployed"), "{out}");
    let objects = cp.kubectl(&[
        "get",
        "deployment,serviceaccount,service,role,rolebinding",
        "-n",
        "rdphealth-helm",
        "-l",
        "app.kubernetes.io/instance=rdphealth-operator",
        "-o",
        "name",
    ]);
    for want in [
        "deployment.apps/rdphealth-operator",
        "serviceaccount/rdphealth-operator",
        "service/rdphealth-operator",
    ] {
        assert!(objects.contains(want), "{want} missing:\n{objects}");
    }
    let cluster = cp.kubectl(&[
        "get",
        "clusterrole,clusterrolebinding",
        "-l",
        "app.kubernetes.io/instance=rdphealth-operator",
        "-o",
        "name",
    ]);
    assert!(
        cluster.contains("clusterrole.rbac.authorization.k8s.io/rdphealth-operator"),
        "{cluster}"
    );
    let status = cp.helm(&["status", "rdphealth-operator", "-n", "rdphealth-helm"]);
    assert!(status.contains("STATUS: deployed"), "{status}");
}

/// With the ServiceMonitor and PrometheusRule turned on, after their CRDs (generated from
/// prometheus-operator's API types) are installed: the server accepts both objects.
#[test]
fn helm_install_with_service_monitor_and_prometheus_rule() {
    let cp = control_plane();
    for crd in k8s::monitoring_crds() {
        cp.kubectl(&["apply", "--server-side", "-f", crd.to_str().unwrap()]);
    }
    for name in [
        "servicemonitors.monitoring.coreos.com",
        "prometheusrules.monitoring.coreos.com",
    ] {
        cp.wait_established(name);
    }
    let chart = root().join(CHART);
    let out = cp.helm(&[
        "install",
        "monitoring",
        chart.to_str().unwrap(),
        "--namespace",
        "rdphealth-monitoring",
        "--create-namespace",
        "--set",
        "serviceMonitor.enabled=true",
        "--set",
        "prometheusRule.enabled=true",
    ]);
    assert!(out.contains("STATUS: deployed"), "{out}");
    let objects = cp.kubectl(&[
        "get",
        "servicemonitors.monitoring.coreos.com,prometheusrules.monitoring.coreos.com",
        "-n",
        "rdphealth-monitoring",
        "-o",
        "name",
    ]);
    assert!(
        objects.contains("servicemonitor.monitoring.coreos.com/"),
        "{objects}"
    );
    assert!(
        objects.contains("prometheusrule.monitoring.coreos.com/"),
        "{objects}"
    );
    let rule: Value = serde_json::from_str(&cp.kubectl(&[
        "get",
        "prometheusrules.monitoring.coreos.com",
        "-n",
        "rdphealth-monitoring",
        "-o",
        "json",
    ]))
    .unwrap();
    let groups = rule["items"][0]["spec"]["groups"].as_array().unwrap();
    assert!(
        groups
            .iter()
            .any(|g| !g["rules"].as_array().unwrap().is_empty()),
        "{rule}"
    );
}

/// Two operator processes (`op-a`, then `op-b`) electing a leader over Lease `lease` in `ns`
/// with a 3 s lease; returns once `op-a` holds it and both are ready.
async fn two_replicas(
    cp: &ControlPlane,
    admin: &Client,
    sim: &Simulator,
    ns: &str,
    lease: &str,
) -> (Operator, Operator, Api<Lease>) {
    let args = [
        "--namespace",
        ns,
        "--leader-election",
        "--lease-namespace",
        ns,
        "--lease-name",
        lease,
        "--lease-duration-seconds",
        "3",
    ];
    let mut a = Operator::start(cp, &cp.kubeconfig, sim, "op-a", &args, &[]);
    a.wait_ready().await;
    let leases: Api<Lease> = Api::namespaced(admin.clone(), ns);
    let deadline = tokio::time::Instant::now() + WAIT;
    while lease_holder(&leases, lease).await.as_deref() != Some("op-a") {
        assert!(tokio::time::Instant::now() < deadline, "op-a never led");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut b = Operator::start(cp, &cp.kubeconfig, sim, "op-b", &args, &[]);
    b.wait_ready().await;
    (a, b, leases)
}

/// The Lease's holder.
async fn lease_holder(leases: &Api<Lease>, name: &str) -> Option<String> {
    leases
        .get_opt(name)
        .await
        .unwrap()
        .and_then(|l| l.spec)
        .and_then(|s| s.holder_identity)
}

/// Two operator processes share a real Lease. The leader is killed with SIGKILL while its
/// Redeploy runs in Azure (intent stored, operation not finished); the other takes the Lease,
/// polls that operation to its end, and the simulator saw exactly one redeploy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_leader_mid_rung_the_other_resumes_without_a_second_redeploy() {
    let cp = control_plane();
    let admin = cp.client().await;
    namespace(&admin, "fleet-lease").await;
    let sim = Simulator::start(scenario(
        "operation: 300ms, restart: 1s, redeploy: 10s, retryAfter: 200ms",
        "{ name: vm-host, nic: { subnet: vnet/s }, faults: [host_failure] }",
    ))
    .await
    .unwrap();
    let rdp = sim.vm("vm-host").unwrap().rdp;
    let api = rdph_api(&admin, "fleet-lease");
    let (mut a, b, leases) =
        two_replicas(cp, &admin, &sim, "fleet-lease", "rdphealth-lease-test").await;
    let holder = || lease_holder(&leases, "rdphealth-lease-test");

    api.create(
        &PostParams::default(),
        &rdphealth(
            "host",
            "vm-host",
            rdp,
            json!({
                "mode": "Auto", "ladder": ["Redeploy"], "allowedDisruptiveActions": ["Redeploy"],
                "settleTime": "1s", "backoff": {"initial": "1s", "max": "2s"},
            }),
        ),
    )
    .await
    .unwrap();
    let s = wait_status(&api, "host", "a running redeploy", |s| {
        s["ladder"]["current"]["phase"] == "Running"
    })
    .await;
    assert_eq!(s["ladder"]["current"]["step"]["rung"], "Redeploy", "{s:#}");
    assert_eq!(sim.count("vm.redeploy"), 1);
    a.process.signal("KILL");

    let deadline = tokio::time::Instant::now() + WAIT;
    while holder().await.as_deref() != Some("op-b") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "op-b never took the lease:\n{}",
            b.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let s = wait_status(&api, "host", "phase Recovered", |s| {
        s["phase"] == "Recovered"
    })
    .await;
    assert_eq!(s["ladder"]["recoveredBy"]["rung"], "Redeploy", "{s:#}");
    assert_eq!(sim.count("vm.redeploy"), 1, "redeployed twice");
    assert_eq!(sim.count("vm.restart"), 0);
    let history = s["ladder"]["history"].as_array().unwrap();
    assert_eq!(history.len(), 1, "{s:#}");
    assert!(a.process.exited().is_some());
    drop(b);
    sim.shutdown().await;
}

/// The API server is restarted while a rung's operation runs: the operator's watches and
/// writes resume, the rung is not repeated, and an object created after the restart is seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_server_restart_mid_rung_loses_and_repeats_nothing() {
    // A control plane of its own: the others keep theirs while this one restarts.
    let cp = ControlPlane::start();
    install_crd(&cp);
    let admin = cp.client().await;
    namespace(&admin, "fleet-restart").await;
    let sim = Simulator::start(scenario(
        "operation: 8s, restart: 1s, redeploy: 2s, retryAfter: 200ms",
        "{ name: vm-rdp, nic: { subnet: vnet/s }, faults: [rdp_disabled], vmAccessExtension: enablevmAccess }",
    ))
    .await
    .unwrap();
    let rdp = sim.vm("vm-rdp").unwrap().rdp;
    let api = rdph_api(&admin, "fleet-restart");
    let mut op = Operator::start(
        &cp,
        &cp.kubeconfig,
        &sim,
        "op-restart",
        &["--namespace", "fleet-restart"],
        &[],
    );
    op.wait_ready().await;
    api.create(
        &PostParams::default(),
        &rdphealth(
            "rdp",
            "vm-rdp",
            rdp,
            json!({"mode": "Auto", "settleTime": "1s", "backoff": {"initial": "1s", "max": "2s"}}),
        ),
    )
    .await
    .unwrap();
    wait_status(&api, "rdp", "a running rung", |s| {
        s["ladder"]["current"]["phase"] == "Running"
    })
    .await;
    assert_eq!(sim.count("extension.put"), 1);

    cp.restart_apiserver();

    // `Recovered` is a phase of one probe (the next one makes it `Healthy`), so the test may
    // see either: the credit in `ladder.recoveredBy` is what stays.
    let s = wait_status(&api, "rdp", "the recovery credited", |s| {
        s["ladder"]["recoveredBy"].is_object()
            && (s["phase"] == "Recovered" || s["phase"] == "Healthy")
    })
    .await;
    assert_eq!(
        s["ladder"]["recoveredBy"]["rung"], "ResetRdpConfig",
        "{s:#}"
    );
    assert_eq!(sim.count("extension.put"), 1, "the rung ran twice");
    assert!(op.process.exited().is_none(), "{}", op.log_text());

    // The watch resumed: a new object is probed and reported.
    let healthy = sim
        .vms()
        .into_iter()
        .find(|v| v.name == "vm-rdp")
        .unwrap()
        .rdp;
    api.create(
        &PostParams::default(),
        &rdphealth("after", "vm-rdp", healthy, json!({"mode": "Observe"})),
    )
    .await
    .unwrap();
    wait_status(&api, "after", "a probe result", |s| {
        s["conditions"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c["type"] == "Reachable"))
    })
    .await;
    drop(op);
    sim.shutdown().await;
}

/// Two operator processes share a real Lease. The leader is stopped (SIGSTOP) in the middle of
/// a reconcile that is gathering the evidence for a rung (an Azure read held back), stays
/// stopped past its renew deadline while the other replica takes the Lease and restarts the VM,
/// then resumes (SIGCONT) with its reconcile's stale picture. It must not act on it: exactly one
/// restart in the simulator's counters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_stopped_past_its_renew_deadline_makes_no_azure_write() {
    let cp = control_plane();
    let admin = cp.client().await;
    namespace(&admin, "fleet-stopped").await;
    let sim = Simulator::start(scenario(
        "operation: 300ms, restart: 1s, redeploy: 2s, retryAfter: 200ms",
        "{ name: vm-hung, nic: { subnet: vnet/s }, faults: [guest_hung] }",
    ))
    .await
    .unwrap();
    let rdp = sim.vm("vm-hung").unwrap().rdp;
    let api = rdph_api(&admin, "fleet-stopped");
    let (mut a, b, leases) =
        two_replicas(cp, &admin, &sim, "fleet-stopped", "rdphealth-stop-test").await;
    let holder = || lease_holder(&leases, "rdphealth-stop-test");

    // The leader's Resource Health read during evidence gathering is answered late.
    sim.drop_next_response("health.get", Duration::from_secs(2));
    api.create(
        &PostParams::default(),
        &rdphealth(
            "hung",
            "vm-hung",
            rdp,
            json!({
                "mode": "Auto", "ladder": ["Restart"], "allowedDisruptiveActions": ["Restart"],
                "settleTime": "1s", "backoff": {"initial": "1s", "max": "2s"},
            }),
        ),
    )
    .await
    .unwrap();
    let deadline = tokio::time::Instant::now() + WAIT;
    while sim.count("dropped_response") == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the leader never gathered evidence:\n{}",
            a.log_text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    a.process.signal("STOP");
    assert_eq!(
        sim.count("vm.restart"),
        0,
        "the leader acted before it stopped"
    );

    let deadline = tokio::time::Instant::now() + WAIT;
    while holder().await.as_deref() != Some("op-b") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "op-b never took the lease:\n{}",
            b.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let s = wait_status(&api, "hung", "recovered by op-b's restart", |s| {
        s["ladder"]["recoveredBy"]["rung"] == "Restart"
    })
    .await;
    assert_eq!(
        s["ladder"]["history"][0]["step"]["rung"], "Restart",
        "{s:#}"
    );
    assert_eq!(sim.count("vm.restart"), 1);

    // The stopped leader resumes with a reconcile that was about to decide on stale evidence.
    a.process.signal("CONT");
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(
        sim.count("vm.restart"),
        1,
        "the resumed replica restarted the VM again:\n{}",
        a.log_text()
    );
    assert_eq!(holder().await.as_deref(), Some("op-b"));
    assert!(
        a.process.exited().is_none(),
        "op-a keeps running as a standby"
    );
    drop(a);
    drop(b);
    sim.shutdown().await;
}
