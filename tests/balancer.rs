//! Real L4 balancers (nginx `stream`, HAProxy `mode tcp`) on loopback: the proxy
//! harness of `tests/common/proxies.rs` in front of plain services, then many relay
//! nodes behind one address — two relays, `r1` and `r2`, behind one nginx and one
//! HAProxy configured exactly as the README's "Scaling out" section says (its example
//! addresses replaced by loopback ones), routing both the tunnels' public port and the
//! agents' endpoint by SNI.
//!
//! In CI (`CI=true`) a missing nginx or HAProxy fails these tests; elsewhere they are
//! skipped with the reason printed.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::time::Duration;

use common::proxies::{haproxy, nginx, Binary, Kind, Proxy};
use common::{
    echo_service, exchange, free_port, http_get, http_service, pseudo_random, tls_connect,
    unencrypted, Fixture, TempDir, HTTP1,
};
use portferry::agent::{Agent, AgentConfig, Tunnel};
use portferry::relay::Cidr;
use portferry::tls::LocalPki;
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::TlsConnector;

/// Upper bound for any single test step: a hang fails the test instead of the CI job.
const STEP: Duration = Duration::from_secs(10);

/// Echoes a message through `proxy`'s first port; panics unless it comes back whole.
async fn echo_through(proxy: &Proxy, seed: u64) {
    let message = pseudo_random(seed, 100_000);
    let tcp = timeout(STEP, TcpStream::connect(proxy.addr(0)))
        .await
        .expect("connecting to the proxy hung")
        .expect("connecting to the proxy failed");
    let back = exchange(STEP, tcp, &message).await.unwrap();
    assert!(
        back == message,
        "{} bytes came back; the proxy logged:\n{}",
        back.len(),
        proxy.logs()
    );
}

#[tokio::test]
async fn nginx_stream_forwards_and_logs_each_session() {
    let Some(binary) = Binary::require(Kind::Nginx) else {
        return;
    };
    let service = echo_service().await;
    let proxy = Proxy::start(&binary, 1, STEP, |setup| {
        let server = format!(
            "  server {{ listen {}; proxy_pass {service}; }}",
            setup.listen(0)
        );
        nginx::stream(setup, &server)
    })
    .await;
    echo_through(&proxy, 1).await;
    echo_through(&proxy, 2).await;
    let log = proxy
        .until_logged(&format!("upstream={service}"), 2, STEP)
        .await;
    assert!(log.contains("received=100000"), "{log}");
}

#[tokio::test]
async fn haproxy_forwards_and_logs_each_session() {
    let Some(binary) = Binary::require(Kind::Haproxy) else {
        return;
    };
    let service = echo_service().await;
    let proxy = Proxy::start(&binary, 1, STEP, |setup| {
        format!(
            "frontend echo\n  bind {}\n  default_backend service\n\n{}",
            setup.listen(0),
            haproxy::backend("service", service, "")
        )
    })
    .await;
    echo_through(&proxy, 3).await;
    echo_through(&proxy, 4).await;
    proxy.until_logged("echo service/service", 2, STEP).await;
}

// ───────────────────────────── relay nodes behind one address ─────────────────────────────

/// The domain of the nodes in the test (the README's is `tunnels.example.com`).
const DOMAIN: &str = "portferry.localhost";

/// The ````lang` block of the README's "Scaling out" section.
fn readme_block(lang: &str) -> String {
    let readme = include_str!("../README.md");
    let section = readme
        .split_once("### Scaling out")
        .expect("the README has a Scaling out section")
        .1;
    let fence = format!("```{lang}\n");
    let block = section
        .split_once(fence.as_str())
        .unwrap_or_else(|| panic!("no {fence:?} block in the README's Scaling out section"))
        .1;
    block.split_once("```").unwrap().0.to_owned()
}

/// `text` with each `(from, to)` replaced; panics if a `from` is not in it, so the
/// README and this test cannot drift apart unnoticed.
fn substitute(text: &str, replacements: &[(String, String)]) -> String {
    let mut text = text.to_owned();
    for (from, to) in replacements {
        assert!(text.contains(from.as_str()), "{from:?} is not in:\n{text}");
        text = text.replace(from.as_str(), to);
    }
    text
}

/// A relay node behind the balancer: `--node <name>` with its own certificate, showing
/// the balancer's public port in its URLs, its raw TCP ports from a range of its own
/// on an address of its own (the balancer listens on the same ports on 127.0.0.1), and
/// trusting the balancer's PROXY headers.
struct Node {
    name: &'static str,
    /// What its agent's service answers.
    serves: &'static str,
    /// Where its raw TCP ports are bound.
    tcp_bind: IpAddr,
    tcp_ports: RangeInclusive<u16>,
    fx: Fixture,
}

impl Node {
    async fn start(
        (name, serves): (&'static str, &'static str),
        pki: &LocalPki,
        public_port: u16,
        (tcp_bind, tcp_ports): (IpAddr, RangeInclusive<u16>),
    ) -> Node {
        let fx = Fixture::start_with(STEP, |config| {
            config.identity = pki.identity.clone();
            config.domain = DOMAIN.into();
            config.node = Some(name.into());
            config.public_tls_port = Some(public_port);
            config.tcp_bind = tcp_bind;
            config.tcp_ports = tcp_ports.clone();
            config.accept_proxy_protocol_from = vec!["127.0.0.1/32".parse::<Cidr>().unwrap()];
        })
        .await;
        Node {
            name,
            serves,
            tcp_bind,
            tcp_ports,
            fx,
        }
    }

    /// `name.<DOMAIN>`: what its agents name as their relay, and send as SNI.
    fn host(&self) -> String {
        format!("{}.{DOMAIN}", self.name)
    }

    fn agent_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.fx.agent_port))
    }
}

/// The README's configuration for `kind`, its example addresses replaced: the nodes'
/// addresses and the domain by the test's, the balancer's listening ports by `public`
/// and `agents` on loopback.
fn balancer_config(kind: Kind, nodes: &[Node; 2], public: u16, agents: u16) -> String {
    let mut replacements = Vec::new();
    if kind == Kind::Nginx {
        // In the map's regular expressions.
        replacements.push(("tunnels\\.example\\.com".into(), DOMAIN.replace('.', "\\.")));
    }
    replacements.push(("tunnels.example.com".into(), DOMAIN.into()));
    let (block, listen) = match kind {
        Kind::Nginx => ("nginx", "listen "),
        Kind::Haproxy => ("haproxy", "bind :"),
    };
    let on_loopback = |ports: String| match kind {
        Kind::Nginx => format!("listen 127.0.0.1:{ports}"),
        Kind::Haproxy => format!("bind 127.0.0.1:{ports}"),
    };
    replacements.push((format!("{listen}443"), on_loopback(public.to_string())));
    replacements.push((format!("{listen}7835"), on_loopback(agents.to_string())));
    for (n, node) in nodes.iter().enumerate() {
        let example = format!("10.0.0.{}", n + 1);
        replacements.push((format!("{example}:8443"), node.fx.public.to_string()));
        replacements.push((format!("{example}:7835"), node.agent_addr().to_string()));
        // What is left of the node's address: its raw TCP ports.
        replacements.push((example, node.tcp_bind.to_string()));
        let range = format!("{}-{}", node.tcp_ports.start(), node.tcp_ports.end());
        let example_range = format!("{0}000-{0}999", 21 + n);
        replacements.push((format!("{listen}{example_range}"), on_loopback(range)));
    }
    let config = substitute(&readme_block(block), &replacements);
    assert!(
        !config.contains("example.com") && !config.contains("10.0.0."),
        "an example address is left:\n{config}"
    );
    config
}

/// An agent of `node` connected through the balancer's agents' port, by the node's
/// name, trusting `ca`.
async fn agent_through(node: &Node, agents_port: u16, ca: &std::path::Path) -> Agent {
    let mut config = AgentConfig::new(
        format!("{}:{agents_port}", node.host()),
        node.fx.token.clone(),
    );
    config.relay_ca = Some(ca.to_owned());
    timeout(STEP, Agent::connect(config))
        .await
        .unwrap_or_else(|_| panic!("the agent of {} hung", node.name))
        .unwrap_or_else(|e| panic!("the agent of {} failed: {e}", node.name))
}

/// `GET /` on `tunnel`'s URL with curl (which resolves `*.localhost` to loopback
/// itself), trusting `ca`: the transcript line and the body; `None` without curl.
fn curl(tunnel: &Tunnel, ca: &std::path::Path) -> Option<(String, String)> {
    let url = format!("{}/", tunnel.url());
    let output = std::process::Command::new("curl")
        .args(["--silent", "--show-error", "--max-time", "10", "--cacert"])
        .arg(ca)
        .arg(&url)
        .output()
        .ok()?;
    let body = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "curl {url}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Some((format!("$ curl --cacert ca.pem {url}"), body))
}

/// Four consecutive loopback ports, free a moment ago, below the ephemeral range (so
/// that [`free_port`] does not pick them meanwhile).
fn free_range() -> RangeInclusive<u16> {
    loop {
        let first = 10_000 + rand::random::<u16>() % 9_000;
        let range = first..=first + 3;
        let free = range
            .clone()
            .all(|port| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok());
        if free {
            return range;
        }
    }
}

/// Two relays, r1 and r2, behind one balancer of `kind` configured as the README says:
/// each agent reaches its own node through the one agents' port by its node's name,
/// and each tunnel's URL, through the one public port, reaches its own node's tunnel.
async fn two_nodes_behind_one_address(kind: Kind) {
    let Some(binary) = Binary::require(kind) else {
        return;
    };
    // One CA issues both nodes' certificates (`r<n>.<DOMAIN>`, `*.r<n>.<DOMAIN>`).
    let state = TempDir::new("balancer-pki");
    let pkis = ["r1", "r2"]
        .map(|name| portferry::tls::local_pki(state.path(), &format!("{name}.{DOMAIN}")).unwrap());
    let ca = pkis[0].ca_cert_path.clone();
    let ranges = [free_range(), free_range()];
    let (public, agents) = (free_port(), free_port());
    let raw = |n: u8, range: &RangeInclusive<u16>| {
        (IpAddr::V4(Ipv4Addr::new(127, 0, 0, 10 + n)), range.clone())
    };
    let nodes = [
        Node::start(("r1", "served by r1"), &pkis[0], public, raw(1, &ranges[0])).await,
        Node::start(("r2", "served by r2"), &pkis[1], public, raw(2, &ranges[1])).await,
    ];
    let config = balancer_config(kind, &nodes, public, agents);
    let mut ports = vec![public, agents];
    ports.extend(ranges.iter().cloned().flatten());
    let lb = Proxy::start_on(&binary, &ports, STEP, |_| config.clone()).await;
    println!("{kind:?} on 127.0.0.1:{public} (public) and 127.0.0.1:{agents} (agents)");

    let connector = TlsConnector::from(portferry::tls::client_config(pkis[0].roots(), HTTP1));
    let mut kept = Vec::new();
    for node in &nodes {
        let agent = agent_through(node, agents, &ca).await;
        let body = node.serves;
        let service = http_service(body).await.port();
        let tunnel = agent.forward_with(service, unencrypted()).await.unwrap();
        let (host, port) = tunnel.tls_socket();
        assert!(host.ends_with(&format!(".{}", node.host())), "{host}");
        assert_eq!(port, public, "the URL shows the balancer's port");
        let get = async {
            let tls = tls_connect(&connector, ("127.0.0.1", public), &host).await?;
            http_get(tls, &host).await
        };
        let got = timeout(STEP, get)
            .await
            .expect("GET through the balancer hung");
        assert_eq!(got.unwrap(), body, "{}\n{}", tunnel.url(), lb.logs());
        match curl(&tunnel, &ca) {
            Some((command, curled)) => {
                println!("{command}\n{curled}");
                assert_eq!(curled, body);
            }
            None => println!("(no curl: fetched {} in-process: {body})", tunnel.url()),
        }
        // Its raw TCP socket, as printed: the node's range on the balancer.
        let (tcp_host, tcp_port) = tunnel.tcp_socket().unwrap();
        assert!(node.tcp_ports.contains(&tcp_port), "{tcp_port}");
        let get = async {
            let tcp = TcpStream::connect((tcp_host.as_str(), tcp_port)).await?;
            http_get(tcp, &tcp_host).await
        };
        let got = timeout(STEP, get)
            .await
            .expect("raw TCP through the balancer hung");
        assert_eq!(got.unwrap(), body, "raw TCP {tcp_host}:{tcp_port}");
        println!("raw TCP {tcp_host}:{tcp_port} (through the balancer): {body}");
        kept.push((agent, tunnel));
    }
    for node in &nodes {
        let stats = node.fx.stats();
        println!(
            "{}: agent_sessions {}, tunnels {}, failed_handshakes {}",
            node.name, stats.agent_sessions, stats.tunnels, stats.failed_handshakes
        );
        assert_eq!((stats.agent_sessions, stats.tunnels), (1, 1), "{stats:?}");
        assert_eq!(stats.failed_handshakes, 0, "{stats:?}");
    }
    // A node no one serves: the balancer closes the connection.
    let unknown = format!("x.r3.{DOMAIN}");
    let refused = timeout(
        STEP,
        tls_connect(&connector, ("127.0.0.1", public), &unknown),
    )
    .await;
    assert!(matches!(refused, Ok(Err(_))), "{unknown} was served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_behind_one_nginx_by_sni() {
    two_nodes_behind_one_address(Kind::Nginx).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_behind_one_haproxy_by_sni() {
    two_nodes_behind_one_address(Kind::Haproxy).await;
}
