//! The Helm chart's files, checked without Helm: YAML and JSON validity, the CRD copy, the
//! values schema against values.yaml, RBAC against the documented list, the Deployment's
//! security settings and the flags the chart passes to the operator.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
};

use serde_json::{Value, json};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn chart() -> PathBuf {
    root().join("charts/rdphealth-operator")
}

fn read(path: impl AsRef<Path>) -> String {
    let path = path.as_ref();
    fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn yaml(path: impl AsRef<Path>) -> Value {
    let path = path.as_ref();
    serde_saphyr::from_str(&read(path)).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every file under `dir`, recursively, sorted.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

fn values() -> Value {
    yaml(chart().join("values.yaml"))
}

fn schema() -> Value {
    serde_json::from_str(&read(chart().join("values.schema.json"))).unwrap()
}

/// Deep merge of Helm values: maps merge, everything else is replaced.
fn merge(base: &mut Value, overlay: &Value) {
    match (base, overlay) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                merge(b.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (b, o) => *b = o.clone(),
    }
}

fn schema_errors(values: &Value) -> Vec<String> {
    let validator = jsonschema::validator_for(&schema()).unwrap();
    validator
        .iter_errors(values)
        .map(|e| format!("{e} at {}", e.instance_path()))
        .collect()
}

#[test]
fn non_template_chart_files_parse() {
    let templates = chart().join("templates");
    let mut checked = 0;
    for path in files_under(&chart()) {
        if path.starts_with(&templates) {
            continue;
        }
        match path.extension().and_then(|e| e.to_str()) {
            Some("yaml" | "yml") => {
                let v = yaml(&path);
                assert!(v.is_object(), "{} is not a YAML mapping", path.display());
            }
            Some("json") => {
                serde_json::from_str::<Value>(&read(&path))
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            }
            _ => continue,
        }
        checked += 1;
    }
    // Chart.yaml, values.yaml, the CRD, the rules and their tests, ci values, schema, dashboard.
    assert!(checked >= 10, "only {checked} files checked");
}

#[test]
fn chart_crds_are_identical_to_the_generated_ones() {
    let names = |dir: &Path| -> BTreeSet<String> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    };
    let generated = root().join("crds");
    let copied = chart().join("crds");
    assert_eq!(
        names(&generated),
        names(&copied),
        "charts/rdphealth-operator/crds/ must hold exactly the files of crds/"
    );
    for name in names(&generated) {
        assert!(
            read(generated.join(&name)) == read(copied.join(&name)),
            "charts/rdphealth-operator/crds/{name} differs from crds/{name}: \
             cp crds/{name} charts/rdphealth-operator/crds/"
        );
    }
}

#[test]
fn chart_yaml_describes_this_release() {
    let chart_yaml = yaml(chart().join("Chart.yaml"));
    assert_eq!(chart_yaml["apiVersion"], "v2");
    assert_eq!(chart_yaml["name"], "rdphealth-operator");
    assert_eq!(chart_yaml["type"], "application");
    assert_eq!(
        chart_yaml["appVersion"],
        env!("CARGO_PKG_VERSION"),
        "appVersion (the default image tag) must follow the crate version"
    );
    let version = chart_yaml["version"].as_str().unwrap();
    let parts: Vec<&str> = version.split('.').collect();
    assert!(
        parts.len() == 3 && parts.iter().all(|p| p.parse::<u32>().is_ok()),
        "chart version {version} is not MAJOR.MINOR.PATCH"
    );
    assert!(chart_yaml["kubeVersion"].as_str().is_some());
}

/// Dotted paths of every key in a values tree; maps below `free` keys are user data.
fn value_paths(v: &Value, prefix: &str, out: &mut Vec<String>) {
    if let Value::Object(map) = v {
        for (k, child) in map {
            let path = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            out.push(path.clone());
            value_paths(child, &path, out);
        }
    }
}

/// The schema node for a dotted path, following `properties` only.
fn schema_node<'a>(schema: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.')
        .try_fold(schema, |node, key| node.get("properties")?.get(key))
}

/// Schema nodes that accept arbitrary keys (labels, resources, security contexts).
fn is_free_form(node: &Value) -> bool {
    node.get("properties").is_none() && node["additionalProperties"] != json!(false)
}

#[test]
fn values_schema_describes_every_value() {
    let schema = schema();
    assert_eq!(schema["additionalProperties"], json!(false));
    let mut paths = Vec::new();
    value_paths(&values(), "", &mut paths);
    let mut free_parents: Vec<String> = Vec::new();
    for path in &paths {
        if free_parents
            .iter()
            .any(|p| path.starts_with(&format!("{p}.")))
        {
            continue;
        }
        let node = schema_node(&schema, path)
            .unwrap_or_else(|| panic!("values.yaml key {path} is missing in values.schema.json"));
        assert!(
            node["description"].as_str().is_some_and(|d| !d.is_empty()),
            "{path} has no description in values.schema.json"
        );
        if is_free_form(node) {
            free_parents.push(path.clone());
        }
    }
    assert!(paths.len() > 40, "{} keys", paths.len());
}

#[test]
fn values_and_ci_values_satisfy_the_schema() {
    let defaults = values();
    assert_eq!(
        schema_errors(&defaults),
        Vec::<String>::new(),
        "values.yaml"
    );
    let ci = files_under(&chart().join("ci"));
    assert!(ci.len() >= 4, "{ci:?}");
    for path in ci {
        let mut merged = defaults.clone();
        merge(&mut merged, &yaml(&path));
        assert_eq!(
            schema_errors(&merged),
            Vec::<String>::new(),
            "{}",
            path.display()
        );
    }
}

#[test]
fn values_schema_rejects_bad_values() {
    let cases = [
        (
            "a typo in a key",
            json!({"leaderElection": {"enable": true}}),
        ),
        (
            "a secret in values",
            json!({"azure": {"clientSecret": {"value": "s3cr3t"}}}),
        ),
        ("zero concurrency", json!({"concurrency": 0})),
        ("an unknown log format", json!({"logFormat": "xml"})),
        (
            "a client ID that is no GUID",
            json!({"azure": {"workloadIdentity": {"clientId": "my-identity"}}}),
        ),
        ("a port out of range", json!({"metrics": {"port": 70000}})),
        (
            "a watch namespace that is no DNS label",
            json!({"watchNamespace": "Windows_Fleet"}),
        ),
        (
            "a runbook base that is no URL",
            json!({"prometheusRule": {"runbookBaseUrl": "docs"}}),
        ),
    ];
    for (what, overlay) in cases {
        let mut merged = values();
        merge(&mut merged, &overlay);
        assert!(
            !schema_errors(&merged).is_empty(),
            "the schema accepts {what}: {overlay}"
        );
    }
}

/// One RBAC rule as written in templates/rbac.yaml: (apiGroup, resource, verb).
type Grant = (String, String, String);

/// Parses the flow-style rules of templates/rbac.yaml, checking that each has a comment.
fn rbac_grants() -> BTreeSet<Grant> {
    let text = read(chart().join("templates/rbac.yaml"));
    let lines: Vec<&str> = text.lines().collect();
    let list = |line: &str, key: &str| -> Vec<String> {
        let rest = line.trim().strip_prefix(key).unwrap().trim();
        let inner = rest.strip_prefix('[').unwrap().strip_suffix(']').unwrap();
        inner
            .split(',')
            .map(|s| s.trim().trim_matches('"').to_string())
            .collect()
    };
    let mut grants = BTreeSet::new();
    let mut rules = 0;
    for (i, line) in lines.iter().enumerate() {
        if !line.trim_start().starts_with("- apiGroups:") {
            continue;
        }
        rules += 1;
        let above = lines[..i]
            .iter()
            .rev()
            .find(|l| !l.trim_start().starts_with("{{"))
            .unwrap();
        assert!(
            above.trim_start().starts_with("# "),
            "RBAC rule at line {} has no comment saying why it is needed",
            i + 1
        );
        let groups = list(line.trim_start().strip_prefix("- ").unwrap(), "apiGroups:");
        let mut resources = Vec::new();
        let mut verbs = Vec::new();
        for next in &lines[i + 1..] {
            let t = next.trim_start();
            if t.starts_with("resources:") {
                resources = list(t, "resources:");
            } else if t.starts_with("verbs:") {
                verbs = list(t, "verbs:");
                break;
            }
        }
        for g in &groups {
            for r in &resources {
                for v in &verbs {
                    grants.insert((g.clone(), r.clone(), v.clone()));
                }
            }
        }
    }
    assert!(rules >= 5, "found {rules} rules");
    grants
}

/// The RBAC table of docs/install.md: `| apiGroup | resource | verbs | when | why |`.
fn documented_grants() -> BTreeSet<Grant> {
    let text = read(root().join("docs/install.md"));
    let start = text
        .find("<!-- rbac-table -->")
        .expect("docs/install.md has no <!-- rbac-table --> marker");
    let mut grants = BTreeSet::new();
    for line in text[start..].lines().skip(3) {
        if !line.starts_with('|') {
            break;
        }
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let unquote = |s: &str| s.trim_matches('`').to_string();
        let group = match unquote(cells[1]).as_str() {
            "core" => String::new(),
            g => g.to_string(),
        };
        for verb in cells[3].split(',') {
            grants.insert((group.clone(), unquote(cells[2]), unquote(verb.trim())));
        }
    }
    grants
}

#[test]
fn rbac_grants_exactly_what_the_docs_list() {
    let granted = rbac_grants();
    assert!(
        granted
            .iter()
            .all(|(g, r, v)| g != "*" && r != "*" && v != "*"),
        "wildcards in RBAC: {granted:?}"
    );
    assert_eq!(granted, documented_grants());
    // Secrets only behind the password-reset switch, Leases only behind leader election.
    let text = read(chart().join("templates/rbac.yaml"));
    let secrets = text.find("resources: [\"secrets\"]").unwrap();
    let gate = text.find("{{- if .Values.remediation.passwordReset.enabled }}");
    assert!(gate.is_some_and(|g| g < secrets));
    let leases = text.find("resources: [\"leases\"]").unwrap();
    let gate = text.find("{{- if .Values.leaderElection.enabled }}");
    assert!(gate.is_some_and(|g| g < leases));
    // Namespaces only when the tenancy policy selects them by label.
    let namespaces = text.find("resources: [\"namespaces\"]").unwrap();
    let gate = text.find("{{- if and .Values.tenancy.enabled $bySelector }}");
    assert!(gate.is_some_and(|g| g < namespaces));
}

#[test]
fn deployment_runs_locked_down() {
    let v = values();
    let pod = &v["podSecurityContext"];
    assert_eq!(pod["runAsNonRoot"], true);
    assert!(pod["runAsUser"].as_u64().is_some_and(|u| u > 0));
    assert_eq!(pod["seccompProfile"]["type"], "RuntimeDefault");
    let c = &v["securityContext"];
    assert_eq!(c["allowPrivilegeEscalation"], false);
    assert_eq!(c["readOnlyRootFilesystem"], true);
    assert_eq!(c["runAsNonRoot"], true);
    assert_eq!(c["capabilities"]["drop"], json!(["ALL"]));
    assert!(c["capabilities"].get("add").is_none());
    assert!(v["resources"]["requests"]["memory"].is_string());
    assert!(v["resources"]["limits"]["memory"].is_string());
    assert_eq!(v["replicaCount"], 1);
    assert_eq!(v["leaderElection"]["enabled"], false);

    let deployment = read(chart().join("templates/deployment.yaml"));
    for needle in [
        "path: /healthz",
        "path: /readyz",
        "type: Recreate",
        "type: RollingUpdate",
        "toYaml .Values.podSecurityContext",
        "toYaml .Values.securityContext",
        "azure.workload.identity/use: \"true\"",
    ] {
        assert!(
            deployment.contains(needle),
            "deployment.yaml lacks {needle}"
        );
    }
    let recreate = deployment.find("type: Recreate").unwrap();
    let rolling = deployment.find("type: RollingUpdate").unwrap();
    let gate = deployment
        .find("{{- if .Values.leaderElection.enabled }}")
        .unwrap();
    assert!(
        gate < rolling && rolling < recreate,
        "Recreate is the default"
    );
    let helpers = read(chart().join("templates/_helpers.tpl"));
    assert!(
        helpers.contains(
            "if and (gt (int .Values.replicaCount) 1) (not .Values.leaderElection.enabled)"
        )
    );
    let sa = read(chart().join("templates/serviceaccount.yaml"));
    assert!(sa.contains("azure.workload.identity/client-id"));
}

/// The `env = "..."` names of the operator's flags.
fn flag_env_names() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for file in ["src/cli/run.rs", "src/cli/mod.rs"] {
        let text = read(root().join(file));
        for part in text.split("env = \"").skip(1) {
            names.insert(part.split('"').next().unwrap().to_string());
        }
    }
    names
}

#[test]
fn chart_sets_only_real_flags() {
    let flags = flag_env_names();
    assert!(flags.contains("RDPHEALTH_CONCURRENCY"), "{flags:?}");
    let deployment = read(chart().join("templates/deployment.yaml"));
    let used: BTreeSet<String> = deployment
        .split("- name: ")
        .skip(1)
        .map(|s| s.split_whitespace().next().unwrap().to_string())
        .filter(|n| n.starts_with("RDPHEALTH_"))
        .collect();
    assert!(used.len() >= 8, "{used:?}");
    let unknown: Vec<_> = used.difference(&flags).collect();
    assert!(
        unknown.is_empty(),
        "the chart sets variables no flag reads: {unknown:?}"
    );
    assert!(deployment.contains("args: [\"run\"]"));
}

#[test]
fn dashboard_is_a_grafana_dashboard_on_the_contract_metrics() {
    let dashboard: Value =
        serde_json::from_str(&read(chart().join("files/dashboard.json"))).unwrap();
    assert_eq!(dashboard["uid"], "rdphealth-operator");
    let panels = dashboard["panels"].as_array().unwrap();
    let titles: Vec<&str> = panels
        .iter()
        .map(|p| p["title"].as_str().unwrap())
        .collect();
    for wanted in [
        "Fleet reachability",
        "Probe failures by reason",
        "Rungs over time",
        "ARM requests by operation and code",
        "ARM throttling (429)",
        "Probe latency",
    ] {
        assert!(titles.contains(&wanted), "no panel {wanted}: {titles:?}");
    }
    let mut ids = BTreeSet::new();
    for p in panels {
        assert!(ids.insert(p["id"].as_u64().unwrap()), "duplicate panel id");
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${datasource}", "{}", p["title"]);
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{} has no query", p["title"]);
        for t in targets {
            assert!(t["expr"].as_str().unwrap().contains("rdphealth_"));
        }
    }
    let template = read(chart().join("templates/dashboard.yaml"));
    assert!(template.contains(".Files.Get \"files/dashboard.json\""));
    assert_eq!(values()["dashboard"]["labels"]["grafana_dashboard"], "1");
}
