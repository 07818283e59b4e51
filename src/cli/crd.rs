//! `rdphealth crd`: prints the CustomResourceDefinition generated from the Rust types.

use crate::api::{CrdError, crd_yaml};

/// Writes the CRD YAML to stdout.
pub fn run() -> Result<(), CrdError> {
    print!("{}", crd_yaml()?);
    Ok(())
}
