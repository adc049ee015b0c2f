//! Unit tests of the control table: a fake stack and a fake relay, no sockets.

use std::collections::HashSet;

use super::*;
use crate::Limit;

const TIMEOUT: Duration = Duration::from_secs(10);

/// A table and the inner ports "the stack" listens on.
struct Table {
    control: Control,
    bound: HashSet<u16>,
    now: Instant,
}

impl Table {
    fn new() -> Self {
        Table {
            control: Control::new(TIMEOUT),
            bound: HashSet::new(),
            now: Instant::now(),
        }
    }

    fn open(&mut self, local: Option<u16>) -> Result<(RequestId, u16), Error> {
        let bound = &mut self.bound;
        let (id, inner, ()) =
            self.control
                .open(local, &ForwardOptions::default(), self.now, |port| {
                    if bound.insert(port) {
                        Ok(())
                    } else {
                        Err(BindError::Taken)
                    }
                })?;
        Ok((id, inner))
    }

    /// The relay's side: answers every Forward it was sent.
    fn relay_answers(&mut self, hostname: &str) -> Vec<u16> {
        let mut ports = Vec::new();
        while let Some(frame) = self.control.poll_transmit() {
            if let Frame::Forward(request) = frame {
                ports.push(request.port);
                self.control.handle_frame(Frame::Forwarded(Forwarded {
                    request_id: request.request_id,
                    port: request.port,
                    hostname: format!("{hostname}{}.portferry.localhost", request.port),
                    tls_port: 8443,
                    tcp_port: None,
                }));
            }
        }
        ports
    }

    /// The relay's side: refuses every Forward it was sent.
    fn relay_refuses(&mut self) -> Vec<u16> {
        let mut ports = Vec::new();
        while let Some(frame) = self.control.poll_transmit() {
            if let Frame::Forward(request) = frame {
                ports.push(request.port);
                self.control.handle_frame(Frame::Error(ErrorFrame {
                    request_id: request.request_id,
                    code: ErrorCode::INTERNAL,
                    message: "no room".into(),
                }));
            }
        }
        ports
    }

    /// A tunnel open on `local`, and its state.
    fn open_tunnel(&mut self, local: u16) -> watch::Receiver<TunnelState> {
        let (id, inner) = self.open(Some(local)).unwrap();
        self.relay_answers("a");
        self.control.answer(id).unwrap().unwrap();
        self.control.tunnel_state(inner).unwrap()
    }

    /// Loses the link and gets a new one.
    fn reconnect(&mut self) {
        self.control.link_lost();
        self.control.link_up(self.now);
    }
}

/// The hostname a state's address has.
fn hostname(state: &watch::Receiver<TunnelState>) -> String {
    state.borrow().address().tls_socket().0.to_owned()
}

#[test]
fn an_answer_completes_its_request_and_records_the_tunnel() {
    let mut t = Table::new();
    let (id, inner) = t.open(Some(8000)).unwrap();
    assert_eq!(inner, 8000, "the local port is the inner port when free");
    assert!(
        t.control.answer(id).is_none(),
        "no answer before the relay's"
    );
    assert_eq!(t.relay_answers("a"), [8000]);
    let forwarded = t.control.answer(id).unwrap().unwrap();
    assert_eq!(forwarded.port, 8000);
    assert!(matches!(
        t.open(Some(8000)),
        Err(Error::PortAlreadyForwarded(8000))
    ));
    assert!(t.control.close(8000, t.now));
    assert!(matches!(
        t.control.poll_transmit(),
        Some(Frame::Close { port: 8000 })
    ));
    t.control.handle_frame(Frame::Close { port: 8000 });
    assert!(matches!(t.control.close_outcome(8000), Some(Ok(()))));
}

#[test]
fn listen_ports_never_block_forwarding_a_local_port() {
    let mut t = Table::new();
    let (listen, inner) = t.open(None).unwrap();
    assert_eq!(inner, INNER_PORTS_START);
    t.relay_answers("l");
    t.control.answer(listen).unwrap().unwrap();
    // The local port equal to the listener's inner port still forwards.
    let (forward, inner) = t.open(Some(INNER_PORTS_START)).unwrap();
    assert_ne!(inner, INNER_PORTS_START);
    t.relay_answers("f");
    t.control.answer(forward).unwrap().unwrap();
    assert!(matches!(
        t.open(Some(INNER_PORTS_START)),
        Err(Error::PortAlreadyForwarded(INNER_PORTS_START))
    ));
}

#[test]
fn a_lost_link_fails_waiters_and_a_new_one_asks_for_every_tunnel_again() {
    let mut t = Table::new();
    let (open, _) = t.open(Some(1)).unwrap();
    t.relay_answers("a");
    t.control.answer(open).unwrap().unwrap();
    let (waiting, _) = t.open(Some(2)).unwrap();
    t.control.link_lost();
    assert!(matches!(
        t.control.answer(waiting),
        Some(Err(Error::LinkClosed))
    ));
    assert!(t.control.poll_transmit().is_none());
    assert!(matches!(t.open(Some(3)), Err(Error::LinkClosed)));

    t.control.link_up(t.now);
    assert_eq!(
        t.relay_answers("a"),
        [1],
        "only the open tunnel is asked for"
    );
    assert_eq!(t.control.poll_event(), Some(Event::Restored { port: 1 }));
    t.control.link_lost();
    t.control.link_up(t.now);
    assert_eq!(t.relay_answers("b"), [1]);
    assert!(matches!(
        t.control.poll_event(),
        Some(Event::Moved { port: 1, .. })
    ));
}

#[test]
fn the_tunnels_state_follows_what_the_relay_answers_after_a_reconnect() {
    let mut t = Table::new();
    let mut state = t.open_tunnel(1);
    assert!(matches!(&*state.borrow_and_update(), TunnelState::Open(_)));
    assert_eq!(hostname(&state), "a1.portferry.localhost");

    // The same address back: nothing to tell.
    t.reconnect();
    t.relay_answers("a");
    assert!(!state.has_changed().unwrap());

    // A new one: the state says so, with the new address.
    t.reconnect();
    t.relay_answers("b");
    assert!(state.has_changed().unwrap());
    assert!(matches!(&*state.borrow_and_update(), TunnelState::Moved(_)));
    assert_eq!(hostname(&state), "b1.portferry.localhost");

    // Closed: the state's sender is gone.
    t.control.close(1, t.now);
    assert!(state.has_changed().is_err());
}

#[test]
fn a_refused_restore_loses_the_tunnel_which_is_not_asked_for_again() {
    let mut t = Table::new();
    let mut lost = t.open_tunnel(1);
    let kept = t.open_tunnel(2);
    t.reconnect();
    let mut refused = t.control.poll_transmit();
    // Refuse the restore of port 1 only; answer port 2's.
    while let Some(Frame::Forward(request)) = refused.take() {
        let answer = if request.port == 1 {
            Frame::Error(ErrorFrame {
                request_id: request.request_id,
                code: ErrorCode::INTERNAL,
                message: "no room".into(),
            })
        } else {
            Frame::Forwarded(Forwarded {
                request_id: request.request_id,
                port: request.port,
                hostname: format!("a{}.portferry.localhost", request.port),
                tls_port: 8443,
                tcp_port: None,
            })
        };
        t.control.handle_frame(answer);
        refused = t.control.poll_transmit();
    }
    assert!(lost.has_changed().unwrap());
    match &*lost.borrow_and_update() {
        TunnelState::Lost { address, error } => {
            assert_eq!(address.tls_socket().0, "a1.portferry.localhost");
            assert!(error.to_string().contains("no room"), "{error}");
        }
        other => panic!("expected the tunnel lost, got {other:?}"),
    }
    assert!(!kept.borrow().is_lost());
    // The restores were asked in no particular order.
    let mut events: Vec<Event> = std::iter::from_fn(|| t.control.poll_event()).collect();
    events.sort_by_key(|event| format!("{event:?}"));
    assert!(
        matches!(
            events.as_slice(),
            [
                Event::RestoreFailed { port: 1, .. },
                Event::Restored { port: 2 }
            ]
        ),
        "{events:?}"
    );

    // The next link asks for the routed tunnel only.
    t.reconnect();
    assert_eq!(t.relay_refuses(), [2]);
    assert!(kept.borrow().is_lost());
    // The lost one's local port stays taken until its handle closes it.
    assert!(matches!(
        t.open(Some(1)),
        Err(Error::PortAlreadyForwarded(1))
    ));
}

#[test]
fn a_restore_unanswered_by_its_deadline_loses_the_tunnel() {
    let mut t = Table::new();
    let state = t.open_tunnel(1);
    t.reconnect();
    assert_eq!(t.control.poll_timeout(), Some(t.now + TIMEOUT));
    t.control.handle_timeout(t.now + TIMEOUT);
    assert!(matches!(
        &*state.borrow(),
        TunnelState::Lost { error, .. } if matches!(**error, Error::Timeout { .. })
    ));
    assert!(matches!(
        t.control.poll_event(),
        Some(Event::RestoreFailed { port: 1, .. })
    ));
    assert_eq!(t.control.poll_timeout(), None);
}

#[test]
fn an_agent_that_gives_up_loses_every_tunnel() {
    let mut t = Table::new();
    let states = [t.open_tunnel(1), t.open_tunnel(2)];
    t.control.link_lost();
    t.control.give_up(&Arc::new(Error::Unauthorized));
    for state in states {
        assert!(matches!(
            &*state.borrow(),
            TunnelState::Lost { error, .. } if matches!(**error, Error::Unauthorized)
        ));
    }
}

#[test]
fn deadlines_come_out_and_expire_requests() {
    let mut t = Table::new();
    let (id, _) = t.open(Some(5)).unwrap();
    assert_eq!(t.control.poll_timeout(), Some(t.now + TIMEOUT));
    t.control.handle_timeout(t.now + TIMEOUT / 2);
    assert!(t.control.answer(id).is_none());
    t.control.handle_timeout(t.now + TIMEOUT);
    assert!(matches!(
        t.control.answer(id),
        Some(Err(Error::Timeout { .. }))
    ));
    assert_eq!(t.control.poll_timeout(), None);
}

#[test]
fn a_caller_gone_after_the_answer_closes_the_tunnel() {
    let mut t = Table::new();
    let (id, inner) = t.open(Some(7)).unwrap();
    t.relay_answers("a");
    t.control.cancel(id);
    assert!(matches!(t.control.poll_transmit(), Some(Frame::Close { port }) if port == inner));
    // The port is free again.
    t.bound.clear();
    t.open(Some(7)).unwrap();
}

#[test]
fn a_caller_gone_before_the_answer_closes_what_the_relay_opens() {
    let mut t = Table::new();
    let (id, inner) = t.open(Some(7)).unwrap();
    t.control.cancel(id);
    // The relay reads the request, then the close, in this order.
    assert!(
        matches!(t.control.poll_transmit(), Some(Frame::Forward(request)) if request.port == inner)
    );
    assert!(matches!(t.control.poll_transmit(), Some(Frame::Close { port }) if port == inner));
    // Its late answer opens nothing here.
    t.control.handle_frame(Frame::Forwarded(Forwarded {
        request_id: id,
        port: inner,
        hostname: "late.portferry.localhost".into(),
        tls_port: 8443,
        tcp_port: None,
    }));
    t.bound.clear();
    let (again, _) = t.open(Some(7)).unwrap();
    assert!(t.control.answer(again).is_none());
}

#[test]
fn a_refusal_is_a_typed_error() {
    let mut t = Table::new();
    let (id, _) = t.open(Some(9)).unwrap();
    t.control.handle_frame(Frame::Error(ErrorFrame {
        request_id: id,
        code: ErrorCode::limit_reached(Limit::TunnelsPerAgent),
        message: "too many".into(),
    }));
    assert!(matches!(
        t.control.answer(id),
        Some(Err(Error::LimitReached {
            limit: Limit::TunnelsPerAgent,
            ..
        }))
    ));
    // Answers to requests that do not exist change nothing.
    t.control.handle_frame(Frame::Close { port: 9 });
    t.control.handle_frame(Frame::Error(ErrorFrame {
        request_id: 999,
        code: ErrorCode::INTERNAL,
        message: String::new(),
    }));
    assert!(t.control.poll_event().is_none());
}

#[test]
fn frames_are_held_back_only_while_the_table_is_idle() {
    let mut t = Table::new();
    assert!(t.control.is_idle());
    assert!(t.control.hold_if_idle());
    // A tunnel asked for while held waits for the next link, and goes out on it.
    let (id, _) = t.open(Some(8000)).unwrap();
    assert!(t.control.poll_transmit().is_none());
    t.control.release();
    assert_eq!(t.relay_answers("a"), [8000]);
    t.control.answer(id).unwrap().unwrap();
    // With a tunnel open, nothing is held.
    assert!(!t.control.is_idle());
    assert!(!t.control.hold_if_idle());
    assert!(t.control.close(8000, t.now));
    assert!(matches!(
        t.control.poll_transmit(),
        Some(Frame::Close { port: 8000 })
    ));
}
