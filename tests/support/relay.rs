//! A user-space UDP relay between the primary and the DR site (the kernel here has no
//! netem). It forwards datagrams both ways and can cut the link, at once or after a number
//! of bytes forwarded towards the DR site.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub struct Relay {
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    cut_at: Arc<AtomicU64>,
    forwarded: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Relay {
    pub fn start(upstream: SocketAddr) -> Relay {
        let front = UdpSocket::bind("127.0.0.1:0").unwrap();
        let back = UdpSocket::bind("127.0.0.1:0").unwrap();
        for s in [&front, &back] {
            s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        }
        let addr = front.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let cut_at = Arc::new(AtomicU64::new(u64::MAX));
        let forwarded = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let client: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
        let (front2, back2) = (front.try_clone().unwrap(), back.try_clone().unwrap());
        let up = {
            let (cut, cut_at, forwarded, stop, client) = (
                cut.clone(),
                cut_at.clone(),
                forwarded.clone(),
                stop.clone(),
                client.clone(),
            );
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, from)) = front.recv_from(&mut buf) else {
                        continue;
                    };
                    *client.lock().unwrap() = Some(from);
                    let total = forwarded.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
                    if total > cut_at.load(Ordering::Relaxed) {
                        cut.store(true, Ordering::Relaxed);
                    }
                    if !cut.load(Ordering::Relaxed) {
                        let _ = back.send_to(&buf[..n], upstream);
                    }
                }
            })
        };
        let down = {
            let (cut, stop) = (cut.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, _)) = back2.recv_from(&mut buf) else {
                        continue;
                    };
                    let to = *client.lock().unwrap();
                    if let (false, Some(to)) = (cut.load(Ordering::Relaxed), to) {
                        let _ = front2.send_to(&buf[..n], to);
                    }
                }
            })
        };
        Relay {
            addr,
            cut,
            cut_at,
            forwarded,
            stop,
            threads: vec![up, down],
        }
    }

    /// Cuts the link once `bytes` more have been forwarded towards the DR site.
    pub fn cut_after(&self, bytes: u64) {
        self.cut_at.store(
            self.forwarded.load(Ordering::Relaxed) + bytes,
            Ordering::Relaxed,
        );
    }

    pub fn is_cut(&self) -> bool {
        self.cut.load(Ordering::Relaxed)
    }

    pub fn restore(&self) {
        self.cut_at.store(u64::MAX, Ordering::Relaxed);
        self.cut.store(false, Ordering::Relaxed);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A tmpfs of a given size mounted by the test (needs root), unmounted on drop.
pub struct Tmpfs {
    pub path: std::path::PathBuf,
}

impl Tmpfs {
    pub fn mount(path: &std::path::Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(path).unwrap();
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .status()
            .expect("run mount");
        assert!(
            st.success(),
            "mount tmpfs at {} failed: these tests need root (CI runs as root)",
            path.display()
        );
        Tmpfs {
            path: path.to_path_buf(),
        }
    }

    pub fn resize(&self, size: &str) {
        let st = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.path)
            .status()
            .unwrap();
        assert!(st.success(), "remount {} to {size}", self.path.display());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.path)
            .status();
    }
}

/// An XFS file system (reflink on) in an image file on a loop device, unmounted on drop.
/// Needs root and xfsprogs.
pub struct Xfs {
    pub mnt: std::path::PathBuf,
}

impl Xfs {
    pub fn mount(img: &std::path::Path, mnt: &std::path::Path, size: u64) -> Result<Xfs, String> {
        let run = |cmd: &str, args: &[&std::ffi::OsStr]| -> Result<(), String> {
            let out = std::process::Command::new(cmd)
                .args(args)
                .output()
                .map_err(|e| format!("run {cmd}: {e}"))?;
            if out.status.success() {
                Ok(())
            } else {
                Err(format!(
                    "{cmd} failed (needs root and xfsprogs): {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ))
            }
        };
        std::fs::create_dir_all(mnt).map_err(|e| e.to_string())?;
        std::fs::File::create(img)
            .and_then(|f| f.set_len(size))
            .map_err(|e| format!("create {}: {e}", img.display()))?;
        run(
            "mkfs.xfs",
            &[
                "-q".as_ref(),
                "-m".as_ref(),
                "reflink=1".as_ref(),
                img.as_os_str(),
            ],
        )?;
        run(
            "mount",
            &[
                "-o".as_ref(),
                "loop".as_ref(),
                img.as_os_str(),
                mnt.as_os_str(),
            ],
        )?;
        Ok(Xfs {
            mnt: mnt.to_path_buf(),
        })
    }
}

impl Drop for Xfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.mnt).status();
    }
}
