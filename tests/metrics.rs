//! The metrics endpoints end to end: a relay with `metrics_addr` on loopback scraped
//! with a real `curl` before and after real TLS connections through a real agent,
//! readiness across a shutdown, requests that are not scrapes, and an agent's figures
//! through `Agent::stats` and `Agent::serve_metrics`.

mod common;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{
    echo_service, echo_via_url, eventually, exchange, free_port, http_service, Fixture, HTTP1,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

/// Upper bound for each network step.
const STEP: Duration = Duration::from_secs(10);

/// A relay with its metrics endpoint on a free loopback port, served; the endpoint's
/// address.
async fn relay_with_metrics() -> (Fixture, SocketAddr) {
    let loopback = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
    let (mut fixture, relay) = Fixture::bind(STEP, |config| {
        config.metrics_addr = Some(loopback);
        // Long enough that a shutdown with a connection open stays in its drain.
        config.shutdown_grace = Duration::from_secs(60);
    })
    .await;
    let metrics = relay.metrics_addr().expect("the metrics endpoint is bound");
    fixture.serve(relay);
    (fixture, metrics)
}

/// What `curl` got: the status code (0 if it could not connect) and the body.
struct Fetched {
    status: u16,
    body: String,
}

/// `curl -s` of `path` on `addr` (GET, or `method`), within [`STEP`].
async fn curl(addr: SocketAddr, path: &str, method: &str) -> Fetched {
    let url = format!("http://{addr}{path}");
    let mut command = Command::new("curl");
    command
        .args(["-s", "--max-time", "5", "-X", method])
        .args(["-w", "\n%{http_code}", &url])
        .stdin(Stdio::null())
        .stderr(Stdio::null());
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .unwrap()
        .expect("curl runs (install curl to run these tests)");
    let text = String::from_utf8(output.stdout).expect("the body is UTF-8");
    let (body, status) = text.rsplit_once('\n').expect("curl wrote the status");
    Fetched {
        status: status.parse().expect("a status code"),
        body: body.to_owned(),
    }
}

/// Scrapes `/metrics` with curl: every sample, by its name and labels as written
/// (`name{label="value"}`).
async fn scrape(addr: SocketAddr) -> Metrics {
    let fetched = curl(addr, "/metrics", "GET").await;
    assert_eq!(fetched.status, 200, "{}", fetched.body);
    assert!(fetched.body.ends_with("# EOF\n"), "{}", fetched.body);
    Metrics::parse(&fetched.body)
}

/// The samples of one scrape, and its text.
struct Metrics {
    samples: HashMap<String, f64>,
    text: String,
}

impl Metrics {
    fn parse(text: &str) -> Metrics {
        let samples = text
            .lines()
            .filter(|line| !line.starts_with('#'))
            .map(|line| {
                let (sample, value) = line.rsplit_once(' ').expect("a sample and its value");
                let value = value.parse().unwrap_or_else(|_| panic!("{line}"));
                (sample.to_owned(), value)
            })
            .collect();
        Metrics {
            samples,
            text: text.to_owned(),
        }
    }

    /// The value of `sample`; panics if the scrape does not have it.
    fn get(&self, sample: &str) -> f64 {
        *self
            .samples
            .get(sample)
            .unwrap_or_else(|| panic!("no sample {sample} in:\n{}", self.text))
    }
}

/// How much `sample` grew from `before` to `after`.
fn grew(before: &Metrics, after: &Metrics, sample: &str) -> f64 {
    after.get(sample) - before.get(sample)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_sees_the_counters_move_by_what_went_through() {
    let (fixture, metrics) = relay_with_metrics().await;
    let agent = fixture.agent().await;
    let tunnel = agent.forward(echo_service().await.port()).await.unwrap();
    // A tunnel to a port where nothing listens: the agent refuses its connections.
    let nowhere = agent.forward(free_port()).await.unwrap();
    let before = scrape(metrics).await;
    assert_eq!(before.get("portferry_agent_sessions"), 1.0);
    assert_eq!(before.get(r#"portferry_tunnels{kind="tls"}"#), 2.0);
    assert_eq!(before.get(r#"portferry_tunnels{kind="h2"}"#), 0.0);
    assert_eq!(
        before.get(r#"portferry_build_info{version="0.1.0",role="relay"}"#),
        1.0
    );

    // Echoes of known sizes, then connections for no tunnel.
    let connector = fixture.connector(HTTP1);
    let sizes = [1000, 2000, 3000, 4000, 5000];
    for (index, size) in sizes.into_iter().enumerate() {
        let message = vec![b'a' + index as u8; size];
        let echoed = echo_via_url(&connector, &tunnel, &message, STEP)
            .await
            .unwrap();
        assert_eq!(echoed, message);
    }
    assert!(fixture.get(&nowhere).await.is_err());
    let unknown = 3;
    for _ in 0..unknown {
        let refused = fixture
            .tls("no-such-tunnel.portferry.localhost", HTTP1)
            .await;
        assert!(refused.is_err(), "a TLS handshake for no tunnel succeeded");
    }
    // Plain HTTP to the TLS port: the relay counts it and closes it (at most with an
    // alert).
    let plain = TcpStream::connect(fixture.public).await.unwrap();
    let answer = exchange(STEP, plain, b"GET / HTTP/1.1\r\n\r\n").await;
    assert!(!answer.is_ok_and(|bytes| bytes.starts_with(b"HTTP")));
    // Counted once each connection has ended at the relay.
    fixture
        .until_stats("the echoes ended", |stats| stats.public_connections == 0)
        .await;
    let after = scrape(metrics).await;

    let connections = sizes.len() as f64;
    let moved: f64 = sizes.iter().map(|&size| size as f64).sum();
    let grew = |sample: &str| grew(&before, &after, sample);
    // Every connection admitted has ended: cleanly, or refused by the agent.
    assert_eq!(
        grew("portferry_public_connections_opened_total"),
        connections + 1.0
    );
    assert_eq!(
        grew(r#"portferry_public_connections_ended_total{how="closed"}"#),
        connections
    );
    assert_eq!(
        grew(r#"portferry_public_connections_ended_total{how="refused_by_agent"}"#),
        1.0
    );
    assert_eq!(after.get("portferry_public_connections"), 0.0);
    assert_eq!(
        grew(r#"portferry_public_connections_refused_total{reason="unknown_sni"}"#),
        unknown as f64
    );
    assert_eq!(
        grew(r#"portferry_public_connections_refused_total{reason="max_connections"}"#),
        0.0
    );
    assert_eq!(
        grew("portferry_tls_handshake_duration_seconds_count"),
        connections + 1.0
    );
    assert_eq!(
        grew(r#"portferry_tls_handshake_duration_seconds_bucket{le="+Inf"}"#),
        connections + 1.0
    );
    assert_eq!(
        grew("portferry_inner_connect_duration_seconds_count"),
        connections
    );
    assert!(grew("portferry_inner_connect_duration_seconds_sum") > 0.0);
    assert_eq!(
        grew(r#"portferry_public_bytes_total{direction="from_clients"}"#),
        moved
    );
    assert_eq!(
        grew(r#"portferry_public_bytes_total{direction="to_clients"}"#),
        moved
    );
    assert!(grew("portferry_stack_packets_in_total") > 0.0);
    let not_tls = r#"portferry_public_handshake_failures_total{reason="tls"}"#;
    for sample in after.samples.keys() {
        if sample.contains("handshake_failures_total") {
            let expected = if sample == not_tls { 1.0 } else { 0.0 };
            assert_eq!(grew(sample), expected, "{sample}");
        }
    }
    assert_eq!(
        grew(r#"portferry_public_connections_refused_total{reason="handshake_failed"}"#),
        1.0
    );

    // No hostname, token or client address in what an operator's tools store.
    let host = tunnel.tls_socket().0;
    let label = host.split('.').next().unwrap();
    for secret in [label, fixture.token.expose(), "127.0.0.1", "no-such-tunnel"] {
        assert!(
            !after.text.contains(secret),
            "the metrics show {secret}:\n{}",
            after.text
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_once_the_relay_drains_and_then_nothing_listens() {
    let (fixture, metrics) = relay_with_metrics().await;
    assert_eq!(curl(metrics, "/healthz", "GET").await.status, 200);
    let ready = curl(metrics, "/readyz", "GET").await;
    assert_eq!((ready.status, ready.body.as_str()), (200, "ready\n"));

    // A connection left open keeps the relay draining.
    let agent = fixture.agent().await;
    let tunnel = agent.forward(echo_service().await.port()).await.unwrap();
    let mut open = fixture.tls_to(&tunnel).await.unwrap();
    open.write_all(b"ping").await.unwrap();
    let mut echoed = [0; 4];
    timeout(STEP, open.read_exact(&mut echoed))
        .await
        .unwrap()
        .unwrap();
    fixture.relay.shutdown();
    let draining = curl(metrics, "/readyz", "GET").await;
    assert_eq!(
        (draining.status, draining.body.as_str()),
        (503, "not ready\n")
    );
    assert_eq!(curl(metrics, "/healthz", "GET").await.status, 200);
    assert_eq!(curl(metrics, "/metrics", "GET").await.status, 200);

    // Once the last connection ends, the relay stops and its endpoint with it.
    drop(open);
    eventually(STEP, "the metrics endpoint closes", || async {
        curl(metrics, "/healthz", "GET").await.status == 0
    })
    .await;
}

/// Sends `request` on a new connection to `addr`; everything read back until the
/// server closes, within [`STEP`].
async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    let stream = TcpStream::connect(addr).await.unwrap();
    let response = exchange(STEP, stream, request).await.unwrap();
    String::from_utf8_lossy(&response).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_is_not_a_scrape_gets_a_4xx_and_the_connection_closes() {
    let (_fixture, metrics) = relay_with_metrics().await;
    let garbage = raw_exchange(metrics, b"\x16\x03\x01\x00\x05hello\r\n\r\n").await;
    assert!(garbage.starts_with("HTTP/1.1 400 "), "{garbage}");
    let mut oversized = b"GET /metrics HTTP/1.1\r\nX-Padding: ".to_vec();
    oversized.resize(9 * 1024, b'a');
    let oversized = raw_exchange(metrics, &oversized).await;
    assert!(oversized.starts_with("HTTP/1.1 431 "), "{oversized}");
    assert!(
        oversized.contains("\r\nConnection: close\r\n"),
        "{oversized}"
    );
    assert_eq!(curl(metrics, "/metrics", "POST").await.status, 405);
    assert_eq!(curl(metrics, "/", "GET").await.status, 404);
    assert_eq!(curl(metrics, "/admin", "GET").await.status, 404);
    // A HEAD gets the head alone; the server still closes.
    let head = raw_exchange(metrics, b"HEAD /healthz HTTP/1.1\r\n\r\n").await;
    assert!(
        head.starts_with("HTTP/1.1 200 OK") && head.ends_with("\r\n\r\n"),
        "{head}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_beyond_the_bound_are_closed_and_scrapes_come_back() {
    let (_fixture, metrics) = relay_with_metrics().await;
    // Connections that send nothing hold their places until their read timeout.
    let mut idle = Vec::new();
    for _ in 0..16 {
        idle.push(TcpStream::connect(metrics).await.unwrap());
    }
    // Closed at once, unread: the client sees an end or a reset, and no answer.
    let seventeenth = TcpStream::connect(metrics).await.unwrap();
    match exchange(STEP, seventeenth, b"GET /metrics HTTP/1.1\r\n\r\n").await {
        Ok(answer) => assert!(answer.is_empty(), "the 17th connection was served"),
        Err(error) => assert_eq!(error.kind(), std::io::ErrorKind::ConnectionReset),
    }
    drop(idle);
    eventually(STEP, "scrapes are served again", || async {
        curl(metrics, "/healthz", "GET").await.status == 200
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_reports_its_connections_and_serves_them_as_metrics() {
    let fixture = Fixture::start(STEP).await;
    let agent = fixture.agent().await;
    let served = agent
        .forward(http_service("counted").await.port())
        .await
        .unwrap();
    // A port with nothing listening: the agent refuses its connections.
    let nothing = agent.forward(free_port()).await.unwrap();
    let before = agent.stats();
    assert!(before.link_up);
    assert_eq!(before.tunnels, 2);
    let requests = 3;
    for _ in 0..requests {
        assert_eq!(fixture.get(&served).await.unwrap(), "counted");
    }
    assert!(fixture.get(&nothing).await.is_err());
    let after = agent.stats();
    assert_eq!(
        after.inner_connections_opened - before.inner_connections_opened,
        requests
    );
    assert_eq!(
        after.inner_connections_refused - before.inner_connections_refused,
        1
    );
    assert_eq!(after.reconnects, 0);

    let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .unwrap();
    let metrics = listener.local_addr().unwrap();
    let serving = tokio::spawn(agent.serve_metrics(listener));
    let scraped = scrape(metrics).await;
    assert_eq!(scraped.get("portferry_agent_link_up"), 1.0);
    assert_eq!(scraped.get("portferry_agent_tunnels"), 2.0);
    // The round trip measured when the link opened, as `Agent::relay` has it.
    let rtt = agent.stats().relay_rtt.expect("a round trip to the relay");
    assert_eq!(agent.relay().rtt, Some(rtt));
    assert_eq!(
        scraped.get("portferry_agent_relay_rtt_seconds"),
        rtt.as_secs_f64()
    );
    assert_eq!(
        scraped.get("portferry_agent_inner_connections_opened_total"),
        agent.stats().inner_connections_opened as f64
    );
    assert_eq!(
        scraped.get(r#"portferry_build_info{version="0.1.0",role="agent"}"#),
        1.0
    );
    assert_eq!(curl(metrics, "/readyz", "GET").await.status, 200);
    serving.abort();
}
