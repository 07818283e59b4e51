//! Benchmarks of the NSG evaluator over a realistic rule set: a subnet NSG and a NIC NSG of
//! 50 custom rules each (CIDRs, port ranges, service tags) plus Azure's default rules.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{hint::black_box, net::IpAddr};

use criterion::{Criterion, criterion_group, criterion_main};
use rdphealth::evidence::nsg::{
    Access, Direction, Flow, NetworkContext, NetworkSecurityGroup, RuleProtocol, SecurityRule,
    default_rules, evaluate,
};

fn rule(i: u32, access: Access, source: &str, ports: &str) -> SecurityRule {
    SecurityRule {
        name: format!("rule-{i:03}"),
        priority: 100 + i * 10,
        direction: if i.is_multiple_of(7) {
            Direction::Outbound
        } else {
            Direction::Inbound
        },
        access,
        protocol: if i.is_multiple_of(5) {
            RuleProtocol::Udp
        } else {
            RuleProtocol::Tcp
        },
        source_prefixes: vec![source.to_string()],
        source_ports: vec!["*".into()],
        destination_prefixes: vec!["VirtualNetwork".into()],
        destination_ports: vec![ports.to_string()],
        default_rule: false,
    }
}

/// 50 custom rules that do not match the RDP flow from the prober, then (last) the one that
/// does: the evaluator walks the whole list, the worst case for an allowed flow.
fn nsg(id: &str, last: Access) -> NetworkSecurityGroup {
    let mut rules: Vec<SecurityRule> = (0..49)
        .map(|i| {
            let source = match i % 4 {
                0 => format!("10.{}.0.0/16", i),
                1 => format!("192.168.{}.0/24", i),
                2 => "AzureLoadBalancer".to_string(),
                _ => format!("198.51.100.{}", i),
            };
            let ports = match i % 3 {
                0 => "443".to_string(),
                1 => "8000-8100".to_string(),
                _ => "22".to_string(),
            };
            rule(i, Access::Allow, &source, &ports)
        })
        .collect();
    rules.push(rule(490, last, "203.0.113.0/24", "3389"));
    NetworkSecurityGroup {
        id: id.into(),
        rules,
        default_rules: default_rules(),
    }
}

fn nsg_bench(c: &mut Criterion) {
    let ctx = NetworkContext::private_ranges();
    let source: IpAddr = "203.0.113.10".parse().unwrap();
    let vm: IpAddr = "10.20.0.4".parse().unwrap();
    let flow = Flow::inbound_tcp(source, vm, 3389);
    let subnet = nsg("nsg-subnet", Access::Allow);
    let nic = nsg("nsg-nic", Access::Allow);
    let denying = nsg("nsg-nic-deny", Access::Deny);
    let unmatched = Flow::inbound_tcp("198.18.0.1".parse().unwrap(), vm, 3389);
    c.bench_function("nsg_allowed_subnet_and_nic_50_rules", |b| {
        b.iter(|| evaluate(black_box(&flow), Some(&subnet), Some(&nic), &ctx))
    });
    c.bench_function("nsg_denied_at_nic_50_rules", |b| {
        b.iter(|| evaluate(black_box(&flow), Some(&subnet), Some(&denying), &ctx))
    });
    c.bench_function("nsg_default_deny_50_rules", |b| {
        b.iter(|| evaluate(black_box(&unmatched), Some(&subnet), Some(&nic), &ctx))
    });
}

criterion_group!(benches, nsg_bench);
criterion_main!(benches);
