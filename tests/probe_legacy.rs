//! A server configured for standard RDP security only (`SecurityLayer=0`) refuses the probe's
//! SSL|HYBRID offer with `SSL_NOT_ALLOWED_BY_SERVER` although clients connect: the probe asks
//! once more offering standard RDP security and reports it reachable, with the
//! `legacy_rdp_security` finding. The servers here answer with MS-RDPBCGR's bytes
//! (2.2.1.2.1 RDP_NEG_RSP, 2.2.1.2.2 RDP_NEG_FAILURE) on loopback.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: failures should panic

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use rdphealth::probe::{
    FailureReason, Finding, ProbeOptions, RdpProber, SecurityProtocol, Target, codec,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

/// How the server answers a Connection Request offering TLS or CredSSP, and one offering
/// standard RDP security only (`None`: close without answering).
#[derive(Clone, Copy)]
struct Answers {
    to_tls: fn() -> Vec<u8>,
    to_rdp_only: Option<fn() -> Vec<u8>>,
}

fn not_allowed() -> Vec<u8> {
    codec::encode_negotiation_failure(2)
}

fn rdp_selected() -> Vec<u8> {
    codec::encode_negotiation_response(0, 0)
}

/// Serves `answers` on loopback; counts connections.
async fn server(answers: Answers) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let count = connections.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut header = [0u8; 4];
                if stream.read_exact(&mut header).await.is_err() {
                    return;
                }
                let len = usize::from(u16::from_be_bytes([header[2], header[3]]));
                let mut pdu = header.to_vec();
                pdu.resize(len.max(4), 0);
                if stream.read_exact(&mut pdu[4..]).await.is_err() {
                    return;
                }
                let offered = codec::parse_connection_request(&pdu)
                    .unwrap()
                    .requested_protocols
                    .unwrap_or(0);
                let reply = if offered & (codec::PROTOCOL_SSL | codec::PROTOCOL_HYBRID) != 0 {
                    Some((answers.to_tls)())
                } else {
                    answers.to_rdp_only.map(|f| f())
                };
                if let Some(reply) = reply {
                    let _ = stream.write_all(&reply).await;
                    // Standard RDP security goes on with MCS; the probe stops here.
                    let mut rest = [0u8; 64];
                    let _ = stream.read(&mut rest).await;
                }
            });
        }
    });
    (addr, connections)
}

async fn probe(addr: SocketAddr) -> rdphealth::probe::ProbeReport {
    let target: Target = addr.to_string().parse().unwrap();
    RdpProber::new()
        .unwrap()
        .probe_once(&target, &ProbeOptions::default())
        .await
}

#[tokio::test]
async fn a_server_allowing_only_standard_rdp_security_is_reachable_with_a_finding() {
    let (addr, connections) = server(Answers {
        to_tls: not_allowed,
        to_rdp_only: Some(rdp_selected),
    })
    .await;
    let report = probe(addr).await;
    assert!(report.reachable, "{report:?}");
    assert_eq!(report.selected_protocol, Some(SecurityProtocol::Rdp));
    assert!(
        report.findings.contains(&Finding::LegacyRdpSecurity),
        "{:?}",
        report.findings
    );
    assert!(report.tls.is_none());
    assert_eq!(connections.load(Ordering::SeqCst), 2, "one retry");
    let text = report.render_human();
    assert!(text.contains("finding: legacy_rdp_security"), "{text}");
}

#[tokio::test]
async fn a_server_refusing_standard_rdp_security_too_keeps_the_first_refusal() {
    for to_rdp_only in [Some(not_allowed as fn() -> Vec<u8>), None] {
        let (addr, connections) = server(Answers {
            to_tls: not_allowed,
            to_rdp_only,
        })
        .await;
        let report = probe(addr).await;
        assert!(!report.reachable, "{report:?}");
        let failure = report.failure.clone().unwrap();
        assert_eq!(failure.reason, FailureReason::NegotiationFailure);
        assert_eq!(failure.code, Some(2), "{failure:?}");
        assert!(!report.findings.contains(&Finding::LegacyRdpSecurity));
        assert_eq!(connections.load(Ordering::SeqCst), 2, "exactly one retry");
    }
}

#[tokio::test]
async fn other_refusals_are_not_retried() {
    let (addr, connections) = server(Answers {
        to_tls: || codec::encode_negotiation_failure(5),
        to_rdp_only: Some(rdp_selected),
    })
    .await;
    let report = probe(addr).await;
    assert!(!report.reachable, "{report:?}");
    assert_eq!(report.failure.unwrap().code, Some(5));
    assert_eq!(connections.load(Ordering::SeqCst), 1);
}
