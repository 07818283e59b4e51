//! Live RDP responders: one loopback listener per simulated VM whose behaviour follows the
//! VM's state. Enough of RDP for the prober: X.224 negotiation, a real TLS handshake, and the
//! first CredSSP round: an NTLM NEGOTIATE is answered with a CHALLENGE naming the computer.

use std::{sync::Arc, time::Duration};

use rustls::{
    ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
};
use tokio_rustls::TlsAcceptor;

use super::{Shared, SimError, fault::Behaviour};
use crate::probe::{codec, credssp, ntlm};

/// The two certificates a responder serves, both issued to the computer that answers (as
/// Windows issues its self-signed RDP certificate to the computer's name). Signed on the first
/// TLS handshake, so an estate of thousands of VMs starts without thousands of signatures.
#[derive(Clone)]
pub struct Certificates {
    key: Arc<rcgen::KeyPair>,
    computer_name: String,
    made: Arc<std::sync::OnceLock<Option<(TlsAcceptor, TlsAcceptor)>>>,
}

impl std::fmt::Debug for Certificates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Certificates")
    }
}

impl Certificates {
    /// The valid or the expired certificate's acceptor (`None` if signing failed).
    fn acceptor(&self, expired: bool) -> Option<TlsAcceptor> {
        let pair = self.made.get_or_init(|| {
            let now = time::OffsetDateTime::now_utc();
            let day = time::Duration::days;
            let name = &self.computer_name;
            let made = acceptor(&self.key, name, now - day(1), now + day(180))
                .and_then(|v| Ok((v, acceptor(&self.key, name, now - day(400), now - day(35))?)));
            made.inspect_err(
                |e| tracing::warn!(error = %e, "failed to sign a responder certificate"),
            )
            .ok()
        });
        pair.as_ref()
            .map(|(valid, old)| if expired { old.clone() } else { valid.clone() })
    }
}

/// The key every simulated certificate uses (one key generation per simulator, one signature
/// per certificate).
pub struct CertificateKey(Arc<rcgen::KeyPair>);

impl std::fmt::Debug for CertificateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CertificateKey")
    }
}

impl CertificateKey {
    /// Generates the key, and signs one certificate with it so a broken TLS setup fails here.
    pub fn generate() -> Result<Self, SimError> {
        let key = rcgen::KeyPair::generate().map_err(|e| SimError::Tls(e.to_string()))?;
        let now = time::OffsetDateTime::now_utc();
        acceptor(&key, "check", now, now + time::Duration::days(1))?;
        Ok(Self(Arc::new(key)))
    }

    /// A valid and an expired self-signed certificate issued to `computer_name` (signed when
    /// first used).
    pub fn certificates(&self, computer_name: &str) -> Result<Certificates, SimError> {
        Ok(Certificates {
            key: self.0.clone(),
            computer_name: computer_name.to_owned(),
            made: Arc::new(std::sync::OnceLock::new()),
        })
    }
}

fn acceptor(
    key: &rcgen::KeyPair,
    computer_name: &str,
    not_before: time::OffsetDateTime,
    not_after: time::OffsetDateTime,
) -> Result<TlsAcceptor, SimError> {
    let tls = |e: String| SimError::Tls(e);
    let mut params = rcgen::CertificateParams::new(vec![computer_name.to_owned()])
        .map_err(|e| tls(e.to_string()))?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, computer_name);
    params.not_before = not_before;
    params.not_after = not_after;
    let cert = params.self_signed(key).map_err(|e| tls(e.to_string()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(cert.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .map_err(|e| tls(e.to_string()))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Runs the responder of `vm` until `shutdown` flips; `listener` is its initial socket.
pub async fn run(
    shared: Arc<Shared>,
    vm: String,
    listener: TcpListener,
    certs: Certificates,
    mut shutdown: watch::Receiver<bool>,
) {
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    let mut listener = Some(listener);
    let mut changes = shared.changes();
    loop {
        if *shutdown.borrow() {
            return;
        }
        let version = *changes.borrow_and_update();
        let behaviour = shared.lock().behaviour(&vm);
        if behaviour == Behaviour::Refuse {
            listener = None;
        } else if listener.is_none() {
            match TcpListener::bind(std::net::SocketAddr::from(([127, 0, 0, 1], port))).await {
                Ok(l) => listener = Some(l),
                Err(e) => {
                    tracing::warn!(vm, port, error = %e, "failed to re-open the responder port; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                        _ = shutdown.changed() => return,
                    }
                }
            }
        }
        shared.ack(&vm, version);
        tokio::select! {
            _ = shutdown.changed() => return,
            changed = changes.changed() => if changed.is_err() { return },
            accepted = accept(listener.as_ref()) => {
                if let Ok((stream, _)) = accepted {
                    let (behaviour, boot, nth, computer_name) = {
                        let mut w = shared.lock();
                        let behaviour = w.behaviour(&vm);
                        let computer_name = w.computer_name(&vm).unwrap_or_default();
                        match w.vms.get_mut(&vm) {
                            Some(v) => {
                                v.connections += 1;
                                (behaviour, v.boot, v.connections, computer_name)
                            }
                            None => (Behaviour::Refuse, 0, 0, computer_name),
                        }
                    };
                    let conn = Connection { shared: shared.clone(), vm: vm.clone(), boot, certs: certs.clone(), shutdown: shutdown.clone() };
                    tokio::spawn(conn.serve(stream, behaviour, nth, computer_name));
                }
            }
        }
    }
}

async fn accept(
    listener: Option<&TcpListener>,
) -> std::io::Result<(TcpStream, std::net::SocketAddr)> {
    match listener {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

struct Connection {
    shared: Arc<Shared>,
    vm: String,
    boot: u64,
    certs: Certificates,
    shutdown: watch::Receiver<bool>,
}

impl Connection {
    async fn serve(self, stream: TcpStream, behaviour: Behaviour, nth: u64, computer_name: String) {
        let dropped = dropped(
            self.shared.clone(),
            self.vm.clone(),
            self.boot,
            self.shutdown.clone(),
        );
        let work = talk(stream, behaviour, nth, self.certs.clone(), &computer_name);
        tokio::select! {
            _ = work => {}
            _ = dropped => {}
        }
    }
}

/// Completes when the connection must go: the VM rebooted or stopped listening, or shutdown.
async fn dropped(shared: Arc<Shared>, vm: String, boot: u64, mut shutdown: watch::Receiver<bool>) {
    let mut changes = shared.changes();
    loop {
        let gone = {
            let w = shared.lock();
            w.vms.get(&vm).is_none_or(|v| v.boot != boot) || w.behaviour(&vm) == Behaviour::Refuse
        };
        if gone || *shutdown.borrow() {
            return;
        }
        tokio::select! {
            r = changes.changed() => if r.is_err() { return },
            _ = shutdown.changed() => return,
        }
    }
}

async fn talk(
    mut stream: TcpStream,
    behaviour: Behaviour,
    nth: u64,
    certs: Certificates,
    computer_name: &str,
) {
    let _ = stream.set_nodelay(true);
    match behaviour {
        Behaviour::Refuse => {}
        Behaviour::Silent => drain(&mut stream).await,
        Behaviour::Flapping if nth % 2 == 1 => {
            // Read the request, then hang up without a word: "connection closed".
            let _ = read_request(&mut stream).await;
        }
        Behaviour::TlsAlert => {
            let Some(selected) = negotiate(&mut stream).await else {
                return;
            };
            if selected == 0 {
                return;
            }
            let mut hello = [0u8; 512];
            let _ = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut hello)).await;
            // Fatal alert, protocol_version (70): Schannel with its TLS versions disabled.
            let _ = stream
                .write_all(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x46])
                .await;
            let _ = stream.shutdown().await;
        }
        Behaviour::LegacyRdpOnly => {
            // Standard RDP security only: TLS and CredSSP offers are refused; a request for
            // PROTOCOL_RDP gets its response, then the server waits for the MCS Connect.
            let Some(pdu) = read_request(&mut stream).await else {
                return;
            };
            let Ok(request) = codec::parse_connection_request(&pdu) else {
                return;
            };
            let reply = match request.requested_protocols {
                Some(p) if p & (codec::PROTOCOL_SSL | codec::PROTOCOL_HYBRID) != 0 => {
                    codec::encode_negotiation_failure(SSL_NOT_ALLOWED_BY_SERVER)
                }
                Some(_) => codec::encode_negotiation_response(PROTOCOL_RDP, 0),
                None => codec::encode_legacy_confirm(),
            };
            if stream.write_all(&reply).await.is_ok() {
                drain(&mut stream).await;
            }
        }
        Behaviour::Flapping | Behaviour::Healthy { .. } => {
            let expired = matches!(
                behaviour,
                Behaviour::Healthy {
                    expired_certificate: true
                }
            );
            let Some(selected) = negotiate(&mut stream).await else {
                return;
            };
            if selected == 0 {
                drain(&mut stream).await;
                return;
            }
            let Some(acceptor) = certs.acceptor(expired) else {
                return;
            };
            if let Ok(Ok(mut tls)) =
                tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await
            {
                if selected == codec::PROTOCOL_HYBRID {
                    answer_credssp(&mut tls, computer_name).await;
                }
                let mut buf = [0u8; 1024];
                while let Ok(n) = tls.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
            }
        }
    }
}

/// Reads until the peer closes.
async fn drain(stream: &mut TcpStream) {
    let mut buf = [0u8; 1024];
    while let Ok(n) = stream.read(&mut buf).await {
        if n == 0 {
            break;
        }
    }
}

/// Reads one TPKT; `None` when it is not one.
async fn read_request(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let read = async {
        let mut header = [0u8; codec::TPKT_HEADER_LEN];
        stream.read_exact(&mut header).await.ok()?;
        let len = codec::tpkt_length(&header).ok()?;
        let mut pdu = vec![0u8; len];
        pdu[..codec::TPKT_HEADER_LEN].copy_from_slice(&header);
        stream
            .read_exact(&mut pdu[codec::TPKT_HEADER_LEN..])
            .await
            .ok()?;
        Some(pdu)
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .ok()
        .flatten()
}

/// RDP_NEG_FAILURE code: the server requires CredSSP.
pub(crate) const HYBRID_REQUIRED_BY_SERVER: u32 = 5;
/// RDP_NEG_FAILURE code: the server allows standard RDP security only.
const SSL_NOT_ALLOWED_BY_SERVER: u32 = 2;
/// selectedProtocol: standard RDP security.
const PROTOCOL_RDP: u32 = 0;

/// Reads the client's first TSRequest; when it carries an NTLM NEGOTIATE, answers with a
/// TSRequest carrying a CHALLENGE that names `computer_name` and gives the current time.
/// Anything else (or nothing within 10 s) is left unanswered, as the real server would.
pub(crate) async fn answer_credssp<S>(tls: &mut S, computer_name: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let read = async {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        loop {
            if let Some(total) = credssp::frame_len(&buf).ok()?
                && buf.len() >= total
            {
                return credssp::decode(&buf[..total]).ok();
            }
            match tls.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    let Ok(Some(request)) = tokio::time::timeout(Duration::from_secs(10), read).await else {
        return;
    };
    let is_negotiate = request.nego_token.as_deref().is_some_and(|t| {
        t.len() >= 12
            && t.starts_with(ntlm::SIGNATURE)
            && t[8..12] == ntlm::NEGOTIATE_MESSAGE.to_le_bytes()
    });
    if !is_negotiate {
        return;
    }
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    let netbios = computer_name.to_ascii_uppercase();
    let challenge = ntlm::encode_challenge(&ntlm::ChallengeSpec {
        nb_computer_name: &netbios,
        nb_domain_name: &netbios,
        dns_computer_name: computer_name,
        dns_domain_name: computer_name,
        timestamp: ntlm::unix_ms_to_filetime(now_ms),
        version: ntlm::NtlmVersion {
            major: 10,
            minor: 0,
            build: 20348,
            ntlm_revision: 15,
        },
        server_challenge: rand_challenge(),
    });
    let reply = credssp::encode_nego_request(credssp::PROBE_VERSION, &challenge);
    let _ = tls.write_all(&reply).await;
    let _ = tls.flush().await;
}

fn rand_challenge() -> [u8; 8] {
    let mut nonce = [0u8; 8];
    let _ = getrandom::fill(&mut nonce);
    nonce
}

/// Answers the Connection Request; returns the selected protocol (0 = standard RDP security).
async fn negotiate(stream: &mut TcpStream) -> Option<u32> {
    let pdu = read_request(stream).await?;
    let request = codec::parse_connection_request(&pdu).ok()?;
    let (reply, selected) = match request.requested_protocols {
        Some(p) if p & codec::PROTOCOL_HYBRID != 0 => (
            codec::encode_negotiation_response(codec::PROTOCOL_HYBRID, 0x1f),
            codec::PROTOCOL_HYBRID,
        ),
        // NLA is required (Azure's Windows images): TLS alone is refused.
        Some(p) if p & codec::PROTOCOL_SSL != 0 => (
            codec::encode_negotiation_failure(HYBRID_REQUIRED_BY_SERVER),
            0,
        ),
        _ => (codec::encode_legacy_confirm(), 0),
    };
    stream.write_all(&reply).await.ok()?;
    Some(selected)
}
