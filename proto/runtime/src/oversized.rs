//! A message over a service's size cap is answered RESOURCE_EXHAUSTED, as
//! gRPC's status code table says ("a per-user quota … or the message is too
//! large"), not the OUT_OF_RANGE tonic's decoder gives it.
//!
//! Neither service answers OUT_OF_RANGE from a handler, so an OUT_OF_RANGE
//! is the decoder's: [`OversizedLayer`] rewrites it in a trailers-only answer
//! (a unary call refused before its handler), and [`oversized`] maps a stream
//! item the decoder refused (a streaming call's handler sees it).

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use http::HeaderValue;
use tonic::{Code, Status};

/// The decoder's refusal of an oversized message as RESOURCE_EXHAUSTED; any
/// other status unchanged.
pub fn oversized(status: Status) -> Status {
    if status.code() == Code::OutOfRange {
        Status::resource_exhausted(status.message().to_owned())
    } else {
        status
    }
}

/// Add with `Server::builder().layer(...)`, inside any layer that reads the
/// answer's code (the vault's refusal audit).
#[derive(Debug, Clone, Copy, Default)]
pub struct OversizedLayer;

impl<S> tower::Layer<S> for OversizedLayer {
    type Service = Oversized<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Oversized { inner }
    }
}

/// See [`OversizedLayer`].
#[derive(Debug, Clone)]
pub struct Oversized<S> {
    inner: S,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, R> tower::Service<http::Request<B>> for Oversized<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let call = self.inner.call(request);
        Box::pin(async move {
            let mut response = call.await?;
            let out_of_range = (Code::OutOfRange as i32).to_string();
            if response
                .headers()
                .get("grpc-status")
                .is_some_and(|v| v.as_bytes() == out_of_range.as_bytes())
            {
                let exhausted = (Code::ResourceExhausted as i32).to_string();
                if let Ok(v) = HeaderValue::from_str(&exhausted) {
                    response.headers_mut().insert("grpc-status", v);
                }
            }
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_out_of_range_becomes_resource_exhausted() {
        let s = oversized(Status::out_of_range("decoded message length too large"));
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert_eq!(s.message(), "decoded message length too large");
        assert_eq!(oversized(Status::cancelled("x")).code(), Code::Cancelled);
    }
}
