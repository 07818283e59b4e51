//! rdphealth-operator: keeps Azure Windows VMs reachable over Remote Desktop.

pub mod azure;
pub mod cli;
pub mod probe;
pub mod sim;
