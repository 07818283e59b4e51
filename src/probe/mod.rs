//! The layered, credential-less RDP prober.
//!
//! TCP connect → X.224 Connection Request (cookie `mstshash=probe`, RDP_NEG_REQ SSL|HYBRID)
//! → Connection Confirm → TLS handshake on the same socket when TLS was selected →
//! certificate facts → (when asked and CredSSP was selected) the identity step: an NTLM
//! NEGOTIATE inside a CredSSP TSRequest, whose CHALLENGE names the computer → close.
//! No credentials are ever sent. Every layer has its own timeout, all inside one overall
//! deadline.

pub mod cert;
pub mod codec;
pub mod credssp;
pub mod failure;
pub mod identity;
mod nla;
pub mod ntlm;
pub mod report;
pub mod target;
pub mod tls;

use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    time::{Duration, SystemTime},
};

use rustls::pki_types::ServerName;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::{Instant, timeout_at},
};
use tokio_rustls::TlsConnector;

pub use self::{
    cert::{CertificateCache, CertificateFacts},
    codec::{ConnectionConfirm, SecurityProtocol},
    failure::{Failure, FailureReason, Layer},
    identity::{Credssp, NlaFacts, ServerIdentity},
    report::{Finding, LayerResult, Layers, ProbeReport, TlsFacts},
    target::{DEFAULT_RDP_PORT, Target, TargetError},
};

/// A boxed future, so probers and resolvers can be trait objects.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Kerberos' default tolerance: beyond it NLA logons fail.
pub const DEFAULT_MAX_CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);

/// Probe settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeOptions {
    /// Overall deadline for the whole probe.
    pub timeout: Duration,
    /// Budget of each layer (DNS, TCP, X.224, TLS), capped by what is left of `timeout`.
    /// `None` gives every layer the whole remaining time.
    pub layer_timeout: Option<Duration>,
    /// A certificate expiring within this period is reported as a finding.
    pub cert_warning: Duration,
    /// Run the identity step (NTLM NEGOTIATE / CHALLENGE, NLA enforcement) when the server
    /// selects CredSSP.
    pub identity: bool,
    /// The computer the endpoint must answer as; another name is a `wrong_host` failure.
    pub expect_name: Option<String>,
    /// A server clock further off than this is a `clock_skew` finding.
    pub max_clock_skew: Duration,
}

impl Default for ProbeOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(5),
            layer_timeout: None,
            cert_warning: Duration::from_secs(14 * 86_400),
            identity: false,
            expect_name: None,
            max_clock_skew: DEFAULT_MAX_CLOCK_SKEW,
        }
    }
}

/// Something that probes RDP endpoints; the engine depends on this, tests swap it.
pub trait Prober: Send + Sync {
    /// Probes `target` once.
    fn probe<'a>(
        &'a self,
        target: &'a Target,
        opts: &'a ProbeOptions,
    ) -> BoxFuture<'a, ProbeReport>;
}

/// Resolves host names; swapped in tests so no outside name is ever looked up.
pub trait Resolve: Send + Sync {
    /// Resolves `host` to socket addresses with `port`.
    fn resolve<'a>(
        &'a self,
        host: &'a str,
        port: u16,
    ) -> BoxFuture<'a, io::Result<Vec<SocketAddr>>>;
}

/// The system resolver (getaddrinfo through tokio).
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve<'a>(
        &'a self,
        host: &'a str,
        port: u16,
    ) -> BoxFuture<'a, io::Result<Vec<SocketAddr>>> {
        Box::pin(async move { Ok(tokio::net::lookup_host((host, port)).await?.collect()) })
    }
}

/// The real prober: sockets, X.224 and rustls.
#[derive(Clone)]
pub struct RdpProber {
    resolver: Arc<dyn Resolve>,
    /// Built once: the TLS configuration is shared by every probe.
    tls: TlsConnector,
    /// The X.224 Connection Request every probe sends.
    request: Vec<u8>,
    /// Certificates already parsed, by the hash of their bytes.
    certificates: Arc<CertificateCache>,
}

impl std::fmt::Debug for RdpProber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdpProber").finish_non_exhaustive()
    }
}

impl RdpProber {
    /// A prober using the system resolver.
    pub fn new() -> Result<Self, rustls::Error> {
        Self::with_resolver(Arc::new(SystemResolver))
    }

    /// A prober with a custom resolver.
    pub fn with_resolver(resolver: Arc<dyn Resolve>) -> Result<Self, rustls::Error> {
        Ok(Self {
            resolver,
            tls: TlsConnector::from(tls::inspect_only_client_config()?),
            request: codec::probe_connection_request(),
            certificates: Arc::new(CertificateCache::default()),
        })
    }

    /// The prober's certificate cache (what it parsed, and how often).
    pub fn certificates(&self) -> &CertificateCache {
        &self.certificates
    }

    /// Probes `target` once and classifies the outcome.
    pub async fn probe_once(&self, target: &Target, opts: &ProbeOptions) -> ProbeReport {
        let mut run = Run::new(target, opts);
        let outcome = run.walk(self).await;
        run.finish(outcome)
    }
}

impl Prober for RdpProber {
    fn probe<'a>(
        &'a self,
        target: &'a Target,
        opts: &'a ProbeOptions,
    ) -> BoxFuture<'a, ProbeReport> {
        Box::pin(self.probe_once(target, opts))
    }
}

/// The state of one probe as it walks the layers.
struct Run<'a> {
    target: &'a Target,
    opts: &'a ProbeOptions,
    started: Instant,
    /// When the probe's answer was complete (before the polite close), if it got that far.
    answered: Option<Instant>,
    deadline: Instant,
    layers: Layers,
    selected: Option<SecurityProtocol>,
    tls: Option<TlsFacts>,
    nla: Option<NlaFacts>,
    findings: Vec<Finding>,
}

impl<'a> Run<'a> {
    fn new(target: &'a Target, opts: &'a ProbeOptions) -> Self {
        let started = Instant::now();
        Self {
            target,
            opts,
            started,
            answered: None,
            deadline: started + opts.timeout,
            layers: Layers::default(),
            selected: None,
            tls: None,
            nla: None,
            findings: Vec::new(),
        }
    }

    /// The deadline for a layer starting now: its own budget, capped by the overall one.
    fn layer_deadline(&self) -> Instant {
        match self.opts.layer_timeout {
            Some(budget) => (Instant::now() + budget).min(self.deadline),
            None => self.deadline,
        }
    }

    fn record(&mut self, layer: Layer, since: Instant, ok: bool) {
        let ms = since.elapsed().as_secs_f64() * 1000.0;
        self.layers.set(
            layer,
            LayerResult {
                ok,
                ms: (ms * 1000.0).round() / 1000.0,
            },
        );
    }

    /// Runs a layer: times it, records it, and turns its error into the layer's failure.
    async fn layer<T, F>(&mut self, layer: Layer, step: F) -> Result<T, Failure>
    where
        F: Future<Output = Result<T, Failure>>,
    {
        let since = Instant::now();
        let result = step.await;
        self.record(layer, since, result.is_ok());
        result
    }

    async fn walk(&mut self, prober: &RdpProber) -> Result<(), Failure> {
        let addrs = match self.target.ip() {
            Some(ip) => vec![SocketAddr::new(ip, self.target.port)],
            None => {
                let deadline = self.layer_deadline();
                let fut = resolve(prober.resolver.as_ref(), self.target, deadline);
                self.layer(Layer::Dns, fut).await?
            }
        };
        let deadline = self.layer_deadline();
        let (mut stream, peer) = self.layer(Layer::Tcp, connect(&addrs, deadline)).await?;
        let deadline = self.layer_deadline();
        let selected = self
            .layer(Layer::X224, async {
                interpret_confirm(negotiate(&mut stream, &prober.request, deadline).await?)
            })
            .await;
        let selected = match selected {
            // The server allows only standard RDP security (SecurityLayer=0): clients that
            // offer it connect, so ask once more offering it on a new connection.
            Err(f) if f.code == Some(SSL_NOT_ALLOWED_BY_SERVER) => {
                let legacy = self.legacy_rdp_security(&addrs, f).await?;
                self.findings.push(Finding::LegacyRdpSecurity);
                legacy
            }
            other => other?,
        };
        self.selected = Some(selected);
        if !selected.starts_tls() {
            self.findings.push(Finding::NoTls);
            if self.opts.identity {
                self.nla = Some(not_offered());
            }
            return Ok(());
        }
        let deadline = self.layer_deadline();
        let server_name = server_name(self.target);
        let (tls, facts) = self
            .layer(Layer::Tls, handshake(prober, stream, server_name, deadline))
            .await?;
        self.tls = Some(facts);
        let credssp = matches!(
            selected,
            SecurityProtocol::Hybrid | SecurityProtocol::HybridEx
        );
        match (self.opts.identity, credssp) {
            (true, true) => self.identify(tls, peer).await,
            (true, false) => {
                self.nla = Some(not_offered());
                self.answered = Some(Instant::now());
                close(tls, deadline).await;
                Ok(())
            }
            _ => {
                self.answered = Some(Instant::now());
                close(tls, deadline).await;
                Ok(())
            }
        }
    }

    /// Offers standard RDP security alone on a new connection after the server refused TLS
    /// and CredSSP (`SSL_NOT_ALLOWED_BY_SERVER`). The server accepting it is reachable (with
    /// the `legacy_rdp_security` finding); anything else keeps the first refusal.
    async fn legacy_rdp_security(
        &mut self,
        addrs: &[SocketAddr],
        refused: Failure,
    ) -> Result<SecurityProtocol, Failure> {
        let deadline = self.layer_deadline();
        let request = codec::encode_connection_request(Some(codec::PROBE_COOKIE), 0);
        let retry = async {
            let (mut stream, _) = connect(addrs, deadline).await?;
            interpret_confirm(negotiate(&mut stream, &request, deadline).await?)
        };
        match self.layer(Layer::X224, retry).await {
            Ok(SecurityProtocol::Rdp) => Ok(SecurityProtocol::Rdp),
            _ => Err(refused),
        }
    }

    /// The identity step: the CHALLENGE on the TLS session, then the NLA enforcement check.
    async fn identify(&mut self, mut tls: TlsStream, peer: SocketAddr) -> Result<(), Failure> {
        let since = Instant::now();
        let deadline = self.layer_deadline();
        let exchange = nla::read_challenge(&mut tls, deadline).await;
        let received_ms = unix_ms(SystemTime::now());
        close(tls, deadline).await;
        let credssp = nla::enforcement(peer, deadline).await;
        self.record(Layer::Nla, since, exchange.is_ok());
        let facts = match exchange {
            Ok(ex) => NlaFacts {
                credssp,
                credssp_version: Some(ex.credssp_version),
                identity: Some(ServerIdentity::from_challenge(&ex.challenge, received_ms)),
                error: None,
            },
            Err(error) => NlaFacts {
                credssp,
                credssp_version: None,
                identity: None,
                error: Some(error),
            },
        };
        let wrong = match (&self.opts.expect_name, &facts.identity) {
            (Some(expected), Some(id)) if id.answers_as(expected) == Some(false) => {
                Some(Failure::new(
                    FailureReason::WrongHost,
                    format!(
                        "the endpoint answered as {}, expected {expected}",
                        id.name().unwrap_or("another computer")
                    ),
                ))
            }
            _ => None,
        };
        self.nla = Some(facts);
        match wrong {
            Some(failure) => {
                if let Some(layer) = self.layers.nla.as_mut() {
                    layer.ok = false;
                }
                Err(failure)
            }
            None => Ok(()),
        }
    }

    /// Findings from the identity step: NLA off, clock skew, certificate naming another machine.
    fn identity_findings(&mut self) {
        let Some(nla) = &self.nla else {
            return;
        };
        if nla.credssp.nla_disabled() {
            self.findings.push(Finding::NlaDisabled);
        }
        let Some(id) = &nla.identity else {
            return;
        };
        if let Some(seconds) = id.clock_skew_seconds
            && seconds.unsigned_abs() > self.opts.max_clock_skew.as_secs()
        {
            self.findings.push(Finding::ClockSkew { seconds });
        }
        let cert = self.tls.as_ref().and_then(|t| t.certificate.as_ref());
        if let (Some(cert), Some(name)) = (cert, id.name())
            && id.certificate_names_it(cert) == Some(false)
        {
            self.findings.push(Finding::CertificateNameMismatch {
                computer_name: name.to_owned(),
            });
        }
    }

    fn finish(mut self, outcome: Result<(), Failure>) -> ProbeReport {
        let now = SystemTime::now();
        if let Some(cert) = self.tls.as_ref().and_then(|t| t.certificate.as_ref()) {
            if cert.expired {
                self.findings.push(Finding::CertificateExpired);
            } else if cert.not_yet_valid {
                self.findings.push(Finding::CertificateNotYetValid);
            } else if cert.expires_within(self.opts.cert_warning, now) {
                self.findings.push(Finding::CertificateExpiring {
                    days_left: cert.days_left,
                });
            }
        } else if self.tls.is_some() {
            self.findings.push(Finding::CertificateUnreadable);
        }
        self.identity_findings();
        let failure = outcome.err();
        let mut likely_causes: Vec<String> = failure
            .iter()
            .flat_map(|f| f.likely_causes().iter())
            .chain(self.findings.iter().flat_map(|f| f.likely_causes().iter()))
            .map(|s| (*s).to_string())
            .collect();
        likely_causes.dedup();
        ProbeReport {
            target: self.target.to_string(),
            reachable: failure.is_none(),
            failure,
            layers: self.layers,
            selected_protocol: self.selected,
            tls: self.tls,
            nla: self.nla,
            findings: self.findings,
            likely_causes,
            total_ms: (self
                .answered
                .unwrap_or_else(Instant::now)
                .duration_since(self.started)
                .as_secs_f64()
                * 1_000_000.0)
                .round()
                / 1000.0,
        }
    }
}

async fn resolve(
    resolver: &dyn Resolve,
    target: &Target,
    deadline: Instant,
) -> Result<Vec<SocketAddr>, Failure> {
    match timeout_at(deadline, resolver.resolve(&target.host, target.port)).await {
        Err(_) => Err(Failure::new(
            FailureReason::DnsFailure,
            format!("resolving {} timed out", target.host),
        )),
        Ok(Err(e)) => Err(Failure::new(
            FailureReason::DnsFailure,
            format!("failed to resolve {}: {e}", target.host),
        )),
        Ok(Ok(addrs)) if addrs.is_empty() => Err(Failure::new(
            FailureReason::DnsFailure,
            format!("{} resolved to no address", target.host),
        )),
        Ok(Ok(addrs)) => Ok(addrs),
    }
}

/// Connects to each address in turn until one accepts (returned with the address); the most
/// telling error wins.
async fn connect(
    addrs: &[SocketAddr],
    deadline: Instant,
) -> Result<(TcpStream, SocketAddr), Failure> {
    let mut last = None;
    for addr in addrs {
        match timeout_at(deadline, TcpStream::connect(addr)).await {
            Err(_) => {
                return Err(Failure::new(
                    FailureReason::TcpTimeout,
                    format!("no answer from {addr} before the deadline"),
                ));
            }
            Ok(Ok(stream)) => {
                let _ = stream.set_nodelay(true);
                return Ok((stream, *addr));
            }
            Ok(Err(e)) => last = Some(classify_connect_error(*addr, &e)),
        }
    }
    Err(last.unwrap_or_else(|| Failure::new(FailureReason::DnsFailure, "no address to connect to")))
}

fn classify_connect_error(addr: SocketAddr, e: &io::Error) -> Failure {
    let reason = match e.kind() {
        _ if is_local_error(e) => FailureReason::ProberError,
        io::ErrorKind::ConnectionRefused => FailureReason::TcpRefused,
        io::ErrorKind::TimedOut => FailureReason::TcpTimeout,
        _ => FailureReason::TcpUnreachable,
    };
    Failure::new(reason, format!("connect to {addr}: {e}"))
}

/// Errors that come from the prober's own host, not from the path to the VM: no descriptors
/// (EMFILE, ENFILE), no memory or buffers (ENOMEM, ENOBUFS), no local address or port
/// (EADDRNOTAVAIL, EADDRINUSE), no route in the prober's own table (ENETUNREACH), or a
/// local policy refusing the socket (EACCES, EPERM). ICMP host-unreachable stays the VM's.
pub fn is_local_error(e: &io::Error) -> bool {
    // Linux errno values (the operator's platform).
    const EPERM: i32 = 1;
    const ENOMEM: i32 = 12;
    const EACCES: i32 = 13;
    const ENFILE: i32 = 23;
    const EMFILE: i32 = 24;
    const EADDRINUSE: i32 = 98;
    const EADDRNOTAVAIL: i32 = 99;
    const ENETUNREACH: i32 = 101;
    const ENOBUFS: i32 = 105;
    matches!(
        e.raw_os_error(),
        Some(
            EPERM
                | ENOMEM
                | EACCES
                | ENFILE
                | EMFILE
                | EADDRINUSE
                | EADDRNOTAVAIL
                | ENETUNREACH
                | ENOBUFS
        )
    )
}

/// RDP_NEG_FAILURE: the server allows only standard RDP security (MS-RDPBCGR 2.2.1.2.2).
const SSL_NOT_ALLOWED_BY_SERVER: u32 = 2;

/// What the Connection Confirm means for reachability: the selected protocol, or a failure.
fn interpret_confirm(confirm: ConnectionConfirm) -> Result<SecurityProtocol, Failure> {
    match confirm {
        ConnectionConfirm::Negotiated {
            selected,
            selected_raw,
            ..
        } => selected.ok_or_else(|| {
            Failure::new(
                FailureReason::UnexpectedPdu,
                format!("server selected unknown protocol {selected_raw:#x}"),
            )
        }),
        ConnectionConfirm::NoNegotiation => Ok(SecurityProtocol::Rdp),
        ConnectionConfirm::NegotiationFailure(code) => Err(Failure::negotiation(code)),
        ConnectionConfirm::McsDisconnect => Err(Failure::new(
            FailureReason::UnexpectedPdu,
            "server answered with an MCS Disconnect-Provider-Ultimatum and closed",
        )),
    }
}

/// Sends the Connection Request and reads exactly one TPKT back.
async fn negotiate(
    stream: &mut TcpStream,
    request: &[u8],
    deadline: Instant,
) -> Result<ConnectionConfirm, Failure> {
    let exchange = async {
        stream.write_all(request).await.map_err(read_error)?;
        let mut header = [0u8; codec::TPKT_HEADER_LEN];
        let got = read_full(stream, &mut header).await.map_err(read_error)?;
        if got == 0 {
            return Err(Failure::new(
                FailureReason::ConnectionClosed,
                "connection closed before any reply",
            ));
        }
        if header[0] != codec::TPKT_VERSION {
            return Err(not_rdp(stream, &header[..got]).await);
        }
        if got < header.len() {
            return Err(Failure::new(
                FailureReason::ConnectionClosed,
                format!("connection closed after {got} bytes of the reply"),
            ));
        }
        let len = codec::tpkt_length(&header)
            .map_err(|e| Failure::new(FailureReason::NotRdp, e.to_string()))?;
        let mut pdu = vec![0u8; len];
        pdu[..codec::TPKT_HEADER_LEN].copy_from_slice(&header);
        let body = read_full(stream, &mut pdu[codec::TPKT_HEADER_LEN..])
            .await
            .map_err(read_error)?;
        if body < len - codec::TPKT_HEADER_LEN {
            return Err(Failure::new(
                FailureReason::ConnectionClosed,
                format!("connection closed after {} of {len} reply bytes", body + 4),
            ));
        }
        codec::parse_connection_confirm(&pdu).map_err(|e| match e {
            codec::ConfirmError::NotTpkt(_) | codec::ConfirmError::BadLength(_) => {
                Failure::new(FailureReason::NotRdp, e.to_string())
            }
            other => Failure::new(
                FailureReason::UnexpectedPdu,
                format!("{other} (reply {})", hex(&pdu)),
            ),
        })
    };
    match timeout_at(deadline, exchange).await {
        Ok(result) => result,
        Err(_) => Err(Failure::new(
            FailureReason::X224Timeout,
            "no X.224 Connection Confirm before the deadline",
        )),
    }
}

/// Reads until `buf` is full or the peer closes; returns the bytes read.
async fn read_full(stream: &mut TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match stream.read(&mut buf[filled..]).await? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

fn read_error(e: io::Error) -> Failure {
    Failure::new(
        FailureReason::ConnectionClosed,
        format!("connection failed before a complete reply: {e}"),
    )
}

/// Builds a `not_rdp` failure, quoting the first bytes of what answered.
async fn not_rdp(stream: &mut TcpStream, first: &[u8]) -> Failure {
    let mut sample = first.to_vec();
    let mut more = [0u8; 60];
    if let Ok(Ok(n)) = tokio::time::timeout(Duration::from_millis(20), stream.read(&mut more)).await
    {
        sample.extend_from_slice(&more[..n]);
    }
    let text: String = String::from_utf8_lossy(&sample)
        .chars()
        .take(48)
        .map(|c| if c.is_control() { '.' } else { c })
        .collect();
    Failure::new(
        FailureReason::NotRdp,
        format!(
            "reply is not TPKT: first bytes {} ({text:?})",
            hex(&sample[..sample.len().min(16)])
        ),
    )
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn server_name(target: &Target) -> ServerName<'static> {
    match target.ip() {
        Some(ip) => ServerName::IpAddress(ip.into()),
        None => ServerName::try_from(target.host.clone())
            .unwrap_or_else(|_| ServerName::IpAddress(std::net::Ipv4Addr::UNSPECIFIED.into())),
    }
}

/// The client side of a TLS session on the probe's connection.
type TlsStream = tokio_rustls::client::TlsStream<TcpStream>;

fn not_offered() -> NlaFacts {
    NlaFacts {
        credssp: Credssp::NotOffered,
        credssp_version: None,
        identity: None,
        error: None,
    }
}

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Polite close that leaves no TIME_WAIT behind on the prober: send close_notify, let the
/// server close the connection first (it answers close_notify by closing), read what it still
/// sends until its FIN, then close our end. The side that closes first keeps the TIME_WAIT:
/// one per probe on the server (every probe interval) is negligible; thousands per second on
/// the prober would not be. A server that does not close within 250 ms is closed by us (the
/// TIME_WAIT is then ours). Reading to the end also means no unread byte (such as a TLS 1.3
/// session ticket) turns our close into a reset. The probe's latency is taken before this.
async fn close(mut tls: TlsStream, deadline: Instant) {
    let until = deadline.min(Instant::now() + Duration::from_millis(250));
    tls.get_mut().1.send_close_notify();
    if timeout_at(until, tls.flush()).await.is_err() {
        return;
    }
    let (mut tcp, _) = tls.into_inner();
    let mut sink = [0u8; 512];
    let _ = timeout_at(until, async {
        while let Ok(n) = tcp.read(&mut sink).await
            && n > 0
        {}
    })
    .await;
}

async fn handshake(
    prober: &RdpProber,
    stream: TcpStream,
    name: ServerName<'static>,
    deadline: Instant,
) -> Result<(TlsStream, TlsFacts), Failure> {
    let tls = match timeout_at(deadline, prober.tls.connect(name, stream)).await {
        Err(_) => {
            return Err(Failure::new(
                FailureReason::TlsTimeout,
                "TLS handshake did not finish before the deadline",
            ));
        }
        Ok(Err(e)) => {
            return Err(Failure::new(
                FailureReason::TlsHandshakeFailed,
                tls::describe_handshake_error(&e),
            ));
        }
        Ok(Ok(tls)) => tls,
    };
    let (_, conn) = tls.get_ref();
    let version = conn
        .protocol_version()
        .map_or_else(|| "unknown".to_string(), tls::version_name);
    let cipher_suite = conn
        .negotiated_cipher_suite()
        .map(|s| format!("{:?}", s.suite()));
    let certificate = conn
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|der| {
            prober
                .certificates
                .facts(der.as_ref(), SystemTime::now())
                .ok()
        });
    let facts = TlsFacts {
        version,
        cipher_suite,
        certificate,
    };
    Ok((tls, facts))
}
