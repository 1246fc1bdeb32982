//! A stand-in daemon for testing `testsuite::daemon::Daemon`:
//! `testsuite-fake-daemon serve --config FILE`, where FILE has a line
//! `socket = "PATH"` (and optionally `exit_after_ms = N` to exit with status 3
//! instead). It listens on the socket and accepts connections until killed.

use std::os::unix::net::UnixListener;
use std::time::Duration;

fn value<'a>(config: &'a str, key: &str) -> Option<&'a str> {
    config.lines().find_map(|l| {
        let (k, v) = l.split_once('=')?;
        (k.trim() == key).then(|| v.trim().trim_matches('"'))
    })
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 || args[1] != "serve" || args[2] != "--config" {
        eprintln!("usage: {} serve --config FILE", args[0]);
        std::process::exit(2);
    }
    let config = std::fs::read_to_string(&args[3]).expect("read config");
    eprintln!("fake daemon: config {:?}", config);
    if let Some(ms) = value(&config, "exit_after_ms").and_then(|v| v.parse().ok()) {
        std::thread::sleep(Duration::from_millis(ms));
        eprintln!("fake daemon: exiting as configured");
        std::process::exit(3);
    }
    let socket = value(&config, "socket").expect("socket = \"PATH\" in config");
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket).expect("bind");
    eprintln!("fake daemon: listening on {socket}");
    for conn in listener.incoming() {
        drop(conn);
    }
}
