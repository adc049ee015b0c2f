//! The `portferry` command: `relay`, `forward` and `demo`. Thin: parses flags, sets up
//! logging, and calls the library.

use std::io::IsTerminal;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use portferry::agent::{
    retry_at_limits, Agent, AgentConfig, ForwardOptions, Tunnel, TunnelAddress, TunnelState,
};
use portferry::relay::{Relay, RelayConfig};
use portferry::token::Token;

mod os;

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
    /// Public connections (TLS and raw TCP) one tunnel may have open at once, shared by
    /// source address (at the limit, an address holding fewer takes one back from the
    /// address holding the most) [default: 1024, or less to fit `ulimit -n`].
    #[arg(long, value_name = "N", value_parser = parse_limit)]
    max_connections_per_tunnel: Option<usize>,
    /// Public connections all tunnels of one agent may have open at once, shared the
    /// same way [default: 10000, or less to fit `ulimit -n`].
    #[arg(long, value_name = "N", value_parser = parse_limit)]
    max_connections_per_agent: Option<usize>,
    /// Public connections of the whole relay, shared the same way [default: 60000, or
    /// what `ulimit -n` leaves after the agents' share and a reserve].
    #[arg(long, value_name = "N", value_parser = parse_limit)]
    max_connections: Option<usize>,
    /// Public TLS handshakes in progress at once, shared the same way (first to go: one
    /// without its ClientHello after 2.5 s). Agents' handshakes have a pool of their
    /// own, as large [default: 1024, or less to fit `ulimit -n`].
    #[arg(long, value_name = "N", value_parser = parse_limit)]
    max_pending_handshakes: Option<usize>,
    /// Agents connected at once, shared by token; more are refused (LIMIT_REACHED) and
    /// retry later [default: 1024, or less to fit `ulimit -n`].
    #[arg(long, value_name = "N", value_parser = parse_limit)]
    max_agent_sessions: Option<usize>,
    /// Tunnel leases (kept for a reconnecting agent) the agents of one token may hold at
    /// once; a tunnel beyond it is refused (LIMIT_REACHED).
    #[arg(long, value_name = "N", default_value_t = RelayConfig::DEFAULT_MAX_LEASES_PER_TOKEN, value_parser = parse_limit)]
    max_leases_per_token: usize,
    /// Tunnel leases the relay holds at once, all tokens together; the same.
    #[arg(long, value_name = "N", default_value_t = RelayConfig::DEFAULT_MAX_LEASES, value_parser = parse_limit)]
    max_leases: usize,
    /// MiB of socket buffers all agent sessions together may hold before windows stop
    /// growing [default: a quarter of the machine's memory].
    #[arg(long, value_name = "MIB", value_parser = parse_limit)]
    buffer_budget: Option<usize>,
    /// Seconds a connection may take for its TLS handshake (an agent: TLS and hello
    /// together) before it is closed.
    #[arg(long, value_name = "SECONDS", default_value_t = RelayConfig::DEFAULT_HANDSHAKE_TIMEOUT.as_secs_f64(), value_parser = parse_seconds)]
    handshake_timeout: f64,
    /// Seconds open connections may take to finish after the first Ctrl-C or SIGTERM
    /// (a second one exits at once).
    #[arg(long, value_name = "SECONDS", default_value_t = RelayConfig::DEFAULT_SHUTDOWN_GRACE.as_secs_f64(), value_parser = parse_seconds)]
    shutdown_grace: f64,
    /// Seconds a public connection may go without a byte moving either way before it is
    /// reset on both sides; 0: never.
    #[arg(long, value_name = "SECONDS", default_value_t = RelayConfig::DEFAULT_IDLE_TIMEOUT.as_secs_f64(), value_parser = parse_seconds)]
    idle_timeout: f64,
    #[command(flatten)]
    state: StateArgs,
}

#[derive(Debug, Args)]
struct ForwardArgs {
    /// The local ports to expose (1 to 65535), all over one link to the relay. Each may
    /// carry options of its own after commas: PORT[,h2][,unencrypted][,to=HOST:PORT],
    /// e.g. `8000,h2 22,unencrypted 8080,to=localhost:9000`.
    #[arg(value_name = "PORT[,OPTION...]", required = true, value_parser = parse_port_spec)]
    ports: Vec<PortSpec>,
    /// Also expose the ports as raw TCP on relay ports (for SSH and other protocols
    /// with their own encryption); for one port only: `PORT,unencrypted`.
    #[arg(long)]
    unencrypted: bool,
    /// Offer HTTP/2 (ALPN h2) on the TLS side; the services must speak HTTP/2 with
    /// prior knowledge. For one port only: `PORT,h2`.
    #[arg(long, conflicts_with = "unencrypted")]
    h2: bool,
    /// Where the service listens, HOST:PORT (e.g. localhost:8000, 10.1.2.3:80,
    /// [::1]:8000), if not 127.0.0.1:PORT (then [::1]:PORT). Every address HOST
    /// resolves to at start is tried, IPv4 first. With several ports, give each its
    /// own: `PORT,to=HOST:PORT`.
    #[arg(long, value_name = "HOST:PORT", value_parser = parse_host_port)]
    to: Option<String>,
}

/// One port of `portferry forward` and its options, as `PORT[,OPTION...]` gives them.
#[derive(Debug, Clone, PartialEq)]
struct PortSpec {
    port: u16,
    unencrypted: bool,
    h2: bool,
    to: Option<String>,
}

/// Parses `PORT[,h2][,unencrypted][,to=HOST:PORT]`.
fn parse_port_spec(text: &str) -> Result<PortSpec, String> {
    let mut parts = text.split(',');
    let port = parse_port(parts.next().unwrap_or_default())?;
    let mut spec = PortSpec {
        port,
        unencrypted: false,
        h2: false,
        to: None,
    };
    for option in parts {
        match option {
            "h2" => spec.h2 = true,
            "unencrypted" => spec.unencrypted = true,
            _ => match option.strip_prefix("to=") {
                Some(to) => spec.to = Some(parse_host_port(to)?),
                None => {
                    return Err(format!(
                        "{option:?} is not an option of a port: h2, unencrypted or to=HOST:PORT"
                    ))
                }
            },
        }
    }
    Ok(spec)
}

impl ForwardArgs {
    /// Each port with the command's flags applied: `--h2` and `--unencrypted` to
    /// every port, `--to` to the only one.
    fn specs(&self) -> Result<Vec<PortSpec>> {
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

#[tokio::main]
async fn main() -> ExitCode {
    os::return_big_buffers_to_the_os();
    let cli = Cli::parse();
    let default_level = ["info", "debug", "trace"][usize::from(cli.verbose.min(2))];
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let result = match cli.command {
        Command::Relay(args) => relay(*args).await,
        Command::Forward(args) => forward(args).await,
        Command::Demo(args) => demo(args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("{}", report(&error));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes, for people: no backtrace (that is for `RUST_LOG` and
/// debuggers), and a cause whose text the line above already includes is not repeated.
fn report(error: &anyhow::Error) -> String {
    let mut text = format!("error: {error}");
    let mut above = error.to_string();
    for cause in error.chain().skip(1).map(ToString::to_string) {
        if !above.contains(&cause) {
            text += &format!("\n  caused by: {cause}");
        }
        above = cause;
    }
    text
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
    // The limits whose pools hold file descriptors fit what the process may open; a
    // limit set by a flag is taken as given.
    let open_files = os::raise_open_files_limit();
    tracing::info!(open_files, "open-file limit");
    config.fit_open_files(open_files);
    let set = |limit: &mut usize, flag: Option<usize>| *limit = flag.unwrap_or(*limit);
    set(
        &mut config.max_connections_per_tunnel,
        args.max_connections_per_tunnel,
    );
    set(
        &mut config.max_connections_per_agent,
        args.max_connections_per_agent,
    );
    set(&mut config.max_connections, args.max_connections);
    set(
        &mut config.max_pending_handshakes,
        args.max_pending_handshakes,
    );
    set(
        &mut config.max_pending_agent_handshakes,
        args.max_pending_handshakes,
    );
    set(&mut config.max_agent_sessions, args.max_agent_sessions);
    if let Some(mib) = args.buffer_budget {
        config.buffer_budget = mib.saturating_mul(1024 * 1024);
    }
    config.max_leases_per_token = args.max_leases_per_token;
    config.max_leases = args.max_leases;
    config.handshake_timeout = Duration::from_secs_f64(args.handshake_timeout);
    config.shutdown_grace = Duration::from_secs_f64(args.shutdown_grace);
    config.idle_timeout = Some(Duration::from_secs_f64(args.idle_timeout)).filter(|t| !t.is_zero());
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
    // Plain `NAME=value` lines (what scripts grep for) and one `export` line after
    // them, so that the block pasted into a shell exports all of them.
    let mut ready = "relay ready. In the container, run:\n".to_string();
    ready += &format!(
        "PORTFERRY_RELAY={agent_host}:{}\n",
        relay.agent_addr().port()
    );
    if args.tokens_file.is_none() && args.tokens.is_empty() {
        ready += &format!("PORTFERRY_TOKEN={}\n", tokens[0].expose());
    } else {
        ready += "# and PORTFERRY_TOKEN=<one of the configured tokens>\n";
    }
    let mut exported = "export PORTFERRY_RELAY PORTFERRY_TOKEN".to_string();
    if let Some(ca) = ca_path {
        ready += &format!("PORTFERRY_RELAY_CA={}\n", ca.display());
        exported += " PORTFERRY_RELAY_CA";
    }
    ready += &exported;
    ready += "\n";
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

    /// Runs `work` unless a Ctrl-C or SIGTERM comes first (`None` then).
    async fn unless<T>(&mut self, work: impl std::future::Future<Output = T>) -> Option<T> {
        tokio::select! {
            done = work => Some(done),
            () = self.next() => None,
        }
    }

    /// Runs `closing` (after the first signal, or a failure) for at most
    /// [`CLOSE_WAIT`]; a signal meanwhile exits the process at once, with status 130.
    async fn closing(
        &mut self,
        closing: impl std::future::Future<Output = Result<(), portferry::Error>>,
    ) {
        tracing::info!("closing the tunnels; Ctrl-C again to exit at once");
        match self.unless(tokio::time::timeout(CLOSE_WAIT, closing)).await {
            Some(Ok(Ok(()))) => {}
            Some(Ok(Err(e))) => tracing::warn!(error = %e, "could not close the tunnel cleanly"),
            Some(Err(_)) => tracing::warn!(
                "the relay did not confirm the close within {CLOSE_WAIT:?}; exiting (its lease runs out)"
            ),
            None => {
                tracing::warn!("exiting at once");
                std::process::exit(130);
            }
        }
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

/// The lines describing a tunnel's address.
fn describe(address: &TunnelAddress) -> String {
    let (host, port) = address.tls_socket();
    let mut text = format!("url:        {}\ntls socket: {host}:{port}\n", address.url());
    if let Ok((host, port)) = address.tcp_socket() {
        text += &format!("tcp socket: {host}:{port}\n");
    }
    text
}

/// How long a stopping `forward` or `demo` waits for the relay to confirm the close.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// The addresses `--to HOST:PORT` stands for, IPv4 first (so `localhost` is
/// 127.0.0.1, then ::1).
async fn resolve_target(to: &str) -> Result<Vec<SocketAddr>> {
    let mut addrs: Vec<SocketAddr> = tokio::net::lookup_host(to)
        .await
        .with_context(|| format!("cannot resolve --to {to}"))?
        .collect();
    addrs.sort_by_key(SocketAddr::is_ipv6);
    addrs.dedup();
    if addrs.is_empty() {
        bail!("--to {to} resolves to no address");
    }
    Ok(addrs)
}

async fn forward(args: ForwardArgs) -> Result<()> {
    let mut signals = ShutdownSignals::new()?;
    let config = AgentConfig::from_env()?;
    let mut requests = Vec::new();
    for spec in args.specs()? {
        let local_addrs = match &spec.to {
            Some(to) => resolve_target(to).await?,
            None => Vec::new(),
        };
        let options = ForwardOptions::new()
            .unencrypted(spec.unencrypted)
            .h2(spec.h2)
            .local_addrs(local_addrs);
        requests.push((spec.port, options));
    }
    // A relay at its sessions' limit (or this token's or address's share of them)
    // refuses the link for now: wait and try again; only a refused token or version ends
    // the command. A port refused at a limit fails it (the agent's own tunnels may be
    // what holds that limit), naming the port and the limit.
    let connect = retry_at_limits(|| Agent::connect(config.clone()), say_retrying);
    let Some(agent) = signals.unless(connect).await else {
        return Ok(());
    };
    let agent = agent?;
    let mut tunnels = Vec::new();
    for (port, options) in requests {
        match signals.unless(agent.forward_with(port, options)).await {
            Some(Ok(tunnel)) => {
                say(&format!(
                    "port:       {port}\n{}\n",
                    describe(&tunnel.address())
                ));
                tunnels.push(tunnel);
            }
            Some(Err(e)) => {
                if !tunnels.is_empty() {
                    signals.closing(close_all(tunnels)).await;
                }
                return Err(e).with_context(|| format!("cannot forward port {port}"));
            }
            None => {
                signals.closing(close_all(tunnels)).await;
                return Ok(());
            }
        }
    }
    say("forwarding; Ctrl-C to stop\n");
    if let Some(stop) = signals.unless(follow(&agent, &tunnels)).await {
        signals.closing(close_all(tunnels)).await;
        return Err(stop);
    }
    signals.closing(close_all(tunnels)).await;
    Ok(())
}

/// Tells the user that the relay refused at a limit and when the next try is.
fn say_retrying(refusal: &portferry::Error, delay: Duration) {
    tracing::warn!("{refusal}; trying again in {delay:.1?}");
}

/// Prints the new address of each tunnel that moves, until forwarding cannot go on: a
/// tunnel is lost, or the relay refuses the agent. Says why.
async fn follow(agent: &Agent, tunnels: &[Tunnel]) -> anyhow::Error {
    let (changed, mut changes) = tokio::sync::mpsc::channel(tunnels.len().max(1));
    // Dropped on return, which ends the watchers.
    let mut watchers = tokio::task::JoinSet::new();
    for tunnel in tunnels {
        let (port, mut state, changed) = (tunnel.port(), tunnel.state(), changed.clone());
        watchers.spawn(async move {
            while state.changed().await.is_ok() {
                let now = state.borrow_and_update().clone();
                if changed.send((port, now)).await.is_err() {
                    return;
                }
            }
        });
    }
    loop {
        tokio::select! {
            reason = agent.gave_up() => {
                return anyhow::anyhow!("{reason}; the relay refuses this agent, so the tunnels are gone");
            }
            Some((port, state)) = changes.recv() => match state {
                TunnelState::Lost { error, .. } => {
                    return anyhow::anyhow!("the tunnel of port {port} is gone: {error}");
                }
                moved => say(&format!(
                    "moved:      port {port}; the relay no longer held its old address\nport:       {port}\n{}\n",
                    describe(moved.address())
                )),
            }
        }
    }
}

/// Closes every tunnel at once and waits for the relay to confirm each; the last error,
/// if any.
async fn close_all(tunnels: Vec<Tunnel>) -> Result<(), portferry::Error> {
    let mut closing = tokio::task::JoinSet::new();
    for tunnel in tunnels {
        closing.spawn(tunnel.close());
    }
    let mut outcome = Ok(());
    while let Some(closed) = closing.join_next().await {
        if let Ok(Err(e)) = closed {
            outcome = Err(e);
        }
    }
    outcome
}

async fn demo(args: StateArgs) -> Result<()> {
    let mut signals = ShutdownSignals::new()?;
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
        describe(&tunnel.address()),
        pki.ca_cert_path.display(),
        tunnel.url()
    ));
    signals.next().await;
    signals.closing(tunnel.close()).await;
    Ok(())
}
