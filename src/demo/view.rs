//! What the demo prints: a live table on a terminal, timestamped event lines otherwise, and
//! the final summary.

use std::fmt::Write as _;

use super::{Summary, driver::State};
use crate::{api::conditions as types, engine::conditions};

/// Prints and clears the pending event lines (always in plain mode; in table mode they show
/// in the table's last column instead).
pub fn flush_log(state: &State, table: bool) {
    let lines = state
        .log
        .lock()
        .map(|mut l| std::mem::take(&mut *l))
        .unwrap_or_default();
    if table {
        return;
    }
    for l in lines {
        println!(
            "{:>7.2}s {:<28} {:<22} {}",
            l.at.as_secs_f64(),
            l.name,
            l.reason,
            l.note
        );
    }
}

/// Redraws the live table.
pub fn draw_table(state: &State) {
    let mut out = String::from("\x1b[2J\x1b[H");
    let _ = writeln!(
        out,
        "rdphealth demo — {:.1}s\n\n{:<28} {:<12} {:<10} {:<22} {:<28} {:>4} {:<10} LAST EVENT",
        state.clock.elapsed().as_secs_f64(),
        "VM",
        "PHASE",
        "REACHABLE",
        "REASON",
        "RUNG",
        "TRY",
        "NEXT",
    );
    for t in state.snapshot() {
        let status = t.obj.status.clone().unwrap_or_default();
        let reachable = conditions::find(&status.conditions, types::REACHABLE)
            .map_or("", |c| c.status.as_str())
            .to_string();
        let reason = status
            .last_probe
            .as_ref()
            .and_then(|p| p.failure_reason.clone())
            .unwrap_or_default();
        let (rung, attempt) = status
            .ladder
            .current
            .as_ref()
            .map_or((String::new(), String::new()), |c| {
                (c.step.to_string(), c.attempt.to_string())
            });
        let next = status
            .ladder
            .next_action_at
            .as_ref()
            .map(|t| t.0.strftime("%H:%M:%S").to_string())
            .unwrap_or_default();
        let last: String = t
            .last_event
            .clone()
            .unwrap_or_default()
            .chars()
            .take(60)
            .collect();
        let _ = writeln!(
            out,
            "{:<28} {:<12} {:<10} {:<22} {:<28} {:>4} {:<10} {}",
            t.obj.metadata.name.clone().unwrap_or_default(),
            status.phase.map_or("", |p| p.as_str()),
            reachable,
            reason,
            rung,
            attempt,
            next,
            last
        );
    }
    let _ = state.log.lock().map(|mut l| l.clear());
    print!("{out}");
}

/// The final summary: per VM the fault, diagnosis, outcome and timings; ARM calls.
pub fn render_summary(summary: &Summary) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\nsummary after {:.1}s: {}",
        summary.elapsed.as_secs_f64(),
        if summary.settled {
            "every VM settled as expected"
        } else {
            "NOT every VM settled as expected"
        }
    );
    let _ = writeln!(
        out,
        "{:<28} {:<20} {:<26} {:<40} {:>8} {:>8}  ok",
        "VM", "FAULT", "DIAGNOSIS", "OUTCOME", "DETECT", "RECOVER"
    );
    for t in &summary.vms {
        let outcome = match (t.fixed_by, t.expect) {
            (Some(step), _) => format!("fixed by {step}"),
            (None, super::Expect::Healthy) => "healthy".into(),
            (None, expect) if t.settled() => expect.describe(),
            (None, expect) => format!("pending (expected {})", expect.describe()),
        };
        let secs = |d: Option<std::time::Duration>| {
            d.map_or("-".to_string(), |d| format!("{:.1}s", d.as_secs_f64()))
        };
        let diagnosis: String = t
            .diagnosis
            .clone()
            .unwrap_or_else(|| "-".into())
            .chars()
            .take(26)
            .collect();
        let _ = writeln!(
            out,
            "{:<28} {:<20} {:<26} {:<40} {:>8} {:>8}  {}",
            t.obj.metadata.name.clone().unwrap_or_default(),
            fault_column(t),
            diagnosis,
            outcome,
            secs(t.detected_after),
            secs(t.recovered_after),
            if t.settled() { "yes" } else { "NO" }
        );
    }
    let total: u64 = summary.arm_calls.values().sum();
    let _ = writeln!(out, "\nARM requests: {total}");
    for (op, n) in &summary.arm_calls {
        let _ = writeln!(out, "  {op:<40} {n}");
    }
    out
}

/// The summary's FAULT column: the fault, or the computer answering on the VM's address.
fn fault_column(t: &super::Tracked) -> String {
    match (t.fault, &t.answers_as) {
        (Some(f), _) => f.as_str().to_string(),
        (None, Some(_)) => "address reused".to_string(),
        (None, None) => "none".to_string(),
    }
}
