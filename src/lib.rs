//! rdphealth-operator: keeps Azure Windows VMs reachable over Remote Desktop.

pub mod api;
pub mod azure;
pub mod bench;
pub mod cli;
pub mod controller;
pub mod demo;
pub mod engine;
pub mod evidence;
pub mod fleet;
pub mod guest;
pub mod http;
pub mod ladder;
pub mod metrics;
pub mod probe;
pub mod secrets;
pub mod sim;
pub mod tenancy;
