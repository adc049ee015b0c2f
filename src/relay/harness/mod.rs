//! The relay's control plane on a virtual clock, with no sockets, after quinn's `Pair`:
//! the real [`Registry`] and [`Session`] cores, a relay-side and an agent-side
//! [`Stack`] per agent link, and time that moves only when [`Harness::advance`] says so.
//! Unit tests and the `relay_session` fuzz target drive it, with the agent's own
//! sans-IO control table on the other end of a link ([`Harness::exchange`]); loopback
//! and TLS tests keep the sockets.
//!
//! Raw TCP ports are numbers handed out from [`HarnessConfig::tcp_ports`] without
//! binding anything, each at most once, so that a run can use them up. The lease file
//! is a [`Book`] the registry's lease changes are applied to, as the relay's writer
//! does; [`Harness::restart`] starts a new registry from it.

use std::ops::RangeInclusive;
use std::time::Duration;

use tokio::time::Instant;

use super::leases::Book;
use super::registry::{Owner, Registry, Settings, TcpPort};
use super::session::{admit, Session, Step, Unbound};
use crate::netstack::{Stack, StackConfig};
use crate::token::Token;
use crate::wire::{ErrorFrame, Frame, Hello};

/// Settings of a [`Harness`].
#[derive(Debug, Clone)]
pub struct HarnessConfig {
    /// Tokens agents may present.
    pub tokens: Vec<Token>,
    /// Domain tunnel hostnames are made under.
    pub domain: String,
    /// The public TLS port URLs name.
    pub tls_port: u16,
    /// Tunnels one session may have open.
    pub max_tunnels_per_agent: usize,
    /// Leases the agents of one token may hold.
    pub max_leases_per_token: usize,
    /// Leases the relay may hold.
    pub max_leases: usize,
    /// The least time between two takeovers of an agent's session.
    pub min_takeover_interval: Duration,
    /// How long an away agent's tunnels stay leased.
    pub lease_grace: Duration,
    /// Raw TCP port numbers to hand out, each once.
    pub tcp_ports: RangeInclusive<u16>,
}

impl HarnessConfig {
    /// One token, the local domain, 4 tunnels per agent, 8 leases per token and 16 in
    /// all, takeovers 1 s apart, a 30 s grace, 8 TCP ports.
    pub fn new(token: Token) -> HarnessConfig {
        HarnessConfig {
            tokens: vec![token],
            domain: super::LOCAL_DOMAIN.into(),
            tls_port: 4443,
            max_tunnels_per_agent: 4,
            max_leases_per_token: 8,
            max_leases: 16,
            min_takeover_interval: Duration::from_secs(1),
            lease_grace: Duration::from_secs(30),
            tcp_ports: 20_000..=20_007,
        }
    }
}

/// An agent link of a [`Harness`], numbered from 0 in the order they connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LinkId(pub usize);

/// Who serves a hostname now, as [`Harness::route`] sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Served {
    /// The link serving it; `None` while its agent is away.
    pub link: Option<LinkId>,
    /// The agent's port it reaches.
    pub port: u16,
    /// Whether the TLS edge offers `h2` for it.
    pub h2: bool,
}

/// One link: the session and its two stacks.
struct Link {
    session: Session,
    /// The ticket its welcome carried.
    ticket: bytes::Bytes,
    relay: Stack,
    agent: Stack,
    /// The link is gone ([`Harness::disconnect`]).
    ended: bool,
}

/// A relay's control plane and its agents' links on one virtual clock.
pub struct Harness {
    registry: Registry,
    settings: Settings,
    /// The lease file, as the relay's writer would hold it.
    file: Book,
    tokens: Vec<Token>,
    now: Instant,
    links: Vec<Link>,
    tcp_ports: RangeInclusive<u16>,
}

impl Harness {
    /// A relay with `config` and no agent yet; the clock starts now.
    pub fn new(config: HarnessConfig) -> Harness {
        let settings = Settings {
            domain: config.domain,
            tls_port: config.tls_port,
            max_tunnels_per_agent: config.max_tunnels_per_agent,
            max_connections_per_tunnel: 16,
            max_connections_per_agent: 64,
            max_leases_per_token: config.max_leases_per_token,
            max_leases: config.max_leases,
            tokens: config.tokens.len(),
            tcp_ports: config.tcp_ports.clone().count(),
            min_takeover_interval: config.min_takeover_interval,
            lease_grace: config.lease_grace,
            stack: StackConfig::relay(),
        };
        Harness {
            registry: Registry::new(settings.clone()),
            settings,
            file: Book::default(),
            tokens: config.tokens,
            now: Instant::now(),
            links: Vec::new(),
            tcp_ports: config.tcp_ports,
        }
    }

    /// The virtual time.
    pub fn now(&self) -> Instant {
        self.now
    }

    /// An agent opens a link with `hello`: its new link (whose welcome carried
    /// [`ticket`](Self::ticket)), or the relay's refusal.
    pub fn connect(&mut self, hello: &Hello) -> Result<LinkId, ErrorFrame> {
        let running = self.registry.accepting();
        let admission =
            admit(hello, &self.tokens, running, &mut self.registry, self.now).map_err(|r| {
                ErrorFrame {
                    request_id: 0,
                    code: r.code,
                    message: r.message,
                }
            })?;
        let relay = Stack::new(StackConfig::relay());
        let session = Session::start(&mut self.registry, relay.clone(), &admission, self.now);
        self.links.push(Link {
            session,
            ticket: admission.ticket(),
            relay,
            agent: Stack::new(StackConfig::agent()),
            ended: false,
        });
        Ok(LinkId(self.links.len() - 1))
    }

    /// The agent sends a control frame on `link`; the relay's answer. A link that is
    /// gone gets nothing (`None`).
    pub fn send(&mut self, link: LinkId, frame: Frame) -> Option<Frame> {
        let live = self.links.get(link.0).filter(|l| !l.ended)?;
        let answer = match live.session.handle(&mut self.registry, frame) {
            Step::Answer(answer) => answer,
            Step::BindTcp(pending) => {
                let tcp = match self.tcp_ports.next() {
                    Some(port) => Ok(TcpPort::new(port, None)),
                    None => Err(Unbound::NoFreePort),
                };
                live.session.bound(&mut self.registry, pending, tcp)
            }
        };
        self.save();
        Some(answer.frame)
    }

    /// The link is lost: its session ends now.
    pub fn disconnect(&mut self, link: LinkId) {
        let now = self.now;
        if let Some(live) = self.links.get_mut(link.0).filter(|l| !l.ended) {
            live.ended = true;
            live.session.end(&mut self.registry, now);
        }
        self.save();
    }

    /// The resume ticket the welcome of `link` carried (empty: its tunnels are not
    /// leased).
    pub fn ticket(&self, link: LinkId) -> Option<bytes::Bytes> {
        Some(self.links.get(link.0)?.ticket.clone())
    }

    /// Whether the relay keeps `link` open: not disconnected, and not replaced by a
    /// newer link of the same agent (whose stack the relay closes).
    pub fn is_open(&self, link: LinkId) -> bool {
        self.links
            .get(link.0)
            .is_some_and(|l| !l.ended && !l.relay.is_closed())
    }

    /// Moves the virtual clock on by `by`, ending the leases that come due.
    pub fn advance(&mut self, by: Duration) {
        self.now += by;
        self.registry.expire(self.now);
        self.save();
    }

    /// The relay restarts on its lease file: every link is gone, and a new registry
    /// holds each saved lease for its agent for the grace period from now.
    pub fn restart(&mut self) {
        for link in &mut self.links {
            link.ended = true;
            link.relay.close();
        }
        self.registry = Registry::new(self.settings.clone());
        let until = self.now + self.settings.lease_grace;
        for record in std::mem::take(&mut self.file).records() {
            let tcp = record.tcp_port.map(|port| TcpPort::new(port, None));
            // Beyond the limits, dropped as the relay drops it.
            let _ = self.registry.restore(record.clone(), tcp, until);
        }
        self.save();
    }

    /// Leases in the lease file.
    pub fn saved_leases(&self) -> usize {
        self.file.records().count()
    }

    /// The lease file's text.
    pub fn lease_file(&self) -> String {
        self.file.text()
    }

    /// Applies the registry's lease changes to the lease file.
    fn save(&mut self) {
        for change in self.registry.take_lease_changes() {
            self.file.apply(change);
        }
    }

    /// When the next lease ends unless its agent comes back.
    pub fn next_timeout(&self) -> Option<Instant> {
        self.registry.next_expiry()
    }

    /// The relay refuses new tunnels and sessions from now on, as when it shuts down.
    pub fn shutdown(&mut self) {
        self.registry.stop_accepting();
    }

    /// Who serves connections to `hostname` now.
    pub fn route(&self, hostname: &str) -> Option<Served> {
        let route = self.registry.route(hostname)?;
        let link = match self.registry.owner(hostname)? {
            Owner::Session(id) => Some(LinkId(
                self.links
                    .iter()
                    .position(|l| !l.ended && l.session.id() == id)?,
            )),
            Owner::Away { .. } => None,
        };
        Some(Served {
            link,
            port: route.port,
            h2: route.h2,
        })
    }

    /// The stack public connections to `hostname` are opened on, and the agent's port.
    pub fn route_stack(&self, hostname: &str) -> Option<(Stack, u16)> {
        let route = self.registry.route(hostname)?;
        Some((route.stack, route.port))
    }

    /// The relay-side and the agent-side stack of `link` (to join with
    /// [`connect_in_memory`](crate::netstack::connect_in_memory)).
    pub fn stacks(&self, link: LinkId) -> Option<(Stack, Stack)> {
        let link = self.links.get(link.0)?;
        Some((link.relay.clone(), link.agent.clone()))
    }

    /// Tunnels routed now, served or not.
    pub fn tunnel_count(&self) -> usize {
        self.registry.tunnel_count()
    }

    /// Live sessions.
    pub fn session_count(&self) -> usize {
        self.registry.session_count()
    }

    /// Panics unless the registry's tables agree with each other, and the lease file
    /// with the registry.
    pub fn check(&self) {
        self.registry.check();
        let mut held = self.registry.lease_records();
        held.sort_by_key(|record| record.key());
        assert!(
            self.file.records().eq(held.iter()),
            "the lease file differs"
        );
    }
}

#[cfg(feature = "agent")]
impl Harness {
    /// Carries an agent's control plane (the product's sans-IO
    /// [`Control`](crate::agent::control::Control)) over `link`: its frames to the
    /// relay and the relay's answers back, until it has nothing left to send.
    pub fn exchange(&mut self, link: LinkId, agent: &mut crate::agent::control::Control) {
        while let Some(frame) = agent.poll_transmit() {
            if let Some(answer) = self.send(link, frame) {
                agent.handle_frame(answer);
            }
        }
    }
}

impl std::fmt::Debug for Harness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Harness")
            .field("links", &self.links.len())
            .field("tunnels", &self.tunnel_count())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests;
