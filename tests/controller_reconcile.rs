//! Reconcile against a mocked API server (tower-test): each scenario asserts the exact API
//! calls one reconcile makes (status patch body, events) and nothing more.

// Test helpers outside `#[test]` functions may panic on broken fixtures.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use http::{Method, Request, Response, StatusCode};
use k8s_openapi::jiff::Timestamp;
use kube::{Client, client::Body, core::DeserializeGuard};
use rdphealth::{
    api::RdpHealth,
    controller::{Action, Context, Error, Leadership, Seams, error_policy, reconcile},
    engine::{HostOverride, writes},
    metrics::Metrics,
    probe::{
        BoxFuture, Failure, FailureReason, Layers, ProbeOptions, ProbeReport, Prober,
        SecurityProtocol, Target,
    },
};
use serde_json::{Value, json};
use tower_test::mock::{self, Handle};

type ApiHandle = Handle<Request<Body>, Response<Body>>;

/// A prober that replays scripted reports and records what it was asked.
#[derive(Default)]
struct FakeProber {
    reports: Mutex<VecDeque<ProbeReport>>,
    calls: AtomicUsize,
    targets: Mutex<Vec<(Target, ProbeOptions)>>,
}

impl FakeProber {
    fn with(reports: Vec<ProbeReport>) -> Arc<Self> {
        Arc::new(Self {
            reports: Mutex::new(reports.into()),
            ..Default::default()
        })
    }
}

impl Prober for FakeProber {
    fn probe<'a>(
        &'a self,
        target: &'a Target,
        opts: &'a ProbeOptions,
    ) -> BoxFuture<'a, ProbeReport> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.targets
            .lock()
            .unwrap()
            .push((target.clone(), opts.clone()));
        let report = self
            .reports
            .lock()
            .unwrap()
            .pop_front()
            .expect("unexpected probe");
        Box::pin(async move { report })
    }
}

fn reachable() -> ProbeReport {
    ProbeReport {
        target: "10.0.0.4:3389".into(),
        reachable: true,
        failure: None,
        layers: Layers::default(),
        selected_protocol: Some(SecurityProtocol::Rdp),
        tls: None,
        nla: None,
        findings: vec![],
        likely_causes: vec![],
        total_ms: 3.0,
    }
}

fn refused() -> ProbeReport {
    ProbeReport {
        reachable: false,
        failure: Some(Failure::new(FailureReason::TcpRefused, "connect refused")),
        selected_protocol: None,
        ..reachable()
    }
}

const VM: &str = "/subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/rg-1/providers/Microsoft.Compute/virtualMachines/vm-1";

fn object(spec: Value, status: Option<Value>) -> RdpHealth {
    let mut obj = json!({
        "apiVersion": "rdphealth.io/v1alpha1",
        "kind": "RdpHealth",
        "metadata": {"name": "vm-1", "namespace": "default", "uid": "uid-1", "generation": 2, "resourceVersion": "10"},
        "spec": spec,
    });
    if let Some(status) = status {
        obj["status"] = status;
    }
    serde_json::from_value(obj).unwrap()
}

fn spec() -> Value {
    json!({"vm": {"resourceId": VM}, "endpoint": {"host": "10.0.0.4"}})
}

fn setup(prober: Arc<FakeProber>) -> (Arc<Context>, ApiHandle) {
    setup_with(prober, |ctx| ctx)
}

fn setup_with(
    prober: Arc<FakeProber>,
    edit: impl FnOnce(Context) -> Context,
) -> (Arc<Context>, ApiHandle) {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let seams = Seams {
        prober,
        resolver: Arc::new(HostOverride),
        azure: None,
        identities: None,
        graph: None,
    };
    let metrics = Arc::new(Metrics::new().unwrap());
    let ctx = Context::new(
        client,
        seams,
        metrics,
        Leadership::always(),
        Some("test".into()),
    );
    (Arc::new(edit(ctx)), handle)
}

/// Expects one request; returns (method, path+query, JSON body) and answers with `reply`.
async fn expect_call(
    handle: &mut ApiHandle,
    status: StatusCode,
    reply: Value,
) -> (Method, String, Value) {
    let (request, send) = tokio::time::timeout(Duration::from_secs(1), handle.next_request())
        .await
        .expect("timed out waiting for an API call")
        .expect("service dropped");
    let method = request.method().clone();
    let uri = request.uri().to_string();
    let bytes = request.into_body().collect_bytes().await.unwrap();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    send.send_response(
        Response::builder()
            .status(status)
            .body(Body::from(serde_json::to_vec(&reply).unwrap()))
            .unwrap(),
    );
    (method, uri, body)
}

async fn run(ctx: &Arc<Context>, obj: RdpHealth) -> Result<Action, Error> {
    reconcile(Arc::new(DeserializeGuard(Ok(obj))), Arc::clone(ctx)).await
}

fn status_path() -> &'static str {
    "/apis/rdphealth.io/v1alpha1/namespaces/default/rdphealths/vm-1/status?&force=true&fieldManager=rdphealth-operator"
}

fn condition<'a>(status: &'a Value, type_: &str) -> &'a Value {
    status["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == type_)
        .unwrap()
}

#[tokio::test]
async fn first_probe_writes_status_by_server_side_apply_and_no_event() {
    let prober = FakeProber::with(vec![reachable()]);
    let (ctx, mut api) = setup(prober.clone());
    let obj = object(spec(), None);
    let reply = serde_json::to_value(&obj).unwrap();
    let verifier = tokio::spawn(async move {
        let (method, uri, body) = expect_call(&mut api, StatusCode::OK, reply).await;
        assert_eq!(method, Method::PATCH);
        assert_eq!(uri, status_path());
        assert_eq!(body["apiVersion"], "rdphealth.io/v1alpha1");
        assert_eq!(body["kind"], "RdpHealth");
        let status = &body["status"];
        assert_eq!(status["observedGeneration"], 2);
        assert_eq!(status["phase"], "Healthy");
        assert_eq!(status["consecutiveSuccesses"], 1);
        assert_eq!(status["consecutiveFailures"], 0);
        assert_eq!(status["lastProbe"]["reachable"], true);
        assert_eq!(status["lastProbe"]["selectedProtocol"], "rdp");
        assert_eq!(status["lastProbe"]["latencyMs"], 3);
        assert_eq!(
            status["endpoint"],
            json!({"host": "10.0.0.4", "port": 3389, "source": "Spec"})
        );
        let reach = condition(status, "Reachable");
        assert_eq!(reach["status"], "True");
        assert_eq!(reach["reason"], "Reachable");
        assert_eq!(reach["observedGeneration"], 2);
        assert_eq!(condition(status, "Valid")["status"], "True");
        assert_eq!(condition(status, "Healthy")["status"], "True");
        assert_eq!(condition(status, "CertificateValid")["reason"], "NoTls");
        // Radio silence afterwards: no event for a first success.
        assert!(
            tokio::time::timeout(Duration::from_millis(100), api.next_request())
                .await
                .is_err(),
            "unexpected extra API call"
        );
    });
    let action = run(&ctx, obj).await.unwrap();
    verifier.await.unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(30)));
    let targets = prober.targets.lock().unwrap();
    assert_eq!(targets[0].0.host, "10.0.0.4");
    assert_eq!(targets[0].0.port, 3389);
    assert_eq!(targets[0].1.timeout, Duration::from_secs(5));
}

#[tokio::test]
async fn third_failure_patches_status_then_publishes_one_warning_event() {
    let prober = FakeProber::with(vec![refused()]);
    let (ctx, mut api) = setup(prober);
    let since = "2026-01-01T00:00:00Z";
    let obj = object(
        spec(),
        Some(json!({
            "observedGeneration": 2,
            "phase": "Degraded",
            "consecutiveFailures": 2,
            "lastProbe": {"time": "2026-01-01T00:00:00.000000Z", "reachable": false, "latencyMs": 1, "failureReason": "tcp_refused"},
            "conditions": [
                {"type": "Reachable", "status": "True", "reason": "Reachable", "message": "", "lastTransitionTime": since},
            ],
        })),
    );
    let reply = serde_json::to_value(&obj).unwrap();
    let verifier = tokio::spawn(async move {
        let (method, uri, body) = expect_call(&mut api, StatusCode::OK, reply).await;
        assert_eq!((method, uri.as_str()), (Method::PATCH, status_path()));
        let status = &body["status"];
        assert_eq!(status["phase"], "Unreachable");
        assert_eq!(status["consecutiveFailures"], 3);
        assert_eq!(status["lastProbe"]["failureReason"], "tcp_refused");
        let reach = condition(status, "Reachable");
        assert_eq!(reach["status"], "False");
        assert_eq!(reach["reason"], "TcpRefused");
        assert_ne!(
            reach["lastTransitionTime"], since,
            "the flip moves the time"
        );
        assert_eq!(
            status["lastTransitionToUnreachable"],
            reach["lastTransitionTime"]
        );

        let (method, uri, event) = expect_call(&mut api, StatusCode::CREATED, json!({})).await;
        assert_eq!(method, Method::POST);
        assert_eq!(uri, "/apis/events.k8s.io/v1/namespaces/default/events?");
        assert_eq!(event["type"], "Warning");
        assert_eq!(event["reason"], "BecameUnreachable");
        assert_eq!(event["action"], "Probe");
        assert_eq!(event["reportingController"], "rdphealth-operator");
        assert_eq!(event["regarding"]["kind"], "RdpHealth");
        assert_eq!(event["regarding"]["name"], "vm-1");
        assert_eq!(
            event["note"],
            "10.0.0.4:3389 is unreachable after 3 failed probes: tcp_refused: connect refused"
        );
        assert!(
            tokio::time::timeout(Duration::from_millis(100), api.next_request())
                .await
                .is_err(),
            "unexpected extra API call"
        );
    });
    let action = run(&ctx, obj).await.unwrap();
    verifier.await.unwrap();
    assert_eq!(action, Action::requeue(Duration::from_secs(10)));
}

#[tokio::test]
async fn own_status_write_does_not_trigger_a_probe() {
    let prober = FakeProber::with(vec![]);
    let (ctx, mut api) = setup(prober.clone());
    let now = Timestamp::now().to_string();
    let obj = object(
        spec(),
        Some(json!({
            "observedGeneration": 2,
            "phase": "Healthy",
            "lastProbe": {"time": now, "reachable": true, "latencyMs": 1},
            "conditions": [
                {"type": "Reachable", "status": "True", "reason": "Reachable", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"},
            ],
        })),
    );
    let action = run(&ctx, obj).await.unwrap();
    assert_eq!(prober.calls.load(Ordering::SeqCst), 0);
    assert!(
        tokio::time::timeout(Duration::from_millis(50), api.next_request())
            .await
            .is_err(),
        "no API call expected"
    );
    assert_ne!(action, Action::await_change());
}

#[tokio::test]
async fn invalid_spec_reports_once_and_waits_for_a_change() {
    let prober = FakeProber::with(vec![]);
    let (ctx, mut api) = setup(prober.clone());
    let mut bad = spec();
    bad["probe"] = json!({"interval": "5s", "timeout": "5s"});
    let obj = object(bad, None);
    let reply = serde_json::to_value(&obj).unwrap();
    let verifier = tokio::spawn(async move {
        let (_, uri, body) = expect_call(&mut api, StatusCode::OK, reply).await;
        assert_eq!(uri, status_path());
        assert_eq!(body["status"]["phase"], "Invalid");
        let valid = condition(&body["status"], "Valid");
        assert_eq!(valid["status"], "False");
        assert_eq!(valid["reason"], "InvalidSpec");
        assert_eq!(
            valid["message"],
            "probe.timeout (5s) must be shorter than probe.interval (5s)"
        );
        let (_, _, event) = expect_call(&mut api, StatusCode::CREATED, json!({})).await;
        assert_eq!(event["reason"], "InvalidSpec");
        assert_eq!(event["type"], "Warning");
    });
    let action = run(&ctx, obj).await.unwrap();
    verifier.await.unwrap();
    assert_eq!(action, Action::await_change());
    assert_eq!(prober.calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn missing_host_is_reported_not_probed() {
    let prober = FakeProber::with(vec![]);
    let (ctx, mut api) = setup(prober.clone());
    let obj = object(json!({"vm": {"resourceId": VM}}), None);
    let reply = serde_json::to_value(&obj).unwrap();
    let verifier = tokio::spawn(async move {
        let (_, _, body) = expect_call(&mut api, StatusCode::OK, reply).await;
        let reach = condition(&body["status"], "Reachable");
        assert_eq!(reach["status"], "Unknown");
        assert_eq!(reach["reason"], "EndpointUnresolved");
        assert_eq!(
            reach["message"],
            "spec.endpoint.host is required: the operator runs without Azure credentials, so it cannot look up the VM's address (observe-only)"
        );
        assert_eq!(body["status"]["phase"], "Pending");
    });
    let action = run(&ctx, obj).await.unwrap();
    verifier.await.unwrap();
    assert_eq!(action, Action::await_change());
    assert_eq!(prober.calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn failed_status_patch_backs_off_exponentially_per_object() {
    let prober = FakeProber::with(vec![reachable(), reachable(), reachable()]);
    let (ctx, mut api) = setup(prober);
    let obj = object(spec(), None);
    let failure = json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": "boom", "reason": "InternalError", "code": 500});
    let answers = tokio::spawn(async move {
        for _ in 0..3 {
            expect_call(&mut api, StatusCode::INTERNAL_SERVER_ERROR, failure.clone()).await;
        }
    });
    let mut delays = Vec::new();
    for _ in 0..3 {
        let guard = Arc::new(DeserializeGuard(Ok(obj.clone())));
        let err = reconcile(Arc::clone(&guard), Arc::clone(&ctx))
            .await
            .unwrap_err();
        assert_eq!(err.reason(), "PatchStatusFailed");
        delays.push(error_policy(guard, &err, Arc::clone(&ctx)));
    }
    answers.await.unwrap();
    assert_eq!(
        delays,
        [1, 2, 4].map(|s| Action::requeue(Duration::from_secs(s)))
    );
    let text = ctx.metrics().render().unwrap();
    assert!(
        text.contains(r#"rdphealth_reconcile_errors_total{reason="PatchStatusFailed"} 3"#),
        "{text}"
    );
}

#[tokio::test]
async fn malformed_object_is_evented_and_waits_for_a_change() {
    let (ctx, mut api) = setup(FakeProber::with(vec![]));
    let raw = json!({
        "apiVersion": "rdphealth.io/v1alpha1",
        "kind": "RdpHealth",
        "metadata": {"name": "broken", "namespace": "default"},
        "spec": {"vm": "not an object"},
    });
    let guard: DeserializeGuard<RdpHealth> = serde_json::from_value(raw).unwrap();
    let guard = Arc::new(guard);
    let verifier = tokio::spawn(async move {
        let (method, uri, event) = expect_call(&mut api, StatusCode::CREATED, json!({})).await;
        assert_eq!(method, Method::POST);
        assert_eq!(uri, "/apis/events.k8s.io/v1/namespaces/default/events?");
        assert_eq!(event["type"], "Warning");
        assert_eq!(event["reason"], "MalformedObject");
        assert_eq!(event["regarding"]["name"], "broken");
        assert_eq!(event["regarding"]["kind"], "RdpHealth");
        assert!(
            event["note"]
                .as_str()
                .unwrap()
                .starts_with("failed to decode the object: "),
            "{event}"
        );
        // No status write: there is no readable status to build on.
        assert!(
            tokio::time::timeout(Duration::from_millis(100), api.next_request())
                .await
                .is_err(),
            "unexpected extra API call"
        );
    });
    let err = reconcile(Arc::clone(&guard), Arc::clone(&ctx))
        .await
        .unwrap_err();
    verifier.await.unwrap();
    assert_eq!(err.reason(), "MalformedObject");
    assert_eq!(error_policy(guard, &err, ctx), Action::await_change());
}

/// Azure throttles the evidence read: the probe's result is stored, and the retry waits for
/// Azure's `Retry-After` instead of backing off exponentially.
#[tokio::test]
async fn throttled_evidence_retries_after_retry_after() {
    use rdphealth::{
        azure::{ArmClient, ArmConfig, Azure, CountedAzure, StaticToken},
        ladder::fleet::FleetPolicy,
        sim::{HttpFault, Scenario, Simulator},
    };
    let sim = Simulator::start(
        Scenario::from_yaml(
            r#"
subscriptions:
  - id: 00000000-0000-0000-0000-000000000001
    resourceGroups:
      - name: rg-1
        location: westeurope
        virtualNetworks:
          - { name: vnet, addressPrefix: 10.0.0.0/16, subnets: [ { name: s, addressPrefix: 10.0.0.0/24 } ] }
        vms:
          - { name: vm-1, nic: { subnet: vnet/s } }
"#,
        )
        .unwrap(),
    )
    .await
    .unwrap();
    sim.inject_http_fault(HttpFault {
        operation: "vm.get".into(),
        status: 429,
        retry_after: Some(7),
        count: 5,
        code: None,
    });
    let client: Arc<dyn Azure> = Arc::new(ArmClient::new(
        ArmConfig::new(sim.arm_url().parse().unwrap()),
        Arc::new(StaticToken::new("t")),
    ));
    let (service, mut api) = mock::pair::<Request<Body>, Response<Body>>();
    let seams = Seams {
        prober: FakeProber::with(vec![refused()]),
        resolver: Arc::new(HostOverride),
        azure: Some(Arc::new(CountedAzure::new(client).unwrap())),
        identities: None,
        graph: None,
    };
    let ctx = Arc::new(
        Context::new(
            Client::new(service, "default"),
            seams,
            Arc::new(Metrics::new().unwrap()),
            Leadership::always(),
            None,
        )
        .with_remediation(FleetPolicy::default(), None),
    );
    // Already unreachable: the incident opens and evidence is due.
    let status = json!({
        "observedGeneration": 2,
        "phase": "Unreachable",
        "consecutiveFailures": 3,
        "conditions": [{"type": "Reachable", "status": "False", "reason": "TcpRefused", "message": "",
                        "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 2}],
        "lastProbe": {"time": "2026-01-01T00:00:00.000000Z", "reachable": false, "latencyMs": 1},
    });
    let mut spec = spec();
    spec["remediation"] = json!({"mode": "Auto"});
    let obj = object(spec, Some(status));
    let reply = serde_json::to_value(&obj).unwrap();
    let verifier = tokio::spawn(async move {
        let (method, uri, body) = expect_call(&mut api, StatusCode::OK, reply).await;
        assert_eq!(method, Method::PATCH);
        assert_eq!(uri, status_path());
        assert_eq!(body["status"]["consecutiveFailures"], 4);
    });
    let guard = Arc::new(DeserializeGuard(Ok(obj)));
    let err = reconcile(Arc::clone(&guard), Arc::clone(&ctx))
        .await
        .unwrap_err();
    verifier.await.unwrap();
    assert_eq!(err.reason(), "Throttled");
    for _ in 0..3 {
        assert_eq!(
            error_policy(Arc::clone(&guard), &err, Arc::clone(&ctx)),
            Action::requeue(Duration::from_secs(7))
        );
    }
    let text = ctx.metrics().render().unwrap();
    assert!(
        text.contains(r#"rdphealth_reconcile_errors_total{reason="Throttled"} 3"#),
        "{text}"
    );
    sim.shutdown().await;
}

/// The status a first probe of `report` writes, as the API server would store it.
async fn first_status(report: ProbeReport) -> Value {
    let (ctx, mut api) = setup(FakeProber::with(vec![report]));
    let obj = object(spec(), None);
    let reply = serde_json::to_value(&obj).unwrap();
    let verifier =
        tokio::spawn(async move { expect_call(&mut api, StatusCode::OK, reply).await.2 });
    run(&ctx, obj).await.unwrap();
    verifier.await.unwrap()["status"].clone()
}

/// `status` with its last probe `ago` before now.
fn probed_ago(mut status: Value, ago: Duration) -> Value {
    let at = Timestamp::now().checked_sub(ago).unwrap();
    status["lastProbe"]["time"] = json!(at.to_string());
    status
}

/// Runs a reconcile that must not call the API: nothing answers, so a call would hang it.
async fn run_without_api_calls(ctx: &Arc<Context>, obj: RdpHealth) -> Action {
    tokio::time::timeout(Duration::from_secs(5), run(ctx, obj))
        .await
        .expect("the reconcile waited for an API answer (a status write?)")
        .unwrap()
}

async fn no_api_call(api: &mut ApiHandle) {
    assert!(
        tokio::time::timeout(Duration::from_millis(100), api.next_request())
            .await
            .is_err(),
        "no API call expected"
    );
}

/// A healthy object whose probe finds what its status already says costs no status write
/// (only the probe's time and latency differ); the next reconcile, before the status shows that
/// probe, does not probe again: the controller remembers it.
#[tokio::test]
async fn a_healthy_unchanged_probe_writes_nothing() {
    let written = first_status(reachable()).await;
    // As after a restart (nothing remembered): the schedule works from status.lastProbe.
    let slower = ProbeReport {
        total_ms: 250.0,
        ..reachable()
    };
    let prober = FakeProber::with(vec![slower]);
    let (ctx, mut api) = setup(prober.clone());
    let obj = object(spec(), Some(probed_ago(written, Duration::from_secs(40))));
    let action = run_without_api_calls(&ctx, obj.clone()).await;
    assert_eq!(prober.calls.load(Ordering::SeqCst), 1, "the probe was due");
    no_api_call(&mut api).await;
    assert_eq!(action, Action::requeue(Duration::from_secs(30)));
    // The stored status still says 40 s ago; the probe a moment ago is remembered.
    let action = run_without_api_calls(&ctx, obj).await;
    assert_eq!(prober.calls.load(Ordering::SeqCst), 1, "no second probe");
    no_api_call(&mut api).await;
    assert_ne!(action, Action::await_change());
}

/// The same object, but the probe fails: that is news, and written at once.
#[tokio::test]
async fn a_failed_probe_of_a_healthy_object_is_written() {
    let written = first_status(reachable()).await;
    let (ctx, mut api) = setup(FakeProber::with(vec![refused()]));
    let obj = object(spec(), Some(probed_ago(written, Duration::from_secs(40))));
    let reply = serde_json::to_value(&obj).unwrap();
    let verifier = tokio::spawn(async move {
        let (method, uri, body) = expect_call(&mut api, StatusCode::OK, reply).await;
        assert_eq!((method, uri.as_str()), (Method::PATCH, status_path()));
        assert_eq!(body["status"]["consecutiveFailures"], 1);
        assert_eq!(body["status"]["lastProbe"]["failureReason"], "tcp_refused");
        no_api_call(&mut api).await;
    });
    let action = run(&ctx, obj).await.unwrap();
    verifier.await.unwrap();
    // The first failure is confirmed soon (`confirmInterval`, 3 s by default).
    assert_eq!(action, Action::requeue(Duration::from_secs(3)));
}

/// A healthy, unchanged object whose stored last probe is older than the heartbeat is written
/// again, so `lastProbe.time` never lags far behind.
#[tokio::test]
async fn a_healthy_unchanged_object_is_written_on_the_heartbeat() {
    let written = first_status(reachable()).await;
    let (ctx, mut api) = setup(FakeProber::with(vec![reachable()]));
    let old = probed_ago(written, writes::HEARTBEAT + Duration::from_secs(1));
    let before = old["lastProbe"]["time"].clone();
    let obj = object(spec(), Some(old));
    let reply = serde_json::to_value(&obj).unwrap();
    let verifier = tokio::spawn(async move {
        let (method, _, body) = expect_call(&mut api, StatusCode::OK, reply).await;
        assert_eq!(method, Method::PATCH);
        assert_ne!(body["status"]["lastProbe"]["time"], before);
        assert_eq!(body["status"]["phase"], "Healthy");
        no_api_call(&mut api).await;
    });
    run(&ctx, obj).await.unwrap();
    verifier.await.unwrap();
}
