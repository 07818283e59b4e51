//! `ResetNic` as the guide does it, driven through the engine (`evaluate` → `remediate`)
//! against the ARM emulator with the real SDK adapter: the original address is in status
//! before the PUT that moves the NIC, it comes back after the reset was judged (one reset PUT,
//! one restore PUT), a taken address is kept with a Warning, and the operator's NSG rule
//! follows the address while a rule it did not write stays as it was.

use std::{
    net::Ipv4Addr,
    sync::atomic::{AtomicBool, Ordering},
};

use super::*;
use crate::{
    api::{RdpHealth, RemediationMode},
    azure::{ArmClient, ArmConfig, StaticToken},
    engine::testing::*,
    ladder::nic::RestoreState,
    probe::{FailureReason, ProbeReport},
    sim::{Behaviour, Scenario, Simulator},
};

const SUB: &str = "00000000-0000-0000-0000-000000000001";
const ORIGINAL: &str = "10.0.0.10";
const OWN_RULE: &str = "rdphealth-allow-rdp-vm-1";
const FOREIGN_RULE: &str = "allow-office";

fn scenario() -> Scenario {
    let yaml = format!(
        r#"
timing: {{ operation: 60ms, restart: 60ms, redeploy: 60ms, retryAfter: 20ms }}
subscriptions:
  - id: {SUB}
    resourceGroups:
      - name: rg-1
        location: westeurope
        networkSecurityGroups:
          - name: open
            rules:
              - {{ name: allow-rdp, priority: 1000, access: Allow, protocol: Tcp, destinationPort: "3389" }}
              - {{ name: {OWN_RULE}, priority: 300, access: Allow, protocol: Tcp, source: 203.0.113.0/24, destination: {ORIGINAL}, destinationPort: "3389" }}
              - {{ name: {FOREIGN_RULE}, priority: 310, access: Allow, protocol: Tcp, source: 198.51.100.0/24, destination: {ORIGINAL}, destinationPort: "3389" }}
        virtualNetworks:
          - {{ name: v, addressPrefix: 10.0.0.0/16, subnets: [ {{ name: s, addressPrefix: 10.0.0.0/24, networkSecurityGroup: open }} ] }}
        vms:
          - {{ name: vm-1, nic: {{ subnet: v/s, privateIp: {ORIGINAL} }}, faults: [nic_broken] }}
          - {{ name: vm-2, nic: {{ subnet: v/s }} }}
"#
    );
    Scenario::from_yaml(&yaml).unwrap()
}

/// Leadership that is lost, once, while the restore's intent is being written.
#[derive(Debug, Default)]
struct Lease {
    lost: AtomicBool,
    lose_at_restore: AtomicBool,
}

impl LeaderCheck for Lease {
    fn term(&self) -> Option<LeaseTerm> {
        if self.lost.load(Ordering::SeqCst) {
            None
        } else {
            SoleReplica.term()
        }
    }
}

/// Records every persisted status with the write requests Azure had seen by then.
struct Sink<'a> {
    sim: &'a Simulator,
    lease: Arc<Lease>,
    persisted: Mutex<Vec<(RdpHealthStatus, Vec<String>)>>,
}

#[async_trait::async_trait]
impl StatusSink for Sink<'_> {
    async fn persist(&self, status: &RdpHealthStatus) -> Result<(), String> {
        let restore = status
            .ladder
            .current
            .as_ref()
            .and_then(|c| c.nic.as_ref())
            .map(|n| n.restore);
        if restore == Some(RestoreState::Requested)
            && self.lease.lose_at_restore.swap(false, Ordering::SeqCst)
        {
            self.lease.lost.store(true, Ordering::SeqCst);
        }
        let writes = self.sim.write_log();
        self.persisted
            .lock()
            .unwrap()
            .push((status.clone(), writes));
        Ok(())
    }
}

fn remediator(sim: &Simulator, leadership: Arc<dyn LeaderCheck>) -> Remediator {
    let config = ArmConfig::new(azure_core::Url::parse(&sim.arm_url()).unwrap());
    Remediator {
        azure: Arc::new(ArmClient::new(config, Arc::new(StaticToken::new("t")))),
        fleet: Arc::new(Fleet::new(FleetPolicy {
            disruptive_grace: Duration::ZERO,
            ..FleetPolicy::default()
        })),
        probe_source: None,
        first_poll: Duration::from_millis(20),
        vm_rdp_port: Some(3389),
        secrets: None,
        leadership,
    }
}

fn report(sim: &Simulator) -> ProbeReport {
    match sim.vm("vm-1").unwrap().behaviour {
        Behaviour::Healthy { .. } => ok_report(),
        _ => failed_report(FailureReason::TcpTimeout),
    }
}

fn object() -> RdpHealth {
    crate::engine::testing::object(|o| {
        o.spec.vm.resource_id = format!(
            "/subscriptions/{SUB}/resourceGroups/rg-1/providers/Microsoft.Compute/virtualMachines/vm-1"
        );
        o.spec.probe.failure_threshold = 1;
        o.spec.probe.success_threshold = 1;
        o.spec.evidence.guest_query = Some(false);
        let r = &mut o.spec.remediation;
        r.mode = RemediationMode::Auto;
        r.ladder = vec![Rung::ResetNic];
        r.allowed_disruptive_actions = vec![Rung::ResetNic];
        r.settle_time = "100ms".into();
        r.backoff.initial = "100ms".into();
        r.snapshots.enabled = false;
    })
}

struct Run {
    status: RdpHealthStatus,
    events: Vec<Event>,
    persisted: Vec<(RdpHealthStatus, Vec<String>)>,
    writes: Vec<String>,
}

/// Reconciles until the incident closes or the ladder gives up; `between` runs after each
/// round (what happens in Azure meanwhile).
async fn drive(sim: &Simulator, lease: Arc<Lease>, mut between: impl FnMut(&Simulator)) -> Run {
    let remediator = remediator(sim, lease.clone());
    let sink = Sink {
        sim,
        lease: lease.clone(),
        persisted: Mutex::new(Vec::new()),
    };
    let mut obj = object();
    let mut events = Vec::new();
    // How far the operator's clock runs ahead (a new leader comes later).
    let mut ahead = Duration::ZERO;
    for _ in 0..400 {
        let now = Timestamp::now().checked_add(ahead).unwrap();
        let result = super::snapshot_tests::reconcile_once(
            &remediator,
            &mut obj,
            report(sim),
            &sink,
            &mut events,
            now,
        )
        .await;
        match result {
            Ok(_) => {}
            Err(RemediateError::NotLeader) if lease.lost.load(Ordering::SeqCst) => {
                // The replica stopped: what it persisted is what the next leader finds, after
                // the request timeout.
                let persisted = sink.persisted.lock().unwrap().last().cloned();
                obj.status = persisted.map(|(s, _)| s);
                lease.lost.store(false, Ordering::SeqCst);
                ahead += Duration::from_secs(180);
                continue;
            }
            Err(e) => panic!("{e:?}"),
        }
        let ladder = &obj.status.as_ref().unwrap().ladder;
        if (ladder.incident_started_at.is_none() && !ladder.history.is_empty()) || ladder.exhausted
        {
            break;
        }
        between(sim);
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    Run {
        status: obj.status.unwrap_or_default(),
        events,
        persisted: sink.persisted.into_inner().unwrap(),
        writes: sim.write_log(),
    }
}

fn count(writes: &[String], op: &str) -> usize {
    writes.iter().filter(|w| *w == op).count()
}

/// The destination of a rule of the subnet's NSG once Azure has applied the rule writes sent
/// so far (it applies them asynchronously; the operator does not wait for them).
async fn destination(sim: &Simulator, rule: &str, want: &str) -> String {
    let mut seen = String::new();
    for _ in 0..100 {
        seen = destination_now(sim, rule).await;
        if seen == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    seen
}

async fn destination_now(sim: &Simulator, rule: &str) -> String {
    let vm = crate::azure::VmRef {
        subscription: SUB.into(),
        resource_group: "rg-1".into(),
        name: "vm-1".into(),
    };
    let rules = remediator(sim, Arc::new(SoleReplica))
        .azure
        .network_rules(&vm)
        .await
        .unwrap();
    let nsg = rules.subnet_nsg.unwrap();
    let found = nsg.rules.iter().find(|r| r.name == rule).unwrap();
    found.destination_prefixes.join(",")
}

fn notes<'a>(events: &'a [Event], reason: &str) -> Vec<&'a str> {
    events
        .iter()
        .filter(|e| e.reason == reason)
        .map(|e| e.note.as_str())
        .collect()
}

#[tokio::test]
async fn the_original_address_is_recorded_first_and_restored_after_the_reset() {
    let sim = Simulator::start(scenario()).await.unwrap();
    let run = drive(&sim, Arc::default(), |_| {}).await;
    // (a) The intent held the original address before the PUT that moved the NIC.
    let (intent, writes) = run
        .persisted
        .iter()
        .find(|(s, _)| s.ladder.current.as_ref().is_some_and(|c| c.nic.is_some()))
        .expect("an intent with the NIC's address");
    let recorded = intent.ladder.current.as_ref().unwrap().nic.clone().unwrap();
    assert_eq!(count(writes, "nic.put"), 0, "recorded before any NIC PUT");
    assert_eq!(recorded.original_ip, ORIGINAL);
    assert_eq!(recorded.original_allocation, "Static");
    assert!(recorded.nic_id.ends_with("/networkInterfaces/vm-1-nic"));
    let new_ip = recorded.new_ip.clone();
    assert_ne!(new_ip, ORIGINAL);
    // The restore's intent was stored after the reset's PUT and before its own.
    let (restore_intent, writes) = run
        .persisted
        .iter()
        .find(|(s, _)| {
            s.ladder
                .current
                .as_ref()
                .and_then(|c| c.nic.as_ref())
                .is_some_and(|n| n.restore == RestoreState::Requested)
        })
        .expect("an intent for the restore");
    assert_eq!(count(writes, "nic.put"), 1, "{writes:?}");
    assert_eq!(
        restore_intent.ladder.current.as_ref().unwrap().phase,
        crate::ladder::ExecutionPhase::Requested
    );
    // (b) One reset PUT, one restore PUT; the NIC is back where it was, and RDP answers.
    assert_eq!(count(&run.writes, "nic.put"), 2, "{:?}", run.writes);
    assert_eq!(
        sim.vm("vm-1").unwrap().private_ip.as_deref(),
        Some(ORIGINAL)
    );
    let last = run.status.ladder.history.last().unwrap();
    assert_eq!(last.step, Step::rung(Rung::ResetNic));
    assert_eq!(last.outcome, RungOutcome::Fixed, "{last:?}");
    let nic = last.nic.as_ref().unwrap();
    assert_eq!(nic.restore, RestoreState::Restored, "{nic:?}");
    assert_eq!(nic.reachable_after_reset, Some(true));
    assert!(run.status.ladder.incident_started_at.is_none());
    // (d) The operator's rule followed the address there and back; the foreign rule did not.
    assert_eq!(count(&run.writes, "nsgrule.put"), 2, "{:?}", run.writes);
    assert_eq!(
        notes(&run.events, "NsgRuleMoved")
            .iter()
            .map(|n| n.contains(OWN_RULE)
                && (n.ends_with(&format!("{ORIGINAL} → {new_ip}"))
                    || n.ends_with(&format!("{new_ip} → {ORIGINAL}"))))
            .collect::<Vec<_>>(),
        vec![true, true],
        "{:?}",
        notes(&run.events, "NsgRuleMoved")
    );
    assert!(notes(&run.events, "NsgRuleMoved")[0].ends_with(&format!("→ {new_ip}")));
    assert_eq!(destination(&sim, OWN_RULE, ORIGINAL).await, ORIGINAL);
    assert_eq!(destination(&sim, FOREIGN_RULE, ORIGINAL).await, ORIGINAL);
    assert!(!run.events.iter().any(|e| e.note.contains(FOREIGN_RULE)));
    sim.shutdown().await;
}

#[tokio::test]
async fn a_taken_original_address_is_kept_with_a_warning_and_no_restore() {
    let sim = Simulator::start(scenario()).await.unwrap();
    let original: Ipv4Addr = ORIGINAL.parse().unwrap();
    let mut taken = false;
    // Once the reset moved the NIC, vm-2 takes the freed address.
    let run = drive(&sim, Arc::default(), |sim| {
        let moved = sim.vm("vm-1").unwrap().private_ip.as_deref() != Some(ORIGINAL);
        if moved && !taken {
            taken = sim.assign_private_ip("vm-2", original);
        }
    })
    .await;
    assert!(taken);
    assert_eq!(
        count(&run.writes, "nic.put"),
        1,
        "no restore PUT: {:?}",
        run.writes
    );
    let last = run.status.ladder.history.last().unwrap();
    assert_eq!(last.outcome, RungOutcome::Fixed);
    let nic = last.nic.as_ref().unwrap();
    assert_eq!(nic.restore, RestoreState::Kept);
    let new_ip = nic.new_ip.clone();
    assert_eq!(
        sim.vm("vm-1").unwrap().private_ip.as_deref(),
        Some(new_ip.as_str())
    );
    assert!(nic.message.as_deref().unwrap().contains("no longer free"));
    let kept = notes(&run.events, "NicAddressKept");
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert!(
        kept[0].contains(ORIGINAL) && kept[0].contains(&new_ip),
        "{kept:?}"
    );
    let warned = run
        .events
        .iter()
        .find(|e| e.reason == "NicAddressKept")
        .unwrap();
    assert_eq!(warned.severity, Severity::Warning);
    // The operator's rule stays with the VM's address; the foreign rule is untouched.
    assert_eq!(
        destination(&sim, OWN_RULE, &new_ip).await,
        new_ip,
        "{:?}",
        run.events
            .iter()
            .filter(|e| e.reason.starts_with("Nsg"))
            .collect::<Vec<_>>()
    );
    assert_eq!(destination(&sim, FOREIGN_RULE, ORIGINAL).await, ORIGINAL);
    sim.shutdown().await;
}

#[tokio::test]
async fn a_restore_interrupted_after_its_intent_is_never_sent() {
    let sim = Simulator::start(scenario()).await.unwrap();
    let lease = Arc::new(Lease::default());
    lease.lose_at_restore.store(true, Ordering::SeqCst);
    let run = drive(&sim, lease.clone(), |_| {}).await;
    assert!(
        !lease.lose_at_restore.load(Ordering::SeqCst),
        "the lease was lost"
    );
    // The restore's intent was stored, the replica lost the lease before the PUT, and the
    // next leader settled it as of unknown outcome instead of sending it.
    assert_eq!(count(&run.writes, "nic.put"), 1, "{:?}", run.writes);
    let last = run.status.ladder.history.last().unwrap();
    let nic = last.nic.as_ref().unwrap();
    assert_eq!(nic.restore, RestoreState::Unknown, "{nic:?}");
    assert_eq!(last.outcome, RungOutcome::Fixed, "the reset fixed it");
    assert!(
        notes(&run.events, "RemediationOutcomeUnknown")
            .iter()
            .any(|n| n.contains("restore")),
        "{:?}",
        run.events
    );
    sim.shutdown().await;
}
