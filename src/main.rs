//! The `portferry` command: `relay`, `forward` and `demo`. Thin: parses flags, sets up
//! logging, and calls the library.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use portferry::agent::{Agent, AgentConfig, ForwardOptions, Tunnel};
use portferry::relay::{Relay, RelayConfig};
use portferry::token::Token;

/// Expose a port from inside a container through a relay.
#[derive(Debug, Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Log more (-v: debug, -vv: trace). RUST_LOG overrides it.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a relay. With no flags: on loopback, domain `portferry.localhost`, with a generated CA
    /// and token kept in the state directory; prints the environment an agent needs.
    Relay(Box<RelayArgs>),
    /// Forward a local port through the relay named by PORTFERRY_RELAY / PORTFERRY_TOKEN
    /// / PORTFERRY_RELAY_CA; runs until Ctrl-C.
    Forward(ForwardArgs),
    /// Run a relay, an agent and a small HTTP service in one process, and print the URL
    /// and a curl command that fetches it; runs until Ctrl-C.
    Demo(StateArgs),
}

#[derive(Debug, Args)]
struct StateArgs {
    /// Directory for the generated CA, certificate, key and token (reused on restart).
    #[arg(long, env = "PORTFERRY_STATE_DIR")]
    state_dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct RelayArgs {
    /// Where agents connect (TLS).
    #[arg(long, default_value = "127.0.0.1:7835")]
    agent_addr: SocketAddr,
    /// Where the public connects with TLS.
    #[arg(long, default_value = "127.0.0.1:8443")]
    public_addr: SocketAddr,
    /// TLS port shown in URLs, if the public reaches the relay on another port (for
    /// example 443 through a load balancer).
    #[arg(long)]
    public_port: Option<u16>,
    /// Domain tunnels are named under: `<label>.<domain>` (DNS must point
    /// `*.<domain>` at this relay). The default works on one machine: curl and browsers
    /// resolve `*.localhost` to loopback.
    #[arg(long, default_value = portferry::relay::LOCAL_DOMAIN)]
    domain: String,
    /// This node's name, when several relays share a domain: hostnames become
    /// `<label>.<node>.<domain>`.
    #[arg(long)]
    node: Option<String>,
    /// Address raw TCP tunnel ports are bound on.
    #[arg(long, default_value = "127.0.0.1")]
    tcp_bind: IpAddr,
    /// Range of raw TCP tunnel ports, `FIRST-LAST`.
    #[arg(long, default_value = "20000-29999", value_parser = parse_port_range)]
    tcp_ports: (u16, u16),
    /// PEM certificate chain for `*.<domain>` (and the agent endpoint's name); with
    /// --key. Without them, a local CA in the state directory issues one.
    #[arg(long, requires = "key")]
    cert: Option<PathBuf>,
    /// PEM private key of --cert.
    #[arg(long, requires = "cert")]
    key: Option<PathBuf>,
    /// File of agent tokens, one per line (`#` starts a comment). Without it (and
    /// without PORTFERRY_TOKENS), a token is generated in the state directory.
    #[arg(long)]
    tokens_file: Option<PathBuf>,
    /// Agent tokens, comma-separated (prefer --tokens-file: arguments are visible to
    /// other users of the machine).
    #[arg(
        long,
        env = "PORTFERRY_TOKENS",
        hide_env_values = true,
        value_delimiter = ','
    )]
    tokens: Vec<String>,
    /// Tunnels one agent may have open at once; more are refused (LIMIT_REACHED).
    #[arg(long, value_name = "N", default_value_t = RelayConfig::DEFAULT_MAX_TUNNELS_PER_AGENT, value_parser = parse_limit)]
    max_tunnels_per_agent: usize,
    /// Public connections (TLS and raw TCP) one tunnel may have open at once; more are
    /// closed (TLS) or reset (raw TCP).
    #[arg(long, value_name = "N", default_value_t = RelayConfig::DEFAULT_MAX_CONNECTIONS_PER_TUNNEL, value_parser = parse_limit)]
    max_connections_per_tunnel: usize,
    /// Public connections all tunnels of one agent may have open at once; more are
    /// closed (TLS) or reset (raw TCP).
    #[arg(long, value_name = "N", default_value_t = RelayConfig::DEFAULT_MAX_CONNECTIONS_PER_AGENT, value_parser = parse_limit)]
    max_connections_per_agent: usize,
    /// Public TLS handshakes in progress at once (one address may hold half); more
    /// are closed at once. Agents' handshakes have a pool of their own, as large.
    #[arg(long, value_name = "N", default_value_t = RelayConfig::DEFAULT_MAX_PENDING_HANDSHAKES, value_parser = parse_limit)]
    max_pending_handshakes: usize,
    /// Agents connected at once; more are refused (LIMIT_REACHED) and retry later.
    #[arg(long, value_name = "N", default_value_t = RelayConfig::DEFAULT_MAX_AGENT_SESSIONS, value_parser = parse_limit)]
    max_agent_sessions: usize,
    /// Seconds a connection may take for its TLS handshake (an agent: TLS and hello
    /// together) before it is closed.
    #[arg(long, value_name = "SECONDS", default_value_t = RelayConfig::DEFAULT_HANDSHAKE_TIMEOUT.as_secs_f64(), value_parser = parse_seconds)]
    handshake_timeout: f64,
    /// Seconds open connections may take to finish after the first Ctrl-C or SIGTERM
    /// (a second one exits at once).
    #[arg(long, value_name = "SECONDS", default_value_t = RelayConfig::DEFAULT_SHUTDOWN_GRACE.as_secs_f64(), value_parser = parse_seconds)]
    shutdown_grace: f64,
    #[command(flatten)]
    state: StateArgs,
}

#[derive(Debug, Args)]
struct ForwardArgs {
    /// The local port to expose (1 to 65535).
    #[arg(value_parser = parse_port)]
    port: u16,
    /// Also expose the port as raw TCP on a relay port (for SSH and other protocols
    /// with their own encryption).
    #[arg(long)]
    unencrypted: bool,
    /// Offer HTTP/2 (ALPN h2) on the TLS side; the service must speak HTTP/2 with
    /// prior knowledge.
    #[arg(long, conflicts_with = "unencrypted")]
    h2: bool,
    /// Where the service listens, if not 127.0.0.1:PORT.
    #[arg(long)]
    to: Option<SocketAddr>,
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

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let default_level = ["info", "debug", "trace"][usize::from(cli.verbose.min(2))];
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Command::Relay(args) => relay(*args).await,
        Command::Forward(args) => forward(args).await,
        Command::Demo(args) => demo(args).await,
    }
}

/// The state directory: the flag, else `$XDG_STATE_HOME/portferry`, else
/// `~/.local/state/portferry`, else `./.portferry`.
fn state_dir(args: &StateArgs) -> PathBuf {
    if let Some(dir) = &args.state_dir {
        return dir.clone();
    }
    let base = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".local/state")));
    base.map_or_else(
        || PathBuf::from(".portferry"),
        |base| base.join("portferry"),
    )
}

async fn relay(args: RelayArgs) -> Result<()> {
    let state = state_dir(&args.state);
    let (identity, ca_path) = match (&args.cert, &args.key) {
        (Some(cert), Some(key)) => (portferry::tls::load_identity(cert, key)?, None),
        _ => {
            let pki = portferry::tls::local_pki(&state, &node_domain(&args))?;
            (pki.identity, Some(pki.ca_cert_path))
        }
    };
    let mut tokens: Vec<Token> = args.tokens.iter().map(Token::new).collect();
    if let Some(file) = &args.tokens_file {
        tokens.extend(portferry::token::read_tokens_file(file)?);
    }
    if tokens.is_empty() {
        if args.tokens_file.is_some() {
            bail!("no tokens in the tokens file");
        }
        tokens.push(portferry::token::local_token(&state)?);
    }
    let mut config = RelayConfig::local(
        identity,
        tokens.clone(),
        args.agent_addr.port(),
        args.public_addr.port(),
    );
    config.agent_addr = args.agent_addr;
    config.public_tls_addr = args.public_addr;
    config.public_tls_port = args.public_port;
    config.domain = args.domain.to_ascii_lowercase();
    config.node = args.node.map(|node| node.to_ascii_lowercase());
    config.tcp_bind = args.tcp_bind;
    config.tcp_ports = args.tcp_ports.0..=args.tcp_ports.1;
    // Leases survive a restart, so agents that reconnect keep their URLs.
    config.lease_file = Some(state.join("leases"));
    config.max_tunnels_per_agent = args.max_tunnels_per_agent;
    config.max_connections_per_tunnel = args.max_connections_per_tunnel;
    config.max_connections_per_agent = args.max_connections_per_agent;
    config.max_pending_handshakes = args.max_pending_handshakes;
    config.max_pending_agent_handshakes = args.max_pending_handshakes;
    config.max_agent_sessions = args.max_agent_sessions;
    config.handshake_timeout = Duration::from_secs_f64(args.handshake_timeout);
    config.shutdown_grace = Duration::from_secs_f64(args.shutdown_grace);
    let relay = Relay::bind(config)
        .await
        .context("cannot start the relay")?;
    // Installed before the relay says it is ready, so a signal sent on that news is
    // handled (not the default: death).
    let mut signals = ShutdownSignals::new()?;
    tracing::info!(agents = %relay.agent_addr(), public = %relay.public_tls_addr(), "relay listening");
    let agent_host = if args.agent_addr.ip().is_loopback() {
        "localhost".to_string()
    } else {
        args.domain.clone()
    };
    let mut ready = "relay ready. In the container, set:\n".to_string();
    ready += &format!(
        "PORTFERRY_RELAY={agent_host}:{}\n",
        relay.agent_addr().port()
    );
    if args.tokens_file.is_none() && args.tokens.is_empty() {
        ready += &format!("PORTFERRY_TOKEN={}\n", tokens[0].expose());
    } else {
        ready += "PORTFERRY_TOKEN=<one of the configured tokens>\n";
    }
    if let Some(ca) = ca_path {
        ready += &format!("PORTFERRY_RELAY_CA={}\n", ca.display());
    }
    say(&ready);
    let handle = relay.handle();
    let serve = relay.run();
    tokio::pin!(serve);
    tokio::select! {
        () = &mut serve => return Ok(()),
        () = signals.next() => {}
    }
    tracing::info!(
        grace = ?Duration::from_secs_f64(args.shutdown_grace),
        "shutting down: no new connections, open ones may finish; Ctrl-C again to exit at once"
    );
    handle.shutdown();
    tokio::select! {
        () = serve => {}
        () = signals.next() => tracing::warn!("exiting at once"),
    }
    Ok(())
}

/// Ctrl-C (SIGINT) and, on unix, SIGTERM: what asks a relay to stop.
struct ShutdownSignals {
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    /// Starts listening for both signals: once, so that each signal counts once.
    fn new() -> Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(ShutdownSignals {
                terminate: signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?,
                interrupt: signal(SignalKind::interrupt()).context("cannot listen for Ctrl-C")?,
            })
        }
        #[cfg(not(unix))]
        Ok(ShutdownSignals {})
    }

    /// Waits for the next Ctrl-C or SIGTERM.
    async fn next(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// The domain this node's tunnels are named under, which its certificate must cover.
fn node_domain(args: &RelayArgs) -> String {
    match &args.node {
        Some(node) => format!("{node}.{}", args.domain),
        None => args.domain.clone(),
    }
}

/// Writes to stdout in one go. A reader that has gone away (`portferry relay | head`)
/// is no reason to stop serving, so write errors are ignored instead of panicking as
/// `println!` does.
fn say(text: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = std::io::Write::write_all(&mut stdout, text.as_bytes());
    let _ = std::io::Write::flush(&mut stdout);
}

/// The lines describing a tunnel.
fn describe(tunnel: &Tunnel) -> String {
    let (host, port) = tunnel.tls_socket();
    let mut text = format!("url:        {}\ntls socket: {host}:{port}\n", tunnel.url());
    if let Ok((host, port)) = tunnel.tcp_socket() {
        text += &format!("tcp socket: {host}:{port}\n");
    }
    text
}

async fn forward(args: ForwardArgs) -> Result<()> {
    let agent = Agent::connect(AgentConfig::from_env()?).await?;
    let options = ForwardOptions {
        unencrypted: args.unencrypted,
        h2: args.h2,
        local_addr: args.to,
    };
    let tunnel = agent.forward_with(args.port, options).await?;
    say(&format!(
        "{}forwarding; Ctrl-C to stop\n",
        describe(&tunnel)
    ));
    tokio::signal::ctrl_c().await?;
    tunnel.close().await?;
    Ok(())
}

async fn demo(args: StateArgs) -> Result<()> {
    let state = state_dir(&args);
    let pki = portferry::tls::local_pki(&state, portferry::relay::LOCAL_DOMAIN)?;
    let token = Token::generate();
    let relay = Relay::bind(RelayConfig::local(pki.identity, vec![token.clone()], 0, 0)).await?;
    let mut agent_config =
        AgentConfig::new(format!("localhost:{}", relay.agent_addr().port()), token);
    agent_config.relay_ca = Some(pki.ca_cert_path.clone());
    tokio::spawn(relay.run());

    let service = portferry::demo::start_hello_service().await?;
    let agent = Agent::connect(agent_config).await?;
    let tunnel = agent.forward(service.port()).await?;
    say(&format!(
        "a relay, an agent and a sample HTTP service (on {service}) are running.\n{}\n\
         try it from another terminal:\n  curl --cacert {} {}/\n\nCtrl-C to stop\n",
        describe(&tunnel),
        pki.ca_cert_path.display(),
        tunnel.url()
    ));
    tokio::signal::ctrl_c().await?;
    tunnel.close().await?;
    Ok(())
}
