//! The whole ladder against Azure's real durations: the simulator's realistic timing profile
//! (restart minutes, redeploy 5–15 min, Run Command ≥ 20 s, Retry-After 10–60 s, a NIC change
//! restarts the VM, Windows boots for minutes after Azure reports a restart done) and the
//! operator's default settings, on the demo's in-memory driver with a clock compressed 100×
//! for the engine and the simulator alike. No rung is abandoned or re-sent because Azure is
//! slow, and every ladder ends where the guides say.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: failures should panic

use std::{collections::BTreeMap, time::Duration};

use rdphealth::{
    demo::{self, DemoConfig, fleet::Expect},
    ladder::{Rung, RungOutcome, Step, nic::RestoreState},
    sim::{Fault, TimingProfile},
};

/// The guest-hung VM of the built-in fleet gets a ladder whose only reboot is `Restart`, and
/// a `settleTime` (30 s) far shorter than its guest's boot: the restart must still get the
/// credit, judged once the guest is back.
const GUEST_HUNG_SPEC: &str = r#"
apiVersion: rdphealth.io/v1alpha1
kind: RdpHealth
metadata: {name: vm-006-guest-hung, namespace: demo}
spec:
  vm:
    resourceId: /subscriptions/00000000-0000-0000-0000-00000000de01/resourceGroups/rg-demo/providers/Microsoft.Compute/virtualMachines/vm-006-guest-hung
  remediation:
    mode: Auto
    ladder: [ResetRdpConfig, Restart, Redeploy]
    allowedDisruptiveActions: [Restart, Redeploy]
    settleTime: 30s
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_ladder_meets_azures_real_durations_without_abandoning_or_resending() {
    let dir = std::env::temp_dir().join(format!("rdphealth-realistic-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let objects = dir.join("guest-hung.yaml");
    std::fs::write(&objects, GUEST_HUNG_SPEC).unwrap();
    let cfg = DemoConfig {
        vms: 12,
        speed: 100.0,
        timing: TimingProfile::Realistic,
        seed: 1,
        objects: vec![objects],
        expect: BTreeMap::from([(
            "vm-006-guest-hung".to_string(),
            Expect::FixedBy(Step::rung(Rung::Restart)),
        )]),
        timeout: Duration::from_secs(150),
        exit_when_settled: true,
        live_table: false,
        ..DemoConfig::default()
    };
    let summary = demo::run(&cfg).await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let report = demo::view::render_summary(&summary);
    assert!(summary.settled, "{report}");
    // Every VM fixed by the rung the guides (or its spec) say.
    for t in &summary.vms {
        if let Expect::FixedBy(step) = t.expect {
            assert_eq!(t.fixed_by, Some(step), "{:?}\n{report}", t.fault);
        }
    }
    let by_fault = |f: Fault| summary.vms.iter().find(|t| t.fault == Some(f)).unwrap();
    assert_eq!(
        by_fault(Fault::NicBroken).fixed_by,
        Some(Step::rung(Rung::ResetNic))
    );
    // Azure was really slow: the redeploy alone takes at least five (compressed) minutes.
    let host = by_fault(Fault::HostFailure);
    let took = host.recovered_after.unwrap() - host.detected_after.unwrap();
    assert!(took >= Duration::from_secs(300), "{took:?}");

    // No rung was abandoned, failed, repeated or left of unknown outcome.
    let mut rungs: BTreeMap<Rung, u64> = BTreeMap::new();
    for t in &summary.vms {
        let ladder = t.obj.status.as_ref().unwrap().ladder.clone();
        assert!(ladder.current.is_none(), "{:?}", ladder.current);
        for (i, record) in ladder.history.iter().enumerate() {
            let name = t.obj.metadata.name.as_deref().unwrap_or_default();
            match record.outcome {
                RungOutcome::Fixed | RungOutcome::NotFixed => {}
                // A repair that needed a restart: the next record is that restart.
                RungOutcome::Applied => assert_eq!(
                    ladder.history.get(i + 1).map(|r| r.step),
                    record.step.repair.map(Step::restart_after),
                    "{name} {record:?}"
                ),
                _ => panic!("{name} {record:?}"),
            }
            assert_eq!(record.attempt, 1, "{record:?}");
            if record.step.rung == Rung::ResetNic {
                // The guide's procedure: the address moved and came back.
                let restore = record.nic.as_ref().map(|n| n.restore);
                assert_eq!(restore, Some(RestoreState::Restored), "{name} {record:?}");
            }
            *rungs.entry(record.step.rung).or_default() += 1;
        }
    }
    // Each rung's Azure write was sent exactly once.
    let calls = |op: &str| summary.arm_calls.get(op).copied().unwrap_or(0);
    let ran = |rung: Rung| rungs.get(&rung).copied().unwrap_or(0);
    assert_eq!(calls("vm.restart"), ran(Rung::Restart), "{rungs:?}");
    assert_eq!(calls("vm.redeploy"), ran(Rung::Redeploy), "{rungs:?}");
    // One PUT moves the NIC, one puts its original address back.
    assert_eq!(calls("nic.put"), 2 * ran(Rung::ResetNic), "{rungs:?}");
    assert_eq!(
        calls("extension.put"),
        ran(Rung::ResetRdpConfig),
        "{rungs:?}"
    );
    assert!(calls("vm.runcommand") >= ran(Rung::RepairGuest));
    assert_eq!(calls("vm.start"), 0);
    // The guest-hung VM: ResetRdpConfig did not help, the Restart did, and nothing after it.
    let hung = by_fault(Fault::GuestHung);
    let steps: Vec<(Rung, RungOutcome)> = hung
        .obj
        .status
        .as_ref()
        .unwrap()
        .ladder
        .history
        .iter()
        .map(|r| (r.step.rung, r.outcome))
        .collect();
    assert_eq!(
        steps,
        [
            (Rung::ResetRdpConfig, RungOutcome::NotFixed),
            (Rung::Restart, RungOutcome::Fixed)
        ],
        "{report}"
    );
}
