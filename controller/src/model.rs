//! Domain rules: what a valid network, token, peer and name look like. Pure; no I/O.

use std::net::IpAddr;

use ipnetwork::IpNetwork;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ModelError {
    #[error(
        "network name {0:?} is invalid: use 1-63 lowercase letters, digits and '-', starting with a letter or digit"
    )]
    NetworkName(String),
    #[error("a network needs one IPv4 CIDR, one IPv6 CIDR, or one of each")]
    CidrCount,
    #[error("{0:?} is not a CIDR (expected e.g. 100.64.0.0/24 or fd7a:1::/64)")]
    CidrSyntax(String),
    #[error("{given} has host bits set; did you mean {network}?")]
    CidrHostBits { given: String, network: String },
    #[error("{0} is too small: it needs room for at least two hosts")]
    CidrTooSmall(String),
    #[error("a network takes at most one IPv4 and one IPv6 CIDR")]
    CidrFamilies,
    #[error("tag {0:?} is invalid: use 1-63 letters, digits and '-', '_', ':', '.'")]
    Tag(String),
    #[error("public key must be 32 bytes, got {0}")]
    PublicKey(usize),
    #[error("hostname is longer than 253 characters")]
    Hostname,
    #[error("unknown plan {0:?}: choose free, team or business")]
    Plan(String),
    #[error("unknown scope {0:?}: choose admin or read")]
    Scope(String),
    #[error("{0}")]
    Field(String),
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
        Err(ModelError::NetworkName(name.to_string()))
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
        return Err(ModelError::CidrSyntax(c.to_string()));
    }
    let net: IpNetwork = c
        .parse()
        .map_err(|_| ModelError::CidrSyntax(c.to_string()))?;
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
    Ok(net)
}

/// Whether two CIDRs share any address.
pub fn overlaps(a: &IpNetwork, b: &IpNetwork) -> bool {
    a.is_ipv4() == b.is_ipv4() && (a.contains(b.network()) || b.contains(a.network()))
}

pub fn validate_tags(tags: &[String]) -> Result<(), ModelError> {
    for t in tags {
        let ok = !t.is_empty()
            && t.len() <= 63
            && t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_:.".contains(&b));
        if !ok {
            return Err(ModelError::Tag(t.clone()));
        }
    }
    Ok(())
}

pub fn validate_public_key(key: &[u8]) -> Result<[u8; 32], ModelError> {
    key.try_into().map_err(|_| ModelError::PublicKey(key.len()))
}

pub fn validate_hostname(h: &str) -> Result<(), ModelError> {
    if h.len() > 253 {
        Err(ModelError::Hostname)
    } else {
        Ok(())
    }
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
        assert!(validate_public_key(&[0; 32]).is_ok());
    }
}
