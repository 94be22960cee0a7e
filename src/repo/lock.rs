//! An exclusive, advisory lock so two `archiver stream` processes never write to one repository.
//! `flock` is released by the kernel when the process dies (kill -9 included), so a stale lock
//! never blocks a restart. The file holds the owner's PID for humans.

use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("repository is locked by another archiver process (pid {pid}, lock file {path}); only one `archiver stream` may write to a repository")]
    Busy { path: PathBuf, pid: String },
    #[error("cannot create lock file {path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
}

/// Held for as long as the value lives.
#[derive(Debug)]
pub struct RepoLock {
    _file: File,
    path: PathBuf,
}

impl RepoLock {
    pub fn acquire(path: &Path) -> Result<RepoLock, LockError> {
        let io = |cause| LockError::Io {
            path: path.to_path_buf(),
            cause,
        };
        let mut file = crate::storage::fs::open_private(path).map_err(io)?;
        // SAFETY: flock on a file descriptor we own.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                return Err(LockError::Busy {
                    path: path.to_path_buf(),
                    pid: pid.trim().to_string(),
                });
            }
            return Err(io(err));
        }
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        writeln!(file, "{}", std::process::id()).map_err(io)?;
        Ok(RepoLock {
            _file: file,
            path: path.to_path_buf(),
        })
    }

    /// Whether some process holds the lock at `path` (a probe that never writes the file, and
    /// holds nothing after it returns).
    pub fn is_held(path: &Path) -> bool {
        let Ok(file) = File::open(path) else {
            return false;
        };
        // SAFETY: flock on a file descriptor we own; released when `file` closes.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) };
        rc != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EWOULDBLOCK)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_is_refused_until_released() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("lock");
        let a = RepoLock::acquire(&p).unwrap();
        match RepoLock::acquire(&p) {
            Err(LockError::Busy { pid, .. }) => assert_eq!(pid, std::process::id().to_string()),
            other => panic!("expected Busy, got {other:?}"),
        }
        assert!(RepoLock::is_held(&p));
        drop(a);
        assert!(!RepoLock::is_held(&p));
        assert!(!RepoLock::is_held(&dir.path().join("absent")));
        RepoLock::acquire(&p).unwrap();
    }
}
