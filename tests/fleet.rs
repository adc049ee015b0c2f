//! Several relays, over real loopback sockets and real TLS: the agent links to the
//! nearest (a relay behind a delaying proxy is farther), is not held up by a relay that
//! accepts TCP and never answers, stays with its relay when the link comes back within
//! the grace period, and when that relay is gone for good moves its tunnels to the
//! next-nearest, whose new URLs serve; `portferry forward` prints both.
//!
//! Nothing here times anything: the waits are upper bounds that only turn a hang into a
//! failure, and what is checked is which relay was chosen and what was counted.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use portferry::agent::{Agent, AgentConfig, LinkState, ProbeOutcome, Tunnel, TunnelState};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::time::timeout;

mod common;

use common::{echo_service, echo_via_url, eventually, Fixture, Proxy, TempDir, HTTP1};

/// Upper bound for any step: a hang fails the test.
const STEP: Duration = Duration::from_secs(20);
/// One way of the far relay's delay line: its round trip is at least 40 ms, against
/// well under a millisecond on loopback.
const FAR: Duration = Duration::from_millis(20);

/// Relays that accept the same token, each with a CA of its own, and a PEM file that
/// trusts all of them.
struct Fleet {
    relays: Vec<Fixture>,
    ca: PathBuf,
    _dir: TempDir,
}

impl Fleet {
    /// `count` relays with short heartbeats and `lease_grace`.
    async fn start(count: usize, lease_grace: Duration) -> Fleet {
        let mut relays: Vec<Fixture> = Vec::new();
        for _ in 0..count {
            let token = relays.first().map(|first| first.token.clone());
            let relay = Fixture::start_with(STEP, |config| {
                config.lease_grace = lease_grace;
                config.link.ping_interval = Duration::from_millis(200);
                config.link.idle_timeout = Duration::from_secs(1);
                if let Some(token) = token {
                    config.tokens = vec![token];
                }
            })
            .await;
            relays.push(relay);
        }
        let dir = TempDir::new("fleet");
        std::fs::create_dir_all(dir.path()).unwrap();
        let ca = dir.path().join("cas.pem");
        let pems: Vec<String> = relays
            .iter()
            .map(|relay| std::fs::read_to_string(&relay.pki.ca_cert_path).unwrap())
            .collect();
        std::fs::write(&ca, pems.concat()).unwrap();
        Fleet {
            relays,
            ca,
            _dir: dir,
        }
    }

    /// An agent configuration naming `relays` (`host:port` each), with short heartbeats.
    fn config(&self, relays: &[String]) -> AgentConfig {
        let mut config = AgentConfig::new("", self.relays[0].token.clone()).with_relays(relays);
        config.relay_ca = Some(self.ca.clone());
        config.ping_interval = Duration::from_millis(200);
        config.idle_timeout = Duration::from_secs(1);
        config
    }
}

/// `localhost:<port>`.
fn at(port: u16) -> String {
    format!("localhost:{port}")
}

/// A relay's agent endpoint behind a delay line of [`FAR`] each way.
async fn far(relay: &Fixture) -> Proxy {
    common::delay_line(relay.agent_port, FAR).await
}

async fn connect(config: AgentConfig) -> Agent {
    timeout(STEP, Agent::connect(config))
        .await
        .expect("Agent::connect hung")
        .expect("Agent::connect failed")
}

/// Echoes through the tunnel's URL at `relay`.
async fn echoes_at(relay: &Fixture, tunnel: &Tunnel, message: &[u8]) -> bool {
    let echoed = echo_via_url(&relay.connector(HTTP1), tunnel, message, STEP).await;
    matches!(echoed, Ok(echoed) if echoed == message)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_links_to_the_nearest_relay_and_shows_every_figure() {
    let fleet = Fleet::start(2, Duration::from_secs(30)).await;
    let (near, far_relay) = (&fleet.relays[0], &fleet.relays[1]);
    let line = far(far_relay).await;
    // The far relay is named first: the order given does not decide.
    let (far_addr, near_addr) = (at(line.port), at(near.agent_port));
    let agent = connect(fleet.config(&[far_addr.clone(), near_addr.clone()])).await;

    let choice = agent.relay();
    println!("chose {choice}");
    assert_eq!(choice.address, near_addr, "{choice}");
    assert!(choice.rtt.is_some(), "{choice}");
    assert_eq!(choice.candidates.len(), 2, "{choice}");
    assert_eq!(choice.candidates[0].address, near_addr, "{choice}");

    // The tunnel is on the near relay and serves there.
    let service = echo_service().await;
    let tunnel = agent.forward(service.port()).await.unwrap();
    assert_eq!(tunnel.tls_socket().1, near.public.port());
    assert!(echoes_at(near, &tunnel, b"near").await);

    // The far relay's probe is finished off: its figure is recorded when it answers,
    // and its link is closed, leaving it no session.
    eventually(STEP, "the far relay's figure", || async {
        agent
            .relay()
            .candidates
            .iter()
            .any(|c| c.address == far_addr && matches!(c.outcome, ProbeOutcome::Answered(_)))
    })
    .await;
    println!("then {}", agent.relay());
    assert_eq!(
        line.accepted.load(Ordering::SeqCst),
        1,
        "the far relay was probed once"
    );
    far_relay
        .until_stats("the losing probe's link to close", |stats| {
            stats.agent_sessions == 0
        })
        .await;
    assert_eq!(near.stats().agent_sessions, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_never_answers_tls_does_not_hold_up_the_choice() {
    let fleet = Fleet::start(1, Duration::from_secs(30)).await;
    let relay = &fleet.relays[0];
    // Accepts TCP and keeps every connection open, saying nothing.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = at(silent.local_addr().unwrap().port());
    let (accepted_tx, mut accepted) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((connection, _)) = silent.accept().await {
            let _ = accepted_tx.send(connection);
        }
    });
    let mut config = fleet.config(&[silent_addr.clone(), at(relay.agent_port)]);
    // Waiting for the silent relay's TLS would take a minute: longer than STEP.
    config.connect_timeout = Duration::from_secs(60);
    let agent = connect(config).await;

    let choice = agent.relay();
    println!("chose {choice}");
    assert_eq!(choice.address, at(relay.agent_port));
    let silent_figure = choice
        .candidates
        .iter()
        .find(|c| c.address == silent_addr)
        .unwrap();
    assert!(
        matches!(silent_figure.outcome, ProbeOutcome::Pending),
        "{choice}"
    );
    timeout(STEP, accepted.recv())
        .await
        .expect("the silent relay was not probed");
    let service = echo_service().await;
    let tunnel = agent.forward(service.port()).await.unwrap();
    assert!(echoes_at(relay, &tunnel, b"served").await);
}

/// A relay's agent endpoint behind a plain proxy, whose accepted connections count the
/// agent's attempts, also after the relay is gone.
async fn counted(relay: &Fixture) -> Proxy {
    common::proxy(relay.agent_port, |mut from, mut to| async move {
        let _ = tokio::io::copy(&mut from, &mut to).await;
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut to).await;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_lost_for_good_moves_the_tunnels_to_the_next_nearest() {
    let grace = Duration::from_millis(600);
    let fleet = Fleet::start(2, grace).await;
    let (first, second) = (&fleet.relays[0], &fleet.relays[1]);
    let near = counted(first).await;
    let line = far(second).await;
    let mut config = fleet.config(&[at(near.port), at(line.port)]);
    config.failover_after = grace;
    let agent = connect(config).await;
    assert_eq!(agent.relay().address, at(near.port));

    let service = echo_service().await;
    let tunnel = agent.forward(service.port()).await.unwrap();
    let mut state = tunnel.state();
    let old_url = tunnel.url();
    assert_eq!(tunnel.tls_socket().1, first.public.port());
    assert!(echoes_at(first, &tunnel, b"before").await);
    let links_before = near.accepted.load(Ordering::SeqCst);

    // The relay in use stops for good.
    first.relay.shutdown();
    let moved_to = common::until_moved(&mut state, STEP).await;
    println!(
        "relay killed; agent now at {}; tunnel {old_url} -> {}",
        agent.relay(),
        moved_to.url()
    );
    // It tried the lost relay again first, within the grace period.
    let retries = near.accepted.load(Ordering::SeqCst) - links_before;
    assert!(retries >= 1, "the lost relay was not tried again");
    assert_eq!(agent.relay().address, at(line.port));
    assert_eq!(moved_to.tls_socket().1, second.public.port());
    assert_eq!(tunnel.url(), moved_to.url());
    assert_ne!(tunnel.url(), old_url);
    assert!(echoes_at(second, &tunnel, b"after").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_back_within_the_grace_period_keeps_the_relay_and_the_url() {
    let fleet = Fleet::start(2, Duration::from_secs(30)).await;
    let (first, second) = (&fleet.relays[0], &fleet.relays[1]);
    let delay = Arc::new(AtomicU64::new(0));
    let near = common::variable_delay_line(first.agent_port, delay.clone()).await;
    let line = far(second).await;
    let mut config = fleet.config(&[at(near.port), at(line.port)]);
    config.failover_after = Duration::from_secs(30);
    let agent = connect(config).await;
    assert_eq!(agent.relay().address, at(near.port));
    let service = echo_service().await;
    let tunnel = agent.forward(service.port()).await.unwrap();
    let url = tunnel.url();

    // The link goes quiet for longer than the heartbeats allow (1 s), then the way to
    // the relay is clear again.
    let mut link = agent.link_state();
    delay.store(5_000, Ordering::SeqCst);
    timeout(
        STEP,
        link.wait_for(|state| !matches!(state, LinkState::Connected)),
    )
    .await
    .expect("the quiet link was never given up")
    .unwrap();
    delay.store(0, Ordering::SeqCst);
    timeout(
        STEP,
        link.wait_for(|state| matches!(state, LinkState::Connected)),
    )
    .await
    .expect("the agent never reconnected")
    .unwrap();
    assert_eq!(agent.relay().address, at(near.port));
    assert!(matches!(&*tunnel.state().borrow(), TunnelState::Open(_)));
    assert_eq!(tunnel.url(), url);
    // Served again once the relay has answered the agent's restore.
    eventually(STEP, "the same URL to serve again", || async {
        echoes_at(first, &tunnel, b"again").await
    })
    .await;
    assert_eq!(
        line.accepted.load(Ordering::SeqCst),
        1,
        "only the first probe went to the far relay"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_agent_moves_to_a_relay_that_became_clearly_nearer() {
    let fleet = Fleet::start(2, Duration::from_secs(30)).await;
    let one_way = [Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0))];
    let mut lines = Vec::new();
    for (relay, delay) in fleet.relays.iter().zip(&one_way) {
        lines.push(common::variable_delay_line(relay.agent_port, delay.clone()).await);
    }
    let addrs: Vec<String> = lines.iter().map(|line| at(line.port)).collect();
    let mut config = fleet.config(&addrs);
    config.reprobe_interval = Duration::from_millis(200);
    let agent = connect(config).await;
    let first = addrs
        .iter()
        .position(|a| *a == agent.relay().address)
        .unwrap();
    let other = 1 - first;

    // With a tunnel open, the agent stays, however far its relay becomes.
    let service = echo_service().await;
    let tunnel = agent.forward(service.port()).await.unwrap();
    one_way[first].store(FAR.as_millis() as u64, Ordering::SeqCst);
    let probed = lines[other].accepted.load(Ordering::SeqCst);
    eventually(STEP, "two more probes of the other relay", || async {
        lines[other].accepted.load(Ordering::SeqCst) >= probed + 2
    })
    .await;
    assert_eq!(
        agent.relay().address,
        addrs[first],
        "moved with a tunnel open"
    );
    assert!(matches!(&*tunnel.state().borrow(), TunnelState::Open(_)));

    // Without tunnels, it moves to the relay that is now clearly nearer.
    tunnel.close().await.unwrap();
    eventually(STEP, "the agent to move", || async {
        agent.relay().address == addrs[other]
    })
    .await;
    println!("moved while idle: {}", agent.relay());
    let tunnel = agent.forward(service.port()).await.unwrap();
    assert_eq!(tunnel.tls_socket().1, fleet.relays[other].public.port());
    assert!(echoes_at(&fleet.relays[other], &tunnel, b"moved").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn portferry_forward_prints_its_relay_and_moves_when_it_dies() {
    let fleet = Fleet::start(2, Duration::from_millis(600)).await;
    let (first, second) = (&fleet.relays[0], &fleet.relays[1]);
    let line = far(second).await;
    let relays = format!("{},{}", at(line.port), at(first.agent_port));
    let service = echo_service().await;
    let port = service.port().to_string();
    let mut command = common::portferry(["forward", &port, "--failover-after", "0.6"]);
    command
        .env("PORTFERRY_RELAY", &relays)
        .env("PORTFERRY_TOKEN", first.token.expose())
        .env("PORTFERRY_RELAY_CA", &fleet.ca);
    let mut forward = common::StdoutLines::spawn(command);
    let chosen = forward.next("relay:", STEP).await;
    println!("portferry forward: relay: {chosen}");
    assert!(chosen.starts_with(&at(first.agent_port)), "{chosen}");
    assert!(chosen.contains(&at(line.port)), "{chosen}");
    let old_url = forward.next("url:", STEP).await;
    forward.next("forwarding", STEP).await;

    first.relay.shutdown();
    let now = forward.next("relay:", STEP).await;
    assert!(now.starts_with(&at(line.port)), "{now}");
    let moved = forward.next("moved:", STEP).await;
    assert!(moved.contains(&format!("port {port}")), "{moved}");
    assert!(moved.contains(&at(line.port)), "{moved}");
    let new_url = forward.next("url:", STEP).await;
    println!("portferry forward: relay: {now}\nmoved: {moved}\n  {old_url} -> {new_url}");
    assert!(
        new_url.ends_with(&format!(":{}", second.public.port())),
        "{new_url}"
    );
    forward.child.terminate();
}
