//! Mount table helpers: a `/proc/PID/mountinfo` parser and recursive unmount of
//! everything below a directory.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use rustix::mount::{UnmountFlags, unmount};

/// One line of `/proc/PID/mountinfo` (see proc(5)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountInfo {
    /// Unique mount id.
    pub id: u32,
    /// Id of the parent mount.
    pub parent_id: u32,
    /// `major:minor` of the filesystem's device.
    pub device: String,
    /// Root of the mount within its filesystem.
    pub root: PathBuf,
    /// Mount point, relative to the reading process's root.
    pub mount_point: PathBuf,
    /// Per-mount options (`rw,relatime`, ...).
    pub mount_options: Vec<String>,
    /// Optional fields such as `shared:1` or `master:2`.
    pub optional_fields: Vec<String>,
    /// Filesystem type (`overlay`, `erofs`, `ext4`, ...).
    pub fs_type: String,
    /// Mount source (`overlay`, `/dev/loop0`, a file for file-backed EROFS, ...).
    pub source: String,
    /// Per-superblock options: for overlay these hold `lowerdir=`, `upperdir=`, ...
    pub super_options: Vec<String>,
}

impl MountInfo {
    /// Whether the mount or superblock options contain exactly `opt`.
    pub fn has_option(&self, opt: &str) -> bool {
        self.mount_options.iter().any(|o| o == opt) || self.super_options.iter().any(|o| o == opt)
    }

    /// Value of a `key=value` superblock option (first match).
    pub fn super_option(&self, key: &str) -> Option<&str> {
        self.super_options
            .iter()
            .find_map(|o| o.strip_prefix(key)?.strip_prefix('='))
    }

    /// Whether the mount is shared (has a `shared:N` optional field).
    pub fn is_shared(&self) -> bool {
        self.optional_fields
            .iter()
            .any(|f| f.starts_with("shared:"))
    }
}

/// Decodes the octal escapes (`\040` for space, `\011`, `\012`, `\134`) the
/// kernel uses in mountinfo fields.
fn unescape(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') as u32 * 64
                + (b[i + 2] - b'0') as u32 * 8
                + (b[i + 3] - b'0') as u32;
            out.push(v as u8);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn split_options(s: &str) -> Vec<String> {
    if s.is_empty() {
        Vec::new()
    } else {
        s.split(',').map(unescape).collect()
    }
}

/// Parses one mountinfo line.
pub fn parse_mountinfo_line(line: &str) -> Result<MountInfo> {
    let fields: Vec<&str> = line.split(' ').collect();
    let sep = fields
        .iter()
        .position(|f| *f == "-")
        .with_context(|| format!("no ' - ' separator in mountinfo line {line:?}"))?;
    if sep < 6 || fields.len() < sep + 3 {
        bail!("short mountinfo line {line:?}");
    }
    Ok(MountInfo {
        id: fields[0].parse().context("mount id")?,
        parent_id: fields[1].parse().context("parent id")?,
        device: fields[2].to_owned(),
        root: PathBuf::from(unescape(fields[3])),
        mount_point: PathBuf::from(unescape(fields[4])),
        mount_options: split_options(fields[5]),
        optional_fields: fields[6..sep].iter().map(|s| s.to_string()).collect(),
        fs_type: unescape(fields[sep + 1]),
        source: unescape(fields[sep + 2]),
        super_options: fields
            .get(sep + 3)
            .map(|s| split_options(s))
            .unwrap_or_default(),
    })
}

/// Parses the whole text of a mountinfo file (blank lines are skipped).
pub fn parse_mountinfo(text: &str) -> Result<Vec<MountInfo>> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(parse_mountinfo_line)
        .collect()
}

/// Reads and parses a mountinfo file such as `/proc/self/mountinfo` or
/// `/proc/PID/mountinfo` (the mount table of PID's mount namespace).
pub fn read_mountinfo(path: &Path) -> Result<Vec<MountInfo>> {
    let text = fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    parse_mountinfo(&text)
}

/// The calling process's mount table.
pub fn self_mounts() -> Result<Vec<MountInfo>> {
    read_mountinfo(Path::new("/proc/self/mountinfo"))
}

/// Mounts of `table` at or below `base` (compared by path components).
pub fn mounts_under<'a>(table: &'a [MountInfo], base: &Path) -> Vec<&'a MountInfo> {
    table
        .iter()
        .filter(|m| m.mount_point.starts_with(base))
        .collect()
}

/// Mounts of the calling process's namespace at or below `dir`.
pub fn self_mounts_under(dir: &Path) -> Result<Vec<MountInfo>> {
    Ok(self_mounts()?
        .into_iter()
        .filter(|m| m.mount_point.starts_with(dir))
        .collect())
}

/// Unmounts (with `MNT_DETACH`) every mount of the calling process's namespace
/// at or below `base`, deepest first and, on one mount point, the most recent
/// first; repeats until none are left (up to 100 passes). Returns how many
/// unmounts succeeded.
pub fn unmount_all_under(base: &Path) -> Result<usize> {
    let base = fs::canonicalize(base).unwrap_or_else(|_| base.to_path_buf());
    let mut done = 0;
    for _ in 0..100 {
        let table = self_mounts()?;
        let mut victims: Vec<&MountInfo> = mounts_under(&table, &base);
        if victims.is_empty() {
            return Ok(done);
        }
        victims.sort_by(|a, b| {
            let da = a.mount_point.components().count();
            let db = b.mount_point.components().count();
            db.cmp(&da).then(b.id.cmp(&a.id))
        });
        let mut progressed = false;
        for m in victims {
            if unmount(&m.mount_point, UnmountFlags::DETACH).is_ok() {
                done += 1;
                progressed = true;
            }
        }
        if !progressed {
            let left: Vec<_> = mounts_under(&self_mounts()?, &base)
                .iter()
                .map(|m| m.mount_point.display().to_string())
                .collect();
            bail!("cannot unmount under {}: {left:?}", base.display());
        }
    }
    bail!("mounts under {} keep coming back", base.display())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_overlay_line() {
        let line = "210 27 0:75 / /tmp/a\\040b/rootfs rw,relatime shared:9 master:1 - overlay overlay rw,lowerdir=/l1:/l2,upperdir=/u,workdir=/w";
        let m = parse_mountinfo_line(line).unwrap();
        assert_eq!(m.id, 210);
        assert_eq!(m.parent_id, 27);
        assert_eq!(m.mount_point, Path::new("/tmp/a b/rootfs"));
        assert_eq!(m.optional_fields, vec!["shared:9", "master:1"]);
        assert!(m.is_shared());
        assert_eq!(m.fs_type, "overlay");
        assert_eq!(m.source, "overlay");
        assert_eq!(m.super_option("lowerdir"), Some("/l1:/l2"));
        assert!(m.has_option("relatime"));
    }

    #[test]
    fn parses_line_without_optional_fields() {
        let line = "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard";
        let m = parse_mountinfo_line(line).unwrap();
        assert!(m.optional_fields.is_empty());
        assert_eq!(m.source, "/dev/vda");
        assert!(!m.is_shared());
    }

    #[test]
    fn parses_own_table() {
        let table = self_mounts().unwrap();
        assert!(table.iter().any(|m| m.mount_point == Path::new("/")));
    }
}
