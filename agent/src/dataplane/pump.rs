//! The forwarding loops: one thread per direction, plus one for timers. They block in the
//! kernel (a read, or `poll` when the non-blocking descriptor has nothing), never in a
//! scheduler, so a busy tunnel costs one system call per batch and cannot hold up the control
//! connection, which runs on the agent's tokio runtime.
//!
//! - TUN → network: one read from the TUN device returns a whole TCP segment of up to 64 KiB
//!   when offloads are on (split here into packets with their checksums); more reads are
//!   taken while packets are waiting; the batch is encrypted under one engine lock and leaves
//!   as segmented UDP sends.
//! - network → TUN: one receive returns up to 32 slots of GRO-coalesced datagrams; each slot is
//!   decrypted under one engine lock (so the other direction gets the lock between slots);
//!   decrypted TCP packets of one flow are coalesced back into large segments, written with
//!   one write each.
//!
//! Buffers are allocated once per thread; the steady state allocates nothing per packet.
//! Every loop ends within [`super::net`]'s stop-check interval once `Shared::stop` is set.

use std::io::{self, IoSliceMut};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use quinn_udp::RecvMeta;
use tun_rs::{GROTable, IDEAL_BATCH_SIZE, SyncDevice, VIRTIO_NET_HDR_LEN};

use super::Shared;
use super::net::{RECV_SLOT, Waiter, canonical};
use crate::engine::{Outbox, TIMER_INTERVAL, TUN_HEADROOM};

const _: () = assert!(TUN_HEADROOM >= VIRTIO_NET_HDR_LEN);

/// Packet buffers for TUN reads. One offloaded read can hold 64 KiB / MSS packets (122 at an
/// MSS of 536); more reads are taken only while at least that many buffers are free.
const TUN_BUFS: usize = 192;
const TUN_READ_ROOM: usize = 128;
/// Receive slots per UDP read (quinn-udp's recvmmsg batch).
const UDP_SLOTS: usize = 32;

/// Room for one packet read from the TUN device: the largest MTU a Linux interface takes
/// (65535), so `ip link set IFACE mtu 8000` after start (wg-quick's `MTU =`) works as it does
/// on the kernel's interface.
const PACKET_ROOM: usize = 65_535;

pub(super) fn tun_to_net(shared: Arc<Shared>, tun: Arc<SyncDevice>) {
    let stop = &shared.stop;
    let mut original = vec![0u8; VIRTIO_NET_HDR_LEN + 65_535];
    // One allocation, zeroed lazily by the kernel: only the pages packets reach are resident
    // (about one per buffer at the default MTU).
    let mut space = vec![0u8; TUN_BUFS * PACKET_ROOM];
    let mut bufs: Vec<&mut [u8]> = space.chunks_mut(PACKET_ROOM).collect();
    let mut sizes = vec![0usize; TUN_BUFS];
    let mut out = Outbox::default();
    // Whether the last read found the device empty: then the next one waits first, instead of
    // spending a system call to learn it again.
    let mut drained = false;
    let mut waiter = Waiter::default();
    loop {
        let mut count = 0;
        while TUN_BUFS - count >= TUN_READ_ROOM {
            if drained && count == 0 && !waiter.wait(&*tun, stop) {
                return;
            }
            match tun.recv_multiple(&mut original, &mut bufs[count..], &mut sizes[count..], 0) {
                Ok(n) => {
                    count += n;
                    drained = false;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    drained = true;
                    if count > 0 {
                        break;
                    }
                }
                // EBADFD: the device was deleted; the descriptor will never read again.
                Err(e) if e.raw_os_error() == Some(nix::libc::EBADFD) => {
                    tracing::info!(iface = %shared.name, "interface deleted");
                    stop.store(true, Ordering::Relaxed);
                    shared.gone.send_replace(true);
                    return;
                }
                Err(e) => {
                    tracing::debug!(error = %e, "TUN read failed");
                    if e.raw_os_error().is_some() {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                }
            }
        }
        out.clear();
        shared.engine().handle_tun(
            Instant::now(),
            (0..count).map(|i| &bufs[i][..sizes[i]]),
            &mut out,
        );
        shared.send(&mut out, stop);
    }
}

pub(super) fn net_to_tun(shared: Arc<Shared>, tun: Arc<SyncDevice>) {
    let stop = &shared.stop;
    let mut space = vec![0u8; UDP_SLOTS * RECV_SLOT];
    let mut slots: Vec<IoSliceMut<'_>> = space.chunks_mut(RECV_SLOT).map(IoSliceMut::new).collect();
    let mut meta = vec![RecvMeta::default(); UDP_SLOTS];
    let mut gro = GROTable::new();
    // Room to coalesce a whole 64 KiB segment into any packet's buffer.
    let mut out = Outbox::with_tun_capacity(2 * TUN_HEADROOM + 65_535);
    let mut drained = false;
    let mut waiter = Waiter::default();
    loop {
        // The current socket: after a listen_port change, the next batch comes from the new
        // one (a wait on the old one ends within the stop-check interval).
        let sock = shared.socket();
        let n = match sock.recv(&mut slots, &mut meta, drained, &mut waiter, stop) {
            Ok(n) => n,
            Err(_) if stop.load(Ordering::Relaxed) => return,
            Err(e) => {
                tracing::debug!(error = %e, "UDP receive failed");
                continue;
            }
        };
        // Fewer slots than asked for: the queue is empty now.
        drained = n < slots.len();
        out.clear();
        for (slot, m) in slots.iter().zip(&meta[..n]) {
            let from = canonical(m.addr);
            let data = &slot[..m.len.min(slot.len())];
            let stride = if m.stride == 0 {
                data.len().max(1)
            } else {
                m.stride
            };
            // STUN answers never reach WireGuard; relayed datagrams come from their sender's
            // stand-in endpoint.
            let datagrams = data.chunks(stride).filter_map(|d| shared.demux(from, d));
            shared
                .engine()
                .handle_network(Instant::now(), datagrams, &mut out);
            if out.tun_buffers().len() >= IDEAL_BATCH_SIZE {
                write_tun(&tun, &mut gro, &mut out);
            }
        }
        write_tun(&tun, &mut gro, &mut out);
        // Handshake answers, and packets released by a completed handshake.
        shared.send(&mut out, stop);
    }
}

/// Writes the decrypted packets (coalescing TCP segments where the device takes them) and
/// empties the outbox's packet list.
fn write_tun(tun: &SyncDevice, gro: &mut GROTable, out: &mut Outbox) {
    if out.tun_is_empty() {
        return;
    }
    if let Err(e) = tun.send_multiple(gro, out.tun_buffers(), TUN_HEADROOM) {
        tracing::debug!(error = %e, "TUN write failed");
    }
    out.clear_tun();
}

/// Runs the engine's timers when it says they are due. With nothing to time (no key, no
/// peers) it looks again after one interval; `Dataplane::stop` unparks it.
pub(super) fn timers(shared: Arc<Shared>) {
    let mut out = Outbox::default();
    while !shared.stop.load(Ordering::Relaxed) {
        out.clear();
        let due = {
            let mut engine = shared.engine();
            engine.handle_timeout(Instant::now(), &mut out);
            engine.poll_timeout()
        };
        shared.send(&mut out, &shared.stop);
        let wait = due.map_or(TIMER_INTERVAL, |t| {
            t.saturating_duration_since(Instant::now())
        });
        std::thread::park_timeout(wait);
    }
}
