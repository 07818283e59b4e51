//! Gathers the read-only evidence of an incident through the [`Azure`] trait and interprets
//! it with the pure `evidence` module. Called once per incident (and on a slow refresh), never
//! on every probe.
//!
//! Two reads are long-running operations in Azure: the in-guest query (Run Command) and IP
//! flow verify (Network Watcher). They are started here, never waited for: their handles go
//! to `Evidence::pending` (in status), and [`poll_pending`] looks at them on later reconciles.

use std::{
    net::{IpAddr, Ipv4Addr},
    time::Duration,
};

use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};

use super::{Event, Severity};
use crate::{
    azure::{
        self, Azure, AzureError, FlowQuery, Operation, OperationKind, OperationResult, PollOutcome,
        PowerState, VmRef, WatcherRef,
    },
    evidence::{
        Availability, BootDiagnostics, Evidence, FlowCheck, NsgEvidence, PendingRead, ReadKind,
        ResourceHealth, exposure,
        guest::{self, QUERY_SCRIPT},
        nsg::{self, Access, NetworkContext},
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
    /// The port the guest's listener must be on, when it is known: the endpoint comes from
    /// Azure (the VM's own address, no translation) or the operator was told the VM's port.
    /// With a host override the probed port may be translated (a load balancer NAT rule), so
    /// the listener's `PortNumber` is not judged against it.
    pub listener_port: Option<u16>,
}

/// The port the guest's listener must be on ([`Vantage::listener_port`]): the operator's
/// `vm_rdp_port` when it was told, else the probed port when the endpoint is the VM's own
/// address from Azure; unknown behind a host override, whose port may be translated.
pub fn listener_port(vm_rdp_port: Option<u16>, spec: &crate::engine::ValidSpec) -> Option<u16> {
    vm_rdp_port.or_else(|| spec.host.is_none().then_some(spec.port))
}

/// What a gathering needs besides the VM.
#[derive(Debug, Clone, Copy)]
pub struct Gathering<'a> {
    /// The prober's flow.
    pub vantage: Vantage,
    /// The incident's evidence so far, on a refresh: its reads still running in Azure are
    /// carried over, never started a second time.
    pub previous: Option<&'a Evidence>,
    /// When to poll a read started now for the first time.
    pub first_poll: Duration,
    /// Whether the in-guest evidence query may run (`evidence.guestQuery`).
    pub guest_query: bool,
    /// Asked right before the reads that are Azure writes (IP flow verify, Run Command).
    pub leadership: &'a dyn crate::engine::remediate::LeaderCheck,
}

/// Client port of the flow IP flow verify checks (the local evaluation uses the same).
const FLOW_CLIENT_PORT: u16 = 60000;

/// When a failed poll of a read is tried again, if Azure did not say.
const POLL_RETRY: Duration = Duration::from_secs(30);

/// Reads the evidence and starts the long-running reads. Throttling aborts (the caller
/// requeues after `Retry-After`); any other failed read leaves its part empty and is listed in
/// `Evidence::errors`. Also returns the Events of reads that finished at once.
pub async fn gather(
    azure: &dyn Azure,
    vm: &VmRef,
    how: &Gathering<'_>,
    now: Timestamp,
) -> Result<(Evidence, Vec<Event>), AzureError> {
    let mut ev = Evidence::empty(now);
    ev.rdp_port = how.vantage.listener_port;
    let state = keep(azure.vm_state(vm).await, &mut ev)?;
    if let Some(state) = &state {
        ev.power_state = Some(state.power_state);
        ev.provisioning_state = state.provisioning_state.clone();
        ev.agent_ready = Some(state.agent_ready);
    }
    let rules = keep(azure.network_rules(vm).await, &mut ev)?;
    if let Some(rules) = &rules {
        ev.nsg = evaluate_nsgs(rules, how.vantage);
    }
    if let Some(health) = keep(azure.resource_health(vm).await, &mut ev)? {
        ev.resource_health = Some(ResourceHealth {
            availability: Availability::parse(&health.availability_state),
            reason_type: health.reason_type,
            context: health.context,
            category: health.category,
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
    // The long-running reads come last and the Run Command very last: a throttled call aborts
    // the whole gathering, and a query whose handle was lost that way would make the next one
    // fail with a conflict (Azure runs one Run Command per VM at a time); an IP flow verify
    // started again costs nothing.
    let mut events = carry_over(how.previous, &mut ev, now);
    if let Some(state) = state
        .as_ref()
        .filter(|s| s.power_state == PowerState::Running)
    {
        if !ev.is_pending(ReadKind::IpFlowVerify)
            && how.leadership.term().is_some()
            && let Some(query) = rules.as_ref().and_then(|r| flow_query(r, how.vantage))
        {
            let watcher = WatcherRef::default_for(&state.location);
            match keep(
                azure.start_ip_flow_verify(vm, &watcher, &query).await,
                &mut ev,
            )? {
                // No Network Watcher in the region: the local verdict stands alone.
                None | Some(None) => {}
                Some(Some(op)) => {
                    events.extend(track(azure, ReadKind::IpFlowVerify, op, how, &mut ev, now).await)
                }
            }
        }
        // Run Command is delivered by the VM agent.
        if how.guest_query
            && state.agent_ready
            && !ev.is_pending(ReadKind::GuestQuery)
            && how.leadership.term().is_some()
        {
            let script: Vec<String> = QUERY_SCRIPT.lines().map(str::to_string).collect();
            if let Some(op) = keep(azure.run_command(vm, &script).await, &mut ev)? {
                events.extend(track(azure, ReadKind::GuestQuery, op, how, &mut ev, now).await);
            }
        }
    }
    Ok((ev, events))
}

/// Takes over the previous evidence's reads that are still running; those past their timeout
/// are given up and say so.
fn carry_over(previous: Option<&Evidence>, ev: &mut Evidence, now: Timestamp) -> Vec<Event> {
    let mut events = Vec::new();
    for read in previous.map(|p| p.pending.as_slice()).unwrap_or_default() {
        if read.timed_out(now) {
            events.push(give_up(ev, read.kind, Ending::TimedOut));
        } else {
            ev.pending.push(read.clone());
        }
    }
    events
}

/// Records a started read, or applies its result when Azure answered at once.
async fn track(
    azure: &dyn Azure,
    kind: ReadKind,
    op: Operation,
    how: &Gathering<'_>,
    ev: &mut Evidence,
    now: Timestamp,
) -> Vec<Event> {
    if op.completed {
        return match azure.poll(&op).await {
            Ok(outcome) => settle(kind, outcome, ev).into_iter().collect(),
            Err(e) => vec![give_up(
                ev,
                kind,
                Ending::Failed(format!("{}: {e}", e.reason())),
            )],
        };
    }
    ev.pending.push(PendingRead {
        kind,
        async_operation_url: op.async_operation,
        location_url: op.location,
        started_at: Time(now),
        next_poll_at: Time(now.checked_add(how.first_poll).unwrap_or(now)),
    });
    Vec::new()
}

/// Polls the reads that are due, applies those that finished and gives up those that failed or
/// ran out of time. A poll that fails in a way worth retrying (throttling, a network error)
/// keeps the read and tries again later. Returns the Events to publish.
pub async fn poll_pending(
    azure: &dyn Azure,
    vm: &VmRef,
    ev: &mut Evidence,
    now: Timestamp,
) -> Vec<Event> {
    let mut events = Vec::new();
    for read in std::mem::take(&mut ev.pending) {
        if read.timed_out(now) {
            events.push(give_up(ev, read.kind, Ending::TimedOut));
            continue;
        }
        if read.next_poll_at.0 > now {
            ev.pending.push(read);
            continue;
        }
        match azure.poll(&operation(vm, &read)).await {
            Ok(PollOutcome::Pending { retry_after }) => {
                ev.pending.push(again(read, retry_after, now));
            }
            Ok(outcome) => events.extend(settle(read.kind, outcome, ev)),
            Err(e) if e.is_retryable() => {
                let after = e.retry_after().unwrap_or(POLL_RETRY);
                ev.pending.push(again(read, after, now));
            }
            Err(e @ AzureError::UntrustedUrl { .. }) => {
                events.push(untrusted_url(read.kind.describe(), &e));
                events.push(give_up(ev, read.kind, Ending::Failed(e.to_string())));
            }
            Err(e) => events.push(give_up(
                ev,
                read.kind,
                Ending::Failed(format!("{}: {e}", e.reason())),
            )),
        }
    }
    events
}

fn again(mut read: PendingRead, after: Duration, now: Timestamp) -> PendingRead {
    let after = after.max(Duration::from_secs(1));
    read.next_poll_at = Time(now.checked_add(after).unwrap_or(now));
    read
}

/// The handle `Azure::poll` takes, rebuilt from status.
fn operation(vm: &VmRef, read: &PendingRead) -> Operation {
    Operation {
        kind: match read.kind {
            ReadKind::GuestQuery => OperationKind::RunCommand,
            ReadKind::IpFlowVerify => OperationKind::IpFlowVerify,
        },
        vm: vm.clone(),
        async_operation: read.async_operation_url.clone(),
        location: read.location_url.clone(),
        started_at: read.started_at.0.to_string(),
        detail: None,
        completed: false,
    }
}

/// Applies a finished read's outcome to the evidence.
fn settle(kind: ReadKind, outcome: PollOutcome, ev: &mut Evidence) -> Option<Event> {
    match (kind, outcome) {
        (_, PollOutcome::Pending { .. }) => None,
        (_, PollOutcome::Failed { code, message }) => Some(give_up(
            ev,
            kind,
            Ending::Failed(format!("{code}: {message}")),
        )),
        (ReadKind::GuestQuery, PollOutcome::Succeeded { result }) => match result {
            OperationResult::RunCommand(out) => {
                // The output is parsed, never stored or evented verbatim.
                let found = guest::parse(&out.stdout);
                let event = guest_event(&found, ev.rdp_port.unwrap_or(0));
                ev.guest = Some(found);
                Some(event)
            }
            _ => Some(give_up(ev, kind, Ending::Failed("no script output".into()))),
        },
        (ReadKind::IpFlowVerify, PollOutcome::Succeeded { result }) => match result {
            OperationResult::Flow(flow) => apply_flow(ev, flow),
            _ => Some(give_up(ev, kind, Ending::Failed("no verdict".into()))),
        },
    }
}

/// Stores IP flow verify's answer next to the local verdict; a disagreement is an Event.
fn apply_flow(ev: &mut Evidence, flow: azure::FlowVerdict) -> Option<Event> {
    let nsg = ev.nsg.as_mut()?;
    let access = if flow.allow {
        Access::Allow
    } else {
        Access::Deny
    };
    let agrees = access == nsg.verdict.access;
    let check = FlowCheck {
        access,
        // Azure omits the name when no rule decided (no NSG on the path).
        rule: flow
            .rule_name
            .filter(|r| !r.trim().is_empty())
            .unwrap_or_else(|| "(no rule: no NSG on the path)".to_owned()),
        agrees_with_local_verdict: agrees,
    };
    let event = (!agrees).then(|| mismatch_event(&nsg.verdict, &check));
    nsg.ip_flow_verify = Some(check);
    event
}

fn mismatch_event(local: &nsg::Verdict, azure: &FlowCheck) -> Event {
    let local_rule = local
        .deciding
        .iter()
        .find(|d| d.access == local.access)
        .map(|d| format!(" ({} NSG {} rule {})", d.level, d.nsg, d.rule))
        .unwrap_or_default();
    let unresolved = if local.unresolved_prefixes.is_empty() {
        String::new()
    } else {
        format!(
            "; prefixes the local evaluation cannot resolve: {}",
            local.unresolved_prefixes.join(", ")
        )
    };
    Event {
        severity: Severity::Warning,
        reason: "NsgVerdictMismatch",
        note: format!(
            "IP flow verify says {:?} ({}) but the local NSG evaluation says {:?}{local_rule}{unresolved}; the ladder trusts IP flow verify",
            azure.access, azure.rule, local.access
        ),
    }
}

fn guest_event(found: &guest::GuestEvidence, rdp_port: u16) -> Event {
    let scenarios: Vec<&str> = found
        .scenarios(rdp_port)
        .iter()
        .map(|s| s.as_str())
        .collect();
    let mut note = if scenarios.is_empty() {
        "in-guest query: nothing the troubleshooting guides name".to_string()
    } else {
        format!("in-guest query: {}", scenarios.join(", "))
    };
    if !found.complete {
        note.push_str(" (output incomplete)");
    }
    Event {
        severity: Severity::Normal,
        reason: "GuestEvidenceGathered",
        note,
    }
}

/// How a read ended without an answer.
enum Ending {
    /// Past its timeout.
    TimedOut,
    /// Azure reported a failure (code and message) or the poll failed for good.
    Failed(String),
}

/// Records that a read ended without an answer (in `errors` and an Event).
/// The Event for an operation URL that was not polled because it is not ARM's.
pub fn untrusted_url(what: &str, e: &AzureError) -> Event {
    Event {
        severity: Severity::Warning,
        reason: UNTRUSTED_OPERATION_URL,
        note: format!(
            "{what}: {e}; the URL in status was not polled and the ARM token was not sent (check who can write this object's status)"
        ),
    }
}

/// Event and condition reason for an operation URL that is not ARM's.
pub const UNTRUSTED_OPERATION_URL: &str = "UntrustedOperationUrl";

fn give_up(ev: &mut Evidence, kind: ReadKind, ending: Ending) -> Event {
    let (suffix, detail) = match ending {
        Ending::TimedOut => (
            "TimedOut",
            format!(
                "no answer within {}s; the ladder goes on without it",
                kind.timeout().as_secs()
            ),
        ),
        Ending::Failed(detail) => ("Failed", detail),
    };
    ev.errors
        .push(format!("{}{suffix}: {detail}", kind.reason()));
    Event {
        severity: Severity::Warning,
        reason: "EvidenceReadFailed",
        note: format!("{} ended without an answer: {detail}", kind.describe()),
    }
}

/// Keeps a successful read; records a failed one. Throttling and Network's "another
/// operation is in progress" propagate: the gathering is tried again after their Retry-After.
fn keep<T>(result: Result<T, AzureError>, ev: &mut Evidence) -> Result<Option<T>, AzureError> {
    match result {
        Ok(v) => Ok(Some(v)),
        Err(e @ AzureError::Throttled { .. }) => Err(e),
        Err(e) if e.is_another_operation() => Err(e),
        Err(e) => {
            ev.errors.push(format!("{}: {e}", e.reason()));
            Ok(None)
        }
    }
}

/// The prober's flow as IP flow verify takes it (IPv4 only, like the API).
fn flow_query(rules: &azure::NetworkRules, vantage: Vantage) -> Option<FlowQuery> {
    let local_ip: Ipv4Addr = rules.endpoint.private_ip.as_deref()?.parse().ok()?;
    let IpAddr::V4(remote_ip) = vantage.source.unwrap_or(nsg::ANY_INTERNET_SOURCE) else {
        return None;
    };
    Some(FlowQuery {
        remote_ip,
        remote_port: FLOW_CLIENT_PORT,
        local_ip,
        local_port: vantage.port,
    })
}

/// The prober's flow to the VM's private address, and the subnet's and NIC's NSGs in the
/// evaluator's form; `None` when the NIC has no private address.
pub fn probe_flow(
    rules: &azure::NetworkRules,
    vantage: Vantage,
) -> Option<(
    nsg::Flow,
    Option<nsg::NetworkSecurityGroup>,
    Option<nsg::NetworkSecurityGroup>,
)> {
    let private: IpAddr = rules.endpoint.private_ip.as_deref()?.parse().ok()?;
    let source = vantage.source.unwrap_or(nsg::ANY_INTERNET_SOURCE);
    Some((
        nsg::Flow::inbound_tcp(source, private, vantage.port),
        rules.subnet_nsg.as_ref().map(azure::nsg::to_evaluator),
        rules.nic_nsg.as_ref().map(azure::nsg::to_evaluator),
    ))
}

fn evaluate_nsgs(rules: &azure::NetworkRules, vantage: Vantage) -> Option<NsgEvidence> {
    let (flow, subnet, nic) = probe_flow(rules, vantage)?;
    let ctx = NetworkContext::private_ranges();
    let verdict = nsg::evaluate(&flow, subnet.as_ref(), nic.as_ref(), &ctx);
    let open = nsg::open_to_internet(
        flow.destination,
        vantage.port,
        subnet.as_ref(),
        nic.as_ref(),
        &ctx,
        exposure::configured(),
    );
    Some(NsgEvidence {
        verdict,
        open_to_internet: open,
        closed_public_ip: closed_public_ip(
            &rules.endpoint,
            vantage,
            subnet.is_some() || nic.is_some(),
        ),
        ip_flow_verify: None,
    })
}

/// Whether the probe's path is a Standard public IP with no NSG on it. The path follows
/// from the prober's source: a public source reaches the VM through its public IP (where a
/// Standard SKU denies inbound traffic unless an NSG allows it), a private one reaches the
/// private address inside the network (where no NSG means allowed). Basic public IPs (retired
/// in 2025) were open without an NSG.
fn closed_public_ip(endpoint: &azure::Endpoint, vantage: Vantage, any_nsg: bool) -> bool {
    let public_path = endpoint.public_ip.is_some() && vantage.source.is_none_or(|s| !is_private(s));
    let standard = endpoint
        .public_ip_sku
        .as_deref()
        .is_none_or(|s| !s.eq_ignore_ascii_case("Basic"));
    public_path && standard && !any_nsg
}

fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_private() || v4.is_loopback() || v4.is_link_local(),
        IpAddr::V6(v6) => v6.is_loopback() || (v6.segments()[0] & 0xfe00) == 0xfc00,
    }
}

#[cfg(test)]
mod listener_port_tests {
    use super::listener_port;
    use crate::{api::RdpHealthSpec, engine::ValidSpec};

    fn spec(endpoint: serde_json::Value) -> ValidSpec {
        let s: RdpHealthSpec = serde_json::from_value(serde_json::json!({
            "vm": {"resourceId": "/subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm"},
            "endpoint": endpoint,
        }))
        .unwrap();
        ValidSpec::try_from(&s).unwrap()
    }

    #[test]
    fn a_translated_port_is_never_taken_for_the_listeners() {
        // The VM's own address from Azure: the probed port is the listener's.
        assert_eq!(
            listener_port(None, &spec(serde_json::json!({}))),
            Some(3389)
        );
        assert_eq!(
            listener_port(None, &spec(serde_json::json!({"port": 3390}))),
            Some(3390)
        );
        // A host override (a load balancer NAT rule 50001 → 3389): unknown, so `PortChanged`
        // is not judged and the port is never "restored" to 50001.
        let nat = spec(serde_json::json!({"host": "lb.example.com", "port": 50001}));
        assert_eq!(listener_port(None, &nat), None);
        // Unless the operator is told the VM's own port.
        assert_eq!(listener_port(Some(3389), &nat), Some(3389));
    }
}
