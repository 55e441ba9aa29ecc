//! The agent's state directory:
//!
//! ```text
//! private.key    the WireGuard private key, base64, mode 0600 (made here, never sent)
//! enrollment     controller URL, CA pin, peer id, network id, Sync credential (mode 0600)
//! map.pb         the last applied NetworkMap (protobuf), so the node keeps its network while
//!                the controller is away and resumes from its revision
//! lock.pb        a locked network's key set this node trusts (LockKeySet), moved forward only
//!                by sets signed by a key of it; lock.json what it refused (for `status`);
//!                lock-policy.pb the signed policy it follows (PolicyLock)
//! credential.pending  the Sync credential made for an enrollment in progress, with the hash of
//!                the join string it is for (mode 0600): kept before asking, so a retry after a
//!                lost answer gets the same enrollment; another join string gets a new one
//! ```
//! Every write is atomic (temp file + rename) and secret files are created 0600.

use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};

use canopy_proto::v1::NetworkMap;
use prost::Message as _;
use serde::{Deserialize, Serialize};

use crate::keys::PrivateKey;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("the enrollment's CA pin is not valid: {0}")]
    CaPin(&'static str),
}

/// What the agent keeps from its enrollment.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Enrollment {
    pub controller_url: String,
    /// SHA-256 of the controller's CA certificate, hex.
    pub ca_sha256: String,
    pub peer_id: String,
    pub network_id: String,
    pub credential: String,
    /// The join string's pin of its network's lock key set (SHA-256, hex), if it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock_sha256: Option<String>,
    /// A presigned enrollment: this node's membership as the join string's delegate key
    /// signed it, and the tenant's delegation (each a `Signed`, base64), told in every Hello.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock_self: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock_delegation: Option<String>,
}

impl std::fmt::Debug for Enrollment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enrollment")
            .field("controller_url", &self.controller_url)
            .field("peer_id", &self.peer_id)
            .field("network_id", &self.network_id)
            .field("credential", &"<redacted>")
            .finish()
    }
}

impl Enrollment {
    pub fn ca_pin(&self) -> Result<[u8; 32], StateError> {
        let b = hex::decode(&self.ca_sha256).map_err(|_| StateError::CaPin("not hex"))?;
        b.as_slice()
            .try_into()
            .map_err(|_| StateError::CaPin("not 32 bytes"))
    }
}

#[derive(Clone, Debug)]
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    /// Opens the directory, creating it (mode 0700) if needed.
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| StateError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The node's private key, generated on first use.
    pub fn private_key(&self) -> Result<PrivateKey, StateError> {
        let path = self.dir.join("private.key");
        match std::fs::read_to_string(&path) {
            Ok(s) => PrivateKey::from_base64(&s).map_err(|e| StateError::Invalid {
                path,
                reason: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = PrivateKey::generate();
                write_atomic(&path, format!("{}\n", key.to_base64()).as_bytes(), 0o600)?;
                tracing::info!(path = %path.display(), "generated a new WireGuard key");
                Ok(key)
            }
            Err(source) => Err(StateError::Io { path, source }),
        }
    }

    pub fn enrollment(&self) -> Result<Option<Enrollment>, StateError> {
        self.read_optional("enrollment", |b| serde_json::from_slice(b))
    }

    /// Reads and decodes the file `name`; `None` if it does not exist.
    fn read_optional<T, E: std::fmt::Display>(
        &self,
        name: &str,
        decode: impl FnOnce(&[u8]) -> Result<T, E>,
    ) -> Result<Option<T>, StateError> {
        let path = self.dir.join(name);
        match std::fs::read(&path) {
            Ok(b) => decode(&b).map(Some).map_err(|e| StateError::Invalid {
                path,
                reason: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StateError::Io { path, source }),
        }
    }

    pub fn save_enrollment(&self, e: &Enrollment) -> Result<(), StateError> {
        let path = self.dir.join("enrollment");
        let data = serde_json::to_vec_pretty(e).map_err(|err| StateError::Invalid {
            path: path.clone(),
            reason: err.to_string(),
        })?;
        write_atomic(&path, &data, 0o600)
    }

    /// Forgets the enrollment and the map (the node was removed); keeps the key.
    pub fn clear_enrollment(&self) -> Result<(), StateError> {
        self.remove(&["enrollment", "map.pb"])?;
        self.forget_lock()
    }

    /// Forgets what the network lock trusted (a new enrollment pins anew).
    fn forget_lock(&self) -> Result<(), StateError> {
        self.remove(&["lock.pb", "lock.json", "lock-policy.pb"])
    }

    fn remove(&self, names: &[&str]) -> Result<(), StateError> {
        for name in names {
            let path = self.dir.join(name);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(StateError::Io { path, source }),
            }
        }
        Ok(())
    }

    /// The credential for the enrollment in progress with `join` (a join string): the one an
    /// earlier attempt with the same join string kept, or `fresh` (made by the caller),
    /// written 0600 before it is sent anywhere.
    pub fn pending_credential(
        &self,
        join: &str,
        fresh: impl FnOnce() -> String,
    ) -> Result<String, StateError> {
        let path = self.dir.join("credential.pending");
        let for_join = hex::encode(canopy_proto::sha256(join.as_bytes()));
        if let Some(kept) = self.read_optional("credential.pending", |b| {
            String::from_utf8(b.to_vec()).map(|s| s.trim().to_string())
        })? && let Some((j, c)) = kept.split_once(' ')
            && j == for_join
            && !c.is_empty()
        {
            return Ok(c.to_string());
        }
        let c = fresh();
        write_atomic(&path, format!("{for_join} {c}\n").as_bytes(), 0o600)?;
        Ok(c)
    }

    /// Saves the enrollment and its first map, then forgets the pending credential.
    pub fn complete_enrollment(&self, e: &Enrollment, map: &NetworkMap) -> Result<(), StateError> {
        // Another network's lock, or one from before, must not outlive the enrollment it was for.
        self.forget_lock()?;
        self.save_enrollment(e)?;
        self.save_map(map)?;
        let path = self.dir.join("credential.pending");
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StateError::Io { path, source }),
        }
    }

    /// The UDP port this node listened on last (`None`: never started, or not recorded): a
    /// restart takes it again, so the endpoints its peers hold stay right.
    pub fn listen_port(&self) -> Result<Option<u16>, StateError> {
        let path = self.dir.join("listen-port");
        match std::fs::read_to_string(&path) {
            Ok(s) => s.trim().parse().map(Some).map_err(|_| StateError::Invalid {
                path,
                reason: "not a port number".into(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StateError::Io { path, source }),
        }
    }

    pub fn save_listen_port(&self, port: u16) -> Result<(), StateError> {
        write_atomic(
            &self.dir.join("listen-port"),
            format!("{port}\n").as_bytes(),
            0o600,
        )
    }

    pub fn map(&self) -> Result<Option<NetworkMap>, StateError> {
        self.read_optional("map.pb", |b| NetworkMap::decode(b))
    }

    pub fn save_map(&self, map: &NetworkMap) -> Result<(), StateError> {
        write_atomic(&self.dir.join("map.pb"), &map.encode_to_vec(), 0o600)
    }

    /// The network lock's key set this node trusts, if it trusts one.
    pub fn lock_trust(&self) -> Result<Option<canopy_proto::v1::LockKeySet>, StateError> {
        self.read_optional("lock.pb", |b| canopy_proto::v1::LockKeySet::decode(b))
    }

    pub fn save_lock_trust(&self, set: &canopy_proto::v1::LockKeySet) -> Result<(), StateError> {
        write_atomic(&self.dir.join("lock.pb"), &set.encode_to_vec(), 0o600)
    }

    /// A locked network's signed policy this node follows (the newest it verified).
    pub fn lock_policy(&self) -> Result<Option<canopy_proto::v1::PolicyLock>, StateError> {
        self.read_optional("lock-policy.pb", |b| {
            canopy_proto::v1::PolicyLock::decode(b)
        })
    }

    pub fn save_lock_policy(&self, p: &canopy_proto::v1::PolicyLock) -> Result<(), StateError> {
        write_atomic(&self.dir.join("lock-policy.pb"), &p.encode_to_vec(), 0o600)
    }

    /// What the lock refused in the map held now (JSON), for `canopy-agent status`.
    pub fn save_lock_status(&self, json: &serde_json::Value) -> Result<(), StateError> {
        write_atomic(
            &self.dir.join("lock.json"),
            json.to_string().as_bytes(),
            0o600,
        )
    }

    pub fn lock_status(&self) -> Result<Option<serde_json::Value>, StateError> {
        self.read_optional("lock.json", |b| {
            serde_json::from_slice::<serde_json::Value>(b)
        })
    }

    /// The running agent's packet counters (JSON), for `canopy-agent status`.
    pub fn save_counters(&self, json: &serde_json::Value) -> Result<(), StateError> {
        write_atomic(
            &self.dir.join("counters.json"),
            json.to_string().as_bytes(),
            0o600,
        )
    }

    pub fn counters(&self) -> Result<Option<serde_json::Value>, StateError> {
        self.read_optional("counters.json", |b| {
            serde_json::from_slice::<serde_json::Value>(b)
        })
    }
}

fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), StateError> {
    let io = |source| StateError::Io {
        path: path.to_path_buf(),
        source,
    };
    canopy_proto::files::write_atomic(path, data, mode).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn private_key_is_made_once_with_mode_0600() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateDir::open(dir.path()).unwrap();
        let k1 = s.private_key().unwrap();
        let k2 = StateDir::open(dir.path()).unwrap().private_key().unwrap();
        assert_eq!(
            k1.public_key(),
            k2.public_key(),
            "the key survives a restart"
        );
        let mode = std::fs::metadata(dir.path().join("private.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn a_new_enrollment_forgets_the_lock_it_trusted_before() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateDir::open(dir.path()).unwrap();
        let set = canopy_proto::v1::LockKeySet {
            network_id: "net_old".into(),
            serial: 3,
            ..Default::default()
        };
        s.save_lock_trust(&set).unwrap();
        assert_eq!(s.lock_trust().unwrap(), Some(set));
        let e = Enrollment {
            controller_url: "https://c".into(),
            ca_sha256: String::new(),
            peer_id: "p".into(),
            network_id: "net_new".into(),
            credential: "cpc_x".into(),
            lock_sha256: None,
            lock_self: None,
            lock_delegation: None,
        };
        s.complete_enrollment(&e, &NetworkMap::default()).unwrap();
        assert_eq!(s.lock_trust().unwrap(), None);
    }

    #[test]
    fn a_corrupt_key_file_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("private.key"), "garbage").unwrap();
        let err = StateDir::open(dir.path())
            .unwrap()
            .private_key()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("private.key") && err.contains("base64"),
            "{err}"
        );
    }
}
