//! Idle keep-alive connections to one endpoint, kept per worker thread.

use std::collections::VecDeque;
use std::io;
use std::mem::MaybeUninit;
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::net::TcpStream;

use super::stream::UpstreamStream;

use crate::config::MAX_WORKERS;
use crate::http1::body::READ_CHUNK;
use crate::worker_index::current_worker;

/// Idle connections kept per endpoint and worker; beyond this a returning one is closed.
const MAX_IDLE: usize = 512;

/// One keep-alive connection to an endpoint, with the buffers it keeps between requests.
#[derive(Debug)]
pub(super) struct Connection {
    pub(super) stream: UpstreamStream,
    /// Bytes read from the upstream and not consumed yet.
    pub(super) read_buf: BytesMut,
    /// The request bytes being written; kept for its capacity.
    pub(super) write_buf: Vec<u8>,
    /// When the connection last went idle (into the pool).
    idle_since: Instant,
}

impl Connection {
    pub(super) fn new(stream: UpstreamStream) -> Self {
        Connection {
            stream,
            read_buf: BytesMut::with_capacity(READ_CHUNK),
            write_buf: Vec::with_capacity(1024),
            idle_since: Instant::now(),
        }
    }

    /// Whether an idle connection can take a request: young enough, and nothing heard from
    /// the upstream since its last response (a FIN, or bytes nobody asked for). The readiness
    /// check costs no system call unless the socket became readable; it can lag behind the
    /// socket by a few events, which a request that can be sent again tolerates.
    fn is_reusable(&self, idle_timeout: Duration) -> bool {
        if self.idle_since.elapsed() >= idle_timeout {
            return false;
        }
        let mut cx = Context::from_waker(Waker::noop());
        let socket = self.stream.tcp();
        match socket.poll_read_ready(&mut cx) {
            Poll::Pending => true,
            Poll::Ready(Err(_)) => false,
            // Bytes on a TLS connection are records (a close_notify, most likely), which
            // only the TLS layer may read: it is not reused.
            Poll::Ready(Ok(())) if self.stream.is_tls() => Self::is_quiet(socket),
            Poll::Ready(Ok(())) => {
                let mut probe = [0u8; 1];
                matches!(socket.try_read(&mut probe),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            }
        }
    }

    /// Asks the socket itself (one system call) whether the upstream closed the connection or
    /// sent something unasked; for requests that cannot be sent again once written.
    fn is_quiet_now(&self) -> bool {
        Self::is_quiet(self.stream.tcp())
    }

    /// Whether the socket has nothing to read (no FIN, no bytes), asked without reading.
    fn is_quiet(socket: &TcpStream) -> bool {
        let mut probe = [MaybeUninit::<u8>::uninit(); 1];
        matches!(socket2::SockRef::from(socket).peek(&mut probe),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock)
    }
}

/// Idle keep-alive connections of one endpoint, one list per worker thread: a connection's
/// socket is registered with the runtime that opened it, so each worker only reuses its own.
/// Each list is ordered oldest first; the newest connections are reused first, and expired
/// ones are dropped from the old end whenever a connection comes back.
#[derive(Debug)]
pub(super) struct ConnectionPool {
    idle: Box<[Mutex<VecDeque<Connection>>]>,
}

impl Default for ConnectionPool {
    fn default() -> Self {
        ConnectionPool {
            idle: (0..MAX_WORKERS).map(|_| Mutex::default()).collect(),
        }
    }
}

impl ConnectionPool {
    fn mine(&self) -> std::sync::MutexGuard<'_, VecDeque<Connection>> {
        self.idle[current_worker() % self.idle.len()]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// The most recently used connection that can take a request; unusable ones met on the
    /// way are closed. With `verify`, the socket is asked too (see [`Connection::is_quiet_now`]).
    pub(super) fn checkout(&self, idle_timeout: Duration, verify: bool) -> Option<Connection> {
        let mut idle = self.mine();
        while let Some(connection) = idle.pop_back() {
            if connection.is_reusable(idle_timeout) && (!verify || connection.is_quiet_now()) {
                return Some(connection);
            }
        }
        None
    }

    pub(super) fn checkin(&self, mut connection: Connection, idle_timeout: Duration) {
        let mut idle = self.mine();
        while idle
            .front()
            .is_some_and(|c| c.idle_since.elapsed() >= idle_timeout)
        {
            idle.pop_front();
        }
        if idle.len() < MAX_IDLE {
            connection.idle_since = Instant::now();
            idle.push_back(connection);
        }
    }

    /// Closes this worker's idle connections that expired or that the upstream closed, so
    /// that they do not linger in CLOSE_WAIT until the next request to the endpoint.
    pub(super) fn sweep(&self, idle_timeout: Duration) {
        self.mine().retain(|c| c.is_reusable(idle_timeout));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_close_the_runtime_has_not_seen_yet_is_found_by_asking_the_socket() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (server, _) = listener.accept().await.unwrap();
        let connection = Connection::new(UpstreamStream::Plain(client));
        assert!(connection.is_quiet_now());
        drop(server);
        // No await from here on: the runtime's readiness for the socket cannot change, but
        // the kernel has the FIN.
        std::thread::sleep(Duration::from_millis(50));
        assert!(!connection.is_quiet_now());
    }
}
