//! Merkle trees computed in userspace:
//!
//! * the fs-verity file digest (what `FS_IOC_MEASURE_VERITY` and `fsverity digest` report):
//!   SHA-256 tree over 4 KiB blocks, no salt, digest of the 256-byte `fsverity_descriptor`;
//! * the dm-verity hash tree in veritysetup's format (hash type 1, SHA-256, salted), appended
//!   to the layer after its data, with the verity superblock, and the `layer.erofs.dmverity`
//!   sidecar that containerd's EROFS mount handler reads.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use sha2::{Digest, Sha256};

const DIGEST: usize = 32;

/// Level 0 of a Merkle tree computed ahead of time: the hashes of blocks `first..first + n`
/// of a file (with the tree's salt), taken while the file was still being written, from
/// blocks the writer had finished. The tree code hashes only the blocks not covered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Leaves {
    /// Index of the first block hashed.
    pub first: u64,
    /// One hash per block from `first` on.
    pub hashes: Vec<[u8; DIGEST]>,
}

impl Leaves {
    fn end(&self) -> u64 {
        self.first + self.hashes.len() as u64
    }
}

fn read_block(f: &File, off: u64, buf: &mut [u8], limit: u64) -> io::Result<()> {
    buf.fill(0);
    let want = ((limit - off) as usize).min(buf.len());
    f.read_exact_at(&mut buf[..want], off)
}

/// The fs-verity digest of `len` bytes of `f` (SHA-256, `block` bytes per block, no salt),
/// as `fsverity digest` prints it (without the `sha256:` prefix).
pub fn fsverity_digest(f: &File, len: u64, block: usize) -> io::Result<[u8; 32]> {
    fsverity_digest_with(f, len, block, None)
}

/// [`fsverity_digest`] reusing leaf hashes computed while the file was written.
pub fn fsverity_digest_with(
    f: &File,
    len: u64,
    block: usize,
    known: Option<&Leaves>,
) -> io::Result<[u8; 32]> {
    let root = if len == 0 {
        [0u8; DIGEST]
    } else {
        merkle_root(f, len, block, &[], None, known)?
    };
    let mut desc = [0u8; 256];
    desc[0] = 1; // version
    desc[1] = 1; // SHA-256
    desc[2] = block.trailing_zeros() as u8;
    desc[3] = 0; // salt size
    desc[8..16].copy_from_slice(&len.to_le_bytes());
    desc[16..16 + DIGEST].copy_from_slice(&root);
    Ok(Sha256::digest(desc).into())
}

/// Hash `len` bytes of `f` into a Merkle tree: level 0 hashes the data blocks, each level
/// hashes the blocks of the level below, until one block remains; the root is the hash of that
/// block (of the data itself when it is one block). `salt` is prepended to every hashed block (dm-verity type 1; fs-verity with no salt
/// is the same thing). When `levels_out` is given, every level's blocks are kept, lowest
/// first.
fn merkle_root(
    f: &File,
    len: u64,
    block: usize,
    salt: &[u8],
    mut levels_out: Option<&mut Vec<Vec<u8>>>,
    known: Option<&Leaves>,
) -> io::Result<[u8; 32]> {
    let slot = DIGEST.next_power_of_two();
    let hash = |data: &[u8]| -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(salt);
        h.update(data);
        h.finalize().into()
    };
    // A single data block is its own root: no tree at all.
    let mut buf = vec![0u8; block];
    if len <= block as u64 {
        read_block(f, 0, &mut buf, len)?;
        return Ok(hash(&buf));
    }
    // Level 0: what was hashed ahead of time, the rest from the data on every core.
    let n = len.div_ceil(block as u64);
    let hashes = match known.filter(|k| k.end() <= n && !k.hashes.is_empty()) {
        Some(k) => {
            let mut h = leaf_hashes(f, len, block, salt, 0..k.first)?;
            h.extend_from_slice(&k.hashes);
            h.extend(leaf_hashes(f, len, block, salt, k.end()..n)?);
            h
        }
        None => leaf_hashes(f, len, block, salt, 0..n)?,
    };
    let mut level = Vec::with_capacity(hashes.len() * slot);
    for group in hashes.chunks(block / slot) {
        let start = level.len();
        level.resize(start + block, 0);
        for (i, h) in group.iter().enumerate() {
            level[start + i * slot..start + i * slot + DIGEST].copy_from_slice(h);
        }
    }
    // Upper levels until a single block.
    loop {
        if let Some(out) = levels_out.as_deref_mut() {
            out.push(level.clone());
        }
        if level.len() == block {
            return Ok(hash(&level));
        }
        let mut next = Vec::new();
        let mut cur = vec![0u8; block];
        let mut in_block = 0;
        for b in level.chunks(block) {
            cur[in_block * slot..in_block * slot + DIGEST].copy_from_slice(&hash(b));
            in_block += 1;
            if in_block * slot == block {
                next.extend_from_slice(&cur);
                cur.fill(0);
                in_block = 0;
            }
        }
        if in_block > 0 {
            next.extend_from_slice(&cur);
        }
        level = next;
    }
}

/// Salted hashes of the `block`-sized blocks `blocks` of the first `len` bytes of `f` (the
/// last one zero-padded), computed by as many threads as there are cores, each on its own
/// range.
fn leaf_hashes(
    f: &File,
    len: u64,
    block: usize,
    salt: &[u8],
    blocks: std::ops::Range<u64>,
) -> io::Result<Vec<[u8; 32]>> {
    let n = blocks.end.saturating_sub(blocks.start) as usize;
    let threads = std::thread::available_parallelism()
        .map_or(1, |p| p.get())
        .clamp(1, 8);
    let per = n.div_ceil(threads).max(1);
    let mut out = vec![[0u8; DIGEST]; n];
    std::thread::scope(|scope| {
        let mut handles = Vec::new();
        for (t, part) in out.chunks_mut(per).enumerate() {
            let first = blocks.start + (t * per) as u64;
            handles.push(scope.spawn(move || hash_blocks(f, len, block, salt, first, part)));
        }
        handles.into_iter().try_for_each(|h| {
            h.join()
                .map_err(|_| io::Error::other("hashing thread panicked"))?
        })
    })?;
    Ok(out)
}

/// Hash blocks `first..first + out.len()` of the first `len` bytes of `f` into `out`.
pub(crate) fn hash_blocks(
    f: &File,
    len: u64,
    block: usize,
    salt: &[u8],
    first: u64,
    out: &mut [[u8; DIGEST]],
) -> io::Result<()> {
    let chunk_blocks = ((1usize << 20) / block).max(1);
    let mut buf = vec![0u8; chunk_blocks.min(out.len()) * block];
    for (c, hashes) in out.chunks_mut(chunk_blocks).enumerate() {
        let off = (first + (c * chunk_blocks) as u64) * block as u64;
        let want = ((len - off) as usize).min(hashes.len() * block);
        buf.fill(0);
        f.read_exact_at(&mut buf[..want], off)?;
        for (i, h) in hashes.iter_mut().enumerate() {
            let mut d = Sha256::new();
            d.update(salt);
            d.update(&buf[i * block..(i + 1) * block]);
            *h = d.finalize().into();
        }
    }
    Ok(())
}

/// Where a layer's dm-verity tree is, as written to the sidecar.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DmVerityMeta {
    /// Root hash, hex.
    pub roothash: String,
    /// Byte offset of the verity superblock (= padded data size).
    pub hashoffset: u64,
}

/// Salt used for layer trees: 32 zero bytes, as containerd's differ uses, so root hashes are
/// reproducible across nodes.
pub const DMVERITY_SALT: [u8; 32] = [0; 32];

/// The UUID in the verity superblock of a tree with root `root`: derived from it (uuid5 in the
/// URL namespace of `erofs:dmverity/<hex root>`) rather than random, so the same data gives
/// the same tree bytes on every node, and a tree fetched from a registry is byte for byte the
/// one a node would compute.
pub fn superblock_uuid(root: &[u8; 32]) -> [u8; 16] {
    *uuid::Uuid::new_v5(
        &uuid::Uuid::NAMESPACE_URL,
        format!("erofs:dmverity/{}", hex::encode(root)).as_bytes(),
    )
    .as_bytes()
}

/// The 512-byte veritysetup superblock [`dmverity_format`] writes for a tree of root `root`
/// over `data_blocks` blocks of `block` bytes.
pub fn superblock(data_blocks: u64, block: usize, root: &[u8; 32]) -> [u8; 512] {
    let mut sb = [0u8; 512];
    sb[0..8].copy_from_slice(b"verity\0\0");
    sb[8..12].copy_from_slice(&1u32.to_le_bytes()); // version
    sb[12..16].copy_from_slice(&1u32.to_le_bytes()); // hash type
    sb[16..32].copy_from_slice(&superblock_uuid(root));
    sb[32..38].copy_from_slice(b"sha256");
    sb[64..68].copy_from_slice(&(block as u32).to_le_bytes());
    sb[68..72].copy_from_slice(&(block as u32).to_le_bytes());
    sb[72..80].copy_from_slice(&data_blocks.to_le_bytes());
    sb[80..82].copy_from_slice(&(DMVERITY_SALT.len() as u16).to_le_bytes());
    sb[88..88 + DMVERITY_SALT.len()].copy_from_slice(&DMVERITY_SALT);
    sb
}

/// Append a dm-verity superblock and hash tree to `path` (data = its first `data_len` bytes,
/// padded to `block`), veritysetup format: hash type 1, SHA-256, salted, data and hash block
/// size `block`, superblock UUID [`superblock_uuid`]. Returns what the sidecar records.
pub fn dmverity_format(
    path: &Path,
    data_len: u64,
    block: usize,
    known: Option<&Leaves>,
) -> io::Result<DmVerityMeta> {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)?;
    let data_blocks = data_len.div_ceil(block as u64);
    let hash_offset = data_blocks * block as u64;
    // Zero-pad the data to a whole block.
    f.set_len(hash_offset)?;
    let mut levels = Vec::new();
    let root = merkle_root(
        &f,
        hash_offset,
        block,
        &DMVERITY_SALT,
        Some(&mut levels),
        known,
    )?;
    let sb = superblock(data_blocks, block, &root);
    let sb_area = 512u64.next_multiple_of(block as u64);
    let mut w = io::BufWriter::new(&f);
    use std::io::Seek;
    w.seek(io::SeekFrom::Start(hash_offset))?;
    w.write_all(&sb)?;
    w.write_all(&vec![0u8; (sb_area - 512) as usize])?;
    // The tree is stored top level first.
    for level in levels.iter().rev() {
        w.write_all(level)?;
    }
    w.flush()?;
    drop(w);
    f.sync_all()?;
    Ok(DmVerityMeta {
        roothash: hex::encode(root),
        hashoffset: hash_offset,
    })
}

/// Check a layer's dm-verity tree in userspace (what `veritysetup verify` does): recompute the
/// tree over the data and compare the root and every stored level.
pub fn dmverity_verify(path: &Path, meta: &DmVerityMeta, block: usize) -> io::Result<bool> {
    dmverity_verify_file(&File::open(path)?, meta, block)
}

/// [`dmverity_verify`] on an open file.
pub fn dmverity_verify_file(f: &File, meta: &DmVerityMeta, block: usize) -> io::Result<bool> {
    tree_matches(f, meta, block, None)
}

/// [`dmverity_verify_file`] with the hashes of the data blocks the node took itself while it
/// wrote them (`known`, [`Leaves`]): only the blocks they do not cover are read and hashed.
/// As sound as the full check: `known` comes from the node's own data, never from the tree.
pub fn dmverity_verify_file_with(
    f: &File,
    meta: &DmVerityMeta,
    block: usize,
    known: Option<&Leaves>,
) -> io::Result<bool> {
    tree_matches(f, meta, block, known)
}

/// Whether the tree computed over `f`'s data (or from `known` lowest-level hashes) has root
/// `meta.roothash` and every level equal to the one stored after the superblock area.
fn tree_matches(
    f: &File,
    meta: &DmVerityMeta,
    block: usize,
    known: Option<&Leaves>,
) -> io::Result<bool> {
    let mut levels = Vec::new();
    let root = merkle_root(
        f,
        meta.hashoffset,
        block,
        &DMVERITY_SALT,
        Some(&mut levels),
        known,
    )?;
    if hex::encode(root) != meta.roothash {
        return Ok(false);
    }
    // Stored top level first, after the superblock area.
    let mut off = meta.hashoffset + 512u64.next_multiple_of(block as u64);
    for level in levels.iter().rev() {
        let mut stored = vec![0u8; level.len()];
        f.read_exact_at(&mut stored, off)?;
        if &stored != level {
            return Ok(false);
        }
        off += level.len() as u64;
    }
    Ok(true)
}

/// Bytes of the hash levels of a dm-verity tree over `data_blocks` blocks of `block` bytes
/// (without the superblock area), as [`dmverity_format`] writes them: `None` for a single
/// data block (no tree) or sizes out of range.
pub fn dmverity_levels_len(data_blocks: u64, block: usize) -> Option<u64> {
    let per = (block / DIGEST.next_power_of_two()) as u64;
    if data_blocks <= 1 || per < 2 {
        return None;
    }
    let mut total = 0u64;
    let mut n = data_blocks;
    while n > 1 {
        n = n.div_ceil(per);
        total = total.checked_add(n.checked_mul(block as u64)?)?;
    }
    Some(total)
}

/// Check a tree appended at `meta.hashoffset` of `f` against itself only: its lowest level's
/// hashes, taken as the hashes of the data blocks, must give every stored upper level and
/// `meta.roothash`. The data is not read: this proves the tree is the one the root hash
/// names, not that it describes the data (the kernel checks that, block by block, when the
/// layer is read through dm-verity). Costs one hash per tree block (1/16 of the data at
/// 512-byte blocks).
pub fn dmverity_verify_tree_only(f: &File, meta: &DmVerityMeta, block: usize) -> io::Result<bool> {
    let data_blocks = meta.hashoffset / block as u64;
    let Some(levels_len) = dmverity_levels_len(data_blocks, block) else {
        return Ok(false);
    };
    let start = meta.hashoffset + 512u64.next_multiple_of(block as u64);
    let flen = f.metadata()?.len();
    if start.checked_add(levels_len) != Some(flen) {
        return Ok(false);
    }
    // The lowest level is stored last.
    let per = block / DIGEST.next_power_of_two();
    let low_len = data_blocks.div_ceil(per as u64) * block as u64;
    let mut low = vec![0u8; low_len as usize];
    f.read_exact_at(&mut low, flen - low_len)?;
    let slot = DIGEST.next_power_of_two();
    let hashes: Vec<[u8; DIGEST]> = (0..data_blocks as usize)
        .map(|i| {
            low[i * slot..i * slot + DIGEST]
                .try_into()
                .expect("32 bytes")
        })
        .collect();
    // Slot padding and the unused tail of the last block must be zero, as the format says.
    let used_ok = low.chunks(slot).enumerate().all(|(i, s)| {
        let pad = if i < data_blocks as usize {
            &s[DIGEST..]
        } else {
            s
        };
        pad.iter().all(|&b| b == 0)
    });
    if !used_ok {
        return Ok(false);
    }
    tree_matches(f, meta, block, Some(&Leaves { first: 0, hashes }))
}

/// The parameters a veritysetup superblock (at `hashoffset` of `f`) declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VeritySuperblock {
    /// Hash type (1 = the format of our trees).
    pub hash_type: u32,
    /// Data block size.
    pub data_block_size: u32,
    /// Hash block size.
    pub hash_block_size: u32,
    /// Number of data blocks.
    pub data_blocks: u64,
    /// Whether the algorithm is sha256 and the salt is [`DMVERITY_SALT`].
    pub ours: bool,
}

/// Read the veritysetup superblock at `hashoffset` of `f`; `None` if there is none.
pub fn read_verity_superblock(f: &File, hashoffset: u64) -> io::Result<Option<VeritySuperblock>> {
    let mut sb = [0u8; 512];
    match f.read_exact_at(&mut sb, hashoffset) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    if &sb[0..8] != b"verity\0\0" {
        return Ok(None);
    }
    let u32_at = |o: usize| u32::from_le_bytes(sb[o..o + 4].try_into().unwrap());
    let salt_len = u16::from_le_bytes([sb[80], sb[81]]) as usize;
    let alg = &sb[32..64];
    let ours = alg.starts_with(b"sha256")
        && alg[6..].iter().all(|&b| b == 0)
        && salt_len == DMVERITY_SALT.len()
        && sb[88..88 + salt_len] == DMVERITY_SALT;
    Ok(Some(VeritySuperblock {
        hash_type: u32_at(12),
        data_block_size: u32_at(64),
        hash_block_size: u32_at(68),
        data_blocks: u64::from_le_bytes(sb[72..80].try_into().unwrap()),
        ours,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn file_with(len: usize) -> (tempfile::TempDir, std::path::PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
        std::fs::write(&p, data).unwrap();
        (d, p)
    }

    /// Our digest equals `fsverity digest` (Debian's fsverity-utils) for sizes around block
    /// and tree-level boundaries.
    #[test]
    fn fsverity_digest_matches_fsverity_utils() {
        for len in [
            0usize,
            1,
            4095,
            4096,
            4097,
            128 * 4096,
            128 * 4096 + 1,
            3 << 20,
        ] {
            let (_d, p) = file_with(len);
            let ours =
                hex::encode(fsverity_digest(&File::open(&p).unwrap(), len as u64, 4096).unwrap());
            let out = Command::new("fsverity")
                .args(["digest", "--hash-alg=sha256", "--block-size=4096"])
                .arg(&p)
                .output()
                .expect("fsverity (Debian package fsverity) must be installed: run scripts/setup");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let theirs = String::from_utf8_lossy(&out.stdout);
            let theirs = theirs
                .split_whitespace()
                .next()
                .unwrap()
                .trim_start_matches("sha256:")
                .to_string();
            assert_eq!(ours, theirs, "length {len}");
        }
    }

    /// Level-0 hashes given ahead are used in place of hashing those blocks: correct ones give
    /// the same digest and tree as hashing everything, wrong ones show they were used.
    #[test]
    fn known_leaves_stand_in_for_their_blocks() {
        let len = 300 * 4096 + 17;
        let (_d, p) = file_with(len);
        let f = File::open(&p).unwrap();
        let all = leaf_hashes(&f, len as u64, 4096, &[], 0..301).unwrap();
        let whole = fsverity_digest(&f, len as u64, 4096).unwrap();
        for (first, n) in [
            (1u64, 0usize),
            (1, 1),
            (1, 299),
            (0, 301),
            (5, 100),
            (1, 300),
        ] {
            let known = Leaves {
                first,
                hashes: all[first as usize..first as usize + n].to_vec(),
            };
            assert_eq!(
                fsverity_digest_with(&f, len as u64, 4096, Some(&known)).unwrap(),
                whole,
                "first {first} n {n}"
            );
        }
        let mut wrong = Leaves {
            first: 1,
            hashes: all[1..10].to_vec(),
        };
        wrong.hashes[3][0] ^= 1;
        assert_ne!(
            fsverity_digest_with(&f, len as u64, 4096, Some(&wrong)).unwrap(),
            whole
        );
        // Leaves past the end of the data are ignored, not trusted.
        let past = Leaves {
            first: 300,
            hashes: vec![[0; 32]; 5],
        };
        assert_eq!(
            fsverity_digest_with(&f, len as u64, 4096, Some(&past)).unwrap(),
            whole
        );
        // The dm-verity tree built from known salted leaves passes veritysetup's check too.
        let salted = leaf_hashes(&f, len as u64, 4096, &DMVERITY_SALT, 0..301).unwrap();
        let known = Leaves {
            first: 1,
            hashes: salted[1..200].to_vec(),
        };
        drop(f);
        let meta = dmverity_format(&p, len as u64, 4096, Some(&known)).unwrap();
        assert!(dmverity_verify(&p, &meta, 4096).unwrap());
    }

    /// The same data gives the same tree bytes, superblock included (registry artifacts rely
    /// on it); other data another UUID.
    #[test]
    fn trees_are_reproducible() {
        let (_d, p) = file_with(70_001);
        let (_e, q) = file_with(70_001);
        let a = dmverity_format(&p, 70_001, 512, None).unwrap();
        let b = dmverity_format(&q, 70_001, 512, None).unwrap();
        assert_eq!(a, b);
        assert_eq!(std::fs::read(&p).unwrap(), std::fs::read(&q).unwrap());
        let mut root = [0u8; 32];
        hex::decode_to_slice(&a.roothash, &mut root).unwrap();
        let sb = &std::fs::read(&p).unwrap()[a.hashoffset as usize..][..512];
        assert_eq!(sb[16..32], superblock_uuid(&root));
        root[0] ^= 1;
        assert_ne!(sb[16..32], superblock_uuid(&root));
    }

    /// veritysetup accepts our trees, for 4 KiB and 512-byte blocks, and rejects a flipped byte.
    #[test]
    fn dmverity_tree_passes_veritysetup() {
        for (len, block) in [
            (1usize, 4096usize),
            (200_000, 4096),
            (5 << 20, 4096),
            (300_001, 512),
        ] {
            let (_d, p) = file_with(len);
            let meta = dmverity_format(&p, len as u64, block, None).unwrap();
            assert!(dmverity_verify(&p, &meta, block).unwrap());
            let run = |root: &str| {
                Command::new("veritysetup")
                    .arg("verify")
                    .arg(&p)
                    .arg(&p)
                    .arg(root)
                    .arg(format!("--hash-offset={}", meta.hashoffset))
                    .output()
                    .expect("veritysetup (Debian package cryptsetup-bin) must be installed: run scripts/setup")
            };
            let out = run(&meta.roothash);
            assert!(
                out.status.success(),
                "len {len} block {block}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            // A flipped data byte is caught.
            let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
            let mut b = [0u8; 1];
            File::open(&p)
                .unwrap()
                .read_exact_at(&mut b, (len / 2) as u64)
                .unwrap();
            f.write_all_at(&[b[0] ^ 1], (len / 2) as u64).unwrap();
            assert!(
                !run(&meta.roothash).status.success(),
                "veritysetup missed a flipped byte"
            );
            assert!(!dmverity_verify(&p, &meta, block).unwrap());
        }
    }
}
