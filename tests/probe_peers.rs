//! The prober against in-process fake peers on loopback: one case per failure reason,
//! every negotiation failure code, and the certificate findings.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: failures should panic

mod common;

use std::{io, net::SocketAddr, sync::Arc, time::Duration};

use common::{Peer, closed_port, spawn, tls_alert, tls_server};
use rdphealth::probe::{
    BoxFuture, FailureReason, Finding, ProbeOptions, ProbeReport, RdpProber, Resolve,
    SecurityProtocol, Target, codec,
};

#[test]
fn ports_for_peers_are_distinct_free_and_below_the_ephemeral_range() {
    let low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let ports: Vec<u16> = (0..200).map(|_| common::free_port()).collect();
    let distinct: std::collections::HashSet<_> = ports.iter().collect();
    assert_eq!(distinct.len(), ports.len(), "{ports:?}");
    for port in ports {
        assert!(port < low, "{port} is in the ephemeral range from {low}");
        std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    }
}

fn opts(timeout_ms: u64) -> ProbeOptions {
    ProbeOptions {
        timeout: Duration::from_millis(timeout_ms),
        ..ProbeOptions::default()
    }
}

async fn probe_addr(addr: SocketAddr, timeout_ms: u64) -> ProbeReport {
    let target = Target::new(addr.ip().to_string(), addr.port()).unwrap();
    RdpProber::new()
        .unwrap()
        .probe_once(&target, &opts(timeout_ms))
        .await
}

async fn probe_peer(peer: Peer) -> ProbeReport {
    probe_addr(spawn(peer).await, 2_000).await
}

fn reason(report: &ProbeReport) -> Option<FailureReason> {
    report.failure.as_ref().map(|f| f.reason)
}

#[tokio::test]
async fn healthy_tls_endpoint_is_reachable_with_certificate_facts() {
    let tls = tls_server(time::Duration::days(-1), time::Duration::days(365));
    let report = probe_peer(Peer::Tls { protocol: 1, tls }).await;
    assert!(report.reachable, "{report:?}");
    assert_eq!(report.selected_protocol, Some(SecurityProtocol::Ssl));
    let tls = report.tls.as_ref().unwrap();
    assert_eq!(tls.version, "TLSv1.3");
    let cert = tls.certificate.as_ref().unwrap();
    assert_eq!(cert.subject, "CN=rdp.test");
    assert!(cert.self_signed);
    assert!(!cert.expired);
    assert!(report.findings.is_empty());
    assert!(report.likely_causes.is_empty());
    for layer in [report.layers.tcp, report.layers.x224, report.layers.tls] {
        assert!(layer.unwrap().ok);
    }
    assert!(
        report.layers.dns.is_none(),
        "an IP literal needs no resolution"
    );
}

#[tokio::test]
async fn one_prober_parses_a_certificate_once_and_a_different_one_afresh() {
    let prober = RdpProber::new().unwrap();
    let target = |a: SocketAddr| Target::new(a.ip().to_string(), a.port()).unwrap();
    let valid = spawn(Peer::Tls {
        protocol: 1,
        tls: tls_server(time::Duration::days(-1), time::Duration::days(365)),
    })
    .await;
    let expired = spawn(Peer::Tls {
        protocol: 1,
        tls: tls_server(time::Duration::days(-400), time::Duration::days(-3)),
    })
    .await;
    let first = prober.probe_once(&target(valid), &opts(2_000)).await;
    let again = prober.probe_once(&target(valid), &opts(2_000)).await;
    assert!(first.reachable && again.reachable);
    assert_eq!(first.certificate(), again.certificate());
    assert!(first.certificate().unwrap().self_signed);
    assert_eq!(prober.certificates().parses(), 1, "the same bytes again");
    let other = prober.probe_once(&target(expired), &opts(2_000)).await;
    assert_eq!(other.findings, vec![Finding::CertificateExpired]);
    assert_ne!(
        other.certificate().unwrap().sha1_thumbprint,
        first.certificate().unwrap().sha1_thumbprint
    );
    assert_eq!(prober.certificates().parses(), 2, "new bytes are parsed");
}

#[tokio::test]
async fn hybrid_selection_also_runs_tls() {
    let tls = tls_server(time::Duration::days(-1), time::Duration::days(365));
    let report = probe_peer(Peer::Tls { protocol: 2, tls }).await;
    assert!(report.reachable);
    assert_eq!(report.selected_protocol, Some(SecurityProtocol::Hybrid));
    assert!(report.tls.is_some());
}

#[tokio::test]
async fn expired_certificate_is_a_finding_not_a_failure() {
    let tls = tls_server(time::Duration::days(-400), time::Duration::days(-3));
    let report = probe_peer(Peer::Tls { protocol: 1, tls }).await;
    assert!(report.reachable);
    assert_eq!(report.findings, vec![Finding::CertificateExpired]);
    assert!(report.certificate().unwrap().expired);
    assert!(!report.likely_causes.is_empty());
}

#[tokio::test]
async fn certificate_expiring_within_the_warning_is_a_finding() {
    let tls = tls_server(
        time::Duration::days(-30),
        time::Duration::days(3) + time::Duration::hours(2),
    );
    let report = probe_peer(Peer::Tls { protocol: 1, tls }).await;
    assert!(report.reachable);
    assert_eq!(
        report.findings,
        vec![Finding::CertificateExpiring { days_left: 3 }]
    );
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(
        json["findings"][0],
        serde_json::json!({"kind": "certificate_expiring", "daysLeft": 3})
    );
}

#[tokio::test]
async fn plain_rdp_selection_is_reachable_with_no_tls_finding() {
    let report = probe_peer(Peer::Raw(codec::encode_negotiation_response(0, 1))).await;
    assert!(report.reachable);
    assert_eq!(report.selected_protocol, Some(SecurityProtocol::Rdp));
    assert_eq!(report.findings, vec![Finding::NoTls]);
    assert!(report.layers.tls.is_none());
}

#[tokio::test]
async fn eleven_byte_confirm_means_standard_rdp_security() {
    let report = probe_peer(Peer::Raw(codec::encode_legacy_confirm())).await;
    assert!(report.reachable);
    assert_eq!(report.selected_protocol, Some(SecurityProtocol::Rdp));
    assert_eq!(report.findings, vec![Finding::NoTls]);
}

#[tokio::test]
async fn every_negotiation_failure_code_is_classified() {
    for code in 1..=6u32 {
        let report = probe_peer(Peer::Raw(codec::encode_negotiation_failure(code))).await;
        assert!(!report.reachable);
        let failure = report.failure.as_ref().unwrap();
        assert_eq!(failure.reason, FailureReason::NegotiationFailure);
        assert_eq!(failure.code, Some(code));
        assert!(
            failure
                .detail
                .contains(codec::NegotiationFailureCode(code).name())
        );
        assert!(!report.likely_causes.is_empty());
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["failure"]["code"], code);
        assert_eq!(json["failure"]["reason"], "negotiation_failure");
    }
}

#[tokio::test]
async fn mcs_disconnect_is_an_unexpected_pdu() {
    let report = probe_peer(Peer::Raw(codec::encode_mcs_disconnect())).await;
    assert_eq!(reason(&report), Some(FailureReason::UnexpectedPdu));
    assert!(report.failure.unwrap().detail.contains("MCS"));
}

#[tokio::test]
async fn http_reply_is_not_rdp() {
    let report = probe_peer(Peer::Raw(b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec())).await;
    assert_eq!(reason(&report), Some(FailureReason::NotRdp));
    assert!(report.failure.unwrap().detail.contains("HTTP/1.1 400"));
}

#[tokio::test]
async fn garbage_tpkt_length_is_not_rdp() {
    let report = probe_peer(Peer::Raw(vec![0x03, 0x00, 0xff, 0xff, 0x00])).await;
    assert_eq!(reason(&report), Some(FailureReason::NotRdp));
}

#[tokio::test]
async fn silent_listener_is_an_x224_timeout_within_the_deadline() {
    let addr = spawn(Peer::Silent).await;
    let started = std::time::Instant::now();
    let report = probe_addr(addr, 300).await;
    assert_eq!(reason(&report), Some(FailureReason::X224Timeout));
    assert!(report.layers.tcp.unwrap().ok);
    assert!(!report.layers.x224.unwrap().ok);
    // The deadline is honoured (generous bound: this is a correctness check, not a benchmark).
    assert!(started.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn close_before_reply_is_connection_closed() {
    let report = probe_peer(Peer::CloseImmediately).await;
    assert_eq!(reason(&report), Some(FailureReason::ConnectionClosed));
}

#[tokio::test]
async fn truncated_reply_is_connection_closed() {
    let mut partial = codec::encode_negotiation_response(1, 1);
    partial.truncate(10);
    let report = probe_peer(Peer::Raw(partial)).await;
    assert_eq!(reason(&report), Some(FailureReason::ConnectionClosed));
    let report = probe_peer(Peer::Raw(vec![0x03, 0x00])).await;
    assert_eq!(reason(&report), Some(FailureReason::ConnectionClosed));
}

#[tokio::test]
async fn partial_reply_then_silence_is_an_x224_timeout() {
    let report = probe_addr(
        spawn(Peer::RawThenHang(vec![0x03, 0x00, 0x00, 0x13])).await,
        300,
    )
    .await;
    assert_eq!(reason(&report), Some(FailureReason::X224Timeout));
}

#[tokio::test]
async fn closed_port_is_refused() {
    let port = closed_port();
    let report = probe_addr(SocketAddr::from(([127, 0, 0, 1], port)), 2_000).await;
    assert_eq!(reason(&report), Some(FailureReason::TcpRefused));
    assert!(report.layers.x224.is_none());
}

#[tokio::test]
async fn tls_alert_is_a_handshake_failure_naming_the_alert() {
    // 70 = protocol_version: what a TLS 1.0-only server answers a modern client.
    let report = probe_peer(Peer::SslThenRaw(tls_alert(70))).await;
    assert_eq!(reason(&report), Some(FailureReason::TlsHandshakeFailed));
    let detail = report.failure.unwrap().detail;
    assert!(detail.contains("protocol_version"), "{detail}");
    assert!(detail.contains("no common TLS version"), "{detail}");
    let report = probe_peer(Peer::SslThenRaw(tls_alert(80))).await;
    assert!(report.failure.unwrap().detail.contains("internal_error"));
}

#[tokio::test]
async fn close_during_tls_is_a_handshake_failure() {
    let report = probe_peer(Peer::SslThenRaw(Vec::new())).await;
    assert_eq!(reason(&report), Some(FailureReason::TlsHandshakeFailed));
    assert!(report.failure.unwrap().detail.contains("closed"));
}

#[tokio::test]
async fn silent_tls_is_a_tls_timeout() {
    let report = probe_addr(spawn(Peer::SslThenSilent).await, 300).await;
    assert_eq!(reason(&report), Some(FailureReason::TlsTimeout));
    assert!(report.layers.x224.unwrap().ok);
}

#[tokio::test]
async fn full_accept_queue_is_a_tcp_timeout() {
    // A listener that never accepts, with its queue filled: the kernel drops further SYNs,
    // which is what a dropping firewall looks like from the prober.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..4 {
        if let Ok(Ok(s)) = tokio::time::timeout(
            Duration::from_millis(200),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            fillers.push(s);
        }
    }
    let report = probe_addr(addr, 400).await;
    assert_eq!(
        reason(&report),
        Some(FailureReason::TcpTimeout),
        "{report:?}"
    );
    drop(listener);
}

struct FailingResolver;
impl Resolve for FailingResolver {
    fn resolve<'a>(&'a self, host: &'a str, _: u16) -> BoxFuture<'a, io::Result<Vec<SocketAddr>>> {
        Box::pin(async move { Err(io::Error::other(format!("no such host {host}"))) })
    }
}

struct HangingResolver;
impl Resolve for HangingResolver {
    fn resolve<'a>(&'a self, _: &'a str, _: u16) -> BoxFuture<'a, io::Result<Vec<SocketAddr>>> {
        Box::pin(std::future::pending())
    }
}

struct FixedResolver(SocketAddr);
impl Resolve for FixedResolver {
    fn resolve<'a>(&'a self, _: &'a str, port: u16) -> BoxFuture<'a, io::Result<Vec<SocketAddr>>> {
        let ip = self.0.ip();
        Box::pin(async move { Ok(vec![SocketAddr::new(ip, port)]) })
    }
}

#[tokio::test]
async fn dns_failure_and_dns_timeout() {
    let target = Target::new("vm1.rdp.test", 3389).unwrap();
    let prober = RdpProber::with_resolver(Arc::new(FailingResolver)).unwrap();
    let report = prober.probe_once(&target, &opts(1_000)).await;
    assert_eq!(reason(&report), Some(FailureReason::DnsFailure));
    assert!(!report.layers.dns.unwrap().ok);

    let prober = RdpProber::with_resolver(Arc::new(HangingResolver)).unwrap();
    let report = prober.probe_once(&target, &opts(200)).await;
    assert_eq!(reason(&report), Some(FailureReason::DnsFailure));
    assert!(report.failure.unwrap().detail.contains("timed out"));
}

#[tokio::test]
async fn host_names_are_resolved_then_probed() {
    let addr = spawn(Peer::Raw(codec::encode_negotiation_response(0, 0))).await;
    let prober = RdpProber::with_resolver(Arc::new(FixedResolver(addr))).unwrap();
    let target = Target::new("vm1.rdp.test", addr.port()).unwrap();
    let report = prober.probe_once(&target, &opts(1_000)).await;
    assert!(report.reachable);
    assert!(report.layers.dns.unwrap().ok);
}

#[tokio::test]
async fn layer_budget_is_capped_by_the_overall_deadline() {
    let addr = spawn(Peer::Silent).await;
    let target = Target::new(addr.ip().to_string(), addr.port()).unwrap();
    let options = ProbeOptions {
        timeout: Duration::from_millis(250),
        layer_timeout: Some(Duration::from_secs(30)),
        ..ProbeOptions::default()
    };
    let report = RdpProber::new()
        .unwrap()
        .probe_once(&target, &options)
        .await;
    assert_eq!(reason(&report), Some(FailureReason::X224Timeout));
    assert!(report.total_ms < 3_000.0);
}
