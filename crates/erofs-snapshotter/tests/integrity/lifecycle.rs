//! Daemon start and stop, as the integrity tests rely on them.

use anyhow::{Result, ensure};

use crate::common::{BIN, Cfg, Env, block_on};

/// A SIGTERM that arrives as soon as the socket accepts connections (a service manager
/// stopping a daemon it just started, or a test restarting it with another configuration)
/// is a graceful stop: exit status 0, socket removed.
#[test]
fn sigterm_right_after_start_is_graceful() {
    block_on(async {
        let mut failures = Vec::new();
        for i in 0..20 {
            let mut env = Env::new(BIN, Cfg::new())?;
            env.set_ping(false);
            env.start().await?;
            if let Err(e) = env.stop() {
                failures.push(format!("attempt {i}: {e:#}"));
            }
        }
        ensure!(
            failures.is_empty(),
            "{} of 20 daemons did not stop gracefully on a SIGTERM right after their socket \
             accepted: {failures:?}",
            failures.len()
        );
        Result::<()>::Ok(())
    })
    .unwrap();
}
