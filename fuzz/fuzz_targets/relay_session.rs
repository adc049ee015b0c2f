//! Plays a hostile agent against a relay session: hellos, forwards, closes, errors,
//! pings, pongs and packets with arbitrary fields, in arbitrary order, with raw bytes
//! in between and arbitrary chunking, on a link served by
//! `RelayHandle::serve_agent_stream`.
//!
//! One relay, built once on tokio's paused clock (so deadlines and heartbeats cost no
//! real time), serves one in-memory link per input. The input is a script:
//!
//! ```text
//! input  := mode:u8 chunk_seed:u8 hello? op*
//! mode   := bit 0: no hello, the ops open the link
//!           bit 1: the hello's token comes from the input (else the relay's token)
//!           bit 2: its version comes from the input (else PROTOCOL_VERSION)
//!           bit 3: it presents a 16-byte identity, so its tunnels are leased
//!           bit 4: with bit 3 clear, it presents a resume ticket of the input's length
//! hello  := (token_len:u8 token[token_len])? version:u16le? identity[16]? (len:u8 resume[len])?
//! op     := tag:u8 body, where tag & 7 picks the op and m = tag >> 3 modifies it:
//!   0 forward  request_id:u32le port:u16le; m bit 0: unencrypted, bit 1: h2,
//!              bit 2: an undefined flag too (a malformed frame)
//!   1 close    port:u16le
//!   2 ping     nonce:u64le
//!   3 pong     nonce:u64le
//!   4 packet   m bit 0 clear: len:u16le bytes[len], zero-padded (len 0: an empty,
//!              malformed packet frame); set: a TCP segment from the agent's address to
//!              the relay's, src_port:u16le dst_port:u16le tcp_flags:u8
//!   5 a frame the relay must not take from a live agent: m % 4 picks a hello (with
//!              the right token), a welcome, a forwarded or an error; a:u32le b:u16le
//!              fill its fields
//!   6 raw      len:u8 bytes[len]
//!   7 wait     m × 250 ms, the writes so far being delivered
//! ```
//!
//! The relay parses the link with the same codec, so this target knows which frames it
//! sees: the hello, then every frame up to the first malformed one. Checked per input:
//! - every frame the relay sends parses (a cut-off last frame is allowed, when the
//!   relay drops the link mid-write);
//! - the hello is answered by exactly a welcome, or by exactly one error with the right
//!   code (`PROTOCOL`, `BAD_VERSION`, `UNAUTHORIZED`) and the link closed; the
//!   handshake counters move accordingly;
//! - in order, each control frame gets one answer and no more: a forward gets
//!   `Forwarded` (fresh hostname under the relay's domain, the public TLS port, a raw
//!   TCP port from the range if and only if unencrypted) or the error a model of the
//!   session predicts (`INVALID_REQUEST`, `PORT_IN_USE`, `LIMIT_REACHED` at
//!   [`MAX_TUNNELS`], or `LIMIT_REACHED` when no raw TCP port is free), with its
//!   request id; a close is echoed; anything else gets a `PROTOCOL` error. Pongs echo
//!   the agent's pings in order (some may be dropped), the relay's own pings count up
//!   one per heartbeat, and the relay sends at most one packet (from its own address)
//!   per packet;
//! - when the link is well-formed and no deadline can pass, every answer arrives before
//!   the agent closes, and `refused_by_limit` grew by the `LIMIT_REACHED` answers;
//! - once the agent closes, the session ends, leaving no session, handshake or public
//!   connection; an identity-less session leaves no tunnel at once (so no hostname it
//!   got is routed), a leased one exactly its open tunnels, and those are gone after
//!   the lease grace period.

#![no_main]

mod shared;

use std::collections::{HashMap, HashSet};
use std::ops::RangeInclusive;
use std::sync::OnceLock;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use portferry::link::{FrameReader, LinkError};
use portferry::netstack::{AGENT_ADDR, RELAY_ADDR};
use portferry::relay::{Relay, RelayConfig, RelayHandle, RelayStats, LOCAL_DOMAIN, MAX_HELLO_LEN};
use portferry::token::Token;
use portferry::wire::{
    ErrorCode, ErrorFrame, ForwardRequest, Forwarded, Frame, FrameKind, Hello, Welcome, HEADER_LEN,
    PROTOCOL_VERSION,
};
use shared::{ChunkSizes, Input};
use tokio::io::{AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf};
use tokio::runtime::Runtime;
use tokio::sync::watch;
use tokio::time::{timeout, Instant};

/// The token the relay accepts.
const TOKEN: &str = "relay-session-fuzz-token";
/// Tunnels one session may have open, small so that inputs reach the limit.
const MAX_TUNNELS: usize = 4;
/// Raw TCP ports of the relay: fewer than [`MAX_TUNNELS`], so that they run out too.
const TCP_PORTS: RangeInclusive<u16> = 31_990..=31_992;
/// The relay's deadline for a hello.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The relay's heartbeat on a link.
const PING_INTERVAL: Duration = Duration::from_secs(5);
/// How long the relay waits for a frame before it drops a link.
const IDLE_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the tunnels of an agent with an identity outlive its link.
const LEASE_GRACE: Duration = Duration::from_secs(30);
/// Unit of the wait op.
const WAIT_UNIT: Duration = Duration::from_millis(250);
/// How long the agent waits for the answers it is owed. The relay takes no (paused)
/// time to answer, so this only bounds a hang, and stays below every deadline.
const ANSWER_WAIT: Duration = Duration::from_secs(1);
/// Bound of every other wait, in paused time: above every deadline of the relay.
const SETTLE: Duration = Duration::from_secs(120);
/// Capacity of the in-memory link in each direction.
const PIPE: usize = 64 * 1024;
/// Bytes one input may write to the link.
const MAX_SCRIPT_BYTES: usize = 256 * 1024;

fuzz_target!(|data: &[u8]| {
    let Some(script) = Script::decode(data) else {
        return;
    };
    let fixture = fixture();
    fixture.runtime.block_on(play(fixture, &script));
});

/// The relay every input talks to, and the runtime it runs on.
struct Fixture {
    runtime: Runtime,
    relay: RelayHandle,
    public_tls_port: u16,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("tokio runtime");
        let state = std::env::temp_dir().join(format!(
            "portferry-fuzz-relay-session-{}",
            std::process::id()
        ));
        let pki = portferry::tls::local_pki(&state, LOCAL_DOMAIN).expect("local PKI");
        let _ = std::fs::remove_dir_all(&state);
        let mut config = RelayConfig::local(pki.identity, vec![Token::new(TOKEN)], 0, 0);
        config.tcp_ports = TCP_PORTS;
        config.handshake_timeout = HANDSHAKE_TIMEOUT;
        config.max_tunnels_per_agent = MAX_TUNNELS;
        // One link at a time: a session or handshake left over would refuse the next.
        config.max_pending_handshakes = 1;
        config.max_agent_sessions = 1;
        config.lease_grace = LEASE_GRACE;
        config.link.ping_interval = PING_INTERVAL;
        config.link.idle_timeout = IDLE_TIMEOUT;
        let relay = runtime.block_on(Relay::bind(config)).expect("Relay::bind");
        let public_tls_port = relay.public_tls_addr().port();
        let handle = relay.handle();
        runtime.spawn(relay.run());
        Fixture {
            runtime,
            relay: handle,
            public_tls_port,
        }
    })
}

/// What the agent writes: bytes, with waits after some of them.
struct Script {
    chunk_seed: u8,
    bytes: BytesMut,
    /// (offset, wait): once `bytes[..offset]` is written, the agent waits that long.
    waits: Vec<(usize, Duration)>,
}

impl Script {
    fn decode(data: &[u8]) -> Option<Script> {
        let mut input = Input(data);
        let mode = input.byte()?;
        let chunk_seed = input.byte()?;
        let mut bytes = BytesMut::new();
        if mode & 1 == 0 {
            let token = if mode & 2 != 0 {
                let len = input.byte().unwrap_or(0);
                String::from_utf8_lossy(input.take(len.into())).into_owned()
            } else {
                TOKEN.to_string()
            };
            let version = if mode & 4 != 0 {
                input.u16()
            } else {
                PROTOCOL_VERSION
            };
            let resume = if mode & 8 != 0 {
                Bytes::copy_from_slice(&input.array::<16>())
            } else if mode & 16 != 0 {
                let len = input.byte().unwrap_or(0);
                Bytes::copy_from_slice(input.take(len.into()))
            } else {
                Bytes::new()
            };
            let hello = Hello {
                version,
                token,
                resume,
            };
            Frame::Hello(hello).encode(&mut bytes);
        }
        let mut waits = Vec::new();
        while let Some(tag) = input.byte() {
            let m = tag >> 3;
            match tag & 7 {
                0 => {
                    let request = ForwardRequest {
                        request_id: input.u32(),
                        port: input.u16(),
                        unencrypted: m & 1 != 0,
                        h2: m & 2 != 0,
                    };
                    Frame::Forward(request).encode(&mut bytes);
                    if m & 4 != 0 {
                        // The flags byte ends the frame.
                        *bytes.last_mut().expect("a frame was encoded") |= 0x80;
                    }
                }
                1 => Frame::Close { port: input.u16() }.encode(&mut bytes),
                2 => Frame::Ping(input.u64()).encode(&mut bytes),
                3 => Frame::Pong(input.u64()).encode(&mut bytes),
                4 if m & 1 != 0 => {
                    let segment = tcp_segment(input.u16(), input.u16(), input.byte().unwrap_or(0));
                    Frame::Packet(segment.into()).encode(&mut bytes);
                }
                4 => {
                    let len = usize::from(input.u16());
                    let mut packet = input.take(len).to_vec();
                    packet.resize(len, 0);
                    if packet.is_empty() {
                        bytes.extend_from_slice(&[FrameKind::Packet.into(), 0, 0, 0, 0]);
                    } else {
                        Frame::Packet(packet.into()).encode(&mut bytes);
                    }
                }
                5 => unexpected(m, input.u32(), input.u16()).encode(&mut bytes),
                6 => {
                    let len = input.byte().unwrap_or(0);
                    bytes.extend_from_slice(input.take(len.into()));
                }
                _ => waits.push((bytes.len(), WAIT_UNIT * u32::from(m))),
            }
            if bytes.len() > MAX_SCRIPT_BYTES {
                break;
            }
        }
        Some(Script {
            chunk_seed,
            bytes,
            waits,
        })
    }

    /// Time the agent spends waiting while it writes.
    fn waited(&self) -> Duration {
        self.waits.iter().map(|(_, wait)| *wait).sum()
    }
}

/// A control frame only the relay, or an agent's first frame, may send.
fn unexpected(which: u8, a: u32, b: u16) -> Frame {
    match which % 4 {
        0 => Frame::Hello(Hello {
            version: b,
            token: TOKEN.into(),
            resume: Bytes::copy_from_slice(&a.to_le_bytes()),
        }),
        1 => Frame::Welcome(Welcome {
            version: b,
            ticket: Bytes::copy_from_slice(&a.to_le_bytes()),
        }),
        2 => Frame::Forwarded(Forwarded {
            request_id: a,
            port: b,
            hostname: format!("x{a}.{LOCAL_DOMAIN}"),
            tls_port: b,
            tcp_port: Some(b).filter(|&port| port != 0),
        }),
        _ => Frame::Error(ErrorFrame {
            request_id: a,
            code: ErrorCode(b),
            message: "agent-side error".into(),
        }),
    }
}

/// An IPv4/TCP segment without payload from the agent's inner address to the relay's.
fn tcp_segment(src_port: u16, dst_port: u16, flags: u8) -> Vec<u8> {
    let mut packet = vec![0x45, 0, 0, 40, 0, 1, 0x40, 0, 64, 6, 0, 0];
    packet.extend_from_slice(&AGENT_ADDR.octets());
    packet.extend_from_slice(&RELAY_ADDR.octets());
    packet.extend_from_slice(&src_port.to_be_bytes());
    packet.extend_from_slice(&dst_port.to_be_bytes());
    packet.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0x10, 0, 0, 0, 0, 0]);
    packet
}

/// What the relay must make of a script's bytes.
struct Expected {
    /// The answer to the hello: a welcome (and whether the session is leased), or an
    /// error with this code, after which the link closes.
    hello: Result<bool, ErrorCode>,
    /// The frames after the hello, up to the first malformed one.
    frames: Vec<Frame>,
    /// Whether the bytes after the hello are whole, well-formed frames.
    well_formed: bool,
}

impl Expected {
    /// Parses `bytes` as the relay does.
    fn from(bytes: &[u8]) -> Expected {
        let mut buf = BytesMut::from(bytes);
        let hello = match Frame::parse(&mut buf) {
            Ok(Some(Frame::Hello(hello)))
                if bytes.len() - buf.len() <= HEADER_LEN + MAX_HELLO_LEN =>
            {
                hello
            }
            _ => {
                return Expected {
                    hello: Err(ErrorCode::PROTOCOL),
                    frames: Vec::new(),
                    well_formed: false,
                }
            }
        };
        let hello = if hello.version != PROTOCOL_VERSION {
            Err(ErrorCode::BAD_VERSION)
        } else if hello.token != TOKEN {
            Err(ErrorCode::UNAUTHORIZED)
        } else {
            Ok(hello.resume.len() == 16)
        };
        let mut frames = Vec::new();
        let well_formed = loop {
            match Frame::parse(&mut buf) {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break buf.is_empty(),
                Err(_) => break false,
            }
        };
        Expected {
            hello,
            frames,
            well_formed,
        }
    }

    /// The control frames the session answers one by one.
    fn requests(&self) -> impl Iterator<Item = &Frame> {
        self.frames.iter().filter(|frame| is_control(frame))
    }
}

/// Whether the session answers `frame` (the link itself handles pings, pongs and
/// packets).
fn is_control(frame: &Frame) -> bool {
    !matches!(frame, Frame::Ping(_) | Frame::Pong(_) | Frame::Packet(_))
}

/// Plays one script against the relay; panics if an invariant breaks.
async fn play(fixture: &Fixture, script: &Script) {
    let relay = &fixture.relay;
    let before = relay.stats();
    assert!(idle(&before), "the relay is not idle: {before:?}");
    let expected = Expected::from(&script.bytes);
    // No deadline of the relay can pass before the agent closes the link.
    let timely = script.waited() + ANSWER_WAIT < HANDSHAKE_TIMEOUT.min(IDLE_TIMEOUT);
    // Then a well-formed link stays up until every request is answered.
    let owed = (timely && expected.hello.is_ok() && expected.well_formed)
        .then(|| 1 + expected.requests().count());

    let (agent, relay_end) = tokio::io::duplex(PIPE);
    let session = tokio::spawn(relay.serve_agent_stream(relay_end));
    let (read_half, write_half) = tokio::io::split(agent);
    let (answered_tx, answered) = watch::channel(0);
    // Each request is at least a header and gets at most one frame back; and heartbeats.
    let max_frames = 1
        + script.bytes.len() / HEADER_LEN
        + 2
        + ((script.waited() + SETTLE).as_secs() / PING_INTERVAL.as_secs()) as usize;
    let start = Instant::now();
    let link = async {
        tokio::join!(
            write(script, write_half, answered, owed),
            read(read_half, answered_tx, max_frames)
        )
    };
    let ((), replies) = timeout(script.waited() + SETTLE, link)
        .await
        .expect("the link never closed");
    let elapsed = start.elapsed();
    timeout(SETTLE, session)
        .await
        .expect("the session outlived its link")
        .expect("the session panicked");

    let answers = check_replies(
        fixture,
        &expected,
        &replies,
        timely,
        owed.is_some(),
        elapsed,
    );
    let after = relay.stats();
    check_counters(&expected, &before, &after, timely, owed.is_some(), &answers);
    assert_eq!(
        (
            after.agent_sessions,
            after.public_connections,
            after.pending_handshakes
        ),
        (0, 0, 0),
        "the session left something behind: {after:?}"
    );
    match (expected.hello, answers.open) {
        (Ok(true), Some(open)) => assert_eq!(after.tunnels, open, "leased tunnels: {after:?}"),
        (Ok(true), None) => assert!(after.tunnels <= MAX_TUNNELS, "leased tunnels: {after:?}"),
        _ => assert_eq!(
            after.tunnels, 0,
            "tunnels outlived their session: {after:?}"
        ),
    }
    // Leases end after their grace period.
    let drained = timeout(LEASE_GRACE + SETTLE, async {
        while !idle(&relay.stats()) {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
    .await;
    assert!(
        drained.is_ok(),
        "the relay never settled: {:?}",
        relay.stats()
    );
}

/// Whether nothing is open at the relay: no session, tunnel (so no hostname is routed),
/// public connection or handshake.
fn idle(stats: &RelayStats) -> bool {
    let open = (
        stats.agent_sessions,
        stats.tunnels,
        stats.public_connections,
        stats.pending_handshakes,
    );
    open == (0, 0, 0, 0)
}

/// Writes the script in chunks, with its waits; then, if `owed` answers are due, waits
/// for them; then closes the link.
async fn write(
    script: &Script,
    mut link: WriteHalf<DuplexStream>,
    mut answered: watch::Receiver<usize>,
    owed: Option<usize>,
) {
    let mut chunks = ChunkSizes::new(script.chunk_seed.into(), PIPE);
    let mut written = 0;
    let ends = script
        .waits
        .iter()
        .copied()
        .chain([(script.bytes.len(), Duration::ZERO)]);
    'script: for (end, wait) in ends {
        while written < end {
            let chunk = chunks.next().min(end - written);
            if link
                .write_all(&script.bytes[written..written + chunk])
                .await
                .is_err()
            {
                // The relay closed the link.
                break 'script;
            }
            written += chunk;
            // Let the relay read a partial frame.
            tokio::task::yield_now().await;
        }
        tokio::time::sleep(wait).await;
    }
    if let Some(owed) = owed {
        let all = timeout(ANSWER_WAIT, answered.wait_for(|&n| n >= owed))
            .await
            .is_ok_and(|arrived| arrived.is_ok());
        assert!(all, "{} of {owed} answers arrived", *answered.borrow());
    }
    let _ = link.shutdown().await;
}

/// Reads what the relay sends until it closes the link; counts control frames in
/// `answered`. Panics on a malformed frame, or on more than `max_frames` frames.
async fn read(
    link: ReadHalf<DuplexStream>,
    answered: watch::Sender<usize>,
    max_frames: usize,
) -> Vec<Frame> {
    let mut reader = FrameReader::new(link);
    let mut frames = Vec::new();
    loop {
        match reader.read_frame().await {
            Ok(Some(frame)) => {
                if is_control(&frame) {
                    answered.send_modify(|n| *n += 1);
                }
                frames.push(frame);
                assert!(frames.len() <= max_frames, "the relay floods the link");
            }
            Ok(None) => return frames,
            // The relay dropped the link in the middle of a write.
            Err(LinkError::Truncated) => return frames,
            Err(error) => panic!("the relay sent something unreadable: {error}"),
        }
    }
}

/// What the answers showed.
struct Answers {
    /// `LIMIT_REACHED` answers to forwards.
    limit_refusals: u64,
    /// Tunnels open when the link closed, if every answer arrived.
    open: Option<usize>,
}

/// Checks the relay's frames against what the script asked for; see the crate docs.
fn check_replies(
    fixture: &Fixture,
    expected: &Expected,
    replies: &[Frame],
    timely: bool,
    complete: bool,
    elapsed: Duration,
) -> Answers {
    let mut replies = replies.iter();
    let first = replies.next();
    match (expected.hello, first) {
        (Ok(_), Some(Frame::Welcome(welcome))) => {
            assert_eq!(welcome.version, PROTOCOL_VERSION, "welcome {welcome:?}");
        }
        (Err(code), Some(Frame::Error(error))) => {
            assert_eq!(
                (error.request_id, error.code),
                (0, code),
                "refusal {error:?}"
            );
            let rest: Vec<_> = replies.by_ref().collect();
            assert!(rest.is_empty(), "frames after a refusal: {rest:?}");
        }
        // A slow hello times out without an answer.
        (_, None) if !timely => {}
        (hello, first) => panic!("hello answered with {first:?}, expected {hello:?}"),
    }
    let mut session = SessionModel::default();
    let mut requests = expected.requests();
    let mut pings = expected.frames.iter().filter_map(|frame| match frame {
        Frame::Ping(nonce) => Some(*nonce),
        _ => None,
    });
    let packets_in = expected
        .frames
        .iter()
        .filter(|f| matches!(f, Frame::Packet(_)))
        .count();
    let (mut heartbeats, mut packets_out) = (0, 0);
    for reply in replies {
        match reply {
            Frame::Ping(nonce) => {
                heartbeats += 1;
                assert_eq!(*nonce, heartbeats, "heartbeat nonces count up from 1");
            }
            Frame::Pong(nonce) => assert!(
                pings.any(|ping| ping == *nonce),
                "pong {nonce} echoes no ping, in order"
            ),
            Frame::Packet(packet) => {
                packets_out += 1;
                assert!(
                    packet.get(12..16) == Some(&RELAY_ADDR.octets()[..])
                        && packet.get(16..20) == Some(&AGENT_ADDR.octets()[..]),
                    "a packet not from the relay's inner address to the agent's: {packet:?}"
                );
            }
            answer => {
                let request = requests
                    .next()
                    .unwrap_or_else(|| panic!("unasked answer {answer:?}"));
                session.answer(fixture, request, answer);
            }
        }
    }
    let periods = elapsed.as_secs_f64() / PING_INTERVAL.as_secs_f64();
    assert!(
        heartbeats as f64 <= 1.0 + periods,
        "{heartbeats} heartbeats in {elapsed:?}"
    );
    assert!(
        packets_out <= packets_in,
        "{packets_out} packets answered {packets_in}"
    );
    if complete {
        assert!(requests.next().is_none(), "unanswered requests");
    }
    Answers {
        limit_refusals: session.limit_refusals,
        open: complete.then_some(session.open.len()),
    }
}

/// Checks how the relay's counters moved for one link.
fn check_counters(
    expected: &Expected,
    before: &RelayStats,
    after: &RelayStats,
    timely: bool,
    complete: bool,
    answers: &Answers,
) {
    let failed = after.failed_handshakes - before.failed_handshakes;
    let unauthorized = after.unauthorized - before.unauthorized;
    let refused = after.refused_by_limit - before.refused_by_limit;
    if timely {
        let expected_counts = match expected.hello {
            Ok(_) => (0, 0),
            Err(ErrorCode::UNAUTHORIZED) => (0, 1),
            Err(_) => (1, 0),
        };
        assert_eq!(
            (failed, unauthorized),
            expected_counts,
            "handshake counters"
        );
    } else {
        assert!(
            failed + unauthorized <= 1,
            "handshake counters: {failed}, {unauthorized}"
        );
    }
    if complete {
        assert_eq!(refused, answers.limit_refusals, "refused_by_limit");
    } else {
        assert!(refused >= answers.limit_refusals, "refused_by_limit");
    }
}

/// What the answers so far say a session holds.
#[derive(Default)]
struct SessionModel {
    /// Open tunnels by port.
    open: HashMap<u16, Forwarded>,
    /// Every hostname the session was given.
    hostnames: HashSet<String>,
    limit_refusals: u64,
}

impl SessionModel {
    /// Checks `answer` to `request` and updates the model.
    fn answer(&mut self, fixture: &Fixture, request: &Frame, answer: &Frame) {
        match request {
            Frame::Forward(forward) => self.forward(fixture, forward, answer),
            Frame::Close { port } => {
                assert_eq!(answer, &Frame::Close { port: *port }, "answer to a close");
                self.open.remove(port);
            }
            other => assert!(
                matches!(
                    answer,
                    Frame::Error(ErrorFrame {
                        request_id: 0,
                        code: ErrorCode::PROTOCOL,
                        ..
                    })
                ),
                "{other:?} answered with {answer:?}"
            ),
        }
    }

    fn forward(&mut self, fixture: &Fixture, request: &ForwardRequest, answer: &Frame) {
        let refusal = if request.port == 0 || (request.h2 && request.unencrypted) {
            Some(ErrorCode::INVALID_REQUEST)
        } else if self.open.contains_key(&request.port) {
            Some(ErrorCode::PORT_IN_USE)
        } else if self.open.len() >= MAX_TUNNELS {
            Some(ErrorCode::LIMIT_REACHED)
        } else {
            None
        };
        match (refusal, answer) {
            (Some(code), Frame::Error(error))
                if (error.request_id, error.code) == (request.request_id, code) => {}
            (None, Frame::Forwarded(forwarded)) => self.opened(fixture, request, forwarded),
            // No free raw TCP port: the range is tiny, and shared with other processes.
            (None, Frame::Error(error))
                if request.unencrypted
                    && (error.request_id, error.code)
                        == (request.request_id, ErrorCode::LIMIT_REACHED) => {}
            _ => panic!("{request:?} answered with {answer:?}, expected refusal {refusal:?}"),
        }
        if matches!(
            answer,
            Frame::Error(ErrorFrame {
                code: ErrorCode::LIMIT_REACHED,
                ..
            })
        ) {
            self.limit_refusals += 1;
        }
    }

    /// Checks the tunnel the relay opened for `request`.
    fn opened(&mut self, fixture: &Fixture, request: &ForwardRequest, forwarded: &Forwarded) {
        assert_eq!(
            (forwarded.request_id, forwarded.port, forwarded.tls_port),
            (request.request_id, request.port, fixture.public_tls_port),
            "{forwarded:?} for {request:?}"
        );
        let label = forwarded
            .hostname
            .strip_suffix(&format!(".{LOCAL_DOMAIN}"))
            .unwrap_or_else(|| panic!("hostname outside the domain: {forwarded:?}"));
        assert!(
            label.len() == 26 && !label.contains('.'),
            "hostname label: {forwarded:?}"
        );
        assert!(
            self.hostnames.insert(forwarded.hostname.clone()),
            "hostname given twice: {forwarded:?}"
        );
        match forwarded.tcp_port {
            Some(port) => {
                assert!(
                    request.unencrypted && TCP_PORTS.contains(&port),
                    "{forwarded:?} for {request:?}"
                );
                assert!(
                    self.open.values().all(|open| open.tcp_port != Some(port)),
                    "raw TCP port given twice: {forwarded:?}"
                );
            }
            None => assert!(!request.unencrypted, "{forwarded:?} for {request:?}"),
        }
        self.open.insert(request.port, forwarded.clone());
    }
}
