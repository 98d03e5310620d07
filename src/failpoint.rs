//! Test failpoints: when `LIFEBOAT_FAILPOINT` names a point, the process stops there (it
//! sleeps, after creating the file named by `LIFEBOAT_FAILPOINT_MARKER`) so that a test can
//! kill -9 it at exactly that moment. Unset, a failpoint costs one environment lookup.

use std::sync::OnceLock;

fn armed() -> Option<&'static str> {
    static POINT: OnceLock<Option<String>> = OnceLock::new();
    POINT
        .get_or_init(|| std::env::var("LIFEBOAT_FAILPOINT").ok())
        .as_deref()
}

/// Stops the calling thread forever if `name` is the armed failpoint.
pub fn hit(name: &str) {
    if armed() != Some(name) {
        return;
    }
    tracing::warn!(
        failpoint = name,
        "stopped at failpoint, waiting to be killed"
    );
    if let Ok(marker) = std::env::var("LIFEBOAT_FAILPOINT_MARKER") {
        let _ = std::fs::write(marker, name);
    }
    loop {
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}
