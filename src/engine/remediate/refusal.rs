//! Azure's "not now" answers to a rung.
//!
//! - Refused before anything ran: ARM or Compute throttled the call (429, Retry-After up to
//!   1,200 s), Network answered 429 `RetryableErrorDueToAnotherOperation`, or Network accepted
//!   the change and failed it later with `AnotherOperationInProgress`. Nothing changed on the
//!   VM: the intent is dropped without counting an attempt, the ladder waits what Azure asked
//!   and then decides again on what it sees then — it never re-sends the call blindly.
//! - Preempted after it started: Compute cancels an older operation when a newer one on the
//!   same VM arrives (status `Canceled`, code `OperationPreempted`). Whether ours took effect
//!   is unknown, so it is not repeated: it settles and the probe judges it (`Fixed` if RDP is
//!   back, else `Unknown`).

use super::messages::{current, set};
use super::*;
use crate::azure::policy::ANOTHER_OPERATION;

/// The wait when Azure named none.
const DEFAULT_WAIT: Duration = Duration::from_secs(30);

/// The longest wait taken from a `Retry-After` (Compute's documented maximum is 1,200 s; a
/// larger value is read as a garbled header, not as a reason to stall for hours).
const MAX_WAIT: Duration = Duration::from_secs(1_200);

/// Whether Azure refused a write without running it and asked to come back later: a 429
/// (throttling or Network's lock) is answered before anything runs. A 503 is not read as
/// one: without a body it says nothing about what was done.
pub(super) fn not_now(e: &AzureError) -> bool {
    matches!(e, AzureError::Throttled { status: 429, .. }) || e.is_another_operation()
}

/// Whether an accepted operation failed only because another one held the resource.
pub(super) fn failed_for_another_operation(code: &str) -> bool {
    code.eq_ignore_ascii_case("AnotherOperationInProgress")
        || code.eq_ignore_ascii_case(ANOTHER_OPERATION)
}

/// Whether a newer operation on the VM replaced ours.
pub(super) fn preempted(code: &str) -> bool {
    code.eq_ignore_ascii_case("OperationPreempted") || code.eq_ignore_ascii_case("Canceled")
}

/// How long to wait before deciding again.
pub(super) fn wait_for(retry_after: Option<Duration>) -> Duration {
    retry_after.unwrap_or(DEFAULT_WAIT).min(MAX_WAIT)
}

impl Remediator {
    /// Drops the current rung's intent (nothing ran) and decides again after Azure's wait.
    pub(super) fn deferred(
        &self,
        subject: &Subject<'_>,
        vm: &VmRef,
        status: &mut RdpHealthStatus,
        events: &mut Vec<Event>,
        (why, retry_after): (&str, Option<Duration>),
        now: Timestamp,
    ) -> Continue {
        let next = now.checked_add(wait_for(retry_after)).unwrap_or(now);
        let (step, _) = current(&status.ladder);
        status.ladder.defer(next);
        self.fleet
            .release(&vm.subscription, subject.group, subject.key);
        let note = format!(
            "{step} was not carried out: Azure is busy ({why}); the ladder decides again at {next}"
        );
        set(
            status,
            types::REMEDIATING,
            Status::False,
            "AzureBusy",
            note.clone(),
            now,
        );
        events.push(Event {
            severity: Severity::Warning,
            reason: "RemediationDeferred",
            note,
        });
        Continue::Until(next)
    }

    /// A newer operation preempted ours: settle and let the probe judge, never repeat it.
    pub(super) fn preempted(
        &self,
        subject: &Subject<'_>,
        status: &mut RdpHealthStatus,
        events: &mut Vec<Event>,
        why: &str,
        now: Timestamp,
    ) -> Continue {
        let until = now
            .checked_add(subject.spec.ladder.settle_time)
            .unwrap_or(now);
        let (step, _) = current(&status.ladder);
        let message = format!(
            "preempted by a newer operation on the VM ({why}); whether it took effect is unknown, the probe judges it"
        );
        status.ladder.settle_unknown(now, until, message.clone());
        events.push(Event {
            severity: Severity::Warning,
            reason: "RemediationPreempted",
            note: format!("{step}: {message}"),
        });
        Continue::Until(until)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn azure_waits_are_honoured_up_to_computes_maximum() {
        assert_eq!(wait_for(None), DEFAULT_WAIT);
        assert_eq!(
            wait_for(Some(Duration::from_secs(10))),
            Duration::from_secs(10)
        );
        assert_eq!(
            wait_for(Some(Duration::from_secs(1_200))),
            Duration::from_secs(1_200)
        );
        assert_eq!(wait_for(Some(Duration::from_secs(86_400))), MAX_WAIT);
    }

    #[test]
    fn only_a_429_is_a_refusal_before_anything_ran() {
        let throttled = |status| AzureError::Throttled {
            status,
            retry_after: None,
            remaining: Default::default(),
        };
        assert!(not_now(&throttled(429)));
        assert!(!not_now(&throttled(503)));
        let lock = AzureError::Conflict {
            what: "nic".into(),
            code: ANOTHER_OPERATION.into(),
            message: String::new(),
            retry_after: None,
        };
        assert!(not_now(&lock));
        let stopped = AzureError::Conflict {
            what: "vm".into(),
            code: "OperationNotAllowed".into(),
            message: String::new(),
            retry_after: None,
        };
        assert!(!not_now(&stopped));
    }

    #[test]
    fn codes_are_read_whatever_their_case() {
        assert!(preempted("OperationPreempted") && preempted("canceled"));
        assert!(!preempted("VMAgentStatusCommunicationError"));
        assert!(failed_for_another_operation("AnotherOperationInProgress"));
        assert!(failed_for_another_operation(
            "RetryableErrorDueToAnotherOperation"
        ));
        assert!(!failed_for_another_operation("OperationNotAllowed"));
    }
}
