//! Compare: the tar diff between a lower and an upper snapshot, reading the lower layers in
//! userspace (no temporary mounts, so parents with any number of layers work).
//!
//! The upper side is either an active snapshot's upper directory (overlayfs format: 0:0
//! character devices are deletions, `trusted.overlay.opaque` marks replaced directories) or a
//! committed layer image (whose whiteouts and opaque directories say the same). Every entry of
//! the upper side is emitted with its parents; deletions become `.wh.NAME` only for names the
//! lower side has, opaque directories become `.wh..wh..opq`.
//!
//! An upper directory may belong to a running container, so it is read with [`fdwalk`]: by
//! file descriptors, never following a symlink or entering a mount, and a file's data is read
//! (after the walk, in tar order) only from the inode that was walked; a file the container
//! replaced in between fails the Compare with an error naming it.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::sync::Mutex;

use erofs_image::Image;
use erofs_image::format::mode;
use erofs_image::reader::Inode;
use erofs_image::tar::{Entry, EntryKind, TarWriter};
use sha2::{Digest, Sha256};

use crate::cancel::Cancel;
use crate::error::{Error, Result};
use crate::integrity::VerifiedLayer;
use crate::mount::Mount;
use crate::snapshot::Snapshotter;
use crate::snapshot::layers::ChangeSource;
use crate::store::Timestamp;

const OPAQUE: &[u8] = b"trusted.overlay.opaque";

/// A diff written to a temporary file, ready to be stored in containerd's content store.
#[derive(Debug)]
pub struct DiffBlob {
    /// The file (deleted when this is dropped).
    pub path: PathBuf,
    /// Media type.
    pub media_type: String,
    /// Digest of the stored (compressed) bytes.
    pub digest: String,
    /// Stored size.
    pub size: u64,
    /// Digest of the uncompressed tar (the layer's diffID).
    pub uncompressed: String,
}

impl Drop for DiffBlob {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Hashes and counts what goes through it.
struct HashWriter<W> {
    inner: W,
    h: Sha256,
    n: u64,
}

impl<W: Write> Write for HashWriter<W> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        let k = self.inner.write(b)?;
        self.h.update(&b[..k]);
        self.n += k as u64;
        Ok(k)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The merged lower layers, read in userspace, top layer first.
struct Lower {
    layers: Vec<Image>,
    dirs: Mutex<HashMap<(usize, u64), Vec<erofs_image::reader::DirEntry>>>,
}

impl Lower {
    fn entry(&self, layer: usize, dir: &Inode, name: &[u8]) -> Result<Option<u64>> {
        let mut cache = self.dirs.lock().unwrap_or_else(|p| p.into_inner());
        let list = match cache.get(&(layer, dir.nid)) {
            Some(l) => l,
            None => {
                let l = self.layers[layer].read_dir(dir)?;
                cache.entry((layer, dir.nid)).or_insert(l)
            }
        };
        Ok(list.iter().find(|e| e.name == name).map(|e| e.nid))
    }

    fn opaque(img: &Image, ino: &Inode) -> Result<bool> {
        Ok(img
            .xattrs(ino)?
            .iter()
            .any(|(k, v)| k == OPAQUE && v == b"y"))
    }

    /// Whether `path` exists in the merged lower view.
    fn exists(&self, path: &[u8]) -> Result<bool> {
        let comps: Vec<&[u8]> = path
            .split(|&c| c == b'/')
            .filter(|c| !c.is_empty())
            .collect();
        for (i, img) in self.layers.iter().enumerate() {
            let mut cur = img.inode(img.root_nid())?;
            let mut blocked = false;
            let mut found = true;
            for (k, comp) in comps.iter().enumerate() {
                let Some(nid) = self.entry(i, &cur, comp)? else {
                    found = false;
                    break;
                };
                let ino = img.inode(nid)?;
                if ino.is_whiteout() {
                    return Ok(false);
                }
                if k + 1 == comps.len() {
                    break;
                }
                if !ino.is_dir() {
                    return Ok(false);
                }
                if Self::opaque(img, &ino)? {
                    blocked = true;
                }
                cur = ino;
            }
            if found {
                return Ok(true);
            }
            if blocked {
                return Ok(false);
            }
        }
        Ok(false)
    }
}

/// Where the upper side's entries come from.
enum Upper {
    Dir(fdwalk::Tree),
    Layer(Image),
}

/// One change, ready to be written.
struct Change {
    entry: Entry,
    source: Source,
}

enum Source {
    None,
    /// A regular file of the upper directory: its path and what the walk saw of it.
    File(Vec<u8>, fdwalk::Meta),
    Image(Inode),
}

impl Snapshotter {
    /// Write the diff between `lower` and `upper` mounts to a temporary file.
    ///
    /// Refuses to start below the free-space reserve, waits for a heavy-request slot, and
    /// stops, removing its file, once `cancel` trips or free space falls below the reserve
    /// (checked per entry and per chunk of file data).
    pub fn compare(
        &self,
        lower: &[Mount],
        upper: &[Mount],
        media_type: &str,
        source_date_epoch: Option<Timestamp>,
        cancel: &Cancel,
    ) -> Result<DiffBlob> {
        let (compression, media_type) = super::media_type::diff_compression(media_type)?;
        if let Some(t) = source_date_epoch
            && t.nanos >= 1_000_000_000
        {
            return Err(Error::invalid_argument(format!(
                "source date epoch {}s {}ns: nanoseconds must be below 1e9",
                t.secs, t.nanos
            )));
        }
        self.require_space("Compare")?;
        let work = self.guarded(cancel, "Compare".into());
        let _slot = self.heavy_slot(&work, "Compare")?;
        self.compare_in(
            lower,
            upper,
            compression,
            media_type,
            source_date_epoch,
            &work,
        )
        .map_err(|e| self.stopped(&work, e))
    }

    fn compare_in(
        &self,
        lower: &[Mount],
        upper: &[Mount],
        compression: erofs_image::compression::Compression,
        media_type: String,
        source_date_epoch: Option<Timestamp>,
        work: &Cancel,
    ) -> Result<DiffBlob> {
        let inputs = self.diff_inputs(lower, upper)?;
        let open = |l: VerifiedLayer| Image::open(l.into_file()).map_err(Error::from);
        let upper_side = match inputs.upper {
            ChangeSource::Dir(d) => Upper::Dir(fdwalk::Tree::open(&d)?),
            ChangeSource::Layer(l) => Upper::Layer(open(l)?),
        };
        let lower_layers = inputs
            .lowers
            .into_iter()
            .map(open)
            .collect::<Result<Vec<_>>>()?;
        let lower_view = Lower {
            layers: lower_layers,
            dirs: Mutex::new(HashMap::new()),
        };
        let mut changes = match &upper_side {
            Upper::Dir(d) => dir_changes(d, &lower_view, work)?,
            Upper::Layer(img) => image_changes(img, &lower_view, work)?,
        };
        // Depth-first, by path components: a directory right before its contents. The sort is
        // stable, so a directory's opaque marker stays right after it.
        changes.sort_by(|a, b| {
            a.entry
                .path
                .split(|&c| c == b'/')
                .cmp(b.entry.path.split(|&c| c == b'/'))
        });

        let (path, file) = self.scratch_file("diff-")?;
        let mut blob = DiffBlob {
            path,
            media_type,
            digest: String::new(),
            size: 0,
            uncompressed: String::new(),
        };
        let compressor = compression
            .encoder(hashing(io::BufWriter::new(file)))
            .map_err(|e| Error::io("starting the diff's compression", e))?;
        let tar = write_tar(
            hashing(compressor),
            &changes,
            &upper_side,
            source_date_epoch,
            work,
        )?;
        let tar_hash = tar.h;
        let mut stored = tar
            .inner
            .finish()
            .map_err(|e| Error::io("compressing the diff", e))?;
        stored
            .flush()
            .map_err(|e| Error::io("writing the diff", e))?;
        // The finished diff must leave the reserve free too (it is removed on error).
        self.require_space("Compare")?;
        blob.digest = format!("sha256:{}", hex::encode(stored.h.finalize()));
        blob.size = stored.n;
        blob.uncompressed = format!("sha256:{}", hex::encode(tar_hash.finalize()));
        Ok(blob)
    }
}

/// A writer that hashes and counts what goes through it.
fn hashing<W: Write>(inner: W) -> HashWriter<W> {
    HashWriter {
        inner,
        h: Sha256::new(),
        n: 0,
    }
}

fn write_tar<W: Write>(
    out: W,
    changes: &[Change],
    upper: &Upper,
    epoch: Option<Timestamp>,
    work: &Cancel,
) -> Result<W> {
    let mut tw = TarWriter::new(out);
    let wr = |e: io::Error| Error::io("writing the diff", e);
    for c in changes {
        work.check()?;
        let mut e = c.entry.clone();
        if let Some(t) = epoch
            && (e.mtime, e.mtime_nsec) > (t.secs, t.nanos)
        {
            e.mtime = t.secs;
            e.mtime_nsec = t.nanos;
        }
        match (&c.source, upper) {
            (Source::File(p, walked), Upper::Dir(tree)) => {
                let f = tree.open_at(p, walked)?.into_file()?;
                tw.append(&e, &mut work.reader(f))
                    .map_err(|e| Error::io(format!("reading {}", tree.display(p)), e))?;
            }
            (Source::Image(ino), Upper::Layer(img)) => {
                let r = ImageReader { img, ino, off: 0 };
                tw.append(&e, &mut work.reader(r)).map_err(wr)?;
            }
            _ => tw.append(&e, &mut io::empty()).map_err(wr)?,
        }
    }
    tw.finish().map_err(wr)
}

struct ImageReader<'a> {
    img: &'a Image,
    ino: &'a Inode,
    off: u64,
}

impl Read for ImageReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self
            .img
            .read(self.ino, self.off, buf)
            .map_err(io::Error::other)?;
        self.off += n as u64;
        Ok(n)
    }
}

fn whiteout_entry(dir: &[u8], name: &[u8]) -> Entry {
    let mut p = dir.to_vec();
    if !p.is_empty() {
        p.push(b'/');
    }
    p.extend_from_slice(b".wh.");
    p.extend_from_slice(name);
    Entry::new(p, EntryKind::Regular)
}

fn entry_from_meta(path: Vec<u8>, md: &fdwalk::Meta, xattrs: Vec<(Vec<u8>, Vec<u8>)>) -> Entry {
    let kind = match md.kind() {
        fdwalk::Kind::Directory => EntryKind::Directory,
        fdwalk::Kind::Symlink => EntryKind::Symlink,
        fdwalk::Kind::CharDevice => EntryKind::Char,
        fdwalk::Kind::BlockDevice => EntryKind::Block,
        fdwalk::Kind::Fifo => EntryKind::Fifo,
        _ => EntryKind::Regular,
    };
    let mut e = Entry::new(path, kind);
    e.mode = md.mode & 0o7777;
    e.uid = md.uid;
    e.gid = md.gid;
    e.mtime = md.mtime;
    e.mtime_nsec = md.mtime_nsec;
    e.size = if kind == EntryKind::Regular {
        md.size
    } else {
        0
    };
    e.devmajor = md.rdev_major;
    e.devminor = md.rdev_minor;
    e.xattrs = xattrs;
    e
}

/// Changes of an overlayfs upper directory.
fn dir_changes(tree: &fdwalk::Tree, lower: &Lower, work: &Cancel) -> Result<Vec<Change>> {
    let mut out = Vec::new();
    let mut links: HashMap<(u64, u64), Vec<u8>> = HashMap::new();
    for entry in tree.walk() {
        work.check()?;
        let entry = entry?;
        let md = *entry.meta();
        let rp = entry.path().to_vec();
        let kind = md.kind();
        if kind == fdwalk::Kind::CharDevice && (md.rdev_major, md.rdev_minor) == (0, 0) {
            if lower.exists(&rp)? {
                out.push(Change {
                    entry: whiteout_entry(entry.parent_path(), entry.name()),
                    source: Source::None,
                });
            }
            continue;
        }
        if kind != fdwalk::Kind::Directory && md.nlink > 1 {
            if let Some(first) = links.get(&(md.dev, md.ino)) {
                let mut e = Entry::new(rp, EntryKind::Hardlink);
                e.link = first.clone();
                e.mtime = md.mtime;
                out.push(Change {
                    entry: e,
                    source: Source::None,
                });
                continue;
            }
            links.insert((md.dev, md.ino), rp.clone());
        }
        let node = entry.open()?;
        let xattrs = node.xattrs()?;
        let opaque = xattrs.iter().any(|(k, v)| k == OPAQUE && v == b"y");
        let kept: Vec<(Vec<u8>, Vec<u8>)> = xattrs
            .into_iter()
            .filter(|(k, _)| !k.starts_with(b"trusted.overlay."))
            .collect();
        let mut entry = entry_from_meta(rp.clone(), &md, kept);
        let source = if kind == fdwalk::Kind::Regular {
            Source::File(rp.clone(), md)
        } else {
            Source::None
        };
        if kind == fdwalk::Kind::Symlink {
            entry.link = node.read_link()?;
        }
        out.push(Change { entry, source });
        if kind == fdwalk::Kind::Directory && opaque && lower.exists(&rp)? {
            out.push(Change {
                entry: whiteout_entry(&rp, b".wh..opq"),
                source: Source::None,
            });
        }
    }
    Ok(out)
}

/// Changes recorded in a committed layer image.
fn image_changes(img: &Image, lower: &Lower, work: &Cancel) -> Result<Vec<Change>> {
    let mut out = Vec::new();
    let mut links: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    let root = img.inode(img.root_nid())?;
    let mut stack: Vec<(Inode, Vec<u8>)> = vec![(root, Vec::new())];
    while let Some((dir, rel)) = stack.pop() {
        let mut subdirs = Vec::new();
        for de in img.read_dir(&dir)? {
            work.check()?;
            if de.name == b"." || de.name == b".." {
                continue;
            }
            let ino = img.inode(de.nid)?;
            let mut rp = rel.clone();
            if !rp.is_empty() {
                rp.push(b'/');
            }
            rp.extend_from_slice(&de.name);
            if ino.is_whiteout() {
                if lower.exists(&rp)? {
                    out.push(Change {
                        entry: whiteout_entry(&rel, &de.name),
                        source: Source::None,
                    });
                }
                continue;
            }
            if !ino.is_dir() && ino.raw.nlink > 1 {
                if let Some(first) = links.get(&ino.nid) {
                    let mut e = Entry::new(rp, EntryKind::Hardlink);
                    e.link = first.clone();
                    out.push(Change {
                        entry: e,
                        source: Source::None,
                    });
                    continue;
                }
                links.insert(ino.nid, rp.clone());
            }
            let xattrs = img.xattrs(&ino)?;
            let opaque = xattrs.iter().any(|(k, v)| k == OPAQUE && v == b"y");
            let kind = match ino.file_type() {
                mode::S_IFDIR => EntryKind::Directory,
                mode::S_IFLNK => EntryKind::Symlink,
                mode::S_IFCHR => EntryKind::Char,
                mode::S_IFBLK => EntryKind::Block,
                mode::S_IFIFO => EntryKind::Fifo,
                mode::S_IFREG => EntryKind::Regular,
                // Sockets have no tar form.
                _ => continue,
            };
            let mut e = Entry::new(rp.clone(), kind);
            e.mode = ino.mode() & 0o7777;
            e.uid = ino.raw.uid;
            e.gid = ino.raw.gid;
            e.mtime = ino.mtime;
            e.mtime_nsec = ino.mtime_nsec;
            e.size = if kind == EntryKind::Regular {
                ino.size()
            } else {
                0
            };
            (e.devmajor, e.devminor) = ino.rdev();
            e.xattrs = xattrs
                .into_iter()
                .filter(|(k, _)| !k.starts_with(b"trusted.overlay."))
                .collect();
            if kind == EntryKind::Symlink {
                e.link = img.read_link(&ino)?;
            }
            let is_dir = kind == EntryKind::Directory;
            out.push(Change {
                entry: e,
                source: if kind == EntryKind::Regular {
                    Source::Image(ino.clone())
                } else {
                    Source::None
                },
            });
            if is_dir {
                if opaque && lower.exists(&rp)? {
                    out.push(Change {
                        entry: whiteout_entry(&rp, b".wh..opq"),
                        source: Source::None,
                    });
                }
                subdirs.push((ino, rp));
            }
        }
        stack.extend(subdirs.into_iter().rev());
    }
    Ok(out)
}
