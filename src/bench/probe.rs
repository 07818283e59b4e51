//! `rdphealth bench probe`: probes a set of targets round-robin at a fixed rate for a fixed
//! time and prints the CPU this process spent per probe (the blackbox comparison's driver).

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use crate::probe::{ProbeOptions, RdpProber, Target};

/// What a run measured.
#[derive(Debug, Clone)]
pub struct ProbeRun {
    /// Probes started (and awaited).
    pub probes: u64,
    /// Probes that found RDP reachable.
    pub reachable: u64,
    /// CPU this process used while probing.
    pub cpu: Duration,
    /// Wall time of the probing.
    pub wall: Duration,
}

impl ProbeRun {
    /// CPU per probe.
    pub fn cpu_per_probe(&self) -> Duration {
        self.cpu
            .checked_div(self.probes.max(1) as u32)
            .unwrap_or_default()
    }

    /// One `key=value` line for scripts.
    pub fn line(&self) -> String {
        format!(
            "probes={} reachable={} cpu_ms={:.1} wall_s={:.1} cpu_per_probe_ms={:.3}",
            self.probes,
            self.reachable,
            self.cpu.as_secs_f64() * 1000.0,
            self.wall.as_secs_f64(),
            self.cpu_per_probe().as_secs_f64() * 1000.0
        )
    }
}

/// Probes `targets` round-robin, `rate` probes per second, for `duration`; each probe runs
/// in its own task so a slow one does not delay the next.
pub async fn run(
    targets: &[Target],
    rate: f64,
    duration: Duration,
    opts: &ProbeOptions,
) -> Result<ProbeRun, String> {
    if targets.is_empty() || !(rate.is_finite() && rate > 0.0) {
        return Err("need at least one target and a positive rate".into());
    }
    let prober = Arc::new(RdpProber::new().map_err(|e| e.to_string())?);
    let reachable = Arc::new(AtomicU64::new(0));
    let total = (rate * duration.as_secs_f64()).round().max(1.0) as u64;
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let cpu0 = super::cpu_time().unwrap_or_default();
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(total as usize);
    for i in 0..total {
        ticker.tick().await;
        let target = targets[i as usize % targets.len()].clone();
        let prober = prober.clone();
        let reachable = reachable.clone();
        let opts = opts.clone();
        tasks.push(tokio::spawn(async move {
            if prober.probe_once(&target, &opts).await.reachable {
                reachable.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    Ok(ProbeRun {
        probes: total,
        reachable: reachable.load(Ordering::Relaxed),
        cpu: super::cpu_time().unwrap_or_default().saturating_sub(cpu0),
        wall: started.elapsed(),
    })
}
