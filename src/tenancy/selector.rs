//! Namespace label selectors in a tenancy policy, with Kubernetes semantics: `matchLabels`
//! and every `matchExpressions` requirement must hold (`In`, `NotIn`, `Exists`,
//! `DoesNotExist`). Matching itself is kube's [`Selector`]; this module parses the policy's
//! spelling strictly (unknown keys, an operator's missing or superfluous values, and a selector
//! that would select every namespace are refused).

use std::collections::{BTreeMap, BTreeSet};

use kube::core::{Expression, Selector, SelectorExt};
use serde::Deserialize;

/// A `namespaceSelector` as written in the policy.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SelectorSpec {
    /// Labels that must all be present with these values.
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
    /// Requirements that must all hold.
    #[serde(default)]
    pub match_expressions: Vec<Requirement>,
}

/// One `matchExpressions` entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Requirement {
    /// The label key.
    pub key: String,
    /// How the label is compared.
    pub operator: Operator,
    /// Values for `In` and `NotIn` (at least one); none for `Exists` and `DoesNotExist`.
    #[serde(default)]
    pub values: Vec<String>,
}

/// A requirement's operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Operator {
    /// The label is present with one of the values.
    In,
    /// The label is absent or has none of the values.
    NotIn,
    /// The label is present, whatever its value.
    Exists,
    /// The label is absent.
    DoesNotExist,
}

/// A checked selector, ready to match namespaces' labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceSelector(Selector);

impl NamespaceSelector {
    /// Checks `spec`: a selector that selects every namespace, an `In`/`NotIn` without values
    /// or an `Exists`/`DoesNotExist` with values is refused.
    pub fn compile(spec: &SelectorSpec) -> Result<Self, String> {
        if spec.match_labels.is_empty() && spec.match_expressions.is_empty() {
            return Err(
                "an empty namespaceSelector would select every namespace; name the labels it needs"
                    .into(),
            );
        }
        let mut selector: Selector = spec
            .match_labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for r in &spec.match_expressions {
            selector.extend(expression(r)?);
        }
        Ok(Self(selector))
    }

    /// Whether a namespace with `labels` is selected.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.matches(labels)
    }
}

impl std::fmt::Display for NamespaceSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

fn expression(r: &Requirement) -> Result<Expression, String> {
    if r.key.trim().is_empty() {
        return Err("a matchExpressions entry has an empty key".into());
    }
    let values: BTreeSet<String> = r.values.iter().cloned().collect();
    let key = r.key.clone();
    match (r.operator, values.is_empty()) {
        (Operator::In, false) => Ok(Expression::In(key, values)),
        (Operator::NotIn, false) => Ok(Expression::NotIn(key, values)),
        (Operator::Exists, true) => Ok(Expression::Exists(key)),
        (Operator::DoesNotExist, true) => Ok(Expression::DoesNotExist(key)),
        (op @ (Operator::In | Operator::NotIn), true) => Err(format!(
            "matchExpressions {:?} {op:?} needs at least one value",
            r.key
        )),
        (op, false) => Err(format!(
            "matchExpressions {:?} {op:?} takes no values",
            r.key
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect()
    }

    fn selector(yaml: &str) -> Result<NamespaceSelector, String> {
        let spec: SelectorSpec = serde_saphyr::from_str(yaml).map_err(|e| e.to_string())?;
        NamespaceSelector::compile(&spec)
    }

    #[rstest]
    #[case::labels_equal("matchLabels: {tenant: a}", &[("tenant", "a")], true)]
    #[case::labels_other_value("matchLabels: {tenant: a}", &[("tenant", "b")], false)]
    #[case::labels_missing("matchLabels: {tenant: a}", &[], false)]
    #[case::labels_all_needed("matchLabels: {tenant: a, env: prod}", &[("tenant", "a")], false)]
    #[case::labels_extra_ok("matchLabels: {tenant: a}", &[("tenant", "a"), ("x", "y")], true)]
    #[case::in_one_of("matchExpressions: [{key: env, operator: In, values: [prod, stage]}]", &[("env", "stage")], true)]
    #[case::in_none_of("matchExpressions: [{key: env, operator: In, values: [prod]}]", &[("env", "dev")], false)]
    #[case::in_absent("matchExpressions: [{key: env, operator: In, values: [prod]}]", &[], false)]
    #[case::not_in_other("matchExpressions: [{key: env, operator: NotIn, values: [dev]}]", &[("env", "prod")], true)]
    #[case::not_in_listed("matchExpressions: [{key: env, operator: NotIn, values: [dev]}]", &[("env", "dev")], false)]
    #[case::not_in_absent("matchExpressions: [{key: env, operator: NotIn, values: [dev]}]", &[], true)]
    #[case::exists("matchExpressions: [{key: rdp, operator: Exists}]", &[("rdp", "")], true)]
    #[case::exists_absent("matchExpressions: [{key: rdp, operator: Exists}]", &[("x", "")], false)]
    #[case::does_not_exist("matchExpressions: [{key: frozen, operator: DoesNotExist}]", &[("x", "y")], true)]
    #[case::does_not_exist_present("matchExpressions: [{key: frozen, operator: DoesNotExist}]", &[("frozen", "no")], false)]
    #[case::labels_and_expressions(
        "{matchLabels: {tenant: a}, matchExpressions: [{key: frozen, operator: DoesNotExist}]}",
        &[("tenant", "a"), ("frozen", "1")],
        false
    )]
    #[case::value_case_matters("matchLabels: {tenant: a}", &[("tenant", "A")], false)]
    fn matching(#[case] yaml: &str, #[case] ns: &[(&str, &str)], #[case] selected: bool) {
        let s = selector(yaml).unwrap();
        assert_eq!(s.matches(&labels(ns)), selected, "{yaml} on {ns:?}");
    }

    #[rstest]
    #[case::empty("{}")]
    #[case::empty_lists("{matchLabels: {}, matchExpressions: []}")]
    #[case::in_without_values("matchExpressions: [{key: env, operator: In}]")]
    #[case::not_in_empty_values("matchExpressions: [{key: env, operator: NotIn, values: []}]")]
    #[case::exists_with_values("matchExpressions: [{key: env, operator: Exists, values: [a]}]")]
    #[case::unknown_operator("matchExpressions: [{key: env, operator: Equals, values: [a]}]")]
    #[case::lowercase_operator("matchExpressions: [{key: env, operator: in, values: [a]}]")]
    #[case::empty_key("matchExpressions: [{key: '', operator: Exists}]")]
    #[case::unknown_field("{matchLabels: {a: b}, matchFields: []}")]
    fn invalid_selectors_are_refused(#[case] yaml: &str) {
        assert!(selector(yaml).is_err(), "{yaml}");
    }
}
