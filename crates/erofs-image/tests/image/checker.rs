//! The checker on hostile images built by hand: overlapping metadata, huge directories in
//! tiny images, deep trees, floods of findings, chunk device ids outside the device table and
//! xattr name filters. Each must be checked in time and memory proportional to the image,
//! and the structural ones reported. (nextest runs each test in its own process, so the peak
//! RSS is this test's.)

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use erofs_image::check::{MAX_FINDINGS, Report, check_image};
use erofs_image::format::{
    self, LAYOUT_CHUNK_BASED, LAYOUT_FLAT_PLAIN, RawInode, Superblock, file_type, xattr_index,
};

use crate::common::*;

const MIB: u64 = 1 << 20;

/// A hand-made image: superblock, inodes from byte 4096 (nid N at 4096 + 32 N), and whatever
/// blocks a test writes. Written sparsely to a file, so large images cost no disk.
struct Raw {
    bits: u8,
    file: tempfile::NamedTempFile,
    size: u64,
    sb: Superblock,
}

const META: u64 = 4096;

impl Raw {
    fn new(bits: u8, size: u64) -> Self {
        let file = tempfile::NamedTempFile::new().unwrap();
        file.as_file().set_len(size).unwrap();
        let bs = 1u64 << bits;
        let sb = Superblock {
            magic: format::MAGIC,
            blkszbits: bits,
            root_nid: 0,
            inos: 1,
            blocks: (size / bs) as u32,
            meta_blkaddr: (META / bs) as u32,
            ..Default::default()
        };
        Raw {
            bits,
            file,
            size,
            sb,
        }
    }
    fn bs(&self) -> u64 {
        1 << self.bits
    }
    fn write(&self, at: u64, bytes: &[u8]) {
        assert!(at + bytes.len() as u64 <= self.size, "write past the image");
        self.file.as_file().write_all_at(bytes, at).unwrap();
    }
    fn pos(nid: u64) -> u64 {
        META + nid * 32
    }
    /// A compact inode (extended if `size` needs it).
    fn inode(&self, nid: u64, mode: u32, layout: u8, size: u64, i_u: u32, nlink: u32) -> u64 {
        self.inode_x(nid, mode, layout, size, i_u, nlink, 0)
    }
    #[allow(clippy::too_many_arguments)]
    fn inode_x(
        &self,
        nid: u64,
        mode: u32,
        layout: u8,
        size: u64,
        i_u: u32,
        nlink: u32,
        xattr_icount: u16,
    ) -> u64 {
        let extended = size > u32::MAX as u64;
        let raw = RawInode {
            format: ((layout as u16) << format::I_DATALAYOUT_SHIFT) | extended as u16,
            xattr_icount,
            mode: mode as u16,
            nlink,
            size,
            i_u,
            ..Default::default()
        };
        let mut b = [0u8; 64];
        raw.encode(&mut b);
        let len = if extended { 64 } else { 32 };
        self.write(Self::pos(nid), &b[..len]);
        Self::pos(nid) + len as u64
    }
    /// A directory block at block `blk` holding `entries` (name, nid, type) in that order;
    /// returns its length.
    fn dir_block(&self, blk: u64, entries: &[(&[u8], u64, u8)]) -> u64 {
        let mut b = dir_block_bytes(entries);
        assert!(b.len() as u64 <= self.bs());
        let len = b.len() as u64;
        b.resize(self.bs() as usize, 0);
        self.write(blk * self.bs(), &b);
        len
    }
    fn finish(mut self) -> tempfile::NamedTempFile {
        self.sb.checksum = 0;
        self.write(format::SUPER_OFFSET, &self.sb.encode());
        self.file.as_file().sync_all().unwrap();
        self.file
    }
}

fn dir_block_bytes(entries: &[(&[u8], u64, u8)]) -> Vec<u8> {
    let mut heads = Vec::new();
    let mut names = Vec::new();
    let base = entries.len() * format::DIRENT_SIZE;
    for (name, nid, ft) in entries {
        let mut d = [0u8; format::DIRENT_SIZE];
        format::Dirent {
            nid: *nid,
            nameoff: (base + names.len()) as u16,
            file_type: *ft,
        }
        .encode(&mut d);
        heads.extend_from_slice(&d);
        names.extend_from_slice(name);
    }
    heads.extend_from_slice(&names);
    heads
}

const DIR: u32 = format::mode::S_IFDIR | 0o755;
const REG: u32 = format::mode::S_IFREG | 0o644;

fn check_file(f: &tempfile::NamedTempFile) -> (Report, Duration, u64) {
    let before = peak_rss();
    let t = Instant::now();
    let report = check_image(File::open(f.path()).unwrap(), Vec::new());
    let took = t.elapsed();
    let grew = peak_rss().saturating_sub(before);
    eprintln!(
        "checked in {took:?}, peak memory +{} MiB, work {} of {} bytes, {} findings (+{} errors \
         omitted): {}",
        grew >> 20,
        report.work,
        report.work_budget,
        report.findings.len(),
        report.omitted_errors,
        report.summary(3)
    );
    (report, took, grew)
}

fn all(report: &Report) -> Vec<String> {
    report.findings.iter().map(|f| f.to_string()).collect()
}

/// `n` regular files at nids 1..=n, each chunk-based with a 4-byte block map, one block per
/// chunk and i_size 2^32-1: 8M entries, 32 MiB of table starting right after the inode, so
/// every table runs over the inodes after it and then through the same zeros. The 69 s of
/// issue 11 (3 files of a 1.2 KB zstd blob) was this, one read per entry per file.
fn overlapping_chunk_tables(n: u64) -> tempfile::NamedTempFile {
    let raw = Raw::new(9, 64 * MIB);
    let bs = raw.bs();
    for i in 1..=n {
        // Every word of these inodes is a hole (size) or a block inside the image (format 8,
        // mode|nlink 0x181a4, chunk format 0), so no table stops at a bad entry.
        raw.inode(i, REG, LAYOUT_CHUNK_BASED, u32::MAX as u64, 0, 1);
    }
    let table_end = Raw::pos(n + 1) + 4 * (u32::MAX as u64).div_ceil(bs);
    let dir_blk = table_end.div_ceil(bs);
    let names: Vec<Vec<u8>> = (1..=n).map(|i| format!("f{i:02}").into_bytes()).collect();
    let mut entries: Vec<(&[u8], u64, u8)> =
        vec![(b".", 0, file_type::DIR), (b"..", 0, file_type::DIR)];
    for (i, name) in names.iter().enumerate() {
        entries.push((name, i as u64 + 1, file_type::REG));
    }
    let len = raw.dir_block(dir_blk, &entries);
    raw.inode(0, DIR, LAYOUT_FLAT_PLAIN, len, dir_blk as u32, 2);
    raw.finish()
}

#[test]
fn overlapping_chunk_tables_are_read_in_batches() {
    // 5 x 32 MiB of table is within the budget (4 bytes per image byte): all is read.
    let img = overlapping_chunk_tables(5);
    let (report, took, _) = check_file(&img);
    assert_eq!(report.files, 5, "{:?}", all(&report));
    assert!(report.is_ok(), "{:?}", all(&report));
    // The old checker read one 4-byte entry per call: 42M reads, 10 s here (0.8 s now).
    assert!(took < Duration::from_secs(4), "took {took:?}");
}

#[test]
fn overlapping_chunk_tables_exhaust_the_work_budget() {
    // 12 files x 32 MiB of table read through is past 4 bytes per image byte (64 MiB).
    let img = overlapping_chunk_tables(12);
    let (report, took, _) = check_file(&img);
    assert!(!report.is_ok());
    assert!(
        all(&report).iter().any(|f| f.contains("check stopped")),
        "{:?}",
        all(&report)
    );
    assert!(report.work <= report.work_budget + 4096);
    // The old checker: 100M reads, 24 s here (1.3 s now).
    assert!(took < Duration::from_secs(8), "took {took:?}");
}

/// A 64 MiB directory in an image of 80 KiB: a chunk-based root whose 16384 block-map
/// entries all name the same block of 240 entries. The old checker built every entry of it
/// in memory (about 4M entries, some 300 MB) before looking at one.
#[test]
fn huge_directory_in_a_tiny_image_is_streamed_and_bounded() {
    let raw = Raw::new(12, 128 * 1024);
    let bs = raw.bs();
    let nblocks = 16384u64;
    let table_at = raw.inode(0, DIR, LAYOUT_CHUNK_BASED, nblocks * bs, 0, 2);
    let file = (table_at + 4 * nblocks - META) / 32 + 1;
    let blk = (Raw::pos(file + 1)).div_ceil(bs);
    raw.write(
        table_at,
        &(blk as u32).to_le_bytes().repeat(nblocks as usize),
    );
    raw.inode(file, REG, LAYOUT_FLAT_PLAIN, 0, 0, 1);
    let names: Vec<Vec<u8>> = (0..240).map(|i| format!("a{i:03}").into_bytes()).collect();
    let mut entries: Vec<(&[u8], u64, u8)> =
        vec![(b".", 0, file_type::DIR), (b"..", 0, file_type::DIR)];
    entries.extend(names.iter().map(|n| (n.as_slice(), file, file_type::REG)));
    raw.dir_block(blk, &entries);
    let img = raw.finish();
    let (report, took, grew) = check_file(&img);
    assert!(!report.is_ok());
    let all = all(&report);
    assert!(all.iter().any(|f| f.contains("check stopped")), "{all:?}");
    assert!(report.findings.len() <= MAX_FINDINGS + 1);
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert!(grew < 64 * MIB, "peak memory grew by {} MiB", grew >> 20);
}

/// 3000 nested directories with 255-byte names, each holding a 255-byte-named file: the old
/// checker kept a full path per file (1.1 GB here) and copied one per level. The image is
/// valid; the deepest file's nlink is wrong, and its finding shows the end of its path.
#[test]
fn deep_trees_with_long_names_cost_their_names_only() {
    let depth = 3000u64;
    let raw = Raw::new(12, 16 * MIB);
    let bs = raw.bs();
    let first_blk = (Raw::pos(2 * depth) + bs).div_ceil(bs);
    let dname = vec![b'd'; 255];
    let fname = vec![b'f'; 255];
    for k in 0..depth {
        let (dir, file) = (2 * k, 2 * k + 1);
        let parent = if k == 0 { 0 } else { 2 * (k - 1) };
        let mut entries: Vec<(&[u8], u64, u8)> =
            vec![(b".", dir, file_type::DIR), (b"..", parent, file_type::DIR)];
        let last = k == depth - 1;
        if !last {
            entries.push((&dname, 2 * (k + 1), file_type::DIR));
        }
        entries.push((&fname, file, file_type::REG));
        let len = raw.dir_block(first_blk + k, &entries);
        raw.inode(
            dir,
            DIR,
            LAYOUT_FLAT_PLAIN,
            len,
            (first_blk + k) as u32,
            2 + !last as u32,
        );
        raw.inode(file, REG, LAYOUT_FLAT_PLAIN, 0, 0, if last { 2 } else { 1 });
    }
    let img = raw.finish();
    let (report, took, grew) = check_file(&img);
    assert_eq!(report.directories, depth);
    let errors: Vec<_> = report
        .findings
        .iter()
        .filter(|f| f.severity == erofs_image::check::Severity::Error)
        .collect();
    assert_eq!(errors.len(), 1, "{:?}", all(&report));
    let path = errors[0].path.as_deref().unwrap();
    assert!(
        errors[0].message.contains("nlink is 2 but 1 entries"),
        "{}",
        errors[0]
    );
    assert!(
        path.starts_with('…') && path.ends_with(&"f".repeat(255)),
        "{path}"
    );
    assert!(path.len() < 1200, "a path of {} bytes", path.len());
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert!(grew < 128 * MIB, "peak memory grew by {} MiB", grew >> 20);
}

/// 3000 entries whose dirent type is wrong: 1000 findings are kept, the rest counted.
#[test]
fn findings_are_capped_and_counted() {
    let n = 3000u64;
    let raw = Raw::new(12, 4 * MIB);
    let bs = raw.bs();
    raw.inode(1, REG, LAYOUT_FLAT_PLAIN, 0, 0, n as u32);
    let names: Vec<Vec<u8>> = (0..n).map(|i| format!("e{i:05}").into_bytes()).collect();
    let mut blocks: Vec<Vec<(&[u8], u64, u8)>> =
        vec![vec![(b".", 0, file_type::DIR), (b"..", 0, file_type::DIR)]];
    for name in &names {
        let cur = blocks.last_mut().unwrap();
        let mut probe = cur.clone();
        probe.push((name, 1, file_type::SYMLINK));
        if dir_block_bytes(&probe).len() as u64 > bs {
            blocks.push(vec![(name, 1, file_type::SYMLINK)]);
        } else {
            *cur = probe;
        }
    }
    let first = 16u64;
    let mut size = 0;
    for (i, b) in blocks.iter().enumerate() {
        let len = raw.dir_block(first + i as u64, b);
        size = i as u64 * bs + len;
    }
    raw.inode(0, DIR, LAYOUT_FLAT_PLAIN, size, first as u32, 2);
    let img = raw.finish();
    let (report, _, _) = check_file(&img);
    let other: Vec<_> = all(&report)
        .into_iter()
        .filter(|f| !f.contains("dirent type 7"))
        .collect();
    assert!(other.iter().all(|f| f.starts_with("warning")), "{other:?}");
    assert_eq!(report.findings.len(), MAX_FINDINGS);
    assert_eq!(report.errors(), n);
    // The superblock's "no checksum" warning is the first finding kept.
    assert_eq!(report.omitted_errors, n - (MAX_FINDINGS as u64 - 1));
    let s = report.summary(2);
    assert!(s.ends_with(&format!("and {} more", n - 2)), "{s}");
}

/// A file whose one chunk is an 8-byte index (with a device id) pointing at block 20.
fn chunk_index_image(
    extra_devices: u16,
    device_id: u16,
    chunk_format: u16,
) -> tempfile::NamedTempFile {
    let mut raw = Raw::new(12, MIB);
    let bs = raw.bs();
    if extra_devices > 0 {
        raw.sb.feature_incompat |= format::FEATURE_INCOMPAT_DEVICE_TABLE;
        raw.sb.extra_devices = extra_devices;
        raw.sb.devt_slotoff = (2048 / format::DEVICE_SLOT_SIZE) as u16;
        raw.sb.blocks = 64;
        for d in 0..extra_devices as u64 {
            let slot = format::DeviceSlot {
                tag: [0; 64],
                blocks: 32,
                uniaddr: 64 + 32 * d as u32,
            };
            raw.write(2048 + d * 128, &slot.encode());
        }
    }
    raw.sb.feature_incompat |= format::FEATURE_INCOMPAT_CHUNKED_FILE;
    let end = raw.inode(1, REG, LAYOUT_CHUNK_BASED, bs, chunk_format as u32, 1);
    let mut idx = [0u8; 8];
    format::ChunkIndex {
        device_id,
        blkaddr: 20,
    }
    .encode(&mut idx);
    raw.write(end.next_multiple_of(8), &idx);
    let len = raw.dir_block(
        10,
        &[
            (b".", 0, file_type::DIR),
            (b"..", 0, file_type::DIR),
            (b"f", 1, file_type::REG),
        ],
    );
    raw.inode(0, DIR, LAYOUT_FLAT_PLAIN, len, 10, 2);
    raw.finish()
}

#[test]
fn chunk_device_ids_are_checked_against_the_device_table() {
    let indexes = format::CHUNK_FORMAT_INDEXES;
    // Valid: device 0, and device 1 of one.
    for (extra, id) in [(0, 0), (1, 1), (3, 3)] {
        let (r, _, _) = check_file(&chunk_index_image(extra, id, indexes));
        assert!(r.is_ok(), "{extra} devices, id {id}: {:?}", all(&r));
    }
    // The kernel masks ids to the table size rounded up to a power of two, so these read a
    // device other than the one named (the old checker masked the same way and passed them).
    for (extra, id, masked) in [(0, 1, 0), (1, 3, 1), (2, 6, 2)] {
        let (r, _, _) = check_file(&chunk_index_image(extra, id, indexes));
        let all = all(&r);
        assert!(
            all.iter().any(|f| f.contains(&format!(
                "device id {id} is not in the device table ({extra} extra devices); the kernel \
                 would read device {masked}"
            ))),
            "{extra} devices, id {id}: {all:?}"
        );
    }
    // Chunk formats the kernel refuses (EROFS_CHUNK_FORMAT_ALL is 0x7f; 48-bit we do not read).
    for fmt in [0x80u16, indexes | 0x100, format::CHUNK_FORMAT_48BIT] {
        let (r, _, _) = check_file(&chunk_index_image(0, 0, fmt));
        assert!(
            all(&r)
                .iter()
                .any(|f| f.contains("unsupported chunk format")),
            "format {fmt:#x}: {:?}",
            all(&r)
        );
    }
}

/// One file `f` with the inline xattr `user.foo=bar` and (if `shared`) the shared xattr
/// `security.capability`, under the given name filter.
fn filter_image(
    compat_filter: bool,
    reserved: u8,
    filter: u32,
    shared: bool,
) -> tempfile::NamedTempFile {
    let mut raw = Raw::new(12, MIB);
    if compat_filter {
        raw.sb.feature_compat |= format::FEATURE_COMPAT_XATTR_FILTER;
    }
    raw.sb.xattr_filter_reserved = reserved;
    // The shared xattr area at block 30.
    raw.sb.xattr_blkaddr = 30;
    let mut sx = format::XattrEntry {
        name_len: 10,
        name_index: xattr_index::SECURITY,
        value_size: 4,
    }
    .encode()
    .to_vec();
    sx.extend_from_slice(b"capability\x01\x02\x03\x04");
    raw.write(30 * 4096, &sx);
    let mut body = format::XattrIbodyHeader {
        name_filter: filter,
        shared_count: shared as u8,
    }
    .encode()
    .to_vec();
    if shared {
        body.extend_from_slice(&0u32.to_le_bytes());
    }
    body.extend_from_slice(
        &format::XattrEntry {
            name_len: 3,
            name_index: xattr_index::USER,
            value_size: 3,
        }
        .encode(),
    );
    body.extend_from_slice(b"foobar");
    body.resize(body.len().next_multiple_of(4), 0);
    let icount = format::xattr_icount_for(body.len()).unwrap();
    let end = raw.inode_x(1, REG, LAYOUT_FLAT_PLAIN, 0, 0, 1, icount);
    raw.write(end, &body);
    let len = raw.dir_block(
        10,
        &[
            (b".", 0, file_type::DIR),
            (b"..", 0, file_type::DIR),
            (b"f", 1, file_type::REG),
        ],
    );
    raw.inode(0, DIR, LAYOUT_FLAT_PLAIN, len, 10, 2);
    raw.finish()
}

#[test]
fn xattr_name_filter_must_not_hide_an_inodes_xattrs() {
    let foo = format::xattr_filter_bit(xattr_index::USER, b"foo");
    let cap = format::xattr_filter_bit(xattr_index::SECURITY, b"capability");
    let right = !((1 << foo) | (1 << cap));
    let (r, _, _) = check_file(&filter_image(true, 0, right, true));
    assert!(r.is_ok(), "{:?}", all(&r));
    // Without the feature (or with the reserved byte set) the field means nothing.
    let (r, _, _) = check_file(&filter_image(false, 0, u32::MAX, true));
    assert!(r.is_ok(), "{:?}", all(&r));
    let (r, _, _) = check_file(&filter_image(true, 1, u32::MAX, true));
    assert!(r.is_ok(), "{:?}", all(&r));
    assert!(all(&r).iter().any(|f| f.contains("kernels ignore it")));
    // An inline xattr filtered out, then a shared one.
    for (filter, name, bit) in [
        (right | (1 << foo), "user.foo", foo),
        (right | (1 << cap), "security.capability", cap),
    ] {
        let (r, _, _) = check_file(&filter_image(true, 0, filter, true));
        let all = all(&r);
        assert!(
            all.iter().any(|f| f.contains(&format!(
                "xattr \"{name}\" is marked absent by the inode's name filter ({filter:#010x}, \
                 bit {bit})"
            ))),
            "{all:?}"
        );
    }
}

/// What the finding is about: the kernel really answers ENODATA for a filtered-out xattr
/// that listxattr shows.
#[test]
fn the_kernel_hides_xattrs_the_filter_marks_absent() {
    let foo = format::xattr_filter_bit(xattr_index::USER, b"foo");
    let img = filter_image(true, 0, u32::MAX, false);
    let m = mount_erofs(img.path(), &[]);
    let f = m.path().join("f");
    let mut names = vec![0u8; 256];
    let n = rustix::fs::llistxattr(&f, &mut names).unwrap();
    assert!(names[..n].starts_with(b"user.foo\0"), "{:?}", &names[..n]);
    let mut v = [0u8; 16];
    let e = rustix::fs::lgetxattr(&f, "user.foo", &mut v).unwrap_err();
    assert_eq!(e, rustix::io::Errno::NODATA);
    drop(m);
    // With the right bit clear it is read.
    let img = filter_image(true, 0, !(1 << foo), false);
    let m = mount_erofs(img.path(), &[]);
    let n = rustix::fs::lgetxattr(m.path().join("f"), "user.foo", &mut v).unwrap();
    assert_eq!(&v[..n], b"bar");
}

/// An xattr body that is only a header (i_xattr_icount 1) is refused by the kernel.
#[test]
fn header_only_xattr_bodies_are_reported() {
    let raw = Raw::new(12, MIB);
    let end = raw.inode_x(1, REG, LAYOUT_FLAT_PLAIN, 0, 0, 1, 1);
    raw.write(end, &format::XattrIbodyHeader::default().encode());
    let len = raw.dir_block(
        10,
        &[
            (b".", 0, file_type::DIR),
            (b"..", 0, file_type::DIR),
            (b"f", 1, file_type::REG),
        ],
    );
    raw.inode(0, DIR, LAYOUT_FLAT_PLAIN, len, 10, 2);
    let img = raw.finish();
    let (r, _, _) = check_file(&img);
    assert!(
        all(&r).iter().any(|f| f.contains("holds only its header")),
        "{:?}",
        all(&r)
    );
}

/// mkfs.erofs 1.9 writes name filters: ours agrees with every one of them.
#[test]
fn mkfs_erofs_name_filters_pass() {
    let t = tempfile::tempdir().unwrap();
    let src = t.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let names = [
        "user.foo",
        "user.mime_type",
        "trusted.overlay.opaque",
        "security.test",
        "user.a_much_longer_name_than_sixteen_bytes",
    ];
    for i in 0..names.len() {
        let p = src.join(format!("f{i}"));
        File::create(&p).unwrap().write_all(b"x").unwrap();
        for n in &names[..=i] {
            rustix::fs::setxattr(&p, *n, b"v", rustix::fs::XattrFlags::empty()).unwrap();
        }
    }
    let img = t.path().join("m.erofs");
    run(std::process::Command::new(mkfs_new())
        .args(["--quiet", "-Exattr-name-filter"])
        .arg(&img)
        .arg(&src));
    let report = check_image(File::open(&img).unwrap(), Vec::new());
    let image = erofs_image::Image::open(File::open(&img).unwrap()).unwrap();
    assert_ne!(
        image.superblock().feature_compat & format::FEATURE_COMPAT_XATTR_FILTER,
        0,
        "mkfs.erofs wrote no name filter"
    );
    assert!(report.is_ok(), "{:?}", all(&report));
}

/// Generated images (the fuzz target's generator on pseudo-random bytes): the checker stays
/// within its budget and its cap on every one, accepts every image left as a builder would
/// write it, and the kernel reads the first of those in full.
#[test]
fn generated_images() {
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let (mut clean, mut mounted) = (0, 0);
    let t = tempfile::tempdir().unwrap();
    for round in 0..3000 {
        let bytes: Vec<u8> = (0..2048).map(|_| next() as u8).collect();
        let g = crate::imagegen::image(&mut crate::imagegen::Src::new(&bytes));
        let started = Instant::now();
        let r = check_image(g.image.clone(), Vec::new());
        let took = started.elapsed();
        assert!(took < Duration::from_secs(2), "round {round}: {took:?}");
        assert!(r.findings.len() <= MAX_FINDINGS + 1, "round {round}");
        // The budget is checked before each read; one read is at most an xattr body.
        assert!(r.work <= r.work_budget + (1 << 19), "round {round}");
        if !g.clean {
            continue;
        }
        clean += 1;
        assert!(r.is_ok(), "round {round}: {:?}", all(&r));
        if mounted < 40 {
            mounted += 1;
            let path = t.path().join(format!("g{round}.erofs"));
            std::fs::write(&path, &g.image).unwrap();
            let m = mount_erofs(&path, &[]);
            read_all(m.path());
        }
    }
    eprintln!("{clean} clean images of 3000, {mounted} mounted");
    assert!(clean > 1000, "only {clean} clean images");
}

/// Read every file, link and xattr under `dir`; any error is the kernel refusing an image
/// the checker accepted.
fn read_all(dir: &std::path::Path) {
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let p = e.path();
        let mut names = vec![0u8; 4096];
        let n = rustix::fs::llistxattr(&p, &mut names)
            .unwrap_or_else(|err| panic!("listxattr {}: {err}", p.display()));
        for name in names[..n].split(|&b| b == 0).filter(|n| !n.is_empty()) {
            let name = std::ffi::CStr::from_bytes_with_nul(&[name, b"\0"].concat())
                .unwrap()
                .to_owned();
            let mut v = vec![0u8; 65536];
            // user.* on symlinks and devices is listed but not readable (a VFS rule).
            match rustix::fs::lgetxattr(&p, name.as_c_str(), &mut v) {
                Ok(_) => {}
                Err(rustix::io::Errno::NODATA | rustix::io::Errno::PERM)
                    if !e.file_type().unwrap().is_file() && !e.file_type().unwrap().is_dir() => {}
                Err(err) => panic!("getxattr {} {name:?}: {err}", p.display()),
            }
        }
        let ft = e.file_type().unwrap();
        if ft.is_dir() {
            read_all(&p);
        } else if ft.is_file() {
            std::fs::read(&p).unwrap_or_else(|err| panic!("read {}: {err}", p.display()));
        } else if ft.is_symlink() {
            std::fs::read_link(&p).unwrap();
        }
    }
}
