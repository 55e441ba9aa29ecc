//! Domain rules: what a valid network, token, peer and name look like. Pure; no I/O.

use std::net::IpAddr;

use ipnetwork::IpNetwork;

/// A store revision (etcd's: one counter bumped by every committed write). 0 means "none".
/// The domain speaks in revisions (a map's, a peer's), so the type lives here, not in `store`.
pub type Revision = i64;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ModelError {
    #[error(
        "network name {0} is invalid: use 1-63 lowercase letters, digits and '-', starting with a letter or digit"
    )]
    NetworkName(String),
    #[error("a network needs one IPv4 CIDR, one IPv6 CIDR, or one of each")]
    CidrCount,
    #[error("{0} is not a CIDR (expected e.g. 100.64.0.0/24 or fd7a:1::/64)")]
    CidrSyntax(String),
    #[error("{given} has host bits set; did you mean {network}?")]
    CidrHostBits { given: String, network: String },
    #[error("{0} is too small: it needs room for at least two hosts")]
    CidrTooSmall(String),
    #[error("a network takes at most one IPv4 and one IPv6 CIDR")]
    CidrFamilies,
    #[error(
        "{0} is not a unicast range that can route: use private (10/8, 172.16/12, 192.168/16), shared (100.64/10), ULA (fc00::/7) or global unicast addresses"
    )]
    CidrSpecial(String),
    #[error("tag {0} is invalid: use 1-63 letters, digits and '-', '_', ':', '.'")]
    Tag(String),
    #[error("at most {MAX_TAGS} tags")]
    TagCount,
    #[error("public key must be 32 bytes, got {0}")]
    PublicKey(usize),
    #[error("public_key is not a usable Curve25519 key ({0})")]
    PublicKeyUnusable(&'static str),
    #[error(
        "hostname {0} is invalid: use at most 253 letters, digits and '-', '_', '.' (empty is allowed)"
    )]
    Hostname(String),
    #[error("endpoint {0} {1}")]
    Endpoint(String, &'static str),
    #[error("unknown plan {0}: choose free, team or business")]
    Plan(String),
    #[error("unknown or missing scope {0}: choose admin or read")]
    Scope(String),
    #[error("{0}")]
    Field(String),
    #[error("{0} is not an email address")]
    Email(String),
}

pub fn validate_network_name(name: &str) -> Result<(), ModelError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && name.as_bytes()[0] != b'-';
    if ok {
        Ok(())
    } else {
        Err(ModelError::NetworkName(canopy_proto::text::quoted(name)))
    }
}

/// Parses a network's CIDRs: one IPv4 and/or one IPv6, each a network address with room for hosts.
pub fn parse_cidrs(cidrs: &[String]) -> Result<Vec<IpNetwork>, ModelError> {
    if cidrs.is_empty() || cidrs.len() > 2 {
        return Err(ModelError::CidrCount);
    }
    let mut out: Vec<IpNetwork> = Vec::new();
    for c in cidrs {
        let net = parse_cidr(c)?;
        if out.iter().any(|o| o.is_ipv4() == net.is_ipv4()) {
            return Err(ModelError::CidrFamilies);
        }
        out.push(net);
    }
    Ok(out)
}

pub fn parse_cidr(c: &str) -> Result<IpNetwork, ModelError> {
    let c = c.trim();
    if !c.contains('/') {
        return Err(ModelError::CidrSyntax(canopy_proto::text::quoted(c)));
    }
    let net: IpNetwork = c
        .parse()
        .map_err(|_| ModelError::CidrSyntax(canopy_proto::text::quoted(c)))?;
    if net.network() != net.ip() {
        return Err(ModelError::CidrHostBits {
            given: c.to_string(),
            network: format!("{}/{}", net.network(), net.prefix()),
        });
    }
    let max_prefix = if net.is_ipv4() { 30 } else { 126 };
    if net.prefix() > max_prefix {
        return Err(ModelError::CidrTooSmall(c.to_string()));
    }
    if !is_routable_unicast(&net) {
        return Err(ModelError::CidrSpecial(net.to_string()));
    }
    Ok(net)
}

/// Whether two CIDRs share any address.
pub fn overlaps(a: &IpNetwork, b: &IpNetwork) -> bool {
    a.is_ipv4() == b.is_ipv4() && (a.contains(b.network()) || b.contains(a.network()))
}

/// Tags a join token (and so a peer) may carry: every peer's tags travel in every map.
pub const MAX_TAGS: usize = 8;

pub fn validate_tags(tags: &[String]) -> Result<(), ModelError> {
    if tags.len() > MAX_TAGS {
        return Err(ModelError::TagCount);
    }
    for t in tags {
        if !canopy_policy::valid_tag(t) {
            return Err(ModelError::Tag(canopy_proto::text::quoted(t)));
        }
    }
    Ok(())
}

/// A WireGuard public key: 32 bytes, a canonical Curve25519 u-coordinate (below p = 2^255-19),
/// and not of small order (a peer with such a key could never complete a handshake, and the
/// all-zero key is what a client sends by mistake).
pub fn validate_public_key(key: &[u8]) -> Result<[u8; 32], ModelError> {
    let k: [u8; 32] = key
        .try_into()
        .map_err(|_| ModelError::PublicKey(key.len()))?;
    if k == [0; 32] {
        return Err(ModelError::PublicKeyUnusable("all zero"));
    }
    // Little-endian u ≥ p: the top bit set, or 0x7f ff…ff followed by a low byte ≥ 0xed.
    let at_least_p = k[31] == 0x7f && k[1..31].iter().all(|b| *b == 0xff) && k[0] >= 0xed;
    if k[31] & 0x80 != 0 || at_least_p {
        return Err(ModelError::PublicKeyUnusable("not canonical"));
    }
    // Any clamped scalar times a point of small order (on the curve or its twist) is zero.
    if x25519_dalek::x25519([0x42; 32], k) == [0; 32] {
        return Err(ModelError::PublicKeyUnusable("small order"));
    }
    Ok(k)
}

/// A hostname as agents report it: empty, or up to 253 bytes of DNS-ish characters. Nothing
/// that could rewrite a terminal or forge a line is stored.
pub fn validate_hostname(h: &str) -> Result<(), ModelError> {
    let ok = h.len() <= 253
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ModelError::Hostname(canopy_proto::text::quoted(h)))
    }
}

/// An endpoint an agent reports or a peer is configured with: `IP:PORT` where the IP can be
/// sent to (not unspecified, broadcast or multicast) and the port is not 0.
pub fn parse_endpoint(e: &str) -> Result<std::net::SocketAddr, ModelError> {
    let bad = |why| ModelError::Endpoint(canopy_proto::text::quoted(e), why);
    let sa: std::net::SocketAddr = e.parse().map_err(|_| bad("is not IP:PORT"))?;
    if sa.port() == 0 {
        return Err(bad("has port 0"));
    }
    let ip = match sa.ip() {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    let unusable = match ip {
        IpAddr::V4(v4) => {
            v4.is_unspecified() || v4.is_broadcast() || v4.is_multicast() || v4.octets()[0] == 0
        }
        IpAddr::V6(v6) => v6.is_unspecified() || v6.is_multicast(),
    };
    if unusable {
        return Err(bad("is an unspecified, broadcast or multicast address"));
    }
    Ok(sa)
}

/// Ranges an overlay may never use: they do not route as unicast (loopback, link-local,
/// multicast, reserved, "this network"), or are set aside for documentation and benchmarks.
const SPECIAL_V4: [&str; 10] = [
    "0.0.0.0/8",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "192.0.0.0/24",
    "192.0.2.0/24",
    "198.18.0.0/15",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "224.0.0.0/4",
    "240.0.0.0/4",
];
const PRIVATE_V4: [&str; 4] = [
    "10.0.0.0/8",
    "172.16.0.0/12",
    "192.168.0.0/16",
    "100.64.0.0/10",
];
/// IPv6: unique local addresses, or global unicast less documentation and 6to4.
const ALLOWED_V6: [&str; 2] = ["fc00::/7", "2000::/3"];
const SPECIAL_V6: [&str; 3] = ["2001:db8::/32", "2002::/16", "2001::/32"];

fn within_any(net: &IpNetwork, list: &[&str]) -> bool {
    list.iter()
        .filter_map(|r| r.parse::<IpNetwork>().ok())
        .any(|r| {
            r.is_ipv4() == net.is_ipv4() && r.contains(net.network()) && r.prefix() <= net.prefix()
        })
}

fn overlaps_any(net: &IpNetwork, list: &[&str]) -> bool {
    list.iter()
        .filter_map(|r| r.parse::<IpNetwork>().ok())
        .any(|r| overlaps(&r, net))
}

/// Whether an overlay may use `net`: private, shared or global unicast space only.
pub fn is_routable_unicast(net: &IpNetwork) -> bool {
    match net {
        IpNetwork::V4(_) => {
            within_any(net, &PRIVATE_V4) || !overlaps_any(net, &SPECIAL_V4) && net.prefix() >= 4
        }
        IpNetwork::V6(_) => within_any(net, &ALLOWED_V6) && !overlaps_any(net, &SPECIAL_V6),
    }
}

/// An e-mail address as a sign-up gives it: `local@domain`, at most 254 bytes, printable ASCII
/// with no spaces, a domain of dot-separated DNS labels (at least two, none empty).
pub fn validate_email(e: &str) -> Result<(), ModelError> {
    let bad = || ModelError::Email(canopy_proto::text::quoted(e));
    if e.len() > 254 || !e.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad());
    }
    let (local, domain) = e.rsplit_once('@').ok_or_else(bad)?;
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    let labels: Vec<&str> = domain.split('.').collect();
    if local.is_empty()
        || local.len() > 64
        || local.contains('@')
        || labels.len() < 2
        || !labels.iter().all(|l| label_ok(l))
    {
        return Err(bad());
    }
    Ok(())
}

/// The host prefix of an address: `/32` for IPv4, `/128` for IPv6.
pub fn host_prefix(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(_) => format!("{ip}/32"),
        IpAddr::V6(_) => format!("{ip}/128"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidrs(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn network_names_follow_dns_label_rules() {
        assert!(validate_network_name("prod-eu1").is_ok());
        for bad in ["", "-x", "Prod", "a b", "x".repeat(64).as_str(), "a_b"] {
            assert!(validate_network_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn cidrs_accept_one_per_family_and_explain_mistakes() {
        assert_eq!(
            parse_cidrs(&cidrs(&["100.64.0.0/24", "fd7a:1::/64"]))
                .unwrap()
                .len(),
            2
        );
        assert_eq!(parse_cidrs(&cidrs(&[])), Err(ModelError::CidrCount));
        assert_eq!(
            parse_cidrs(&cidrs(&["10.0.0.0/24", "10.1.0.0/24"])),
            Err(ModelError::CidrFamilies)
        );
        assert_eq!(
            parse_cidrs(&cidrs(&["100.64.0.5/24"])),
            Err(ModelError::CidrHostBits {
                given: "100.64.0.5/24".into(),
                network: "100.64.0.0/24".into()
            })
        );
        assert!(matches!(
            parse_cidrs(&cidrs(&["100.64.0.0"])),
            Err(ModelError::CidrSyntax(_))
        ));
        assert!(matches!(
            parse_cidrs(&cidrs(&["banana/8"])),
            Err(ModelError::CidrSyntax(_))
        ));
        assert!(matches!(
            parse_cidrs(&cidrs(&["10.0.0.0/33"])),
            Err(ModelError::CidrSyntax(_))
        ));
        assert!(matches!(
            parse_cidrs(&cidrs(&["10.0.0.0/31"])),
            Err(ModelError::CidrTooSmall(_))
        ));
    }

    #[test]
    fn overlap_is_any_shared_address_within_a_family() {
        let p = |s: &str| parse_cidr(s).unwrap();
        assert!(overlaps(&p("10.0.0.0/8"), &p("10.1.0.0/16")));
        assert!(overlaps(&p("10.1.0.0/16"), &p("10.0.0.0/8")));
        assert!(!overlaps(&p("10.0.0.0/16"), &p("10.1.0.0/16")));
        assert!(!overlaps(&p("10.0.0.0/8"), &p("fd00::/8")));
    }

    #[test]
    fn tags_and_keys_are_checked() {
        assert!(validate_tags(&cidrs(&["env:prod", "team_a"])).is_ok());
        assert!(validate_tags(&cidrs(&["has space"])).is_err());
        assert_eq!(
            validate_public_key(&[0; 31]),
            Err(ModelError::PublicKey(31))
        );
        let tags: Vec<String> = (0..=MAX_TAGS).map(|i| format!("t{i}")).collect();
        assert_eq!(validate_tags(&tags), Err(ModelError::TagCount));
        assert!(validate_tags(&tags[..MAX_TAGS]).is_ok());
    }

    #[test]
    fn unusable_public_keys_are_refused() {
        let real = x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from([7u8; 32]));
        assert!(validate_public_key(real.as_bytes()).is_ok());
        let hex32 = |h: &str| -> [u8; 32] { hex::decode(h).unwrap().try_into().unwrap() };
        let mut one = [0u8; 32];
        one[0] = 1;
        let mut p_minus_1 = [0xffu8; 32];
        p_minus_1[0] = 0xec;
        p_minus_1[31] = 0x7f;
        let mut p = p_minus_1;
        p[0] = 0xed;
        let mut top_bit = *real.as_bytes();
        top_bit[31] |= 0x80;
        for (what, key) in [
            ("all zero", [0u8; 32]),
            ("small order", one),
            ("small order", p_minus_1),
            (
                "small order",
                hex32("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
            ),
            (
                "small order",
                hex32("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
            ),
            ("not canonical", p),
            ("not canonical", top_bit),
        ] {
            assert_eq!(
                validate_public_key(&key),
                Err(ModelError::PublicKeyUnusable(what)),
                "{}",
                hex::encode(key)
            );
        }
    }

    #[test]
    fn special_purpose_ranges_cannot_be_overlays() {
        for ok in [
            "100.64.0.0/10",
            "10.0.0.0/8",
            "172.16.5.0/24",
            "192.168.0.0/16",
            "8.8.8.0/24",
            "fd7a:115c:a1e0::/48",
            "2a01:4f8::/64",
        ] {
            assert!(parse_cidr(ok).is_ok(), "{ok}");
        }
        for bad in [
            "::/0",
            "0.0.0.0/0",
            "127.0.0.0/8",
            "224.0.0.0/4",
            "fe80::/64",
            "::ffff:0:0/96",
            "169.254.0.0/16",
            "240.0.0.0/8",
            "0.0.0.0/8",
            "192.0.2.0/24",
            "ff00::/8",
            "::1/128",
            "2001:db8::/48",
            "0.0.0.0/1",
        ] {
            assert!(
                matches!(
                    parse_cidr(bad),
                    Err(ModelError::CidrSpecial(_)) | Err(ModelError::CidrTooSmall(_))
                ),
                "{bad}: {:?}",
                parse_cidr(bad)
            );
        }
    }

    #[test]
    fn email_addresses_are_checked() {
        for ok in ["ops@acme.example", "a.b+c@sub.example.org"] {
            assert!(validate_email(ok).is_ok(), "{ok}");
        }
        for bad in [
            "a@.",
            "a@b",
            "@acme.example",
            "ops@acme.example\r\nBcc: x@y.z",
            "ops @acme.example",
            "ops@-acme.example",
            "ops@acme..example",
            "noat",
        ] {
            assert!(validate_email(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn hostnames_and_endpoints_are_checked() {
        assert!(validate_hostname("web-1.eu_west").is_ok());
        assert!(validate_hostname("").is_ok());
        for bad in ["a\x1b[2J", "x\r\ny", "bell\x07", "sp ace", &"h".repeat(254)] {
            assert!(validate_hostname(bad).is_err(), "{bad:?}");
        }
        assert!(parse_endpoint("192.0.2.1:51820").is_ok());
        assert!(parse_endpoint("[2001:db8::1]:51820").is_ok());
        for bad in [
            "255.255.255.255:51820",
            "0.0.0.0:0",
            "0.0.0.0:51820",
            "[::]:1",
            "192.0.2.1:0",
            "224.0.0.1:51820",
            "[ff02::1]:51820",
            "[::ffff:255.255.255.255]:1",
            "host:51820",
        ] {
            assert!(parse_endpoint(bad).is_err(), "{bad}");
        }
    }
}
