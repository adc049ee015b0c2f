//! The agent's control plane as one sans-IO table: requests in, frames and answers out.
//!
//! [`Control`] holds every open tunnel, every request waiting for the relay's answer
//! and every close waiting for the relay's confirmation, each once. It does no I/O and
//! never reads the clock: callers pass `now`, take the frames to send from
//! [`poll_transmit`](Control::poll_transmit), feed the relay's frames to
//! [`handle_frame`](Control::handle_frame) and the link's fate to
//! [`link_lost`](Control::link_lost) / [`link_up`](Control::link_up), collect answers
//! with [`answer`](Control::answer) / [`close_outcome`](Control::close_outcome), and
//! expire deadlines with [`handle_timeout`](Control::handle_timeout) at
//! [`poll_timeout`](Control::poll_timeout).
//!
//! It is also the one place a tunnel's state lives: each open tunnel's entry owns the
//! sending side of a `watch` of its [`TunnelState`], which the tunnel's handle reads
//! ([`tunnel_state`](Control::tunnel_state)). The table changes it when the relay
//! answers after a reconnect (a new address, a refusal), when that answer does not come
//! in time, and when the agent gives up.
//!
//! Every entry is made by a local caller (one per `forward`/`listen`/`close` in
//! flight, one per open tunnel, at most one per inner port), never by the relay: a
//! relay's frame only completes or drops entries that exist.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::{ForwardOptions, TunnelAddress, TunnelState};
use crate::error::Error;
use crate::wire::{ErrorCode, ErrorFrame, ForwardRequest, Forwarded, Frame};

/// Inner ports are first looked for from here up (then from 1), when a tunnel cannot
/// have its local port as its inner port.
pub const INNER_PORTS_START: u16 = 61_000;

/// Identifies one request in a [`Control`] table.
pub type RequestId = u32;

/// Why a candidate inner port could not be listened on.
#[derive(Debug)]
pub enum BindError {
    /// Something else listens on it: try the next one.
    Taken,
    /// No port will do.
    Failed(Error),
}

/// What the table reports besides answers to waiting callers.
#[derive(Debug, PartialEq)]
pub enum Event {
    /// After a reconnect, the relay gave a tunnel back its hostname and port.
    Restored {
        /// The tunnel's inner port.
        port: u16,
    },
    /// After a reconnect, the relay gave a tunnel a new address (its lease had run out).
    Moved {
        /// The tunnel's inner port.
        port: u16,
        /// The hostname it had.
        old: String,
        /// The hostname it has now.
        new: String,
    },
    /// After a reconnect, the relay refused a tunnel, or the request was lost.
    RestoreFailed {
        /// The tunnel's inner port.
        port: u16,
        /// Why.
        error: String,
    },
}

/// An open tunnel, as asked for again after a reconnect.
#[derive(Debug)]
struct Open {
    forwarded: Forwarded,
    /// The local port it forwards to, for `forward`; `None` for `listen`.
    local: Option<u16>,
    options: ForwardOptions,
    /// Its state, which its handle reads; dropped (so that receivers learn of it) when
    /// the entry goes.
    state: watch::Sender<TunnelState>,
}

impl Open {
    /// The relay no longer routes the tunnel, for `error`; it is not asked for again.
    fn lose(&self, error: Arc<Error>) {
        self.state.send_modify(|state| {
            *state = TunnelState::Lost {
                address: state.address().clone(),
                error,
            }
        });
    }
}

#[derive(Debug)]
enum Purpose {
    /// A caller waits for the answer.
    Open {
        local: Option<u16>,
        outcome: Option<Result<Forwarded, Error>>,
    },
    /// Asked again after a reconnect; the answer becomes an [`Event`].
    Restore { before: Forwarded },
}

#[derive(Debug)]
struct Request {
    inner: u16,
    options: ForwardOptions,
    deadline: Instant,
    purpose: Purpose,
}

#[derive(Debug)]
struct Closing {
    deadline: Instant,
    outcome: Option<Result<(), Error>>,
}

/// The request/close bookkeeping of one agent (see the module docs).
#[derive(Debug)]
pub struct Control {
    request_timeout: Duration,
    link_up: bool,
    next_request: RequestId,
    /// Where the search for a free inner port goes on.
    next_inner: u16,
    requests: HashMap<RequestId, Request>,
    /// Open tunnels by inner port.
    tunnels: HashMap<u16, Open>,
    /// Closes waiting for the relay's confirmation, by inner port.
    closing: HashMap<u16, Closing>,
    transmits: VecDeque<Frame>,
    /// While set, [`poll_transmit`](Control::poll_transmit) gives nothing: the agent
    /// is moving its idle link to another relay.
    held: bool,
    events: VecDeque<Event>,
}

impl Control {
    /// A table for a link that is up; each request may wait `request_timeout`.
    pub fn new(request_timeout: Duration) -> Self {
        Control {
            request_timeout,
            link_up: true,
            next_request: 1,
            next_inner: INNER_PORTS_START,
            requests: HashMap::new(),
            tunnels: HashMap::new(),
            closing: HashMap::new(),
            transmits: VecDeque::new(),
            held: false,
            events: VecDeque::new(),
        }
    }

    /// Whether nothing is open or under way: no tunnel, no request, no close.
    pub fn is_idle(&self) -> bool {
        self.tunnels.is_empty() && self.requests.is_empty() && self.closing.is_empty()
    }

    /// If the table [is idle](Self::is_idle), holds its frames back until
    /// [`release`](Self::release) and returns `true`: nothing waits for an answer on
    /// the link, and what is asked meanwhile goes out on the next one.
    pub fn hold_if_idle(&mut self) -> bool {
        self.held = self.is_idle();
        self.held
    }

    /// Lets held frames go out again.
    pub fn release(&mut self) {
        self.held = false;
    }

    /// Whether the link is up.
    pub fn is_link_up(&self) -> bool {
        self.link_up
    }

    /// Tunnels open: granted and not closed.
    pub fn tunnel_count(&self) -> usize {
        self.tunnels.len()
    }

    /// Asks the relay for a tunnel to `local` (for `forward`) or to the program itself
    /// (`None`, for `listen`). Picks the inner port: `local` itself if `bind` can listen
    /// on it, else the first free one from [`INNER_PORTS_START`] on, so inner ports of
    /// `listen` never keep a local port from being forwarded.
    ///
    /// Fails with [`Error::PortAlreadyForwarded`] while `local` is forwarded or being
    /// forwarded, and with [`Error::LinkClosed`] while the link is down.
    pub fn open<L>(
        &mut self,
        local: Option<u16>,
        options: &ForwardOptions,
        now: Instant,
        mut bind: impl FnMut(u16) -> Result<L, BindError>,
    ) -> Result<(RequestId, u16, L), Error> {
        if let Some(port) = local {
            if self.local_ports().any(|open| open == port) {
                return Err(Error::PortAlreadyForwarded(port));
            }
        }
        if !self.link_up {
            return Err(Error::LinkClosed);
        }
        let (inner, bound) = self.bind_inner(local, &mut bind)?;
        let id = self.next_request;
        self.next_request = self.next_request.wrapping_add(1).max(1);
        self.transmits.push_back(forward_frame(id, inner, options));
        self.requests.insert(
            id,
            Request {
                inner,
                options: options.clone(),
                deadline: now + self.request_timeout,
                purpose: Purpose::Open {
                    local,
                    outcome: None,
                },
            },
        );
        Ok((id, inner, bound))
    }

    /// Local ports of open tunnels and of requests for one.
    fn local_ports(&self) -> impl Iterator<Item = u16> + '_ {
        let open = self.tunnels.values().filter_map(|open| open.local);
        let asked = self.requests.values().filter_map(|r| match r.purpose {
            Purpose::Open { local, .. } => local,
            Purpose::Restore { .. } => None,
        });
        open.chain(asked)
    }

    fn inner_in_use(&self, port: u16) -> bool {
        self.tunnels.contains_key(&port) || self.requests.values().any(|r| r.inner == port)
    }

    fn bind_inner<L>(
        &mut self,
        local: Option<u16>,
        bind: &mut impl FnMut(u16) -> Result<L, BindError>,
    ) -> Result<(u16, L), Error> {
        if let Some(port) = local.filter(|&port| !self.inner_in_use(port)) {
            match bind(port) {
                Ok(bound) => return Ok((port, bound)),
                Err(BindError::Taken) => {}
                Err(BindError::Failed(e)) => return Err(e),
            }
        }
        for _ in 0..u16::MAX {
            let port = self.next_inner;
            self.next_inner = port.checked_add(1).unwrap_or(1);
            if self.inner_in_use(port) {
                continue;
            }
            match bind(port) {
                Ok(bound) => return Ok((port, bound)),
                Err(BindError::Taken) => {}
                Err(BindError::Failed(e)) => return Err(e),
            }
        }
        Err(Error::Io(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            "every inner port of this agent is in use",
        )))
    }

    /// The state of the open tunnel on `inner`, now and as it changes; `None` if no
    /// tunnel is open there.
    pub fn tunnel_state(&self, inner: u16) -> Option<watch::Receiver<TunnelState>> {
        self.tunnels.get(&inner).map(|open| open.state.subscribe())
    }

    /// Takes the answer to request `id`, once it has come (or failed). An open
    /// tunnel is recorded when the relay's answer arrives, before it is taken.
    pub fn answer(&mut self, id: RequestId) -> Option<Result<Forwarded, Error>> {
        let request = self.requests.get_mut(&id)?;
        let Purpose::Open { outcome, .. } = &mut request.purpose else {
            return None;
        };
        let answer = outcome.take()?;
        self.requests.remove(&id);
        Some(answer)
    }

    /// The caller of request `id` went away: forgets it, and closes the tunnel the
    /// relay opened for it, or may still open.
    pub fn cancel(&mut self, id: RequestId) {
        let Some(request) = self.requests.remove(&id) else {
            return;
        };
        let opened = match request.purpose {
            Purpose::Open {
                outcome: Some(Ok(forwarded)),
                ..
            } => forwarded.port,
            // Not answered yet: the relay may open it still, so it is told to close it
            // (after the request, on the same link; a close of nothing is harmless).
            Purpose::Open { outcome: None, .. } => request.inner,
            _ => return,
        };
        self.tunnels.remove(&opened);
        if self.link_up {
            self.transmits.push_back(Frame::Close { port: opened });
        }
    }

    /// Closes the tunnel on `inner`: it is forgotten at once, and the relay told if
    /// the link is up. Returns whether a confirmation will come (to wait for with
    /// [`close_outcome`](Self::close_outcome)); while the link is down none does, and
    /// the relay's lease on the tunnel simply runs out.
    pub fn close(&mut self, inner: u16, now: Instant) -> bool {
        self.tunnels.remove(&inner);
        if !self.link_up {
            return false;
        }
        self.transmits.push_back(Frame::Close { port: inner });
        self.closing.insert(
            inner,
            Closing {
                deadline: now + self.request_timeout,
                outcome: None,
            },
        );
        true
    }

    /// Takes the outcome of the close of `inner`, once the relay has confirmed it (or
    /// it failed).
    pub fn close_outcome(&mut self, inner: u16) -> Option<Result<(), Error>> {
        let outcome = self.closing.get_mut(&inner)?.outcome.take()?;
        self.closing.remove(&inner);
        Some(outcome)
    }

    /// Nobody waits for the close of `inner` any more.
    pub fn forget_close(&mut self, inner: u16) {
        self.closing.remove(&inner);
    }

    /// Handles a control frame from the relay.
    pub fn handle_frame(&mut self, frame: Frame) {
        match frame {
            Frame::Forwarded(forwarded) => {
                let id = forwarded.request_id;
                self.complete(id, Ok(forwarded));
            }
            Frame::Error(refusal) => self.complete(refusal.request_id, Err(refusal)),
            Frame::Close { port } => {
                if let Some(closing) = self.closing.get_mut(&port) {
                    closing.outcome.get_or_insert(Ok(()));
                }
            }
            // Anything else is not for an agent; the relay is at fault but harmless.
            _ => {}
        }
    }

    fn complete(&mut self, id: RequestId, answer: Result<Forwarded, ErrorFrame>) {
        let Some(request) = self.requests.get_mut(&id) else {
            return;
        };
        match &mut request.purpose {
            Purpose::Open {
                outcome: Some(_), ..
            } => {}
            Purpose::Open { local, outcome } => {
                if let Ok(forwarded) = &answer {
                    let address = TunnelAddress::new(forwarded);
                    self.tunnels.insert(
                        request.inner,
                        Open {
                            forwarded: forwarded.clone(),
                            local: *local,
                            options: request.options.clone(),
                            state: watch::Sender::new(TunnelState::Open(address)),
                        },
                    );
                }
                *outcome = Some(answer.map_err(refusal_error));
            }
            Purpose::Restore { before } => {
                let port = before.port;
                let event = match answer {
                    Ok(now) if TunnelAddress::new(&now) == TunnelAddress::new(before) => {
                        Event::Restored { port }
                    }
                    Ok(now) => {
                        let event = Event::Moved {
                            port,
                            old: before.hostname.clone(),
                            new: now.hostname.clone(),
                        };
                        if let Some(open) = self.tunnels.get_mut(&port) {
                            let address = TunnelAddress::new(&now);
                            open.forwarded = now;
                            open.state.send_replace(TunnelState::Moved(address));
                        }
                        event
                    }
                    Err(refusal) => {
                        let error = refusal_error(refusal);
                        let event = Event::RestoreFailed {
                            port,
                            error: error.to_string(),
                        };
                        if let Some(open) = self.tunnels.get(&port) {
                            open.lose(Arc::new(error));
                        }
                        event
                    }
                };
                self.requests.remove(&id);
                self.events.push_back(event);
            }
        }
    }

    /// The link is gone: every waiting request and close fails with
    /// [`Error::LinkClosed`]; open tunnels are kept, to be asked for again.
    pub fn link_lost(&mut self) {
        self.link_up = false;
        self.transmits.clear();
        self.requests
            .retain(|_, request| match &mut request.purpose {
                Purpose::Open { outcome, .. } => {
                    outcome.get_or_insert(Err(Error::LinkClosed));
                    true
                }
                Purpose::Restore { .. } => false,
            });
        for closing in self.closing.values_mut() {
            closing.outcome.get_or_insert(Err(Error::LinkClosed));
        }
    }

    /// A new link is up: asks the relay again for every open tunnel not lost (its
    /// lease gives back the same hostname and port).
    pub fn link_up(&mut self, now: Instant) {
        self.link_up = true;
        self.held = false;
        let kept = self
            .tunnels
            .values()
            .filter(|open| !open.state.borrow().is_lost());
        let restores: Vec<(Forwarded, ForwardOptions)> = kept
            .map(|open| (open.forwarded.clone(), open.options.clone()))
            .collect();
        for (before, options) in restores {
            let id = self.next_request;
            self.next_request = self.next_request.wrapping_add(1).max(1);
            let inner = before.port;
            self.transmits.push_back(forward_frame(id, inner, &options));
            self.requests.insert(
                id,
                Request {
                    inner,
                    options,
                    deadline: now + self.request_timeout,
                    purpose: Purpose::Restore { before },
                },
            );
        }
    }

    /// The relay refuses the agent itself (`reason`): no tunnel is routed any more.
    pub fn give_up(&mut self, reason: &Arc<Error>) {
        for open in self.tunnels.values() {
            if !open.state.borrow().is_lost() {
                open.lose(reason.clone());
            }
        }
    }

    /// Fails every request and close whose deadline has passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        let mut lost = Vec::new();
        for (id, request) in &mut self.requests {
            if request.deadline > now {
                continue;
            }
            match &mut request.purpose {
                Purpose::Open { outcome, .. } => {
                    outcome.get_or_insert(Err(Error::Timeout {
                        waiting_for: "the relay to open the tunnel",
                    }));
                }
                Purpose::Restore { before } => {
                    let error = Error::Timeout {
                        waiting_for: "the relay to restore the tunnel after a reconnect",
                    };
                    self.events.push_back(Event::RestoreFailed {
                        port: before.port,
                        error: error.to_string(),
                    });
                    if let Some(open) = self.tunnels.get(&before.port) {
                        open.lose(Arc::new(error));
                    }
                    lost.push(*id);
                }
            }
        }
        for id in lost {
            self.requests.remove(&id);
        }
        for closing in self.closing.values_mut() {
            if closing.deadline <= now {
                closing.outcome.get_or_insert(Err(Error::Timeout {
                    waiting_for: "the relay to close the tunnel",
                }));
            }
        }
    }

    /// The earliest deadline of a request or close still waiting.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let requests = self.requests.values().filter_map(|r| match &r.purpose {
            Purpose::Open {
                outcome: Some(_), ..
            } => None,
            _ => Some(r.deadline),
        });
        let closes = self
            .closing
            .values()
            .filter(|c| c.outcome.is_none())
            .map(|c| c.deadline);
        requests.chain(closes).min()
    }

    /// The next frame to send to the relay.
    pub fn poll_transmit(&mut self) -> Option<Frame> {
        if self.held {
            return None;
        }
        self.transmits.pop_front()
    }

    /// The next thing to report.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }
}

fn forward_frame(request_id: RequestId, port: u16, options: &ForwardOptions) -> Frame {
    Frame::Forward(ForwardRequest {
        request_id,
        port,
        unencrypted: options.unencrypted,
        h2: options.h2,
    })
}

/// The error a relay's refusal stands for.
pub(crate) fn refusal_error(refusal: ErrorFrame) -> Error {
    match refusal.code {
        ErrorCode::UNAUTHORIZED => Error::Unauthorized,
        ErrorCode::BAD_VERSION => Error::VersionMismatch {
            message: refusal.message,
        },
        code => match code.limit() {
            Some(limit) => Error::LimitReached {
                limit,
                message: refusal.message,
            },
            None => Error::Refused {
                message: format!("{} ({code})", refusal.message),
            },
        },
    }
}

#[cfg(test)]
mod tests;
