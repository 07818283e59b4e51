//! The `rdphealth` binary: argument parsing and wiring only.

use std::{io::IsTerminal, process::ExitCode};

use clap::Parser;
use rdphealth::cli::{Cli, Command, LogFormat, bench, crd, demo, error_chain, probe, run, sim};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: failed to start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(async {
        match cli.command {
            Command::Probe(args) => match probe::run(&args).await {
                Ok(probe::ProbeOutcome::Reachable) => ExitCode::SUCCESS,
                Ok(probe::ProbeOutcome::Unreachable) => ExitCode::from(1),
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(2)
                }
            },
            Command::Run(args) => match run::run(&args).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, reason = e.reason(), "operator stopped");
                    eprintln!("error: {}", error_chain(&e));
                    ExitCode::from(1)
                }
            },
            Command::Crd(args) => match crd::run(&args) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {}", error_chain(&e));
                    ExitCode::from(1)
                }
            },
            Command::Demo(args) => match demo::run(&args).await {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::from(1),
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(2)
                }
            },
            Command::Bench(args) => match bench::run(&args).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(2)
                }
            },
            Command::Sim(args) => match sim::run(&args).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(2)
                }
            },
        }
    })
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // azure_core 0.21 logs whole requests at debug level, Authorization header and body
    // (VMAccess passwords) included: never let it log below info.
    let filter = ["azure_core=info", "azure_identity=info"]
        .into_iter()
        .filter_map(|d| d.parse().ok())
        .fold(filter, EnvFilter::add_directive);
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Human => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
