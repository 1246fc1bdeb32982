//! Crash points for fault-injection tests: when `EROFS_SNAPSHOTTER_CRASH_AT` names a point,
//! the process aborts there (like `kill -9`: no destructors, no flushing), so tests can prove
//! that a crash at that exact moment leaves a consistent store.
//!
//! The check exists only with the `crash-points` feature (the binary crate's test builds turn
//! it on); without it [`hit`] is empty, so a release daemon cannot be made to abort by its
//! environment and carries none of this code.

/// The variable naming the crash point.
pub const ENV: &str = "EROFS_SNAPSHOTTER_CRASH_AT";

/// Whether this build has crash points (the `crash-points` feature).
pub const ENABLED: bool = cfg!(feature = "crash-points");

/// Abort if `point` is the configured crash point. Unset, a point costs one relaxed load.
#[cfg(feature = "crash-points")]
pub fn hit(point: &str) {
    use std::sync::OnceLock;
    static TARGET: OnceLock<Option<String>> = OnceLock::new();
    let target = TARGET.get_or_init(|| std::env::var(ENV).ok().filter(|s| !s.is_empty()));
    if target.as_deref() == Some(point) {
        eprintln!("crash point {point} reached: aborting");
        std::process::abort();
    }
}

/// Crash points are compiled out: nothing to do.
#[cfg(not(feature = "crash-points"))]
#[inline(always)]
pub fn hit(_point: &str) {}
