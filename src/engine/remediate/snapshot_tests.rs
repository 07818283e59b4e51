//! Snapshot before change, driven through the engine (`evaluate` → `remediate`) against the
//! ARM emulator with the real SDK adapter: what Azure received, in order, and what status
//! and Events say.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;
use crate::{
    api::{RdpHealth, RemediationMode, conditions as types},
    azure::{ArmClient, ArmConfig, StaticToken},
    engine::{Observation, ValidSpec, evaluate, testing::*},
    ladder::{RungOutcome, snapshot},
    probe::{FailureReason, ProbeReport},
    sim::{Behaviour, Scenario, Simulator, disk::Snapshot},
};

const SUB: &str = "00000000-0000-0000-0000-000000000001";

fn scenario(faults: &str) -> Scenario {
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
            rules: [ {{ name: allow-rdp, priority: 1000, access: Allow, protocol: Tcp, destinationPort: "3389" }} ]
        virtualNetworks:
          - {{ name: v, addressPrefix: 10.0.0.0/16, subnets: [ {{ name: s, addressPrefix: 10.0.0.0/24, networkSecurityGroup: open }} ] }}
        vms:
          - {{ name: vm-1, nic: {{ subnet: v/s }}, faults: [{faults}] }}
          - {{ name: vm-2, nic: {{ subnet: v/s }} }}
"#
    );
    Scenario::from_yaml(&yaml).unwrap()
}

/// Leadership for the first `n` questions, then none.
#[derive(Debug)]
struct LeaderFor(AtomicUsize);

impl LeaderCheck for LeaderFor {
    fn term(&self) -> Option<LeaseTerm> {
        let left = self.0.load(Ordering::SeqCst);
        if left == 0 {
            return None;
        }
        self.0.store(left - 1, Ordering::SeqCst);
        SoleReplica.term()
    }
}

/// Records every persisted status with how many write requests Azure had seen by then.
struct Sink<'a> {
    sim: &'a Simulator,
    persisted: Mutex<Vec<(RdpHealthStatus, Vec<String>)>>,
}

#[async_trait::async_trait]
impl StatusSink for Sink<'_> {
    async fn persist(&self, status: &RdpHealthStatus) -> Result<(), String> {
        let writes = self.sim.write_log();
        self.persisted
            .lock()
            .unwrap()
            .push((status.clone(), writes));
        Ok(())
    }
}

struct Run {
    status: RdpHealthStatus,
    events: Vec<Event>,
    persisted: Vec<(RdpHealthStatus, Vec<String>)>,
    writes: Vec<String>,
    error: Option<RemediateError>,
}

fn remediator(sim: &Simulator, leadership: Arc<dyn LeaderCheck>, timeout: Duration) -> Remediator {
    let mut config = ArmConfig::new(azure_core::Url::parse(&sim.arm_url()).unwrap());
    config.request_timeout = timeout;
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
        Behaviour::TlsAlert => failed_report(FailureReason::TlsHandshakeFailed),
        _ => failed_report(FailureReason::TcpTimeout),
    }
}

/// One reconcile of `obj` (`evaluate` → `remediate`) on the probe verdict `probed`, as the
/// object `default/vm-1` of the leader: `obj.status` becomes what it produced, its Events go to
/// `events`.
pub(super) async fn reconcile_once(
    remediator: &Remediator,
    obj: &mut RdpHealth,
    probed: ProbeReport,
    sink: &dyn StatusSink,
    events: &mut Vec<Event>,
    now: Timestamp,
) -> Result<(), RemediateError> {
    let failure = probed.failure.clone();
    let reachable = probed.reachable;
    let observation = Observation::Probed {
        endpoint: endpoint(),
        report: Box::new(probed),
    };
    let mut outcome = evaluate(obj, observation, now);
    let spec = ValidSpec::try_from(&obj.spec).unwrap();
    let subject = Subject {
        key: "default/vm-1",
        seed: "uid-1",
        spec: &spec,
        failure: failure.as_ref(),
        probed: Some(reachable),
        leader: true,
        paused: false,
        approval: None,
        group: None,
    };
    let result = remediator
        .remediate(&subject, &mut outcome, sink, now)
        .await;
    events.extend(outcome.events);
    obj.status = Some(outcome.status);
    result
}

/// Reconciles `obj` against the emulator (probe verdicts follow the simulated VM) until the
/// incident closes, the ladder gives up, the stage fails, or `rounds` are used.
async fn drive(sim: &Simulator, remediator: &Remediator, mut obj: RdpHealth, rounds: usize) -> Run {
    let sink = Sink {
        sim,
        persisted: Mutex::new(Vec::new()),
    };
    let mut events = Vec::new();
    let mut error = None;
    for _ in 0..rounds {
        let result = reconcile_once(
            remediator,
            &mut obj,
            report(sim),
            &sink,
            &mut events,
            Timestamp::now(),
        )
        .await;
        if let Err(e) = result {
            error = Some(e);
            break;
        }
        let ladder = &obj.status.as_ref().unwrap().ladder;
        if (ladder.incident_started_at.is_none() && !ladder.history.is_empty()) || ladder.exhausted
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    Run {
        status: obj.status.unwrap_or_default(),
        events,
        persisted: sink.persisted.into_inner().unwrap(),
        writes: sim.write_log(),
        error,
    }
}

fn object_with(ladder: &str, edit: impl FnOnce(&mut crate::api::RemediationSpec)) -> RdpHealth {
    let ladder: Vec<Rung> = serde_json::from_str(ladder).unwrap();
    object(|o| {
        o.spec.vm.resource_id = format!(
            "/subscriptions/{SUB}/resourceGroups/rg-1/providers/Microsoft.Compute/virtualMachines/vm-1"
        );
        o.spec.probe.failure_threshold = 1;
        o.spec.probe.success_threshold = 1;
        o.spec.evidence.guest_query = Some(false);
        let r = &mut o.spec.remediation;
        r.mode = RemediationMode::Auto;
        r.allowed_disruptive_actions = ladder
            .iter()
            .copied()
            .filter(|r| r.is_disruptive())
            .collect();
        r.ladder = ladder;
        r.settle_time = "100ms".into();
        r.backoff.initial = "100ms".into();
        edit(r);
    })
}

fn position(writes: &[String], op: &str) -> Option<usize> {
    writes.iter().position(|w| w == op)
}

fn reasons(events: &[Event]) -> Vec<&'static str> {
    events.iter().map(|e| e.reason).collect()
}

#[tokio::test]
async fn a_snapshot_precedes_a_disruptive_rung_and_is_named_in_status_and_events() {
    let sim = Simulator::start(scenario("guest_hung")).await.unwrap();
    let r = remediator(&sim, Arc::new(SoleReplica), Duration::from_secs(5));
    let run = drive(&sim, &r, object_with(r#"["Restart"]"#, |_| {}), 200).await;
    assert!(run.error.is_none(), "{:?}", run.error);
    let (snap, restart) = (
        position(&run.writes, "snapshot.put"),
        position(&run.writes, "vm.restart"),
    );
    assert!(snap.is_some() && snap < restart, "{:?}", run.writes);
    assert_eq!(sim.count("snapshot.put"), 1);
    assert_eq!(sim.count("vm.restart"), 1);
    // The intent (phase Snapshotting, the snapshot's id) was stored before the PUT.
    let (intent, seen) = run
        .persisted
        .iter()
        .find(|(s, _)| {
            s.ladder
                .current
                .as_ref()
                .is_some_and(|c| c.phase == crate::ladder::ExecutionPhase::Snapshotting)
        })
        .expect("a Snapshotting intent was stored");
    assert!(!seen.contains(&"snapshot.put".to_string()), "{seen:?}");
    let id = intent
        .ladder
        .current
        .as_ref()
        .unwrap()
        .snapshot
        .clone()
        .unwrap();
    // Azure has it, tagged as the operator's, from the VM's OS disk, incremental.
    let made = sim.snapshots();
    assert_eq!(made.len(), 1, "{made:?}");
    assert!(made[0]["id"].as_str().unwrap().eq_ignore_ascii_case(&id));
    assert_eq!(made[0]["properties"]["incremental"], true);
    assert_eq!(
        made[0]["properties"]["creationData"]["createOption"],
        "Copy"
    );
    assert_eq!(
        made[0]["properties"]["creationData"]["sourceResourceId"],
        sim.os_disk_id("vm-1").unwrap()
    );
    assert_eq!(
        made[0]["tags"][snapshot::MANAGED_BY_TAG],
        snapshot::MANAGED_BY
    );
    assert_eq!(made[0]["tags"][snapshot::VM_TAG], "vm-1");
    assert_eq!(made[0]["location"], "westeurope");
    // Status: the record (id, time, step), the rung's history names it, the condition.
    let ladder = &run.status.ladder;
    assert_eq!(ladder.snapshots.len(), 1);
    assert_eq!(ladder.snapshots[0].id, id);
    assert_eq!(ladder.snapshots[0].step, Step::rung(Rung::Restart));
    assert!(ladder.snapshots[0].used);
    let fixed = ladder.history.last().unwrap();
    assert_eq!(
        (fixed.step.rung, fixed.outcome, fixed.snapshot.as_deref()),
        (Rung::Restart, RungOutcome::Fixed, Some(id.as_str()))
    );
    let c = conditions::find(&run.status.conditions, types::OS_DISK_SNAPSHOT).unwrap();
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("True", "SnapshotTaken")
    );
    let started = run
        .events
        .iter()
        .find(|e| e.reason == "RemediationStarted")
        .unwrap();
    assert!(started.note.contains(&id), "{}", started.note);
    assert!(reasons(&run.events).contains(&"SnapshotTaken"));
    sim.shutdown().await;
}

#[tokio::test]
async fn a_snapshot_precedes_an_in_guest_write() {
    let sim = Simulator::start(scenario("tls_disabled")).await.unwrap();
    let r = remediator(&sim, Arc::new(SoleReplica), Duration::from_secs(5));
    // The TLS repair requires a restart, which is a disruptive rung: a snapshot before each.
    let run = drive(
        &sim,
        &r,
        object_with(r#"["RepairGuest", "Restart"]"#, |_| {}),
        200,
    )
    .await;
    let (snap, write) = (
        position(&run.writes, "snapshot.put"),
        position(&run.writes, "vm.runcommand"),
    );
    assert!(snap.is_some() && snap < write, "{:?}", run.writes);
    let repair = run
        .status
        .ladder
        .history
        .iter()
        .find(|h| h.step.rung == Rung::RepairGuest)
        .unwrap_or_else(|| panic!("{:?}", run.status.ladder));
    assert_eq!(repair.outcome, RungOutcome::Applied);
    assert!(repair.snapshot.is_some());
    let restart = run.status.ladder.history.last().unwrap();
    assert_eq!(
        (restart.step.rung, restart.outcome),
        (Rung::Restart, RungOutcome::Fixed),
        "{:?}",
        run.status.ladder
    );
    assert!(restart.snapshot.is_some() && restart.snapshot != repair.snapshot);
    let restart_at = position(&run.writes, "vm.restart");
    let second_snapshot = run
        .writes
        .iter()
        .enumerate()
        .filter(|(_, w)| *w == "snapshot.put")
        .nth(1)
        .map(|(i, _)| i);
    assert!(
        write < second_snapshot && second_snapshot < restart_at,
        "{:?}",
        run.writes
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn a_failed_snapshot_stops_the_rung_and_says_why() {
    let sim = Simulator::start(scenario("guest_hung, snapshot_fails"))
        .await
        .unwrap();
    let r = remediator(&sim, Arc::new(SoleReplica), Duration::from_secs(5));
    let run = drive(&sim, &r, object_with(r#"["Restart"]"#, |_| {}), 200).await;
    assert_eq!(sim.count("snapshot.put"), 1);
    assert_eq!(sim.count("vm.restart"), 0, "{:?}", run.writes);
    let record = run.status.ladder.history.last().unwrap();
    assert_eq!(record.outcome, RungOutcome::Failed);
    assert!(
        record
            .message
            .as_deref()
            .unwrap()
            .contains("InternalDiskManagementError"),
        "{record:?}"
    );
    let c = conditions::find(&run.status.conditions, types::OS_DISK_SNAPSHOT).unwrap();
    assert_eq!(
        (c.status.as_str(), c.reason.as_str()),
        ("False", "SnapshotFailed")
    );
    assert!(c.message.contains("Restart not started"), "{}", c.message);
    assert!(reasons(&run.events).contains(&"SnapshotFailed"));
    assert!(run.status.ladder.snapshots.is_empty());
    sim.shutdown().await;
}

#[tokio::test]
async fn snapshots_off_in_the_spec_means_no_snapshot() {
    let sim = Simulator::start(scenario("guest_hung")).await.unwrap();
    let r = remediator(&sim, Arc::new(SoleReplica), Duration::from_secs(5));
    let obj = object_with(r#"["Restart"]"#, |r| r.snapshots.enabled = false);
    let run = drive(&sim, &r, obj, 200).await;
    assert_eq!(sim.count("vm.restart"), 1, "{:?}", run.writes);
    assert_eq!(sim.count("snapshot.put"), 0);
    assert!(run.status.ladder.history.last().unwrap().snapshot.is_none());
    sim.shutdown().await;
}

#[tokio::test]
async fn a_snapshot_put_of_unknown_outcome_is_not_sent_again_and_the_rung_does_not_start() {
    let sim = Simulator::start(scenario("guest_hung")).await.unwrap();
    // Azure carries the PUT out, but its answer never reaches the operator.
    sim.drop_next_response("snapshot.put", Duration::from_secs(3));
    let r = remediator(&sim, Arc::new(SoleReplica), Duration::from_millis(500));
    let run = drive(&sim, &r, object_with(r#"["Restart"]"#, |_| {}), 200).await;
    assert_eq!(sim.count("snapshot.put"), 1, "{:?}", run.writes);
    assert_eq!(sim.count("vm.restart"), 0);
    let record = run.status.ladder.history.last().unwrap();
    assert_eq!(record.outcome, RungOutcome::Failed, "{record:?}");
    assert!(
        record
            .message
            .as_deref()
            .unwrap()
            .contains("not requested again"),
        "{record:?}"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn a_replica_that_lost_the_lease_after_storing_the_intent_sends_no_snapshot() {
    let sim = Simulator::start(scenario("guest_hung")).await.unwrap();
    // Leader when the rung is chosen, not any more right before the PUT.
    let r = remediator(
        &sim,
        Arc::new(LeaderFor(AtomicUsize::new(1))),
        Duration::from_secs(5),
    );
    let run = drive(&sim, &r, object_with(r#"["Restart"]"#, |_| {}), 200).await;
    assert!(
        matches!(run.error, Some(RemediateError::NotLeader)),
        "{:?}",
        run.error
    );
    assert_eq!(sim.count("snapshot.put"), 0);
    assert_eq!(sim.count("vm.restart"), 0);
    sim.shutdown().await;
}

fn seeded(name: &str, vm: &str, managed: bool, age_days: i64) -> Snapshot {
    let mut tags = std::collections::BTreeMap::new();
    tags.insert(snapshot::VM_TAG.to_owned(), vm.to_owned());
    if managed {
        tags.insert(
            snapshot::MANAGED_BY_TAG.to_owned(),
            snapshot::MANAGED_BY.to_owned(),
        );
    }
    let created = Timestamp::now().checked_sub(jiff_days(age_days)).unwrap();
    Snapshot {
        sub: SUB.to_owned(),
        rg: "rg-1".to_owned(),
        name: name.to_owned(),
        location: "westeurope".to_owned(),
        tags,
        source: "/subscriptions/x/resourceGroups/rg-1/providers/Microsoft.Compute/disks/d".into(),
        time_created: created.to_string(),
        provisioning_state: "Succeeded".to_owned(),
        incremental: true,
    }
}

fn jiff_days(days: i64) -> k8s_openapi::jiff::SignedDuration {
    k8s_openapi::jiff::SignedDuration::from_hours(24 * days)
}

#[tokio::test]
async fn retention_deletes_the_operators_old_snapshots_and_never_another_one() {
    let sim = Simulator::start(scenario("guest_hung")).await.unwrap();
    for s in [
        seeded("rdph-vm-1-old", "vm-1", true, 30),
        seeded("rdph-vm-1-recent", "vm-1", true, 1),
        seeded("manual-backup", "vm-1", false, 60),
        seeded("rdph-vm-2-old", "vm-2", true, 30),
    ] {
        sim.add_snapshot(s);
    }
    let r = remediator(&sim, Arc::new(SoleReplica), Duration::from_secs(5));
    let obj = object_with(r#"["Restart"]"#, |r| {
        r.snapshots.keep = 1;
        r.snapshots.max_age_days = 7;
    });
    let run = drive(&sim, &r, obj, 200).await;
    assert_eq!(sim.count("vm.restart"), 1, "{:?}", run.writes);
    let mut left: Vec<String> = sim
        .snapshots()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_owned())
        .collect();
    left.sort();
    let taken = run.status.ladder.snapshots[0].name().to_owned();
    let mut expected = vec![
        taken,
        "manual-backup".to_owned(),
        "rdph-vm-2-old".to_owned(),
    ];
    expected.sort();
    assert_eq!(left, expected);
    assert_eq!(sim.count("snapshot.delete"), 2);
    assert!(reasons(&run.events).contains(&"SnapshotsDeleted"));
    // A snapshot the operator took goes once it is older than maxAgeDays, even with no new
    // one: status shows it past the policy, so retention looks (at most hourly).
    let mut obj = object_with(r#"["Restart"]"#, |r| r.snapshots.max_age_days = 7);
    let mut status = run.status.clone();
    let eight_days_ago = Timestamp::now().checked_sub(jiff_days(8)).unwrap();
    status.ladder.snapshots[0].taken_at.0 = eight_days_ago;
    status.ladder.snapshots_pruned_at = None;
    sim.add_snapshot(seeded(status.ladder.snapshots[0].name(), "vm-1", true, 8));
    obj.status = Some(status);
    let again = drive(&sim, &r, obj, 1).await;
    assert_eq!(sim.count("snapshot.delete"), 3, "{:?}", again.writes);
    assert!(again.status.ladder.snapshots.is_empty());
    assert_eq!(sim.snapshots().len(), 2, "the others' snapshots stay");
    sim.shutdown().await;
}

#[tokio::test]
async fn a_snapshot_intent_found_without_its_operation_is_never_requested_again() {
    let sim = Simulator::start(scenario("guest_hung")).await.unwrap();
    let r = remediator(&sim, Arc::new(SoleReplica), Duration::from_secs(5));
    // An earlier leader stored the intent and stopped before recording the PUT's operation.
    let mut obj = object_with(r#"["Restart"]"#, |_| {});
    let long_ago = Timestamp::now()
        .checked_sub(k8s_openapi::jiff::SignedDuration::from_mins(5))
        .unwrap();
    let mut status = RdpHealthStatus::default();
    status.ladder.open_incident(long_ago);
    status.ladder.start(Step::rung(Rung::Restart), long_ago);
    if let Some(c) = status.ladder.current.as_mut() {
        c.phase = crate::ladder::ExecutionPhase::Snapshotting;
        c.snapshot = Some(snapshot::id(SUB, "rg-1", "rdph-vm-1-earlier"));
    }
    obj.status = Some(status);
    let run = drive(&sim, &r, obj, 3).await;
    assert_eq!(sim.count("snapshot.put"), 0, "{:?}", run.writes);
    assert_eq!(sim.count("vm.restart"), 0);
    let record = run.status.ladder.history.last().unwrap();
    assert_eq!(record.outcome, RungOutcome::Failed, "{record:?}");
    assert!(
        record
            .message
            .as_deref()
            .unwrap()
            .contains("not requested again"),
        "{record:?}"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn a_snapshot_precedes_the_rdp_settings_reset() {
    // VMAccess's reset rewrites the guest's RDP registry settings and firewall rule.
    let sim = Simulator::start(scenario("rdp_disabled")).await.unwrap();
    let r = remediator(&sim, Arc::new(SoleReplica), Duration::from_secs(5));
    let run = drive(&sim, &r, object_with(r#"["ResetRdpConfig"]"#, |_| {}), 200).await;
    let (snap, write) = (
        position(&run.writes, "snapshot.put"),
        position(&run.writes, "extension.put"),
    );
    assert!(snap.is_some() && snap < write, "{:?}", run.writes);
    assert_eq!(sim.count("snapshot.put"), 1);
    let fixed = run.status.ladder.history.last().unwrap();
    assert_eq!(
        (fixed.step.rung, fixed.outcome),
        (Rung::ResetRdpConfig, RungOutcome::Fixed),
        "{:?}",
        run.status.ladder
    );
    assert!(fixed.snapshot.is_some());
    sim.shutdown().await;
}

#[tokio::test]
async fn a_password_reset_refused_before_any_call_takes_no_snapshot() {
    // This operator has no access to Secrets: the reset is refused before anything is sent,
    // so there is nothing to take a snapshot for.
    let sim = Simulator::start(scenario("guest_hung")).await.unwrap();
    let r = remediator(&sim, Arc::new(SoleReplica), Duration::from_secs(5));
    let obj = object_with(r#"["ResetPassword"]"#, |r| {
        r.password_reset = Some(crate::ladder::spec::PasswordResetSpec {
            username: "rdpadmin".into(),
            secret_name: "vm-1-admin".into(),
        });
    });
    let run = drive(&sim, &r, obj, 40).await;
    let record = run
        .status
        .ladder
        .history
        .first()
        .unwrap_or_else(|| panic!("{:?}", run.status.ladder));
    assert_eq!(
        (record.step.rung, record.outcome),
        (Rung::ResetPassword, RungOutcome::Failed)
    );
    assert!(
        record
            .message
            .as_deref()
            .unwrap_or_default()
            .contains("no access to Secrets"),
        "{record:?}"
    );
    // Evidence only (boot diagnostics, IP flow verify): no snapshot, no VMAccess call.
    assert_eq!(
        position(&run.writes, "snapshot.put"),
        None,
        "{:?}",
        run.writes
    );
    assert_eq!(
        position(&run.writes, "extension.put"),
        None,
        "{:?}",
        run.writes
    );
    assert!(run.status.ladder.snapshots.is_empty());
    sim.shutdown().await;
}
