//! Signatures in the boot-diagnostics serial log that say what the VM itself is doing.

use serde::{Deserialize, Serialize};

/// What a serial-log line says about the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum BootSignal {
    /// Windows is installing or rolling back updates: wait, do not restart.
    InstallingUpdates,
    /// A bugcheck (blue screen) or a boot failure: restarting alone rarely helps.
    BootFailure,
    /// A disk check runs during boot: wait.
    DiskCheck,
    /// The guest booted and its Special Administration Console is up.
    Ready,
}

impl BootSignal {
    /// The stable camelCase name (status, Events).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InstallingUpdates => "installingUpdates",
            Self::BootFailure => "bootFailure",
            Self::DiskCheck => "diskCheck",
            Self::Ready => "ready",
        }
    }

    /// Whether a disruptive rung (restart, redeploy) would destroy progress the guest is
    /// making on its own.
    pub fn guest_is_busy(self) -> bool {
        matches!(self, Self::InstallingUpdates | Self::DiskCheck)
    }
}

/// Case-insensitive substrings and the signal each one means.
const SIGNATURES: &[(&str, BootSignal)] = &[
    ("working on updates", BootSignal::InstallingUpdates),
    ("configuring windows updates", BootSignal::InstallingUpdates),
    ("installing updates", BootSignal::InstallingUpdates),
    (
        "undoing changes made to your computer",
        BootSignal::InstallingUpdates,
    ),
    (
        "we couldn't complete the updates",
        BootSignal::InstallingUpdates,
    ),
    ("bugcheck", BootSignal::BootFailure),
    ("stop code", BootSignal::BootFailure),
    ("inaccessible_boot_device", BootSignal::BootFailure),
    ("critical_process_died", BootSignal::BootFailure),
    ("an operating system wasn't found", BootSignal::BootFailure),
    ("windows failed to start", BootSignal::BootFailure),
    ("boot failure", BootSignal::BootFailure),
    ("checking file system on", BootSignal::DiskCheck),
    ("chkdsk is verifying", BootSignal::DiskCheck),
    ("scanning and repairing drive", BootSignal::DiskCheck),
    ("sac started and initialized", BootSignal::Ready),
    ("windows is ready", BootSignal::Ready),
];

/// One matched line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SerialMatch {
    /// The signal.
    pub signal: BootSignal,
    /// 1-based line number.
    pub line: usize,
    /// The line, trimmed and cut to 200 characters.
    pub text: String,
}

/// The result of scanning a serial log.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SerialScan {
    /// The most recent signal: the guest's current state as far as the log tells.
    pub latest: Option<BootSignal>,
    /// Every matched line, in log order (at most the last 20).
    pub matches: Vec<SerialMatch>,
}

const MAX_MATCHES: usize = 20;

/// Scans a serial log. Later lines win: a bugcheck followed by "ready" means the guest
/// recovered.
pub fn scan(log: &str) -> SerialScan {
    let mut out = SerialScan::default();
    for (i, line) in log.lines().enumerate() {
        let lower = line.to_ascii_lowercase();
        if let Some((_, signal)) = SIGNATURES.iter().find(|(needle, _)| lower.contains(needle)) {
            out.latest = Some(*signal);
            out.matches.push(SerialMatch {
                signal: *signal,
                line: i + 1,
                text: line.trim().chars().take(200).collect(),
            });
        }
    }
    if out.matches.len() > MAX_MATCHES {
        out.matches.drain(..out.matches.len() - MAX_MATCHES);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    #[rstest]
    #[case::ready(
        "Computer is booting, SAC started and initialized.",
        Some(BootSignal::Ready)
    )]
    #[case::updates(
        "Working on updates 35% complete. Don't turn off your computer",
        Some(BootSignal::InstallingUpdates)
    )]
    #[case::bugcheck(
        "The computer has rebooted from a bugcheck. The bugcheck was: 0x0000007b",
        Some(BootSignal::BootFailure)
    )]
    #[case::inaccessible("STOP: INACCESSIBLE_BOOT_DEVICE", Some(BootSignal::BootFailure))]
    #[case::chkdsk("Checking file system on C:", Some(BootSignal::DiskCheck))]
    #[case::nothing("EMS-SAC> ", None)]
    fn single_lines(#[case] line: &str, #[case] expected: Option<BootSignal>) {
        assert_eq!(scan(line).latest, expected);
    }

    #[test]
    fn later_lines_win() {
        let log = "bugcheck 0x7b\nrebooting\nComputer is booting, SAC started and initialized.\n";
        let s = scan(log);
        assert_eq!(s.latest, Some(BootSignal::Ready));
        assert_eq!(s.matches.len(), 2);
        assert_eq!(s.matches[0].line, 1);
        let log = "SAC started and initialized\nWorking on updates 10%\n";
        assert!(scan(log).latest.unwrap().guest_is_busy());
    }

    #[test]
    fn matches_are_bounded() {
        let log = "Working on updates\n".repeat(100);
        assert_eq!(scan(&log).matches.len(), MAX_MATCHES);
        assert_eq!(scan(&log).matches.last().unwrap().line, 100);
    }

    #[test]
    fn binary_garbage_does_not_panic() {
        let garbage = String::from_utf8_lossy(&[0xff, 0x00, 0x80, 0x0a, 0xc3]).into_owned();
        assert_eq!(scan(&garbage).latest, None);
    }
}
