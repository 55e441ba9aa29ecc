//! The WireGuard cross-platform UAPI (the protocol `wg` speaks over
//! `/var/run/wireguard/<iface>.sock`), so `wg show` and `wg set` work against canopy-agent.
//!
//! The protocol part is pure: [`format_get`] renders the device, [`parse_set`] reads a whole
//! `set=1` request into a [`SetRequest`] before anything is applied, so a malformed request
//! changes nothing; [`SetRequest::apply`] then applies it to the engine. [`serve`] is the socket.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use ipnetwork::IpNetwork;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::UnixListener;

use crate::engine::{Engine, PeerConfig};

pub const SOCKET_DIR: &str = "/var/run/wireguard";
const EINVAL: i32 = 22;

/// Renders the `get=1` answer (without the final `errno` line).
pub fn format_get(engine: &Engine, listen_port: u16) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(s, "private_key={}", hex::encode(engine.private_key()));
    let _ = writeln!(s, "listen_port={listen_port}");
    for p in engine.peers() {
        let c = &p.config;
        let _ = writeln!(s, "public_key={}", hex::encode(c.public_key));
        if let Some(psk) = c.preshared_key {
            let _ = writeln!(s, "preshared_key={}", hex::encode(psk));
        }
        if let Some(ep) = c.endpoint {
            let _ = writeln!(s, "endpoint={ep}");
        }
        let (sec, nsec) = p
            .last_handshake
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or((0, 0), |d| (d.as_secs(), d.subsec_nanos()));
        let _ = writeln!(
            s,
            "last_handshake_time_sec={sec}\nlast_handshake_time_nsec={nsec}"
        );
        let _ = writeln!(s, "tx_bytes={}\nrx_bytes={}", p.tx_bytes, p.rx_bytes);
        let _ = writeln!(
            s,
            "persistent_keepalive_interval={}",
            c.persistent_keepalive.unwrap_or(0)
        );
        for a in &c.allowed_ips {
            let _ = writeln!(s, "allowed_ip={a}");
        }
        let _ = writeln!(s, "protocol_version=1");
    }
    s
}

/// A parsed `set=1` request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SetRequest {
    pub private_key: Option<[u8; 32]>,
    pub listen_port: Option<u16>,
    pub replace_peers: bool,
    pub peers: Vec<PeerSet>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerSet {
    pub public_key: [u8; 32],
    pub remove: bool,
    pub update_only: bool,
    /// `Some(None)`: remove the preshared key (all-zero key).
    pub preshared_key: Option<Option<[u8; 32]>>,
    pub endpoint: Option<SocketAddr>,
    pub persistent_keepalive: Option<Option<u16>>,
    pub replace_allowed_ips: bool,
    pub allowed_ips: Vec<IpNetwork>,
}

fn hex32(key: &str, v: &str) -> Result<[u8; 32], String> {
    let b = hex::decode(v).map_err(|_| format!("{key}: not a hex key"))?;
    b.as_slice()
        .try_into()
        .map_err(|_| format!("{key}: key must be 32 bytes"))
}

fn boolean(key: &str, v: &str) -> Result<bool, String> {
    match v {
        "true" => Ok(true),
        "false" => Ok(false),
        _ => Err(format!("{key}: expected true or false, got {v:?}")),
    }
}

/// Parses the lines of a `set=1` request (after the `set=1` line, up to the blank line).
pub fn parse_set<'a>(lines: impl IntoIterator<Item = &'a str>) -> Result<SetRequest, String> {
    let mut req = SetRequest::default();
    for line in lines {
        let (k, v) = line
            .split_once('=')
            .ok_or_else(|| format!("malformed line {line:?}"))?;
        let peer = req.peers.last_mut();
        match (k, peer) {
            ("private_key", None) => req.private_key = Some(hex32(k, v)?),
            ("listen_port", None) => {
                req.listen_port = Some(
                    v.parse()
                        .map_err(|_| format!("listen_port: {v:?} is not a port"))?,
                )
            }
            ("fwmark", None) => {
                if v != "0" && !v.is_empty() {
                    return Err("fwmark is not supported".into());
                }
            }
            ("replace_peers", None) => req.replace_peers = boolean(k, v)?,
            ("public_key", _) => req.peers.push(PeerSet {
                public_key: hex32(k, v)?,
                ..Default::default()
            }),
            ("remove", Some(p)) => p.remove = boolean(k, v)?,
            ("update_only", Some(p)) => p.update_only = boolean(k, v)?,
            ("preshared_key", Some(p)) => {
                let key = hex32(k, v)?;
                p.preshared_key = Some((key != [0; 32]).then_some(key));
            }
            ("endpoint", Some(p)) => {
                p.endpoint =
                    Some(crate::config::parse_endpoint(v).map_err(|e| format!("endpoint: {e}"))?)
            }
            ("persistent_keepalive_interval", Some(p)) => {
                let n: u16 = v
                    .parse()
                    .map_err(|_| format!("persistent_keepalive_interval: {v:?} is not a number"))?;
                p.persistent_keepalive = Some((n != 0).then_some(n));
            }
            ("replace_allowed_ips", Some(p)) => p.replace_allowed_ips = boolean(k, v)?,
            ("allowed_ip", Some(p)) => p
                .allowed_ips
                .push(crate::config::parse_cidr(v).map_err(|e| format!("allowed_ip: {e}"))?),
            ("protocol_version", Some(_)) => {
                if v != "1" {
                    return Err(format!("protocol_version {v} is not supported"));
                }
            }
            (k, _) => return Err(format!("unknown or misplaced key {k:?}")),
        }
    }
    Ok(req)
}

impl SetRequest {
    /// Applies the request to the engine. Validation that needs the engine's state happens
    /// before the first change, so an error leaves the engine as it was.
    pub fn apply(self, engine: &mut Engine, listen_port: u16) -> Result<(), String> {
        if let Some(p) = self.listen_port
            && p != listen_port
        {
            return Err(format!(
                "changing the listen port of a running interface is not supported (it is {listen_port})"
            ));
        }
        if let Some(k) = self.private_key {
            engine.set_private_key(k);
        }
        if self.replace_peers {
            for k in engine.peer_keys() {
                engine.remove_peer(&k);
            }
        }
        for p in self.peers {
            if p.remove {
                engine.remove_peer(&p.public_key);
                continue;
            }
            let current = engine.peer(&p.public_key).map(|s| s.config);
            if current.is_none() && p.update_only {
                continue;
            }
            let mut c = current.unwrap_or(PeerConfig {
                public_key: p.public_key,
                preshared_key: None,
                endpoint: None,
                allowed_ips: vec![],
                persistent_keepalive: None,
            });
            if let Some(psk) = p.preshared_key {
                c.preshared_key = psk;
            }
            if p.endpoint.is_some() {
                c.endpoint = p.endpoint;
            }
            if let Some(k) = p.persistent_keepalive {
                c.persistent_keepalive = k;
            }
            if p.replace_allowed_ips {
                c.allowed_ips.clear();
            }
            for a in p.allowed_ips {
                if !c.allowed_ips.contains(&a) {
                    c.allowed_ips.push(a);
                }
            }
            engine.set_peer(c);
        }
        Ok(())
    }
}

/// What the socket asks of the device.
pub trait Device: Send + Sync + 'static {
    fn get(&self) -> String;
    fn set(&self, req: SetRequest) -> Result<(), String>;
}

pub fn socket_path(iface: &str) -> PathBuf {
    Path::new(SOCKET_DIR).join(format!("{iface}.sock"))
}

/// Binds the UAPI socket for `iface` (replacing a stale one) and serves it until dropped.
pub fn bind(iface: &str) -> std::io::Result<(UnixListener, PathBuf)> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::create_dir_all(SOCKET_DIR)?;
    let path = socket_path(iface);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok((listener, path))
}

pub async fn serve(listener: UnixListener, device: Arc<dyn Device>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let device = device.clone();
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut lines = BufReader::new(r).lines();
            while let Ok(Some(op)) = lines.next_line().await {
                let mut body = Vec::new();
                while let Ok(Some(l)) = lines.next_line().await {
                    if l.is_empty() {
                        break;
                    }
                    body.push(l);
                }
                let reply = match op.as_str() {
                    "get=1" => format!("{}errno=0\n\n", device.get()),
                    "set=1" => match parse_set(body.iter().map(String::as_str))
                        .and_then(|req| device.set(req))
                    {
                        Ok(()) => "errno=0\n\n".to_string(),
                        Err(e) => {
                            tracing::warn!(error = %e, "UAPI set refused; nothing changed");
                            format!("errno={EINVAL}\n\n")
                        }
                    },
                    other => {
                        tracing::warn!(op = %other, "unknown UAPI operation");
                        format!("errno={EINVAL}\n\n")
                    }
                };
                if w.write_all(reply.as_bytes()).await.is_err() {
                    return;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K1: &str = "0101010101010101010101010101010101010101010101010101010101010101";

    #[test]
    fn set_requests_parse_whole_or_not_at_all() {
        let r = parse_set([
            "replace_peers=true",
            &format!("public_key={K1}"),
            "endpoint=192.0.2.1:51820",
            "persistent_keepalive_interval=25",
            "replace_allowed_ips=true",
            "allowed_ip=10.0.0.2/32",
            "allowed_ip=fd00::/64",
        ])
        .unwrap();
        assert!(r.replace_peers);
        assert_eq!(r.peers[0].allowed_ips.len(), 2);
        assert_eq!(r.peers[0].persistent_keepalive, Some(Some(25)));
        for (bad, says) in [
            (vec!["public_key=zz"], "not a hex key"),
            (vec!["endpoint=1.2.3.4:5"], "misplaced"),
            (vec!["listen_port=x"], "not a port"),
            (
                vec![&*format!("public_key={K1}"), "allowed_ip=10.0.0.0/40"],
                "allowed_ip",
            ),
            (
                vec![&*format!("public_key={K1}"), "remove=maybe"],
                "true or false",
            ),
            (vec!["garbage"], "malformed"),
        ] {
            let e = parse_set(bad.iter().copied()).unwrap_err();
            assert!(e.contains(says), "{e:?} should say {says:?}");
        }
    }

    #[test]
    fn applying_a_set_updates_peers_and_get_reports_them() {
        let mut e = Engine::new([7; 32]);
        let req = parse_set([
            &*format!("public_key={K1}"),
            "endpoint=192.0.2.1:51820",
            "allowed_ip=10.0.0.2/32",
        ])
        .unwrap();
        req.apply(&mut e, 51820).unwrap();
        let out = format_get(&e, 51820);
        assert!(out.contains(&format!("public_key={K1}\n")));
        assert!(
            out.contains("endpoint=192.0.2.1:51820\n") && out.contains("allowed_ip=10.0.0.2/32\n")
        );
        // Adding an allowed IP keeps the others; removing the peer removes it.
        parse_set([&*format!("public_key={K1}"), "allowed_ip=10.0.0.3/32"])
            .unwrap()
            .apply(&mut e, 51820)
            .unwrap();
        assert_eq!(e.peers()[0].config.allowed_ips.len(), 2);
        let port_change = parse_set(["listen_port=1"]).unwrap();
        assert!(port_change.apply(&mut e, 51820).is_err());
        assert_eq!(e.peers().len(), 1, "a refused set changes nothing");
        parse_set([&*format!("public_key={K1}"), "remove=true"])
            .unwrap()
            .apply(&mut e, 51820)
            .unwrap();
        assert!(e.peers().is_empty());
    }
}
