//! Crash-safe file writes: every file goes to a temporary name in the same folder and is
//! renamed into place, so a reader sees the old file or the new one, never a torn one.

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// A fresh private folder beside `path` to write into. The file inside keeps `path`'s own
/// name, since some writers derive content from it (tch's `VarStore::save` picks the format
/// from the extension; TorchScript archives name their top folder after the file).
fn temp_dir_for(path: &Path) -> PathBuf {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let parent = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    parent.join(format!(".lenet5-tmp-{}-{n}", std::process::id()))
}

/// Lets `write` produce the file at a temporary path, then renames it over `path`.
/// On failure the temporary file is removed and `path` is untouched.
pub fn write_with(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let dir = temp_dir_for(path);
    std::fs::create_dir_all(&dir).with_context(|| format!("{}: cannot create a folder beside it", path.display()))?;
    let tmp = dir.join(path.file_name().context("a file path needs a file name")?);
    let result = write(&tmp).and_then(|()| {
        // Data on disk before the rename makes it visible.
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("{}: cannot sync", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("{}: cannot rename into place", path.display()))
    });
    let _ = std::fs::remove_dir_all(&dir); // best effort: the error that matters is `result`'s
    result.with_context(|| format!("{}: not written", path.display()))
}

/// Writes `bytes` to `path` atomically.
pub fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    write_with(path, |tmp| std::fs::write(tmp, bytes).with_context(|| format!("{}: cannot write", tmp.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_write_leaves_the_old_file_and_no_temporary() {
        let dir = std::env::temp_dir().join(format!("lenet5-atomic-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f.txt");
        write(&path, b"old").unwrap();
        let err = write_with(&path, |tmp| {
            std::fs::write(tmp, b"half")?;
            anyhow::bail!("disk full")
        });
        assert!(err.is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1, "temporary file left behind");
        write(&path, b"new").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
