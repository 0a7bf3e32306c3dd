//! The encrypted backup format, version 1 (specified byte by byte in the
//! uploader's README, "Backup format"): a fixed header naming the algorithms,
//! the wrapped data key and the ids it is bound to, then AES-256-GCM segments
//! in the STREAM construction. This module only encodes, parses and seals;
//! it never reads files, and it never sees the wrapping private key.
//!
//! STREAM (Hoang, Reyhanitabar, Rogaway, Vizár, "Online Authenticated-Encryption
//! and its Nonce-Reuse Misuse-Resistance", CRYPTO 2015, §7; the same nonce
//! layout as RustCrypto `aead::stream::StreamBE32`): segment `i` is sealed
//! with nonce `prefix(7) ‖ u32be(i) ‖ u8(last)`. Every segment's associated
//! data is the SHA-256 of the header bytes, so a swapped header, a reordered,
//! dropped, duplicated or truncated segment, or a flipped byte anywhere fails
//! authentication.

use std::fmt;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use recvault_runtime::{datakey, secret::SecretBytes};
use sha2::{Digest as _, Sha256};

use crate::jobs::MAX_ID_LEN;

/// The first four bytes of every encrypted backup. A file without them was
/// written in clear by an uploader older than this format.
pub const MAGIC: [u8; 4] = *b"RVBK";
/// The only format version this uploader writes and reads.
pub const FORMAT_VERSION: u8 = 1;
/// AES-256-GCM, numbered as in the HPKE AEAD registry (RFC 9180 §7.3).
pub const AEAD_AES_256_GCM: u16 = 0x0002;
/// DHKEM(X25519, HKDF-SHA256) (RFC 9180 §7.1).
pub const KEM_X25519_HKDF_SHA256: u16 = 0x0020;
/// HKDF-SHA256 (RFC 9180 §7.2).
pub const KDF_HKDF_SHA256: u16 = 0x0001;
/// Plaintext bytes per segment (every segment but the last is exactly this long).
pub const SEGMENT_SIZE: u32 = 64 * 1024;
/// AES-GCM tag after each segment's ciphertext.
pub const TAG_LEN: usize = 16;
/// Random bytes at the start of every segment nonce, fresh per backup.
pub const NONCE_PREFIX_LEN: usize = 7;
/// HPKE `enc` of DHKEM(X25519): the sender's ephemeral public key (RFC 9180 §7.1).
pub const ENC_LEN: usize = 32;
/// The data key sealed with HPKE: 32 key bytes and a 16-byte tag.
pub const WRAPPED_KEY_LEN: usize = datakey::KEY_LEN + TAG_LEN;
/// Bytes of the header before the tenant id.
pub const FIXED_LEN: usize =
    4 + 1 + 2 + 2 + 2 + 2 + 4 + 4 + NONCE_PREFIX_LEN + ENC_LEN + WRAPPED_KEY_LEN;
/// The longest header a valid backup has (both ids at their longest).
pub const MAX_HEADER_LEN: usize = FIXED_LEN + 4 + MAX_ID_LEN + 4 + MAX_ID_LEN;
/// Segment sizes a reader accepts (the writer always uses [`SEGMENT_SIZE`]);
/// the bound keeps a damaged header from asking for a huge buffer.
const SEGMENT_SIZE_RANGE: std::ops::RangeInclusive<u32> = 1024..=(16 << 20);

/// Why bytes are not a version-1 backup header or layout. The message names
/// the field; none of these carry key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    /// The file does not start with [`MAGIC`].
    #[error("no RVBK magic: not an encrypted backup")]
    NoMagic,
    /// The file ends inside the header.
    #[error("the file ends inside the backup header (at byte {at}); the backup was cut short")]
    Truncated {
        /// Bytes present.
        at: usize,
    },
    /// A format version this uploader does not know.
    #[error(
        "backup format version {0} is not supported (this uploader reads version 1); use a newer uploader"
    )]
    Version(u8),
    /// An algorithm id this uploader does not implement.
    #[error("header field {field} is 0x{value:04x}; this uploader supports only 0x{expected:04x}")]
    Algorithm {
        /// Which id.
        field: &'static str,
        /// What the header holds.
        value: u16,
        /// What version 1 uses.
        expected: u16,
    },
    /// The segment size is out of range.
    #[error("header field segment_size is {0}, outside 1 KiB..16 MiB; the header is damaged")]
    SegmentSize(u32),
    /// An id is longer than ids may be or not UTF-8.
    #[error(
        "header field {field} is not a valid id (at most {MAX_ID_LEN} bytes of UTF-8); the header is damaged"
    )]
    Id {
        /// `tenant_id` or `recording_id`.
        field: &'static str,
    },
    /// The bytes after the header do not form whole segments.
    #[error("{0}; the backup was cut short or extended")]
    Layout(&'static str),
}

/// A parsed (or freshly built) backup header, with its exact bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct Header {
    /// Generation of the vault's wrapping key the data key is wrapped to.
    pub key_version: u32,
    /// Plaintext bytes per segment.
    pub segment_size: u32,
    /// Random per backup; first seven bytes of every segment nonce.
    pub nonce_prefix: [u8; NONCE_PREFIX_LEN],
    /// HPKE encapsulated key of the wrap.
    pub enc: [u8; ENC_LEN],
    /// HPKE ciphertext of the data key.
    pub wrapped_key: [u8; WRAPPED_KEY_LEN],
    /// The tenant the wrap is bound to.
    pub tenant_id: String,
    /// The recording the wrap is bound to.
    pub recording_id: String,
    bytes: Vec<u8>,
    digest: [u8; 32],
}

impl fmt::Debug for Header {
    // Nothing here is secret (the wrapped key opens only in the vault); the
    // long byte fields are left out to keep logs readable.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Header")
            .field("key_version", &self.key_version)
            .field("segment_size", &self.segment_size)
            .field("tenant_id", &self.tenant_id)
            .field("recording_id", &self.recording_id)
            .finish_non_exhaustive()
    }
}

impl Header {
    /// Encodes a version-1 header.
    pub fn new(
        key_version: u32,
        nonce_prefix: [u8; NONCE_PREFIX_LEN],
        enc: [u8; ENC_LEN],
        wrapped_key: [u8; WRAPPED_KEY_LEN],
        tenant_id: &str,
        recording_id: &str,
    ) -> Self {
        let mut bytes = Vec::with_capacity(FIXED_LEN + 8 + tenant_id.len() + recording_id.len());
        bytes.extend_from_slice(&MAGIC);
        bytes.push(FORMAT_VERSION);
        bytes.extend_from_slice(&AEAD_AES_256_GCM.to_be_bytes());
        bytes.extend_from_slice(&KEM_X25519_HKDF_SHA256.to_be_bytes());
        bytes.extend_from_slice(&KDF_HKDF_SHA256.to_be_bytes());
        bytes.extend_from_slice(&AEAD_AES_256_GCM.to_be_bytes());
        bytes.extend_from_slice(&key_version.to_be_bytes());
        bytes.extend_from_slice(&SEGMENT_SIZE.to_be_bytes());
        bytes.extend_from_slice(&nonce_prefix);
        bytes.extend_from_slice(&enc);
        bytes.extend_from_slice(&wrapped_key);
        // The ids exactly as the wrap's associated data encodes them.
        bytes.extend_from_slice(&datakey::binding(tenant_id, recording_id));
        let digest = Sha256::digest(&bytes).into();
        Self {
            key_version,
            segment_size: SEGMENT_SIZE,
            nonce_prefix,
            enc,
            wrapped_key,
            tenant_id: tenant_id.to_owned(),
            recording_id: recording_id.to_owned(),
            bytes,
            digest,
        }
    }

    /// Parses the header at the start of `buf` (the first bytes of a backup
    /// file; more may follow). [`FormatError::NoMagic`] for a file in clear.
    pub fn parse(buf: &[u8]) -> Result<Self, FormatError> {
        let mut r = Reader { buf, at: 0 };
        if r.take(4)? != MAGIC {
            return Err(FormatError::NoMagic);
        }
        let version = r.take(1)?[0];
        if version != FORMAT_VERSION {
            return Err(FormatError::Version(version));
        }
        for (field, expected) in [
            ("segment_aead", AEAD_AES_256_GCM),
            ("wrap_kem", KEM_X25519_HKDF_SHA256),
            ("wrap_kdf", KDF_HKDF_SHA256),
            ("wrap_aead", AEAD_AES_256_GCM),
        ] {
            let value = r.u16()?;
            if value != expected {
                return Err(FormatError::Algorithm {
                    field,
                    value,
                    expected,
                });
            }
        }
        let key_version = r.u32()?;
        let segment_size = r.u32()?;
        if !SEGMENT_SIZE_RANGE.contains(&segment_size) {
            return Err(FormatError::SegmentSize(segment_size));
        }
        let nonce_prefix = r.array()?;
        let enc = r.array()?;
        let wrapped_key = r.array()?;
        let tenant_id = r.id("tenant_id")?;
        let recording_id = r.id("recording_id")?;
        let bytes = buf[..r.at].to_vec();
        let digest = Sha256::digest(&bytes).into();
        Ok(Self {
            key_version,
            segment_size,
            nonce_prefix,
            enc,
            wrapped_key,
            tenant_id,
            recording_id,
            bytes,
            digest,
        })
    }

    /// The header exactly as stored.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Length of the header in the file; segments start here.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Never true: a header has at least its fixed fields.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// The HPKE associated data of the wrap: tenant and recording, length-prefixed.
    pub fn binding(&self) -> Vec<u8> {
        datakey::binding(&self.tenant_id, &self.recording_id)
    }

    /// Segment `index`'s nonce: prefix ‖ u32be(index) ‖ u8(last).
    pub fn nonce(&self, index: u32, last: bool) -> [u8; NONCE_LEN] {
        let mut n = [0u8; NONCE_LEN];
        n[..NONCE_PREFIX_LEN].copy_from_slice(&self.nonce_prefix);
        n[NONCE_PREFIX_LEN..NONCE_LEN - 1].copy_from_slice(&index.to_be_bytes());
        n[NONCE_LEN - 1] = u8::from(last);
        n
    }

    /// Where segments are in a backup file of `file_len` bytes with this header.
    pub fn layout(&self, file_len: u64) -> Result<Layout, FormatError> {
        Layout::new(self.len() as u64, u64::from(self.segment_size), file_len)
    }
}

/// Big-endian field reader over the header bytes.
struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FormatError> {
        let end = self.at + n;
        let out = self
            .buf
            .get(self.at..end)
            .ok_or(FormatError::Truncated { at: self.buf.len() })?;
        self.at = end;
        Ok(out)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], FormatError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }
    fn u16(&mut self) -> Result<u16, FormatError> {
        Ok(u16::from_be_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, FormatError> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    fn id(&mut self, field: &'static str) -> Result<String, FormatError> {
        let len = self.u32()? as usize;
        if len == 0 || len > MAX_ID_LEN {
            return Err(FormatError::Id { field });
        }
        let bytes = self.take(len)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| FormatError::Id { field })
    }
}

/// The segments of one backup file: how many, where, and how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Offset of segment 0.
    pub header_len: u64,
    /// Plaintext bytes of every segment but the last.
    pub segment_size: u64,
    /// Number of segments (at least 1: an empty recording has one empty last segment).
    pub segments: u64,
    /// Plaintext size of the whole recording.
    pub plaintext_size: u64,
}

impl Layout {
    /// Computes the layout from the file length. The last segment holds
    /// 1..=segment_size bytes, or 0 when it is the only one.
    pub fn new(header_len: u64, segment_size: u64, file_len: u64) -> Result<Self, FormatError> {
        let stride = segment_size + TAG_LEN as u64;
        let body = file_len
            .checked_sub(header_len)
            .filter(|b| *b >= TAG_LEN as u64)
            .ok_or(FormatError::Layout("no segment follows the header"))?;
        let segments = body.div_ceil(stride);
        let last_stored = body - (segments - 1) * stride;
        if last_stored < TAG_LEN as u64 || (segments > 1 && last_stored == TAG_LEN as u64) {
            return Err(FormatError::Layout(
                "the last segment is shorter than a tag or empty after full ones",
            ));
        }
        if segments > u64::from(u32::MAX) + 1 {
            return Err(FormatError::Layout("more segments than nonces"));
        }
        Ok(Self {
            header_len,
            segment_size,
            segments,
            plaintext_size: body - segments * TAG_LEN as u64,
        })
    }

    /// Offset in the file and stored length (ciphertext + tag) of segment `index`.
    pub fn stored_range(&self, index: u64) -> (u64, usize) {
        let stride = self.segment_size + TAG_LEN as u64;
        let start = self.header_len + index * stride;
        let plain = self.plain_len(index);
        (start, plain as usize + TAG_LEN)
    }

    /// Plaintext bytes in segment `index`.
    pub fn plain_len(&self, index: u64) -> u64 {
        if index + 1 < self.segments {
            self.segment_size
        } else {
            self.plaintext_size - (self.segments - 1) * self.segment_size
        }
    }

    /// Whether `index` is the last segment.
    pub fn is_last(&self, index: u64) -> bool {
        index + 1 == self.segments
    }
}

/// A segment did not authenticate: wrong key, or modified, moved or cut bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("segment {index} does not authenticate")]
pub struct Unauthentic {
    /// The segment.
    pub index: u64,
}

/// A recording's data key, expanded for AES-256-GCM. The raw key is dropped
/// (zeroized) as soon as this is built; aws-lc frees the key schedule with
/// `OPENSSL_free`, which wipes it.
pub struct SegmentKey(LessSafeKey);

impl fmt::Debug for SegmentKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SegmentKey([REDACTED])")
    }
}

/// The data key is not 32 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a backup data key is 32 bytes")]
pub struct BadKey;

impl SegmentKey {
    /// Expands `data_key` (32 bytes) and drops it.
    pub fn new(data_key: SecretBytes) -> Result<Self, BadKey> {
        let key = UnboundKey::new(&AES_256_GCM, data_key.expose_secret()).map_err(|_| BadKey)?;
        Ok(Self(LessSafeKey::new(key)))
    }

    /// Encrypts `segment` (plaintext) in place and appends its tag.
    pub fn seal(&self, header: &Header, index: u32, last: bool, segment: &mut Vec<u8>) {
        self.seal_tail(header, index, last, segment, 0);
    }

    /// Encrypts `buf[start..]` (segment `index`'s plaintext) in place and
    /// appends its tag, leaving `buf[..start]` (segments sealed before) as it is.
    pub fn seal_tail(
        &self,
        header: &Header,
        index: u32,
        last: bool,
        buf: &mut Vec<u8>,
        start: usize,
    ) {
        let nonce = Nonce::assume_unique_for_key(header.nonce(index, last));
        // AES-GCM sealing fails only for inputs past 2^36 bytes; a segment is at most 16 MiB.
        let tag = self
            .0
            .seal_in_place_separate_tag(nonce, Aad::from(&header.digest), &mut buf[start..])
            .unwrap_or_else(|_| unreachable!("AES-256-GCM seal of a bounded segment"));
        buf.extend_from_slice(tag.as_ref());
    }

    /// Decrypts segment `index` (ciphertext ‖ tag) in place; returns the plaintext.
    pub fn open<'a>(
        &self,
        header: &Header,
        index: u64,
        last: bool,
        stored: &'a mut [u8],
    ) -> Result<&'a mut [u8], Unauthentic> {
        let i = u32::try_from(index).map_err(|_| Unauthentic { index })?;
        let nonce = Nonce::assume_unique_for_key(header.nonce(i, last));
        self.0
            .open_in_place(nonce, Aad::from(&header.digest), stored)
            .map_err(|_| Unauthentic { index })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn header() -> Header {
        Header::new(1, [7; 7], [1; 32], [2; 48], "acme", "rec-1")
    }

    #[test]
    fn header_round_trips_and_is_laid_out_as_documented() {
        let h = header();
        let b = h.as_bytes();
        assert_eq!(&b[..4], b"RVBK");
        assert_eq!(b[4], 1);
        assert_eq!(&b[5..13], &[0, 2, 0, 0x20, 0, 1, 0, 2]);
        assert_eq!(&b[13..17], &1u32.to_be_bytes());
        assert_eq!(&b[17..21], &65536u32.to_be_bytes());
        assert_eq!(&b[21..28], &[7; 7]);
        assert_eq!(&b[28..60], &[1; 32]);
        assert_eq!(&b[60..108], &[2; 48]);
        assert_eq!(&b[108..], datakey::binding("acme", "rec-1").as_slice());
        assert_eq!(FIXED_LEN, 108);

        let mut with_body = b.to_vec();
        with_body.extend_from_slice(&[0xAA; 100]);
        let parsed = Header::parse(&with_body).unwrap();
        assert_eq!(parsed, h);
        assert_eq!(parsed.len(), b.len());
        assert_eq!(
            h.nonce(0x0102_0304, true),
            [7, 7, 7, 7, 7, 7, 7, 1, 2, 3, 4, 1]
        );
    }

    #[test]
    fn damaged_headers_are_refused_with_the_field() {
        let good = header().as_bytes().to_vec();
        assert_eq!(Header::parse(b"\0\0\0\0rest"), Err(FormatError::NoMagic));
        for cut in [4, 20, FIXED_LEN, good.len() - 1] {
            assert!(
                matches!(
                    Header::parse(&good[..cut]),
                    Err(FormatError::Truncated { .. })
                ),
                "{cut}"
            );
        }
        let mut v = good.clone();
        v[4] = 2;
        assert_eq!(Header::parse(&v), Err(FormatError::Version(2)));
        let mut v = good.clone();
        v[8] = 0x21;
        assert!(matches!(
            Header::parse(&v),
            Err(FormatError::Algorithm {
                field: "wrap_kem",
                ..
            })
        ));
        let mut v = good.clone();
        v[17..21].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(Header::parse(&v), Err(FormatError::SegmentSize(u32::MAX)));
        let mut v = good;
        v[108..112].copy_from_slice(&1000u32.to_be_bytes());
        assert_eq!(
            Header::parse(&v),
            Err(FormatError::Id { field: "tenant_id" })
        );
    }

    #[test]
    fn layout_of_every_boundary() {
        let s = 100u64;
        let t = TAG_LEN as u64;
        let l = Layout::new(10, s, 10 + t).unwrap();
        assert_eq!((l.segments, l.plaintext_size), (1, 0));
        let l = Layout::new(10, s, 10 + 1 + t).unwrap();
        assert_eq!((l.segments, l.plaintext_size), (1, 1));
        let l = Layout::new(10, s, 10 + s + t).unwrap();
        assert_eq!((l.segments, l.plaintext_size), (1, s));
        let l = Layout::new(10, s, 10 + 2 * (s + t) + 1 + t).unwrap();
        assert_eq!((l.segments, l.plaintext_size), (3, 2 * s + 1));
        assert_eq!(l.stored_range(2), (10 + 2 * (s + t), 1 + TAG_LEN));
        assert_eq!(l.plain_len(0), s);
        assert!(l.is_last(2) && !l.is_last(1));
        for bad in [0, 10, 10 + t - 1, 10 + s + t + 5, 10 + s + t + t] {
            assert!(Layout::new(10, s, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn segments_authenticate_index_position_and_header() {
        let h = header();
        let key = || SegmentKey::new(SecretBytes::from_slice(&[9; 32])).unwrap();
        let mut seg = b"hello".to_vec();
        key().seal(&h, 3, false, &mut seg);
        assert_eq!(seg.len(), 5 + TAG_LEN);
        assert_eq!(
            key().open(&h, 3, false, &mut seg.clone()).unwrap(),
            b"hello"
        );
        assert!(key().open(&h, 4, false, &mut seg.clone()).is_err(), "moved");
        assert!(
            key().open(&h, 3, true, &mut seg.clone()).is_err(),
            "made last"
        );
        let other = Header::new(1, [7; 7], [1; 32], [2; 48], "acme", "rec-2");
        assert!(
            key().open(&other, 3, false, &mut seg.clone()).is_err(),
            "other header"
        );
        let wrong = SegmentKey::new(SecretBytes::from_slice(&[8; 32])).unwrap();
        assert!(
            wrong.open(&h, 3, false, &mut seg.clone()).is_err(),
            "other key"
        );
        assert!(SegmentKey::new(SecretBytes::from_slice(&[8; 31])).is_err());
        assert_eq!(format!("{:?}", key()), "SegmentKey([REDACTED])");
    }
}
