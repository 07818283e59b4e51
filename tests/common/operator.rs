//! `rdphealth run` as a process against the local control plane, and the helpers the tests
//! that run it share.

use std::{
    net::SocketAddr,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use k8s_openapi::api::core::v1::Namespace;
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, ObjectMeta, PostParams},
};
use rdphealth::{
    api::{CRD_FILE, RdpHealth},
    sim::{Scenario, Simulator},
};
use serde_json::{Value, json};

use super::k8s::{ControlPlane, Process};

/// How long a test waits for the operator to get ready.
const WAIT: Duration = Duration::from_secs(90);

/// `rdphealth run` as a process, stopped by PID when dropped.
pub struct Operator {
    pub process: Process,
    pub http: SocketAddr,
    pub log: std::path::PathBuf,
}

impl Operator {
    pub fn start(
        cp: &ControlPlane,
        kubeconfig: &Path,
        sim: &Simulator,
        identity: &str,
        args: &[&str],
        env: &[(String, String)],
    ) -> Self {
        let http: SocketAddr = format!("127.0.0.1:{}", super::free_port()).parse().unwrap();
        let log = cp.dir().join(format!("operator-{identity}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_rdphealth"));
        cmd.arg("run")
            .args(["--metrics-addr", &http.to_string()])
            .args(["--identity", identity])
            .args(["--azure-endpoint", &sim.arm_url()])
            .args(["--probe-source-address", "203.0.113.10"])
            .args(["--disruptive-grace", "0s"])
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("KUBECONFIG", kubeconfig)
            .env("RDPHEALTH_AZURE_STATIC_TOKEN", "sim")
            .env("RUST_LOG", "rdphealth=debug,kube=info")
            .env("RDPHEALTH_LOG_FORMAT", "json")
            .env_remove("RDPHEALTH_E2E_KUBECONFIG")
            .stdout(Stdio::from(file.try_clone().unwrap()))
            .stderr(Stdio::from(file));
        let process = Process::spawn(&format!("operator {identity}"), cmd, Some(&cp.pids_file()));
        Self { process, http, log }
    }

    pub async fn wait_ready(&mut self) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !matches!(super::http_get(self.http, "/readyz").await, Ok((200, _))) {
            if let Some(status) = self.process.exited() {
                panic!("operator exited ({status}):\n{}", self.log_text());
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "operator never became ready:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn log_text(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }
}

/// Creates namespace `name`.
pub async fn namespace(client: &Client, name: &str) {
    let api: Api<Namespace> = Api::all(client.clone());
    api.create(
        &PostParams::default(),
        &Namespace {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .await
    .unwrap();
}

/// The `RdpHealth` objects of `ns`, untyped.
pub fn rdph_api(client: &Client, ns: &str) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), ns, &ApiResource::erase::<RdpHealth>(&()))
}

/// The repository root.
pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The shared control plane with the CRD installed.
pub fn control_plane() -> &'static ControlPlane {
    static READY: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    let cp = ControlPlane::shared();
    READY.get_or_init(|| install_crd(cp));
    cp
}

pub fn install_crd(cp: &ControlPlane) {
    let crd = root().join("crds").join(CRD_FILE);
    cp.kubectl(&["apply", "--server-side", "-f", crd.to_str().unwrap()]);
    cp.wait_established("rdphealths.rdphealth.io");
}

/// A subscription `sub` with one resource group, NSG and subnet, and `vms` (YAML flow
/// mappings, several separated by a newline and `          - `), with `timing`.
pub fn scenario(sub: &str, timing: &str, vms: &str) -> Scenario {
    scenario_in(timing, &[(sub, vms)])
}

/// Subscriptions, each with the resource group, NSG and subnet of [`scenario`] and its VMs
/// (`(subscription, vms)` as there), with `timing`.
pub fn scenario_in(timing: &str, subs: &[(&str, &str)]) -> Scenario {
    let mut yaml = format!("timing: {{ {timing} }}\nsubscriptions:\n");
    for (sub, vms) in subs {
        yaml.push_str(&format!(
            r#"  - id: {sub}
    resourceGroups:
      - name: rg
        location: westeurope
        networkSecurityGroups:
          - name: nsg
            rules:
              # The objects probe the responders' loopback ports, so the rule allows every port.
              - {{ name: allow-rdp, priority: 1000, access: Allow, protocol: Tcp, source: "*", destinationPort: "*" }}
        virtualNetworks:
          - {{ name: vnet, addressPrefix: 10.0.0.0/16, subnets: [ {{ name: s, addressPrefix: 10.0.0.0/24, networkSecurityGroup: nsg }} ] }}
        vms:
          - {vms}
"#
        ));
    }
    Scenario::from_yaml(&yaml).unwrap()
}

/// An `RdpHealth` for simulated VM `vm`, probed at its loopback responder.
pub fn rdphealth(
    sub: &str,
    name: &str,
    vm: &str,
    rdp: SocketAddr,
    remediation: Value,
) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "rdphealth.io/v1alpha1",
        "kind": "RdpHealth",
        "metadata": {"name": name},
        "spec": {
            "vm": {"resourceId": format!("/subscriptions/{sub}/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/{vm}")},
            "endpoint": {"host": rdp.ip().to_string(), "port": rdp.port()},
            "probe": {
                "interval": "1s", "unhealthyInterval": "300ms", "timeout": "250ms",
                "failureThreshold": 2, "successThreshold": 1,
            },
            "remediation": remediation,
        },
    }))
    .unwrap()
}
