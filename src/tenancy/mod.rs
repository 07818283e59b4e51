//! Tenancy: which Azure scopes each namespace may name, and with which Azure identity
//! (`--tenancy-policy FILE`, chart value `tenancy.namespaces`). Without a policy every
//! namespace may name every VM the operator's identity reaches; with one, a namespace that no
//! entry grants may name none, and an object naming a VM outside its namespace's scopes is
//! `Valid=False` and causes no Azure call.
//!
//! ```yaml
//! namespaces:
//!   - name: team-a
//!     scopes:
//!       - /subscriptions/00000000-0000-0000-0000-00000000000a
//!     azureClientId: 11111111-1111-1111-1111-111111111111
//!   - namespaceSelector:
//!       matchLabels: {rdphealth.io/tenant: shared}
//!       matchExpressions: [{key: frozen, operator: DoesNotExist}]
//!     scopes:
//!       - /subscriptions/00000000-0000-0000-0000-00000000000b/resourceGroups/shared-rdp
//! ```
//!
//! An entry names its namespace by `name` or by `namespaceSelector` (Kubernetes label
//! selector semantics), never both. Which entries apply to a namespace:
//! - an entry with its exact `name` wins, and selectors are not consulted;
//! - otherwise every selector entry that matches its labels applies, and their scopes add up,
//!   provided they all name the same Azure identity (or all none); matches that name
//!   different identities are ambiguous and grant nothing;
//! - otherwise the namespace is granted nothing.
//!
//! `azureClientId` (and `azureTenantId`, default the operator's own tenant) makes every ARM
//! request for the namespace's objects use that workload identity instead of the operator's:
//! the operator's projected service-account token is exchanged for that client ID. There is no
//! fallback to the operator's identity for such a namespace.
//!
//! Subscription IDs and resource-group names are compared case-insensitively, as Azure does.

mod selector;

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;

pub use self::selector::{NamespaceSelector, Operator, Requirement, SelectorSpec};
use crate::{
    azure::AzureIdentity,
    engine::{VmId, spec::is_guid},
};

/// One policy entry as written in the file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct EntrySpec {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    namespace_selector: Option<SelectorSpec>,
    scopes: Vec<String>,
    #[serde(default)]
    azure_client_id: Option<String>,
    #[serde(default)]
    azure_tenant_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PolicySpec {
    namespaces: Vec<EntrySpec>,
}

/// The operator-level policy, checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TenancyPolicy {
    entries: Vec<Entry>,
}

/// Which namespaces an entry is for.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    Name(String),
    Selector(NamespaceSelector),
}

/// What one entry grants.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    target: Target,
    /// As written (for messages).
    scopes_text: Vec<String>,
    scopes: Vec<Scope>,
    identity: Option<AzureIdentity>,
}

/// A scope, normalised (lower case).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Scope {
    Subscription(String),
    ResourceGroup(String, String),
}

/// What a namespace is granted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    namespace: String,
    scopes: BTreeSet<Scope>,
    scopes_text: Vec<String>,
    /// The identity every ARM request for the namespace's objects uses; `None`: the operator's.
    pub identity: Option<AzureIdentity>,
}

/// Why a namespace has no grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NoGrant {
    /// The policy refuses it (the message is shown in `Valid`).
    Refused(String),
    /// The policy selects namespaces by label and this namespace's labels are not known yet:
    /// do nothing until they are.
    LabelsUnknown,
}

/// Why a policy file is unusable.
#[derive(Debug, thiserror::Error)]
pub enum TenancyError {
    /// The file could not be read.
    #[error("failed to read the tenancy policy {path}")]
    Read {
        /// The path.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a policy.
    #[error("the tenancy policy is invalid: {0}")]
    Invalid(String),
}

impl TenancyError {
    /// PascalCase reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Read { .. } => "TenancyPolicyUnreadable",
            Self::Invalid(_) => "TenancyPolicyInvalid",
        }
    }
}

fn parse_scope(s: &str) -> Option<Scope> {
    let parts: Vec<&str> = s.trim().trim_end_matches('/').split('/').collect();
    match parts.as_slice() {
        ["", sub_kw, sub] if sub_kw.eq_ignore_ascii_case("subscriptions") && !sub.is_empty() => {
            Some(Scope::Subscription(sub.to_ascii_lowercase()))
        }
        ["", sub_kw, sub, rg_kw, rg]
            if sub_kw.eq_ignore_ascii_case("subscriptions")
                && rg_kw.eq_ignore_ascii_case("resourceGroups")
                && !sub.is_empty()
                && !rg.is_empty() =>
        {
            Some(Scope::ResourceGroup(
                sub.to_ascii_lowercase(),
                rg.to_ascii_lowercase(),
            ))
        }
        _ => None,
    }
}

impl EntrySpec {
    fn label(&self, index: usize) -> String {
        match &self.name {
            Some(name) => format!("namespace {name:?}"),
            None => format!("entry {}", index + 1),
        }
    }

    fn check(self, index: usize) -> Result<Entry, String> {
        let label = self.label(index);
        let target = match (self.name, &self.namespace_selector) {
            (Some(name), None) if !name.trim().is_empty() => Target::Name(name),
            (None, Some(spec)) => Target::Selector(
                NamespaceSelector::compile(spec).map_err(|e| format!("{label}: {e}"))?,
            ),
            (Some(_), Some(_)) => {
                return Err(format!(
                    "{label}: an entry names its namespace by name or by namespaceSelector, not both"
                ));
            }
            _ => {
                return Err(format!(
                    "{label}: an entry needs a name or a namespaceSelector"
                ));
            }
        };
        let mut scopes = Vec::new();
        for s in &self.scopes {
            scopes.push(parse_scope(s).ok_or_else(|| format!(
                "{label}: {s:?} is not /subscriptions/{{id}} or /subscriptions/{{id}}/resourceGroups/{{name}}"
            ))?);
        }
        let identity = match (self.azure_client_id, self.azure_tenant_id) {
            (None, None) => None,
            (None, Some(_)) => {
                return Err(format!("{label}: azureTenantId needs azureClientId"));
            }
            (Some(client), tenant) => {
                for (field, id) in [
                    ("azureClientId", Some(&client)),
                    ("azureTenantId", tenant.as_ref()),
                ] {
                    if let Some(id) = id.filter(|id| !is_guid(id)) {
                        return Err(format!("{label}: {field} {id:?} is not a GUID"));
                    }
                }
                Some(AzureIdentity {
                    client_id: client.to_ascii_lowercase(),
                    tenant_id: tenant.map(|t| t.to_ascii_lowercase()),
                })
            }
        };
        Ok(Entry {
            target,
            scopes_text: self.scopes,
            scopes,
            identity,
        })
    }
}

impl TenancyPolicy {
    /// Parses a policy file (YAML) and checks every entry: a name or a selector, every scope,
    /// the identity's IDs, and that no namespace is named twice.
    pub fn from_yaml(text: &str) -> Result<Self, TenancyError> {
        let spec: PolicySpec =
            serde_saphyr::from_str(text).map_err(|e| TenancyError::Invalid(e.to_string()))?;
        let mut named = BTreeSet::new();
        let mut entries = Vec::with_capacity(spec.namespaces.len());
        for (index, entry) in spec.namespaces.into_iter().enumerate() {
            if let Some(name) = &entry.name
                && !named.insert(name.clone())
            {
                return Err(TenancyError::Invalid(format!(
                    "namespace {name:?} is listed twice"
                )));
            }
            entries.push(entry.check(index).map_err(TenancyError::Invalid)?);
        }
        Ok(Self { entries })
    }

    /// Reads a policy file.
    pub fn load(path: &std::path::Path) -> Result<Self, TenancyError> {
        let text = std::fs::read_to_string(path).map_err(|source| TenancyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_yaml(&text)
    }

    /// Whether some entry selects namespaces by label (the operator then follows Namespaces).
    pub fn selects_by_label(&self) -> bool {
        self.entries
            .iter()
            .any(|e| matches!(e.target, Target::Selector(_)))
    }

    /// What `namespace` is granted; `labels` are its labels when known (needed only when no
    /// entry names it and some entry selects by label).
    pub fn grant(
        &self,
        namespace: &str,
        labels: Option<&BTreeMap<String, String>>,
    ) -> Result<Grant, NoGrant> {
        let named = self
            .entries
            .iter()
            .find(|e| matches!(&e.target, Target::Name(n) if n == namespace));
        if let Some(entry) = named {
            return Ok(Grant::of(namespace, [entry]));
        }
        let nothing = || {
            NoGrant::Refused(format!(
                "the operator's tenancy policy grants namespace {namespace:?} no Azure scope, so it may name no VM"
            ))
        };
        if !self.selects_by_label() {
            return Err(nothing());
        }
        let labels = labels.ok_or(NoGrant::LabelsUnknown)?;
        let matching: Vec<(usize, &Entry)> = self
            .entries
            .iter()
            .enumerate()
            .filter(|(_, e)| matches!(&e.target, Target::Selector(s) if s.matches(labels)))
            .collect();
        let Some((first_index, first)) = matching.first() else {
            return Err(nothing());
        };
        if let Some((other_index, other)) =
            matching.iter().find(|(_, e)| e.identity != first.identity)
        {
            return Err(NoGrant::Refused(format!(
                "namespace {namespace:?} matches the namespaceSelectors of tenancy policy entries {} ({}) and {} ({}), which name different Azure identities; the policy is ambiguous for it, so it may name no VM",
                first_index + 1,
                selector_text(first),
                other_index + 1,
                selector_text(other),
            )));
        }
        Ok(Grant::of(namespace, matching.iter().map(|(_, e)| *e)))
    }
}

fn selector_text(entry: &Entry) -> String {
    match &entry.target {
        Target::Selector(s) => s.to_string(),
        Target::Name(n) => n.clone(),
    }
}

impl Grant {
    fn of<'a>(namespace: &str, entries: impl IntoIterator<Item = &'a Entry>) -> Self {
        let mut grant = Self {
            namespace: namespace.to_string(),
            scopes: BTreeSet::new(),
            scopes_text: Vec::new(),
            identity: None,
        };
        for entry in entries {
            grant.scopes.extend(entry.scopes.iter().cloned());
            grant.scopes_text.extend(entry.scopes_text.iter().cloned());
            grant.identity.clone_from(&entry.identity);
        }
        grant
    }

    /// Whether the namespace may name `vm`; the refusal says why (shown in `Valid`).
    pub fn admit(&self, vm: &VmId) -> Result<(), String> {
        let sub = vm.subscription.to_ascii_lowercase();
        let group = vm.resource_group.to_ascii_lowercase();
        let inside = self.scopes.iter().any(|scope| match scope {
            Scope::Subscription(s) => *s == sub,
            Scope::ResourceGroup(s, g) => *s == sub && *g == group,
        });
        if inside {
            Ok(())
        } else {
            Err(format!(
                "vm.resourceId is in subscription {} resource group {}, outside the Azure scopes the operator's tenancy policy grants namespace {:?} ({})",
                vm.subscription,
                vm.resource_group,
                self.namespace,
                self.scopes_text.join(", ")
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    const POLICY: &str = "
namespaces:
  - name: team-a
    scopes:
      - /subscriptions/00000000-0000-0000-0000-00000000000A
  - name: team-b
    scopes:
      - /subscriptions/00000000-0000-0000-0000-00000000000b/resourceGroups/Shared-RDP
";

    fn vm(sub: &str, rg: &str) -> VmId {
        VmId {
            subscription: sub.into(),
            resource_group: rg.into(),
            name: "vm-1".into(),
        }
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect()
    }

    const A: &str = "00000000-0000-0000-0000-00000000000a";
    const B: &str = "00000000-0000-0000-0000-00000000000B";
    const C: &str = "00000000-0000-0000-0000-00000000000c";

    #[rstest]
    #[case::own_subscription("team-a", A, "any-rg", true)]
    #[case::subscription_case_differs("team-a", "00000000-0000-0000-0000-00000000000A", "rg", true)]
    #[case::other_subscription("team-a", B, "shared-rdp", false)]
    #[case::own_group_any_case("team-b", B, "SHARED-rdp", true)]
    #[case::other_group_same_subscription("team-b", B, "prod", false)]
    #[case::unlisted_namespace("team-c", A, "rg", false)]
    fn scopes(#[case] ns: &str, #[case] sub: &str, #[case] rg: &str, #[case] ok: bool) {
        let policy = TenancyPolicy::from_yaml(POLICY).unwrap();
        assert!(!policy.selects_by_label());
        // Names alone never need the namespace's labels.
        let result = match policy.grant(ns, None) {
            Ok(grant) => grant.admit(&vm(sub, rg)),
            Err(NoGrant::Refused(why)) => Err(why),
            Err(NoGrant::LabelsUnknown) => panic!("labels asked for"),
        };
        assert_eq!(result.is_ok(), ok, "{result:?}");
        if let Err(why) = result {
            assert!(why.contains(ns), "{why}");
        }
    }

    const SELECTORS: &str = "
namespaces:
  - name: team-a
    scopes: [/subscriptions/00000000-0000-0000-0000-00000000000a]
  - namespaceSelector: {matchLabels: {tenant: a}}
    scopes: [/subscriptions/00000000-0000-0000-0000-00000000000b]
  - namespaceSelector: {matchExpressions: [{key: rdp, operator: Exists}]}
    scopes: [/subscriptions/00000000-0000-0000-0000-00000000000c]
  - namespaceSelector: {matchLabels: {tenant: x}}
    scopes: [/subscriptions/00000000-0000-0000-0000-00000000000c]
    azureClientId: 11111111-1111-1111-1111-111111111111
  - namespaceSelector: {matchLabels: {team: x}}
    scopes: [/subscriptions/00000000-0000-0000-0000-00000000000a]
    azureClientId: 11111111-1111-1111-1111-111111111111
";

    /// Precedence: an exact name wins over selectors; several selector matches add their
    /// scopes up when they name the same identity; different identities grant nothing.
    #[rstest]
    #[case::name_wins_over_selector("team-a", &[("tenant", "a")], A, Some(true))]
    #[case::name_wins_no_union("team-a", &[("tenant", "a")], B, Some(false))]
    #[case::selected_by_label("ns-1", &[("tenant", "a")], B, Some(true))]
    #[case::selected_other_scope("ns-1", &[("tenant", "a")], A, Some(false))]
    #[case::two_selectors_union_first("ns-2", &[("tenant", "a"), ("rdp", "")], B, Some(true))]
    #[case::two_selectors_union_second("ns-2", &[("tenant", "a"), ("rdp", "")], C, Some(true))]
    #[case::same_identity_union("ns-3", &[("tenant", "x"), ("team", "x")], A, Some(true))]
    #[case::different_identities_refused("ns-4", &[("tenant", "x"), ("rdp", "")], C, None)]
    #[case::no_selector_matches("ns-5", &[("tenant", "b")], A, None)]
    #[case::no_labels("ns-6", &[], A, None)]
    fn selection(
        #[case] ns: &str,
        #[case] ns_labels: &[(&str, &str)],
        #[case] sub: &str,
        #[case] admitted: Option<bool>,
    ) {
        let policy = TenancyPolicy::from_yaml(SELECTORS).unwrap();
        assert!(policy.selects_by_label());
        let grant = policy.grant(ns, Some(&labels(ns_labels)));
        match admitted {
            Some(ok) => {
                let grant = grant.unwrap();
                assert_eq!(grant.admit(&vm(sub, "rg")).is_ok(), ok, "{grant:?}");
            }
            None => match grant {
                Err(NoGrant::Refused(why)) => assert!(why.contains(ns), "{why}"),
                other => panic!("{other:?}"),
            },
        }
    }

    #[test]
    fn ambiguous_identities_say_which_entries() {
        let policy = TenancyPolicy::from_yaml(SELECTORS).unwrap();
        let Err(NoGrant::Refused(why)) =
            policy.grant("ns", Some(&labels(&[("tenant", "x"), ("rdp", "")])))
        else {
            panic!("granted");
        };
        assert!(why.contains("entries 3") && why.contains("and 4"), "{why}");
        assert!(why.contains("different Azure identities"), "{why}");
    }

    #[test]
    fn a_namespace_not_named_waits_for_its_labels() {
        let policy = TenancyPolicy::from_yaml(SELECTORS).unwrap();
        assert_eq!(policy.grant("ns", None), Err(NoGrant::LabelsUnknown));
        assert!(policy.grant("team-a", None).is_ok());
    }

    #[test]
    fn the_identity_comes_with_the_grant() {
        let policy = TenancyPolicy::from_yaml(
            "namespaces:
  - name: a
    scopes: []
    azureClientId: 11111111-AAAA-1111-1111-111111111111
    azureTenantId: 22222222-2222-2222-2222-222222222222
  - name: b
    scopes: []
",
        )
        .unwrap();
        let a = policy.grant("a", None).unwrap();
        assert_eq!(
            a.identity,
            Some(AzureIdentity {
                client_id: "11111111-aaaa-1111-1111-111111111111".into(),
                tenant_id: Some("22222222-2222-2222-2222-222222222222".into()),
            })
        );
        assert_eq!(policy.grant("b", None).unwrap().identity, None);
    }

    #[rstest]
    #[case::bad_scope("namespaces: [{name: a, scopes: [/subscriptions]}]")]
    #[case::provider_scope(
        "namespaces: [{name: a, scopes: [/subscriptions/x/resourceGroups/y/providers/z]}]"
    )]
    #[case::twice("namespaces: [{name: a, scopes: []}, {name: a, scopes: []}]")]
    #[case::unknown_key("namespaces: [{name: a, scopes: [], selector: {}}]")]
    #[case::name_and_selector(
        "namespaces: [{name: a, namespaceSelector: {matchLabels: {a: b}}, scopes: []}]"
    )]
    #[case::neither_name_nor_selector("namespaces: [{scopes: []}]")]
    #[case::empty_name("namespaces: [{name: '', scopes: []}]")]
    #[case::empty_selector("namespaces: [{namespaceSelector: {}, scopes: []}]")]
    #[case::client_id_not_a_guid("namespaces: [{name: a, scopes: [], azureClientId: my-app}]")]
    #[case::tenant_without_client(
        "namespaces: [{name: a, scopes: [], azureTenantId: 22222222-2222-2222-2222-222222222222}]"
    )]
    #[case::tenant_not_a_guid(
        "namespaces: [{name: a, scopes: [], azureClientId: 11111111-1111-1111-1111-111111111111, azureTenantId: contoso}]"
    )]
    fn invalid_policies_are_refused(#[case] text: &str) {
        assert!(TenancyPolicy::from_yaml(text).is_err(), "{text}");
    }
}
