//! The command's flags and arguments, and the parsers of their values.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand};
use portferry::agent::{AgentConfig, ProxyProtocol};
use portferry::relay::{Cidr, RelayConfig};

/// Expose a port from inside a container through a relay.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
pub(crate) struct Cli {
    /// Log more (-v: debug, -vv: trace). RUST_LOG overrides it.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub(crate) verbose: u8,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Run a relay. With no flags: on loopback, domain `portferry.localhost`, with a generated CA
    /// and token kept in the state directory; prints the environment an agent needs, as
    /// lines (`NAME=value`, then `export`) to paste into a shell.
    Relay(Box<RelayArgs>),
    /// Forward a local port through the relay named by PORTFERRY_RELAY / PORTFERRY_TOKEN
    /// / PORTFERRY_RELAY_CA; runs until Ctrl-C or SIGTERM, then closes the tunnel (a
    /// second signal exits at once, with status 130). Exits with status 1 if the relay
    /// refuses the agent when it reconnects.
    Forward(ForwardArgs),
    /// Run a relay, an agent and a small HTTP service in one process, and print the URL
    /// and a curl command that fetches it; runs until Ctrl-C or SIGTERM.
    Demo(StateArgs),
}

#[derive(Debug, Args)]
pub(crate) struct StateArgs {
    /// Directory for the generated CA, certificate, key and token (reused on restart).
    #[arg(long, env = "PORTFERRY_STATE_DIR")]
    pub(crate) state_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub(crate) struct RelayArgs {
    /// Where agents connect (TLS).
    #[arg(long, default_value = "127.0.0.1:7835")]
    pub(crate) agent_addr: SocketAddr,
    /// Where the public connects with TLS.
    #[arg(long, default_value = "127.0.0.1:8443")]
    pub(crate) public_addr: SocketAddr,
    /// TLS port shown in URLs, if the public reaches the relay on another port (for
    /// example 443 through a load balancer).
    #[arg(long)]
    pub(crate) public_port: Option<u16>,
    /// Domain tunnels are named under: `<label>.<domain>` (DNS must point
    /// `*.<domain>` at this relay). The default works on one machine: curl and browsers
    /// resolve `*.localhost` to loopback.
    #[arg(long, default_value = portferry::relay::LOCAL_DOMAIN)]
    pub(crate) domain: String,
    /// This node's name, when several relays share a domain: hostnames become
    /// `<label>.<node>.<domain>`.
    #[arg(long)]
    pub(crate) node: Option<String>,
    /// Address raw TCP tunnel ports are bound on.
    #[arg(long, default_value = "127.0.0.1")]
    pub(crate) tcp_bind: IpAddr,
    /// Range of raw TCP tunnel ports, `FIRST-LAST`.
    #[arg(long, default_value = "20000-29999", value_parser = parse_port_range)]
    pub(crate) tcp_ports: (u16, u16),
    /// PEM certificate chain for `*.<domain>` (and the agent endpoint's name); with
    /// --key. Without them, a local CA in the state directory issues one.
    #[arg(long, requires = "key")]
    pub(crate) cert: Option<PathBuf>,
    /// PEM private key of --cert.
    #[arg(long, requires = "cert")]
    pub(crate) key: Option<PathBuf>,
    /// File of agent tokens, one per line (`#` starts a comment). Without it (and
    /// without PORTFERRY_TOKENS), a token is generated in the state directory.
    #[arg(long)]
    pub(crate) tokens_file: Option<PathBuf>,
    /// Agent tokens, comma-separated (prefer --tokens-file: arguments are visible to
    /// other users of the machine).
    #[arg(
        long,
        env = "PORTFERRY_TOKENS",
        hide_env_values = true,
        value_delimiter = ','
    )]
    pub(crate) tokens: Vec<String>,
    /// Tunnels one agent may have open at once; more are refused (LIMIT_REACHED).
    #[arg(long, value_name = "N", default_value_t = RelayConfig::DEFAULT_MAX_TUNNELS_PER_AGENT, value_parser = parse_limit)]
    pub(crate) max_tunnels_per_agent: usize,
    /// Public connections (TLS and raw TCP) one tunnel may have open at once, shared by
    /// source address (at the limit, an address holding fewer takes one back from the
    /// address holding the most) [default: 1024, or less to fit `ulimit -n`].
    #[arg(long, value_name = "N", value_parser = parse_limit)]
    pub(crate) max_connections_per_tunnel: Option<usize>,
    /// Public connections all tunnels of one agent may have open at once, shared the
    /// same way [default: 10000, or less to fit `ulimit -n`].
    #[arg(long, value_name = "N", value_parser = parse_limit)]
    pub(crate) max_connections_per_agent: Option<usize>,
    /// Public connections of the whole relay, shared the same way [default: 60000, or
    /// what `ulimit -n` leaves after the agents' share and a reserve].
    #[arg(long, value_name = "N", value_parser = parse_limit)]
    pub(crate) max_connections: Option<usize>,
    /// Public TLS handshakes in progress at once, shared the same way (first to go: one
    /// without its ClientHello after 2.5 s). Agents' handshakes have a pool of their
    /// own, as large [default: 1024, or less to fit `ulimit -n`].
    #[arg(long, value_name = "N", value_parser = parse_limit)]
    pub(crate) max_pending_handshakes: Option<usize>,
    /// Agents connected at once, shared by token; more are refused (LIMIT_REACHED) and
    /// retry later [default: 1024, or less to fit `ulimit -n`].
    #[arg(long, value_name = "N", value_parser = parse_limit)]
    pub(crate) max_agent_sessions: Option<usize>,
    /// Tunnel leases (kept for a reconnecting agent) the agents of one token may hold at
    /// once; a tunnel beyond it is refused (LIMIT_REACHED).
    #[arg(long, value_name = "N", default_value_t = RelayConfig::DEFAULT_MAX_LEASES_PER_TOKEN, value_parser = parse_limit)]
    pub(crate) max_leases_per_token: usize,
    /// Tunnel leases the relay holds at once, all tokens together; the same.
    #[arg(long, value_name = "N", default_value_t = RelayConfig::DEFAULT_MAX_LEASES, value_parser = parse_limit)]
    pub(crate) max_leases: usize,
    /// MiB of socket buffers all agent sessions together may hold before windows stop
    /// growing [default: a quarter of the machine's memory].
    #[arg(long, value_name = "MIB", value_parser = parse_limit)]
    pub(crate) buffer_budget: Option<usize>,
    /// Seconds a connection may take for its TLS handshake (an agent: TLS and hello
    /// together) before it is closed.
    #[arg(long, value_name = "SECONDS", default_value_t = RelayConfig::DEFAULT_HANDSHAKE_TIMEOUT.as_secs_f64(), value_parser = parse_seconds)]
    pub(crate) handshake_timeout: f64,
    /// Seconds open connections may take to finish after the first Ctrl-C or SIGTERM
    /// (a second one exits at once).
    #[arg(long, value_name = "SECONDS", default_value_t = RelayConfig::DEFAULT_SHUTDOWN_GRACE.as_secs_f64(), value_parser = parse_seconds)]
    pub(crate) shutdown_grace: f64,
    /// Seconds a public connection may go without a byte moving either way before it is
    /// reset on both sides; 0: never.
    #[arg(long, value_name = "SECONDS", default_value_t = RelayConfig::DEFAULT_IDLE_TIMEOUT.as_secs_f64(), value_parser = parse_seconds)]
    pub(crate) idle_timeout: f64,
    /// No access log: by default each public connection gets a line when it ends (at
    /// info level, target `portferry::access`) with its client's address, tunnel, edge,
    /// bytes each way, duration and how it ended.
    #[arg(long)]
    pub(crate) no_access_log: bool,
    /// Load balancers in front of the relay (CIDR blocks or addresses, comma-separated)
    /// whose connections start with a PROXY protocol header (v1 or v2) naming the
    /// client, on every listener: the header's address then counts as the client's.
    /// From them a header is required; from anyone else it is never read.
    #[arg(long, value_name = "CIDR,...", value_delimiter = ',')]
    pub(crate) accept_proxy_protocol_from: Vec<Cidr>,
    /// Serve Prometheus metrics (/metrics) and health (/healthz, /readyz: 503 once
    /// shutting down) over plain HTTP here, e.g. 127.0.0.1:9090; off by default. Keep
    /// it on loopback or a private network; never one of the relay's other addresses.
    #[arg(long, value_name = "ADDR")]
    pub(crate) metrics_addr: Option<SocketAddr>,
    #[command(flatten)]
    pub(crate) state: StateArgs,
}

#[derive(Debug, Args)]
pub(crate) struct ForwardArgs {
    /// The local ports to expose (1 to 65535), all over one link to the relay. Each may
    /// carry options of its own after commas:
    /// PORT[,h2][,unencrypted][,to=HOST:PORT][,proxy=v1|v2], e.g. `8000,h2
    /// 22,unencrypted 8080,to=localhost:9000,proxy=v2`.
    #[arg(value_name = "PORT[,OPTION...]", required = true, value_parser = parse_port_spec)]
    pub(crate) ports: Vec<PortSpec>,
    /// Also expose the ports as raw TCP on relay ports (for SSH and other protocols
    /// with their own encryption); for one port only: `PORT,unencrypted`.
    #[arg(long)]
    pub(crate) unencrypted: bool,
    /// Offer HTTP/2 (ALPN h2) on the TLS side; the services must speak HTTP/2 with
    /// prior knowledge. For one port only: `PORT,h2`.
    #[arg(long, conflicts_with = "unencrypted")]
    pub(crate) h2: bool,
    /// Where the service listens, HOST:PORT (e.g. localhost:8000, 10.1.2.3:80,
    /// [::1]:8000), if not 127.0.0.1:PORT (then [::1]:PORT). Every address HOST
    /// resolves to at start is tried, IPv4 first. With several ports, give each its
    /// own: `PORT,to=HOST:PORT`.
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_host_port)]
    pub(crate) to: Option<String>,
    /// With several relays in PORTFERRY_RELAY: seconds to keep reconnecting to the
    /// relay in use after it is lost before moving to the next-nearest one (the relays'
    /// lease grace period, 60 s by default: within it a relay that comes back keeps the
    /// URLs).
    #[arg(long, value_name = "SECONDS", default_value_t = AgentConfig::DEFAULT_FAILOVER_AFTER.as_secs_f64(), value_parser = parse_seconds)]
    pub(crate) failover_after: f64,
    /// Start each connection to the services with a PROXY protocol header (v1: text,
    /// v2: binary, with the TLS server name and ALPN) naming the public client, as nginx
    /// `listen ... proxy_protocol` and HAProxy `accept-proxy` expect. Off by default: the
    /// services get exactly the client's bytes. For one port only: `PORT,proxy=v2`.
    #[arg(long, value_name = "v1|v2", value_parser = parse_proxy_protocol)]
    pub(crate) proxy_protocol: Option<ProxyProtocol>,
    /// Serve the agent's Prometheus metrics (/metrics) and health (/healthz, /readyz:
    /// 200 while the link is up) over plain HTTP here, e.g. 127.0.0.1:9091; off by
    /// default.
    #[arg(long, value_name = "ADDR")]
    pub(crate) metrics_addr: Option<SocketAddr>,
}

/// One port of `portferry forward` and its options, as `PORT[,OPTION...]` gives them.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PortSpec {
    pub(crate) port: u16,
    pub(crate) unencrypted: bool,
    pub(crate) h2: bool,
    pub(crate) to: Option<String>,
    pub(crate) proxy_protocol: Option<ProxyProtocol>,
}

/// Parses `PORT[,h2][,unencrypted][,to=HOST:PORT][,proxy=v1|v2]`.
fn parse_port_spec(text: &str) -> Result<PortSpec, String> {
    let mut parts = text.split(',');
    let port = parse_port(parts.next().unwrap_or_default())?;
    let mut spec = PortSpec {
        port,
        unencrypted: false,
        h2: false,
        to: None,
        proxy_protocol: None,
    };
    for option in parts {
        match option.split_once('=') {
            None if option == "h2" => spec.h2 = true,
            None if option == "unencrypted" => spec.unencrypted = true,
            Some(("to", to)) => spec.to = Some(parse_host_port(to)?),
            Some(("proxy", version)) => spec.proxy_protocol = Some(parse_proxy_protocol(version)?),
            _ => {
                return Err(format!(
                    "{option:?} is not an option of a port: h2, unencrypted, to=HOST:PORT or proxy=v1|v2"
                ))
            }
        }
    }
    Ok(spec)
}

impl ForwardArgs {
    /// Each port with the command's flags applied: `--h2` and `--unencrypted` to
    /// every port, `--to` to the only one.
    pub(crate) fn specs(&self) -> Result<Vec<PortSpec>> {
        if self.to.is_some() && self.ports.len() > 1 {
            bail!(
                "--to names one service; with several ports give each its own: PORT,to=HOST:PORT"
            );
        }
        let mut specs = self.ports.clone();
        for spec in &mut specs {
            spec.unencrypted |= self.unencrypted;
            spec.h2 |= self.h2;
            spec.to = spec.to.take().or_else(|| self.to.clone());
            spec.proxy_protocol = spec.proxy_protocol.or(self.proxy_protocol);
            if spec.h2 && spec.unencrypted {
                bail!(
                    "port {}: h2 (--h2) and unencrypted (--unencrypted) cannot go together: HTTP/2 needs TLS",
                    spec.port
                );
            }
        }
        Ok(specs)
    }
}

fn parse_proxy_protocol(text: &str) -> Result<ProxyProtocol, String> {
    ProxyProtocol::parse(text)
        .ok_or_else(|| format!("{text:?} is not a PROXY protocol version: v1 or v2"))
}

/// Checks `HOST:PORT` (the host is resolved when forwarding starts).
fn parse_host_port(text: &str) -> Result<String, String> {
    match text.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() => parse_port(port).map(|_| text.to_owned()),
        _ => Err(format!("{text:?} is not HOST:PORT, e.g. localhost:8000")),
    }
}

fn parse_port(text: &str) -> Result<u16, String> {
    portferry::parse_port(text).map_err(|e| e.to_string())
}

fn parse_limit(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("{text:?} is not a whole number of at least 1")),
    }
}

fn parse_seconds(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(seconds) if Duration::try_from_secs_f64(seconds).is_ok() => Ok(seconds),
        _ => Err(format!(
            "{text:?} is not a number of seconds, e.g. 10 or 0.5"
        )),
    }
}

fn parse_port_range(text: &str) -> Result<(u16, u16), String> {
    let (first, last) = text
        .split_once('-')
        .ok_or("expected FIRST-LAST, e.g. 20000-29999")?;
    let (first, last) = (parse_port(first)?, parse_port(last)?);
    if first > last {
        return Err(format!("{first} is above {last}"));
    }
    Ok((first, last))
}
