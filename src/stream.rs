//! A connection's byte stream, plain TCP or TLS over TCP: [`MaybeTls`], the one enum both
//! sides use. A client connection ([`ClientStream`]) as the HTTP/1 server reads and writes
//! it, split into a read half and a write half and put back together for a tunnel; an
//! upstream connection (`upstream::UpstreamStream`) as the exchange writes and reads it.
//!
//! An enum rather than a type parameter: the request body a connection hands out
//! (`http1::server::RequestBody`) travels through the forward path as one type whatever the
//! connection is, and a plain connection pays one branch per read or write for it, not an
//! allocation or an indirect call. The TLS stream is split with `tokio::io::split` (its
//! halves share it behind a lock); the plain one with `TcpStream::into_split`, as before.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio_rustls::server::TlsStream;

/// A connection: plain TCP, or TLS (`T`: rustls's server or client stream) over TCP.
#[derive(Debug)]
pub enum MaybeTls<T> {
    Plain(TcpStream),
    /// Boxed: a TLS session (rustls's connection state) is a kilobyte and more, and a plain
    /// connection should not carry room for it.
    Tls(Box<T>),
}

/// A client connection.
pub type ClientStream = MaybeTls<TlsStream<TcpStream>>;

impl<T> MaybeTls<T> {
    pub fn is_tls(&self) -> bool {
        matches!(self, MaybeTls::Tls(_))
    }
}

impl MaybeTls<tokio_rustls::client::TlsStream<TcpStream>> {
    /// The TCP socket beneath an upstream connection, for readiness and socket options.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            MaybeTls::Plain(stream) => stream,
            MaybeTls::Tls(stream) => stream.get_ref().0,
        }
    }
}

/// The read half of a [`ClientStream`].
#[derive(Debug)]
pub enum ClientReader {
    Plain(OwnedReadHalf),
    Tls(ReadHalf<TlsStream<TcpStream>>),
}

/// The write half of a [`ClientStream`].
#[derive(Debug)]
pub enum ClientWriter {
    Plain(OwnedWriteHalf),
    Tls(WriteHalf<TlsStream<TcpStream>>),
}

impl ClientStream {
    pub fn into_split(self) -> (ClientReader, ClientWriter) {
        match self {
            ClientStream::Plain(stream) => {
                let (read, write) = stream.into_split();
                (ClientReader::Plain(read), ClientWriter::Plain(write))
            }
            ClientStream::Tls(stream) => {
                let (read, write) = tokio::io::split(*stream);
                (ClientReader::Tls(read), ClientWriter::Tls(write))
            }
        }
    }

    /// The stream the two halves of one [`into_split`](Self::into_split) came from; `None`
    /// for halves of two streams.
    pub fn reunite(read: ClientReader, write: ClientWriter) -> Option<ClientStream> {
        match (read, write) {
            (ClientReader::Plain(read), ClientWriter::Plain(write)) => {
                read.reunite(write).ok().map(ClientStream::Plain)
            }
            (ClientReader::Tls(read), ClientWriter::Tls(write)) => read
                .is_pair_of(&write)
                .then(|| ClientStream::Tls(Box::new(read.unsplit(write)))),
            _ => None,
        }
    }
}

impl ClientWriter {
    /// Whether bytes a write took may wait for a flush to be sent: a TLS stream's may
    /// (rustls keeps the records a full socket did not take), a plain one's never.
    pub fn holds_back(&self) -> bool {
        matches!(self, ClientWriter::Tls(_))
    }
}

// The plain arms are the hot path: always inlined, with the TLS arms out of line so that
// the match stays small (left to the compiler, the reader's was not inlined, and cost a
// plain request some 60 instructions, measured with callgrind).

impl AsyncRead for ClientReader {
    #[inline(always)]
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientReader::Plain(read) => Pin::new(read).poll_read(cx, buf),
            ClientReader::Tls(read) => tls_read(read, cx, buf),
        }
    }
}

#[inline(never)]
fn tls_read(
    read: &mut ReadHalf<TlsStream<TcpStream>>,
    cx: &mut Context<'_>,
    buf: &mut ReadBuf<'_>,
) -> Poll<io::Result<()>> {
    Pin::new(read).poll_read(cx, buf)
}

impl AsyncWrite for ClientWriter {
    #[inline(always)]
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientWriter::Plain(write) => Pin::new(write).poll_write(cx, buf),
            ClientWriter::Tls(write) => tls_write_vectored(write, cx, &[io::IoSlice::new(buf)]),
        }
    }

    #[inline(always)]
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientWriter::Plain(write) => Pin::new(write).poll_write_vectored(cx, bufs),
            ClientWriter::Tls(write) => tls_write_vectored(write, cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            ClientWriter::Plain(write) => write.is_write_vectored(),
            ClientWriter::Tls(write) => write.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientWriter::Plain(_) => Poll::Ready(Ok(())),
            ClientWriter::Tls(write) => Pin::new(write).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientWriter::Plain(write) => Pin::new(write).poll_shutdown(cx),
            ClientWriter::Tls(write) => Pin::new(write).poll_shutdown(cx),
        }
    }
}

#[inline(never)]
fn tls_write_vectored(
    write: &mut WriteHalf<TlsStream<TcpStream>>,
    cx: &mut Context<'_>,
    bufs: &[io::IoSlice<'_>],
) -> Poll<io::Result<usize>> {
    Pin::new(write).poll_write_vectored(cx, bufs)
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for MaybeTls<T> {
    #[inline]
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(stream) => Pin::new(stream).poll_read(cx, buf),
            MaybeTls::Tls(stream) => Pin::new(stream.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for MaybeTls<T> {
    #[inline]
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(stream) => Pin::new(stream).poll_write(cx, buf),
            MaybeTls::Tls(stream) => Pin::new(stream.as_mut()).poll_write(cx, buf),
        }
    }

    #[inline]
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MaybeTls::Plain(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
            MaybeTls::Tls(stream) => Pin::new(stream.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            MaybeTls::Plain(stream) => stream.is_write_vectored(),
            MaybeTls::Tls(stream) => stream.is_write_vectored(),
        }
    }

    /// A TLS stream may hold encrypted bytes its last write could not send; this sends them.
    /// A plain stream holds nothing.
    #[inline]
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(_) => Poll::Ready(Ok(())),
            MaybeTls::Tls(stream) => Pin::new(stream.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MaybeTls::Plain(stream) => Pin::new(stream).poll_shutdown(cx),
            MaybeTls::Tls(stream) => Pin::new(stream.as_mut()).poll_shutdown(cx),
        }
    }
}
