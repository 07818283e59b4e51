//! Tenancy: which Azure scopes each namespace may name (`--tenancy-policy FILE`, chart value
//! `tenancy.namespaces`). Without a policy every namespace may name every VM the operator's
//! identity reaches; with one, a namespace that no entry names may name none, and an object
//! naming a VM outside its namespace's scopes is `Valid=False` and causes no Azure call.
//!
//! ```yaml
//! namespaces:
//!   - name: team-a
//!     scopes:
//!       - /subscriptions/00000000-0000-0000-0000-00000000000a
//!       - /subscriptions/00000000-0000-0000-0000-00000000000b/resourceGroups/shared-rdp
//! ```
//!
//! Subscription IDs and resource-group names are compared case-insensitively, as Azure does.

use serde::Deserialize;

use crate::engine::VmId;

/// The operator-level policy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TenancyPolicy {
    /// One entry per namespace.
    pub namespaces: Vec<NamespaceGrant>,
}

/// What one namespace may name.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NamespaceGrant {
    /// The namespace.
    pub name: String,
    /// ARM scopes: `/subscriptions/{id}` or `/subscriptions/{id}/resourceGroups/{name}`.
    pub scopes: Vec<String>,
}

/// A scope, normalised (lower case).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Scope {
    Subscription(String),
    ResourceGroup(String, String),
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

impl TenancyPolicy {
    /// Parses a policy file (YAML) and checks every scope and that no namespace is listed twice.
    pub fn from_yaml(text: &str) -> Result<Self, TenancyError> {
        let policy: Self =
            serde_saphyr::from_str(text).map_err(|e| TenancyError::Invalid(e.to_string()))?;
        let mut seen = std::collections::BTreeSet::new();
        for grant in &policy.namespaces {
            if !seen.insert(grant.name.as_str()) {
                return Err(TenancyError::Invalid(format!(
                    "namespace {:?} is listed twice",
                    grant.name
                )));
            }
            if let Some(bad) = grant.scopes.iter().find(|s| parse_scope(s).is_none()) {
                return Err(TenancyError::Invalid(format!(
                    "namespace {:?}: {bad:?} is not /subscriptions/{{id}} or /subscriptions/{{id}}/resourceGroups/{{name}}",
                    grant.name
                )));
            }
        }
        Ok(policy)
    }

    /// Reads a policy file.
    pub fn load(path: &std::path::Path) -> Result<Self, TenancyError> {
        let text = std::fs::read_to_string(path).map_err(|source| TenancyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_yaml(&text)
    }

    /// Whether `namespace` may name `vm`; the refusal says why (shown in `Valid`).
    pub fn admit(&self, namespace: &str, vm: &VmId) -> Result<(), String> {
        let Some(grant) = self.namespaces.iter().find(|g| g.name == namespace) else {
            return Err(format!(
                "the operator's tenancy policy grants namespace {namespace:?} no Azure scope, so it may name no VM"
            ));
        };
        let sub = vm.subscription.to_ascii_lowercase();
        let group = vm.resource_group.to_ascii_lowercase();
        let inside = grant
            .scopes
            .iter()
            .filter_map(|s| parse_scope(s))
            .any(|scope| match scope {
                Scope::Subscription(s) => s == sub,
                Scope::ResourceGroup(s, g) => s == sub && g == group,
            });
        if inside {
            Ok(())
        } else {
            Err(format!(
                "vm.resourceId is in subscription {} resource group {}, outside the Azure scopes the operator's tenancy policy grants namespace {namespace:?} ({})",
                vm.subscription,
                vm.resource_group,
                grant.scopes.join(", ")
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

    const A: &str = "00000000-0000-0000-0000-00000000000a";
    const B: &str = "00000000-0000-0000-0000-00000000000B";

    #[rstest]
    #[case::own_subscription("team-a", A, "any-rg", true)]
    #[case::subscription_case_differs("team-a", "00000000-0000-0000-0000-00000000000A", "rg", true)]
    #[case::other_subscription("team-a", B, "shared-rdp", false)]
    #[case::own_group_any_case("team-b", B, "SHARED-rdp", true)]
    #[case::other_group_same_subscription("team-b", B, "prod", false)]
    #[case::unlisted_namespace("team-c", A, "rg", false)]
    fn scopes(#[case] ns: &str, #[case] sub: &str, #[case] rg: &str, #[case] ok: bool) {
        let policy = TenancyPolicy::from_yaml(POLICY).unwrap();
        let result = policy.admit(ns, &vm(sub, rg));
        assert_eq!(result.is_ok(), ok, "{result:?}");
        if let Err(why) = result {
            assert!(why.contains(ns), "{why}");
        }
    }

    #[rstest]
    #[case::bad_scope("namespaces: [{name: a, scopes: [/subscriptions]}]")]
    #[case::provider_scope(
        "namespaces: [{name: a, scopes: [/subscriptions/x/resourceGroups/y/providers/z]}]"
    )]
    #[case::twice("namespaces: [{name: a, scopes: []}, {name: a, scopes: []}]")]
    #[case::unknown_key("namespaces: [{name: a, scopes: [], selector: {}}]")]
    fn invalid_policies_are_refused(#[case] text: &str) {
        assert!(TenancyPolicy::from_yaml(text).is_err(), "{text}");
    }
}
