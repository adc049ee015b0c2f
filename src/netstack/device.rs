//! The smoltcp [`Device`] a flow is polled with: at most one inbound packet, and the
//! flow's lane of the stack's outbound [`PacketQueue`](super::PacketQueue).

use bytes::Bytes;
use smoltcp::phy::{ChecksumCapabilities, Device, DeviceCapabilities, Medium, RxToken, TxToken};
use smoltcp::time::Instant;
use smoltcp::wire::{IpProtocol, Ipv4Packet, TcpPacket};

use super::pool;
use super::queue::{QueueLane, Room};

/// A device for one poll of one flow.
pub(crate) struct FlowDevice<'a> {
    inbound: Option<Bytes>,
    outbound: &'a QueueLane,
    mtu: usize,
    /// Set when egress was refused because the flow's lane was full (not closed).
    pub(crate) refused: bool,
}

impl<'a> FlowDevice<'a> {
    pub(crate) fn new(inbound: Option<Bytes>, outbound: &'a QueueLane, mtu: usize) -> Self {
        FlowDevice {
            inbound,
            outbound,
            mtu,
            refused: false,
        }
    }
}

/// The capabilities of every device of the inner link: IP medium, a large MTU and no
/// checksums (the TLS link below already guarantees integrity).
pub(crate) fn capabilities(mtu: usize) -> DeviceCapabilities {
    let mut caps = DeviceCapabilities::default();
    caps.medium = Medium::Ip;
    caps.max_transmission_unit = mtu;
    caps.checksum = ChecksumCapabilities::ignored();
    caps
}

impl Device for FlowDevice<'_> {
    type RxToken<'a>
        = InboundToken
    where
        Self: 'a;
    type TxToken<'a>
        = OutboundToken<'a>
    where
        Self: 'a;

    fn receive(&mut self, _now: Instant) -> Option<(InboundToken, OutboundToken<'_>)> {
        let packet = self.inbound.take()?;
        let reply = OutboundToken {
            queue: self.outbound,
            reply: true,
        };
        Some((InboundToken(packet), reply))
    }

    fn transmit(&mut self, _now: Instant) -> Option<OutboundToken<'_>> {
        match self.outbound.room() {
            Room::Free => {}
            Room::Full => {
                self.refused = true;
                return None;
            }
            Room::Closed => return None,
        }
        Some(OutboundToken {
            queue: self.outbound,
            reply: false,
        })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        capabilities(self.mtu)
    }
}

/// Hands one inbound packet to smoltcp.
pub(crate) struct InboundToken(Bytes);

impl RxToken for InboundToken {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

/// Builds one outbound packet and appends it to the queue.
pub(crate) struct OutboundToken<'a> {
    queue: &'a QueueLane,
    reply: bool,
}

impl TxToken for OutboundToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let (packet, result) = pool::POOL.build_packet(len, |packet| {
            let result = f(packet);
            shrink_advertised_window(packet);
            result
        });
        self.queue.push(packet, self.reply);
        result
    }
}

/// Advertises one window-scale unit less than smoltcp computed, in every segment but a
/// SYN (whose window is never scaled).
///
/// With a scaled window, smoltcp rounds its free space down to the scale unit, so a
/// later ACK's right edge can sit up to one unit *before* an earlier one; a peer that
/// had already sent up to the earlier edge gets the tail trimmed and waits for a
/// retransmission timeout (a second or more). The true edge (data read + buffer
/// size) never moves back, so an edge advertised one unit short is always behind
/// every later one: the peer never sends what will be trimmed. Unscaled windows lose
/// one byte of 65,535.
fn shrink_advertised_window(packet: &mut [u8]) {
    let Ok(mut ip) = Ipv4Packet::new_checked(packet) else {
        return;
    };
    if ip.next_header() != IpProtocol::Tcp {
        return;
    }
    let Ok(mut tcp) = TcpPacket::new_checked(ip.payload_mut()) else {
        return;
    };
    if !tcp.syn() {
        tcp.set_window_len(tcp.window_len().saturating_sub(1));
    }
}
