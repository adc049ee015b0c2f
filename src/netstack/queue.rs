//! The bounded queue of packets a stack sends to its peer.
//!
//! Every flow of a stack pushes into one [`PacketQueue`]; the link writer drains it in
//! batches. The queue is bounded in bytes. A flow's *egress* (new data, window updates)
//! is refused once the soft limit is reached: smoltcp keeps that data in the socket
//! buffer and the flow is woken to try again when the writer has made room, so nothing
//! is dropped. Replies generated while *ingesting* a packet (RSTs for refused SYNs,
//! challenge ACKs) are never refused below the hard limit (twice the soft limit), so
//! that ingress never has to wait; past the hard limit such a reply is dropped and
//! counted, and TCP's own timers repair it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;

use super::lock;

/// A bounded, multi-producer, single-consumer queue of outbound IP packets.
#[derive(Debug)]
pub struct PacketQueue {
    soft_limit: usize,
    queued_bytes: AtomicUsize,
    dropped_replies: AtomicU64,
    state: Mutex<QueueState>,
}

#[derive(Debug, Default)]
struct QueueState {
    packets: VecDeque<Bytes>,
    consumer: Option<Waker>,
    /// Flows whose egress was refused for lack of room, woken when room is made.
    blocked: Vec<Waker>,
    closed: bool,
}

impl PacketQueue {
    /// Creates a queue that refuses egress once `soft_limit` bytes are queued.
    pub fn new(soft_limit: usize) -> Self {
        PacketQueue {
            soft_limit,
            queued_bytes: AtomicUsize::new(0),
            dropped_replies: AtomicU64::new(0),
            state: Mutex::new(QueueState::default()),
        }
    }

    /// Whether egress may add another packet now.
    pub(crate) fn has_room(&self) -> bool {
        self.queued_bytes.load(Ordering::Relaxed) < self.soft_limit
    }

    /// Appends a packet. `reply` marks a packet generated while ingesting, which is
    /// accepted up to the hard limit; returns false if it was dropped.
    pub(crate) fn push(&self, packet: Bytes, reply: bool) -> bool {
        let len = packet.len();
        let consumer = {
            let mut state = lock(&self.state);
            let queued = self.queued_bytes.load(Ordering::Relaxed);
            if state.closed || (reply && queued >= 2 * self.soft_limit) {
                self.dropped_replies.fetch_add(1, Ordering::Relaxed);
                return false;
            }
            self.queued_bytes.store(queued + len, Ordering::Relaxed);
            state.packets.push_back(packet);
            state.consumer.take()
        };
        if let Some(waker) = consumer {
            waker.wake();
        }
        true
    }

    /// Registers `waker` to be woken when the queue has room again. Returns false,
    /// registering nothing, if there is room already (the writer drained in between):
    /// the caller should simply try again. Never wakes anything itself, so it is safe
    /// to call with locks held.
    pub(crate) fn wake_when_room(&self, waker: &Waker) -> bool {
        let mut state = lock(&self.state);
        if self.has_room() || state.closed {
            return false;
        }
        if !state.blocked.iter().any(|w| w.will_wake(waker)) {
            state.blocked.push(waker.clone());
        }
        true
    }

    /// Moves up to `max` packets into `out`. Returns `Ready(0)` once the queue is closed
    /// and empty, `Pending` while it is open and empty.
    pub fn poll_drain(
        &self,
        cx: &mut Context<'_>,
        out: &mut Vec<Bytes>,
        max: usize,
    ) -> Poll<usize> {
        let (moved, to_wake) = {
            let mut state = lock(&self.state);
            if state.packets.is_empty() {
                if state.closed {
                    return Poll::Ready(0);
                }
                state.consumer = Some(cx.waker().clone());
                return Poll::Pending;
            }
            let n = state.packets.len().min(max);
            let mut bytes = 0;
            for packet in state.packets.drain(..n) {
                bytes += packet.len();
                out.push(packet);
            }
            let queued = self.queued_bytes.load(Ordering::Relaxed) - bytes;
            self.queued_bytes.store(queued, Ordering::Relaxed);
            // Wake blocked flows only below half the limit, so they find real room.
            let to_wake = if queued < self.soft_limit / 2 {
                std::mem::take(&mut state.blocked)
            } else {
                Vec::new()
            };
            (n, to_wake)
        };
        to_wake.into_iter().for_each(Waker::wake);
        Poll::Ready(moved)
    }

    /// Waits for packets and moves up to `max` of them into `out`; returns 0 once the
    /// queue is closed and empty.
    pub async fn drain(&self, out: &mut Vec<Bytes>, max: usize) -> usize {
        std::future::poll_fn(|cx| self.poll_drain(cx, out, max)).await
    }

    /// Closes the queue: later pushes are dropped, the consumer drains what is left and
    /// then sees 0, and blocked flows are woken.
    pub fn close(&self) {
        let (consumer, blocked) = {
            let mut state = lock(&self.state);
            state.closed = true;
            (state.consumer.take(), std::mem::take(&mut state.blocked))
        };
        consumer.into_iter().chain(blocked).for_each(Waker::wake);
    }

    /// Discards every queued packet (their connections are gone).
    pub fn clear(&self) {
        let blocked = {
            let mut state = lock(&self.state);
            state.packets.clear();
            self.queued_bytes.store(0, Ordering::Relaxed);
            std::mem::take(&mut state.blocked)
        };
        blocked.into_iter().for_each(Waker::wake);
    }

    /// Bytes currently queued.
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes.load(Ordering::Relaxed)
    }

    /// Ingress replies dropped because the queue was past its hard limit or closed.
    pub fn dropped_replies(&self) -> u64 {
        self.dropped_replies.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    use std::task::Wake;

    struct Flag(AtomicBool);
    impl Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    #[test]
    fn egress_is_refused_at_the_soft_limit_and_woken_below_half() {
        let queue = PacketQueue::new(100);
        assert!(queue.has_room());
        assert!(queue.push(Bytes::from(vec![0; 60]), false));
        assert!(queue.push(Bytes::from(vec![0; 60]), false));
        assert!(!queue.has_room());

        let flag = Arc::new(Flag(AtomicBool::new(false)));
        let waker = Waker::from(flag.clone());
        assert!(queue.wake_when_room(&waker));
        assert!(!flag.0.load(Ordering::SeqCst));

        let mut out = Vec::new();
        let mut cx = Context::from_waker(Waker::noop());
        assert_eq!(queue.poll_drain(&mut cx, &mut out, 1), Poll::Ready(1));
        assert!(
            !flag.0.load(Ordering::SeqCst),
            "60 of 100 bytes is not below half"
        );
        assert_eq!(queue.poll_drain(&mut cx, &mut out, 8), Poll::Ready(1));
        assert!(flag.0.load(Ordering::SeqCst));
        assert_eq!(queue.queued_bytes(), 0);
    }

    #[test]
    fn registering_with_room_asks_for_an_immediate_retry() {
        let queue = PacketQueue::new(100);
        assert!(!queue.wake_when_room(Waker::noop()));
    }

    #[test]
    fn replies_pass_the_soft_limit_but_not_the_hard_limit() {
        let queue = PacketQueue::new(100);
        assert!(queue.push(Bytes::from(vec![0; 150]), true));
        assert!(queue.push(Bytes::from(vec![0; 60]), true));
        assert!(!queue.push(Bytes::from(vec![0; 40]), true));
        assert_eq!(queue.dropped_replies(), 1);
    }

    #[test]
    fn a_closed_queue_drains_then_reports_the_end() {
        let queue = PacketQueue::new(100);
        queue.push(Bytes::from_static(b"x"), false);
        queue.close();
        assert!(!queue.push(Bytes::from_static(b"y"), false));
        let mut out = Vec::new();
        let mut cx = Context::from_waker(Waker::noop());
        assert_eq!(queue.poll_drain(&mut cx, &mut out, 8), Poll::Ready(1));
        assert_eq!(queue.poll_drain(&mut cx, &mut out, 8), Poll::Ready(0));
    }
}
