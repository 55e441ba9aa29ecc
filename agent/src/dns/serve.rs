//! The resolver's sockets: UDP and TCP port 53 on each of this node's overlay addresses,
//! answering from the zone of the latest map; and its registration with the host (split DNS).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use canopy_proto::v1::NetworkMap;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{Semaphore, watch};

use super::{Transport, Zone, answer, system};

/// The DNS port.
pub const PORT: u16 = 53;
/// TCP connections served at once; more wait in the kernel's backlog.
const TCP_CONNECTIONS: usize = 64;
/// A TCP connection idle this long (or slow to send a message) is closed.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// Questions answered on one TCP connection before it is closed.
const TCP_QUESTIONS: usize = 256;

type Zones = watch::Receiver<Option<Arc<Zone>>>;

/// Questions answered, by response code (`canopy_agent_dns_queries_total`): NOERROR, FORMERR,
/// SERVFAIL, NXDOMAIN, NOTIMP, REFUSED, and last those that got no answer.
pub static ANSWERED: [std::sync::atomic::AtomicU64; 7] =
    [const { std::sync::atomic::AtomicU64::new(0) }; 7];
/// The `rcode` label of each [`ANSWERED`] slot.
pub const RCODES: [&str; 7] = [
    "noerror", "formerr", "servfail", "nxdomain", "notimp", "refused", "dropped",
];

/// [`answer`], counted.
fn counted(zone: Option<&Zone>, packet: &[u8], t: Transport) -> Option<Vec<u8>> {
    let out = answer(zone, packet, t);
    let slot = match &out {
        Some(o) if o.len() >= 4 => usize::from(o[3] & 0x0f).min(5),
        _ => 6,
    };
    ANSWERED[slot].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    out
}

/// Serves the zone of each map `maps` yields on `iface`'s overlay addresses until dropped,
/// and registers it with systemd-resolved where that runs (saying what to do where not).
pub async fn run(iface: String, mut maps: watch::Receiver<Option<NetworkMap>>) {
    let (tx, zones) = watch::channel(None);
    let mut registered = String::new();
    let mut tasks = Vec::new();
    loop {
        let map = maps.borrow_and_update().clone();
        if let Some(map) = map {
            let zone = Zone::from_map(&map).map(Arc::new);
            if let Some(z) = &zone {
                if tasks.is_empty() {
                    tasks = bind_all(&own_addresses(&map), &zones).await;
                }
                if registered != z.domain() && !tasks.is_empty() {
                    registered = z.domain();
                    register(&iface, &own_addresses(&map), &registered);
                }
            }
            tx.send_replace(zone);
        }
        if maps.changed().await.is_err() {
            break;
        }
    }
    for t in tasks {
        t.abort();
    }
}

fn own_addresses(map: &NetworkMap) -> Vec<IpAddr> {
    map.addresses
        .iter()
        .filter_map(|a| a.parse::<ipnetwork::IpNetwork>().ok())
        .map(|n| n.ip())
        .collect()
}

fn register(iface: &str, addrs: &[IpAddr], zone: &str) {
    match system::register_zone(iface, addrs, zone) {
        Ok(done) => tracing::info!("DNS: {done}"),
        Err(todo) => tracing::warn!("DNS: {todo}"),
    }
}

/// Binds UDP and TCP port 53 on every address (retrying for 5 s while an address is not up
/// yet) and starts serving. A port taken by another server is logged and left.
async fn bind_all(addrs: &[IpAddr], zones: &Zones) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    for ip in addrs {
        let at = SocketAddr::new(*ip, PORT);
        let mut tries = 0;
        let bound = loop {
            match (UdpSocket::bind(at).await, TcpListener::bind(at).await) {
                (Ok(u), Ok(t)) => break Some((u, t)),
                (u, t) if tries >= 20 => {
                    let e = u
                        .err()
                        .or(t.err())
                        .map(|e| e.to_string())
                        .unwrap_or_default();
                    tracing::warn!(%at, error = %e, "DNS: cannot serve the overlay's names here");
                    break None;
                }
                _ => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        };
        if let Some((udp, tcp)) = bound {
            tracing::info!(%at, "DNS: answering the overlay's names");
            tasks.push(tokio::spawn(serve_udp(udp, zones.clone())));
            tasks.push(tokio::spawn(serve_tcp(tcp, zones.clone())));
        }
    }
    tasks
}

async fn serve_udp(sock: UdpSocket, zones: Zones) {
    let mut buf = vec![0u8; 4096];
    loop {
        let (n, from) = match sock.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                // An ICMP error from an earlier answer, or the address going away.
                tracing::debug!(error = %e, "DNS: receive");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let zone = zones.borrow().clone();
        if let Some(out) = counted(zone.as_deref(), &buf[..n], Transport::Udp) {
            let _ = sock.send_to(&out, from).await;
        }
    }
}

async fn serve_tcp(listener: TcpListener, zones: Zones) {
    let slots = Arc::new(Semaphore::new(TCP_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let Ok((conn, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let zones = zones.clone();
        tokio::spawn(async move {
            let _ = tcp_connection(conn, zones).await;
            drop(permit);
        });
    }
}

/// Length-prefixed questions and answers (RFC 1035 4.2.2), each read within [`TCP_IDLE`].
async fn tcp_connection(mut conn: TcpStream, zones: Zones) -> std::io::Result<()> {
    let mut buf = vec![0u8; usize::from(u16::MAX)];
    for _ in 0..TCP_QUESTIONS {
        let read = async {
            let len = usize::from(conn.read_u16().await?);
            conn.read_exact(&mut buf[..len]).await.map(|_| len)
        };
        let len = match tokio::time::timeout(TCP_IDLE, read).await {
            Ok(r) => r?,
            Err(_) => return Ok(()),
        };
        let zone = zones.borrow().clone();
        let Some(out) = counted(zone.as_deref(), &buf[..len], Transport::Tcp) else {
            return Ok(());
        };
        let Ok(out_len) = u16::try_from(out.len()) else {
            return Ok(());
        };
        let mut msg = out_len.to_be_bytes().to_vec();
        msg.extend_from_slice(&out);
        tokio::time::timeout(TCP_IDLE, conn.write_all(&msg))
            .await
            .map_err(|_| std::io::ErrorKind::TimedOut)??;
    }
    Ok(())
}
