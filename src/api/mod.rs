//! The `RdpHealth` API (`rdphealth.io/v1alpha1`): spec, status, the condition vocabulary and
//! CRD generation. Every field's doc comment becomes its `kubectl explain` text.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime, Time};
use kube::{CustomResource, CustomResourceExt, KubeSchema};
use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

mod fleet;

pub use self::fleet::*;
use crate::evidence::Evidence;
use crate::ladder::{
    LadderStatus, Rung,
    snapshot::SnapshotSpec,
    spec::{BackoffSpec, MaintenanceWindow, NsgRepairSpec, PasswordResetSpec},
};

/// API group.
pub const GROUP: &str = "rdphealth.io";
/// API version.
pub const VERSION: &str = "v1alpha1";
/// The field manager of every write the operator makes (server-side apply).
pub const FIELD_MANAGER: &str = "rdphealth-operator";
/// File name of the generated CRD under `crds/`.
pub const CRD_FILE: &str = "rdphealths.rdphealth.io.yaml";

/// Condition types.
pub mod conditions {
    /// The endpoint answers RDP, judged with the failure/success thresholds.
    pub const REACHABLE: &str = "Reachable";
    /// Reachable and nothing to worry about (no failing probes, certificate fine).
    pub const HEALTHY: &str = "Healthy";
    /// The spec passed the controller's validation.
    pub const VALID: &str = "Valid";
    /// The RDP certificate is valid and not about to expire.
    pub const CERTIFICATE_VALID: &str = "CertificateValid";
    /// A remediation rung is in flight or planned.
    pub const REMEDIATING: &str = "Remediating";
    /// Every usable rung was tried without recovery.
    pub const LADDER_EXHAUSTED: &str = "LadderExhausted";
    /// Remediation is held (pause, storm breaker, maintenance window, not the leader).
    pub const REMEDIATION_SUSPENDED: &str = "RemediationSuspended";
    /// The operator's prober could probe this object (False: its own local error, e.g. out of
    /// file descriptors; the VM's state is then unknown and nothing acts on it).
    pub const PROBER_READY: &str = "ProberReady";
    /// Every operation URL the operator was asked to poll belonged to the ARM endpoint. False
    /// when one in status pointed elsewhere: it was not polled (the ARM token goes only to
    /// ARM), and the rung or read it belonged to is settled without it.
    pub const OPERATION_URLS_TRUSTED: &str = "OperationUrlsTrusted";
    /// The endpoint answered as the VM's own computer name (`osProfile.computerName`). False
    /// (`WrongHost`) when it answered as another machine: the ladder never acts then.
    pub const HOST_IDENTITY: &str = "HostIdentity";
    /// The server requires Network Level Authentication (CredSSP); False (`NlaDisabled`) when
    /// clients can connect without it.
    pub const NLA_REQUIRED: &str = "NlaRequired";
    /// The last OS-disk snapshot taken before a change: True (`SnapshotTaken`) names it;
    /// False (`SnapshotFailed`) says why it failed, and the rung it preceded did not start.
    pub const OS_DISK_SNAPSHOT: &str = "OsDiskSnapshot";
    /// True while `remediation.allowLegacyTls` lets a repair enable the TLS 1.0 and 1.1 server
    /// protocols (a security finding); False once the opt-in is withdrawn.
    pub const LEGACY_TLS_ALLOWED: &str = "LegacyTlsAllowed";
}

/// Condition and Event reasons (PascalCase). Probe failure reasons are the prober's bounded
/// reasons in PascalCase (e.g. `TcpTimeout`).
pub mod reasons {
    /// Reachable=True.
    pub const REACHABLE: &str = "Reachable";
    /// Not enough probes yet to decide.
    pub const AWAITING_PROBES: &str = "AwaitingProbes";
    /// The endpoint could not be resolved (e.g. no host and no Azure resolution).
    pub const ENDPOINT_UNRESOLVED: &str = "EndpointUnresolved";
    /// Monitoring is suspended by `spec.suspend`.
    pub const SUSPENDED: &str = "Suspended";
    /// The spec is invalid.
    pub const INVALID_SPEC: &str = "InvalidSpec";
    /// The spec is valid.
    pub const SPEC_VALID: &str = "SpecValid";
    /// Healthy=True.
    pub const HEALTHY: &str = "Healthy";
    /// Reachable, but recent probes failed (below the failure threshold).
    pub const PROBES_FAILING: &str = "ProbesFailing";
    /// Reachable=False.
    pub const UNREACHABLE: &str = "Unreachable";
    /// The certificate is valid and not about to expire.
    pub const CERTIFICATE_VALID: &str = "CertificateValid";
    /// The certificate expires within `spec.probe.certificateWarning`.
    pub const CERTIFICATE_EXPIRING: &str = "CertificateExpiring";
    /// The certificate has expired.
    pub const CERTIFICATE_EXPIRED: &str = "CertificateExpired";
    /// The certificate is not valid yet.
    pub const CERTIFICATE_NOT_YET_VALID: &str = "CertificateNotYetValid";
    /// The certificate could not be read.
    pub const CERTIFICATE_UNREADABLE: &str = "CertificateUnreadable";
    /// The server did not use TLS, so there is no certificate to judge.
    pub const NO_TLS: &str = "NoTls";
    /// The server accepts only standard RDP security (`SecurityLayer=0`): reachable, but with
    /// neither TLS nor NLA; `CertificateValid=False` and a Warning Event.
    pub const LEGACY_RDP_SECURITY: &str = "LegacyRdpSecurity";
    /// Event: Reachable flipped to False.
    pub const BECAME_UNREACHABLE: &str = "BecameUnreachable";
    /// Event: Reachable flipped from False to True.
    pub const RECOVERED: &str = "Recovered";
    /// Reachable=False, but recent probes succeed (below the success threshold).
    pub const RECOVERING: &str = "Recovering";
    /// HostIdentity=True: the endpoint answered as the VM's computer name.
    pub const HOST_VERIFIED: &str = "HostVerified";
    /// HostIdentity=True without an expected name to compare with: the name was read only.
    pub const IDENTITY_READ: &str = "IdentityRead";
    /// HostIdentity=Unknown: no identity read yet (no CredSSP, or the step failed).
    pub const IDENTITY_UNKNOWN: &str = "IdentityUnknown";
    /// HostIdentity=False, and Event: the endpoint answered as another computer.
    pub const WRONG_HOST: &str = "WrongHost";
    /// NlaRequired=True.
    pub const NLA_REQUIRED: &str = "NlaRequired";
    /// NlaRequired=False, and Event: clients can connect without NLA.
    pub const NLA_DISABLED: &str = "NlaDisabled";
    /// Event: the server's clock is off by more than 5 minutes (NLA logons fail).
    pub const CLOCK_SKEW: &str = "ClockSkew";
    /// Event: the RDP certificate is not issued to the computer that answered.
    pub const CERTIFICATE_NAME_MISMATCH: &str = "CertificateNameMismatch";
    /// ProberReady=False and its Event: the prober failed locally (`prober_error`).
    pub const PROBER_ERROR: &str = "ProberError";
    /// ProberReady=True: the last probe ran (whatever it found).
    pub const PROBE_COMPLETED: &str = "ProbeCompleted";
}

/// Pattern of a Go-style duration that Kubernetes CEL `duration()` understands.
pub(crate) const DURATION_PATTERN: &str = r"^([0-9]+(ms|s|m|h))+$";
/// Pattern of a duration that may also use days.
pub(crate) const LONG_DURATION_PATTERN: &str = r"^([0-9]+(ms|s|m|h|d))+$";
/// Pattern of an Azure VM resource ID.
pub const RESOURCE_ID_PATTERN: &str = r"^/subscriptions/[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}/resourceGroups/[-\w\._\(\)]{1,90}/providers/Microsoft\.Compute/virtualMachines/[-\w\.]{1,64}$";

/// Keeps one Windows VM reachable over Remote Desktop: the operator probes its RDP endpoint
/// and reports what it finds in status, Events and metrics.
// Each `printcolumn(..)` repeats the same keys, which the lint mistakes for duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "rdphealth.io",
    version = "v1alpha1",
    kind = "RdpHealth",
    plural = "rdphealths",
    shortname = "rdph",
    namespaced,
    status = "RdpHealthStatus",
    derive = "PartialEq",
    doc = "Keeps one Azure Windows VM reachable over Remote Desktop.",
    printcolumn(
        name = "Reachable",
        type_ = "string",
        json_path = r#".status.conditions[?(@.type=="Reachable")].status"#
    ),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = r#".status.conditions[?(@.type=="Reachable")].reason"#
    ),
    printcolumn(
        name = "Computer",
        type_ = "string",
        priority = "1",
        description = "The computer name the endpoint answered as (NTLM CHALLENGE)",
        json_path = ".status.identity.computerName"
    ),
    printcolumn(
        name = "Last Probe",
        type_ = "date",
        json_path = ".status.lastProbe.time"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct RdpHealthSpec {
    /// The Azure VM to keep reachable.
    pub vm: VmRef,
    /// Where to probe. Without `host`, the address is resolved from Azure.
    #[serde(default)]
    pub endpoint: EndpointSpec,
    /// How and how often to probe.
    #[serde(default)]
    pub probe: ProbeSpec,
    /// What the operator may do when the VM is unreachable.
    #[serde(default)]
    pub remediation: RemediationSpec,
    /// Which evidence the operator may read.
    #[serde(default)]
    pub evidence: EvidenceSpec,
    /// Stops probing and reporting while true; the status keeps its last observations.
    #[serde(default)]
    pub suspend: bool,
}

impl RdpHealthSpec {
    /// The VM's name (the resource id's last segment), lower-cased: ARM names compare
    /// case-insensitively.
    pub fn vm_key(&self) -> String {
        self.vm
            .resource_id
            .rsplit('/')
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase()
    }
}

/// Which evidence the operator may read when the VM is unreachable.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct EvidenceSpec {
    /// Run the read-only evidence query inside the VM (Azure Run Command: a script executed
    /// as SYSTEM, one per VM at a time). Default: off in `Observe`, on in `DryRun` and `Auto`.
    /// Off, the operator runs nothing inside the VM and needs no `runCommand/action`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_query: Option<bool>,
}

/// Names the Azure VM.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct VmRef {
    /// ARM resource ID:
    /// `/subscriptions/{guid}/resourceGroups/{group}/providers/Microsoft.Compute/virtualMachines/{name}`.
    /// Immutable: create a new object to watch another VM.
    #[schemars(length(max = 512), regex(pattern = RESOURCE_ID_PATTERN))]
    #[x_kube(validation = Rule::new("self == oldSelf").message("vm.resourceId is immutable"))]
    pub resource_id: String,
}

/// Which address of the VM to probe.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AddressType {
    /// The public IP address of the VM's primary NIC.
    #[default]
    Public,
    /// The private IP address of the VM's primary NIC (the operator runs in the same network).
    Private,
}

/// The RDP endpoint.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSpec {
    /// Host name or IP address to probe instead of the address from Azure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[^\s/]+$"))]
    pub host: Option<String>,
    /// TCP port of the RDP listener.
    #[serde(default = "default_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,
    /// Which of the VM's addresses to probe when `host` is not set.
    #[serde(default)]
    pub address_type: AddressType,
}

impl Default for EndpointSpec {
    fn default() -> Self {
        Self {
            host: None,
            port: default_port(),
            address_type: AddressType::Public,
        }
    }
}

pub(crate) fn default_port() -> u16 {
    crate::probe::DEFAULT_RDP_PORT
}

/// Probe cadence, thresholds and certificate policy.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("duration(self.timeout) < duration(self.interval)").message("timeout must be shorter than interval"),
    validation = Rule::new("duration(self.timeout) < duration(self.unhealthyInterval)").message("timeout must be shorter than unhealthyInterval"),
)]
pub struct ProbeSpec {
    /// Time between probes while the endpoint is reachable, e.g. `30s`, `1m`.
    #[serde(default = "default_interval")]
    #[schemars(length(max = 32), regex(pattern = DURATION_PATTERN))]
    pub interval: String,
    /// Time between probes while probes fail, e.g. `10s`.
    #[serde(default = "default_unhealthy_interval")]
    #[schemars(length(max = 32), regex(pattern = DURATION_PATTERN))]
    pub unhealthy_interval: String,
    /// Time between probes after a first failure, until `failureThreshold` failures in a row
    /// confirm it or a success clears it, e.g. `3s`; never longer than `unhealthyInterval`.
    /// Once the endpoint is unreachable, probes run every `unhealthyInterval` again.
    #[serde(default = "default_confirm_interval")]
    #[schemars(length(max = 32), regex(pattern = DURATION_PATTERN))]
    pub confirm_interval: String,
    /// Deadline of one probe (TCP, X.224 and TLS together); shorter than both intervals.
    #[serde(default = "default_timeout")]
    #[schemars(length(max = 32), regex(pattern = DURATION_PATTERN))]
    pub timeout: String,
    /// Consecutive failed probes before the endpoint counts as unreachable.
    #[serde(default = "default_failure_threshold")]
    #[schemars(range(min = 1, max = 100))]
    pub failure_threshold: u32,
    /// Consecutive successful probes before an unreachable endpoint counts as reachable again.
    #[serde(default = "default_success_threshold")]
    #[schemars(range(min = 1, max = 100))]
    pub success_threshold: u32,
    /// A certificate expiring within this period makes `CertificateValid` false, e.g. `14d`.
    #[serde(default = "default_certificate_warning")]
    #[schemars(length(max = 32), regex(pattern = LONG_DURATION_PATTERN))]
    pub certificate_warning: String,
    /// How often a probe also runs the identity step (an NTLM NEGOTIATE in CredSSP, no
    /// credentials) that tells which computer answers, whether NLA is enforced and the
    /// server's clock. It also runs on the first probe of a newly resolved endpoint and after
    /// rungs that can change addresses, and on every probe while the endpoint answers as
    /// another computer. e.g. `10m`.
    #[serde(default = "default_identity_check_interval")]
    #[schemars(length(max = 32), regex(pattern = DURATION_PATTERN))]
    pub identity_check_interval: String,
}

impl Default for ProbeSpec {
    fn default() -> Self {
        Self {
            interval: default_interval(),
            unhealthy_interval: default_unhealthy_interval(),
            confirm_interval: default_confirm_interval(),
            timeout: default_timeout(),
            failure_threshold: default_failure_threshold(),
            success_threshold: default_success_threshold(),
            certificate_warning: default_certificate_warning(),
            identity_check_interval: default_identity_check_interval(),
        }
    }
}

fn default_interval() -> String {
    "30s".into()
}
fn default_unhealthy_interval() -> String {
    "10s".into()
}
fn default_confirm_interval() -> String {
    "3s".into()
}
fn default_timeout() -> String {
    "5s".into()
}
fn default_failure_threshold() -> u32 {
    3
}
fn default_success_threshold() -> u32 {
    2
}
fn default_certificate_warning() -> String {
    "14d".into()
}
fn default_identity_check_interval() -> String {
    "10m".into()
}

/// How far the operator may go to restore RDP access.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RemediationMode {
    /// Probe and report only.
    #[default]
    Observe,
    /// Plan remediation and report what would be done, without changing anything in Azure.
    DryRun,
    /// Remediate automatically (the lease holder only).
    Auto,
}

/// Remediation policy: the mode and the ladder's settings (see docs/ladder.md).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RemediationSpec {
    /// `Observe` (default), `DryRun` or `Auto`.
    #[serde(default)]
    pub mode: RemediationMode,
    /// Ordered rungs the ladder may use. Default: ResetRdpConfig, RepairGuest, ResetNic,
    /// Restart, Redeploy. ResetPassword needs `passwordReset`.
    #[serde(default = "default_ladder")]
    pub ladder: Vec<Rung>,
    /// Disruptive rungs (ResetNic, Restart, Redeploy, ResetPassword) allowed without a
    /// one-time approval annotation. Default: none.
    #[serde(default)]
    pub allowed_disruptive_actions: Vec<Rung>,
    /// Delay between rung attempts.
    #[serde(default)]
    pub backoff: BackoffSpec,
    /// Wait after an operation finishes before judging the probe, e.g. `2m`. After a rung
    /// that restarts the guest, the judgement also waits for the guest to come back (VM agent
    /// Ready again, or a successful probe), at most 5 × settleTime after the operation.
    #[serde(default = "default_settle_time")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h|d))+$"))]
    pub settle_time: String,
    /// Attempts of one rung per incident (1–3).
    #[serde(default = "default_max_attempts")]
    #[schemars(range(min = 1, max = 3))]
    pub max_attempts_per_rung: u32,
    /// Ladders that may start within 24 hours (1–24).
    #[serde(default = "default_max_ladders")]
    #[schemars(range(min = 1, max = 24))]
    pub max_ladders_per_day: u32,
    /// Quiet time after a ladder ends before a new one may start, e.g. `1h`.
    #[serde(default = "default_cooldown")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h|d))+$"))]
    pub cooldown: String,
    /// Weekly UTC windows inside which disruptive rungs may run. Empty: any time.
    #[serde(default)]
    pub maintenance_windows: Vec<MaintenanceWindow>,
    /// Start the VM when it is stopped or deallocated.
    #[serde(default)]
    pub allow_start: bool,
    /// Add an NSG allow rule for RDP from listed prefixes when an NSG denies the prober.
    #[serde(default)]
    pub nsg_repair: NsgRepairSpec,
    /// Consent to listener settings that weaken RDP security (SecurityLayer=0,
    /// MinEncryptionLevel=1) when repairing frequent disconnects.
    #[serde(default)]
    pub allow_insecure_listener_settings: bool,
    /// Opt-in for legacy clients: `EnableTls12` also enables the TLS 1.0 and 1.1 server
    /// protocols, as the "internal error" guide describes. Off by default; while on, the
    /// object reports a security finding (`LegacyTlsAllowed`).
    #[serde(default)]
    pub allow_legacy_tls: bool,
    /// Consent to restore the RDP listener's port when it differs from the port the VM is
    /// probed on (`PortChanged`): `PortNumber` and the `RemoteDesktop-UserMode-In-TCP`
    /// firewall rule are set back to the probed port and TermService is restarted. Off: the
    /// changed port is reported with both ports.
    #[serde(default)]
    pub restore_rdp_port: bool,
    /// Enables the ResetPassword rung: the generated password is written to a Secret only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_reset: Option<PasswordResetSpec>,
    /// An incremental OS-disk snapshot before every in-guest write and disruptive rung, and
    /// how many the operator keeps.
    #[serde(default)]
    pub snapshots: SnapshotSpec,
}

impl Default for RemediationSpec {
    fn default() -> Self {
        Self {
            mode: RemediationMode::default(),
            ladder: default_ladder(),
            allowed_disruptive_actions: Vec::new(),
            backoff: BackoffSpec::default(),
            settle_time: default_settle_time(),
            max_attempts_per_rung: default_max_attempts(),
            max_ladders_per_day: default_max_ladders(),
            cooldown: default_cooldown(),
            maintenance_windows: Vec::new(),
            allow_start: false,
            nsg_repair: NsgRepairSpec::default(),
            allow_insecure_listener_settings: false,
            allow_legacy_tls: false,
            restore_rdp_port: false,
            password_reset: None,
            snapshots: SnapshotSpec::default(),
        }
    }
}

fn default_ladder() -> Vec<Rung> {
    Rung::DEFAULT_LADDER.to_vec()
}
fn default_settle_time() -> String {
    "2m".into()
}
fn default_max_attempts() -> u32 {
    1
}
fn default_max_ladders() -> u32 {
    3
}
fn default_cooldown() -> String {
    "1h".into()
}

/// The lifecycle phase shown by `kubectl get rdph`.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Not enough probes yet to decide.
    Pending,
    /// Reachable, no failing probes and the certificate is fine.
    Healthy,
    /// Reachable, but probes started failing or the certificate needs attention.
    Degraded,
    /// Unreachable for at least `failureThreshold` consecutive probes.
    Unreachable,
    /// `spec.suspend` is true.
    Suspended,
    /// The spec is invalid; fix it to resume.
    Invalid,
    /// Unreachable; gathering read-only evidence before deciding.
    Diagnosing,
    /// A remediation rung is in flight or the ladder waits between rungs.
    Remediating,
    /// Reachable again after a rung fixed it (until the next healthy probe cycle).
    Recovered,
    /// Every usable rung was tried; the ladder waits for a person or for recovery.
    Exhausted,
}

impl Phase {
    /// Every phase, in a stable order (metric label pre-registration).
    pub const ALL: [Phase; 10] = [
        Self::Pending,
        Self::Healthy,
        Self::Degraded,
        Self::Unreachable,
        Self::Suspended,
        Self::Invalid,
        Self::Diagnosing,
        Self::Remediating,
        Self::Recovered,
        Self::Exhausted,
    ];

    /// The phase name as written to status.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "Pending",
            Self::Healthy => "Healthy",
            Self::Degraded => "Degraded",
            Self::Unreachable => "Unreachable",
            Self::Suspended => "Suspended",
            Self::Invalid => "Invalid",
            Self::Diagnosing => "Diagnosing",
            Self::Remediating => "Remediating",
            Self::Recovered => "Recovered",
            Self::Exhausted => "Exhausted",
        }
    }
}

/// What the operator observed, written by server-side apply under `rdphealth-operator`.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RdpHealthStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Summary: Pending, Healthy, Degraded, Unreachable, Suspended or Invalid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// `Reachable`, `Healthy`, `Valid` and `CertificateValid`; `lastTransitionTime` moves only
    /// when a condition's status flips.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "conditions_schema")]
    pub conditions: Vec<Condition>,
    /// The most recent probe, as last written. A probe that changes nothing but this probe's
    /// time and latency is not written: while a VM stays healthy and unchanged, this is
    /// refreshed at least every 10 minutes (the status heartbeat), so `time` may be up to
    /// 10 minutes plus one probe interval old. Any change (a failed probe, another protocol,
    /// TLS version or certificate, a condition) is written at once. Every probe is counted in
    /// the `rdphealth_probe_duration_seconds` metric.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_probe: Option<LastProbe>,
    /// Failed probes in a row (0 after a success).
    #[serde(default)]
    pub consecutive_failures: u32,
    /// Successful probes in a row (0 after a failure), as of the last write: like
    /// `lastProbe`, it is refreshed with the status heartbeat while nothing else changes.
    #[serde(default)]
    pub consecutive_successes: u32,
    /// When `Reachable` last became False.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_to_unreachable: Option<Time>,
    /// The endpoint that was probed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<ResolvedEndpoint>,
    /// Results of the last probes, oldest first (`1` reachable, `0` not; at most 20): what
    /// flapping is judged from. Written with every failed probe; further successes are
    /// written with the next change or the status heartbeat.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub recent_probes: String,
    /// The read-only evidence of the current incident.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diagnosis: Option<Evidence>,
    /// The remediation ladder: the rung in flight (recorded before its Azure call), backoff,
    /// budgets and history.
    #[serde(default, skip_serializing_if = "LadderStatus::is_empty")]
    pub ladder: LadderStatus,
    /// Whom the endpoint answered as, from the last identity step (NTLM CHALLENGE).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<IdentityStatus>,
    /// With shards across replicas (`--shards`): the replica that wrote this status (it held
    /// the object's shard then). Absent with a single leader.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_by: Option<String>,
}

/// The computer behind the endpoint, from the server's NTLM CHALLENGE (no credentials used).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct IdentityStatus {
    /// When the identity step ran.
    pub observed_at: Time,
    /// The endpoint it ran against (`host:port`).
    pub endpoint: String,
    /// NetBIOS computer name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub computer_name: Option<String>,
    /// DNS computer name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_name: Option<String>,
    /// NetBIOS domain (the computer name on a workgroup server).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    /// DNS domain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_domain: Option<String>,
    /// OS version from the NTLM Version field (`major.minor.build`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub os_version: Option<String>,
    /// Server clock minus the operator's clock, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock_skew_seconds: Option<i64>,
    /// `required`, `not_required`, `offered` or `not_offered`.
    pub credssp: String,
    /// The name it had to answer as (`osProfile.computerName`), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_name: Option<String>,
    /// Whether it answered as `expectedName` (absent when there was nothing to compare).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matches: Option<bool>,
}

/// The outcome of one probe.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LastProbe {
    /// When the probe finished.
    pub time: MicroTime,
    /// Whether the RDP handshake (and TLS, when selected) succeeded.
    pub reachable: bool,
    /// Why it failed: the prober's bounded reason, e.g. `tcp_timeout`, `tls_handshake_failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_reason: Option<String>,
    /// Details of the failure, for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// How long the probe took, in milliseconds.
    pub latency_ms: u64,
    /// The security protocol the server selected: `rdp`, `ssl`, `hybrid`, ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selected_protocol: Option<String>,
    /// The negotiated TLS version, e.g. `TLSv1.2`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_version: Option<String>,
    /// End of validity of the server certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_not_after: Option<Time>,
}

/// Where the endpoint came from.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndpointSource {
    /// `spec.endpoint.host`.
    Spec,
    /// Resolved from the VM's network interface in Azure.
    Azure,
}

/// The probed endpoint.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ResolvedEndpoint {
    /// Host name or IP address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Where `host` came from.
    pub source: EndpointSource,
    /// The VM's computer name (`osProfile.computerName`), read from Azure with the address:
    /// the name the endpoint must answer as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub computer_name: Option<String>,
}

/// Conditions as a list-map keyed by `type`, so server-side apply merges them per type.
pub(crate) fn conditions_schema(generator: &mut SchemaGenerator) -> Schema {
    let item = generator.subschema_for::<Condition>();
    json_schema!({
        "type": "array",
        "x-kubernetes-list-type": "map",
        "x-kubernetes-list-map-keys": ["type"],
        "items": item,
    })
}

/// Errors of CRD rendering.
#[derive(Debug, thiserror::Error)]
pub enum CrdError {
    /// The CRD could not be serialised.
    #[error("failed to render the CRD as YAML")]
    Render(#[source] serde_saphyr::ser::Error),
}

impl CrdError {
    /// PascalCase reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Render(_) => "CrdRenderFailed",
        }
    }
}

/// The CRD as YAML: exactly what `crds/rdphealths.rdphealth.io.yaml` holds.
pub fn crd_yaml() -> Result<String, CrdError> {
    serde_saphyr::to_string(&RdpHealth::crd()).map_err(CrdError::Render)
}
