//! Rules in local mode (issue 5): a background lock holder that spans exactly the snapshot,
//! and a writer paused by the pre rule so that every gen at the DR site is consistent
//! across two files.

mod support;

use std::os::unix::fs::FileExt;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use support::{Pair, PairOptions};

fn head(path: &std::path::Path, n: usize) -> String {
    let mut buf = vec![0u8; n];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut buf, 0)
        .unwrap();
    String::from_utf8_lossy(&buf).into_owned()
}

#[test]
fn a_background_lock_is_taken_before_the_snapshot_and_released_after_it() {
    let mut pair = Pair::new(PairOptions {
        volumes: vec![("v1", 1 << 20)],
        start: false,
        primary_protection: "pre_rule = \"lock.yaml\"",
        ..Default::default()
    });
    let vol = pair.volume("v1");
    // Stork's form: the lock is held until ${WAIT_CMD} returns.
    let rule = format!(
        "apiVersion: stork.libopenstorage.org/v1alpha1
kind: Rule
metadata: {{name: hold-lock}}
rules:
- podSelector: {{}}
  actions:
  - type: command
    background: true
    value: \"printf LOCKED__ | dd of={v} conv=notrunc status=none; ${{WAIT_CMD}}; printf RELEASED | dd of={v} conv=notrunc status=none\"
",
        v = vol.display()
    );
    std::fs::write(pair.dir.path().join("lock.yaml"), rule).unwrap();
    pair.start();
    pair.sync();
    assert_eq!(
        head(&pair.replica("v1"), 8),
        "LOCKED__",
        "the snapshot saw the lock held"
    );
    assert_eq!(
        head(&vol, 8),
        "RELEASED",
        "and the lock was released after it"
    );
}

/// A writer that stamps a sequence number into A, then B, and pauses between pairs when
/// told (SIGUSR1), acknowledging with a file, until SIGUSR2.
fn start_writer(dir: &std::path::Path, a: &std::path::Path, b: &std::path::Path) -> Child {
    let script = format!(
        r#"echo $$ > {d}/writer.pid
pause=0
trap 'pause=1' USR1
trap 'pause=0' USR2
n=0
while true; do
  n=$((n+1))
  printf '%016d' $n | dd of={a} conv=notrunc status=none
  printf '%016d' $n | dd of={b} conv=notrunc status=none
  if [ $pause = 1 ]; then
    touch {d}/paused
    while [ $pause = 1 ]; do sleep 0.01; done
  fi
done
"#,
        d = dir.display(),
        a = a.display(),
        b = b.display()
    );
    let child = Command::new("bash").arg("-c").arg(script).spawn().unwrap();
    let pid = dir.join("writer.pid");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !pid.exists() {
        assert!(Instant::now() < deadline, "writer did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    child
}

#[test]
fn a_writer_paused_by_the_pre_rule_leaves_every_gen_consistent_across_both_files() {
    let mut pair = Pair::new(PairOptions {
        volumes: vec![("a", 1 << 20), ("b", 1 << 20)],
        start: false,
        // The rule asks the writer to pause at a pair boundary and waits for its
        // acknowledgement; the post rule lets it go on.
        primary_protection: "pre = [\"rm -f paused; kill -USR1 $(cat writer.pid); while [ ! -e paused ]; do sleep 0.01; done\"]\npost = [\"rm -f paused; kill -USR2 $(cat writer.pid)\"]",
        ..Default::default()
    });
    let dir = pair.dir.path().to_path_buf();
    // Rule commands run in the daemon's working directory: give them absolute paths.
    let cfg = std::fs::read_to_string(&pair.primary.config)
        .unwrap()
        .replace("writer.pid", &dir.join("writer.pid").display().to_string())
        .replace("paused", &dir.join("paused").display().to_string());
    std::fs::write(&pair.primary.config, cfg).unwrap();
    let mut writer = start_writer(&dir, &pair.volume("a"), &pair.volume("b"));
    pair.start();
    let mut last = 0u64;
    for cycle in 0..8 {
        std::thread::sleep(Duration::from_millis(50));
        let r = pair.sync();
        let (a, b) = (head(&pair.replica("a"), 16), head(&pair.replica("b"), 16));
        assert_eq!(
            a, b,
            "gen {} has A and B at different sequence numbers",
            r.gen
        );
        let n: u64 = a
            .parse()
            .unwrap_or_else(|_| panic!("cycle {cycle}: no sequence number yet: {a:?}"));
        assert!(
            n > last,
            "the writer made progress between gens ({last} -> {n})"
        );
        last = n;
    }
    writer.kill().unwrap();
    writer.wait().unwrap();
    let m = pair.primary.metrics();
    assert!(support::metric(&m, "lifeboat_freeze_seconds{protection=\"p\"}").unwrap() > 0.0);
}
