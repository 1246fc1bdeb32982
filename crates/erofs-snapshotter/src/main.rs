//! `erofs-snapshotter`: the containerd EROFS snapshotter daemon and EROFS image tools.
use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;

mod cli;
mod commands;
mod metrics;
mod output;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let daemon = matches!(cli.command, cli::Command::Serve(_));
    let default_level = match (cli.verbose, daemon) {
        (true, _) => "debug",
        (false, true) => "info",
        (false, false) => "warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("EROFS_SNAPSHOTTER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match &cli.command {
        cli::Command::Serve(a) if a.log_format == cli::LogFormat::Json => builder.json().init(),
        _ => builder.init(),
    }
    match commands::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("erofs-snapshotter: {e:#}");
            ExitCode::FAILURE
        }
    }
}
