//! How long simulated operations take. The `fast` profile (the default, for tests and the
//! demo) finishes everything in seconds; the `realistic` profile draws each duration and each
//! operation's `Retry-After` from the ranges Azure documents or is commonly seen to take, so
//! the operator's budgets (poll waits, `requestTimeout`, `settleTime`, evidence timeouts) meet
//! Azure's real slowness. Draws are seeded: the same seed gives every resource the same
//! durations in every run, whatever the order of requests across resources.

use std::{str::FromStr, time::Duration};

use serde::Deserialize;

/// Which durations the simulator uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TimingProfile {
    /// The fixed, short durations of [`Timing`] (seconds or less).
    #[default]
    Fast,
    /// Durations and `Retry-After` drawn from Azure's ranges ([`OpKind::realistic_range`]).
    Realistic,
}

impl FromStr for TimingProfile {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "fast" => Ok(Self::Fast),
            "realistic" => Ok(Self::Realistic),
            _ => Err(format!("timing {s:?} must be fast or realistic")),
        }
    }
}

/// What takes time in the simulator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpKind {
    /// A VMAccess extension update (through the VM agent).
    Extension,
    /// A Run Command.
    RunCommand,
    /// A NIC or NSG rule update.
    NetworkUpdate,
    /// IP flow verify.
    FlowVerify,
    /// A restart, until Azure reports it done.
    Restart,
    /// A redeploy, until Azure reports it done.
    Redeploy,
    /// A start, until Azure reports it done.
    Start,
    /// Windows booting after a restart, redeploy, start or private-IP change that Azure
    /// already reports done: the VM agent is Not Ready and RDP refuses meanwhile.
    GuestBoot,
    /// Creating or deleting an OS-disk snapshot (the resource; an incremental snapshot's
    /// background copy goes on after it is usable).
    Snapshot,
}

impl OpKind {
    fn name(self) -> &'static str {
        match self {
            Self::Extension => "extension",
            Self::RunCommand => "runCommand",
            Self::NetworkUpdate => "network",
            Self::FlowVerify => "flowVerify",
            Self::Restart => "restart",
            Self::Redeploy => "redeploy",
            Self::Start => "start",
            Self::GuestBoot => "guestBoot",
            Self::Snapshot => "snapshot",
        }
    }

    /// The realistic range in seconds. Sources: Run Command needs at least about 20 s
    /// (Run Command doc); a restart takes minutes and a redeploy 5–15 min (the RDP
    /// troubleshooting guides); an extension update runs through the VM agent for minutes;
    /// Network updates and IP flow verify take seconds; a Windows guest boots for one to
    /// several minutes after Azure reports the VM running (longer with updates).
    pub fn realistic_range(self) -> (u64, u64) {
        match self {
            Self::Extension => (60, 180),
            Self::RunCommand => (20, 120),
            Self::NetworkUpdate => (10, 40),
            Self::FlowVerify => (5, 20),
            Self::Restart => (60, 180),
            Self::Redeploy => (300, 900),
            Self::Start => (60, 180),
            Self::GuestBoot => (60, 300),
            Self::Snapshot => (5, 60),
        }
    }
}

/// The realistic `Retry-After` range in seconds: ARM's async-operation contract allows 10 s
/// and more; Network commonly sends 10, Compute up to a minute.
pub const REALISTIC_RETRY_AFTER: (u64, u64) = (10, 60);

/// Simulated durations; compress them for tests and demos.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Timing {
    /// `fast` (default) or `realistic`.
    #[serde(default)]
    pub profile: TimingProfile,
    /// Seed of the realistic draws.
    #[serde(default)]
    pub seed: u64,
    /// Realistic durations pass this many times faster on the wall clock, for a client whose
    /// clock is compressed by the same factor (the demo's); `Retry-After` is sent as drawn,
    /// in the client's seconds. 1 for an operator on the wall clock.
    #[serde(default = "d_speed")]
    pub speed: f64,
    /// Fast: VMAccess extension runs, Run Command, NIC updates, diagnostics computations.
    #[serde(default = "d_operation", with = "humantime_serde")]
    pub operation: Duration,
    /// Fast: a restart (the VM refuses connections meanwhile).
    #[serde(default = "d_restart", with = "humantime_serde")]
    pub restart: Duration,
    /// Fast: a redeploy.
    #[serde(default = "d_redeploy", with = "humantime_serde")]
    pub redeploy: Duration,
    /// Fast: the guest's boot after Azure reports a restart, redeploy, start or private-IP
    /// change done (0: the guest is up when the operation ends).
    #[serde(default, with = "humantime_serde")]
    pub guest_boot: Duration,
    /// Fast: the `Retry-After` that LRO responses suggest.
    #[serde(default = "d_retry_after", with = "humantime_serde")]
    pub retry_after: Duration,
    /// Lifetime of tokens issued by the token endpoint.
    #[serde(default = "d_token", with = "humantime_serde")]
    pub token_lifetime: Duration,
}

fn d_speed() -> f64 {
    1.0
}
fn d_operation() -> Duration {
    Duration::from_secs(2)
}
fn d_restart() -> Duration {
    Duration::from_secs(5)
}
fn d_redeploy() -> Duration {
    Duration::from_secs(10)
}
fn d_retry_after() -> Duration {
    Duration::from_secs(1)
}
fn d_token() -> Duration {
    Duration::from_secs(3600)
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            profile: TimingProfile::Fast,
            seed: 0,
            speed: d_speed(),
            operation: d_operation(),
            restart: d_restart(),
            redeploy: d_redeploy(),
            guest_boot: Duration::ZERO,
            retry_after: d_retry_after(),
            token_lifetime: d_token(),
        }
    }
}

impl Timing {
    /// The realistic profile with `seed`, compressed by `speed`.
    pub fn realistic(seed: u64, speed: f64) -> Self {
        Self {
            profile: TimingProfile::Realistic,
            seed,
            speed,
            ..Self::default()
        }
    }

    /// Checks the speed factor.
    pub fn validate(&self) -> Result<(), String> {
        if self.speed.is_finite() && self.speed > 0.0 {
            Ok(())
        } else {
            Err(format!(
                "timing.speed {} must be a positive number",
                self.speed
            ))
        }
    }

    /// How long the `n`-th operation of `kind` on `resource` takes on the wall clock.
    pub fn duration(&self, kind: OpKind, resource: &str, n: u64) -> Duration {
        match self.profile {
            TimingProfile::Fast => match kind {
                OpKind::Restart => self.restart,
                OpKind::Redeploy => self.redeploy,
                OpKind::GuestBoot => self.guest_boot,
                _ => self.operation,
            },
            TimingProfile::Realistic => {
                let secs = self.draw(kind.realistic_range(), kind.name(), resource, n);
                Duration::from_secs_f64(secs as f64 / self.speed)
            }
        }
    }

    /// The `Retry-After` of the `n`-th operation on `resource`, in the client's seconds.
    pub fn retry_after(&self, resource: &str, n: u64) -> Duration {
        match self.profile {
            TimingProfile::Fast => self.retry_after,
            TimingProfile::Realistic => {
                Duration::from_secs(self.draw(REALISTIC_RETRY_AFTER, "retryAfter", resource, n))
            }
        }
    }

    fn draw(&self, (lo, hi): (u64, u64), what: &str, resource: &str, n: u64) -> u64 {
        let key = format!("{}/{what}/{}/{n}", self.seed, resource.to_ascii_lowercase());
        lo + super::world::fingerprint_u64(&key) % (hi - lo + 1)
    }
}

mod humantime_serde {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn realistic_draws_stay_in_azure_ranges_and_repeat_with_the_seed() {
        let t = Timing::realistic(7, 1.0);
        let kinds = [
            OpKind::Extension,
            OpKind::RunCommand,
            OpKind::NetworkUpdate,
            OpKind::FlowVerify,
            OpKind::Restart,
            OpKind::Redeploy,
            OpKind::Start,
            OpKind::GuestBoot,
        ];
        for kind in kinds {
            let (lo, hi) = kind.realistic_range();
            let drawn: Vec<u64> = (0..50)
                .map(|n| t.duration(kind, &format!("vm-{n}"), n).as_secs())
                .collect();
            assert!(
                drawn.iter().all(|d| (lo..=hi).contains(d)),
                "{kind:?}: {drawn:?}"
            );
            assert!(drawn.iter().any(|d| *d != drawn[0]), "{kind:?} varies");
        }
        for n in 0..50 {
            let r = t.retry_after("vm-1", n).as_secs();
            assert!((10..=60).contains(&r), "{r}");
        }
        assert!(
            Timing::realistic(7, 1.0).duration(OpKind::Redeploy, "VM-1", 0)
                >= Duration::from_secs(300)
        );
        // Same seed, same resource, same count: same duration; case of the name ignored.
        assert_eq!(
            t.duration(OpKind::Restart, "VM-1", 3),
            Timing::realistic(7, 1.0).duration(OpKind::Restart, "vm-1", 3)
        );
        // Compressed on the wall clock, Retry-After as drawn.
        let fast = Timing::realistic(7, 60.0);
        assert_eq!(
            fast.duration(OpKind::Redeploy, "vm-1", 0).as_secs_f64(),
            t.duration(OpKind::Redeploy, "vm-1", 0).as_secs_f64() / 60.0
        );
        assert_eq!(fast.retry_after("vm-1", 0), t.retry_after("vm-1", 0));
    }

    #[test]
    fn the_fast_profile_keeps_its_fixed_durations() {
        let t = Timing::default();
        assert_eq!(t.duration(OpKind::Restart, "vm", 0), Duration::from_secs(5));
        assert_eq!(
            t.duration(OpKind::RunCommand, "vm", 9),
            Duration::from_secs(2)
        );
        assert_eq!(t.duration(OpKind::GuestBoot, "vm", 0), Duration::ZERO);
        assert_eq!(t.retry_after("vm", 4), Duration::from_secs(1));
        assert!("Realistic".parse::<TimingProfile>().is_ok());
        assert!("slow".parse::<TimingProfile>().is_err());
        assert!(Timing::realistic(1, 0.0).validate().is_err());
        assert!(Timing::realistic(1, 60.0).validate().is_ok());
    }
}
