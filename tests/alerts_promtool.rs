//! The alert rules under promtool: `promtool check rules`, their own unit tests
//! (`promtool test rules`), and the dashboard's queries parsed as PromQL. promtool is a real
//! peer: with RDPHEALTH_REQUIRE_PROMTOOL=1 a missing promtool fails the test, otherwise the
//! promtool tests print a note and pass.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use serde_json::Value;

fn files() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/rdphealth-operator/files")
}

fn yaml(name: &str) -> Value {
    let path = files().join(name);
    let text = fs::read_to_string(&path).unwrap();
    serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The promtool binary, or `None` (with a note) when it is missing and not required.
fn promtool() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("promtool"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var("RDPHEALTH_REQUIRE_PROMTOOL").as_deref() != Ok("1"),
            "promtool is required (RDPHEALTH_REQUIRE_PROMTOOL=1) but not on PATH: \
             apt-get install prometheus"
        );
        eprintln!("note: promtool not found, skipping; set RDPHEALTH_REQUIRE_PROMTOOL=1 to fail");
    }
    found
}

fn run(promtool: &Path, args: &[&str], dir: &Path) -> String {
    let out = Command::new(promtool)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "promtool {} failed:\n{text}",
        args.join(" ")
    );
    text
}

#[test]
fn rules_pass_promtool_check() {
    let Some(promtool) = promtool() else { return };
    let out = run(
        &promtool,
        &["check", "rules", "prometheus-rules.yaml"],
        &files(),
    );
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn rules_pass_their_unit_tests() {
    let Some(promtool) = promtool() else { return };
    let out = run(
        &promtool,
        &["test", "rules", "prometheus-rules.test.yaml"],
        &files(),
    );
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn a_broken_expectation_fails_the_unit_tests() {
    // The unit tests are only worth something if promtool reports a wrong expectation.
    let Some(promtool) = promtool() else { return };
    let dir = std::env::temp_dir().join(format!("rdphealth-alerts-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    fs::copy(
        files().join("prometheus-rules.yaml"),
        dir.join("prometheus-rules.yaml"),
    )
    .unwrap();
    let tests = fs::read_to_string(files().join("prometheus-rules.test.yaml")).unwrap();
    let broken = tests.replacen("      - eval_time: 12m", "      - eval_time: 14m", 1);
    assert_ne!(broken, tests);
    fs::write(dir.join("prometheus-rules.test.yaml"), broken).unwrap();
    let status = Command::new(&promtool)
        .args(["test", "rules", "prometheus-rules.test.yaml"])
        .current_dir(&dir)
        .output()
        .unwrap()
        .status;
    fs::remove_dir_all(&dir).unwrap();
    assert!(!status.success(), "promtool accepted a wrong expectation");
}

#[test]
fn dashboard_queries_are_valid_promql() {
    let Some(promtool) = promtool() else { return };
    let dashboard: Value =
        serde_json::from_str(&fs::read_to_string(files().join("dashboard.json")).unwrap()).unwrap();
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    let mut n = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            // Grafana's variables, replaced by what Grafana would send.
            let expr = target["expr"]
                .as_str()
                .unwrap()
                .replace("$__rate_interval", "5m")
                .replace("$namespace", ".*");
            n += 1;
            rules.push_str(&format!(
                "      - record: dashboard:query{n}\n        expr: {}\n",
                serde_json::to_string(&expr).unwrap()
            ));
        }
    }
    assert!(n >= 15, "{n} queries");
    let dir = std::env::temp_dir().join(format!("rdphealth-dashboard-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("queries.yaml"), rules).unwrap();
    let out = Command::new(&promtool)
        .args(["check", "rules", "queries.yaml"])
        .current_dir(&dir)
        .output()
        .unwrap();
    fs::remove_dir_all(&dir).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// (alert name, rule) for every alerting rule.
fn alert_rules() -> Vec<(String, Value)> {
    let rules = yaml("prometheus-rules.yaml");
    rules["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().clone())
        .map(|r| (r["alert"].as_str().unwrap().to_string(), r))
        .collect()
}

#[test]
fn required_alerts_exist_with_severity_and_annotations() {
    let rules = alert_rules();
    let names: BTreeSet<&str> = rules.iter().map(|(n, _)| n.as_str()).collect();
    for wanted in [
        "RdpHealthVmUnreachable",
        "RdpHealthLadderExhausted",
        "RdpHealthRemediationStormBreaker",
        "RdpHealthObserverBlind",
        "RdpHealthProberErrors",
        "RdpHealthProbesLate",
        "RdpHealthCertificateExpiringSoon",
        "RdpHealthCertificateExpired",
        "RdpHealthRdpOpenToInternet",
        "RdpHealthOperatorDown",
        "RdpHealthOperatorNotReconciling",
        "RdpHealthReconcileErrors",
    ] {
        assert!(names.contains(wanted), "no alert {wanted}");
    }
    assert_eq!(names.len(), rules.len(), "duplicate alert names");
    for (name, rule) in &rules {
        let severity = rule["labels"]["severity"].as_str().unwrap_or_default();
        assert!(
            ["critical", "warning", "info"].contains(&severity),
            "{name}: severity {severity:?}"
        );
        for key in ["summary", "description", "runbook_url"] {
            assert!(
                rule["annotations"][key]
                    .as_str()
                    .is_some_and(|s| !s.is_empty()),
                "{name} has no {key}"
            );
        }
        assert!(rule["for"].as_str().is_some(), "{name} has no `for`");
    }
}

#[test]
fn every_alert_has_a_firing_and_a_quiet_unit_test() {
    let tests = yaml("prometheus-rules.test.yaml");
    assert_eq!(
        tests["rule_files"],
        serde_json::json!(["prometheus-rules.yaml"])
    );
    let mut firing = BTreeSet::new();
    let mut quiet = BTreeSet::new();
    for test in tests["tests"].as_array().unwrap() {
        for case in test["alert_rule_test"].as_array().unwrap() {
            let name = case["alertname"].as_str().unwrap().to_string();
            if case["exp_alerts"].as_array().is_some_and(|a| a.is_empty()) {
                quiet.insert(name);
            } else {
                firing.insert(name);
            }
        }
    }
    for (name, _) in alert_rules() {
        assert!(firing.contains(&name), "no unit test where {name} fires");
        assert!(
            quiet.contains(&name),
            "no unit test where {name} stays quiet"
        );
    }
}
