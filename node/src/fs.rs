//! The few filesystem steps every part of Velox needs, written once: private
//! directories, atomic private files, removal that tolerates absence, exclusive locks.

use nix::fcntl::{Flock, FlockArg};
use std::fs::{DirBuilder, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use crate::error::{Error, Result};
use crate::layout::{PRIVATE_DIR_MODE, PRIVATE_FILE_MODE};

/// Creates `dir` and its missing parents root-only (0700).
pub fn create_private_dir(dir: &Path) -> Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(PRIVATE_DIR_MODE)
        .create(dir)
        .map_err(Error::io(format!("creating {}", dir.display())))
}

/// Writes `path` with `mode` so that a reader sees the old content or the new, never
/// half; a symlink planted at the temporary name is not followed.
pub fn write_atomic(path: &Path, content: &[u8], mode: u32) -> Result<()> {
    let tmp = path.with_extension("tmp");
    write_new(&tmp, content, mode)?;
    std::fs::rename(&tmp, path).map_err(Error::io(format!("committing {}", path.display())))
}

/// Creates `path` with `content` and `mode`, first removing a leftover of an earlier
/// attempt; a symlink planted there is not followed.
pub fn write_new(path: &Path, content: &[u8], mode: u32) -> Result<()> {
    remove_if_exists(path)?;
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
        .map_err(Error::io(format!("creating {}", path.display())))?;
    file.write_all(content)
        .map_err(Error::io(format!("writing {}", path.display())))?;
    // The umask may have taken bits away from `mode`.
    file.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(Error::io(format!("setting the mode of {}", path.display())))
}

/// Removes a file; one that is not there is fine (every teardown is idempotent).
pub fn remove_if_exists(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(format!("removing {}", path.display()))(e)),
        _ => Ok(()),
    }
}

/// The content of a file, or `None` when it is not there.
pub fn read_if_exists(path: &Path) -> Result<Option<Vec<u8>>> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(format!("reading {}", path.display()))(e)),
    }
}

/// The paths in a directory; none when the directory is not there (yet).
pub fn list_dir(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(format!("listing {}", dir.display()))(e)),
    };
    entries
        .map(|entry| entry.map(|e| e.path()))
        .collect::<std::io::Result<_>>()
        .map_err(Error::io(format!("listing {}", dir.display())))
}

/// Opens a log file for appending: created 0600, a symlink in its place refused.
pub fn open_log(path: &Path) -> Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(PRIVATE_FILE_MODE)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
        .map_err(Error::io(format!("opening the log file {}", path.display())))
}

/// Takes the exclusive lock of `path` (created 0600), held until the guard drops.
pub fn lock(path: &Path) -> Result<Flock<File>> {
    if let Some(dir) = path.parent() {
        create_private_dir(dir)?;
    }
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(PRIVATE_FILE_MODE)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
        .map_err(Error::io(format!("opening {}", path.display())))?;
    Flock::lock(file, FlockArg::LockExclusive)
        .map_err(|(_, errno)| Error::io(format!("locking {}", path.display()))(errno.into()))
}

/// Takes the exclusive lock of the directory `dir` (bpffs holds no plain files, so
/// the directory itself is the lock) if nobody holds it; `None` when someone does.
pub fn try_lock_dir(dir: &Path) -> Result<Option<Flock<File>>> {
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_DIRECTORY | nix::libc::O_NOFOLLOW)
        .open(dir)
        .map_err(Error::io(format!("opening {}", dir.display())))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(guard) => Ok(Some(guard)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, errno)) => Err(Error::io(format!("locking {}", dir.display()))(errno.into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_directory_lock_is_not_taken_twice() {
        let dir = tempfile::tempdir().unwrap();
        let first = try_lock_dir(dir.path()).unwrap();
        assert!(first.is_some());
        assert!(
            try_lock_dir(dir.path()).unwrap().is_none(),
            "a second holder got the lock"
        );
        drop(first);
        assert!(try_lock_dir(dir.path()).unwrap().is_some());
    }

    #[test]
    fn atomic_files_are_private_and_replace_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/record.json");
        create_private_dir(path.parent().unwrap()).unwrap();
        write_atomic(&path, b"one", PRIVATE_FILE_MODE).unwrap();
        write_atomic(&path, b"two", PRIVATE_FILE_MODE).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        assert_eq!(read_if_exists(&path).unwrap().as_deref(), Some(&b"two"[..]));
        assert_eq!(list_dir(path.parent().unwrap()).unwrap(), std::slice::from_ref(&path));
        remove_if_exists(&path).unwrap();
        remove_if_exists(&path).unwrap();
        assert!(!path.exists());
        assert_eq!(read_if_exists(&path).unwrap(), None);
        assert!(list_dir(&dir.path().join("none")).unwrap().is_empty());
    }

    #[test]
    fn a_planted_symlink_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"keep").unwrap();
        let path = dir.path().join("lockfile");
        std::os::unix::fs::symlink(&victim, &path).unwrap();
        assert!(lock(&path).is_err());
        assert!(open_log(&path).is_err());
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
    }
}
