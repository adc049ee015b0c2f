//! What an agent reports about itself ([`Agent::stats`]), and its metrics endpoint
//! ([`Agent::serve_metrics`]).

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::net::TcpListener;

use super::Agent;
use crate::netstack::StackStats;

/// A snapshot of an agent's figures ([`Agent::stats`]). Counters count since
/// [`Agent::connect`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct AgentStats {
    /// Whether the link to the relay is up.
    pub link_up: bool,
    /// Links to the relay made again after one was lost.
    pub reconnects: u64,
    /// Tunnels open (asked for and granted, and not closed).
    pub tunnels: usize,
    /// Inner connections from the relay accepted (their handshake completed).
    pub inner_connections_opened: u64,
    /// Inner connections open now, closing ones included.
    pub inner_connections_open: usize,
    /// Inner connections refused: the local service did not answer, or nothing
    /// listened on their port.
    pub inner_connections_refused: u64,
    /// The round trip to the relay in use (hello to welcome), as last measured; see
    /// [`Agent::relay`] for every relay's.
    pub relay_rtt: Option<Duration>,
    /// The agent's userspace stack's counters.
    pub stack: StackStats,
}

impl Agent {
    /// A snapshot of the agent's figures.
    pub fn stats(&self) -> AgentStats {
        let shared = &self.shared;
        let (link_up, tunnels) =
            shared.read(|control| (control.is_link_up(), control.tunnel_count()));
        let stack = shared.stack.stats();
        AgentStats {
            link_up,
            reconnects: shared.reconnects.load(Ordering::Relaxed),
            tunnels,
            inner_connections_opened: stack.accepted,
            inner_connections_open: stack.flows,
            inner_connections_refused: stack.declined + stack.refused_syns,
            relay_rtt: shared.relay().rtt,
            stack,
        }
    }

    /// Serves the agent's metrics on `listener` until the future is dropped:
    /// `/metrics` (Prometheus text), `/healthz` (200), `/readyz` (200 while the link
    /// is up, else 503), as the relay's metrics endpoint does. It holds the agent
    /// meanwhile.
    pub fn serve_metrics(
        &self,
        listener: TcpListener,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        crate::metrics::serve(listener, crate::metrics::agent::site(self.clone()))
    }
}
