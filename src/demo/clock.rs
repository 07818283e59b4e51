//! The demo's clock. With the fast timing profile it is the wall clock (the demo's specs and
//! the simulator's durations are compressed instead). With the realistic profile the specs
//! keep the operator's real settings and the simulator Azure's real durations, and this clock
//! runs `speed` times faster than the wall clock for both the engine's decisions and the
//! simulator's operations, so every budget — `settleTime`, `requestTimeout`, backoff, evidence
//! timeouts, `Retry-After` — is measured against the same compressed time.

use std::time::{Duration, Instant};

use k8s_openapi::jiff::{SignedDuration, Timestamp};

/// Wall time scaled by a speed factor.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    started: Instant,
    epoch: Timestamp,
    speed: f64,
}

impl Clock {
    /// A clock starting now, `speed` times faster than the wall clock (1: the wall clock).
    pub fn new(speed: f64) -> Self {
        Self {
            started: Instant::now(),
            epoch: Timestamp::now(),
            speed: if speed.is_finite() && speed > 0.0 {
                speed
            } else {
                1.0
            },
        }
    }

    /// Time since the start, on this clock.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed().mul_f64(self.speed)
    }

    /// Now, on this clock.
    pub fn now(&self) -> Timestamp {
        SignedDuration::try_from(self.elapsed())
            .ok()
            .and_then(|d| self.epoch.checked_add(d).ok())
            .unwrap_or(self.epoch)
    }

    /// How long `d` on this clock lasts on the wall clock.
    pub fn wall(&self, d: Duration) -> Duration {
        d.div_f64(self.speed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_compressed_clock_runs_fast_and_converts_waits() {
        let clock = Clock::new(60.0);
        assert_eq!(clock.wall(Duration::from_secs(120)), Duration::from_secs(2));
        let before = clock.now();
        std::thread::sleep(Duration::from_millis(50));
        let passed = clock.now().duration_since(before).as_secs_f64();
        assert!(passed >= 2.9, "{passed}");
        assert_eq!(
            Clock::new(f64::NAN).wall(Duration::from_secs(3)),
            Duration::from_secs(3)
        );
    }
}
