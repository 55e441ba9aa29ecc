//! The WireGuard cross-platform UAPI (the protocol `wg` speaks over
//! `/var/run/wireguard/<iface>.sock`), so `wg show` and `wg set` work against canopy-agent.
//!
//! The protocol part is pure: [`format_get`] renders the device, [`parse_set`] reads a whole
//! `set=1` request into a [`SetRequest`] before anything is applied, so a malformed request
//! changes nothing; [`SetRequest::apply`] then applies it to the engine. [`serve`] is the socket.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use ipnetwork::IpNetwork;
use tokio::io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::UnixListener;

use crate::engine::{Engine, PeerConfig};

pub const SOCKET_DIR: &str = "/var/run/wireguard";

/// Why a `set` was refused: the errno the answer carries (negative, as wireguard-go sends it
/// and as `wg` reads it: `errno=-22` prints "Invalid argument") and what to log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct SetError {
    pub errno: i32,
    pub message: String,
}

impl SetError {
    pub const EIO: i32 = 5;
    pub const EINVAL: i32 = 22;
    pub const EADDRINUSE: i32 = 98;

    pub fn invalid(message: impl Into<String>) -> Self {
        Self {
            errno: Self::EINVAL,
            message: message.into(),
        }
    }
}

/// Renders the `get=1` answer (without the final `errno` line), key for key as wireguard-go
/// does: no `private_key` line without a key (and the key as used, clamped), a
/// `preshared_key` line for every peer (zero when none).
/// Handshake ages become wall-clock times against `now`.
pub fn format_get(engine: &Engine, listen_port: u16, fwmark: u32, now: SystemTime) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    if let Some(k) = engine.private_key() {
        let _ = writeln!(s, "private_key={}", hex::encode(k));
    }
    let _ = writeln!(s, "listen_port={listen_port}");
    if fwmark != 0 {
        let _ = writeln!(s, "fwmark={fwmark}");
    }
    for p in engine.peers() {
        let c = &p.config;
        let _ = writeln!(s, "public_key={}", hex::encode(c.public_key));
        let psk = c.preshared_key.unwrap_or([0; 32]);
        let _ = writeln!(s, "preshared_key={}\nprotocol_version=1", hex::encode(psk));
        if let Some(ep) = c.endpoint {
            let _ = writeln!(s, "endpoint={ep}");
        }
        let (sec, nsec) = p
            .since_handshake
            .and_then(|age| now.checked_sub(age))
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
    }
    s
}

/// A parsed `set=1` request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SetRequest {
    pub private_key: Option<[u8; 32]>,
    pub listen_port: Option<u16>,
    /// SO_MARK for the interface's sockets; `Some(0)` clears it.
    pub fwmark: Option<u32>,
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
        _ => Err(format!(
            "{key}: expected true or false, got {}",
            canopy_proto::text::quoted(v)
        )),
    }
}

/// Parses the lines of a `set=1` request (after the `set=1` line, up to the blank line).
pub fn parse_set<'a>(lines: impl IntoIterator<Item = &'a str>) -> Result<SetRequest, String> {
    let mut req = SetRequest::default();
    for line in lines {
        let (k, v) = line
            .split_once('=')
            .ok_or_else(|| format!("malformed line {}", canopy_proto::text::quoted(line)))?;
        let peer = req.peers.last_mut();
        match (k, peer) {
            ("private_key", None) => req.private_key = Some(hex32(k, v)?),
            ("listen_port", None) => {
                req.listen_port = Some(v.parse().map_err(|_| {
                    format!(
                        "listen_port: {} is not a port",
                        canopy_proto::text::quoted(v)
                    )
                })?)
            }
            ("fwmark", None) => {
                let mark = match v.strip_prefix("0x") {
                    Some(h) => u32::from_str_radix(h, 16),
                    None if v.is_empty() => Ok(0),
                    None => v.parse(),
                };
                req.fwmark = Some(mark.map_err(|_| {
                    format!("fwmark: {} is not a number", canopy_proto::text::quoted(v))
                })?);
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
                let n: u16 = v.parse().map_err(|_| {
                    format!(
                        "persistent_keepalive_interval: {} is not a number",
                        canopy_proto::text::quoted(v)
                    )
                })?;
                p.persistent_keepalive = Some((n != 0).then_some(n));
            }
            // In order, as wireguard-go applies it: the replace drops what came before it in
            // this request too.
            ("replace_allowed_ips", Some(p)) => {
                if boolean(k, v)? {
                    p.replace_allowed_ips = true;
                    p.allowed_ips.clear();
                }
            }
            ("allowed_ip", Some(p)) => p
                .allowed_ips
                .push(crate::config::parse_cidr(v).map_err(|e| format!("allowed_ip: {e}"))?),
            ("protocol_version", Some(_)) => {
                if v != "1" {
                    return Err(format!("protocol_version {v} is not supported"));
                }
            }
            (k, _) => {
                return Err(format!(
                    "unknown or misplaced key {}",
                    canopy_proto::text::quoted(k)
                ));
            }
        }
    }
    Ok(req)
}

impl SetRequest {
    /// Applies the request to the engine. Validation that needs the engine's state happens
    /// before the first change, so an error leaves the engine as it was. `listen_port` and
    /// `fwmark` are the device's (its socket), not the engine's: the device takes them out first.
    pub fn apply(self, engine: &mut Engine) -> Result<(), String> {
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
    fn set(&self, req: SetRequest) -> Result<(), SetError>;
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

/// The longest line a request may have: the longest real one (`allowed_ip=` with an IPv6
/// CIDR, a 64-digit key) is under 100 bytes.
pub const MAX_LINE: usize = 1024;
/// The most lines one request may have (a `wg setconf` of many peers and routes fits).
pub const MAX_LINES: usize = 1 << 20;

/// One line as read: text, or why it cannot be (it is then not kept).
#[derive(Debug, PartialEq, Eq)]
enum Line {
    Text(String),
    NotUtf8,
    TooLong,
}

/// Reads one `\n`-terminated line, holding at most `MAX_LINE` bytes of it: a longer line is
/// read to its end and dropped. `None` at the end of the stream.
async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R) -> std::io::Result<Option<Line>> {
    let mut buf = Vec::new();
    let mut too_long = false;
    loop {
        let chunk = r.fill_buf().await?;
        if chunk.is_empty() {
            return Ok((!buf.is_empty() || too_long).then(|| finish(buf, too_long)));
        }
        let (take, done) = match chunk.iter().position(|b| *b == b'\n') {
            Some(i) => (i + 1, true),
            None => (chunk.len(), false),
        };
        if !too_long {
            let body = &chunk[..if done { take - 1 } else { take }];
            if buf.len() + body.len() > MAX_LINE {
                too_long = true;
                buf = Vec::new();
            } else {
                buf.extend_from_slice(body);
            }
        }
        r.consume(take);
        if done {
            return Ok(Some(finish(buf, too_long)));
        }
    }
}

fn finish(buf: Vec<u8>, too_long: bool) -> Line {
    if too_long {
        return Line::TooLong;
    }
    match String::from_utf8(buf) {
        Ok(s) => Line::Text(s),
        Err(_) => Line::NotUtf8,
    }
}

pub async fn serve(listener: UnixListener, device: Arc<dyn Device>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let device = device.clone();
        tokio::spawn(async move {
            let (r, w) = stream.into_split();
            handle(BufReader::new(r), w, device.as_ref()).await;
        });
    }
}

/// Answers the requests of one connection. A request is all or nothing: any line that is not
/// valid (not UTF-8, too long, unknown, malformed) makes it answer errno=22 with nothing
/// applied. Untrusted input reaches the log only as a short escaped prefix.
async fn handle<R, W>(mut r: R, mut w: W, device: &dyn Device)
where
    R: tokio::io::AsyncBufRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    loop {
        let op = match read_line(&mut r).await {
            Ok(Some(Line::Text(op))) => op,
            Ok(Some(_)) => String::new(),
            Ok(None) | Err(_) => return,
        };
        let mut body = Vec::new();
        let mut bad: Option<String> = None;
        loop {
            match read_line(&mut r).await {
                Ok(Some(Line::Text(l))) if l.is_empty() => break,
                Ok(Some(Line::Text(l))) if body.len() < MAX_LINES => body.push(l),
                Ok(Some(Line::Text(_))) => {
                    bad.get_or_insert_with(|| format!("more than {MAX_LINES} lines"));
                }
                Ok(Some(Line::NotUtf8)) => {
                    bad.get_or_insert_with(|| "a line is not UTF-8".into());
                }
                Ok(Some(Line::TooLong)) => {
                    bad.get_or_insert_with(|| format!("a line is longer than {MAX_LINE} bytes"));
                }
                // The request did not end with a blank line: nothing to answer.
                Ok(None) | Err(_) => return,
            }
        }
        let reply = match (op.as_str(), bad) {
            ("get=1", None) => format!("{}errno=0\n\n", device.get()),
            ("set=1", None) => {
                let result = parse_set(body.iter().map(String::as_str))
                    .map_err(SetError::invalid)
                    .and_then(|req| device.set(req));
                match result {
                    Ok(()) => "errno=0\n\n".to_string(),
                    Err(e) => {
                        tracing::warn!(error = %canopy_proto::text::escape(&canopy_proto::text::clip(&e.message, 200)), "UAPI set refused; nothing changed");
                        format!("errno=-{}\n\n", e.errno)
                    }
                }
            }
            (_, Some(why)) => {
                tracing::warn!(reason = %why, "UAPI request refused; nothing changed");
                format!("errno=-{}\n\n", SetError::EINVAL)
            }
            (other, None) => {
                tracing::warn!(op = %canopy_proto::text::quoted(other), "unknown UAPI operation");
                format!("errno=-{}\n\n", SetError::EINVAL)
            }
        };
        if w.write_all(reply.as_bytes()).await.is_err() {
            return;
        }
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
        req.apply(&mut e).unwrap();
        let out = format_get(&e, 51820, 0, SystemTime::now());
        assert!(!out.contains("fwmark"), "no mark, no line");
        assert!(format_get(&e, 51820, 0x1234, SystemTime::now()).contains("fwmark=4660\n"));
        assert_eq!(parse_set(["fwmark=4660"]).unwrap().fwmark, Some(0x1234));
        assert_eq!(parse_set(["fwmark=0x1234"]).unwrap().fwmark, Some(0x1234));
        assert_eq!(parse_set(["fwmark=0"]).unwrap().fwmark, Some(0));
        assert!(parse_set(["fwmark=mark"]).is_err());
        assert!(out.contains(&format!("public_key={K1}\n")));
        assert!(
            out.contains("endpoint=192.0.2.1:51820\n") && out.contains("allowed_ip=10.0.0.2/32\n")
        );
        // Adding an allowed IP keeps the others; removing the peer removes it.
        parse_set([&*format!("public_key={K1}"), "allowed_ip=10.0.0.3/32"])
            .unwrap()
            .apply(&mut e)
            .unwrap();
        assert_eq!(e.peers()[0].config.allowed_ips.len(), 2);
        parse_set([&*format!("public_key={K1}"), "remove=true"])
            .unwrap()
            .apply(&mut e)
            .unwrap();
        assert!(e.peers().is_empty());
    }

    #[test]
    fn replace_allowed_ips_drops_what_came_before_it_in_the_request_too() {
        let r = parse_set([
            &*format!("public_key={K1}"),
            "allowed_ip=10.1.0.0/16",
            "replace_allowed_ips=true",
            "allowed_ip=10.3.0.0/16",
        ])
        .unwrap();
        assert!(r.peers[0].replace_allowed_ips);
        assert_eq!(r.peers[0].allowed_ips, vec!["10.3.0.0/16".parse().unwrap()]);
    }

    #[test]
    fn get_shows_the_clamped_key_no_key_when_zero_and_a_zero_preshared_key() {
        let mut e = Engine::new([0; 32]);
        parse_set([&*format!("public_key={K1}")])
            .unwrap()
            .apply(&mut e)
            .unwrap();
        let out = format_get(&e, 1, 0, SystemTime::now());
        assert!(!out.contains("private_key="), "{out}");
        assert!(out.contains(&format!(
            "public_key={K1}\npreshared_key={}\nprotocol_version=1\n",
            "0".repeat(64)
        )));
        e.set_private_key([5; 32]);
        let key = e.private_key().unwrap();
        assert_eq!((key[0], key[31]), (0, 0x45), "clamped as X25519 uses it");
        assert!(
            format_get(&e, 1, 0, SystemTime::now())
                .contains(&format!("private_key={}", hex::encode(key)))
        );
    }

    /// A device that records what it was asked to apply.
    #[derive(Default)]
    struct Recorder(std::sync::Mutex<Vec<SetRequest>>);

    impl Device for Recorder {
        fn get(&self) -> String {
            "listen_port=51820\n".into()
        }
        fn set(&self, req: SetRequest) -> Result<(), SetError> {
            self.0.lock().unwrap().push(req);
            Ok(())
        }
    }

    async fn exchange(input: Vec<u8>) -> (String, usize) {
        let dev = Recorder::default();
        let mut out = Vec::new();
        handle(tokio::io::BufReader::new(input.as_slice()), &mut out, &dev).await;
        let applied = dev.0.lock().unwrap().len();
        (String::from_utf8(out).unwrap(), applied)
    }

    #[tokio::test]
    async fn a_request_with_a_line_that_is_not_utf8_applies_nothing() {
        let mut req = format!("set=1\npublic_key={K1}\n").into_bytes();
        req.extend_from_slice(b"allowed_ip=10.0.0.2/32\n\xff\xfe=\x80\nendpoint=192.0.2.1:1\n\n");
        let (answer, applied) = exchange(req).await;
        assert_eq!(answer, "errno=-22\n\n");
        assert_eq!(applied, 0, "not even the part before the bad line");
    }

    #[tokio::test]
    async fn an_endless_line_is_dropped_and_the_connection_goes_on() {
        let mut req = b"set=1\nprivate_key=".to_vec();
        req.extend(std::iter::repeat_n(b'a', 20 << 20));
        req.extend_from_slice(format!("\n\nset=1\npublic_key={K1}\n\nget=1\n\n").as_bytes());
        let (answer, applied) = exchange(req).await;
        assert_eq!(
            answer, "errno=-22\n\nerrno=0\n\nlisten_port=51820\nerrno=0\n\n",
            "the long request is refused, the next two are answered"
        );
        assert_eq!(applied, 1);
    }

    #[tokio::test]
    async fn a_long_line_is_never_held_whole() {
        let mut input: Vec<u8> = std::iter::repeat_n(b'x', 5 << 20).collect();
        input.push(b'\n');
        let mut r = tokio::io::BufReader::new(input.as_slice());
        assert_eq!(read_line(&mut r).await.unwrap(), Some(Line::TooLong));
        assert_eq!(read_line(&mut r).await.unwrap(), None);
    }
}
