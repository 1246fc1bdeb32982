//! `erofs-snapshotter`: the containerd EROFS snapshotter daemon and EROFS image tools.
use std::process::ExitCode;

use clap::Parser;

mod cli;
mod commands;
mod output;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("EROFS_SNAPSHOTTER_LOG")
        .unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new(if cli.verbose { "debug" } else { "warn" })
        });
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match commands::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("erofs-snapshotter: {e:#}");
            ExitCode::FAILURE
        }
    }
}
