//! Root-hash signatures, scheme `ed25519`: the signature (64 bytes, RFC 8032) of the layer's
//! dm-verity root digest as ASCII lower-case hex, the same message the kernel's dm-verity
//! root-hash signature check (`root_hash_sig_key_desc`) verifies, so a PKCS#7 scheme for the
//! kernel can sign the same bytes later.
//!
//! Key files are text: comment lines starting with `#`, blank lines, and one line of 64 hex
//! digits: the 32-byte secret seed (secret key file) or the 32-byte public key (public key
//! file). `erofs-snapshotter artifacts keygen` writes both.

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};

use crate::error::{Error, Result};

/// Length of an ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;

/// What is signed for a root digest (lower-case hex).
pub fn message(root_digest: &str) -> Vec<u8> {
    root_digest.to_ascii_lowercase().into_bytes()
}

/// An operator's secret key.
#[derive(Clone)]
pub struct SecretKey(SigningKey);

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretKey(public {})", self.public().to_hex())
    }
}

/// A public key that signatures are verified with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey(VerifyingKey);

fn key_bytes(text: &str, what: &str) -> Result<[u8; 32]> {
    let mut lines = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'));
    let (Some(line), None) = (lines.next(), lines.next()) else {
        return Err(Error::Signature(format!(
            "{what}: expected one line of 64 hex digits"
        )));
    };
    let mut out = [0u8; 32];
    hex::decode_to_slice(line, &mut out)
        .map_err(|e| Error::Signature(format!("{what}: {e} (expected 64 hex digits)")))?;
    Ok(out)
}

impl SecretKey {
    /// A new key from the system's random source.
    pub fn generate() -> Result<SecretKey> {
        use std::io::Read;
        let mut seed = [0u8; 32];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut seed))
            .map_err(|e| Error::io("reading /dev/urandom", e))?;
        Ok(SecretKey(SigningKey::from_bytes(&seed)))
    }

    /// Parse a secret key file.
    pub fn from_text(text: &str) -> Result<SecretKey> {
        Ok(SecretKey(SigningKey::from_bytes(&key_bytes(
            text,
            "ed25519 secret key",
        )?)))
    }

    /// The secret key file's text.
    pub fn to_text(&self) -> String {
        format!(
            "# erofs-snapshotter ed25519 secret key (seed); keep it private\n{}\n",
            hex::encode(self.0.to_bytes())
        )
    }

    /// Its public key.
    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }

    /// Sign a root digest.
    pub fn sign_root(&self, root_digest: &str) -> [u8; SIGNATURE_LEN] {
        self.0.sign(&message(root_digest)).to_bytes()
    }
}

impl PublicKey {
    /// Parse a public key file.
    pub fn from_text(text: &str) -> Result<PublicKey> {
        let b = key_bytes(text, "ed25519 public key")?;
        VerifyingKey::from_bytes(&b)
            .map(PublicKey)
            .map_err(|e| Error::Signature(format!("ed25519 public key: {e}")))
    }

    /// The public key file's text.
    pub fn to_text(&self) -> String {
        format!(
            "# erofs-snapshotter ed25519 public key\n{}\n",
            self.to_hex()
        )
    }

    /// Lower-case hex of the 32 bytes.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0.as_bytes())
    }

    /// Check `signature` (the blob's bytes) of `root_digest` (strict RFC 8032 verification:
    /// no malleable or small-order encodings).
    pub fn verify_root(&self, root_digest: &str, signature: &[u8]) -> Result<()> {
        let sig: [u8; SIGNATURE_LEN] = signature.try_into().map_err(|_| {
            Error::Signature(format!(
                "an ed25519 signature is {SIGNATURE_LEN} bytes, this one {}",
                signature.len()
            ))
        })?;
        self.0
            .verify_strict(
                &message(root_digest),
                &ed25519_dalek::Signature::from_bytes(&sig),
            )
            .map_err(|_| {
                Error::Signature(format!(
                    "the signature of root digest {root_digest} does not verify with key {}",
                    self.to_hex()
                ))
            })
    }
}

/// Whether `signature` of `root_digest` verifies under any of `keys`.
pub fn verify_any(keys: &[PublicKey], root_digest: &str, signature: &[u8]) -> Result<()> {
    let mut last = Error::Signature("no public keys configured".into());
    for k in keys {
        match k.verify_root(root_digest, signature) {
            Ok(()) => return Ok(()),
            Err(e) => last = e,
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A generated key signs, its public key verifies, another key and other data do not,
    /// and both key files read back.
    #[test]
    fn sign_and_verify() {
        let k = SecretKey::generate().unwrap();
        let root = "ab".repeat(32);
        let sig = k.sign_root(&root);
        let pubk = PublicKey::from_text(&k.public().to_text()).unwrap();
        pubk.verify_root(&root, &sig).unwrap();
        let k2 = SecretKey::from_text(&k.to_text()).unwrap();
        assert_eq!(k2.public(), k.public());
        let other = SecretKey::generate().unwrap().public();
        assert!(other.verify_root(&root, &sig).is_err());
        assert!(pubk.verify_root(&"cd".repeat(32), &sig).is_err());
        let mut flipped = sig;
        flipped[10] ^= 1;
        assert!(pubk.verify_root(&root, &flipped).is_err());
        assert!(pubk.verify_root(&root, &sig[..63]).is_err());
        verify_any(&[other.clone(), pubk], &root, &sig).unwrap();
        assert!(verify_any(&[other], &root, &sig).is_err());
        assert!(verify_any(&[], &root, &sig).is_err());
        for bad in [
            "",
            "zz",
            &"ab".repeat(31),
            &format!("{0}\n{0}", "ab".repeat(32)),
        ] {
            assert!(PublicKey::from_text(bad).is_err(), "{bad:?}");
            assert!(SecretKey::from_text(bad).is_err(), "{bad:?}");
        }
    }
}
