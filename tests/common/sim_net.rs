//! A prober that reaches the simulator's VMs the way a network would.

use std::{net::SocketAddr, sync::Arc};

use rdphealth::{
    probe::{BoxFuture, ProbeOptions, ProbeReport, Prober, RdpProber, Target},
    sim::Shared,
};

/// Routes the addresses ARM reports for a simulated VM to its loopback responder; any other
/// address is unreachable (as an old address is after a redeploy).
pub struct SimNetwork {
    /// The simulator's state.
    pub sim: Arc<Shared>,
    /// The real prober.
    pub prober: RdpProber,
}

impl Prober for SimNetwork {
    fn probe<'a>(
        &'a self,
        target: &'a Target,
        opts: &'a ProbeOptions,
    ) -> BoxFuture<'a, ProbeReport> {
        Box::pin(async move {
            let route = self.sim.vm_summaries().into_iter().find(|vm| {
                vm.public_ip.as_deref() == Some(target.host.as_str())
                    || vm.private_ip.as_deref() == Some(target.host.as_str())
            });
            // Nothing listens on port 9 of loopback: an unknown address is refused.
            let local = route.map_or(SocketAddr::from(([127, 0, 0, 1], 9)), |vm| vm.rdp);
            let routed = Target {
                host: local.ip().to_string(),
                port: local.port(),
            };
            self.prober.probe_once(&routed, opts).await
        })
    }
}
