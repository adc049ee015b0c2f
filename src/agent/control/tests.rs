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
