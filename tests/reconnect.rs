//! Link resilience over real loopback sockets and real TLS: an agent whose link to the
//! relay is cut, or silently stops carrying bytes, reconnects and keeps its URLs.
//!
//! A small proxy sits between agent and relay so the test can cut or freeze the link.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use portferry::agent::{Agent, AgentConfig, Tunnel, TunnelState};
use portferry::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::timeout;
use tokio_rustls::client::TlsStream;

mod common;

use common::{echo_service, echo_via_url, eventually, exchange, tls_connect, unencrypted, HTTP1};

/// Upper bound for any step: a hang fails the test.
const STEP: Duration = Duration::from_secs(20);

/// What the proxy does to the links that exist when it is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    None,
    /// Close both sides.
    Cut,
    /// Stop forwarding but keep both sockets open: a link that silently drops everything.
    Freeze,
}

/// One link through the proxy: the fault to apply, and the fault its task has applied
/// (its sender is dropped when the task ends).
struct ProxiedLink {
    fault: watch::Sender<Fault>,
    applied: watch::Receiver<Fault>,
}

/// Forwards agent links to the relay; new links are always forwarded normally.
struct LinkProxy {
    addr: SocketAddr,
    links: Arc<Mutex<Vec<ProxiedLink>>>,
    /// While set, new links are closed at once: the relay is unreachable.
    refusing: Arc<std::sync::atomic::AtomicBool>,
}

impl LinkProxy {
    async fn start(relay: SocketAddr) -> LinkProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let links: Arc<Mutex<Vec<ProxiedLink>>> = Arc::default();
        let refusing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (registry, refuse) = (links.clone(), refusing.clone());
        tokio::spawn(async move {
            while let Ok((mut agent_side, _)) = listener.accept().await {
                if refuse.load(std::sync::atomic::Ordering::SeqCst) {
                    continue;
                }
                let Ok(mut relay_side) = TcpStream::connect(relay).await else {
                    continue;
                };
                let (fault_tx, mut fault) = watch::channel(Fault::None);
                let (applied_tx, applied) = watch::channel(Fault::None);
                registry.lock().unwrap().push(ProxiedLink {
                    fault: fault_tx,
                    applied,
                });
                tokio::spawn(async move {
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut agent_side, &mut relay_side) => {}
                        _ = fault.wait_for(|f| *f != Fault::None) => {}
                    }
                    if *fault.borrow() == Fault::Freeze {
                        // Hold both sockets open, carrying nothing, until told to cut.
                        applied_tx.send_replace(Fault::Freeze);
                        let _ = fault.wait_for(|f| *f == Fault::Cut).await;
                    }
                    drop((agent_side, relay_side));
                    applied_tx.send_replace(Fault::Cut);
                });
            }
        });
        LinkProxy {
            addr,
            links,
            refusing,
        }
    }

    /// Makes the relay unreachable (or reachable again) for new links.
    fn refuse_new_links(&self, refuse: bool) {
        self.refusing
            .store(refuse, std::sync::atomic::Ordering::SeqCst);
    }

    /// Applies `fault` to every link open now, and waits until it has taken effect:
    /// a frozen link carries no byte more, a cut one is closed. Frozen links stay
    /// listed, for a cut later.
    async fn inflict(&self, fault: Fault) {
        let applying: Vec<watch::Receiver<Fault>> = {
            let mut links = self.links.lock().unwrap();
            for link in links.iter() {
                let _ = link.fault.send(fault);
            }
            let applying = links.iter().map(|link| link.applied.clone()).collect();
            if fault == Fault::Cut {
                links.clear();
            }
            applying
        };
        for mut applied in applying {
            // A link whose task has ended is closed already.
            let done = applied.wait_for(|applied| *applied == fault);
            let _ = timeout(STEP, done).await.expect("the proxy hung");
        }
    }
}

/// A relay, the proxy in front of its agent port, an agent connected through the
/// proxy, and a loopback echo service.
struct Fixture {
    agent: Agent,
    proxy: LinkProxy,
    relay: common::Fixture,
    service: SocketAddr,
}

/// A relay with a short lease grace, an agent with short heartbeats reaching it through
/// the proxy, and a loopback echo service.
async fn fixture(lease_grace: Duration) -> Fixture {
    fixture_with(lease_grace, |_| {}).await
}

/// [`fixture`], with the agent's configuration changed by `tweak`.
async fn fixture_with(lease_grace: Duration, tweak: impl FnOnce(&mut AgentConfig)) -> Fixture {
    let (mut relay, bound) = common::Fixture::bind(STEP, |config| {
        config.lease_grace = lease_grace;
        config.link.ping_interval = Duration::from_millis(200);
        config.link.idle_timeout = Duration::from_secs(1);
    })
    .await;
    let proxy = LinkProxy::start(bound.agent_addr()).await;
    relay.serve(bound);

    let mut config = relay.agent_config();
    config.relay = format!("localhost:{}", proxy.addr.port());
    config.ping_interval = Duration::from_millis(200);
    config.idle_timeout = Duration::from_secs(1);
    tweak(&mut config);
    Fixture {
        agent: timeout(STEP, Agent::connect(config))
            .await
            .expect("Agent::connect hung")
            .unwrap(),
        proxy,
        relay,
        service: echo_service().await,
    }
}

/// TLS to the tunnel's HTTPS URL (to the relay, SNI = hostname). Not bounded: callers
/// put it under a timeout.
async fn tls_to(fixture: &Fixture, tunnel: &Tunnel) -> std::io::Result<TlsStream<TcpStream>> {
    let (host, port) = tunnel.tls_socket();
    tls_connect(&fixture.relay.connector(HTTP1), ("127.0.0.1", port), &host).await
}

/// Whether `hostname` echoes within 2 s.
async fn routes_to(fixture: &Fixture, hostname: &str) -> bool {
    let echo = async {
        let tls = fixture.relay.connect_tls(hostname, HTTP1).await?;
        exchange(STEP, tls, b"x").await
    };
    matches!(timeout(Duration::from_secs(2), echo).await, Ok(Ok(_)))
}

/// Echoes `message` through the tunnel's HTTPS URL (TLS to the relay, SNI = hostname).
async fn echo_over_tls(
    fixture: &Fixture,
    tunnel: &Tunnel,
    message: &[u8],
) -> std::io::Result<Vec<u8>> {
    echo_via_url(&fixture.relay.connector(HTTP1), tunnel, message, STEP).await
}

/// Retries `echo_over_tls` until it works (the agent is reconnecting meanwhile).
async fn until_served(fixture: &Fixture, tunnel: &Tunnel) {
    timeout(STEP, async {
        loop {
            if let Ok(Ok(echoed)) = timeout(
                Duration::from_secs(2),
                echo_over_tls(fixture, tunnel, b"again"),
            )
            .await
            {
                assert_eq!(echoed, b"again");
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the tunnel's URL never served again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_link_reconnects_and_the_same_url_and_port_serve_again() {
    let fixture = fixture(Duration::from_secs(30)).await;
    let options = unencrypted();
    let tunnel = fixture
        .agent
        .forward_with(fixture.service.port(), options)
        .await
        .unwrap();
    let (_, tcp_port) = tunnel.tcp_socket().unwrap();
    assert_eq!(
        echo_over_tls(&fixture, &tunnel, b"before").await.unwrap(),
        b"before"
    );

    // A connection in flight when the link goes down fails fast instead of hanging.
    let mut in_flight = timeout(STEP, tls_to(&fixture, &tunnel))
        .await
        .unwrap()
        .unwrap();
    in_flight.write_all(b"ping").await.unwrap();
    let mut pong = [0u8; 4];
    in_flight.read_exact(&mut pong).await.unwrap();

    fixture.proxy.inflict(Fault::Cut).await;
    let mut rest = Vec::new();
    let ended = timeout(Duration::from_secs(5), in_flight.read_to_end(&mut rest)).await;
    assert!(
        ended.is_ok(),
        "an in-flight connection hung after the link was cut"
    );

    until_served(&fixture, &tunnel).await;
    // The raw TCP port is the same one, and works again too.
    let raw = TcpStream::connect(("127.0.0.1", tcp_port)).await.unwrap();
    assert_eq!(exchange(STEP, raw, b"raw").await.unwrap(), b"raw");
    assert!(fixture.agent.is_connected());
    // Each side counted the one reconnect: the agent its new link, the relay a session
    // resumed by its ticket and the lease it gave back.
    assert_eq!(fixture.agent.stats().reconnects, 1);
    let stats = fixture.relay.stats();
    assert_eq!((stats.sessions_resumed, stats.leases_reclaimed), (1, 1));
    assert_eq!(stats.tunnels_by_kind.tls_tcp, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_that_silently_stops_is_detected_and_replaced() {
    let fixture = fixture(Duration::from_secs(30)).await;
    let tunnel = fixture.agent.forward(fixture.service.port()).await.unwrap();
    assert_eq!(
        echo_over_tls(&fixture, &tunnel, b"before").await.unwrap(),
        b"before"
    );

    fixture.proxy.inflict(Fault::Freeze).await;
    // The heartbeats (idle timeout 1 s here, 15 s by default) notice, and the agent
    // reconnects on a fresh link; the frozen one is never closed by the network.
    eventually(STEP, "a link carrying nothing is detected", || async {
        !fixture.agent.is_connected()
    })
    .await;
    until_served(&fixture, &tunnel).await;
    fixture.proxy.inflict(Fault::Cut).await;
}

/// Cuts the agent's link and keeps it from coming back until the relay has let its
/// leases run out; new links are still refused when this returns.
async fn away_past_the_grace(fixture: &Fixture) {
    fixture.proxy.refuse_new_links(true);
    fixture.proxy.inflict(Fault::Cut).await;
    fixture
        .relay
        .until_stats("the lease to run out", |stats| stats.leases == 0)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_lease_moves_the_tunnel_and_its_handle_reports_the_new_url() {
    let fixture = fixture(Duration::from_millis(300)).await;
    let tunnel = fixture.agent.forward(fixture.service.port()).await.unwrap();
    let mut state = tunnel.state();
    let (old_url, old_host) = (tunnel.url(), tunnel.tls_socket().0);
    assert!(matches!(&*state.borrow(), TunnelState::Open(a) if a.url() == old_url));
    assert_eq!(
        echo_over_tls(&fixture, &tunnel, b"before").await.unwrap(),
        b"before"
    );

    // The agent loses its link and cannot get back before the lease runs out.
    away_past_the_grace(&fixture).await;
    assert!(
        !routes_to(&fixture, &old_host).await,
        "an expired lease still routes"
    );

    // Back online, the agent asks again; the relay no longer holds that hostname, so
    // it gives a new one: the watch fires, and the handle says where the tunnel is.
    fixture.proxy.refuse_new_links(false);
    let moved_to = common::until_moved(&mut state, STEP).await;
    let new_url = tunnel.url();
    println!("moved: {old_url} -> {new_url}");
    assert_eq!(new_url, moved_to.url());
    assert_ne!(new_url, old_url);
    assert_eq!(tunnel.tls_socket().0, moved_to.tls_socket().0);
    assert_eq!(tunnel.address(), moved_to);
    // The new URL serves; the old one stays dead, never handed out again.
    assert_eq!(
        echo_over_tls(&fixture, &tunnel, b"after").await.unwrap(),
        b"after"
    );
    assert!(
        !routes_to(&fixture, &old_host).await,
        "an expired hostname was handed out again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn portferry_forward_prints_the_new_url_when_its_tunnel_moves() {
    let fixture = fixture(Duration::from_millis(300)).await;
    let config = fixture.relay.agent_config();
    let port = fixture.service.port().to_string();
    let mut command = common::portferry(["forward", &port]);
    command
        .env(
            "PORTFERRY_RELAY",
            format!("localhost:{}", fixture.proxy.addr.port()),
        )
        .env("PORTFERRY_TOKEN", config.token.expose())
        .env("PORTFERRY_RELAY_CA", config.relay_ca.unwrap());
    let mut forward = common::StdoutLines::spawn(command);
    let old_url = forward.next("url:", STEP).await;
    forward.next("forwarding", STEP).await;

    away_past_the_grace(&fixture).await;
    fixture.proxy.refuse_new_links(false);

    let moved = forward.next("moved:", STEP).await;
    assert!(moved.contains(&format!("port {port}")), "{moved}");
    let new_url = forward.next("url:", STEP).await;
    println!("portferry forward: moved: {moved}\n  {old_url} -> {new_url}");
    assert_ne!(new_url, old_url);
    let host = |url: &str| {
        let authority = url.strip_prefix("https://").unwrap();
        authority.split(':').next().unwrap().to_owned()
    };
    assert!(
        routes_to(&fixture, &host(&new_url)).await,
        "the printed new URL does not serve"
    );
    assert!(!routes_to(&fixture, &host(&old_url)).await);
}

/// Polls `call` once; whether it is still waiting.
async fn still_pending<F: std::future::Future + Unpin>(call: &mut F) -> bool {
    std::future::poll_fn(|cx| {
        std::task::Poll::Ready(std::pin::Pin::new(&mut *call).poll(cx).is_pending())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forward_or_close_in_flight_when_the_link_drops_fails_at_once() {
    // Requests may wait an hour for the relay's answer, and heartbeats notice a silent
    // link only after a minute: within a step, only the link's loss can end them.
    let fixture = fixture_with(Duration::from_secs(30), |config| {
        config.request_timeout = Duration::from_secs(3600);
        config.idle_timeout = Duration::from_secs(60);
    })
    .await;
    let open = fixture.agent.forward(fixture.service.port()).await.unwrap();

    // The relay hears nothing more: both calls are sent and wait for its answer.
    fixture.proxy.inflict(Fault::Freeze).await;
    let forward = fixture.agent.forward(common::free_port());
    let close = open.close();
    tokio::pin!(forward, close);
    assert!(
        still_pending(&mut forward).await,
        "forward() did not wait for the relay"
    );
    assert!(
        still_pending(&mut close).await,
        "close() did not wait for the relay"
    );

    // The link is lost, and no new one comes: nothing but the loss itself can answer.
    fixture.proxy.refuse_new_links(true);
    fixture.proxy.inflict(Fault::Cut).await;
    let (forwarded, closed) = timeout(STEP, async { tokio::join!(forward, close) })
        .await
        .expect("a call in flight waited for its deadline after the link was lost");
    assert!(!fixture.agent.is_connected());
    assert!(matches!(forwarded, Err(Error::LinkClosed)), "{forwarded:?}");
    assert!(matches!(closed, Err(Error::LinkClosed)), "{closed:?}");
}

/// A relay on `agent_port` (0: any) that accepts only `token`, with `pki`'s certificate;
/// its handle, the task serving it, and the agent port it got.
async fn relay_accepting(
    pki: &portferry::tls::LocalPki,
    token: portferry::Token,
    agent_port: u16,
) -> (
    portferry::relay::RelayHandle,
    tokio::task::JoinHandle<()>,
    u16,
) {
    let mut config =
        portferry::relay::RelayConfig::local(pki.identity.clone(), vec![token], agent_port, 0);
    config.shutdown_grace = Duration::from_millis(100);
    let relay = portferry::relay::Relay::bind(config).await.unwrap();
    let port = relay.agent_addr().port();
    (relay.handle(), tokio::spawn(relay.run()), port)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_refused_on_reconnect_says_it_gave_up() {
    use portferry::{LinkState, Token};
    let state = common::TempDir::new("gave-up");
    let pki = portferry::tls::local_pki(state.path(), portferry::relay::LOCAL_DOMAIN).unwrap();
    let token = Token::generate();
    let (first, first_run, port) = relay_accepting(&pki, token.clone(), 0).await;
    let config =
        AgentConfig::new(format!("localhost:{port}"), token).with_relay_ca(&pki.ca_cert_path);
    let agent = timeout(STEP, Agent::connect(config))
        .await
        .unwrap()
        .unwrap();
    let mut states = agent.link_state();
    assert!(matches!(*states.borrow(), LinkState::Connected));

    // The relay goes away: the agent says it is reconnecting.
    first.shutdown();
    timeout(STEP, first_run).await.unwrap().unwrap();
    timeout(
        STEP,
        states.wait_for(|s| matches!(s, LinkState::Reconnecting)),
    )
    .await
    .expect("never reported reconnecting")
    .unwrap();

    // It comes back on the same port, refusing the agent's token: the agent gives up,
    // and says why.
    let (_second, _second_run, _) = relay_accepting(&pki, Token::generate(), port).await;
    let reason = timeout(STEP, agent.gave_up())
        .await
        .expect("the agent never gave up");
    assert!(matches!(*reason, Error::Unauthorized), "{reason:?}");
    assert!(matches!(*agent.link_state().borrow(), LinkState::GaveUp(_)));
    assert!(!agent.is_connected());
    // Asking it for a tunnel now says why it cannot.
    let refused = timeout(STEP, agent.forward(common::free_port()))
        .await
        .unwrap();
    assert!(matches!(refused, Err(Error::Unauthorized)), "{refused:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_refused_at_a_limit_on_reconnect_says_so_and_keeps_trying() {
    use portferry::wire::handshake;
    use portferry::{AgentConfig, Error, Limit, LinkState, Token};
    let state = common::TempDir::new("refused");
    let pki = portferry::tls::local_pki(state.path(), portferry::relay::LOCAL_DOMAIN).unwrap();
    let token = Token::generate();
    let (first, first_run, port) = relay_accepting(&pki, token.clone(), 0).await;
    let config = AgentConfig::new(format!("localhost:{port}"), token.clone())
        .with_relay_ca(&pki.ca_cert_path);
    let agent = timeout(STEP, Agent::connect(config))
        .await
        .unwrap()
        .unwrap();
    let mut states = agent.link_state();
    first.shutdown();
    timeout(STEP, first_run).await.unwrap().unwrap();

    // The relay comes back with one session, which another agent of the token takes
    // before the relay accepts anything on its port.
    let mut config =
        portferry::relay::RelayConfig::local(pki.identity.clone(), vec![token.clone()], port, 0);
    config.max_agent_sessions = 1;
    let relay = portferry::relay::Relay::bind(config).await.unwrap();
    let (mut other, served) = tokio::io::duplex(4096);
    let serving = tokio::spawn(relay.handle().serve_agent_stream(served));
    let hello = handshake::hello(token.expose(), &[]).unwrap();
    handshake::send(&mut other, &hello).await.unwrap();
    let welcome = timeout(STEP, handshake::read_answer(&mut other))
        .await
        .unwrap();
    assert!(matches!(welcome, Ok(Ok(_))), "{welcome:?}");
    let _run = tokio::spawn(relay.run());

    // The agent is refused at the limit: it says so, and keeps trying.
    timeout(
        STEP,
        states.wait_for(|s| matches!(s, LinkState::Refused(_))),
    )
    .await
    .expect("never reported the refusal")
    .unwrap();
    let refused = match &*agent.link_state().borrow() {
        LinkState::Refused(reason) => reason.clone(),
        other => panic!("{other:?}"),
    };
    assert!(
        matches!(
            *refused,
            Error::LimitReached {
                limit: Limit::AgentSessions,
                ..
            }
        ),
        "{refused:?}"
    );
    // Once the other agent leaves, it gets its link back.
    drop(other);
    timeout(STEP, serving).await.unwrap().unwrap();
    timeout(STEP, states.wait_for(|s| matches!(s, LinkState::Connected)))
        .await
        .expect("never reconnected")
        .unwrap();
}
