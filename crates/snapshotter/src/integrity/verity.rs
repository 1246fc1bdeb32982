//! fs-verity digests computed in userspace (the same value `FS_IOC_MEASURE_VERITY` and
//! `fsverity digest` report): SHA-256 Merkle tree over 4 KiB blocks, no salt.
