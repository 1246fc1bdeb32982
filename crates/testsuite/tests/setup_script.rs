//! `scripts/setup` is safe on a machine that already runs containerd (issue
//! 10): run twice while private containerd 1.6, 1.7 and 2.1 instances each run a
//! container, it leaves their containerd, shim and container processes alive,
//! replaces none of the containerd/runc binaries (the host's or the private
//! copies in use), changes no containerd/runc/Docker package, leaves
//! `/usr/sbin/policy-rc.d` as it was, and starts no packaged containerd or
//! docker-registry service. Needs root and network access for apt on a machine
//! where setup has not run yet.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use testsuite::oci::{self, Compression, ImageSpec};
use testsuite::process::{self, ProcInfo};
use testsuite::{Containerd, ContainerdOpts, RunOpts, Version, unique_name, with_timeout};

/// Binaries setup must never replace or rewrite: the host's (whichever exist)
/// and the private copies the running instances use.
fn guarded_binaries() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = [
        "/usr/bin/containerd",
        "/usr/bin/ctr",
        "/usr/bin/containerd-shim-runc-v2",
        "/usr/bin/runc",
        "/usr/sbin/runc",
        "/usr/local/bin/containerd",
        "/usr/local/sbin/runc",
        "/usr/bin/dockerd",
    ]
    .iter()
    .map(PathBuf::from)
    .collect();
    for version in Version::ALL {
        v.extend([
            version.containerd(),
            version.ctr(),
            version.shim(),
            version.runc(),
        ]);
    }
    v
}

/// What identifies a file's current contents without reading it: a
/// replacement (new inode) or any write, chmod or rename changes the ctime.
#[derive(Debug, PartialEq, Eq)]
struct Fingerprint {
    dev: u64,
    ino: u64,
    size: u64,
    mode: u32,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

fn fingerprint(path: &Path) -> Option<Fingerprint> {
    let m = fs::symlink_metadata(path).ok()?;
    Some(Fingerprint {
        dev: m.dev(),
        ino: m.ino(),
        size: m.size(),
        mode: m.mode(),
        mtime: (m.mtime(), m.mtime_nsec()),
        ctime: (m.ctime(), m.ctime_nsec()),
    })
}

fn fingerprints() -> BTreeMap<PathBuf, Option<Fingerprint>> {
    guarded_binaries()
        .into_iter()
        .map(|p| {
            let f = fingerprint(&p);
            (p, f)
        })
        .collect()
}

/// dpkg's view of the packages a host containerd or runc may come from.
fn container_packages() -> String {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Package} ${Status} ${Version}\n"])
        .args([
            "containerd",
            "containerd.io",
            "moby-containerd",
            "runc",
            "docker-ce",
            "docker.io",
        ])
        .stderr(Stdio::null())
        .output()
        .expect("dpkg-query");
    // Exit status 1 only means some of the names are unknown to dpkg.
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `/usr/sbin/policy-rc.d`: contents and metadata, or `None` if absent.
fn policy_rc_d() -> Option<(Vec<u8>, Fingerprint)> {
    let p = Path::new("/usr/sbin/policy-rc.d");
    fingerprint(p).map(|f| (fs::read(p).unwrap_or_default(), f))
}

/// Runs `scripts/setup` to completion (a deadline, then it is killed) and
/// returns its stderr. Its output goes to files, not pipes, so a daemon it
/// might leave behind cannot hold the test up, and is seen by the caller.
fn run_setup(dir: &Path, n: u32) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/setup");
    let out_path = dir.join(format!("setup-{n}.out"));
    let err_path = dir.join(format!("setup-{n}.err"));
    let mut child = Command::new("bash")
        .arg(&script)
        .stdin(Stdio::null())
        .stdout(fs::File::create(&out_path).unwrap())
        .stderr(fs::File::create(&err_path).unwrap())
        .spawn()
        .expect("spawn scripts/setup");
    let deadline = Instant::now() + Duration::from_secs(900);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "scripts/setup run {n} timed out; stderr:\n{}",
                fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let stderr = fs::read_to_string(&err_path).unwrap_or_default();
    assert!(
        status.success(),
        "scripts/setup run {n}: {status}\nstdout:\n{}\nstderr:\n{stderr}",
        fs::read_to_string(&out_path).unwrap_or_default()
    );
    stderr
}

/// A process a packaged service would be: the system containerd, or a
/// docker-registry on the package's config (the harness's registries read
/// their own config from a temporary directory, and its containerds are the
/// private copies under /opt).
fn packaged_service(p: &ProcInfo) -> bool {
    let exe = p.exe.as_deref().unwrap_or(Path::new(""));
    exe == Path::new("/usr/bin/containerd")
        || exe == Path::new("/usr/bin/dockerd")
        || p.cmdline_contains("/etc/docker/registry/")
}

/// `ctr tasks ls`: the pid of task `id` if it is RUNNING.
fn running_task_pid(ctd: &Containerd, id: &str) -> Option<u32> {
    let tasks = ctd.ctr_ok(&["tasks", "ls"]).unwrap();
    tasks
        .lines()
        .find_map(|l| match l.split_whitespace().collect::<Vec<_>>()[..] {
            [task, pid, "RUNNING", ..] if task == id => pid.parse().ok(),
            _ => None,
        })
}

struct Running {
    ctd: Containerd,
    id: String,
    /// containerd, its shim and the container's process.
    pids: Vec<u32>,
}

fn start_with_container(version: Version, dir: &Path) -> Running {
    let ctd = Containerd::start(ContainerdOpts::new(version)).unwrap();
    let spec = ImageSpec::new(&unique_name("setup-survivor"))
        .layer(oci::busybox_base_layer().unwrap(), Compression::Gzip);
    let image = oci::build_archive(&spec, dir).unwrap();
    oci::import(&ctd, &image, "overlayfs").unwrap();
    let id = unique_name("survivor");
    let out = ctd
        .run_with(&RunOpts {
            id: Some(id.clone()),
            rm: false,
            flags: vec!["-d".into()],
            ..RunOpts::new("overlayfs", &image.name, &["sleep", "900"])
        })
        .unwrap();
    ctd.check(&out, "ctr run -d").unwrap();
    let shims = ctd.shims();
    assert_eq!(shims.len(), 1, "{version}: {shims:?}");
    assert_eq!(
        shims[0].exe.as_deref(),
        Some(version.shim().as_path()),
        "{version}"
    );
    // The shim runs the first `runc` on its PATH: it must be the private copy.
    let environ = fs::read(format!("/proc/{}/environ", shims[0].pid)).unwrap();
    let path = environ
        .split(|&b| b == 0)
        .find_map(|e| e.strip_prefix(b"PATH="))
        .map(|p| String::from_utf8_lossy(p).into_owned());
    let found = path
        .iter()
        .flat_map(|p| p.split(':'))
        .map(|d| Path::new(d).join("runc"))
        .find(|r| r.exists())
        .and_then(|r| fs::canonicalize(r).ok());
    assert_eq!(
        found,
        fs::canonicalize(version.runc()).ok(),
        "{version}: shim PATH {path:?}"
    );
    let task = running_task_pid(&ctd, &id).expect("the container runs");
    let pids = vec![ctd.pid().unwrap(), shims[0].pid, task];
    Running { ctd, id, pids }
}

/// Whatever the packages do, the script itself signals no process: no line
/// outside comments names `kill`, `pkill` or `killall` (the old version ran
/// `pkill -f /usr/bin/containerd`, which also matches every shim).
#[test]
fn setup_kills_nothing() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/setup");
    let text = fs::read_to_string(&script).unwrap();
    let killers: Vec<&str> = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter(|l| {
            l.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
                .any(|w| matches!(w, "kill" | "pkill" | "killall" | "start-stop-daemon"))
        })
        .collect();
    assert!(killers.is_empty(), "{killers:?}");
}

#[test]
fn setup_twice_leaves_running_containerd_and_binaries_alone() {
    with_timeout(Duration::from_secs(2400), || {
        let dir = tempfile::tempdir().unwrap();
        let running: Vec<Running> = Version::ALL
            .iter()
            .map(|&v| start_with_container(v, dir.path()))
            .collect();
        let binaries = fingerprints();
        let packages = container_packages();
        let policy = policy_rc_d();
        let before: Vec<u32> = process::list_processes().iter().map(|p| p.pid).collect();

        for n in 1..=2 {
            let stderr = run_setup(dir.path(), n);
            if n == 2 {
                assert!(
                    !stderr.contains("setup: installing"),
                    "the second run installs again:\n{stderr}"
                );
            }
            for r in &running {
                let v = r.ctd.version();
                for &pid in &r.pids {
                    assert!(process::pid_exists(pid), "{v}: pid {pid} died in run {n}");
                }
                assert_eq!(
                    running_task_pid(&r.ctd, &r.id),
                    Some(r.pids[2]),
                    "{v}: the container stopped in run {n}"
                );
                let shims: Vec<u32> = r.ctd.shims().iter().map(|p| p.pid).collect();
                assert_eq!(shims, vec![r.pids[1]], "{v}: shims after run {n}");
            }
            assert_eq!(fingerprints(), binaries, "setup run {n} touched binaries");
            assert_eq!(
                container_packages(),
                packages,
                "setup run {n} changed packages"
            );
            assert!(
                policy_rc_d() == policy,
                "setup run {n} left policy-rc.d changed"
            );
            let started: Vec<ProcInfo> = process::list_processes()
                .into_iter()
                .filter(|p| !before.contains(&p.pid) && packaged_service(p))
                .collect();
            assert!(
                started.is_empty(),
                "services started by run {n}: {started:?}"
            );
        }
        // Shows the containers were real to the end: they still answer.
        for r in &running {
            let out = r
                .ctd
                .ctr_ok(&[
                    "tasks",
                    "exec",
                    "--exec-id",
                    "probe",
                    &r.id,
                    "echo",
                    "alive",
                ])
                .unwrap();
            assert_eq!(out.trim(), "alive", "{}", r.ctd.version());
        }
    });
}
