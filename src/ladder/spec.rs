//! The ladder's settings in the `RdpHealth` spec and their validated form.

use std::time::Duration;

use k8s_openapi::jiff::{Timestamp, civil::Weekday, tz::TimeZone};
use kube::KubeSchema;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::rung::Rung;
use crate::evidence::exposure::{self, Coverage, ExposureLimit};

/// Backoff between rung attempts: `initial × multiplier^(n-1)`, capped at `max`, plus up to
/// `jitter` × that delay of deterministic jitter.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct BackoffSpec {
    /// Delay after the first failed attempt, e.g. `1m`.
    #[serde(default = "default_backoff_initial")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h|d))+$"))]
    pub initial: String,
    /// Largest delay, e.g. `30m`.
    #[serde(default = "default_backoff_max")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h|d))+$"))]
    pub max: String,
    /// Growth factor per attempt (1–10).
    #[serde(default = "default_backoff_multiplier")]
    #[schemars(range(min = 1.0, max = 10.0))]
    pub multiplier: f64,
    /// Extra random-looking delay as a fraction of the delay (0–1).
    #[serde(default = "default_backoff_jitter")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub jitter: f64,
}

impl Default for BackoffSpec {
    fn default() -> Self {
        Self {
            initial: default_backoff_initial(),
            max: default_backoff_max(),
            multiplier: default_backoff_multiplier(),
            jitter: default_backoff_jitter(),
        }
    }
}

fn default_backoff_initial() -> String {
    "1m".into()
}
fn default_backoff_max() -> String {
    "30m".into()
}
fn default_backoff_multiplier() -> f64 {
    2.0
}
fn default_backoff_jitter() -> f64 {
    0.1
}

/// A weekly window (UTC) inside which disruptive rungs may run.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct MaintenanceWindow {
    /// Days of the week (`Mon` … `Sun`); empty means every day.
    #[serde(default)]
    pub days: Vec<WeekdayName>,
    /// Start time of day in UTC, `HH:MM`.
    #[schemars(regex(pattern = r"^([01][0-9]|2[0-3]):[0-5][0-9]$"))]
    pub start: String,
    /// Length of the window, e.g. `4h`.
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h|d))+$"))]
    pub duration: String,
}

/// A day of the week.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum WeekdayName {
    Mon,
    Tue,
    Wed,
    Thu,
    Fri,
    Sat,
    Sun,
}

impl WeekdayName {
    fn to_jiff(self) -> Weekday {
        match self {
            Self::Mon => Weekday::Monday,
            Self::Tue => Weekday::Tuesday,
            Self::Wed => Weekday::Wednesday,
            Self::Thu => Weekday::Thursday,
            Self::Fri => Weekday::Friday,
            Self::Sat => Weekday::Saturday,
            Self::Sun => Weekday::Sunday,
        }
    }
}

/// CEL: no entry names the whole internet.
const NOT_THE_INTERNET: &str = "self.all(p, !p.matches('^(?i)[ ]*([*]|any|internet)[ ]*$'))";
/// CEL: each IPv4 CIDR broader than the default limit (/16) is inside an RFC 1918 range. The
/// union of several entries is measured by the operator's validator, which CEL cannot do.
const NO_BROAD_PUBLIC_V4: &str = "self.all(p, !p.matches('^[0-9.]+/([0-9]|1[0-5])$') || p.matches('^10[.][0-9.]+/([89]|1[0-5])$') || p.matches('^172[.](1[6-9]|2[0-9]|3[01])[.][0-9.]+/1[2-5]$'))";
/// CEL: each IPv6 CIDR broader than the default limit (/32) is inside fc00::/7.
const NO_BROAD_PUBLIC_V6: &str = "self.all(p, !p.matches('^[0-9A-Fa-f:.]*:[0-9A-Fa-f:.]*/([0-9]|[12][0-9]|3[01])$') || p.matches('^[Ff][CcDd][0-9A-Fa-f]{0,2}:[0-9A-Fa-f:.]*/([7-9]|[12][0-9]|3[01])$'))";

/// Opt-in NSG repair: add an inbound allow rule for RDP from these prefixes only.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct NsgRepairSpec {
    /// Enables the `RepairNsg` rung.
    #[serde(default)]
    pub enabled: bool,
    /// Source addresses or CIDRs the added rule allows. Together they may cover at most a /16
    /// of public IPv4 and a /32 of public IPv6 (private ranges do not count; the operator may
    /// set a stricter limit); `*`, `Any` and `Internet` are refused.
    #[serde(default)]
    #[schemars(length(max = 64), inner(length(max = 64)))]
    #[x_kube(
        validation = Rule::new(NOT_THE_INTERNET).message("allowedSourcePrefixes must not name the whole internet (*, Any, Internet)"),
        validation = Rule::new(NO_BROAD_PUBLIC_V4).message("allowedSourcePrefixes: an IPv4 CIDR broader than /16 must lie inside 10.0.0.0/8, 172.16.0.0/12 or 192.168.0.0/16"),
        validation = Rule::new(NO_BROAD_PUBLIC_V6).message("allowedSourcePrefixes: an IPv6 CIDR broader than /32 must lie inside fc00::/7"),
    )]
    pub allowed_source_prefixes: Vec<String>,
}

/// Opt-in password reset through VMAccess.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct PasswordResetSpec {
    /// The local administrator account to reset (created if missing).
    pub username: String,
    /// Name of the Secret (same namespace) that receives the generated password: under
    /// `pendingPassword` before it is sent to Azure, under `password` once Azure confirmed
    /// the reset. The password never appears in status, Events or logs.
    pub secret_name: String,
}

/// Why the ladder settings are invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LadderSpecError {
    /// A duration does not parse.
    #[error("remediation.{field} {value:?} is not a duration such as 30s, 1m or 1h30m")]
    Duration {
        /// Field path.
        field: &'static str,
        /// The value.
        value: String,
    },
    /// A number is out of range.
    #[error("remediation.{field} is out of range: {why}")]
    Range {
        /// Field path.
        field: &'static str,
        /// What is wrong.
        why: String,
    },
    /// A rung appears twice or is not allowed in the ladder.
    #[error("remediation.ladder: {0}")]
    Ladder(String),
    /// The NSG repair would open RDP too widely.
    #[error("remediation.nsgRepair.allowedSourcePrefixes: {0}")]
    NsgRepair(String),
    /// The password reset names an invalid account or Secret.
    #[error("remediation.passwordReset.{field}: {why}")]
    PasswordReset {
        /// Field.
        field: &'static str,
        /// What is wrong.
        why: String,
    },
    /// A maintenance window is malformed.
    #[error("remediation.maintenanceWindows[{index}]: {why}")]
    Window {
        /// Index in the list.
        index: usize,
        /// What is wrong.
        why: String,
    },
}

/// Validated backoff.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// First delay.
    pub initial: Duration,
    /// Cap.
    pub max: Duration,
    /// Growth factor (≥ 1).
    pub multiplier: f64,
    /// Jitter fraction (0–1).
    pub jitter: f64,
}

impl Backoff {
    /// The delay before the next action after `failures` failed attempts (≥ 1), without
    /// jitter: monotone in `failures` and never above `max`.
    pub fn base_delay(&self, failures: u32) -> Duration {
        let exponent = failures.saturating_sub(1).min(64);
        let factor = self.multiplier.powi(exponent as i32);
        let secs = self.initial.as_secs_f64() * factor;
        if !secs.is_finite() || secs >= self.max.as_secs_f64() {
            self.max
        } else {
            Duration::from_secs_f64(secs)
        }
    }

    /// The delay with deterministic jitter derived from `seed` (e.g. the object's UID), so
    /// replicas and restarts agree: in `[base, min(max, base × (1 + jitter))]`.
    pub fn delay(&self, failures: u32, seed: &str) -> Duration {
        let base = self.base_delay(failures);
        let fraction = unit_hash(seed, failures) * self.jitter;
        let jittered = base.as_secs_f64() * (1.0 + fraction);
        Duration::from_secs_f64(jittered.min(self.max.as_secs_f64()).max(base.as_secs_f64()))
    }
}

/// A number in [0, 1) from a stable hash (FNV-1a) of `seed` and `n`.
fn unit_hash(seed: &str, n: u32) -> f64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in seed.bytes().chain(n.to_le_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// A validated maintenance window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    days: Vec<Weekday>,
    start_minute: u32,
    length: Duration,
}

impl Window {
    /// Whether `now` is inside the window (a window may run past midnight).
    pub fn contains(&self, now: Timestamp) -> bool {
        let dt = now.to_zoned(TimeZone::UTC).datetime();
        let minute_of_day = u32::from(dt.hour() as u8) * 60 + u32::from(dt.minute() as u8);
        let length_min = (self.length.as_secs() / 60) as u32;
        // Check today's and the previous days' starts (windows can span days).
        let span_days = length_min / 1440 + 1;
        (0..=span_days).any(|back| {
            let start_day = dt.date().weekday().wrapping_sub(back as i64);
            let day_ok = self.days.is_empty() || self.days.contains(&start_day);
            let since_start =
                i64::from(minute_of_day) + i64::from(back) * 1440 - i64::from(self.start_minute);
            day_ok && since_start >= 0 && since_start < i64::from(length_min)
        })
    }
}

/// Parses a maintenance window.
pub fn parse_window(index: usize, w: &MaintenanceWindow) -> Result<Window, LadderSpecError> {
    let bad = |why: &str| LadderSpecError::Window {
        index,
        why: why.to_string(),
    };
    let (h, m) = w
        .start
        .split_once(':')
        .ok_or_else(|| bad("start must be HH:MM"))?;
    let (h, m): (u32, u32) = match (h.parse(), m.parse()) {
        (Ok(h), Ok(m)) if h < 24 && m < 60 => (h, m),
        _ => return Err(bad("start must be HH:MM (UTC)")),
    };
    let length = humantime::parse_duration(&w.duration)
        .map_err(|_| bad("duration must be a duration such as 4h"))?;
    if length < Duration::from_secs(60) || length > Duration::from_secs(7 * 86_400) {
        return Err(bad("duration must be between 1m and 7d"));
    }
    Ok(Window {
        days: w.days.iter().map(|d| d.to_jiff()).collect(),
        start_minute: h * 60 + m,
        length,
    })
}

/// Parses a ladder duration field.
pub fn parse_duration(field: &'static str, value: &str) -> Result<Duration, LadderSpecError> {
    humantime::parse_duration(value).map_err(|_| LadderSpecError::Duration {
        field,
        value: value.to_string(),
    })
}

/// Checks the ladder list: no duplicates, and rungs that need extra configuration have it.
pub fn check_ladder(
    ladder: &[Rung],
    password_reset: bool,
    nsg_repair: bool,
) -> Result<(), LadderSpecError> {
    for (i, rung) in ladder.iter().enumerate() {
        if ladder[..i].contains(rung) {
            return Err(LadderSpecError::Ladder(format!("{rung} appears twice")));
        }
        match rung {
            Rung::ResetPassword if !password_reset => {
                return Err(LadderSpecError::Ladder(
                    "ResetPassword needs remediation.passwordReset".into(),
                ));
            }
            Rung::RepairNsg | Rung::StartVm => {
                return Err(LadderSpecError::Ladder(format!(
                    "{rung} is not a ladder rung: it is enabled by {}",
                    if *rung == Rung::RepairNsg {
                        "nsgRepair.enabled"
                    } else {
                        "allowStart"
                    }
                )));
            }
            _ => {}
        }
        let _ = nsg_repair;
    }
    Ok(())
}

/// Checks that NSG repair prefixes are concrete addresses or CIDRs whose union covers no more
/// public address space than the operator's limit (by coverage, not by spelling:
/// `0.0.0.0/1` + `128.0.0.0/1` is refused like `*`).
pub fn check_nsg_repair(spec: &NsgRepairSpec, limit: ExposureLimit) -> Result<(), LadderSpecError> {
    if !spec.enabled {
        return Ok(());
    }
    if spec.allowed_source_prefixes.is_empty() {
        return Err(LadderSpecError::NsgRepair(
            "must list at least one source CIDR when nsgRepair is enabled".into(),
        ));
    }
    let coverage = Coverage::of(spec.allowed_source_prefixes.iter().map(String::as_str));
    if let Some(p) = coverage.internet.first() {
        return Err(LadderSpecError::NsgRepair(format!(
            "{p:?} would open RDP to the whole internet"
        )));
    }
    if let Some(p) = coverage.unresolved.first() {
        return Err(LadderSpecError::NsgRepair(format!(
            "{p:?} is not an IP address or CIDR"
        )));
    }
    if coverage.exceeds(limit) {
        return Err(LadderSpecError::NsgRepair(format!(
            "the prefixes together cover more public address space than {} and would open RDP to too much of the internet",
            limit.describe()
        )));
    }
    Ok(())
}

/// Checks the account (a Windows local user name) and the Secret name (a DNS subdomain).
pub fn check_password_reset(spec: &PasswordResetSpec) -> Result<(), LadderSpecError> {
    let user = &spec.username;
    let bad_user = |why: &str| LadderSpecError::PasswordReset {
        field: "username",
        why: format!("{user:?} {why}"),
    };
    if user.is_empty() || user.chars().count() > 20 {
        return Err(bad_user("must have 1-20 characters"));
    }
    if user
        .chars()
        .any(|c| c.is_control() || "\"/\\[]:;|=,+*?<>@".contains(c))
        || user.trim() != user
        || user.ends_with('.')
    {
        return Err(bad_user(
            "is not a Windows user name (no \"/\\[]:;|=,+*?<>@, no leading or trailing space, no trailing dot)",
        ));
    }
    let name = &spec.secret_name;
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if name.is_empty() || name.len() > 253 || !name.split('.').all(label_ok) {
        return Err(LadderSpecError::PasswordReset {
            field: "secretName",
            why: format!("{name:?} is not a valid Secret name (lower-case DNS subdomain)"),
        });
    }
    Ok(())
}

/// Validates the remediation settings into the policy `decide` trusts.
pub fn policy_from_spec(
    spec: &crate::api::RemediationSpec,
) -> Result<super::LadderPolicy, LadderSpecError> {
    use crate::api::RemediationMode;
    let mode = match spec.mode {
        RemediationMode::Observe => super::Mode::Observe,
        RemediationMode::DryRun => super::Mode::DryRun,
        RemediationMode::Auto => super::Mode::Auto,
    };
    check_ladder(
        &spec.ladder,
        spec.password_reset.is_some(),
        spec.nsg_repair.enabled,
    )?;
    check_nsg_repair(&spec.nsg_repair, exposure::configured())?;
    if let Some(p) = &spec.password_reset {
        check_password_reset(p)?;
    }
    for rung in &spec.allowed_disruptive_actions {
        if !rung.is_disruptive() {
            return Err(LadderSpecError::Ladder(format!(
                "allowedDisruptiveActions lists {rung}, which is not disruptive"
            )));
        }
    }
    let b = &spec.backoff;
    let backoff = Backoff {
        initial: parse_duration("backoff.initial", &b.initial)?,
        max: parse_duration("backoff.max", &b.max)?,
        multiplier: b.multiplier,
        jitter: b.jitter,
    };
    if backoff.initial.is_zero() || backoff.max < backoff.initial {
        return Err(LadderSpecError::Range {
            field: "backoff",
            why: "initial must be > 0 and max >= initial".into(),
        });
    }
    if !(1.0..=10.0).contains(&b.multiplier) || !(0.0..=1.0).contains(&b.jitter) {
        return Err(LadderSpecError::Range {
            field: "backoff",
            why: "multiplier must be 1-10 and jitter 0-1".into(),
        });
    }
    if !(1..=3).contains(&spec.max_attempts_per_rung) {
        return Err(LadderSpecError::Range {
            field: "maxAttemptsPerRung",
            why: format!("{} is not in 1-3", spec.max_attempts_per_rung),
        });
    }
    if !(1..=24).contains(&spec.max_ladders_per_day) {
        return Err(LadderSpecError::Range {
            field: "maxLaddersPerDay",
            why: format!("{} is not in 1-24", spec.max_ladders_per_day),
        });
    }
    let windows = spec
        .maintenance_windows
        .iter()
        .enumerate()
        .map(|(i, w)| parse_window(i, w))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(super::LadderPolicy {
        mode,
        ladder: spec.ladder.clone(),
        allowed_disruptive: spec.allowed_disruptive_actions.clone(),
        backoff,
        settle_time: parse_duration("settleTime", &spec.settle_time)?,
        max_attempts_per_rung: spec.max_attempts_per_rung,
        max_ladders_per_day: spec.max_ladders_per_day,
        cooldown: parse_duration("cooldown", &spec.cooldown)?,
        windows,
        allow_start: spec.allow_start,
        nsg_repair: spec.nsg_repair.enabled,
        nsg_allowed_prefixes: if spec.nsg_repair.enabled {
            spec.nsg_repair.allowed_source_prefixes.clone()
        } else {
            Vec::new()
        },
        password_reset: spec.password_reset.clone(),
        allow_insecure_listener_settings: spec.allow_insecure_listener_settings,
        snapshots: super::snapshot::SnapshotPolicy::from(&spec.snapshots),
        allow_legacy_tls: spec.allow_legacy_tls,
        restore_rdp_port: spec.restore_rdp_port,
        ..super::LadderPolicy::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn default_spec_gives_the_default_policy() {
        let policy = policy_from_spec(&crate::api::RemediationSpec::default()).unwrap();
        assert_eq!(policy, super::super::LadderPolicy::default());
    }

    #[test]
    fn password_reset_and_nsg_repair_reach_the_policy() {
        let spec = crate::api::RemediationSpec {
            password_reset: Some(PasswordResetSpec {
                username: "azureadmin".into(),
                secret_name: "vm-admin".into(),
            }),
            nsg_repair: NsgRepairSpec {
                enabled: true,
                allowed_source_prefixes: vec!["203.0.113.0/24".into()],
            },
            ..Default::default()
        };
        let policy = policy_from_spec(&spec).unwrap();
        assert_eq!(policy.password_reset, spec.password_reset);
        assert!(policy.nsg_repair);
        assert_eq!(policy.nsg_allowed_prefixes, vec!["203.0.113.0/24"]);
    }

    #[rstest::rstest]
    #[case("azureadmin", "vm-admin", None)]
    #[case("", "vm-admin", Some("username"))]
    #[case("a-very-long-user-name-x", "vm-admin", Some("username"))]
    #[case("bad/name", "vm-admin", Some("username"))]
    #[case(" admin", "vm-admin", Some("username"))]
    #[case("admin", "Vm_Admin", Some("secretName"))]
    #[case("admin", "", Some("secretName"))]
    #[case("admin", "vm.admin-2", None)]
    fn password_reset_fields_are_checked(
        #[case] username: &str,
        #[case] secret_name: &str,
        #[case] field: Option<&str>,
    ) {
        let r = check_password_reset(&PasswordResetSpec {
            username: username.into(),
            secret_name: secret_name.into(),
        });
        match field {
            None => assert!(r.is_ok(), "{r:?}"),
            Some(f) => assert!(r.unwrap_err().to_string().contains(f)),
        }
    }

    #[test]
    fn bad_specs_are_rejected_with_the_field() {
        let spec = crate::api::RemediationSpec {
            allowed_disruptive_actions: vec![Rung::ResetRdpConfig],
            ..Default::default()
        };
        assert!(
            policy_from_spec(&spec)
                .unwrap_err()
                .to_string()
                .contains("not disruptive")
        );
        let mut spec = crate::api::RemediationSpec::default();
        spec.backoff.initial = "soon".into();
        assert!(
            policy_from_spec(&spec)
                .unwrap_err()
                .to_string()
                .contains("backoff.initial")
        );
        let spec = crate::api::RemediationSpec {
            max_attempts_per_rung: 9,
            ..Default::default()
        };
        assert!(policy_from_spec(&spec).is_err());
        let spec = crate::api::RemediationSpec {
            nsg_repair: NsgRepairSpec {
                enabled: true,
                allowed_source_prefixes: vec!["*".into()],
            },
            ..Default::default()
        };
        assert!(
            policy_from_spec(&spec)
                .unwrap_err()
                .to_string()
                .contains("whole internet")
        );
    }

    fn backoff() -> Backoff {
        Backoff {
            initial: Duration::from_secs(60),
            max: Duration::from_secs(1800),
            multiplier: 2.0,
            jitter: 0.1,
        }
    }

    #[test]
    fn base_delay_grows_and_caps() {
        let b = backoff();
        let delays: Vec<u64> = (1..=7).map(|n| b.base_delay(n).as_secs()).collect();
        assert_eq!(delays, [60, 120, 240, 480, 960, 1800, 1800]);
        assert_eq!(b.base_delay(0).as_secs(), 60);
        assert_eq!(b.base_delay(u32::MAX), b.max);
    }

    proptest! {
        #[test]
        fn backoff_is_monotone_capped_and_jitter_bounded(
            initial in 1u64..3600, extra in 0u64..86_400, multiplier in 1.0f64..10.0,
            jitter in 0.0f64..1.0, n in 1u32..200, seed in "[a-z0-9-]{0,36}"
        ) {
            let b = Backoff {
                initial: Duration::from_secs(initial),
                max: Duration::from_secs(initial + extra),
                multiplier,
                jitter,
            };
            prop_assert!(b.base_delay(n) <= b.base_delay(n + 1));
            prop_assert!(b.base_delay(n) <= b.max);
            let d = b.delay(n, &seed);
            prop_assert!(d >= b.base_delay(n));
            prop_assert!(d <= b.max);
            prop_assert_eq!(d, b.delay(n, &seed), "deterministic");
        }
    }

    fn window(days: Vec<WeekdayName>, start: &str, duration: &str) -> Window {
        parse_window(
            0,
            &MaintenanceWindow {
                days,
                start: start.into(),
                duration: duration.into(),
            },
        )
        .unwrap()
    }

    #[test]
    fn windows_contain_their_times() {
        // 2026-11-21 is a Saturday.
        let at = |s: &str| s.parse::<Timestamp>().unwrap();
        let sat_night = window(vec![WeekdayName::Sat], "22:00", "4h");
        assert!(sat_night.contains(at("2026-11-21T23:30:00Z")));
        assert!(
            sat_night.contains(at("2026-11-22T01:59:00Z")),
            "spans midnight"
        );
        assert!(!sat_night.contains(at("2026-11-22T02:00:00Z")));
        assert!(!sat_night.contains(at("2026-11-21T21:59:00Z")));
        assert!(!sat_night.contains(at("2026-11-28T21:00:00Z")));
        let daily = window(vec![], "02:00", "1h");
        assert!(daily.contains(at("2026-11-24T02:30:00Z")));
        assert!(!daily.contains(at("2026-11-24T03:30:00Z")));
    }

    #[test]
    fn bad_windows_are_rejected() {
        for (start, duration) in [
            ("25:00", "1h"),
            ("2:0x", "1h"),
            ("02:00", "soon"),
            ("02:00", "30s"),
        ] {
            let w = MaintenanceWindow {
                days: vec![],
                start: start.into(),
                duration: duration.into(),
            };
            assert!(parse_window(3, &w).is_err(), "{start} {duration}");
        }
    }

    #[test]
    fn ladder_checks() {
        assert!(check_ladder(&Rung::DEFAULT_LADDER, false, false).is_ok());
        assert!(check_ladder(&[Rung::Restart, Rung::Restart], false, false).is_err());
        assert!(check_ladder(&[Rung::ResetPassword], false, false).is_err());
        assert!(check_ladder(&[Rung::ResetPassword], true, false).is_ok());
        assert!(check_ladder(&[Rung::RepairNsg], false, true).is_err());
    }

    #[test]
    fn nsg_repair_never_opens_to_everyone() {
        let spec = |prefixes: &[&str]| NsgRepairSpec {
            enabled: true,
            allowed_source_prefixes: prefixes.iter().map(|s| s.to_string()).collect(),
        };
        let check = |s: &NsgRepairSpec| check_nsg_repair(s, ExposureLimit::default());
        assert!(check(&spec(&["203.0.113.0/24"])).is_ok());
        assert!(check(&spec(&["10.20.30.0/24"])).is_ok(), "a private /24");
        for wide in ["*", "Internet", "0.0.0.0/0", "any", "::0/0", "1.0.0.0/2"] {
            assert!(check(&spec(&[wide])).is_err(), "{wide}");
        }
        let halves = check(&spec(&["0.0.0.0/1", "128.0.0.0/1"])).unwrap_err();
        assert!(
            halves.to_string().contains("a /16 of public IPv4"),
            "{halves}"
        );
        assert!(check(&spec(&[])).is_err());
        assert!(check(&spec(&["not-an-ip"])).is_err());
        assert!(check(&NsgRepairSpec::default()).is_ok());
    }
}
