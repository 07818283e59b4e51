//! The chart rendered by Helm itself: `helm lint --strict` and `helm template` with every
//! values set in `charts/rdphealth-operator/ci/`, and the objects that come out. Helm is the
//! real one, built from `tools/k8s` by `scripts/k8s-tools.sh`; the tests fail without it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use serde_json::{Value, json};

const NAMESPACE: &str = "rdphealth-system";
/// Rendering offline, Helm assumes the Kubernetes version it was built against; the chart
/// needs 1.29 or newer.
const KUBE_VERSION: &str = "v1.31.0";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn chart() -> PathBuf {
    root().join("charts/rdphealth-operator")
}

/// The helm built from `tools/k8s` (the same release the tests' control plane runs with).
fn helm() -> PathBuf {
    common::k8s::tools().join("helm")
}

fn helm_run(helm: &Path, args: &[&str]) -> Output {
    Command::new(helm)
        .args(args)
        .current_dir(root())
        .output()
        .unwrap()
}

/// `helm template` with the given values files (relative to the chart's ci/ folder, or
/// absolute); the rendered objects.
fn render(helm: &Path, values: &[&Path]) -> Vec<Value> {
    let chart = chart();
    let mut args = vec![
        "template".to_string(),
        "rdph".to_string(),
        chart.to_string_lossy().into_owned(),
        "--namespace".to_string(),
        NAMESPACE.to_string(),
        "--kube-version".to_string(),
        KUBE_VERSION.to_string(),
    ];
    for v in values {
        args.push("-f".into());
        args.push(chart.join("ci").join(v).to_string_lossy().into_owned());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = helm_run(helm, &args);
    assert!(
        out.status.success(),
        "helm {}:\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    serde_saphyr::from_multiple::<Value>(&text)
        .unwrap()
        .into_iter()
        .filter(|d| d.is_object())
        .collect()
}

fn find<'a>(objects: &'a [Value], kind: &str) -> Vec<&'a Value> {
    objects.iter().filter(|o| o["kind"] == kind).collect()
}

fn one<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    let found = find(objects, kind);
    assert_eq!(found.len(), 1, "expected one {kind}");
    found[0]
}

fn env(deployment: &Value) -> Vec<Value> {
    deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .unwrap()
        .clone()
}

fn env_value(deployment: &Value, name: &str) -> Option<Value> {
    env(deployment).into_iter().find(|e| e["name"] == name)
}

fn ci_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(chart().join("ci"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
}

#[test]
fn helm_lint_passes_with_every_values_set() {
    let helm = helm();
    for file in ci_files() {
        let out = helm_run(
            &helm,
            &[
                "lint",
                "--strict",
                "--kube-version",
                KUBE_VERSION,
                chart().to_str().unwrap(),
                "-f",
                file.to_str().unwrap(),
            ],
        );
        assert!(
            out.status.success(),
            "helm lint with {}:\n{}{}",
            file.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn defaults_render_one_locked_down_replica_with_cluster_wide_read_access() {
    let helm = helm();
    let objects = render(&helm, &[Path::new("default-values.yaml")]);
    let deployment = one(&objects, "Deployment");
    assert_eq!(deployment["spec"]["replicas"], 1);
    assert_eq!(deployment["spec"]["strategy"]["type"], "Recreate");
    let pod = &deployment["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let container = &pod["containers"][0];
    assert_eq!(container["args"], json!(["run"]));
    assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(container["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(
        container["securityContext"]["allowPrivilegeEscalation"],
        false
    );
    assert_eq!(
        container["securityContext"]["capabilities"]["drop"],
        json!(["ALL"])
    );
    assert_eq!(
        env_value(deployment, "RDPHEALTH_METRICS_ADDR").unwrap()["value"],
        "0.0.0.0:8080"
    );
    assert!(env_value(deployment, "RDPHEALTH_NAMESPACE").is_none());
    assert!(env_value(deployment, "RDPHEALTH_LEADER_ELECTION").is_none());
    assert_eq!(
        deployment["spec"]["template"]["metadata"]["labels"]["azure.workload.identity/use"],
        "true"
    );

    let role = one(&objects, "ClusterRole");
    let resources: Vec<&Value> = role["rules"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| r["resources"].as_array().unwrap())
        .collect();
    assert!(!resources.contains(&&json!("secrets")), "{resources:?}");
    assert!(
        find(&objects, "Role").is_empty(),
        "no Lease Role without leader election"
    );
    assert!(find(&objects, "ServiceMonitor").is_empty());
    assert!(find(&objects, "PrometheusRule").is_empty());
    assert!(find(&objects, "ConfigMap").is_empty());
    let service = one(&objects, "Service");
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "metrics");
}

#[test]
fn leader_election_renders_a_lease_role_and_rolling_updates() {
    let helm = helm();
    let objects = render(&helm, &[Path::new("leader-election-values.yaml")]);
    let deployment = one(&objects, "Deployment");
    assert_eq!(deployment["spec"]["replicas"], 2);
    assert_eq!(deployment["spec"]["strategy"]["type"], "RollingUpdate");
    assert_eq!(
        env_value(deployment, "RDPHEALTH_LEADER_ELECTION").unwrap()["value"],
        "true"
    );
    assert_eq!(
        env_value(deployment, "RDPHEALTH_LEASE_NAMESPACE").unwrap()["value"],
        NAMESPACE
    );
    assert_eq!(
        env_value(deployment, "RDPHEALTH_LEASE_NAME").unwrap()["value"],
        "rdphealth-leader"
    );
    let role = one(&objects, "Role");
    assert_eq!(role["metadata"]["namespace"], NAMESPACE);
    let rules = role["rules"].as_array().unwrap();
    assert!(rules.iter().all(|r| r["resources"] == json!(["leases"])));
    let named = rules
        .iter()
        .find(|r| r["verbs"] == json!(["get", "update"]))
        .unwrap();
    assert_eq!(named["resourceNames"], json!(["rdphealth-leader"]));
}

#[test]
fn shards_render_the_setting_and_a_lease_rule_for_every_shard() {
    let helm = helm();
    let objects = render(&helm, &[Path::new("sharded-values.yaml")]);
    let deployment = one(&objects, "Deployment");
    assert_eq!(deployment["spec"]["replicas"], 3);
    assert_eq!(
        env_value(deployment, "RDPHEALTH_SHARDS").unwrap()["value"],
        "auto"
    );
    let role = one(&objects, "Role");
    let rules = role["rules"].as_array().unwrap();
    let shards = rules
        .iter()
        .find(|r| r["verbs"] == json!(["get", "list", "update"]))
        .unwrap();
    assert_eq!(shards["resources"], json!(["leases"]));
    assert!(shards.get("resourceNames").is_none());
    // Without shards: no such rule, no setting.
    let objects = render(&helm, &[Path::new("leader-election-values.yaml")]);
    assert!(env_value(one(&objects, "Deployment"), "RDPHEALTH_SHARDS").is_none());
    let role = one(&objects, "Role");
    assert!(
        role["rules"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["verbs"] != json!(["get", "list", "update"]))
    );
}

#[test]
fn more_replicas_without_leader_election_fail_to_render() {
    let helm = helm();
    let dir = std::env::temp_dir().join(format!("rdphealth-chart-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let cases = [
        ("replicas.yaml", "replicaCount: 2\n", "leaderElection"),
        (
            "shards.yaml",
            "leaderElection:\n  shards: auto\n",
            "leaderElection.shards needs leaderElection.enabled",
        ),
        (
            "two-credentials.yaml",
            "azure:\n  clientSecret:\n    existingSecret: azure\n    clientId: 00000000-1111-2222-3333-444444444444\n    tenantId: 00000000-1111-2222-3333-444444444444\n",
            "choose one Azure credential",
        ),
    ];
    for (name, text, message) in cases {
        let file = dir.join(name);
        fs::write(&file, text).unwrap();
        let out = helm_run(
            &helm,
            &[
                "template",
                "rdph",
                chart().to_str().unwrap(),
                "--kube-version",
                KUBE_VERSION,
                "-f",
                file.to_str().unwrap(),
            ],
        );
        assert!(!out.status.success(), "{name} rendered");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(message),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_watch_namespace_narrows_rbac_to_a_role_there() {
    let helm = helm();
    let objects = render(&helm, &[Path::new("namespaced-values.yaml")]);
    assert!(find(&objects, "ClusterRole").is_empty());
    assert!(find(&objects, "ClusterRoleBinding").is_empty());
    let role = one(&objects, "Role");
    assert_eq!(role["metadata"]["namespace"], "windows-fleet");
    let secrets = role["rules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["resources"] == json!(["secrets"]))
        .expect("password reset grants Secrets");
    assert_eq!(secrets["verbs"], json!(["get", "create", "patch"]));
    let binding = one(&objects, "RoleBinding");
    assert_eq!(binding["metadata"]["namespace"], "windows-fleet");
    assert_eq!(binding["subjects"][0]["namespace"], NAMESPACE);
    let deployment = one(&objects, "Deployment");
    assert_eq!(
        env_value(deployment, "RDPHEALTH_NAMESPACE").unwrap()["value"],
        "windows-fleet"
    );
}

#[test]
fn monitoring_objects_carry_the_rules_file_and_the_dashboard() {
    let helm = helm();
    let objects = render(&helm, &[Path::new("full-values.yaml")]);
    let sa = one(&objects, "ServiceAccount");
    assert_eq!(
        sa["metadata"]["annotations"]["azure.workload.identity/client-id"],
        "00000000-1111-2222-3333-444444444444"
    );
    let monitor = one(&objects, "ServiceMonitor");
    assert_eq!(monitor["spec"]["endpoints"][0]["honorLabels"], true);
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "metrics");

    let rule = one(&objects, "PrometheusRule");
    let file: Value = serde_saphyr::from_str(
        &fs::read_to_string(chart().join("files/prometheus-rules.yaml")).unwrap(),
    )
    .unwrap();
    let mut expected = file.clone();
    for group in expected["groups"].as_array_mut().unwrap() {
        for r in group["rules"].as_array_mut().unwrap() {
            let url = r["annotations"]["runbook_url"]
                .as_str()
                .unwrap()
                .to_string();
            r["annotations"]["runbook_url"] = json!(format!(
                "https://example.com/rdphealth-operator/blob/v0.1.0/{url}"
            ));
        }
    }
    assert_eq!(rule["spec"], expected);

    let dashboard = one(&objects, "ConfigMap");
    assert_eq!(dashboard["metadata"]["namespace"], "monitoring");
    assert_eq!(dashboard["metadata"]["labels"]["grafana_dashboard"], "1");
    let json_text = dashboard["data"]["rdphealth-operator.json"]
        .as_str()
        .unwrap();
    let shipped: Value =
        serde_json::from_str(&fs::read_to_string(chart().join("files/dashboard.json")).unwrap())
            .unwrap();
    assert_eq!(serde_json::from_str::<Value>(json_text).unwrap(), shipped);
}

#[test]
fn client_secret_fallback_reads_an_existing_secret() {
    let helm = helm();
    let objects = render(&helm, &[Path::new("client-secret-values.yaml")]);
    let deployment = one(&objects, "Deployment");
    let secret = env_value(deployment, "AZURE_CLIENT_SECRET").unwrap();
    assert_eq!(
        secret["valueFrom"]["secretKeyRef"],
        json!({"name": "rdphealth-azure", "key": "client-secret"})
    );
    assert!(secret.get("value").is_none());
    assert!(
        deployment["spec"]["template"]["metadata"]["labels"]
            .get("azure.workload.identity/use")
            .is_none()
    );
    let sa = one(&objects, "ServiceAccount");
    assert!(sa["metadata"].get("annotations").is_none());
}

/// The tenancy values become the policy file the operator reads (parsed here by the operator's
/// own parser), and only a `namespaceSelector` entry brings read access to namespaces.
#[test]
fn tenancy_values_render_the_policy_and_namespace_access_only_for_selectors() {
    let helm = helm();
    let objects = render(&helm, &[Path::new("tenancy-values.yaml")]);
    let policy = find(&objects, "ConfigMap")
        .into_iter()
        .find(|c| c["metadata"]["name"] == "rdph-rdphealth-operator-tenancy")
        .expect("the policy ConfigMap");
    let policy = rdphealth::tenancy::TenancyPolicy::from_yaml(
        policy["data"]["tenancy.yaml"].as_str().unwrap(),
    )
    .unwrap();
    assert!(policy.selects_by_label());
    let team_a = policy.grant("team-a", None).unwrap();
    assert_eq!(
        team_a.identity.unwrap().client_id,
        "11111111-2222-3333-4444-555555555555"
    );
    let labels = [("rdphealth.io/tenant".to_string(), "shared".to_string())].into();
    assert!(policy.grant("any", Some(&labels)).is_ok());
    let deployment = one(&objects, "Deployment");
    assert_eq!(
        env_value(deployment, "RDPHEALTH_TENANCY_POLICY").unwrap()["value"],
        "/etc/rdphealth/tenancy/tenancy.yaml"
    );
    let namespaces = find(&objects, "ClusterRole")
        .into_iter()
        .find(|r| r["metadata"]["name"] == "rdph-rdphealth-operator-namespaces")
        .expect("a ClusterRole for namespaces");
    assert_eq!(
        namespaces["rules"],
        json!([{"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get", "list", "watch"]}])
    );
    let binding = find(&objects, "ClusterRoleBinding")
        .into_iter()
        .find(|b| b["roleRef"]["name"] == "rdph-rdphealth-operator-namespaces")
        .expect("its binding");
    assert_eq!(binding["subjects"][0]["namespace"], NAMESPACE);

    // Names only, or no tenancy at all: no access to namespaces.
    let names_only = std::env::temp_dir().join(format!(
        "rdphealth-tenancy-names-{}.yaml",
        std::process::id()
    ));
    fs::write(
        &names_only,
        "tenancy:\n  enabled: true\n  namespaces:\n    - name: team-a\n      scopes: [/subscriptions/00000000-0000-0000-0000-00000000000a]\n",
    )
    .unwrap();
    for values in [names_only.as_path(), Path::new("default-values.yaml")] {
        let objects = render(&helm, &[values]);
        let all = serde_json::to_string(&objects).unwrap();
        assert!(!all.contains("\"namespaces\""), "{values:?}");
    }
    let _ = fs::remove_file(&names_only);
}
