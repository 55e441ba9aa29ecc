//! Canopy agent: keeps the node's WireGuard key on the node, runs the userspace WireGuard data
//! plane, and follows the network map a controller pushes (or a wg-quick style file).
//!
//! # Layout
//! - [`engine`]: sans-IO WireGuard core (peers, allowed-IPs routing, boringtun sessions).
//! - [`keys`]: Curve25519 keys in `wg`'s base64 form.
//! - [`state`]: the state directory (key 0600, enrollment, last applied map).
//! - [`control`]: enrollment and the Sync session (resume, backoff, acks), as a library.
//! - [`dns`]: the resolver for the network's zone on the overlay address, and split DNS.
//! - [`cli`]: the `canopy-agent` command line; the binary only calls [`cli::main`].
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod cli;
pub mod config;
pub mod control;
pub mod dataplane;
pub mod dns;
pub use canopy_engine as engine;
pub mod keys;
pub mod lock;
pub mod metrics;
pub mod punch;
pub mod report;
pub mod state;
pub mod uapi;
