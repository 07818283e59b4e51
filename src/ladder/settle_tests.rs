//! Settling follows the guest: a rung that restarts it is judged only once it is back.

use std::time::Duration;

use super::{
    settle::{BOOT_LIMIT_FACTOR, GUEST_CHECK_INTERVAL, due},
    tests::{Case, at},
    *,
};

/// A restart whose operation finished at 100, with a short `settleTime` of 30 s.
fn restart_settling(rung: Rung) -> Case {
    let mut case = Case::new();
    case.policy.settle_time = Duration::from_secs(30);
    case.ladder.start(Step::rung(rung), at(10));
    case.ladder.running(
        OperationRef {
            async_operation_url: Some("http://arm/op/1".into()),
            location_url: None,
        },
        at(20),
    );
    case.ladder.settle(at(100), at(130), None);
    case.now = at(130);
    case
}

fn booting(until: i64) -> Decision {
    Decision::Wait {
        until: at(until),
        reason: WaitReason::GuestBooting,
    }
}

#[test]
fn a_restart_whose_guest_boots_slower_than_settle_time_is_credited_when_it_recovers() {
    let mut case = restart_settling(Rung::Restart);
    // settleTime is up: look at the guest before judging.
    assert_eq!(case.decide(), Decision::WatchGuest);
    case.ladder.guest_checked(at(130), Some(false));
    assert_eq!(case.decide(), booting(160), "the guest is still booting");
    case.now = at(160);
    assert_eq!(case.decide(), Decision::WatchGuest);
    case.ladder.guest_checked(at(160), Some(false));
    assert_eq!(case.decide(), booting(190));
    case.now = at(190);
    assert_eq!(case.decide(), Decision::WatchGuest);
    case.ladder.guest_checked(at(190), Some(true));
    // Back: the probe gets settleTime with the guest up.
    assert_eq!(
        case.decide(),
        Decision::Wait {
            until: at(220),
            reason: WaitReason::Settling
        }
    );
    case.now = at(205);
    case.reachability = Reachability::Reachable;
    assert_eq!(case.decide(), Decision::Recovered);
    assert_eq!(
        case.ladder.recover(at(205)),
        Some(Step::rung(Rung::Restart))
    );
    let last = case.ladder.history.last().unwrap();
    assert_eq!(last.outcome, RungOutcome::Fixed);
    assert_eq!(case.ladder.recovered_by, Some(Step::rung(Rung::Restart)));
}

#[test]
fn a_booting_guest_is_never_escalated_over_until_the_boot_limit() {
    for rung in [Rung::Restart, Rung::Redeploy, Rung::ResetNic, Rung::StartVm] {
        let mut case = restart_settling(rung);
        let limit = 100 + 30 * i64::from(BOOT_LIMIT_FACTOR);
        let mut now = 130;
        while now < limit {
            case.now = at(now);
            match case.decide() {
                Decision::WatchGuest => case.ladder.guest_checked(at(now), Some(false)),
                Decision::Wait {
                    reason: WaitReason::GuestBooting,
                    until,
                } => assert!(until <= at(limit), "{rung}: waits past the limit"),
                other => panic!("{rung} at {now}: {other:?} while the guest boots"),
            }
            now += 10;
        }
        case.now = at(limit);
        assert_eq!(case.decide(), Decision::NotFixed, "{rung}: bounded");
        assert!(settle::still_booting(case.ladder.current.as_ref().unwrap()));
    }
    // An agent that was Not Ready before the rung too: the same bounded wait.
    let mut case = restart_settling(Rung::ResetNic);
    case.evidence.as_mut().unwrap().agent_ready = Some(false);
    assert_eq!(case.decide(), Decision::WatchGuest);
    case.ladder.guest_checked(at(130), Some(false));
    assert_eq!(case.decide(), booting(160));
}

#[test]
fn a_probe_that_answers_ends_the_boot_wait() {
    let mut case = restart_settling(Rung::Restart);
    case.ladder.guest_checked(at(130), Some(false));
    case.now = at(150);
    case.ladder.guest_answered(at(150));
    assert_eq!(
        case.decide(),
        Decision::Wait {
            until: at(180),
            reason: WaitReason::Settling
        },
        "thresholds get settleTime to confirm the recovery"
    );
    case.now = at(180);
    assert_eq!(
        case.decide(),
        Decision::NotFixed,
        "answered, then down again"
    );
}

#[test]
fn the_timer_alone_judges_when_the_guest_says_nothing() {
    // A rung that does not restart the guest.
    let case = restart_settling(Rung::ResetRdpConfig);
    assert_eq!(case.decide(), Decision::NotFixed);
    // The agent reads Ready at the first look after settleTime: the guest is up, RDP is not.
    let mut case = restart_settling(Rung::Restart);
    case.ladder.guest_checked(at(130), Some(true));
    assert_eq!(case.decide(), Decision::NotFixed);
    // The instance view could not be read: judged by the probe, as before.
    let mut case = restart_settling(Rung::Restart);
    case.ladder.guest_checked(at(130), None);
    assert_eq!(case.decide(), Decision::NotFixed);
}

#[test]
fn settling_is_due_at_the_next_look_at_a_booting_guest() {
    let mut case = restart_settling(Rung::Restart);
    let settle = case.policy.settle_time;
    let current = |c: &Case| c.ladder.current.clone().unwrap();
    assert_eq!(due(&current(&case), settle), Some(at(130)));
    case.ladder.guest_checked(at(130), Some(false));
    let next = at(130).checked_add(GUEST_CHECK_INTERVAL).unwrap();
    assert_eq!(due(&current(&case), settle), Some(next));
    case.ladder.guest_checked(at(170), Some(true));
    assert_eq!(due(&current(&case), settle), Some(at(200)));
}
