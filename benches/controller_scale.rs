//! Scale of the Kubernetes path: the real controller against an in-process API-server stand-in
//! (`benches/fake_apiserver`; the tests use a real API server) with many `RdpHealth` objects, and a prober that answers "reachable" at
//! once (this measures the controller, its store and its writes, not sockets). The stand-in
//! runs in a child process (this binary again), so the controller's memory is measured on its
//! own. It prints: time until every object has a status, the controller process's memory,
//! status writes and other API requests while the whole fleet is healthy and unchanged, probes,
//! and reconcile latency from the operator's own histogram.
//!
//! `cargo bench --bench controller_scale` runs 10,000 objects for a 60 s window
//! (`RDPHEALTH_BENCH_OBJECTS`, `RDPHEALTH_BENCH_WINDOW_SECS`, and `RDPHEALTH_BENCH_HEARTBEAT_SECS`
//! for the status heartbeat, default the operator's). `RDPHEALTH_BENCH_MEASURE` measures the
//! watch cache (reflector store) alone instead, objects with the status a healthy probe writes
//! watched without a controller: `store-as-controller` the objects exactly as the controller
//! bench leaves them (its share of the controller's memory), `store` and `store-trimmed` as a
//! real API server stores them after a `kubectl apply` (field maps, last-applied copy), whole
//! and trimmed as the controller's cache. Under `cargo test` it runs a handful of objects for a
//! moment, to keep the target compiling and working.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "fake_apiserver/mod.rs"]
mod fake_apiserver;

use std::{
    collections::HashMap,
    net::SocketAddr,
    process::Stdio,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use fake_apiserver::FakeApiServer;
use futures::StreamExt;
use k8s_openapi::jiff::Timestamp;
use kube::{
    Api,
    core::DeserializeGuard,
    runtime::{WatchStreamExt, reflector, watcher},
};
use rdphealth::{
    api::{EndpointSource, RdpHealth, ResolvedEndpoint},
    bench::{cpu_time, rss},
    controller::{self, Seams, Settings},
    engine::{self, HostOverride, Observation, writes},
    probe::{
        BoxFuture, CertificateFacts, Layers, ProbeOptions, ProbeReport, Prober, SecurityProtocol,
        Target, TlsFacts,
    },
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::TcpListener,
    process::{Child, ChildStdin, ChildStdout, Command},
    sync::oneshot,
};

const NS: &str = "default";

/// Reachable over TLS with a healthy certificate, at once; records how late each object's
/// probe came (each object has its own loopback host, so the target names the object).
#[derive(Default)]
struct Healthy {
    recording: AtomicBool,
    last: Mutex<HashMap<String, Instant>>,
    lateness: Mutex<Vec<Duration>>,
}

/// Every object's probe interval.
const INTERVAL: Duration = Duration::from_secs(30);

impl Prober for Healthy {
    fn probe<'a>(&'a self, target: &'a Target, _: &'a ProbeOptions) -> BoxFuture<'a, ProbeReport> {
        Box::pin(async move {
            let now = Instant::now();
            let key = target.to_string();
            let previous = self.last.lock().unwrap().insert(key.clone(), now);
            if let Some(prev) = previous
                && self.recording.load(Ordering::Relaxed)
            {
                // Due one interval after the previous probe (a healthy, unchanged object).
                let late = now.saturating_duration_since(prev + INTERVAL);
                self.lateness.lock().unwrap().push(late);
            }
            healthy_report(key)
        })
    }
}

impl Healthy {
    /// Sorted lateness samples, and how many objects were probed at all.
    fn lateness(&self) -> (Vec<Duration>, usize) {
        let mut v = self.lateness.lock().unwrap().clone();
        v.sort();
        (v, self.last.lock().unwrap().len())
    }
}

fn healthy_report(target: String) -> ProbeReport {
    ProbeReport {
        target,
        reachable: true,
        failure: None,
        layers: Layers::default(),
        selected_protocol: Some(SecurityProtocol::Hybrid),
        tls: Some(TlsFacts {
            version: "TLSv1.3".into(),
            cipher_suite: None,
            certificate: Some(CertificateFacts {
                subject: "CN=vm".into(),
                issuer: "CN=vm".into(),
                not_before: "2026-01-01T00:00:00Z".into(),
                not_after: "2027-06-01T00:00:00Z".into(),
                self_signed: true,
                expired: false,
                not_yet_valid: false,
                days_left: 180,
                sha1_thumbprint: "AB".into(),
                names: vec!["vm-1".into()],
                not_after_unix: 1_811_808_000,
            }),
        }),
        nla: None,
        findings: vec![],
        likely_causes: vec![],
        total_ms: 1.0,
    }
}

/// `object(i)` with the status the controller writes after a healthy probe of it: what the
/// controller bench's stand-in holds once every object was probed (it keeps no field maps).
fn object_as_written(i: usize) -> Value {
    let mut value = object(i);
    value["metadata"]["generation"] = json!(1);
    let obj: RdpHealth = serde_json::from_value(value.clone()).unwrap();
    let host = value["spec"]["endpoint"]["host"]
        .as_str()
        .unwrap()
        .to_string();
    let observation = Observation::Probed {
        report: Box::new(healthy_report(format!("{host}:3389"))),
        endpoint: ResolvedEndpoint {
            host,
            port: 3389,
            source: EndpointSource::Spec,
            computer_name: None,
        },
    };
    let status = engine::evaluate(&obj, observation, Timestamp::now()).status;
    value["status"] = serde_json::to_value(status).unwrap();
    value
}

/// `object_as_written(i)` as a real API server stores it besides: kubectl's copy of the
/// applied object, and a field map per writer (kubectl for the spec, the operator's apply for
/// the status).
fn object_as_applied(i: usize) -> Value {
    let mut value = object_as_written(i);
    let applied = object(i);
    value["metadata"]["annotations"] = json!({
        "kubectl.kubernetes.io/last-applied-configuration": applied.to_string(),
    });
    let time = "2026-11-30T10:00:00Z";
    value["metadata"]["managedFields"] = json!([
        {"manager": "kubectl-client-side-apply", "operation": "Update",
         "apiVersion": "rdphealth.io/v1alpha1", "time": time, "fieldsType": "FieldsV1",
         "fieldsV1": {"f:metadata": {"f:annotations": {".": {},
             "f:kubectl.kubernetes.io/last-applied-configuration": {}}},
             "f:spec": field_map(&applied["spec"])}},
        {"manager": "rdphealth-operator", "operation": "Apply",
         "apiVersion": "rdphealth.io/v1alpha1", "time": time, "fieldsType": "FieldsV1",
         "subresource": "status",
         "fieldsV1": {"f:status": field_map(&value["status"])}},
    ]);
    value
}

/// The `fieldsV1` map of `value`, as the API server builds it (list-maps keyed by `type`).
fn field_map(value: &Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut out = serde_json::Map::new();
            out.insert(".".into(), json!({}));
            for (k, v) in map {
                out.insert(format!("f:{k}"), field_map(v));
            }
            Value::Object(out)
        }
        Value::Array(items) => {
            let mut out = serde_json::Map::new();
            for item in items {
                if let Some(t) = item.get("type") {
                    out.insert(format!("k:{{\"type\":{t}}}"), field_map(item));
                }
            }
            Value::Object(out)
        }
        _ => json!({}),
    }
}

fn object(i: usize) -> Value {
    json!({
        "apiVersion": "rdphealth.io/v1alpha1",
        "kind": "RdpHealth",
        "metadata": {"name": format!("vm-{i:05}"), "namespace": NS},
        "spec": {
            "vm": {"resourceId": format!("/subscriptions/00000000-0000-0000-0000-{:012x}/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm-{i:05}", i / 1000)},
            // A loopback host per object (never connected to: the prober answers at once).
            "endpoint": {"host": format!("127.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255), "port": 3389},
            "probe": {"interval": "30s", "successThreshold": 1},
        },
    })
}

fn has_status(o: &Value) -> bool {
    o.pointer("/status/lastProbe").is_some()
}

fn is_status_write(method: &str, path: &str) -> bool {
    path.ends_with("/status") && matches!(method, "PATCH" | "PUT")
}

/// What the stand-in serves at the start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// Spec only, as created (the controller bench: the controller writes every status).
    New,
    /// Spec and the status a healthy probe writes: what the controller bench's stand-in holds
    /// after the first pass.
    Written,
    /// [`Shape::Written`] with what a real API server adds after a `kubectl apply` and the
    /// operator's status writes (field maps, kubectl's last-applied copy).
    Applied,
}

impl Shape {
    fn name(self) -> &'static str {
        match self {
            Self::New => "new",
            Self::Written => "written",
            Self::Applied => "applied",
        }
    }

    fn object(self, i: usize) -> Value {
        match self {
            Self::New => object(i),
            Self::Written => object_as_written(i),
            Self::Applied => object_as_applied(i),
        }
    }
}

/// What the stand-in process reports about itself (totals since it started).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct StandInStats {
    /// Objects whose status holds a probe.
    with_status: usize,
    /// The size of the first object as JSON, as the stand-in holds it now.
    sample_bytes: usize,
    status_writes: usize,
    events: usize,
    requests: usize,
    cpu_s: f64,
    rss: u64,
}

/// The child process: the API-server stand-in holding `objects` objects. Prints its address,
/// then answers every line on stdin with a JSON line of [`StandInStats`]; exits at EOF.
async fn serve_stand_in(objects: usize, shape: Shape) {
    let api = FakeApiServer::start().await;
    for i in 0..objects {
        api.create("rdphealths", NS, shape.object(i));
    }
    let mut out = tokio::io::stdout();
    out.write_all(format!("{}\n", api.addr).as_bytes())
        .await
        .unwrap();
    out.flush().await.unwrap();
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(_)) = lines.next_line().await {
        let mut stats = api.read(|s| StandInStats {
            with_status: s
                .list("rdphealths", NS)
                .iter()
                .filter(|o| has_status(o))
                .count(),
            sample_bytes: s
                .list("rdphealths", NS)
                .first()
                .map_or(0, |o| o.to_string().len()),
            status_writes: s
                .requests
                .iter()
                .filter(|r| is_status_write(r.method.as_str(), &r.path))
                .count(),
            events: s
                .requests
                .iter()
                .filter(|r| r.method.as_str() == "POST" && r.path.contains("events"))
                .count(),
            requests: s.requests.len(),
            ..StandInStats::default()
        });
        stats.cpu_s = cpu_time().unwrap().as_secs_f64();
        stats.rss = rss().unwrap().0;
        let line = serde_json::to_string(&stats).unwrap() + "\n";
        out.write_all(line.as_bytes()).await.unwrap();
        out.flush().await.unwrap();
    }
}

/// The stand-in running in a child process.
struct StandIn {
    addr: SocketAddr,
    _child: Child,
    stdin: ChildStdin,
    stdout: tokio::io::Lines<BufReader<ChildStdout>>,
}

impl StandIn {
    async fn spawn(objects: usize, shape: Shape) -> Self {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .env(ROLE, "api-server")
            .env("RDPHEALTH_BENCH_OBJECTS", objects.to_string())
            .env(SHAPE, shape.name())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let addr = stdout.next_line().await.unwrap().unwrap().parse().unwrap();
        Self {
            addr,
            _child: child,
            stdin,
            stdout,
        }
    }

    fn client(&self) -> kube::Client {
        let url = format!("http://{}", self.addr).parse().unwrap();
        kube::Client::try_from(kube::Config::new(url)).unwrap()
    }

    async fn stats(&mut self) -> StandInStats {
        self.stdin.write_all(b"stats\n").await.unwrap();
        self.stdin.flush().await.unwrap();
        let line = self.stdout.next_line().await.unwrap().unwrap();
        serde_json::from_str(&line).unwrap()
    }
}

const ROLE: &str = "RDPHEALTH_BENCH_ROLE";
/// The stand-in's [`Shape`], by name.
const SHAPE: &str = "RDPHEALTH_BENCH_SHAPE";

/// Probes so far (every probe, written or not).
fn probes(text: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with("rdphealth_probe_duration_seconds_count{"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// Failed reconciles so far, by reason: `reason=n, …` (or `none`).
fn reconcile_errors(text: &str) -> String {
    let errors: Vec<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("rdphealth_reconcile_errors_total{reason=\""))
        .filter_map(|l| {
            let (reason, n) = l.split_once("\"} ")?;
            (n.trim() != "0").then(|| format!("{reason}={}", n.trim()))
        })
        .collect();
    if errors.is_empty() {
        "none".into()
    } else {
        errors.join(", ")
    }
}

/// (count, sum, [(le, cumulative)]) of the reconcile histogram.
fn reconcile_histogram(text: &str) -> (f64, f64, Vec<(f64, f64)>) {
    let mut count = 0.0;
    let mut sum = 0.0;
    let mut buckets = Vec::new();
    for line in text.lines() {
        let Some((k, v)) = line.rsplit_once(' ') else {
            continue;
        };
        let v: f64 = v.parse().unwrap_or(0.0);
        if k == "rdphealth_reconcile_duration_seconds_count" {
            count = v;
        } else if k == "rdphealth_reconcile_duration_seconds_sum" {
            sum = v;
        } else if let Some(le) = k
            .strip_prefix("rdphealth_reconcile_duration_seconds_bucket{le=\"")
            .and_then(|r| r.strip_suffix("\"}"))
        {
            buckets.push((le.parse().unwrap_or(f64::INFINITY), v));
        }
    }
    (count, sum, buckets)
}

/// The upper bound of the bucket holding the `q` quantile.
fn bucket_quantile(buckets: &[(f64, f64)], count: f64, q: f64) -> f64 {
    buckets
        .iter()
        .find(|(_, c)| *c >= q * count)
        .map_or(f64::INFINITY, |(le, _)| *le)
}

async fn metrics(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

async fn scale(objects: usize, window: Duration, heartbeat: Duration) {
    let mut api = StandIn::spawn(objects, Shape::New).await;
    let client = api.client();
    let rss0 = rss().unwrap().0;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let started = Instant::now();
    let prober = Arc::new(Healthy::default());
    let task = tokio::spawn(controller::run(
        client,
        Settings {
            concurrency: 16,
            instance: Some("bench".into()),
            status_heartbeat: heartbeat,
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
    // Every object gets its first status (bounded).
    let limit = Duration::from_secs(60) + Duration::from_millis(20 * objects as u64);
    let mut first_pass = None;
    while started.elapsed() < limit {
        if api.stats().await.with_status == objects {
            first_pass = Some(started.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rss1 = rss().unwrap().0;
    // Steady state: the whole fleet healthy and unchanged.
    let before = api.stats().await;
    let cpu0 = cpu_time().unwrap();
    let text0 = metrics(http).await;
    let (count0, sum0, _) = reconcile_histogram(&text0);
    let probes0 = probes(&text0);
    prober.recording.store(true, Ordering::Relaxed);
    // On stderr, for a heap profiler to take its snapshot inside the window.
    eprintln!("steady window of {} s starts", window.as_secs());
    tokio::time::sleep(window).await;
    prober.recording.store(false, Ordering::Relaxed);
    let cpu = cpu_time().unwrap() - cpu0;
    let after = api.stats().await;
    let text = metrics(http).await;
    let (count1, sum1, buckets) = reconcile_histogram(&text);
    let probed = probes(&text) - probes0;
    let (rss_end, hwm) = rss().unwrap();
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(30), task).await;

    let secs = window.as_secs_f64();
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let reconciles = count1 - count0;
    let writes = after.status_writes - before.status_writes;
    let requests = after.requests - before.requests;
    println!("| measure | value |\n|---|---|");
    println!("| RdpHealth objects watched | {objects} |");
    println!("| status heartbeat | {} s |", heartbeat.as_secs());
    match first_pass {
        Some(d) => println!(
            "| time until every object has a status (first pass) | {:.1} s ({:.0} objects/s) |",
            d.as_secs_f64(),
            objects as f64 / d.as_secs_f64()
        ),
        None => println!(
            "| time until every object has a status (first pass) | not reached within {:.0} s |",
            limit.as_secs_f64()
        ),
    }
    println!(
        "| controller process RSS before the controller starts (runtime, client) | {:.1} MiB |",
        mib(rss0)
    );
    println!(
        "| controller process RSS after the first pass / end / peak | {:.1} / {:.1} / {:.1} MiB |",
        mib(rss1),
        mib(rss_end),
        mib(hwm)
    );
    println!(
        "| controller growth per object ((end − before) / N) | {:.1} KiB |",
        rss_end.saturating_sub(rss0) as f64 / objects as f64 / 1024.0
    );
    println!(
        "| API stand-in process RSS at the end (its own process, not the controller's) | {:.1} MiB |",
        mib(after.rss)
    );
    println!(
        "| objects with a status at the end | {} of {objects} |",
        after.with_status
    );
    println!(
        "| one object as the stand-in holds it at the end (JSON) | {} bytes |",
        after.sample_bytes
    );
    println!(
        "| failed reconciles (whole run, by reason) | {} |",
        reconcile_errors(&text)
    );
    println!("| steady window (fleet healthy, unchanged) | {secs:.0} s |");
    println!(
        "| probes in window | {probed:.0} ({:.1}/s) |",
        probed / secs
    );
    println!(
        "| status writes in window | {writes} ({:.2}/s, {:.1}/min) |",
        writes as f64 / secs,
        writes as f64 * 60.0 / secs
    );
    println!(
        "| events posted in window | {} |",
        after.events - before.events
    );
    println!(
        "| API requests in window (all kinds) | {requests} ({:.2}/s) |",
        requests as f64 / secs
    );
    let (lateness, probed_objects) = prober.lateness();
    let q = |f: f64| {
        lateness
            .get(((lateness.len() as f64 - 1.0) * f).round() as usize)
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    println!(
        "| objects never probed (whole run) | {} |",
        objects.saturating_sub(probed_objects)
    );
    println!(
        "| schedule lateness per probe in window p50 / p99 / max (due: previous probe + 30 s) | {:.1} / {:.1} / {:.1} ms ({} samples) |",
        q(0.5),
        q(0.99),
        q(1.0),
        lateness.len()
    );
    println!(
        "| reconciles in window | {reconciles:.0} ({:.1}/s) |",
        reconciles / secs
    );
    println!(
        "| reconcile latency mean (window) | {:.2} ms |",
        if reconciles > 0.0 {
            (sum1 - sum0) / reconciles * 1000.0
        } else {
            0.0
        }
    );
    println!(
        "| reconcile latency p50 / p99 (whole run, histogram bucket upper bound) | ≤ {} s / ≤ {} s |",
        bucket_quantile(&buckets, count1, 0.5),
        bucket_quantile(&buckets, count1, 0.99)
    );
    println!(
        "| controller process CPU in window | {:.2} s ({:.3} core) |",
        cpu.as_secs_f64(),
        cpu.as_secs_f64() / secs
    );
    println!(
        "| API stand-in process CPU in window | {:.2} s ({:.3} core) |",
        after.cpu_s - before.cpu_s,
        (after.cpu_s - before.cpu_s) / secs
    );
}

/// The watch cache alone: a reflector over `objects` objects of `shape` (with the status a
/// healthy probe writes), no controller, no probes, no writes; `trimmed` as the controller's
/// cache ([`controller::trim`]).
async fn store_only(objects: usize, shape: Shape, trimmed: bool) {
    let mut api = StandIn::spawn(objects, shape).await;
    let rdph: Api<DeserializeGuard<RdpHealth>> = Api::all(api.client());
    let rss0 = rss().unwrap().0;
    let started = Instant::now();
    let writer = reflector::store::Writer::default();
    let store = writer.as_reader();
    let watch = tokio::spawn(
        reflector::reflector(
            writer,
            watcher(rdph, watcher::Config::default()).modify(move |guard| {
                if trimmed {
                    controller::trim(guard);
                }
            }),
        )
        .for_each(|_| async {}),
    );
    store.wait_until_ready().await.unwrap();
    while store.state().len() < objects {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let listed = started.elapsed();
    // Let the watch settle before reading memory.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rss1, hwm) = rss().unwrap();
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let sample = api.stats().await.sample_bytes;
    println!("| measure | value |\n|---|---|");
    println!(
        "| RdpHealth objects in the store | {} |",
        store.state().len()
    );
    println!(
        "| one object as the stand-in holds it (JSON; {}) | {sample} bytes |",
        match shape {
            Shape::Applied => "spec, a healthy status, managedFields, last-applied",
            _ => "spec and a healthy status, as the controller bench's objects",
        }
    );
    println!(
        "| cache | {} |",
        if trimmed {
            "trimmed (managedFields and last-applied dropped, as the controller's)"
        } else {
            "whole objects"
        }
    );
    println!(
        "| time until the store holds every object | {:.1} s |",
        listed.as_secs_f64()
    );
    println!(
        "| process RSS before the watch / with the store / peak | {:.1} / {:.1} / {:.1} MiB |",
        mib(rss0),
        mib(rss1),
        mib(hwm)
    );
    println!(
        "| store growth per object ((with store − before) / N) | {:.1} KiB |",
        rss1.saturating_sub(rss0) as f64 / objects as f64 / 1024.0
    );
    watch.abort();
}

fn main() {
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    if std::env::var(ROLE).as_deref() == Ok("api-server") {
        let objects = env("RDPHEALTH_BENCH_OBJECTS", 5) as usize;
        let shape = match std::env::var(SHAPE).as_deref() {
            Ok("written") => Shape::Written,
            Ok("applied") => Shape::Applied,
            _ => Shape::New,
        };
        rt.block_on(serve_stand_in(objects, shape));
        return;
    }
    let bench = std::env::args().any(|a| a == "--bench");
    let (objects, window) = if bench {
        (
            env("RDPHEALTH_BENCH_OBJECTS", 10_000) as usize,
            env("RDPHEALTH_BENCH_WINDOW_SECS", 60),
        )
    } else {
        (5, 1)
    };
    let heartbeat = Duration::from_secs(env(
        "RDPHEALTH_BENCH_HEARTBEAT_SECS",
        writes::HEARTBEAT.as_secs(),
    ));
    match std::env::var("RDPHEALTH_BENCH_MEASURE").as_deref() {
        Ok("store") => rt.block_on(store_only(objects, Shape::Applied, false)),
        Ok("store-trimmed") => rt.block_on(store_only(objects, Shape::Applied, true)),
        // The controller bench's objects, cached as the controller caches them.
        Ok("store-as-controller") => rt.block_on(store_only(objects, Shape::Written, true)),
        _ => rt.block_on(scale(objects, Duration::from_secs(window), heartbeat)),
    }
}
