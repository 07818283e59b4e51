//! How much of the public internet a set of source prefixes reaches: the one computation
//! behind the NSG repair's prefix check and the `rdp_open_to_internet` finding.
//!
//! Prefixes are judged by what they cover, not by how they are spelled: `0.0.0.0/1` plus
//! `128.0.0.0/1`, `::0/0` or `1.0.0.0/2` are as open as `*`. Address sets are kept as sorted,
//! disjoint intervals per family, so unions, differences and sizes are exact.

use std::net::IpAddr;

use ipnet::IpNet;

/// The most public address space a source set may cover: a prefix length per family
/// (the default allows at most a /16 of public IPv4 and a /32 of public IPv6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExposureLimit {
    /// Largest public IPv4 block, as a prefix length (0–32).
    pub v4_prefix: u8,
    /// Largest public IPv6 block, as a prefix length (0–128).
    pub v6_prefix: u8,
}

impl Default for ExposureLimit {
    fn default() -> Self {
        Self {
            v4_prefix: 16,
            v6_prefix: 32,
        }
    }
}

impl ExposureLimit {
    fn max_v4(&self) -> u128 {
        1u128 << (32 - u32::from(self.v4_prefix.min(32)))
    }

    fn max_v6(&self) -> u128 {
        match 128 - u32::from(self.v6_prefix.min(128)) {
            128 => u128::MAX,
            bits => 1u128 << bits,
        }
    }

    /// Human form for messages, e.g. `a /16 of public IPv4 or a /32 of public IPv6`.
    pub fn describe(&self) -> String {
        format!(
            "a /{} of public IPv4 or a /{} of public IPv6",
            self.v4_prefix, self.v6_prefix
        )
    }
}

static CONFIGURED: std::sync::OnceLock<ExposureLimit> = std::sync::OnceLock::new();

/// Sets the operator-wide limit once at start-up (`--max-public-source-v4-prefix`,
/// `--max-public-source-v6-prefix`); it may only be stricter than the default, which the CRD
/// enforces per entry at admission. Returns `false` when it was set already.
pub fn configure(limit: ExposureLimit) -> bool {
    CONFIGURED.set(limit).is_ok()
}

/// The operator-wide limit: the configured one, or the default.
pub fn configured() -> ExposureLimit {
    CONFIGURED.get().copied().unwrap_or_default()
}

/// Spellings that mean "every address": the wildcard and the service tag naming the internet.
pub fn names_the_internet(prefix: &str) -> bool {
    matches!(
        prefix.trim().to_ascii_lowercase().as_str(),
        "*" | "any" | "internet"
    )
}

/// A set of addresses: sorted, disjoint, inclusive intervals per family.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddressSet {
    v4: Vec<(u128, u128)>,
    v6: Vec<(u128, u128)>,
}

const V4_MAX: u128 = u32::MAX as u128;

impl AddressSet {
    /// Every IPv4 and IPv6 address.
    pub fn everything() -> Self {
        Self {
            v4: vec![(0, V4_MAX)],
            v6: vec![(0, u128::MAX)],
        }
    }

    /// The set of one network.
    pub fn of_net(net: IpNet) -> Self {
        match net.trunc() {
            IpNet::V4(n) => Self {
                v4: vec![(
                    u128::from(u32::from(n.network())),
                    u128::from(u32::from(n.broadcast())),
                )],
                v6: Vec::new(),
            },
            IpNet::V6(n) => Self {
                v4: Vec::new(),
                v6: vec![(u128::from(n.network()), u128::from(n.broadcast()))],
            },
        }
    }

    /// The set of one address.
    pub fn of_addr(addr: IpAddr) -> Self {
        Self::of_net(IpNet::from(addr))
    }

    /// Parses an address or CIDR (host bits allowed, as ARM allows them).
    pub fn parse(prefix: &str) -> Option<Self> {
        let p = prefix.trim();
        p.parse::<IpNet>()
            .ok()
            .or_else(|| p.parse::<IpAddr>().ok().map(IpNet::from))
            .map(Self::of_net)
    }

    /// Whether the set holds no address.
    pub fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }

    /// Addresses in either set.
    pub fn union(&self, other: &Self) -> Self {
        Self {
            v4: merge(self.v4.iter().chain(&other.v4).copied().collect()),
            v6: merge(self.v6.iter().chain(&other.v6).copied().collect()),
        }
    }

    /// Addresses in both sets.
    pub fn intersection(&self, other: &Self) -> Self {
        Self {
            v4: intersect(&self.v4, &other.v4),
            v6: intersect(&self.v6, &other.v6),
        }
    }

    /// Addresses in `self` but not in `other`.
    pub fn difference(&self, other: &Self) -> Self {
        Self {
            v4: subtract(&self.v4, &other.v4),
            v6: subtract(&self.v6, &other.v6),
        }
    }

    /// How many public addresses the set holds, per family (IPv6 saturates at `u128::MAX`).
    pub fn public_size(&self) -> (u128, u128) {
        let public = self.intersection(&public_internet());
        (size(&public.v4), size(&public.v6))
    }

    /// Whether the set covers more public address space than `limit` allows.
    pub fn exceeds(&self, limit: ExposureLimit) -> bool {
        let (v4, v6) = self.public_size();
        v4 > limit.max_v4() || v6 > limit.max_v6()
    }
}

/// The addresses routed on the public internet: everything but private, shared, loopback,
/// link-local, multicast and reserved IPv4 ranges, and IPv6 global unicast (`2000::/3`).
pub fn public_internet() -> AddressSet {
    let not_public = [
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "224.0.0.0/4",
        "240.0.0.0/4",
    ]
    .iter()
    .filter_map(|p| AddressSet::parse(p))
    .fold(AddressSet::default(), |acc, s| acc.union(&s));
    let v4 = AddressSet {
        v4: vec![(0, V4_MAX)],
        v6: Vec::new(),
    }
    .difference(&not_public);
    v4.union(&AddressSet::parse("2000::/3").unwrap_or_default())
}

/// What a list of prefixes (as written in a spec or a rule) covers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Coverage {
    /// The addresses named by IPs and CIDRs (and by the wildcard or `Internet`).
    pub addresses: AddressSet,
    /// Entries naming the whole internet (`*`, `Any`, `Internet`).
    pub internet: Vec<String>,
    /// Entries that are neither addresses nor the internet (other service tags).
    pub unresolved: Vec<String>,
}

impl Coverage {
    /// The union of `prefixes`.
    pub fn of<'a>(prefixes: impl IntoIterator<Item = &'a str>) -> Self {
        let mut c = Self::default();
        for p in prefixes {
            if names_the_internet(p) {
                c.internet.push(p.to_string());
                c.addresses = AddressSet::everything();
            } else if let Some(set) = AddressSet::parse(p) {
                c.addresses = c.addresses.union(&set);
            } else {
                c.unresolved.push(p.to_string());
            }
        }
        c
    }

    /// Whether the union is broader than `limit` (any entry naming the internet is).
    pub fn exceeds(&self, limit: ExposureLimit) -> bool {
        !self.internet.is_empty() || self.addresses.exceeds(limit)
    }
}

fn merge(mut v: Vec<(u128, u128)>) -> Vec<(u128, u128)> {
    v.sort_unstable();
    let mut out: Vec<(u128, u128)> = Vec::with_capacity(v.len());
    for (lo, hi) in v {
        match out.last_mut() {
            Some(last) if lo <= last.1.saturating_add(1) => last.1 = last.1.max(hi),
            _ => out.push((lo, hi)),
        }
    }
    out
}

fn intersect(a: &[(u128, u128)], b: &[(u128, u128)]) -> Vec<(u128, u128)> {
    let mut out = Vec::new();
    for &(alo, ahi) in a {
        for &(blo, bhi) in b {
            let (lo, hi) = (alo.max(blo), ahi.min(bhi));
            if lo <= hi {
                out.push((lo, hi));
            }
        }
    }
    merge(out)
}

fn subtract(a: &[(u128, u128)], b: &[(u128, u128)]) -> Vec<(u128, u128)> {
    let mut out = Vec::new();
    for &(lo, hi) in a {
        let mut start = Some(lo);
        for &(blo, bhi) in b {
            let Some(s) = start else { break };
            if bhi < s || blo > hi {
                continue;
            }
            if blo > s {
                out.push((s, blo - 1));
            }
            start = if bhi >= hi { None } else { Some(bhi + 1) };
        }
        if let Some(s) = start {
            out.push((s, hi));
        }
    }
    out
}

fn size(v: &[(u128, u128)]) -> u128 {
    v.iter().fold(0u128, |n, (lo, hi)| {
        n.saturating_add((hi - lo).saturating_add(1))
    })
}

#[cfg(test)]
mod tests {
    use rstest::rstest;

    use super::*;

    fn refused(prefixes: &[&str]) -> bool {
        Coverage::of(prefixes.iter().copied()).exceeds(ExposureLimit::default())
    }

    #[rstest]
    #[case::two_halves(&["0.0.0.0/1", "128.0.0.0/1"])]
    #[case::v6_everything(&["::0/0"])]
    #[case::quarter(&["1.0.0.0/2"])]
    #[case::star(&["*"])]
    #[case::internet_tag(&["Internet"])]
    #[case::any(&["Any"])]
    #[case::v4_zero(&["0.0.0.0/0"])]
    #[case::a_15(&["198.0.0.0/15"])]
    #[case::three_17s(&["203.0.0.0/17", "203.0.128.0/17", "198.51.0.0/17"])]
    #[case::v6_31(&["2001:db8::/31"])]
    #[case::host_bits_set(&["203.0.113.9/8"])]
    #[case::private_and_public_mix(&["10.0.0.0/7"])]
    fn broad_public_sets_are_refused(#[case] prefixes: &[&str]) {
        assert!(refused(prefixes), "{prefixes:?}");
    }

    #[rstest]
    #[case::private_24(&["10.1.2.0/24"])]
    #[case::all_of_rfc1918(&["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"])]
    #[case::public_24(&["203.0.113.0/24"])]
    #[case::exactly_a_16(&["198.51.0.0/17", "198.51.128.0/17"])]
    #[case::overlap_counts_once(&["198.51.0.0/16", "198.51.100.0/24"])]
    #[case::single_address(&["198.51.100.7"])]
    #[case::v6_48(&["2001:db8:1::/48"])]
    #[case::ula(&["fd00::/8"])]
    fn narrow_or_private_sets_are_accepted(#[case] prefixes: &[&str]) {
        assert!(!refused(prefixes), "{prefixes:?}");
    }

    #[test]
    fn public_size_subtracts_private_ranges() {
        let (v4, v6) = AddressSet::parse("0.0.0.0/0").unwrap().public_size();
        let private: u128 = (1 << 24) * 3 + (1 << 22) + (1 << 16) + (1 << 20) + (1 << 16);
        assert_eq!(v4, (1u128 << 32) - private - (1 << 28) * 2);
        assert_eq!(v6, 0);
        let (_, v6) = AddressSet::parse("::/0").unwrap().public_size();
        assert_eq!(v6, 1u128 << 125);
    }

    #[test]
    fn difference_and_intersection_are_exact() {
        let all = AddressSet::parse("10.0.0.0/8").unwrap();
        let hole = AddressSet::parse("10.1.0.0/16").unwrap();
        let rest = all.difference(&hole);
        assert_eq!(rest.union(&hole), all);
        assert!(rest.intersection(&hole).is_empty());
    }

    #[test]
    fn a_looser_limit_accepts_more() {
        let wide = Coverage::of(["198.0.0.0/15"]);
        let limit = ExposureLimit {
            v4_prefix: 12,
            v6_prefix: 32,
        };
        assert!(!wide.exceeds(limit));
        assert!(wide.exceeds(ExposureLimit::default()));
    }
}
