//! Mount values returned to containerd: "a serialized mount syscall", built as data and
//! unit-tested as strings. Performing mounts is elsewhere.

use std::path::{Path, PathBuf};

/// containerd's `types.Mount`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Filesystem type (`bind`, `overlay`, `erofs`, or mount-manager types like
    /// `format/mkdir/overlay`).
    pub kind: String,
    /// Source.
    pub source: String,
    /// Target (always empty: containerd chooses).
    pub target: String,
    /// Options.
    pub options: Vec<String>,
}

impl Mount {
    fn new(kind: &str, source: impl Into<String>, options: Vec<String>) -> Self {
        Mount {
            kind: kind.into(),
            source: source.into(),
            target: String::new(),
            options,
        }
    }
}

fn p(path: &Path) -> String {
    path.display().to_string()
}

/// Everything the shape of a snapshot's mounts depends on.
#[derive(Debug, Clone)]
pub struct Shape<'a> {
    /// Writable (active) or read-only (view).
    pub writable: bool,
    /// This snapshot's `fs` directory.
    pub fs: PathBuf,
    /// This snapshot's `work` directory.
    pub work: PathBuf,
    /// This snapshot's own layer blob, when the differ has already filled it.
    pub own_layer: Option<PathBuf>,
    /// Its dm-verity sidecar to name in the mount (manager mode).
    pub own_sidecar: Option<PathBuf>,
    /// The parents' `fs` directories (host mode: where their layers are mounted), immediate
    /// parent first.
    pub lower_dirs: Vec<PathBuf>,
    /// The parents' layer blobs, immediate parent first (manager mode).
    pub lower_layers: Vec<PathBuf>,
    /// The parents' dm-verity sidecars to name in their mounts (manager mode), or empty.
    pub lower_sidecars: Vec<Option<PathBuf>>,
    /// Size-limited writable layer: the upper and work dirs live under `fs` (an ext4 image
    /// mounted there in host mode), in `upper/` and `work/`.
    pub block: Option<BlockShape>,
    /// Appended to overlay options.
    pub ovl_options: &'a [String],
    /// `uidmap=`/`gidmap=` overlay options (idmapped lowers), already formatted.
    pub idmap_options: Vec<String>,
    /// The parents as one flattened lower (`max_unmerged_layers`), instead of
    /// `lower_dirs`/`lower_layers`.
    pub flat: Option<FlatShape>,
}

/// A flattened parent chain: one EROFS filesystem, `fsmeta.erofs` with the chain's layers as
/// its devices.
#[derive(Debug, Clone)]
pub struct FlatShape {
    /// Host mode: where the daemon mounted it (or an idmapped clone of that mount).
    pub dir: PathBuf,
    /// Manager mode: `fsmeta.erofs`.
    pub fsmeta: PathBuf,
    /// Manager mode: the layers, in device-table order (bottom layer first).
    pub devices: Vec<PathBuf>,
}

impl FlatShape {
    /// containerd's mount-manager shape (upstream's `fsmetaMount`): `erofs` of fsmeta, `ro`,
    /// `loop`, one `device=` per layer, bottom first.
    fn erofs(&self) -> Mount {
        let mut opts = vec!["ro".to_string(), "loop".to_string()];
        opts.extend(self.devices.iter().map(|d| format!("device={}", p(d))));
        Mount::new("erofs", p(&self.fsmeta), opts)
    }
}

/// The ext4 writable layer of a size-limited snapshot.
#[derive(Debug, Clone)]
pub struct BlockShape {
    /// `rwlayer.img`.
    pub image: PathBuf,
    /// Size in bytes.
    pub size: u64,
}

impl Shape<'_> {
    fn rw(&self) -> String {
        if self.writable { "rw" } else { "ro" }.into()
    }

    fn upper(&self) -> PathBuf {
        match self.block {
            Some(_) => self.fs.join("upper"),
            None => self.fs.clone(),
        }
    }

    fn workdir(&self) -> PathBuf {
        match self.block {
            Some(_) => self.fs.join("work"),
            None => self.work.clone(),
        }
    }

    /// Host mode: plain mounts any containerd can perform. Lower layers are already mounted
    /// at their `fs` directories by the daemon.
    pub fn host(&self) -> Vec<Mount> {
        if let Some(flat) = &self.flat {
            if !self.writable {
                return vec![Mount::new(
                    "bind",
                    p(&flat.dir),
                    vec!["ro".into(), "rbind".into()],
                )];
            }
            let mut opts = vec![
                format!("workdir={}", p(&self.workdir())),
                format!("upperdir={}", p(&self.upper())),
            ];
            opts.extend(self.idmap_options.iter().cloned());
            opts.push(format!("lowerdir={}", p(&flat.dir)));
            opts.extend(self.ovl_options.iter().cloned());
            return vec![Mount::new("overlay", "overlay", opts)];
        }
        match (self.lower_dirs.len(), self.writable) {
            (0, _) => {
                let (src, rw) = if self.own_layer.is_some() {
                    // The differ filled this parentless snapshot: its layer is mounted at fs.
                    (self.fs.clone(), "ro".to_string())
                } else {
                    (self.upper(), self.rw())
                };
                vec![Mount::new("bind", p(&src), vec![rw, "rbind".into()])]
            }
            (1, false) => vec![Mount::new(
                "bind",
                p(&self.lower_dirs[0]),
                vec!["ro".into(), "rbind".into()],
            )],
            (_, writable) => {
                let mut opts = Vec::new();
                if writable {
                    opts.push(format!("workdir={}", p(&self.workdir())));
                    opts.push(format!("upperdir={}", p(&self.upper())));
                }
                opts.extend(self.idmap_options.iter().cloned());
                let lowers: Vec<String> = self.lower_dirs.iter().map(|d| p(d)).collect();
                opts.push(format!("lowerdir={}", lowers.join(":")));
                opts.extend(self.ovl_options.iter().cloned());
                vec![Mount::new("overlay", "overlay", opts)]
            }
        }
    }

    fn erofs(layer: &Path, sidecar: Option<&PathBuf>) -> Mount {
        let mut opts = vec!["ro".to_string(), "loop".to_string()];
        if let Some(s) = sidecar {
            opts.push(format!("X-containerd.dmverity={}", p(s)));
        }
        Mount::new("erofs", p(layer), opts)
    }

    fn sidecar(&self, i: usize) -> Option<&PathBuf> {
        self.lower_sidecars.get(i).and_then(Option::as_ref)
    }

    fn mkfs(&self, flag: &str) -> Option<Mount> {
        self.block.as_ref().map(|b| {
            Mount::new(
                "mkfs/ext4",
                p(&b.image),
                vec![
                    "X-containerd.mkfs.fs=ext4".into(),
                    format!("X-containerd.mkfs.size={}", b.size),
                    flag.into(),
                    "loop".into(),
                ],
            )
        })
    }

    /// Manager mode: upstream's exact shapes for containerd >= 2.2's mount manager.
    pub fn manager(&self) -> Vec<Mount> {
        if let Some(flat) = &self.flat {
            return self.manager_flat(flat);
        }
        let n = self.lower_layers.len();
        if n == 0 {
            if let Some(own) = &self.own_layer {
                return vec![Self::erofs(own, self.own_sidecar.as_ref())];
            }
            if let Some(mkfs) = self.mkfs(&self.rw()) {
                return vec![
                    mkfs,
                    Mount::new(
                        "format/mkdir/bind",
                        "{{ mount 0 }}/upper",
                        vec![
                            "X-containerd.mkdir.path={{ mount 0 }}/upper:0755".into(),
                            self.rw(),
                            "rbind".into(),
                        ],
                    ),
                ];
            }
            return vec![Mount::new(
                "bind",
                p(&self.fs),
                vec![self.rw(), "rbind".into()],
            )];
        }
        if n == 1 && !self.writable {
            return vec![Self::erofs(&self.lower_layers[0], self.sidecar(0))];
        }
        let mut out = Vec::new();
        let block = self.writable && self.block.is_some();
        if block {
            out.extend(self.mkfs("rw"));
        }
        let first = out.len();
        out.extend(
            self.lower_layers
                .iter()
                .enumerate()
                .map(|(i, l)| Self::erofs(l, self.sidecar(i))),
        );
        let mut opts = Vec::new();
        if self.writable {
            if block {
                opts.push("X-containerd.mkdir.path={{ mount 0 }}/upper:0755".into());
                opts.push("X-containerd.mkdir.path={{ mount 0 }}/work:0755".into());
                opts.push("workdir={{ mount 0 }}/work".into());
                opts.push("upperdir={{ mount 0 }}/upper".into());
            } else {
                opts.push(format!("workdir={}", p(&self.work)));
                opts.push(format!("upperdir={}", p(&self.fs)));
            }
        }
        opts.extend(self.idmap_options.iter().cloned());
        let last = first + n - 1;
        opts.push(if n == 1 {
            format!("lowerdir={{{{ mount {first} }}}}")
        } else {
            format!("lowerdir={{{{ overlay {first} {last} }}}}")
        });
        opts.extend(self.ovl_options.iter().cloned());
        out.push(Mount::new("format/mkdir/overlay", "overlay", opts));
        out
    }
}

impl Shape<'_> {
    /// Manager mode, flattened: a view is the fsmeta mount alone; an active snapshot is an
    /// overlay whose only lower is it (after the ext4 image in block mode).
    fn manager_flat(&self, flat: &FlatShape) -> Vec<Mount> {
        if !self.writable {
            return vec![flat.erofs()];
        }
        let mut out = Vec::new();
        let mut opts = Vec::new();
        if self.block.is_some() {
            out.extend(self.mkfs("rw"));
            opts.push("X-containerd.mkdir.path={{ mount 0 }}/upper:0755".into());
            opts.push("X-containerd.mkdir.path={{ mount 0 }}/work:0755".into());
            opts.push("workdir={{ mount 0 }}/work".into());
            opts.push("upperdir={{ mount 0 }}/upper".into());
        } else {
            opts.push(format!("workdir={}", p(&self.work)));
            opts.push(format!("upperdir={}", p(&self.fs)));
        }
        let first = out.len();
        out.push(flat.erofs());
        opts.extend(self.idmap_options.iter().cloned());
        opts.push(format!("lowerdir={{{{ mount {first} }}}}"));
        opts.extend(self.ovl_options.iter().cloned());
        out.push(Mount::new("format/mkdir/overlay", "overlay", opts));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(writable: bool, lowers: usize) -> Shape<'static> {
        static OVL: [String; 1] = [String::new()];
        let _ = &OVL;
        Shape {
            writable,
            fs: "/r/snapshots/9/fs".into(),
            work: "/r/snapshots/9/work".into(),
            own_layer: None,
            own_sidecar: None,
            lower_dirs: (0..lowers)
                .map(|i| PathBuf::from(format!("/r/snapshots/{}/fs", 8 - i)))
                .collect(),
            lower_layers: (0..lowers)
                .map(|i| PathBuf::from(format!("/r/snapshots/{}/layer.erofs", 8 - i)))
                .collect(),
            lower_sidecars: vec![],
            block: None,
            ovl_options: &[],
            idmap_options: vec![],
            flat: None,
        }
    }

    fn flat(writable: bool) -> Shape<'static> {
        let mut s = shape(writable, 3);
        s.flat = Some(FlatShape {
            dir: "/r/snapshots/8/merged".into(),
            fsmeta: "/r/snapshots/8/fsmeta.erofs".into(),
            devices: (6..=8)
                .map(|i| PathBuf::from(format!("/r/snapshots/{i}/layer.erofs")))
                .collect(),
        });
        s
    }

    #[test]
    fn flattened_shapes() {
        let m = flat(true).host();
        assert_eq!(m.len(), 1);
        assert_eq!(
            strs(&m[0]),
            "overlay overlay workdir=/r/snapshots/9/work,upperdir=/r/snapshots/9/fs,lowerdir=/r/snapshots/8/merged"
        );
        assert_eq!(
            strs(&flat(false).host()[0]),
            "bind /r/snapshots/8/merged ro,rbind"
        );
        let fsmeta = "erofs /r/snapshots/8/fsmeta.erofs ro,loop,device=/r/snapshots/6/layer.erofs,device=/r/snapshots/7/layer.erofs,device=/r/snapshots/8/layer.erofs";
        let m = flat(false).manager();
        assert_eq!(m.len(), 1);
        assert_eq!(strs(&m[0]), fsmeta);
        let m = flat(true).manager();
        assert_eq!(m.len(), 2);
        assert_eq!(strs(&m[0]), fsmeta);
        assert_eq!(
            strs(&m[1]),
            "format/mkdir/overlay overlay workdir=/r/snapshots/9/work,upperdir=/r/snapshots/9/fs,lowerdir={{ mount 0 }}"
        );
        let mut s = flat(true);
        s.block = Some(BlockShape {
            image: "/r/snapshots/9/rwlayer.img".into(),
            size: 1 << 26,
        });
        let m = s.manager();
        assert_eq!(m.len(), 3);
        assert_eq!(strs(&m[1]), fsmeta);
        assert!(strs(&m[2]).ends_with("upperdir={{ mount 0 }}/upper,lowerdir={{ mount 1 }}"));
    }

    fn strs(m: &Mount) -> String {
        format!("{} {} {}", m.kind, m.source, m.options.join(","))
    }

    #[test]
    fn host_shapes() {
        assert_eq!(
            strs(&shape(true, 0).host()[0]),
            "bind /r/snapshots/9/fs rw,rbind"
        );
        assert_eq!(
            strs(&shape(false, 0).host()[0]),
            "bind /r/snapshots/9/fs ro,rbind"
        );
        assert_eq!(
            strs(&shape(false, 1).host()[0]),
            "bind /r/snapshots/8/fs ro,rbind"
        );
        assert_eq!(
            strs(&shape(true, 1).host()[0]),
            "overlay overlay workdir=/r/snapshots/9/work,upperdir=/r/snapshots/9/fs,lowerdir=/r/snapshots/8/fs"
        );
        assert_eq!(
            strs(&shape(false, 2).host()[0]),
            "overlay overlay lowerdir=/r/snapshots/8/fs:/r/snapshots/7/fs"
        );
        let opts = vec!["volatile".to_string()];
        let mut s = shape(true, 2);
        s.ovl_options = &opts;
        assert!(
            strs(&s.host()[0]).ends_with("lowerdir=/r/snapshots/8/fs:/r/snapshots/7/fs,volatile")
        );
        let mut s = shape(true, 0);
        s.own_layer = Some("/r/snapshots/9/layer.erofs".into());
        assert_eq!(strs(&s.host()[0]), "bind /r/snapshots/9/fs ro,rbind");
    }

    #[test]
    fn manager_shapes_match_upstream() {
        let m = shape(false, 1).manager();
        assert_eq!(m.len(), 1);
        assert_eq!(strs(&m[0]), "erofs /r/snapshots/8/layer.erofs ro,loop");
        let m = shape(true, 1).manager();
        assert_eq!(
            strs(&m[1]),
            "format/mkdir/overlay overlay workdir=/r/snapshots/9/work,upperdir=/r/snapshots/9/fs,lowerdir={{ mount 0 }}"
        );
        let m = shape(true, 3).manager();
        assert_eq!(m.len(), 4);
        assert!(strs(&m[3]).ends_with("lowerdir={{ overlay 0 2 }}"));
        let m = shape(false, 3).manager();
        assert_eq!(
            strs(&m[3]),
            "format/mkdir/overlay overlay lowerdir={{ overlay 0 2 }}"
        );
        let mut s = shape(true, 2);
        s.block = Some(BlockShape {
            image: "/r/snapshots/9/rwlayer.img".into(),
            size: 1 << 26,
        });
        let m = s.manager();
        assert_eq!(
            strs(&m[0]),
            "mkfs/ext4 /r/snapshots/9/rwlayer.img X-containerd.mkfs.fs=ext4,X-containerd.mkfs.size=67108864,rw,loop"
        );
        assert_eq!(
            strs(&m[3]),
            "format/mkdir/overlay overlay X-containerd.mkdir.path={{ mount 0 }}/upper:0755,X-containerd.mkdir.path={{ mount 0 }}/work:0755,workdir={{ mount 0 }}/work,upperdir={{ mount 0 }}/upper,lowerdir={{ overlay 1 2 }}"
        );
        let mut s = shape(true, 0);
        s.block = Some(BlockShape {
            image: "/r/snapshots/9/rwlayer.img".into(),
            size: 1 << 26,
        });
        let m = s.manager();
        assert_eq!(
            strs(&m[1]),
            "format/mkdir/bind {{ mount 0 }}/upper X-containerd.mkdir.path={{ mount 0 }}/upper:0755,rw,rbind"
        );
        let mut s = shape(true, 0);
        s.own_layer = Some("/r/snapshots/9/layer.erofs".into());
        assert_eq!(
            strs(&s.manager()[0]),
            "erofs /r/snapshots/9/layer.erofs ro,loop"
        );
    }
}
