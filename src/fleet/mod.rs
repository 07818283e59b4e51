//! Fleets: every VM an Azure Resource Graph selection finds, watched with one policy.
//!
//! [`worker`] runs one fleet (discovery, in-memory probing, incidents, status); [`member`] and
//! [`incident`] hold its pure decisions, [`policy`] parses the spec, [`status`] builds the
//! status; [`kube`] connects the workers to the API server.

pub mod incident;
pub mod kube;
pub mod member;
pub mod memory;
pub mod metrics;
pub mod policy;
pub mod status;
pub mod worker;

pub use self::worker::{Created, Deps, FleetSink};
#[cfg(test)]
mod tests;
