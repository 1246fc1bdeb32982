//! A [`Mounter`] that performs nothing: it records every call and keeps its own table of what
//! would be mounted where, so the snapshotter's whole lifecycle runs without root and without
//! touching the kernel's mount table (the unprivileged test tier).
//!
//! It refuses what the kernel would refuse and the snapshotter must not ask for (a missing
//! image, a target that is not a directory), so a wrong path shows up as an error here as it
//! would in production. Mounting on a target that is already mounted stacks, as in the kernel;
//! whether a layer was mounted once is a question for [`RecordingMounter::events`].
//!
//! A new `Mounter` method needs a [`MountEvent`] variant and a line calling
//! [`RecordingMounter::record_mount`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use super::Mounter;
use super::mounter::OpenImage;
use crate::error::{Error, Result};

/// One call the snapshotter made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountEvent {
    /// [`Mounter::mount_erofs`].
    Erofs {
        /// The layer image.
        image: PathBuf,
        /// Where it would be mounted.
        target: PathBuf,
    },
    /// [`Mounter::mount_erofs_devices`].
    ErofsDevices {
        /// The metadata image (`fsmeta.erofs`).
        image: PathBuf,
        /// Its devices, in device-table order.
        devices: Vec<PathBuf>,
        /// Where it would be mounted.
        target: PathBuf,
    },
    /// [`Mounter::mount_ext4`].
    Ext4 {
        /// The writable-layer image.
        image: PathBuf,
        /// Where it would be mounted.
        target: PathBuf,
    },
    /// [`Mounter::unmount`].
    Unmount {
        /// The mount point.
        target: PathBuf,
        /// Whether anything was mounted there (unmounting nothing succeeds, as with
        /// [`super::SystemMounter`]).
        was_mounted: bool,
    },
}

impl MountEvent {
    /// The mount point the call was about.
    pub fn target(&self) -> &Path {
        match self {
            MountEvent::Erofs { target, .. }
            | MountEvent::ErofsDevices { target, .. }
            | MountEvent::Ext4 { target, .. }
            | MountEvent::Unmount { target, .. } => target,
        }
    }

    /// Whether this is a mount (not an unmount).
    pub fn is_mount(&self) -> bool {
        !matches!(self, MountEvent::Unmount { .. })
    }
}

#[derive(Debug, Default)]
struct State {
    events: Vec<MountEvent>,
    /// Mount point -> the mounts stacked on it, last on top.
    mounted: BTreeMap<PathBuf, Vec<MountEvent>>,
}

/// Records mounts instead of performing them. Needs no privileges.
#[derive(Debug, Default)]
pub struct RecordingMounter {
    state: Mutex<State>,
}

impl RecordingMounter {
    /// An empty recorder.
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panicking test thread must not hide the log from the others.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every call so far, in order.
    pub fn events(&self) -> Vec<MountEvent> {
        self.state().events.clone()
    }

    /// What is mounted now: mount point -> the topmost mount on it.
    pub fn mounted(&self) -> BTreeMap<PathBuf, MountEvent> {
        self.state()
            .mounted
            .iter()
            .filter_map(|(t, stack)| Some((t.clone(), stack.last()?.clone())))
            .collect()
    }

    /// Forget the log (the table of what is mounted stays).
    pub fn clear_events(&self) {
        self.state().events.clear();
    }

    /// Check a mount call as the kernel would and record it. `image` must be a regular file
    /// and the target an existing directory.
    pub fn record_mount(&self, image: &Path, event: MountEvent) -> Result<()> {
        if !image.is_file() {
            return Err(Error::internal(format!(
                "mounting {} on {}: the image is not a regular file",
                image.display(),
                event.target().display()
            )));
        }
        self.record(event)
    }

    /// Record a mount whose image was checked; the target must be an existing directory.
    fn record(&self, event: MountEvent) -> Result<()> {
        let target = event.target().to_path_buf();
        if !target.is_dir() {
            return Err(Error::internal(format!(
                "mounting on {}: the mount point is not a directory",
                target.display()
            )));
        }
        let mut st = self.state();
        st.events.push(event.clone());
        st.mounted.entry(target).or_default().push(event);
        Ok(())
    }
}

/// Refuse what is neither a regular file nor a block device, as the kernel would.
fn check_image(image: &OpenImage<'_>, target: &Path) -> Result<()> {
    let kind = image
        .file
        .metadata()
        .map_err(|e| Error::io(format!("stat of {}", image.path.display()), e))?
        .file_type();
    use std::os::unix::fs::FileTypeExt;
    if !kind.is_file() && !kind.is_block_device() {
        return Err(Error::internal(format!(
            "mounting {} on {}: the image is neither a regular file nor a block device",
            image.path.display(),
            target.display()
        )));
    }
    Ok(())
}

impl Mounter for RecordingMounter {
    fn mount_erofs(&self, image: OpenImage<'_>, target: &Path) -> Result<()> {
        check_image(&image, target)?;
        self.record(MountEvent::Erofs {
            image: image.path.to_path_buf(),
            target: target.to_path_buf(),
        })
    }

    fn mount_erofs_devices(
        &self,
        image: OpenImage<'_>,
        devices: &[OpenImage<'_>],
        target: &Path,
    ) -> Result<()> {
        check_image(&image, target)?;
        for d in devices {
            check_image(d, target)?;
        }
        self.record(MountEvent::ErofsDevices {
            image: image.path.to_path_buf(),
            devices: devices.iter().map(|d| d.path.to_path_buf()).collect(),
            target: target.to_path_buf(),
        })
    }

    fn mount_ext4(&self, image: &Path, target: &Path) -> Result<()> {
        self.record_mount(
            image,
            MountEvent::Ext4 {
                image: image.to_path_buf(),
                target: target.to_path_buf(),
            },
        )
    }

    fn unmount(&self, target: &Path) -> Result<()> {
        let mut st = self.state();
        let was_mounted = match st.mounted.get_mut(target) {
            Some(stack) => {
                stack.pop();
                if stack.is_empty() {
                    st.mounted.remove(target);
                }
                true
            }
            None => false,
        };
        st.events.push(MountEvent::Unmount {
            target: target.to_path_buf(),
            was_mounted,
        });
        Ok(())
    }

    fn is_mountpoint(&self, path: &Path) -> Result<bool> {
        Ok(self.state().mounted.contains_key(path))
    }

    fn mounts_under(&self, dir: &Path) -> Result<Vec<PathBuf>> {
        let mut v: Vec<PathBuf> = self
            .state()
            .mounted
            .keys()
            .filter(|t| t.starts_with(dir))
            .cloned()
            .collect();
        v.sort_by_key(|t| std::cmp::Reverse(t.components().count()));
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Opened(std::fs::File, PathBuf);
    impl Opened {
        fn as_image(&self) -> OpenImage<'_> {
            OpenImage {
                file: &self.0,
                path: &self.1,
            }
        }
    }
    fn open(p: &Path) -> Opened {
        Opened(std::fs::File::open(p).unwrap(), p.to_path_buf())
    }

    #[test]
    fn records_and_answers_consistently() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("layer.erofs");
        std::fs::write(&image, b"").unwrap();
        let fs = dir.path().join("1/fs");
        std::fs::create_dir_all(&fs).unwrap();
        let m = RecordingMounter::new();
        assert!(!m.is_mountpoint(&fs).unwrap());
        m.mount_erofs(open(&image).as_image(), &fs).unwrap();
        assert!(m.is_mountpoint(&fs).unwrap());
        assert_eq!(m.mounts_under(dir.path()).unwrap(), vec![fs.clone()]);
        m.unmount(&fs).unwrap();
        m.unmount(&fs).unwrap();
        assert!(!m.is_mountpoint(&fs).unwrap());
        assert_eq!(
            m.events(),
            vec![
                MountEvent::Erofs {
                    image: image.clone(),
                    target: fs.clone()
                },
                MountEvent::Unmount {
                    target: fs.clone(),
                    was_mounted: true
                },
                MountEvent::Unmount {
                    target: fs,
                    was_mounted: false
                },
            ]
        );
    }

    #[test]
    fn refuses_what_the_kernel_would() {
        let dir = tempfile::tempdir().unwrap();
        let m = RecordingMounter::new();
        // A directory is no image; a regular file on a missing mount point is refused too.
        assert!(
            m.mount_erofs(open(dir.path()).as_image(), dir.path())
                .is_err()
        );
        let img = dir.path().join("layer.erofs");
        std::fs::write(&img, b"").unwrap();
        assert!(
            m.mount_erofs(open(&img).as_image(), &dir.path().join("nodir"))
                .is_err()
        );
        let image = dir.path().join("rw.img");
        std::fs::write(&image, b"").unwrap();
        assert!(m.mount_ext4(&image, &dir.path().join("nodir")).is_err());
        assert!(m.events().is_empty());
    }

    #[test]
    fn stacked_mounts_unmount_one_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("img");
        std::fs::write(&image, b"").unwrap();
        let t = dir.path().join("t");
        std::fs::create_dir(&t).unwrap();
        let m = RecordingMounter::new();
        m.mount_erofs(open(&image).as_image(), &t).unwrap();
        m.mount_ext4(&image, &t).unwrap();
        assert!(matches!(m.mounted()[&t], MountEvent::Ext4 { .. }));
        m.unmount(&t).unwrap();
        assert!(matches!(m.mounted()[&t], MountEvent::Erofs { .. }));
        m.unmount(&t).unwrap();
        assert!(m.mounted().is_empty());
    }
}
