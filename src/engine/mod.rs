//! The engine: pure decisions from (object, observation, now) to (status, events, next look).
//!
//! Drivers (the Kubernetes controller, the in-memory demo) call [`schedule`] first, probe when
//! it says so, then hand the result to [`evaluate`] and persist what comes back. Nothing here
//! touches the network or a Kubernetes client.

pub mod conditions;
pub mod endpoint;
pub mod gather;
pub mod identity;
pub mod remediate;
pub mod schedule;
pub mod spec;
pub mod thresholds;
pub mod writes;

use std::time::Duration;

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{MicroTime, Time},
    jiff::Timestamp,
};

pub use self::{
    conditions::{Desired, Status},
    endpoint::{AzureResolver, EndpointResolver, HostOverride, ResolveError, ResolverPolicy},
    schedule::{Schedule, ladder_due, probe_due_at, schedule},
    spec::{ProbePolicy, SpecError, ValidSpec, VmId},
    thresholds::{Streak, Thresholds},
};
use crate::{
    api::{
        IdentityStatus, LastProbe, Phase, RdpHealth, RdpHealthStatus, ResolvedEndpoint,
        conditions as types, reasons,
    },
    probe::{Finding, ProbeReport},
};

/// A failed address lookup is retried no sooner than this.
const MIN_LOOKUP_RETRY: Duration = Duration::from_secs(30);

/// What the driver observed for an object.
#[derive(Debug, Clone)]
pub enum Observation {
    /// Nothing was probed: the schedule said to report only (invalid spec, suspended).
    NotProbed,
    /// The endpoint could not be resolved, so nothing was probed.
    Unresolved(ResolveError),
    /// A probe ran against `endpoint`.
    Probed {
        /// The probed endpoint.
        endpoint: ResolvedEndpoint,
        /// What the prober found.
        report: Box<ProbeReport>,
    },
}

/// Severity of an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// Informational.
    Normal,
    /// Needs attention.
    Warning,
}

/// An event to publish about the object (only on transitions).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Severity.
    pub severity: Severity,
    /// PascalCase reason.
    pub reason: &'static str,
    /// What happened, for people.
    pub note: String,
}

/// When to look at the object again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// After this long.
    Requeue(Duration),
    /// Only when the object changes.
    AwaitChange,
}

/// The engine's verdict for one object.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// The complete new status.
    pub status: RdpHealthStatus,
    /// Events to publish, in order.
    pub events: Vec<Event>,
    /// When to look again.
    pub next: Next,
}

/// The engine entry point: the new status of `obj`, the events to publish and when to look
/// again, given what was observed at `now`.
pub fn evaluate(obj: &RdpHealth, observation: Observation, now: Timestamp) -> Outcome {
    let mut step = Step::new(obj, now);
    let next = match ValidSpec::try_from(&obj.spec) {
        Err(e) => step.invalid(&e),
        Ok(spec) => {
            step.valid();
            step.legacy_tls(spec.ladder.allow_legacy_tls);
            if spec.suspend {
                step.suspended()
            } else {
                match observation {
                    Observation::NotProbed => Next::Requeue(spec.probe.interval),
                    Observation::Unresolved(e) => step.unresolved(&spec, &e),
                    Observation::Probed { report, .. } if report.prober_failed() => {
                        step.blind(&spec, &report)
                    }
                    Observation::Probed { endpoint, report } => {
                        step.prober_ready();
                        step.probed(&spec, endpoint, &report)
                    }
                }
            }
        }
    };
    step.finish(next)
}

/// The verdict for an object whose namespace may not name its VM (the operator's tenancy
/// policy): `Valid=False` saying why; nothing is probed and nothing is asked of Azure.
pub fn refuse(obj: &RdpHealth, why: String, now: Timestamp) -> Outcome {
    let mut step = Step::new(obj, now);
    let next = step.invalid(&SpecError::OutsideTenancyScope(why));
    step.finish(next)
}

/// One evaluation in progress.
struct Step {
    status: RdpHealthStatus,
    generation: Option<i64>,
    events: Vec<Event>,
    now: Timestamp,
}

impl Step {
    fn new(obj: &RdpHealth, now: Timestamp) -> Self {
        Self {
            status: obj.status.clone().unwrap_or_default(),
            generation: obj.metadata.generation,
            events: Vec::new(),
            now,
        }
    }

    fn set(&mut self, desired: Desired) -> Option<Status> {
        conditions::merge(
            &mut self.status.conditions,
            desired,
            self.generation,
            self.now,
        )
    }

    fn emit(&mut self, severity: Severity, reason: &'static str, note: String) {
        self.events.push(Event {
            severity,
            reason,
            note,
        });
    }

    fn invalid(&mut self, error: &SpecError) -> Next {
        let message = error.to_string();
        let previous = self.set(Desired::new(
            types::VALID,
            Status::False,
            reasons::INVALID_SPEC,
            message.clone(),
        ));
        if previous != Some(Status::False) {
            self.emit(Severity::Warning, reasons::INVALID_SPEC, message);
        }
        self.set(Desired::new(
            types::HEALTHY,
            Status::Unknown,
            reasons::INVALID_SPEC,
            "the spec is invalid; see the Valid condition",
        ));
        self.status.phase = Some(Phase::Invalid);
        Next::AwaitChange
    }

    fn valid(&mut self) {
        self.set(Desired::new(
            types::VALID,
            Status::True,
            reasons::SPEC_VALID,
            "the spec is valid",
        ));
    }

    /// The legacy-TLS opt-in is a security finding while it is on: a condition, and a
    /// Warning Event when it turns on.
    fn legacy_tls(&mut self, allowed: bool) {
        let shown = conditions::status_of(&self.status.conditions, types::LEGACY_TLS_ALLOWED);
        if allowed {
            let message = "remediation.allowLegacyTls is on: EnableTls12 also enables the TLS 1.0 and 1.1 server protocols for legacy clients, which weakens RDP security";
            let previous = self.set(Desired::new(
                types::LEGACY_TLS_ALLOWED,
                Status::True,
                "LegacyTlsAllowed",
                message,
            ));
            if previous != Some(Status::True) {
                self.emit(Severity::Warning, "LegacyTlsAllowed", message.to_owned());
            }
        } else if shown == Some(Status::True) {
            self.set(Desired::new(
                types::LEGACY_TLS_ALLOWED,
                Status::False,
                "LegacyTlsNotAllowed",
                "remediation.allowLegacyTls is off: TLS 1.0 and 1.1 are never enabled",
            ));
        }
    }

    fn suspended(&mut self) -> Next {
        self.set(Desired::new(
            types::HEALTHY,
            Status::Unknown,
            reasons::SUSPENDED,
            "monitoring is suspended (spec.suspend)",
        ));
        self.status.phase = Some(Phase::Suspended);
        Next::AwaitChange
    }

    /// The prober could not probe (its own error): the VM's conditions, streaks and last probe
    /// stay as they were, so nothing downstream takes it for a VM failure.
    fn blind(&mut self, spec: &ValidSpec, report: &ProbeReport) -> Next {
        let detail = report
            .failure
            .as_ref()
            .map_or_else(String::new, |f| f.detail.clone());
        let message = format!(
            "the operator's prober failed locally ({detail}); the VM's state is unknown and no action is taken"
        );
        let previous = self.set(Desired::new(
            types::PROBER_READY,
            Status::False,
            reasons::PROBER_ERROR,
            message.clone(),
        ));
        if previous != Some(Status::False) {
            self.emit(Severity::Warning, reasons::PROBER_ERROR, message);
        }
        Next::Requeue(spec.probe.unhealthy_interval)
    }

    /// A probe ran: clears an earlier `ProberReady=False` (the condition is only added once
    /// the prober has failed).
    fn prober_ready(&mut self) {
        if conditions::find(&self.status.conditions, types::PROBER_READY).is_some() {
            self.set(Desired::new(
                types::PROBER_READY,
                Status::True,
                reasons::PROBE_COMPLETED,
                "the prober probed this endpoint",
            ));
        }
    }

    fn unresolved(&mut self, spec: &ValidSpec, error: &ResolveError) -> Next {
        let message = error.to_string();
        self.set(Desired::new(
            types::REACHABLE,
            Status::Unknown,
            error.reason(),
            message.clone(),
        ));
        self.set(Desired::new(
            types::HEALTHY,
            Status::Unknown,
            error.reason(),
            message,
        ));
        self.status.endpoint = None;
        self.status.phase = Some(Phase::Pending);
        if error.needs_object_change() {
            Next::AwaitChange
        } else {
            Next::Requeue(spec.probe.unhealthy_interval.max(MIN_LOOKUP_RETRY))
        }
    }

    fn probed(
        &mut self,
        spec: &ValidSpec,
        endpoint: ResolvedEndpoint,
        report: &ProbeReport,
    ) -> Next {
        // Drivers judge the report already; judging again keeps a wrong host sticky for any
        // driver. Only a plain success on an endpoint recorded as wrong changes (and is cloned).
        let judged;
        let report = if report.reachable
            && report.nla.is_none()
            && self
                .status
                .identity
                .as_ref()
                .is_some_and(|i| i.matches == Some(false))
        {
            judged = identity::judge(Some(&self.status), &endpoint, report.clone());
            &judged
        } else {
            report
        };
        let policy = spec.probe;
        let streak = Streak {
            failures: self.status.consecutive_failures,
            successes: self.status.consecutive_successes,
        }
        .after(report.reachable);
        let before = match conditions::find(&self.status.conditions, types::REACHABLE) {
            Some(c) if c.reason == reasons::ENDPOINT_UNRESOLVED => Status::Unknown,
            _ => conditions::status_of(&self.status.conditions, types::REACHABLE)
                .unwrap_or(Status::Unknown),
        };
        let thresholds = Thresholds {
            failure: policy.failure_threshold,
            success: policy.success_threshold,
        };
        let reachable = thresholds::reachable_after(before, streak, thresholds);
        let where_ = format!("{}:{}", endpoint.host, endpoint.port);
        self.set(reachable_condition(
            reachable, streak, thresholds, report, &where_,
        ));
        match (before, reachable) {
            (Status::True | Status::Unknown, Status::False) => {
                self.status.last_transition_to_unreachable = Some(Time(self.now));
                let why = failure_text(report);
                self.emit(
                    Severity::Warning,
                    reasons::BECAME_UNREACHABLE,
                    format!(
                        "{where_} is unreachable after {} failed probes: {why}",
                        streak.failures
                    ),
                );
            }
            (Status::False, Status::True) => self.emit(
                Severity::Normal,
                reasons::RECOVERED,
                format!(
                    "{where_} answers RDP again after {} successful probes",
                    streak.successes
                ),
            ),
            _ => {}
        }
        if report.reachable {
            self.certificate(certificate_condition(report));
        }
        self.status.last_probe = Some(last_probe(report, self.now));
        self.status.consecutive_failures = streak.failures;
        self.status.consecutive_successes = streak.successes;
        let before = self.status.identity.take();
        self.status.identity = identity::observed(before.as_ref(), &endpoint, report, self.now);
        self.identity_conditions(before.as_ref());
        self.status.endpoint = Some(endpoint);
        let certificate_ok =
            conditions::status_of(&self.status.conditions, types::CERTIFICATE_VALID)
                != Some(Status::False);
        let phase = match reachable {
            Status::False => Phase::Unreachable,
            Status::Unknown => Phase::Pending,
            Status::True if streak.failures > 0 || !certificate_ok => Phase::Degraded,
            Status::True => Phase::Healthy,
        };
        self.status.phase = Some(phase);
        self.set(healthy_condition(phase, streak, &self.status));
        Next::Requeue(policy.interval_after(streak.failures, reachable == Status::False))
    }

    /// `HostIdentity` and `NlaRequired` from `status.identity`; a new wrong host, NLA turned
    /// off or a clock skew appearing is an event.
    fn identity_conditions(&mut self, before: Option<&IdentityStatus>) {
        let Some(id) = self.status.identity.clone() else {
            return;
        };
        let name = id.computer_name.as_deref().or(id.dns_name.as_deref());
        let host = match (id.matches, name) {
            (Some(false), _) => Desired::new(
                types::HOST_IDENTITY,
                Status::False,
                reasons::WRONG_HOST,
                identity::wrong_host_message(&id),
            ),
            (Some(true), Some(name)) => Desired::new(
                types::HOST_IDENTITY,
                Status::True,
                reasons::HOST_VERIFIED,
                format!("{} answered as {name}, the VM's computer name", id.endpoint),
            ),
            (_, Some(name)) => Desired::new(
                types::HOST_IDENTITY,
                Status::True,
                reasons::IDENTITY_READ,
                format!(
                    "{} answered as {name}; the VM's computer name is not known to compare",
                    id.endpoint
                ),
            ),
            (_, None) => Desired::new(
                types::HOST_IDENTITY,
                Status::Unknown,
                reasons::IDENTITY_UNKNOWN,
                format!(
                    "the identity of {} is not known (CredSSP {})",
                    id.endpoint, id.credssp
                ),
            ),
        };
        let message = host.message.clone();
        let wrong = host.status == Status::False;
        if self.set(host) != Some(Status::False) && wrong {
            self.emit(Severity::Warning, reasons::WRONG_HOST, message);
        }
        let nla = match id.credssp.as_str() {
            "required" => Desired::new(
                types::NLA_REQUIRED,
                Status::True,
                reasons::NLA_REQUIRED,
                "the server requires Network Level Authentication",
            ),
            "offered" => Desired::new(
                types::NLA_REQUIRED,
                Status::Unknown,
                reasons::IDENTITY_UNKNOWN,
                "the server offers CredSSP; whether it requires it could not be told",
            ),
            other => Desired::new(
                types::NLA_REQUIRED,
                Status::False,
                reasons::NLA_DISABLED,
                format!(
                    "clients can connect without Network Level Authentication (CredSSP {other}); Microsoft recommends requiring it"
                ),
            ),
        };
        let message = nla.message.clone();
        let disabled = nla.status == Status::False;
        if self.set(nla) != Some(Status::False) && disabled {
            self.emit(Severity::Warning, reasons::NLA_DISABLED, message);
        }
        let limit = i64::try_from(crate::probe::DEFAULT_MAX_CLOCK_SKEW.as_secs()).unwrap_or(300);
        let skewed = |i: &IdentityStatus| i.clock_skew_seconds.is_some_and(|s| s.abs() > limit);
        if skewed(&id) && !before.is_some_and(skewed) {
            self.emit(
                Severity::Warning,
                reasons::CLOCK_SKEW,
                format!(
                    "the clock of {} is off by {} s: NLA logons fail beyond {limit} s",
                    id.endpoint,
                    id.clock_skew_seconds.unwrap_or_default()
                ),
            );
        }
    }

    /// Sets `CertificateValid`; a new problem (not the one already reported) is an event.
    fn certificate(&mut self, desired: Desired) {
        let before = conditions::find(&self.status.conditions, types::CERTIFICATE_VALID)
            .map(|c| (c.status.clone(), c.reason.clone()));
        let is_new_problem = desired.status == Status::False
            && before.as_ref().is_none_or(|(status, reason)| {
                status != Status::False.as_str() || *reason != desired.reason
            });
        if is_new_problem {
            let reason = certificate_event_reason(&desired.reason);
            self.emit(Severity::Warning, reason, desired.message.clone());
        }
        self.set(desired);
    }

    fn finish(mut self, next: Next) -> Outcome {
        self.status.observed_generation = self.generation;
        conditions::stamp_generation(&mut self.status.conditions, self.generation);
        Outcome {
            status: self.status,
            events: self.events,
            next,
        }
    }
}

fn reachable_condition(
    reachable: Status,
    streak: Streak,
    thresholds: Thresholds,
    report: &ProbeReport,
    where_: &str,
) -> Desired {
    let (reason, message) = match reachable {
        Status::True => {
            let protocol = report
                .selected_protocol
                .map_or("unknown protocol", |p| p.as_str());
            (
                reasons::REACHABLE.to_string(),
                format!("{where_} answers RDP ({protocol})"),
            )
        }
        Status::False if report.reachable => (
            reasons::RECOVERING.to_string(),
            format!(
                "{} of {} successful probes needed to count as reachable again",
                streak.successes, thresholds.success
            ),
        ),
        Status::False => (failure_reason(report), failure_text(report)),
        Status::Unknown if streak.failures > 0 => (
            reasons::AWAITING_PROBES.to_string(),
            format!(
                "{} of {} failed probes before counting as unreachable: {}",
                streak.failures,
                thresholds.failure,
                failure_text(report)
            ),
        ),
        Status::Unknown => (
            reasons::AWAITING_PROBES.to_string(),
            "no probe has finished yet".to_string(),
        ),
    };
    Desired::new(types::REACHABLE, reachable, reason, message)
}

fn failure_reason(report: &ProbeReport) -> String {
    report.failure.as_ref().map_or_else(
        || reasons::UNREACHABLE.to_string(),
        |f| pascal(f.reason.as_str()),
    )
}

fn failure_text(report: &ProbeReport) -> String {
    report.failure.as_ref().map_or_else(
        || "probe failed".to_string(),
        |f| format!("{}: {}", f.reason.as_str(), f.detail),
    )
}

fn certificate_condition(report: &ProbeReport) -> Desired {
    let not_after = report
        .certificate()
        .map_or_else(String::new, |c| c.not_after.clone());
    let finding = report.findings.iter().find_map(|f| match f {
        Finding::CertificateExpired => Some((
            reasons::CERTIFICATE_EXPIRED,
            format!("the RDP certificate expired at {not_after}"),
        )),
        Finding::CertificateNotYetValid => Some((
            reasons::CERTIFICATE_NOT_YET_VALID,
            "the RDP certificate is not valid yet".to_string(),
        )),
        Finding::CertificateExpiring { days_left } => Some((
            reasons::CERTIFICATE_EXPIRING,
            format!("the RDP certificate expires at {not_after} ({days_left} days left)"),
        )),
        Finding::CertificateUnreadable => Some((
            reasons::CERTIFICATE_UNREADABLE,
            "the server's certificate could not be read".to_string(),
        )),
        Finding::LegacyRdpSecurity => Some((
            reasons::LEGACY_RDP_SECURITY,
            "the server refused TLS and CredSSP (SSL_NOT_ALLOWED_BY_SERVER) and accepts only standard RDP security (SecurityLayer=0): clients connect without TLS or Network Level Authentication; set SecurityLayer back to 2".to_string(),
        )),
        Finding::NoTls
        | Finding::NlaDisabled
        | Finding::ClockSkew { .. }
        | Finding::CertificateNameMismatch { .. } => None,
    });
    match (finding, &report.tls) {
        (Some((reason, message)), _) => {
            Desired::new(types::CERTIFICATE_VALID, Status::False, reason, message)
        }
        (None, None) => Desired::new(
            types::CERTIFICATE_VALID,
            Status::Unknown,
            reasons::NO_TLS,
            "the server selected standard RDP security: no TLS certificate to check",
        ),
        (None, Some(_)) => Desired::new(
            types::CERTIFICATE_VALID,
            Status::True,
            reasons::CERTIFICATE_VALID,
            format!("the RDP certificate is valid until {not_after}"),
        ),
    }
}

fn certificate_event_reason(condition_reason: &str) -> &'static str {
    match condition_reason {
        reasons::CERTIFICATE_EXPIRED => reasons::CERTIFICATE_EXPIRED,
        reasons::CERTIFICATE_NOT_YET_VALID => reasons::CERTIFICATE_NOT_YET_VALID,
        reasons::CERTIFICATE_UNREADABLE => reasons::CERTIFICATE_UNREADABLE,
        reasons::LEGACY_RDP_SECURITY => reasons::LEGACY_RDP_SECURITY,
        _ => reasons::CERTIFICATE_EXPIRING,
    }
}

fn healthy_condition(phase: Phase, streak: Streak, status: &RdpHealthStatus) -> Desired {
    let certificate = conditions::find(&status.conditions, types::CERTIFICATE_VALID);
    match phase {
        Phase::Healthy => Desired::new(
            types::HEALTHY,
            Status::True,
            reasons::HEALTHY,
            "reachable over RDP",
        ),
        Phase::Degraded if streak.failures > 0 => Desired::new(
            types::HEALTHY,
            Status::False,
            reasons::PROBES_FAILING,
            format!("{} probes failed in a row", streak.failures),
        ),
        Phase::Degraded => Desired::new(
            types::HEALTHY,
            Status::False,
            certificate.map_or(reasons::CERTIFICATE_EXPIRING.to_string(), |c| {
                c.reason.clone()
            }),
            certificate.map_or_else(String::new, |c| c.message.clone()),
        ),
        Phase::Unreachable | Phase::Diagnosing | Phase::Remediating | Phase::Exhausted => {
            Desired::new(
                types::HEALTHY,
                Status::False,
                reasons::UNREACHABLE,
                "not reachable over RDP; see the Reachable condition",
            )
        }
        Phase::Recovered => Desired::new(
            types::HEALTHY,
            Status::True,
            reasons::HEALTHY,
            "reachable over RDP again",
        ),
        Phase::Pending | Phase::Suspended | Phase::Invalid => Desired::new(
            types::HEALTHY,
            Status::Unknown,
            reasons::AWAITING_PROBES,
            "not enough probes yet",
        ),
    }
}

fn last_probe(report: &ProbeReport, now: Timestamp) -> LastProbe {
    LastProbe {
        time: MicroTime(now),
        reachable: report.reachable,
        failure_reason: report
            .failure
            .as_ref()
            .map(|f| f.reason.as_str().to_string()),
        message: report.failure.as_ref().map(|f| f.detail.clone()),
        latency_ms: millis(report.total_ms),
        selected_protocol: report.selected_protocol.map(|p| p.as_str().to_string()),
        tls_version: report.tls.as_ref().map(|t| t.version.clone()),
        certificate_not_after: report
            .certificate()
            .and_then(|c| Timestamp::from_second(c.not_after_unix).ok())
            .map(Time),
    }
}

fn millis(ms: f64) -> u64 {
    if ms.is_finite() && ms > 0.0 {
        // Probes are bounded by their timeout, far below u64::MAX milliseconds.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let rounded = ms.round() as u64;
        rounded
    } else {
        0
    }
}

/// `tcp_timeout` → `TcpTimeout`: prober reasons as condition and event reasons.
pub fn pascal(snake: &str) -> String {
    snake
        .split('_')
        .map(|word| {
            let mut chars = word.chars();
            match chars.next() {
                Some(first) => first.to_ascii_uppercase().to_string() + chars.as_str(),
                None => String::new(),
            }
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod testing;

#[cfg(test)]
mod tests;
