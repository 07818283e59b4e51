//! ARM's answers mapped to the adapter's model (VMs, NSG rules, Run Command output, operation
//! results, error bodies) and the small pieces every request needs: operation handles,
//! resource ids, `Retry-After`. Pure: no I/O.

use std::time::Duration;

use azure_core::headers;
use azure_mgmt_compute::package_2024_07_01 as compute;
use azure_mgmt_network::package_2024_03 as network;
use serde_json::Value;
use time::OffsetDateTime;

use super::{AzureResult, error::AzureError, model::*, policy};

/// The VM extension type that resets RDP settings and passwords.
pub(super) const VM_ACCESS_TYPE: &str = "VMAccessAgent";
/// How long to wait between polls when Azure names no `Retry-After`.
pub(super) const DEFAULT_POLL: Duration = Duration::from_secs(30);

pub(super) fn unique_tag() -> String {
    let now = OffsetDateTime::now_utc();
    format!("rdphealth-{}", now.unix_timestamp_nanos())
}

pub(super) fn now_rfc3339() -> String {
    OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

pub(super) fn operation(
    kind: OperationKind,
    vm: &VmRef,
    headers: &azure_core::headers::Headers,
    detail: Option<String>,
) -> Operation {
    let get = |h: &azure_core::headers::HeaderName| headers.get_optional_str(h).map(str::to_owned);
    let async_operation = get(&headers::AZURE_ASYNCOPERATION);
    let location = get(&headers::LOCATION);
    Operation {
        kind,
        vm: vm.clone(),
        completed: async_operation.is_none() && location.is_none(),
        async_operation,
        location,
        started_at: now_rfc3339(),
        detail,
    }
}

/// The parts of an ARM resource id: `/subscriptions/S/resourceGroups/G/providers/NS/T/N[/T2/N2]`.
#[derive(Debug)]
pub(super) struct ResourceId {
    pub(super) subscription: String,
    pub(super) resource_group: String,
    names: Vec<String>,
}

impl ResourceId {
    pub(super) fn parse(id: &str) -> AzureResult<Self> {
        let parts: Vec<&str> = id.split('/').filter(|s| !s.is_empty()).collect();
        let bad = || AzureError::invalid(format!("malformed resource id {id:?}"));
        if parts.len() < 8
            || !parts[0].eq_ignore_ascii_case("subscriptions")
            || !parts[2].eq_ignore_ascii_case("resourceGroups")
            || !parts[4].eq_ignore_ascii_case("providers")
        {
            return Err(bad());
        }
        // After the namespace: type/name pairs.
        let names = parts[6..]
            .chunks(2)
            .filter_map(|c| c.get(1))
            .map(|s| (*s).to_owned())
            .collect();
        Ok(Self {
            subscription: parts[1].to_owned(),
            resource_group: parts[3].to_owned(),
            names,
        })
    }

    pub(super) fn subscription(&self) -> &str {
        &self.subscription
    }

    pub(super) fn resource_group(&self) -> &str {
        &self.resource_group
    }

    pub(super) fn name(&self, i: usize) -> AzureResult<&str> {
        self.names
            .get(i)
            .map(String::as_str)
            .ok_or_else(|| AzureError::invalid("resource id lacks a name segment"))
    }
}

pub(super) fn enum_str<T: serde::Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(Value::String(s)) => s,
        _ => String::new(),
    }
}

pub(super) fn map_vm(vm: compute::models::VirtualMachine) -> VmState {
    let props = vm.properties.unwrap_or_default();
    let view = props.instance_view.clone().unwrap_or_default();
    let power_state = view
        .statuses
        .iter()
        .filter_map(|s| s.code.as_deref().and_then(PowerState::from_code))
        .next()
        .unwrap_or(PowerState::Unknown);
    let agent = view.vm_agent.as_ref().and_then(|a| a.statuses.first());
    let agent_ready = agent.and_then(|s| s.display_status.as_deref()) == Some("Ready");
    let agent_status = agent.map(|s| {
        format!(
            "{}: {}",
            s.display_status.as_deref().unwrap_or("unknown"),
            s.message.as_deref().unwrap_or("")
        )
    });
    let extensions: Vec<ExtensionStatus> = view
        .extensions
        .iter()
        .map(|e| ExtensionStatus {
            name: e.name.clone().unwrap_or_default(),
            kind: e.type_.clone(),
            code: e.statuses.first().and_then(|s| s.code.clone()),
            message: e.statuses.first().and_then(|s| s.message.clone()),
        })
        .collect();
    let vm_access_extension = vm
        .resources
        .iter()
        .find(|r| r.properties.as_ref().and_then(|p| p.type_.as_deref()) == Some(VM_ACCESS_TYPE))
        .and_then(|r| r.resource_with_optional_location.name.clone())
        .or_else(|| {
            extensions
                .iter()
                .find(|e| {
                    e.kind
                        .as_deref()
                        .is_some_and(|k| k.ends_with(VM_ACCESS_TYPE))
                })
                .map(|e| e.name.clone())
        });
    let mut nics: Vec<(bool, String)> = props
        .network_profile
        .as_ref()
        .map(|n| {
            n.network_interfaces
                .iter()
                .filter_map(|r| {
                    let primary = r
                        .properties
                        .as_ref()
                        .and_then(|p| p.primary)
                        .unwrap_or(false);
                    r.sub_resource.id.clone().map(|id| (primary, id))
                })
                .collect()
        })
        .unwrap_or_default();
    nics.sort_by_key(|(primary, _)| !*primary);
    VmState {
        id: vm.resource.id.unwrap_or_default(),
        location: vm.resource.location,
        power_state,
        provisioning_state: props.provisioning_state.clone(),
        agent_ready,
        agent_status,
        extensions,
        vm_access_extension,
        boot_diagnostics: props
            .diagnostics_profile
            .and_then(|d| d.boot_diagnostics)
            .and_then(|b| b.enabled)
            .unwrap_or(false),
        nic_ids: nics.into_iter().map(|(_, id)| id).collect(),
        computer_name: props.os_profile.and_then(|o| o.computer_name),
        os_disk_id: props
            .storage_profile
            .and_then(|s| s.os_disk)
            .and_then(|d| d.managed_disk)
            .and_then(|m| m.sub_resource.id),
    }
}

pub(super) fn list(single: &Option<String>, plural: &[String]) -> Vec<String> {
    let mut v: Vec<String> = single.iter().cloned().collect();
    v.extend(plural.iter().cloned());
    v
}

pub(super) fn map_rule(
    r: &network::models::SecurityRule,
    default_rule: bool,
) -> Option<SecurityRule> {
    let p = r.properties.as_ref()?;
    Some(SecurityRule {
        name: r.name.clone().unwrap_or_default(),
        priority: p.priority,
        inbound: enum_str(&p.direction) == "Inbound",
        allow: enum_str(&p.access) == "Allow",
        protocol: RuleProtocol::parse(&enum_str(&p.protocol)),
        source_prefixes: list(&p.source_address_prefix, &p.source_address_prefixes),
        destination_prefixes: list(
            &p.destination_address_prefix,
            &p.destination_address_prefixes,
        ),
        destination_ports: list(&p.destination_port_range, &p.destination_port_ranges),
        default_rule,
    })
}

pub(super) fn map_nsg(id: &str, nsg: &network::models::NetworkSecurityGroup) -> NsgRules {
    let mut rules = Vec::new();
    if let Some(p) = &nsg.properties {
        rules.extend(p.security_rules.iter().filter_map(|r| map_rule(r, false)));
        rules.extend(
            p.default_security_rules
                .iter()
                .filter_map(|r| map_rule(r, true)),
        );
    }
    NsgRules {
        id: nsg.resource.id.clone().unwrap_or_else(|| id.to_owned()),
        rules,
    }
}

pub(super) fn map_run_command(value: &[compute::models::InstanceViewStatus]) -> RunCommandOutput {
    let mut out = RunCommandOutput::default();
    for s in value {
        let code = s.code.as_deref().unwrap_or("");
        let msg = s.message.clone().unwrap_or_default();
        if code.contains("StdOut") {
            out.stdout = msg;
        } else if code.contains("StdErr") {
            out.stderr = msg;
        }
    }
    out
}

pub(super) fn parse_result(kind: OperationKind, body: &[u8]) -> AzureResult<OperationResult> {
    match kind {
        OperationKind::RunCommand => {
            let r: compute::models::RunCommandResult = serde_json::from_slice(body)
                .map_err(|e| AzureError::invalid(format!("run command result: {e}")))?;
            Ok(OperationResult::RunCommand(map_run_command(&r.value)))
        }
        OperationKind::IpFlowVerify => {
            let r: network::models::VerificationIpFlowResult = serde_json::from_slice(body)
                .map_err(|e| AzureError::invalid(format!("IP flow verify result: {e}")))?;
            Ok(OperationResult::Flow(FlowVerdict {
                allow: r.access.as_ref().map(enum_str).as_deref() == Some("Allow"),
                rule_name: r.rule_name,
            }))
        }
        _ => Ok(OperationResult::Done),
    }
}

pub(super) fn needs_result(kind: OperationKind) -> bool {
    matches!(
        kind,
        OperationKind::RunCommand | OperationKind::IpFlowVerify
    )
}

pub(super) fn error_of(body: &Value) -> (String, String) {
    let e = body.get("error").unwrap_or(body);
    let s = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
    let code = s("code");
    (
        if code.is_empty() {
            "OperationFailed".to_owned()
        } else {
            code
        },
        s("message"),
    )
}

pub(super) fn retry_after(headers: &azure_core::headers::Headers) -> Duration {
    policy::retry_after_of(headers).unwrap_or(DEFAULT_POLL)
}
