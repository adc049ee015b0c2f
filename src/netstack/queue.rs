//! The bounded queue of packets a stack sends to its peer, shared fairly by its flows.
//!
//! Each flow pushes into a lane of its own ([`QueueLane`]); the link writer drains the
//! lanes in the order [`fair`](super::fair) gives: flows that just became active first,
//! then backlogged flows in turns. So one download cannot hold back another flow's
//! handshake or keystroke, and no flow starves.
//!
//! The queue is bounded in bytes. A flow's *egress* (new data, window updates) is
//! admitted while its lane holds less than the lane limit (a quarter of the queue) and
//! the queue less than its soft limit; a flow with an empty lane always gets one
//! packet in, so a sparse flow is never refused because of the others. Refused data
//! stays in the socket buffer, and the flow is woken to try again once its lane has
//! drained to half the lane limit (or emptied), so nothing is dropped. Replies
//! generated while *ingesting* a packet (ACKs, RSTs for refused SYNs) are never refused
//! below the hard limit (twice the soft limit), so that ingress never has to wait; past
//! the hard limit such a reply is dropped and counted, and TCP's own timers repair it.
//! Nothing queues beyond the hard limit.
//!
//! Closing the queue wakes every waiting flow once; from then on egress is neither
//! admitted nor registered for a retry, so a closed stack goes quiet.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;

use super::fair::{LaneId, Lanes};
use super::lock;

/// Bytes a backlogged flow sends per turn: a few large packets' worth, so that turns
/// are short next to a link's round trip.
const QUANTUM: usize = 16 * 1024;

/// A bounded, multi-producer, single-consumer queue of outbound IP packets, with a lane
/// per flow.
#[derive(Debug)]
pub struct PacketQueue {
    soft_limit: usize,
    lane_limit: usize,
    /// Mirrors the lanes' total, for [`queued_bytes`](Self::queued_bytes) without the lock.
    queued_bytes: AtomicUsize,
    dropped_replies: AtomicU64,
    state: Mutex<QueueState>,
}

#[derive(Debug)]
struct QueueState {
    lanes: Lanes,
    consumer: Option<Waker>,
    /// Flows with empty lanes refused at the hard limit, woken below the soft limit.
    starved: Vec<Waker>,
    closed: bool,
}

/// Whether a lane may add a packet now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Room {
    /// It may.
    Free,
    /// Not now: register with [`QueueLane::wake_when_room`] to be told when.
    Full,
    /// Never: the queue is closed.
    Closed,
}

/// What [`QueueLane::wake_when_room`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Registration {
    /// The waker will be woken once the lane has room.
    Registered,
    /// The lane has room now: try again instead of waiting.
    RoomNow,
    /// The queue is closed: nothing will ever be admitted or woken again.
    Closed,
}

impl PacketQueue {
    /// Creates a queue that refuses egress once `soft_limit` bytes are queued, or a
    /// quarter of that in one flow's lane.
    pub fn new(soft_limit: usize) -> Self {
        PacketQueue {
            soft_limit,
            lane_limit: (soft_limit / 4).max(1),
            queued_bytes: AtomicUsize::new(0),
            dropped_replies: AtomicU64::new(0),
            state: Mutex::new(QueueState {
                lanes: Lanes::new(QUANTUM),
                consumer: None,
                starved: Vec::new(),
                closed: false,
            }),
        }
    }

    /// Opens a lane for a new flow; it is released when the returned handle is dropped.
    pub(crate) fn open_lane(self: &Arc<Self>) -> QueueLane {
        let id = lock(&self.state).lanes.open();
        QueueLane {
            queue: self.clone(),
            id,
        }
    }

    fn hard_limit(&self) -> usize {
        2 * self.soft_limit
    }

    /// Whether `lane` may add a packet now (`reply`: one generated while ingesting).
    fn admits(&self, state: &QueueState, lane: LaneId, reply: bool) -> bool {
        let queued = state.lanes.queued();
        if state.closed || queued >= self.hard_limit() {
            return false;
        }
        let own = state.lanes.bytes(lane);
        reply || own == 0 || (own < self.lane_limit && queued < self.soft_limit)
    }

    /// Whether a flow that was refused should be woken: its lane has real room again.
    fn has_room_again(&self, state: &QueueState, lane: LaneId) -> bool {
        let own = state.lanes.bytes(lane);
        own == 0 || (own <= self.lane_limit / 2 && state.lanes.queued() < self.soft_limit)
    }

    /// Moves packets into `out`, in the lanes' fair order, until they add up to
    /// `max_bytes` or more (at least one packet). Returns `Ready(0)` once the queue is
    /// closed and empty, `Pending` while it is open and empty. Flows whose lanes have
    /// room again are woken after the lock is released.
    pub fn poll_drain(
        &self,
        cx: &mut Context<'_>,
        out: &mut Vec<Bytes>,
        max_bytes: usize,
    ) -> Poll<usize> {
        let mut to_wake = Vec::new();
        let mut moved = 0;
        {
            let mut state = lock(&self.state);
            let mut bytes = 0;
            while bytes < max_bytes.max(1) {
                let Some((lane, packet)) = state.lanes.pop() else {
                    break;
                };
                bytes += packet.len();
                moved += 1;
                out.push(packet);
                if self.has_room_again(&state, lane) {
                    to_wake.extend(state.lanes.take_waiter(lane));
                }
            }
            self.queued_bytes
                .store(state.lanes.queued(), Ordering::Relaxed);
            if moved == 0 {
                if state.closed {
                    return Poll::Ready(0);
                }
                state.consumer = Some(cx.waker().clone());
                return Poll::Pending;
            }
            if state.lanes.queued() < self.soft_limit {
                to_wake.append(&mut state.starved);
            }
        }
        to_wake.into_iter().for_each(Waker::wake);
        Poll::Ready(moved)
    }

    /// Waits for packets and moves them into `out` as [`poll_drain`](Self::poll_drain)
    /// does; returns 0 once the queue is closed and empty.
    pub async fn drain(&self, out: &mut Vec<Bytes>, max_bytes: usize) -> usize {
        std::future::poll_fn(|cx| self.poll_drain(cx, out, max_bytes)).await
    }

    /// Closes the queue: later pushes are dropped, the consumer drains what is left and
    /// then sees 0, and every waiting flow is woken once (and finds the queue closed).
    pub fn close(&self) {
        let to_wake = {
            let mut state = lock(&self.state);
            state.closed = true;
            self.wake_list(&mut state)
        };
        to_wake.into_iter().for_each(Waker::wake);
    }

    /// Discards every queued packet (their connections are gone) and wakes every
    /// waiting flow.
    pub fn clear(&self) {
        let to_wake = {
            let mut state = lock(&self.state);
            let mut to_wake = state.lanes.clear();
            to_wake.append(&mut state.starved);
            self.queued_bytes.store(0, Ordering::Relaxed);
            to_wake
        };
        to_wake.into_iter().for_each(Waker::wake);
    }

    /// Every waker of the queue, taken: the consumer, the starved flows and the flows
    /// waiting for room in their lanes.
    fn wake_list(&self, state: &mut QueueState) -> Vec<Waker> {
        let mut to_wake: Vec<Waker> = state.consumer.take().into_iter().collect();
        to_wake.append(&mut state.starved);
        to_wake.extend(state.lanes.take_all_waiters());
        to_wake
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

/// One flow's lane in a [`PacketQueue`]; dropping it releases the lane once what it
/// holds has been sent.
#[derive(Debug)]
pub(crate) struct QueueLane {
    queue: Arc<PacketQueue>,
    id: LaneId,
}

impl QueueLane {
    /// Whether egress may add a packet to this lane now.
    pub(crate) fn room(&self) -> Room {
        let state = lock(&self.queue.state);
        if state.closed {
            Room::Closed
        } else if self.queue.admits(&state, self.id, false) {
            Room::Free
        } else {
            Room::Full
        }
    }

    /// Appends a packet. `reply` marks a packet generated while ingesting, which is
    /// accepted up to the hard limit; returns false if it was dropped.
    pub(crate) fn push(&self, packet: Bytes, reply: bool) -> bool {
        let queue = &*self.queue;
        let consumer = {
            let mut state = lock(&queue.state);
            if !queue.admits(&state, self.id, reply) {
                if reply || state.closed {
                    queue.dropped_replies.fetch_add(1, Ordering::Relaxed);
                }
                return false;
            }
            state.lanes.push(self.id, packet);
            queue
                .queued_bytes
                .store(state.lanes.queued(), Ordering::Relaxed);
            state.consumer.take()
        };
        if let Some(waker) = consumer {
            waker.wake();
        }
        true
    }

    /// Registers `waker` to be woken when this lane has room again, unless it has room
    /// now or the queue is closed. Never wakes anything itself, so it is safe to call
    /// with locks held.
    pub(crate) fn wake_when_room(&self, waker: &Waker) -> Registration {
        let queue = &*self.queue;
        let mut state = lock(&queue.state);
        if state.closed {
            return Registration::Closed;
        }
        if queue.admits(&state, self.id, false) {
            return Registration::RoomNow;
        }
        if state.lanes.bytes(self.id) == 0 {
            if !state.starved.iter().any(|w| w.will_wake(waker)) {
                state.starved.push(waker.clone());
            }
        } else {
            state.lanes.set_waiter(self.id, waker);
        }
        Registration::Registered
    }
}

impl Drop for QueueLane {
    fn drop(&mut self) {
        let waiter = lock(&self.queue.state).lanes.release(self.id);
        drop(waiter);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::task::Wake;

    /// Counts its wake-ups.
    #[derive(Default)]
    struct Counter(AtomicUsize);
    impl Wake for Counter {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    impl Counter {
        fn count(&self) -> usize {
            self.0.load(Ordering::SeqCst)
        }
    }

    fn drain(queue: &PacketQueue, max_bytes: usize) -> Poll<usize> {
        let mut cx = Context::from_waker(Waker::noop());
        queue.poll_drain(&mut cx, &mut Vec::new(), max_bytes)
    }

    /// Fills `lane` until egress is refused; returns the packets pushed.
    fn fill(lane: &QueueLane, len: usize) -> usize {
        let mut pushed = 0;
        while lane.room() == Room::Free {
            assert!(lane.push(Bytes::from(vec![0; len]), false));
            pushed += 1;
        }
        pushed
    }

    #[test]
    fn one_flow_holds_at_most_a_quarter_of_the_queue() {
        let queue = Arc::new(PacketQueue::new(1000));
        let bulk = queue.open_lane();
        assert_eq!(fill(&bulk, 50), 5);
        assert_eq!(queue.queued_bytes(), 250);
        let other = queue.open_lane();
        assert_eq!(other.room(), Room::Free);
    }

    #[test]
    fn a_flow_with_an_empty_lane_gets_a_packet_in_past_the_soft_limit() {
        let queue = Arc::new(PacketQueue::new(1000));
        let lanes: Vec<QueueLane> = (0..4).map(|_| queue.open_lane()).collect();
        for lane in &lanes {
            fill(lane, 50);
        }
        assert_eq!(queue.queued_bytes(), 1000);
        let sparse = queue.open_lane();
        assert!(sparse.push(Bytes::from(vec![0; 40]), false));
        assert_eq!(sparse.room(), Room::Full, "a second packet waits for the soft limit");
    }

    #[test]
    fn a_refused_flow_is_woken_once_its_lane_drains_to_half() {
        let queue = Arc::new(PacketQueue::new(400));
        let lane = queue.open_lane();
        assert_eq!(fill(&lane, 25), 4);
        let counter = Arc::new(Counter::default());
        let waker = Waker::from(counter.clone());
        assert_eq!(lane.wake_when_room(&waker), Registration::Registered);
        assert_eq!(drain(&queue, 25), Poll::Ready(1));
        assert_eq!(counter.count(), 0, "75 of a 100-byte lane is not half");
        assert_eq!(drain(&queue, 25), Poll::Ready(1));
        assert_eq!(counter.count(), 1);
        assert_eq!(drain(&queue, 1000), Poll::Ready(2));
        assert_eq!(counter.count(), 1, "woken once per registration");
    }

    #[test]
    fn registering_with_room_asks_for_an_immediate_retry() {
        let queue = Arc::new(PacketQueue::new(100));
        let lane = queue.open_lane();
        assert_eq!(lane.wake_when_room(Waker::noop()), Registration::RoomNow);
    }

    #[test]
    fn drain_serves_a_new_flow_ahead_of_a_backlog() {
        let queue = Arc::new(PacketQueue::new(1 << 20));
        let bulk = queue.open_lane();
        for _ in 0..16 {
            bulk.push(Bytes::from(vec![1; 16 * 1024]), false);
        }
        let mut cx = Context::from_waker(Waker::noop());
        let mut out = Vec::new();
        assert_eq!(queue.poll_drain(&mut cx, &mut out, 1), Poll::Ready(1));
        let ping = queue.open_lane();
        ping.push(Bytes::from(vec![2; 64]), false);
        out.clear();
        assert_eq!(queue.poll_drain(&mut cx, &mut out, 1), Poll::Ready(1));
        assert_eq!(out[0][0], 2);
    }

    #[test]
    fn replies_pass_the_lane_and_soft_limits_but_not_the_hard_limit() {
        let queue = Arc::new(PacketQueue::new(100));
        let lane = queue.open_lane();
        assert!(lane.push(Bytes::from(vec![0; 150]), true));
        assert!(lane.push(Bytes::from(vec![0; 40]), true));
        assert!(lane.push(Bytes::from(vec![0; 20]), true));
        assert!(!lane.push(Bytes::from(vec![0; 1]), true));
        assert_eq!(queue.dropped_replies(), 1);
    }

    #[test]
    fn a_starved_flow_is_woken_below_the_soft_limit() {
        let queue = Arc::new(PacketQueue::new(100));
        let full = queue.open_lane();
        assert!(full.push(Bytes::from(vec![0; 200]), true));
        let starved = queue.open_lane();
        assert_eq!(starved.room(), Room::Full);
        let counter = Arc::new(Counter::default());
        let waker = Waker::from(counter.clone());
        assert_eq!(starved.wake_when_room(&waker), Registration::Registered);
        assert_eq!(drain(&queue, 1), Poll::Ready(1));
        assert_eq!(counter.count(), 1);
    }

    #[test]
    fn closing_wakes_each_waiting_flow_once_and_refuses_everything_after() {
        let queue = Arc::new(PacketQueue::new(100));
        let lanes: Vec<QueueLane> = (0..3).map(|_| queue.open_lane()).collect();
        let counters: Vec<Arc<Counter>> = lanes
            .iter()
            .map(|lane| {
                fill(lane, 25);
                let counter = Arc::new(Counter::default());
                let registered = lane.wake_when_room(&Waker::from(counter.clone()));
                assert_eq!(registered, Registration::Registered);
                counter
            })
            .collect();
        queue.close();
        assert!(counters.iter().all(|c| c.count() == 1));
        for lane in &lanes {
            assert_eq!(lane.room(), Room::Closed);
            assert_eq!(lane.wake_when_room(Waker::noop()), Registration::Closed);
            assert!(!lane.push(Bytes::from_static(b"y"), false));
        }
        queue.close();
        assert!(counters.iter().all(|c| c.count() == 1), "woken only once");
    }

    #[test]
    fn a_closed_queue_drains_then_reports_the_end() {
        let queue = Arc::new(PacketQueue::new(100));
        let lane = queue.open_lane();
        lane.push(Bytes::from_static(b"x"), false);
        queue.close();
        assert_eq!(drain(&queue, 8), Poll::Ready(1));
        assert_eq!(drain(&queue, 8), Poll::Ready(0));
    }

    #[test]
    fn clear_discards_everything_and_wakes_the_waiting() {
        let queue = Arc::new(PacketQueue::new(100));
        let lane = queue.open_lane();
        fill(&lane, 25);
        let counter = Arc::new(Counter::default());
        lane.wake_when_room(&Waker::from(counter.clone()));
        queue.clear();
        assert_eq!(counter.count(), 1);
        assert_eq!(queue.queued_bytes(), 0);
        assert_eq!(lane.room(), Room::Free);
    }
}
