//! A relay that restarts honours the leases it issued: the agent reconnects and its
//! URLs (hostname and raw TCP port) serve again.

use std::net::SocketAddr;
use std::time::Duration;

use portferry::agent::{Agent, AgentConfig, ForwardOptions, Tunnel};
use portferry::relay::{Relay, RelayConfig, LOCAL_DOMAIN};
use portferry::tls::LocalPki;
use portferry::token::Token;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use tokio_rustls::TlsConnector;

const STEP: Duration = Duration::from_secs(20);

struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

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

async fn echo_over_tls(
    tls: &TlsConnector,
    tunnel: &Tunnel,
    message: &[u8],
) -> std::io::Result<Vec<u8>> {
    let (host, port) = tunnel.tls_socket();
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    let mut stream = tls
        .connect(ServerName::try_from(host.to_owned()).unwrap(), tcp)
        .await?;
    stream.write_all(message).await?;
    let mut echoed = vec![0u8; message.len()];
    stream.read_exact(&mut echoed).await?;
    Ok(echoed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_relay_gives_the_agent_its_urls_back() {
    let state =
        TempDir(std::env::temp_dir().join(format!("portferry-restart-{}", rand::random::<u64>())));
    let pki = portferry::tls::local_pki(&state.0, LOCAL_DOMAIN).unwrap();
    let token = Token::generate();
    let tls = TlsConnector::from(portferry::tls::client_config(pki.roots(), &[b"http/1.1"]));
    let service = echo_service().await;

    let (first, first_run, ports) = start_relay(&pki, &token, &state.0, (0, 0)).await;
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
        echo_over_tls(&tls, &tunnel, b"before").await.unwrap(),
        b"before"
    );

    // The relay goes away entirely, mid-session.
    first.shutdown();
    timeout(STEP, first_run)
        .await
        .expect("the relay never stopped")
        .unwrap();
    assert!(echo_over_tls(&tls, &tunnel, b"down").await.is_err());

    // A new relay process on the same ports and state.
    let (second, _second_run, _) = start_relay(&pki, &token, &state.0, ports).await;
    timeout(STEP, async {
        loop {
            if let Ok(Ok(echoed)) = timeout(
                Duration::from_secs(2),
                echo_over_tls(&tls, &tunnel, b"again"),
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
    .expect("the same URL never served again after the restart");
    let mut raw = TcpStream::connect(("127.0.0.1", tcp_port)).await.unwrap();
    raw.write_all(b"raw").await.unwrap();
    let mut echoed = [0u8; 3];
    timeout(STEP, raw.read_exact(&mut echoed))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&echoed, b"raw");
    assert_eq!(second.tunnel_count(), 1);
}
