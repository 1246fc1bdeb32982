//! Child processes for tests: spawned in their own process group, stopped with
//! SIGTERM then SIGKILL, commands run with a deadline, and `/proc` scans to find
//! processes left behind.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::Mutex;
use std::thread::{self, ThreadId};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rustix::process::{
    Pid, Signal, WaitId, WaitIdOptions, kill_process, kill_process_group, waitid,
};

/// How long [`ProcessGroupGuard::stop`] waits after SIGTERM before SIGKILL.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// A child process spawned as the leader of a new process group.
///
/// Dropping the guard stops the process ([`ProcessGroupGuard::stop`]) and then
/// sends SIGKILL to whatever is left of its process group. Processes that moved
/// to another group (containerd shims call `setpgid`) are not reached: find
/// those with [`list_processes`].
#[derive(Debug)]
pub struct ProcessGroupGuard {
    child: Child,
    name: String,
    log: Option<PathBuf>,
    stop_timeout: Duration,
    status: Option<ExitStatus>,
}

impl ProcessGroupGuard {
    /// Spawns `cmd` as a new process group leader with stdin from `/dev/null`
    /// and stdout and stderr appended to `log` (or discarded without one).
    /// `name` is used in messages.
    pub fn spawn(cmd: &mut Command, name: &str, log: Option<&Path>) -> Result<Self> {
        let (out, err) = match log {
            Some(path) => {
                let f = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .with_context(|| format!("open log file {}", path.display()))?;
                let f2 = f.try_clone()?;
                (Stdio::from(f), Stdio::from(f2))
            }
            None => (Stdio::null(), Stdio::null()),
        };
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        cmd.process_group(0);
        let child = cmd
            .spawn()
            .with_context(|| format!("spawn {name}: {cmd:?}"))?;
        live_groups().insert(child.id(), thread::current().id());
        Ok(ProcessGroupGuard {
            child,
            name: name.to_owned(),
            log: log.map(Path::to_path_buf),
            stop_timeout: DEFAULT_STOP_TIMEOUT,
            status: None,
        })
    }

    /// Sets how long [`stop`](Self::stop) waits between SIGTERM and SIGKILL.
    pub fn set_stop_timeout(&mut self, timeout: Duration) {
        self.stop_timeout = timeout;
    }

    /// The process id (also the process group id).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The name given at spawn time.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The log file, if output goes to one.
    pub fn log_path(&self) -> Option<&Path> {
        self.log.as_deref()
    }

    /// The last `lines` lines of the log file (empty without a log).
    pub fn log_tail(&self, lines: usize) -> String {
        self.log
            .as_deref()
            .map(|p| log_tail(p, lines))
            .unwrap_or_default()
    }

    /// Whether the process has exited. It is not reaped (its zombie keeps the
    /// process group id from being reused until [`stop`](Self::stop)).
    pub fn has_exited(&self) -> bool {
        self.status.is_some() || leader_exit(self.pid()).is_some()
    }

    /// Fails with the exit status and the log tail if the process has exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        if let Some(how) = self
            .status
            .map(|s| s.to_string())
            .or_else(|| leader_exit(self.pid()))
        {
            bail!(
                "{} exited ({how}); log tail:\n{}",
                self.name,
                self.log_tail(40)
            );
        }
        Ok(())
    }

    /// Stops the process: SIGTERM to the leader, wait up to the stop timeout,
    /// then SIGKILL to the whole process group (while the leader, dead or
    /// alive, is not reaped yet, so the group id cannot have been reused), and
    /// reaps it. Returns the exit status.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        if self.status.is_some() {
            return self.status;
        }
        let pid = self.pid();
        if leader_exit(pid).is_none() {
            let _ = signal_pid(pid, Signal::TERM);
            let deadline = Instant::now() + self.stop_timeout;
            while Instant::now() < deadline && leader_exit(pid).is_none() {
                thread::sleep(Duration::from_millis(20));
            }
        }
        if let Some(p) = Pid::from_raw(pid as i32) {
            let _ = kill_process_group(p, Signal::KILL);
        }
        self.status = self.child.wait().ok();
        live_groups().remove(&pid);
        self.status
    }
}

impl ProcessGroupGuard {
    /// `kill -9` of the whole process group, right away, and reaping: a crash.
    pub fn kill(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            let pid = self.pid();
            if let Some(p) = Pid::from_raw(pid as i32) {
                let _ = kill_process_group(p, Signal::KILL);
            }
            self.status = self.child.wait().ok();
            live_groups().remove(&pid);
        }
        self.status
    }

    /// Waits up to `timeout` for the process to exit on its own (a crash point, a refusal
    /// to start) and returns its status; what is left of its group is killed.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        while self.status.is_none() && leader_exit(self.pid()).is_none() {
            if Instant::now() >= deadline {
                bail!("{} is still running after {timeout:?}", self.name);
            }
            thread::sleep(Duration::from_millis(10));
        }
        self.stop()
            .with_context(|| format!("reaping {}", self.name))
    }
}

/// How child `pid` exited, if it has, without reaping it (`waitid` with
/// `WNOWAIT`).
fn leader_exit(pid: u32) -> Option<String> {
    let p = Pid::from_raw(pid as i32)?;
    let st = waitid(
        WaitId::Pid(p),
        WaitIdOptions::EXITED | WaitIdOptions::NOHANG | WaitIdOptions::NOWAIT,
    )
    .ok()??;
    Some(match (st.exit_status(), st.terminating_signal()) {
        (Some(code), _) => format!("exit status: {code}"),
        (_, Some(sig)) => format!("signal: {sig}"),
        _ => "exited".to_owned(),
    })
}

/// Process groups spawned by [`ProcessGroupGuard`]s that are not stopped
/// yet, with the thread that spawned each.
static LIVE_GROUPS: Mutex<BTreeMap<u32, ThreadId>> = Mutex::new(BTreeMap::new());

fn live_groups() -> std::sync::MutexGuard<'static, BTreeMap<u32, ThreadId>> {
    LIVE_GROUPS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Sends SIGKILL to the process group of every [`ProcessGroupGuard`] of this
/// process that has not been stopped and was spawned by thread `owner` (all of
/// them with `None`): for a stuck test whose guards would never be dropped.
/// Their leaders are not reaped before `stop`, so the group ids are still
/// theirs.
pub fn kill_groups(owner: Option<ThreadId>) {
    let groups: Vec<u32> = live_groups()
        .iter()
        .filter(|(_, t)| owner.is_none() || owner == Some(**t))
        .map(|(g, _)| *g)
        .collect();
    for g in groups {
        if let Some(pid) = Pid::from_raw(g as i32) {
            let _ = kill_process_group(pid, Signal::KILL);
        }
    }
}

impl Drop for ProcessGroupGuard {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Sends `sig` to one process; a process that is already gone is not an error.
pub fn signal_pid(pid: u32, sig: Signal) -> Result<()> {
    let Some(p) = Pid::from_raw(pid as i32) else {
        bail!("invalid pid {pid}");
    };
    match kill_process(p, sig) {
        Ok(()) | Err(rustix::io::Errno::SRCH) => Ok(()),
        Err(e) => Err(e).with_context(|| format!("kill({pid}, {sig:?})")),
    }
}

/// Whether a process with this id exists (a zombie counts).
pub fn pid_exists(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Runs `cmd` to completion with stdin from `/dev/null`, capturing stdout and
/// stderr. The command runs in its own process group; when `timeout` passes the
/// whole group gets SIGKILL and an error carrying the output so far is returned.
/// A non-zero exit status is not an error here: see [`check_output`].
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Result<Output> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd.process_group(0);
    let mut child = cmd.spawn().with_context(|| format!("spawn {cmd:?}"))?;
    let mut out_pipe = child.stdout.take().expect("piped stdout");
    let mut err_pipe = child.stderr.take().expect("piped stderr");
    let out_thread = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out_pipe.read_to_end(&mut v);
        v
    });
    let err_thread = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err_pipe.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let mut timed_out = false;
    while leader_exit(child.id()).is_none() {
        if Instant::now() >= deadline {
            timed_out = true;
            break;
        }
        thread::sleep(Duration::from_millis(10));
    }
    // Kill the group (on timeout, or stragglers that might hold the pipes
    // open) before reaping the leader, whose pid is the group id.
    if let Some(pid) = Pid::from_raw(child.id() as i32) {
        let _ = kill_process_group(pid, Signal::KILL);
    }
    let status = child.wait()?;
    let stdout = out_thread.join().unwrap_or_default();
    let stderr = err_thread.join().unwrap_or_default();
    let output = Output {
        status,
        stdout,
        stderr,
    };
    if timed_out {
        bail!(
            "timed out after {timeout:?}: {cmd:?}\nstdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(output)
}

/// Returns stdout as a string if `output` reports success, else an error
/// naming `what` with the exit status, stdout and stderr.
pub fn check_output(output: &Output, what: &str) -> Result<String> {
    if !output.status.success() {
        bail!(
            "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The last `lines` lines of a text file (empty if it cannot be read). Reads at
/// most the last 256 KiB.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let Ok(mut f) = File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(256 * 1024);
    if f.seek(SeekFrom::Start(start)).is_err() {
        return String::new();
    }
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Polls `f` every `interval` until it returns `Some` or `timeout` passes.
pub fn wait_for<T>(
    timeout: Duration,
    interval: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(interval);
    }
}

/// One process as seen in `/proc`.
#[derive(Debug, Clone)]
pub struct ProcInfo {
    /// Process id.
    pub pid: u32,
    /// Parent process id.
    pub ppid: u32,
    /// Command line arguments (empty for kernel threads and zombies).
    pub cmdline: Vec<String>,
    /// Target of `/proc/PID/exe` (as the process sees it), if readable.
    pub exe: Option<PathBuf>,
    /// Target of `/proc/PID/ns/mnt`, e.g. `mnt:[4026531841]`, if readable.
    pub mnt_ns: Option<String>,
}

impl ProcInfo {
    /// Reads one process; `None` if it is gone.
    pub fn read(pid: u32) -> Option<ProcInfo> {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // `pid (comm) state ppid ...`: comm may contain spaces and parentheses.
        let after = &stat[stat.rfind(')')? + 1..];
        let mut fields = after.split_whitespace();
        let _state = fields.next()?;
        let ppid = fields.next()?.parse().ok()?;
        let cmdline = fs::read(format!("/proc/{pid}/cmdline"))
            .map(|b| {
                b.split(|&c| c == 0)
                    .filter(|s| !s.is_empty())
                    .map(|s| String::from_utf8_lossy(s).into_owned())
                    .collect()
            })
            .unwrap_or_default();
        let exe = fs::read_link(format!("/proc/{pid}/exe")).ok();
        let mnt_ns = fs::read_link(format!("/proc/{pid}/ns/mnt"))
            .ok()
            .map(|p| p.to_string_lossy().into_owned());
        Some(ProcInfo {
            pid,
            ppid,
            cmdline,
            exe,
            mnt_ns,
        })
    }

    /// Whether any command line argument contains `needle`.
    pub fn cmdline_contains(&self, needle: &str) -> bool {
        self.cmdline.iter().any(|a| a.contains(needle))
    }
}

/// All processes currently in `/proc` (except the calling process).
pub fn list_processes() -> Vec<ProcInfo> {
    let me = std::process::id();
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter_map(ProcInfo::read)
        .collect()
}

/// `roots` plus all their descendants (by parent pid), from one `/proc` scan.
pub fn with_descendants(procs: &[ProcInfo], roots: &BTreeSet<u32>) -> BTreeSet<u32> {
    let mut set = roots.clone();
    loop {
        let before = set.len();
        for p in procs {
            if set.contains(&p.ppid) {
                set.insert(p.pid);
            }
        }
        if set.len() == before {
            return set;
        }
    }
}

/// Sends SIGKILL to every pid in `pids` and waits up to `timeout` for them to
/// disappear (zombies of other parents may linger; they are reported, not an
/// error). Returns the pids still present.
pub fn kill_and_wait(pids: &BTreeSet<u32>, timeout: Duration) -> Vec<u32> {
    let me = std::process::id();
    for &pid in pids {
        if pid > 1 && pid != me {
            let _ = signal_pid(pid, Signal::KILL);
        }
    }
    let left = wait_for(timeout, Duration::from_millis(20), || {
        let alive: Vec<u32> = pids
            .iter()
            .copied()
            .filter(|&p| p != me && is_alive(p))
            .collect();
        alive.is_empty().then_some(())
    });
    if left.is_some() {
        return Vec::new();
    }
    pids.iter()
        .copied()
        .filter(|&p| p != me && is_alive(p))
        .collect()
}

/// Whether the process exists and is not a zombie.
fn is_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => match stat.rfind(')') {
            Some(i) => !stat[i + 1..].trim_start().starts_with('Z'),
            None => true,
        },
        Err(_) => false,
    }
}
