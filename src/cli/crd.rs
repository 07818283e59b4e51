//! `rdphealth crd`: prints a CustomResourceDefinition generated from the Rust types.

use clap::Args;

use crate::api::{CrdError, crd_yaml, fleet_crd_yaml};

/// Which CRD to print.
#[derive(Debug, Args)]
pub struct CrdArgs {
    /// Print the RdpHealthFleet CRD instead of the RdpHealth one.
    #[arg(long)]
    pub fleet: bool,
}

/// Writes the CRD YAML to stdout.
pub fn run(args: &CrdArgs) -> Result<(), CrdError> {
    let yaml = if args.fleet {
        fleet_crd_yaml()?
    } else {
        crd_yaml()?
    };
    print!("{yaml}");
    Ok(())
}
