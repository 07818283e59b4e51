//! `rdphealth bench ...`: benchmarks that print numbers (see BENCHMARKS.md).

use std::{net::SocketAddr, time::Duration};

use clap::{Args, Subcommand};

use super::parse_positive_duration;
use crate::{
    bench,
    probe::{ProbeOptions, Target},
};

/// Arguments of `rdphealth bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Which benchmark.
    #[command(subcommand)]
    pub command: BenchCommand,
}

/// The benchmarks.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Print a simulator scenario of N healthy VMs (YAML), for `rdphealth sim`.
    Scenario {
        /// Number of VMs.
        #[arg(long, default_value_t = 1000)]
        vms: usize,
    },
    /// Serve loopback TLS responders (direct TLS or X.224 then TLS) until ctrl-c or `--for`.
    Responders {
        /// How many.
        #[arg(long, default_value_t = 20)]
        count: usize,
        /// Stop after this long.
        #[arg(long = "for", default_value = "10m", value_parser = parse_positive_duration)]
        run_for: Duration,
        /// Answer as Azure's Windows images: CredSSP required, with the first CredSSP round
        /// (the identity step's NTLM CHALLENGE).
        #[arg(long)]
        hybrid: bool,
    },
    /// Probe targets round-robin at a fixed rate and print the CPU spent per probe.
    Probe {
        /// Targets, `HOST:PORT`, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        targets: Vec<String>,
        /// Probes per second.
        #[arg(long, default_value_t = 20.0)]
        rate: f64,
        /// How long to probe.
        #[arg(long, default_value = "30s", value_parser = parse_positive_duration)]
        duration: Duration,
        /// Deadline of one probe.
        #[arg(long, default_value = "5s", value_parser = parse_positive_duration)]
        timeout: Duration,
        /// Run the identity step (NTLM NEGOTIATE / CHALLENGE and the NLA check) on every
        /// probe, to measure what it adds.
        #[arg(long)]
        identity: bool,
    },
    /// Drive every VM of a running simulator with the engine and print one table.
    Fleet {
        /// The simulator's ARM emulator address (`rdphealth sim --listen`).
        #[arg(long, default_value = "127.0.0.1:18080")]
        sim: SocketAddr,
        /// Probe interval of every object.
        #[arg(long, default_value = "30s", value_parser = parse_positive_duration)]
        interval: Duration,
        /// Measuring window, after one interval of warm-up.
        #[arg(long, default_value = "120s", value_parser = parse_positive_duration)]
        duration: Duration,
        /// Share of VMs given an `rdp_disabled` outage after the window.
        #[arg(long, default_value_t = 0.01)]
        outage_fraction: f64,
        /// Use only the first N VMs of the simulator (not with `--members`: a fleet discovers
        /// every VM).
        #[arg(long, conflicts_with = "members")]
        vms: Option<usize>,
        /// One RdpHealthFleet over every VM instead (discovery through the emulator's Resource
        /// Graph endpoint, members probed in memory, incidents counted).
        #[arg(long)]
        members: bool,
    },
}

/// Runs a benchmark and prints its results.
pub async fn run(args: &BenchArgs) -> Result<(), String> {
    match &args.command {
        BenchCommand::Scenario { vms } => {
            print!("{}", bench::scenario::healthy_yaml(*vms));
            Ok(())
        }
        BenchCommand::Responders {
            count,
            run_for,
            hybrid,
        } => {
            for addr in bench::responder::start(*count, *hybrid).await? {
                println!("responder {addr}");
            }
            tokio::select! {
                _ = tokio::time::sleep(*run_for) => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            Ok(())
        }
        BenchCommand::Probe {
            targets,
            rate,
            duration,
            timeout,
            identity,
        } => {
            let targets = targets
                .iter()
                .map(|t| t.parse::<Target>().map_err(|e| e.to_string()))
                .collect::<Result<Vec<_>, _>>()?;
            let opts = ProbeOptions {
                timeout: *timeout,
                identity: *identity,
                ..ProbeOptions::default()
            };
            let run = bench::probe::run(&targets, *rate, *duration, &opts).await?;
            println!("{}", run.line());
            Ok(())
        }
        BenchCommand::Fleet {
            sim,
            interval,
            duration,
            outage_fraction,
            vms,
            members,
        } => {
            let cfg = bench::fleet::FleetConfig {
                sim: *sim,
                interval: *interval,
                duration: *duration,
                outage_fraction: *outage_fraction,
                limit: *vms,
            };
            println!("| measure | value |\n|---|---|");
            if *members {
                print!("{}", bench::fleet_members::run(&cfg).await?.table());
            } else {
                print!("{}", bench::fleet::run(&cfg).await?.table());
            }
            Ok(())
        }
    }
}
