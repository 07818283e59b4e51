//! The documentation that ships with the chart stays in step with what it documents: every
//! CRD field in the configuration reference, every metric in the metrics reference, a runbook
//! section for every alert.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{collections::BTreeSet, fs, path::Path};

use serde_json::Value;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Every property path below `node`, with `[]` for array items: `spec.vm.resourceId`.
fn property_paths(node: &Value, prefix: &str, out: &mut Vec<String>) {
    if let Some(props) = node.get("properties").and_then(Value::as_object) {
        for (name, child) in props {
            let path = format!("{prefix}.{name}");
            out.push(path.clone());
            property_paths(child, &path, out);
        }
    }
    if let Some(items) = node.get("items") {
        property_paths(items, &format!("{prefix}[]"), out);
    }
}

fn crd_spec_paths() -> Vec<String> {
    let crd: Value = serde_saphyr::from_str(&read("crds/rdphealths.rdphealth.io.yaml")).unwrap();
    let spec = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"];
    let mut paths = Vec::new();
    property_paths(spec, "spec", &mut paths);
    paths
}

#[test]
fn configuration_reference_names_every_spec_field() {
    let doc = read("docs/configuration.md");
    let paths = crd_spec_paths();
    assert!(
        paths.contains(&"spec.vm.resourceId".to_string()),
        "{paths:?}"
    );
    let missing: Vec<&String> = paths
        .iter()
        .filter(|p| !doc.contains(&format!("`{p}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/configuration.md does not describe {missing:?} (write each as `spec.a.b`)"
    );
}

#[test]
fn configuration_reference_names_no_field_the_crd_lacks() {
    let doc = read("docs/configuration.md");
    let known: BTreeSet<String> = crd_spec_paths().into_iter().collect();
    let documented: BTreeSet<String> = doc
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|s| s.starts_with("spec.") && !s.contains(' ') && !s.contains('='))
        .map(str::to_string)
        .collect();
    assert!(!documented.is_empty());
    let stale: Vec<&String> = documented.difference(&known).collect();
    assert!(
        stale.is_empty(),
        "docs/configuration.md describes fields the CRD does not have: {stale:?}"
    );
}

/// `rdphealth_*` names in a text, without histogram/counter suffix variants.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for (i, _) in text.match_indices("rdphealth_") {
        if text[..i]
            .chars()
            .last()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            continue;
        }
        let name: String = text[i..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        let base = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|b| b.ends_with("_seconds"))
                    .map(str::to_string)
            })
            .unwrap_or(name);
        names.insert(base);
    }
    names
}

/// Metric names that have a `### name` heading in docs/metrics.md.
fn documented_metrics() -> BTreeSet<String> {
    read("docs/metrics.md")
        .lines()
        .filter_map(|l| l.strip_prefix("### `"))
        .map(|l| l.trim_end_matches('`').to_string())
        .collect()
}

#[test]
fn metrics_reference_lists_every_metric_the_code_registers() {
    let documented = documented_metrics();
    let code: BTreeSet<String> = ["src/metrics.rs", "src/fleet/metrics.rs"]
        .iter()
        .flat_map(|f| metric_names(&read(f)))
        .collect();
    assert!(code.contains("rdphealth_vm_reachable"), "{code:?}");
    let missing: Vec<&String> = code.difference(&documented).collect();
    assert!(
        missing.is_empty(),
        "docs/metrics.md has no section for {missing:?}"
    );
}

#[test]
fn alerts_and_dashboard_use_only_documented_metrics() {
    let documented = documented_metrics();
    for file in [
        "charts/rdphealth-operator/files/prometheus-rules.yaml",
        "charts/rdphealth-operator/files/dashboard.json",
    ] {
        let used = metric_names(&read(file));
        assert!(!used.is_empty(), "{file}");
        let unknown: Vec<&String> = used.difference(&documented).collect();
        assert!(
            unknown.is_empty(),
            "{file} uses metrics docs/metrics.md does not define: {unknown:?}"
        );
    }
}

/// GitHub's heading anchor: lowercase, spaces to dashes, punctuation other than `-`/`_` dropped.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// (alert, runbook anchor) for every alert in the rules file.
fn alerts() -> Vec<(String, String)> {
    let rules: Value = serde_saphyr::from_str(&read(
        "charts/rdphealth-operator/files/prometheus-rules.yaml",
    ))
    .unwrap();
    let mut out = Vec::new();
    for group in rules["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            let name = rule["alert"].as_str().unwrap().to_string();
            let url = rule["annotations"]["runbook_url"].as_str().unwrap();
            let anchor = url
                .strip_prefix("docs/runbooks.md#")
                .unwrap_or_else(|| panic!("{name}: runbook_url {url} is not docs/runbooks.md#…"));
            out.push((name, anchor.to_string()));
        }
    }
    out
}

#[test]
fn every_alert_links_to_its_own_runbook_section() {
    let runbooks = read("docs/runbooks.md");
    let sections: Vec<(String, String)> = runbooks
        .split("\n## ")
        .skip(1)
        .map(|s| {
            let (heading, body) = s.split_once('\n').unwrap();
            (anchor(heading), body.to_string())
        })
        .collect();
    let alerts = alerts();
    assert!(alerts.len() >= 8, "{alerts:?}");
    for (alert, target) in &alerts {
        assert_eq!(
            target,
            &alert.to_lowercase(),
            "{alert} should link to its own section"
        );
        let (_, body) = sections
            .iter()
            .find(|(a, _)| a == target)
            .unwrap_or_else(|| panic!("docs/runbooks.md has no section #{target} for {alert}"));
        for part in [
            "### Meaning",
            "### Impact",
            "### Diagnosis",
            "### Resolution",
        ] {
            assert!(body.contains(part), "runbook of {alert} lacks {part}");
        }
        assert!(
            body.contains("kubectl "),
            "runbook of {alert} has no kubectl step"
        );
    }
}

#[test]
fn anchors_follow_github() {
    assert_eq!(anchor("RdpHealthVmUnreachable"), "rdphealthvmunreachable");
    assert_eq!(
        anchor("Azure auth: AADSTS700024"),
        "azure-auth-aadsts700024"
    );
}
