//! The relay's accept loops: a handshake place for every connection, or the close;
//! and a connection's client ([`admit_client`]), which a trusted balancer names.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

use super::edge::CLIENT_HELLO_DEADLINE;
use super::pool::{AddressPlace, AddressPool};
use super::proxied::{self, ClientAddr};
use super::{Phase, Shared};
use crate::limit::Limit;

/// Which handshake places a listener's connections take.
#[derive(Debug, Clone, Copy)]
pub(super) enum Handshakes {
    /// [`max_pending_agent_handshakes`](super::RelayConfig::max_pending_agent_handshakes).
    Agents,
    /// [`max_pending_handshakes`](super::RelayConfig::max_pending_handshakes).
    Public,
}

/// Accepts connections until the relay drains, each served by its own task once it
/// has a handshake place in `pool`; a connection beyond the pool, or beyond its source
/// address's share of it, is closed at once.
pub(super) async fn accept_loop<F, Fut>(
    listener: TcpListener,
    shared: Arc<Shared>,
    pool: Handshakes,
    serve: F,
) where
    F: Fn(Arc<Shared>, TcpStream, AddressPlace) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut phase = shared.phase.subscribe();
    let mut errors = AcceptErrors::default();
    let (budget, limit) = pool.places(&shared);
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = phase.wait_for(|phase| *phase != Phase::Running) => return,
        };
        match accepted {
            Ok((stream, from)) => {
                errors.accepted();
                let Some(permit) = budget.admit_from(Some(from.ip())) else {
                    shared.count_refusal(limit);
                    continue;
                };
                let _ = stream.set_nodelay(true);
                shared.tasks.spawn(serve(shared.clone(), stream, permit));
            }
            Err(error) => errors.failed(pool.listener(), error).await,
        }
    }
}

impl Handshakes {
    /// The pool of these places, and its limit.
    pub(super) fn places(self, shared: &Shared) -> (&AddressPool, Limit) {
        match self {
            Handshakes::Agents => (&shared.agent_handshakes, Limit::PendingAgentHandshakes),
            Handshakes::Public => (&shared.public_handshakes, Limit::PendingHandshakes),
        }
    }

    /// What the listener is, for the log.
    fn listener(self) -> &'static str {
        match self {
            Handshakes::Agents => "the agent endpoint",
            Handshakes::Public => "the public TLS port",
        }
    }
}

/// The client of a connection holding `handshake` (a place in `pool`, taken for its
/// peer): the socket's peer, or — from a trusted balancer — the client its PROXY header
/// names, read by `deadline` (the place yields after [`CLIENT_HELLO_DEADLINE`], as a
/// slow ClientHello's does). A named client takes a place of its own in `pool` for the
/// rest of the handshake, in place of the balancer's. `None` if the connection is to be
/// closed: no valid header (counted in `failed_handshakes`), or no place for the client
/// (counted at the limit).
pub(super) async fn admit_client(
    shared: &Shared,
    tcp: &mut TcpStream,
    handshake: AddressPlace,
    pool: Handshakes,
    deadline: Instant,
) -> Option<(ClientAddr, AddressPlace)> {
    let trusted = &shared.config.accept_proxy_protocol_from;
    let read = proxied::client_of(tcp, trusted, deadline);
    let client = match handshake.run(CLIENT_HELLO_DEADLINE, read).await {
        Some(Ok(client)) => client,
        Some(Err(error)) => {
            let peer = tcp.peer_addr().ok();
            tracing::debug!(?peer, %error, "closed a connection from a trusted balancer");
            shared.count_failed_handshake();
            return None;
        }
        None => {
            shared.count_failed_handshake();
            return None;
        }
    };
    let peer = tcp.peer_addr().ok();
    if peer.is_some_and(|peer| peer.ip() == client.client.ip()) {
        return Some((client, handshake));
    }
    tracing::debug!(
        balancer = ?peer,
        client = %client.client,
        reached = %client.reached,
        "a trusted balancer named the client"
    );
    // Given back first, so that the client's place cannot be the balancer's own.
    drop(handshake);
    let (places, limit) = pool.places(shared);
    let Some(place) = places.admit_from(Some(client.client.ip())) else {
        shared.count_refusal(limit);
        return None;
    };
    Some((client, place))
}

/// First pause after a failed accept; it doubles with each failure in a row, up to
/// [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(10);
/// Longest pause after a failed accept.
const MAX_PAUSE: Duration = Duration::from_secs(1);
/// Least time between two log lines about failed accepts.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Failed accepts of one listener (out of file descriptors, most often): each is
/// followed by a pause instead of a spin, and they are logged at most once per
/// [`LOG_EVERY`], with how many there were.
pub(super) struct AcceptErrors {
    pause: Duration,
    unlogged: u64,
    logged: Option<tokio::time::Instant>,
}

impl Default for AcceptErrors {
    fn default() -> Self {
        AcceptErrors {
            pause: FIRST_PAUSE,
            unlogged: 0,
            logged: None,
        }
    }
}

impl AcceptErrors {
    /// Notes an accept that worked: the next failure pauses briefly again.
    pub(super) fn accepted(&mut self) {
        self.pause = FIRST_PAUSE;
    }

    /// Notes a failed accept on `listener`, logs it if it is time, and pauses.
    pub(super) async fn failed(&mut self, listener: &'static str, error: std::io::Error) {
        self.unlogged += 1;
        let now = tokio::time::Instant::now();
        if self.logged.is_none_or(|at| now >= at + LOG_EVERY) {
            tracing::warn!(
                %error,
                failures = self.unlogged,
                "{listener} cannot accept connections (out of file descriptors? \
                 see --max-connections and ulimit -n); pausing"
            );
            self.logged = Some(now);
            self.unlogged = 0;
        }
        tokio::time::sleep(self.pause).await;
        self.pause = (self.pause * 2).min(MAX_PAUSE);
    }
}
