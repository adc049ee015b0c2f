//! Delivers arbitrary packets to two userspace stacks that have live connections.
//!
//! Every input gets a fresh relay stack and agent stack, joined by an in-memory link
//! that this target pumps itself, with the agent listening on [`PORT`] and two
//! established connections: on `A` the agent sent bytes the relay has not read, on `B`
//! the relay filled the agent's receive window and its own send buffer. Then the input
//! is played as a list of records, most of them one packet handed to the relay's or
//! the agent's `Stack::ingress`:
//!
//! ```text
//! record   := ctl:u8 (raw | template | action)
//! ctl      := bit 0: deliver to the relay (else the agent)
//!             bit 1: pump the link after this record
//!             bit 2: template; else raw if bits 3.. are 0, else action
//!             bits 3..: template flow, modulo 5: 0 = A, 1 = B,
//!                       2 = a fake client port (40000 + sel % 8) → PORT,
//!                       3 = relay port from the input → PORT, 4 = both ports from the input
//!             action: bits 3-4 pick an end of A or B (relay A, agent A, relay B,
//!                     agent B), bits 5-7 what its owner does (see `act`)
//! raw      := len:u16le bytes[len]
//! template := sel:u8 relay_port:u16le agent_port:u16le flags:u8 seq_delta:u32le
//!             ack_delta:u32le window:u16le option_words:u8 mutate:u8 payload_len:u16le
//!             options[4 × option_words] payload[payload_len]
//! ```
//!
//! A template packet is a real IPv4/TCP header with the link's addresses for its
//! direction. Its sequence and acknowledgment numbers are offsets from what the
//! receiving stack expects on that port pair (taken from the last packet it sent there,
//! as seen on the link), so that zero deltas land exactly in window and reach smoltcp's
//! TCP state machine; `mutate` bends the IP and TCP headers (options, fragments, TTL 0, a
//! wrong data offset or total length, trailing bytes, urgent pointer). Payloads shorter than
//! `payload_len` are padded with zeros, so large segments cost few input bytes. An
//! action record has the owner of one end of a live connection read, write or shut
//! down, so that forged packets meet data in flight and closing states. Up to
//! [`MAX_FUZZ_ACCEPTS`] connection attempts the input makes are accepted, so that
//! forged packets can complete a handshake and talk to an accepted connection.
//!
//! Asserts, after every record, that neither stack queues more than its documented
//! bound of outbound bytes and that flows stay within what listeners and accepted
//! connections allow; once the input is over, that the link goes quiet, that the flows
//! the input created are all forgotten once their owners let go of them, and that a new
//! connection to the fuzzed listener then opens and carries bytes both ways. Live
//! connections may legitimately be reset by the input; only the new one must work.
//! Timers run on tokio's paused clock, so a hang shows at once as a timeout instead of
//! slowing the fuzzer down.

#![no_main]

mod shared;

use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use portferry::netstack::{
    InnerStream, Listener, Stack, StackConfig, StackStats, AGENT_ADDR, RELAY_ADDR,
};
use shared::Input;
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{IpProtocol, Ipv4Packet, Ipv4Repr, TcpPacket, TcpSeqNumber};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::task::JoinHandle;
use tokio::time::timeout;

/// The port the agent listens on.
const PORT: u16 = 8000;
/// First of the eight fake client ports of template flow 2.
const FAKE_CLIENT_PORT: u16 = 40_000;
/// Accept backlog of the agent, small so that the input can fill it.
const BACKLOG: usize = 8;
/// Soft bound of each outbound queue, small so that the input can fill it.
const QUEUE_BYTES: usize = 16 * 1024;
/// Socket buffers of every flow (smaller than the default, for speed).
const SOCKET_BUFFER: usize = 16 * 1024;
/// Largest IP packet either stack sends.
const MTU: usize = 65_535;
/// Connections on each stack before the input plays.
const LIVE_FLOWS: usize = 2;
/// Connection attempts of the input that are accepted.
const MAX_FUZZ_ACCEPTS: usize = 4;
/// Records played per input.
const MAX_RECORDS: usize = 256;
/// Bytes of packets played per input.
const MAX_PACKET_BYTES: usize = 1 << 20;
/// Packets the link may carry after the input before it must have gone quiet.
const MAX_SETTLE_PACKETS: usize = 100_000;
/// Batches moved each way per pump of the link after a packet.
const PUMP_STEPS: usize = 4;
/// Bound of every wait, in paused (virtual) time: above every timeout of the stacks.
const STEP: Duration = Duration::from_secs(120);
/// IP and TCP header sizes without options.
const HEADER_LEN: usize = 20;

fuzz_target!(|data: &[u8]| {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("tokio runtime");
    runtime.block_on(run(data));
});

/// Plays one input; panics if an invariant breaks.
async fn run(data: &[u8]) {
    let relay = Stack::new(config(StackConfig::relay()));
    let agent = Stack::new(config(StackConfig::agent()));
    let mut link = Link::new(relay.clone(), agent.clone());
    let mut listener = agent.listen(PORT).expect("listen");

    let (relay_a, mut agent_a) = drive(&mut link, open(&relay, &mut listener)).await;
    let (mut relay_b, agent_b) = drive(&mut link, open(&relay, &mut listener)).await;
    write_now(&mut agent_a, &[b'a'; 100]);
    // One receive window at the agent, then a send buffer (twice as large) at the relay.
    for _ in 0..3 {
        write_now(&mut relay_b, &[b'b'; SOCKET_BUFFER]);
        settle(&mut link).await;
    }
    let mut live = [relay_a, agent_a, relay_b, agent_b];
    let flows = [
        (live[0].local_port(), live[0].remote_port()),
        (live[2].local_port(), live[2].remote_port()),
    ];

    let accepted = Arc::new(Mutex::new(Vec::new()));
    let mut accepting: Vec<JoinHandle<()>> = Vec::new();
    let mut input = Input(data);
    let mut played = 0;
    for _ in 0..MAX_RECORDS {
        let Some(ctl) = input.byte() else { break };
        let to_relay = ctl & 1 != 0;
        let packet = if ctl & 4 != 0 {
            forge(ctl >> 3, to_relay, &mut input, &link, &flows)
        } else if ctl >> 3 == 0 {
            let len = input.u16();
            input.take(usize::from(len)).to_vec()
        } else {
            act(&mut live[usize::from(ctl >> 3 & 3)], ctl >> 5);
            Vec::new()
        };
        played += packet.len();
        if played > MAX_PACKET_BYTES {
            break;
        }
        if !packet.is_empty() {
            // Drops are the stacks' business; only their invariants are checked.
            let _ = if to_relay { &relay } else { &agent }.ingress(Bytes::from(packet));
        }
        while accepting.len() < MAX_FUZZ_ACCEPTS {
            let Some(pending) = next_now(&mut listener) else {
                break;
            };
            let accepted = accepted.clone();
            accepting.push(tokio::spawn(async move {
                if let Ok(stream) = pending.accept().await {
                    accepted.lock().unwrap().push(stream);
                }
            }));
        }
        tokio::task::yield_now().await;
        if ctl & 2 != 0 {
            for _ in 0..PUMP_STEPS {
                link.step(&mut noop_context());
            }
        }
        check_bounds(&relay, &agent, accepting.len());
    }

    // The owners of the live connections react to what arrived.
    for stream in &mut live {
        touch(stream);
    }
    settle(&mut link).await;
    check_bounds(&relay, &agent, accepting.len());

    // Let go of the input's connections: accepted ones reset, pending ones refused.
    accepting.iter().for_each(JoinHandle::abort);
    for stream in accepted.lock().unwrap().drain(..) {
        stream.abort();
    }
    while let Some(pending) = next_now(&mut listener) {
        pending.refuse();
    }
    let forgotten = drive(
        &mut link,
        timeout(STEP, async {
            while relay.stats().flows > LIVE_FLOWS || agent.stats().flows > LIVE_FLOWS {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }),
    )
    .await;
    assert!(
        forgotten.is_ok(),
        "flows outlived their connections: relay {:?}, agent {:?}",
        relay.stats(),
        agent.stats()
    );

    // A new connection to the fuzzed listener works.
    let (client, server) = drive(&mut link, timeout(STEP, open(&relay, &mut listener)))
        .await
        .expect("new connection hung");
    let echoed = drive(&mut link, timeout(STEP, ping_pong(client, server)))
        .await
        .expect("new connection stalled");
    assert_eq!(echoed, PING, "new connection corrupted bytes");

    relay.close();
    agent.close();
}

/// The settings this target fuzzes with: small queues, buffers and backlog.
fn config(mut config: StackConfig) -> StackConfig {
    config.mtu = MTU;
    config.socket_buffer = SOCKET_BUFFER;
    config.outbound_queue_bytes = QUEUE_BYTES;
    config.accept_backlog = BACKLOG;
    config
}

/// Panics if a stack queues or tracks more than it may with `accepting` connections of
/// the input accepted.
fn check_bounds(relay: &Stack, agent: &Stack, accepting: usize) {
    // Egress stops at the soft bound and replies at twice it, each after one packet.
    let max_queued = 2 * QUEUE_BYTES + MTU;
    // The relay never accepts; the agent holds at most a backlog of pending connections.
    let bounds = [
        ("relay", relay.stats(), LIVE_FLOWS),
        ("agent", agent.stats(), LIVE_FLOWS + accepting + BACKLOG),
    ];
    for (name, stats, max_flows) in bounds {
        check_stats(name, &stats, max_queued, max_flows);
    }
}

/// Panics if `stats` of the stack called `name` exceed either bound.
fn check_stats(name: &str, stats: &StackStats, max_queued: usize, max_flows: usize) {
    assert!(
        stats.queued_bytes <= max_queued,
        "{name} queues too much: {stats:?}"
    );
    assert!(
        stats.flows <= max_flows,
        "{name} has too many flows: {stats:?}"
    );
}

/// Opens a connection from the relay to the agent's [`PORT`] and accepts it.
async fn open(relay: &Stack, listener: &mut Listener) -> (InnerStream, InnerStream) {
    let (client, server) = tokio::join!(relay.connect(PORT), listener.accept());
    (client.expect("connect"), server.expect("accept"))
}

/// What the new connection carries each way.
const PING: &[u8] = b"ping through a fuzzed stack";

/// Sends [`PING`] from `client` to `server` and back; returns what came back.
async fn ping_pong(mut client: InnerStream, mut server: InnerStream) -> Vec<u8> {
    client.write_all(PING).await.expect("client write");
    let mut received = vec![0; PING.len()];
    server.read_exact(&mut received).await.expect("server read");
    server.write_all(&received).await.expect("server write");
    let mut echoed = vec![0; PING.len()];
    client.read_exact(&mut echoed).await.expect("client read");
    echoed
}

/// A context whose waker does nothing, for polling once without waiting.
fn noop_context() -> Context<'static> {
    Context::from_waker(Waker::noop())
}

/// The next connection attempt queued on `listener`, if one is there already.
fn next_now(listener: &mut Listener) -> Option<portferry::netstack::PendingConnection> {
    match pin!(listener.next()).poll(&mut noop_context()) {
        Poll::Ready(pending) => pending,
        Poll::Pending => None,
    }
}

/// Writes as much of `data` as the stream takes without waiting.
fn write_now(stream: &mut InnerStream, mut data: &[u8]) {
    while let Poll::Ready(Ok(n @ 1..)) =
        Pin::new(&mut *stream).poll_write(&mut noop_context(), data)
    {
        data = &data[n..];
    }
}

/// Reads and writes a little on `stream` without waiting, as its owner would.
fn touch(stream: &mut InnerStream) {
    act(stream, 1);
    act(stream, 2);
}

/// Does what the owner of a live connection does in an action record, without waiting:
/// 2 writes 4 KiB, 3 writes a socket buffer's worth, 4 shuts the writing side down, 5
/// reads everything there is, anything else reads up to 4 KiB.
fn act(stream: &mut InnerStream, action: u8) {
    let cx = &mut noop_context();
    let mut buf = [0; 4096];
    match action {
        2 => drop(Pin::new(stream).poll_write(cx, &buf)),
        3 => write_now(stream, &[0x33; SOCKET_BUFFER]),
        4 => drop(Pin::new(stream).poll_shutdown(cx)),
        5 => loop {
            let mut buf = ReadBuf::new(&mut buf);
            let read = Pin::new(&mut *stream).poll_read(cx, &mut buf);
            if !matches!(read, Poll::Ready(Ok(()))) || buf.filled().is_empty() {
                break;
            }
        },
        _ => drop(Pin::new(stream).poll_read(cx, &mut ReadBuf::new(&mut buf))),
    }
}

/// The in-memory link between the two stacks, pumped by this target.
struct Link {
    relay: Stack,
    agent: Stack,
    /// The last packet each stack sent on each port pair, keyed by (sent by the relay,
    /// sender's port, receiver's port): the sequence number after it, and its ack.
    sent: HashMap<(bool, u16, u16), (u32, u32)>,
    batch: Vec<Bytes>,
}

impl Link {
    fn new(relay: Stack, agent: Stack) -> Self {
        Link {
            relay,
            agent,
            sent: HashMap::new(),
            batch: Vec::new(),
        }
    }

    /// Moves one batch each way; returns how many packets moved. Where a queue is
    /// empty, `cx` is woken when it fills.
    fn step(&mut self, cx: &mut Context<'_>) -> usize {
        let mut moved = 0;
        for from_relay in [true, false] {
            let (from, to) = if from_relay {
                (&self.relay, &self.agent)
            } else {
                (&self.agent, &self.relay)
            };
            if let Poll::Ready(n) = from.outbound().poll_drain(cx, &mut self.batch, 64 * 1024) {
                moved += n;
            }
            for packet in self.batch.drain(..) {
                if let Some((ports, numbers)) = tcp_numbers(&packet) {
                    self.sent.insert((from_relay, ports.0, ports.1), numbers);
                }
                let _ = to.ingress(packet);
            }
        }
        moved
    }

    /// The sequence and acknowledgment numbers the stack on `to_relay`'s side expects
    /// next from its peer on (`local`, `remote`), if it sent anything there.
    fn expected(&self, to_relay: bool, local: u16, remote: u16) -> Option<(u32, u32)> {
        let &(seq_end, ack) = self.sent.get(&(to_relay, local, remote))?;
        Some((ack, seq_end))
    }
}

/// Runs `fut` while pumping the link.
async fn drive<F: Future>(link: &mut Link, fut: F) -> F::Output {
    let mut fut = pin!(fut);
    poll_fn(|cx| {
        for _ in 0..64 {
            if let Poll::Ready(output) = fut.as_mut().poll(cx) {
                return Poll::Ready(output);
            }
            if link.step(cx) == 0 {
                return Poll::Pending;
            }
        }
        // Let the stacks' other tasks run.
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await
}

/// Pumps the link, letting the other tasks run, until nothing moves any more.
async fn settle(link: &mut Link) {
    let mut moved = 0;
    loop {
        let mut step = link.step(&mut noop_context());
        if step == 0 {
            tokio::task::yield_now().await;
            step = link.step(&mut noop_context());
            if step == 0 {
                return;
            }
        }
        moved += step;
        assert!(
            moved <= MAX_SETTLE_PACKETS,
            "the link never goes quiet: relay {:?}, agent {:?}",
            link.relay.stats(),
            link.agent.stats()
        );
    }
}

/// The ports (sender, receiver) and the numbers (sequence after the segment, ack) of a
/// well-formed IPv4/TCP packet.
fn tcp_numbers(packet: &[u8]) -> Option<((u16, u16), (u32, u32))> {
    let ip = Ipv4Packet::new_checked(packet).ok()?;
    let tcp = TcpPacket::new_checked(ip.payload()).ok()?;
    let seq_end = (tcp.seq_number() + tcp.segment_len()).0 as u32;
    let ports = (tcp.src_port(), tcp.dst_port());
    Some((ports, (seq_end, tcp.ack_number().0 as u32)))
}

/// Builds a template packet (see the crate docs) towards the relay or the agent.
fn forge(
    flow: u8,
    to_relay: bool,
    input: &mut Input<'_>,
    link: &Link,
    live: &[(u16, u16); 2],
) -> Vec<u8> {
    let sel = input.byte().unwrap_or(0);
    let custom = (input.u16(), input.u16());
    // Ports as (relay's, agent's).
    let (relay_port, agent_port) = match flow % 5 {
        0 => live[0],
        1 => live[1],
        2 => (FAKE_CLIENT_PORT + u16::from(sel % 8), PORT),
        3 => (custom.0, PORT),
        _ => custom,
    };
    let flags = input.byte().unwrap_or(0);
    let seq_delta = input.u32();
    let ack_delta = input.u32();
    let window = input.u16();
    let option_words = usize::from(input.byte().unwrap_or(0) % 11);
    let mutate = input.byte().unwrap_or(0);
    let payload_len = usize::from(input.u16());

    let (src, dst, src_port, dst_port, local, remote) = if to_relay {
        (
            AGENT_ADDR, RELAY_ADDR, agent_port, relay_port, relay_port, agent_port,
        )
    } else {
        (
            RELAY_ADDR, AGENT_ADDR, relay_port, agent_port, agent_port, relay_port,
        )
    };
    let (seq, ack) = link.expected(to_relay, local, remote).unwrap_or((0, 0));

    let ip_options: &[u8] = if mutate & 0x01 != 0 {
        &[1, 1, 1, 0]
    } else {
        &[]
    };
    let ip_len = HEADER_LEN + ip_options.len();
    let tcp_len = HEADER_LEN + 4 * option_words;
    let payload_len = payload_len.min(MTU - ip_len - tcp_len);
    let total = ip_len + tcp_len + payload_len;

    let mut packet = vec![0; total];
    let ip = Ipv4Repr {
        src_addr: src,
        dst_addr: dst,
        next_header: IpProtocol::Tcp,
        payload_len: total - HEADER_LEN,
        hop_limit: if mutate & 0x08 != 0 { 0 } else { 64 },
    };
    let mut header = Ipv4Packet::new_unchecked(&mut packet[..]);
    ip.emit(&mut header, &ChecksumCapabilities::ignored());
    header.set_header_len(ip_len as u8);
    header.set_ident(1);
    if mutate & 0x40 != 0 {
        header.set_total_len(total.saturating_sub(usize::from(sel & 0x0f)) as u16);
    }
    if mutate & 0x02 != 0 {
        header.set_dont_frag(false);
        header.set_more_frags(true);
    }
    if mutate & 0x04 != 0 {
        header.set_frag_offset((u16::from(sel) + 1) * 8);
    }
    packet[HEADER_LEN..ip_len].copy_from_slice(ip_options);

    let mut segment = TcpPacket::new_unchecked(&mut packet[ip_len..]);
    segment.set_src_port(src_port);
    segment.set_dst_port(dst_port);
    segment.set_seq_number(TcpSeqNumber(seq.wrapping_add(seq_delta) as i32));
    segment.set_ack_number(TcpSeqNumber(ack.wrapping_add(ack_delta) as i32));
    segment.set_header_len(tcp_len as u8);
    // The flags byte, FIN first.
    let setters = [
        TcpPacket::set_fin,
        TcpPacket::set_syn,
        TcpPacket::set_rst,
        TcpPacket::set_psh,
        TcpPacket::set_ack,
        TcpPacket::set_urg,
        TcpPacket::set_ece,
        TcpPacket::set_cwr,
    ];
    for (bit, set) in setters.iter().enumerate() {
        set(&mut segment, flags >> bit & 1 != 0);
    }
    segment.set_window_len(window);
    segment.set_urgent_at(if mutate & 0x80 != 0 { window } else { 0 });
    let options = input.take(4 * option_words);
    segment.options_mut()[..options.len()].copy_from_slice(options);
    let payload = input.take(payload_len);
    segment.payload_mut()[..payload.len()].copy_from_slice(payload);
    if mutate & 0x10 != 0 {
        segment.set_header_len((sel >> 4) * 4);
    }
    if mutate & 0x20 != 0 {
        packet.extend_from_slice(&[0xff; 4]);
    }
    packet
}
