//! `rdphealth bench fleet --members`: one `RdpHealthFleet` over every VM of a running simulator
//! (`rdphealth sim`, a separate process). The fleet discovers the VMs through the emulator's
//! Resource Graph endpoint and probes them in memory; the Kubernetes side is in memory too
//! (the objects a fleet would create are counted). It measures what the members cost (CPU,
//! memory per member, schedule lateness), the Azure requests of a healthy fleet (Resource
//! Graph and ARM), the Kubernetes objects, and how long an injected outage takes to become an
//! incident object.

use std::{
    collections::{BTreeMap, HashMap},
    fmt::Write as _,
    sync::Arc,
    time::{Duration, Instant},
};

use azure_core::Url;
use tokio::sync::watch;

use super::{
    fleet::{FleetConfig, SimVm, TimedProber, Timing, Window, is_write, list_vms, window},
    http, median_p99, outage_spread, rss, spread,
};
use crate::{
    api::{
        AddressType, FleetSafety, FleetSelector, MemberEndpoint, MemberTemplate, ProbeSpec,
        RdpHealthFleet, RdpHealthFleetSpec,
    },
    azure::{ArmClient, ArmConfig, StaticToken},
    fleet::{Deps, memory::MemorySink, worker},
    probe::RdpProber,
};

/// What the members benchmark measured.
#[derive(Debug, Clone)]
pub struct MembersReport {
    /// Members discovered.
    pub members: usize,
    /// Probe interval.
    pub interval: Duration,
    /// Time until the fleet's status showed every member (the status is written on a 5 s
    /// housekeeping tick).
    pub first_discovery: Duration,
    /// Measuring window.
    pub window: Duration,
    /// Probes in the window.
    pub probes: u64,
    /// CPU in the window.
    pub cpu: Duration,
    /// RSS before discovery, at the end of the window, peak.
    pub rss: (u64, u64, u64),
    /// Sorted schedule lateness samples.
    pub lateness: Vec<Duration>,
    /// Sorted probe latency samples.
    pub latency: Vec<Duration>,
    /// Azure requests in the window, by operation (Resource Graph included).
    pub azure: BTreeMap<String, u64>,
    /// Kubernetes objects at the end of the window (the fleet plus its incident objects).
    pub objects: usize,
    /// Sorted times from an injected outage to its incident object.
    pub detection: Vec<Duration>,
    /// Outages injected.
    pub injected: usize,
}

/// The fleet over `subscriptions`: every VM, probed at its private address every `interval`,
/// discovery every minute (the shortest the schema allows).
fn bench_fleet(subscriptions: Vec<String>, interval: Duration) -> RdpHealthFleet {
    let mut fleet = RdpHealthFleet::new(
        "bench",
        RdpHealthFleetSpec {
            selector: FleetSelector::of_subscriptions(subscriptions),
            template: MemberTemplate {
                endpoint: MemberEndpoint {
                    address_type: AddressType::Private,
                    ..MemberEndpoint::default()
                },
                probe: ProbeSpec {
                    interval: humantime::format_duration(interval).to_string(),
                    ..ProbeSpec::default()
                },
                ..MemberTemplate::default()
            },
            safety: FleetSafety::default(),
            discovery_interval: "1m".into(),
            incident_retention: "24h".into(),
            suspend: false,
        },
    );
    fleet.metadata.namespace = Some("bench".into());
    fleet.metadata.uid = Some("bench-fleet".into());
    fleet.metadata.generation = Some(1);
    fleet
}

/// Runs the benchmark. Everything it starts stops before it returns.
pub async fn run(cfg: &FleetConfig) -> Result<MembersReport, String> {
    let vms: Vec<SimVm> = list_vms(cfg.sim).await?;
    if vms.is_empty() {
        return Err("the simulator has no VMs".into());
    }
    let routes: HashMap<_, _> = vms
        .iter()
        .filter_map(|vm| Some((vm.private_ip?, vm.rdp)))
        .collect();
    let mut subscriptions: Vec<String> = vms.iter().map(|vm| vm.subscription.clone()).collect();
    subscriptions.sort();
    subscriptions.dedup();
    let n = vms.len();
    let rss_base = rss().map(|r| r.0).unwrap_or_default();
    let timing = Arc::new(Timing::new(cfg.interval, n));
    let arm_url = Url::parse(&format!("http://{}", cfg.sim)).map_err(|e| e.to_string())?;
    let sink = Arc::new(MemorySink::default());
    let deps = Deps {
        graph: Arc::new(ArmClient::new(
            ArmConfig::new(arm_url),
            Arc::new(StaticToken::new("bench-token")),
        )),
        prober: Arc::new(TimedProber {
            inner: RdpProber::new().map_err(|e| e.to_string())?,
            timing: timing.clone(),
            routes,
        }),
        sink: sink.clone(),
        max_unreachable_percent: 30,
        min_fleet_size: 5,
        probe_concurrency: 256,
        refusal: None,
    };
    let fleet = bench_fleet(subscriptions, cfg.interval);
    crate::fleet::policy::MemberPolicy::from_fleet(&fleet)
        .map_err(|e| format!("the bench's fleet is invalid: {e}"))?;
    let (spec, spec_rx) = watch::channel(Arc::new(fleet));
    let (stop, stop_rx) = watch::channel(false);
    let started = Instant::now();
    let task = tokio::spawn(worker::run(deps, spec_rx, stop_rx));
    // The first discovery, then one interval of warm-up (first probes are spread over it).
    while sink.status().members < u32::try_from(n).unwrap_or(u32::MAX) {
        if started.elapsed() > Duration::from_secs(120) {
            let _ = stop.send(true);
            return Err(format!(
                "the fleet found {} of {n} VMs within 120 s",
                sink.status().members
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let first_discovery = started.elapsed();
    let Window {
        window,
        cpu,
        probes,
        rss_end,
        arm: azure,
    } = window(cfg, &timing).await?;
    let objects = 1 + sink.recorded().objects.len();

    // Outages on a sample spread over the fleet: the time until each has an incident object.
    let count = ((n as f64 * cfg.outage_fraction).round() as usize).clamp(1, n);
    let sample: Vec<&SimVm> = vms.iter().step_by((n / count).max(1)).take(count).collect();
    let mut injected_at = HashMap::new();
    for vm in &sample {
        let (status, body) = http::request(
            cfg.sim,
            "POST",
            &format!("/_sim/vms/{}/fault", vm.name),
            Some(r#"{"fault":"rdp_disabled"}"#),
        )
        .await?;
        if status / 100 != 2 {
            return Err(format!(
                "inject rdp_disabled into {}: HTTP {status} {body}",
                vm.name
            ));
        }
        injected_at.insert(vm.name.to_ascii_lowercase(), Instant::now());
    }
    let deadline = Instant::now() + cfg.interval + Duration::from_secs(60);
    let mut detection = Vec::new();
    while !injected_at.is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let r = sink.recorded();
        for (name, opened) in &r.creates {
            let Some(obj) = r.objects.get(name) else {
                continue;
            };
            if let Some(at) = injected_at.remove(&obj.spec.vm_key()) {
                detection.push(opened.saturating_duration_since(at));
            }
        }
    }
    for vm in &sample {
        let _ = http::request(
            cfg.sim,
            "DELETE",
            &format!("/_sim/vms/{}/fault/rdp_disabled", vm.name),
            None,
        )
        .await;
    }
    let _ = stop.send(true);
    let _ = task.await;
    drop(spec);
    detection.sort();
    Ok(MembersReport {
        members: n,
        interval: cfg.interval,
        first_discovery,
        window,
        probes,
        cpu,
        rss: (rss_base, rss_end, rss().map(|r| r.1).unwrap_or_default()),
        lateness: Timing::sorted(&timing.lateness),
        latency: Timing::sorted(&timing.latency),
        azure,
        objects,
        detection,
        injected: sample.len(),
    })
}

impl MembersReport {
    /// The results as a Markdown table.
    pub fn table(&self) -> String {
        let n = self.members.max(1) as f64;
        let secs = self.window.as_secs_f64().max(1e-9);
        let hours = secs / 3600.0;
        let graph: u64 = self
            .azure
            .iter()
            .filter(|(k, _)| k.starts_with("graph."))
            .map(|(_, v)| v)
            .sum();
        let arm: u64 = self
            .azure
            .iter()
            .filter(|(k, _)| !k.starts_with("graph."))
            .map(|(_, v)| v)
            .sum();
        let writes: u64 = self
            .azure
            .iter()
            .filter(|(k, _)| !k.starts_with("graph.") && is_write(k))
            .map(|(_, v)| v)
            .sum();
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        let mut t = String::new();
        let mut row = |k: &str, v: String| {
            let _ = writeln!(t, "| {k} | {v} |");
        };
        row(
            "fleet members (VMs discovered)",
            format!("{}", self.members),
        );
        row(
            "interval / discovery interval",
            format!("{} / 1m", humantime::format_duration(self.interval)),
        );
        row(
            "first discovery, as the fleet's status shows it (written on a 5 s tick)",
            format!("{:.1} s", self.first_discovery.as_secs_f64()),
        );
        row(
            "measuring window",
            format!("{secs:.0} s (after one interval of warm-up)"),
        );
        row(
            "probes in window (per second, due)",
            format!(
                "{} ({:.1}/s, due {:.1}/s)",
                self.probes,
                self.probes as f64 / secs,
                n / self.interval.as_secs_f64()
            ),
        );
        row(
            "operator CPU",
            format!(
                "{:.3} core ({:.3} s per 1,000 probes)",
                self.cpu.as_secs_f64() / secs,
                self.cpu.as_secs_f64() * 1000.0 / (self.probes.max(1) as f64)
            ),
        );
        row(
            "RSS before discovery / end / peak",
            format!(
                "{:.1} / {:.1} / {:.1} MiB",
                mib(self.rss.0),
                mib(self.rss.1),
                mib(self.rss.2)
            ),
        );
        row(
            "RSS per member ((end − before) / N)",
            format!(
                "{:.1} KiB",
                self.rss.1.saturating_sub(self.rss.0) as f64 / n / 1024.0
            ),
        );
        row("schedule lateness p50 / p99 / max", spread(&self.lateness));
        row("probe latency p50 / p99", median_p99(&self.latency));
        row("Resource Graph requests in window", format!("{graph}"));
        row(
            "Resource Graph requests per 1,000 VMs per hour",
            format!("{:.1}", graph as f64 / (n / 1000.0) / hours),
        );
        row(
            "ARM requests per healthy member per hour (all / writes)",
            format!(
                "{:.4} / {:.4} ({arm} / {writes} in window)",
                arm as f64 / n / hours,
                writes as f64 / n / hours
            ),
        );
        row(
            "Kubernetes objects (the fleet + incidents), healthy fleet",
            format!("{}", self.objects),
        );
        row(
            "outage → incident object p50 / p99 / max (rdp_disabled)",
            outage_spread(&self.detection, self.injected, "opened"),
        );
        t
    }
}
