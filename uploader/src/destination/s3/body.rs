//! Request bodies streamed from a [`Source`] range: a bounded buffer of
//! plaintext at a time, never the whole recording, and no file opened here.
//! What a failed read was is kept for the caller, because the SDK hands a
//! body's error back wrapped in its own dispatch error.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};

use aws_sdk_s3::primitives::{ByteStream, SdkBody};
use bytes::Bytes;
use futures_util::Stream as _;
use http_body::{Body, Frame, SizeHint};
use tokio_util::io::ReaderStream;

use crate::destination::{RangeFuture, RangeReader, Source};

/// The first error a body hit reading its source, shared between the body
/// (and the copies the SDK makes of it for retries) and the caller.
#[derive(Debug, Clone, Default)]
pub(super) struct ReadErrors(Arc<Mutex<Option<io::Error>>>);

impl ReadErrors {
    /// Keeps the first error; returns one of the same kind and message for
    /// the HTTP stack (`io::Error` is not `Clone`).
    fn record(&self, error: io::Error) -> io::Error {
        let copy = io::Error::new(error.kind(), error.to_string());
        let mut slot = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        slot.get_or_insert(error);
        copy
    }

    /// The backup failed authentication: reading it again cannot help.
    fn corrupt(&self) -> Option<io::Error> {
        let slot = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        slot.as_ref()
            .filter(|e| e.kind() == io::ErrorKind::InvalidData)
            .map(|e| io::Error::new(e.kind(), e.to_string()))
    }

    /// The error a body recorded, if any: when set, it is the cause of the
    /// request's failure, whatever the SDK reports.
    pub(super) fn take(&self) -> Option<io::Error> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take()
    }
}

/// A body of exactly `len` bytes read from `source` at `offset`, in chunks
/// of up to `buffer` bytes. The SDK may retry the request (it resends after
/// a 5xx or a broken connection): each retry reads the range again from the
/// source, so a retried body never replays bytes held in memory. A read
/// error ends the request with that error and is recorded in `errors`; once
/// a read failed authentication, later copies fail without reading.
pub(super) fn streamed(
    source: Arc<dyn Source>,
    offset: u64,
    len: u64,
    buffer: usize,
    errors: ReadErrors,
) -> ByteStream {
    ByteStream::new(SdkBody::retryable(move || {
        SdkBody::from_body_1_x(RangeBody {
            state: Mutex::new(State::Unopened(Arc::clone(&source))),
            offset,
            len,
            left: len,
            buffer,
            errors: errors.clone(),
            done: false,
        })
    }))
}

struct RangeBody {
    /// In a `Mutex` only so the body is `Sync`, as the SDK requires (the
    /// source's futures and readers are `Send` alone); `poll_frame` has
    /// `&mut self` and never locks it.
    state: Mutex<State>,
    offset: u64,
    len: u64,
    /// Bytes still to come.
    left: u64,
    buffer: usize,
    errors: ReadErrors,
    done: bool,
}

enum State {
    Unopened(Arc<dyn Source>),
    Opening(RangeFuture),
    Reading(ReaderStream<RangeReader>),
    Done,
}

impl RangeBody {
    fn fail(&mut self, error: io::Error) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        *self.state.get_mut().unwrap_or_else(PoisonError::into_inner) = State::Done;
        self.done = true;
        Poll::Ready(Some(Err(self.errors.record(error))))
    }
}

impl Body for RangeBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = self.get_mut();
        loop {
            let state = this.state.get_mut().unwrap_or_else(PoisonError::into_inner);
            match state {
                State::Unopened(source) => {
                    if let Some(error) = this.errors.corrupt() {
                        return this.fail(error);
                    }
                    *state = State::Opening(source.open_range(this.offset, this.len));
                }
                State::Opening(opening) => match ready!(opening.as_mut().poll(cx)) {
                    Ok(reader) => {
                        *state = State::Reading(ReaderStream::with_capacity(reader, this.buffer))
                    }
                    Err(error) => return this.fail(error),
                },
                State::Reading(stream) => match ready!(Pin::new(stream).poll_next(cx)) {
                    Some(Ok(chunk)) => {
                        let n = chunk.len() as u64;
                        if n > this.left {
                            return this.fail(io::Error::other(format!(
                                "the source returned more than the {} bytes of range {}+{}",
                                this.len, this.offset, this.len
                            )));
                        }
                        this.left -= n;
                        return Poll::Ready(Some(Ok(Frame::data(chunk))));
                    }
                    Some(Err(error)) => return this.fail(error),
                    None if this.left > 0 => {
                        return this.fail(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            format!(
                                "the source ended early: {} of the {} bytes of range {}+{} are missing",
                                this.left, this.len, this.offset, this.len
                            ),
                        ));
                    }
                    None => {
                        *state = State::Done;
                        this.done = true;
                    }
                },
                State::Done => return Poll::Ready(None),
            }
        }
    }

    // Only once the reader itself reported its end: a source may check
    // something at the end of a range, and that must still fail the request.
    fn is_end_stream(&self) -> bool {
        self.done
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.left)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::destination::FileSource;

    async fn file_source(data: &[u8]) -> (tempfile::TempDir, Arc<dyn Source>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("recording");
        std::fs::write(&path, data).unwrap();
        let source: Arc<dyn Source> = Arc::new(FileSource::open(&path).await.unwrap());
        (dir, source)
    }

    /// The body is exactly the range, in chunks of at most the buffer size,
    /// and a copy made for a retry reads the same range again from the source.
    #[tokio::test]
    async fn body_is_the_range_and_a_retry_rereads_it() {
        let data: Vec<u8> = (0..1_000_003u32).map(|i| (i % 251) as u8).collect();
        let (_dir, source) = file_source(&data).await;
        let errors = ReadErrors::default();
        let (offset, len) = (70_001u64, 600_000u64);
        let body = streamed(source, offset, len, 64 * 1024, errors.clone()).into_inner();
        assert_eq!(body.content_length(), Some(len));
        let retry = body.try_clone().expect("retryable");
        let range = &data[offset as usize..(offset + len) as usize];

        let mut stream = ByteStream::new(body);
        let mut first = Vec::new();
        while let Some(chunk) = stream.try_next().await.unwrap() {
            assert!(chunk.len() <= 64 * 1024, "{}", chunk.len());
            first.extend_from_slice(&chunk);
        }
        assert_eq!(first, range);
        let again = ByteStream::new(retry).collect().await.unwrap().into_bytes();
        assert_eq!(&again[..], range);
        assert!(errors.take().is_none());
    }

    /// A source that ends early fails the body (the request must not go out
    /// short) and the error is kept for the caller.
    #[tokio::test]
    async fn short_source_fails_the_body() {
        #[derive(Debug)]
        struct Short(Arc<dyn Source>);
        impl Source for Short {
            fn size(&self) -> u64 {
                self.0.size()
            }
            fn open_range(&self, offset: u64, len: u64) -> RangeFuture {
                self.0.open_range(offset, len - 1)
            }
        }
        let (_dir, file) = file_source(&[7u8; 5000]).await;
        let errors = ReadErrors::default();
        let body = streamed(Arc::new(Short(file)), 0, 5000, 1024, errors.clone());
        body.collect().await.unwrap_err();
        let kept = errors.take().unwrap();
        assert_eq!(kept.kind(), io::ErrorKind::UnexpectedEof);
        assert!(kept.to_string().contains("1 of the 5000 bytes"), "{kept}");
    }
}
