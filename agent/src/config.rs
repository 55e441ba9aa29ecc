//! wg-quick style configuration files: `[Interface]` and `[Peer]` sections of `Key = Value`.
//! Keys are case-insensitive as in wg-quick; every error names the line and the key.

use std::net::{SocketAddr, ToSocketAddrs};

use ipnetwork::IpNetwork;

use crate::engine::PeerConfig;
use crate::keys::decode32;

/// The interface part of a config.
#[derive(Clone, PartialEq, Eq)]
pub struct InterfaceConfig {
    pub private_key: [u8; 32],
    /// Interface addresses with their prefix (e.g. 10.0.0.1/24).
    pub addresses: Vec<IpNetwork>,
    pub listen_port: Option<u16>,
    pub mtu: Option<u16>,
    /// `DNS =`, as wg-quick reads it: addresses are the DNS servers to use while the
    /// interface is up, anything else a search domain.
    pub dns: Vec<std::net::IpAddr>,
    pub dns_search: Vec<String>,
}

impl std::fmt::Debug for InterfaceConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InterfaceConfig")
            .field("private_key", &"<redacted>")
            .field("addresses", &self.addresses)
            .field("listen_port", &self.listen_port)
            .field("mtu", &self.mtu)
            .field("dns", &self.dns)
            .field("dns_search", &self.dns_search)
            .finish()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WgConfig {
    pub interface: InterfaceConfig,
    pub peers: Vec<PeerConfig>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("line {line}{}: {message}", key.as_ref().map(|k| format!(": {k}")).unwrap_or_default())]
pub struct ConfigError {
    pub line: usize,
    pub key: Option<String>,
    pub message: String,
}

fn err(line: usize, key: Option<&str>, message: impl Into<String>) -> ConfigError {
    ConfigError {
        line,
        key: key.map(str::to_string),
        message: message.into(),
    }
}

/// wg-quick keys that canopy-agent does not act on: rejected with a clear reason rather than
/// silently ignored.
const UNSUPPORTED: &[&str] = &[
    "table",
    "preup",
    "postup",
    "predown",
    "postdown",
    "saveconfig",
    "fwmark",
];

#[derive(Clone, Copy, PartialEq, Default)]
enum Section {
    #[default]
    None,
    Interface,
    Peer,
}

pub fn parse(text: &str) -> Result<WgConfig, ConfigError> {
    let mut p = Parser::default();
    for (i, raw) in text.lines().enumerate() {
        let n = i + 1;
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        if line.starts_with('[') {
            p.section(n, line)?;
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            return Err(err(
                n,
                None,
                format!("expected 'Key = Value', got {line:?}"),
            ));
        };
        let (key, value) = (k.trim(), v.trim());
        let lk = key.to_ascii_lowercase();
        if UNSUPPORTED.contains(&lk.as_str()) {
            return Err(err(
                n,
                Some(key),
                "is a wg-quick option that canopy-agent does not support",
            ));
        }
        let e = |m: String| err(n, Some(key), m);
        match p.section {
            Section::None => {
                return Err(err(
                    n,
                    Some(key),
                    "appears before any [Interface] or [Peer] section",
                ));
            }
            Section::Interface => p.interface_key(&lk, value).map_err(e)?,
            Section::Peer => p.peer_key(&lk, value).map_err(e)?,
        }
    }
    p.finish()
}

/// What a file has said so far.
#[derive(Default)]
struct Parser {
    section: Section,
    seen_interface: usize,
    private_key: Option<[u8; 32]>,
    addresses: Vec<IpNetwork>,
    listen_port: Option<u16>,
    mtu: Option<u16>,
    dns: Vec<std::net::IpAddr>,
    dns_search: Vec<String>,
    /// (line of its [Peer], the peer, whether it had a PublicKey).
    peers: Vec<(usize, PeerConfig, bool)>,
}

impl Parser {
    fn section(&mut self, n: usize, line: &str) -> Result<(), ConfigError> {
        self.section = match line.to_ascii_lowercase().as_str() {
            "[interface]" => {
                self.seen_interface += 1;
                if self.seen_interface > 1 {
                    return Err(err(n, None, "a second [Interface] section"));
                }
                Section::Interface
            }
            "[peer]" => {
                let peer = PeerConfig {
                    public_key: [0; 32],
                    preshared_key: None,
                    endpoint: None,
                    allowed_ips: vec![],
                    persistent_keepalive: None,
                };
                self.peers.push((n, peer, false));
                Section::Peer
            }
            other => {
                return Err(err(
                    n,
                    None,
                    format!("unknown section {other}: expected [Interface] or [Peer]"),
                ));
            }
        };
        Ok(())
    }

    /// One `key = value` of [Interface]; `key` is lower case. The error names the value.
    fn interface_key(&mut self, key: &str, value: &str) -> Result<(), String> {
        match key {
            "privatekey" => self.private_key = Some(decode32(value).map_err(|x| x.to_string())?),
            "address" => {
                for a in list(value) {
                    self.addresses.push(parse_address(a)?);
                }
            }
            "listenport" => {
                self.listen_port = Some(
                    value
                        .parse()
                        .map_err(|_| format!("{value:?} is not a port (0-65535)"))?,
                )
            }
            "mtu" => {
                let m: u16 = value
                    .parse()
                    .map_err(|_| format!("{value:?} is not a number"))?;
                if !(576..=65535).contains(&m) {
                    return Err(format!("{m} is outside 576-65535"));
                }
                self.mtu = Some(m);
            }
            "dns" => {
                for d in list(value) {
                    match d.parse() {
                        Ok(ip) => self.dns.push(ip),
                        Err(_) => self.dns_search.push(search_domain(d)?),
                    }
                }
            }
            _ => return Err("unknown key in [Interface]".into()),
        }
        Ok(())
    }

    /// One `key = value` of the current [Peer]; `key` is lower case.
    fn peer_key(&mut self, key: &str, value: &str) -> Result<(), String> {
        let Some((_, peer, has_key)) = self.peers.last_mut() else {
            return Ok(());
        };
        match key {
            "publickey" => {
                peer.public_key = decode32(value).map_err(|x| x.to_string())?;
                *has_key = true;
            }
            "presharedkey" => {
                peer.preshared_key = Some(decode32(value).map_err(|x| x.to_string())?)
            }
            "endpoint" => peer.endpoint = Some(parse_endpoint(value)?),
            "allowedips" => {
                for a in list(value) {
                    peer.allowed_ips.push(parse_cidr(a)?);
                }
            }
            "persistentkeepalive" => {
                peer.persistent_keepalive = match value {
                    "off" | "0" => None,
                    v => Some(
                        v.parse()
                            .map_err(|_| format!("{v:?} is not a number of seconds or 'off'"))?,
                    ),
                }
            }
            _ => return Err("unknown key in [Peer]".into()),
        }
        Ok(())
    }

    fn finish(self) -> Result<WgConfig, ConfigError> {
        let private_key = self.private_key.ok_or_else(|| {
            err(
                0,
                Some("PrivateKey"),
                if self.seen_interface == 0 {
                    "no [Interface] section"
                } else {
                    "[Interface] has no PrivateKey"
                },
            )
        })?;
        let mut out: Vec<PeerConfig> = Vec::new();
        for (line, peer, has_key) in self.peers {
            if !has_key {
                return Err(err(line, Some("PublicKey"), "[Peer] has no PublicKey"));
            }
            if out.iter().any(|p| p.public_key == peer.public_key) {
                return Err(err(line, Some("PublicKey"), "the same peer appears twice"));
            }
            out.push(peer);
        }
        Ok(WgConfig {
            interface: InterfaceConfig {
                private_key,
                addresses: self.addresses,
                listen_port: self.listen_port,
                mtu: self.mtu,
                dns: self.dns,
                dns_search: self.dns_search,
            },
            peers: out,
        })
    }
}

/// A search domain of `DNS =`: letters, digits, '-', '_' and dots, at most 253 bytes.
fn search_domain(d: &str) -> Result<String, String> {
    let ok = d.len() <= 253
        && d.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !d.starts_with('.');
    if ok {
        Ok(d.to_string())
    } else {
        Err(format!(
            "{d:?} is neither an IP address (a DNS server) nor a search domain"
        ))
    }
}

fn list(v: &str) -> impl Iterator<Item = &str> {
    v.split(',').map(str::trim).filter(|s| !s.is_empty())
}

/// An interface address: `10.0.0.1/24`, or a bare address (a host prefix).
fn parse_address(s: &str) -> Result<IpNetwork, String> {
    if s.contains('/') {
        s.parse()
            .map_err(|_| format!("{s:?} is not an address with a prefix (e.g. 10.0.0.1/24)"))
    } else {
        let ip: std::net::IpAddr = s
            .parse()
            .map_err(|_| format!("{s:?} is not an IP address"))?;
        Ok(IpNetwork::from(ip))
    }
}

/// An allowed-IPs entry; host bits are cleared (as `wg` does).
pub fn parse_cidr(s: &str) -> Result<IpNetwork, String> {
    let n = parse_address(s)?;
    IpNetwork::new(n.network(), n.prefix()).map_err(|e| format!("{s:?}: {e}"))
}

pub fn parse_endpoint(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    if s.rsplit_once(':')
        .is_none_or(|(_, p)| p.parse::<u16>().is_err())
    {
        return Err(format!("{s:?} is not HOST:PORT"));
    }
    s.to_socket_addrs()
        .map_err(|e| format!("cannot resolve {s:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("{s:?} resolves to no address"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
    const PEER: &str = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=";

    #[test]
    fn a_full_wg_quick_file_parses() {
        let text = format!(
            "# comment\n[Interface]\nPrivateKey = {KEY}\nAddress = 10.0.0.1/24, fd00::1/64\nListenPort = 51820\nMTU = 1420\n\n\
             [Peer]\nPublicKey = {PEER}\nPresharedKey = {KEY}\nEndpoint = [2001:db8::1]:51820\nAllowedIPs = 10.0.0.2/32, 10.9.0.5/16\nPersistentKeepalive = 25\n\n\
             [peer]\npublickey = {KEY}\nendpoint = 192.0.2.1:51821\nallowedips = 10.0.0.3/32 # trailing comment\n"
        );
        let c = parse(&text).unwrap();
        assert_eq!(c.interface.addresses.len(), 2);
        assert_eq!(
            (c.interface.listen_port, c.interface.mtu),
            (Some(51820), Some(1420))
        );
        assert_eq!(c.peers.len(), 2);
        assert_eq!(
            c.peers[0].endpoint,
            Some("[2001:db8::1]:51820".parse().unwrap())
        );
        assert_eq!(
            c.peers[0].allowed_ips[1].to_string(),
            "10.9.0.0/16",
            "host bits cleared"
        );
        assert_eq!(c.peers[0].persistent_keepalive, Some(25));
        assert!(c.peers[0].preshared_key.is_some());
    }

    #[test]
    fn dns_takes_servers_and_search_domains_like_wg_quick() {
        let text = format!(
            "[Interface]\nPrivateKey = {KEY}\nDNS = 10.0.0.53, fd00::53, corp.example\nDNS = lab\n"
        );
        let c = parse(&text).unwrap().interface;
        assert_eq!(
            c.dns,
            [
                "10.0.0.53".parse::<std::net::IpAddr>().unwrap(),
                "fd00::53".parse().unwrap()
            ]
        );
        assert_eq!(c.dns_search, ["corp.example", "lab"]);
    }

    #[test]
    fn errors_name_the_line_and_the_key() {
        let cases = [
            (
                format!("[Interface]\nPrivateKey = {KEY}\nListenPort = 99999\n"),
                "line 3: ListenPort: \"99999\" is not a port (0-65535)",
            ),
            (
                format!("[Interface]\nPrivateKey = {KEY}\n[Peer]\nPublicKey = abc\n"),
                "line 4: PublicKey: key is not valid base64",
            ),
            (
                format!(
                    "[Interface]\nPrivateKey = {KEY}\n[Peer]\nPublicKey = {PEER}\nAllowedIPs = 10.0.0.0/33\n"
                ),
                "line 5: AllowedIPs: \"10.0.0.0/33\" is not an address with a prefix (e.g. 10.0.0.1/24)",
            ),
            (
                format!("[Interface]\nPrivateKey = {KEY}\nColour = blue\n"),
                "line 3: Colour: unknown key in [Interface]",
            ),
            (
                format!("[Interface]\nPrivateKey = {KEY}\nPostUp = iptables -A\n"),
                "line 3: PostUp: is a wg-quick option that canopy-agent does not support",
            ),
            (
                format!("[Interface]\nPrivateKey = {KEY}\n[Peer]\nEndpoint = nowhere\n"),
                "line 4: Endpoint: \"nowhere\" is not HOST:PORT",
            ),
            (
                format!("[Interface]\nPrivateKey = {KEY}\n[Peer]\nAllowedIPs = 10.0.0.2/32\n"),
                "line 3: PublicKey: [Peer] has no PublicKey",
            ),
            (
                "[Interface]\nAddress = 10.0.0.1/24\n".to_string(),
                "line 0: PrivateKey: [Interface] has no PrivateKey",
            ),
            (
                format!("PrivateKey = {KEY}\n"),
                "line 1: PrivateKey: appears before any [Interface] or [Peer] section",
            ),
            (
                format!("[Interface]\nPrivateKey = {KEY}\n[Peers]\n"),
                "line 3: unknown section [peers]: expected [Interface] or [Peer]",
            ),
            (
                format!(
                    "[Interface]\nPrivateKey = {KEY}\n[Peer]\nPublicKey = {PEER}\n[Peer]\nPublicKey = {PEER}\n"
                ),
                "line 5: PublicKey: the same peer appears twice",
            ),
            (
                format!("[Interface]\nPrivateKey = {KEY}\nMTU = 100\n"),
                "line 3: MTU: 100 is outside 576-65535",
            ),
            (
                format!("[Interface]\nPrivateKey = {KEY}\nDNS = 10.0.0.53, corp example\n"),
                "line 3: DNS: \"corp example\" is neither an IP address (a DNS server) nor a search domain",
            ),
        ];
        for (text, want) in cases {
            assert_eq!(parse(&text).unwrap_err().to_string(), want);
        }
    }
}
