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
//!
//! Two things end a connection that no longer moves (issue 12):
//! - an idle timeout ([`SpliceOptions::idle_timeout`]): no byte moved either way for that
//!   long resets both sides, so a client that sent and left cannot hold a connection that
//!   its service never reads;
//! - a reset from the kernel TCP peer ([`splice_tcp`], [`splice_tls`]) ends the splice at
//!   once, even while nothing is being read from it because the inner connection is full.
//!
//! A splice that ends in an error resets both sides: the inner connection is aborted, a
//! kernel TCP stream is closed with a RST, and a TLS stream ends without `close_notify`,
//! so a client never mistakes a cut transfer for a complete one.
//!
//! Files: this one holds the byte pump; `tcp` the kernel-socket front ends
//! ([`SharedTcp`], [`splice_tcp`], [`splice_tls`], [`forward_to`]).

use std::fmt;
use std::future::{poll_fn, Future};
use std::io;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

use crate::netstack::{FlowTimer, InnerStream};

mod tcp;
#[cfg(test)]
mod tests;

pub use tcp::{forward_to, splice_tcp, splice_tcp_with, splice_tls, SharedTcp};

/// Bytes moved by a finished [`splice`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpliceStats {
    /// Bytes from the inner connection written to the stream.
    pub inner_to_outer: u64,
    /// Bytes from the stream sent on the inner connection.
    pub outer_to_inner: u64,
}

/// How a splice treats a connection that stops moving, and where it counts its bytes.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct SpliceOptions {
    /// Resets both sides once the connection has made no progress for this long:
    /// no byte moved either way, or while the inner connection holds bytes the stream
    /// does not take, none of them moved (bytes the stream sends meanwhile do not
    /// count). `None`: never.
    pub idle_timeout: Option<Duration>,
    /// Kept up to date with the bytes moved, also when the splice fails or is dropped.
    pub meter: Option<Arc<Meter>>,
}

impl SpliceOptions {
    /// Options with the given idle timeout (`None`: connections may idle forever).
    pub fn idle_timeout(idle_timeout: Option<Duration>) -> SpliceOptions {
        SpliceOptions {
            idle_timeout,
            meter: None,
        }
    }

    /// These options, counting the bytes moved in `meter`.
    pub fn metered(self, meter: Arc<Meter>) -> SpliceOptions {
        SpliceOptions {
            meter: Some(meter),
            ..self
        }
    }
}

/// The bytes a splice has moved so far, readable while it runs and after it ended, how
/// ever it ended.
#[derive(Debug, Default)]
pub struct Meter {
    inner_to_outer: AtomicU64,
    outer_to_inner: AtomicU64,
}

impl Meter {
    /// The bytes moved so far.
    pub fn read(&self) -> SpliceStats {
        SpliceStats {
            inner_to_outer: self.inner_to_outer.load(Ordering::Relaxed),
            outer_to_inner: self.outer_to_inner.load(Ordering::Relaxed),
        }
    }

    fn record(&self, stats: SpliceStats) {
        self.inner_to_outer
            .store(stats.inner_to_outer, Ordering::Relaxed);
        self.outer_to_inner
            .store(stats.outer_to_inner, Ordering::Relaxed);
    }
}

/// Why a [`splice`] ended before both directions closed cleanly.
#[derive(Debug)]
#[non_exhaustive]
pub enum SpliceError {
    /// The inner connection was reset by its peer (or its stack closed).
    InnerReset,
    /// Reading or writing the stream failed, or its TCP peer reset it; the inner
    /// connection was reset.
    Outer(io::Error),
    /// No byte moved either way for [`SpliceOptions::idle_timeout`]; both sides were reset.
    Idle,
}

impl fmt::Display for SpliceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SpliceError::InnerReset => f.write_str("inner connection reset"),
            SpliceError::Outer(e) => write!(f, "stream failed: {e}"),
            SpliceError::Idle => f.write_str("connection idle for too long"),
        }
    }
}

impl std::error::Error for SpliceError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SpliceError::Outer(e) => Some(e),
            SpliceError::InnerReset | SpliceError::Idle => None,
        }
    }
}

/// Moves bytes between `inner` and `outer` until both directions have closed, or
/// either side fails. On failure the inner connection is reset; resetting `outer` is up
/// to the caller. [`splice_tcp`] and [`splice_tls`] do it, and also take
/// [`SpliceOptions`] and notice a reset of the TCP peer while not reading.
pub async fn splice<S>(inner: &InnerStream, outer: &mut S) -> Result<SpliceStats, SpliceError>
where
    S: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    splice_watching(inner, outer, SpliceOptions::default(), None).await
}

/// [`splice`], also ending at once with [`SpliceError::Outer`] when `transport` (the
/// kernel connection under `outer`) reports an error such as a reset from its peer.
async fn splice_watching<S>(
    inner: &InnerStream,
    outer: &mut S,
    options: SpliceOptions,
    transport: Option<&TcpStream>,
) -> Result<SpliceStats, SpliceError>
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
    // Error readiness is its own waiter in tokio: it fires on a RST even while the
    // stream's read side, full of data nobody takes, is not being polled.
    let mut reset = pin!(async {
        match transport {
            Some(tcp) => transport_error(tcp).await,
            None => std::future::pending().await,
        }
    });
    let mut idle = options.idle_timeout.map(IdleTimer::new);
    let mut idle_sleep = pin!(idle.as_ref().map(|idle| tokio::time::sleep(idle.limit)));
    let result = poll_fn(|cx| {
        let before = splice.stats;
        let (polled, waiting_out) = inner.with_flow(|state, now| {
            let polled = splice.poll(cx, state, now);
            (polled, state.socket().recv_queue() > 0)
        });
        if let Some(meter) = options.meter.as_ref().filter(|_| splice.stats != before) {
            meter.record(splice.stats);
        }
        if let Poll::Ready(result) = polled {
            return Poll::Ready(result);
        }
        let moved = splice.stats != before;
        // Progress: bytes the stream took, or bytes from it while it takes what there
        // is for it. A peer that stopped reading cannot keep the connection by
        // trickling bytes in.
        let moved_out = splice.stats.inner_to_outer != before.inner_to_outer;
        let progress = moved_out || (moved && !waiting_out);
        // Checked when nothing moved, so a busy transfer does not pay for it; its waiter
        // stays registered in between, and a stalled connection moves nothing.
        if !moved {
            if let Poll::Ready(e) = reset.as_mut().poll(cx) {
                return Poll::Ready(Err(SpliceError::Outer(e)));
            }
        }
        if let (Some(idle), Some(sleep)) = (&mut idle, idle_sleep.as_mut().as_pin_mut()) {
            if idle.expired(cx, sleep, progress) {
                return Poll::Ready(Err(SpliceError::Idle));
            }
        }
        Poll::Pending
    })
    .await;
    if result.is_err() {
        inner.with_flow(|state, _| state.socket().abort());
    }
    result
}

/// Waits until `tcp` reports an error (a reset from its peer) and returns it.
async fn transport_error(tcp: &TcpStream) -> io::Error {
    match tcp.ready(Interest::ERROR).await {
        Err(e) => e,
        Ok(_) => match tcp.take_error() {
            Ok(Some(e)) | Err(e) => e,
            Ok(None) => io::ErrorKind::ConnectionReset.into(),
        },
    }
}

/// When a splice last moved a byte, against its idle timeout.
struct IdleTimer {
    limit: Duration,
    last_moved: Instant,
}

impl IdleTimer {
    fn new(limit: Duration) -> IdleTimer {
        IdleTimer {
            limit,
            last_moved: Instant::now(),
        }
    }

    /// Notes whether bytes `moved` in this poll; true once none moved for the limit.
    /// The sleep is moved forward only when it fires, not on every byte.
    fn expired(&mut self, cx: &mut Context<'_>, mut sleep: Pin<&mut Sleep>, moved: bool) -> bool {
        if moved {
            self.last_moved = Instant::now();
        }
        while sleep.as_mut().poll(cx).is_ready() {
            let due = self.last_moved + self.limit;
            if due <= Instant::now() {
                return true;
            }
            sleep.as_mut().reset(due);
        }
        false
    }
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
