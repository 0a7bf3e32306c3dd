//! [`EncryptedSource`]: a [`Source`] over an encrypted backup. It decrypts
//! only the segments a range needs, on the blocking pool, and hands the
//! plaintext to the reader through a small channel; plaintext exists only in
//! memory, a few segments at a time. A segment that does not authenticate
//! ends the read with [`io::ErrorKind::InvalidData`].
//!
//! The stored bytes come from a [`StoredObject`]: a file read by position,
//! or an object in the object store read by ranged GETs a few ahead. Either
//! way one pass reads its range in order with bounded memory.

use std::fmt;
use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use recvault_runtime::secret::SecretBytes;
use sha2::{Digest as _, Sha256};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::sync::mpsc;
use zeroize::Zeroize as _;

use super::format::{Header, Layout, SegmentKey};
use crate::destination::source::{RangeFuture, RangeReader, Source};
use crate::digest::{FileDigest, Sha256Digest};

/// Plaintext handed to the reader per message (several segments).
const BLOCK_BYTES: usize = 256 * 1024;
/// Blocks decrypted ahead of the reader.
const BLOCKS_AHEAD: usize = 2;

/// An encrypted backup and its data key, readable by plaintext range.
/// Cheap to clone; dropping the last clone drops (and wipes) the key.
#[derive(Clone)]
pub struct EncryptedSource {
    inner: Arc<Inner>,
}

/// Where an encrypted backup's stored bytes are (one kind per backend).
/// Blocking: call from the blocking pool or a thread of one's own.
pub(crate) trait StoredObject: Send + Sync + fmt::Debug + 'static {
    /// The backup's location, for messages (a path or an `s3://` location).
    fn location(&self) -> &Path;
    /// Stored bytes; [`io::ErrorKind::NotFound`] when the backup is gone.
    fn len(&self) -> io::Result<u64>;
    /// A reader of the stored bytes `start .. end`, which a pass reads in
    /// order (each read at or after the end of the one before).
    fn reader(&self, start: u64, end: u64) -> io::Result<Box<dyn StoredRead>>;
    /// The first `max` bytes (fewer when the object is shorter).
    fn read_head(&self, max: usize) -> io::Result<Vec<u8>>;
    /// Deletes the backup; one already gone is deleted.
    fn delete(&self) -> io::Result<()>;
    /// Whether the backup is stored.
    fn exists(&self) -> io::Result<bool>;
}

/// One pass over a stored range (see [`StoredObject::reader`]).
pub(crate) trait StoredRead: Send {
    /// Fills `buf` with the stored bytes at `offset`;
    /// [`io::ErrorKind::UnexpectedEof`] when the object ends before.
    fn read_exact_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

/// Stored bytes hashed per read by [`hash_stored`].
const HASH_READ: usize = 1024 * 1024;

/// SHA-256 and length of a stored object's bytes, read in order with
/// bounded memory (the scrub's re-hash, the object store's read-back).
pub(crate) fn hash_stored(object: &dyn StoredObject) -> io::Result<(Sha256Digest, u64)> {
    let len = object.len()?;
    let mut reader = object.reader(0, len)?;
    let mut sha = Sha256::new();
    let mut buf = vec![0u8; HASH_READ];
    let mut at = 0u64;
    while at < len {
        let n = (len - at).min(HASH_READ as u64) as usize;
        reader.read_exact_at(&mut buf[..n], at)?;
        sha.update(&buf[..n]);
        at += n as u64;
    }
    Ok((Sha256Digest::from_hasher(sha), len))
}

struct Inner {
    object: Arc<dyn StoredObject>,
    header: Header,
    layout: Layout,
    key: SegmentKey,
}

impl fmt::Debug for EncryptedSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EncryptedSource")
            .field("location", &self.inner.object.location())
            .field("size", &self.inner.layout.plaintext_size)
            .field("segments", &self.inner.layout.segments)
            .field("key", &"[REDACTED]")
            .finish()
    }
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

impl EncryptedSource {
    /// Opens the backup file at `path`, whose header is `header`, with its
    /// unwrapped `data_key` (dropped into the AES key schedule at once).
    ///
    /// The last segment is decrypted here: it authenticates the header, the
    /// key and the file's end, so a backup cut short, extended, or with a
    /// changed header fails now with [`io::ErrorKind::InvalidData`], even when
    /// no byte of it is read later (an empty recording).
    pub async fn open(path: &Path, header: Header, data_key: SecretBytes) -> io::Result<Self> {
        let file = super::local::FileObject::at(path);
        Self::open_stored(Arc::new(file), header, data_key).await
    }

    /// [`EncryptedSource::open`] for a backup in any backend.
    pub(crate) async fn open_stored(
        object: Arc<dyn StoredObject>,
        header: Header,
        data_key: SecretBytes,
    ) -> io::Result<Self> {
        let key = SegmentKey::new(data_key).map_err(|e| invalid(e.to_string()))?;
        tokio::task::spawn_blocking(move || {
            let layout = header
                .layout(object.len()?)
                .map_err(|e| invalid(format!("backup {}: {e}", object.location().display())))?;
            let inner = Inner {
                object,
                header,
                layout,
                key,
            };
            let last = layout.segments - 1;
            let mut reader = inner.reader(last, last)?;
            let mut stored = Vec::new();
            let mut plain = Vec::new();
            inner.read_segment(reader.as_mut(), last, &mut stored, &mut plain)?;
            plain.zeroize();
            Ok(Self {
                inner: Arc::new(inner),
            })
        })
        .await
        .map_err(io::Error::other)?
    }

    /// The header this backup was opened with.
    pub fn header(&self) -> &Header {
        &self.inner.header
    }

    /// SHA-256, CRC-32 and size of the whole plaintext, decrypting every
    /// segment in one pass on the blocking pool (the re-check before each
    /// delivery attempt). [`io::ErrorKind::InvalidData`] when one does not authenticate.
    pub async fn digest(&self) -> io::Result<FileDigest> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let mut reader = inner.reader(0, inner.layout.segments - 1)?;
            let mut sha = Sha256::new();
            let mut crc = crc32fast::Hasher::new();
            let mut stored = Vec::new();
            let mut plain = Vec::new();
            for index in 0..inner.layout.segments {
                plain.clear();
                inner.read_segment(reader.as_mut(), index, &mut stored, &mut plain)?;
                sha.update(&plain);
                crc.update(&plain);
            }
            plain.zeroize();
            Ok(FileDigest {
                sha256: Sha256Digest::from_hasher(sha),
                crc32: crc.finalize(),
                size: inner.layout.plaintext_size,
            })
        })
        .await
        .map_err(io::Error::other)?
    }
}

impl Inner {
    /// A reader of the stored bytes of segments `first ..= last`.
    fn reader(&self, first: u64, last: u64) -> io::Result<Box<dyn StoredRead>> {
        let (start, _) = self.layout.stored_range(first);
        let (last_start, last_len) = self.layout.stored_range(last);
        self.object.reader(start, last_start + last_len as u64)
    }

    /// Reads and decrypts segment `index`, appending its plaintext to `out`.
    fn read_segment(
        &self,
        reader: &mut dyn StoredRead,
        index: u64,
        stored: &mut Vec<u8>,
        out: &mut Vec<u8>,
    ) -> io::Result<()> {
        let (offset, len) = self.layout.stored_range(index);
        stored.resize(len, 0);
        reader.read_exact_at(stored, offset).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                invalid(format!(
                    "backup {} became shorter while it was read (segment {index})",
                    self.object.location().display()
                ))
            } else {
                e
            }
        })?;
        let last = self.layout.is_last(index);
        let plain = self
            .key
            .open(&self.header, index, last, stored)
            .map_err(|e| {
                invalid(format!(
                    "backup {}: {e}: the stored bytes were modified, moved or cut short",
                    self.object.location().display()
                ))
            })?;
        out.extend_from_slice(plain);
        plain.zeroize();
        Ok(())
    }

    /// Sends the plaintext of `offset .. offset + len` to `tx` in blocks.
    /// Stops early when the reader went away. Blocking.
    fn produce(&self, offset: u64, len: u64, tx: &mpsc::Sender<io::Result<Vec<u8>>>) {
        let result = (|| {
            let size = self.layout.segment_size;
            let end = offset + len;
            let (first, last) = (offset / size, (end - 1) / size);
            let mut reader = self.reader(first, last)?;
            let mut stored = Vec::new();
            let mut block = Vec::with_capacity(BLOCK_BYTES + size as usize);
            for index in first..=last {
                let seg_start = index * size;
                let before = block.len();
                self.read_segment(reader.as_mut(), index, &mut stored, &mut block)?;
                // Keep only the requested part of this segment.
                let from = offset.saturating_sub(seg_start) as usize;
                let to = (end.min(seg_start + size) - seg_start) as usize;
                block.truncate(before + to);
                block.drain(before..before + from);
                if block.len() >= BLOCK_BYTES || index == last {
                    let full = std::mem::replace(
                        &mut block,
                        Vec::with_capacity(BLOCK_BYTES + size as usize),
                    );
                    if tx.blocking_send(Ok(full)).is_err() {
                        return Ok(()); // the reader was dropped
                    }
                }
            }
            Ok(())
        })();
        if let Err(e) = result {
            let _ = tx.blocking_send(Err(e));
        }
    }
}

impl Source for EncryptedSource {
    fn size(&self) -> u64 {
        self.inner.layout.plaintext_size
    }

    fn alignment(&self) -> u64 {
        self.inner.layout.segment_size
    }

    fn open_range(&self, offset: u64, len: u64) -> RangeFuture {
        let inner = self.inner.clone();
        Box::pin(async move {
            let size = inner.layout.plaintext_size;
            if offset.checked_add(len).is_none_or(|end| end > size) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("range {offset}+{len} is past the end of a {size}-byte source"),
                ));
            }
            let (tx, rx) = mpsc::channel(BLOCKS_AHEAD);
            if len > 0 {
                tokio::task::spawn_blocking(move || inner.produce(offset, len, &tx));
            }
            let reader: RangeReader = Box::pin(BlockReader {
                rx,
                block: Vec::new(),
                pos: 0,
                remaining: len,
            });
            Ok(reader)
        })
    }
}

/// The reading end: plaintext blocks from the producer, in order.
struct BlockReader {
    rx: mpsc::Receiver<io::Result<Vec<u8>>>,
    block: Vec<u8>,
    pos: usize,
    /// Bytes still to come; the producer stopping before is an error, never a short read.
    remaining: u64,
}

impl AsyncRead for BlockReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            if self.pos < self.block.len() {
                let n = (self.block.len() - self.pos).min(buf.remaining());
                let pos = self.pos;
                buf.put_slice(&self.block[pos..pos + n]);
                self.pos += n;
                self.remaining -= n as u64;
                return Poll::Ready(Ok(()));
            }
            if self.remaining == 0 {
                return Poll::Ready(Ok(()));
            }
            match ready!(self.rx.poll_recv(cx)) {
                Some(Ok(block)) => {
                    self.block.zeroize();
                    self.block = block;
                    self.pos = 0;
                }
                Some(Err(e)) => return Poll::Ready(Err(e)),
                None => {
                    return Poll::Ready(Err(io::Error::other(
                        "the backup reader stopped before the end of the range",
                    )));
                }
            }
        }
    }
}

impl Drop for BlockReader {
    fn drop(&mut self) {
        self.block.zeroize();
    }
}
