//! Handles on inner connections: [`InnerStream`] (an open connection),
//! [`Listener`] and [`PendingConnection`] (the accepting side).

use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::mpsc;
use tokio::time::Sleep;

use super::flow::{Flow, FlowState};
use super::{ConnectError, Stack};

/// An open TCP connection on a userspace [`Stack`].
///
/// It is `AsyncRead + AsyncWrite`, and [`crate::splice`] moves its bytes to and from
/// another stream without an intermediate buffer. Dropping it closes the connection:
/// gracefully (what was written is still delivered, then a FIN) if everything received
/// was read, with a reset otherwise, as a kernel socket does.
pub struct InnerStream {
    flow: Arc<Flow>,
    stack: Stack,
    timer: FlowTimer,
}

/// Wakes whoever drives a flow when smoltcp's timers for it are due (retransmission,
/// zero-window probe): without it, a lost packet would leave the flow waiting forever.
#[derive(Default)]
pub(crate) struct FlowTimer(Option<Pin<Box<Sleep>>>);

impl FlowTimer {
    /// Arms the timer for the flow's next deadline, waking `cx`'s task then.
    pub(crate) fn arm(&mut self, cx: &mut Context<'_>, state: &mut FlowState, now: Instant) {
        let Some(at) = state.poll_at(now).filter(|&at| at > now) else {
            return;
        };
        let deadline = state.clock.deadline(at);
        let sleep = self
            .0
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        sleep.as_mut().reset(deadline);
        if sleep.as_mut().poll(cx).is_ready() {
            cx.waker().wake_by_ref();
        }
    }
}

impl std::fmt::Debug for InnerStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InnerStream")
            .field("local_port", &self.flow.key.local_port)
            .field("remote_port", &self.flow.key.remote_port)
            .finish()
    }
}

impl InnerStream {
    pub(crate) fn new(flow: Arc<Flow>, stack: Stack) -> Self {
        InnerStream {
            flow,
            stack,
            timer: FlowTimer::default(),
        }
    }

    /// This end's port.
    pub fn local_port(&self) -> u16 {
        self.flow.key.local_port
    }

    /// The peer's port.
    pub fn remote_port(&self) -> u16 {
        self.flow.key.remote_port
    }

    /// Resets the connection: the peer sees a RST, and unsent data is discarded.
    pub fn abort(self) {
        self.with_flow(|state, _| state.socket().abort());
    }

    /// Runs `f` on the flow's state (locked); afterwards sends whatever the socket has
    /// to send. `f` also gets the time to use.
    pub(crate) fn with_flow<R>(&self, f: impl FnOnce(&mut FlowState, Instant) -> R) -> R {
        with_flow(&self.flow, &self.stack, f)
    }

    /// Waits until the handshake is complete; `Err` if the connection was refused or
    /// reset first.
    pub(crate) async fn established(&self) -> Result<(), ()> {
        poll_fn(|cx| {
            self.with_flow(|state, _| match state.socket().state() {
                tcp::State::Listen | tcp::State::SynSent | tcp::State::SynReceived => {
                    state.wake_reader_on_ingress(cx);
                    Poll::Pending
                }
                tcp::State::Closed | tcp::State::TimeWait => Poll::Ready(Err(())),
                _ => Poll::Ready(Ok(())),
            })
        })
        .await
    }
}

impl AsyncRead for InnerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let InnerStream { flow, stack, timer } = self.get_mut();
        with_flow(flow, stack, |state, now| {
            let reset = state.reset_by_peer;
            let socket = state.socket();
            if socket.can_recv() {
                let n = socket.recv_slice(buf.initialize_unfilled()).unwrap_or(0);
                buf.advance(n);
                return Poll::Ready(Ok(()));
            }
            if reset {
                return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()));
            }
            if !socket.may_recv() {
                return Poll::Ready(Ok(()));
            }
            state.wake_reader_on_ingress(cx);
            timer.arm(cx, state, now);
            Poll::Pending
        })
    }
}

impl AsyncWrite for InnerStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let InnerStream { flow, stack, timer } = self.get_mut();
        with_flow(flow, stack, |state, now| {
            if state.reset_by_peer {
                return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()));
            }
            let socket = state.socket();
            if !socket.may_send() {
                return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
            }
            if socket.can_send() {
                return Poll::Ready(Ok(socket.send_slice(data).unwrap_or(0)));
            }
            state.wake_writer_on_ingress(cx);
            timer.arm(cx, state, now);
            Poll::Pending
        })
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Written bytes are in the socket's buffer and go out as the window allows.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let InnerStream { flow, stack, timer } = self.get_mut();
        with_flow(flow, stack, |state, now| {
            if state.reset_by_peer {
                return Poll::Ready(Err(io::ErrorKind::ConnectionReset.into()));
            }
            let socket = state.socket();
            // The FIN goes out once everything before it is acknowledged (see
            // `Splice::fin_pending` for why it must not wait behind queued data).
            if socket.may_send() && socket.send_queue() > 0 {
                state.wake_writer_on_ingress(cx);
                timer.arm(cx, state, now);
                return Poll::Pending;
            }
            socket.close();
            Poll::Ready(Ok(()))
        })
    }
}

impl Drop for InnerStream {
    fn drop(&mut self) {
        let finished = self.with_flow(|state, _| {
            if state.is_finished() {
                return true;
            }
            let socket = state.socket();
            if socket.recv_queue() > 0 || !is_synchronized(socket.state()) {
                socket.abort();
            } else if socket.send_queue() == 0 {
                socket.close();
            }
            state.is_finished()
        });
        if finished {
            self.stack.forget(&self.flow);
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(linger(self.flow.clone(), self.stack.clone()));
            }
            Err(_) => {
                self.with_flow(|state, _| state.socket().abort());
                self.stack.forget(&self.flow);
            }
        }
    }
}

/// See [`InnerStream::with_flow`].
fn with_flow<R>(
    flow: &Arc<Flow>,
    stack: &Stack,
    f: impl FnOnce(&mut FlowState, Instant) -> R,
) -> R {
    let now = stack.now();
    let mut state = flow.lock();
    let result = f(&mut state, now);
    stack.egress(flow, &mut state, now);
    result
}

/// Whether the handshake has completed (the connection can carry data or FINs).
fn is_synchronized(state: tcp::State) -> bool {
    !matches!(
        state,
        tcp::State::Closed | tcp::State::Listen | tcp::State::SynSent | tcp::State::SynReceived
    )
}

/// Lets a dropped connection finish its graceful close (deliver what is left, exchange
/// FINs), discarding anything more the peer sends; resets it after the linger timeout.
async fn linger(flow: Arc<Flow>, stack: Stack) {
    let mut timer = FlowTimer::default();
    let finish = poll_fn(|cx| {
        with_flow(&flow, &stack, |state, now| {
            let socket = state.socket();
            while socket
                .recv(|data| (data.len(), ()))
                .is_ok_and(|()| socket.can_recv())
            {}
            if socket.may_send() && socket.send_queue() == 0 {
                socket.close();
            }
            if state.is_finished() {
                return Poll::Ready(());
            }
            state.wake_reader_on_ingress(cx);
            timer.arm(cx, state, now);
            Poll::Pending
        })
    });
    if tokio::time::timeout(stack.config().linger_timeout, finish)
        .await
        .is_err()
    {
        with_flow(&flow, &stack, |state, _| state.socket().abort());
    }
    stack.forget(&flow);
}

/// Accepts connections to one port of a [`Stack`]. Dropping it stops listening and
/// refuses the connections not yet accepted.
#[derive(Debug)]
pub struct Listener {
    pending: mpsc::Receiver<PendingConnection>,
    stopper: ListenerStopper,
}

/// Stops a [`Listener`] at once, from wherever the listener itself is (for example
/// inside a task that will only be dropped later).
#[derive(Debug, Clone)]
pub struct ListenerStopper {
    port: u16,
    registration: mpsc::WeakSender<PendingConnection>,
    stack: Stack,
}

impl ListenerStopper {
    /// Stops listening: new connection attempts are refused from now on.
    pub fn stop(&self) {
        self.stack.unlisten(self.port, &self.registration);
    }
}

impl Listener {
    pub(crate) fn new(
        port: u16,
        pending: mpsc::Receiver<PendingConnection>,
        registration: mpsc::WeakSender<PendingConnection>,
        stack: Stack,
    ) -> Self {
        Listener {
            pending,
            stopper: ListenerStopper {
                port,
                registration,
                stack,
            },
        }
    }

    /// The port listened on.
    pub fn port(&self) -> u16 {
        self.stopper.port
    }

    /// A handle that stops this listener.
    pub fn stopper(&self) -> ListenerStopper {
        self.stopper.clone()
    }

    /// Waits for the next connection attempt; `None` once the stack is closed.
    pub async fn next(&mut self) -> Option<PendingConnection> {
        self.pending.recv().await
    }

    /// Waits for the next connection and completes its handshake.
    pub async fn accept(&mut self) -> Result<InnerStream, ConnectError> {
        loop {
            let pending = self.next().await.ok_or(ConnectError::Closed)?;
            match pending.accept().await {
                // A peer that gave up before the handshake ended is no error of ours.
                Err(ConnectError::Refused) => continue,
                result => return result,
            }
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stopper.stop();
    }
}

/// A connection attempt whose SYN-ACK is held back until it is accepted, so that the
/// owner can first check it can serve it (for example, connect to a local service).
/// Dropping it refuses the connection with a RST.
#[derive(Debug)]
pub struct PendingConnection {
    stream: InnerStream,
}

impl PendingConnection {
    pub(crate) fn new(flow: Arc<Flow>, stack: Stack) -> Self {
        PendingConnection {
            stream: InnerStream::new(flow, stack),
        }
    }

    /// The port connected to.
    pub fn local_port(&self) -> u16 {
        self.stream.local_port()
    }

    /// The connecting peer's port.
    pub fn remote_port(&self) -> u16 {
        self.stream.remote_port()
    }

    /// Sends the SYN-ACK and waits for the handshake to complete.
    pub async fn accept(self) -> Result<InnerStream, ConnectError> {
        let stream = self.stream;
        stream.with_flow(|state, _| state.socket().pause_synack(false));
        let timeout = stream.stack.config().handshake_timeout;
        match tokio::time::timeout(timeout, stream.established()).await {
            Ok(Ok(())) => {
                stream.stack.count_pending(true);
                Ok(stream)
            }
            Ok(Err(())) => Err(ConnectError::Refused),
            Err(_elapsed) => Err(ConnectError::TimedOut),
        }
    }

    /// Refuses the connection: the peer sees a reset.
    pub fn refuse(self) {
        self.stream.stack.count_pending(false);
    }
}
