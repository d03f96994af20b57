//! Telling a finished client stream from a cancelled one.
//!
//! tonic reads a client's request stream that the client cancelled (HTTP/2
//! `RST_STREAM` with `CANCEL`) as a clean end of stream, exactly like one the
//! client finished. For a query that does not matter; for an upload it would
//! commit the rows that happened to arrive before the client died. So every
//! request's body is watched here, below tonic: a body that ends in an error
//! marks the request's [`BodyBroke`] flag (in its extensions) before tonic
//! sees the error, and the upload checks the flag when its stream ends.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use http_body::{Body as HttpBody, Frame, SizeHint};
use tonic::body::Body;
use tonic::codegen::http;

/// Set when a request's body ended in an error rather than its end.
#[derive(Debug, Clone, Default)]
pub struct BodyBroke(Arc<AtomicBool>);

impl BodyBroke {
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// A body that sets its request's flag when it fails.
struct Watched {
    inner: Body,
    broke: BodyBroke,
}

impl HttpBody for Watched {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Err(_))) = &polled {
            self.broke.0.store(true, Ordering::SeqCst);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The tower service that watches every request's body.
#[derive(Debug, Clone)]
pub struct WatchBodies<S> {
    inner: S,
}

impl<S> tower::Service<http::Request<Body>> for WatchBodies<S>
where
    S: tower::Service<http::Request<Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let broke = BodyBroke::default();
        let (mut parts, body) = request.into_parts();
        parts.extensions.insert(broke.clone());
        self.inner.call(http::Request::from_parts(parts, Body::new(Watched { inner: body, broke })))
    }
}

/// The layer to add to the gateway's server.
pub fn layer<S>() -> impl tower::Layer<S, Service = WatchBodies<S>> + Clone {
    tower::layer::layer_fn(|inner| WatchBodies { inner })
}
