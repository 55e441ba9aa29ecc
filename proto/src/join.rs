//! Join strings: one copy-pasteable line, `canopy1:<base64url(JoinPayload)>`.
//!
//! It carries the controller URL, the join token secret, and the SHA-256 of the controller's CA
//! certificate, so the agent can pin the controller on first contact without a copy of the CA;
//! for a locked network, the SHA-256 of its key set then, so the agent trusts the tenant's keys
//! and not whatever keys the controller shows it.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use prost::Message as _;

use crate::v1::JoinPayload;

const PREFIX: &str = "canopy1:";

/// What a join string says.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinString {
    pub controller_url: String,
    pub token: String,
    pub ca_sha256: [u8; 32],
    /// The network lock's key set (SHA-256 of its body) when the token was made.
    pub lock_sha256: Option<[u8; 32]>,
    /// A presigned join string: the tenant's delegation and the delegate key's seed.
    pub lock_delegate: Option<(crate::v1::Signed, [u8; 32])>,
}

impl std::fmt::Debug for JoinString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinString")
            .field("controller_url", &self.controller_url)
            .field("token", &"<redacted>")
            .field("ca_sha256", &hex::encode(self.ca_sha256))
            .field("lock_sha256", &self.lock_sha256.map(hex::encode))
            .field("presigned", &self.lock_delegate.is_some())
            .finish()
    }
}

/// Why a join string could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JoinStringError {
    #[error("join string must start with '{PREFIX}'")]
    Prefix,
    #[error("join string is garbled (not base64url): was it copied whole?")]
    Encoding,
    #[error("join string is garbled (bad payload): was it copied whole?")]
    Payload,
    #[error("join string has no {0}")]
    Missing(&'static str),
    #[error("join string's CA hash is {0} bytes, expected 32")]
    CaHashLength(usize),
    #[error("join string's lock hash is {0} bytes, expected 32")]
    LockHashLength(usize),
    #[error("join string's controller URL {0:?} must start with https://")]
    Url(String),
}

impl JoinString {
    pub fn encode(&self) -> String {
        let payload = JoinPayload {
            controller_url: self.controller_url.clone(),
            token: self.token.clone(),
            ca_sha256: self.ca_sha256.to_vec(),
            lock_sha256: self.lock_sha256.map(|h| h.to_vec()).unwrap_or_default(),
            lock_delegation: self.lock_delegate.as_ref().map(|(d, _)| d.clone()),
            lock_delegate_seed: self
                .lock_delegate
                .as_ref()
                .map(|(_, s)| s.to_vec())
                .unwrap_or_default(),
        };
        format!(
            "{PREFIX}{}",
            URL_SAFE_NO_PAD.encode(payload.encode_to_vec())
        )
    }

    pub fn parse(s: &str) -> Result<Self, JoinStringError> {
        let body = s
            .trim()
            .strip_prefix(PREFIX)
            .ok_or(JoinStringError::Prefix)?;
        let bytes = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| JoinStringError::Encoding)?;
        let p = JoinPayload::decode(bytes.as_slice()).map_err(|_| JoinStringError::Payload)?;
        if p.controller_url.is_empty() {
            return Err(JoinStringError::Missing("controller URL"));
        }
        if !p.controller_url.starts_with("https://") {
            return Err(JoinStringError::Url(p.controller_url));
        }
        if p.token.is_empty() {
            return Err(JoinStringError::Missing("token"));
        }
        let ca_sha256: [u8; 32] = p
            .ca_sha256
            .as_slice()
            .try_into()
            .map_err(|_| JoinStringError::CaHashLength(p.ca_sha256.len()))?;
        let lock_sha256 = match p.lock_sha256.len() {
            0 => None,
            32 => p.lock_sha256.as_slice().try_into().ok(),
            n => return Err(JoinStringError::LockHashLength(n)),
        };
        let lock_delegate = match (p.lock_delegation, p.lock_delegate_seed.len()) {
            (None, 0) => None,
            (Some(d), 32) => p
                .lock_delegate_seed
                .as_slice()
                .try_into()
                .ok()
                .map(|s| (d, s)),
            _ => return Err(JoinStringError::Missing("whole delegation")),
        };
        Ok(Self {
            controller_url: p.controller_url,
            token: p.token,
            ca_sha256,
            lock_sha256,
            lock_delegate,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> JoinString {
        JoinString {
            controller_url: "https://127.0.0.1:7443".into(),
            token: "cjt_secret".into(),
            ca_sha256: [7; 32],
            lock_sha256: None,
            lock_delegate: None,
        }
    }

    #[test]
    fn join_string_round_trips() {
        let s = sample().encode();
        assert!(s.starts_with("canopy1:"));
        assert_eq!(JoinString::parse(&s).unwrap(), sample());
        let locked = JoinString {
            lock_sha256: Some([9; 32]),
            lock_delegate: Some((crate::v1::Signed::default(), [3; 32])),
            ..sample()
        };
        assert_eq!(JoinString::parse(&locked.encode()).unwrap(), locked);
    }

    #[test]
    fn garbled_join_strings_are_rejected_with_the_reason() {
        let good = sample().encode();
        assert_eq!(JoinString::parse("hello"), Err(JoinStringError::Prefix));
        assert_eq!(
            JoinString::parse("canopy1:!!!"),
            Err(JoinStringError::Encoding)
        );
        // A truncated copy must not parse as a different valid token.
        let truncated = &good[..good.len() - 10];
        assert!(JoinString::parse(truncated).is_err());
        let mut short = sample();
        short.token.clear();
        assert_eq!(
            JoinString::parse(&short.encode()),
            Err(JoinStringError::Missing("token"))
        );
        let plain = JoinPayload {
            controller_url: "http://x".into(),
            token: "t".into(),
            ca_sha256: vec![0; 32],
            ..Default::default()
        };
        let s = format!("canopy1:{}", URL_SAFE_NO_PAD.encode(plain.encode_to_vec()));
        assert!(matches!(
            JoinString::parse(&s),
            Err(JoinStringError::Url(_))
        ));
    }

    #[test]
    fn debug_output_redacts_the_token() {
        assert!(!format!("{:?}", sample()).contains("cjt_secret"));
    }
}
