//! Hashing a layer while it is written, so that its fs-verity digest and dm-verity tree cost
//! little more than the write itself.
//!
//! Both trees start from the hashes of every 4 KiB block of the layer (level 0), which is
//! nearly all of their cost. Those blocks are final long before the layer is: the full-image
//! builder writes file data from block 1 upward, each block once, then the metadata after the
//! data, and block 0 (the superblock) last; a native EROFS layer is copied front to back.
//! So every complete block between block 1 and the file's current size can be hashed right
//! away, from the page cache, by a helper thread, while the writer (bound by decompression
//! or by the disk) goes on. What is left at the end (block 0, the metadata, the tail the
//! helper had not reached) is hashed by the tree code.
//!
//! Tar-index layers are not hashed ahead: their tar is written before the index and moved
//! behind it at the end.

use std::fs::File;
use std::sync::mpsc::{self, RecvTimeoutError, TryRecvError};
use std::time::Duration;

use super::verity::{self, DMVERITY_SALT, Leaves};

/// Layer block size of full images, of their fs-verity tree and of their dm-verity tree.
const BLOCK: u64 = 4096;
/// How often the helper looks for newly finished blocks.
const PERIOD: Duration = Duration::from_millis(10);
/// Blocks hashed between two checks of whether the writer has finished (1 MiB).
const BATCH: u64 = 256;

/// Which trees a layer gets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Trees {
    /// The fs-verity digest (no salt).
    pub fsverity: bool,
    /// The dm-verity tree (salted).
    pub dmverity: bool,
}

/// Level-0 hashes taken ahead, per tree.
#[derive(Debug, Clone, Default)]
pub struct Hashed {
    /// For the fs-verity digest.
    pub fsverity: Option<Leaves>,
    /// For the dm-verity tree.
    pub dmverity: Option<Leaves>,
}

/// Run `work`, which writes a layer into `file` in the order described in the module docs,
/// while a helper thread hashes the blocks it has finished for `trees`.
pub fn during<T>(file: &File, trees: Trees, work: impl FnOnce() -> T) -> (T, Hashed) {
    if !trees.fsverity && !trees.dmverity {
        return (work(), Hashed::default());
    }
    let (stop, stopped) = mpsc::channel::<()>();
    std::thread::scope(|sc| {
        let helper = sc.spawn(move || follow(file, trees, &stopped));
        let r = work();
        drop(stop);
        let hashed = helper.join().unwrap_or_default();
        (r, hashed)
    })
}

fn follow(file: &File, trees: Trees, stopped: &mpsc::Receiver<()>) -> Hashed {
    let mut fs = trees.fsverity.then(|| Leaves {
        first: 1,
        hashes: Vec::new(),
    });
    let mut dm = trees.dmverity.then(|| Leaves {
        first: 1,
        hashes: Vec::new(),
    });
    let mut next = 1u64;
    'outer: while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(PERIOD) {
        let Ok(size) = file.metadata().map(|m| m.len()) else {
            break;
        };
        while next < size / BLOCK {
            let k = (size / BLOCK - next).min(BATCH);
            for (leaves, salt) in [(&mut fs, &[][..]), (&mut dm, &DMVERITY_SALT[..])] {
                if let Some(l) = leaves {
                    let at = l.hashes.len();
                    l.hashes.resize(at + k as usize, [0; 32]);
                    if let Err(e) = verity::hash_blocks(
                        file,
                        size,
                        BLOCK as usize,
                        salt,
                        next,
                        &mut l.hashes[at..],
                    ) {
                        // Only an optimisation: the tree code hashes what is missing.
                        tracing::debug!(error = %e, "hashing ahead stopped");
                        l.hashes.truncate(at);
                        break 'outer;
                    }
                }
            }
            next += k;
            if !matches!(stopped.try_recv(), Err(TryRecvError::Empty)) {
                break 'outer;
            }
        }
    }
    // Both trees stop at the same block: a failed batch was truncated above.
    let n = (next - 1) as usize;
    for l in [&mut fs, &mut dm].into_iter().flatten() {
        l.hashes.truncate(n);
    }
    Hashed {
        fsverity: fs,
        dmverity: dm,
    }
}

#[cfg(test)]
mod tests {
    use std::fs::{self, File, OpenOptions};
    use std::io::{self, Read};
    use std::time::Duration;

    use erofs_image::tar::{Entry, EntryKind, TarWriter};

    use super::{Trees, during};
    use crate::integrity::verity::{self, DMVERITY_SALT};

    /// A tar of many files whose data spans many blocks.
    fn layer_tar(path: &std::path::Path) {
        let mut w = TarWriter::new(File::create(path).unwrap());
        w.append_bytes(&Entry::new("d", EntryKind::Directory), &[])
            .unwrap();
        for i in 0..64u32 {
            let mut e = Entry::new(format!("d/f{i}"), EntryKind::Regular);
            let data: Vec<u8> = (0..(i as usize * 7919 + 100_000))
                .map(|j| (j as u32 ^ i).wrapping_mul(2654435761) as u8)
                .collect();
            e.size = data.len() as u64;
            e.file_size = e.size;
            w.append_bytes(&e, &data).unwrap();
        }
        w.finish().unwrap();
    }

    /// A reader that sleeps now and then, so the helper sees the image half written.
    struct Slow<R>(R, u32);
    impl<R: Read> Read for Slow<R> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.1 += 1;
            if self.1.is_multiple_of(8) {
                std::thread::sleep(Duration::from_millis(3));
            }
            let n = buf.len().min(64 << 10);
            self.0.read(&mut buf[..n])
        }
    }

    fn output(dir: &std::path::Path, name: &str) -> File {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(dir.join(name))
            .unwrap()
    }

    /// Hashes taken while the full-image builder writes (streamed, and file to file in the
    /// kernel) match the finished image: the builder's write order is what this module relies
    /// on, and the digests and trees built from them equal those hashed from scratch.
    #[test]
    fn hashes_taken_during_a_build_match_the_finished_image() {
        let t = tempfile::tempdir().unwrap();
        let tar = t.path().join("l.tar");
        layer_tar(&tar);
        let opts = erofs_image::BuildOptions {
            inline_data: false,
            ..Default::default()
        };
        let both = Trees {
            fsverity: true,
            dmverity: true,
        };
        for streamed in [true, false] {
            let name = format!("img-{streamed}");
            let out = output(t.path(), &name);
            let input = File::open(&tar).unwrap();
            let (r, hashed) = during(&out, both, || {
                if streamed {
                    erofs_image::tar_to_image(Slow(&input, 0), &out, &opts)
                } else {
                    erofs_image::tar_file_to_image(
                        &input,
                        erofs_output::FileOutput::new(&out),
                        &opts,
                    )
                }
            });
            r.unwrap();
            let len = out.metadata().unwrap().len();
            let fs = hashed.fsverity.expect("fs-verity leaves");
            let dm = hashed.dmverity.expect("dm-verity leaves");
            assert_eq!(fs.first, 1);
            assert_eq!(fs.hashes.len(), dm.hashes.len());
            if streamed {
                assert!(
                    !fs.hashes.is_empty(),
                    "the helper hashed nothing while the build ran"
                );
            }
            let mut plain = vec![[0u8; 32]; fs.hashes.len()];
            verity::hash_blocks(&out, len, 4096, &[], 1, &mut plain).unwrap();
            assert_eq!(fs.hashes, plain, "a block changed after it was hashed");
            let mut salted = vec![[0u8; 32]; dm.hashes.len()];
            verity::hash_blocks(&out, len, 4096, &DMVERITY_SALT, 1, &mut salted).unwrap();
            assert_eq!(dm.hashes, salted);
            assert_eq!(
                verity::fsverity_digest_with(&out, len, 4096, Some(&fs)).unwrap(),
                verity::fsverity_digest(&out, len, 4096).unwrap()
            );
        }
        assert_eq!(
            fs::read(t.path().join("img-true")).unwrap(),
            fs::read(t.path().join("img-false")).unwrap()
        );
    }

    #[test]
    fn nothing_is_hashed_when_no_tree_is_wanted() {
        let f = tempfile::tempfile().unwrap();
        let (r, h) = during(&f, Trees::default(), || 7);
        assert_eq!(r, 7);
        assert!(h.fsverity.is_none() && h.dmverity.is_none());
    }
}
