//! The relay's settings ([`RelayConfig`]) and what it reports ([`RelayStats`]).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::time::Duration;

use super::cidr::Cidr;
use crate::limit::Limit;
use crate::link::LinkConfig;
use crate::netstack::{StackConfig, StackStats};
use crate::splice::SpliceOptions;
use crate::tls::ServerIdentity;
use crate::token::Token;

#[cfg(doc)]
use super::RelayHandle;

/// The domain of a relay for one machine. Not plain `localhost`: certificate checkers
/// refuse a wildcard directly under a single label (`*.localhost`), while
/// `*.portferry.localhost` is fine, and clients resolve every `*.localhost` to loopback.
pub const LOCAL_DOMAIN: &str = "portferry.localhost";

/// Settings of a relay: [`RelayConfig::local`], then change any field.
#[derive(Debug, Clone)]
#[non_exhaustive]
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
    /// Public connections (TLS and raw TCP) one tunnel may have open at once, shared by
    /// source address (an IPv4 address, or an IPv6 /48 and within it each /64): at the
    /// limit, a connection from an address that holds fewer than the address holding
    /// the most takes a place back from it (that address's oldest connection is
    /// ended); from any other, it is closed (TLS) or reset (raw TCP).
    pub max_connections_per_tunnel: usize,
    /// Public connections all tunnels of one agent session may have open at once,
    /// shared by source address in the same way.
    pub max_connections_per_agent: usize,
    /// Public connections the whole relay may have open at once, shared by source
    /// address in the same way: each holds a file descriptor, and the relay keeps
    /// enough for its agents ([`fit_open_files`](Self::fit_open_files)).
    pub max_connections: usize,
    /// TLS handshakes in progress on the public port, shared by source address in the
    /// same way: at the limit, a newcomer from an address holding fewer closes a
    /// handshake of the address holding the most — first one that has not sent its
    /// whole ClientHello within 2.5 s — and any other newcomer is closed at once.
    pub max_pending_handshakes: usize,
    /// Handshakes in progress on the agent port (TLS and hello: until the hello is
    /// answered) and streams given to [`RelayHandle::serve_agent_stream`] until their
    /// hello is answered (those count as one address), shared in the same way. Apart
    /// from [`max_pending_handshakes`](Self::max_pending_handshakes), so that a flood
    /// of the public port cannot keep agents out.
    pub max_pending_agent_handshakes: usize,
    /// Authenticated agent sessions at once, shared by token: each token is kept
    /// `max_agent_sessions / tokens` of them until it uses them, and the rest go to
    /// whoever comes first. Within a token, at its limit, an agent from an address
    /// holding fewer of the token's sessions ends the oldest session of the address
    /// holding the most. An agent refused is told `LIMIT_REACHED` for
    /// [`Limit::AgentSessions`] and tries again later.
    pub max_agent_sessions: usize,
    /// How long a shutting-down relay lets open public connections finish before it
    /// drops them.
    pub shutdown_grace: Duration,
    /// A public connection (TLS or raw TCP) on which no byte has moved either way for
    /// this long is reset on both sides, so that a client that sent and left cannot hold
    /// a connection its service never reads. `None`: connections may idle forever.
    pub idle_timeout: Option<Duration>,
    /// Whether each public connection gets a line in the access log when it ends (at
    /// info level, target `portferry::access`): its id, the node, the tunnel, the
    /// client's address, the edge, bytes each way, duration and how it ended.
    pub access_log: bool,
    /// Tunnel leases the agents of one token may hold at once, here or away (a lease
    /// lasts [`lease_grace`](Self::lease_grace) after its agent's link is lost); a
    /// `Forward` that would need one more is refused with `LIMIT_REACHED`.
    pub max_leases_per_token: usize,
    /// Tunnel leases the relay holds at once, all tokens together; the same.
    pub max_leases: usize,
    /// The least time between two takeovers of an agent's session: a hello presenting
    /// the agent's resume ticket while a link of it admitted less than this ago still
    /// holds the session (or is being admitted) is refused with `TOO_SOON`. A link that
    /// comes back after its old one has ended is never refused.
    pub min_takeover_interval: Duration,
    /// How long the hostnames and TCP ports of an agent whose link was lost stay
    /// reserved for it: an agent that reconnects within it (presenting the resume ticket
    /// the relay gave it, and the same token) gets the same URLs back.
    pub lease_grace: Duration,
    /// Where leases are kept across restarts: a relay started on the same file gives
    /// reconnecting agents their hostnames and TCP ports back (each lease is honoured for
    /// [`lease_grace`](Self::lease_grace) after the start). The directory it is in is a
    /// [`StateDir`](crate::state_dir::StateDir), created (mode 0700) if missing; the file
    /// is written mode 0600, atomically and fsynced, by a thread of its own, shortly after
    /// each change. `None`: leases live in memory.
    pub lease_file: Option<PathBuf>,
    /// Bytes of socket buffers all sessions' stacks together may hold before windows
    /// stop growing (each stack also keeps to its own
    /// [`StackConfig::buffer_budget`]): new connections still get their small initial
    /// buffers, and a stalled one is ended by the [`idle_timeout`](Self::idle_timeout).
    /// By default a quarter of the machine's memory ([`machine_buffer_budget`]).
    pub buffer_budget: usize,
    /// The balancers (L4 load balancers, proxies) in front of the relay whose
    /// connections start with a PROXY protocol header (v1 or v2) naming the client: on
    /// the public TLS port, the raw TCP ports and the agent endpoint, a connection from
    /// an address in one of these blocks must send one within the
    /// [`handshake_timeout`](Self::handshake_timeout) or is closed (and counted in
    /// [`RelayStats::failed_handshakes`]); the header's source address then stands for
    /// the client in every limit shared by address. A `LOCAL` header (a health check)
    /// stands for the balancer itself. From any other address a header is never looked
    /// for. Empty by default: no header is read from anyone.
    pub accept_proxy_protocol_from: Vec<Cidr>,
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
    /// Default of [`max_connections`](Self::max_connections).
    pub const DEFAULT_MAX_CONNECTIONS: usize = 60_000;
    /// Default of [`max_pending_handshakes`](Self::max_pending_handshakes).
    pub const DEFAULT_MAX_PENDING_HANDSHAKES: usize = 1024;
    /// Default of [`max_pending_agent_handshakes`](Self::max_pending_agent_handshakes).
    pub const DEFAULT_MAX_PENDING_AGENT_HANDSHAKES: usize = 1024;
    /// Default of [`max_agent_sessions`](Self::max_agent_sessions).
    pub const DEFAULT_MAX_AGENT_SESSIONS: usize = 1024;
    /// Default of [`max_leases_per_token`](Self::max_leases_per_token).
    pub const DEFAULT_MAX_LEASES_PER_TOKEN: usize = 4096;
    /// Default of [`max_leases`](Self::max_leases).
    pub const DEFAULT_MAX_LEASES: usize = 16_384;
    /// Default of [`min_takeover_interval`](Self::min_takeover_interval): 1 s.
    pub const DEFAULT_MIN_TAKEOVER_INTERVAL: Duration = Duration::from_secs(1);
    /// Default of [`shutdown_grace`](Self::shutdown_grace): 10 s.
    pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
    /// Default of [`idle_timeout`](Self::idle_timeout): 10 minutes.
    pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(10 * 60);
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
            max_connections: Self::DEFAULT_MAX_CONNECTIONS,
            max_pending_handshakes: Self::DEFAULT_MAX_PENDING_HANDSHAKES,
            max_pending_agent_handshakes: Self::DEFAULT_MAX_PENDING_AGENT_HANDSHAKES,
            max_agent_sessions: Self::DEFAULT_MAX_AGENT_SESSIONS,
            max_leases_per_token: Self::DEFAULT_MAX_LEASES_PER_TOKEN,
            max_leases: Self::DEFAULT_MAX_LEASES,
            min_takeover_interval: Self::DEFAULT_MIN_TAKEOVER_INTERVAL,
            shutdown_grace: Self::DEFAULT_SHUTDOWN_GRACE,
            idle_timeout: Some(Self::DEFAULT_IDLE_TIMEOUT),
            access_log: true,
            lease_grace: Self::DEFAULT_LEASE_GRACE,
            lease_file: None,
            buffer_budget: machine_buffer_budget(),
            accept_proxy_protocol_from: Vec::new(),
            link: LinkConfig::default(),
            stack: StackConfig::relay(),
        }
    }

    /// Checks that the settings can work: at least one token and no blank one, a raw
    /// TCP port range with a port in it, and every limit and timeout above zero.
    /// [`Relay::bind`](super::Relay::bind) checks this first.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.tokens.is_empty() {
            return Err(ConfigError::NoTokens);
        }
        if let Some(index) = self
            .tokens
            .iter()
            .position(|token| token.expose().trim().is_empty())
        {
            return Err(ConfigError::BlankToken { index });
        }
        if self.tcp_ports.is_empty() {
            return Err(ConfigError::EmptyRange {
                setting: "tcp_ports",
            });
        }
        let durations = [
            ("handshake_timeout", self.handshake_timeout),
            ("link.ping_interval", self.link.ping_interval),
            ("link.idle_timeout", self.link.idle_timeout),
        ];
        if let Some((setting, _)) = durations.iter().find(|(_, d)| d.is_zero()) {
            return Err(ConfigError::Zero { setting });
        }
        if self.buffer_budget == 0 {
            return Err(ConfigError::Zero {
                setting: "buffer_budget",
            });
        }
        if let Some(limit) = Limit::ALL.into_iter().find(|l| self.limit(*l) == Some(0)) {
            return Err(ConfigError::Zero {
                setting: limit.name(),
            });
        }
        Ok(())
    }

    /// The count `limit` is set to; `None` for a limit that is not a count.
    pub fn limit(&self, limit: Limit) -> Option<usize> {
        Some(match limit {
            Limit::PendingHandshakes => self.max_pending_handshakes,
            Limit::PendingAgentHandshakes => self.max_pending_agent_handshakes,
            Limit::AgentSessions => self.max_agent_sessions,
            Limit::TunnelsPerAgent => self.max_tunnels_per_agent,
            Limit::ConnectionsPerTunnel => self.max_connections_per_tunnel,
            Limit::ConnectionsPerAgent => self.max_connections_per_agent,
            Limit::Leases => self.max_leases,
            Limit::LeasesPerToken => self.max_leases_per_token,
            Limit::TcpPorts => self.tcp_ports.clone().count(),
            Limit::Connections => self.max_connections,
            Limit::TakeoverInterval | Limit::Unknown(_) => return None,
        })
    }

    /// Lowers the limits whose pools hold file descriptors so that together they fit
    /// `open_files` (the process's limit, `RLIMIT_NOFILE`), keeping
    /// [`RESERVED_FILES`](Self::RESERVED_FILES) for the relay's own files and listeners:
    /// an eighth of the rest each for agent sessions, agents' handshakes and public
    /// handshakes, and what remains for public connections. A limit already lower
    /// stays.
    pub fn fit_open_files(&mut self, open_files: u64) {
        let usable = usize::try_from(open_files)
            .unwrap_or(usize::MAX)
            .saturating_sub(Self::RESERVED_FILES)
            .max(8);
        let eighth = usable / 8;
        let lower = |limit: &mut usize, to: usize| *limit = (*limit).min(to.max(1));
        lower(&mut self.max_agent_sessions, eighth);
        lower(&mut self.max_pending_agent_handshakes, eighth);
        lower(&mut self.max_pending_handshakes, eighth);
        let connections = usable - 3 * eighth;
        lower(&mut self.max_connections, connections);
        lower(&mut self.max_connections_per_agent, connections);
        lower(&mut self.max_connections_per_tunnel, connections);
    }

    /// File descriptors [`fit_open_files`](Self::fit_open_files) keeps out of every
    /// pool: listeners, the lease file, certificates, raw TCP ports of a few tunnels.
    pub const RESERVED_FILES: usize = 128;

    /// How the edge splices its public connections.
    pub(super) fn splice_options(&self) -> SpliceOptions {
        SpliceOptions::idle_timeout(self.idle_timeout)
    }

    /// The domain under which this node's tunnels are named.
    pub(super) fn node_domain(&self) -> String {
        match &self.node {
            Some(node) => format!("{node}.{}", self.domain),
            None => self.domain.clone(),
        }
    }
}

/// The default relay-wide buffer budget ([`RelayConfig::buffer_budget`]): a quarter of
/// the machine's memory (`MemTotal` of `/proc/meminfo`), at least 64 MiB; 1 GiB where
/// that is not known.
pub fn machine_buffer_budget() -> usize {
    const MIB: usize = 1024 * 1024;
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|meminfo| {
            let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
            let kib: usize = line.split_whitespace().nth(1)?.parse().ok()?;
            kib.checked_mul(1024)
        });
    total.map_or(1024 * MIB, |bytes| (bytes / 4).max(64 * MIB))
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
    /// Tunnel leases held, for agents here or away.
    pub leases: usize,
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

/// Why a relay's settings cannot work ([`RelayConfig::validate`]), or its listeners
/// could not be bound. Each message names the setting, the `portferry relay` flag, and
/// for a bind the address.
#[derive(Debug)]
#[non_exhaustive]
pub enum ConfigError {
    /// No agent token is configured: no agent could connect.
    NoTokens,
    /// The token at `index` is empty or blank: no agent can present it.
    BlankToken {
        /// Its place in [`RelayConfig::tokens`].
        index: usize,
    },
    /// A range has nothing in it.
    EmptyRange {
        /// The setting.
        setting: &'static str,
    },
    /// A limit or timeout that must be above zero is zero.
    Zero {
        /// The setting.
        setting: &'static str,
    },
    /// A listener could not be bound (the address is in use, say).
    Bind {
        /// The setting holding the address.
        setting: &'static str,
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// The `portferry relay` flag that sets `setting`: a limit's from [`Limit::flag`].
fn flag(setting: &str) -> &'static str {
    if let Some(limit) = Limit::ALL.into_iter().find(|l| l.name() == setting) {
        return limit.flag().unwrap_or("no flag");
    }
    match setting {
        "agent_addr" => "--agent-addr",
        "public_tls_addr" => "--public-addr",
        "tokens" => "--tokens, --tokens-file or PORTFERRY_TOKENS",
        "handshake_timeout" => "--handshake-timeout",
        "buffer_budget" => "--buffer-budget",
        _ => "no flag",
    }
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NoTokens => write!(
                f,
                "no agent token is configured (tokens: {}), so no agent could connect",
                flag("tokens")
            ),
            Self::BlankToken { index } => write!(
                f,
                "agent token {} of the configured ones is empty or blank (tokens: {}); \
                 no agent can present it",
                index + 1,
                flag("tokens")
            ),
            Self::EmptyRange { setting } => {
                write!(
                    f,
                    "{setting} ({}) holds no port: FIRST-LAST with FIRST <= LAST",
                    flag(setting)
                )
            }
            Self::Zero { setting } => {
                write!(f, "{setting} ({}) must be more than 0", flag(setting))
            }
            Self::Bind {
                setting,
                addr,
                source,
            } => write!(
                f,
                "cannot listen on {addr} ({setting}, {}): {source}",
                flag(setting)
            ),
        }
    }
}

impl std::error::Error for ConfigError {}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::PrivateKeyDer;

    /// Settings whose identity is never used.
    fn settings() -> RelayConfig {
        let identity = ServerIdentity {
            cert_chain: Vec::new(),
            key: PrivateKeyDer::Pkcs8(Vec::new().into()),
        };
        RelayConfig::local(identity, vec![Token::new("t")], 0, 0)
    }

    #[test]
    fn the_pools_holding_files_fit_the_open_file_limit() {
        let mut config = settings();
        config.fit_open_files(1024);
        let pools = config.max_agent_sessions
            + config.max_pending_agent_handshakes
            + config.max_pending_handshakes
            + config.max_connections;
        assert_eq!(pools, 1024 - RelayConfig::RESERVED_FILES);
        assert_eq!(config.max_agent_sessions, 112);
        assert!(config.max_connections_per_tunnel <= config.max_connections);
        // A limit already lower stays; no limit known changes nothing.
        config.max_agent_sessions = 3;
        config.fit_open_files(1024);
        assert_eq!(config.max_agent_sessions, 3);
        let mut unlimited = settings();
        unlimited.fit_open_files(u64::MAX);
        assert_eq!(
            unlimited.max_connections,
            RelayConfig::DEFAULT_MAX_CONNECTIONS
        );
        // Even a tiny limit leaves every pool a place.
        config.fit_open_files(10);
        assert!(Limit::ALL.iter().all(|l| config.limit(*l) != Some(0)));
    }
}
