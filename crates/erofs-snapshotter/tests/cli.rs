//! The image CLI: exit statuses, messages, and no output left behind on failure.

use std::fs;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use erofs_image::tar::{Entry, EntryKind, TarWriter};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_erofs-snapshotter"))
}

fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("running the binary")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn sample_tar(path: &Path) {
    let mut w = TarWriter::new(fs::File::create(path).unwrap());
    w.append_bytes(&Entry::new("etc", EntryKind::Directory), &[])
        .unwrap();
    w.append_bytes(&Entry::new("etc/motd", EntryKind::Regular), b"hello\n")
        .unwrap();
    let mut l = Entry::new("etc/link", EntryKind::Symlink);
    l.link = b"motd".to_vec();
    w.append_bytes(&l, &[]).unwrap();
    w.append_bytes(&Entry::new("etc/.wh.gone", EntryKind::Regular), &[])
        .unwrap();
    w.finish().unwrap();
}

/// Only the expected files are in `dir`: no image, no temporary file.
fn only(dir: &Path, names: &[&str]) {
    let mut got: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    got.sort();
    let mut want: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(got, want, "files left in {}", dir.display());
}

#[test]
fn build_list_cat_stat_check() {
    let t = tempfile::tempdir().unwrap();
    let tar = t.path().join("l.tar");
    sample_tar(&tar);
    let img = t.path().join("l.erofs");
    for mode in ["--tar=f", "--tar=i"] {
        let o = run(&[
            "mkfs",
            "-q",
            mode,
            "--aufs",
            img.to_str().unwrap(),
            tar.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", text(&o));
        let o = run(&["fsck", img.to_str().unwrap()]);
        assert!(o.status.success(), "{}", text(&o));
        assert!(text(&o).contains("0 error(s)"));
        let o = run(&["ls", "-l", img.to_str().unwrap(), "/etc"]);
        let out = text(&o);
        assert!(
            out.contains("motd") && out.contains("link -> motd") && out.contains("c---------"),
            "{out}"
        );
        let o = run(&["cat", img.to_str().unwrap(), "/etc/motd"]);
        assert_eq!(o.stdout, b"hello\n");
        let o = run(&["stat", img.to_str().unwrap(), "/etc/motd"]);
        assert!(text(&o).contains("Size: 6"), "{}", text(&o));
        let o = run(&["cat", img.to_str().unwrap(), "/nope"]);
        assert!(
            !o.status.success() && text(&o).contains("/nope"),
            "{}",
            text(&o)
        );
    }
    // From stdin, gzip.
    let gz = t.path().join("l.tar.gz");
    let mut e =
        flate2::write::GzEncoder::new(fs::File::create(&gz).unwrap(), flate2::Compression::fast());
    std::io::copy(&mut fs::File::open(&tar).unwrap(), &mut e).unwrap();
    e.finish().unwrap();
    let o = bin()
        .args([
            "mkfs",
            "-q",
            "--tar=f",
            "--aufs",
            img.to_str().unwrap(),
            "-",
        ])
        .stdin(Stdio::from(fs::File::open(&gz).unwrap()))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(
        run(&["cat", img.to_str().unwrap(), "/etc/motd"]).stdout,
        b"hello\n"
    );
    // From a directory.
    let src = t.path().join("src");
    fs::create_dir_all(src.join("d")).unwrap();
    fs::write(src.join("d/f"), b"x").unwrap();
    let o = run(&["mkfs", "-q", img.to_str().unwrap(), src.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(run(&["cat", img.to_str().unwrap(), "/d/f"]).stdout, b"x");
}

#[test]
fn bad_tars_leave_nothing_behind() {
    let t = tempfile::tempdir().unwrap();
    let good = t.path().join("good.tar");
    let mut w = TarWriter::new(fs::File::create(&good).unwrap());
    w.append_bytes(
        &Entry::new("big-file", EntryKind::Regular),
        &vec![1u8; 100_000],
    )
    .unwrap();
    w.finish().unwrap();
    let bytes = fs::read(&good).unwrap();
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("truncated.tar", bytes[..50_000].to_vec(), "big-file"),
        (
            "checksum.tar",
            {
                let mut b = bytes.clone();
                b[3] ^= 1;
                b
            },
            "checksum",
        ),
        (
            "dotdot.tar",
            {
                let mut w = TarWriter::new(Vec::new());
                w.append_bytes(&Entry::new("a/../../etc/passwd", EntryKind::Regular), b"x")
                    .unwrap();
                w.finish().unwrap()
            },
            "a/../../etc/passwd",
        ),
        (
            "hardlink.tar",
            {
                let mut w = TarWriter::new(Vec::new());
                let mut l = Entry::new("link", EntryKind::Hardlink);
                l.link = b"missing".to_vec();
                w.append_bytes(&l, &[]).unwrap();
                w.finish().unwrap()
            },
            "missing",
        ),
    ];
    for (name, data, needle) in cases {
        let input = t.path().join(name);
        fs::write(&input, &data).unwrap();
        for mode in ["--tar=f", "--tar=i"] {
            let out_dir = t.path().join(format!("out-{name}-{mode}"));
            fs::create_dir(&out_dir).unwrap();
            let img = out_dir.join("x.erofs");
            let o = run(&[
                "mkfs",
                "-q",
                mode,
                img.to_str().unwrap(),
                input.to_str().unwrap(),
            ]);
            assert!(!o.status.success(), "{name} {mode}: should fail");
            assert!(text(&o).contains(needle), "{name} {mode}: {}", text(&o));
            only(&out_dir, &[]);
            // Through stdin (the streaming path) too.
            let o = bin()
                .args(["mkfs", "-q", mode, img.to_str().unwrap(), "-"])
                .stdin(Stdio::from(fs::File::open(&input).unwrap()))
                .output()
                .unwrap();
            assert!(
                !o.status.success() && text(&o).contains(needle),
                "{name} {mode} stdin: {}",
                text(&o)
            );
            only(&out_dir, &[]);
        }
    }
}

#[test]
fn options_are_checked_by_name() {
    let t = tempfile::tempdir().unwrap();
    let tar = t.path().join("l.tar");
    sample_tar(&tar);
    let img = t.path().join("x.erofs");
    for (args, needle) in [
        (vec!["-Efancy"], "fancy"),
        (vec!["-U", "not-a-uuid"], "not-a-uuid"),
        (vec!["-b", "3000"], "3000"),
        (vec!["--sort=random"], "random"),
        // The library's rules (the differ's mkfs_options share them), as mkfs.erofs has them.
        (vec!["-E,noinline_data"], "unsupported extended option"),
        (vec!["-T", "-1"], "-1"),
        (vec!["-U", "00112233445566778899aabbccddeeff"], "00112233"),
    ] {
        let mut a = vec!["mkfs", "-q", "--tar=f"];
        a.extend(args.iter().copied());
        a.extend([img.to_str().unwrap(), tar.to_str().unwrap()]);
        let o = run(&a);
        assert!(
            !o.status.success() && text(&o).contains(needle),
            "{args:?}: {}",
            text(&o)
        );
    }
    only(t.path(), &["l.tar"]);
    // Reproducible with a fixed UUID and timestamp.
    let a = t.path().join("a.erofs");
    let b = t.path().join("b.erofs");
    for p in [&a, &b] {
        let o = run(&[
            "mkfs",
            "-q",
            "--tar=f",
            "--aufs",
            "-T0",
            "--mkfs-time",
            "-Uclear",
            p.to_str().unwrap(),
            tar.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", text(&o));
    }
    assert_eq!(fs::read(&a).unwrap(), fs::read(&b).unwrap());
}

/// Of `--all-time` and `--mkfs-time` the last one counts, as in mkfs.erofs; `--sort=path` and
/// a trailing comma in `-E` are taken.
#[test]
fn time_flags_last_one_wins() {
    let t = tempfile::tempdir().unwrap();
    let tar = t.path().join("l.tar");
    let mut w = TarWriter::new(fs::File::create(&tar).unwrap());
    let mut e = Entry::new("f", EntryKind::Regular);
    e.mtime = 1_000_000;
    w.append_bytes(&e, b"x\n").unwrap();
    w.finish().unwrap();
    let build = |name: &str, flags: &[&str]| {
        let img = t.path().join(name);
        let mut a = vec!["mkfs", "-q", "--tar=f", "-T5", "-Uclear"];
        a.extend(flags);
        a.extend([img.to_str().unwrap(), tar.to_str().unwrap()]);
        let o = run(&a);
        assert!(o.status.success(), "{flags:?}: {}", text(&o));
        fs::read(img).unwrap()
    };
    let all = build("all.erofs", &[]);
    let mkfs = build("mkfs.erofs", &["--mkfs-time"]);
    assert_ne!(all, mkfs);
    assert_eq!(build("a.erofs", &["--mkfs-time", "--all-time"]), all);
    assert_eq!(build("b.erofs", &["--all-time", "--mkfs-time"]), mkfs);
    assert_eq!(build("c.erofs", &["--sort=path", "-Einline_data,"]), all);
}

#[test]
fn fsck_reports_corruption() {
    let t = tempfile::tempdir().unwrap();
    let tar = t.path().join("l.tar");
    sample_tar(&tar);
    let img = t.path().join("x.erofs");
    assert!(
        run(&[
            "mkfs",
            "-q",
            "--tar=f",
            img.to_str().unwrap(),
            tar.to_str().unwrap()
        ])
        .status
        .success()
    );
    let mut b = fs::read(&img).unwrap();
    b[1024 + 40] ^= 0x01; // meta_blkaddr, checksum no longer matches
    fs::write(&img, &b).unwrap();
    let o = run(&["fsck", img.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("checksum"), "{}", text(&o));
}

#[test]
fn help_reads_well() {
    let o = run(&["--help"]);
    let h = text(&o);
    for cmd in [
        "serve", "mkfs", "merge", "fsck", "ls", "cat", "stat", "dump",
    ] {
        assert!(h.contains(cmd), "{h}");
    }
    let h = text(&run(&["mkfs", "--help"]));
    assert!(
        h.contains("--tar") && h.contains("--aufs") && h.contains("noinline_data"),
        "{h}"
    );
}

/// `merge`: fsmeta over a full layer and a tar-index layer; `fsck`, `ls` and `cat` read it
/// through `--device`; a bad layer fails the command and leaves nothing behind.
#[test]
fn merge_builds_fsmeta_that_fsck_and_cat_read_with_devices() {
    let t = tempfile::tempdir().unwrap();
    let lower_tar = t.path().join("lower.tar");
    let mut w = TarWriter::new(fs::File::create(&lower_tar).unwrap());
    for (name, data) in [
        ("etc/gone", &b"old"[..]),
        ("etc/motd", b"lower\n"),
        ("big", &[7u8; 10000][..]),
    ] {
        w.append_bytes(&Entry::new(name, EntryKind::Regular), data)
            .unwrap();
    }
    w.finish().unwrap();
    let upper_tar = t.path().join("upper.tar");
    sample_tar(&upper_tar);
    let (lower, upper) = (t.path().join("lower.erofs"), t.path().join("upper.idx"));
    for (mode, tar, img) in [
        ("--tar=f", &lower_tar, &lower),
        ("--tar=i", &upper_tar, &upper),
    ] {
        let o = run(&[
            "mkfs",
            "-q",
            "--aufs",
            mode,
            img.to_str().unwrap(),
            tar.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", text(&o));
    }
    let fsmeta = t.path().join("fsmeta.erofs");
    let (f, l, u) = (
        fsmeta.to_str().unwrap(),
        lower.to_str().unwrap(),
        upper.to_str().unwrap(),
    );
    let o = run(&["merge", "--aufs", "--ovlfs-strip=1", f, l, u]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("2 layers") && text(&o).contains("blocks of 512 bytes"),
        "{}",
        text(&o)
    );
    let devs = ["--device", l, "--device", u];
    let with = |cmd: &str, rest: &[&str]| {
        let mut a = vec![cmd];
        a.extend_from_slice(&devs);
        a.push(f);
        a.extend_from_slice(rest);
        run(&a)
    };
    let o = with("fsck", &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("0 error(s)"), "{}", text(&o));
    let o = with("cat", &["/etc/motd"]);
    assert_eq!(o.stdout, b"hello\n", "{}", text(&o));
    let o = with("cat", &["/big"]);
    assert_eq!(o.stdout, vec![7u8; 10000], "{}", text(&o));
    let o = with("stat", &["/big"]);
    assert!(
        o.status.success() && text(&o).contains("10000"),
        "{}",
        text(&o)
    );
    let o = with("ls", &["/etc"]);
    let listing = text(&o);
    assert!(
        listing.contains("motd") && listing.contains("link") && !listing.contains("gone"),
        "{listing}"
    );
    // The layers in the wrong number: refused, not misread.
    let o = run(&["fsck", "--device", l, f]);
    assert!(!o.status.success(), "{}", text(&o));

    // A truncated layer: an error naming the layer, and no fsmeta.
    let bad = t.path().join("bad.erofs");
    fs::write(&bad, &fs::read(&lower).unwrap()[..1500]).unwrap();
    let out = t.path().join("out");
    fs::create_dir(&out).unwrap();
    let o = run(&[
        "merge",
        out.join("m.erofs").to_str().unwrap(),
        l,
        bad.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(text(&o).contains("layer 2"), "{}", text(&o));
    only(&out, &[]);
}
