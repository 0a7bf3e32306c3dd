//! A recording [`Source`] for tests whose stored bytes stop authenticating at
//! a chosen byte, as an encrypted backup that was modified does: a range
//! covering that byte yields the plaintext before it, then its read fails
//! with [`std::io::ErrorKind::InvalidData`]. The bytes come from a real file
//! ([`FileSource`]); only the failure is made up.
//!
//! Use from a test crate with `#[path = "support/source.rs"] mod source_support;`.
#![allow(dead_code)]

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use recvault_uploader::destination::{FileSource, RangeFuture, RangeReader, Source};
use tokio::io::{AsyncRead, AsyncReadExt as _, ReadBuf};

/// What the failing read reports.
pub const UNAUTHENTIC: &str = "segment does not authenticate: the stored bytes were modified";

/// [`FileSource`] whose byte `at` does not authenticate.
#[derive(Debug)]
pub struct UnauthenticSource {
    inner: FileSource,
    at: u64,
    /// Ranges over `at` still to read cleanly before the failure starts.
    clean: AtomicUsize,
    /// Ranges over `at` opened so far (clean or not).
    opened: AtomicUsize,
}

impl UnauthenticSource {
    /// Byte `at` of `inner` fails, from the `clean + 1`-th range covering it
    /// on (`clean` = 1: the first read of a range succeeds, the second fails,
    /// as when a multipart part's CRC-32 pass reads cleanly and its upload
    /// then meets the modified segment).
    pub fn new(inner: FileSource, at: u64, clean: usize) -> Self {
        assert!(
            at < inner.size(),
            "the failing byte must be inside the file"
        );
        Self {
            inner,
            at,
            clean: AtomicUsize::new(clean),
            opened: AtomicUsize::new(0),
        }
    }

    /// How many ranges covering the failing byte were opened.
    pub fn opened_over_failure(&self) -> usize {
        self.opened.load(Ordering::SeqCst)
    }
}

impl Source for UnauthenticSource {
    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn open_range(&self, offset: u64, len: u64) -> RangeFuture {
        let covers = offset <= self.at && self.at - offset < len;
        if !covers {
            return self.inner.open_range(offset, len);
        }
        self.opened.fetch_add(1, Ordering::SeqCst);
        let clean = self
            .clean
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if clean {
            return self.inner.open_range(offset, len);
        }
        let before = self.inner.open_range(offset, self.at - offset);
        Box::pin(async move {
            let reader: RangeReader = Box::pin(before.await?.chain(Unauthentic));
            Ok(reader)
        })
    }
}

/// A reader that fails every read with `InvalidData`.
struct Unauthentic;

impl AsyncRead for Unauthentic {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        _: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, UNAUTHENTIC)))
    }
}
