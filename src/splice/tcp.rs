//! Splices whose outer side is a kernel TCP connection, plain or under TLS: they watch
//! the connection for a reset from its peer and reset it themselves when the splice fails.

use std::io::{self, IoSlice};
use std::net::{Shutdown, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

use super::{splice_watching, SpliceError, SpliceOptions, SpliceStats};
use crate::netstack::{InnerStream, Listener};

/// A kernel TCP stream that a TLS stream can run over while [`splice_tls`] still reaches
/// the socket underneath, to watch it for a reset and to reset it. A clone is another
/// handle on the same socket.
#[derive(Debug, Clone)]
pub struct SharedTcp(Arc<TcpStream>);

impl SharedTcp {
    /// Wraps an accepted or connected stream.
    pub fn new(stream: TcpStream) -> SharedTcp {
        SharedTcp(Arc::new(stream))
    }

    /// The stream itself, for its addresses and socket options.
    pub fn get_ref(&self) -> &TcpStream {
        &self.0
    }
}

impl AsyncRead for SharedTcp {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            ready!(self.0.poll_read_ready(cx))?;
            // Callers (rustls, the splice) hand in initialised buffers: this fills nothing.
            match self.0.try_read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                // The readiness was stale and is now cleared: wait for the next.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for SharedTcp {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_with(cx, |tcp| tcp.try_write(buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_with(cx, |tcp| tcp.try_write_vectored(bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(socket2::SockRef::from(&*self.0).shutdown(Shutdown::Write))
    }
}

impl SharedTcp {
    /// Writes with `write` once the socket is writable, waiting again on a stale readiness.
    fn poll_write_with(
        &self,
        cx: &mut Context<'_>,
        write: impl Fn(&TcpStream) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.0.poll_write_ready(cx))?;
            match write(&self.0) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                written => return Poll::Ready(written),
            }
        }
    }
}

/// Serves every connection to `listener` from the service at `target`, until the
/// listener's stack closes. Each connection first connects to `target` (within
/// `connect_timeout`); only then is the inner handshake completed, so a client of a
/// service that is not running sees its connection refused rather than accepted and
/// dropped. Connections have no idle timeout here: the relay's decides.
pub async fn forward_to(mut listener: Listener, target: SocketAddr, connect_timeout: Duration) {
    while let Some(pending) = listener.next().await {
        tokio::spawn(async move {
            let stream =
                match tokio::time::timeout(connect_timeout, TcpStream::connect(target)).await {
                    Ok(Ok(stream)) => stream,
                    _ => return pending.refuse(),
                };
            // Small writes (requests, keystrokes) must not wait for Nagle.
            let _ = stream.set_nodelay(true);
            if let Ok(inner) = pending.accept().await {
                let _ = splice_tcp(&inner, stream).await;
            }
        });
    }
}

/// [`splice_tcp_with`] with no idle timeout.
pub async fn splice_tcp(inner: &InnerStream, outer: TcpStream) -> Result<SpliceStats, SpliceError> {
    splice_tcp_with(inner, outer, SpliceOptions::default()).await
}

/// [`splice`](super::splice) for a kernel TCP stream: ends at once when its peer resets
/// it, and resets it (RST, not FIN) when the splice fails.
pub async fn splice_tcp_with(
    inner: &InnerStream,
    outer: TcpStream,
    options: SpliceOptions,
) -> Result<SpliceStats, SpliceError> {
    let mut outer = SharedTcp::new(outer);
    let transport = outer.0.clone();
    let result = splice_watching(inner, &mut outer, options, Some(&transport)).await;
    end(&transport, &result);
    result
}

/// [`splice`](super::splice) for a server TLS stream: ends at once when the TCP peer
/// resets the connection. When the splice fails (the inner connection was reset, the
/// client's stream failed, or the connection idled out) the TLS stream ends without
/// `close_notify` and the TCP connection with a RST, so the client sees an error and
/// never a clean end of truncated data. A clean end was already sent by the splice
/// (`close_notify`, then FIN) when the inner connection closed.
pub async fn splice_tls(
    inner: &InnerStream,
    mut tls: TlsStream<SharedTcp>,
    options: SpliceOptions,
) -> Result<SpliceStats, SpliceError> {
    let transport = tls.get_ref().0 .0.clone();
    let result = splice_watching(inner, &mut tls, options, Some(&transport)).await;
    end(&transport, &result);
    // Dropping the TLS stream sends nothing: rustls writes `close_notify` only when asked.
    drop(tls);
    result
}

/// After a failed splice, makes the last close of `transport` send a RST.
fn end<T>(transport: &TcpStream, result: &Result<T, SpliceError>) {
    if result.is_err() {
        let _ = transport.set_zero_linger();
    }
}
