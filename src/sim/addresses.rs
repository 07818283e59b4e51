//! Probing the simulated VMs at the addresses ARM reports for them.
//!
//! The emulator reports documentation-range addresses (the addresses real VMs would have);
//! each VM's RDP responder listens on a loopback port. [`AddressProber`] probes the responder
//! of the VM that holds a reported address (whatever the port), the way a network would route
//! it, so whatever discovered those addresses probes the simulated VMs and no packet ever
//! leaves loopback. An address no simulated VM holds (an old address after a redeploy) is
//! refused: it is probed at loopback port 9, where nothing listens.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex, PoisonError},
};

use futures::future::BoxFuture;

use super::Shared;
use crate::probe::{ProbeOptions, ProbeReport, Prober, Target};

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
            let local = responder.unwrap_or(SocketAddr::from(([127, 0, 0, 1], 9)));
            let routed = Target {
                host: local.ip().to_string(),
                port: local.port(),
            };
            self.inner.probe(&routed, opts).await
        })
    }
}
