//! One writer per folder: a run folder (`mixlm train`, and each run `compare` and
//! `mix-search` start) or a prepared dataset (`mixlm prepare`).
//!
//! The writer holds an exclusive OS file lock (`flock` on Unix, `LockFileEx` on
//! Windows, through [`std::fs::File::try_lock`]) on `<folder>/.mixlm.lock`, taken
//! before anything else in the folder is written. The kernel releases it when the
//! process ends, however it ends (`kill -9` included), so a lock left by a dead
//! process never blocks anything: the file stays, but nobody holds it. The holder
//! writes its PID and command into the file so that a refused writer can say who has
//! the folder. Readers (`eval`, `doctor`, `compare --report-only`) take no lock.
//!
//! Within one process the lock is re-entrant: a pipeline that holds a run folder
//! while it trains and then evaluates the run takes it again in the trainer without
//! refusing itself.

use std::collections::HashMap;
use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

/// The lock file's name inside a locked folder.
pub const LOCK_FILE: &str = ".mixlm.lock";

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error(
        "{} is in use by another mixlm ({holder}): wait for it to finish, or stop it \
         (`kill {pid}`: a run continues with `mixlm train --resume`); reading it \
         (eval, doctor) needs no lock",
        folder.display(),
        pid = pid.map_or("PID".to_string(), |p| p.to_string())
    )]
    Held {
        folder: PathBuf,
        /// `PID 1234, mixlm train`, as the holder wrote it.
        holder: String,
        pid: Option<u32>,
    },
    #[error("cannot lock {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Held while the folder is written; released when the last clone is dropped (or the
/// process ends).
#[derive(Debug, Clone)]
pub struct FolderLock {
    _held: Arc<Held>,
}

#[derive(Debug)]
struct Held {
    key: PathBuf,
    _file: File,
}

impl Drop for Held {
    fn drop(&mut self) {
        // The file's close releases the OS lock.
        held()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.key);
    }
}

/// The folders this process holds, by canonical path.
fn held() -> &'static Mutex<HashMap<PathBuf, Weak<Held>>> {
    static HELD: std::sync::OnceLock<Mutex<HashMap<PathBuf, Weak<Held>>>> =
        std::sync::OnceLock::new();
    HELD.get_or_init(Default::default)
}

impl FolderLock {
    /// Creates `folder` if missing and locks it for `command` (e.g. `mixlm train`),
    /// or says who holds it.
    pub fn acquire(folder: &Path, command: &str) -> Result<FolderLock, LockError> {
        let io = |path: &Path, source| LockError::Io {
            path: path.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(folder).map_err(|e| io(folder, e))?;
        let key = folder.canonicalize().map_err(|e| io(folder, e))?;
        let mut map = held().lock().unwrap_or_else(|e| e.into_inner());
        if let Some(held) = map.get(&key).and_then(Weak::upgrade) {
            return Ok(FolderLock { _held: held });
        }
        let path = folder.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| io(&path, e))?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut text = String::new();
                let _ = file.read_to_string(&mut text);
                let text = text.trim();
                let pid = text
                    .strip_prefix("PID ")
                    .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
                    .and_then(|s| s.parse().ok());
                return Err(LockError::Held {
                    folder: folder.to_path_buf(),
                    holder: match text.is_empty() {
                        true => "it is starting".into(),
                        false => text.to_string(),
                    },
                    pid,
                });
            }
            Err(TryLockError::Error(e)) => return Err(io(&path, e)),
        }
        let me = format!("PID {}, {command}\n", std::process::id());
        (|| {
            file.set_len(0)?;
            file.seek(SeekFrom::Start(0))?;
            file.write_all(me.as_bytes())
        })()
        .map_err(|e| io(&path, e))?;
        let held = Arc::new(Held {
            key: key.clone(),
            _file: file,
        });
        map.insert(key, Arc::downgrade(&held));
        Ok(FolderLock { _held: held })
    }
}

/// Who holds `folder`'s lock now (`PID 1234, mixlm train`), if another open of it
/// does; a reader says so (what it reads may change) without taking the lock.
pub fn holder(folder: &Path) -> Option<String> {
    let mut file = File::open(folder.join(LOCK_FILE)).ok()?;
    match file.try_lock_shared() {
        Ok(()) => None,
        Err(TryLockError::WouldBlock) => {
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            Some(text.trim().to_string())
        }
        Err(TryLockError::Error(_)) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_open_of_the_lock_file_is_refused_until_the_holder_drops_it() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("run");
        let lock = FolderLock::acquire(&run, "mixlm train").unwrap();
        // Re-entrant in this process.
        let again = FolderLock::acquire(&run, "mixlm train").unwrap();
        // Another open file description (as another process has) is refused.
        let other = File::options()
            .write(true)
            .open(run.join(LOCK_FILE))
            .unwrap();
        assert!(matches!(other.try_lock(), Err(TryLockError::WouldBlock)));
        let text = std::fs::read_to_string(run.join(LOCK_FILE)).unwrap();
        assert_eq!(text, format!("PID {}, mixlm train\n", std::process::id()));
        assert_eq!(
            holder(&run).unwrap(),
            format!("PID {}, mixlm train", std::process::id())
        );
        drop(lock);
        assert!(matches!(other.try_lock(), Err(TryLockError::WouldBlock)));
        drop(again);
        other.try_lock().unwrap();
        drop(other);
        assert_eq!(holder(&run), None, "released");
    }

    #[test]
    fn the_refusal_names_the_folder_and_the_pid() {
        let e = LockError::Held {
            folder: "runs/x".into(),
            holder: "PID 42, mixlm train".into(),
            pid: Some(42),
        };
        assert_eq!(
            e.to_string(),
            "runs/x is in use by another mixlm (PID 42, mixlm train): wait for it to finish, \
             or stop it (`kill 42`: a run continues with `mixlm train --resume`); reading it \
             (eval, doctor) needs no lock"
        );
    }
}
