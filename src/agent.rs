//! The library used inside containers: connect to a relay and forward ports.
//!
//! [`forward`] uses an agent configured from the environment (`PORTFERRY_RELAY`,
//! `PORTFERRY_TOKEN`, optional `PORTFERRY_RELAY_CA`); [`Agent::connect`] takes an
//! explicit [`AgentConfig`]. One agent holds one link to the relay, whatever the
//! number of tunnels and connections.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{oneshot, OnceCell};
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_rustls::client::TlsStream;

use crate::error::Error;
use crate::link::{
    self, ControlReceiver, ControlSender, FrameReader, FrameWriter, LinkConfig, CONTROL_QUEUE,
};
use crate::netstack::{
    lock, InnerStream, ListenError, Listener, ListenerStopper, Stack, StackConfig,
};
use crate::token::Token;
use crate::wire::{
    ErrorCode, ErrorFrame, ForwardRequest, Forwarded, Frame, Hello, PROTOCOL_VERSION,
};

/// Environment variable naming the relay's agent endpoint, `host:port`.
pub const ENV_RELAY: &str = "PORTFERRY_RELAY";
/// Environment variable holding the agent token.
pub const ENV_TOKEN: &str = "PORTFERRY_TOKEN";
/// Environment variable naming a PEM file of CA certificates to trust for the relay
/// instead of the system's roots.
pub const ENV_RELAY_CA: &str = "PORTFERRY_RELAY_CA";

/// How to reach a relay.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The relay's agent endpoint, `host:port`; `host` is also the TLS server name.
    pub relay: String,
    /// The agent's secret.
    pub token: Token,
    /// CA certificates (PEM) to trust for the relay; the system's roots if `None`.
    pub relay_ca: Option<PathBuf>,
    /// Limit for connecting, the TLS handshake and the relay's welcome, each.
    pub connect_timeout: Duration,
    /// Limit for the relay's answer to a request.
    pub request_timeout: Duration,
    /// Heartbeats and batching of the link.
    pub link: LinkConfig,
    /// Settings of the agent's userspace stack.
    pub stack: StackConfig,
}

impl AgentConfig {
    /// A configuration with default timeouts.
    pub fn new(relay: impl Into<String>, token: Token) -> Self {
        AgentConfig {
            relay: relay.into(),
            token,
            relay_ca: None,
            connect_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(10),
            link: LinkConfig::default(),
            stack: StackConfig::agent(),
        }
    }

    /// Reads `PORTFERRY_RELAY`, `PORTFERRY_TOKEN` and `PORTFERRY_RELAY_CA`.
    pub fn from_env() -> Result<Self, Error> {
        Self::from_lookup(|name| std::env::var(name).ok().filter(|value| !value.is_empty()))
    }

    fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, Error> {
        let (relay, token) = (lookup(ENV_RELAY), lookup(ENV_TOKEN));
        let missing: Vec<_> = [(ENV_RELAY, relay.is_none()), (ENV_TOKEN, token.is_none())]
            .into_iter()
            .filter_map(|(name, absent)| absent.then_some(name))
            .collect();
        let (Some(relay), Some(token)) = (relay, token) else {
            return Err(Error::NotConfigured { missing });
        };
        let mut config = AgentConfig::new(relay, Token::new(token));
        config.relay_ca = lookup(ENV_RELAY_CA).map(PathBuf::from);
        config.server_name()?;
        Ok(config)
    }

    /// The relay's host, as the name its certificate must carry.
    fn server_name(&self) -> Result<ServerName<'static>, Error> {
        let host = match self.relay.rsplit_once(':') {
            Some((host, port)) if port.parse::<u16>().is_ok() => {
                host.trim_start_matches('[').trim_end_matches(']')
            }
            _ => {
                return Err(Error::InvalidConfig {
                    name: ENV_RELAY,
                    reason: format!("{:?} is not host:port", self.relay),
                })
            }
        };
        ServerName::try_from(host.to_owned()).map_err(|_| Error::InvalidConfig {
            name: ENV_RELAY,
            reason: format!("{host:?} is not a valid host name or address"),
        })
    }
}

/// What to forward and how.
#[derive(Debug, Clone, Default)]
pub struct ForwardOptions {
    /// Also expose the port as raw TCP on a relay port ([`Tunnel::tcp_socket`]).
    pub unencrypted: bool,
    /// Offer HTTP/2 (ALPN `h2`) on the TLS side; needs TLS, so not with `unencrypted`.
    pub h2: bool,
    /// Where the service listens; `127.0.0.1:<port>` if `None`.
    pub local_addr: Option<SocketAddr>,
}

/// A connection to a relay, shared by every tunnel made through it. Cheap to clone.
#[derive(Clone)]
pub struct Agent {
    shared: Arc<Shared>,
}

struct Shared {
    config: AgentConfig,
    /// Random identity presented on every link, so that the relay gives a reconnecting
    /// agent back the hostnames and ports it leased.
    identity: [u8; 16],
    /// One stack for the agent's whole life: listeners survive a lost link, connections
    /// do not.
    stack: Stack,
    /// Sends control frames on the current link; `None` while disconnected.
    control: Mutex<Option<ControlSender>>,
    next_request: AtomicU32,
    /// Requests waiting for the relay's answer, by request id.
    pending: Mutex<HashMap<u32, oneshot::Sender<Result<Forwarded, Error>>>>,
    /// Tunnels waiting for the relay to confirm their close, by port.
    closing: Mutex<HashMap<u16, oneshot::Sender<()>>>,
    /// Open tunnels and their options by port, asked for again after a reconnect.
    tunnels: Mutex<HashMap<u16, (Forwarded, ForwardOptions)>>,
    /// Inner ports handed out to [`Agent::listen`] so far.
    next_listen_port: Mutex<u16>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.stack.close();
    }
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("relay", &self.shared.config.relay)
            .finish_non_exhaustive()
    }
}

/// Inner ports [`Agent::listen`] draws from (the top of the port space).
const LISTEN_PORTS_START: u16 = 61_000;
/// First delay before reconnecting; doubles per failed attempt up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
/// Longest delay between reconnect attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

type LinkHalves = (
    FrameReader<ReadHalf<TlsStream<TcpStream>>>,
    FrameWriter<WriteHalf<TlsStream<TcpStream>>>,
);

/// One attempt to connect, authenticate and be welcomed.
async fn open_link(config: &AgentConfig, identity: &[u8; 16]) -> Result<LinkHalves, Error> {
    let hello = Frame::Hello(Hello {
        version: PROTOCOL_VERSION,
        token: config.token.expose().to_owned(),
        resume: bytes::Bytes::copy_from_slice(identity),
    });
    // Encoding panics on a field too long for a frame: refuse such a token cleanly.
    hello.validate().map_err(|_| Error::InvalidConfig {
        name: ENV_TOKEN,
        reason: "the token is longer than a hello frame can carry".into(),
    })?;
    let server_name = config.server_name()?;
    let tls = crate::tls::client_config_from(config.relay_ca.as_deref())?;
    let limit = config.connect_timeout;
    let unreachable = |reason: String| Error::RelayUnreachable {
        relay: config.relay.clone(),
        reason,
    };
    let tcp = match timeout(limit, TcpStream::connect(&config.relay)).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => return Err(unreachable(e.to_string())),
        Err(_) => return Err(unreachable(format!("no answer within {limit:?}"))),
    };
    tcp.set_nodelay(true)?;
    let connector = tokio_rustls::TlsConnector::from(tls);
    let stream = match timeout(limit, connector.connect(server_name, tcp)).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(source)) => {
            return Err(Error::RelayTls {
                relay: config.relay.clone(),
                source,
            })
        }
        Err(_) => {
            return Err(Error::Timeout {
                waiting_for: "the TLS handshake with the relay",
            })
        }
    };
    let (read_half, write_half) = tokio::io::split(stream);
    let (mut reader, mut writer) = (FrameReader::new(read_half), FrameWriter::new(write_half));
    writer
        .send(&hello)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    match reader.read_frame_within(limit).await {
        Ok(Some(Frame::Welcome(_))) => Ok((reader, writer)),
        Ok(Some(Frame::Error(refusal))) => Err(refusal_error(refusal)),
        Ok(_) => Err(unreachable(
            "the relay closed the link during the handshake".into(),
        )),
        Err(link::LinkError::Idle(_)) => Err(Error::Timeout {
            waiting_for: "the relay's welcome",
        }),
        Err(e) => Err(unreachable(e.to_string())),
    }
}

/// Runs the agent's links for as long as the agent exists: when a link is lost, its
/// connections are reset, the agent reconnects with capped, jittered exponential
/// backoff, and asks again for every open tunnel (the relay's lease gives back the same
/// hostname and port). Holds only a weak reference, so dropping every `Agent` ends it.
async fn maintain(agent: Weak<Shared>, mut halves: LinkHalves, mut outbound: ControlReceiver) {
    loop {
        let (reader, writer) = halves;
        let (inbound_tx, mut inbound) = mpsc::channel(CONTROL_QUEUE);
        let (stack, link_config) = {
            let Some(shared) = agent.upgrade() else {
                return;
            };
            (shared.stack.clone(), shared.config.link.clone())
        };
        let dispatch = async {
            while let Some(frame) = inbound.recv().await {
                let Some(shared) = agent.upgrade() else { break };
                shared.dispatch(frame);
            }
        };
        let (result, ()) = tokio::join!(
            link::run(reader, writer, stack, inbound_tx, outbound, link_config),
            dispatch
        );
        {
            let Some(shared) = agent.upgrade() else {
                return;
            };
            *lock(&shared.control) = None;
            shared.stack.reset_connections();
            shared.fail_pending();
            match result {
                Ok(()) => {
                    tracing::warn!(relay = %shared.config.relay, "relay closed the link; reconnecting")
                }
                Err(e) => {
                    tracing::warn!(relay = %shared.config.relay, error = %e, "link lost; reconnecting")
                }
            }
        }
        let mut backoff = FIRST_BACKOFF;
        halves = loop {
            // Full jitter in [backoff/2, backoff): agents that lost the same relay spread out.
            let jitter = rand::random_range(0..=backoff.as_millis() as u64 / 2);
            tokio::time::sleep(backoff / 2 + Duration::from_millis(jitter)).await;
            let Some(shared) = agent.upgrade() else {
                return;
            };
            match open_link(&shared.config, &shared.identity).await {
                Ok(halves) => {
                    outbound = shared.install_control();
                    tokio::spawn(reforward(Arc::downgrade(&shared)));
                    break halves;
                }
                Err(e @ (Error::Unauthorized | Error::VersionMismatch { .. })) => {
                    tracing::error!(error = %e, "the relay refuses this agent; giving up");
                    return;
                }
                Err(e) => tracing::debug!(error = %e, ?backoff, "reconnect failed"),
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        };
        tracing::info!("reconnected to the relay");
    }
}

/// After a reconnect, asks the relay again for every open tunnel.
async fn reforward(agent: Weak<Shared>) {
    let Some(shared) = agent.upgrade() else {
        return;
    };
    let open: Vec<(Forwarded, ForwardOptions)> = lock(&shared.tunnels).values().cloned().collect();
    let agent = Agent { shared };
    for (before, options) in open {
        match agent.request(before.port, &options).await {
            Ok(now) if now.hostname == before.hostname && now.tcp_port == before.tcp_port => {}
            Ok(now) => tracing::error!(
                port = before.port,
                old = %before.hostname,
                new = %now.hostname,
                "the relay no longer held this tunnel's lease: it has a new address"
            ),
            Err(e) => tracing::error!(port = before.port, error = %e, "could not restore a tunnel"),
        }
    }
}

impl Agent {
    /// Connects to the relay, authenticates, and starts the link. The agent keeps the
    /// link up from then on, reconnecting when it is lost.
    pub async fn connect(config: AgentConfig) -> Result<Agent, Error> {
        let identity: [u8; 16] = rand::random();
        let halves = open_link(&config, &identity).await?;
        let agent = Agent {
            shared: Arc::new(Shared {
                stack: Stack::new(config.stack.clone()),
                identity,
                control: Mutex::new(None),
                next_request: AtomicU32::new(1),
                pending: Mutex::new(HashMap::new()),
                closing: Mutex::new(HashMap::new()),
                tunnels: Mutex::new(HashMap::new()),
                next_listen_port: Mutex::new(LISTEN_PORTS_START),
                config,
            }),
        };
        // Installed before returning, so a forward right after connect finds the link.
        let outbound = agent.shared.install_control();
        tokio::spawn(maintain(Arc::downgrade(&agent.shared), halves, outbound));
        Ok(agent)
    }

    /// Forwards `port` with default options; see [`forward_with`](Self::forward_with).
    pub async fn forward(&self, port: u16) -> Result<Tunnel, Error> {
        self.forward_with(port, ForwardOptions::default()).await
    }

    /// Asks the relay for a tunnel to the local service on `port`: connections to the
    /// tunnel's URL (and TCP socket, if `unencrypted`) reach `127.0.0.1:<port>` (or
    /// `options.local_addr`). A client of a service that is not listening sees its
    /// connection refused.
    pub async fn forward_with(&self, port: u16, options: ForwardOptions) -> Result<Tunnel, Error> {
        let listener = self.listen_on(port, &options)?;
        let forwarded = self.request(port, &options).await?;
        self.remember(&forwarded, &options);
        let target = options
            .local_addr
            .unwrap_or(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
        let connect_timeout = self.shared.config.connect_timeout;
        let stopper = listener.stopper();
        let task = tokio::spawn(crate::splice::forward_to(listener, target, connect_timeout));
        Ok(Tunnel::new(self.clone(), forwarded, Some((task, stopper))))
    }

    /// Opens a tunnel whose connections are handed to the program itself, straight
    /// from the userspace stack: no local port is bound.
    pub async fn listen(&self, options: ForwardOptions) -> Result<TunnelListener, Error> {
        let (port, listener) = loop {
            let port = {
                let mut next = lock(&self.shared.next_listen_port);
                let port = *next;
                *next = if port == u16::MAX {
                    LISTEN_PORTS_START
                } else {
                    port + 1
                };
                port
            };
            match self.listen_on(port, &options) {
                Ok(listener) => break (port, listener),
                Err(Error::PortAlreadyForwarded(_)) => continue,
                Err(e) => return Err(e),
            }
        };
        let forwarded = self.request(port, &options).await?;
        self.remember(&forwarded, &options);
        Ok(TunnelListener {
            tunnel: Tunnel::new(self.clone(), forwarded, None),
            listener,
        })
    }

    fn listen_on(&self, port: u16, options: &ForwardOptions) -> Result<Listener, Error> {
        if port == 0 {
            return Err(Error::InvalidPort { given: "0".into() });
        }
        if options.h2 && options.unencrypted {
            return Err(Error::H2RequiresTls);
        }
        self.shared.stack.listen(port).map_err(|e| match e {
            ListenError::PortInUse(port) => Error::PortAlreadyForwarded(port),
            _ => Error::LinkClosed,
        })
    }

    /// Records an open tunnel, to ask for it again after a reconnect.
    fn remember(&self, forwarded: &Forwarded, options: &ForwardOptions) {
        lock(&self.shared.tunnels).insert(forwarded.port, (forwarded.clone(), options.clone()));
    }

    async fn request(&self, port: u16, options: &ForwardOptions) -> Result<Forwarded, Error> {
        let request_id = self.shared.next_request.fetch_add(1, Ordering::Relaxed);
        let (answer_tx, answer) = oneshot::channel();
        lock(&self.shared.pending).insert(request_id, answer_tx);
        let request = Frame::Forward(ForwardRequest {
            request_id,
            port,
            unencrypted: options.unencrypted,
            h2: options.h2,
        });
        let control = lock(&self.shared.control).clone();
        let sent = match control {
            Some(control) => control.send(request).await.is_ok(),
            None => false,
        };
        if !sent {
            lock(&self.shared.pending).remove(&request_id);
            return Err(Error::LinkClosed);
        }
        let result = timeout(self.shared.config.request_timeout, answer).await;
        lock(&self.shared.pending).remove(&request_id);
        match result {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err(Error::LinkClosed),
            Err(_) => Err(Error::Timeout {
                waiting_for: "the relay to open the tunnel",
            }),
        }
    }

    /// Whether the link to the relay is still up.
    pub fn is_connected(&self) -> bool {
        lock(&self.shared.control).is_some()
    }
}

impl Shared {
    /// Makes a fresh control channel the current link's; returns its receiving end.
    fn install_control(&self) -> ControlReceiver {
        let (control, outbound) = mpsc::channel(CONTROL_QUEUE);
        *lock(&self.control) = Some(control);
        outbound
    }

    /// Handles a control frame from the relay.
    fn dispatch(&self, frame: Frame) {
        match frame {
            Frame::Forwarded(forwarded) => {
                if let Some(waiter) = lock(&self.pending).remove(&forwarded.request_id) {
                    let _ = waiter.send(Ok(forwarded));
                }
            }
            Frame::Error(refusal) => {
                if let Some(waiter) = lock(&self.pending).remove(&refusal.request_id) {
                    let _ = waiter.send(Err(refusal_error(refusal)));
                }
            }
            Frame::Close { port } => {
                if let Some(waiter) = lock(&self.closing).remove(&port) {
                    let _ = waiter.send(());
                }
            }
            // Anything else is not for an agent; the relay is at fault but harmless.
            _ => {}
        }
    }

    /// The link is gone: every waiting request fails.
    fn fail_pending(&self) {
        for (_, waiter) in lock(&self.pending).drain() {
            let _ = waiter.send(Err(Error::LinkClosed));
        }
        lock(&self.closing).clear();
    }
}

/// The error a relay's refusal stands for.
fn refusal_error(refusal: ErrorFrame) -> Error {
    match refusal.code {
        ErrorCode::UNAUTHORIZED => Error::Unauthorized,
        ErrorCode::BAD_VERSION => Error::VersionMismatch {
            message: refusal.message,
        },
        code => Error::Refused {
            code,
            message: refusal.message,
        },
    }
}

/// An open tunnel. Dropping it closes the tunnel; [`close`](Tunnel::close) does the
/// same and waits for the relay to confirm.
#[derive(Debug)]
pub struct Tunnel {
    agent: Agent,
    forwarded: Forwarded,
    url: String,
    tcp_host: String,
    /// Serves the forwarded connections, and stops its listener at once; `None` for a
    /// [`TunnelListener`]'s tunnel.
    forwarder: Option<(JoinHandle<()>, ListenerStopper)>,
    open: bool,
}

impl Tunnel {
    fn new(
        agent: Agent,
        forwarded: Forwarded,
        forwarder: Option<(JoinHandle<()>, ListenerStopper)>,
    ) -> Self {
        let url = if forwarded.tls_port == 443 {
            format!("https://{}", forwarded.hostname)
        } else {
            format!("https://{}:{}", forwarded.hostname, forwarded.tls_port)
        };
        // The raw TCP socket is on the relay node: the hostname without the tunnel label.
        let tcp_host = forwarded
            .hostname
            .split_once('.')
            .map_or(forwarded.hostname.as_str(), |(_, node)| node)
            .to_owned();
        Tunnel {
            agent,
            forwarded,
            url,
            tcp_host,
            forwarder,
            open: true,
        }
    }

    /// The public URL, `https://<label>.<domain>`, with `:<port>` unless it is 443.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The TLS endpoint: the tunnel's hostname and the relay's public TLS port.
    pub fn tls_socket(&self) -> (&str, u16) {
        (&self.forwarded.hostname, self.forwarded.tls_port)
    }

    /// The raw TCP endpoint; only for a tunnel forwarded with `unencrypted`.
    pub fn tcp_socket(&self) -> Result<(&str, u16), Error> {
        match self.forwarded.tcp_port {
            Some(port) => Ok((&self.tcp_host, port)),
            None => Err(Error::NotUnencrypted),
        }
    }

    /// The forwarded port (for a [`TunnelListener`], the inner port it listens on).
    pub fn port(&self) -> u16 {
        self.forwarded.port
    }

    /// Closes the tunnel and waits until the relay has stopped routing to it, so the
    /// port can be forwarded again at once.
    pub async fn close(mut self) -> Result<(), Error> {
        if !self.agent.is_connected() {
            // The relay holds no route to a disconnected agent's tunnel beyond its
            // lease, and will not renew it.
            self.shutdown();
            return Ok(());
        }
        let (confirmed_tx, confirmed) = oneshot::channel();
        lock(&self.agent.shared.closing).insert(self.port(), confirmed_tx);
        self.shutdown();
        timeout(self.agent.shared.config.request_timeout, confirmed)
            .await
            .map_err(|_| Error::Timeout {
                waiting_for: "the relay to close the tunnel",
            })?
            .map_err(|_| Error::LinkClosed)
    }

    /// Stops serving and tells the relay; nothing waits.
    fn shutdown(&mut self) {
        if !std::mem::replace(&mut self.open, false) {
            return;
        }
        if let Some((forwarder, listening)) = self.forwarder.take() {
            // Stopped here rather than when the aborted task drops the listener, so the
            // port can be forwarded again right away.
            listening.stop();
            forwarder.abort();
        }
        let shared = &self.agent.shared;
        lock(&shared.tunnels).remove(&self.port());
        let Some(control) = lock(&shared.control).clone() else {
            // Disconnected: the relay's lease on the tunnel simply runs out.
            return;
        };
        if let Err(TrySendError::Full(close)) = control.try_send(Frame::Close { port: self.port() })
        {
            // The control queue is momentarily full: send it as soon as there is room.
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move { control.send(close).await });
            }
        }
    }
}

impl Drop for Tunnel {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A tunnel whose connections the program accepts itself ([`Agent::listen`]).
#[derive(Debug)]
pub struct TunnelListener {
    tunnel: Tunnel,
    listener: Listener,
}

/// A connection accepted from a [`TunnelListener`]: `AsyncRead + AsyncWrite`, served
/// straight from the userspace stack.
pub type TunnelStream = InnerStream;

impl TunnelListener {
    /// The tunnel (URL, sockets).
    pub fn tunnel(&self) -> &Tunnel {
        &self.tunnel
    }

    /// Waits for the next connection; fails once the link to the relay is gone.
    pub async fn accept(&mut self) -> Result<TunnelStream, Error> {
        loop {
            match self.listener.accept().await {
                Ok(stream) => return Ok(stream),
                // One client that stalls its handshake is no reason to stop serving.
                Err(crate::netstack::ConnectError::TimedOut) => continue,
                Err(_) => return Err(Error::LinkClosed),
            }
        }
    }

    /// Closes the tunnel and waits for the relay to confirm.
    pub async fn close(self) -> Result<(), Error> {
        self.tunnel.close().await
    }
}

/// The agent used by [`forward`], connected on first use.
static GLOBAL_AGENT: OnceCell<Agent> = OnceCell::const_new();

/// Forwards `port` through the relay named by the environment (`PORTFERRY_RELAY`,
/// `PORTFERRY_TOKEN`, optional `PORTFERRY_RELAY_CA`); every call shares one agent.
pub async fn forward(port: u16) -> Result<Tunnel, Error> {
    forward_with(port, ForwardOptions::default()).await
}

/// [`forward`] with options.
pub async fn forward_with(port: u16, options: ForwardOptions) -> Result<Tunnel, Error> {
    let agent = GLOBAL_AGENT
        .get_or_try_init(|| async { Agent::connect(AgentConfig::from_env()?).await })
        .await?;
    agent.forward_with(port, options).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(vars: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn missing_environment_is_named() {
        let message = AgentConfig::from_lookup(lookup(&[]))
            .unwrap_err()
            .to_string();
        assert!(
            message.contains(ENV_RELAY) && message.contains(ENV_TOKEN),
            "{message}"
        );
        let message = AgentConfig::from_lookup(lookup(&[(ENV_RELAY, "relay:7000")]))
            .unwrap_err()
            .to_string();
        assert!(
            !message.contains(ENV_RELAY) && message.contains(ENV_TOKEN),
            "{message}"
        );
    }

    #[tokio::test]
    async fn a_token_too_long_for_a_frame_is_refused_before_connecting() {
        // Port 1 on loopback: connecting would fail with RelayUnreachable instead.
        let config = AgentConfig::new("localhost:1", Token::new("t".repeat(70_000)));
        let refused = Agent::connect(config).await.unwrap_err();
        assert!(
            matches!(
                refused,
                Error::InvalidConfig {
                    name: ENV_TOKEN,
                    ..
                }
            ),
            "{refused:?}"
        );
    }

    #[test]
    fn relay_must_be_host_and_port() {
        let config = AgentConfig::from_lookup(lookup(&[
            (ENV_RELAY, "relay.example:7000"),
            (ENV_TOKEN, "t"),
        ]));
        assert_eq!(config.unwrap().relay, "relay.example:7000");
        let bad =
            AgentConfig::from_lookup(lookup(&[(ENV_RELAY, "relay.example"), (ENV_TOKEN, "t")]));
        assert!(matches!(
            bad,
            Err(Error::InvalidConfig {
                name: ENV_RELAY,
                ..
            })
        ));
    }
}
