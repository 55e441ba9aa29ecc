//! Peer names in DNS (pure): the label a hostname gives, the one a peer gets when others hold
//! it, a network's zone. Agents answer `LABEL.ZONE` for every peer in their map.

use std::collections::HashSet;

use canopy_proto::v1::NetworkRecord;

/// The zone every network without one of its own is under: `NAME.canopy`.
pub const DEFAULT_SUFFIX: &str = "canopy";

/// At most this long, so "-NNNN" still fits in a DNS label (63).
const LABEL_MAX: usize = 56;

/// The DNS label a hostname gives: its first label, lowercased, anything but letters, digits
/// and '-' made '-', no '-' at either end, at most 56 bytes; "peer" when nothing is left.
pub fn label(hostname: &str) -> String {
    let first = hostname.split('.').next().unwrap_or("");
    let mapped: String = first
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9') => c,
            _ => '-',
        })
        .take(LABEL_MAX)
        .collect();
    let trimmed = mapped.trim_matches('-');
    if trimmed.is_empty() {
        "peer".to_string()
    } else {
        trimmed.to_string()
    }
}

/// The name a new peer with `hostname` gets when `taken` are held: the hostname's label, else
/// the label with the lowest free suffix from 2 ("web", "web-2", "web-3", …). Deterministic:
/// the first to enroll keeps the plain name, and no name changes while its peer exists.
pub fn pick(hostname: &str, taken: &HashSet<String>) -> String {
    let base = label(hostname);
    if !taken.contains(&base) {
        return base;
    }
    (2u64..)
        .map(|n| format!("{base}-{n}"))
        .find(|c| !taken.contains(c))
        .unwrap_or(base)
}

/// A network's DNS zone: the one set for it, else `NAME.canopy`.
pub fn zone(net: &NetworkRecord) -> String {
    if net.dns_domain.is_empty() {
        format!("{}.{DEFAULT_SUFFIX}", label(&net.name))
    } else {
        net.dns_domain.clone()
    }
}

/// A peer's name in its zone: the one it was given, else (enrolled before names existed) its
/// hostname's label.
pub fn peer_name(p: &canopy_proto::v1::PeerRecord) -> String {
    if p.dns_name.is_empty() {
        label(&p.hostname)
    } else {
        p.dns_name.clone()
    }
}

/// Checks a zone for `canopy network set-dns`: lowercase labels of letters, digits and '-'
/// (none at either end), 1–63 bytes each, at most 200 in all (names go under it), not under
/// `local` (mDNS) or `arpa` (reverse lookups). Returns it without a trailing dot.
pub fn check_zone(domain: &str) -> Result<String, String> {
    let d = domain
        .strip_suffix('.')
        .unwrap_or(domain)
        .to_ascii_lowercase();
    let bad = |why: &str| {
        Err(format!(
            "DNS domain {} is invalid: {why}",
            canopy_proto::text::quoted(domain)
        ))
    };
    if d.is_empty() || d.len() > 200 {
        return bad("use 1 to 200 characters, e.g. corp.canopy");
    }
    for l in d.split('.') {
        let ok_chars = l
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if l.is_empty() || l.len() > 63 || !ok_chars || l.starts_with('-') || l.ends_with('-') {
            return bad(
                "each label is 1 to 63 letters, digits or '-', not starting or ending with '-'",
            );
        }
    }
    let last = d.rsplit('.').next().unwrap_or("");
    if last == "local" || last == "arpa" {
        return bad("names under .local (mDNS) and .arpa are not for peers");
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hostname_gives_its_first_label_made_dns_safe() {
        assert_eq!(label("web1"), "web1");
        assert_eq!(label("Web_1.eu-west.example"), "web-1");
        assert_eq!(label("-db-"), "db");
        assert_eq!(label(""), "peer");
        assert_eq!(label("___"), "peer");
        assert_eq!(label("héllo"), "h-llo");
        assert_eq!(label(&"a".repeat(300)).len(), 56);
    }

    #[test]
    fn duplicates_take_the_lowest_free_suffix_from_two() {
        let taken = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<HashSet<_>>();
        assert_eq!(pick("web", &taken(&[])), "web");
        assert_eq!(pick("web", &taken(&["web"])), "web-2");
        assert_eq!(pick("WEB.corp", &taken(&["web", "web-2"])), "web-3");
        assert_eq!(
            pick("web", &taken(&["web", "web-3"])),
            "web-2",
            "a freed suffix is reused"
        );
        assert_eq!(pick("web-2", &taken(&["web-2"])), "web-2-2");
    }

    #[test]
    fn a_network_zone_defaults_to_its_name_under_canopy() {
        let mut n = NetworkRecord {
            name: "prod".into(),
            ..Default::default()
        };
        assert_eq!(zone(&n), "prod.canopy");
        n.dns_domain = "corp.example".into();
        assert_eq!(zone(&n), "corp.example");
    }

    #[test]
    fn zones_are_checked() {
        assert_eq!(check_zone("Corp.Canopy.").unwrap(), "corp.canopy");
        assert_eq!(check_zone("internal").unwrap(), "internal");
        for bad in [
            "",
            ".",
            "a..b",
            "-a.b",
            "a-.b",
            "a b.c",
            "a_b.c",
            "printers.local",
            "10.in-addr.arpa",
            &"a.".repeat(101),
            &format!("{}.c", "x".repeat(64)),
        ] {
            assert!(check_zone(bad).is_err(), "{bad:?}");
        }
    }
}
