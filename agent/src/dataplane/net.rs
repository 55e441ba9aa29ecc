//! The WireGuard UDP socket: batched receives (`recvmmsg`) with GRO, so one call returns many
//! datagrams, and segmented sends (GSO, `UDP_SEGMENT`), so one call sends a run of equal-size
//! datagrams to one endpoint. quinn-udp does the system calls and falls back to one datagram
//! per call where the kernel or device cannot segment.
//!
//! The socket is non-blocking and shared by the forwarding threads: a call that would block
//! waits in `poll` ([`wait`]) and gives up when the data plane stops.

use std::io::{self, IoSliceMut};
use std::net::{SocketAddr, SocketAddrV6};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, poll};
use quinn_udp::{RecvMeta, Transmit, UdpSocketState};

use crate::engine::Outbox;

/// How often a waiting thread looks at the stop flag.
const STOP_CHECK_MS: u16 = 200;

/// Waits until `fd` is ready for `events`. `false`: the data plane is stopping.
pub fn wait(fd: impl AsFd, events: PollFlags, stop: &AtomicBool) -> bool {
    loop {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        let mut fds = [PollFd::new(fd.as_fd(), events)];
        match poll(&mut fds, STOP_CHECK_MS) {
            Ok(0) | Err(nix::errno::Errno::EINTR) => continue,
            Ok(_) => return true,
            Err(e) => {
                tracing::warn!(error = %e, "poll failed");
                std::thread::sleep(Duration::from_millis(10));
                return true;
            }
        }
    }
}

/// How long a busy thread keeps looking before it sleeps, and what counts as busy: the last
/// wait was shorter than [`BUSY`].
const SPIN: Duration = Duration::from_micros(20);
const BUSY: Duration = Duration::from_micros(50);

/// Waits for input like [`wait`], but a thread whose input has been arriving moments apart
/// first looks again for a few microseconds (yielding the core to anything runnable) before it
/// sleeps: under load, going to sleep and being woken costs more than the wait (two context
/// switches, and an inter-processor interrupt in a VM), and the next batch is usually that
/// close. At low rates it sleeps at once, so it costs nothing there.
#[derive(Debug, Default)]
pub struct Waiter {
    last: Duration,
}

impl Waiter {
    pub fn wait(&mut self, fd: impl AsFd, stop: &AtomicBool) -> bool {
        let start = Instant::now();
        if self.last < BUSY {
            while start.elapsed() < SPIN {
                std::thread::yield_now();
                let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
                if let Ok(1..) = poll(&mut fds, 0u16) {
                    self.last = start.elapsed();
                    return true;
                }
            }
        }
        let ready = wait(fd, PollFlags::POLLIN, stop);
        self.last = start.elapsed();
        ready
    }
}

/// One send: bytes of the outbox buffer to one endpoint, segmented into datagrams of
/// `segment` bytes (the last may be shorter) when it holds more than one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GsoRun {
    pub to: SocketAddr,
    pub bytes: std::ops::Range<usize>,
    pub segment: Option<usize>,
}

/// Groups datagrams (endpoint, range of one buffer), in order, into sends: consecutive ones to
/// the same endpoint, adjacent in the buffer, of one size (the last of a run may be shorter,
/// and ends it), at most `max_segments` and [`MAX_SEGMENTED_BYTES`] per run, and only sizes up
/// to [`MAX_SEGMENT`]; anything else is a send of its own. Pure: the rules GSO imposes, tested
/// without a socket.
pub fn gso_runs(
    net: &[(SocketAddr, std::ops::Range<usize>)],
    max_segments: usize,
) -> impl Iterator<Item = GsoRun> + '_ {
    let mut i = 0;
    std::iter::from_fn(move || {
        let (to, first) = (net.get(i)?.0, net[i].1.clone());
        let size = first.len();
        let mut end = first.end;
        let mut j = i + 1;
        while j < net.len() && j - i < max_segments && size <= MAX_SEGMENT {
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
        let run = GsoRun {
            to,
            bytes: first.start..end,
            segment: (j - i > 1).then_some(size),
        };
        i = j;
        Some(run)
    })
}

fn stopped() -> io::Error {
    io::Error::new(io::ErrorKind::Interrupted, "data plane stopped")
}

/// Kernel socket buffers, as wireguard-go sets them: a burst of a whole TCP window must not be
/// dropped between two reads.
const SOCKET_BUFFER: usize = 7 << 20;
/// The most one segmented send may carry (the kernel's limit is 64 KiB including headers).
const MAX_SEGMENTED_BYTES: usize = 65_000;
/// The largest datagram sent segmented: one that fits a 1500-byte path with an IPv6 header
/// (the default interface MTU, 1420, makes exactly this). The kernel refuses a segmented send
/// whose segments exceed the route's MTU (EINVAL), and quinn-udp then turns segmentation off
/// for the socket for good; bigger datagrams (a large interface MTU, fragmented on the way)
/// go out one per call instead.
const MAX_SEGMENT: usize = 1500 - 48;
/// One receive slot: a GRO batch is at most 64 KiB.
pub const RECV_SLOT: usize = 65_536;

pub struct NetSocket {
    io: std::net::UdpSocket,
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
    /// Binds `port` (0: any) on a dual-stack socket where IPv6 exists, else IPv4 only.
    pub fn bind(port: u16) -> io::Result<Self> {
        let (io, v6) = match std::net::UdpSocket::bind(("::", port)) {
            Ok(s) => (s, true),
            Err(_) => (std::net::UdpSocket::bind(("0.0.0.0", port))?, false),
        };
        // quinn-udp makes it non-blocking.
        let state = UdpSocketState::new((&io).into())?;
        set_buffers(&io);
        allow_fragmentation(&io, v6)?;
        let port = io.local_addr()?.port();
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

    /// Shuts the receiving side after a new socket took over: a thread waiting on this one
    /// wakes at once (the read returns nothing) and moves to the new one; sends still work for
    /// a batch already on its way.
    pub fn retire(&self) {
        use std::os::fd::AsRawFd as _;
        let _ = nix::sys::socket::shutdown(self.io.as_raw_fd(), nix::sys::socket::Shutdown::Read);
    }

    /// Sets SO_MARK on the socket (0 clears it): routing rules can then tell the tunnel's own
    /// datagrams apart (wg-quick's policy routing for a full tunnel). Needs CAP_NET_ADMIN.
    pub fn set_mark(&self, mark: u32) -> io::Result<()> {
        nix::sys::socket::setsockopt(&self.io, nix::sys::socket::sockopt::Mark, &mark)
            .map_err(io::Error::from)
    }

    /// Sends one datagram (a STUN request) outside the batched path.
    pub fn send_to(&self, buf: &[u8], to: SocketAddr) -> io::Result<()> {
        self.io.send_to(buf, v6_mapped(to, self.v6)).map(drop)
    }

    /// Waits for datagrams (if the last read found none) and reads a batch into `bufs`;
    /// returns how many slots were filled, 0 if the queue was empty after all.
    /// Slot `i` holds `meta[i].len` bytes: datagrams of `meta[i].stride` bytes (the last may be
    /// shorter), all from `meta[i].addr`. `drained`: the last call found the queue empty, so
    /// wait before reading rather than spend a system call to learn it again.
    pub fn recv(
        &self,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
        drained: bool,
        waiter: &mut Waiter,
        stop: &AtomicBool,
    ) -> io::Result<usize> {
        if drained && !waiter.wait(&self.io, stop) {
            return Err(stopped());
        }
        // One attempt: an empty queue answers 0 and the caller waits on whichever socket is
        // current then (after a listen_port change, the new one).
        match self.state.recv((&self.io).into(), bufs, meta) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            r => r,
        }
    }

    /// Sends the outbox's datagrams in order: consecutive ones to the same endpoint, of one
    /// size (the last of a run may be shorter), go out as one segmented send.
    pub fn send(&self, out: &Outbox, stop: &AtomicBool) {
        let max = self.state.max_gso_segments().max(1);
        for run in gso_runs(&out.net, max) {
            let bytes = out.net_bytes(run.bytes.clone());
            if let Err(e) = self.transmit(run.to, bytes, run.segment, stop) {
                match run.segment {
                    Some(size) if self.state.max_gso_segments() == 1 => {
                        // The device refused segmentation (quinn-udp has now turned it off):
                        // this run goes out one datagram at a time, later ones are built so.
                        tracing::info!(error = %e, "UDP segmentation offload unavailable; sending datagrams one by one");
                        for d in bytes.chunks(size) {
                            if let Err(e) = self.transmit(run.to, d, None, stop) {
                                tracing::debug!(to = %run.to, error = %e, "send failed");
                            }
                        }
                    }
                    _ => tracing::debug!(to = %run.to, error = %e, "send failed"),
                }
            }
        }
    }

    fn transmit(
        &self,
        to: SocketAddr,
        bytes: &[u8],
        segment: Option<usize>,
        stop: &AtomicBool,
    ) -> io::Result<()> {
        let t = Transmit {
            destination: v6_mapped(to, self.v6),
            ecn: None,
            contents: bytes,
            segment_size: segment,
            src_ip: None,
        };
        loop {
            match self.state.try_send((&self.io).into(), &t) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if !wait(&self.io, PollFlags::POLLOUT, stop) {
                        return Err(stopped());
                    }
                }
                r => return r,
            }
        }
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

/// Lets the kernel fragment the outer datagram, as kernel WireGuard and wireguard-go do, so an
/// interface MTU above the path's still delivers (MTU 8000 over a 1500-byte underlay).
/// quinn-udp forbids fragmentation (`IP_PMTUDISC_PROBE`, `IPV6_DONTFRAG`), right for QUIC,
/// which sizes its own packets, wrong for a tunnel, whose inner packets are sized by the
/// interface MTU. IPv4 (and IPv4-mapped on the dual-stack socket): no DF bit at all, so
/// routers on the path may fragment too, as the kernel module sends. IPv6: routers cannot
/// fragment, so this host fragments to the path MTU it knows (learned from Packet Too Big).
fn allow_fragmentation(socket: &std::net::UdpSocket, v6: bool) -> io::Result<()> {
    use rustix::net::sockopt;
    sockopt::set_ip_mtu_discover(socket, sockopt::Ipv4PathMtuDiscovery::DONT)?;
    if v6 {
        sockopt::set_ipv6_mtu_discover(socket, sockopt::Ipv6PathMtuDiscovery::WANT)?;
        nix::sys::socket::setsockopt(socket, nix::sys::socket::sockopt::Ipv6DontFrag, &false)?;
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn at(port: u16) -> SocketAddr {
        SocketAddr::from(([192, 0, 2, 1], port))
    }

    /// Datagrams of `sizes` laid end to end, to `to[i]`.
    fn laid(to: &[u16], sizes: &[usize]) -> Vec<(SocketAddr, std::ops::Range<usize>)> {
        let mut off = 0;
        to.iter()
            .zip(sizes)
            .map(|(&p, &n)| {
                off += n;
                (at(p), off - n..off)
            })
            .collect()
    }

    fn runs(
        net: &[(SocketAddr, std::ops::Range<usize>)],
        max: usize,
    ) -> Vec<(u16, usize, Option<usize>)> {
        gso_runs(net, max)
            .map(|r| (r.to.port(), r.bytes.len(), r.segment))
            .collect()
    }

    #[test]
    fn equal_datagrams_to_one_endpoint_go_as_one_segmented_send() {
        let net = laid(&[1, 1, 1], &[1452, 1452, 1452]);
        assert_eq!(runs(&net, 64), [(1, 3 * 1452, Some(1452))]);
    }

    #[test]
    fn a_shorter_datagram_ends_a_run_and_a_longer_one_starts_the_next() {
        let net = laid(&[1, 1, 1, 1], &[1000, 1000, 600, 1000]);
        assert_eq!(runs(&net, 64), [(1, 2600, Some(1000)), (1, 1000, None)]);
        let net = laid(&[1, 1], &[600, 1000]);
        assert_eq!(runs(&net, 64), [(1, 600, None), (1, 1000, None)]);
    }

    #[test]
    fn another_endpoint_a_gap_or_the_segment_cap_ends_a_run() {
        let net = laid(&[1, 2, 2], &[100, 100, 100]);
        assert_eq!(runs(&net, 64), [(1, 100, None), (2, 200, Some(100))]);
        let mut gap = laid(&[1, 1], &[100, 100]);
        gap[1].1 = 300..400;
        assert_eq!(runs(&gap, 64), [(1, 100, None), (1, 100, None)]);
        let net = laid(&[1; 5], &[100; 5]);
        assert_eq!(
            runs(&net, 2),
            [(1, 200, Some(100)), (1, 200, Some(100)), (1, 100, None)]
        );
        assert_eq!(runs(&net, 1).len(), 5, "no GSO: one datagram per send");
    }

    #[test]
    fn runs_stay_under_64_kib_and_big_datagrams_are_never_segmented() {
        let net = laid(&[1; 60], &[1400; 60]);
        let r = runs(&net, 64);
        assert!(r.iter().all(|&(_, n, _)| n <= MAX_SEGMENTED_BYTES), "{r:?}");
        assert_eq!(r.iter().map(|&(_, n, _)| n).sum::<usize>(), 60 * 1400);
        let big = laid(&[1, 1], &[8032, 8032]);
        assert_eq!(runs(&big, 64), [(1, 8032, None), (1, 8032, None)]);
    }
}
