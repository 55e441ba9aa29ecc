//! The engine's output buffers: datagrams back to back in one buffer, decrypted packets each in
//! a buffer of their own behind a headroom; both reused from batch to batch.

use std::net::SocketAddr;
use std::ops::Range;

/// Bytes left free in front of each decrypted packet, so the I/O layer can put a per-packet
/// header there without copying (the TUN device's 10-byte virtio-net header when offloads are
/// on). 16 keeps the packets 8-byte aligned.
pub const TUN_HEADROOM: usize = 16;

/// Results of one batch: datagrams to send, as ranges of one buffer (consecutive datagrams to
/// the same endpoint lie back to back, so they can go out as one segmented send), and packets
/// to deliver, each in its own buffer behind [`TUN_HEADROOM`] free bytes (so they can be
/// coalesced and written in a batch). Buffers are kept between batches: the steady state
/// allocates nothing.
#[derive(Debug, Default)]
pub struct Outbox {
    pub(crate) buf: Vec<u8>,
    /// Bytes of `buf` in use; `buf` itself only grows.
    used: usize,
    pub net: Vec<(SocketAddr, Range<usize>)>,
    tun: Vec<Vec<u8>>,
    tun_count: usize,
    /// Capacity of each new packet buffer.
    tun_capacity: usize,
}

impl Outbox {
    /// An outbox whose packet buffers each have room for `capacity` bytes, so that a batched
    /// writer can coalesce following packets into one (64 KiB + headroom for TCP segments).
    pub fn with_tun_capacity(capacity: usize) -> Self {
        Self {
            tun_capacity: capacity,
            ..Self::default()
        }
    }

    pub fn clear(&mut self) {
        self.used = 0;
        self.net.clear();
        self.tun_count = 0;
    }
    /// Forgets the packets to deliver (after they were written), keeping the datagrams.
    pub fn clear_tun(&mut self) {
        self.tun_count = 0;
    }
    /// Datagrams to send, in order.
    pub fn net_packets(&self) -> impl Iterator<Item = (SocketAddr, &[u8])> {
        self.net.iter().map(|(a, r)| (*a, &self.buf[r.clone()]))
    }
    /// Bytes of the datagram buffer that the ranges in [`Self::net`] index.
    pub fn net_bytes(&self, range: Range<usize>) -> &[u8] {
        &self.buf[range]
    }
    /// Packets to deliver, in order.
    pub fn tun_packets(&self) -> impl Iterator<Item = &[u8]> {
        self.tun[..self.tun_count]
            .iter()
            .map(|b| &b[TUN_HEADROOM..])
    }
    pub fn tun_is_empty(&self) -> bool {
        self.tun_count == 0
    }
    /// The buffers of the packets to deliver, each holding [`TUN_HEADROOM`] free bytes and then
    /// the packet; a batched writer may fill in the headroom, coalesce and grow them.
    pub fn tun_buffers(&mut self) -> &mut [Vec<u8>] {
        &mut self.tun[..self.tun_count]
    }
    /// Makes room for `n` bytes of a datagram at the end of the buffer and returns its start.
    pub(crate) fn grow(&mut self, n: usize) -> usize {
        let off = self.used;
        if self.buf.len() < off + n {
            self.buf.resize(off + n, 0);
        }
        self.used = off + n;
        off
    }
    /// Keeps `n` bytes written at `off` (undoing the rest of what [`Self::grow`] reserved).
    pub(crate) fn keep(&mut self, off: usize, n: usize) {
        self.used = off + n;
    }
    pub(crate) fn push_net(&mut self, to: SocketAddr, off: usize, n: usize) {
        self.keep(off, n);
        self.net.push((to, off..off + n));
    }
    /// A buffer for a packet to deliver, with room for `n` bytes after the headroom.
    pub(crate) fn next_tun(&mut self, n: usize) -> &mut Vec<u8> {
        if self.tun_count == self.tun.len() {
            self.tun.push(Vec::with_capacity(self.tun_capacity));
        }
        let b = &mut self.tun[self.tun_count];
        // Grow only: resizing down keeps the memory and writes nothing.
        if b.len() < TUN_HEADROOM + n {
            b.resize(TUN_HEADROOM + n, 0);
        } else {
            b.truncate(TUN_HEADROOM + n);
        }
        b
    }
    /// Keeps the packet of `n` bytes written into the buffer [`Self::next_tun`] gave.
    /// The packet decrypted into the next buffer, not yet kept.
    pub(crate) fn pending_tun(&self, n: usize) -> &[u8] {
        &self.tun[self.tun_count][TUN_HEADROOM..TUN_HEADROOM + n]
    }

    pub(crate) fn push_tun(&mut self, n: usize) {
        self.tun[self.tun_count].truncate(TUN_HEADROOM + n);
        self.tun_count += 1;
    }
}
