//! A structural, human-readable dump of an image: the superblock, then one line per inode in
//! walk order. Used by `erofs-snapshotter dump` and by tests that compare layouts as text.

use std::fmt::Write as _;

use crate::error::Result;
use crate::format;
use crate::reader::{Image, Inode};

fn layout_name(l: u8) -> &'static str {
    match l {
        format::LAYOUT_FLAT_PLAIN => "plain",
        format::LAYOUT_FLAT_INLINE => "inline",
        format::LAYOUT_CHUNK_BASED => "chunked",
        _ => "other",
    }
}

/// Describe one inode on a line.
pub fn inode_line(path: &[u8], ino: &Inode) -> String {
    let (ma, mi) = ino.rdev();
    let mut s = format!(
        "{:>8} {:>7o} {:>6} {:>6} {:>6} {:>12} {}.{:09} {:<7} {}",
        ino.nid,
        ino.mode(),
        ino.raw.nlink,
        ino.raw.uid,
        ino.raw.gid,
        ino.size(),
        ino.mtime,
        ino.mtime_nsec,
        layout_name(ino.layout),
        if path.is_empty() {
            "/".into()
        } else {
            format!("/{}", String::from_utf8_lossy(path))
        },
    );
    if ma != 0 || mi != 0 || ino.is_whiteout() {
        let _ = write!(s, " [dev {ma}:{mi}]");
    }
    s
}

/// Dump the whole image.
pub fn dump(img: &Image) -> Result<String> {
    let sb = img.superblock();
    let mut out = String::new();
    let _ = writeln!(out, "block size:     {}", img.block_size());
    let _ = writeln!(out, "blocks:         {}", sb.blocks);
    let _ = writeln!(out, "inodes:         {}", sb.inos);
    let _ = writeln!(out, "root nid:       {}", sb.root_nid);
    let _ = writeln!(out, "meta blkaddr:   {}", sb.meta_blkaddr);
    let _ = writeln!(out, "epoch:          {}.{:09}", sb.epoch, sb.fixed_nsec);
    let _ = writeln!(
        out,
        "features:       compat {:#x} incompat {:#x}",
        sb.feature_compat, sb.feature_incompat
    );
    let _ = writeln!(out, "uuid:           {}", hex::encode(sb.uuid));
    for (i, d) in img.device_slots().iter().enumerate() {
        let _ = writeln!(
            out,
            "device {}:       {} blocks at unified block {}",
            i + 1,
            d.blocks,
            d.uniaddr
        );
    }
    let _ = writeln!(
        out,
        "{:>8} {:>7} {:>6} {:>6} {:>6} {:>12} {:<20} {:<7} path",
        "nid", "mode", "nlink", "uid", "gid", "size", "mtime", "layout"
    );
    img.walk(|path, ino| {
        out.push_str(&inode_line(path, ino));
        out.push('\n');
        for (k, v) in img.xattrs(ino)? {
            let _ = writeln!(
                out,
                "{:>10}xattr {}={}",
                "",
                String::from_utf8_lossy(&k),
                escape(&v)
            );
        }
        Ok(())
    })?;
    Ok(out)
}

fn escape(v: &[u8]) -> String {
    let mut s = String::from("\"");
    for &b in v {
        if b.is_ascii_graphic() || b == b' ' {
            s.push(b as char);
        } else {
            let _ = write!(s, "\\x{b:02x}");
        }
    }
    s.push('"');
    s
}
