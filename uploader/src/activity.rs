//! When an Upload call's request body last delivered bytes.
//!
//! tonic hands the service whole messages only. A chunk of several MiB on a
//! slow link takes longer to arrive than the ingest idle timeout while bytes
//! are flowing all along, so the timeout must count from the last bytes
//! received, not from the last complete message. [`BodyActivityLayer`] wraps
//! the body of `Recordings/Upload` requests, stamps each data frame into a
//! [`BodyActivity`] it puts in the request's extensions, and the Upload
//! handler runs the ingest inside [`BODY_ACTIVITY`] so that
//! [`crate::ingest::next_message`] can see it.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Instant,
};

use http_body_util::BodyExt as _;

/// The one path whose body is watched.
const UPLOAD_PATH: &str = "/recvault.uploader.v1.Recordings/Upload";

/// The time of the last data received on one request body.
#[derive(Debug, Clone)]
pub struct BodyActivity {
    base: Instant,
    /// Nanoseconds after `base`.
    last: Arc<AtomicU64>,
}

impl Default for BodyActivity {
    fn default() -> Self {
        Self {
            base: Instant::now(),
            last: Arc::default(),
        }
    }
}

impl BodyActivity {
    /// Records that bytes arrived now.
    pub fn touch(&self) {
        let nanos = u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last.fetch_max(nanos, Ordering::Relaxed);
    }

    /// When bytes last arrived (the creation time if none did yet).
    pub fn last(&self) -> Instant {
        self.base + std::time::Duration::from_nanos(self.last.load(Ordering::Relaxed))
    }
}

tokio::task_local! {
    /// The activity of the Upload call this task serves, if its body is watched.
    pub static BODY_ACTIVITY: BodyActivity;
}

/// Wraps the request body of `Recordings/Upload`; see the module docs.
#[derive(Debug, Clone, Copy, Default)]
pub struct BodyActivityLayer;

impl<S> tower::Layer<S> for BodyActivityLayer {
    type Service = WatchBody<S>;

    fn layer(&self, inner: S) -> Self::Service {
        WatchBody { inner }
    }
}

/// See [`BodyActivityLayer`].
#[derive(Debug, Clone)]
pub struct WatchBody<S> {
    inner: S,
}

impl<S, R> tower::Service<http::Request<tonic::body::Body>> for WatchBody<S>
where
    S: tower::Service<http::Request<tonic::body::Body>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        if request.uri().path() != UPLOAD_PATH {
            return Box::pin(self.inner.call(request));
        }
        let activity = BodyActivity::default();
        let (mut parts, body) = request.into_parts();
        parts.extensions.insert(activity.clone());
        let body = body.map_frame(move |frame| {
            if frame.is_data() {
                activity.touch();
            }
            frame
        });
        Box::pin(self.inner.call(http::Request::from_parts(
            parts,
            tonic::body::Body::new(body),
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn touch_moves_last_forward_only() {
        let activity = BodyActivity::default();
        let created = activity.last();
        std::thread::sleep(std::time::Duration::from_millis(5));
        activity.touch();
        let touched = activity.last();
        assert!(touched >= created + std::time::Duration::from_millis(5));
        // A clone shares the stamp.
        let clone = activity.clone();
        std::thread::sleep(std::time::Duration::from_millis(2));
        clone.touch();
        assert!(activity.last() > touched);
    }
}
