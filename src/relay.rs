//! The relay server: agents connect to it, the public connects through it.
//!
//! - The **agent endpoint** takes TLS connections from agents, checks their token, and
//!   gives each session its own userspace [`Stack`]: a session can only ever reach its
//!   own agent. [`RelayHandle::serve_agent_stream`] serves an agent link on a stream
//!   secured elsewhere in the same way.
//! - The **tunnel registry** maps hostnames (`<label>.<domain>`, with a label of 128
//!   random bits from the OS) to a session and an inner port.
//! - The **public TLS edge** reads the ClientHello, routes by SNI, offers ALPN `h2` only
//!   to tunnels that asked for HTTP/2, terminates TLS and splices the plaintext into an
//!   inner connection to the agent. An unknown or missing SNI is dropped the same way
//!   every time, before any certificate is shown. Routing follows the SNI only: an
//!   HTTP `Host` header is never looked at.
//! - **Raw TCP** tunnels get a port of their own from a configured range.
//!
//! # Bounds and failure behaviour
//!
//! Every count a client or an agent can raise has a limit in [`RelayConfig`]; at a
//! limit the new piece of work is refused at once and counted in
//! [`RelayStats::refused_by_limit`], and nothing already running slows down:
//!
//! | limit | counts | at the limit |
//! |---|---|---|
//! | [`max_pending_handshakes`](RelayConfig::max_pending_handshakes) | TLS handshakes in progress, public and agent (an agent's until its hello is answered), and agent streams waiting for their hello | the new TCP connection or stream is closed |
//! | [`max_agent_sessions`](RelayConfig::max_agent_sessions) | authenticated agent links | the agent gets `LIMIT_REACHED` |
//! | [`max_tunnels_per_agent`](RelayConfig::max_tunnels_per_agent) | a session's open tunnels | the `Forward` gets `LIMIT_REACHED` |
//! | [`max_connections_per_tunnel`](RelayConfig::max_connections_per_tunnel) | public connections of one tunnel | a TLS connection is closed after its ClientHello; a raw TCP one is reset |
//! | [`max_connections_per_agent`](RelayConfig::max_connections_per_agent) | public connections of all of an agent's tunnels | the same |
//!
//! Before it is authenticated, a connection to the agent endpoint gets one deadline,
//! [`handshake_timeout`](RelayConfig::handshake_timeout), for the TLS handshake *and*
//! its hello (a stream given to [`RelayHandle::serve_agent_stream`], for its hello), and
//! can make the relay buffer little: besides the TLS session's own bounded buffers, a
//! hello is read only once its header says it is a hello of at most [`MAX_HELLO_LEN`]
//! bytes. A public TLS connection gets the same deadline for its whole handshake.
//! Garbage, a silent peer or a bad hello close the connection and are counted in
//! [`RelayStats::failed_handshakes`]; a wrong token in [`RelayStats::unauthorized`]; an
//! unknown SNI in [`RelayStats::unknown_sni`].
//!
//! Packets from an agent are untrusted too: the session's stack takes only packets of
//! connections the relay opened, and never listens, so a SYN from an agent is answered
//! with a RST and counted in [`StackStats::refused_syns`].
//!
//! # Shutdown
//!
//! [`Relay::run_until`] (or [`RelayHandle::shutdown`]) first closes the listeners
//! (public, agent and raw TCP ports) and refuses new tunnels and agent streams, then
//! lets open public connections finish for up to
//! [`shutdown_grace`](RelayConfig::shutdown_grace), then ends every session and
//! connection.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use rand::TryRngCore;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::{AbortHandle, JoinHandle};
use tokio::time::{timeout, timeout_at, Instant};
use tokio_rustls::{LazyConfigAcceptor, TlsAcceptor};

use crate::error::Error;
use crate::link::{self, ControlSender, FrameReader, FrameWriter, LinkConfig, CONTROL_QUEUE};
use crate::netstack::{lock, Stack, StackConfig, StackStats};
use crate::tls::ServerIdentity;
use crate::token::Token;
use crate::wire::{
    ErrorCode, ErrorFrame, ForwardRequest, Forwarded, Frame, FrameKind, Hello, Welcome, HEADER_LEN,
    PROTOCOL_VERSION,
};

/// The domain of a relay for one machine. Not plain `localhost`: certificate checkers
/// refuse a wildcard directly under a single label (`*.localhost`), while
/// `*.portferry.localhost` is fine, and clients resolve every `*.localhost` to loopback.
pub const LOCAL_DOMAIN: &str = "portferry.localhost";

/// Largest payload of an agent's hello, in bytes. A hello whose header claims more is
/// refused before any of it is read, so an unauthenticated peer cannot make the relay
/// buffer a whole maximal frame.
pub const MAX_HELLO_LEN: usize = 4096;

/// How long [`Relay::run_until`] waits, after the grace period, for its tasks to end.
const STOP_WAIT: Duration = Duration::from_secs(1);
/// How often a draining relay looks whether its connections have ended.
const DRAIN_POLL: Duration = Duration::from_millis(20);

/// Settings of a relay.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Where agents connect (TLS).
    pub agent_addr: SocketAddr,
    /// Where the public connects with TLS (`https://…`).
    pub public_tls_addr: SocketAddr,
    /// The TLS port shown in URLs, if not the bound one (behind a load balancer).
    pub public_tls_port: Option<u16>,
    /// Address raw TCP tunnel ports are bound on.
    pub tcp_bind: IpAddr,
    /// Ports raw TCP tunnels are given from.
    pub tcp_ports: RangeInclusive<u16>,
    /// Domain tunnel hostnames are made under.
    pub domain: String,
    /// This relay node's name, if hostnames are sharded by node (`<label>.<node>.<domain>`).
    pub node: Option<String>,
    /// Tokens agents may present.
    pub tokens: Vec<Token>,
    /// Certificate (a wildcard for the tunnel hostnames) and key of the public edge and
    /// the agent endpoint.
    pub identity: ServerIdentity,
    /// Deadline for the whole unauthenticated phase of a connection: a public TLS
    /// handshake, or an agent's TLS handshake and hello together (just the hello on a
    /// stream given to [`RelayHandle::serve_agent_stream`]). A connection that
    /// has not finished by then is closed and counted in
    /// [`RelayStats::failed_handshakes`].
    pub handshake_timeout: Duration,
    /// Tunnels one agent session may have open at once; the next `Forward` is refused
    /// with `LIMIT_REACHED`.
    pub max_tunnels_per_agent: usize,
    /// Public connections (TLS and raw TCP) one tunnel may have open at once; the next
    /// one is closed (TLS) or reset (raw TCP).
    pub max_connections_per_tunnel: usize,
    /// Public connections all tunnels of one agent session may have open at once; the
    /// next one is closed (TLS) or reset (raw TCP).
    pub max_connections_per_agent: usize,
    /// TLS handshakes in progress on the public port and the agent port together (an
    /// agent's lasts until its hello is answered), and streams given to
    /// [`RelayHandle::serve_agent_stream`] until their hello is answered; a connection
    /// or stream beyond it is closed as soon as it is accepted.
    pub max_pending_handshakes: usize,
    /// Authenticated agent sessions at once; an agent beyond it is refused with
    /// `LIMIT_REACHED` (and tries again later).
    pub max_agent_sessions: usize,
    /// How long a shutting-down relay lets open public connections finish before it
    /// drops them.
    pub shutdown_grace: Duration,
    /// How long the hostnames and TCP ports of an agent whose link was lost stay
    /// reserved for it: an agent that reconnects within it (presenting the same
    /// identity and token) gets the same URLs back.
    pub lease_grace: Duration,
    /// Where leases are kept across restarts: a relay started on the same file gives
    /// reconnecting agents their hostnames and TCP ports back (each lease is honoured for
    /// [`lease_grace`](Self::lease_grace) after the start). `None`: leases live in memory.
    pub lease_file: Option<PathBuf>,
    /// Heartbeats and batching of agent links.
    pub link: LinkConfig,
    /// Settings of each session's userspace stack.
    pub stack: StackConfig,
}

impl RelayConfig {
    /// Default of [`handshake_timeout`](Self::handshake_timeout): 10 s.
    pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
    /// Default of [`max_tunnels_per_agent`](Self::max_tunnels_per_agent).
    pub const DEFAULT_MAX_TUNNELS_PER_AGENT: usize = 64;
    /// Default of [`max_connections_per_tunnel`](Self::max_connections_per_tunnel).
    pub const DEFAULT_MAX_CONNECTIONS_PER_TUNNEL: usize = 1024;
    /// Default of [`max_connections_per_agent`](Self::max_connections_per_agent).
    pub const DEFAULT_MAX_CONNECTIONS_PER_AGENT: usize = 10_000;
    /// Default of [`max_pending_handshakes`](Self::max_pending_handshakes).
    pub const DEFAULT_MAX_PENDING_HANDSHAKES: usize = 1024;
    /// Default of [`max_agent_sessions`](Self::max_agent_sessions).
    pub const DEFAULT_MAX_AGENT_SESSIONS: usize = 1024;
    /// Default of [`shutdown_grace`](Self::shutdown_grace): 10 s.
    pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
    /// Default of [`lease_grace`](Self::lease_grace): 60 s.
    pub const DEFAULT_LEASE_GRACE: Duration = Duration::from_secs(60);

    /// Settings for one machine: everything on loopback, domain [`LOCAL_DOMAIN`], the given
    /// ports (0 picks a free one), raw TCP ports from 20000 to 29999, and the default
    /// limits and timeouts (the `DEFAULT_*` constants).
    pub fn local(
        identity: ServerIdentity,
        tokens: Vec<Token>,
        agent_port: u16,
        public_tls_port: u16,
    ) -> Self {
        let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
        RelayConfig {
            agent_addr: SocketAddr::new(loopback, agent_port),
            public_tls_addr: SocketAddr::new(loopback, public_tls_port),
            public_tls_port: None,
            tcp_bind: loopback,
            tcp_ports: 20_000..=29_999,
            domain: LOCAL_DOMAIN.into(),
            node: None,
            tokens,
            identity,
            handshake_timeout: Self::DEFAULT_HANDSHAKE_TIMEOUT,
            max_tunnels_per_agent: Self::DEFAULT_MAX_TUNNELS_PER_AGENT,
            max_connections_per_tunnel: Self::DEFAULT_MAX_CONNECTIONS_PER_TUNNEL,
            max_connections_per_agent: Self::DEFAULT_MAX_CONNECTIONS_PER_AGENT,
            max_pending_handshakes: Self::DEFAULT_MAX_PENDING_HANDSHAKES,
            max_agent_sessions: Self::DEFAULT_MAX_AGENT_SESSIONS,
            shutdown_grace: Self::DEFAULT_SHUTDOWN_GRACE,
            lease_grace: Self::DEFAULT_LEASE_GRACE,
            lease_file: None,
            link: LinkConfig::default(),
            stack: StackConfig::relay(),
        }
    }

    /// The domain under which this node's tunnels are named.
    fn node_domain(&self) -> String {
        match &self.node {
            Some(node) => format!("{node}.{}", self.domain),
            None => self.domain.clone(),
        }
    }
}

/// A snapshot of a relay's gauges and counters ([`RelayHandle::stats`]). Counters
/// count since the relay was bound.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RelayStats {
    /// Authenticated agent sessions.
    pub agent_sessions: usize,
    /// Tunnels currently routed.
    pub tunnels: usize,
    /// Public connections (TLS and raw TCP) admitted to a tunnel and not yet ended.
    pub public_connections: usize,
    /// TLS handshakes in progress (public, and agents' until their hello is answered),
    /// and agent streams waiting for their hello to be answered.
    pub pending_handshakes: usize,
    /// Connections, sessions and tunnels refused because a limit was reached.
    pub refused_by_limit: u64,
    /// Public TLS connections closed for an unknown or missing SNI.
    pub unknown_sni: u64,
    /// Connections closed during their handshake: timeouts, TLS errors, garbage, a
    /// missing, malformed or oversized hello, an unsupported protocol version.
    pub failed_handshakes: u64,
    /// Agents refused for a missing or wrong token.
    pub unauthorized: u64,
    /// The relay-side stacks' counters, summed over the live sessions (a session's
    /// counts leave the sum when it ends).
    pub stacks: StackStats,
}

/// A bound relay; [`run`](Relay::run) or [`run_until`](Relay::run_until) serves it.
pub struct Relay {
    shared: Arc<Shared>,
    agents: TcpListener,
    public: TcpListener,
}

/// A cheap, cloneable view of a relay that stays usable while
/// [`run`](Relay::run) owns the [`Relay`]: statistics and shutdown.
#[derive(Clone)]
pub struct RelayHandle {
    shared: Arc<Shared>,
}

/// Where a relay is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Accepting and serving.
    Running,
    /// Listeners closed, open connections finishing.
    Draining,
    /// Everything ended.
    Stopped,
}

struct Shared {
    config: RelayConfig,
    public_tls_port: u16,
    agent_tls: TlsAcceptor,
    http1: Arc<rustls::ServerConfig>,
    http2: Arc<rustls::ServerConfig>,
    routes: Mutex<HashMap<String, Route>>,
    /// Live sessions' stacks by session id, for statistics.
    sessions: Mutex<HashMap<u64, Stack>>,
    /// The live session of each agent identity: a newer session of the same agent
    /// replaces it.
    identities: Mutex<HashMap<AgentKey, (u64, Stack)>>,
    /// Tunnels by agent identity and port: what a reconnecting agent gets back.
    leases: Mutex<HashMap<(AgentKey, u16), Lease>>,
    /// Serializes writes of [`RelayConfig::lease_file`], so the last one wins.
    lease_saves: Mutex<()>,
    next_session: AtomicU64,
    /// Permits for handshakes in progress ([`RelayConfig::max_pending_handshakes`]).
    handshakes: Arc<Semaphore>,
    /// Permits for authenticated sessions ([`RelayConfig::max_agent_sessions`]).
    session_slots: Arc<Semaphore>,
    /// Public connections admitted and not yet ended.
    public_connections: AtomicUsize,
    counters: Counters,
    phase: watch::Sender<Phase>,
    /// Every task serving a session or a connection, so that a stop can end them.
    tasks: Mutex<Tasks>,
}

#[derive(Debug, Default)]
struct Counters {
    refused_by_limit: AtomicU64,
    unknown_sni: AtomicU64,
    failed_handshakes: AtomicU64,
    unauthorized: AtomicU64,
}

#[derive(Default)]
struct Tasks {
    next: u64,
    /// Live tasks by id; `None` while one is being spawned.
    live: HashMap<u64, Option<AbortHandle>>,
    stopped: bool,
}

/// Who an agent is across its links: the identity it presents and the token it used.
type AgentKey = ([u8; 16], usize);

/// The owner of a lease restored from [`RelayConfig::lease_file`] whose agent has not
/// come back yet (sessions are numbered from 1).
const RESTORED: u64 = 0;

/// A tunnel reserved for an agent identity, while its session lives and for
/// [`RelayConfig::lease_grace`] after.
struct Lease {
    hostname: String,
    tcp_port: Option<u16>,
    h2: bool,
    unencrypted: bool,
    /// The session holding it now.
    owner: u64,
    /// Accepts the tunnel's raw TCP connections; kept through the grace period, so the
    /// port stays reserved.
    tcp_acceptor: Option<AbortHandle>,
}

impl Lease {
    /// One line of the lease file: identity (hex), token index, port, hostname, TCP port
    /// (`-` if none), h2 (0/1), unencrypted (0/1).
    fn to_line(&self, (identity, token): &AgentKey, port: u16) -> String {
        let identity: String = identity.iter().map(|b| format!("{b:02x}")).collect();
        let tcp_port = self
            .tcp_port
            .map_or("-".to_string(), |port| port.to_string());
        format!(
            "{identity} {token} {port} {} {tcp_port} {} {}\n",
            self.hostname,
            u8::from(self.h2),
            u8::from(self.unencrypted)
        )
    }

    /// Reads a line written by [`to_line`](Self::to_line); `None` if it is damaged.
    fn from_line(line: &str) -> Option<(AgentKey, u16, Lease)> {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [identity, token, port, hostname, tcp_port, h2, unencrypted] = fields[..] else {
            return None;
        };
        if identity.len() != 32 {
            return None;
        }
        let mut id = [0u8; 16];
        for (i, byte) in id.iter_mut().enumerate() {
            *byte = u8::from_str_radix(identity.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        let flag = |text: &str| match text {
            "0" => Some(false),
            "1" => Some(true),
            _ => None,
        };
        let tcp_port = match tcp_port {
            "-" => None,
            port => Some(port.parse().ok()?),
        };
        let lease = Lease {
            hostname: hostname.to_ascii_lowercase(),
            tcp_port,
            h2: flag(h2)?,
            unencrypted: flag(unencrypted)?,
            owner: RESTORED,
            tcp_acceptor: None,
        };
        Some(((id, token.parse().ok()?), port.parse().ok()?, lease))
    }
}

/// Where connections to one tunnel hostname go.
#[derive(Clone)]
struct Route {
    /// The session serving it ([`RESTORED`] for a restored lease).
    session: u64,
    stack: Stack,
    port: u16,
    h2: bool,
    /// Places for this tunnel's public connections.
    tunnel_connections: Arc<Semaphore>,
    /// Places for the public connections of every tunnel of the session.
    agent_connections: Arc<Semaphore>,
}

/// A public connection's places in its tunnel's and its agent's limits; counted in
/// [`RelayStats::public_connections`] while it lives.
struct ConnectionPermit {
    shared: Arc<Shared>,
    _tunnel: OwnedSemaphorePermit,
    _agent: OwnedSemaphorePermit,
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        self.shared
            .public_connections
            .fetch_sub(1, Ordering::Relaxed);
    }
}

impl Route {
    /// Admits one more public connection, or counts a refusal if a limit is reached.
    fn admit(&self, shared: &Arc<Shared>) -> Option<ConnectionPermit> {
        let admitted = match self.tunnel_connections.clone().try_acquire_owned() {
            Err(_) => Err("max_connections_per_tunnel"),
            Ok(tunnel) => match self.agent_connections.clone().try_acquire_owned() {
                Err(_) => Err("max_connections_per_agent"),
                Ok(agent) => Ok((tunnel, agent)),
            },
        };
        match admitted {
            Ok((tunnel, agent)) => {
                shared.public_connections.fetch_add(1, Ordering::Relaxed);
                Some(ConnectionPermit {
                    shared: shared.clone(),
                    _tunnel: tunnel,
                    _agent: agent,
                })
            }
            Err(limit) => {
                shared.count_refusal(limit);
                None
            }
        }
    }
}

/// A semaphore of `permits`, capped at what tokio supports.
fn semaphore(permits: usize) -> Arc<Semaphore> {
    Arc::new(Semaphore::new(permits.min(Semaphore::MAX_PERMITS)))
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("agent_addr", &self.agent_addr())
            .field("public_tls_addr", &self.public_tls_addr())
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for RelayHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RelayHandle")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl Relay {
    /// Binds the agent endpoint and the public TLS port.
    pub async fn bind(config: RelayConfig) -> Result<Relay, Error> {
        let agents = TcpListener::bind(config.agent_addr).await?;
        let public = TcpListener::bind(config.public_tls_addr).await?;
        let public_tls_port = config
            .public_tls_port
            .unwrap_or(public.local_addr()?.port());
        let server_config = |alpn: &[&[u8]]| crate::tls::server_config(&config.identity, alpn);
        let agent_tls = TlsAcceptor::from(server_config(&[])?);
        let http1 = server_config(&[b"http/1.1"])?;
        let http2 = server_config(&[b"h2", b"http/1.1"])?;
        let relay = Relay {
            shared: Arc::new(Shared {
                public_tls_port,
                agent_tls,
                http1,
                http2,
                routes: Mutex::new(HashMap::new()),
                sessions: Mutex::new(HashMap::new()),
                identities: Mutex::new(HashMap::new()),
                leases: Mutex::new(HashMap::new()),
                lease_saves: Mutex::new(()),
                next_session: AtomicU64::new(1),
                handshakes: semaphore(config.max_pending_handshakes),
                session_slots: semaphore(config.max_agent_sessions),
                public_connections: AtomicUsize::new(0),
                counters: Counters::default(),
                phase: watch::Sender::new(Phase::Running),
                tasks: Mutex::new(Tasks::default()),
                config,
            }),
            agents,
            public,
        };
        relay.shared.restore_leases().await;
        Ok(relay)
    }

    /// Where agents connect.
    pub fn agent_addr(&self) -> SocketAddr {
        self.agents
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Where the public connects with TLS.
    pub fn public_tls_addr(&self) -> SocketAddr {
        self.public
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Number of tunnels currently routed.
    pub fn tunnel_count(&self) -> usize {
        self.shared.tunnel_count()
    }

    /// A snapshot of the relay's gauges and counters.
    pub fn stats(&self) -> RelayStats {
        self.shared.stats()
    }

    /// A handle for statistics and shutdown that outlives the `Relay` moved into
    /// [`run`](Self::run).
    pub fn handle(&self) -> RelayHandle {
        RelayHandle {
            shared: self.shared.clone(),
        }
    }

    /// Serves agents and the public until [`RelayHandle::shutdown`] is called (then
    /// shuts down as [`run_until`](Self::run_until) does), or until the returned future
    /// is dropped, which ends every session and connection at once.
    pub async fn run(self) {
        self.run_until(std::future::pending()).await
    }

    /// Serves agents and the public until `shutdown` completes (or
    /// [`RelayHandle::shutdown`] is called), then shuts down gracefully: the listeners
    /// are closed at once (new connections are refused by the OS) and new tunnels are
    /// refused; open public connections may finish for up to
    /// [`RelayConfig::shutdown_grace`]; then every session and connection is ended and
    /// this returns. Dropping the future ends everything at once.
    pub async fn run_until(self, shutdown: impl Future<Output = ()>) {
        let Relay {
            shared,
            agents,
            public,
        } = self;
        let stop_on_drop = StopOnDrop(shared.clone());
        let signal = async {
            let mut phase = shared.phase.subscribe();
            tokio::select! {
                () = shutdown => {}
                _ = phase.wait_for(|phase| *phase != Phase::Running) => {}
            }
            shared.begin_shutdown();
        };
        // Each loop returns, dropping (closing) its listener, once the relay drains.
        tokio::join!(
            accept_loop(agents, shared.clone(), serve_agent),
            accept_loop(public, shared.clone(), serve_public),
            signal,
        );
        let grace = shared.config.shutdown_grace;
        tracing::info!(
            connections = shared.public_connections.load(Ordering::Relaxed),
            ?grace,
            "relay stopped accepting; letting open connections finish"
        );
        if timeout(grace, shared.drained()).await.is_err() {
            tracing::warn!(
                connections = shared.public_connections.load(Ordering::Relaxed),
                "grace period over; dropping the remaining connections"
            );
        }
        shared.stop();
        let _ = timeout(STOP_WAIT, shared.stopped()).await;
        drop(stop_on_drop);
        tracing::info!("relay stopped");
    }
}

impl RelayHandle {
    /// Number of tunnels currently routed.
    pub fn tunnel_count(&self) -> usize {
        self.shared.tunnel_count()
    }

    /// A snapshot of the relay's gauges and counters.
    pub fn stats(&self) -> RelayStats {
        self.shared.stats()
    }

    /// Starts a graceful shutdown, as when the future given to
    /// [`Relay::run_until`] completes; later calls do nothing.
    pub fn shutdown(&self) {
        self.shared.begin_shutdown();
    }

    /// Serves one agent link on an already-secured byte stream — e.g. behind your own
    /// TLS terminator, or on a Unix socket — as the agent endpoint serves one after its
    /// TLS handshake. The same hello deadline, token check and limits apply: the
    /// [`handshake_timeout`](RelayConfig::handshake_timeout) runs from the first poll,
    /// and until its hello is answered the stream takes a place in
    /// [`max_pending_handshakes`](RelayConfig::max_pending_handshakes) (beyond it, the
    /// stream is closed at once).
    ///
    /// The future ends when the link does, or when the relay stops; dropping it ends
    /// the session.
    pub fn serve_agent_stream<S>(&self, stream: S) -> impl Future<Output = ()> + Send + 'static
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let shared = self.shared.clone();
        async move {
            let Ok(handshake) = shared.handshakes.clone().try_acquire_owned() else {
                shared.count_refusal("max_pending_handshakes");
                return;
            };
            let deadline = Instant::now() + shared.config.handshake_timeout;
            let mut phase = shared.phase.subscribe();
            tokio::select! {
                () = serve_agent_link(shared.clone(), stream, handshake, deadline) => {}
                // Ended by a stop, like the sessions of the agent endpoint.
                _ = phase.wait_for(|phase| *phase == Phase::Stopped) => {}
            }
        }
    }
}

/// Ends everything when [`Relay::run_until`] returns or is dropped.
struct StopOnDrop(Arc<Shared>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stop();
    }
}

/// Accepts connections until the relay drains, each served by its own task once it
/// has a handshake permit; a connection beyond [`RelayConfig::max_pending_handshakes`]
/// is closed at once.
async fn accept_loop<F, Fut>(listener: TcpListener, shared: Arc<Shared>, serve: F)
where
    F: Fn(Arc<Shared>, TcpStream, OwnedSemaphorePermit) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut phase = shared.phase.subscribe();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = phase.wait_for(|phase| *phase != Phase::Running) => return,
        };
        match accepted {
            Ok((stream, _)) => {
                let Ok(permit) = shared.handshakes.clone().try_acquire_owned() else {
                    shared.count_refusal("max_pending_handshakes");
                    continue;
                };
                let _ = stream.set_nodelay(true);
                shared.spawn(serve(shared.clone(), stream, permit));
            }
            // Out of file descriptors and the like: wait instead of spinning.
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// One connection to the agent endpoint: its TLS handshake, then its link as
/// [`serve_agent_link`] serves it, under one deadline for the TLS handshake and the hello.
async fn serve_agent(shared: Arc<Shared>, tcp: TcpStream, handshake: OwnedSemaphorePermit) {
    let deadline = Instant::now() + shared.config.handshake_timeout;
    let Ok(Ok(tls)) = timeout_at(deadline, shared.agent_tls.accept(tcp)).await else {
        shared
            .counters
            .failed_handshakes
            .fetch_add(1, Ordering::Relaxed);
        return;
    };
    serve_agent_link(shared, tls, handshake, deadline).await;
}

/// One agent session on a secured stream: the hello by `deadline`, then tunnel requests
/// until the link ends.
async fn serve_agent_link<S>(
    shared: Arc<Shared>,
    stream: S,
    handshake: OwnedSemaphorePermit,
    deadline: Instant,
) where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (stream, slot, agent) = match timeout_at(deadline, authenticate(&shared, stream)).await {
        Ok(Some(admitted)) => admitted,
        // Counted where it failed.
        Ok(None) => return,
        Err(_) => {
            shared
                .counters
                .failed_handshakes
                .fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    drop(handshake);

    let (read_half, write_half) = tokio::io::split(stream);
    let stack = Stack::new(shared.config.stack.clone());
    let (control, outbound) = mpsc::channel(CONTROL_QUEUE);
    let (inbound_tx, mut inbound) = mpsc::channel(CONTROL_QUEUE);
    let mut link = AbortOnDrop(tokio::spawn(link::run(
        FrameReader::new(read_half),
        FrameWriter::new(write_half),
        stack.clone(),
        inbound_tx,
        outbound,
        shared.config.link.clone(),
    )));
    let id = shared.next_session.fetch_add(1, Ordering::Relaxed);
    lock(&shared.sessions).insert(id, stack.clone());
    if let Some(key) = agent {
        // The newest session of an agent wins: an older one still open is closed.
        if let Some((_, older)) = lock(&shared.identities).insert(key, (id, stack.clone())) {
            older.close();
        }
    }
    let mut session = Session {
        id,
        agent,
        shared: shared.clone(),
        stack,
        control,
        connections: semaphore(shared.config.max_connections_per_agent),
        tunnels: HashMap::new(),
        _slot: slot,
    };
    while let Some(frame) = inbound.recv().await {
        if session.handle(frame).await.is_err() {
            break;
        }
    }
    drop(session);
    let _ = (&mut link.0).await;
}

/// Aborts a task when dropped, so that it never outlives its owner.
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The unauthenticated phase of an agent after TLS: a hello of bounded size, its token,
/// a session slot, and the welcome. `None` (counted) if the agent is turned away.
async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Shared,
    mut stream: S,
) -> Option<(S, OwnedSemaphorePermit, Option<AgentKey>)> {
    let counters = &shared.counters;
    let hello = match read_hello(&mut stream).await {
        Ok(hello) => hello,
        Err(message) => {
            counters.failed_handshakes.fetch_add(1, Ordering::Relaxed);
            refuse(&mut stream, ErrorCode::PROTOCOL, message).await;
            return None;
        }
    };
    if hello.version != PROTOCOL_VERSION {
        counters.failed_handshakes.fetch_add(1, Ordering::Relaxed);
        let message = format!(
            "relay speaks version {PROTOCOL_VERSION}, agent {}",
            hello.version
        );
        refuse(&mut stream, ErrorCode::BAD_VERSION, message).await;
        return None;
    }
    let token_index = shared
        .config
        .tokens
        .iter()
        .position(|token| !hello.token.is_empty() && token.matches(&hello.token));
    let known = token_index.is_some();
    if !known {
        counters.unauthorized.fetch_add(1, Ordering::Relaxed);
        refuse(
            &mut stream,
            ErrorCode::UNAUTHORIZED,
            "unknown agent token".into(),
        )
        .await;
        return None;
    }
    if !shared.is_running() {
        refuse(
            &mut stream,
            ErrorCode::INTERNAL,
            "the relay is shutting down".into(),
        )
        .await;
        return None;
    }
    let Ok(slot) = shared.session_slots.clone().try_acquire_owned() else {
        shared.count_refusal("max_agent_sessions");
        let message = format!(
            "the relay serves its maximum of {} agent sessions (max_agent_sessions)",
            shared.config.max_agent_sessions
        );
        refuse(&mut stream, ErrorCode::LIMIT_REACHED, message).await;
        return None;
    };
    let welcome = Frame::Welcome(Welcome {
        version: PROTOCOL_VERSION,
        ticket: bytes::Bytes::new(),
    });
    send_frame(&mut stream, &welcome).await.ok()?;
    // An agent that presents a 16-byte identity gets its leases back on reconnect.
    let agent = <[u8; 16]>::try_from(&hello.resume[..])
        .ok()
        .zip(token_index);
    Some((stream, slot, agent))
}

/// Reads an agent's first frame, which must be a hello of at most [`MAX_HELLO_LEN`]
/// bytes: the header is checked before the payload is read or room is made for it.
async fn read_hello(stream: &mut (impl AsyncRead + Unpin)) -> Result<Hello, String> {
    let mut header = [0u8; HEADER_LEN];
    stream
        .read_exact(&mut header)
        .await
        .map_err(|_| "expected a hello".to_string())?;
    if header[0] != u8::from(FrameKind::Hello) {
        return Err(format!(
            "expected a hello, got frame kind {:#04x}",
            header[0]
        ));
    }
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    if len > MAX_HELLO_LEN {
        return Err(format!(
            "a hello is at most {MAX_HELLO_LEN} bytes, this one says {len}"
        ));
    }
    let mut frame = BytesMut::zeroed(HEADER_LEN + len);
    frame[..HEADER_LEN].copy_from_slice(&header);
    stream
        .read_exact(&mut frame[HEADER_LEN..])
        .await
        .map_err(|_| "the link closed inside the hello".to_string())?;
    match Frame::parse(&mut frame) {
        Ok(Some(Frame::Hello(hello))) => Ok(hello),
        Ok(_) => Err("malformed hello".into()),
        Err(e) => Err(format!("malformed hello: {e}")),
    }
}

/// Writes one frame and flushes.
async fn send_frame(stream: &mut (impl AsyncWrite + Unpin), frame: &Frame) -> std::io::Result<()> {
    let mut bytes = BytesMut::with_capacity(frame.encoded_len());
    frame.encode(&mut bytes);
    stream.write_all(&bytes).await?;
    stream.flush().await
}

/// Tells an agent why it is turned away, and closes the link.
async fn refuse(stream: &mut (impl AsyncWrite + Unpin), code: ErrorCode, message: String) {
    let refusal = Frame::Error(ErrorFrame {
        request_id: 0,
        code,
        message,
    });
    if send_frame(stream, &refusal).await.is_ok() {
        let _ = stream.shutdown().await;
    }
}

/// The relay's side of one agent link.
struct Session {
    id: u64,
    /// The agent's identity, if it presented one: its tunnels are leased.
    agent: Option<AgentKey>,
    shared: Arc<Shared>,
    stack: Stack,
    control: ControlSender,
    /// Places for the public connections of all this session's tunnels.
    connections: Arc<Semaphore>,
    /// This session's tunnels by port.
    tunnels: HashMap<u16, SessionTunnel>,
    /// This session's place in [`RelayConfig::max_agent_sessions`].
    _slot: OwnedSemaphorePermit,
}

struct SessionTunnel {
    hostname: String,
    /// Accepts raw TCP connections, for unencrypted tunnels.
    tcp_acceptor: Option<AbortHandle>,
}

impl Session {
    /// Handles one control frame; `Err` when the link is gone.
    async fn handle(&mut self, frame: Frame) -> Result<(), ()> {
        let reply = match frame {
            Frame::Forward(request) => match self.open(&request).await {
                Ok(forwarded) => Frame::Forwarded(forwarded),
                Err((code, message)) => Frame::Error(ErrorFrame {
                    request_id: request.request_id,
                    code,
                    message,
                }),
            },
            Frame::Close { port } => {
                self.close(port);
                Frame::Close { port }
            }
            _ => Frame::Error(ErrorFrame {
                request_id: 0,
                code: ErrorCode::PROTOCOL,
                message: "unexpected frame".into(),
            }),
        };
        self.control.send(reply).await.map_err(|_| ())
    }

    /// Opens a tunnel to `request.port` of the agent.
    async fn open(&mut self, request: &ForwardRequest) -> Result<Forwarded, (ErrorCode, String)> {
        let port = request.port;
        if port == 0 {
            return Err((
                ErrorCode::INVALID_REQUEST,
                "port 0 is not a valid port (1 to 65535)".into(),
            ));
        }
        if request.h2 && request.unencrypted {
            return Err((
                ErrorCode::INVALID_REQUEST,
                "HTTP/2 needs TLS: h2 cannot be unencrypted".into(),
            ));
        }
        if self.tunnels.contains_key(&port) {
            return Err((
                ErrorCode::PORT_IN_USE,
                format!("port {port} is already forwarded"),
            ));
        }
        if let Some(forwarded) = self.reclaim(request) {
            return Ok(forwarded);
        }
        let shutting_down = || {
            (
                ErrorCode::INTERNAL,
                "the relay is shutting down".to_string(),
            )
        };
        if !self.shared.is_running() {
            return Err(shutting_down());
        }
        let max = self.shared.config.max_tunnels_per_agent;
        if self.tunnels.len() >= max {
            self.shared.count_refusal("max_tunnels_per_agent");
            return Err((
                ErrorCode::LIMIT_REACHED,
                format!("this agent has its maximum of {max} tunnels open (max_tunnels_per_agent)"),
            ));
        }
        let route = self.route(request);
        let hostname = self.shared.fresh_hostname();
        let tcp_acceptor = if request.unencrypted {
            let Some((listener, tcp_port)) = self.bind_tcp_port().await else {
                self.shared.count_refusal("tcp_ports");
                return Err((
                    ErrorCode::LIMIT_REACHED,
                    "no free raw TCP port on the relay".to_string(),
                ));
            };
            let acceptor = self
                .shared
                .spawn(serve_raw_tcp(
                    self.shared.clone(),
                    listener,
                    hostname.clone(),
                ))
                .ok_or_else(shutting_down)?;
            Some((acceptor, tcp_port))
        } else {
            None
        };
        self.shared.register(hostname.clone(), route);
        let forwarded = Forwarded {
            request_id: request.request_id,
            port,
            hostname: hostname.clone(),
            tls_port: self.shared.public_tls_port,
            tcp_port: tcp_acceptor.as_ref().map(|(_, port)| *port),
        };
        let mut tcp_acceptor = tcp_acceptor.map(|(task, _)| task);
        if let Some(key) = self.agent {
            let lease = Lease {
                hostname: hostname.clone(),
                tcp_port: forwarded.tcp_port,
                h2: request.h2,
                unencrypted: request.unencrypted,
                owner: self.id,
                tcp_acceptor: tcp_acceptor.take(),
            };
            if let Some(stale) = lock(&self.shared.leases).insert((key, port), lease) {
                self.shared.end_lease(stale);
            }
            self.shared.save_leases();
        }
        self.tunnels.insert(
            port,
            SessionTunnel {
                hostname,
                tcp_acceptor,
            },
        );
        Ok(forwarded)
    }

    /// How public connections reach `request.port` of this session's agent.
    fn route(&self, request: &ForwardRequest) -> Route {
        Route {
            session: self.id,
            stack: self.stack.clone(),
            port: request.port,
            h2: request.h2,
            tunnel_connections: semaphore(self.shared.config.max_connections_per_tunnel),
            agent_connections: self.connections.clone(),
        }
    }

    /// Gives a reconnected agent back the tunnel it leased for `request.port`, with the
    /// same hostname and TCP port, if the options match.
    fn reclaim(&mut self, request: &ForwardRequest) -> Option<Forwarded> {
        let key = (self.agent?, request.port);
        let mut leases = lock(&self.shared.leases);
        let lease = leases.get_mut(&key)?;
        if lease.h2 != request.h2 || lease.unencrypted != request.unencrypted {
            // Asked for a different tunnel: the old one ends now.
            let stale = leases.remove(&key)?;
            drop(leases);
            self.shared.end_lease(stale);
            self.shared.save_leases();
            return None;
        }
        lease.owner = self.id;
        lock(&self.shared.routes).insert(lease.hostname.clone(), self.route(request));
        let forwarded = Forwarded {
            request_id: request.request_id,
            port: request.port,
            hostname: lease.hostname.clone(),
            tls_port: self.shared.public_tls_port,
            tcp_port: lease.tcp_port,
        };
        self.tunnels.insert(
            request.port,
            SessionTunnel {
                hostname: lease.hostname.clone(),
                tcp_acceptor: None,
            },
        );
        Some(forwarded)
    }

    /// Binds a random free port of the configured range.
    async fn bind_tcp_port(&self) -> Option<(TcpListener, u16)> {
        let range = self.shared.config.tcp_ports.clone();
        let span = u32::from(range.end() - range.start()) + 1;
        for _ in 0..64 {
            let port = range.start() + (rand::random::<u32>() % span) as u16;
            if let Ok(listener) = TcpListener::bind((self.shared.config.tcp_bind, port)).await {
                return Some((listener, port));
            }
        }
        None
    }

    /// Stops routing to the tunnel of `port`, and ends its lease. Its open connections
    /// carry on.
    fn close(&mut self, port: u16) {
        if let Some(tunnel) = self.tunnels.remove(&port) {
            let mut routes = lock(&self.shared.routes);
            if routes
                .get(&tunnel.hostname)
                .is_some_and(|route| route.session == self.id)
            {
                routes.remove(&tunnel.hostname);
            }
            drop(routes);
            if let Some(acceptor) = tunnel.tcp_acceptor {
                acceptor.abort();
            }
        }
        if let Some(key) = self.agent {
            let mut leases = lock(&self.shared.leases);
            if leases
                .get(&(key, port))
                .is_some_and(|lease| lease.owner == self.id)
            {
                let lease = leases.remove(&(key, port));
                drop(leases);
                lease
                    .into_iter()
                    .for_each(|lease| self.shared.end_lease(lease));
                self.shared.save_leases();
            }
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // Leased tunnels keep their hostname and TCP port for the grace period (their
        // connections fail fast meanwhile: this stack is closed); the rest end now.
        let leased: Vec<u16> = match self.agent {
            Some(key) => {
                let leases = lock(&self.shared.leases);
                self.tunnels
                    .keys()
                    .copied()
                    .filter(|&port| leases.get(&(key, port)).is_some_and(|l| l.owner == self.id))
                    .collect()
            }
            None => Vec::new(),
        };
        let ended: Vec<u16> = self
            .tunnels
            .keys()
            .copied()
            .filter(|p| !leased.contains(p))
            .collect();
        for port in ended {
            self.close(port);
        }
        self.stack.close();
        lock(&self.shared.sessions).remove(&self.id);
        if let Some(key) = self.agent {
            let mut identities = lock(&self.shared.identities);
            if identities.get(&key).is_some_and(|(id, _)| *id == self.id) {
                identities.remove(&key);
            }
        }
        if let (Some(key), false) = (self.agent, leased.is_empty()) {
            let (shared, owner, grace) =
                (self.shared.clone(), self.id, self.shared.config.lease_grace);
            let expire = async move {
                tokio::time::sleep(grace).await;
                shared.expire_leases(key, owner, &leased);
            };
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(expire);
            }
        }
    }
}

impl Shared {
    /// A hostname no route uses: 128 random bits, so never one handed out before.
    fn fresh_hostname(&self) -> String {
        let routes = lock(&self.routes);
        loop {
            let hostname = format!("{}.{}", random_label(), self.config.node_domain());
            if !routes.contains_key(&hostname) {
                return hostname;
            }
        }
    }

    /// Routes connections for `hostname`.
    fn register(&self, hostname: String, route: Route) {
        lock(&self.routes).insert(hostname, route);
    }

    /// Stops routing to a lease's hostname and frees its TCP port.
    fn end_lease(&self, lease: Lease) {
        lock(&self.routes).remove(&lease.hostname);
        if let Some(acceptor) = lease.tcp_acceptor {
            acceptor.abort();
        }
    }

    /// Ends the leases of `ports` that session `owner` still holds once its grace
    /// period is over (a reconnected session has taken over the others).
    fn expire_leases(&self, key: AgentKey, owner: u64, ports: &[u16]) {
        let mut leases = lock(&self.leases);
        let expired: Vec<Lease> = ports
            .iter()
            .filter_map(|&port| {
                let lease = leases.get(&(key, port))?;
                (lease.owner == owner).then(|| leases.remove(&(key, port)))?
            })
            .collect();
        drop(leases);
        if !expired.is_empty() {
            expired.into_iter().for_each(|lease| self.end_lease(lease));
            self.save_leases();
        }
    }

    /// Writes every lease to [`RelayConfig::lease_file`], if there is one.
    fn save_leases(&self) {
        let Some(path) = &self.config.lease_file else {
            return;
        };
        let _in_order = lock(&self.lease_saves);
        let text: String = lock(&self.leases)
            .iter()
            .map(|((agent, port), lease)| lease.to_line(agent, *port))
            .collect();
        let temporary = path.with_extension("new");
        let written =
            std::fs::write(&temporary, text).and_then(|()| std::fs::rename(&temporary, path));
        if let Err(error) = written {
            tracing::warn!(path = %path.display(), %error, "could not save the tunnel leases");
        }
    }

    /// Takes over the leases a previous run of this relay saved: their hostnames route
    /// to nothing and their TCP ports stay bound until their agent comes back, or until
    /// [`RelayConfig::lease_grace`] is over.
    async fn restore_leases(self: &Arc<Self>) {
        let Some(path) = &self.config.lease_file else {
            return;
        };
        let Ok(text) = std::fs::read_to_string(path) else {
            return;
        };
        // Connections for a tunnel whose agent is not back yet fail at once.
        let nobody = Stack::new(self.config.stack.clone());
        nobody.close();
        let mut restored: HashMap<AgentKey, Vec<u16>> = HashMap::new();
        for (agent, port, mut lease) in text.lines().filter_map(Lease::from_line) {
            if let Some(tcp_port) = lease.tcp_port {
                let Ok(listener) = TcpListener::bind((self.config.tcp_bind, tcp_port)).await else {
                    tracing::warn!(
                        tcp_port,
                        "a leased TCP port is taken; that lease is dropped"
                    );
                    continue;
                };
                let acceptor = serve_raw_tcp(self.clone(), listener, lease.hostname.clone());
                lease.tcp_acceptor = self.spawn(acceptor);
            }
            let route = Route {
                session: RESTORED,
                stack: nobody.clone(),
                port,
                h2: lease.h2,
                tunnel_connections: semaphore(self.config.max_connections_per_tunnel),
                agent_connections: semaphore(self.config.max_connections_per_agent),
            };
            self.register(lease.hostname.clone(), route);
            lock(&self.leases).insert((agent, port), lease);
            restored.entry(agent).or_default().push(port);
        }
        let count: usize = restored.values().map(Vec::len).sum();
        tracing::info!(leases = count, "restored tunnel leases");
        let (shared, grace) = (self.clone(), self.config.lease_grace);
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            for (agent, ports) in restored {
                shared.expire_leases(agent, RESTORED, &ports);
            }
        });
    }

    fn route(&self, hostname: &str) -> Option<Route> {
        lock(&self.routes)
            .get(&hostname.to_ascii_lowercase())
            .cloned()
    }

    fn tunnel_count(&self) -> usize {
        lock(&self.routes).len()
    }

    fn stats(&self) -> RelayStats {
        let c = &self.counters;
        let stacks: Vec<Stack> = lock(&self.sessions).values().cloned().collect();
        let mut sum = StackStats::default();
        for stack in &stacks {
            let s = stack.stats();
            sum.flows += s.flows;
            sum.listeners += s.listeners;
            sum.packets_in += s.packets_in;
            sum.dropped_malformed += s.dropped_malformed;
            sum.dropped_wrong_address += s.dropped_wrong_address;
            sum.dropped_unknown_flow += s.dropped_unknown_flow;
            sum.refused_syns += s.refused_syns;
            sum.queued_bytes += s.queued_bytes;
        }
        let max_handshakes = self
            .config
            .max_pending_handshakes
            .min(Semaphore::MAX_PERMITS);
        RelayStats {
            agent_sessions: stacks.len(),
            tunnels: self.tunnel_count(),
            public_connections: self.public_connections.load(Ordering::Relaxed),
            pending_handshakes: max_handshakes.saturating_sub(self.handshakes.available_permits()),
            refused_by_limit: c.refused_by_limit.load(Ordering::Relaxed),
            unknown_sni: c.unknown_sni.load(Ordering::Relaxed),
            failed_handshakes: c.failed_handshakes.load(Ordering::Relaxed),
            unauthorized: c.unauthorized.load(Ordering::Relaxed),
            stacks: sum,
        }
    }

    /// Counts a refusal at the limit named by its setting.
    fn count_refusal(&self, limit: &'static str) {
        self.counters
            .refused_by_limit
            .fetch_add(1, Ordering::Relaxed);
        tracing::debug!(limit, "refused: limit reached");
    }

    fn is_running(&self) -> bool {
        *self.phase.borrow() == Phase::Running
    }

    /// Running → draining: the accept loops return and close their listeners.
    fn begin_shutdown(&self) {
        self.phase.send_if_modified(|phase| {
            let start = *phase == Phase::Running;
            if start {
                *phase = Phase::Draining;
            }
            start
        });
    }

    /// Waits until no public connection is open or in its handshake.
    async fn drained(&self) {
        let max_handshakes = self
            .config
            .max_pending_handshakes
            .min(Semaphore::MAX_PERMITS);
        while self.public_connections.load(Ordering::Relaxed) > 0
            || self.handshakes.available_permits() < max_handshakes
        {
            tokio::time::sleep(DRAIN_POLL).await;
        }
    }

    /// Ends every task (sessions, connections, raw TCP acceptors) and spawns no more.
    fn stop(&self) {
        self.phase.send_replace(Phase::Stopped);
        let live: Vec<AbortHandle> = {
            let mut tasks = lock(&self.tasks);
            tasks.stopped = true;
            // Each task unregisters itself once it is gone, so `stopped` can wait for it.
            tasks.live.values().flatten().cloned().collect()
        };
        for task in live {
            task.abort();
        }
        // A stopped relay holds nothing for agents that may come back.
        let leases: Vec<Lease> = lock(&self.leases).drain().map(|(_, lease)| lease).collect();
        leases.into_iter().for_each(|lease| self.end_lease(lease));
    }

    /// Waits until the tasks ended by [`stop`](Self::stop) have finished unwinding.
    async fn stopped(&self) {
        while !lock(&self.tasks).live.is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Spawns a task that [`stop`](Self::stop) can end; `None` (and nothing runs) once
    /// stopped.
    fn spawn(
        self: &Arc<Self>,
        task: impl Future<Output = ()> + Send + 'static,
    ) -> Option<AbortHandle> {
        let id = {
            let mut tasks = lock(&self.tasks);
            if tasks.stopped {
                return None;
            }
            let id = tasks.next;
            tasks.next += 1;
            tasks.live.insert(id, None);
            id
        };
        let tracked = Tracked {
            task: Box::pin(task),
            _guard: TaskGuard {
                shared: self.clone(),
                id,
            },
        };
        // Not under the lock: a runtime that is shutting down drops the task (and so
        // its guard, which takes the lock) right here.
        let abort = tokio::spawn(tracked).abort_handle();
        let mut tasks = lock(&self.tasks);
        if let Some(slot) = tasks.live.get_mut(&id) {
            *slot = Some(abort.clone());
        }
        if tasks.stopped {
            // `stop` ran while the task was being spawned.
            abort.abort();
        }
        Some(abort)
    }
}

/// A task and its registration. Fields drop in order: the task (a session, say, with
/// everything it owns) is gone before the registration is.
struct Tracked {
    task: std::pin::Pin<Box<dyn Future<Output = ()> + Send>>,
    _guard: TaskGuard,
}

impl Future for Tracked {
    type Output = ();

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        self.task.as_mut().poll(cx)
    }
}

/// Unregisters a task when it ends (or is aborted).
struct TaskGuard {
    shared: Arc<Shared>,
    id: u64,
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        lock(&self.shared.tasks).live.remove(&self.id);
    }
}

/// A DNS label of 26 characters from `a-z2-7` carrying 128 bits from the OS CSPRNG.
fn random_label() -> String {
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let mut bytes = [0u8; 16];
    rand::rngs::OsRng
        .try_fill_bytes(&mut bytes)
        .expect("the OS random number generator failed");
    let bits = u128::from_be_bytes(bytes);
    (0..26)
        .map(|i| ALPHABET[((bits >> (i * 5)) & 31) as usize] as char)
        .collect()
}

/// Why a public connection did not get going.
enum PublicFailure {
    /// The TLS handshake failed or timed out.
    Tls,
    /// The agent refused the inner connection (nothing listens on the port).
    Inner,
}

/// One public TLS connection: route by SNI, terminate TLS, splice to the agent.
async fn serve_public(shared: Arc<Shared>, tcp: TcpStream, handshake: OwnedSemaphorePermit) {
    let deadline = Instant::now() + shared.config.handshake_timeout;
    let counters = &shared.counters;
    let acceptor = LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp);
    let Ok(Ok(start)) = timeout_at(deadline, acceptor).await else {
        counters.failed_handshakes.fetch_add(1, Ordering::Relaxed);
        return;
    };
    let Some(route) = start
        .client_hello()
        .server_name()
        .and_then(|sni| shared.route(sni))
    else {
        // Unknown or missing SNI: close without an answer, the same way every time.
        counters.unknown_sni.fetch_add(1, Ordering::Relaxed);
        return;
    };
    // Counted by `admit`; the client sees the connection closed.
    let Some(_permit) = route.admit(&shared) else {
        return;
    };
    let tls_config = if route.h2 {
        &shared.http2
    } else {
        &shared.http1
    };
    let tls = async {
        match timeout_at(deadline, start.into_stream(tls_config.clone())).await {
            Ok(Ok(tls)) => Ok(tls),
            _ => Err(PublicFailure::Tls),
        }
    };
    let inner = async {
        route
            .stack
            .connect(route.port)
            .await
            .map_err(|_| PublicFailure::Inner)
    };
    let (mut tls, inner) = match tokio::try_join!(tls, inner) {
        Ok(both) => both,
        Err(PublicFailure::Tls) => {
            counters.failed_handshakes.fetch_add(1, Ordering::Relaxed);
            return;
        }
        Err(PublicFailure::Inner) => return,
    };
    drop(handshake);
    let _ = crate::splice::splice(&inner, &mut tls).await;
    // A client that reads nothing cannot hold the connection open.
    let _ = timeout(shared.config.handshake_timeout, tls.shutdown()).await;
}

/// Accepts raw TCP connections to an unencrypted tunnel until aborted or the relay
/// drains.
async fn serve_raw_tcp(shared: Arc<Shared>, listener: TcpListener, hostname: String) {
    let mut phase = shared.phase.subscribe();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = phase.wait_for(|phase| *phase != Phase::Running) => return,
        };
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        // Looked up per connection: a reconnected agent's session takes the route over.
        let Some(route) = shared.route(&hostname) else {
            let _ = stream.set_zero_linger();
            continue;
        };
        let Some(permit) = route.admit(&shared) else {
            // At a limit (counted): the client sees a reset, as from a closed port.
            let _ = stream.set_zero_linger();
            continue;
        };
        let _ = stream.set_nodelay(true);
        shared.spawn(async move {
            let _permit = permit;
            match route.stack.connect(route.port).await {
                Ok(inner) => {
                    let _ = crate::splice::splice_tcp(&inner, stream).await;
                }
                // Refused by the agent: the client sees a reset, as from a closed port.
                Err(_) => drop(stream.set_zero_linger()),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_are_saved_and_read_back_exactly() {
        let lease = Lease {
            hostname: "abc.portferry.localhost".into(),
            tcp_port: Some(20_001),
            h2: false,
            unencrypted: true,
            owner: 7,
            tcp_acceptor: None,
        };
        let agent = ([0xa5; 16], 2);
        let line = lease.to_line(&agent, 8000);
        let (read_agent, port, read) = Lease::from_line(line.trim_end()).unwrap();
        assert_eq!((read_agent, port), (agent, 8000));
        assert_eq!(
            (read.hostname.as_str(), read.tcp_port),
            ("abc.portferry.localhost", Some(20_001))
        );
        assert_eq!(
            (read.h2, read.unencrypted, read.owner),
            (false, true, RESTORED)
        );
        for damaged in [
            "",
            "zz 0 1 a - 0 0",
            &line[..line.len() - 3],
            &line.replace(" 1\n", " 2"),
        ] {
            assert!(Lease::from_line(damaged).is_none(), "{damaged:?}");
        }
    }

    #[test]
    fn labels_are_random_dns_labels() {
        let a = random_label();
        let b = random_label();
        assert_eq!(a.len(), 26);
        assert_ne!(a, b);
        assert!(a
            .bytes()
            .all(|c| c.is_ascii_lowercase() || (b'2'..=b'7').contains(&c)));
    }
}
