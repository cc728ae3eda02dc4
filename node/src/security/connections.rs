//! Open connections per remote address (`limits.max_connections_per_address`): one address
//! (a runaway client, a scanner) cannot take all of a node's file descriptors and starve the
//! others. A connection over the limit is closed as soon as it is accepted, before any TLS
//! handshake or HTTP/2, and counted in `anthill_connections_refused_total`. The count of an
//! address drops when its connection ends, whoever ends it. The TLS listener also keeps each
//! address to 128 handshakes in progress (of 512 in all), counted alike.

use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;

use crate::coordination::transport::until_stopped;
use crate::metrics::Metrics;

/// Connections accepted but not yet taken by the gRPC server.
const ACCEPTED_QUEUE: usize = 64;

/// The open connections of each remote address, and the most one may have (0: no limit).
pub struct PerAddress {
    max: usize,
    open: parking_lot::Mutex<HashMap<IpAddr, usize>>,
    metrics: Arc<Metrics>,
}

impl PerAddress {
    pub fn new(max: usize, metrics: Arc<Metrics>) -> Arc<PerAddress> {
        Arc::new(PerAddress { max, open: parking_lot::Mutex::new(HashMap::new()), metrics })
    }

    /// A place for one more connection from `address`, unless it has the most it may.
    pub fn admit(self: &Arc<Self>, address: IpAddr) -> Option<Admitted> {
        let mut open = self.open.lock();
        let count = open.entry(address).or_insert(0);
        if self.max > 0 && *count >= self.max {
            drop(open);
            self.metrics.connections_refused.inc();
            tracing::debug!(%address, max = self.max, "too many connections from one address (limits.max_connections_per_address); closed");
            return None;
        }
        *count += 1;
        Some(Admitted { limits: self.clone(), address })
    }

    /// The connections `address` has open.
    pub fn open(&self, address: IpAddr) -> usize {
        self.open.lock().get(&address).copied().unwrap_or(0)
    }
}

/// One admitted connection's place; given back when dropped.
pub struct Admitted {
    limits: Arc<PerAddress>,
    address: IpAddr,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut open = self.limits.open.lock();
        if let Some(count) = open.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.address);
            }
        }
    }
}

/// A connection holding its place ([`Admitted`]) for as long as it lives; otherwise `S`.
pub struct Counted<S> {
    inner: S,
    _place: Admitted,
}

impl<S> Counted<S> {
    pub fn new(inner: S, place: Admitted) -> Counted<S> {
        Counted { inner, _place: place }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[std::io::IoSlice<'_>]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The gRPC server sees what `S` would show (the peer's address; with TLS, its certificates).
impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected for Counted<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// The next connection `listener` accepts with a place under `limits` (the others are closed at
/// once), or `None` once `stopped`.
pub async fn accept(
    listener: &TcpListener,
    limits: &Arc<PerAddress>,
    stopped: &mut watch::Receiver<bool>,
) -> Option<(TcpStream, Admitted)> {
    loop {
        let (tcp, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, most likely: wait a little instead of spinning.
                    tracing::warn!(error = %e, "cannot accept a connection; trying again in 100 ms");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = until_stopped(stopped) => return None,
        };
        #[cfg(debug_assertions)]
        if test_fault::listener_lost() {
            // The connection that found the listener gone is closed unserved.
            return None;
        }
        if let Some(place) = limits.admit(remote.ip()) {
            let _ = tcp.set_nodelay(true);
            return Some((tcp, place));
        }
    }
}

/// A fault only tests can set (debug builds; compiled out of a release): with
/// `ANTHILL_TEST_ACCEPTS=N` in its environment, a node's accept loop ends at the connection after
/// its N-th, as if its listener were lost, so that a test can see the node notice and exit.
#[cfg(debug_assertions)]
mod test_fault {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// Connections still to accept; `None` when the variable is not set.
    fn left() -> Option<&'static AtomicU64> {
        static LEFT: OnceLock<Option<AtomicU64>> = OnceLock::new();
        LEFT.get_or_init(|| std::env::var("ANTHILL_TEST_ACCEPTS").ok().and_then(|n| n.parse().ok()).map(AtomicU64::new)).as_ref()
    }

    /// True once the N connections are spent: the accept loop is to end.
    pub fn listener_lost() -> bool {
        left().is_some_and(|left| left.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1)).is_err())
    }
}

/// The plain-text connections of `listener`, each under `limits`.
pub fn incoming(
    listener: TcpListener,
    limits: Arc<PerAddress>,
    mut stopped: watch::Receiver<bool>,
) -> ReceiverStream<std::io::Result<Counted<TcpStream>>> {
    let (tx, rx) = mpsc::channel(ACCEPTED_QUEUE);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = accept(&listener, &limits, &mut stopped) => accepted,
                _ = tx.closed() => return,
            };
            let Some((tcp, place)) = accepted else { return };
            if tx.send(Ok(Counted::new(tcp, place))).await.is_err() {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_a_limit_when_an_address_reaches_it_then_it_gets_no_more_until_one_of_its_connections_ends() {
        let metrics = Arc::new(Metrics::default());
        let limits = PerAddress::new(2, metrics.clone());
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let first = limits.admit(a).unwrap();
        let _second = limits.admit(a).unwrap();
        assert!(limits.admit(a).is_none(), "a third from one address");
        assert!(limits.admit(b).is_some(), "another address is not held back");
        assert_eq!(metrics.connections_refused.get(), 1);
        drop(first);
        assert_eq!(limits.open(a), 1);
        assert!(limits.admit(a).is_some(), "a place freed is taken again");
        let unlimited = PerAddress::new(0, metrics);
        let many: Vec<_> = (0..10_000).map(|_| unlimited.admit(a).unwrap()).collect();
        assert_eq!(unlimited.open(a), 10_000);
        drop(many);
        assert_eq!(unlimited.open(a), 0, "every place given back, and the address forgotten");
    }
}
