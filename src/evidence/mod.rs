//! Read-only evidence about an unreachable VM, interpreted purely (no I/O here): NSG
//! evaluation, boot-diagnostics serial-log signatures, and the in-guest event-log and RDP-configuration query.

pub mod exposure;
pub mod guest;
pub mod nsg;
pub mod serial;
pub mod summary;

pub use summary::{
    Availability, BootDiagnostics, Evidence, FlowCheck, Initiator, NsgEvidence, PendingRead,
    PowerState, ReadKind, ResourceHealth,
};
