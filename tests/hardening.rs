//! The relay under hostile and careless peers, over real loopback sockets and real
//! TLS: slow and silent handshakes, garbage, bad tokens, unknown names, limits,
//! connection churn, agent packets and shutdown.

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use portferry::agent::{Agent, ForwardOptions, Tunnel};
use portferry::link::{FrameReader, FrameWriter};
use portferry::netstack::{ConnectError, Stack, StackConfig};
use portferry::relay::{RelayConfig, LOCAL_DOMAIN};
use portferry::token::Token;
use portferry::wire::{ErrorCode, Frame, Hello, PROTOCOL_VERSION};
use portferry::{Error, Limit};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::{sleep, timeout, Instant, Sleep};
use tokio_rustls::client::TlsStream;

mod common;

use common::{
    drive_link, echo_service, free_port, http_get, http_service, portferry, read_stream,
    stream_service, unencrypted, Child, Fixture, TempDir, HTTP1,
};

/// Upper bound for any single test step: a hang fails the test instead of the CI job.
const STEP: Duration = Duration::from_secs(30);

/// Writes `message` and reads its echo.
async fn echo_once<S: AsyncRead + AsyncWrite + Unpin + ?Sized>(stream: &mut S, message: &[u8]) {
    timeout(STEP, async {
        stream.write_all(message).await.unwrap();
        let mut echoed = vec![0u8; message.len()];
        stream.read_exact(&mut echoed).await.unwrap();
        assert_eq!(echoed, message);
    })
    .await
    .expect("echo timed out");
}

/// Reads until the peer closes (or resets) the connection; the bytes read.
async fn until_closed<S: AsyncRead + Unpin + ?Sized>(stream: &mut S) -> Vec<u8> {
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    timeout(STEP, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .expect("the relay did not close the connection");
    received
}

fn raw_addr(tunnel: &Tunnel) -> SocketAddr {
    let (_, port) = tunnel.tcp_socket().unwrap();
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)
}

/// Options that forward to `service`, whatever the tunnel's (inner) port is called.
fn to(service: SocketAddr) -> ForwardOptions {
    ForwardOptions::new().local_addr(service)
}

/// A stream that writes one byte at a time with a pause before each, until `fast`.
struct Dribble {
    io: TcpStream,
    pause: Pin<Box<Sleep>>,
    fast: bool,
    dribbled: usize,
}

/// Pause before each dribbled byte.
const BYTE_PAUSE: Duration = Duration::from_millis(5);

impl AsyncRead for Dribble {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Dribble {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.fast || buf.is_empty() {
            return Pin::new(&mut this.io).poll_write(cx, buf);
        }
        ready!(this.pause.as_mut().poll(cx));
        let n = ready!(Pin::new(&mut this.io).poll_write(cx, &buf[..1]))?;
        this.dribbled += n;
        this.pause.as_mut().reset(Instant::now() + BYTE_PAUSE);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_hello_sent_byte_by_byte_is_served() {
    let fx = Fixture::start(STEP).await;
    let agent = fx.agent().await;
    let tunnel = agent
        .forward(http_service("slow").await.port())
        .await
        .unwrap();
    let host = tunnel.tls_socket().0.to_owned();

    let started = Instant::now();
    let tcp = TcpStream::connect(fx.public).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let dribble = Dribble {
        io: tcp,
        pause: Box::pin(sleep(Duration::ZERO)),
        fast: false,
        dribbled: 0,
    };
    let name = ServerName::try_from(host.clone()).unwrap();
    let mut tls = timeout(STEP, fx.connector(HTTP1).connect(name, dribble))
        .await
        .unwrap()
        .unwrap();
    let dribbled = tls.get_ref().0.dribbled;
    tls.get_mut().0.fast = true;
    let body = timeout(STEP, http_get(tls, &host)).await.unwrap().unwrap();
    assert_eq!(body, "slow");
    // The whole ClientHello (and the client's Finished) went one byte at a time...
    assert!(dribbled > 100, "only {dribbled} bytes dribbled");
    // ...and the handshake still made the relay's deadline.
    assert!(started.elapsed() < RelayConfig::DEFAULT_HANDSHAKE_TIMEOUT);
    assert_eq!(fx.stats().failed_handshakes, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_is_closed_at_the_deadline_while_others_are_served() {
    let deadline = Duration::from_secs(2);
    let fx = Fixture::start_with(STEP, |config| config.handshake_timeout = deadline).await;
    let agent = fx.agent().await;
    let tunnel = agent
        .forward(http_service("busy").await.port())
        .await
        .unwrap();

    let started = Instant::now();
    let mut silent_public = TcpStream::connect(fx.public).await.unwrap();
    let mut silent_agent = TcpStream::connect(("127.0.0.1", fx.agent_port))
        .await
        .unwrap();
    // Served while both silent connections wait.
    assert_eq!(fx.get(&tunnel).await.unwrap(), "busy");
    assert!(started.elapsed() < deadline);

    assert!(until_closed(&mut silent_public).await.is_empty());
    assert!(until_closed(&mut silent_agent).await.is_empty());
    let waited = started.elapsed();
    assert!(
        waited >= deadline - Duration::from_millis(100),
        "closed after {waited:?}"
    );
    // Counted just before each connection's place is released.
    fx.until_stats("two failed handshakes, no pending one", |s| {
        s.failed_handshakes == 2 && s.pending_handshakes == 0
    })
    .await;
    assert_eq!(fx.get(&tunnel).await.unwrap(), "busy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_is_dropped_and_the_relay_keeps_serving() {
    let fx = Fixture::start(STEP).await;
    let agent = fx.agent().await;
    let tunnel = agent
        .forward_with(http_service("fine").await.port(), unencrypted())
        .await
        .unwrap();
    let garbage: Vec<u8> = (0..4096u32).map(|i| (i * 7919 % 251) as u8).collect();

    // Not TLS on the public port, and plain HTTP on the public port.
    for bytes in [&garbage[..], b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"] {
        let mut stream = TcpStream::connect(fx.public).await.unwrap();
        let _ = stream.write_all(bytes).await;
        until_closed(&mut stream).await;
    }
    // Not TLS on the agent port.
    let mut stream = TcpStream::connect(("127.0.0.1", fx.agent_port))
        .await
        .unwrap();
    let _ = stream.write_all(&garbage).await;
    until_closed(&mut stream).await;
    // Garbage on a raw TCP tunnel port reaches the service, which answers and closes.
    let mut stream = TcpStream::connect(raw_addr(&tunnel)).await.unwrap();
    stream.write_all(&garbage).await.unwrap();
    stream.shutdown().await.unwrap();
    let answer = until_closed(&mut stream).await;
    assert!(String::from_utf8_lossy(&answer).ends_with("fine"));

    fx.until_stats("three failed handshakes", |s| s.failed_handshakes == 3)
        .await;
    assert_eq!(fx.get(&tunnel).await.unwrap(), "fine");
    let raw = TcpStream::connect(raw_addr(&tunnel)).await.unwrap();
    assert_eq!(http_get(raw, "any").await.unwrap(), "fine");
    assert!(agent.is_connected());
}

/// Opens TLS to the agent port as an agent would, without saying anything yet.
async fn agent_tls(fx: &Fixture) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect(("127.0.0.1", fx.agent_port))
        .await
        .unwrap();
    let tls = fx.connector(&[]);
    timeout(
        STEP,
        tls.connect(ServerName::try_from("localhost").unwrap(), tcp),
    )
    .await
    .unwrap()
    .unwrap()
}

/// The relay's answer to a broken hello: at most an error frame, then the close.
async fn refusal_then_close(tls: TlsStream<TcpStream>) -> Option<Frame> {
    let mut reader = FrameReader::new(tls);
    let first = timeout(STEP, reader.read_frame())
        .await
        .expect("the relay did not answer");
    match first {
        Ok(Some(Frame::Error(refusal))) => {
            let next = timeout(STEP, reader.read_frame()).await.unwrap();
            assert!(!matches!(next, Ok(Some(_))), "more after a refusal");
            Some(Frame::Error(refusal))
        }
        Ok(None) | Err(_) => None,
        Ok(Some(other)) => panic!("unexpected {other:?}"),
    }
}

fn hello(token: &Token) -> Frame {
    Frame::Hello(Hello {
        version: PROTOCOL_VERSION,
        token: token.expose().to_owned(),
        resume: Bytes::new(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_or_unexpected_frames_on_the_agent_port_close_the_link() {
    let fx = Fixture::start(STEP).await;

    // A hello whose header claims 4 GiB: refused from the header alone.
    let mut tls = agent_tls(&fx).await;
    tls.write_all(&[0x01, 0xff, 0xff, 0xff, 0xff])
        .await
        .unwrap();
    tls.flush().await.unwrap();
    match refusal_then_close(tls).await {
        Some(Frame::Error(refusal)) => {
            assert_eq!(refusal.code, ErrorCode::PROTOCOL);
            assert!(refusal.message.contains("4096"), "{}", refusal.message);
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // A first frame that is not a hello.
    let mut tls = agent_tls(&fx).await;
    tls.write_all(&[0x07, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 1])
        .await
        .unwrap();
    tls.flush().await.unwrap();
    refusal_then_close(tls).await;
    // A hello just over the limit, whose payload never comes.
    let mut tls = agent_tls(&fx).await;
    tls.write_all(&[0x01, 0, 0, 0x10, 0x01]).await.unwrap();
    tls.flush().await.unwrap();
    refusal_then_close(tls).await;
    fx.until_stats("three failed handshakes", |s| s.failed_handshakes == 3)
        .await;

    // After a good hello, an oversized packet frame ends the session.
    let (read_half, mut write_half) = tokio::io::split(agent_tls(&fx).await);
    let mut reader = FrameReader::new(read_half);
    let mut encoded = bytes::BytesMut::new();
    hello(&fx.token).encode(&mut encoded);
    write_half.write_all(&encoded).await.unwrap();
    write_half.flush().await.unwrap();
    let welcome = timeout(STEP, reader.read_frame()).await.unwrap();
    assert!(
        matches!(welcome, Ok(Some(Frame::Welcome(_)))),
        "{welcome:?}"
    );
    fx.until_stats("one session", |s| s.agent_sessions == 1)
        .await;
    write_half
        .write_all(&[0x10, 0xff, 0xff, 0xff, 0xff])
        .await
        .unwrap();
    write_half.flush().await.unwrap();
    let end = timeout(STEP, async {
        loop {
            match reader.read_frame().await {
                Ok(Some(Frame::Ping(_) | Frame::Pong(_))) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the relay kept the link open");
    assert!(!matches!(end, Ok(Some(_))), "{end:?}");
    fx.until_stats("no session", |s| s.agent_sessions == 0)
        .await;
    assert_eq!(fx.stats().unauthorized, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_wrong_tokens_are_refused_and_counted() {
    let fx = Fixture::start(STEP).await;
    for token in ["", "not-the-token"] {
        let refused = timeout(
            STEP,
            Agent::connect(fx.agent_config_with(Token::new(token))),
        )
        .await
        .unwrap();
        assert!(
            matches!(refused, Err(Error::Unauthorized)),
            "{token:?}: {refused:?}"
        );
    }
    // The right token with one character changed.
    let mut near = fx.token.expose().to_owned();
    let last = if near.ends_with('0') { "1" } else { "0" };
    near.replace_range(near.len() - 1.., last);
    let refused = timeout(STEP, Agent::connect(fx.agent_config_with(Token::new(near))))
        .await
        .unwrap();
    assert!(matches!(refused, Err(Error::Unauthorized)), "{refused:?}");
    let stats = fx.stats();
    assert_eq!((stats.unauthorized, stats.agent_sessions), (3, 0));
    fx.agent().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_or_missing_sni_is_closed_and_counted() {
    let fx = Fixture::start(STEP).await;
    let agent = fx.agent().await;
    let tunnel = agent
        .forward(http_service("known").await.port())
        .await
        .unwrap();

    let unknown = format!("{}.{LOCAL_DOMAIN}", "a".repeat(26));
    for _ in 0..3 {
        let refused = timeout(STEP, fx.connect_tls(&unknown, HTTP1))
            .await
            .unwrap();
        assert!(refused.is_err());
    }
    // A client connecting by IP address sends no SNI at all.
    let refused = timeout(STEP, fx.connect_tls("127.0.0.1", HTTP1))
        .await
        .unwrap();
    assert!(refused.is_err());
    fx.until_stats("four unknown names", |s| s.unknown_sni == 4)
        .await;
    assert_eq!(fx.get(&tunnel).await.unwrap(), "known");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_follows_sni_not_the_host_header() {
    let fx = Fixture::start(STEP).await;
    let agent = fx.agent().await;
    let a = agent.forward(http_service("A").await.port()).await.unwrap();
    let b = agent.forward(http_service("B").await.port()).await.unwrap();
    let (host_a, host_b) = (a.tls_socket().0, b.tls_socket().0);
    let body = timeout(STEP, fx.get_as(&host_a, &host_b))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(body, "A");
    let body = timeout(STEP, fx.get_as(&host_b, &host_a))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(body, "B");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forward_beyond_max_tunnels_per_agent_is_refused() {
    let fx = Fixture::start_with(STEP, |config| config.max_tunnels_per_agent = 2).await;
    let agent = fx.agent().await;
    let service = http_service("t").await;
    let first = agent.forward(service.port()).await.unwrap();
    let _second = agent.forward_with(1, to(service)).await.unwrap();
    let third = agent.forward_with(2, to(service)).await;
    match third {
        Err(Error::LimitReached { limit, message }) => {
            assert_eq!(limit, Limit::TunnelsPerAgent);
            assert!(message.contains(limit.name()), "{message}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(fx.stats().refused_by_limit, 1);
    assert_eq!(fx.relay.tunnel_count(), 2);
    // The tunnels that are open work; closing one makes room.
    assert_eq!(fx.get(&first).await.unwrap(), "t");
    first.close().await.unwrap();
    let again = agent.forward_with(2, to(service)).await.unwrap();
    assert_eq!(fx.get(&again).await.unwrap(), "t");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_max_connections_per_tunnel_are_refused() {
    let fx = Fixture::start_with(STEP, |config| config.max_connections_per_tunnel = 2).await;
    let agent = fx.agent().await;
    let tunnel = agent
        .forward_with(echo_service().await.port(), unencrypted())
        .await
        .unwrap();
    let host = tunnel.tls_socket().0;
    let mut one = fx.tls(&host, HTTP1).await.unwrap();
    echo_once(&mut one, b"one").await;
    let mut two = TcpStream::connect(raw_addr(&tunnel)).await.unwrap();
    echo_once(&mut two, b"two").await;
    assert_eq!(fx.stats().public_connections, 2);

    // A third over TLS is closed after its ClientHello...
    let third = timeout(STEP, fx.connect_tls(&host, HTTP1)).await.unwrap();
    assert!(third.is_err(), "a third TLS connection was served");
    // ...and a third over raw TCP is reset before anything reaches the service.
    // (The reset can come so fast that even the connect reports it.)
    if let Ok(mut third) = TcpStream::connect(raw_addr(&tunnel)).await {
        let _ = third.write_all(b"three").await;
        assert!(until_closed(&mut third).await.is_empty());
    }
    fx.until_stats("two refusals", |s| s.refused_by_limit == 2)
        .await;

    // The two admitted connections carry on.
    echo_once(&mut one, b"still one").await;
    echo_once(&mut two, b"still two").await;
    assert_eq!(fx.stats().public_connections, 2);
    // Closing one makes room for another.
    drop(two);
    fx.until_stats("one connection", |s| s.public_connections == 1)
        .await;
    let mut four = fx.tls(&host, HTTP1).await.unwrap();
    echo_once(&mut four, b"four").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_max_connections_per_agent_are_refused() {
    let fx = Fixture::start_with(STEP, |config| config.max_connections_per_agent = 2).await;
    let agent = fx.agent().await;
    let echo = echo_service().await;
    let a = agent.forward(echo.port()).await.unwrap();
    let b = agent.forward_with(1, to(echo)).await.unwrap();
    let mut one = fx.tls(&a.tls_socket().0, HTTP1).await.unwrap();
    echo_once(&mut one, b"a").await;
    let mut two = fx.tls(&b.tls_socket().0, HTTP1).await.unwrap();
    echo_once(&mut two, b"b").await;
    // Each tunnel is under its own limit, but the agent is at its limit.
    for tunnel in [&a, &b] {
        let refused = timeout(STEP, fx.connect_tls(&tunnel.tls_socket().0, HTTP1))
            .await
            .unwrap();
        assert!(refused.is_err());
    }
    fx.until_stats("two refusals", |s| s.refused_by_limit == 2)
        .await;
    echo_once(&mut one, b"a again").await;
    echo_once(&mut two, b"b again").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshakes_beyond_max_pending_handshakes_are_closed_at_once() {
    let fx = Fixture::start_with(STEP, |config| {
        config.max_pending_handshakes = 1;
        config.handshake_timeout = Duration::from_secs(20);
    })
    .await;
    let agent = fx.agent().await;
    let tunnel = agent.forward(http_service("h").await.port()).await.unwrap();

    // A silent client holds the only handshake place...
    let silent = TcpStream::connect(fx.public).await.unwrap();
    fx.until_stats("one pending handshake", |s| s.pending_handshakes == 1)
        .await;
    // ...so the next one is closed at once rather than at the deadline.
    let started = Instant::now();
    assert!(fx.get(&tunnel).await.is_err());
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(fx.stats().refused_by_limit, 1);

    // Once the silent client leaves, handshakes go through again.
    drop(silent);
    fx.until_stats("no pending handshake", |s| s.pending_handshakes == 0)
        .await;
    assert_eq!(fx.get(&tunnel).await.unwrap(), "h");
}

/// Handshake places in each pool of the flood test.
const POOL: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_silent_connections_from_one_address_keeps_out_neither_agents_nor_other_clients()
{
    let fx = Fixture::start_with(STEP, |config| {
        config.max_pending_handshakes = POOL;
        config.max_pending_agent_handshakes = POOL;
        config.handshake_timeout = Duration::from_secs(60);
    })
    .await;
    let agent = fx.agent().await;
    let tunnel = agent
        .forward(http_service("one").await.port())
        .await
        .unwrap();

    // One address floods both ports with silent connections, five times what a pool
    // holds: it fills each pool, and the rest are refused.
    let flooder = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
    let mut silent = Vec::new();
    for port in [fx.public.port(), fx.agent_port] {
        for _ in 0..5 * POOL {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind(SocketAddr::new(flooder, 0)).unwrap();
            let to = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
            silent.push(timeout(STEP, socket.connect(to)).await.unwrap().unwrap());
        }
    }
    // Every connection of the flood is either holding a place or refused by now.
    fx.until_stats("the flood handled", |s| {
        s.refused_by_limit >= 2 * 4 * POOL as u64
    })
    .await;

    assert_eq!(fx.stats().pending_handshakes, 2 * POOL);
    // Other clients still get their pages, and other agents connect and forward: each
    // takes a place back from the flooder, whose connection is closed.
    for round in 0..3 {
        assert_eq!(fx.get(&tunnel).await.unwrap(), "one", "round {round}");
    }
    let second = fx.agent().await;
    let other = second
        .forward(http_service("two").await.port())
        .await
        .unwrap();
    assert_eq!(fx.get(&other).await.unwrap(), "two");
    let stats = fx.stats();
    // The first page took one public place back and the second agent one agent place;
    // the later pages took the place the first one had left.
    assert_eq!(stats.failed_handshakes, 2, "{stats:?}");
    assert_eq!(stats.pending_handshakes, 2 * POOL - 2, "{stats:?}");
    drop(silent);
    fx.until_stats("no pending handshake", |s| s.pending_handshakes == 0)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_beyond_max_agent_sessions_is_refused() {
    let fx = Fixture::start_with(STEP, |config| config.max_agent_sessions = 1).await;
    let first = fx.agent().await;
    let refused = timeout(STEP, Agent::connect(fx.agent_config()))
        .await
        .unwrap();
    match refused {
        Err(Error::LimitReached { limit, message }) => {
            assert_eq!(limit, Limit::AgentSessions);
            assert!(message.contains(limit.name()), "{message}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    let stats = fx.stats();
    assert_eq!((stats.agent_sessions, stats.refused_by_limit), (1, 1));
    // The refused agent hears the answer just before the relay lets go of its place.
    fx.until_stats("no pending handshake", |s| s.pending_handshakes == 0)
        .await;
    // When the first agent leaves, its place is free again.
    drop(first);
    fx.until_stats("no session", |s| s.agent_sessions == 0)
        .await;
    fx.agent().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_of_200_connections_leaves_nothing_behind() {
    let fx = Fixture::start(STEP).await;
    let agent = fx.agent().await;
    let tunnel = agent
        .forward_with(http_service("churn").await.port(), unencrypted())
        .await
        .unwrap();
    for i in 0..200 {
        let body = if i % 2 == 0 {
            fx.get(&tunnel).await
        } else {
            let raw = TcpStream::connect(raw_addr(&tunnel)).await.unwrap();
            timeout(STEP, http_get(raw, "raw")).await.unwrap()
        };
        assert_eq!(body.unwrap(), "churn", "connection {i}");
    }
    fx.until_stats("every connection and flow gone", |s| {
        s.public_connections == 0 && s.pending_handshakes == 0 && s.stacks.flows == 0
    })
    .await;
    let stats = fx.stats();
    assert_eq!((stats.agent_sessions, stats.tunnels), (1, 1));
    assert_eq!(stats.failed_handshakes + stats.refused_by_limit, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_syn_from_the_agent_is_refused_and_creates_no_flow() {
    let fx = Fixture::start(STEP).await;
    let (read_half, write_half) = tokio::io::split(agent_tls(&fx).await);
    let (mut reader, mut writer) = (FrameReader::new(read_half), FrameWriter::new(write_half));
    writer.send(&hello(&fx.token)).await.unwrap();
    let welcome = timeout(STEP, reader.read_frame()).await.unwrap();
    assert!(
        matches!(welcome, Ok(Some(Frame::Welcome(_)))),
        "{welcome:?}"
    );

    // This agent's own stack tries to open connections to the relay's stack.
    let stack = Stack::new(StackConfig::agent());
    let _link = drive_link(reader, writer, stack.clone());
    for port in [22, 80, 7835] {
        let attempt = timeout(STEP, stack.connect(port)).await.unwrap();
        assert_eq!(attempt.err(), Some(ConnectError::Refused), "port {port}");
    }
    let stats = fx.stats();
    assert_eq!(stats.agent_sessions, 1);
    assert_eq!(stats.stacks.refused_syns, 3);
    assert_eq!(stats.stacks.flows, 0);
    assert_eq!(stats.stacks.listeners, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_lets_open_connections_finish_and_refuses_new_ones() {
    let grace = Duration::from_secs(20);
    let (fx, relay) = Fixture::bind(STEP, |config| config.shutdown_grace = grace).await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(relay.run_until(async {
        let _ = stopped.await;
    }));
    let agent = fx.agent().await;
    let tunnel = agent
        .forward_with(echo_service().await.port(), unencrypted())
        .await
        .unwrap();
    let mut open = fx.tls_to(&tunnel).await.unwrap();
    echo_once(&mut open, b"before").await;
    let mut open_raw = TcpStream::connect(raw_addr(&tunnel)).await.unwrap();
    echo_once(&mut open_raw, b"before").await;

    let started = Instant::now();
    stop.send(()).unwrap();
    // The listeners close: new connections are refused by the OS.
    timeout(STEP, async {
        while TcpStream::connect(fx.public).await.is_ok() {
            sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the public port stayed open");
    assert!(TcpStream::connect(raw_addr(&tunnel)).await.is_err());
    assert!(TcpStream::connect(("127.0.0.1", fx.agent_port))
        .await
        .is_err());
    // New tunnels are refused too.
    let refused = agent.forward(echo_service().await.port()).await;
    assert!(matches!(refused, Err(Error::Refused { .. })), "{refused:?}");

    // The connections in flight carry on and finish.
    for stream in [&mut open as &mut dyn Stream, &mut open_raw] {
        echo_once(stream, b"during shutdown").await;
        stream.shutdown().await.unwrap();
        assert!(until_closed(stream).await.is_empty());
    }
    drop((open, open_raw));
    // Then the relay stops, without waiting out the grace period.
    timeout(STEP, serving).await.unwrap().unwrap();
    assert!(started.elapsed() < grace);
    let stats = fx.stats();
    assert_eq!((stats.agent_sessions, stats.tunnels), (0, 0));
    assert_eq!(stats.public_connections, 0);
}

/// A byte stream of either kind, for looping over TLS and raw TCP connections.
trait Stream: AsyncRead + AsyncWrite + Unpin {}
impl<S: AsyncRead + AsyncWrite + Unpin> Stream for S {}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drops_connections_left_after_the_grace_period() {
    let grace = Duration::from_millis(500);
    let (fx, relay) = Fixture::bind(STEP, |config| config.shutdown_grace = grace).await;
    let serving = tokio::spawn(relay.run());
    let agent = fx.agent().await;
    let tunnel = agent.forward(echo_service().await.port()).await.unwrap();
    let mut open = fx.tls_to(&tunnel).await.unwrap();
    echo_once(&mut open, b"before").await;

    let started = Instant::now();
    fx.relay.shutdown();
    timeout(STEP, serving).await.unwrap().unwrap();
    assert!(started.elapsed() >= grace - Duration::from_millis(50));
    // The connection is cut: nothing more is echoed.
    let _ = open.write_all(b"after").await;
    assert!(until_closed(&mut open).await.is_empty());
    let stats = fx.stats();
    assert_eq!((stats.agent_sessions, stats.public_connections), (0, 0));
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_relay_command_drains_on_sigterm_and_exits_on_the_second() {
    use std::io::BufRead;
    use std::process::Stdio;

    let state = TempDir::new("hardening");
    let public = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), free_port());
    let mut relay = Child(
        portferry(["relay", "--agent-addr", "127.0.0.1:0", "--public-addr"])
            .arg(public.to_string())
            .args(["--handshake-timeout", "60", "--shutdown-grace", "60"])
            .arg("--state-dir")
            .arg(state.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let stdout = relay.0.stdout.take().unwrap();
    let ready = tokio::task::spawn_blocking(move || {
        std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .any(|line| line.starts_with("PORTFERRY_RELAY="))
    });
    assert!(timeout(STEP, ready).await.unwrap().unwrap(), "never ready");

    // A handshake in progress keeps a draining relay waiting...
    let mut pending = TcpStream::connect(public).await.unwrap();
    // (Connections are accepted in order: once a later one is dropped for garbage,
    // the relay has accepted the pending one.)
    let mut garbage = TcpStream::connect(public).await.unwrap();
    garbage.write_all(&[0xff; 64]).await.unwrap();
    until_closed(&mut garbage).await;
    relay.terminate();
    sleep(Duration::from_millis(500)).await;
    assert!(
        relay.0.try_wait().unwrap().is_none(),
        "exited while draining"
    );
    // ...while the public port is already closed.
    assert!(TcpStream::connect(public).await.is_err());
    // A second SIGTERM exits at once.
    relay.terminate();
    let status = relay.exit_status(STEP).await;
    assert!(status.success(), "{status}");
    assert!(until_closed(&mut pending).await.is_empty());
}

// ───────────────────────────── the public edge's handshake ─────────────────────────────

/// Sends `host`'s ClientHello to the relay's public port and waits for the first byte
/// of its answer (so the relay has acted on the hello); the connection, left silent.
async fn hello_only(fx: &Fixture, host: &str) -> TcpStream {
    let name = ServerName::try_from(host.to_owned()).unwrap();
    let config = portferry::tls::client_config(fx.pki.roots(), HTTP1);
    let mut client = rustls::ClientConnection::new(config, name).unwrap();
    let mut hello = Vec::new();
    client.write_tls(&mut hello).unwrap();
    let mut tcp = TcpStream::connect(fx.public).await.unwrap();
    tcp.write_all(&hello).await.unwrap();
    let mut first = [0u8; 1];
    timeout(STEP, tcp.read_exact(&mut first))
        .await
        .expect("no answer to the ClientHello")
        .unwrap();
    tcp
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_hello_alone_opens_no_connection_to_the_service() {
    let fx = Fixture::start_with(STEP, |config| {
        config.handshake_timeout = Duration::from_secs(120);
    })
    .await;
    let agent = fx.agent().await;
    let service = stream_service(1024).await;
    let tunnel = agent.forward(service.addr.port()).await.unwrap();
    let host = tunnel.tls_socket().0.to_owned();
    let mut silent = Vec::new();
    for _ in 0..4 {
        silent.push(hello_only(&fx, &host).await);
    }
    // A client that completes its handshake reaches the service; then its connection ends.
    let mut tls = fx.tls_to(&tunnel).await.unwrap();
    timeout(STEP, read_stream(&mut tls, 1024))
        .await
        .expect("the whole client got nothing")
        .unwrap();
    drop(tls);
    fx.until_stats("no inner connection open", |s| s.stacks.flows == 0)
        .await;
    assert_eq!(
        service.accepted(),
        1,
        "hello-only clients reached the service"
    );
    assert_eq!(fx.stats().pending_handshakes, 4, "{:?}", fx.stats());
    drop(silent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_or_closed_hostname_gets_an_unrecognized_name_alert() {
    let fx = Fixture::start(STEP).await;
    let agent = fx.agent().await;
    let tunnel = agent.forward(http_service("h").await.port()).await.unwrap();
    let closed = tunnel.tls_socket().0.to_owned();
    assert_eq!(fx.get(&tunnel).await.unwrap(), "h");
    tunnel.close().await.unwrap();
    let unknown = format!("{}.{LOCAL_DOMAIN}", "a".repeat(26));
    let alert = rustls::Error::AlertReceived(rustls::AlertDescription::UnrecognisedName);
    for sni in [&unknown, &closed] {
        // rustls, as a client program sees it.
        let error = fx.tls(sni, HTTP1).await.unwrap_err();
        let received = error
            .get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>());
        assert_eq!(received, Some(&alert), "{sni}: {error}");
        // curl, with OpenSSL, names the alert.
        let url = format!("https://{sni}:{}/", fx.public.port());
        let curl = std::process::Command::new("curl")
            .args(["--silent", "--show-error", "--max-time", "20", "--cacert"])
            .arg(&fx.pki.ca_cert_path)
            .args([
                "--resolve",
                &format!("{sni}:{}:127.0.0.1", fx.public.port()),
                &url,
            ])
            .output()
            .expect("curl runs");
        let said = String::from_utf8_lossy(&curl.stderr).to_lowercase();
        assert!(!curl.status.success(), "{sni}: curl succeeded");
        assert!(
            said.contains("unrecognized name"),
            "{sni}: curl said {said:?}"
        );
    }
    assert_eq!(fx.stats().unknown_sni, 4);
}

// ───────────────────────────── settings that cannot work ─────────────────────────────

/// Runs `portferry relay` with `args` and `env` (and a state directory of its own);
/// its exit status and what it wrote on stderr. Panics if it does not exit.
async fn relay_exit(args: &[&str], env: &[(&str, &str)]) -> (std::process::ExitStatus, String) {
    let state = TempDir::new("relay-config");
    let mut command = portferry(["relay"]);
    command
        .args(args)
        .arg("--state-dir")
        .arg(state.path())
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    let mut child = Child(command.spawn().unwrap());
    let status = child.exit_status(STEP).await;
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.0.stderr.take().unwrap(), &mut stderr).unwrap();
    (status, stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_with_settings_that_cannot_work_does_not_start_and_names_the_flag() {
    for (args, env) in [
        (&["--tokens", ""][..], &[][..]),
        (&["--tokens", " "][..], &[][..]),
        (&["--tokens", "good, "][..], &[][..]),
        (&[][..], &[("PORTFERRY_TOKENS", " ")][..]),
    ] {
        let (status, stderr) = relay_exit(&common::on_free_ports(args), env).await;
        assert_eq!(status.code(), Some(1), "{args:?} {env:?}: {stderr}");
        assert!(stderr.contains("--tokens"), "{args:?} {env:?}: {stderr}");
    }
    let (status, stderr) =
        relay_exit(&common::on_free_ports(&["--handshake-timeout", "0"]), &[]).await;
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--handshake-timeout"), "{stderr}");

    // An address in use is named, with its flag.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let args = ["--public-addr", "127.0.0.1:0", "--agent-addr", &addr];
    let (status, stderr) = relay_exit(&args, &[]).await;
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&addr) && stderr.contains("--agent-addr") && stderr.contains("in use"),
        "{stderr}"
    );
}
