//! Blob files under one root: `<root>/<key>/<name>`. Writes go to a temporary file in the same
//! folder, are fsynced, renamed into place and the folder fsynced, so a reader (or a restart)
//! sees a whole file or none.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::PathBuf;

/// A folder of blobs.
#[derive(Debug, Clone)]
pub struct BlobStore {
    root: PathBuf,
}

fn safe(part: &str) -> io::Result<&str> {
    let ok = !part.is_empty()
        && part != "."
        && part != ".."
        && part
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(part)
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "invalid blob key",
        ))
    }
}

impl BlobStore {
    /// Uses (and creates) `root`.
    ///
    /// # Errors
    /// When the folder cannot be created.
    pub fn new(root: PathBuf) -> io::Result<Self> {
        fs::create_dir_all(&root)?;
        Ok(Self { root })
    }

    /// Writes `<key>/<name>` atomically and durably.
    ///
    /// # Errors
    /// On any I/O failure; a failed write leaves no visible file.
    pub fn put(&self, key: &str, name: &str, data: &[u8]) -> io::Result<()> {
        let dir = self.root.join(safe(key)?);
        fs::create_dir_all(&dir)?;
        let tmp = dir.join(format!(".{}.tmp-{}", safe(name)?, uuid::Uuid::new_v4()));
        let result = (|| {
            let mut f = File::create(&tmp)?;
            f.write_all(data)?;
            f.sync_all()?;
            fs::rename(&tmp, dir.join(name))?;
            File::open(&dir)?.sync_all()?;
            File::open(&self.root)?.sync_all()
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Checks the folder is writable: writes, syncs and removes a probe file.
    ///
    /// # Errors
    /// On any I/O failure.
    pub fn probe(&self) -> io::Result<()> {
        let p = self.root.join(format!(".probe-{}", uuid::Uuid::new_v4()));
        let r = File::create(&p).and_then(|mut f| {
            f.write_all(b"ok")?;
            f.sync_all()
        });
        let _ = fs::remove_file(&p);
        r
    }

    /// Free bytes available to this process on the file system holding the blobs.
    pub fn free_bytes(&self) -> Option<u64> {
        rustix::fs::statvfs(&self.root)
            .ok()
            .map(|s| s.f_bavail.saturating_mul(s.f_frsize))
    }

    /// Reads `<key>/<name>`, `None` when absent.
    ///
    /// # Errors
    /// On I/O failure other than absence.
    pub fn get(&self, key: &str, name: &str) -> io::Result<Option<Vec<u8>>> {
        match fs::read(self.root.join(safe(key)?).join(safe(name)?)) {
            Ok(d) => Ok(Some(d)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_and_reject_traversal() {
        let dir = tempfile::tempdir().unwrap();
        let s = BlobStore::new(dir.path().join("b")).unwrap();
        s.put("abc", "x.png", b"data").unwrap();
        assert_eq!(
            s.get("abc", "x.png").unwrap().as_deref(),
            Some(&b"data"[..])
        );
        assert_eq!(s.get("abc", "y.png").unwrap(), None);
        assert!(s.put("..", "x", b"").is_err());
        assert!(s.get("abc", "../x").is_err());
        let leftovers: Vec<_> = fs::read_dir(dir.path().join("b/abc")).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temp files remain");
    }
}
