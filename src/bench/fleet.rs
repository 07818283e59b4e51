//! `rdphealth bench fleet`: the engine with the in-memory driver over every VM of a running
//! simulator (`rdphealth sim`, a separate process), at a fixed interval for a fixed time.
//! It measures what one replica costs for a healthy fleet, how many ARM requests that fleet
//! makes, and how long an injected outage takes to be seen.

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use azure_core::Url;
use kube::api::ObjectMeta;
use tokio::sync::watch;

use super::{cpu_time, http, median_p99, outage_spread, rss, spread};
use crate::{
    api::{EndpointSpec, ProbeSpec, RdpHealth, RdpHealthSpec, VmRef, conditions as types},
    azure::{ArmClient, ArmConfig, StaticToken},
    demo::{
        driver::{self, Engine, State, Tracked},
        fleet::Expect,
    },
    engine::{
        conditions::{self, Status},
        remediate::{Fleet, Remediator},
    },
    ladder::fleet::FleetPolicy,
    metrics::Metrics,
    probe::{BoxFuture, ProbeOptions, ProbeReport, Prober, RdpProber, Target},
};

/// Fleet benchmark settings.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// The simulator's ARM emulator / admin API.
    pub sim: SocketAddr,
    /// Probe interval of every object.
    pub interval: Duration,
    /// Steady-state measuring window (after one interval of warm-up).
    pub duration: Duration,
    /// Share of VMs that get an injected `rdp_disabled` outage after the window.
    pub outage_fraction: f64,
    /// Use only the first `limit` VMs of the simulator.
    pub limit: Option<usize>,
}

/// Records when each probe started relative to when it was due, and how long it took.
pub(super) struct Timing {
    pub(super) interval: Duration,
    pub(super) recording: AtomicBool,
    pub(super) probes: AtomicU64,
    pub(super) last: Mutex<HashMap<String, (Instant, bool)>>,
    pub(super) lateness: Mutex<Vec<Duration>>,
    pub(super) latency: Mutex<Vec<Duration>>,
}

impl Timing {
    pub(super) fn new(interval: Duration, n: usize) -> Self {
        Self {
            interval,
            recording: AtomicBool::new(false),
            probes: AtomicU64::new(0),
            last: Mutex::new(HashMap::with_capacity(n)),
            lateness: Mutex::new(Vec::new()),
            latency: Mutex::new(Vec::new()),
        }
    }

    /// Sorted samples.
    pub(super) fn sorted(m: &Mutex<Vec<Duration>>) -> Vec<Duration> {
        let mut v = m.lock().map(|v| v.clone()).unwrap_or_default();
        v.sort();
        v
    }
}

pub(super) struct TimedProber {
    pub(super) inner: RdpProber,
    pub(super) timing: Arc<Timing>,
    /// Address ARM reports → the VM's responder (fleet members are probed at the addresses
    /// discovery returned); empty: targets are responders already.
    pub(super) routes: HashMap<std::net::IpAddr, SocketAddr>,
}

impl Prober for TimedProber {
    fn probe<'a>(
        &'a self,
        target: &'a Target,
        opts: &'a ProbeOptions,
    ) -> BoxFuture<'a, ProbeReport> {
        Box::pin(async move {
            let start = Instant::now();
            let key = target.to_string();
            let t = &self.timing;
            let recording = t.recording.load(Ordering::Relaxed);
            let previous = t.last.lock().ok().and_then(|m| m.get(&key).copied());
            let routed = target
                .host
                .parse()
                .ok()
                .and_then(|ip| self.routes.get(&ip))
                .map(|rdp| Target {
                    host: rdp.ip().to_string(),
                    port: rdp.port(),
                });
            let report = self
                .inner
                .probe_once(routed.as_ref().unwrap_or(target), opts)
                .await;
            let took = start.elapsed();
            t.probes.fetch_add(1, Ordering::Relaxed);
            if recording {
                // A healthy object's probe is due one interval after the previous one started.
                if let Some((prev, true)) = previous {
                    let late = start.saturating_duration_since(prev + t.interval);
                    if let Ok(mut v) = t.lateness.lock() {
                        v.push(late);
                    }
                }
                if let Ok(mut v) = t.latency.lock() {
                    v.push(took);
                }
            }
            if let Ok(mut m) = t.last.lock() {
                m.insert(key, (start, report.reachable));
            }
            report
        })
    }
}

/// A VM of the running simulator.
#[derive(Debug, Clone)]
pub(super) struct SimVm {
    pub(super) name: String,
    pub(super) subscription: String,
    pub(super) resource_group: String,
    pub(super) rdp: SocketAddr,
    pub(super) private_ip: Option<std::net::IpAddr>,
}

pub(super) async fn list_vms(sim: SocketAddr) -> Result<Vec<SimVm>, String> {
    let v = http::get_json(sim, "/_sim/vms").await?;
    let list = v.as_array().ok_or("/_sim/vms: not a list")?;
    let text =
        |vm: &serde_json::Value, k: &str| vm.get(k).and_then(|s| s.as_str()).map(str::to_string);
    list.iter()
        .map(|vm| {
            Some(SimVm {
                name: text(vm, "name")?,
                subscription: text(vm, "subscription")?,
                resource_group: text(vm, "resourceGroup")?,
                rdp: text(vm, "rdp")?.parse().ok()?,
                private_ip: text(vm, "privateIp").and_then(|ip| ip.parse().ok()),
            })
        })
        .collect::<Option<Vec<_>>>()
        .ok_or_else(|| "/_sim/vms: unexpected shape".to_string())
}

pub(super) async fn arm_counters(sim: SocketAddr) -> Result<BTreeMap<String, u64>, String> {
    let v = http::get_json(sim, "/_sim/counters").await?;
    Ok(v.get("counts")
        .and_then(|c| c.as_object())
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_u64()?)))
                .collect()
        })
        .unwrap_or_default())
}

/// Whether an ARM operation (as the emulator names it) changes something.
pub(super) fn is_write(op: &str) -> bool {
    let read = op.ends_with(".get")
        || op.ends_with(".instanceView")
        || op == "operation.status"
        || op == "token"
        || op == "throttled"
        || op.starts_with("blob");
    !read
}

fn object_for(vm: &SimVm, interval: Duration) -> RdpHealth {
    let resource_id = format!(
        "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Compute/virtualMachines/{}",
        vm.subscription, vm.resource_group, vm.name
    );
    RdpHealth {
        metadata: ObjectMeta {
            name: Some(vm.name.clone()),
            namespace: Some("bench".into()),
            generation: Some(1),
            uid: Some(format!("bench-{}", vm.name)),
            ..Default::default()
        },
        spec: RdpHealthSpec {
            vm: VmRef { resource_id },
            endpoint: EndpointSpec {
                host: Some(vm.rdp.ip().to_string()),
                port: vm.rdp.port(),
                ..EndpointSpec::default()
            },
            probe: ProbeSpec {
                interval: humantime::format_duration(interval).to_string(),
                ..ProbeSpec::default()
            },
            remediation: Default::default(),
            evidence: Default::default(),
            suspend: false,
        },
        status: None,
    }
}

fn unreachable(t: &Tracked) -> bool {
    t.obj.status.as_ref().is_some_and(|s| {
        conditions::status_of(&s.conditions, types::REACHABLE) == Some(Status::False)
    })
}

/// What the fleet benchmark measured.
#[derive(Debug, Clone)]
pub struct FleetReport {
    /// Objects driven.
    pub objects: usize,
    /// Probe interval.
    pub interval: Duration,
    /// Measuring window.
    pub window: Duration,
    /// Probes in the window.
    pub probes: u64,
    /// CPU in the window.
    pub cpu: Duration,
    /// RSS before the objects existed.
    pub rss_base: u64,
    /// RSS at the end of the window.
    pub rss: u64,
    /// Peak RSS.
    pub rss_peak: u64,
    /// Sorted schedule lateness samples.
    pub lateness: Vec<Duration>,
    /// Sorted probe latency samples.
    pub latency: Vec<Duration>,
    /// ARM requests in the window, by operation.
    pub arm: BTreeMap<String, u64>,
    /// Sorted outage detection times.
    pub detection: Vec<Duration>,
    /// Outages injected.
    pub injected: usize,
}

impl FleetReport {
    /// The results as a Markdown table.
    pub fn table(&self) -> String {
        let n = self.objects.max(1) as f64;
        let secs = self.window.as_secs_f64().max(1e-9);
        let hours = secs / 3600.0;
        let total: u64 = self.arm.values().sum();
        let writes: u64 = self
            .arm
            .iter()
            .filter(|(k, _)| is_write(k))
            .map(|(_, v)| v)
            .sum();
        let cores = self.cpu.as_secs_f64() / secs;
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        let mut t = String::new();
        let mut row = |k: &str, v: String| {
            let _ = writeln!(t, "| {k} | {v} |");
        };
        row("VMs (objects)", format!("{}", self.objects));
        row(
            "interval",
            humantime::format_duration(self.interval).to_string(),
        );
        row(
            "measuring window",
            format!("{secs:.0} s (after one interval of warm-up)"),
        );
        row("probes in window", format!("{}", self.probes));
        row(
            "probes per second achieved",
            format!(
                "{:.1} (due: {:.1})",
                self.probes as f64 / secs,
                n / self.interval.as_secs_f64()
            ),
        );
        row(
            "operator CPU",
            format!("{:.3} core ({:.2} s CPU)", cores, self.cpu.as_secs_f64()),
        );
        row(
            "operator CPU s per 1,000 probes",
            format!(
                "{:.3}",
                self.cpu.as_secs_f64() * 1000.0 / (self.probes.max(1) as f64)
            ),
        );
        row(
            "RSS before objects / end / peak",
            format!(
                "{:.1} / {:.1} / {:.1} MiB",
                mib(self.rss_base),
                mib(self.rss),
                mib(self.rss_peak)
            ),
        );
        row(
            "RSS per object (end − before) / N",
            format!(
                "{:.1} KiB",
                (self.rss.saturating_sub(self.rss_base)) as f64 / n / 1024.0
            ),
        );
        row("schedule lateness p50 / p99 / max", spread(&self.lateness));
        row("probe latency p50 / p99", median_p99(&self.latency));
        row(
            "ARM requests per healthy VM per hour (all / writes)",
            format!(
                "{:.4} / {:.4} ({} / {} in window)",
                total as f64 / n / hours,
                writes as f64 / n / hours,
                total,
                writes
            ),
        );
        row(
            "outage detection p50 / p99 / max (rdp_disabled)",
            outage_spread(&self.detection, self.injected, "detected"),
        );
        t
    }
}

/// Runs the benchmark. Everything it starts stops before it returns.
pub async fn run(cfg: &FleetConfig) -> Result<FleetReport, String> {
    let mut vms = list_vms(cfg.sim).await?;
    if let Some(limit) = cfg.limit {
        vms.truncate(limit);
    }
    if vms.is_empty() {
        return Err("the simulator has no VMs".into());
    }
    let n = vms.len();
    let rss_base = rss().map(|r| r.0).unwrap_or_default();
    let state = Arc::new(State {
        clock: crate::demo::clock::Clock::new(1.0),
        objects: Mutex::new(BTreeMap::new()),
        log: Mutex::new(Vec::new()),
    });
    if let Ok(mut objects) = state.objects.lock() {
        for vm in &vms {
            objects.insert(
                vm.name.clone(),
                Tracked {
                    obj: object_for(vm, cfg.interval),
                    fault: None,
                    answers_as: None,
                    expect: Expect::Healthy,
                    detected_after: None,
                    recovered_after: None,
                    fixed_by: None,
                    diagnosis: None,
                    last_event: None,
                },
            );
        }
    }
    let arm_url = Url::parse(&format!("http://{}", cfg.sim)).map_err(|e| e.to_string())?;
    let fleet = Arc::new(Fleet::new(FleetPolicy::default()));
    let timing = Arc::new(Timing::new(cfg.interval, n));
    let engine = Arc::new(Engine {
        // The spec's host, no ARM read: the bench measures probing, not lookups.
        resolver: Arc::new(crate::engine::HostOverride),
        prober: Arc::new(TimedProber {
            inner: RdpProber::new().map_err(|e| e.to_string())?,
            timing: timing.clone(),
            routes: HashMap::new(),
        }),
        remediator: Arc::new(Remediator {
            azure: Arc::new(ArmClient::new(
                ArmConfig::new(arm_url),
                Arc::new(StaticToken::new("bench-token")),
            )),
            fleet: fleet.clone(),
            probe_source: Some(std::net::IpAddr::from([203, 0, 113, 10])),
            first_poll: Duration::from_secs(2),
            vm_rdp_port: Some(crate::probe::DEFAULT_RDP_PORT),
            secrets: None,
            leadership: Arc::new(crate::engine::remediate::SoleReplica),
        }),
        metrics: Arc::new(Metrics::new().map_err(|e| e.to_string())?),
        state: state.clone(),
    });
    // Objects start spread over one interval, as a replica's objects drift apart after a
    // restart; the first probes of all of them at the same instant would measure a burst.
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = Vec::with_capacity(n);
    for (i, vm) in vms.iter().enumerate() {
        let delay = cfg.interval.mul_f64(i as f64 / n as f64);
        let engine = engine.clone();
        let name = vm.name.clone();
        let mut stop = stop_rx.clone();
        tasks.push(tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = stop.changed() => return,
            }
            driver::drive(engine, name, stop).await;
        }));
    }
    let fleet_task = {
        let state = state.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tokio::select! {
                    _ = tick.tick() => fleet.update(state.fleet_view()),
                    _ = stop.changed() => return,
                }
            }
        })
    };
    let result = measure(cfg, &state, &timing, n).await;
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    let _ = fleet_task.await;
    let (window, probes, cpu, rss_end, arm, detection, injected) = result?;
    let sorted = Timing::sorted;
    Ok(FleetReport {
        objects: n,
        interval: cfg.interval,
        window,
        probes,
        cpu,
        rss_base,
        rss: rss_end,
        rss_peak: rss().map(|r| r.1).unwrap_or_default(),
        lateness: sorted(&timing.lateness),
        latency: sorted(&timing.latency),
        arm,
        detection,
        injected,
    })
}

/// What one steady window measured.
pub(super) struct Window {
    /// Its length.
    pub(super) window: Duration,
    /// CPU this process used in it.
    pub(super) cpu: Duration,
    /// Probes in it.
    pub(super) probes: u64,
    /// RSS at its end.
    pub(super) rss_end: u64,
    /// ARM (and Resource Graph) requests in it, by operation.
    pub(super) arm: BTreeMap<String, u64>,
}

/// One interval of warm-up, then a window of `cfg.duration`: CPU, probes, RSS and the
/// emulator's request counters over it.
pub(super) async fn window(cfg: &FleetConfig, timing: &Timing) -> Result<Window, String> {
    tokio::time::sleep(cfg.interval + Duration::from_secs(2)).await;
    let arm0 = arm_counters(cfg.sim).await?;
    let cpu0 = cpu_time().unwrap_or_default();
    let probes0 = timing.probes.load(Ordering::Relaxed);
    timing.recording.store(true, Ordering::Relaxed);
    let t0 = Instant::now();
    tokio::time::sleep(cfg.duration).await;
    timing.recording.store(false, Ordering::Relaxed);
    let window = t0.elapsed();
    let cpu = cpu_time().unwrap_or_default().saturating_sub(cpu0);
    let probes = timing.probes.load(Ordering::Relaxed) - probes0;
    let rss_end = rss().map(|r| r.0).unwrap_or_default();
    let arm1 = arm_counters(cfg.sim).await?;
    let arm = arm1
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v.saturating_sub(arm0.get(k).copied().unwrap_or(0)),
            )
        })
        .filter(|(_, v)| *v > 0)
        .collect();
    Ok(Window {
        window,
        cpu,
        probes,
        rss_end,
        arm,
    })
}

type Measured = (
    Duration,
    u64,
    Duration,
    u64,
    BTreeMap<String, u64>,
    Vec<Duration>,
    usize,
);

async fn measure(
    cfg: &FleetConfig,
    state: &State,
    timing: &Timing,
    n: usize,
) -> Result<Measured, String> {
    let Window {
        window,
        cpu,
        probes,
        rss_end,
        arm,
    } = window(cfg, timing).await?;

    // Outages on a sample, spread evenly over the fleet.
    let names: Vec<String> = state
        .objects
        .lock()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    let count = ((n as f64 * cfg.outage_fraction).round() as usize).clamp(1, n);
    let step = n / count;
    let sample: Vec<String> = names
        .iter()
        .step_by(step.max(1))
        .take(count)
        .cloned()
        .collect();
    let mut injected_at = HashMap::new();
    for name in &sample {
        let (status, body) = http::request(
            cfg.sim,
            "POST",
            &format!("/_sim/vms/{name}/fault"),
            Some(r#"{"fault":"rdp_disabled"}"#),
        )
        .await?;
        if status / 100 != 2 {
            return Err(format!(
                "inject rdp_disabled into {name}: HTTP {status} {body}"
            ));
        }
        injected_at.insert(name.clone(), Instant::now());
    }
    // Bounded: an interval, the failure threshold's probes at the confirmation interval, slack.
    let deadline = Instant::now() + cfg.interval + Duration::from_secs(60);
    let mut detection = Vec::new();
    while !injected_at.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = Instant::now();
        let seen: Vec<String> = state
            .objects
            .lock()
            .map(|m| {
                injected_at
                    .keys()
                    .filter(|k| m.get(*k).is_some_and(unreachable))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        for k in seen {
            if let Some(at) = injected_at.remove(&k) {
                detection.push(now.saturating_duration_since(at));
            }
        }
    }
    for name in &sample {
        let _ = http::request(
            cfg.sim,
            "DELETE",
            &format!("/_sim/vms/{name}/fault/rdp_disabled"),
            None,
        )
        .await;
    }
    detection.sort();
    Ok((window, probes, cpu, rss_end, arm, detection, sample.len()))
}
