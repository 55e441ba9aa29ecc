//! Small file helpers: secrets are written 0600 from the start (never chmod-after-write).

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

/// Writes `data` to `path` with mode 0600, atomically (temp file + rename).
pub fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    write_mode(path, data, 0o600)
}

pub fn write_public(path: &Path, data: &[u8]) -> std::io::Result<()> {
    write_mode(path, data, 0o644)
}

fn write_mode(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

pub fn read_string(path: &Path) -> std::io::Result<String> {
    std::fs::read_to_string(path)
}
