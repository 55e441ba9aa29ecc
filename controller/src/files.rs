//! Small file helpers: secrets are written 0600 from the start (never chmod-after-write).

use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

/// Writes `data` to `path` with mode 0600, atomically ([`canopy_proto::files::write_atomic`]).
pub fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    write_mode(path, data, 0o600)
}

pub fn write_public(path: &Path, data: &[u8]) -> std::io::Result<()> {
    write_mode(path, data, 0o644)
}

fn write_mode(path: &Path, data: &[u8], mode: u32) -> std::io::Result<()> {
    canopy_proto::files::write_atomic(path, data, mode)
}

pub fn read_string(path: &Path) -> std::io::Result<String> {
    std::fs::read_to_string(path)
}

/// Creates `path` empty with mode 0600 if it is missing, and makes an existing file 0600.
pub fn ensure_private_file(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
}

/// Creates `dir` (and its parents) and makes it 0700: the controller's data dir holds keys,
/// tokens and the store.
pub fn ensure_private_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Holds an exclusive lock on `path` (created if missing) until dropped. Replicas that share a
/// data dir take it around first-start initialisation, so only one creates the CA and the
/// admin token and the others then read them. Waits without blocking the runtime (another
/// replica in this very process may hold it), for at most a minute.
pub async fn lock_exclusive(path: &Path) -> std::io::Result<std::fs::File> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)?;
    let start = std::time::Instant::now();
    loop {
        match f.try_lock() {
            Ok(()) => return Ok(f),
            Err(std::fs::TryLockError::WouldBlock) if start.elapsed().as_secs() < 60 => {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "{} is held by another process for over a minute",
                        path.display()
                    ),
                ));
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(e),
        }
    }
}
