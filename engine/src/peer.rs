//! A peer as configured and as the engine keeps it, and what the engine reports.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use boringtun::noise::Tunn;
use ipnetwork::IpNetwork;

use crate::filter::Rules;

/// A peer as configured (wg-quick file, UAPI or the controller's map).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerConfig {
    pub public_key: [u8; 32],
    pub preshared_key: Option<[u8; 32]>,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<IpNetwork>,
    pub persistent_keepalive: Option<u16>,
}

/// What `wg show` reports for a peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerStatus {
    pub config: PeerConfig,
    /// Time since the last completed handshake, by boringtun's clock.
    pub since_handshake: Option<Duration>,
    /// Packets from this peer the access policy refused.
    pub policy_drops: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
}

/// Counters of packets the engine refused, for tests and `status`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Drops {
    /// Decrypted packets whose source was not in the sending peer's allowed IPs.
    pub spoofed: u64,
    /// TUN packets with no peer routed for their destination (or no endpoint yet).
    pub no_route: u64,
    /// Datagrams that failed to parse, authenticate or decrypt, or came from unknown keys.
    pub invalid: u64,
    /// Decrypted packets the access policy refused (not a reply, no rule allows them).
    pub policy: u64,
}

pub(crate) struct Peer {
    pub(crate) tunn: Tunn,
    pub(crate) config: PeerConfig,
    /// What it may open on this node, while a policy is in force.
    pub(crate) inbound: Arc<Rules>,
    pub(crate) policy_drops: u64,
    /// Other addresses it may be reached at (the controller's candidates): a handshake
    /// initiation goes to each of them too, and the first that answers becomes the endpoint.
    pub(crate) candidates: Vec<SocketAddr>,
}
