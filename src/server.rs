//! The client-facing listener: accepts connections, serves HTTP/1.1 and h2c on each (hyper-util's
//! auto builder), hands every request to the [`Proxy`], and drains on shutdown.
//!
//! Slow or silent clients cannot pin the proxy: the first bytes of a connection (which decide
//! HTTP/1 or HTTP/2) and every HTTP/1 request head must arrive within `header_read_timeout`.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};

use crate::framing::FramingGuard;
use crate::headers;
use crate::proxy::Proxy;

/// How the listener treats client connections.
#[derive(Debug, Clone, Copy)]
pub struct ServerOptions {
    /// A client must send its first bytes and each request head within this.
    pub header_read_timeout: Duration,
    /// How long in-flight requests may take to finish after shutdown begins.
    pub shutdown_grace: Duration,
}

/// Interval of HTTP/2 keep-alive pings, and how long an answer may take.
const H2_KEEP_ALIVE: Duration = Duration::from_secs(20);

/// The HTTP/2 connection preface; a connection that starts with it is h2c.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Serves clients until `shutdown` completes, then stops accepting and waits up to
/// `shutdown_grace` for open connections to finish their requests.
pub async fn serve(
    listener: TcpListener,
    proxy: Proxy,
    options: ServerOptions,
    shutdown: impl Future<Output = ()>,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout);
    // HTTP/2: pings find dead peers (HTTP/1 idle connections meet the header read timeout
    // instead), and the stream and header limits are stated rather than left to defaults.
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(H2_KEEP_ALIVE))
        .keep_alive_timeout(H2_KEEP_ALIVE)
        .max_concurrent_streams(256)
        .max_header_list_size(64 * 1024);
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    // Usually EMFILE: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let watcher = graceful.watcher();
        let builder = builder.clone();
        let proxy = proxy.clone();
        tokio::spawn(async move {
            if !client_spoke_in_time(&stream, options.header_read_timeout).await {
                return;
            }
            let _ = stream.set_nodelay(true);
            let (guarded, framing) = FramingGuard::new(stream);
            // Built once per connection; each request clones one Arc.
            let context = Arc::new((proxy, headers::client_ip_value(peer.ip()), framing));
            let service = service_fn(move |request| {
                let context = context.clone();
                async move {
                    let (proxy, client_ip, framing) = &*context;
                    Ok::<_, Infallible>(proxy.handle(request, client_ip, framing).await)
                }
            });
            let connection = builder.serve_connection_with_upgrades(TokioIo::new(guarded), service);
            if let Err(error) = watcher.watch(connection).await {
                tracing::debug!(%peer, %error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tracing::info!(
        open = graceful.count(),
        "shutting down, draining connections"
    );
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("all connections drained"),
        () = tokio::time::sleep(options.shutdown_grace) => {
            tracing::warn!(grace = ?options.shutdown_grace, "grace period over, closing remaining connections");
        }
    }
}

/// Waits until the client has sent enough to tell HTTP/1 from HTTP/2, for at most `timeout`.
///
/// hyper-util's auto builder sniffs the protocol without a timeout of its own, so a client that
/// connects and sends nothing (or part of the HTTP/2 preface) would hold its connection forever;
/// after this, hyper's own header read timeout takes over.
async fn client_spoke_in_time(stream: &TcpStream, timeout: Duration) -> bool {
    let sniff = async {
        let mut buf = [0u8; H2_PREFACE.len()];
        loop {
            match stream.peek(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) if n == buf.len() || !H2_PREFACE.starts_with(&buf[..n]) => return true,
                // A prefix of the preface: wait for more (peek would return at once).
                Ok(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    };
    tokio::time::timeout(timeout, sniff).await.unwrap_or(false)
}
