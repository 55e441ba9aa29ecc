//! The console config file (TOML, mode 0600): server, API token and the controller CA's pin.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, anyhow};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject as _;
use serde::{Deserialize, Serialize};

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleConfig {
    pub server: Option<String>,
    pub token: Option<String>,
    /// SHA-256 of the controller's CA certificate (hex).
    pub ca_sha256: Option<String>,
}

pub fn default_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("canopy").join("console.toml"))
}

impl ConsoleConfig {
    pub fn load(path: &Path) -> anyhow::Result<Option<Self>> {
        match std::fs::read_to_string(path) {
            Ok(s) => {
                Ok(Some(toml::from_str(&s).with_context(|| {
                    format!("config file {}", path.display())
                })?))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let text = toml::to_string(self).context("encoding config")?;
        crate::files::write_private(path, text.as_bytes())
            .with_context(|| format!("writing {}", path.display()))
    }
}

pub fn parse_pin(hex_pin: &str) -> anyhow::Result<[u8; 32]> {
    let b = hex::decode(hex_pin.trim())
        .map_err(|_| anyhow!("ca_sha256 in the console config is not hex"))?;
    b.as_slice()
        .try_into()
        .map_err(|_| anyhow!("ca_sha256 in the console config is not 32 bytes"))
}

/// The pin (SHA-256 of the DER) of the first certificate in a PEM file.
pub fn pem_pin(pem: &[u8]) -> anyhow::Result<[u8; 32]> {
    let cert = CertificateDer::pem_slice_iter(pem)
        .next()
        .ok_or_else(|| anyhow!("CA file holds no certificate"))?
        .map_err(|e| anyhow!("CA file: {e}"))?;
    Ok(canopy_proto::sha256(cert.as_ref()))
}
