//! fsmeta: one metadata-only EROFS image for a whole chain of layer images.
//!
//! [`merge_layers`] takes committed layer images, bottom to top, and writes `fsmeta`: an image
//! whose device table lists the layers (device 1 = bottom layer, ..., N = top) and whose tree is
//! the tree overlayfs shows when the layers are stacked: whiteouts (character devices 0:0) hide
//! what is below them, opaque directories (`trusted.overlay.opaque=y`) hide lower directories'
//! contents, the top-most entry of each path wins, directories present in several layers are
//! merged (attributes of the top-most), hardlinks within a layer stay hardlinks, xattrs are kept
//! except the `trusted.overlay.*` ones, which overlayfs never shows and which a merged tree must
//! not carry (fsmeta may itself become an overlay lower). Like `mkfs.erofs --ovlfs-strip=1`,
//! no whiteout is left in the result.
//!
//! Regular files become chunk tables ([`FileData::Chunks`], 8-byte indexes with device ids)
//! pointing into the layers' own blocks: no file data is copied, except data a layer keeps in
//! its metadata (inline tails), which is copied into fsmeta (inline after the inode when it
//! fits, otherwise into fsmeta's own blocks). Holes stay holes.
//!
//! The kernel mounts the result with one `device=` option per layer, in order:
//! `mount -t erofs -o ro,device=L1,...,device=LN fsmeta.erofs /mnt`. When fsmeta is a regular
//! file (a file-backed mount, Linux 6.12+) the kernel opens every `device=` path as a file and
//! refuses anything but regular files; when fsmeta is a block device (a loop device) the
//! devices must be block devices too. Each device-table slot also gives its layer's address
//! in the chain laid end to end as one disk (`uniaddr`: fsmeta, then each layer, bottom
//! first, block-aligned), so a kernel given that one disk and no `device=` options mounts it
//! too (flat-device mode, with empty tags from Linux 6.7). Pass the `device=` options one
//! `fsconfig` call each (as `erofs_sys::mount::mount_erofs_file` does): `mount(2)`'s
//! single option page limits a long chain.
//!
//! Layers may be full images and tar-index images (`[index][tar]`, 512-byte blocks) mixed in
//! one chain; the fsmeta block size is the smallest layer block size, so every layer's data is
//! addressable in fsmeta blocks (chunk addresses are in fsmeta blocks).
//!
//! API (stable): [`merge_layer_files`] (paths in, one layer file open at a time),
//! [`merge_layers`] (opened [`Image`]s in), [`open_fsmeta`] (read fsmeta with its layers as
//! devices), [`open_layers`], [`MergeOptions`], [`MergeSummary`], [`MAX_LAYERS`].
//!
//! The output is a function of the layers' bytes and the options only (same inputs, same
//! bytes). The work is top-down, as overlayfs looks things up: a layer's directory is read only
//! where it is still visible, so hidden subtrees cost nothing. Memory is linear in the merged
//! tree's metadata, and hostile layers get errors naming the layer ([`Error::Layer`]): loops,
//! chunk references outside their layer, names EROFS cannot hold, budgets of [`Limits`].

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fs::File;
use std::io::Write;
use std::ops::ControlFlow;
use std::path::Path;

use crate::builder::{
    DEVT_SLOTOFF, DeviceTableGeometry, Interrupt, Limits, layout, write_device_table_head,
};
use crate::error::{CorruptKind, EntryError, Error, Result};
use crate::format::{self, ChunkIndex, DeviceSlot, NULL_ADDR, mode};
use crate::reader::{Extent, Image, Inode};
use crate::tree::{self, Body, FileData, Meta, Node, NodeId, ROOT, Tree, Xattr};

/// Most layers one fsmeta can list (device ids are 16-bit, 0 being fsmeta itself).
pub const MAX_LAYERS: usize = u16::MAX as usize;
/// Prefix of the xattrs overlayfs owns.
const OVERLAY_PREFIX: &[u8] = b"trusted.overlay.";
const OPAQUE: &[u8] = b"trusted.overlay.opaque";
const AUFS_WH: &[u8] = b".wh.";
const AUFS_OPQ: &[u8] = b".wh..wh..opq";

/// How to merge.
#[derive(Debug, Clone, Default)]
pub struct MergeOptions {
    /// Also honour aufs-style markers kept as plain entries in the layers (layers built
    /// without whiteout conversion): `.wh.NAME` hides `NAME` below its layer and
    /// `.wh..wh..opq` makes its directory opaque; the markers themselves are dropped.
    /// (`mkfs.erofs --aufs` documents this meaning; its rebuild mode for EROFS inputs, as of
    /// erofs-utils 1.9, ignores the flag and keeps such entries as files.)
    pub aufs: bool,
    /// Filesystem UUID; `None` derives one from the layers' superblocks and sizes, so the
    /// output stays a function of its inputs.
    pub uuid: Option<[u8; 16]>,
    /// Budgets on the merged tree (entries, depth, metadata bytes including chunk tables).
    pub limits: Limits,
    /// Asked between directories: stop with [`Error::Interrupted`] once it says so.
    pub interrupt: Interrupt,
}

/// What [`merge_layers`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergeSummary {
    /// fsmeta's block size (the smallest layer block size).
    pub block_size: u32,
    /// Blocks of fsmeta itself (its size is `blocks * block_size`).
    pub blocks: u64,
    /// Each layer's size in fsmeta blocks, as recorded in the device table (bottom first).
    pub device_blocks: Vec<u32>,
    /// Inodes in fsmeta.
    pub inodes: u64,
    /// Regular files among them.
    pub files: u64,
    /// Bytes of regular file data, all layers' visible files together.
    pub file_bytes: u64,
    /// Bytes of inline layer data copied into fsmeta.
    pub copied_bytes: u64,
    /// Filesystem UUID.
    pub uuid: [u8; 16],
}

impl MergeSummary {
    /// fsmeta's size in bytes.
    pub fn bytes(&self) -> u64 {
        self.blocks * self.block_size as u64
    }
}

/// Open layer image files (bottom first) and merge them into `out`: see [`merge_layers`].
pub fn merge_layer_files<P: AsRef<Path>, W: Write>(
    layers: &[P],
    out: W,
    opts: &MergeOptions,
) -> Result<MergeSummary> {
    // Each layer is opened twice (its superblock first, then for its own pass), so no more
    // than one layer file is open at a time, however long the chain.
    let open = |i: usize| -> Result<Image> {
        let p = layers[i].as_ref();
        let f =
            File::open(p).map_err(|e| Error::io(format!("opening layer {}", p.display()), e))?;
        Image::open(f).map_err(|e| Error::in_layer(i + 1, e))
    };
    let mut infos = Vec::with_capacity(layers.len());
    for i in 0..layers.len() {
        infos.push(LayerInfo::of(&open(i)?));
    }
    merge_with(
        &infos,
        |k, f| {
            let p = layers[k].as_ref();
            let file = File::open(p)
                .map_err(|e| Error::io(format!("opening layer {}", p.display()), e))?;
            let img = Image::open(
                PagedFile::new(file)
                    .map_err(|e| Error::io(format!("reading layer {}", p.display()), e))?,
            )
            .map_err(|e| Error::in_layer(k + 1, e))?;
            if LayerInfo::of(&img) != infos[k] {
                return Err(Error::in_layer(
                    k + 1,
                    Error::InvalidOption("the layer changed during the merge".into()),
                ));
            }
            f(&img)
        },
        out,
        opts,
    )
}

/// A layer file read through pages kept for its pass: the merge reads inodes, directories
/// and xattrs in small pieces, close together, so one `pread` per page rather than one per
/// piece. Only metadata is read (file data stays where it is), and the pages kept are capped.
struct PagedFile {
    file: File,
    size: u64,
    pages: std::sync::Mutex<HashMap<u64, std::sync::Arc<[u8]>>>,
}

const PAGE: u64 = 64 << 10;
/// Pages kept at most (256 MiB); past it the cache starts over.
const MAX_PAGES: usize = 4096;

impl PagedFile {
    fn new(file: File) -> std::io::Result<Self> {
        let size = file.metadata()?.len();
        Ok(PagedFile {
            file,
            size,
            pages: Default::default(),
        })
    }

    fn page(&self, n: u64) -> std::io::Result<std::sync::Arc<[u8]>> {
        let mut pages = self.pages.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = pages.get(&n) {
            return Ok(p.clone());
        }
        let start = n * PAGE;
        let len = PAGE.min(self.size.saturating_sub(start)) as usize;
        let mut buf = vec![0u8; len];
        let got = crate::reader::ReadAt::read_at(&self.file, &mut buf, start)?;
        buf.truncate(got);
        let page: std::sync::Arc<[u8]> = buf.into();
        if pages.len() >= MAX_PAGES {
            pages.clear();
        }
        pages.insert(n, page.clone());
        Ok(page)
    }
}

impl crate::reader::ReadAt for PagedFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        if buf.len() as u64 > PAGE {
            return crate::reader::ReadAt::read_at(&self.file, buf, offset);
        }
        let mut done = 0;
        while done < buf.len() {
            let pos = offset + done as u64;
            let page = self.page(pos / PAGE)?;
            let within = (pos % PAGE) as usize;
            if within >= page.len() {
                break;
            }
            let n = (page.len() - within).min(buf.len() - done);
            buf[done..done + n].copy_from_slice(&page[within..within + n]);
            done += n;
        }
        Ok(done)
    }

    fn size(&self) -> std::io::Result<u64> {
        Ok(self.size)
    }
}

/// Open layer image files (bottom first), each on its own, as [`merge_layers`] wants them.
pub fn open_layers<P: AsRef<Path>>(layers: &[P]) -> Result<Vec<Image>> {
    layers
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let p = p.as_ref();
            let f = File::open(p)
                .map_err(|e| Error::io(format!("opening layer {}", p.display()), e))?;
            Image::open(f).map_err(|e| Error::in_layer(i + 1, e))
        })
        .collect()
}

/// Open an fsmeta with its layer files as devices (bottom first), for reading it in
/// userspace as the kernel would with `device=` options.
pub fn open_fsmeta<P: AsRef<Path>, Q: AsRef<Path>>(fsmeta: P, layers: &[Q]) -> Result<Image> {
    let fsmeta = fsmeta.as_ref();
    let primary =
        File::open(fsmeta).map_err(|e| Error::io(format!("opening {}", fsmeta.display()), e))?;
    let mut devices: Vec<Box<dyn crate::reader::ReadAt>> = Vec::with_capacity(layers.len());
    for p in layers {
        let p = p.as_ref();
        devices.push(Box::new(File::open(p).map_err(|e| {
            Error::io(format!("opening layer {}", p.display()), e)
        })?));
    }
    Image::open_with_devices(primary, devices)
}

/// Write fsmeta for `layers` (bottom first; each opened on its own with [`Image::open`], so
/// a tar-index layer reads its tar from the same file) into `out`, front to back (`out` need
/// not seek). The layers' bytes are only read; their data is referenced, not copied.
pub fn merge_layers<W: Write>(
    layers: &[Image],
    out: W,
    opts: &MergeOptions,
) -> Result<MergeSummary> {
    for (i, l) in layers.iter().enumerate() {
        if !l.is_flat() {
            return Err(Error::in_layer(
                i + 1,
                Error::InvalidOption(
                    "layer opened with separate devices; open each layer on its own".into(),
                ),
            ));
        }
    }
    let infos: Vec<LayerInfo> = layers.iter().map(LayerInfo::of).collect();
    merge_with(&infos, |k, f| f(&layers[k]), out, opts)
}

/// What the merge needs of a layer before its own pass.
#[derive(Debug, Clone, PartialEq, Eq)]
struct LayerInfo {
    blkszbits: u8,
    size: u64,
    /// The superblock's bytes (for the derived UUID).
    sb: Vec<u8>,
}

impl LayerInfo {
    fn of(img: &Image) -> Self {
        let mut sb = vec![0u8; format::SUPERBLOCK_SIZE];
        if img.read_exact_at(0, format::SUPER_OFFSET, &mut sb).is_err() {
            sb.clear();
        }
        LayerInfo {
            blkszbits: img.superblock().blkszbits,
            size: img.device_size(0).unwrap_or(0),
            sb,
        }
    }
}

/// The merge, visiting layer `k` through `with_layer(k, f)` (top first, once each).
fn merge_with<W: Write>(
    infos: &[LayerInfo],
    mut with_layer: impl FnMut(usize, &mut dyn FnMut(&Image) -> Result<()>) -> Result<()>,
    mut out: W,
    opts: &MergeOptions,
) -> Result<MergeSummary> {
    let n = infos.len();
    if n == 0 {
        return Err(Error::InvalidOption("no layers to merge".into()));
    }
    if n > MAX_LAYERS {
        return Err(Error::TooLarge(format!(
            "{n} layers; an EROFS device table holds at most {MAX_LAYERS}"
        )));
    }
    let bits = infos
        .iter()
        .map(|l| l.blkszbits)
        .min()
        .expect("at least one layer");
    let bs = 1u64 << bits;
    let mut device_blocks = Vec::with_capacity(n);
    for (i, l) in infos.iter().enumerate() {
        let size = l.size;
        let blocks = u32::try_from(size.div_ceil(bs)).map_err(|_| {
            Error::in_layer(
                i + 1,
                Error::TooLarge(format!("{size} bytes exceed 2^32 blocks of {bs} bytes")),
            )
        })?;
        device_blocks.push(blocks);
    }
    let head_end = DEVT_SLOTOFF as u64 * format::DEVICE_SLOT_SIZE as u64
        + (n * format::DEVICE_SLOT_SIZE) as u64;
    let first_data = head_end.div_ceil(bs);

    let mut m = Merger {
        opts,
        bits,
        tree: Tree::new(Meta {
            mode: mode::S_IFDIR | 0o755,
            uid: 0,
            gid: 0,
            mtime: 0,
            mtime_nsec: 0,
        }),
        data: Vec::new(),
        first_data,
        metadata: 0,
        files: 0,
        file_bytes: 0,
        copied: 0,
    };
    for k in (0..n).rev() {
        with_layer(k, &mut |img| {
            if k == n - 1 {
                // The merged root has the top layer's attributes.
                let root = img.inode(img.root_nid())?;
                let xattrs = m.xattrs(img, &root)?;
                let r = m.tree.node_mut(ROOT);
                r.meta = meta_of(&root);
                r.xattrs = xattrs;
            }
            m.layer(k, img)
        })
        .map_err(|e| match e {
            e @ Error::Layer { .. } => e,
            e => Error::in_layer(k + 1, e),
        })?;
    }
    m.strip_whiteouts();

    let data_blocks = (m.data.len() as u64) / bs;
    let meta_blkaddr = u32::try_from(first_data + data_blocks)
        .map_err(|_| Error::TooLarge("fsmeta exceeds 2^32 blocks".into()))?;
    let emitted = layout::emit(
        &m.tree,
        layout::Params {
            blkszbits: bits,
            meta_blkaddr,
            // nid 0 stays unused: glibc treats d_ino 0 as a deleted entry.
            start: format::INODE_SLOT_SIZE,
        },
    )?;

    let uuid = opts.uuid.unwrap_or_else(|| derived_uuid(infos));
    let mut head = vec![0u8; (first_data * bs) as usize];
    // Each layer's address when fsmeta and the layers are laid end to end as one disk, right
    // after fsmeta and the layers below it: VM runtimes get a chain as one block device and
    // the kernel mounts it without `device=` options (flat-device mode). Mounts that name the
    // devices read chunk-indexed data by device id and never use these addresses.
    let mut at = emitted.end_block;
    let mut slots = Vec::with_capacity(n);
    for (i, &blocks) in device_blocks.iter().enumerate() {
        let uniaddr = u32::try_from(at).map_err(|_| {
            Error::TooLarge(format!(
                "layer {} would start at block {at} of the chain's one-disk layout, past 2^32 blocks",
                i + 1
            ))
        })?;
        slots.push(DeviceSlot {
            tag: [0; 64],
            blocks,
            uniaddr,
        });
        at += blocks as u64;
    }
    write_device_table_head(
        &mut head,
        &emitted,
        &slots,
        DeviceTableGeometry {
            blkszbits: bits,
            blocks: emitted.end_block as u32,
            meta_blkaddr,
            uuid,
        },
    );
    let wr = |e| Error::io("writing fsmeta", e);
    out.write_all(&head).map_err(wr)?;
    out.write_all(&m.data).map_err(wr)?;
    out.write_all(&emitted.bytes).map_err(wr)?;
    out.flush().map_err(wr)?;
    tracing::debug!(
        layers = n,
        inodes = emitted.inodes,
        blocks = emitted.end_block,
        "fsmeta written"
    );
    Ok(MergeSummary {
        block_size: bs as u32,
        blocks: emitted.end_block,
        device_blocks,
        inodes: emitted.inodes,
        files: m.files,
        file_bytes: m.file_bytes,
        copied_bytes: m.copied,
        uuid,
    })
}

/// A UUID from what identifies the chain: each layer's superblock block and size.
fn derived_uuid(layers: &[LayerInfo]) -> [u8; 16] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"erofs-image fsmeta v1");
    for l in layers {
        h.update(&l.sb);
        h.update(l.size.to_le_bytes());
    }
    let d = h.finalize();
    let mut u = [0u8; 16];
    u.copy_from_slice(&d[..16]);
    // RFC 4122 version 4 / variant bits, so tools show it as an ordinary UUID.
    u[6] = (u[6] & 0x0F) | 0x40;
    u[8] = (u[8] & 0x3F) | 0x80;
    u
}

fn meta_of(i: &Inode) -> Meta {
    Meta {
        mode: i.mode(),
        uid: i.raw.uid,
        gid: i.raw.gid,
        mtime: i.mtime,
        mtime_nsec: i.mtime_nsec,
    }
}

/// One piece of a file, in file order.
#[derive(Debug, Clone, Copy)]
enum Piece {
    Hole(u64),
    /// `len` bytes at byte `off` of the layer.
    Layer {
        off: u64,
        len: u64,
    },
    /// `len` bytes at fsmeta block `blk` (copied inline data).
    Own {
        blk: u64,
        len: u64,
    },
}

impl Piece {
    fn len(&self) -> u64 {
        match *self {
            Piece::Hole(l) | Piece::Layer { len: l, .. } | Piece::Own { len: l, .. } => l,
        }
    }
}

struct Merger<'a> {
    opts: &'a MergeOptions,
    bits: u8,
    tree: Tree,
    /// fsmeta's own data blocks (copied inline tails), from block `first_data`.
    data: Vec<u8>,
    first_data: u64,
    metadata: u64,
    files: u64,
    file_bytes: u64,
    copied: u64,
}

impl Merger<'_> {
    fn charge(&mut self, bytes: u64) -> Result<()> {
        let l = &self.opts.limits;
        self.metadata += bytes;
        let over =
            |what, value, limit| Err(Error::entry(b"", EntryError::Limit { what, value, limit }));
        if self.metadata > l.max_metadata {
            return over("merged metadata bytes", self.metadata, l.max_metadata);
        }
        if self.tree.len() as u64 > l.max_entries {
            return over("merged entries", self.tree.len() as u64, l.max_entries);
        }
        Ok(())
    }

    /// Merge layer `k` under everything above it: walk its directories that are still
    /// visible (present in the merged tree, not hidden by an opaque directory above).
    fn layer(&mut self, k: usize, img: &Image) -> Result<()> {
        let root = img.root_nid();
        let mut seen_dirs: HashSet<u64> = HashSet::from([root]);
        let mut links: HashMap<u64, NodeId> = HashMap::new();
        let mut queue: VecDeque<(u64, NodeId, usize)> = VecDeque::from([(root, ROOT, 0)]);
        while let Some((nid, merged, depth)) = queue.pop_front() {
            self.opts.interrupt.check()?;
            let dir = img.inode(nid)?;
            let entries = img.read_dir(&dir)?;
            let mut opaque = self.opts.aufs && entries.iter().any(|e| e.name == AUFS_OPQ);
            if !opaque && dir.raw.xattr_icount != 0 {
                opaque = img
                    .xattrs(&dir)?
                    .iter()
                    .any(|(n, v)| n == OPAQUE && v == b"y");
            }
            let mut aufs_whiteouts = Vec::new();
            for e in &entries {
                let name = &e.name[..];
                if name == b"." || name == b".." {
                    continue;
                }
                if name.is_empty() || name.contains(&b'/') || name.contains(&0) {
                    return Err(Error::Corrupt(
                        CorruptKind::BadName(String::from_utf8_lossy(name).into_owned()).at(nid),
                    ));
                }
                if self.opts.aufs && name.starts_with(AUFS_WH) {
                    if name != AUFS_OPQ && name.len() > AUFS_WH.len() {
                        aufs_whiteouts.push(&name[AUFS_WH.len()..]);
                    }
                    continue;
                }
                if let Some(c) = self.tree.child(merged, name) {
                    // An upper layer has this name: it wins, unless both are directories
                    // and the upper one lets lower layers show through. Anything else here
                    // (a file, a whiteout) ends the lookup: layers below stay hidden.
                    let upper = self.tree.node(c);
                    if upper.is_dir() && !upper.opaque {
                        if img.inode(e.nid)?.is_dir() {
                            self.push_dir(&mut seen_dirs, &mut queue, e.nid, c, depth)?;
                        } else {
                            self.tree.node_mut(c).opaque = true;
                        }
                    }
                    continue;
                }
                // Another name of a file already merged from this layer: a hardlink.
                if let Some(&id) = links.get(&e.nid) {
                    self.tree.insert_child(merged, name, id);
                    self.charge(name.len() as u64)?;
                    continue;
                }
                let inode = img.inode(e.nid)?;
                if inode.is_whiteout() {
                    let id = self.tree.add(whiteout())?;
                    self.tree.insert_child(merged, name, id);
                    continue;
                }
                let xattrs = self.xattrs(img, &inode)?;
                let x: usize = xattrs.iter().map(|(n, v)| n.len() + v.len()).sum();
                let body = match inode.file_type() {
                    mode::S_IFDIR => Body::Dir(BTreeMap::new()),
                    mode::S_IFREG => {
                        let xlen = layout::encode_xattrs(&xattrs)
                            .map_err(|e| Error::entry(name, e))?
                            .len();
                        Body::File(self.file_data(k, img, &inode, xlen)?)
                    }
                    mode::S_IFLNK => {
                        let target = img.read_link(&inode)?;
                        // What the kernel could not return as a path: refused, not copied.
                        if target.contains(&0) || target.len() > 4095 {
                            return Err(Error::Corrupt(
                                CorruptKind::BadSymlink(
                                    "target contains NUL or exceeds 4095 bytes",
                                )
                                .at(e.nid),
                            ));
                        }
                        Body::Symlink(target.into())
                    }
                    mode::S_IFCHR | mode::S_IFBLK => Body::Device(inode.raw.i_u),
                    _ => Body::Special,
                };
                let link_len = match &body {
                    Body::Symlink(t) => t.len(),
                    _ => 0,
                };
                let is_dir = matches!(body, Body::Dir(_));
                let id = self.tree.add(Node {
                    meta: meta_of(&inode),
                    xattrs,
                    body,
                    opaque: false,
                })?;
                self.tree.insert_child(merged, name, id);
                self.charge((name.len() + x + link_len) as u64)?;
                if is_dir {
                    self.push_dir(&mut seen_dirs, &mut queue, e.nid, id, depth)?;
                } else {
                    links.insert(e.nid, id);
                }
            }
            // A real entry of the same layer wins over an aufs whiteout of its name.
            for name in aufs_whiteouts {
                if self.tree.child(merged, name).is_none() {
                    let id = self.tree.add(whiteout())?;
                    self.tree.insert_child(merged, name, id);
                }
            }
            // overlayfs never treats the root as opaque (it is not looked up).
            if opaque && merged != ROOT {
                self.tree.node_mut(merged).opaque = true;
            }
        }
        Ok(())
    }

    fn push_dir(
        &mut self,
        seen: &mut HashSet<u64>,
        queue: &mut VecDeque<(u64, NodeId, usize)>,
        nid: u64,
        merged: NodeId,
        depth: usize,
    ) -> Result<()> {
        if !seen.insert(nid) {
            return Err(Error::Corrupt(
                CorruptKind::Limit("directory reached twice (a loop or a hardlinked directory)")
                    .at(nid),
            ));
        }
        if depth + 1 > self.opts.limits.max_depth {
            return Err(Error::entry(
                b"",
                EntryError::Limit {
                    what: "path depth",
                    value: (depth + 1) as u64,
                    limit: self.opts.limits.max_depth as u64,
                },
            ));
        }
        queue.push_back((nid, merged, depth + 1));
        Ok(())
    }

    /// The xattrs fsmeta keeps: storable ones, minus overlayfs' own.
    fn xattrs(&self, img: &Image, inode: &Inode) -> Result<Vec<Xattr>> {
        if inode.raw.xattr_icount == 0 {
            return Ok(Vec::new());
        }
        Ok(img
            .xattrs(inode)?
            .into_iter()
            .filter(|(n, _)| !n.starts_with(OVERLAY_PREFIX) && tree::storable_xattr(n))
            .map(|(n, v)| (n.into_boxed_slice(), v.into_boxed_slice()))
            .collect())
    }

    /// Where a regular file's data is, as fsmeta describes it.
    fn file_data(
        &mut self,
        k: usize,
        img: &Image,
        inode: &Inode,
        xattr_len: usize,
    ) -> Result<FileData> {
        let size = inode.size();
        self.files += 1;
        self.file_bytes += size;
        if size == 0 {
            return Ok(FileData::Empty);
        }
        let layer_size = img.device_size(0).unwrap_or(0);
        let lbs = img.block_size();
        let mut pieces: Vec<Piece> = Vec::new();
        let mut copy: Option<(u64, u64)> = None;
        let push = |pieces: &mut Vec<Piece>, p: Piece| match (pieces.last_mut(), p) {
            (Some(Piece::Hole(a)), Piece::Hole(b)) => *a += b,
            (Some(Piece::Layer { off, len }), Piece::Layer { off: o, len: l })
                if *off + *len == o =>
            {
                *len += l
            }
            (_, p) => pieces.push(p),
        };
        let data_piece = |e: Extent| -> Result<Piece> {
            match e {
                Extent::Hole(n) => Ok(Piece::Hole(n)),
                Extent::Data {
                    device: 0,
                    offset,
                    len,
                } => {
                    if offset.checked_add(len).is_none_or(|end| end > layer_size) {
                        return Err(Error::Corrupt(
                            CorruptKind::OutOfBounds {
                                device: 0,
                                offset,
                                len,
                                size: layer_size,
                            }
                            .at(inode.nid),
                        ));
                    }
                    Ok(Piece::Layer { off: offset, len })
                }
                Extent::Data { device, .. } => Err(Error::Corrupt(
                    CorruptKind::MissingDevice(device).at(inode.nid),
                )),
            }
        };
        match inode.layout {
            format::LAYOUT_FLAT_PLAIN | format::LAYOUT_FLAT_INLINE => {
                let inline = inode.layout == format::LAYOUT_FLAT_INLINE;
                let blocks_len = if inline {
                    (size.div_ceil(lbs) - 1) * lbs
                } else {
                    size
                };
                let mut off = 0;
                while off < blocks_len {
                    let e = img.map(inode, off, blocks_len - off)?;
                    let p = data_piece(e)?;
                    if p.len() == 0 {
                        return Err(Error::Corrupt(
                            CorruptKind::BadSize("file data ends early").at(inode.nid),
                        ));
                    }
                    off += p.len();
                    push(&mut pieces, p);
                }
                if inline {
                    match img.map(inode, blocks_len, size - blocks_len)? {
                        Extent::Data {
                            device: 0,
                            offset,
                            len,
                        } if len == size - blocks_len => copy = Some((offset, len)),
                        _ => {
                            return Err(Error::Corrupt(
                                CorruptKind::BadInline("inline tail not in the metadata")
                                    .at(inode.nid),
                            ));
                        }
                    }
                }
            }
            format::LAYOUT_CHUNK_BASED => {
                let mut err = None;
                img.for_each_chunk(inode, |_, _, e| {
                    match e.and_then(data_piece) {
                        Ok(p) => push(&mut pieces, p),
                        Err(e) => {
                            err = Some(e);
                            return ControlFlow::Break(());
                        }
                    }
                    ControlFlow::Continue(())
                })?;
                if let Some(e) = err {
                    return Err(e);
                }
            }
            other => {
                return Err(Error::Unsupported(format!(
                    "nid {}: data layout {other}",
                    inode.nid
                )));
            }
        }
        let bs = 1u64 << self.bits;
        if let Some((off, len)) = copy {
            let mut buf = vec![0u8; len as usize];
            img.read_exact_at(0, off, &mut buf)?;
            self.charge(len)?;
            self.copied += len;
            if pieces.is_empty()
                && size < bs
                && format::EXTENDED_INODE_SIZE + xattr_len + buf.len() <= bs as usize
            {
                return Ok(FileData::Tail {
                    blkaddr: NULL_ADDR,
                    size,
                    tail: buf.into(),
                });
            }
            let blk = self.first_data + self.data.len() as u64 / bs;
            self.data.extend_from_slice(&buf);
            self.data
                .resize(self.data.len().next_multiple_of(bs as usize), 0);
            if pieces.is_empty() {
                let blkaddr = u32::try_from(blk)
                    .ok()
                    .filter(|&b| b != NULL_ADDR)
                    .ok_or_else(|| Error::TooLarge("fsmeta exceeds 2^32 blocks".into()))?;
                return Ok(FileData::Blocks { blkaddr, size });
            }
            pieces.push(Piece::Own { blk, len });
        }
        self.chunks(k, inode, size, &pieces)
    }

    /// A chunk table for `pieces`: the largest power-of-two chunk size such that every chunk
    /// is one hole or one contiguous, block-aligned run on one device.
    fn chunks(&mut self, k: usize, inode: &Inode, size: u64, pieces: &[Piece]) -> Result<FileData> {
        let bits = self.bits as u32;
        let bs = 1u64 << bits;
        let at = |what| Error::Corrupt(CorruptKind::BadChunk(what).at(inode.nid));
        let total: u64 = pieces.iter().map(Piece::len).sum();
        if total != size {
            return Err(at("file data does not cover the file size"));
        }
        let mut c = (64 - (size - 1).leading_zeros()).clamp(bits, bits + 31);
        let mut pos = 0u64;
        for p in pieces {
            if pos > 0 {
                c = c.min(pos.trailing_zeros());
            }
            if let Piece::Layer { off, .. } = p
                && off % bs != 0
            {
                return Err(at("file data not aligned to fsmeta blocks"));
            }
            pos += p.len();
        }
        if c < bits {
            return Err(at("file data pieces not aligned to fsmeta blocks"));
        }
        let count = size.div_ceil(1u64 << c);
        self.charge(count * format::CHUNK_INDEX_SIZE as u64)?;
        let mut chunks = Vec::with_capacity(count as usize);
        let device_id = (k + 1) as u16;
        let mut start = 0u64;
        for p in pieces {
            let end = start + p.len();
            let mut at_off = start;
            while at_off < end {
                let within = at_off - start;
                let chunk = match *p {
                    Piece::Hole(_) => ChunkIndex {
                        device_id: 0,
                        blkaddr: NULL_ADDR,
                    },
                    Piece::Layer { off, .. } => ChunkIndex {
                        device_id,
                        blkaddr: block_u32((off + within) / bs)?,
                    },
                    Piece::Own { blk, .. } => ChunkIndex {
                        device_id: 0,
                        blkaddr: block_u32(blk + within / bs)?,
                    },
                };
                chunks.push(chunk);
                at_off += 1u64 << c;
            }
            start = end;
        }
        debug_assert_eq!(chunks.len() as u64, count);
        Ok(FileData::Chunks {
            size,
            chunkbits: c as u8,
            chunks,
        })
    }

    /// Drop every whiteout: they only hid lower entries while merging.
    fn strip_whiteouts(&mut self) {
        for id in 0..self.tree.len() as NodeId {
            if self.tree.node(id).is_dir() {
                let wh: Vec<Box<[u8]>> = self
                    .tree
                    .dir_entries(id)
                    .filter(|&(_, c)| self.tree.node(c).is_whiteout())
                    .map(|(n, _)| n.into())
                    .collect();
                for n in wh {
                    self.tree.remove_child(id, &n);
                }
            }
        }
    }
}

fn block_u32(b: u64) -> Result<u32> {
    u32::try_from(b)
        .ok()
        .filter(|&b| b != NULL_ADDR)
        .ok_or_else(|| Error::TooLarge("a chunk beyond 2^32 fsmeta blocks".into()))
}

fn whiteout() -> Node {
    Node {
        meta: Meta {
            mode: mode::S_IFCHR,
            uid: 0,
            gid: 0,
            mtime: 0,
            mtime_nsec: 0,
        },
        xattrs: Vec::new(),
        body: Body::Device(0),
        opaque: false,
    }
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;
    use std::sync::Arc;

    use super::*;
    use crate::builder::BuildOptions;
    use crate::reader::ReadAt;
    use crate::tar::{Entry, EntryKind, TarWriter};

    /// `(path, kind, content)`: kind `f` file, `d` dir, `l` symlink, `h` hardlink, `x` file
    /// with xattrs (`user.k=content`, and an overlay xattr that must not survive).
    fn tar(entries: &[(&str, char, &str)]) -> Vec<u8> {
        let mut w = TarWriter::new(Vec::new());
        for &(path, kind, content) in entries {
            let k = match kind {
                'd' => EntryKind::Directory,
                'l' => EntryKind::Symlink,
                'h' => EntryKind::Hardlink,
                _ => EntryKind::Regular,
            };
            let mut e = Entry::new(path, k);
            e.mode = if kind == 'd' { 0o755 } else { 0o644 };
            e.mtime = 1000;
            if matches!(kind, 'l' | 'h') {
                e.link = content.into();
            }
            if kind == 'x' {
                e.xattrs.push((b"user.k".to_vec(), content.into()));
                e.xattrs
                    .push((b"trusted.overlay.redirect".to_vec(), b"/x".to_vec()));
            }
            let data = if matches!(kind, 'f' | 'x') {
                content.as_bytes()
            } else {
                b""
            };
            w.append_bytes(&e, data).unwrap();
        }
        w.finish().unwrap()
    }

    fn opts(oci: bool, inline: bool) -> BuildOptions {
        BuildOptions {
            oci_whiteouts: oci,
            inline_data: inline,
            ..Default::default()
        }
    }

    fn full(entries: &[(&str, char, &str)], o: &BuildOptions) -> Arc<Vec<u8>> {
        let mut out = Cursor::new(Vec::new());
        crate::tar_to_image(&tar(entries)[..], &mut out, o).unwrap();
        Arc::new(out.into_inner())
    }

    fn index(entries: &[(&str, char, &str)], o: &BuildOptions) -> Arc<Vec<u8>> {
        let mut out = Cursor::new(Vec::new());
        crate::tar_to_index_file(&tar(entries)[..], &mut out, o).unwrap();
        Arc::new(out.into_inner())
    }

    fn merge(layers: &[Arc<Vec<u8>>], o: &MergeOptions) -> Result<(Vec<u8>, MergeSummary)> {
        let images = layers
            .iter()
            .map(|l| Image::open(l.clone()))
            .collect::<Result<Vec<_>>>()?;
        let mut out = Vec::new();
        let s = merge_layers(&images, &mut out, o)?;
        Ok((out, s))
    }

    fn open(fsmeta: Vec<u8>, layers: &[Arc<Vec<u8>>]) -> Image {
        let devices = layers
            .iter()
            .map(|l| Box::new(l.clone()) as Box<dyn ReadAt>)
            .collect();
        Image::open_with_devices(fsmeta, devices).unwrap()
    }

    fn content(img: &Image, path: &str) -> Vec<u8> {
        let i = img.resolve(path.as_bytes()).unwrap();
        let mut buf = vec![0u8; i.size() as usize];
        assert_eq!(img.read(&i, 0, &mut buf).unwrap(), buf.len());
        buf
    }

    fn names(img: &Image, path: &str) -> Vec<String> {
        let d = img.resolve(path.as_bytes()).unwrap();
        img.read_dir(&d)
            .unwrap()
            .into_iter()
            .map(|e| String::from_utf8(e.name).unwrap())
            .filter(|n| n != "." && n != "..")
            .collect()
    }

    fn stack() -> Vec<Arc<Vec<u8>>> {
        let big = "B".repeat(9000);
        let l1 = full(
            &[
                ("etc/keep", 'f', "keep"),
                ("etc/gone", 'f', "gone"),
                ("lib/a", 'f', "a"),
                ("lib/sub/c", 'f', "c"),
                ("usr/bin/sh", 'f', &big),
                ("usr/bin/sh2", 'h', "usr/bin/sh"),
                ("usr/bin/sh3", 'h', "usr/bin/sh"),
                ("t", 'd', ""),
                ("t/under", 'f', "hidden by a file above"),
            ],
            &opts(true, true),
        );
        let l2 = index(
            &[
                ("etc/.wh.gone", 'f', ""),
                ("lib/.wh..wh..opq", 'f', ""),
                ("lib/new", 'x', "v"),
                ("usr/bin/.wh.sh3", 'f', ""),
                ("t", 'f', "now a file"),
            ],
            &opts(true, true),
        );
        let l3 = full(
            &[
                ("etc/gone", 'l', "back as a link"),
                ("t", 'd', ""),
                ("t/x", 'f', "dir again"),
                ("usr/bin/tail", 'f', &"T".repeat(5000)),
            ],
            &opts(true, false),
        );
        vec![l1, l2, l3]
    }

    #[test]
    fn merged_tree_is_the_overlay_view() {
        let layers = stack();
        let (fsmeta, s) = merge(&layers, &MergeOptions::default()).unwrap();
        assert_eq!(s.block_size, 512, "a tar index in the chain");
        assert_eq!(s.device_blocks.len(), 3);
        for (i, l) in layers.iter().enumerate() {
            assert_eq!(s.device_blocks[i] as u64, (l.len() as u64).div_ceil(512));
        }
        assert_eq!(s.bytes(), fsmeta.len() as u64);
        let img = open(fsmeta.clone(), &layers);
        assert_eq!(img.device_slots().len(), 3);
        let mut etc = names(&img, "etc");
        etc.sort();
        assert_eq!(etc, ["gone", "keep"]);
        assert!(img.resolve(b"etc/gone").unwrap().is_symlink());
        assert_eq!(names(&img, "lib"), ["new"], "opaque directory");
        assert_eq!(content(&img, "lib/new"), b"v");
        let x = img.xattrs(&img.resolve(b"lib/new").unwrap()).unwrap();
        assert_eq!(
            x,
            [(b"user.k".to_vec(), b"v".to_vec())],
            "overlay xattrs dropped"
        );
        assert!(
            img.xattrs(&img.resolve(b"lib").unwrap())
                .unwrap()
                .is_empty(),
            "no opaque xattr on the merged directory"
        );
        assert_eq!(
            names(&img, "t"),
            ["x"],
            "a file between two dirs hides the lower"
        );
        assert_eq!(content(&img, "usr/bin/sh"), "B".repeat(9000).as_bytes());
        assert_eq!(content(&img, "usr/bin/tail"), "T".repeat(5000).as_bytes());
        let sh = img.resolve(b"usr/bin/sh").unwrap();
        let sh2 = img.resolve(b"usr/bin/sh2").unwrap();
        assert_eq!(sh.nid, sh2.nid, "hardlinks stay hardlinks");
        assert_eq!(sh.raw.nlink, 2, "the whited-out third name is not counted");
        assert!(img.resolve(b"usr/bin/sh3").is_err());
        // Chunk indexes name the layer devices: no file data in fsmeta beyond the copied
        // inline tails of sh (9000 % 4096 bytes) and etc/keep.
        assert_eq!(s.copied_bytes, 9000 % 4096 + 4);
        let report = crate::check::check(&img);
        assert!(report.is_ok(), "{}", report.summary(10));
        // Deterministic.
        assert_eq!(merge(&layers, &MergeOptions::default()).unwrap().0, fsmeta);

        // The checker with the layers in the wrong order: slots and sizes disagree.
        let swapped = [layers[1].clone(), layers[0].clone(), layers[2].clone()];
        let r = crate::check::check(&open(fsmeta, &swapped));
        assert!(
            r.findings.iter().any(|f| f.message.contains("device 1")),
            "{}",
            r.summary(10)
        );
    }

    /// The device table places each layer right after fsmeta and the layers below it, so the
    /// chain laid end to end is one image that reads the same without separate devices.
    #[test]
    fn device_table_lays_the_chain_out_as_one_disk() {
        let layers = stack();
        let (fsmeta, s) = merge(&layers, &MergeOptions::default()).unwrap();
        let bs = s.block_size as u64;
        assert!(fsmeta.len() as u64 <= s.blocks * bs);
        let img = open(fsmeta.clone(), &layers);
        let mut disk = fsmeta;
        let mut at = s.blocks;
        for (slot, layer) in img.device_slots().iter().zip(&layers) {
            assert_eq!(slot.uniaddr as u64, at, "right after what is below it");
            disk.resize((at * bs) as usize, 0);
            disk.extend_from_slice(layer);
            at += slot.blocks as u64;
        }
        disk.resize((at * bs) as usize, 0);
        let one = Image::open(disk).unwrap();
        assert!(one.is_flat());
        let report = crate::check::check(&one);
        assert!(report.is_ok(), "{}", report.summary(10));
        for path in ["usr/bin/sh", "usr/bin/tail", "lib/new", "etc/keep", "t/x"] {
            assert_eq!(content(&one, path), content(&img, path), "{path}");
        }
    }

    #[test]
    fn full_layers_keep_4096_byte_blocks_and_small_tails_inline() {
        let l1 = full(
            &[("a", 'f', "tiny"), ("b", 'f', &"x".repeat(4096))],
            &opts(true, true),
        );
        let l2 = full(&[("c", 'f', &"y".repeat(5000))], &opts(true, false));
        let layers = vec![l1, l2];
        let (fsmeta, s) = merge(&layers, &MergeOptions::default()).unwrap();
        assert_eq!(s.block_size, 4096);
        assert_eq!(s.copied_bytes, 4, "only the inline file is copied");
        let img = open(fsmeta, &layers);
        assert_eq!(content(&img, "a"), b"tiny");
        assert_eq!(
            img.resolve(b"a").unwrap().layout,
            format::LAYOUT_FLAT_INLINE,
            "a tail-only file stays inline"
        );
        assert_eq!(content(&img, "b"), "x".repeat(4096).as_bytes());
        assert_eq!(content(&img, "c"), "y".repeat(5000).as_bytes());
        assert_eq!(
            img.resolve(b"c").unwrap().layout,
            format::LAYOUT_CHUNK_BASED
        );
    }

    #[test]
    fn aufs_markers_are_whiteouts_only_with_aufs() {
        let l1 = full(
            &[("d/x", 'f', "x"), ("d/y", 'f', "y"), ("z", 'f', "z")],
            &opts(false, true),
        );
        let l2 = full(
            &[
                ("d/.wh..wh..opq", 'f', ""),
                ("d/w", 'f', "w"),
                (".wh.z", 'f', ""),
            ],
            &opts(false, true),
        );
        let layers = vec![l1, l2];
        let (plain, _) = merge(&layers, &MergeOptions::default()).unwrap();
        let img = open(plain, &layers);
        let mut root = names(&img, "");
        root.sort();
        assert_eq!(root, [".wh.z", "d", "z"]);
        let aufs = MergeOptions {
            aufs: true,
            ..Default::default()
        };
        let (merged, _) = merge(&layers, &aufs).unwrap();
        let img = open(merged, &layers);
        assert_eq!(names(&img, ""), ["d"]);
        assert_eq!(names(&img, "d"), ["w"]);
    }

    #[test]
    fn bad_inputs_are_errors() {
        let l = full(&[("a", 'f', "a")], &opts(true, true));
        assert!(matches!(
            merge(&[], &MergeOptions::default()),
            Err(Error::InvalidOption(_))
        ));
        // More layers than device ids.
        let img = Image::open(l.clone()).unwrap();
        let many: Vec<Image> = (0..=MAX_LAYERS)
            .map(|_| Image::open(l.clone()).unwrap())
            .collect();
        drop(img);
        let e = merge_layers(&many, Vec::new(), &MergeOptions::default()).unwrap_err();
        assert!(matches!(e, Error::TooLarge(_)), "{e}");
        drop(many);

        // A directory entry pointing back at the root: a loop.
        let looped = full(&[("d/f", 'f', "f")], &opts(true, true));
        let mut bytes = (*looped).clone();
        let img = Image::open(looped.clone()).unwrap();
        let root = img.inode(img.root_nid()).unwrap();
        let Extent::Data { offset, .. } = img.map(&root, 0, root.size()).unwrap() else {
            panic!("root data")
        };
        let d = img.resolve(b"d").unwrap();
        let entries = img.read_dir(&root).unwrap();
        let i = entries.iter().position(|e| e.name == b"d").unwrap();
        let at = offset as usize + i * format::DIRENT_SIZE;
        assert_eq!(
            u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()),
            d.nid
        );
        bytes[at..at + 8].copy_from_slice(&img.root_nid().to_le_bytes());
        let e = merge(&[l.clone(), Arc::new(bytes)], &MergeOptions::default()).unwrap_err();
        assert!(matches!(e, Error::Layer { layer: 2, .. }), "{e}");
        assert!(e.to_string().contains("reached twice"), "{e}");

        // A file whose data lies past the end of its layer.
        let data = full(&[("big", 'f', &"d".repeat(20000))], &opts(true, false));
        let img = Image::open(data.clone()).unwrap();
        let f = img.resolve(b"big").unwrap();
        let mut bytes = (*data).clone();
        // i_u (the first data block) is at byte 16 of both inode forms.
        let at = f.pos as usize + 16;
        bytes[at..at + 4].copy_from_slice(&1_000_000u32.to_le_bytes());
        let e = merge(&[Arc::new(bytes)], &MergeOptions::default()).unwrap_err();
        assert!(e.to_string().contains("layer 1"), "{e}");
    }

    /// Corrupted and truncated layers: every outcome is an error or a valid fsmeta, never a
    /// panic; the fsmeta that results reads back and passes the checker with its devices.
    #[test]
    fn corrupted_layers_never_panic() {
        let layers = stack();
        let mut rng = fastrand::Rng::with_seed(14);
        let (mut errors, mut oks) = (0, 0);
        for round in 0..400 {
            let victim = rng.usize(..layers.len());
            let mut bytes = (*layers[victim]).clone();
            if round % 10 == 0 {
                bytes.truncate(rng.usize(..bytes.len()));
            } else {
                // Mostly past the checksummed superblock block, where metadata is.
                let from = if rng.u8(..4) == 0 {
                    0
                } else {
                    4096.min(bytes.len() - 1)
                };
                for _ in 0..rng.usize(1..8) {
                    let i = rng.usize(from..bytes.len());
                    bytes[i] ^= 1 << rng.u8(..8);
                }
            }
            let mut chain = layers.clone();
            chain[victim] = Arc::new(bytes);
            let Ok(images) = chain
                .iter()
                .map(|l| Image::open(l.clone()))
                .collect::<Result<Vec<_>>>()
            else {
                errors += 1;
                continue;
            };
            let mut out = Vec::new();
            match merge_layers(&images, &mut out, &MergeOptions::default()) {
                Ok(_) => {
                    let img = open(out, &chain);
                    let r = crate::check::check(&img);
                    // Whatever the layers held, what merge writes is sound.
                    assert!(r.is_ok(), "round {round}: {}", r.summary(5));
                    oks += 1;
                }
                Err(_) => errors += 1,
            }
        }
        assert!(
            errors > 20 && oks > 20,
            "{errors} errors, {oks} merged: the corruptions do not reach both outcomes"
        );
    }
}
