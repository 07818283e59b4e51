//! Parse, don't validate: a `RdpHealthSpec` that passes becomes a `ValidSpec` the engine trusts.
//! The rules mirror the CRD schema (patterns, ranges, CEL), so objects that slipped past the
//! API server (older CRD, schema disabled) are still caught.

use std::time::Duration;

use crate::{
    api::{AddressType, RdpHealthSpec, RemediationMode},
    ladder::{LadderPolicy, LadderSpecError, spec::policy_from_spec},
    probe::{ProbeOptions, Target, TargetError},
};

/// An Azure VM's identity, parsed from its ARM resource ID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmId {
    /// Subscription GUID.
    pub subscription: String,
    /// Resource group name.
    pub resource_group: String,
    /// VM name.
    pub name: String,
}

/// A spec the engine can trust.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidSpec {
    /// The VM.
    pub vm: VmId,
    /// Host override (already checked to be a valid host name or address).
    pub host: Option<String>,
    /// RDP port.
    pub port: u16,
    /// Which VM address to probe when there is no host override.
    pub address_type: AddressType,
    /// Probe cadence and thresholds.
    pub probe: ProbePolicy,
    /// Remediation mode.
    pub mode: RemediationMode,
    /// The remediation ladder's validated settings.
    pub ladder: LadderPolicy,
    /// Monitoring suspended.
    pub suspend: bool,
    /// The in-guest evidence query may run (`evidence.guestQuery`, by default not in `Observe`).
    pub guest_query: bool,
}

/// Probe cadence, thresholds and certificate policy, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbePolicy {
    /// Interval while reachable.
    pub interval: Duration,
    /// Interval while the endpoint is unreachable (and while it recovers).
    pub unhealthy_interval: Duration,
    /// Interval after a failure not yet confirmed (fewer than `failure_threshold` in a row on
    /// an endpoint not unreachable); at most `unhealthy_interval`.
    pub confirm_interval: Duration,
    /// Deadline of one probe.
    pub timeout: Duration,
    /// Failures in a row before Reachable becomes False.
    pub failure_threshold: u32,
    /// Successes in a row before Reachable becomes True again.
    pub success_threshold: u32,
    /// Certificate warning period.
    pub certificate_warning: Duration,
    /// Period of the identity step.
    pub identity_check_interval: Duration,
}

impl ProbePolicy {
    /// The time from a probe to the next one, given the failures in a row after it and
    /// whether the endpoint is unreachable: a failure not confirmed yet is looked at again
    /// soon, so an outage is found about one `interval` after it starts.
    pub fn interval_after(&self, failures: u32, unreachable: bool) -> Duration {
        if unreachable {
            self.unhealthy_interval
        } else if failures > 0 {
            self.confirm_interval
        } else {
            self.interval
        }
    }

    /// The prober options for this policy.
    pub fn options(&self) -> ProbeOptions {
        ProbeOptions {
            timeout: self.timeout,
            layer_timeout: None,
            cert_warning: self.certificate_warning,
            ..ProbeOptions::default()
        }
    }
}

/// Why a spec is invalid. The message is shown in the `Valid` condition.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// `vm.resourceId` is not a VM resource ID.
    #[error(
        "vm.resourceId {0:?} is not /subscriptions/{{guid}}/resourceGroups/{{group}}/providers/Microsoft.Compute/virtualMachines/{{name}}"
    )]
    ResourceId(String),
    /// A duration field does not parse.
    #[error("probe.{field} {value:?} is not a duration such as 30s, 1m or 1h30m")]
    Duration {
        /// camelCase field name.
        field: &'static str,
        /// The value given.
        value: String,
    },
    /// A duration is zero.
    #[error("probe.{0} must be greater than zero")]
    ZeroDuration(&'static str),
    /// The probe timeout does not fit in an interval.
    #[error("probe.timeout ({timeout}) must be shorter than probe.{field} ({interval})")]
    TimeoutTooLong {
        /// The interval it must fit in.
        field: &'static str,
        /// The timeout as given.
        timeout: String,
        /// The interval as given.
        interval: String,
    },
    /// A threshold is out of range.
    #[error("probe.{field} {value} is out of range (1-100)")]
    Threshold {
        /// camelCase field name.
        field: &'static str,
        /// The value given.
        value: u32,
    },
    /// The endpoint port is 0.
    #[error("endpoint.port must be between 1 and 65535")]
    Port,
    /// The host override is not a valid host.
    #[error("endpoint.host is invalid: {0}")]
    Host(#[source] TargetError),
    /// The remediation settings are invalid.
    #[error(transparent)]
    Remediation(#[from] LadderSpecError),
    /// The VM is outside the Azure scopes the operator's tenancy policy grants the namespace.
    #[error("{0}")]
    OutsideTenancyScope(String),
}

impl SpecError {
    /// PascalCase reason.
    pub fn reason(&self) -> &'static str {
        "InvalidSpec"
    }
}

impl TryFrom<&RdpHealthSpec> for ValidSpec {
    type Error = SpecError;

    fn try_from(spec: &RdpHealthSpec) -> Result<Self, SpecError> {
        let p = &spec.probe;
        let interval = duration("interval", &p.interval, false)?;
        let unhealthy_interval = duration("unhealthyInterval", &p.unhealthy_interval, false)?;
        let confirm_interval =
            duration("confirmInterval", &p.confirm_interval, false)?.min(unhealthy_interval);
        let timeout = duration("timeout", &p.timeout, false)?;
        let certificate_warning = duration("certificateWarning", &p.certificate_warning, true)?;
        let identity_check_interval =
            duration("identityCheckInterval", &p.identity_check_interval, false)?;
        for (field, value, limit) in [
            ("interval", &p.interval, interval),
            (
                "unhealthyInterval",
                &p.unhealthy_interval,
                unhealthy_interval,
            ),
        ] {
            if timeout >= limit {
                return Err(SpecError::TimeoutTooLong {
                    field,
                    timeout: p.timeout.clone(),
                    interval: value.clone(),
                });
            }
        }
        let failure_threshold = threshold("failureThreshold", p.failure_threshold)?;
        let success_threshold = threshold("successThreshold", p.success_threshold)?;
        if spec.endpoint.port == 0 {
            return Err(SpecError::Port);
        }
        let host = match &spec.endpoint.host {
            Some(host) => Some(
                Target::new(host.clone(), spec.endpoint.port)
                    .map_err(SpecError::Host)?
                    .host,
            ),
            None => None,
        };
        Ok(Self {
            vm: parse_resource_id(&spec.vm.resource_id)?,
            host,
            port: spec.endpoint.port,
            address_type: spec.endpoint.address_type,
            probe: ProbePolicy {
                interval,
                unhealthy_interval,
                confirm_interval,
                timeout,
                failure_threshold,
                success_threshold,
                certificate_warning,
                identity_check_interval,
            },
            mode: spec.remediation.mode,
            ladder: policy_from_spec(&spec.remediation).map_err(SpecError::Remediation)?,
            suspend: spec.suspend,
            guest_query: spec
                .evidence
                .guest_query
                .unwrap_or(spec.remediation.mode != RemediationMode::Observe),
        })
    }
}

fn threshold(field: &'static str, value: u32) -> Result<u32, SpecError> {
    if (1..=100).contains(&value) {
        Ok(value)
    } else {
        Err(SpecError::Threshold { field, value })
    }
}

/// Parses `30s`, `250ms`, `1h30m` (and `14d` when `days`): the schema's duration pattern,
/// which is also what Kubernetes CEL `duration()` accepts (without days).
pub fn parse_duration(s: &str, days: bool) -> Option<Duration> {
    let mut rest = s;
    let mut total = Duration::ZERO;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let value: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (Duration::from_millis(1), 2)
        } else {
            let unit = match rest.bytes().next()? {
                b's' => Duration::from_secs(1),
                b'm' => Duration::from_secs(60),
                b'h' => Duration::from_secs(3600),
                b'd' if days => Duration::from_secs(86_400),
                _ => return None,
            };
            (unit, 1)
        };
        rest = &rest[len..];
        total = total.checked_add(unit.checked_mul(u32::try_from(value).ok()?)?)?;
    }
    Some(total)
}

fn duration(field: &'static str, value: &str, days: bool) -> Result<Duration, SpecError> {
    match parse_duration(value, days) {
        None => Err(SpecError::Duration {
            field,
            value: value.to_string(),
        }),
        Some(d) if d.is_zero() => Err(SpecError::ZeroDuration(field)),
        Some(d) => Ok(d),
    }
}

/// Parses `/subscriptions/{guid}/resourceGroups/{group}/providers/Microsoft.Compute/virtualMachines/{name}`
/// with the same rules as the schema's pattern.
pub fn parse_resource_id(id: &str) -> Result<VmId, SpecError> {
    let bad = || SpecError::ResourceId(id.to_string());
    // Nine segments exactly, without collecting them.
    let mut parts = id.split('/');
    let mut segments = [""; 9];
    for segment in &mut segments {
        *segment = parts.next().ok_or_else(bad)?;
    }
    let [
        "",
        "subscriptions",
        subscription,
        "resourceGroups",
        group,
        "providers",
        "Microsoft.Compute",
        "virtualMachines",
        name,
    ] = segments
    else {
        return Err(bad());
    };
    if parts.next().is_some() {
        return Err(bad());
    }
    let group_ok = (1..=90).contains(&group.len())
        && group
            .chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | '.' | '(' | ')'));
    let name_ok = (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !is_guid(subscription) || !group_ok || !name_ok {
        return Err(bad());
    }
    Ok(VmId {
        subscription: subscription.to_string(),
        resource_group: group.to_string(),
        name: name.to_string(),
    })
}

/// A GUID as Azure spells subscription, tenant and client IDs (`8-4-4-4-12` hex digits).
pub fn is_guid(s: &str) -> bool {
    let mut groups = s.split('-');
    [8, 4, 4, 4, 12].iter().all(|&len| {
        groups
            .next()
            .is_some_and(|g| g.len() == len && g.bytes().all(|b| b.is_ascii_hexdigit()))
    }) && groups.next().is_none()
}

#[cfg(test)]
mod tests {
    use rstest::rstest;

    use super::*;
    use crate::api::{EndpointSpec, ProbeSpec, VmRef};

    pub(crate) const VM: &str = "/subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/rg-1/providers/Microsoft.Compute/virtualMachines/vm-1";

    fn spec() -> RdpHealthSpec {
        RdpHealthSpec {
            vm: VmRef {
                resource_id: VM.into(),
            },
            endpoint: EndpointSpec {
                host: Some("10.0.0.4".into()),
                ..EndpointSpec::default()
            },
            probe: ProbeSpec::default(),
            remediation: Default::default(),
            evidence: Default::default(),
            suspend: false,
        }
    }

    #[rstest]
    #[case::seconds("30s", false, Some(30_000))]
    #[case::millis("250ms", false, Some(250))]
    #[case::compound("1h30m", false, Some(5_400_000))]
    #[case::days_allowed("14d", true, Some(14 * 86_400_000))]
    #[case::days_refused("14d", false, None)]
    #[case::no_unit("30", false, None)]
    #[case::empty("", false, None)]
    #[case::space("1h 30m", false, None)]
    #[case::negative("-1s", false, None)]
    fn durations(#[case] s: &str, #[case] days: bool, #[case] ms: Option<u64>) {
        assert_eq!(parse_duration(s, days).map(|d| d.as_millis() as u64), ms);
    }

    #[rstest]
    #[case::observe_runs_nothing_in_the_guest(RemediationMode::Observe, None, false)]
    #[case::observe_may_opt_in(RemediationMode::Observe, Some(true), true)]
    #[case::dry_run_queries(RemediationMode::DryRun, None, true)]
    #[case::auto_queries(RemediationMode::Auto, None, true)]
    #[case::auto_may_opt_out(RemediationMode::Auto, Some(false), false)]
    fn guest_query_defaults_by_mode(
        #[case] mode: RemediationMode,
        #[case] choice: Option<bool>,
        #[case] expected: bool,
    ) {
        let mut s = spec();
        s.remediation.mode = mode;
        s.evidence.guest_query = choice;
        assert_eq!(ValidSpec::try_from(&s).unwrap().guest_query, expected);
    }

    #[rstest]
    #[case::default_is_shorter("10s", "3s", 3_000)]
    #[case::never_longer_than_unhealthy("2s", "3s", 2_000)]
    #[case::as_given("10s", "500ms", 500)]
    fn the_confirmation_interval(
        #[case] unhealthy: &str,
        #[case] confirm: &str,
        #[case] want_ms: u64,
    ) {
        let mut s = spec();
        s.probe.interval = "30s".into();
        s.probe.timeout = "1s".into();
        s.probe.unhealthy_interval = unhealthy.into();
        s.probe.confirm_interval = confirm.into();
        let probe = ValidSpec::try_from(&s).unwrap().probe;
        assert_eq!(probe.confirm_interval, Duration::from_millis(want_ms));
        assert_eq!(probe.interval_after(0, false), probe.interval);
        assert_eq!(probe.interval_after(1, false), probe.confirm_interval);
        assert_eq!(probe.interval_after(3, true), probe.unhealthy_interval);
        assert_eq!(
            probe.interval_after(0, true),
            probe.unhealthy_interval,
            "recovering"
        );
    }

    #[test]
    fn a_zero_or_garbled_confirmation_interval_is_invalid() {
        let mut s = spec();
        s.probe.confirm_interval = "0s".into();
        assert_eq!(
            ValidSpec::try_from(&s).unwrap_err(),
            SpecError::ZeroDuration("confirmInterval")
        );
        s.probe.confirm_interval = "soon".into();
        assert!(matches!(
            ValidSpec::try_from(&s).unwrap_err(),
            SpecError::Duration {
                field: "confirmInterval",
                ..
            }
        ));
    }

    #[test]
    fn defaults_are_valid() {
        let valid = ValidSpec::try_from(&spec()).unwrap();
        assert_eq!(valid.vm.name, "vm-1");
        assert_eq!(valid.vm.resource_group, "rg-1");
        assert_eq!(valid.probe.interval, Duration::from_secs(30));
        assert_eq!(valid.probe.unhealthy_interval, Duration::from_secs(10));
        assert_eq!(valid.probe.confirm_interval, Duration::from_secs(3));
        assert_eq!(valid.probe.timeout, Duration::from_secs(5));
        assert_eq!(valid.probe.failure_threshold, 3);
        assert_eq!(valid.probe.success_threshold, 2);
        assert_eq!(
            valid.probe.certificate_warning,
            Duration::from_secs(14 * 86_400)
        );
        assert_eq!(valid.port, 3389);
    }

    #[rstest]
    #[case::valid(VM, true)]
    #[case::parentheses_in_group(&VM.replace("rg-1", "rg_(x).1"), true)]
    #[case::too_short(&VM.replace("/virtualMachines/vm-1", "/virtualMachines"), false)]
    #[case::extra_segment(&format!("{VM}/extensions"), false)]
    #[case::trailing_slash(&format!("{VM}/"), false)]
    #[case::no_leading_slash(&VM[1..], false)]
    #[case::other_case_literal(&VM.replace("resourceGroups", "resourcegroups"), false)]
    #[case::empty_name(&VM.replace("vm-1", ""), false)]
    #[case::slash_in_group(&VM.replace("rg-1", "rg/1"), false)]
    #[case::bang_in_name(&VM.replace("vm-1", "vm!1"), false)]
    #[case::short_guid(&VM.replace("00000000-0000-0000-0000-000000000001", "0000-0000-0000-0000-000000000001"), false)]
    #[case::six_groups(&VM.replace("00000000-0000-0000-0000-000000000001", "00000000-0000-0000-0000-000000000001-0"), false)]
    #[case::not_hex(&VM.replace("00000000-0000", "0000000g-0000"), false)]
    #[case::empty("", false)]
    fn resource_ids(#[case] id: &str, #[case] ok: bool) {
        let parsed = parse_resource_id(id);
        assert_eq!(parsed.is_ok(), ok, "{id}: {parsed:?}");
        if let Ok(vm) = parsed {
            assert_eq!(vm.subscription, "00000000-0000-0000-0000-000000000001");
            assert!(id.ends_with(&format!(
                "/resourceGroups/{}/providers/Microsoft.Compute/virtualMachines/{}",
                vm.resource_group, vm.name
            )));
        }
    }

    #[rstest]
    #[case::bad_id(|s: &mut RdpHealthSpec| s.vm.resource_id = "/subscriptions/x/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm".into(), "ResourceId")]
    #[case::wrong_provider(|s: &mut RdpHealthSpec| s.vm.resource_id = VM.replace("virtualMachines", "disks"), "ResourceId")]
    #[case::timeout_equals_interval(|s: &mut RdpHealthSpec| s.probe.timeout = "30s".into(), "TimeoutTooLong")]
    #[case::timeout_over_unhealthy(|s: &mut RdpHealthSpec| s.probe.timeout = "15s".into(), "TimeoutTooLong")]
    #[case::zero_interval(|s: &mut RdpHealthSpec| s.probe.interval = "0s".into(), "ZeroDuration")]
    #[case::garbage_interval(|s: &mut RdpHealthSpec| s.probe.interval = "soon".into(), "Duration")]
    #[case::zero_threshold(|s: &mut RdpHealthSpec| s.probe.failure_threshold = 0, "Threshold")]
    #[case::huge_threshold(|s: &mut RdpHealthSpec| s.probe.success_threshold = 101, "Threshold")]
    #[case::port_zero(|s: &mut RdpHealthSpec| s.endpoint.port = 0, "Port")]
    #[case::bad_host(|s: &mut RdpHealthSpec| s.endpoint.host = Some("bad host".into()), "Host")]
    fn invalid_specs(#[case] edit: fn(&mut RdpHealthSpec), #[case] variant: &str) {
        let mut s = spec();
        edit(&mut s);
        let err = ValidSpec::try_from(&s).unwrap_err();
        assert!(format!("{err:?}").starts_with(variant), "{err:?}");
        assert_eq!(err.reason(), "InvalidSpec");
    }
}
