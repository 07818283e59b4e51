//! Probing the simulated VMs at the addresses ARM reports for them.
//!
//! The emulator reports documentation-range addresses (the addresses real VMs would have);
//! each VM's RDP responder listens on a loopback port. [`AddressProber`] probes the responder
//! of the VM that holds a reported address, so a fleet that discovered those addresses probes
//! the simulated VMs, and no packet ever leaves loopback: an address no simulated VM holds is
//! answered as unreachable without any connection.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, PoisonError},
};

use futures::future::BoxFuture;

use super::Shared;
use crate::probe::{Failure, FailureReason, Layers, ProbeOptions, ProbeReport, Prober, Target};

/// A prober that maps the simulator's ARM addresses to its responders.
pub struct AddressProber {
    shared: Arc<Shared>,
    inner: Arc<dyn Prober>,
    /// (world version, address → responder), rebuilt when the world changed.
    index: Mutex<(u64, Arc<HashMap<IpAddr, SocketAddr>>)>,
}

impl AddressProber {
    pub(super) fn new(shared: Arc<Shared>, inner: Arc<dyn Prober>) -> Self {
        Self {
            shared,
            inner,
            index: Mutex::new((0, Arc::default())),
        }
    }

    /// The address index as of the world's current version.
    fn index(&self) -> Arc<HashMap<IpAddr, SocketAddr>> {
        let version = *self.shared.changes().borrow();
        let mut index = self.index.lock().unwrap_or_else(PoisonError::into_inner);
        if index.0 != version || index.1.is_empty() {
            let mut map = HashMap::new();
            for vm in self.shared.vm_summaries() {
                for ip in [&vm.public_ip, &vm.private_ip].into_iter().flatten() {
                    if let Ok(ip) = ip.parse::<IpAddr>() {
                        map.insert(ip, vm.rdp);
                    }
                }
            }
            *index = (version, Arc::new(map));
        }
        Arc::clone(&index.1)
    }
}

impl Prober for AddressProber {
    fn probe<'a>(
        &'a self,
        target: &'a Target,
        opts: &'a ProbeOptions,
    ) -> BoxFuture<'a, ProbeReport> {
        Box::pin(async move {
            let responder = target
                .host
                .parse::<IpAddr>()
                .ok()
                .and_then(|ip| self.index().get(&ip).copied());
            match responder {
                Some(addr) if target.port == crate::probe::DEFAULT_RDP_PORT => {
                    let mapped = Target {
                        host: addr.ip().to_string(),
                        port: addr.port(),
                    };
                    let mut report = self.inner.probe(&mapped, opts).await;
                    report.target = target.to_string();
                    report
                }
                _ => ProbeReport {
                    target: target.to_string(),
                    reachable: false,
                    failure: Some(Failure::new(
                        FailureReason::TcpUnreachable,
                        format!("no simulated VM listens on {target}"),
                    )),
                    layers: Layers::default(),
                    selected_protocol: None,
                    tls: None,
                    nla: None,
                    findings: Vec::new(),
                    likely_causes: Vec::new(),
                    total_ms: 0.0,
                },
            }
        })
    }
}
