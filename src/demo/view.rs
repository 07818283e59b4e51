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

/// The terminal's width, when stdout is one.
fn terminal_width() -> Option<usize> {
    terminal_size::terminal_size().map(|(w, _)| usize::from(w.0))
}

/// `line` cut to `width` characters (the last one an ellipsis when cut), so that a table row
/// never wraps on the terminal.
fn fit(line: &str, width: Option<usize>) -> String {
    match width {
        Some(w) if w > 1 && line.chars().count() > w => {
            let mut cut: String = line.chars().take(w - 1).collect();
            cut.push('…');
            cut
        }
        _ => line.to_owned(),
    }
}

/// Redraws the live table, each line fitted to the terminal's width.
pub fn draw_table(state: &State) {
    let width = terminal_width();
    let mut out = String::from("\x1b[2J\x1b[H");
    let _ = writeln!(
        out,
        "rdphealth demo — {:.1}s\n",
        state.clock.elapsed().as_secs_f64()
    );
    let header = format!(
        "{:<28} {:<12} {:<10} {:<22} {:<28} {:>4} {:<10} LAST EVENT",
        "VM", "PHASE", "REACHABLE", "REASON", "RUNG", "TRY", "NEXT",
    );
    let _ = writeln!(out, "{}", fit(&header, width));
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
        let last = t.last_event.clone().unwrap_or_default();
        let row = format!(
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
        let _ = writeln!(out, "{}", fit(&row, width));
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

/// Prints the demo fleet's counts (after the run).
pub fn fleet_line(status: &crate::api::RdpHealthFleetStatus) {
    let d = status.discovery.as_ref();
    println!(
        "\nfleet demo/demo: {} members ({} reachable, {} unreachable, {} pending), {} incidents; \
         discovery took {} Resource Graph request(s)",
        status.members,
        status.reachable,
        status.unreachable,
        status.pending,
        status.incidents,
        d.map_or(0, |d| d.requests)
    );
}

#[cfg(test)]
mod tests {
    use super::fit;

    #[test]
    fn rows_fit_the_terminal_and_never_wrap() {
        let row = "vm-004-certificate-expired   Remediating  True       RepairGuest(RenewRdpCertificate) started";
        let fitted = fit(row, Some(40));
        assert_eq!(fitted.chars().count(), 40);
        assert!(fitted.ends_with('…'));
        assert!(row.starts_with(fitted.trim_end_matches('…')));
        assert_eq!(fit(row, Some(200)), row, "short enough: unchanged");
        assert_eq!(fit(row, None), row, "not a terminal: unchanged");
        // Multi-byte characters are counted as characters, never split.
        assert_eq!(fit("ééééé", Some(3)), "éé…");
    }
}
