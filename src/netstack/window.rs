//! Buffers that follow use: receive windows that grow with the bandwidth-delay
//! product, send buffers that keep the peer's window in flight, both shrinking back
//! when the connection goes idle, all within a per-stack memory budget.
//!
//! A flow starts with small buffers ([`StackConfig::socket_buffer`]). Its window scale
//! is chosen at the SYN for the largest buffer it may get
//! ([`StackConfig::max_socket_buffer`]), and the patched smoltcp replaces a live
//! socket's buffers keeping their contents (see `smoltcp-patched/PATCHES.md`).
//!
//! - **Receive side**, as Linux's `tcp_rcv_space_adjust` does: once per round trip,
//!   the bytes the reader consumed in it are measured; a window smaller than twice that
//!   is what limits a sender, so the buffer grows to twice it (to a power of two). The
//!   round trip is measured by the receiver itself (`tcp_rcv_rtt_measure`): the time
//!   until data arrives beyond the right edge the window had when the clock started,
//!   which the sender can only send after hearing of it.
//! - **Send side**: when the writer has filled the send buffer and the buffer is
//!   smaller than twice the peer's window, it grows to that: a window in flight and as
//!   much read ahead, so the source is never the step the transfer waits on.
//! - **Idle or stalled**: after [`IDLE_SHRINK`] without a byte moving, each buffer goes
//!   back to its initial size, or, if it holds bytes nobody takes (a reader that
//!   stopped), to the power of two that holds them: a stalled connection keeps what it
//!   holds, not the window it grew to (the receive window retracted that way is
//!   advertised at once; should the peer have sent into the old window meanwhile, that
//!   data is trimmed and retransmitted).
//! - **Budget**: growth is taken from the stack's [`Budget`], and from the budget its
//!   stacks share ([`SharedBudget`], a relay's for all its sessions) if there is one;
//!   when either runs out, windows stop growing (new flows still get their small
//!   initial buffers).
//!
//! [`StackConfig::socket_buffer`]: super::StackConfig::socket_buffer
//! [`StackConfig::max_socket_buffer`]: super::StackConfig::max_socket_buffer

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use smoltcp::socket::tcp;
use smoltcp::time::{Duration, Instant};

/// How long a connection moves no byte before its buffers shrink to their initial size.
pub const IDLE_SHRINK: std::time::Duration = std::time::Duration::from_secs(1);

/// A buffer budget several stacks share, beside each one's own
/// ([`StackConfig::shared_budget`](super::StackConfig::shared_budget)): a relay's, so
/// that all its sessions together hold no more. Cheap to clone (one budget).
#[derive(Debug, Clone)]
pub struct SharedBudget(Arc<Budget>);

impl SharedBudget {
    /// A budget of `limit` bytes of socket buffers.
    pub fn new(limit: usize) -> SharedBudget {
        SharedBudget(Arc::new(Budget::new(limit, None)))
    }

    /// Bytes of socket buffers its stacks hold now.
    pub fn used(&self) -> usize {
        self.0.used()
    }

    /// Its limit.
    pub fn limit(&self) -> usize {
        self.0.limit
    }
}

/// The buffer memory of one stack: what its flows hold, against a limit, and against
/// the budget it shares with other stacks, if any.
#[derive(Debug)]
pub(crate) struct Budget {
    limit: usize,
    used: AtomicUsize,
    peak: AtomicUsize,
    refused: AtomicU64,
    shared: Option<Arc<Budget>>,
}

impl Budget {
    pub(crate) fn new(limit: usize, shared: Option<&SharedBudget>) -> Self {
        Budget {
            limit,
            used: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            refused: AtomicU64::new(0),
            shared: shared.map(|shared| shared.0.clone()),
        }
    }

    /// Counts `bytes` whatever the limits (a new flow's initial buffers).
    fn charge(&self, bytes: usize) {
        let used = self.used.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.peak.fetch_max(used, Ordering::Relaxed);
        if let Some(shared) = &self.shared {
            shared.charge(bytes);
        }
    }

    /// Takes `bytes` more if they fit under this limit and the shared one.
    fn try_grow(&self, bytes: usize) -> bool {
        let fits = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                used.checked_add(bytes).filter(|&total| total <= self.limit)
            });
        let grown = match fits {
            Ok(used) => match &self.shared {
                Some(shared) if !shared.try_grow(bytes) => {
                    self.used.fetch_sub(bytes, Ordering::Relaxed);
                    false
                }
                _ => {
                    self.peak.fetch_max(used + bytes, Ordering::Relaxed);
                    true
                }
            },
            Err(_) => false,
        };
        if !grown {
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
        grown
    }

    fn release(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::Relaxed);
        if let Some(shared) = &self.shared {
            shared.release(bytes);
        }
    }

    /// Bytes of socket buffers held now.
    pub(crate) fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// The most ever held at once.
    pub(crate) fn peak(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }

    /// Growths refused because the budget was exhausted.
    pub(crate) fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

/// Sizes of a flow's buffers.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Sizes {
    /// Initial (and idle) receive buffer.
    pub(crate) rx: usize,
    /// Initial (and idle) send buffer.
    pub(crate) tx: usize,
    /// Largest receive buffer.
    pub(crate) max_rx: usize,
    /// Largest send buffer.
    pub(crate) max_tx: usize,
}

/// The window tuning of one flow. Dropping it returns the flow's buffers to the budget.
pub(crate) struct Tuning {
    budget: Arc<Budget>,
    sizes: Sizes,
    /// Bytes charged to the budget: the socket's two buffers.
    charged: usize,
    /// The receive and send queues when last looked at.
    rx_len: usize,
    tx_len: usize,
    /// Bytes the reader has consumed, ever.
    consumed: u64,
    /// Smallest round trip measured (every sample is at least one round trip).
    rtt: Option<Duration>,
    /// Round-trip probe: the right edge of the window and when it was taken.
    rtt_probe: Option<(u64, Instant)>,
    /// Start of the current per-round-trip measurement: bytes consumed, and when.
    space_mark: (u64, Instant),
    /// When a byte last moved.
    last_active: Instant,
}

impl Tuning {
    /// A new flow's socket with its initial buffers, charged to `budget`.
    pub(crate) fn socket(
        budget: Arc<Budget>,
        sizes: Sizes,
        now: Instant,
    ) -> (tcp::Socket<'static>, Tuning) {
        let mut socket = tcp::Socket::new(buffer(sizes.rx), buffer(sizes.tx));
        socket.set_recv_capacity_limit(sizes.max_rx);
        budget.charge(sizes.rx + sizes.tx);
        let tuning = Tuning {
            budget,
            sizes,
            charged: sizes.rx + sizes.tx,
            rx_len: 0,
            tx_len: 0,
            consumed: 0,
            rtt: None,
            rtt_probe: None,
            space_mark: (0, now),
            last_active: now,
        };
        (socket, tuning)
    }

    /// Looks at what moved since the last call and resizes the buffers accordingly.
    /// Called after every ingress and every use of the socket.
    pub(crate) fn tune(&mut self, socket: &mut tcp::Socket<'static>, now: Instant) {
        let rx_len = socket.recv_queue();
        let tx_len = socket.send_queue();
        self.consumed += self.rx_len.saturating_sub(rx_len) as u64;
        if rx_len != self.rx_len || tx_len != self.tx_len {
            self.last_active = now;
        }
        self.rx_len = rx_len;
        self.tx_len = tx_len;
        self.measure_rtt(socket, now);
        self.grow_rx(socket, now);
        self.grow_tx(socket);
        if now >= self.last_active + Duration::from(IDLE_SHRINK) {
            self.shrink(socket);
        }
    }

    /// When the flow must be looked at again to shrink its buffers, if they are larger
    /// than what they would shrink to.
    pub(crate) fn poll_at(&self, socket: &tcp::Socket<'static>) -> Option<Instant> {
        let (rx, tx) = self.shrunk_sizes();
        let grown = socket.recv_capacity() > rx || socket.send_capacity() > tx;
        grown.then(|| self.last_active + Duration::from(IDLE_SHRINK))
    }

    /// What the buffers shrink to: their initial sizes, or the power of two that holds
    /// what they hold.
    fn shrunk_sizes(&self) -> (usize, usize) {
        let fit = |initial: usize, held: usize| match held {
            0 => initial,
            held => initial.max(held.next_power_of_two()),
        };
        (fit(self.sizes.rx, self.rx_len), fit(self.sizes.tx, self.tx_len))
    }

    fn measure_rtt(&mut self, socket: &tcp::Socket<'static>, now: Instant) {
        let received = self.consumed + self.rx_len as u64;
        let edge = self.consumed + socket.recv_capacity() as u64;
        match self.rtt_probe {
            Some((probe_edge, at)) if received > probe_edge => {
                let sample = now - at;
                self.rtt = Some(self.rtt.map_or(sample, |rtt| rtt.min(sample)));
                self.rtt_probe = Some((edge, now));
            }
            Some(_) => {}
            None => self.rtt_probe = Some((edge, now)),
        }
    }

    fn grow_rx(&mut self, socket: &mut tcp::Socket<'static>, now: Instant) {
        let Some(rtt) = self.rtt else {
            return;
        };
        let (mark, at) = self.space_mark;
        if now < at + rtt {
            return;
        }
        self.space_mark = (self.consumed, now);
        let copied = usize::try_from(self.consumed - mark).unwrap_or(usize::MAX);
        let capacity = socket.recv_capacity();
        let want = copied.saturating_mul(2).min(self.sizes.max_rx);
        if want > capacity {
            self.resize(
                socket,
                Side::Rx,
                want.next_power_of_two().min(self.sizes.max_rx),
            );
        }
    }

    fn grow_tx(&mut self, socket: &mut tcp::Socket<'static>) {
        let capacity = socket.send_capacity();
        if self.tx_len < capacity {
            return;
        }
        let want = socket
            .send_window()
            .saturating_mul(2)
            .min(self.sizes.max_tx);
        if want > capacity {
            self.resize(
                socket,
                Side::Tx,
                want.next_power_of_two().min(self.sizes.max_tx),
            );
        }
    }

    /// Shrinks both buffers to [`shrunk_sizes`](Self::shrunk_sizes).
    fn shrink(&mut self, socket: &mut tcp::Socket<'static>) {
        let (rx, tx) = self.shrunk_sizes();
        if socket.recv_capacity() > rx {
            self.resize(socket, Side::Rx, rx);
        }
        if socket.send_capacity() > tx {
            self.resize(socket, Side::Tx, tx);
        }
    }

    /// Gives one side a buffer of `target` bytes, or, when growing past the budget, the
    /// largest power of two above the current size that fits.
    fn resize(&mut self, socket: &mut tcp::Socket<'static>, side: Side, mut target: usize) {
        let current = match side {
            Side::Rx => socket.recv_capacity(),
            Side::Tx => socket.send_capacity(),
        };
        if target > current {
            while !self.budget.try_grow(target - current) {
                target /= 2;
                if target <= current {
                    return;
                }
            }
        } else if target == current {
            return;
        }
        let replaced = match side {
            Side::Rx => socket.replace_recv_buffer(buffer(target)),
            Side::Tx => socket.replace_send_buffer(buffer(target)),
        };
        match replaced {
            Ok(_) if target < current => self.budget.release(current - target),
            Ok(_) => {}
            // Only a shrink can be refused (data or out-of-order segments in the way).
            Err(_) if target > current => {
                self.budget.release(target - current);
                return;
            }
            Err(_) => return,
        }
        self.charged = self.charged + target - current;
    }
}

impl Drop for Tuning {
    fn drop(&mut self) {
        self.budget.release(self.charged);
    }
}

#[derive(Clone, Copy)]
enum Side {
    Rx,
    Tx,
}

fn buffer(len: usize) -> tcp::SocketBuffer<'static> {
    tcp::SocketBuffer::new(vec![0; len])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stacks_sharing_a_budget_grow_within_both_limits() {
        let shared = SharedBudget::new(100);
        let (a, b) = (Budget::new(80, Some(&shared)), Budget::new(80, Some(&shared)));
        a.charge(10);
        assert!(a.try_grow(50));
        assert!(!b.try_grow(50), "the shared budget holds 60 of 100");
        assert_eq!((b.used(), b.refused()), (0, 1), "nothing kept of a refused growth");
        assert!(b.try_grow(40));
        assert_eq!(shared.used(), 100);
        assert!(!a.try_grow(1));
        a.release(60);
        assert!(b.try_grow(30), "what one stack gives back, another may take");
        assert!(!b.try_grow(20), "its own limit");
        assert_eq!(shared.used(), 70);
    }
}
