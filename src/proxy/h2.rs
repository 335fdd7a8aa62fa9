//! Proxying over an HTTP/2 client connection (h2c, or h2 over TLS): hyper's HTTP/2 server
//! parses and frames, each request goes through the [`Proxy`]. (HTTP/1 never reaches hyper:
//! see `super::h1`.)

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use http::Request;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

use super::{ClientInfo, Proxy};
use crate::upstream::{ForwardBody, ProxyResponse};

/// The IO and service for a connection hyper serves, the service forwarding through `proxy`.
/// (The service is a closure; naming its type would cost a boxed future per request.)
#[allow(clippy::type_complexity)]
pub fn service<S>(
    stream: S,
    proxy: Proxy,
    client: ClientInfo,
) -> (
    TokioIo<S>,
    impl hyper::service::Service<
        Request<Incoming>,
        Response = ProxyResponse,
        Error = Infallible,
        Future = impl Future<Output = Result<ProxyResponse, Infallible>> + Send,
    > + Clone
    + Send
    + 'static,
) {
    // Built once per connection; each request clones one Arc.
    let context = Arc::new((proxy, client));
    let service = service_fn(move |request: Request<Incoming>| {
        let context = context.clone();
        async move {
            let (proxy, client) = &*context;
            let request = request.map(ForwardBody::Hyper);
            // hyper drops this future when the client resets the stream or goes away.
            let handled = proxy.handle(request, client, std::future::pending());
            let response = handled.await.unwrap_or_else(super::client_closed_response);
            Ok::<_, Infallible>(response)
        }
    });
    (TokioIo::new(stream), service)
}
