//! The relay behind real balancers that speak the PROXY protocol — HAProxy
//! (`send-proxy-v2`) and nginx `stream` (`proxy_protocol on`, v1) — on loopback, with
//! `accept_proxy_protocol_from` naming the address the balancers connect from
//! (127.0.0.9): the relay counts each client by the address the header names
//! (127.0.0.2, 127.0.0.3, …), not by the balancer's; from anyone else (agents and
//! clients connecting directly from 127.0.0.1) a header is never read, and a trusted
//! source without one is refused. The agent learns the client's own address too
//! (`TunnelStream::peer_addr`).
//!
//! In CI (`CI=true`) a missing nginx or HAProxy fails these tests; elsewhere they are
//! skipped with the reason printed.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use common::proxies::{haproxy, nginx, Binary, Kind, Proxy};
use common::{connect_from, echo_service, exchange, tls_connect_from, unencrypted, Fixture, HTTP1};
use portferry::agent::{Agent, AgentConfig, Tunnel};
use portferry::relay::{Cidr, RelayConfig};
use portferry::wire::{handshake, ErrorCode, NEW_AGENT};
use portferry::{Edge, Limit};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::timeout;

/// Upper bound for any single test step: a hang fails the test instead of the CI job.
const STEP: Duration = Duration::from_secs(10);

/// Where the balancers connect to the relay from: the relay trusts it for PROXY
/// headers.
const BALANCER: u8 = 9;

/// The loopback address `127.0.0.<n>`: clients, each on an address of its own, and
/// the [`BALANCER`].
fn client(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, n))
}

/// The relay trusting the balancers, with `tweak` applied.
async fn trusting_relay(tweak: impl FnOnce(&mut RelayConfig)) -> Fixture {
    Fixture::start_with(STEP, |config| {
        config.accept_proxy_protocol_from = vec![Cidr::new(client(BALANCER), 32).unwrap()];
        tweak(config);
    })
    .await
}

/// A balancer of `binary`'s kind on one loopback port passing every connection to
/// `to` from the [`BALANCER`] address, with a PROXY header (`with_header`) or without.
async fn balancer(binary: &Binary, to: SocketAddr, with_header: bool) -> Proxy {
    let source = client(BALANCER);
    Proxy::start(binary, 1, STEP, |setup| match binary.kind {
        Kind::Haproxy => {
            let header = if with_header { "send-proxy-v2" } else { "" };
            let options = format!("source {source} {header}");
            format!(
                "frontend balancer\n  bind {}\n  default_backend relay\n\n{}",
                setup.listen(0),
                haproxy::backend("relay", to, &options)
            )
        }
        Kind::Nginx => nginx::stream(
            setup,
            &format!(
                "  server {{\n    listen {};\n    proxy_pass {to};\n    proxy_bind {source};\n    \
                 proxy_protocol {};\n  }}",
                setup.listen(0),
                if with_header { "on" } else { "off" }
            ),
        ),
    })
    .await
}

/// An agent of `fx` with a tunnel to a loopback echo service.
async fn echo_tunnel(fx: &Fixture) -> (Agent, Tunnel) {
    let agent = fx.agent().await;
    let tunnel = agent
        .forward_with(echo_service().await.port(), unencrypted())
        .await
        .unwrap();
    (agent, tunnel)
}

/// Sends `message` and reads it back on an echoed stream, within [`STEP`].
async fn echoes<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S, message: &[u8]) -> bool {
    let round = async {
        stream.write_all(message).await?;
        let mut back = vec![0; message.len()];
        stream.read_exact(&mut back).await?;
        Ok::<_, std::io::Error>(back == message)
    };
    matches!(timeout(STEP, round).await, Ok(Ok(true)))
}

/// Whether `stream` is ended (EOF or reset) within [`STEP`] with nothing more to read.
async fn ended<S: AsyncRead + Unpin>(stream: &mut S) -> bool {
    let mut byte = [0; 1];
    matches!(
        timeout(STEP, stream.read(&mut byte)).await,
        Ok(Ok(0) | Err(_))
    )
}

/// With a tunnel limited to two connections: client 2 opens two through `lb`, then
/// client 3 one. Whether client 3's connection echoes, and client 2's first one.
async fn third_connection(fx: &Fixture, tunnel: &Tunnel, lb: &Proxy) -> (bool, ClientTls) {
    let host = tunnel.tls_socket().0;
    let connector = fx.connector(HTTP1);
    let open = |from: IpAddr| {
        let (connector, host) = (connector.clone(), host.clone());
        async move {
            timeout(STEP, tls_connect_from(&connector, from, lb.addr(0), &host))
                .await
                .expect("TLS through the balancer hung")
        }
    };
    let mut first = open(client(2)).await.expect("client 2's first connection");
    assert!(echoes(&mut first, b"first").await);
    let mut second = open(client(2)).await.expect("client 2's second connection");
    assert!(echoes(&mut second, b"second").await);
    let third = match open(client(3)).await {
        Ok(mut third) => echoes(&mut third, b"third").await,
        Err(_) => false,
    };
    assert!(
        echoes(&mut second, b"still").await,
        "client 2's newer connection lives on"
    );
    (third, first)
}

/// A TLS client's connection.
type ClientTls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// Through a balancer sending PROXY headers, the tunnel's connection limit is shared by
/// the clients' own addresses: client 3 takes a place back from client 2, who holds
/// more, and nothing is refused.
async fn shares_follow_the_client_address(kind: Kind) {
    let Some(binary) = Binary::require(kind) else {
        return;
    };
    let fx = trusting_relay(|config| config.max_connections_per_tunnel = 2).await;
    let (_agent, tunnel) = echo_tunnel(&fx).await;
    let lb = balancer(&binary, fx.public, true).await;
    let (third, mut first) = third_connection(&fx, &tunnel, &lb).await;
    let first_ended = ended(&mut first).await;
    let stats = fx.stats();
    println!(
        "{kind:?} with PROXY headers: client 127.0.0.3 served: {third}, client 127.0.0.2's \
         oldest connection ended for it: {first_ended}; refused_by_limit {}, \
         failed_handshakes {}",
        stats.refused_by_limit, stats.failed_handshakes
    );
    assert!(third, "client 3 was not served: {stats:?}\n{}", lb.logs());
    assert!(first_ended, "client 2's oldest connection lives on");
    assert_eq!(stats.refused_by_limit, 0, "{stats:?}");
    assert_eq!(stats.failed_handshakes, 0, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_haproxy_send_proxy_v2_each_client_address_gets_its_share() {
    shares_follow_the_client_address(Kind::Haproxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_nginx_proxy_protocol_each_client_address_gets_its_share() {
    shares_follow_the_client_address(Kind::Nginx).await;
}

/// The same without PROXY headers: every connection is the balancer's, so client 3 is
/// refused at the limit like one more connection of client 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_headers_the_balancer_is_one_address() {
    let Some(binary) = Binary::require(Kind::Haproxy) else {
        return;
    };
    let fx = Fixture::start_with(STEP, |config| config.max_connections_per_tunnel = 2).await;
    let (_agent, tunnel) = echo_tunnel(&fx).await;
    let lb = balancer(&binary, fx.public, false).await;
    let (third, mut first) = third_connection(&fx, &tunnel, &lb).await;
    let first_alive = echoes(&mut first, b"alive").await;
    let stats = fx.stats();
    println!(
        "HAProxy without PROXY headers: client 127.0.0.3 served: {third}, client \
         127.0.0.2's oldest still served: {first_alive}; refused_by_limit {}",
        stats.refused_by_limit
    );
    assert!(!third && first_alive, "{stats:?}");
    assert_eq!(stats.refused_by_limit, 1, "{stats:?}");
}

/// A relay that does not trust the balancer never reads its header: the header is
/// just the first bytes of a TLS handshake that fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_from_an_untrusted_balancer_is_just_bytes() {
    let Some(binary) = Binary::require(Kind::Haproxy) else {
        return;
    };
    let fx = Fixture::start(STEP).await;
    let (_agent, tunnel) = echo_tunnel(&fx).await;
    let lb = balancer(&binary, fx.public, true).await;
    let host = tunnel.tls_socket().0;
    let through = timeout(
        STEP,
        tls_connect_from(&fx.connector(HTTP1), client(2), lb.addr(0), &host),
    )
    .await
    .expect("TLS through the balancer hung");
    assert!(through.is_err(), "a TLS handshake after a header worked");
    fx.until_stats("the failed handshake counted", |s| s.failed_handshakes == 1)
        .await;
    assert_eq!(fx.stats().public_connections, 0);
}

/// A connection from a trusted address that does not start with a header is refused
/// and counted; one from elsewhere is served as always.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trusted_source_without_a_header_is_refused() {
    let fx = trusting_relay(|_| {}).await;
    let (_agent, tunnel) = echo_tunnel(&fx).await;
    let host = tunnel.tls_socket().0;
    let connector = fx.connector(HTTP1);
    let direct = |from| {
        let (connector, host) = (connector.clone(), host.clone());
        let to = fx.public;
        async move {
            timeout(STEP, tls_connect_from(&connector, from, to, &host))
                .await
                .expect("TLS to the relay hung")
        }
    };
    assert!(
        direct(client(BALANCER)).await.is_err(),
        "the balancer sent no header"
    );
    fx.until_stats("the refusal counted", |s| s.failed_handshakes == 1)
        .await;
    let mut other = direct(client(2)).await.expect("127.0.0.2 is no balancer");
    assert!(echoes(&mut other, b"served").await);
    // The raw TCP port too: a trusted source without a header is reset.
    let (_, tcp_port) = tunnel.tcp_socket().unwrap();
    let tcp_addr = SocketAddr::new(client(1), tcp_port);
    let mut raw = connect_from(client(BALANCER), tcp_addr).await.unwrap();
    let _ = raw.write_all(b"no header here\r\n").await;
    assert!(ended(&mut raw).await);
    fx.until_stats("the raw refusal counted", |s| s.failed_handshakes == 2)
        .await;
}

/// A raw TCP tunnel behind HAProxy with `send-proxy-v2`: the relay takes the header
/// off and the service gets the client's bytes only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_tcp_port_behind_haproxy_reads_the_header_and_passes_the_rest() {
    let Some(binary) = Binary::require(Kind::Haproxy) else {
        return;
    };
    let fx = trusting_relay(|_| {}).await;
    let (_agent, tunnel) = echo_tunnel(&fx).await;
    let (_, tcp_port) = tunnel.tcp_socket().unwrap();
    let lb = balancer(&binary, SocketAddr::new(client(1), tcp_port), true).await;
    let tcp = connect_from(client(2), lb.addr(0)).await.unwrap();
    let message = common::pseudo_random(7, 50_000);
    let back = exchange(STEP, tcp, &message).await.unwrap();
    assert!(back == message, "{} bytes came back", back.len());
    assert_eq!(fx.stats().failed_handshakes, 0);
}

/// Agents behind HAProxy with `send-proxy-v2` on the agent endpoint: a full agent gets
/// its tunnel through it, and the sessions of one token are shared by the agents' own
/// addresses — at the token's limit, an agent from a new address ends the oldest
/// session of the address holding the most, instead of being refused as one more of
/// the balancer's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_through_a_balancer_count_by_their_own_address() {
    let Some(binary) = Binary::require(Kind::Haproxy) else {
        return;
    };
    let fx = trusting_relay(|config| config.max_agent_sessions = 3).await;
    let agent_addr = SocketAddr::new(client(1), fx.agent_port);
    let lb = balancer(&binary, agent_addr, true).await;

    let mut config = AgentConfig::new(format!("localhost:{}", lb.port(0)), fx.token.clone());
    config.relay_ca = Some(fx.pki.ca_cert_path.clone());
    let agent = timeout(STEP, Agent::connect(config))
        .await
        .expect("Agent::connect through the balancer hung")
        .expect("Agent::connect through the balancer failed");
    let tunnel = agent.forward(echo_service().await.port()).await.unwrap();
    let mut through = fx.tls_to(&tunnel).await.unwrap();
    assert!(echoes(&mut through, b"agent behind a balancer").await);

    // The agent above is 127.0.0.1's; 127.0.0.2 takes the token's two other sessions.
    let mut oldest = hello_through(&lb, &fx, client(2)).await.expect("welcomed");
    let _newer = hello_through(&lb, &fx, client(2)).await.expect("welcomed");
    // 127.0.0.2 holds the most: one more of its own is refused.
    let refused = hello_through(&lb, &fx, client(2)).await.err();
    assert_eq!(
        refused,
        Some(ErrorCode::limit_reached(Limit::AgentSessions))
    );
    // 127.0.0.3 holds none: it ends 127.0.0.2's oldest session.
    let newcomer = hello_through(&lb, &fx, client(3)).await;
    assert!(newcomer.is_ok(), "{:?}", newcomer.err());
    // Its link is closed (after any last frames): `drain` panics if it stays open.
    let _ = common::drain(&mut oldest, STEP).await;
    assert!(
        echoes(&mut through, b" still serves").await,
        "the first agent's session (127.0.0.1's) lives on"
    );
    let stats = fx.stats();
    println!(
        "agents through HAProxy send-proxy-v2: 127.0.0.2's third refused (LIMIT_REACHED), \
         127.0.0.3 welcomed, 127.0.0.2's oldest session ended; agent_sessions {}, \
         refused_by_limit {}, failed_handshakes {}",
        stats.agent_sessions, stats.refused_by_limit, stats.failed_handshakes
    );
    assert_eq!(stats.refused_by_limit, 1, "{stats:?}");
    assert_eq!(stats.failed_handshakes, 0, "{stats:?}");
}

/// TLS to the agent endpoint through `lb` from `from`, and a hello with `fx`'s token:
/// the link if welcomed, the refusal's code otherwise.
async fn hello_through(lb: &Proxy, fx: &Fixture, from: IpAddr) -> Result<ClientTls, ErrorCode> {
    let connector = fx.connector(&[]);
    let mut tls = timeout(
        STEP,
        tls_connect_from(&connector, from, lb.addr(0), "localhost"),
    )
    .await
    .expect("TLS through the balancer hung")
    .expect("TLS through the balancer failed");
    let hello = handshake::hello(fx.token.expose(), NEW_AGENT).unwrap();
    let answer = timeout(STEP, async {
        handshake::send(&mut tls, &hello).await.unwrap();
        handshake::read_answer(&mut tls).await
    })
    .await
    .expect("the relay did not answer the hello")
    .expect("the relay's answer is unreadable");
    answer.map(|_| tls).map_err(|refusal| refusal.code)
}

/// Through a balancer sending PROXY headers, the agent learns the client's own address
/// (`TunnelStream::peer_addr`), on the TLS port and on a raw TCP port alike.
async fn the_agent_sees_the_client_behind(kind: Kind) {
    let Some(binary) = Binary::require(kind) else {
        return;
    };
    let fx = trusting_relay(|_| {}).await;
    let agent = fx.agent().await;
    let mut listener = agent.listen(unencrypted()).await.unwrap();
    let host = listener.tunnel().tls_socket().0;
    let (_, tcp_port) = listener.tunnel().tcp_socket().unwrap();
    let tls_lb = balancer(&binary, fx.public, true).await;
    let raw_lb = balancer(&binary, SocketAddr::new(client(1), tcp_port), true).await;

    let connector = fx.connector(HTTP1);
    let _tls = timeout(
        STEP,
        tls_connect_from(&connector, client(2), tls_lb.addr(0), &host),
    )
    .await
    .expect("TLS through the balancer hung")
    .expect("TLS through the balancer failed");
    let _raw = connect_from(client(3), raw_lb.addr(0)).await.unwrap();
    let mut seen = Vec::new();
    for _ in 0..2 {
        let stream = timeout(STEP, listener.accept())
            .await
            .expect("no connection reached the agent")
            .unwrap();
        seen.push((stream.peer_addr().ip(), stream.info().edge().clone()));
    }
    println!("{kind:?}: the agent saw {seen:?}");
    let tls = seen
        .iter()
        .find(|(_, edge)| matches!(edge, Edge::Tls { .. }));
    let raw = seen.iter().find(|(_, edge)| matches!(edge, Edge::Tcp));
    assert_eq!(tls.map(|(ip, _)| *ip), Some(client(2)), "{seen:?}");
    assert_eq!(raw.map(|(ip, _)| *ip), Some(client(3)), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_sees_the_client_behind_haproxy() {
    the_agent_sees_the_client_behind(Kind::Haproxy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_sees_the_client_behind_nginx() {
    the_agent_sees_the_client_behind(Kind::Nginx).await;
}
