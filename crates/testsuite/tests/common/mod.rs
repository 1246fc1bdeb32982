//! Shared helpers of the integration tests.

#![allow(dead_code)]

use std::sync::mpsc;
use std::time::Duration;

/// Runs `f` on a thread and fails the test if it takes longer than `limit`,
/// after [`testsuite::emergency_cleanup`]. Every command the harness runs has
/// its own deadline as well, so a stuck test normally ends (and cleans up)
/// before this fires; this is the backstop.
pub fn with_timeout<F: FnOnce() + Send + 'static>(limit: Duration, f: F) {
    let (tx, rx) = mpsc::channel();
    let handle = std::thread::spawn(move || {
        f();
        let _ = tx.send(());
    });
    let owner = handle.thread().id();
    match rx.recv_timeout(limit) {
        Ok(()) => handle.join().unwrap(),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            // The closure panicked: re-raise its panic here.
            if let Err(p) = handle.join() {
                std::panic::resume_unwind(p);
            }
        }
        Err(mpsc::RecvTimeoutError::Timeout) => {
            // The stuck thread would never drop its harness objects.
            testsuite::emergency_cleanup(Some(owner));
            panic!("test timed out after {limit:?}")
        }
    }
}

pub mod fake_proxy;
