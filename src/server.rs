//! The client-facing listener: accepts connections, tells HTTP/1 from h2c by each connection's
//! first bytes, serves HTTP/1 with `proxy::h1` (on the proxy's own `http1` protocol layer) and
//! h2c with hyper's HTTP/2 server (`proxy::h2`), and drains on shutdown.
//!
//! Slow or silent clients cannot pin the proxy: the first bytes of a connection (which decide
//! HTTP/1 or HTTP/2) and every HTTP/1 request head must arrive within `header_read_timeout`.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use hyper::server::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::config::ProxySettings;
use crate::proxy::{Proxy, h1, h2, headers};
use crate::stall::SendTimeout;

/// How the listener treats client connections.
#[derive(Debug, Clone, Copy)]
pub struct ServerOptions {
    /// A client must send its first bytes and each request head within this.
    pub header_read_timeout: Duration,
    /// How long in-flight requests may take to finish after shutdown begins.
    pub shutdown_grace: Duration,
    /// The longest a write to a client may wait for the client to read.
    pub send_timeout: Duration,
}

impl ServerOptions {
    /// The options `[proxy]` sets (they take effect on restart).
    pub fn new(proxy: &ProxySettings) -> Self {
        ServerOptions {
            header_read_timeout: proxy.header_read_timeout,
            shutdown_grace: proxy.shutdown_grace,
            send_timeout: proxy.send_timeout,
        }
    }
}

/// How often each worker closes idle upstream connections that expired or were closed by
/// their upstream.
const POOL_SWEEP: Duration = Duration::from_secs(1);

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
    // HTTP/2: pings find dead peers (HTTP/1 idle connections meet the header read timeout
    // instead), and the stream and header limits are stated rather than left to defaults.
    let mut http2 = http2::Builder::new(TokioExecutor::new());
    http2
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(H2_KEEP_ALIVE))
        .keep_alive_timeout(H2_KEEP_ALIVE)
        .max_concurrent_streams(256)
        .max_header_list_size(64 * 1024);
    // Shared: each connection's task holds a pointer, not a copy of the settings.
    let http2 = std::sync::Arc::new(http2);
    // Idle upstream connections of this worker are looked at once a second.
    let sweeper = tokio::spawn({
        let proxy = proxy.clone();
        async move {
            let mut ticks = tokio::time::interval(POOL_SWEEP);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            loop {
                ticks.tick().await;
                proxy.sweep_idle_connections();
            }
        }
    });
    // Each connection holds a receiver: a send asks them to finish, and the sender sees
    // when the last one is gone.
    let (drain, open_connections) = watch::channel(());
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
        let mut drained = open_connections.clone();
        let http2 = http2.clone();
        let proxy = proxy.clone();
        tokio::spawn(async move {
            let Some(protocol) = sniff_protocol(&stream, options.header_read_timeout).await else {
                return;
            };
            let _ = stream.set_nodelay(true);
            let client_ip = headers::client_ip_value(peer.ip());
            let result = match protocol {
                Protocol::Http1 => {
                    h1::serve(
                        stream,
                        &client_ip,
                        &proxy,
                        options.header_read_timeout,
                        options.send_timeout,
                        &mut drained,
                    )
                    .await;
                    Ok(())
                }
                Protocol::Http2 => {
                    // Boxed: an HTTP/1 connection's task should not be the size of this one.
                    let stream = SendTimeout::new(stream, options.send_timeout);
                    let (io, service) = h2::service(stream, proxy, client_ip);
                    let connection = http2.serve_connection(io, service);
                    Box::pin(until_drained(
                        connection,
                        |c| c.graceful_shutdown(),
                        drained,
                    ))
                    .await
                }
            };
            if let Err(error) = result {
                tracing::debug!(%peer, %error, "connection ended with an error");
            }
        });
    }
    drop(listener);
    sweeper.abort();
    drop(open_connections);
    tracing::info!(
        open = drain.receiver_count(),
        "shutting down, draining connections"
    );
    let _ = drain.send(());
    tokio::select! {
        () = drain.closed() => tracing::info!("all connections drained"),
        () = tokio::time::sleep(options.shutdown_grace) => {
            tracing::warn!(grace = ?options.shutdown_grace, "grace period over, closing remaining connections");
        }
    }
}

/// Runs a client connection; when the drain begins, asks it to finish the requests it has
/// and close, and waits for that.
async fn until_drained<C, E>(
    connection: C,
    graceful_shutdown: impl FnOnce(Pin<&mut C>),
    mut drain: watch::Receiver<()>,
) -> Result<(), E>
where
    C: Future<Output = Result<(), E>>,
{
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => return result,
        _ = drain.changed() => graceful_shutdown(connection.as_mut()),
    }
    connection.await
}

/// The protocol a client connection speaks, told by its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Http1,
    /// Starts with the HTTP/2 connection preface (h2c with prior knowledge).
    Http2,
}

/// Waits until the client has sent enough to tell HTTP/1 from HTTP/2, for at most `timeout`;
/// `None` when it sent nothing usable in time (or closed).
///
/// Knowing the protocol up front, each connection goes straight to its server (no second
/// sniff, no rewinding reader); and a client that connects and sends nothing (or part of the
/// HTTP/2 preface) cannot hold its connection: after this, the HTTP/1 server's header read
/// timeout takes over.
async fn sniff_protocol(stream: &TcpStream, timeout: Duration) -> Option<Protocol> {
    let sniff = async {
        let mut buf = [0u8; H2_PREFACE.len()];
        loop {
            match stream.peek(&mut buf).await {
                Ok(0) | Err(_) => return None,
                Ok(n) if n == buf.len() && buf == H2_PREFACE => return Some(Protocol::Http2),
                Ok(n) if n == buf.len() || !H2_PREFACE.starts_with(&buf[..n]) => {
                    return Some(Protocol::Http1);
                }
                // A prefix of the preface: wait for more (peek would return at once).
                Ok(_) => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    };
    tokio::time::timeout(timeout, sniff).await.ok().flatten()
}
