//! A repair whose changes need a restart of the VM (`restart=required`): the status and
//! Events that say so. Whether the operator restarts the VM is decided by
//! [`crate::ladder::restart`].

use super::messages::{current, refresh_at, set};
use super::*;
use crate::ladder::RestartHold;

impl Remediator {
    /// The repair's changes were applied and take effect only after a restart: the rung
    /// awaits it (no settling, nothing would change before the restart), and the ladder
    /// decides the restart at once.
    pub(super) fn restart_required(
        &self,
        status: &mut RdpHealthStatus,
        events: &mut Vec<Event>,
        message: String,
        now: Timestamp,
    ) -> Continue {
        let (step, attempt) = current(&status.ladder);
        status.ladder.await_restart(message);
        // Whatever follows is judged on probes taken after the repair.
        status.recent_probes.clear();
        set(
            status,
            types::REMEDIATING,
            Status::True,
            RESTART_REQUIRED,
            format!(
                "{step} applied, restart required: the VM is restarted next, under the Restart rung's rules"
            ),
            now,
        );
        events.push(Event {
            severity: Severity::Normal,
            reason: "RemediationCompleted",
            note: format!(
                "{step} (attempt {attempt}) applied in the guest; its changes take effect after a restart of the VM"
            ),
        });
        Continue::Again
    }

    /// The operator may not restart the VM: say so, and wait for a person, a permission or an
    /// approval; no other rung runs meanwhile.
    pub(super) fn restart_held(
        &self,
        subject: &Subject<'_>,
        status: &mut RdpHealthStatus,
        events: &mut Vec<Event>,
        (repair, hold): (GuestRepair, RestartHold),
        now: Timestamp,
    ) -> Continue {
        let message = format!(
            "{} applied, restart required: {}; the ladder waits for the VM to be restarted (by a person, or by the operator once Restart is allowed or approved) and runs no other rung meanwhile",
            Step::repair(repair),
            hold.message()
        );
        let changed = set(
            status,
            types::REMEDIATING,
            Status::False,
            RESTART_REQUIRED,
            message.clone(),
            now,
        );
        if changed {
            events.push(Event {
                severity: Severity::Warning,
                reason: RESTART_REQUIRED,
                note: message,
            });
        }
        Continue::Until(refresh_at(
            status,
            subject.spec.ladder.evidence_refresh,
            now,
        ))
    }
}

/// Reason of the `Remediating` condition and of the Event while a repair awaits its restart.
pub(super) const RESTART_REQUIRED: &str = "RestartRequired";
