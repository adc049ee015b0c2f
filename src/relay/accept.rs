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
                let Some(permit) = budget.admit_from(Some(from.ip())) else {
                    shared.count_refusal(limit);
                    continue;
                };
                let _ = stream.set_nodelay(true);
                shared.tasks.spawn(serve(shared.clone(), stream, permit));
            }
            // Out of file descriptors and the like: wait instead of spinning.
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}
