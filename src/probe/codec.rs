//! Byte-exact X.224 / RDP negotiation codec (MS-RDPBCGR 2.2.1.1 and 2.2.1.2), free of I/O.
//!
//! TPKT and the X.224 fixed header are big-endian; the RDP negotiation structures are
//! little-endian.

use std::fmt;

use serde::{Deserialize, Serialize};

/// TPKT version byte that starts every RDP PDU.
pub const TPKT_VERSION: u8 = 0x03;
/// Length of the TPKT header.
pub const TPKT_HEADER_LEN: usize = 4;
/// Smallest TPKT length we accept (header + the shortest X.224 TPDU we understand).
pub const TPKT_MIN_LEN: usize = 7;
/// Largest Connection Confirm we are willing to read; real ones are 11 or 19 bytes.
pub const TPKT_MAX_LEN: usize = 512;

/// requestedProtocols bit: TLS.
pub const PROTOCOL_SSL: u32 = 0x0000_0001;
/// requestedProtocols bit: CredSSP (NLA).
pub const PROTOCOL_HYBRID: u32 = 0x0000_0002;
/// What the prober offers: SSL|HYBRID. xrdp rejects values above 0xB, so nothing more.
pub const PROBE_REQUESTED_PROTOCOLS: u32 = PROTOCOL_SSL | PROTOCOL_HYBRID;
/// The neutral load-balancer cookie the prober sends; never a real user name.
pub const PROBE_COOKIE: &str = "probe";

const X224_TPDU_CONNECTION_REQUEST: u8 = 0xE0;
const X224_TPDU_CONNECTION_CONFIRM: u8 = 0xD0;
const X224_TPDU_DATA: u8 = 0xF0;
const TYPE_RDP_NEG_REQ: u8 = 0x01;
const TYPE_RDP_NEG_RSP: u8 = 0x02;
const TYPE_RDP_NEG_FAILURE: u8 = 0x03;
const RDP_NEG_LEN: usize = 8;
/// MCS Disconnect-Provider-Ultimatum: PER-encoded choice 8 in the upper six bits.
const MCS_DPUM_CHOICE: u8 = 8;

/// Builds the X.224 Connection Request the prober sends: cookie (optional) and an
/// RDP_NEG_REQ with flags 0 and the given requestedProtocols.
pub fn encode_connection_request(cookie: Option<&str>, requested_protocols: u32) -> Vec<u8> {
    let cookie_line = cookie.map(|c| format!("Cookie: mstshash={c}\r\n"));
    let cookie_len = cookie_line.as_ref().map_or(0, String::len);
    // LI counts the bytes after itself: 6 fixed + cookie + 8 negotiation request.
    let li = 6 + cookie_len + RDP_NEG_LEN;
    let total = TPKT_HEADER_LEN + 1 + li;
    let mut out = Vec::with_capacity(total);
    out.push(TPKT_VERSION);
    out.push(0);
    out.extend_from_slice(&(total as u16).to_be_bytes());
    out.push(li as u8);
    out.push(X224_TPDU_CONNECTION_REQUEST);
    out.extend_from_slice(&[0, 0, 0, 0, 0]); // DST-REF, SRC-REF, class 0
    if let Some(line) = &cookie_line {
        out.extend_from_slice(line.as_bytes());
    }
    out.push(TYPE_RDP_NEG_REQ);
    out.push(0); // flags: none (xrdp rejects RCG/restricted-admin flags)
    out.extend_from_slice(&(RDP_NEG_LEN as u16).to_le_bytes());
    out.extend_from_slice(&requested_protocols.to_le_bytes());
    out
}

/// The request the prober sends on every probe (43 bytes).
pub fn probe_connection_request() -> Vec<u8> {
    encode_connection_request(Some(PROBE_COOKIE), PROBE_REQUESTED_PROTOCOLS)
}

/// A security protocol the server can select (MS-RDPBCGR 2.2.1.2.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SecurityProtocol {
    /// Standard RDP Security: RC4, no server authentication.
    Rdp,
    /// TLS.
    Ssl,
    /// CredSSP (NLA), starts with TLS.
    Hybrid,
    /// RDSTLS, starts with TLS.
    Rdstls,
    /// CredSSP with Early User Authorization, starts with TLS.
    HybridEx,
}

impl SecurityProtocol {
    /// Maps a selectedProtocol value; `None` for values outside the spec.
    pub fn from_wire(value: u32) -> Option<Self> {
        match value {
            0x0 => Some(Self::Rdp),
            0x1 => Some(Self::Ssl),
            0x2 => Some(Self::Hybrid),
            0x4 => Some(Self::Rdstls),
            0x8 => Some(Self::HybridEx),
            _ => None,
        }
    }

    /// Whether the next bytes on the connection are a TLS handshake.
    pub fn starts_tls(self) -> bool {
        !matches!(self, Self::Rdp)
    }

    /// The stable snake_case name used in JSON and status.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Rdp => "rdp",
            Self::Ssl => "ssl",
            Self::Hybrid => "hybrid",
            Self::Rdstls => "rdstls",
            Self::HybridEx => "hybrid_ex",
        }
    }
}

impl fmt::Display for SecurityProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An RDP_NEG_FAILURE code (MS-RDPBCGR 2.2.1.2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NegotiationFailureCode(pub u32);

impl NegotiationFailureCode {
    /// The specification's name for the code, or `UNKNOWN`.
    pub fn name(self) -> &'static str {
        match self.0 {
            1 => "SSL_REQUIRED_BY_SERVER",
            2 => "SSL_NOT_ALLOWED_BY_SERVER",
            3 => "SSL_CERT_NOT_ON_SERVER",
            4 => "INCONSISTENT_FLAGS",
            5 => "HYBRID_REQUIRED_BY_SERVER",
            6 => "SSL_WITH_USER_AUTH_REQUIRED_BY_SERVER",
            _ => "UNKNOWN",
        }
    }
}

/// What the server's first reply means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectionConfirm {
    /// RDP_NEG_RSP: the server picked a protocol from our offer.
    Negotiated {
        /// The selected protocol, `None` if the value is outside the spec.
        selected: Option<SecurityProtocol>,
        /// Raw selectedProtocol value.
        selected_raw: u32,
        /// RDP_NEG_RSP flags (informational).
        flags: u8,
    },
    /// RDP_NEG_FAILURE: the server refused the offer and closes the connection.
    NegotiationFailure(NegotiationFailureCode),
    /// A Connection Confirm without negotiation data (11 bytes): Standard RDP Security only.
    NoNegotiation,
    /// An X.224 Data TPDU carrying an MCS Disconnect-Provider-Ultimatum.
    McsDisconnect,
}

/// Why a reply could not be understood as a Connection Confirm.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfirmError {
    /// The first byte is not a TPKT version: another protocol answered.
    #[error("reply is not TPKT (first byte {0:#04x})")]
    NotTpkt(u8),
    /// The TPKT length is outside what a Connection Confirm can be.
    #[error("TPKT length {0} is out of range")]
    BadLength(usize),
    /// Fewer bytes than the TPKT header announced.
    #[error("reply truncated: {got} of {expected} bytes")]
    Truncated {
        /// Bytes available.
        got: usize,
        /// Bytes announced by the TPKT header.
        expected: usize,
    },
    /// A TPKT whose X.224 TPDU is not a Connection Confirm.
    #[error("unexpected X.224 TPDU code {0:#04x}")]
    UnexpectedTpdu(u8),
    /// The negotiation data has a type we do not know.
    #[error("unexpected negotiation data type {0:#04x}")]
    UnexpectedNegotiationType(u8),
    /// The X.224 length indicator does not fit the packet.
    #[error("inconsistent X.224 length indicator {0}")]
    BadLengthIndicator(u8),
}

/// Reads the total PDU length from a TPKT header, checking version and bounds.
pub fn tpkt_length(header: &[u8; TPKT_HEADER_LEN]) -> Result<usize, ConfirmError> {
    if header[0] != TPKT_VERSION || header[1] != 0 {
        return Err(ConfirmError::NotTpkt(header[0]));
    }
    let len = usize::from(u16::from_be_bytes([header[2], header[3]]));
    if !(TPKT_MIN_LEN..=TPKT_MAX_LEN).contains(&len) {
        return Err(ConfirmError::BadLength(len));
    }
    Ok(len)
}

/// Parses a complete first reply (TPKT header included).
pub fn parse_connection_confirm(pdu: &[u8]) -> Result<ConnectionConfirm, ConfirmError> {
    let header: [u8; TPKT_HEADER_LEN] = match pdu.get(..TPKT_HEADER_LEN) {
        Some(h) => [h[0], h[1], h[2], h[3]],
        None => {
            return match pdu.first() {
                Some(&b) if b != TPKT_VERSION => Err(ConfirmError::NotTpkt(b)),
                _ => Err(ConfirmError::Truncated {
                    got: pdu.len(),
                    expected: TPKT_HEADER_LEN,
                }),
            };
        }
    };
    let len = tpkt_length(&header)?;
    if pdu.len() < len {
        return Err(ConfirmError::Truncated {
            got: pdu.len(),
            expected: len,
        });
    }
    let pdu = &pdu[..len];
    let li = pdu[4];
    let code = pdu[5];
    if code == X224_TPDU_DATA {
        // X.224 DT: 02 f0 80, then MCS. Disconnect-Provider-Ultimatum is choice 8.
        if pdu.len() >= 9 && pdu[6] == 0x80 && (pdu[7] >> 2) == MCS_DPUM_CHOICE {
            return Ok(ConnectionConfirm::McsDisconnect);
        }
        return Err(ConfirmError::UnexpectedTpdu(code));
    }
    if code & 0xF0 != X224_TPDU_CONNECTION_CONFIRM {
        return Err(ConfirmError::UnexpectedTpdu(code));
    }
    // LI counts the bytes after itself; it must cover the 6 fixed bytes and fit the packet.
    let end = 5 + usize::from(li);
    if li < 6 || end > pdu.len() {
        return Err(ConfirmError::BadLengthIndicator(li));
    }
    let neg = &pdu[11..end];
    if neg.len() < RDP_NEG_LEN {
        return Ok(ConnectionConfirm::NoNegotiation);
    }
    let value = u32::from_le_bytes([neg[4], neg[5], neg[6], neg[7]]);
    match neg[0] {
        TYPE_RDP_NEG_RSP => Ok(ConnectionConfirm::Negotiated {
            selected: SecurityProtocol::from_wire(value),
            selected_raw: value,
            flags: neg[1],
        }),
        TYPE_RDP_NEG_FAILURE => Ok(ConnectionConfirm::NegotiationFailure(
            NegotiationFailureCode(value),
        )),
        other => Err(ConfirmError::UnexpectedNegotiationType(other)),
    }
}

/// Encodes a Connection Confirm carrying RDP_NEG_RSP (what a server sends; used by the
/// simulator's responders and test peers).
pub fn encode_negotiation_response(selected: u32, flags: u8) -> Vec<u8> {
    encode_confirm_with_neg(TYPE_RDP_NEG_RSP, flags, selected)
}

/// Encodes a Connection Confirm carrying RDP_NEG_FAILURE with `code`.
pub fn encode_negotiation_failure(code: u32) -> Vec<u8> {
    encode_confirm_with_neg(TYPE_RDP_NEG_FAILURE, 0, code)
}

/// The 11-byte Connection Confirm without negotiation data.
pub fn encode_legacy_confirm() -> Vec<u8> {
    vec![
        0x03, 0x00, 0x00, 0x0b, 0x06, 0xd0, 0x00, 0x00, 0x12, 0x34, 0x00,
    ]
}

/// X.224 Data TPDU with an MCS Disconnect-Provider-Ultimatum, as xrdp sends it.
pub fn encode_mcs_disconnect() -> Vec<u8> {
    vec![0x03, 0x00, 0x00, 0x09, 0x02, 0xf0, 0x80, 0x21, 0x80]
}

fn encode_confirm_with_neg(kind: u8, flags: u8, value: u32) -> Vec<u8> {
    let mut out = vec![
        0x03, 0x00, 0x00, 0x13, 0x0e, 0xd0, 0x00, 0x00, 0x12, 0x34, 0x00,
    ];
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&(RDP_NEG_LEN as u16).to_le_bytes());
    out.extend_from_slice(&value.to_le_bytes());
    out
}

/// Outcome of reading a client's X.224 Connection Request (server side, for responders).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionRequest {
    /// requestedProtocols from RDP_NEG_REQ, `None` when the request carried none.
    pub requested_protocols: Option<u32>,
    /// RDP_NEG_REQ flags.
    pub flags: u8,
}

/// Parses a client Connection Request (used by the simulator's responders).
pub fn parse_connection_request(pdu: &[u8]) -> Result<ConnectionRequest, ConfirmError> {
    let header: [u8; TPKT_HEADER_LEN] = pdu
        .get(..TPKT_HEADER_LEN)
        .and_then(|h| h.try_into().ok())
        .ok_or(ConfirmError::Truncated {
            got: pdu.len(),
            expected: TPKT_HEADER_LEN,
        })?;
    let len = tpkt_length(&header)?;
    let pdu = pdu.get(..len).ok_or(ConfirmError::Truncated {
        got: pdu.len(),
        expected: len,
    })?;
    if len < 11 || pdu[5] != X224_TPDU_CONNECTION_REQUEST {
        return Err(ConfirmError::UnexpectedTpdu(pdu[5]));
    }
    let end = 5 + usize::from(pdu[4]);
    if end != len {
        return Err(ConfirmError::BadLengthIndicator(pdu[4]));
    }
    let mut rest = &pdu[11..end];
    // Skip a cookie or routing token, both terminated by CR LF.
    if rest.starts_with(b"Cookie: ") {
        match rest.windows(2).position(|w| w == b"\r\n") {
            Some(pos) => rest = &rest[pos + 2..],
            None => return Err(ConfirmError::BadLengthIndicator(pdu[4])),
        }
    }
    if rest.len() >= RDP_NEG_LEN && rest[0] == TYPE_RDP_NEG_REQ {
        Ok(ConnectionRequest {
            requested_protocols: Some(u32::from_le_bytes([rest[4], rest[5], rest[6], rest[7]])),
            flags: rest[1],
        })
    } else {
        Ok(ConnectionRequest {
            requested_protocols: None,
            flags: 0,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rstest::rstest;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn probe_request_is_byte_exact() {
        let expected = hex("03 00 00 2b 26 e0 00 00 00 00 00 \
             43 6f 6f 6b 69 65 3a 20 6d 73 74 73 68 61 73 68 3d 70 72 6f 62 65 0d 0a \
             01 00 08 00 03 00 00 00");
        assert_eq!(probe_connection_request(), expected);
        assert_eq!(probe_connection_request().len(), 43);
    }

    #[test]
    fn request_without_cookie_matches_rdp_sec_check() {
        assert_eq!(
            encode_connection_request(None, 3),
            hex("03 00 00 13 0e e0 00 00 00 00 00 01 00 08 00 03 00 00 00")
        );
    }

    #[rstest]
    #[case::xrdp_negotiate_ssl("030000130ed000001234000201080001000000", ConnectionConfirm::Negotiated { selected: Some(SecurityProtocol::Ssl), selected_raw: 1, flags: 1 })]
    #[case::xrdp_rdp_layer("030000130ed000001234000201080000000000", ConnectionConfirm::Negotiated { selected: Some(SecurityProtocol::Rdp), selected_raw: 0, flags: 1 })]
    #[case::hybrid("030000130ed000001234000200080002000000", ConnectionConfirm::Negotiated { selected: Some(SecurityProtocol::Hybrid), selected_raw: 2, flags: 0 })]
    #[case::hybrid_ex("030000130ed00000123400021f080008000000", ConnectionConfirm::Negotiated { selected: Some(SecurityProtocol::HybridEx), selected_raw: 8, flags: 0x1f })]
    #[case::unknown_selection("030000130ed000001234000200080010000000", ConnectionConfirm::Negotiated { selected: None, selected_raw: 0x10, flags: 0 })]
    #[case::ssl_required(
        "030000130ed000001234000300080001000000",
        ConnectionConfirm::NegotiationFailure(NegotiationFailureCode(1))
    )]
    #[case::cert_not_on_server(
        "030000130ed000001234000300080003000000",
        ConnectionConfirm::NegotiationFailure(NegotiationFailureCode(3))
    )]
    #[case::legacy("0300000b06d00000123400", ConnectionConfirm::NoNegotiation)]
    #[case::mcs_disconnect("0300000902f0802180", ConnectionConfirm::McsDisconnect)]
    fn parses_observed_replies(#[case] bytes: &str, #[case] expected: ConnectionConfirm) {
        assert_eq!(parse_connection_confirm(&hex(bytes)).unwrap(), expected);
    }

    #[rstest]
    #[case::http("3c21444f43545950452048544d4c3e0a", ConfirmError::NotTpkt(0x3c))]
    #[case::ssh("5353482d322e30", ConfirmError::NotTpkt(0x53))]
    #[case::short_tpkt("03000006", ConfirmError::BadLength(6))]
    #[case::huge_tpkt("0300ffff", ConfirmError::BadLength(0xffff))]
    #[case::truncated("030000130ed00000", ConfirmError::Truncated { got: 8, expected: 19 })]
    #[case::connection_request_echoed(
        "030000130ee000000000000100080003000000",
        ConfirmError::UnexpectedTpdu(0xe0)
    )]
    #[case::bad_li(
        "030000130fd000001234000201080001000000",
        ConfirmError::BadLengthIndicator(0x0f)
    )]
    #[case::unknown_neg_type(
        "030000130ed000001234000901080001000000",
        ConfirmError::UnexpectedNegotiationType(9)
    )]
    #[case::other_data_tpdu("0300000902f0807f80", ConfirmError::UnexpectedTpdu(0xf0))]
    fn rejects_what_is_not_a_confirm(#[case] bytes: &str, #[case] expected: ConfirmError) {
        assert_eq!(parse_connection_confirm(&hex(bytes)).unwrap_err(), expected);
    }

    #[rstest]
    #[case(1, "SSL_REQUIRED_BY_SERVER")]
    #[case(2, "SSL_NOT_ALLOWED_BY_SERVER")]
    #[case(3, "SSL_CERT_NOT_ON_SERVER")]
    #[case(4, "INCONSISTENT_FLAGS")]
    #[case(5, "HYBRID_REQUIRED_BY_SERVER")]
    #[case(6, "SSL_WITH_USER_AUTH_REQUIRED_BY_SERVER")]
    #[case(7, "UNKNOWN")]
    fn failure_codes_round_trip(#[case] code: u32, #[case] name: &str) {
        let pdu = encode_negotiation_failure(code);
        assert_eq!(pdu.len(), 19);
        let parsed = parse_connection_confirm(&pdu).unwrap();
        assert_eq!(
            parsed,
            ConnectionConfirm::NegotiationFailure(NegotiationFailureCode(code))
        );
        assert_eq!(NegotiationFailureCode(code).name(), name);
    }

    #[test]
    fn server_side_encoders_match_observed_bytes() {
        assert_eq!(
            encode_negotiation_response(1, 1),
            hex("030000130ed000001234000201080001000000")
        );
        assert_eq!(encode_legacy_confirm(), hex("0300000b06d00000123400"));
        assert_eq!(encode_mcs_disconnect(), hex("0300000902f0802180"));
    }

    #[test]
    fn connection_request_parses_back() {
        let req = parse_connection_request(&probe_connection_request()).unwrap();
        assert_eq!(req.requested_protocols, Some(3));
        assert_eq!(req.flags, 0);
        let legacy = hex("030000231ee00000000000436f6f6b69653a206d737473686173683d70726f62650d0a");
        assert_eq!(
            parse_connection_request(&legacy)
                .unwrap()
                .requested_protocols,
            None
        );
    }

    proptest! {
        #[test]
        fn confirm_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = parse_connection_confirm(&bytes);
        }

        #[test]
        fn confirm_parser_never_panics_on_tpkt_shaped_input(
            len in 0u16..600, body in proptest::collection::vec(any::<u8>(), 0..600)
        ) {
            let mut bytes = vec![3, 0];
            bytes.extend_from_slice(&len.to_be_bytes());
            bytes.extend_from_slice(&body);
            let _ = parse_connection_confirm(&bytes);
        }

        #[test]
        fn request_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let _ = parse_connection_request(&bytes);
        }

        #[test]
        fn negotiation_response_round_trips(selected in any::<u32>(), flags in any::<u8>()) {
            let parsed = parse_connection_confirm(&encode_negotiation_response(selected, flags)).unwrap();
            prop_assert_eq!(parsed, ConnectionConfirm::Negotiated {
                selected: SecurityProtocol::from_wire(selected), selected_raw: selected, flags });
        }
    }
}
