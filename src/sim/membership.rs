//! Changes to the simulated estate's membership while it runs (a VM created, deleted,
//! retagged), as a fleet's discovery sees them, and Resource Graph's per-caller quota.

use std::{collections::BTreeMap, net::SocketAddr, sync::Arc, time::Duration};

use tokio::{net::TcpListener, sync::watch, time::Instant};

use super::{SimError, responder, scenario::VmSpec, world::World};

/// Resource Graph's per-caller quota: `requests` per `window` (the service's default is 15
/// requests per 5 seconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GraphQuota {
    /// Requests allowed in one window.
    pub requests: u32,
    /// The window's length.
    pub window: Duration,
}

impl Default for GraphQuota {
    fn default() -> Self {
        Self {
            requests: 15,
            window: Duration::from_secs(5),
        }
    }
}

/// One caller's current window.
#[derive(Debug, Clone, Copy)]
pub struct GraphWindow {
    started: Instant,
    used: u32,
}

/// The quota a request left: remaining requests and the time to the window's reset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaLeft {
    /// Requests left in the window.
    pub remaining: u32,
    /// Until the window resets.
    pub resets_after: Duration,
}

/// What starts a responder for a VM created at run time.
#[derive(Debug)]
pub struct RuntimeResponders {
    /// The key the responders' certificates are signed with.
    pub cert_key: responder::CertificateKey,
    /// The simulator's shutdown signal.
    pub shutdown: watch::Receiver<bool>,
}

impl World {
    /// Takes one Resource Graph request from `caller`'s window: what is left, or (when spent)
    /// the time until the window resets.
    pub fn take_graph_quota(&mut self, caller: u64) -> Result<QuotaLeft, QuotaLeft> {
        let now = Instant::now();
        let quota = self.graph_quota;
        let w = self.graph_windows.entry(caller).or_insert(GraphWindow {
            started: now,
            used: 0,
        });
        if now.saturating_duration_since(w.started) >= quota.window {
            *w = GraphWindow {
                started: now,
                used: 0,
            };
        }
        let resets_after = quota
            .window
            .saturating_sub(now.saturating_duration_since(w.started));
        if w.used >= quota.requests {
            return Err(QuotaLeft {
                remaining: 0,
                resets_after,
            });
        }
        w.used += 1;
        Ok(QuotaLeft {
            remaining: quota.requests - w.used,
            resets_after,
        })
    }

    /// Deletes a VM with its NIC and public IP; false when there is no such VM.
    pub fn delete_vm(&mut self, name: &str) -> bool {
        let Some(vm) = self.vms.remove(&name.to_ascii_lowercase()) else {
            return false;
        };
        if let Some(nic) = self.nics.remove(&vm.nic)
            && let Some(pip) = nic.pip
        {
            self.pips.remove(&pip);
        }
        true
    }

    /// Replaces a VM's tags; false when there is no such VM.
    pub fn set_tags(&mut self, name: &str, tags: BTreeMap<String, String>) -> bool {
        match self.vms.get_mut(&name.to_ascii_lowercase()) {
            Some(vm) => {
                vm.tags = tags;
                true
            }
            None => false,
        }
    }

    /// Creates a VM in `sub`/`rg` (in its virtual network's region), without a responder yet.
    pub fn create_vm(&mut self, sub: &str, rg: &str, spec: &VmSpec) -> Result<(), SimError> {
        let bad = |m: String| SimError::Scenario(m);
        if !self.subs.contains_key(&sub.to_ascii_lowercase()) {
            return Err(bad(format!("no subscription {sub}")));
        }
        if spec.name.is_empty() || spec.name.contains('/') {
            return Err(bad(format!("invalid VM name {:?}", spec.name)));
        }
        if self.vms.contains_key(&spec.name.to_ascii_lowercase()) {
            return Err(bad(format!("a VM named {} exists", spec.name)));
        }
        let vnet = spec
            .nic
            .subnet
            .split_once('/')
            .map(|(v, _)| v)
            .unwrap_or("");
        let location = self
            .vnets
            .get(&super::world::key(sub, rg, vnet))
            .map(|v| v.location.clone())
            .ok_or_else(|| bad(format!("VM {}: unknown virtual network", spec.name)))?;
        self.add_vm(sub, rg, &location, spec)
    }
}

impl super::Shared {
    /// Creates a VM at run time and starts its RDP responder (healthy unless `spec` says
    /// otherwise), then waits until it answers.
    pub async fn create_vm(
        self: &Arc<Self>,
        sub: &str,
        rg: &str,
        spec: &VmSpec,
    ) -> Result<(), SimError> {
        let bind_err = |source| SimError::Bind {
            addr: "127.0.0.1:0".into(),
            source,
        };
        let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .map_err(bind_err)?;
        let port = listener.local_addr().map_err(bind_err)?.port();
        let computer = spec.answers_as.clone().unwrap_or_else(|| spec.name.clone());
        let (certs, shutdown) = {
            let runtime = self.runtime.lock().unwrap_or_else(|p| p.into_inner());
            (
                runtime.cert_key.certificates(&computer)?,
                runtime.shutdown.clone(),
            )
        };
        let key = spec.name.to_ascii_lowercase();
        {
            let mut w = self.lock();
            w.create_vm(sub, rg, spec)?;
            if let Some(vm) = w.vms.get_mut(&key) {
                vm.port = port;
            }
        }
        self.applied
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.clone(), 0);
        tokio::spawn(responder::run(self.clone(), key, listener, certs, shutdown));
        self.notify();
        self.settled().await;
        Ok(())
    }

    /// Deletes a VM (its responder stops answering); false when there is no such VM.
    pub async fn delete_vm(&self, name: &str) -> bool {
        let ok = self.lock().delete_vm(name);
        self.notify();
        self.settled().await;
        ok
    }
}

/// `hh:mm:ss` of a duration, rounded up to the second (the quota headers' format).
pub fn hms(d: Duration) -> String {
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    format!("{:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_print_as_hms_rounded_up() {
        assert_eq!(hms(Duration::from_secs(5)), "00:00:05");
        assert_eq!(hms(Duration::from_millis(4200)), "00:00:05");
        assert_eq!(hms(Duration::from_secs(3723)), "01:02:03");
        assert_eq!(hms(Duration::ZERO), "00:00:00");
    }
}
