//! Fleet discovery through Azure Resource Graph: the operator's query and paging, through the
//! ARM client's pipeline, against the emulator over loopback.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::{Duration, Instant},
};

use azure_core::Url;
use rdphealth::{
    azure::{
        ArmClient, ArmConfig, AzureError, Discovery, GraphOptions, ResourceGraph, StaticToken,
        VmSelector,
    },
    sim::{HttpFault, Scenario, Simulator, scenario::VmSpec},
};

const SUB: &str = "00000000-0000-0000-0000-00000000f1ee";
const OTHER_SUB: &str = "00000000-0000-0000-0000-00000000beef";

/// `bulk` plain VMs `vm-00000…` in `rg-bulk`, plus a handful with tags, OS types, groups and a
/// second subscription for the filter tests.
fn scenario(bulk: usize) -> Scenario {
    let mut vms = String::new();
    for i in 0..bulk {
        // Explicit addresses: the emulator's search for a free one costs a scan per VM.
        let ip =
            std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 20, 0, 4)) + i as u32);
        vms.push_str(&format!(
            "          - {{ name: vm-{i:05}, nic: {{ subnet: vnet/default, publicIp: false, privateIp: {ip} }} }}\n"
        ));
    }
    let yaml = format!(
        r#"
subscriptions:
  - id: {SUB}
    resourceGroups:
      - name: rg-bulk
        location: westeurope
        virtualNetworks:
          - name: vnet
            addressPrefix: 10.20.0.0/16
            subnets:
              - {{ name: default, addressPrefix: 10.20.0.0/20 }}
        vms:
{vms}
      - name: RG-Web
        location: northeurope
        virtualNetworks:
          - name: vnet-web
            addressPrefix: 10.30.0.0/16
            subnets:
              - {{ name: default, addressPrefix: 10.30.1.0/24 }}
        vms:
          - {{ name: web-1, nic: {{ subnet: vnet-web/default }}, tags: {{ env: prod, rdp: monitored }} }}
          - {{ name: web-2, nic: {{ subnet: vnet-web/default }}, tags: {{ Env: prod }} }}
          - {{ name: web-3, nic: {{ subnet: vnet-web/default }}, tags: {{ env: Prod }} }}
          - {{ name: linux-1, nic: {{ subnet: vnet-web/default }}, osType: Linux, tags: {{ env: prod }} }}
          - {{ name: "quote'vm", nic: {{ subnet: vnet-web/default, publicIp: false }} }}
  - id: {OTHER_SUB}
    resourceGroups:
      - name: rg-other
        location: westeurope
        virtualNetworks:
          - name: vnet-o
            addressPrefix: 10.40.0.0/16
            subnets:
              - {{ name: default, addressPrefix: 10.40.1.0/24 }}
        vms:
          - {{ name: other-1, nic: {{ subnet: vnet-o/default }}, tags: {{ env: prod }} }}
"#
    );
    Scenario::from_yaml(&yaml).unwrap()
}

async fn start(bulk: usize) -> (Simulator, ArmClient) {
    let started = Instant::now();
    let sim = Simulator::start(scenario(bulk)).await.unwrap();
    println!(
        "simulator with {bulk} bulk VMs started in {:?}",
        started.elapsed()
    );
    let cfg = ArmConfig::new(Url::parse(&sim.arm_url()).unwrap());
    let az = ArmClient::new(cfg, Arc::new(StaticToken::new("graph-test-token")));
    // Generous, so tests that discover many times are not throttled; quota tests set theirs.
    sim.set_graph_quota(10_000, Duration::from_secs(5));
    (sim, az)
}

/// One raw HTTP/1.1 exchange with the emulator: (status, lower-cased head, JSON body or null).
async fn http(
    sim: &Simulator,
    method: &str,
    path: &str,
    bearer: bool,
    body: Option<serde_json::Value>,
) -> (u16, String, serde_json::Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let auth = if bearer {
        "Authorization: Bearer t\r\n"
    } else {
        ""
    };
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut s = tokio::net::TcpStream::connect(sim.arm_addr())
        .await
        .unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let json = serde_json::from_str(body).unwrap_or(serde_json::Value::Null);
    (status, head.to_ascii_lowercase(), json)
}

fn selector() -> VmSelector {
    VmSelector {
        subscriptions: vec![SUB.into()],
        os_type: Some("Windows".into()),
        ..Default::default()
    }
}

fn names(d: &Discovery) -> BTreeSet<String> {
    d.vms.iter().map(|v| v.vm.name.clone()).collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| (*s).to_owned()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_through_every_vm_once_in_id_order() {
    let (sim, az) = start(2_500).await;
    sim.set_graph_quota(15, Duration::from_secs(5));
    let sel = VmSelector {
        resource_groups: vec!["rg-bulk".into()],
        ..selector()
    };
    let d = az.discover(&sel).await.unwrap();
    assert_eq!(d.requests, 3, "2,500 rows at 1,000 a page");
    assert_eq!(sim.count("graph.resources"), 3);
    assert_eq!(d.vms.len(), 2_500);
    assert_eq!(names(&d).len(), 2_500, "each VM once");
    let ids: Vec<String> = d.vms.iter().map(|v| v.vm.id()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ordered by id");
    let first = &d.vms[0];
    assert_eq!(first.vm.name, "vm-00000");
    assert_eq!(first.vm.subscription, SUB);
    assert_eq!(first.vm.resource_group, "rg-bulk");
    assert_eq!(first.location, "westeurope");
    assert_eq!(first.power_state.as_deref(), Some("PowerState/running"));
    assert_eq!(
        first.computer_name.as_deref(),
        Some("vm-00000"),
        "osProfile.computerName"
    );
    assert_eq!(
        first.private_ip.unwrap().to_string(),
        sim.vm("vm-00000").unwrap().private_ip.unwrap()
    );
    assert!(first.public_ip.is_none());
    assert_eq!(d.quota_remaining, Some(12), "15 per window, 3 used");
    assert!(d.quota_resets_after.unwrap() <= Duration::from_secs(5));

    // A smaller page: 2,500 / 700 → 4 requests, same set.
    let opts = GraphOptions {
        page_size: 700,
        ..Default::default()
    };
    let small = az.discover_with(&sel, &opts).await.unwrap();
    assert_eq!(small.requests, 4);
    assert_eq!(small.vms, d.vms);
    sim.shutdown().await;
}

#[tokio::test]
async fn selector_fields_each_narrow_the_set() {
    let (sim, az) = start(3).await;
    let all = az.discover(&selector()).await.unwrap();
    assert_eq!(
        names(&all),
        set(&[
            "vm-00000", "vm-00001", "vm-00002", "web-1", "web-2", "web-3", "quote'vm"
        ]),
        "Windows VMs of the one subscription"
    );
    let web1 = all.vms.iter().find(|v| v.vm.name == "web-1").unwrap();
    assert_eq!(
        web1.vm.resource_group, "RG-Web",
        "the group as Azure spells it"
    );
    assert_eq!(web1.location, "northeurope");
    assert_eq!(
        web1.public_ip.map(|ip| ip.to_string()),
        sim.vm("web-1").unwrap().public_ip
    );
    assert_eq!(web1.tags.get("rdp").map(String::as_str), Some("monitored"));

    let cases: Vec<(VmSelector, Vec<&str>)> = vec![
        (
            VmSelector {
                resource_groups: vec!["rg-web".into()],
                ..selector()
            },
            vec!["web-1", "web-2", "web-3", "quote'vm"],
        ),
        (
            VmSelector {
                tags: BTreeMap::from([("env".into(), "prod".into())]),
                ..selector()
            },
            // Keys case-insensitive (web-2's `Env`), values exact (not web-3's `Prod`).
            vec!["web-1", "web-2"],
        ),
        (
            VmSelector {
                tags: BTreeMap::from([
                    ("env".into(), "prod".into()),
                    ("RDP".into(), "monitored".into()),
                ]),
                ..selector()
            },
            vec!["web-1"],
        ),
        (
            VmSelector {
                os_type: Some("linux".into()),
                ..selector()
            },
            vec!["linux-1"],
        ),
        (
            VmSelector {
                os_type: None,
                tags: BTreeMap::from([("env".into(), "prod".into())]),
                ..selector()
            },
            vec!["web-1", "web-2", "linux-1"],
        ),
        (
            VmSelector {
                name_pattern: Some("WEB-?".into()),
                ..selector()
            },
            vec!["web-1", "web-2", "web-3"],
        ),
        (
            VmSelector {
                name_pattern: Some("vm-*1".into()),
                ..selector()
            },
            vec!["vm-00001"],
        ),
        (
            VmSelector {
                subscriptions: vec![OTHER_SUB.into()],
                ..selector()
            },
            vec!["other-1"],
        ),
        (
            VmSelector {
                subscriptions: vec![SUB.into(), OTHER_SUB.into()],
                tags: BTreeMap::from([("env".into(), "prod".into())]),
                ..selector()
            },
            vec!["web-1", "web-2", "other-1"],
        ),
    ];
    for (sel, want) in cases {
        let d = az.discover(&sel).await.unwrap();
        assert_eq!(names(&d), set(&want), "{sel:?}");
    }
    sim.shutdown().await;
}

#[tokio::test]
async fn hostile_selector_values_cannot_change_the_query() {
    let (sim, az) = start(3).await;
    let attacks = [
        "x' or name != '",
        "x\\' | take 1 //",
        "*' | take 1",
        "') | union (Resources) | where ('",
        "\\",
        "rg-bulk' or resourceGroup =~ 'rg-web",
    ];
    for attack in attacks {
        for sel in [
            VmSelector {
                resource_groups: vec![attack.into()],
                ..selector()
            },
            VmSelector {
                tags: BTreeMap::from([(attack.into(), attack.into())]),
                ..selector()
            },
            VmSelector {
                os_type: Some(attack.into()),
                ..selector()
            },
            VmSelector {
                name_pattern: Some(attack.into()),
                ..selector()
            },
        ] {
            let d = az.discover(&sel).await.unwrap();
            assert!(d.vms.is_empty(), "{sel:?} found {:?}", names(&d));
        }
    }
    // A quote in a name is just a character of it.
    let quoted = VmSelector {
        name_pattern: Some("quote'*".into()),
        ..selector()
    };
    assert_eq!(
        names(&az.discover(&quoted).await.unwrap()),
        set(&["quote'vm"])
    );
    // Values that cannot be carried safely are refused before any request.
    let before = sim.count("graph.resources");
    for bad in ["a\nb", "a\r\n| take 1", "nul\0"] {
        let sel = VmSelector {
            resource_groups: vec![bad.into()],
            ..selector()
        };
        let err = az.discover(&sel).await.unwrap_err();
        assert_eq!(err.reason(), "Invalid", "{err}");
    }
    assert_eq!(sim.count("graph.resources"), before);
    sim.shutdown().await;
}

#[tokio::test]
async fn a_spent_quota_is_waited_out_or_reported() {
    let (sim, az) = start(25).await;
    let sel = VmSelector {
        resource_groups: vec!["rg-bulk".into()],
        ..selector()
    };
    // 25 VMs, 10 a page: 3 pages.
    let opts = GraphOptions {
        page_size: 10,
        ..Default::default()
    };
    // Two requests per second: the third page waits for the window to reset.
    sim.set_graph_quota(2, Duration::from_secs(1));
    let started = Instant::now();
    let d = az.discover_with(&sel, &opts).await.unwrap();
    let took = started.elapsed();
    assert_eq!(d.vms.len(), 25);
    assert_eq!(names(&d).len(), 25);
    assert_eq!(d.requests, 3);
    assert_eq!(
        sim.count("throttled"),
        0,
        "the client waited instead of being throttled"
    );
    assert_eq!(d.quota_remaining, Some(1), "a fresh window after the wait");
    println!("discovery with a 2-per-second quota took {took:?}");

    // A long window: the client does not sleep for it, it reports when to come back.
    sim.set_graph_quota(2, Duration::from_secs(120));
    let err = az.discover_with(&sel, &opts).await.unwrap_err();
    let AzureError::Throttled { retry_after, .. } = &err else {
        panic!("expected Throttled, got {err}");
    };
    let wait = retry_after.unwrap();
    assert!(
        wait > Duration::from_secs(100) && wait <= Duration::from_secs(120),
        "{wait:?}"
    );
    assert_eq!(
        sim.count("throttled"),
        0,
        "stopped before the service had to refuse"
    );

    // The client remembers the spent quota: the next discovery does not even ask.
    let before = sim.count("graph.resources");
    let err = az.discover_with(&sel, &opts).await.unwrap_err();
    assert_eq!(err.reason(), "Throttled", "{err}");
    assert!(err.retry_after().unwrap() > Duration::from_secs(100));
    assert_eq!(
        sim.count("graph.resources"),
        before,
        "no request on a spent quota"
    );

    // Another client of the same caller asks: the service answers 429 with Retry-After, which
    // is `Throttled`, not retried, and remembered.
    let cfg = ArmConfig::new(Url::parse(&sim.arm_url()).unwrap());
    let other = ArmClient::new(cfg, Arc::new(StaticToken::new("graph-test-token")));
    let err = other.discover_with(&sel, &opts).await.unwrap_err();
    assert_eq!(err.reason(), "Throttled", "{err}");
    assert!(err.retry_after().unwrap() > Duration::from_secs(100));
    assert_eq!(
        sim.count("graph.resources"),
        before + 1,
        "one request, not retried"
    );
    assert_eq!(sim.count("throttled"), 1);
    assert_eq!(
        other.discover_with(&sel, &opts).await.unwrap_err().reason(),
        "Throttled"
    );
    assert_eq!(sim.count("graph.resources"), before + 1);

    // A quota that resets soon is waited out across discoveries too.
    sim.set_graph_quota(1, Duration::from_millis(500));
    let one_page = GraphOptions {
        page_size: 1000,
        ..Default::default()
    };
    let fresh = ArmClient::new(
        ArmConfig::new(Url::parse(&sim.arm_url()).unwrap()),
        Arc::new(StaticToken::new("another-caller")),
    );
    for _ in 0..3 {
        assert_eq!(
            fresh
                .discover_with(&sel, &one_page)
                .await
                .unwrap()
                .vms
                .len(),
            25
        );
    }
    assert_eq!(
        sim.count("throttled"),
        1,
        "no 429 while pacing one request per window"
    );
    sim.shutdown().await;
}

/// A fake Resource Graph on loopback whose every answer carries a `$skipToken`: always the
/// same one, or a fresh one each time.
async fn endless_graph(fresh_tokens: bool) -> (ArmClient, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let mut answered = 0;
        while let Ok((mut s, _)) = listener.accept().await {
            let mut buf = vec![0u8; 65536];
            let _ = s.read(&mut buf).await;
            let token = if fresh_tokens {
                format!("t{answered}")
            } else {
                "same".to_owned()
            };
            let body = serde_json::json!({
                "totalRecords": 1_000_000, "count": 1, "resultTruncated": "false", "$skipToken": token,
                "data": [{ "id": format!("/subscriptions/{SUB}/resourceGroups/g/providers/Microsoft.Compute/virtualMachines/v{answered}"), "name": format!("v{answered}") }],
            })
            .to_string();
            answered += 1;
            let rsp = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(rsp.as_bytes()).await;
        }
    });
    let cfg = ArmConfig::new(Url::parse(&format!("http://{addr}")).unwrap());
    (ArmClient::new(cfg, Arc::new(StaticToken::new("t"))), server)
}

#[tokio::test]
async fn endless_paging_is_cut_off() {
    let (az, server) = endless_graph(false).await;
    let err = az.discover(&selector()).await.unwrap_err();
    assert_eq!(err.reason(), "Invalid");
    assert!(err.to_string().contains("same $skipToken"), "{err}");
    server.abort();

    let (az, server) = endless_graph(true).await;
    let opts = GraphOptions {
        max_pages: 5,
        ..Default::default()
    };
    let err = az.discover_with(&selector(), &opts).await.unwrap_err();
    assert_eq!(err.reason(), "Invalid");
    assert!(err.to_string().contains("after 5 pages"), "{err}");
    server.abort();
}

#[tokio::test]
async fn scripted_failures_are_typed() {
    let (sim, az) = start(1).await;
    sim.inject_http_fault(HttpFault {
        operation: "graph.resources".into(),
        status: 429,
        code: Some("RateLimiting".into()),
        retry_after: Some(1),
        count: 1,
    });
    let err = az.discover(&selector()).await.unwrap_err();
    assert_eq!(err.reason(), "Throttled");
    assert_eq!(err.retry_after(), Some(Duration::from_secs(1)));
    assert_eq!(sim.count("graph.resources"), 1, "not retried");
    sim.inject_http_fault(HttpFault {
        operation: "graph.resources".into(),
        status: 403,
        code: Some("AuthorizationFailed".into()),
        retry_after: None,
        count: 1,
    });
    // The next discovery first waits out the Retry-After.
    let started = Instant::now();
    let err = az.discover(&selector()).await.unwrap_err();
    assert_eq!(err.reason(), "Forbidden");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(az.discover(&selector()).await.unwrap().vms.len(), 5);
    sim.shutdown().await;
}

#[tokio::test]
async fn membership_changes_show_on_the_next_discovery() {
    let (sim, az) = start(2).await;
    let sel = VmSelector {
        tags: BTreeMap::from([("env".into(), "prod".into())]),
        ..selector()
    };
    assert_eq!(
        names(&az.discover(&sel).await.unwrap()),
        set(&["web-1", "web-2"])
    );

    // A VM is created with the tag: found, with its addresses, and its responder answers.
    let spec: VmSpec = serde_json::from_value(serde_json::json!({
        "name": "web-new",
        "nic": { "subnet": "vnet-web/default" },
        "tags": { "env": "prod" },
    }))
    .unwrap();
    sim.add_vm(SUB, "RG-Web", spec).await.unwrap();
    let d = az.discover(&sel).await.unwrap();
    assert_eq!(names(&d), set(&["web-1", "web-2", "web-new"]));
    let new = d.vms.iter().find(|v| v.vm.name == "web-new").unwrap();
    let summary = sim.vm("web-new").unwrap();
    assert_eq!(new.private_ip.map(|i| i.to_string()), summary.private_ip);
    assert!(new.public_ip.is_some());
    tokio::net::TcpStream::connect(summary.rdp)
        .await
        .expect("the new VM's responder answers");

    // A tag removed: dropped.
    assert!(sim.set_vm_tags("web-2", BTreeMap::new()));
    assert_eq!(
        names(&az.discover(&sel).await.unwrap()),
        set(&["web-1", "web-new"])
    );

    // A VM deleted: dropped, and its responder no longer accepts.
    assert!(sim.delete_vm("web-new").await);
    assert_eq!(names(&az.discover(&sel).await.unwrap()), set(&["web-1"]));
    assert!(tokio::net::TcpStream::connect(summary.rdp).await.is_err());
    assert!(!sim.delete_vm("web-new").await);
    sim.shutdown().await;
}

#[tokio::test]
async fn the_control_endpoints_change_membership_over_http() {
    let (sim, az) = start(1).await;
    let added = serde_json::json!({
        "subscription": SUB,
        "resourceGroup": "rg-bulk",
        "vm": { "name": "added", "nic": { "subnet": "vnet/default" }, "tags": { "team": "a" } }
    });
    let (status, _, _) = http(&sim, "POST", "/_sim/vms", false, Some(added.clone())).await;
    assert_eq!(status, 201);
    let sel = VmSelector {
        tags: BTreeMap::from([("team".into(), "a".into())]),
        ..selector()
    };
    assert_eq!(names(&az.discover(&sel).await.unwrap()), set(&["added"]));
    // A duplicate name is refused.
    let (status, _, _) = http(&sim, "POST", "/_sim/vms", false, Some(added)).await;
    assert_eq!(status, 400);
    let tags = serde_json::json!({ "tags": { "team": "b" } });
    let (status, _, _) = http(&sim, "PUT", "/_sim/vms/added/tags", false, Some(tags)).await;
    assert_eq!(status, 204);
    assert!(az.discover(&sel).await.unwrap().vms.is_empty());
    let (status, _, _) = http(&sim, "DELETE", "/_sim/vms/added", false, None).await;
    assert_eq!(status, 204);
    assert!(sim.vm("added").is_none());
    let (status, _, _) = http(&sim, "DELETE", "/_sim/vms/added", false, None).await;
    assert_eq!(status, 404);
    // An unknown subnet is refused.
    let bad = serde_json::json!({
        "subscription": SUB, "resourceGroup": "rg-bulk",
        "vm": { "name": "x", "nic": { "subnet": "nope/default" } }
    });
    let (status, _, _) = http(&sim, "POST", "/_sim/vms", false, Some(bad)).await;
    assert_eq!(status, 400);
    sim.shutdown().await;
}

#[tokio::test]
async fn the_emulator_refuses_other_queries_with_args_error_shape() {
    let (sim, _az) = start(1).await;
    let path = "/providers/Microsoft.ResourceGraph/resources?api-version=2022-10-01";
    let query = rdphealth::azure::graph_query::vm_query(&selector()).unwrap();
    let (status, _, v) = http(
        &sim,
        "POST",
        path,
        true,
        Some(serde_json::json!({ "subscriptions": [SUB], "query": "Resources | take 1" })),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(v["error"]["code"], "BadRequest");
    assert_eq!(v["error"]["details"][0]["code"], "InvalidQuery");

    let too_big =
        serde_json::json!({ "subscriptions": [SUB], "query": query, "options": { "$top": 5000 } });
    assert_eq!(http(&sim, "POST", path, true, Some(too_big)).await.0, 400);
    let forged = serde_json::json!({
        "subscriptions": [SUB], "query": query,
        "options": { "$top": 1, "$skipToken": "forged" },
    });
    let (status, head, _) = http(&sim, "POST", path, true, Some(forged)).await;
    assert_eq!(status, 400);
    assert!(head.contains("x-ms-user-quota-remaining"), "{head}");

    // Paging fields of a real answer.
    let page = serde_json::json!({
        "subscriptions": [SUB], "query": query,
        "options": { "$top": 2, "resultFormat": "objectArray" },
    });
    let (status, head, v) = http(&sim, "POST", path, true, Some(page)).await;
    assert_eq!(status, 200);
    assert!(
        head.contains("x-ms-user-quota-resets-after: 00:00:0"),
        "{head}"
    );
    assert_eq!(v["totalRecords"], 5);
    assert_eq!(v["count"], 2);
    assert_eq!(v["resultTruncated"], "false");
    assert!(v["$skipToken"].is_string());
    // Without a token: 401.
    let (status, _, _) = http(&sim, "POST", path, false, Some(serde_json::json!({}))).await;
    assert_eq!(status, 401);
    sim.shutdown().await;
}
