//! A client connection as the HTTP/1 server reads and writes it: plain TCP, or TLS over TCP
//! once the handshake is done; split into a read half and a write half, and put back together
//! for a tunnel.
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

/// A client connection.
#[derive(Debug)]
pub enum ClientStream {
    Plain(TcpStream),
    /// Boxed: a TLS session (rustls's connection state) is large, and a plain connection
    /// should not carry room for it.
    Tls(Box<TlsStream<TcpStream>>),
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

impl AsyncRead for ClientStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(stream) => Pin::new(stream).poll_read(cx, buf),
            ClientStream::Tls(stream) => Pin::new(stream).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Plain(stream) => Pin::new(stream).poll_write(cx, buf),
            ClientStream::Tls(stream) => Pin::new(stream).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Plain(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
            ClientStream::Tls(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            ClientStream::Plain(stream) => stream.is_write_vectored(),
            ClientStream::Tls(stream) => stream.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(stream) => Pin::new(stream).poll_flush(cx),
            ClientStream::Tls(stream) => Pin::new(stream).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(stream) => Pin::new(stream).poll_shutdown(cx),
            ClientStream::Tls(stream) => Pin::new(stream).poll_shutdown(cx),
        }
    }
}
