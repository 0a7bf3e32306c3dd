//! Memory for secrets: locked into RAM, zeroized on drop, never printed.
//!
//! `SecretBytes` has no `Clone`, no `Display` and a redacted `Debug`; reading
//! the bytes is an explicit, named call (`expose_secret`) that reviewers can grep.

use std::fmt;

use zeroize::Zeroize;

use crate::hardening;

/// Secret bytes in a fixed, mlocked heap buffer that is zeroized on drop.
pub struct SecretBytes {
    bytes: Box<[u8]>,
    locked: bool,
}

impl SecretBytes {
    /// Takes ownership of `bytes`. The vector is moved, not copied; its spare
    /// capacity (if any) is zeroized before the buffer is shrunk.
    pub fn new(mut bytes: Vec<u8>) -> Self {
        if bytes.len() != bytes.capacity() {
            // Shrinking may reallocate: copy into an exact-size buffer and wipe the old one.
            let exact: Box<[u8]> = bytes.as_slice().into();
            bytes.zeroize();
            return Self::from_boxed(exact);
        }
        Self::from_boxed(bytes.into_boxed_slice())
    }

    /// Copies `bytes` into locked memory. The caller wipes its own copy.
    pub fn from_slice(bytes: &[u8]) -> Self {
        Self::from_boxed(bytes.into())
    }

    /// A zero-filled secret of `len` bytes, to be filled in place (key generation).
    pub fn zeroed(len: usize) -> Self {
        Self::from_boxed(vec![0u8; len].into_boxed_slice())
    }

    fn from_boxed(bytes: Box<[u8]>) -> Self {
        let locked = hardening::lock(&bytes);
        Self { bytes, locked }
    }

    /// The secret itself. Every call site is a place where plaintext is used.
    pub fn expose_secret(&self) -> &[u8] {
        &self.bytes
    }

    /// Mutable access, for filling a buffer from a CSPRNG or a decryption.
    pub fn expose_secret_mut(&mut self) -> &mut [u8] {
        &mut self.bytes
    }

    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Whether the pages are locked in RAM (false when RLIMIT_MEMLOCK refused).
    pub fn is_locked(&self) -> bool {
        self.locked
    }
}

impl Drop for SecretBytes {
    fn drop(&mut self) {
        self.bytes.zeroize();
        if self.locked {
            hardening::unlock(&self.bytes);
        }
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBytes([REDACTED; {} bytes])", self.bytes.len())
    }
}

impl PartialEq for SecretBytes {
    /// Constant-time in the contents (lengths are not secret).
    fn eq(&self, other: &Self) -> bool {
        use subtle::ConstantTimeEq;
        self.bytes.ct_eq(&other.bytes).into()
    }
}

impl Eq for SecretBytes {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_is_redacted() {
        let s = SecretBytes::from_slice(b"hunter2-very-secret");
        let shown = format!("{s:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("REDACTED"));
        assert_eq!(s.expose_secret(), b"hunter2-very-secret");
    }

    #[test]
    fn new_keeps_exact_contents() {
        let mut v = Vec::with_capacity(64);
        v.extend_from_slice(b"abc");
        let s = SecretBytes::new(v);
        assert_eq!(s.expose_secret(), b"abc");
        assert_eq!(s.len(), 3);
    }
}

/// Why [`read_private_file`] refused a file.
#[derive(Debug)]
pub enum PrivateFileError {
    /// It could not be opened or read.
    Io(std::io::Error),
    /// It is not a regular file.
    NotAFile,
    /// Group or others may access it (its permission bits).
    Permissions(u32),
}

/// Reads a key file of at most `max_len` bytes that only its owner may
/// access, into locked, zeroizing memory. The checks run on the opened file
/// (fstat), so a swap of the path cannot slip in between. Returns a buffer
/// of `max_len + 1` bytes and how many were read: a length over `max_len`
/// means trailing content, which the caller refuses.
pub fn read_private_file(
    path: &std::path::Path,
    max_len: usize,
) -> Result<(SecretBytes, usize), PrivateFileError> {
    use std::io::Read as _;
    use std::os::unix::fs::PermissionsExt as _;
    let mut file = std::fs::File::open(path).map_err(PrivateFileError::Io)?;
    let meta = file.metadata().map_err(PrivateFileError::Io)?;
    if !meta.is_file() {
        return Err(PrivateFileError::NotAFile);
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(PrivateFileError::Permissions(mode));
    }
    let mut buf = SecretBytes::zeroed(max_len + 1);
    let mut len = 0;
    while len < buf.len() {
        match file.read(&mut buf.expose_secret_mut()[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(PrivateFileError::Io(e)),
        }
    }
    Ok((buf, len))
}
