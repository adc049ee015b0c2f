//! Moves bytes both ways between an inner connection and any tokio byte stream.
//!
//! The copy goes straight between the smoltcp socket's buffers and the stream: bytes
//! from the inner connection are written to the stream from the socket's receive
//! buffer (`socket.recv(|buf| stream.poll_write(buf))`), and bytes from the stream are
//! read into the socket's send buffer (`socket.send(|buf| stream.poll_read(buf))`).
//! There is no intermediate buffer and so no extra copy.
//!
//! Each direction ends on its own: an EOF from the stream becomes a FIN on the inner
//! connection after everything before it, and a FIN from the inner connection becomes
//! a write shutdown of the stream. A reset on either side aborts the other. Each
//! direction moves only while its destination has room, so a reader that stops only
//! stops its own connection.

use std::fmt;
use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::netstack::{FlowTimer, InnerStream, Listener};

/// Bytes moved by a finished [`splice`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpliceStats {
    /// Bytes from the inner connection written to the stream.
    pub inner_to_outer: u64,
    /// Bytes from the stream sent on the inner connection.
    pub outer_to_inner: u64,
}

/// Why a [`splice`] ended before both directions closed cleanly.
#[derive(Debug)]
#[non_exhaustive]
pub enum SpliceError {
    /// The inner connection was reset by its peer (or its stack closed).
    InnerReset,
    /// Reading or writing the stream failed; the inner connection was reset.
    Outer(io::Error),
}

impl fmt::Display for SpliceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SpliceError::InnerReset => f.write_str("inner connection reset"),
            SpliceError::Outer(e) => write!(f, "stream failed: {e}"),
        }
    }
}

impl std::error::Error for SpliceError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SpliceError::InnerReset => None,
            SpliceError::Outer(e) => Some(e),
        }
    }
}

/// Moves bytes between `inner` and `outer` until both directions have closed, or
/// either side fails. On failure the inner connection is reset; resetting `outer` is
/// up to the caller ([`splice_tcp`] does it for a `TcpStream`).
pub async fn splice<S>(inner: &InnerStream, outer: &mut S) -> Result<SpliceStats, SpliceError>
where
    S: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut splice = Splice {
        outer: Pin::new(outer),
        stats: SpliceStats::default(),
        inner_to_outer_open: true,
        outer_to_inner_open: true,
        fin_pending: false,
        timer: FlowTimer::default(),
    };
    let result = poll_fn(|cx| inner.with_flow(|state, now| splice.poll(cx, state, now))).await;
    if result.is_err() {
        inner.with_flow(|state, _| state.socket().abort());
    }
    result
}

/// Serves every connection to `listener` from the service at `target`, until the
/// listener's stack closes. Each connection first connects to `target` (within
/// `connect_timeout`); only then is the inner handshake completed, so a client of a
/// service that is not running sees its connection refused rather than accepted and
/// dropped.
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

/// [`splice`] for a kernel TCP stream, which is reset when the inner connection is.
pub async fn splice_tcp(
    inner: &InnerStream,
    mut outer: TcpStream,
) -> Result<SpliceStats, SpliceError> {
    let result = splice(inner, &mut outer).await;
    if result.is_err() {
        // Dropping the stream now sends a RST instead of a FIN.
        let _ = outer.set_zero_linger();
    }
    result
}

struct Splice<'a, S: ?Sized> {
    outer: Pin<&'a mut S>,
    stats: SpliceStats,
    inner_to_outer_open: bool,
    outer_to_inner_open: bool,
    /// The stream has ended but the FIN waits until the send buffer is drained: in
    /// LAST-ACK smoltcp 0.14 takes a window update for a duplicate ACK and drops it, so
    /// a FIN queued behind data the peer cannot take yet would stall the data.
    fin_pending: bool,
    /// Wakes the splice when smoltcp's timers (retransmission) are due.
    timer: FlowTimer,
}

impl<S: AsyncRead + AsyncWrite + ?Sized> Splice<'_, S> {
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        state: &mut crate::netstack::FlowState,
        now: smoltcp::time::Instant,
    ) -> Poll<Result<SpliceStats, SpliceError>> {
        if state.reset_by_peer {
            return Poll::Ready(Err(SpliceError::InnerReset));
        }
        if let Err(e) = self.inner_to_outer(cx, state) {
            return Poll::Ready(Err(SpliceError::Outer(e)));
        }
        if let Err(e) = self.outer_to_inner(cx, state) {
            return Poll::Ready(Err(SpliceError::Outer(e)));
        }
        if !self.inner_to_outer_open && !self.outer_to_inner_open && state.is_finished() {
            return Poll::Ready(Ok(self.stats));
        }
        state.wake_reader_on_ingress(cx);
        self.timer.arm(cx, state, now);
        Poll::Pending
    }

    /// Writes what the inner connection received to the stream; shuts the stream's
    /// write side once the inner connection's FIN has been reached.
    fn inner_to_outer(
        &mut self,
        cx: &mut Context<'_>,
        state: &mut crate::netstack::FlowState,
    ) -> io::Result<()> {
        if !self.inner_to_outer_open {
            return Ok(());
        }
        let socket = state.socket();
        let mut wrote = false;
        while socket.can_recv() {
            let outer = self.outer.as_mut();
            let written = socket.recv(|data| match outer.poll_write(cx, data) {
                Poll::Ready(Ok(0)) => (0, Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => (n, Ok(n)),
                Poll::Ready(Err(e)) => (0, Err(e)),
                Poll::Pending => (0, Ok(0)),
            });
            match written {
                Ok(Ok(0)) | Err(_) => break,
                Ok(Ok(n)) => {
                    self.stats.inner_to_outer += n as u64;
                    wrote = true;
                }
                Ok(Err(e)) => return Err(e),
            }
        }
        if wrote {
            if let Poll::Ready(Err(e)) = self.outer.as_mut().poll_flush(cx) {
                return Err(e);
            }
        }
        if !socket.may_recv() && !socket.can_recv() {
            match self.outer.as_mut().poll_shutdown(cx) {
                Poll::Ready(Ok(())) => self.inner_to_outer_open = false,
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => {}
            }
        }
        Ok(())
    }

    /// Reads from the stream into the inner connection's send buffer; sends a FIN at
    /// the stream's EOF.
    fn outer_to_inner(
        &mut self,
        cx: &mut Context<'_>,
        state: &mut crate::netstack::FlowState,
    ) -> io::Result<()> {
        let socket = state.socket();
        if self.fin_pending && socket.send_queue() == 0 {
            socket.close();
            self.fin_pending = false;
        }
        if !self.outer_to_inner_open {
            return Ok(());
        }
        while socket.can_send() {
            let outer = self.outer.as_mut();
            let read = socket.send(|space| {
                let mut buf = ReadBuf::new(space);
                match outer.poll_read(cx, &mut buf) {
                    Poll::Ready(Ok(())) => {
                        let n = buf.filled().len();
                        (n, Ok(Some(n)))
                    }
                    Poll::Ready(Err(e)) => (0, Err(e)),
                    Poll::Pending => (0, Ok(None)),
                }
            });
            match read {
                Ok(Ok(Some(0))) => {
                    if socket.send_queue() == 0 {
                        socket.close();
                    } else {
                        self.fin_pending = true;
                    }
                    self.outer_to_inner_open = false;
                    break;
                }
                Ok(Ok(Some(n))) => self.stats.outer_to_inner += n as u64,
                Ok(Ok(None)) | Err(_) => break,
                Ok(Err(e)) => return Err(e),
            }
        }
        Ok(())
    }
}
