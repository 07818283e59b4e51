//! Scale of the Kubernetes path: the real controller against the in-process API-server
//! stand-in with many `RdpHealth` objects, a prober that answers "reachable" at once (this
//! measures the controller, its store and its writes, not sockets), and then:
//! time until every object has a status, memory, status writes per second while the whole
//! fleet is healthy and unchanged, and reconcile latency from the operator's own histogram.
//!
//! `cargo bench --bench controller_scale` runs 10,000 objects for a 60 s window
//! (`RDPHEALTH_BENCH_OBJECTS`, `RDPHEALTH_BENCH_WINDOW_SECS`); under `cargo test` it runs a
//! handful of objects for a moment, to keep the target compiling and working.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/fake_apiserver/mod.rs"]
mod fake_apiserver;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use fake_apiserver::FakeApiServer;
use rdphealth::{
    bench::{cpu_time, rss},
    controller::{self, Seams, Settings},
    engine::HostOverride,
    probe::{
        BoxFuture, CertificateFacts, Layers, ProbeOptions, ProbeReport, Prober, SecurityProtocol,
        Target, TlsFacts,
    },
};
use serde_json::{Value, json};
use tokio::{net::TcpListener, sync::oneshot};

const NS: &str = "default";

/// Reachable over TLS with a healthy certificate, at once.
struct Healthy;

impl Prober for Healthy {
    fn probe<'a>(&'a self, target: &'a Target, _: &'a ProbeOptions) -> BoxFuture<'a, ProbeReport> {
        Box::pin(async move {
            ProbeReport {
                target: target.to_string(),
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
                        not_after_unix: 1_811_808_000,
                    }),
                }),
                findings: vec![],
                likely_causes: vec![],
                total_ms: 1.0,
            }
        })
    }
}

fn object(i: usize) -> Value {
    json!({
        "apiVersion": "rdphealth.io/v1alpha1",
        "kind": "RdpHealth",
        "metadata": {"name": format!("vm-{i:05}"), "namespace": NS},
        "spec": {
            "vm": {"resourceId": format!("/subscriptions/00000000-0000-0000-0000-{:012x}/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm-{i:05}", i / 1000)},
            "endpoint": {"host": "127.0.0.1", "port": 3389},
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

async fn scale(objects: usize, window: Duration) {
    let api = FakeApiServer::start().await;
    for i in 0..objects {
        api.create("rdphealths", NS, object(i));
    }
    let rss0 = rss().unwrap().0;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let http = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let started = Instant::now();
    let task = tokio::spawn(controller::run(
        api.client(),
        Settings {
            concurrency: 16,
            instance: Some("bench".into()),
            ..Settings::default()
        },
        Seams {
            prober: Arc::new(Healthy),
            resolver: Arc::new(HostOverride),
            azure: None,
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
        let done = api.read(|s| {
            s.list("rdphealths", NS)
                .iter()
                .filter(|o| has_status(o))
                .count()
        });
        if done == objects {
            first_pass = Some(started.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rss1 = rss().unwrap().0;
    // Steady state: the whole fleet healthy and unchanged.
    let before = tokio::time::Instant::now();
    let cpu0 = cpu_time().unwrap();
    let (count0, sum0, _) = reconcile_histogram(&metrics(http).await);
    tokio::time::sleep(window).await;
    let cpu = cpu_time().unwrap() - cpu0;
    let text = metrics(http).await;
    let (count1, sum1, buckets) = reconcile_histogram(&text);
    let (writes, events, requests) = api.read(|s| {
        let recent: Vec<_> = s.requests.iter().filter(|r| r.at >= before).collect();
        let writes = recent
            .iter()
            .filter(|r| is_status_write(r.method.as_str(), &r.path))
            .count();
        let events = recent
            .iter()
            .filter(|r| r.method.as_str() == "POST" && r.path.contains("events"))
            .count();
        (writes, events, recent.len())
    });
    let (rss_end, hwm) = rss().unwrap();
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(30), task).await;

    let secs = window.as_secs_f64();
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let reconciles = count1 - count0;
    println!("| measure | value |\n|---|---|");
    println!("| RdpHealth objects watched | {objects} |");
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
        "| RSS with objects in the API stand-in, before the controller | {:.1} MiB |",
        mib(rss0)
    );
    println!(
        "| RSS after the first pass / end / peak | {:.1} / {:.1} / {:.1} MiB |",
        mib(rss1),
        mib(rss_end),
        mib(hwm)
    );
    println!(
        "| controller growth per object ((end − before) / N, includes the stand-in's change log) | {:.1} KiB |",
        rss_end.saturating_sub(rss0) as f64 / objects as f64 / 1024.0
    );
    println!("| steady window (fleet healthy, unchanged) | {secs:.0} s |");
    println!(
        "| status writes in window | {writes} ({:.2}/s, {:.1}/min) |",
        writes as f64 / secs,
        writes as f64 * 60.0 / secs
    );
    println!("| events posted in window | {events} |");
    println!(
        "| API requests in window (all kinds) | {requests} ({:.2}/s) |",
        requests as f64 / secs
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
        "| process CPU in window (controller + stand-in) | {:.2} s ({:.3} core) |",
        cpu.as_secs_f64(),
        cpu.as_secs_f64() / secs
    );
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let env = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let (objects, window) = if bench {
        (
            env("RDPHEALTH_BENCH_OBJECTS", 10_000) as usize,
            env("RDPHEALTH_BENCH_WINDOW_SECS", 60),
        )
    } else {
        (5, 1)
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(scale(objects, Duration::from_secs(window)));
}
