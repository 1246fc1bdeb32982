//! The kernel's mount table (`/proc/self/mountinfo`).

use std::path::{Path, PathBuf};

/// One mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// Mount point.
    pub target: PathBuf,
    /// Filesystem type.
    pub fstype: String,
    /// Mount source.
    pub source: String,
}

fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parse mountinfo text.
pub fn parse(text: &str) -> Vec<MountEntry> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut parts = line.split(" - ");
        let (Some(pre), Some(post)) = (parts.next(), parts.next()) else {
            continue;
        };
        let pre: Vec<&str> = pre.split(' ').collect();
        let post: Vec<&str> = post.split(' ').collect();
        if pre.len() < 5 || post.len() < 2 {
            continue;
        }
        out.push(MountEntry {
            target: PathBuf::from(unescape(pre[4])),
            fstype: post[0].to_string(),
            source: unescape(post[1]),
        });
    }
    out
}

/// The current mounts of this process's namespace.
pub fn current() -> std::io::Result<Vec<MountEntry>> {
    Ok(parse(&std::fs::read_to_string("/proc/self/mountinfo")?))
}

/// Mounts at or below `dir`, deepest first (the order to unmount them in).
pub fn under(dir: &Path) -> std::io::Result<Vec<MountEntry>> {
    let mut v: Vec<MountEntry> = current()?
        .into_iter()
        .filter(|m| m.target.starts_with(dir))
        .collect();
    v.sort_by_key(|m| std::cmp::Reverse(m.target.components().count()));
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo() {
        let t = "36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
                 40 30 0:50 / /var/lib/x/snapshots/3/fs ro,relatime shared:5 - erofs /var/lib/x/snapshots/3/layer.erofs ro\n";
        let m = parse(t);
        assert_eq!(m[0].target, PathBuf::from("/mnt/with space"));
        assert_eq!(m[1].fstype, "erofs");
        assert_eq!(m[1].source, "/var/lib/x/snapshots/3/layer.erofs");
    }
}
