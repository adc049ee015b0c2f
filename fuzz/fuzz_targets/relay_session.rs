//! Plays hostile agents against the relay's real control plane: links opened with any
//! hello, forwards, closes and frames the relay must not take, in any order, on several
//! links at once that may share an identity or a token, with links lost and virtual
//! time passing in between — driven through `relay::harness` (the product's registry
//! and session cores on a virtual clock, no sockets), so that nothing here re-implements
//! the relay's decisions.
//!
//! The input is a script of ops; `tag & 7` picks the op and `m = tag >> 3` modifies it:
//!
//! ```text
//! 0 connect   a hello: m & 3 picks the resume (none, agent A's or B's ticket for the
//!             hello's token once it has one, else NEW_AGENT, or len:u8 bytes[len] of
//!             any length); m & 4: the second token; m & 8: a wrong token; m & 16: the
//!             version from the input (version:u16le)
//! 1 forward   link:u8 request_id:u32le port:u16le; m bit 0: unencrypted, bit 1: h2,
//!             bit 2: the port as it is (else port % 4, so that ports collide)
//! 2 close     link:u8 port:u16le (port % 4 unless m bit 2)
//! 3 other     link:u8: a frame the relay must not take from a live agent (m % 4: a
//!             hello, a welcome, a forwarded, an error)
//! 4 lose      link:u8: the link is lost
//! 5 wait      m seconds of virtual time
//! 6 shutdown  the relay refuses new tunnels and sessions from now on
//! 7 raw hello len:u8 bytes[len]: read by the relay's bounded hello reader; if it reads
//!             a hello, a link is opened with it
//! ```
//!
//! Checked after every op, against the protocol's promises rather than a model of the
//! session: the registry's tables agree with each other; a hello is refused with
//! `BAD_VERSION` for a version it does not speak (outside `MIN_PROTOCOL_VERSION` to
//! `PROTOCOL_VERSION`), `UNAUTHORIZED` for a token the relay does not
//! know, `INTERNAL` once the relay shuts down, `TOO_SOON` exactly for the ticket of an
//! agent whose newest link is open and came less than the takeover interval ago, and
//! welcomed otherwise, with no ticket for an empty resume, else the presented ticket or
//! a fresh one never issued before; a forward is
//! answered with its request id, refused as `INVALID_REQUEST` exactly for port 0 or h2
//! with unencrypted, as `PORT_IN_USE` exactly when the link holds the port, with
//! the limit `max_tunnels_per_agent` only at the tunnel limit and `tcp_ports` only for a
//! raw TCP port, and `INTERNAL` only
//! once shutting down; a grant names a fresh hostname under the domain (or, for the
//! same agent and port with the same options, the hostname it leased before), a raw TCP
//! port exactly when unencrypted, and routes to the link that asked; a close is echoed
//! and the link's tunnel stops routing to it; a lost link's tunnels route to nobody if
//! leased, else nowhere; a newer link of the same agent closes the older; no lease
//! outlives its grace period. At the end every link is lost and, after the grace
//! period, nothing is left.

#![no_main]

mod shared;

use std::collections::{HashMap, HashSet};
use std::sync::OnceLock;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use portferry::relay::harness::{Harness, HarnessConfig, LinkId, Served};
use portferry::relay::{LOCAL_DOMAIN, MAX_HELLO_LEN};
use portferry::token::Token;
use portferry::wire::{
    handshake, ErrorCode, ErrorFrame, ForwardRequest, Forwarded, Frame, Hello, Welcome, HEADER_LEN,
    MIN_PROTOCOL_VERSION, NEW_AGENT, PROTOCOL_VERSION, TICKET_LEN,
};
use portferry::Limit;
use shared::Input;
use tokio::runtime::Runtime;

/// The tokens the relay accepts.
const TOKENS: [&str; 2] = ["relay-session-fuzz-token", "relay-session-other-token"];
/// Tunnels one session may have open, small so that inputs reach the limit.
const MAX_TUNNELS: usize = 4;
/// Raw TCP port numbers the relay hands out, few so that they run out.
const TCP_PORTS: std::ops::RangeInclusive<u16> = 31_990..=31_995;
/// The least time between takeovers of an agent's session.
const TAKEOVER_INTERVAL: Duration = Duration::from_secs(1);
/// How long the tunnels of an agent with a ticket outlive its link.
const LEASE_GRACE: Duration = Duration::from_secs(30);
/// Links one input may open.
const MAX_LINKS: usize = 16;

fuzz_target!(|data: &[u8]| {
    let mut run = Run::new();
    let mut input = Input(data);
    while let Some(tag) = input.byte() {
        run.op(tag, &mut input);
        run.harness.check();
    }
    run.finish();
});

/// A runtime for the bounded hello reader (its reads never wait: they read a slice).
fn runtime() -> &'static Runtime {
    static RUNTIME: OnceLock<Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("tokio runtime")
    })
}

/// Who a link's agent is: the ticket its welcome carried (if its tunnels are leased)
/// and its token index.
type Agent = Option<(Bytes, usize)>;

/// A hostname granted once, and to whom.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Grant {
    agent: Agent,
    port: u16,
    unencrypted: bool,
    h2: bool,
    tcp_port: Option<u16>,
}

/// One link of the run.
struct Link {
    id: LinkId,
    agent: Agent,
    /// Ports the relay granted on this link and it has not closed, with their
    /// hostnames.
    held: HashMap<u16, String>,
    lost: bool,
    /// When it was welcomed, in virtual time.
    connected: tokio::time::Instant,
}

/// The harness and what the answers so far promised.
struct Run {
    harness: Harness,
    links: Vec<Link>,
    granted: HashMap<String, Grant>,
    tcp_ports: HashSet<u16>,
    /// The tickets of agents A and B, by token.
    tickets: HashMap<(u8, usize), Bytes>,
    shut_down: bool,
}

impl Run {
    fn new() -> Run {
        let mut config = HarnessConfig::new(Token::new(TOKENS[0]));
        config.tokens.push(Token::new(TOKENS[1]));
        config.max_tunnels_per_agent = MAX_TUNNELS;
        config.lease_grace = LEASE_GRACE;
        config.min_takeover_interval = TAKEOVER_INTERVAL;
        config.tcp_ports = TCP_PORTS;
        // Out of reach here: the unit tests cover the lease limits.
        (config.max_leases, config.max_leases_per_token) = (usize::MAX, usize::MAX);
        Run {
            harness: Harness::new(config),
            links: Vec::new(),
            granted: HashMap::new(),
            tcp_ports: HashSet::new(),
            tickets: HashMap::new(),
            shut_down: false,
        }
    }

    fn op(&mut self, tag: u8, input: &mut Input<'_>) {
        let m = tag >> 3;
        match tag & 7 {
            0 => {
                let mut hello = hello(m, input);
                let named = (m & 3, usize::from(m & 4 != 0));
                if matches!(named.0, 1 | 2) {
                    if let Some(ticket) = self.tickets.get(&named) {
                        hello.resume = ticket.clone();
                    }
                }
                if let Some((ticket, _)) = self.connect(&hello) {
                    if matches!(named.0, 1 | 2) && m & 8 == 0 {
                        self.tickets.insert(named, ticket);
                    }
                }
            }
            1 => {
                let link = input.byte().unwrap_or(0);
                let request = ForwardRequest {
                    request_id: input.u32(),
                    port: port(m, input.u16()),
                    unencrypted: m & 1 != 0,
                    h2: m & 2 != 0,
                };
                self.forward(link, request);
            }
            2 => {
                let link = input.byte().unwrap_or(0);
                let port = port(m, input.u16());
                self.close(link, port);
            }
            3 => {
                let link = input.byte().unwrap_or(0);
                self.other(link, m);
            }
            4 => {
                let link = input.byte().unwrap_or(0);
                self.lose(link);
            }
            5 => self.wait(Duration::from_secs(m.into())),
            6 => {
                self.harness.shutdown();
                self.shut_down = true;
            }
            _ => {
                let len = input.byte().unwrap_or(0);
                self.raw_hello(input.take(len.into()));
            }
        }
    }

    /// The link an op names, if any is still open.
    fn pick(&self, link: u8) -> Option<usize> {
        (!self.links.is_empty()).then(|| usize::from(link) % self.links.len())
    }

    /// Opens a link with `hello`; its agent, if welcomed with a ticket.
    fn connect(&mut self, hello: &Hello) -> Agent {
        if self.links.len() >= MAX_LINKS {
            return None;
        }
        let token = TOKENS
            .iter()
            .position(|token| !hello.token.is_empty() && *token == hello.token);
        let expected = if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&hello.version) {
            Err(ErrorCode::BAD_VERSION)
        } else if token.is_none() {
            Err(ErrorCode::UNAUTHORIZED)
        } else if self.shut_down {
            Err(ErrorCode::INTERNAL)
        } else if self.held_too_recently(&hello.resume, token) {
            Err(ErrorCode::TOO_SOON)
        } else {
            Ok(())
        };
        let id = match (self.harness.connect(hello), expected) {
            (Ok(id), Ok(())) => id,
            (Err(refusal), Err(code)) if (refusal.request_id, refusal.code) == (0, code) => {
                return None
            }
            (answer, expected) => panic!("{hello:?} answered {answer:?}, expected {expected:?}"),
        };
        let ticket = self.harness.ticket(id).expect("a welcomed link's ticket");
        let fresh = !self
            .links
            .iter()
            .any(|l| l.agent.as_ref().is_some_and(|a| a.0 == ticket));
        if hello.resume.is_empty() {
            assert!(ticket.is_empty(), "a ticket for an empty resume");
        } else {
            assert_eq!(ticket.len(), TICKET_LEN);
            assert!(
                fresh || ticket == hello.resume,
                "a ticket issued before, not the one presented"
            );
        }
        let agent = (!ticket.is_empty()).then(|| (ticket, token.expect("a known token")));
        if agent.is_some() {
            // The newest link of an agent wins: an older one is closed.
            for older in self.links.iter().filter(|l| !l.lost && l.agent == agent) {
                assert!(
                    !self.harness.is_open(older.id),
                    "two links of {agent:?} open"
                );
            }
        }
        assert!(self.harness.is_open(id));
        self.links.push(Link {
            id,
            agent: agent.clone(),
            held: HashMap::new(),
            lost: false,
            connected: self.harness.now(),
        });
        agent
    }

    /// Whether `resume` is the ticket of an agent (with `token`) whose newest link is
    /// open and came less than the takeover interval ago.
    fn held_too_recently(&self, resume: &Bytes, token: Option<usize>) -> bool {
        let agent = Some((resume.clone(), token.unwrap_or(usize::MAX)));
        let newest = self.links.iter().rev().find(|l| l.agent == agent);
        newest.is_some_and(|l| !l.lost && self.harness.now() < l.connected + TAKEOVER_INTERVAL)
    }

    fn raw_hello(&mut self, bytes: &[u8]) {
        let mut reader = bytes;
        let read = runtime().block_on(handshake::read_hello(&mut reader));
        // The bounded reader agrees with the codec, and never reads past the frame.
        let mut buf = BytesMut::from(bytes);
        let parsed = Frame::parse(&mut buf);
        match read {
            Ok(hello) => {
                assert_eq!(parsed, Ok(Some(Frame::Hello(hello.clone()))));
                let len = bytes.len() - buf.len();
                assert!(
                    len <= HEADER_LEN + MAX_HELLO_LEN,
                    "a {len}-byte hello was read"
                );
                assert_eq!(reader.len(), buf.len(), "read past the hello");
                self.connect(&hello);
            }
            Err(_) => {
                let whole_small_hello = matches!(&parsed, Ok(Some(Frame::Hello(_))))
                    && bytes.len() - buf.len() <= HEADER_LEN + MAX_HELLO_LEN;
                assert!(!whole_small_hello, "a good hello was refused: {parsed:?}");
            }
        }
    }

    fn forward(&mut self, link: u8, request: ForwardRequest) {
        let Some(index) = self.pick(link) else { return };
        let link = &self.links[index];
        let answer = self.harness.send(link.id, Frame::Forward(request.clone()));
        if link.lost {
            assert_eq!(answer, None, "a lost link was answered");
            return;
        }
        let invalid = request.port == 0 || (request.h2 && request.unencrypted);
        let held = link.held.contains_key(&request.port);
        match answer {
            Some(Frame::Forwarded(granted)) => {
                assert!(!invalid && !held, "{request:?} granted: {granted:?}");
                self.granted_to(index, &request, granted);
            }
            Some(Frame::Error(ErrorFrame {
                request_id, code, ..
            })) => {
                assert_eq!(request_id, request.request_id, "{request:?}");
                assert_eq!(
                    code == ErrorCode::INVALID_REQUEST,
                    invalid,
                    "{request:?}: {code:?}"
                );
                assert_eq!(
                    code == ErrorCode::PORT_IN_USE,
                    held && !invalid,
                    "{request:?}: {code:?}"
                );
                match code {
                    ErrorCode::INVALID_REQUEST | ErrorCode::PORT_IN_USE => {}
                    code if code.limit() == Some(Limit::TunnelsPerAgent) => assert!(
                        link.held.len() >= MAX_TUNNELS,
                        "{request:?} refused at {} tunnels",
                        link.held.len()
                    ),
                    code if code.limit() == Some(Limit::TcpPorts) => {
                        assert!(request.unencrypted, "{request:?}: no TCP port")
                    }
                    ErrorCode::INTERNAL => assert!(self.shut_down, "{request:?}: INTERNAL"),
                    other => panic!("{request:?} refused with {other:?}"),
                }
            }
            other => panic!("{request:?} answered {other:?}"),
        }
    }

    /// Checks a grant to link `index` for `request`, and notes it.
    fn granted_to(&mut self, index: usize, request: &ForwardRequest, granted: Forwarded) {
        let link = &mut self.links[index];
        assert_eq!(
            (granted.request_id, granted.port, granted.tls_port),
            (request.request_id, request.port, 4443),
            "{granted:?} for {request:?}"
        );
        let grant = Grant {
            agent: link.agent.clone(),
            port: request.port,
            unencrypted: request.unencrypted,
            h2: request.h2,
            tcp_port: granted.tcp_port,
        };
        match self.granted.get(&granted.hostname) {
            // A lease given back: the same agent, port and options.
            Some(before) => assert!(
                before == &grant && grant.agent.is_some(),
                "{} granted again: {before:?}, now {grant:?}",
                granted.hostname
            ),
            None => {
                assert!(!self.shut_down, "a new tunnel while shutting down");
                let label = granted
                    .hostname
                    .strip_suffix(&format!(".{LOCAL_DOMAIN}"))
                    .unwrap_or_else(|| panic!("hostname outside the domain: {granted:?}"));
                assert!(label.len() == 26 && !label.contains('.'), "{granted:?}");
                if let Some(port) = granted.tcp_port {
                    assert!(TCP_PORTS.contains(&port), "{granted:?}");
                    assert!(
                        self.tcp_ports.insert(port),
                        "TCP port given twice: {granted:?}"
                    );
                }
                self.granted.insert(granted.hostname.clone(), grant);
            }
        }
        assert_eq!(
            granted.tcp_port.is_some(),
            request.unencrypted,
            "{granted:?}"
        );
        let served = Served {
            link: Some(link.id),
            port: request.port,
            h2: request.h2,
        };
        assert_eq!(self.harness.route(&granted.hostname), Some(served));
        link.held.insert(request.port, granted.hostname);
        assert!(link.held.len() <= MAX_TUNNELS, "over the tunnel limit");
    }

    fn close(&mut self, link: u8, port: u16) {
        let Some(index) = self.pick(link) else { return };
        let link = &mut self.links[index];
        let answer = self.harness.send(link.id, Frame::Close { port });
        if link.lost {
            assert_eq!(answer, None, "a lost link was answered");
            return;
        }
        assert_eq!(answer, Some(Frame::Close { port }), "answer to a close");
        if let Some(hostname) = link.held.remove(&port) {
            let route = self.harness.route(&hostname);
            assert!(
                route.is_none_or(|served| served.link != Some(link.id)),
                "{hostname} still routes to the link that closed it"
            );
        }
    }

    fn other(&mut self, link: u8, which: u8) {
        let Some(index) = self.pick(link) else { return };
        let link = &self.links[index];
        let frame = match which % 4 {
            0 => Frame::Hello(Hello {
                version: PROTOCOL_VERSION,
                token: TOKENS[0].into(),
                resume: Bytes::new(),
            }),
            1 => Frame::Welcome(Welcome {
                version: PROTOCOL_VERSION,
                ticket: Bytes::new(),
            }),
            2 => Frame::Forwarded(Forwarded {
                request_id: 1,
                port: 80,
                hostname: format!("x.{LOCAL_DOMAIN}"),
                tls_port: 443,
                tcp_port: None,
            }),
            _ => Frame::Error(ErrorFrame {
                request_id: 1,
                code: ErrorCode::INTERNAL,
                message: "agent-side error".into(),
            }),
        };
        let tunnels = self.harness.tunnel_count();
        let answer = self.harness.send(link.id, frame);
        if link.lost {
            assert_eq!(answer, None, "a lost link was answered");
            return;
        }
        assert!(
            matches!(
                answer,
                Some(Frame::Error(ErrorFrame {
                    request_id: 0,
                    code: ErrorCode::PROTOCOL,
                    ..
                }))
            ),
            "answered {answer:?}"
        );
        assert_eq!(
            self.harness.tunnel_count(),
            tunnels,
            "a stray frame moved tunnels"
        );
    }

    fn lose(&mut self, link: u8) {
        let Some(index) = self.pick(link) else { return };
        let link = &mut self.links[index];
        if link.lost {
            return;
        }
        let served: Vec<(String, Served)> = link
            .held
            .values()
            .filter_map(|hostname| Some((hostname.clone(), self.harness.route(hostname)?)))
            .filter(|(_, served)| served.link == Some(link.id))
            .collect();
        self.harness.disconnect(link.id);
        link.lost = true;
        assert!(!self.harness.is_open(link.id));
        for (hostname, before) in served {
            let expected = link.agent.as_ref().map(|_| Served {
                link: None,
                ..before
            });
            assert_eq!(
                self.harness.route(&hostname),
                expected,
                "{hostname} after its link"
            );
        }
    }

    fn wait(&mut self, by: Duration) {
        self.harness.advance(by);
        let now = self.harness.now();
        assert!(
            self.harness.next_timeout().is_none_or(|due| due > now),
            "a lease outlived its grace period"
        );
    }

    /// Every link is lost; after the grace period nothing is left.
    fn finish(mut self) {
        for index in 0..self.links.len() {
            self.lose(index as u8);
        }
        assert_eq!(
            self.harness.session_count(),
            0,
            "sessions outlived their links"
        );
        self.wait(LEASE_GRACE);
        assert_eq!(
            self.harness.tunnel_count(),
            0,
            "tunnels outlived their leases"
        );
        assert_eq!(self.harness.next_timeout(), None);
        self.harness.check();
    }
}

/// A hello as `m` and the input say.
fn hello(m: u8, input: &mut Input<'_>) -> Hello {
    let resume = match m & 3 {
        0 => Bytes::new(),
        1 | 2 => Bytes::from_static(NEW_AGENT),
        _ => {
            let len = input.byte().unwrap_or(0);
            Bytes::copy_from_slice(input.take(len.into()))
        }
    };
    let token = if m & 8 != 0 {
        "not-a-token"
    } else {
        TOKENS[usize::from(m & 4 != 0)]
    };
    let version = if m & 16 != 0 {
        input.u16()
    } else {
        PROTOCOL_VERSION
    };
    Hello {
        version,
        token: token.into(),
        resume,
    }
}

/// A port as `m` says: as it is, or one of 0 to 3, so that ports collide.
fn port(m: u8, port: u16) -> u16 {
    if m & 4 != 0 {
        port
    } else {
        port % 4
    }
}
