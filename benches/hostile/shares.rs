//! The `shares` phases (issue 21): what one stranger or one tenant can take from
//! everyone, each case beside the same relay's unflooded baseline. Legitimate clients
//! come from 127.0.0.2, floods from 127.0.0.3 and 127.0.0.4, the legitimate agent from
//! 127.0.0.1.
//!
//! - `two-address handshake flood`: [`PER_ADDRESS`] connections from each of two
//!   addresses send a 5-byte TLS record header and nothing more;
//! - `one-address slot hold`: one address holds [`SLOTS`] idle TLS connections to the
//!   tunnel (the default `--max-connections-per-tunnel`);
//! - `read-then-stall`, with and without a trickle: [`STALLERS`] clients read a
//!   download fast for 3 s, then stop reading (and, with the trickle, send a byte every
//!   5 s); the relay's and agent's (this process's) RSS before, while they stall, and
//!   [`super::IDLE_WAIT`] later;
//! - `agent sessions`: [`SESSION_FLOOD`] agents of the token from two addresses hold
//!   sessions (raw hellos); then whether a legitimate agent connects and forwards.
//!
//! And [`tenants`], each on a relay of its own:
//! - `raw TCP ports`: two tokens, a 100-port range; one token's agents take all the
//!   ports they can, then another token's agent asks [`TRIES`] times for one;
//! - `leases`: [`LEASE_AGENTS`] agents of the token open 64 tunnels each and drop their
//!   links (their leases are kept 60 s), then a new agent of the token opens tunnels;
//! - `open files`: the relay under `ulimit -Sn 1024`, then `ulimit -n 1024`; [`FD_FLOOD`]
//!   silent connections from two addresses, then legitimate clients and a new agent.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use portferry::agent::{Agent, AgentConfig, Tunnel};
use portferry::token::Token;
use portferry::wire::{handshake, NEW_AGENT};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::{legit, p_of, rss_mib, serve, RelayProcess, RelaySetup, AGENT_LIMIT, IDLE_WAIT};

/// Silent connections from each of the two flooding addresses.
const PER_ADDRESS: usize = 512;
/// Idle TLS connections the slot holder opens.
const SLOTS: usize = 1_024;
/// Clients that read, then stall.
const STALLERS: usize = 16;
/// Agents of the session flood.
const SESSION_FLOOD: usize = 1_100;
/// Requests of the agent that comes after a token's flood of ports or leases.
const TRIES: usize = 20;
/// Agents that fill their token's leases.
const LEASE_AGENTS: usize = 66;
/// Silent connections of the open-files phase.
const FD_FLOOD: usize = 1_100;

fn flooder(n: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, n))
}

/// Runs every phase against a fresh relay.
pub async fn shares() {
    let relay = RelayProcess::start().await;
    let mut config = AgentConfig::new(relay.addr.clone(), Token::new(relay.token.clone()));
    config.relay_ca = Some(relay.ca.clone());
    let agent = Agent::connect(config.clone()).await.expect("agent");
    let echo = agent.forward(serve(super::echo).await).await.expect("echo");
    let stream = agent.forward(serve(endless).await).await.expect("stream");
    let roots = portferry::tls::load_ca_roots(&relay.ca).expect("ca");
    let tls = TlsConnector::from(portferry::tls::client_config(roots, &[b"http/1.1"]));
    let (host, public) = echo.tls_socket();
    let public = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), public);
    let rss = || (rss_mib(relay.pid()), rss_mib(std::process::id()));

    let baseline = legit(&tls, &echo).await;
    baseline.print("shares baseline", None);

    let mut held = Vec::new();
    for n in [3, 4] {
        for _ in 0..PER_ADDRESS {
            if let Ok(Ok(mut tcp)) = timeout(Duration::from_secs(3), connect(n, public)).await {
                let _ = tcp.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00]).await;
                held.push(tcp);
            }
        }
    }
    let during = legit(&tls, &echo).await;
    during.print("two-address handshake flood", Some(&baseline));
    println!(
        "two-address handshake flood: {} connections opened",
        held.len()
    );
    drop(held);

    let mut slots = Vec::new();
    for _ in 0..SLOTS {
        let name = ServerName::try_from(host.to_owned()).unwrap();
        let attempt = async { tls.connect(name, connect(3, public).await?).await };
        if let Ok(Ok(stream)) = timeout(Duration::from_secs(3), attempt).await {
            slots.push(stream);
        }
    }
    let during = legit(&tls, &echo).await;
    during.print("one-address slot hold", Some(&baseline));
    println!(
        "one-address slot hold: {} idle TLS connections",
        slots.len()
    );
    drop(slots);

    for trickle in [false, true] {
        let phase = if trickle {
            "read-then-stall with a trickle"
        } else {
            "read-then-stall"
        };
        let before = rss();
        let stalled = stall(&tls, &stream, trickle).await;
        let stalling = rss();
        let during = legit(&tls, &echo).await;
        during.print(phase, Some(&baseline));
        tokio::time::sleep(IDLE_WAIT).await;
        let after = rss();
        println!(
            "{phase}: relay RSS MiB {:.1} before, {:.1} stalled, {:.1} {} s later; agent {:.1}, {:.1}, {:.1}",
            before.0,
            stalling.0,
            after.0,
            IDLE_WAIT.as_secs(),
            before.1,
            stalling.1,
            after.1
        );
        drop(stalled);
    }

    let held = session_flood(&relay, &tls).await;
    let start = Instant::now();
    let attempt = async {
        let agent = Agent::connect(config.clone()).await?;
        agent.forward(9).await.map(|tunnel| (agent, tunnel))
    };
    let outcome = match timeout(AGENT_LIMIT, attempt).await {
        Ok(Ok(_)) => format!("connected and forwarded in {:.1} ms", ms(start)),
        Ok(Err(e)) => format!("refused after {:.1} ms: {e}", ms(start)),
        Err(_) => format!("no answer in {} s", AGENT_LIMIT.as_secs()),
    };
    println!(
        "agent sessions: {} of {SESSION_FLOOD} flood agents welcomed; a legitimate agent {outcome}",
        held.len()
    );
}

fn ms(start: Instant) -> f64 {
    start.elapsed().as_secs_f64() * 1e3
}

/// A TCP connection to `to` from 127.0.0.`n`.
async fn connect(n: u8, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(flooder(n), 0))?;
    socket.connect(to).await
}

/// Writes until the connection fails.
async fn endless(mut stream: TcpStream) {
    let chunk = vec![0x42; 64 << 10];
    while stream.write_all(&chunk).await.is_ok() {}
}

/// [`STALLERS`] TLS clients of `tunnel` that read for 3 s, then stop (and send a byte
/// every 5 s if `trickle`); they stay open until the returned tasks are dropped.
async fn stall(tls: &TlsConnector, tunnel: &Tunnel, trickle: bool) -> Vec<AbortOnDrop> {
    let (host, port) = tunnel.tls_socket();
    let to = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port);
    let mut clients = Vec::new();
    for _ in 0..STALLERS {
        let name = ServerName::try_from(host.to_owned()).unwrap();
        let Ok(stream) = tls.connect(name, connect(3, to).await.unwrap()).await else {
            continue;
        };
        clients.push(AbortOnDrop(tokio::spawn(read_then_stall(stream, trickle))));
    }
    tokio::time::sleep(Duration::from_secs(4)).await;
    clients
}

async fn read_then_stall(mut stream: TlsStream<TcpStream>, trickle: bool) {
    let mut sink = vec![0; 64 << 10];
    let reading = Instant::now();
    while reading.elapsed() < Duration::from_secs(3) {
        if !matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {
            return;
        }
    }
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        if trickle && stream.write_all(b".").await.is_err() {
            return;
        }
    }
}

/// A task aborted when this is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// [`SESSION_FLOOD`] raw agent links with the relay's token, half from 127.0.0.3 and
/// half from 127.0.0.4; those welcomed, kept open by the caller.
async fn session_flood(relay: &RelayProcess, tls: &TlsConnector) -> Vec<TlsStream<TcpStream>> {
    let port: u16 = relay.addr.rsplit_once(':').unwrap().1.parse().unwrap();
    let to = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port);
    let hello = handshake::hello(&relay.token, NEW_AGENT).unwrap();
    let mut welcomed = Vec::new();
    for i in 0..SESSION_FLOOD {
        let attempt = async {
            let tcp = connect(3 + (i % 2) as u8, to).await?;
            let name = ServerName::try_from("localhost").unwrap();
            let mut link = tls.connect(name, tcp).await?;
            handshake::send(&mut link, &hello).await?;
            let answer = handshake::read_answer(&mut link)
                .await
                .map_err(std::io::Error::other)?;
            Ok::<_, std::io::Error>(answer.is_ok().then_some(link))
        };
        if let Ok(Ok(Some(link))) = timeout(Duration::from_secs(3), attempt).await {
            welcomed.push(link);
        }
    }
    welcomed
}

/// The tenant phases (see the module's docs).
pub async fn tenants() {
    ports().await;
    leases().await;
    for ulimit in ["-Sn 1024", "-n 1024"] {
        open_files(ulimit).await;
    }
}

/// An agent of `token` on `relay`.
async fn agent_of(relay: &RelayProcess, token: &str) -> Result<Agent, portferry::Error> {
    let mut config = AgentConfig::new(relay.addr.clone(), Token::new(token.to_owned()));
    config.relay_ca = Some(relay.ca.clone());
    Agent::connect(config).await
}

/// [`TRIES`] forwards of `agent` (each closed again); prints how many succeeded and
/// their p50, and the first failure.
async fn tries(phase: &str, agent: &Agent, unencrypted: bool) {
    let (mut times, mut failure) = (Vec::new(), None);
    for _ in 0..TRIES {
        let start = Instant::now();
        let options = portferry::ForwardOptions::new().unencrypted(unencrypted);
        match timeout(AGENT_LIMIT, agent.forward_with(7, options)).await {
            Ok(Ok(tunnel)) => {
                times.push(start.elapsed());
                let _ = tunnel.close().await;
            }
            Ok(Err(e)) => {
                failure.get_or_insert(e.to_string());
            }
            Err(_) => {
                failure.get_or_insert("no answer".into());
            }
        }
    }
    println!(
        "{phase}: {}/{TRIES} forwards succeeded, p50 {:.1} ms{}",
        times.len(),
        p_of(&times, 0.5),
        failure.map_or(String::new(), |e| format!(" (first failure: {e})"))
    );
}

/// Random tokens, `n` of them.
fn tokens(n: usize) -> Vec<String> {
    (0..n)
        .map(|_| format!("{:032x}", rand::random::<u128>()))
        .collect()
}

async fn ports() {
    let tokens = tokens(2);
    let first = 23_100;
    let relay = RelayProcess::start_with(RelaySetup {
        args: vec!["--tcp-ports".into(), format!("{first}-{}", first + 99)],
        tokens: Some(tokens.clone()),
        ..RelaySetup::default()
    })
    .await;
    let service = serve(super::echo).await;
    let mut hogs = Vec::new();
    let mut held = Vec::new();
    'hog: for _ in 0..2 {
        let agent = agent_of(&relay, &tokens[0]).await.expect("hog agent");
        for port in 1..=60 {
            let options = portferry::ForwardOptions::new()
                .unencrypted(true)
                .local_addr(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), service));
            match agent.forward_with(port, options).await {
                Ok(tunnel) => held.push(tunnel),
                Err(_) => break 'hog,
            }
        }
        hogs.push(agent);
    }
    println!("raw TCP ports: one token holds {} of 100", held.len());
    let other = agent_of(&relay, &tokens[1]).await;
    match other {
        Ok(agent) => tries("raw TCP ports, another token", &agent, true).await,
        Err(e) => println!("raw TCP ports, another token: no agent ({e})"),
    }
}

async fn leases() {
    let relay = RelayProcess::start().await;
    let roots = portferry::tls::load_ca_roots(&relay.ca).expect("ca");
    let tls = TlsConnector::from(portferry::tls::client_config(roots, &[]));
    let mut held = 0;
    for _ in 0..LEASE_AGENTS {
        held += leasing_agent(&relay, &tls).await;
    }
    // Their links are gone: the relay keeps their leases for 60 s.
    println!("leases: {held} granted to agents of the token, each leaving (links dropped) after asking for 64");
    match agent_of(&relay, &relay.token).await {
        Ok(agent) => tries("leases, a new agent of the token", &agent, false).await,
        Err(e) => println!("leases, a new agent of the token: no agent ({e})"),
    }
}

async fn open_files(ulimit: &'static str) {
    let relay = RelayProcess::start_with(RelaySetup {
        args: vec!["--handshake-timeout".into(), "60".into()],
        ulimit: Some(ulimit),
        ..RelaySetup::default()
    })
    .await;
    let agent = agent_of(&relay, &relay.token).await.expect("agent");
    let echo = agent.forward(serve(super::echo).await).await.expect("echo");
    let roots = portferry::tls::load_ca_roots(&relay.ca).expect("ca");
    let tls = TlsConnector::from(portferry::tls::client_config(roots, &[b"http/1.1"]));
    let phase = format!("open files (ulimit {ulimit})");
    let baseline = legit(&tls, &echo).await;
    baseline.print(&phase, None);
    let public = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), echo.tls_socket().1);
    let mut silent = Vec::new();
    for i in 0..FD_FLOOD {
        let from = 3 + (i % 2) as u8;
        if let Ok(Ok(tcp)) = timeout(Duration::from_secs(1), connect(from, public)).await {
            silent.push(tcp);
        }
    }
    let during = legit(&tls, &echo).await;
    during.print(&format!("{phase}, {FD_FLOOD} silent"), Some(&baseline));
    let start = Instant::now();
    let attempt = async {
        let agent = agent_of(&relay, &relay.token).await?;
        agent.forward(9).await.map(|tunnel| (agent, tunnel))
    };
    let outcome = match timeout(Duration::from_secs(10), attempt).await {
        Ok(Ok(_)) => format!("got a URL in {:.1} ms", ms(start)),
        Ok(Err(e)) => format!("failed: {e}"),
        Err(_) => "got no URL in 10 s".into(),
    };
    println!("{phase}: a new agent {outcome}");
}

/// A raw agent of `relay`'s token whose tunnels are leased: it asks for 64 tunnels,
/// then drops its link without closing them; how many it got.
async fn leasing_agent(relay: &RelayProcess, tls: &TlsConnector) -> usize {
    use portferry::link::{FrameReader, FrameWriter};
    use portferry::wire::{ForwardRequest, Frame};
    let port: u16 = relay.addr.rsplit_once(':').unwrap().1.parse().unwrap();
    let to = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), port);
    let attempt = async {
        let tcp = connect(1, to).await?;
        let name = ServerName::try_from("localhost").unwrap();
        let mut link = tls.connect(name, tcp).await?;
        let hello = handshake::hello(&relay.token, NEW_AGENT).unwrap();
        handshake::send(&mut link, &hello).await?;
        let answer = handshake::read_answer(&mut link).await;
        if !matches!(answer, Ok(Ok(_))) {
            return Ok(0);
        }
        let (read, write) = tokio::io::split(link);
        let (mut reader, mut writer) = (FrameReader::new(read), FrameWriter::new(write));
        for port in 1..=64 {
            let request = ForwardRequest {
                request_id: u32::from(port),
                port,
                unencrypted: false,
                h2: false,
            };
            writer.send(&Frame::Forward(request)).await?;
        }
        let (mut answered, mut granted) = (0, 0);
        while answered < 64 {
            match reader.read_frame().await {
                Ok(Some(Frame::Forwarded(_))) => (answered, granted) = (answered + 1, granted + 1),
                Ok(Some(Frame::Error(_))) => answered += 1,
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        Ok::<_, std::io::Error>(granted)
    };
    timeout(Duration::from_secs(10), attempt)
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or(0)
}
