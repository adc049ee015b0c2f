//! Unit tests of the relay's control plane, driven through the harness: hellos,
//! tickets and takeovers, tunnels and their limits, leases, their expiry and the lease
//! file across a restart.

use super::*;
use crate::limit::Limit;
use crate::token::Token;
use crate::wire::{ErrorCode, ForwardRequest, Forwarded, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};
use crate::wire::{Frame, Hello};
use std::time::Duration;

const TOKEN: &str = "harness-token";

fn harness() -> Harness {
    Harness::new(HarnessConfig::new(Token::new(TOKEN)))
}

fn hello(token: &str, resume: &[u8]) -> Hello {
    Hello {
        version: PROTOCOL_VERSION,
        token: token.into(),
        resume: bytes::Bytes::copy_from_slice(resume),
    }
}

/// The hello of a new agent that wants its tunnels leased.
fn new_agent(token: &str) -> Hello {
    hello(token, crate::wire::NEW_AGENT)
}

/// The hello of `link`'s agent on a new link: its ticket.
fn again(h: &Harness, token: &str, link: LinkId) -> Hello {
    let ticket = h.ticket(link).unwrap();
    assert_eq!(ticket.len(), crate::wire::TICKET_LEN);
    hello(token, &ticket)
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
    // Without a ticket, nothing is kept once the link is gone.
    assert_eq!(h.ticket(link).unwrap(), bytes::Bytes::new());
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
    assert_eq!(
        open(&mut h, link, 3, true),
        Err(ErrorCode::limit_reached(Limit::TcpPorts))
    );
    open(&mut h, link, 3, false).unwrap();
    open(&mut h, link, 4, false).unwrap();
    assert_eq!(
        open(&mut h, link, 5, false),
        Err(ErrorCode::limit_reached(Limit::TunnelsPerAgent))
    );
    assert_eq!(h.tunnel_count(), 4);
    h.check();
}

#[test]
fn hellos_are_refused_for_a_bad_version_a_bad_token_and_a_relay_shutting_down() {
    let mut h = harness();
    for version in [MIN_PROTOCOL_VERSION - 1, PROTOCOL_VERSION + 1] {
        let mut unknown = hello(TOKEN, &[]);
        unknown.version = version;
        assert_eq!(
            h.connect(&unknown).unwrap_err().code,
            ErrorCode::BAD_VERSION
        );
    }
    // An agent from before connection frames is still served.
    let mut oldest = hello(TOKEN, &[]);
    oldest.version = MIN_PROTOCOL_VERSION;
    assert!(h.connect(&oldest).is_ok());
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
    let first = h.connect(&new_agent(TOKEN)).unwrap();
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
    let second = h.connect(&again(&h, TOKEN, first)).unwrap();
    assert_eq!(h.ticket(second), h.ticket(first));
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
    let first = h.connect(&new_agent(TOKEN)).unwrap();
    let granted = open(&mut h, first, 80, false).unwrap();
    h.disconnect(first);
    let second = h.connect(&again(&h, TOKEN, first)).unwrap();
    let other = open(&mut h, second, 80, true).unwrap();
    assert_ne!(other.hostname, granted.hostname);
    assert_eq!(h.route(&granted.hostname), None);
    assert_eq!(h.tunnel_count(), 1);
    h.check();
}

#[test]
fn the_newest_link_of_an_agent_takes_its_tunnels_and_the_older_cannot_close_them() {
    let mut h = harness();
    let first = h.connect(&new_agent(TOKEN)).unwrap();
    let granted = open(&mut h, first, 80, false).unwrap();
    h.advance(Duration::from_secs(1));
    let second = h.connect(&again(&h, TOKEN, first)).unwrap();
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
    // The same ticket with another token is another agent.
    let mut config = HarnessConfig::new(Token::new(TOKEN));
    config.tokens.push(Token::new("other"));
    let mut h = Harness::new(config);
    let owner = h.connect(&new_agent(TOKEN)).unwrap();
    let owned = open(&mut h, owner, 80, false).unwrap();
    h.advance(Duration::from_secs(1));
    let claimant = h.connect(&again(&h, "other", owner)).unwrap();
    assert_ne!(h.ticket(claimant), h.ticket(owner));
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
    let first = h.connect(&new_agent(TOKEN)).unwrap();
    let second = h.connect(&new_agent(TOKEN)).unwrap();
    let kept = open(&mut h, first, 1, false).unwrap();
    open(&mut h, first, 2, true).unwrap();
    open(&mut h, second, 1, false).unwrap();
    assert_eq!(
        open(&mut h, second, 2, false),
        Err(ErrorCode::limit_reached(Limit::LeasesPerToken))
    );
    assert_eq!(
        open(&mut h, second, 3, true),
        Err(ErrorCode::limit_reached(Limit::LeasesPerToken))
    );
    // An agent without a ticket holds no lease: it is not limited by them.
    let unleased = h.connect(&hello(TOKEN, &[])).unwrap();
    open(&mut h, unleased, 2, false).unwrap();
    // Another token has its own, but no more than leaves the third token its share of
    // the relay's five (5 / 3 tokens = 1).
    let other = h.connect(&new_agent("other")).unwrap();
    open(&mut h, other, 1, false).unwrap();
    assert_eq!(
        open(&mut h, other, 2, false),
        Err(ErrorCode::limit_reached(Limit::Leases))
    );
    let third = h.connect(&new_agent("third")).unwrap();
    open(&mut h, third, 2, false).unwrap();
    assert_eq!(
        open(&mut h, third, 1, false),
        Err(ErrorCode::limit_reached(Limit::Leases))
    );
    assert_eq!(h.saved_leases(), 5);
    h.check();
    // An agent at the limit gets its own leases back.
    h.disconnect(first);
    let back = h.connect(&again(&h, TOKEN, first)).unwrap();
    assert_eq!(
        open(&mut h, back, 1, false).unwrap().hostname,
        kept.hostname
    );
    // A closed tunnel's lease is free for another.
    h.send(back, Frame::Close { port: 1 });
    open(&mut h, third, 1, false).unwrap();
    assert_eq!(
        open(&mut h, second, 2, false),
        Err(ErrorCode::limit_reached(Limit::Leases))
    );
    // An away agent's leases count until they expire.
    h.disconnect(back);
    h.advance(Duration::from_secs(29));
    assert_eq!(
        open(&mut h, second, 2, false),
        Err(ErrorCode::limit_reached(Limit::Leases))
    );
    h.advance(Duration::from_secs(1));
    open(&mut h, second, 2, false).unwrap();
    assert_eq!(h.saved_leases(), 5);
    h.check();
}

#[test]
fn a_restarted_relay_holds_the_saved_leases_for_their_agents() {
    let mut h = harness();
    let link = h.connect(&new_agent(TOKEN)).unwrap();
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
    let back = h.connect(&again(&h, TOKEN, link)).unwrap();
    assert_eq!(open(&mut h, back, 80, false).unwrap(), tls);
    assert_eq!(open(&mut h, back, 81, true).unwrap(), tcp);
    assert_eq!(h.route(&tcp.hostname).unwrap().link, Some(back));
    h.check();
}

#[test]
fn an_impostor_with_the_token_and_the_lease_file_but_not_the_ticket_gets_a_new_agent() {
    let mut h = harness();
    let victim = h.connect(&new_agent(TOKEN)).unwrap();
    let url = open(&mut h, victim, 80, false).unwrap();
    let ticket = h.ticket(victim).unwrap();
    // What the lease file shows: the selector (the ticket's first 16 bytes) and the
    // ticket's SHA-256; neither, nor the two together, nor a near miss, is the ticket.
    let file = h.lease_file();
    let line = file.lines().next().unwrap();
    let fields: Vec<&str> = line.split_whitespace().collect();
    let selector = crate::relay::ticket::from_hex::<16>(fields[0]).unwrap();
    let verifier = crate::relay::ticket::from_hex::<32>(fields[1]).unwrap();
    assert_eq!(selector, ticket[..16]);
    let mut near_miss = ticket.to_vec();
    near_miss[47] ^= 0x80;
    let attempts = [
        selector.to_vec(),
        [&selector[..], &verifier[..]].concat(),
        [&selector[..], &verifier[..16]].concat(),
        near_miss,
    ];
    h.advance(Duration::from_secs(5));
    for (i, resume) in attempts.iter().enumerate() {
        let impostor = h.connect(&hello(TOKEN, resume)).unwrap();
        assert!(h.is_open(victim), "attempt {i} closed the victim's link");
        let taken = open(&mut h, impostor, 80, false).unwrap();
        assert_ne!(
            taken.hostname, url.hostname,
            "attempt {i} got the victim's URL"
        );
        assert_ne!(h.ticket(impostor), Some(ticket.clone()));
        assert_eq!(h.route(&url.hostname).unwrap().link, Some(victim));
        h.disconnect(impostor);
    }
    // Also while the victim is away: its URL waits for it alone.
    h.disconnect(victim);
    let impostor = h.connect(&hello(TOKEN, &attempts[1])).unwrap();
    assert_ne!(
        open(&mut h, impostor, 80, false).unwrap().hostname,
        url.hostname
    );
    assert_eq!(h.route(&url.hostname).unwrap().link, None);
    let back = h.connect(&again(&h, TOKEN, victim)).unwrap();
    assert_eq!(open(&mut h, back, 80, false).unwrap(), url);
    h.check();
}

#[test]
fn a_takeover_with_a_valid_ticket_comes_no_sooner_than_the_interval() {
    let mut h = harness();
    let holder = h.connect(&new_agent(TOKEN)).unwrap();
    let url = open(&mut h, holder, 80, false).unwrap();
    h.advance(Duration::from_millis(999));
    let refused = h.connect(&again(&h, TOKEN, holder)).unwrap_err();
    assert_eq!(refused.code, ErrorCode::TOO_SOON);
    assert!(
        refused.message.contains("min_takeover_interval"),
        "{}",
        refused.message
    );
    assert!(h.is_open(holder));
    h.advance(Duration::from_millis(1));
    let taker = h.connect(&again(&h, TOKEN, holder)).unwrap();
    assert!(!h.is_open(holder));
    assert_eq!(open(&mut h, taker, 80, false).unwrap(), url);
    // The taken-over link cannot take it back at once either.
    h.advance(Duration::from_millis(500));
    assert_eq!(
        h.connect(&again(&h, TOKEN, holder)).unwrap_err().code,
        ErrorCode::TOO_SOON
    );
    // A link that comes back after its old one ended is no takeover: never refused.
    h.disconnect(holder);
    h.disconnect(taker);
    let back = h.connect(&again(&h, TOKEN, holder)).unwrap();
    assert_eq!(open(&mut h, back, 80, false).unwrap(), url);
    h.check();
}

#[test]
fn a_replaced_link_that_forwards_after_its_agent_went_away_still_leases_the_tunnel() {
    let mut h = harness();
    let first = h.connect(&new_agent(TOKEN)).unwrap();
    h.advance(Duration::from_secs(1));
    let second = h.connect(&again(&h, TOKEN, first)).unwrap();
    // The newest link goes, holding nothing: the relay forgets the agent.
    h.disconnect(second);
    // The replaced link, still read, asks late; its tunnel is the agent's lease.
    let late = open(&mut h, first, 80, false).unwrap();
    h.disconnect(first);
    assert_eq!(h.route(&late.hostname).unwrap().link, None);
    let back = h.connect(&again(&h, TOKEN, first)).unwrap();
    assert_eq!(open(&mut h, back, 80, false).unwrap(), late);
    h.check();
}

#[test]
fn at_a_lease_limit_the_leases_of_an_away_agent_give_way_to_a_live_one() {
    let mut config = HarnessConfig::new(Token::new(TOKEN));
    config.max_leases_per_token = 4;
    let mut h = Harness::new(config);
    // One agent holds every lease of the token while it is here.
    let holder = h.connect(&new_agent(TOKEN)).unwrap();
    let held: Vec<_> = (1..=4)
        .map(|port| open(&mut h, holder, port, false).unwrap())
        .collect();
    let newcomer = h.connect(&new_agent(TOKEN)).unwrap();
    assert_eq!(
        open(&mut h, newcomer, 1, false),
        Err(ErrorCode::limit_reached(Limit::LeasesPerToken))
    );
    // Once it is away, its oldest lease gives way, one per new lease, and no more.
    h.disconnect(holder);
    open(&mut h, newcomer, 1, false).unwrap();
    open(&mut h, newcomer, 2, false).unwrap();
    assert_eq!(
        open(&mut h, newcomer, 3, false),
        Err(ErrorCode::limit_reached(Limit::LeasesPerToken)),
        "the two agents hold two each"
    );
    assert!(
        h.route(&held[0].hostname).is_none(),
        "the oldest lease ended"
    );
    assert_eq!(h.saved_leases(), 4);
    h.check();
    // The agent back gets the leases it still has.
    let back = h.connect(&again(&h, TOKEN, holder)).unwrap();
    let kept = open(&mut h, back, 4, false).unwrap();
    assert_eq!(kept.hostname, held[3].hostname);
    h.check();
}

#[test]
fn a_tunnel_taken_back_counts_against_the_tunnel_limit() {
    let mut h = harness();
    let old = h.connect(&new_agent(TOKEN)).unwrap();
    open(&mut h, old, 1, false).unwrap();
    h.advance(Duration::from_secs(1));
    let new = h.connect(&again(&h, TOKEN, old)).unwrap();
    for port in 2..=5 {
        open(&mut h, new, port, false).unwrap();
    }
    // At its limit, the new link cannot take the old link's tunnel too.
    assert_eq!(
        open(&mut h, new, 1, false),
        Err(ErrorCode::limit_reached(Limit::TunnelsPerAgent))
    );
    h.check();
}

/// The agent's control table and the relay's session core, over links lost and
/// opened again: the tunnel comes back with its URL inside the grace period, and
/// moves to a new one after it.
#[cfg(feature = "agent")]
#[test]
fn an_agents_control_table_gets_its_tunnels_back_after_a_lost_link() {
    use crate::agent::control::{Control, Event};
    use crate::agent::ForwardOptions;
    let mut h = harness();
    let mut agent = Control::new(Duration::from_secs(10));
    let link = h.connect(&new_agent(TOKEN)).unwrap();
    let now = h.now().into_std();
    let bind = |port: u16| Ok::<_, crate::agent::control::BindError>(port);
    let (id, inner, _) = agent
        .open(Some(8000), &ForwardOptions::default(), now, bind)
        .unwrap();
    h.exchange(link, &mut agent);
    let granted = agent.answer(id).unwrap().unwrap();
    let state = agent.tunnel_state(inner).unwrap();
    assert_eq!(h.route(&granted.hostname).unwrap().link, Some(link));
    assert_eq!(granted.port, inner);

    // Lost and back within the grace period: the same URL, on the new link.
    agent.link_lost();
    h.disconnect(link);
    h.advance(Duration::from_secs(20));
    let back = h.connect(&again(&h, TOKEN, link)).unwrap();
    agent.link_up(h.now().into_std());
    h.exchange(back, &mut agent);
    assert_eq!(agent.poll_event(), Some(Event::Restored { port: inner }));
    assert_eq!(h.route(&granted.hostname).unwrap().link, Some(back));

    // Away past the grace period: a new URL, and the old one routes nowhere.
    agent.link_lost();
    h.disconnect(back);
    h.advance(Duration::from_secs(30));
    let late = h.connect(&again(&h, TOKEN, back)).unwrap();
    agent.link_up(h.now().into_std());
    h.exchange(late, &mut agent);
    match agent.poll_event() {
        Some(Event::Moved { port, old, new }) => {
            assert_eq!((port, &old), (inner, &granted.hostname));
            assert_eq!(h.route(&new).unwrap().link, Some(late));
            // What the tunnel's handle reads is the new address.
            assert!(matches!(
                &*state.borrow(),
                crate::agent::TunnelState::Moved(address) if address.tls_socket().0 == new
            ));
        }
        other => panic!("expected the tunnel to move, got {other:?}"),
    }
    assert_eq!(h.route(&granted.hostname), None);

    // A close from the agent ends the tunnel at the relay.
    assert!(agent.close(inner, h.now().into_std()));
    h.exchange(late, &mut agent);
    assert_eq!(agent.close_outcome(inner).map(|r| r.is_ok()), Some(true));
    assert_eq!(h.tunnel_count(), 0);
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
