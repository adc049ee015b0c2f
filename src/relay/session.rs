//! The control plane of one agent session, sans-IO: whom a hello admits, and what each
//! control frame does to the [`Registry`] and gets as an answer.
//!
//! Nothing here reads a socket or a clock. A driver ([`endpoint`](super::endpoint), or
//! the sans-IO [`harness`](super::harness)) hands frames to [`Session::handle`] under the
//! registry's lock and sends the [`Answer`]s; the one step that needs I/O, binding the
//! raw TCP port of an unencrypted tunnel, comes out as [`Step::BindTcp`], and the
//! driver brings the port back to [`Session::bound`].

use tokio::time::Instant;

use super::agents::Claim;
use super::pool::PortPlace;
use super::registry::{AgentKey, Registry, SessionId, TcpPort};
use super::ticket::Verifier;
use crate::limit::Limit;
use crate::netstack::Stack;
use crate::token::Token;
use crate::wire::{
    ErrorCode, ErrorFrame, ForwardRequest, Frame, Hello, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};

/// What a refused hello is counted as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Counted {
    /// In [`RelayStats::failed_handshakes`](super::RelayStats::failed_handshakes).
    FailedHandshake,
    /// In [`RelayStats::unauthorized`](super::RelayStats::unauthorized).
    Unauthorized,
    /// In [`RelayStats::refused_by_limit`](super::RelayStats::refused_by_limit), at this
    /// limit.
    Limit(Limit),
    /// Nowhere.
    Uncounted,
}

/// Why a hello is turned away: the error the agent gets, and how it is counted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    pub(crate) code: ErrorCode,
    pub(crate) message: String,
    pub(crate) counted: Counted,
}

/// A welcomed hello: its token, and the agent its tunnels are leased to, if they are.
#[derive(Debug)]
pub(crate) struct Admission {
    /// The token's place in the relay's tokens.
    pub(crate) token: usize,
    /// The frame format version the link speaks: the agent's.
    pub(crate) version: u16,
    claim: Option<Claim>,
}

impl Admission {
    /// Whether the agent reads a [`Frame::Connection`] first on each inner connection.
    pub(crate) fn describes_connections(&self) -> bool {
        self.version >= 2
    }

    /// The ticket the welcome carries: the agent's, or empty if its tunnels are not
    /// leased.
    pub(crate) fn ticket(&self) -> bytes::Bytes {
        self.claim.as_ref().map(Claim::ticket).unwrap_or_default()
    }
}

/// Decides on an agent's hello at `now`: whom it is admitted as (see
/// [`Hello::resume`]: a known agent by its ticket, a new agent, or one whose tunnels are
/// not leased), or why it is turned away. `running` is whether the relay still takes
/// new sessions.
pub(crate) fn admit(
    hello: &Hello,
    tokens: &[Token],
    running: bool,
    registry: &mut Registry,
    now: Instant,
) -> Result<Admission, Refusal> {
    if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&hello.version) {
        return Err(Refusal {
            code: ErrorCode::BAD_VERSION,
            message: format!(
                "relay speaks versions {MIN_PROTOCOL_VERSION} to {PROTOCOL_VERSION}, agent {}",
                hello.version
            ),
            counted: Counted::FailedHandshake,
        });
    }
    let Some(token_index) = tokens
        .iter()
        .position(|token| !hello.token.is_empty() && token.matches(&hello.token))
    else {
        return Err(Refusal {
            code: ErrorCode::UNAUTHORIZED,
            message: "unknown agent token".into(),
            counted: Counted::Unauthorized,
        });
    };
    if !running {
        return Err(Refusal {
            code: ErrorCode::INTERNAL,
            message: "the relay is shutting down".into(),
            counted: Counted::Uncounted,
        });
    }
    if hello.resume.is_empty() {
        return Ok(Admission {
            token: token_index,
            version: hello.version,
            claim: None,
        });
    }
    match registry.claim(token_index, &hello.resume, now) {
        Ok(claim) => Ok(Admission {
            token: token_index,
            version: hello.version,
            claim: Some(claim),
        }),
        Err(too_soon) => Err(Refusal {
            code: ErrorCode::TOO_SOON,
            message: format!(
                "another link of this agent was admitted less than {:?} ago and still holds \
                 its session; try again later ({})",
                too_soon.interval,
                Limit::TakeoverInterval
            ),
            counted: Counted::Limit(Limit::TakeoverInterval),
        }),
    }
}

/// One answer to a control frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Answer {
    pub(crate) frame: Frame,
    /// The limit a refusal was at, to count in `refused_by_limit`.
    pub(crate) refused: Option<Limit>,
}

impl Answer {
    fn frame(frame: Frame) -> Answer {
        Answer {
            frame,
            refused: None,
        }
    }

    fn error(request_id: u32, code: ErrorCode, message: String) -> Answer {
        Answer::frame(Frame::Error(ErrorFrame {
            request_id,
            code,
            message,
        }))
    }

    /// The refusal of request `request_id` at `limit`, counted in `refused_by_limit`.
    fn at_limit(request_id: u32, limit: Limit, message: String) -> Answer {
        let mut answer = Answer::error(request_id, ErrorCode::limit_reached(limit), message);
        answer.refused = Some(limit);
        answer
    }

    fn shutting_down(request_id: u32) -> Answer {
        Answer::error(
            request_id,
            ErrorCode::INTERNAL,
            "the relay is shutting down".into(),
        )
    }
}

/// What the driver does next with a control frame.
#[derive(Debug)]
pub(crate) enum Step {
    /// Send this answer.
    Answer(Answer),
    /// Bind a raw TCP port for this tunnel, then call [`Session::bound`].
    BindTcp(PendingTunnel),
}

/// An unencrypted tunnel waiting for its raw TCP port.
pub(crate) struct PendingTunnel {
    pub(crate) request: ForwardRequest,
    /// Its hostname, which the port's acceptor routes by.
    pub(crate) hostname: String,
    /// Its port's place in the token's share of the range.
    place: PortPlace,
}

impl std::fmt::Debug for PendingTunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingTunnel")
            .field("request", &self.request)
            .field("hostname", &self.hostname)
            .finish_non_exhaustive()
    }
}

/// Why a pending tunnel got no raw TCP port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Unbound {
    /// Every port tried was taken.
    NoFreePort,
    /// The relay stopped meanwhile.
    ShuttingDown,
}

/// The relay's side of one agent link.
#[derive(Debug)]
pub(crate) struct Session {
    id: SessionId,
    /// The token's place in the relay's tokens.
    token: usize,
    /// The agent its tunnels are leased to, if they are, and its ticket's verifier.
    agent: Option<(AgentKey, Verifier)>,
}

impl Session {
    /// Starts the session of `admission` (from [`admit`]) serving `stack`, at `now`.
    pub(crate) fn start(
        registry: &mut Registry,
        stack: Stack,
        admission: &Admission,
        now: Instant,
    ) -> Session {
        Session {
            id: registry.start_session(
                stack,
                admission.claim.as_ref(),
                admission.describes_connections(),
                now,
            ),
            token: admission.token,
            agent: admission
                .claim
                .as_ref()
                .map(|claim| (claim.agent, claim.verifier())),
        }
    }

    /// The session's number in the registry.
    #[cfg(any(test, feature = "harness"))]
    pub(crate) fn id(&self) -> SessionId {
        self.id
    }

    /// Handles one control frame from the agent.
    pub(crate) fn handle(&self, registry: &mut Registry, frame: Frame) -> Step {
        match frame {
            Frame::Forward(request) => self.open(registry, request),
            Frame::Close { port } => {
                registry.close(self.id, port);
                Step::Answer(Answer::frame(Frame::Close { port }))
            }
            _ => Step::Answer(Answer::error(
                0,
                ErrorCode::PROTOCOL,
                "unexpected frame".into(),
            )),
        }
    }

    /// Opens a tunnel to `request.port` of the agent, or takes back its lease.
    fn open(&self, registry: &mut Registry, request: ForwardRequest) -> Step {
        let (id, port) = (request.request_id, request.port);
        let refuse = |code, message: String| Step::Answer(Answer::error(id, code, message));
        if port == 0 {
            return refuse(
                ErrorCode::INVALID_REQUEST,
                "port 0 is not a valid port (1 to 65535)".into(),
            );
        }
        if request.h2 && request.unencrypted {
            return refuse(
                ErrorCode::INVALID_REQUEST,
                "HTTP/2 needs TLS: h2 cannot be unencrypted".into(),
            );
        }
        if registry.has_port(self.id, port) {
            return refuse(
                ErrorCode::PORT_IN_USE,
                format!("port {port} is already forwarded"),
            );
        }
        // A tunnel taken back counts against the limit like a new one.
        if registry.at_tunnel_limit(self.id) {
            let (max, limit) = (registry.max_tunnels_per_agent(), Limit::TunnelsPerAgent);
            return Step::Answer(Answer::at_limit(
                id,
                limit,
                format!("this agent has its maximum of {max} tunnels open ({limit})"),
            ));
        }
        if let Some((agent, _)) = self.agent {
            if let Some(forwarded) = registry.reclaim(self.id, agent, &request) {
                return Step::Answer(Answer::frame(Frame::Forwarded(forwarded)));
            }
        }
        if !registry.accepting() {
            return Step::Answer(Answer::shutting_down(id));
        }
        if let Some(refusal) = self.over_lease_limit(registry, id) {
            return Step::Answer(refusal);
        }
        let hostname = registry.fresh_hostname();
        if request.unencrypted {
            let Some(place) = registry.tcp_port_place(self.token) else {
                return Step::Answer(Answer::at_limit(
                    id,
                    Limit::TcpPorts,
                    format!(
                        "the agents of this token hold their share of the relay's raw TCP \
                         ports ({})",
                        Limit::TcpPorts
                    ),
                ));
            };
            return Step::BindTcp(PendingTunnel {
                request,
                hostname,
                place,
            });
        }
        let forwarded = registry.open(self.id, self.agent, &request, hostname, None);
        Step::Answer(Answer::frame(Frame::Forwarded(forwarded)))
    }

    /// Finishes a [`Step::BindTcp`] with the port the driver bound.
    pub(crate) fn bound(
        &self,
        registry: &mut Registry,
        pending: PendingTunnel,
        tcp: Result<TcpPort, Unbound>,
    ) -> Answer {
        let PendingTunnel {
            request,
            hostname,
            place,
        } = pending;
        let tcp = tcp.map(|tcp| tcp.holding(Some(place)));
        if tcp.is_ok() {
            // Other sessions may have taken the last leases meanwhile.
            if let Some(refusal) = self.over_lease_limit(registry, request.request_id) {
                return refusal;
            }
        }
        match tcp {
            Ok(tcp) => {
                let forwarded = registry.open(self.id, self.agent, &request, hostname, Some(tcp));
                Answer::frame(Frame::Forwarded(forwarded))
            }
            Err(Unbound::NoFreePort) => Answer::at_limit(
                request.request_id,
                Limit::TcpPorts,
                format!("no free raw TCP port on the relay ({})", Limit::TcpPorts),
            ),
            Err(Unbound::ShuttingDown) => Answer::shutting_down(request.request_id),
        }
    }

    /// The refusal of a new leased tunnel if this session's agent is at a lease limit.
    fn over_lease_limit(&self, registry: &Registry, request_id: u32) -> Option<Answer> {
        let (limit, max) = registry.lease_limit(self.agent?.0)?;
        let holder = match limit {
            Limit::LeasesPerToken => "the agents of this token hold their",
            _ => "the relay holds its",
        };
        Some(Answer::at_limit(
            request_id,
            limit,
            format!("{holder} maximum of {max} tunnel leases ({limit})"),
        ))
    }

    /// Ends the session at `now` (its link is gone): see [`Registry::end_session`].
    pub(crate) fn end(&self, registry: &mut Registry, now: Instant) {
        registry.end_session(self.id, self.agent.map(|(agent, _)| agent), now);
    }
}
