//! A256CBC-HS512 (RFC 7518 §5.2) and the sealed-credential envelope stored in the database.
//! Primitives come from RustCrypto (`aes`, `cbc`, `hmac`, `sha2`); this module only composes them.
//! It may not implement a primitive, log, or reveal which check failed: every failure is one opaque [`CryptoError`].

use aes::Aes256;
use cbc::cipher::block_padding::{NoPadding, Pkcs7};
use cbc::cipher::{BlockModeDecrypt, BlockModeEncrypt, KeyIvInit};
use hmac::{Hmac, KeyInit, Mac};
use recvault_runtime::secret::SecretBytes;
use sha2::Sha512;
use std::cell::RefCell;
use zeroize::Zeroize;

type Aes256CbcEnc = cbc::Encryptor<Aes256>;
type Aes256CbcDec = cbc::Decryptor<Aes256>;
type HmacSha512 = Hmac<Sha512>;

/// Length of an A256CBC-HS512 key: MAC_KEY (32) ‖ ENC_KEY (32), RFC 7518 §5.2.5.
pub const KEY_LEN: usize = 64;
/// Length of the MAC_KEY and of the ENC_KEY halves (RFC 7518 §5.2.5).
pub const HALF_KEY_LEN: usize = 32;
/// Length of the CBC initialization vector (one AES block).
pub const IV_LEN: usize = 16;
/// Length of the authentication tag: HMAC-SHA-512 truncated to its first 256 bits (T_LEN, RFC 7518 §5.2.5).
pub const TAG_LEN: usize = 32;
/// AES block length.
const BLOCK_LEN: usize = 16;

/// Any cryptographic failure: bad length, bad tag, bad padding, unknown header,
/// unknown or retired key version, or an unavailable OS random number generator.
///
/// Deliberately opaque: it never says which check failed, so callers cannot build
/// a padding or format oracle out of it. Its message is always "decryption failed".
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("decryption failed")]
pub struct CryptoError;

/// A 64-byte A256CBC-HS512 key (RFC 7518 §5.2.5): the first 32 bytes are MAC_KEY,
/// the last 32 bytes are ENC_KEY. Held in locked, zeroized memory; `Debug` is redacted.
pub struct A256CbcHs512Key(SecretBytes);

impl A256CbcHs512Key {
    /// Takes ownership of a 64-byte key; any other length is refused.
    pub fn new(key: SecretBytes) -> Result<Self, CryptoError> {
        if key.len() == KEY_LEN {
            Ok(Self(key))
        } else {
            Err(CryptoError)
        }
    }

    /// Copies a 64-byte key into locked memory. The caller wipes its own copy.
    pub fn from_slice(key: &[u8]) -> Result<Self, CryptoError> {
        Self::new(SecretBytes::from_slice(key))
    }

    /// MAC_KEY = initial octets of K (RFC 7518 §5.2.2.1 step 1).
    fn mac_key(&self) -> &[u8; HALF_KEY_LEN] {
        self.0
            .expose_secret()
            .first_chunk()
            .expect("A256CbcHs512Key is 64 bytes by construction")
    }

    /// ENC_KEY = final octets of K (RFC 7518 §5.2.2.1 step 1).
    fn enc_key(&self) -> &[u8; HALF_KEY_LEN] {
        self.0
            .expose_secret()
            .last_chunk()
            .expect("A256CbcHs512Key is 64 bytes by construction")
    }
}

impl std::fmt::Debug for A256CbcHs512Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("A256CbcHs512Key([REDACTED])")
    }
}

/// The unauthenticated AES-256-CBC layer, exposed only so that known-answer tests
/// (NIST SP 800-38A F.2.5/F.2.6, Wycheproof AES-CBC-PKCS5) exercise the exact code
/// the AEAD uses. Never use it on stored data: nothing here checks integrity.
pub mod hazmat {
    use super::{
        Aes256CbcDec, Aes256CbcEnc, BLOCK_LEN, BlockModeDecrypt, BlockModeEncrypt, CryptoError,
        HALF_KEY_LEN, IV_LEN, KeyIvInit, NoPadding, Pkcs7, SecretBytes,
    };

    /// AES-256-CBC encryption of whole blocks, no padding (NIST SP 800-38A §6.2).
    /// Refuses input whose length is not a multiple of 16.
    pub fn cbc_encrypt_no_padding(
        key: &[u8; HALF_KEY_LEN],
        iv: &[u8; IV_LEN],
        plaintext: &[u8],
    ) -> Result<Vec<u8>, CryptoError> {
        if !plaintext.len().is_multiple_of(BLOCK_LEN) {
            return Err(CryptoError);
        }
        Ok(Aes256CbcEnc::new(key.into(), iv.into()).encrypt_padded_vec::<NoPadding>(plaintext))
    }

    /// AES-256-CBC decryption of whole blocks, no padding (NIST SP 800-38A §6.2).
    /// Refuses input whose length is not a multiple of 16.
    pub fn cbc_decrypt_no_padding(
        key: &[u8; HALF_KEY_LEN],
        iv: &[u8; IV_LEN],
        ciphertext: &[u8],
    ) -> Result<SecretBytes, CryptoError> {
        if !ciphertext.len().is_multiple_of(BLOCK_LEN) {
            return Err(CryptoError);
        }
        decrypt_into_secret::<NoPadding>(key, iv, ciphertext)
    }

    /// AES-256-CBC with PKCS#7 padding (RFC 5652 §6.3), as A256CBC-HS512 uses it
    /// (RFC 7518 §5.2.2.1 step 3).
    pub fn cbc_encrypt_pkcs7(
        key: &[u8; HALF_KEY_LEN],
        iv: &[u8; IV_LEN],
        plaintext: &[u8],
    ) -> Vec<u8> {
        Aes256CbcEnc::new(key.into(), iv.into()).encrypt_padded_vec::<Pkcs7>(plaintext)
    }

    /// AES-256-CBC decryption and PKCS#7 unpadding. Unauthenticated: a caller that
    /// reveals this function's failures to an attacker has built a padding oracle.
    pub fn cbc_decrypt_pkcs7(
        key: &[u8; HALF_KEY_LEN],
        iv: &[u8; IV_LEN],
        ciphertext: &[u8],
    ) -> Result<SecretBytes, CryptoError> {
        decrypt_into_secret::<Pkcs7>(key, iv, ciphertext)
    }

    /// [`cbc_decrypt_pkcs7`] into `buf` (at least as long as `ciphertext`),
    /// for callers that bring their own locked buffer; returns the plaintext
    /// part of it. The caller zeroizes `buf`.
    pub(crate) fn cbc_decrypt_pkcs7_in<'b>(
        key: &[u8; HALF_KEY_LEN],
        iv: &[u8; IV_LEN],
        ciphertext: &[u8],
        buf: &'b mut [u8],
    ) -> Result<&'b [u8], CryptoError> {
        Aes256CbcDec::new(key.into(), iv.into())
            .decrypt_padded_b2b::<Pkcs7>(ciphertext, buf)
            .map_err(|_| CryptoError)
    }

    /// Decrypts straight into locked memory, so no plaintext lands in an ordinary `Vec`.
    fn decrypt_into_secret<P: cbc::cipher::block_padding::Padding>(
        key: &[u8; HALF_KEY_LEN],
        iv: &[u8; IV_LEN],
        ciphertext: &[u8],
    ) -> Result<SecretBytes, CryptoError> {
        let mut buf = SecretBytes::zeroed(ciphertext.len());
        let len = Aes256CbcDec::new(key.into(), iv.into())
            .decrypt_padded_b2b::<P>(ciphertext, buf.expose_secret_mut())
            .map_err(|_| CryptoError)?
            .len();
        if len == buf.len() {
            return Ok(buf);
        }
        // `buf` (with the padding) is zeroized when it drops.
        Ok(SecretBytes::from_slice(&buf.expose_secret()[..len]))
    }
}

/// HMAC-SHA-512 over A ‖ IV ‖ C ‖ AL with MAC_KEY (RFC 7518 §5.2.2.1 steps 4–5).
/// `aad_parts` concatenated form A; AL is the bit length of A as a 64-bit
/// big-endian integer (§5.2.2.1 step 4).
fn tag_mac(key: &A256CbcHs512Key, aad_parts: &[&[u8]], iv: &[u8], ciphertext: &[u8]) -> HmacSha512 {
    let mut mac = <HmacSha512 as KeyInit>::new_from_slice(key.mac_key())
        .expect("HMAC accepts keys of any length");
    let mut aad_len: u64 = 0;
    for part in aad_parts {
        mac.update(part);
        // A slice can never come near 2^61 bytes, so the bit count cannot overflow.
        aad_len += part.len() as u64;
    }
    mac.update(iv);
    mac.update(ciphertext);
    mac.update(&(aad_len * 8).to_be_bytes());
    mac
}

fn encrypt_parts(
    key: &A256CbcHs512Key,
    iv: &[u8; IV_LEN],
    aad_parts: &[&[u8]],
    plaintext: &[u8],
) -> (Vec<u8>, [u8; TAG_LEN]) {
    // RFC 7518 §5.2.2.1 step 3: E = CBC-PKCS7-ENC(ENC_KEY, P).
    let ciphertext = hazmat::cbc_encrypt_pkcs7(key.enc_key(), iv, plaintext);
    // Step 6: T = first T_LEN octets of M.
    let full = tag_mac(key, aad_parts, iv, &ciphertext)
        .finalize()
        .into_bytes();
    let mut tag = [0u8; TAG_LEN];
    tag.copy_from_slice(&full[..TAG_LEN]);
    (ciphertext, tag)
}

fn decrypt_parts(
    key: &A256CbcHs512Key,
    iv: &[u8],
    aad_parts: &[&[u8]],
    ciphertext: &[u8],
    tag: &[u8],
) -> Result<SecretBytes, CryptoError> {
    let iv = verify_tag(key, iv, aad_parts, ciphertext, tag)?;
    hazmat::cbc_decrypt_pkcs7(key.enc_key(), iv, ciphertext)
}

/// RFC 7518 §5.2.2.2: checks the tag first, in constant time, so that callers
/// decrypt and unpad only authentic input and a bad padding is never
/// observable (no padding oracle). Returns the IV as a block.
fn verify_tag<'a>(
    key: &A256CbcHs512Key,
    iv: &'a [u8],
    aad_parts: &[&[u8]],
    ciphertext: &[u8],
    tag: &[u8],
) -> Result<&'a [u8; IV_LEN], CryptoError> {
    let iv: &[u8; IV_LEN] = iv.try_into().map_err(|_| CryptoError)?;
    if tag.len() != TAG_LEN {
        return Err(CryptoError);
    }
    tag_mac(key, aad_parts, iv, ciphertext)
        .verify_truncated_left(tag)
        .map_err(|_| CryptoError)?;
    Ok(iv)
}

/// A256CBC-HS512 encryption with a caller-chosen IV (RFC 7518 §5.2.2.1).
/// Returns the ciphertext E and the 32-byte tag T. Only for known-answer tests and
/// callers that draw the IV themselves; an IV must never repeat under one key.
pub fn encrypt_with_iv(
    key: &A256CbcHs512Key,
    iv: &[u8; IV_LEN],
    aad: &[u8],
    plaintext: &[u8],
) -> (Vec<u8>, [u8; TAG_LEN]) {
    encrypt_parts(key, iv, &[aad], plaintext)
}

/// Output of [`encrypt`]: the random IV, the ciphertext E and the tag T.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encrypted {
    /// The IV drawn from the OS CSPRNG.
    pub iv: [u8; IV_LEN],
    /// AES-256-CBC ciphertext with PKCS#7 padding.
    pub ciphertext: Vec<u8>,
    /// First 32 bytes of the HMAC-SHA-512 over AAD ‖ IV ‖ E ‖ AL.
    pub tag: [u8; TAG_LEN],
}

/// A256CBC-HS512 encryption with a fresh random IV from the OS CSPRNG.
/// Fails only when the OS cannot supply randomness.
pub fn encrypt(
    key: &A256CbcHs512Key,
    aad: &[u8],
    plaintext: &[u8],
) -> Result<Encrypted, CryptoError> {
    let iv = random_iv()?;
    let (ciphertext, tag) = encrypt_with_iv(key, &iv, aad, plaintext);
    Ok(Encrypted {
        iv,
        ciphertext,
        tag,
    })
}

/// A256CBC-HS512 decryption (RFC 7518 §5.2.2.2). The tag is verified in constant
/// time before any decryption or unpadding; every failure is the same [`CryptoError`].
pub fn decrypt(
    key: &A256CbcHs512Key,
    iv: &[u8],
    aad: &[u8],
    ciphertext: &[u8],
    tag: &[u8],
) -> Result<SecretBytes, CryptoError> {
    decrypt_parts(key, iv, &[aad], ciphertext, tag)
}

fn random_iv() -> Result<[u8; IV_LEN], CryptoError> {
    let mut iv = [0u8; IV_LEN];
    getrandom::fill(&mut iv).map_err(|_| CryptoError)?;
    Ok(iv)
}

// ---------------------------------------------------------------------------
// Sealed envelope: "RV" | format version | algorithm id | key version (u32 BE) | IV | C | T

/// Envelope magic bytes.
pub const ENVELOPE_MAGIC: [u8; 2] = *b"RV";
/// Envelope format version written by this code.
pub const ENVELOPE_FORMAT_VERSION: u8 = 1;
/// Length of the fixed envelope header.
pub const HEADER_LEN: usize = 8;
/// Shortest possible envelope: header, IV, one ciphertext block, tag.
pub const MIN_ENVELOPE_LEN: usize = HEADER_LEN + IV_LEN + BLOCK_LEN + TAG_LEN;

/// Content-encryption algorithm named in the envelope header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Algorithm {
    /// AES_256_CBC_HMAC_SHA_512, RFC 7518 §5.2.5.
    A256CbcHs512,
}

impl Algorithm {
    /// The id stored in the header.
    pub const fn id(self) -> u8 {
        match self {
            Self::A256CbcHs512 => 1,
        }
    }

    /// The algorithm for a stored id, if known.
    pub const fn from_id(id: u8) -> Option<Self> {
        match id {
            1 => Some(Self::A256CbcHs512),
            _ => None,
        }
    }
}

/// The authenticated, fixed-size header at the start of every sealed envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct EnvelopeHeader {
    /// Content-encryption algorithm.
    pub alg: Algorithm,
    /// Keyring version of the key that sealed the envelope.
    pub key_version: u32,
}

impl EnvelopeHeader {
    /// The header bytes: magic, format version, algorithm id, key version (big-endian).
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[..2].copy_from_slice(&ENVELOPE_MAGIC);
        out[2] = ENVELOPE_FORMAT_VERSION;
        out[3] = self.alg.id();
        out[4..].copy_from_slice(&self.key_version.to_be_bytes());
        out
    }
}

/// Reads the header of a sealed envelope without authenticating it (the tag is
/// checked by [`open_envelope`]). Refuses a short envelope, a wrong magic, an
/// unknown format version or an unknown algorithm.
pub fn parse_header(sealed: &[u8]) -> Result<EnvelopeHeader, CryptoError> {
    if sealed.len() < MIN_ENVELOPE_LEN {
        return Err(CryptoError);
    }
    let (header, _) = sealed
        .split_first_chunk::<HEADER_LEN>()
        .ok_or(CryptoError)?;
    if header[..2] != ENVELOPE_MAGIC || header[2] != ENVELOPE_FORMAT_VERSION {
        return Err(CryptoError);
    }
    let alg = Algorithm::from_id(header[3]).ok_or(CryptoError)?;
    let key_version = u32::from_be_bytes([header[4], header[5], header[6], header[7]]);
    Ok(EnvelopeHeader { alg, key_version })
}

/// Seals `plaintext` into an envelope under `key`, labelled with `key_version`,
/// with a fresh random IV. The header is prepended to `aad` as authenticated data,
/// so a changed key version or algorithm id makes [`open_envelope`] fail.
pub fn seal_envelope(
    key: &A256CbcHs512Key,
    key_version: u32,
    aad: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, CryptoError> {
    Ok(seal_envelope_with_iv(
        key,
        key_version,
        &random_iv()?,
        aad,
        plaintext,
    ))
}

/// [`seal_envelope`] with a caller-chosen IV, for deterministic tests only.
pub fn seal_envelope_with_iv(
    key: &A256CbcHs512Key,
    key_version: u32,
    iv: &[u8; IV_LEN],
    aad: &[u8],
    plaintext: &[u8],
) -> Vec<u8> {
    let header = EnvelopeHeader {
        alg: Algorithm::A256CbcHs512,
        key_version,
    }
    .encode();
    let (ciphertext, tag) = encrypt_parts(key, iv, &[&header, aad], plaintext);
    let mut out = Vec::with_capacity(HEADER_LEN + IV_LEN + ciphertext.len() + TAG_LEN);
    out.extend_from_slice(&header);
    out.extend_from_slice(iv);
    out.extend_from_slice(&ciphertext);
    out.extend_from_slice(&tag);
    out
}

/// Opens an envelope made by [`seal_envelope`]: parses the header, then verifies
/// the tag over header ‖ `aad` ‖ IV ‖ C before decrypting. The caller picks `key`
/// from the header's key version.
pub fn open_envelope(
    key: &A256CbcHs512Key,
    aad: &[u8],
    sealed: &[u8],
) -> Result<SecretBytes, CryptoError> {
    parse_header(sealed)?;
    let (header, rest) = sealed.split_at(HEADER_LEN);
    let (iv, rest) = rest.split_at(IV_LEN);
    let (ciphertext, tag) = rest.split_at(rest.len() - TAG_LEN);
    decrypt_parts(key, iv, &[header, aad], ciphertext, tag)
}

/// Envelopes with up to this much ciphertext are opened in [`SCRATCH`].
const SCRATCH_LEN: usize = 16 * 1024;

thread_local! {
    /// Per-thread locked buffer for [`open_envelope_with`], locked once and
    /// zeroized after every use. Locking a fresh allocation per call costs an
    /// mlock/munlock pair, each of which splits or merges a memory mapping
    /// under the process-wide mm lock; and since page locks do not nest, the
    /// munlock of a short-lived buffer also unlocks any long-lived key that
    /// shares its page.
    static SCRATCH: RefCell<Option<SecretBytes>> = const { RefCell::new(None) };
}

/// [`open_envelope`] that lends the plaintext to `f` instead of returning it:
/// the plaintext is decrypted into locked memory that is zeroized as soon as
/// `f` returns (a per-thread buffer locked once, or for big envelopes a
/// buffer locked for this call). For hot paths that copy the plaintext out
/// anyway, e.g. into a reply.
pub fn open_envelope_with<R>(
    key: &A256CbcHs512Key,
    aad: &[u8],
    sealed: &[u8],
    f: impl FnOnce(&[u8]) -> R,
) -> Result<R, CryptoError> {
    parse_header(sealed)?;
    let (header, rest) = sealed.split_at(HEADER_LEN);
    let (iv, rest) = rest.split_at(IV_LEN);
    let (ciphertext, tag) = rest.split_at(rest.len() - TAG_LEN);
    let iv = verify_tag(key, iv, &[header, aad], ciphertext, tag)?;
    let mut f = Some(f);
    if ciphertext.len() <= SCRATCH_LEN {
        // `None`: the thread is exiting or the buffer is in use further up the
        // stack; then fall through to a buffer of its own.
        let lent = SCRATCH
            .try_with(|cell| {
                let mut slot = cell.try_borrow_mut().ok()?;
                let scratch = slot.get_or_insert_with(|| SecretBytes::zeroed(SCRATCH_LEN));
                let buf = &mut scratch.expose_secret_mut()[..ciphertext.len()];
                let result = hazmat::cbc_decrypt_pkcs7_in(key.enc_key(), iv, ciphertext, buf)
                    .map(|plaintext| f.take().map(|f| f(plaintext)));
                buf.zeroize();
                Some(result)
            })
            .ok()
            .flatten();
        if let Some(result) = lent {
            return result?.ok_or(CryptoError);
        }
    }
    let plaintext = hazmat::cbc_decrypt_pkcs7(key.enc_key(), iv, ciphertext)?;
    f.take()
        .map(|f| f(plaintext.expose_secret()))
        .ok_or(CryptoError)
}

// ---------------------------------------------------------------------------
// Record binding

/// Domain string that opens every [`RecordAad`] encoding.
pub const RECORD_AAD_DOMAIN: &str = "recvault.credential.v1";

/// The record a credential ciphertext belongs to. Its encoding is the caller AAD of
/// the envelope, so a ciphertext copied to another tenant, row or version fails to open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordAad<'a> {
    /// Owning tenant.
    pub tenant_id: &'a str,
    /// Credential id within the tenant.
    pub credential_id: &'a str,
    /// Credential version (row version).
    pub credential_version: u32,
    /// Keyring version that sealed the record (also in the envelope header).
    pub key_version: u32,
}

impl RecordAad<'_> {
    /// Unambiguous encoding: each string as a 64-bit big-endian length followed by its
    /// bytes (domain, tenant, credential id), then both versions as 32-bit big-endian.
    pub fn encode(&self) -> Vec<u8> {
        let strings = [RECORD_AAD_DOMAIN, self.tenant_id, self.credential_id];
        let len: usize = strings.iter().map(|s| 8 + s.len()).sum::<usize>() + 8;
        let mut out = Vec::with_capacity(len);
        for s in strings {
            out.extend_from_slice(&(s.len() as u64).to_be_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        out.extend_from_slice(&self.credential_version.to_be_bytes());
        out.extend_from_slice(&self.key_version.to_be_bytes());
        out
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn key() -> A256CbcHs512Key {
        A256CbcHs512Key::from_slice(&(0u8..64).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn key_length_is_enforced() {
        assert_eq!(
            A256CbcHs512Key::from_slice(&[0u8; 63]).err(),
            Some(CryptoError)
        );
        assert!(A256CbcHs512Key::from_slice(&[0u8; 65]).is_err());
        assert!(A256CbcHs512Key::from_slice(&[0u8; 64]).is_ok());
    }

    #[test]
    fn error_is_opaque() {
        assert_eq!(CryptoError.to_string(), "decryption failed");
    }

    #[test]
    fn key_debug_is_redacted() {
        let shown = format!("{:?}", key());
        assert_eq!(shown, "A256CbcHs512Key([REDACTED])");
    }

    #[test]
    fn round_trip_and_random_iv() {
        let k = key();
        let one = encrypt(&k, b"aad", b"secret").unwrap();
        let two = encrypt(&k, b"aad", b"secret").unwrap();
        assert_ne!(one.iv, two.iv);
        assert_ne!(one.ciphertext, two.ciphertext);
        let p = decrypt(&k, &one.iv, b"aad", &one.ciphertext, &one.tag).unwrap();
        assert_eq!(p.expose_secret(), b"secret");
        assert!(decrypt(&k, &one.iv, b"aaD", &one.ciphertext, &one.tag).is_err());
    }

    #[test]
    fn bad_lengths_are_refused() {
        let k = key();
        let Encrypted {
            iv,
            ciphertext: c,
            tag: t,
        } = encrypt(&k, b"", b"x").unwrap();
        assert!(decrypt(&k, &iv[..15], b"", &c, &t).is_err());
        assert!(decrypt(&k, &iv, b"", &c, &t[..31]).is_err());
        assert!(decrypt(&k, &iv, b"", &c, &[]).is_err());
        assert!(decrypt(&k, &iv, b"", &c[..15], &t).is_err());
        assert!(decrypt(&k, &iv, b"", &[], &t).is_err());
    }

    /// A ciphertext with a *valid* tag but broken padding must fail with the same error
    /// as a bad tag: the tag check passes, the unpadding fails, the caller cannot tell.
    #[test]
    fn authentic_bad_padding_is_the_same_error() {
        let k = key();
        let iv = [7u8; IV_LEN];
        // One block whose last plaintext byte is 0x00: invalid PKCS#7.
        let ciphertext = hazmat::cbc_encrypt_no_padding(k.enc_key(), &iv, &[0u8; 16]).unwrap();
        let full = tag_mac(&k, &[b"a"], &iv, &ciphertext)
            .finalize()
            .into_bytes();
        let tag = &full[..TAG_LEN];
        assert_eq!(
            decrypt(&k, &iv, b"a", &ciphertext, tag).err(),
            Some(CryptoError)
        );
        let mut bad_tag = tag.to_vec();
        bad_tag[0] ^= 1;
        assert_eq!(
            decrypt(&k, &iv, b"a", &ciphertext, &bad_tag).err(),
            Some(CryptoError)
        );
    }

    #[test]
    fn header_round_trip_and_rejections() {
        let k = key();
        let sealed = seal_envelope(&k, 0x0102_0304, b"ctx", b"pw").unwrap();
        assert_eq!(&sealed[..HEADER_LEN], b"RV\x01\x01\x01\x02\x03\x04");
        assert_eq!(
            parse_header(&sealed).unwrap(),
            EnvelopeHeader {
                alg: Algorithm::A256CbcHs512,
                key_version: 0x0102_0304
            }
        );
        assert_eq!(
            open_envelope(&k, b"ctx", &sealed).unwrap().expose_secret(),
            b"pw"
        );
        assert_eq!(sealed.len(), MIN_ENVELOPE_LEN);
        assert!(parse_header(&sealed[..MIN_ENVELOPE_LEN - 1]).is_err());
        for (i, v) in [(0, b'X'), (1, b'X'), (2, 2), (3, 2), (3, 0)] {
            let mut bad = sealed.clone();
            bad[i] = v;
            assert!(parse_header(&bad).is_err(), "byte {i} = {v}");
            assert!(open_envelope(&k, b"ctx", &bad).is_err());
        }
        // A changed key version parses but no longer authenticates.
        let mut bad = sealed.clone();
        bad[7] ^= 1;
        assert!(parse_header(&bad).is_ok());
        assert!(open_envelope(&k, b"ctx", &bad).is_err());
    }

    #[test]
    fn open_with_lends_the_same_plaintext_and_the_same_refusals() {
        let k = key();
        // Empty, one block, across block edges, in the scratch buffer's last
        // block, and too big for it (its own buffer).
        for len in [
            0,
            1,
            15,
            16,
            17,
            100,
            SCRATCH_LEN - 1,
            SCRATCH_LEN,
            3 * SCRATCH_LEN,
        ] {
            let plaintext: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let sealed = seal_envelope(&k, 3, b"ctx", &plaintext).unwrap();
            let lent = open_envelope_with(&k, b"ctx", &sealed, <[u8]>::to_vec).unwrap();
            assert_eq!(lent, plaintext, "len {len}");
            // Nested use (the scratch buffer is busy) falls back and still works.
            let nested = open_envelope_with(&k, b"ctx", &sealed, |outer| {
                let inner = open_envelope_with(&k, b"ctx", &sealed, <[u8]>::to_vec).unwrap();
                (outer.to_vec(), inner)
            })
            .unwrap();
            assert_eq!(
                (nested.0.as_slice(), nested.1.as_slice()),
                (&plaintext[..], &plaintext[..])
            );
            assert!(open_envelope_with(&k, b"other", &sealed, |_| ()).is_err());
            for i in [0, HEADER_LEN, HEADER_LEN + IV_LEN, sealed.len() - 1] {
                let mut bad = sealed.clone();
                bad[i] ^= 0x80;
                let mut called = false;
                assert_eq!(
                    open_envelope_with(&k, b"ctx", &bad, |_| called = true),
                    Err(CryptoError),
                    "len {len}, byte {i}"
                );
                assert!(!called, "f must not see unauthenticated plaintext");
            }
        }
    }

    #[test]
    fn record_aad_is_unambiguous() {
        let a = |t, c, v, k| {
            RecordAad {
                tenant_id: t,
                credential_id: c,
                credential_version: v,
                key_version: k,
            }
            .encode()
        };
        let base = a("ab", "c", 1, 1);
        assert!(base.starts_with(&(RECORD_AAD_DOMAIN.len() as u64).to_be_bytes()));
        assert_ne!(base, a("a", "bc", 1, 1));
        assert_ne!(base, a("ab", "c", 2, 1));
        assert_ne!(base, a("ab", "c", 1, 2));
        assert_ne!(a("", "", 0, 0), a("", "", 0, 1));
        assert_eq!(base, a("ab", "c", 1, 1));
    }
}
