//! The WireGuard UDP socket: batched receives (`recvmmsg`) with GRO, so one call returns many
//! datagrams, and segmented sends (GSO, `UDP_SEGMENT`), so one call sends a run of equal-size
//! datagrams to one endpoint. quinn-udp does the system calls and falls back to one datagram
//! per call where the kernel or device cannot segment.

use std::io::{self, IoSliceMut};
use std::net::{SocketAddr, SocketAddrV6};

use quinn_udp::{RecvMeta, Transmit, UdpSocketState};
use tokio::io::Interest;

use crate::engine::Outbox;

/// Kernel socket buffers, as wireguard-go sets them: a burst of a whole TCP window must not be
/// dropped between two reads.
const SOCKET_BUFFER: usize = 7 << 20;
/// The most one segmented send may carry (the kernel's limit is 64 KiB including headers).
const MAX_SEGMENTED_BYTES: usize = 65_000;
/// One receive slot: a GRO batch is at most 64 KiB.
pub const RECV_SLOT: usize = 65_536;

pub struct NetSocket {
    io: tokio::net::UdpSocket,
    state: UdpSocketState,
    /// Dual-stack IPv6 socket: IPv4 destinations are written as IPv4-mapped addresses.
    v6: bool,
    port: u16,
}

impl std::fmt::Debug for NetSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetSocket")
            .field("port", &self.port)
            .field("v6", &self.v6)
            .field("gso_segments", &self.state.max_gso_segments())
            .field("gro_segments", &self.state.gro_segments())
            .finish()
    }
}

impl NetSocket {
    /// Binds `port` (0: any) on a dual-stack socket where IPv6 exists, else IPv4 only. Must be
    /// called inside the tokio runtime that will drive the socket.
    pub fn bind(port: u16) -> io::Result<Self> {
        let (std, v6) = match std::net::UdpSocket::bind(("::", port)) {
            Ok(s) => (s, true),
            Err(_) => (std::net::UdpSocket::bind(("0.0.0.0", port))?, false),
        };
        let state = UdpSocketState::new((&std).into())?;
        set_buffers(&std);
        let port = std.local_addr()?.port();
        let io = tokio::net::UdpSocket::from_std(std)?;
        Ok(Self {
            io,
            state,
            v6,
            port,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Waits for datagrams and reads a batch into `bufs`; returns how many slots were filled.
    /// Slot `i` holds `meta[i].len` bytes: datagrams of `meta[i].stride` bytes (the last may be
    /// shorter), all from `meta[i].addr`.
    pub async fn recv(
        &self,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> io::Result<usize> {
        self.io
            .async_io(Interest::READABLE, || {
                self.state.recv((&self.io).into(), bufs, meta)
            })
            .await
    }

    /// Sends the outbox's datagrams in order: consecutive ones to the same endpoint, of one
    /// size (the last of a run may be shorter), go out as one segmented send.
    pub async fn send(&self, out: &Outbox) {
        let net = &out.net;
        let max = self.state.max_gso_segments().max(1);
        let mut i = 0;
        while i < net.len() {
            let (to, first) = (net[i].0, net[i].1.clone());
            let size = first.len();
            let mut end = first.end;
            let mut j = i + 1;
            while j < net.len() && j - i < max {
                let (t, r) = (net[j].0, &net[j].1);
                if t != to
                    || r.start != end
                    || r.len() > size
                    || r.end - first.start > MAX_SEGMENTED_BYTES
                {
                    break;
                }
                end = r.end;
                j += 1;
                if r.len() < size {
                    break; // a shorter datagram ends a run
                }
            }
            let bytes = out.net_bytes(first.start..end);
            let segment = (j - i > 1).then_some(size);
            if let Err(e) = self.transmit(to, bytes, segment).await {
                if segment.is_some() && self.state.max_gso_segments() == 1 {
                    // The device refused segmentation (quinn-udp has now turned it off):
                    // this run goes out one datagram at a time, later ones are built that way.
                    tracing::info!(error = %e, "UDP segmentation offload unavailable; sending datagrams one by one");
                    for d in bytes.chunks(size) {
                        if let Err(e) = self.transmit(to, d, None).await {
                            tracing::debug!(%to, error = %e, "send failed");
                        }
                    }
                } else {
                    tracing::debug!(%to, error = %e, "send failed");
                }
            }
            i = j;
        }
    }

    async fn transmit(
        &self,
        to: SocketAddr,
        bytes: &[u8],
        segment: Option<usize>,
    ) -> io::Result<()> {
        let t = Transmit {
            destination: v6_mapped(to, self.v6),
            ecn: None,
            contents: bytes,
            segment_size: segment,
            src_ip: None,
        };
        self.io
            .async_io(Interest::WRITABLE, || {
                self.state.try_send((&self.io).into(), &t)
            })
            .await
    }
}

/// Raises the kernel buffers past `net.core.{r,w}mem_max` where the agent may (it has
/// CAP_NET_ADMIN for the TUN device anyway); else takes what the limits allow.
fn set_buffers(socket: &std::net::UdpSocket) {
    use nix::sys::socket::{setsockopt, sockopt};
    if setsockopt(socket, sockopt::RcvBufForce, &SOCKET_BUFFER).is_err() {
        let _ = setsockopt(socket, sockopt::RcvBuf, &SOCKET_BUFFER);
    }
    if setsockopt(socket, sockopt::SndBufForce, &SOCKET_BUFFER).is_err() {
        let _ = setsockopt(socket, sockopt::SndBuf, &SOCKET_BUFFER);
    }
}

fn v6_mapped(to: SocketAddr, v6_socket: bool) -> SocketAddr {
    match to {
        SocketAddr::V4(a) if v6_socket => {
            SocketAddr::V6(SocketAddrV6::new(a.ip().to_ipv6_mapped(), a.port(), 0, 0))
        }
        other => other,
    }
}

/// The address a datagram came from, with IPv4-mapped IPv6 turned back into IPv4.
pub fn canonical(from: SocketAddr) -> SocketAddr {
    SocketAddr::new(from.ip().to_canonical(), from.port())
}
