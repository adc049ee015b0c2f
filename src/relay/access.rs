//! The access log: one line per public connection the relay admitted, written when it
//! ends, at info level under the `portferry::access` target (off with
//! [`RelayConfig::access_log`](super::RelayConfig::access_log), or with
//! `RUST_LOG=portferry::access=off`).
//!
//! A line holds the connection's id (the one its agent sees in
//! [`ConnectionInfo::id`]), the node, the tunnel (the first [`TUNNEL_PREFIX_LEN`]
//! characters of its label: the label is what makes a URL unguessable, so the log does
//! not hold it whole), the client's address, the edge (`tls` with its ALPN, or `tcp`),
//! the bytes each way, the duration and how the connection ended.

use std::fmt;
use std::io::ErrorKind;
use std::sync::Arc;
use std::time::Instant;

use crate::connection::{ConnectionInfo, Edge};
use crate::splice::{Meter, SpliceError, SpliceStats};

/// Characters of a tunnel's label an access-log line shows.
pub(crate) const TUNNEL_PREFIX_LEN: usize = 8;

/// How a public connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    /// Both sides closed cleanly.
    Closed,
    /// The client closed or reset its connection without a clean end (a TLS
    /// `close_notify`, or a FIN after everything was read): what most HTTP clients do once
    /// they have their response, and what a client that went away looks like too.
    ClientClosed,
    /// The client's side failed otherwise: a TLS error, a timeout.
    ClientFailed,
    /// The inner connection was reset: by the service, its agent, or a lost link.
    InnerReset,
    /// No byte moved for the relay's idle timeout.
    Idle,
    /// Its place in a limit was taken back for a newcomer.
    TakenBack,
    /// The agent refused it (nothing listens on the port, or the link is gone).
    Refused,
}

impl Ended {
    /// How a splice that returned `result` ended.
    pub(crate) fn from_splice(result: &Result<SpliceStats, SpliceError>) -> Ended {
        match result {
            Ok(_) => Ended::Closed,
            Err(SpliceError::InnerReset) => Ended::InnerReset,
            Err(SpliceError::Idle) => Ended::Idle,
            Err(SpliceError::Outer(e))
                if matches!(
                    e.kind(),
                    ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset | ErrorKind::BrokenPipe
                ) =>
            {
                Ended::ClientClosed
            }
            Err(_) => Ended::ClientFailed,
        }
    }

    /// The name a log line (or a metric label) gives it.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Ended::Closed => "closed",
            Ended::ClientClosed => "client_closed",
            Ended::ClientFailed => "client_failed",
            Ended::InnerReset => "inner_reset",
            Ended::Idle => "idle_timeout",
            Ended::TakenBack => "taken_back",
            Ended::Refused => "refused_by_agent",
        }
    }
}

impl fmt::Display for Ended {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A public connection on its way: what its access-log line will say.
pub(crate) struct AccessRecord {
    info: ConnectionInfo,
    tunnel: String,
    started: Instant,
    meter: Arc<Meter>,
}

impl AccessRecord {
    /// The record of the connection `info` to the tunnel `hostname`, started now.
    pub(crate) fn new(info: ConnectionInfo, hostname: &str) -> AccessRecord {
        let label = hostname.split('.').next().unwrap_or_default();
        AccessRecord {
            info,
            tunnel: label.chars().take(TUNNEL_PREFIX_LEN).collect(),
            started: Instant::now(),
            meter: Arc::default(),
        }
    }

    /// What the client and the relay know of the connection.
    pub(crate) fn info(&self) -> &ConnectionInfo {
        &self.info
    }

    /// Where the connection's splice counts its bytes.
    pub(crate) fn meter(&self) -> Arc<Meter> {
        self.meter.clone()
    }

    /// Writes the connection's line: it ended as `ended`, on the relay's `node`.
    pub(crate) fn log(&self, ended: Ended, node: Option<&str>) {
        let SpliceStats {
            inner_to_outer: to_client,
            outer_to_inner: from_client,
        } = self.meter.read();
        let (edge, alpn) = match self.info.edge() {
            Edge::Tls { alpn, .. } => ("tls", alpn.as_deref().map(String::from_utf8_lossy)),
            _ => ("tcp", None),
        };
        tracing::info!(
            target: "portferry::access",
            id = self.info.id(),
            node = node.unwrap_or("-"),
            tunnel = %self.tunnel,
            client = %self.info.client(),
            edge,
            alpn = alpn.as_deref().unwrap_or("-"),
            from_client,
            to_client,
            duration_ms = self.started.elapsed().as_millis() as u64,
            ended = %ended,
            "connection"
        );
    }
}
