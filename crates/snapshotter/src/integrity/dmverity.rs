//! dm-verity for layers: hash trees appended to `layer.erofs` with a verity superblock, the
//! `layer.erofs.dmverity` sidecar (`{"roothash": ..., "hashoffset": ...}`, upstream's format),
//! and device activation on kernels that have dm-verity (through `veritysetup`).
//!
//! What a device is built from is the store's record of the tree ([`DmVerityRecord`], written
//! when the differ built it), never the sidecar alone: whoever can edit the layer can edit the
//! file next to it. Before use the sidecar must equal the record ([`anchor`]). Records from
//! before the record existed are migrated at the layer's first use: the sidecar is accepted
//! only if the tree recomputed from the (already verified) layer file has its root hash.
//!
//! Devices read the verified file itself: a read-only loop device is bound from its open
//! handle and the dm-verity table names that loop device, with every parameter given
//! explicitly (`--no-superblock`), so neither the on-disk verity superblock nor a rename over
//! the layer's path changes what the device checks. An existing device of the expected name
//! is reused only if its table ([`parse_table`], [`check_table`]) is the expected one over a
//! loop device bound to that same file; otherwise it is removed and recreated (refused if it
//! cannot be removed, e.g. because something holds it open).

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::verity::{self, DMVERITY_SALT, DmVerityMeta};
use crate::config::Toggle;
use crate::error::{Error, Result};
use crate::store::DmVerityRecord;

/// The sidecar's name next to the layer.
pub const SIDECAR: &str = crate::layout::DMVERITY_SIDECAR;

/// Check `dmverity_mode` against the kernel (`kernel`: whether it has dm-verity) at start-up.
pub fn check_policy(mode: Toggle, kernel: bool) -> Result<()> {
    if mode == Toggle::On && !kernel {
        return Err(Error::failed_precondition(
            "snapshotter.dmverity_mode = \"on\" but the kernel has no dm-verity (CONFIG_DM_VERITY; /sys/module/dm_verity is missing)",
        ));
    }
    if mode == Toggle::Auto && !kernel {
        tracing::info!(
            "dm-verity is not available in this kernel; layers with dm-verity trees are mounted without it"
        );
    }
    Ok(())
}

/// Append a tree to the layer at `tmp` (before it is put in place) and write the sidecar next
/// to it as `SIDECAR.tmp`, both fsynced ([`append_tree`], blocks of [`block_size`]).
/// Returns what the store records of the tree.
pub fn format_layer(
    tmp: &Path,
    tar_index: bool,
    known: Option<&verity::Leaves>,
) -> Result<DmVerityRecord> {
    let block = block_size(tar_index);
    let meta = append_tree(tmp, tar_index, known)?;
    let side = sidecar_tmp(tmp);
    let json = serde_json::to_string_pretty(&meta).expect("sidecar serializes");
    std::fs::write(&side, json).map_err(|e| Error::io(format!("writing {}", side.display()), e))?;
    std::fs::File::open(&side)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(format!("fsync {}", side.display()), e))?;
    Ok(DmVerityRecord {
        roothash: meta.roothash,
        hashoffset: meta.hashoffset,
        data_block_size: block as u32,
        hash_block_size: block as u32,
    })
}

/// Append a tree with `block`-byte blocks to the image at `tmp` (before it is put in place),
/// fsynced, without a sidecar (`fsmeta.erofs`: only the store anchors it).
pub fn format_image(tmp: &Path, block: u32) -> Result<DmVerityRecord> {
    let len = std::fs::metadata(tmp)
        .map_err(|e| Error::io("stat of the image", e))?
        .len();
    let meta = verity::dmverity_format(tmp, len, block as usize, None).map_err(|e| {
        Error::io(
            format!("building the dm-verity tree of {}", tmp.display()),
            e,
        )
    })?;
    std::fs::File::open(tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(format!("fsync {}", tmp.display()), e))?;
    Ok(DmVerityRecord {
        roothash: meta.roothash,
        hashoffset: meta.hashoffset,
        data_block_size: block,
        hash_block_size: block,
    })
}

/// Data and hash block size of the tree of a layer: 512 bytes for tar-index layers (EROFS
/// with 512-byte blocks cannot sit on a device with 4 KiB logical blocks), 4096 for full
/// images.
pub fn block_size(tar_index: bool) -> usize {
    if tar_index { 512 } else { 4096 }
}

/// Append the tree the differ gives a layer to the file at `path` (all of it is the layer's
/// data): zero-padded to [`block_size`], then the verity superblock and the tree. The
/// producer of registry artifacts builds trees with this too, so both are the same bytes.
pub fn append_tree(
    path: &Path,
    tar_index: bool,
    known: Option<&verity::Leaves>,
) -> Result<DmVerityMeta> {
    let len = std::fs::metadata(path)
        .map_err(|e| Error::io("stat of the layer", e))?
        .len();
    verity::dmverity_format(path, len, block_size(tar_index), known).map_err(|e| {
        Error::io(
            format!("building the dm-verity tree of {}", path.display()),
            e,
        )
    })
}

/// A dm-verity tree fetched from a registry for the layer at `tmp` (`[index][tar]`, or the
/// full image, not yet in place): the bytes that follow the layer's data once it is
/// zero-padded to the block size (at `hash_offset`), and what its annotations claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FetchedTree {
    /// The verity superblock area (one block) and the hash levels.
    pub bytes: TreeBytes,
    /// The root digest (hex) the annotations name.
    pub roothash: String,
    /// Data and hash block size.
    pub block_size: u32,
    /// Where the superblock starts: the layer's data padded to the block size.
    pub hash_offset: u64,
}

/// Where a fetched tree's bytes are: in memory, or (large trees) in an unnamed file, so that
/// memory stays bounded whatever `artifacts.max_blob_size` allows.
#[derive(Debug, Clone)]
pub enum TreeBytes {
    /// In memory.
    Mem(Vec<u8>),
    /// In a file, from offset 0 to its end.
    File(std::sync::Arc<File>),
}

impl From<Vec<u8>> for TreeBytes {
    fn from(v: Vec<u8>) -> Self {
        TreeBytes::Mem(v)
    }
}

impl PartialEq for TreeBytes {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (TreeBytes::Mem(a), TreeBytes::Mem(b)) => a == b,
            (TreeBytes::File(a), TreeBytes::File(b)) => std::sync::Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

impl Eq for TreeBytes {}

impl TreeBytes {
    /// Its length.
    pub fn len(&self) -> std::io::Result<u64> {
        match self {
            TreeBytes::Mem(v) => Ok(v.len() as u64),
            TreeBytes::File(f) => Ok(f.metadata()?.len()),
        }
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> std::io::Result<bool> {
        Ok(self.len()? == 0)
    }

    /// `buf.len()` bytes from `off`.
    fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        match self {
            TreeBytes::Mem(v) => {
                let src = usize::try_from(off)
                    .ok()
                    .and_then(|o| v.get(o..o.checked_add(buf.len())?))
                    .ok_or(std::io::ErrorKind::UnexpectedEof)?;
                buf.copy_from_slice(src);
                Ok(())
            }
            TreeBytes::File(f) => f.read_exact_at(buf, off),
        }
    }

    /// Append all of it to `out`.
    fn append_to(&self, out: &mut File) -> std::io::Result<()> {
        use std::io::Write;
        match self {
            TreeBytes::Mem(v) => out.write_all(v),
            TreeBytes::File(f) => {
                let mut r = std::io::BufReader::new(&**f);
                use std::io::Seek;
                r.seek(std::io::SeekFrom::Start(0))?;
                std::io::copy(&mut r, out).map(|_| ())
            }
        }
    }
}

/// How much of a fetched tree is checked before it is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TreeCheck {
    /// Recompute the whole tree from the layer's data and compare every level and the root
    /// (what `veritysetup verify` does): sound whatever produced the tree, and as costly as
    /// building it.
    Full,
    /// Check the tree against its (trusted) root only ([`verity::dmverity_verify_tree_only`]);
    /// the data is checked by the kernel as it is read through dm-verity.
    TreeOnly,
}

impl TreeCheck {
    /// For logs: `full` or `root-only`.
    pub fn name(self) -> &'static str {
        match self {
            TreeCheck::Full => "full",
            TreeCheck::TreeOnly => "root-only",
        }
    }
}

/// Append `tree` to the layer at `tmp` and check it (see [`TreeCheck`]); on success write the
/// sidecar like [`format_layer`] and return the record. `tar_index` says which layer it is,
/// so which block size its tree must have ([`block_size`]); `known`: the hashes of its data
/// blocks taken while it was written (full images, [`super::ahead`]), which the full check
/// uses instead of reading those blocks again. `Ok(Err(why))` when the tree does not fit or
/// fails the check: the layer is then back to its data alone, for [`format_layer`].
pub fn install_fetched(
    tmp: &Path,
    tree: &FetchedTree,
    check: TreeCheck,
    tar_index: bool,
    known: Option<&verity::Leaves>,
) -> Result<std::result::Result<DmVerityRecord, String>> {
    let block = block_size(tar_index) as u64;
    let io = |e| {
        Error::io(
            format!("installing the fetched dm-verity tree of {}", tmp.display()),
            e,
        )
    };
    let len = std::fs::metadata(tmp).map_err(io)?.len();
    let hash_offset = len.next_multiple_of(block);
    if tree.block_size as u64 != block {
        return Ok(Err(format!(
            "block size {} (this layer's trees use {block})",
            tree.block_size
        )));
    }
    if tree.hash_offset != hash_offset {
        return Ok(Err(format!(
            "hash offset {} but the layer's data ends at {hash_offset} (a full image built with other mkfs options?)",
            tree.hash_offset
        )));
    }
    // The superblock area: the 512-byte superblock, zeros to the end of its block.
    let sb_area = 512u64.next_multiple_of(block);
    let want = verity::dmverity_levels_len(hash_offset / block, block as usize)
        .and_then(|l| l.checked_add(sb_area));
    let have = tree.bytes.len().map_err(io)?;
    if want != Some(have) {
        return Ok(Err(format!(
            "{have} bytes, a tree of this layer has {want:?}"
        )));
    }
    let mut head = vec![0u8; sb_area as usize];
    tree.bytes.read_at(&mut head, 0).map_err(io)?;
    if head[512..].iter().any(|&b| b != 0) {
        return Ok(Err("non-zero bytes after the verity superblock".into()));
    }
    if tree.roothash.len() != 64 || !tree.roothash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Ok(Err(format!(
            "root digest {:?} is not 64 hex digits",
            tree.roothash
        )));
    }
    {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(tmp)
            .map_err(io)?;
        // The padding is the node's own zeros (the blob starts at the hash offset).
        f.set_len(hash_offset).map_err(io)?;
        tree.bytes.append_to(&mut f).map_err(io)?;
    }
    let f = File::open(tmp).map_err(io)?;
    let meta = verity::DmVerityMeta {
        roothash: tree.roothash.to_ascii_lowercase(),
        hashoffset: hash_offset,
    };
    // The superblock must be the one the differ writes for this root (its UUID derives from
    // the root), so that the installed layer is byte for byte the one built locally.
    let mut root = [0u8; 32];
    hex::decode_to_slice(&meta.roothash, &mut root).expect("checked above");
    let sb_ok = head[..512] == verity::superblock(hash_offset / block, block as usize, &root);
    let ok = sb_ok
        && match check {
            TreeCheck::Full => verity::dmverity_verify_file_with(&f, &meta, block as usize, known),
            TreeCheck::TreeOnly => verity::dmverity_verify_tree_only(&f, &meta, block as usize),
        }
        .map_err(io)?;
    if !ok {
        let w = std::fs::OpenOptions::new()
            .write(true)
            .open(tmp)
            .map_err(io)?;
        w.set_len(len).map_err(io)?;
        return Ok(Err(if sb_ok {
            "the tree does not match the layer's data and root digest".into()
        } else {
            "its verity superblock is not the one of this layer".into()
        }));
    }
    f.sync_all().map_err(io)?;
    let side = sidecar_tmp(tmp);
    let json = serde_json::to_string_pretty(&meta).expect("sidecar serializes");
    std::fs::write(&side, json).map_err(|e| Error::io(format!("writing {}", side.display()), e))?;
    std::fs::File::open(&side)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(format!("fsync {}", side.display()), e))?;
    Ok(Ok(DmVerityRecord {
        roothash: meta.roothash,
        hashoffset: meta.hashoffset,
        data_block_size: block as u32,
        hash_block_size: block as u32,
    }))
}

/// Where [`format_layer`] leaves the sidecar.
pub fn sidecar_tmp(layer_tmp: &Path) -> PathBuf {
    layer_tmp.with_file_name(format!("{SIDECAR}.tmp"))
}

/// Read a layer's sidecar, if it has one.
pub fn read_sidecar(dir: &Path) -> Result<Option<DmVerityMeta>> {
    let p = dir.join(SIDECAR);
    match std::fs::read(&p) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| Error::invalid_argument(format!("{}: {e}", p.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(format!("reading {}", p.display()), e)),
    }
}

/// The dm-verity tree a layer is to be used with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Anchor {
    /// The tree's parameters.
    pub record: DmVerityRecord,
    /// Established just now from an old record (to be written to the store).
    pub migrated: bool,
}

/// The tree of the layer at `layer` (snapshot directory `dir`) to use, from its record
/// `recorded` and its sidecar: the record when the sidecar equals it, or when there is no
/// sidecar and none is needed (`need_sidecar`: manager mode, where containerd reads it);
/// for an old record without one, the sidecar if the tree recomputed from the layer file has
/// its root hash (`file`: the layer, already verified, opened when `None`). A sidecar that
/// differs from the record is refused, naming the layer.
pub fn anchor(
    layer: &Path,
    file: Option<&File>,
    dir: &Path,
    recorded: Option<&DmVerityRecord>,
    name: &str,
    need_sidecar: bool,
) -> Result<Option<Anchor>> {
    let side_path = dir.join(SIDECAR);
    let sidecar = read_sidecar(dir)?;
    match (recorded, sidecar) {
        (None, None) => Ok(None),
        (Some(r), Some(s))
            if s.roothash.eq_ignore_ascii_case(&r.roothash) && s.hashoffset == r.hashoffset =>
        {
            Ok(Some(Anchor {
                record: r.clone(),
                migrated: false,
            }))
        }
        (Some(r), Some(s)) => Err(Error::failed_precondition(format!(
            "the dm-verity sidecar of layer {name:?} ({}) says root hash {} at offset {}, but the \
             layer was written with root hash {} at offset {}: it was modified; refusing to use the layer",
            side_path.display(),
            s.roothash,
            s.hashoffset,
            r.roothash,
            r.hashoffset
        ))),
        (Some(_), None) if need_sidecar => Err(Error::failed_precondition(format!(
            "layer {name:?} was written with a dm-verity tree but its sidecar {} is gone; \
             refusing to use the layer",
            side_path.display()
        ))),
        (Some(r), None) => Ok(Some(Anchor {
            record: r.clone(),
            migrated: false,
        })),
        (None, Some(s)) => {
            let opened;
            let f = match file {
                Some(f) => f,
                None => {
                    opened = File::open(layer)
                        .map_err(|e| Error::io(format!("opening {}", layer.display()), e))?;
                    &opened
                }
            };
            let record = migrate(f, layer, &s, name)?;
            tracing::warn!(
                layer = name,
                roothash = %record.roothash,
                "layer recorded before dm-verity trees were anchored in the store: its sidecar matches the tree recomputed from the layer, recording it"
            );
            Ok(Some(Anchor {
                record,
                migrated: true,
            }))
        }
    }
}

/// An old record's sidecar, accepted only if the layer's own tree agrees with it: the verity
/// superblock describes our format, and the tree recomputed over the data (and every stored
/// level) has the sidecar's root hash.
fn migrate(f: &File, layer: &Path, s: &DmVerityMeta, name: &str) -> Result<DmVerityRecord> {
    let bad = |why: String| {
        Error::failed_precondition(format!(
            "layer {name:?} ({}) has a dm-verity sidecar but no recorded tree, and {why}; refusing to use it",
            layer.display()
        ))
    };
    let sb = verity::read_verity_superblock(f, s.hashoffset)
        .map_err(|e| {
            Error::io(
                format!("reading the verity superblock of {}", layer.display()),
                e,
            )
        })?
        .ok_or_else(|| {
            bad(format!(
                "there is no verity superblock at offset {}",
                s.hashoffset
            ))
        })?;
    let bs = sb.data_block_size;
    if !sb.ours
        || sb.hash_type != 1
        || sb.hash_block_size != bs
        || !matches!(bs, 512 | 4096)
        || sb.data_blocks.checked_mul(bs as u64) != Some(s.hashoffset)
    {
        return Err(bad(format!(
            "its verity superblock is not one the differ writes ({sb:?})"
        )));
    }
    let ok = verity::dmverity_verify_file(f, s, bs as usize).map_err(|e| {
        Error::io(
            format!("checking the dm-verity tree of {}", layer.display()),
            e,
        )
    })?;
    if !ok {
        return Err(bad("its tree does not have the sidecar's root hash".into()));
    }
    Ok(DmVerityRecord {
        roothash: s.roothash.to_ascii_lowercase(),
        hashoffset: s.hashoffset,
        data_block_size: bs,
        hash_block_size: bs,
    })
}

/// The device-mapper name of a layer of the snapshotter rooted at `root`.
pub fn device_name(root: &Path, id: u64) -> String {
    use sha2::Digest;
    let h = sha2::Sha256::digest(root.as_os_str().as_encoded_bytes());
    format!("erofs-{}-{id}", hex::encode(&h[..4]))
}

/// The device-mapper name of snapshot `id`'s `fsmeta.erofs` (a flattened chain ending at
/// `id`), next to its layer's [`device_name`].
pub fn fsmeta_device_name(root: &Path, id: u64) -> String {
    format!("{}-fsmeta", device_name(root, id))
}

/// The table a device over a layer with tree `rec` must have (devices aside).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExpectedTable {
    /// Length of the device in 512-byte sectors.
    pub sectors: u64,
    /// Data block size.
    pub data_block_size: u32,
    /// Hash block size.
    pub hash_block_size: u32,
    /// Data blocks.
    pub data_blocks: u64,
    /// Hash block where the tree starts (after the verity superblock's block).
    pub hash_start: u64,
    /// Root hash, lower-case hex.
    pub roothash: String,
    /// Salt, lower-case hex.
    pub salt: String,
}

impl ExpectedTable {
    /// From a recorded tree; an impossible record is an error.
    pub fn for_record(rec: &DmVerityRecord) -> Result<Self> {
        let (dbs, hbs) = (rec.data_block_size, rec.hash_block_size);
        let pow2 = |b: u32| (512..=65536).contains(&b) && b.is_power_of_two();
        if !pow2(dbs)
            || !pow2(hbs)
            || !rec.hashoffset.is_multiple_of(dbs as u64)
            || !rec.hashoffset.is_multiple_of(hbs as u64)
            || rec.hashoffset == 0
            || rec.roothash.len() != 64
            || !rec.roothash.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Err(Error::failed_precondition(format!(
                "the recorded dm-verity tree {rec:?} is not valid"
            )));
        }
        let sb_area = 512u64.next_multiple_of(hbs as u64);
        Ok(ExpectedTable {
            sectors: rec.hashoffset / 512,
            data_block_size: dbs,
            hash_block_size: hbs,
            data_blocks: rec.hashoffset / dbs as u64,
            hash_start: (rec.hashoffset + sb_area) / hbs as u64,
            roothash: rec.roothash.to_ascii_lowercase(),
            salt: hex::encode(DMVERITY_SALT),
        })
    }
}

/// One verity target as `dmsetup table` prints it (the kernel's table status):
/// `<start> <len> verity <version> <dev> <hash_dev> <data_bs> <hash_bs> <data_blocks>
/// <hash_start> <algorithm> <digest> <salt> [<#opt_params> <opt_params>...]`, devices as
/// `major:minor`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableLine {
    /// First sector.
    pub start: u64,
    /// Length in sectors.
    pub len: u64,
    /// Hash format version.
    pub version: u32,
    /// Data device.
    pub data_dev: (u32, u32),
    /// Hash device.
    pub hash_dev: (u32, u32),
    /// Data block size.
    pub data_block_size: u32,
    /// Hash block size.
    pub hash_block_size: u32,
    /// Data blocks.
    pub data_blocks: u64,
    /// First hash block of the tree.
    pub hash_start: u64,
    /// Hash algorithm.
    pub algorithm: String,
    /// Root digest.
    pub digest: String,
    /// Salt (`-` for none).
    pub salt: String,
    /// Optional parameters.
    pub options: Vec<String>,
}

/// Parse `dmsetup table NAME` output: exactly one verity target.
pub fn parse_table(text: &str) -> std::result::Result<TableLine, String> {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let [line] = lines.as_slice() else {
        return Err(format!("{} targets instead of one", lines.len()));
    };
    let f: Vec<&str> = line.split_whitespace().collect();
    if f.len() < 13 {
        return Err(format!("short table line {line:?}"));
    }
    if f[2] != "verity" {
        return Err(format!("target {:?} instead of verity", f[2]));
    }
    let num = |i: usize| -> std::result::Result<u64, String> {
        f[i].parse::<u64>()
            .map_err(|_| format!("field {i} ({:?}) is not a number", f[i]))
    };
    let dev = |i: usize| -> std::result::Result<(u32, u32), String> {
        let (ma, mi) = f[i]
            .split_once(':')
            .ok_or_else(|| format!("device {:?} is not major:minor", f[i]))?;
        Ok((
            ma.parse().map_err(|_| format!("bad major in {:?}", f[i]))?,
            mi.parse().map_err(|_| format!("bad minor in {:?}", f[i]))?,
        ))
    };
    let small = |i: usize| -> std::result::Result<u32, String> {
        u32::try_from(num(i)?).map_err(|_| format!("field {i} too large"))
    };
    let options = if f.len() > 13 {
        let n = num(13)? as usize;
        if f.len() != 14 + n {
            return Err(format!(
                "{n} optional parameters announced, {} given",
                f.len() - 14
            ));
        }
        f[14..].iter().map(|s| s.to_string()).collect()
    } else {
        Vec::new()
    };
    Ok(TableLine {
        start: num(0)?,
        len: num(1)?,
        version: small(3)?,
        data_dev: dev(4)?,
        hash_dev: dev(5)?,
        data_block_size: small(6)?,
        hash_block_size: small(7)?,
        data_blocks: num(8)?,
        hash_start: num(9)?,
        algorithm: f[10].to_string(),
        digest: f[11].to_ascii_lowercase(),
        salt: f[12].to_ascii_lowercase(),
        options,
    })
}

/// Optional parameters a reused device may carry: they only make corruption louder. Any other
/// (`ignore_corruption`, `ignore_zero_blocks`, `check_at_most_once`, FEC, ...) weakens the
/// check, and such a device is not reused.
const HARMLESS_OPTIONS: [&str; 4] = [
    "restart_on_corruption",
    "panic_on_corruption",
    "restart_on_error",
    "panic_on_error",
];

/// Whether a parsed table is the expected one (devices are checked by the caller).
pub fn check_table(t: &TableLine, want: &ExpectedTable) -> std::result::Result<(), String> {
    let mut wrong = Vec::new();
    let mut cmp = |what: &str, got: String, exp: String| {
        if got != exp {
            wrong.push(format!("{what} {got} instead of {exp}"));
        }
    };
    cmp("start", t.start.to_string(), "0".into());
    cmp("length", t.len.to_string(), want.sectors.to_string());
    cmp("hash type", t.version.to_string(), "1".into());
    cmp(
        "data block size",
        t.data_block_size.to_string(),
        want.data_block_size.to_string(),
    );
    cmp(
        "hash block size",
        t.hash_block_size.to_string(),
        want.hash_block_size.to_string(),
    );
    cmp(
        "data blocks",
        t.data_blocks.to_string(),
        want.data_blocks.to_string(),
    );
    cmp(
        "hash start",
        t.hash_start.to_string(),
        want.hash_start.to_string(),
    );
    cmp("algorithm", t.algorithm.clone(), "sha256".into());
    cmp("root hash", t.digest.clone(), want.roothash.clone());
    cmp("salt", t.salt.clone(), want.salt.clone());
    if t.data_dev != t.hash_dev {
        wrong.push(format!(
            "hash device {}:{} is not the data device {}:{}",
            t.hash_dev.0, t.hash_dev.1, t.data_dev.0, t.data_dev.1
        ));
    }
    for o in &t.options {
        if !HARMLESS_OPTIONS.contains(&o.as_str()) {
            wrong.push(format!("option {o}"));
        }
    }
    if wrong.is_empty() {
        Ok(())
    } else {
        Err(wrong.join(", "))
    }
}

/// Whether block device `major:minor` is a read-only loop device reading `layer` itself (the
/// same inode, from its start, whole).
fn reads_layer(dev: (u32, u32), layer: &File) -> std::result::Result<(), String> {
    let sys = PathBuf::from(format!("/sys/dev/block/{}:{}", dev.0, dev.1));
    if !sys.join("loop").exists() {
        return Err(format!("device {}:{} is not a loop device", dev.0, dev.1));
    }
    let uevent = std::fs::read_to_string(sys.join("uevent")).map_err(|e| e.to_string())?;
    let name = uevent
        .lines()
        .find_map(|l| l.strip_prefix("DEVNAME="))
        .ok_or("no DEVNAME")?;
    let node = Path::new("/dev").join(name);
    let f = File::open(&node).map_err(|e| format!("opening {}: {e}", node.display()))?;
    let b = erofs_sys::loop_device::backing(f.as_fd(), &node).map_err(|e| e.to_string())?;
    let md = layer.metadata().map_err(|e| e.to_string())?;
    if (b.dev, b.ino) != (md.dev(), md.ino()) {
        return Err(format!(
            "{} reads inode {} of device {:#x}, not the layer (inode {} of {:#x})",
            node.display(),
            b.ino,
            b.dev,
            md.ino(),
            md.dev()
        ));
    }
    if !b.read_only || b.offset != 0 || b.size_limit != 0 {
        return Err(format!(
            "{} is not a plain read-only view of the layer",
            node.display()
        ));
    }
    Ok(())
}

fn run(tool: &str, args: &[&std::ffi::OsStr]) -> Result<String> {
    let out = Command::new(tool).args(args).output().map_err(|e| {
        Error::io(
            format!("running {tool} (install cryptsetup-bin and dmsetup)"),
            e,
        )
    })?;
    if !out.status.success() {
        return Err(Error::internal(format!(
            "{tool} {}: {}",
            args.first()
                .map(|a| a.to_string_lossy())
                .unwrap_or_default(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether the existing device `name` is the expected one over `layer`.
fn existing_is_expected(
    name: &str,
    layer: &File,
    want: &ExpectedTable,
) -> std::result::Result<(), String> {
    let text = run("dmsetup", &["table".as_ref(), name.as_ref()]).map_err(|e| e.to_string())?;
    let t = parse_table(&text)?;
    check_table(&t, want)?;
    reads_layer(t.data_dev, layer)
}

/// Open (or reuse) a read-only dm-verity device named `name` over the verified layer `layer`
/// (opened from `path`) with the recorded tree `rec`; returns the device's path.
pub fn activate(layer: &File, path: &Path, rec: &DmVerityRecord, name: &str) -> Result<PathBuf> {
    if !crate::mount::probe::dmverity() {
        return Err(Error::failed_precondition(format!(
            "cannot verify {} with dm-verity: the kernel has no dm-verity (CONFIG_DM_VERITY)",
            path.display()
        )));
    }
    let want = ExpectedTable::for_record(rec)?;
    let dev = PathBuf::from("/dev/mapper").join(name);
    if dev.exists() {
        match existing_is_expected(name, layer, &want) {
            Ok(()) => return Ok(dev),
            Err(why) => {
                tracing::warn!(device = name, layer = %path.display(), reason = %why, "an existing dm-verity device is not the expected one: replacing it");
                run("veritysetup", &["close".as_ref(), name.as_ref()]).map_err(|e| {
                    Error::failed_precondition(format!(
                        "dm-verity device {name} for {} is not the expected one ({why}) and cannot be removed: {e}; refusing to use it",
                        path.display()
                    ))
                })?;
            }
        }
    }
    // The device reads the verified file through a loop device bound from its handle.
    let lo = erofs_sys::loop_device::attach_fd(layer.as_fd(), false).map_err(|e| {
        Error::internal(format!(
            "attaching a loop device to {}: {e}",
            path.display()
        ))
    })?;
    let lo_path = lo.path.clone();
    let args = [
        format!("--data-block-size={}", want.data_block_size),
        format!("--hash-block-size={}", want.hash_block_size),
        format!("--data-blocks={}", want.data_blocks),
        format!(
            "--hash-offset={}",
            want.hash_start * want.hash_block_size as u64
        ),
        format!("--salt={}", want.salt),
    ];
    let mut argv: Vec<&std::ffi::OsStr> = vec![
        "open".as_ref(),
        "--no-superblock".as_ref(),
        "--format=1".as_ref(),
        "--hash=sha256".as_ref(),
    ];
    argv.extend(args.iter().map(std::ffi::OsStr::new));
    argv.extend([
        lo_path.as_os_str(),
        name.as_ref(),
        lo_path.as_os_str(),
        want.roothash.as_ref(),
    ]);
    run("veritysetup", &argv)?;
    // The device holds the loop device now; autoclear frees it when the device goes.
    drop(lo);
    existing_is_expected(name, layer, &want).map_err(|why| {
        Error::internal(format!(
            "the dm-verity device {name} just opened is not as asked: {why}"
        ))
    })?;
    Ok(dev)
}

/// Close a device opened by [`activate`], if it exists.
pub fn deactivate(name: &str) {
    if PathBuf::from("/dev/mapper").join(name).exists()
        && let Err(e) = run("veritysetup", &["close".as_ref(), name.as_ref()])
    {
        tracing::warn!(device = name, error = %e, "closing a dm-verity device");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec() -> DmVerityRecord {
        DmVerityRecord {
            roothash: "4392712ba01368efdf14b05c76f9e4df0d53664630b5d48632ed17a137f39076".into(),
            hashoffset: 262144 * 4096,
            data_block_size: 4096,
            hash_block_size: 4096,
        }
    }

    /// `dmsetup table` of the kernel documentation's example device (devices as the kernel
    /// prints them, major:minor), and of the device `activate` builds for a 1 GiB layer.
    #[test]
    fn tables_parse_as_the_kernel_prints_them() {
        let doc = "0 2097152 verity 1 8:1 8:2 4096 4096 262144 1 sha256 \
                   4392712ba01368efdf14b05c76f9e4df0d53664630b5d48632ed17a137f39076 \
                   1234000000000000000000000000000000000000000000000000000000000000\n";
        let t = parse_table(doc).unwrap();
        assert_eq!(
            (t.start, t.len, t.version, t.data_dev, t.hash_dev),
            (0, 2097152, 1, (8, 1), (8, 2))
        );
        assert_eq!(
            (
                t.data_block_size,
                t.hash_block_size,
                t.data_blocks,
                t.hash_start
            ),
            (4096, 4096, 262144, 1)
        );
        assert_eq!(t.algorithm, "sha256");
        assert!(t.options.is_empty());
        // With optional parameters, and the salt "-" of a saltless tree.
        let opt = "0 2097152 verity 1 7:3 7:3 4096 4096 262144 262145 sha256 \
                   4392712ba01368efdf14b05c76f9e4df0d53664630b5d48632ed17a137f39076 - \
                   2 ignore_zero_blocks restart_on_corruption";
        let t = parse_table(opt).unwrap();
        assert_eq!(t.salt, "-");
        assert_eq!(t.options, ["ignore_zero_blocks", "restart_on_corruption"]);
        for bad in [
            "",
            "0 2097152 linear 8:1 0",
            "0 2097152 verity 1 8:1 8:2 4096 4096",
            "0 2097152 verity 1 sda1 8:2 4096 4096 262144 1 sha256 00 00",
            "0 2097152 verity 1 8:1 8:2 4096 4096 262144 1 sha256 00 00 3 a b",
            &format!("{doc}{doc}"),
        ] {
            assert!(parse_table(bad).is_err(), "{bad:?}");
        }
    }

    /// The expected table of a record, and every way an existing device can differ from it.
    #[test]
    fn tables_are_compared_field_by_field() {
        let want = ExpectedTable::for_record(&rec()).unwrap();
        // The verity superblock takes the block after the data: the tree starts one later.
        assert_eq!(
            (want.sectors, want.data_blocks, want.hash_start),
            (2097152, 262144, 262145)
        );
        let good = format!(
            "0 2097152 verity 1 7:3 7:3 4096 4096 262144 262145 sha256 {} {}",
            rec().roothash,
            "0".repeat(64)
        );
        let t = parse_table(&good).unwrap();
        check_table(&t, &want).unwrap();
        let with = |opts: &str| parse_table(&format!("{good} {opts}")).unwrap();
        check_table(&with("1 restart_on_corruption"), &want).unwrap();
        let cases = [
            (good.replace("0 2097152", "0 2097144"), "length"),
            (good.replace("7:3 7:3", "7:3 7:4"), "hash device"),
            (good.replace("4096 4096", "512 4096"), "data block size"),
            (good.replace("262144 262145", "262144 262146"), "hash start"),
            (good.replace(" 262144 ", " 262143 "), "data blocks"),
            (good.replace("sha256", "sha1"), "algorithm"),
            (good.replace("4392712b", "5392712b"), "root hash"),
            (
                format!("{} {}", &good[..good.len() - 65], "1".repeat(64)),
                "salt",
            ),
            (good.replace("verity 1", "verity 0"), "hash type"),
        ];
        for (line, what) in cases {
            let e = check_table(&parse_table(&line).unwrap(), &want).unwrap_err();
            assert!(e.contains(what), "{what}: {e}");
        }
        for weak in [
            "ignore_corruption",
            "ignore_zero_blocks",
            "check_at_most_once",
        ] {
            let e = check_table(&with(&format!("1 {weak}")), &want).unwrap_err();
            assert!(e.contains(weak), "{e}");
        }
        // Impossible records are refused before any device is looked at.
        for r in [
            DmVerityRecord {
                hashoffset: 4095,
                ..rec()
            },
            DmVerityRecord {
                data_block_size: 1000,
                ..rec()
            },
            DmVerityRecord {
                roothash: "zz".into(),
                ..rec()
            },
        ] {
            assert!(ExpectedTable::for_record(&r).is_err(), "{r:?}");
        }
    }

    /// A layer with a tree and its sidecar, in its snapshot directory.
    fn layer_with_tree(data: &[u8]) -> (tempfile::TempDir, PathBuf, DmVerityRecord) {
        let d = tempfile::tempdir().unwrap();
        let tmp = d.path().join("layer.erofs.tmp");
        std::fs::write(&tmp, data).unwrap();
        let rec = format_layer(&tmp, false, None).unwrap();
        let layer = d.path().join("layer.erofs");
        std::fs::rename(&tmp, &layer).unwrap();
        std::fs::rename(sidecar_tmp(&tmp), d.path().join(SIDECAR)).unwrap();
        (d, layer, rec)
    }

    /// The record decides; the sidecar must agree with it (host mode can do without one,
    /// manager mode cannot).
    #[test]
    fn sidecars_are_checked_against_the_record() {
        let (d, layer, rec) = layer_with_tree(&vec![3u8; 5 * 4096 + 7]);
        let a = anchor(&layer, None, d.path(), Some(&rec), "l", false)
            .unwrap()
            .unwrap();
        assert_eq!(
            a,
            Anchor {
                record: rec.clone(),
                migrated: false
            }
        );
        let side = d.path().join(SIDECAR);
        let other = DmVerityMeta {
            roothash: "ab".repeat(32),
            hashoffset: rec.hashoffset,
        };
        std::fs::write(&side, serde_json::to_string(&other).unwrap()).unwrap();
        for manager in [false, true] {
            let e = anchor(&layer, None, d.path(), Some(&rec), "l", manager).unwrap_err();
            assert!(e.to_string().contains("sidecar of layer \"l\""), "{e}");
        }
        let moved = DmVerityMeta {
            roothash: rec.roothash.clone(),
            hashoffset: rec.hashoffset + 4096,
        };
        std::fs::write(&side, serde_json::to_string(&moved).unwrap()).unwrap();
        assert!(anchor(&layer, None, d.path(), Some(&rec), "l", false).is_err());
        std::fs::remove_file(&side).unwrap();
        assert_eq!(
            anchor(&layer, None, d.path(), Some(&rec), "l", false)
                .unwrap()
                .unwrap()
                .record,
            rec
        );
        assert!(anchor(&layer, None, d.path(), Some(&rec), "l", true).is_err());
        assert_eq!(
            anchor(&layer, None, d.path(), None, "l", true).unwrap(),
            None
        );
    }

    /// Records from before the tree was recorded: the sidecar is taken only if the tree
    /// recomputed from the layer has its root hash, then marked to be recorded.
    #[test]
    fn old_records_are_migrated_from_the_layer_itself() {
        let (d, layer, rec) = layer_with_tree(&vec![9u8; 40 * 4096]);
        let f = File::open(&layer).unwrap();
        let a = anchor(&layer, Some(&f), d.path(), None, "l", false)
            .unwrap()
            .unwrap();
        assert_eq!(
            a,
            Anchor {
                record: rec.clone(),
                migrated: true
            }
        );
        // A sidecar of another tree: refused.
        let side = d.path().join(SIDECAR);
        let original = std::fs::read(&side).unwrap();
        let other = DmVerityMeta {
            roothash: "ab".repeat(32),
            hashoffset: rec.hashoffset,
        };
        std::fs::write(&side, serde_json::to_string(&other).unwrap()).unwrap();
        let e = anchor(&layer, Some(&f), d.path(), None, "l", false).unwrap_err();
        assert!(
            e.to_string()
                .contains("does not have the sidecar's root hash"),
            "{e}"
        );
        // The sidecar back, the data changed under the tree: refused.
        std::fs::write(&side, original).unwrap();
        use std::os::unix::fs::FileExt;
        std::fs::OpenOptions::new()
            .write(true)
            .open(&layer)
            .unwrap()
            .write_all_at(b"x", 100)
            .unwrap();
        assert!(anchor(&layer, Some(&f), d.path(), None, "l", false).is_err());
    }

    /// This machine's kernel has no dm-verity: activation fails with a message saying so, and
    /// "on" refuses to start. (Activation, table checks on real devices and replacement of a
    /// wrong device run on kernels with dm-verity: the VM matrix of issue 12.)
    #[test]
    fn unsupported_kernel_is_explicit() {
        assert!(
            !crate::mount::probe::dmverity(),
            "this test documents a kernel without dm-verity; it has one now"
        );
        let f = File::open("/dev/null").unwrap();
        let e = activate(&f, Path::new("/nonexistent"), &rec(), "x").unwrap_err();
        assert!(e.to_string().contains("kernel has no dm-verity"), "{e}");
        let e = check_policy(Toggle::On, false).unwrap_err();
        assert!(e.to_string().contains("dmverity_mode"), "{e}");
        check_policy(Toggle::Auto, false).unwrap();
    }

    /// A layer of `len` bytes (not a multiple of the block size, so the node pads it), its
    /// tree as a registry holds it (from the hash offset on), and the data to install it on.
    fn fetched_tree(len: usize, tar_index: bool) -> (tempfile::TempDir, Vec<u8>, FetchedTree) {
        let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
        let d = tempfile::tempdir().unwrap();
        let built = d.path().join("built.tmp");
        std::fs::write(&built, &data).unwrap();
        let rec = format_layer(&built, tar_index, None).unwrap();
        let all = std::fs::read(&built).unwrap();
        let tree = FetchedTree {
            bytes: all[rec.hashoffset as usize..].to_vec().into(),
            roothash: rec.roothash,
            block_size: block_size(tar_index) as u32,
            hash_offset: rec.hashoffset,
        };
        (d, data, tree)
    }

    fn install(
        d: &Path,
        data: &[u8],
        tree: &FetchedTree,
        check: TreeCheck,
    ) -> std::result::Result<(), String> {
        install_with(d, data, tree, check, true, None)
    }

    fn install_with(
        d: &Path,
        data: &[u8],
        tree: &FetchedTree,
        check: TreeCheck,
        tar_index: bool,
        known: Option<&verity::Leaves>,
    ) -> std::result::Result<(), String> {
        let tmp = d.join("layer.erofs.tmp");
        std::fs::write(&tmp, data).unwrap();
        let r = install_fetched(&tmp, tree, check, tar_index, known)
            .unwrap()
            .map(|_| ());
        let got = std::fs::read(&tmp).unwrap();
        if r.is_err() {
            // A rejected tree leaves the data as it was, for the local tree.
            assert_eq!(got, data);
        } else {
            // The data, the node's zeros to the hash offset, the tree: for the fixture's tree
            // that is what format_layer wrote.
            let off = tree.hash_offset as usize;
            assert!(got[..data.len()] == *data);
            assert!(got[data.len()..off].iter().all(|&b| b == 0));
            let TreeBytes::Mem(t) = &tree.bytes else {
                unreachable!("built in memory")
            };
            assert!(got[off..] == t[..]);
            assert!(d.join(format!("{SIDECAR}.tmp")).exists());
        }
        r
    }

    fn mem(t: &FetchedTree) -> &Vec<u8> {
        match &t.bytes {
            TreeBytes::Mem(v) => v,
            TreeBytes::File(_) => unreachable!("built in memory"),
        }
    }

    fn tampered(t: &FetchedTree, f: impl FnOnce(&mut Vec<u8>)) -> FetchedTree {
        let mut v = mem(t).clone();
        f(&mut v);
        FetchedTree {
            bytes: v.into(),
            ..t.clone()
        }
    }

    #[test]
    fn fetched_trees_are_checked_before_use() {
        let (d, data, tree) = fetched_tree(300_000 + 100, true);
        for check in [TreeCheck::Full, TreeCheck::TreeOnly] {
            install(d.path(), &data, &tree, check).unwrap();
        }
        let tmp = d.path().join("layer.erofs.tmp");
        let rec = install_fetched(&tmp, &tree, TreeCheck::Full, true, None).unwrap();
        assert!(
            rec.is_err(),
            "a second tree after the first is not this layer's"
        );

        // A changed hash in the lowest level: neither check accepts it.
        let n = mem(&tree).len();
        let bad = tampered(&tree, |b| b[n - 1000] ^= 1);
        for check in [TreeCheck::Full, TreeCheck::TreeOnly] {
            assert!(install(d.path(), &data, &bad, check).is_err(), "{check:?}");
        }
        // Another root digest.
        let mut bad = tree.clone();
        bad.roothash = "00".repeat(32);
        for check in [TreeCheck::Full, TreeCheck::TreeOnly] {
            assert!(install(d.path(), &data, &bad, check).is_err(), "{check:?}");
        }
        // Data the tree does not describe: only the full check sees it (with a trusted root,
        // the kernel sees it at read time).
        let mut other = data.clone();
        other[5] ^= 1;
        assert!(install(d.path(), &other, &tree, TreeCheck::Full).is_err());
        install(d.path(), &other, &tree, TreeCheck::TreeOnly).unwrap();
        // Shapes that cannot be this layer's tree.
        let bad = tampered(&tree, |b| b.truncate(n - 512));
        assert!(
            install(d.path(), &data, &bad, TreeCheck::Full)
                .unwrap_err()
                .contains("bytes")
        );
        let mut bad = tree.clone();
        bad.hash_offset += 512;
        assert!(
            install(d.path(), &data, &bad, TreeCheck::Full)
                .unwrap_err()
                .contains("hash offset")
        );
        let mut bad = tree.clone();
        bad.block_size = 4096;
        assert!(
            install(d.path(), &data, &bad, TreeCheck::Full)
                .unwrap_err()
                .contains("block size")
        );
        let bad = tampered(&tree, |b| b[12] ^= 1); // the superblock's hash type
        assert!(
            install(d.path(), &data, &bad, TreeCheck::TreeOnly)
                .unwrap_err()
                .contains("superblock")
        );
        let mut bad = tree;
        bad.roothash = "zz".into();
        assert!(
            install(d.path(), &data, &bad, TreeCheck::Full)
                .unwrap_err()
                .contains("hex")
        );
    }

    /// Full images: 4 KiB blocks, a superblock area of a whole block (zeros after the
    /// superblock), and the full check from the hashes the node took while writing.
    #[test]
    fn fetched_full_image_trees_use_their_block_size() {
        let (d, data, tree) = fetched_tree(40 * 4096 + 100, false);
        assert_eq!(tree.hash_offset, 41 * 4096);
        for check in [TreeCheck::Full, TreeCheck::TreeOnly] {
            install_with(d.path(), &data, &tree, check, false, None).unwrap();
        }
        // A tar-index layer's block size is not this layer's.
        assert!(
            install_with(d.path(), &data, &tree, TreeCheck::Full, true, None)
                .unwrap_err()
                .contains("block size")
        );
        let bad = tampered(&tree, |b| b[600] = 1);
        for check in [TreeCheck::Full, TreeCheck::TreeOnly] {
            assert!(
                install_with(d.path(), &data, &bad, check, false, None)
                    .unwrap_err()
                    .contains("after the verity superblock"),
                "{check:?}"
            );
        }
        // Leaves of the node's own data (blocks 1..30, as if hashed while written): the
        // full check still sees a changed block outside them and inside them.
        let tmp = d.path().join("leaves.tmp");
        std::fs::write(&tmp, &data).unwrap();
        let f = File::open(&tmp).unwrap();
        let leaves = verity::Leaves {
            first: 1,
            hashes: (1..30u64)
                .map(|i| {
                    let mut b = vec![0u8; 4096];
                    use std::os::unix::fs::FileExt;
                    f.read_exact_at(&mut b, i * 4096).unwrap();
                    use sha2::Digest;
                    let mut h = sha2::Sha256::new();
                    h.update(DMVERITY_SALT);
                    h.update(&b);
                    h.finalize().into()
                })
                .collect(),
        };
        install_with(
            d.path(),
            &data,
            &tree,
            TreeCheck::Full,
            false,
            Some(&leaves),
        )
        .unwrap();
        let mut other = data.clone();
        other[35 * 4096] ^= 1;
        assert!(
            install_with(
                d.path(),
                &other,
                &tree,
                TreeCheck::Full,
                false,
                Some(&leaves)
            )
            .is_err()
        );
        let mut wrong = leaves.clone();
        wrong.hashes[3][0] ^= 1;
        assert!(
            install_with(d.path(), &data, &tree, TreeCheck::Full, false, Some(&wrong)).is_err()
        );
    }
}
