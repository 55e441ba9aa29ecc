//! The tenant's lock key on this machine: a file (`clk_` + base64url of the 32-byte seed, mode
//! 0600, refused if others may read it), by default `~/.config/canopy/lock/NETWORK_ID.key`,
//! and next to it the pin of the key set this console made last (`NETWORK_ID.pin`).

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, anyhow, bail};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use canopy_proto::lock::{self, SigningKey};
use canopy_proto::v1::NetworkLock;

const KEY_PREFIX: &str = "clk_";

/// Where the signing key of `network_id` is: `explicit`, or the default path.
pub(super) fn key_path(explicit: Option<PathBuf>, network_id: &str) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p);
    }
    let dir = crate::console::config::default_path()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .ok_or_else(|| anyhow!("no HOME or XDG_CONFIG_HOME: pass --key FILE"))?;
    Ok(dir.join("lock").join(format!("{network_id}.key")))
}

/// Reads a signing key file; refuses one that others may read.
pub(super) fn load_key(path: &Path) -> anyhow::Result<SigningKey> {
    let meta = std::fs::metadata(path)
        .with_context(|| format!("the lock key {} (pass --key FILE)", path.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        bail!(
            "{}: the lock key must be readable by its owner only (chmod 600)",
            path.display()
        );
    }
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let seed = text
        .trim()
        .strip_prefix(KEY_PREFIX)
        .and_then(|b| URL_SAFE_NO_PAD.decode(b).ok())
        .and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
        .ok_or_else(|| anyhow!("{}: not a canopy lock key ({KEY_PREFIX}…)", path.display()))?;
    Ok(lock::signing_key(seed))
}

/// Makes a new signing key file (mode 0600; never overwrites one).
pub(super) fn create_key(path: &Path) -> anyhow::Result<SigningKey> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    let seed: [u8; 32] = rand::random();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    writeln!(f, "{KEY_PREFIX}{}", URL_SAFE_NO_PAD.encode(seed))?;
    f.sync_all()?;
    Ok(lock::signing_key(seed))
}

pub(super) fn public(k: &SigningKey) -> Vec<u8> {
    k.verifying_key().to_bytes().to_vec()
}

pub(super) fn b64(k: &[u8]) -> String {
    STANDARD.encode(k)
}

pub(super) fn parse_public(s: &str) -> anyhow::Result<Vec<u8>> {
    STANDARD
        .decode(s.trim())
        .ok()
        .filter(|b| b.len() == 32)
        .ok_or_else(|| anyhow!("{s:?} is not a public key (32 bytes, base64)"))
}

/// The pin file kept next to the key (`NET.pin`): the key set this console made last, which
/// join strings must pin.
pub(super) fn pin_path(key: &Path) -> PathBuf {
    key.with_extension("pin")
}

pub(super) fn save_pin(key: &Path, l: &NetworkLock) -> anyhow::Result<()> {
    let pin = l.chain.as_ref().and_then(lock::pin);
    let pin = pin.ok_or_else(|| anyhow!("the controller answered without the key sets"))?;
    let path = pin_path(key);
    canopy_proto::files::write_atomic(&path, format!("{}\n", hex::encode(pin)).as_bytes(), 0o600)
        .with_context(|| format!("writing {}", path.display()))
}

/// A join string of network `network_id` must pin the key set this console made last (when
/// it keeps one): a controller that hands out join strings pinning other keys is caught here.
pub fn check_pin(network_id: &str, join: &str, key: Option<PathBuf>) -> anyhow::Result<()> {
    let path = pin_path(&key_path(key, network_id)?);
    let Ok(kept) = std::fs::read_to_string(&path) else {
        return Ok(());
    };
    let pinned = canopy_proto::join::JoinString::parse(join)?.lock_sha256;
    if pinned.map(hex::encode).as_deref() != Some(kept.trim()) {
        bail!(
            "the controller's join string does not pin the network's key set ({} says {}): not using it",
            path.display(),
            kept.trim()
        );
    }
    Ok(())
}
