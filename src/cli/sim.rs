//! `rdphealth sim --listen 127.0.0.1:PORT --scenario FILE`: runs the simulator until ctrl-c.

use std::{net::SocketAddr, path::PathBuf};

use clap::Args;

use crate::sim::{Scenario, SimError, Simulator, TimingProfile};

/// Arguments of `rdphealth sim`.
#[derive(Debug, Args)]
pub struct SimArgs {
    /// Address of the ARM emulator (plain HTTP).
    #[arg(long, env = "RDPHEALTH_SIM_LISTEN", default_value = "127.0.0.1:18080")]
    pub listen: SocketAddr,
    /// Scenario file (YAML).
    #[arg(long, env = "RDPHEALTH_SIM_SCENARIO")]
    pub scenario: PathBuf,
    /// `fast`: operations finish in seconds; `realistic`: durations and Retry-After drawn
    /// from Azure's ranges (restart minutes, redeploy 5–15 min, Run Command ≥ 20 s,
    /// Retry-After 10–60 s), in real time. Default: the scenario's `timing.profile`.
    #[arg(long, env = "RDPHEALTH_SIM_TIMING", value_parser = parse_timing)]
    pub timing: Option<TimingProfile>,
    /// Seed of the realistic draws (the same seed gives the same durations).
    #[arg(long, env = "RDPHEALTH_SIM_TIMING_SEED")]
    pub timing_seed: Option<u64>,
}

/// Parses `fast` or `realistic`.
pub fn parse_timing(s: &str) -> Result<TimingProfile, String> {
    s.parse()
}

/// Starts the simulator, prints where everything listens, and runs until ctrl-c.
pub async fn run(args: &SimArgs) -> Result<(), SimError> {
    let mut scenario = Scenario::from_file(&args.scenario)?;
    if let Some(profile) = args.timing {
        scenario.timing.profile = profile;
    }
    if let Some(seed) = args.timing_seed {
        scenario.timing.seed = seed;
    }
    let sim = Simulator::start_on(scenario, args.listen).await?;
    println!("ARM emulator: {}", sim.arm_url());
    println!(
        "admin API:    {}/_sim/vms  {}/_sim/counters",
        sim.arm_url(),
        sim.arm_url()
    );
    for vm in sim.vms() {
        let faults: Vec<&str> = vm.faults.iter().map(|f| f.as_str()).collect();
        println!(
            "VM {:<24} rdp {}  public {}  faults [{}]",
            vm.name,
            vm.rdp,
            vm.public_ip.as_deref().unwrap_or("-"),
            faults.join(", ")
        );
    }
    let _ = tokio::signal::ctrl_c().await;
    let counters = sim.counters();
    let total: u64 = counters.values().sum();
    tracing::info!(total, counters = ?counters, "ARM requests served by operation");
    sim.shutdown().await;
    Ok(())
}
