//! Flat addresses for a multi-device image ("flatten device"): each device-table slot's
//! `uniaddr` says where that device starts when the primary device and all its devices are
//! laid end to end as one disk. A kernel that mounts such a disk without `device=` options
//! reads device N's blocks at `uniaddr_N` onwards; one that is given `device=` options ignores
//! the addresses for chunk-indexed data (what fsmeta holds), so setting them changes nothing
//! for host mounts. VM runtimes get the whole chain as one disk this way (a VMDK descriptor
//! stitching the files, or a dm-linear device).
//!
//! [`set_flat_addresses`] works on the image's first bytes in memory (the caller reads and
//! writes them), like the rest of this crate.

use crate::error::{CorruptKind, Error, Result};
use crate::format::{self, DeviceSlot, Superblock};

/// Bytes of an image's start that always hold its superblock and a full device table
/// (65535 slots at the largest offset a 16-bit `devt_slotoff` allows).
pub const MAX_HEAD: usize = (u16::MAX as usize + 1) * format::DEVICE_SLOT_SIZE
    + u16::MAX as usize * format::DEVICE_SLOT_SIZE;

/// Give every device-table slot of the image whose first bytes are `head` the flat address
/// right after the primary device and the devices before it (the primary device's `blocks`,
/// then each device's `blocks` in table order), and fix the superblock checksum. Returns the
/// slots as now written. `head` must hold the superblock and the whole device table.
pub fn set_flat_addresses(head: &mut [u8]) -> Result<Vec<DeviceSlot>> {
    let sb_at = format::SUPER_OFFSET as usize;
    let raw: &[u8; format::SUPERBLOCK_SIZE] = head
        .get(sb_at..sb_at + format::SUPERBLOCK_SIZE)
        .and_then(|b| b.try_into().ok())
        .ok_or(CorruptKind::BadSuperblock(
            "image shorter than its superblock",
        ))?;
    let sb = Superblock::decode(raw);
    if sb.magic != format::MAGIC {
        return Err(CorruptKind::BadMagic(sb.magic).into());
    }
    if !(format::MIN_BLKSZBITS..=format::MAX_BLKSZBITS).contains(&sb.blkszbits) {
        return Err(CorruptKind::BadBlockSize(sb.blkszbits).into());
    }
    let n = sb.extra_devices as usize;
    let table = sb.devt_slotoff as usize * format::DEVICE_SLOT_SIZE;
    let end = table + n * format::DEVICE_SLOT_SIZE;
    if n > 0 && (table < sb_at + format::SUPERBLOCK_SIZE || end > head.len()) {
        return Err(Error::InvalidOption(format!(
            "device table at bytes {table}..{end} is not within the {} bytes given",
            head.len()
        )));
    }
    let mut at = sb.blocks as u64;
    let mut slots = Vec::with_capacity(n);
    for i in 0..n {
        let off = table + i * format::DEVICE_SLOT_SIZE;
        let bytes: &mut [u8; format::DEVICE_SLOT_SIZE] = (&mut head
            [off..off + format::DEVICE_SLOT_SIZE])
            .try_into()
            .expect("slot size");
        let mut slot = DeviceSlot::decode(bytes);
        slot.uniaddr = u32::try_from(at).map_err(|_| {
            Error::TooLarge(format!(
                "device {} would start at block {at}, past 2^32 blocks",
                i + 1
            ))
        })?;
        at += slot.blocks as u64;
        *bytes = slot.encode();
        slots.push(slot);
    }
    if sb.feature_compat & format::FEATURE_COMPAT_SB_CHKSUM != 0 {
        let len = format::checksum_len(1u32 << sb.blkszbits);
        let covered = head
            .get(sb_at..sb_at + len)
            .ok_or(CorruptKind::BadSuperblock(
                "image shorter than its checksummed block",
            ))?;
        let crc = format::superblock_checksum(covered);
        head[sb_at + 4..sb_at + 8].copy_from_slice(&crc.to_le_bytes());
    }
    Ok(slots)
}
