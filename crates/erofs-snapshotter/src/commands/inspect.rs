//! `ls`, `cat`, `stat` and `dump`: read an image in userspace, no mount needed.

use std::fs::File;
use std::io::{self, Write};
use std::process::ExitCode;

use anyhow::{Context, bail};
use erofs_image::reader::{Image, Inode, ReadAt};

use crate::cli::{ImageArgs, LsArgs, PathArgs};

pub fn open_devices(a: &ImageArgs) -> anyhow::Result<(File, Vec<Box<dyn ReadAt>>)> {
    let primary = File::open(&a.image).with_context(|| format!("opening {}", a.image.display()))?;
    let mut devices: Vec<Box<dyn ReadAt>> = Vec::new();
    for d in &a.devices {
        devices.push(Box::new(
            File::open(d).with_context(|| format!("opening {}", d.display()))?,
        ));
    }
    Ok((primary, devices))
}

fn open(a: &ImageArgs) -> anyhow::Result<Image> {
    let (p, d) = open_devices(a)?;
    Image::open_with_devices(p, d).with_context(|| format!("opening image {}", a.image.display()))
}

fn resolve(img: &Image, path: &str) -> anyhow::Result<Inode> {
    img.resolve(path.as_bytes())
        .with_context(|| format!("looking up {path}"))
}

fn type_char(ino: &Inode) -> char {
    match ino.file_type() {
        0o040000 => 'd',
        0o120000 => 'l',
        0o020000 => 'c',
        0o060000 => 'b',
        0o010000 => 'p',
        0o140000 => 's',
        _ => '-',
    }
}

fn perms(mode: u32) -> String {
    let mut v: Vec<char> = "rwxrwxrwx"
        .chars()
        .enumerate()
        .map(|(i, c)| if mode & (0o400 >> i) != 0 { c } else { '-' })
        .collect();
    for (idx, bit, on, off) in [
        (2, 0o4000, 's', 'S'),
        (5, 0o2000, 's', 'S'),
        (8, 0o1000, 't', 'T'),
    ] {
        if mode & bit != 0 {
            v[idx] = if v[idx] == 'x' { on } else { off };
        }
    }
    v.into_iter().collect()
}

fn long_line(img: &Image, name: &str, ino: &Inode) -> anyhow::Result<String> {
    let mut line = format!(
        "{}{} {:>3} {:>6} {:>6} {:>10} {}.{:09} {}",
        type_char(ino),
        perms(ino.mode()),
        ino.raw.nlink,
        ino.raw.uid,
        ino.raw.gid,
        match ino.file_type() {
            0o020000 | 0o060000 => format!("{},{}", ino.rdev().0, ino.rdev().1),
            _ => ino.size().to_string(),
        },
        ino.mtime,
        ino.mtime_nsec,
        name
    );
    if ino.is_symlink() {
        line.push_str(&format!(
            " -> {}",
            String::from_utf8_lossy(&img.read_link(ino)?)
        ));
    }
    Ok(line)
}

pub fn ls(a: LsArgs) -> anyhow::Result<ExitCode> {
    let img = open(&a.image)?;
    let start = resolve(&img, &a.path)?;
    let mut out = io::stdout().lock();
    if !start.is_dir() {
        writeln!(
            out,
            "{}",
            if a.long {
                long_line(&img, &a.path, &start)?
            } else {
                a.path.clone()
            }
        )?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut stack = vec![(a.path.trim_end_matches('/').to_string(), start)];
    while let Some((path, dir)) = stack.pop() {
        if a.recursive {
            writeln!(out, "{}:", if path.is_empty() { "/" } else { &path })?;
        }
        let mut subdirs = Vec::new();
        for e in img.read_dir(&dir)? {
            if e.name == b"." || e.name == b".." {
                continue;
            }
            let name = String::from_utf8_lossy(&e.name).into_owned();
            let ino = img.inode(e.nid)?;
            if a.long {
                writeln!(out, "{}", long_line(&img, &name, &ino)?)?;
            } else {
                writeln!(out, "{name}")?;
            }
            if a.recursive && ino.is_dir() {
                subdirs.push((format!("{path}/{name}"), ino));
            }
        }
        if a.recursive {
            writeln!(out)?;
        }
        stack.extend(subdirs.into_iter().rev());
    }
    Ok(ExitCode::SUCCESS)
}

pub fn cat(a: PathArgs) -> anyhow::Result<ExitCode> {
    let img = open(&a.image)?;
    let ino = resolve(&img, &a.path)?;
    if ino.is_symlink() {
        io::stdout().write_all(&img.read_link(&ino)?)?;
        return Ok(ExitCode::SUCCESS);
    }
    if !ino.is_file() {
        bail!("{} is not a regular file", a.path);
    }
    let mut out = io::stdout().lock();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < ino.size() {
        let n = img.read(&ino, off, &mut buf)?;
        if n == 0 {
            bail!("{}: image data ends early", a.path);
        }
        out.write_all(&buf[..n])?;
        off += n as u64;
    }
    Ok(ExitCode::SUCCESS)
}

pub fn stat(a: PathArgs) -> anyhow::Result<ExitCode> {
    let img = open(&a.image)?;
    let ino = resolve(&img, &a.path)?;
    let mut out = io::stdout().lock();
    writeln!(out, "  File: {}", a.path)?;
    writeln!(
        out,
        "   nid: {}  layout: {}  {} inode",
        ino.nid,
        ino.layout,
        if ino.raw.is_extended() {
            "extended"
        } else {
            "compact"
        }
    )?;
    writeln!(
        out,
        "  Mode: {:o} ({}{})",
        ino.mode(),
        type_char(&ino),
        perms(ino.mode())
    )?;
    writeln!(out, "  Size: {}  Links: {}", ino.size(), ino.raw.nlink)?;
    writeln!(out, "   Uid: {}  Gid: {}", ino.raw.uid, ino.raw.gid)?;
    writeln!(out, " Mtime: {}.{:09}", ino.mtime, ino.mtime_nsec)?;
    if matches!(ino.file_type(), 0o020000 | 0o060000) {
        writeln!(out, "  Rdev: {}:{}", ino.rdev().0, ino.rdev().1)?;
    }
    if ino.is_symlink() {
        writeln!(
            out,
            "Target: {}",
            String::from_utf8_lossy(&img.read_link(&ino)?)
        )?;
    }
    for (k, v) in img.xattrs(&ino)? {
        writeln!(
            out,
            " Xattr: {}={:?}",
            String::from_utf8_lossy(&k),
            String::from_utf8_lossy(&v)
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

pub fn dump(a: ImageArgs) -> anyhow::Result<ExitCode> {
    let img = open(&a)?;
    io::stdout().write_all(erofs_image::debug::dump(&img)?.as_bytes())?;
    Ok(ExitCode::SUCCESS)
}
