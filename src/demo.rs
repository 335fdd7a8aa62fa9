//! The two built-in upstreams of `canary-proxy demo`: each answers every path with its name,
//! and `/health` with `ok`, so a newcomer sees the split without running anything else.

use std::convert::Infallible;
use std::future::Future;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

/// The bundled `canary.toml`, which `demo` runs with wherever the binary is started.
pub const DEMO_CONFIG: &str = include_str!("../canary.toml");

/// Serves one demo upstream named `name` on `listener` until `shutdown` completes.
pub async fn demo_upstream(
    listener: TcpListener,
    name: &'static str,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
            () = &mut shutdown => return,
        };
        let service = service_fn(move |request: Request<Incoming>| async move {
            let body = match request.uri().path() {
                "/health" => "ok\n".to_string(),
                path => format!("hello from {name} ({path})\n"),
            };
            let mut response = Response::new(Full::new(Bytes::from(body)));
            response
                .headers_mut()
                .insert("x-served-by", http::HeaderValue::from_static(name));
            Ok::<_, Infallible>(response)
        });
        tokio::spawn(async move {
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
