//! Byte-exact CredSSP `TSRequest` codec (MS-CSSP 2.2.1), DER, free of I/O.
//!
//! ```text
//! TSRequest ::= SEQUENCE {
//!     version     [0] INTEGER,
//!     negoTokens  [1] NegoData     OPTIONAL,
//!     authInfo    [2] OCTET STRING OPTIONAL,
//!     pubKeyAuth  [3] OCTET STRING OPTIONAL,
//!     errorCode   [4] INTEGER      OPTIONAL,
//!     clientNonce [5] OCTET STRING OPTIONAL }
//! NegoData ::= SEQUENCE OF SEQUENCE { negoToken [0] OCTET STRING }
//! ```
//!
//! The prober encodes only `version` and `negoTokens` (an NTLM NEGOTIATE); it never sends
//! `authInfo` (credentials) or `pubKeyAuth`. The decoder reads what a server answers.

/// The TSRequest version the prober announces (the current one; servers answer with theirs).
pub const PROBE_VERSION: u32 = 6;
/// Largest TSRequest the prober reads; a CHALLENGE is a few hundred bytes.
pub const MAX_TSREQUEST_LEN: usize = 16 * 1024;

const SEQUENCE: u8 = 0x30;
const INTEGER: u8 = 0x02;
const OCTET_STRING: u8 = 0x04;
const fn context(n: u8) -> u8 {
    0xA0 | n
}

/// A decoded TSRequest: what the prober needs of a server's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TsRequest {
    /// The peer's CredSSP version.
    pub version: u32,
    /// The first negoToken (SPNEGO or raw NTLM), if any.
    pub nego_token: Option<Vec<u8>>,
    /// errorCode: an NTSTATUS the server reports (versions 3+).
    pub error_code: Option<u32>,
}

/// Why bytes are not a usable TSRequest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredSspError {
    /// Not a DER SEQUENCE at the top.
    #[error("not a CredSSP TSRequest (first byte {0:#04x})")]
    NotTsRequest(u8),
    /// The announced length exceeds what the prober reads.
    #[error("TSRequest of {0} bytes is larger than the {MAX_TSREQUEST_LEN}-byte limit")]
    TooLarge(usize),
    /// The bytes end before the encoding does.
    #[error("TSRequest truncated")]
    Truncated,
    /// A DER rule is broken (length form, tag, integer size).
    #[error("malformed TSRequest: {0}")]
    Malformed(&'static str),
}

/// Builds the TSRequest that carries `token` in negoTokens, announcing `version`.
pub fn encode_nego_request(version: u32, token: &[u8]) -> Vec<u8> {
    let token = tlv(OCTET_STRING, token);
    let nego_data = tlv(SEQUENCE, &tlv(SEQUENCE, &tlv(context(0), &token)));
    let mut body = tlv(context(0), &tlv(INTEGER, &der_uint(version)));
    body.extend_from_slice(&tlv(context(1), &nego_data));
    tlv(SEQUENCE, &body)
}

/// How many bytes the TSRequest starting with `prefix` has in total, once the prefix holds
/// its tag and length; `Ok(None)` while more bytes are needed to tell.
pub fn frame_len(prefix: &[u8]) -> Result<Option<usize>, CredSspError> {
    let Some(&tag) = prefix.first() else {
        return Ok(None);
    };
    if tag != SEQUENCE {
        return Err(CredSspError::NotTsRequest(tag));
    }
    match read_len(&prefix[1..]) {
        Err(CredSspError::Truncated) => Ok(None),
        Err(e) => Err(e),
        Ok((len, used)) => {
            let total = 1 + used + len;
            if total > MAX_TSREQUEST_LEN {
                Err(CredSspError::TooLarge(total))
            } else {
                Ok(Some(total))
            }
        }
    }
}

/// Decodes a complete TSRequest. Unknown trailing fields are skipped; hostile input yields
/// an error, never a panic.
pub fn decode(bytes: &[u8]) -> Result<TsRequest, CredSspError> {
    if let Some(&tag) = bytes.first()
        && tag != SEQUENCE
    {
        return Err(CredSspError::NotTsRequest(tag));
    }
    let mut top = Reader(bytes);
    let mut seq = Reader(top.expect(SEQUENCE)?);
    let mut version = None;
    let mut nego_token = None;
    let mut error_code = None;
    while !seq.0.is_empty() {
        let (tag, value) = seq.any()?;
        match tag {
            t if t == context(0) => version = Some(Reader(value).integer()?),
            t if t == context(1) => nego_token = first_nego_token(value)?,
            t if t == context(4) => error_code = Some(Reader(value).integer()?),
            t if t & 0xE0 == 0xA0 => {} // authInfo, pubKeyAuth, clientNonce: not needed
            _ => return Err(CredSspError::Malformed("unexpected field in TSRequest")),
        }
    }
    Ok(TsRequest {
        version: version.ok_or(CredSspError::Malformed("TSRequest without version"))?,
        nego_token,
        error_code,
    })
}

fn first_nego_token(nego_data: &[u8]) -> Result<Option<Vec<u8>>, CredSspError> {
    let mut outer = Reader(nego_data);
    let mut items = Reader(outer.expect(SEQUENCE)?);
    if items.0.is_empty() {
        return Ok(None);
    }
    let mut item = Reader(items.expect(SEQUENCE)?);
    let mut token = Reader(item.expect(context(0))?);
    Ok(Some(token.expect(OCTET_STRING)?.to_vec()))
}

/// A cursor over DER bytes.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    /// Reads one TLV; returns its tag and value.
    fn any(&mut self) -> Result<(u8, &'a [u8]), CredSspError> {
        let (&tag, rest) = self.0.split_first().ok_or(CredSspError::Truncated)?;
        if tag & 0x1F == 0x1F {
            return Err(CredSspError::Malformed(
                "multi-byte tags are not used by CredSSP",
            ));
        }
        let (len, used) = read_len(rest)?;
        let rest = &rest[used..];
        if rest.len() < len {
            return Err(CredSspError::Truncated);
        }
        let (value, after) = rest.split_at(len);
        self.0 = after;
        Ok((tag, value))
    }

    /// Reads one TLV that must carry `tag`.
    fn expect(&mut self, tag: u8) -> Result<&'a [u8], CredSspError> {
        match self.any()? {
            (t, value) if t == tag => Ok(value),
            _ => Err(CredSspError::Malformed("unexpected tag")),
        }
    }

    /// Reads an INTEGER that fits in 32 bits unsigned (NTSTATUS values have the top bit set).
    fn integer(&mut self) -> Result<u32, CredSspError> {
        let value = self.expect(INTEGER)?;
        if value.is_empty() || value.len() > 5 || (value.len() == 5 && value[0] != 0) {
            return Err(CredSspError::Malformed("INTEGER out of range"));
        }
        Ok(value.iter().fold(0u32, |acc, &b| (acc << 8) | u32::from(b)))
    }
}

/// Reads a DER length; returns it and the bytes it took. Indefinite lengths are refused.
fn read_len(bytes: &[u8]) -> Result<(usize, usize), CredSspError> {
    let &first = bytes.first().ok_or(CredSspError::Truncated)?;
    if first < 0x80 {
        return Ok((usize::from(first), 1));
    }
    let n = usize::from(first & 0x7F);
    if n == 0 {
        return Err(CredSspError::Malformed("indefinite length"));
    }
    if n > 4 {
        return Err(CredSspError::Malformed("length of more than four bytes"));
    }
    let digits = bytes.get(1..1 + n).ok_or(CredSspError::Truncated)?;
    let len = digits
        .iter()
        .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
    Ok((len, 1 + n))
}

fn tlv(tag: u8, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len() + 6);
    out.push(tag);
    let len = value.len();
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let digits: Vec<u8> = len
            .to_be_bytes()
            .into_iter()
            .skip_while(|&b| b == 0)
            .collect();
        out.push(0x80 | digits.len() as u8);
        out.extend_from_slice(&digits);
    }
    out.extend_from_slice(value);
    out
}

/// Minimal two's-complement encoding of an unsigned value (leading 0x00 when the top bit is set).
fn der_uint(v: u32) -> Vec<u8> {
    let bytes = v.to_be_bytes();
    let skip = bytes.iter().take(3).take_while(|&&b| b == 0).count();
    let mut out = bytes[skip..].to_vec();
    if out[0] & 0x80 != 0 {
        out.insert(0, 0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::probe::ntlm;
    use proptest::prelude::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// The TSRequest (version 6) with a 40-byte NTLM NEGOTIATE that RDP clients send first.
    const CLIENT_NEGOTIATE: &str = "3037a003020106a130302e302ca02a0428
        4e544c4d5353500001000000b78208e2000000000000000000000000000000000a00614a0000000f";

    #[test]
    fn nego_request_is_byte_exact() {
        let wire = hex(CLIENT_NEGOTIATE);
        let token = &wire[17..];
        assert_eq!(encode_nego_request(6, token), wire);
        let back = decode(&wire).unwrap();
        assert_eq!(back.version, 6);
        assert_eq!(back.nego_token.as_deref(), Some(token));
        assert_eq!(back.error_code, None);
        assert_eq!(frame_len(&wire[..2]), Ok(Some(wire.len())));
    }

    #[test]
    fn the_probe_request_carries_only_a_negotiate() {
        let wire = encode_nego_request(PROBE_VERSION, &ntlm::probe_negotiate());
        assert_eq!(wire.len(), 0x39);
        let req = decode(&wire).unwrap();
        assert_eq!(req.nego_token.unwrap(), ntlm::probe_negotiate());
        // Fields [2] authInfo and [3] pubKeyAuth never appear.
        assert!(!wire.windows(2).any(|w| w[0] == 0xA2 || w[0] == 0xA3));
    }

    #[test]
    fn long_form_lengths_round_trip() {
        let token = vec![0x5A; 300];
        let wire = encode_nego_request(2, &token);
        assert_eq!(&wire[..4], &[0x30, 0x82, 0x01, 0x45]);
        assert_eq!(frame_len(&wire[..1]), Ok(None));
        assert_eq!(frame_len(&wire[..3]), Ok(None));
        assert_eq!(frame_len(&wire[..4]), Ok(Some(wire.len())));
        assert_eq!(decode(&wire).unwrap().nego_token.unwrap(), token);
    }

    #[test]
    fn error_code_and_unknown_fields_are_read() {
        // version 6, errorCode 0xC000006D (STATUS_LOGON_FAILURE), clientNonce skipped.
        let wire = hex("3019 a003020106 a407020500c000006d a509 0407 01020304050607");
        let req = decode(&wire).unwrap();
        assert_eq!(req.version, 6);
        assert_eq!(req.error_code, Some(0xC000_006D));
        assert_eq!(req.nego_token, None);
    }

    #[test]
    fn hostile_inputs_are_errors() {
        assert_eq!(
            frame_len(b"HTTP/1.1"),
            Err(CredSspError::NotTsRequest(b'H'))
        );
        assert_eq!(decode(&[]), Err(CredSspError::Truncated));
        assert!(matches!(
            frame_len(&[0x30, 0x80]),
            Err(CredSspError::Malformed(_))
        ));
        assert!(matches!(
            frame_len(&[0x30, 0x85, 1, 1, 1, 1, 1]),
            Err(CredSspError::Malformed(_))
        ));
        assert_eq!(
            frame_len(&[0x30, 0x84, 0x7F, 0xFF, 0xFF, 0xFF]),
            Err(CredSspError::TooLarge(0x7FFF_FFFF + 6))
        );
        // No version.
        assert!(decode(&hex("3000")).is_err());
        // An integer too large for 32 bits.
        assert!(decode(&hex("3009 a007 020501ffffffff")).is_err());
        let wire = hex(CLIENT_NEGOTIATE);
        for n in 0..wire.len() {
            assert!(decode(&wire[..n]).is_err(), "{n} bytes decoded");
        }
    }

    proptest! {
        #[test]
        fn decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode(&bytes);
            let _ = frame_len(&bytes);
        }

        #[test]
        fn decoder_never_panics_on_mutated_requests(
            flips in proptest::collection::vec((0usize..57, any::<u8>()), 1..6)
        ) {
            let mut wire = encode_nego_request(PROBE_VERSION, &ntlm::probe_negotiate());
            for (at, byte) in flips {
                wire[at] = byte;
            }
            let _ = decode(&wire);
        }

        #[test]
        fn nego_requests_round_trip(version in any::<u32>(), token in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let wire = encode_nego_request(version, &token);
            prop_assert_eq!(frame_len(&wire), Ok(Some(wire.len())));
            let req = decode(&wire).unwrap();
            prop_assert_eq!(req.version, version);
            prop_assert_eq!(req.nego_token, Some(token));
        }
    }
}
