//! Integrity anchors, in process on the real kernel (root): what is mounted is what was
//! verified, and what a layer is checked against comes from the store, not from files next to
//! the layer. A mounter that wraps the real one stands between the check and the mount, where
//! an attacker who can write the snapshot directory would act.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use snapshotter::error::Result;
use snapshotter::mount::{Mounter, OpenImage, SystemMounter};
use snapshotter::{Cancel, Config, Snapshotter};

/// The real mounter, which first renames a file over the layer about to be mounted (once).
#[derive(Debug)]
struct SwapBeforeMount {
    inner: SystemMounter,
    swap: Mutex<Option<(PathBuf, PathBuf)>>,
}

impl Mounter for SwapBeforeMount {
    fn mount_erofs(&self, image: OpenImage<'_>, target: &Path) -> Result<()> {
        if let Some((from, over)) = self.swap.lock().unwrap().take() {
            assert_eq!(image.path, over, "the layer being mounted");
            std::fs::rename(&from, &over).unwrap();
        }
        self.inner.mount_erofs(image, target)
    }
    fn mount_erofs_devices(
        &self,
        image: OpenImage<'_>,
        devices: &[OpenImage<'_>],
        target: &Path,
    ) -> Result<()> {
        self.inner.mount_erofs_devices(image, devices, target)
    }
    fn mount_ext4(&self, image: &Path, target: &Path) -> Result<()> {
        self.inner.mount_ext4(image, target)
    }
    fn unmount(&self, target: &Path) -> Result<()> {
        self.inner.unmount(target)
    }
    fn is_mountpoint(&self, path: &Path) -> Result<bool> {
        self.inner.is_mountpoint(path)
    }
}

/// A snapshotter root in a temporary directory; whatever is still mounted under it is
/// detached when it goes, even when the test fails.
pub struct Root {
    pub dir: tempfile::TempDir,
    pub cfg: Config,
}

impl Root {
    pub fn new(extra: &str) -> Root {
        let dir = tempfile::tempdir().unwrap();
        let toml = format!(
            "root_path = {:?}\naddress = {:?}\n{extra}",
            dir.path().join("root").display().to_string(),
            dir.path().join("unused.sock").display().to_string(),
        );
        let cfg = Config::parse(&toml).unwrap();
        Root { dir, cfg }
    }
}

impl Drop for Root {
    fn drop(&mut self) {
        let m = SystemMounter::default();
        for t in m.mounts_under(self.dir.path()).unwrap_or_default() {
            let _ = m.unmount(&t);
        }
    }
}

/// Commit a layer holding `files` as `name`; returns its directory.
pub fn layer(s: &Snapshotter, name: &str, files: &[(&str, &[u8])]) -> PathBuf {
    let key = format!("{name}-active");
    let mounts = s.prepare(&key, "", BTreeMap::new()).unwrap();
    let upper = PathBuf::from(&mounts[0].source);
    for (p, data) in files {
        let f = upper.join(p);
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(f, data).unwrap();
    }
    s.commit(name, &key, BTreeMap::new(), "", &Cancel::never())
        .unwrap();
    upper.parent().unwrap().to_path_buf()
}

/// After the layer is verified and before it is mounted, another valid layer is renamed over
/// its path: the mount still shows the verified layer, file-backed and through a loop device.
/// (The daemon used to reopen the path to mount it, and mounted the replacement.)
#[test]
fn a_layer_swapped_after_its_check_is_not_what_gets_mounted() {
    assert!(rustix::process::geteuid().is_root(), "needs root (mounts)");
    for loop_devices in [false, true] {
        let root = Root::new("[snapshotter]\nenable_fsverity = true\n");
        let mounter = Arc::new(SwapBeforeMount {
            inner: if loop_devices {
                SystemMounter::with_loop_devices()
            } else {
                SystemMounter::default()
            },
            swap: Mutex::new(None),
        });
        let s = Snapshotter::open(root.cfg.clone(), mounter.clone()).unwrap();
        let l1 = layer(&s, "l1", &[("etc/one", b"one\n")]);
        let l2 = layer(&s, "l2", &[("etc/two", b"two\n")]);
        let spare = l1.join("replacement");
        std::fs::copy(l2.join("layer.erofs"), &spare).unwrap();
        *mounter.swap.lock().unwrap() = Some((spare, l1.join("layer.erofs")));
        s.view("v1", "l1", BTreeMap::new()).unwrap();
        assert!(mounter.swap.lock().unwrap().is_none(), "the swap happened");
        let fs = l1.join("fs");
        assert_eq!(
            std::fs::read(fs.join("etc/one")).unwrap(),
            b"one\n",
            "loop devices: {loop_devices}"
        );
        assert!(!fs.join("etc/two").exists(), "loop devices: {loop_devices}");
        // The path now holds the other layer: the next check of it (a fresh mount) refuses it.
        s.remove("v1").unwrap();
        drop(s);
    }
}
