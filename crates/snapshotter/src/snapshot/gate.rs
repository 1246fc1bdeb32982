//! The cap on heavy requests (Apply, Compare, a Commit that converts): at most `limit` run at
//! once; the others wait, without working, until a slot frees or their token trips.
//!
//! Lock order: a request takes its key locks first and its slot after, and never waits for a
//! key lock while it holds a slot, so slots and key locks cannot deadlock.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::cancel::Cancel;
use crate::error::Result;

/// How often a waiting request looks at its token (a cancelled waiter leaves within this).
const POLL: Duration = Duration::from_millis(50);

/// Heavy requests running now, the most at once since start-up, and the cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeavyStats {
    /// Running now.
    pub running: usize,
    /// Most running at once so far.
    pub peak: usize,
    /// The cap (`daemon.max_concurrent_heavy`).
    pub limit: usize,
    /// Requests that had to wait for a slot.
    pub waited: u64,
}

#[derive(Debug)]
pub(crate) struct Gate {
    limit: usize,
    state: Mutex<HeavyStats>,
    freed: Condvar,
}

/// A slot, given back on drop.
#[derive(Debug)]
pub(crate) struct Slot<'a> {
    gate: &'a Gate,
}

impl Gate {
    pub(crate) fn new(limit: usize) -> Self {
        let limit = limit.max(1);
        Gate {
            limit,
            state: Mutex::new(HeavyStats {
                running: 0,
                peak: 0,
                limit,
                waited: 0,
            }),
            freed: Condvar::new(),
        }
    }

    /// A slot for `what`, waiting while all are taken, until `cancel` trips.
    pub(crate) fn enter(&self, cancel: &Cancel, what: &str) -> Result<Slot<'_>> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.running >= self.limit {
            st.waited += 1;
            tracing::debug!(
                running = st.running,
                limit = self.limit,
                "{what} waits for a heavy-request slot"
            );
            let start = Instant::now();
            while st.running >= self.limit {
                cancel.check().map_err(|e| {
                    e.context(format!(
                        "{what} waited {:.1} s for one of {} heavy-request slots (daemon.max_concurrent_heavy)",
                        start.elapsed().as_secs_f64(),
                        self.limit
                    ))
                })?;
                st = self
                    .freed
                    .wait_timeout(st, POLL)
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
        }
        st.running += 1;
        st.peak = st.peak.max(st.running);
        Ok(Slot { gate: self })
    }

    pub(crate) fn stats(&self) -> HeavyStats {
        *self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut st = self.gate.state.lock().unwrap_or_else(|p| p.into_inner());
        st.running -= 1;
        self.gate.freed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_for_a_slot_and_leaves_when_cancelled() {
        let g = Gate::new(1);
        let first = g.enter(&Cancel::never(), "a").unwrap();
        let late = Cancel::until(Instant::now() + Duration::from_millis(100));
        let t = Instant::now();
        let e = g.enter(&late, "b").unwrap_err();
        assert_eq!(e.kind(), crate::error::ErrorKind::DeadlineExceeded);
        assert!(e.to_string().contains("max_concurrent_heavy"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(1));
        std::thread::scope(|s| {
            let waiter = s.spawn(|| g.enter(&Cancel::never(), "c").map(drop));
            std::thread::sleep(Duration::from_millis(100));
            assert!(!waiter.is_finished(), "entered while the slot was taken");
            drop(first);
            waiter.join().unwrap().unwrap();
        });
        let st = g.stats();
        assert_eq!((st.running, st.peak, st.waited), (0, 1, 2));
    }
}
