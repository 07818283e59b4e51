//! Snapshot before change: which steps need an OS-disk snapshot first, what the snapshot is
//! called and tagged, what status remembers of it, and which snapshots retention deletes.
//! Pure: the engine (`engine::remediate::snapshot`) does the Azure calls.

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::rung::{Rung, Step};
use crate::azure::SnapshotInfo;

/// Tag naming the VM a snapshot was taken of. Azure tag names may not contain `/`
/// (`<`, `>`, `%`, `&`, `\`, `?`, `/` are refused), so the group is joined with a dot.
pub const VM_TAG: &str = "rdphealth.io.vm";
/// Tag marking a snapshot as the operator's; retention deletes only snapshots carrying it.
pub const MANAGED_BY_TAG: &str = "rdphealth.io.managed-by";
/// The value of [`MANAGED_BY_TAG`].
pub const MANAGED_BY: &str = "rdphealth-operator";
/// Tag naming the step the snapshot was taken before (for people browsing the portal).
pub const STEP_TAG: &str = "rdphealth.io.step";

/// A snapshot taken for a step is used by that step only if it started within this long
/// (otherwise the disk may have changed since, and a new one is taken).
pub const REUSE_WITHIN: Duration = Duration::from_secs(10 * 60);

/// How many snapshot records status keeps at most (retention keeps fewer in Azure).
pub const RECORD_LIMIT: usize = 20;

/// After a failed retention run, the next one waits this long.
pub const PRUNE_RETRY: Duration = Duration::from_secs(3600);

/// `remediation.snapshots`: an incremental OS-disk snapshot before every in-guest write and
/// every disruptive rung, and its retention.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotSpec {
    /// Take an incremental snapshot of the OS disk before the in-guest writes
    /// (`ResetRdpConfig`, `RepairGuest`) and before every
    /// disruptive rung (ResetNic, Restart, Redeploy, ResetPassword); the rung does not start
    /// if the snapshot fails. Default: true (snapshots are taken only in `Auto`, the only mode
    /// that changes anything).
    #[serde(default = "default_enabled")]
    pub enabled: bool,
    /// Snapshots of this VM the operator keeps (the newest); older ones it took are deleted.
    /// 1–50, default 3.
    #[serde(default = "default_keep")]
    #[schemars(range(min = 1, max = 50))]
    pub keep: u32,
    /// Snapshots the operator took that are older than this many days are deleted, even
    /// among the newest `keep`. 1–365, default 7.
    #[serde(default = "default_max_age_days")]
    #[schemars(range(min = 1, max = 365))]
    pub max_age_days: u32,
}

impl Default for SnapshotSpec {
    fn default() -> Self {
        Self {
            enabled: default_enabled(),
            keep: default_keep(),
            max_age_days: default_max_age_days(),
        }
    }
}

fn default_enabled() -> bool {
    true
}
fn default_keep() -> u32 {
    3
}
fn default_max_age_days() -> u32 {
    7
}

/// The validated snapshot settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotPolicy {
    /// Snapshot before change.
    pub enabled: bool,
    /// Newest snapshots kept per VM.
    pub keep: usize,
    /// Older snapshots are deleted.
    pub max_age: Duration,
}

impl Default for SnapshotPolicy {
    fn default() -> Self {
        Self::from(&SnapshotSpec::default())
    }
}

impl From<&SnapshotSpec> for SnapshotPolicy {
    fn from(s: &SnapshotSpec) -> Self {
        Self {
            enabled: s.enabled,
            keep: s.keep.clamp(1, 50) as usize,
            max_age: Duration::from_secs(u64::from(s.max_age_days.clamp(1, 365)) * 86_400),
        }
    }
}

/// Whether `rung` changes the guest or disrupts the VM, so that the guides' first
/// instruction — snapshot the OS disk — applies: in-guest writes (VMAccess's reset of the RDP
/// settings writes the guest's registry and firewall; the Run Command repairs) and every
/// disruptive rung.
pub fn needed(rung: Rung) -> bool {
    matches!(rung, Rung::ResetRdpConfig | Rung::RepairGuest) || rung.is_disruptive()
}

/// One snapshot the operator took.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotRecord {
    /// The snapshot's ARM id.
    pub id: String,
    /// When it was requested.
    pub taken_at: Time,
    /// The step it was taken before.
    pub step: Step,
    /// The step's Azure call was made after it (false: the step did not start, e.g. the VM
    /// recovered meanwhile).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub used: bool,
}

impl SnapshotRecord {
    /// The snapshot's name (the last segment of its id).
    pub fn name(&self) -> &str {
        self.id.rsplit('/').next().unwrap_or(&self.id)
    }
}

/// The snapshot's name: `rdph-<vm>-<UTC time>`, within Azure's 80 characters of
/// `a-z A-Z 0-9 _ -` (the Snapshots REST reference; a VM name's periods are dropped, and it
/// is cut to fit).
pub fn name(vm: &str, now: Timestamp) -> String {
    let stamp = now.strftime("%Y%m%dt%H%M%S").to_string();
    let vm: String = vm
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
        .take(80 - "rdph--".len() - stamp.len())
        .collect();
    format!("rdph-{vm}-{stamp}")
}

/// The snapshot's ARM id.
pub fn id(subscription: &str, resource_group: &str, name: &str) -> String {
    format!(
        "/subscriptions/{subscription}/resourceGroups/{resource_group}/providers/Microsoft.Compute/snapshots/{name}"
    )
}

/// The tags that mark a snapshot of `vm` as the operator's.
pub fn tags(vm: &str, step: Step) -> BTreeMap<String, String> {
    BTreeMap::from([
        (VM_TAG.to_owned(), vm.to_owned()),
        (MANAGED_BY_TAG.to_owned(), MANAGED_BY.to_owned()),
        (STEP_TAG.to_owned(), step.to_string()),
    ])
}

/// Whether the operator took `s` of `vm` (both tags, compared as Azure compares names).
pub fn ours(s: &SnapshotInfo, vm: &str) -> bool {
    let tag = |name: &str| {
        s.tags
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    };
    tag(MANAGED_BY_TAG) == Some(MANAGED_BY)
        && tag(VM_TAG).is_some_and(|v| v.eq_ignore_ascii_case(vm))
}

/// The names of the operator's snapshots of `vm` that retention deletes: beyond the newest
/// `keep`, and any older than `max_age`. Snapshots it did not take are never candidates;
/// one without a creation time counts as new (never deleted for its age), and `protect`
/// (the snapshot a step in flight relies on) is never deleted.
pub fn expired(
    listed: &[SnapshotInfo],
    vm: &str,
    policy: &SnapshotPolicy,
    protect: Option<&str>,
    now: Timestamp,
) -> Vec<String> {
    let created = |s: &SnapshotInfo| {
        s.time_created
            .as_deref()
            .and_then(|t| t.parse::<Timestamp>().ok())
    };
    let mut mine: Vec<(&SnapshotInfo, Option<Timestamp>)> = listed
        .iter()
        .filter(|s| ours(s, vm))
        .map(|s| (s, created(s)))
        .collect();
    // Newest first; unknown creation times first of all (they are being created).
    mine.sort_by(|a, b| match (a.1, b.1) {
        (None, None) => b.0.name.cmp(&a.0.name),
        (None, Some(_)) => std::cmp::Ordering::Less,
        (Some(_), None) => std::cmp::Ordering::Greater,
        (Some(x), Some(y)) => y.cmp(&x).then_with(|| b.0.name.cmp(&a.0.name)),
    });
    mine.iter()
        .enumerate()
        .filter(|(rank, (s, at))| {
            let too_old = at.is_some_and(|t| {
                now.duration_since(t).as_secs_f64() > policy.max_age.as_secs_f64()
            });
            (*rank >= policy.keep || too_old)
                && protect.is_none_or(|p| !p.eq_ignore_ascii_case(&s.name))
        })
        .map(|(_, (s, _))| s.name.clone())
        .collect()
}

/// Whether status shows a snapshot retention should look at now: more records than `keep`,
/// or one older than `max_age`.
pub fn prune_due(records: &[SnapshotRecord], policy: &SnapshotPolicy, now: Timestamp) -> bool {
    records.len() > policy.keep
        || records
            .iter()
            .any(|r| now.duration_since(r.taken_at.0).as_secs_f64() > policy.max_age.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(s).unwrap()
    }

    fn snap(name: &str, vm: Option<&str>, managed: bool, created: Option<i64>) -> SnapshotInfo {
        let mut tags = BTreeMap::new();
        if let Some(vm) = vm {
            tags.insert(VM_TAG.to_owned(), vm.to_owned());
        }
        if managed {
            tags.insert(MANAGED_BY_TAG.to_owned(), MANAGED_BY.to_owned());
        }
        SnapshotInfo {
            id: id("s", "rg", name),
            name: name.to_owned(),
            time_created: created.map(|c| at(c).to_string()),
            provisioning_state: Some("Succeeded".into()),
            source_resource_id: None,
            tags,
        }
    }

    const DAY: i64 = 86_400;

    #[test]
    fn only_in_guest_writes_and_disruptive_rungs_need_a_snapshot() {
        let with: Vec<Rung> = Rung::ALL.into_iter().filter(|r| needed(*r)).collect();
        assert_eq!(
            with,
            [
                Rung::ResetRdpConfig,
                Rung::RepairGuest,
                Rung::ResetNic,
                Rung::Restart,
                Rung::Redeploy,
                Rung::ResetPassword
            ]
        );
    }

    #[test]
    fn names_fit_azures_rules() {
        let n = name("vm-1", at(1_764_574_200));
        assert_eq!(n, "rdph-vm-1-20251201t073000");
        let long = name(&"a".repeat(64), at(0));
        assert!(long.len() <= 80, "{long}");
        assert!(
            name("web.v1", at(0))
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
        );
        assert!(
            tags("vm-1", Step::rung(Rung::Restart))
                .keys()
                .all(|k| !k.contains('/'))
        );
    }

    #[test]
    fn retention_keeps_the_newest_and_drops_the_old_but_only_its_own() {
        let now = at(100 * DAY);
        let policy = SnapshotPolicy {
            enabled: true,
            keep: 2,
            max_age: Duration::from_secs(7 * 86_400),
        };
        let listed = vec![
            snap("new", Some("vm-1"), true, Some(100 * DAY - 10)),
            snap("newer", Some("vm-1"), true, Some(100 * DAY - 5)),
            snap("third", Some("vm-1"), true, Some(100 * DAY - 20)),
            snap("ancient", Some("vm-1"), true, Some(80 * DAY)),
            // Not the operator's, or another VM's: never touched, however old.
            snap("manual", Some("vm-1"), false, Some(10 * DAY)),
            snap("untagged", None, false, Some(10 * DAY)),
            snap("other-vm", Some("vm-2"), true, Some(10 * DAY)),
            snap("forged-vm-only", Some("vm-1"), false, Some(DAY)),
        ];
        let mut gone = expired(&listed, "VM-1", &policy, None, now);
        gone.sort();
        assert_eq!(gone, ["ancient", "third"]);
    }

    #[test]
    fn retention_deletes_old_ones_even_among_the_newest_but_never_the_protected_one() {
        let now = at(100 * DAY);
        let policy = SnapshotPolicy {
            enabled: true,
            keep: 3,
            max_age: Duration::from_secs(86_400),
        };
        let listed = vec![
            snap("old", Some("vm-1"), true, Some(90 * DAY)),
            snap("in-flight", Some("vm-1"), true, Some(90 * DAY)),
            snap("creating", Some("vm-1"), true, None),
        ];
        assert_eq!(
            expired(&listed, "vm-1", &policy, Some("in-flight"), now),
            ["old"]
        );
    }

    #[test]
    fn prune_is_due_for_too_many_or_too_old_records() {
        let policy = SnapshotPolicy {
            enabled: true,
            keep: 1,
            max_age: Duration::from_secs(86_400),
        };
        let rec = |t: i64| SnapshotRecord {
            id: id("s", "rg", "x"),
            taken_at: Time(at(t)),
            step: Step::rung(Rung::Restart),
            used: true,
        };
        assert!(!prune_due(&[rec(10 * DAY)], &policy, at(10 * DAY + 5)));
        assert!(prune_due(&[rec(10 * DAY)], &policy, at(12 * DAY)));
        assert!(prune_due(
            &[rec(10 * DAY), rec(10 * DAY)],
            &policy,
            at(10 * DAY + 5)
        ));
    }
}
