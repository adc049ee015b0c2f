//! A relay that restarts honours the leases it issued: the agent reconnects and its
//! URLs (hostname and raw TCP port) serve again.

mod common;

use std::time::Duration;

use common::{echo_service, echo_via_url, eventually, exchange, TempDir};

use portferry::agent::{Agent, AgentConfig, ForwardOptions};
use portferry::relay::{Relay, RelayConfig, LOCAL_DOMAIN};
use portferry::tls::LocalPki;
use portferry::token::Token;
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::TlsConnector;

const STEP: Duration = Duration::from_secs(20);

/// A relay on fixed ports keeping its leases in `state`; returns a way to stop it and
/// the task that ends once it has stopped (its ports are then free again).
async fn start_relay(
    pki: &LocalPki,
    token: &Token,
    state: &std::path::Path,
    ports: (u16, u16),
) -> (
    portferry::relay::RelayHandle,
    tokio::task::JoinHandle<()>,
    (u16, u16),
) {
    let mut config =
        RelayConfig::local(pki.identity.clone(), vec![token.clone()], ports.0, ports.1);
    config.lease_file = Some(state.join("leases"));
    config.shutdown_grace = Duration::from_millis(100);
    config.link.ping_interval = Duration::from_millis(200);
    config.link.idle_timeout = Duration::from_secs(1);
    let relay = Relay::bind(config).await.unwrap();
    let bound = (relay.agent_addr().port(), relay.public_tls_addr().port());
    let handle = relay.handle();
    (handle, tokio::spawn(relay.run()), bound)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_relay_gives_the_agent_its_urls_back() {
    let state = TempDir::new("restart");
    let pki = portferry::tls::local_pki(state.path(), LOCAL_DOMAIN).unwrap();
    let token = Token::generate();
    let tls = TlsConnector::from(portferry::tls::client_config(pki.roots(), &[b"http/1.1"]));
    let service = echo_service().await;

    let (first, first_run, ports) = start_relay(&pki, &token, state.path(), (0, 0)).await;
    let mut config = AgentConfig::new(format!("localhost:{}", ports.0), token.clone());
    config.relay_ca = Some(pki.ca_cert_path.clone());
    config.link.ping_interval = Duration::from_millis(200);
    config.link.idle_timeout = Duration::from_secs(1);
    let agent = Agent::connect(config).await.unwrap();
    let options = ForwardOptions {
        unencrypted: true,
        ..ForwardOptions::default()
    };
    let tunnel = agent.forward_with(service.port(), options).await.unwrap();
    let (_, tcp_port) = tunnel.tcp_socket().unwrap();
    assert_eq!(
        echo_via_url(&tls, &tunnel, b"before", STEP).await.unwrap(),
        b"before"
    );

    // The relay goes away entirely, mid-session.
    first.shutdown();
    timeout(STEP, first_run)
        .await
        .expect("the relay never stopped")
        .unwrap();
    assert!(echo_via_url(&tls, &tunnel, b"down", STEP).await.is_err());

    // A new relay process on the same ports and state.
    let (second, _second_run, _) = start_relay(&pki, &token, state.path(), ports).await;
    eventually(
        STEP,
        "the same URL serving again after the restart",
        || async {
            let echoed = echo_via_url(&tls, &tunnel, b"again", Duration::from_secs(2)).await;
            matches!(echoed, Ok(echoed) if echoed == b"again")
        },
    )
    .await;
    let raw = TcpStream::connect(("127.0.0.1", tcp_port)).await.unwrap();
    assert_eq!(exchange(STEP, raw, b"raw").await.unwrap(), b"raw");
    assert_eq!(second.tunnel_count(), 1);
}
