//! `health`: is the daemon answering?

use std::process::ExitCode;

use anyhow::Context;

use crate::cli::HealthArgs;

pub fn run(a: HealthArgs) -> anyhow::Result<ExitCode> {
    let timeout = snapshotter::config::parse_duration(&a.timeout)
        .map_err(anyhow::Error::msg)
        .context("--timeout")?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    match rt.block_on(erofs_grpc::probe::probe(&a.socket, timeout)) {
        Ok(took) => {
            println!(
                "ok: {} answered in {:.1} ms",
                a.socket.display(),
                took.as_secs_f64() * 1000.0
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("unhealthy: {:#}", anyhow::Error::from(e));
            Ok(ExitCode::FAILURE)
        }
    }
}
