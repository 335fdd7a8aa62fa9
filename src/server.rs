//! The client-facing listener: accepts connections, tells HTTP/1 from h2c by each connection's
//! first bytes, serves HTTP/1 with `proxy::h1` (on the proxy's own `http1` protocol layer) and
//! HTTP/2 with hyper's server (`proxy::h2`), and drains on shutdown. With `[proxy.tls]`, every
//! connection is TLS: the handshake comes first, and ALPN decides (`h2` is HTTP/2; `http/1.1`,
//! or no ALPN at all, HTTP/1, since HTTP/2 over TLS must be negotiated, RFC 9113 §3.2).
//!
//! Slow or silent clients cannot pin the proxy: the TLS handshake, the first bytes of a
//! connection (which decide HTTP/1 or HTTP/2; over TLS, the HTTP/2 preface) and every HTTP/1
//! request head must each arrive within `header_read_timeout`.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::server::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use crate::config::ProxySettings;
use crate::proxy::{ClientInfo, Proxy, h1, h2, headers};
use crate::stall::SendTimeout;
use crate::stream::ClientStream;
use crate::tls::ALPN_H2;

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
/// `shutdown_grace` for open connections to finish their requests. With `tls`, every
/// connection is TLS.
pub async fn serve(
    listener: TcpListener,
    proxy: Proxy,
    options: ServerOptions,
    tls: Option<TlsAcceptor>,
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
    let http2 = Arc::new(http2);
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
        let tls = tls.clone();
        tokio::spawn(async move {
            let timeout = options.header_read_timeout;
            let accepted = match tls {
                None => accept_plain(stream, timeout).await,
                // Boxed: a plain connection's task should not be the size of a handshake.
                Some(tls) => Box::pin(accept_tls(stream, tls, peer, timeout)).await,
            };
            let Some(accepted) = accepted else {
                return;
            };
            let client = ClientInfo {
                ip: headers::client_ip_value(peer.ip()),
                tls: accepted.is_tls(),
            };
            // One call of each server, whatever the transport: the compiler inlines the
            // HTTP/1 one into this task as it did before TLS (a second call of it made the
            // plain path dearer, measured with callgrind).
            let result = match accepted {
                Accepted::Http1(stream) => {
                    h1::serve(
                        stream,
                        &client,
                        &proxy,
                        options.header_read_timeout,
                        options.send_timeout,
                        &mut drained,
                    )
                    .await;
                    Ok(())
                }
                // Boxed: an HTTP/1 connection's task should not be the size of these.
                Accepted::H2c(stream) => {
                    Box::pin(serve_h2(stream, client, proxy, options, &http2, drained)).await
                }
                Accepted::H2(stream) => {
                    Box::pin(serve_h2(stream, client, proxy, options, &http2, drained)).await
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

/// A client connection ready for its HTTP server.
enum Accepted {
    /// HTTP/1, plain or TLS.
    Http1(ClientStream),
    /// HTTP/2 with prior knowledge, plain.
    H2c(TcpStream),
    /// HTTP/2 over TLS (ALPN `h2`), its preface read and to be read again. Boxed: a TLS
    /// session is large, and a plain connection's task holds room for this.
    H2(Box<Replayed<TlsStream<TcpStream>>>),
}

impl Accepted {
    fn is_tls(&self) -> bool {
        match self {
            Accepted::Http1(stream) => matches!(stream, ClientStream::Tls(_)),
            Accepted::H2c(_) => false,
            Accepted::H2(_) => true,
        }
    }
}

/// A plain connection: HTTP/1 or h2c, as its first bytes say; `None` when they did not come
/// within `timeout`.
async fn accept_plain(stream: TcpStream, timeout: Duration) -> Option<Accepted> {
    let protocol = sniff_protocol(&stream, timeout).await?;
    let _ = stream.set_nodelay(true);
    Some(match protocol {
        Protocol::Http1 => Accepted::Http1(ClientStream::Plain(stream)),
        Protocol::Http2 => Accepted::H2c(stream),
    })
}

/// A TLS connection: the handshake within `timeout`, then HTTP/2 when ALPN agreed on `h2`
/// (and its preface came within `timeout` too), else HTTP/1. `None` when the client failed
/// either.
async fn accept_tls(
    stream: TcpStream,
    tls: TlsAcceptor,
    peer: SocketAddr,
    timeout: Duration,
) -> Option<Accepted> {
    // Before the handshake: its flights go out as they are written.
    let _ = stream.set_nodelay(true);
    let stream = match tokio::time::timeout(timeout, tls.accept(stream)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => {
            tracing::debug!(%peer, %error, "TLS handshake failed");
            return None;
        }
        Err(_) => {
            tracing::debug!(%peer, "no TLS handshake within header_read_timeout");
            return None;
        }
    };
    if stream.get_ref().1.alpn_protocol() == Some(ALPN_H2) {
        let stream = read_preface(stream, timeout).await?;
        return Some(Accepted::H2(Box::new(stream)));
    }
    Some(Accepted::Http1(ClientStream::Tls(Box::new(stream))))
}

/// Serves an HTTP/2 connection (h2c, or h2 over TLS) with hyper until it ends or the drain
/// ends it.
async fn serve_h2<S>(
    stream: S,
    client: ClientInfo,
    proxy: Proxy,
    options: ServerOptions,
    http2: &http2::Builder<TokioExecutor>,
    drained: watch::Receiver<()>,
) -> Result<(), hyper::Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let stream = SendTimeout::new(stream, options.send_timeout);
    let (io, service) = h2::service(stream, proxy, client);
    let connection = http2.serve_connection(io, service);
    until_drained(connection, |c| c.graceful_shutdown(), drained).await
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

/// Reads the HTTP/2 preface a client that agreed on `h2` must send first, for at most
/// `timeout` (as a plain connection's first bytes); `None` when it did not come, or something
/// else did. hyper gets it again in front of the rest.
async fn read_preface<S: AsyncRead + Unpin>(
    mut stream: S,
    timeout: Duration,
) -> Option<Replayed<S>> {
    let mut preface = [0u8; H2_PREFACE.len()];
    match tokio::time::timeout(timeout, stream.read_exact(&mut preface)).await {
        Ok(Ok(_)) if preface == H2_PREFACE => Some(Replayed {
            replay: H2_PREFACE,
            inner: stream,
        }),
        _ => None,
    }
}

/// A stream whose first bytes, read already, are read again first.
struct Replayed<S> {
    replay: &'static [u8],
    inner: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Replayed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.replay.is_empty() {
            return Pin::new(&mut self.inner).poll_read(cx, buf);
        }
        let n = self.replay.len().min(buf.remaining());
        buf.put_slice(&self.replay[..n]);
        self.replay = &self.replay[n..];
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Replayed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
