//! One module per command; each takes its parsed arguments and returns the exit status.

use std::process::ExitCode;

use crate::cli::{Cli, Command};

mod artifacts;
mod config;
mod fsck;
mod health;
mod inspect;
mod merge;
mod mkfs;
mod serve;

pub fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Serve(a) => serve::run(a),
        Command::Config(c) => config::run(c),
        Command::Health(a) => health::run(a),
        Command::Mkfs(a) => mkfs::run(a),
        Command::Merge(a) => merge::run(a),
        Command::Fsck(a) => fsck::run(a),
        Command::Ls(a) => inspect::ls(a),
        Command::Cat(a) => inspect::cat(a),
        Command::Stat(a) => inspect::stat(a),
        Command::Dump(a) => inspect::dump(a),
        Command::Artifacts(c) => artifacts::run(c),
        Command::Verify(a) => artifacts::verify(a),
    }
}
