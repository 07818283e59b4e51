//! The remediation ladder: rungs, settings, the state kept in status, and the pure
//! `decide` function that holds every rule (see `docs/ladder.md`).

pub mod decide;
pub mod fleet;
pub mod nsg_repair;
pub mod rung;
pub mod settle;
pub mod spec;
pub mod status;

#[cfg(test)]
mod pending_tests;
#[cfg(test)]
mod settle_tests;
#[cfg(test)]
mod tests;

pub use self::{
    decide::{
        Blocker, Decision, Gates, GiveUp, Incident, LadderPolicy, Mode, Reachability, Situation,
        Suspension, WaitReason, decide, plan,
    },
    rung::{GuestRepair, Rung, Step},
    settle::GuestWatch,
    spec::{Backoff, LadderSpecError},
    status::{
        ExecutionPhase, LadderStatus, LeaseTerm, OperationRef, RungExecution, RungOutcome,
        RungRecord,
    },
};
