//! The Linux outputs write exactly the bytes the portable ones do, whichever of their paths
//! (kernel copy, range insert, O_DIRECT, or the fallbacks) the filesystem allows: on the
//! temporary directory's filesystem (ext4 here: inserts and O_DIRECT work) and on /dev/shm
//! (tmpfs: no range insert, so the tar is moved with reads and writes).

use std::fs::File;
use std::io::{Cursor, Read, Seek};
use std::path::{Path, PathBuf};

use erofs_image::tar::{Entry, EntryKind, TarWriter};
use erofs_image::{BuildOptions, PlainOutput};
use erofs_output::{DirectFile, FileOutput};

/// Small files (buffered copies), large ones (kernel copies: at least 64 KiB), a few MiB in
/// all so the direct writer ships several buffers.
fn layer_tar() -> Vec<u8> {
    let mut w = TarWriter::new(Vec::new());
    w.append_bytes(&Entry::new("d", EntryKind::Directory), &[])
        .unwrap();
    for (i, size) in [0usize, 1, 4095, 4096, 70_000, 1 << 20, 3 << 20, 12_345]
        .into_iter()
        .enumerate()
    {
        let mut e = Entry::new(format!("d/f{i}"), EntryKind::Regular);
        e.mtime = 1_700_000_000 + i as i64;
        let data: Vec<u8> = (0..size).map(|k| (k * 7 + i) as u8).collect();
        w.append_bytes(&e, &data).unwrap();
    }
    let mut l = Entry::new("d/link", EntryKind::Symlink);
    l.link = b"f1".to_vec();
    w.append_bytes(&l, &[]).unwrap();
    w.finish().unwrap()
}

fn opts() -> BuildOptions {
    BuildOptions {
        inline_data: false,
        oci_whiteouts: true,
        uuid: [7; 16],
        ..Default::default()
    }
}

fn dirs() -> Vec<PathBuf> {
    vec![std::env::temp_dir(), PathBuf::from("/dev/shm")]
}

fn rw(dir: &Path, name: &str) -> File {
    File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.join(name))
        .unwrap()
}

fn contents(mut f: &File) -> Vec<u8> {
    let mut v = Vec::new();
    f.rewind().unwrap();
    f.read_to_end(&mut v).unwrap();
    v
}

#[test]
fn full_images_from_a_tar_file() {
    let tar = layer_tar();
    let mut want = Cursor::new(Vec::new());
    erofs_image::tar_to_image(&tar[..], &mut want, &opts()).unwrap();
    let want = want.into_inner();
    for base in dirs() {
        let d = tempfile::tempdir_in(&base).unwrap();
        std::fs::write(d.path().join("l.tar"), &tar).unwrap();
        let input = File::open(d.path().join("l.tar")).unwrap();
        let out = rw(d.path(), "file.erofs");
        erofs_image::tar_file_to_image(&input, FileOutput::new(&out), &opts()).unwrap();
        assert!(contents(&out) == want, "FileOutput on {}", base.display());
        let out = rw(d.path(), "direct.erofs");
        erofs_image::tar_file_to_image(&input, DirectFile::new(&out), &opts()).unwrap();
        assert!(contents(&out) == want, "DirectFile on {}", base.display());
    }
}

#[test]
fn full_images_from_a_stream() {
    let tar = layer_tar();
    let mut want = Cursor::new(Vec::new());
    erofs_image::tar_to_image(&tar[..], PlainOutput(&mut want), &opts()).unwrap();
    let want = want.into_inner();
    for base in dirs() {
        let d = tempfile::tempdir_in(&base).unwrap();
        let out = rw(d.path(), "direct.erofs");
        erofs_image::tar_to_image(&tar[..], DirectFile::new(&out), &opts()).unwrap();
        assert!(contents(&out) == want, "DirectFile on {}", base.display());
    }
}

#[test]
fn single_file_tar_indexes() {
    let tar = layer_tar();
    let mut want = Cursor::new(Vec::new());
    erofs_image::tar_to_index_file(&tar[..], &mut want, &opts()).unwrap();
    let want = want.into_inner();
    assert!(want.ends_with(&tar));
    for base in dirs() {
        let d = tempfile::tempdir_in(&base).unwrap();
        let out = rw(d.path(), "direct.erofs");
        erofs_image::tar_to_index_file(&tar[..], DirectFile::new(&out), &opts()).unwrap();
        assert!(
            contents(&out) == want,
            "streamed, DirectFile on {}",
            base.display()
        );
        let out = rw(d.path(), "file.erofs");
        erofs_image::tar_to_index_file(&tar[..], FileOutput::new(&out), &opts()).unwrap();
        assert!(
            contents(&out) == want,
            "streamed, FileOutput on {}",
            base.display()
        );
        std::fs::write(d.path().join("l.tar"), &tar).unwrap();
        let input = File::open(d.path().join("l.tar")).unwrap();
        let out = rw(d.path(), "copied.erofs");
        erofs_image::tar_file_to_index_file(&input, FileOutput::new(&out), &opts()).unwrap();
        assert!(
            contents(&out) == want,
            "copied, FileOutput on {}",
            base.display()
        );
    }
}
