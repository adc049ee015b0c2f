//! The relay server: agents connect to it, the public connects through it.
//!
//! One file per job: [`config`] (settings and stats), `counters` (event counters and
//! timing histograms, read by [`RelayStats`] and the metrics endpoint), `endpoint` (the
//! agent endpoint's driver: TLS, hello, link), `session` (one session's control plane,
//! sans-IO),
//! `registry` (every tunnel, lease and session behind one lock), `leases` (the lease
//! file), `edge` (public TLS and raw TCP), `tasks` (supervision), `accept` (the accept
//! loops), `proxied` (PROXY protocol headers from trusted balancers), `shutdown` (the relay's phases and its graceful stop), and this file (binding
//! and serving).
//!
//! - The **agent endpoint** takes TLS connections from agents, checks their token, and
//!   gives each session its own userspace [`Stack`]: a session can only ever reach its
//!   own agent. [`RelayHandle::serve_agent_stream`] serves an agent link on a stream
//!   secured elsewhere in the same way.
//! - The **tunnel registry** maps hostnames (`<label>.<domain>`, with a label of 128
//!   random bits from the OS) to a session and an inner port.
//! - The **public TLS edge** reads the ClientHello, routes by SNI, offers ALPN `h2` only
//!   to tunnels that asked for HTTP/2, terminates TLS and only then opens an inner
//!   connection to the agent and splices the plaintext into it. An unknown, closed or
//!   missing SNI gets a fatal `unrecognized_name` alert and the close, the same way
//!   every time, before any certificate is shown. Routing follows the SNI only: an
//!   HTTP `Host` header is never looked at.
//! - **Raw TCP** tunnels get a port of their own from a configured range.
//!
//! # Bounds and failure behaviour
//!
//! Every count a client or an agent can raise has a limit in [`RelayConfig`], and every
//! such pool is shared (`share`: by source address — an IPv4 address, or an IPv6 /48
//! and within it each /64 — or by token), so that a flood fills it only until someone
//! else comes: at the limit, the holder of the most gives a place back to a newcomer
//! that holds fewer, and any other newcomer is refused at once and counted in
//! [`RelayStats::refused_by_limit`]. Nothing already running slows down:
//!
//! | limit | counts | at the limit |
//! |---|---|---|
//! | [`max_pending_handshakes`](RelayConfig::max_pending_handshakes) | public TLS handshakes in progress, shared by source address | a newcomer from an address holding fewer closes one of the address holding the most (first one without a whole ClientHello after 2.5 s); else the new connection is closed |
//! | [`max_pending_agent_handshakes`](RelayConfig::max_pending_agent_handshakes) | agents' handshakes in progress (until the hello is answered) and agent streams waiting for their hello, shared by source address | the same |
//! | [`max_agent_sessions`](RelayConfig::max_agent_sessions) | authenticated agent links, shared by token (each kept its share) and within a token by address | the agent gets `LIMIT_REACHED`, or ends the oldest session of its token's address holding the most |
//! | [`max_tunnels_per_agent`](RelayConfig::max_tunnels_per_agent) | a session's open tunnels | the `Forward` gets `LIMIT_REACHED` |
//! | [`max_connections_per_tunnel`](RelayConfig::max_connections_per_tunnel) | public connections of one tunnel, each until its inner flow is gone, shared by source address | a newcomer from an address holding fewer ends the oldest connection of the address holding the most; else a TLS connection is closed after its ClientHello, a raw TCP one reset |
//! | [`max_connections_per_agent`](RelayConfig::max_connections_per_agent) | public connections of all of an agent's tunnels, shared by source address | the same |
//! | [`max_connections`](RelayConfig::max_connections) | public connections of the relay, shared by source address | the same |
//! | [`tcp_ports`](RelayConfig::tcp_ports) | raw TCP ports, shared by token (each kept its share) | the `Forward` gets `LIMIT_REACHED` |
//! | [`max_leases_per_token`](RelayConfig::max_leases_per_token) | tunnel leases of one token's agents, here or away | the `Forward` of a new tunnel takes back the oldest lease of an away agent of the token holding the most, or gets `LIMIT_REACHED` |
//! | [`max_leases`](RelayConfig::max_leases) | tunnel leases of all tokens, shared by token (each kept its share) | the same |
//! | [`buffer_budget`](RelayConfig::buffer_budget) | socket buffers of all sessions' stacks | windows stop growing |
//!
//! Before it is authenticated, a connection to the agent endpoint gets one deadline,
//! [`handshake_timeout`](RelayConfig::handshake_timeout), for the TLS handshake *and*
//! its hello (a stream given to [`RelayHandle::serve_agent_stream`], for its hello), and
//! can make the relay buffer little: besides the TLS session's own bounded buffers, a
//! hello is read only once its header says it is a hello of at most [`MAX_HELLO_LEN`]
//! bytes. A public TLS connection gets the same deadline for its whole handshake. A
//! connection from a trusted balancer
//! ([`accept_proxy_protocol_from`](RelayConfig::accept_proxy_protocol_from)) sends its
//! PROXY header first, within the same deadline (at most 4 KiB, read without reading
//! past it); the client it names then holds the handshake place, and the connection's
//! places in every pool shared by address.
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
//! connection. The metrics endpoint ([`metrics_addr`](RelayConfig::metrics_addr)) says
//! `/readyz` 503 from the start of a shutdown, and closes when the relay has stopped.

mod accept;
mod access;
mod agents;
mod cidr;
mod config;
mod counters;
mod edge;
mod endpoint;
#[cfg(any(test, feature = "harness"))]
pub mod harness;
mod leases;
mod pool;
mod proxied;
mod registry;
mod session;
mod share;
mod shutdown;
mod tasks;
mod ticket;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tokio::time::{timeout, Instant};
use tokio_rustls::TlsAcceptor;

pub use crate::wire::MAX_HELLO_LEN;
pub use cidr::{Cidr, CidrError};
pub use config::{machine_buffer_budget, ConfigError, RelayConfig, RelayStats, LOCAL_DOMAIN};
pub use counters::{Endings, FailureReasons, HandshakeFailures, Refusals, TunnelKinds};

use crate::error::Error;
use crate::limit::Limit;
use crate::netstack::{lock, ConnectError, InnerStream, SharedBudget, StackStats};
use crate::task::AbortOnDrop;
use accept::{accept_loop, Handshakes};
use access::{AccessRecord, Ended};
use counters::{Counters, Endpoint, Failure};
use pool::{AddressPool, Pool, Source};
use registry::{Registry, Route};
use shutdown::{Phase, StopOnDrop};
use tasks::TaskSet;

/// How long [`Relay::run_until`] waits, after the grace period, for its tasks to end.
const STOP_WAIT: Duration = Duration::from_secs(1);
/// A bound relay; [`run`](Relay::run) or [`run_until`](Relay::run_until) serves it.
pub struct Relay {
    shared: Arc<Shared>,
    agents: TcpListener,
    public: TcpListener,
    /// The metrics endpoint's listener ([`RelayConfig::metrics_addr`]).
    metrics: Option<TcpListener>,
}

/// A cheap, cloneable view of a relay that stays usable while
/// [`run`](Relay::run) owns the [`Relay`]: statistics and shutdown.
#[derive(Clone)]
pub struct RelayHandle {
    shared: Arc<Shared>,
}

/// What the relay's tasks share.
///
/// Locks: `registry` is the one lock of the relay's state; the lease writer's book is
/// taken only under it (so that lease changes reach the book in order) and by the
/// writer's thread, which does no I/O while it holds it.
struct Shared {
    config: RelayConfig,
    agent_tls: TlsAcceptor,
    http1: Arc<rustls::ServerConfig>,
    http2: Arc<rustls::ServerConfig>,
    registry: Mutex<Registry>,
    /// Keeps [`RelayConfig::lease_file`] up to date, if there is one.
    lease_writer: Option<leases::Writer>,
    /// Wakes the lease expiry task when a lease may have a new deadline.
    lease_expiry: Arc<Notify>,
    /// Places for public TLS handshakes in progress
    /// ([`RelayConfig::max_pending_handshakes`]).
    public_handshakes: AddressPool,
    /// Places for agents' handshakes in progress
    /// ([`RelayConfig::max_pending_agent_handshakes`]).
    agent_handshakes: AddressPool,
    /// Places for authenticated sessions ([`RelayConfig::max_agent_sessions`]), shared
    /// by token (each kept its share) and within a token by source address.
    session_slots: Pool<usize, Source>,
    /// Public connections admitted and not yet ended.
    public_connections: AtomicUsize,
    /// Places for public connections ([`RelayConfig::max_connections`]).
    connections: AddressPool,
    /// The id of the next public connection ([`ConnectionInfo::id`](crate::ConnectionInfo::id)).
    next_connection_id: AtomicU64,
    counters: Counters,
    phase: watch::Sender<Phase>,
    tasks: TaskSet,
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
    ///
    /// Fails with [`ConfigError`] (as [`Error::RelayConfig`]) for settings that cannot
    /// work ([`RelayConfig::validate`]) or an address that cannot be listened on.
    pub async fn bind(mut config: RelayConfig) -> Result<Relay, Error> {
        config.validate()?;
        // Every session's stack grows its windows within the relay's budget too.
        config.stack.shared_budget = Some(SharedBudget::new(config.buffer_budget));
        let listen = |setting: &'static str, addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| ConfigError::Bind {
                    setting,
                    addr,
                    source,
                })
        };
        let agents = listen("agent_addr", config.agent_addr).await?;
        let public = listen("public_tls_addr", config.public_tls_addr).await?;
        let metrics = match config.metrics_addr {
            Some(addr) => Some(listen("metrics_addr", addr).await?),
            None => None,
        };
        let public_tls_port = config
            .public_tls_port
            .unwrap_or(public.local_addr()?.port());
        let server_config = |alpn: &[&[u8]]| crate::tls::server_config(&config.identity, alpn);
        let agent_tls = TlsAcceptor::from(server_config(&[])?);
        let http1 = server_config(&[b"http/1.1"])?;
        let http2 = server_config(&[b"h2", b"http/1.1"])?;
        let (lease_writer, saved_leases) = match &config.lease_file {
            Some(path) => {
                let (writer, saved) = leases::open(path)?;
                (Some(writer), saved)
            }
            None => (None, Vec::new()),
        };
        let relay = Relay {
            shared: Arc::new(Shared {
                agent_tls,
                http1,
                http2,
                registry: Mutex::new(Registry::new(registry::Settings::of(
                    &config,
                    public_tls_port,
                ))),
                lease_writer,
                lease_expiry: Arc::new(Notify::new()),
                public_handshakes: AddressPool::new(config.max_pending_handshakes),
                agent_handshakes: AddressPool::new(config.max_pending_agent_handshakes),
                session_slots: Pool::with_known(config.max_agent_sessions, config.tokens.len()),
                public_connections: AtomicUsize::new(0),
                connections: AddressPool::new(config.max_connections),
                next_connection_id: AtomicU64::new(1),
                counters: Counters::default(),
                phase: watch::Sender::new(Phase::Running),
                tasks: TaskSet::default(),
                config,
            }),
            agents,
            public,
            metrics,
        };
        relay.shared.restore_leases(saved_leases).await;
        let expiry = expire_leases(
            Arc::downgrade(&relay.shared),
            relay.shared.lease_expiry.clone(),
        );
        relay.shared.tasks.spawn(expiry);
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

    /// Where the metrics endpoint listens, if [`RelayConfig::metrics_addr`] is set.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        let metrics = self.metrics.as_ref()?;
        Some(
            metrics
                .local_addr()
                .expect("a bound listener has an address"),
        )
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
            metrics,
        } = self;
        let stop_on_drop = StopOnDrop(shared.clone());
        // Serves until this returns (or is dropped): `/readyz` says 503 while draining.
        let _metrics = metrics.map(|listener| {
            let site = crate::metrics::relay::site(RelayHandle {
                shared: shared.clone(),
            });
            AbortOnDrop(tokio::spawn(crate::metrics::serve(listener, site)))
        });
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
            accept_loop(
                agents,
                shared.clone(),
                Handshakes::Agents,
                endpoint::serve_agent
            ),
            accept_loop(
                public,
                shared.clone(),
                Handshakes::Public,
                edge::serve_public
            ),
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
        let _ = timeout(STOP_WAIT, shared.tasks.stopped()).await;
        if let Some(writer) = &shared.lease_writer {
            writer.finish(STOP_WAIT).await;
        }
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

    /// Whether the relay serves and takes new connections: it runs and has not begun
    /// to shut down.
    pub(crate) fn is_running(&self) -> bool {
        self.shared.is_running()
    }

    /// The relay's timing histograms: TLS handshakes, inner connects.
    pub(crate) fn timings(&self) -> [&prometheus_client::metrics::histogram::Histogram; 2] {
        let counters = &self.shared.counters;
        [&counters.tls_handshake, &counters.inner_connect]
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
    /// [`max_pending_agent_handshakes`](RelayConfig::max_pending_agent_handshakes)
    /// (beyond it, the stream is closed at once).
    ///
    /// The future ends when the link does, or when the relay stops; dropping it ends
    /// the session.
    pub fn serve_agent_stream<S>(&self, stream: S) -> impl Future<Output = ()> + Send + 'static
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let shared = self.shared.clone();
        async move {
            let Some(handshake) = shared.agent_handshakes.admit_from(None) else {
                shared.count_refusal(Limit::PendingAgentHandshakes);
                return;
            };
            let deadline = Instant::now() + shared.config.handshake_timeout;
            let mut phase = shared.phase.subscribe();
            tokio::select! {
                () = endpoint::serve_agent_link(shared.clone(), stream, None, handshake, deadline) => {}
                // Ended by a stop, like the sessions of the agent endpoint.
                _ = phase.wait_for(|phase| *phase == Phase::Stopped) => {}
            }
        }
    }
}

/// Ends the leases of agents that stayed away past their grace period, as their
/// deadlines come; ends with the relay.
async fn expire_leases(shared: Weak<Shared>, wake: Arc<Notify>) {
    loop {
        let next = {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            let now = Instant::now();
            shared.update(|registry| {
                registry.expire(now);
                registry.next_expiry()
            })
        };
        match next {
            Some(deadline) => {
                tokio::select! {
                    () = tokio::time::sleep_until(deadline) => {}
                    () = wake.notified() => {}
                }
            }
            None => wake.notified().await,
        }
    }
}

impl Shared {
    /// Runs `change` on the registry under its lock, and hands the lease changes it
    /// made to the lease writer (which saves them on its own thread).
    fn update<T>(&self, change: impl FnOnce(&mut Registry) -> T) -> T {
        let mut registry = lock(&self.registry);
        let result = change(&mut registry);
        let changes = registry.take_lease_changes();
        if let Some(writer) = &self.lease_writer {
            writer.apply(changes);
        }
        result
    }

    /// Takes over the leases a previous run of this relay saved (`records`): their
    /// hostnames route to nothing and their TCP ports stay bound until their agent comes
    /// back, or until [`RelayConfig::lease_grace`] is over.
    async fn restore_leases(self: &Arc<Self>, records: Vec<leases::LeaseRecord>) {
        if records.is_empty() {
            return;
        }
        let until = Instant::now() + self.config.lease_grace;
        let mut count = 0;
        for record in records {
            let tcp = match record.tcp_port {
                None => None,
                Some(tcp_port) => {
                    let Ok(listener) = TcpListener::bind((self.config.tcp_bind, tcp_port)).await
                    else {
                        tracing::warn!(
                            tcp_port,
                            "a leased TCP port is taken; that lease is dropped"
                        );
                        continue;
                    };
                    edge::serve_tunnel_port(self, listener, tcp_port, &record.hostname)
                }
            };
            let hostname = record.hostname.clone();
            match self.update(|registry| registry.restore(record, tcp, until)) {
                Ok(()) => count += 1,
                Err(reason) => tracing::warn!(%hostname, reason, "a saved lease is dropped"),
            }
        }
        self.counters
            .leases_restored
            .fetch_add(count, Ordering::Relaxed);
        tracing::info!(leases = count, "restored tunnel leases");
    }

    fn route(&self, hostname: &str) -> Option<Route> {
        lock(&self.registry).route(hostname)
    }

    fn tunnel_count(&self) -> usize {
        lock(&self.registry).tunnel_count()
    }

    fn stats(&self) -> RelayStats {
        let c = &self.counters;
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let (stacks, tunnels, leases, tunnels_by_kind, leases_reclaimed, ended_stacks) = {
            let registry = lock(&self.registry);
            (
                registry.stacks(),
                registry.tunnel_count(),
                registry.lease_count(),
                registry.tunnel_kinds(),
                registry.leases_reclaimed(),
                registry.ended_stacks(),
            )
        };
        let mut sum = StackStats::default();
        for stack in &stacks {
            sum.add(&stack.stats());
        }
        let (refusals, handshake_failures) = (c.refusals(), c.handshake_failures());
        RelayStats {
            agent_sessions: stacks.len(),
            tunnels,
            leases,
            public_connections: self.public_connections.load(Ordering::Relaxed),
            pending_handshakes: self.pending_handshakes(),
            refused_by_limit: refusals.total(),
            unknown_sni: load(&c.unknown_sni),
            failed_handshakes: handshake_failures.public.total() + handshake_failures.agent.total(),
            unauthorized: load(&c.unauthorized),
            stacks: sum,
            ended_stacks,
            tunnels_by_kind,
            public_connections_opened: load(&c.public_opened),
            refusals,
            handshake_failures,
            sessions_resumed: load(&c.sessions_resumed),
            leases_reclaimed,
            leases_restored: load(&c.leases_restored),
            bytes_from_clients: load(&c.bytes_from_clients),
            bytes_to_clients: load(&c.bytes_to_clients),
            endings: c.endings(),
        }
    }

    /// Handshakes holding a place now, public and agent.
    fn pending_handshakes(&self) -> usize {
        self.public_handshakes.in_use() + self.agent_handshakes.in_use()
    }

    /// Counts a refusal at `limit`.
    fn count_refusal(&self, limit: Limit) {
        self.counters.refused(limit);
        tracing::debug!(limit = limit.name(), "refused: limit reached");
    }

    /// Counts a connection closed during its handshake on `endpoint`, for `why`.
    fn count_failed_handshake(&self, endpoint: Endpoint, why: Failure) {
        self.counters.failed(endpoint, why);
    }

    /// Counts a public connection admitted to a tunnel (open until its permit is
    /// dropped).
    fn count_opened(&self) {
        self.public_connections.fetch_add(1, Ordering::Relaxed);
        self.counters.public_opened.fetch_add(1, Ordering::Relaxed);
    }

    /// Ends the record of a public connection that ended as `how`: its bytes and its
    /// ending counted, then its access-log line written.
    fn end_connection(&self, record: AccessRecord, how: Ended) {
        self.counters.ended(how, record.meter().read());
        if self.config.access_log {
            record.log(how, self.config.node.as_deref());
        }
    }

    /// Opens the inner connection of a public connection admitted to `route`, its flow
    /// holding `places`, timed in the inner-connect histogram if it opens (one that does
    /// not ends as [`Ended::Refused`]).
    async fn connect_inner(
        &self,
        route: &Route,
        places: impl Send + 'static,
    ) -> Result<InnerStream, ConnectError> {
        let started = Instant::now();
        let inner = route.stack.connect_holding(route.port, places).await?;
        let seconds = started.elapsed().as_secs_f64();
        self.counters.inner_connect.observe(seconds);
        Ok(inner)
    }
}
