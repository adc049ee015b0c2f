//! A relay that restarts honours the leases it issued: the agent reconnects and its
//! URLs (hostname and raw TCP port) serve again, whether the relay shut down gracefully
//! or was killed in the middle of a transfer.

mod common;

use std::time::Duration;

use common::{
    drain, echo_service, echo_via_url, eventually, exchange, free_port, portferry, read_stream,
    stream_service, tls_connect, unencrypted, Child, TempDir, HTTP1,
};

use portferry::agent::{Agent, AgentConfig, ForwardOptions};
use portferry::relay::{Relay, RelayConfig, LOCAL_DOMAIN};
use portferry::tls::LocalPki;
use portferry::token::Token;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::Ordering;

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
    config.ping_interval = Duration::from_millis(200);
    config.idle_timeout = Duration::from_secs(1);
    let agent = Agent::connect(config).await.unwrap();
    let options = ForwardOptions::new().unencrypted(true);
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
    // The new relay counted the lease it read from the file, the agent that came back
    // by its ticket, and the lease it gave back to it.
    let stats = second.stats();
    assert_eq!(stats.leases_restored, 1);
    assert_eq!((stats.sessions_resumed, stats.leases_reclaimed), (1, 1));
}

/// A `portferry relay` process on fixed loopback ports, keeping its CA, token and
/// leases in a state directory; killed when dropped.
struct CliRelay {
    process: Child,
    /// `PORTFERRY_RELAY`, `PORTFERRY_TOKEN` and `PORTFERRY_RELAY_CA`, as it printed them.
    relay: String,
    token: String,
    ca: PathBuf,
}

impl CliRelay {
    /// Starts the relay with its CA and token generated in `state` and waits, at most
    /// [`STEP`], until it says it is ready.
    async fn start(state: &Path, agent_port: u16, public_port: u16) -> CliRelay {
        let (process, printed) =
            start_printing(state, agent_port, public_port, &[], "PORTFERRY_RELAY_CA").await;
        let value = |name: &str| {
            printed
                .iter()
                .find(|(printed, _)| printed == name)
                .unwrap_or_else(|| panic!("the relay did not print {name}: {printed:?}"))
                .1
                .clone()
        };
        CliRelay {
            relay: value("PORTFERRY_RELAY"),
            token: value("PORTFERRY_TOKEN"),
            ca: PathBuf::from(value("PORTFERRY_RELAY_CA")),
            process,
        }
    }

    /// SIGKILL: the relay dies at once, without closing anything itself.
    fn kill(mut self) {
        self.process.0.kill().unwrap();
        self.process.0.wait().unwrap();
    }
}

/// Starts `portferry relay` on fixed loopback ports with `state` and `extra` flags; waits,
/// at most [`STEP`], until it has printed the variable `last`, and returns what it
/// printed (`NAME=value` lines).
async fn start_printing(
    state: &Path,
    agent_port: u16,
    public_port: u16,
    extra: &[&std::ffi::OsStr],
    last: &'static str,
) -> (Child, Vec<(String, String)>) {
    let mut process = Child(
        portferry(["relay", "--agent-addr"])
            .arg(format!("127.0.0.1:{agent_port}"))
            .arg("--public-addr")
            .arg(format!("127.0.0.1:{public_port}"))
            .arg("--state-dir")
            .arg(state)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let stdout = process.0.stdout.take().unwrap();
    // Ends at the last line it needs, or when the process dies.
    let ready = tokio::task::spawn_blocking(move || {
        let mut printed = Vec::new();
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let line = line.trim();
            if let Some((name, value)) = line.split_once('=') {
                printed.push((name.to_owned(), value.to_owned()));
                if name == last {
                    break;
                }
            }
        }
        printed
    });
    let printed = timeout(STEP, ready)
        .await
        .expect("the relay never said it was ready")
        .unwrap();
    (process, printed)
}

/// Bytes each connection of the streaming service carries: enough that a transfer is
/// still running when the relay dies.
const STREAM_LEN: u64 = 256 * 1024 * 1024;
/// How soon a transfer cut by the relay's death must fail.
const FAIL_FAST: Duration = Duration::from_secs(5);

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_mid_transfer_fails_the_transfer_fast_and_serves_the_same_urls_once_restarted(
) {
    let state = TempDir::new("restart-kill");
    let (agent_port, public_port) = (free_port(), free_port());
    let relay = CliRelay::start(state.path(), agent_port, public_port).await;
    let mut config = AgentConfig::new(relay.relay.clone(), Token::new(relay.token.clone()));
    config.relay_ca = Some(relay.ca.clone());
    let agent = timeout(STEP, Agent::connect(config))
        .await
        .expect("Agent::connect hung")
        .unwrap();
    let service = stream_service(STREAM_LEN).await;
    let tunnel = agent
        .forward_with(service.addr.port(), unencrypted())
        .await
        .unwrap();
    let host = tunnel.tls_socket().0.to_owned();
    let (_, tcp_port) = tunnel.tcp_socket().unwrap();
    let roots = portferry::tls::load_ca_roots(&relay.ca).unwrap();
    let tls = TlsConnector::from(portferry::tls::client_config(roots, HTTP1));

    // Two downloads in flight, through the URL and through the raw TCP port.
    let mut over_tls = timeout(STEP, tls_connect(&tls, ("127.0.0.1", public_port), &host))
        .await
        .unwrap()
        .unwrap();
    let mut over_tcp = TcpStream::connect(("127.0.0.1", tcp_port)).await.unwrap();
    for stream in [
        &mut over_tls as &mut (dyn tokio::io::AsyncRead + Unpin),
        &mut over_tcp,
    ] {
        timeout(STEP, read_stream(stream, 1024 * 1024))
            .await
            .unwrap()
            .unwrap();
    }

    let token = relay.token.clone();
    relay.kill();

    // Both fail fast. The TLS one fails as an error, never as a clean end of a
    // truncated download (the relay's process could not say close_notify).
    let (read, ended) = drain(&mut over_tls, FAIL_FAST).await;
    assert!(
        ended.is_err(),
        "a TLS download cut by the relay's death ended cleanly after {read} bytes"
    );
    let (read, _) = drain(&mut over_tcp, FAIL_FAST).await;
    assert!(read < STREAM_LEN);
    // The agent resets its side of them too: the service is not left writing into a
    // connection nobody will read.
    eventually(FAIL_FAST, "the service's connections ended", || async {
        (0..service.accepted()).all(|i| service.connection(i).ended.load(Ordering::Relaxed))
    })
    .await;

    // The relay comes back on the same ports and state; the agent, still running,
    // reconnects and gets its URL and raw TCP port back.
    let restarted = CliRelay::start(state.path(), agent_port, public_port).await;
    assert_eq!(restarted.token, token);
    eventually(STEP, "the same URL serving again", || async {
        let download = async {
            let mut stream = tls_connect(&tls, ("127.0.0.1", public_port), &host).await?;
            read_stream(&mut stream, 256 * 1024).await
        };
        matches!(timeout(Duration::from_secs(2), download).await, Ok(Ok(())))
    })
    .await;
    let mut raw = TcpStream::connect(("127.0.0.1", tcp_port)).await.unwrap();
    timeout(STEP, read_stream(&mut raw, 256 * 1024))
        .await
        .unwrap()
        .unwrap();
    assert!(agent.is_connected());
}

/// The README's production command (`--cert --key --tokens-file`) with a state
/// directory that does not exist yet: the relay creates it private, saves each lease
/// there (mode 0600), and a restarted relay gives the agent its URL back.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_production_command_keeps_leases_privately_across_a_kill() {
    use std::os::unix::fs::PermissionsExt;

    let files = TempDir::new("restart-prod-files");
    // A certificate from elsewhere, as an operator's would be.
    let pki = portferry::tls::local_pki(&files.path().join("pki"), LOCAL_DOMAIN).unwrap();
    let token = Token::generate();
    let tokens = files.path().join("tokens");
    std::fs::write(&tokens, format!("# agents\n{}\n", token.expose())).unwrap();
    let state = files.path().join("var/lib/portferry");
    let pki_dir = pki.ca_cert_path.parent().unwrap();
    let (cert, key) = (pki_dir.join("server.pem"), pki_dir.join("server-key.pem"));
    let flags = [
        "--cert".as_ref(),
        cert.as_os_str(),
        "--key".as_ref(),
        key.as_os_str(),
        "--tokens-file".as_ref(),
        tokens.as_os_str(),
    ];
    let (agent_port, public_port) = (free_port(), free_port());
    let (relay, _) =
        start_printing(&state, agent_port, public_port, &flags, "PORTFERRY_RELAY").await;
    let mode = |path: &Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
    // Made private at start, before anything is saved in it.
    assert_eq!(mode(&state), 0o700);

    let mut config = AgentConfig::new(format!("localhost:{agent_port}"), token.clone());
    config.relay_ca = Some(pki.ca_cert_path.clone());
    let agent = timeout(STEP, Agent::connect(config))
        .await
        .expect("Agent::connect hung")
        .unwrap();
    let service = echo_service().await;
    let tunnel = agent.forward(service.port()).await.unwrap();
    let host = tunnel.tls_socket().0.to_owned();

    let leases = state.join("leases");
    eventually(STEP, "the lease saved in the state directory", || async {
        std::fs::read_to_string(&leases).is_ok_and(|text| text.contains(&host))
    })
    .await;
    assert_eq!(mode(&state), 0o700);
    assert_eq!(mode(&leases), 0o600);

    let mut relay = relay;
    relay.0.kill().unwrap();
    relay.0.wait().unwrap();
    let (_restarted, _) =
        start_printing(&state, agent_port, public_port, &flags, "PORTFERRY_RELAY").await;
    let tls = TlsConnector::from(portferry::tls::client_config(pki.roots(), HTTP1));
    eventually(STEP, "the same URL serving again", || async {
        let echoed = echo_via_url(&tls, &tunnel, b"again", Duration::from_secs(2)).await;
        matches!(echoed, Ok(echoed) if echoed == b"again")
    })
    .await;
    assert_eq!(tunnel.tls_socket().0, host);
}

/// An agent process killed mid-download: the HTTPS client's read fails; it never sees
/// a clean end (close_notify) of the truncated data.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_mid_download_is_an_error_for_the_https_client() {
    let state = TempDir::new("restart-agent-kill");
    let (agent_port, public_port) = (free_port(), free_port());
    let relay = CliRelay::start(state.path(), agent_port, public_port).await;
    let service = stream_service(STREAM_LEN).await;
    let mut agent = Child(
        portferry(["forward", &service.addr.port().to_string()])
            .env("PORTFERRY_RELAY", &relay.relay)
            .env("PORTFERRY_TOKEN", &relay.token)
            .env("PORTFERRY_RELAY_CA", &relay.ca)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let stdout = agent.0.stdout.take().unwrap();
    let host = timeout(
        STEP,
        tokio::task::spawn_blocking(move || {
            std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .find_map(|line| {
                    let url = line.trim().strip_prefix("url:")?.trim().to_owned();
                    let host = url.strip_prefix("https://")?.split([':', '/']).next()?;
                    Some(host.to_owned())
                })
        }),
    )
    .await
    .expect("the agent never printed its URL")
    .unwrap()
    .expect("the agent exited without a URL");
    let roots = portferry::tls::load_ca_roots(&relay.ca).unwrap();
    let tls = TlsConnector::from(portferry::tls::client_config(roots, HTTP1));
    let mut download = timeout(STEP, tls_connect(&tls, ("127.0.0.1", public_port), &host))
        .await
        .unwrap()
        .unwrap();
    timeout(STEP, read_stream(&mut download, 1024 * 1024))
        .await
        .unwrap()
        .unwrap();

    agent.0.kill().unwrap();
    agent.0.wait().unwrap();
    let (read, ended) = drain(&mut download, STEP).await;
    assert!(read < STREAM_LEN);
    assert!(
        ended.is_err(),
        "a download cut by the agent's death ended cleanly after {read} more bytes"
    );
}
