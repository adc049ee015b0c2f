//! The relay's control plane on a virtual clock, with no sockets, after quinn's `Pair`:
//! the real [`Registry`] and [`Session`] cores, a relay-side and an agent-side
//! [`Stack`] per agent link, and time that moves only when [`Harness::advance`] says so.
//! Unit tests and the `relay_session` fuzz target drive it; loopback and TLS tests keep
//! the sockets.
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
    /// How long an away agent's tunnels stay leased.
    pub lease_grace: Duration,
    /// Raw TCP port numbers to hand out, each once.
    pub tcp_ports: RangeInclusive<u16>,
}

impl HarnessConfig {
    /// One token, the local domain, 4 tunnels per agent, 8 leases per token and 16 in
    /// all, a 30 s grace, 8 TCP ports.
    pub fn new(token: Token) -> HarnessConfig {
        HarnessConfig {
            tokens: vec![token],
            domain: super::LOCAL_DOMAIN.into(),
            tls_port: 4443,
            max_tunnels_per_agent: 4,
            max_leases_per_token: 8,
            max_leases: 16,
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

    /// An agent opens a link with `hello`: its new link, or the relay's refusal.
    pub fn connect(&mut self, hello: &Hello) -> Result<LinkId, ErrorFrame> {
        let agent =
            admit(hello, &self.tokens, self.registry.accepting()).map_err(|r| ErrorFrame {
                request_id: 0,
                code: r.code,
                message: r.message,
            })?;
        let relay = Stack::new(StackConfig::relay());
        let session = Session::start(&mut self.registry, relay.clone(), agent);
        self.links.push(Link {
            session,
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

impl std::fmt::Debug for Harness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Harness")
            .field("links", &self.links.len())
            .field("tunnels", &self.tunnel_count())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{ErrorCode, ForwardRequest, Forwarded, PROTOCOL_VERSION};

    const TOKEN: &str = "harness-token";

    fn harness() -> Harness {
        Harness::new(HarnessConfig::new(Token::new(TOKEN)))
    }

    fn hello(token: &str, identity: &[u8]) -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            token: token.into(),
            resume: bytes::Bytes::copy_from_slice(identity),
        }
    }

    fn forward(port: u16, unencrypted: bool, h2: bool) -> Frame {
        Frame::Forward(ForwardRequest {
            request_id: u32::from(port) + 1,
            port,
            unencrypted,
            h2,
        })
    }

    /// Forwards `port` on `link`; the grant, or the refusal's code.
    fn open(
        h: &mut Harness,
        link: LinkId,
        port: u16,
        unencrypted: bool,
    ) -> Result<Forwarded, ErrorCode> {
        match h.send(link, forward(port, unencrypted, false)) {
            Some(Frame::Forwarded(granted)) => {
                assert_eq!(
                    (granted.request_id, granted.port),
                    (u32::from(port) + 1, port)
                );
                Ok(granted)
            }
            Some(Frame::Error(error)) => {
                assert_eq!(error.request_id, u32::from(port) + 1);
                Err(error.code)
            }
            other => panic!("answered {other:?}"),
        }
    }

    #[test]
    fn a_tunnel_routes_to_its_link_until_closed_and_a_port_is_forwarded_once() {
        let mut h = harness();
        let link = h.connect(&hello(TOKEN, &[])).unwrap();
        let granted = open(&mut h, link, 80, false).unwrap();
        assert_eq!((granted.tls_port, granted.tcp_port), (4443, None));
        let served = Served {
            link: Some(link),
            port: 80,
            h2: false,
        };
        assert_eq!(
            h.route(&granted.hostname.to_ascii_uppercase()),
            Some(served)
        );
        assert_eq!(open(&mut h, link, 80, false), Err(ErrorCode::PORT_IN_USE));
        assert_eq!(
            h.send(link, Frame::Close { port: 80 }),
            Some(Frame::Close { port: 80 })
        );
        assert_eq!(h.route(&granted.hostname), None);
        let again = open(&mut h, link, 80, false).unwrap();
        assert_ne!(again.hostname, granted.hostname, "a hostname was reissued");
        h.check();
        // Without an identity, nothing is kept once the link is gone.
        h.disconnect(link);
        assert_eq!((h.tunnel_count(), h.session_count()), (0, 0));
        assert_eq!(h.send(link, forward(81, false, false)), None);
    }

    #[test]
    fn invalid_requests_and_limits_are_refused_with_their_codes() {
        let mut config = HarnessConfig::new(Token::new(TOKEN));
        config.tcp_ports = 20_000..=20_001;
        let mut h = Harness::new(config);
        let link = h.connect(&hello(TOKEN, &[])).unwrap();
        assert_eq!(
            open(&mut h, link, 0, false),
            Err(ErrorCode::INVALID_REQUEST)
        );
        let refused = h.send(link, forward(1, true, true));
        assert!(matches!(refused, Some(Frame::Error(e)) if e.code == ErrorCode::INVALID_REQUEST));
        let unexpected = h.send(
            link,
            Frame::Welcome(crate::wire::Welcome {
                version: 1,
                ticket: bytes::Bytes::new(),
            }),
        );
        assert!(
            matches!(unexpected, Some(Frame::Error(e)) if (e.request_id, e.code) == (0, ErrorCode::PROTOCOL))
        );
        assert_eq!(open(&mut h, link, 1, true).unwrap().tcp_port, Some(20_000));
        assert_eq!(open(&mut h, link, 2, true).unwrap().tcp_port, Some(20_001));
        // The TCP ports are used up; a TLS-only tunnel still opens.
        assert_eq!(open(&mut h, link, 3, true), Err(ErrorCode::LIMIT_REACHED));
        open(&mut h, link, 3, false).unwrap();
        open(&mut h, link, 4, false).unwrap();
        assert_eq!(open(&mut h, link, 5, false), Err(ErrorCode::LIMIT_REACHED));
        assert_eq!(h.tunnel_count(), 4);
        h.check();
    }

    #[test]
    fn hellos_are_refused_for_a_bad_version_a_bad_token_and_a_relay_shutting_down() {
        let mut h = harness();
        let mut old = hello(TOKEN, &[]);
        old.version = PROTOCOL_VERSION + 1;
        assert_eq!(h.connect(&old).unwrap_err().code, ErrorCode::BAD_VERSION);
        assert_eq!(
            h.connect(&hello("wrong", &[])).unwrap_err().code,
            ErrorCode::UNAUTHORIZED
        );
        assert_eq!(
            h.connect(&hello("", &[])).unwrap_err().code,
            ErrorCode::UNAUTHORIZED
        );
        let link = h.connect(&hello(TOKEN, &[])).unwrap();
        h.shutdown();
        assert_eq!(open(&mut h, link, 80, false), Err(ErrorCode::INTERNAL));
        assert_eq!(
            h.connect(&hello(TOKEN, &[])).unwrap_err().code,
            ErrorCode::INTERNAL
        );
    }

    #[test]
    fn an_agent_that_comes_back_within_the_grace_period_gets_its_tunnels_back() {
        let mut h = harness();
        let identity = [7u8; 16];
        let first = h.connect(&hello(TOKEN, &identity)).unwrap();
        let granted = open(&mut h, first, 80, true).unwrap();
        h.disconnect(first);
        // Kept for the agent, routed to nobody.
        let away = Served {
            link: None,
            port: 80,
            h2: false,
        };
        assert_eq!(h.route(&granted.hostname), Some(away));
        assert_eq!(h.next_timeout(), Some(h.now() + Duration::from_secs(30)));
        h.advance(Duration::from_secs(29));
        let second = h.connect(&hello(TOKEN, &identity)).unwrap();
        let back = open(&mut h, second, 80, true).unwrap();
        assert_eq!(
            (&back.hostname, back.tcp_port),
            (&granted.hostname, granted.tcp_port)
        );
        assert_eq!(h.route(&granted.hostname).unwrap().link, Some(second));
        assert_eq!(h.next_timeout(), None);
        // Gone for good once the agent stays away past the grace period.
        h.disconnect(second);
        h.advance(Duration::from_secs(29));
        assert_eq!(h.tunnel_count(), 1);
        h.advance(Duration::from_secs(1));
        assert_eq!((h.tunnel_count(), h.next_timeout()), (0, None));
        h.check();
    }

    #[test]
    fn a_lease_asked_for_with_other_options_ends_and_a_new_tunnel_opens() {
        let mut h = harness();
        let identity = [8u8; 16];
        let first = h.connect(&hello(TOKEN, &identity)).unwrap();
        let granted = open(&mut h, first, 80, false).unwrap();
        h.disconnect(first);
        let second = h.connect(&hello(TOKEN, &identity)).unwrap();
        let other = open(&mut h, second, 80, true).unwrap();
        assert_ne!(other.hostname, granted.hostname);
        assert_eq!(h.route(&granted.hostname), None);
        assert_eq!(h.tunnel_count(), 1);
        h.check();
    }

    #[test]
    fn the_newest_link_of_an_agent_takes_its_tunnels_and_the_older_cannot_close_them() {
        let mut h = harness();
        let identity = [9u8; 16];
        let first = h.connect(&hello(TOKEN, &identity)).unwrap();
        let granted = open(&mut h, first, 80, false).unwrap();
        let second = h.connect(&hello(TOKEN, &identity)).unwrap();
        assert!(
            !h.is_open(first) && h.is_open(second),
            "the older link is not closed"
        );
        assert_eq!(
            open(&mut h, second, 80, false).unwrap().hostname,
            granted.hostname
        );
        // The old link, still read, closes the port late and asks for it again.
        assert_eq!(
            h.send(first, Frame::Close { port: 80 }),
            Some(Frame::Close { port: 80 })
        );
        assert_eq!(h.route(&granted.hostname).unwrap().link, Some(second));
        // Its end leaves the new link's tunnel alone.
        h.disconnect(first);
        assert_eq!(h.route(&granted.hostname).unwrap().link, Some(second));
        h.check();
        // Another token with the same identity is another agent.
        let mut config = HarnessConfig::new(Token::new(TOKEN));
        config.tokens.push(Token::new("other"));
        let mut h = Harness::new(config);
        let owner = h.connect(&hello(TOKEN, &identity)).unwrap();
        let owned = open(&mut h, owner, 80, false).unwrap();
        let claimant = h.connect(&hello("other", &identity)).unwrap();
        assert_ne!(
            open(&mut h, claimant, 80, false).unwrap().hostname,
            owned.hostname
        );
        assert!(h.is_open(owner));
        assert_eq!(h.route(&owned.hostname).unwrap().link, Some(owner));
    }

    #[test]
    fn leases_are_bounded_per_token_and_per_relay_and_freed_when_they_end() {
        let mut config = HarnessConfig::new(Token::new(TOKEN));
        config.tokens.push(Token::new("other"));
        config.tokens.push(Token::new("third"));
        (config.max_leases_per_token, config.max_leases) = (3, 5);
        let mut h = Harness::new(config);
        // Two agents of one token: three leases between them, then no more.
        let first = h.connect(&hello(TOKEN, &[1; 16])).unwrap();
        let second = h.connect(&hello(TOKEN, &[2; 16])).unwrap();
        let kept = open(&mut h, first, 1, false).unwrap();
        open(&mut h, first, 2, true).unwrap();
        open(&mut h, second, 1, false).unwrap();
        assert_eq!(
            open(&mut h, second, 2, false),
            Err(ErrorCode::LIMIT_REACHED)
        );
        assert_eq!(open(&mut h, second, 3, true), Err(ErrorCode::LIMIT_REACHED));
        // An agent without an identity holds no lease: it is not limited by them.
        let unleased = h.connect(&hello(TOKEN, &[])).unwrap();
        open(&mut h, unleased, 2, false).unwrap();
        // Another token has its own three, until the relay's five are taken.
        let other = h.connect(&hello("other", &[1; 16])).unwrap();
        open(&mut h, other, 1, false).unwrap();
        open(&mut h, other, 2, false).unwrap();
        let third = h.connect(&hello("third", &[1; 16])).unwrap();
        assert_eq!(open(&mut h, third, 1, false), Err(ErrorCode::LIMIT_REACHED));
        assert_eq!(h.saved_leases(), 5);
        h.check();
        // An agent at the limit gets its own leases back.
        h.disconnect(first);
        let back = h.connect(&hello(TOKEN, &[1; 16])).unwrap();
        assert_eq!(
            open(&mut h, back, 1, false).unwrap().hostname,
            kept.hostname
        );
        // A closed tunnel's lease is free for another.
        h.send(back, Frame::Close { port: 1 });
        open(&mut h, third, 1, false).unwrap();
        assert_eq!(
            open(&mut h, second, 2, false),
            Err(ErrorCode::LIMIT_REACHED)
        );
        // An away agent's leases count until they expire.
        h.disconnect(back);
        h.advance(Duration::from_secs(29));
        assert_eq!(
            open(&mut h, second, 2, false),
            Err(ErrorCode::LIMIT_REACHED)
        );
        h.advance(Duration::from_secs(1));
        open(&mut h, second, 2, false).unwrap();
        assert_eq!(h.saved_leases(), 5);
        h.check();
    }

    #[test]
    fn a_restarted_relay_holds_the_saved_leases_for_their_agents() {
        let mut h = harness();
        let identity = [3u8; 16];
        let link = h.connect(&hello(TOKEN, &identity)).unwrap();
        let tls = open(&mut h, link, 80, false).unwrap();
        let tcp = open(&mut h, link, 81, true).unwrap();
        let gone = open(&mut h, link, 82, false).unwrap();
        h.send(link, Frame::Close { port: 82 });
        h.advance(Duration::from_secs(10));
        h.restart();
        assert!(!h.is_open(link));
        assert_eq!((h.tunnel_count(), h.saved_leases()), (2, 2));
        assert_eq!(h.route(&tls.hostname).unwrap().link, None);
        assert_eq!(h.route(&gone.hostname), None);
        h.check();
        let back = h.connect(&hello(TOKEN, &identity)).unwrap();
        assert_eq!(open(&mut h, back, 80, false).unwrap(), tls);
        assert_eq!(open(&mut h, back, 81, true).unwrap(), tcp);
        assert_eq!(h.route(&tcp.hostname).unwrap().link, Some(back));
        h.check();
    }

    #[tokio::test]
    async fn a_connection_to_a_tunnel_reaches_the_agents_listener_through_the_two_stacks() {
        let mut h = harness();
        let link = h.connect(&hello(TOKEN, &[])).unwrap();
        let granted = open(&mut h, link, 8080, false).unwrap();
        let (relay, agent) = h.stacks(link).unwrap();
        let mut listener = agent.listen(8080).unwrap();
        tokio::spawn(crate::netstack::connect_in_memory(relay, agent));
        let (stack, port) = h.route_stack(&granted.hostname).unwrap();
        let accept = async { listener.accept().await.unwrap() };
        let (outer, inner) = tokio::join!(stack.connect(port), accept);
        let (mut outer, mut inner) = (outer.unwrap(), inner);
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        outer.write_all(b"through the tunnel").await.unwrap();
        let mut got = [0u8; 18];
        inner.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"through the tunnel");
    }
}
