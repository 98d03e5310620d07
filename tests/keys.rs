//! Keys and the daemon's directories: a private key open to group or others stops `run`
//! and `check-config`; the daemon's directories are private.

mod support;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

fn chmod(path: &Path, mode: u32) {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).unwrap();
}

/// Runs `lifeboat ARGS` to its end: its exit code and stderr. A daemon still running after
/// 60 s is killed and the test fails (it should have refused to start).
fn lifeboat(args: &[&str], dir: &Path) -> (Option<i32>, String) {
    let err_file = dir.join("lifeboat-cmd.err");
    let mut child = Command::new(env!("CARGO_BIN_EXE_lifeboat"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(&err_file).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!(
                "lifeboat {args:?} kept running:\n{}",
                fs::read_to_string(&err_file).unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (status.code(), fs::read_to_string(&err_file).unwrap())
}

#[test]
fn a_private_key_open_to_others_stops_run_and_check_config() {
    let pair = Pair::new(PairOptions {
        start: false,
        ..Default::default()
    });
    let cfg = pair.dr.config.to_str().unwrap();
    let key = pair.dir.path().join("certs/dr.key");
    let (code, err) = lifeboat(&["check-config", cfg], pair.dir.path());
    assert_eq!(code, Some(0), "the key as `certs` writes it passes: {err}");

    chmod(&key, 0o644);
    let expected = format!(
        "tls.key: {} has mode 0644, open to group or others; expected 0600 or stricter",
        key.display()
    );
    let (code, err) = lifeboat(&["check-config", cfg], pair.dir.path());
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains(&expected), "{err}");

    let (code, err) = lifeboat(&["run", "--config", cfg], pair.dir.path());
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains(&expected), "{err}");
    assert!(
        !pair.dr.state_dir.exists(),
        "run made its state_dir before refusing"
    );
}

#[test]
fn the_daemons_directories_are_private() {
    // A shell's usual umask, which the daemons inherit: directories made without a mode
    // would be 0755.
    unsafe { libc::umask(0o022) };
    let mut pair = Pair::new(PairOptions {
        start: false,
        ..Default::default()
    });
    // An existing state_dir open to others is tightened.
    fs::create_dir(&pair.primary.state_dir).unwrap();
    chmod(&pair.primary.state_dir, 0o755);
    pair.start();
    let r = pair.sync();
    let gen_dir = pair.snapshot(r.gen, "v1").parent().unwrap().to_path_buf();
    let dr = &pair.dr.state_dir;
    let primary = &pair.primary.state_dir;
    for dir in [
        dr.clone(),
        dr.join("staging"),
        primary.clone(),
        primary.join("snapshots"),
        primary.join("snapshots").join(PROT),
        gen_dir,
    ] {
        assert_eq!(mode(&dir), 0o700, "{}", dir.display());
    }
    let log = pair.primary.log_text();
    assert!(
        log.contains("state_dir was open to group or others; set it to 0700")
            && log.contains("0755"),
        "{log}"
    );
}
