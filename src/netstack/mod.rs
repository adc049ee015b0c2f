//! A userspace TCP/IP stack over queues of packets.
//!
//! Each end of the agent link runs one [`Stack`]. Inbound IP packets are handed to
//! [`Stack::ingress`]; outbound ones collect in the stack's [`PacketQueue`], which the
//! link writer drains. The relay side opens connections with [`Stack::connect`]; the
//! agent side accepts them through a [`Listener`].
//!
//! Per-packet cost does not grow with the number of connections: every flow (one TCP
//! connection, keyed by its port pair) owns a smoltcp `Interface` and a one-socket
//! `SocketSet`, and the stack finds the flow of an inbound packet with one hash lookup
//! instead of letting smoltcp scan every socket. Every SYN to a listening port gets a
//! fresh socket, so a burst of SYNs is never refused because a listener was busy. The
//! accepting side holds the SYN-ACK back (`pause_synack`) until its owner decides, so a
//! connection to a service that is not running is refused instead of half-opened.
//!
//! The inner link is reliable (it runs over TLS over TCP), so checksums are skipped,
//! the MTU is large (65535 by default), and nothing is dropped to relieve pressure: a
//! full outbound queue makes flows wait (see [`queue`]).
//!
//! # Bounds
//! A flow's buffers start small and follow what it moves (see [`window`]): each flow
//! holds at least `1.5 × socket_buffer` bytes and at most `3 × max_socket_buffer`, and
//! all flows of a stack together grow only within `buffer_budget`. The outbound queue
//! holds about `outbound_queue_bytes`; each listener queues at most `accept_backlog`
//! connections not yet accepted, and SYNs beyond that are refused with a RST.

mod clock;
mod device;
mod error;
mod fair;
mod flow;
mod memory;
mod pool;
pub mod queue;
mod stream;
pub mod window;

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Wake, Waker};
use std::time::Duration;

use bytes::Bytes;
use smoltcp::iface::{Config, Interface, SocketSet};
use smoltcp::time::Instant;
use smoltcp::wire::{HardwareAddress, IpCidr};
use tokio::sync::mpsc;

pub use error::{ConnectError, Dropped, ListenError};
pub(crate) use flow::FlowState;
pub use memory::{connect_in_memory, connect_in_memory_delayed};
pub use queue::PacketQueue;
use queue::{QueueLane, Registration};
pub use smoltcp::wire::Ipv4Address;
pub(crate) use stream::FlowTimer;
pub use stream::{InnerStream, Listener, ListenerStopper, PendingConnection};

use clock::Clock;
use device::FlowDevice;
use flow::{Flow, FlowKey, FlowOpenError, PacketInfo, Unclassified};
use window::Budget;
pub use window::SharedBudget;

/// The relay's address on the inner link.
pub const RELAY_ADDR: Ipv4Address = Ipv4Address::new(100, 64, 0, 1);
/// The agent's address on the inner link.
pub const AGENT_ADDR: Ipv4Address = Ipv4Address::new(100, 64, 0, 2);

/// The default initial receive buffer of a flow ([`StackConfig::socket_buffer`]):
/// 16 KiB, with an 8 KiB send buffer. An idle connection costs that on both ends of the
/// link (48 KiB together); windows grow from it as the connection moves data.
pub const DEFAULT_SOCKET_BUFFER: usize = 16 * 1024;

/// The default largest receive window of a flow ([`StackConfig::max_socket_buffer`]):
/// 16 MiB, the bandwidth-delay product of 1 Gbit/s at 134 ms.
pub const DEFAULT_MAX_SOCKET_BUFFER: usize = 16 * 1024 * 1024;

/// The default buffer budget of a stack ([`StackConfig::buffer_budget`]): 256 MiB, five
/// connections at full window in both directions.
pub const DEFAULT_BUFFER_BUDGET: usize = 256 * 1024 * 1024;

/// The largest socket buffer a flow may be given.
pub const MAX_SOCKET_BUFFER: usize = 256 * 1024 * 1024;

/// Settings of one [`Stack`].
#[derive(Debug, Clone)]
pub struct StackConfig {
    /// This stack's address on the inner link.
    pub(crate) local_addr: Ipv4Address,
    /// The peer stack's address; packets from any other source are dropped.
    pub(crate) peer_addr: Ipv4Address,
    /// Largest IP packet either side sends (at most 65535).
    pub mtu: usize,
    /// Initial (and idle) size of each flow's receive buffer, so of the window it first
    /// offers, in bytes; at most [`MAX_SOCKET_BUFFER`] (larger values are capped). The
    /// send buffer starts at half of it.
    pub socket_buffer: usize,
    /// Largest receive buffer (window) a flow grows to, in bytes, at least
    /// `socket_buffer` and at most [`MAX_SOCKET_BUFFER`]. The send buffer grows to twice
    /// the peer's window: a window in flight and as much read ahead from the source.
    pub max_socket_buffer: usize,
    /// Bytes of socket buffers all flows of the stack may hold together before windows
    /// stop growing. New flows still get their initial buffers beyond it.
    pub buffer_budget: usize,
    /// A budget this stack shares with others (a relay's sessions), checked beside
    /// [`buffer_budget`](Self::buffer_budget); `None`: only that one.
    pub shared_budget: Option<SharedBudget>,
    /// Soft bound on the bytes waiting in the outbound queue; one flow holds at most a
    /// quarter of it (see [`queue`]).
    pub outbound_queue_bytes: usize,
    /// Connections a listener holds before they are accepted; SYNs beyond it get a RST.
    pub accept_backlog: usize,
    /// How long [`Stack::connect`] and [`PendingConnection::accept`] wait for the
    /// handshake to complete.
    pub handshake_timeout: Duration,
    /// How long a dropped stream may take to deliver what it still has to send.
    pub linger_timeout: Duration,
}

impl StackConfig {
    fn new(local_addr: Ipv4Address, peer_addr: Ipv4Address) -> Self {
        StackConfig {
            local_addr,
            peer_addr,
            mtu: 65_535,
            socket_buffer: DEFAULT_SOCKET_BUFFER,
            max_socket_buffer: DEFAULT_MAX_SOCKET_BUFFER,
            buffer_budget: DEFAULT_BUFFER_BUDGET,
            shared_budget: None,
            outbound_queue_bytes: 1024 * 1024,
            accept_backlog: 1024,
            handshake_timeout: Duration::from_secs(10),
            linger_timeout: Duration::from_secs(30),
        }
    }

    /// Defaults for the relay's end of a link.
    pub fn relay() -> Self {
        Self::new(RELAY_ADDR, AGENT_ADDR)
    }

    /// Defaults for the agent's end of a link.
    pub fn agent() -> Self {
        Self::new(AGENT_ADDR, RELAY_ADDR)
    }
}

/// Counters of a [`Stack`], for monitoring and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StackStats {
    /// Flows (connections) currently known, including ones not yet accepted.
    pub flows: usize,
    /// Ports with a listener.
    pub listeners: usize,
    /// Packets delivered to a flow or answered.
    pub packets_in: u64,
    /// Packets dropped as malformed or not TCP.
    pub dropped_malformed: u64,
    /// Packets dropped for carrying addresses other than the link's pair.
    pub dropped_wrong_address: u64,
    /// Packets dropped for belonging to no open connection.
    pub dropped_unknown_flow: u64,
    /// SYNs answered with a RST (nobody listening, or backlog full).
    pub refused_syns: u64,
    /// Bytes waiting in the outbound queue.
    pub queued_bytes: usize,
    /// Bytes of socket buffers the flows hold now.
    pub buffer_bytes: usize,
    /// The most bytes of socket buffers ever held at once.
    pub buffer_bytes_peak: usize,
    /// Window growths refused (or cut short) because the buffer budget was reached.
    pub buffer_budget_refusals: u64,
    /// Connection attempts to a listener that were accepted and completed their
    /// handshake.
    pub accepted: u64,
    /// Connection attempts to a listener that its owner refused (a forwarded port whose
    /// local service did not answer, say).
    pub declined: u64,
}

impl StackStats {
    /// Adds `other`'s counters (not its gauges) to these.
    pub fn add_counters(&mut self, other: &StackStats) {
        self.packets_in += other.packets_in;
        self.dropped_malformed += other.dropped_malformed;
        self.dropped_wrong_address += other.dropped_wrong_address;
        self.dropped_unknown_flow += other.dropped_unknown_flow;
        self.refused_syns += other.refused_syns;
        self.buffer_budget_refusals += other.buffer_budget_refusals;
        self.accepted += other.accepted;
        self.declined += other.declined;
    }

    /// Adds `other` to these: counters and gauges (a peak is the larger of the two).
    pub fn add(&mut self, other: &StackStats) {
        self.add_counters(other);
        self.flows += other.flows;
        self.listeners += other.listeners;
        self.queued_bytes += other.queued_bytes;
        self.buffer_bytes += other.buffer_bytes;
        self.buffer_bytes_peak = self.buffer_bytes_peak.max(other.buffer_bytes_peak);
    }
}

#[derive(Debug, Default)]
struct Counters {
    packets_in: AtomicU64,
    dropped_malformed: AtomicU64,
    dropped_wrong_address: AtomicU64,
    dropped_unknown_flow: AtomicU64,
    refused_syns: AtomicU64,
    accepted: AtomicU64,
    declined: AtomicU64,
}

/// A userspace TCP/IP stack: one end of an agent link. Cheap to clone (shared inside).
#[derive(Clone)]
pub struct Stack {
    shared: Arc<Shared>,
}

struct Shared {
    config: StackConfig,
    flows: Mutex<FlowTable>,
    listeners: Mutex<HashMap<u16, mpsc::Sender<PendingConnection>>>,
    outbound: Arc<PacketQueue>,
    /// Answers SYNs that no listener takes with a RST; holds no sockets.
    refuser: Mutex<Interface>,
    /// The refuser's lane of the outbound queue.
    refuser_lane: QueueLane,
    counters: Counters,
    clock: Clock,
    budget: Arc<Budget>,
}

struct FlowTable {
    flows: HashMap<FlowKey, Arc<Flow>>,
    next_port: u16,
    closed: bool,
}

const EPHEMERAL_PORTS: std::ops::RangeInclusive<u16> = 1024..=65535;

impl fmt::Debug for Stack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Stack")
            .field("local_addr", &self.shared.config.local_addr)
            .field("stats", &self.stats())
            .finish()
    }
}

impl Stack {
    /// Creates a stack with the given settings.
    pub fn new(config: StackConfig) -> Stack {
        let clock = Clock::new();
        let outbound = Arc::new(PacketQueue::new(config.outbound_queue_bytes));
        let refuser_lane = outbound.open_lane();
        let mut device = FlowDevice::new(None, &refuser_lane, config.mtu);
        let mut refuser =
            Interface::new(Config::new(HardwareAddress::Ip), &mut device, clock.now());
        refuser.update_ip_addrs(|addrs| {
            let _ = addrs.push(IpCidr::new(config.local_addr.into(), 32));
        });
        Stack {
            shared: Arc::new(Shared {
                flows: Mutex::new(FlowTable {
                    flows: HashMap::new(),
                    next_port: *EPHEMERAL_PORTS.start(),
                    closed: false,
                }),
                listeners: Mutex::new(HashMap::new()),
                outbound,
                refuser: Mutex::new(refuser),
                refuser_lane,
                counters: Counters::default(),
                clock,
                budget: Arc::new(Budget::new(
                    config.buffer_budget,
                    config.shared_budget.as_ref(),
                )),
                config,
            }),
        }
    }

    /// This stack's settings.
    pub fn config(&self) -> &StackConfig {
        &self.shared.config
    }

    /// The stack's current time on its clock (see [`clock`]).
    pub(crate) fn now(&self) -> Instant {
        self.shared.clock.now()
    }

    /// The queue of packets this stack sends to its peer; the link writer drains it.
    pub fn outbound(&self) -> &PacketQueue {
        &self.shared.outbound
    }

    /// Delivers one inbound IP packet. Never waits: the packet is processed, answered
    /// (answers go to the outbound queue) or dropped before this returns.
    pub fn ingress(&self, packet: Bytes) -> Result<(), Dropped> {
        let counters = &self.shared.counters;
        let info = match PacketInfo::classify(&packet) {
            Ok(info) => info,
            Err(why) => {
                counters.dropped_malformed.fetch_add(1, Ordering::Relaxed);
                return Err(match why {
                    Unclassified::Malformed => Dropped::Malformed,
                    Unclassified::NotTcp => Dropped::NotTcp,
                });
            }
        };
        let config = &self.shared.config;
        if info.src != config.peer_addr || info.dst != config.local_addr {
            counters
                .dropped_wrong_address
                .fetch_add(1, Ordering::Relaxed);
            return Err(Dropped::WrongAddress);
        }
        let now = self.now();
        let flow = {
            let table = lock(&self.shared.flows);
            if table.closed {
                return Err(Dropped::Closed);
            }
            table.flows.get(&info.key).cloned()
        };
        counters.packets_in.fetch_add(1, Ordering::Relaxed);
        match flow {
            Some(flow) => {
                self.deliver(&flow, packet, &info, now);
                Ok(())
            }
            None if info.opens_connection() => self.accept_syn(packet, &info, now),
            None => {
                counters.packets_in.fetch_sub(1, Ordering::Relaxed);
                counters
                    .dropped_unknown_flow
                    .fetch_add(1, Ordering::Relaxed);
                Err(Dropped::UnknownFlow)
            }
        }
    }

    /// Gives a SYN a fresh flow of its own and queues it on the port's listener.
    fn accept_syn(&self, packet: Bytes, info: &PacketInfo, now: Instant) -> Result<(), Dropped> {
        let port = info.key.local_port;
        let listener = lock(&self.shared.listeners).get(&port).cloned();
        let Some(listener) = listener else {
            return self.refuse(packet, now, Dropped::NoListener);
        };
        let Ok(permit) = listener.try_reserve() else {
            return self.refuse(packet, now, Dropped::BacklogFull);
        };
        let opened = Flow::new(
            &self.shared.config,
            info.key,
            rand::random(),
            self.shared.clock,
            &self.shared.budget,
            &self.shared.outbound,
            |socket, _| {
                socket.listen(port).map_err(|_| FlowOpenError)?;
                socket.pause_synack(true);
                Ok(())
            },
        );
        let Ok(flow) = opened else {
            return self.refuse(packet, now, Dropped::NoListener);
        };
        let flow = Arc::new(flow);
        {
            let mut table = lock(&self.shared.flows);
            if table.closed {
                return Err(Dropped::Closed);
            }
            table.flows.insert(info.key, flow.clone());
        }
        self.deliver(&flow, packet, info, now);
        permit.send(PendingConnection::new(flow, self.clone()));
        Ok(())
    }

    /// Feeds a packet to its flow; if the flow's answer did not fit in the outbound
    /// queue, arranges for it to be sent when there is room.
    fn deliver(&self, flow: &Arc<Flow>, packet: Bytes, info: &PacketInfo, now: Instant) {
        flow.ingress(packet, info, now, |state| self.egress(flow, state, now));
    }

    /// Sends what a flow has to send (the caller holds its lock); if the flow's lane
    /// refuses, the flow is polled again when there is room, whoever owns it. Once the
    /// queue is closed nothing is sent or retried.
    fn egress(&self, flow: &Arc<Flow>, state: &mut FlowState, now: Instant) {
        state.tune(now);
        while state.egress(now) {
            let retry = EgressRetry {
                flow: Arc::downgrade(flow),
                shared: Arc::downgrade(&self.shared),
            };
            match state.lane().wake_when_room(&Waker::from(Arc::new(retry))) {
                Registration::Registered | Registration::Closed => return,
                // The writer made room meanwhile: go again.
                Registration::RoomNow => state.retry_fired(),
            }
        }
    }

    /// Answers a SYN with a RST (smoltcp does so for a packet no socket takes).
    fn refuse(&self, packet: Bytes, now: Instant, why: Dropped) -> Result<(), Dropped> {
        self.shared
            .counters
            .refused_syns
            .fetch_add(1, Ordering::Relaxed);
        let mut device = FlowDevice::new(
            Some(packet),
            &self.shared.refuser_lane,
            self.shared.config.mtu,
        );
        let mut no_sockets = SocketSet::new(Vec::new());
        lock(&self.shared.refuser).poll_ingress_single(now, &mut device, &mut no_sockets);
        Err(why)
    }

    /// Opens a connection to `port` on the peer stack and waits for the handshake.
    pub async fn connect(&self, port: u16) -> Result<InnerStream, ConnectError> {
        self.connect_holding(port, ()).await
    }

    /// [`connect`](Self::connect), with the connection's flow holding `hold` until the
    /// stack lets go of it: after the stream is dropped, only once the close is over
    /// (or the linger timeout has reset it). A caller's places in its limits held this
    /// way count the connection for as long as it costs the stack anything.
    pub async fn connect_holding(
        &self,
        port: u16,
        hold: impl Send + 'static,
    ) -> Result<InnerStream, ConnectError> {
        let now = self.now();
        let flow = {
            let mut table = lock(&self.shared.flows);
            if table.closed {
                return Err(ConnectError::Closed);
            }
            let local_port = table.free_port(port).ok_or(ConnectError::NoFreePort)?;
            let key = FlowKey {
                local_port,
                remote_port: port,
            };
            let peer = self.shared.config.peer_addr;
            let flow = Flow::new(
                &self.shared.config,
                key,
                rand::random(),
                self.shared.clock,
                &self.shared.budget,
                &self.shared.outbound,
                |socket, iface| {
                    socket
                        .connect(iface.context(), (peer, port), local_port)
                        .map_err(|_| FlowOpenError)
                },
            )
            .map_err(|_| ConnectError::NoFreePort)?
            .holding(Box::new(hold));
            let flow = Arc::new(flow);
            table.flows.insert(key, flow.clone());
            flow
        };
        self.egress(&flow, &mut flow.lock(), now);
        let stream = InnerStream::new(flow, self.clone());
        match tokio::time::timeout(self.shared.config.handshake_timeout, stream.established()).await
        {
            Ok(Ok(())) => Ok(stream),
            Ok(Err(())) if self.is_closed() => Err(ConnectError::Closed),
            Ok(Err(())) => Err(ConnectError::Refused),
            Err(_elapsed) => Err(ConnectError::TimedOut),
        }
    }

    /// Starts accepting connections to `port`.
    pub fn listen(&self, port: u16) -> Result<Listener, ListenError> {
        if port == 0 {
            return Err(ListenError::InvalidPort);
        }
        if self.is_closed() {
            return Err(ListenError::Closed);
        }
        let mut listeners = lock(&self.shared.listeners);
        if listeners.contains_key(&port) {
            return Err(ListenError::PortInUse(port));
        }
        let (sender, receiver) = mpsc::channel(self.shared.config.accept_backlog.max(1));
        let registration = sender.downgrade();
        listeners.insert(port, sender);
        Ok(Listener::new(port, receiver, registration, self.clone()))
    }

    /// Closes the stack: every connection is reset, listeners stop, and the outbound
    /// queue is closed once drained.
    pub fn close(&self) {
        lock(&self.shared.flows).closed = true;
        lock(&self.shared.listeners).clear();
        self.reset_flows();
        self.shared.outbound.close();
    }

    /// Resets every connection and discards queued packets, keeping listeners: for a
    /// stack whose link was lost and will be replaced.
    pub fn reset_connections(&self) {
        self.reset_flows();
        self.shared.outbound.clear();
    }

    fn reset_flows(&self) {
        let flows: Vec<Arc<Flow>> = lock(&self.shared.flows)
            .flows
            .drain()
            .map(|(_, flow)| flow)
            .collect();
        for flow in flows {
            flow.reset();
        }
    }

    /// Whether [`close`](Self::close) was called.
    pub fn is_closed(&self) -> bool {
        lock(&self.shared.flows).closed
    }

    /// A snapshot of the stack's counters.
    pub fn stats(&self) -> StackStats {
        let c = &self.shared.counters;
        StackStats {
            flows: lock(&self.shared.flows).flows.len(),
            listeners: lock(&self.shared.listeners).len(),
            packets_in: c.packets_in.load(Ordering::Relaxed),
            dropped_malformed: c.dropped_malformed.load(Ordering::Relaxed),
            dropped_wrong_address: c.dropped_wrong_address.load(Ordering::Relaxed),
            dropped_unknown_flow: c.dropped_unknown_flow.load(Ordering::Relaxed),
            refused_syns: c.refused_syns.load(Ordering::Relaxed),
            queued_bytes: self.shared.outbound.queued_bytes(),
            buffer_bytes: self.shared.budget.used(),
            buffer_bytes_peak: self.shared.budget.peak(),
            buffer_budget_refusals: self.shared.budget.refused(),
            accepted: c.accepted.load(Ordering::Relaxed),
            declined: c.declined.load(Ordering::Relaxed),
        }
    }

    /// Counts a connection attempt to a listener: accepted (its handshake completed),
    /// or declined by the listener's owner.
    pub(crate) fn count_pending(&self, accepted: bool) {
        let c = &self.shared.counters;
        let counter = if accepted { &c.accepted } else { &c.declined };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Forgets a flow (once its connection is over), first letting go of what it
    /// holds: once [`StackStats::flows`] no longer counts it, nothing of it is held.
    fn forget(&self, flow: &Arc<Flow>) {
        flow.release();
        let mut table = lock(&self.shared.flows);
        if table
            .flows
            .get(&flow.key)
            .is_some_and(|known| Arc::ptr_eq(known, flow))
        {
            table.flows.remove(&flow.key);
        }
    }

    /// Stops the listener of `port` if it is still the one registered as `registration`
    /// (a newer listener on the same port is left alone).
    fn unlisten(&self, port: u16, registration: &mpsc::WeakSender<PendingConnection>) {
        let Some(ours) = registration.upgrade() else {
            return;
        };
        let mut listeners = lock(&self.shared.listeners);
        if listeners
            .get(&port)
            .is_some_and(|registered| registered.same_channel(&ours))
        {
            listeners.remove(&port);
        }
    }
}

impl FlowTable {
    /// A local port not yet paired with `remote_port`, chosen round-robin so that a
    /// closed connection's port is reused as late as possible.
    fn free_port(&mut self, remote_port: u16) -> Option<u16> {
        let span = usize::from(EPHEMERAL_PORTS.end() - EPHEMERAL_PORTS.start()) + 1;
        for _ in 0..span {
            let candidate = self.next_port;
            self.next_port = if candidate == *EPHEMERAL_PORTS.end() {
                *EPHEMERAL_PORTS.start()
            } else {
                candidate + 1
            };
            let key = FlowKey {
                local_port: candidate,
                remote_port,
            };
            if !self.flows.contains_key(&key) {
                return Some(candidate);
            }
        }
        None
    }
}

/// Polls a flow's egress again once the outbound queue has room. Holds only weak
/// references, so a registered retry never keeps a closed flow or stack alive.
struct EgressRetry {
    flow: Weak<Flow>,
    shared: Weak<Shared>,
}

impl Wake for EgressRetry {
    fn wake(self: Arc<Self>) {
        let (Some(flow), Some(shared)) = (self.flow.upgrade(), self.shared.upgrade()) else {
            return;
        };
        let stack = Stack { shared };
        let mut state = flow.lock();
        state.retry_fired();
        let now = stack.now();
        stack.egress(&flow, &mut state, now);
        // Whoever drives the flow may be waiting for its packets to leave.
        state.wake_all();
    }
}

/// Locks a mutex, ignoring poisoning: every critical section leaves its data
/// consistent, so a panic elsewhere must not cascade.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
