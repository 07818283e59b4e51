//! A repair's plan as the applier script Run Command receives: the reviewed
//! `guest-scripts/apply-changes.ps1` with its `$Plan = …` line replaced by the plan's changes,
//! and the plan read back from such a script (what the simulated guest executes).

use super::changes::{Change, Options, Plan, RegValue, Restart, plan};
use crate::ladder::GuestRepair;

/// The reviewed applier script, shipped in the repository.
pub const APPLIER: &str = include_str!("../../guest-scripts/apply-changes.ps1");

/// The marker line of the applier.
pub const APPLIER_MARKER: &str = "# rdphealth-script: apply-changes v2";

/// The applier's placeholder line, replaced by the repair's plan.
const PLAN_LINE: &str = "$Plan = @{ Repair = 'none'; Restart = 'none'; Changes = @() }";

/// A PowerShell single-quoted string literal.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// The plan as the PowerShell `$Plan = @{ … }` statement the applier reads.
pub fn render_plan(plan: &Plan) -> String {
    let mut out = format!(
        "$Plan = @{{ Repair = {}; Restart = {}; Changes = @(\n",
        quote(&plan.repair),
        quote(plan.restart.as_str())
    );
    for c in &plan.changes {
        let fields = match c {
            Change::Set { key, name, value } => {
                let v = match value {
                    RegValue::Dword(d) => d.to_string(),
                    RegValue::String(_) | RegValue::Binary(_) => quote(&value.to_string()),
                };
                format!(
                    "Key = {}; Name = {}; Type = {}; Value = {v}",
                    quote(key),
                    quote(name),
                    quote(value.kind())
                )
            }
            Change::Remove { key, name } => format!("Key = {}; Name = {}", quote(key), quote(name)),
            Change::RestartService { service } => format!("Service = {}", quote(service)),
            Change::ResetAcl { path, grants } => {
                format!("Path = {}; Grants = {}", quote(path), quote(grants))
            }
            Change::RemoveRdpCertificate { store, key } => {
                format!("Store = {}; Key = {}", quote(store), quote(key))
            }
            Change::RemoveStaleCertificateBinding { key } => format!("Key = {}", quote(key)),
            Change::FirewallRulePort { rule, port } => {
                format!("Rule = {}; Port = {port}", quote(rule))
            }
        };
        out.push_str(&format!("    @{{ Op = {}; {fields} }}\n", quote(c.op())));
    }
    out.push_str(") }");
    out
}

/// The script Run Command receives for `repair`: the applier with the plan filled in.
pub fn script(repair: GuestRepair, options: &Options) -> Vec<String> {
    script_for(&plan(repair, options))
}

/// The applier with `plan` filled in.
pub fn script_for(plan: &Plan) -> Vec<String> {
    let rendered = render_plan(plan);
    let mut out = Vec::new();
    for line in APPLIER.lines() {
        if line == PLAN_LINE {
            out.extend(rendered.lines().map(str::to_owned));
        } else {
            out.push(line.to_owned());
        }
    }
    out
}

/// Reads the plan back from an applier script (what the simulated guest executes); `None`
/// when `script` is not the applier or its plan does not parse.
pub fn parse_script(script: &[String]) -> Option<Plan> {
    if script.first().map(|l| l.trim()) != Some(APPLIER_MARKER) {
        return None;
    }
    let start = script.iter().position(|l| l.starts_with("$Plan = @{"))?;
    let head = fields(
        script[start]
            .strip_prefix("$Plan = @{")?
            .trim_end()
            .strip_suffix("Changes = @(")?
            .trim_end()
            .strip_suffix(';')?,
    )?;
    let text = |f: &[(String, Field)], k: &str| {
        f.iter().find_map(|(name, v)| match v {
            Field::Text(s) if name.eq_ignore_ascii_case(k) => Some(s.clone()),
            _ => None,
        })
    };
    let restart = match text(&head, "Restart")?.as_str() {
        "required" => Restart::Required,
        "none" => Restart::None,
        _ => return None,
    };
    let mut changes = Vec::new();
    for line in &script[start + 1..] {
        let line = line.trim();
        if line == ") }" {
            return Some(Plan {
                repair: text(&head, "Repair")?,
                restart,
                changes,
            });
        }
        let f = fields(line.strip_prefix("@{")?.strip_suffix('}')?)?;
        let t = |k: &str| text(&f, k);
        let change = match t("Op")?.as_str() {
            "set" => {
                let value = match (t("Type")?.as_str(), f.iter().find(|(k, _)| k == "Value")?) {
                    ("DWord", (_, Field::Number(n))) => RegValue::Dword(u32::try_from(*n).ok()?),
                    ("String", (_, Field::Text(s))) => RegValue::String(s.clone()),
                    ("Binary", (_, Field::Text(s))) => RegValue::Binary(hex(s)?),
                    _ => return None,
                };
                Change::Set {
                    key: t("Key")?,
                    name: t("Name")?,
                    value,
                }
            }
            "remove" => Change::Remove {
                key: t("Key")?,
                name: t("Name")?,
            },
            "restart" => Change::RestartService {
                service: t("Service")?,
            },
            "acl" => Change::ResetAcl {
                path: t("Path")?,
                grants: t("Grants")?,
            },
            "removecert" => Change::RemoveRdpCertificate {
                store: t("Store")?,
                key: t("Key")?,
            },
            "unbindcert" => Change::RemoveStaleCertificateBinding { key: t("Key")? },
            "firewallport" => Change::FirewallRulePort {
                rule: t("Rule")?,
                port: match f.iter().find(|(k, _)| k == "Port")? {
                    (_, Field::Number(n)) => u16::try_from(*n).ok()?,
                    _ => return None,
                },
            },
            _ => return None,
        };
        changes.push(change);
    }
    None
}

/// Upper- or lower-case hex digits as bytes.
fn hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.is_ascii() {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Field {
    Text(String),
    Number(u64),
}

/// Parses `A = 'x'; B = 2` (PowerShell hashtable entries, single-quoted strings).
fn fields(s: &str) -> Option<Vec<(String, Field)>> {
    let mut out = Vec::new();
    let mut rest = s.trim();
    while !rest.is_empty() {
        let (name, after) = rest.split_once('=')?;
        let after = after.trim_start();
        let (value, next) = if let Some(q) = after.strip_prefix('\'') {
            let mut v = String::new();
            let mut chars = q.char_indices().peekable();
            let mut end = None;
            while let Some((i, ch)) = chars.next() {
                if ch == '\'' {
                    if chars.peek().map(|(_, c)| *c) == Some('\'') {
                        chars.next();
                        v.push('\'');
                    } else {
                        end = Some(i + 1);
                        break;
                    }
                } else {
                    v.push(ch);
                }
            }
            (Field::Text(v), &q[end?..])
        } else {
            let cut = after.find(';').unwrap_or(after.len());
            (
                Field::Number(after[..cut].trim().parse().ok()?),
                &after[cut..],
            )
        };
        out.push((name.trim().to_owned(), value));
        let next = next.trim_start();
        rest = match next.strip_prefix(';') {
            Some(n) => n.trim_start(),
            None if next.is_empty() => "",
            None => return None,
        };
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::changes::RDP_TCP;

    #[test]
    fn the_applier_has_exactly_one_plan_line() {
        assert_eq!(APPLIER.lines().filter(|l| *l == PLAN_LINE).count(), 1);
        assert!(APPLIER.starts_with(APPLIER_MARKER));
    }

    #[test]
    fn every_plan_round_trips_through_the_script() {
        for repair in GuestRepair::ALL {
            for c in [false, true] {
                let plan = plan(repair, &Options::consent(c));
                let script = script_for(&plan);
                assert_eq!(parse_script(&script).as_ref(), Some(&plan), "{repair}");
                assert!(!script.iter().any(|l| l == PLAN_LINE));
            }
        }
    }

    #[test]
    fn quotes_survive_rendering() {
        let plan = Plan {
            repair: "it's".into(),
            restart: Restart::None,
            changes: vec![Change::Set {
                key: r"HKLM:\SOFTWARE\O'Brien; x = 1".into(),
                name: "a'b".into(),
                value: RegValue::String("say 'hi'; bye".into()),
            }],
        };
        assert_eq!(parse_script(&script_for(&plan)), Some(plan));
    }

    #[test]
    fn binary_values_round_trip_as_hex() {
        let plan = Plan {
            repair: "x".into(),
            restart: Restart::None,
            changes: vec![Change::Set {
                key: RDP_TCP.into(),
                name: "SSLCertificateSHA1Hash".into(),
                value: RegValue::Binary(vec![0x5e, 0x00, 0xff]),
            }],
        };
        assert!(
            script_for(&plan)
                .iter()
                .any(|l| l.contains("Value = '5E00FF'"))
        );
        assert_eq!(parse_script(&script_for(&plan)), Some(plan));
        assert_eq!(hex("5e0"), None);
        assert_eq!(hex("zz"), None);
    }

    #[test]
    fn other_scripts_are_not_plans() {
        assert_eq!(parse_script(&["Get-Service".to_owned()]), None);
        let mut broken = script(GuestRepair::EnableTls12, &Options::SAFE);
        let i = broken
            .iter()
            .position(|l| l.contains("Op = 'set'"))
            .unwrap();
        broken[i] = "    @{ Op = 'set'; Key = 'x'; Name = 'y'; Type = 'DWord'; Value = -1 }".into();
        assert_eq!(parse_script(&broken), None);
    }
}
