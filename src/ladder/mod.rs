//! The remediation ladder: rungs, settings, the state kept in status, and the pure
//! `decide` function that holds every rule (see `docs/ladder.md`).

pub mod decide;
mod evidence_gate;
pub mod fleet;
pub mod nic;
pub mod nsg_repair;
pub mod restart;
pub mod rung;
pub mod settle;
pub mod snapshot;
pub mod spec;
pub mod status;
pub mod verdict;

#[cfg(test)]
mod evidence_tests;
#[cfg(test)]
mod pending_tests;
#[cfg(test)]
mod settle_tests;
#[cfg(test)]
mod tests;

pub use self::{
    decide::{Gates, Incident, LadderPolicy, Mode, Reachability, Situation, decide, plan},
    restart::RestartHold,
    rung::{GuestRepair, Rung, Step},
    settle::GuestWatch,
    spec::{Backoff, LadderSpecError},
    status::{
        ExecutionPhase, LadderStatus, LeaseTerm, OperationRef, RungExecution, RungOutcome,
        RungRecord,
    },
    verdict::{Blocker, Decision, GiveUp, Suspension, WaitReason},
};
