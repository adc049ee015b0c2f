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
//! Each flow holds `3 × socket_buffer` bytes of buffers (see [`StackConfig::socket_buffer`]);
//! the outbound queue holds about
//! `outbound_queue_bytes`; each listener queues at most `accept_backlog` connections
//! not yet accepted, and SYNs beyond that are refused with a RST.

mod device;
mod flow;
pub mod queue;
mod stream;

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

pub(crate) use flow::FlowState;
pub use queue::PacketQueue;
pub use smoltcp::wire::Ipv4Address;
pub(crate) use stream::FlowTimer;
pub use stream::{InnerStream, Listener, ListenerStopper, PendingConnection};

use device::FlowDevice;
use flow::{Flow, FlowKey, FlowOpenError, PacketInfo, Unclassified};

/// The relay's address on the inner link.
pub const RELAY_ADDR: Ipv4Address = Ipv4Address::new(100, 64, 0, 1);
/// The agent's address on the inner link.
pub const AGENT_ADDR: Ipv4Address = Ipv4Address::new(100, 64, 0, 2);

/// The default socket buffer of a flow ([`StackConfig::socket_buffer`]): 65,535 bytes,
/// the largest window TCP advertises without scaling.
///
/// A flow's buffers are allocated whole when it opens (smoltcp's are fixed rings), so
/// this size is paid by every connection, idle or not. Larger buffers (up to
/// [`MAX_SOCKET_BUFFER`]) let a bulk transfer keep several segments in flight: on the
/// reference machine 256 KiB moved about 1.5× as many bytes per second through one
/// connection, but doubled the memory of an idle connection and the time to open one.
pub const DEFAULT_SOCKET_BUFFER: usize = 65_535;

/// The largest socket buffer a flow may be given.
pub const MAX_SOCKET_BUFFER: usize = 4 * 1024 * 1024;

/// Settings of one [`Stack`].
#[derive(Debug, Clone)]
pub struct StackConfig {
    /// This stack's address on the inner link.
    pub(crate) local_addr: Ipv4Address,
    /// The peer stack's address; packets from any other source are dropped.
    pub(crate) peer_addr: Ipv4Address,
    /// Largest IP packet either side sends (at most 65535).
    pub mtu: usize,
    /// Size of each flow's receive buffer, so of the window it offers, in bytes; at most
    /// [`MAX_SOCKET_BUFFER`] (larger values are capped). The send buffer is twice as
    /// large: a window's worth of bytes in flight, and as many read from the source and
    /// ready to go the moment the peer's window opens, so reading the source is not a
    /// step the transfer waits on.
    pub socket_buffer: usize,
    /// Soft bound on the bytes waiting in the outbound queue.
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

/// Why [`Stack::ingress`] did not deliver a packet. Every case is also counted in
/// [`StackStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Dropped {
    /// Not a well-formed IPv4 packet with a TCP header.
    Malformed,
    /// An IPv4 packet of another protocol than TCP.
    NotTcp,
    /// Source or destination is not this link's pair of addresses.
    WrongAddress,
    /// Not part of any open connection.
    UnknownFlow,
    /// A SYN to a port nobody listens on: answered with a RST.
    NoListener,
    /// A SYN to a listener whose backlog is full: answered with a RST.
    BacklogFull,
    /// The stack is closed.
    Closed,
}

impl fmt::Display for Dropped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Dropped::Malformed => "malformed IPv4/TCP packet",
            Dropped::NotTcp => "not a TCP packet",
            Dropped::WrongAddress => "packet addressed outside this link",
            Dropped::UnknownFlow => "packet for no open connection",
            Dropped::NoListener => "connection to a port nobody listens on",
            Dropped::BacklogFull => "connection refused: accept backlog full",
            Dropped::Closed => "stack is closed",
        })
    }
}

impl std::error::Error for Dropped {}

/// Why [`Stack::connect`] failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectError {
    /// The peer answered with a RST: nothing accepts connections on that port.
    Refused,
    /// The handshake did not complete within the configured timeout.
    TimedOut,
    /// Every local port towards that remote port is in use.
    NoFreePort,
    /// The stack is closed.
    Closed,
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ConnectError::Refused => "connection refused by the peer",
            ConnectError::TimedOut => "connection handshake timed out",
            ConnectError::NoFreePort => "no free local port for another connection",
            ConnectError::Closed => "the userspace stack is closed",
        })
    }
}

impl std::error::Error for ConnectError {}

/// Why [`Stack::listen`] failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ListenError {
    /// Another listener holds this port.
    PortInUse(u16),
    /// Port 0 cannot be listened on.
    InvalidPort,
    /// The stack is closed.
    Closed,
}

impl fmt::Display for ListenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenError::PortInUse(port) => write!(f, "inner port {port} already has a listener"),
            ListenError::InvalidPort => f.write_str("inner port 0 cannot be listened on"),
            ListenError::Closed => f.write_str("the userspace stack is closed"),
        }
    }
}

impl std::error::Error for ListenError {}

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
}

#[derive(Debug, Default)]
struct Counters {
    packets_in: AtomicU64,
    dropped_malformed: AtomicU64,
    dropped_wrong_address: AtomicU64,
    dropped_unknown_flow: AtomicU64,
    refused_syns: AtomicU64,
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
    outbound: PacketQueue,
    /// Answers SYNs that no listener takes with a RST; holds no sockets.
    refuser: Mutex<Interface>,
    counters: Counters,
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
        let outbound = PacketQueue::new(config.outbound_queue_bytes);
        let mut device = FlowDevice::new(None, &outbound, config.mtu);
        let mut refuser = Interface::new(
            Config::new(HardwareAddress::Ip),
            &mut device,
            Instant::now(),
        );
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
                counters: Counters::default(),
                config,
            }),
        }
    }

    /// This stack's settings.
    pub fn config(&self) -> &StackConfig {
        &self.shared.config
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
        let now = Instant::now();
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
            now,
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
        flow.ingress(packet, info, now, &self.shared.outbound, |state| {
            self.egress(flow, state, now)
        });
    }

    /// Sends what a flow has to send (the caller holds its lock); if the outbound queue
    /// refuses, the flow is polled again when there is room, whoever owns it.
    fn egress(&self, flow: &Arc<Flow>, state: &mut FlowState, now: Instant) {
        while state.egress(now, &self.shared.outbound) {
            let retry = EgressRetry {
                flow: Arc::downgrade(flow),
                shared: Arc::downgrade(&self.shared),
            };
            if self
                .shared
                .outbound
                .wake_when_room(&Waker::from(Arc::new(retry)))
            {
                return;
            }
            // The writer made room meanwhile: go again.
            state.retry_fired();
        }
    }

    /// Answers a SYN with a RST (smoltcp does so for a packet no socket takes).
    fn refuse(&self, packet: Bytes, now: Instant, why: Dropped) -> Result<(), Dropped> {
        self.shared
            .counters
            .refused_syns
            .fetch_add(1, Ordering::Relaxed);
        let mut device =
            FlowDevice::new(Some(packet), &self.shared.outbound, self.shared.config.mtu);
        let mut no_sockets = SocketSet::new(Vec::new());
        lock(&self.shared.refuser).poll_ingress_single(now, &mut device, &mut no_sockets);
        Err(why)
    }

    /// Opens a connection to `port` on the peer stack and waits for the handshake.
    pub async fn connect(&self, port: u16) -> Result<InnerStream, ConnectError> {
        let now = Instant::now();
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
                now,
                &self.shared.outbound,
                |socket, iface| {
                    socket
                        .connect(iface.context(), (peer, port), local_port)
                        .map_err(|_| FlowOpenError)
                },
            )
            .map_err(|_| ConnectError::NoFreePort)?;
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
        }
    }

    /// Forgets a flow (once its connection is over).
    fn forget(&self, flow: &Arc<Flow>) {
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
        stack.egress(&flow, &mut state, Instant::now());
        // Whoever drives the flow may be waiting for its packets to leave.
        state.wake_all();
    }
}

/// Moves packets both ways between two stacks in the same process until either is
/// closed: an in-memory link, for tests, benchmarks and fuzzing.
pub async fn connect_in_memory(a: Stack, b: Stack) {
    tokio::join!(pump(a.clone(), b.clone()), pump(b, a));
}

/// Drains `from`'s outbound queue into `to`'s ingress; closes `to` when `from` closes.
async fn pump(from: Stack, to: Stack) {
    let mut batch = Vec::with_capacity(64);
    while from.outbound().drain(&mut batch, 64).await > 0 {
        for packet in batch.drain(..) {
            // Drops are counted by the receiving stack.
            let _ = to.ingress(packet);
        }
    }
    to.close();
}

/// Locks a mutex, ignoring poisoning: every critical section leaves its data
/// consistent, so a panic elsewhere must not cascade.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}
