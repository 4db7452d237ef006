//! Which peers a listener lets in: `ingest.allow`, a list of addresses and CIDR ranges
//! (`"10.0.0.5"`, `"192.168.1.0/24"`, `"::1"`), or `"*"` for every peer, on purpose.

use std::net::IpAddr;

/// One allowed address or range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Range {
    addr: IpAddr,
    prefix: u8,
}

impl Range {
    fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, canonical(ip)) {
            (IpAddr::V4(a), IpAddr::V4(b)) => prefix_eq(&a.octets(), &b.octets(), self.prefix),
            (IpAddr::V6(a), IpAddr::V6(b)) => prefix_eq(&a.octets(), &b.octets(), self.prefix),
            _ => false,
        }
    }
}

/// An IPv4 peer seen through an IPv6 socket (`::ffff:a.b.c.d`) as the IPv4 address it is.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Whether the first `bits` bits of `a` and `b` agree.
fn prefix_eq(a: &[u8], b: &[u8], bits: u8) -> bool {
    let (whole, rest) = ((bits / 8) as usize, bits % 8);
    if a[..whole] != b[..whole] {
        return false;
    }
    rest == 0 || {
        let mask = 0xffu8 << (8 - rest);
        a[whole] & mask == b[whole] & mask
    }
}

/// The peers a listener accepts: anyone, or only those inside one of its ranges.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Allowlist {
    /// `None`: every peer (`"*"`, or no list on a loopback listener).
    only: Option<Vec<Range>>,
}

impl Allowlist {
    /// Parses `ingest.allow`; an empty list allows anyone (the caller decides whether that is
    /// acceptable: it is not for a listener beyond loopback).
    pub fn parse(entries: &[String]) -> Result<Allowlist, String> {
        if entries.is_empty() || entries.iter().any(|e| e.trim() == "*") {
            return Ok(Allowlist::default());
        }
        let ranges = entries.iter().map(|e| parse_range(e.trim())).collect::<Result<Vec<_>, _>>()?;
        Ok(Allowlist { only: Some(ranges) })
    }

    /// Whether `ip` may connect.
    pub fn allows(&self, ip: IpAddr) -> bool {
        self.only.as_ref().is_none_or(|ranges| ranges.iter().any(|r| r.contains(ip)))
    }

    /// Whether any peer may connect.
    pub fn is_anyone(&self) -> bool {
        self.only.is_none()
    }
}

fn parse_range(entry: &str) -> Result<Range, String> {
    let bad = |why: &str| {
        format!("ingest.allow: {entry:?} {why}; use an address (10.0.0.5), a range (10.0.0.0/24) or \"*\"")
    };
    let (addr, prefix) = match entry.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (entry, None),
    };
    let addr: IpAddr = addr.parse().map_err(|_| bad("is not an IP address"))?;
    let addr = canonical(addr);
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        None => max,
        Some(p) => {
            p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(|| bad("has a bad prefix length"))?
        }
    };
    Ok(Range { addr, prefix })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(e: &[&str]) -> Allowlist {
        Allowlist::parse(&e.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn addresses_and_ranges_are_matched_by_prefix() {
        let a = list(&["10.0.0.5", "192.168.1.0/24", "172.16.0.0/12", "fd00::/8"]);
        for yes in ["10.0.0.5", "192.168.1.200", "172.31.255.1", "::ffff:10.0.0.5", "fd12::1"] {
            assert!(a.allows(ip(yes)), "{yes}");
        }
        for no in ["10.0.0.6", "192.168.2.1", "172.32.0.1", "127.0.0.1", "fe80::1"] {
            assert!(!a.allows(ip(no)), "{no}");
        }
        assert!(list(&["0.0.0.0/0"]).allows(ip("8.8.8.8")));
        assert!(list(&["127.0.0.1", "*"]).is_anyone() && list(&[]).is_anyone());
    }

    #[test]
    fn nonsense_is_refused_with_the_key_named() {
        for bad in ["10.0.0", "10.0.0.0/33", "::1/129", "host.example", "10.0.0.0/", "/8", ""] {
            let e = Allowlist::parse(&[bad.to_string()]).unwrap_err();
            assert!(e.contains("ingest.allow"), "{bad}: {e}");
        }
    }
}
