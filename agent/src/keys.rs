//! WireGuard keys (Curve25519), in the base64 text form `wg` uses. Made on the node; the private
//! key is written 0600 and never leaves it.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use x25519_dalek::{PublicKey, StaticSecret};

/// A private key that never prints itself.
#[derive(Clone)]
pub struct PrivateKey(StaticSecret);

impl std::fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PrivateKey(<redacted>)")
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("key is not valid base64")]
    Base64,
    #[error("key must be 32 bytes, got {0}")]
    Length(usize),
}

impl PrivateKey {
    pub fn generate() -> Self {
        Self(StaticSecret::random())
    }
    pub fn from_base64(s: &str) -> Result<Self, KeyError> {
        Ok(Self(StaticSecret::from(decode32(s)?)))
    }
    pub fn to_base64(&self) -> String {
        STANDARD.encode(self.0.to_bytes())
    }
    pub fn public_key(&self) -> [u8; 32] {
        PublicKey::from(&self.0).to_bytes()
    }
    pub fn secret(&self) -> &StaticSecret {
        &self.0
    }
}

/// Decodes a base64 WireGuard key.
pub fn decode32(s: &str) -> Result<[u8; 32], KeyError> {
    let b = STANDARD.decode(s.trim()).map_err(|_| KeyError::Base64)?;
    b.as_slice()
        .try_into()
        .map_err(|_| KeyError::Length(b.len()))
}

pub fn encode(key: &[u8]) -> String {
    STANDARD.encode(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_through_base64_and_match_wg_pubkey() {
        // `echo yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk= | wg pubkey`
        let k = PrivateKey::from_base64("yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=").unwrap();
        assert_eq!(
            encode(&k.public_key()),
            "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw="
        );
        assert_eq!(
            PrivateKey::from_base64(&k.to_base64())
                .unwrap()
                .public_key(),
            k.public_key()
        );
        assert_eq!(decode32("AAAA").unwrap_err(), KeyError::Length(3));
        assert_eq!(decode32("not base64!").unwrap_err(), KeyError::Base64);
        assert!(!format!("{k:?}").contains(&k.to_base64()));
    }
}
