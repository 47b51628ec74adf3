//! Blob files under one root: `<root>/<key>/<name>`. Writes go to a temporary file in the same
//! folder, are fsynced, renamed into place and the folder fsynced, so a reader (or a restart)
//! sees a whole file or none. The root is fsynced too until the key's folder is known to be
//! durable (once per key and process, not once per file: a study's 30 instances share it).

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// Key folders remembered as durable before the set starts afresh (bounds its memory).
const DURABLE_KEYS: usize = 4096;

/// A folder of blobs.
#[derive(Debug, Clone)]
pub struct BlobStore {
    root: PathBuf,
    /// Key folders whose entry in the root is known to be on disk (the root was fsynced after
    /// they were created, by this process).
    durable: Arc<Mutex<HashSet<String>>>,
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
        Ok(Self {
            root,
            durable: Arc::default(),
        })
    }

    /// Writes `<key>/<name>` atomically and durably.
    ///
    /// # Errors
    /// On any I/O failure; a failed write leaves no visible file.
    pub fn put(&self, key: &str, name: &str, data: &[u8]) -> io::Result<()> {
        self.put_all(key, &[(name, data)])
    }

    /// Writes several files into `<key>/` atomically each and durably, with one fsync of the
    /// folder for all of them (a result's bundle, input and overlay: five syncs, not seven).
    ///
    /// # Errors
    /// On any I/O failure; files written before it stay (each whole), none is half-written.
    pub fn put_all<D: AsRef<[u8]>>(&self, key: &str, files: &[(&str, D)]) -> io::Result<()> {
        let dir = self.root.join(safe(key)?);
        fs::create_dir_all(&dir)?;
        for (name, data) in files {
            let tmp = dir.join(format!(".{}.tmp-{}", safe(name)?, uuid::Uuid::new_v4()));
            let written = File::create(&tmp).and_then(|mut f| {
                f.write_all(data.as_ref())?;
                f.sync_all()?;
                fs::rename(&tmp, dir.join(name))
            });
            if let Err(e) = written {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        }
        File::open(&dir)?.sync_all()?;
        self.sync_root_for(key)
    }

    /// Makes the root's entry for `key`'s folder durable, unless an earlier put already did
    /// (only marked after its fsync returned, so a concurrent first put fsyncs too).
    fn sync_root_for(&self, key: &str) -> io::Result<()> {
        let known = self.durable.lock().is_ok_and(|d| d.contains(key));
        if known {
            return Ok(());
        }
        File::open(&self.root)?.sync_all()?;
        if let Ok(mut d) = self.durable.lock() {
            if d.len() >= DURABLE_KEYS {
                d.clear();
            }
            d.insert(key.to_string());
        }
        Ok(())
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

    #[test]
    fn the_root_is_synced_once_per_key_folder_and_the_memory_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let s = BlobStore::new(dir.path().join("b")).unwrap();
        let known = |k: &str| s.durable.lock().unwrap().contains(k);
        assert!(!known("study1"));
        s.put("study1", "a.dcm", b"1").unwrap();
        assert!(known("study1"), "marked after the first put's root fsync");
        s.put("study1", "b.dcm", b"2").unwrap();
        assert_eq!(
            s.get("study1", "b.dcm").unwrap().as_deref(),
            Some(&b"2"[..])
        );
        // a failed put marks nothing
        assert!(s.put("bad/key", "x", b"").is_err());
        assert!(!known("bad/key"));
        for i in 0..DURABLE_KEYS + 1 {
            s.sync_root_for(&format!("k{i}")).unwrap();
        }
        assert!(s.durable.lock().unwrap().len() <= DURABLE_KEYS);
    }

    #[test]
    fn put_all_writes_every_file_whole_and_leaves_no_temporaries() {
        let dir = tempfile::tempdir().unwrap();
        let s = BlobStore::new(dir.path().join("b")).unwrap();
        let files: Vec<(&str, Vec<u8>)> =
            vec![("a.json", b"{}".to_vec()), ("b.png", vec![7; 5000])];
        s.put_all("r1", &files).unwrap();
        assert_eq!(s.get("r1", "a.json").unwrap().as_deref(), Some(&b"{}"[..]));
        assert_eq!(s.get("r1", "b.png").unwrap().map(|v| v.len()), Some(5000));
        assert_eq!(fs::read_dir(dir.path().join("b/r1")).unwrap().count(), 2);
        let bad: Vec<(&str, Vec<u8>)> = vec![("ok.txt", b"1".to_vec()), ("../x", b"2".to_vec())];
        assert!(s.put_all("r2", &bad).is_err());
        assert!(!dir.path().join("b/x").exists());
    }
}
