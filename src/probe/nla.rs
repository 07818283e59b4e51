//! The identity step's I/O: on a connection where the server selected CredSSP, after TLS,
//! send one CredSSP `TSRequest` carrying an NTLM NEGOTIATE and read the CHALLENGE; then, on a
//! second connection, offer TLS only to learn whether the server enforces NLA.
//!
//! Never an AUTHENTICATE message, never a credential: the server learns nothing but that a
//! client started NTLM and went away, which Windows does not log as a failed logon.

use std::net::SocketAddr;

use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
    time::{Instant, timeout_at},
};

use super::{
    codec::{self, ConnectionConfirm, SecurityProtocol},
    credssp,
    identity::Credssp,
    ntlm::{self, Challenge},
};

/// What the CredSSP exchange returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Exchange {
    /// The server's TSRequest version.
    pub credssp_version: u32,
    /// The NTLM CHALLENGE.
    pub challenge: Challenge,
}

/// Sends the NEGOTIATE inside a TSRequest on `stream` (the TLS session) and reads the
/// CHALLENGE back. The error is a human-readable reason.
pub(super) async fn read_challenge<S>(stream: &mut S, deadline: Instant) -> Result<Exchange, String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let request = credssp::encode_nego_request(credssp::PROBE_VERSION, &ntlm::probe_negotiate());
    let exchange = async {
        stream
            .write_all(&request)
            .await
            .map_err(|e| format!("failed to send the NTLM NEGOTIATE: {e}"))?;
        stream
            .flush()
            .await
            .map_err(|e| format!("failed to send the NTLM NEGOTIATE: {e}"))?;
        let reply = read_tsrequest(stream).await?;
        interpret(&reply)
    };
    timeout_at(deadline, exchange)
        .await
        .unwrap_or_else(|_| Err("no CredSSP answer before the deadline".into()))
}

/// Turns the server's TSRequest into the exchange's result.
fn interpret(reply: &[u8]) -> Result<Exchange, String> {
    let ts = credssp::decode(reply).map_err(|e| e.to_string())?;
    let token = match (ts.nego_token, ts.error_code) {
        (Some(token), _) => token,
        (None, Some(code)) => {
            return Err(format!(
                "server answered with CredSSP errorCode {code:#010x}"
            ));
        }
        (None, None) => return Err("server answered without a negotiation token".into()),
    };
    // A raw NTLM answer starts with the signature; a SPNEGO-wrapped one contains it.
    let at = token
        .windows(ntlm::SIGNATURE.len())
        .position(|w| w == ntlm::SIGNATURE)
        .ok_or("the server's negotiation token is not NTLM")?;
    let challenge = ntlm::parse_challenge(&token[at..]).map_err(|e| e.to_string())?;
    Ok(Exchange {
        credssp_version: ts.version,
        challenge,
    })
}

/// Reads exactly one DER TSRequest (bounded by `credssp::MAX_TSREQUEST_LEN`).
async fn read_tsrequest<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Vec<u8>, String> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 2048];
    loop {
        if let Some(total) = credssp::frame_len(&buf).map_err(|e| e.to_string())?
            && buf.len() >= total
        {
            buf.truncate(total);
            return Ok(buf);
        }
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| format!("connection failed while reading the CredSSP answer: {e}"))?;
        if n == 0 {
            return Err(format!(
                "connection closed after {} bytes of the CredSSP answer",
                buf.len()
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Offers TLS only on a new connection to `addr`: a server that enforces NLA refuses with
/// HYBRID_REQUIRED_BY_SERVER; one that accepts lets clients in without NLA.
pub(super) async fn enforcement(addr: SocketAddr, deadline: Instant) -> Credssp {
    let check = async {
        let mut stream = TcpStream::connect(addr).await.ok()?;
        let _ = stream.set_nodelay(true);
        let request =
            codec::encode_connection_request(Some(codec::PROBE_COOKIE), codec::PROTOCOL_SSL);
        stream.write_all(&request).await.ok()?;
        let mut header = [0u8; codec::TPKT_HEADER_LEN];
        stream.read_exact(&mut header).await.ok()?;
        let len = codec::tpkt_length(&header).ok()?;
        let mut pdu = vec![0u8; len];
        pdu[..codec::TPKT_HEADER_LEN].copy_from_slice(&header);
        stream
            .read_exact(&mut pdu[codec::TPKT_HEADER_LEN..])
            .await
            .ok()?;
        codec::parse_connection_confirm(&pdu).ok()
    };
    match timeout_at(deadline, check).await.ok().flatten() {
        Some(ConnectionConfirm::NegotiationFailure(code))
            if code.0 == HYBRID_REQUIRED_BY_SERVER =>
        {
            Credssp::Required
        }
        Some(ConnectionConfirm::Negotiated {
            selected: Some(SecurityProtocol::Ssl),
            ..
        }) => Credssp::NotRequired,
        _ => Credssp::Offered,
    }
}

/// RDP_NEG_FAILURE code: the server requires CredSSP.
const HYBRID_REQUIRED_BY_SERVER: u32 = 5;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::ntlm::{ChallengeSpec, NtlmVersion};

    fn challenge() -> Vec<u8> {
        ntlm::encode_challenge(&ChallengeSpec {
            nb_computer_name: "VM1",
            nb_domain_name: "VM1",
            dns_computer_name: "vm1",
            dns_domain_name: "vm1",
            timestamp: 0,
            version: NtlmVersion::PROBE,
            server_challenge: [0; 8],
        })
    }

    #[test]
    fn raw_and_wrapped_tokens_are_read() {
        let raw = credssp::encode_nego_request(6, &challenge());
        let ex = interpret(&raw).unwrap();
        assert_eq!(ex.credssp_version, 6);
        assert_eq!(ex.challenge.nb_computer_name.as_deref(), Some("VM1"));
        let mut wrapped = vec![0xA1, 0x81, 0x99, 0x30, 0x00];
        wrapped.extend_from_slice(&challenge());
        let ex = interpret(&credssp::encode_nego_request(3, &wrapped)).unwrap();
        assert_eq!(ex.challenge.dns_computer_name.as_deref(), Some("vm1"));
    }

    #[test]
    fn answers_without_a_challenge_are_errors() {
        let not_ntlm = credssp::encode_nego_request(6, b"kerberos, say");
        assert!(interpret(&not_ntlm).unwrap_err().contains("not NTLM"));
        // version 6 and errorCode only.
        let error = [
            0x30, 0x0B, 0xA0, 0x03, 0x02, 0x01, 0x06, 0xA4, 0x04, 0x02, 0x02, 0x01, 0x02,
        ];
        assert!(interpret(&error[..]).is_err());
    }

    #[tokio::test]
    async fn reads_a_reply_split_across_reads_and_stops_at_its_end() {
        let reply = credssp::encode_nego_request(6, &challenge());
        let mut extra = reply.clone();
        extra.extend_from_slice(b"trailing");
        let (mut client, mut server) = tokio::io::duplex(64);
        let serve = async move {
            let mut got = vec![0u8; 0x39];
            server.read_exact(&mut got).await.unwrap();
            assert_eq!(
                got,
                credssp::encode_nego_request(6, &ntlm::probe_negotiate())
            );
            for part in extra.chunks(7) {
                server.write_all(part).await.unwrap();
            }
            server
        };
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        let (result, _server) = tokio::join!(read_challenge(&mut client, deadline), serve);
        assert_eq!(
            result.unwrap().challenge.nb_computer_name.as_deref(),
            Some("VM1")
        );
    }

    #[tokio::test]
    async fn closed_or_silent_peers_are_errors_within_the_deadline() {
        let (mut client, server) = tokio::io::duplex(64);
        drop(server);
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        assert!(read_challenge(&mut client, deadline).await.is_err());
        let (mut client, _server) = tokio::io::duplex(4096);
        let deadline = Instant::now() + std::time::Duration::from_millis(50);
        let err = read_challenge(&mut client, deadline).await.unwrap_err();
        assert!(err.contains("deadline"), "{err}");
    }
}
