//! Conversion throughput of the builder on a generated layer (run with `cargo bench`).
use std::io::Cursor;

use erofs_image::tar::{Entry, EntryKind, TarWriter};
use erofs_image::{BuildOptions, tar_to_image, tar_to_index};

fn main() {
    divan::main();
}

fn sample_tar(files: usize, size: usize) -> Vec<u8> {
    let mut w = TarWriter::new(Vec::new());
    let data = vec![0x5au8; size];
    for d in 0..files / 100 + 1 {
        w.append_bytes(&Entry::new(format!("d{d}"), EntryKind::Directory), &[])
            .unwrap();
    }
    for i in 0..files {
        let mut e = Entry::new(format!("d{}/file-{i}", i / 100), EntryKind::Regular);
        e.mtime = 1_700_000_000;
        w.append_bytes(&e, &data[..(i * 131) % size]).unwrap();
    }
    w.finish().unwrap()
}

#[divan::bench(args = [1000, 10000])]
fn full_image(b: divan::Bencher, files: usize) {
    let tar = sample_tar(files, 8192);
    let opts = BuildOptions {
        inline_data: false,
        oci_whiteouts: true,
        ..Default::default()
    };
    b.counter(divan::counter::BytesCount::new(tar.len()))
        .bench(|| tar_to_image(&tar[..], Cursor::new(Vec::new()), &opts).unwrap());
}

#[divan::bench(args = [1000, 10000])]
fn tar_index(b: divan::Bencher, files: usize) {
    let tar = sample_tar(files, 8192);
    let opts = BuildOptions {
        oci_whiteouts: true,
        ..Default::default()
    };
    b.counter(divan::counter::BytesCount::new(tar.len()))
        .bench(|| tar_to_index(&tar[..], std::io::sink(), &opts).unwrap());
}
