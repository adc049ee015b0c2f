//! The relay's accept loops: a handshake place for every connection, or the close.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

use super::pool::AddressPlace;
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
    let (budget, limit) = match pool {
        Handshakes::Agents => (&shared.agent_handshakes, Limit::PendingAgentHandshakes),
        Handshakes::Public => (&shared.public_handshakes, Limit::PendingHandshakes),
    };
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
    /// What the listener is, for the log.
    fn listener(self) -> &'static str {
        match self {
            Handshakes::Agents => "the agent endpoint",
            Handshakes::Public => "the public TLS port",
        }
    }
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
