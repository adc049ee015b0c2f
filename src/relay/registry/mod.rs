//! Every tunnel, lease and session of a relay, in one table behind one lock.
//!
//! A [`Tunnel`] is stored once, under its hostname, and says who serves it
//! ([`Owner`]): a live session, or nobody while its agent is away (a lost link inside
//! the lease grace period, or a lease restored from the lease file). The other maps
//! are indexes into it: a session's open ports, an agent's leased ports, and the
//! [`Agents`] known by their resume tickets (each one's newest session). No I/O and no
//! clock: time comes in as `now`, and the next lease expiry goes out of
//! [`Registry::next_expiry`]. The lease bookkeeping is in `leasing`.

use std::collections::HashMap;

use rand::TryRngCore;
use tokio::task::AbortHandle;
use tokio::time::Instant;

#[cfg(any(test, feature = "harness"))]
mod check;
mod leasing;

use super::agents::{Agents, Claim, TooSoon};
use super::config::RelayConfig;
use super::leases::{LeaseChange, LeaseKey, LeaseRecord};
use super::pool::{AddressPool, Pool, PortPlace};
use super::share::{PlaceId, Shares, TakeBack};
use super::ticket::Verifier;
use crate::netstack::Stack;
use crate::wire::{ForwardRequest, Forwarded};

pub(crate) use super::agents::AgentKey;

/// A session of the relay, numbered in the order they were admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct SessionId(u64);

/// Who serves a tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Owner {
    /// This live session.
    Session(SessionId),
    /// Nobody: the agent is away, and the tunnel is kept for it until then.
    Away {
        /// When the lease ends unless the agent is back.
        until: Instant,
    },
}

/// A raw TCP port of a tunnel, held as long as the tunnel is.
pub(crate) struct TcpPort {
    /// The port on the relay's raw TCP address.
    pub(crate) port: u16,
    /// The task accepting its connections, ended with the tunnel (`None`: no task, in
    /// the sans-IO harness).
    _acceptor: Option<Acceptor>,
    /// Its place in the token's share of the range.
    place: Option<PortPlace>,
}

impl TcpPort {
    /// Raw TCP `port`, its connections accepted by `acceptor`.
    pub(crate) fn new(port: u16, acceptor: Option<Acceptor>) -> TcpPort {
        TcpPort {
            port,
            _acceptor: acceptor,
            place: None,
        }
    }

    /// The port, holding `place` in its token's share of the range.
    pub(crate) fn holding(mut self, place: Option<PortPlace>) -> TcpPort {
        self.place = place;
        self
    }
}

/// A task that ends when this is dropped.
pub(crate) struct Acceptor(pub(crate) AbortHandle);

impl Drop for Acceptor {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One tunnel: a hostname routed to a port of an agent.
pub(crate) struct Tunnel {
    /// The agent's (inner) port.
    port: u16,
    h2: bool,
    unencrypted: bool,
    tcp: Option<TcpPort>,
    /// The agent it is leased to, if its tunnels are leased.
    lease: Option<AgentKey>,
    owner: Owner,
    /// Places for this tunnel's public connections.
    connections: AddressPool,
}

/// What one live session holds.
struct SessionEntry {
    stack: Stack,
    /// Whether the agent reads a connection frame first on each inner connection.
    describes_connections: bool,
    /// Places for the public connections of all the session's tunnels.
    connections: AddressPool,
    /// The ports this session opened (or took over) and has not closed, and their
    /// hostnames. A port taken over by a newer session of the same agent stays here,
    /// so that the older one cannot forward it again.
    ports: HashMap<u16, String>,
}

/// Where public connections to one hostname go, as looked up now.
#[derive(Clone)]
pub(crate) struct Route {
    /// The stack of the session serving the tunnel (a closed one while nobody does).
    pub(crate) stack: Stack,
    /// The agent's port.
    pub(crate) port: u16,
    /// Whether the TLS edge offers ALPN `h2`.
    pub(crate) h2: bool,
    /// Whether the agent reads a [`Frame::Connection`](crate::wire::Frame::Connection)
    /// first on each inner connection (an agent from before protocol version 2 does not).
    pub(crate) describes_connections: bool,
    /// Places for the tunnel's public connections.
    pub(crate) tunnel_connections: AddressPool,
    /// Places for the public connections of every tunnel of the session.
    pub(crate) agent_connections: AddressPool,
}

/// The relay's tunnels, leases and sessions.
pub(crate) struct Registry {
    tunnels: HashMap<String, Tunnel>,
    /// Leased tunnels' hostnames by agent and port.
    leases: HashMap<LeaseKey, String>,
    /// The leases' places, shared by token (each kept its share of `max_leases`, none
    /// beyond `max_leases_per_token`) and within a token by agent; an away agent's
    /// leases yield.
    lease_shares: Shares<usize, AgentKey>,
    /// Each lease's place, and back.
    lease_places: HashMap<LeaseKey, PlaceId>,
    lease_of_place: HashMap<PlaceId, LeaseKey>,
    /// The raw TCP ports' places, shared by token (each kept its share of the range).
    tcp_port_places: Pool<usize, ()>,
    sessions: HashMap<SessionId, SessionEntry>,
    /// The agents known by their tickets: their newest sessions and verifiers.
    agents: Agents,
    next_session: u64,
    /// What routes of tunnels nobody serves lead to: connections fail at once.
    away: (Stack, AddressPool),
    /// Whether new tunnels may open (not once the relay shuts down).
    accepting: bool,
    /// How the leases changed since [`take_lease_changes`](Self::take_lease_changes),
    /// in order.
    lease_changes: Vec<LeaseChange>,
    domain: String,
    tls_port: u16,
    max_tunnels_per_agent: usize,
    max_connections_per_tunnel: usize,
    max_connections_per_agent: usize,
    max_leases_per_token: usize,
    max_leases: usize,
    lease_grace: std::time::Duration,
}

/// What a registry takes from its relay's settings.
#[derive(Debug, Clone)]
pub(crate) struct Settings {
    /// The domain hostnames are made under (with the node, if any).
    pub(crate) domain: String,
    /// The public TLS port URLs name.
    pub(crate) tls_port: u16,
    pub(crate) max_tunnels_per_agent: usize,
    pub(crate) max_connections_per_tunnel: usize,
    pub(crate) max_connections_per_agent: usize,
    pub(crate) max_leases_per_token: usize,
    pub(crate) max_leases: usize,
    /// How many tokens the relay takes (each is kept its share of the leases).
    pub(crate) tokens: usize,
    /// How many ports the raw TCP range has (each token is kept its share).
    pub(crate) tcp_ports: usize,
    pub(crate) min_takeover_interval: std::time::Duration,
    pub(crate) lease_grace: std::time::Duration,
    /// Settings of the closed stack that routes of away agents lead to.
    pub(crate) stack: crate::netstack::StackConfig,
}

impl Settings {
    /// The settings of a relay with `config` whose URLs name `tls_port`.
    pub(crate) fn of(config: &RelayConfig, tls_port: u16) -> Settings {
        Settings {
            domain: config.node_domain(),
            tls_port,
            max_tunnels_per_agent: config.max_tunnels_per_agent,
            max_connections_per_tunnel: config.max_connections_per_tunnel,
            max_connections_per_agent: config.max_connections_per_agent,
            max_leases_per_token: config.max_leases_per_token,
            max_leases: config.max_leases,
            tokens: config.tokens.len(),
            tcp_ports: config.tcp_ports.clone().count(),
            min_takeover_interval: config.min_takeover_interval,
            lease_grace: config.lease_grace,
            stack: config.stack.clone(),
        }
    }
}

/// The shares of a registry's leases under `settings`.
fn lease_shares(settings: &Settings) -> Shares<usize, AgentKey> {
    Shares::with_known(settings.max_leases, TakeBack::Yielding, settings.tokens)
        .with_cap(settings.max_leases_per_token)
}

impl Registry {
    /// An empty registry.
    pub(crate) fn new(settings: Settings) -> Registry {
        let lease_shares = lease_shares(&settings);
        let nobody = Stack::new(settings.stack);
        nobody.close();
        Registry {
            tunnels: HashMap::new(),
            leases: HashMap::new(),
            lease_shares,
            lease_places: HashMap::new(),
            lease_of_place: HashMap::new(),
            tcp_port_places: Pool::reserving(settings.tcp_ports, settings.tokens),
            sessions: HashMap::new(),
            agents: Agents::new(settings.min_takeover_interval),
            next_session: 1,
            away: (nobody, AddressPool::new(settings.max_connections_per_agent)),
            accepting: true,
            lease_changes: Vec::new(),
            domain: settings.domain,
            tls_port: settings.tls_port,
            max_tunnels_per_agent: settings.max_tunnels_per_agent,
            max_connections_per_tunnel: settings.max_connections_per_tunnel,
            max_connections_per_agent: settings.max_connections_per_agent,
            max_leases_per_token: settings.max_leases_per_token,
            max_leases: settings.max_leases,
            lease_grace: settings.lease_grace,
        }
    }

    /// Decides who a hello with token `token` and a non-empty `resume` is at `now`; see
    /// [`Agents::claim`].
    pub(crate) fn claim(
        &mut self,
        token: usize,
        resume: &[u8],
        now: Instant,
    ) -> Result<Claim, TooSoon> {
        self.agents.claim(token, resume, now)
    }

    /// Admits a session serving `stack` at `now`, for the agent of `claim` if its
    /// tunnels are leased. The newest session of an agent wins: an older one still open
    /// has its stack closed (its link then ends).
    pub(crate) fn start_session(
        &mut self,
        stack: Stack,
        claim: Option<&Claim>,
        describes_connections: bool,
        now: Instant,
    ) -> SessionId {
        let id = SessionId(self.next_session);
        self.next_session += 1;
        let entry = SessionEntry {
            stack,
            describes_connections,
            connections: AddressPool::new(self.max_connections_per_agent),
            ports: HashMap::new(),
        };
        self.sessions.insert(id, entry);
        if let Some(claim) = claim {
            if let Some(older) = self.agents.start(claim, id, now) {
                if let Some(older) = self.sessions.get(&older) {
                    older.stack.close();
                }
            }
        }
        id
    }

    /// Ends session `id` at `now`: its leased tunnels wait for their agent for the lease
    /// grace period (their connections fail at once meanwhile), the others end now. Its
    /// stack is closed.
    pub(crate) fn end_session(&mut self, id: SessionId, agent: Option<AgentKey>, now: Instant) {
        let Some(entry) = self.sessions.remove(&id) else {
            return;
        };
        let until = now + self.lease_grace;
        for hostname in entry.ports.values() {
            let Some(tunnel) = self.tunnels.get_mut(hostname) else {
                continue;
            };
            if tunnel.owner != Owner::Session(id) {
                continue;
            }
            if let Some(agent) = tunnel.lease {
                tunnel.owner = Owner::Away { until };
                let key = (agent, tunnel.port);
                self.yield_lease(key, true);
            } else {
                self.tunnels.remove(hostname);
            }
        }
        entry.stack.close();
        if let Some(agent) = agent {
            self.agents.end(agent, id);
        }
    }

    /// Whether session `id` has `port` open.
    pub(crate) fn has_port(&self, id: SessionId, port: u16) -> bool {
        self.sessions
            .get(&id)
            .is_some_and(|entry| entry.ports.contains_key(&port))
    }

    /// Whether session `id` has its maximum of tunnels open.
    pub(crate) fn at_tunnel_limit(&self, id: SessionId) -> bool {
        self.sessions
            .get(&id)
            .is_none_or(|entry| entry.ports.len() >= self.max_tunnels_per_agent)
    }

    /// The most tunnels a session may have open.
    pub(crate) fn max_tunnels_per_agent(&self) -> usize {
        self.max_tunnels_per_agent
    }

    /// A place for one more raw TCP port of `token`'s agents; `None` if the token
    /// holds as many as it may while others could still want theirs.
    pub(crate) fn tcp_port_place(&self, token: usize) -> Option<PortPlace> {
        self.tcp_port_places.admit(token, ())
    }

    /// Whether new tunnels may open.
    pub(crate) fn accepting(&self) -> bool {
        self.accepting
    }

    /// Refuses new tunnels from now on.
    pub(crate) fn stop_accepting(&mut self) {
        self.accepting = false;
    }

    /// Gives session `id` of `agent` back the tunnel leased for `request.port`, with
    /// the same hostname and TCP port, if the options match; a lease with other options
    /// ends now.
    pub(crate) fn reclaim(
        &mut self,
        id: SessionId,
        agent: AgentKey,
        request: &ForwardRequest,
    ) -> Option<Forwarded> {
        if !self.agents.is_newest(agent, id) {
            // A late request of a link the agent has replaced.
            return None;
        }
        let key = (agent, request.port);
        let hostname = self.leases.get(&key)?.clone();
        let tunnel = self.tunnels.get_mut(&hostname)?;
        if tunnel.h2 != request.h2 || tunnel.unencrypted != request.unencrypted {
            // Asked for a different tunnel: the old one ends now.
            self.end_tunnel(&hostname);
            return None;
        }
        tunnel.owner = Owner::Session(id);
        tunnel.connections = AddressPool::new(self.max_connections_per_tunnel);
        self.yield_lease(key, false);
        let tunnel = &self.tunnels[&hostname];
        let forwarded = Forwarded {
            request_id: request.request_id,
            port: request.port,
            hostname: hostname.clone(),
            tls_port: self.tls_port,
            tcp_port: tunnel.tcp.as_ref().map(|tcp| tcp.port),
        };
        let entry = self.sessions.get_mut(&id)?;
        entry.ports.insert(request.port, hostname);
        Some(forwarded)
    }

    /// A hostname no tunnel uses: 128 random bits, so never one handed out before.
    pub(crate) fn fresh_hostname(&self) -> String {
        loop {
            let hostname = format!("{}.{}", random_label(), self.domain);
            if !self.tunnels.contains_key(&hostname) {
                return hostname;
            }
        }
    }

    /// Opens a new tunnel of session `id` under `hostname` (from
    /// [`fresh_hostname`](Self::fresh_hostname)), leased to `agent` (whose ticket the
    /// verifier verifies) if its tunnels are leased (a stale lease of the same port ends).
    pub(crate) fn open(
        &mut self,
        id: SessionId,
        agent: Option<(AgentKey, Verifier)>,
        request: &ForwardRequest,
        hostname: String,
        tcp: Option<TcpPort>,
    ) -> Forwarded {
        let forwarded = Forwarded {
            request_id: request.request_id,
            port: request.port,
            hostname: hostname.clone(),
            tls_port: self.tls_port,
            tcp_port: tcp.as_ref().map(|tcp| tcp.port),
        };
        let tunnel = Tunnel {
            port: request.port,
            h2: request.h2,
            unencrypted: request.unencrypted,
            tcp,
            lease: agent.map(|(agent, _)| agent),
            owner: Owner::Session(id),
            connections: AddressPool::new(self.max_connections_per_tunnel),
        };
        if let Some((agent, verifier)) = agent {
            self.lease_changes.push(LeaseChange::Put(LeaseRecord {
                agent,
                verifier,
                port: request.port,
                hostname: hostname.clone(),
                tcp_port: forwarded.tcp_port,
                h2: request.h2,
                unencrypted: request.unencrypted,
            }));
            if let Some(stale) = self.add_lease((agent, request.port), hostname.clone(), verifier) {
                self.tunnels.remove(&stale);
            }
        }
        self.tunnels.insert(hostname.clone(), tunnel);
        if let Some(entry) = self.sessions.get_mut(&id) {
            entry.ports.insert(request.port, hostname);
        }
        forwarded
    }

    /// Session `id` closes its tunnel of `port`: it stops routing and its lease ends,
    /// unless a newer session has taken it over. Its open connections carry on.
    pub(crate) fn close(&mut self, id: SessionId, port: u16) {
        let Some(hostname) = self
            .sessions
            .get_mut(&id)
            .and_then(|entry| entry.ports.remove(&port))
        else {
            return;
        };
        if self
            .tunnels
            .get(&hostname)
            .is_some_and(|tunnel| tunnel.owner == Owner::Session(id))
        {
            self.end_tunnel(&hostname);
        }
    }

    /// Ends a tunnel and its lease; its TCP port is freed.
    fn end_tunnel(&mut self, hostname: &str) {
        let Some(tunnel) = self.tunnels.remove(hostname) else {
            return;
        };
        if let Some(key) = tunnel.lease {
            let index = (key, tunnel.port);
            if self.leases.get(&index).is_some_and(|h| h == hostname) {
                self.remove_lease(index);
                self.lease_changes.push(LeaseChange::Remove(index));
            }
        }
    }

    /// Where connections for `hostname` (any case) go now.
    pub(crate) fn route(&self, hostname: &str) -> Option<Route> {
        let tunnel = self.tunnels.get(&hostname.to_ascii_lowercase())?;
        let (stack, agent_connections, describes_connections) = match tunnel.owner {
            Owner::Session(id) => {
                let entry = self.sessions.get(&id)?;
                (
                    &entry.stack,
                    &entry.connections,
                    entry.describes_connections,
                )
            }
            Owner::Away { .. } => (&self.away.0, &self.away.1, false),
        };
        Some(Route {
            stack: stack.clone(),
            port: tunnel.port,
            h2: tunnel.h2,
            describes_connections,
            tunnel_connections: tunnel.connections.clone(),
            agent_connections: agent_connections.clone(),
        })
    }

    /// Tunnels routed now, whether or not anybody serves them.
    pub(crate) fn tunnel_count(&self) -> usize {
        self.tunnels.len()
    }

    /// The stacks of the live sessions.
    pub(crate) fn stacks(&self) -> Vec<Stack> {
        self.sessions.values().map(|e| e.stack.clone()).collect()
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

#[cfg(test)]
mod tests {
    use super::*;

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
