//! rdphealth-operator: keeps Azure Windows VMs reachable over Remote Desktop.

pub mod cli;
pub mod evidence;
pub mod probe;
