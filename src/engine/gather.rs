//! Gathers the read-only evidence of an incident through the [`Azure`] trait and interprets
//! it with the pure `evidence` module. Called once per incident (and on a slow refresh), never
//! on every probe.

use std::net::IpAddr;

use k8s_openapi::jiff::Timestamp;

use crate::{
    azure::{self, Azure, AzureError, VmRef},
    evidence::{
        Availability, BootDiagnostics, Evidence, NsgEvidence, ResourceHealth,
        nsg::{self, NetworkContext},
        serial,
        summary::strip_sas,
    },
};

/// Where the prober's traffic comes from, as Azure sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vantage {
    /// The prober's source address after NAT; `None` evaluates "anyone on the internet".
    pub source: Option<IpAddr>,
    /// The RDP port.
    pub port: u16,
}

/// Reads the evidence. Throttling aborts (the caller requeues after `Retry-After`); any other
/// failed read leaves its part empty and is listed in `Evidence::errors`.
pub async fn gather(
    azure: &dyn Azure,
    vm: &VmRef,
    vantage: Vantage,
    now: Timestamp,
) -> Result<Evidence, AzureError> {
    let mut ev = Evidence::empty(now);
    let state = keep(azure.vm_state(vm).await, &mut ev)?;
    if let Some(state) = &state {
        ev.power_state = Some(state.power_state);
        ev.provisioning_state = state.provisioning_state.clone();
        ev.agent_ready = Some(state.agent_ready);
    }
    if let Some(rules) = keep(azure.network_rules(vm).await, &mut ev)? {
        ev.nsg = evaluate_nsgs(&rules, vantage);
    }
    if let Some(health) = keep(azure.resource_health(vm).await, &mut ev)? {
        ev.resource_health = Some(ResourceHealth {
            availability: Availability::parse(&health.availability_state),
            reason_type: health.reason_type,
            summary: health.summary,
        });
    }
    if state.as_ref().is_some_and(|s| s.boot_diagnostics)
        && let Some(uris) = keep(azure.boot_diagnostics(vm).await, &mut ev)?
    {
        ev.boot_diagnostics = Some(BootDiagnostics {
            console_screenshot_uri: uris.screenshot.as_deref().map(strip_sas),
            serial_log_uri: uris.serial_log.as_deref().map(strip_sas),
        });
        if let Some(log) = keep(azure.serial_log(&uris).await, &mut ev)? {
            ev.serial = Some(serial::scan(&log));
        }
    }
    Ok(ev)
}

/// Keeps a successful read; records a failed one (throttling propagates).
fn keep<T>(result: Result<T, AzureError>, ev: &mut Evidence) -> Result<Option<T>, AzureError> {
    match result {
        Ok(v) => Ok(Some(v)),
        Err(e @ AzureError::Throttled { .. }) => Err(e),
        Err(e) => {
            ev.errors.push(format!("{}: {e}", e.reason()));
            Ok(None)
        }
    }
}

fn evaluate_nsgs(rules: &azure::NetworkRules, vantage: Vantage) -> Option<NsgEvidence> {
    let private: IpAddr = rules.endpoint.private_ip.as_deref()?.parse().ok()?;
    let subnet = rules.subnet_nsg.as_ref().map(azure::nsg::to_evaluator);
    let nic = rules.nic_nsg.as_ref().map(azure::nsg::to_evaluator);
    let ctx = NetworkContext::private_ranges();
    let source = vantage.source.unwrap_or(nsg::ANY_INTERNET_SOURCE);
    let flow = nsg::Flow::inbound_tcp(source, private, vantage.port);
    let verdict = nsg::evaluate(&flow, subnet.as_ref(), nic.as_ref(), &ctx);
    let open = nsg::open_to_internet(private, vantage.port, subnet.as_ref(), nic.as_ref(), &ctx);
    Some(NsgEvidence {
        verdict,
        open_to_internet: open.is_some(),
        ip_flow_verify: None,
    })
}
