//! The canary (`--canary HOST:PORT`): an endpoint that should always accept connections. While
//! the prober cannot reach it, the prober is presumed blind and every mutating rung is held.

use super::*;
use crate::probe::{Layer, ProbeOptions};

/// How often the canary is probed.
pub(super) const CANARY_INTERVAL: Duration = Duration::from_secs(10);

/// Probes `target` every `every` until the task is dropped, telling `fleet` and `metrics`.
/// Only the TCP connect counts: any service that accepts connections can be the canary.
pub(super) async fn watch(
    prober: Arc<dyn Prober>,
    target: Target,
    fleet: Arc<Fleet>,
    metrics: Arc<Metrics>,
    every: Duration,
) {
    fleet.expect_canary();
    metrics.observer_blind("canary", true);
    let mut was_up = None;
    loop {
        let report = prober.probe(&target, &ProbeOptions::default()).await;
        let up = report
            .failure
            .as_ref()
            .is_none_or(|f| !matches!(f.reason.layer(), Layer::Dns | Layer::Tcp));
        fleet.canary_probed(up);
        metrics.observer_blind("canary", !up);
        if was_up != Some(up) {
            match (up, report.failure.as_ref()) {
                (true, _) => {
                    info!(canary = %report.target, "the canary answers: remediation may act")
                }
                (false, Some(f)) => {
                    warn!(canary = %report.target, reason = %f.reason, detail = %f.detail, "the canary fails: every rung is held")
                }
                (false, None) => {
                    warn!(canary = %report.target, "the canary fails: every rung is held")
                }
            }
            was_up = Some(up);
        }
        tokio::time::sleep(every).await;
    }
}
