//! Performing the mount lists a snapshotter returns in host mode (`bind` and
//! `overlay`, as containerd does) on a directory of the test's choosing, and
//! parsing their overlay options.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use containerd_api::containerd::types::Mount;
use rustix::mount::{MountFlags, UnmountFlags};

/// Mounts stacked on one target; detached on drop unless unmounted
/// explicitly with [`Mounted::unmount`].
#[derive(Debug)]
pub struct Mounted {
    target: PathBuf,
    layers: usize,
}

impl Mounted {
    /// Takes charge of one mount the caller has already made on `target`
    /// (for mounts [`mount_all`] does not perform, such as an EROFS image).
    pub fn adopt(target: &Path) -> Mounted {
        Mounted {
            target: target.to_path_buf(),
            layers: 1,
        }
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.target
    }

    /// Unmounts (not lazily: a busy mount is an error after a few retries).
    pub fn unmount(mut self) -> Result<()> {
        while self.layers > 0 {
            let mut tries = 0;
            loop {
                match rustix::mount::unmount(&self.target, UnmountFlags::empty()) {
                    Ok(()) => break,
                    Err(rustix::io::Errno::BUSY) if tries < 100 => {
                        tries += 1;
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => bail!("unmounting {}: {e}", self.target.display()),
                }
            }
            self.layers -= 1;
        }
        Ok(())
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        while self.layers > 0 {
            if rustix::mount::unmount(&self.target, UnmountFlags::DETACH).is_err() {
                break;
            }
            self.layers -= 1;
        }
    }
}

/// The options of an overlay mount.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overlay {
    /// Lower dirs, top first.
    pub lowers: Vec<PathBuf>,
    /// Upper dir.
    pub upper: Option<PathBuf>,
    /// Work dir.
    pub work: Option<PathBuf>,
    /// Everything else.
    pub other: Vec<String>,
}

/// Parses the options of an overlay mount: exactly one `lowerdir=` (non-empty),
/// and `upperdir=` and `workdir=` both or neither.
///
/// Besides `overlay`, the type may be a containerd mount-manager type ending in
/// `/overlay` (`format/mkdir/overlay`): the manager-mode tests read the upper
/// dir of such a mount, whose `lowerdir=` is then a template (`{{ mount 0 }}`).
pub fn parse_overlay(m: &Mount) -> Result<Overlay> {
    ensure!(
        m.r#type == "overlay" || m.r#type.ends_with("/overlay"),
        "not an overlay mount: {m:?}"
    );
    let mut o = Overlay::default();
    for opt in &m.options {
        if let Some(v) = opt.strip_prefix("lowerdir=") {
            ensure!(o.lowers.is_empty(), "two lowerdir options in {m:?}");
            o.lowers = v.split(':').map(PathBuf::from).collect();
        } else if let Some(v) = opt.strip_prefix("upperdir=") {
            o.upper = Some(v.into());
        } else if let Some(v) = opt.strip_prefix("workdir=") {
            o.work = Some(v.into());
        } else {
            o.other.push(opt.clone());
        }
    }
    ensure!(
        !o.lowers.is_empty(),
        "overlay mount without lowerdir: {m:?}"
    );
    ensure!(
        o.upper.is_some() == o.work.is_some(),
        "overlay mount with only one of upperdir and workdir: {m:?}"
    );
    Ok(o)
}

/// Performs `mounts` on `target`, in order, exactly as described: `bind`
/// (recursive with `rbind`, then remounted read-only with `ro`) and `overlay`
/// (`lowerdir=` in the given order, top first; other options passed on). Any
/// other type, an unknown bind option, a mount with a target or a relative bind
/// source is an error.
pub fn mount_all(mounts: &[Mount], target: &Path) -> Result<Mounted> {
    ensure!(!mounts.is_empty(), "empty mount list");
    let mut done = Mounted {
        target: target.to_path_buf(),
        layers: 0,
    };
    for m in mounts {
        ensure!(m.target.is_empty(), "mount with a target: {m:?}");
        match m.r#type.as_str() {
            "bind" => {
                let mut ro = false;
                let mut recursive = false;
                for o in &m.options {
                    match o.as_str() {
                        "ro" => ro = true,
                        "rw" => ro = false,
                        "rbind" => recursive = true,
                        "bind" => {}
                        other => bail!("unexpected bind option {other:?} in {m:?}"),
                    }
                }
                let src = Path::new(&m.source);
                ensure!(src.is_absolute(), "bind source is not absolute: {m:?}");
                if recursive {
                    rustix::mount::mount_bind_recursive(src, target)
                } else {
                    rustix::mount::mount_bind(src, target)
                }
                .with_context(|| format!("bind-mounting {m:?} on {}", target.display()))?;
                done.layers += 1;
                if ro {
                    rustix::mount::mount_remount(target, MountFlags::BIND | MountFlags::RDONLY, "")
                        .with_context(|| format!("remounting {} read-only", target.display()))?;
                }
            }
            "overlay" => {
                ensure!(m.source == "overlay", "overlay source {:?}", m.source);
                let o = parse_overlay(m)?;
                let lowers: Vec<&Path> = o.lowers.iter().map(PathBuf::as_path).collect();
                let uw = match (&o.upper, &o.work) {
                    (Some(u), Some(w)) => Some((u.as_path(), w.as_path())),
                    _ => None,
                };
                erofs_sys::mount::mount_overlay(target, &lowers, uw, &o.other)
                    .with_context(|| format!("mounting {m:?} on {}", target.display()))?;
                done.layers += 1;
            }
            other => bail!(
                "unexpected mount type {other:?} (host mode returns bind and overlay only): {m:?}"
            ),
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mount(kind: &str, options: &[&str]) -> Mount {
        Mount {
            r#type: kind.into(),
            source: "overlay".into(),
            target: String::new(),
            options: options.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn parses_overlay_options() {
        let o = parse_overlay(&mount(
            "overlay",
            &["workdir=/w", "upperdir=/u", "index=off", "lowerdir=/a:/b"],
        ))
        .unwrap();
        assert_eq!(o.lowers, [PathBuf::from("/a"), PathBuf::from("/b")]);
        assert_eq!(o.upper, Some(PathBuf::from("/u")));
        assert_eq!(o.work, Some(PathBuf::from("/w")));
        assert_eq!(o.other, ["index=off"]);
        let o = parse_overlay(&mount("format/mkdir/overlay", &["lowerdir={{ mount 0 }}"]));
        assert_eq!(o.unwrap().lowers, [PathBuf::from("{{ mount 0 }}")]);
    }

    #[test]
    fn rejects_malformed_overlays() {
        for (kind, opts) in [
            ("bind", &["lowerdir=/a"][..]),
            ("xoverlay", &["lowerdir=/a"]),
            ("overlay", &[]),
            ("overlay", &["lowerdir=/a", "lowerdir=/b"]),
            ("overlay", &["lowerdir=/a", "upperdir=/u"]),
            ("overlay", &["lowerdir=/a", "workdir=/w"]),
        ] {
            assert!(
                parse_overlay(&mount(kind, opts)).is_err(),
                "{kind} {opts:?}"
            );
        }
    }
}
