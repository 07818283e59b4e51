//! `rdphealth demo`: the simulator, a fleet with faults, and the engine, on one machine.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Args;

use super::parse_positive_duration;
use crate::{
    demo::{self, DemoConfig, DemoError},
    sim::TimingProfile,
};

/// Arguments of `rdphealth demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// VMs in the built-in fleet (one per fault class and one whose address another computer
    /// answers on, cycled).
    #[arg(long, default_value_t = 12, value_parser = clap::value_parser!(u16).range(1..=2000))]
    pub vms: u16,
    /// A simulator scenario file instead of the built-in fleet.
    #[arg(long)]
    pub scenario: Option<PathBuf>,
    /// RdpHealth YAML files whose specs replace the generated ones (matched by VM name; a VM
    /// the demo does not simulate is an error).
    #[arg(short = 'f', long = "file")]
    pub files: Vec<PathBuf>,
    /// Exit once every VM is healthy or in the state the scenario expects (0), or at the timeout (1).
    #[arg(long)]
    pub exit_when_settled: bool,
    /// Give up after this long.
    #[arg(long, default_value = "120s", value_parser = parse_positive_duration)]
    pub timeout: Duration,
    /// Compress the probe and ladder timers (2 = twice as fast). With `--timing realistic`
    /// it compresses the demo's clock and Azure's durations alike (e.g. 60: a minute a second).
    #[arg(long, default_value_t = 1.0, value_parser = parse_speed)]
    pub speed: f64,
    /// `fast` (default): operations finish in seconds, the demo's timers are short.
    /// `realistic`: Azure's durations (restart minutes, redeploy 5–15 min, Run Command ≥ 20 s,
    /// Retry-After 10–60 s) and the operator's default settings, on a clock sped up by `--speed`.
    #[arg(long, default_value = "fast", value_parser = super::sim::parse_timing)]
    pub timing: TimingProfile,
    /// Seed of the realistic draws (the same seed gives the same durations).
    #[arg(long, default_value_t = 1)]
    pub timing_seed: u64,
    /// Serve /metrics (the operator's metrics) on this address.
    #[arg(long, env = "RDPHEALTH_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Print event lines even on a terminal (no live table).
    #[arg(long)]
    pub plain: bool,
    /// Watch the simulated VMs with one RdpHealthFleet (discovered through the emulator's
    /// Resource Graph, probed in memory) instead of one RdpHealth per VM: only the VMs that
    /// break get an object.
    #[arg(long)]
    pub fleet: bool,
}

fn parse_speed(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && (0.1..=600.0).contains(&v) => Ok(v),
        _ => Err(format!("speed {s:?} must be a number between 0.1 and 600")),
    }
}

/// Runs the demo and prints the summary; `Ok(true)` when every VM settled as expected.
pub async fn run(args: &DemoArgs) -> Result<bool, DemoError> {
    let cfg = DemoConfig {
        vms: usize::from(args.vms),
        scenario: args.scenario.clone(),
        objects: args.files.clone(),
        speed: args.speed,
        timing: args.timing,
        seed: args.timing_seed,
        expect: Default::default(),
        timeout: args.timeout,
        exit_when_settled: args.exit_when_settled,
        metrics_addr: args.metrics_addr,
        live_table: !args.plain && std::io::IsTerminal::is_terminal(&std::io::stdout()),
        fleet: args.fleet,
    };
    let summary = demo::run(&cfg).await?;
    print!("{}", demo::view::render_summary(&summary));
    Ok(summary.settled)
}
