//! Endpoint resolution from Azure through the real adapter and the simulator: the address
//! per `addressType`, the cache that keeps probes free of ARM reads, and the refreshes after
//! a failed probe or a rung that may move the VM.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{sync::Arc, time::Duration};

use azure_core::Url;
use rdphealth::{
    api::{AddressType, EndpointSource, RdpHealthSpec},
    azure::{ArmClient, ArmConfig, StaticToken},
    engine::{AzureResolver, EndpointResolver, ResolveError, ResolverPolicy, ValidSpec},
    sim::{Scenario, Simulator},
};

const SUB: &str = "00000000-0000-0000-0000-0000000000bb";

async fn start() -> Simulator {
    let yaml = format!(
        r#"
subscriptions:
  - id: {SUB}
    resourceGroups:
      - name: rg
        location: westeurope
        virtualNetworks:
          - {{ name: vnet, addressPrefix: 10.0.0.0/16, subnets: [ {{ name: s, addressPrefix: 10.0.0.0/24 }} ] }}
        vms:
          - {{ name: vm1, nic: {{ subnet: vnet/s }} }}
          - {{ name: internal, nic: {{ subnet: vnet/s, publicIp: false }} }}
"#
    );
    Simulator::start(Scenario::from_yaml(&yaml).unwrap())
        .await
        .unwrap()
}

fn resolver(sim: &Simulator, policy: ResolverPolicy) -> AzureResolver {
    let client = ArmClient::new(
        ArmConfig::new(Url::parse(&sim.arm_url()).unwrap()),
        Arc::new(StaticToken::new("t")),
    );
    AzureResolver::new(Arc::new(client), policy)
}

fn spec(vm: &str, address_type: AddressType, host: Option<&str>) -> ValidSpec {
    let mut s: RdpHealthSpec = serde_json::from_value(serde_json::json!({
        "vm": {"resourceId": format!("/subscriptions/{SUB}/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/{vm}")},
    }))
    .unwrap();
    s.endpoint.address_type = address_type;
    s.endpoint.host = host.map(str::to_string);
    ValidSpec::try_from(&s).unwrap()
}

#[tokio::test]
async fn addresses_come_from_azure_and_are_cached() {
    let sim = start().await;
    let r = resolver(&sim, ResolverPolicy::default());
    let public = spec("vm1", AddressType::Public, None);
    let summary = sim.vm("vm1").unwrap();

    let first = r.resolve(&public).await.unwrap();
    assert_eq!(Some(first.host.clone()), summary.public_ip);
    assert_eq!(first.port, 3389);
    assert_eq!(first.source, EndpointSource::Azure);
    let reads = sim.count("vm.get");
    assert_eq!(reads, 1);

    // Probing again costs nothing, even after a failed probe (the address is young).
    for _ in 0..5 {
        assert_eq!(r.resolve(&public).await.unwrap(), first);
        r.probe_failed(&public);
    }
    assert_eq!(sim.count("vm.get"), reads);

    // A rung that may move the VM: looked up again.
    r.forget(&public);
    r.resolve(&public).await.unwrap();
    assert_eq!(sim.count("vm.get"), reads + 1);

    // The private address, a separate entry.
    let private = r
        .resolve(&spec("vm1", AddressType::Private, None))
        .await
        .unwrap();
    assert_eq!(Some(private.host), summary.private_ip);

    // A host override is probed where the spec says; Azure is asked only for the computer
    // the endpoint must answer as (one VM read, no network reads), and that is cached too.
    let before = sim.count("vm.get");
    let nic_reads = sim.count("nic.get");
    let overridden = spec("vm1", AddressType::Public, Some("rdp.example.com"));
    let host = r.resolve(&overridden).await.unwrap();
    assert_eq!(host.source, EndpointSource::Spec);
    assert_eq!(host.host, "rdp.example.com");
    assert_eq!(host.computer_name.as_deref(), Some("vm1"));
    assert_eq!(sim.count("vm.get"), before + 1);
    for _ in 0..3 {
        assert_eq!(r.resolve(&overridden).await.unwrap(), host);
    }
    assert_eq!(sim.count("vm.get"), before + 1);
    assert_eq!(sim.count("nic.get"), nic_reads);
    sim.shutdown().await;
}

#[tokio::test]
async fn a_host_override_whose_vm_azure_cannot_read_is_probed_without_an_expected_name() {
    let sim = start().await;
    let r = resolver(&sim, ResolverPolicy::default());
    let host = r
        .resolve(&spec("nope", AddressType::Public, Some("10.0.0.99")))
        .await
        .unwrap();
    assert_eq!(host.host, "10.0.0.99");
    assert_eq!(host.source, EndpointSource::Spec);
    assert_eq!(host.computer_name, None);
    sim.shutdown().await;
}

#[tokio::test]
async fn failing_probes_refresh_an_old_address() {
    let sim = start().await;
    let r = resolver(
        &sim,
        ResolverPolicy {
            failing_ttl: Duration::from_millis(50),
            ..ResolverPolicy::default()
        },
    );
    let public = spec("vm1", AddressType::Public, None);
    r.resolve(&public).await.unwrap();
    r.resolve(&public).await.unwrap();
    assert_eq!(sim.count("vm.get"), 1, "fresh: cached");
    tokio::time::sleep(Duration::from_millis(80)).await;
    r.resolve(&public).await.unwrap();
    assert_eq!(sim.count("vm.get"), 1, "old but probes succeed: cached");
    r.probe_failed(&public);
    r.resolve(&public).await.unwrap();
    assert_eq!(sim.count("vm.get"), 2, "old and failing: looked up again");
    sim.shutdown().await;
}

#[tokio::test]
async fn lookup_failures_are_conditions_and_not_repeated_at_once() {
    let sim = start().await;
    let r = resolver(&sim, ResolverPolicy::default());
    let none = r
        .resolve(&spec("internal", AddressType::Public, None))
        .await
        .unwrap_err();
    assert_eq!(none, ResolveError::NoAddress("public"));
    assert_eq!(none.reason(), "NoAddress");
    assert!(!none.needs_object_change());

    let missing = spec("nope", AddressType::Public, None);
    let err = r.resolve(&missing).await.unwrap_err();
    assert!(
        matches!(
            err,
            ResolveError::Azure {
                reason: "NotFound",
                ..
            }
        ),
        "{err:?}"
    );
    let reads = sim.count("vm.get");
    assert_eq!(r.resolve(&missing).await.unwrap_err(), err);
    assert_eq!(
        sim.count("vm.get"),
        reads,
        "a failed lookup is cached briefly"
    );
    sim.shutdown().await;
}
