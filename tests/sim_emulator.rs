//! The emulator as a plain HTTP server: scenario validation, ARM's error shapes, garbage
//! requests, the admin API and the request counters.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::time::Duration;

use rdphealth::sim::{Scenario, Simulator};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const MINIMAL: &str = r#"
subscriptions:
  - id: sub-1
    resourceGroups:
      - name: rg
        location: westeurope
        # A Standard public IP admits nothing without an NSG that allows it.
        networkSecurityGroups:
          - name: nsg
            rules:
              - { name: allow-rdp, priority: 1000, access: Allow, protocol: Tcp, source: "*", destinationPort: "3389" }
        virtualNetworks:
          - { name: vnet, addressPrefix: 10.0.0.0/16, subnets: [ { name: s, addressPrefix: 10.0.0.0/24, networkSecurityGroup: nsg } ] }
        vms:
          - { name: vm1, nic: { subnet: vnet/s } }
"#;

async fn start() -> Simulator {
    Simulator::start(Scenario::from_yaml(MINIMAL).unwrap())
        .await
        .unwrap()
}

/// One raw HTTP/1.1 exchange; returns (status, body).
async fn http(sim: &Simulator, request: &str) -> (u16, String) {
    let text = exchange(sim, request).await;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// One raw HTTP/1.1 exchange; returns the whole answer, headers included.
async fn exchange(sim: &Simulator, request: &str) -> String {
    let mut s = TcpStream::connect(sim.arm_addr()).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

/// A restart of the VM at `vm` (its ARM path).
fn restart(vm: &str) -> String {
    format!(
        "POST {vm}/restart?api-version=2024-07-01 HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer t\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
}

fn get(path: &str, auth: bool) -> String {
    let auth = if auth {
        "Authorization: Bearer t\r\n"
    } else {
        ""
    };
    format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Connection: close\r\n\r\n")
}

#[test]
fn malformed_scenarios_are_clear_errors() {
    for (yaml, needle) in [
        ("subscriptions: []", "no subscription"),
        ("subscriptions: [", "failed to load the scenario"),
        (
            "subscriptions: [{id: s, resourceGroups: [], bogus: 1}]",
            "unknown field",
        ),
        (&MINIMAL.replace("vnet/s", "vnet/missing"), "unknown subnet"),
        (
            &MINIMAL.replace("faults", "x").replace(
                "nic: { subnet: vnet/s }",
                "nic: { subnet: vnet/s }, faults: [melted]",
            ),
            "unknown variant",
        ),
        (
            &MINIMAL.replace("10.0.0.0/24", "10.0.0.0/99"),
            "invalid prefix",
        ),
    ] {
        let err = Scenario::from_yaml(yaml).unwrap_err();
        assert_eq!(err.reason(), "InvalidScenario");
        assert!(err.to_string().contains(needle), "{needle:?} not in {err}");
    }
}

#[test]
fn the_example_scenarios_parse() {
    for entry in std::fs::read_dir("scenarios").unwrap() {
        let path = entry.unwrap().path();
        Scenario::from_file(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    }
}

#[tokio::test]
async fn arm_errors_have_arm_shapes() {
    let sim = start().await;
    let vm =
        "/subscriptions/sub-1/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm1";
    let (status, body) = http(&sim, &get(&format!("{vm}?api-version=2024-07-01"), false)).await;
    assert_eq!(status, 401);
    assert!(body.contains("\"AuthenticationFailed\""));
    let (status, body) = http(&sim, &get(vm, true)).await;
    assert_eq!(status, 400);
    assert!(body.contains("MissingApiVersionParameter"));
    let (status, body) = http(&sim, &get(&format!("{vm}x?api-version=2024-07-01"), true)).await;
    assert_eq!(status, 404);
    assert!(body.contains("ResourceNotFound"));
    // Percent-encoded query keys and a doubled slash are accepted, as the SDK sends them.
    let (status, body) = http(
        &sim,
        &get(
            &format!("/{vm}?api-version=2024-07-01&%24expand=instanceView"),
            true,
        ),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("PowerState/running"));
    sim.shutdown().await;
}

/// Azure's answers where the operator could trip: the agent's version is `Unknown` while it is
/// not Ready, and the remaining-budget header names the kind of request that was counted.
#[tokio::test]
async fn agent_version_and_rate_limit_headers_follow_azure() {
    let sim = start().await;
    let vm =
        "/subscriptions/sub-1/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm1";
    let view = format!("{vm}/instanceView?api-version=2024-07-01");
    let ready = exchange(&sim, &get(&view, true)).await;
    assert!(ready.contains("\"vmAgentVersion\":\"2."), "{ready}");
    let lower = ready.to_ascii_lowercase();
    assert!(lower.contains("x-ms-ratelimit-remaining-subscription-reads"));
    assert!(!lower.contains("x-ms-ratelimit-remaining-subscription-writes"));
    assert!(sim.inject("vm1", rdphealth::sim::Fault::NicBroken).await);
    let down = exchange(&sim, &get(&view, true)).await;
    assert!(down.contains("\"vmAgentVersion\":\"Unknown\""), "{down}");
    assert!(down.contains("Not Ready"));
    let restart = exchange(&sim, &restart(vm)).await.to_ascii_lowercase();
    assert!(restart.starts_with("http/1.1 202"), "{restart}");
    assert!(restart.contains("x-ms-ratelimit-remaining-subscription-writes"));
    assert!(!restart.contains("x-ms-ratelimit-remaining-subscription-reads"));
    sim.shutdown().await;
}

#[tokio::test]
async fn garbage_requests_get_errors_not_panics() {
    let sim = start().await;
    let base =
        "/subscriptions/sub-1/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm1";
    for (method, path, body) in [
        ("PUT", format!("{base}/extensions/x?api-version=1"), "{not json"),
        ("POST", format!("{base}/runCommand?api-version=1"), "[]"),
        ("POST", format!("{base}/runCommand?api-version=1"), r#"{"commandId":"Nope"}"#),
        ("PUT", "/subscriptions/sub-1/resourceGroups/rg/providers/Microsoft.Network/networkInterfaces/vm1-nic?api-version=1".to_owned(), r#"{"properties":{"ipConfigurations":[{"properties":{"privateIPAddress":"999.1.1.1"}}]}}"#),
        ("GET", "/%%%/../..?api-version=1".to_owned(), ""),
        ("POST", "/tenant/oauth2/v2.0/token".to_owned(), "garbage=&&="),
        ("DELETE", base.to_owned() + "?api-version=1", ""),
    ] {
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let (status, _) = http(&sim, &req).await;
        assert!((400..500).contains(&status), "{method} {path} -> {status}");
    }
    // Still serving.
    let (status, _) = http(&sim, &get(&format!("{base}?api-version=2024-07-01"), true)).await;
    assert_eq!(status, 200);
    sim.shutdown().await;
}

#[tokio::test]
async fn admin_api_injects_faults_and_exposes_counters() {
    let sim = start().await;
    let body = r#"{"fault":"rdp_disabled"}"#;
    let req = format!(
        "POST /_sim/vms/vm1/fault HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    assert_eq!(http(&sim, &req).await.0, 204);
    assert!(
        TcpStream::connect(sim.responder("vm1").unwrap())
            .await
            .is_err(),
        "the listener is closed"
    );
    let (_, vms) = http(&sim, &get("/_sim/vms", false)).await;
    assert!(vms.contains("rdp_disabled"), "{vms}");
    let req =
        "DELETE /_sim/vms/vm1/fault/rdp_disabled HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    assert_eq!(http(&sim, req).await.0, 204);
    assert!(
        TcpStream::connect(sim.responder("vm1").unwrap())
            .await
            .is_ok()
    );
    let bad = "POST /_sim/vms/vm1/fault HTTP/1.1\r\nHost: x\r\nContent-Length: 14\r\nConnection: close\r\n\r\n{\"fault\":\"zz\"}";
    assert_eq!(http(&sim, bad).await.0, 400);

    http(&sim, &get("/subscriptions/sub-1/resourceGroups/rg/providers/Microsoft.Network/networkInterfaces/vm1-nic?api-version=2024-03-01", true)).await;
    let (status, counters) = http(&sim, &get("/_sim/counters", false)).await;
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&counters).unwrap();
    assert_eq!(v["counts"]["nic.get"], 1);
    assert_eq!(sim.count("nic.get"), 1);
    sim.shutdown().await;
}

fn send(method: &str, path: &str, body: &str) -> String {
    format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer t\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[tokio::test]
async fn snapshots_follow_azures_shapes_and_rules() {
    let sim = start().await;
    let base = "/subscriptions/sub-1/resourceGroups/rg/providers/Microsoft.Compute/snapshots";
    let disk = sim.os_disk_id("vm1").unwrap();
    // The VM model names its managed OS disk.
    let (_, vm) = http(
        &sim,
        &get(
            "/subscriptions/sub-1/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm1?api-version=2024-07-01",
            true,
        ),
    )
    .await;
    let vm: serde_json::Value = serde_json::from_str(&vm).unwrap();
    assert_eq!(
        vm["properties"]["storageProfile"]["osDisk"]["managedDisk"]["id"],
        disk
    );
    let body = |tags: &str, source: &str| {
        format!(
            r#"{{"location":"westeurope","tags":{tags},"properties":{{"incremental":true,"creationData":{{"createOption":"Copy","sourceResourceId":"{source}"}}}}}}"#
        )
    };
    let put =
        |name: &str, b: String| send("PUT", &format!("{base}/{name}?api-version=2024-03-02"), &b);
    // Azure's rules: names, tag names, the source disk.
    let (status, text) = http(&sim, &put("bad.name", body("{}", &disk))).await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("InvalidResourceName"), "{text}");
    let (status, text) = http(&sim, &put("s1", body(r#"{"a/b":"x"}"#, &disk))).await;
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("InvalidTagNameCharacters"), "{text}");
    let (status, _) = http(&sim, &put("s1", body("{}", &format!("{disk}x")))).await;
    assert_eq!(status, 404);
    // A long-running PUT like the others, then GET, list and DELETE.
    let answer = exchange(&sim, &put("s1", body(r#"{"k":"v"}"#, &disk))).await;
    assert!(answer.starts_with("HTTP/1.1 202"), "{answer}");
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("azure-asyncoperation:"),
        "{answer}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (status, one) = http(
        &sim,
        &get(&format!("{base}/s1?api-version=2024-03-02"), true),
    )
    .await;
    assert_eq!(status, 200);
    let one: serde_json::Value = serde_json::from_str(&one).unwrap();
    assert_eq!(one["properties"]["creationData"]["sourceResourceId"], disk);
    assert_eq!(one["properties"]["incremental"], true);
    assert_eq!(one["tags"]["k"], "v");
    let (_, list) = http(&sim, &get(&format!("{base}?api-version=2024-03-02"), true)).await;
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(list["value"].as_array().unwrap().len(), 1);
    let (status, _) = http(
        &sim,
        &send("DELETE", &format!("{base}/s1?api-version=2024-03-02"), ""),
    )
    .await;
    assert_eq!(status, 202);
    let (status, _) = http(
        &sim,
        &get(&format!("{base}/s1?api-version=2024-03-02"), true),
    )
    .await;
    assert_eq!(status, 404);
    for op in [
        "snapshot.put",
        "snapshot.get",
        "snapshot.list",
        "snapshot.delete",
    ] {
        assert!(sim.count(op) >= 1, "{op}: {:?}", sim.counters());
    }
    sim.shutdown().await;
}

/// Polls `f` every 10 ms for at most `limit`; returns whether it turned true.
async fn eventually(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + limit;
    while tokio::time::Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    f()
}

#[tokio::test]
async fn realistic_timing_draws_azures_retry_after_and_boots_the_guest_after_a_restart() {
    // Realistic durations, 1,000 times faster on the wall clock: a restart of 1–3 minutes
    // takes 60–180 ms, then Windows boots for 60–300 ms; Retry-After stays 10–60 s.
    let yaml = MINIMAL.replace(
        "subscriptions:",
        "timing: {profile: realistic, seed: 3, speed: 1000}\nsubscriptions:",
    );
    let sim = Simulator::start(Scenario::from_yaml(&yaml).unwrap())
        .await
        .unwrap();
    let vm =
        "/subscriptions/sub-1/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm1";
    let restart = exchange(&sim, &restart(vm)).await.to_ascii_lowercase();
    assert!(restart.starts_with("http/1.1 202"), "{restart}");
    let retry: u64 = restart
        .lines()
        .find_map(|l| l.strip_prefix("retry-after: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    assert!((10..=60).contains(&retry), "Retry-After {retry}");
    let aao = restart
        .lines()
        .find_map(|l| l.strip_prefix("azure-asyncoperation: "))
        .unwrap()
        .trim()
        .to_owned();
    let path = aao.split_once("127.0.0.1").unwrap().1;
    let path = path.split_once('/').map(|(_, p)| format!("/{p}")).unwrap();
    let booting = sim.vm("vm1").unwrap();
    assert!(!booting.running && !booting.agent_ready);
    // Azure reports the restart done while the guest still boots...
    let mut done = false;
    for _ in 0..100 {
        let (_, body) = http(&sim, &get(&path, true)).await;
        if body.contains("\"Succeeded\"") {
            done = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(done, "the restart finished");
    let after = sim.vm("vm1").unwrap();
    assert!(
        !after.running && !after.agent_ready,
        "the guest boots after Azure reports the restart done"
    );
    // ... and is back within the longest boot.
    assert!(
        eventually(Duration::from_secs(2), || sim
            .vm("vm1")
            .is_some_and(|v| v.running && v.agent_ready))
        .await
    );
    sim.shutdown().await;
}
