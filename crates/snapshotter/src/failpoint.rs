//! Crash points for fault-injection tests: when `EROFS_SNAPSHOTTER_CRASH_AT` names a point,
//! the process aborts there (like `kill -9`: no destructors, no flushing), so tests can prove
//! that a crash at that exact moment leaves a consistent store. Unset, a point costs one
//! relaxed load.

use std::sync::OnceLock;

static TARGET: OnceLock<Option<String>> = OnceLock::new();

/// The variable naming the crash point.
pub const ENV: &str = "EROFS_SNAPSHOTTER_CRASH_AT";

/// Abort if `point` is the configured crash point.
pub fn hit(point: &str) {
    let target = TARGET.get_or_init(|| std::env::var(ENV).ok().filter(|s| !s.is_empty()));
    if target.as_deref() == Some(point) {
        eprintln!("crash point {point} reached: aborting");
        std::process::abort();
    }
}
