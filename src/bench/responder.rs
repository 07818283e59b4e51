//! Loopback TLS responders for the blackbox comparison. Each port serves both clients: one
//! that opens with a TLS ClientHello (blackbox_exporter's tcp prober with `tls: true`) gets a
//! TLS handshake at once; one that opens with an X.224 Connection Request (our prober) gets
//! the negotiation response selecting TLS, then the same handshake with the same certificate.
//!
//! With `hybrid` they answer as Azure's Windows images do: a request offering CredSSP gets
//! HYBRID selected, and after the handshake the first CredSSP round (an NTLM NEGOTIATE is
//! answered with a CHALLENGE naming the computer); a request offering TLS alone is refused
//! (`HYBRID_REQUIRED_BY_SERVER`). That is what the prober's identity step costs against.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use rustls::{
    ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tokio_rustls::TlsAcceptor;

use crate::probe::codec;

/// A self-signed certificate valid for 180 days, TLS 1.3 and 1.2.
pub fn acceptor() -> Result<TlsAcceptor, String> {
    let now = time::OffsetDateTime::now_utc();
    let mut params = rcgen::CertificateParams::new(vec!["bench.invalid".to_owned()])
        .map_err(|e| e.to_string())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "bench");
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(180);
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
    let config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(cert.der().to_vec())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .map_err(|e| e.to_string())?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Binds `count` responders on 127.0.0.1 and serves them until the process ends.
pub async fn start(count: usize, hybrid: bool) -> Result<Vec<SocketAddr>, String> {
    let tls = acceptor()?;
    let mut addrs = Vec::with_capacity(count);
    for _ in 0..count {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| e.to_string())?;
        addrs.push(listener.local_addr().map_err(|e| e.to_string())?);
        let tls = tls.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(answer(stream, tls.clone(), hybrid));
            }
        });
    }
    Ok(addrs)
}

async fn answer(mut stream: TcpStream, tls: TlsAcceptor, hybrid: bool) {
    let _ = stream.set_nodelay(true);
    let mut first = [0u8; 1];
    let peeked = tokio::time::timeout(Duration::from_secs(10), stream.peek(&mut first)).await;
    if !matches!(peeked, Ok(Ok(1))) {
        return;
    }
    // 0x03: a TPKT header (X.224 Connection Request); anything else goes straight to TLS.
    if first[0] == 0x03 {
        let mut header = [0u8; 4];
        if stream.read_exact(&mut header).await.is_err() {
            return;
        }
        let len = usize::from(u16::from_be_bytes([header[2], header[3]]));
        let mut rest = vec![0u8; len.saturating_sub(4)];
        if stream.read_exact(&mut rest).await.is_err() {
            return;
        }
        let mut pdu = header.to_vec();
        pdu.extend_from_slice(&rest);
        let offers_hybrid = codec::parse_connection_request(&pdu)
            .ok()
            .and_then(|r| r.requested_protocols)
            .is_some_and(|p| p & codec::PROTOCOL_HYBRID != 0);
        let reply = match (hybrid, offers_hybrid) {
            (false, _) => codec::encode_negotiation_response(codec::PROTOCOL_SSL, 0),
            (true, true) => codec::encode_negotiation_response(codec::PROTOCOL_HYBRID, 0x1f),
            (true, false) => {
                let failure = crate::sim::responder::HYBRID_REQUIRED_BY_SERVER;
                let _ = stream
                    .write_all(&codec::encode_negotiation_failure(failure))
                    .await;
                return;
            }
        };
        if stream.write_all(&reply).await.is_err() {
            return;
        }
    }
    if let Ok(Ok(mut tls)) = tokio::time::timeout(Duration::from_secs(10), tls.accept(stream)).await
    {
        if hybrid {
            crate::sim::responder::answer_credssp(&mut tls, "BENCH-VM").await;
        }
        let mut buf = [0u8; 1024];
        while let Ok(n) = tls.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::{ProbeOptions, RdpProber, Target, identity::Credssp};

    async fn probe(addr: SocketAddr, identity: bool) -> crate::probe::ProbeReport {
        let target: Target = addr.to_string().parse().unwrap();
        let opts = ProbeOptions {
            identity,
            ..ProbeOptions::default()
        };
        RdpProber::new().unwrap().probe_once(&target, &opts).await
    }

    #[tokio::test]
    async fn hybrid_responders_answer_the_identity_step_and_enforce_nla() {
        let addr = start(1, true).await.unwrap()[0];
        let report = probe(addr, true).await;
        assert!(report.reachable, "{report:?}");
        let nla = report.nla.expect("the identity step ran");
        assert_eq!(nla.credssp, Credssp::Required);
        let id = nla.identity.expect("the CHALLENGE was read");
        assert_eq!(id.computer_name.as_deref(), Some("BENCH-VM"));
    }

    #[tokio::test]
    async fn plain_responders_select_tls_without_credssp() {
        let addr = start(1, false).await.unwrap()[0];
        let report = probe(addr, true).await;
        assert!(report.reachable, "{report:?}");
        assert!(
            report.nla.as_ref().is_none_or(|n| n.identity.is_none()),
            "{report:?}"
        );
    }
}
