//! `rdphealth bench ...`: measurements that need real sockets and a separate simulator
//! process. They print numbers; nothing here asserts on timing.

pub mod fleet;
pub mod fleet_members;
pub mod http;
pub mod probe;
pub mod responder;
pub mod scenario;

use std::time::Duration;

/// Kernel clock ticks per second for `/proc/*/stat` CPU times (`USER_HZ`, 100 on Linux).
pub const CLOCK_TICKS: f64 = 100.0;

/// CPU time (user + system) this process has used so far, from `/proc/self/stat`.
pub fn cpu_time() -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may contain spaces) start at field 3.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some(Duration::from_secs_f64((utime + stime) / CLOCK_TICKS))
}

/// Resident set size now and at its peak (`VmRSS`, `VmHWM`), in bytes.
pub fn rss() -> Option<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// "p50 / p99 / max (N samples)" of sorted durations, in milliseconds.
pub fn spread(sorted: &[Duration]) -> String {
    format!(
        "{} / {} / {} ({} samples)",
        ms(quantile(sorted, 0.5)),
        ms(quantile(sorted, 0.99)),
        ms(sorted.last().copied().unwrap_or_default()),
        sorted.len()
    )
}

/// "p50 / p99 / max (N of M <verb>)" of sorted outage times, in seconds.
pub fn outage_spread(sorted: &[Duration], injected: usize, verb: &str) -> String {
    format!(
        "{:.1} s / {:.1} s / {:.1} s ({} of {injected} {verb})",
        quantile(sorted, 0.5).as_secs_f64(),
        quantile(sorted, 0.99).as_secs_f64(),
        sorted.last().copied().unwrap_or_default().as_secs_f64(),
        sorted.len()
    )
}

/// "p50 / p99" of sorted durations, in milliseconds.
pub fn median_p99(sorted: &[Duration]) -> String {
    format!(
        "{} / {}",
        ms(quantile(sorted, 0.5)),
        ms(quantile(sorted, 0.99))
    )
}

/// The `q`-quantile (0..=1) of `sorted` (nearest rank); zero when empty.
pub fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Milliseconds, for tables.
pub fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_use_nearest_rank() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(quantile(&v, 0.5), Duration::from_millis(50));
        assert_eq!(quantile(&v, 0.99), Duration::from_millis(99));
        assert_eq!(quantile(&v, 1.0), Duration::from_millis(100));
        assert_eq!(quantile(&[], 0.5), Duration::ZERO);
    }

    #[test]
    fn own_cpu_and_memory_are_readable() {
        assert!(cpu_time().is_some());
        let (rss, hwm) = rss().unwrap();
        assert!(rss > 0 && hwm >= rss);
    }
}
