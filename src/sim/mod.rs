//! The simulator: an ARM emulator over plain HTTP on loopback that the real SDK crates talk
//! to, and one live RDP responder per simulated VM whose behaviour follows the VM's state.
//! Remediations through the emulator change that state the way Azure would.
//!
//! Embedded in tests with [`Simulator::start`]; run standalone with `rdphealth sim`.

mod addresses;
mod applier;
pub mod arm;
pub mod disk;
mod estate;
pub mod fault;
pub mod guest;
pub mod membership;
pub mod registry;
mod resources;
pub mod responder;
pub mod scenario;
pub mod timing;
pub mod world;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
};

use serde::Serialize;
use tokio::{net::TcpListener, sync::watch, task::JoinSet};

use self::world::World;
pub use self::{
    addresses::AddressProber,
    fault::{Behaviour, Fault},
    scenario::Scenario,
    timing::{Timing, TimingProfile},
    world::HttpFault,
};

/// Why the simulator could not start.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// The scenario is malformed or inconsistent.
    #[error("failed to load the scenario: {0}")]
    Scenario(String),
    /// A socket could not be bound.
    #[error("failed to bind {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The responders' certificates could not be built.
    #[error("failed to build the responder TLS configuration: {0}")]
    Tls(String),
}

impl SimError {
    /// Stable PascalCase reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Scenario(_) => "InvalidScenario",
            Self::Bind { .. } => "BindFailed",
            Self::Tls(_) => "TlsSetupFailed",
        }
    }
}

/// State shared by the emulator, the responders and the handle.
#[derive(Debug)]
pub struct Shared {
    world: Mutex<World>,
    changed: watch::Sender<u64>,
    /// The change version each responder has applied to its listener.
    applied: Mutex<BTreeMap<String, u64>>,
    acked: tokio::sync::Notify,
    /// Starts the responders of VMs created at run time.
    runtime: Mutex<membership::RuntimeResponders>,
    /// `http://127.0.0.1:PORT`, the base of every absolute URL the emulator hands out.
    pub base_url: String,
}

impl Shared {
    /// Locks the world (a poisoned lock is recovered: the data stays usable).
    pub fn lock(&self) -> MutexGuard<'_, World> {
        self.world.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wakes responders after a state change.
    pub fn notify(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// A receiver of change notifications.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Records that `vm`'s responder has applied change `version`.
    pub fn ack(&self, vm: &str, version: u64) {
        self.applied
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(vm.to_owned(), version);
        self.acked.notify_waiters();
    }

    /// Waits (at most two seconds) until every responder has applied the latest change, so
    /// a client that sees an answer also sees the responders in their new state.
    pub async fn settled(&self) {
        let wait = async {
            loop {
                let notified = self.acked.notified();
                let target = *self.changed.borrow();
                let done = self
                    .applied
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .values()
                    .all(|v| *v >= target);
                if done {
                    return;
                }
                notified.await;
            }
        };
        if tokio::time::timeout(std::time::Duration::from_secs(2), wait)
            .await
            .is_err()
        {
            tracing::warn!("responders did not settle within two seconds");
        }
    }

    /// Adds a fault to a VM and waits for its responder; false when there is no such VM.
    pub async fn inject(&self, vm: &str, fault: Fault) -> bool {
        let ok = self.lock().inject(vm, fault);
        self.notify();
        self.settled().await;
        ok
    }

    /// Clears a fault and waits for the responder; false when there is no such VM.
    pub async fn clear(&self, vm: &str, fault: Fault) -> bool {
        let ok = self.lock().clear(vm, fault);
        self.notify();
        self.settled().await;
        ok
    }

    /// One line per VM, for the admin API and the handle.
    pub fn vm_summaries(&self) -> Vec<VmSummary> {
        let w = self.lock();
        w.vms
            .values()
            .map(|vm| {
                let nic = w.nics.get(&vm.nic);
                VmSummary {
                    name: vm.name.clone(),
                    subscription: vm.sub.clone(),
                    resource_group: vm.rg.clone(),
                    rdp: SocketAddr::from(([127, 0, 0, 1], vm.port)),
                    public_ip: nic
                        .and_then(|n| n.pip.as_ref())
                        .and_then(|k| w.pips.get(k))
                        .map(|p| p.address.to_string()),
                    private_ip: nic.map(|n| n.private_ip.to_string()),
                    running: vm.running() && !vm.rebooting,
                    agent_ready: vm.agent_ready(),
                    faults: vm.faults.iter().copied().collect(),
                    behaviour: w.behaviour(&vm.name),
                    boot: vm.boot,
                    password_resets: vm.password_resets,
                    password_sha256: vm.password_sha256.clone(),
                    answers_as: vm.answers_as.clone(),
                }
            })
            .collect()
    }
}

/// A VM as the admin API shows it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VmSummary {
    /// Name.
    pub name: String,
    /// Subscription.
    pub subscription: String,
    /// Resource group.
    pub resource_group: String,
    /// The responder's loopback address (what a prober connects to).
    pub rdp: SocketAddr,
    /// The public IP ARM reports.
    pub public_ip: Option<String>,
    /// The private IP ARM reports.
    pub private_ip: Option<String>,
    /// Running and not rebooting.
    pub running: bool,
    /// VM agent Ready.
    pub agent_ready: bool,
    /// Current faults.
    pub faults: Vec<Fault>,
    /// What the responder does now.
    pub behaviour: Behaviour,
    /// Reboot counter.
    pub boot: u64,
    /// Password resets applied.
    pub password_resets: u32,
    /// SHA-256 (hex) of the password the last reset set (never the password).
    pub password_sha256: Option<String>,
    /// The computer that answers on the VM's address when another machine took it.
    pub answers_as: Option<String>,
}

/// A running simulator.
#[derive(Debug)]
pub struct Simulator {
    shared: Arc<Shared>,
    arm_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl Simulator {
    /// Starts on an ephemeral loopback port.
    pub async fn start(scenario: Scenario) -> Result<Self, SimError> {
        Self::start_on(scenario, SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// Starts the emulator on `listen` and one responder per VM on ephemeral loopback ports.
    pub async fn start_on(scenario: Scenario, listen: SocketAddr) -> Result<Self, SimError> {
        scenario.validate()?;
        let mut world = World::new(&scenario)?;
        let bind_err = |addr: String| move |source| SimError::Bind { addr, source };
        let arm_listener = TcpListener::bind(listen)
            .await
            .map_err(bind_err(listen.to_string()))?;
        let arm_addr = arm_listener
            .local_addr()
            .map_err(bind_err(listen.to_string()))?;
        let mut responders = Vec::new();
        let cert_key = responder::CertificateKey::generate()?;
        for (key, vm) in world.vms.iter_mut() {
            let l = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
                .await
                .map_err(bind_err("127.0.0.1:0".into()))?;
            vm.port = l
                .local_addr()
                .map_err(bind_err("127.0.0.1:0".into()))?
                .port();
            let computer = vm.answers_as.as_deref().unwrap_or(&vm.name);
            responders.push((key.clone(), l, cert_key.certificates(computer)?));
        }
        let applied = responders
            .iter()
            .map(|(vm, _, _)| (vm.clone(), 0))
            .collect();
        let (changed, _) = watch::channel(1);
        let (shutdown, rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            world: Mutex::new(world),
            changed,
            applied: Mutex::new(applied),
            acked: tokio::sync::Notify::new(),
            runtime: Mutex::new(membership::RuntimeResponders {
                cert_key,
                shutdown: rx.clone(),
            }),
            base_url: format!("http://{arm_addr}"),
        });
        let mut tasks = JoinSet::new();
        for (vm, listener, certs) in responders {
            tasks.spawn(responder::run(
                shared.clone(),
                vm,
                listener,
                certs,
                rx.clone(),
            ));
        }
        let app = arm::router(shared.clone());
        let mut stop = rx.clone();
        tasks.spawn(async move {
            let serve = axum::serve(arm_listener, app).with_graceful_shutdown(async move {
                let _ = stop.wait_for(|v| *v).await;
            });
            if let Err(e) = serve.await {
                tracing::error!(error = %e, "the ARM emulator stopped");
            }
        });
        // Every responder acknowledges version 1 once its listener is open or closed.
        shared.settled().await;
        tracing::info!(arm = %arm_addr, "simulator started");
        Ok(Self {
            shared,
            arm_addr,
            shutdown,
            tasks,
        })
    }

    /// The emulator's base URL (`http://127.0.0.1:PORT`), the endpoint for the SDK clients.
    pub fn arm_url(&self) -> String {
        self.shared.base_url.clone()
    }

    /// The emulator's socket address.
    pub fn arm_addr(&self) -> SocketAddr {
        self.arm_addr
    }

    /// The responder address of a VM.
    pub fn responder(&self, vm: &str) -> Option<SocketAddr> {
        let w = self.shared.lock();
        w.vms
            .get(&vm.to_ascii_lowercase())
            .map(|v| SocketAddr::from(([127, 0, 0, 1], v.port)))
    }

    /// A prober that probes each VM's responder at the addresses ARM reports for the VM (see
    /// [`AddressProber`]).
    pub fn address_prober(&self, inner: Arc<dyn crate::probe::Prober>) -> AddressProber {
        AddressProber::new(Arc::clone(&self.shared), inner)
    }

    /// Every VM.
    pub fn vms(&self) -> Vec<VmSummary> {
        self.shared.vm_summaries()
    }

    /// One VM.
    pub fn vm(&self, name: &str) -> Option<VmSummary> {
        self.vms()
            .into_iter()
            .find(|v| v.name.eq_ignore_ascii_case(name))
    }

    /// Requests received, by operation name. Names: `vm.get`, `vm.instanceView`,
    /// `vm.restart`, `vm.redeploy`, `vm.start`, `vm.runcommand`,
    /// `vm.retrievebootdiagnosticsdata`, `extension.get`, `extension.put`, `health.get`,
    /// `nic.get`, `nic.put`, `nsg.get`, `subnet.get`,
    /// `vnet.checkipaddressavailability`, `pip.get`, `watcher.ipflowverify`,
    /// `snapshot.put`, `snapshot.get`, `snapshot.delete`, `snapshot.list`,
    /// `operation.status` (Azure-AsyncOperation polls), `operation.result` (Location polls),
    /// `token`, `blob.get`, `graph.resources` (Resource Graph queries); plus `throttled` and `unauthorized` for rejected requests.
    pub fn counters(&self) -> BTreeMap<String, u64> {
        self.shared.lock().counters.clone()
    }

    /// Accepted Run Commands that were the operator's read-only evidence query (they are
    /// counted in `vm.runcommand` too), so tests can tell queries from repairs.
    pub fn guest_queries(&self) -> u64 {
        self.shared.lock().guest_queries
    }

    /// Requests of one operation.
    pub fn count(&self, op: &str) -> u64 {
        self.shared.lock().counters.get(op).copied().unwrap_or(0)
    }

    /// Adds a fault at run time; returns once the VM's responder behaves accordingly.
    pub async fn inject(&self, vm: &str, fault: Fault) -> bool {
        self.shared.inject(vm, fault).await
    }

    /// Clears a fault at run time; returns once the VM's responder behaves accordingly.
    pub async fn clear(&self, vm: &str, fault: Fault) -> bool {
        self.shared.clear(vm, fault).await
    }

    /// Scripts an HTTP failure for the next matching requests.
    pub fn inject_http_fault(&self, fault: HttpFault) {
        self.shared.lock().http_faults.push(fault);
    }

    /// Carries out the next `operation` request (e.g. `vm.restart`) but holds its response
    /// back for `hold`: a caller whose timeout is shorter never learns that Azure accepted it,
    /// as after a lost connection.
    pub fn drop_next_response(&self, operation: &str, hold: std::time::Duration) {
        self.shared
            .lock()
            .dropped_responses
            .push((operation.to_string(), hold));
    }

    /// The write requests (PUT, POST, DELETE) received, by operation name, in order.
    pub fn write_log(&self) -> Vec<String> {
        self.shared.lock().writes.iter().cloned().collect()
    }

    /// The snapshots, as ARM returns them.
    pub fn snapshots(&self) -> Vec<serde_json::Value> {
        self.shared
            .lock()
            .snapshots
            .values()
            .map(disk::Snapshot::json)
            .collect()
    }

    /// Adds a finished snapshot (e.g. an old one, or one someone else made), as if created
    /// at `time_created` (RFC 3339).
    pub fn add_snapshot(&self, snapshot: disk::Snapshot) {
        let mut w = self.shared.lock();
        let k = world::key(&snapshot.sub, &snapshot.rg, &snapshot.name);
        w.snapshots.insert(k, snapshot);
    }

    /// The id of a VM's OS disk.
    pub fn os_disk_id(&self, vm: &str) -> Option<String> {
        let w = self.shared.lock();
        w.vms.get(&vm.to_ascii_lowercase()).map(disk::os_disk_id)
    }

    /// Token exchanges answered and fingerprints of the credentials presented.
    pub fn token_log(&self) -> world::TokenLog {
        self.shared.lock().tokens.clone()
    }

    /// Gives `vm`'s NIC the private address `ip` at once, as a change made outside the
    /// operator would (another machine taking an address that was freed); false when there is
    /// no such VM.
    pub fn assign_private_ip(&self, vm: &str, ip: std::net::Ipv4Addr) -> bool {
        let mut w = self.shared.lock();
        let Some(nic) = w.vms.get(&vm.to_ascii_lowercase()).map(|v| v.nic.clone()) else {
            return false;
        };
        match w.nics.get_mut(&nic) {
            Some(n) => {
                n.private_ip = ip;
                n.static_ip = true;
                true
            }
            None => false,
        }
    }

    /// Creates a VM in `subscription`/`resource_group` while the simulator runs (its subnet,
    /// `vnet/subnet` of that group, must exist) and starts its RDP responder.
    pub async fn add_vm(
        &self,
        subscription: &str,
        resource_group: &str,
        spec: scenario::VmSpec,
    ) -> Result<(), SimError> {
        self.shared
            .create_vm(subscription, resource_group, &spec)
            .await
    }

    /// Deletes a VM with its NIC and public IP (its responder refuses connections from then
    /// on); false when there is no such VM.
    pub async fn delete_vm(&self, name: &str) -> bool {
        self.shared.delete_vm(name).await
    }

    /// Replaces a VM's tags; false when there is no such VM.
    pub fn set_vm_tags(&self, name: &str, tags: BTreeMap<String, String>) -> bool {
        self.shared.lock().set_tags(name, tags)
    }

    /// Sets Resource Graph's per-caller quota (`requests` per `window`; default 15 per 5 s)
    /// and starts every caller's window afresh.
    pub fn set_graph_quota(&self, requests: u32, window: std::time::Duration) {
        let mut w = self.shared.lock();
        w.graph_quota = membership::GraphQuota { requests, window };
        w.graph_windows.clear();
    }

    /// The shared state (for advanced tests).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Stops the emulator and every responder, and waits for them.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        while self.tasks.join_next().await.is_some() {}
    }
}
