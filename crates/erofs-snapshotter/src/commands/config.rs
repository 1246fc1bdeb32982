//! `config default` and `config check`.

use std::io::{Read, Write};
use std::process::ExitCode;

use snapshotter::config::{Config, DEFAULT_TOML};

use crate::cli::{ConfigCheckArgs, ConfigCommand};

pub fn run(c: ConfigCommand) -> anyhow::Result<ExitCode> {
    match c {
        ConfigCommand::Default => {
            std::io::stdout().write_all(DEFAULT_TOML.as_bytes())?;
            Ok(ExitCode::SUCCESS)
        }
        ConfigCommand::Check(a) => check(a),
    }
}

fn check(a: ConfigCheckArgs) -> anyhow::Result<ExitCode> {
    let name = a.file.display().to_string();
    let read = if name == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s).map(|_| s)
    } else {
        std::fs::read_to_string(&a.file)
    };
    let text = match read {
        Ok(t) => t,
        Err(e) => {
            eprintln!("erofs-snapshotter: reading {name}: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    match Config::check(&text) {
        Ok(cfg) => {
            println!(
                "{name}: ok (root {}, socket {}, metrics {})",
                cfg.root_path.display(),
                cfg.address.display(),
                match cfg.metrics_address() {
                    None => "off".to_string(),
                    Some(_) => cfg.metrics.address.clone(),
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(p) => {
            // file:line: key: message, as compilers print it.
            let mut where_ = name;
            if let Some(l) = p.line {
                where_.push_str(&format!(":{l}"));
            }
            match &p.key {
                Some(k) => eprintln!("{where_}: {k}: {}", p.message),
                None => eprintln!("{where_}: {}", p.message),
            }
            Ok(ExitCode::FAILURE)
        }
    }
}
