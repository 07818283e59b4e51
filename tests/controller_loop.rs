//! The whole loop: the real `Controller`, prober and HTTP endpoints against a real API server
//! (a control plane of its own per test) and a loopback RDP responder.

// Test helpers outside `#[test]` functions may panic on broken fixtures.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    net::SocketAddr,
    process::Command,
    sync::{Arc, Mutex},
    time::Duration,
};

use common::real_api::{Inner, RealApiServer, condition};
use rdphealth::{
    controller::{self, LeaseSettings, Seams, Settings},
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

const NS: &str = "default";
const NAME: &str = "vm-1";
const WAIT: Duration = Duration::from_secs(60);
const VM: &str = "/subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/rg-1/providers/Microsoft.Compute/virtualMachines/vm-1";

/// A loopback RDP listener that answers every Connection Request with "standard RDP
/// security selected". Dropping it closes the port (probes then get `tcp_refused`).
struct Responder {
    port: u16,
    task: JoinHandle<()>,
    /// When each connection (probe) arrived.
    accepted: Arc<Mutex<Vec<tokio::time::Instant>>>,
}

impl Responder {
    async fn start() -> Self {
        Self::serve(None).await
    }

    /// A responder that selects TLS and presents a self-signed certificate expiring in
    /// `days` days.
    async fn tls(days: i64) -> Self {
        Self::serve(Some(tls_acceptor(days))).await
    }

    async fn serve(tls: Option<tokio_rustls::TlsAcceptor>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let seen = Arc::clone(&accepted);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                seen.lock().unwrap().push(tokio::time::Instant::now());
                tokio::spawn(answer(stream, tls.clone()));
            }
        });
        Self {
            port,
            task,
            accepted,
        }
    }

    /// When the probes so far arrived.
    fn probes(&self) -> Vec<tokio::time::Instant> {
        self.accepted.lock().unwrap().clone()
    }

    /// Waits until `n` probes have arrived in all.
    async fn wait_probes(&self, n: usize) -> Vec<tokio::time::Instant> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let probes = self.probes();
            if probes.len() >= n {
                return probes;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "only {} of {n} probes arrived",
                probes.len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn tls_acceptor(days: i64) -> tokio_rustls::TlsAcceptor {
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    let now = time::OffsetDateTime::now_utc();
    let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(days) + time::Duration::hours(1);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone()],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    )
    .unwrap();
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

impl Drop for Responder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer(mut stream: TcpStream, tls: Option<tokio_rustls::TlsAcceptor>) {
    let mut header = [0u8; 4];
    if stream.read_exact(&mut header).await.is_err() {
        return;
    }
    let len = usize::from(u16::from_be_bytes([header[2], header[3]]));
    let mut rest = vec![0u8; len.saturating_sub(4)];
    if stream.read_exact(&mut rest).await.is_err() {
        return;
    }
    // Selected protocol: 0 = standard RDP security, 1 = TLS.
    let selected = u32::from(tls.is_some());
    if stream
        .write_all(&codec::encode_negotiation_response(selected, 0))
        .await
        .is_err()
    {
        return;
    }
    match tls {
        Some(acceptor) => {
            if let Ok(mut tls) = acceptor.accept(stream).await {
                let mut buf = [0u8; 64];
                let _ = tls.read(&mut buf).await;
            }
        }
        None => {
            let _ = stream.shutdown().await;
        }
    }
}

/// The operator running against the fake API server.
struct Operator {
    http: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), controller::RunError>>,
}

impl Operator {
    async fn start(api: &RealApiServer) -> Self {
        // Logs for failing runs: RUST_LOG=rdphealth=debug cargo test --test controller_loop
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http = listener.local_addr().unwrap();
        let settings = Settings {
            namespace: None,
            concurrency: 4,
            lease: Some(LeaseSettings {
                name: "rdphealth-operator".into(),
                namespace: NS.into(),
                identity: "replica-a".into(),
                duration_seconds: 4,
                grace_seconds: 1,
            }),
            instance: Some("replica-a".into()),
            ..Settings::default()
        };
        let seams = Seams {
            prober: Arc::new(RdpProber::new().unwrap()),
            resolver: Arc::new(HostOverride),
            azure: None,
            identities: None,
            graph: None,
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(controller::run(
            api.client(),
            settings,
            seams,
            listener,
            async move {
                let _ = stopped.await;
            },
        ));
        let op = Self {
            http,
            stop: Some(stop),
            task,
        };
        op.wait_ready().await;
        op
    }

    /// Polls `/readyz` until it answers 200 (the first watch list arrived).
    async fn wait_ready(&self) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let answer = get(self.http, "/readyz").await;
            if let Ok((200, _)) = answer {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "never became ready: {answer:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn metrics(&self) -> String {
        let (code, body) = get(self.http, "/metrics").await.unwrap();
        assert_eq!(code, 200);
        body
    }

    /// Scrapes until every pattern is present and every `absent` one is gone. The status write
    /// the test waits on lands just before the operator updates its metrics, hence the polling.
    async fn wait_metrics(&self, present: &[&str], absent: &[&str]) -> String {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let text = self.metrics().await;
            if present.iter().all(|p| text.contains(p)) && !absent.iter().any(|a| text.contains(a))
            {
                return text;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "metrics never matched {present:?} / not {absent:?}:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn shutdown(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(WAIT, &mut self.task)
            .await
            .expect("operator did not stop")
            .unwrap()
            .unwrap();
    }
}

/// A minimal HTTP/1.1 GET: (status code, body).
async fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    tokio::time::timeout(Duration::from_secs(2), get_once(addr, path))
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

async fn get_once(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((code, body))
}

fn rdphealth(port: u16) -> Value {
    json!({
        "apiVersion": "rdphealth.io/v1alpha1",
        "kind": "RdpHealth",
        "metadata": {"name": NAME, "namespace": NS},
        "spec": {
            "vm": {"resourceId": VM},
            "endpoint": {"host": "127.0.0.1", "port": port},
            "probe": {
                "interval": "1s", "unhealthyInterval": "300ms", "timeout": "250ms",
                "failureThreshold": 2, "successThreshold": 1,
                "certificateWarning": "14d",
            },
        },
    })
}

fn status(inner: &Inner) -> Option<Value> {
    inner
        .get("rdphealths", NS, NAME)
        .map(|o| o["status"].clone())
}

fn events(inner: &Inner, reason: &str) -> usize {
    inner
        .list("events", NS)
        .iter()
        .filter(|e| e["reason"] == reason && e["regarding"]["name"] == NAME)
        .count()
}

/// Waits until the object's status has `phase` (and describes `generation`).
async fn wait_phase(api: &RealApiServer, phase: &str, generation: i64) -> Value {
    api.wait_for(&format!("phase {phase}"), WAIT, |inner| {
        let s = status(inner)?;
        (s["phase"] == phase && s["observedGeneration"] == generation).then_some(s)
    })
    .await
}

/// When each status patch reached the server.
fn status_patches(inner: &Inner) -> Vec<String> {
    inner
        .requests
        .iter()
        .filter(|r| r.method == "PATCH" && r.path.ends_with(&format!("/rdphealths/{NAME}/status")))
        .map(|r| r.at.clone())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_loop_healthy_unreachable_spec_change_delete() {
    let api = RealApiServer::start().await;
    let rdp = Responder::start().await;
    let op = Operator::start(&api).await;

    // Leader election through the Lease.
    api.wait_for("the lease to be held", WAIT, |inner| {
        let lease = inner.get("leases", NS, "rdphealth-operator")?;
        (lease["spec"]["holderIdentity"] == "replica-a").then_some(())
    })
    .await;

    // Created → probed → Healthy.
    api.create("rdphealths", NS, rdphealth(rdp.port));
    let s = wait_phase(&api, "Healthy", 1).await;
    let reach = condition(&s, "Reachable").unwrap();
    assert_eq!(reach["status"], "True");
    assert_eq!(s["lastProbe"]["selectedProtocol"], "rdp");
    assert_eq!(
        condition(&s, "CertificateValid").unwrap()["reason"],
        "NoTls"
    );
    assert_eq!(
        s["endpoint"],
        json!({"host": "127.0.0.1", "port": rdp.port, "source": "Spec"})
    );
    op.wait_metrics(
        &[
            r#"rdphealth_vm_reachable{name="vm-1",namespace="default"} 1"#,
            r#"rdphealth_objects{phase="Healthy"} 1"#,
        ],
        &[],
    )
    .await;

    // Healthy and unchanged: probed once per interval (our own status write comes back as a
    // watch event and must not cause an extra probe), and not written again, since nothing
    // but the probe's time and latency changes.
    let writes = api.read(|inner| status_patches(inner).len());
    let probes = rdp.wait_probes(rdp.probes().len() + 3).await;
    for pair in probes.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(gap >= Duration::from_millis(900), "probes {gap:?} apart");
    }
    assert_eq!(
        api.read(|inner| status_patches(inner).len()),
        writes,
        "status written while healthy and unchanged"
    );

    // The responder goes away → Unreachable after failureThreshold probes, one Event.
    let port = rdp.port;
    drop(rdp);
    let s = wait_phase(&api, "Unreachable", 1).await;
    assert_eq!(s["consecutiveFailures"], 2);
    assert_eq!(s["lastProbe"]["failureReason"], "tcp_refused");
    let reach = condition(&s, "Reachable").unwrap();
    assert_eq!(reach["status"], "False");
    assert_eq!(reach["reason"], "TcpRefused");
    assert_eq!(
        s["lastTransitionToUnreachable"],
        reach["lastTransitionTime"]
    );
    api.wait_for("a BecameUnreachable event", WAIT, |inner| {
        (events(inner, "BecameUnreachable") == 1).then_some(())
    })
    .await;
    op.wait_metrics(
        &[
            r#"rdphealth_vm_reachable{name="vm-1",namespace="default"} 0"#,
            r#"rdphealth_unreachable_since_timestamp_seconds{name="vm-1",namespace="default"} 1"#,
            r#"rdphealth_probe_failures_total{reason="tcp_refused"} "#,
        ],
        &[r#"rdphealth_probe_failures_total{reason="tcp_refused"} 0"#],
    )
    .await;

    // More failing probes: still exactly one event.
    api.wait_for("more failed probes", WAIT, |inner| {
        (status(inner)?["consecutiveFailures"].as_u64()? >= 4).then_some(())
    })
    .await;
    assert_eq!(api.read(|inner| events(inner, "BecameUnreachable")), 1);

    // A spec change (new port) is picked up at once: generation 2, Healthy, Recovered.
    let rdp = Responder::start().await;
    assert_ne!(rdp.port, port);
    api.patch(
        "rdphealths",
        NS,
        NAME,
        json!({"spec": {"endpoint": {"port": rdp.port}}}),
    );
    let s = wait_phase(&api, "Healthy", 2).await;
    assert_eq!(s["endpoint"]["port"], rdp.port);
    assert!(
        s["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["observedGeneration"] == 2)
    );
    api.wait_for("a Recovered event", WAIT, |inner| {
        (events(inner, "Recovered") == 1).then_some(())
    })
    .await;

    // Deleting the object removes its series.
    api.delete("rdphealths", NS, NAME);
    op.wait_metrics(
        &[r#"rdphealth_objects{phase="Healthy"} 0"#],
        &[r#"name="vm-1""#],
    )
    .await;

    // Graceful shutdown releases the lease.
    op.shutdown().await;
    api.wait_for("the lease to be released", WAIT, |inner| {
        let lease = inner.get("leases", NS, "rdphealth-operator")?;
        lease["spec"].get("holderIdentity").is_none().then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_object_does_not_break_the_watch() {
    let api = RealApiServer::start().await;
    let rdp = Responder::start().await;
    let op = Operator::start(&api).await;
    // An object the current schema rejects can still be stored: it was created under an
    // earlier, looser version of the CRD, which is then replaced (stored objects are not
    // validated again).
    let cp = api.control_plane();
    let crd_path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("crds")
        .join(rdphealth::api::CRD_FILE);
    let crd_text = std::fs::read_to_string(&crd_path).unwrap();
    let mut loose: Value = serde_saphyr::from_str(&crd_text).unwrap();
    loose["spec"]["versions"][0]["schema"]["openAPIV3Schema"] = json!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true,
    });
    loose["spec"]["versions"][0]
        .as_object_mut()
        .unwrap()
        .remove("additionalPrinterColumns");
    let loose_path = cp.dir().join("loose-crd.json");
    std::fs::write(&loose_path, loose.to_string()).unwrap();
    let apply = |path: &std::path::Path| {
        cp.kubectl(&[
            "apply",
            "--server-side",
            "--force-conflicts",
            "-f",
            path.to_str().unwrap(),
        ]);
    };
    apply(&loose_path);
    let mut broken = rdphealth(rdp.port);
    broken["metadata"]["name"] = json!("broken");
    broken["spec"]["probe"]["failureThreshold"] = json!("three");
    // The looser schema is served once the server accepts the object.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let out = Command::new(cp.tool("kubectl"))
            .env("KUBECONFIG", &cp.kubeconfig)
            .args(["create", "-n", NS, "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .and_then(|mut child| {
                use std::io::Write as _;
                child
                    .stdin
                    .take()
                    .unwrap()
                    .write_all(broken.to_string().as_bytes())?;
                child.wait()
            })
            .unwrap();
        if out.success() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "loose CRD never served"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    apply(&crd_path);
    api.create("rdphealths", NS, rdphealth(rdp.port));
    wait_phase(&api, "Healthy", 1).await;
    op.wait_metrics(
        &[r#"rdphealth_reconcile_errors_total{reason="MalformedObject"} 1"#],
        &[],
    )
    .await;
    api.wait_for("a MalformedObject event", WAIT, |inner| {
        inner
            .list("events", NS)
            .iter()
            .any(|e| e["reason"] == "MalformedObject" && e["regarding"]["name"] == "broken")
            .then_some(())
    })
    .await;
    op.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiring_certificate_degrades_with_one_event_and_an_expiry_metric() {
    let api = RealApiServer::start().await;
    let rdp = Responder::tls(5).await;
    let op = Operator::start(&api).await;
    api.create("rdphealths", NS, rdphealth(rdp.port));
    let s = wait_phase(&api, "Degraded", 1).await;
    assert_eq!(s["lastProbe"]["selectedProtocol"], "ssl");
    assert!(
        s["lastProbe"]["tlsVersion"]
            .as_str()
            .unwrap()
            .starts_with("TLS")
    );
    assert!(s["lastProbe"]["certificateNotAfter"].is_string());
    let cert = condition(&s, "CertificateValid").unwrap();
    assert_eq!(cert["status"], "False");
    assert_eq!(cert["reason"], "CertificateExpiring");
    assert_eq!(condition(&s, "Reachable").unwrap()["status"], "True");
    assert_eq!(
        condition(&s, "Healthy").unwrap()["reason"],
        "CertificateExpiring"
    );
    rdp.wait_probes(2).await;
    api.wait_for("a CertificateExpiring event", WAIT, |inner| {
        (events(inner, "CertificateExpiring") == 1).then_some(())
    })
    .await;
    op.wait_metrics(
        &[
            r#"rdphealth_certificate_expiry_timestamp_seconds{name="vm-1",namespace="default"} 1"#,
            r#"rdphealth_objects{phase="Degraded"} 1"#,
        ],
        &[],
    )
    .await;
    assert_eq!(api.read(|inner| events(inner, "CertificateExpiring")), 1);
    op.shutdown().await;
}

/// `promtool check metrics` on real `/metrics` output. Skipped with a note when promtool is
/// not installed, unless `RDPHEALTH_REQUIRE_PROMTOOL=1`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool() {
    let Some(promtool) = common::promtool() else {
        return;
    };
    let api = RealApiServer::start().await;
    let rdp = Responder::start().await;
    let op = Operator::start(&api).await;
    api.create("rdphealths", NS, rdphealth(rdp.port));
    wait_phase(&api, "Healthy", 1).await;
    let text = op.wait_metrics(&["rdphealth_vm_reachable{"], &[]).await;
    op.shutdown().await;

    common::promtool_check(&promtool, &text);
}
