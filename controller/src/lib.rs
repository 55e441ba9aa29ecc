//! Canopy controller: `canopy serve` (the gRPC control plane) and the `canopy` console client.
//!
//! # Layout
//! - [`model`], [`ipam`], [`netmap`], [`plans`]: pure domain rules: validation, address picking,
//!   per-peer maps and deltas, plans and quotas. No I/O; unit- and property-tested.
//! - [`store`]: the etcd-shaped KV trait, its embedded (redb) backend and conformance suite.
//! - [`cache`]: list+watch follower of the store that Sync streams are served from.
//! - [`service`]: the operations over store + cache, one module per resource (networks, join
//!   tokens, peers, enrollment, agents, tenants and plans, API tokens, audit);
//! - [`server`]: tonic services, TLS, health, reflection; errors become statuses at this edge.
//! - [`leader`]: election of the replica that runs background jobs, with fenced writes.
//! - [`clock`]: wall-clock time for expiry, leases and timestamps (manual in tests).
//! - [`txn`]: the one retry loop for read → decide → write operations (jittered backoff).
//! - [`pacing`]: admission of new agent sessions (reconnect storms).
//! - [`web`]: the web console (pages over the same operations, sessions, CSRF, CSP).
//! - [`console`]: the CLI client. [`tls`], [`secret`], [`keys`], [`files`]: supporting pieces.
#![cfg_attr(test, allow(clippy::unwrap_used))]

pub mod cache;
pub mod clock;
pub mod console;
pub mod error;
pub mod files;
pub mod ipam;
pub mod keys;
pub mod leader;
pub mod metrics;
pub mod model;
pub mod names;
pub mod netmap;
pub mod pacing;
pub mod plans;
/// The access policy (its own crate: agents of a locked network compile their part too).
pub use canopy_policy as policy;
pub mod secret;
pub mod server;
pub mod service;
pub mod store;
pub mod tls;
pub mod txn;
pub mod web;
