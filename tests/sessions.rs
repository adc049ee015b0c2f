//! Agent sessions over real loopback sockets and real TLS: who owns a tunnel when links
//! share a ticket or a token, what the relay does with packets an agent has no
//! business sending, and a client that stops reading on a busy tunnel.
//!
//! Several tests drive an agent link by hand ([`RawAgent`]) to present any ticket and
//! token and to see the raw IP packets the relay sends down the link.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::time::Duration;

use portferry::agent::{ForwardOptions, Tunnel};
use portferry::link::FrameWriter;
use portferry::netstack::{Stack, StackConfig, StackStats, AGENT_ADDR, RELAY_ADDR};
use portferry::token::Token;
use portferry::wire::{Frame, MIN_PROTOCOL_VERSION, NEW_AGENT};
use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    IpProtocol, Ipv4Packet, Ipv4Repr, TcpControl, TcpPacket, TcpRepr, TcpSeqNumber, UdpPacket,
    UdpRepr,
};
use tokio::io::WriteHalf;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::{sleep, timeout};
use tokio_rustls::client::TlsStream;

mod common;

use common::{
    drive_link, echo_service, echo_via_url, eventually, exchange, http_service, read_stream,
    stream_service, tls_connect, unencrypted, Fixture, RawAgent, HTTP1,
};

/// Upper bound for any single test step: a hang fails the test instead of the CI job.
const STEP: Duration = Duration::from_secs(20);

/// The inner port the hand-driven agents forward.
const PORT: u16 = 8080;

/// Options that forward to `service`, whatever the tunnel's (inner) port is called.
fn to(service: SocketAddr) -> ForwardOptions {
    ForwardOptions::new().local_addr(service)
}

/// The addresses, ports and flags of an IPv4/TCP packet, as smoltcp reads them.
#[derive(Debug, Clone, Copy)]
struct Segment {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    src_port: u16,
    dst_port: u16,
    syn: bool,
    ack: bool,
    rst: bool,
}

fn segment(packet: &[u8]) -> Segment {
    let ip = Ipv4Packet::new_checked(packet).expect("not an IPv4 packet");
    assert_eq!(ip.next_header(), IpProtocol::Tcp, "not TCP");
    let tcp = TcpPacket::new_checked(ip.payload()).expect("not a TCP segment");
    Segment {
        src: ip.src_addr(),
        dst: ip.dst_addr(),
        src_port: tcp.src_port(),
        dst_port: tcp.dst_port(),
        syn: tcp.syn(),
        ack: tcp.ack(),
        rst: tcp.rst(),
    }
}

/// Waits for the SYN the relay sends when a public connection opens an inner one to
/// `port` (skipping the resets of inner connections given up before); the SYN and what
/// it says.
async fn syn_to(agent: &mut RawAgent, port: u16) -> (bytes::Bytes, Segment) {
    loop {
        let packet = agent.next_packet().await;
        let seen = segment(&packet);
        if seen.rst {
            continue;
        }
        assert!(seen.syn && !seen.ack, "not a SYN: {seen:?}");
        assert_eq!((seen.src, seen.dst), (RELAY_ADDR, AGENT_ADDR), "{seen:?}");
        assert_eq!(seen.dst_port, port, "{seen:?}");
        return (packet, seen);
    }
}

/// What a hand-made segment says: a SYN, a SYN-ACK, or a bare ACK.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flags {
    Syn,
    SynAck,
    Ack,
}

/// An IPv4/TCP packet with no payload and no options, built by smoltcp (checksums left
/// at 0: the inner link does not use them).
fn tcp_packet(src: Ipv4Addr, dst: Ipv4Addr, ports: (u16, u16), flags: Flags) -> Vec<u8> {
    let tcp = TcpRepr {
        src_port: ports.0,
        dst_port: ports.1,
        control: match flags {
            Flags::Syn | Flags::SynAck => TcpControl::Syn,
            Flags::Ack => TcpControl::None,
        },
        seq_number: TcpSeqNumber(1000),
        ack_number: (flags != Flags::Syn).then_some(TcpSeqNumber(1)),
        window_len: u16::MAX,
        window_scale: None,
        max_seg_size: None,
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload: &[],
    };
    let (ip, mut packet) = ipv4(src, dst, IpProtocol::Tcp, tcp.header_len());
    let mut segment = TcpPacket::new_unchecked(&mut packet[ip..]);
    tcp.emit(&mut segment, &src.into(), &dst.into(), &no_checksums());
    packet
}

/// A UDP datagram with no payload.
fn udp_packet(src: Ipv4Addr, dst: Ipv4Addr, ports: (u16, u16)) -> Vec<u8> {
    let udp = UdpRepr {
        src_port: ports.0,
        dst_port: ports.1,
    };
    let (ip, mut packet) = ipv4(src, dst, IpProtocol::Udp, udp.header_len());
    let mut datagram = UdpPacket::new_unchecked(&mut packet[ip..]);
    udp.emit(
        &mut datagram,
        &src.into(),
        &dst.into(),
        0,
        |_| {},
        &no_checksums(),
    );
    packet
}

/// A packet buffer with its IPv4 header emitted for a payload of `len` bytes, and the
/// header's length.
fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, protocol: IpProtocol, len: usize) -> (usize, Vec<u8>) {
    let ip = Ipv4Repr {
        src_addr: src,
        dst_addr: dst,
        next_header: protocol,
        payload_len: len,
        hop_limit: 64,
    };
    let mut packet = vec![0u8; ip.buffer_len() + len];
    ip.emit(&mut Ipv4Packet::new_unchecked(&mut packet), &no_checksums());
    (ip.buffer_len(), packet)
}

fn no_checksums() -> ChecksumCapabilities {
    ChecksumCapabilities::ignored()
}

/// Opens a public TLS connection to `host` in the background, for its SYN: the
/// handshake only completes if an agent answers.
fn public_connection(
    fx: &Fixture,
    host: &str,
) -> JoinHandle<std::io::Result<TlsStream<TcpStream>>> {
    let (connector, public, host) = (fx.connector(HTTP1), fx.public, host.to_owned());
    tokio::spawn(async move {
        timeout(STEP, tls_connect(&connector, public, &host))
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
    })
}

// ───────────────────────────── one agent, two links ─────────────────────────────

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_link_with_the_same_ticket_takes_the_tunnel_over_and_the_first_is_closed() {
    // Takeovers at once (their rate limit is tested in the harness and tests/leases.rs).
    let fx =
        Fixture::start_with(STEP, |config| config.min_takeover_interval = Duration::ZERO).await;
    let mut first = RawAgent::connect(&fx, &fx.token, NEW_AGENT).await;
    let hostname = first.forward(PORT, false).await.hostname;

    // The same agent again (as after a link loss it has not noticed yet): it asks for
    // its tunnel at once, as a reconnecting agent does, and gets the same hostname.
    let mut second = RawAgent::connect(&fx, &fx.token, &first.ticket).await;
    assert_eq!(second.forward(PORT, false).await.hostname, hostname);
    // The relay closes the older link: one session per agent, the newest.
    first.until_closed(Duration::from_secs(5)).await;
    fx.until_stats("one session", |s| s.agent_sessions == 1)
        .await;
    // A close the old link sends late (if it still could) changes nothing.
    first.try_send(&Frame::Close { port: PORT }).await;
    second.sync().await;
    assert_eq!(
        fx.relay.tunnel_count(),
        1,
        "the old session took the new link's tunnel with it"
    );

    // The hostname routes to the newest link only.
    for _ in 0..3 {
        let client = public_connection(&fx, &hostname);
        syn_to(&mut second, PORT).await;
        client.abort();
    }
    let stats = fx.stats();
    assert_eq!((stats.agent_sessions, stats.tunnels), (1, 1));
}

/// Writes SYNs to a port of the relay where nothing listens, never reading the link,
/// until the relay's writes to the link are stuck: the relay answers each SYN with a
/// RST, and once the link's socket buffers are full, the RSTs pile up in its queue and
/// stay there (while it still reads the link). The SYNs go at the pace the relay
/// handles them, so that what is written next is read at once.
async fn stall_the_relays_writes(fx: &Fixture, writer: &mut RawWriter) {
    let syn = bytes::Bytes::from(tcp_packet(AGENT_ADDR, RELAY_ADDR, (40_000, 9), Flags::Syn));
    let handled = |sent: u64, backlog: u64| async move {
        while fx.stats().stacks.refused_syns + backlog < sent {
            tokio::task::yield_now().await;
        }
    };
    let stalled = timeout(STEP, async {
        let mut sent = 0;
        loop {
            for _ in 0..256 {
                writer.push_packet(&syn);
            }
            writer.flush().await.unwrap();
            sent += 256;
            handled(sent, 1024).await;
            if fx.stats().stacks.queued_bytes < 1024 * 1024 {
                continue;
            }
            // A writer that is merely slower than the reader catches up meanwhile.
            handled(sent, 0).await;
            let queued = fx.stats().stacks.queued_bytes;
            sleep(Duration::from_millis(300)).await;
            if fx.stats().stacks.queued_bytes == queued {
                return;
            }
        }
    })
    .await;
    assert!(stalled.is_ok(), "the relay kept writing: {:?}", fx.stats());
}

/// The writing half of a hand-driven link.
type RawWriter = FrameWriter<WriteHalf<TlsStream<TcpStream>>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_link_that_is_slow_to_go_cannot_take_the_tunnels_back_from_the_new_one() {
    let fx = Fixture::start_with(STEP, |config| {
        config.link.idle_timeout = Duration::from_secs(8);
        config.link.ping_interval = Duration::from_secs(1);
        config.min_takeover_interval = Duration::ZERO;
    })
    .await;
    let mut first = RawAgent::connect(&fx, &fx.token, NEW_AGENT).await;
    let ticket = first.ticket.clone();
    // One tunnel the old link will give up too late, one it will simply leave behind.
    let (closed_late, left) = (PORT, PORT + 1);
    let hostnames = [
        first.forward(closed_late, false).await.hostname,
        first.forward(left, false).await.hostname,
    ];
    // The old link stops taking what the relay writes (a network that died in the
    // middle of a transfer, say), so the relay cannot tear that session down before
    // its writes time out.
    let (_first_reader, mut first_writer) = first.into_halves();
    stall_the_relays_writes(&fx, &mut first_writer).await;

    // The agent is back on a new link and takes its tunnels over.
    let mut second = RawAgent::connect(&fx, &fx.token, &ticket).await;
    assert_eq!(
        second.forward(closed_late, false).await.hostname,
        hostnames[0]
    );
    assert_eq!(second.forward(left, false).await.hostname, hostnames[1]);
    assert_eq!(
        fx.stats().agent_sessions,
        2,
        "the old session ended at once: this test needs it to linger"
    );
    // The old link, which the relay still reads, gives a port up: too late, that
    // tunnel is not its own any more.
    first_writer.push(&Frame::Close { port: closed_late });
    first_writer.push(&Frame::Packet(bytes::Bytes::from_static(&[0x45, 0, 0])));
    first_writer.flush().await.unwrap();
    fx.until_stats("the old link's late frames handled", |s| {
        s.stacks.dropped_malformed == 1
    })
    .await;
    second.sync().await;
    assert_eq!(
        fx.relay.tunnel_count(),
        2,
        "the old link closed a new tunnel"
    );
    routes_to(&fx, &hostnames, &mut second).await;

    // The relay gives up on the old link once its writes have made no progress for the
    // idle timeout; that session ending does not end the new one's tunnels either.
    timeout(STEP, async {
        while fx.stats().agent_sessions > 1 {
            second.sync().await;
            sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the relay never dropped the stuck link");
    second.sync().await;
    assert_eq!(
        fx.relay.tunnel_count(),
        2,
        "the old session took a tunnel with it"
    );
    routes_to(&fx, &hostnames, &mut second).await;
}

/// Checks that public connections to `hostnames` (the tunnels of [`PORT`] and the next
/// port) reach `link`.
async fn routes_to(fx: &Fixture, hostnames: &[String; 2], link: &mut RawAgent) {
    for (hostname, port) in hostnames.iter().zip([PORT, PORT + 1]) {
        let client = public_connection(fx, hostname);
        syn_to(link, port).await;
        client.abort();
    }
}

// ───────────────────────────── one token, several agents ─────────────────────────────

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_sharing_a_token_each_keep_their_own_urls_and_neither_kicks_the_other() {
    let fx = Fixture::start(STEP).await;
    let (service_one, service_two) = (http_service("one").await, http_service("two").await);
    let one = fx.agent().await;
    // The same inner port on both agents: tunnels are told apart by agent, not port.
    let tunnel_one = one.forward_with(PORT, to(service_one)).await.unwrap();
    assert_eq!(fx.get(&tunnel_one).await.unwrap(), "one");

    let two = fx.agent().await;
    let tunnel_two = two.forward_with(PORT, to(service_two)).await.unwrap();
    assert_ne!(tunnel_one.url(), tunnel_two.url());
    // Both keep serving, each its own service, for a while after the second came.
    for round in 0..10 {
        assert_eq!(fx.get(&tunnel_one).await.unwrap(), "one", "round {round}");
        assert_eq!(fx.get(&tunnel_two).await.unwrap(), "two", "round {round}");
        assert!(one.is_connected() && two.is_connected(), "round {round}");
        let stats = fx.stats();
        assert_eq!(
            (stats.agent_sessions, stats.tunnels),
            (2, 2),
            "round {round}"
        );
        sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_agents_ticket_with_a_different_token_gets_neither_its_url_nor_its_session() {
    let other_token = Token::generate();
    let fx = Fixture::start_with(STEP, |config| {
        config.tokens.push(other_token.clone());
        config.min_takeover_interval = Duration::ZERO;
    })
    .await;
    let mut owner = RawAgent::connect(&fx, &fx.token, NEW_AGENT).await;
    let owned = owner.forward(PORT, false).await.hostname;

    // Someone else with a valid token of their own presents the owner's ticket.
    let mut claimant = RawAgent::connect(&fx, &other_token, &owner.ticket).await;
    let claimed = claimant.forward(PORT, false).await.hostname;
    assert_ne!(claimed, owned, "a lease was handed over to another token");

    // The owner's link stays open and its hostname still routes to it alone.
    owner.sync().await;
    let stats = fx.stats();
    assert_eq!((stats.agent_sessions, stats.tunnels), (2, 2));
    // Each hostname routes to its own link, and only there.
    routes_only_to(&fx, &owned, &mut owner, &mut claimant).await;
    routes_only_to(&fx, &claimed, &mut claimant, &mut owner).await;
}

/// Checks that a public connection to `hostname` reaches `link` with a SYN, and that
/// no SYN reaches `other`.
async fn routes_only_to(fx: &Fixture, hostname: &str, link: &mut RawAgent, other: &mut RawAgent) {
    let client = public_connection(fx, hostname);
    syn_to(link, PORT).await;
    client.abort();
    assert_eq!(syns(&other.sync().await), 0, "a SYN on the wrong link");
}

/// How many of `frames` are packets opening a connection. (A link may also see the
/// resets of connections given up before.)
fn syns(frames: &[Frame]) -> usize {
    frames
        .iter()
        .filter(|frame| matches!(frame, Frame::Packet(packet) if segment(packet).syn))
        .count()
}

// ───────────────────────────── packets an agent should not send ─────────────────────────────

/// The relay-side stack counters that change when packets are dropped.
fn drops(stats: &StackStats) -> (u64, u64, u64) {
    (
        stats.dropped_wrong_address,
        stats.dropped_unknown_flow,
        stats.dropped_malformed,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packets_outside_the_agents_own_flows_are_dropped_and_counted_and_disturb_nothing() {
    let fx = Fixture::start(STEP).await;
    // A well-behaved agent on the same relay, whose tunnel must keep serving.
    let agent = fx.agent().await;
    let echo = echo_service().await;
    let good = agent.forward(echo.port()).await.unwrap();
    let tls = fx.connector(HTTP1);
    assert_eq!(echo_via_url(&tls, &good, b"a", STEP).await.unwrap(), b"a");

    // An agent from before connection frames (version 1): its inner connections carry
    // only the client's bytes, which the plain echo below sends back.
    let mut raw = RawAgent::connect_speaking(&fx, &fx.token, NEW_AGENT, MIN_PROTOCOL_VERSION).await;
    let hostname = raw.forward(PORT, false).await.hostname;
    let client = {
        let (connector, public) = (tls.clone(), fx.public);
        tokio::spawn(async move {
            let stream = timeout(STEP, tls_connect(&connector, public, &hostname))
                .await
                .expect("TLS through the hand-driven agent hung")?;
            exchange(STEP, stream, b"through the raw link").await
        })
    };
    let (syn, flow) = syn_to(&mut raw, PORT).await;
    fx.until_stats("only the new inner connection open", |s| {
        s.stacks.flows == 1
    })
    .await;
    let before = fx.stats().stacks;

    // The flow's own ports, the way back.
    let back = (flow.dst_port, flow.src_port);
    let spoofed = Ipv4Addr::new(10, 0, 0, 1);
    let elsewhere = Ipv4Addr::new(100, 64, 0, 9);
    // A SYN-ACK for the flow from an address that is not the agent's.
    raw.send_packet(&tcp_packet(spoofed, RELAY_ADDR, back, Flags::SynAck))
        .await;
    // The right addresses, but no such connection.
    raw.send_packet(&tcp_packet(
        AGENT_ADDR,
        RELAY_ADDR,
        (PORT + 1, back.1),
        Flags::Ack,
    ))
    .await;
    // The flow's ports, to an address that is not the relay's.
    raw.send_packet(&tcp_packet(AGENT_ADDR, elsewhere, back, Flags::SynAck))
        .await;
    // Not an IP packet at all.
    raw.send_packet(&[0x45, 0x00, 0x00]).await;
    // UDP, with the right addresses.
    raw.send_packet(&udp_packet(AGENT_ADDR, RELAY_ADDR, back))
        .await;
    // Once the pong is back, the relay has handled every one of them.
    raw.sync().await;

    let after = fx.stats().stacks;
    let (wrong, unknown, malformed) = drops(&before);
    assert_eq!(drops(&after), (wrong + 2, unknown + 1, malformed + 2));
    assert_eq!((after.flows, after.refused_syns), (1, before.refused_syns));
    assert_eq!(fx.stats().agent_sessions, 2);
    assert_eq!(echo_via_url(&tls, &good, b"b", STEP).await.unwrap(), b"b");

    // The hand-driven agent now answers the SYN properly, with a stack of its own
    // serving an echo service: the flow the garbage was aimed at works end to end.
    let stack = Stack::new(StackConfig::agent());
    let listener = stack.listen(PORT).unwrap();
    tokio::spawn(portferry::splice::forward_to(listener, echo, STEP));
    let _ = stack.ingress(syn);
    let (reader, writer) = raw.into_halves();
    let _link = drive_link(reader, writer, stack.clone());
    let echoed = timeout(STEP, client).await.unwrap().unwrap().unwrap();
    assert_eq!(echoed, b"through the raw link");
    // (Stray packets at the end of a connection may count as unknown; nothing else.)
    let end = fx.stats().stacks;
    assert_eq!(
        (end.dropped_wrong_address, end.dropped_malformed),
        (after.dropped_wrong_address, after.dropped_malformed)
    );
    assert_eq!(echo_via_url(&tls, &good, b"c", STEP).await.unwrap(), b"c");
}

// ───────────────────────────── a client that stops reading ─────────────────────────────

/// Bytes each connection of the streaming service carries: far more than any buffer
/// on the way.
const STREAM_LEN: u64 = 256 * 1024 * 1024;
/// Bytes the client that keeps reading reads.
const READ_LEN: usize = 64 * 1024 * 1024;
/// Bytes the stalled clients check once they read again.
const RESUMED_LEN: usize = 16 * 1024 * 1024;
/// Generous: this is about progress, not speed.
const LIVENESS: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_does_not_hold_up_the_others_on_its_tunnel() {
    let fx = Fixture::start(STEP).await;
    let agent = fx.agent().await;
    let service = stream_service(STREAM_LEN).await;
    let tunnel = agent
        .forward_with(service.addr.port(), unencrypted())
        .await
        .unwrap();
    let (_, tcp_port) = tunnel.tcp_socket().unwrap();

    // Two clients that read nothing: one over raw TCP, one over TLS.
    let mut stalled_raw = TcpStream::connect(("127.0.0.1", tcp_port)).await.unwrap();
    let mut stalled_tls = tls_to(&fx, &tunnel).await;
    eventually(STEP, "both stalled clients reach the service", || async {
        service.accepted() == 2
    })
    .await;

    // A third client on the same tunnel reads 64 MiB, every byte checked.
    let mut reader = tls_to(&fx, &tunnel).await;
    let read = timeout(LIVENESS, read_stream(&mut reader, READ_LEN)).await;
    assert!(
        read.is_ok(),
        "64 MiB took over {LIVENESS:?} beside stalled clients"
    );
    read.unwrap().unwrap();
    drop(reader);

    // The stalled connections hold back only what the buffers on the way take: the
    // service was made to wait rather than the relay or agent buffering all of it.
    for index in 0..2 {
        let written = service.connection(index).written.load(Ordering::Relaxed);
        assert!(
            written < STREAM_LEN / 4,
            "{written} bytes went out to a client that reads nothing"
        );
    }
    // They read again: nothing was lost or reordered meanwhile.
    timeout(LIVENESS, read_stream(&mut stalled_raw, RESUMED_LEN))
        .await
        .expect("the raw TCP client could not catch up")
        .unwrap();
    timeout(LIVENESS, read_stream(&mut stalled_tls, RESUMED_LEN))
        .await
        .expect("the TLS client could not catch up")
        .unwrap();
    drop((stalled_raw, stalled_tls));

    // The agent's link is healthy: a new tunnel works at once.
    let echo = agent.forward(echo_service().await.port()).await.unwrap();
    let echoed = echo_via_url(&fx.connector(HTTP1), &echo, b"after", STEP).await;
    assert_eq!(echoed.unwrap(), b"after");
    assert!(agent.is_connected());
    fx.until_stats("every inner connection ended", |s| s.stacks.flows == 0)
        .await;
}

/// TLS to a tunnel's URL within [`STEP`].
async fn tls_to(fx: &Fixture, tunnel: &Tunnel) -> TlsStream<TcpStream> {
    fx.tls_to(tunnel).await.unwrap()
}
