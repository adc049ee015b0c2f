//! Shares of the relay's pools, through a real relay on loopback: a flood from some
//! source addresses (127.0.0.0/8 gives many) or one token fills a pool, and a newcomer
//! from another address or token still gets in, because the holder of the most gives
//! a place back.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use common::*;
use portferry::agent::Agent;
use portferry::token::Token;
use portferry::wire::{ErrorCode, NEW_AGENT};
use portferry::{Error, Limit};
use tokio::io::AsyncReadExt;
use tokio::time::timeout;

const STEP: Duration = Duration::from_secs(10);

fn loopback(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

/// The first of `n` consecutive loopback ports that were free a moment ago, below the
/// ephemeral range.
fn free_ports(n: u16) -> u16 {
    loop {
        let first = 12_000 + rand::random::<u16>() % 8_000;
        let held: Result<Vec<_>, _> = (first..first + n)
            .map(|port| std::net::TcpListener::bind(("127.0.0.1", port)))
            .collect();
        if held.is_ok() {
            return first;
        }
    }
}

/// A relay with `pool` public handshake places and a long handshake timeout, and an
/// agent's tunnel to a page that says "ok".
async fn handshake_pool(pool: usize) -> (Fixture, Agent, portferry::agent::Tunnel) {
    let fx = Fixture::start_with(STEP, |config| {
        config.max_pending_handshakes = pool;
        config.handshake_timeout = Duration::from_secs(60);
    })
    .await;
    let agent = fx.agent().await;
    let tunnel = agent
        .forward(http_service("ok").await.port())
        .await
        .unwrap();
    (fx, agent, tunnel)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_flood_from_two_addresses_keeps_a_third_out_of_nothing() {
    const POOL: usize = 8;
    let (fx, _agent, tunnel) = handshake_pool(POOL).await;

    // Two addresses send a TLS record header each and nothing more, five times what the
    // pool holds between them; whatever is refused or closed, they hold the pool.
    let mut silent = Vec::new();
    for flooder in [loopback(2), loopback(3)] {
        for _ in 0..5 * POOL / 2 {
            let mut tcp = timeout(STEP, connect_from(flooder, fx.public))
                .await
                .unwrap()
                .unwrap();
            tokio::io::AsyncWriteExt::write_all(&mut tcp, &[0x16, 0x03, 0x01, 0x02, 0x00])
                .await
                .unwrap();
            silent.push(tcp);
        }
    }
    // Each connection beyond the pool was refused, or took a place back from the other
    // flooder (whose connection then failed its handshake).
    fx.until_stats("the flood handled", |s| {
        s.refused_by_limit + s.failed_handshakes == (5 * POOL - POOL) as u64
            && s.pending_handshakes == POOL
    })
    .await;
    let taken_back = fx.stats().failed_handshakes;

    // A third address gets every page, taking a place back from a flooder.
    for round in 0..20 {
        assert_eq!(fx.get(&tunnel).await.unwrap(), "ok", "round {round}");
    }
    assert!(
        fx.stats().failed_handshakes > taken_back,
        "{:?}",
        fx.stats()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_holding_every_connection_of_a_tunnel_gives_one_back() {
    const SLOTS: usize = 4;
    let fx = Fixture::start_with(STEP, |config| {
        config.max_connections_per_tunnel = SLOTS;
    })
    .await;
    let agent = fx.agent().await;
    let tunnel = agent
        .forward(http_service("mine").await.port())
        .await
        .unwrap();
    let host = tunnel.tls_socket().0.to_owned();

    // One address holds every slot of the tunnel with idle TLS connections.
    let connector = fx.connector(HTTP1);
    let mut idle = Vec::new();
    for _ in 0..SLOTS {
        let tls = tls_connect_from(&connector, loopback(2), fx.public, &host);
        idle.push(timeout(STEP, tls).await.unwrap().unwrap());
    }
    fx.until_stats("the slots held", |s| s.public_connections == SLOTS)
        .await;
    // One more from it is refused: it already holds the most.
    let refused_before = fx.stats().refused_by_limit;
    let extra = tls_connect_from(&connector, loopback(2), fx.public, &host);
    assert!(timeout(STEP, extra).await.unwrap().is_err());
    assert_eq!(fx.stats().refused_by_limit, refused_before + 1);

    // Another address gets its pages; the oldest idle connection was closed for it. One
    // page at a time, each one's end seen by the relay before the next: only the first
    // finds the tunnel full.
    for round in 0..3 {
        assert_eq!(fx.get(&tunnel).await.unwrap(), "mine", "round {round}");
        fx.until_stats("the page's connection ended", |s| {
            s.public_connections == SLOTS - 1
        })
        .await;
    }
    let mut byte = [0u8; 1];
    let oldest = timeout(STEP, idle[0].read(&mut byte)).await.unwrap();
    assert!(matches!(oldest, Ok(0) | Err(_)), "{oldest:?}");
    assert_eq!(
        fx.stats().endings.taken_back,
        1,
        "only the oldest was given back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_tcp_slots_are_shared_by_address_too() {
    const SLOTS: usize = 3;
    let fx = Fixture::start_with(STEP, |config| {
        config.max_connections_per_tunnel = SLOTS;
    })
    .await;
    let agent = fx.agent().await;
    let tunnel = agent
        .forward_with(echo_service().await.port(), unencrypted())
        .await
        .unwrap();
    let (_, port) = tunnel.tcp_socket().unwrap();
    let to = SocketAddr::new(loopback(1), port);
    let mut idle = Vec::new();
    for _ in 0..SLOTS {
        idle.push(
            timeout(STEP, connect_from(loopback(2), to))
                .await
                .unwrap()
                .unwrap(),
        );
    }
    fx.until_stats("the slots held", |s| s.public_connections == SLOTS)
        .await;
    let client = timeout(STEP, connect_from(loopback(1), to))
        .await
        .unwrap()
        .unwrap();
    let echoed = exchange(STEP, client, b"still served").await.unwrap();
    assert_eq!(echoed, b"still served");
    let mut byte = [0u8; 1];
    let oldest = timeout(STEP, idle[0].read(&mut byte)).await.unwrap();
    assert!(matches!(oldest, Ok(0) | Err(_)), "{oldest:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_sessions_are_shared_by_token_and_within_a_token_by_address() {
    let other = Token::generate();
    let tokens = other.clone();
    let fx = Fixture::start_with(STEP, move |config| {
        config.tokens.push(tokens);
        config.max_agent_sessions = 4;
    })
    .await;
    let token = fx.token.clone();
    let flooder = loopback(2);
    // Two tokens, four sessions: one token from one address gets its two, no more.
    let first = RawAgent::try_connect_from(&fx, flooder, &token, NEW_AGENT).await;
    let mut first = first.unwrap();
    let _second = RawAgent::try_connect_from(&fx, flooder, &token, NEW_AGENT)
        .await
        .unwrap();
    let refused = RawAgent::try_connect_from(&fx, flooder, &token, NEW_AGENT).await;
    let Err(refusal) = refused else {
        panic!("a third session of the token was welcomed");
    };
    assert_eq!(refusal.code, ErrorCode::limit_reached(Limit::AgentSessions));
    // The other token's share was kept for it.
    let mut others = Vec::new();
    for _ in 0..2 {
        let agent = RawAgent::try_connect_from(&fx, flooder, &other, NEW_AGENT).await;
        others.push(agent.unwrap());
    }
    // An agent of the first token from another address takes a session back from the
    // address holding them: its oldest link is closed.
    let _newcomer = RawAgent::try_connect_from(&fx, loopback(1), &token, NEW_AGENT)
        .await
        .unwrap();
    first.until_closed(STEP).await;
    fx.until_stats("four sessions", |s| s.agent_sessions == 4)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_tcp_ports_are_shared_by_token() {
    let other = Token::generate();
    let tokens = other.clone();
    let first_port = free_ports(4);
    let fx = Fixture::start_with(STEP, move |config| {
        config.tokens.push(tokens);
        config.tcp_ports = first_port..=first_port + 3;
    })
    .await;
    // One token's agent takes its two of the four ports, and is refused a third by name.
    let greedy = fx.agent().await;
    let service = echo_service().await;
    let mut held = Vec::new();
    for port in [service.port(), 1, 2] {
        let options = unencrypted().local_addr(service);
        held.push(greedy.forward_with(port, options).await);
    }
    match held.pop().unwrap() {
        Err(Error::LimitReached { limit, .. }) => assert_eq!(limit, Limit::TcpPorts),
        other => panic!("expected a refusal at tcp_ports, got {other:?}"),
    }
    // The other token's agent gets its two.
    let agent = timeout(STEP, Agent::connect(fx.agent_config_with(other)))
        .await
        .unwrap()
        .unwrap();
    let mut kept = Vec::new();
    for port in [service.port(), 1] {
        let tunnel = agent
            .forward_with(port, unencrypted().local_addr(service))
            .await
            .unwrap();
        let (_, tcp_port) = tunnel.tcp_socket().unwrap();
        assert!((first_port..=first_port + 3).contains(&tcp_port));
        let client = connect_from(loopback(1), SocketAddr::new(loopback(1), tcp_port));
        let client = timeout(STEP, client).await.unwrap().unwrap();
        assert_eq!(exchange(STEP, client, b"hi").await.unwrap(), b"hi");
        kept.push(tunnel);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handshake_without_its_client_hello_after_the_first_deadline_goes_first() {
    const POOL: usize = 4;
    let (fx, _agent, tunnel) = handshake_pool(POOL).await;
    let host = tunnel.tls_socket().0.to_owned();
    // One address sends nothing; another sends its whole ClientHello, then stalls.
    let mut silent = Vec::new();
    for _ in 0..POOL / 2 {
        silent.push(
            timeout(STEP, connect_from(loopback(3), fx.public))
                .await
                .unwrap()
                .unwrap(),
        );
    }
    let mut hello = Vec::new();
    let name = rustls::pki_types::ServerName::try_from(host.clone()).unwrap();
    let config = fx.connector(HTTP1).config().clone();
    rustls::ClientConnection::new(config, name)
        .unwrap()
        .write_tls(&mut hello)
        .unwrap();
    let mut stalled = Vec::new();
    for _ in 0..POOL / 2 {
        let mut tcp = timeout(STEP, connect_from(loopback(4), fx.public))
            .await
            .unwrap()
            .unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut tcp, &hello)
            .await
            .unwrap();
        stalled.push(tcp);
    }
    fx.until_stats("the pool full", |s| s.pending_handshakes == POOL)
        .await;
    // Past the first deadline (2.5 s), the silent ones yield: a newcomer closes one of
    // them, not one of those that sent their ClientHello.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(fx.get(&tunnel).await.unwrap(), "ok");
    let mut byte = [0u8; 1];
    let closed = timeout(STEP, silent[0].read(&mut byte)).await.unwrap();
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
    // The others are still open: what the relay sent them is its handshake's flight,
    // and no end.
    tokio::time::sleep(Duration::from_millis(200)).await;
    for tcp in &stalled {
        let mut flight = [0u8; 4096];
        let open = loop {
            match tcp.try_read(&mut flight) {
                Ok(0) => break false,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break true,
                Err(_) => break false,
            }
        };
        assert!(open, "a connection that sent its ClientHello was closed");
    }
}
