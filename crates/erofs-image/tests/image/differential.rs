//! Our tar reader against GNU tar on a generated corpus: what each accepts or refuses, and for
//! what both accept, the same members (type, mode, owner, size or device, mtime, path, link
//! target) and the same file contents.
//!
//! Two generators, both seeded so a failure replays (the seed and the archive are kept):
//! - trees written by GNU tar itself in each of its formats (gnu, oldgnu, posix, ustar, v7),
//!   with long names and link targets, big ids and times, devices, FIFOs, hardlinks and sparse
//!   files, so every dialect it writes is read the way it reads it;
//! - archives written header by header, mixing name encodings (plain, ustar prefix, GNU `L`/`K`,
//!   PAX), number encodings (octal with every terminator, base-256, PAX records), magics, and
//!   corruptions (checksums, digits, truncation, PAX record lengths, missing end markers).
//!
//! Deliberate differences, kept out of the generators and tested where they are enforced:
//! absolute paths and `..` components (GNU tar lists them, we refuse them), members of unknown
//! types (GNU tar lists them as files, we skip them), sizes past 2^63-1 (bombs.rs). Two more
//! kinds of disagreement are allowed on damaged archives only: we refuse what GNU tar reads
//! past (see `compare`). Never allowed: both read it and see different members or bytes, or
//! we read what GNU tar refuses, or we refuse an undamaged archive.
//!
//! `TAR_DIFFERENTIAL_SEEDS=N` runs more cases (`scripts/fuzz` documents the long run).

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use erofs_image::tar::{EntryKind, TarReader};
use sha2::{Digest, Sha256};

use crate::common::tar_checksum;

/// One listed member, as GNU tar's `tv --numeric-owner --full-time` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Member {
    kind: char,
    mode: u32,
    uid: u64,
    gid: u64,
    size: String,
    mtime: i64,
    path: String,
    link: String,
}

#[derive(Debug, PartialEq, Eq)]
struct Listing {
    members: Vec<Member>,
    /// sha256 of each regular file's content, by member index among regular files.
    contents: Vec<(String, String)>,
}

/// The same text normalisation on both sides: GNU tar prints names as stored.
fn norm(p: &str) -> String {
    p.split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .collect::<Vec<_>>()
        .join("/")
}

fn ours(tar: &[u8]) -> Result<Listing, String> {
    let mut r = TarReader::new(tar);
    let mut members = Vec::new();
    let mut contents = Vec::new();
    while let Some(e) = r.next_entry().map_err(|e| e.to_string())? {
        let kind = match e.kind {
            EntryKind::Regular => '-',
            EntryKind::Hardlink => 'h',
            EntryKind::Symlink => 'l',
            EntryKind::Char => 'c',
            EntryKind::Block => 'b',
            EntryKind::Directory => 'd',
            EntryKind::Fifo => 'p',
        };
        let path = String::from_utf8_lossy(&e.path).into_owned();
        let size = match e.kind {
            EntryKind::Char | EntryKind::Block => format!("{},{}", e.devmajor, e.devminor),
            EntryKind::Regular => e.file_size.to_string(),
            _ => "0".into(),
        };
        if e.kind == EntryKind::Regular {
            let mut data = vec![0u8; e.size as usize];
            let n = r.read_data(&mut data).map_err(|e| e.to_string())?;
            if n != data.len() {
                return Err("short data".into());
            }
            let full = match &e.sparse {
                None => data,
                Some(map) => {
                    let mut out = vec![0u8; e.file_size as usize];
                    let mut at = 0usize;
                    for &(off, len) in map {
                        let (off, len) = (off as usize, len as usize);
                        out[off..off + len].copy_from_slice(&data[at..at + len]);
                        at += len;
                    }
                    out
                }
            };
            contents.push((norm(&path), hex::encode(Sha256::digest(&full))));
        }
        members.push(Member {
            kind,
            mode: e.mode & 0o7777,
            uid: e.uid as u64,
            gid: e.gid as u64,
            size,
            // GNU tar lists times truncated toward zero (-99.5 as -99), we keep the floor
            // and the nanoseconds apart.
            mtime: if e.mtime < 0 && e.mtime_nsec > 0 {
                e.mtime + 1
            } else {
                e.mtime
            },
            path: norm(&path),
            link: if e.kind == EntryKind::Hardlink {
                norm(&String::from_utf8_lossy(&e.link))
            } else {
                String::from_utf8_lossy(&e.link).into_owned()
            },
        });
    }
    Ok(Listing { members, contents })
}

fn gnu_tar() -> Command {
    let mut c = Command::new("tar");
    c.env("TZ", "UTC").env("LC_ALL", "C");
    c
}

fn perms(s: &str) -> u32 {
    let b = s.as_bytes();
    let mut m = 0u32;
    for (i, &c) in b[1..10].iter().enumerate() {
        let bit = 1 << (8 - i);
        match c {
            b'-' | b'S' | b'T' => {}
            _ => m |= bit,
        }
    }
    if matches!(b[3], b's' | b'S') {
        m |= 0o4000;
    }
    if matches!(b[6], b's' | b'S') {
        m |= 0o2000;
    }
    if matches!(b[9], b't' | b'T') {
        m |= 0o1000;
    }
    m
}

/// Days since the epoch of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

fn parse_time(date: &str, time: &str) -> Option<i64> {
    let mut d = date.rsplitn(3, '-');
    let (day, mon, year) = (d.next()?, d.next()?, d.next()?);
    let t: Vec<&str> = time.split('.').next()?.split(':').collect();
    let days = days_from_civil(year.parse().ok()?, mon.parse().ok()?, day.parse().ok()?);
    Some(
        days * 86400
            + t[0].parse::<i64>().ok()? * 3600
            + t[1].parse::<i64>().ok()? * 60
            + t[2].parse::<i64>().ok()?,
    )
}

fn gnu(tar: &Path) -> Result<Listing, String> {
    let out = gnu_tar()
        .args(["-tvf"])
        .arg(tar)
        .args(["--numeric-owner", "--full-time", "--quoting-style=literal"])
        .output()
        .expect("GNU tar runs");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let mut members = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let (mode, owner, size, date, time) = (words[0], words[1], words[2], words[3], words[4]);
        // The name starts after the time column (posix archives pad fractional times).
        let after_time = line.find(time).unwrap() + time.len();
        let rest = line[after_time..].trim_start();
        let kind = mode.chars().next().unwrap();
        let (path, link) = match kind {
            'l' => rest.split_once(" -> ").unwrap(),
            'h' => rest.split_once(" link to ").unwrap(),
            _ => (rest, ""),
        };
        let (uid, gid) = owner.split_once('/').unwrap();
        let mtime = match parse_time(date, time) {
            Some(t) => t,
            None => return Err(format!("unparsed time in {line:?}")),
        };
        members.push(Member {
            kind,
            mode: perms(mode),
            uid: uid.parse().unwrap(),
            gid: gid.parse().unwrap(),
            size: size.to_string(),
            mtime,
            path: norm(path),
            link: if kind == 'h' {
                norm(link)
            } else {
                link.to_string()
            },
        });
    }
    // Contents: GNU tar hands each regular file to a command, which hashes it.
    let out = gnu_tar()
        .arg("-xf")
        .arg(tar)
        .arg("--to-command=printf '%s\\t' \"$TAR_FILENAME\"; sha256sum")
        .output()
        .expect("GNU tar runs");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let contents = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let (name, hash) = l.split_once('\t').unwrap();
            (
                norm(name),
                hash.split_whitespace().next().unwrap().to_string(),
            )
        })
        .collect();
    Ok(Listing { members, contents })
}

/// Run both readers on `tar`; on disagreement keep the archive and say how to replay.
fn compare(tar: &[u8], what: &str, keep: &Path) -> (bool, bool) {
    let damaged = !what.ends_with("damage none");
    let file = keep.join("case.tar");
    fs::write(&file, tar).unwrap();
    let g = gnu(&file);
    let o = ours(tar);
    let agree = match (&g, &o) {
        (Ok(g), Ok(o)) => g == o,
        (Err(_), Err(_)) => true,
        // We refuse, GNU tar goes on: allowed, counted by the caller. Damage does this (a
        // partial block at the end, which GNU tar takes as the end of the archive; a NUL in
        // a name, where GNU tar cuts the name; a broken header field that a PAX record
        // overrides): a layer that is damaged must not unpack as some other layer.
        (Ok(_), Err(_)) => damaged,
        _ => false,
    };
    if !agree {
        let saved = std::env::temp_dir().join(format!(
            "tar-differential-{}.tar",
            what.replace(|c: char| !c.is_ascii_alphanumeric(), "-")
        ));
        fs::copy(&file, &saved).unwrap();
        let detail = match (&g, &o) {
            (Ok(g), Ok(o)) => first_difference(g, o),
            _ => format!("GNU tar: {g:?}\nours: {o:?}"),
        };
        panic!(
            "{what}: GNU tar and our reader disagree (archive kept at {})\n{detail}",
            saved.display()
        );
    }
    (g.is_ok(), o.is_ok())
}

fn first_difference(g: &Listing, o: &Listing) -> String {
    for (i, (a, b)) in g.members.iter().zip(&o.members).enumerate() {
        if a != b {
            return format!("member {i}:\nGNU tar: {a:?}\nours:    {b:?}");
        }
    }
    if g.members.len() != o.members.len() {
        return format!(
            "GNU tar lists {} members, we list {}: GNU {:?} ours {:?}",
            g.members.len(),
            o.members.len(),
            g.members.get(o.members.len()),
            o.members.get(g.members.len())
        );
    }
    for (a, b) in g.contents.iter().zip(&o.contents) {
        if a != b {
            return format!("content:\nGNU tar: {a:?}\nours:    {b:?}");
        }
    }
    format!(
        "GNU tar hashed {} files, we {}",
        g.contents.len(),
        o.contents.len()
    )
}

fn name(rng: &mut fastrand::Rng, len: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789._-+=,@~";
    let mut s: String = (0..len)
        .map(|_| ALPHABET[rng.usize(..ALPHABET.len())] as char)
        .collect();
    if s == "." || s == ".." || s.starts_with('-') {
        s.insert(0, 'n');
    }
    s
}

/// A random tree under `root`: long and deep names, every file type, hardlinks, sparse files,
/// owners and times that need GNU's or PAX's wider fields.
fn random_tree(rng: &mut fastrand::Rng, root: &Path) {
    let mut dirs = vec![root.to_path_buf()];
    let mut files = Vec::new();
    let ids = [0u32, 1000, 65534, 2_097_151, 2_097_152, 3_000_000];
    let times = [
        -100i64,
        0,
        1_000_000_000,
        8_589_934_591,
        8_589_934_592,
        32_000_000_000,
    ];
    for _ in 0..rng.usize(5..40) {
        let parent = dirs[rng.usize(..dirs.len())].clone();
        let len = if rng.u8(..4) == 0 {
            rng.usize(60..200)
        } else {
            rng.usize(1..12)
        };
        let p = parent.join(name(rng, len));
        if p.exists() || p.as_os_str().len() - root.as_os_str().len() > 900 {
            continue;
        }
        match rng.u8(..10) {
            0..=1 => {
                fs::create_dir(&p).unwrap();
                dirs.push(p.clone());
            }
            2..=5 => {
                let n = [0, 1, 511, 512, 513, 4096, 70_000][rng.usize(..7)];
                let data: Vec<u8> = (0..n).map(|_| rng.u8(..)).collect();
                fs::write(&p, data).unwrap();
                if rng.u8(..6) == 0 {
                    // Sparse: a hole, a little data, a hole at the end.
                    let f = fs::OpenOptions::new().write(true).open(&p).unwrap();
                    use std::os::unix::fs::FileExt;
                    f.write_all_at(b"data", 1 << 20).unwrap();
                    f.set_len((1 << 20) + 65536 * rng.u64(0..3)).unwrap();
                }
                files.push(p.clone());
            }
            6 => {
                let tlen = if rng.bool() {
                    rng.usize(90..250)
                } else {
                    rng.usize(1..20)
                };
                std::os::unix::fs::symlink(name(rng, tlen), &p).unwrap();
            }
            7 if !files.is_empty() => {
                fs::hard_link(&files[rng.usize(..files.len())], &p).unwrap();
            }
            8 => {
                rustix::fs::mknodat(
                    rustix::fs::CWD,
                    &p,
                    rustix::fs::FileType::Fifo,
                    rustix::fs::Mode::from_raw_mode(0o644),
                    0,
                )
                .unwrap();
            }
            _ => {
                let (kind, major, minor) = if rng.bool() {
                    (
                        rustix::fs::FileType::CharacterDevice,
                        rng.u32(0..300),
                        rng.u32(0..70_000),
                    )
                } else {
                    (
                        rustix::fs::FileType::BlockDevice,
                        rng.u32(0..300),
                        rng.u32(0..300),
                    )
                };
                rustix::fs::mknodat(
                    rustix::fs::CWD,
                    &p,
                    kind,
                    rustix::fs::Mode::from_raw_mode(0o600),
                    rustix::fs::makedev(major, minor),
                )
                .unwrap();
            }
        }
        let (uid, gid) = (ids[rng.usize(..ids.len())], ids[rng.usize(..ids.len())]);
        rustix::fs::chownat(
            rustix::fs::CWD,
            &p,
            Some(rustix::fs::Uid::from_raw(uid)),
            Some(rustix::fs::Gid::from_raw(gid)),
            rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        )
        .unwrap();
        if !p.is_symlink() {
            // After chown, which clears set-id bits.
            let mode = rng.u32(0..0o10000) | 0o400;
            let mode = if p.is_dir() { mode | 0o700 } else { mode };
            fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
        }
        let t = times[rng.usize(..times.len())];
        rustix::fs::utimensat(
            rustix::fs::CWD,
            &p,
            &rustix::fs::Timestamps {
                last_access: rustix::fs::Timespec {
                    tv_sec: t,
                    tv_nsec: 0,
                },
                last_modification: rustix::fs::Timespec {
                    tv_sec: t,
                    tv_nsec: rng.i64(0..1_000_000_000),
                },
            },
            rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        )
        .unwrap();
    }
}

/// Every dialect GNU tar writes, read by both.
#[test]
fn gnu_written_dialects_read_alike() {
    let seeds: u64 = std::env::var("TAR_DIFFERENTIAL_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12);
    let mut accepted = 0;
    for seed in 0..seeds {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        fs::create_dir(&src).unwrap();
        let mut rng = fastrand::Rng::with_seed(seed);
        random_tree(&mut rng, &src);
        for format in ["gnu", "oldgnu", "posix", "ustar", "v7"] {
            let tar = t.path().join(format!("{format}.tar"));
            let mut c = gnu_tar();
            c.arg(format!("--format={format}"));
            if matches!(format, "gnu" | "oldgnu" | "posix") {
                c.arg("--sparse");
            }
            // ustar and v7 cannot hold everything: GNU tar leaves those members out and says
            // so; what it wrote is still an archive both must read alike.
            let _ = c
                .arg("-cf")
                .arg(&tar)
                .arg("-C")
                .arg(&src)
                .arg(".")
                .output()
                .unwrap();
            let bytes = fs::read(&tar).unwrap();
            let (g, o) = compare(&bytes, &format!("seed {seed} format {format}"), t.path());
            assert!(
                g && o,
                "seed {seed} format {format}: GNU tar's own archive refused"
            );
            accepted += 1;
        }
    }
    eprintln!("{accepted} archives written by GNU tar read alike");
}

/// A numeric field of `width` bytes in one of the encodings readers meet.
fn number(rng: &mut fastrand::Rng, v: u64, width: usize) -> Vec<u8> {
    let digits = width - 1;
    let fits = v < 8u64.saturating_pow(digits as u32);
    match rng.u8(..5) {
        0 | 1 if fits => {
            let mut f = format!("{v:0digits$o}").into_bytes();
            f.push(if rng.bool() { 0 } else { b' ' });
            f
        }
        2 if fits => {
            // Leading spaces and a NUL terminator, as some old writers do.
            let s = format!("{v:o}");
            let mut f = vec![b' '; digits - s.len()];
            f.extend_from_slice(s.as_bytes());
            f.push(0);
            f
        }
        3 if fits && digits > format!("{v:o}").len() => {
            // Short, NUL-padded.
            let mut f = format!("{v:o}").into_bytes();
            f.resize(width, 0);
            f
        }
        _ => {
            // Base-256: high bit set, big-endian.
            let mut f = vec![0u8; width];
            f[0] = 0x80;
            let b = v.to_be_bytes();
            f[width - 8..].copy_from_slice(&b);
            f
        }
    }
}

fn pax_record(key: &str, value: &[u8]) -> Vec<u8> {
    let body = format!(" {key}=").into_bytes();
    let mut n = body.len() + value.len() + 2;
    loop {
        let len = n.to_string().len() + body.len() + value.len() + 1;
        if len == n {
            break;
        }
        n = len;
    }
    let mut r = n.to_string().into_bytes();
    r.extend_from_slice(&body);
    r.extend_from_slice(value);
    r.push(b'\n');
    r
}

struct Header([u8; 512]);

impl Header {
    fn new(magic: u8) -> Self {
        let mut h = [0u8; 512];
        match magic {
            0 => {
                h[257..263].copy_from_slice(b"ustar\0");
                h[263..265].copy_from_slice(b"00");
            }
            1 => h[257..265].copy_from_slice(b"ustar  \0"),
            _ => {}
        }
        Header(h)
    }
    fn put(&mut self, at: usize, b: &[u8]) {
        self.0[at..at + b.len()].copy_from_slice(b);
    }
    fn is_ustar(&self) -> bool {
        &self.0[257..263] == b"ustar\0"
    }
}

fn pad(out: &mut Vec<u8>) {
    out.resize(out.len().next_multiple_of(512), 0);
}

/// An extension member (`L`, `K`, `x`) carrying `data`.
fn extension(rng: &mut fastrand::Rng, out: &mut Vec<u8>, flag: u8, data: &[u8], magic: u8) {
    let mut h = Header::new(magic);
    h.put(0, b"././@LongLink");
    h.put(100, &number(rng, 0o644, 8));
    h.put(124, &number(rng, data.len() as u64, 12));
    h.0[156] = flag;
    tar_checksum(&mut h.0);
    out.extend_from_slice(&h.0);
    out.extend_from_slice(data);
    pad(out);
}

/// One hand-written member; `paths` are earlier regular files (hardlink targets).
fn member(rng: &mut fastrand::Rng, out: &mut Vec<u8>, paths: &mut Vec<String>) {
    let magic = rng.u8(..3);
    let mut h = Header::new(magic);
    let depth = rng.usize(1..4);
    let path: String = (0..depth)
        .map(|_| {
            let len = if rng.u8(..3) == 0 {
                rng.usize(40..120)
            } else {
                rng.usize(1..10)
            };
            name(rng, len)
        })
        .collect::<Vec<_>>()
        .join("/");
    let flag = [b'0', 0, b'5', b'2', b'1', b'3', b'4', b'6'][rng.usize(..8)];
    let flag = if flag == b'1' && paths.is_empty() {
        b'0'
    } else {
        flag
    };
    let link = match flag {
        b'2' => {
            let len = if rng.bool() {
                rng.usize(1..20)
            } else {
                rng.usize(100..180)
            };
            name(rng, len)
        }
        b'1' => paths[rng.usize(..paths.len())].clone(),
        _ => String::new(),
    };
    let size = if matches!(flag, b'0' | 0) {
        [0u64, 1, 511, 512, 1000][rng.usize(..5)]
    } else {
        0
    };
    let uid = [0u64, 1000, 2_097_152, 4_000_000_000][rng.usize(..4)];
    let mtime = [0u64, 1_600_000_000, 8_589_934_592][rng.usize(..3)];
    let mut pax = Vec::new();

    // The name: plain, ustar prefix, GNU long name, or PAX.
    let stored_name = match rng.u8(..4) {
        _ if path.len() < 100 && rng.bool() => path.clone(),
        0 if h.is_ustar() && path.len() > 100 => match path[..path.len() - 1].rfind('/') {
            Some(i) if i <= 155 && path.len() - i - 1 < 100 => {
                h.put(345, &path.as_bytes()[..i]);
                path[i + 1..].to_string()
            }
            _ => {
                pax.extend(pax_record("path", path.as_bytes()));
                "pax-name".into()
            }
        },
        1 => {
            extension(rng, out, b'L', format!("{path}\0").as_bytes(), magic);
            path[..path.len().min(99)].to_string()
        }
        _ => {
            pax.extend(pax_record("path", path.as_bytes()));
            "pax-name".into()
        }
    };
    if link.len() >= 100 {
        if rng.bool() {
            extension(rng, out, b'K', format!("{link}\0").as_bytes(), magic);
        } else {
            pax.extend(pax_record("linkpath", link.as_bytes()));
        }
    } else {
        h.put(157, link.as_bytes());
    }
    if rng.u8(..4) == 0 {
        pax.extend(pax_record("uid", uid.to_string().as_bytes()));
        h.put(108, &number(rng, 0, 8));
    } else {
        h.put(108, &number(rng, uid, 8));
    }
    if rng.u8(..4) == 0 {
        pax.extend(pax_record("mtime", format!("{mtime}.25").as_bytes()));
        h.put(136, &number(rng, 0, 12));
    } else {
        h.put(136, &number(rng, mtime, 12));
    }
    if rng.u8(..5) == 0 {
        pax.extend(pax_record("size", size.to_string().as_bytes()));
        h.put(124, &number(rng, 0, 12));
    } else {
        h.put(124, &number(rng, size, 12));
    }
    if !pax.is_empty() {
        extension(rng, out, b'x', &pax, magic);
    }
    h.put(0, stored_name.as_bytes());
    h.put(100, &{
        let v = rng.u64(0..0o10000);
        number(rng, v, 8)
    });
    h.put(116, &{
        let v = rng.u64(0..70_000);
        number(rng, v, 8)
    });
    h.0[156] = flag;
    if matches!(flag, b'3' | b'4') {
        h.put(329, &{
            let v = rng.u64(0..300);
            number(rng, v, 8)
        });
        h.put(337, &{
            let v = rng.u64(0..300);
            number(rng, v, 8)
        });
    }
    tar_checksum(&mut h.0);
    out.extend_from_slice(&h.0);
    let data: Vec<u8> = (0..size).map(|_| rng.u8(..)).collect();
    out.extend_from_slice(&data);
    pad(out);
    if matches!(flag, b'0' | 0) {
        paths.push(path);
    }
}

/// Break an archive the ways real damage and hostile writers do.
fn corrupt(rng: &mut fastrand::Rng, tar: &mut Vec<u8>) -> &'static str {
    let blocks = tar.len() / 512;
    let b = rng.usize(..blocks.max(1)) * 512;
    match rng.u8(..6) {
        0 => {
            tar[b + 148] ^= 0x01;
            "checksum"
        }
        1 => {
            // A non-octal digit in the size field of a header, checksum fixed up.
            let mut h: [u8; 512] = tar[b..b + 512].try_into().unwrap();
            if h[124] & 0x80 == 0 && h.iter().any(|&c| c != 0) {
                h[125] = b'9';
                tar_checksum(&mut h);
                tar[b..b + 512].copy_from_slice(&h);
            }
            "size digit"
        }
        2 => {
            let cut = rng.usize(..tar.len());
            tar.truncate(cut);
            "truncated"
        }
        3 => {
            // Drop the end-of-archive marker.
            while tar.len() >= 512 && tar[tar.len() - 512..].iter().all(|&c| c == 0) {
                tar.truncate(tar.len() - 512);
            }
            "no end marker"
        }
        4 => {
            // A PAX record whose length is off by one.
            let hay = String::from_utf8_lossy(tar).into_owned();
            if let Some(i) = hay.find(" path=") {
                let start = hay[..i]
                    .rfind(|c: char| !c.is_ascii_digit())
                    .map_or(0, |k| k + 1);
                if start < i && tar[i - 1].is_ascii_digit() {
                    tar[i - 1] = if tar[i - 1] == b'9' {
                        b'0'
                    } else {
                        tar[i - 1] + 1
                    };
                }
            }
            "pax length"
        }
        _ => "none",
    }
}

/// Archives written header by header, whole and damaged.
#[test]
fn handwritten_headers_read_alike() {
    let seeds: u64 = std::env::var("TAR_DIFFERENTIAL_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map(|n: u64| n * 40)
        .unwrap_or(400);
    let t = tempfile::tempdir().unwrap();
    let mut counts: BTreeMap<(&str, bool), u32> = BTreeMap::new();
    let mut stricter = 0u32;
    for seed in 0..seeds {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut tar = Vec::new();
        let mut paths = Vec::new();
        for _ in 0..rng.usize(1..8) {
            member(&mut rng, &mut tar, &mut paths);
        }
        tar.extend_from_slice(&[0u8; 1024]);
        let damage = if rng.bool() {
            corrupt(&mut rng, &mut tar)
        } else {
            "none"
        };
        let (ok, ours_ok) = compare(&tar, &format!("seed {seed} damage {damage}"), t.path());
        *counts.entry((damage, ok)).or_default() += 1;
        if ok && !ours_ok {
            stricter += 1;
        }
    }
    let mut report = std::io::stderr().lock();
    for ((damage, ok), n) in &counts {
        let verdict = if *ok { "GNU tar reads" } else { "both refuse" };
        let _ = writeln!(report, "{damage:>14} {verdict:>13}: {n}");
    }
    let _ = writeln!(
        report,
        "of the damaged ones GNU tar reads, we refuse {stricter}"
    );
    let whole = counts.get(&("none", true)).copied().unwrap_or(0);
    assert!(
        whole > 100,
        "too few undamaged archives accepted ({whole}): the generator is off"
    );
}
