//! Tunnel leases on a real relay: bounded per token and per relay, saved where the
//! README's production command keeps them (a state directory nobody created), privately,
//! and given back after a restart.

mod common;

use std::io::BufRead;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::{
    echo_service, echo_via_url, eventually, exchange, free_port, portferry, Child, Fixture,
    TempDir, HTTP1,
};

use portferry::agent::{Agent, AgentConfig, ForwardOptions};
use portferry::relay::LOCAL_DOMAIN;
use portferry::token::Token;
use portferry::wire::ErrorCode;
use portferry::Error;
use tokio::time::timeout;
use tokio_rustls::TlsConnector;

const STEP: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leases_are_bounded_per_token_refused_with_a_code_and_counted() {
    let fx = Fixture::start_with(STEP, |config| {
        config.max_leases_per_token = 3;
    })
    .await;
    let (first, second) = (fx.agent().await, fx.agent().await);
    let _a = first.forward(1001).await.unwrap();
    let _b = first.forward(1002).await.unwrap();
    let _c = second.forward(1001).await.unwrap();
    let refused = second.forward(1002).await.unwrap_err();
    assert!(
        matches!(&refused, Error::Refused { code, message } if *code == ErrorCode::LIMIT_REACHED && message.contains("max_leases_per_token")),
        "{refused:?}"
    );
    let stats = fx.stats();
    assert_eq!(
        (stats.leases, stats.tunnels, stats.refused_by_limit),
        (3, 3, 1)
    );
    // A lease given up makes room.
    drop(_a);
    eventually(STEP, "the closed tunnel's lease to end", || async {
        fx.stats().leases == 2
    })
    .await;
    second.forward(1002).await.unwrap();
}

/// `portferry relay` as the README runs it in production (`--cert --key --tokens-file`,
/// no `--state-dir`), with `$XDG_STATE_HOME` at `xdg`, which does not exist yet.
fn production_relay(xdg: &Path, pki: &Path, tokens: &Path, ports: (u16, u16)) -> Child {
    let mut process = Child(
        portferry(["relay", "--domain", LOCAL_DOMAIN])
            .arg("--public-addr")
            .arg(format!("127.0.0.1:{}", ports.1))
            .arg("--agent-addr")
            .arg(format!("127.0.0.1:{}", ports.0))
            .args(["--tcp-bind", "127.0.0.1", "--tcp-ports", "20000-29999"])
            .arg("--cert")
            .arg(pki.join("server.pem"))
            .arg("--key")
            .arg(pki.join("server-key.pem"))
            .arg("--tokens-file")
            .arg(tokens)
            .env("XDG_STATE_HOME", xdg)
            .env_remove("HOME")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let stdout = std::io::BufReader::new(process.0.stdout.take().unwrap());
    let ready = stdout
        .lines()
        .map_while(Result::ok)
        .any(|line| line.starts_with("export PORTFERRY_RELAY="));
    assert!(ready, "the relay exited before it was ready");
    process
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_production_command_saves_leases_privately_and_gives_them_back_after_a_restart() {
    use std::os::unix::fs::PermissionsExt;
    let scratch = TempDir::new("leases-prod");
    let pki_dir = scratch.path().join("pki");
    let pki = portferry::tls::local_pki(&pki_dir, LOCAL_DOMAIN).unwrap();
    let tokens = scratch.path().join("tokens");
    let token = Token::generate();
    std::fs::write(&tokens, format!("{}\n", token.expose())).unwrap();
    let xdg = scratch.path().join("xdg");
    let leases = xdg.join("portferry/leases");
    let ports = (free_port(), free_port());

    let relay = production_relay(&xdg, &pki_dir, &tokens, ports);
    let mut config = AgentConfig::new(format!("localhost:{}", ports.0), token);
    config.relay_ca = Some(pki.ca_cert_path.clone());
    let agent = timeout(STEP, Agent::connect(config))
        .await
        .unwrap()
        .unwrap();
    let service = echo_service().await;
    let options = ForwardOptions {
        unencrypted: true,
        ..ForwardOptions::default()
    };
    let tunnel = agent.forward_with(service.port(), options).await.unwrap();
    let (host, _) = tunnel.tls_socket();
    eventually(STEP, "the lease saved in the state directory", || async {
        std::fs::read_to_string(&leases).is_ok_and(|saved| saved.contains(host))
    })
    .await;
    let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&leases), 0o600);
    assert_eq!(mode(leases.parent().unwrap()), 0o700);

    // Killed: nothing is written on the way out. The restarted relay reads the file.
    drop(relay);
    let _restarted = production_relay(&xdg, &pki_dir, &tokens, ports);
    let (_, tcp_port) = tunnel.tcp_socket().unwrap();
    eventually(STEP, "the raw TCP port serving again", || async {
        let Ok(raw) = tokio::net::TcpStream::connect(("127.0.0.1", tcp_port)).await else {
            return false;
        };
        matches!(exchange(Duration::from_secs(2), raw, b"raw").await, Ok(echoed) if echoed == b"raw")
    })
    .await;
    let tls = TlsConnector::from(portferry::tls::client_config(pki.roots(), HTTP1));
    let echoed = echo_via_url(&tls, &tunnel, b"again", STEP).await.unwrap();
    assert_eq!(echoed, b"again");
}
