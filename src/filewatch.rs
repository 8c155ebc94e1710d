//! "Did this file change?": one answer for every file the service watches
//! (model configs and files for hot reloads, TLS files, the HTTP token file,
//! MQTT password and `K8S-SAT` token files).
//!
//! Owns: a file's [`Stamp`] (modification time, size and inode, so an atomic
//! rename or a same-second rewrite of another size counts too) and
//! [`Watched`], a path with the stamp last seen. Deciding what a change means
//! (reload, reconnect, re-read) is the caller's.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// What a file looks like from outside; `None` from [`stamp`] when it cannot be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

/// `path`'s stamp now (following symlinks, as Kubernetes' projected volumes need).
pub fn stamp(path: &Path) -> Option<Stamp> {
    let m = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let inode = std::os::unix::fs::MetadataExt::ino(&m);
    #[cfg(not(unix))]
    let inode = 0;
    Some(Stamp {
        modified: m.modified().ok(),
        len: m.len(),
        inode,
    })
}

/// A file and the stamp it had when last looked at.
#[derive(Debug, Clone)]
pub struct Watched {
    pub path: PathBuf,
    seen: Option<Stamp>,
}

impl Watched {
    /// Watches `path` from now on (its current state is not a change).
    pub fn new(path: impl Into<PathBuf>) -> Watched {
        let path = path.into();
        let seen = stamp(&path);
        Watched { path, seen }
    }

    /// True once for each change since the last call (or since `new`).
    pub fn changed(&mut self) -> bool {
        let now = stamp(&self.path);
        let changed = now != self.seen;
        self.seen = now;
        changed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rewrite_a_rename_and_a_removal_are_changes_and_nothing_else_is() {
        let dir = std::env::temp_dir().join(format!("aei-filewatch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("token");
        std::fs::write(&f, "one").unwrap();
        let mut w = Watched::new(&f);
        assert!(!w.changed(), "nothing happened");
        std::fs::write(&f, "two, longer").unwrap();
        assert!(w.changed(), "rewritten");
        assert!(!w.changed(), "reported once");
        let next = dir.join("token.new");
        std::fs::write(&next, "three").unwrap();
        std::fs::rename(&next, &f).unwrap();
        assert!(w.changed(), "replaced by a rename");
        std::fs::remove_file(&f).unwrap();
        assert!(w.changed(), "removed");
        assert!(!w.changed());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
