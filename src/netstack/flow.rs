//! One inner TCP connection: a smoltcp interface and a one-socket set of its own, so
//! that polling a flow never scans any other flow's socket.

use std::sync::{Arc, Mutex};
use std::task::{Context, Waker};

use bytes::Bytes;
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{HardwareAddress, IpCidr, IpProtocol, Ipv4Address, Ipv4Packet, TcpPacket};

use super::clock::Clock;
use super::device::FlowDevice;
use super::queue::{PacketQueue, QueueLane};
use super::window::{Budget, Sizes, Tuning};
use super::{lock, StackConfig, MAX_SOCKET_BUFFER};

/// What the stack needs to know of an inbound packet to dispatch it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PacketInfo {
    pub(crate) src: Ipv4Address,
    pub(crate) dst: Ipv4Address,
    pub(crate) key: FlowKey,
    pub(crate) syn: bool,
    pub(crate) ack: bool,
    pub(crate) rst: bool,
}

/// A flow as seen from this stack: its own port and the peer's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct FlowKey {
    pub(crate) local_port: u16,
    pub(crate) remote_port: u16,
}

/// Why an inbound packet could not be classified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unclassified {
    Malformed,
    NotTcp,
}

impl PacketInfo {
    /// Reads the addresses, ports and flags of an IPv4/TCP packet. Checks only what
    /// dispatch relies on; smoltcp validates the rest.
    pub(crate) fn classify(packet: &[u8]) -> Result<PacketInfo, Unclassified> {
        // Checks the header and total lengths against each other and the buffer.
        let ip = Ipv4Packet::new_checked(packet).map_err(|_| Unclassified::Malformed)?;
        if ip.version() != 4 {
            return Err(Unclassified::Malformed);
        }
        if ip.next_header() != IpProtocol::Tcp {
            return Err(Unclassified::NotTcp);
        }
        let tcp = TcpPacket::new_checked(ip.payload()).map_err(|_| Unclassified::Malformed)?;
        Ok(PacketInfo {
            src: ip.src_addr(),
            dst: ip.dst_addr(),
            key: FlowKey {
                local_port: tcp.dst_port(),
                remote_port: tcp.src_port(),
            },
            syn: tcp.syn(),
            ack: tcp.ack(),
            rst: tcp.rst() && !tcp.fin(),
        })
    }

    /// A SYN that opens a new connection (not a SYN-ACK, not a reset).
    pub(crate) fn opens_connection(&self) -> bool {
        self.syn && !self.ack && !self.rst
    }
}

/// One inner TCP connection and the wakers of whoever drives it.
pub(crate) struct Flow {
    pub(crate) key: FlowKey,
    state: Mutex<FlowState>,
    /// What the opener asked the flow to hold (see [`Stack::connect_holding`]) until
    /// the stack lets go of the flow, lingering included.
    ///
    /// [`Stack::connect_holding`]: super::Stack::connect_holding
    hold: Mutex<Option<Hold>>,
}

/// Anything a flow keeps alive for as long as it lives, such as the places a
/// connection takes in its owner's limits.
pub(crate) type Hold = Box<dyn Send>;

/// The mutable part of a flow, behind the flow's own lock.
pub(crate) struct FlowState {
    iface: Interface,
    sockets: SocketSet<'static>,
    handle: SocketHandle,
    /// The flow's lane of the stack's outbound queue.
    lane: QueueLane,
    mtu: usize,
    /// The stack's clock, to turn smoltcp's deadlines into tokio ones.
    pub(crate) clock: Clock,
    /// Sizes the socket's buffers to what the connection moves.
    tuning: Tuning,
    /// The peer reset the connection (as opposed to closing it).
    pub(crate) reset_by_peer: bool,
    reader: Option<Waker>,
    writer: Option<Waker>,
    /// The outbound queue refused a packet and a retry is registered with it.
    retry_registered: bool,
    /// The last egress was refused: packets are still waiting to go out.
    egress_pending: bool,
}

impl Flow {
    /// Creates a flow whose socket is set up by `open` (listen or connect).
    pub(crate) fn new(
        config: &StackConfig,
        key: FlowKey,
        seed: u64,
        clock: Clock,
        budget: &Arc<Budget>,
        outbound: &Arc<PacketQueue>,
        open: impl FnOnce(&mut tcp::Socket, &mut Interface) -> Result<(), FlowOpenError>,
    ) -> Result<Flow, FlowOpenError> {
        let lane = outbound.open_lane();
        let mut device = FlowDevice::new(None, &lane, config.mtu);
        let mut iface_config = Config::new(HardwareAddress::Ip);
        iface_config.random_seed = seed;
        let mut iface = Interface::new(iface_config, &mut device, clock.now());
        iface.update_ip_addrs(|addrs| {
            // One address fits in the interface's fixed-size list.
            let _ = addrs.push(IpCidr::new(config.local_addr.into(), 32));
        });
        let (mut socket, tuning) = Tuning::socket(budget.clone(), sizes(config), clock.now());
        socket.set_nagle_enabled(false);
        socket.set_ack_delay(None);
        open(&mut socket, &mut iface)?;
        let mut sockets = SocketSet::new(Vec::with_capacity(1));
        let handle = sockets.add(socket);
        Ok(Flow {
            key,
            state: Mutex::new(FlowState {
                iface,
                sockets,
                handle,
                lane,
                mtu: config.mtu,
                clock,
                tuning,
                reset_by_peer: false,
                reader: None,
                writer: None,
                retry_registered: false,
                egress_pending: false,
            }),
            hold: Mutex::new(None),
        })
    }

    /// The flow, holding `hold` until [`release`](Self::release) or its end.
    pub(crate) fn holding(self, hold: Hold) -> Flow {
        Flow {
            hold: Mutex::new(Some(hold)),
            ..self
        }
    }

    /// Lets go of what the flow holds: the stack is done with it.
    pub(crate) fn release(&self) {
        let hold = lock(&self.hold).take();
        drop(hold);
    }

    /// Locks the flow's state.
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, FlowState> {
        lock(&self.state)
    }

    /// Feeds one inbound packet to the flow, sends what it answers with `egress`, and
    /// wakes its driver.
    pub(crate) fn ingress(
        &self,
        packet: Bytes,
        info: &PacketInfo,
        now: Instant,
        egress: impl FnOnce(&mut FlowState),
    ) {
        let (reader, writer) = {
            let mut state = self.lock();
            let FlowState {
                iface,
                sockets,
                lane,
                mtu,
                ..
            } = &mut *state;
            let mut device = FlowDevice::new(Some(packet), lane, *mtu);
            iface.poll_ingress_single(now, &mut device, sockets);
            if info.rst {
                state.reset_by_peer = true;
            }
            egress(&mut state);
            (state.reader.take(), state.writer.take())
        };
        reader.into_iter().chain(writer).for_each(Waker::wake);
    }

    /// Resets the connection because the stack is closing: the owner sees a reset.
    pub(crate) fn reset(&self) {
        let (reader, writer) = {
            let mut state = self.lock();
            state.socket().abort();
            state.reset_by_peer = true;
            (state.reader.take(), state.writer.take())
        };
        reader.into_iter().chain(writer).for_each(Waker::wake);
    }
}

impl FlowState {
    /// The flow's TCP socket.
    pub(crate) fn socket(&mut self) -> &mut tcp::Socket<'static> {
        self.sockets.get_mut::<tcp::Socket>(self.handle)
    }

    /// The flow's lane of the stack's outbound queue.
    pub(crate) fn lane(&self) -> &QueueLane {
        &self.lane
    }

    /// Sends everything the socket has to send. Returns true if the flow's lane
    /// refused some of it and no retry is registered yet: the caller must register one
    /// (see `Stack::egress`), after which this returns false until the retry runs. A
    /// closed queue takes nothing and asks for no retry: the stack is going away.
    pub(crate) fn egress(&mut self, now: Instant) -> bool {
        let FlowState {
            iface,
            sockets,
            lane,
            mtu,
            ..
        } = self;
        let mut device = FlowDevice::new(None, lane, *mtu);
        while iface.poll_egress(now, &mut device, sockets) != smoltcp::iface::PollResult::None {}
        self.egress_pending = device.refused;
        if device.refused && !self.retry_registered {
            self.retry_registered = true;
            return true;
        }
        false
    }

    /// Called by the registered retry when the outbound queue has room again.
    pub(crate) fn retry_fired(&mut self) {
        self.retry_registered = false;
    }

    /// Resizes the socket's buffers to what the connection moves (see [`Tuning`]).
    pub(crate) fn tune(&mut self, now: Instant) {
        let socket = self.sockets.get_mut::<tcp::Socket>(self.handle);
        self.tuning.tune(socket, now);
    }

    /// When the flow next wants to be polled for its timers (smoltcp's, or shrinking
    /// idle buffers), if ever.
    pub(crate) fn poll_at(&mut self, now: Instant) -> Option<Instant> {
        let FlowState {
            iface,
            sockets,
            handle,
            tuning,
            ..
        } = self;
        // A shrink deadline that has passed (the buffers were not empty) must not hide
        // smoltcp's own, later one.
        let shrink_at = tuning
            .poll_at(sockets.get::<tcp::Socket>(*handle))
            .filter(|&at| at > now);
        let smoltcp_at = iface.poll_at(now, sockets);
        smoltcp_at.into_iter().chain(shrink_at).min()
    }

    /// Wakes whoever waits on this flow.
    pub(crate) fn wake_all(&mut self) {
        self.reader
            .take()
            .into_iter()
            .chain(self.writer.take())
            .for_each(Waker::wake);
    }

    /// Wakes `cx`'s task when a packet for this flow arrives (reading side).
    pub(crate) fn wake_reader_on_ingress(&mut self, cx: &Context<'_>) {
        self.reader = Some(cx.waker().clone());
    }

    /// Wakes `cx`'s task when a packet for this flow arrives (writing side).
    pub(crate) fn wake_writer_on_ingress(&mut self, cx: &Context<'_>) {
        self.writer = Some(cx.waker().clone());
    }

    /// The socket has reached the end of its life (reset, or both FINs exchanged and
    /// acknowledged) and has nothing left to send.
    pub(crate) fn is_finished(&mut self) -> bool {
        !self.egress_pending
            && matches!(
                self.socket().state(),
                tcp::State::Closed | tcp::State::TimeWait
            )
    }
}

/// The buffer sizes `config` gives a flow: the receive buffer starts at
/// `socket_buffer` and may grow to `max_socket_buffer`; the send buffer starts at half
/// that and may grow to twice the largest receive buffer.
fn sizes(config: &StackConfig) -> Sizes {
    let rx = config.socket_buffer.clamp(1, MAX_SOCKET_BUFFER);
    let max_rx = config.max_socket_buffer.clamp(rx, MAX_SOCKET_BUFFER);
    Sizes {
        rx,
        tx: rx.div_ceil(2),
        max_rx,
        max_tx: 2 * max_rx,
    }
}

/// Why a flow's socket could not be opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FlowOpenError;

#[cfg(test)]
mod tests {
    use super::*;

    // IPv4 (20 bytes, no options) + TCP SYN from 10.0.0.1:40000 to 10.0.0.2:8000.
    const SYN: [u8; 40] = [
        0x45, 0x00, 0x00, 0x28, 0x00, 0x01, 0x00, 0x00, 0x40, 0x06, 0x00, 0x00, 10, 0, 0, 1, 10, 0,
        0, 2, //
        0x9c, 0x40, 0x1f, 0x40, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0,
    ];

    #[test]
    fn classifies_a_syn() {
        let info = PacketInfo::classify(&SYN).unwrap();
        assert_eq!(info.src, Ipv4Address::new(10, 0, 0, 1));
        assert_eq!(info.dst, Ipv4Address::new(10, 0, 0, 2));
        assert_eq!(
            info.key,
            FlowKey {
                local_port: 8000,
                remote_port: 40000
            }
        );
        assert!(info.opens_connection());
    }

    #[test]
    fn rejects_short_and_inconsistent_headers() {
        for len in 0..SYN.len() {
            assert_eq!(
                PacketInfo::classify(&SYN[..len]),
                Err(Unclassified::Malformed),
                "prefix {len}"
            );
        }
        let mut bad_ihl = SYN;
        bad_ihl[0] = 0x44;
        assert_eq!(PacketInfo::classify(&bad_ihl), Err(Unclassified::Malformed));
        let mut udp = SYN;
        Ipv4Packet::new_unchecked(&mut udp[..]).set_next_header(IpProtocol::Udp);
        assert_eq!(PacketInfo::classify(&udp), Err(Unclassified::NotTcp));
        let mut ipv6 = SYN;
        ipv6[0] = 0x60;
        assert_eq!(PacketInfo::classify(&ipv6), Err(Unclassified::Malformed));
    }
}
