//! Probe targets: `HOST[:PORT]`, `[IPv6]:PORT`, or a bare IPv6 address.

use std::{fmt, net::IpAddr, str::FromStr};

/// The default RDP port.
pub const DEFAULT_RDP_PORT: u16 = 3389;

/// Where to probe.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    /// Host name or IP literal (without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
}

/// Why a target string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// Empty input.
    #[error("target is empty")]
    Empty,
    /// The port is not a number in 1..=65535.
    #[error("port {0:?} is out of range (1-65535)")]
    BadPort(String),
    /// The host is not a valid name or address.
    #[error("host {0:?} is not a valid host name or IP address")]
    BadHost(String),
}

impl Target {
    /// A target from parts, validating the host.
    pub fn new(host: impl Into<String>, port: u16) -> Result<Self, TargetError> {
        let host = host.into();
        if port == 0 {
            return Err(TargetError::BadPort("0".into()));
        }
        validate_host(&host)?;
        Ok(Self { host, port })
    }

    /// The host as an IP address, when it is one.
    pub fn ip(&self) -> Option<IpAddr> {
        self.host.parse().ok()
    }
}

impl FromStr for Target {
    type Err = TargetError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.is_empty() {
            return Err(TargetError::Empty);
        }
        let (host, port) = if let Some(rest) = s.strip_prefix('[') {
            let (host, after) = rest
                .split_once(']')
                .ok_or_else(|| TargetError::BadHost(s.to_string()))?;
            if host.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(TargetError::BadHost(host.to_string()));
            }
            match after {
                "" => (host, None),
                _ => match after.strip_prefix(':') {
                    Some(p) => (host, Some(p)),
                    None => return Err(TargetError::BadHost(s.to_string())),
                },
            }
        } else if s.matches(':').count() > 1 {
            // A bare IPv6 address: no port can be given without brackets.
            (s, None)
        } else {
            match s.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (s, None),
            }
        };
        let port = match port {
            None => DEFAULT_RDP_PORT,
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n > 0 => n,
                _ => return Err(TargetError::BadPort(p.to_string())),
            },
        };
        Target::new(host, port)
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

fn validate_host(host: &str) -> Result<(), TargetError> {
    if host.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    let bad = || TargetError::BadHost(host.to_string());
    let name = host.strip_suffix('.').unwrap_or(host);
    if name.is_empty() || name.len() > 253 {
        return Err(bad());
    }
    for label in name.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok {
            return Err(bad());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rstest::rstest;

    #[rstest]
    #[case("10.0.0.4", "10.0.0.4", 3389)]
    #[case("127.0.0.1:13389", "127.0.0.1", 13389)]
    #[case("vm1.example.internal", "vm1.example.internal", 3389)]
    #[case("localhost:3390", "localhost", 3390)]
    #[case("[::1]:3390", "::1", 3390)]
    #[case("[::1]", "::1", 3389)]
    #[case("::1", "::1", 3389)]
    #[case("  host-1 ", "host-1", 3389)]
    fn parses(#[case] input: &str, #[case] host: &str, #[case] port: u16) {
        let t: Target = input.parse().unwrap();
        assert_eq!((t.host.as_str(), t.port), (host, port));
    }

    #[rstest]
    #[case("", TargetError::Empty)]
    #[case("host:0", TargetError::BadPort("0".into()))]
    #[case("host:65536", TargetError::BadPort("65536".into()))]
    #[case("host:abc", TargetError::BadPort("abc".into()))]
    #[case("host:", TargetError::BadPort("".into()))]
    #[case("bad host", TargetError::BadHost("bad host".into()))]
    #[case("-lead.example", TargetError::BadHost("-lead.example".into()))]
    #[case("[nothost]:1", TargetError::BadHost("nothost".into()))]
    #[case("a..b", TargetError::BadHost("a..b".into()))]
    fn rejects(#[case] input: &str, #[case] err: TargetError) {
        assert_eq!(input.parse::<Target>().unwrap_err(), err);
    }

    #[test]
    fn displays_with_brackets_for_ipv6() {
        assert_eq!(Target::new("::1", 5).unwrap().to_string(), "[::1]:5");
        assert_eq!(Target::new("h", 5).unwrap().to_string(), "h:5");
    }
}
