//! Link resilience over real loopback sockets and real TLS: an agent whose link to the
//! relay is cut, or silently stops carrying bytes, reconnects and keeps its URLs.
//!
//! A small proxy sits between agent and relay so the test can cut or freeze the link.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use portferry::agent::{Agent, AgentConfig, ForwardOptions, Tunnel};
use portferry::relay::{Relay, RelayConfig, LOCAL_DOMAIN};
use portferry::token::Token;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::timeout;
use tokio_rustls::TlsConnector;

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

/// Forwards agent links to the relay; new links are always forwarded normally.
struct LinkProxy {
    addr: SocketAddr,
    links: Arc<Mutex<Vec<watch::Sender<Fault>>>>,
    /// While set, new links are closed at once: the relay is unreachable.
    refusing: Arc<std::sync::atomic::AtomicBool>,
}

impl LinkProxy {
    async fn start(relay: SocketAddr) -> LinkProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let links: Arc<Mutex<Vec<watch::Sender<Fault>>>> = Arc::default();
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
                registry.lock().unwrap().push(fault_tx);
                tokio::spawn(async move {
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut agent_side, &mut relay_side) => {}
                        _ = fault.wait_for(|f| *f != Fault::None) => {}
                    }
                    if *fault.borrow() == Fault::Freeze {
                        // Hold both sockets open, carrying nothing, until told to cut.
                        let _ = fault.wait_for(|f| *f == Fault::Cut).await;
                    }
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

    /// Applies `fault` to every link open now.
    fn inflict(&self, fault: Fault) {
        for link in self.links.lock().unwrap().drain(..) {
            let _ = link.send(fault);
        }
    }
}

struct Fixture {
    agent: Agent,
    proxy: LinkProxy,
    tls: TlsConnector,
    service: SocketAddr,
    _state: TempDir,
}

struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A relay with a short lease grace, an agent with short heartbeats reaching it through
/// the proxy, and a loopback echo service.
async fn fixture(lease_grace: Duration) -> Fixture {
    let state = TempDir(
        std::env::temp_dir().join(format!("portferry-reconnect-{}", rand::random::<u64>())),
    );
    let pki = portferry::tls::local_pki(&state.0, LOCAL_DOMAIN).unwrap();
    let token = Token::generate();
    let mut relay_config = RelayConfig::local(pki.identity.clone(), vec![token.clone()], 0, 0);
    relay_config.lease_grace = lease_grace;
    relay_config.link.ping_interval = Duration::from_millis(200);
    relay_config.link.idle_timeout = Duration::from_secs(1);
    let relay = Relay::bind(relay_config).await.unwrap();
    let proxy = LinkProxy::start(relay.agent_addr()).await;
    tokio::spawn(relay.run());

    let mut config = AgentConfig::new(format!("localhost:{}", proxy.addr.port()), token);
    config.relay_ca = Some(pki.ca_cert_path.clone());
    config.link.ping_interval = Duration::from_millis(200);
    config.link.idle_timeout = Duration::from_secs(1);
    Fixture {
        agent: Agent::connect(config).await.unwrap(),
        proxy,
        tls: TlsConnector::from(portferry::tls::client_config(pki.roots(), &[b"http/1.1"])),
        service: echo_service().await,
        _state: state,
    }
}

async fn echo_service() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut reader, mut writer) = stream.split();
                let _ = tokio::io::copy(&mut reader, &mut writer).await;
            });
        }
    });
    addr
}

/// Echoes `message` through the tunnel's HTTPS URL (TLS to the relay, SNI = hostname).
async fn echo_over_tls(
    fixture: &Fixture,
    tunnel: &Tunnel,
    message: &[u8],
) -> std::io::Result<Vec<u8>> {
    let (host, port) = tunnel.tls_socket();
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    let mut tls = fixture
        .tls
        .connect(ServerName::try_from(host.to_owned()).unwrap(), tcp)
        .await?;
    tls.write_all(message).await?;
    let mut echoed = vec![0u8; message.len()];
    tls.read_exact(&mut echoed).await?;
    Ok(echoed)
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
    let options = ForwardOptions {
        unencrypted: true,
        ..ForwardOptions::default()
    };
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
    let (host, port) = tunnel.tls_socket();
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut in_flight = fixture
        .tls
        .connect(ServerName::try_from(host.to_owned()).unwrap(), tcp)
        .await
        .unwrap();
    in_flight.write_all(b"ping").await.unwrap();
    let mut pong = [0u8; 4];
    in_flight.read_exact(&mut pong).await.unwrap();

    fixture.proxy.inflict(Fault::Cut);
    let mut rest = Vec::new();
    let ended = timeout(Duration::from_secs(5), in_flight.read_to_end(&mut rest)).await;
    assert!(
        ended.is_ok(),
        "an in-flight connection hung after the link was cut"
    );

    until_served(&fixture, &tunnel).await;
    // The raw TCP port is the same one, and works again too.
    let mut raw = TcpStream::connect(("127.0.0.1", tcp_port)).await.unwrap();
    raw.write_all(b"raw").await.unwrap();
    let mut echoed = [0u8; 3];
    timeout(STEP, raw.read_exact(&mut echoed))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&echoed, b"raw");
    assert!(fixture.agent.is_connected());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_that_silently_stops_is_detected_and_replaced() {
    let fixture = fixture(Duration::from_secs(30)).await;
    let tunnel = fixture.agent.forward(fixture.service.port()).await.unwrap();
    assert_eq!(
        echo_over_tls(&fixture, &tunnel, b"before").await.unwrap(),
        b"before"
    );

    fixture.proxy.inflict(Fault::Freeze);
    // The heartbeats (idle timeout 1 s here, 15 s by default) notice, and the agent
    // reconnects on a fresh link; the frozen one is never closed by the network.
    timeout(STEP, async {
        while fixture.agent.is_connected() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("a link carrying nothing was never detected");
    until_served(&fixture, &tunnel).await;
    fixture.proxy.inflict(Fault::Cut);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_lease_stops_routing_and_is_never_given_to_anyone_else() {
    let fixture = fixture(Duration::from_millis(300)).await;
    let tunnel = fixture.agent.forward(fixture.service.port()).await.unwrap();
    assert_eq!(
        echo_over_tls(&fixture, &tunnel, b"before").await.unwrap(),
        b"before"
    );

    // The agent loses its link and cannot get back before the lease runs out.
    fixture.proxy.refuse_new_links(true);
    fixture.proxy.inflict(Fault::Cut);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let old_url = timeout(
        Duration::from_secs(2),
        echo_over_tls(&fixture, &tunnel, b"x"),
    )
    .await;
    assert!(
        !matches!(old_url, Ok(Ok(_))),
        "an expired lease still routes"
    );

    // Back online, the agent asks again; the relay no longer holds that hostname, so
    // it gets a new one and the old one stays dead.
    fixture.proxy.refuse_new_links(false);
    timeout(STEP, async {
        while !fixture.agent.is_connected() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("never reconnected");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let old_url = timeout(
        Duration::from_secs(2),
        echo_over_tls(&fixture, &tunnel, b"x"),
    )
    .await;
    assert!(
        !matches!(old_url, Ok(Ok(_))),
        "an expired hostname was handed out again"
    );
}
