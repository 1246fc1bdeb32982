//! The generator: requests built from a seeded PRNG and from what the daemon has answered so
//! far ([`Model`]), so valid sequences (Prepare, fill, Apply, Commit, View) reach deep states
//! while hostile inputs (names, labels, filters, mounts and descriptors at and past
//! containerd's limits, paths that leave the root) are thrown at every one of them.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use containerd_api::containerd::services::diff::v1 as dpb;
use containerd_api::containerd::services::snapshots::v1 as pb;
use containerd_api::containerd::types::{Descriptor, Mount};

/// containerd's limit on one label: key plus value (`pkg/labels`, `maxSize = 4096`).
pub const LABEL_MAX: usize = 4096;
/// The longest key the daemon accepts (containerd itself sets none; ours is 4096 bytes).
pub const KEY_MAX: usize = 4096;
/// containerd's identifier limit (namespaces, leases: `pkg/identifiers`, `maxLength = 76`).
pub const IDENT_MAX: usize = 76;

/// One request (or one test-side action) of a run.
#[derive(Debug, Clone)]
pub enum Req {
    Prepare(pb::PrepareSnapshotRequest),
    View(pb::ViewSnapshotRequest),
    Mounts(String),
    Commit(pb::CommitSnapshotRequest),
    Remove(String),
    Stat(String),
    Update(pb::UpdateSnapshotRequest),
    List(Vec<String>),
    Usage(String),
    Cleanup,
    /// Apply, with the `containerd-namespace` header to send (if any).
    Apply(dpb::ApplyRequest, Option<String>),
    /// Diff (Compare), with the namespace header.
    Diff(dpb::DiffRequest, Option<String>),
    /// Not a request: mount an active snapshot's mounts and write a file into it, as a
    /// container would, so Commit and Compare have something to convert.
    Fill(String),
}

/// A string for a trace line: escaped, at most 80 characters.
pub fn short(s: &str) -> String {
    let e: String = s.escape_debug().collect();
    if e.len() > 80 {
        let cut = (0..=80).rev().find(|&i| e.is_char_boundary(i)).unwrap_or(0);
        format!("{}…({} bytes)", &e[..cut], s.len())
    } else {
        e
    }
}

fn short_mounts(m: &[Mount]) -> String {
    let parts: Vec<String> = m
        .iter()
        .take(3)
        .map(|m| {
            format!(
                "{}:{}[{} opts: {}]",
                short(&m.r#type),
                short(&m.source),
                m.options.len(),
                short(
                    &m.options
                        .iter()
                        .take(3)
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(",")
                )
            )
        })
        .collect();
    format!("{} mounts {}", m.len(), parts.join(" "))
}

fn short_labels(l: &HashMap<String, String>) -> String {
    let total: usize = l.iter().map(|(k, v)| k.len() + v.len()).sum();
    format!("{} labels/{total}B", l.len())
}

impl Req {
    /// The method's name.
    pub fn method(&self) -> &'static str {
        match self {
            Req::Prepare(_) => "Prepare",
            Req::View(_) => "View",
            Req::Mounts(_) => "Mounts",
            Req::Commit(_) => "Commit",
            Req::Remove(_) => "Remove",
            Req::Stat(_) => "Stat",
            Req::Update(_) => "Update",
            Req::List(_) => "List",
            Req::Usage(_) => "Usage",
            Req::Cleanup => "Cleanup",
            Req::Apply(..) => "Apply",
            Req::Diff(..) => "Diff",
            Req::Fill(_) => "fill",
        }
    }

    /// One line for the trace printed on failure.
    pub fn describe(&self) -> String {
        match self {
            Req::Prepare(r) => format!(
                "Prepare key={} parent={} {}",
                short(&r.key),
                short(&r.parent),
                short_labels(&r.labels)
            ),
            Req::View(r) => format!(
                "View key={} parent={} {}",
                short(&r.key),
                short(&r.parent),
                short_labels(&r.labels)
            ),
            Req::Mounts(k) => format!("Mounts {}", short(k)),
            Req::Commit(r) => format!(
                "Commit name={} key={} rebase={} {}",
                short(&r.name),
                short(&r.key),
                short(&r.parent),
                short_labels(&r.labels)
            ),
            Req::Remove(k) => format!("Remove {}", short(k)),
            Req::Stat(k) => format!("Stat {}", short(k)),
            Req::Update(r) => {
                let i = r.info.clone().unwrap_or_default();
                format!(
                    "Update name={} kind={} {} paths={:?}",
                    short(&i.name),
                    i.kind,
                    short_labels(&i.labels),
                    r.update_mask.as_ref().map(|m| m
                        .paths
                        .iter()
                        .map(|p| short(p))
                        .collect::<Vec<_>>())
                )
            }
            Req::List(f) => format!(
                "List {:?}",
                f.iter().take(4).map(|f| short(f)).collect::<Vec<_>>()
            ),
            Req::Usage(k) => format!("Usage {}", short(k)),
            Req::Cleanup => "Cleanup".into(),
            Req::Apply(r, ns) => {
                let d = r.diff.clone().unwrap_or_default();
                format!(
                    "Apply mt={} digest={} size={} ns={:?} payloads={} {}",
                    short(&d.media_type),
                    short(&d.digest),
                    d.size,
                    ns.as_deref().map(short),
                    r.payloads.len(),
                    short_mounts(&r.mounts)
                )
            }
            Req::Diff(r, ns) => format!(
                "Diff mt={} ns={:?} left={} right={}",
                short(&r.media_type),
                ns.as_deref().map(short),
                short_mounts(&r.left),
                short_mounts(&r.right)
            ),
            Req::Fill(k) => format!("fill {}", short(k)),
        }
    }
}

/// What the daemon holds, as far as its answers tell: every snapshot by key.
#[derive(Debug, Default, Clone)]
pub struct Model {
    pub snaps: BTreeMap<String, Snap>,
}

/// One snapshot of the model.
#[derive(Debug, Clone)]
pub struct Snap {
    pub kind: pb::Kind,
    pub parent: String,
    /// What Prepare or View returned (active and view snapshots).
    pub mounts: Vec<Mount>,
    /// The differ wrote its layer (Apply succeeded on it).
    pub applied: bool,
    /// Prepare, View or an Update gave it one of the snapshotter's own labels (id mappings,
    /// max size): their values have rules the model does not follow, so Mounts and Update
    /// may refuse them.
    pub own_labels: bool,
}

impl Model {
    fn keys_of(&self, kind: pb::Kind) -> Vec<&String> {
        self.snaps
            .iter()
            .filter(|(_, s)| s.kind == kind)
            .map(|(k, _)| k)
            .collect()
    }
    /// Whether `key` has children.
    pub fn has_children(&self, key: &str) -> bool {
        self.snaps.values().any(|s| s.parent == key)
    }
}

/// A layer blob in the content directory, and whether it is a well-formed layer.
#[derive(Debug, Clone)]
pub struct Blob {
    pub desc: Descriptor,
    pub valid: bool,
}

/// The seeded generator.
pub struct Gen {
    pub rng: fastrand::Rng,
    /// A name no path on this machine has: hostile paths that would create files name it.
    pub marker: String,
    pub root: PathBuf,
    /// A directory outside the root whose tree must never change.
    pub canary: PathBuf,
    pub blobs: Vec<Blob>,
    n: u64,
}

const MEDIA_TYPES: &[&str] = &[
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.erofs",
    "application/vnd.erofs.layer.v1",
];

const HOSTILE_MEDIA_TYPES: &[&str] = &[
    "",
    "application/vnd.oci.image.layer.v1.tar+gzip+encrypted",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+bzip2",
    "application/vnd.oci.image.layer.v1.tar+",
    "application/vnd.oci.image.layer.v1.tar+zstd+gzip",
    "application/vnd.oci.image.manifest.v1+json",
    "APPLICATION/VND.OCI.IMAGE.LAYER.V1.TAR",
    "application/vnd.oci.image.layer.v1.tar\0+gzip",
    "application/vnd.erofs+zstd",
    "text/plain",
    "../../../etc/passwd",
];

impl Gen {
    pub fn new(seed: u64, marker: String, root: PathBuf, canary: PathBuf) -> Gen {
        Gen {
            rng: fastrand::Rng::with_seed(seed),
            marker,
            root,
            canary,
            blobs: Vec::new(),
            n: 0,
        }
    }

    fn pick<'a, T>(&mut self, v: &'a [T]) -> Option<&'a T> {
        if v.is_empty() {
            None
        } else {
            Some(&v[self.rng.usize(..v.len())])
        }
    }

    fn chance(&mut self, percent: u32) -> bool {
        self.rng.u32(..100) < percent
    }

    /// A key nobody used yet, well-formed (but not necessarily plain: slashes, unicode).
    pub fn fresh(&mut self) -> String {
        self.n += 1;
        match self.rng.u32(..6) {
            0 => format!("default/{}/sha256:{:064x}", self.n, self.rng.u64(..)),
            1 => format!("k8s.io/{}/extract-{}", self.n, self.rng.u32(..)),
            2 => format!("ünï/ключ/键-{}", self.n),
            _ => format!("k{}", self.n),
        }
    }

    /// A hostile string for a key, name or parent.
    pub fn hostile(&mut self) -> String {
        let m = self.marker.clone();
        let root = self.root.display().to_string();
        match self.rng.u32(..30) {
            0 => String::new(),
            1 => "x".repeat(KEY_MAX),
            2 => "x".repeat(KEY_MAX + 1),
            3 => "y".repeat(self.rng.usize(KEY_MAX + 2..200_000)),
            4 => format!("a\0{}", self.n),
            5 => "\0".into(),
            6 => "..".into(),
            7 => ".".into(),
            8 => "/".into(),
            9 => format!("../../../../../../tmp/{m}-key"),
            10 => format!("/tmp/{m}-abs"),
            11 => format!("{root}/snapshots/1"),
            12 => "metadata.redb".into(),
            13 => "../metadata.redb".into(),
            14 => format!("new-{:016x}", self.rng.u64(..)),
            15 => format!("rm-{}-{:08x}", self.rng.u8(..), self.rng.u32(..)),
            16 => "\\x00\\xff\\xfe%00%2e%2e".into(),
            17 => "\u{202e}evil\u{200b}\u{feff}\u{fffd}".into(),
            18 => "🦀".repeat(self.rng.usize(1..1100)),
            19 => "e\u{301}".repeat(50),
            20 => "with space\tand\nnewline\r".into(),
            21 => "1".into(),
            22 => "18446744073709551616".into(),
            23 => "-1".into(),
            24 => "a".repeat(IDENT_MAX),
            25 => "a".repeat(IDENT_MAX + 1),
            26 => format!("{}\0", self.fresh()),
            27 => "labels.\"x\"==y,name~=/(/".into(),
            28 => format!("{m}/../../{m}/./x//y/"),
            _ => {
                // Random bytes as text: every control character and a few high code points.
                let len = self.rng.usize(1..64);
                (0..len)
                    .map(|_| match self.rng.u32(..4) {
                        0 => char::from(self.rng.u8(1..32)),
                        1 => self.rng.char('\u{80}'..'\u{800}'),
                        2 => self.rng.char('\u{10000}'..'\u{10ffff}'),
                        _ => self.rng.alphanumeric(),
                    })
                    .collect()
            }
        }
    }

    /// A key for a new snapshot: fresh (mostly), an existing one, or hostile.
    pub fn new_key(&mut self, model: &Model) -> String {
        match self.rng.u32(..10) {
            0..=5 => self.fresh(),
            6 => self.existing(model).unwrap_or_else(|| self.fresh()),
            _ => self.hostile(),
        }
    }

    /// Any existing key.
    pub fn existing(&mut self, model: &Model) -> Option<String> {
        let keys: Vec<&String> = model.snaps.keys().collect();
        self.pick(&keys).map(|k| (*k).clone())
    }

    /// A key that probably exists (of `kind` when given), else anything.
    pub fn some_key(&mut self, model: &Model, kind: Option<pb::Kind>) -> String {
        let r = self.rng.u32(..10);
        if r < 7 {
            let keys = match kind {
                Some(k) => model.keys_of(k),
                None => model.snaps.keys().collect(),
            };
            if let Some(k) = self.pick(&keys) {
                let k = (*k).clone();
                // Near misses of a real key.
                return match self.rng.u32(..12) {
                    0 => format!("{k}/"),
                    1 => format!("{k}\0"),
                    2 => format!("/{k}"),
                    3 => format!("{k}/.."),
                    _ => k,
                };
            }
        }
        if r < 8 { self.fresh() } else { self.hostile() }
    }

    /// A parent for Prepare/View: a committed snapshot (mostly), none, or anything.
    pub fn parent(&mut self, model: &Model) -> String {
        match self.rng.u32(..10) {
            0..=5 => {
                let keys = model.keys_of(pb::Kind::Committed);
                self.pick(&keys).map(|k| (*k).clone()).unwrap_or_default()
            }
            6..=7 => String::new(),
            _ => self.some_key(model, None),
        }
    }

    /// Labels: none or a few (mostly), at and past containerd's limit, hostile keys and
    /// values, the snapshotter's own labels with bad values.
    pub fn labels(&mut self) -> HashMap<String, String> {
        let mut l = HashMap::new();
        if self.chance(50) {
            return l;
        }
        for _ in 0..self.rng.usize(1..4) {
            let (k, v) = match self.rng.u32(..16) {
                0 => {
                    let k = "containerd.io/at-limit".to_string();
                    let v = "v".repeat(LABEL_MAX - k.len());
                    (k, v)
                }
                1 => {
                    let k = "containerd.io/past-limit".to_string();
                    let v = "v".repeat(LABEL_MAX + 1 - k.len());
                    (k, v)
                }
                2 => ("k".repeat(LABEL_MAX), String::new()),
                3 => ("k".repeat(LABEL_MAX + 1), String::new()),
                4 => (String::new(), "v".into()),
                5 => ("nul\0key".into(), "v".into()),
                6 => ("k".into(), "nul\0value".into()),
                7 => ("huge".into(), "h".repeat(1 << 20)),
                8 => (
                    "containerd.io/snapshot/max-size".into(),
                    self.pick(&[
                        "",
                        "0",
                        "-1",
                        "1",
                        "abc",
                        "18446744073709551615",
                        "18446744073709551616",
                        "1e9",
                        " 1048576",
                        "0x100000",
                    ])
                    .unwrap()
                    .to_string(),
                ),
                9 | 10 => (
                    if self.chance(50) {
                        "containerd.io/snapshot/uidmapping"
                    } else {
                        "containerd.io/snapshot/gidmapping"
                    }
                    .into(),
                    self.pick(&[
                        "",
                        "0:0:0",
                        "0:100000",
                        "a:b:c",
                        "0:4294967295:4294967295",
                        "0:100000:65536,0:100000:65536",
                        "-1:0:1",
                        "0:100000:65536,",
                        ":::",
                        "0:100000:18446744073709551616",
                    ])
                    .unwrap()
                    .to_string(),
                ),
                11 => ("containerd.io/gc.ref.snapshot.erofs".into(), self.hostile()),
                12 => (self.hostile(), self.hostile()),
                _ => (
                    format!("containerd.io/l{}", self.rng.u8(..)),
                    self.rng.u32(..).to_string(),
                ),
            };
            l.insert(k, v);
        }
        if self.chance(3) {
            // Many small labels: more than any snapshot would carry.
            for i in 0..self.rng.usize(100..3000) {
                l.insert(format!("many.{i}"), "v".into());
            }
        }
        l
    }

    /// Filters for List: valid containerd filter syntax over the fields it knows, and
    /// malformed or expensive ones.
    pub fn filters(&mut self, model: &Model) -> Vec<String> {
        let n = match self.rng.u32(..10) {
            0 => 0,
            1 => self.rng.usize(50..300),
            _ => self.rng.usize(1..4),
        };
        (0..n).map(|_| self.filter(model)).collect()
    }

    fn filter(&mut self, model: &Model) -> String {
        let key = self.existing(model).unwrap_or_else(|| "k1".into());
        let quoted = format!("{key:?}");
        match self.rng.u32(..30) {
            0 => String::new(),
            1 => format!("name=={quoted}"),
            2 => "kind==active".into(),
            3 => "kind==committed,parent!=\"\"".into(),
            4 => "labels.\"containerd.io/l1\"".into(),
            5 => "name~=/^k[0-9]+$/".into(),
            6 => "parent~=|a|b|".into(),
            7 => "labels.x~=/a,b/".into(),
            8 => "name~=.*".into(),
            9 => "name~=/(/".into(),
            10 => "name==".into(),
            11 => "\"".into(),
            12 => "labels.".into(),
            13 => ",,,".into(),
            14 => "name==a ,b".into(),
            15 => format!("name~=/{}/", "(a*)*".repeat(200)),
            16 => format!("name~=/{}/", "a{1000}".repeat(20)),
            17 => format!("name~=/{}x{}/", "(".repeat(150), ")".repeat(150)),
            18 => "name~=/\\Q...\\E[[:alpha:]]\\pL\\d+/".into(),
            19 => "labels.\"\\xff\\u00zz\"==\"\\uD800\"".into(),
            20 => "x".repeat(self.rng.usize(1000..70_000)),
            21 => ["name==a"; 1].repeat(self.rng.usize(100..2000)).join(","),
            22 => "name~=/a/,name~=/b/,name~=/c/".repeat(50),
            23 => "created_at==2020".into(),
            24 => "kind==active\0".into(),
            25 => self.hostile(),
            26 => "name!=\"\\".into(),
            27 => format!("labels.{}", "a.".repeat(3000)),
            28 => "name~=/\\/".into(),
            _ => format!("name=={}", self.hostile().replace(['"', '\\'], "")),
        }
    }

    /// Update field paths.
    pub fn paths(&mut self) -> Option<Vec<String>> {
        if self.chance(15) {
            return None;
        }
        let n = self.rng.usize(0..4);
        Some(
            (0..n)
                .map(|_| match self.rng.u32(..14) {
                    0 => "labels".into(),
                    1..=3 => format!("labels.containerd.io/l{}", self.rng.u8(..)),
                    4 => "labels.".into(),
                    5 => "name".into(),
                    6 => "kind".into(),
                    7 => "parent".into(),
                    8 => "created_at".into(),
                    9 => "labels.containerd.io/at-limit".into(),
                    10 => String::new(),
                    11 => "labels.containerd.io/snapshot/max-size".into(),
                    12 => format!("labels.{}", "p".repeat(5000)),
                    _ => self.hostile(),
                })
                .collect(),
        )
    }

    /// An Info for Update of `name`.
    pub fn info(&mut self, name: String) -> pb::Info {
        let parent = if self.chance(20) {
            self.hostile()
        } else {
            String::new()
        };
        pb::Info {
            name,
            parent,
            kind: self.pick(&[0, 1, 2, 3, -1, 99]).copied().unwrap(),
            created_at: None,
            updated_at: None,
            labels: self.labels(),
        }
    }

    /// A path outside the snapshots, or inside them in a form that must not count as one.
    fn hostile_path(&mut self, model: &Model) -> String {
        let root = self.root.display().to_string();
        let canary = self.canary.display().to_string();
        let m = self.marker.clone();
        let id = self.rng.u32(1..40);
        match self.rng.u32(..26) {
            0 => canary,
            1 => format!("{canary}/sub/{m}-new"),
            2 => format!("{root}/snapshots/{id}/../../../canary"),
            3 => format!("{root}/snapshots/{id}/../../../canary/{m}-up"),
            4 => format!("{root}/snapshots/../canary"),
            5 => format!("{root}/../canary"),
            6 => format!("/proc/self/root{canary}"),
            7 => "/proc/self/cwd".into(),
            8 => "/proc/self/fd/0".into(),
            9 => format!("/proc/1/root/tmp/{m}-pid1"),
            10 => "/dev/null".into(),
            11 => "/".into(),
            12 => String::new(),
            13 => format!("snapshots/{id}"),
            14 => format!("{root}/snapshots/999999"),
            15 => format!("{root}/snapshots/18446744073709551616"),
            16 => format!("{root}/snapshots/-1"),
            17 => format!("{root}//snapshots//{id}//fs"),
            18 => format!("{root}/snapshots/{id}\0/fs"),
            19 => format!("{root}/snapshots/{id}/fs/../../{}", id + 1),
            20 => format!("{root}/snapshots/new-{:016x}", self.rng.u64(..)),
            21 => format!("{root}/metadata.redb"),
            22 => format!("{root}/tmp"),
            23 => format!("/tmp/{m}-src"),
            24 => format!("{root}/snapshots/{id}/layer.erofs"),
            _ => {
                // A real snapshot path with a tail that leaves it.
                let real = self.real_paths(model);
                match self.pick(&real) {
                    Some(p) => format!("{p}/../../../../canary/{m}-tail"),
                    None => format!("{root}/snapshots/{id}/fs"),
                }
            }
        }
    }

    /// Paths of snapshots the daemon handed out (sources, upper and lower dirs).
    fn real_paths(&mut self, model: &Model) -> Vec<String> {
        let mut out = Vec::new();
        for s in model.snaps.values() {
            for m in &s.mounts {
                out.push(m.source.clone());
                for o in &m.options {
                    for pre in ["upperdir=", "workdir=", "lowerdir="] {
                        if let Some(v) = o.strip_prefix(pre) {
                            out.extend(v.split(':').map(str::to_string));
                        }
                    }
                }
            }
        }
        out.retain(|p| p.starts_with('/'));
        out
    }

    fn path(&mut self, model: &Model) -> String {
        let real = self.real_paths(model);
        if self.chance(50)
            && let Some(p) = self.pick(&real)
        {
            return p.clone();
        }
        self.hostile_path(model)
    }

    fn options(&mut self, model: &Model) -> Vec<String> {
        let mut o = Vec::new();
        if self.chance(5) {
            // A huge option list.
            let n = self.rng.usize(1000..20_000);
            let p = self.path(model);
            return (0..n).map(|i| format!("lowerdir={p}:{i}")).collect();
        }
        for _ in 0..self.rng.usize(0..5) {
            let s = match self.rng.u32(..16) {
                0 => "ro".into(),
                1 => "rw".into(),
                2 => "rbind".into(),
                3 => format!("upperdir={}", self.path(model)),
                4 => format!("workdir={}", self.path(model)),
                5 | 6 => {
                    let n = self.rng.usize(1..5);
                    let l: Vec<String> = (0..n).map(|_| self.path(model)).collect();
                    format!("lowerdir={}", l.join(":"))
                }
                7 => "lowerdir=".into(),
                8 => "lowerdir=::".into(),
                9 => "upperdir=".into(),
                10 => "X-containerd.mkdir.path=../../../../tmp/escape".into(),
                11 => format!("device={}", self.path(model)),
                12 => "loop".into(),
                13 => format!("o{}", "p".repeat(self.rng.usize(1..100_000))),
                14 => "ro\0upperdir=/".into(),
                _ => self.hostile(),
            };
            o.push(s);
        }
        o
    }

    fn mount_type(&mut self) -> String {
        self.pick(&[
            "bind",
            "overlay",
            "erofs",
            "mkfs/erofs",
            "format/mkfs/overlay",
            "format/erofs",
            "ext4",
            "tmpfs",
            "proc",
            "",
            "bind/",
            "/bind",
            "BIND",
            "overlay\0",
            "fuse.erofs",
        ])
        .unwrap()
        .to_string()
    }

    /// Mounts: what the daemon returned for some snapshot (possibly mutated), or built from
    /// hostile parts.
    pub fn mounts(&mut self, model: &Model) -> Vec<Mount> {
        let real: Vec<Vec<Mount>> = model
            .snaps
            .values()
            .filter(|s| !s.mounts.is_empty())
            .map(|s| s.mounts.clone())
            .collect();
        if self.chance(55)
            && let Some(m) = self.pick(&real)
        {
            let mut m = m.clone();
            if self.chance(60) {
                return m;
            }
            let i = self.rng.usize(..m.len());
            match self.rng.u32(..6) {
                0 => m[i].source = self.hostile_path(model),
                1 => {
                    let p = self.hostile_path(model);
                    m[i].options.push(format!("upperdir={p}"));
                }
                2 => {
                    for o in m[i].options.iter_mut() {
                        if let Some(v) = o.strip_prefix("lowerdir=") {
                            *o = format!("lowerdir={v}:{}", self.canary.display());
                        }
                    }
                }
                3 => m[i].r#type = self.mount_type(),
                4 => {
                    let extra = self.mounts_from_parts(model);
                    m.extend(extra);
                }
                _ => m[i].options = self.options(model),
            }
            return m;
        }
        if self.chance(5) {
            return Vec::new();
        }
        self.mounts_from_parts(model)
    }

    fn mounts_from_parts(&mut self, model: &Model) -> Vec<Mount> {
        let n = if self.chance(3) {
            self.rng.usize(100..2000)
        } else {
            self.rng.usize(1..3)
        };
        let many = n >= 100;
        (0..n)
            .map(|_| Mount {
                r#type: self.mount_type(),
                source: self.path(model),
                target: if self.chance(20) {
                    self.hostile_path(model)
                } else {
                    String::new()
                },
                // Many mounts with small option lists: the request stays under the
                // transport's 4 MiB most of the time.
                options: if many {
                    vec![format!("lowerdir={}", self.path(model)), "ro".into()]
                } else {
                    self.options(model)
                },
            })
            .collect()
    }

    /// A digest string: a real blob's, well-formed but absent, or not a digest at all.
    fn digest(&mut self) -> String {
        let hex = format!(
            "{:016x}{:016x}{:016x}{:016x}",
            self.rng.u64(..),
            self.rng.u64(..),
            self.rng.u64(..),
            self.rng.u64(..)
        );
        match self.rng.u32(..18) {
            0 => format!("sha256:{hex}"),
            1 => format!("sha256:{}", &hex[..63]),
            2 => format!("sha256:{hex}0"),
            3 => format!("sha256:{}", hex.to_uppercase()),
            4 => format!("sha512:{hex}{hex}"),
            5 => format!("md5:{}", &hex[..32]),
            6 => format!("sha256:../../../canary/{}", self.marker),
            7 => String::new(),
            8 => ":".into(),
            9 => "sha256:".into(),
            10 => format!("sha256:{hex}/.."),
            11 => format!("sha256:{}\0", &hex[..63]),
            12 => format!("SHA256:{hex}"),
            13 => format!("sha256+b64:{hex}"),
            14 => format!("sha256:{}", "g".repeat(64)),
            15 => format!("sha256:{hex}:{hex}"),
            16 => hex,
            _ => self.hostile(),
        }
    }

    /// A descriptor for Apply: a stored blob as it is (mostly), or with its digest, size,
    /// media type or annotations made hostile.
    pub fn descriptor(&mut self) -> Descriptor {
        let blobs = self.blobs.clone();
        let mut d = match self.pick(&blobs) {
            Some(b) if self.chance(75) => b.desc.clone(),
            _ => Descriptor {
                media_type: self.pick(MEDIA_TYPES).unwrap().to_string(),
                digest: self.digest(),
                size: self.rng.i64(0..10_000),
                annotations: Default::default(),
            },
        };
        if self.chance(40) {
            match self.rng.u32(..8) {
                0 => d.digest = self.digest(),
                1 => {
                    d.size = self
                        .pick(&[-1, i64::MIN, i64::MAX, 0, d.size + 1, d.size - 1, 1 << 40])
                        .copied()
                        .unwrap()
                }
                2 => d.media_type = self.pick(HOSTILE_MEDIA_TYPES).unwrap().to_string(),
                3 => d.media_type = self.pick(MEDIA_TYPES).unwrap().to_string(),
                4 => d.annotations = self.labels(),
                5 => d.media_type = self.hostile(),
                _ => {
                    d.digest = self.digest();
                    d.size = -1;
                }
            }
        }
        d
    }

    /// Payloads for Apply (processor-specific data the daemon must not choke on).
    pub fn payloads(&mut self) -> HashMap<String, prost_types::Any> {
        let mut p = HashMap::new();
        if self.chance(80) {
            return p;
        }
        for _ in 0..self.rng.usize(1..4) {
            let len = self.rng.usize(0..100_000);
            let value: Vec<u8> = (0..len).map(|_| self.rng.u8(..)).collect();
            let type_url = match self.rng.u32(..3) {
                0 => "type.googleapis.com/containerd.types.Descriptor".into(),
                1 => String::new(),
                _ => self.hostile(),
            };
            p.insert(self.hostile(), prost_types::Any { type_url, value });
        }
        p
    }

    /// A `containerd-namespace` header: none or the default (mostly), or past containerd's
    /// identifier rules. Header values must be visible ASCII.
    pub fn namespace(&mut self) -> Option<String> {
        match self.rng.u32(..10) {
            0..=5 => None,
            6 => Some("default".into()),
            7 => Some("a".repeat(IDENT_MAX + 1)),
            8 => Some("../../etc".into()),
            _ => Some(format!("ns-{}", self.rng.u32(..))),
        }
    }

    /// A Diff media type.
    pub fn diff_media_type(&mut self) -> String {
        if self.chance(70) {
            self.pick(&MEDIA_TYPES[..4]).unwrap().to_string()
        } else {
            self.pick(HOSTILE_MEDIA_TYPES).unwrap().to_string()
        }
    }

    /// The next request.
    pub fn next(&mut self, model: &Model) -> Req {
        let r = self.rng.u32(..100);
        match r {
            0..=14 => Req::Prepare(pb::PrepareSnapshotRequest {
                snapshotter: self.snapshotter(),
                key: self.new_key(model),
                parent: self.parent(model),
                labels: self.labels(),
            }),
            15..=21 => Req::View(pb::ViewSnapshotRequest {
                snapshotter: self.snapshotter(),
                key: self.new_key(model),
                parent: self.parent(model),
                labels: self.labels(),
            }),
            22..=26 => Req::Mounts(self.some_key(model, None)),
            27..=38 => {
                let key = self.some_key(model, Some(pb::Kind::Active));
                let name = self.new_key(model);
                let parent = if self.chance(10) {
                    self.parent(model)
                } else {
                    String::new()
                };
                Req::Commit(pb::CommitSnapshotRequest {
                    snapshotter: self.snapshotter(),
                    name,
                    key,
                    labels: self.labels(),
                    parent,
                })
            }
            39..=45 => Req::Remove(self.some_key(model, None)),
            46..=50 => Req::Stat(self.some_key(model, None)),
            51..=55 => {
                let name = self.some_key(model, None);
                Req::Update(pb::UpdateSnapshotRequest {
                    snapshotter: self.snapshotter(),
                    info: if self.chance(3) {
                        None
                    } else {
                        Some(self.info(name))
                    },
                    update_mask: self.paths().map(|paths| prost_types::FieldMask { paths }),
                })
            }
            56..=60 => Req::List(self.filters(model)),
            61..=63 => Req::Usage(self.some_key(model, None)),
            64 => Req::Cleanup,
            65..=79 => {
                // Mostly onto an active snapshot nobody wrote to: a layer that applies.
                let fresh: Vec<Vec<Mount>> = model
                    .snaps
                    .values()
                    .filter(|s| s.kind == pb::Kind::Active && !s.applied)
                    .map(|s| s.mounts.clone())
                    .collect();
                let mounts = match self.pick(&fresh) {
                    Some(m) if self.chance(60) => m.clone(),
                    _ => self.mounts(model),
                };
                Req::Apply(
                    dpb::ApplyRequest {
                        diff: if self.chance(2) {
                            None
                        } else {
                            Some(self.descriptor())
                        },
                        mounts,
                        payloads: self.payloads(),
                        sync_fs: self.chance(50),
                    },
                    self.namespace(),
                )
            }
            80..=89 => Req::Diff(
                dpb::DiffRequest {
                    left: self.mounts(model),
                    right: self.mounts(model),
                    media_type: self.diff_media_type(),
                    r#ref: if self.chance(20) {
                        self.hostile()
                    } else {
                        String::new()
                    },
                    labels: if self.chance(20) {
                        self.labels()
                    } else {
                        Default::default()
                    },
                    source_date_epoch: if self.chance(20) {
                        Some(prost_types::Timestamp {
                            seconds: self.pick(&[i64::MIN, -1, 0, i64::MAX]).copied().unwrap(),
                            nanos: self.pick(&[i32::MIN, -1, 0, i32::MAX]).copied().unwrap(),
                        })
                    } else {
                        None
                    },
                },
                self.namespace(),
            ),
            _ => Req::Fill(self.some_key(model, Some(pb::Kind::Active))),
        }
    }

    /// The `snapshotter` field: a proxy ignores it (see the conformance suite), so anything.
    fn snapshotter(&mut self) -> String {
        if self.chance(90) {
            "erofs-rs".into()
        } else {
            self.hostile()
        }
    }
}
