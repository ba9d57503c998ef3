//! Where a webhook goes, and whether it may go there (the SSRF guard): endpoint URLs, CIDR
//! blocks and the address policy.
//!
//! A leaf: pure parsing and checks, no I/O and no other ringwire module, so that `config`
//! validates with the same parsers `webhook` dials with and neither imports the other's
//! direction. (Host-name resolution is `webhook::resolver`'s.)
//!
//! A URL is parsed once at start-up. Before each connect the host is resolved (literal IPs
//! need no lookup), every address is checked against the policy, and the socket dials exactly
//! a vetted address, so a DNS answer that changes between check and connect (rebinding)
//! cannot bypass the guard. Non-public ranges (loopback, private, link-local, CGNAT, ULA,
//! multicast, documentation, …, IPv4-mapped forms canonicalised first; the IANA
//! special-purpose address registries, RFC 6890) are refused unless `allow_private_targets` or a CIDR in `allowed_cidrs` permits them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// A parsed endpoint URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `https`.
    pub tls: bool,
    /// Host name or IP literal (without brackets).
    pub host: String,
    /// Port.
    pub port: u16,
    /// Path and query, as sent in the request line.
    pub path: String,
    /// The `Host` header value.
    pub host_header: String,
}

impl Target {
    /// Parses an `http://` or `https://` URL.
    pub fn parse(url: &str) -> Result<Target, String> {
        let uri: http::Uri = url.parse().map_err(|e| format!("not a URL: {e}"))?;
        let tls = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err("the URL must start with http:// or https://".into()),
        };
        let authority = uri.authority().ok_or("the URL has no host")?;
        if authority.as_str().contains('@') {
            return Err("credentials in the URL are not supported".into());
        }
        let host = authority.host().trim_start_matches('[').trim_end_matches(']').to_string();
        if host.is_empty() {
            return Err("the URL has no host".into());
        }
        let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
        let path = if path.is_empty() { "/".into() } else { path };
        Ok(Target { tls, host, port, path, host_header: authority.as_str().to_string() })
    }

    /// The host as an IP literal, if it is one.
    pub fn literal_ip(&self) -> Option<IpAddr> {
        self.host.parse().ok()
    }
}

/// A CIDR block such as `10.0.0.0/8` or `fd00::/8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    /// Parses `address/prefix`.
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let (address, prefix) = text.split_once('/').ok_or("expected address/prefix, e.g. 10.0.0.0/8")?;
        let network: IpAddr = address.parse().map_err(|_| format!("{address} is not an IP address"))?;
        let prefix: u8 = prefix.parse().map_err(|_| format!("{prefix} is not a prefix length"))?;
        let bits = if network.is_ipv4() { 32 } else { 128 };
        if prefix > bits {
            return Err(format!("prefix /{prefix} is longer than {bits} bits"));
        }
        Ok(Cidr { network, prefix })
    }

    /// Whether `ip` is inside the block.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, canonical(ip)) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => prefix_eq(&net.octets(), &ip.octets(), self.prefix),
            (IpAddr::V6(net), IpAddr::V6(ip)) => prefix_eq(&net.octets(), &ip.octets(), self.prefix),
            _ => false,
        }
    }
}

fn prefix_eq(a: &[u8], b: &[u8], prefix: u8) -> bool {
    let (bytes, bits) = (usize::from(prefix / 8), prefix % 8);
    if a[..bytes] != b[..bytes] {
        return false;
    }
    bits == 0 || (a[bytes] ^ b[bytes]) >> (8 - bits) == 0
}

/// IPv4-mapped and IPv4-compatible IPv6 addresses become the IPv4 address they carry.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// Whether an address is publicly routable (not one an attacker could use to reach inside).
pub fn is_public(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(a == 0                                  // "this network"
        || a == 10                            // private
        || (a == 100 && (64..128).contains(&b)) // CGNAT 100.64/10
        || a == 127                           // loopback
        || (a == 169 && b == 254)             // link-local, cloud metadata
        || (a == 172 && (16..32).contains(&b)) // private
        || (a == 192 && b == 0 && c == 0)     // IETF protocol assignments
        || (a == 192 && b == 0 && c == 2)     // TEST-NET-1
        || (a == 192 && b == 88 && c == 99)   // 6to4 relay
        || (a == 192 && b == 168)             // private
        || (a == 198 && (b == 18 || b == 19)) // benchmarking
        || (a == 198 && b == 51 && c == 100)  // TEST-NET-2
        || (a == 203 && b == 0 && c == 113)   // TEST-NET-3
        || (a == 168 && b == 63 && c == 129)  // Azure host (168.63.129.16)
        || a >= 224) // multicast, reserved, broadcast
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let s = ip.segments();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || (s[0] & 0xffc0) == 0xfe80              // link-local
        || (s[0] & 0xfe00) == 0xfc00              // unique local
        || (s[0] & 0xff00) == 0xff00              // multicast
        || (s[0] == 0x2001 && s[1] == 0x0db8)     // documentation
        || (s[0] & 0xfff0) == 0x3ff0              // documentation 3fff::/20
        || (s[0] == 0x0100 && s[1] == 0 && s[2] == 0 && s[3] == 0) // discard
        || s[0] == 0x2002                         // 6to4 (embeds any IPv4)
        || (s[0] == 0x0064 && s[1] == 0xff9b)     // NAT64 (embeds any IPv4)
        || (s[0] & 0xff00) == 0x5f00              // SRv6 SIDs
        || s[..6] == [0; 6]) // IPv4-compatible and other ::/32 forms
}

/// Which addresses webhooks may reach.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddressPolicy {
    /// Every address is allowed (`allow_private_targets`).
    pub allow_private: bool,
    /// Non-public blocks allowed anyway.
    pub allowed: Vec<Cidr>,
}

impl AddressPolicy {
    /// Whether an address may be dialled.
    pub fn permits(&self, ip: IpAddr) -> bool {
        self.allow_private || is_public(ip) || self.allowed.iter().any(|c| c.contains(ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    /// Non-public ranges are refused, mapped forms included; public addresses pass.
    #[test]
    fn private_ranges_are_refused() {
        for blocked in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::127.0.0.1",
            "64:ff9b::7f00:1",
            "2002:7f00:1::",
            "2001:db8::1",
        ] {
            assert!(!is_public(ip(blocked)), "{blocked} must be refused");
        }
        for public in ["1.1.1.1", "8.8.8.8", "2606:4700:4700::1111", "::ffff:1.1.1.1", "172.32.0.1"] {
            assert!(is_public(ip(public)), "{public} is public");
        }
    }

    /// The override: everything, or listed blocks only.
    #[test]
    fn policy_overrides() {
        let default = AddressPolicy::default();
        assert!(!default.permits(ip("127.0.0.1")));
        let all = AddressPolicy { allow_private: true, allowed: vec![] };
        assert!(all.permits(ip("127.0.0.1")));
        let listed = AddressPolicy { allow_private: false, allowed: vec![Cidr::parse("127.0.0.0/8").unwrap()] };
        assert!(listed.permits(ip("127.0.0.2")));
        assert!(listed.permits(ip("::ffff:127.0.0.2")));
        assert!(!listed.permits(ip("10.0.0.1")));
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("fd00::/7").unwrap().contains(ip("fdff::1")));
        assert!(Cidr::parse("172.16.0.0/12").unwrap().contains(ip("172.31.255.255")));
        assert!(!Cidr::parse("172.16.0.0/12").unwrap().contains(ip("172.32.0.0")));
    }

    /// URLs: scheme, host (IPv6 literals too), port defaults, path with query.
    #[test]
    fn urls_parse() {
        let t = Target::parse("http://127.0.0.1:9000/hooks?x=1").unwrap();
        assert_eq!((t.tls, t.host.as_str(), t.port, t.path.as_str()), (false, "127.0.0.1", 9000, "/hooks?x=1"));
        let t = Target::parse("https://[::1]/").unwrap();
        assert_eq!((t.tls, t.host.as_str(), t.port, t.host_header.as_str()), (true, "::1", 443, "[::1]"));
        assert_eq!(Target::parse("http://example.com").unwrap().path, "/");
        assert!(Target::parse("ftp://example.com/").is_err());
        assert!(Target::parse("http://user:pw@example.com/").is_err());
        assert!(Target::parse("not a url").is_err());
    }
}
