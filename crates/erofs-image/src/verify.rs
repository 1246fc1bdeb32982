//! Checking a tar-index layer against its diffID, as a confidential guest does: the original
//! tar is stored unchanged after the index in `[index][tar]`, so hashing those bytes gives the
//! layer's diffID (the digest of the uncompressed layer in the image config). A dm-verity tree
//! appended after the tar (data zero-padded to its block size) is not part of the tar.
//!
//! The diffID covers the tar only, not the index in front of it: a guest must also trust the
//! index to describe that tar (rebuild it from the tar and compare, or check it entry by entry)
//! before mounting, or a forged index could show files the tar does not hold.

use sha2::{Digest, Sha256};

use crate::format::{self, DeviceSlot, Superblock};
use crate::reader::ReadAt;

/// Why a layer does not verify.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// The file is not a single-file tar-index image `[index][tar]`.
    #[error("not a tar-index image [index][tar]: {0}")]
    NotTarIndex(String),
    /// The tar the index announces does not fit in the file.
    #[error(
        "the index announces {announced} bytes of tar at offset {offset}, the file has only {present}"
    )]
    Truncated {
        /// Where the tar starts.
        offset: u64,
        /// Bytes of tar the device slot covers (whole 512-byte blocks).
        announced: u64,
        /// Bytes after `offset`.
        present: u64,
    },
    /// The diffID given is not `sha256:<64 hex>`.
    #[error("diffID {0:?} is not sha256:<64 hex digits>")]
    BadDiffId(String),
    /// The tar's digest is not the diffID.
    #[error(
        "the tar inside the image ({len} bytes at offset {offset}) has digest {actual}, not the diffID {expected}"
    )]
    Mismatch {
        /// The diffID asked for.
        expected: String,
        /// The tar's digest.
        actual: String,
        /// Where the tar starts.
        offset: u64,
        /// Its length.
        len: u64,
    },
    /// The index in front of the tar is not the one these build options give for it.
    #[error(
        "the index ({len} bytes) is not the one the tar gives with these options: first difference at byte {first_difference}"
    )]
    IndexMismatch {
        /// Length of the index in the image.
        len: u64,
        /// First byte that differs (or the shorter length).
        first_difference: u64,
    },
    /// Rebuilding the index from the tar failed (the tar is malformed).
    #[error("rebuilding the index from the tar: {0}")]
    Build(#[from] crate::Error),
    /// Reading the image failed.
    #[error("reading the image: {0}")]
    Io(#[from] std::io::Error),
}

/// Where the tar is inside a tar-index image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TarLocation {
    /// Byte offset of the tar (= the index's size).
    pub offset: u64,
    /// Length of the tar.
    pub len: u64,
}

fn read_exact<R: ReadAt + ?Sized>(image: &R, buf: &mut [u8], off: u64) -> Result<(), VerifyError> {
    let n = image.read_at(buf, off)?;
    if n != buf.len() {
        return Err(VerifyError::NotTarIndex(format!(
            "the file ends before byte {}",
            off + buf.len() as u64
        )));
    }
    Ok(())
}

/// Find the tar in `[index][tar]`: the index's superblock (512-byte blocks, one extra device
/// mapped flat right after the index) says where it starts and how many 512-byte blocks it
/// takes. Its length is `tar_size` when the caller knows it (e.g. from the artifact's
/// annotation), else those blocks, or up to the end of the file when that comes first (a tar
/// whose length is not a multiple of 512 with nothing after it). Tars as OCI layers hold them
/// are whole 512-byte records, so a tree appended after the tar does not change the answer.
pub fn tar_location<R: ReadAt + ?Sized>(
    image: &R,
    tar_size: Option<u64>,
) -> Result<TarLocation, VerifyError> {
    let not = |s: String| VerifyError::NotTarIndex(s);
    let mut sb = [0u8; format::SUPERBLOCK_SIZE];
    read_exact(image, &mut sb, format::SUPER_OFFSET)?;
    let sb = Superblock::decode(&sb);
    if sb.magic != format::MAGIC {
        return Err(not(format!("bad magic {:#x}", sb.magic)));
    }
    if sb.blkszbits != 9 {
        return Err(not(format!(
            "block size 2^{} instead of 512 bytes",
            sb.blkszbits
        )));
    }
    if sb.extra_devices != 1 || sb.feature_incompat & format::FEATURE_INCOMPAT_DEVICE_TABLE == 0 {
        return Err(not(format!(
            "{} extra devices instead of one (the tar)",
            sb.extra_devices
        )));
    }
    let mut slot = [0u8; format::DEVICE_SLOT_SIZE];
    read_exact(
        image,
        &mut slot,
        sb.devt_slotoff as u64 * format::DEVICE_SLOT_SIZE as u64,
    )?;
    let slot = DeviceSlot::decode(&slot);
    if slot.uniaddr == 0 || slot.uniaddr != sb.blocks {
        return Err(not(format!(
            "the tar device is mapped at block {}, not right after the index's {} blocks",
            slot.uniaddr, sb.blocks
        )));
    }
    let offset = slot.uniaddr as u64 * 512;
    let announced = slot.blocks as u64 * 512;
    let present = image.size()?.saturating_sub(offset);
    let len = match tar_size {
        Some(n) if n > announced || n + 512 <= announced => {
            return Err(not(format!(
                "a tar of {n} bytes does not take the {} blocks the index announces",
                slot.blocks
            )));
        }
        Some(n) => n,
        None => announced.min(present),
    };
    if len > present || present + 512 <= announced {
        return Err(VerifyError::Truncated {
            offset,
            announced,
            present,
        });
    }
    Ok(TarLocation { offset, len })
}

/// The sha256 digest (`sha256:<hex>`) of `len` bytes of `image` from `offset`, read in 1 MiB
/// pieces.
pub fn digest_range<R: ReadAt + ?Sized>(
    image: &R,
    offset: u64,
    len: u64,
) -> Result<String, VerifyError> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; (1 << 20).min(len as usize)];
    let mut done = 0u64;
    while done < len {
        let k = ((len - done) as usize).min(buf.len());
        read_exact(image, &mut buf[..k], offset + done)?;
        h.update(&buf[..k]);
        done += k as u64;
    }
    Ok(format!("sha256:{}", hex::encode(h.finalize())))
}

/// Hash the tar inside the tar-index image `image` and compare it with `diff_id`; returns
/// where the tar is. `tar_size` as in [`tar_location`].
pub fn verify_diff_id<R: ReadAt + ?Sized>(
    image: &R,
    diff_id: &str,
    tar_size: Option<u64>,
) -> Result<TarLocation, VerifyError> {
    let ok = diff_id
        .strip_prefix("sha256:")
        .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()));
    if !ok {
        return Err(VerifyError::BadDiffId(diff_id.to_string()));
    }
    let loc = tar_location(image, tar_size)?;
    let actual = digest_range(image, loc.offset, loc.len)?;
    if !actual.eq_ignore_ascii_case(diff_id) {
        return Err(VerifyError::Mismatch {
            expected: diff_id.to_string(),
            actual,
            offset: loc.offset,
            len: loc.len,
        });
    }
    Ok(loc)
}

/// Rebuild the index from the tar at `loc` with `opts` and compare it with the index in
/// front of it. Building an index is deterministic, so with the producer's options (the
/// differ's: its UUID derives from the layer digest) this proves that the index describes
/// exactly this tar: together with [`verify_diff_id`], that the whole `[index][tar]` is the
/// layer with that diffID.
pub fn verify_index<R: ReadAt + ?Sized>(
    image: &R,
    loc: TarLocation,
    opts: &crate::BuildOptions,
) -> Result<(), VerifyError> {
    struct Range<'a, R: ?Sized> {
        image: &'a R,
        at: u64,
        end: u64,
    }
    impl<R: ReadAt + ?Sized> std::io::Read for Range<'_, R> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let k = ((self.end - self.at) as usize).min(buf.len());
            if k == 0 {
                return Ok(0);
            }
            let n = self.image.read_at(&mut buf[..k], self.at)?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            self.at += n as u64;
            Ok(n)
        }
    }
    let tar = Range {
        image,
        at: loc.offset,
        end: loc.offset + loc.len,
    };
    let rebuilt = crate::tar_to_index(tar, std::io::sink(), opts)?;
    let mut have = vec![0u8; loc.offset as usize];
    read_exact(image, &mut have, 0)?;
    if rebuilt.index != have {
        let first = have
            .iter()
            .zip(&rebuilt.index)
            .position(|(a, b)| a != b)
            .unwrap_or(have.len().min(rebuilt.index.len()));
        return Err(VerifyError::IndexMismatch {
            len: have.len() as u64,
            first_difference: first as u64,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use super::*;
    use crate::tar::{Entry, EntryKind, TarWriter};
    use crate::{BuildOptions, tar_to_index_file};

    fn layer() -> (Vec<u8>, Vec<u8>) {
        let mut w = TarWriter::new(Vec::new());
        for i in 0..5u8 {
            let e = Entry::new(format!("f{i}").into_bytes(), EntryKind::Regular);
            w.append_bytes(&e, &vec![i; 3000 + i as usize * 777])
                .unwrap();
        }
        let tar = w.finish().unwrap();
        let mut out = Cursor::new(Vec::new());
        tar_to_index_file(&tar[..], &mut out, &BuildOptions::default()).unwrap();
        (tar, out.into_inner())
    }

    fn diff_id(b: &[u8]) -> String {
        format!("sha256:{}", hex::encode(Sha256::digest(b)))
    }

    /// The tar is found and its digest is the diffID, with or without bytes after it (a
    /// tree); a flipped tar byte, another diffID, a wrong tar size, a truncated file and a
    /// full image are refused, each saying why.
    #[test]
    fn diff_ids_are_checked() {
        let (tar, image) = layer();
        let id = diff_id(&tar);
        let loc = verify_diff_id(&image, &id, None).unwrap();
        assert_eq!(loc.len, tar.len() as u64);
        assert_eq!(&image[loc.offset as usize..], &tar[..]);
        let mut with_tree = image.clone();
        with_tree.extend_from_slice(&[0xee; 4096]);
        assert_eq!(verify_diff_id(&with_tree, &id, None).unwrap(), loc);
        assert_eq!(
            verify_diff_id(&with_tree, &id, Some(tar.len() as u64)).unwrap(),
            loc
        );

        let mut tampered = image.clone();
        let at = loc.offset as usize + 600;
        tampered[at] ^= 1;
        let e = verify_diff_id(&tampered, &id, None).unwrap_err();
        assert!(matches!(e, VerifyError::Mismatch { .. }), "{e}");
        assert!(e.to_string().contains(&id), "{e}");

        let other = diff_id(b"x");
        assert!(matches!(
            verify_diff_id(&image, &other, None),
            Err(VerifyError::Mismatch { .. })
        ));
        assert!(matches!(
            verify_diff_id(&image, "sha256:xyz", None),
            Err(VerifyError::BadDiffId(_))
        ));
        assert!(matches!(
            verify_diff_id(&image, &id, Some(tar.len() as u64 + 512)),
            Err(VerifyError::NotTarIndex(_))
        ));
        let short = image[..image.len() - 1024].to_vec();
        assert!(matches!(
            verify_diff_id(&short, &id, None),
            Err(VerifyError::Truncated { .. })
        ));
        // The tar alone, and a full image, are not tar-index images.
        assert!(matches!(
            verify_diff_id(&tar, &id, None),
            Err(VerifyError::NotTarIndex(_))
        ));
        let mut full = Cursor::new(Vec::new());
        crate::tar_to_image(&tar[..], &mut full, &BuildOptions::default()).unwrap();
        let e = verify_diff_id(&full.into_inner(), &id, None).unwrap_err();
        assert!(matches!(e, VerifyError::NotTarIndex(_)), "{e}");
        assert!(matches!(
            verify_diff_id(&Vec::new(), &id, None),
            Err(VerifyError::NotTarIndex(_))
        ));
    }

    /// The index rebuilt from the tar is the one in front of it; a changed index byte, or
    /// other options (another UUID), are caught.
    #[test]
    fn indexes_are_rebuilt_and_compared() {
        let (tar, image) = layer();
        let loc = verify_diff_id(&image, &diff_id(&tar), None).unwrap();
        verify_index(&image, loc, &BuildOptions::default()).unwrap();
        let other = BuildOptions {
            uuid: [1; 16],
            ..BuildOptions::default()
        };
        assert!(matches!(
            verify_index(&image, loc, &other),
            Err(VerifyError::IndexMismatch { .. })
        ));
        let mut forged = image.clone();
        forged[1280 + 40] ^= 1;
        let e = verify_index(&forged, loc, &BuildOptions::default()).unwrap_err();
        assert!(
            matches!(
                e,
                VerifyError::IndexMismatch {
                    first_difference: 1320,
                    ..
                }
            ),
            "{e}"
        );
    }
}
