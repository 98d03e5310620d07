//! Where a file's holes are (SEEK_DATA / SEEK_HOLE), so chunks wholly inside one need not
//! be read: they are zeros.

use std::fs::File;
use std::os::unix::io::AsRawFd;

/// Tracks where data starts and ends so chunks wholly inside holes need not be read.
pub struct Holes {
    fd: i32,
    enabled: bool,
    data_start: u64,
    data_end: u64,
}

impl Holes {
    pub fn new(file: &File) -> Self {
        Holes {
            fd: file.as_raw_fd(),
            enabled: file.metadata().map(|m| m.is_file()).unwrap_or(false),
            data_start: 0,
            data_end: 0,
        }
    }

    /// True when `start..end` lies wholly in a hole.
    pub fn is_hole(&mut self, start: u64, end: u64) -> bool {
        if !self.enabled {
            return false;
        }
        if start >= self.data_end {
            let data = unsafe { libc::lseek(self.fd, start as i64, libc::SEEK_DATA) };
            if data < 0 {
                if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
                    // No data at or after `start`: the rest is hole.
                    self.data_start = u64::MAX;
                    self.data_end = u64::MAX;
                } else {
                    self.enabled = false;
                    return false;
                }
            } else {
                let hole = unsafe { libc::lseek(self.fd, data, libc::SEEK_HOLE) };
                if hole < 0 {
                    self.enabled = false;
                    return false;
                }
                self.data_start = data as u64;
                self.data_end = hole as u64;
            }
        }
        end <= self.data_start
    }
}
