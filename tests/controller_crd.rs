//! The generated CRD: committed copy in sync, examples valid against its schema and against
//! the controller's own validation, bad specs rejected.

// Test helpers outside `#[test]` functions may panic on broken fixtures.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{fs, path::Path};

use kube::CustomResourceExt;
use rdphealth::{
    api::{CRD_FILE, FLEET_CRD_FILE, RdpHealth, RdpHealthFleet, crd_yaml, fleet_crd_yaml},
    engine::ValidSpec,
};
use serde_json::{Value, json};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The `openAPIV3Schema` of the only version.
fn schema() -> Value {
    let crd = serde_json::to_value(RdpHealth::crd()).unwrap();
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

/// The fleet CRD's `openAPIV3Schema`.
fn fleet_schema() -> Value {
    let crd = serde_json::to_value(RdpHealthFleet::crd()).unwrap();
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

fn schema_errors(object: &Value) -> Vec<String> {
    let schema = if object["kind"] == "RdpHealthFleet" {
        fleet_schema()
    } else {
        schema()
    };
    let validator = jsonschema::validator_for(&schema).unwrap();
    validator
        .iter_errors(object)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect()
}

#[test]
fn committed_crd_matches_the_generator() {
    let path = root().join("crds").join(CRD_FILE);
    let committed = fs::read_to_string(&path).unwrap();
    let generated = crd_yaml().unwrap();
    assert!(
        committed == generated,
        "{} is stale: regenerate it with `cargo run -- crd > crds/{CRD_FILE}`",
        path.display()
    );
}

#[test]
fn committed_fleet_crd_matches_the_generator() {
    for dir in ["crds", "charts/rdphealth-operator/crds"] {
        let path = root().join(dir).join(FLEET_CRD_FILE);
        let committed = fs::read_to_string(&path).unwrap();
        assert!(
            committed == fleet_crd_yaml().unwrap(),
            "{} is stale: regenerate it with `cargo run -- crd --fleet > {dir}/{FLEET_CRD_FILE}`",
            path.display()
        );
    }
}

#[test]
fn fleet_crd_names_and_columns() {
    let crd = serde_json::to_value(RdpHealthFleet::crd()).unwrap();
    assert_eq!(crd["metadata"]["name"], "rdphealthfleets.rdphealth.io");
    assert_eq!(crd["spec"]["names"]["shortNames"], json!(["rdphf"]));
    assert_eq!(crd["spec"]["scope"], "Namespaced");
    let version = &crd["spec"]["versions"][0];
    let columns = columns(version);
    assert_eq!(
        columns,
        [
            "Members",
            "Reachable",
            "Unreachable",
            "Incidents",
            "Discovered",
            "Last Discovery",
            "Age"
        ]
    );
    let spec = &fleet_schema()["properties"]["spec"];
    assert_eq!(spec["required"], json!(["selector"]));
    assert_eq!(
        spec["properties"]["selector"]["required"],
        json!(["subscriptions"])
    );
    // The template has no host override: members' addresses come from discovery.
    let endpoint = &spec["properties"]["template"]["properties"]["endpoint"]["properties"];
    assert!(endpoint.get("host").is_none(), "{endpoint}");
}

/// The version's printer columns, after checking its name and status subresource.
fn columns(version: &Value) -> Vec<&str> {
    assert_eq!(version["name"], "v1alpha1");
    assert_eq!(version["subresources"]["status"], json!({}));
    version["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect()
}

fn fleet(spec: Value) -> Value {
    json!({
        "apiVersion": "rdphealth.io/v1alpha1",
        "kind": "RdpHealthFleet",
        "metadata": {"name": "f", "namespace": "default"},
        "spec": spec,
    })
}

const SUB: &str = "00000000-0000-0000-0000-000000000000";

/// Each case fails the schema (jsonschema) or a CEL rule (kube's CEL evaluator), as the API
/// server would reject it.
#[test]
fn bad_fleets_are_rejected() {
    let cases = [
        ("no selector", json!({})),
        (
            "no subscription",
            json!({"selector": {"subscriptions": []}}),
        ),
        (
            "not a GUID",
            json!({"selector": {"subscriptions": ["prod"]}}),
        ),
        (
            "a subscription twice",
            json!({"selector": {"subscriptions": [SUB, SUB.to_uppercase()]}}),
        ),
        (
            "bad resource group",
            json!({"selector": {"subscriptions": [SUB], "resourceGroups": ["rg/evil"]}}),
        ),
        (
            "name pattern with a quote",
            json!({"selector": {"subscriptions": [SUB], "namePattern": "jump'*"}}),
        ),
        (
            "unknown OS type",
            json!({"selector": {"subscriptions": [SUB], "osType": "Solaris"}}),
        ),
        (
            "discovery more often than every minute",
            json!({"selector": {"subscriptions": [SUB]}, "discoveryInterval": "30s"}),
        ),
        (
            "template timeout above its interval",
            json!({"selector": {"subscriptions": [SUB]}, "template": {"probe": {"interval": "5s", "timeout": "10s"}}}),
        ),
        (
            "hold limit above 100",
            json!({"selector": {"subscriptions": [SUB]}, "safety": {"maxUnreachablePercent": 101}}),
        ),
        (
            "no disruptive rung at all as a cap",
            json!({"selector": {"subscriptions": [SUB]}, "safety": {"maxConcurrentDisruptive": 0}}),
        ),
    ];
    for (what, spec) in cases {
        let object = fleet(spec);
        let schema_ok = schema_errors(&object).is_empty();
        let cel_ok = serde_json::from_value::<RdpHealthFleet>(object.clone())
            .map_err(|e| e.to_string())
            .and_then(|f| kube::core::cel::validate_cel(&f).map_err(|e| format!("{e:?}")))
            .is_ok();
        assert!(!(schema_ok && cel_ok), "{what}: accepted: {object}");
    }
    let good = fleet(
        json!({"selector": {"subscriptions": [SUB], "tags": {"rdp": "monitored"}}, "safety": {"maxConcurrentDisruptive": 3}}),
    );
    assert!(
        schema_errors(&good).is_empty(),
        "{:?}",
        schema_errors(&good)
    );
}

#[test]
fn crd_names_and_columns() {
    let crd = serde_json::to_value(RdpHealth::crd()).unwrap();
    assert_eq!(crd["metadata"]["name"], "rdphealths.rdphealth.io");
    assert_eq!(crd["spec"]["names"]["shortNames"], json!(["rdph"]));
    assert_eq!(crd["spec"]["scope"], "Namespaced");
    let version = &crd["spec"]["versions"][0];
    let columns = columns(version);
    assert_eq!(
        columns,
        [
            "Reachable",
            "Phase",
            "Reason",
            "Computer",
            "Last Probe",
            "Age"
        ]
    );
    // The computer name the endpoint answered as shows with `kubectl get rdph -o wide`.
    let computer = &version["additionalPrinterColumns"][3];
    assert_eq!(computer["priority"], 1);
    assert_eq!(computer["jsonPath"], ".status.identity.computerName");
    let schema = schema();
    let conditions = &schema["properties"]["status"]["properties"]["conditions"];
    assert_eq!(conditions["x-kubernetes-list-type"], "map");
    assert_eq!(conditions["x-kubernetes-list-map-keys"], json!(["type"]));
    let resource_id = &schema["properties"]["spec"]["properties"]["vm"]["properties"]["resourceId"];
    assert_eq!(
        resource_id["x-kubernetes-validations"][0]["rule"],
        "self == oldSelf"
    );
    let probe = &schema["properties"]["spec"]["properties"]["probe"];
    let rules: Vec<&str> = probe["x-kubernetes-validations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["rule"].as_str().unwrap())
        .collect();
    assert!(rules.contains(&"duration(self.timeout) < duration(self.interval)"));
}

/// Every field in the schema has a description (it is the `kubectl explain` text).
#[test]
fn every_field_is_documented() {
    fn walk(path: &str, node: &Value, missing: &mut Vec<String>) {
        if let Some(props) = node.get("properties").and_then(Value::as_object) {
            for (name, child) in props {
                let here = format!("{path}.{name}");
                if child.get("description").is_none() {
                    missing.push(here.clone());
                }
                walk(&here, child, missing);
            }
        }
        if let Some(items) = node.get("items") {
            walk(path, items, missing);
        }
    }
    let mut missing = Vec::new();
    walk("", &schema(), &mut missing);
    assert!(missing.is_empty(), "undocumented fields: {missing:?}");
}

#[test]
fn examples_are_valid() {
    let mut seen = 0;
    for entry in fs::read_dir(root().join("examples")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        seen += 1;
        let text = fs::read_to_string(&path).unwrap();
        let value: Value = serde_saphyr::from_str(&text).unwrap();
        let errors = schema_errors(&value);
        assert!(errors.is_empty(), "{}: {errors:?}", path.display());
        if value["kind"] == "RdpHealthFleet" {
            let fleet: RdpHealthFleet =
                serde_json::from_value(value).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert!(fleet.metadata.namespace.is_some(), "{}", path.display());
            rdphealth::fleet::policy::MemberPolicy::from_fleet(&fleet)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            kube::core::cel::validate_cel(&fleet)
                .unwrap_or_else(|e| panic!("{}: {e:?}", path.display()));
            continue;
        }
        let obj: RdpHealth =
            serde_json::from_value(value).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(obj.metadata.namespace.is_some(), "{}", path.display());
        ValidSpec::try_from(&obj.spec).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        kube::core::cel::validate_cel(&obj).unwrap_or_else(|e| panic!("{}: {e:?}", path.display()));
    }
    assert!(seen >= 2, "expected example manifests");
}

fn object(spec: Value) -> Value {
    json!({
        "apiVersion": "rdphealth.io/v1alpha1",
        "kind": "RdpHealth",
        "metadata": {"name": "x", "namespace": "default"},
        "spec": spec,
    })
}

const VM: &str = "/subscriptions/00000000-0000-0000-0000-000000000000/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm";

#[test]
fn schema_rejects_bad_specs() {
    let cases = [
        ("missing vm", json!({})),
        (
            "bad resource id",
            json!({"vm": {"resourceId": "/subscriptions/nope"}}),
        ),
        (
            "not a VM",
            json!({"vm": {"resourceId": VM.replace("virtualMachines", "disks")}}),
        ),
        (
            "port 0",
            json!({"vm": {"resourceId": VM}, "endpoint": {"port": 0}}),
        ),
        (
            "port too big",
            json!({"vm": {"resourceId": VM}, "endpoint": {"port": 70000}}),
        ),
        (
            "bad address type",
            json!({"vm": {"resourceId": VM}, "endpoint": {"addressType": "Both"}}),
        ),
        (
            "bad interval",
            json!({"vm": {"resourceId": VM}, "probe": {"interval": "30 seconds"}}),
        ),
        (
            "days in interval",
            json!({"vm": {"resourceId": VM}, "probe": {"interval": "1d"}}),
        ),
        (
            "zero threshold",
            json!({"vm": {"resourceId": VM}, "probe": {"failureThreshold": 0}}),
        ),
        (
            "bad mode",
            json!({"vm": {"resourceId": VM}, "remediation": {"mode": "Yolo"}}),
        ),
    ];
    for (name, spec) in cases {
        assert!(
            !schema_errors(&object(spec)).is_empty(),
            "{name} was accepted"
        );
    }
    assert!(schema_errors(&object(json!({"vm": {"resourceId": VM}}))).is_empty());
}

fn typed(spec: Value) -> RdpHealth {
    serde_json::from_value(object(spec)).unwrap()
}

/// The CEL rules in the schema, evaluated as the API server would (client-side).
#[test]
fn cel_rules_reject_bad_timeouts_and_resource_id_changes() {
    use kube::core::cel::{validate_cel, validate_cel_update};

    let ok = typed(json!({"vm": {"resourceId": VM}}));
    validate_cel(&ok).unwrap();
    let fast = typed(
        json!({"vm": {"resourceId": VM}, "probe": {"interval": "1s", "unhealthyInterval": "300ms", "timeout": "250ms"}}),
    );
    validate_cel(&fast).unwrap();

    let slow =
        typed(json!({"vm": {"resourceId": VM}, "probe": {"interval": "5s", "timeout": "5s"}}));
    let err = validate_cel(&slow).unwrap_err();
    assert!(
        format!("{err:?}").contains("timeout must be shorter than interval"),
        "{err:?}"
    );
    let err = validate_cel(&typed(json!({"vm": {"resourceId": VM}, "probe": {"unhealthyInterval": "2s", "timeout": "2500ms"}}))).unwrap_err();
    assert!(
        format!("{err:?}").contains("timeout must be shorter than unhealthyInterval"),
        "{err:?}"
    );

    let moved = typed(json!({"vm": {"resourceId": VM.replace("/vm", "/vm2")}}));
    let err = validate_cel_update(&moved, &ok).unwrap_err();
    assert!(
        format!("{err:?}").contains("vm.resourceId is immutable"),
        "{err:?}"
    );
    let mut tuned = ok.clone();
    tuned.spec.probe.interval = "1m".into();
    validate_cel_update(&tuned, &ok).unwrap();
}

/// The CRD refuses NSG repair prefixes that name or span the public internet, whatever their
/// spelling; the operator's validator also measures the union (tested with the validator).
#[test]
fn cel_rules_refuse_internet_wide_nsg_repair_prefixes() {
    use kube::core::cel::validate_cel;

    let with = |prefixes: &[&str]| {
        typed(
            json!({"vm": {"resourceId": VM}, "remediation": {"nsgRepair": {"enabled": true, "allowedSourcePrefixes": prefixes}}}),
        )
    };
    for refused in [
        &["0.0.0.0/1", "128.0.0.0/1"][..],
        &["::0/0"],
        &["1.0.0.0/2"],
        &["*"],
        &[" Internet"],
        &["any"],
        &["10.0.0.0/7"],
        &["2001:db8::/31"],
    ] {
        assert!(
            validate_cel(&with(refused)).is_err(),
            "{refused:?} was accepted"
        );
    }
    for accepted in [
        &["10.20.30.0/24"][..],
        &["203.0.113.0/24", "198.51.100.7"],
        &["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"],
        &["fd00::/8", "2001:db8:1::/48"],
    ] {
        validate_cel(&with(accepted)).unwrap_or_else(|e| panic!("{accepted:?}: {e:?}"));
    }
}
