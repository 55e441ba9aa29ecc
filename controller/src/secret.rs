//! Random ids and secrets. Secrets are shown once and stored only as SHA-256 hashes; they carry
//! 256 bits of randomness, so a fast hash is enough (no password stretching needed).

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore as _;

/// A secret string that never prints itself.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// A new random secret with a type prefix, e.g. `cjt_` for join tokens.
    pub fn generate(prefix: &str) -> Self {
        let mut b = [0u8; 32];
        rand::rng().fill_bytes(&mut b);
        Self(format!("{prefix}{}", URL_SAFE_NO_PAD.encode(b)))
    }
    pub fn from_string(s: String) -> Self {
        Self(s)
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn hash(&self) -> [u8; 32] {
        canopy_proto::sha256(self.0.as_bytes())
    }

    /// Whether this secret hashes to `stored`, compared in constant time: how long the
    /// comparison takes says nothing about how much of the hash matched.
    pub fn matches(&self, stored: &[u8]) -> bool {
        use subtle::ConstantTimeEq as _;
        stored.len() == 32 && bool::from(self.hash().as_slice().ct_eq(stored))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// Whether `s` looks like a secret of ours: `prefix` and 43 base64url characters (32 bytes).
pub fn well_formed(s: &str, prefix: &str) -> bool {
    s.strip_prefix(prefix).is_some_and(|rest| {
        rest.len() == 43
            && rest
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    })
}

/// Prefixes that say what a secret is when a user pastes one in the wrong place.
pub const JOIN_TOKEN: &str = "cjt_";
pub const API_TOKEN: &str = "cat_";
pub const CREDENTIAL: &str = "cpc_";

/// A short random id with a type prefix: `net_`, `peer_`, `tok_`, `api_`.
pub fn new_id(prefix: &str) -> String {
    let mut b = [0u8; 8];
    rand::rng().fill_bytes(&mut b);
    format!("{prefix}{}", hex::encode(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_matches_only_its_own_hash() {
        let s = Secret::generate(API_TOKEN);
        assert!(s.matches(&s.hash()));
        let mut other = s.hash();
        other[31] ^= 1;
        assert!(!s.matches(&other));
        assert!(!s.matches(&s.hash()[..31]), "a short hash never matches");
    }

    #[test]
    fn secrets_are_unique_prefixed_and_never_debug_printed() {
        let a = Secret::generate(JOIN_TOKEN);
        let b = Secret::generate(JOIN_TOKEN);
        assert!(a.expose().starts_with("cjt_"));
        assert_ne!(a, b);
        assert_ne!(a.hash(), b.hash());
        assert!(!format!("{a:?}").contains(a.expose()));
    }
}
