//! The order in which a stack's flows send: one lane of packets per flow, served by
//! deficit round robin, lanes that just became active first (the order fq_codel's flow
//! queues give, RFC 8290 §4.2).
//!
//! A lane that had nothing queued and gets a packet joins the *new* lanes, which are
//! served before the *old* ones: a SYN, a pure ACK, a window update or a keystroke goes
//! out ahead of every backlogged flow. A lane that has spent its quantum moves to the
//! back of the old lanes and gets a fresh quantum, so backlogged flows share the link
//! in turns of about `quantum` bytes each, whatever their packet sizes. A new lane that
//! empties moves to the old lanes rather than leaving, so a flow cannot stay "new" by
//! sending in small bursts. No I/O, no locks, no clock: [`super::queue`] wraps it.

use std::collections::VecDeque;
use std::task::Waker;

use bytes::Bytes;

/// A flow's lane in [`Lanes`]; valid until [`Lanes::release`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct LaneId(usize);

/// The lanes of one outbound queue and the order they are served in.
#[derive(Debug)]
pub(crate) struct Lanes {
    lanes: Vec<Lane>,
    /// Indices of lanes free for reuse.
    free: Vec<usize>,
    new: VecDeque<usize>,
    old: VecDeque<usize>,
    quantum: usize,
    /// Bytes queued in all lanes.
    queued: usize,
}

#[derive(Debug, Default)]
struct Lane {
    packets: VecDeque<Bytes>,
    bytes: usize,
    deficit: isize,
    list: List,
    /// Its flow is gone: the lane is freed once it has sent what it holds.
    released: bool,
    /// The flow's egress, waiting for room in this lane.
    waiter: Option<Waker>,
}

/// Which round-robin list a lane is on.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum List {
    #[default]
    Idle,
    New,
    Old,
}

impl Lanes {
    /// Lanes served in turns of `quantum` bytes.
    pub(crate) fn new(quantum: usize) -> Self {
        Lanes {
            lanes: Vec::new(),
            free: Vec::new(),
            new: VecDeque::new(),
            old: VecDeque::new(),
            quantum: quantum.max(1),
            queued: 0,
        }
    }

    /// A lane for a new flow.
    pub(crate) fn open(&mut self) -> LaneId {
        match self.free.pop() {
            Some(index) => {
                self.lanes[index] = Lane::default();
                LaneId(index)
            }
            None => {
                self.lanes.push(Lane::default());
                LaneId(self.lanes.len() - 1)
            }
        }
    }

    /// The flow of `lane` is gone; the lane sends what it still holds, then is reused.
    /// Returns the lane's waiter, if any, for the caller to drop outside its lock.
    pub(crate) fn release(&mut self, lane: LaneId) -> Option<Waker> {
        let entry = &mut self.lanes[lane.0];
        entry.released = true;
        let waiter = entry.waiter.take();
        if entry.list == List::Idle {
            self.free.push(lane.0);
        }
        waiter
    }

    /// Appends a packet to `lane`; a lane that had nothing to send joins the new lanes.
    pub(crate) fn push(&mut self, lane: LaneId, packet: Bytes) {
        let entry = &mut self.lanes[lane.0];
        entry.bytes += packet.len();
        self.queued += packet.len();
        entry.packets.push_back(packet);
        if entry.list == List::Idle {
            entry.list = List::New;
            entry.deficit = self.quantum as isize;
            self.new.push_back(lane.0);
        }
    }

    /// The next packet to send and the lane it came from.
    pub(crate) fn pop(&mut self) -> Option<(LaneId, Bytes)> {
        loop {
            let (index, list) = match (self.new.front(), self.old.front()) {
                (Some(&index), _) => (index, List::New),
                (None, Some(&index)) => (index, List::Old),
                (None, None) => return None,
            };
            let entry = &mut self.lanes[index];
            if entry.deficit <= 0 {
                entry.deficit += self.quantum as isize;
                self.take_front(list);
                self.old.push_back(index);
                self.lanes[index].list = List::Old;
                continue;
            }
            let Some(packet) = entry.packets.pop_front() else {
                let released = entry.released;
                entry.list = if list == List::New {
                    List::Old
                } else {
                    List::Idle
                };
                self.take_front(list);
                if list == List::New {
                    self.old.push_back(index);
                } else if released {
                    self.free.push(index);
                }
                continue;
            };
            entry.bytes -= packet.len();
            entry.deficit -= packet.len() as isize;
            self.queued -= packet.len();
            return Some((LaneId(index), packet));
        }
    }

    fn take_front(&mut self, list: List) {
        match list {
            List::New => self.new.pop_front(),
            _ => self.old.pop_front(),
        };
    }

    /// Bytes queued in `lane`.
    pub(crate) fn bytes(&self, lane: LaneId) -> usize {
        self.lanes[lane.0].bytes
    }

    /// Bytes queued in all lanes.
    pub(crate) fn queued(&self) -> usize {
        self.queued
    }

    /// Sets the waker of `lane`'s flow, woken when the lane has room again.
    pub(crate) fn set_waiter(&mut self, lane: LaneId, waker: &Waker) {
        let entry = &mut self.lanes[lane.0];
        if !entry.waiter.as_ref().is_some_and(|w| w.will_wake(waker)) {
            entry.waiter = Some(waker.clone());
        }
    }

    /// Takes the waker of `lane`'s flow.
    pub(crate) fn take_waiter(&mut self, lane: LaneId) -> Option<Waker> {
        self.lanes[lane.0].waiter.take()
    }

    /// Takes the waker of every lane's flow.
    pub(crate) fn take_all_waiters(&mut self) -> Vec<Waker> {
        self.lanes
            .iter_mut()
            .filter_map(|entry| entry.waiter.take())
            .collect()
    }

    /// Discards every queued packet and returns every waiter; lanes stay open.
    pub(crate) fn clear(&mut self) -> Vec<Waker> {
        self.new.clear();
        self.old.clear();
        self.queued = 0;
        let waiters = self.take_all_waiters();
        for (index, entry) in self.lanes.iter_mut().enumerate() {
            entry.packets.clear();
            entry.bytes = 0;
            if entry.list != List::Idle && entry.released {
                self.free.push(index);
            }
            entry.list = List::Idle;
        }
        waiters
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(lane: u8, len: usize) -> Bytes {
        Bytes::from(vec![lane; len])
    }

    /// The lane tags (first byte) of the packets in the order they are served.
    fn serve_all(lanes: &mut Lanes) -> Vec<u8> {
        std::iter::from_fn(|| lanes.pop().map(|(_, p)| p[0])).collect()
    }

    #[test]
    fn backlogged_lanes_take_turns_of_a_quantum() {
        let mut lanes = Lanes::new(1000);
        let (a, b) = (lanes.open(), lanes.open());
        for _ in 0..4 {
            lanes.push(a, packet(1, 500));
        }
        for _ in 0..4 {
            lanes.push(b, packet(2, 500));
        }
        assert_eq!(serve_all(&mut lanes), [1, 1, 2, 2, 1, 1, 2, 2]);
        assert_eq!(lanes.queued(), 0);
    }

    #[test]
    fn large_packets_are_paid_for_over_several_turns() {
        let mut lanes = Lanes::new(1000);
        let (big, small) = (lanes.open(), lanes.open());
        lanes.push(big, packet(1, 3000));
        lanes.push(big, packet(1, 3000));
        for _ in 0..8 {
            lanes.push(small, packet(2, 1000));
        }
        // The 3000-byte packet costs three turns; `small` sends 1000 a turn meanwhile.
        assert_eq!(serve_all(&mut lanes), [1, 2, 2, 2, 1, 2, 2, 2, 2, 2]);
    }

    #[test]
    fn a_lane_that_wakes_up_goes_ahead_of_the_backlog() {
        let mut lanes = Lanes::new(1000);
        let (bulk, interactive) = (lanes.open(), lanes.open());
        for _ in 0..100 {
            lanes.push(bulk, packet(1, 1000));
        }
        assert_eq!(lanes.pop().unwrap().0, bulk);
        assert_eq!(lanes.pop().unwrap().0, bulk);
        lanes.push(interactive, packet(2, 64));
        assert_eq!(lanes.pop().unwrap().0, interactive);
        // Once idle, it is new again: its next packet goes first too.
        assert_eq!(lanes.pop().unwrap().0, bulk);
        lanes.push(interactive, packet(2, 64));
        assert_eq!(lanes.pop().unwrap().0, interactive);
    }

    #[test]
    fn a_lane_that_keeps_sending_is_ahead_for_one_quantum_only() {
        let mut lanes = Lanes::new(1000);
        let (bulk, eager) = (lanes.open(), lanes.open());
        for _ in 0..10 {
            lanes.push(bulk, packet(1, 1000));
        }
        assert_eq!(lanes.pop().unwrap().0, bulk);
        let mut order = Vec::new();
        for _ in 0..4 {
            // Another packet every time one leaves: it never goes idle.
            lanes.push(eager, packet(2, 400));
            order.push(lanes.pop().unwrap().1[0]);
        }
        // 400 + 400 + 400 bytes spend its quantum; then the backlog has its turn.
        assert_eq!(order, [2, 2, 2, 1]);
        assert_eq!(lanes.pop().unwrap().0, eager);
    }

    #[test]
    fn a_released_lane_sends_what_it_holds_then_is_reused() {
        let mut lanes = Lanes::new(1000);
        let a = lanes.open();
        lanes.push(a, packet(1, 10));
        lanes.release(a);
        let b = lanes.open();
        assert_ne!(a, b, "a lane still holding packets is not reused");
        assert_eq!(serve_all(&mut lanes), [1]);
        assert_eq!(lanes.open(), a);
    }

    #[test]
    fn an_idle_lane_is_reused_as_soon_as_it_is_released() {
        let mut lanes = Lanes::new(1000);
        let a = lanes.open();
        lanes.release(a);
        assert_eq!(lanes.open(), a);
    }

    #[test]
    fn clear_drops_every_packet_and_returns_the_waiters() {
        let mut lanes = Lanes::new(1000);
        let (a, b) = (lanes.open(), lanes.open());
        lanes.push(a, packet(1, 10));
        lanes.push(b, packet(2, 10));
        lanes.set_waiter(a, Waker::noop());
        assert_eq!(lanes.clear().len(), 1);
        assert_eq!(lanes.queued(), 0);
        assert_eq!(lanes.bytes(a), 0);
        assert!(lanes.pop().is_none());
        lanes.push(b, packet(2, 10));
        assert_eq!(serve_all(&mut lanes), [2]);
    }
}
