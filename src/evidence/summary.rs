//! The evidence gathered for one incident, as the engine consumes it. The Azure driver fills
//! it from read-only calls; everything here is plain data.

use std::time::Duration;

use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use serde::{Deserialize, Serialize};

use super::{
    guest::GuestEvidence,
    nsg::{Access, Verdict},
    serial::SerialScan,
};

pub use crate::azure::PowerState;

/// Resource Health's availability state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub enum Availability {
    /// Healthy.
    Available,
    /// Down.
    Unavailable,
    /// Impaired.
    Degraded,
    /// No signal.
    Unknown,
}

impl Availability {
    /// Parses ARM's value; unknown spellings become `Unknown`.
    pub fn parse(s: &str) -> Self {
        match s.to_ascii_lowercase().as_str() {
            "available" => Self::Available,
            "unavailable" => Self::Unavailable,
            "degraded" => Self::Degraded,
            _ => Self::Unknown,
        }
    }
}

/// Resource Health's current status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResourceHealth {
    /// Availability.
    pub availability: Availability,
    /// Where the event came from, as Azure words it (`Unplanned`, `Planned`, `User Initiated`,
    /// …); its exact spellings are not documented.
    pub reason_type: Option<String>,
    /// Who started the event: `Platform Initiated`, `Customer Initiated`, `VM Initiated`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
    /// For platform-initiated events: `Planned`, `Unplanned`; else `Not Applicable`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    /// Azure's summary.
    pub summary: Option<String>,
}

/// Who started the event behind a VM's unavailability.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Initiator {
    /// Azure (planned maintenance, an outage, a host failure).
    Platform,
    /// The customer (a restart, a stop, a redeploy — ours included).
    Customer,
    /// The guest itself (a crash, a reboot from inside).
    Vm,
    /// Nothing Azure sent says.
    Unclear,
}

/// Lower case without spaces, hyphens or underscores: `Platform Initiated`,
/// `platformInitiated` and `PLATFORM_INITIATED` read alike.
fn squash(s: &str) -> String {
    s.chars()
        .filter(|c| !matches!(c, ' ' | '-' | '_' | '\t'))
        .flat_map(char::to_lowercase)
        .collect()
}

fn initiator_of(value: Option<&str>) -> Initiator {
    match value.map(squash).as_deref() {
        Some("platforminitiated" | "platform" | "planned" | "unplanned" | "outage") => {
            Initiator::Platform
        }
        Some("customerinitiated" | "userinitiated" | "customer" | "user") => Initiator::Customer,
        Some("vminitiated" | "vm") => Initiator::Vm,
        _ => Initiator::Unclear,
    }
}

impl ResourceHealth {
    /// Who started the event: from `context` (Azure's documented field), else `reasonType`,
    /// else `category` (which Azure fills with `Planned`/`Unplanned` only for platform
    /// events). Case, spaces and separators are ignored.
    pub fn initiator(&self) -> Initiator {
        [&self.context, &self.reason_type, &self.category]
            .into_iter()
            .map(|v| initiator_of(v.as_deref()))
            .find(|i| *i != Initiator::Unclear)
            .unwrap_or(Initiator::Unclear)
    }

    /// An Azure-side outage (platform or planned): the ladder waits instead of acting. An
    /// unavailability nobody can attribute counts as one (when in doubt, wait; the wait ends
    /// when Resource Health changes). A `Degraded` VM (e.g. a failing host) is not one:
    /// redeploying moves it to a healthy host. `Unknown` (Resource Health has had no signal
    /// for a while) is not one either: it says nothing about Azure, so the ladder goes on.
    pub fn is_platform_problem(&self) -> bool {
        self.availability == Availability::Unavailable
            && matches!(self.initiator(), Initiator::Platform | Initiator::Unclear)
    }
}

/// NSG evaluation for the probe's flow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NsgEvidence {
    /// The local verdict for the prober's source.
    pub verdict: Verdict,
    /// Whether RDP is open to the whole internet (a security finding).
    pub open_to_internet: bool,
    /// The prober comes in through a Standard public IP and no NSG is on the path: Azure
    /// drops the traffic (a Standard public IP is closed to inbound traffic unless an NSG
    /// allows it). IP flow verify evaluates NSGs only and cannot see this.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub closed_public_ip: bool,
    /// IP flow verify's answer, when a Network Watcher exists in the VM's region. When it
    /// disagrees with the local verdict, the ladder trusts it: Azure evaluates the rules it
    /// actually enforces (service tags, application security groups, augmented rules).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_flow_verify: Option<FlowCheck>,
}

impl NsgEvidence {
    /// The access the ladder acts on: IP flow verify's when it answered, else the local one;
    /// always `Deny` through a Standard public IP with no NSG on the path.
    pub fn trusted_access(&self) -> Access {
        if self.closed_public_ip {
            return Access::Deny;
        }
        self.ip_flow_verify
            .as_ref()
            .map_or(self.verdict.access, |f| f.access)
    }
}

/// Network Watcher's IP flow verify answer for the prober's flow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FlowCheck {
    /// Azure's decision.
    pub access: Access,
    /// The deciding rule (`securityRules/X`, `defaultSecurityRules/X`).
    pub rule: String,
    /// Whether the local verdict reached the same decision.
    pub agrees_with_local_verdict: bool,
}

/// An evidence read that Azure runs as a long-running operation: started while gathering,
/// polled on later reconciles (never waited for), kept here so a restarted operator resumes
/// polling it instead of starting it again.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, schemars::JsonSchema,
)]
pub enum ReadKind {
    /// The in-guest event-log and RDP-configuration query, through Run Command.
    GuestQuery,
    /// Network Watcher IP flow verify of the prober's flow.
    IpFlowVerify,
}

impl ReadKind {
    /// How long the read may run before it is given up (and the ladder goes on without it).
    /// Run Command needs at least about 20 seconds and usually answers within a minute or two;
    /// IP flow verify within seconds.
    pub fn timeout(self) -> Duration {
        match self {
            Self::GuestQuery => Duration::from_secs(300),
            Self::IpFlowVerify => Duration::from_secs(120),
        }
    }

    /// For people (Events, messages).
    pub fn describe(self) -> &'static str {
        match self {
            Self::GuestQuery => "the in-guest query",
            Self::IpFlowVerify => "IP flow verify",
        }
    }

    /// PascalCase prefix of its entries in `errors`.
    pub fn reason(self) -> &'static str {
        match self {
            Self::GuestQuery => "GuestQuery",
            Self::IpFlowVerify => "IpFlowVerify",
        }
    }
}

/// A started evidence read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PendingRead {
    /// What it reads.
    pub kind: ReadKind,
    /// The `Azure-AsyncOperation` URL, when ARM returned one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub async_operation_url: Option<String>,
    /// The `Location` URL (the result comes from here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location_url: Option<String>,
    /// When it was started.
    pub started_at: Time,
    /// When to poll it next.
    pub next_poll_at: Time,
}

impl PendingRead {
    /// When it is given up: `startedAt` plus the kind's timeout.
    pub fn deadline(&self) -> Timestamp {
        self.started_at
            .0
            .checked_add(self.kind.timeout())
            .unwrap_or(self.started_at.0)
    }

    /// Whether it ran out of time.
    pub fn timed_out(&self, now: Timestamp) -> bool {
        now >= self.deadline()
    }

    /// When it needs a look: the next poll, or the deadline if that comes first.
    pub fn due(&self) -> Timestamp {
        self.next_poll_at.0.min(self.deadline())
    }
}

/// Everything gathered for one incident.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Evidence {
    /// When it was gathered.
    pub gathered_at: Time,
    /// Power state, when the instance view was read.
    pub power_state: Option<PowerState>,
    /// VM provisioning state (`succeeded`, `failed/…`).
    pub provisioning_state: Option<String>,
    /// VM agent Ready (`None` when not reported).
    pub agent_ready: Option<bool>,
    /// Resource Health.
    pub resource_health: Option<ResourceHealth>,
    /// NSG evaluation.
    pub nsg: Option<NsgEvidence>,
    /// Boot diagnostics serial-log scan.
    pub serial: Option<SerialScan>,
    /// Boot diagnostics blob locations (without SAS tokens: those are credentials).
    pub boot_diagnostics: Option<BootDiagnostics>,
    /// In-guest query (only when the agent is Ready).
    pub guest: Option<GuestEvidence>,
    /// Reads still running in Azure (the in-guest query, IP flow verify); the ladder waits
    /// for them, at most for their timeout.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending: Vec<PendingRead>,
    /// Reads that failed or timed out (reason and message); their parts stay empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
    /// The RDP port the prober reaches, as the VM sees it (a NAT rule's backend port): the
    /// port the guest's listener must be configured for (`PortNumber`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rdp_port: Option<u16>,
}

/// Where boot diagnostics live.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BootDiagnostics {
    /// Console screenshot blob URI, without its SAS query.
    pub console_screenshot_uri: Option<String>,
    /// Serial log blob URI, without its SAS query.
    pub serial_log_uri: Option<String>,
}

/// Drops the query (a SAS token is a credential) from a blob URI.
pub fn strip_sas(uri: &str) -> String {
    uri.split('?').next().unwrap_or_default().to_string()
}

impl Evidence {
    /// Evidence with nothing known yet.
    pub fn empty(gathered_at: Timestamp) -> Self {
        Self {
            gathered_at: Time(gathered_at),
            power_state: None,
            provisioning_state: None,
            agent_ready: None,
            resource_health: None,
            nsg: None,
            serial: None,
            boot_diagnostics: None,
            guest: None,
            pending: Vec::new(),
            errors: Vec::new(),
            rdp_port: None,
        }
    }

    /// The guest's scenarios, `PortChanged` judged against the probed port when it is known.
    pub fn guest_scenarios(&self) -> Vec<super::guest::GuestScenario> {
        self.guest
            .as_ref()
            .map(|g| g.scenarios(self.rdp_port.unwrap_or(0)))
            .unwrap_or_default()
    }

    /// Whether a read of `kind` is running.
    pub fn is_pending(&self, kind: ReadKind) -> bool {
        self.pending.iter().any(|p| p.kind == kind)
    }

    /// When the earliest pending read needs a look (`None` when nothing is pending).
    pub fn pending_due(&self) -> Option<Timestamp> {
        self.pending.iter().map(PendingRead::due).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rh(
        a: Availability,
        context: Option<&str>,
        reason: Option<&str>,
        category: Option<&str>,
    ) -> ResourceHealth {
        ResourceHealth {
            availability: a,
            reason_type: reason.map(str::to_string),
            context: context.map(str::to_string),
            category: category.map(str::to_string),
            summary: None,
        }
    }

    #[test]
    fn platform_problems() {
        use Availability::*;
        // Azure's spec example and its Event Grid schema.
        assert!(
            rh(
                Unavailable,
                Some("Platform Initiated"),
                Some("Unplanned"),
                Some("Unplanned")
            )
            .is_platform_problem()
        );
        assert!(rh(Unavailable, None, Some("Planned"), None).is_platform_problem());
        assert!(
            !rh(
                Unavailable,
                Some("Customer Initiated"),
                None,
                Some("Not Applicable")
            )
            .is_platform_problem()
        );
        assert!(
            !rh(
                Degraded,
                Some("Platform Initiated"),
                Some("Unplanned"),
                None
            )
            .is_platform_problem()
        );
        assert!(!rh(Available, None, None, None).is_platform_problem());
        // Nothing says who: when in doubt, wait.
        assert!(rh(Unavailable, None, None, Some("Not Applicable")).is_platform_problem());
        // No signal says nothing about Azure.
        assert!(
            !rh(Unknown, Some("Platform Initiated"), Some("Unplanned"), None).is_platform_problem()
        );
    }

    #[test]
    fn user_initiated_is_recognised_however_it_is_spelled() {
        for spelling in [
            "UserInitiated",
            "User Initiated",
            "user initiated",
            "USER_INITIATED",
            "Customer Initiated",
            "customerInitiated",
        ] {
            let by_context = rh(
                Availability::Unavailable,
                Some(spelling),
                Some("Unplanned"),
                None,
            );
            assert_eq!(by_context.initiator(), Initiator::Customer, "{spelling}");
            assert!(!by_context.is_platform_problem(), "{spelling}");
            let by_reason = rh(Availability::Unavailable, None, Some(spelling), None);
            assert!(!by_reason.is_platform_problem(), "{spelling}");
        }
        // The context wins over a reason type that says otherwise.
        let vm = rh(
            Availability::Unavailable,
            Some("VM Initiated"),
            Some("Unplanned"),
            None,
        );
        assert_eq!(vm.initiator(), Initiator::Vm);
        assert!(!vm.is_platform_problem());
    }

    #[test]
    fn sas_tokens_are_stripped() {
        assert_eq!(
            strip_sas(
                "https://acct.blob.core.windows.net/c/vm.serialconsole.log?sv=2020&sig=SECRET"
            ),
            "https://acct.blob.core.windows.net/c/vm.serialconsole.log"
        );
    }
}
