//! Command-line interface: argument types shared by `main` and the subcommand runners.

pub mod bench;
pub mod crd;
pub mod demo;
pub mod probe;
pub mod run;
pub mod sim;

use std::time::Duration;

use clap::{Parser, Subcommand};

/// rdphealth: keeps Azure Windows VMs reachable over Remote Desktop.
#[derive(Debug, Parser)]
#[command(name = "rdphealth", version, about, propagate_version = true)]
pub struct Cli {
    /// Log format: `auto` (human on a terminal, JSON otherwise), `human` or `json`.
    #[arg(
        long,
        global = true,
        env = "RDPHEALTH_LOG_FORMAT",
        default_value = "auto"
    )]
    pub log_format: LogFormat,
    /// The command to run.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Probe an RDP endpoint layer by layer (TCP, X.224, TLS, certificate).
    Probe(probe::ProbeArgs),
    /// Run the operator: watch RdpHealth objects, probe, and keep their status true.
    Run(Box<run::RunArgs>),
    /// Print a CustomResourceDefinition (YAML): RdpHealth, or RdpHealthFleet with `--fleet`.
    Crd(crd::CrdArgs),
    /// Run the whole product on one machine: simulator, faulty fleet, engine, live view.
    Demo(demo::DemoArgs),
    /// Run the Azure simulator: an ARM emulator and one live RDP responder per VM.
    Sim(sim::SimArgs),
    /// Benchmarks: cost per probe, fleet scale, Azure API budget (see BENCHMARKS.md).
    Bench(bench::BenchArgs),
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable on a terminal, JSON otherwise.
    Auto,
    /// Human-readable.
    Human,
    /// One JSON object per line.
    Json,
}

/// Parses a duration such as `5s`, `250ms`, `14d` or `1h30m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

/// Parses a duration that must be greater than zero.
pub fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    match parse_duration(s)? {
        d if d.is_zero() => Err(format!("duration {s:?} must be greater than zero")),
        d => Ok(d),
    }
}

/// `error: cause: cause` from an error's source chain.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
