//! Byte-exact NTLM codec (MS-NLMP 2.2.1.1, 2.2.1.2, 2.2.2.1, 2.2.2.10), free of I/O.
//!
//! The prober builds only a NEGOTIATE message and reads only a CHALLENGE: it never builds an
//! AUTHENTICATE message and never handles a credential. The CHALLENGE encoder exists for the
//! simulator's responders and for tests. All integers are little-endian.

use std::fmt;

/// `NTLMSSP\0`, the signature that starts every NTLM message.
pub const SIGNATURE: &[u8; 8] = b"NTLMSSP\0";
/// MessageType of a NEGOTIATE message.
pub const NEGOTIATE_MESSAGE: u32 = 1;
/// MessageType of a CHALLENGE message.
pub const CHALLENGE_MESSAGE: u32 = 2;

/// NTLMSSP_NEGOTIATE_UNICODE.
pub const NEGOTIATE_UNICODE: u32 = 0x0000_0001;
/// NTLM_NEGOTIATE_OEM.
pub const NEGOTIATE_OEM: u32 = 0x0000_0002;
/// NTLMSSP_REQUEST_TARGET: the server puts its target name into the CHALLENGE.
pub const REQUEST_TARGET: u32 = 0x0000_0004;
/// NTLMSSP_NEGOTIATE_TARGET_INFO: the CHALLENGE carries target information (AV pairs).
pub const NEGOTIATE_TARGET_INFO: u32 = 0x0080_0000;
/// NTLMSSP_NEGOTIATE_VERSION: the Version field is present.
pub const NEGOTIATE_VERSION: u32 = 0x0200_0000;

/// The flags the prober offers: those of common RDP clients (FreeRDP, mstsc), so a server
/// answers exactly as it would answer a real client. Includes REQUEST_TARGET and VERSION.
pub const PROBE_NEGOTIATE_FLAGS: u32 = 0xE208_82B7;

/// Length of a NEGOTIATE message with its Version field and no payload.
pub const NEGOTIATE_LEN: usize = 40;
/// Length of the fixed part of a CHALLENGE message up to and including the Version field.
const CHALLENGE_HEADER_LEN: usize = 56;
/// Smallest CHALLENGE we read: up to and including TargetInfoFields.
const CHALLENGE_MIN_LEN: usize = 48;

/// AV pair ids (MS-NLMP 2.2.2.1).
mod av {
    pub const EOL: u16 = 0;
    pub const NB_COMPUTER_NAME: u16 = 1;
    pub const NB_DOMAIN_NAME: u16 = 2;
    pub const DNS_COMPUTER_NAME: u16 = 3;
    pub const DNS_DOMAIN_NAME: u16 = 4;
    pub const DNS_TREE_NAME: u16 = 5;
    pub const TIMESTAMP: u16 = 7;
}

/// The NTLM VERSION structure (MS-NLMP 2.2.2.10): the server's OS version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NtlmVersion {
    /// ProductMajorVersion, e.g. 10.
    pub major: u8,
    /// ProductMinorVersion, e.g. 0.
    pub minor: u8,
    /// ProductBuild, e.g. 20348 (Windows Server 2022).
    pub build: u16,
    /// NTLMRevisionCurrent, 15 for every current implementation.
    pub ntlm_revision: u8,
}

impl NtlmVersion {
    /// What the prober sends: no product version, current NTLM revision. The field is
    /// informational ("for debugging purposes only"); the prober claims to be no OS.
    pub const PROBE: Self = Self {
        major: 0,
        minor: 0,
        build: 0,
        ntlm_revision: 0x0F,
    };

    fn encode(self) -> [u8; 8] {
        let b = self.build.to_le_bytes();
        [
            self.major,
            self.minor,
            b[0],
            b[1],
            0,
            0,
            0,
            self.ntlm_revision,
        ]
    }

    fn decode(bytes: &[u8]) -> Option<Self> {
        let bytes: &[u8; 8] = bytes.get(..8)?.try_into().ok()?;
        Some(Self {
            major: bytes[0],
            minor: bytes[1],
            build: u16::from_le_bytes([bytes[2], bytes[3]]),
            ntlm_revision: bytes[7],
        })
    }
}

impl fmt::Display for NtlmVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.build)
    }
}

/// Builds the NEGOTIATE message the prober sends: flags, empty domain and workstation
/// fields (the prober names nobody), and the Version field.
pub fn encode_negotiate(flags: u32, version: NtlmVersion) -> Vec<u8> {
    let mut out = Vec::with_capacity(NEGOTIATE_LEN);
    out.extend_from_slice(SIGNATURE);
    out.extend_from_slice(&NEGOTIATE_MESSAGE.to_le_bytes());
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(&[0; 8]); // DomainNameFields: len 0, max 0, offset 0
    out.extend_from_slice(&[0; 8]); // WorkstationFields
    out.extend_from_slice(&version.encode());
    out
}

/// The NEGOTIATE the prober sends (40 bytes).
pub fn probe_negotiate() -> Vec<u8> {
    encode_negotiate(PROBE_NEGOTIATE_FLAGS, NtlmVersion::PROBE)
}

/// What a CHALLENGE message tells about the server.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Challenge {
    /// NegotiateFlags chosen by the server.
    pub flags: u32,
    /// TargetName (the domain or the server's name), when present.
    pub target_name: Option<String>,
    /// MsvAvNbComputerName: NetBIOS computer name.
    pub nb_computer_name: Option<String>,
    /// MsvAvNbDomainName: NetBIOS domain (or workgroup/computer) name.
    pub nb_domain_name: Option<String>,
    /// MsvAvDnsComputerName: FQDN of the computer.
    pub dns_computer_name: Option<String>,
    /// MsvAvDnsDomainName: FQDN of the domain.
    pub dns_domain_name: Option<String>,
    /// MsvAvDnsTreeName: FQDN of the forest.
    pub dns_tree_name: Option<String>,
    /// MsvAvTimestamp: the server's time as a FILETIME (100 ns ticks since 1601-01-01 UTC).
    pub timestamp: Option<u64>,
    /// The Version field, when the server set NTLMSSP_NEGOTIATE_VERSION.
    pub version: Option<NtlmVersion>,
}

/// Why bytes are not a usable CHALLENGE message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NtlmError {
    /// Shorter than the fixed part of the message.
    #[error("NTLM message too short ({0} bytes)")]
    Truncated(usize),
    /// The signature is not `NTLMSSP\0`.
    #[error("not an NTLM message (bad signature)")]
    BadSignature,
    /// Another message type than CHALLENGE.
    #[error("expected an NTLM CHALLENGE (type 2), got type {0}")]
    WrongType(u32),
    /// A field points outside the message.
    #[error("NTLM {0} field points outside the message")]
    FieldOutOfBounds(&'static str),
    /// The target information is not a well-formed AV pair list.
    #[error("malformed NTLM target information: {0}")]
    BadTargetInfo(&'static str),
}

/// Parses a CHALLENGE message. Every length and offset is checked against the message;
/// hostile input yields an error, never a panic.
pub fn parse_challenge(msg: &[u8]) -> Result<Challenge, NtlmError> {
    if msg.len() < CHALLENGE_MIN_LEN {
        return Err(NtlmError::Truncated(msg.len()));
    }
    if &msg[..8] != SIGNATURE {
        return Err(NtlmError::BadSignature);
    }
    let kind = le32(msg, 8);
    if kind != CHALLENGE_MESSAGE {
        return Err(NtlmError::WrongType(kind));
    }
    let flags = le32(msg, 20);
    let target_name = field(msg, 12, "TargetName")?
        .filter(|b| !b.is_empty())
        .map(|b| decode_name(b, flags & NEGOTIATE_UNICODE != 0));
    let mut challenge = Challenge {
        flags,
        target_name,
        ..Challenge::default()
    };
    if let Some(info) = field(msg, 40, "TargetInfo")? {
        read_target_info(info, &mut challenge)?;
    }
    // The Version field sits before the payload; a payload starting earlier means the
    // server sent none (older servers), whatever the flags say.
    if flags & NEGOTIATE_VERSION != 0 && payload_start(msg) >= CHALLENGE_HEADER_LEN {
        challenge.version = NtlmVersion::decode(&msg[48..]);
    }
    Ok(challenge)
}

/// Where the payload begins: the smallest offset of a non-empty field (or the message end).
fn payload_start(msg: &[u8]) -> usize {
    [12, 40]
        .into_iter()
        .filter(|&at| le16(msg, at) > 0)
        .map(|at| le32(msg, at + 4) as usize)
        .min()
        .unwrap_or(msg.len())
}

/// Reads a (len u16, maxlen u16, offset u32) field descriptor at `at`; `None` when empty.
fn field<'m>(msg: &'m [u8], at: usize, name: &'static str) -> Result<Option<&'m [u8]>, NtlmError> {
    let len = le16(msg, at) as usize;
    if len == 0 {
        return Ok(None);
    }
    let offset = le32(msg, at + 4) as usize;
    offset
        .checked_add(len)
        .and_then(|end| msg.get(offset..end))
        .map(Some)
        .ok_or(NtlmError::FieldOutOfBounds(name))
}

fn read_target_info(mut info: &[u8], out: &mut Challenge) -> Result<(), NtlmError> {
    loop {
        if info.len() < 4 {
            return Err(NtlmError::BadTargetInfo("missing MsvAvEOL"));
        }
        let id = le16(info, 0);
        let len = le16(info, 2) as usize;
        let value = info.get(4..4 + len).ok_or(NtlmError::BadTargetInfo(
            "AV pair longer than the target information",
        ))?;
        let text = || Some(utf16le(value));
        match id {
            av::EOL => return Ok(()),
            av::NB_COMPUTER_NAME => out.nb_computer_name = text(),
            av::NB_DOMAIN_NAME => out.nb_domain_name = text(),
            av::DNS_COMPUTER_NAME => out.dns_computer_name = text(),
            av::DNS_DOMAIN_NAME => out.dns_domain_name = text(),
            av::DNS_TREE_NAME => out.dns_tree_name = text(),
            av::TIMESTAMP => {
                let raw: [u8; 8] = value
                    .try_into()
                    .map_err(|_| NtlmError::BadTargetInfo("MsvAvTimestamp is not 8 bytes"))?;
                out.timestamp = Some(u64::from_le_bytes(raw));
            }
            _ => {} // flags, single host, channel bindings, target name: not needed
        }
        info = &info[4 + len..];
    }
}

fn decode_name(bytes: &[u8], unicode: bool) -> String {
    if unicode {
        utf16le(bytes)
    } else {
        String::from_utf8_lossy(bytes).into_owned()
    }
}

/// Decodes UTF-16LE, replacing unpaired surrogates and ignoring an odd trailing byte.
fn utf16le(bytes: &[u8]) -> String {
    let units: Vec<u16> = bytes
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    String::from_utf16_lossy(&units)
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// FILETIME ticks (100 ns) between 1601-01-01 and 1970-01-01.
const FILETIME_UNIX_EPOCH: u64 = 116_444_736_000_000_000;

/// Converts a FILETIME to Unix milliseconds (negative before 1970).
pub fn filetime_to_unix_ms(filetime: u64) -> i64 {
    (i128::from(filetime) - i128::from(FILETIME_UNIX_EPOCH))
        .div_euclid(10_000)
        .clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
}

/// Converts Unix milliseconds to a FILETIME (saturating at the FILETIME range).
pub fn unix_ms_to_filetime(unix_ms: i64) -> u64 {
    (i128::from(unix_ms) * 10_000 + i128::from(FILETIME_UNIX_EPOCH)).clamp(0, i128::from(u64::MAX))
        as u64
}

/// What a server puts into its CHALLENGE (for the simulator's responders and tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChallengeSpec<'a> {
    /// NetBIOS computer name (also the NetBIOS domain and target name of a workgroup server).
    pub nb_computer_name: &'a str,
    /// NetBIOS domain name.
    pub nb_domain_name: &'a str,
    /// DNS computer name.
    pub dns_computer_name: &'a str,
    /// DNS domain name.
    pub dns_domain_name: &'a str,
    /// Server time as a FILETIME.
    pub timestamp: u64,
    /// OS version.
    pub version: NtlmVersion,
    /// ServerChallenge nonce.
    pub server_challenge: [u8; 8],
}

/// Builds a CHALLENGE message the way Windows lays it out: header, Version, TargetName, then
/// the AV pairs (NbDomainName, NbComputerName, DnsDomainName, DnsComputerName, Timestamp, EOL).
pub fn encode_challenge(spec: &ChallengeSpec<'_>) -> Vec<u8> {
    let target_name = utf16le_bytes(spec.nb_domain_name);
    let mut info = Vec::new();
    for (id, value) in [
        (av::NB_DOMAIN_NAME, spec.nb_domain_name),
        (av::NB_COMPUTER_NAME, spec.nb_computer_name),
        (av::DNS_DOMAIN_NAME, spec.dns_domain_name),
        (av::DNS_COMPUTER_NAME, spec.dns_computer_name),
    ] {
        push_av(&mut info, id, &utf16le_bytes(value));
    }
    push_av(&mut info, av::TIMESTAMP, &spec.timestamp.to_le_bytes());
    push_av(&mut info, av::EOL, &[]);
    let flags = 0xE28A_8235 | NEGOTIATE_TARGET_INFO | NEGOTIATE_VERSION;
    let name_at = CHALLENGE_HEADER_LEN;
    let info_at = name_at + target_name.len();
    let mut out = Vec::with_capacity(info_at + info.len());
    out.extend_from_slice(SIGNATURE);
    out.extend_from_slice(&CHALLENGE_MESSAGE.to_le_bytes());
    push_field(&mut out, target_name.len(), name_at);
    out.extend_from_slice(&flags.to_le_bytes());
    out.extend_from_slice(&spec.server_challenge);
    out.extend_from_slice(&[0; 8]); // Reserved
    push_field(&mut out, info.len(), info_at);
    out.extend_from_slice(&spec.version.encode());
    out.extend_from_slice(&target_name);
    out.extend_from_slice(&info);
    out
}

fn push_field(out: &mut Vec<u8>, len: usize, offset: usize) {
    let len = u16::try_from(len).unwrap_or(u16::MAX);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&u32::try_from(offset).unwrap_or(u32::MAX).to_le_bytes());
}

fn push_av(out: &mut Vec<u8>, id: u16, value: &[u8]) {
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(&u16::try_from(value.len()).unwrap_or(u16::MAX).to_le_bytes());
    out.extend_from_slice(value);
}

fn utf16le_bytes(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(u16::to_le_bytes).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// MS-NLMP 4.2.4.3, the NTLMv2 CHALLENGE_MESSAGE example.
    const SPEC_CHALLENGE: &str = "4e544c4d53535000020000000c000c003800000033828ae20123456789abcdef
        00000000000000002400240044000000060070170000000f5300650072007600
        6500720002000c0044006f006d00610069006e0001000c005300650072007600
        6500720000000000";

    #[test]
    fn parses_the_ms_nlmp_challenge_example() {
        let c = parse_challenge(&hex(SPEC_CHALLENGE)).unwrap();
        assert_eq!(c.flags, 0xE28A_8233);
        assert_eq!(c.target_name.as_deref(), Some("Server"));
        assert_eq!(c.nb_domain_name.as_deref(), Some("Domain"));
        assert_eq!(c.nb_computer_name.as_deref(), Some("Server"));
        assert_eq!(c.dns_computer_name, None);
        assert_eq!(c.timestamp, None);
        let v = c.version.unwrap();
        assert_eq!(
            (v.major, v.minor, v.build, v.ntlm_revision),
            (6, 0, 6000, 15)
        );
        assert_eq!(v.to_string(), "6.0.6000");
    }

    #[test]
    fn negotiate_is_byte_exact() {
        // The NEGOTIATE common RDP clients send (FreeRDP's flags), here with the version
        // 10.0.19041 rev 15 that such a client carries.
        let version = NtlmVersion {
            major: 10,
            minor: 0,
            build: 19041,
            ntlm_revision: 15,
        };
        assert_eq!(
            encode_negotiate(PROBE_NEGOTIATE_FLAGS, version),
            hex("4e544c4d5353500001000000b78208e2000000000000000000000000000000000a00614a0000000f")
        );
        let probe = probe_negotiate();
        assert_eq!(probe.len(), NEGOTIATE_LEN);
        assert_eq!(&probe[32..], &[0, 0, 0, 0, 0, 0, 0, 0x0f]);
        assert_ne!(PROBE_NEGOTIATE_FLAGS & REQUEST_TARGET, 0);
        assert_ne!(PROBE_NEGOTIATE_FLAGS & NEGOTIATE_VERSION, 0);
    }

    #[test]
    fn encoded_challenge_parses_back() {
        let spec = ChallengeSpec {
            nb_computer_name: "VM-WEB-01",
            nb_domain_name: "CONTOSO",
            dns_computer_name: "vm-web-01.contoso.com",
            dns_domain_name: "contoso.com",
            timestamp: unix_ms_to_filetime(1_796_000_000_000),
            version: NtlmVersion {
                major: 10,
                minor: 0,
                build: 20348,
                ntlm_revision: 15,
            },
            server_challenge: [1, 2, 3, 4, 5, 6, 7, 8],
        };
        let c = parse_challenge(&encode_challenge(&spec)).unwrap();
        assert_eq!(c.nb_computer_name.as_deref(), Some("VM-WEB-01"));
        assert_eq!(c.nb_domain_name.as_deref(), Some("CONTOSO"));
        assert_eq!(c.target_name.as_deref(), Some("CONTOSO"));
        assert_eq!(
            c.dns_computer_name.as_deref(),
            Some("vm-web-01.contoso.com")
        );
        assert_eq!(c.dns_domain_name.as_deref(), Some("contoso.com"));
        assert_eq!(c.dns_tree_name, None);
        assert_eq!(
            c.timestamp.map(filetime_to_unix_ms),
            Some(1_796_000_000_000)
        );
        assert_eq!(c.version.unwrap().to_string(), "10.0.20348");
    }

    #[test]
    fn filetime_conversion_matches_the_epochs() {
        assert_eq!(filetime_to_unix_ms(FILETIME_UNIX_EPOCH), 0);
        assert_eq!(filetime_to_unix_ms(0), -11_644_473_600_000);
        assert_eq!(unix_ms_to_filetime(0), FILETIME_UNIX_EPOCH);
        assert_eq!(unix_ms_to_filetime(i64::MIN), 0);
    }

    #[test]
    fn every_truncation_of_the_example_is_an_error_or_a_subset() {
        let full = hex(SPEC_CHALLENGE);
        for n in 0..full.len() {
            match parse_challenge(&full[..n]) {
                Err(_) => {}
                Ok(c) => panic!("{n} bytes parsed as {c:?}"),
            }
        }
    }

    #[test]
    fn hostile_inputs_are_errors() {
        let mut msg = hex(SPEC_CHALLENGE);
        msg[0] = b'X';
        assert_eq!(parse_challenge(&msg), Err(NtlmError::BadSignature));
        let mut msg = hex(SPEC_CHALLENGE);
        msg[8] = 3;
        assert_eq!(parse_challenge(&msg), Err(NtlmError::WrongType(3)));
        // TargetInfo offset far past the end, and offset + length overflowing.
        let mut msg = hex(SPEC_CHALLENGE);
        msg[44..48].copy_from_slice(&0xFFFF_FFF0u32.to_le_bytes());
        assert_eq!(
            parse_challenge(&msg),
            Err(NtlmError::FieldOutOfBounds("TargetInfo"))
        );
        // An AV pair claiming more bytes than the target information holds.
        let mut msg = hex(SPEC_CHALLENGE);
        msg[0x44 + 2] = 0xFF;
        assert!(matches!(
            parse_challenge(&msg),
            Err(NtlmError::BadTargetInfo(_))
        ));
        // No EOL: target info cut after the first pair.
        let mut msg = hex(SPEC_CHALLENGE);
        msg[40] = 16;
        assert!(matches!(
            parse_challenge(&msg),
            Err(NtlmError::BadTargetInfo(_))
        ));
        // A timestamp of the wrong size.
        let spec = ChallengeSpec {
            nb_computer_name: "A",
            nb_domain_name: "B",
            dns_computer_name: "a",
            dns_domain_name: "b",
            timestamp: 0,
            version: NtlmVersion::PROBE,
            server_challenge: [0; 8],
        };
        let mut msg = encode_challenge(&spec);
        let ts = msg.windows(4).rposition(|w| w == [7, 0, 8, 0]).unwrap();
        msg[ts + 2] = 4;
        assert!(parse_challenge(&msg).is_err());
    }

    #[test]
    fn a_challenge_without_version_or_target_info_still_parses() {
        // 48-byte CHALLENGE with neither fields nor payload (an old server).
        let mut msg = hex(SPEC_CHALLENGE)[..48].to_vec();
        msg[12..20].fill(0);
        msg[40..48].fill(0);
        let c = parse_challenge(&msg).unwrap();
        assert_eq!(c.nb_computer_name, None);
        assert_eq!(c.version, None);
    }

    proptest! {
        #[test]
        fn challenge_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = parse_challenge(&bytes);
        }

        #[test]
        fn challenge_parser_never_panics_on_challenge_shaped_input(
            header in proptest::collection::vec(any::<u8>(), 48..64),
            payload in proptest::collection::vec(any::<u8>(), 0..300),
            name_len in 0u16..400, name_at in 0u32..400, info_len in 0u16..400, info_at in 0u32..400,
        ) {
            let mut msg = header;
            msg[..8].copy_from_slice(SIGNATURE);
            msg[8..12].copy_from_slice(&CHALLENGE_MESSAGE.to_le_bytes());
            msg[12..14].copy_from_slice(&name_len.to_le_bytes());
            msg[16..20].copy_from_slice(&name_at.to_le_bytes());
            msg[40..42].copy_from_slice(&info_len.to_le_bytes());
            msg[44..48].copy_from_slice(&info_at.to_le_bytes());
            msg.extend_from_slice(&payload);
            let _ = parse_challenge(&msg);
        }

        #[test]
        fn challenge_round_trips(
            nb in "[A-Z0-9-]{1,15}", domain in "[A-Z]{1,15}", dns in "[a-z0-9.-]{1,60}",
            ts in any::<u64>(), build in any::<u16>(),
        ) {
            let spec = ChallengeSpec {
                nb_computer_name: &nb, nb_domain_name: &domain, dns_computer_name: &dns,
                dns_domain_name: "example.test", timestamp: ts,
                version: NtlmVersion { major: 10, minor: 0, build, ntlm_revision: 15 },
                server_challenge: [9; 8],
            };
            let c = parse_challenge(&encode_challenge(&spec)).unwrap();
            prop_assert_eq!(c.nb_computer_name.as_deref(), Some(nb.as_str()));
            prop_assert_eq!(c.dns_computer_name.as_deref(), Some(dns.as_str()));
            prop_assert_eq!(c.timestamp, Some(ts));
            prop_assert_eq!(c.version.map(|v| v.build), Some(build));
        }
    }
}
