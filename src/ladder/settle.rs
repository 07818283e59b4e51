//! When a settling rung is judged. Azure reports a restart done once the VM runs again, but
//! Windows may still be booting (installing updates, checking a disk) for minutes: judging
//! the probe then calls a rung that worked "not fixed" and escalates to a more disruptive
//! one. So a rung that restarts the guest is judged only once the guest has visibly come
//! back — the VM agent reads Ready again after having been seen Not Ready, or a probe
//! succeeds — and never while it is still booting. Pure: the engine reads
//! the instance view when [`Decision::WatchGuest`] asks for it and records what it saw in
//! [`GuestWatch`].
//!
//! - `settleTime` after the operation finished is the judgement time whenever the guest is
//!   not seen booting then (as for every other rung).
//! - Seen booting at that time: the rung waits (`GuestBooting`, the status says so), looking
//!   at the instance view every [`GUEST_CHECK_INTERVAL`], at most [`BOOT_LIMIT_FACTOR`] ×
//!   `settleTime` after the operation finished; then it is judged, the message saying the
//!   guest never came back. (An agent that was Not Ready before the rung too cannot tell a
//!   boot from the fault that remains: the bound keeps that wait short.)
//! - Once back, the probe gets `settleTime` with the guest up before the rung is judged; a
//!   recovery meanwhile is credited to the rung.

use std::time::Duration;

use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{
    decide::Situation,
    status::RungExecution,
    verdict::{Decision, WaitReason},
};

/// How often, at most, the instance view is read while the guest is seen booting (Compute
/// allows a VM 12 reads a minute); a shorter `settleTime` (tests, the demo) looks as often.
pub const GUEST_CHECK_INTERVAL: Duration = Duration::from_secs(30);

fn check_interval(settle: Duration) -> Duration {
    settle.clamp(Duration::from_secs(1), GUEST_CHECK_INTERVAL)
}

/// The longest wait for a booting guest after the operation finished, in `settleTime`s (10
/// minutes with the default 2): long enough for a Windows boot, short enough that a guest
/// that never comes back does not hold the ladder for long. Guests that boot longer (updates,
/// disk checks) need a longer `settleTime`.
pub const BOOT_LIMIT_FACTOR: u32 = 5;

/// What was seen of the guest while a rung that restarts it settles.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct GuestWatch {
    /// When the VM's instance view was last read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checked_at: Option<Time>,
    /// The VM agent read Not Ready after the operation finished: the guest was booting.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub seen_booting: bool,
    /// When the guest was seen back: the VM agent Ready again after it was seen booting, or
    /// a successful probe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub back_at: Option<Time>,
}

fn add(t: Timestamp, d: Duration) -> Timestamp {
    t.checked_add(d).unwrap_or(t)
}

/// When the operation finished (older statuses: derived from the settle deadline).
fn finished(c: &RungExecution, settle: Duration) -> Option<Timestamp> {
    c.finished_at.as_ref().map(|t| t.0).or_else(|| {
        c.settle_until
            .as_ref()
            .and_then(|t| t.0.checked_sub(settle).ok())
    })
}

/// The end of settling by the timer: `settleTime` after the operation finished, and for a
/// guest seen back, `settleTime` after it came back.
fn timer(c: &RungExecution, settle: Duration, now: Timestamp) -> Timestamp {
    let until = c.settle_until.as_ref().map_or(now, |t| t.0);
    match c.guest.as_ref().and_then(|g| g.back_at.as_ref()) {
        Some(back) if c.step.rung.restarts_guest() => until.max(add(back.0, settle)),
        _ => until,
    }
}

/// The latest time a booting guest is waited for.
pub fn boot_deadline(c: &RungExecution, settle: Duration) -> Option<Timestamp> {
    finished(c, settle).map(|f| add(f, settle.saturating_mul(BOOT_LIMIT_FACTOR)))
}

/// The guest was seen booting and has not been seen back.
pub fn still_booting(c: &RungExecution) -> bool {
    c.guest
        .as_ref()
        .is_some_and(|g| g.seen_booting && g.back_at.is_none())
}

/// What to do with a settling rung while RDP is unreachable.
pub(super) fn settling(s: &Situation<'_>, c: &RungExecution) -> Decision {
    let settle = s.policy.settle_time;
    let until = timer(c, settle, s.now);
    if until > s.now {
        return Decision::Wait {
            until,
            reason: WaitReason::Settling,
        };
    }
    let watch = c.guest.clone().unwrap_or_default();
    if !c.step.rung.restarts_guest() || watch.back_at.is_some() {
        return Decision::NotFixed;
    }
    let Some(deadline) = boot_deadline(c, settle) else {
        return Decision::NotFixed;
    };
    if s.now >= deadline {
        return Decision::NotFixed;
    }
    match watch.checked_at.map(|t| add(t.0, check_interval(settle))) {
        Some(next) if next > s.now && watch.seen_booting => Decision::Wait {
            until: next.min(deadline),
            reason: WaitReason::GuestBooting,
        },
        // Read after settleTime and the agent was Ready: the guest is up, RDP is not.
        Some(next) if next > s.now => Decision::NotFixed,
        _ => Decision::WatchGuest,
    }
}

/// When a settling rung needs a look of its own (for `ladder_due`): the end of settling, or
/// while the guest is seen booting, the next look at it.
pub fn due(c: &RungExecution, settle: Duration) -> Option<Timestamp> {
    let until = c.settle_until.as_ref()?.0;
    let until = timer(c, settle, until);
    let next_check = c
        .guest
        .as_ref()
        .filter(|_| still_booting(c))
        .and_then(|g| g.checked_at.as_ref())
        .map(|t| add(t.0, check_interval(settle)));
    Some(next_check.map_or(until, |check| check.max(until)))
}
