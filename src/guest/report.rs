//! The applier's output (`RDPHEALTH begin/change/failed/result` lines, see
//! `guest-scripts/apply-changes.ps1`), parsed into what happened in the guest.
//!
//! Run Command keeps only the last 4 KiB of standard output, so the head may be missing:
//! the change numbers show which lines were lost. A missing `result` line means the script
//! did not run to its end (it was stopped, or failed outside its own error handling).

use crate::evidence::guest::parse_fields;

use super::changes::Restart;

/// One change the applier reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// 1-based position in the plan.
    pub n: u32,
    /// `set`, `remove`, `restart`, `acl`, `removecert`.
    pub op: String,
    /// What was changed (`key\name`, a service, a path, a thumbprint).
    pub target: String,
    /// The previous value (`None` when there was none).
    pub old: Option<String>,
    /// The value read back after the change.
    pub new: String,
    /// Where the previous ACL was saved (`acl` only).
    pub backup: Option<String>,
}

/// How the applier ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every change applied and read back.
    Ok {
        /// Whether the changes need a restart.
        restart: Restart,
    },
    /// Change `n` failed; nothing after it ran.
    Failed {
        /// The failed change's position.
        n: u32,
        /// What it changed.
        target: String,
        /// Why it failed.
        detail: String,
    },
    /// No `result` line: the script did not run to its end.
    NoResult,
}

/// The parsed output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The repair named in the `begin` line, when it survived truncation.
    pub repair: Option<String>,
    /// The number of planned changes, when the `begin` line survived.
    pub planned: Option<u32>,
    /// The changes reported, in order.
    pub applied: Vec<Applied>,
    /// How it ended.
    pub outcome: Outcome,
    /// The head of the output was cut (lines of earlier changes are missing).
    pub truncated: bool,
}

/// Parses the applier's standard output; malformed lines are ignored.
pub fn parse(stdout: &str) -> Report {
    let mut report = Report {
        repair: None,
        planned: None,
        applied: Vec::new(),
        outcome: Outcome::NoResult,
        truncated: false,
    };
    let mut failed = None;
    let mut first_n = None;
    for line in stdout.lines() {
        let Some(rest) = line.trim().strip_prefix("RDPHEALTH ") else {
            continue;
        };
        let (kind, fields) = rest.split_once(' ').unwrap_or((rest, ""));
        let f = parse_fields(fields);
        let get = |k: &str| f.get(k).cloned();
        let n = get("n").and_then(|v| v.parse::<u32>().ok());
        if let Some(n) = n {
            first_n.get_or_insert(n);
        }
        match kind {
            "begin" => {
                report.repair = get("repair");
                report.planned = get("changes").and_then(|v| v.parse().ok());
            }
            "change" => {
                let Some(n) = n else { continue };
                let op = get("op").unwrap_or_default();
                let target = match op.as_str() {
                    "set" | "remove" | "unbindcert" => format!(
                        "{}\\{}",
                        get("key").unwrap_or_default(),
                        get("name").unwrap_or_default()
                    ),
                    "restart" => get("service").unwrap_or_default(),
                    "firewallport" => get("rule").unwrap_or_default(),
                    "acl" => get("path").unwrap_or_default(),
                    "removecert" => get("thumbprint").unwrap_or_default(),
                    _ => continue,
                };
                let had = get("had").is_none_or(|h| h == "1");
                report.applied.push(Applied {
                    n,
                    op,
                    target,
                    old: get("old").filter(|_| had),
                    new: get("new").unwrap_or_default(),
                    backup: get("backup"),
                });
            }
            "failed" => {
                if let Some(n) = n {
                    failed = Some((
                        n,
                        get("target").unwrap_or_default(),
                        get("detail").unwrap_or_default(),
                    ));
                }
            }
            "result" => {
                report.outcome = match get("status").as_deref() {
                    Some("ok") => Outcome::Ok {
                        restart: if get("restart").as_deref() == Some("required") {
                            Restart::Required
                        } else {
                            Restart::None
                        },
                    },
                    _ => {
                        let (n, target, detail) = failed.clone().unwrap_or_else(|| {
                            (
                                get("change").and_then(|v| v.parse().ok()).unwrap_or(0),
                                String::new(),
                                "the failure line was cut from the output".to_owned(),
                            )
                        });
                        Outcome::Failed { n, target, detail }
                    }
                };
            }
            _ => {}
        }
    }
    report.truncated = report.planned.is_none() || first_n.is_some_and(|n| n > 1);
    report
}

impl Report {
    /// Where the previous ACL was saved, if an ACL was reset.
    pub fn acl_backup(&self) -> Option<&str> {
        self.applied.iter().find_map(|a| a.backup.as_deref())
    }

    /// `old → new` for every reported change, for status and Events.
    pub fn changes_text(&self) -> String {
        let mut parts: Vec<String> = self
            .applied
            .iter()
            .map(|a| {
                let short = a.target.rsplit('\\').next().unwrap_or(&a.target);
                match (a.op.as_str(), &a.old) {
                    ("set" | "remove" | "unbindcert" | "firewallport", Some(old)) => {
                        format!("{short} {old}→{}", a.new)
                    }
                    ("set" | "remove", None) => format!("{short} (absent)→{}", a.new),
                    ("restart", _) => format!("restarted {short}"),
                    ("acl", _) => format!(
                        "reset ACL of {} (backup {})",
                        a.target,
                        a.backup.as_deref().unwrap_or("?")
                    ),
                    _ => format!("{} {short}", a.op),
                }
            })
            .collect();
        if self.truncated {
            parts.insert(0, "(earlier lines cut by Run Command)".to_owned());
        }
        parts.join(", ")
    }

    /// The status message for the rung: `Err` when the ladder must record the rung `Failed`.
    pub fn verdict(&self) -> Result<String, String> {
        let what = self
            .repair
            .clone()
            .unwrap_or_else(|| "the repair".to_owned());
        let planned = self.planned.map(|p| format!(" of {p}")).unwrap_or_default();
        let message = match &self.outcome {
            Outcome::Ok { restart } => Ok(format!(
                "{what} applied {} change(s){}: {}",
                self.applied.len(),
                if *restart == Restart::Required {
                    "; restart required"
                } else {
                    ""
                },
                self.changes_text()
            )),
            Outcome::Failed { n, target, detail } => Err(format!(
                "{what}: change {n}{planned} ({target}) failed: {detail}; stopped there{}",
                if self.applied.is_empty() {
                    String::new()
                } else {
                    format!("; applied before it: {}", self.changes_text())
                }
            )),
            Outcome::NoResult => Err(format!(
                "{what}: the script ended without a result line after {} reported change(s){}",
                self.applied.len(),
                if self.applied.is_empty() {
                    String::new()
                } else {
                    format!(": {}", self.changes_text())
                }
            )),
        };
        message.map(cap).map_err(cap)
    }
}

/// Status messages stay short; the full output is in the Run Command result.
fn cap(s: String) -> String {
    const MAX: usize = 600;
    if s.chars().count() <= MAX {
        return s;
    }
    let mut out: String = s.chars().take(MAX - 1).collect();
    out.push('…');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    // Recorded in the shape Run Command returns it: the applier's lines, CRLF line ends as
    // PowerShell writes them on Windows.
    const OK: &str = "RDPHEALTH begin repair=EnableTls12 changes=2\r\n\
RDPHEALTH change n=1 op=set key=\"HKLM:\\SYSTEM\\CurrentControlSet\\Control\\SecurityProviders\\SCHANNEL\\Protocols\\TLS 1.2\\Server\" name=Enabled type=DWord had=1 old=\"0\" new=\"1\" created=0\r\n\
RDPHEALTH change n=2 op=set key=\"HKLM:\\SYSTEM\\CurrentControlSet\\Control\\SecurityProviders\\SCHANNEL\\Protocols\\TLS 1.2\\Server\" name=DisabledByDefault type=DWord had=0 old=\"\" new=\"0\" created=0\r\n\
RDPHEALTH result status=ok changes=2 restart=required\r\n";

    const FAILED: &str = "RDPHEALTH begin repair=ListenerKeepAlive changes=14\r\n\
RDPHEALTH change n=1 op=set key=\"HKLM:\\SYSTEM\\CurrentControlSet\\Control\\Terminal Server\\WinStations\\RDP-Tcp\" name=KeepAliveTimeout type=DWord had=1 old=\"0\" new=\"1\" created=0\r\n\
RDPHEALTH failed n=2 op=set target=\"HKLM:\\SOFTWARE\\Policies\\Microsoft\\Windows NT\\Terminal Services\\KeepAliveEnable\" detail=\"Requested registry access is not allowed.\"\r\n\
RDPHEALTH result status=failed change=2 restart=none\r\n";

    #[test]
    fn a_complete_run_reports_old_and_new_values() {
        let r = parse(OK);
        assert_eq!(r.repair.as_deref(), Some("EnableTls12"));
        assert!(!r.truncated);
        assert_eq!(
            r.outcome,
            Outcome::Ok {
                restart: Restart::Required
            }
        );
        assert_eq!(r.applied[0].old.as_deref(), Some("0"));
        assert_eq!(r.applied[1].old, None, "had=0: there was no value");
        let msg = r.verdict().unwrap();
        assert!(msg.contains("Enabled 0→1"), "{msg}");
        assert!(msg.contains("DisabledByDefault (absent)→0"), "{msg}");
        assert!(msg.contains("restart required"), "{msg}");
    }

    #[test]
    fn a_failed_change_is_named() {
        let r = parse(FAILED);
        let err = r.verdict().unwrap_err();
        assert!(
            err.contains("change 2 of 14")
                && err.contains("KeepAliveEnable")
                && err.contains("Requested registry access is not allowed."),
            "{err}"
        );
        assert!(err.contains("KeepAliveTimeout 0→1"), "{err}");
    }

    #[test]
    fn truncated_output_keeps_the_tail() {
        // Run Command kept the last bytes: the begin line and the first change are gone,
        // and the cut fell inside a line.
        let cut = &OK[OK.find("Word had=0").unwrap()..];
        let r = parse(cut);
        assert!(r.truncated);
        assert!(r.verdict().is_ok());
        assert!(r.changes_text().starts_with("(earlier lines cut"));
        let tail_of_failure = &FAILED[FAILED.find("RDPHEALTH result").unwrap()..];
        let err = parse(tail_of_failure).verdict().unwrap_err();
        assert!(err.contains("change 2") && err.contains("cut"), "{err}");
    }

    #[test]
    fn output_without_a_result_line_is_a_failure() {
        for out in [
            "",
            "RDPHEALTH begin repair=EnableTls12 changes=2\r\n",
            "At line:1 char:1\r\n+ $Plan = @{\r\nParserError: Missing closing '}'\r\n",
            "\u{0}\u{ff}RDPHEALTH result\r\n",
        ] {
            assert!(parse(out).verdict().is_err(), "{out:?}");
        }
    }

    #[test]
    fn acl_backup_is_reported() {
        let r = parse(
            "RDPHEALTH begin repair=RenewRdpCertificate changes=4\n\
             RDPHEALTH change n=1 op=acl path=\"C:\\ProgramData\\Microsoft\\Crypto\\RSA\\MachineKeys\" backup=\"C:\\Windows\\Temp\\rdphealth-acl-20261201.txt\" old=\"saved to backup\" new=\"x\"\n\
             RDPHEALTH failed n=2 op=removecert target=\"Cert:\\LocalMachine\\Remote Desktop\\\" detail=\"Access is denied.\"\n\
             RDPHEALTH result status=failed change=2 restart=none\n",
        );
        assert_eq!(
            r.acl_backup(),
            Some("C:\\Windows\\Temp\\rdphealth-acl-20261201.txt")
        );
        assert!(r.verdict().unwrap_err().contains("Access is denied."));
    }
}
