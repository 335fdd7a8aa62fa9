//! The stream of an upstream connection: plain TCP for `http://` endpoints, TLS over TCP
//! (rustls) for `https://` ones; the same enum as a client connection's
//! ([`crate::stream::MaybeTls`]).

use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::stream::MaybeTls;

/// An upstream connection's byte stream.
pub type UpstreamStream = MaybeTls<TlsStream<TcpStream>>;
