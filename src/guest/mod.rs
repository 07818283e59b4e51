//! In-guest repairs: the typed changes each repair declares, the one applier script that
//! carries them out, and the parser of what it reports.

pub mod changes;
pub mod report;
pub mod script;
