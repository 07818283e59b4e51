//! `rdphealth probe HOST[:PORT]`: one or more probes with human or JSON output.

use std::{collections::BTreeMap, fmt::Write as _, time::Duration};

use clap::Args;
use tokio::time::MissedTickBehavior;

use super::{parse_duration, parse_positive_duration};
use crate::probe::{Layer, ProbeOptions, ProbeReport, RdpProber, Target};

/// Arguments of `rdphealth probe`.
#[derive(Debug, Args)]
pub struct ProbeArgs {
    /// Endpoint to probe: HOST, HOST:PORT, [IPv6]:PORT (default port 3389).
    #[arg(value_name = "HOST[:PORT]")]
    pub target: String,
    /// Overall deadline of one probe (DNS, TCP, X.224, TLS and the identity step together).
    #[arg(long, default_value = "5s", value_parser = parse_positive_duration)]
    pub timeout: Duration,
    /// Report a certificate that expires within this period.
    #[arg(long, default_value = "14d", value_parser = parse_duration)]
    pub cert_warning: Duration,
    /// The computer the endpoint must answer as (NetBIOS or DNS name); another name exits 1.
    #[arg(long, value_name = "NAME")]
    pub expect_name: Option<String>,
    /// Skip the identity step (NTLM NEGOTIATE / CHALLENGE after TLS when CredSSP is selected).
    #[arg(long)]
    pub no_identity: bool,
    /// Report a server clock further off than this.
    #[arg(long, default_value = "5m", value_parser = parse_positive_duration)]
    pub max_clock_skew: Duration,
    /// Print one JSON object per probe instead of the human report.
    #[arg(long)]
    pub json: bool,
    /// Number of probes to run.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub count: u32,
    /// Time between the starts of consecutive probes.
    #[arg(long, default_value = "1s", value_parser = parse_positive_duration)]
    pub interval: Duration,
}

/// What the probe command ended with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// Every probe reached the endpoint.
    Reachable,
    /// At least one probe failed.
    Unreachable,
}

/// Why the probe command could not run.
#[derive(Debug, thiserror::Error)]
pub enum ProbeCommandError {
    /// The target could not be parsed.
    #[error("invalid target: {0}")]
    Target(#[from] crate::probe::TargetError),
    /// The TLS client could not be configured.
    #[error("failed to configure TLS: {0}")]
    Tls(#[from] rustls::Error),
}

/// Runs the probes, printing each result to stdout and a summary for `--count` > 1.
pub async fn run(args: &ProbeArgs) -> Result<ProbeOutcome, ProbeCommandError> {
    let target: Target = args.target.parse()?;
    let prober = RdpProber::new()?;
    let opts = ProbeOptions {
        timeout: args.timeout,
        layer_timeout: None,
        cert_warning: args.cert_warning,
        identity: !args.no_identity,
        expect_name: args.expect_name.clone(),
        max_clock_skew: args.max_clock_skew,
    };
    let mut ticker = tokio::time::interval(args.interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut reports = Vec::with_capacity(args.count as usize);
    for _ in 0..args.count {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = tokio::signal::ctrl_c() => break,
        }
        let report = prober.probe_once(&target, &opts).await;
        print_report(&report, args.json);
        reports.push(report);
    }
    if args.count > 1 {
        let summary = summarize(&reports);
        if args.json {
            eprint!("{summary}");
        } else {
            print!("{summary}");
        }
    }
    Ok(
        if !reports.is_empty() && reports.iter().all(|r| r.reachable) {
            ProbeOutcome::Reachable
        } else {
            ProbeOutcome::Unreachable
        },
    )
}

fn print_report(report: &ProbeReport, json: bool) {
    if json {
        match serde_json::to_string(report) {
            Ok(line) => println!("{line}"),
            Err(e) => eprintln!("failed to encode the report: {e}"),
        }
    } else {
        println!("{}", report.render_human());
    }
}

/// A latency/success summary over repeated probes.
pub fn summarize(reports: &[ProbeReport]) -> String {
    let mut out = String::new();
    let ok = reports.iter().filter(|r| r.reachable).count();
    let pct = if reports.is_empty() {
        0.0
    } else {
        100.0 * ok as f64 / reports.len() as f64
    };
    let _ = writeln!(
        out,
        "--- {} summary: {} probes, {} reachable ({pct:.1}%)",
        reports.first().map_or("", |r| r.target.as_str()),
        reports.len(),
        ok
    );
    let _ = writeln!(
        out,
        "  {:<6} {:>6} {:>9} {:>9} {:>9} {:>9}",
        "layer", "ok", "min ms", "p50 ms", "avg ms", "max ms"
    );
    for layer in Layer::ALL {
        let results: Vec<_> = reports.iter().filter_map(|r| r.layers.get(layer)).collect();
        if results.is_empty() {
            continue;
        }
        let ok = results.iter().filter(|r| r.ok).count();
        let mut ms: Vec<f64> = results.iter().map(|r| r.ms).collect();
        ms.sort_by(f64::total_cmp);
        let avg = ms.iter().sum::<f64>() / ms.len() as f64;
        let _ = writeln!(
            out,
            "  {:<6} {:>6} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
            layer.as_str(),
            format!("{ok}/{}", results.len()),
            ms[0],
            ms[ms.len() / 2],
            avg,
            ms[ms.len() - 1]
        );
    }
    let mut reasons: BTreeMap<&str, usize> = BTreeMap::new();
    for f in reports.iter().filter_map(|r| r.failure.as_ref()) {
        *reasons.entry(f.reason.as_str()).or_default() += 1;
    }
    for (reason, n) in reasons {
        let _ = writeln!(out, "  failures: {reason} x{n}");
    }
    out
}
