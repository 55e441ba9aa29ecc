//! The store's key layout, all under `/canopy/v1/`. Values are the protobuf records of
//! `proto/canopy/v1/store.proto`.
//!
//! ```text
//! networks/<tenant>/<network>        NetworkRecord
//! netnames/<tenant>/<name>           IndexRecord(network id): names are unique per tenant
//! netsver/<tenant>                   bumped by every network create/delete (guards CIDR overlap)
//! peers/<network>/<peer>             PeerRecord
//! routes/<network>/<route>           RouteRecord: a prefix behind a gateway peer
//! gwlive/<network>/<peer>            GatewayLiveRecord: that gateway's agent is live (written by
//!                                    the replica holding its Sync session; decides which
//!                                    gateway carries a prefix)
//! policies/<network>                 PolicyRecord: the network's access policy (none: allow-all);
//!                                    its mod revision is the version `--if-revision` checks
//! netdel/<network>                   bumped with every peer deletion: after a re-list, deltas
//!                                    are exact from its revision on (no deletion is unknown)
//! ipam/<network>/<address>           IndexRecord(peer id): an address is claimed create-if-absent
//! pubkeys/<network>/<key hex>        IndexRecord(peer id): a key joins a network once
//! dnsnames/<network>/<label>        IndexRecord(peer id): a DNS name is claimed create-if-absent
//! credentials/<sha256 hex>           IndexRecord("<network>/<peer>"): agent Sync credential; after
//!                                    removal marked removed_at_unix (pruned after a retention)
//! tokens/<tenant>/<token>            JoinTokenRecord
//! tokenhash/<sha256 hex>             IndexRecord("<tenant>/<token>")
//! apitokens/<sha256 hex>             ApiTokenRecord
//! apitokenlist/<tenant>/<token>      ApiTokenRecord (the same, for listing per tenant)
//! tenants/<tenant>                   TenantRecord (hosted; a self-managed tenant has none)
//! tokensver/<tenant>                 bumped by every join-token create (guards the quota)
//! netpeers/<network>                 the peer count, written by every enrollment ("recount" after
//!                                    a removal): guards the peer quota
//! apitokensver/<tenant>              bumped by every API token create/revoke (guards the quota
//!                                    and the last admin token)
//! audit/<tenant>/<ms, 20 digits>-<r> AuditEntry: key order is time order
//! websessions/<sha256 hex>           WebSessionRecord: a browser signed in to the web console
//! paths/<network>/<peer>             PathsRecord: how that peer's agent reaches its peers (written
//!                                    by its session when a path changes; not cached)
//! relayuse/<tenant>/<yyyy-mm>        RelayUseRecord: bytes relayed for the tenant that month (UTC)
//! punch/<network>                    PunchRecord: the last hole punch asked for there (overwritten;
//!                                    every replica's punch watcher tells its sessions)
//! leader                             the replica holding the background-work lease (its id and
//!                                    term; fences the leader's writes)
//! ```
//!
//! The cache lists and follows only `networks/`, `peers/`, `routes/`, `gwlive/`, `policies/`
//! and `netdel/` (what maps are made of).

pub const ROOT: &str = "/canopy/v1/";

pub fn networks(tenant: &str) -> String {
    format!("{ROOT}networks/{tenant}/")
}
pub fn network(tenant: &str, id: &str) -> String {
    format!("{ROOT}networks/{tenant}/{id}")
}
pub fn netname(tenant: &str, name: &str) -> String {
    format!("{ROOT}netnames/{tenant}/{name}")
}
pub fn netsver(tenant: &str) -> String {
    format!("{ROOT}netsver/{tenant}")
}
pub const ALL_PEERS: &str = "/canopy/v1/peers/";
pub fn peers(network: &str) -> String {
    format!("{ROOT}peers/{network}/")
}
pub fn peer(network: &str, id: &str) -> String {
    format!("{ROOT}peers/{network}/{id}")
}
pub fn netdel(network: &str) -> String {
    format!("{ROOT}netdel/{network}")
}
pub fn ipams(network: &str) -> String {
    format!("{ROOT}ipam/{network}/")
}
pub fn ipam(network: &str, addr: &std::net::IpAddr) -> String {
    format!("{ROOT}ipam/{network}/{addr}")
}
pub fn dnsnames(network: &str) -> String {
    format!("{ROOT}dnsnames/{network}/")
}
pub fn dnsname(network: &str, label: &str) -> String {
    format!("{ROOT}dnsnames/{network}/{label}")
}
pub fn pubkeys(network: &str) -> String {
    format!("{ROOT}pubkeys/{network}/")
}
pub fn pubkey(network: &str, key: &[u8]) -> String {
    format!("{ROOT}pubkeys/{network}/{}", hex::encode(key))
}
pub fn websession(hash: &[u8; 32]) -> String {
    format!("{ROOT}websessions/{}", hex::encode(hash))
}
pub fn credential(hash: &[u8; 32]) -> String {
    format!("{ROOT}credentials/{}", hex::encode(hash))
}
pub fn tokens(tenant: &str) -> String {
    format!("{ROOT}tokens/{tenant}/")
}
pub fn token(tenant: &str, id: &str) -> String {
    format!("{ROOT}tokens/{tenant}/{id}")
}
pub fn tokenhash(hash: &[u8; 32]) -> String {
    format!("{ROOT}tokenhash/{}", hex::encode(hash))
}
pub fn apitoken(hash: &[u8; 32]) -> String {
    format!("{ROOT}apitokens/{}", hex::encode(hash))
}

pub fn apitokenlist(tenant: &str) -> String {
    format!("{ROOT}apitokenlist/{tenant}/")
}
pub fn apitokenlist_entry(tenant: &str, id: &str) -> String {
    format!("{ROOT}apitokenlist/{tenant}/{id}")
}
pub const ALL_TENANTS: &str = "/canopy/v1/tenants/";
pub fn tenant(id: &str) -> String {
    format!("{ROOT}tenants/{id}")
}
pub fn tokensver(tenant: &str) -> String {
    format!("{ROOT}tokensver/{tenant}")
}
pub fn apitokensver(tenant: &str) -> String {
    format!("{ROOT}apitokensver/{tenant}")
}
pub fn netpeers(network: &str) -> String {
    format!("{ROOT}netpeers/{network}")
}

/// Splits `/canopy/v1/peers/<network>/<peer>` into its ids.
pub const ALL_ROUTES: &str = "/canopy/v1/routes/";
pub fn routes(network: &str) -> String {
    format!("{ALL_ROUTES}{network}/")
}
pub fn route(network: &str, id: &str) -> String {
    format!("{ALL_ROUTES}{network}/{id}")
}
/// The network and route ids of a `routes/` key.
pub fn parse_route(key: &[u8]) -> Option<(&str, &str)> {
    std::str::from_utf8(key)
        .ok()?
        .strip_prefix(ALL_ROUTES)?
        .split_once('/')
}

pub const ALL_GWLIVE: &str = "/canopy/v1/gwlive/";
pub fn gwlives(network: &str) -> String {
    format!("{ALL_GWLIVE}{network}/")
}
pub fn gwlive(network: &str, peer: &str) -> String {
    format!("{ALL_GWLIVE}{network}/{peer}")
}
/// The network and peer ids of a `gwlive/` key.
pub fn parse_gwlive(key: &[u8]) -> Option<(&str, &str)> {
    std::str::from_utf8(key)
        .ok()?
        .strip_prefix(ALL_GWLIVE)?
        .split_once('/')
}

pub const ALL_POLICIES: &str = "/canopy/v1/policies/";
pub fn paths_of(network: &str) -> String {
    format!("{ROOT}paths/{network}/")
}
pub fn paths(network: &str, peer: &str) -> String {
    format!("{ROOT}paths/{network}/{peer}")
}

pub fn relayuse(tenant: &str, month: &str) -> String {
    format!("{ROOT}relayuse/{tenant}/{month}")
}

pub const ALL_PUNCH: &str = "/canopy/v1/punch/";
pub fn punch(network: &str) -> String {
    format!("{ALL_PUNCH}{network}")
}

pub fn policy(network: &str) -> String {
    format!("{ALL_POLICIES}{network}")
}
/// The network id of a `policies/` key.
pub fn parse_policy(key: &[u8]) -> Option<&str> {
    std::str::from_utf8(key).ok()?.strip_prefix(ALL_POLICIES)
}

pub fn parse_peer(key: &[u8]) -> Option<(&str, &str)> {
    let rest = std::str::from_utf8(key).ok()?.strip_prefix(ALL_PEERS)?;
    rest.split_once('/')
}
