//! A tiny upstream for trying the proxy by hand: answers every request with its name and the
//! request headers it received, so you can see what the proxy forwards.
//!
//! ```sh
//! cargo run --example echo_upstream -- v1 8081 &
//! cargo run --example echo_upstream -- v2 8082 &
//! cargo run -- --config canary.toml
//! curl -s -H 'x-user-id: alice' localhost:8080/
//! ```

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let name: &'static str = args.next().unwrap_or_else(|| "v1".into()).leak();
    let port: u16 = args.next().and_then(|p| p.parse().ok()).unwrap_or(8081);
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    eprintln!("{name} listening on 127.0.0.1:{port}");
    loop {
        let (stream, _) = listener.accept().await?;
        let service = service_fn(move |request: Request<hyper::body::Incoming>| async move {
            let mut text = format!("{name}: {} {}\n", request.method(), request.uri());
            for (k, v) in request.headers() {
                text.push_str(&format!("  {k}: {}\n", v.to_str().unwrap_or("<binary>")));
            }
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(text))))
        });
        tokio::spawn(async move {
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
