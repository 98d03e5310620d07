//! A user-space UDP relay between the primary and the DR site, and the WAN it emulates
//! (the kernel here has no netem). Each direction has its own [`Link`]: one-way delay with
//! jitter, random and burst loss (Gilbert-Elliott), reordering, duplication, and a
//! bandwidth cap with a queue limit (tail drop). Decisions come from a seeded generator
//! per direction, so a test's link behaves the same each run given the same traffic. The
//! link can be cut (at once, or after a number of bytes towards the DR site) and
//! partitioned for a while, healing by itself.
//!
//! A path MTU drops every datagram longer than it (no ICMP is sent back, as on a path that
//! filters it). Not modelled: ECN marks, asymmetric routing, NAT rebinding; time is the host's monotonic clock, with sleeps of about a
//! millisecond of granularity.

use std::collections::BinaryHeap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

/// The conditions of one direction. The default is a perfect link.
#[derive(Clone, Debug, Default)]
pub struct Link {
    /// One-way delay.
    pub delay: Duration,
    /// Up to this much more delay, uniformly (it reorders packets closer than it).
    pub jitter: Duration,
    /// Probability that a datagram is lost, independently.
    pub loss: f64,
    /// Burst loss (Gilbert-Elliott): the probability of entering the bad state per
    /// datagram, and of leaving it; every datagram in the bad state is lost.
    pub burst: Option<(f64, f64)>,
    /// Probability that a datagram is held back by one more `delay` (at least 1 ms), so
    /// later ones overtake it.
    pub reorder: f64,
    /// Probability that a datagram is delivered twice.
    pub duplicate: f64,
    /// Bytes per second the link carries; None: no cap.
    pub rate: Option<u64>,
    /// Bytes that may wait for the cap before new datagrams are dropped (default 256 KiB).
    pub queue: Option<u64>,
    /// Datagrams with a UDP payload longer than this are dropped (a path MTU less the IP
    /// and UDP headers).
    pub mtu: Option<usize>,
}

impl Link {
    /// A delay each way of half `rtt`, with `loss` random loss.
    pub fn wan(rtt: Duration, loss: f64) -> Link {
        Link {
            delay: rtt / 2,
            loss,
            ..Link::default()
        }
    }
}

/// A datagram on its way, ordered by when it is due.
struct InFlight {
    due: Instant,
    seq: u64,
    bytes: Vec<u8>,
}

impl PartialEq for InFlight {
    fn eq(&self, o: &Self) -> bool {
        (self.due, self.seq) == (o.due, o.seq)
    }
}
impl Eq for InFlight {}
impl PartialOrd for InFlight {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for InFlight {
    // The earliest due first (BinaryHeap is a max-heap).
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (o.due, o.seq).cmp(&(self.due, self.seq))
    }
}

/// One direction: what decides each datagram's fate, and the queue of those on the way.
struct Direction {
    link: Mutex<Link>,
    state: Mutex<Fate>,
    queue: Mutex<BinaryHeap<InFlight>>,
    wake: Condvar,
    /// Datagrams dropped by loss, the queue limit, a cut or a partition.
    dropped: AtomicU64,
}

struct Fate {
    rng: rand::rngs::StdRng,
    bad: bool,
    seq: u64,
    /// When the capped link is free again.
    free_at: Instant,
}

impl Direction {
    fn new(seed: u64) -> Direction {
        Direction {
            link: Mutex::new(Link::default()),
            state: Mutex::new(Fate {
                rng: rand::rngs::StdRng::seed_from_u64(seed),
                bad: false,
                seq: 0,
                free_at: Instant::now(),
            }),
            queue: Mutex::new(BinaryHeap::new()),
            wake: Condvar::new(),
            dropped: AtomicU64::new(0),
        }
    }

    /// Decides the datagram's fate and queues it (or its copies) for delivery.
    fn admit(&self, bytes: &[u8]) {
        let link = self.link.lock().unwrap().clone();
        if link.mtu.is_some_and(|m| bytes.len() > m) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let now = Instant::now();
        let mut f = self.state.lock().unwrap();
        if let Some((enter, leave)) = link.burst {
            let flip = f.rng.random::<f64>();
            f.bad = if f.bad { flip >= leave } else { flip < enter };
        }
        if f.bad || (link.loss > 0.0 && f.rng.random::<f64>() < link.loss) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let mut depart = now;
        if let Some(rate) = link.rate {
            let start = f.free_at.max(now);
            let waiting = (start - now).as_secs_f64() * rate as f64;
            if waiting + bytes.len() as f64 > link.queue.unwrap_or(256 << 10) as f64 {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            f.free_at = start + Duration::from_secs_f64(bytes.len() as f64 / rate as f64);
            depart = f.free_at;
        }
        let copies = if link.duplicate > 0.0 && f.rng.random::<f64>() < link.duplicate {
            2
        } else {
            1
        };
        let mut q = self.queue.lock().unwrap();
        for _ in 0..copies {
            let mut due = depart + link.delay;
            if !link.jitter.is_zero() {
                due += link.jitter.mul_f64(f.rng.random::<f64>());
            }
            if link.reorder > 0.0 && f.rng.random::<f64>() < link.reorder {
                due += link.delay.max(Duration::from_millis(1));
            }
            f.seq += 1;
            q.push(InFlight {
                due,
                seq: f.seq,
                bytes: bytes.to_vec(),
            });
        }
        self.wake.notify_one();
    }

    /// Sends each queued datagram when it is due, until `stop`.
    fn deliver(&self, socket: &UdpSocket, to: impl Fn() -> Option<SocketAddr>, stop: &AtomicBool) {
        let mut q = self.queue.lock().unwrap();
        while !stop.load(Ordering::Relaxed) {
            let now = Instant::now();
            match q.peek() {
                Some(p) if p.due <= now => {
                    let p = q.pop().unwrap();
                    drop(q);
                    if let Some(to) = to() {
                        let _ = socket.send_to(&p.bytes, to);
                    }
                    q = self.queue.lock().unwrap();
                }
                Some(p) => {
                    let wait = p.due - now;
                    q = self.wake.wait_timeout(q, wait).unwrap().0;
                }
                None => {
                    q = self
                        .wake
                        .wait_timeout(q, Duration::from_millis(50))
                        .unwrap()
                        .0
                }
            }
        }
    }
}

pub struct Relay {
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    cut_at: Arc<AtomicU64>,
    forwarded: Arc<AtomicU64>,
    heal_at: Arc<Mutex<Option<Instant>>>,
    up: Arc<Direction>,
    down: Arc<Direction>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Relay {
    pub fn start(upstream: SocketAddr) -> Relay {
        Relay::start_seeded(upstream, 1)
    }

    /// A relay whose link decisions come from `seed`.
    pub fn start_seeded(upstream: SocketAddr, seed: u64) -> Relay {
        let front = UdpSocket::bind("127.0.0.1:0").unwrap();
        let back = UdpSocket::bind("127.0.0.1:0").unwrap();
        for s in [&front, &back] {
            s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        }
        let addr = front.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let cut_at = Arc::new(AtomicU64::new(u64::MAX));
        let forwarded = Arc::new(AtomicU64::new(0));
        let heal_at: Arc<Mutex<Option<Instant>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let client: Arc<Mutex<Option<SocketAddr>>> = Arc::default();
        let up = Arc::new(Direction::new(seed));
        let down = Arc::new(Direction::new(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 1));
        // Whether the link passes nothing now (a cut, or a partition not yet healed).
        let blocked = {
            let (cut, heal_at) = (cut.clone(), heal_at.clone());
            move || {
                let mut h = heal_at.lock().unwrap();
                if h.is_some_and(|at| Instant::now() >= at) {
                    *h = None;
                    cut.store(false, Ordering::Relaxed);
                }
                cut.load(Ordering::Relaxed)
            }
        };
        let mut threads = Vec::new();
        {
            let (front, up, forwarded, cut_at, cut, stop, client, blocked) = (
                front.try_clone().unwrap(),
                up.clone(),
                forwarded.clone(),
                cut_at.clone(),
                cut.clone(),
                stop.clone(),
                client.clone(),
                blocked.clone(),
            );
            threads.push(std::thread::spawn(move || {
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
                    if blocked() {
                        up.dropped.fetch_add(1, Ordering::Relaxed);
                    } else {
                        up.admit(&buf[..n]);
                    }
                }
            }));
        }
        {
            let (back, down, stop) = (back.try_clone().unwrap(), down.clone(), stop.clone());
            threads.push(std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, _)) = back.recv_from(&mut buf) else {
                        continue;
                    };
                    if blocked() {
                        down.dropped.fetch_add(1, Ordering::Relaxed);
                    } else {
                        down.admit(&buf[..n]);
                    }
                }
            }));
        }
        {
            let (up, stop) = (up.clone(), stop.clone());
            threads.push(std::thread::spawn(move || {
                up.deliver(&back, || Some(upstream), &stop)
            }));
        }
        {
            let (down, stop) = (down.clone(), stop.clone());
            threads.push(std::thread::spawn(move || {
                down.deliver(&front, || *client.lock().unwrap(), &stop)
            }));
        }
        Relay {
            addr,
            cut,
            cut_at,
            forwarded,
            heal_at,
            up,
            down,
            stop,
            threads,
        }
    }

    /// The same conditions both ways.
    pub fn set_link(&self, link: Link) {
        *self.up.link.lock().unwrap() = link.clone();
        *self.down.link.lock().unwrap() = link;
    }

    /// Conditions towards the DR site (`up`) and back (`down`).
    pub fn set_links(&self, up: Link, down: Link) {
        *self.up.link.lock().unwrap() = up;
        *self.down.link.lock().unwrap() = down;
    }

    /// Datagrams dropped so far, towards the DR site and back.
    pub fn dropped(&self) -> (u64, u64) {
        (
            self.up.dropped.load(Ordering::Relaxed),
            self.down.dropped.load(Ordering::Relaxed),
        )
    }

    /// Bytes received from the primary's side so far (before the link's fate).
    pub fn forwarded(&self) -> u64 {
        self.forwarded.load(Ordering::Relaxed)
    }

    /// Nothing passes either way for `d`; then the link heals by itself.
    pub fn partition_for(&self, d: Duration) {
        *self.heal_at.lock().unwrap() = Some(Instant::now() + d);
        self.cut.store(true, Ordering::Relaxed);
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
        *self.heal_at.lock().unwrap() = None;
        self.cut_at.store(u64::MAX, Ordering::Relaxed);
        self.cut.store(false, Ordering::Relaxed);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.up.wake.notify_all();
        self.down.wake.notify_all();
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
