//! The signals that stop the command, and how long a stop may take.

use std::time::Duration;

use anyhow::{Context, Result};

/// How long a stopping `forward` or `demo` waits for the relay to confirm the close.
pub(crate) const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// Ctrl-C (SIGINT) and, on unix, SIGTERM: what asks a relay to stop.
pub(crate) struct ShutdownSignals {
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    /// Starts listening for both signals: once, so that each signal counts once.
    pub(crate) fn new() -> Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(ShutdownSignals {
                terminate: signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?,
                interrupt: signal(SignalKind::interrupt()).context("cannot listen for Ctrl-C")?,
            })
        }
        #[cfg(not(unix))]
        Ok(ShutdownSignals {})
    }

    /// Runs `work` unless a Ctrl-C or SIGTERM comes first (`None` then).
    pub(crate) async fn unless<T>(
        &mut self,
        work: impl std::future::Future<Output = T>,
    ) -> Option<T> {
        tokio::select! {
            done = work => Some(done),
            () = self.next() => None,
        }
    }

    /// Runs `closing` (after the first signal, or a failure) for at most
    /// [`CLOSE_WAIT`]; a signal meanwhile exits the process at once, with status 130.
    pub(crate) async fn closing(
        &mut self,
        closing: impl std::future::Future<Output = Result<(), portferry::Error>>,
    ) {
        tracing::info!("closing the tunnels; Ctrl-C again to exit at once");
        match self.unless(tokio::time::timeout(CLOSE_WAIT, closing)).await {
            Some(Ok(Ok(()))) => {}
            Some(Ok(Err(e))) => tracing::warn!(error = %e, "could not close the tunnel cleanly"),
            Some(Err(_)) => tracing::warn!(
                "the relay did not confirm the close within {CLOSE_WAIT:?}; exiting (its lease runs out)"
            ),
            None => {
                tracing::warn!("exiting at once");
                std::process::exit(130);
            }
        }
    }

    /// Waits for the next Ctrl-C or SIGTERM.
    pub(crate) async fn next(&mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}
