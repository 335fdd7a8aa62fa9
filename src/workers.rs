//! Thread-per-core serving: `workers` threads, each with its own current-thread tokio runtime
//! and its own listening socket on the proxy address (SO_REUSEPORT). The kernel spreads new
//! connections over the sockets, and a connection (with the upstream connections it uses)
//! never leaves its thread: no work stealing, no cross-thread wakeups on the request path.
//! The control plane (admin API, health checks, signals) runs on the caller's runtime.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::config::MAX_WORKERS;
use crate::control::ControlPlane;
use crate::proxy::Proxy;
use crate::server::{ServerOptions, serve};
use crate::tls::ListenerTls;
use crate::worker_index::set_current_worker;

/// The number of workers to run: as configured, else one per core this process may use.
pub fn worker_count(configured: Option<usize>) -> usize {
    configured
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
        .clamp(1, MAX_WORKERS)
}

/// Binds `count` listening sockets to `addr` with SO_REUSEPORT. When `addr` has port 0, the
/// first socket picks the port and the others share it.
pub fn bind_listeners(addr: SocketAddr, count: usize) -> io::Result<Vec<std::net::TcpListener>> {
    let mut addr = addr;
    let mut listeners = Vec::with_capacity(count);
    for _ in 0..count.max(1) {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        #[cfg(unix)]
        socket.set_reuse_port(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        socket.listen(1024)?;
        let listener: std::net::TcpListener = socket.into();
        addr = listener.local_addr()?;
        listeners.push(listener);
    }
    Ok(listeners)
}

/// Runs one worker per listener until `shutdown` completes, then lets each drain (bounded by
/// `shutdown_grace`) and stops the control plane's background tasks.
pub async fn run_workers(
    control: Arc<ControlPlane>,
    listeners: Vec<std::net::TcpListener>,
    admin_listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let store = crate::start_store(&control).await;
    let config = control.config();
    let options = ServerOptions::new(&config.proxy);
    let tls = control.listener_tls().map(ListenerTls::acceptor);
    let stop = CancellationToken::new();
    let mut finished = Vec::with_capacity(listeners.len());
    for (index, listener) in listeners.into_iter().enumerate() {
        let proxy = Proxy::new(
            control.table().clone(),
            control.metrics().clone(),
            control.shutdown_token().child_token(),
        );
        let worker_stop = stop.clone();
        let tls = tls.clone();
        let (done, finished_rx) = oneshot::channel::<()>();
        let spawned = std::thread::Builder::new()
            .name(format!("canary-worker-{index}"))
            .spawn(move || {
                set_current_worker(index);
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(error) => {
                        tracing::error!(worker = index, %error, "cannot start a worker runtime");
                        return;
                    }
                };
                runtime.block_on(async move {
                    match TcpListener::from_std(listener) {
                        Ok(listener) => {
                            let stop = worker_stop.cancelled_owned();
                            serve(listener, proxy, options, tls, stop).await
                        }
                        Err(error) => {
                            tracing::error!(worker = index, %error, "cannot use the listener");
                        }
                    }
                });
                // Ends what is left on it (tunnels, pooled connections) without waiting long
                // for blocking work such as a slow name lookup.
                runtime.shutdown_timeout(Duration::from_secs(1));
                let _ = done.send(());
            });
        if let Err(error) = spawned {
            // Stop the workers already started before reporting the failure.
            stop.cancel();
            return Err(error);
        }
        finished.push(finished_rx);
    }
    let background = crate::start_background(&control, admin_listener, store);
    shutdown.await;
    stop.cancel();
    for worker in finished {
        // Each worker bounds its own drain; an error means its thread ended early.
        let _ = worker.await;
    }
    crate::stop_background(&control, background).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listeners_share_one_port() {
        let listeners = bind_listeners("127.0.0.1:0".parse().unwrap(), 3).unwrap();
        let ports: Vec<u16> = listeners
            .iter()
            .map(|l| l.local_addr().unwrap().port())
            .collect();
        assert_eq!(ports.len(), 3);
        assert!(ports.iter().all(|&p| p == ports[0] && p != 0));
    }

    #[test]
    fn worker_count_is_bounded() {
        assert_eq!(worker_count(Some(3)), 3);
        assert_eq!(worker_count(Some(1000)), MAX_WORKERS);
        assert!(worker_count(None) >= 1);
    }
}
