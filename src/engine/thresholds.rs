//! Thresholds with hysteresis: one failed probe does not make a VM unreachable, and one
//! successful probe does not make an unreachable VM reachable again.

use super::conditions::Status;

/// Consecutive probe outcomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Streak {
    /// Failures in a row.
    pub failures: u32,
    /// Successes in a row.
    pub successes: u32,
}

impl Streak {
    /// The streak after one more probe.
    pub fn after(self, reachable: bool) -> Self {
        if reachable {
            Self {
                failures: 0,
                successes: self.successes.saturating_add(1),
            }
        } else {
            Self {
                failures: self.failures.saturating_add(1),
                successes: 0,
            }
        }
    }
}

/// Thresholds from the spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    /// Failures in a row before Reachable becomes False.
    pub failure: u32,
    /// Successes in a row before Reachable becomes True again after being False.
    pub success: u32,
}

/// The `Reachable` status after a probe, given the status before it and the updated streak.
///
/// - A failure streak reaching `failure` makes it False; shorter streaks keep the old status
///   (so a VM nobody has judged yet stays Unknown).
/// - From False, only a success streak reaching `success` makes it True (hysteresis).
/// - From True or Unknown, a success makes it True: there is nothing to recover from.
pub fn reachable_after(previous: Status, streak: Streak, thresholds: Thresholds) -> Status {
    if streak.failures > 0 {
        if streak.failures >= thresholds.failure {
            Status::False
        } else {
            previous
        }
    } else if previous == Status::False && streak.successes < thresholds.success {
        Status::False
    } else {
        Status::True
    }
}

#[cfg(test)]
mod tests {
    use rstest::rstest;

    use super::*;

    const T: Thresholds = Thresholds {
        failure: 3,
        success: 2,
    };

    fn streak(failures: u32, successes: u32) -> Streak {
        Streak {
            failures,
            successes,
        }
    }

    #[rstest]
    #[case::first_success_from_unknown(Status::Unknown, streak(0, 1), Status::True)]
    #[case::first_failure_from_unknown(Status::Unknown, streak(1, 0), Status::Unknown)]
    #[case::third_failure_from_unknown(Status::Unknown, streak(3, 0), Status::False)]
    #[case::one_failure_keeps_true(Status::True, streak(1, 0), Status::True)]
    #[case::two_failures_keep_true(Status::True, streak(2, 0), Status::True)]
    #[case::third_failure_flips(Status::True, streak(3, 0), Status::False)]
    #[case::more_failures_stay_false(Status::False, streak(7, 0), Status::False)]
    #[case::one_success_not_enough(Status::False, streak(0, 1), Status::False)]
    #[case::second_success_recovers(Status::False, streak(0, 2), Status::True)]
    #[case::success_keeps_true(Status::True, streak(0, 5), Status::True)]
    fn reachability(#[case] previous: Status, #[case] streak: Streak, #[case] want: Status) {
        assert_eq!(reachable_after(previous, streak, T), want);
    }

    #[rstest]
    #[case::success_resets_failures(streak(4, 0), true, streak(0, 1))]
    #[case::failure_resets_successes(streak(0, 4), false, streak(1, 0))]
    #[case::counts_up(streak(2, 0), false, streak(3, 0))]
    #[case::saturates(streak(u32::MAX, 0), false, streak(u32::MAX, 0))]
    fn streaks(#[case] before: Streak, #[case] reachable: bool, #[case] want: Streak) {
        assert_eq!(before.after(reachable), want);
    }

    #[test]
    fn threshold_of_one_reacts_immediately() {
        let t = Thresholds {
            failure: 1,
            success: 1,
        };
        assert_eq!(
            reachable_after(Status::True, streak(1, 0), t),
            Status::False
        );
        assert_eq!(
            reachable_after(Status::False, streak(0, 1), t),
            Status::True
        );
    }
}
