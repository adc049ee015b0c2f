//! How a relay stops: its phases, the drain of open connections, and the final stop.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::Shared;
use crate::netstack::lock;

/// How often a draining relay looks whether its connections have ended.
const DRAIN_POLL: Duration = Duration::from_millis(20);

/// Where a relay is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// Accepting and serving.
    Running,
    /// Listeners closed, open connections finishing.
    Draining,
    /// Everything ended.
    Stopped,
}

/// Ends everything when [`Relay::run_until`](super::Relay::run_until) returns or is
/// dropped.
pub(super) struct StopOnDrop(pub(super) Arc<Shared>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stop();
    }
}

impl Shared {
    /// Whether the relay still accepts and serves.
    pub(super) fn is_running(&self) -> bool {
        *self.phase.borrow() == Phase::Running
    }

    /// Running → draining: the accept loops return and close their listeners, and no
    /// new tunnel opens.
    pub(super) fn begin_shutdown(&self) {
        let started = self.phase.send_if_modified(|phase| {
            let start = *phase == Phase::Running;
            if start {
                *phase = Phase::Draining;
            }
            start
        });
        if started {
            lock(&self.registry).stop_accepting();
        }
    }

    /// Waits until no public connection is open or in its handshake.
    pub(super) async fn drained(&self) {
        while self.public_connections.load(Ordering::Relaxed) > 0 || self.pending_handshakes() > 0 {
            tokio::time::sleep(DRAIN_POLL).await;
        }
    }

    /// Ends every task (sessions, connections, raw TCP acceptors) and spawns no more.
    pub(super) fn stop(&self) {
        self.phase.send_replace(Phase::Stopped);
        lock(&self.registry).stop_accepting();
        self.tasks.stop();
        // A stopped relay holds nothing for agents that may come back.
        lock(&self.registry).drop_leases();
    }
}
