//! A fleet's spec, parsed: the selector for discovery and the policy its members are probed
//! with. The template is checked by the same validation as an `RdpHealth` spec (an invalid
//! template would make every incident object invalid).

use std::time::Duration;

use crate::{
    api::{EndpointSpec, RdpHealthFleet, RdpHealthSpec, VmRef as SpecVmRef},
    azure::VmSelector,
    engine::{Thresholds, ValidSpec, spec::parse_duration},
    probe::ProbeOptions,
};

/// A subscription that passes the schema, to check the template as an `RdpHealth` spec.
const PLACEHOLDER_VM: &str = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm";

/// What a fleet's members are watched with.
#[derive(Debug, Clone, PartialEq)]
pub struct MemberPolicy {
    /// Discovery's selection.
    pub selector: VmSelector,
    /// Time between discoveries.
    pub discovery_interval: Duration,
    /// How long a recovered incident object stays.
    pub incident_retention: Duration,
    /// The template, validated as an `RdpHealth` spec.
    pub spec: ValidSpec,
    /// The prober's options.
    pub options: ProbeOptions,
}

impl MemberPolicy {
    /// Parses `fleet`'s spec; the error says what is wrong, for the `Valid` condition.
    pub fn from_fleet(fleet: &RdpHealthFleet) -> Result<Self, String> {
        let s = &fleet.spec;
        let discovery_interval = parse_duration(&s.discovery_interval, false)
            .filter(|d| *d >= Duration::from_secs(60))
            .ok_or_else(|| {
                format!(
                    "discoveryInterval {:?} is not a duration of at least 1m",
                    s.discovery_interval
                )
            })?;
        let incident_retention = parse_duration(&s.incident_retention, true).ok_or_else(|| {
            format!(
                "incidentRetention {:?} is not a duration",
                s.incident_retention
            )
        })?;
        if s.selector.subscriptions.is_empty() {
            return Err("selector.subscriptions must name at least one subscription".into());
        }
        if let Some(bad) = s
            .selector
            .subscriptions
            .iter()
            .find(|sub| !crate::engine::spec::is_guid(sub))
        {
            return Err(format!("selector.subscriptions: {bad:?} is not a GUID"));
        }
        let spec = ValidSpec::try_from(&template_spec(fleet, PLACEHOLDER_VM.to_owned()))
            .map_err(|e| format!("template: {e}"))?;
        let options = spec.probe.options();
        Ok(Self {
            selector: VmSelector {
                subscriptions: s.selector.subscriptions.clone(),
                resource_groups: s.selector.resource_groups.clone(),
                tags: s.selector.tags.clone(),
                os_type: s.selector.os_type.as_azure().map(str::to_owned),
                name_pattern: s.selector.name_pattern.clone(),
            },
            discovery_interval,
            incident_retention,
            spec,
            options,
        })
    }

    /// The thresholds members are judged with.
    pub fn thresholds(&self) -> Thresholds {
        Thresholds {
            failure: self.spec.probe.failure_threshold,
            success: self.spec.probe.success_threshold,
        }
    }
}

/// The `RdpHealth` spec of `fleet`'s template for the VM `resource_id`.
pub fn template_spec(fleet: &RdpHealthFleet, resource_id: String) -> RdpHealthSpec {
    let t = &fleet.spec.template;
    RdpHealthSpec {
        vm: SpecVmRef { resource_id },
        endpoint: EndpointSpec {
            host: None,
            port: t.endpoint.port,
            address_type: t.endpoint.address_type,
        },
        probe: t.probe.clone(),
        remediation: t.remediation.clone(),
        evidence: t.evidence.clone(),
        suspend: false,
    }
}
