//! The SHA-256 digest type every module uses for a recording's whole-file hash,
//! and the one function that hashes a file (SHA-256, CRC-32 and size in one
//! bounded-memory pass). It never decides what a mismatch means (ingest,
//! backup, the worker and the destinations do that).

use std::fmt;
use std::str::FromStr;

use sha2::{Digest as _, Sha256};

/// A SHA-256 digest: 32 raw bytes, shown as lowercase hex (as `sha256sum` prints it).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Sha256Digest([u8; 32]);

impl Sha256Digest {
    /// Wraps 32 raw bytes.
    pub const fn new(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// Wraps a slice of exactly 32 bytes (the wire form), or `None` for any other length.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        <[u8; 32]>::try_from(bytes).ok().map(Self)
    }

    /// SHA-256 of `data` in one call (tests and small inputs; streams use [`sha2::Sha256`]).
    pub fn of(data: &[u8]) -> Self {
        Self(Sha256::digest(data).into())
    }

    /// Finishes a running hasher.
    pub fn from_hasher(hasher: Sha256) -> Self {
        Self(hasher.finalize().into())
    }

    /// The 32 raw bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lowercase hex, 64 characters.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl From<[u8; 32]> for Sha256Digest {
    fn from(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }
}

impl From<Sha256Digest> for [u8; 32] {
    fn from(digest: Sha256Digest) -> Self {
        digest.0
    }
}

impl AsRef<[u8]> for Sha256Digest {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Display for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sha256Digest({})", self.to_hex())
    }
}

/// The hex text was not 64 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a SHA-256 digest is 64 hex digits; got {len} characters that are not one")]
pub struct ParseDigestError {
    len: usize,
}

impl FromStr for Sha256Digest {
    type Err = ParseDigestError;

    /// Parses 64 hex digits, either case (so `verify --sha256 HEX` accepts what people paste).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s.trim(), &mut out).map_err(|_| ParseDigestError { len: s.len() })?;
        Ok(Self(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_answer_and_hex_round_trip() {
        // FIPS 180-2 appendix B.1: SHA-256("abc").
        let d = Sha256Digest::of(b"abc");
        assert_eq!(
            d.to_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(d.to_hex().to_uppercase().parse::<Sha256Digest>(), Ok(d));
        assert!("abc".parse::<Sha256Digest>().is_err());
        assert_eq!(Sha256Digest::from_slice(&[0; 31]), None);
    }
}

/// What one pass over a file yields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileDigest {
    pub sha256: Sha256Digest,
    /// CRC-32/IEEE of the whole file, as the S3 `x-amz-checksum-crc32` header wants it.
    pub crc32: u32,
    pub size: u64,
}

/// Bytes read per call while hashing a file.
const HASH_BUFFER_BYTES: usize = 1 << 20;

/// SHA-256, CRC-32 and size of a file in one pass with a 1 MiB buffer
/// (blocking: call it from a blocking thread, or use [`hash_file_async`]).
pub fn hash_file(path: &std::path::Path) -> std::io::Result<FileDigest> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut buf = vec![0u8; HASH_BUFFER_BYTES];
    let mut sha = Sha256::new();
    let mut crc = crc32fast::Hasher::new();
    let mut size = 0u64;
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        sha.update(&buf[..n]);
        crc.update(&buf[..n]);
        size += n as u64;
    }
    Ok(FileDigest {
        sha256: Sha256Digest::from_hasher(sha),
        crc32: crc.finalize(),
        size,
    })
}

/// [`hash_file`] on a blocking thread.
pub async fn hash_file_async(path: &std::path::Path) -> std::io::Result<FileDigest> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || hash_file(&path))
        .await
        .map_err(std::io::Error::other)?
}
