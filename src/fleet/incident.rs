//! Incident objects: the `RdpHealth` a fleet creates for a member that became unreachable, and
//! when it goes away again. Pure.

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::{apimachinery::pkg::apis::meta::v1::OwnerReference, jiff::Timestamp};
use kube::api::ObjectMeta;
use sha2::{Digest, Sha256};

use crate::{
    api::{
        FLEET_LABEL, MAX_DISRUPTIVE_ANNOTATION, RESOURCE_ID_ANNOTATION, RdpHealth, RdpHealthFleet,
        VM_LABEL, conditions as types,
    },
    azure::DiscoveredVm,
    controller::PAUSE_ANNOTATION,
    engine::{Status, conditions},
    ladder::fleet::ClaimGroup,
};

use super::member::IncidentView;

/// The longest label value Kubernetes accepts.
const LABEL_VALUE_MAX: usize = 63;
/// The longest object name this operator gives an incident (a DNS subdomain allows 253).
const NAME_MAX: usize = 200;

/// The first 8 hex digits of the SHA-256 of `text`: short, stable across versions.
fn short_hash(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    digest[..4].iter().map(|b| format!("{b:02x}")).collect()
}

/// `text` lowercased with every character outside `[a-z0-9-]` replaced by `-`, trimmed of
/// leading and trailing `-`.
fn dns_label_chars(text: &str) -> String {
    let mapped: String = text
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                c
            } else {
                '-'
            }
        })
        .collect();
    mapped.trim_matches('-').to_owned()
}

/// The incident object's name: `<fleet>-<vm>-<hash of the VM's resource id>`. The hash keeps
/// two VMs of the same name in different resource groups apart; the name is the same for the
/// same VM every time, so a second creation meets the first (409) instead of duplicating it.
pub fn incident_name(fleet: &str, vm: &DiscoveredVm) -> String {
    let hash = short_hash(&vm.vm.id().to_ascii_lowercase());
    let mut base = format!(
        "{}-{}",
        dns_label_chars(fleet),
        dns_label_chars(&vm.vm.name)
    );
    base.truncate(NAME_MAX - hash.len() - 1);
    let base = base.trim_end_matches('-');
    format!("{base}-{hash}")
}

/// A label value for `text`: itself when it is one, else a readable prefix and a hash.
pub fn label_value(text: &str) -> String {
    let valid = text.len() <= LABEL_VALUE_MAX
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && text.starts_with(|c: char| c.is_ascii_alphanumeric())
        && text.ends_with(|c: char| c.is_ascii_alphanumeric());
    if valid {
        return text.to_owned();
    }
    let hash = short_hash(text);
    let mut prefix = dns_label_chars(text);
    prefix.truncate(LABEL_VALUE_MAX - hash.len() - 1);
    let prefix = prefix.trim_end_matches('-');
    if prefix.is_empty() {
        hash
    } else {
        format!("{prefix}-{hash}")
    }
}

/// Why an incident object is created on hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    /// For the fleet's Event.
    pub why: String,
}

/// The incident object for `vm`: the fleet's template with the VM, owned by the fleet (a
/// deleted fleet takes its incidents with it), labelled with the fleet and the VM. With a
/// `hold`, it carries the pause annotation: it probes and gathers evidence, no rung runs.
pub fn incident_object(
    fleet: &RdpHealthFleet,
    vm: &DiscoveredVm,
    hold: Option<&Hold>,
) -> RdpHealth {
    let fleet_name = fleet.metadata.name.clone().unwrap_or_default();
    let spec = super::policy::template_spec(fleet, vm.vm.id());
    let mut annotations = BTreeMap::from([(RESOURCE_ID_ANNOTATION.to_owned(), vm.vm.id())]);
    if hold.is_some() {
        annotations.insert(PAUSE_ANNOTATION.to_owned(), "true".to_owned());
    }
    if let Some(max) = max_disruptive(fleet) {
        annotations.insert(MAX_DISRUPTIVE_ANNOTATION.to_owned(), max);
    }
    let owner = OwnerReference {
        api_version: format!("{}/{}", crate::api::GROUP, crate::api::VERSION),
        kind: "RdpHealthFleet".into(),
        name: fleet_name.clone(),
        uid: fleet.metadata.uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    };
    RdpHealth {
        metadata: ObjectMeta {
            name: Some(incident_name(&fleet_name, vm)),
            namespace: fleet.metadata.namespace.clone(),
            labels: Some(BTreeMap::from([
                (FLEET_LABEL.to_owned(), label_value(&fleet_name)),
                (VM_LABEL.to_owned(), label_value(&vm.vm.name)),
            ])),
            annotations: Some(annotations),
            owner_references: Some(vec![owner]),
            ..ObjectMeta::default()
        },
        spec,
        status: None,
    }
}

/// The value of the cap annotation `fleet`'s incidents carry: its
/// `safety.maxConcurrentDisruptive`, if it sets one.
pub fn max_disruptive(fleet: &RdpHealthFleet) -> Option<String> {
    fleet
        .spec
        .safety
        .max_concurrent_disruptive
        .map(|n| n.to_string())
}

/// Whether incident `obj`'s cap annotation differs from what `fleet` asks for now (the
/// fleet's worker then rewrites it).
pub fn cap_stale(obj: &RdpHealth, fleet: &RdpHealthFleet) -> bool {
    let current = obj
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(MAX_DISRUPTIVE_ANNOTATION));
    current.cloned() != max_disruptive(fleet)
}

/// Sets annotation `key` of `obj` to `value`, or removes it with `None`.
pub fn set_annotation(obj: &mut RdpHealth, key: &str, value: Option<&str>) {
    let annotations = obj.metadata.annotations.get_or_insert_default();
    match value {
        Some(v) => annotations.insert(key.to_owned(), v.to_owned()),
        None => annotations.remove(key),
    };
}

/// The claim group whose cap `obj`'s disruptive rungs count against besides its
/// subscription's: its fleet's, when it carries the fleet label and the cap annotation. A cap
/// that is not a number allows no rung (when in doubt, wait).
pub fn claim_group(obj: &RdpHealth) -> Option<ClaimGroup> {
    let fleet = obj.metadata.labels.as_ref()?.get(FLEET_LABEL)?;
    let max = obj
        .metadata
        .annotations
        .as_ref()?
        .get(MAX_DISRUPTIVE_ANNOTATION)?;
    Some(ClaimGroup {
        id: format!(
            "{}/{fleet}",
            obj.metadata.namespace.as_deref().unwrap_or_default()
        ),
        max: max.trim().parse().unwrap_or(0),
    })
}

/// Whether `obj` is an incident of the fleet whose UID is `fleet_uid` (its controller owner).
pub fn owned_by(obj: &RdpHealth, fleet_uid: &str) -> bool {
    obj.metadata
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.controller == Some(true) && o.kind == "RdpHealthFleet" && o.uid == fleet_uid)
}

/// What an incident object's status says about its member.
pub fn view_of(obj: &RdpHealth) -> IncidentView {
    let status = obj.status.as_ref();
    let reachable = status
        .and_then(|s| conditions::find(&s.conditions, types::REACHABLE))
        .map(|c| Status::parse(&c.status))
        .unwrap_or(Status::Unknown);
    let condition = status.and_then(|s| conditions::find(&s.conditions, types::REACHABLE));
    IncidentView {
        reachable,
        reason: (reachable == Status::False)
            .then(|| condition.map(|c| c.reason.clone()))
            .flatten(),
        since: condition.map(|c| c.last_transition_time.0),
    }
}

/// Why an incident object is deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Close {
    /// Reachable again for the whole retention.
    Recovered,
    /// The VM left the fleet (deleted in Azure, or no longer selected).
    LeftFleet,
    /// Another object (hand-written) watches the VM now: the explicit object wins.
    Superseded,
}

/// Whether the fleet deletes its incident object now: never while a rung is in flight (its
/// write-ahead intent lives in the object's status); when the VM left the fleet or another
/// object watches it; or when it has been well for `retention`: reachable, no incident open in
/// its ladder, no expired certificate, not flapping, counted from the last of those changes.
pub fn close(
    obj: &RdpHealth,
    member_present: bool,
    superseded: bool,
    retention: Duration,
    now: Timestamp,
) -> Option<Close> {
    let status = obj.status.as_ref();
    if status.is_some_and(|s| s.ladder.current.is_some()) {
        return None;
    }
    if !member_present {
        return Some(Close::LeftFleet);
    }
    if superseded {
        return Some(Close::Superseded);
    }
    let status = status?;
    let reachable = conditions::find(&status.conditions, types::REACHABLE)?;
    if Status::parse(&reachable.status) != Status::True
        || status.ladder.incident_started_at.is_some()
        || certificate_expired(status)
        || crate::engine::remediate::flapping(&status.recent_probes)
    {
        return None;
    }
    let quiet_since = [
        Some(reachable.last_transition_time.0),
        status.ladder.last_ladder_ended_at.as_ref().map(|t| t.0),
        status.ladder.history.last().map(|r| r.finished_at.0),
    ]
    .into_iter()
    .flatten()
    .max()?;
    let retention = k8s_openapi::jiff::SignedDuration::try_from(retention).ok()?;
    (now.duration_since(quiet_since) >= retention).then_some(Close::Recovered)
}

/// The object's last probe saw an expired certificate.
fn certificate_expired(status: &crate::api::RdpHealthStatus) -> bool {
    conditions::find(&status.conditions, types::CERTIFICATE_VALID).is_some_and(|c| {
        c.status == "False" && c.reason == crate::api::reasons::CERTIFICATE_EXPIRED
    })
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

    use super::*;
    use crate::{
        api::{FleetSelector, RdpHealthFleetSpec, RdpHealthStatus},
        azure::VmRef,
    };

    fn vm(group: &str, name: &str) -> DiscoveredVm {
        DiscoveredVm {
            vm: VmRef::new("00000000-0000-0000-0000-000000000001", group, name),
            location: "westeurope".into(),
            tags: BTreeMap::new(),
            power_state: None,
            computer_name: None,
            private_ip: Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 4))),
            public_ip: None,
        }
    }

    fn fleet() -> RdpHealthFleet {
        let mut f = RdpHealthFleet::new(
            "prod",
            RdpHealthFleetSpec {
                selector: FleetSelector::of_subscriptions(vec![
                    "00000000-0000-0000-0000-000000000001".into(),
                ]),
                template: Default::default(),
                safety: Default::default(),
                discovery_interval: "10m".into(),
                incident_retention: "24h".into(),
                suspend: false,
            },
        );
        f.metadata.namespace = Some("ops".into());
        f.metadata.uid = Some("uid-1".into());
        f
    }

    #[test]
    fn names_are_stable_valid_and_apart_across_resource_groups() {
        let a = incident_name("prod", &vm("rg-a", "Jump_01"));
        let b = incident_name("prod", &vm("rg-b", "Jump_01"));
        assert_ne!(a, b);
        assert_eq!(
            a,
            incident_name("prod", &vm("RG-A", "jump_01")),
            "ids are case-insensitive"
        );
        assert!(a.starts_with("prod-jump-01-"), "{a}");
        let long = incident_name(&"f".repeat(250), &vm("rg", &"v".repeat(64)));
        assert!(long.len() <= NAME_MAX, "{}", long.len());
        for name in [&a, &b, &long] {
            assert!(
                name.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
            );
            assert!(!name.starts_with('-') && !name.ends_with('-'));
        }
    }

    #[test]
    fn label_values_fit_kubernetes_rules() {
        assert_eq!(label_value("jump-01"), "jump-01");
        assert_eq!(label_value("Jump_01.x"), "Jump_01.x");
        let long = label_value(&"v".repeat(64));
        assert!(long.len() <= LABEL_VALUE_MAX && long.ends_with(&short_hash(&"v".repeat(64))));
        assert_eq!(label_value("_x_").len(), 10, "x plus a hash");
    }

    #[test]
    fn the_incident_carries_the_template_the_owner_and_the_hold() {
        let mut f = fleet();
        f.spec.template.endpoint.port = 3390;
        f.spec.template.probe.interval = "1m".into();
        let obj = incident_object(&f, &vm("rg", "jump-01"), None);
        assert_eq!(obj.metadata.namespace.as_deref(), Some("ops"));
        assert_eq!(obj.spec.endpoint.port, 3390);
        assert_eq!(
            obj.spec.endpoint.host, None,
            "the address comes from Azure, as for any object"
        );
        assert_eq!(obj.spec.probe.interval, "1m");
        assert!(
            obj.spec
                .vm
                .resource_id
                .ends_with("/virtualMachines/jump-01")
        );
        assert!(owned_by(&obj, "uid-1"));
        assert!(!owned_by(&obj, "uid-2"));
        let labels = obj.metadata.labels.clone().unwrap();
        assert_eq!(labels[FLEET_LABEL], "prod");
        assert_eq!(labels[VM_LABEL], "jump-01");
        let annotations = obj.metadata.annotations.clone().unwrap();
        assert!(!annotations.contains_key(PAUSE_ANNOTATION));
        let held = incident_object(&f, &vm("rg", "jump-01"), Some(&Hold { why: "x".into() }));
        assert_eq!(held.metadata.annotations.unwrap()[PAUSE_ANNOTATION], "true");
    }

    #[test]
    fn a_fleet_cap_groups_its_incidents_and_follows_the_fleet() {
        let mut f = fleet();
        let obj = incident_object(&f, &vm("rg", "a"), None);
        assert_eq!(claim_group(&obj), None, "no fleet cap: no group");
        assert!(!cap_stale(&obj, &f));
        f.spec.safety.max_concurrent_disruptive = Some(2);
        assert!(cap_stale(&obj, &f), "the fleet set a cap since");
        let obj = incident_object(&f, &vm("rg", "a"), None);
        assert!(!cap_stale(&obj, &f));
        let group = claim_group(&obj).unwrap();
        assert_eq!((group.id.as_str(), group.max), ("ops/prod", 2));
        // Two incidents of one fleet share the group, whatever their VM.
        let other = incident_object(&f, &vm("rg2", "b"), None);
        assert_eq!(claim_group(&other), Some(group));
        // Edited by hand into garbage: no rung may run rather than an unbounded number.
        let mut garbled = obj.clone();
        garbled
            .metadata
            .annotations
            .as_mut()
            .unwrap()
            .insert(MAX_DISRUPTIVE_ANNOTATION.into(), "lots".into());
        assert_eq!(claim_group(&garbled).unwrap().max, 0);
        assert!(cap_stale(&garbled, &f));
        // The label names the group: without it the annotation groups nothing.
        let mut unlabelled = obj;
        unlabelled.metadata.labels = None;
        assert_eq!(claim_group(&unlabelled), None);
    }

    fn with_reachable(status: &str, since: Timestamp) -> RdpHealth {
        let mut obj = incident_object(&fleet(), &vm("rg", "a"), None);
        obj.status = Some(RdpHealthStatus {
            conditions: vec![Condition {
                type_: types::REACHABLE.into(),
                status: status.into(),
                reason: "Reachable".into(),
                message: String::new(),
                last_transition_time: Time(since),
                observed_generation: None,
            }],
            ..RdpHealthStatus::default()
        });
        obj
    }

    #[test]
    fn an_incident_closes_after_the_retention_or_when_its_vm_left() {
        let t0 = Timestamp::from_second(1_800_000_000).unwrap();
        let day = Duration::from_secs(86_400);
        let later = |s: i64| Timestamp::from_second(1_800_000_000 + s).unwrap();
        let up = with_reachable("True", t0);
        assert_eq!(close(&up, true, false, day, later(86_399)), None);
        assert_eq!(
            close(&up, true, false, day, later(86_400)),
            Some(Close::Recovered)
        );
        let down = with_reachable("False", t0);
        assert_eq!(close(&down, true, false, day, later(1_000_000)), None);
        assert_eq!(
            close(&down, false, false, day, later(1)),
            Some(Close::LeftFleet)
        );
        let mut expired = with_reachable("True", t0);
        if let Some(s) = expired.status.as_mut() {
            s.conditions.push(Condition {
                type_: types::CERTIFICATE_VALID.into(),
                status: "False".into(),
                reason: crate::api::reasons::CERTIFICATE_EXPIRED.into(),
                message: String::new(),
                last_transition_time: Time(t0),
                observed_generation: None,
            });
        }
        assert_eq!(
            close(&expired, true, false, day, later(1_000_000)),
            None,
            "still in trouble"
        );
        let mut flapping = with_reachable("True", t0);
        if let Some(s) = flapping.status.as_mut() {
            s.recent_probes = "101010101010".into();
        }
        assert_eq!(
            close(&flapping, true, false, day, later(1_000_000)),
            None,
            "flapping"
        );
        // Retention counts from the ladder's end when that came later.
        let mut fixed = with_reachable("True", t0);
        if let Some(s) = fixed.status.as_mut() {
            s.ladder.last_ladder_ended_at = Some(Time(later(1000)));
        }
        assert_eq!(close(&fixed, true, false, day, later(86_400)), None);
        assert_eq!(
            close(&fixed, true, false, day, later(87_400)),
            Some(Close::Recovered)
        );
        let fresh = incident_object(&fleet(), &vm("rg", "a"), None);
        assert_eq!(
            close(&fresh, true, false, Duration::ZERO, later(1)),
            None,
            "not judged yet"
        );
        assert_eq!(
            close(&down, true, true, day, later(1)),
            Some(Close::Superseded)
        );
    }

    #[test]
    fn an_incident_with_a_rung_in_flight_is_never_deleted() {
        let t0 = Timestamp::from_second(1_800_000_000).unwrap();
        let mut obj = with_reachable("True", t0);
        let status: RdpHealthStatus = serde_json::from_value(serde_json::json!({
            "ladder": {"current": {"step": {"rung": "Restart"}, "phase": "Running", "attempt": 1,
                       "startedAt": "2027-01-15T08:00:00Z"}}
        }))
        .unwrap();
        let Some(s) = obj.status.as_mut() else {
            unreachable!()
        };
        s.ladder = status.ladder;
        assert!(
            s.ladder.current.is_some(),
            "the fixture has a rung in flight"
        );
        let later = Timestamp::from_second(1_900_000_000).unwrap();
        assert_eq!(close(&obj, false, false, Duration::ZERO, later), None);
        assert_eq!(close(&obj, true, true, Duration::ZERO, later), None);
        assert_eq!(close(&obj, true, false, Duration::ZERO, later), None);
    }
}
