use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use rstest::rstest;

use super::{memory::*, reconcile::*, *};
use crate::ladder::{RungExecution, RungOutcome, Step};

fn with_annotation(value: Option<&str>, consumed: Option<&str>) -> (RdpHealth, RdpHealthStatus) {
    let mut obj: RdpHealth = serde_json::from_value(json!({
        "apiVersion": "rdphealth.io/v1alpha1", "kind": "RdpHealth",
        "metadata": {"name": "a", "namespace": "ns"},
        "spec": {"vm": {"resourceId": "/subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm"}},
    }))
    .unwrap();
    if let Some(v) = value {
        obj.metadata.annotations = Some([(APPROVE_ANNOTATION.to_string(), v.to_string())].into());
    }
    let mut status = RdpHealthStatus::default();
    status.ladder.consumed_approval = consumed.map(str::to_string);
    (obj, status)
}

#[rstest]
#[case::none(None, None, None)]
#[case::rung(Some("Redeploy"), None, Some(Rung::Redeploy))]
#[case::rung_and_token(Some("Restart/ticket-42"), None, Some(Rung::Restart))]
#[case::used_once(Some("Restart/ticket-42"), Some("Restart/ticket-42"), None)]
#[case::new_token_approves_again(
    Some("Restart/ticket-43"),
    Some("Restart/ticket-42"),
    Some(Rung::Restart)
)]
#[case::unknown_rung(Some("Reboot"), None, None)]
fn approvals_are_used_once(
    #[case] value: Option<&str>,
    #[case] consumed: Option<&str>,
    #[case] want: Option<Rung>,
) {
    let (obj, status) = with_annotation(value, consumed);
    assert_eq!(approval(&obj, &status).map(|(_, r)| r), want);
}

fn execution(rung: Rung, phase: ExecutionPhase, started: i64) -> RungExecution {
    RungExecution {
        step: Step::rung(rung),
        attempt: 1,
        phase,
        started_at: Time(ts(started)),
        operation: None,
        next_poll_at: None,
        settle_until: None,
        finished_at: None,
        guest: None,
        message: None,
        outcome_unknown: false,
        lease: None,
        snapshot: None,
        drops_sessions: false,
        acl_backup: None,
        nic: None,
    }
}

fn ts(s: i64) -> Timestamp {
    Timestamp::from_second(s).unwrap()
}

#[test]
fn redeploy_and_nic_reset_refresh_the_address_once() {
    let mut before = LadderStatus {
        current: Some(execution(Rung::Redeploy, ExecutionPhase::Running, 10)),
        ..LadderStatus::default()
    };
    let mut after = before.clone();
    assert!(!address_may_have_changed(&before, &after), "still running");
    after.current = Some(execution(Rung::Redeploy, ExecutionPhase::Settling, 10));
    assert!(
        address_may_have_changed(&before, &after),
        "finished in Azure"
    );
    before = after.clone();
    assert!(!address_may_have_changed(&before, &after), "only once");
    let restart = LadderStatus {
        current: Some(execution(Rung::Restart, ExecutionPhase::Settling, 10)),
        ..LadderStatus::default()
    };
    assert!(!address_may_have_changed(
        &LadderStatus::default(),
        &restart
    ));
    after.finish(RungOutcome::NotFixed, None, ts(20), None);
    assert!(address_may_have_changed(&before, &after), "judged");
}

#[test]
fn remediation_results_are_counted_once() {
    let metrics = Metrics::new().unwrap();
    let mut before = LadderStatus::default();
    before.open_incident(ts(1));
    let mut after = before.clone();
    after.start(Step::rung(Rung::ResetRdpConfig), ts(5));
    metrics.count_remediations(&before, &after, ts(5));
    before = after.clone();
    after.finish(RungOutcome::NotFixed, None, ts(9), None);
    metrics.count_remediations(&before, &after, ts(9));
    before = after.clone();
    metrics.count_remediations(&before, &after, ts(10));
    after.start(Step::rung(Rung::Restart), ts(11));
    after.finish(RungOutcome::Failed, None, ts(11), None);
    metrics.count_remediations(&before, &after, ts(11));
    // A rung whose OS-disk snapshot comes first: its intent while the snapshot is taken,
    // dropped once it is, then the rung's own start: counted once.
    before = after.clone();
    after.start(Step::rung(Rung::Redeploy), ts(20));
    if let Some(c) = after.current.as_mut() {
        c.phase = ExecutionPhase::Snapshotting;
    }
    metrics.count_remediations(&before, &after, ts(20));
    before = after.clone();
    after.drop_unstarted();
    after.start(Step::rung(Rung::Redeploy), ts(30));
    metrics.count_remediations(&before, &after, ts(30));
    let text = metrics.render().unwrap();
    for line in [
        r#"rdphealth_remediations_total{result="started",rung="Redeploy"} 1"#,
        r#"rdphealth_remediations_total{result="started",rung="ResetRdpConfig"} 1"#,
        r#"rdphealth_remediations_total{result="not_fixed",rung="ResetRdpConfig"} 1"#,
        r#"rdphealth_remediations_total{result="started",rung="Restart"} 1"#,
        r#"rdphealth_remediations_total{result="failed",rung="Restart"} 1"#,
    ] {
        assert!(text.contains(line), "{line} in\n{text}");
    }
}

#[test]
fn the_last_failure_comes_from_status() {
    let mut status = RdpHealthStatus::default();
    assert!(last_failure(Some(&status)).is_none());
    status.last_probe = Some(crate::api::LastProbe {
        time: k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(ts(1)),
        reachable: false,
        failure_reason: Some("tls_handshake_failed".into()),
        message: Some("alert".into()),
        latency_ms: 1,
        selected_protocol: None,
        tls_version: None,
        certificate_not_after: None,
    });
    let f = last_failure(Some(&status)).unwrap();
    assert_eq!(f.reason, FailureReason::TlsHandshakeFailed);
}

fn named(name: &str, uid: &str) -> DeserializeGuard<RdpHealth> {
    let (mut obj, _) = with_annotation(None, None);
    obj.metadata.name = Some(name.into());
    obj.metadata.uid = Some(uid.into());
    DeserializeGuard(Ok(obj))
}

fn remembered() -> Remembered {
    Remembered::of(Some(ts(1)), &RdpHealthStatus::default())
}

#[test]
fn deleted_objects_are_forgotten() {
    let mut writer: Writer<DeserializeGuard<RdpHealth>> = Writer::default();
    let store = writer.as_reader();
    let memory = ProbeMemory::default();
    for (name, uid) in [("a", "uid-a"), ("b", "uid-b"), ("c", "uid-c")] {
        let event = watcher::Event::Apply(named(name, uid));
        writer.apply_watcher_event(&event);
        memory.follow(&event, &store);
        memory.remember(uid.into(), remembered());
    }
    assert_eq!(memory.len(), 3);
    // A deletion seen on the watch.
    let event = watcher::Event::Delete(named("a", "uid-a"));
    writer.apply_watcher_event(&event);
    memory.follow(&event, &store);
    assert!(memory.get("uid-a").is_none());
    assert_eq!(memory.len(), 2);
    // A deletion missed while the watch was down: the relist no longer holds "b".
    for event in [
        watcher::Event::Init,
        watcher::Event::InitApply(named("c", "uid-c")),
        watcher::Event::InitDone,
    ] {
        writer.apply_watcher_event(&event);
        memory.follow(&event, &store);
    }
    assert!(memory.get("uid-b").is_none());
    assert!(memory.get("uid-c").is_some());
    assert_eq!(memory.len(), 1);
}

#[test]
fn a_recreated_object_is_remembered_afresh() {
    let first = named("a", "uid-1");
    let again = named("a", "uid-2");
    assert_ne!(memory_id(meta_of(&first)), memory_id(meta_of(&again)));
    let mut nameless = named("a", "x");
    if let Ok(obj) = &mut nameless.0 {
        obj.metadata.uid = None;
    }
    assert_eq!(memory_id(meta_of(&nameless)).as_deref(), Some("ns/a"));
}

#[test]
fn the_remembered_status_is_continued_while_the_stored_one_tells_the_same_story() {
    let (mut obj, mut stored) = with_annotation(None, None);
    stored.last_probe = Some(crate::api::LastProbe {
        time: k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(ts(100)),
        reachable: true,
        failure_reason: None,
        message: None,
        latency_ms: 1,
        selected_protocol: Some("rdp".into()),
        tls_version: None,
        certificate_not_after: None,
    });
    stored.consecutive_successes = 3;
    obj.status = Some(stored.clone());
    let mut newer = stored.clone();
    if let Some(p) = newer.last_probe.as_mut() {
        p.time = k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(ts(130));
    }
    newer.consecutive_successes = 4;
    let remembered = Remembered::of(Some(ts(130)), &newer);
    let status = |o: Option<Box<RdpHealth>>| o.map(|o| o.status);
    assert_eq!(
        status(continued(&obj, Some(&remembered))),
        Some(Some(newer.clone()))
    );
    // Something else was written since (another replica, a lost write): the stored wins.
    let mut other = newer;
    other.consecutive_failures = 1;
    let remembered = Remembered::of(Some(ts(130)), &other);
    assert!(continued(&obj, Some(&remembered)).is_none());
    assert!(continued(&obj, None).is_none());
    obj.status = None;
    assert!(continued(&obj, Some(&remembered)).is_none());
}

#[rstest]
#[case(0, 1)]
#[case(1, 1)]
#[case(2, 2)]
#[case(3, 4)]
#[case(6, 32)]
#[case(9, 256)]
#[case(10, 300)]
#[case(u32::MAX, 300)]
fn backoff_doubles_and_caps(#[case] attempt: u32, #[case] secs: u64) {
    assert_eq!(backoff_delay(attempt), Duration::from_secs(secs));
}

#[test]
fn the_cache_keeps_what_the_controller_reads_and_drops_the_rest() {
    let mut obj: RdpHealth = serde_json::from_value(json!({
        "apiVersion": "rdphealth.io/v1alpha1", "kind": "RdpHealth",
        "metadata": {
            "name": "a", "namespace": "ns", "resourceVersion": "42",
            "annotations": {
                PAUSE_ANNOTATION: "true",
                APPROVE_ANNOTATION: "Restart/t-1",
                "kubectl.kubernetes.io/last-applied-configuration": "{\"spec\":{}}",
            },
            "managedFields": [{"manager": "kubectl", "operation": "Update", "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {}}}],
        },
        "spec": {"vm": {"resourceId": "/subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm"}},
    }))
    .unwrap();
    let spec = obj.spec.clone();
    let mut guard = DeserializeGuard(Ok(obj.clone()));
    trim(&mut guard);
    let trimmed = guard.0.unwrap();
    assert_eq!(trimmed.metadata.managed_fields, None);
    let annotations = trimmed.metadata.annotations.clone().unwrap();
    assert_eq!(annotations.len(), 2, "{annotations:?}");
    assert_eq!(annotations[PAUSE_ANNOTATION], "true");
    assert_eq!(annotations[APPROVE_ANNOTATION], "Restart/t-1");
    assert_eq!(trimmed.metadata.resource_version.as_deref(), Some("42"));
    assert_eq!(trimmed.spec, spec);
    obj.metadata.managed_fields = None;
    obj.metadata.annotations = Some(annotations);
    assert_eq!(trimmed, obj, "nothing else changed");
}
