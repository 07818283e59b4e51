//! `rdphealth demo`: the whole product on one machine. It starts the Azure simulator (ARM
//! emulator + live RDP responders), creates one `RdpHealth` per simulated VM, and runs the
//! same engine as the operator with an in-memory driver instead of the Kubernetes API:
//! real probes over sockets, real Azure SDK calls against the emulator, the same metrics.

pub mod clock;
pub mod driver;
pub mod fleet;
mod fleet_mode;
pub mod view;

use std::{
    collections::BTreeMap,
    io::IsTerminal,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex, atomic::AtomicBool},
    time::{Duration, Instant},
};

use azure_core::Url;
use kube::api::ObjectMeta;
use tokio::sync::watch;

use self::{
    clock::Clock,
    driver::{Engine, State, Tracked},
    fleet::Expect,
};
use crate::{
    api::{
        EndpointSpec, ProbeSpec, RdpHealth, RdpHealthSpec, RemediationMode, RemediationSpec, VmRef,
    },
    azure::{ArmClient, ArmConfig, CountedAzure, StaticToken},
    engine::{
        AzureResolver, ResolverPolicy,
        remediate::{Fleet, Remediator},
    },
    ladder::{Rung, fleet::FleetPolicy, spec::BackoffSpec},
    metrics::Metrics,
    probe::RdpProber,
    sim::{Scenario, Simulator, Timing, TimingProfile},
};

/// Demo settings.
#[derive(Debug, Clone)]
pub struct DemoConfig {
    /// VMs in the built-in fleet.
    pub vms: usize,
    /// A scenario file instead of the built-in fleet.
    pub scenario: Option<PathBuf>,
    /// `RdpHealth` YAML files whose specs replace the generated ones (matched by VM name).
    pub objects: Vec<PathBuf>,
    /// Timer compression (2 = twice as fast). Fast timing: the demo's specs and the
    /// simulator's durations are divided by it. Realistic timing: the demo's clock and the
    /// simulator's durations run this many times faster than the wall clock.
    pub speed: f64,
    /// `Fast` (the default): short operations and compressed specs. `Realistic`: Azure's
    /// durations and the operator's real settings, on a clock compressed by `speed`.
    pub timing: TimingProfile,
    /// Seed of the realistic draws.
    pub seed: u64,
    /// What to expect of some VMs (by name) instead of what their fault implies (for specs
    /// given in `objects` that change the ladder).
    pub expect: BTreeMap<String, Expect>,
    /// Give up after this long.
    pub timeout: Duration,
    /// Stop once every VM reached what the demo expects.
    pub exit_when_settled: bool,
    /// Serve `/metrics` here.
    pub metrics_addr: Option<SocketAddr>,
    /// Live table (terminal) or event lines.
    pub live_table: bool,
    /// One `RdpHealthFleet` over the simulated subscriptions instead of one object per VM.
    pub fleet: bool,
}

impl Default for DemoConfig {
    fn default() -> Self {
        Self {
            vms: 12,
            scenario: None,
            objects: Vec::new(),
            speed: 1.0,
            timing: TimingProfile::Fast,
            seed: 1,
            expect: BTreeMap::new(),
            timeout: Duration::from_secs(120),
            exit_when_settled: false,
            metrics_addr: None,
            live_table: std::io::stdout().is_terminal(),
            fleet: false,
        }
    }
}

/// Why the demo could not run.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The scenario or the simulator failed.
    #[error("failed to start the simulator: {0}")]
    Sim(#[from] crate::sim::SimError),
    /// An object file could not be read.
    #[error("failed to read {path}: {why}")]
    Objects {
        /// The file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// An object names a VM the demo does not simulate.
    #[error(
        "{path} names VM {vm:?}, which the demo does not simulate; the demo's VMs are: {known} (objects given with -f change the ladder of one of them)"
    )]
    UnknownVm {
        /// The file.
        path: PathBuf,
        /// The VM it names.
        vm: String,
        /// The demo's VM names.
        known: String,
    },
    /// `-f` files and `--fleet` together: a fleet's members take their spec from its template.
    #[error(
        "-f cannot be combined with --fleet: a fleet's members take their spec from the fleet's template"
    )]
    FilesWithFleet,
    /// Something else failed to start.
    #[error("failed to start the demo: {0}")]
    Setup(String),
}

/// The demo's result.
#[derive(Debug, Clone)]
pub struct Summary {
    /// Every VM at the end.
    pub vms: Vec<Tracked>,
    /// ARM requests by operation.
    pub arm_calls: BTreeMap<String, u64>,
    /// Whether every VM reached what the demo expects.
    pub settled: bool,
    /// How long the demo ran.
    pub elapsed: Duration,
}

/// Runs the demo to the end (timeout, settled, or ctrl-c).
pub async fn run(cfg: &DemoConfig) -> Result<Summary, DemoError> {
    let speed = if cfg.speed.is_finite() && cfg.speed > 0.0 {
        cfg.speed
    } else {
        1.0
    };
    let realistic = cfg.timing == TimingProfile::Realistic;
    let mut scenario = match &cfg.scenario {
        Some(path) => Scenario::from_file(path)?,
        None => Scenario::from_yaml(&fleet::scenario_yaml(cfg.vms.max(1), speed))?,
    };
    if realistic {
        scenario.timing = Timing::realistic(cfg.seed, speed);
    }
    // Realistic: the specs stay real and the clock is compressed; fast: the other way round.
    let (clock, compress) = if realistic {
        (Clock::new(speed), None)
    } else {
        (Clock::new(1.0), Some(speed))
    };
    let started = Instant::now();
    if cfg.fleet && !cfg.objects.is_empty() {
        return Err(DemoError::FilesWithFleet);
    }
    let overrides = load_objects(&cfg.objects)?;
    let sim = Simulator::start(scenario).await?;
    // An object for a VM the demo does not simulate would silently do nothing: refuse it.
    let names: Vec<String> = sim.vms().into_iter().map(|vm| vm.name).collect();
    if let Some((vm, (path, _))) = overrides
        .iter()
        .find(|(vm, _)| !names.iter().any(|n| n.eq_ignore_ascii_case(vm)))
    {
        let err = DemoError::UnknownVm {
            path: path.clone(),
            vm: vm.clone(),
            known: names.join(", "),
        };
        sim.shutdown().await;
        return Err(err);
    }
    let state = Arc::new(State {
        clock,
        objects: Mutex::new(BTreeMap::new()),
        log: Mutex::new(Vec::new()),
    });
    // A fleet discovers the VMs itself: its incidents become the demo's objects.
    for vm in sim.vms().into_iter().filter(|_| !cfg.fleet) {
        let fault = vm.faults.first().copied();
        let given = overrides
            .get(&vm.name.to_ascii_lowercase())
            .map(|(_, obj)| obj);
        let obj = object_for(&vm, compress, given);
        let tracked = Tracked {
            obj,
            fault,
            answers_as: vm.answers_as.clone(),
            expect: cfg
                .expect
                .get(&vm.name)
                .copied()
                .unwrap_or_else(|| Expect::for_vm(fault, vm.answers_as.as_deref())),
            detected_after: None,
            recovered_after: None,
            fixed_by: None,
            diagnosis: None,
            last_event: None,
        };
        if let Ok(mut objects) = state.objects.lock() {
            objects.insert(vm.name.clone(), tracked);
        }
    }
    let arm = Url::parse(&sim.arm_url()).map_err(|e| DemoError::Setup(e.to_string()))?;
    let arm_client = Arc::new(ArmClient::new(
        ArmConfig::new(arm),
        Arc::new(StaticToken::new("demo-token")),
    ));
    let azure = Arc::new(
        CountedAzure::new(arm_client.clone()).map_err(|e| DemoError::Setup(e.to_string()))?,
    );
    // The demo's timers are compressed; so is the grace before disruptive rungs. Its fleet
    // is broken on purpose, mostly at once, so the fleet-wide breaker is off.
    let fleet = Arc::new(Fleet::new(FleetPolicy {
        disruptive_grace: compress.map_or(FleetPolicy::default().disruptive_grace, |speed| {
            Duration::from_secs_f64(2.0 / speed)
        }),
        fleet_max_failing_percent: 100,
        ..FleetPolicy::default()
    }));
    let metrics = Arc::new(Metrics::new().map_err(|e| DemoError::Setup(e.to_string()))?);
    metrics
        .register_azure(&azure)
        .map_err(|e| DemoError::Setup(e.to_string()))?;
    let rdp_prober = Arc::new(RdpProber::new().map_err(|e| DemoError::Setup(e.to_string()))?);
    // The objects name their loopback responder; a fleet's members and incidents are probed at
    // the addresses ARM reports, routed to the responders. Azure tells whom they must answer as.
    let prober: Arc<dyn crate::probe::Prober> = if cfg.fleet {
        Arc::new(sim.address_prober(rdp_prober))
    } else {
        rdp_prober
    };
    let engine = Arc::new(Engine {
        resolver: Arc::new(AzureResolver::new(azure.clone(), ResolverPolicy::default())),
        prober: Arc::clone(&prober),
        remediator: Arc::new(Remediator {
            azure,
            fleet: fleet.clone(),
            probe_source: Some(sim_probe_source()),
            first_poll: compress.map_or(Duration::from_secs(1), |speed| {
                Duration::from_millis((300.0 / speed) as u64 + 20)
            }),
            vm_rdp_port: Some(crate::probe::DEFAULT_RDP_PORT),
            secrets: Some(Arc::new(crate::secrets::MemorySecrets::default())),
            leadership: Arc::new(crate::engine::remediate::SoleReplica),
        }),
        metrics: metrics.clone(),
        state: state.clone(),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    if let Some(addr) = cfg.metrics_addr {
        serve_metrics(addr, metrics, state.clone(), stop_rx.clone()).await?;
    }
    let mut tasks = Vec::new();
    for name in state
        .snapshot()
        .iter()
        .filter_map(|t| t.obj.metadata.name.clone())
    {
        tasks.push(tokio::spawn(driver::drive(
            engine.clone(),
            name,
            stop_rx.clone(),
        )));
    }
    let fleet_demo = if cfg.fleet {
        Some(start_fleet(
            &sim,
            &engine,
            &arm_client,
            prober,
            compress,
            cfg,
            stop_rx.clone(),
        ))
    } else {
        None
    };
    let settled = match &fleet_demo {
        Some((sink, _)) => {
            let sink = Arc::clone(sink);
            watch_until_done(cfg, &state, &fleet, &move || sink.settled()).await
        }
        None => watch_until_done(cfg, &state, &fleet, &|| all_settled(&state)).await,
    };
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    if let Some((sink, worker)) = fleet_demo {
        let _ = worker.await;
        sink.stop().await;
        if let Some(status) = sink.status() {
            view::fleet_line(&status);
        }
    }
    view::flush_log(&state, cfg.live_table);
    let summary = Summary {
        vms: state.snapshot(),
        arm_calls: sim.counters(),
        settled,
        elapsed: started.elapsed(),
    };
    sim.shutdown().await;
    Ok(summary)
}

/// The address the simulator evaluates NSG rules for (the prober's public address).
fn sim_probe_source() -> std::net::IpAddr {
    std::net::IpAddr::from([203, 0, 113, 10])
}

async fn watch_until_done(
    cfg: &DemoConfig,
    state: &State,
    fleet: &Fleet,
    all_settled: &dyn Fn() -> bool,
) -> bool {
    let deadline = Instant::now() + cfg.timeout;
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::signal::ctrl_c() => return all_settled(),
        }
        fleet.update(state.fleet_view());
        if cfg.live_table {
            view::draw_table(state);
        } else {
            view::flush_log(state, false);
        }
        let settled = all_settled();
        if (cfg.exit_when_settled && settled) || Instant::now() >= deadline {
            return settled;
        }
    }
}

/// Starts the demo's fleet: its worker (discovery through the emulator's Resource Graph,
/// members probed in memory) over a sink whose incident objects the engine drives.
fn start_fleet(
    sim: &Simulator,
    engine: &Arc<Engine>,
    arm: &Arc<ArmClient>,
    prober: Arc<dyn crate::probe::Prober>,
    compress: Option<f64>,
    cfg: &DemoConfig,
    stop: watch::Receiver<bool>,
) -> (Arc<fleet_mode::DemoSink>, tokio::task::JoinHandle<()>) {
    let vms: BTreeMap<String, fleet_mode::SimulatedVm> = sim
        .vms()
        .into_iter()
        .map(|vm| {
            (
                vm.name.to_ascii_lowercase(),
                fleet_mode::SimulatedVm {
                    fault: vm.faults.first().copied(),
                    answers_as: vm.answers_as,
                },
            )
        })
        .collect();
    let mut subscriptions: Vec<String> = sim.vms().into_iter().map(|vm| vm.subscription).collect();
    subscriptions.sort();
    subscriptions.dedup();
    let expect = cfg
        .expect
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), *v))
        .collect();
    let sink = Arc::new(fleet_mode::DemoSink::new(Arc::clone(engine), vms, expect));
    let (probe, remediation) = demo_policy(compress);
    let fleet = fleet_mode::demo_fleet(subscriptions, probe, remediation);
    let deps = crate::fleet::Deps {
        graph: Arc::clone(arm) as Arc<dyn crate::azure::ResourceGraph>,
        prober,
        sink: Arc::clone(&sink) as Arc<dyn crate::fleet::FleetSink>,
        max_unreachable_percent: 100,
        min_fleet_size: 5,
        probe_concurrency: 64,
        refusal: None,
    };
    let (_spec, spec_rx) = watch::channel(Arc::new(fleet));
    let worker = tokio::spawn(async move {
        // The spec's sender lives as long as the worker.
        let _spec = _spec;
        crate::fleet::worker::run(deps, spec_rx, stop).await;
    });
    (sink, worker)
}

fn all_settled(state: &State) -> bool {
    state.snapshot().iter().all(Tracked::settled)
}

async fn serve_metrics(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    state: Arc<State>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), DemoError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| DemoError::Setup(format!("failed to listen on {addr}: {e}")))?;
    let http = crate::http::HttpState {
        metrics,
        inventory: state,
        ready: Arc::new(AtomicBool::new(true)),
    };
    tokio::spawn(async move {
        let shutdown = async move {
            let _ = stop.changed().await;
        };
        if let Err(e) = crate::http::serve(listener, http, shutdown).await {
            tracing::warn!(error = %e, "metrics server stopped");
        }
    });
    Ok(())
}

/// The objects in `paths`, by the lower-cased name of the VM they watch, with their file.
fn load_objects(paths: &[PathBuf]) -> Result<BTreeMap<String, (PathBuf, RdpHealth)>, DemoError> {
    let mut out = BTreeMap::new();
    for path in paths {
        let text = std::fs::read_to_string(path).map_err(|e| DemoError::Objects {
            path: path.clone(),
            why: e.to_string(),
        })?;
        let docs: Vec<RdpHealth> =
            serde_saphyr::from_multiple(&text).map_err(|e| DemoError::Objects {
                path: path.clone(),
                why: e.to_string(),
            })?;
        for obj in docs {
            out.insert(obj.spec.vm_key(), (path.clone(), obj));
        }
    }
    Ok(out)
}

/// The `RdpHealth` the demo creates for a simulated VM: Auto mode with disruptive rungs
/// allowed, probing the VM's loopback responder; with `compress`, its timers are the demo's
/// short ones divided by it, without, the operator's defaults.
fn object_for(
    vm: &crate::sim::VmSummary,
    compress: Option<f64>,
    given: Option<&RdpHealth>,
) -> RdpHealth {
    let spec = given.map(|o| o.spec.clone()).unwrap_or_else(|| {
        let (probe, remediation) = demo_policy(compress);
        RdpHealthSpec {
            vm: VmRef {
                resource_id: String::new(),
            },
            endpoint: EndpointSpec::default(),
            probe,
            remediation,
            evidence: Default::default(),
            suspend: false,
        }
    });
    object_with(vm, spec)
}

/// The demo's policy: `Auto` with the disruptive rungs allowed; with `compress`, the demo's
/// short timers divided by it, without, the operator's defaults.
fn demo_policy(compress: Option<f64>) -> (ProbeSpec, RemediationSpec) {
    let auto = RemediationSpec {
        mode: RemediationMode::Auto,
        allowed_disruptive_actions: vec![Rung::ResetNic, Rung::Restart, Rung::Redeploy],
        ..RemediationSpec::default()
    };
    match compress {
        None => (ProbeSpec::default(), auto),
        Some(speed) => compressed_timers(speed, auto),
    }
}

/// The demo's short probe and ladder timers, divided by `speed`.
fn compressed_timers(speed: f64, remediation: RemediationSpec) -> (ProbeSpec, RemediationSpec) {
    let d = |ms: f64| format!("{}ms", ((ms / speed).max(10.0)) as u64);
    let probe = ProbeSpec {
        interval: d(1000.0),
        unhealthy_interval: d(500.0),
        confirm_interval: d(500.0),
        timeout: d(400.0),
        failure_threshold: 2,
        success_threshold: 1,
        certificate_warning: "14d".into(),
        identity_check_interval: "10m".into(),
    };
    let remediation = RemediationSpec {
        backoff: BackoffSpec {
            initial: d(500.0),
            max: d(2000.0),
            multiplier: 2.0,
            jitter: 0.1,
        },
        settle_time: d(1000.0),
        cooldown: d(5000.0),
        ..remediation
    };
    (probe, remediation)
}

/// The object for `vm` with `spec`, pointed at the VM and its loopback responder.
fn object_with(vm: &crate::sim::VmSummary, mut spec: RdpHealthSpec) -> RdpHealth {
    let resource_id = format!(
        "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Compute/virtualMachines/{}",
        vm.subscription, vm.resource_group, vm.name
    );
    // The simulated VMs' addresses are documentation ranges: probe the loopback responder.
    spec.vm.resource_id = resource_id;
    spec.endpoint.host = Some(vm.rdp.ip().to_string());
    spec.endpoint.port = vm.rdp.port();
    RdpHealth {
        metadata: ObjectMeta {
            name: Some(vm.name.clone()),
            namespace: Some("demo".into()),
            generation: Some(1),
            uid: Some(format!("demo-{}", vm.name)),
            ..Default::default()
        },
        spec,
        status: None,
    }
}
