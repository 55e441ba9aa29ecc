//! Subscription plans and their quotas, in one place. Pure.

use crate::model::ModelError;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Plan {
    Free,
    Team,
    Business,
    /// The single tenant of a self-managed controller: no quotas.
    SelfManaged,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quotas {
    pub networks: u32,
    pub peers_per_network: u32,
    pub active_join_tokens: u32,
    pub api_tokens: u32,
}

impl Plan {
    /// The plans a customer can sign up for.
    pub const OFFERED: [Plan; 3] = [Plan::Free, Plan::Team, Plan::Business];

    pub fn parse(s: &str) -> Result<Self, ModelError> {
        match s {
            "free" => Ok(Plan::Free),
            "team" => Ok(Plan::Team),
            "business" => Ok(Plan::Business),
            other => Err(ModelError::Plan(canopy_proto::text::quoted(other))),
        }
    }

    /// A stored plan name; unknown or empty names are the self-managed plan.
    pub fn from_record(s: &str) -> Self {
        Self::parse(s).unwrap_or(Plan::SelfManaged)
    }

    pub fn name(self) -> &'static str {
        match self {
            Plan::Free => "free",
            Plan::Team => "team",
            Plan::Business => "business",
            Plan::SelfManaged => "self-managed",
        }
    }

    /// How long the audit log keeps an entry (the leader prunes older ones).
    pub fn audit_retention_days(self) -> u32 {
        match self {
            Plan::Free => 30,
            Plan::Team => 90,
            Plan::Business | Plan::SelfManaged => 365,
        }
    }

    /// Rules in one network's access policy.
    pub fn policy_rules(self) -> u32 {
        match self {
            Plan::Free => 20,
            Plan::Team => 200,
            Plan::Business | Plan::SelfManaged => crate::policy::MAX_RULES as u32,
        }
    }

    /// MiB the relay forwards for the tenant per calendar month; `None`: no limit.
    pub fn relay_mib_per_month(self) -> Option<u64> {
        match self {
            Plan::Free => Some(1 << 10),
            Plan::Team => Some(100 << 10),
            Plan::Business => Some(1 << 20),
            Plan::SelfManaged => None,
        }
    }

    pub fn quotas(self) -> Quotas {
        match self {
            Plan::Free => Quotas {
                networks: 3,
                peers_per_network: 25,
                active_join_tokens: 5,
                api_tokens: 5,
            },
            Plan::Team => Quotas {
                networks: 25,
                peers_per_network: 250,
                active_join_tokens: 50,
                api_tokens: 25,
            },
            Plan::Business => Quotas {
                networks: 250,
                peers_per_network: 2500,
                active_join_tokens: 500,
                api_tokens: 100,
            },
            // No commercial quotas, but a network's size stays bounded: every peer's map
            // lists every other peer, and maps must fit a client's answer limit.
            Plan::SelfManaged => Quotas {
                networks: u32::MAX,
                peers_per_network: SELF_MANAGED_PEERS_PER_NETWORK,
                active_join_tokens: u32::MAX,
                api_tokens: u32::MAX,
            },
        }
    }
}

/// Peers per network on a self-managed controller. A peer's map entry is at most about
/// 1.5 KB (8 tags of 63 bytes, a 253-byte hostname, 8 endpoints), so a full map stays under
/// 16 MB, a quarter of what clients accept.
pub const SELF_MANAGED_PEERS_PER_NETWORK: u32 = 10_000;

/// What an API token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Everything in its tenant.
    Admin,
    /// List and get only.
    Read,
}

impl Scope {
    pub fn parse(s: &str) -> Result<Self, ModelError> {
        match s {
            "admin" => Ok(Scope::Admin),
            "read" => Ok(Scope::Read),
            other => Err(ModelError::Scope(canopy_proto::text::quoted(other))),
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            Scope::Admin => "admin",
            Scope::Read => "read",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_grow_and_parse_by_name() {
        for p in Plan::OFFERED {
            assert_eq!(Plan::parse(p.name()).unwrap(), p);
        }
        let (f, t, b) = (
            Plan::Free.quotas(),
            Plan::Team.quotas(),
            Plan::Business.quotas(),
        );
        assert!(f.networks < t.networks && t.networks < b.networks);
        assert!(
            f.peers_per_network < t.peers_per_network && t.peers_per_network < b.peers_per_network
        );
        assert!(Plan::parse("gold").is_err());
        assert_eq!(Plan::from_record(""), Plan::SelfManaged);
        assert_eq!(Scope::parse("read").unwrap(), Scope::Read);
        assert!(Scope::parse("root").is_err());
        assert!(Scope::parse("").is_err(), "an empty scope is not admin");
    }
}
