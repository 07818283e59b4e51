//! Loopback test peers shared by the integration tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod k8s;
pub mod operator;
pub mod real_api;
pub mod shadow;
pub mod xrdp;

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use rcgen::{CertificateParams, DnType, KeyPair};
use rdphealth::probe::codec;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

/// A loopback TCP port for a peer process the test starts (etcd, kube-apiserver, xrdp, the
/// operator's HTTP server), checked free when it is handed out.
///
/// It is taken from below the kernel's ephemeral range (`ip_local_port_range`), never from it:
/// a port the kernel handed out for `bind(0)` and that was released again can be picked by the
/// kernel for any outgoing connection (another test's client, a peer's own) before the peer
/// binds it, and the peer then fails with "address already in use". Below that range only an
/// explicit bind takes a port. Each call in this process gets a different port; the start
/// depends on the process ID so that processes side by side start apart.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOWEST: u32 = 10_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    let span = ephemeral_low.saturating_sub(LOWEST).max(1_000);
    let start = std::process::id().wrapping_mul(7_919) % span;
    for _ in 0..span {
        let offset = (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        let port =
            u16::try_from(LOWEST + offset).expect("ports below the ephemeral range fit in u16");
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port between {LOWEST} and {ephemeral_low}");
}

/// How a fake peer answers the X.224 Connection Request.
#[derive(Clone)]
pub enum Peer {
    /// Accept, read the request, never answer.
    Silent,
    /// Accept and close without reading or writing.
    CloseImmediately,
    /// Send raw bytes after the request, then close.
    Raw(Vec<u8>),
    /// Send raw bytes after the request, then keep the socket open and silent.
    RawThenHang(Vec<u8>),
    /// Select `protocol` and then run a TLS server with `tls`.
    Tls {
        protocol: u32,
        tls: Arc<rustls::ServerConfig>,
    },
    /// Select SSL, then answer the ClientHello with raw bytes (e.g. an alert).
    SslThenRaw(Vec<u8>),
    /// Select SSL, then never answer the ClientHello.
    SslThenSilent,
}

/// Starts a fake peer on 127.0.0.1:0 that serves every connection the same way.
pub async fn spawn(peer: Peer) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let peer = peer.clone();
            tokio::spawn(serve(stream, peer));
        }
    });
    addr
}

async fn read_request(stream: &mut TcpStream) -> Vec<u8> {
    let mut buf = vec![0u8; 64];
    let mut got = 0;
    // The probe sends 43 bytes; read until a complete TPKT is in.
    while got < 4 || got < usize::from(u16::from_be_bytes([buf[2], buf[3]])).min(64) {
        match stream.read(&mut buf[got..]).await {
            Ok(0) | Err(_) => break,
            Ok(n) => got += n,
        }
    }
    buf.truncate(got);
    buf
}

async fn serve(mut stream: TcpStream, peer: Peer) {
    if matches!(peer, Peer::CloseImmediately) {
        return;
    }
    let request = read_request(&mut stream).await;
    assert!(
        codec::parse_connection_request(&request).is_ok(),
        "probe sent a bad request"
    );
    match peer {
        Peer::Silent => hang(stream).await,
        Peer::CloseImmediately => {}
        Peer::Raw(bytes) => {
            let _ = stream.write_all(&bytes).await;
        }
        Peer::RawThenHang(bytes) => {
            let _ = stream.write_all(&bytes).await;
            hang(stream).await;
        }
        Peer::Tls { protocol, tls } => {
            let _ = stream
                .write_all(&codec::encode_negotiation_response(protocol, 0x01))
                .await;
            let acceptor = tokio_rustls::TlsAcceptor::from(tls);
            if let Ok(mut tls) = acceptor.accept(stream).await {
                let mut sink = [0u8; 256];
                let _ = tokio::time::timeout(Duration::from_secs(2), tls.read(&mut sink)).await;
            }
        }
        Peer::SslThenRaw(bytes) => {
            let _ = stream
                .write_all(&codec::encode_negotiation_response(1, 1))
                .await;
            let mut hello = [0u8; 512];
            let _ = stream.read(&mut hello).await;
            let _ = stream.write_all(&bytes).await;
        }
        Peer::SslThenSilent => {
            let _ = stream
                .write_all(&codec::encode_negotiation_response(1, 1))
                .await;
            hang(stream).await;
        }
    }
}

async fn hang(mut stream: TcpStream) {
    let mut sink = [0u8; 512];
    while let Ok(n) = stream.read(&mut sink).await {
        if n == 0 {
            break;
        }
    }
}

/// A TLS server configuration with a self-signed certificate valid over the given window
/// relative to now.
pub fn tls_server(
    valid_from: time::Duration,
    valid_until: time::Duration,
) -> Arc<rustls::ServerConfig> {
    let now = time::OffsetDateTime::from(SystemTime::now());
    let mut params = CertificateParams::new(vec!["localhost".into()]).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "rdp.test");
    params.not_before = now + valid_from;
    params.not_after = now + valid_until;
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(cert.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .unwrap();
    Arc::new(config)
}

/// A TLS alert record: fatal, with the given description code.
pub fn tls_alert(description: u8) -> Vec<u8> {
    vec![0x15, 0x03, 0x03, 0x00, 0x02, 0x02, description]
}

/// A loopback port that nothing listens on (free when handed out; see [`free_port`]).
pub fn closed_port() -> u16 {
    free_port()
}

/// A plain HTTP/1.1 GET (the operator's /metrics, /healthz, /readyz): status code and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let once = async {
        let mut stream = TcpStream::connect(addr).await?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        let code = response
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((code, body))
    };
    tokio::time::timeout(Duration::from_secs(2), once)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

/// The `promtool` to use (`PROMTOOL`, else `promtool` on `PATH`), if it runs. When it does
/// not, a test needing it fails under `RDPHEALTH_REQUIRE_PROMTOOL=1` and is skipped with a
/// note otherwise.
pub fn promtool() -> Option<String> {
    let promtool = std::env::var("PROMTOOL").unwrap_or_else(|_| "promtool".into());
    let available = std::process::Command::new(&promtool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if available {
        return Some(promtool);
    }
    assert!(
        std::env::var("RDPHEALTH_REQUIRE_PROMTOOL").as_deref() != Ok("1"),
        "promtool is required (RDPHEALTH_REQUIRE_PROMTOOL=1) but `{promtool}` is not installed"
    );
    eprintln!(
        "note: promtool not found; skipping the metrics lint (set RDPHEALTH_REQUIRE_PROMTOOL=1 to require it)"
    );
    None
}

/// `promtool check metrics` on an exposition `text`; panics with promtool's complaint.
pub fn promtool_check(promtool: &str, text: &str) {
    use std::{io::Write, process::Command};
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n--- metrics ---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
