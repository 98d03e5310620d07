//! What a replica looked like when lifeboat last wrote it: its kind, identity (device and
//! inode), size and modification time. The DR site keeps a stamp per replica with its
//! consistent point and compares the replica with it before every cycle, so a replica that
//! was deleted, truncated, replaced or written outside lifeboat is noticed at the cost of
//! one `stat`, not trusted. (A change that keeps size, inode and mtime needs the deep check,
//! which reads every chunk.)

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use serde::{Deserialize, Serialize};

/// A replica as lifeboat left it.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    pub kind: Kind,
    pub dev: u64,
    pub ino: u64,
    /// Bytes (a block device's `st_size` is 0: its size is the volume's, checked at open).
    pub size: u64,
    /// Nanoseconds since the epoch of the last write lifeboat made (files only).
    pub mtime_ns: i128,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    File,
    Block,
}

/// What is at a replica's path now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Observed {
    Missing,
    /// Something that is neither a regular file nor a block device.
    Other(&'static str),
    Is(Stamp),
}

fn mtime_ns(m: &std::fs::Metadata) -> i128 {
    m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128
}

/// What is at `path` (following a symlink, as writing the replica would).
pub fn observe(path: &Path) -> std::io::Result<Observed> {
    let m = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Observed::Missing),
        Err(e) => return Err(e),
    };
    let ft = m.file_type();
    let kind = if ft.is_file() {
        Kind::File
    } else if ft.is_block_device() {
        Kind::Block
    } else {
        return Ok(Observed::Other(kind_name(&ft)));
    };
    Ok(Observed::Is(Stamp {
        kind,
        dev: if kind == Kind::Block {
            m.rdev()
        } else {
            m.dev()
        },
        ino: m.ino(),
        size: m.len(),
        mtime_ns: mtime_ns(&m),
    }))
}

/// A file type in words, for errors.
pub fn kind_name(ft: &std::fs::FileType) -> &'static str {
    if ft.is_dir() {
        "a directory"
    } else if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_char_device() {
        "a character device"
    } else if ft.is_symlink() {
        "a symlink"
    } else if ft.is_block_device() {
        "a block device"
    } else if ft.is_file() {
        "a regular file"
    } else {
        "an unknown kind of file"
    }
}

/// How a replica differs from its stamp, in words; `None` when it is as lifeboat left it.
pub fn compare(was: &Stamp, now: &Observed) -> Option<String> {
    let now = match now {
        Observed::Missing => return Some("it is gone".into()),
        Observed::Other(what) => return Some(format!("it is {what} now")),
        Observed::Is(s) => s,
    };
    if now.kind != was.kind {
        return Some(format!("it was a {:?} and is a {:?} now", was.kind, now.kind).to_lowercase());
    }
    if (now.dev, now.ino) != (was.dev, was.ino) {
        return Some("it is another file now (a copy or a restore replaced it)".to_string());
    }
    if was.kind == Kind::File {
        if now.size != was.size {
            return Some(format!(
                "its size changed from {} to {} bytes",
                was.size, now.size
            ));
        }
        if now.mtime_ns > was.mtime_ns {
            return Some("it was written after the last commit".into());
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn every_out_of_band_change_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.img");
        std::fs::write(&p, vec![1u8; 8192]).unwrap();
        let Observed::Is(stamp) = observe(&p).unwrap() else {
            panic!("a file")
        };
        assert_eq!(compare(&stamp, &observe(&p).unwrap()), None);
        // Written in place (same size): the mtime moves.
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mut f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all(b"x").unwrap();
        drop(f);
        assert_eq!(
            compare(&stamp, &observe(&p).unwrap()).as_deref(),
            Some("it was written after the last commit")
        );
        // Truncated.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .set_len(4096)
            .unwrap();
        assert_eq!(
            compare(&stamp, &observe(&p).unwrap()).as_deref(),
            Some("its size changed from 8192 to 4096 bytes")
        );
        // Replaced by a copy.
        std::fs::write(dir.path().join("copy"), vec![1u8; 8192]).unwrap();
        std::fs::rename(dir.path().join("copy"), &p).unwrap();
        assert!(compare(&stamp, &observe(&p).unwrap())
            .unwrap()
            .contains("another file"));
        // Replaced by a directory, or gone.
        std::fs::remove_file(&p).unwrap();
        assert_eq!(
            compare(&stamp, &observe(&p).unwrap()).as_deref(),
            Some("it is gone")
        );
        std::fs::create_dir(&p).unwrap();
        assert_eq!(
            compare(&stamp, &observe(&p).unwrap()).as_deref(),
            Some("it is a directory now")
        );
    }
}
