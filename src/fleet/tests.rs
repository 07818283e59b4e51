//! The fleet worker against fakes (discovery, prober, Kubernetes) on a paused clock:
//! membership follows discovery, one incident object per unreachable member, holds, closing,
//! explicit objects win, a failed discovery keeps the membership.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, Ipv4Addr},
    sync::{Arc, Mutex},
    time::Duration,
};

use futures::future::BoxFuture;
use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use tokio::sync::watch;

use super::{Deps, memory::MemorySink, worker};
use crate::{
    api::{
        FleetSelector, MAX_DISRUPTIVE_ANNOTATION, RdpHealth, RdpHealthFleet, RdpHealthFleetSpec,
        RdpHealthStatus, conditions as types,
    },
    azure::{AzureError, AzureResult, DiscoveredVm, Discovery, ResourceGraph, VmRef, VmSelector},
    controller::PAUSE_ANNOTATION,
    engine::testing::{failed_report, ok_report},
    probe::{
        Credssp, Failure, FailureReason, NlaFacts, ProbeOptions, ProbeReport, Prober,
        ServerIdentity, Target,
    },
};

const SUB: &str = "00000000-0000-0000-0000-0000000000aa";

fn vm(name: &str, last: u8) -> DiscoveredVm {
    DiscoveredVm {
        vm: VmRef::new(SUB, "rg", name),
        location: "westeurope".into(),
        tags: BTreeMap::new(),
        power_state: Some("PowerState/running".into()),
        computer_name: Some(name.into()),
        private_ip: Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, last))),
        public_ip: Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))),
    }
}

#[derive(Default)]
struct Graph {
    /// The VMs, or `None` for a failure.
    answer: Mutex<Option<Vec<DiscoveredVm>>>,
    calls: Mutex<u32>,
}

impl Graph {
    fn set(&self, vms: Vec<DiscoveredVm>) {
        *self.answer.lock().unwrap() = Some(vms);
    }
    fn fail(&self) {
        *self.answer.lock().unwrap() = None;
    }
}

#[async_trait::async_trait]
impl ResourceGraph for Graph {
    async fn discover(&self, _: &VmSelector) -> AzureResult<Discovery> {
        *self.calls.lock().unwrap() += 1;
        match self.answer.lock().unwrap().clone() {
            Some(vms) => Ok(Discovery {
                vms,
                requests: 1,
                quota_remaining: Some(14),
                quota_resets_after: None,
            }),
            None => Err(AzureError::Transient {
                message: "Resource Graph is unavailable (503)".into(),
            }),
        }
    }
}

/// Reachability by host; hosts not listed answer, as the computer they are expected to be
/// unless `answers_as` names another one.
#[derive(Default)]
struct Net {
    down: Mutex<HashMap<String, FailureReason>>,
    probes: Mutex<HashMap<String, u32>>,
    /// Hosts whose address another computer answers on: that computer's name.
    answers_as: Mutex<HashMap<String, String>>,
    /// Probes that ran the identity step, by host.
    identity_steps: Mutex<HashMap<String, u32>>,
}

impl Prober for Net {
    fn probe<'a>(
        &'a self,
        target: &'a Target,
        opts: &'a ProbeOptions,
    ) -> BoxFuture<'a, ProbeReport> {
        Box::pin(async move {
            *self
                .probes
                .lock()
                .unwrap()
                .entry(target.host.clone())
                .or_default() += 1;
            if let Some(reason) = self.down.lock().unwrap().get(&target.host) {
                return failed_report(*reason);
            }
            let mut report = ok_report();
            if opts.identity {
                *self
                    .identity_steps
                    .lock()
                    .unwrap()
                    .entry(target.host.clone())
                    .or_default() += 1;
                let name = self.answers_as.lock().unwrap().get(&target.host).cloned();
                let id = ServerIdentity {
                    computer_name: name.clone().or_else(|| opts.expect_name.clone()),
                    ..ServerIdentity::default()
                };
                // As the prober judges it: another computer than expected fails the probe.
                let expected = opts.expect_name.as_deref().unwrap_or_default();
                if id.answers_as(expected) == Some(false) {
                    report.reachable = false;
                    report.failure = Some(Failure::new(FailureReason::WrongHost, "other"));
                }
                report.nla = Some(NlaFacts {
                    credssp: Credssp::Required,
                    credssp_version: Some(6),
                    identity: Some(id),
                    error: None,
                });
            }
            report
        })
    }
}

/// Sets the `Reachable` condition of an object the sink holds.
fn set_reachable(kube: &MemorySink, name: &str, status: &str, since: Timestamp) {
    let mut r = kube.recorded();
    let obj = r.objects.get_mut(name).unwrap();
    obj.status = Some(RdpHealthStatus {
        conditions: vec![Condition {
            type_: types::REACHABLE.into(),
            status: status.into(),
            reason: "X".into(),
            message: String::new(),
            last_transition_time: Time(since),
            observed_generation: None,
        }],
        ..RdpHealthStatus::default()
    });
}

fn fleet(edit: impl FnOnce(&mut RdpHealthFleetSpec)) -> RdpHealthFleet {
    let mut spec = RdpHealthFleetSpec {
        selector: FleetSelector::of_subscriptions(vec![SUB.into()]),
        template: Default::default(),
        safety: Default::default(),
        discovery_interval: "1m".into(),
        incident_retention: "0s".into(),
        suspend: false,
    };
    edit(&mut spec);
    let mut f = RdpHealthFleet::new("prod", spec);
    f.metadata.namespace = Some("ops".into());
    f.metadata.uid = Some("fleet-uid".into());
    f.metadata.generation = Some(1);
    f
}

struct Run {
    graph: Arc<Graph>,
    net: Arc<Net>,
    kube: Arc<MemorySink>,
    stop: watch::Sender<bool>,
    spec: watch::Sender<Arc<RdpHealthFleet>>,
    task: tokio::task::JoinHandle<()>,
}

impl Run {
    fn start(f: RdpHealthFleet, vms: Vec<DiscoveredVm>) -> Self {
        let graph = Arc::new(Graph::default());
        graph.set(vms);
        let net = Arc::new(Net::default());
        let kube = Arc::new(MemorySink::default());
        let deps = Deps {
            graph: graph.clone(),
            prober: net.clone(),
            sink: kube.clone(),
            max_unreachable_percent: 30,
            min_fleet_size: 5,
            probe_concurrency: 8,
            refusal: None,
        };
        let (spec, spec_rx) = watch::channel(Arc::new(f));
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(worker::run(deps, spec_rx, stop_rx));
        Self {
            graph,
            net,
            kube,
            stop,
            spec,
            task,
        }
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

async fn advance(d: Duration) {
    // Small steps, so every timer and spawned probe runs in order.
    let step = Duration::from_millis(500);
    let mut left = d;
    while !left.is_zero() {
        let s = left.min(step);
        tokio::time::sleep(s).await;
        left -= s;
    }
}

#[tokio::test(start_paused = true)]
async fn membership_follows_discovery_within_one_interval() {
    let run = Run::start(fleet(|_| {}), vec![vm("a", 1), vm("b", 2)]);
    advance(Duration::from_secs(40)).await;
    let s = run.kube.status();
    assert_eq!((s.members, s.reachable), (2, 2), "{s:?}");
    // b is deleted (or loses its tag), c is created: one discovery interval later.
    run.graph.set(vec![vm("a", 1), vm("c", 3)]);
    advance(Duration::from_secs(60 + 35)).await;
    let s = run.kube.status();
    assert_eq!((s.members, s.reachable), (2, 2), "{s:?}");
    let probes = run.net.probes.lock().unwrap().clone();
    assert!(
        probes.contains_key("127.0.0.3"),
        "the new VM is probed: {probes:?}"
    );
    let b_before = probes["127.0.0.2"];
    advance(Duration::from_secs(90)).await;
    assert_eq!(
        run.net.probes.lock().unwrap()["127.0.0.2"],
        b_before,
        "a VM that left is no longer probed"
    );
    assert!(*run.graph.calls.lock().unwrap() >= 3);
    assert!(
        run.kube.recorded().creates.is_empty(),
        "healthy members cost no object"
    );
    run.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_unreachable_member_becomes_one_incident_object_and_closes_after_recovery() {
    let vms: Vec<_> = (1..=6).map(|i| vm(&format!("vm{i}"), i)).collect();
    let run = Run::start(fleet(|_| {}), vms);
    advance(Duration::from_secs(40)).await;
    run.net
        .down
        .lock()
        .unwrap()
        .insert("127.0.0.4".into(), FailureReason::TcpTimeout);
    // Within one interval plus the confirmations (3 probes, 3 s apart).
    advance(Duration::from_secs(30 + 10)).await;
    let creates = run
        .kube
        .recorded()
        .creates
        .iter()
        .map(|(n, _)| n.clone())
        .collect::<Vec<_>>();
    assert_eq!(creates.len(), 1, "{creates:?}");
    let name = creates[0].clone();
    assert!(name.starts_with("prod-vm4-"), "{name}");
    let obj = run.kube.recorded().objects[&name].clone();
    assert!(obj.spec.vm.resource_id.ends_with("/virtualMachines/vm4"));
    assert!(
        !obj.metadata
            .annotations
            .clone()
            .unwrap()
            .contains_key(PAUSE_ANNOTATION),
        "1 of 6 unreachable is below the fleet's limit: no hold"
    );
    assert_eq!(run.kube.recorded().events.as_slice(), ["IncidentOpened"]);
    // The object watches the VM now: the fleet stops probing it, and never creates another.
    let probes = run.net.probes.lock().unwrap()["127.0.0.4"];
    advance(Duration::from_secs(60)).await;
    assert_eq!(run.net.probes.lock().unwrap()["127.0.0.4"], probes);
    assert_eq!(run.kube.recorded().creates.len(), 1);
    let s = run.kube.status();
    assert_eq!(
        (s.incidents, s.unreachable),
        (1, 1),
        "unreachable until its object judges otherwise: {s:?}"
    );
    // The object reports Unreachable, then Reachable again; retention 0: closed.
    set_reachable(&run.kube, &name, "False", Timestamp::now());
    advance(Duration::from_secs(6)).await;
    let s = run.kube.status();
    assert_eq!((s.incidents, s.unreachable), (1, 1), "{s:?}");
    assert_eq!(s.worst[0].incident.as_deref(), Some(name.as_str()));
    run.net.down.lock().unwrap().clear();
    set_reachable(&run.kube, &name, "True", Timestamp::now());
    advance(Duration::from_secs(6)).await;
    assert_eq!(run.kube.recorded().deletes, vec![name.clone()]);
    assert!(
        run.kube
            .recorded()
            .events
            .contains(&"IncidentClosed".to_owned())
    );
    // Back in memory: probed by the fleet again.
    advance(Duration::from_secs(40)).await;
    assert!(run.net.probes.lock().unwrap()["127.0.0.4"] > probes);
    let s = run.kube.status();
    assert_eq!((s.incidents, s.reachable), (0, 6), "{s:?}");
    run.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_member_answered_by_another_computer_becomes_an_incident() {
    let vms: Vec<_> = (1..=6).map(|i| vm(&format!("vm{i}"), i)).collect();
    let run = Run::start(fleet(|_| {}), vms);
    // vm4's public address is answered by another computer (an address reused elsewhere):
    // a plain handshake succeeds there, only the identity step tells.
    run.net
        .answers_as
        .lock()
        .unwrap()
        .insert("127.0.0.4".into(), "old-owner".into());
    // Within one interval plus the confirmations, every one an identity step.
    advance(Duration::from_secs(30 + 10)).await;
    let creates = run.kube.recorded().creates.clone();
    assert_eq!(creates.len(), 1, "{creates:?}");
    assert!(creates[0].0.starts_with("prod-vm4-"), "{creates:?}");
    let steps = run.net.identity_steps.lock().unwrap().clone();
    assert_eq!(
        steps["127.0.0.4"], 3,
        "every probe of a wrong host runs the step"
    );
    // The right computer answers the others: one identity step each, on the first probe; the
    // next ones (every 30 s) wait for identityCheckInterval (10 minutes).
    advance(Duration::from_secs(120)).await;
    let steps = run.net.identity_steps.lock().unwrap().clone();
    let probes = run.net.probes.lock().unwrap().clone();
    for i in [1, 2, 3, 5, 6] {
        let host = format!("127.0.0.{i}");
        assert_eq!(steps[&host], 1, "{host}: {steps:?}");
        assert!(probes[&host] >= 5, "{host}: {probes:?}");
    }
    let s = run.kube.status();
    assert_eq!((s.reachable, s.incidents), (5, 1), "{s:?}");
    assert_eq!(s.worst[0].reason.as_deref(), Some("WrongHost"), "{s:?}");
    advance(Duration::from_secs(10 * 60)).await;
    let steps = run.net.identity_steps.lock().unwrap().clone();
    assert_eq!(steps["127.0.0.1"], 2, "again after the interval: {steps:?}");
    run.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_incident_carries_the_fleets_disruptive_cap_as_it_changes() {
    let vms: Vec<_> = (1..=6).map(|i| vm(&format!("vm{i}"), i)).collect();
    let with_cap = |cap: Option<u16>| {
        let mut f = fleet(|s| s.safety.max_concurrent_disruptive = cap);
        f.metadata.generation = Some(2);
        Arc::new(f)
    };
    let run = Run::start((*with_cap(Some(2))).clone(), vms);
    advance(Duration::from_secs(40)).await;
    run.net
        .down
        .lock()
        .unwrap()
        .insert("127.0.0.4".into(), FailureReason::TcpTimeout);
    advance(Duration::from_secs(40)).await;
    let name = run.kube.recorded().creates[0].0.clone();
    let cap = |run: &Run| {
        let obj = run.kube.recorded().objects[&name].clone();
        let group = crate::fleet::incident::claim_group(&obj).map(|g| (g.id, g.max));
        let annotations = obj.metadata.annotations.unwrap_or_default();
        (annotations.get(MAX_DISRUPTIVE_ANNOTATION).cloned(), group)
    };
    assert_eq!(cap(&run), (Some("2".into()), Some(("ops/prod".into(), 2))));
    // The fleet lowers its cap: the incident follows at the next look (every 5 s).
    run.spec.send(with_cap(Some(1))).unwrap();
    advance(Duration::from_secs(6)).await;
    assert_eq!(cap(&run), (Some("1".into()), Some(("ops/prod".into(), 1))));
    // And drops it: only the operator's cap is left.
    run.spec.send(with_cap(None)).unwrap();
    advance(Duration::from_secs(6)).await;
    assert_eq!(cap(&run), (None, None));
    assert_eq!(run.kube.recorded().creates.len(), 1);
    run.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_fleet_wide_outage_opens_incidents_on_hold() {
    let vms: Vec<_> = (1..=5).map(|i| vm(&format!("vm{i}"), i)).collect();
    let run = Run::start(fleet(|s| s.safety.max_unreachable_percent = Some(20)), vms);
    advance(Duration::from_secs(40)).await;
    for i in 1..=5 {
        run.net
            .down
            .lock()
            .unwrap()
            .insert(format!("127.0.0.{i}"), FailureReason::TcpTimeout);
    }
    advance(Duration::from_secs(45)).await;
    let objects = run.kube.recorded().objects.clone();
    assert_eq!(objects.len(), 5);
    let held = objects
        .values()
        .filter(|o| {
            o.metadata
                .annotations
                .as_ref()
                .is_some_and(|a| a.get(PAUSE_ANNOTATION).map(String::as_str) == Some("true"))
        })
        .count();
    // The first incident sees 20 % unreachable (not above the limit); later ones see more.
    assert!(held >= 3, "{held} of 5 held");
    assert!(
        run.kube
            .recorded()
            .events
            .contains(&"IncidentHeld".to_owned())
    );
    run.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_hand_written_object_wins_over_the_fleet() {
    let run = Run::start(fleet(|_| {}), vec![vm("a", 1), vm("b", 2)]);
    let spec = super::policy::template_spec(&fleet(|_| {}), vm("B", 2).vm.id().to_uppercase());
    let mut explicit = RdpHealth::new("mine", spec);
    explicit.metadata.namespace = Some("team".into());
    run.kube.recorded().objects.insert("mine".into(), explicit);
    run.net
        .down
        .lock()
        .unwrap()
        .insert("127.0.0.2".into(), FailureReason::TcpRefused);
    advance(Duration::from_secs(80)).await;
    let s = run.kube.status();
    assert_eq!((s.members, s.skipped, s.incidents), (2, 1, 0), "{s:?}");
    assert_eq!(s.skipped_members[0].watched_by, "team/mine");
    assert!(run.kube.recorded().creates.is_empty());
    assert!(!run.net.probes.lock().unwrap().contains_key("127.0.0.2"));
    run.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_failed_discovery_keeps_the_last_membership_and_says_so() {
    let run = Run::start(fleet(|_| {}), vec![vm("a", 1), vm("b", 2)]);
    advance(Duration::from_secs(10)).await;
    run.graph.fail();
    advance(Duration::from_secs(70)).await;
    let s = run.kube.status();
    assert_eq!(s.members, 2, "{s:?}");
    let discovered = s
        .conditions
        .iter()
        .find(|c| c.type_ == "Discovered")
        .unwrap();
    assert_eq!(discovered.status, "False");
    assert!(
        discovered.message.contains("keeping the membership"),
        "{}",
        discovered.message
    );
    let d = s.discovery.unwrap();
    assert!(d.error.is_some() && d.last_success.is_some());
    let before = run.net.probes.lock().unwrap()["127.0.0.2"];
    advance(Duration::from_secs(60)).await;
    assert!(
        run.net.probes.lock().unwrap()["127.0.0.2"] > before,
        "members are still probed"
    );
    run.stop().await;
}

#[tokio::test(start_paused = true)]
async fn an_invalid_template_is_reported_and_nothing_is_probed() {
    let run = Run::start(
        fleet(|s| s.template.probe.timeout = "1m".into()),
        vec![vm("a", 1)],
    );
    advance(Duration::from_secs(20)).await;
    let s = run.kube.status();
    let valid = s.conditions.iter().find(|c| c.type_ == "Valid").unwrap();
    assert_eq!(valid.status, "False");
    assert!(valid.message.contains("timeout"), "{}", valid.message);
    assert!(run.net.probes.lock().unwrap().is_empty());
    assert_eq!(*run.graph.calls.lock().unwrap(), 0);
    run.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_replica_that_does_not_lead_neither_discovers_nor_probes() {
    let graph = Arc::new(Graph::default());
    graph.set(vec![vm("a", 1)]);
    let net = Arc::new(Net::default());
    let kube = Arc::new(MemorySink::default());
    kube.standby
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let deps = Deps {
        graph: graph.clone(),
        prober: net.clone(),
        sink: kube.clone(),
        max_unreachable_percent: 30,
        min_fleet_size: 5,
        probe_concurrency: 8,
        refusal: None,
    };
    let (_spec, spec_rx) = watch::channel(Arc::new(fleet(|_| {})));
    let (stop, stop_rx) = watch::channel(false);
    let task = tokio::spawn(worker::run(deps, spec_rx, stop_rx));
    advance(Duration::from_secs(90)).await;
    assert_eq!(
        *graph.calls.lock().unwrap(),
        0,
        "the Resource Graph quota is the leader's"
    );
    assert!(net.probes.lock().unwrap().is_empty());
    assert!(kube.recorded().statuses.is_empty());
    // It becomes the leader: discovery and probes start within a housekeeping tick.
    kube.standby
        .store(false, std::sync::atomic::Ordering::Relaxed);
    advance(Duration::from_secs(40)).await;
    assert_eq!(*graph.calls.lock().unwrap(), 1);
    assert!(!net.probes.lock().unwrap().is_empty());
    assert_eq!(kube.status().members, 1);
    let _ = stop.send(true);
    let _ = task.await;
}
