//! Where a delivery reads a recording from. Backups are encrypted at rest, so
//! a destination never opens backup files itself: it asks its [`Source`] for
//! plaintext ranges, which the source reads (and, for an encrypted backup,
//! decrypts and authenticates). A destination may open several ranges at once
//! (multipart parts in parallel) and may read a range twice (CRC-32 first,
//! then the upload itself).

use std::{
    fmt, io,
    io::SeekFrom,
    path::{Path, PathBuf},
    pin::Pin,
};

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncSeekExt as _};

/// A reader of plaintext bytes.
pub type RangeReader = Pin<Box<dyn AsyncRead + Send>>;

/// What [`Source::open_range`] returns. Owns what it needs, so it can run on
/// another task.
pub type RangeFuture = Pin<Box<dyn Future<Output = io::Result<RangeReader>> + Send + 'static>>;

/// A recording's plaintext, readable by range.
pub trait Source: Send + Sync + fmt::Debug {
    /// Plaintext size in bytes.
    fn size(&self) -> u64;

    /// Ranges starting at a multiple of this are cheapest (1 for a plain
    /// file; the segment size for an encrypted backup).
    fn alignment(&self) -> u64 {
        1
    }

    /// A reader of the bytes `offset .. offset + len`; `offset + len` must not
    /// exceed [`Source::size`]. A read fails with [`io::ErrorKind::InvalidData`]
    /// when the stored bytes do not authenticate (the backup was modified).
    fn open_range(&self, offset: u64, len: u64) -> RangeFuture;
}

/// A plaintext file: downloaded copies, tests and benchmarks.
#[derive(Debug, Clone)]
pub struct FileSource {
    path: PathBuf,
    size: u64,
}

impl FileSource {
    /// The file at `path`, with its current size.
    pub async fn open(path: impl AsRef<Path>) -> io::Result<Self> {
        let path = path.as_ref().to_owned();
        let size = tokio::fs::metadata(&path).await?.len();
        Ok(Self { path, size })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Source for FileSource {
    fn size(&self) -> u64 {
        self.size
    }

    fn open_range(&self, offset: u64, len: u64) -> RangeFuture {
        let path = self.path.clone();
        let size = self.size;
        Box::pin(async move {
            if offset.checked_add(len).is_none_or(|end| end > size) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("range {offset}+{len} is past the end of a {size}-byte source"),
                ));
            }
            let mut file = tokio::fs::File::open(&path).await?;
            file.seek(SeekFrom::Start(offset)).await?;
            let reader: RangeReader = Box::pin(file.take(len));
            Ok(reader)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn file_source_reads_exact_ranges() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..=255u8).cycle().take(10_000).collect();
        std::fs::write(&path, &data).expect("write");
        let source = FileSource::open(&path).await.expect("open");
        assert_eq!(source.size(), 10_000);
        for (offset, len) in [(0, 10_000), (1, 0), (4096, 4097), (9_999, 1)] {
            let mut out = Vec::new();
            source
                .open_range(offset, len)
                .await
                .expect("range")
                .read_to_end(&mut out)
                .await
                .expect("read");
            assert_eq!(out, data[offset as usize..(offset + len) as usize]);
        }
        let past = source.open_range(9_999, 2).await;
        assert!(past.is_err(), "a range past the end is refused");
    }
}
